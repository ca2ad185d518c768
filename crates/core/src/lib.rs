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
//!
//! The generation loop takes any [`CausalLm`] (kiln-llama's models, or your own), and the
//! sampler works on plain logits:
//!
//! ```
//! use burn::prelude::Backend;
//! use kiln_core::{CausalLm, GenerationConfig, Sampler, SamplingConfig, Tokenizer, generate};
//!
//! /// Sampled text from any kiln decoder, with EOS and pad from the model's config.
//! fn complete<B: Backend, M: CausalLm<B>>(
//!     model: &M,
//!     tokenizer: &Tokenizer,
//!     prompt: &str,
//! ) -> kiln_core::Result<String> {
//!     let ids = tokenizer.encode(prompt, true)?;
//!     let sampling = SamplingConfig::default().with_temperature(0.7).with_top_p(Some(0.9));
//!     // EOS and padding are left to the model: generation stops where its config says.
//!     let config = GenerationConfig::default()
//!         .with_sampling(sampling)
//!         .with_max_new_tokens(32);
//!     let out = generate(model, &[ids], &config, Some(tokenizer), |_, _piece| {})?;
//!     tokenizer.decode(&out[0].tokens, true)
//! }
//!
//! // Greedy picks the largest logit; a seeded sampler repeats its draws.
//! let mut greedy = Sampler::new(SamplingConfig::greedy())?;
//! assert_eq!(greedy.sample(&mut [0.1, 2.0, -1.0, 0.5], &[]), 1);
//! let seeded = SamplingConfig::default().with_temperature(1.5).with_seed(7);
//! let draws = |mut s: Sampler| (0..8).map(|_| s.sample(&mut [0.1, 2.0, -1.0, 0.5], &[])).collect::<Vec<_>>();
//! assert_eq!(draws(Sampler::new(seeded.clone())?), draws(Sampler::new(seeded)?));
//! # Ok::<(), kiln_core::Error>(())
//! ```

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
pub use generate::{
    CausalLm, FinishReason, Generation, GenerationConfig, StreamControl, TokenEvent, generate,
    generate_tokens,
};
pub use sampling::{Sampler, SamplingConfig};
pub use tokenizer::{Message, TokenStream, Tokenizer};
