use std::path::PathBuf;

/// Errors of the anchor crate.
#[derive(Debug, thiserror::Error)]
pub enum AnchorError {
    /// An error of the model zoo (loading, tokenizer, bad arguments).
    #[error(transparent)]
    Core(#[from] kiln_core::Error),
    /// A bad argument or configuration.
    #[error("{0}")]
    Invalid(String),
    /// Reading or writing a file failed.
    #[error("{path}: {message}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
}

impl AnchorError {
    pub(crate) fn invalid(message: impl Into<String>) -> Self {
        Self::Invalid(message.into())
    }

    pub(crate) fn io(path: impl Into<PathBuf>, err: impl std::fmt::Display) -> Self {
        Self::Io {
            path: path.into(),
            message: err.to_string(),
        }
    }
}

/// Result of the anchor crate.
pub type Result<T> = std::result::Result<T, AnchorError>;
