//! Anchor-based inference: a KV cache that keeps only anchors and the unfinished sentence.

use burn::prelude::*;
use kiln_core::nn::KvCache;
use kiln_core::{
    CausalLm, FinishReason, Generation, GenerationConfig, Sampler, StreamControl, TokenEvent,
    TokenStream, Tokenizer,
};
use kiln_llama::{Llama, LlamaCache, LlamaConfig};

use crate::mask::{SegTensors, ansan_mask};
use crate::{AnchorError, AnchorSet, Result};

/// Where a new token's rotary position comes from (`"compacted"` or `"true"` in JSON).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PositionMode {
    /// The compacted cache length plus the offset in the chunk (the paper's code: HF derives
    /// positions from `past_key_values_length`, which shrinks when the cache is compacted).
    Compacted,
    /// The token's true index in the text, as if nothing had been dropped.
    True,
}

impl std::str::FromStr for PositionMode {
    type Err = AnchorError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "compacted" => Ok(Self::Compacted),
            "true" => Ok(Self::True),
            other => Err(AnchorError::arg(
                "position mode",
                format!("position mode `{other}`: expected `compacted` or `true`"),
            )),
        }
    }
}

/// Bytes of an f32 KV cache of `len` positions for one sequence of `config`'s model.
pub fn kv_bytes(config: &LlamaConfig, len: usize) -> usize {
    config.num_hidden_layers * 2 * config.num_key_value_heads * config.head_dim * len * 4
}

/// Incremental decoding with anchor-based KV-cache compression (batch of one, as the paper).
///
/// Each [`feed`](Self::feed) runs one chunk (a prefill or a decode step) under the AnSAN mask
/// over the cached keys and the chunk, then, when the chunk holds an anchor, keeps only the
/// earlier anchors, the chunk's anchors and the tokens after its last anchor.
#[derive(Debug, Clone)]
pub struct AnchorSession<'m, B: Backend> {
    model: &'m Llama<B>,
    anchors: AnchorSet,
    mode: PositionMode,
    caches: Vec<KvCache<B>>,
    k_seg: Vec<i64>,
    k_anchor: Vec<bool>,
    k_index: Vec<i64>,
    seen: usize,
    sentence: i64,
    positions: Vec<i64>,
    peak: usize,
}

impl<'m, B: Backend> AnchorSession<'m, B> {
    /// An empty session.
    pub fn new(model: &'m Llama<B>, anchors: AnchorSet, mode: PositionMode) -> Self {
        Self {
            model,
            anchors,
            mode,
            caches: vec![KvCache::new(); model.config().num_hidden_layers],
            k_seg: Vec::new(),
            k_anchor: Vec::new(),
            k_index: Vec::new(),
            seen: 0,
            sentence: 0,
            positions: Vec::new(),
            peak: 0,
        }
    }

    /// Feeds a chunk of tokens; returns their logits `[n, vocab]`.
    pub fn feed(&mut self, tokens: &[u32]) -> Result<Tensor<B, 2>> {
        let n = tokens.len();
        if n == 0 {
            return Err(AnchorError::arg("chunk", "an empty chunk"));
        }
        let vocab = self.model.config().vocab_size;
        if let Some(bad) = tokens.iter().find(|&&t| t as usize >= vocab) {
            return Err(AnchorError::arg(
                "chunk",
                format!("token id {bad} is outside the vocabulary of {vocab}"),
            ));
        }
        let device = self.model.device();
        let cached = self.k_seg.len();
        let (mut q_seg, mut q_anchor, mut q_index, mut positions) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        for (j, &t) in tokens.iter().enumerate() {
            let is_anchor = self.anchors.contains(t);
            q_seg.push(self.sentence);
            q_anchor.push(is_anchor);
            q_index.push((self.seen + j) as i64);
            positions.push(match self.mode {
                PositionMode::Compacted => (cached + j) as i64,
                PositionMode::True => (self.seen + j) as i64,
            });
            self.sentence += is_anchor as i64;
        }
        self.k_seg.extend(&q_seg);
        self.k_anchor.extend(&q_anchor);
        self.k_index.extend(&q_index);
        let keys = self.k_seg.len();
        let int = |v: &[i64], len| {
            Tensor::<B, 2, Int>::from_data(TensorData::new(v.to_vec(), [1, len]), &device)
        };
        let boolean = |v: &[bool], len| {
            Tensor::<B, 2, Bool>::from_data(TensorData::new(v.to_vec(), [1, len]), &device)
        };
        let q = SegTensors {
            seg: int(&q_seg, n),
            anchor: boolean(&q_anchor, n),
            index: int(&q_index, n),
            valid: boolean(&vec![true; n], n),
        };
        let k = SegTensors {
            seg: int(&self.k_seg, keys),
            anchor: boolean(&self.k_anchor, keys),
            index: int(&self.k_index, keys),
            valid: boolean(&vec![true; keys], keys),
        };
        let mask = ansan_mask(&q, &k);
        let ids: Vec<i64> = tokens.iter().map(|&t| t as i64).collect();
        let logits = self.model.forward_masked(
            int(&ids, n),
            int(&positions, n),
            Some(mask),
            Some(&mut self.caches),
        )?;
        self.positions.extend(positions);
        self.seen += n;
        self.peak = self.peak.max(keys);

        if q_anchor.iter().any(|&a| a) {
            let last = self.k_anchor.iter().rposition(|&a| a).unwrap_or(0);
            let keep: Vec<usize> = (0..keys)
                .filter(|&i| self.k_anchor[i] || i > last)
                .collect();
            if keep.len() < keys {
                let idx: Vec<i64> = keep.iter().map(|&i| i as i64).collect();
                let idx =
                    Tensor::<B, 1, Int>::from_data(TensorData::new(idx, [keep.len()]), &device);
                for cache in &mut self.caches {
                    cache.retain(idx.clone());
                }
                self.k_seg = keep.iter().map(|&i| self.k_seg[i]).collect();
                self.k_anchor = keep.iter().map(|&i| self.k_anchor[i]).collect();
                self.k_index = keep.iter().map(|&i| self.k_index[i]).collect();
            }
        }
        Ok(logits.reshape([n, vocab]))
    }

    /// Positions now held in the KV cache.
    pub fn cache_len(&self) -> usize {
        self.k_seg.len()
    }

    /// Most positions the cache held during a forward (cached + chunk).
    pub fn peak_len(&self) -> usize {
        self.peak
    }

    /// Tokens fed so far.
    pub fn seen(&self) -> usize {
        self.seen
    }

    /// The rotary position used for every token fed so far.
    pub fn positions(&self) -> &[i64] {
        &self.positions
    }

    /// The model.
    pub fn model(&self) -> &'m Llama<B> {
        self.model
    }
}

/// The baseline: the model's ordinary causal forward with a full KV cache.
#[derive(Debug, Clone)]
pub struct FullSession<'m, B: Backend> {
    model: &'m Llama<B>,
    cache: LlamaCache<B>,
}

impl<'m, B: Backend> FullSession<'m, B> {
    /// An empty session.
    pub fn new(model: &'m Llama<B>) -> Self {
        Self {
            model,
            cache: model.new_cache(vec![0]),
        }
    }

    /// Feeds a chunk; returns its logits `[n, vocab]`.
    pub fn feed(&mut self, tokens: &[u32]) -> Result<Tensor<B, 2>> {
        let n = tokens.len();
        let vocab = self.model.config().vocab_size;
        if n == 0 {
            return Err(AnchorError::arg("chunk", "an empty chunk"));
        }
        if let Some(bad) = tokens.iter().find(|&&t| t as usize >= vocab) {
            return Err(AnchorError::arg(
                "chunk",
                format!("token id {bad} is outside the vocabulary of {vocab}"),
            ));
        }
        let ids: Vec<i64> = tokens.iter().map(|&t| t as i64).collect();
        let ids = Tensor::from_data(TensorData::new(ids, [1, n]), &self.model.device());
        Ok(self
            .model
            .forward(ids, &mut self.cache, true)
            .reshape([n, vocab]))
    }

    /// Positions held in the KV cache.
    pub fn cache_len(&self) -> usize {
        self.cache.layers.first().map_or(0, KvCache::len)
    }
}

/// A decoding session, full or anchor-based.
pub trait Session<B: Backend>: Clone {
    /// Feeds a chunk; returns its logits `[n, vocab]`.
    fn feed(&mut self, tokens: &[u32]) -> Result<Tensor<B, 2>>;
    /// Positions held in the KV cache now.
    fn cache_len(&self) -> usize;
}

impl<B: Backend> Session<B> for AnchorSession<'_, B> {
    fn feed(&mut self, tokens: &[u32]) -> Result<Tensor<B, 2>> {
        AnchorSession::feed(self, tokens)
    }
    fn cache_len(&self) -> usize {
        AnchorSession::cache_len(self)
    }
}

impl<B: Backend> Session<B> for FullSession<'_, B> {
    fn feed(&mut self, tokens: &[u32]) -> Result<Tensor<B, 2>> {
        FullSession::feed(self, tokens)
    }
    fn cache_len(&self) -> usize {
        FullSession::cache_len(self)
    }
}

/// Last row of `[n, vocab]` logits as a vector.
pub(crate) fn last_row<B: Backend>(logits: Tensor<B, 2>) -> Result<Vec<f32>> {
    let [n, vocab] = logits.dims();
    logits
        .narrow(0, n - 1, 1)
        .reshape([vocab])
        .into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .map_err(|e| AnchorError::arg("logits", format!("logits: {e:?}")))
}

/// One anchor-based generation and its cache statistics.
#[derive(Debug, Clone, PartialEq)]
pub struct AnchorGeneration {
    /// Generated ids (an EOS that ended it included).
    pub tokens: Vec<u32>,
    /// Decoded text of `tokens` (special tokens skipped, cut at a stop string), when a
    /// tokenizer was given.
    pub text: Option<String>,
    /// Why it stopped.
    pub finish: FinishReason,
    /// Cache positions at the end.
    pub cache_len: usize,
    /// Most cache positions held during a forward.
    pub peak_len: usize,
    /// Tokens seen (prompt + generated).
    pub seen: usize,
}

/// Generates after `prompt` with anchor-based inference, under kiln-core's one
/// [`GenerationConfig`] (EOS ids left `None` are the model's; stop strings need `tokenizer`;
/// the n-gram ban and a forced first token apply; no beam search). `on_token` sees each step
/// as kiln-core's `generate_tokens` reports it, a [`TokenEvent`] (row 0, the id, the text it
/// makes final when `tokenizer` is given), and returns `()` or a
/// [`ControlFlow`](std::ops::ControlFlow) whose `Break` stops after that token
/// ([`StreamControl`]).
pub fn anchor_generate<B: Backend, R: StreamControl>(
    model: &Llama<B>,
    prompt: &[u32],
    anchors: &AnchorSet,
    mode: PositionMode,
    config: &GenerationConfig,
    tokenizer: Option<&Tokenizer>,
    mut on_token: impl FnMut(TokenEvent<'_>) -> R,
) -> Result<AnchorGeneration> {
    config.check_supported("anchor-based generation", true)?;
    if !config.stop_strings.is_empty() && tokenizer.is_none() {
        return Err(AnchorError::arg(
            "stop_strings",
            "need a tokenizer to match text",
        ));
    }
    let config = &config
        .clone()
        .resolve(model.eos_token_ids(), model.pad_token_id());
    let mut session = AnchorSession::new(model, anchors.clone(), mode);
    let mut sampler = Sampler::new(config.sampling.clone())?;
    let mut context = prompt.to_vec();
    let mut out = Generation::start(tokenizer.is_some());
    let mut stream = TokenStream::new();
    let mut logits = last_row(session.feed(prompt)?)?;
    for step in 0..config.max_new_tokens {
        config.process_logits(&mut logits, &context, step);
        let token = sampler.sample(&mut logits, &context);
        context.push(token);
        let mut text = String::new();
        let finished = out.accept(token, config, tokenizer, &mut stream, |piece| {
            text.push_str(piece);
            true
        })?;
        let go_on = on_token(TokenEvent {
            row: 0,
            id: Some(token),
            text: &text,
        })
        .proceed();
        if !finished && !go_on {
            out.finish = FinishReason::Cancelled;
        }
        if finished || !go_on {
            break;
        }
        logits = last_row(session.feed(&[token])?)?;
    }
    if let Some(tokenizer) = tokenizer {
        out.flush(tokenizer, &mut stream, |rest| {
            let _ = on_token(TokenEvent {
                row: 0,
                id: None,
                text: rest,
            });
        })?;
    }
    Ok(AnchorGeneration {
        tokens: out.tokens,
        text: out.text,
        finish: out.finish,
        cache_len: session.cache_len(),
        peak_len: session.peak_len(),
        seen: session.seen(),
    })
}
