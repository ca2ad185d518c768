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
/// Autodiff over one of them counts too. Asked per attention call in decode, so the answer is
/// kept per backend type: `B::name` allocates a String.
pub fn cpu_backend<B: Backend>(device: &B::Device) -> bool {
    use std::any::TypeId;
    use std::sync::RwLock;
    static KNOWN: RwLock<Vec<(TypeId, bool)>> = RwLock::new(Vec::new());
    let id = TypeId::of::<B>();
    let known = KNOWN
        .read()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(&(_, cpu)) = known.iter().find(|(seen, _)| *seen == id) {
        return cpu;
    }
    drop(known);
    let name = B::name(device);
    let inner = name
        .strip_prefix("autodiff<")
        .and_then(|rest| rest.strip_suffix('>'))
        .unwrap_or(&name);
    let cpu = matches!(inner, "flex" | "ndarray");
    KNOWN
        .write()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .push((id, cpu));
    cpu
}

/// The float dtype `device` creates tensors in (the backend's float type unless the device's
/// settings say otherwise): what activations are computed in, and what a matrix held in half
/// precision (`--dtype f16` on a GPU backend) is cast back to after its product.
pub fn float_dtype<B: Backend>(device: &B::Device) -> DType {
    burn::tensor::get_device_settings::<B>(device)
        .float_dtype
        .into()
}

#[cfg(test)]
mod tests {
    use burn::backend::{Autodiff, Flex, NdArray};

    /// Asked twice per type: the second answer comes from the cache and must be the same.
    #[test]
    fn cpu_backends_are_recognised_under_autodiff() {
        for _ in 0..2 {
            assert!(super::cpu_backend::<NdArray>(&Default::default()));
            assert!(super::cpu_backend::<Flex>(&Default::default()));
            assert!(super::cpu_backend::<Autodiff<NdArray>>(&Default::default()));
        }
    }
}
