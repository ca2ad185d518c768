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

    /// The HF `rope_scaling` object (`rope_type` spelling), `null` for plain RoPE: what
    /// [`from_hf`](Self::from_hf) reads back.
    pub fn to_hf(&self) -> serde_json::Value {
        match *self {
            RopeScaling::None => serde_json::Value::Null,
            RopeScaling::Linear { factor } => {
                serde_json::json!({ "rope_type": "linear", "factor": factor })
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => serde_json::json!({
                "rope_type": "llama3",
                "factor": factor,
                "low_freq_factor": low_freq_factor,
                "high_freq_factor": high_freq_factor,
                // An integer in HF configs.
                "original_max_position_embeddings": original_max_position_embeddings as u64,
            }),
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
/// The angles are computed per forward pass from the positions ([`RotaryEmbedding::angles`]), so
/// left-padded batches (each row with its own positions) cost nothing extra and no table of
/// `max_position_embeddings` rows is kept.
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

    /// The rotation of integer `positions` `[batch, seq]`, for one head; widen it to a layer's
    /// query or key heads with [`RotaryAngles::for_heads`].
    pub fn angles(&self, positions: Tensor<B, 2, Int>) -> RotaryAngles<B> {
        let [batch, seq] = positions.dims();
        let half = self.head_dim / 2;
        // As HF: angles in f32, `emb = cat(freqs, freqs)`.
        let freqs = positions.float().reshape([batch, seq, 1, 1])
            * self.inv_freq.clone().reshape([1, 1, 1, half]);
        let (cos, sin) = (freqs.clone().cos(), freqs.sin());
        RotaryAngles {
            cos: Tensor::cat(vec![cos.clone(), cos], 3),
            sin: Tensor::cat(vec![sin.clone().neg(), sin], 3),
        }
    }
}

/// cos and sin of one forward pass's rotary angles, `[batch, seq, heads, head_dim]`, made by
/// [`RotaryEmbedding::angles`] (one head) and [`RotaryAngles::for_heads`].
///
/// Written out for every head (not broadcast from `[batch, seq, 1, head_dim]`) and applied in the
/// projections' own `[batch, seq, heads, head_dim]` layout: every operand of the rotation is then
/// contiguous and of one shape, which CPU backends run as plain SIMD loops. The broadcast form on
/// a head-transposed view walked flex's strided iterator element by element (5 % of a
/// TinyLlama prefill, perf). The tables are built once per forward and shared by all layers.
#[derive(Debug, Clone)]
pub struct RotaryAngles<B: Backend> {
    cos: Tensor<B, 4>,
    /// `sin` with `rotate_half`'s sign folded in: `-sin` on the first half of each head.
    sin: Tensor<B, 4>,
}

impl<B: Backend> RotaryAngles<B> {
    /// The same angles written out for `heads` heads (from the one head of
    /// [`RotaryEmbedding::angles`]).
    pub fn for_heads(&self, heads: usize) -> Self {
        Self {
            cos: self.cos.clone().repeat_dim(2, heads),
            sin: self.sin.clone().repeat_dim(2, heads),
        }
    }

    /// Rotates `x` `[batch, seq, heads, head_dim]`: `x·cos + rotate_half(x)·sin`, with
    /// `rotate_half(x) = cat(-x₂, x₁)` written as `cat(x₂, x₁)` times the signed sin.
    pub fn apply(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let half = x.dims()[3] / 2;
        let swapped = Tensor::cat(
            vec![
                x.clone().narrow(3, half, half),
                x.clone().narrow(3, 0, half),
            ],
            3,
        );
        x * self.cos.clone() + swapped * self.sin.clone()
    }
}
