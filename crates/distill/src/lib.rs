//! # kiln-distill
//!
//! Distilling step-by-step (Hsieh et al. 2023, arXiv 2305.02301): train a small T5 on a task's
//! labels *and* an LLM's rationales as two tasks told apart by an input prefix,
//! `predict: <input>` → label and `explain: <input>` → rationale, with the loss
//! `α·CE(label) + (1−α)·CE(rationale)`. At test time only `predict:` runs, so the rationale
//! costs nothing at inference. The baselines are standard fine-tuning (gold labels) and standard
//! distillation (the LLM's labels), both label-only.
//!
//! - [`data`]: the paper's SVAMP / CommonsenseQA files with PaLM-540B rationales, parsed by the
//!   paper's rules, and a plain JSONL format for your own teacher.
//! - [`arith`]: a safe arithmetic evaluator for SVAMP answers (no `eval`).
//! - [`train`]: the training loop on Burn autodiff (AdamW, warmup + linear decay, gradient
//!   accumulation, exact checkpoint/resume, periodic evaluation, metrics log).
//! - [`eval`]: greedy `predict:` decoding and accuracy.
//! - [`export`]: the trained student as an HF folder (transformers loads it).

pub mod arith;
pub mod data;
mod error;
pub mod eval;
pub mod export;
pub mod fit;
pub mod train;

pub use error::{DistillError, Result};
