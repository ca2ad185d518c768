//! Reads GGUF files, the format of llama.cpp, so that Llama-family models published as GGUF
//! (SmolLM2, Llama 2/3, Mistral, Qwen2, …) can be loaded into kiln.
//!
//! * [`GgufFile::open`] memory-maps a file and parses GGUF v2/v3: header, metadata of every
//!   value type (nested arrays too), tensor infos, alignment and data section. Nothing in the
//!   file is trusted: every count, length and offset is checked against the file size before
//!   use, and bad input gives a [`GgufError`] naming the file and the key or tensor, never a
//!   panic.
//! * [`GgufFile::tensor_f32`] dequantises a tensor (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1,
//!   Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_NL, IQ4_XS) bit-exactly as ggml does;
//!   [`dequantize`] does the same for raw blocks.
//! * [`GgufFile::llama_metadata`] gives the hyper-parameters as a plain [`LlamaMetadata`];
//!   [`hf_tensor_name`] maps tensor names to Hugging Face's and [`unpermute_qk`] undoes
//!   llama.cpp's row permutation of the Q/K weights.
//! * [`GgufFile::tensor_bytes`] hands over a tensor's stored bytes (kiln keeps every block
//!   type above as it is) and [`GgufFile::release_tensor`]
//!   drops its mapped pages afterwards; [`writer::write_gguf`] writes files (tests,
//!   random-weight benchmark checkpoints), [`quantize`] makes Q8_0, Q4_0, Q4_1, Q5_0, Q5_1,
//!   K-quant (Q2_K to Q6_K), IQ4_NL and IQ4_XS blocks as ggml's reference quantisers do, and
//!   [`writer::requantize`] rewrites a file's matrices in other block types.
//! * [`GgufFile::tokenizer`] rebuilds the embedded vocabulary as a [`tokenizers::Tokenizer`];
//!   [`GgufFile::chat_template`] returns the Jinja chat template.
//!
//! ```no_run
//! # fn main() -> Result<(), kiln_gguf::GgufError> {
//! let gguf = kiln_gguf::GgufFile::open("SmolLM2-135M-Instruct.Q4_1.gguf")?;
//! let meta = gguf.llama_metadata()?;
//! let (shape, mut q) = gguf.tensor_f32("blk.0.attn_q.weight")?;
//! kiln_gguf::unpermute_qk(&mut q, shape[0], shape[1], meta.head_count)?;
//! let tokenizer = gguf.tokenizer()?;
//! # Ok(()) }
//! ```
//!
//! # Why not an existing GGUF crate
//!
//! The crates.io candidates were looked at (2026-11) and none fits: `candle-core`'s reader
//! comes with all of candle; `ggus` (InfiniTensor) reads only v3, takes tensor extents on trust
//! (`&data[..len]` panics on a truncated file) and preallocates from unchecked counts;
//! `gguf-rs` is a CLI-oriented crate that pulls in anyhow, clap, tokio and a logger; `gguf`
//! (Jimexist) is a small nom parser without v2/alignment/data handling, last released in
//! 2023; `gguf-rs-lib` is ~20k lines of reader *and* writer for what is a 300-line format. The
//! container is simple, and what matters here is the hardening against untrusted input, so
//! the parser is written here, with the dequantisation kernels, against llama.cpp's
//! `gguf.cpp`/`ggml-quants.c` and checked against the `gguf` Python package.

#![warn(missing_docs)]

mod error;
mod file;
mod llama;
mod quant;
mod quantize;
pub mod tokenizer;
mod types;
pub mod writer;

pub use error::{GgufError, Result};
pub use file::{DEFAULT_ALIGNMENT, GgufFile, TensorInfo};
pub use llama::{LlamaMetadata, RopeScaling, hf_tensor_name, permute_qk, unpermute_qk};
pub use quant::{IQ4_LEVELS, dequantize, dequantize_into};
pub use quantize::{can_quantize, quantize, quantize_into};
pub use types::{GgmlType, Value, ValueType};
