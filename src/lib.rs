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
