use std::path::Path;

use serde::Deserialize;

use super::{from_value, read_json_value};
use crate::Result;

/// A token id field that real configs write as a number, a list, or null.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum TokenIds {
    /// Absent or null.
    #[default]
    None,
    /// One id.
    One(u32),
    /// Several ids (Llama 3's `eos_token_id: [128001, 128008, 128009]`).
    Many(Vec<u32>),
}

impl TokenIds {
    /// The ids as a list.
    pub fn to_vec(&self) -> Vec<u32> {
        match self {
            TokenIds::None => vec![],
            TokenIds::One(id) => vec![*id],
            TokenIds::Many(ids) => ids.clone(),
        }
    }
}

/// What `generation_config.json` (or `config.json` when it is absent) says about decoding.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct GenerationDefaults {
    /// BOS id.
    #[serde(default)]
    pub bos_token_id: TokenIds,
    /// EOS id or ids.
    #[serde(default)]
    pub eos_token_id: TokenIds,
    /// Padding id.
    #[serde(default)]
    pub pad_token_id: TokenIds,
    /// Decoder start id (encoder-decoder models).
    #[serde(default)]
    pub decoder_start_token_id: TokenIds,
    /// Whether the model's authors sample by default.
    #[serde(default)]
    pub do_sample: Option<bool>,
    /// Default temperature.
    #[serde(default)]
    pub temperature: Option<f32>,
    /// Default top-p.
    #[serde(default)]
    pub top_p: Option<f32>,
    /// Default top-k.
    #[serde(default)]
    pub top_k: Option<usize>,
    /// Default repetition penalty.
    #[serde(default)]
    pub repetition_penalty: Option<f32>,
    /// Default length cap.
    #[serde(default)]
    pub max_new_tokens: Option<usize>,
    /// Older length cap (prompt included for decoder-only models; generated tokens for
    /// encoder-decoders), e.g. NLLB's `max_length: 200`.
    #[serde(default)]
    pub max_length: Option<usize>,
    /// Default beam width.
    #[serde(default)]
    pub num_beams: Option<usize>,
    /// Default beam length penalty.
    #[serde(default)]
    pub length_penalty: Option<f32>,
    /// Default `no_repeat_ngram_size`.
    #[serde(default)]
    pub no_repeat_ngram_size: Option<usize>,
}

impl GenerationDefaults {
    /// Reads `generation_config.json` in `dir`; token ids missing there come from `config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let config_path = dir.join("config.json");
        let from_config: GenerationDefaults = if config_path.is_file() {
            let mut value = read_json_value(&config_path)?;
            keep_token_fields(&mut value);
            from_value(value, &config_path)?
        } else {
            Self::default()
        };
        let path = dir.join("generation_config.json");
        let mut defaults: GenerationDefaults = if path.is_file() {
            from_value(read_json_value(&path)?, &path)?
        } else {
            return Ok(from_config);
        };
        for (mine, theirs) in [
            (&mut defaults.bos_token_id, &from_config.bos_token_id),
            (&mut defaults.eos_token_id, &from_config.eos_token_id),
            (&mut defaults.pad_token_id, &from_config.pad_token_id),
            (
                &mut defaults.decoder_start_token_id,
                &from_config.decoder_start_token_id,
            ),
        ] {
            if *mine == TokenIds::None {
                *mine = theirs.clone();
            }
        }
        Ok(defaults)
    }
}

/// config.json holds much else; keep only what generation reads (and drop sampling fields,
/// which some configs fill with stale values).
fn keep_token_fields(value: &mut serde_json::Value) {
    if let Some(obj) = value.as_object_mut() {
        obj.retain(|k, _| k.ends_with("_token_id"));
    }
}
