//! Relative representations (DeePEn §3.1): each token of a member's vocabulary described by its
//! similarity to the anchors, as a distribution over anchors.
//!
//! `R[v, a] = softmax_a(τ · c[v, a] / ‖c[v, :]‖₂)` with `c[v, a]` the cosine similarity between
//! the input embeddings of token `v` and anchor `a`, and τ = 100 as in the reference code. A
//! next-token distribution `p` over the vocabulary maps to `p · R`, a distribution over anchors
//! that every member shares.
//!
//! The dense matrix is `|V| × |A|` floats (32k × 20k is 2.6 GB); [`RelativeConfig::top_k`] keeps
//! only each row's `k` largest entries (renormalised), `|V| × k` floats and indices.
//!
//! On a GPU backend the dense matrix lives on the device and maps with a matmul. On the CPU
//! backends it lives in host memory as a kiln-core [`PackedMatrix`] ([`PackedRelative`]), in
//! f32 or compressed ([`RelativeConfig::dense_format`]), and maps both ways (`p · R`, `R · g`) with
//! kiln-core's matrix kernels: a DeePEn step of T search steps streams the main matrix T + 1
//! times (the average's map, then each step's gradient fused with the next step's map, see
//! [`crate::search`]), and Burn's CPU matmul read it at ~6 GB/s where this machine reads ~27.
//! The sparse one lives in host memory ([`SparseRelative`]) and maps with plain loops over its
//! rows, split over the CPU cores: Burn has no sparse matmul, and its gather/scatter on the CPU
//! backends took 35 ms for one 49k × 32 map, against ~2 ms for the loops; on a GPU the 49k-float
//! logits cross to the host once per token, as sampling does anyway.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use burn::prelude::*;
use burn::tensor::IndexingUpdateOp;
use burn::tensor::activation::softmax;
use rayon::prelude::*;

use kiln_core::packed::{PackedFormat, PackedMatrix, SoftmaxMap, SoftmaxRun};

use crate::ensemble::host_vec;
use crate::error::{EnsembleError, Result};
use crate::vocab::Anchors;

/// How relative matrices are built.
#[derive(Debug, Clone, PartialEq)]
pub struct RelativeConfig {
    /// Softmax temperature τ applied to the L2-normalised cosine rows (reference code: 100).
    pub temperature: f32,
    /// Keep only each row's `k` largest entries (renormalised to sum to 1); `None` is dense.
    pub top_k: Option<usize>,
    /// Rows computed at once (bounds the `rows × |A|` intermediate).
    pub chunk_rows: usize,
    /// How a dense matrix is stored: `F32` (exact) is held on the device on GPU backends and in
    /// host memory on the CPU ones; a compressed format (`F16`, `BF16`, `Q8_0`, ...: fewer bytes
    /// to stream per step) is always held in host memory and mapped by kiln-core's kernels.
    pub dense_format: PackedFormat,
}

impl Default for RelativeConfig {
    fn default() -> Self {
        Self {
            temperature: 100.0,
            top_k: None,
            chunk_rows: 2048,
            dense_format: PackedFormat::F32,
        }
    }
}

impl RelativeConfig {
    /// Sets the temperature.
    pub fn with_temperature(mut self, t: f32) -> Self {
        self.temperature = t;
        self
    }
    /// Sets the sparse top-k (`None`: dense).
    pub fn with_top_k(mut self, k: Option<usize>) -> Self {
        self.top_k = k;
        self
    }
    /// Sets the rows per chunk.
    pub fn with_chunk_rows(mut self, rows: usize) -> Self {
        self.chunk_rows = rows;
        self
    }
    /// Sets how a dense matrix is stored.
    pub fn with_dense_format(mut self, format: PackedFormat) -> Self {
        self.dense_format = format;
        self
    }

    /// Whether a dense matrix is held in host memory (a [`PackedRelative`]) rather than on the
    /// device.
    fn dense_on_host<B: Backend>(&self, device: &B::Device) -> bool {
        self.dense_format != PackedFormat::F32 || kiln_core::nn::cpu_backend::<B>(device)
    }

    fn validate(&self, anchors: usize) -> Result<()> {
        if !(self.temperature.is_finite() && self.temperature > 0.0) {
            return Err(EnsembleError::arg(
                "temperature",
                "must be positive and finite",
            ));
        }
        if self.chunk_rows == 0 {
            return Err(EnsembleError::arg("chunk_rows", "must be at least 1"));
        }
        if let Some(k) = self.top_k
            && (k == 0 || k > anchors)
        {
            return Err(EnsembleError::arg(
                "top_k",
                format!("must be between 1 and the number of anchors ({anchors}), got {k}"),
            ));
        }
        Ok(())
    }
}

/// A member's relative representation matrix, dense or sparse.
#[derive(Debug, Clone)]
pub enum RelativeMatrix<B: Backend> {
    /// `[vocab, anchors]` in f32, on the device (GPU backends).
    Dense(Tensor<B, 2>),
    /// `[vocab, anchors]` in host memory (CPU backends, or a compressed format).
    Packed(PackedRelative),
    /// Each row's `k` largest entries, in host memory.
    Sparse(SparseRelative),
}

/// A dense relative matrix in host memory, in one of kiln-core's packed formats, mapped by its
/// matrix kernels: `p · R` by [`PackedMatrix::vecmat`], `R · g` by [`PackedMatrix::matmul_t`],
/// both on the one copy. Block formats need whole blocks per row, so the anchors are padded with
/// zero columns (which map to nothing); cheap to clone.
#[derive(Debug, Clone)]
pub struct PackedRelative {
    matrix: Arc<PackedMatrix>,
    anchors: usize,
}

impl PackedRelative {
    /// Wraps `matrix`, whose first `anchors` columns are the anchors and the rest zero padding.
    pub fn new(matrix: PackedMatrix, anchors: usize) -> Result<Self> {
        let cols = matrix.cols();
        if anchors > cols || cols - anchors >= matrix.format().block_len() {
            return Err(EnsembleError::arg(
                "relative",
                format!(
                    "{anchors} anchors in a {} matrix of {cols} columns",
                    matrix.format()
                ),
            ));
        }
        Ok(Self {
            matrix: Arc::new(matrix),
            anchors,
        })
    }

    /// Vocabulary size (rows).
    pub fn vocab(&self) -> usize {
        self.matrix.rows()
    }

    /// Number of anchors.
    pub fn anchors(&self) -> usize {
        self.anchors
    }

    /// The matrix, padded to whole blocks.
    pub fn matrix(&self) -> &PackedMatrix {
        &self.matrix
    }

    /// `p · R` for one distribution `p` over the vocabulary.
    pub fn map(&self, p: &[f32]) -> Vec<f32> {
        let mut q = self.matrix.vecmat(p);
        q.truncate(self.anchors);
        q
    }

    /// `R · w` for one vector `w` over the anchors: the chain rule of [`map`](Self::map).
    pub fn map_transposed(&self, w: &[f32]) -> Vec<f32> {
        assert_eq!(w.len(), self.anchors, "one value per anchor");
        if self.matrix.cols() == self.anchors {
            return self.matrix.matmul_t(w, 1);
        }
        // Block formats: zeros for the padding columns (one anchor-length copy beside a read of
        // the whole matrix).
        let mut padded = w.to_vec();
        padded.resize(self.matrix.cols(), 0.0);
        self.matrix.matmul_t(&padded, 1)
    }

    /// The matrix as row-major f32 `[vocab, anchors]` (the padding dropped).
    pub fn to_f32(&self) -> Vec<f32> {
        let cols = self.matrix.cols();
        let all = self.matrix.to_f32();
        if cols == self.anchors {
            return all;
        }
        all.chunks_exact(cols.max(1))
            .flat_map(|row| &row[..self.anchors])
            .copied()
            .collect()
    }
}

/// `softmax(z)` on the host, with its max and sum (`s_r = exp(z_r − max) / sum`).
pub(crate) fn host_softmax(z: &[f32]) -> (Vec<f32>, f32, f32) {
    let max = z.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut s: Vec<f32> = z.iter().map(|&x| (x - max).exp()).collect();
    let sum: f32 = s.iter().sum();
    s.iter_mut().for_each(|x| *x /= sum);
    (s, max, sum)
}

/// The maps the host-side search needs; [`SparseRelative`] and [`PackedRelative`] have them.
pub(crate) trait HostMap {
    /// `p · R`.
    fn map(&self, p: &[f32]) -> Vec<f32>;
    /// `R · w`.
    fn map_transposed(&self, w: &[f32]) -> Vec<f32>;
    /// A search step's maps, as [`PackedMatrix::matvec_softmax_vecmat`] takes them: `y = R · w`,
    /// each row's new logit `z_r = update(r, Some(y_r), &mut state[r])` (`None` allowed where
    /// `needs_product` is false), then `softmax(z) · R`, in one pass over the rows.
    fn map_softmax_step<S: Send>(
        &self,
        w: &[f32],
        state: &mut [S],
        likely_max: Option<usize>,
        needs_product: impl Fn(&S) -> bool + Sync,
        update: impl Fn(usize, Option<f32>, &mut S) -> f32 + Sync,
    ) -> SoftmaxMap;
}

impl HostMap for SparseRelative {
    fn map(&self, p: &[f32]) -> Vec<f32> {
        SparseRelative::map(self, p)
    }
    fn map_transposed(&self, w: &[f32]) -> Vec<f32> {
        SparseRelative::map_transposed(self, w)
    }
    /// One pass over the rows, as the dense packed matrix's: a block of rows is gathered for
    /// `R · w`, updated, and scattered into `softmax(z) · R` while it is still in cache (an
    /// online softmax per task, rescaled when its max rises), so a step reads the entries once
    /// instead of twice, the updates run on every core, and rows the softmax gives weight 0 are
    /// neither gathered (`needs_product`) nor scattered. On 4096 anchors, 49152 × 32: one
    /// DeePEn combination 10.4–11.2 → 9.0–9.7 ms (`ensemble_bench`, release).
    fn map_softmax_step<S: Send>(
        &self,
        w: &[f32],
        state: &mut [S],
        likely_max: Option<usize>,
        needs_product: impl Fn(&S) -> bool + Sync,
        update: impl Fn(usize, Option<f32>, &mut S) -> f32 + Sync,
    ) -> SoftmaxMap {
        assert_eq!(w.len(), self.anchors, "one value per anchor");
        assert_eq!(state.len(), self.vocab(), "one state per vocabulary row");
        let (k, anchors) = (self.k, self.anchors);
        let row = |r: usize| {
            let span = r * k..(r + 1) * k;
            (&self.indices[span.clone()], &self.values[span])
        };
        let product = |r: usize| {
            let (idx, val) = row(r);
            row_dot(idx, val, w)
        };
        // The hint row (the last argmax) first: every task's sum starts from its logit, so
        // rows far below it add nothing and are skipped, as in the dense pass.
        let hint = likely_max.filter(|&h| h < state.len()).map(|h| {
            let y = needs_product(&state[h]).then(|| product(h));
            (h, update(h, y, &mut state[h]))
        });
        let floor = match hint {
            Some((_, z)) if z.is_finite() => z,
            _ => f32::NEG_INFINITY,
        };
        // Rows per block: their entries (k · 8 bytes each, 128 KiB at k = 32) stay in L2
        // between the products and the sums.
        const BLOCK: usize = 512;
        let parts: Vec<(SoftmaxRun, Vec<f32>)> = state
            .par_chunks_mut(ROWS_PER_TASK)
            .enumerate()
            .map(|(c, state)| {
                let r0 = c * ROWS_PER_TASK;
                let mut acc = vec![0f32; anchors];
                let mut run = SoftmaxRun::new(floor, hint.map_or(r0, |(h, _)| h));
                let (mut y, mut z) = ([None; BLOCK], [0f32; BLOCK]);
                for (b, block) in state.chunks_mut(BLOCK).enumerate() {
                    let b0 = r0 + b * BLOCK;
                    let mut block_max = f32::NEG_INFINITY;
                    // The products first, then the updates, then the sums: each phase keeps
                    // one anchor-sized vector in L1 (`w`, then the sums), where interleaving
                    // them per row made the two evict each other.
                    for (i, s) in block.iter().enumerate() {
                        y[i] = needs_product(s).then(|| product(b0 + i));
                    }
                    for (i, s) in block.iter_mut().enumerate() {
                        let r = b0 + i;
                        z[i] = match hint {
                            Some((h, zh)) if h == r => zh,
                            _ => update(r, y[i], s),
                        };
                        if z[i] > block_max {
                            block_max = z[i];
                            if block_max > run.max {
                                run.argmax = r;
                            }
                        }
                    }
                    if !run.raise(block_max, &mut acc) {
                        continue;
                    }
                    for (i, &zi) in z[..block.len()].iter().enumerate() {
                        let e = (zi - run.max).exp();
                        run.sum += e;
                        if e != 0.0 {
                            let (idx, val) = row(b0 + i);
                            for (&a, &v) in idx.iter().zip(val) {
                                acc[a as usize] += e * v;
                            }
                        }
                    }
                }
                (run, acc)
            })
            .collect();
        SoftmaxMap::merge(anchors, parts.iter().map(|(run, acc)| (*run, &acc[..])))
    }
}

impl HostMap for PackedRelative {
    fn map(&self, p: &[f32]) -> Vec<f32> {
        PackedRelative::map(self, p)
    }
    fn map_transposed(&self, w: &[f32]) -> Vec<f32> {
        PackedRelative::map_transposed(self, w)
    }
    fn map_softmax_step<S: Send>(
        &self,
        w: &[f32],
        state: &mut [S],
        likely_max: Option<usize>,
        needs_product: impl Fn(&S) -> bool + Sync,
        update: impl Fn(usize, Option<f32>, &mut S) -> f32 + Sync,
    ) -> SoftmaxMap {
        assert_eq!(w.len(), self.anchors, "one value per anchor");
        // Block formats: zeros for the padding columns, dropped again from the map.
        let mut padded = w.to_vec();
        padded.resize(self.matrix.cols(), 0.0);
        let mut out =
            self.matrix
                .matvec_softmax_vecmat(&padded, state, likely_max, needs_product, update);
        out.map.truncate(self.anchors);
        out
    }
}

/// Each vocabulary row's `k` largest relative entries (renormalised), row after row, in host
/// memory; cheap to clone.
#[derive(Debug, Clone, PartialEq)]
pub struct SparseRelative {
    /// Anchor index of each kept entry, `vocab · k`.
    indices: Arc<[u32]>,
    /// The kept entries, `vocab · k`.
    values: Arc<[f32]>,
    /// Entries per row.
    k: usize,
    /// Number of anchors (width of the mapped vector).
    anchors: usize,
}

/// Rows per parallel work item of the sparse maps: large enough that splitting costs nothing.
const ROWS_PER_TASK: usize = 4096;

/// One sparse row times `w`: `Σ_j w[idx_j] · val_j`, in eight independent sums. One running
/// sum made each row a chain of k dependent additions (~3 cycles each), which bounded the
/// maps, not the memory.
#[inline]
fn row_dot(idx: &[u32], val: &[f32], w: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ic, vc) = (idx.chunks_exact(8), val.chunks_exact(8));
    let (ir, vr) = (ic.remainder(), vc.remainder());
    for (i, v) in ic.zip(vc) {
        for j in 0..8 {
            acc[j] += w[i[j] as usize] * v[j];
        }
    }
    let tail: f32 = ir.iter().zip(vr).map(|(&a, &v)| w[a as usize] * v).sum();
    (acc[0] + acc[4]) + (acc[1] + acc[5]) + (acc[2] + acc[6]) + (acc[3] + acc[7]) + tail
}

impl SparseRelative {
    /// Checks the shape and the anchor indices.
    pub fn new(indices: Vec<u32>, values: Vec<f32>, k: usize, anchors: usize) -> Result<Self> {
        if k == 0 || indices.len() != values.len() || !values.len().is_multiple_of(k) {
            return Err(EnsembleError::arg(
                "relative",
                format!(
                    "{} indices and {} values do not make rows of {k}",
                    indices.len(),
                    values.len()
                ),
            ));
        }
        if let Some(&bad) = indices.iter().find(|&&i| i as usize >= anchors) {
            return Err(EnsembleError::arg(
                "relative",
                format!("anchor index {bad} is outside the {anchors} anchors"),
            ));
        }
        Ok(Self {
            indices: indices.into(),
            values: values.into(),
            k,
            anchors,
        })
    }

    /// Vocabulary size (rows).
    pub fn vocab(&self) -> usize {
        self.values.len() / self.k
    }

    /// Entries kept per row.
    pub fn k(&self) -> usize {
        self.k
    }

    /// Number of anchors.
    pub fn anchors(&self) -> usize {
        self.anchors
    }

    /// Anchor indices, `vocab · k`, row after row.
    pub fn indices(&self) -> &[u32] {
        &self.indices
    }

    /// Entries, `vocab · k`, row after row.
    pub fn values(&self) -> &[f32] {
        &self.values
    }

    /// `p · R` for one distribution `p` over the vocabulary.
    pub fn map(&self, p: &[f32]) -> Vec<f32> {
        assert_eq!(p.len(), self.vocab(), "one probability per vocabulary row");
        let k = self.k;
        let chunk = ROWS_PER_TASK * k;
        p.par_chunks(ROWS_PER_TASK)
            .zip(self.indices.par_chunks(chunk))
            .zip(self.values.par_chunks(chunk))
            .fold(
                || vec![0f32; self.anchors],
                |mut q, ((p, idx), val)| {
                    for ((&pv, idx), val) in
                        p.iter().zip(idx.chunks_exact(k)).zip(val.chunks_exact(k))
                    {
                        if pv != 0.0 {
                            for (&a, &r) in idx.iter().zip(val) {
                                q[a as usize] += pv * r;
                            }
                        }
                    }
                    q
                },
            )
            .reduce(
                || vec![0f32; self.anchors],
                |mut a, b| {
                    a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
                    a
                },
            )
    }

    /// `w · Rᵀ` for one vector `w` over the anchors: the chain rule of [`map`](Self::map).
    pub fn map_transposed(&self, w: &[f32]) -> Vec<f32> {
        assert_eq!(w.len(), self.anchors, "one value per anchor");
        let k = self.k;
        let mut out = vec![0f32; self.vocab()];
        out.par_chunks_mut(ROWS_PER_TASK)
            .zip(self.indices.par_chunks(ROWS_PER_TASK * k))
            .zip(self.values.par_chunks(ROWS_PER_TASK * k))
            .for_each(|((out, idx), val)| {
                for ((o, idx), val) in out
                    .iter_mut()
                    .zip(idx.chunks_exact(k))
                    .zip(val.chunks_exact(k))
                {
                    *o = row_dot(idx, val, w);
                }
            });
        out
    }

    /// [`map`](Self::map) in tensor ops, so that autodiff sees it: `probs` `[rows, vocab]`.
    pub(crate) fn map_tensor<B: Backend>(&self, probs: Tensor<B, 2>) -> Tensor<B, 2> {
        let [rows, vocab] = probs.dims();
        let device = probs.device();
        let n = vocab * self.k;
        let indices: Vec<i64> = self.indices.iter().map(|&i| i as i64).collect();
        let indices = Tensor::<B, 1, Int>::from_data(TensorData::new(indices, [n]), &device);
        let values = Tensor::<B, 2>::from_data(
            TensorData::new(self.values.to_vec(), [vocab, self.k]),
            &device,
        );
        let weighted = probs.reshape([rows, vocab, 1]) * values.unsqueeze::<3>();
        Tensor::zeros([rows, self.anchors], &device).select_assign(
            1,
            indices,
            weighted.reshape([rows, n]),
            IndexingUpdateOp::Add,
        )
    }
}

impl<B: Backend> RelativeMatrix<B> {
    /// Builds the matrix of a member with input embeddings `embeddings` `[vocab, d]` and the
    /// anchors' ids `anchor_ids` in its vocabulary.
    pub fn build(
        embeddings: Tensor<B, 2>,
        anchor_ids: &[u32],
        config: &RelativeConfig,
    ) -> Result<Self> {
        let [vocab, _] = embeddings.dims();
        let anchors = anchor_ids.len();
        if anchors == 0 {
            return Err(EnsembleError::arg("anchors", "no anchors"));
        }
        if let Some(&bad) = anchor_ids.iter().find(|&&id| id as usize >= vocab) {
            return Err(EnsembleError::arg(
                "anchors",
                format!("anchor id {bad} is outside the embedding matrix of {vocab} rows"),
            ));
        }
        config.validate(anchors)?;
        let device = embeddings.device();
        let host = config.top_k.is_none() && config.dense_on_host::<B>(&device);
        // Padded to whole blocks of the format; zero columns map to nothing.
        let cols = anchors.next_multiple_of(config.dense_format.block_len());
        let mut packed = if host {
            Some(
                PackedMatrix::zeros(vocab, cols, config.dense_format)
                    .map_err(|e| EnsembleError::arg("dense_format", e.to_string()))?,
            )
        } else {
            None
        };
        let unit = l2_normalize(embeddings, 1e-8);
        let ids: Vec<i64> = anchor_ids.iter().map(|&i| i as i64).collect();
        let ids = Tensor::<B, 1, Int>::from_data(TensorData::new(ids, [anchors]), &device);
        let anchor_t = unit.clone().select(0, ids).transpose(); // [d, A]
        let mut dense = Vec::new();
        let mut idx: Vec<u32> = Vec::new();
        let mut vals: Vec<f32> = Vec::new();
        let mut start = 0;
        while start < vocab {
            let rows = config.chunk_rows.min(vocab - start);
            let cos = unit.clone().narrow(0, start, rows).matmul(anchor_t.clone());
            let probs = softmax(l2_normalize(cos, 1e-12) * config.temperature, 1);
            match (config.top_k, &mut packed) {
                (None, Some(packed)) => {
                    let mut rows_f32 = host_vec(probs, "relative")?;
                    if cols != anchors {
                        rows_f32 = rows_f32
                            .chunks_exact(anchors)
                            .flat_map(|row| row.iter().copied().chain((anchors..cols).map(|_| 0.0)))
                            .collect();
                    }
                    packed
                        .set_rows_f32(start, &rows_f32)
                        .map_err(|e| EnsembleError::arg("dense_format", e.to_string()))?;
                }
                (None, None) => dense.push(probs),
                (Some(k), _) => {
                    let (v, i) = probs.topk_with_indices(k, 1);
                    let v = v.clone() / v.sum_dim(1);
                    vals.extend(host_vec(v, "relative")?);
                    let i = i.into_data().convert::<i64>().into_vec::<i64>();
                    let i = i.map_err(|e| EnsembleError::arg("relative", format!("{e:?}")))?;
                    idx.extend(i.into_iter().map(|a| a as u32));
                }
            }
            start += rows;
        }
        Ok(match (config.top_k, packed) {
            (None, Some(packed)) => RelativeMatrix::Packed(PackedRelative::new(packed, anchors)?),
            (None, None) => RelativeMatrix::Dense(Tensor::cat(dense, 0)),
            (Some(k), _) => RelativeMatrix::Sparse(SparseRelative::new(idx, vals, k, anchors)?),
        })
    }

    /// Like [`build`](Self::build), but reads the matrix from `cache_dir` when a file for the
    /// same embeddings, anchors and config is there, and writes it there otherwise. The key
    /// hashes the embedding values themselves, so it follows the checkpoint, not its path.
    pub fn build_cached(
        embeddings: Tensor<B, 2>,
        anchor_ids: &[u32],
        config: &RelativeConfig,
        cache_dir: &Path,
    ) -> Result<Self> {
        let path = cache_path(cache_dir, &embeddings, anchor_ids, config)?;
        let device = embeddings.device();
        if path.is_file() {
            return Self::load(&path, &device);
        }
        let matrix = Self::build(embeddings, anchor_ids, config)?;
        std::fs::create_dir_all(cache_dir).map_err(|e| EnsembleError::Cache {
            path: cache_dir.to_path_buf(),
            message: e.to_string(),
        })?;
        matrix.save(&path)?;
        Ok(matrix)
    }

    /// Vocabulary size (rows).
    pub fn vocab(&self) -> usize {
        match self {
            RelativeMatrix::Dense(r) => r.dims()[0],
            RelativeMatrix::Packed(p) => p.vocab(),
            RelativeMatrix::Sparse(s) => s.vocab(),
        }
    }

    /// Number of anchors (columns).
    pub fn anchors(&self) -> usize {
        match self {
            RelativeMatrix::Dense(r) => r.dims()[1],
            RelativeMatrix::Packed(p) => p.anchors(),
            RelativeMatrix::Sparse(s) => s.anchors(),
        }
    }

    /// Bytes held (f32 values; u32 indices for the sparse form).
    pub fn size_bytes(&self) -> usize {
        match self {
            RelativeMatrix::Dense(r) => r.shape().num_elements() * 4,
            RelativeMatrix::Packed(p) => p.matrix().byte_len(),
            RelativeMatrix::Sparse(s) => s.values().len() * (4 + 4),
        }
    }

    /// The matrix as row-major f32 `[vocab, anchors]` (a sparse one with zeros where it keeps
    /// nothing).
    pub fn to_f32(&self) -> Result<Vec<f32>> {
        match self {
            RelativeMatrix::Dense(r) => host_vec(r.clone(), "relative"),
            RelativeMatrix::Packed(p) => Ok(p.to_f32()),
            RelativeMatrix::Sparse(s) => {
                let mut out = vec![0f32; s.vocab() * s.anchors()];
                for (r, (idx, val)) in s
                    .indices()
                    .chunks_exact(s.k())
                    .zip(s.values().chunks_exact(s.k()))
                    .enumerate()
                {
                    for (&a, &v) in idx.iter().zip(val) {
                        out[r * s.anchors() + a as usize] = v;
                    }
                }
                Ok(out)
            }
        }
    }

    /// Maps distributions `probs` `[rows, vocab]` to the relative space, `[rows, anchors]`:
    /// `probs · R` (in tensor ops for both forms, so autodiff can see it).
    pub fn map(&self, probs: Tensor<B, 2>) -> Tensor<B, 2> {
        match self {
            RelativeMatrix::Dense(r) => probs.matmul(r.clone()),
            RelativeMatrix::Packed(r) => {
                // Not differentiable; the autodiff search converts the matrix to `Dense` first.
                let [rows, vocab] = probs.dims();
                let device = probs.device();
                let probs = probs.into_data().convert::<f32>().into_vec::<f32>();
                let probs = probs.expect("a tensor converted to f32 reads back as f32");
                let q: Vec<f32> = probs
                    .chunks_exact(vocab.max(1))
                    .flat_map(|p| r.map(p))
                    .collect();
                Tensor::from_data(TensorData::new(q, [rows, r.anchors()]), &device)
            }
            RelativeMatrix::Sparse(s) => s.map_tensor(probs),
        }
    }

    /// Maps one distribution `p` over the vocabulary to the relative space, on the host (the
    /// sparse form never leaves it; the dense one maps on the device).
    pub fn map_host(&self, p: &[f32], device: &B::Device) -> Result<Vec<f32>> {
        match self {
            RelativeMatrix::Sparse(s) => Ok(s.map(p)),
            RelativeMatrix::Packed(r) => Ok(r.map(p)),
            RelativeMatrix::Dense(r) => {
                let p =
                    Tensor::<B, 2>::from_data(TensorData::new(p.to_vec(), [1, p.len()]), device);
                host_vec(p.matmul(r.clone()), "relative")
            }
        }
    }

    /// The same matrix on another backend view (for the autodiff search, which needs tensor
    /// ops: a host dense matrix becomes a device tensor on `device`).
    pub(crate) fn convert<C: Backend>(
        &self,
        device: &B::Device,
        float: impl Fn(Tensor<B, 2>) -> Tensor<C, 2>,
    ) -> RelativeMatrix<C> {
        match self {
            RelativeMatrix::Dense(r) => RelativeMatrix::Dense(float(r.clone())),
            RelativeMatrix::Packed(p) => RelativeMatrix::Dense(float(Tensor::from_data(
                TensorData::new(p.to_f32(), [p.vocab(), p.anchors()]),
                device,
            ))),
            RelativeMatrix::Sparse(s) => RelativeMatrix::Sparse(s.clone()),
        }
    }

    /// Writes the matrix (little-endian, with a small header).
    pub fn save(&self, path: &Path) -> Result<()> {
        let err = |e: String| EnsembleError::Cache {
            path: path.to_path_buf(),
            message: e,
        };
        let mut out = Vec::new();
        out.extend_from_slice(MAGIC);
        // Kind 0: f32 rows (from either dense form); 1: sparse; 2: a packed format, named by
        // the last header word, its rows padded to whole blocks.
        let (kind, vocab, anchors, k) = match self {
            RelativeMatrix::Dense(r) => (0u64, r.dims()[0], r.dims()[1], 0),
            RelativeMatrix::Packed(p) if p.matrix().format() == PackedFormat::F32 => {
                (0, p.vocab(), p.anchors(), 0)
            }
            RelativeMatrix::Packed(p) => (2, p.vocab(), p.anchors(), format_word(p)),
            RelativeMatrix::Sparse(s) => (1u64, s.vocab(), s.anchors(), s.k()),
        };
        for v in [kind, vocab as u64, anchors as u64, k as u64] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        let floats = |t: Tensor<B, 2>| -> Result<Vec<f32>> {
            t.into_data()
                .convert::<f32>()
                .into_vec()
                .map_err(|e| err(format!("{e:?}")))
        };
        match self {
            RelativeMatrix::Dense(r) => {
                for x in floats(r.clone())? {
                    out.extend_from_slice(&x.to_le_bytes());
                }
            }
            RelativeMatrix::Packed(p) => out.extend_from_slice(p.matrix().bytes()),
            RelativeMatrix::Sparse(s) => {
                for i in s.indices() {
                    out.extend_from_slice(&i.to_le_bytes());
                }
                for x in s.values() {
                    out.extend_from_slice(&x.to_le_bytes());
                }
            }
        }
        // Write then rename, so a crash never leaves a truncated file under the final name.
        let tmp = path.with_extension("tmp");
        std::fs::File::create(&tmp)
            .and_then(|mut f| f.write_all(&out))
            .and_then(|_| std::fs::rename(&tmp, path))
            .map_err(|e| err(e.to_string()))
    }

    /// Reads a matrix written by [`save`](Self::save).
    pub fn load(path: &Path, device: &B::Device) -> Result<Self> {
        let err = |e: String| EnsembleError::Cache {
            path: path.to_path_buf(),
            message: e,
        };
        let mut bytes = Vec::new();
        std::fs::File::open(path)
            .and_then(|mut f| f.read_to_end(&mut bytes))
            .map_err(|e| err(e.to_string()))?;
        if bytes.len() < 40 || &bytes[..8] != MAGIC {
            return Err(err("not a kiln relative-matrix file".into()));
        }
        let word = |i: usize| {
            u64::from_le_bytes(bytes[8 + 8 * i..16 + 8 * i].try_into().unwrap()) as usize
        };
        let (kind, vocab, anchors, k) = (word(0), word(1), word(2), word(3));
        let body = &bytes[40..];
        // No format takes under half a byte per value: bounds the sizes before any arithmetic.
        if vocab.max(anchors) / 2 > body.len() {
            return Err(err(format!(
                "header ({vocab} x {anchors}) is larger than the {} data bytes",
                body.len()
            )));
        }
        let u32s = |b: &[u8]| -> Vec<u32> {
            b.chunks_exact(4)
                .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
                .collect()
        };
        let f32s = |b: &[u8]| -> Vec<f32> {
            b.chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect()
        };
        let packed = |format: PackedFormat, cols: usize| {
            PackedMatrix::from_bytes(vocab, cols, format, body)
                .map_err(|e| err(e.to_string()))
                .and_then(|m| PackedRelative::new(m, anchors).map_err(|e| err(e.to_string())))
                .map(RelativeMatrix::Packed)
        };
        let format = PackedFormat::ALL
            .into_iter()
            .find(|&f| kind == 2 && format_code(f) == k as u64);
        match (kind, format) {
            (0, _)
                if vocab.checked_mul(anchors).and_then(|n| n.checked_mul(4))
                    == Some(body.len()) =>
            {
                if kiln_core::nn::cpu_backend::<B>(device) {
                    packed(PackedFormat::F32, anchors)
                } else {
                    Ok(RelativeMatrix::Dense(Tensor::from_data(
                        TensorData::new(f32s(body), [vocab, anchors]),
                        device,
                    )))
                }
            }
            (2, Some(format)) => packed(format, anchors.next_multiple_of(format.block_len())),
            (1, _)
                if k > 0
                    && vocab.checked_mul(k).and_then(|n| n.checked_mul(8)) == Some(body.len()) =>
            {
                let (ids, vals) = body.split_at(vocab * k * 4);
                SparseRelative::new(u32s(ids), f32s(vals), k, anchors)
                    .map(RelativeMatrix::Sparse)
                    .map_err(|e| err(e.to_string()))
            }
            _ => Err(err(format!(
                "header (kind {kind}, {vocab} x {anchors}, k {k}) does not match the {} data bytes",
                body.len()
            ))),
        }
    }
}

const MAGIC: &[u8; 8] = b"KILNREL1";

/// A packed format's name in a header word: its bytes, little-endian, zero-padded.
fn format_code(format: PackedFormat) -> u64 {
    let mut word = [0u8; 8];
    word[..format.name().len()].copy_from_slice(format.name().as_bytes());
    u64::from_le_bytes(word)
}

fn format_word(p: &PackedRelative) -> usize {
    format_code(p.matrix().format()) as usize
}

/// Each anchor's cross-model consistency, as the reference's optional anchor selection
/// (`get_anchor_point_list_our`) scores it: in every member, the anchor's row of cosine
/// similarities with all anchors (of that member's input embeddings `embeddings[m]`); the score is
/// the cosine between the main member's row and an assistant's, averaged over the assistants
/// (the reference has one). Rows are computed `chunk_rows` at a time, so memory stays
/// `O(chunk · anchors)`.
pub fn anchor_consistency<B: Backend>(
    anchors: &Anchors,
    embeddings: &[Tensor<B, 2>],
    chunk_rows: usize,
) -> Result<Vec<f32>> {
    if embeddings.len() != anchors.ids.len() || embeddings.len() < 2 {
        return Err(EnsembleError::arg(
            "embeddings",
            format!(
                "{} embedding matrices for {} members (at least two)",
                embeddings.len(),
                anchors.ids.len()
            ),
        ));
    }
    let n = anchors.len();
    // Unit rows of each member's anchor embeddings, [A, d].
    let mut units = Vec::with_capacity(embeddings.len());
    for (e, ids) in embeddings.iter().zip(&anchors.ids) {
        let rows = e.dims()[0];
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= rows) {
            return Err(EnsembleError::arg(
                "anchors",
                format!("anchor id {bad} is outside an embedding matrix of {rows} rows"),
            ));
        }
        let ids: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
        let ids = Tensor::<B, 1, Int>::from_data(TensorData::new(ids, [n]), &e.device());
        units.push(l2_normalize(e.clone().select(0, ids), 1e-8));
    }
    let mut scores = vec![0f32; n];
    let mut start = 0;
    while start < n {
        let rows = chunk_rows.max(1).min(n - start);
        let row = |u: &Tensor<B, 2>| {
            l2_normalize(
                u.clone()
                    .narrow(0, start, rows)
                    .matmul(u.clone().transpose()),
                1e-8,
            )
        };
        let main = row(&units[0]);
        for u in &units[1..] {
            let c = host_vec(
                (main.clone() * row(u)).sum_dim(1).squeeze_dim::<1>(1),
                "anchors",
            )?;
            for (s, c) in scores[start..start + rows].iter_mut().zip(c) {
                *s += c / (units.len() - 1) as f32;
            }
        }
        start += rows;
    }
    Ok(scores)
}

/// Keeps the `keep` anchors of highest [`anchor_consistency`] (the reference's selection with
/// `count = keep`), in their original (main-model id) order.
pub fn keep_consistent_anchors<B: Backend>(
    anchors: &Anchors,
    embeddings: &[Tensor<B, 2>],
    keep: usize,
) -> Result<Anchors> {
    if keep == 0 {
        return Err(EnsembleError::arg(
            "consistent_anchors",
            "must be at least 1",
        ));
    }
    let scores = anchor_consistency(anchors, embeddings, 1024)?;
    let mut order: Vec<usize> = (0..anchors.len()).collect();
    // Descending, ties in the original order (Python's stable sort, as the reference).
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    order.truncate(keep);
    order.sort_unstable();
    Ok(Anchors {
        keys: order.iter().map(|&i| anchors.keys[i].clone()).collect(),
        ids: anchors
            .ids
            .iter()
            .map(|ids| order.iter().map(|&i| ids[i]).collect())
            .collect(),
    })
}

/// `x / max(‖x‖₂, eps)` along dim 1.
fn l2_normalize<B: Backend>(x: Tensor<B, 2>, eps: f64) -> Tensor<B, 2> {
    let norm = x.clone().powi_scalar(2).sum_dim(1).sqrt().clamp_min(eps);
    x / norm
}

/// FNV-1a, stable across Rust versions (unlike `DefaultHasher`).
fn fnv1a(hash: &mut u64, bytes: &[u8]) {
    for &b in bytes {
        *hash ^= b as u64;
        *hash = hash.wrapping_mul(0x100000001b3);
    }
}

/// The cache file for these embeddings, anchors and config.
pub fn cache_path<B: Backend>(
    dir: &Path,
    embeddings: &Tensor<B, 2>,
    anchor_ids: &[u32],
    config: &RelativeConfig,
) -> Result<PathBuf> {
    let values: Vec<f32> = embeddings
        .clone()
        .into_data()
        .convert::<f32>()
        .into_vec()
        .map_err(|e| EnsembleError::arg("embeddings", format!("{e:?}")))?;
    let mut hash = 0xcbf29ce484222325u64;
    for d in embeddings.dims() {
        fnv1a(&mut hash, &(d as u64).to_le_bytes());
    }
    for x in values {
        fnv1a(&mut hash, &x.to_le_bytes());
    }
    let mut anchors = 0xcbf29ce484222325u64;
    for id in anchor_ids {
        fnv1a(&mut anchors, &id.to_le_bytes());
    }
    let k = match (config.top_k, config.dense_format) {
        (Some(k), _) => format!("top{k}"),
        (None, PackedFormat::F32) => "dense".to_string(),
        (None, format) => format!("dense-{format}"),
    };
    Ok(dir.join(format!(
        "rel-{hash:016x}-{anchors:016x}-t{}-{k}.bin",
        config.temperature
    )))
}

#[cfg(test)]
mod tests {
    use burn::backend::NdArray;

    use super::*;

    type B = NdArray;

    fn host(t: Tensor<B, 2>) -> Vec<f32> {
        t.into_data().convert::<f32>().into_vec().unwrap()
    }

    #[test]
    fn sparse_search_step_is_the_three_steps_in_f64() {
        // The sparse matrix's one-pass search step: y = R·w, z_r = f(r, y_r), softmax(z)·R,
        // against loops in f64, with a band of rows 300 below the rest (weight 0) and rows
        // whose product is not needed; without a hint, with the true argmax, with a poor one.
        // 10000 rows make three parallel tasks of several blocks, and logits that rise with
        // the row raise each task's running max (the rescaling); k = 3 takes the products'
        // tail loop, k = 11 their eight-wide sums and a tail.
        for k in [3, 11] {
            sparse_search_step_case(k);
        }
    }

    fn sparse_search_step_case(k: usize) {
        let (vocab, anchors) = (10000, 7);
        let indices: Vec<u32> = (0..vocab * k)
            .map(|i| ((i * 5 + i / k) % anchors) as u32)
            .collect();
        let values: Vec<f32> = (0..vocab * k)
            .map(|i| 0.2 + 0.6 * ((i as f32 * 0.37).sin().abs()))
            .collect();
        let r = SparseRelative::new(indices.clone(), values.clone(), k, anchors).unwrap();
        let w: Vec<f32> = (0..anchors).map(|a| a as f32 * 0.3 - 1.0).collect();
        let needs = |r: usize| r % 10 != 3;
        let f = |r: usize, y: f64| {
            let low = if (2000..2500).contains(&r) {
                300.0
            } else {
                0.0
            };
            y + r as f64 * 0.001 - low
        };
        let want_z: Vec<f64> = (0..vocab)
            .map(|row| {
                let y: f64 = (0..k)
                    .map(|j| w[indices[row * k + j] as usize] as f64 * values[row * k + j] as f64)
                    .sum();
                f(row, if needs(row) { y } else { 0.0 })
            })
            .collect();
        let argmax = (0..vocab)
            .max_by(|&a, &b| want_z[a].total_cmp(&want_z[b]))
            .unwrap();
        let max = want_z[argmax];
        let sum: f64 = want_z.iter().map(|z| (z - max).exp()).sum();
        let mut want = vec![0f64; anchors];
        for row in 0..vocab {
            for j in 0..k {
                want[indices[row * k + j] as usize] +=
                    (want_z[row] - max).exp() / sum * values[row * k + j] as f64;
            }
        }
        for hint in [None, Some(argmax), Some(5)] {
            let mut state: Vec<usize> = (0..vocab).collect();
            let got = r.map_softmax_step(
                &w,
                &mut state,
                hint,
                |&s| needs(s),
                |row, y, s| {
                    assert_eq!(row, *s, "row {row} got another row's state");
                    assert!(y.is_some() || !needs(row), "row {row}'s product not given");
                    *s = usize::MAX;
                    f(row, if needs(row) { y.unwrap() as f64 } else { 0.0 }) as f32
                },
            );
            assert!(state.iter().all(|&s| s == usize::MAX), "a row not updated");
            assert_eq!(got.argmax, argmax, "k {k} hint {hint:?}");
            assert!(
                (got.max as f64 - max).abs() < 1e-4 * max.abs(),
                "k {k} hint {hint:?}"
            );
            assert!(
                (got.sum as f64 - sum).abs() < 1e-4 * sum,
                "k {k} hint {hint:?}: sum {} vs {sum}",
                got.sum
            );
            for (g, w) in got.map.iter().zip(&want) {
                assert!(
                    (*g as f64 - w).abs() < 1e-5,
                    "k {k} hint {hint:?}: {g} vs {w}"
                );
            }
        }
    }

    fn close(a: &[f32], b: &[f32]) {
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() < 1e-5, "{a:?} vs {b:?}");
        }
    }

    /// Embeddings [1,0], [0,1], [1,1]; anchors are tokens 0 and 1; τ = 1.
    fn tiny(top_k: Option<usize>) -> RelativeMatrix<B> {
        let e =
            Tensor::<B, 2>::from_data([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], &Default::default());
        let config = RelativeConfig::default()
            .with_temperature(1.0)
            .with_top_k(top_k);
        RelativeMatrix::build(e, &[0, 1], &config).unwrap()
    }

    #[test]
    fn dense_matrix_by_hand() {
        // Cosines: [1,0], [0,1], [1/√2, 1/√2]; rows already unit; softmax(1, 0) = (e, 1)/(e+1).
        let e = std::f32::consts::E;
        let (hi, lo) = (e / (e + 1.0), 1.0 / (e + 1.0));
        let r = tiny(None);
        assert!(
            matches!(r, RelativeMatrix::Packed(_)),
            "dense on a CPU backend is packed"
        );
        close(&r.to_f32().unwrap(), &[hi, lo, lo, hi, 0.5, 0.5]);
        // p = (0.5, 0.25, 0.25): p·R = 0.5 (hi, lo) + 0.25 (lo, hi) + 0.25 (0.5, 0.5).
        let p = Tensor::<B, 2>::from_data([[0.5, 0.25, 0.25]], &Default::default());
        let want = [0.5 * hi + 0.25 * lo + 0.125, 0.5 * lo + 0.25 * hi + 0.125];
        close(&host(tiny(None).map(p)), &want);
    }

    #[test]
    fn compressed_dense_formats_map_within_their_rounding() {
        // 40 anchors: not a whole Q8_0 block, so the zero padding is crossed.
        let (vocab, dim, anchors) = (300, 16, 40usize);
        let e: Vec<f32> = (0..vocab * dim)
            .map(|i| ((i * 7919 % 1009) as f32 / 1009.0 - 0.5) * (1.0 + (i % 3) as f32))
            .collect();
        let e = Tensor::<B, 2>::from_data(TensorData::new(e, [vocab, dim]), &Default::default());
        let ids: Vec<u32> = (0..anchors as u32).map(|i| i * 7).collect();
        let config = RelativeConfig::default().with_temperature(3.0);
        let exact = RelativeMatrix::build(e.clone(), &ids, &config).unwrap();
        let p: Vec<f32> = (0..vocab).map(|v| ((v * 31) % 17) as f32 + 0.5).collect();
        let sum: f32 = p.iter().sum();
        let p: Vec<f32> = p.iter().map(|x| x / sum).collect();
        let want = exact.map_host(&p, &Default::default()).unwrap();
        let dir = std::env::temp_dir().join(format!("kiln-rel-formats-{}", std::process::id()));
        // Bounds: f16 and bf16 round each entry to 2⁻¹¹ and 2⁻⁸ of itself; Q8_0 by half a
        // step of its block, amax/254, here at most ~1% of the mapped values.
        for (format, bound) in [
            (PackedFormat::F16, 1e-3),
            (PackedFormat::BF16, 5e-3),
            (PackedFormat::Q8_0, 2e-2),
        ] {
            let config = config.clone().with_dense_format(format);
            let r = RelativeMatrix::build(e.clone(), &ids, &config).unwrap();
            let RelativeMatrix::Packed(packed) = &r else {
                panic!("{format}: not packed")
            };
            assert_eq!(packed.matrix().format(), format);
            assert_eq!(
                packed.matrix().cols(),
                anchors.next_multiple_of(format.block_len())
            );
            let q = r.map_host(&p, &Default::default()).unwrap();
            assert_eq!(q.len(), anchors);
            for (a, b) in q.iter().zip(&want) {
                assert!(
                    (a - b).abs() <= bound * b.abs() + 1e-6,
                    "{format}: {a} vs {b}"
                );
            }
            // The two maps are adjoint across the padding: ⟨p·R, w⟩ = ⟨p, R·w⟩.
            let w: Vec<f32> = (0..anchors).map(|a| (a as f32 * 0.37).sin()).collect();
            let back = packed.map_transposed(&w);
            let lhs: f64 = q.iter().zip(&w).map(|(a, b)| (a * b) as f64).sum();
            let rhs: f64 = p.iter().zip(&back).map(|(a, b)| (a * b) as f64).sum();
            assert!((lhs - rhs).abs() < 1e-5, "{format}: {lhs} vs {rhs}");
            // The cache keeps the format and the bytes.
            let a = RelativeMatrix::build_cached(e.clone(), &ids, &config, &dir).unwrap();
            let path = cache_path(&dir, &e, &ids, &config).unwrap();
            assert!(
                path.to_string_lossy()
                    .ends_with(&format!("-dense-{format}.bin"))
            );
            let b = RelativeMatrix::<B>::load(&path, &Default::default()).unwrap();
            let (RelativeMatrix::Packed(a), RelativeMatrix::Packed(b)) = (&a, &b) else {
                panic!("{format}: the cached matrix is not packed")
            };
            assert_eq!(a.matrix().bytes(), b.matrix().bytes());
            assert_eq!((a.anchors(), b.matrix().format()), (anchors, format));
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn sparse_with_every_anchor_equals_dense() {
        let p = Tensor::<B, 2>::from_data([[0.2, 0.7, 0.1], [0.3, 0.3, 0.4]], &Default::default());
        close(
            &host(tiny(Some(2)).map(p.clone())),
            &host(tiny(None).map(p)),
        );
    }

    #[test]
    fn sparse_host_maps_equal_the_tensor_map() {
        // Rows of 3 tokens over 2 anchors, top-1 and top-2, many rows to cross the parallel
        // split: p·R on the host equals the tensor form, and ⟨p·R, w⟩ = ⟨p, w·Rᵀ⟩.
        let vocab = 3 * ROWS_PER_TASK + 5;
        for k in [1, 2] {
            let indices: Vec<u32> = (0..vocab * k).map(|i| ((i * 7) % 2) as u32).collect();
            let values: Vec<f32> = (0..vocab * k).map(|i| 0.1 + (i % 5) as f32 * 0.2).collect();
            let s = SparseRelative::new(indices, values, k, 2).unwrap();
            let p: Vec<f32> = (0..vocab).map(|v| ((v * 13) % 17) as f32 / 17.0).collect();
            let q = s.map(&p);
            let t = Tensor::<B, 2>::from_data(
                TensorData::new(p.clone(), [1, vocab]),
                &Default::default(),
            );
            let want = host(s.map_tensor(t));
            for (a, b) in q.iter().zip(&want) {
                assert!((a - b).abs() < 1e-3 * b.abs(), "{q:?} vs {want:?}");
            }
            let w = [0.3f32, -1.2];
            let back = s.map_transposed(&w);
            let lhs: f64 = q.iter().zip(&w).map(|(a, b)| (a * b) as f64).sum();
            let rhs: f64 = p.iter().zip(&back).map(|(a, b)| (a * b) as f64).sum();
            assert!((lhs - rhs).abs() < 1e-3 * lhs.abs(), "{lhs} vs {rhs}");
        }
        assert!(SparseRelative::new(vec![0, 2], vec![1.0, 1.0], 1, 2).is_err());
        assert!(SparseRelative::new(vec![0], vec![1.0, 1.0], 1, 2).is_err());
    }

    #[test]
    fn sparse_top1_keeps_the_largest() {
        // Rows 0 and 1 keep their own anchor with all the mass.
        let p = Tensor::<B, 2>::from_data([[0.6, 0.4, 0.0]], &Default::default());
        close(&host(tiny(Some(1)).map(p)), &[0.6, 0.4]);
    }

    #[test]
    fn cache_round_trip() {
        let dir = std::env::temp_dir().join(format!("kiln-ensemble-test-{}", std::process::id()));
        let e =
            Tensor::<B, 2>::from_data([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], &Default::default());
        for k in [None, Some(1)] {
            let config = RelativeConfig::default().with_top_k(k);
            let a = RelativeMatrix::build_cached(e.clone(), &[0, 1], &config, &dir).unwrap();
            let path = cache_path(&dir, &e, &[0, 1], &config).unwrap();
            assert!(path.is_file());
            let b = RelativeMatrix::<B>::load(&path, &Default::default()).unwrap();
            let p = Tensor::<B, 2>::from_data([[0.2, 0.5, 0.3]], &Default::default());
            close(&host(a.map(p.clone())), &host(b.map(p)));
        }
        std::fs::write(dir.join("bad.bin"), b"nonsense").unwrap();
        let err = RelativeMatrix::<B>::load(&dir.join("bad.bin"), &Default::default()).unwrap_err();
        assert!(
            err.to_string().contains("not a kiln relative-matrix file"),
            "{err}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
