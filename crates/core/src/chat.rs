//! A multi-turn conversation with a decoder-only model that keeps its KV cache between turns.
//!
//! Every turn renders the whole conversation with the model's chat template (so the template
//! decides the format, as in HF `apply_chat_template`), then feeds the model only the tokens its
//! cache does not hold yet. Where the new rendering departs from what the cache holds (a reply
//! that re-tokenises differently, old turns dropped to fit the context) the cache is cut back to
//! the common prefix, or rebuilt when the model cannot cut it (a sliding window has dropped old
//! keys). Either way a reply is what a fresh `generate` on the rendered conversation gives.

use burn::prelude::*;

use crate::generate::{CausalLm, Generation, GenerationConfig, StreamControl};
use crate::sampling::Sampler;
use crate::tokenizer::{Message, TokenStream, Tokenizer};
use crate::{Error, Result};

/// A conversation: its messages, and the model state for the tokens seen so far.
pub struct ChatSession<'a, B: Backend, M: CausalLm<B>> {
    model: &'a M,
    tokenizer: &'a Tokenizer,
    config: GenerationConfig,
    sampler: Sampler,
    system: Option<String>,
    messages: Vec<Message>,
    cache: Option<M::Cache>,
    /// Tokens whose keys/values the cache holds, in order.
    held: Vec<u32>,
    last_reused: usize,
    _backend: std::marker::PhantomData<B>,
}

impl<'a, B: Backend, M: CausalLm<B>> ChatSession<'a, B, M> {
    /// A new conversation. `config` holds the stopping rules (EOS ids, the model's when left
    /// `None`; stop strings; max new tokens per reply) and sampling; the sampler is seeded once
    /// for the whole session.
    pub fn new(
        model: &'a M,
        tokenizer: &'a Tokenizer,
        config: GenerationConfig,
        system: Option<String>,
    ) -> Result<Self> {
        if tokenizer.chat_template().is_none() {
            return Err(Error::ChatTemplate(
                "this model has no chat template (tokenizer_config.json `chat_template` or GGUF \
                 `tokenizer.chat_template`)"
                    .into(),
            ));
        }
        config.check_supported("chat", true)?;
        Ok(Self {
            model,
            tokenizer,
            sampler: Sampler::new(config.sampling.clone())?,
            config: config.resolve(model.eos_token_ids(), model.pad_token_id()),
            system,
            messages: Vec::new(),
            cache: None,
            held: Vec::new(),
            last_reused: 0,
            _backend: std::marker::PhantomData,
        })
    }

    /// The conversation so far (system message excluded).
    pub fn messages(&self) -> &[Message] {
        &self.messages
    }

    /// How many prompt tokens of the last turn came from the cache instead of a new prefill.
    pub fn last_reused(&self) -> usize {
        self.last_reused
    }

    /// Forgets the conversation (the system message stays).
    pub fn reset(&mut self) {
        self.messages.clear();
        self.cache = None;
        self.held.clear();
    }

    /// The prompt the model sees for the current messages.
    pub fn render(&self) -> Result<Vec<u32>> {
        self.render_messages(&self.messages)
    }

    fn render_messages(&self, messages: &[Message]) -> Result<Vec<u32>> {
        let mut all = Vec::with_capacity(messages.len() + 1);
        if let Some(system) = &self.system {
            all.push(Message::new("system", system.clone()));
        }
        all.extend(messages.iter().cloned());
        let text = self.tokenizer.apply_chat_template(&all, true)?;
        // The template writes BOS itself when the model wants one.
        self.tokenizer.encode(&text, false)
    }

    /// Adds `user`'s message, generates the assistant's reply (streamed to `on_text`), and adds
    /// it to the conversation. When the conversation no longer fits the model's context, the
    /// oldest turns are dropped; a single message that does not fit is an error and leaves the
    /// conversation as it was. `on_text` may return a
    /// [`ControlFlow`](std::ops::ControlFlow) to end the reply early ([`StreamControl`]); the
    /// reply so far is kept.
    pub fn reply<R: StreamControl>(
        &mut self,
        user: &str,
        mut on_text: impl FnMut(&str) -> R,
    ) -> Result<Generation> {
        let context = self.model.max_context();
        let mut messages = self.messages.clone();
        messages.push(Message::new("user", user));
        let prompt = loop {
            let prompt = self.render_messages(&messages)?;
            if prompt.len() < context {
                break prompt;
            }
            if messages.len() <= 1 {
                return Err(Error::ContextOverflow {
                    prompt: prompt.len(),
                    context,
                    detail: " (this message alone fills the context)".into(),
                });
            }
            // Drop the oldest exchange (user + assistant); the new message stays.
            let drop = 2.min(messages.len() - 1);
            messages.drain(..drop);
        };
        if prompt.is_empty() {
            return Err(Error::ChatTemplate(
                "the chat template rendered nothing".into(),
            ));
        }
        let vocab = self.model.vocab_size();
        if let Some(bad) = prompt.iter().find(|&&t| t as usize >= vocab) {
            return Err(Error::arg(
                "prompt",
                format!("token id {bad} is outside the vocabulary of {vocab}"),
            ));
        }

        // Reuse the longest common prefix of what the cache holds and the new prompt (at least
        // one prompt token must be fed, to get logits).
        let common = self
            .held
            .iter()
            .zip(&prompt)
            .take_while(|(a, b)| a == b)
            .count()
            .min(prompt.len() - 1);
        let reused = match self.cache.as_mut() {
            Some(_) if common == self.held.len() => true,
            Some(cache) if common > 0 => self.model.truncate_cache(cache, common),
            _ => false,
        };
        if reused {
            self.held.truncate(common);
        } else {
            self.cache = Some(self.model.new_cache(vec![0]));
            self.held.clear();
        }
        self.last_reused = self.held.len();
        let cache = self.cache.as_mut().expect("set above");
        let device = self.model.device();
        let mut feed: Vec<u32> = prompt[self.held.len()..].to_vec();
        let mut context_ids = prompt.clone();
        let mut stream = TokenStream::new();
        let mut out = Generation::start(true);
        let max_new = self.config.max_new_tokens.min(context - prompt.len());
        for _ in 0..max_new {
            let input = TensorData::new(
                feed.iter().map(|&t| t as i64).collect::<Vec<_>>(),
                [1, feed.len()],
            );
            let logits =
                self.model
                    .forward(Tensor::<B, 2, Int>::from_data(input, &device), cache, false);
            self.held.append(&mut feed);
            let mut logits: Vec<f32> = logits
                .into_data()
                .convert::<f32>()
                .into_vec()
                .map_err(|e| Error::arg("logits", format!("{e:?}")))?;
            self.config
                .process_logits(&mut logits, &context_ids, out.tokens.len());
            let token = self.sampler.sample(&mut logits, &context_ids);
            context_ids.push(token);
            if out.accept(
                token,
                &self.config,
                Some(self.tokenizer),
                &mut stream,
                |piece| on_text(piece).proceed(),
            )? {
                break;
            }
            feed = vec![token];
        }
        out.flush(self.tokenizer, &mut stream, |rest| {
            let _ = on_text(rest);
        })?;
        messages.push(Message::new(
            "assistant",
            out.text.clone().unwrap_or_default(),
        ));
        self.messages = messages;
        Ok(out)
    }
}
