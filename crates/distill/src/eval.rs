//! Evaluation: greedy `predict:` decoding and accuracy (exact match, or equal value for SVAMP).

use burn::prelude::*;
use kiln_core::seq2seq::{Seq2SeqLm, generate_seq2seq};
use kiln_core::{GenerationConfig, Tokenizer};
use kiln_t5::T5;

use crate::DistillError;
use crate::arith::same_value;
use crate::data::{Example, Task};
use crate::train::{Mode, encode_text, make_batch, predict_input, task_loss};

/// Accuracy over a set of examples, with the predictions.
#[derive(Debug, Clone)]
pub struct EvalResult {
    /// Correct answers.
    pub correct: usize,
    /// Examples evaluated.
    pub total: usize,
    /// `correct / total` (0 when empty).
    pub accuracy: f64,
    /// The decoded predictions, in order.
    pub predictions: Vec<String>,
}

/// Whether `pred` answers like `gold` under `task` (both trimmed).
pub fn is_correct(task: Task, pred: &str, gold: &str) -> bool {
    match task {
        Task::Text => pred.trim() == gold.trim(),
        Task::Equation => same_value(pred, gold),
    }
}

/// Options of [`evaluate`].
#[derive(Debug, Clone)]
pub struct EvalOptions {
    /// How inputs are prefixed (`predict: ` in step-by-step mode).
    pub mode: Mode,
    /// Rows per generation batch.
    pub batch_size: usize,
    /// Generated tokens at most.
    pub max_new_tokens: usize,
    /// Input tokens kept (EOS included).
    pub max_input_len: usize,
}

/// The EOS id inputs and labels end with: the model config's first.
fn first_eos<B: Backend>(model: &T5<B>) -> Result<u32, DistillError> {
    model
        .eos_token_ids()
        .first()
        .copied()
        .ok_or_else(|| DistillError::arg("model", "the model's config names no EOS token"))
}

/// Greedy-decodes the label for each example and scores it against the gold label.
pub fn evaluate<B: Backend>(
    model: &T5<B>,
    tokenizer: &Tokenizer,
    examples: &[Example],
    task: Task,
    opts: &EvalOptions,
    mut progress: impl FnMut(usize),
) -> Result<EvalResult, DistillError> {
    let eos = first_eos(model)?;
    let generation = GenerationConfig::default().with_max_new_tokens(opts.max_new_tokens);
    let mut predictions = Vec::with_capacity(examples.len());
    let mut correct = 0;
    for chunk in examples.chunks(opts.batch_size.max(1)) {
        let inputs = chunk
            .iter()
            .map(|e| {
                let input = predict_input(opts.mode, &e.input);
                encode_text(tokenizer, &input, opts.max_input_len.max(2), eos)
            })
            .collect::<Result<Vec<_>, DistillError>>()?;
        let outs = generate_seq2seq(model, &inputs, &generation)?;
        for (e, o) in chunk.iter().zip(outs) {
            // T5 pads its vocabulary past the tokenizer's (32128 rows, 32100 pieces); a
            // padding row carries no text.
            let ids: Vec<u32> = o
                .tokens
                .iter()
                .copied()
                .filter(|&t| (t as usize) < tokenizer.vocab_size())
                .collect();
            let text = tokenizer.decode(&ids, true)?;
            if is_correct(task, &text, &e.label) {
                correct += 1;
            }
            predictions.push(text);
        }
        progress(chunk.len());
    }
    let total = examples.len();
    Ok(EvalResult {
        correct,
        total,
        accuracy: if total == 0 {
            0.0
        } else {
            correct as f64 / total as f64
        },
        predictions,
    })
}

/// Teacher-forced cross-entropy of the gold labels, in nats per label token (EOS included),
/// over all of `examples`: the `predict:` input, truncated as in training, then the label cut
/// to `max_target_len` tokens. Not in the reference, which scores only accuracy; it still ranks
/// models whose greedy answers are all wrong (a fresh small T5 early in training).
pub fn label_cross_entropy<B: Backend>(
    model: &T5<B>,
    tokenizer: &Tokenizer,
    examples: &[Example],
    opts: &EvalOptions,
    max_target_len: usize,
) -> Result<f64, DistillError> {
    let eos = first_eos(model)?;
    let (max_input, max_target) = (opts.max_input_len.max(2), max_target_len.max(2));
    let (mut nats, mut tokens) = (0f64, 0usize);
    for chunk in examples.chunks(opts.batch_size.max(1)) {
        let pairs = chunk
            .iter()
            .map(|e| {
                let input = encode_text(
                    tokenizer,
                    &predict_input(opts.mode, &e.input),
                    max_input,
                    eos,
                )?;
                Ok((input, encode_text(tokenizer, &e.label, max_target, eos)?))
            })
            .collect::<Result<Vec<_>, DistillError>>()?;
        let refs: Vec<(&[u32], &[u32])> = pairs
            .iter()
            .map(|(i, l)| (i.as_slice(), l.as_slice()))
            .collect();
        let n: usize = pairs.iter().map(|(_, l)| l.len()).sum();
        let batch = make_batch(
            &refs,
            model.pad_token_id(),
            model.decoder_start_token_id(),
            &model.device(),
        );
        let mean = task_loss(model, &batch).into_scalar().elem::<f64>();
        nats += mean * n as f64;
        tokens += n;
    }
    Ok(if tokens == 0 {
        0.0
    } else {
        nats / tokens as f64
    })
}
