use burn::module::Module;
use burn::prelude::*;

use crate::{Error, Result};

/// How the rotary frequencies are rescaled for long contexts (`rope_scaling` in HF configs).
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE.
    None,
    /// Position interpolation: every frequency divided by `factor`.
    Linear {
        /// Scale factor.
        factor: f64,
    },
    /// Llama 3.1's piecewise rescaling of low frequencies.
    Llama3 {
        /// Scale factor for low frequencies.
        factor: f64,
        /// Wavelengths longer than `original / low_freq_factor` are fully scaled.
        low_freq_factor: f64,
        /// Wavelengths shorter than `original / high_freq_factor` are left alone.
        high_freq_factor: f64,
        /// Context length of pre-training.
        original_max_position_embeddings: f64,
    },
}

impl RopeScaling {
    /// Parses an HF `rope_scaling` / `rope_parameters` object (either key spelling of the type:
    /// `rope_type` or the older `type`). `path` names the config file for errors.
    pub fn from_hf(value: Option<&serde_json::Value>, path: &std::path::Path) -> Result<Self> {
        let Some(obj) = value.and_then(|v| v.as_object()) else {
            return Ok(RopeScaling::None);
        };
        let kind = obj
            .get("rope_type")
            .or_else(|| obj.get("type"))
            .and_then(|v| v.as_str())
            .unwrap_or("default");
        let num = |key: &str| -> Result<f64> {
            obj.get(key).and_then(|v| v.as_f64()).ok_or_else(|| {
                Error::config(
                    path,
                    format!("rope scaling `{kind}` needs a numeric `{key}`"),
                )
            })
        };
        match kind {
            "default" => Ok(RopeScaling::None),
            "linear" => Ok(RopeScaling::Linear {
                factor: num("factor")?,
            }),
            "llama3" => Ok(RopeScaling::Llama3 {
                factor: num("factor")?,
                low_freq_factor: num("low_freq_factor")?,
                high_freq_factor: num("high_freq_factor")?,
                original_max_position_embeddings: num("original_max_position_embeddings")?,
            }),
            other => Err(Error::config(
                path,
                format!(
                    "rope scaling type `{other}` is not supported (supported: default, linear, llama3)"
                ),
            )),
        }
    }

    /// Applies the scaling to HF's inverse frequencies.
    fn rescale(&self, inv_freq: Vec<f64>) -> Vec<f64> {
        match *self {
            RopeScaling::None => inv_freq,
            RopeScaling::Linear { factor } => inv_freq.into_iter().map(|f| f / factor).collect(),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: original,
            } => {
                // As transformers' `_compute_llama3_parameters`.
                let low_freq_wavelen = original / low_freq_factor;
                let high_freq_wavelen = original / high_freq_factor;
                inv_freq
                    .into_iter()
                    .map(|freq| {
                        let wavelen = 2.0 * std::f64::consts::PI / freq;
                        if wavelen < high_freq_wavelen {
                            freq
                        } else if wavelen > low_freq_wavelen {
                            freq / factor
                        } else {
                            let smooth = (original / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * freq / factor + smooth * freq
                        }
                    })
                    .collect()
            }
        }
    }
}

/// Rotary position embedding in Hugging Face's `rotate_half` form (the two halves of each head
/// are the rotated pairs). burn-nn's `RotaryEncoding` rotates interleaved pairs instead, which
/// would need HF's q/k weights permuted; this form loads them as they are.
///
/// cos/sin are computed per call from the positions, so left-padded batches (each row with its
/// own positions) cost nothing extra and no table of `max_position_embeddings` rows is kept.
#[derive(Module, Debug)]
pub struct RotaryEmbedding<B: Backend> {
    inv_freq: Tensor<B, 1>,
    head_dim: usize,
}

impl<B: Backend> RotaryEmbedding<B> {
    /// RoPE over `head_dim` channels with base `theta`.
    pub fn new(head_dim: usize, theta: f64, scaling: &RopeScaling, device: &B::Device) -> Self {
        let inv_freq: Vec<f64> = (0..head_dim / 2)
            .map(|i| 1.0 / theta.powf((2 * i) as f64 / head_dim as f64))
            .collect();
        let inv_freq: Vec<f32> = scaling
            .rescale(inv_freq)
            .into_iter()
            .map(|f| f as f32)
            .collect();
        Self {
            inv_freq: Tensor::from_data(TensorData::new(inv_freq, [head_dim / 2]), device),
            head_dim,
        }
    }

    /// `(cos, sin)`, each `[batch, 1, seq, head_dim]`, for integer `positions` `[batch, seq]`.
    pub fn cos_sin(&self, positions: Tensor<B, 2, Int>) -> (Tensor<B, 4>, Tensor<B, 4>) {
        let [batch, seq] = positions.dims();
        let half = self.head_dim / 2;
        let freqs = positions.float().reshape([batch, seq, 1])
            * self.inv_freq.clone().reshape([1, 1, half]);
        let emb = Tensor::cat(vec![freqs.clone(), freqs], 2).unsqueeze_dim::<4>(1);
        (emb.clone().cos(), emb.sin())
    }

    /// Rotates `x` `[batch, heads, seq, head_dim]` by the angles in `cos`/`sin`.
    pub fn apply(x: Tensor<B, 4>, cos: &Tensor<B, 4>, sin: &Tensor<B, 4>) -> Tensor<B, 4> {
        let [_, _, _, head_dim] = x.dims();
        let half = head_dim / 2;
        let x1 = x.clone().narrow(3, 0, half);
        let x2 = x.clone().narrow(3, half, half);
        let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
        x * cos.clone() + rotated * sin.clone()
    }
}
