use std::path::Path;

use kiln_core::loading::{TokenIds, from_value, read_json_value};
use kiln_core::{Error, Result};
use serde::Deserialize;

/// Activation of the feed-forward block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum T5Activation {
    /// `relu` (original T5).
    Relu,
    /// `gelu_new`: the tanh approximation (T5 v1.1 / FLAN's `gated-gelu`).
    GeluNew,
    /// Exact (erf) GELU.
    Gelu,
    /// SiLU.
    Silu,
}

impl T5Activation {
    fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "relu" => Self::Relu,
            "gelu_new" | "gelu_pytorch_tanh" => Self::GeluNew,
            "gelu" => Self::Gelu,
            "silu" | "swish" => Self::Silu,
            _ => return None,
        })
    }
}

/// A T5's hyper-parameters, read from an HF `config.json` (`T5Config`).
#[derive(Debug, Clone, PartialEq)]
pub struct T5Config {
    /// Vocabulary size (logits width; often larger than the tokenizer's).
    pub vocab_size: usize,
    /// Model width.
    pub d_model: usize,
    /// Width of one attention head.
    pub d_kv: usize,
    /// Feed-forward width.
    pub d_ff: usize,
    /// Encoder layers.
    pub num_layers: usize,
    /// Decoder layers.
    pub num_decoder_layers: usize,
    /// Attention heads.
    pub num_heads: usize,
    /// Relative-position buckets.
    pub relative_attention_num_buckets: usize,
    /// Distance beyond which all positions share a bucket.
    pub relative_attention_max_distance: usize,
    /// RMS norm epsilon.
    pub layer_norm_epsilon: f64,
    /// Feed-forward activation.
    pub activation: T5Activation,
    /// Gated feed-forward (`wi_0`, `wi_1`) instead of `wi`.
    pub gated: bool,
    /// No separate `lm_head`: the LM head is `shared`. Loading a checkpoint sets it from the
    /// checkpoint itself, as HF does: `lm_head.weight` is used when stored, `shared` otherwise.
    pub tie_word_embeddings: bool,
    /// Scale the decoder output by `d_model**-0.5` before the LM head (original T5: yes;
    /// T5 v1.1 / FLAN: no).
    pub scale_decoder_outputs: bool,
    /// Dropout probability in training (`dropout_rate`; HF's default 0.1).
    pub dropout_rate: f64,
    /// First decoder token.
    pub decoder_start_token_id: u32,
    /// EOS ids.
    pub eos_token_ids: Vec<u32>,
    /// Padding id.
    pub pad_token_id: u32,
}

#[derive(Deserialize)]
struct RawConfig {
    #[serde(default)]
    model_type: Option<String>,
    vocab_size: usize,
    d_model: usize,
    d_kv: usize,
    d_ff: usize,
    num_layers: usize,
    #[serde(default)]
    num_decoder_layers: Option<usize>,
    num_heads: usize,
    #[serde(default = "default_buckets")]
    relative_attention_num_buckets: usize,
    #[serde(default = "default_distance")]
    relative_attention_max_distance: usize,
    #[serde(default = "default_eps")]
    layer_norm_epsilon: f64,
    #[serde(default = "default_ff")]
    feed_forward_proj: String,
    #[serde(default)]
    tie_word_embeddings: Option<bool>,
    #[serde(default)]
    scale_decoder_outputs: Option<bool>,
    #[serde(default)]
    dropout_rate: Option<f64>,
    #[serde(default)]
    decoder_start_token_id: TokenIds,
    #[serde(default)]
    eos_token_id: TokenIds,
    #[serde(default)]
    pad_token_id: TokenIds,
}

fn default_buckets() -> usize {
    32
}
fn default_distance() -> usize {
    128
}
fn default_eps() -> f64 {
    1e-6
}
fn default_ff() -> String {
    "relu".into()
}

impl T5Config {
    /// Reads and checks `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        Self::from_json(read_json_value(path)?, path)
    }

    /// Parses an HF T5 config; `path` names it in errors.
    pub fn from_json(value: serde_json::Value, path: &Path) -> Result<Self> {
        let raw: RawConfig = from_value(value, path)?;
        if let Some(t) = &raw.model_type
            && !matches!(t.as_str(), "t5" | "mt5" | "umt5")
        {
            return Err(Error::UnsupportedModel(format!(
                "{}: model_type `{t}` is not a T5 model",
                path.display()
            )));
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
        positive("d_model", raw.d_model)?;
        positive("d_kv", raw.d_kv)?;
        positive("d_ff", raw.d_ff)?;
        positive("num_layers", raw.num_layers)?;
        positive("num_heads", raw.num_heads)?;
        let buckets = positive(
            "relative_attention_num_buckets",
            raw.relative_attention_num_buckets,
        )?;
        if buckets < 4 {
            return Err(Error::config(
                path,
                "field `relative_attention_num_buckets` must be at least 4",
            ));
        }
        // As T5Config.__init__: "gated-gelu" is gelu_new; otherwise `[gated-]act`.
        let ff = raw.feed_forward_proj.as_str();
        let parts: Vec<&str> = ff.split('-').collect();
        let (gated, act) = match (ff, parts.as_slice()) {
            ("gated-gelu", _) => (true, Some(T5Activation::GeluNew)),
            (_, [act]) => (false, T5Activation::parse(act)),
            (_, ["gated", act]) => (true, T5Activation::parse(act)),
            _ => (false, None),
        };
        let activation = act.ok_or_else(|| {
            Error::config(
                path,
                format!(
                    "field `feed_forward_proj`: `{ff}` is not supported (expected `relu`, \
                     `gated-gelu`, `gated-relu`, `gated-silu`, ...)"
                ),
            )
        })?;
        let dropout_rate = raw.dropout_rate.unwrap_or(0.1);
        if !(0.0..1.0).contains(&dropout_rate) {
            return Err(Error::config(
                path,
                format!("field `dropout_rate` must be in [0, 1), not {dropout_rate}"),
            ));
        }
        let pad = raw.pad_token_id.to_vec().first().copied().unwrap_or(0);
        Ok(Self {
            vocab_size: raw.vocab_size,
            d_model: raw.d_model,
            d_kv: raw.d_kv,
            d_ff: raw.d_ff,
            num_layers: raw.num_layers,
            num_decoder_layers: positive(
                "num_decoder_layers",
                raw.num_decoder_layers.unwrap_or(raw.num_layers),
            )?,
            num_heads: raw.num_heads,
            relative_attention_num_buckets: buckets,
            relative_attention_max_distance: positive(
                "relative_attention_max_distance",
                raw.relative_attention_max_distance,
            )?,
            layer_norm_epsilon: raw.layer_norm_epsilon,
            activation,
            gated,
            // Absent means tied, as in t5-small.
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(true),
            // HF's T5Config (transformers >= 5.17) writes `scale_decoder_outputs` and always
            // `tie_word_embeddings: true`; older files say only `tie_word_embeddings`, whose
            // `false` (T5 v1.1, FLAN) meant "do not scale".
            scale_decoder_outputs: raw
                .scale_decoder_outputs
                .unwrap_or(raw.tie_word_embeddings != Some(false)),
            dropout_rate,
            decoder_start_token_id: raw
                .decoder_start_token_id
                .to_vec()
                .first()
                .copied()
                .unwrap_or(pad),
            eos_token_ids: match raw.eos_token_id.to_vec() {
                v if v.is_empty() => vec![1],
                v => v,
            },
            pad_token_id: pad,
        })
    }
}

impl T5Config {
    /// The HF `config.json` of this config, in the form transformers >= 5.17 writes
    /// (`scale_decoder_outputs` next to `tie_word_embeddings`), which older readers also accept.
    pub fn to_hf_json(&self) -> serde_json::Value {
        let act = match self.activation {
            T5Activation::Relu => "relu",
            T5Activation::GeluNew => "gelu_new",
            T5Activation::Gelu => "gelu",
            T5Activation::Silu => "silu",
        };
        // HF spells gated gelu_new `gated-gelu`.
        let ff = match (self.gated, self.activation) {
            (true, T5Activation::GeluNew) => "gated-gelu".to_string(),
            (true, _) => format!("gated-{act}"),
            (false, _) => act.to_string(),
        };
        serde_json::json!({
            "model_type": "t5",
            "architectures": ["T5ForConditionalGeneration"],
            "vocab_size": self.vocab_size,
            "d_model": self.d_model,
            "d_kv": self.d_kv,
            "d_ff": self.d_ff,
            "num_layers": self.num_layers,
            "num_decoder_layers": self.num_decoder_layers,
            "num_heads": self.num_heads,
            "relative_attention_num_buckets": self.relative_attention_num_buckets,
            "relative_attention_max_distance": self.relative_attention_max_distance,
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "feed_forward_proj": ff,
            "tie_word_embeddings": self.tie_word_embeddings,
            "scale_decoder_outputs": self.scale_decoder_outputs,
            "dropout_rate": self.dropout_rate,
            "decoder_start_token_id": self.decoder_start_token_id,
            "eos_token_id": self.eos_token_ids,
            "pad_token_id": self.pad_token_id,
            "is_encoder_decoder": true,
        })
    }
}
