//! The crate's error type.

use crate::GgmlType;

/// Everything that can go wrong while reading a GGUF file.
///
/// Variants that come from a file name it (`path`), and, where there is one, the metadata key or
/// tensor involved, so that a message alone says what was wrong where.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GgufError {
    /// The file could not be opened, inspected or memory-mapped.
    #[error("{path}: cannot read file: {source}")]
    Io {
        /// The file.
        path: String,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },

    /// The first four bytes are not `GGUF`.
    #[error("{path}: not a GGUF file (first bytes {found:02x?}, expected \"GGUF\")")]
    BadMagic {
        /// The file.
        path: String,
        /// What the file starts with (fewer than four bytes when it is shorter).
        found: Vec<u8>,
    },

    /// A GGUF version this crate does not read (v1, a big-endian file, or a future version).
    #[error("{path}: unsupported GGUF version {version}: {hint}")]
    UnsupportedVersion {
        /// The file.
        path: String,
        /// The version field as read (little-endian).
        version: u32,
        /// What to do about it.
        hint: &'static str,
    },

    /// The file ends before a structure it declares.
    #[error(
        "{path}: truncated: {what} needs {needed} bytes at offset {offset}, but the file has {file_size} bytes"
    )]
    Truncated {
        /// The file.
        path: String,
        /// What was being read (names the key or tensor).
        what: String,
        /// Where it starts.
        offset: u64,
        /// How many bytes it needs.
        needed: u64,
        /// The file's size.
        file_size: u64,
    },

    /// A structurally invalid header: absurd counts, an unknown metadata value type, a bad
    /// alignment, duplicate keys or tensor names, and the like.
    #[error("{path}: invalid {what}: {detail}")]
    Invalid {
        /// The file.
        path: String,
        /// What was being read (names the key or tensor).
        what: String,
        /// What is wrong with it.
        detail: String,
    },

    /// A tensor whose ggml type id this crate does not know.
    #[error("{path}: tensor `{tensor}` has unknown ggml type id {type_id}")]
    UnknownGgmlType {
        /// The file.
        path: String,
        /// The tensor.
        tensor: String,
        /// The type id found.
        type_id: u32,
    },

    /// A tensor whose data would extend past the end of the file.
    #[error(
        "{path}: tensor `{tensor}` data [{start}, {end}) lies past the end of the data section ({data_len} bytes)"
    )]
    TensorOutOfBounds {
        /// The file.
        path: String,
        /// The tensor.
        tensor: String,
        /// Start of its data, relative to the data section.
        start: u64,
        /// End of its data, relative to the data section.
        end: u64,
        /// Length of the data section.
        data_len: u64,
    },

    /// No tensor with that name.
    #[error("{path}: no tensor named `{tensor}`")]
    TensorNotFound {
        /// The file.
        path: String,
        /// The name asked for.
        tensor: String,
    },

    /// The tensor's type is known, but dequantising it is not implemented.
    #[error("{path}: tensor `{tensor}`: dequantising {ggml_type} is not supported")]
    UnsupportedType {
        /// The file (empty for the free [`dequantize`](crate::dequantize) functions).
        path: String,
        /// The tensor (empty for the free functions).
        tensor: String,
        /// Its type.
        ggml_type: GgmlType,
    },

    /// A required metadata key is missing.
    #[error("{path}: metadata key `{key}` is missing")]
    MissingKey {
        /// The file.
        path: String,
        /// The key.
        key: String,
    },

    /// A metadata key has a value of the wrong type or an out-of-range value.
    #[error("{path}: metadata key `{key}`: expected {expected}, found {found}")]
    BadValue {
        /// The file.
        path: String,
        /// The key.
        key: String,
        /// What was expected.
        expected: String,
        /// What was found.
        found: String,
    },

    /// The embedded tokenizer could not be turned into a [`tokenizers::Tokenizer`].
    #[error("{path}: tokenizer: {detail}")]
    Tokenizer {
        /// The file.
        path: String,
        /// What went wrong.
        detail: String,
    },

    /// [`quantize`](crate::quantize) has no quantiser for this type.
    #[error(
        "quantising to {0} is not supported (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K to Q6_K and IQ4_XS are)"
    )]
    CannotQuantize(GgmlType),

    /// Buffer sizes or a shape do not fit together (free functions such as
    /// [`dequantize`](crate::dequantize) and [`unpermute_qk`](crate::unpermute_qk)).
    #[error("invalid shape: {0}")]
    Shape(String),
}

/// `Result` with [`GgufError`].
pub type Result<T, E = GgufError> = std::result::Result<T, E>;
