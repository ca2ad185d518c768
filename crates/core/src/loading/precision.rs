//! Which precision a model's weights are held in, and loading them packed on the host.

use std::collections::HashMap;
use std::sync::Arc;

use burn::prelude::Backend;
use burn::tensor::DType;

use super::WeightSource;
use crate::nn::{Embedding, TorchLinear};
use crate::packed::{PackedFormat, PackedMatrix};
use crate::{Error, Result};

/// The float precision weights are held in (`--dtype`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WeightDtype {
    /// What the file holds where kiln can compute with it: on the CPU backends a GGUF's
    /// quantised blocks and f16/bf16 tensors stay as they are, safetensors become f32; on the
    /// GPU backends f16/bf16 matrices stay half where the backend computes in that type (wgpu:
    /// f16; cuda: f16 and bf16), everything else becomes the backend's float type.
    #[default]
    Auto,
    /// 32-bit floats.
    F32,
    /// IEEE half precision. CPU backends: stored as f16, computed in f32. GPU backends: Linear
    /// and embedding matrices held and multiplied in f16; norms, softmax, the residual stream
    /// and the KV cache stay in the backend's float type.
    F16,
    /// bfloat16, as [`Self::F16`] (on GPU backends that compute in bf16: cuda, not wgpu).
    BF16,
}

impl std::str::FromStr for WeightDtype {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "auto" => Self::Auto,
            "f32" | "float32" => Self::F32,
            "f16" | "float16" | "half" => Self::F16,
            "bf16" | "bfloat16" => Self::BF16,
            other => return Err(format!("unknown dtype `{other}` (auto, f32, f16, bf16)")),
        })
    }
}

/// Weight quantisation at load (`--quant`): Linear and embedding matrices are requantised to
/// ggml's block format; norms and biases stay in floats.
#[allow(non_camel_case_types)] // ggml's names
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Quantization {
    /// Keep the precision [`WeightDtype`] chooses.
    #[default]
    None,
    /// ggml Q8_0: 8.5 bits a weight.
    Q8_0,
    /// ggml Q4_0: 4.5 bits a weight.
    Q4_0,
    /// ggml Q4_1: 5 bits a weight.
    Q4_1,
    /// ggml IQ4_NL: 4.5 bits a weight, as Q4_0, with sixteen non-uniform levels that round
    /// bell-shaped weights closer (relative RMS error on normal values 0.076 against Q4_0's
    /// 0.086), found by ggml's scale search: loading SmolLM2-135M with it took ~18 s on 2 cores,
    /// against ~1.2 s with Q4_0.
    IQ4_NL,
}

impl std::str::FromStr for Quantization {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "none" => Self::None,
            "q8" | "q8_0" => Self::Q8_0,
            "q4" | "q4_0" => Self::Q4_0,
            "q4_1" => Self::Q4_1,
            "iq4_nl" => Self::IQ4_NL,
            other => {
                return Err(format!(
                    "unknown quantisation `{other}` (none, q8_0, q4_0, q4_1, iq4_nl)"
                ));
            }
        })
    }
}

impl Quantization {
    fn format(self) -> Option<PackedFormat> {
        match self {
            Self::None => None,
            Self::Q8_0 => Some(PackedFormat::Q8_0),
            Self::Q4_0 => Some(PackedFormat::Q4_0),
            Self::Q4_1 => Some(PackedFormat::Q4_1),
            Self::IQ4_NL => Some(PackedFormat::IQ4_NL),
        }
    }
}

/// Whether the matrices of a model live on the host, multiplied by [`crate::packed`]'s kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HostKernels {
    /// On the CPU backends (flex, ndarray) outside autodiff.
    #[default]
    Auto,
    /// Always (activations then travel to the host and back on every product).
    Always,
    /// Never: every weight is a Burn parameter (what training needs).
    Never,
}

/// What the packing step asks of a [`WeightSource`] for one matrix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PackRequest {
    /// Keep the stored format where kiln has kernels for it; a GGUF block type without kernels
    /// is requantised to Q8_0; safetensors become f32.
    Stored,
    /// Convert (or quantise) to this format.
    To(PackedFormat),
}

/// A module's matrices that may be held packed, by checkpoint path (without `.weight`).
pub enum PackSlot<'a, B: Backend> {
    /// A Linear layer's weight.
    Linear(&'a mut TorchLinear<B>),
    /// An embedding (also a tied LM head).
    Embedding(&'a mut Embedding<B>),
}

/// Turns every packed matrix of `module` back into a dense parameter (see
/// [`TorchLinear::unpack`](crate::nn::TorchLinear::unpack)), e.g. before saving it.
pub fn unpack_module<B: Backend, M: PackSlots<B>>(module: &mut M) {
    for (_, slot) in module.pack_slots() {
        match slot {
            PackSlot::Linear(l) => l.unpack(),
            PackSlot::Embedding(e) => e.unpack(),
        }
    }
}

/// Modules that list their packable matrices, so [`load_packed`](super::load_packed) can fill them.
pub trait PackSlots<B: Backend> {
    /// Every Linear and embedding, with its checkpoint path (`model.layers.0.mlp.up_proj`).
    fn pack_slots(&mut self) -> Vec<(String, PackSlot<'_, B>)>;
}

impl super::LoadOptions {
    /// The request for each packable matrix, or `None` when weights stay Burn parameters on
    /// this backend. Errors for a precision the backend cannot hold.
    pub fn pack_request<B: Backend>(&self, device: &B::Device) -> Result<Option<PackRequest>> {
        let backend = B::name(device);
        let cpu = !B::ad_enabled(device) && crate::nn::cpu_backend::<B>(device);
        let host = match self.host_kernels {
            HostKernels::Auto => cpu,
            HostKernels::Always => true,
            HostKernels::Never => false,
        };
        let float = match self.dtype {
            WeightDtype::Auto => None,
            WeightDtype::F32 => Some(PackedFormat::F32),
            WeightDtype::F16 => Some(PackedFormat::F16),
            WeightDtype::BF16 => Some(PackedFormat::BF16),
        };
        if !host {
            if self.activations != crate::packed::ActivationPrecision::F32 {
                return Err(Error::arg(
                    "activations",
                    format!(
                        "the {backend} backend multiplies its own float weights; 8-bit \
                         activations apply to kiln's quantised CPU kernels (flex, ndarray) only: \
                         use --activations f32 here"
                    ),
                ));
            }
            if let Some(format) = self.quantization.format() {
                return Err(Error::arg(
                    "quant",
                    format!(
                        "kiln keeps {format} weights only on the CPU backends (flex, ndarray) so \
                         far; the {backend} backend holds Burn float tensors: use --quant none \
                         (and --dtype f16 to halve the memory of f32)"
                    ),
                ));
            }
            // f16/bf16 are Burn tensors of that dtype here: see `dense_dtype`.
            return Ok(None);
        }
        Ok(Some(match self.quantization.format().or(float) {
            Some(format) => PackRequest::To(format),
            None => PackRequest::Stored,
        }))
    }
}

/// The dtype of the matrices (Linear and embedding weights) a backend holds as Burn tensors,
/// where they are not packed on the host. Everything else (norms, biases, activations, the KV
/// cache) stays in the backend's float type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DenseDtype {
    /// The backend's float type.
    Float,
    /// Each matrix in the half type it is stored in, where the backend computes in it.
    Stored {
        /// The backend computes in f16.
        f16: bool,
        /// The backend computes in bf16.
        bf16: bool,
    },
    /// Every matrix in this half type.
    Half(DType),
}

impl DenseDtype {
    /// The dtype for one matrix, given what its source stores it in.
    pub(crate) fn of(self, stored: Option<DType>, float: DType) -> DType {
        match (self, stored) {
            (Self::Half(dtype), _) => dtype,
            (Self::Stored { f16: true, .. }, Some(DType::F16)) => DType::F16,
            (Self::Stored { bf16: true, .. }, Some(DType::BF16)) => DType::BF16,
            _ => float,
        }
    }
}

impl super::LoadOptions {
    /// What [`DenseDtype`] the matrices get on a backend that holds them as Burn tensors.
    /// `Auto` keeps a checkpoint's f16/bf16 matrices half on a GPU backend that computes in
    /// that type; an explicit half dtype the backend cannot compute in, or one asked of an
    /// autodiff backend (training keeps f32 weights), is an error naming the backend.
    pub(crate) fn dense_dtype<B: Backend>(&self, device: &B::Device) -> Result<DenseDtype> {
        let backend = B::name(device);
        let cpu = crate::nn::cpu_backend::<B>(device);
        let training = B::ad_enabled(device);
        let wanted = match self.dtype {
            WeightDtype::F32 => return Ok(DenseDtype::Float),
            WeightDtype::Auto if cpu || training => return Ok(DenseDtype::Float),
            WeightDtype::Auto => {
                return Ok(DenseDtype::Stored {
                    f16: B::supports_dtype(device, DType::F16),
                    bf16: B::supports_dtype(device, DType::BF16),
                });
            }
            WeightDtype::F16 => DType::F16,
            WeightDtype::BF16 => DType::BF16,
        };
        if training {
            return Err(Error::arg(
                "dtype",
                format!(
                    "training (the autodiff {backend} backend) keeps weights in f32; \
                     half-precision weights are for inference: use --dtype auto or f32"
                ),
            ));
        }
        if !B::supports_dtype(device, wanted) {
            let supported: Vec<&str> = [
                (DType::F32, "f32"),
                (DType::F16, "f16"),
                (DType::BF16, "bf16"),
            ]
            .into_iter()
            .filter(|(dtype, _)| B::supports_dtype(device, *dtype))
            .map(|(_, name)| name)
            .collect();
            return Err(Error::arg(
                "dtype",
                format!(
                    "the {backend} backend cannot compute in {} on this device; it computes in {}",
                    dtype_name(wanted),
                    supported.join(", ")
                ),
            ));
        }
        Ok(DenseDtype::Half(wanted))
    }
}

fn dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        _ => "f32",
    }
}

/// Packs every slot of `module` that `source` holds, as `options` ask; returns the checkpoint
/// names packed, which [`super::load_module`] then skips. Does nothing where
/// [`LoadOptions::pack_request`](super::LoadOptions::pack_request) says weights stay Burn
/// parameters.
pub fn pack_module<B: Backend, M: PackSlots<B>>(
    module: &mut M,
    source: &dyn WeightSource,
    device: &B::Device,
    options: &super::LoadOptions,
) -> Result<Vec<String>> {
    let Some(request) = options.pack_request::<B>(device)? else {
        return Ok(Vec::new());
    };
    let shapes: HashMap<String, Vec<usize>> = source
        .tensors()
        .into_iter()
        .map(|t| (t.name, t.shape))
        .collect();
    let mut packed = Vec::new();
    for (path, slot) in module.pack_slots() {
        let name = format!("{path}.weight");
        // Missing or misshapen tensors are left to load_module, which names them in its error.
        let Some(shape) = shapes.get(&name) else {
            continue;
        };
        let expected = match &slot {
            PackSlot::Linear(l) => l.weight.lazy_shape().dims::<2>(),
            PackSlot::Embedding(e) => e.weight.lazy_shape().dims::<2>(),
        };
        if shape.as_slice() != expected {
            continue;
        }
        let matrix = source
            .read_packed(&name, request)?
            .with_activations(options.activations);
        let matrix = Arc::new(matrix);
        match slot {
            PackSlot::Linear(l) => l.set_packed(matrix),
            PackSlot::Embedding(e) => e.set_packed(matrix),
        }
        packed.push(name);
    }
    Ok(packed)
}

/// Converts f32 values of a `[rows, cols]` tensor as `request` asks (f32 when it keeps the
/// stored format): the default [`WeightSource::read_packed`].
pub fn pack_f32(
    name: &str,
    rows: usize,
    cols: usize,
    values: &[f32],
    request: PackRequest,
) -> Result<PackedMatrix> {
    let mut format = match request {
        PackRequest::Stored => PackedFormat::F32,
        PackRequest::To(format) => format,
    };
    if !cols.is_multiple_of(format.block_len()) {
        note_once(&format!(
            "{name} has {cols} columns, not a whole number of {format} blocks: kept in f32"
        ));
        format = PackedFormat::F32;
    }
    PackedMatrix::from_f32(rows, cols, values, format).map_err(|e| {
        Error::arg(
            "quant",
            format!("{name} [{rows}, {cols}] cannot be held as {format}: {e}"),
        )
    })
}

/// Prints a note about a precision fallback to stderr, once per process for each message.
pub fn note_once(message: &str) {
    use std::sync::Mutex;
    static SEEN: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let mut seen = SEEN.lock().unwrap_or_else(|e| e.into_inner());
    if !seen.iter().any(|m| m == message) {
        eprintln!("kiln: {message}");
        seen.push(message.to_string());
    }
}

#[cfg(test)]
mod tests {
    use burn::backend::NdArray;

    use super::*;
    use crate::loading::LoadOptions;
    use crate::packed::ActivationPrecision;

    /// `Stored` keeps a matrix half only in a half type the backend computes in.
    #[test]
    fn stored_half_needs_the_backend() {
        use burn::tensor::DType::{BF16, F16, F32};
        let wgpu_like = DenseDtype::Stored {
            f16: true,
            bf16: false,
        };
        assert_eq!(wgpu_like.of(Some(F16), F32), F16);
        assert_eq!(wgpu_like.of(Some(BF16), F32), F32);
        assert_eq!(wgpu_like.of(None, F32), F32);
        assert_eq!(DenseDtype::Half(BF16).of(Some(F16), F32), BF16);
        assert_eq!(DenseDtype::Float.of(Some(F16), F32), F32);
    }

    /// Where weights stay Burn parameters (a GPU backend, or host kernels off), asking for a
    /// precision only the host kernels have is an error naming the option and the backend, not
    /// a silent no-op.
    #[test]
    fn host_only_precisions_are_errors_without_host_kernels() {
        let device = Default::default();
        let off = LoadOptions::default().with_host_kernels(HostKernels::Never);
        assert_eq!(off.pack_request::<NdArray>(&device).unwrap(), None);
        let cases = [
            (
                "activations",
                off.clone().with_activations(ActivationPrecision::Q8),
            ),
            ("quant", off.clone().with_quantization(Quantization::Q4_0)),
        ];
        for (name, options) in cases {
            let err = options
                .pack_request::<NdArray>(&device)
                .unwrap_err()
                .to_string();
            assert!(err.contains(name) && err.contains("ndarray"), "{err}");
        }
        // A half dtype is a Burn tensor dtype there: an error where the backend can't compute
        // in it (ndarray computes in f32 and f64 only), naming what it can.
        let half = off.clone().with_dtype(WeightDtype::F16);
        assert_eq!(half.pack_request::<NdArray>(&device).unwrap(), None);
        let err = half
            .dense_dtype::<NdArray>(&device)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("ndarray") && err.contains("cannot compute in f16") && err.contains("f32"),
            "{err}"
        );
        // Training keeps f32 whatever the file holds; asking for half is an error.
        type Train = burn::backend::Autodiff<NdArray>;
        let auto = LoadOptions::default();
        assert_eq!(
            auto.dense_dtype::<Train>(&device).unwrap(),
            DenseDtype::Float
        );
        let err = half.dense_dtype::<Train>(&device).unwrap_err().to_string();
        assert!(err.contains("training"), "{err}");
        // With host kernels (the CPU default) the same options are requests.
        let on = LoadOptions::default().with_activations(ActivationPrecision::Q8);
        assert_eq!(
            on.pack_request::<NdArray>(&device).unwrap(),
            Some(PackRequest::Stored)
        );
    }
}
