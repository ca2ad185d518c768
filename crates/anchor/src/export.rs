//! Exporting an anchor-trained model as an HF folder that transformers and kiln's normal loader
//! both read.

use std::path::Path;

use burn::prelude::*;
use kiln_core::Tokenizer;
use kiln_core::loading::{
    SpecialTokenRoles, fast_tokenizer_config, save_hf_folder, save_tokenizer, write_json_file,
};
use kiln_llama::Llama;
use serde::{Deserialize, Serialize};

use crate::{AC_TOKEN, AnchorCheckpoint, AnchorError, AnchorMode, AnchorSet, PositionMode, Result};

/// The name of the file, beside the HF files, that says how to run the model with anchors.
pub const ANCHOR_FILE: &str = "anchor.json";

/// EOS spellings looked up when the model's config names no EOS (a model trained from scratch
/// on a borrowed tokenizer).
const EOS_NAMES: &[&str] = &["</s>", "<|end_of_text|>", "<|endoftext|>", "<|im_end|>"];

/// `anchor.json` of an exported folder: what kiln needs, beyond the HF files, to run the model
/// with the anchor cache. transformers ignores the file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AnchorExport {
    /// The anchors the model was trained with (`None`: plain causal training).
    pub anchors: Option<AnchorSet>,
    /// The `<AC>` token's text in AC mode (`None` otherwise).
    pub ac_token: Option<String>,
    /// BOS id to put before texts, if any.
    pub bos: Option<u32>,
    /// The positions anchor-cache inference should use.
    pub position_mode: PositionMode,
}

impl AnchorExport {
    /// Reads `dir/anchor.json`.
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join(ANCHOR_FILE);
        let text = std::fs::read_to_string(&path).map_err(|e| AnchorError::io(&path, e))?;
        serde_json::from_str(&text).map_err(|e| AnchorError::io(&path, e))
    }
}

/// Writes the model of `checkpoint` (a folder written by `kiln anchor train`, see
/// [`crate::save_checkpoint`]) to `out` as an HF folder; see [`export_model`]. `out` must not
/// be the checkpoint itself.
pub fn export<B: Backend>(
    checkpoint: &Path,
    out: &Path,
    position_mode: PositionMode,
    device: &B::Device,
) -> Result<()> {
    if !crate::is_checkpoint(checkpoint) {
        return Err(AnchorError::io(
            checkpoint,
            "not a `kiln anchor train` folder (no anchor.json and model.mpk)",
        ));
    }
    if let (Ok(a), Ok(b)) = (checkpoint.canonicalize(), out.canonicalize())
        && a == b
    {
        return Err(AnchorError::arg(
            "out",
            format!(
                "{} is the checkpoint itself: export into another folder",
                out.display()
            ),
        ));
    }
    let (model, tokenizer, meta, _) = crate::load_checkpoint::<B>(checkpoint, device)?;
    let tokenizer = tokenizer.ok_or_else(|| {
        AnchorError::io(
            checkpoint.join("tokenizer.json"),
            "missing: the checkpoint has no tokenizer to export",
        )
    })?;
    export_model(&model, &tokenizer, &meta, position_mode, out)
}

/// Writes `model` with `tokenizer` to `out` as an HF Llama folder:
///
/// - `model.safetensors` (f32; no `lm_head.weight` when the head is tied), `config.json`
///   (`LlamaForCausalLM`, `vocab_size` counting `<AC>`, BOS and EOS ids) and
///   `generation_config.json`, as [`Llama::save_pretrained`] writes them;
/// - `tokenizer.json` as `tokenizer` stands (with `<AC>` as an added special token) and a
///   `tokenizer_config.json` of class `PreTrainedTokenizerFast` listing `<AC>` in
///   `added_tokens_decoder` and `additional_special_tokens`, so transformers' `AutoTokenizer`
///   encodes and skips it as kiln does;
/// - `anchor.json` ([`AnchorExport`]): the anchor mode and ids, BOS, and `position_mode`.
///
/// BOS is the config's, else `meta.bos`; EOS the config's, else the tokenizer's `</s>` (or
/// `<|end_of_text|>`, `<|endoftext|>`, `<|im_end|>`). transformers runs such a folder with
/// full attention and the causal mask; the anchor cache is kiln's
/// ([`crate::AnchorSession`]).
pub fn export_model<B: Backend>(
    model: &Llama<B>,
    tokenizer: &Tokenizer,
    meta: &AnchorCheckpoint,
    position_mode: PositionMode,
    out: &Path,
) -> Result<()> {
    let inner = tokenizer.inner();
    let mut config = model.config().clone();
    if config.vocab_size < tokenizer.vocab_size() {
        return Err(AnchorError::arg(
            "tokenizer",
            format!(
                "the tokenizer has {} tokens but the model only {} embedding rows",
                tokenizer.vocab_size(),
                config.vocab_size
            ),
        ));
    }
    let ac_token = match &meta.anchors {
        Some(set) if set.mode == AnchorMode::Ac => {
            let id = inner.token_to_id(AC_TOKEN).ok_or_else(|| {
                AnchorError::arg(
                    "tokenizer",
                    "an AC-mode model's tokenizer has no <AC> token",
                )
            })?;
            if !set.contains(id) {
                return Err(AnchorError::arg(
                    "anchors",
                    format!(
                        "<AC> is id {id} in the tokenizer but the anchors are {:?}",
                        set.ids
                    ),
                ));
            }
            Some(AC_TOKEN.to_string())
        }
        _ => None,
    };
    config.tie_word_embeddings = model.lm_head.is_none();
    if config.bos_token_id.is_none() {
        config.bos_token_id = meta.bos;
    }
    if config.eos_token_ids.is_empty() {
        config.eos_token_ids = EOS_NAMES
            .iter()
            .find_map(|t| inner.token_to_id(t))
            .into_iter()
            .collect();
    }
    let mut hf = config.to_hf_json();
    if config.eos_token_ids.is_empty() {
        hf["eos_token_id"] = serde_json::Value::Null;
    }
    let generation = serde_json::json!({
        "bos_token_id": hf["bos_token_id"],
        "eos_token_id": hf["eos_token_id"],
        "pad_token_id": hf["pad_token_id"],
    });
    save_hf_folder(model, out, &hf, &generation)?;

    let name = |id: Option<u32>| id.and_then(|id| inner.id_to_token(id));
    let roles = SpecialTokenRoles {
        bos: name(config.bos_token_id),
        eos: name(config.eos_token_ids.first().copied()),
        unk: inner.token_to_id("<unk>").map(|_| "<unk>".to_string()),
        pad: name(config.pad_token_id),
        additional: ac_token.iter().cloned().collect(),
    };
    save_tokenizer(out, inner, &fast_tokenizer_config(inner, &roles)?)?;
    let anchors = AnchorExport {
        anchors: meta.anchors.clone(),
        ac_token,
        bos: config.bos_token_id,
        position_mode,
    };
    let value =
        serde_json::to_value(&anchors).map_err(|e| AnchorError::io(out.join(ANCHOR_FILE), e))?;
    write_json_file(&out.join(ANCHOR_FILE), &value)?;
    Ok(())
}
