//! Ensemble members: a model, its tokenizer and input embeddings, its own token stream and
//! cache. Decoder-only models ([`DecoderMember`]) and encoder-decoders ([`Seq2SeqMember`],
//! whose decoder stream is what the ensemble extends) share the object-safe [`Member`] trait.
//!
//! A member can take back its last generated tokens ([`Member::rewind`]) down to what it was
//! told is final ([`Member::commit`]): the ensemble needs this when a re-tokenised word changes
//! its last tokens. Rewinding restores a saved cache (Burn tensors are reference counted, and a
//! cache update makes new tensors, so a saved cache is a cheap clone); caches are saved only for
//! the uncommitted tail, a word or so.

use burn::prelude::*;
use kiln_core::seq2seq::Seq2SeqLm;
use kiln_core::{CausalLm, Tokenizer};

use crate::error::{EnsembleError, Result};

/// One model of an ensemble, with its own token stream and cache.
pub trait Member<B: Backend> {
    /// A label for messages and tables.
    fn name(&self) -> &str;
    /// Its tokenizer.
    fn tokenizer(&self) -> &Tokenizer;
    /// True for encoder-decoders: their prompt is a source text, not the start of the stream.
    fn is_encoder_decoder(&self) -> bool {
        false
    }
    /// Logits width.
    fn vocab_size(&self) -> usize;
    /// Input embedding matrix `[vocab, d]` (the relative matrix is built from it).
    fn embeddings(&self) -> Tensor<B, 2>;
    /// Device of the weights.
    fn device(&self) -> B::Device;
    /// Tokens that end its sequence.
    fn eos_token_ids(&self) -> Vec<u32>;
    /// Longest decoder stream it supports (prompt included).
    fn max_context(&self) -> usize;
    /// Starts a sequence from `prompt` (decoder-only: the prompt text, BOS added; seq2seq: the
    /// source text); returns the next-token logits `[vocab]`.
    fn start(&mut self, prompt: &str) -> Result<Tensor<B, 1>>;
    /// Starts a sequence from prompt token ids (decoder-only; seq2seq: source ids).
    fn start_ids(&mut self, prompt: &[u32]) -> Result<Tensor<B, 1>>;
    /// Prompt (decoder-only) or decoder-prefix (seq2seq) tokens fed at the start.
    fn prompt_len(&self) -> usize;
    /// Feeds generated `tokens`; returns the logits after the last one.
    fn feed(&mut self, tokens: &[u32]) -> Result<Tensor<B, 1>>;
    /// Generated tokens fed so far.
    fn generated(&self) -> &[u32];
    /// Drops generated tokens past `len` (not below the last commit); returns the logits after
    /// the new last token.
    fn rewind(&mut self, len: usize) -> Result<Tensor<B, 1>>;
    /// Declares the first `len` generated tokens final: saved caches before them are freed.
    fn commit(&mut self, len: usize);
}

/// Saved states of the uncommitted tail: `(generated length, cache, logits)`.
struct Tail<C, B: Backend> {
    saved: Vec<(usize, C, Tensor<B, 1>)>,
}

impl<C: Clone, B: Backend> Tail<C, B> {
    fn new() -> Self {
        Self { saved: Vec::new() }
    }
    fn save(&mut self, len: usize, cache: &C, logits: &Tensor<B, 1>) {
        self.saved.push((len, cache.clone(), logits.clone()));
    }
    fn restore(&mut self, len: usize, name: &str) -> Result<(C, Tensor<B, 1>)> {
        self.saved.retain(|(l, _, _)| *l <= len);
        match self.saved.last() {
            Some((l, cache, logits)) if *l == len => Ok((cache.clone(), logits.clone())),
            _ => Err(EnsembleError::arg(
                "rewind",
                format!(
                    "member `{name}` cannot rewind to {len} generated tokens (below its last commit)"
                ),
            )),
        }
    }
    fn commit(&mut self, len: usize) {
        // Keep the state at `len` itself: it is the floor a later rewind may return to.
        if let Some(keep) = self.saved.iter().rposition(|(l, _, _)| *l <= len) {
            self.saved.drain(..keep);
        }
    }
}

fn last_row<B: Backend>(logits: Tensor<B, 3>) -> Tensor<B, 1> {
    let [_, seq, vocab] = logits.dims();
    logits.narrow(1, seq - 1, 1).reshape([vocab])
}

/// A decoder-only member: any [`CausalLm`] whose cache can be cloned.
pub struct DecoderMember<B: Backend, M: CausalLm<B>> {
    name: String,
    model: M,
    tokenizer: Tokenizer,
    embeddings: Tensor<B, 2>,
    eos: Vec<u32>,
    cache: Option<M::Cache>,
    prompt_len: usize,
    generated: Vec<u32>,
    tail: Tail<M::Cache, B>,
}

impl<B: Backend, M: CausalLm<B>> DecoderMember<B, M>
where
    M::Cache: Clone,
{
    /// Wraps `model` with its tokenizer and input embedding matrix (for Llama:
    /// `model.model.embed_tokens.dense_weight()`); `eos` ends its sequences.
    pub fn new(
        name: impl Into<String>,
        model: M,
        tokenizer: Tokenizer,
        embeddings: Tensor<B, 2>,
        eos: Vec<u32>,
    ) -> Self {
        Self {
            name: name.into(),
            model,
            tokenizer,
            embeddings,
            eos,
            cache: None,
            prompt_len: 0,
            generated: Vec::new(),
            tail: Tail::new(),
        }
    }

    /// The wrapped model.
    pub fn model(&self) -> &M {
        &self.model
    }

    fn forward(&mut self, tokens: &[u32]) -> Result<Tensor<B, 1>> {
        let vocab = self.model.vocab_size();
        if let Some(bad) = tokens.iter().find(|&&t| t as usize >= vocab) {
            return Err(EnsembleError::arg(
                "tokens",
                format!(
                    "token {bad} is outside `{}`'s vocabulary of {vocab}",
                    self.name
                ),
            ));
        }
        let cache = self
            .cache
            .as_mut()
            .ok_or_else(|| EnsembleError::arg("feed", "start the member first"))?;
        let ids: Vec<i64> = tokens.iter().map(|&t| t as i64).collect();
        let input = Tensor::<B, 2, Int>::from_data(
            TensorData::new(ids, [1, tokens.len()]),
            &self.model.device(),
        );
        Ok(last_row(self.model.forward(input, cache, false)))
    }
}

impl<B: Backend, M: CausalLm<B>> Member<B> for DecoderMember<B, M>
where
    M::Cache: Clone,
{
    fn name(&self) -> &str {
        &self.name
    }
    fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }
    fn vocab_size(&self) -> usize {
        self.model.vocab_size()
    }
    fn embeddings(&self) -> Tensor<B, 2> {
        self.embeddings.clone()
    }
    fn device(&self) -> B::Device {
        self.model.device()
    }
    fn eos_token_ids(&self) -> Vec<u32> {
        self.eos.clone()
    }
    fn max_context(&self) -> usize {
        self.model.max_context()
    }
    fn start(&mut self, prompt: &str) -> Result<Tensor<B, 1>> {
        let ids = self.tokenizer.encode(prompt, true)?;
        self.start_ids(&ids)
    }
    fn start_ids(&mut self, prompt: &[u32]) -> Result<Tensor<B, 1>> {
        if prompt.is_empty() {
            return Err(EnsembleError::arg(
                "prompt",
                format!("`{}`: empty prompt", self.name),
            ));
        }
        if prompt.len() >= self.model.max_context() {
            return Err(kiln_core::Error::ContextOverflow {
                prompt: prompt.len(),
                context: self.model.max_context(),
                detail: format!(" (member `{}`)", self.name),
            }
            .into());
        }
        self.cache = Some(self.model.new_cache(vec![0]));
        self.generated.clear();
        self.prompt_len = prompt.len();
        let logits = self.forward(prompt)?;
        self.tail = Tail::new();
        self.tail.save(0, self.cache.as_ref().unwrap(), &logits);
        Ok(logits)
    }
    fn prompt_len(&self) -> usize {
        self.prompt_len
    }
    fn feed(&mut self, tokens: &[u32]) -> Result<Tensor<B, 1>> {
        if self.prompt_len + self.generated.len() + tokens.len() > self.model.max_context() {
            return Err(kiln_core::Error::ContextOverflow {
                prompt: self.prompt_len + self.generated.len() + tokens.len(),
                context: self.model.max_context(),
                detail: format!(" (member `{}`)", self.name),
            }
            .into());
        }
        let mut logits = None;
        // One token at a time, saving each state, so that any point of the tail can be restored.
        for &t in tokens {
            let l = self.forward(&[t])?;
            self.generated.push(t);
            self.tail
                .save(self.generated.len(), self.cache.as_ref().unwrap(), &l);
            logits = Some(l);
        }
        logits.ok_or_else(|| EnsembleError::arg("tokens", "nothing to feed"))
    }
    fn generated(&self) -> &[u32] {
        &self.generated
    }
    fn rewind(&mut self, len: usize) -> Result<Tensor<B, 1>> {
        let (cache, logits) = self.tail.restore(len, &self.name)?;
        self.cache = Some(cache);
        self.generated.truncate(len);
        Ok(logits)
    }
    fn commit(&mut self, len: usize) {
        self.tail.commit(len);
    }
}

/// An encoder-decoder member (NLLB, T5): the source is encoded once; the decoder stream starts
/// with the decoder start token and a forced prefix (NLLB: the target-language token), and
/// the ensemble extends it.
pub struct Seq2SeqMember<B: Backend, M: Seq2SeqLm<B>> {
    name: String,
    model: M,
    tokenizer: Tokenizer,
    embeddings: Tensor<B, 2>,
    source_prefix: Vec<u32>,
    source_suffix: Vec<u32>,
    forced: Vec<u32>,
    max_context: usize,
    cache: Option<M::Cache>,
    generated: Vec<u32>,
    tail: Tail<M::Cache, B>,
}

impl<B: Backend, M: Seq2SeqLm<B>> Seq2SeqMember<B, M> {
    /// Wraps `model` with its tokenizer and shared embedding matrix (M2M100/NLLB:
    /// `model.model.shared.dense_weight()`).
    pub fn new(
        name: impl Into<String>,
        model: M,
        tokenizer: Tokenizer,
        embeddings: Tensor<B, 2>,
    ) -> Self {
        Self {
            name: name.into(),
            model,
            tokenizer,
            embeddings,
            source_prefix: Vec::new(),
            source_suffix: Vec::new(),
            forced: Vec::new(),
            max_context: 1024,
            cache: None,
            generated: Vec::new(),
            tail: Tail::new(),
        }
    }

    /// Source ids are `prefix + encode(text) + suffix` (NLLB: `[src_lang]`, `[</s>]`).
    pub fn with_source_affixes(mut self, prefix: Vec<u32>, suffix: Vec<u32>) -> Self {
        self.source_prefix = prefix;
        self.source_suffix = suffix;
        self
    }

    /// Decoder tokens forced after the start token (NLLB: `[tgt_lang]`).
    pub fn with_forced_prefix(mut self, forced: Vec<u32>) -> Self {
        self.forced = forced;
        self
    }

    /// Longest decoder stream (default 1024, NLLB's `max_position_embeddings`).
    pub fn with_max_context(mut self, n: usize) -> Self {
        self.max_context = n;
        self
    }

    fn step(&mut self, tokens: &[u32]) -> Result<Tensor<B, 1>> {
        let vocab = self.model.vocab_size();
        if let Some(bad) = tokens.iter().find(|&&t| t as usize >= vocab) {
            return Err(EnsembleError::arg(
                "tokens",
                format!(
                    "token {bad} is outside `{}`'s vocabulary of {vocab}",
                    self.name
                ),
            ));
        }
        let cache = self
            .cache
            .as_mut()
            .ok_or_else(|| EnsembleError::arg("feed", "start the member first"))?;
        let ids: Vec<i64> = tokens.iter().map(|&t| t as i64).collect();
        let input = Tensor::<B, 2, Int>::from_data(
            TensorData::new(ids, [1, tokens.len()]),
            &self.model.device(),
        );
        Ok(last_row(self.model.decode_step(input, cache)))
    }
}

impl<B: Backend, M: Seq2SeqLm<B>> Member<B> for Seq2SeqMember<B, M> {
    fn name(&self) -> &str {
        &self.name
    }
    fn is_encoder_decoder(&self) -> bool {
        true
    }
    fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }
    fn vocab_size(&self) -> usize {
        self.model.vocab_size()
    }
    fn embeddings(&self) -> Tensor<B, 2> {
        self.embeddings.clone()
    }
    fn device(&self) -> B::Device {
        self.model.device()
    }
    fn eos_token_ids(&self) -> Vec<u32> {
        self.model.eos_token_ids()
    }
    fn max_context(&self) -> usize {
        self.max_context
    }
    fn start(&mut self, prompt: &str) -> Result<Tensor<B, 1>> {
        let ids = self.tokenizer.encode(prompt, false)?;
        let source = [&self.source_prefix[..], &ids, &self.source_suffix].concat();
        self.start_ids(&source)
    }
    fn start_ids(&mut self, source: &[u32]) -> Result<Tensor<B, 1>> {
        if source.is_empty() {
            return Err(EnsembleError::arg(
                "prompt",
                format!("`{}`: empty source", self.name),
            ));
        }
        let vocab = self.model.vocab_size();
        if let Some(bad) = source.iter().find(|&&t| t as usize >= vocab) {
            return Err(EnsembleError::arg(
                "prompt",
                format!("source token {bad} is outside the vocabulary of {vocab}"),
            ));
        }
        let device = self.model.device();
        let ids: Vec<i64> = source.iter().map(|&t| t as i64).collect();
        let input =
            Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [1, source.len()]), &device);
        let encoder = self.model.encode(input, None);
        self.cache = Some(self.model.new_decoder_cache(&encoder));
        self.generated.clear();
        let prefix = [&[self.model.decoder_start_token_id()][..], &self.forced].concat();
        let logits = self.step(&prefix)?;
        self.tail = Tail::new();
        self.tail.save(0, self.cache.as_ref().unwrap(), &logits);
        Ok(logits)
    }
    fn prompt_len(&self) -> usize {
        1 + self.forced.len()
    }
    fn feed(&mut self, tokens: &[u32]) -> Result<Tensor<B, 1>> {
        if self.prompt_len() + self.generated.len() + tokens.len() > self.max_context {
            return Err(EnsembleError::arg(
                "tokens",
                format!(
                    "member `{}` reached its decoder length limit of {}",
                    self.name, self.max_context
                ),
            ));
        }
        let mut logits = None;
        for &t in tokens {
            let l = self.step(&[t])?;
            self.generated.push(t);
            self.tail
                .save(self.generated.len(), self.cache.as_ref().unwrap(), &l);
            logits = Some(l);
        }
        logits.ok_or_else(|| EnsembleError::arg("tokens", "nothing to feed"))
    }
    fn generated(&self) -> &[u32] {
        &self.generated
    }
    fn rewind(&mut self, len: usize) -> Result<Tensor<B, 1>> {
        let (cache, logits) = self.tail.restore(len, &self.name)?;
        self.cache = Some(cache);
        self.generated.truncate(len);
        Ok(logits)
    }
    fn commit(&mut self, len: usize) {
        self.tail.commit(len);
    }
}
