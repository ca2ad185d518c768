use burn::prelude::*;
use burn::tensor::DType;
use burn::tensor::activation::silu;

/// `silu(gate) · up`, the gated product of Llama's MLP (HF `act_fn(gate_proj(x)) * up_proj(x)`).
///
/// On flex with AVX2 it is one host pass over `gate`'s own buffer (no copy when `gate` is not
/// shared) with a vectorised `exp`: flex's `silu` calls libm's `expf` per value, then multiplies
/// in a second op (`perf`: ~10 % of a SmolLM2 decode step).
pub fn swiglu<B: Backend, const D: usize>(gate: Tensor<B, D>, up: Tensor<B, D>) -> Tensor<B, D> {
    #[cfg(target_arch = "x86_64")]
    if super::flex_backend::<B>(&gate.device())
        && gate.dtype() == DType::F32
        && up.dtype() == DType::F32
        && gate.dims() == up.dims()
        && is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
    {
        let device = gate.device();
        let mut g = gate.into_data();
        let u = up.into_data();
        if let (Ok(gs), Ok(us)) = (g.as_mut_slice::<f32>(), u.as_slice::<f32>()) {
            // Safety: the features were detected; the shapes are equal.
            unsafe { super::vector_math::silu_mul(gs, us) };
            return Tensor::from_data(g, &device);
        }
        return silu(Tensor::<B, D>::from_data(g, &device)) * Tensor::from_data(u, &device);
    }
    silu(gate) * up
}
