//! gRPC metadata keys: the contract strings between clients, gateways and
//! nodes, defined once here and used by every crate.
//!
//! | key | on | carries |
//! |---|---|---|
//! | [`USER_ID_METADATA_KEY`] | client calls | the signed-in user, decimal |
//! | [`DEVICE_ID_METADATA_KEY`] | client calls | the signed-in device, decimal |
//! | [`TOKEN_METADATA_KEY`] | client calls | the device token from sign-in |
//! | [`CLUSTER_SECRET_METADATA_KEY`] | internal calls (Raft, gateway, admin) | the shared cluster secret |
//! | [`CODE_METADATA_KEY`] | error statuses | the decimal [`ErrorCode`](crate::ErrorCode) |
//! | [`LEADER_METADATA_KEY`] | `ERROR_NOT_LEADER` / `ERROR_WRONG_SHARD` | the leader's address, when known |
//! | [`RETRY_AFTER_METADATA_KEY`] | `ERROR_RATE_LIMITED` / `ERROR_BUSY` | milliseconds to wait before retrying |
//!
//! A secret is checked with [`has_cluster_secret`], which compares in
//! constant time so the time a refusal takes tells nothing about how much
//! of the secret a caller guessed.

use subtle::ConstantTimeEq;
use tonic::metadata::MetadataMap;

/// Metadata entry holding the calling user's id (decimal) on client calls.
pub const USER_ID_METADATA_KEY: &str = "user_id";

/// Metadata entry holding the calling device's id (decimal) on client calls.
pub const DEVICE_ID_METADATA_KEY: &str = "device_id";

/// Metadata entry holding the calling device's token on client calls.
pub const TOKEN_METADATA_KEY: &str = "token";

/// Metadata entry carrying the shared cluster secret on every internal call
/// (node to node, gateway to node, admin tools to node).
pub const CLUSTER_SECRET_METADATA_KEY: &str = "rim-cluster-secret";

/// Metadata entry holding the decimal [`ErrorCode`](crate::ErrorCode) of an
/// error status.
pub const CODE_METADATA_KEY: &str = "rim-code";

/// Metadata entry holding the leader's address, with `ERROR_NOT_LEADER` /
/// `ERROR_WRONG_SHARD`, when known.
pub const LEADER_METADATA_KEY: &str = "rim-leader";

/// Metadata entry holding how long to wait before retrying, in decimal
/// milliseconds, with `ERROR_RATE_LIMITED` (and `ERROR_BUSY` when known):
/// the gRPC twin of `Reply.retry_after_ms`.
pub const RETRY_AFTER_METADATA_KEY: &str = "rim-retry-after-ms";

/// Whether `metadata` carries `expected` in [`CLUSTER_SECRET_METADATA_KEY`].
/// The comparison takes the same time wherever the values differ (only the
/// length of the expected secret can be learned from timing).
pub fn has_cluster_secret(metadata: &MetadataMap, expected: &str) -> bool {
    metadata
        .get(CLUSTER_SECRET_METADATA_KEY)
        .is_some_and(|given| secrets_equal(given.as_bytes(), expected.as_bytes()))
}

/// Compares two secrets in time independent of their contents.
pub fn secrets_equal(given: &[u8], expected: &[u8]) -> bool {
    given.ct_eq(expected).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_secret(secret: &str) -> MetadataMap {
        let mut m = MetadataMap::new();
        m.insert(CLUSTER_SECRET_METADATA_KEY, secret.parse().unwrap());
        m
    }

    #[test]
    fn only_the_exact_secret_is_accepted() {
        let expected = "test-cluster-secret-0123456789";
        assert!(has_cluster_secret(&with_secret(expected), expected));
        assert!(!has_cluster_secret(&MetadataMap::new(), expected), "missing");
        assert!(!has_cluster_secret(&with_secret(""), expected), "empty");
        assert!(!has_cluster_secret(&with_secret("test-cluster-secret-012345678"), expected), "prefix");
        assert!(!has_cluster_secret(&with_secret("test-cluster-secret-01234567890"), expected), "longer");
        assert!(!has_cluster_secret(&with_secret("test-cluster-secret-0123456788"), expected), "last byte");
        assert!(!has_cluster_secret(&with_secret("Test-cluster-secret-0123456789"), expected), "first byte");
    }

    #[test]
    fn secrets_compare_as_bytes() {
        assert!(secrets_equal(b"", b""));
        assert!(secrets_equal(b"abc", b"abc"));
        assert!(!secrets_equal(b"abc", b"abd"));
        assert!(!secrets_equal(b"abc", b"ab"));
    }
}
