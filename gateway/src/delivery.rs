//! In-order, gap-free delivery of one list (the user's own list, or a
//! subscribed room's list) to one connection.
//!
//! The push stream from the shard leader carries every entry appended to the
//! user's list, each with its seq. Seqs are gap-free (design section 3), so a
//! push whose seq is not `last + 1` means something was lost (a stream
//! break, a leader change, a dropped event), and so does an explicit
//! resync request from the push router. Either way the connection syncs its
//! list from the last seq it delivered and holds back newer pushes until the
//! sync has caught up; this is how gim issue #46 (a push racing a sync) is
//! solved.
//!
//! [`UserList`] is the pure bookkeeping: it knows nothing of packets, calls
//! or sockets. The session feeds it pushes and sync outcomes and turns its
//! decisions into `MESSAGE` packets and `Sync` calls (`SyncGroup` calls for
//! a room, whose entries carry the room seq; [`UserList::restart_at`] skips
//! what the room's retention trimmed).
//!
//! # Invariants
//!
//! * Entries handed out by [`UserList`] (through the `out` vectors) have
//!   seqs `start + 1, start + 2, ...` in that order, each exactly once,
//!   where `start` is the seq the list was created with. `last()` is always
//!   the seq of the last entry handed out (or `start`).
//! * Seqs are [`Seq`]s, advanced only with [`Seq::checked_next`]: after
//!   [`Seq::MAX`] nothing follows, so nothing more is handed out (and
//!   nothing wraps to the start of the list).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rim_proto::ids::Seq;
use rim_proto::v1::{Message, SyncOutput};

use crate::call::CallId;

/// One entry of the list that the client must get (or, with `send` false,
/// already has).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Entry {
    /// Its seq in the list.
    pub(crate) seq: Seq,
    /// The entry.
    pub(crate) message: Message,
    /// `false` when the push said to skip this connection's device (the
    /// sending device got the entry in its SEND reply): it counts as
    /// delivered but is not sent.
    pub(crate) send: bool,
}

/// Where the list's gap repair stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SyncState {
    /// No sync needed: pushes continuing `last` are delivered at once.
    Idle,
    /// A sync from `last` is in flight. `again`: when it returns, sync once
    /// more, because something may have been lost after it was served (a
    /// stream break, or pushes dropped from a full buffer).
    InFlight { id: CallId, again: bool },
    /// The last sync failed or made no progress: sync again at `at`.
    Waiting { at: Instant },
}

/// Delivery state of the signed-in user's list on one connection.
#[derive(Debug)]
pub(crate) struct UserList {
    /// Highest seq delivered to the client (or known to it at sign-in).
    last: Seq,
    sync: SyncState,
    /// Pushes held back while a sync is pending, by seq (so duplicates
    /// collapse and the order is the seq order). Every key is > `last`
    /// whenever control is outside this module.
    buffer: BTreeMap<Seq, Entry>,
    /// Most pushes held back; beyond it the buffer is dropped and the
    /// session relies on syncing.
    buffer_limit: usize,
    /// Consecutive failed (or progress-less) syncs.
    failures: u32,
}

impl UserList {
    /// A list whose entries up to `last` the client already has (or gets by
    /// its own sync).
    pub(crate) fn new(last: Seq, buffer_limit: usize) -> UserList {
        UserList { last, sync: SyncState::Idle, buffer: BTreeMap::new(), buffer_limit, failures: 0 }
    }

    /// Highest seq delivered.
    pub(crate) fn last(&self) -> Seq {
        self.last
    }

    /// Continues after `seq` from now on, forwards or backwards: entries up
    /// to `seq` count as delivered (a room's retention trimmed them, or the
    /// client asked to start there), and held-back entries at or below it
    /// are dropped. The sync state is kept.
    pub(crate) fn restart_at(&mut self, seq: Seq) {
        self.last = seq;
        self.drop_delivered();
    }

    /// Pushes currently held back.
    pub(crate) fn buffered(&self) -> usize {
        self.buffer.len()
    }

    /// Whether a sync is in flight or waiting to be retried.
    pub(crate) fn is_syncing(&self) -> bool {
        self.sync != SyncState::Idle
    }

    /// Whether `id` is the gap-repair sync in flight.
    pub(crate) fn is_sync_call(&self, id: CallId) -> bool {
        matches!(self.sync, SyncState::InFlight { id: current, .. } if current == id)
    }

    /// When a waiting retry is due.
    pub(crate) fn deadline(&self) -> Option<Instant> {
        match self.sync {
            SyncState::Waiting { at } => Some(at),
            _ => None,
        }
    }

    /// A pushed entry. Entries to send now are appended to `out`. Returns
    /// `true` if a sync from [`last`](Self::last) must start now (the caller
    /// then calls [`sync_started`](Self::sync_started)).
    pub(crate) fn push(&mut self, entry: Entry, out: &mut Vec<Entry>) -> bool {
        if entry.seq <= self.last {
            return false; // duplicate, or covered by the client's own sync
        }
        match self.sync {
            SyncState::Idle if Some(entry.seq) == self.last.checked_next() => {
                self.last = entry.seq;
                out.push(entry);
                false
            }
            SyncState::Idle => {
                // A gap: hold this one back and repair from `last`.
                self.buffer.insert(entry.seq, entry);
                true
            }
            SyncState::InFlight { .. } | SyncState::Waiting { .. } => {
                self.hold(entry);
                false
            }
        }
    }

    /// Buffers a push while syncing; on overflow drops the whole buffer and
    /// makes sure another sync runs after the current one.
    fn hold(&mut self, entry: Entry) {
        if self.buffer.len() >= self.buffer_limit && !self.buffer.contains_key(&entry.seq) {
            self.buffer.clear();
            if let SyncState::InFlight { id, .. } = self.sync {
                self.sync = SyncState::InFlight { id, again: true };
            }
            return;
        }
        self.buffer.insert(entry.seq, entry);
    }

    /// Something may have been lost (push stream broke). Returns `true` if a
    /// sync must start now; if one is already pending, it is repeated once
    /// it completes.
    pub(crate) fn resync(&mut self) -> bool {
        match self.sync {
            SyncState::Idle => true,
            SyncState::InFlight { id, .. } => {
                self.sync = SyncState::InFlight { id, again: true };
                false
            }
            SyncState::Waiting { .. } => false,
        }
    }

    /// The caller issued sync call `id` from [`last`](Self::last).
    pub(crate) fn sync_started(&mut self, id: CallId) {
        self.sync = SyncState::InFlight { id, again: false };
    }

    /// The sync in flight returned `output`. Entries to send now are
    /// appended to `out`. Returns `true` if another sync must start now.
    pub(crate) fn sync_ok(
        &mut self,
        now: Instant,
        retry_delay: Duration,
        mut output: SyncOutput,
        out: &mut Vec<Entry>,
    ) -> bool {
        let SyncState::InFlight { again, .. } = self.sync else {
            return false;
        };
        let before = self.last;
        // Nodes return entries in seq order; sorting is cheap insurance.
        output.messages.sort_by_key(|m| m.seq);
        let mut broken = false;
        for message in output.messages {
            let seq = Seq(message.seq);
            if seq <= self.last {
                continue;
            }
            if Some(seq) != self.last.checked_next() {
                broken = true; // not gap-free: never expected, so sync again
                break;
            }
            self.last = seq;
            out.push(Entry { seq, message, send: true });
        }
        self.drain(out);
        let progressed = self.last > before;
        if !(output.has_more || broken || again || !self.buffer.is_empty()) {
            self.sync = SyncState::Idle;
            self.failures = 0;
            return false;
        }
        if progressed || again {
            self.failures = 0;
            true
        } else {
            // Still behind but nothing came back: do not spin, retry later.
            self.failures += 1;
            self.sync = SyncState::Waiting { at: now + retry_delay };
            false
        }
    }

    /// Postpones the next sync until `at` without counting a failure (the
    /// caller paces a backlog; [`tick`](Self::tick) says when it is due).
    pub(crate) fn defer(&mut self, at: Instant) {
        self.sync = SyncState::Waiting { at };
    }

    /// The sync in flight failed; it is retried after `retry_delay`.
    /// Returns the number of consecutive failures.
    pub(crate) fn sync_failed(&mut self, now: Instant, retry_delay: Duration) -> u32 {
        self.failures += 1;
        self.sync = SyncState::Waiting { at: now + retry_delay };
        self.failures
    }

    /// Consecutive failed or progress-less syncs.
    pub(crate) fn failures(&self) -> u32 {
        self.failures
    }

    /// Time passed. Returns `true` if a waiting retry must start now.
    pub(crate) fn tick(&mut self, now: Instant) -> bool {
        matches!(self.sync, SyncState::Waiting { at } if now >= at)
    }

    /// Drops held-back entries at or below `last` and hands out the ones
    /// that continue it.
    fn drain(&mut self, out: &mut Vec<Entry>) {
        self.drop_delivered();
        while let Some(entry) = self.last.checked_next().and_then(|next| self.buffer.remove(&next)) {
            self.last = entry.seq;
            out.push(entry);
        }
    }

    /// Drops held-back entries at or below `last` (all of them after
    /// [`Seq::MAX`]: nothing follows it).
    fn drop_delivered(&mut self) {
        match self.last.checked_next() {
            Some(next) => self.buffer = self.buffer.split_off(&next),
            None => self.buffer.clear(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(seq: u64) -> Entry {
        Entry { seq: Seq(seq), message: Message { seq, ..Default::default() }, send: true }
    }

    fn seqs(out: &[Entry]) -> Vec<u64> {
        out.iter().map(|e| e.seq.0).collect()
    }

    fn sync_output(range: std::ops::RangeInclusive<u64>, has_more: bool) -> SyncOutput {
        let last = *range.end();
        SyncOutput {
            messages: range.map(|seq| Message { seq, ..Default::default() }).collect(),
            has_more,
            last_seq: last,
        }
    }

    #[test]
    fn in_order_pushes_pass_duplicates_drop() {
        let mut list = UserList::new(Seq(3), 8);
        let mut out = Vec::new();
        assert!(!list.push(entry(4), &mut out));
        assert!(!list.push(entry(4), &mut out));
        assert!(!list.push(entry(2), &mut out));
        assert!(!list.push(entry(5), &mut out));
        assert_eq!(seqs(&out), [4, 5]);
        assert_eq!(list.last(), Seq(5));
    }

    #[test]
    fn gap_buffers_then_sync_fills_in_order() {
        let now = Instant::now();
        let mut list = UserList::new(Seq::ZERO, 8);
        let mut out = Vec::new();
        assert!(list.push(entry(3), &mut out));
        list.sync_started(CallId(1));
        assert!(!list.push(entry(4), &mut out));
        assert!(!list.push(entry(3), &mut out));
        assert!(out.is_empty());
        assert!(!list.sync_ok(now, Duration::from_secs(1), sync_output(1..=3, false), &mut out));
        assert_eq!(seqs(&out), [1, 2, 3, 4]);
        assert!(!list.is_syncing());
        assert_eq!(list.buffered(), 0);
    }

    #[test]
    fn has_more_syncs_again_and_no_progress_waits() {
        let now = Instant::now();
        let delay = Duration::from_secs(1);
        let mut list = UserList::new(Seq::ZERO, 8);
        let mut out = Vec::new();
        assert!(list.resync());
        list.sync_started(CallId(1));
        assert!(list.sync_ok(now, delay, sync_output(1..=2, true), &mut out));
        list.sync_started(CallId(2));
        assert!(!list.sync_ok(now, delay, SyncOutput { has_more: true, ..Default::default() }, &mut out));
        assert_eq!(list.deadline(), Some(now + delay));
        assert_eq!(list.failures(), 1);
        assert!(!list.tick(now));
        assert!(list.tick(now + delay));
    }

    #[test]
    fn overflow_drops_buffer_and_repeats_sync() {
        let now = Instant::now();
        let mut list = UserList::new(Seq::ZERO, 2);
        let mut out = Vec::new();
        assert!(list.push(entry(2), &mut out));
        list.sync_started(CallId(1));
        list.push(entry(3), &mut out);
        list.push(entry(4), &mut out); // overflow: buffer dropped
        assert_eq!(list.buffered(), 0);
        // The sync covered 1..=2 only; the dropped 3 and 4 need another one.
        assert!(list.sync_ok(now, Duration::from_secs(1), sync_output(1..=2, false), &mut out));
        assert_eq!(seqs(&out), [1, 2]);
    }

    #[test]
    fn nothing_follows_the_last_seq() {
        let mut list = UserList::new(Seq(u64::MAX - 1), 8);
        let mut out = Vec::new();
        assert!(!list.push(entry(u64::MAX), &mut out));
        assert_eq!(list.last(), Seq::MAX);
        assert!(!list.push(entry(u64::MAX), &mut out), "a duplicate of the last seq");
        assert!(!list.push(entry(1), &mut out), "no wrap to the start");
        assert_eq!(seqs(&out), [u64::MAX]);
        list.restart_at(Seq::MAX);
        assert_eq!(list.buffered(), 0);
    }
}
