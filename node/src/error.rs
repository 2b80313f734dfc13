//! The node's error type: what went wrong, named by what the caller does next.

use rim_proto::ErrorCode;
use rim_proto::ids::{NodeId, ShardId};

/// Errors of `rim-node`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// This node is not the leader of the group; retry at the hinted node.
    #[error("not the leader of group {shard}; leader is {leader:?}")]
    NotLeader {
        /// The group.
        shard: ShardId,
        /// The leader's node id, if known.
        leader: Option<NodeId>,
        /// The leader's internal address, if known: what clients and
        /// gateways get in `rim-leader` (docs/protocol.md).
        addr: Option<String>,
    },
    /// The group is not hosted here or has no leader yet: retry later.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// The outcome is unknown (a timeout): retry with the same idempotency key.
    #[error("timed out: {0}")]
    Timeout(String),
    /// The request was refused by the state machine or validation.
    #[error("{code:?}: {message}")]
    Rejected {
        /// Stable code.
        code: ErrorCode,
        /// Detail.
        message: String,
    },
    /// Too many requests (a rate limit) or too much work queued: retry
    /// after the hint, with the same idempotency key.
    #[error("{code:?}: {message} (retry after {retry_after_ms} ms)")]
    Overloaded {
        /// `ERROR_RATE_LIMITED` or `ERROR_BUSY`.
        code: ErrorCode,
        /// Which limit.
        message: String,
        /// How long to wait, in milliseconds.
        retry_after_ms: u32,
    },
    /// Invalid configuration.
    #[error("config: {0}")]
    Config(String),
    /// Storage failure.
    #[error(transparent)]
    Store(#[from] rim_raft_store::Error),
    /// Network or I/O failure.
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    /// A bug or an unexpected internal state.
    #[error("internal: {0}")]
    Internal(String),
}

impl Error {
    /// A rejection with a code.
    pub fn rejected(code: ErrorCode, message: impl Into<String>) -> Error {
        Error::Rejected { code, message: message.into() }
    }

    /// A refusal by the rate limit named `what`.
    pub fn rate_limited(what: &str, limited: rim_cluster::Limited) -> Error {
        Error::Overloaded {
            code: ErrorCode::ErrorRateLimited,
            message: format!("rate limit: {what}"),
            retry_after_ms: limited.retry_after_ms(),
        }
    }

    /// The stable client-facing code.
    pub fn code(&self) -> ErrorCode {
        match self {
            Error::NotLeader { .. } => ErrorCode::ErrorNotLeader,
            Error::Unavailable(_) => ErrorCode::ErrorUnavailable,
            Error::Timeout(_) => ErrorCode::ErrorTimeout,
            Error::Rejected { code, .. } | Error::Overloaded { code, .. } => *code,
            Error::Store(e) => e.code(),
            Error::Config(_) | Error::Io(_) | Error::Internal(_) => ErrorCode::ErrorInternal,
        }
    }

    /// As a gRPC status carrying `rim-code` (and `rim-leader` when known).
    pub fn to_status(&self) -> tonic::Status {
        match self {
            Error::NotLeader { addr: Some(a), .. } => {
                rim_proto::error::status_with_leader(self.code(), self.to_string(), a)
            }
            Error::Overloaded { code, retry_after_ms, .. } => {
                rim_proto::error::status_with_retry_after(*code, self.to_string(), *retry_after_ms)
            }
            _ => rim_proto::error::status(self.code(), self.to_string()),
        }
    }
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> tonic::Status {
        e.to_status()
    }
}

/// Result alias.
pub type Result<T, E = Error> = std::result::Result<T, E>;
