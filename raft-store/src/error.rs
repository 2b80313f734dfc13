//! The crate's error type.
//!
//! Two kinds of failure meet here and must never be confused:
//!
//! * **Rejections** ([`Error::Rejected`]): a command was well-formed Raft data
//!   but the IM rules refuse it (unknown user, not a member, content too
//!   large). They are deterministic: every replica reaches the same verdict,
//!   so they are returned to the client inside the apply result and the
//!   state is left untouched.
//! * **Faults** (everything else): I/O errors, corrupt records. They are not
//!   deterministic, so apply must not turn them into a client answer (the
//!   replicas would diverge); they surface as openraft `StorageError`s, which
//!   stop the Raft group.

use rim_proto::ErrorCode;

/// Errors of `rim-raft-store`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The IM rules refuse the command; nothing was written. Tell the client.
    #[error("{code:?}: {message}")]
    Rejected {
        /// Stable code for the client.
        code: ErrorCode,
        /// Human-readable detail.
        message: String,
    },
    /// RocksDB failed. Not retryable on this node: stop the group.
    #[error("rocksdb: {0}")]
    Db(#[from] rocksdb::Error),
    /// File I/O (snapshots) failed.
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    /// A stored value could not be decoded: data corruption or a format from a
    /// newer build. Do not continue on this data.
    #[error("corrupt data: {0}")]
    Corrupt(String),
    /// The store was opened with invalid options.
    #[error("invalid config: {0}")]
    Config(String),
}

impl Error {
    /// A rejection with the given code.
    pub fn rejected(code: ErrorCode, message: impl Into<String>) -> Error {
        Error::Rejected { code, message: message.into() }
    }

    /// The stable code a client sees for this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            Error::Rejected { code, .. } => *code,
            _ => ErrorCode::ErrorInternal,
        }
    }

    /// Whether every replica would fail the same way on the same input
    /// (so the error may be returned as an apply result).
    pub fn is_deterministic(&self) -> bool {
        matches!(self, Error::Rejected { .. })
    }
}

impl From<prost::DecodeError> for Error {
    fn from(e: prost::DecodeError) -> Self {
        Error::Corrupt(e.to_string())
    }
}

impl From<postcard::Error> for Error {
    fn from(e: postcard::Error) -> Self {
        Error::Corrupt(e.to_string())
    }
}

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Shorthand: return a rejection from the current function.
macro_rules! reject {
    ($code:ident, $($arg:tt)*) => {
        return Err($crate::error::Error::rejected(rim_proto::ErrorCode::$code, format!($($arg)*)))
    };
}
pub(crate) use reject;
