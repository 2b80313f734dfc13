//! [`Limits`]: what every replica of a cluster refuses identically, and the
//! stateless checks of an operation.
//!
//! [`Limits::check_op`] is the one place that bounds a client operation by
//! bytes and count (its encoded size, the content, the idempotency key, the
//! mentions) and refuses the content types only the server makes. The node
//! runs it before proposing, so an oversized or forged request is refused
//! without reaching the Raft log; apply runs it again, so a replica never
//! accepts what another refused.
//!
//! # Invariants
//!
//! * A message that passed `check_op` encodes to at most `max_op_bytes`
//!   (content ≤ `max_content_bytes`, ≤ `max_mentions` mentions), so a sync
//!   page of [`crate::MAX_PAGE_BYTES`] plus one such message always fits a
//!   frame (`rim_proto::codec::DEFAULT_MAX_FRAME`).
//! * `RECALL`, `READ_RECEIPT` and `NOTIFICATION` entries are made only by
//!   apply (`Recall`, `MarkRead`, group and friend changes), never sent.

use prost::Message as _;
use rim_proto::store::{self, op::Op as O};
use rim_proto::v1::ContentType;

use crate::error::{Result, reject};

/// Limits every replica of a cluster applies identically (fixed at bootstrap).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest message content in bytes.
    pub max_content_bytes: usize,
    /// Most user ids a message may mention.
    pub max_mentions: usize,
    /// Largest encoded client operation (any field, any count): bounds what
    /// one request can make the cluster write, copy and push. At least
    /// `max_content_bytes` plus room for the other fields.
    pub max_op_bytes: usize,
    /// Longest `client_msg_id` in bytes.
    pub max_client_msg_id: usize,
    /// Longest name, nickname, URL or remark in bytes.
    pub max_name_bytes: usize,
    /// Largest `extra` blob in bytes.
    pub max_extra_bytes: usize,
    /// Groups with more members use read diffusion (0: every group does).
    pub small_group_limit: u32,
    /// Most members a group may have.
    pub max_group_members: u32,
    /// Most user ids in one membership operation.
    pub max_members_per_op: usize,
    /// Retention of rooms created without one.
    pub room_retention: store::Retention,
    /// Most entries one append trims from a list (keeps apply bounded).
    pub max_trim_per_op: u64,
    /// Dedup window, in entries of a list: a send retried after its list grew
    /// by this many entries, or a relayed message re-delivered that late, is
    /// no longer recognised. Keeps the idempotency and delivery-mark tables
    /// bounded (0: keep forever).
    pub dedup_window: u64,
    /// How long after sending a sender may recall a message, in ms (0: no
    /// limit). Group owners and admins may recall any message at any time.
    pub recall_window_ms: i64,
    /// How long after its claim an account name whose user was never
    /// created may be claimed again, in ms (a registration interrupted
    /// between claiming the name and creating the user). Far above any
    /// request's deadline, so a registration still in progress is never
    /// overtaken.
    pub orphan_claim_ms: i64,
    /// Sabotage, for the consistency harness's self-test only: `Deliver`
    /// appends a message even when the recipient's list already holds its
    /// id, so a relay retry duplicates it.
    pub no_relay_dedup: bool,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_content_bytes: 64 << 10,
            max_mentions: 100,
            max_op_bytes: 128 << 10,
            max_client_msg_id: 64,
            max_name_bytes: 256,
            max_extra_bytes: 4 << 10,
            small_group_limit: 500,
            max_group_members: 100_000,
            max_members_per_op: 1_000,
            room_retention: store::Retention { max_count: 1_000, max_age_ms: 24 * 3600 * 1000 },
            max_trim_per_op: 64,
            dedup_window: 100_000,
            recall_window_ms: 120_000,
            orphan_claim_ms: 60_000,
            no_relay_dedup: false,
        }
    }
}

impl Limits {
    /// Checks what can be checked of `op` without reading state: its encoded
    /// size, and for the operations that carry a message its idempotency
    /// key, content, content type and mentions. Operations the cluster makes
    /// itself (relay deliveries, the meta group's) are bounded by their
    /// producers and pass.
    pub fn check_op(&self, op: &store::Op) -> Result<()> {
        let Some(inner) = &op.op else { reject!(ErrorBadRequest, "empty operation") };
        if matches!(inner, O::Deliver(_) | O::AckOutbox(_) | O::SetClusterMap(_) | O::AllocateIds(_)) {
            return Ok(());
        }
        let len = op.encoded_len();
        if len > self.max_op_bytes {
            reject!(ErrorContentTooLarge, "the request is {len} bytes, the limit is {}", self.max_op_bytes);
        }
        match inner {
            O::SendToUser(c) => {
                self.check_client_msg_id(&c.client_msg_id)?;
                self.check_content(c.content_type, &c.content)
            }
            O::SendToGroup(c) => {
                self.check_client_msg_id(&c.client_msg_id)?;
                self.check_content(c.content_type, &c.content)?;
                if c.mentions.len() > self.max_mentions {
                    reject!(
                        ErrorBadRequest,
                        "{} mentions, the limit is {}",
                        c.mentions.len(),
                        self.max_mentions
                    );
                }
                Ok(())
            }
            O::Recall(c) => self.check_client_msg_id(&c.client_msg_id),
            // Profile fields: checked before the account name is claimed, so
            // a refused registration never burns the name.
            O::CreateUser(c) => {
                let names = [("username", &c.username), ("nickname", &c.nickname), ("phone", &c.phone)];
                for (what, v) in names.into_iter().chain([("avatar_url", &c.avatar_url)]) {
                    self.check_field(what, v.len(), self.max_name_bytes)?;
                }
                self.check_field("extra", c.extra.len(), self.max_extra_bytes)
            }
            O::UpdateUser(c) => {
                for (what, v) in [("nickname", &c.nickname), ("avatar_url", &c.avatar_url)] {
                    self.check_field(what, v.as_ref().map_or(0, String::len), self.max_name_bytes)?;
                }
                self.check_field("extra", c.extra.as_ref().map_or(0, |e| e.len()), self.max_extra_bytes)
            }
            O::PushToUsers(c) => {
                if !c.client_msg_id.is_empty() {
                    self.check_client_msg_id(&c.client_msg_id)?;
                }
                self.check_content(c.content_type, &c.content)
            }
            _ => Ok(()),
        }
    }

    /// A field of at most `max` bytes.
    fn check_field(&self, what: &str, len: usize, max: usize) -> Result<()> {
        if len > max {
            reject!(ErrorBadRequest, "{what} is {len} bytes, the limit is {max}");
        }
        Ok(())
    }

    /// A send's idempotency key: 1..=`max_client_msg_id` bytes.
    pub(super) fn check_client_msg_id(&self, client_msg_id: &str) -> Result<()> {
        if client_msg_id.is_empty() || client_msg_id.len() > self.max_client_msg_id {
            reject!(
                ErrorBadRequest,
                "client_msg_id must be 1..={} bytes, got {}",
                self.max_client_msg_id,
                client_msg_id.len()
            );
        }
        Ok(())
    }

    /// A message's content: within the size limit, of a known type, and not
    /// of a type only apply makes (their effects change records: a forged
    /// recall would hide a message, a forged notification change a group).
    fn check_content(&self, content_type: i32, content: &[u8]) -> Result<()> {
        if content.len() > self.max_content_bytes {
            reject!(
                ErrorContentTooLarge,
                "content is {} bytes, the limit is {}",
                content.len(),
                self.max_content_bytes
            );
        }
        match ContentType::try_from(content_type) {
            Ok(t @ (ContentType::Notification | ContentType::Recall | ContentType::ReadReceipt)) => {
                reject!(ErrorBadRequest, "clients cannot send {} messages", t.as_str_name())
            }
            Ok(_) => Ok(()),
            // Business-defined types are free above 1000.
            Err(_) if content_type > 1000 => Ok(()),
            Err(_) => reject!(ErrorBadRequest, "unknown content type {content_type}"),
        }
    }
}
