//! # kiln
//!
//! A model zoo for [Burn](https://burn.dev): Llama 1/2/3.x, Mistral and Yi (T5, NLLB and the
//! ensemble/anchor/distill crates build on the same core), written once, generic over
//! `B: Backend`, loading Hugging Face checkpoints and matching `transformers` to the last logit.
//!
//! This crate is the application layer: the `kiln` CLI, examples and integration tests. It
//! re-exports the library crates and, unlike them, picks a backend through cargo features
//! (`flex` by default; `ndarray`, `wgpu`, `vulkan`, `metal`, `cuda`). A Burn program that embeds
//! kiln depends on the library crates instead (`kiln-auto` loads any model in one call) and
//! keeps its own backend.
//!
//! ```no_run
//! use kiln::backend::{Backend, device};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // A folder, hub id or .gguf file; its tokenizer and generation_config.json come along.
//! let loaded = kiln::auto::load::<Backend>("HuggingFaceTB/SmolLM2-135M-Instruct", &device())?;
//! let tokenizer = loaded.tokenizer.as_ref().ok_or("no tokenizer")?;
//! let prompt = tokenizer.encode("Once upon a time", true)?;
//! let config = loaded.generation_config(&Default::default()).with_max_new_tokens(32);
//! kiln::core::generate(&loaded.model, &[prompt], &config, Some(tokenizer), |_, piece| {
//!     print!("{piece}")
//! })?;
//! # Ok(()) }
//! ```

pub use kiln_anchor as anchor;
pub use kiln_auto as auto;
pub use kiln_core as core;
pub use kiln_distill as distill;
pub use kiln_ensemble as ensemble;
pub use kiln_llama as llama;
pub use kiln_m2m100 as m2m100;
pub use kiln_serve as serve;
pub use kiln_t5 as t5;

pub mod backend;

// The README's Rust snippets compile as doctests, so they cannot drift from the API.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

/// The entry points that the CLI, the examples and the tests call, compiled here once for this
/// build's backend. Where rustc shares generic instances (dev and test builds, see build.rs), a
/// crate that calls one links this copy instead of compiling its own, and with it every tensor
/// op it reaches. On the CubeCL backends those ops are generic over the runtime, so each
/// example, the CLI and each test binary compiled them all again: on wgpu `examples/generate`
/// took 115 s to build, now 2 s, for 115 s here once.
// `inline(never)`: a function this small is otherwise treated as `#[inline]` across crates, and
// is then compiled only where it is called, which is nowhere.
#[cfg(kiln_share_generics)]
#[doc(hidden)]
#[inline(never)]
pub fn instances() -> [*const (); 8] {
    use backend::Backend as B;
    [
        kiln_auto::load::<B> as *const (),
        kiln_auto::load_with::<B> as *const (),
        kiln_auto::load_seq2seq::<B> as *const (),
        kiln_auto::load_seq2seq_with::<B> as *const (),
        kiln_core::generate::<B, kiln_llama::Llama<B>, ()> as fn(_, _, _, _, fn(usize, &str)) -> _
            as *const (),
        kiln_core::seq2seq::generate_seq2seq::<B, kiln_t5::T5<B>> as *const (),
        kiln_core::seq2seq::generate_seq2seq::<B, kiln_m2m100::M2M100<B>> as *const (),
        kiln_m2m100::translate::<B> as *const (),
    ]
}
