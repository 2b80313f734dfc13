//! `RaftStateMachine` for one shard: the IM apply logic on the `sm` CF.
//!
//! To ensure correctness:
//!
//! * Each `apply` call writes its operations' effects **and** `last_applied`
//!   (and the membership, if an entry changed it) in one `WriteBatch`: after a
//!   crash either the whole call is visible or none of it, so no operation is
//!   ever applied twice (seq counters are not idempotent).
//! * That batch is not fsynced on its own. It shares the write-ahead log with
//!   the synced log appends, and every later synced write (the next append,
//!   vote or purge of any shard) persists it. If it is lost in a crash, the
//!   log still holds the entries and openraft re-applies them from
//!   `last_applied + 1`. A purge is synced, so the log is never purged past a
//!   durable state.
//! * The limits an entry applies with are the shard's stored ones (its
//!   `Limits` row, in the same `sm` range, written in the same batch as the
//!   operation that set them), never a node's configuration: the cached
//!   copy is replaced only after the batch that changed it is written, and
//!   read again on open and after a snapshot install.
//! * A snapshot reads a RocksDB point-in-time view taken when the builder is
//!   created, so it is consistent with the `last_applied` inside it even while
//!   apply goes on.
//! * Install is crash-safe: the received file is made durable first, an
//!   `Installing` marker names it, the shard's range is replaced, and the
//!   marker is cleared in the final synced batch. Opening a shard whose
//!   marker is set redoes the install from the file.
//! * Builds and installs of a shard are exclusive: a build holds the shard's
//!   snapshot directory lock from creating its temporary file until its
//!   cleanup, an install for its whole duration. So no cleanup deletes a file
//!   the other is writing, and cleanup always keeps the file the snapshot
//!   pointer (`RaftTag::Snapshot`) names.
//! * The pointer only moves forward: a build that finds the pointer at or
//!   past its own `last_log_id` (an install or a later build got there
//!   first) writes nothing and returns the current snapshot. An install
//!   replaces the pointer with the installed snapshot, which openraft only
//!   sends past the applied state, so past any snapshot built from it.

use std::fs::File;
use std::io::{ErrorKind, Seek, SeekFrom};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    EntryPayload, OptionalSend, RaftSnapshotBuilder, SnapshotMeta, StorageIOError, StoredMembership,
};
use rim_proto::ids::ShardId;
use tokio::sync::oneshot;

use super::snapshot::{INSTALL_BATCH_BYTES, LockedDir, SnapshotDir, SnapshotReader, SnapshotWriter};
use super::{Entry, LogId, Response, StorageError, TypeConfig, sm_err};
use crate::db::{self, CF_RAFT, CF_SM, Db};
use crate::error::{Error, Result};
use crate::im::{Applier, ApplyEffects, ApplySabotage, Limits, Txn};
use crate::keys::{self, MetaTag, RaftTag};

type Meta = SnapshotMeta<u64, openraft::BasicNode>;
type Membership = StoredMembership<u64, openraft::BasicNode>;

/// Distinguishes snapshots built in the same process at the same index.
static SNAPSHOT_NONCE: AtomicU64 = AtomicU64::new(0);
/// How often reading the current snapshot retries when the file it names was
/// replaced between reading the pointer and opening the file.
const OPEN_ATTEMPTS: usize = 4;

/// The state machine of one shard.
#[derive(Debug)]
pub struct StateMachine {
    db: Db,
    shard: ShardId,
    /// Cache of the stored limits (the defaults while none are stored).
    limits: Arc<Limits>,
    /// This node's switches (tests only).
    sabotage: ApplySabotage,
    snapshots: SnapshotDir,
    /// Cache of the stored `last_applied`.
    applied: Option<LogId>,
    /// Cache of the stored membership.
    membership: Membership,
    /// Where effects of applied entries are published (push hub, relay).
    events: Option<tokio::sync::broadcast::Sender<Arc<AppliedEvent>>>,
}

/// Effects of one `apply` call, published after they are written.
#[derive(Debug)]
pub struct AppliedEvent {
    /// The shard that applied them.
    pub shard: ShardId,
    /// Log index of the last entry of the call.
    pub index: u64,
    /// What changed.
    pub effects: ApplyEffects,
}

impl StateMachine {
    /// Opens the state machine of `shard`, finishing an interrupted snapshot
    /// install first. `sabotage` is off outside tests.
    pub fn open(db: Db, shard: ShardId, sabotage: ApplySabotage) -> Result<StateMachine> {
        let snapshots = SnapshotDir::new(db.dir(), shard.0)?;
        let mut sm = StateMachine {
            db,
            shard,
            limits: Arc::default(),
            sabotage,
            snapshots,
            applied: None,
            membership: Membership::default(),
            events: None,
        };
        if let Some((meta, name)) = sm.read_raft::<(Meta, String)>(RaftTag::Installing)? {
            tracing::warn!(shard = %shard, file = %name, "finishing an interrupted snapshot install");
            load_snapshot_file(&sm.db, shard, &sm.snapshots.lock(), &meta, &name)?;
        }
        sm.applied = sm.read_meta(MetaTag::Applied)?.flatten();
        sm.membership = sm.read_meta(MetaTag::Membership)?.unwrap_or_default();
        sm.limits = sm.stored_limits()?;
        Ok(sm)
    }

    /// The limits the shard's state holds (the defaults if none).
    fn stored_limits(&self) -> Result<Arc<Limits>> {
        Ok(Arc::new(Limits::of_stored(self.reader().limits()?.as_ref())))
    }

    /// Publishes the effects of every later `apply` call on `events`. A slow
    /// receiver misses events (`RecvError::Lagged`) and must re-read state.
    pub fn with_events(mut self, events: tokio::sync::broadcast::Sender<Arc<AppliedEvent>>) -> StateMachine {
        self.events = Some(events);
        self
    }

    /// The shard this state machine holds.
    pub fn shard(&self) -> ShardId {
        self.shard
    }

    /// Read access to the shard's IM state.
    pub fn reader(&self) -> crate::im::read::Reader {
        crate::im::read::Reader::new(self.db.clone(), self.shard)
    }

    fn read_meta<T: serde::de::DeserializeOwned>(&self, tag: MetaTag) -> Result<Option<T>> {
        let v = self.db.raw().get_pinned_cf(self.db.cf(CF_SM), keys::meta(self.shard, tag))?;
        v.map(|v| db::decode_serde(&v)).transpose()
    }

    fn read_raft<T: serde::de::DeserializeOwned>(&self, tag: RaftTag) -> Result<Option<T>> {
        read_raft(&self.db, self.shard, tag)
    }

    /// Applies entries; see the module doc for the atomicity argument.
    fn apply_entries(&mut self, entries: Vec<Entry>) -> Result<Vec<Response>> {
        let Some(last) = entries.last().map(|e| e.log_id) else { return Ok(Vec::new()) };
        let mut applier =
            Applier::new(Txn::new(self.db.raw()), self.shard, self.limits.clone(), self.sabotage);
        let mut replies = Vec::with_capacity(entries.len());
        let mut membership = None;
        for entry in entries {
            match entry.payload {
                EntryPayload::Blank => replies.push(Response::default()),
                EntryPayload::Normal(req) => {
                    replies.push(Response(applier.apply(entry.log_id.index, &req.0)?))
                }
                EntryPayload::Membership(m) => {
                    membership = Some(Membership::new(Some(entry.log_id), m));
                    replies.push(Response::default());
                }
            }
        }
        let effects = std::mem::take(&mut applier.effects);
        let limits = applier.limits().clone();
        let mut txn = applier.txn;
        txn.put(keys::meta(self.shard, MetaTag::Applied), db::encode_serde(&Some(last))?);
        if let Some(m) = &membership {
            txn.put(keys::meta(self.shard, MetaTag::Membership), db::encode_serde(m)?);
        }
        txn.commit_op();
        if self.db.skips_fsync() {
            self.db.raw().write_opt(txn.into_batch(), &self.db.volatile())?;
        } else {
            self.db.raw().write(txn.into_batch())?;
        }
        self.applied = Some(last);
        self.limits = limits;
        if let Some(m) = membership {
            self.membership = m;
        }
        if effects.events > 0 {
            metrics::counter!("rim_events_produced_total", "group" => self.shard.0.to_string())
                .increment(effects.events as u64);
        }
        let busy = !effects.appended.is_empty()
            || effects.outbox
            || !effects.revoked.is_empty()
            || effects.events > 0;
        if let (Some(tx), true) = (&self.events, busy) {
            // No receiver is fine: nobody is watching this shard.
            let _ = tx.send(Arc::new(AppliedEvent { shard: self.shard, index: last.index, effects }));
        }
        Ok(replies)
    }

    /// The snapshot the pointer names. A build or install may move the
    /// pointer and remove the file it named between the read and the open;
    /// the pointer then names a newer file, so read it again.
    fn current_snapshot(&self) -> Result<Option<(Meta, File)>> {
        let mut attempt = 1;
        loop {
            let Some((meta, name)) = self.read_raft::<(Meta, String)>(RaftTag::Snapshot)? else {
                return Ok(None);
            };
            match File::open(self.snapshots.path(&name)) {
                Err(e) if e.kind() == ErrorKind::NotFound && attempt < OPEN_ATTEMPTS => attempt += 1,
                file => return Ok(Some((meta, file?))),
            }
        }
    }
}

/// A row of the shard's `raft` table.
fn read_raft<T: serde::de::DeserializeOwned>(db: &Db, shard: ShardId, tag: RaftTag) -> Result<Option<T>> {
    let v = db.raw().get_pinned_cf(db.cf(CF_RAFT), keys::raft_key(shard, tag))?;
    v.map(|v| db::decode_serde(&v)).transpose()
}

/// Replaces the shard's `sm` range with the records of a snapshot file and
/// clears the install marker, all ending in one synced batch.
fn load_snapshot_file(db: &Db, shard: ShardId, dir: &LockedDir<'_>, meta: &Meta, name: &str) -> Result<()> {
    let file = File::open(dir.path(name))?;
    let mut reader = SnapshotReader::open(file)?;
    let cf = db.cf(CF_SM);
    let prefix = keys::shard_prefix(shard);
    let mut batch = rocksdb::WriteBatch::default();
    batch.delete_range_cf(cf, prefix, keys::shard_end(shard));
    while let Some((k, v)) = reader.next_record()? {
        let mut key = prefix.to_vec();
        key.extend_from_slice(&k);
        batch.put_cf(cf, key, v);
        if batch.size_in_bytes() >= INSTALL_BATCH_BYTES {
            db.raw().write(std::mem::take(&mut batch))?;
        }
    }
    // The records carry the applied log id and membership rows the meta was
    // read from, so the installed state is byte-identical to the source.
    let raft = db.cf(CF_RAFT);
    batch.delete_cf(raft, keys::raft_key(shard, RaftTag::Installing));
    batch.put_cf(raft, keys::raft_key(shard, RaftTag::Snapshot), db::encode_serde(&(meta, name))?);
    db.raw().write_opt(batch, &db.durable())?;
    dir.remove_all_but(name)?;
    Ok(())
}

/// Copies a received snapshot into the shard's directory durably, checks it,
/// marks the install, then loads it, holding the directory throughout.
fn install_file(db: &Db, shard: ShardId, dir: &SnapshotDir, meta: &Meta, mut received: File) -> Result<()> {
    let dir = dir.lock();
    received.seek(SeekFrom::Start(0))?;
    let name = file_name(meta);
    let tmp = dir.path(&format!("{name}.tmp"));
    {
        let mut out = File::create(&tmp)?;
        std::io::copy(&mut received, &mut out)?;
        out.sync_all()?;
    }
    // Check the whole file before touching the shard's state.
    let mut check = SnapshotReader::open(File::open(&tmp)?)?;
    while check.next_record()?.is_some() {}
    std::fs::rename(&tmp, dir.path(&name))?;
    dir.sync()?;

    let mut batch = rocksdb::WriteBatch::default();
    let marker = db::encode_serde(&(meta, &name))?;
    batch.put_cf(db.cf(CF_RAFT), keys::raft_key(shard, RaftTag::Installing), marker);
    db.raw().write_opt(batch, &db.durable())?;
    load_snapshot_file(db, shard, &dir, meta, &name)
}

fn file_name(meta: &Meta) -> String {
    let index = meta.last_log_id.map(|l| l.index).unwrap_or(0);
    format!("snap-{index:020}-{}.bin", meta.snapshot_id.replace(['/', '\\'], "_"))
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, Membership), StorageError> {
        Ok((self.applied, self.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Response>, StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        let (t0, n) = (std::time::Instant::now(), entries.len());
        let res = self.apply_entries(entries);
        let shard = self.shard.0.to_string();
        metrics::histogram!("rim_apply_seconds", "group" => shard.clone()).record(t0.elapsed().as_secs_f64());
        metrics::counter!("rim_applied_entries_total", "group" => shard).increment(n as u64);
        res.map_err(|e| {
            tracing::error!(shard = %self.shard, error = %e, "apply failed; stopping the group");
            sm_err(e)
        })
    }

    async fn get_snapshot_builder(&mut self) -> SnapshotBuilder {
        SnapshotBuilder::start(self.db.clone(), self.shard, self.snapshots.clone()).await
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<tokio::fs::File>, StorageError> {
        let n = SNAPSHOT_NONCE.fetch_add(1, Ordering::Relaxed);
        let path = self.snapshots.path(&format!("recv-{}-{n}.tmp", std::process::id()));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(|e| StorageIOError::write_snapshot(None, &e))?;
        Ok(Box::new(tokio::fs::File::from_std(file)))
    }

    async fn install_snapshot(
        &mut self,
        meta: &Meta,
        snapshot: Box<tokio::fs::File>,
    ) -> Result<(), StorageError> {
        let file = snapshot.into_std().await;
        let (db, shard, dir, m) = (self.db.clone(), self.shard, self.snapshots.clone(), meta.clone());
        let res = tokio::task::spawn_blocking(move || install_file(&db, shard, &dir, &m, file))
            .await
            .unwrap_or_else(|e| Err(Error::Corrupt(format!("install task failed: {e}"))));
        res.map_err(|e| StorageError::from(StorageIOError::write_snapshot(Some(meta.signature()), &e)))?;
        self.applied = meta.last_log_id;
        self.membership = meta.last_membership.clone();
        self.limits = self.stored_limits().map_err(|e| StorageIOError::read_state_machine(&e))?;
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        let cur = self.current_snapshot().map_err(|e| StorageIOError::read_snapshot(None, &e))?;
        Ok(cur.map(|(meta, file)| Snapshot { meta, snapshot: Box::new(tokio::fs::File::from_std(file)) }))
    }
}

/// Builds a snapshot from a point-in-time view taken when it was created.
///
/// A dedicated thread owns the RocksDB snapshot (it borrows the database, so
/// it cannot be stored in a `'static` builder); creating the builder waits
/// only until the view exists, and `build_snapshot` tells the thread to write.
#[derive(Debug)]
pub struct SnapshotBuilder {
    go: Option<oneshot::Sender<Option<BuildHook>>>,
    done: Option<oneshot::Receiver<Result<(Meta, File)>>>,
    hook: Option<BuildHook>,
}

/// Runs on the build thread between writing the temporary file and renaming
/// it (see [`SnapshotBuilder::before_rename`]).
struct BuildHook(Box<dyn FnOnce() + Send + Sync>);

impl std::fmt::Debug for BuildHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BuildHook")
    }
}

/// A RocksDB point-in-time view.
type View<'a> = rocksdb::SnapshotWithThreadMode<'a, rocksdb::DB>;

impl SnapshotBuilder {
    async fn start(db: Db, shard: ShardId, snapshots: SnapshotDir) -> SnapshotBuilder {
        let (taken_tx, taken_rx) = oneshot::channel();
        let (go_tx, go_rx) = oneshot::channel::<Option<BuildHook>>();
        let (done_tx, done_rx) = oneshot::channel();
        let spawned = std::thread::Builder::new().name(format!("snap-{shard}")).spawn(move || {
            let raw = db.arc();
            let view = raw.snapshot();
            let _ = taken_tx.send(());
            let Ok(hook) = go_rx.blocking_recv() else {
                return; // builder dropped unused
            };
            let _ = done_tx.send(write_snapshot(&db, &view, shard, &snapshots, hook));
        });
        if spawned.is_ok() {
            let _ = taken_rx.await;
        }
        SnapshotBuilder { go: Some(go_tx), done: Some(done_rx), hook: None }
    }

    /// Test hook: `hook` runs on the build thread once the temporary file is
    /// written, before it is renamed and published (if the build writes one).
    #[doc(hidden)]
    pub fn before_rename(&mut self, hook: impl FnOnce() + Send + Sync + 'static) {
        self.hook = Some(BuildHook(Box::new(hook)));
    }
}

/// Makes a snapshot of `view` the shard's current one, unless the pointer is
/// already at or past it, and returns the current snapshot with its file
/// opened while the shard's snapshot directory is held (so no install can
/// remove it first).
fn write_snapshot(
    db: &Db,
    view: &View<'_>,
    shard: ShardId,
    dir: &SnapshotDir,
    hook: Option<BuildHook>,
) -> Result<(Meta, File)> {
    let meta = view_meta(db, view, shard)?;
    let dir = dir.lock();
    let current = read_raft::<(Meta, String)>(db, shard, RaftTag::Snapshot)?;
    if let Some((current, name)) = current
        && current.last_log_id >= meta.last_log_id
    {
        // An install or a later build got there first: never go back.
        return Ok((current, File::open(dir.path(&name))?));
    }
    let name = file_name(&meta);
    write_file(db, view, shard, &dir, &meta, &name, hook)?;
    publish(db, shard, &dir, &meta, &name)?;
    Ok((meta, File::open(dir.path(&name))?))
}

/// The meta of a snapshot of `view`, with a fresh snapshot id.
fn view_meta(db: &Db, view: &View<'_>, shard: ShardId) -> Result<Meta> {
    let cf = db.cf(CF_SM);
    let get = |tag| -> Result<Option<Vec<u8>>> { Ok(view.get_cf(cf, keys::meta(shard, tag))?) };
    let last_log_id: Option<LogId> =
        get(MetaTag::Applied)?.map(|v| db::decode_serde(&v)).transpose()?.flatten();
    let last_membership: Membership =
        get(MetaTag::Membership)?.map(|v| db::decode_serde(&v)).transpose()?.unwrap_or_default();
    let nonce = SNAPSHOT_NONCE.fetch_add(1, Ordering::Relaxed);
    let snapshot_id = match last_log_id {
        Some(l) => format!("{}-{}-{}-{nonce}", l.leader_id.term, l.index, std::process::id()),
        None => format!("0-0-{}-{nonce}", std::process::id()),
    };
    Ok(Meta { last_log_id, last_membership, snapshot_id })
}

/// Writes the shard's records in `view` to `{name}.tmp`, then renames it to
/// `name` durably.
fn write_file(
    db: &Db,
    view: &View<'_>,
    shard: ShardId,
    dir: &LockedDir<'_>,
    meta: &Meta,
    name: &str,
    hook: Option<BuildHook>,
) -> Result<()> {
    let tmp = dir.path(&format!("{name}.tmp"));
    let mut w = SnapshotWriter::create(&tmp, &db::encode_serde(meta)?)?;
    let mut opts = rocksdb::ReadOptions::default();
    opts.set_iterate_upper_bound(keys::shard_end(shard).to_vec());
    let prefix = keys::shard_prefix(shard);
    let iter = view.iterator_cf_opt(
        db.cf(CF_SM),
        opts,
        rocksdb::IteratorMode::From(&prefix, rocksdb::Direction::Forward),
    );
    for item in iter {
        let (k, v) = item?;
        w.record(&k[prefix.len()..], &v)?;
    }
    w.finish()?;
    if let Some(BuildHook(hook)) = hook {
        hook();
    }
    std::fs::rename(&tmp, dir.path(name))?;
    dir.sync()
}

/// Points the shard's snapshot pointer at `name` and removes older files.
fn publish(db: &Db, shard: ShardId, dir: &LockedDir<'_>, meta: &Meta, name: &str) -> Result<()> {
    let mut batch = rocksdb::WriteBatch::default();
    batch.put_cf(db.cf(CF_RAFT), keys::raft_key(shard, RaftTag::Snapshot), db::encode_serde(&(meta, name))?);
    db.raw().write_opt(batch, &db.durable())?;
    dir.remove_all_but(name)
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let fail = |e: Error| -> StorageError { StorageIOError::write_snapshot(None, &e).into() };
        if let Some(go) = self.go.take() {
            let _ = go.send(self.hook.take());
        }
        let done = self.done.take().ok_or_else(|| fail(Error::Corrupt("snapshot builder reused".into())))?;
        let (meta, file) =
            done.await.map_err(|_| fail(Error::Corrupt("snapshot thread died".into())))?.map_err(fail)?;
        Ok(Snapshot { meta, snapshot: Box::new(tokio::fs::File::from_std(file)) })
    }
}

impl StateMachine {
    /// `(last applied "term-index", voter ids)` as text, for operators.
    pub fn applied_summary(&self) -> (String, String) {
        let applied = match self.applied {
            Some(l) => format!("{}-{}", l.leader_id.term, l.index),
            None => "-".into(),
        };
        let voters: Vec<String> = self.membership.membership().voter_ids().map(|v| v.to_string()).collect();
        (applied, format!("[{}]", voters.join(",")))
    }
}
