//! # kiln-core
//!
//! What every kiln model shares, written once: RMS norm, rotary embeddings (with Llama-3
//! scaling), grouped-query attention with a KV cache and causal / sliding-window / padding
//! masks, the sampling pipeline and generation loop, checkpoint loading (safetensors, sharded,
//! f32/f16/bf16, from a folder or the Hugging Face hub) and a tokenizer wrapper with chat
//! templates, and weights held on the host in the precision they ship in (f16/bf16, ggml's
//! Q8_0/Q4_0/Q4_1 blocks) with the CPU kernels that multiply by them ([`packed`], chosen at load
//! by [`loading::LoadOptions`]).
//!
//! Everything is generic over a Burn [`Backend`](burn::prelude::Backend); kiln's library crates
//! never pick one.

pub mod batching;
pub mod beam;
pub mod chat;
pub mod chat_template;
mod error;
pub mod generate;
pub mod grad_clip;
pub mod loading;
pub mod nn;
pub mod packed;
pub mod sampling;
pub mod seq2seq;
pub mod tokenizer;
mod tokenizer_class;

pub use chat::ChatSession;
pub use chat_template::{ChatTemplate, ChatTemplateInputs, TemplateLimits};
pub use error::{Error, Result, panic_message};
pub use generate::{CausalLm, FinishReason, Generation, GenerationConfig, StreamControl, generate};
pub use sampling::{Sampler, SamplingConfig};
pub use tokenizer::{Message, TokenStream, Tokenizer};
