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

/// Bookkeeping of one row of an [`AnchorBatchSession`]: one entry per slot of the padded cache
/// (padding slots included, `valid == false`), and the row's own counters.
#[derive(Debug, Clone, Default)]
struct Row {
    seg: Vec<i64>,
    anchor: Vec<bool>,
    index: Vec<i64>,
    valid: Vec<bool>,
    /// Real positions held in the cache (the `true` entries of `valid`).
    len: usize,
    seen: usize,
    sentence: i64,
    positions: Vec<i64>,
    peak: usize,
}

/// Index every padding slot carries: no real token has it, so the mask's "every query sees its
/// own index" rule lets a padding query see padding only, and a real query never.
const PAD_INDEX: i64 = -1;

/// Incremental decoding of a batch of independent rows with anchor-based KV-cache compression.
///
/// Each [`feed`](Self::feed) takes one chunk per row (a prefill or a decode step; rows may give
/// chunks of different lengths, an empty one included) and runs them as one forward under the
/// AnSAN mask over each row's cached keys and chunk. Every row keeps its own sentence counter,
/// token count, rotary positions and compaction: after the forward each row keeps only its
/// anchors and the tokens after its last anchor, as [`AnchorSession`] does for one row.
///
/// Layout: one `[batch, kv_heads, width, head_dim]` cache per layer, `width` the longest row's
/// slot count; shorter rows are padded. A chunk is right-padded to the longest chunk with the
/// pad id ([`with_pad_id`](Self::with_pad_id)); padding slots are marked invalid, so the mask
/// hides them from every real query, and after each forward every row is gathered down to its
/// kept real slots (padding dropped), then padded at the end to the new longest row. Padding
/// never counts as a token, an anchor or a position.
#[derive(Debug, Clone)]
pub struct AnchorBatchSession<'m, B: Backend> {
    model: &'m Llama<B>,
    anchors: AnchorSet,
    mode: PositionMode,
    pad_id: u32,
    caches: Vec<KvCache<B>>,
    rows: Vec<Row>,
    width: usize,
    peak_width: usize,
}

impl<'m, B: Backend> AnchorBatchSession<'m, B> {
    /// An empty session of `batch` rows; padding uses token id 0 until
    /// [`with_pad_id`](Self::with_pad_id).
    pub fn new(model: &'m Llama<B>, anchors: AnchorSet, mode: PositionMode, batch: usize) -> Self {
        Self {
            model,
            anchors,
            mode,
            pad_id: 0,
            caches: vec![KvCache::new(); model.config().num_hidden_layers],
            rows: vec![Row::default(); batch],
            width: 0,
            peak_width: 0,
        }
    }

    /// The token id fed in padding slots (never attended, never kept; it must be in the
    /// vocabulary).
    pub fn with_pad_id(mut self, pad_id: u32) -> Self {
        self.pad_id = pad_id;
        self
    }

    /// Feeds one chunk per row; returns logits `[batch, n, vocab]`, `n` the longest chunk: row
    /// `r`'s logits are its first `chunks[r].len()` positions (the rest is padding). A row with
    /// an empty chunk is left as it was.
    pub fn feed<T: AsRef<[u32]>>(&mut self, chunks: &[T]) -> Result<Tensor<B, 3>> {
        let batch = self.rows.len();
        if chunks.len() != batch {
            return Err(AnchorError::arg(
                "chunks",
                format!("{} chunks for a batch of {batch}", chunks.len()),
            ));
        }
        let n = chunks.iter().map(|c| c.as_ref().len()).max().unwrap_or(0);
        if n == 0 {
            return Err(AnchorError::arg("chunk", "an empty chunk"));
        }
        let vocab = self.model.config().vocab_size;
        let padded = chunks.iter().any(|c| c.as_ref().len() < n);
        let bad = chunks
            .iter()
            .flat_map(|c| c.as_ref().iter())
            .chain(padded.then_some(&self.pad_id))
            .find(|&&t| t as usize >= vocab);
        if let Some(bad) = bad {
            return Err(AnchorError::arg(
                "chunk",
                format!("token id {bad} is outside the vocabulary of {vocab}"),
            ));
        }
        let device = self.model.device();
        let keys = self.width + n;
        let mut ids = Vec::with_capacity(batch * n);
        let mut positions = Vec::with_capacity(batch * n);
        let (mut q_seg, mut q_anchor, mut q_index, mut q_valid) = (
            Vec::with_capacity(batch * n),
            Vec::with_capacity(batch * n),
            Vec::with_capacity(batch * n),
            Vec::with_capacity(batch * n),
        );
        for (row, chunk) in self.rows.iter_mut().zip(chunks) {
            let chunk = chunk.as_ref();
            let start = q_seg.len();
            for j in 0..n {
                let token = chunk.get(j).copied();
                let is_anchor = token.is_some_and(|t| self.anchors.contains(t));
                ids.push(token.unwrap_or(self.pad_id) as i64);
                q_seg.push(row.sentence);
                q_anchor.push(is_anchor);
                q_valid.push(token.is_some());
                if token.is_some() {
                    let position = match self.mode {
                        PositionMode::Compacted => (row.len + j) as i64,
                        PositionMode::True => (row.seen + j) as i64,
                    };
                    q_index.push((row.seen + j) as i64);
                    positions.push(position);
                    row.positions.push(position);
                } else {
                    q_index.push(PAD_INDEX);
                    positions.push(0);
                }
                row.sentence += is_anchor as i64;
            }
            row.seg.extend(&q_seg[start..]);
            row.anchor.extend(&q_anchor[start..]);
            row.index.extend(&q_index[start..]);
            row.valid.extend(&q_valid[start..]);
            row.peak = row.peak.max(row.len + chunk.len());
            row.len += chunk.len();
            row.seen += chunk.len();
        }
        let int = |v: Vec<i64>, len| {
            Tensor::<B, 2, Int>::from_data(TensorData::new(v, [batch, len]), &device)
        };
        let boolean = |v: Vec<bool>, len| {
            Tensor::<B, 2, Bool>::from_data(TensorData::new(v, [batch, len]), &device)
        };
        let all = |f: fn(&Row) -> &[i64]| -> Vec<i64> {
            self.rows
                .iter()
                .flat_map(|r| f(r).iter().copied())
                .collect()
        };
        let all_b = |f: fn(&Row) -> &[bool]| -> Vec<bool> {
            self.rows
                .iter()
                .flat_map(|r| f(r).iter().copied())
                .collect()
        };
        let k = SegTensors {
            seg: int(all(|r| &r.seg), keys),
            anchor: boolean(all_b(|r| &r.anchor), keys),
            index: int(all(|r| &r.index), keys),
            valid: boolean(all_b(|r| &r.valid), keys),
        };
        let q = SegTensors {
            seg: int(q_seg, n),
            anchor: boolean(q_anchor, n),
            index: int(q_index, n),
            valid: boolean(q_valid, n),
        };
        let mask = ansan_mask(&q, &k);
        let logits = self.model.forward_masked(
            int(ids, n),
            int(positions, n),
            Some(mask),
            Some(&mut self.caches),
        )?;
        self.width = keys;
        self.peak_width = self.peak_width.max(keys);
        self.compact();
        Ok(logits)
    }

    /// Keeps, in every row, the real slots that are anchors or come after the row's last anchor
    /// (all real slots while it has none), gathered to the front and padded at the end to the
    /// longest row. Does nothing when no row drops a slot.
    fn compact(&mut self) {
        let width = self.width;
        let keep: Vec<Vec<usize>> = self
            .rows
            .iter()
            .map(|row| {
                let last = (0..width).rev().find(|&i| row.valid[i] && row.anchor[i]);
                (0..width)
                    .filter(|&i| row.valid[i] && (row.anchor[i] || last.is_none_or(|l| i > l)))
                    .collect()
            })
            .collect();
        if keep.iter().all(|k| k.len() == width) {
            return;
        }
        let new_width = keep.iter().map(Vec::len).max().unwrap_or(0);
        let batch = self.rows.len();
        let mut flat = Vec::with_capacity(batch * new_width);
        for (r, (row, keep)) in self.rows.iter_mut().zip(&keep).enumerate() {
            let base = (r * width) as i64;
            flat.extend(keep.iter().map(|&i| base + i as i64));
            // Padding slots copy the row's first slot; the mask hides them.
            flat.extend(std::iter::repeat_n(base, new_width - keep.len()));
            let pick = |v: &[i64], fill: i64| -> Vec<i64> {
                let mut out: Vec<i64> = keep.iter().map(|&i| v[i]).collect();
                out.resize(new_width, fill);
                out
            };
            let pick_b = |v: &[bool]| -> Vec<bool> {
                let mut out: Vec<bool> = keep.iter().map(|&i| v[i]).collect();
                out.resize(new_width, false);
                out
            };
            row.seg = pick(&row.seg, 0);
            row.index = pick(&row.index, PAD_INDEX);
            row.anchor = pick_b(&row.anchor);
            row.valid = pick_b(&row.valid);
            row.len = keep.len();
        }
        self.width = new_width;
        if new_width == 0 {
            self.caches = vec![KvCache::new(); self.caches.len()];
            return;
        }
        let device = self.model.device();
        let idx =
            Tensor::<B, 1, Int>::from_data(TensorData::new(flat, [batch * new_width]), &device);
        let gather = |t: &Tensor<B, 4>| {
            let [b, h, w, d] = t.dims();
            t.clone()
                .swap_dims(1, 2)
                .reshape([b * w, h, d])
                .select(0, idx.clone())
                .reshape([b, new_width, h, d])
                .swap_dims(1, 2)
        };
        for cache in &mut self.caches {
            if let (Some(k), Some(v)) = (cache.keys(), cache.values()) {
                *cache = KvCache::from_parts(gather(&k), gather(&v));
            }
        }
    }

    /// Rows in the batch.
    pub fn batch(&self) -> usize {
        self.rows.len()
    }

    /// Real positions row `row` holds in the KV cache now.
    pub fn cache_len(&self, row: usize) -> usize {
        self.rows[row].len
    }

    /// [`cache_len`](Self::cache_len) of every row.
    pub fn cache_lens(&self) -> Vec<usize> {
        self.rows.iter().map(|r| r.len).collect()
    }

    /// Most real positions row `row` held during a forward (cached + chunk).
    pub fn peak_len(&self, row: usize) -> usize {
        self.rows[row].peak
    }

    /// Tokens fed to row `row` so far.
    pub fn seen(&self, row: usize) -> usize {
        self.rows[row].seen
    }

    /// The rotary position of every token fed to row `row` so far.
    pub fn positions(&self, row: usize) -> &[i64] {
        &self.rows[row].positions
    }

    /// Slots of the padded cache tensors now (the longest row; shorter rows are padded).
    pub fn width(&self) -> usize {
        self.width
    }

    /// Most slots the padded cache tensors held during a forward (cached + chunk).
    pub fn peak_width(&self) -> usize {
        self.peak_width
    }

    /// The model.
    pub fn model(&self) -> &'m Llama<B> {
        self.model
    }
}

/// Incremental decoding with anchor-based KV-cache compression for one sequence (the paper's
/// setting): an [`AnchorBatchSession`] of one row.
///
/// Each [`feed`](Self::feed) runs one chunk (a prefill or a decode step) under the AnSAN mask
/// over the cached keys and the chunk, then, when the chunk holds an anchor, keeps only the
/// earlier anchors, the chunk's anchors and the tokens after its last anchor.
#[derive(Debug, Clone)]
pub struct AnchorSession<'m, B: Backend> {
    inner: AnchorBatchSession<'m, B>,
}

impl<'m, B: Backend> AnchorSession<'m, B> {
    /// An empty session.
    pub fn new(model: &'m Llama<B>, anchors: AnchorSet, mode: PositionMode) -> Self {
        Self {
            inner: AnchorBatchSession::new(model, anchors, mode, 1),
        }
    }

    /// Feeds a chunk of tokens; returns their logits `[n, vocab]`.
    pub fn feed(&mut self, tokens: &[u32]) -> Result<Tensor<B, 2>> {
        let logits = self.inner.feed(&[tokens])?;
        let [_, n, vocab] = logits.dims();
        Ok(logits.reshape([n, vocab]))
    }

    /// Positions now held in the KV cache.
    pub fn cache_len(&self) -> usize {
        self.inner.cache_len(0)
    }

    /// Most positions the cache held during a forward (cached + chunk).
    pub fn peak_len(&self) -> usize {
        self.inner.peak_len(0)
    }

    /// Tokens fed so far.
    pub fn seen(&self) -> usize {
        self.inner.seen(0)
    }

    /// The rotary position used for every token fed so far.
    pub fn positions(&self) -> &[i64] {
        self.inner.positions(0)
    }

    /// The model.
    pub fn model(&self) -> &'m Llama<B> {
        self.inner.model()
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
    /// Bytes of the KV tensors held now, every layer, read from the tensors themselves
    /// ([`KvCache::bytes`]), not computed from the config.
    fn kv_bytes(&self) -> usize;
}

impl<B: Backend> AnchorBatchSession<'_, B> {
    /// Bytes of the KV tensors held now, every layer and row ([`KvCache::bytes`]; padding
    /// slots of shorter rows included).
    pub fn kv_bytes(&self) -> usize {
        self.caches.iter().map(KvCache::bytes).sum()
    }
}

impl<B: Backend> Session<B> for AnchorSession<'_, B> {
    fn feed(&mut self, tokens: &[u32]) -> Result<Tensor<B, 2>> {
        AnchorSession::feed(self, tokens)
    }
    fn cache_len(&self) -> usize {
        AnchorSession::cache_len(self)
    }
    fn kv_bytes(&self) -> usize {
        self.inner.kv_bytes()
    }
}

impl<B: Backend> Session<B> for FullSession<'_, B> {
    fn feed(&mut self, tokens: &[u32]) -> Result<Tensor<B, 2>> {
        FullSession::feed(self, tokens)
    }
    fn cache_len(&self) -> usize {
        FullSession::cache_len(self)
    }
    fn kv_bytes(&self) -> usize {
        self.cache.layers.iter().map(KvCache::bytes).sum()
    }
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
/// ([`StreamControl`]). [`anchor_generate_batch`] with one prompt.
pub fn anchor_generate<B: Backend, R: StreamControl>(
    model: &Llama<B>,
    prompt: &[u32],
    anchors: &AnchorSet,
    mode: PositionMode,
    config: &GenerationConfig,
    tokenizer: Option<&Tokenizer>,
    on_token: impl FnMut(TokenEvent<'_>) -> R,
) -> Result<AnchorGeneration> {
    let mut out = anchor_generate_batch(
        model,
        &[prompt.to_vec()],
        anchors,
        mode,
        config,
        tokenizer,
        on_token,
    )?;
    Ok(out.remove(0))
}

/// Generates after each of `prompts` with anchor-based inference, as one batch through an
/// [`AnchorBatchSession`] (each row with its own anchors, positions and cache compaction), the
/// way kiln-core's `generate_tokens` runs a batch: one sampler per row, every
/// [`TokenEvent`] carries its row, a `Break` ends that row only, rows finish on their own and a
/// finished row is fed padding (an empty chunk) while the others go on. Each row gives the
/// tokens and cache statistics it gives alone ([`anchor_generate`]).
pub fn anchor_generate_batch<B: Backend, R: StreamControl>(
    model: &Llama<B>,
    prompts: &[Vec<u32>],
    anchors: &AnchorSet,
    mode: PositionMode,
    config: &GenerationConfig,
    tokenizer: Option<&Tokenizer>,
    mut on_token: impl FnMut(TokenEvent<'_>) -> R,
) -> Result<Vec<AnchorGeneration>> {
    if prompts.is_empty() {
        return Ok(Vec::new());
    }
    config.check_supported("anchor-based generation", true)?;
    if !config.stop_strings.is_empty() && tokenizer.is_none() {
        return Err(AnchorError::arg(
            "stop_strings",
            "need a tokenizer to match text",
        ));
    }
    if let Some(row) = prompts.iter().position(Vec::is_empty) {
        return Err(AnchorError::arg(
            "prompt",
            format!("prompt {row} has no tokens"),
        ));
    }
    let config = &config
        .clone()
        .resolve(model.eos_token_ids(), model.pad_token_id());
    let batch = prompts.len();
    let mut session =
        AnchorBatchSession::new(model, anchors.clone(), mode, batch).with_pad_id(config.pad());
    let mut samplers: Vec<Sampler> = (0..batch)
        .map(|_| Sampler::new(config.sampling.clone()))
        .collect::<std::result::Result<_, _>>()?;
    let mut contexts = prompts.to_vec();
    let mut outputs: Vec<Generation> = (0..batch)
        .map(|_| Generation::start(tokenizer.is_some()))
        .collect();
    let mut streams = vec![TokenStream::new(); batch];
    let mut done = vec![false; batch];
    let mut logits = last_rows(session.feed(prompts)?, prompts)?;
    let mut chunks: Vec<Vec<u32>> = vec![Vec::new(); batch];
    for _ in 0..config.max_new_tokens {
        for row in 0..batch {
            chunks[row].clear();
            if done[row] {
                continue;
            }
            let row_logits = &mut logits[row];
            config.process_logits(row_logits, &contexts[row], outputs[row].tokens.len());
            let token = samplers[row].sample(row_logits, &contexts[row]);
            contexts[row].push(token);
            done[row] = outputs[row].step(
                row,
                token,
                config,
                tokenizer,
                &mut streams[row],
                &mut on_token,
            )?;
            if !done[row] {
                chunks[row].push(token);
            }
        }
        if done.iter().all(|&d| d) {
            break;
        }
        logits = last_rows(session.feed(&chunks)?, &chunks)?;
    }
    for (row, out) in outputs.iter_mut().enumerate() {
        out.flush_events(row, tokenizer, &mut streams[row], &mut on_token)?;
    }
    Ok(outputs
        .into_iter()
        .enumerate()
        .map(|(row, out)| AnchorGeneration {
            tokens: out.tokens,
            text: out.text,
            finish: out.finish,
            cache_len: session.cache_len(row),
            peak_len: session.peak_len(row),
            seen: session.seen(row),
        })
        .collect())
}

/// The logits of the last token of each non-empty chunk, from `[batch, n, vocab]` logits of
/// right-padded chunks (an empty vector for an empty chunk); only those rows leave the device.
fn last_rows<B: Backend>(logits: Tensor<B, 3>, chunks: &[Vec<u32>]) -> Result<Vec<Vec<f32>>> {
    let [batch, n, vocab] = logits.dims();
    let picked: Vec<i64> = chunks
        .iter()
        .enumerate()
        .filter(|(_, c)| !c.is_empty())
        .map(|(r, c)| (r * n + c.len() - 1) as i64)
        .collect();
    let count = picked.len();
    let idx = Tensor::<B, 1, Int>::from_data(TensorData::new(picked, [count]), &logits.device());
    let values = logits
        .reshape([batch * n, vocab])
        .select(0, idx)
        .into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .map_err(|e| AnchorError::arg("logits", format!("logits: {e:?}")))?;
    let mut rows = values.chunks_exact(vocab);
    Ok(chunks
        .iter()
        .map(|c| {
            if c.is_empty() {
                Vec::new()
            } else {
                rows.next().map(<[f32]>::to_vec).unwrap_or_default()
            }
        })
        .collect())
}
