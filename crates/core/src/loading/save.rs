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
    for (name, value) in [
        ("config.json", config),
        ("generation_config.json", generation_config),
    ] {
        let path = dir.join(name);
        let text = serde_json::to_string_pretty(value).expect("JSON values serialise");
        std::fs::write(&path, text + "\n").map_err(|e| io(&path, e))?;
    }
    Ok(())
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
