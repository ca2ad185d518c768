//! Scoring: perplexity and multiple-choice log-likelihood, full attention vs anchors.

use std::time::Instant;

use burn::prelude::*;
use burn::tensor::activation::log_softmax;
use kiln_llama::Llama;

use crate::infer::Session;
use crate::{AnchorError, AnchorSet, Result, Segments};

/// Log-probabilities of `targets` under `logits` `[n, vocab]` (row `i` predicts `targets[i]`).
pub fn token_logprobs<B: Backend>(logits: Tensor<B, 2>, targets: &[u32]) -> Result<Vec<f32>> {
    let [n, _] = logits.dims();
    if n != targets.len() {
        return Err(AnchorError::arg(
            "logits",
            format!("{n} logit rows for {} targets", targets.len()),
        ));
    }
    let device = logits.device();
    let ids: Vec<i64> = targets.iter().map(|&t| t as i64).collect();
    let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [n, 1]), &device);
    log_softmax(logits, 1)
        .gather(1, ids)
        .into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .map_err(|e| AnchorError::arg("logits", format!("logits: {e:?}")))
}

/// Summed negative log-likelihood and the number of tokens it covers.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Nll {
    /// Sum of `-log p`.
    pub sum: f64,
    /// Tokens counted.
    pub count: usize,
}

impl Nll {
    /// `exp(sum / count)`.
    pub fn perplexity(&self) -> f64 {
        (self.sum / self.count.max(1) as f64).exp()
    }

    fn add(&mut self, logprobs: &[f32], targets: &[u32], skip: &dyn Fn(u32) -> bool) {
        for (&lp, &t) in logprobs.iter().zip(targets) {
            if !skip(t) {
                self.sum -= lp as f64;
                self.count += 1;
            }
        }
    }
}

/// Teacher-forced NLL of each row's tokens after the first, in one full forward per row with
/// the AnSAN mask (`anchors` given) or the plain causal mask (`None`). Targets for which
/// `skip` is true (e.g. `<AC>`) are not counted.
pub fn nll_masked<B: Backend>(
    model: &Llama<B>,
    rows: &[Vec<u32>],
    anchors: Option<&AnchorSet>,
    skip: &dyn Fn(u32) -> bool,
) -> Result<Nll> {
    let device = model.device_of();
    let mut nll = Nll::default();
    for row in rows.iter().filter(|r| r.len() >= 2) {
        let n = row.len();
        let seg = Segments::from_rows(std::slice::from_ref(row), anchors, 0);
        let ids: Vec<i64> = row.iter().map(|&t| t as i64).collect();
        let tokens = Tensor::from_data(TensorData::new(ids, [1, n]), &device);
        let positions = Tensor::arange(0..n as i64, &device).reshape([1, n]);
        let logits = model.forward_masked(tokens, positions, Some(seg.mask(&device)), None)?;
        let vocab = logits.dims()[2];
        let logits = logits.reshape([n, vocab]).narrow(0, 0, n - 1);
        let lp = token_logprobs(logits, &row[1..])?;
        nll.add(&lp, &row[1..], skip);
    }
    Ok(nll)
}

/// NLL of each row's tokens after the first, fed one token at a time through a fresh session
/// from `new_session` (incremental decoding: anchor compaction happens as it would when
/// generating).
pub fn nll_streamed<B: Backend, S: Session<B>>(
    rows: &[Vec<u32>],
    mut new_session: impl FnMut() -> S,
    skip: &dyn Fn(u32) -> bool,
) -> Result<Nll> {
    let mut nll = Nll::default();
    for row in rows.iter().filter(|r| r.len() >= 2) {
        let mut session = new_session();
        for w in row.windows(2) {
            let lp = token_logprobs(session.feed(&w[..1])?, &w[1..])?;
            nll.add(&lp, &w[1..], skip);
        }
    }
    Ok(nll)
}

/// The paper's harness: every feed recomputes one full forward over all tokens so far under
/// the AnSAN mask (or the plain causal mask without anchors) at their true positions 0..n,
/// with no KV cache, as lm-evaluation-harness scores context + option in one forward. Slow
/// (quadratic in the prompt) and exact; [`AnchorSession`](crate::AnchorSession) with
/// [`PositionMode::True`](crate::PositionMode::True) gives the same logits with a compacted
/// cache (tested).
#[derive(Debug, Clone)]
pub struct MaskedSession<'m, B: Backend> {
    model: &'m Llama<B>,
    anchors: Option<AnchorSet>,
    tokens: Vec<u32>,
}

impl<'m, B: Backend> MaskedSession<'m, B> {
    /// An empty session; `anchors` `None` is plain causal attention.
    pub fn new(model: &'m Llama<B>, anchors: Option<AnchorSet>) -> Self {
        Self {
            model,
            anchors,
            tokens: Vec::new(),
        }
    }
}

impl<B: Backend> Session<B> for MaskedSession<'_, B> {
    fn feed(&mut self, tokens: &[u32]) -> Result<Tensor<B, 2>> {
        let vocab = self.model.config().vocab_size;
        if tokens.is_empty() {
            return Err(AnchorError::arg("chunk", "an empty chunk"));
        }
        if let Some(bad) = tokens.iter().find(|&&t| t as usize >= vocab) {
            return Err(AnchorError::arg(
                "chunk",
                format!("token id {bad} is outside the vocabulary of {vocab}"),
            ));
        }
        self.tokens.extend_from_slice(tokens);
        let (n, new) = (self.tokens.len(), tokens.len());
        let device = self.model.device_of();
        let seg = Segments::from_rows(std::slice::from_ref(&self.tokens), self.anchors.as_ref(), 0);
        let ids: Vec<i64> = self.tokens.iter().map(|&t| t as i64).collect();
        let ids = Tensor::from_data(TensorData::new(ids, [1, n]), &device);
        let positions = Tensor::arange(0..n as i64, &device).reshape([1, n]);
        let logits = self
            .model
            .forward_masked(ids, positions, Some(seg.mask(&device)), None)?;
        Ok(logits.reshape([n, vocab]).narrow(0, n - new, new))
    }

    /// No KV cache is kept.
    fn cache_len(&self) -> usize {
        0
    }
    fn kv_bytes(&self) -> usize {
        0
    }
}

/// One multiple-choice question, tokenized.
#[derive(Debug, Clone, PartialEq)]
pub struct Choice {
    /// The few-shot prompt and the question.
    pub context: Vec<u32>,
    /// Each option's tokens.
    pub options: Vec<Vec<u32>>,
    /// Index of the right option.
    pub answer: usize,
}

/// Accuracy and cost of multiple-choice scoring with one kind of session.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ChoiceReport {
    /// Questions answered right.
    pub correct: usize,
    /// Questions.
    pub total: usize,
    /// Mean KV-cache positions after the context (what must be kept while scoring options).
    pub mean_cache_len: f64,
    /// Mean bytes of the KV tensors after the context ([`Session::kv_bytes`]).
    pub mean_kv_bytes: f64,
    /// Mean context length in tokens.
    pub mean_context_len: f64,
    /// Seconds spent.
    pub seconds: f64,
}

impl ChoiceReport {
    /// `correct / total`.
    pub fn accuracy(&self) -> f64 {
        self.correct as f64 / self.total.max(1) as f64
    }
}

/// Multiple choice by log-likelihood, as lm-evaluation-harness (the paper's harness) scores
/// it: prefill the context once, then score each option by the summed log-likelihood of its
/// tokens given the context (from a copy of the session); the highest wins. The paper's
/// protocol is [`MaskedSession`] (or the equivalent `AnchorSession` with true positions) over
/// prompts from [`few_shot_choices`](crate::fewshot::few_shot_choices) with
/// [`PromptAnchors::Demonstrations`](crate::fewshot::PromptAnchors).
pub fn score_choices<B: Backend, S: Session<B>>(
    items: &[Choice],
    mut new_session: impl FnMut() -> S,
) -> Result<ChoiceReport> {
    let start = Instant::now();
    let mut report = ChoiceReport::default();
    let (mut cache_sum, mut ctx_sum, mut bytes_sum) = (0usize, 0usize, 0usize);
    for item in items {
        if item.context.is_empty() || item.options.iter().any(Vec::is_empty) {
            return Err(AnchorError::arg("example", "an empty context or option"));
        }
        let mut session = new_session();
        let logits = session.feed(&item.context)?;
        let n = logits.dims()[0];
        let last = logits.narrow(0, n - 1, 1);
        cache_sum += session.cache_len();
        bytes_sum += session.kv_bytes();
        ctx_sum += item.context.len();
        let mut best = (f64::NEG_INFINITY, 0);
        for (i, option) in item.options.iter().enumerate() {
            let mut s = session.clone();
            let first = token_logprobs(last.clone(), &option[..1])?[0] as f64;
            let rest = if option.len() > 1 {
                let logits = s.feed(&option[..option.len() - 1])?;
                token_logprobs(logits, &option[1..])?
                    .iter()
                    .map(|&x| x as f64)
                    .sum()
            } else {
                0.0
            };
            let total = first + rest;
            if total > best.0 {
                best = (total, i);
            }
        }
        report.correct += (best.1 == item.answer) as usize;
        report.total += 1;
    }
    report.mean_cache_len = cache_sum as f64 / items.len().max(1) as f64;
    report.mean_context_len = ctx_sum as f64 / items.len().max(1) as f64;
    report.mean_kv_bytes = bytes_sum as f64 / items.len().max(1) as f64;
    report.seconds = start.elapsed().as_secs_f64();
    Ok(report)
}

/// What one greedy decode through a session cost ([`greedy_decode`]).
#[derive(Debug, Clone, PartialEq)]
pub struct DecodeReport {
    /// The tokens chosen.
    pub tokens: Vec<u32>,
    /// Seconds for the prompt.
    pub prefill_seconds: f64,
    /// Seconds for the decode steps after it.
    pub decode_seconds: f64,
    /// KV-cache positions at the end.
    pub cache_len: usize,
    /// Bytes of the KV tensors at the end ([`Session::kv_bytes`]).
    pub kv_bytes: usize,
}

/// Greedy-decodes `steps` tokens after `prompt` through `session` (one token per feed, no EOS
/// stop: every session does the same work), timing the prompt and the steps apart. With
/// [`MaskedSession`] this is inference without a cache, which the paper compares against.
pub fn greedy_decode<B: Backend, S: Session<B>>(
    session: &mut S,
    prompt: &[u32],
    steps: usize,
) -> Result<DecodeReport> {
    let start = Instant::now();
    let logits = session.feed(prompt)?;
    let mut next = last_argmax(logits)?;
    let prefill_seconds = start.elapsed().as_secs_f64();
    let start = Instant::now();
    let mut tokens = Vec::with_capacity(steps);
    for _ in 0..steps {
        tokens.push(next);
        if tokens.len() == steps {
            break;
        }
        next = last_argmax(session.feed(&[next])?)?;
    }
    Ok(DecodeReport {
        tokens,
        prefill_seconds,
        decode_seconds: start.elapsed().as_secs_f64(),
        cache_len: session.cache_len(),
        kv_bytes: session.kv_bytes(),
    })
}

/// The argmax of the last row of `[n, vocab]` logits.
fn last_argmax<B: Backend>(logits: Tensor<B, 2>) -> Result<u32> {
    let [n, _] = logits.dims();
    let id = logits.narrow(0, n - 1, 1).argmax(1).into_data();
    id.convert::<i64>()
        .into_vec::<i64>()
        .map_err(|e| AnchorError::arg("logits", format!("logits: {e:?}")))
        .map(|v| v[0] as u32)
}

/// `model.device()` without naming the `CausalLm` trait at every call site.
trait DeviceOf<B: Backend> {
    fn device_of(&self) -> B::Device;
}

impl<B: Backend> DeviceOf<B> for Llama<B> {
    fn device_of(&self) -> B::Device {
        kiln_core::CausalLm::device(self)
    }
}
