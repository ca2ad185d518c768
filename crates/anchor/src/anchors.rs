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

/// Splits text into sentences after `.`, `!` or `?` followed by whitespace (or the end);
/// the pieces are trimmed and keep their final mark.
pub fn split_sentences(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start = 0;
    let bytes = text.as_bytes();
    for (i, &b) in bytes.iter().enumerate() {
        let end_mark = matches!(b, b'.' | b'!' | b'?');
        let boundary = i + 1 == bytes.len() || bytes[i + 1].is_ascii_whitespace();
        if end_mark && boundary {
            let piece = text[start..=i].trim();
            if !piece.is_empty() {
                out.push(piece);
            }
            start = i + 1;
        }
    }
    let rest = text[start..].trim();
    if !rest.is_empty() {
        out.push(rest);
    }
    out
}

/// AC-mode tokenization: each sentence encoded on its own (no special tokens) and followed by
/// `ac_id`; a trailing fragment without a final mark gets no anchor. `bos` is put first when
/// given.
pub fn encode_ac(
    tokenizer: &Tokenizer,
    text: &str,
    ac_id: u32,
    bos: Option<u32>,
) -> Result<Vec<u32>> {
    let mut ids: Vec<u32> = bos.into_iter().collect();
    for sentence in split_sentences(text) {
        ids.extend(tokenizer.encode(sentence, false)?);
        if sentence.ends_with(['.', '!', '?']) {
            ids.push(ac_id);
        }
    }
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sentences() {
        assert_eq!(
            split_sentences("A b. C 1.5 d!  E?F. tail"),
            vec!["A b.", "C 1.5 d!", "E?F.", "tail"]
        );
        assert!(split_sentences("  ").is_empty());
    }
}
