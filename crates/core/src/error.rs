//! The one error type of kiln. Every failure names the file, tensor, field or argument at fault.

use std::path::PathBuf;

/// Result alias used throughout kiln.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong while loading or running a model.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A file that must be there is not.
    #[error("{path} not found{hint}")]
    MissingFile {
        /// The file that was expected.
        path: PathBuf,
        /// Extra guidance, starting with a separator, or empty.
        hint: String,
    },
    /// A JSON file (config.json, tokenizer.json, ...) is malformed or has a field of the wrong type.
    #[error("invalid {path}: {message}")]
    Config {
        /// The file.
        path: PathBuf,
        /// What is wrong, naming the field.
        message: String,
    },
    /// The checkpoint's architecture is not one kiln implements.
    #[error("unsupported model: {0}")]
    UnsupportedModel(String),
    /// A weight file is truncated, corrupt or of an unsupported dtype.
    #[error("invalid weight file {path}: {message}")]
    WeightFile {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A weight file in a format another crate parses (GGUF) is invalid; `source` is that
    /// crate's error (downcast it to `kiln_gguf::GgufError`).
    #[error("invalid weight file {path}: {source}")]
    WeightFormat {
        /// The file.
        path: PathBuf,
        /// The parser's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A tensor the model needs is absent from every weight file.
    #[error("tensor `{tensor}` is missing from the checkpoint ({files})")]
    MissingTensor {
        /// The checkpoint key.
        tensor: String,
        /// The files that were searched.
        files: String,
    },
    /// A tensor has a shape other than the config implies.
    #[error("tensor `{tensor}` in {file} has shape {found:?}, but the config implies {expected:?}")]
    TensorShape {
        /// The checkpoint key.
        tensor: String,
        /// The file holding it.
        file: PathBuf,
        /// The shape the model expects (checkpoint layout).
        expected: Vec<usize>,
        /// The shape found in the file.
        found: Vec<usize>,
    },
    /// A tensor holds NaN or infinite values, or otherwise cannot be used.
    #[error("tensor `{tensor}` in {file}: {message}")]
    TensorData {
        /// The checkpoint key.
        tensor: String,
        /// The file holding it.
        file: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// Tokenizer failure (loading, encoding or decoding).
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// An argument given by the caller is out of range or inconsistent.
    #[error("invalid argument `{name}`: {message}")]
    InvalidArgument {
        /// The argument.
        name: &'static str,
        /// What is wrong.
        message: String,
    },
    /// The prompt plus requested tokens do not fit the model's context.
    #[error(
        "prompt of {prompt} tokens does not fit the model's context of {context} tokens{detail}"
    )]
    ContextOverflow {
        /// Prompt length in tokens.
        prompt: usize,
        /// The model's maximum context.
        context: usize,
        /// Extra detail, starting with a separator, or empty.
        detail: String,
    },
    /// Downloading from the Hugging Face hub failed.
    #[error("hub: {0}")]
    Hub(String),
    /// Chat template rendering failed.
    #[error("chat template: {0}")]
    ChatTemplate(String),
}

impl Error {
    /// An [`Error::InvalidArgument`].
    pub fn arg(name: &'static str, message: impl Into<String>) -> Self {
        Error::InvalidArgument {
            name,
            message: message.into(),
        }
    }

    /// An [`Error::Config`].
    pub fn config(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Error::Config {
            path: path.into(),
            message: message.into(),
        }
    }
}

/// The message of a caught panic (`catch_unwind`'s payload), for errors that contain one.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> &str {
    payload
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| payload.downcast_ref::<&str>().copied())
        .unwrap_or("no message")
}
