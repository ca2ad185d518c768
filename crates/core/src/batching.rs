//! Continuous batching: sequences join a running decode batch when they arrive and leave it when
//! they finish, so one weight pass per step serves every sequence in flight (what a server
//! needs; [`generate`](crate::generate()) batches only prompts known up front).
//!
//! A new request is prefilled alone, then its cache is appended to the running batch's
//! ([`CausalLm::append_cache`]: left padding aligns the rows, a row's positions never change).
//! Rows that end are dropped from the cache ([`CausalLm::retain_cache_rows`]). Each row keeps
//! its own sampler, stop rules and text stream, so its tokens are the ones
//! [`generate`](crate::generate()) gives for its prompt alone.

use burn::prelude::*;

use crate::Error;
use crate::generate::{CausalLm, Generation, GenerationConfig, check_prompt};
use crate::sampling::{Sampler, apply_frequency_presence_penalties};
use crate::tokenizer::{TokenStream, Tokenizer};

/// What a [`Batcher`] reports about one request.
#[derive(Debug)]
pub enum BatchEvent {
    /// More text (stop strings held back until they cannot match any more).
    Text(String),
    /// The request ended; nothing follows. `prompt_tokens` is the prompt's length.
    Done {
        /// Tokens, text and why it ended.
        generation: Generation,
        /// Tokens in the prompt.
        prompt_tokens: usize,
    },
    /// The request could not run; nothing follows.
    Failed(Error),
}

/// Where a request's events go, e.g. a channel to the client's connection.
pub trait BatchSink: Send {
    /// Delivers `event`; returns false when nobody listens any more (the request is dropped).
    fn send(&mut self, event: BatchEvent) -> bool;
    /// True once nobody listens (checked every step, so a client that left frees its row even
    /// while its text is held back).
    fn is_closed(&self) -> bool {
        false
    }
}

/// One sequence to generate.
pub struct BatchRequest {
    /// Prompt token ids.
    pub prompt: Vec<u32>,
    /// Stopping rules and sampling (EOS ids left `None` are the model's); `pad_token_id` is not
    /// used (rows are padded in the cache).
    pub config: GenerationConfig,
    /// OpenAI's frequency penalty: subtracted from a token's logit once per time it was
    /// generated in this sequence (the prompt does not count, as in vLLM). `0` is off.
    pub frequency_penalty: f32,
    /// OpenAI's presence penalty: subtracted once from the logit of every token generated so
    /// far. `0` is off.
    pub presence_penalty: f32,
    /// Receives the events.
    pub sink: Box<dyn BatchSink>,
}

struct Row {
    prompt_tokens: usize,
    context: Vec<u32>,
    counts: Vec<(u32, u32)>,
    sampler: Sampler,
    out: Generation,
    stream: TokenStream,
    config: GenerationConfig,
    frequency_penalty: f32,
    presence_penalty: f32,
    left: usize,
    sink: Box<dyn BatchSink>,
}

struct Group<C> {
    cache: C,
    rows: Vec<Row>,
}

/// A running decode batch that requests join and leave (see the module docs).
pub struct Batcher<'m, B: Backend, M: CausalLm<B>> {
    model: &'m M,
    tokenizer: Option<&'m Tokenizer>,
    // One group normally; a model that cannot append caches runs each sequence as its own.
    groups: Vec<Group<M::Cache>>,
    _backend: std::marker::PhantomData<B>,
}

impl<'m, B: Backend, M: CausalLm<B>> Batcher<'m, B, M> {
    /// An empty batch over `model`; `tokenizer` gives text and stop strings.
    pub fn new(model: &'m M, tokenizer: Option<&'m Tokenizer>) -> Self {
        Self {
            model,
            tokenizer,
            groups: Vec::new(),
            _backend: std::marker::PhantomData,
        }
    }

    /// Sequences in flight.
    pub fn len(&self) -> usize {
        self.groups.iter().map(|g| g.rows.len()).sum()
    }

    /// True when nothing is in flight.
    pub fn is_empty(&self) -> bool {
        self.groups.is_empty()
    }

    /// Ends every sequence in flight now, as if it had reached its length limit: each gets its
    /// held-back text and [`BatchEvent::Done`] (a server shutting down ends its streams this way).
    pub fn finish_all(&mut self) {
        for group in std::mem::take(&mut self.groups) {
            for row in group.rows {
                self.finish(row);
            }
        }
    }

    /// Prefills `request`'s prompt, samples its first token and adds it to the running batch.
    /// A request that cannot run gets [`BatchEvent::Failed`]; one that ends at its first token
    /// gets [`BatchEvent::Done`] at once.
    pub fn add(&mut self, request: BatchRequest) {
        let BatchRequest {
            prompt,
            config,
            frequency_penalty,
            presence_penalty,
            mut sink,
        } = request;
        if sink.is_closed() {
            return;
        }
        let config = config.resolve(self.model.eos_token_ids(), self.model.pad_token_id());
        let checked = config
            .check_supported("batched generation", true)
            .and_then(|()| {
                check_prompt(
                    &prompt,
                    &config,
                    self.tokenizer,
                    self.model.vocab_size(),
                    self.model.max_context(),
                )
            })
            .and_then(|()| {
                for (name, v) in [
                    ("frequency_penalty", frequency_penalty),
                    ("presence_penalty", presence_penalty),
                ] {
                    if !v.is_finite() {
                        return Err(Error::arg(name, format!("{v} is not a finite number")));
                    }
                }
                Sampler::new(config.sampling.clone())
            });
        let sampler = match checked {
            Ok(sampler) => sampler,
            Err(e) => {
                sink.send(BatchEvent::Failed(e));
                return;
            }
        };
        let left = config
            .max_new_tokens
            .min(self.model.max_context() - prompt.len());
        let row = Row {
            prompt_tokens: prompt.len(),
            context: prompt,
            counts: Vec::new(),
            sampler,
            out: Generation::start(self.tokenizer.is_some()),
            stream: TokenStream::new(),
            config,
            frequency_penalty,
            presence_penalty,
            left,
            sink,
        };
        if row.left == 0 {
            self.finish(row);
            return;
        }
        let device = self.model.device();
        let ids: Vec<i64> = row.context.iter().map(|&t| t as i64).collect();
        let tokens = Tensor::from_data(TensorData::new(ids, [1, row.prompt_tokens]), &device);
        let mut cache = self.model.new_cache(vec![0]);
        let logits = self.model.forward(tokens, &mut cache, false);
        let Some(row) = self.sample_rows(vec![row], logits).0.pop() else {
            return;
        };
        let cache = match self.groups.first_mut() {
            Some(group) => match self.model.append_cache(&mut group.cache, cache) {
                Ok(()) => {
                    group.rows.push(row);
                    return;
                }
                Err(cache) => cache,
            },
            None => cache,
        };
        self.groups.push(Group {
            cache,
            rows: vec![row],
        });
    }

    /// One decode step for every sequence in flight: each gets one token (and its events);
    /// those that end leave the batch.
    pub fn step(&mut self) {
        let model = self.model;
        let device = model.device();
        let mut groups = std::mem::take(&mut self.groups);
        for mut group in groups.drain(..) {
            let ids: Vec<i64> = group
                .rows
                .iter()
                .map(|r| *r.context.last().expect("prompt is not empty") as i64)
                .collect();
            let n = ids.len();
            let tokens = Tensor::from_data(TensorData::new(ids, [n, 1]), &device);
            let logits = model.forward(tokens, &mut group.cache, false);
            let (rows, kept) = self.sample_rows(std::mem::take(&mut group.rows), logits);
            if rows.is_empty() {
                continue;
            }
            if rows.len() < n && !model.retain_cache_rows(&mut group.cache, &kept) {
                for mut row in rows {
                    row.sink.send(BatchEvent::Failed(Error::arg(
                        "model",
                        "it batches sequences but cannot drop finished ones",
                    )));
                }
                continue;
            }
            group.rows = rows;
            self.groups.push(group);
        }
    }

    /// Samples one token per row from `logits` `[rows, 1, vocab]` and sends the events.
    /// Returns the rows that go on with their indices in `rows`; the others were sent `Done`
    /// (or `Failed`, or were dropped because nobody listens).
    fn sample_rows(&self, rows: Vec<Row>, logits: Tensor<B, 3>) -> (Vec<Row>, Vec<usize>) {
        let vocab = self.model.vocab_size();
        let logits: Vec<f32> = match logits.into_data().convert::<f32>().into_vec() {
            Ok(l) => l,
            Err(e) => {
                for mut row in rows {
                    row.sink
                        .send(BatchEvent::Failed(Error::arg("logits", format!("{e:?}"))));
                }
                return (Vec::new(), Vec::new());
            }
        };
        let mut kept = Vec::with_capacity(rows.len());
        let mut indices = Vec::with_capacity(rows.len());
        for (i, mut row) in rows.into_iter().enumerate() {
            let row_logits = &mut logits[i * vocab..(i + 1) * vocab].to_vec();
            apply_frequency_presence_penalties(
                row_logits,
                &row.counts,
                row.frequency_penalty,
                row.presence_penalty,
            );
            row.config
                .process_logits(row_logits, &row.context, row.out.tokens.len());
            let token = row.sampler.sample(row_logits, &row.context);
            row.context.push(token);
            match row.counts.iter_mut().find(|(t, _)| *t == token) {
                Some((_, c)) => *c += 1,
                None => row.counts.push((token, 1)),
            }
            row.left -= 1;
            let Row {
                out,
                config,
                stream,
                sink,
                ..
            } = &mut row;
            let mut listening = !sink.is_closed();
            // A closed sink is noticed through `listening`, not by cancelling the sequence.
            let accepted = out.accept(token, config, self.tokenizer, stream, |piece| {
                if listening {
                    listening = sink.send(BatchEvent::Text(piece.to_string()));
                }
                true
            });
            match accepted {
                _ if !listening => {}
                Err(e) => {
                    row.sink.send(BatchEvent::Failed(e));
                }
                Ok(true) => self.finish(row),
                Ok(false) if row.left == 0 => self.finish(row),
                Ok(false) => {
                    kept.push(row);
                    indices.push(i);
                }
            }
        }
        (kept, indices)
    }

    /// Streams what was held back and sends `Done`.
    fn finish(&self, mut row: Row) {
        if let Some(tokenizer) = self.tokenizer {
            let Row {
                out, stream, sink, ..
            } = &mut row;
            let mut listening = true;
            let flushed = out.flush(tokenizer, stream, |rest| {
                listening = sink.send(BatchEvent::Text(rest.to_string()));
            });
            if let Err(e) = flushed {
                row.sink.send(BatchEvent::Failed(e));
                return;
            }
            if !listening {
                return;
            }
        }
        row.sink.send(BatchEvent::Done {
            generation: row.out,
            prompt_tokens: row.prompt_tokens,
        });
    }
}
