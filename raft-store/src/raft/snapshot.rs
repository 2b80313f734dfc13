//! Snapshot files: a shard's whole `sm` range, streamed to and from disk.
//!
//! A snapshot is never held in memory: the builder iterates a RocksDB
//! point-in-time view into a file, the file is what openraft sends to a
//! follower (`SnapshotData = tokio::fs::File`), and install streams the file
//! back into write batches of bounded size.
//!
//! File format (all integers big-endian):
//!
//! ```text
//! "RIMSNAP1" | u32 meta_len | meta (postcard SnapshotMeta)
//! ( u32 key_len | key (without the shard prefix) | u32 value_len | value )*
//! u32 0xFFFF_FFFF | u32 crc32 of everything before it
//! ```
//!
//! Keys are stored without the shard prefix, so a snapshot of shard 3 can be
//! installed as shard 3 on any node (the prefix is the installer's).
//!
//! A shard's directory has one lock ([`SnapshotDir::lock`]), shared by every
//! clone of its [`SnapshotDir`]. A build holds it from creating its file to
//! its cleanup, an install throughout, and removing files needs it
//! ([`LockedDir::remove_all_but`]), so a cleanup never deletes a file that a
//! build or install of the same shard is still writing.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use crate::error::{Error, Result};

const MAGIC: &[u8; 8] = b"RIMSNAP1";
const END: u32 = u32::MAX;
/// Install writes batches of about this many bytes.
pub(super) const INSTALL_BATCH_BYTES: usize = 4 << 20;

/// Writes a snapshot file, computing the trailing checksum.
pub(super) struct SnapshotWriter {
    out: BufWriter<File>,
    crc: crc32fast::Hasher,
}

impl SnapshotWriter {
    /// Starts a file at `path` with the encoded meta.
    pub(super) fn create(path: &Path, meta: &[u8]) -> Result<SnapshotWriter> {
        let mut w =
            SnapshotWriter { out: BufWriter::new(File::create(path)?), crc: crc32fast::Hasher::new() };
        w.put(MAGIC)?;
        w.put(&len32(meta.len())?.to_be_bytes())?;
        w.put(meta)?;
        Ok(w)
    }

    fn put(&mut self, b: &[u8]) -> Result<()> {
        self.crc.update(b);
        self.out.write_all(b)?;
        Ok(())
    }

    /// Adds one record.
    pub(super) fn record(&mut self, key: &[u8], value: &[u8]) -> Result<()> {
        self.put(&len32(key.len())?.to_be_bytes())?;
        self.put(key)?;
        self.put(&len32(value.len())?.to_be_bytes())?;
        self.put(value)
    }

    /// Writes the end marker and checksum and fsyncs the file.
    pub(super) fn finish(mut self) -> Result<()> {
        self.put(&END.to_be_bytes())?;
        let crc = self.crc.clone().finalize();
        self.out.write_all(&crc.to_be_bytes())?;
        let file = self.out.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        Ok(())
    }
}

fn len32(n: usize) -> Result<u32> {
    u32::try_from(n).ok().filter(|&n| n != END).ok_or_else(|| Error::Corrupt(format!("record of {n} bytes")))
}

/// Reads a snapshot file record by record, verifying the checksum at the end.
pub(super) struct SnapshotReader<R> {
    input: BufReader<R>,
    crc: crc32fast::Hasher,
    /// The encoded meta from the header.
    pub(super) meta: Vec<u8>,
}

impl<R: Read> SnapshotReader<R> {
    /// Reads and checks the header.
    pub(super) fn open(input: R) -> Result<SnapshotReader<R>> {
        let mut r =
            SnapshotReader { input: BufReader::new(input), crc: crc32fast::Hasher::new(), meta: Vec::new() };
        let magic = r.take(8)?;
        if magic != MAGIC {
            return Err(Error::Corrupt("not a rim snapshot file".into()));
        }
        let n = r.u32()?;
        r.meta = r.take(n as usize)?;
        Ok(r)
    }

    fn take(&mut self, n: usize) -> Result<Vec<u8>> {
        let mut b = Vec::new();
        (&mut self.input).take(n as u64).read_to_end(&mut b)?;
        if b.len() != n {
            return Err(Error::Corrupt("snapshot file truncated".into()));
        }
        self.crc.update(&b);
        Ok(b)
    }

    fn u32(&mut self) -> Result<u32> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// The next `(key, value)`, or `None` at the (verified) end.
    pub(super) fn next_record(&mut self) -> Result<Option<(Vec<u8>, Vec<u8>)>> {
        let klen = self.u32()?;
        if klen == END {
            let expected = self.crc.clone().finalize();
            let mut b = [0u8; 4];
            self.input.read_exact(&mut b).map_err(|_| Error::Corrupt("snapshot checksum missing".into()))?;
            if u32::from_be_bytes(b) != expected {
                return Err(Error::Corrupt("snapshot checksum mismatch".into()));
            }
            return Ok(None);
        }
        let key = self.take(klen as usize)?;
        let vlen = self.u32()?;
        let value = self.take(vlen as usize)?;
        Ok(Some((key, value)))
    }
}

/// Where a shard keeps its snapshot files.
///
/// Clones share the directory's lock; a shard must be open in one
/// `StateMachine` at a time for the lock to cover all its writers.
#[derive(Clone, Debug)]
pub(super) struct SnapshotDir {
    dir: PathBuf,
    lock: Arc<Mutex<()>>,
}

impl SnapshotDir {
    /// `<data>/snapshots/<shard>`, created if missing.
    pub(super) fn new(data_dir: &Path, shard: u32) -> Result<SnapshotDir> {
        let dir = data_dir.join("snapshots").join(shard.to_string());
        std::fs::create_dir_all(&dir)?;
        Ok(SnapshotDir { dir, lock: Arc::default() })
    }

    /// Path of a file in the directory.
    pub(super) fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Waits until no other build or install of the shard holds the
    /// directory, and holds it until the returned guard is dropped.
    pub(super) fn lock(&self) -> LockedDir<'_> {
        // The lock guards no data, so a holder's panic leaves nothing broken.
        let guard = self.lock.lock().unwrap_or_else(PoisonError::into_inner);
        LockedDir { dir: self, _guard: guard }
    }
}

/// A [`SnapshotDir`] held exclusively (see [`SnapshotDir::lock`]).
pub(super) struct LockedDir<'a> {
    dir: &'a SnapshotDir,
    _guard: MutexGuard<'a, ()>,
}

impl LockedDir<'_> {
    /// Path of a file in the directory.
    pub(super) fn path(&self, name: &str) -> PathBuf {
        self.dir.path(name)
    }

    /// Makes a renamed or created file's directory entry durable.
    pub(super) fn sync(&self) -> Result<()> {
        File::open(&self.dir.dir)?.sync_all()?;
        Ok(())
    }

    /// Removes every file except `keep` (older snapshots, abandoned temps).
    /// Callers pass the file the snapshot pointer names; holding the lock
    /// means no build or install is writing another one. openraft's receive
    /// files (`recv-*.tmp`) may go too: they are read through an open handle.
    pub(super) fn remove_all_but(&self, keep: &str) -> Result<()> {
        for entry in std::fs::read_dir(&self.dir.dir)? {
            let entry = entry?;
            if entry.file_name().to_str() != Some(keep) {
                // A file still open elsewhere stays readable until closed.
                let _ = std::fs::remove_file(entry.path());
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_round_trips_and_detects_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let mut w = SnapshotWriter::create(&path, b"meta").unwrap();
        w.record(b"k1", b"v1").unwrap();
        w.record(b"k2", b"").unwrap();
        w.finish().unwrap();

        let mut r = SnapshotReader::open(File::open(&path).unwrap()).unwrap();
        assert_eq!(r.meta, b"meta");
        assert_eq!(r.next_record().unwrap(), Some((b"k1".to_vec(), b"v1".to_vec())));
        assert_eq!(r.next_record().unwrap(), Some((b"k2".to_vec(), vec![])));
        assert_eq!(r.next_record().unwrap(), None);

        let mut bytes = std::fs::read(&path).unwrap();
        let i = bytes.len() - 12;
        bytes[i] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        let mut r = SnapshotReader::open(File::open(&path).unwrap()).unwrap();
        let res = (|| {
            while r.next_record()?.is_some() {}
            Ok::<_, Error>(())
        })();
        assert!(matches!(res, Err(Error::Corrupt(_))), "{res:?}");
    }
}
