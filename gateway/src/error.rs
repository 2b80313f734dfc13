//! The crate's error type.
//!
//! Variants are named for what the caller should do:
//!
//! * [`Error::Config`]: the configuration or arguments cannot work (no
//!   listener, no seed, a zero timeout, a secret that cannot travel as gRPC
//!   metadata, an address that is not one). Fix them; retrying unchanged
//!   fails the same way.
//! * [`Error::Bind`]: a listener could not be bound (address in use, no
//!   permission): choose another address or free this one.
//! * [`Error::Io`]: the OS refused a resource a transport needs (an epoll
//!   instance, a thread). Retrying may help once the machine has room.
//! * [`Error::BadPacket`]: a client's text message is not a `Packet` in
//!   the WebSocket JSON form; the connection answers it as a bad frame.
//! * [`Error::Call`]: a node call failed (the cluster is unreachable, or a
//!   node refused); the [`CallError`] says why and whether to retry.
//!
//! [`Error::code`] gives the stable wire [`ErrorCode`] for each.
//!
//! # The one other error type
//!
//! [`CallError`] stays a type of its own: it is the outcome of one node call
//! as a client sees it (code, message, retry hint), handed to the sans-IO
//! [`Session`](crate::Session) by [`Session::on_reply`](crate::Session::on_reply)
//! and relayed as a `Reply`. It must be `Clone` and `PartialEq` (sessions
//! are tested by comparing their inputs and outputs), which an error
//! holding an [`std::io::Error`] cannot be, and a session never sees a
//! configuration or bind error. Where a node call ends a process-level
//! operation ([`Gateway::wait_ready`](crate::Gateway::wait_ready)) it is
//! wrapped in [`Error::Call`].

use rim_proto::ErrorCode;

use crate::call::CallError;

/// Errors of `rim-gateway`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration or arguments cannot work; fix them.
    #[error("invalid gateway configuration: {0}")]
    Config(String),
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: String,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The OS refused a transport's resource (poller, thread, socket option).
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// A WebSocket text message is not a `Packet` in the JSON form.
    #[error("bad JSON packet: {0}")]
    BadPacket(String),
    /// A node call failed.
    #[error("node call failed: {0}")]
    Call(#[from] CallError),
}

impl Error {
    /// The stable code a client (or operator) sees for this error.
    ///
    /// | variant | code |
    /// |---|---|
    /// | `Config` | `ERROR_BAD_REQUEST` |
    /// | `Bind`, `Io` | `ERROR_INTERNAL` |
    /// | `BadPacket` | `ERROR_MALFORMED_FRAME` |
    /// | `Call(e)` | `e.code` |
    pub fn code(&self) -> ErrorCode {
        match self {
            Error::Config(_) => ErrorCode::ErrorBadRequest,
            Error::Bind { .. } | Error::Io(_) => ErrorCode::ErrorInternal,
            Error::BadPacket(_) => ErrorCode::ErrorMalformedFrame,
            Error::Call(e) => e.code,
        }
    }
}

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes() {
        assert_eq!(Error::Config("x".into()).code(), ErrorCode::ErrorBadRequest);
        let bind = Error::Bind { addr: "a".into(), source: std::io::ErrorKind::AddrInUse.into() };
        assert_eq!(bind.code(), ErrorCode::ErrorInternal);
        assert_eq!(
            Error::from(std::io::Error::from(std::io::ErrorKind::Other)).code(),
            ErrorCode::ErrorInternal
        );
        assert_eq!(Error::BadPacket("x".into()).code(), ErrorCode::ErrorMalformedFrame);
        let call = CallError::new(ErrorCode::ErrorUnavailable, "down");
        assert_eq!(Error::from(call).code(), ErrorCode::ErrorUnavailable);
    }
}
