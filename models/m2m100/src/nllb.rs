//! NLLB-200 language codes and translation.
//!
//! NLLB's tokenizer (non-legacy, the transformers default) encodes a source text as
//! `[src_lang] pieces </s>`, and generation starts from `decoder_start_token_id` (`</s>`) with
//! the target language token forced as the first generated token (`forced_bos_token_id`).
//! Language codes are the tokenizer's added tokens spelled `xxx_Xxxx` (`eng_Latn`, `zho_Hans`).

use burn::prelude::*;
use kiln_core::seq2seq::{Seq2SeqLm, generate_seq2seq};
use kiln_core::{Error, GenerationConfig, Result, Tokenizer};

use crate::M2M100;

/// True for NLLB's language-code spelling: three lowercase letters, `_`, a capital and three
/// lowercase letters (`eng_Latn`).
pub fn is_language_code(token: &str) -> bool {
    let b = token.as_bytes();
    b.len() == 8
        && b[..3].iter().all(u8::is_ascii_lowercase)
        && b[3] == b'_'
        && b[4].is_ascii_uppercase()
        && b[5..].iter().all(u8::is_ascii_lowercase)
}

/// The language codes the tokenizer knows, in id order.
pub fn language_codes(tokenizer: &Tokenizer) -> Vec<String> {
    let mut codes: Vec<(u32, String)> = tokenizer
        .inner()
        .get_added_tokens_decoder()
        .into_iter()
        .filter(|(_, t)| is_language_code(&t.content))
        .map(|(id, t)| (id, t.content))
        .collect();
    codes.sort();
    codes.into_iter().map(|(_, c)| c).collect()
}

/// The token id of language `code`; an unknown code is an [`Error::InvalidArgument`] naming
/// `argument` and saying how to list the valid codes.
pub fn language_token_id(tokenizer: &Tokenizer, code: &str, argument: &'static str) -> Result<u32> {
    let codes = language_codes(tokenizer);
    if codes.iter().any(|c| c == code)
        && let Some(id) = tokenizer.token_to_id(code)
    {
        return Ok(id);
    }
    let shown: Vec<&str> = codes.iter().take(8).map(String::as_str).collect();
    let more = if codes.len() > shown.len() {
        format!(", ... ({} in all)", codes.len())
    } else {
        String::new()
    };
    Err(Error::arg(
        argument,
        format!(
            "unknown language code `{code}`; this tokenizer knows {}{more}. Language codes are \
             the tokenizer's added tokens spelled like `eng_Latn`; list them all with \
             `kiln_m2m100::language_codes`",
            shown.join(", ")
        ),
    ))
}

/// Encodes `text` as NLLB's tokenizer does for source language `src_lang`:
/// `[src_lang] pieces </s>` (whatever language the tokenizer.json template was saved with).
pub fn encode_source(
    tokenizer: &Tokenizer,
    text: &str,
    src_lang: &str,
    eos: u32,
) -> Result<Vec<u32>> {
    let lang = language_token_id(tokenizer, src_lang, "src_lang")?;
    let pieces = tokenizer.encode(text, false)?;
    Ok([&[lang][..], &pieces, &[eos]].concat())
}

/// Translates `texts` from `src_lang` to `tgt_lang` (NLLB codes like `eng_Latn`) in one batch.
///
/// `options` chooses greedy, sampling or beam search and the length limit; its
/// `forced_bos_token_id` is set to the target language. Returns the decoded translations
/// (special tokens skipped).
pub fn translate<B: Backend>(
    model: &M2M100<B>,
    tokenizer: &Tokenizer,
    texts: &[&str],
    src_lang: &str,
    tgt_lang: &str,
    options: &GenerationConfig,
) -> Result<Vec<String>> {
    let tgt = language_token_id(tokenizer, tgt_lang, "tgt_lang")?;
    let eos = *model.eos_token_ids().first().ok_or_else(|| {
        kiln_core::Error::arg(
            "model",
            "its config names no EOS token to end the source with",
        )
    })?;
    let inputs = texts
        .iter()
        .map(|t| encode_source(tokenizer, t, src_lang, eos))
        .collect::<Result<Vec<_>>>()?;
    let config = options.clone().with_forced_bos_token_id(Some(tgt));
    generate_seq2seq(model, &inputs, &config)?
        .iter()
        .map(|out| tokenizer.decode(&out.tokens, true))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::is_language_code;

    #[test]
    fn code_spelling() {
        assert!(is_language_code("eng_Latn"));
        assert!(is_language_code("zho_Hans"));
        assert!(!is_language_code("<mask>"));
        assert!(!is_language_code("en_XX"));
        assert!(!is_language_code("Eng_Latn"));
    }
}
