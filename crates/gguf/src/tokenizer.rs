//! The tokenizer embedded in a GGUF file, rebuilt as a Hugging Face [`tokenizers::Tokenizer`].
//!
//! Two of llama.cpp's vocabulary types are handled, the ones Llama-family models use:
//!
//! * `tokenizer.ggml.model = "gpt2"`: byte-level BPE from `tokenizer.ggml.tokens` and
//!   `tokenizer.ggml.merges`, with the pre-tokenizer regex that llama.cpp picks for
//!   `tokenizer.ggml.pre` (see [`PRE_TOKENIZERS`]).
//! * `tokenizer.ggml.model = "llama"`: SentencePiece BPE from the tokens and their
//!   `tokenizer.ggml.scores`, with `<0xNN>` byte fallback, `▁` for spaces and an optional
//!   leading `▁` (`tokenizer.ggml.add_space_prefix`, default true). SentencePiece has no merge
//!   list; it is derived from the scores as Hugging Face's `SentencePieceExtractor` does (a
//!   merge for every split of a token into two tokens, ranked by the merged token's score),
//!   which reproduces llama.cpp's highest-score-first merging.
//!
//! Tokens of type control (3) and unknown (2) in `tokenizer.ggml.token_type` become special
//! added tokens; user-defined ones (4) become ordinary added tokens (matched before the model
//! runs, as llama.cpp does). The BOS token is prepended by the post-processor when
//! `tokenizer.ggml.add_bos_token` says so (default: true for `llama` and for the Llama-3
//! pre-tokenizer, false otherwise), and EOS appended when `tokenizer.ggml.add_eos_token` is true.

use std::collections::HashMap;

use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::{BPE, Merges, Vocab};
use tokenizers::normalizers::{Prepend, Replace, Sequence as NormalizerSequence};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::template::{SpecialToken, Template, TemplateProcessing};
use tokenizers::{
    AddedToken, DecoderWrapper, NormalizerWrapper, PreTokenizerWrapper, SplitDelimiterBehavior,
    Tokenizer,
};

use crate::error::{GgufError, Result};
use crate::file::GgufFile;
use crate::types::Value;

/// Llama 3's pre-tokenizer regex, as in its `tokenizer.json`.
const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Qwen2's pre-tokenizer regex (Llama 3's with single digits).
const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Mistral Nemo's (`tekken`) pre-tokenizer regex.
const TEKKEN_REGEX: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The `tokenizer.ggml.pre` values understood for `gpt2` vocabularies, and the pre-tokenizer
/// each gets (following llama.cpp's `llama-vocab.cpp`):
///
/// | `tokenizer.ggml.pre` | pre-tokenizer |
/// |---|---|
/// | absent, `default`, `gpt2`, `gpt-2`, `mpt`, `olmo` | GPT-2 regex |
/// | `llama-bpe`, `llama3` | Llama 3 regex, whole-word vocabulary hits skip merging (`ignore_merges`) |
/// | `smollm`, `starcoder`, `refact`, `command-r`, `codeshell`, `exaone`, `minerva` | every digit split off, then GPT-2 regex |
/// | `qwen2`, `deepseek-r1-qwen` | Qwen2 regex |
/// | `tekken` | Mistral Nemo regex, `ignore_merges` |
///
/// Other values are rejected, as llama.cpp rejects them, rather than tokenized subtly wrong.
pub const PRE_TOKENIZERS: &[&str] = &[
    "default",
    "gpt2",
    "gpt-2",
    "mpt",
    "olmo",
    "llama-bpe",
    "llama3",
    "smollm",
    "starcoder",
    "refact",
    "command-r",
    "codeshell",
    "exaone",
    "minerva",
    "qwen2",
    "deepseek-r1-qwen",
    "tekken",
];

/// llama.cpp's `llama_token_type`.
const TOKEN_TYPE_UNKNOWN: i64 = 2;
const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

impl GgufFile {
    /// Builds a [`tokenizers::Tokenizer`] from the vocabulary embedded in the file (see the
    /// module docs of [`crate::tokenizer`] for what is supported and how).
    ///
    /// `encode(text, true)` adds BOS/EOS as the file's `add_bos_token`/`add_eos_token` say;
    /// `encode(text, false)` gives what llama.cpp's `llama_tokenize(…, add_special = false)`
    /// gives.
    pub fn tokenizer(&self) -> Result<Tokenizer> {
        let model = self.required_str("tokenizer.ggml.model")?;
        let tokens = self.string_array("tokenizer.ggml.tokens")?;
        if tokens.is_empty() {
            return Err(self.tok_err("tokenizer.ggml.tokens is empty"));
        }
        let types = self.int_array("tokenizer.ggml.token_type", tokens.len())?;
        let pre = self
            .get("tokenizer.ggml.pre")
            .and_then(Value::as_str)
            .unwrap_or("default");

        let (mut tokenizer, default_add_bos) = match model {
            "gpt2" => (
                self.bpe_tokenizer(&tokens, pre)?,
                matches!(pre, "llama-bpe" | "llama3"),
            ),
            "llama" => (self.spm_tokenizer(&tokens, &types)?, true),
            other => {
                return Err(self.tok_err(format!(
                    "tokenizer.ggml.model `{other}` is not supported (only `gpt2` and `llama`)"
                )));
            }
        };

        // Added tokens: control/unknown ones are special, user-defined ones are not.
        let mut special = Vec::new();
        let mut added = Vec::new();
        for (tok, ty) in tokens.iter().zip(&types) {
            match *ty {
                TOKEN_TYPE_CONTROL | TOKEN_TYPE_UNKNOWN if !tok.is_empty() => {
                    special.push(AddedToken::from(tok.clone(), true).normalized(false));
                }
                TOKEN_TYPE_USER_DEFINED if !tok.is_empty() => {
                    added.push(AddedToken::from(tok.clone(), false).normalized(false));
                }
                _ => {}
            }
        }
        tokenizer.add_special_tokens(&special);
        tokenizer.add_tokens(&added);

        // Post-processor: BOS / EOS.
        let add_bos = self
            .optional_bool("tokenizer.ggml.add_bos_token")?
            .unwrap_or(default_add_bos);
        let add_eos = self
            .optional_bool("tokenizer.ggml.add_eos_token")?
            .unwrap_or(false);
        let token_of = |key: &str| -> Result<Option<(u32, String)>> {
            Ok(match self.optional_u32(key)? {
                Some(id) => match tokens.get(id as usize) {
                    Some(t) => Some((id, t.clone())),
                    None => {
                        return Err(self.bad_value(
                            key,
                            &format!("a token id below the vocabulary size {}", tokens.len()),
                            &id.to_string(),
                        ));
                    }
                },
                None => None,
            })
        };
        let bos = if add_bos {
            token_of("tokenizer.ggml.bos_token_id")?
        } else {
            None
        };
        let eos = if add_eos {
            token_of("tokenizer.ggml.eos_token_id")?
        } else {
            None
        };
        if bos.is_some() || eos.is_some() {
            tokenizer.with_post_processor(Some(self.template(bos, eos)?));
        }
        Ok(tokenizer)
    }

    fn tok_err(&self, detail: impl Into<String>) -> GgufError {
        GgufError::Tokenizer {
            path: self.path().to_string(),
            detail: detail.into(),
        }
    }

    fn string_array(&self, key: &str) -> Result<Vec<String>> {
        let v = self.get(key).ok_or_else(|| self.missing(key))?;
        let items = v
            .as_array()
            .ok_or_else(|| self.bad_value(key, "an array of strings", &v.describe()))?;
        items
            .iter()
            .map(|i| {
                i.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| self.bad_value(key, "an array of strings", &v.describe()))
            })
            .collect()
    }

    /// An optional integer array of length `len` (zeros when absent).
    fn int_array(&self, key: &str, len: usize) -> Result<Vec<i64>> {
        let Some(v) = self.get(key) else {
            return Ok(vec![0; len]);
        };
        let expected = || format!("an array of {len} integers");
        let items = v
            .as_array()
            .filter(|a| a.len() == len)
            .ok_or_else(|| self.bad_value(key, &expected(), &v.describe()))?;
        items
            .iter()
            .map(|i| {
                i.as_i64()
                    .ok_or_else(|| self.bad_value(key, &expected(), &v.describe()))
            })
            .collect()
    }

    fn float_array(&self, key: &str, len: usize) -> Result<Option<Vec<f32>>> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        let expected = || format!("an array of {len} numbers");
        let items = v
            .as_array()
            .filter(|a| a.len() == len)
            .ok_or_else(|| self.bad_value(key, &expected(), &v.describe()))?;
        items
            .iter()
            .map(|i| {
                i.as_f64()
                    .map(|f| f as f32)
                    .ok_or_else(|| self.bad_value(key, &expected(), &v.describe()))
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }

    /// The token → id map. Where a string occurs twice the last id wins, as in llama.cpp.
    fn vocab(tokens: &[String]) -> Vocab {
        tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect()
    }

    fn bpe_tokenizer(&self, tokens: &[String], pre: &str) -> Result<Tokenizer> {
        let merges_key = "tokenizer.ggml.merges";
        let merge_strings = self.string_array(merges_key)?;
        let mut merges: Merges = Vec::with_capacity(merge_strings.len());
        for (i, m) in merge_strings.iter().enumerate() {
            // llama.cpp splits at the first space after the first character.
            let split = m
                .char_indices()
                .skip(1)
                .find(|&(_, c)| c == ' ')
                .map(|(p, _)| p);
            let Some(p) = split else {
                return Err(self.bad_value(
                    merges_key,
                    "merges of the form `left right`",
                    &format!("entry #{i} {m:?}"),
                ));
            };
            merges.push((m[..p].to_string(), m[p + 1..].to_string()));
        }

        let byte_level = |use_regex| ByteLevel::new(false, true, use_regex);
        let split = |regex: &str| -> Result<PreTokenizerWrapper> {
            Split::new(
                SplitPattern::Regex(regex.to_string()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map(Into::into)
            .map_err(|e| self.tok_err(format!("pre-tokenizer regex: {e}")))
        };
        let (pre_tokenizer, ignore_merges): (PreTokenizerWrapper, bool) = match pre {
            "default" | "gpt2" | "gpt-2" | "mpt" | "olmo" => (byte_level(true).into(), false),
            "llama-bpe" | "llama3" => (
                PreSequence::new(vec![split(LLAMA3_REGEX)?, byte_level(false).into()]).into(),
                true,
            ),
            "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone"
            | "minerva" => (
                PreSequence::new(vec![Digits::new(true).into(), byte_level(true).into()]).into(),
                false,
            ),
            "qwen2" | "deepseek-r1-qwen" => (
                PreSequence::new(vec![split(QWEN2_REGEX)?, byte_level(false).into()]).into(),
                false,
            ),
            "tekken" => (
                PreSequence::new(vec![split(TEKKEN_REGEX)?, byte_level(false).into()]).into(),
                true,
            ),
            other => {
                return Err(self.tok_err(format!(
                    "pre-tokenizer `tokenizer.ggml.pre = {other}` is not supported (supported: {})",
                    PRE_TOKENIZERS.join(", ")
                )));
            }
        };
        let bpe = BPE::builder()
            .vocab_and_merges(Self::vocab(tokens), merges)
            .ignore_merges(ignore_merges)
            .build()
            .map_err(|e| self.tok_err(format!("BPE model: {e}")))?;
        let mut tokenizer = Tokenizer::new(bpe);
        tokenizer.with_pre_tokenizer(Some(pre_tokenizer));
        tokenizer.with_decoder(Some(ByteLevelDecoder::new(true, true, true)));
        Ok(tokenizer)
    }

    fn spm_tokenizer(&self, tokens: &[String], types: &[i64]) -> Result<Tokenizer> {
        let scores = self
            .float_array("tokenizer.ggml.scores", tokens.len())?
            // Without scores, earlier tokens are preferred (SentencePiece's own order).
            .unwrap_or_else(|| (0..tokens.len()).map(|i| -(i as f32)).collect());
        let vocab = Self::vocab(tokens);
        let merges = spm_merges(tokens, types, &scores, &vocab);

        let unk_id = self
            .optional_u32("tokenizer.ggml.unknown_token_id")?
            .unwrap_or(0) as usize;
        let mut builder = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .fuse_unk(true)
            .byte_fallback(true);
        if let Some(unk) = tokens.get(unk_id) {
            builder = builder.unk_token(unk.clone());
        }
        let bpe = builder
            .build()
            .map_err(|e| self.tok_err(format!("BPE model: {e}")))?;

        let add_space_prefix = self
            .optional_bool("tokenizer.ggml.add_space_prefix")?
            .unwrap_or(true);
        let replace = Replace::new(" ", "▁").map_err(|e| self.tok_err(e.to_string()))?;
        let mut normalizers: Vec<NormalizerWrapper> = Vec::new();
        if add_space_prefix {
            normalizers.push(Prepend::new("▁".to_string()).into());
        }
        normalizers.push(replace.clone().into());

        let mut decoders: Vec<DecoderWrapper> = vec![
            Replace::new("▁", " ")
                .map_err(|e| self.tok_err(e.to_string()))?
                .into(),
            ByteFallback::new().into(),
            Fuse::new().into(),
        ];
        if add_space_prefix {
            decoders.push(Strip::new(' ', 1, 0).into());
        }

        let mut tokenizer = Tokenizer::new(bpe);
        tokenizer.with_normalizer(Some(NormalizerSequence::new(normalizers)));
        tokenizer.with_decoder(Some(DecoderSequence::new(decoders)));
        Ok(tokenizer)
    }

    fn template(
        &self,
        bos: Option<(u32, String)>,
        eos: Option<(u32, String)>,
    ) -> Result<TemplateProcessing> {
        // Template pieces name special tokens by key; fixed keys keep odd token strings (with
        // spaces or colons) out of the template syntax.
        let mut single = Vec::new();
        let mut pair = Vec::new();
        let mut specials = Vec::new();
        if let Some((id, tok)) = &bos {
            specials.push(
                SpecialToken::new("BOS".into(), vec![*id], vec![tok.clone()])
                    .map_err(|e| self.tok_err(e.to_string()))?,
            );
        }
        if let Some((id, tok)) = &eos {
            specials.push(
                SpecialToken::new("EOS".into(), vec![*id], vec![tok.clone()])
                    .map_err(|e| self.tok_err(e.to_string()))?,
            );
        }
        let push = |out: &mut Vec<String>, seq: &str, type_id: u32| {
            if bos.is_some() {
                out.push(format!("BOS:{type_id}"));
            }
            out.push(format!("{seq}:{type_id}"));
            if eos.is_some() {
                out.push(format!("EOS:{type_id}"));
            }
        };
        push(&mut single, "$A", 0);
        push(&mut pair, "$A", 0);
        push(&mut pair, "$B", 1);
        let single = Template::try_from(single).map_err(|e| self.tok_err(e))?;
        let pair = Template::try_from(pair).map_err(|e| self.tok_err(e))?;
        TemplateProcessing::builder()
            .single(single)
            .pair(pair)
            .special_tokens(specials)
            .build()
            .map_err(|e| self.tok_err(e.to_string()))
    }
}

/// SentencePiece BPE merges from token scores, as Hugging Face's converters derive them: for
/// every normal or user-defined token, every split into two tokens that exist is a merge, and
/// merges are ordered by the merged token's score, highest first (ties: vocabulary order, then
/// the scores of the two halves).
fn spm_merges(tokens: &[String], types: &[i64], scores: &[f32], vocab: &Vocab) -> Merges {
    // SentencePiece pieces are short (16 characters by default); bounding the length bounds
    // the quadratic split search on a hostile file.
    const MAX_PIECE_BYTES: usize = 512;
    // Only ordinary pieces take part: control tokens (`<s>`) and byte tokens (`<0x41>`) are
    // never the result of a merge in SentencePiece.
    let mergeable = |id: u32| {
        let t = types.get(id as usize).copied().unwrap_or(1);
        t == 1 || t == 0 || t == TOKEN_TYPE_USER_DEFINED
    };
    let lookup: HashMap<&str, u32> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.as_str(), i as u32))
        .filter(|&(t, i)| vocab.get(t) == Some(&i))
        .collect();
    let mut merges: Vec<(f32, u32, f32, f32, u32, u32)> = Vec::new();
    for (id, piece) in tokens.iter().enumerate() {
        let id = id as u32;
        if piece.len() > MAX_PIECE_BYTES
            || !mergeable(id)
            || lookup.get(piece.as_str()) != Some(&id)
        {
            continue;
        }
        for (split, _) in piece.char_indices().skip(1) {
            let (l, r) = piece.split_at(split);
            if let (Some(&li), Some(&ri)) = (lookup.get(l), lookup.get(r))
                && mergeable(li)
                && mergeable(ri)
            {
                let s = |i: u32| scores.get(i as usize).copied().unwrap_or(0.0);
                merges.push((s(id), id, s(li), s(ri), li, ri));
            }
        }
    }
    merges.sort_by(|a, b| {
        b.0.total_cmp(&a.0)
            .then(a.1.cmp(&b.1))
            .then(b.2.total_cmp(&a.2))
            .then(b.3.total_cmp(&a.3))
    });
    merges
        .into_iter()
        .map(|(_, _, _, _, l, r)| (tokens[l as usize].clone(), tokens[r as usize].clone()))
        .collect()
}
