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
//! - [`nodes`]: training on several machines (burn-collective's global orchestrator).
//!
//! A few steps on SVAMP and an evaluation (`examples/distill.rs` is the full program):
//!
//! ```no_run
//! use burn::backend::{Autodiff, NdArray};
//! use kiln_core::Tokenizer;
//! use kiln_distill::data::load_svamp;
//! use kiln_distill::eval::{EvalOptions, evaluate};
//! use kiln_distill::train::{TrainConfig, Trainer, encode_examples};
//! use kiln_t5::T5;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let root = std::path::Path::new("datasets/step-by-step");
//! let (train, test) = (load_svamp(root, "train")?, load_svamp(root, "test")?);
//! let dir = std::path::Path::new("t5-v1_1-small");
//! let student = T5::<Autodiff<NdArray>>::from_pretrained(dir, &Default::default())?;
//! let tokenizer = Tokenizer::from_dir(dir)?;
//!
//! // The paper's defaults (AdamW 5e-5, batch 64, alpha 0.5, ...), shortened here.
//! let config = TrainConfig::default().steps(100);
//! let eos = student.config().eos_token_ids[0];
//! let (data, _dropped) = encode_examples(&tokenizer, &train.examples, &config, eos)?;
//! let mut trainer = Trainer::new(student, config.clone(), data)?;
//! for _ in 0..100 {
//!     let metrics = trainer.train_step()?;
//!     println!("step {}: loss {:.3}", metrics.step, metrics.loss);
//! }
//! let options = EvalOptions {
//!     mode: config.mode,
//!     batch_size: 16,
//!     max_new_tokens: 32,
//!     max_input_len: config.max_input_len,
//! };
//! let model = trainer.inference_model();
//! let result = evaluate(&model, &tokenizer, &test.examples, test.task, &options, |_| {})?;
//! println!("accuracy {:.1}%", 100.0 * result.accuracy);
//! # Ok(()) }
//! ```

// Builder setters of the config structs (`TrainConfig`, `NodeConfig`).
macro_rules! with {
    ($($name:ident: $t:ty),*) => {
        $(
            #[doc = concat!("Sets `", stringify!($name), "`.")]
            pub fn $name(mut self, v: $t) -> Self {
                self.$name = v;
                self
            }
        )*
    };
}

pub mod arith;
pub mod data;
mod error;
pub mod eval;
pub mod export;
pub mod fit;
pub mod nodes;
pub mod train;

pub use error::{DistillError, Result};
