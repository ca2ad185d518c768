use std::sync::Arc;

use burn::module::{Initializer, Param};
use burn::prelude::*;
use burn::tensor::TensorData;

use crate::packed::PackedMatrix;

/// Shape and initialisation of an [`Embedding`] (as burn-nn's `EmbeddingConfig`).
#[derive(Config, Debug)]
pub struct EmbeddingConfig {
    /// Rows (vocabulary size).
    pub n_embedding: usize,
    /// Width of a row.
    pub d_model: usize,
    /// Initialiser (burn-nn's default, N(0, 1)), applied lazily.
    #[config(default = "Initializer::Normal{mean:0.0, std:1.0}")]
    pub initializer: Initializer,
}

impl EmbeddingConfig {
    /// A lazily initialised embedding.
    pub fn init<B: Backend>(&self, device: &B::Device) -> Embedding<B> {
        Embedding {
            weight: self
                .initializer
                .init([self.n_embedding, self.d_model], device),
            packed: None,
        }
    }
}

/// A token embedding `[vocab, d]`, as burn-nn's `Embedding`, that can also hold its matrix
/// packed on the host (a GGUF file's Q8_0 `token_embd`, say), where it also serves as a tied
/// LM head through [`lm_head`](Self::lm_head).
///
/// Written here because burn-nn's `Embedding` holds only a dense tensor: the tied 49k × 576
/// matrix of SmolLM2 is 113 MB in f32 and 30 MB as the file's Q8_0, and it is the largest single
/// read of every decode step. When packed, `weight` is an empty `[0, d]` tensor (see
/// [`TorchLinear`](super::TorchLinear)); [`dense_weight`](Self::dense_weight) reads it either way.
#[derive(Module, Debug)]
pub struct Embedding<B: Backend> {
    /// `[vocab, d]`, as in the checkpoint.
    pub weight: Param<Tensor<B, 2>>,
    /// The matrix on the host, when the loader packed it (not part of the module's record).
    #[module(skip)]
    pub packed: Option<Arc<PackedMatrix>>,
}

impl<B: Backend> Embedding<B> {
    /// Rows for `tokens [batch, seq]`: `[batch, seq, d]`. An id past the vocabulary is a
    /// backend error (dense) or a panic with the id (packed); callers check ids first.
    pub fn forward(&self, tokens: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        match &self.packed {
            None => {
                let float = super::float_dtype::<B>(&tokens.device());
                let rows = burn::tensor::module::embedding(self.weight.val(), tokens);
                // A half-precision matrix gives rows in the activations' float type.
                if rows.dtype() == float {
                    rows
                } else {
                    rows.cast(float)
                }
            }
            Some(packed) => {
                let device = tokens.device();
                let [batch, seq] = tokens.dims();
                let ids: Vec<usize> = tokens
                    .into_data()
                    .convert::<i64>()
                    .into_vec::<i64>()
                    .expect("int ids")
                    .into_iter()
                    .map(|i| usize::try_from(i).unwrap_or(usize::MAX))
                    .collect();
                let rows = packed
                    .gather_rows(&ids)
                    .unwrap_or_else(|e| panic!("embedding lookup: {e}"));
                Tensor::from_data(TensorData::new(rows, [batch, seq, packed.cols()]), &device)
            }
        }
    }

    /// Logits of hidden states `[batch, seq, d]` through an LM head tied to this matrix.
    pub fn lm_head(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        match &self.packed {
            Some(packed) => super::host::packed_matmul(x, packed),
            None => super::tied_lm_head(x, self.weight.val()),
        }
    }

    /// Holds `packed` as the matrix from now on; `weight` becomes empty.
    pub fn set_packed(&mut self, packed: Arc<PackedMatrix>) {
        self.weight = super::host::empty_weight(&self.weight, packed.cols());
        self.packed = Some(packed);
    }

    /// The matrix `[vocab, d]` as a tensor, dequantised when it is packed.
    pub fn dense_weight(&self) -> Tensor<B, 2> {
        super::host::dense_or_param(self.packed.as_deref(), &self.weight)
    }

    /// Holds the weight as a dense parameter again (dequantised when it was packed), e.g.
    /// before saving the module.
    pub fn unpack(&mut self) {
        if self.packed.is_some() {
            self.weight = burn::module::Param::from_tensor(self.dense_weight());
            self.packed = None;
        }
    }
}
