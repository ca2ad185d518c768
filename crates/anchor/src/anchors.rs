//! Anchor tokens: which ids are anchors (EP or AC mode), the `<AC>` token, and sentence
//! splitting.

use std::collections::BTreeSet;

use kiln_core::Tokenizer;
use serde::{Deserialize, Serialize};

use crate::{AnchorError, Result};

/// How anchors are chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AnchorMode {
    /// Existing end-of-sentence tokens are the anchors (no new token).
    Ep,
    /// A new `<AC>` token inserted after every sentence is the anchor.
    Ac,
}

impl std::str::FromStr for AnchorMode {
    type Err = AnchorError;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "ep" => Ok(Self::Ep),
            "ac" => Ok(Self::Ac),
            other => Err(AnchorError::arg(
                "anchor mode",
                format!("anchor mode `{other}`: expected `ep` or `ac`"),
            )),
        }
    }
}

/// The token ids that are anchors.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AnchorSet {
    /// The mode they come from.
    pub mode: AnchorMode,
    /// Anchor ids.
    pub ids: BTreeSet<u32>,
}

impl AnchorSet {
    /// Anchors `ids` in `mode`; errors when empty.
    pub fn new(mode: AnchorMode, ids: impl IntoIterator<Item = u32>) -> Result<Self> {
        let ids: BTreeSet<u32> = ids.into_iter().collect();
        if ids.is_empty() {
            return Err(AnchorError::arg("anchor ids", "no anchor token ids"));
        }
        Ok(Self { mode, ids })
    }

    /// True when `id` is an anchor.
    pub fn contains(&self, id: u32) -> bool {
        self.ids.contains(&id)
    }
}

/// The `<AC>` token's text.
pub const AC_TOKEN: &str = "<AC>";

/// Adds `<AC>` as a special token (or finds it when already there); returns the tokenizer and
/// its id. The model's embeddings must grow to match ([`crate::grow_vocab`]).
pub fn add_ac_token(tokenizer: &Tokenizer) -> Result<(Tokenizer, u32)> {
    let mut inner = tokenizer.inner().clone();
    if let Some(id) = inner.token_to_id(AC_TOKEN) {
        return Ok((tokenizer.clone(), id));
    }
    inner.add_special_tokens(&[tokenizers::AddedToken::from(AC_TOKEN, true)]);
    let id = inner
        .token_to_id(AC_TOKEN)
        .ok_or_else(|| AnchorError::arg("tokenizer", "the tokenizer refused the <AC> token"))?;
    Ok((Tokenizer::new(inner), id))
}

/// Ids of the vocabulary entries that are exactly one of `marks`: the EP-mode anchors. The
/// AnLLM reference trains and evaluates with `--anchor_symbols "."`, the `.` token alone.
pub fn ep_anchor_ids(tokenizer: &Tokenizer, marks: &[&str]) -> Result<AnchorSet> {
    ep_anchor_set(tokenizer, marks, false)
}

/// [`ep_anchor_ids`] also counting each mark's word-start spellings (`▁.`, `Ġ.`), which the
/// reference does not.
pub fn ep_anchor_ids_with_variants(tokenizer: &Tokenizer, marks: &[&str]) -> Result<AnchorSet> {
    ep_anchor_set(tokenizer, marks, true)
}

fn ep_anchor_set(tokenizer: &Tokenizer, marks: &[&str], variants: bool) -> Result<AnchorSet> {
    let vocab = tokenizer.inner().get_vocab(true);
    let ids = vocab.into_iter().filter_map(|(token, id)| {
        let bare = if variants {
            token.trim_start_matches(['▁', 'Ġ', ' '])
        } else {
            token.as_str()
        };
        marks.contains(&bare).then_some(id)
    });
    let set: BTreeSet<u32> = ids.collect();
    if set.is_empty() {
        return Err(AnchorError::arg(
            "tokenizer",
            format!("the tokenizer has no token for any of {marks:?}"),
        ));
    }
    AnchorSet::new(AnchorMode::Ep, set)
}

// Sentence splitting and `<AC>` placement.
//
// The reference (pangjh3/AnLLM) splits with NLTK punkt's English model and joins with spaces:
// `run_allms.py` lines 625-655, `add_ac`: `' <AC> '.join(sent_tokenizer.tokenize(text))` with
// `sent_tokenizer = nltk.data.load('tokenizers/punkt/english.pickle')` (line 64), so a training
// document has an `<AC>` between sentences and none after its last one. Its prompts
// (`applications/translation/inference_allmac.py` lines 24-28 and 54-56, template
// `prompt_input_ac`) put `add_ac(input)` before the template's own ` <AC> `, so a prompt's last
// sentence is followed by an `<AC>` too.
//
// Kiln does not insert ` <AC> ` into the text: re-encoding `"A. <AC> B."` changes the tokens
// around the anchor (the spaces become tokens of their own or merge differently per tokenizer).
// It encodes the text once and inserts the `<AC>` id after the token that ends each sentence,
// so the other ids are exactly the text's own encoding.

/// Where `<AC>` goes after the last sentence of a text ([`encode_ac`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AcPlacement {
    /// A training document, as the reference's `add_ac`: an `<AC>` between sentences only,
    /// none after the last one.
    Document,
    /// A prompt, as the reference's `prompt_input_ac` template: an `<AC>` after every sentence,
    /// the last one included when it ends with `.`, `!` or `?` (closing quotes or brackets
    /// allowed). A trailing fragment without a final mark gets none: the model continues it.
    Prompt,
}

/// Sentence-final marks.
fn is_mark(c: char) -> bool {
    matches!(c, '.' | '!' | '?')
}

/// Closing quotes and brackets that stay with the sentence they follow (punkt's realignment).
fn is_closer(c: char) -> bool {
    matches!(
        c,
        '"' | '\'' | '\u{201d}' | '\u{2019}' | ')' | ']' | '}' | '\u{bb}'
    )
}

/// Opening quotes and brackets, skipped to find a word's first letter.
fn is_opener(c: char) -> bool {
    matches!(
        c,
        '"' | '\'' | '\u{201c}' | '\u{2018}' | '(' | '[' | '{' | '\u{ab}'
    )
}

/// Abbreviations (lower case, without their final period) after which a sentence does not end:
/// titles before a name and Latin abbreviations used mid-sentence.
const NEVER_FINAL: &[&str] = &[
    "mr", "mrs", "ms", "dr", "prof", "st", "rev", "hon", "gen", "sen", "rep", "gov", "capt", "col",
    "lt", "sgt", "maj", "adm", "messrs", "vs", "e.g", "i.e", "cf", "viz", "approx", "ca",
];

/// Abbreviations that end a sentence only when the next word begins with a capital.
const MAYBE_FINAL: &[&str] = &[
    "etc", "inc", "ltd", "co", "corp", "jr", "sr", "bros", "jan", "feb", "mar", "apr", "jun",
    "jul", "aug", "sep", "sept", "oct", "nov", "dec", "mon", "tue", "tues", "wed", "thu", "fri",
];

/// Abbreviations before a number (`No. 5`, `Fig. 2`): no sentence end before a digit.
const BEFORE_NUMBER: &[&str] = &["no", "nos", "fig", "figs", "vol", "eq", "ch", "sec", "pp"];

/// Whether a mark run (`.`, `...`, `?!` ...) after `word` and before the `next` word (both
/// without surrounding quotes or brackets; `next` empty at the end of the text) ends a sentence.
fn ends_sentence(word: &str, marks: &str, next: &str) -> bool {
    let next_first = next.chars().next();
    let next_upper = next_first.is_some_and(char::is_uppercase);
    let next_lower = next_first.is_some_and(char::is_lowercase);
    if marks.contains(['!', '?']) {
        return true;
    }
    if marks.len() > 1 {
        // An ellipsis ends a sentence only before a capital (punkt's orthographic heuristic).
        return next_upper || next.is_empty();
    }
    let lower = word.to_lowercase();
    let mut letters = word.chars();
    let initial = letters.next().is_some_and(char::is_alphabetic) && letters.next().is_none();
    if NEVER_FINAL.contains(&lower.as_str()) || initial {
        false
    } else if BEFORE_NUMBER.contains(&lower.as_str()) {
        !next_first.is_some_and(|c| c.is_ascii_digit()) && !next_lower
    } else if MAYBE_FINAL.contains(&lower.as_str()) || word.contains('.') {
        // Known abbreviations, and abbreviation-like tokens with inner periods (U.S., a.m., Ph.D.).
        next_upper || next.is_empty()
    } else if word.chars().any(|c| c.is_ascii_digit())
        && word
            .chars()
            .all(|c| c.is_ascii_digit() || matches!(c, ',' | '-' | '$' | '%'))
    {
        // A number (a year, a list item): not before a lower-case word.
        !next_lower
    } else {
        true
    }
}

/// Byte ranges of the sentences of `text`, trimmed of surrounding whitespace, each ending after
/// its final mark and any closing quotes or brackets; the last range may be a fragment without
/// a mark. Empty or blank text has none.
///
/// An approximation of NLTK punkt's English model (what the reference uses) written by hand:
/// there is no maintained Rust port with that model (the `punkt` crate, ferristseng/rust-punkt,
/// last released in 2019, depends on the deprecated `rustc-serialize`), and punkt's decisions come
/// from corpus statistics (abbreviation list, orthographic context) that a small rule set can
/// only imitate. The rules: a sentence ends at `.`, `!`, `?` or a run of them, then optional
/// closing quotes/brackets, then whitespace or the end of the text; not after a title or Latin
/// abbreviation (`Mr.`, `Dr.`, `e.g.`, `i.e.`, `vs.` ...) or a single-letter initial (`J. Smith`);
/// after other abbreviations (`etc.`, `Inc.`, `U.S.`, `a.m.`, any token with an inner period)
/// and after an ellipsis only when the next word is capitalised; not after a number before a
/// lower-case word; never inside a token (`1.5`, `e.g.`). Newlines alone do not end sentences.
pub fn sentence_spans(text: &str) -> Vec<std::ops::Range<usize>> {
    let chars: Vec<(usize, char)> = text.char_indices().collect();
    let at = |k: usize| chars.get(k).map_or(text.len(), |&(b, _)| b);
    let mut spans = Vec::new();
    let mut start = 0;
    let mut i = 0;
    while i < chars.len() {
        if !is_mark(chars[i].1) {
            i += 1;
            continue;
        }
        let mut j = i;
        while j < chars.len() && is_mark(chars[j].1) {
            j += 1;
        }
        let mut k = j;
        while k < chars.len() && is_closer(chars[k].1) {
            k += 1;
        }
        if k == chars.len() || chars[k].1.is_whitespace() {
            let before = &text[start..at(i)];
            let word = before
                .rsplit(char::is_whitespace)
                .next()
                .unwrap_or("")
                .trim_start_matches(is_opener);
            let next = text[at(k)..]
                .split_whitespace()
                .next()
                .unwrap_or("")
                .trim_start_matches(is_opener);
            if ends_sentence(word, &text[at(i)..at(j)], next) {
                push_trimmed(text, start..at(k), &mut spans);
                start = at(k);
            }
            i = k;
        } else {
            i = j;
        }
    }
    push_trimmed(text, start..text.len(), &mut spans);
    spans
}

fn push_trimmed(text: &str, range: std::ops::Range<usize>, out: &mut Vec<std::ops::Range<usize>>) {
    let piece = &text[range.clone()];
    let lead = piece.len() - piece.trim_start().len();
    let trail = piece.len() - piece.trim_end().len();
    if lead < piece.len() {
        out.push(range.start + lead..range.end - trail);
    }
}

/// The sentences of `text` ([`sentence_spans`]), trimmed, with their final marks.
pub fn split_sentences(text: &str) -> Vec<&str> {
    sentence_spans(text).into_iter().map(|r| &text[r]).collect()
}

/// True when `sentence` ends with a sentence mark, closing quotes or brackets allowed.
fn is_closed(sentence: &str) -> bool {
    sentence.trim_end_matches(is_closer).ends_with(is_mark)
}

/// AC-mode tokenization: `text` encoded once (no special tokens), with `ac_id` inserted after
/// the token that ends each sentence ([`sentence_spans`]) — the first token that starts at or
/// after the sentence's end comes after the anchor, so a token that spans the end (a merged
/// `."` or `.\n`) stays before it. The other ids are exactly the text's own encoding, the
/// leading-space tokens at sentence starts (`ĠThe`, `▁The`) included. `placement` says whether
/// the last sentence gets an anchor; `bos` is put first when given.
pub fn encode_ac(
    tokenizer: &Tokenizer,
    text: &str,
    ac_id: u32,
    bos: Option<u32>,
    placement: AcPlacement,
) -> Result<Vec<u32>> {
    encode_anchored(tokenizer, text, &sentence_ends(text, placement), ac_id, bos)
}

/// Byte offsets where [`encode_ac`] puts `<AC>`: the end of every sentence but the last, and
/// of the last too when `placement` is [`AcPlacement::Prompt`] and it is closed.
pub(crate) fn sentence_ends(text: &str, placement: AcPlacement) -> Vec<usize> {
    let spans = sentence_spans(text);
    let last = spans.len().saturating_sub(1);
    spans
        .iter()
        .enumerate()
        .filter(|&(n, r)| {
            n < last || (placement == AcPlacement::Prompt && is_closed(&text[r.clone()]))
        })
        .map(|(_, r)| r.end)
        .collect()
}

/// `text` encoded once (no special tokens) with `ac_id` inserted at each byte offset of `ends`
/// (ascending): before the first token that starts at or after it, so a token spanning the
/// offset stays before the anchor. The other ids are exactly the text's own encoding. `bos` is
/// put first when given. [`encode_ac`] places anchors after sentences; few-shot prompts
/// ([`crate::fewshot`]) after demonstrations.
pub fn encode_anchored(
    tokenizer: &Tokenizer,
    text: &str,
    ends: &[usize],
    ac_id: u32,
    bos: Option<u32>,
) -> Result<Vec<u32>> {
    let tokens = tokenizer.encode_with_offsets(text, false)?;
    let mut out: Vec<u32> = Vec::with_capacity(tokens.len() + ends.len() + 1);
    out.extend(bos);
    let mut pending = ends.iter().peekable();
    for (id, span) in tokens {
        while pending.next_if(|&&end| span.start >= end).is_some() {
            out.push(ac_id);
        }
        out.push(id);
    }
    out.extend(pending.map(|_| ac_id));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sentences() {
        assert_eq!(
            split_sentences("A bee. C 1.5 d!  E?F. tail"),
            vec!["A bee.", "C 1.5 d!", "E?F.", "tail"]
        );
        // A single letter before a period is an initial, as in `J. Smith`.
        assert_eq!(split_sentences("A b. C"), vec!["A b. C"]);
        assert!(split_sentences("  ").is_empty());
        assert!(split_sentences("").is_empty());
    }

    #[test]
    fn abbreviations_initials_and_numbers() {
        assert_eq!(
            split_sentences("Mr. Smith met Dr. J. Watson at 5 p.m. on Baker St. today. It rained."),
            vec![
                "Mr. Smith met Dr. J. Watson at 5 p.m. on Baker St. today.",
                "It rained."
            ]
        );
        assert_eq!(
            split_sentences("Fruit, e.g. apples, i.e. food. See Fig. 2 and No. 3. Done."),
            vec![
                "Fruit, e.g. apples, i.e. food.",
                "See Fig. 2 and No. 3.",
                "Done."
            ]
        );
        assert_eq!(
            split_sentences("Pens, ink, etc. are sold. Ask Acme Inc. The shop is in the U.S. Go."),
            vec![
                "Pens, ink, etc. are sold.",
                "Ask Acme Inc.",
                "The shop is in the U.S.",
                "Go."
            ]
        );
        assert_eq!(
            split_sentences("It rose 3.5 percent in 2019. Prices fell."),
            vec!["It rose 3.5 percent in 2019.", "Prices fell."]
        );
    }

    #[test]
    fn quotes_brackets_and_ellipses() {
        assert_eq!(
            split_sentences(
                "He said \"Stop.\" Then he left (quickly.) Wait... what? Yes!! \u{201c}No.\u{201d} End"
            ),
            vec![
                "He said \"Stop.\"",
                "Then he left (quickly.)",
                "Wait... what?",
                "Yes!!",
                "\u{201c}No.\u{201d}",
                "End"
            ]
        );
        assert_eq!(
            split_sentences("Well... Then go.\nNext line.\n\n"),
            vec!["Well...", "Then go.", "Next line."]
        );
    }

    #[test]
    fn spans_are_byte_ranges_of_the_text() {
        let text = " \u{201c}Caf\u{e9}.\u{201d} Ok.";
        let spans = sentence_spans(text);
        assert_eq!(spans, vec![1..13, 14..17]);
        assert_eq!(&text[spans[0].clone()], "\u{201c}Caf\u{e9}.\u{201d}");
    }

    #[test]
    fn closed_sentences() {
        assert!(is_closed("Go."));
        assert!(is_closed("\"Go!\""));
        assert!(is_closed("(Why?)"));
        assert!(!is_closed("So the answer is"));
    }
}
