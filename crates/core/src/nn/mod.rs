//! Layers every model shares: norms, rotary embeddings, attention and its KV cache.

mod attention;
mod embedding;
#[cfg(feature = "flex")]
mod flex_attention;
mod host;
mod kv_cache;
mod linear;
mod norm;
mod rope;
mod swiglu;
mod tied;
#[cfg(target_arch = "x86_64")]
mod vector_math;

pub use attention::{AttentionMask, attention_with_dropout, scaled_dot_product_attention};
pub use embedding::{Embedding, EmbeddingConfig};
pub use host::{dense, packed_matmul};
pub use kv_cache::{CacheState, CacheStep, KvCache};
pub use linear::{TorchLinear, TorchLinearConfig, linear_out_in};
pub use norm::{RmsNorm, RmsNormConfig};
pub use rope::{RopeScaling, RotaryAngles, RotaryEmbedding};
pub use swiglu::swiglu;
pub use tied::tied_lm_head;

use burn::prelude::Backend;
use burn::tensor::DType;

/// Whether `B` is one of Burn's CPU backends (flex, ndarray), where kiln's host kernels hold
/// the matrices; the others (wgpu, vulkan, metal, cuda) compute with Burn's CubeCL kernels.
/// Autodiff over one of them counts too.
pub fn cpu_backend<B: Backend>(device: &B::Device) -> bool {
    backend_kind::<B>(device) != BackendKind::Other
}

/// Whether `B` is flex itself (not under autodiff): its tensors hand their host buffer out and
/// take one in without a copy when not shared, which [`KvCache`] builds on.
pub(crate) fn flex_backend<B: Backend>(device: &B::Device) -> bool {
    backend_kind::<B>(device) == BackendKind::Flex
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum BackendKind {
    Flex,
    /// ndarray, or autodiff over flex or ndarray.
    OtherCpu,
    Other,
}

/// Asked per attention call in decode, so the answer is kept per backend type: `B::name`
/// allocates a String.
fn backend_kind<B: Backend>(device: &B::Device) -> BackendKind {
    use std::any::TypeId;
    use std::sync::RwLock;
    static KNOWN: RwLock<Vec<(TypeId, BackendKind)>> = RwLock::new(Vec::new());
    let id = TypeId::of::<B>();
    let known = KNOWN
        .read()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(&(_, kind)) = known.iter().find(|(seen, _)| *seen == id) {
        return kind;
    }
    drop(known);
    let name = B::name(device);
    let inner = name
        .strip_prefix("autodiff<")
        .and_then(|rest| rest.strip_suffix('>'));
    let kind = match (inner, name.as_str()) {
        (None, "flex") => BackendKind::Flex,
        (Some("flex" | "ndarray"), _) | (None, "ndarray") => BackendKind::OtherCpu,
        _ => BackendKind::Other,
    };
    KNOWN
        .write()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .push((id, kind));
    kind
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
            assert!(super::cpu_backend::<Autodiff<Flex>>(&Default::default()));
            assert!(super::flex_backend::<Flex>(&Default::default()));
            assert!(!super::flex_backend::<Autodiff<Flex>>(&Default::default()));
            assert!(!super::flex_backend::<NdArray>(&Default::default()));
        }
    }
}
