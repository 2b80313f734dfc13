//! Key layout.
//!
//! One RocksDB instance holds every Raft group (shard) a node hosts. Three
//! column families keep the data apart by lifetime:
//!
//! | CF     | key                                 | value                          |
//! |--------|-------------------------------------|--------------------------------|
//! | `log`  | `shard u32 ‖ index u64`             | version ‖ postcard `Entry`     |
//! | `raft` | `shard u32 ‖ tag u8`                | version ‖ postcard (vote, ...) |
//! | `sm`   | `shard u32 ‖ table u8 ‖ fields...`  | version ‖ prost record         |
//!
//! All integers are big-endian, so RocksDB's byte order is numeric order: a
//! range scan over `(shard, USER_MSG, user, ..)` returns that user's list in
//! seq order, and everything of one shard sits under one 4-byte prefix
//! (which is how snapshots and "two shards never see each other" work).
//!
//! The `sm` tables are listed in [`Table`]. The meta rows of the state
//! machine (last applied log id, membership, counters, limits) live in `sm` too, so
//! a snapshot of the shard's `sm` range carries them along.

use rim_proto::ids::{DeviceId, GroupId, MessageId, Seq, ShardId, UserId};

/// Tables inside the `sm` column family (the byte after the shard prefix).
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Table {
    /// State-machine meta: `META ‖ MetaTag`.
    Meta = 0x00,
    /// `user` → UserRecord.
    User = 0x10,
    /// `name bytes` → AccountRecord (unique login names).
    Account = 0x11,
    /// `user ‖ device` → DeviceRecord.
    Device = 0x12,
    /// `user` → ListHead of the user's message list.
    UserHead = 0x13,
    /// `user ‖ seq` → Message.
    UserMsg = 0x14,
    /// `user ‖ message_id` → DeliveredMark (dedup of relayed messages).
    Delivered = 0x15,
    /// `user ‖ scope ‖ client_msg_id` → SendResult (idempotency).
    Idempotency = 0x16,
    /// `user ‖ friend` → FriendRecord.
    Friend = 0x17,
    /// `user ‖ group` → UserGroupRecord.
    UserGroup = 0x18,
    /// `user ‖ conversation kind u8 ‖ conversation` → ReadRecord.
    Read = 0x19,
    /// `user ‖ external id bytes` → the device id (u64, big-endian) the
    /// app's device id maps to (devices signed in with app-signed tokens).
    ExternalDevice = 0x1A,
    /// `index ‖ ordinal u32` → EventRecord (events in log order, `im::events`).
    Event = 0x1B,
    /// `endpoint name bytes` → EventCursor of a webhook endpoint.
    EventCursor = 0x1C,
    /// `dead letter number` → DeadLetterRecord (in dead-letter order).
    DeadLetter = 0x1D,
    /// `due_ms ‖ kind u8 ‖ user ‖ device` → empty: checks waiting for their
    /// time (`im::presence`), in time order.
    Due = 0x1E,
    /// `gateway length u8 ‖ gateway bytes ‖ user ‖ device` → empty: the
    /// online devices whose session is at that gateway instance
    /// (`im::presence`).
    Session = 0x1F,
    /// `group` → GroupRecord.
    Group = 0x20,
    /// `group ‖ user` → MemberRecord.
    Member = 0x21,
    /// `group` → ListHead of the group list.
    GroupHead = 0x22,
    /// `group ‖ group_seq` → Message.
    GroupMsg = 0x23,
    /// `outbox_id` → OutboxRecord.
    Outbox = 0x30,
    /// `push number` → Message stub (`message_id`, `client_msg_id`) of a
    /// persisted business push with a `client_msg_id`: the order in which
    /// their idempotency records leave the dedup window.
    PushLog = 0x31,
    /// Meta group: the cluster map (`rim.v1.ClusterMap`), one row.
    ClusterMap = 0x40,
    /// Meta group: id allocators (`IdAllocators`), one row.
    IdAllocators = 0x41,
}

/// Rows of [`Table::Meta`].
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MetaTag {
    /// Last applied log id (postcard).
    Applied = 1,
    /// Last applied membership (postcard `StoredMembership`).
    Membership = 2,
    /// ShardCounters (prost).
    Counters = 3,
    /// ListHead of [`Table::PushLog`] (`last_seq` = pushes logged so far).
    PushHead = 4,
    /// The limits the shard applies with (`rim.v1.ClusterLimits`, prost;
    /// absent: the defaults). See `im::limits`.
    Limits = 5,
}

/// Rows of the `raft` column family.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RaftTag {
    /// The vote.
    Vote = 1,
    /// The last committed log id.
    Committed = 2,
    /// The last purged log id.
    LastPurged = 3,
    /// Meta of the current snapshot (postcard) and its file name.
    Snapshot = 4,
    /// Set while a snapshot install is in progress (the file to redo it from).
    Installing = 5,
}

/// Builds keys; every key starts with the shard prefix.
#[derive(Debug)]
pub struct Key(Vec<u8>);

impl Key {
    /// A key of `shard` starting with `table`.
    pub fn new(shard: ShardId, table: Table) -> Key {
        let mut v = Vec::with_capacity(32);
        v.extend_from_slice(&shard.0.to_be_bytes());
        v.push(table as u8);
        Key(v)
    }

    /// Appends a big-endian u64.
    pub fn u64(mut self, x: u64) -> Key {
        self.0.extend_from_slice(&x.to_be_bytes());
        self
    }

    /// Appends one byte.
    pub fn u8(mut self, x: u8) -> Key {
        self.0.push(x);
        self
    }

    /// Appends raw bytes (only as the last component: they are not delimited).
    pub fn bytes(mut self, b: &[u8]) -> Key {
        self.0.extend_from_slice(b);
        self
    }

    /// The encoded key.
    pub fn into_vec(self) -> Vec<u8> {
        self.0
    }
}

/// The 4-byte prefix of everything `shard` owns in a column family.
pub fn shard_prefix(shard: ShardId) -> [u8; 4] {
    shard.0.to_be_bytes()
}

/// The exclusive upper bound of `shard`'s key range: the next shard's prefix.
/// Shard ids are u32 and `u32::MAX` is reserved, so this never overflows.
pub fn shard_end(shard: ShardId) -> [u8; 4] {
    (shard.0 + 1).to_be_bytes()
}

/// The smallest key strictly greater than every key starting with `prefix`,
/// or `None` if the prefix is all `0xff`.
pub fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

/// `log` CF key of a log index.
pub fn log_key(shard: ShardId, index: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(12);
    v.extend_from_slice(&shard.0.to_be_bytes());
    v.extend_from_slice(&index.to_be_bytes());
    v
}

/// The log index in a `log` CF key.
pub fn log_index(key: &[u8]) -> Option<u64> {
    key.get(4..12).and_then(|b| b.try_into().ok()).map(u64::from_be_bytes)
}

/// `raft` CF key of a tag.
pub fn raft_key(shard: ShardId, tag: RaftTag) -> Vec<u8> {
    let mut v = shard.0.to_be_bytes().to_vec();
    v.push(tag as u8);
    v
}

// Typed constructors for the `sm` tables, so callers never assemble bytes.

/// Meta row.
pub fn meta(shard: ShardId, tag: MetaTag) -> Vec<u8> {
    Key::new(shard, Table::Meta).u8(tag as u8).into_vec()
}
/// User profile.
pub fn user(shard: ShardId, u: UserId) -> Vec<u8> {
    Key::new(shard, Table::User).u64(u.0).into_vec()
}
/// Unique login name claim.
pub fn account(shard: ShardId, name: &str) -> Vec<u8> {
    Key::new(shard, Table::Account).bytes(name.as_bytes()).into_vec()
}
/// One device of a user.
pub fn device(shard: ShardId, u: UserId, d: DeviceId) -> Vec<u8> {
    Key::new(shard, Table::Device).u64(u.0).u64(d.0).into_vec()
}
/// The device an app's device id maps to.
pub fn external_device(shard: ShardId, u: UserId, external_id: &str) -> Vec<u8> {
    Key::new(shard, Table::ExternalDevice).u64(u.0).bytes(external_id.as_bytes()).into_vec()
}
/// Prefix of all devices of a user.
pub fn devices_of(shard: ShardId, u: UserId) -> Vec<u8> {
    Key::new(shard, Table::Device).u64(u.0).into_vec()
}
/// Head of a user's list.
pub fn user_head(shard: ShardId, u: UserId) -> Vec<u8> {
    Key::new(shard, Table::UserHead).u64(u.0).into_vec()
}
/// One entry of a user's list.
pub fn user_msg(shard: ShardId, u: UserId, seq: Seq) -> Vec<u8> {
    Key::new(shard, Table::UserMsg).u64(u.0).u64(seq.0).into_vec()
}
/// Dedup mark of a relayed message in a user's list.
pub fn delivered(shard: ShardId, u: UserId, m: MessageId) -> Vec<u8> {
    Key::new(shard, Table::Delivered).u64(u.0).u64(m.0).into_vec()
}
/// Idempotency scope of a persisted business push (`PushToUsers`), recorded
/// under sender `UserId(0)`. Group ids are allocated from 1 upwards and never
/// reach the reserved scopes.
pub const PUSH_SCOPE: u64 = u64::MAX;
/// Idempotency scope of the read receipts `MarkRead` sends (recorded under the
/// reader, with the derived id [`receipt_client_msg_id`]), apart from the
/// client's own ids so no client id can suppress a receipt.
pub const RECEIPT_SCOPE: u64 = u64::MAX - 1;
/// Idempotency scope of the server API's keys (`ClaimIdempotency`),
/// recorded under sender `UserId(0)`.
pub const SERVER_API_SCOPE: u64 = u64::MAX - 2;

/// The `client_msg_id` of the read receipt for `message_id`.
pub fn receipt_client_msg_id(message_id: MessageId) -> String {
    format!("read:{message_id}")
}

/// Idempotency record of a send. `scope` is 0 for 1:1, the group id for group
/// sends, or one of the reserved scopes ([`PUSH_SCOPE`], [`RECEIPT_SCOPE`]).
pub fn idempotency(shard: ShardId, sender: UserId, scope: u64, client_msg_id: &str) -> Vec<u8> {
    Key::new(shard, Table::Idempotency).u64(sender.0).u64(scope).bytes(client_msg_id.as_bytes()).into_vec()
}
/// One side of a friendship.
pub fn friend(shard: ShardId, u: UserId, f: UserId) -> Vec<u8> {
    Key::new(shard, Table::Friend).u64(u.0).u64(f.0).into_vec()
}
/// Prefix of all friends of a user.
pub fn friends_of(shard: ShardId, u: UserId) -> Vec<u8> {
    Key::new(shard, Table::Friend).u64(u.0).into_vec()
}
/// A group in a user's list of groups.
pub fn user_group(shard: ShardId, u: UserId, g: GroupId) -> Vec<u8> {
    Key::new(shard, Table::UserGroup).u64(u.0).u64(g.0).into_vec()
}
/// Prefix of a user's groups.
pub fn groups_of(shard: ShardId, u: UserId) -> Vec<u8> {
    Key::new(shard, Table::UserGroup).u64(u.0).into_vec()
}
/// A user's read position in one conversation (`kind` is a
/// `rim.v1.ConversationKind`, 1..=5).
pub fn read(shard: ShardId, u: UserId, kind: u8, conversation: u64) -> Vec<u8> {
    Key::new(shard, Table::Read).u64(u.0).u8(kind).u64(conversation).into_vec()
}
/// Prefix of all read positions of a user.
pub fn reads_of(shard: ShardId, u: UserId) -> Vec<u8> {
    Key::new(shard, Table::Read).u64(u.0).into_vec()
}
/// The `(kind, conversation)` of a [`read`] key.
pub fn read_parts(key: &[u8]) -> Option<(u8, u64)> {
    let kind = *key.len().checked_sub(9).and_then(|i| key.get(i))?;
    Some((kind, last_u64(key)?))
}
/// Group profile.
pub fn group(shard: ShardId, g: GroupId) -> Vec<u8> {
    Key::new(shard, Table::Group).u64(g.0).into_vec()
}
/// One member of a group.
pub fn member(shard: ShardId, g: GroupId, u: UserId) -> Vec<u8> {
    Key::new(shard, Table::Member).u64(g.0).u64(u.0).into_vec()
}
/// Prefix of all members of a group.
pub fn members_of(shard: ShardId, g: GroupId) -> Vec<u8> {
    Key::new(shard, Table::Member).u64(g.0).into_vec()
}
/// Head of a group list.
pub fn group_head(shard: ShardId, g: GroupId) -> Vec<u8> {
    Key::new(shard, Table::GroupHead).u64(g.0).into_vec()
}
/// One entry of a group list.
pub fn group_msg(shard: ShardId, g: GroupId, seq: Seq) -> Vec<u8> {
    Key::new(shard, Table::GroupMsg).u64(g.0).u64(seq.0).into_vec()
}
/// One outbox record.
pub fn outbox(shard: ShardId, id: u64) -> Vec<u8> {
    Key::new(shard, Table::Outbox).u64(id).into_vec()
}
/// Prefix of the whole outbox.
pub fn outbox_all(shard: ShardId) -> Vec<u8> {
    Key::new(shard, Table::Outbox).into_vec()
}
/// The `n`-th logged push.
pub fn push_log(shard: ShardId, n: u64) -> Vec<u8> {
    Key::new(shard, Table::PushLog).u64(n).into_vec()
}

/// The event at log `index`, `ordinal`-th of its entry.
pub fn event(shard: ShardId, index: u64, ordinal: u32) -> Vec<u8> {
    Key::new(shard, Table::Event).u64(index).bytes(&ordinal.to_be_bytes()).into_vec()
}
/// Prefix of every event.
pub fn events_all(shard: ShardId) -> Vec<u8> {
    Key::new(shard, Table::Event).into_vec()
}
/// `(index, ordinal)` of an [`event`] key.
pub fn event_position(key: &[u8]) -> Option<(u64, u32)> {
    let n = key.len().checked_sub(12)?;
    let index = u64::from_be_bytes(key.get(n..n + 8)?.try_into().ok()?);
    let ordinal = u32::from_be_bytes(key.get(n + 8..)?.try_into().ok()?);
    Some((index, ordinal))
}
/// The delivery cursor of a webhook endpoint.
pub fn event_cursor(shard: ShardId, endpoint: &str) -> Vec<u8> {
    Key::new(shard, Table::EventCursor).bytes(endpoint.as_bytes()).into_vec()
}
/// The `n`-th dead letter.
pub fn dead_letter(shard: ShardId, n: u64) -> Vec<u8> {
    Key::new(shard, Table::DeadLetter).u64(n).into_vec()
}
/// Prefix of every dead letter.
pub fn dead_letters_all(shard: ShardId) -> Vec<u8> {
    Key::new(shard, Table::DeadLetter).into_vec()
}
/// A check due at `due_ms` (`im::presence`); `due_ms` is never negative.
pub fn due(shard: ShardId, due_ms: i64, kind: u8, u: UserId, d: DeviceId) -> Vec<u8> {
    Key::new(shard, Table::Due).u64(due_ms.max(0) as u64).u8(kind).u64(u.0).u64(d.0).into_vec()
}
/// Prefix of every due check.
pub fn due_all(shard: ShardId) -> Vec<u8> {
    Key::new(shard, Table::Due).into_vec()
}
/// `(due_ms, kind, user, device)` of a [`due`] key.
pub fn due_parts(key: &[u8]) -> Option<(i64, u8, UserId, DeviceId)> {
    let n = key.len().checked_sub(25)?;
    let due = u64::from_be_bytes(key.get(n..n + 8)?.try_into().ok()?);
    let kind = *key.get(n + 8)?;
    let user = u64::from_be_bytes(key.get(n + 9..n + 17)?.try_into().ok()?);
    let device = u64::from_be_bytes(key.get(n + 17..)?.try_into().ok()?);
    Some((i64::try_from(due).ok()?, kind, UserId(user), DeviceId(device)))
}

/// Longest gateway instance id a session may name (its length is one key byte).
pub const MAX_GATEWAY_LEN: usize = 128;

/// The session of device `d` of `u` at gateway instance `gateway`
/// (`im::presence`); `gateway` is at most [`MAX_GATEWAY_LEN`] bytes.
pub fn session(shard: ShardId, gateway: &str, u: UserId, d: DeviceId) -> Vec<u8> {
    let mut k = sessions_of(shard, gateway);
    k.extend_from_slice(&u.0.to_be_bytes());
    k.extend_from_slice(&d.0.to_be_bytes());
    k
}
/// Prefix of every session at `gateway`.
pub fn sessions_of(shard: ShardId, gateway: &str) -> Vec<u8> {
    let g = &gateway.as_bytes()[..gateway.len().min(MAX_GATEWAY_LEN)];
    Key::new(shard, Table::Session).u8(g.len() as u8).bytes(g).into_vec()
}
/// Prefix of every session.
pub fn sessions_all(shard: ShardId) -> Vec<u8> {
    Key::new(shard, Table::Session).into_vec()
}
/// `(gateway, user, device)` of a [`session`] key.
pub fn session_parts(key: &[u8]) -> Option<(String, UserId, DeviceId)> {
    let rest = key.get(5..)?;
    let (&len, rest) = rest.split_first()?;
    let gateway = std::str::from_utf8(rest.get(..usize::from(len))?).ok()?.to_owned();
    let ids = rest.get(usize::from(len)..)?;
    if ids.len() != 16 {
        return None;
    }
    let user = u64::from_be_bytes(ids[..8].try_into().ok()?);
    let device = u64::from_be_bytes(ids[8..].try_into().ok()?);
    Some((gateway, UserId(user), DeviceId(device)))
}

/// The cluster map row (meta group).
pub fn cluster_map(shard: ShardId) -> Vec<u8> {
    Key::new(shard, Table::ClusterMap).into_vec()
}
/// The id allocators row (meta group).
pub fn id_allocators(shard: ShardId) -> Vec<u8> {
    Key::new(shard, Table::IdAllocators).into_vec()
}

/// The trailing big-endian u64 of a key (seq, member id, ...).
pub fn last_u64(key: &[u8]) -> Option<u64> {
    key.len().checked_sub(8).and_then(|i| key[i..].try_into().ok()).map(u64::from_be_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn user_msg_keys_sort_like_seqs(u in any::<u64>(), a in any::<u64>(), b in any::<u64>()) {
            let ka = user_msg(ShardId(3), UserId(u), Seq(a));
            let kb = user_msg(ShardId(3), UserId(u), Seq(b));
            prop_assert_eq!(ka.cmp(&kb), a.cmp(&b));
            prop_assert_eq!(last_u64(&ka), Some(a));
        }

        #[test]
        fn shards_never_overlap(s in 0u32..u32::MAX - 1, u in any::<u64>(), q in any::<u64>()) {
            let k = user_msg(ShardId(s), UserId(u), Seq(q));
            prop_assert!(k.as_slice() >= &shard_prefix(ShardId(s))[..]);
            prop_assert!(k.as_slice() < &shard_end(ShardId(s))[..]);
        }

        #[test]
        fn log_keys_round_trip(s in any::<u32>(), i in any::<u64>()) {
            prop_assert_eq!(log_index(&log_key(ShardId(s), i)), Some(i));
        }
    }

    #[test]
    fn read_keys_round_trip_and_stay_under_the_users_prefix() {
        let k = read(ShardId(2), UserId(7), 3, u64::MAX - 5);
        assert_eq!(read_parts(&k), Some((3, u64::MAX - 5)));
        assert!(k.starts_with(&reads_of(ShardId(2), UserId(7))));
        assert!(!k.starts_with(&reads_of(ShardId(2), UserId(8))));
        assert_eq!(read_parts(&[1, 2]), None);
    }

    #[test]
    fn event_keys_sort_by_position_and_round_trip() {
        let a = event(ShardId(1), 7, u32::MAX);
        let b = event(ShardId(1), 8, 0);
        assert!(a < b);
        assert_eq!(event_position(&a), Some((7, u32::MAX)));
        assert!(a.starts_with(&events_all(ShardId(1))));
    }

    #[test]
    fn session_keys_round_trip_and_one_gateway_never_prefixes_another() {
        let s = ShardId(3);
        let a = session(s, "gw-1", UserId(7), DeviceId(9));
        let b = session(s, "gw-12", UserId(7), DeviceId(9));
        assert!(a.starts_with(&sessions_of(s, "gw-1")) && a.starts_with(&sessions_all(s)));
        assert!(!b.starts_with(&sessions_of(s, "gw-1")), "the length byte keeps gw-12 out of gw-1");
        assert_eq!(session_parts(&a), Some(("gw-1".to_owned(), UserId(7), DeviceId(9))));
        assert_eq!(session_parts(&b), Some(("gw-12".to_owned(), UserId(7), DeviceId(9))));
        assert_eq!(session_parts(&sessions_of(s, "gw-1")), None);
    }

    #[test]
    fn due_keys_sort_by_time_and_round_trip() {
        let s = ShardId(2);
        let a = due(s, 1_000, 1, UserId(9), DeviceId(0));
        let b = due(s, 999, 2, UserId(u64::MAX), DeviceId(u64::MAX));
        assert!(b < a, "earlier checks sort first");
        assert!(a.starts_with(&due_all(s)));
        assert_eq!(due_parts(&a), Some((1_000, 1, UserId(9), DeviceId(0))));
        assert_eq!(due_parts(&b), Some((999, 2, UserId(u64::MAX), DeviceId(u64::MAX))));
    }

    #[test]
    fn prefix_end_skips_ff() {
        assert_eq!(prefix_end(&[1, 2]), Some(vec![1, 3]));
        assert_eq!(prefix_end(&[1, 0xff]), Some(vec![2]));
        assert_eq!(prefix_end(&[0xff, 0xff]), None);
    }
}
