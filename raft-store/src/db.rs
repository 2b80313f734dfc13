//! The node's one RocksDB instance, shared by every Raft group it hosts.
//!
//! Sharing one instance means sharing one write-ahead log: an fsync issued
//! for any group persists every earlier write of every group, and RocksDB's
//! write-group commit merges concurrent synced writes of different groups into
//! one fsync. This is what makes "acknowledged means fsynced on a quorum"
//! affordable with many shards per node.
//!
//! Values are versioned: one format byte ([`FORMAT_V1`]) followed by the
//! encoding (prost for our records, postcard for openraft's types). A reader
//! refuses a format byte it does not know instead of misreading it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rocksdb::{BlockBasedOptions, Cache, ColumnFamilyDescriptor, DBCompressionType, Options, WriteOptions};

use crate::error::{Error, Result};
use crate::ids::ShardId;

/// Column family of Raft logs.
pub const CF_LOG: &str = "log";
/// Column family of Raft hard state (vote, committed, purged, snapshot meta).
pub const CF_RAFT: &str = "raft";
/// Column family of state machines.
pub const CF_SM: &str = "sm";

/// Current value format byte.
pub const FORMAT_V1: u8 = 1;

/// Options of [`Db::open`].
#[derive(Clone, Debug)]
pub struct DbOptions {
    /// Directory of the node's data (RocksDB in `db/`, snapshots in `snapshots/`).
    pub dir: PathBuf,
    /// Shared block cache size in bytes.
    pub block_cache_bytes: usize,
    /// Fsync log appends, votes, truncations and purges (the default, and the
    /// only setting under which acks are durable). `false` exists for
    /// benchmarks and for the jepsen self-test of a deliberately broken build.
    pub sync: bool,
    /// Sabotage, for the consistency harness's self-test only: log appends,
    /// the committed marker and state-machine writes bypass the write-ahead
    /// log (no fsync; a process crash loses them as a power cut would lose
    /// unsynced writes). A clean shutdown still flushes them.
    pub skip_fsync: bool,
}

impl DbOptions {
    /// Defaults for a data directory.
    pub fn new(dir: impl Into<PathBuf>) -> DbOptions {
        DbOptions { dir: dir.into(), block_cache_bytes: 64 << 20, sync: true, skip_fsync: false }
    }
}

/// A handle to the node's RocksDB instance. Cheap to clone.
#[derive(Clone)]
pub struct Db {
    inner: Arc<rocksdb::DB>,
    dir: PathBuf,
    sync: bool,
    skip_fsync: bool,
}

impl std::fmt::Debug for Db {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Db")
            .field("dir", &self.dir)
            .field("sync", &self.sync)
            .field("skip_fsync", &self.skip_fsync)
            .finish()
    }
}

impl Db {
    /// Opens (or creates) the database under `opts.dir/db`.
    pub fn open(opts: &DbOptions) -> Result<Db> {
        std::fs::create_dir_all(opts.dir.join("snapshots"))?;
        let cache = Cache::new_lru_cache(opts.block_cache_bytes);

        let mut db_opts = Options::default();
        db_opts.create_if_missing(true);
        db_opts.create_missing_column_families(true);
        db_opts.increase_parallelism(2);
        db_opts.set_max_background_jobs(2);
        db_opts.set_max_total_wal_size(256 << 20);
        db_opts.set_bytes_per_sync(1 << 20);

        let mut log_opts = Options::default();
        log_opts.set_compression_type(DBCompressionType::None);

        let mut sm_opts = Options::default();
        let mut table = BlockBasedOptions::default();
        table.set_block_cache(&cache);
        table.set_bloom_filter(10.0, false);
        sm_opts.set_block_based_table_factory(&table);
        sm_opts.set_compression_type(DBCompressionType::Lz4);
        sm_opts.set_bottommost_compression_type(DBCompressionType::Zstd);

        let cfs = vec![
            ColumnFamilyDescriptor::new(CF_LOG, log_opts),
            ColumnFamilyDescriptor::new(CF_RAFT, Options::default()),
            ColumnFamilyDescriptor::new(CF_SM, sm_opts),
        ];
        let db = rocksdb::DB::open_cf_descriptors(&db_opts, opts.dir.join("db"), cfs)?;
        Ok(Db { inner: Arc::new(db), dir: opts.dir.clone(), sync: opts.sync, skip_fsync: opts.skip_fsync })
    }

    /// The raw RocksDB handle.
    pub fn raw(&self) -> &rocksdb::DB {
        &self.inner
    }

    /// A shared reference to the raw handle (for threads that outlive a borrow).
    pub(crate) fn arc(&self) -> Arc<rocksdb::DB> {
        self.inner.clone()
    }

    /// How many handles share the database (it closes when the last drops).
    pub fn handles(&self) -> usize {
        Arc::strong_count(&self.inner)
    }

    /// The node's data directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Handle of a column family created at open.
    pub fn cf(&self, name: &str) -> &rocksdb::ColumnFamily {
        cf(&self.inner, name)
    }

    /// Write options for writes that must be durable before they are reported
    /// (log append, vote, truncate, purge, snapshot install).
    pub fn durable(&self) -> WriteOptions {
        let mut w = WriteOptions::default();
        w.set_sync(self.sync);
        w
    }

    /// Shards that have Raft state (a vote or log) in this database: the
    /// groups this node hosted before a restart.
    pub fn shards_with_state(&self) -> Result<Vec<ShardId>> {
        let cf = self.cf(CF_RAFT);
        let mut out = Vec::new();
        let mut it = self.inner.raw_iterator_cf(cf);
        it.seek_to_first();
        while let Some(k) = it.key() {
            let Some(shard) = k.get(..4).and_then(|b| b.try_into().ok()).map(u32::from_be_bytes) else {
                break;
            };
            out.push(ShardId(shard));
            match shard.checked_add(1) {
                Some(next) => it.seek(next.to_be_bytes()),
                None => break,
            }
        }
        it.status()?;
        Ok(out)
    }

    /// Whether durable writes are fsynced.
    pub fn syncs(&self) -> bool {
        self.sync
    }

    /// Whether the `skip_fsync` sabotage is on (see [`DbOptions::skip_fsync`]).
    pub fn skips_fsync(&self) -> bool {
        self.skip_fsync
    }

    /// Write options of the `skip_fsync` sabotage: no WAL, no sync.
    pub fn volatile(&self) -> WriteOptions {
        let mut w = WriteOptions::default();
        w.disable_wal(true);
        w.set_sync(false);
        w
    }
}

/// Handle of a column family that [`Db::open`] always creates.
pub(crate) fn cf<'a>(db: &'a rocksdb::DB, name: &str) -> &'a rocksdb::ColumnFamily {
    // Invariant: `Db::open` creates every CF this crate names; a missing one is
    // a programming error, not a runtime condition.
    db.cf_handle(name).unwrap_or_else(|| panic!("column family {name} missing"))
}

/// Encodes a prost record as a versioned value.
pub fn encode<M: prost::Message>(m: &M) -> Vec<u8> {
    let mut v = Vec::with_capacity(1 + m.encoded_len());
    v.push(FORMAT_V1);
    // Encoding into a Vec cannot fail: it grows as needed.
    m.encode(&mut v).expect("Vec grows");
    v
}

/// Decodes a versioned prost value.
pub fn decode<M: prost::Message + Default>(v: &[u8]) -> Result<M> {
    match v.split_first() {
        Some((&FORMAT_V1, body)) => Ok(M::decode(body)?),
        Some((b, _)) => Err(Error::Corrupt(format!("unknown value format {b}"))),
        None => Err(Error::Corrupt("empty value".into())),
    }
}

/// Encodes a serde value (openraft types) as a versioned postcard value.
pub fn encode_serde<T: serde::Serialize>(t: &T) -> Result<Vec<u8>> {
    let mut v = vec![FORMAT_V1];
    postcard::to_io(t, &mut v)?;
    Ok(v)
}

/// Decodes a versioned postcard value.
pub fn decode_serde<T: serde::de::DeserializeOwned>(v: &[u8]) -> Result<T> {
    match v.split_first() {
        Some((&FORMAT_V1, body)) => Ok(postcard::from_bytes(body)?),
        Some((b, _)) => Err(Error::Corrupt(format!("unknown value format {b}"))),
        None => Err(Error::Corrupt("empty value".into())),
    }
}
