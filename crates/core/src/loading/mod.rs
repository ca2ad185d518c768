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
mod precision;
mod safetensors;
mod save;
mod sizes;

/// Re-exported beside [`LoadOptions`], whose `activations` field it is.
pub use crate::packed::ActivationPrecision;
pub use apply::{LoadOptions, load_module, load_packed};
pub use generation_config::{GenerationDefaults, SamplingOverrides, TokenIds};
pub use hub::{ModelFiles, resolve_model};
pub use json::{from_value, read_json, read_json_value};
pub use precision::{
    HostKernels, PackRequest, PackSlot, PackSlots, Quantization, WeightDtype, note_once, pack_f32,
    pack_module, unpack_module,
};
pub use safetensors::SafetensorsWeights;
pub use save::{
    SpecialTokenRoles, fast_tokenizer_config, save_hf_folder, save_safetensors, save_tokenizer,
    seq2seq_generation_json, write_json_file,
};
pub use sizes::check_config_sizes;

use std::path::Path;

use burn::tensor::TensorData;

use crate::Result;
use crate::packed::PackedMatrix;

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
    /// A 2-D tensor packed on the host as `request` asks. The default reads f32 and converts;
    /// sources that store blocks kiln computes with (GGUF) hand them over as they are.
    fn read_packed(&self, name: &str, request: PackRequest) -> Result<PackedMatrix> {
        let data = self.read_f32(name)?;
        let [rows, cols] = data.shape.as_slice() else {
            return Err(crate::Error::TensorData {
                tensor: name.to_string(),
                file: self.file_of(name).to_path_buf(),
                message: format!("is {}-D where a matrix was expected", data.shape.len()),
            });
        };
        let (rows, cols) = (*rows, *cols);
        let values = data
            .as_slice::<f32>()
            .map_err(|e| crate::Error::TensorData {
                tensor: name.to_string(),
                file: self.file_of(name).to_path_buf(),
                message: format!("{e:?}"),
            })?;
        pack_f32(name, rows, cols, values, request)
    }
    /// The float type a tensor is stored in, where the source knows it (f16/bf16 tensors stay
    /// half on GPU backends under [`WeightDtype::Auto`]). `None`: treat it as f32.
    fn stored_dtype(&self, _name: &str) -> Option<burn::tensor::DType> {
        None
    }
    /// The file a tensor lives in (for error messages).
    fn file_of(&self, name: &str) -> &Path;
    /// A short description of all files, for "missing tensor" errors.
    fn describe(&self) -> String;
}
