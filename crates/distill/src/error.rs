use std::path::PathBuf;

/// Errors of kiln-distill.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DistillError {
    /// A file could not be read or written.
    #[error("{0}: {1}")]
    Io(PathBuf, #[source] std::io::Error),
    /// A data file is malformed.
    #[error("{path}:{line}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// An argument, configuration value or data set is out of range or inconsistent.
    #[error("invalid argument `{name}`: {message}")]
    InvalidArgument {
        /// The argument.
        name: &'static str,
        /// What is wrong.
        message: String,
    },
    /// Training cannot go on (the loss diverged, a collective step failed).
    #[error("training: {0}")]
    Training(String),
    /// A checkpoint could not be saved or loaded.
    #[error("checkpoint {0}: {1}")]
    Checkpoint(PathBuf, String),
    /// An error from the model, tokenizer or generation code.
    #[error(transparent)]
    Core(#[from] kiln_core::Error),
}

impl DistillError {
    /// A [`DistillError::InvalidArgument`].
    pub fn arg(name: &'static str, message: impl Into<String>) -> Self {
        Self::InvalidArgument {
            name,
            message: message.into(),
        }
    }
}

/// Result of kiln-distill.
pub type Result<T, E = DistillError> = std::result::Result<T, E>;
