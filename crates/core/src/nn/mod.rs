//! Layers every model shares: norms, rotary embeddings, attention and its KV cache.

mod attention;
mod embedding;
mod host;
mod kv_cache;
mod linear;
mod norm;
mod rope;
mod tied;

pub use attention::{AttentionMask, attention_with_dropout, scaled_dot_product_attention};
pub use embedding::{Embedding, EmbeddingConfig};
pub use host::{dense, packed_matmul};
pub use kv_cache::{CacheState, CacheStep, KvCache};
pub use linear::{TorchLinear, TorchLinearConfig, linear_out_in};
pub use norm::{RmsNorm, RmsNormConfig};
pub use rope::{RopeScaling, RotaryAngles, RotaryEmbedding};
pub use tied::tied_lm_head;

use burn::prelude::Backend;
use burn::tensor::DType;

/// Whether `B` is one of Burn's CPU backends (flex, ndarray), where kiln's host kernels hold
/// the matrices; the others (wgpu, vulkan, metal, cuda) compute with Burn's CubeCL kernels.
pub fn cpu_backend<B: Backend>(device: &B::Device) -> bool {
    matches!(B::name(device).as_str(), "flex" | "ndarray")
}

/// The float dtype `device` creates tensors in (the backend's float type unless the device's
/// settings say otherwise): what activations are computed in, and what a matrix held in half
/// precision (`--dtype f16` on a GPU backend) is cast back to after its product.
pub fn float_dtype<B: Backend>(device: &B::Device) -> DType {
    burn::tensor::get_device_settings::<B>(device)
        .float_dtype
        .into()
}
