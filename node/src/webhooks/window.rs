//! The delivery window of one (shard, endpoint): which events may be in
//! flight at once, and how far the cursor may be committed (issue 15 §3,
//! pipelined delivery).
//!
//! The window holds the events read after the committed cursor, in log
//! order, each `Waiting`, `InFlight`, `Done` (a 2xx, or not wanted by the
//! endpoint) or `Expired` (failed past the retention: to be dead-lettered).
//! Its invariants:
//!
//! * **FIFO per conversation**: an event starts only when no earlier event
//!   of its conversation is still in the window unfinished (`Waiting`,
//!   `InFlight` or `Expired`), so two events of one conversation are never
//!   in flight together, and a later one is never sent before an earlier
//!   one got its 2xx or was dead-lettered. The conversation is the event's
//!   stored `conversation` key (`u:<lo>:<hi>`, `g:<group>`, `f:<lo>:<hi>`,
//!   set at apply by `rim-raft-store` `im::events`); events without one
//!   share the empty key, so they keep their log order among themselves.
//!   Keys are compared by a 64-bit hash: a collision only serialises two
//!   conversations, it never reorders one.
//! * **At most `max_in_flight`** events are `InFlight`.
//! * **Contiguous commits**: [`Window::pop_done`] only passes the finished
//!   *prefix*; an event finished behind an unfinished one stays in the window
//!   until the prefix reaches it, so the committed cursor never passes an
//!   unfinished event. After a crash, only events between the committed
//!   cursor and the end of the window are delivered again (at least once).
//!   An expired event is dead-lettered only at the head of the window
//!   ([`Window::expired_head`]), because `DeadLetterEvent` also moves the
//!   cursor to it.
//! * **Bounded memory**: at most [`Window::capacity`] events (8 per request
//!   in flight, at least 64) and about [`AHEAD_BYTES`] of bodies; the backlog
//!   stays in the shard's state and is read as the window drains.

use std::collections::{HashSet, VecDeque};
use std::hash::BuildHasher as _;

use rim_proto::store::EventRecord;

/// An event's position: `(log index, ordinal)`.
pub type Position = (u64, u32);

/// Most requests in flight per (shard, endpoint) an endpoint may configure.
pub const MAX_IN_FLIGHT: usize = 64;
/// The window's events per request in flight...
const AHEAD_PER_FLIGHT: usize = 8;
/// ... and at least this many.
const AHEAD_MIN: usize = 64;
/// Body bytes the window reads ahead (more only for a single event).
pub const AHEAD_BYTES: usize = 4 << 20;

/// How an event in the window stands.
#[derive(Clone, Debug, PartialEq, Eq)]
enum State {
    Waiting,
    InFlight,
    Done,
    /// Failed past the retention, with the last failure.
    Expired(String),
}

struct Slot {
    event: EventRecord,
    key: u64,
    state: State,
}

impl Slot {
    fn at(&self) -> Position {
        (self.event.index, self.event.ordinal)
    }
}

/// How a request ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Finished {
    /// A 2xx.
    Delivered,
    /// Failed past the retention: to be dead-lettered, with the reason.
    Expired(String),
}

/// The delivery window (module docs).
pub struct Window {
    slots: VecDeque<Slot>,
    bytes: usize,
    read_to: Option<Position>,
    in_flight: usize,
    max_in_flight: usize,
    capacity: usize,
    hasher: std::collections::hash_map::RandomState,
}

impl Window {
    /// An empty window after the committed cursor `after`, with at most
    /// `max_in_flight` (clamped to 1..=[`MAX_IN_FLIGHT`]) requests in flight.
    pub fn new(after: Option<Position>, max_in_flight: usize) -> Self {
        let max_in_flight = max_in_flight.clamp(1, MAX_IN_FLIGHT);
        Window {
            slots: VecDeque::new(),
            bytes: 0,
            read_to: after,
            in_flight: 0,
            max_in_flight,
            capacity: (max_in_flight * AHEAD_PER_FLIGHT).max(AHEAD_MIN),
            hasher: Default::default(),
        }
    }

    /// Most events the window holds.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The last position read into the window (the cursor when nothing was).
    pub fn read_to(&self) -> Option<Position> {
        self.read_to
    }

    /// How many events and body bytes to read now, if the window is at
    /// most half full (so reads come in batches, not one per finished event).
    pub fn room(&self) -> Option<(usize, usize)> {
        let half = self.slots.len() <= self.capacity / 2 && self.bytes <= AHEAD_BYTES / 2;
        half.then(|| (self.capacity - self.slots.len(), AHEAD_BYTES - self.bytes))
    }

    /// Appends the next event of the log; `wanted`: whether the endpoint
    /// takes its type (if not, it is done as soon as it is read).
    pub fn push(&mut self, event: EventRecord, wanted: bool) {
        let key = self.hasher.hash_one(event.conversation.as_str());
        let state = if wanted { State::Waiting } else { State::Done };
        self.bytes += event.body.len();
        self.read_to = Some((event.index, event.ordinal));
        self.slots.push_back(Slot { event, key, state });
    }

    /// Marks as in flight, and returns, the events that may start now (FIFO
    /// per conversation, at most `max_in_flight` in flight).
    pub fn start(&mut self) -> Vec<EventRecord> {
        let mut out = Vec::new();
        let mut busy: HashSet<u64> = HashSet::new();
        for slot in self.slots.iter_mut() {
            if self.in_flight >= self.max_in_flight {
                break;
            }
            match slot.state {
                State::Done => continue,
                State::InFlight | State::Expired(_) => {}
                State::Waiting => {
                    if !busy.contains(&slot.key) {
                        slot.state = State::InFlight;
                        self.in_flight += 1;
                        out.push(slot.event.clone());
                    }
                }
            }
            busy.insert(slot.key);
        }
        out
    }

    /// Records how the request of the event at `at` ended; false if no
    /// such event is in flight.
    pub fn finish(&mut self, at: Position, how: Finished) -> bool {
        let Ok(i) = self.slots.binary_search_by_key(&at, Slot::at) else { return false };
        let slot = &mut self.slots[i];
        if slot.state != State::InFlight {
            return false;
        }
        self.in_flight -= 1;
        slot.state = match how {
            Finished::Delivered => State::Done,
            Finished::Expired(reason) => State::Expired(reason),
        };
        true
    }

    /// Removes the done prefix; the position of its last event, if any.
    pub fn pop_done(&mut self) -> Option<Position> {
        let mut last = None;
        while self.slots.front().is_some_and(|s| s.state == State::Done) {
            last = self.pop_head();
        }
        last
    }

    /// The head of the window, if it expired (to be dead-lettered), with
    /// the reason.
    pub fn expired_head(&self) -> Option<(&EventRecord, &str)> {
        match self.slots.front() {
            Some(Slot { event, state: State::Expired(reason), .. }) => Some((event, reason)),
            _ => None,
        }
    }

    /// Removes the head (after it was dead-lettered); its position.
    pub fn pop_head(&mut self) -> Option<Position> {
        let s = self.slots.pop_front()?;
        self.bytes -= s.event.body.len();
        Some(s.at())
    }

    /// When the oldest unfinished event was created, if any.
    pub fn oldest_ms(&self) -> Option<i64> {
        self.slots.iter().find(|s| s.state != State::Done).map(|s| s.event.created_ms)
    }

    /// Nothing read and unfinished.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Requests in flight.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(index: u64, conversation: &str) -> EventRecord {
        EventRecord {
            event_id: format!("evt_1_{index}_0"),
            r#type: "message.created".into(),
            created_ms: index as i64,
            conversation: conversation.into(),
            body: vec![b'x'; 10].into(),
            index,
            ordinal: 0,
        }
    }

    fn indexes(events: &[EventRecord]) -> Vec<u64> {
        events.iter().map(|e| e.index).collect()
    }

    #[test]
    fn one_event_per_conversation_in_flight_and_at_most_w() {
        let mut w = Window::new(None, 3);
        for (i, c) in [(1, "a"), (2, "a"), (3, "b"), (4, "c"), (5, "d"), (6, "b")] {
            w.push(ev(i, c), true);
        }
        assert_eq!(indexes(&w.start()), [1, 3, 4], "a's second waits; W = 3");
        assert!(w.start().is_empty(), "nothing more while 3 are in flight");
        assert!(w.finish((3, 0), Finished::Delivered));
        assert!(!w.finish((3, 0), Finished::Delivered), "finished once");
        assert_eq!(indexes(&w.start()), [5], "one slot free: the earliest that may start");
        assert_eq!(w.pop_done(), None, "event 1 is unfinished: the cursor stays");
        assert!(w.finish((1, 0), Finished::Delivered));
        assert_eq!(indexes(&w.start()), [2], "a's second after a's first");
        assert_eq!(w.pop_done(), Some((1, 0)), "2 is in flight: only 1 is passed");
        assert!(w.finish((2, 0), Finished::Delivered));
        assert_eq!(w.pop_done(), Some((3, 0)), "2 and the done 3 follow");
        assert_eq!(indexes(&w.start()), [6]);
    }

    #[test]
    fn an_expired_event_blocks_its_conversation_until_dead_lettered_at_the_head() {
        let mut w = Window::new(Some((0, 0)), 8);
        w.push(ev(1, "a"), true);
        w.push(ev(2, "b"), true);
        w.push(ev(3, "b"), true);
        w.push(ev(4, "x"), false);
        assert_eq!(indexes(&w.start()), [1, 2]);
        assert!(w.finish((2, 0), Finished::Expired("HTTP 500".into())));
        assert!(w.start().is_empty(), "b's next waits for the dead letter");
        assert!(w.expired_head().is_none(), "not at the head: 1 is in flight");
        assert!(w.finish((1, 0), Finished::Delivered));
        assert_eq!(w.pop_done(), Some((1, 0)));
        assert_eq!(w.expired_head().map(|(e, r)| (e.index, r)), Some((2, "HTTP 500")));
        assert_eq!(w.pop_head(), Some((2, 0)));
        assert_eq!(indexes(&w.start()), [3]);
        assert!(w.finish((3, 0), Finished::Delivered));
        assert_eq!(w.pop_done(), Some((4, 0)), "an unwanted event is done when read");
        assert!(w.is_empty());
        assert_eq!(w.read_to(), Some((4, 0)));
    }

    #[test]
    fn the_window_is_bounded_and_w_is_clamped() {
        let mut w = Window::new(None, 1_000);
        assert_eq!(w.capacity(), MAX_IN_FLIGHT * AHEAD_PER_FLIGHT);
        let mut one = Window::new(None, 0);
        assert_eq!(one.capacity(), AHEAD_MIN);
        for i in 1..=(AHEAD_MIN as u64 / 2 + 1) {
            one.push(ev(i, "k"), true);
        }
        assert!(one.room().is_none(), "more than half full: no read");
        assert_eq!(one.start().len(), 1, "W = 1 keeps one request in flight");
        assert_eq!(w.room(), Some((w.capacity(), AHEAD_BYTES)));
        w.push(EventRecord { body: vec![0; AHEAD_BYTES].into(), ..ev(1, "") }, true);
        assert!(w.room().is_none(), "the bytes bound holds too");
        assert_eq!(w.pop_done(), None);
    }
}
