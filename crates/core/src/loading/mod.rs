//! Getting a checkpoint from disk or the hub into a Burn module.
//!
//! Weight files are parsed with the `safetensors` crate and applied with burn-store's
//! [`ModuleSnapshot::apply`](burn_store::ModuleSnapshot), so module fields named like the
//! checkpoint's keys load with no remap table. kiln builds the snapshots itself (rather than
//! using `SafetensorsStore`) so that one pass can read sharded checkpoints, convert f16/bf16 to
//! the backend's float type one tensor at a time, reject NaN weights, and name the file and
//! tensor in every error.

mod apply;
mod generation_config;
mod hub;
mod json;
mod safetensors;

pub use apply::{LoadOptions, load_module};
pub use generation_config::{GenerationDefaults, TokenIds};
pub use hub::{ModelFiles, resolve_model};
pub use json::{from_value, read_json, read_json_value};
pub use safetensors::SafetensorsWeights;

use std::path::Path;

use burn::tensor::TensorData;

use crate::Result;

/// One tensor of a checkpoint, as stored.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    /// Checkpoint key, e.g. `model.layers.0.self_attn.q_proj.weight`.
    pub name: String,
    /// Shape as stored (PyTorch layout).
    pub shape: Vec<usize>,
}

/// A source of named tensors: safetensors files, a GGUF file, or anything else.
pub trait WeightSource {
    /// Every tensor the source holds.
    fn tensors(&self) -> Vec<TensorInfo>;
    /// The f32 values of one tensor, in its stored (PyTorch) layout, checked to be finite.
    fn read_f32(&self, name: &str) -> Result<TensorData>;
    /// The file a tensor lives in (for error messages).
    fn file_of(&self, name: &str) -> &Path;
    /// A short description of all files, for "missing tensor" errors.
    fn describe(&self) -> String;
}
