//! Scoring generations against reference answers (for `kiln ensemble eval`).

use serde::Deserialize;

use crate::error::{EnsembleError, Result};

/// One evaluation example: a prompt and its accepted answers.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Example {
    /// The prompt (for decoder-only members; seq2seq members get `source` when present).
    pub prompt: String,
    /// Source text for encoder-decoder members (translation); defaults to `prompt`.
    #[serde(default)]
    pub source: Option<String>,
    /// Accepted answers: a string or a list of strings (`answer` or `answers`).
    #[serde(alias = "answers")]
    pub answer: Answers,
}

/// One answer or several.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum Answers {
    /// One answer.
    One(String),
    /// Several accepted answers.
    Many(Vec<String>),
}

impl Answers {
    /// All accepted answers.
    pub fn all(&self) -> Vec<&str> {
        match self {
            Answers::One(a) => vec![a.as_str()],
            Answers::Many(a) => a.iter().map(String::as_str).collect(),
        }
    }
}

/// How a generation is compared with the answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metric {
    /// The normalised generation equals a normalised answer.
    ExactMatch,
    /// The normalised generation contains a normalised answer.
    Contains,
}

impl std::str::FromStr for Metric {
    type Err = EnsembleError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "exact" | "exact-match" | "em" => Ok(Metric::ExactMatch),
            "contains" => Ok(Metric::Contains),
            other => Err(EnsembleError::arg(
                "metric",
                format!("`{other}`; use exact or contains"),
            )),
        }
    }
}

/// SQuAD-style normalisation: lower case, no punctuation, no articles, single spaces.
pub fn normalize(text: &str) -> String {
    let lower: String = text
        .to_lowercase()
        .chars()
        .map(|c| {
            if c.is_alphanumeric() || c.is_whitespace() {
                c
            } else {
                ' '
            }
        })
        .collect();
    lower
        .split_whitespace()
        .filter(|w| !matches!(*w, "a" | "an" | "the"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// True when `generation` matches one of `answers` under `metric`.
pub fn is_correct(generation: &str, answers: &Answers, metric: Metric) -> bool {
    let got = normalize(generation);
    answers.all().iter().any(|a| {
        let want = normalize(a);
        match metric {
            Metric::ExactMatch => got == want,
            Metric::Contains => {
                !want.is_empty() && format!(" {got} ").contains(&format!(" {want} "))
            }
        }
    })
}

/// Reads a JSONL file of [`Example`]s (blank lines skipped).
pub fn read_jsonl(text: &str) -> Result<Vec<Example>> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l)
                .map_err(|e| EnsembleError::arg("examples", format!("line {}: {e}", i + 1)))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics() {
        let a = Answers::Many(vec!["Paris".into(), "City of Light".into()]);
        assert!(is_correct(" paris.", &a, Metric::ExactMatch));
        assert!(!is_correct("Paris, France", &a, Metric::ExactMatch));
        assert!(is_correct("It is Paris, France", &a, Metric::Contains));
        assert!(!is_correct("Parisian", &a, Metric::Contains));
        let ex = read_jsonl(
            "{\"prompt\": \"q\", \"answer\": \"x\"}\n\n{\"prompt\": \"r\", \"answers\": [\"y\"]}",
        )
        .unwrap();
        assert_eq!(ex.len(), 2);
        assert!(read_jsonl("{\"prompt\": 1}").is_err());
    }
}
