//! Encoder-decoder models (T5, M2M100/NLLB): the [`Seq2SeqLm`] trait, the decoder cache they
//! share, and generation (greedy or sampled here, beam search in [`crate::beam`]).
//!
//! The encoder runs once per input; the decoder keeps a self-attention [`KvCache`] per layer and
//! the cross-attention keys/values computed once from the encoder output. Batches are
//! right-padded; the encoder padding mask hides padding from both attentions over the source.

use burn::prelude::*;

use crate::beam::beam_search;
use crate::generate::{FinishReason, Generation, GenerationConfig, StreamControl, TokenEvent};
use crate::nn::{AttentionMask, KvCache};
use crate::sampling::Sampler;
use crate::tokenizer::{TokenStream, Tokenizer};
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

/// One generated sequence.
#[derive(Debug, Clone, PartialEq)]
pub struct Seq2SeqOutput {
    /// Generated tokens: the decoder start token excluded; a forced first token and an EOS that
    /// ended the sequence included.
    pub tokens: Vec<u32>,
    /// Decoded text of `tokens` (special tokens skipped, cut at a stop string), when a
    /// tokenizer was given.
    pub text: Option<String>,
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
/// EOS ids left to the model (`None`) are [`Seq2SeqLm::eos_token_ids`].
pub fn generate_seq2seq<B: Backend, M: Seq2SeqLm<B>>(
    model: &M,
    inputs: &[Vec<u32>],
    config: &GenerationConfig,
) -> Result<Vec<Seq2SeqOutput>> {
    run(model, inputs, config, None, None)
}

/// [`generate_seq2seq`] with each new token reported as it is chosen, as
/// [`generate_tokens`](crate::generate_tokens) does for decoder-only models: `on_token` sees a
/// [`TokenEvent`] (row, id, and the text the token makes final when `tokenizer` is given; stop
/// strings need it) and returns `()`, or a [`ControlFlow`](std::ops::ControlFlow) whose `Break`
/// ends that row after the token ([`FinishReason::Cancelled`]). Greedy and sampled decoding
/// only: beam search knows its tokens at the end, so `num_beams > 1` is an error here (as HF's
/// `generate` refuses a streamer with beams).
pub fn generate_seq2seq_streaming<B: Backend, M: Seq2SeqLm<B>, R: StreamControl>(
    model: &M,
    inputs: &[Vec<u32>],
    config: &GenerationConfig,
    tokenizer: Option<&Tokenizer>,
    mut on_token: impl FnMut(TokenEvent<'_>) -> R,
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
        tokenizer,
        Some(&mut |event| on_token(event).proceed()),
    )
}

/// Both of the above: `on_token` (greedy and sampled only) returns whether the row goes on.
fn run<B: Backend, M: Seq2SeqLm<B>>(
    model: &M,
    inputs: &[Vec<u32>],
    config: &GenerationConfig,
    tokenizer: Option<&Tokenizer>,
    mut on_token: Option<&mut dyn FnMut(TokenEvent<'_>) -> bool>,
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
    if !config.stop_strings.is_empty() && (tokenizer.is_none() || config.num_beams > 1) {
        return Err(Error::arg(
            "stop_strings",
            "need a tokenizer to match text, and greedy or sampled decoding",
        ));
    }
    check_ids(inputs, model.vocab_size())?;
    let config = &config
        .clone()
        .resolve(model.eos_token_ids(), Some(model.pad_token_id()));
    let device = model.device();
    let (ids, padding) = pad_batch::<B>(inputs, model.pad_token_id(), &device)?;
    let encoder = model.encode(ids, padding);
    if config.num_beams > 1 {
        return beam_search(model, &encoder, config);
    }

    let batch = inputs.len();
    let start = model.decoder_start_token_id();
    let pad = config.pad();
    // One sampler per row, each from the configured seed: a row samples the same tokens
    // whatever else is in the batch (as `generate` does for decoder-only models).
    let mut samplers: Vec<Sampler> = (0..batch)
        .map(|_| Sampler::new(config.sampling.clone()))
        .collect::<Result<_>>()?;
    let mut cache = model.new_decoder_cache(&encoder);
    let mut seqs = vec![vec![start]; batch];
    let mut outputs: Vec<Generation> = (0..batch)
        .map(|_| Generation::start(tokenizer.is_some()))
        .collect();
    let mut streams = vec![TokenStream::new(); batch];
    let mut done = vec![false; batch];
    let mut report = |event: TokenEvent<'_>| on_token.as_mut().is_none_or(|f| f(event));
    for step in 0..config.max_new_tokens {
        let last: Vec<i64> = seqs.iter().map(|s| *s.last().unwrap() as i64).collect();
        let tokens = Tensor::from_data(TensorData::new(last, [batch, 1]), &device);
        let rows = host_rows(model.decode_step(tokens, &mut cache));
        for (row, mut logits) in rows.into_iter().enumerate() {
            // Finished rows are fed padding, as HF does; their output is ignored.
            if done[row] {
                seqs[row].push(pad);
                continue;
            }
            config.process_logits(&mut logits, &seqs[row], step);
            let token = match config.forced_bos_token_id {
                Some(t) if step == 0 => t,
                _ => samplers[row].sample(&mut logits, &seqs[row]),
            };
            seqs[row].push(token);
            done[row] = outputs[row].step(
                row,
                token,
                config,
                tokenizer,
                &mut streams[row],
                &mut report,
            )?;
        }
        if done.iter().all(|&d| d) {
            break;
        }
    }
    for (row, out) in outputs.iter_mut().enumerate() {
        out.flush_events(row, tokenizer, &mut streams[row], &mut report)?;
    }
    Ok(outputs
        .into_iter()
        .map(|g| Seq2SeqOutput {
            tokens: g.tokens,
            text: g.text,
            score: None,
            finish: g.finish,
        })
        .collect())
}
