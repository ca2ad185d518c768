use std::path::PathBuf;

/// Errors of kiln-distill.
#[derive(Debug, thiserror::Error)]
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
    /// A bad argument or configuration.
    #[error("{0}")]
    Arg(String),
    /// A checkpoint could not be saved or loaded.
    #[error("checkpoint {0}: {1}")]
    Checkpoint(PathBuf, String),
    /// An error from the model, tokenizer or generation code.
    #[error(transparent)]
    Core(#[from] kiln_core::Error),
}
