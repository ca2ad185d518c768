//! Vocabularies in one spelling, and the anchors (shared tokens) of several of them.
//!
//! Tokenizers spell the same text differently: SentencePiece writes a leading space as `▁` and
//! bytes it cannot spell as `<0xNN>` (byte fallback); byte-level BPE (GPT-2, Llama 3) maps every
//! byte to a printable character (a space is `Ġ`). Every token is brought back to the raw bytes
//! it stands for, and tokens of different models are the same when their bytes are.

use std::collections::HashMap;

use kiln_core::Tokenizer;

use crate::error::{EnsembleError, Result};

/// How a tokenizer spells bytes in its vocabulary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Spelling {
    /// GPT-2 style byte-level BPE: each byte is one printable character (`Ġ` = space).
    ByteLevel,
    /// SentencePiece style: `▁` is a space, `<0xNN>` a raw byte (byte fallback).
    SentencePiece,
}

/// GPT-2's `bytes_to_unicode` inverted: the byte each byte-level character stands for.
fn byte_level_decoder() -> HashMap<char, u8> {
    let mut map = HashMap::with_capacity(256);
    let mut extra = 0u32;
    for b in 0u32..256 {
        let printable =
            (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
        let c = if printable {
            char::from_u32(b).unwrap()
        } else {
            extra += 1;
            char::from_u32(255 + extra).unwrap()
        };
        map.insert(c, b as u8);
    }
    map
}

/// `<0xNN>` as the byte `NN`.
fn byte_fallback(token: &str) -> Option<u8> {
    let hex = token.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

/// The raw bytes a vocabulary entry stands for, or `None` when it cannot be read in `spelling`
/// (a byte-level token with a character outside the byte alphabet).
pub fn canonical_bytes(token: &str, spelling: Spelling) -> Option<Vec<u8>> {
    match spelling {
        Spelling::ByteLevel => {
            // Built on each call only in tests; `Vocab` builds it once.
            let map = byte_level_decoder();
            token.chars().map(|c| map.get(&c).copied()).collect()
        }
        Spelling::SentencePiece => Some(sentencepiece_bytes(token)),
    }
}

fn sentencepiece_bytes(token: &str) -> Vec<u8> {
    match byte_fallback(token) {
        Some(b) => vec![b],
        None => token.replace('\u{2581}', " ").into_bytes(),
    }
}

/// Decides the spelling from the tokenizer's pipeline: byte-level when its decoder or
/// pre-tokenizer is `ByteLevel`, SentencePiece otherwise.
pub fn detect_spelling(tokenizer: &Tokenizer) -> Spelling {
    let inner = tokenizer.inner();
    let has_byte_level = |v: serde_json::Value| v.to_string().contains("\"ByteLevel\"");
    let decoder = inner
        .get_decoder()
        .and_then(|d| serde_json::to_value(d).ok())
        .is_some_and(has_byte_level);
    let pre = inner
        .get_pre_tokenizer()
        .and_then(|p| serde_json::to_value(p).ok())
        .is_some_and(has_byte_level);
    if decoder || pre {
        Spelling::ByteLevel
    } else {
        Spelling::SentencePiece
    }
}

/// A model's vocabulary as raw bytes per token id.
#[derive(Debug, Clone)]
pub struct Vocab {
    spelling: Spelling,
    /// Raw bytes of each id (`None`: no such token, or unreadable).
    bytes: Vec<Option<Vec<u8>>>,
    /// The tokenizer's special (added, `special: true`) tokens.
    special: Vec<bool>,
    /// Raw bytes of a non-special token to its preferred id (a regular piece over `<0xNN>`).
    index: HashMap<Vec<u8>, u32>,
    /// Special tokens by content.
    special_index: HashMap<String, u32>,
    /// Every entry of the tokenizer's vocabulary (added tokens included) as the reference code
    /// keys it: the token string with `Ġ` replaced by `▁`; of two entries that meet, the lower id.
    reference_strings: HashMap<String, u32>,
}

impl Vocab {
    /// Reads `tokenizer`'s vocabulary; `width` is the model's logits width (ids past the
    /// tokenizer's vocabulary, padding rows of the embedding, get no bytes).
    pub fn from_tokenizer(tokenizer: &Tokenizer, width: usize) -> Self {
        let spelling = detect_spelling(tokenizer);
        let inner = tokenizer.inner();
        let specials: HashMap<u32, String> = inner
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, t)| t.special)
            .map(|(id, t)| (id, t.content))
            .collect();
        let map = byte_level_decoder();
        let mut bytes = vec![None; width];
        let mut special = vec![false; width];
        let mut special_index = HashMap::new();
        let mut fallback = Vec::new();
        let mut index = HashMap::new();
        let mut vocab: Vec<(String, u32)> = inner.get_vocab(true).into_iter().collect();
        vocab.sort_by_key(|(_, id)| *id);
        let mut reference_strings = HashMap::new();
        for (token, id) in vocab {
            let i = id as usize;
            if i >= width {
                continue;
            }
            reference_strings
                .entry(token.replace('\u{120}', "\u{2581}"))
                .or_insert(id);
            if let Some(content) = specials.get(&id) {
                special[i] = true;
                special_index.insert(content.clone(), id);
                continue;
            }
            let raw = match spelling {
                Spelling::ByteLevel => token.chars().map(|c| map.get(&c).copied()).collect(),
                Spelling::SentencePiece => Some(sentencepiece_bytes(&token)),
            };
            let Some(raw) = raw else { continue };
            if spelling == Spelling::SentencePiece && byte_fallback(&token).is_some() {
                // A regular piece spelling the same byte wins; `<0xNN>` fills gaps afterwards.
                fallback.push((raw.clone(), id));
            } else {
                index.entry(raw.clone()).or_insert(id);
            }
            bytes[i] = Some(raw);
        }
        for (raw, id) in fallback {
            index.entry(raw).or_insert(id);
        }
        Self {
            spelling,
            bytes,
            special,
            index,
            special_index,
            reference_strings,
        }
    }

    /// The tokenizer's spelling.
    pub fn spelling(&self) -> Spelling {
        self.spelling
    }

    /// Logits width.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// True for an empty vocabulary.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// The raw bytes of token `id` (empty for special tokens and unknown ids).
    pub fn token_bytes(&self, id: u32) -> &[u8] {
        self.bytes
            .get(id as usize)
            .and_then(Option::as_deref)
            .unwrap_or(&[])
    }

    /// True for a special (added, `special: true`) token.
    pub fn is_special(&self, id: u32) -> bool {
        self.special.get(id as usize).copied().unwrap_or(false)
    }

    /// The preferred id of the non-special token spelling `bytes`.
    pub fn id_of(&self, bytes: &[u8]) -> Option<u32> {
        self.index.get(bytes).copied()
    }

    /// The id of special token `content`.
    pub fn special_id(&self, content: &str) -> Option<u32> {
        self.special_index.get(content).copied()
    }

    /// True when both map every id to the same bytes (the same tokenizer): such members can be
    /// fed each other's token ids with no re-tokenisation.
    pub fn same_as(&self, other: &Vocab) -> bool {
        self.bytes == other.bytes && self.special == other.special
    }

    /// Raw-byte keys and ids of every regular token (and of special tokens when `special`), or
    /// the reference code's string keys.
    fn keys(&self, special: bool, matching: AnchorMatching) -> HashMap<Vec<u8>, u32> {
        if matching == AnchorMatching::ReferenceStrings {
            return self
                .reference_strings
                .iter()
                .map(|(token, &id)| (token.as_bytes().to_vec(), id))
                .collect();
        }
        let mut keys = self.index.clone();
        if special {
            for (content, &id) in &self.special_index {
                keys.insert(special_key(content), id);
            }
        }
        keys
    }
}

/// Special tokens match only other special tokens with the same content.
fn special_key(content: &str) -> Vec<u8> {
    let mut key = b"\0special\0".to_vec();
    key.extend_from_slice(content.as_bytes());
    key
}

/// How tokens of different vocabularies are found to be the same.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum AnchorMatching {
    /// By the raw bytes each token stands for, across spellings (`Ġthe`, `▁the` and a byte
    /// fallback `<0x20>`-led piece meet when their bytes do); special tokens only with
    /// `include_special`. kiln's default: more anchors between byte-level and SentencePiece
    /// vocabularies (crates/ensemble/README.md).
    #[default]
    Bytes,
    /// As the reference code (OrangeInSouth/DeePEn `common_vocabulary.py`): the vocabulary's
    /// token strings, added and special tokens included (`</s>` meets `</s>`), with `Ġ` replaced
    /// by `▁` and nothing else normalised (byte-level `Ċ` does not meet SentencePiece
    /// `<0x0A>`). `include_special` is ignored.
    ReferenceStrings,
}

/// Which shared tokens become anchors.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AnchorConfig {
    /// How tokens are matched.
    pub matching: AnchorMatching,
    /// Also match special tokens by content (`</s>` with `</s>`); off by default.
    pub include_special: bool,
    /// Keep only the first `n` shared tokens in the main model's id order (BPE ids roughly follow
    /// frequency); `None` keeps all, as the paper does.
    pub max_anchors: Option<usize>,
    /// Then keep the `n` anchors whose similarity rows agree most across the members, as the
    /// reference's optional selection (`get_anchor_point_list_our`; see
    /// [`keep_consistent_anchors`](crate::keep_consistent_anchors)); `None` keeps all.
    pub consistent_anchors: Option<usize>,
}

impl AnchorConfig {
    /// Sets `matching`.
    pub fn with_matching(mut self, matching: AnchorMatching) -> Self {
        self.matching = matching;
        self
    }
    /// Sets `include_special`.
    pub fn with_include_special(mut self, on: bool) -> Self {
        self.include_special = on;
        self
    }
    /// Sets `max_anchors`.
    pub fn with_max_anchors(mut self, n: Option<usize>) -> Self {
        self.max_anchors = n;
        self
    }
    /// Sets `consistent_anchors`.
    pub fn with_consistent_anchors(mut self, n: Option<usize>) -> Self {
        self.consistent_anchors = n;
        self
    }
}

/// The tokens every member's vocabulary has, and their id in each.
#[derive(Debug, Clone, PartialEq)]
pub struct Anchors {
    /// Raw bytes of each anchor (special tokens: `\0special\0` + content); with
    /// [`AnchorMatching::ReferenceStrings`], the normalised token string.
    pub keys: Vec<Vec<u8>>,
    /// `ids[member][anchor]`: the anchor's id in that member's vocabulary.
    pub ids: Vec<Vec<u32>>,
}

impl Anchors {
    /// Number of anchors.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// True when there is none.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// The anchors of `vocabs` (member 0 is the main model; `names` label errors), ordered by the
/// main model's ids.
pub fn find_anchors(vocabs: &[&Vocab], names: &[String], config: &AnchorConfig) -> Result<Anchors> {
    if vocabs.is_empty() {
        return Err(EnsembleError::arg("members", "no members"));
    }
    let keys: Vec<HashMap<Vec<u8>, u32>> = vocabs
        .iter()
        .map(|v| v.keys(config.include_special, config.matching))
        .collect();
    let special = if config.matching == AnchorMatching::ReferenceStrings {
        " (reference string matching)"
    } else if config.include_special {
        ", special tokens included"
    } else {
        ", special tokens excluded"
    };
    let name = |i: usize| names.get(i).cloned().unwrap_or_else(|| format!("#{i}"));
    for (m, k) in keys.iter().enumerate().skip(1) {
        if !k.keys().any(|key| keys[0].contains_key(key)) {
            return Err(EnsembleError::NoSharedTokens {
                a: name(0),
                b: name(m),
                special,
            });
        }
    }
    let mut shared: Vec<(u32, &Vec<u8>)> = keys[0]
        .iter()
        .filter(|(key, _)| keys[1..].iter().all(|k| k.contains_key(*key)))
        .map(|(key, &id)| (id, key))
        .collect();
    if shared.is_empty() {
        return Err(EnsembleError::NoSharedTokens {
            a: name(0),
            b: (1..vocabs.len())
                .map(name)
                .collect::<Vec<_>>()
                .join(" and "),
            special,
        });
    }
    shared.sort();
    if let Some(n) = config.max_anchors {
        if n == 0 {
            return Err(EnsembleError::arg("max_anchors", "must be at least 1"));
        }
        shared.truncate(n);
    }
    let ids = keys
        .iter()
        .map(|k| shared.iter().map(|(_, key)| k[*key]).collect())
        .collect();
    Ok(Anchors {
        keys: shared.into_iter().map(|(_, key)| key.clone()).collect(),
        ids,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spellings_meet_in_bytes() {
        assert_eq!(
            canonical_bytes("Ġthe", Spelling::ByteLevel).unwrap(),
            b" the"
        );
        assert_eq!(
            canonical_bytes("▁the", Spelling::SentencePiece).unwrap(),
            b" the"
        );
        assert_eq!(
            canonical_bytes("<0x0A>", Spelling::SentencePiece).unwrap(),
            b"\n"
        );
        assert_eq!(canonical_bytes("Ċ", Spelling::ByteLevel).unwrap(), b"\n");
        // "é" is two bytes; byte-level spells them `Ã©`, byte fallback `<0xC3>` `<0xA9>`.
        assert_eq!(
            canonical_bytes("Ã©", Spelling::ByteLevel).unwrap(),
            "é".as_bytes()
        );
        assert_eq!(
            canonical_bytes("<0xC3>", Spelling::SentencePiece).unwrap(),
            vec![0xC3]
        );
        assert_eq!(canonical_bytes("€", Spelling::ByteLevel), None);
        assert_eq!(
            canonical_bytes("\u{100}", Spelling::ByteLevel).unwrap(),
            vec![0]
        );
    }
}
