//! # kiln-ensemble
//!
//! Training-free ensembling of heterogeneous language models: **DeePEn** ("Ensemble Learning
//! for Heterogeneous Large Language Models with Deep Parallel Collaboration", arXiv
//! 2404.12715), with the GaC (union-vocabulary probability averaging) and UniTE (top-k union)
//! baselines behind the same API.
//!
//! DeePEn maps every member's next-token distribution into a space all members share, the
//! *relative representation* over anchor tokens (the tokens every vocabulary has), averages
//! there, and maps the average back to the main model's vocabulary by a few gradient steps on
//! its logits (Burn autodiff). Members keep their own token streams and KV caches; after each
//! chosen token every member is fed the new text as its own tokens, re-tokenising only the
//! last unfinished word.
//!
//! ```no_run
//! # fn main() -> kiln_ensemble::Result<()> {
//! use burn::backend::NdArray;
//! use kiln_core::{CausalLm, GenerationConfig, Tokenizer};
//! use kiln_ensemble::{DecoderMember, Ensemble, EnsembleConfig, Member};
//! use kiln_llama::Llama;
//!
//! let device = Default::default();
//! let member = |dir: &str| -> kiln_ensemble::Result<Box<dyn Member<NdArray>>> {
//!     let dir = std::path::Path::new(dir);
//!     let model = Llama::<NdArray>::from_pretrained(dir, &device)?;
//!     let embeddings = model.model.embed_tokens.dense_weight();
//!     let eos = model.config().eos_token_ids.clone();
//!     let tokenizer = Tokenizer::from_dir(dir)?;
//!     Ok(Box::new(DecoderMember::new(dir.display().to_string(), model, tokenizer, embeddings, eos)))
//! };
//! let mut ensemble = Ensemble::new(vec![member("llama-2-7b")?, member("mistral-7b")?], EnsembleConfig::default())?;
//! // kiln-core's one generation config; EOS left to the main model.
//! let config = GenerationConfig::default().with_max_new_tokens(16);
//! let out = ensemble.generate(&["The capital of France is"], &config)?;
//! println!("{}", out.text);
//! # Ok(()) }
//! ```

mod ensemble;
mod error;
pub mod eval;
mod member;
pub mod relative;
pub mod search;
pub mod vocab;

pub use ensemble::{
    Ensemble, EnsembleConfig, EnsembleOutput, Method, check_weights, deepen_combine,
    relative_average, weights_from_scores,
};
pub use error::{EnsembleError, Result};
pub use member::{DecoderMember, Member, Seq2SeqMember};
pub use relative::{
    PackedRelative, RelativeConfig, RelativeMatrix, SparseRelative, anchor_consistency,
    keep_consistent_anchors,
};
pub use search::{SearchConfig, SearchGradient, SearchOptimizer, inverse_search};
pub use vocab::{AnchorConfig, AnchorMatching, Anchors, Spelling, Vocab, find_anchors};
