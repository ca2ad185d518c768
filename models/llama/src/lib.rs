//! # kiln-llama
//!
//! The Llama family for Burn, written once and generic over the backend: Llama 1/2/3/3.1/3.2
//! (MHA and GQA, Llama-3 RoPE scaling, tied embeddings, attention biases), Mistral (sliding
//! window attention with a KV cache bounded to the window) and Yi (Llama architecture with its
//! own configs and tokenizer). Loads Hugging Face checkpoints; matches `transformers` logits.
//!
//! ```no_run
//! # fn main() -> kiln_core::Result<()> {
//! use burn::backend::NdArray;
//! use kiln_core::{GenerationConfig, Tokenizer, generate};
//! use kiln_llama::Llama;
//!
//! let dir = std::path::Path::new("TinyLlama-1.1B-Chat-v1.0");
//! let device = Default::default();
//! let model = Llama::<NdArray>::from_pretrained(dir, &device)?;
//! let tokenizer = Tokenizer::from_dir(dir)?;
//! let prompt = tokenizer.encode("The capital of France is", true)?;
//! let out = generate(&model, &[prompt], &GenerationConfig::default(), Some(&tokenizer), |_, t| print!("{t}"))?;
//! # Ok(()) }
//! ```

mod config;
mod gguf;
mod model;

pub use config::{LlamaConfig, LlamaFlavor};
pub use gguf::GgufWeights;
pub use model::{
    Attention, DecoderLayer, HiddenStates, LayerRope, Llama, LlamaCache, LlamaModel, Mlp,
};
