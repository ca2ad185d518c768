//! Data: the paper's SVAMP and CommonsenseQA files with PaLM-540B rationales, and a plain JSONL
//! format for bringing your own data and teacher rationales.

use std::path::{Path, PathBuf};

use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use serde::Deserialize;

use crate::DistillError;

/// How answers are compared at evaluation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Task {
    /// Exact match of the label text (CQA: the chosen option).
    Text,
    /// Equal numeric value of two arithmetic expressions (SVAMP).
    Equation,
}

/// One training or test example.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    /// The model input (question, with answer choices for CQA), without task prefix.
    pub input: String,
    /// The gold label.
    pub label: String,
    /// The teacher LLM's label; `None` when its output could not be parsed or is absent.
    pub llm_label: Option<String>,
    /// The teacher LLM's rationale; `None` when its output could not be parsed or is absent.
    pub rationale: Option<String>,
}

/// A loaded split and what happened while loading it.
#[derive(Debug, Clone)]
pub struct Split {
    /// The examples, in file order (or subsampled order).
    pub examples: Vec<Example>,
    /// Examples whose LLM output had no parseable rationale (kept, with `rationale: None`).
    pub unparsed_rationales: usize,
    /// Examples whose LLM output had no parseable label (kept, with `llm_label: None`).
    pub unparsed_llm_labels: usize,
    /// How answers are compared.
    pub task: Task,
}

impl Split {
    fn new(examples: Vec<Example>, task: Task) -> Self {
        let unparsed_rationales = examples.iter().filter(|e| e.rationale.is_none()).count();
        let unparsed_llm_labels = examples.iter().filter(|e| e.llm_label.is_none()).count();
        Self {
            examples,
            unparsed_rationales,
            unparsed_llm_labels,
            task,
        }
    }

    /// Keeps a seeded random `fraction` (0 < f <= 1) of the examples, at least one.
    pub fn subsample(mut self, fraction: f64, seed: u64) -> Result<Self, DistillError> {
        if !(fraction > 0.0 && fraction <= 1.0) {
            return Err(DistillError::arg(
                "subsample",
                format!("subsample fraction must be in (0, 1], got {fraction}"),
            ));
        }
        if fraction < 1.0 {
            let keep = ((self.examples.len() as f64 * fraction).round() as usize).max(1);
            self.examples.shuffle(&mut StdRng::seed_from_u64(seed));
            self.examples.truncate(keep);
        }
        Ok(Self::new(self.examples, self.task))
    }

    /// Splits off a seeded random `fraction` as a validation set (the paper holds out 10% of
    /// the training set): `(train, valid)`.
    pub fn split_off_valid(self, fraction: f64, seed: u64) -> (Self, Self) {
        let mut idx: Vec<usize> = (0..self.examples.len()).collect();
        idx.shuffle(&mut StdRng::seed_from_u64(seed.wrapping_add(0x5EED)));
        let n_valid = (self.examples.len() as f64 * fraction).round() as usize;
        let valid_set: std::collections::HashSet<usize> = idx[..n_valid].iter().copied().collect();
        let (mut train, mut valid) = (Vec::new(), Vec::new());
        for (i, e) in self.examples.into_iter().enumerate() {
            if valid_set.contains(&i) {
                valid.push(e);
            } else {
                train.push(e);
            }
        }
        (Self::new(train, self.task), Self::new(valid, self.task))
    }
}

/// Rationale and label parsed from one SVAMP chain-of-thought output, as the paper's
/// `SVAMPDatasetLoader._parse_llm_output`: cut at the first `Q:` (a hallucinated next question),
/// split once on `The answer is`; the label is the first `(...)` group on its line (greedy).
/// `None` for a part that cannot be parsed (the paper writes `' '` there).
pub fn parse_svamp_output(output: &str) -> (Option<String>, Option<String>) {
    let head = output.split("Q:").next().unwrap_or("").trim_end();
    let parts: Vec<&str> = head.split("The answer is").collect();
    if parts.len() != 2 {
        return (None, None);
    }
    let rationale = parts[0].trim_end().to_string();
    let label = paren_group(parts[1]).map(str::to_string);
    (Some(rationale), label)
}

/// Python `re.search(r'\(.*\)', s)`: the leftmost `(` that has a `)` later on its line, up to
/// the last such `)` (`.` does not cross newlines).
fn paren_group(s: &str) -> Option<&str> {
    for (i, c) in s.char_indices() {
        if c != '(' {
            continue;
        }
        let line_end = s[i..].find('\n').map_or(s.len(), |n| i + n);
        if let Some(j) = s[i..line_end].rfind(')') {
            return Some(&s[i..=i + j]);
        }
    }
    None
}

/// Rationale and label parsed from one CQA chain-of-thought output, as the paper's
/// `CQADatasetLoader._parse_llm_output`: cut at the first `Q:`, split once on
/// `So the answer is`; the label is the text after the first `(x)` marker, trimmed, without a
/// final `.`. An output that does not split in two (the paper's code would raise) gives
/// `(None, None)`.
pub fn parse_cqa_output(output: &str) -> (Option<String>, Option<String>) {
    let head = output.split("Q:").next().unwrap_or("").trim_end();
    let parts: Vec<&str> = head.split("So the answer is").collect();
    if parts.len() != 2 {
        return (None, None);
    }
    let rationale = parts[0].trim_end().to_string();
    (Some(rationale), cqa_label(parts[1]))
}

/// `re.split(r'\(.\)', label)[1].strip()` minus a final `.`: the text between the first and the
/// second `(x)` marker (`x` any one character but newline).
fn cqa_label(s: &str) -> Option<String> {
    let markers = paren_markers(s);
    let first = markers.first()?;
    let end = markers.get(1).map_or(s.len(), |m| m.0);
    let label = s[first.1..end].trim();
    let label = label.strip_suffix('.').unwrap_or(label);
    // The paper keeps an empty string here only if the text was `(a) .`; treat it as unparsed.
    if label.is_empty() {
        None
    } else {
        Some(label.to_string())
    }
}

/// Non-overlapping `(x)` matches, left to right: `(start, end)` byte ranges.
fn paren_markers(s: &str) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < s.len() {
        let rest = &s[i..];
        if rest.starts_with('(') {
            let mut it = rest.char_indices().skip(1);
            if let (Some((_, c)), Some((j, ')'))) = (it.next(), it.next())
                && c != '\n'
            {
                out.push((i, i + j + 1));
                i += j + 1;
                continue;
            }
        }
        i += rest.chars().next().map_or(1, char::len_utf8);
    }
    out
}

/// The paper's CQA input: question then the five lettered answer choices.
pub fn cqa_input(question: &str, choices: &[String]) -> String {
    let mut s = format!("{question}\nAnswer Choices:");
    for (letter, c) in ["a", "b", "c", "d", "e"].iter().zip(choices) {
        s.push_str(&format!("\n({letter}) {c}"));
    }
    s
}

fn read(path: &Path) -> Result<String, DistillError> {
    std::fs::read_to_string(path).map_err(|e| DistillError::Io(path.to_path_buf(), e))
}

fn json_lines<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<Vec<T>, DistillError> {
    let text = read(path)?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|e| DistillError::Parse {
                path: path.to_path_buf(),
                line: i + 1,
                message: e.to_string(),
            })
        })
        .collect()
}

/// The LLM outputs `{split}_CoT_{0,1,..}.json` (JSON arrays of strings), concatenated in file
/// order.
fn llm_outputs(dir: &Path, split: &str) -> Result<Vec<String>, DistillError> {
    let mut out = Vec::new();
    for i in 0.. {
        let path = dir.join(format!("{split}_CoT_{i}.json"));
        if !path.is_file() {
            if i == 0 {
                return Err(DistillError::Io(
                    path,
                    std::io::Error::new(std::io::ErrorKind::NotFound, "no LLM output files"),
                ));
            }
            break;
        }
        let v: Vec<String> =
            serde_json::from_str(&read(&path)?).map_err(|e| DistillError::Parse {
                path: path.clone(),
                line: e.line(),
                message: e.to_string(),
            })?;
        out.extend(v);
    }
    Ok(out)
}

fn attach_llm(
    mut examples: Vec<Example>,
    outputs: Vec<String>,
    parse: fn(&str) -> (Option<String>, Option<String>),
    what: &Path,
) -> Result<Vec<Example>, DistillError> {
    if outputs.len() != examples.len() {
        return Err(DistillError::arg(
            "llm outputs",
            format!(
                "{}: {} LLM outputs for {} examples",
                what.display(),
                outputs.len(),
                examples.len()
            ),
        ));
    }
    for (e, o) in examples.iter_mut().zip(outputs) {
        let (rationale, label) = parse(&o);
        e.rationale = rationale;
        e.llm_label = label;
    }
    Ok(examples)
}

/// Loads SVAMP's `split` (`train` or `test`) from `root` (the `step-by-step` folder) with the
/// PaLM rationales and labels.
pub fn load_svamp(root: &Path, split: &str) -> Result<Split, DistillError> {
    #[derive(Deserialize)]
    struct Line {
        input: String,
        label: String,
    }
    let dir = root.join("svamp");
    let lines: Vec<Line> = json_lines(&dir.join(format!("svamp_{split}.json")))?;
    let examples = lines
        .into_iter()
        .map(|l| Example {
            input: l.input,
            label: l.label,
            llm_label: None,
            rationale: None,
        })
        .collect();
    let outputs = llm_outputs(&dir.join("llm"), split)?;
    let examples = attach_llm(examples, outputs, parse_svamp_output, &dir)?;
    Ok(Split::new(examples, Task::Equation))
}

/// Loads CommonsenseQA's `split` (`train` or `test`) from `root` with the PaLM rationales.
pub fn load_cqa(root: &Path, split: &str) -> Result<Split, DistillError> {
    #[derive(Deserialize)]
    struct Line {
        question: String,
        choices: Vec<String>,
        answer: String,
    }
    let dir = root.join("cqa");
    let path = dir.join(format!("cqa_{split}.json"));
    let lines: Vec<Line> = json_lines(&path)?;
    let mut examples = Vec::with_capacity(lines.len());
    for (i, l) in lines.into_iter().enumerate() {
        if l.choices.len() != 5 {
            return Err(DistillError::Parse {
                path: path.clone(),
                line: i + 1,
                message: format!("expected 5 choices, got {}", l.choices.len()),
            });
        }
        examples.push(Example {
            input: cqa_input(&l.question, &l.choices),
            label: l.answer,
            llm_label: None,
            rationale: None,
        });
    }
    let outputs = llm_outputs(&dir.join("llm"), split)?;
    let examples = attach_llm(examples, outputs, parse_cqa_output, &dir)?;
    Ok(Split::new(examples, Task::Text))
}

/// Rationale and label of one e-SNLI chain-of-thought output, as the reference's
/// `ESNLIDatasetLoader._parse_llm_output`: the rationale is the text before `Answer:`, the label
/// the text after `Answer: ` up to a following `Premise`, right-trimmed.
pub fn parse_esnli_output(output: &str) -> (Option<String>, Option<String>) {
    let rationale = output.split("Answer:").next().unwrap_or("").trim_end();
    let label = output
        .split("Answer: ")
        .nth(1)
        .map(|rest| rest.split("Premise").next().unwrap_or("").trim_end());
    (
        Some(rationale.to_string()).filter(|r| !r.is_empty()),
        label.filter(|l| !l.is_empty()).map(str::to_string),
    )
}

/// Rationale and label of one ANLI chain-of-thought output, as the reference's
/// `ANLIDatasetLoader._parse_llm_output`: the text before a hallucinated next `Premise:`,
/// split once on `So the answer is`; the label drops its leading spaces and its last
/// character (the final `.`). Anything else is unparsed (the reference writes `''`).
pub fn parse_anli_output(output: &str) -> (Option<String>, Option<String>) {
    let head = output.split("Premise:").next().unwrap_or("").trim_end();
    let parts: Vec<&str> = head.split("So the answer is").collect();
    if parts.len() != 2 {
        return (None, None);
    }
    let rationale = parts[0].trim_end();
    let label = parts[1].trim_start();
    let label = label.char_indices().last().map_or("", |(i, _)| &label[..i]);
    (
        Some(rationale.to_string()).filter(|r| !r.is_empty()),
        Some(label.to_string()).filter(|l| !l.is_empty()),
    )
}

/// NLI label index to text, as the reference: 0 entailment, 1 neutral, 2 contradiction.
fn nli_label(index: i64, path: &Path, line: usize) -> Result<String, DistillError> {
    Ok(match index {
        0 => "entailment",
        1 => "neutral",
        2 => "contradiction",
        other => {
            return Err(DistillError::Parse {
                path: path.to_path_buf(),
                line,
                message: format!("label {other} is not 0, 1 or 2"),
            });
        }
    }
    .to_string())
}

/// Loads an NLI split in the reference's JSON-lines format (`premise`, `hypothesis`, `label`
/// index; other fields ignored) with its LLM outputs: the input is premise and hypothesis
/// joined by T5's EOS token, `premise</s>hypothesis`, as the reference's
/// `tokenizer.eos_token.join(...)`.
fn load_nli(
    root: &Path,
    name: &str,
    split: &str,
    parse: fn(&str) -> (Option<String>, Option<String>),
) -> Result<Split, DistillError> {
    #[derive(Deserialize)]
    struct Line {
        premise: String,
        hypothesis: String,
        label: i64,
    }
    let dir = root.join(name);
    let path = dir.join(format!("{name}_{split}.json"));
    let lines: Vec<Line> = json_lines(&path)?;
    let examples = lines
        .into_iter()
        .enumerate()
        .map(|(i, l)| {
            Ok(Example {
                input: format!("{}</s>{}", l.premise, l.hypothesis),
                label: nli_label(l.label, &path, i + 1)?,
                llm_label: None,
                rationale: None,
            })
        })
        .collect::<Result<Vec<_>, DistillError>>()?;
    let outputs = llm_outputs(&dir.join("llm"), split)?;
    let examples = attach_llm(examples, outputs, parse, &dir)?;
    Ok(Split::new(examples, Task::Text))
}

/// Loads e-SNLI's `split` (`train`, `valid` or `test`) from `root/esnli/` in the reference's
/// format (`esnli_{split}.json`, `llm/{split}_CoT_{i}.json`).
pub fn load_esnli(root: &Path, split: &str) -> Result<Split, DistillError> {
    load_nli(root, "esnli", split, parse_esnli_output)
}

/// Loads ANLI round 1's `split` (`train`, `valid` or `test`) from `root/anli1/` in the
/// reference's format (`anli1_{split}.json`, `llm/{split}_CoT_{i}.json`).
pub fn load_anli1(root: &Path, split: &str) -> Result<Split, DistillError> {
    load_nli(root, "anli1", split, parse_anli_output)
}

/// Loads a JSONL file of `{"input", "label", "rationale"?, "llm_label"?}` objects (your own
/// data and teacher). Empty rationales count as missing. `task` says how to compare answers.
pub fn load_jsonl(path: &Path, task: Task) -> Result<Split, DistillError> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Line {
        input: String,
        label: String,
        #[serde(default)]
        rationale: Option<String>,
        #[serde(default)]
        llm_label: Option<String>,
    }
    let lines: Vec<Line> = json_lines(path)?;
    let examples = lines
        .into_iter()
        .map(|l| Example {
            input: l.input,
            label: l.label,
            rationale: l.rationale.filter(|r| !r.trim().is_empty()),
            llm_label: l.llm_label.filter(|r| !r.trim().is_empty()),
        })
        .collect();
    Ok(Split::new(examples, task))
}

/// Where a dataset comes from.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum DataSource {
    /// The paper's SVAMP files under this `step-by-step` folder.
    Svamp(PathBuf),
    /// The paper's CQA files under this `step-by-step` folder.
    Cqa(PathBuf),
    /// e-SNLI in the reference's format under this folder (`esnli/`).
    Esnli(PathBuf),
    /// ANLI round 1 in the reference's format under this folder (`anli1/`).
    Anli1(PathBuf),
    /// A JSONL training file, an optional JSONL test file, and the answer comparison.
    Jsonl {
        /// Training file.
        train: PathBuf,
        /// Test file.
        test: Option<PathBuf>,
        /// Answer comparison.
        task: Task,
    },
}

impl DataSource {
    /// Loads `split` (`train` or `test`).
    pub fn load(&self, split: &str) -> Result<Split, DistillError> {
        match self {
            DataSource::Svamp(root) => load_svamp(root, split),
            DataSource::Cqa(root) => load_cqa(root, split),
            DataSource::Esnli(root) => load_esnli(root, split),
            DataSource::Anli1(root) => load_anli1(root, split),
            DataSource::Jsonl { train, test, task } => match split {
                "train" => load_jsonl(train, *task),
                _ => match test {
                    Some(t) => load_jsonl(t, *task),
                    None => Err(DistillError::arg(
                        "test data",
                        "this JSONL data source has no test file (pass --test-data)",
                    )),
                },
            },
        }
    }

    /// How answers are compared.
    pub fn task(&self) -> Task {
        match self {
            DataSource::Svamp(_) => Task::Equation,
            DataSource::Cqa(_) | DataSource::Esnli(_) | DataSource::Anli1(_) => Task::Text,
            DataSource::Jsonl { task, .. } => *task,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn svamp_parse_cuts_hallucinated_question() {
        let out = "Luke scored 84 points after 2 rounds. So he scored 84 points in 2 rounds. 84 / 2 = 42. The answer is (84 / 2).\n\nQ: There are 120 students. The answer is (120 /";
        let (r, l) = parse_svamp_output(out);
        assert_eq!(
            r.as_deref(),
            Some(
                "Luke scored 84 points after 2 rounds. So he scored 84 points in 2 rounds. 84 / 2 = 42."
            )
        );
        assert_eq!(l.as_deref(), Some("(84 / 2)"));
        // Greedy like `\(.*\)`: nested groups stay whole.
        assert_eq!(
            parse_svamp_output("x. The answer is ((3 + 4) * 2).")
                .1
                .as_deref(),
            Some("((3 + 4) * 2)")
        );
        assert_eq!(parse_svamp_output("no answer here"), (None, None));
        assert_eq!(
            parse_svamp_output("The answer is 3. The answer is 4."),
            (None, None)
        );
        let (r, l) = parse_svamp_output("Some steps. The answer is 42.");
        assert_eq!(r.as_deref(), Some("Some steps."));
        assert_eq!(l, None);
    }

    #[test]
    fn cqa_parse() {
        let out = "The answer must be a place. So the answer is (b) bank.\n\nQ: next";
        let (r, l) = parse_cqa_output(out);
        assert_eq!(r.as_deref(), Some("The answer must be a place."));
        assert_eq!(l.as_deref(), Some("bank"));
        assert_eq!(
            parse_cqa_output("x. So the answer is (c) pet shop (d) zoo.")
                .1
                .as_deref(),
            Some("pet shop")
        );
        assert_eq!(parse_cqa_output("x. So the answer is bank.").1, None);
        assert_eq!(parse_cqa_output("no marker"), (None, None));
    }

    #[test]
    fn cqa_input_format() {
        let c: Vec<String> = ["a1", "b1", "c1", "d1", "e1"].map(String::from).to_vec();
        assert_eq!(
            cqa_input("Q?", &c),
            "Q?\nAnswer Choices:\n(a) a1\n(b) b1\n(c) c1\n(d) d1\n(e) e1"
        );
    }
}
