//! The live side of the history: every worker and the nemesis write their
//! operations through one [`Recorder`], which stamps them with the harness's
//! monotonic clock, appends them to `history.jsonl` (flushed per line, so a
//! crashed harness still leaves a checkable prefix) and keeps the counters
//! behind the progress line.
//!
//! Invariant: an `invoke` is recorded before its request leaves, and its
//! completion after the answer arrived, so the recorded times bracket the
//! operation's real-time extent (what IM-8 and IM-9 rely on).

use std::fs::File;
use std::io;
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use crate::history::{HistoryWriter, Op, OpBody, OpType, Process};

/// Counters of recorded completions, for the progress line.
#[derive(Debug, Default)]
pub struct Counters {
    /// `ok` sends.
    pub sends_ok: AtomicU64,
    /// `fail` sends.
    pub sends_fail: AtomicU64,
    /// `info` sends.
    pub sends_info: AtomicU64,
    /// `ok` sends to groups (also in `sends_ok`).
    pub group_sends_ok: AtomicU64,
    /// Completed syncs (any outcome).
    pub syncs: AtomicU64,
    /// Pushes observed.
    pub pushes: AtomicU64,
    /// Nemesis events.
    pub faults: AtomicU64,
}

/// A point-in-time copy of [`Counters`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct CounterSnapshot {
    /// `ok` sends.
    pub sends_ok: u64,
    /// `fail` sends.
    pub sends_fail: u64,
    /// `info` sends.
    pub sends_info: u64,
    /// `ok` sends to groups (also in `sends_ok`).
    pub group_sends_ok: u64,
    /// Completed syncs.
    pub syncs: u64,
    /// Pushes observed.
    pub pushes: u64,
    /// Nemesis events.
    pub faults: u64,
}

/// Shared, thread-safe history sink.
pub struct Recorder {
    writer: Mutex<HistoryWriter<File>>,
    start: Instant,
    counters: Counters,
    /// The first write error, if any (the run is then reported unknown).
    error: Mutex<Option<String>>,
}

impl std::fmt::Debug for Recorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recorder").field("start", &self.start).finish()
    }
}

impl Recorder {
    /// Creates `path` (truncating it); times count from now.
    pub fn create(path: &Path) -> io::Result<Recorder> {
        Ok(Recorder {
            writer: Mutex::new(HistoryWriter::create(path)?),
            start: Instant::now(),
            counters: Counters::default(),
            error: Mutex::new(None),
        })
    }

    /// Nanoseconds since the recorder was created.
    pub fn now(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// Seconds since the recorder was created.
    pub fn elapsed_secs(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }

    /// Records one operation at the current time; returns it with its index
    /// and time. A write error is remembered (see [`Recorder::error`]) and
    /// the op returned unrecorded: the workload goes on, the verdict will be
    /// "unknown".
    pub fn record(
        &self,
        op_type: OpType,
        process: Process,
        body: OpBody,
        node: Option<&str>,
        error: Option<String>,
    ) -> Op {
        let mut op = Op::new(op_type, process, 0, body);
        op.node = node.map(str::to_string);
        op.error = error;
        self.count(&op);
        let mut w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        // Stamp under the lock so times are non-decreasing in file order.
        op.time = self.now();
        op.index = w.next_index();
        if let Err(e) = w.append_as_is(&op) {
            let mut err = self.error.lock().unwrap_or_else(|p| p.into_inner());
            err.get_or_insert_with(|| format!("writing the history: {e}"));
        }
        op
    }

    fn count(&self, op: &Op) {
        let c = &self.counters;
        let bump = |a: &AtomicU64| {
            a.fetch_add(1, Ordering::Relaxed);
        };
        if op.process.is_nemesis() {
            if op.op_type != OpType::Invoke {
                bump(&c.faults);
            }
            return;
        }
        match (&op.body, op.op_type) {
            (_, OpType::Invoke) => {}
            (OpBody::Send(v), OpType::Ok) => {
                bump(&c.sends_ok);
                if v.kind.is_group() {
                    bump(&c.group_sends_ok);
                }
            }
            (OpBody::Send(_), OpType::Fail) => bump(&c.sends_fail),
            (OpBody::Send(_), OpType::Info) => bump(&c.sends_info),
            (OpBody::Sync(_), _) => bump(&c.syncs),
            (OpBody::Other { f, .. }, _) if f == crate::history::F_PUSH => bump(&c.pushes),
            _ => {}
        }
    }

    /// The counters now.
    pub fn snapshot(&self) -> CounterSnapshot {
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        CounterSnapshot {
            sends_ok: get(&c.sends_ok),
            sends_fail: get(&c.sends_fail),
            sends_info: get(&c.sends_info),
            group_sends_ok: get(&c.group_sends_ok),
            syncs: get(&c.syncs),
            pushes: get(&c.pushes),
            faults: get(&c.faults),
        }
    }

    /// The first error writing the history, if any.
    pub fn error(&self) -> Option<String> {
        self.error.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}
