//! [`Limits`]: what every replica of a cluster refuses identically, how a
//! group comes to apply with them, and the stateless checks of an operation.
//!
//! # Replicated state, not configuration
//!
//! Limits decide apply results (a 70 KiB message is stored or refused, a
//! group switches to read diffusion at its 501st member or not), so two
//! replicas applying one entry with different limits would diverge. They are
//! therefore part of each group's state, a deterministic function of its log:
//!
//! * A group's limits are its `MetaTag::Limits` row (a `rim.v1.ClusterLimits`
//!   with a version), written by a `SetLimits` operation and, in the meta
//!   group, by a cluster map that carries newer limits. Apply stores a value
//!   only if its version is higher than the stored one; an older or equal
//!   version changes nothing, so a duplicated `SetLimits` is harmless.
//! * The applier uses a stored value from the next operation on, even within
//!   the same entry or apply batch.
//! * A group that holds no limits yet applies with [`Limits::default()`], the
//!   same on every replica whatever its configuration. The alternative,
//!   refusing client operations at apply until limits are set, would refuse
//!   on replay the entries an older build had applied and acknowledged. (The
//!   node's leaders hold new client operations back until their group holds
//!   limits, so in practice only those replays and the relay's operations
//!   meet the defaults.)
//! * The row lives in the shard's `sm` range, so snapshots carry it; the
//!   state machine reads it again on open and after installing a snapshot.
//!
//! The canonical value, and how it reaches every group, belong to the node
//! (`rim-node`, `limits.rs`): the cluster map in the meta group holds it, and
//! each group's leader appends `SetLimits` when the map's version is newer.
//! [`ApplySabotage`] holds what a node sets for its own replicas only: a
//! test-only switch, never a limit.
//!
//! # Checks
//!
//! [`Limits::check_op`] is the one place that bounds a client operation by
//! bytes and count (its encoded size, the content, the idempotency key, the
//! mentions) and refuses the content types only the server makes. The node
//! runs it before proposing, with its current view of the cluster's limits,
//! so an oversized or forged request is usually refused without reaching the
//! Raft log; apply runs it again with the group's own limits, and decides.
//!
//! # Invariants
//!
//! * Every stored value passed [`Limits::validate`]: a send with the largest
//!   content, `client_msg_id` and mentions fits `max_op_bytes`, and a sync
//!   page of [`crate::MAX_PAGE_BYTES`] plus one message of `max_op_bytes`
//!   (and [`FRAME_ROOM`] for the message's other fields and the reply around
//!   it) fits a frame (`rim_proto::codec::DEFAULT_MAX_FRAME`), so a message
//!   that passed `check_op` can always be read back.
//! * A group's limits version never decreases.
//! * `RECALL`, `READ_RECEIPT` and `NOTIFICATION` entries are made only by
//!   apply (`Recall`, `MarkRead`, group and friend changes), never sent.

use std::sync::Arc;

use prost::Message as _;
use rim_proto::codec::DEFAULT_MAX_FRAME;
use rim_proto::store::{self, op::Op as O};
use rim_proto::v1::{ClusterLimits, ContentType};

use super::Applier;
use super::read::MAX_PAGE_BYTES;
use crate::error::{Result, reject};
use crate::keys::{self, MetaTag};

/// Room a frame keeps beyond a full sync page and one largest operation: the
/// stored message's fields that its operation lacks (ids, seqs, times) and
/// the reply and packet around the page.
pub const FRAME_ROOM: usize = 16 << 10;
/// Room an operation keeps beyond its content, client_msg_id and mentions
/// (ids, content type, tags and lengths).
const SEND_ROOM: usize = 256;
/// Most bytes one mention takes in an encoded operation (a varint).
const MENTION_BYTES: usize = 10;
/// Most entries one append may trim (bounds one apply).
const MAX_TRIM_PER_OP: u64 = 10_000;
/// Shortest `orphan_claim_ms`: far above any request's deadline, so a
/// registration in progress is never overtaken.
const MIN_ORPHAN_CLAIM_MS: i64 = 10_000;

/// Limits every replica of a group applies identically (module docs: they
/// come from the group's log, never from a node's configuration).
///
/// Its serde form is how a node's configuration states the limits a new
/// cluster starts with (missing fields: the defaults; `small_group_limit`
/// is left out, as nodes configure it on its own).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
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
    /// Lowering it converts a small group at its next membership change;
    /// raising it never turns a super group back.
    #[serde(skip)]
    pub small_group_limit: u32,
    /// Most members a group may have.
    pub max_group_members: u32,
    /// Most user ids in one membership operation.
    pub max_members_per_op: usize,
    /// Retention of rooms created without one (serde:
    /// `{ max_count = .., max_age_ms = .. }`).
    #[serde(with = "retention_serde")]
    pub room_retention: store::Retention,
    /// Most entries one append trims from a list (keeps apply bounded).
    pub max_trim_per_op: u64,
    /// Dedup window, in entries of a list: a send retried after its list grew
    /// by this many entries, or a relayed message re-delivered that late, is
    /// no longer recognised. Keeps the idempotency and delivery-mark tables
    /// bounded (0: keep forever). Each append retires the one position this
    /// far back, so after the window shrinks (or leaves 0) the positions it
    /// skipped keep their records: the tables hold more, never less.
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
    /// Whether apply produces events (webhooks, `GET /events`; `im::events`).
    pub events: bool,
    /// How long an event is kept and retried, in ms (≥ 1). An event older
    /// than this that an endpoint did not take becomes a dead letter, and a
    /// dead letter older than this is removed.
    pub event_retention_ms: i64,
    /// Whether sessions produce `device.online` / `device.offline` events
    /// (`im::presence`; sessions are tracked either way).
    pub presence_events: bool,
    /// How long after a device's connection closed a new sign-in of the
    /// device still continues the same presence (no events), in ms (≥ 0).
    pub offline_grace_ms: i64,
    /// How long a received message may stay unacknowledged by a device
    /// before `push.needed` reports the device behind, in ms (0: never).
    pub push_needed_after_ms: i64,
}

/// Event retention of limits that state none (24 h).
pub const DEFAULT_EVENT_RETENTION_MS: i64 = 24 * 3600 * 1000;
/// Offline grace of limits that state none (10 s).
pub const DEFAULT_OFFLINE_GRACE_MS: i64 = 10_000;
/// `push.needed` delay of limits that state none (30 s).
pub const DEFAULT_PUSH_NEEDED_AFTER_MS: i64 = 30_000;

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
            events: true,
            event_retention_ms: DEFAULT_EVENT_RETENTION_MS,
            presence_events: true,
            offline_grace_ms: DEFAULT_OFFLINE_GRACE_MS,
            push_needed_after_ms: DEFAULT_PUSH_NEEDED_AFTER_MS,
        }
    }
}

/// What a node sets for its own replicas only. Nothing here may differ
/// between the replicas of a correct cluster: only deliberate sabotage, for
/// the consistency harness's self-test.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ApplySabotage {
    /// `Deliver` appends a message even when the recipient's list already
    /// holds its id, so a relay retry duplicates it.
    pub no_relay_dedup: bool,
}

/// [`store::Retention`] (a prost type) in serde form.
mod retention_serde {
    use rim_proto::store::Retention;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    #[derive(Serialize, Deserialize)]
    #[serde(default, deny_unknown_fields)]
    struct Form {
        max_count: u64,
        max_age_ms: i64,
    }

    impl Default for Form {
        fn default() -> Form {
            let r = super::Limits::default().room_retention;
            Form { max_count: r.max_count, max_age_ms: r.max_age_ms }
        }
    }

    pub fn serialize<S: Serializer>(r: &Retention, s: S) -> Result<S::Ok, S::Error> {
        Form { max_count: r.max_count, max_age_ms: r.max_age_ms }.serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Retention, D::Error> {
        let f = Form::deserialize(d)?;
        Ok(Retention { max_count: f.max_count, max_age_ms: f.max_age_ms })
    }
}

/// Whether `op` is one the cluster makes itself (relay deliveries and
/// acknowledgements, the meta group's operations, `SetLimits`), never a
/// client: bounded by its producer, not by [`Limits::check_op`].
pub fn is_cluster_op(op: &store::Op) -> bool {
    matches!(
        op.op,
        Some(
            O::Deliver(_)
                | O::AckOutbox(_)
                | O::SetClusterMap(_)
                | O::AllocateIds(_)
                | O::SetLimits(_)
                | O::AdvanceEventCursor(_)
                | O::DeadLetterEvent(_)
                | O::TrimEvents(_)
                | O::DeviceOnline(_)
                | O::DeviceOffline(_)
                | O::FireDue(_)
                | O::GatewayGone(_)
                | O::RemoveDeadLetter(_)
        )
    )
}

/// A wire count as a size (saturating where `usize` is narrower).
fn size(x: u64) -> usize {
    usize::try_from(x).unwrap_or(usize::MAX)
}

impl Limits {
    /// Refuses (`ERROR_BAD_REQUEST`, naming the first broken rule) limits that
    /// break an invariant of the module docs or would stop apply from
    /// making progress.
    pub fn validate(&self) -> Result<()> {
        let send = self
            .max_content_bytes
            .saturating_add(SEND_ROOM)
            .saturating_add(self.max_client_msg_id)
            .saturating_add(self.max_mentions.saturating_mul(MENTION_BYTES));
        let frame = DEFAULT_MAX_FRAME - MAX_PAGE_BYTES - FRAME_ROOM;
        if self.max_content_bytes == 0 || self.max_client_msg_id == 0 || self.max_name_bytes == 0 {
            reject!(ErrorBadRequest, "max_content_bytes, max_client_msg_id and max_name_bytes must be ≥ 1");
        }
        if self.max_op_bytes < send {
            reject!(
                ErrorBadRequest,
                "max_op_bytes ({}) must hold the largest send: max_content_bytes + {SEND_ROOM} + \
                 max_client_msg_id + {MENTION_BYTES} × max_mentions = {send}",
                self.max_op_bytes
            );
        }
        if self.max_op_bytes > frame {
            reject!(
                ErrorBadRequest,
                "max_op_bytes ({}) must be at most {frame}, so a sync page ({MAX_PAGE_BYTES}) and one more \
                 message fit a frame ({DEFAULT_MAX_FRAME})",
                self.max_op_bytes
            );
        }
        if self.max_group_members == 0 || self.max_members_per_op == 0 {
            reject!(ErrorBadRequest, "max_group_members and max_members_per_op must be ≥ 1");
        }
        if !(1..=MAX_TRIM_PER_OP).contains(&self.max_trim_per_op) {
            reject!(ErrorBadRequest, "max_trim_per_op must be 1..={MAX_TRIM_PER_OP}");
        }
        if self.recall_window_ms < 0 || self.room_retention.max_age_ms < 0 {
            reject!(ErrorBadRequest, "recall_window_ms and room_max_age_ms must be ≥ 0");
        }
        if self.orphan_claim_ms < MIN_ORPHAN_CLAIM_MS {
            reject!(ErrorBadRequest, "orphan_claim_ms must be ≥ {MIN_ORPHAN_CLAIM_MS}");
        }
        if self.event_retention_ms < 1 {
            reject!(ErrorBadRequest, "event_retention_ms must be ≥ 1");
        }
        if self.offline_grace_ms < 0 || self.push_needed_after_ms < 0 {
            reject!(ErrorBadRequest, "offline_grace_ms and push_needed_after_ms must be ≥ 0");
        }
        Ok(())
    }

    /// These limits on the wire, as `version`.
    pub fn to_proto(&self, version: u64) -> ClusterLimits {
        ClusterLimits {
            version,
            max_content_bytes: self.max_content_bytes as u64,
            max_mentions: u32::try_from(self.max_mentions).unwrap_or(u32::MAX),
            max_op_bytes: self.max_op_bytes as u64,
            max_client_msg_id: u32::try_from(self.max_client_msg_id).unwrap_or(u32::MAX),
            max_name_bytes: u32::try_from(self.max_name_bytes).unwrap_or(u32::MAX),
            max_extra_bytes: self.max_extra_bytes as u64,
            small_group_limit: self.small_group_limit,
            max_group_members: self.max_group_members,
            max_members_per_op: u32::try_from(self.max_members_per_op).unwrap_or(u32::MAX),
            room_max_count: self.room_retention.max_count,
            room_max_age_ms: self.room_retention.max_age_ms,
            max_trim_per_op: self.max_trim_per_op,
            dedup_window: self.dedup_window,
            recall_window_ms: self.recall_window_ms,
            orphan_claim_ms: self.orphan_claim_ms,
            events_disabled: !self.events,
            event_retention_ms: self.event_retention_ms,
            presence_events_disabled: !self.presence_events,
            // 0 on the wire reads as the default: an explicit 0 grace is 1 ms.
            offline_grace_ms: self.offline_grace_ms.max(1),
            push_needed_disabled: self.push_needed_after_ms == 0,
            push_needed_after_ms: self.push_needed_after_ms,
        }
    }

    /// The limits `p` carries, checked with [`Limits::validate`].
    pub fn from_proto(p: &ClusterLimits) -> Result<Limits> {
        let limits = Limits::from_stored(p);
        limits.validate()?;
        Ok(limits)
    }

    /// The limits `p` carries, unchecked: a stored row passed
    /// [`Limits::validate`] when apply wrote it.
    fn from_stored(p: &ClusterLimits) -> Limits {
        Limits {
            max_content_bytes: size(p.max_content_bytes),
            max_mentions: p.max_mentions as usize,
            max_op_bytes: size(p.max_op_bytes),
            max_client_msg_id: p.max_client_msg_id as usize,
            max_name_bytes: p.max_name_bytes as usize,
            max_extra_bytes: size(p.max_extra_bytes),
            small_group_limit: p.small_group_limit,
            max_group_members: p.max_group_members,
            max_members_per_op: p.max_members_per_op as usize,
            room_retention: store::Retention { max_count: p.room_max_count, max_age_ms: p.room_max_age_ms },
            max_trim_per_op: p.max_trim_per_op,
            dedup_window: p.dedup_window,
            recall_window_ms: p.recall_window_ms,
            orphan_claim_ms: p.orphan_claim_ms,
            events: !p.events_disabled,
            // Rows written before the field existed hold 0: the default.
            event_retention_ms: match p.event_retention_ms {
                0 => DEFAULT_EVENT_RETENTION_MS,
                ms => ms,
            },
            presence_events: !p.presence_events_disabled,
            offline_grace_ms: match p.offline_grace_ms {
                0 => DEFAULT_OFFLINE_GRACE_MS,
                ms => ms,
            },
            push_needed_after_ms: match (p.push_needed_disabled, p.push_needed_after_ms) {
                (true, _) => 0,
                (false, 0) => DEFAULT_PUSH_NEEDED_AFTER_MS,
                (false, ms) => ms,
            },
        }
    }

    /// The limits a shard whose stored row is `row` applies with: the row's,
    /// or the defaults when it holds none (module docs).
    pub fn of_stored(row: Option<&ClusterLimits>) -> Limits {
        row.map(Limits::from_stored).unwrap_or_default()
    }
}

impl Limits {
    /// Checks what can be checked of `op` without reading state: its encoded
    /// size, and for the operations that carry a message its idempotency
    /// key, content, content type and mentions. Operations the cluster makes
    /// itself ([`is_cluster_op`]) are bounded by their producers and pass.
    pub fn check_op(&self, op: &store::Op) -> Result<()> {
        let Some(inner) = &op.op else { reject!(ErrorBadRequest, "empty operation") };
        if is_cluster_op(op) {
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

impl Applier<'_> {
    /// `SetLimits`: see [`Applier::adopt_limits`].
    pub(super) fn set_limits(&mut self, c: &store::SetLimits) -> Result<()> {
        let Some(limits) = &c.limits else { reject!(ErrorBadRequest, "limits missing") };
        self.adopt_limits(limits)
    }

    /// Stores `new` as this shard's limits and applies with them from the
    /// next operation on, if its version is higher than the stored one;
    /// otherwise changes nothing. Limits that fail [`Limits::validate`] are
    /// refused. Callers make it the last step of their operation: a refusal
    /// after it would roll its write back but not the applier's limits.
    pub(super) fn adopt_limits(&mut self, new: &ClusterLimits) -> Result<()> {
        let key = keys::meta(self.shard, MetaTag::Limits);
        let stored = self.txn.get_msg::<ClusterLimits>(&key)?.map_or(0, |l| l.version);
        if new.version <= stored {
            return Ok(());
        }
        let limits = Limits::from_proto(new)?;
        self.txn.put_msg(key, new);
        self.limits = Arc::new(limits);
        Ok(())
    }
}
