//! `RaftLogStorage` for one shard on the shared RocksDB.
//!
//! To ensure correctness (openraft's storage contract, and the reason this
//! file exists rather than openraft's example store):
//!
//! * `append` writes all entries in one `WriteBatch` with `sync = true` and
//!   reports them flushed only after that write returned: an entry is never
//!   reported durable before it is on disk.
//! * `save_vote`, `truncate` and `purge` are synced too (a lost vote allows
//!   double voting in one term; a lost truncate next to a durable vote is the
//!   "durability skew" that loses acknowledged entries).
//! * `purge` records `last_purged` in the same batch as the deletion.
//! * The log has no holes: entries arrive in order and truncation removes a
//!   suffix.
//!
//! RocksDB's write-group commit merges concurrent synced writes (of all
//! shards of the node) into one fsync, and openraft hands `append` up to
//! `max_payload_entries` entries at a time, so fsyncs are shared.

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{ErrorSubject, ErrorVerb, OptionalSend, RaftLogReader, StorageIOError, Vote};
use rim_proto::ids::ShardId;

use super::{Entry, LogId, StorageError, TypeConfig};
use crate::db::{self, CF_LOG, CF_RAFT, Db};
use crate::keys::{self, RaftTag};

/// The Raft log and hard state of one shard.
#[derive(Clone, Debug)]
pub struct LogStore {
    db: Db,
    shard: ShardId,
}

impl LogStore {
    /// The log of `shard` in `db`.
    pub fn new(db: Db, shard: ShardId) -> LogStore {
        LogStore { db, shard }
    }

    fn read_raft<T: serde::de::DeserializeOwned>(&self, tag: RaftTag) -> Result<Option<T>, StorageError> {
        let v = self
            .db
            .raw()
            .get_pinned_cf(self.db.cf(CF_RAFT), keys::raft_key(self.shard, tag))
            .map_err(read)?;
        v.map(|v| db::decode_serde(&v)).transpose().map_err(read)
    }

    /// Writes a batch on a blocking thread, synced when `durable`; with the
    /// `skip_fsync` sabotage, `volatile` writes bypass the WAL instead.
    async fn write(&self, batch: rocksdb::WriteBatch, durable: bool) -> Result<(), rocksdb::Error> {
        self.write_as(batch, durable, false).await
    }

    async fn write_as(
        &self,
        batch: rocksdb::WriteBatch,
        durable: bool,
        volatile: bool,
    ) -> Result<(), rocksdb::Error> {
        let db = self.db.clone();
        let task = tokio::task::spawn_blocking(move || {
            let opts = if volatile && db.skips_fsync() {
                db.volatile()
            } else if durable {
                db.durable()
            } else {
                rocksdb::WriteOptions::default()
            };
            db.raw().write_opt(batch, &opts)
        });
        // A panic in the write closure is a bug; surface it as one.
        task.await.expect("log write task panicked")
    }

    /// Writes `entries` in one batch and returns once it is durable (fsynced,
    /// unless the database was opened with `sync = false`). This is what
    /// `append` does before it reports the entries flushed. With the
    /// `skip_fsync` sabotage the batch bypasses the WAL: "durable" is a lie.
    pub async fn append_durable(&self, entries: impl IntoIterator<Item = Entry>) -> Result<(), StorageError> {
        let cf = self.db.cf(CF_LOG);
        let mut batch = rocksdb::WriteBatch::default();
        for e in entries {
            let v = db::encode_serde(&e).map_err(|err| StorageIOError::write_log_entry(e.log_id, &err))?;
            batch.put_cf(cf, keys::log_key(self.shard, e.log_id.index), v);
        }
        self.write_as(batch, true, true).await.map_err(write)
    }

    fn last_entry(&self) -> Result<Option<LogId>, StorageError> {
        let cf = self.db.cf(CF_LOG);
        let mut it = self.db.raw().raw_iterator_cf(cf);
        it.seek_for_prev(keys::log_key(self.shard, u64::MAX));
        if !it.valid() {
            it.status().map_err(read)?;
            return Ok(None);
        }
        match (it.key(), it.value()) {
            (Some(k), Some(v)) if k.starts_with(&keys::shard_prefix(self.shard)) => {
                let e: Entry = db::decode_serde(v).map_err(read)?;
                Ok(Some(e.log_id))
            }
            _ => Ok(None),
        }
    }
}

fn read(e: impl std::error::Error + 'static) -> StorageError {
    StorageIOError::read_logs(&e).into()
}

fn write(e: impl std::error::Error + 'static) -> StorageError {
    StorageIOError::write_logs(&e).into()
}

/// `[start, end)` of a range of log indexes.
fn bounds(range: &impl RangeBounds<u64>) -> (u64, Option<u64>) {
    let start = match range.start_bound() {
        Bound::Included(&s) => s,
        Bound::Excluded(&s) => s.saturating_add(1),
        Bound::Unbounded => 0,
    };
    let end = match range.end_bound() {
        Bound::Included(&e) => e.checked_add(1),
        Bound::Excluded(&e) => Some(e),
        Bound::Unbounded => None,
    };
    (start, end)
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let (start, end) = bounds(&range);
        let cf = self.db.cf(CF_LOG);
        let mut opts = rocksdb::ReadOptions::default();
        opts.set_iterate_upper_bound(match end {
            Some(e) => keys::log_key(self.shard, e),
            None => keys::shard_end(self.shard).to_vec(),
        });
        let from = keys::log_key(self.shard, start);
        let iter = self.db.raw().iterator_cf_opt(
            cf,
            opts,
            rocksdb::IteratorMode::From(&from, rocksdb::Direction::Forward),
        );
        let mut out = Vec::new();
        for item in iter {
            let (_, v) = item.map_err(read)?;
            out.push(db::decode_serde(&v).map_err(read)?);
        }
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let last_purged_log_id: Option<LogId> = self.read_raft(RaftTag::LastPurged)?;
        let last_log_id = self.last_entry()?.or(last_purged_log_id);
        Ok(LogState { last_purged_log_id, last_log_id })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<u64>) -> Result<(), StorageError> {
        let mut batch = rocksdb::WriteBatch::default();
        let v = db::encode_serde(vote).map_err(|e| StorageIOError::write_vote(&e))?;
        batch.put_cf(self.db.cf(CF_RAFT), keys::raft_key(self.shard, RaftTag::Vote), v);
        self.write(batch, true).await.map_err(|e| StorageIOError::write_vote(&e).into())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<u64>>, StorageError> {
        self.read_raft(RaftTag::Vote)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        let mut batch = rocksdb::WriteBatch::default();
        let v = db::encode_serde(&committed).map_err(write)?;
        batch.put_cf(self.db.cf(CF_RAFT), keys::raft_key(self.shard, RaftTag::Committed), v);
        // Not synced: losing it only means re-applying from last_applied,
        // which waits for the leader to re-confirm the commit index. (Under
        // `skip_fsync` it must not outlive the entries it points at.)
        self.write_as(batch, false, true).await.map_err(write)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        Ok(self.read_raft::<Option<LogId>>(RaftTag::Committed)?.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        match self.append_durable(entries).await {
            Ok(()) => {
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                callback.log_io_completed(Err(std::io::Error::other(e.to_string())));
                Err(e)
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let mut batch = rocksdb::WriteBatch::default();
        batch.delete_range_cf(
            self.db.cf(CF_LOG),
            keys::log_key(self.shard, log_id.index),
            keys::shard_end(self.shard).to_vec(),
        );
        self.write(batch, true).await.map_err(write)
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let mut batch = rocksdb::WriteBatch::default();
        let v = db::encode_serde(&log_id).map_err(write)?;
        batch.put_cf(self.db.cf(CF_RAFT), keys::raft_key(self.shard, RaftTag::LastPurged), v);
        batch.delete_range_cf(
            self.db.cf(CF_LOG),
            keys::log_key(self.shard, 0),
            keys::log_key(self.shard, log_id.index.saturating_add(1)),
        );
        self.write(batch, true).await.map_err(|e| {
            StorageError::from_io_error(ErrorSubject::Logs, ErrorVerb::Delete, std::io::Error::other(e))
        })
    }
}
