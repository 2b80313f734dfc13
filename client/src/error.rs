//! The crate's one error type, [`ClientError`].
//!
//! Every failure a caller can see carries a stable [`ErrorCode`]
//! ([`ClientError::code`]): a server's own code for errors the server
//! returned (a `Reply.code` on the long connection or the `rim-code` entry of
//! a gRPC status), and the code that means the same for local failures
//! (a timeout is `ERROR_TIMEOUT`, a lost connection `ERROR_UNAVAILABLE`).
//! [`ClientError::is_retryable`] says whether repeating the same request
//! (with the same `client_msg_id`) may succeed.

use std::time::Duration;

use rim_proto::error::{ErrorClass, code_from_number, code_of_status};
use rim_proto::v1::Reply;
use rim_proto::{CodecError, ErrorCode};

/// Everything that can go wrong in the client SDK.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server answered with a non-zero error code.
    #[error("server error {number} ({}): {message}", code.as_str_name())]
    Server {
        /// The code, mapped to a known one by class if this build does not
        /// know `number`.
        code: ErrorCode,
        /// The number the server sent (stable, see `docs/protocol.md`).
        number: i32,
        /// The server's detail, for logs only.
        message: String,
        /// The server's retry hint (`Reply.retry_after_ms`), if any.
        retry_after: Option<Duration>,
    },
    /// No answer within the time allowed; the outcome is unknown.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The client is between connections (reconnecting).
    #[error("not connected to a gateway")]
    NotConnected,
    /// The connection broke while the request was in flight; the outcome is
    /// unknown.
    #[error("connection lost: {0}")]
    ConnectionLost(String),
    /// A local bounded queue was full.
    #[error("client queue full: {0}")]
    Overloaded(&'static str),
    /// Connecting or talking to a gateway failed.
    #[error("transport error: {0}")]
    Transport(String),
    /// A frame from the server could not be decoded.
    #[error("bad frame from the server: {0}")]
    Codec(#[from] CodecError),
    /// A reply's data could not be decoded as the expected message.
    #[error("bad reply from the server: {0}")]
    Decode(#[from] prost::DecodeError),
    /// An address or URL could not be parsed.
    #[error("invalid address {0:?}: {1}")]
    InvalidAddress(String, String),
    /// The session was replaced by another sign-in of the same device (or
    /// the device was signed out); the client stopped.
    #[error("kicked ({}): {reason}", code.as_str_name())]
    Kicked {
        /// `ERROR_KICKED` or `ERROR_TOKEN_REVOKED`.
        code: ErrorCode,
        /// The server's detail.
        reason: String,
    },
    /// The client was closed, or stopped for good (kick, rejected sign-in).
    #[error("client closed")]
    Closed,
}

impl ClientError {
    /// The server error carried by a failed `Reply`.
    pub fn from_reply(reply: &Reply) -> ClientError {
        ClientError::Server {
            code: reply.error_code(),
            number: reply.code,
            message: reply.message.clone(),
            retry_after: (reply.retry_after_ms > 0)
                .then(|| Duration::from_millis(u64::from(reply.retry_after_ms))),
        }
    }

    /// The error carried by a gRPC status (its `rim-code` entry, or the
    /// code matching its gRPC status code).
    pub fn from_status(status: &tonic::Status) -> ClientError {
        let code = code_of_status(status);
        let number = status
            .metadata()
            .get(rim_proto::error::CODE_METADATA_KEY)
            .and_then(|v| v.to_str().ok())
            .and_then(|s| s.parse::<i32>().ok())
            .unwrap_or(code as i32);
        let retry_after = match rim_proto::error::retry_after_of_status(status) {
            0 => None,
            ms => Some(Duration::from_millis(u64::from(ms))),
        };
        ClientError::Server { code, number, message: status.message().to_string(), retry_after }
    }

    /// A server error with `code`, for errors the SDK detects itself in a
    /// server's answer.
    pub(crate) fn server(code: ErrorCode, message: impl Into<String>) -> ClientError {
        ClientError::Server { code, number: code as i32, message: message.into(), retry_after: None }
    }

    /// The stable error code of this error (see the module documentation).
    pub fn code(&self) -> ErrorCode {
        match self {
            ClientError::Server { number, .. } => code_from_number(*number),
            ClientError::Timeout(_) => ErrorCode::ErrorTimeout,
            ClientError::NotConnected | ClientError::ConnectionLost(_) | ClientError::Transport(_) => {
                ErrorCode::ErrorUnavailable
            }
            ClientError::Overloaded(_) => ErrorCode::ErrorBusy,
            ClientError::Codec(e) => e.code(),
            ClientError::Decode(_) => ErrorCode::ErrorInternal,
            ClientError::InvalidAddress(..) => ErrorCode::ErrorBadRequest,
            ClientError::Kicked { code, .. } => *code,
            ClientError::Closed => ErrorCode::ErrorUnavailable,
        }
    }

    /// Whether repeating the same request may succeed: timeouts, lost or
    /// missing connections, full queues, and server codes of the retry
    /// class (1xxx). A closed client never retries.
    pub fn is_retryable(&self) -> bool {
        match self {
            ClientError::Server { number, .. } => ErrorClass::of(*number) == ErrorClass::Retry,
            ClientError::Timeout(_)
            | ClientError::NotConnected
            | ClientError::ConnectionLost(_)
            | ClientError::Overloaded(_)
            | ClientError::Transport(_) => true,
            ClientError::Codec(_)
            | ClientError::Decode(_)
            | ClientError::InvalidAddress(..)
            | ClientError::Kicked { .. }
            | ClientError::Closed => false,
        }
    }

    /// The server's retry hint, if it gave one.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ClientError::Server { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// Whether this error means "authenticate again" (class 3xxx).
    pub fn is_auth(&self) -> bool {
        match self {
            ClientError::Server { number, .. } => ErrorClass::of(*number) == ErrorClass::Auth,
            ClientError::Kicked { .. } => true,
            _ => false,
        }
    }
}

impl From<tonic::Status> for ClientError {
    fn from(status: tonic::Status) -> Self {
        ClientError::from_status(&status)
    }
}

/// Shorthand for results of this crate.
pub type Result<T, E = ClientError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_and_retry_classes() {
        let busy = ClientError::from_reply(&Reply { code: 1004, retry_after_ms: 250, ..Default::default() });
        assert_eq!(busy.code(), ErrorCode::ErrorBusy);
        assert!(busy.is_retryable());
        assert_eq!(busy.retry_after(), Some(Duration::from_millis(250)));

        let future = ClientError::from_reply(&Reply { code: 2999, ..Default::default() });
        assert_eq!(future.code(), ErrorCode::ErrorBadRequest);
        assert!(matches!(future, ClientError::Server { number: 2999, .. }));
        assert!(!future.is_retryable());

        let auth = ClientError::from_reply(&Reply::error(ErrorCode::ErrorTokenExpired, "old"));
        assert!(auth.is_auth() && !auth.is_retryable());

        assert!(ClientError::Timeout(Duration::from_secs(1)).is_retryable());
        assert_eq!(ClientError::Timeout(Duration::from_secs(1)).code(), ErrorCode::ErrorTimeout);
        assert!(!ClientError::Closed.is_retryable());

        let status = rim_proto::error::status(ErrorCode::ErrorNotLeader, "moved");
        let e = ClientError::from(status);
        assert_eq!(e.code(), ErrorCode::ErrorNotLeader);
        assert!(e.is_retryable());
        assert_eq!(ClientError::from(tonic::Status::unavailable("down")).code(), ErrorCode::ErrorUnavailable);
    }
}
