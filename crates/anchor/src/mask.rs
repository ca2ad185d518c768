//! The AnSAN attention mask, built with tensor ops from per-token sentence ids and anchor flags.

use burn::prelude::*;

use crate::AnchorSet;

/// Per-token tensors the mask is built from, `[batch, len]` each.
#[derive(Debug, Clone)]
pub struct SegTensors<B: Backend> {
    /// Sentence id: the number of anchors strictly before the token (so an anchor belongs to
    /// the sentence it closes, as in the paper's code).
    pub seg: Tensor<B, 2, Int>,
    /// True for anchor tokens.
    pub anchor: Tensor<B, 2, Bool>,
    /// Absolute index of the token in its row (for causality).
    pub index: Tensor<B, 2, Int>,
    /// False for padding.
    pub valid: Tensor<B, 2, Bool>,
}

/// The AnSAN mask `[batch, 1, q_len, k_len]` (`true` hides the key) of queries `q` over keys
/// `k`: a valid query sees a valid key at or before it when they share a sentence, or when the
/// key is an anchor and the query is not (anchors of earlier sentences). Every query also sees
/// its own slot, so a padding query attends to itself only and softmax never gets an empty row.
pub fn ansan_mask<B: Backend>(q: &SegTensors<B>, k: &SegTensors<B>) -> Tensor<B, 4, Bool> {
    let [batch, q_len] = q.seg.dims();
    let k_len = k.seg.dims()[1];
    let shape = [batch, q_len, k_len];
    let rows = |t: Tensor<B, 2, Int>| t.unsqueeze_dim::<3>(2).expand(shape);
    let cols = |t: Tensor<B, 2, Int>| t.unsqueeze_dim::<3>(1).expand(shape);
    let rows_b = |t: Tensor<B, 2, Bool>| t.unsqueeze_dim::<3>(2).expand(shape);
    let cols_b = |t: Tensor<B, 2, Bool>| t.unsqueeze_dim::<3>(1).expand(shape);

    let same_sentence = rows(q.seg.clone()).equal(cols(k.seg.clone()));
    let earlier_anchor = cols_b(k.anchor.clone()).bool_and(rows_b(q.anchor.clone()).bool_not());
    let qi = rows(q.index.clone());
    let ki = cols(k.index.clone());
    let causal = ki.clone().lower_equal(qi.clone());
    let visible = same_sentence
        .bool_or(earlier_anchor)
        .bool_and(causal)
        .bool_and(cols_b(k.valid.clone()))
        .bool_and(rows_b(q.valid.clone()));
    visible
        .bool_or(ki.equal(qi))
        .bool_not()
        .unsqueeze_dim::<4>(1)
}

/// A plain causal mask with padding hidden, `[batch, 1, len, len]`, for rows of `valid` flags.
pub fn causal_mask<B: Backend>(valid: &[Vec<bool>], device: &B::Device) -> Tensor<B, 4, Bool> {
    let rows: Vec<Vec<u32>> = valid.iter().map(|r| vec![0; r.len()]).collect();
    let mut segments = Segments::from_rows(&rows, None, 0);
    for (r, row) in valid.iter().enumerate() {
        for (t, &v) in row.iter().enumerate() {
            segments.valid[r * segments.len + t] = v;
        }
    }
    segments.mask(device)
}

/// Sentence ids, anchor flags and padding of a batch of token rows (right-padded to a common
/// length), computed in one O(batch·len) pass; [`Segments::mask`] turns them into the mask.
#[derive(Debug, Clone, PartialEq)]
pub struct Segments {
    /// Rows.
    pub batch: usize,
    /// Common (padded) length.
    pub len: usize,
    /// Sentence id per slot, row-major.
    pub seg: Vec<i64>,
    /// Anchor flag per slot.
    pub anchor: Vec<bool>,
    /// False for padding slots.
    pub valid: Vec<bool>,
}

impl Segments {
    /// Segments of `rows` padded on the right to at least `min_len` (and to the longest row).
    /// With `anchors` `None` nothing is an anchor and the mask is plain causal.
    pub fn from_rows(rows: &[Vec<u32>], anchors: Option<&AnchorSet>, min_len: usize) -> Self {
        let len = rows.iter().map(Vec::len).max().unwrap_or(0).max(min_len);
        let batch = rows.len();
        let mut seg = Vec::with_capacity(batch * len);
        let mut anchor = Vec::with_capacity(batch * len);
        let mut valid = Vec::with_capacity(batch * len);
        for row in rows {
            let mut sentence = 0i64;
            for &id in row {
                let is_anchor = anchors.is_some_and(|a| a.contains(id));
                seg.push(sentence);
                anchor.push(is_anchor);
                valid.push(true);
                sentence += is_anchor as i64;
            }
            for _ in row.len()..len {
                seg.push(sentence);
                anchor.push(false);
                valid.push(false);
            }
        }
        Self {
            batch,
            len,
            seg,
            anchor,
            valid,
        }
    }

    /// The tensors of these segments, indices `0..len`.
    pub fn tensors<B: Backend>(&self, device: &B::Device) -> SegTensors<B> {
        let shape = [self.batch, self.len];
        let index: Vec<i64> = (0..self.batch).flat_map(|_| 0..self.len as i64).collect();
        SegTensors {
            seg: Tensor::from_data(TensorData::new(self.seg.clone(), shape), device),
            anchor: Tensor::from_data(TensorData::new(self.anchor.clone(), shape), device),
            index: Tensor::from_data(TensorData::new(index, shape), device),
            valid: Tensor::from_data(TensorData::new(self.valid.clone(), shape), device),
        }
    }

    /// The self-attention mask `[batch, 1, len, len]` of these rows.
    pub fn mask<B: Backend>(&self, device: &B::Device) -> Tensor<B, 4, Bool> {
        let t = self.tensors(device);
        ansan_mask(&t, &t)
    }
}
