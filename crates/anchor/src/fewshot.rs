//! Few-shot multiple-choice prompts, built as the AnLLM paper evaluates (§4.3): in AC mode
//! `<AC>` is appended at the end of each demonstration only, so the demonstrations are
//! compressed into their anchors while the current question stays one open sentence that the
//! answer options see in full. kiln's earlier protocol (an `<AC>` after every sentence, the
//! question's included) is kept as [`PromptAnchors::Sentences`].
//!
//! Options are tokenised as lm-evaluation-harness does (the paper's harness): the context is
//! encoded alone, context + option together, and the option's tokens are what the second
//! encoding has beyond the first (`_encode_pair`), so an option's leading space merges into its
//! first token as it would in running text.

use std::path::Path;

use kiln_core::Tokenizer;

use crate::anchors::{AcPlacement, encode_anchored, sentence_ends};
use crate::score::Choice;
use crate::{AnchorError, Result};

/// One multiple-choice question.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct McQuestion {
    /// The question text.
    pub question: String,
    /// The options' texts.
    pub choices: Vec<String>,
    /// Index of the right option.
    pub answer: usize,
}

impl McQuestion {
    /// From a CommonsenseQA-style JSON object: `question`, `choices` (strings) and `answer` (the
    /// text of one choice), as in the step-by-step `cqa_*.json` files.
    pub fn from_json(value: &serde_json::Value) -> std::result::Result<Self, String> {
        let question = value["question"].as_str().ok_or("no string `question`")?;
        let choices: Vec<String> = value["choices"]
            .as_array()
            .ok_or("no `choices` array")?
            .iter()
            .map(|c| {
                c.as_str()
                    .map(String::from)
                    .ok_or("a choice that is not a string")
            })
            .collect::<std::result::Result<_, _>>()?;
        let answer = value["answer"].as_str().ok_or("no string `answer`")?;
        let answer = choices
            .iter()
            .position(|c| c == answer)
            .ok_or_else(|| format!("the answer `{answer}` is not one of the choices"))?;
        Ok(Self {
            question: question.to_string(),
            choices,
            answer,
        })
    }

    /// The question as a prompt shows it: `Q: {question} Answer choices: (a) ... (b) ....
    /// A:` (the step-by-step CQA format).
    pub fn prompt(&self) -> String {
        let listed: Vec<String> = self
            .choices
            .iter()
            .enumerate()
            .map(|(i, c)| format!("({}) {c}", (b'a' + (i % 26) as u8) as char))
            .collect();
        format!(
            "Q: {} Answer choices: {}. A:",
            self.question,
            listed.join(" ")
        )
    }

    /// A solved demonstration: the prompt, the `rationale` when given, and `So the answer is
    /// {answer}.`
    pub fn demonstration(&self, rationale: Option<&str>) -> String {
        let rationale = rationale.map_or(String::new(), |r| format!(" {}", r.trim()));
        format!(
            "{}{rationale} So the answer is {}.",
            self.prompt(),
            self.choices[self.answer]
        )
    }
}

/// Reads a CommonsenseQA-style JSONL file ([`McQuestion::from_json`] per line); errors name the
/// file and line.
pub fn read_questions(path: &Path) -> Result<Vec<McQuestion>> {
    let text = std::fs::read_to_string(path).map_err(|e| AnchorError::io(path, e))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, line)| {
            let value: serde_json::Value = serde_json::from_str(line)
                .map_err(|e| AnchorError::io(path, format!("line {}: {e}", i + 1)))?;
            McQuestion::from_json(&value)
                .map_err(|e| AnchorError::io(path, format!("line {}: {e}", i + 1)))
        })
        .collect()
}

/// Where `<AC>` goes in a few-shot prompt (AC mode; EP anchors are the text's own `.`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PromptAnchors {
    /// The paper's protocol (§4.3): an `<AC>` at the end of each demonstration only; the
    /// current question stays fully visible to the options.
    #[default]
    Demonstrations,
    /// An `<AC>` after every closed sentence of the prompt, the question's included (so the
    /// options see the question only through its anchors): kiln's earlier protocol.
    Sentences,
}

impl std::str::FromStr for PromptAnchors {
    type Err = AnchorError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "demonstrations" => Ok(Self::Demonstrations),
            "sentences" => Ok(Self::Sentences),
            other => Err(AnchorError::arg(
                "prompt anchors",
                format!("`{other}`: expected `demonstrations` or `sentences`"),
            )),
        }
    }
}

/// How [`few_shot_choices`] builds prompts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FewShotFormat {
    /// The `<AC>` id (AC mode); `None` for EP mode and plain models: no id is inserted.
    pub ac: Option<u32>,
    /// Where `<AC>` goes.
    pub anchors: PromptAnchors,
    /// The BOS id put first, when the model wants one.
    pub bos: Option<u32>,
}

/// Scoring items for `questions` after the few-shot `demonstrations` (each a question and an
/// optional rationale): the context is the demonstrations ([`McQuestion::demonstration`])
/// joined by spaces, then the question's prompt and `So the answer is`; each option is ` {choice}.`
/// after it.
pub fn few_shot_choices(
    tokenizer: &Tokenizer,
    demonstrations: &[(McQuestion, Option<String>)],
    questions: &[McQuestion],
    format: FewShotFormat,
) -> Result<Vec<Choice>> {
    let mut prefix = String::new();
    let mut demo_ends = Vec::new();
    for (question, rationale) in demonstrations {
        prefix.push_str(&question.demonstration(rationale.as_deref()));
        demo_ends.push(prefix.len());
        prefix.push(' ');
    }
    questions
        .iter()
        .map(|q| {
            let context = format!("{prefix}{} So the answer is", q.prompt());
            let ends = match (format.ac, format.anchors) {
                (None, _) => Vec::new(),
                (Some(_), PromptAnchors::Demonstrations) => demo_ends.clone(),
                (Some(_), PromptAnchors::Sentences) => sentence_ends(&context, AcPlacement::Prompt),
            };
            let encode = |text: &str| {
                encode_anchored(tokenizer, text, &ends, format.ac.unwrap_or(0), format.bos)
            };
            let context_ids = encode(&context)?;
            let options = q
                .choices
                .iter()
                .map(|c| {
                    let whole = encode(&format!("{context} {c}."))?;
                    match whole.get(context_ids.len()..) {
                        Some(tail) if !tail.is_empty() => Ok(tail.to_vec()),
                        _ => Err(AnchorError::arg(
                            "choices",
                            format!("option `{c}` encodes to no tokens after its context"),
                        )),
                    }
                })
                .collect::<Result<_>>()?;
            Ok(Choice {
                context: context_ids,
                options,
                answer: q.answer,
            })
        })
        .collect()
}
