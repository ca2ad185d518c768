//! Llama-family models from GGUF files (llama.cpp's format): SmolLM2, TinyLlama, Llama 2/3,
//! Mistral... On the CPU backends the matrices keep the file's blocks (Q8_0, Q4_0, Q4_1, Q5_0,
//! Q5_1, Q2_K to Q6_K, IQ4_XS; IQ4_NL as Q8_0 blocks of its values) or
//! floats; elsewhere tensors are dequantised one at a time as they load.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use burn::prelude::*;
use burn::tensor::TensorData;
use kiln_core::loading::{LoadOptions, PackRequest, TensorInfo, WeightSource, note_once, pack_f32};
use kiln_core::nn::RopeScaling;
use kiln_core::packed::{PackedFormat, PackedMatrix};
use kiln_core::{ChatTemplate, Error, Result, Tokenizer};
use kiln_gguf::{GgmlType, GgufFile, LlamaMetadata, hf_tensor_name, unpermute_qk};

use crate::{Llama, LlamaConfig, LlamaFlavor};

/// The tensors of a GGUF file under their Hugging Face names, with llama.cpp's Q/K row
/// permutation undone (kiln's RoPE is HF's `rotate_half` form).
pub struct GgufWeights {
    file: GgufFile,
    path: PathBuf,
    /// HF name -> GGUF name.
    names: HashMap<String, String>,
    meta: LlamaMetadata,
}

fn gguf_err(path: &Path, e: kiln_gguf::GgufError) -> Error {
    Error::WeightFormat {
        path: path.to_path_buf(),
        source: Box::new(e),
    }
}

impl GgufWeights {
    /// Opens a GGUF file and reads its Llama metadata.
    pub fn open(path: &Path) -> Result<Self> {
        let file = GgufFile::open(path).map_err(|e| gguf_err(path, e))?;
        let meta = file.llama_metadata().map_err(|e| gguf_err(path, e))?;
        let names = file
            .tensors()
            .iter()
            .filter_map(|t| Some((hf_tensor_name(t.name())?, t.name().to_string())))
            .collect();
        Ok(Self {
            file,
            path: path.to_path_buf(),
            names,
            meta,
        })
    }

    /// The model's hyper-parameters as a [`LlamaConfig`].
    pub fn config(&self) -> Result<LlamaConfig> {
        let m = &self.meta;
        let flavor = match m.architecture.as_str() {
            "llama" => LlamaFlavor::Llama,
            "mistral" => LlamaFlavor::Mistral,
            other => {
                return Err(Error::UnsupportedModel(format!(
                    "{}: GGUF architecture `{other}` is not a Llama-family model kiln loads",
                    self.path.display()
                )));
            }
        };
        let rope_scaling = match &m.rope_scaling {
            Some(s) if s.scaling_type.as_deref() == Some("linear") => RopeScaling::Linear {
                factor: s.factor.unwrap_or(1.0) as f64,
            },
            Some(s) if !matches!(s.scaling_type.as_deref(), None | Some("none")) => {
                return Err(Error::UnsupportedModel(format!(
                    "{}: rope scaling `{:?}` in GGUF is not supported",
                    self.path.display(),
                    s.scaling_type
                )));
            }
            _ => RopeScaling::None,
        };
        Ok(LlamaConfig {
            flavor,
            vocab_size: m.vocab_size,
            hidden_size: m.embedding_length,
            intermediate_size: m.feed_forward_length,
            num_hidden_layers: m.block_count,
            num_attention_heads: m.head_count,
            num_key_value_heads: m.head_count_kv,
            head_dim: m.head_dim,
            max_position_embeddings: m.context_length,
            rms_norm_eps: m.rms_norm_eps as f64,
            rope_theta: m.rope_freq_base as f64,
            rope_scaling,
            tie_word_embeddings: m.tie_word_embeddings(),
            attention_bias: self
                .names
                .contains_key("model.layers.0.self_attn.q_proj.bias"),
            mlp_bias: false,
            sliding_window: None,
            bos_token_id: m.bos_token_id,
            eos_token_ids: m.eos_token_id.into_iter().collect(),
            pad_token_id: m.pad_token_id,
        })
    }

    /// The embedded tokenizer with its chat template and special tokens.
    pub fn tokenizer(&self) -> Result<Tokenizer> {
        let inner = self.file.tokenizer().map_err(|e| gguf_err(&self.path, e))?;
        let token = |id: Option<u32>| id.and_then(|id| inner.id_to_token(id));
        let (bos, eos) = (token(self.meta.bos_token_id), token(self.meta.eos_token_id));
        Ok(Tokenizer::new(inner)
            .with_template(self.file.chat_template().map(|t| {
                ChatTemplate::new(
                    t,
                    format!("tokenizer.chat_template of {}", self.path.display()),
                )
            }))
            .with_special_tokens(bos, eos))
    }
}

impl GgufWeights {
    fn gguf_name(&self, name: &str) -> Result<&str> {
        self.names
            .get(name)
            .map(String::as_str)
            .ok_or_else(|| Error::MissingTensor {
                tensor: name.to_string(),
                files: self.path.display().to_string(),
            })
    }

    /// The head count whose llama.cpp row permutation `name` carries, if any.
    fn permuted_heads(&self, name: &str) -> Option<usize> {
        if !self.meta.qk_permuted() {
            None
        } else if name.ends_with("q_proj.weight") {
            Some(self.meta.head_count)
        } else if name.ends_with("k_proj.weight") {
            Some(self.meta.head_count_kv)
        } else {
            None
        }
    }
}

fn gguf_err_msg(path: &Path, tensor: &str, e: impl std::fmt::Display) -> Error {
    Error::TensorData {
        tensor: tensor.to_string(),
        file: path.to_path_buf(),
        message: e.to_string(),
    }
}

impl WeightSource for GgufWeights {
    fn tensors(&self) -> Vec<TensorInfo> {
        self.names
            .iter()
            .filter_map(|(hf, gguf)| {
                Some(TensorInfo {
                    name: hf.clone(),
                    shape: self.file.tensor_info(gguf)?.shape(),
                })
            })
            .collect()
    }

    fn stored_dtype(&self, name: &str) -> Option<burn::tensor::DType> {
        let info = self.file.tensor_info(self.gguf_name(name).ok()?)?;
        match info.ggml_type() {
            GgmlType::F16 => Some(burn::tensor::DType::F16),
            GgmlType::BF16 => Some(burn::tensor::DType::BF16),
            _ => None,
        }
    }

    fn read_f32(&self, name: &str) -> Result<TensorData> {
        let gguf = self.gguf_name(name)?;
        let (shape, mut values) = self
            .file
            .tensor_f32(gguf)
            .map_err(|e| gguf_err(&self.path, e))?;
        self.file.release_tensor(gguf);
        if let (Some(heads), [rows, cols]) = (self.permuted_heads(name), shape.as_slice()) {
            unpermute_qk(&mut values, *rows, *cols, heads).map_err(|e| gguf_err(&self.path, e))?;
        }
        if let Some(i) = values.iter().position(|v| !v.is_finite()) {
            return Err(Error::TensorData {
                tensor: name.to_string(),
                file: self.path.clone(),
                message: format!("holds a non-finite value at flat index {i}"),
            });
        }
        Ok(TensorData::new(values, shape))
    }

    /// Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K to Q6_K, IQ4_NL, IQ4_XS, F16, BF16 and F32 tensors
    /// are handed over as their bytes (with the Q/K rows unpermuted); a type kiln-gguf can
    /// dequantise but kiln has no kernel for would be requantised to Q8_0, with a note; other
    /// IQ types are an error.
    fn read_packed(&self, name: &str, request: PackRequest) -> Result<PackedMatrix> {
        let gguf = self.gguf_name(name)?;
        let info = self
            .file
            .tensor_info(gguf)
            .ok_or_else(|| Error::MissingTensor {
                tensor: name.to_string(),
                files: self.path.display().to_string(),
            })?;
        let stored = match info.ggml_type() {
            GgmlType::F32 => Some(PackedFormat::F32),
            GgmlType::F16 => Some(PackedFormat::F16),
            GgmlType::BF16 => Some(PackedFormat::BF16),
            GgmlType::Q8_0 => Some(PackedFormat::Q8_0),
            GgmlType::Q4_0 => Some(PackedFormat::Q4_0),
            GgmlType::Q4_1 => Some(PackedFormat::Q4_1),
            GgmlType::Q5_0 => Some(PackedFormat::Q5_0),
            GgmlType::Q5_1 => Some(PackedFormat::Q5_1),
            GgmlType::Q2_K => Some(PackedFormat::Q2_K),
            GgmlType::Q3_K => Some(PackedFormat::Q3_K),
            GgmlType::Q4_K => Some(PackedFormat::Q4_K),
            GgmlType::Q5_K => Some(PackedFormat::Q5_K),
            GgmlType::Q6_K => Some(PackedFormat::Q6_K),
            GgmlType::IQ4_XS => Some(PackedFormat::IQ4_XS),
            GgmlType::IQ4_NL => Some(PackedFormat::IQ4_NL),
            _ => None,
        };
        let shape = info.shape();
        let keep = match request {
            PackRequest::Stored => stored,
            PackRequest::To(format) => stored.filter(|s| *s == format),
        };
        if let (Some(format), [rows, cols]) = (keep, shape.as_slice()) {
            let stored_bytes = self
                .file
                .tensor_bytes(gguf)
                .map_err(|e| gguf_err(&self.path, e))?;
            let mut bytes = stored_bytes.to_vec();
            self.file.release_tensor(gguf);
            if let Some(heads) = self.permuted_heads(name) {
                let row_bytes = format.row_bytes(*cols);
                unpermute_qk(&mut bytes, *rows, row_bytes, heads)
                    .map_err(|e| gguf_err(&self.path, e))?;
            }
            let packed = PackedMatrix::from_bytes(*rows, *cols, format, &bytes)
                .map_err(|e| gguf_err_msg(&self.path, name, e))?;
            if let Some(row) = packed.first_non_finite_row() {
                return Err(Error::TensorData {
                    tensor: name.to_string(),
                    file: self.path.clone(),
                    message: format!("holds a non-finite value in row {row}"),
                });
            }
            return Ok(packed);
        }
        let request = match (request, stored) {
            (PackRequest::Stored, None) if info.ggml_type().can_dequantize() => {
                note_once(&format!(
                    "{}: {} tensors have no kiln kernel; requantised to q8_0 at load",
                    self.path.display(),
                    info.ggml_type()
                ));
                PackRequest::To(PackedFormat::Q8_0)
            }
            (request, _) => request,
        };
        let data = self.read_f32(name)?;
        let [rows, cols] = shape.as_slice() else {
            return Err(gguf_err_msg(&self.path, name, "is not a matrix"));
        };
        pack_f32(
            name,
            *rows,
            *cols,
            data.as_slice::<f32>().unwrap_or_default(),
            request,
        )
    }

    fn file_of(&self, _name: &str) -> &Path {
        &self.path
    }

    fn describe(&self) -> String {
        self.path.display().to_string()
    }
}

impl<B: Backend> Llama<B> {
    /// Loads a Llama-family GGUF file; returns the model and its embedded tokenizer.
    ///
    /// On the CPU backends the Q8_0, Q4_0, Q4_1, K-quant and float tensors stay as the file stores them
    /// (see [`LoadOptions`]); elsewhere they are dequantised to the backend's float type.
    pub fn from_gguf(path: &Path, device: &B::Device) -> Result<(Self, Tokenizer)> {
        Self::from_gguf_with(path, device, &LoadOptions::default())
    }

    /// [`from_gguf`](Self::from_gguf) with a precision or quantisation.
    pub fn from_gguf_with(
        path: &Path,
        device: &B::Device,
        options: &LoadOptions,
    ) -> Result<(Self, Tokenizer)> {
        let weights = GgufWeights::open(path)?;
        let config = weights.config()?;
        let tokenizer = weights.tokenizer()?;
        let model = Self::from_weights_with(&config, Arc::new(weights), device, options)?;
        Ok((model, tokenizer))
    }
}
