//! Reads of a shard's IM state, straight from RocksDB.
//!
//! These do not go through Raft: the caller decides the consistency (a
//! linearizable read first confirms leadership with openraft's read index,
//! then reads here once the state machine has applied up to it).

use rim_proto::ids::{DeviceId, GroupId, Seq, ShardId, UserId};
use rim_proto::store::{self, DeviceRecord, GroupRecord, ListHead, MemberRecord, OutboxRecord, UserRecord};
use rim_proto::v1::Message;
use sha2::{Digest, Sha256};

use crate::db::{self, CF_SM, Db};
use crate::error::Result;
use crate::keys;

/// Raw `(key, value)` rows.
type Rows = Vec<(Vec<u8>, Vec<u8>)>;

/// Most bytes of stored messages one sync page carries (users, groups and
/// rooms alike); a page holds at least one message whatever its size. With
/// one more message of at most `Limits::max_op_bytes`, a page always fits a
/// frame of `rim_proto::codec::DEFAULT_MAX_FRAME` (1 MiB) and tonic's
/// default 4 MiB message, over TCP, WebSocket and gRPC.
pub const MAX_PAGE_BYTES: usize = 512 << 10;

/// Most bytes of entries one tail read returns (at least one entry): what
/// the conversation view reads of a list, whatever the entries' sizes, so a
/// list of large messages cannot make one view read (and forward) hundreds
/// of MiB.
pub const MAX_TAIL_BYTES: usize = 4 << 20;

/// A page of a list, read from one consistent snapshot: without
/// `has_more`, the last entry returned is the head's `last_seq` (or the
/// page is empty and `after` ≥ it).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Page {
    /// Entries in seq order.
    pub messages: Vec<Message>,
    /// More entries follow the last one returned.
    pub has_more: bool,
    /// The list's head at the same snapshot as the entries.
    pub head: ListHead,
}

/// Read access to one shard's state.
#[derive(Clone, Debug)]
pub struct Reader {
    db: Db,
    pub(super) shard: ShardId,
}

impl Reader {
    /// Reads `shard` in `db`.
    pub fn new(db: Db, shard: ShardId) -> Reader {
        Reader { db, shard }
    }

    pub(super) fn get<M: prost::Message + Default>(&self, key: &[u8]) -> Result<Option<M>> {
        let cf = self.db.cf(CF_SM);
        self.db.raw().get_pinned_cf(cf, key)?.map(|v| db::decode(&v)).transpose()
    }

    /// `(key, value)` pairs from `start` (inclusive) while they share `prefix`,
    /// at most `limit` (+1 to learn whether more follow).
    pub(super) fn range(&self, prefix: &[u8], start: Vec<u8>, limit: usize) -> Result<(Rows, bool)> {
        let cf = self.db.cf(CF_SM);
        let iter =
            self.db.raw().iterator_cf(cf, rocksdb::IteratorMode::From(&start, rocksdb::Direction::Forward));
        collect_range(iter, prefix, limit, usize::MAX)
    }
}

/// Up to `limit` rows of `iter` while keys share `prefix`, and whether more follow.
/// Rows from `iter` while their keys share `prefix`: at most `limit` rows,
/// and after the first, only while their values total at most `max_bytes`.
/// The flag tells whether more rows follow.
fn collect_range<I>(iter: I, prefix: &[u8], limit: usize, max_bytes: usize) -> Result<(Rows, bool)>
where
    I: Iterator<Item = std::result::Result<(Box<[u8]>, Box<[u8]>), rocksdb::Error>>,
{
    let mut out = Vec::new();
    let mut bytes = 0usize;
    for item in iter {
        let (k, v) = item?;
        if !k.starts_with(prefix) {
            break;
        }
        bytes = bytes.saturating_add(v.len());
        if out.len() == limit || (!out.is_empty() && bytes > max_bytes) {
            return Ok((out, true));
        }
        out.push((k.to_vec(), v.to_vec()));
    }
    Ok((out, false))
}

impl Reader {
    /// A user's profile.
    pub fn user(&self, u: UserId) -> Result<Option<UserRecord>> {
        self.get(&keys::user(self.shard, u))
    }

    /// The user id that claimed a login name.
    pub fn account(&self, name: &str) -> Result<Option<UserId>> {
        Ok(self.get::<store::AccountRecord>(&keys::account(self.shard, name))?.map(|a| UserId(a.user_id)))
    }

    /// One device.
    pub fn device(&self, u: UserId, d: DeviceId) -> Result<Option<DeviceRecord>> {
        self.get(&keys::device(self.shard, u, d))
    }

    /// All devices of a user.
    pub fn devices(&self, u: UserId) -> Result<Vec<DeviceRecord>> {
        let prefix = keys::devices_of(self.shard, u);
        let (rows, _) = self.range(&prefix, prefix.clone(), usize::MAX)?;
        rows.iter().map(|(_, v)| db::decode(v)).collect()
    }

    /// The shard's id and outbox counters (the last assigned message id is
    /// `MessageId::compose(shard, next_message)`).
    pub fn counters(&self) -> Result<store::ShardCounters> {
        Ok(self.get(&keys::meta(self.shard, keys::MetaTag::Counters))?.unwrap_or_default())
    }

    /// Head of a user's list (0 = empty).
    pub fn user_head(&self, u: UserId) -> Result<ListHead> {
        Ok(self.get(&keys::user_head(self.shard, u))?.unwrap_or_default())
    }

    /// Entries of a user's list after `after`, at most `limit`. Nothing
    /// follows [`Seq::MAX`]: after it the page is empty.
    pub fn sync(&self, u: UserId, after: Seq, limit: usize) -> Result<Page> {
        let prefix = keys::Key::new(self.shard, keys::Table::UserMsg).u64(u.0).into_vec();
        let start = after.checked_next().map(|first| keys::user_msg(self.shard, u, first));
        self.page(&prefix, start, limit, &keys::user_head(self.shard, u))
    }

    /// Head of a group list.
    pub fn group_head(&self, g: GroupId) -> Result<ListHead> {
        Ok(self.get(&keys::group_head(self.shard, g))?.unwrap_or_default())
    }

    /// Entries of a group list after `after`, at most `limit`. Entries trimmed
    /// by retention are skipped (the page starts at the oldest retained one).
    /// Nothing follows [`Seq::MAX`]: after it the page is empty.
    pub fn sync_group(&self, g: GroupId, after: Seq, limit: usize) -> Result<Page> {
        let prefix = keys::Key::new(self.shard, keys::Table::GroupMsg).u64(g.0).into_vec();
        let start = after.checked_next().map(|first| keys::group_msg(self.shard, g, first));
        self.page(&prefix, start, limit, &keys::group_head(self.shard, g))
    }

    /// Entries from `start` (`None`: past the last possible seq, so none)
    /// and the head, from one RocksDB snapshot: an append applied between
    /// reading the entries and reading the head would otherwise give a
    /// `last_seq` beyond the entries with `has_more = false`, and a client
    /// trusting it would skip that entry (found by the jepsen harness as an
    /// IM-3 gap).
    fn page(&self, prefix: &[u8], start: Option<Vec<u8>>, limit: usize, head_key: &[u8]) -> Result<Page> {
        let cf = self.db.cf(CF_SM);
        let snap = self.db.raw().snapshot();
        let head = snap.get_pinned_cf(cf, head_key)?.map(|v| db::decode(&v)).transpose()?.unwrap_or_default();
        let Some(start) = start else { return Ok(Page { messages: Vec::new(), has_more: false, head }) };
        let iter = snap.iterator_cf(cf, rocksdb::IteratorMode::From(&start, rocksdb::Direction::Forward));
        let (rows, has_more) = collect_range(iter, prefix, limit, MAX_PAGE_BYTES)?;
        let messages = rows.iter().map(|(_, v)| db::decode(v)).collect::<Result<_>>()?;
        Ok(Page { messages, has_more, head })
    }

    /// A group (dissolved ones included, flagged).
    pub fn group(&self, g: GroupId) -> Result<Option<GroupRecord>> {
        self.get(&keys::group(self.shard, g))
    }

    /// One member record.
    pub fn member(&self, g: GroupId, u: UserId) -> Result<Option<MemberRecord>> {
        self.get(&keys::member(self.shard, g, u))
    }

    /// Members with user id greater than `after`, at most `limit`.
    pub fn members(&self, g: GroupId, after: UserId, limit: usize) -> Result<(Vec<MemberRecord>, bool)> {
        let prefix = keys::members_of(self.shard, g);
        let Some(first) = after.0.checked_add(1) else { return Ok((Vec::new(), false)) };
        let start = keys::member(self.shard, g, UserId(first));
        let (rows, more) = self.range(&prefix, start, limit)?;
        Ok((rows.iter().map(|(_, v)| db::decode(v)).collect::<Result<_>>()?, more))
    }

    /// The groups a user belongs to.
    pub fn user_groups(&self, u: UserId) -> Result<Vec<store::UserGroupRecord>> {
        let prefix = keys::groups_of(self.shard, u);
        let (rows, _) = self.range(&prefix, prefix.clone(), usize::MAX)?;
        rows.iter().map(|(_, v)| db::decode(v)).collect()
    }

    /// A user's friends.
    pub fn friends(&self, u: UserId) -> Result<Vec<store::FriendRecord>> {
        let prefix = keys::friends_of(self.shard, u);
        let (rows, _) = self.range(&prefix, prefix.clone(), usize::MAX)?;
        rows.iter().map(|(_, v)| db::decode(v)).collect()
    }

    /// One entry of a user's list (`None`: no such seq).
    pub fn user_message(&self, u: UserId, seq: Seq) -> Result<Option<Message>> {
        self.get(&keys::user_msg(self.shard, u, seq))
    }

    /// One entry of a group list (`None`: no such seq, or trimmed).
    pub fn group_message(&self, g: GroupId, seq: Seq) -> Result<Option<Message>> {
        self.get(&keys::group_msg(self.shard, g, seq))
    }

    /// The newest `n` entries of a user's list, newest first.
    pub fn tail(&self, u: UserId, n: usize) -> Result<Vec<Message>> {
        let prefix = keys::Key::new(self.shard, keys::Table::UserMsg).u64(u.0).into_vec();
        self.newest(&prefix, keys::user_msg(self.shard, u, Seq(u64::MAX)), n)
    }

    /// The newest `n` entries of a group list, newest first.
    pub fn group_tail(&self, g: GroupId, n: usize) -> Result<Vec<Message>> {
        let prefix = keys::Key::new(self.shard, keys::Table::GroupMsg).u64(g.0).into_vec();
        self.newest(&prefix, keys::group_msg(self.shard, g, Seq(u64::MAX)), n)
    }

    /// Up to `n` records under `prefix`, from `last` (inclusive) backwards.
    fn newest(&self, prefix: &[u8], last: Vec<u8>, n: usize) -> Result<Vec<Message>> {
        let cf = self.db.cf(CF_SM);
        let iter =
            self.db.raw().iterator_cf(cf, rocksdb::IteratorMode::From(&last, rocksdb::Direction::Reverse));
        let (rows, _) = collect_range(iter, prefix, n, MAX_TAIL_BYTES)?;
        rows.iter().map(|(_, v)| db::decode(v)).collect()
    }

    /// A user's read position in one conversation (0: nothing read).
    /// `kind` is a `rim.v1.ConversationKind`.
    pub fn read_position(&self, u: UserId, kind: i32, conversation: u64) -> Result<u64> {
        let Ok(kind) = u8::try_from(kind) else { return Ok(0) };
        let rec: Option<store::ReadRecord> = self.get(&keys::read(self.shard, u, kind, conversation))?;
        Ok(rec.map_or(0, |r| r.read_seq))
    }

    /// Every read position of a user: `(conversation kind, conversation id,
    /// record)`, ordered by kind then conversation.
    pub fn read_positions(&self, u: UserId) -> Result<Vec<(i32, u64, store::ReadRecord)>> {
        let prefix = keys::reads_of(self.shard, u);
        let (rows, _) = self.range(&prefix, prefix.clone(), usize::MAX)?;
        rows.iter()
            .map(|(k, v)| {
                let (kind, conversation) = keys::read_parts(k)
                    .ok_or_else(|| crate::Error::Corrupt("short read-position key".into()))?;
                Ok((i32::from(kind), conversation, db::decode(v)?))
            })
            .collect()
    }

    /// The cluster map stored in this (meta) shard.
    pub fn cluster_map(&self) -> Result<Option<rim_proto::v1::ClusterMap>> {
        self.get(&keys::cluster_map(self.shard))
    }

    /// The limits stored in this shard (`None`: none yet, it applies with
    /// the defaults).
    pub fn limits(&self) -> Result<Option<rim_proto::v1::ClusterLimits>> {
        self.get(&keys::meta(self.shard, keys::MetaTag::Limits))
    }

    /// Outbox records with id greater than `after`, oldest first.
    pub fn outbox(&self, after: u64, limit: usize) -> Result<Vec<OutboxRecord>> {
        let prefix = keys::outbox_all(self.shard);
        let Some(first) = after.checked_add(1) else { return Ok(Vec::new()) };
        let start = keys::outbox(self.shard, first);
        let (rows, _) = self.range(&prefix, start, limit)?;
        rows.iter().map(|(_, v)| db::decode(v)).collect()
    }

    /// SHA-256 over every `sm` key and value of the shard, in key order: two
    /// replicas that applied the same log have the same digest.
    pub fn digest(&self) -> Result<[u8; 32]> {
        self.digest_filtered(|_| true)
    }

    /// Like [`Reader::digest`] but without the `last_applied` row, which every
    /// entry moves: equal before and after an entry that changed no data.
    pub fn data_digest(&self) -> Result<[u8; 32]> {
        let applied = keys::meta(self.shard, keys::MetaTag::Applied);
        self.digest_filtered(|k| k != applied.as_slice())
    }

    fn digest_filtered(&self, keep: impl Fn(&[u8]) -> bool) -> Result<[u8; 32]> {
        let cf = self.db.cf(CF_SM);
        let mut opts = rocksdb::ReadOptions::default();
        opts.set_iterate_upper_bound(keys::shard_end(self.shard).to_vec());
        let prefix = keys::shard_prefix(self.shard);
        let mode = rocksdb::IteratorMode::From(&prefix, rocksdb::Direction::Forward);
        let mut h = Sha256::new();
        for item in self.db.raw().iterator_cf_opt(cf, opts, mode) {
            let (k, v) = item?;
            if !keep(&k) {
                continue;
            }
            h.update((k.len() as u64).to_be_bytes());
            h.update(&k);
            h.update((v.len() as u64).to_be_bytes());
            h.update(&v);
        }
        Ok(h.finalize().into())
    }
}
