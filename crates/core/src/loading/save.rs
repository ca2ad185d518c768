//! Writing a module's parameters as an HF `model.safetensors`, the inverse of loading: kiln's
//! module fields are named like checkpoint keys, so a parameter's path is its key.

use std::path::Path;

use burn::module::Module;
use burn::prelude::*;
use burn_store::{BurnToPyTorchAdapter, ModuleSnapshot};

use crate::{Error, Result};

/// Writes every float parameter of `module` to `path` as f32 safetensors, keyed by its module
/// path (`encoder.block.0.layer.0.SelfAttention.q.weight`), with `{"format": "pt"}` metadata
/// as transformers writes. Fails on weights held packed (quantised or half precision on the
/// host): load with f32 weights to export.
pub fn save_safetensors<B: Backend, M: Module<B>>(module: &M, path: &Path) -> Result<()> {
    // Burn's own norm layers name their parameters gamma/beta; the adapter writes PyTorch's
    // weight/bias (kiln's Linear and embedding already hold PyTorch's layout, and the adapter
    // leaves modules of other names alone).
    let snapshots = module.collect(None, Some(Box::new(BurnToPyTorchAdapter)), true);
    let mut tensors = Vec::with_capacity(snapshots.len());
    for snapshot in &snapshots {
        let key = snapshot.full_path();
        let data = snapshot
            .to_data()
            .map_err(|e| Error::arg("module", format!("{key}: {e:?}")))?;
        let shape: Vec<usize> = data.shape.to_vec();
        if shape.iter().product::<usize>() == 0 {
            return Err(Error::arg(
                "module",
                format!(
                    "{key} has no values here (its weight is held packed); load the model with \
                     f32 weights to save it"
                ),
            ));
        }
        let values: Vec<f32> = data
            .convert::<f32>()
            .into_vec()
            .map_err(|e| Error::arg("module", format!("{key}: {e:?}")))?;
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        tensors.push((key, shape, bytes));
    }
    let views = tensors
        .iter()
        .map(|(key, shape, bytes)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes)
                .map(|v| (key.clone(), v))
                .map_err(|e| Error::arg("module", format!("{key}: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    let metadata = Some(std::collections::HashMap::from([(
        "format".to_string(),
        "pt".to_string(),
    )]));
    safetensors::serialize_to_file(views, metadata, path).map_err(|e| Error::Io {
        path: path.to_path_buf(),
        source: std::io::Error::other(e.to_string()),
    })
}

/// Writes `module` as an HF folder: `model.safetensors` (f32, packed weights dequantised, see
/// [`save_safetensors`]) and the two JSON files, `config.json` and `generation_config.json`.
/// What every model's `save_pretrained` does once it has its configs in HF's form.
pub fn save_hf_folder<B: Backend, M: Module<B> + super::PackSlots<B> + Clone>(
    module: &M,
    dir: &Path,
    config: &serde_json::Value,
    generation_config: &serde_json::Value,
) -> Result<()> {
    let io = |path: &Path, source: std::io::Error| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    let mut dense = module.clone();
    super::unpack_module(&mut dense);
    save_safetensors(&dense, &dir.join("model.safetensors"))?;
    write_json_file(&dir.join("config.json"), config)?;
    write_json_file(&dir.join("generation_config.json"), generation_config)
}

/// Writes `value` to `path` as pretty JSON with a final newline, as transformers writes its
/// configs; the error names the file.
pub fn write_json_file(path: &Path, value: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value).expect("JSON values serialise");
    std::fs::write(path, text + "\n").map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// The special tokens of a tokenizer by their `tokenizer_config.json` role (the token's text;
/// `None` leaves the role out).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpecialTokenRoles {
    /// `bos_token`.
    pub bos: Option<String>,
    /// `eos_token`.
    pub eos: Option<String>,
    /// `unk_token`.
    pub unk: Option<String>,
    /// `pad_token`.
    pub pad: Option<String>,
    /// `additional_special_tokens`: further special tokens that transformers must keep whole
    /// and skip when decoding with `skip_special_tokens` (e.g. kiln-anchor's `<AC>`).
    pub additional: Vec<String>,
}

/// An HF `tokenizer_config.json` for `tokenizer` as it stands: class `PreTrainedTokenizerFast`,
/// so transformers runs `tokenizer.json` unchanged, exactly as kiln does (a `LlamaTokenizer`
/// class would rebuild its pipeline); every added token listed in `added_tokens_decoder` with
/// its flags; the `roles`. transformers 5 reads `additional_special_tokens` as its
/// `extra_special_tokens`, transformers 4 as it is. Errors when a role's token is not in the
/// vocabulary.
pub fn fast_tokenizer_config(
    tokenizer: &tokenizers::Tokenizer,
    roles: &SpecialTokenRoles,
) -> Result<serde_json::Value> {
    let mut added: Vec<(u32, tokenizers::AddedToken)> =
        tokenizer.get_added_tokens_decoder().into_iter().collect();
    added.sort_by_key(|(id, _)| *id);
    let decoder: serde_json::Map<String, serde_json::Value> = added
        .into_iter()
        .map(|(id, t)| {
            let entry = serde_json::json!({
                "content": t.content,
                "lstrip": t.lstrip,
                "normalized": t.normalized,
                "rstrip": t.rstrip,
                "single_word": t.single_word,
                "special": t.special,
            });
            (id.to_string(), entry)
        })
        .collect();
    let mut config = serde_json::json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "clean_up_tokenization_spaces": false,
        "added_tokens_decoder": decoder,
    });
    let known = |token: &str| -> Result<()> {
        match tokenizer.token_to_id(token) {
            Some(_) => Ok(()),
            None => Err(Error::arg(
                "tokenizer",
                format!("special token `{token}` is not in the vocabulary"),
            )),
        }
    };
    for (key, token) in [
        ("bos_token", &roles.bos),
        ("eos_token", &roles.eos),
        ("unk_token", &roles.unk),
        ("pad_token", &roles.pad),
    ] {
        if let Some(token) = token {
            known(token)?;
            config[key] = token.as_str().into();
        }
    }
    if !roles.additional.is_empty() {
        for token in &roles.additional {
            known(token)?;
        }
        config["additional_special_tokens"] = roles.additional.clone().into();
    }
    Ok(config)
}

/// Writes `tokenizer.json` (as `tokenizer` stands) and `tokenizer_config.json` (`config`, e.g.
/// from [`fast_tokenizer_config`]) into `dir`, the tokenizer half of an HF folder.
pub fn save_tokenizer(
    dir: &Path,
    tokenizer: &tokenizers::Tokenizer,
    config: &serde_json::Value,
) -> Result<()> {
    let path = dir.join("tokenizer.json");
    tokenizer.save(&path, false).map_err(|e| Error::Io {
        path: path.clone(),
        source: std::io::Error::other(e.to_string()),
    })?;
    write_json_file(&dir.join("tokenizer_config.json"), config)
}

/// The `generation_config.json` of an encoder-decoder, as transformers writes it for T5 and
/// M2M100: the decoder's first token, EOS and padding.
pub fn seq2seq_generation_json(start: u32, eos: &[u32], pad: u32) -> serde_json::Value {
    serde_json::json!({
        "decoder_start_token_id": start,
        "eos_token_id": eos,
        "pad_token_id": pad,
    })
}
