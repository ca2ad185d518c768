//! Exporting a trained student as an HF folder that transformers loads and generates from.

use std::path::Path;

use burn::prelude::*;
use kiln_core::loading::{SpecialTokenRoles, fast_tokenizer_config, write_json_file};

use crate::DistillError;
use crate::train::load_checkpoint;

/// Writes the student of `checkpoint` (a `kiln distill train` checkpoint folder) to `out` as an
/// HF T5 folder: `model.safetensors`, `config.json`, `generation_config.json` (see
/// [`kiln_t5::T5::save_pretrained`]), `tokenizer.json`, and `tokenizer_config.json` (the
/// checkpoint's, else [`fast_tokenizer_config`] naming T5's special tokens).
pub fn export<B: Backend>(
    checkpoint: &Path,
    out: &Path,
    device: &B::Device,
) -> Result<(), DistillError> {
    let (model, _) = load_checkpoint::<B>(checkpoint, device)?;
    model.save_pretrained(out)?;
    let tokenizer = checkpoint.join("tokenizer.json");
    std::fs::copy(&tokenizer, out.join("tokenizer.json"))
        .map_err(|e| DistillError::Io(tokenizer.clone(), e))?;
    let config = checkpoint.join("tokenizer_config.json");
    let target = out.join("tokenizer_config.json");
    if config.is_file() {
        std::fs::copy(&config, &target).map_err(|e| DistillError::Io(config, e))?;
    } else {
        // The generic fast tokenizer uses tokenizer.json as it stands; T5's special tokens
        // (those the vocabulary has) name their roles.
        let tokenizer = kiln_core::Tokenizer::from_dir(checkpoint)?;
        let inner = tokenizer.inner();
        let role = |token: &str| inner.token_to_id(token).map(|_| token.to_string());
        let roles = SpecialTokenRoles {
            eos: role("</s>"),
            pad: role("<pad>"),
            unk: role("<unk>"),
            ..SpecialTokenRoles::default()
        };
        write_json_file(&target, &fast_tokenizer_config(inner, &roles)?)?;
    }
    Ok(())
}
