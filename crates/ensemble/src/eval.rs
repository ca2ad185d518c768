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
    /// Multiple choice: the options' letters (`["A", "B", "C", "D"]`); the answer is one of
    /// them. Overrides the CLI's `--choices` for this example.
    #[serde(default)]
    pub choices: Option<Vec<String>>,
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
    /// GSM8K: the last number of the generation equals the last number of an answer, both
    /// read as the reference's `utils/evaluate/GSM.py` reads them ([`last_number`]).
    LastNumber,
    /// Multiple choice: the generation, trimmed, is the answer's letter.
    Choice,
}

impl std::str::FromStr for Metric {
    type Err = EnsembleError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "exact" | "exact-match" | "em" => Ok(Metric::ExactMatch),
            "contains" => Ok(Metric::Contains),
            "number" | "last-number" | "gsm8k" => Ok(Metric::LastNumber),
            "choice" => Ok(Metric::Choice),
            other => Err(EnsembleError::arg(
                "metric",
                format!("`{other}`; use exact, contains, number or choice"),
            )),
        }
    }
}

/// The token texts the reference scores for option letters: the letter after a space (its
/// `▁A`, `▁B`, ...), for [`Ensemble::choose`](crate::Ensemble::choose).
pub fn choice_tokens(letters: &[String]) -> Vec<String> {
    letters.iter().map(|l| format!(" {}", l.trim())).collect()
}

/// A member's prompt from its template, as the reference's per-model `*_system_template`
/// (`"<s>{}"`, a chat format, ...): `{}` is replaced by the prompt; a template must hold exactly
/// one `{}`.
pub fn apply_template(template: &str, prompt: &str) -> Result<String> {
    match template.matches("{}").count() {
        1 => Ok(template.replacen("{}", prompt, 1)),
        n => Err(EnsembleError::arg(
            "template",
            format!("{template:?} holds {n} `{{}}`; it needs exactly one, where the prompt goes"),
        )),
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

/// The last number in `text` as the reference's GSM8K scorer reads it: thousands separators
/// between digits dropped (`re.sub(r"(\d),(\d)", r"\1\2", ...)`, non-overlapping, so `1,2,3`
/// becomes `12,3`), then the last match of `\d+(\.\d+)?`, as a string (`72.0` ≠ `72`). ASCII
/// digits only (Python's `\d` also takes other scripts' digits).
pub fn last_number(text: &str) -> Option<String> {
    let b = text.as_bytes();
    let mut joined = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if i + 2 < b.len() && b[i].is_ascii_digit() && b[i + 1] == b',' && b[i + 2].is_ascii_digit()
        {
            joined.extend_from_slice(&[b[i], b[i + 2]]);
            i += 3;
        } else {
            joined.push(b[i]);
            i += 1;
        }
    }
    let (mut last, mut i) = (None, 0);
    while i < joined.len() {
        if !joined[i].is_ascii_digit() {
            i += 1;
            continue;
        }
        let start = i;
        while i < joined.len() && joined[i].is_ascii_digit() {
            i += 1;
        }
        if i + 1 < joined.len() && joined[i] == b'.' && joined[i + 1].is_ascii_digit() {
            i += 1;
            while i < joined.len() && joined[i].is_ascii_digit() {
                i += 1;
            }
        }
        last = Some(start..i);
    }
    last.map(|r| String::from_utf8_lossy(&joined[r]).into_owned())
}

/// True when `generation` matches one of `answers` under `metric`.
pub fn is_correct(generation: &str, answers: &Answers, metric: Metric) -> bool {
    match metric {
        Metric::LastNumber => {
            let got = last_number(generation);
            return got.is_some() && answers.all().iter().any(|a| last_number(a) == got);
        }
        Metric::Choice => return answers.all().iter().any(|a| generation.trim() == a.trim()),
        Metric::ExactMatch | Metric::Contains => {}
    }
    let got = normalize(generation);
    answers.all().iter().any(|a| {
        let want = normalize(a);
        match metric {
            Metric::ExactMatch => got == want,
            Metric::Contains => {
                !want.is_empty() && format!(" {got} ").contains(&format!(" {want} "))
            }
            Metric::LastNumber | Metric::Choice => unreachable!("handled above"),
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

    /// What Python's `re` gives with the reference's two expressions
    /// (`python3 tools/ensemble_oracle.py numbers`).
    #[test]
    fn last_number_reads_as_the_gsm8k_scorer() {
        let cases = [
            ("The answer is 1,234,567.", Some("1234567")),
            ("1,2,3", Some("3")),
            ("3.5.7 apples", Some("7")),
            ("It costs $12.50, then 3 more", Some("3")),
            ("no digits here", None),
            ("She has 10.", Some("10")),
            ("-5 and 7.25", Some("7.25")),
            ("1,000.5 and 2,00", Some("200")),
            ("12a34", Some("34")),
            ("#### 72", Some("72")),
            ("0.5.", Some("0.5")),
        ];
        for (text, want) in cases {
            assert_eq!(last_number(text).as_deref(), want, "{text:?}");
        }
        let a = Answers::One("Natalia sold 48/2 = 24 clips.\n#### 72".into());
        assert!(is_correct("so the answer is 72.", &a, Metric::LastNumber));
        assert!(!is_correct("72 or 73", &a, Metric::LastNumber));
        assert!(!is_correct("72.0", &a, Metric::LastNumber));
        assert_eq!(apply_template("<s>{}", "Q: 1+1?").unwrap(), "<s>Q: 1+1?");
        assert!(apply_template("no slot", "x").is_err());
        assert!(apply_template("{} and {}", "x").is_err());
        let b = Answers::One("B".into());
        assert!(is_correct(" B", &b, Metric::Choice));
        assert!(!is_correct(" C", &b, Metric::Choice));
    }
}
