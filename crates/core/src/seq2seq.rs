//! Encoder-decoder models (T5, M2M100/NLLB): the [`Seq2SeqLm`] trait, the decoder cache they
//! share, and generation (greedy or sampled here, beam search in [`crate::beam`]).
//!
//! The encoder runs once per input; the decoder keeps a self-attention [`KvCache`] per layer and
//! the cross-attention keys/values computed once from the encoder output. Batches are
//! right-padded; the encoder padding mask hides padding from both attentions over the source.

use burn::prelude::*;

use crate::beam::{BeamConfig, beam_search};
use crate::generate::{FinishReason, StreamControl};
use crate::nn::{AttentionMask, KvCache};
use crate::sampling::{Sampler, SamplingConfig};
use crate::{Error, Result};

/// The encoder's output for a batch.
#[derive(Debug, Clone)]
pub struct EncoderOutput<B: Backend> {
    /// Last hidden states `[batch, src_len, d_model]` (after the final norm).
    pub hidden: Tensor<B, 3>,
    /// `[batch, 1, 1, src_len]`, `true` on padding; `None` when no row is padded.
    pub mask: Option<AttentionMask<B>>,
}

/// Decoder state shared by kiln's encoder-decoder models: one self-attention cache per layer,
/// each layer's cross-attention keys and values (`[batch, heads, src_len, head_dim]`), the
/// encoder padding mask and the number of decoder positions seen.
#[derive(Debug, Clone)]
pub struct DecoderCache<B: Backend> {
    /// Per-layer self-attention keys/values.
    pub self_attn: Vec<KvCache<B>>,
    /// Per-layer cross-attention keys and values, computed once from the encoder output.
    pub cross: Vec<(Tensor<B, 4>, Tensor<B, 4>)>,
    /// Encoder padding mask `[batch, 1, 1, src_len]` (`true` hides a key).
    pub encoder_mask: Option<AttentionMask<B>>,
    /// Decoder positions already fed.
    pub seen: usize,
}

impl<B: Backend> DecoderCache<B> {
    /// Rebuilds the batch from rows `indices` (row `i` becomes old row `indices[i]`).
    pub fn select_rows(&mut self, indices: Tensor<B, 1, Int>) {
        for kv in &mut self.self_attn {
            kv.select_rows(indices.clone());
        }
        for (k, v) in &mut self.cross {
            *k = k.clone().select(0, indices.clone());
            *v = v.clone().select(0, indices.clone());
        }
        self.encoder_mask = self
            .encoder_mask
            .take()
            .map(|m| m.select(0, indices.clone()));
    }

    /// Rows in the batch.
    pub fn batch(&self) -> usize {
        self.cross.first().map_or(0, |(k, _)| k.dims()[0])
    }
}

/// An encoder-decoder language model.
pub trait Seq2SeqLm<B: Backend> {
    /// Decoder state carried between steps.
    type Cache: Clone;

    /// Runs the encoder over `input_ids` `[batch, src_len]`; `padding` (`[batch, src_len]`,
    /// `true` on padding) masks right padding.
    fn encode(
        &self,
        input_ids: Tensor<B, 2, Int>,
        padding: Option<Tensor<B, 2, Bool>>,
    ) -> EncoderOutput<B>;

    /// A fresh decoder cache; computes each layer's cross-attention keys/values.
    fn new_decoder_cache(&self, encoder: &EncoderOutput<B>) -> Self::Cache;

    /// Feeds decoder `tokens` `[batch, new]` after what `cache` holds (causal among the new
    /// tokens) and returns logits `[batch, new, vocab]`.
    fn decode_step(&self, tokens: Tensor<B, 2, Int>, cache: &mut Self::Cache) -> Tensor<B, 3>;

    /// Rebuilds the cache's batch from rows `indices` (beam expansion and reordering).
    fn reorder_cache(&self, cache: &mut Self::Cache, indices: Tensor<B, 1, Int>);

    /// The token the decoder starts from.
    fn decoder_start_token_id(&self) -> u32;

    /// Tokens that end a sequence.
    fn eos_token_ids(&self) -> Vec<u32>;

    /// The padding token (source padding and finished rows).
    fn pad_token_id(&self) -> u32;

    /// Logits width.
    fn vocab_size(&self) -> usize;

    /// The device the weights live on.
    fn device(&self) -> B::Device;
}

/// How an encoder-decoder model generates.
#[derive(Debug, Clone, PartialEq)]
pub struct Seq2SeqConfig {
    /// Upper bound on generated tokens (the decoder start token not counted).
    pub max_new_tokens: usize,
    /// Token choice when `num_beams == 1`.
    pub sampling: SamplingConfig,
    /// Beam width; `1` is greedy/sampling.
    pub num_beams: usize,
    /// Beam score = sum of log-probs / generated_len^length_penalty (HF semantics).
    pub length_penalty: f32,
    /// HF `early_stopping=True`: a batch row stops once it has `num_beams` finished hypotheses.
    pub early_stopping: bool,
    /// Forbid repeating any n-gram of this size (`0` = off), as HF `no_repeat_ngram_size`.
    pub no_repeat_ngram_size: usize,
    /// Force this token as the first generated one (NLLB's target language).
    pub forced_bos_token_id: Option<u32>,
    /// EOS ids; `None` uses the model's.
    pub eos_token_ids: Option<Vec<u32>>,
}

impl Default for Seq2SeqConfig {
    fn default() -> Self {
        Self {
            max_new_tokens: 128,
            sampling: SamplingConfig::greedy(),
            num_beams: 1,
            length_penalty: 1.0,
            early_stopping: true,
            no_repeat_ngram_size: 0,
            forced_bos_token_id: None,
            eos_token_ids: None,
        }
    }
}

impl Seq2SeqConfig {
    /// Sets `max_new_tokens`.
    pub fn with_max_new_tokens(mut self, n: usize) -> Self {
        self.max_new_tokens = n;
        self
    }
    /// Sets the sampling config.
    pub fn with_sampling(mut self, sampling: SamplingConfig) -> Self {
        self.sampling = sampling;
        self
    }
    /// Sets the beam width.
    pub fn with_num_beams(mut self, n: usize) -> Self {
        self.num_beams = n;
        self
    }
    /// Sets the length penalty.
    pub fn with_length_penalty(mut self, p: f32) -> Self {
        self.length_penalty = p;
        self
    }
    /// Sets early stopping.
    pub fn with_early_stopping(mut self, on: bool) -> Self {
        self.early_stopping = on;
        self
    }
    /// Sets `no_repeat_ngram_size`.
    pub fn with_no_repeat_ngram_size(mut self, n: usize) -> Self {
        self.no_repeat_ngram_size = n;
        self
    }
    /// Sets the forced first token.
    pub fn with_forced_bos_token_id(mut self, id: Option<u32>) -> Self {
        self.forced_bos_token_id = id;
        self
    }
    /// Sets the EOS ids.
    pub fn with_eos_token_ids(mut self, ids: Vec<u32>) -> Self {
        self.eos_token_ids = Some(ids);
        self
    }

    /// Checks the fields are in range.
    pub fn validate(&self) -> Result<()> {
        if self.num_beams == 0 {
            return Err(Error::arg("num_beams", "must be at least 1"));
        }
        if !self.length_penalty.is_finite() {
            return Err(Error::arg("length_penalty", "must be finite"));
        }
        self.sampling.validate()
    }
}

/// One generated sequence.
#[derive(Debug, Clone, PartialEq)]
pub struct Seq2SeqOutput {
    /// Generated tokens: the decoder start token excluded; a forced first token and an EOS that
    /// ended the sequence included.
    pub tokens: Vec<u32>,
    /// Beam search's length-penalised score (HF `sequences_scores`); `None` otherwise.
    pub score: Option<f32>,
    /// Why it stopped.
    pub finish: FinishReason,
}

/// Right-padded ids `[batch, len]` and the padding mask (`true` on padding) when any row is
/// padded.
pub type PaddedBatch<B> = (Tensor<B, 2, Int>, Option<Tensor<B, 2, Bool>>);

/// The self-attention mask of `new` decoder tokens after `past` cached ones,
/// `[1, 1, new, past + new]` (`true` hides a later key); `None` for one token, which sees all.
pub fn decoder_causal_mask<B: Backend>(
    past: usize,
    new: usize,
    device: &B::Device,
) -> Option<Tensor<B, 4, Bool>> {
    let total = past + new;
    (new > 1).then(|| {
        let hidden: Vec<bool> = (0..new)
            .flat_map(|q| (0..total).map(move |k| k > past + q))
            .collect();
        Tensor::from_data(TensorData::new(hidden, [1, 1, new, total]), device)
    })
}

/// Right-pads `inputs` with `pad` into `[batch, max_len]` ids and a padding mask (`true` on
/// padding; `None` when all rows have the same length).
pub fn pad_batch<B: Backend>(
    inputs: &[Vec<u32>],
    pad: u32,
    device: &B::Device,
) -> Result<PaddedBatch<B>> {
    if inputs.is_empty() {
        return Err(Error::arg("inputs", "no input sequences"));
    }
    if let Some(row) = inputs.iter().position(|r| r.is_empty()) {
        return Err(Error::arg("inputs", format!("input {row} is empty")));
    }
    let width = inputs.iter().map(Vec::len).max().unwrap_or(0);
    let mut ids = Vec::with_capacity(inputs.len() * width);
    let mut padding = Vec::with_capacity(inputs.len() * width);
    for row in inputs {
        ids.extend(row.iter().map(|&t| t as i64));
        ids.extend(std::iter::repeat_n(pad as i64, width - row.len()));
        padding.extend(std::iter::repeat_n(false, row.len()));
        padding.extend(std::iter::repeat_n(true, width - row.len()));
    }
    let shape = [inputs.len(), width];
    let mask = padding
        .iter()
        .any(|&p| p)
        .then(|| Tensor::from_data(TensorData::new(padding, shape), device));
    Ok((Tensor::from_data(TensorData::new(ids, shape), device), mask))
}

/// Checks every id is below the model's vocabulary.
pub(crate) fn check_ids(inputs: &[Vec<u32>], vocab: usize) -> Result<()> {
    for (row, ids) in inputs.iter().enumerate() {
        if let Some(&bad) = ids.iter().find(|&&t| t as usize >= vocab) {
            return Err(Error::arg(
                "inputs",
                format!("input {row} has token id {bad}, outside the vocabulary of {vocab}"),
            ));
        }
    }
    Ok(())
}

/// HF's `NoRepeatNGramLogitsProcessor`: sets to `-inf` every token that would complete an
/// n-gram already present in `seq` (the decoder sequence, start token included).
pub fn ban_repeated_ngrams(scores: &mut [f32], seq: &[u32], n: usize) {
    if n == 0 || seq.len() + 1 < n {
        return;
    }
    let prefix = &seq[seq.len() + 1 - n..];
    for window in seq.windows(n) {
        if &window[..n - 1] == prefix {
            let t = window[n - 1] as usize;
            if t < scores.len() {
                scores[t] = f32::NEG_INFINITY;
            }
        }
    }
}

/// HF's `ForcedBOSTokenLogitsProcessor`: every score but `token`'s becomes `-inf`, `token`'s 0.
pub fn force_token(scores: &mut [f32], token: u32) {
    scores.iter_mut().for_each(|s| *s = f32::NEG_INFINITY);
    if let Some(s) = scores.get_mut(token as usize) {
        *s = 0.0;
    }
}

/// Host copy of `[batch, 1, vocab]` logits as one vector per row.
pub(crate) fn host_rows<B: Backend>(logits: Tensor<B, 3>) -> Vec<Vec<f32>> {
    let [batch, new, vocab] = logits.dims();
    let last = if new == 1 {
        logits
    } else {
        logits.narrow(1, new - 1, 1)
    };
    let flat: Vec<f32> = last
        .reshape([batch, vocab])
        .into_data()
        .convert::<f32>()
        .into_vec()
        .expect("f32 logits");
    flat.chunks_exact(vocab).map(<[f32]>::to_vec).collect()
}

/// Encodes `inputs` (token ids, one row each; rows may differ in length) and generates for all
/// of them in one batch: beam search when `config.num_beams > 1`, else greedy or sampled.
pub fn generate_seq2seq<B: Backend, M: Seq2SeqLm<B>>(
    model: &M,
    inputs: &[Vec<u32>],
    config: &Seq2SeqConfig,
) -> Result<Vec<Seq2SeqOutput>> {
    run(model, inputs, config, None)
}

/// [`generate_seq2seq`] with each new token streamed as it is chosen: `on_token(row, id)`
/// returns `()`, or a [`ControlFlow`](std::ops::ControlFlow) whose `Break` ends that row after
/// the token ([`FinishReason::Cancelled`]), as in [`generate`](crate::generate()). Greedy and
/// sampled decoding only: beam search knows its tokens at the end, so `num_beams > 1` is an
/// error here (as HF's `generate` refuses a streamer with beams).
pub fn generate_seq2seq_streaming<B: Backend, M: Seq2SeqLm<B>, R: StreamControl>(
    model: &M,
    inputs: &[Vec<u32>],
    config: &Seq2SeqConfig,
    mut on_token: impl FnMut(usize, u32) -> R,
) -> Result<Vec<Seq2SeqOutput>> {
    if config.num_beams > 1 {
        return Err(Error::arg(
            "num_beams",
            format!(
                "{}: beam search cannot stream its tokens; use generate_seq2seq",
                config.num_beams
            ),
        ));
    }
    run(
        model,
        inputs,
        config,
        Some(&mut |row, token| on_token(row, token).proceed()),
    )
}

/// Both of the above: `on_token` (greedy and sampled only) returns whether the row goes on.
fn run<B: Backend, M: Seq2SeqLm<B>>(
    model: &M,
    inputs: &[Vec<u32>],
    config: &Seq2SeqConfig,
    mut on_token: Option<&mut dyn FnMut(usize, u32) -> bool>,
) -> Result<Vec<Seq2SeqOutput>> {
    config.validate()?;
    if let Some(t) = config.forced_bos_token_id
        && t as usize >= model.vocab_size()
    {
        return Err(Error::arg(
            "forced_bos_token_id",
            format!("{t} is outside the vocabulary of {}", model.vocab_size()),
        ));
    }
    check_ids(inputs, model.vocab_size())?;
    let device = model.device();
    let (ids, padding) = pad_batch::<B>(inputs, model.pad_token_id(), &device)?;
    let encoder = model.encode(ids, padding);
    let eos = config
        .eos_token_ids
        .clone()
        .unwrap_or_else(|| model.eos_token_ids());
    if config.num_beams > 1 {
        let beam = BeamConfig {
            num_beams: config.num_beams,
            length_penalty: config.length_penalty,
            early_stopping: config.early_stopping,
            no_repeat_ngram_size: config.no_repeat_ngram_size,
            max_new_tokens: config.max_new_tokens,
            eos_token_ids: eos,
            forced_bos_token_id: config.forced_bos_token_id,
        };
        return beam_search(model, &encoder, &beam);
    }

    let batch = inputs.len();
    let start = model.decoder_start_token_id();
    let pad = model.pad_token_id();
    // One sampler per row, each from the configured seed: a row samples the same tokens
    // whatever else is in the batch (as `generate` does for decoder-only models).
    let mut samplers: Vec<Sampler> = (0..batch)
        .map(|_| Sampler::new(config.sampling.clone()))
        .collect::<Result<_>>()?;
    let mut cache = model.new_decoder_cache(&encoder);
    let mut seqs = vec![vec![start]; batch];
    let mut finish: Vec<Option<FinishReason>> = vec![None; batch];
    // Tokens a cancelled row keeps (the start token excluded).
    let mut cancelled_at = vec![0usize; batch];
    for step in 0..config.max_new_tokens {
        let last: Vec<i64> = seqs.iter().map(|s| *s.last().unwrap() as i64).collect();
        let tokens = Tensor::from_data(TensorData::new(last, [batch, 1]), &device);
        let rows = host_rows(model.decode_step(tokens, &mut cache));
        for (row, mut logits) in rows.into_iter().enumerate() {
            // Finished rows are fed padding, as HF does; their output is ignored.
            if finish[row].is_some() {
                seqs[row].push(pad);
                continue;
            }
            ban_repeated_ngrams(&mut logits, &seqs[row], config.no_repeat_ngram_size);
            let token = match config.forced_bos_token_id {
                Some(t) if step == 0 => t,
                _ => samplers[row].sample(&mut logits, &seqs[row]),
            };
            seqs[row].push(token);
            let go_on = on_token.as_mut().is_none_or(|f| f(row, token));
            if eos.contains(&token) {
                finish[row] = Some(FinishReason::Eos);
            } else if !go_on {
                finish[row] = Some(FinishReason::Cancelled);
                cancelled_at[row] = seqs[row].len() - 1;
            }
        }
        if finish.iter().all(Option::is_some) {
            break;
        }
    }
    Ok(seqs
        .into_iter()
        .zip(finish)
        .zip(cancelled_at)
        .map(|((seq, finish), cancelled_at)| {
            let mut tokens = seq[1..].to_vec();
            match finish {
                Some(FinishReason::Cancelled) => tokens.truncate(cancelled_at),
                Some(_) => {
                    let end = tokens.iter().position(|t| eos.contains(t)).unwrap_or(0);
                    tokens.truncate(end + 1);
                }
                None => {}
            }
            Seq2SeqOutput {
                tokens,
                score: None,
                finish: finish.unwrap_or(FinishReason::Length),
            }
        })
        .collect())
}
