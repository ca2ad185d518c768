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
