//! Errors of the ensemble crate.

/// Result alias of the ensemble crate.
pub type Result<T, E = EnsembleError> = std::result::Result<T, E>;

/// What can go wrong while building or running an ensemble.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EnsembleError {
    /// The members' vocabularies share no token, so there is no relative space to meet in.
    #[error(
        "members {a} and {b} share no token (after normalising SentencePiece `▁`, byte-level `Ġ` \
         and byte-fallback `<0xNN>` spellings{special}); DeePEn needs shared tokens as anchors"
    )]
    NoSharedTokens {
        /// First member.
        a: String,
        /// Second member.
        b: String,
        /// Whether special tokens were considered (text for the message).
        special: &'static str,
    },
    /// A member's weights live on another device than the main model's.
    #[error(
        "member `{member}` is on device {found}, but the main model is on {expected}; load every \
         member on the same device"
    )]
    DeviceMismatch {
        /// The member.
        member: String,
        /// Its device.
        found: String,
        /// The main model's device.
        expected: String,
    },
    /// Ensemble weights are malformed.
    #[error("invalid ensemble weights {weights:?}: {message}")]
    BadWeights {
        /// The weights given.
        weights: Vec<f32>,
        /// What is wrong.
        message: String,
    },
    /// An argument is out of range or inconsistent.
    #[error("invalid argument `{name}`: {message}")]
    InvalidArgument {
        /// The argument.
        name: &'static str,
        /// What is wrong.
        message: String,
    },
    /// A cached relative matrix could not be read or written.
    #[error("relative-matrix cache {path}: {message}")]
    Cache {
        /// The cache file.
        path: std::path::PathBuf,
        /// What is wrong.
        message: String,
    },
    /// An error from kiln-core (tokenizer, model, loading).
    #[error(transparent)]
    Core(#[from] kiln_core::Error),
}

impl EnsembleError {
    /// An [`EnsembleError::InvalidArgument`].
    pub fn arg(name: &'static str, message: impl Into<String>) -> Self {
        EnsembleError::InvalidArgument {
            name,
            message: message.into(),
        }
    }
}
