//! # kiln-t5
//!
//! HF `T5ForConditionalGeneration` for Burn: original T5 (ReLU feed-forward, tied embeddings
//! with the `d_model**-0.5` output scaling) and T5 v1.1 / FLAN-T5 (gated-GELU, untied LM head),
//! with relative position buckets (bidirectional in the encoder, causal in the decoder) shared
//! by all layers of a stack. Implements [`kiln_core::seq2seq::Seq2SeqLm`], so greedy, sampled
//! and beam-search decoding come from kiln-core.
//!
//! ```no_run
//! # fn main() -> kiln_core::Result<()> {
//! use burn::backend::NdArray;
//! use kiln_core::Tokenizer;
//! use kiln_core::GenerationConfig;
//! use kiln_core::seq2seq::generate_seq2seq;
//! use kiln_t5::T5;
//!
//! let dir = std::path::Path::new("flan-t5-small");
//! let model = T5::<NdArray>::from_pretrained(dir, &Default::default())?;
//! let tokenizer = Tokenizer::from_dir(dir)?;
//! let input = tokenizer.encode("translate English to German: Hello.", true)?;
//! let out = generate_seq2seq(&model, &[input], &GenerationConfig::default().with_num_beams(4))?;
//! println!("{}", tokenizer.decode(&out[0].tokens, true)?);
//! # Ok(()) }
//! ```

mod config;
// Fields are named like the checkpoint's modules (`SelfAttention`, `DenseReluDense`, ...).
#[allow(non_snake_case)]
mod model;

pub use config::{T5Activation, T5Config};
pub use model::{
    T5, T5Attention, T5Block, T5DenseReluDense, T5Layer, T5Stack, relative_position_bucket,
};
