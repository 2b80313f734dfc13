//! openraft's storage conformance suite, run on shards that share one
//! RocksDB with a busy neighbour shard, which must come out untouched.

mod common;

use openraft::StorageError;
use openraft::storage::RaftStateMachine;
use openraft::testing::{StoreBuilder, Suite};
use rim_raft_store::db::{self, CF_LOG, CF_RAFT};
use rim_raft_store::keys::{self, RaftTag};
use rim_raft_store::{ApplySabotage, Db, DbOptions, LogStore, Reader, ShardId, StateMachine, TypeConfig};

/// Raw rows of a column family.
type Rows = Vec<(Box<[u8]>, Box<[u8]>)>;

/// Builds the store of `shard` in a fresh database where `neighbour` already
/// holds log entries, a vote and applied IM state.
struct Builder {
    shard: u32,
    neighbour: u32,
}

/// Keeps the database alive for one suite test and checks the neighbour when
/// the test is done.
struct Guard {
    _dir: tempfile::TempDir,
    db: Db,
    neighbour: ShardId,
    digest: [u8; 32],
    raw: Rows,
}

fn neighbour_rows(db: &Db, shard: ShardId) -> Rows {
    let mut rows = Vec::new();
    for cf in [CF_LOG, CF_RAFT] {
        for item in db.raw().prefix_iterator_cf(db.cf(cf), keys::shard_prefix(shard)) {
            let (k, v) = item.unwrap();
            if k.starts_with(&keys::shard_prefix(shard)) {
                rows.push((k, v));
            }
        }
    }
    rows
}

impl Drop for Guard {
    fn drop(&mut self) {
        assert_eq!(Reader::new(self.db.clone(), self.neighbour).digest().unwrap(), self.digest);
        assert_eq!(neighbour_rows(&self.db, self.neighbour), self.raw, "neighbour log/vote changed");
    }
}

impl StoreBuilder<TypeConfig, LogStore, StateMachine, Guard> for Builder {
    async fn build(&self) -> Result<(Guard, LogStore, StateMachine), StorageError<u64>> {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&DbOptions::new(dir.path())).unwrap();
        let n = ShardId(self.neighbour);

        // Busy neighbour: log entries 1..=30, a vote, a purge record, IM state.
        let mut other = StateMachine::open(db.clone(), n, ApplySabotage::default()).unwrap();
        let mut batch = rocksdb::WriteBatch::default();
        let mut entries = Vec::new();
        for i in 1..=30u64 {
            let e = common::make_entry(i, 1, vec![common::create_user(i)]);
            batch.put_cf(db.cf(CF_LOG), keys::log_key(n, i), db::encode_serde(&e).unwrap());
            entries.push(e);
        }
        let vote = openraft::Vote::new_committed(9, 9);
        batch.put_cf(db.cf(CF_RAFT), keys::raft_key(n, RaftTag::Vote), db::encode_serde(&vote).unwrap());
        db.raw().write(batch).unwrap();
        other.apply(entries).await?;

        let guard = Guard {
            digest: Reader::new(db.clone(), n).digest().unwrap(),
            raw: neighbour_rows(&db, n),
            db: db.clone(),
            neighbour: n,
            _dir: dir,
        };
        let (log, sm) =
            rim_raft_store::open_shard(&db, ShardId(self.shard), ApplySabotage::default()).unwrap();
        Ok((guard, log, sm))
    }
}

#[test]
fn conformance_with_a_neighbour_below() {
    Suite::test_all(Builder { shard: 2, neighbour: 1 }).unwrap();
}

#[test]
fn conformance_with_a_neighbour_above() {
    Suite::test_all(Builder { shard: 1, neighbour: 2 }).unwrap();
}
