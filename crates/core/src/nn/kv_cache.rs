use burn::prelude::*;

use super::AttentionMask;

/// Keys and values of one attention layer for the tokens seen so far,
/// `[batch, kv_heads, kept, head_dim]` each.
#[derive(Debug, Clone, Default)]
pub struct KvCache<B: Backend> {
    k: Option<Tensor<B, 4>>,
    v: Option<Tensor<B, 4>>,
}

impl<B: Backend> KvCache<B> {
    /// An empty cache.
    pub fn new() -> Self {
        Self { k: None, v: None }
    }

    /// Appends this step's keys and values; returns all keys and values this step attends to,
    /// and keeps only the last `keep` of them for the next step.
    pub fn update(
        &mut self,
        k: Tensor<B, 4>,
        v: Tensor<B, 4>,
        keep: usize,
    ) -> (Tensor<B, 4>, Tensor<B, 4>) {
        let k = match self.k.take() {
            Some(old) => Tensor::cat(vec![old, k], 2),
            None => k,
        };
        let v = match self.v.take() {
            Some(old) => Tensor::cat(vec![old, v], 2),
            None => v,
        };
        let len = k.dims()[2];
        let trim = |t: &Tensor<B, 4>| {
            if keep < len {
                t.clone().narrow(2, len - keep, keep)
            } else {
                t.clone()
            }
        };
        self.k = Some(trim(&k));
        self.v = Some(trim(&v));
        (k, v)
    }

    /// Number of cached positions.
    pub fn len(&self) -> usize {
        self.k.as_ref().map_or(0, |k| k.dims()[2])
    }

    /// True when nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Keeps only the first `len` cached positions (forgets the rest).
    pub fn truncate(&mut self, len: usize) {
        if len < self.len() {
            self.k = self.k.take().map(|k| k.narrow(2, 0, len));
            self.v = self.v.take().map(|v| v.narrow(2, 0, len));
        }
    }

    /// Keeps only the cached positions at `indices` (ascending); used by anchor-based inference.
    pub fn retain(&mut self, indices: Tensor<B, 1, Int>) {
        self.k = self.k.take().map(|k| k.select(2, indices.clone()));
        self.v = self.v.take().map(|v| v.select(2, indices));
    }

    /// Rebuilds the batch from rows `indices` (row `i` becomes old row `indices[i]`; rows may
    /// repeat): expands a batch to its beams and reorders beams in beam search.
    pub fn select_rows(&mut self, indices: Tensor<B, 1, Int>) {
        self.k = self.k.take().map(|k| k.select(0, indices.clone()));
        self.v = self.v.take().map(|v| v.select(0, indices));
    }
}

/// What every layer of one forward step shares: positions and the attention mask.
#[derive(Debug, Clone)]
pub struct CacheStep<B: Backend> {
    /// RoPE positions `[batch, new_tokens]` (left padding does not advance a row's position).
    pub positions: Tensor<B, 2, Int>,
    /// Mask over `[cached + new]` keys, or `None` when every query may see every key.
    pub mask: Option<AttentionMask<B>>,
    /// How many of the newest keys each layer keeps for the next step.
    pub keep: usize,
}

/// Bookkeeping of a batch's cache shared by all layers: how many slots (tokens, padding
/// included) were seen, which are still kept, each row's left padding, and the sliding window.
///
/// Slot `j` of row `r` holds position `j - pad[r]`. With a sliding window `w`, a query at slot
/// `i` sees keys `i - w < j <= i` (as HF Mistral), and the cache keeps the last `w` slots.
#[derive(Debug, Clone)]
pub struct CacheState {
    seen: usize,
    kept_from: usize,
    pad: Vec<usize>,
    window: Option<usize>,
}

impl CacheState {
    /// State for a batch whose rows start with `pad[r]` padding slots (left padding).
    pub fn new(pad: Vec<usize>, window: Option<usize>) -> Self {
        Self {
            seen: 0,
            kept_from: 0,
            pad,
            window,
        }
    }

    /// Slots seen so far (padding included).
    pub fn seen(&self) -> usize {
        self.seen
    }

    /// Forgets every slot from `len` on, so the next forward continues at slot `len`. Possible
    /// only while no slot has left the cache (no sliding window has dropped one); returns
    /// whether it was done. The layers' [`KvCache::truncate`] must follow with the same `len`.
    pub fn truncate(&mut self, len: usize) -> bool {
        if self.kept_from > 0 || len > self.seen {
            return false;
        }
        self.seen = len;
        true
    }

    /// Rows in the batch.
    pub fn batch(&self) -> usize {
        self.pad.len()
    }

    /// Plans a forward over `new` slots per row, then records them as seen.
    pub fn advance<B: Backend>(&mut self, new: usize, device: &B::Device) -> CacheStep<B> {
        let batch = self.pad.len();
        let (first_query, first_key) = (self.seen, self.kept_from);
        let end = self.seen + new;
        let keys = end - first_key;

        let mut positions = Vec::with_capacity(batch * new);
        for &pad in &self.pad {
            positions.extend((first_query..end).map(|slot| slot.saturating_sub(pad) as i64));
        }
        let positions = Tensor::from_data(TensorData::new(positions, [batch, new]), device);

        let window = self.window;
        let hidden = |row: usize, query: usize, key: usize| {
            key > query
                || window.is_some_and(|w| key + w <= query)
                || (key < self.pad[row] && key != query)
        };
        let mut values = Vec::with_capacity(batch * new * keys);
        for row in 0..batch {
            for q in first_query..end {
                values.extend((first_key..end).map(|k| hidden(row, q, k)));
            }
        }
        let mask = values
            .iter()
            .any(|&h| h)
            .then(|| Tensor::from_data(TensorData::new(values, [batch, 1, new, keys]), device));

        self.kept_from = match self.window {
            Some(w) => self.kept_from.max(end.saturating_sub(w)),
            None => self.kept_from,
        };
        self.seen = end;
        CacheStep {
            positions,
            mask,
            keep: end - self.kept_from,
        }
    }
}
