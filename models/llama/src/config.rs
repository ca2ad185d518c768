use std::path::Path;

use kiln_core::loading::{TokenIds, from_value, read_json_value};
use kiln_core::nn::RopeScaling;
use kiln_core::{Error, Result};
use serde::Deserialize;

/// Which member of the Llama family a checkpoint is (they share one implementation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LlamaFlavor {
    /// Llama 1, 2, 3, 3.1, 3.2 and derivatives (TinyLlama, SmolLM, ...).
    Llama,
    /// Mistral: Llama with sliding-window attention.
    Mistral,
    /// Yi: Llama architecture with its own configs and tokenizer.
    Yi,
}

/// A Llama-family model's hyper-parameters, read from an HF `config.json`.
///
/// Accepts the forms real hub checkpoints use: `rope_theta` + `rope_scaling` (older configs,
/// with `type` or `rope_type`) and transformers 5's `rope_parameters`; `torch_dtype` or `dtype`;
/// `eos_token_id` as a number or a list; `num_key_value_heads` and `head_dim` optional.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    /// Family member.
    pub flavor: LlamaFlavor,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Model width.
    pub hidden_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (GQA when fewer than query heads).
    pub num_key_value_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// Longest supported sequence.
    pub max_position_embeddings: usize,
    /// RMS norm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base.
    pub rope_theta: f64,
    /// RoPE rescaling.
    pub rope_scaling: RopeScaling,
    /// LM head shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// q/k/v/o projections have biases.
    pub attention_bias: bool,
    /// MLP projections have biases.
    pub mlp_bias: bool,
    /// Sliding attention window (Mistral), in tokens.
    pub sliding_window: Option<usize>,
    /// BOS id.
    pub bos_token_id: Option<u32>,
    /// EOS ids.
    pub eos_token_ids: Vec<u32>,
    /// Padding id.
    pub pad_token_id: Option<u32>,
}

#[derive(Deserialize)]
struct RawConfig {
    #[serde(default)]
    model_type: Option<String>,
    #[serde(default)]
    architectures: Option<Vec<String>>,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    #[serde(default)]
    num_key_value_heads: Option<usize>,
    #[serde(default)]
    head_dim: Option<usize>,
    #[serde(default)]
    hidden_act: Option<String>,
    #[serde(default = "default_max_positions")]
    max_position_embeddings: usize,
    #[serde(default = "default_eps")]
    rms_norm_eps: f64,
    #[serde(default)]
    rope_theta: Option<f64>,
    #[serde(default)]
    rope_scaling: Option<serde_json::Value>,
    #[serde(default)]
    rope_parameters: Option<serde_json::Value>,
    #[serde(default)]
    tie_word_embeddings: Option<bool>,
    #[serde(default)]
    attention_bias: bool,
    #[serde(default)]
    mlp_bias: bool,
    #[serde(default)]
    sliding_window: Option<usize>,
    #[serde(default)]
    use_sliding_window: Option<bool>,
    #[serde(default)]
    bos_token_id: TokenIds,
    #[serde(default)]
    eos_token_id: TokenIds,
    #[serde(default)]
    pad_token_id: TokenIds,
}

fn default_max_positions() -> usize {
    2048
}

fn default_eps() -> f64 {
    1e-6
}

impl LlamaConfig {
    /// Reads and checks `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        Self::from_json(read_json_value(path)?, path)
    }

    /// Parses an HF config; `path` names it in errors.
    pub fn from_json(value: serde_json::Value, path: &Path) -> Result<Self> {
        let raw: RawConfig = from_value(value, path)?;
        let model_type = raw.model_type.clone().unwrap_or_default().to_lowercase();
        let arch = raw
            .architectures
            .as_ref()
            .and_then(|a| a.first())
            .cloned()
            .unwrap_or_default();
        let flavor = match (model_type.as_str(), arch.as_str()) {
            ("mistral", _) | (_, "MistralForCausalLM") => LlamaFlavor::Mistral,
            ("yi", _) | (_, "YiForCausalLM") => LlamaFlavor::Yi,
            ("llama", _) | ("", "LlamaForCausalLM") => LlamaFlavor::Llama,
            _ => {
                return Err(Error::UnsupportedModel(format!(
                    "{}: model_type `{model_type}` (architecture `{arch}`) is not a Llama-family model",
                    path.display()
                )));
            }
        };
        if let Some(act) = &raw.hidden_act
            && !matches!(act.as_str(), "silu" | "swish")
        {
            return Err(Error::config(
                path,
                format!("field `hidden_act`: `{act}` is not supported (Llama uses silu)"),
            ));
        }
        let positive = |name: &str, v: usize| {
            if v == 0 {
                Err(Error::config(
                    path,
                    format!("field `{name}` must be positive"),
                ))
            } else {
                Ok(v)
            }
        };
        positive("vocab_size", raw.vocab_size)?;
        positive("hidden_size", raw.hidden_size)?;
        positive("intermediate_size", raw.intermediate_size)?;
        positive("num_hidden_layers", raw.num_hidden_layers)?;
        let heads = positive("num_attention_heads", raw.num_attention_heads)?;
        let kv_heads = positive(
            "num_key_value_heads",
            raw.num_key_value_heads.unwrap_or(heads),
        )?;
        if heads % kv_heads != 0 {
            return Err(Error::config(
                path,
                format!(
                    "field `num_key_value_heads`: {kv_heads} does not divide num_attention_heads {heads}"
                ),
            ));
        }
        let head_dim = match raw.head_dim {
            Some(d) => positive("head_dim", d)?,
            None if raw.hidden_size.is_multiple_of(heads) => raw.hidden_size / heads,
            None => {
                return Err(Error::config(
                    path,
                    "field `hidden_size` is not a multiple of num_attention_heads",
                ));
            }
        };
        if head_dim % 2 != 0 {
            return Err(Error::config(
                path,
                format!("head dim {head_dim} is odd; RoPE needs it even"),
            ));
        }
        // transformers 5 keeps theta and scaling together in `rope_parameters`.
        let rope = raw.rope_parameters.as_ref().or(raw.rope_scaling.as_ref());
        let rope_theta = raw
            .rope_theta
            .or_else(|| raw.rope_parameters.as_ref()?.get("rope_theta")?.as_f64())
            .unwrap_or(10_000.0);
        let rope_scaling = RopeScaling::from_hf(rope, path)?;
        let sliding_window = match raw.use_sliding_window {
            Some(false) => None,
            _ => raw.sliding_window.filter(|&w| w > 0),
        };
        Ok(Self {
            flavor,
            vocab_size: raw.vocab_size,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_hidden_layers: raw.num_hidden_layers,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim,
            max_position_embeddings: positive(
                "max_position_embeddings",
                raw.max_position_embeddings,
            )?,
            rms_norm_eps: raw.rms_norm_eps,
            rope_theta,
            rope_scaling,
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            attention_bias: raw.attention_bias,
            mlp_bias: raw.mlp_bias,
            sliding_window,
            bos_token_id: raw.bos_token_id.to_vec().first().copied(),
            eos_token_ids: raw.eos_token_id.to_vec(),
            pad_token_id: raw.pad_token_id.to_vec().first().copied(),
        })
    }

    /// The config as an HF `config.json` that transformers and [`from_json`](Self::from_json)
    /// both read (theta and scaling in the `rope_theta` + `rope_scaling` form, which every
    /// transformers version reads). Yi is written as `llama`, as Yi's own hub configs are.
    pub fn to_hf_json(&self) -> serde_json::Value {
        let (model_type, arch) = match self.flavor {
            LlamaFlavor::Mistral => ("mistral", "MistralForCausalLM"),
            LlamaFlavor::Llama | LlamaFlavor::Yi => ("llama", "LlamaForCausalLM"),
        };
        let eos = match self.eos_token_ids.as_slice() {
            [one] => serde_json::json!(one),
            many => serde_json::json!(many),
        };
        serde_json::json!({
            "model_type": model_type,
            "architectures": [arch],
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling.to_hf(),
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "mlp_bias": self.mlp_bias,
            "sliding_window": self.sliding_window,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos,
            "pad_token_id": self.pad_token_id,
            "torch_dtype": "float32",
        })
    }

    /// Parameter count implied by the config.
    pub fn num_parameters(&self) -> usize {
        let (d, f, v) = (self.hidden_size, self.intermediate_size, self.vocab_size);
        let q = self.num_attention_heads * self.head_dim;
        let kv = self.num_key_value_heads * self.head_dim;
        let layer = d * q + 2 * d * kv + q * d + 3 * d * f + 2 * d;
        let head = if self.tie_word_embeddings { 0 } else { v * d };
        v * d + self.num_hidden_layers * layer + d + head
    }
}
