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

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use burn::prelude::*;
use burn::tensor::IndexingUpdateOp;
use burn::tensor::activation::softmax;

use crate::error::{EnsembleError, Result};

/// How relative matrices are built.
#[derive(Debug, Clone, PartialEq)]
pub struct RelativeConfig {
    /// Softmax temperature τ applied to the L2-normalised cosine rows (reference code: 100).
    pub temperature: f32,
    /// Keep only each row's `k` largest entries (renormalised to sum to 1); `None` is dense.
    pub top_k: Option<usize>,
    /// Rows computed at once (bounds the `rows × |A|` intermediate).
    pub chunk_rows: usize,
}

impl Default for RelativeConfig {
    fn default() -> Self {
        Self {
            temperature: 100.0,
            top_k: None,
            chunk_rows: 2048,
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
    /// `[vocab, anchors]`.
    Dense(Tensor<B, 2>),
    /// Each row's `k` largest entries: anchor `indices` and `values`, `[vocab, k]` each.
    Sparse {
        /// Anchor index of each kept entry.
        indices: Tensor<B, 2, Int>,
        /// The kept (renormalised) entries.
        values: Tensor<B, 2>,
        /// Number of anchors (width of the mapped vector).
        anchors: usize,
    },
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
        let unit = l2_normalize(embeddings, 1e-8);
        let ids: Vec<i64> = anchor_ids.iter().map(|&i| i as i64).collect();
        let ids = Tensor::<B, 1, Int>::from_data(TensorData::new(ids, [anchors]), &device);
        let anchor_t = unit.clone().select(0, ids).transpose(); // [d, A]
        let mut dense = Vec::new();
        let mut idx = Vec::new();
        let mut vals = Vec::new();
        let mut start = 0;
        while start < vocab {
            let rows = config.chunk_rows.min(vocab - start);
            let cos = unit.clone().narrow(0, start, rows).matmul(anchor_t.clone());
            let probs = softmax(l2_normalize(cos, 1e-12) * config.temperature, 1);
            match config.top_k {
                None => dense.push(probs),
                Some(k) => {
                    let (v, i) = probs.topk_with_indices(k, 1);
                    let v = v.clone() / v.sum_dim(1);
                    vals.push(v);
                    idx.push(i);
                }
            }
            start += rows;
        }
        Ok(match config.top_k {
            None => RelativeMatrix::Dense(Tensor::cat(dense, 0)),
            Some(_) => RelativeMatrix::Sparse {
                indices: Tensor::cat(idx, 0),
                values: Tensor::cat(vals, 0),
                anchors,
            },
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
            RelativeMatrix::Sparse { values, .. } => values.dims()[0],
        }
    }

    /// Number of anchors (columns).
    pub fn anchors(&self) -> usize {
        match self {
            RelativeMatrix::Dense(r) => r.dims()[1],
            RelativeMatrix::Sparse { anchors, .. } => *anchors,
        }
    }

    /// Bytes held (f32 values, i64 indices for the sparse form on most backends).
    pub fn size_bytes(&self) -> usize {
        match self {
            RelativeMatrix::Dense(r) => r.shape().num_elements() * 4,
            RelativeMatrix::Sparse { values, .. } => values.shape().num_elements() * (4 + 8),
        }
    }

    /// Maps distributions `probs` `[rows, vocab]` to the relative space, `[rows, anchors]`.
    pub fn map(&self, probs: Tensor<B, 2>) -> Tensor<B, 2> {
        match self {
            RelativeMatrix::Dense(r) => probs.matmul(r.clone()),
            RelativeMatrix::Sparse {
                indices,
                values,
                anchors,
            } => {
                let [rows, vocab] = probs.dims();
                let [_, k] = values.dims();
                let weighted = probs.reshape([rows, vocab, 1]) * values.clone().unsqueeze::<3>();
                let flat = indices.clone().reshape([1, vocab * k]).repeat_dim(0, rows);
                Tensor::zeros([rows, *anchors], &weighted.device()).scatter(
                    1,
                    flat,
                    weighted.reshape([rows, vocab * k]),
                    IndexingUpdateOp::Add,
                )
            }
        }
    }

    /// The same matrix on another backend view (for the autodiff search).
    pub(crate) fn convert<C: Backend>(
        &self,
        float: impl Fn(Tensor<B, 2>) -> Tensor<C, 2>,
        int: impl Fn(Tensor<B, 2, Int>) -> Tensor<C, 2, Int>,
    ) -> RelativeMatrix<C> {
        match self {
            RelativeMatrix::Dense(r) => RelativeMatrix::Dense(float(r.clone())),
            RelativeMatrix::Sparse {
                indices,
                values,
                anchors,
            } => RelativeMatrix::Sparse {
                indices: int(indices.clone()),
                values: float(values.clone()),
                anchors: *anchors,
            },
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
        let (kind, vocab, anchors, k) = match self {
            RelativeMatrix::Dense(r) => (0u64, r.dims()[0], r.dims()[1], 0),
            RelativeMatrix::Sparse {
                values, anchors, ..
            } => (1u64, values.dims()[0], *anchors, values.dims()[1]),
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
            RelativeMatrix::Sparse {
                indices, values, ..
            } => {
                let ids: Vec<i64> = indices
                    .clone()
                    .into_data()
                    .convert::<i64>()
                    .into_vec()
                    .map_err(|e| err(format!("{e:?}")))?;
                for i in ids {
                    out.extend_from_slice(&(i as u32).to_le_bytes());
                }
                for x in floats(values.clone())? {
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
        match kind {
            0 if body.len() == vocab * anchors * 4 => Ok(RelativeMatrix::Dense(Tensor::from_data(
                TensorData::new(f32s(body), [vocab, anchors]),
                device,
            ))),
            1 if body.len() == vocab * k * 8 => {
                let (ids, vals) = body.split_at(vocab * k * 4);
                let ids: Vec<i64> = u32s(ids).into_iter().map(|i| i as i64).collect();
                if ids.iter().any(|&i| i as usize >= anchors) {
                    return Err(err("anchor index out of range".into()));
                }
                Ok(RelativeMatrix::Sparse {
                    indices: Tensor::from_data(TensorData::new(ids, [vocab, k]), device),
                    values: Tensor::from_data(TensorData::new(f32s(vals), [vocab, k]), device),
                    anchors,
                })
            }
            _ => Err(err(format!(
                "header (kind {kind}, {vocab} x {anchors}, k {k}) does not match the {} data bytes",
                body.len()
            ))),
        }
    }
}

const MAGIC: &[u8; 8] = b"KILNREL1";

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
    let k = config
        .top_k
        .map_or("dense".to_string(), |k| format!("top{k}"));
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
        let RelativeMatrix::Dense(r) = tiny(None) else {
            panic!()
        };
        close(&host(r), &[hi, lo, lo, hi, 0.5, 0.5]);
        // p = (0.5, 0.25, 0.25): p·R = 0.5 (hi, lo) + 0.25 (lo, hi) + 0.25 (0.5, 0.5).
        let p = Tensor::<B, 2>::from_data([[0.5, 0.25, 0.25]], &Default::default());
        let want = [0.5 * hi + 0.25 * lo + 0.125, 0.5 * lo + 0.25 * hi + 0.125];
        close(&host(tiny(None).map(p)), &want);
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
