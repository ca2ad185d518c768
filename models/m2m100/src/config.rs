use std::path::Path;

use kiln_core::loading::{TokenIds, from_value, read_json_value};
use kiln_core::{Error, Result};
use serde::Deserialize;

/// Feed-forward activation (`activation_function`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum M2M100Activation {
    /// ReLU (M2M100 and NLLB-200).
    Relu,
    /// Exact GELU.
    Gelu,
    /// Tanh-approximated GELU.
    GeluNew,
    /// SiLU.
    Silu,
}

/// An M2M100 / NLLB-200's hyper-parameters, read from an HF `config.json` (`M2M100Config`).
#[derive(Debug, Clone, PartialEq)]
pub struct M2M100Config {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Model width.
    pub d_model: usize,
    /// Encoder layers.
    pub encoder_layers: usize,
    /// Decoder layers.
    pub decoder_layers: usize,
    /// Encoder attention heads.
    pub encoder_attention_heads: usize,
    /// Decoder attention heads.
    pub decoder_attention_heads: usize,
    /// Encoder feed-forward width.
    pub encoder_ffn_dim: usize,
    /// Decoder feed-forward width.
    pub decoder_ffn_dim: usize,
    /// Feed-forward activation.
    pub activation: M2M100Activation,
    /// Longest sequence (positions beyond it are still computed, as HF extends the table).
    pub max_position_embeddings: usize,
    /// Multiply token embeddings by `sqrt(d_model)`.
    pub scale_embedding: bool,
    /// LM head shares `model.shared`.
    pub tie_word_embeddings: bool,
    /// Padding id (also the sinusoidal positions' offset base).
    pub pad_token_id: u32,
    /// EOS ids.
    pub eos_token_ids: Vec<u32>,
    /// First decoder token.
    pub decoder_start_token_id: u32,
}

#[derive(Deserialize)]
struct RawConfig {
    #[serde(default)]
    model_type: Option<String>,
    vocab_size: usize,
    d_model: usize,
    encoder_layers: usize,
    decoder_layers: usize,
    encoder_attention_heads: usize,
    decoder_attention_heads: usize,
    encoder_ffn_dim: usize,
    decoder_ffn_dim: usize,
    #[serde(default = "default_act")]
    activation_function: String,
    #[serde(default = "default_positions")]
    max_position_embeddings: usize,
    #[serde(default = "default_true")]
    scale_embedding: bool,
    #[serde(default)]
    tie_word_embeddings: Option<bool>,
    #[serde(default)]
    pad_token_id: TokenIds,
    #[serde(default)]
    eos_token_id: TokenIds,
    #[serde(default)]
    decoder_start_token_id: TokenIds,
}

fn default_act() -> String {
    "relu".into()
}
fn default_positions() -> usize {
    1024
}
fn default_true() -> bool {
    true
}

impl M2M100Config {
    /// The `config.json` transformers writes for this config (`M2M100Config`), which
    /// [`from_json`](Self::from_json) reads back to the same value.
    pub fn to_hf_json(&self) -> serde_json::Value {
        let act = match self.activation {
            M2M100Activation::Relu => "relu",
            M2M100Activation::Gelu => "gelu",
            M2M100Activation::GeluNew => "gelu_new",
            M2M100Activation::Silu => "silu",
        };
        serde_json::json!({
            "model_type": "m2m_100",
            "architectures": ["M2M100ForConditionalGeneration"],
            "vocab_size": self.vocab_size,
            "d_model": self.d_model,
            "encoder_layers": self.encoder_layers,
            "decoder_layers": self.decoder_layers,
            "encoder_attention_heads": self.encoder_attention_heads,
            "decoder_attention_heads": self.decoder_attention_heads,
            "encoder_ffn_dim": self.encoder_ffn_dim,
            "decoder_ffn_dim": self.decoder_ffn_dim,
            "activation_function": act,
            "max_position_embeddings": self.max_position_embeddings,
            "scale_embedding": self.scale_embedding,
            "tie_word_embeddings": self.tie_word_embeddings,
            "pad_token_id": self.pad_token_id,
            "eos_token_id": match self.eos_token_ids.as_slice() {
                [one] => serde_json::json!(one),
                many => serde_json::json!(many),
            },
            "decoder_start_token_id": self.decoder_start_token_id,
            "is_encoder_decoder": true,
            "dropout": 0.0,
            "attention_dropout": 0.0,
            "activation_dropout": 0.0,
        })
    }

    /// Reads and checks `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        Self::from_json(read_json_value(path)?, path)
    }

    /// Parses an HF M2M100 config; `path` names it in errors.
    pub fn from_json(value: serde_json::Value, path: &Path) -> Result<Self> {
        let raw: RawConfig = from_value(value, path)?;
        if let Some(t) = &raw.model_type
            && t != "m2m_100"
        {
            return Err(Error::UnsupportedModel(format!(
                "{}: model_type `{t}` is not M2M100/NLLB (`m2m_100`)",
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
        positive("encoder_layers", raw.encoder_layers)?;
        positive("decoder_layers", raw.decoder_layers)?;
        positive("encoder_ffn_dim", raw.encoder_ffn_dim)?;
        positive("decoder_ffn_dim", raw.decoder_ffn_dim)?;
        let d = positive("d_model", raw.d_model)?;
        for (name, heads) in [
            ("encoder_attention_heads", raw.encoder_attention_heads),
            ("decoder_attention_heads", raw.decoder_attention_heads),
        ] {
            if positive(name, heads)? > 0 && d % heads != 0 {
                return Err(Error::config(
                    path,
                    format!("field `{name}`: {heads} does not divide d_model {d}"),
                ));
            }
        }
        if d < 4 {
            return Err(Error::config(path, "field `d_model` must be at least 4"));
        }
        let activation = match raw.activation_function.as_str() {
            "relu" => M2M100Activation::Relu,
            "gelu" => M2M100Activation::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" => M2M100Activation::GeluNew,
            "silu" | "swish" => M2M100Activation::Silu,
            other => {
                return Err(Error::config(
                    path,
                    format!("field `activation_function`: `{other}` is not supported"),
                ));
            }
        };
        let pad = raw.pad_token_id.to_vec().first().copied().unwrap_or(1);
        let eos = match raw.eos_token_id.to_vec() {
            v if v.is_empty() => vec![2],
            v => v,
        };
        Ok(Self {
            vocab_size: raw.vocab_size,
            d_model: d,
            encoder_layers: raw.encoder_layers,
            decoder_layers: raw.decoder_layers,
            encoder_attention_heads: raw.encoder_attention_heads,
            decoder_attention_heads: raw.decoder_attention_heads,
            encoder_ffn_dim: raw.encoder_ffn_dim,
            decoder_ffn_dim: raw.decoder_ffn_dim,
            activation,
            max_position_embeddings: positive(
                "max_position_embeddings",
                raw.max_position_embeddings,
            )?,
            scale_embedding: raw.scale_embedding,
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(true),
            pad_token_id: pad,
            decoder_start_token_id: raw
                .decoder_start_token_id
                .to_vec()
                .first()
                .copied()
                .unwrap_or(eos[0]),
            eos_token_ids: eos,
        })
    }
}
