//! Loading whatever a folder or hub id holds, by its `config.json`.

use std::path::Path;

use burn::prelude::*;
use kiln_core::loading::{GenerationDefaults, ModelFiles, read_json_value, resolve_model};
use kiln_core::{CausalLm, Error, Result, Tokenizer};
use kiln_llama::{Llama, LlamaConfig};

/// A loaded decoder-only model with its tokenizer and generation defaults.
pub struct LoadedModel<B: Backend> {
    /// The model.
    pub model: Llama<B>,
    /// Its tokenizer (absent when the folder has no tokenizer.json).
    pub tokenizer: Option<Tokenizer>,
    /// EOS ids, sampling defaults and so on.
    pub defaults: GenerationDefaults,
    /// A human-readable description (`llama 1.1B, 22 layers, ...`).
    pub description: String,
    /// Where the files are.
    pub files: ModelFiles,
}

/// The model families kiln knows, by `model_type`.
pub const SUPPORTED: &str = "llama, mistral, yi";

/// Loads the model at `spec` (a folder in HF layout or a hub id).
pub fn load<B: Backend>(spec: &str, device: &B::Device) -> Result<LoadedModel<B>> {
    let files = resolve_model(spec)?;
    let config_path = files.file("config.json");
    let value = read_json_value(&config_path)?;
    let model_type = value
        .get("model_type")
        .and_then(|v| v.as_str())
        .unwrap_or("")
        .to_lowercase();
    match model_type.as_str() {
        "llama" | "mistral" | "yi" => {}
        other => {
            return Err(Error::UnsupportedModel(format!(
                "{}: model_type `{other}`; kiln supports {SUPPORTED}",
                config_path.display()
            )));
        }
    }
    let config = LlamaConfig::from_json(value, &config_path)?;
    let model = Llama::from_pretrained(&files.dir, device)?;
    let tokenizer = load_tokenizer(&files.dir)?;
    let defaults = GenerationDefaults::from_dir(&files.dir)?;
    let description = format!(
        "{:?} {:.2}B params, {} layers, {} heads / {} kv heads, vocab {}, context {}{}",
        config.flavor,
        config.num_parameters() as f64 / 1e9,
        config.num_hidden_layers,
        config.num_attention_heads,
        config.num_key_value_heads,
        config.vocab_size,
        model.max_context(),
        config
            .sliding_window
            .map(|w| format!(", sliding window {w}"))
            .unwrap_or_default()
    );
    Ok(LoadedModel {
        model,
        tokenizer,
        defaults,
        description,
        files,
    })
}

fn load_tokenizer(dir: &Path) -> Result<Option<Tokenizer>> {
    if dir.join("tokenizer.json").is_file() {
        Tokenizer::from_dir(dir).map(Some)
    } else {
        Ok(None)
    }
}
