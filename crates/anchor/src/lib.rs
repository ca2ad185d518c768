//! # kiln-anchor
//!
//! AnLLM, anchor-based large language models (Pang et al., 2024, arXiv 2402.07616), on any
//! kiln decoder-only model (the Llama family):
//!
//! - **Anchors** ([`AnchorSet`]): in *EP* mode existing end-of-sentence tokens (e.g. `.`); in
//!   *AC* mode a new `<AC>` token appended to the tokenizer and the embeddings
//!   ([`add_ac_token`], [`grow_vocab`]) and inserted after every sentence of the text's own
//!   encoding ([`encode_ac`], sentences from [`sentence_spans`]; none after a training
//!   document's last sentence, [`AcPlacement`]).
//! - **AnSAN mask** ([`ansan_mask`], [`Segments`]): as the paper's code, the anchor is the
//!   *last* token of its sentence. A non-anchor token sees every earlier anchor plus the earlier
//!   tokens of its own sentence; an anchor sees only its own sentence (itself included);
//!   padding is hidden. Built with tensor ops from per-token sentence ids and anchor flags.
//! - **Training** ([`train`]): continual pre-training with the AnSAN (or plain causal) mask,
//!   AdamW, warm-up + cosine schedule, gradient accumulation, exact checkpoint/resume.
//! - **Anchor-based inference** ([`AnchorSession`], batched: [`AnchorBatchSession`]): after
//!   every chunk that contains an anchor the KV cache keeps only earlier anchors, the chunk's
//!   anchors and the tokens after its last anchor. New positions come from the compacted cache
//!   length (the paper) or stay the true positions ([`PositionMode`]). A batch runs rows of
//!   different lengths in one forward, each with its own anchors, positions and compaction
//!   (padding masked out); [`anchor_generate_batch`] generates for several prompts at once.
//! - **Scoring** ([`score`]): perplexity and multiple-choice log-likelihood, full cache vs
//!   anchor cache.
//! - **Export** ([`export`], [`export_model`]): a trained model as an HF Llama folder
//!   (safetensors, config, tokenizer with `<AC>` as a special token) that transformers and
//!   kiln's normal loader read, plus `anchor.json` ([`AnchorExport`]) for anchor inference.
//!
//! ```no_run
//! use burn::backend::NdArray;
//! use kiln_anchor::{PositionMode, anchor_generate, ep_anchor_ids, kv_bytes};
//! use kiln_core::{GenerationConfig, Tokenizer};
//! use kiln_llama::Llama;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = std::path::Path::new("an-anllm-ep-checkpoint");
//! let model = Llama::<NdArray>::from_pretrained(dir, &Default::default())?;
//! let tokenizer = Tokenizer::from_dir(dir)?;
//! // EP mode: "." ends a sentence, and after each one only the anchors stay in the KV cache.
//! let anchors = ep_anchor_ids(&tokenizer, &["."])?;
//! let prompt = tokenizer.encode("The kiln was built in 1820. It fired bricks. Then", true)?;
//! // kiln-core's one generation config: greedy, stopping at the model's EOS.
//! let config = GenerationConfig::default().with_max_new_tokens(40);
//! let out = anchor_generate(
//!     &model, &prompt, &anchors, PositionMode::Compacted, &config, Some(&tokenizer),
//!     |event| print!("{}", event.text),
//! )?;
//! let bytes = kv_bytes(model.config(), out.cache_len);
//! println!("{} tokens seen; the cache holds {} ({bytes} bytes)", out.seen, out.cache_len);
//! # Ok(()) }
//! ```

mod anchors;
mod data;
mod error;
mod export;
pub mod fewshot;
mod infer;
mod mask;
mod model;
pub mod score;
mod train;

pub use anchors::{
    AC_TOKEN, AcPlacement, AnchorMode, AnchorSet, add_ac_token, encode_ac, encode_anchored,
    ep_anchor_ids, ep_anchor_ids_with_variants, sentence_spans, split_sentences,
};
pub use data::{read_texts, tokenize};
pub use error::{AnchorError, Result};
pub use export::{ANCHOR_FILE, AnchorExport, export, export_model};
pub use fewshot::{FewShotFormat, McQuestion, PromptAnchors, few_shot_choices, read_questions};
pub use infer::{
    AnchorBatchSession, AnchorGeneration, AnchorSession, FullSession, PositionMode, Session,
    anchor_generate, anchor_generate_batch, kv_bytes,
};
pub use mask::{SegTensors, Segments, ansan_mask, causal_mask};
pub use model::{
    AcInit, AnchorCheckpoint, grow_vocab, init_model, is_checkpoint, load_checkpoint,
    save_checkpoint, tiny_config,
};
pub use train::{
    Corpus, LrSchedule, MaskKind, TrainConfig, TrainReport, batch_loss, inference_model, train,
    train_steps,
};
