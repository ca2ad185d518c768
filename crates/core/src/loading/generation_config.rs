use std::path::Path;

use serde::Deserialize;

use super::{from_value, read_json_value};
use crate::{GenerationConfig, Result, SamplingConfig, Tokenizer};

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

/// Sampling choices given by the caller (a CLI flag, an API request) over a model's
/// [`GenerationDefaults`]; `None` keeps the model's.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SamplingOverrides {
    /// Temperature; `Some(0.0)` is greedy, a positive one samples (HF's `do_sample=True`).
    pub temperature: Option<f32>,
    /// Top-k (`0` turns it off).
    pub top_k: Option<usize>,
    /// Top-p (`1.0` turns it off).
    pub top_p: Option<f32>,
    /// Repetition penalty (`1.0` turns it off).
    pub repetition_penalty: Option<f32>,
}

impl GenerationDefaults {
    /// The EOS ids a chat reply ends on: the model's, then the chat template's end-of-turn
    /// token (the tokenizer's `eos_token`, e.g. ChatML's `<|im_end|>`) when config.json names
    /// another, as `kiln chat`, the server and HF's chat pipelines stop.
    pub fn chat_eos_token_ids(&self, tokenizer: &Tokenizer) -> Vec<u32> {
        let mut eos = self.eos_token_id.to_vec();
        if let Some(id) = tokenizer
            .eos_token()
            .and_then(|e| tokenizer.token_to_id(e))
            .filter(|id| !eos.contains(id))
        {
            eos.push(id);
        }
        eos
    }

    /// The sampling HF's `generate` uses for this model: greedy unless `do_sample` is true,
    /// then `temperature` (default 1.0), `top_k` (default 50) and `top_p` (default 1.0, off);
    /// `repetition_penalty` in either case. A caller's `overrides` win, and a positive
    /// temperature among them turns sampling on, as `do_sample=True` would.
    pub fn sampling(&self, overrides: &SamplingOverrides) -> SamplingConfig {
        let repetition_penalty = overrides
            .repetition_penalty
            .or(self.repetition_penalty)
            .unwrap_or(1.0);
        let do_sample = match overrides.temperature {
            Some(t) => t > 0.0,
            None => self.do_sample.unwrap_or(false) && self.temperature != Some(0.0),
        };
        let greedy = SamplingConfig::greedy().with_repetition_penalty(repetition_penalty);
        if !do_sample {
            return greedy;
        }
        let top_k = overrides.top_k.or(self.top_k).unwrap_or(50);
        let top_p = overrides.top_p.or(self.top_p).unwrap_or(1.0);
        greedy
            .with_temperature(overrides.temperature.or(self.temperature).unwrap_or(1.0))
            .with_top_k((top_k > 0).then_some(top_k))
            .with_top_p((top_p < 1.0).then_some(top_p))
    }

    /// What HF's `generate` does for this model when given nothing: its EOS ids, its pad id
    /// (the first EOS when it has none), its `max_new_tokens` when set, and [`Self::sampling`].
    /// EOS ids and pad these files do not name stay `None` (the model's).
    pub fn generation_config(&self, overrides: &SamplingOverrides) -> GenerationConfig {
        let eos = self.eos_token_id.to_vec();
        let pad = self.pad_token_id.to_vec().first().or(eos.first()).copied();
        let mut config = GenerationConfig::default().with_sampling(self.sampling(overrides));
        if !eos.is_empty() {
            config = config.with_eos_token_ids(eos);
        }
        if let Some(pad) = pad {
            config = config.with_pad_token_id(pad);
        }
        if let Some(n) = self.max_new_tokens {
            config = config.with_max_new_tokens(n);
        }
        config
    }
}

/// config.json holds much else; keep only what generation reads (and drop sampling fields,
/// which some configs fill with stale values).
fn keep_token_fields(value: &mut serde_json::Value) {
    if let Some(obj) = value.as_object_mut() {
        obj.retain(|k, _| k.ends_with("_token_id"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn defaults(json: serde_json::Value) -> GenerationDefaults {
        serde_json::from_value(json).unwrap()
    }

    /// HF's rules, written out by hand from `GenerationConfig` and `generate`: greedy unless
    /// do_sample; when sampling, temperature 1.0, top_k 50, top_p 1.0 unless set.
    #[test]
    fn merges_as_transformers_generate() {
        let none = SamplingOverrides::default();
        let greedy = SamplingConfig::greedy();
        // No generation_config: greedy.
        assert_eq!(defaults(serde_json::json!({})).sampling(&none), greedy);
        // Sampling fields without do_sample are ignored (HF warns and decodes greedily).
        let d = defaults(serde_json::json!({"temperature": 0.6, "top_p": 0.9}));
        assert_eq!(d.sampling(&none), greedy);
        // do_sample with Llama-3's values: top_k falls back to HF's 50.
        let d = defaults(
            serde_json::json!({"do_sample": true, "temperature": 0.6, "top_p": 0.9, "repetition_penalty": 1.1}),
        );
        let sampled = greedy
            .clone()
            .with_temperature(0.6)
            .with_top_k(Some(50))
            .with_top_p(Some(0.9))
            .with_repetition_penalty(1.1);
        assert_eq!(d.sampling(&none), sampled);
        // A caller's temperature 0 is greedy (the repetition penalty stays, as in HF).
        let zero = SamplingOverrides {
            temperature: Some(0.0),
            ..none
        };
        assert_eq!(
            d.sampling(&zero),
            greedy.clone().with_repetition_penalty(1.1)
        );
        // A caller's positive temperature samples even where the model is greedy; top_k 0
        // and top_p 1.0 turn those filters off.
        let warm = SamplingOverrides {
            temperature: Some(0.8),
            top_k: Some(0),
            top_p: Some(1.0),
            repetition_penalty: None,
        };
        assert_eq!(
            defaults(serde_json::json!({})).sampling(&warm),
            greedy.clone().with_temperature(0.8)
        );
        // EOS, pad (first EOS when absent) and max_new_tokens.
        let d = defaults(serde_json::json!({"eos_token_id": [7, 9], "max_new_tokens": 12}));
        let g = d.generation_config(&none);
        assert_eq!(
            (g.eos_token_ids.clone(), g.pad_token_id, g.max_new_tokens),
            (Some(vec![7, 9]), Some(7), 12)
        );
    }
}
