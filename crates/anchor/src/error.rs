use std::path::PathBuf;

/// Errors of the anchor crate.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AnchorError {
    /// An error of the model zoo (loading, tokenizer, bad arguments).
    #[error(transparent)]
    Core(#[from] kiln_core::Error),
    /// An argument or configuration value is out of range or inconsistent.
    #[error("invalid argument `{name}`: {message}")]
    InvalidArgument {
        /// The argument.
        name: &'static str,
        /// What is wrong.
        message: String,
    },
    /// Reading, writing or parsing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What went wrong (an `std::io::Error`, a JSON or record error, or a message).
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl AnchorError {
    /// An [`AnchorError::InvalidArgument`].
    pub fn arg(name: &'static str, message: impl Into<String>) -> Self {
        Self::InvalidArgument {
            name,
            message: message.into(),
        }
    }

    pub(crate) fn io(
        path: impl Into<PathBuf>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        Self::Io {
            path: path.into(),
            source: source.into(),
        }
    }
}

/// Result of the anchor crate.
pub type Result<T, E = AnchorError> = std::result::Result<T, E>;
