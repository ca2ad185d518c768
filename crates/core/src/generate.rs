//! The generation loop shared by every decoder-only model: a KV-cached prefill, then one-token
//! decode steps, with batching by left padding, EOS ids, stop strings and streamed text.

use burn::prelude::*;

use crate::sampling::{Sampler, SamplingConfig};
use crate::tokenizer::{TokenStream, Tokenizer};
use crate::{Error, Result};

/// A decoder-only language model with a KV cache.
pub trait CausalLm<B: Backend> {
    /// Per-sequence state carried between steps (KV cache, positions, padding).
    type Cache;

    /// A fresh cache for a batch whose row `r` starts with `pad[r]` left-padding tokens.
    fn new_cache(&self, pad: Vec<usize>) -> Self::Cache;

    /// Feeds `tokens` `[batch, seq]` after what `cache` holds and returns logits
    /// `[batch, seq, vocab]`, or only the last position's `[batch, 1, vocab]` when `all` is
    /// false (which skips the LM head for the rest of a prompt).
    fn forward(
        &self,
        tokens: Tensor<B, 2, Int>,
        cache: &mut Self::Cache,
        all: bool,
    ) -> Tensor<B, 3>;

    /// Forgets every cached token from `len` on, so the cache holds the first `len` tokens fed
    /// to it; returns false (cache unchanged) when this model or cache cannot, e.g. after a
    /// sliding window dropped old tokens. Lets a chat reuse the common prefix of two prompts.
    fn truncate_cache(&self, cache: &mut Self::Cache, len: usize) -> bool {
        let _ = (cache, len);
        false
    }

    /// Appends `other`'s rows to `cache`'s batch, so sequences prefilled apart decode as one
    /// batch (continuous batching); each row goes on as it would alone. Gives `other` back
    /// when this model or these caches cannot (the default). A model that implements this
    /// implements [`Self::retain_cache_rows`] too.
    fn append_cache(
        &self,
        cache: &mut Self::Cache,
        other: Self::Cache,
    ) -> std::result::Result<(), Self::Cache> {
        let _ = cache;
        Err(other)
    }

    /// Keeps only rows `rows` (ascending, distinct) of `cache`'s batch, so finished sequences
    /// leave it; returns false (cache unchanged) when this model cannot (the default).
    fn retain_cache_rows(&self, cache: &mut Self::Cache, rows: &[usize]) -> bool {
        let _ = (cache, rows);
        false
    }

    /// Rebuilds `cache`'s batch from rows `indices` (row `i` becomes old row `indices[i]`; rows
    /// may repeat or go): expands prompts to beams or samples, and reorders beams after a
    /// beam-search step (HF's `_reorder_cache`). Returns false (cache unchanged) when this model
    /// cannot (the default).
    fn reorder_cache(&self, cache: &mut Self::Cache, indices: &[usize]) -> bool {
        let _ = (cache, indices);
        false
    }

    /// Tokens that end a sequence, from the model's config (empty when it names none).
    /// [`GenerationConfig::for_model`] starts from them; generation_config.json may add more
    /// (see `GenerationDefaults`).
    fn eos_token_ids(&self) -> Vec<u32> {
        Vec::new()
    }

    /// The padding token from the model's config, if it names one.
    fn pad_token_id(&self) -> Option<u32> {
        None
    }

    /// Longest sequence (prompt + generated) the model supports.
    fn max_context(&self) -> usize;

    /// Vocabulary size (logits width).
    fn vocab_size(&self) -> usize;

    /// The device the weights live on.
    fn device(&self) -> B::Device;
}

/// How every kiln generation loop chooses tokens and when it stops: decoder-only
/// ([`generate`]), encoder-decoder ([`generate_seq2seq`](crate::seq2seq::generate_seq2seq)), the
/// ensemble and anchor-based generation all take this one type (HF's `GenerationConfig`).
///
/// The default stops where the model's own config says: `eos_token_ids` and `pad_token_id`
/// left at `None` are taken from the model ([`CausalLm::eos_token_ids`],
/// [`Seq2SeqLm::eos_token_ids`](crate::seq2seq::Seq2SeqLm::eos_token_ids)).
///
/// ```
/// use kiln_core::{GenerationConfig, SamplingConfig};
/// let config = GenerationConfig::default()
///     .with_max_new_tokens(32)
///     .with_sampling(SamplingConfig::greedy().with_temperature(0.7).with_seed(1))
///     .with_stop_strings(vec!["\n\n".into()]);
/// assert!(config.eos_token_ids.is_none()); // the model's EOS ids
/// config.validate().unwrap();
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationConfig {
    /// Upper bound on generated tokens per sequence (an encoder-decoder's start token not
    /// counted).
    pub max_new_tokens: usize,
    /// Token choice (greedy or sampled) when `num_beams == 1`.
    pub sampling: SamplingConfig,
    /// Generation of a row ends after any of these tokens (kept in the output). `None`: the
    /// model's; `Some(vec![])`: never on a token.
    pub eos_token_ids: Option<Vec<u32>>,
    /// Generation of a row ends once its text contains any of these (the text is cut before
    /// it); needs a tokenizer.
    pub stop_strings: Vec<String>,
    /// Token used for left padding and for rows that have finished. `None`: the model's, else
    /// its first EOS id (as HF's `generate`), else 0.
    pub pad_token_id: Option<u32>,
    /// Beam width; `1` is greedy or sampled decoding. Beam search is for encoder-decoder
    /// models.
    pub num_beams: usize,
    /// Beam score = sum of log-probs / generated_len^length_penalty (HF semantics).
    pub length_penalty: f32,
    /// HF `early_stopping=True`: a batch row stops once it has `num_beams` finished hypotheses.
    pub early_stopping: bool,
    /// Forbid repeating any n-gram of this size (`0` = off), as HF `no_repeat_ngram_size`.
    pub no_repeat_ngram_size: usize,
    /// Force this token as the first generated one (NLLB's target language).
    pub forced_bos_token_id: Option<u32>,
}

impl Default for GenerationConfig {
    fn default() -> Self {
        Self {
            max_new_tokens: 128,
            sampling: SamplingConfig::greedy(),
            eos_token_ids: None,
            stop_strings: Vec::new(),
            pad_token_id: None,
            num_beams: 1,
            length_penalty: 1.0,
            early_stopping: true,
            no_repeat_ngram_size: 0,
            forced_bos_token_id: None,
        }
    }
}

impl GenerationConfig {
    /// The defaults with `model`'s EOS ids and padding token filled in ([`Self::resolve`]).
    pub fn for_model<B: Backend, M: CausalLm<B>>(model: &M) -> Self {
        Self::default().resolve(model.eos_token_ids(), model.pad_token_id())
    }

    /// Fills what is left to the model: EOS ids from `model_eos`, padding from `model_pad`,
    /// else the first EOS id (as HF's `generate`), else 0. What is set stays.
    pub fn resolve(mut self, model_eos: Vec<u32>, model_pad: Option<u32>) -> Self {
        let eos = self.eos_token_ids.get_or_insert(model_eos);
        let first = eos.first().copied();
        self.pad_token_id = self.pad_token_id.or(model_pad).or(first).or(Some(0));
        self
    }

    /// The EOS ids (empty while left to the model: call [`Self::resolve`] first).
    pub fn eos(&self) -> &[u32] {
        self.eos_token_ids.as_deref().unwrap_or(&[])
    }

    /// The padding id (0 while left to the model: call [`Self::resolve`] first).
    pub fn pad(&self) -> u32 {
        self.pad_token_id.unwrap_or(0)
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

    /// Errors when a field this generation loop (`what`) does not implement is set: beam
    /// search, or (`processors` false) the n-gram ban and the forced first token.
    pub fn check_supported(&self, what: &str, processors: bool) -> Result<()> {
        self.validate()?;
        if self.num_beams > 1 {
            return Err(Error::arg(
                "num_beams",
                format!(
                    "{}: {what} has no beam search (encoder-decoder models do)",
                    self.num_beams
                ),
            ));
        }
        if !processors && self.no_repeat_ngram_size > 0 {
            return Err(Error::arg(
                "no_repeat_ngram_size",
                format!("{what} does not implement it"),
            ));
        }
        if !processors && self.forced_bos_token_id.is_some() {
            return Err(Error::arg(
                "forced_bos_token_id",
                format!("{what} does not implement it"),
            ));
        }
        Ok(())
    }

    /// HF's logits processors this config turns on, applied to one row's scores before the
    /// token is chosen: the n-gram ban over `seq` (what the model has read: the prompt and
    /// the tokens so far, or an encoder-decoder's decoder sequence) and, at `step` 0, the
    /// forced first token.
    pub fn process_logits(&self, scores: &mut [f32], seq: &[u32], step: usize) {
        crate::seq2seq::ban_repeated_ngrams(scores, seq, self.no_repeat_ngram_size);
        if let Some(t) = self.forced_bos_token_id
            && step == 0
        {
            crate::seq2seq::force_token(scores, t);
        }
    }

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
    /// Sets the EOS ids (an empty list: never stop on a token).
    pub fn with_eos_token_ids(mut self, ids: Vec<u32>) -> Self {
        self.eos_token_ids = Some(ids);
        self
    }
    /// Sets the stop strings.
    pub fn with_stop_strings(mut self, stops: Vec<String>) -> Self {
        self.stop_strings = stops;
        self
    }
    /// Sets the padding id.
    pub fn with_pad_token_id(mut self, id: u32) -> Self {
        self.pad_token_id = Some(id);
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
}

/// Why a sequence stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// An EOS token was generated.
    Eos,
    /// A stop string appeared in the text.
    Stop,
    /// `max_new_tokens` or the model's context was reached.
    Length,
    /// The caller's stream callback returned [`ControlFlow::Break`](std::ops::ControlFlow).
    Cancelled,
}

/// What a streaming callback returns: `()` to go on (so `|_, piece| print!("{piece}")` is a
/// callback), or a [`ControlFlow`](std::ops::ControlFlow) whose `Break` (or a `bool`, `false`)
/// ends that sequence after the token it saw, with [`FinishReason::Cancelled`].
///
/// ```
/// use std::ops::ControlFlow;
/// use kiln_core::generate::StreamControl;
/// assert!(().proceed());
/// assert!(!ControlFlow::<()>::Break(()).proceed());
/// ```
pub trait StreamControl {
    /// Whether generation goes on.
    fn proceed(self) -> bool;
}

impl StreamControl for () {
    fn proceed(self) -> bool {
        true
    }
}

/// `true` goes on, `false` stops.
impl StreamControl for bool {
    fn proceed(self) -> bool {
        self
    }
}

impl StreamControl for std::ops::ControlFlow<()> {
    fn proceed(self) -> bool {
        self.is_continue()
    }
}

/// One generated sequence.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    /// Generated token ids (the prompt excluded; an EOS that ended it included).
    pub tokens: Vec<u32>,
    /// Decoded text of `tokens` (special tokens skipped, cut at a stop string), when a
    /// tokenizer was given.
    pub text: Option<String>,
    /// Why it stopped.
    pub finish: FinishReason,
    /// Bytes of `text` already passed to the caller's stream.
    streamed: usize,
}

impl Generation {
    /// An empty sequence, with text when a tokenizer decodes it (for decode loops outside
    /// kiln-core, which feed it with [`Self::accept`] and end with [`Self::flush`]).
    pub fn start(with_text: bool) -> Self {
        Self {
            tokens: Vec::new(),
            text: with_text.then(String::new),
            finish: FinishReason::Length,
            streamed: 0,
        }
    }

    /// A finished sequence (for code that builds one itself).
    pub fn new(tokens: Vec<u32>, text: Option<String>, finish: FinishReason) -> Self {
        let streamed = text.as_ref().map_or(0, String::len);
        Self {
            tokens,
            text,
            finish,
            streamed,
        }
    }

    /// Takes the sampled `token`, the step every decode loop shares: records it, ends on an
    /// EOS, else streams its text through `on_text` and ends on a stop string (the text is cut
    /// before it). Text that could be the start of a stop string is held back until the next
    /// token decides, so streamed text never holds part of a stop string. `on_text` returning
    /// false ends the sequence ([`FinishReason::Cancelled`]). Returns whether the sequence has
    /// ended. `config`'s EOS ids must be resolved ([`GenerationConfig::resolve`]).
    pub fn accept(
        &mut self,
        token: u32,
        config: &GenerationConfig,
        tokenizer: Option<&Tokenizer>,
        stream: &mut TokenStream,
        mut on_text: impl FnMut(&str) -> bool,
    ) -> Result<bool> {
        self.tokens.push(token);
        if config.eos().contains(&token) {
            self.finish = FinishReason::Eos;
            return Ok(true);
        }
        if let Some(tokenizer) = tokenizer
            && let Some(piece) = stream.push(tokenizer, token)?
        {
            let text = self.text.get_or_insert_default();
            let before = text.len();
            text.push_str(&piece);
            if let Some(cut) = find_stop(text, &config.stop_strings, before) {
                text.truncate(cut);
                if cut > self.streamed {
                    let _ = on_text(&text[self.streamed..]);
                }
                self.streamed = cut;
                self.finish = FinishReason::Stop;
                return Ok(true);
            }
            let safe = text.len() - partial_stop_len(text, &config.stop_strings);
            if safe > self.streamed {
                let go_on = on_text(&text[self.streamed..safe]);
                self.streamed = safe;
                if !go_on {
                    self.finish = FinishReason::Cancelled;
                    return Ok(true);
                }
            }
        }
        Ok(false)
    }

    /// Streams the text still held back at the end (an incomplete character), unless a stop
    /// string ended the sequence.
    pub fn flush(
        &mut self,
        tokenizer: &Tokenizer,
        stream: &mut TokenStream,
        mut on_text: impl FnMut(&str),
    ) -> Result<()> {
        if matches!(self.finish, FinishReason::Stop | FinishReason::Cancelled) {
            return Ok(());
        }
        let text = self.text.get_or_insert_default();
        if let Some(rest) = stream.finish(tokenizer)? {
            text.push_str(&rest);
        }
        if text.len() > self.streamed {
            on_text(&text[self.streamed..]);
            self.streamed = text.len();
        }
        Ok(())
    }

    /// [`Self::accept`] for a loop that reports [`TokenEvent`]s: takes the token, then calls
    /// `on_token` with its id and the text it makes final. A `Break` (or `false`) from
    /// `on_token` ends the sequence ([`FinishReason::Cancelled`]) unless the token already
    /// ended it. Returns whether the sequence has ended.
    pub fn step<R: StreamControl>(
        &mut self,
        row: usize,
        token: u32,
        config: &GenerationConfig,
        tokenizer: Option<&Tokenizer>,
        stream: &mut TokenStream,
        on_token: &mut impl FnMut(TokenEvent<'_>) -> R,
    ) -> Result<bool> {
        let mut text = String::new();
        let finished = self.accept(token, config, tokenizer, stream, |piece| {
            text.push_str(piece);
            true
        })?;
        let go_on = on_token(TokenEvent {
            row,
            id: Some(token),
            text: &text,
        })
        .proceed();
        if !finished && !go_on {
            self.finish = FinishReason::Cancelled;
        }
        Ok(finished || !go_on)
    }

    /// [`Self::flush`] for a loop that reports [`TokenEvent`]s: the held-back text, if any, as
    /// a last event with `id: None`. Nothing without a tokenizer.
    pub fn flush_events<R: StreamControl>(
        &mut self,
        row: usize,
        tokenizer: Option<&Tokenizer>,
        stream: &mut TokenStream,
        on_token: &mut impl FnMut(TokenEvent<'_>) -> R,
    ) -> Result<()> {
        let Some(tokenizer) = tokenizer else {
            return Ok(());
        };
        self.flush(tokenizer, stream, |rest| {
            let _ = on_token(TokenEvent {
                row,
                id: None,
                text: rest,
            });
        })
    }
}

/// Generates continuations of `prompts` in one batch.
///
/// `on_text(row, piece)` receives each row's text as it is produced (needs `tokenizer`); it
/// returns `()`, or a [`ControlFlow`](std::ops::ControlFlow) whose `Break` ends that row
/// ([`StreamControl`]). Each row stops on its own; a batch gives the same tokens as running the
/// rows one by one. [`generate_tokens`] reports every token id as well.
pub fn generate<B: Backend, M: CausalLm<B>, R: StreamControl>(
    model: &M,
    prompts: &[Vec<u32>],
    config: &GenerationConfig,
    tokenizer: Option<&Tokenizer>,
    mut on_text: impl FnMut(usize, &str) -> R,
) -> Result<Vec<Generation>> {
    generate_tokens(model, prompts, config, tokenizer, |event| {
        event.text.is_empty() || on_text(event.row, event.text).proceed()
    })
}

/// One step of one row in [`generate_tokens`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenEvent<'a> {
    /// The prompt's row in the batch.
    pub row: usize,
    /// The token chosen (an EOS that ends the row included); `None` for the last event of a row
    /// whose text was held back at the end (an incomplete character).
    pub id: Option<u32>,
    /// The text this token makes final (needs a tokenizer): empty while a character or a
    /// possible stop string is incomplete, and cut before a stop string.
    pub text: &'a str,
}

/// [`generate`] with a callback for every token: its id and the text it makes final
/// ([`TokenEvent`]), in the order chosen. A `Break` (or `false`) ends that row after the token.
pub fn generate_tokens<B: Backend, M: CausalLm<B>, R: StreamControl>(
    model: &M,
    prompts: &[Vec<u32>],
    config: &GenerationConfig,
    tokenizer: Option<&Tokenizer>,
    mut on_token: impl FnMut(TokenEvent<'_>) -> R,
) -> Result<Vec<Generation>> {
    if prompts.is_empty() {
        return Ok(Vec::new());
    }
    config.check_supported("decoder-only generation", true)?;
    let config = &config
        .clone()
        .resolve(model.eos_token_ids(), model.pad_token_id());
    let vocab = model.vocab_size();
    let context = model.max_context();
    for (row, prompt) in prompts.iter().enumerate() {
        check_prompt(prompt, config, tokenizer, vocab, context).map_err(|e| match e {
            Error::InvalidArgument { name, message } if prompts.len() > 1 => {
                Error::InvalidArgument {
                    name,
                    message: format!("prompt {row}: {message}"),
                }
            }
            e => e,
        })?;
    }
    let batch = prompts.len();
    let width = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let pad: Vec<usize> = prompts.iter().map(|p| width - p.len()).collect();
    let device = model.device();

    let mut input = Vec::with_capacity(batch * width);
    for (prompt, &pad) in prompts.iter().zip(&pad) {
        input.extend(std::iter::repeat_n(config.pad() as i64, pad));
        input.extend(prompt.iter().map(|&t| t as i64));
    }
    let mut tokens =
        Tensor::<B, 2, Int>::from_data(TensorData::new(input, [batch, width]), &device);

    let mut cache = model.new_cache(pad);
    let mut samplers: Vec<Sampler> = (0..batch)
        .map(|_| Sampler::new(config.sampling.clone()))
        .collect::<Result<_>>()?;
    let mut contexts: Vec<Vec<u32>> = prompts.to_vec();
    let mut outputs: Vec<Generation> = (0..batch)
        .map(|_| Generation::start(tokenizer.is_some()))
        .collect();
    let mut streams = vec![TokenStream::new(); batch];
    let mut done = vec![false; batch];
    // The model can hold `context` positions; the longest row limits everyone.
    let max_new = config.max_new_tokens.min(context - width);

    for _ in 0..max_new {
        let logits = model.forward(tokens, &mut cache, false);
        let logits: Vec<f32> = logits
            .into_data()
            .convert::<f32>()
            .into_vec()
            .map_err(|e| Error::arg("logits", format!("{e:?}")))?;
        let mut next = Vec::with_capacity(batch);
        for row in 0..batch {
            if done[row] {
                next.push(config.pad() as i64);
                continue;
            }
            let row_logits = &mut logits[row * vocab..(row + 1) * vocab].to_vec();
            config.process_logits(row_logits, &contexts[row], outputs[row].tokens.len());
            let token = samplers[row].sample(row_logits, &contexts[row]);
            contexts[row].push(token);
            next.push(token as i64);
            done[row] = outputs[row].step(
                row,
                token,
                config,
                tokenizer,
                &mut streams[row],
                &mut on_token,
            )?;
        }
        if done.iter().all(|&d| d) {
            break;
        }
        tokens = Tensor::from_data(TensorData::new(next, [batch, 1]), &device);
    }
    for (row, out) in outputs.iter_mut().enumerate() {
        out.flush_events(row, tokenizer, &mut streams[row], &mut on_token)?;
    }
    Ok(outputs)
}

/// What every decode loop checks before it starts: the prompt has tokens, all in the model's
/// vocabulary, and leaves room in its context; stop strings come with a tokenizer.
pub(crate) fn check_prompt(
    prompt: &[u32],
    config: &GenerationConfig,
    tokenizer: Option<&Tokenizer>,
    vocab: usize,
    context: usize,
) -> Result<()> {
    if prompt.is_empty() {
        return Err(Error::arg("prompt", "has no tokens"));
    }
    if let Some(bad) = prompt.iter().find(|&&t| t as usize >= vocab) {
        return Err(Error::arg(
            "prompt",
            format!("token id {bad} is outside the vocabulary of {vocab}"),
        ));
    }
    if prompt.len() >= context {
        return Err(Error::ContextOverflow {
            prompt: prompt.len(),
            context,
            detail: " (no room left to generate)".into(),
        });
    }
    if !config.stop_strings.is_empty() && tokenizer.is_none() {
        return Err(Error::arg("stop_strings", "need a tokenizer to match text"));
    }
    Ok(())
}

/// Length of the longest end of `text` that is a proper prefix of a stop string (so may still
/// become one), on a character boundary: what a stream holds back.
pub fn partial_stop_len(text: &str, stops: &[String]) -> usize {
    stops
        .iter()
        .filter_map(|stop| {
            (1..stop.len()).rev().find(|&n| {
                n <= text.len()
                    && text.is_char_boundary(text.len() - n)
                    && stop.is_char_boundary(n)
                    && text.ends_with(&stop[..n])
            })
        })
        .max()
        .unwrap_or(0)
}

/// Byte offset of the first stop string that ends after `from - longest stop` (only text that
/// changed can complete a new match).
pub(crate) fn find_stop(text: &str, stops: &[String], from: usize) -> Option<usize> {
    stops
        .iter()
        .filter(|s| !s.is_empty())
        .filter_map(|stop| {
            let mut start = from.saturating_sub(stop.len());
            while !text.is_char_boundary(start) {
                start -= 1;
            }
            text[start..].find(stop.as_str()).map(|i| start + i)
        })
        .min()
}

#[cfg(test)]
mod stop_string_tests {
    use super::*;

    /// SmolLM2's byte-level BPE (committed under tests/data): emoji and accented letters are
    /// split over several tokens.
    fn tokenizer() -> Tokenizer {
        let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/data/tokenizers/smollm2-135m-instruct");
        Tokenizer::from_dir(&dir).unwrap()
    }

    /// Feeds `text`'s tokens one by one, as a decode loop does; returns the generation and
    /// what was streamed.
    fn run(tokenizer: &Tokenizer, text: &str, stops: &[&str]) -> (Generation, String) {
        let config = GenerationConfig::default()
            .with_stop_strings(stops.iter().map(|s| s.to_string()).collect());
        let mut out = Generation::start(true);
        let mut stream = TokenStream::new();
        let mut streamed = String::new();
        for id in tokenizer.encode(text, false).unwrap() {
            let done = out
                .accept(id, &config, Some(tokenizer), &mut stream, |p| {
                    streamed.push_str(p);
                    true
                })
                .unwrap();
            if done {
                break;
            }
        }
        out.flush(tokenizer, &mut stream, |p| streamed.push_str(p))
            .unwrap();
        (out, streamed)
    }

    const TEXT: &str = "The café said 😀 hello, then STOP and more text after.";

    #[test]
    fn stops_are_cut_and_never_streamed() {
        let tokenizer = tokenizer();
        let ids = tokenizer.encode(TEXT, false).unwrap();
        // The emoji takes more than one token, so a stop string starting inside it is matched
        // only once its last byte arrives.
        let emoji_tokens = ids
            .iter()
            .filter(|&&id| tokenizer.decode(&[id], false).unwrap().contains('\u{FFFD}'))
            .count();
        assert!(emoji_tokens >= 2, "{emoji_tokens}");
        for (stops, expected) in [
            // Across token boundaries, mid-word.
            (vec!["id 😀 he"], "The café sa"),
            // Starting with a multi-byte character split over tokens.
            (vec!["😀 hello"], "The café said "),
            (vec!["é s"], "The caf"),
            // The first of several to appear wins; one that never completes changes nothing.
            (vec!["STOP", "then"], "The café said 😀 hello, "),
            (vec!["hello, thenX"], TEXT),
            (vec!["after.!"], TEXT),
        ] {
            let (out, streamed) = run(&tokenizer, TEXT, &stops);
            assert_eq!(out.text.as_deref(), Some(expected), "{stops:?}");
            // Nothing of a stop string was streamed, even where its start arrived tokens
            // before its end; the stream is exactly the final text.
            assert_eq!(streamed, expected, "{stops:?}");
            let finish = if expected == TEXT {
                FinishReason::Length
            } else {
                FinishReason::Stop
            };
            assert_eq!(out.finish, finish, "{stops:?}");
        }
    }

    #[test]
    fn partial_matches_hold_back_only_what_may_still_match() {
        let stops = ["STOP".to_string(), "😀x".to_string()];
        assert_eq!(partial_stop_len("abc ST", &stops), 2);
        assert_eq!(partial_stop_len("abc STO", &stops), 3);
        assert_eq!(partial_stop_len("abc S T", &stops), 0);
        assert_eq!(partial_stop_len("a😀", &stops), "😀".len());
        assert_eq!(partial_stop_len("", &stops), 0);
        assert_eq!(find_stop("a STOP b", &stops, 0), Some(2));
        assert_eq!(find_stop("a STOP b", &stops, 8), None);
    }
}
