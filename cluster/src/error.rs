//! The crate's error type.
//!
//! Variants are named for what the caller should do:
//!
//! * [`Error::InvalidInput`]: the caller's arguments are wrong (a bootstrap
//!   with no nodes, an empty secret, a leader hint naming a non-voter). Fix
//!   them; retrying unchanged fails the same way.
//! * [`Error::InvalidMap`]: a cluster map failed validation. If it came from
//!   the meta group, that is a server fault: keep using the previous map and
//!   report it.
//! * [`Error::NotFound`]: a shard or node id is not in the map. The caller's
//!   map may be stale (refresh it) or the id is simply wrong.
//! * [`Error::Token`]: a device token was refused; the client must sign in
//!   again (see [`TokenError`]).
//!
//! [`Error::code`] gives the stable wire [`ErrorCode`] for each.

use rim_proto::ErrorCode;

use crate::token::TokenError;

/// Errors of `rim-cluster`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The caller's arguments are invalid; fix them before retrying.
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// A cluster map is inconsistent (see [`crate::Placement::new`]); do not
    /// use it.
    #[error("invalid cluster map: {0}")]
    InvalidMap(String),
    /// A shard or node id is unknown to this map; refresh the map or fix the id.
    #[error("not found: {0}")]
    NotFound(String),
    /// A device token was refused.
    #[error("token refused: {0}")]
    Token(#[from] TokenError),
}

impl Error {
    /// The stable code a client (or admin tool) sees for this error.
    ///
    /// | variant | code |
    /// |---|---|
    /// | `InvalidInput` | `ERROR_BAD_REQUEST` |
    /// | `InvalidMap` | `ERROR_INTERNAL` |
    /// | `NotFound` | `ERROR_INVALID_ID` |
    /// | `Token(e)` | [`TokenError::code`] |
    pub fn code(&self) -> ErrorCode {
        match self {
            Error::InvalidInput(_) => ErrorCode::ErrorBadRequest,
            Error::InvalidMap(_) => ErrorCode::ErrorInternal,
            Error::NotFound(_) => ErrorCode::ErrorInvalidId,
            Error::Token(e) => e.code(),
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
        assert_eq!(Error::InvalidInput("x".into()).code(), ErrorCode::ErrorBadRequest);
        assert_eq!(Error::InvalidMap("x".into()).code(), ErrorCode::ErrorInternal);
        assert_eq!(Error::NotFound("x".into()).code(), ErrorCode::ErrorInvalidId);
        assert_eq!(Error::from(TokenError::Malformed).code(), ErrorCode::ErrorUnauthenticated);
        assert_eq!(Error::from(TokenError::BadSignature).code(), ErrorCode::ErrorUnauthenticated);
        assert_eq!(Error::from(TokenError::Expired).code(), ErrorCode::ErrorTokenExpired);
    }
}
