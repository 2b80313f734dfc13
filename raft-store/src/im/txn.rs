//! A write overlay over the `sm` column family for one `apply` call.
//!
//! openraft hands `apply` a batch of committed entries; each may hold many
//! operations, and later operations must see the effects of earlier ones
//! (the second send of a batch must see the first one's seq). So writes go
//! into an in-memory overlay that reads consult before RocksDB, and the whole
//! call commits as one `WriteBatch` together with `last_applied`.
//!
//! Operations are all-or-nothing: an operation writes into its own layer,
//! which is merged into the call's layer only when it succeeds. A rejected
//! operation therefore leaves no trace, whatever it had written before it
//! found the problem.

use std::collections::BTreeMap;

use crate::db::{self, CF_SM};
use crate::error::Result;

type Layer = BTreeMap<Vec<u8>, Option<Vec<u8>>>;

/// Pending writes of one `apply` call.
pub struct Txn<'a> {
    db: &'a rocksdb::DB,
    /// Writes of operations that succeeded.
    committed: Layer,
    /// Writes of the operation in progress.
    op: Layer,
}

impl<'a> Txn<'a> {
    /// An empty overlay over `db`.
    pub fn new(db: &'a rocksdb::DB) -> Txn<'a> {
        Txn { db, committed: Layer::new(), op: Layer::new() }
    }

    /// The current value of `key`, seeing every write made so far.
    pub fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        if let Some(v) = self.op.get(key).or_else(|| self.committed.get(key)) {
            return Ok(v.clone());
        }
        Ok(self.db.get_cf(db::cf(self.db, CF_SM), key)?)
    }

    /// Decodes the current record at `key`.
    pub fn get_msg<M: prost::Message + Default>(&self, key: &[u8]) -> Result<Option<M>> {
        self.get(key)?.map(|v| db::decode(&v)).transpose()
    }

    /// Whether `key` currently exists.
    pub fn exists(&self, key: &[u8]) -> Result<bool> {
        Ok(self.get(key)?.is_some())
    }

    /// Writes `value` at `key` in the current operation.
    pub fn put(&mut self, key: Vec<u8>, value: Vec<u8>) {
        self.op.insert(key, Some(value));
    }

    /// Writes a record at `key` in the current operation.
    pub fn put_msg<M: prost::Message>(&mut self, key: Vec<u8>, m: &M) {
        self.put(key, db::encode(m));
    }

    /// Deletes `key` in the current operation.
    pub fn delete(&mut self, key: Vec<u8>) {
        self.op.insert(key, None);
    }

    /// Every live `(key, value)` under `prefix`, in key order, seeing every
    /// write made so far. Reads the whole range: use it on bounded ranges
    /// (a group's members), never on message lists.
    pub fn scan_prefix(&self, prefix: &[u8]) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let mut merged: BTreeMap<Vec<u8>, Option<Vec<u8>>> = BTreeMap::new();
        let cf = db::cf(self.db, CF_SM);
        for item in self.db.prefix_iterator_cf(cf, prefix) {
            let (k, v) = item?;
            if !k.starts_with(prefix) {
                break;
            }
            merged.insert(k.to_vec(), Some(v.to_vec()));
        }
        for layer in [&self.committed, &self.op] {
            for (k, v) in layer.range(prefix.to_vec()..) {
                if !k.starts_with(prefix) {
                    break;
                }
                merged.insert(k.clone(), v.clone());
            }
        }
        Ok(merged.into_iter().filter_map(|(k, v)| v.map(|v| (k, v))).collect())
    }

    /// The first `limit` live `(key, value)` pairs under `prefix` from
    /// `start` on, in key order, seeing every write made so far. Reads at
    /// most `limit` stored rows beyond the ones this call's writes deleted.
    pub fn scan_from(&self, prefix: &[u8], start: &[u8], limit: usize) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let written = |k: &[u8]| self.op.get(k).or_else(|| self.committed.get(k));
        let mut merged: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
        let cf = db::cf(self.db, CF_SM);
        let iter = self.db.iterator_cf(cf, rocksdb::IteratorMode::From(start, rocksdb::Direction::Forward));
        for item in iter {
            let (k, v) = item?;
            if !k.starts_with(prefix) || merged.len() >= limit {
                break;
            }
            match written(&k) {
                Some(Some(w)) => merged.insert(k.to_vec(), w.clone()),
                Some(None) => None,
                None => merged.insert(k.to_vec(), v.to_vec()),
            };
        }
        // Keys only this call wrote, up to the last stored key kept (or the
        // whole prefix when fewer than `limit` were found).
        let full = merged.len() >= limit;
        let upper = merged.keys().next_back().cloned();
        for layer in [&self.committed, &self.op] {
            for (k, v) in layer.range(start.to_vec()..) {
                if !k.starts_with(prefix) || (full && upper.as_ref().is_some_and(|u| k > u)) {
                    break;
                }
                match v {
                    Some(v) => merged.insert(k.clone(), v.clone()),
                    None => merged.remove(k),
                };
            }
        }
        Ok(merged.into_iter().take(limit).collect())
    }

    /// Keeps the current operation's writes.
    pub fn commit_op(&mut self) {
        let op = std::mem::take(&mut self.op);
        self.committed.extend(op);
    }

    /// Forgets the current operation's writes.
    pub fn abort_op(&mut self) {
        self.op.clear();
    }

    /// The committed writes as one RocksDB batch (the in-progress operation,
    /// if any, is dropped).
    pub fn into_batch(self) -> rocksdb::WriteBatch {
        let cf = db::cf(self.db, CF_SM);
        let mut batch = rocksdb::WriteBatch::default();
        for (k, v) in self.committed {
            match v {
                Some(v) => batch.put_cf(cf, k, v),
                None => batch.delete_cf(cf, k),
            }
        }
        batch
    }
}
