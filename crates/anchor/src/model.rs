//! Model plumbing: growing the vocabulary for `<AC>`, a small config, checkpoints.

use std::path::Path;

use burn::module::{Module, Param};
use burn::prelude::*;
use burn::record::{FullPrecisionSettings, NamedMpkFileRecorder};
use kiln_core::Tokenizer;
use kiln_core::nn::EmbeddingConfig;
use kiln_llama::{Llama, LlamaConfig};

use crate::{AnchorError, AnchorSet, Result};

/// How the new `<AC>` row is initialised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AcInit {
    /// A copy of this token's row, as the AnLLM reference code does with the `.` token (the
    /// default).
    Copy(u32),
    /// The mean of all rows, as the paper's text describes.
    Mean,
}

/// Adds one vocabulary row (the `<AC>` token, id = the old vocabulary size) to the embeddings
/// and the untied LM head, both initialised as `init` says. Returns the grown model; the
/// config's `vocab_size` grows by one.
pub fn grow_vocab<B: Backend>(model: Llama<B>, init: AcInit) -> Result<Llama<B>> {
    let mut config = model.config().clone();
    let vocab = config.vocab_size;
    if let AcInit::Copy(row) = init
        && row as usize >= vocab
    {
        return Err(AnchorError::arg(
            "init_rows",
            format!("init row {row} is outside the vocabulary of {vocab}"),
        ));
    }
    config.vocab_size += 1;
    let device = model.model.norm.weight.val().device();
    // Embedding and LM head both store [vocab, hidden]: append the new row.
    let grow = |w: Tensor<B, 2>| {
        let row = match init {
            AcInit::Copy(id) => w.clone().narrow(0, id as usize, 1),
            AcInit::Mean => w.clone().mean_dim(0),
        };
        // Detached: a fresh leaf parameter, also under an autodiff backend (where the
        // concatenation of tracked weights is not a leaf and cannot become a parameter).
        Tensor::cat(vec![w, row], 0).detach()
    };
    let mut new = config.init::<B>(&device);
    let mut decoder = model.model;
    let mut embed = EmbeddingConfig::new(config.vocab_size, config.hidden_size).init(&device);
    embed.weight = Param::from_tensor(grow(decoder.embed_tokens.dense_weight()));
    decoder.embed_tokens = embed;
    new.model = decoder;
    new.lm_head = model.lm_head.map(|mut head| {
        head.weight = Param::from_tensor(grow(head.dense_weight()));
        head.packed = None;
        head
    });
    Ok(new)
}

/// An HF-style `config.json` for a small Llama trained from scratch.
pub fn tiny_config(
    vocab_size: usize,
    hidden_size: usize,
    layers: usize,
    heads: usize,
    intermediate_size: usize,
    max_positions: usize,
) -> serde_json::Value {
    serde_json::json!({
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "max_position_embeddings": max_positions,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": true,
        "hidden_act": "silu",
    })
}

/// What `kiln anchor train` writes into a folder beside the weights.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct AnchorCheckpoint {
    /// The anchors the model was trained with (`None`: plain causal training).
    pub anchors: Option<AnchorSet>,
    /// BOS id to put before texts, if any.
    pub bos: Option<u32>,
}

fn recorder() -> NamedMpkFileRecorder<FullPrecisionSettings> {
    NamedMpkFileRecorder::new()
}

/// Writes `config.json`, `model.mpk` (dense f32, packed matrices unpacked), `anchor.json` and
/// (when given) `tokenizer.json` to `dir`.
pub fn save_checkpoint<B: Backend>(
    dir: &Path,
    model: &Llama<B>,
    config_json: &serde_json::Value,
    tokenizer: Option<&Tokenizer>,
    meta: &AnchorCheckpoint,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| AnchorError::io(dir, e))?;
    let mut config = config_json.clone();
    config["vocab_size"] = model.config().vocab_size.into();
    let write = |name: &str, text: String| {
        let path = dir.join(name);
        std::fs::write(&path, text).map_err(|e| AnchorError::io(path, e))
    };
    write(
        "config.json",
        serde_json::to_string_pretty(&config).unwrap_or_default(),
    )?;
    write(
        "anchor.json",
        serde_json::to_string_pretty(meta).unwrap_or_default(),
    )?;
    if let Some(tokenizer) = tokenizer {
        let path = dir.join("tokenizer.json");
        tokenizer
            .inner()
            .save(&path, false)
            .map_err(|e| AnchorError::io(path, e))?;
    }
    // A record of matrices held packed for the host kernels (a model loaded for inference on a
    // CPU backend) would store empty parameters: save the dense form.
    let mut dense = model.clone();
    kiln_core::loading::unpack_module(&mut dense);
    dense
        .save_file(dir.join("model"), &recorder())
        .map_err(|e| AnchorError::io(dir.join("model.mpk"), e))
}

/// Reads a folder written by [`save_checkpoint`]: the model, its tokenizer (if saved), the
/// anchor metadata and the raw config JSON.
pub fn load_checkpoint<B: Backend>(
    dir: &Path,
    device: &B::Device,
) -> Result<(
    Llama<B>,
    Option<Tokenizer>,
    AnchorCheckpoint,
    serde_json::Value,
)> {
    let read = |name: &str| -> Result<String> {
        let path = dir.join(name);
        std::fs::read_to_string(&path).map_err(|e| AnchorError::io(path, e))
    };
    let config_path = dir.join("config.json");
    let config_json: serde_json::Value = serde_json::from_str(&read("config.json")?)
        .map_err(|e| AnchorError::io(&config_path, e))?;
    let config = LlamaConfig::from_json(config_json.clone(), &config_path)?;
    let meta: AnchorCheckpoint = serde_json::from_str(&read("anchor.json")?)
        .map_err(|e| AnchorError::io(dir.join("anchor.json"), e))?;
    let model = config
        .init::<B>(device)
        .load_file(dir.join("model"), &recorder(), device)
        .map_err(|e| AnchorError::io(dir.join("model.mpk"), e))?;
    let tokenizer = if dir.join("tokenizer.json").is_file() {
        Some(Tokenizer::from_dir(dir)?)
    } else {
        None
    };
    Ok((model, tokenizer, meta, config_json))
}

/// True when `dir` holds a checkpoint written by [`save_checkpoint`].
pub fn is_checkpoint(dir: &Path) -> bool {
    dir.join("anchor.json").is_file() && dir.join("model.mpk").is_file()
}

/// A model from scratch for `config`, weights materialised (burn's `init` is lazy, and clones
/// of a lazy module would each draw their own weights) and the embedding drawn from
/// N(0, 0.02) as HF's `initializer_range` (burn's N(0, 1) default makes the tied LM head's
/// first logits huge).
pub fn init_model<B: Backend>(config: &LlamaConfig, device: &B::Device) -> Llama<B> {
    let mut model = config.init::<B>(device);
    model.model.embed_tokens.weight = Param::from_tensor(Tensor::random(
        [config.vocab_size, config.hidden_size],
        burn::tensor::Distribution::Normal(0.0, 0.02),
        device,
    ));
    let record = model.into_record();
    config.init::<B>(device).load_record(record)
}
