//! The client's view of the signed-in user's list: merging pushes and syncs
//! into one in-order, gap-free, duplicate-free stream (gim issue #46).
//!
//! [`Timeline`] is sans-IO: it knows nothing of sockets, tasks or clocks.
//! The connection driver feeds it pushes, sync outcomes and the current
//! time, asks [`Timeline::poll_sync`] whether to send a `SYNC` (and from
//! which seq), and hands [`Timeline::pop_ready`] entries to the application.
//!
//! # Rules
//!
//! Seqs are [`Seq`]s (a message's wire `seq` is read as one as it comes
//! in); the seq after `last` is `last.checked_next()`, and nothing follows
//! [`Seq::MAX`].
//!
//! * `last` is the highest seq made ready. Every entry made ready has the
//!   seq after `last` at that moment, so the ready entries are `start + 1,
//!   start + 2, ...` in order, each exactly once, across any number of
//!   reconnects (the timeline outlives connections).
//! * A push with seq ≤ `last` is a duplicate and dropped. A push of the
//!   seq after `last` is ready at once, unless a sync is pending. A push
//!   with a larger seq is a gap: it is held back and a sync from `last`
//!   starts.
//! * While a sync is pending (needed, in flight, or waiting for a retry),
//!   pushes are held back in a bounded buffer keyed by seq, so duplicates
//!   collapse. On overflow the highest seqs are dropped: syncing fetches
//!   them again.
//! * After every (re)connect the timeline syncs from `last` and pages while
//!   `has_more`.
//! * The timeline also tracks `head`, the highest seq the server is known to
//!   have (sign-in, sync replies, pushes, send replies). If `head` stays
//!   above `last` for [`GAP_GRACE`] without progress (e.g. a push that never
//!   came), it syncs.
//! * A push the driver has no room for is [shed](Timeline::shed): it only
//!   raises `head` and makes a sync needed.
//! * A sync that fails, or returns nothing while the timeline is still
//!   behind, is retried after a delay; [`Timeline::failures`] counts such
//!   syncs in a row so the driver can give up on the connection.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use rim_proto::ids::Seq;
use rim_proto::v1::{Message, SyncOutput};

/// How long `head > last` may last without progress before a sync starts.
pub const GAP_GRACE: Duration = Duration::from_millis(800);

/// Where the timeline's syncing stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SyncState {
    /// Nothing to repair: in-order pushes are ready at once.
    Idle,
    /// A sync must start as soon as the driver can send one.
    Needed,
    /// A sync from `last` is in flight.
    InFlight,
    /// The last sync failed or made no progress: sync again at `at`.
    Waiting { at: Instant },
}

/// What a completed sync page means for the driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncProgress {
    /// The timeline is caught up with the list as of that sync.
    CaughtUp,
    /// Another page (or another sync) is needed; [`Timeline::poll_sync`]
    /// says when.
    Continue,
}

/// One user's list as seen by one client. See the [module
/// documentation](self).
#[derive(Debug)]
pub struct Timeline {
    last: Seq,
    head: Seq,
    /// Since when `head > last` without progress (`None` when caught up).
    behind_since: Option<Instant>,
    sync: SyncState,
    buffer: BTreeMap<Seq, Message>,
    buffer_limit: usize,
    retry_delay: Duration,
    failures: u32,
    ready: VecDeque<Message>,
}

impl Timeline {
    /// A timeline whose entries up to `last` the application already has.
    /// At most `buffer_limit` pushes are held back while syncing; a failed
    /// sync is retried after `retry_delay`. The first sync is
    /// [needed](Self::connected) once connected.
    pub fn new(last: Seq, buffer_limit: usize, retry_delay: Duration) -> Timeline {
        Timeline {
            last,
            head: last,
            behind_since: None,
            sync: SyncState::Needed,
            buffer: BTreeMap::new(),
            buffer_limit: buffer_limit.max(1),
            retry_delay,
            failures: 0,
            ready: VecDeque::new(),
        }
    }

    /// A timeline like [`new`](Self::new), but caught up: no sync is needed
    /// until a gap shows (a super group's list, whose backlog the gateway
    /// pushes after a subscription).
    pub fn caught_up(last: Seq, buffer_limit: usize, retry_delay: Duration) -> Timeline {
        Timeline { sync: SyncState::Idle, ..Timeline::new(last, buffer_limit, retry_delay) }
    }

    /// Highest seq made ready.
    pub fn last(&self) -> Seq {
        self.last
    }

    /// Highest seq the server is known to have.
    pub fn head(&self) -> Seq {
        self.head
    }

    /// Pushes held back.
    pub fn buffered(&self) -> usize {
        self.buffer.len()
    }

    /// Whether a sync is needed, in flight or waiting for a retry.
    pub fn is_syncing(&self) -> bool {
        self.sync != SyncState::Idle
    }

    /// Syncs in a row that failed or made no progress.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// A new connection signed in: sync from `last` (a sync in flight on
    /// the old connection is forgotten; its outcome must not be fed in).
    pub fn connected(&mut self) {
        self.sync = SyncState::Needed;
        self.failures = 0;
    }

    /// The connection was lost. Pushes held back are kept (they are still
    /// valid entries); the next connection syncs.
    pub fn disconnected(&mut self) {
        self.sync = SyncState::Needed;
    }

    /// A new connection re-subscribed the list, and the server pushes what
    /// follows `last`: a sync in flight on the old connection is
    /// forgotten, and one is needed only if pushes are held back.
    pub fn resubscribed(&mut self) {
        self.sync = if self.buffer.is_empty() { SyncState::Idle } else { SyncState::Needed };
        self.failures = 0;
    }

    /// Entries up to `seq` cannot be read (before a member's join point,
    /// or trimmed by retention): continue after it. Held entries that
    /// continue it become ready.
    pub fn skip_to(&mut self, seq: Seq, now: Instant) {
        if seq <= self.last {
            return;
        }
        self.last = seq;
        self.head = self.head.max(seq);
        self.behind_since = (self.head > self.last).then_some(now);
        self.drain(now);
    }

    /// A push came that may have been an entry of this list although it
    /// could not be told apart from another list's: sync once to be sure
    /// (a sync that finds nothing new is no failure).
    pub fn check_soon(&mut self) {
        if self.sync == SyncState::Idle {
            self.sync = SyncState::Needed;
        }
    }

    /// The server is known to have entries up to `seq` (a sign-in's or
    /// sync's `last_seq`, a send reply's seq).
    pub fn observe_head(&mut self, seq: Seq, now: Instant) {
        if seq > self.head {
            self.head = seq;
        }
        if self.head > self.last && self.behind_since.is_none() {
            self.behind_since = Some(now);
        }
    }

    /// A pushed entry of the user's list (`message.seq` is its seq).
    pub fn push(&mut self, message: Message, now: Instant) {
        let seq = Seq(message.seq);
        if seq <= self.last {
            return; // duplicate, or already synced
        }
        self.observe_head(seq, now);
        match self.sync {
            SyncState::Idle if Some(seq) == self.last.checked_next() => self.make_ready(message, now),
            SyncState::Idle => {
                self.hold(message);
                self.sync = SyncState::Needed;
            }
            SyncState::Needed | SyncState::InFlight | SyncState::Waiting { .. } => self.hold(message),
        }
    }

    /// A push of `seq` that the driver could not take (the application is
    /// behind): the entry is fetched by a sync instead.
    pub fn shed(&mut self, seq: Seq, now: Instant) {
        if seq <= self.last {
            return;
        }
        self.observe_head(seq, now);
        if self.sync == SyncState::Idle {
            self.sync = SyncState::Needed;
        }
    }

    /// Whether to send a sync now; if so, returns its `after_seq` and
    /// counts the sync as in flight. Only call it while connected.
    pub fn poll_sync(&mut self, now: Instant) -> Option<Seq> {
        let start = match self.sync {
            SyncState::Needed => true,
            SyncState::Waiting { at } => now >= at,
            SyncState::InFlight => false,
            SyncState::Idle => self.behind_since.is_some_and(|since| now >= since + GAP_GRACE),
        };
        if !start {
            return None;
        }
        self.sync = SyncState::InFlight;
        Some(self.last)
    }

    /// When [`poll_sync`](Self::poll_sync) may next have something to do
    /// without any other input.
    pub fn next_deadline(&self) -> Option<Instant> {
        match self.sync {
            SyncState::Waiting { at } => Some(at),
            SyncState::Idle => self.behind_since.map(|since| since + GAP_GRACE),
            SyncState::Needed | SyncState::InFlight => None,
        }
    }

    /// The sync in flight returned `output`.
    pub fn sync_ok(&mut self, mut output: SyncOutput, now: Instant) -> SyncProgress {
        if self.sync != SyncState::InFlight {
            return SyncProgress::Continue; // not ours (a stale reply)
        }
        let before = self.last;
        self.observe_head(Seq(output.last_seq), now);
        output.messages.sort_by_key(|m| m.seq);
        let mut broken = false;
        for message in output.messages {
            let seq = Seq(message.seq);
            if seq <= self.last {
                continue;
            }
            if Some(seq) != self.last.checked_next() {
                broken = true; // never expected of a server; sync again
                break;
            }
            self.make_ready(message, now);
        }
        self.drain(now);
        let behind = output.has_more || broken || !self.buffer.is_empty() || self.head > self.last;
        if !behind {
            self.sync = SyncState::Idle;
            self.failures = 0;
            return SyncProgress::CaughtUp;
        }
        if self.last > before {
            self.failures = 0;
            self.sync = SyncState::Needed;
        } else {
            self.failures += 1;
            self.sync = SyncState::Waiting { at: now + self.retry_delay };
        }
        SyncProgress::Continue
    }

    /// The sync in flight failed (error reply or timeout); it is retried
    /// after the retry delay.
    pub fn sync_failed(&mut self, now: Instant) {
        if self.sync == SyncState::InFlight {
            self.failures += 1;
            self.sync = SyncState::Waiting { at: now + self.retry_delay };
        }
    }

    /// The next ready entry, in seq order.
    pub fn pop_ready(&mut self) -> Option<Message> {
        self.ready.pop_front()
    }

    /// Entries ready and not yet popped.
    pub fn ready_len(&self) -> usize {
        self.ready.len()
    }

    fn make_ready(&mut self, message: Message, now: Instant) {
        self.last = Seq(message.seq);
        self.behind_since = (self.head > self.last).then_some(now);
        self.ready.push_back(message);
    }

    /// Holds a push back; on overflow the highest seq goes.
    fn hold(&mut self, message: Message) {
        let seq = Seq(message.seq);
        if self.buffer.len() >= self.buffer_limit && !self.buffer.contains_key(&seq) {
            match self.buffer.last_key_value() {
                Some((&highest, _)) if highest > seq => {
                    self.buffer.remove(&highest);
                }
                _ => return, // the new one is the highest: drop it
            }
        }
        self.buffer.insert(seq, message);
    }

    /// Drops held entries at or below `last`, makes ready those that
    /// continue it.
    fn drain(&mut self, now: Instant) {
        let Some(next) = self.last.checked_next() else {
            self.buffer.clear(); // nothing follows the last position
            return;
        };
        self.buffer = self.buffer.split_off(&next);
        while let Some(message) = self.last.checked_next().and_then(|next| self.buffer.remove(&next)) {
            self.make_ready(message, now);
        }
    }
}

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::{Rng as _, SeedableRng as _};

    use super::*;

    const DELAY: Duration = Duration::from_millis(100);

    fn msg(seq: u64) -> Message {
        Message { seq, message_id: 1000 + seq, ..Default::default() }
    }

    fn page(range: std::ops::RangeInclusive<u64>, has_more: bool, last_seq: u64) -> SyncOutput {
        SyncOutput { messages: range.map(msg).collect(), has_more, last_seq }
    }

    fn empty_page(has_more: bool, last_seq: u64) -> SyncOutput {
        SyncOutput { messages: Vec::new(), has_more, last_seq }
    }

    fn ready(t: &mut Timeline) -> Vec<u64> {
        std::iter::from_fn(|| t.pop_ready()).map(|m| m.seq).collect()
    }

    /// A timeline that connected and finished its first (empty) sync.
    fn idle(last: u64) -> (Timeline, Instant) {
        let now = Instant::now();
        let mut t = Timeline::new(Seq(last), 8, DELAY);
        t.connected();
        assert_eq!(t.poll_sync(now), Some(Seq(last)));
        assert_eq!(t.sync_ok(empty_page(false, last), now), SyncProgress::CaughtUp);
        (t, now)
    }

    #[test]
    fn gap_in_pushes_triggers_a_sync_and_delivers_each_seq_once() {
        let (mut t, now) = idle(0);
        t.push(msg(1), now);
        t.push(msg(2), now);
        assert_eq!(t.poll_sync(now), None);
        t.push(msg(4), now);
        assert_eq!(ready(&mut t), [1, 2]);
        assert_eq!(t.poll_sync(now), Some(Seq(2)), "a gap syncs from last");
        t.push(msg(4), now); // duplicate while syncing
        t.push(msg(5), now);
        assert_eq!(t.sync_ok(page(3..=4, false, 4), now), SyncProgress::CaughtUp);
        assert_eq!(ready(&mut t), [3, 4, 5]);
        t.push(msg(3), now);
        t.push(msg(5), now);
        t.push(msg(6), now);
        assert_eq!(ready(&mut t), [6]);
        assert!(!t.is_syncing());
        assert_eq!(t.buffered(), 0);
    }

    #[test]
    fn pushes_racing_the_first_sync_are_held_and_merged() {
        let now = Instant::now();
        let mut t = Timeline::new(Seq(0), 8, DELAY);
        t.connected();
        t.observe_head(Seq(3), now); // sign-in: last_seq 3
        assert_eq!(t.poll_sync(now), Some(Seq(0)));
        t.push(msg(4), now); // arrives before the sync reply (gim #46)
        t.push(msg(3), now);
        assert!(t.pop_ready().is_none());
        assert_eq!(t.sync_ok(page(1..=3, false, 3), now), SyncProgress::CaughtUp);
        assert_eq!(ready(&mut t), [1, 2, 3, 4]);
    }

    #[test]
    fn has_more_pages_and_reconnect_resumes_from_last() {
        let now = Instant::now();
        let mut t = Timeline::new(Seq(10), 8, DELAY);
        t.connected();
        assert_eq!(t.poll_sync(now), Some(Seq(10)));
        assert_eq!(t.sync_ok(page(11..=12, true, 20), now), SyncProgress::Continue);
        assert_eq!(t.poll_sync(now), Some(Seq(12)));
        // The link drops with that sync in flight; a stale reply is ignored.
        t.disconnected();
        assert_eq!(t.sync_ok(page(13..=14, true, 20), now), SyncProgress::Continue);
        t.connected();
        assert_eq!(t.poll_sync(now), Some(Seq(12)));
        assert_eq!(t.sync_ok(page(13..=20, false, 20), now), SyncProgress::CaughtUp);
        assert_eq!(ready(&mut t), (11..=20).collect::<Vec<_>>());
    }

    #[test]
    fn failures_wait_then_retry() {
        let now = Instant::now();
        let mut t = Timeline::new(Seq(0), 8, DELAY);
        t.connected();
        assert_eq!(t.poll_sync(now), Some(Seq(0)));
        t.sync_failed(now);
        assert_eq!(t.failures(), 1);
        assert_eq!(t.poll_sync(now), None);
        assert_eq!(t.next_deadline(), Some(now + DELAY));
        assert_eq!(t.poll_sync(now + DELAY), Some(Seq(0)));
        // No progress while behind also counts as a failure.
        assert_eq!(t.sync_ok(empty_page(true, 5), now), SyncProgress::Continue);
        assert_eq!(t.failures(), 2);
        assert_eq!(t.poll_sync(now + DELAY), Some(Seq(0)));
        assert_eq!(t.sync_ok(page(1..=5, false, 5), now), SyncProgress::CaughtUp);
        assert_eq!(t.failures(), 0);
    }

    #[test]
    fn buffer_overflow_drops_the_highest_and_syncs_them_again() {
        let now = Instant::now();
        let mut t = Timeline::new(Seq(0), 2, DELAY);
        t.connected();
        assert_eq!(t.poll_sync(now), Some(Seq(0)));
        for seq in [5, 3, 4, 6] {
            t.push(msg(seq), now);
        }
        assert_eq!(t.buffered(), 2);
        // The sync saw 1..=2 only; 3 and 4 were held, 5 and 6 dropped.
        assert_eq!(t.sync_ok(page(1..=2, false, 2), now), SyncProgress::Continue);
        assert_eq!(ready(&mut t), [1, 2, 3, 4]);
        assert_eq!(t.poll_sync(now), Some(Seq(4)));
        assert_eq!(t.sync_ok(page(5..=6, false, 6), now), SyncProgress::CaughtUp);
        assert_eq!(ready(&mut t), [5, 6]);
    }

    #[test]
    fn shed_pushes_are_synced_later() {
        let (mut t, now) = idle(0);
        t.push(msg(1), now);
        t.shed(Seq(2), now);
        t.shed(Seq(1), now); // already delivered: ignored
        t.shed(Seq(3), now);
        assert_eq!(t.head(), Seq(3));
        assert_eq!(t.poll_sync(now), Some(Seq(1)));
        t.push(msg(4), now);
        assert_eq!(t.sync_ok(page(2..=3, false, 3), now), SyncProgress::CaughtUp);
        assert_eq!(ready(&mut t), [1, 2, 3, 4]);
    }

    #[test]
    fn a_head_ahead_of_last_syncs_after_the_grace_period() {
        let (mut t, now) = idle(0);
        t.observe_head(Seq(1), now); // e.g. the device's own send, never pushed to it
        assert_eq!(t.poll_sync(now), None);
        assert_eq!(t.next_deadline(), Some(now + GAP_GRACE));
        // The push comes in time: no sync.
        t.push(msg(1), now);
        assert_eq!(t.next_deadline(), None);
        t.observe_head(Seq(2), now);
        assert_eq!(t.poll_sync(now + GAP_GRACE), Some(Seq(1)));
        assert_eq!(t.sync_ok(page(2..=2, false, 2), now), SyncProgress::CaughtUp);
        assert_eq!(ready(&mut t), [1, 2]);
    }

    #[test]
    fn nothing_follows_the_last_position() {
        let now = Instant::now();
        let mut t = Timeline::new(Seq(u64::MAX - 1), 8, DELAY);
        t.connected();
        assert_eq!(t.poll_sync(now), Some(Seq(u64::MAX - 1)));
        let last = || Message { seq: u64::MAX, ..Default::default() };
        t.push(last(), now); // held while syncing
        assert_eq!(t.sync_ok(empty_page(false, u64::MAX), now), SyncProgress::CaughtUp);
        assert_eq!(ready(&mut t), [u64::MAX]);
        assert_eq!(t.last(), Seq::MAX);
        t.push(last(), now); // a duplicate, never a wrap to seq 0
        t.skip_to(Seq::MAX, now);
        assert!(t.pop_ready().is_none());
        assert!(!t.is_syncing());
    }

    /// Random interleavings of reordered, duplicated and lost pushes with
    /// syncs that may fail or page: every seq is delivered once, in order.
    #[test]
    fn random_interleavings_deliver_every_seq_once_in_order() {
        for seed in 0..300 {
            let mut rng = StdRng::seed_from_u64(seed);
            let total: u64 = rng.gen_range(1..60);
            let start = Instant::now();
            let mut now = start;
            let mut t = Timeline::new(Seq(0), rng.gen_range(1..6), DELAY);
            t.connected();
            let mut appended = 0u64; // the server's list head
            let mut in_flight: Option<Seq> = None;
            let mut pushes: Vec<u64> = Vec::new();
            let mut got = Vec::new();
            for _ in 0..10_000 {
                if appended == total && got.len() as u64 == total {
                    break;
                }
                now += Duration::from_millis(rng.gen_range(0..50));
                match rng.gen_range(0..10) {
                    0..=2 if appended < total => {
                        appended += 1;
                        if rng.gen_bool(0.8) {
                            pushes.push(appended);
                        }
                    }
                    3..=4 if !pushes.is_empty() => {
                        let i = rng.gen_range(0..pushes.len());
                        let seq = if rng.gen_bool(0.7) { pushes.remove(i) } else { pushes[i] };
                        t.push(msg(seq), now);
                    }
                    5 if rng.gen_bool(0.1) => {
                        t.disconnected();
                        in_flight = None;
                        t.connected();
                    }
                    _ => {
                        if let Some(after) = in_flight.take() {
                            if rng.gen_bool(0.2) {
                                t.sync_failed(now);
                            } else {
                                let end = appended.min(after.0 + rng.gen_range(1..5));
                                let out = page(after.0 + 1..=end, end < appended, appended);
                                t.sync_ok(out, now);
                            }
                        }
                    }
                }
                if in_flight.is_none() {
                    in_flight = t.poll_sync(now);
                }
                got.extend(ready(&mut t));
            }
            assert_eq!(got, (1..=total).collect::<Vec<_>>(), "seed {seed}");
        }
    }
}
