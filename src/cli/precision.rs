//! The weight-precision flags of the commands that load a decoder-only model.

use clap::Args;
use kiln::core::loading::{LoadOptions, Quantization, WeightDtype};
use kiln::core::packed::ActivationPrecision;

/// `--dtype` and `--quant`.
#[derive(Args, Debug, Clone)]
pub struct PrecisionArgs {
    /// Weight precision: `auto` keeps what the file holds where this backend computes with it
    /// (on the CPU a GGUF's blocks (Q8_0, Q4_0/1, Q5_0/1, Q2_K-Q6_K, IQ4_NL, IQ4_XS) and
    /// f16/bf16 tensors stay as stored, other IQ types are an error, safetensors f32; on a GPU f16/bf16 matrices stay half where the
    /// GPU computes in that type, the rest f32), or `f32`, `f16`, `bf16` (half the memory of
    /// f32; on a GPU the matrices are multiplied in f16/bf16, activations stay f32; wgpu has
    /// f16 but no bf16).
    #[arg(long, default_value = "auto")]
    pub dtype: WeightDtype,
    /// Quantise the Linear and embedding matrices at load: `none`, `q8_0` (8.5 bits a weight),
    /// `q4_0` (4.5 bits), `q4_1` (5 bits) or `iq4_nl` (4.5 bits, non-uniform levels: closer
    /// than q4_0, ~16× its time to quantise), ggml's block formats. CPU backends only (on a GPU use
    /// `--dtype f16`).
    #[arg(long, default_value = "none")]
    pub quant: Quantization,
    /// Activations of quantised weights (Q8_0, Q4_0/1, Q5_0/1, Q2_K-Q6_K, IQ4_NL, IQ4_XS) on CPU
    /// backends: `f32` keeps the result equal to the dequantised weights' product; `q8` rounds
    /// them to 8 bits (one scale per 32 values, per 256 for the K-quants) and multiplies
    /// integers, as llama.cpp does, in decode steps and, where that is faster, in prefill
    /// (1.1–1.4× faster decode on SmolLM2 Q4_1, whose logits moved by up to 1.4; 1.9–2.5×
    /// decode and 1.3–1.4× prefill on a TinyLlama-shaped Q4_K_M file; bench/README.md).
    #[arg(long, default_value = "f32")]
    pub activations: ActivationPrecision,
}

impl PrecisionArgs {
    /// The load options these flags describe.
    pub fn to_options(&self) -> LoadOptions {
        LoadOptions::default()
            .with_dtype(self.dtype)
            .with_quantization(self.quant)
            .with_activations(self.activations)
    }
}
