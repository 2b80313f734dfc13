//! The server API's idempotency keys (`ClaimIdempotency`).
//!
//! A write of the server API that has no natural key of its own (creating a
//! group takes a fresh id) claims its idempotency key first: the record
//! `(UserId(0), SERVER_API_SCOPE, key)` of the idempotency table holds the
//! digest of the request and a value (the group id). The first claim stores
//! it; a retry with the same digest gets the stored record back, so it acts
//! on the same group; a claim of the key with another digest is refused
//! `ERROR_ALREADY_EXISTS`. Records are kept for the life of the shard (one
//! per server API write; bounded by the callers' key space).

use rim_proto::ids::UserId;
use rim_proto::store::{self, SendResult};

use super::Applier;
use crate::error::{Result, reject};
use crate::keys;

/// Longest key, in bytes (the server API's own bound).
const MAX_KEY: usize = 64;
/// Longest digest, in bytes (a SHA-256).
const MAX_DIGEST: usize = 32;

impl Applier<'_> {
    pub(super) fn claim_idempotency(&mut self, c: &store::ClaimIdempotency) -> Result<SendResult> {
        if c.key.is_empty() || c.request_digest.is_empty() {
            reject!(ErrorBadRequest, "an idempotency claim needs a key and a digest");
        }
        self.check_len("the idempotency key", c.key.len(), MAX_KEY)?;
        self.check_len("the request digest", c.request_digest.len(), MAX_DIGEST)?;
        let k = keys::idempotency(self.shard, UserId(0), keys::SERVER_API_SCOPE, &c.key);
        if let Some(done) = self.txn.get_msg::<SendResult>(&k)? {
            if done.request_digest != c.request_digest {
                reject!(ErrorAlreadyExists, "the idempotency key was used for another request");
            }
            return Ok(done);
        }
        let record = SendResult {
            message_id: c.value,
            send_time_ms: self.now_ms,
            request_digest: c.request_digest.clone(),
            ..Default::default()
        };
        self.txn.put_msg(k, &record);
        Ok(record)
    }
}
