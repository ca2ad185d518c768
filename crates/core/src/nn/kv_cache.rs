use burn::prelude::*;

use super::AttentionMask;

/// Keys and values of one attention layer for the tokens seen so far,
/// `[batch, kv_heads, kept, head_dim]` each.
///
/// On flex the tensors are buffers with room to grow, `[batch, kv_heads, capacity, head_dim]`,
/// and a step writes only its new slots into them on the host (flex hands a buffer out and
/// takes it back without a copy when nobody else holds it). Appending with `Tensor::cat`
/// copies the whole cache every step: on SmolLM2 Q4_1 at 128–192 cached tokens that was 11 %
/// of a decode step. Burn's `slice_assign` cannot replace it there: burn-flex 0.21 clones the
/// buffer's `Arc` before writing, so every assign copies the whole buffer. Other backends keep
/// `cat` (no measured loss there, and CubeCL's matmul has refused views before, see
/// [`scaled_dot_product_attention`](super::scaled_dot_product_attention)).
#[derive(Debug, Clone, Default)]
pub struct KvCache<B: Backend> {
    k: Option<Tensor<B, 4>>,
    v: Option<Tensor<B, 4>>,
    /// Slots `start..start + len` of the buffers are the cache.
    start: usize,
    len: usize,
}

impl<B: Backend> KvCache<B> {
    /// An empty cache.
    pub fn new() -> Self {
        Self {
            k: None,
            v: None,
            start: 0,
            len: 0,
        }
    }

    /// Appends this step's keys and values; returns all keys and values this step attends to,
    /// and keeps only the last `keep` of them for the next step.
    pub fn update(
        &mut self,
        k: Tensor<B, 4>,
        v: Tensor<B, 4>,
        keep: usize,
    ) -> (Tensor<B, 4>, Tensor<B, 4>) {
        let n = k.dims()[2];
        let total = self.len + n;
        if super::flex_backend::<B>(&k.device()) {
            let [batch, heads, _, dim] = k.dims();
            let fits = self.k.as_ref().is_some_and(|old| {
                let [b, h, capacity, d] = old.dims();
                (b, h, d) == (batch, heads, dim)
                    && self.start + total <= capacity
                    && old.dtype() == k.dtype()
            });
            if !fits {
                // Half as much again as needed (at least 64 slots): each slot is copied a
                // bounded number of times on average, and the slack stays under half.
                let capacity = total + (total / 2).max(64);
                self.k = Some(Self::regrow(self.live_k(), &k, capacity));
                self.v = Some(Self::regrow(self.live_v(), &v, capacity));
                self.start = 0;
            }
            let at = self.start + self.len;
            self.k = self.k.take().map(|buf| write_slots(buf, at, k));
            self.v = self.v.take().map(|buf| write_slots(buf, at, v));
        } else {
            self.k = Some(match self.live_k() {
                Some(old) => Tensor::cat(vec![old, k], 2),
                None => k,
            });
            self.v = Some(match self.live_v() {
                Some(old) => Tensor::cat(vec![old, v], 2),
                None => v,
            });
            self.start = 0;
        }
        self.len = total;
        let seen = (
            self.live_k().expect("just written"),
            self.live_v().expect("just written"),
        );
        if keep < total {
            self.start += total - keep;
            self.len = keep;
        }
        seen
    }

    /// A buffer of `capacity` slots shaped like `like`, holding `live` (if any) at its front.
    fn regrow(live: Option<Tensor<B, 4>>, like: &Tensor<B, 4>, capacity: usize) -> Tensor<B, 4> {
        let [batch, heads, _, dim] = like.dims();
        let mut buf = Tensor::<B, 4>::zeros([batch, heads, capacity, dim], &like.device());
        if buf.dtype() != like.dtype() {
            buf = buf.cast(like.dtype());
        }
        match live {
            Some(live) => write_slots(buf, 0, live),
            None => buf,
        }
    }

    fn live(&self, t: Option<&Tensor<B, 4>>) -> Option<Tensor<B, 4>> {
        let t = t?.clone();
        if self.start == 0 && self.len == t.dims()[2] {
            Some(t)
        } else {
            Some(t.narrow(2, self.start, self.len))
        }
    }

    fn live_k(&self) -> Option<Tensor<B, 4>> {
        self.live(self.k.as_ref())
    }

    fn live_v(&self) -> Option<Tensor<B, 4>> {
        self.live(self.v.as_ref())
    }

    /// A cache holding `keys` and `values`, `[batch, kv_heads, len, head_dim]` each (keys
    /// already rotated, as [`update`](Self::update) stores them).
    pub fn from_parts(keys: Tensor<B, 4>, values: Tensor<B, 4>) -> Self {
        let len = keys.dims()[2];
        Self {
            k: Some(keys),
            v: Some(values),
            start: 0,
            len,
        }
    }

    /// The cached keys `[batch, kv_heads, len, head_dim]` (rotated), `None` while empty.
    pub fn keys(&self) -> Option<Tensor<B, 4>> {
        self.live_k()
    }

    /// The cached values `[batch, kv_heads, len, head_dim]`, `None` while empty.
    pub fn values(&self) -> Option<Tensor<B, 4>> {
        self.live_v()
    }

    /// Number of cached positions.
    pub fn len(&self) -> usize {
        if self.k.is_some() { self.len } else { 0 }
    }

    /// Bytes of the cached keys and values (slots times their size, padding slots included).
    /// On flex the buffers also hold up to half as many slots again, free for the next steps.
    pub fn bytes(&self) -> usize {
        [&self.k, &self.v]
            .into_iter()
            .flatten()
            .map(|t| {
                let [b, h, _, d] = t.dims();
                b * h * self.len * d * t.dtype().size()
            })
            .sum()
    }

    /// True when nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Keeps only the first `len` cached positions (forgets the rest).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Replaces the cache by `f` of its keys and of its values (a new tensor each).
    fn rebuild(&mut self, f: impl Fn(Tensor<B, 4>) -> Tensor<B, 4>) {
        let (k, v) = (self.live_k().map(&f), self.live_v().map(&f));
        self.len = k.as_ref().map_or(0, |k| k.dims()[2]);
        (self.k, self.v, self.start) = (k, v, 0);
    }

    /// Keeps only the cached positions at `indices` (ascending); used by anchor-based inference.
    pub fn retain(&mut self, indices: Tensor<B, 1, Int>) {
        self.rebuild(|t| t.select(2, indices.clone()));
    }

    /// Stacks `other`'s rows under this cache's, after `left_self` and `left_other` zero slots
    /// at the front of each (what [`CacheState::append`] returns; the zeros sit in padding the
    /// mask hides). Lets sequences that were prefilled apart decode as one batch. Returns false
    /// when either cache is still empty (nothing is kept then).
    pub fn append_rows(&mut self, other: KvCache<B>, left_self: usize, left_other: usize) -> bool {
        let (Some(k), Some(v), Some(ok), Some(ov)) =
            (self.live_k(), self.live_v(), other.live_k(), other.live_v())
        else {
            *self = Self::new();
            return false;
        };
        let pad = |t: Tensor<B, 4>, n: usize| {
            if n == 0 {
                return t;
            }
            let [b, h, _, d] = t.dims();
            let zeros = Tensor::zeros([b, h, n, d], &t.device());
            Tensor::cat(vec![zeros, t], 2)
        };
        *self = Self::from_parts(
            Tensor::cat(vec![pad(k, left_self), pad(ok, left_other)], 0),
            Tensor::cat(vec![pad(v, left_self), pad(ov, left_other)], 0),
        );
        true
    }

    /// Forgets the `n` oldest cached slots of every row (padding that
    /// [`CacheState::retain_rows`] found no row needs any more).
    pub fn drop_front(&mut self, n: usize) {
        let n = n.min(self.len);
        self.start += n;
        self.len -= n;
    }

    /// Rebuilds the batch from rows `indices` (row `i` becomes old row `indices[i]`; rows may
    /// repeat): expands a batch to its beams and reorders beams in beam search.
    pub fn select_rows(&mut self, indices: Tensor<B, 1, Int>) {
        self.rebuild(|t| t.select(0, indices.clone()));
    }
}

/// `buf [batch, heads, capacity, dim]` with `new [batch, heads, n, dim]` written at slots
/// `at..at + n`, on the host: no copy of `buf` when nothing else holds it (flex).
fn write_slots<B: Backend>(buf: Tensor<B, 4>, at: usize, new: Tensor<B, 4>) -> Tensor<B, 4> {
    let [batch, heads, capacity, dim] = buf.dims();
    let n = new.dims()[2];
    let device = buf.device();
    let mut data = buf.into_data();
    let new = new.into_data();
    assert_eq!(
        data.dtype, new.dtype,
        "KV cache: one dtype for old and new slots"
    );
    let row = dim * data.dtype.size();
    for bh in 0..batch * heads {
        let dst = (bh * capacity + at) * row;
        let src = bh * n * row;
        data.bytes[dst..dst + n * row].copy_from_slice(&new.bytes[src..src + n * row]);
    }
    Tensor::from_data(data, &device)
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

    /// Appends `other`'s rows after this batch's, for continuous batching: the batch that has
    /// seen fewer slots gets left padding so both end at the same slot (a row's positions, and
    /// so its keys' rotations, do not change). Returns the zero slots each side's kept keys
    /// need at the front, for [`KvCache::append_rows`] on every layer, or `None` (nothing
    /// changed) when the two use different sliding windows.
    pub fn append(&mut self, other: CacheState) -> Option<(usize, usize)> {
        if self.window != other.window {
            return None;
        }
        let seen = self.seen.max(other.seen);
        let (shift_self, shift_other) = (seen - self.seen, seen - other.seen);
        // Each side keeps slots [kept_from, seen); shifted, they end together. The merged cache
        // starts at the earlier start; the zero slots before the later one lie in that side's
        // padding: a side that dropped keys has kept_from = seen - window, the latest start
        // any row can have.
        let (from_self, from_other) = (self.kept_from + shift_self, other.kept_from + shift_other);
        let kept_from = from_self.min(from_other);
        self.pad.iter_mut().for_each(|p| *p += shift_self);
        self.pad.extend(other.pad.iter().map(|p| p + shift_other));
        self.seen = seen;
        self.kept_from = kept_from;
        Some((from_self - kept_from, from_other - kept_from))
    }

    /// Keeps rows `rows` (ascending) of the batch, then renumbers the slots so the padding
    /// every remaining row shares is forgotten. Returns how many of the oldest kept slots each
    /// layer must drop ([`KvCache::drop_front`], after [`KvCache::select_rows`]).
    pub fn retain_rows(&mut self, rows: &[usize]) -> usize {
        self.pad = rows.iter().map(|&r| self.pad[r]).collect();
        let shared = self.pad.iter().copied().min().unwrap_or(0);
        if shared <= self.kept_from {
            return 0;
        }
        let drop = shared - self.kept_from;
        self.pad.iter_mut().for_each(|p| *p -= shared);
        self.seen -= shared;
        self.kept_from = 0;
        drop
    }

    /// Rebuilds the batch from rows `indices` (rows may repeat): the bookkeeping half of
    /// [`CausalLm::reorder_cache`](crate::CausalLm::reorder_cache); every layer's
    /// [`KvCache::select_rows`] must follow with the same indices.
    pub fn select_rows(&mut self, indices: &[usize]) {
        self.pad = indices.iter().map(|&r| self.pad[r]).collect();
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

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::{Flex, NdArray};

    /// `n` new slots for `rows` rows, 2 heads, head_dim 3: each value encodes (slot, row,
    /// head, dim), so a misplaced slot shows.
    fn slots<B: Backend>(first: usize, n: usize, rows: usize, sign: f32) -> Tensor<B, 4> {
        let mut data = Vec::new();
        for r in 0..rows {
            for h in 0..2 {
                for s in first..first + n {
                    for d in 0..3 {
                        data.push(sign * (s * 1000 + r * 100 + h * 10 + d) as f32);
                    }
                }
            }
        }
        Tensor::from_data(TensorData::new(data, [rows, 2, n, 3]), &Default::default())
    }

    /// The expected tensor for slots `ids` of rows `rows` (old row numbers).
    fn expect(ids: &[usize], rows: &[usize], sign: f32) -> Vec<f32> {
        let mut data = Vec::new();
        for &r in rows {
            for h in 0..2 {
                for &s in ids {
                    for d in 0..3 {
                        data.push(sign * (s * 1000 + r * 100 + h * 10 + d) as f32);
                    }
                }
            }
        }
        data
    }

    fn values<B: Backend>(t: Tensor<B, 4>) -> Vec<f32> {
        t.into_data().into_vec::<f32>().unwrap()
    }

    /// A prefill, then 150 steps of one slot and one of 7, with and without a sliding window; then truncation, dropped front slots, row
    /// selection and retained positions, each followed by more steps. Every step's keys and
    /// values must be the kept slots plus the new ones, in order, as host bookkeeping says.
    ///
    /// On flex the cache grows in place (buffers with spare slots), elsewhere by `cat`.
    #[test]
    fn every_step_sees_the_kept_slots_across_growth_windows_and_rebuilds() {
        every_step_sees_the_kept_slots::<Flex>();
        every_step_sees_the_kept_slots::<NdArray>();
    }

    fn every_step_sees_the_kept_slots<B: Backend>() {
        for keep in [usize::MAX, 40] {
            let mut cache = KvCache::<B>::new();
            let mut kept: Vec<usize> = Vec::new();
            let mut rows = vec![0, 1];
            let mut next = 0;
            let mut step = |cache: &mut KvCache<B>, kept: &mut Vec<usize>, rows: &[usize], n| {
                // A new step's rows are numbered as the cache's current rows.
                let pick = |t: Tensor<B, 4>| {
                    let ids: Vec<i64> = rows.iter().map(|&r| r as i64).collect();
                    let len = ids.len();
                    t.select(
                        0,
                        Tensor::from_data(TensorData::new(ids, [len]), &Default::default()),
                    )
                };
                let (k, v) = cache.update(
                    pick(slots::<B>(next, n, 2, 1.0)),
                    pick(slots::<B>(next, n, 2, -1.0)),
                    keep,
                );
                kept.extend(next..next + n);
                next += n;
                assert_eq!(values(k), expect(kept, rows, 1.0), "keys, keep {keep}");
                assert_eq!(values(v), expect(kept, rows, -1.0), "values, keep {keep}");
                let drop = kept.len().saturating_sub(keep);
                kept.drain(..drop);
                assert_eq!(cache.len(), kept.len());
                assert_eq!(values(cache.keys().unwrap()), expect(kept, rows, 1.0));
            };
            step(&mut cache, &mut kept, &rows, 5);
            for i in 0..150 {
                step(&mut cache, &mut kept, &rows, if i == 70 { 7 } else { 1 });
            }
            cache.truncate(kept.len() - 3);
            kept.truncate(kept.len() - 3);
            step(&mut cache, &mut kept, &rows, 1);
            cache.drop_front(4);
            kept.drain(..4);
            step(&mut cache, &mut kept, &rows, 2);
            // Row 1 twice, then row 0: the new steps' rows follow the same order.
            cache.select_rows(Tensor::from_data(
                TensorData::new(vec![1i64, 1, 0], [3]),
                &Default::default(),
            ));
            rows = vec![1, 1, 0];
            for _ in 0..80 {
                step(&mut cache, &mut kept, &rows, 1);
            }
            let positions: Vec<i64> = (0..kept.len() as i64).filter(|p| p % 3 == 0).collect();
            let n = positions.len();
            cache.retain(Tensor::from_data(
                TensorData::new(positions.clone(), [n]),
                &Default::default(),
            ));
            kept = positions.iter().map(|&p| kept[p as usize]).collect();
            step(&mut cache, &mut kept, &rows, 1);
        }
    }
}
