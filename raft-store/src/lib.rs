//! rim's storage: Raft logs and the IM state machine on one RocksDB.
//!
//! A logic node hosts the meta group and several data shards, each an
//! openraft group. This crate gives each of them a log store and a state
//! machine, all inside the node's single RocksDB instance (one WAL, one fsync
//! for everything pending), and implements what a committed command does to
//! the IM data model of design section 3. It has no networking.
//!
//! # Layout
//!
//! * [`db`]: opening the shared database; versioned value encodings.
//! * [`keys`]: the key layout (shard prefix, tables, big-endian integers).
//! * [`raft`]: the openraft adapter (type config, log store, state machine,
//!   snapshot files). The only module that names openraft types.
//! * [`im`]: the IM apply logic (users, devices, sends, deliveries, groups,
//!   friends, recalls, read positions, business pushes) and reads of the
//!   resulting state.
//! * [`ids`]: domain identifiers, re-exported from [`rim_proto::ids`].
//!
//! # Guarantees
//!
//! * A log append is reported durable only after RocksDB fsynced it; votes,
//!   truncations and purges are synced as well.
//! * State-machine effects and `last_applied` commit in one write batch: a
//!   crash never applies an entry twice or half.
//! * Two shards in one database never see each other's keys.
//! * Two replicas that apply the same log reach byte-identical state
//!   ([`im::read::Reader::digest`]), whatever their nodes' configuration:
//!   the [`Limits`] apply uses are part of the log (`SetLimits`).
//!
//! # Not (yet) provided
//!
//! * Recognising a retried send, push or relayed message forever: the
//!   idempotency table and the relay dedup marks are bounded by
//!   `Limits::dedup_window` (entries of the list concerned).
//! * Slot migration between shards (moving a user's keys) is not implemented.

pub mod db;
pub mod error;
pub mod ids;
pub mod im;
pub mod keys;
pub mod raft;

pub use db::{Db, DbOptions};
pub use error::{Error, Result};
pub use im::read::{MAX_PAGE_BYTES, MAX_TAIL_BYTES};
pub use im::read::{Page, Reader};
pub use im::{Appended, ApplyEffects, ApplySabotage, Limits, ListRef};
pub use raft::{AppliedEvent, LogStore, Request, Response, StateMachine, TypeConfig};
pub use rim_proto::ids::{DeviceId, GroupId, MessageId, NodeId, Seq, ShardId, UserId};

/// Opens the log store and state machine of `shard` in `db` (`sabotage`:
/// off outside tests).
pub fn open_shard(db: &Db, shard: ShardId, sabotage: ApplySabotage) -> Result<(LogStore, StateMachine)> {
    Ok((LogStore::new(db.clone(), shard), StateMachine::open(db.clone(), shard, sabotage)?))
}
