use burn::prelude::*;

/// Logits from hidden states `[batch, seq, d]` through an LM head tied to the embedding matrix
/// `[vocab, d]`.
///
/// Computed as `E · xᵀ` and transposed back, not `x · Eᵀ`: CPU backends copy a non-contiguous
/// right-hand side on every matmul, which for a transposed embedding means the whole
/// vocabulary matrix (1 GB for Llama 3.2 1B) per decode step. This way only the small result is
/// transposed.
pub fn tied_lm_head<B: Backend>(x: Tensor<B, 3>, embedding: Tensor<B, 2>) -> Tensor<B, 3> {
    super::linear_out_in(x, embedding)
}
