use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::rc::Rc;
use std::sync::Arc;

use burn::module::{Module, ParamId};
use burn::prelude::Backend;
use burn::tensor::DType;
use burn::tensor::TensorData;
use burn_store::{
    ApplyError, ModuleAdapter, ModuleSnapshot, PyTorchToBurnAdapter, TensorSnapshot,
    TensorSnapshotError,
};

use super::WeightSource;
use super::precision::{
    DenseDtype, HostKernels, PackSlots, Quantization, WeightDtype, pack_module,
};
use crate::packed::ActivationPrecision;
use crate::{Error, Result};

/// How a model is loaded: the precision its weights are held in, and which tensors may be
/// missing.
///
/// ```
/// use kiln_core::loading::{LoadOptions, Quantization, WeightDtype};
/// let options = LoadOptions::default().with_quantization(Quantization::Q8_0);
/// let half = LoadOptions::default().with_dtype(WeightDtype::BF16);
/// # let _ = (options, half);
/// ```
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// Module paths that may stay uninitialised because the checkpoint need not have them.
    pub optional: Vec<String>,
    /// Float precision of the weights.
    pub dtype: WeightDtype,
    /// Quantisation of Linear and embedding matrices.
    pub quantization: Quantization,
    /// Whether matrices are held on the host for kiln's CPU kernels.
    pub host_kernels: HostKernels,
    /// What the host kernels do with the activations of quantised weights (decode steps, and
    /// prefill where the integer kernels are faster): f32 (the default: results equal the dequantised weights' product) or 8-bit blocks, as
    /// llama.cpp multiplies them (faster; see [`ActivationPrecision`]).
    pub activations: ActivationPrecision,
    /// Read the model's tensors from under this key prefix of the checkpoint (e.g.
    /// `language_model.` for the text model of a multimodal checkpoint, or the field name a
    /// composite module saved its Llama under); other keys are ignored. Empty: keys as they are.
    pub key_prefix: String,
}

impl LoadOptions {
    /// Sets [`dtype`](Self::dtype).
    pub fn with_dtype(mut self, dtype: WeightDtype) -> Self {
        self.dtype = dtype;
        self
    }

    /// Sets [`quantization`](Self::quantization).
    pub fn with_quantization(mut self, quantization: Quantization) -> Self {
        self.quantization = quantization;
        self
    }

    /// Sets [`host_kernels`](Self::host_kernels).
    pub fn with_host_kernels(mut self, host_kernels: HostKernels) -> Self {
        self.host_kernels = host_kernels;
        self
    }

    /// Sets [`activations`](Self::activations).
    pub fn with_activations(mut self, activations: ActivationPrecision) -> Self {
        self.activations = activations;
        self
    }

    /// Sets [`key_prefix`](Self::key_prefix).
    pub fn with_key_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.key_prefix = prefix.into();
        self
    }
}

/// Loads `module` from `source` as `options` ask: its packable matrices (see [`PackSlots`])
/// packed on the host where [`LoadOptions::pack_request`] says so, every other parameter
/// through [`load_module`]. What every kiln model's loader calls.
pub fn load_packed<B: Backend, M: Module<B> + PackSlots<B>>(
    mut module: M,
    source: Arc<dyn WeightSource>,
    device: &B::Device,
    options: &LoadOptions,
) -> Result<M> {
    let source: Arc<dyn WeightSource> = if options.key_prefix.is_empty() {
        source
    } else {
        // Used on this thread only, as `Skipping` below.
        #[allow(clippy::arc_with_non_send_sync)]
        Arc::new(Prefixed {
            source,
            prefix: options.key_prefix.clone(),
        })
    };
    if options.pack_request::<B>(device)?.is_none() {
        // Matrices stay Burn tensors: in the backend's float type, or half where asked.
        let dense = options.dense_dtype::<B>(device)?;
        if dense == DenseDtype::Float {
            return load_module(module, source, device, options);
        }
        let matrices: HashSet<String> = module
            .pack_slots()
            .into_iter()
            .map(|(path, _)| format!("{path}.weight"))
            .collect();
        let float = crate::nn::float_dtype::<B>(device);
        let typed = source.clone();
        let dtype_of = move |name: &str| {
            if matrices.contains(name) {
                dense.of(typed.stored_dtype(name), float)
            } else {
                float
            }
        };
        return load_module_as(module, source, options, &dtype_of);
    }
    let packed = pack_module(&mut module, source.as_ref(), device, options)?;
    if packed.is_empty() {
        return load_module(module, source, device, options);
    }
    let mut options = options.clone();
    options.optional.extend(packed.iter().cloned());
    // `load_module` takes the `Arc<dyn WeightSource>` every source is handed around as; this
    // one is used on this thread only.
    #[allow(clippy::arc_with_non_send_sync)]
    let source = Arc::new(Skipping { source, packed });
    load_module(module, source, device, &options)
}

/// The tensors of `source` under `prefix`, with the prefix taken off their keys.
struct Prefixed {
    source: Arc<dyn WeightSource>,
    prefix: String,
}

impl WeightSource for Prefixed {
    fn tensors(&self) -> Vec<super::TensorInfo> {
        let mut tensors = self.source.tensors();
        tensors.retain_mut(|t| match t.name.strip_prefix(&self.prefix) {
            Some(rest) => {
                t.name = rest.to_string();
                true
            }
            None => false,
        });
        tensors
    }
    fn read_f32(&self, name: &str) -> Result<TensorData> {
        self.source.read_f32(&format!("{}{name}", self.prefix))
    }
    fn read_packed(
        &self,
        name: &str,
        request: super::PackRequest,
    ) -> Result<crate::packed::PackedMatrix> {
        self.source
            .read_packed(&format!("{}{name}", self.prefix), request)
    }
    fn stored_dtype(&self, name: &str) -> Option<DType> {
        self.source.stored_dtype(&format!("{}{name}", self.prefix))
    }
    fn file_of(&self, name: &str) -> &std::path::Path {
        self.source.file_of(&format!("{}{name}", self.prefix))
    }
    fn describe(&self) -> String {
        format!("{} (keys under `{}`)", self.source.describe(), self.prefix)
    }
}

/// A source without the tensors already packed.
struct Skipping {
    source: Arc<dyn WeightSource>,
    packed: Vec<String>,
}

impl WeightSource for Skipping {
    fn tensors(&self) -> Vec<super::TensorInfo> {
        let mut tensors = self.source.tensors();
        tensors.retain(|t| !self.packed.contains(&t.name));
        tensors
    }
    fn read_f32(&self, name: &str) -> Result<TensorData> {
        self.source.read_f32(name)
    }
    fn stored_dtype(&self, name: &str) -> Option<DType> {
        self.source.stored_dtype(name)
    }
    fn file_of(&self, name: &str) -> &std::path::Path {
        self.source.file_of(name)
    }
    fn describe(&self) -> String {
        self.source.describe()
    }
}

/// Loads every parameter of `module` from `source`, by checkpoint key.
///
/// Linear weights are transposed from PyTorch's `[out, in]` to Burn's `[in, out]`; values are
/// converted to the device's float type one tensor at a time. A missing tensor, a tensor of the
/// wrong shape or one holding NaN is an error naming the tensor and its file. Tensors the module
/// doesn't use (e.g. `rotary_emb.inv_freq` in older checkpoints) are ignored.
pub fn load_module<B: Backend, M: Module<B>>(
    module: M,
    source: Arc<dyn WeightSource>,
    device: &B::Device,
    options: &LoadOptions,
) -> Result<M> {
    let float = crate::nn::float_dtype::<B>(device);
    load_module_as(module, source, options, &|_| float)
}

/// [`load_module`] with each tensor converted to `dtype_of(name)`.
fn load_module_as<B: Backend, M: Module<B>>(
    mut module: M,
    source: Arc<dyn WeightSource>,
    options: &LoadOptions,
    dtype_of: &dyn Fn(&str) -> DType,
) -> Result<M> {
    // Snapshot closures can only report strings; keep the first structured error here.
    let first_error: Rc<RefCell<Option<Error>>> = Rc::default();
    let stored_shapes: HashMap<String, Vec<usize>> = source
        .tensors()
        .into_iter()
        .map(|t| (t.name, t.shape))
        .collect();

    let snapshots = source
        .tensors()
        .into_iter()
        .map(|info| {
            let source = source.clone();
            let name = info.name.clone();
            let first_error = first_error.clone();
            let float_dtype = dtype_of(&name);
            let data_fn = Rc::new(move || {
                let data = source.read_f32(&name).map_err(|e| {
                    let message = e.to_string();
                    first_error.borrow_mut().get_or_insert(e);
                    TensorSnapshotError::DataError(message)
                })?;
                Ok(if float_dtype == DType::F32 {
                    data
                } else {
                    data.convert_dtype(float_dtype)
                })
            });
            TensorSnapshot::from_closure(
                data_fn,
                float_dtype,
                info.shape.into(),
                info.name.split('.').map(str::to_string).collect(),
                vec![],
                ParamId::new(),
            )
        })
        .collect();

    let result = module.apply(snapshots, None, Some(Box::new(FastPyTorchAdapter)), false);

    if let Some(error) = first_error.borrow_mut().take() {
        return Err(error);
    }
    if let Some(error) = result.errors.into_iter().next() {
        return Err(match error {
            ApplyError::ShapeMismatch {
                path,
                expected,
                found,
            } => {
                let stored = stored_shapes.get(&path).cloned().unwrap_or_default();
                let found: Vec<usize> = found.iter().copied().collect();
                let mut expected: Vec<usize> = expected.iter().copied().collect();
                // The adapter transposed a Linear weight: report in the checkpoint's layout.
                if found != stored {
                    expected.reverse();
                }
                Error::TensorShape {
                    file: source.file_of(&path).to_path_buf(),
                    tensor: path,
                    expected,
                    found: stored,
                }
            }
            other => Error::WeightFile {
                path: source.describe().into(),
                message: other.to_string(),
            },
        });
    }
    let missing = result
        .missing
        .into_iter()
        .map(|(path, _)| path)
        .find(|path| {
            !options
                .optional
                .iter()
                .any(|o| path.starts_with(o.as_str()))
        });
    if let Some(tensor) = missing {
        return Err(Error::MissingTensor {
            tensor,
            files: source.describe(),
        });
    }
    Ok(module)
}

/// [`PyTorchToBurnAdapter`] with a cache-blocked, multi-threaded transpose of f32 burn-nn
/// `Linear` weights.
///
/// kiln's own models use [`crate::nn::TorchLinear`], which keeps the checkpoint layout and needs
/// no transpose; this serves burn-nn `Linear` layers in modules loaded through [`load_module`].
/// burn-store 0.21 transposes element by element through byte slices, writing with a stride of
/// a whole row (it was ~10 of kiln's 12.5 s TinyLlama load). Everything else (norm renames,
/// other dtypes) is delegated unchanged.
#[derive(Clone)]
struct FastPyTorchAdapter;

impl ModuleAdapter for FastPyTorchAdapter {
    fn adapt(&self, snapshot: &TensorSnapshot) -> TensorSnapshot {
        let is_linear_weight = snapshot.module_type().as_deref() == Some("Struct:Linear")
            && snapshot
                .path_stack
                .as_ref()
                .and_then(|p| p.last())
                .is_some_and(|name| name == "weight")
            && snapshot.shape.len() == 2;
        if !is_linear_weight || snapshot.dtype != DType::F32 {
            return PyTorchToBurnAdapter.adapt(snapshot);
        }
        let (rows, cols) = (snapshot.shape[0], snapshot.shape[1]);
        let data_fn = snapshot.clone_data_fn();
        TensorSnapshot::from_closure(
            Rc::new(move || {
                let data = data_fn()?;
                let values = data
                    .as_slice::<f32>()
                    .map_err(|e| TensorSnapshotError::DataError(format!("{e:?}")))?;
                Ok(TensorData::new(transpose(values, rows, cols), [cols, rows]))
            }),
            snapshot.dtype,
            [cols, rows].into(),
            snapshot.path_stack.clone().unwrap_or_default(),
            snapshot.container_stack.clone().unwrap_or_default(),
            snapshot.tensor_id.unwrap_or_default(),
        )
    }

    fn get_alternative_param_name(&self, param_name: &str, container_type: &str) -> Option<String> {
        PyTorchToBurnAdapter.get_alternative_param_name(param_name, container_type)
    }

    fn clone_box(&self) -> Box<dyn ModuleAdapter> {
        Box::new(self.clone())
    }
}

/// `[rows, cols]` row-major to `[cols, rows]`, in 32×32 tiles so reads and writes stay in cache,
/// split over the available cores (each thread writes its own band of output rows).
fn transpose(src: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut dst = vec![0.0f32; src.len()];
    if src.is_empty() {
        return dst;
    }
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(cols.div_ceil(TILE));
    let band = cols.div_ceil(threads).next_multiple_of(TILE);
    std::thread::scope(|scope| {
        for (i, out) in dst.chunks_mut(band * rows).enumerate() {
            scope.spawn(move || transpose_band(src, rows, cols, i * band, out));
        }
    });
    dst
}

const TILE: usize = 32;

/// Output rows `first..first + out.len() / rows` (= input columns) of the transpose into `out`.
fn transpose_band(src: &[f32], rows: usize, cols: usize, first: usize, out: &mut [f32]) {
    let n = out.len() / rows;
    for c0 in (0..n).step_by(TILE) {
        for r0 in (0..rows).step_by(TILE) {
            let r1 = (r0 + TILE).min(rows);
            for c in c0..(c0 + TILE).min(n) {
                let column = first + c;
                let dst = &mut out[c * rows + r0..c * rows + r1];
                for (r, value) in (r0..r1).zip(dst) {
                    *value = src[r * cols + column];
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::transpose;

    #[test]
    fn transpose_matches_definition_on_ragged_tiles() {
        for (rows, cols) in [(37, 70), (1, 100), (100, 1), (64, 64), (33, 129), (0, 5)] {
            let src: Vec<f32> = (0..rows * cols).map(|i| i as f32).collect();
            let dst = transpose(&src, rows, cols);
            assert_eq!(dst.len(), src.len());
            for r in 0..rows {
                for c in 0..cols {
                    assert_eq!(dst[c * rows + r], src[r * cols + c], "{rows}x{cols}");
                }
            }
        }
    }
}
