//! Delivery of the user's list over one session: in seq order, each entry
//! once, gaps repaired by syncing from the last delivered seq (gim issue
//! #46). Example tests first, then a property test over random pushes,
//! losses, duplicates, reorderings, stream breaks and sync outcomes.

mod common;

use std::time::{Duration, Instant};

use common::*;
use proptest::prelude::*;
use prost::Message as _;
use rim_gateway::{CallError, CallId, NodeReply, Session, SessionConfig};
use rim_proto::ErrorCode;
use rim_proto::ids::Seq;
use rim_proto::v1::{Command, MessagePush, SyncInput, SyncOutput};

fn sync_reply(range: std::ops::RangeInclusive<u64>, has_more: bool, last_seq: u64) -> NodeReply {
    NodeReply::Sync(SyncOutput { messages: range.map(entry).collect(), has_more, last_seq })
}

#[test]
fn pushes_continuing_the_list_are_sent_and_duplicates_dropped() {
    let t0 = Instant::now();
    let mut s = signed_in(SessionConfig::default(), t0, 5);
    for seq in [3, 5, 6, 6, 7, 4, 8] {
        s.on_push(t0, user_push(seq));
    }
    let actions = drain(&mut s);
    assert_eq!(pushed_seqs(&actions), [6, 7, 8]);
    assert!(calls(&actions).is_empty());
    let p = &sent(&actions)[0];
    assert_eq!((p.request_id, p.command, p.seq), (0, Command::Message as i32, 6));
    assert!(MessagePush::decode(p.content.clone()).unwrap().persisted);
    assert_eq!(s.last_delivered_seq(), Seq(8));
}

#[test]
fn a_gap_triggers_a_sync_and_pushes_wait_for_it() {
    let t0 = Instant::now();
    let mut s = signed_in(SessionConfig::default(), t0, 5);
    s.on_push(t0, user_push(8));
    let actions = drain(&mut s);
    assert!(pushed_seqs(&actions).is_empty(), "the gap push is not sent");
    let (id, after) = sync_call(&actions).expect("a sync call");
    assert_eq!(after, 5);
    let call = only_call(&actions);
    assert_eq!(call.request, rim_gateway::NodeCall::Sync(SyncInput { after_seq: 5, limit: 200 }));
    assert!(s.is_resyncing());

    // While the sync is in flight, even in-order pushes are held.
    for seq in [9, 6, 10, 8] {
        s.on_push(t0, user_push(seq));
    }
    let actions = drain(&mut s);
    assert!(actions.is_empty(), "{actions:?}");
    assert_eq!(s.held_pushes(), 4);

    // The sync was served when the list ended at 8.
    s.on_reply(t0, id, Ok(sync_reply(6..=8, false, 8)));
    let actions = drain(&mut s);
    assert_eq!(pushed_seqs(&actions), [6, 7, 8, 9, 10]);
    assert!(calls(&actions).is_empty());
    assert!(!s.is_resyncing());
    assert_eq!(s.held_pushes(), 0);

    s.on_push(t0, user_push(11));
    assert_eq!(pushed_seqs(&drain(&mut s)), [11]);
}

#[test]
fn a_sync_with_more_continues_from_where_it_stopped() {
    let t0 = Instant::now();
    let mut s = signed_in(SessionConfig::default(), t0, 0);
    s.on_push(t0, user_push(5));
    let (id, _) = sync_call(&drain(&mut s)).unwrap();
    s.on_reply(t0, id, Ok(sync_reply(1..=2, true, 5)));
    let actions = drain(&mut s);
    assert_eq!(pushed_seqs(&actions), [1, 2]);
    let (id, after) = sync_call(&actions).unwrap();
    assert_eq!(after, 2);
    s.on_reply(t0, id, Ok(sync_reply(3..=4, false, 5)));
    assert_eq!(pushed_seqs(&drain(&mut s)), [3, 4, 5]);
}

#[test]
fn a_held_push_beyond_the_sync_result_syncs_again() {
    let t0 = Instant::now();
    let mut s = signed_in(SessionConfig::default(), t0, 0);
    s.on_push(t0, user_push(2));
    let (id, _) = sync_call(&drain(&mut s)).unwrap();
    s.on_push(t0, user_push(4)); // 3 was lost too
    s.on_reply(t0, id, Ok(sync_reply(1..=2, false, 2)));
    let actions = drain(&mut s);
    assert_eq!(pushed_seqs(&actions), [1, 2]);
    let (id, after) = sync_call(&actions).expect("sync again for 3");
    assert_eq!(after, 2);
    s.on_reply(t0, id, Ok(sync_reply(3..=4, false, 4)));
    assert_eq!(pushed_seqs(&drain(&mut s)), [3, 4]);
}

#[test]
fn resync_needed_syncs_from_the_last_delivered_seq() {
    let t0 = Instant::now();
    let mut s = signed_in(SessionConfig::default(), t0, 3);
    s.on_push(t0, user_push(4));
    drain(&mut s);
    s.on_resync_needed(t0);
    let (id, after) = sync_call(&drain(&mut s)).unwrap();
    assert_eq!(after, 4);
    // Another break while it is in flight: one more sync after it.
    s.on_resync_needed(t0);
    assert!(drain(&mut s).is_empty());
    s.on_reply(t0, id, Ok(sync_reply(5..=5, false, 5)));
    let actions = drain(&mut s);
    assert_eq!(pushed_seqs(&actions), [5]);
    let (id, after) = sync_call(&actions).expect("repeated");
    assert_eq!(after, 5);
    s.on_reply(t0, id, Ok(NodeReply::Sync(SyncOutput { last_seq: 5, ..Default::default() })));
    assert!(drain(&mut s).is_empty());
    assert!(!s.is_resyncing());
}

#[test]
fn a_failed_sync_is_retried_after_the_delay_and_gives_up_eventually() {
    let t0 = Instant::now();
    let config = SessionConfig { max_resync_failures: 3, ..SessionConfig::default() };
    let delay = config.resync_retry_delay;
    let mut s = signed_in(config, t0, 0);
    s.on_push(t0, user_push(3));
    let (mut id, _) = sync_call(&drain(&mut s)).unwrap();
    let mut now = t0;
    for attempt in 1..=2 {
        s.on_reply(now, id, Err(CallError::new(ErrorCode::ErrorTimeout, "slow")));
        assert!(drain(&mut s).is_empty());
        assert_eq!(s.next_deadline(), Some(now + delay), "attempt {attempt}");
        s.on_push(now, user_push(3 + attempt)); // held meanwhile
        s.on_tick(now + delay - Duration::from_millis(1));
        assert!(drain(&mut s).is_empty());
        now += delay;
        s.on_tick(now);
        let (next, after) = sync_call(&drain(&mut s)).expect("retried");
        assert_eq!(after, 0);
        id = next;
    }
    s.on_reply(now, id, Err(CallError::new(ErrorCode::ErrorTimeout, "slow")));
    assert!(closes_with(&drain(&mut s), ErrorCode::ErrorUnavailable));
}

#[test]
fn a_success_resets_the_failure_count() {
    let t0 = Instant::now();
    let config = SessionConfig { max_resync_failures: 2, ..SessionConfig::default() };
    let delay = config.resync_retry_delay;
    let mut s = signed_in(config, t0, 0);
    for round in 0..3u64 {
        let now = t0 + delay * (round as u32 * 2);
        let last = s.last_delivered_seq().0;
        s.on_push(now, user_push(last + 2));
        let (id, _) = sync_call(&drain(&mut s)).unwrap();
        s.on_reply(now, id, Err(CallError::new(ErrorCode::ErrorTimeout, "slow")));
        s.on_tick(now + delay);
        let (id, after) = sync_call(&drain(&mut s)).unwrap();
        assert_eq!(after, last);
        s.on_reply(now + delay, id, Ok(sync_reply(last + 1..=last + 2, false, last + 2)));
        let actions = drain(&mut s);
        // Two failures in a row would close; one per round never does.
        assert!(!s.is_closed(), "{actions:?}");
        assert_eq!(pushed_seqs(&actions), [last + 1, last + 2]);
        s.on_written(usize::MAX);
    }
}

#[test]
fn buffer_overflow_drops_held_pushes_and_syncs_again() {
    let t0 = Instant::now();
    let mut s = signed_in(SessionConfig { push_buffer_limit: 3, ..SessionConfig::default() }, t0, 0);
    s.on_push(t0, user_push(2));
    let (id, _) = sync_call(&drain(&mut s)).unwrap();
    for seq in 3..=10 {
        s.on_push(t0, user_push(seq));
    }
    assert!(s.held_pushes() <= 3);
    s.on_reply(t0, id, Ok(sync_reply(1..=2, false, 2)));
    let actions = drain(&mut s);
    let (id, after) = sync_call(&actions).expect("sync again after the overflow");
    let delivered = pushed_seqs(&actions);
    assert_eq!(after, *delivered.last().unwrap());
    s.on_reply(t0, id, Ok(sync_reply(after + 1..=10, false, 10)));
    let mut all = delivered;
    all.extend(pushed_seqs(&drain(&mut s)));
    assert_eq!(all, (1..=10).collect::<Vec<_>>());
}

#[test]
fn skipped_device_pushes_count_as_delivered_without_being_sent() {
    let t0 = Instant::now();
    let mut s = signed_in(SessionConfig::default(), t0, 0);
    let mut own = user_push(1);
    own.skip_device_id = DEVICE;
    s.on_push(t0, own);
    let mut other = user_push(2);
    other.skip_device_id = DEVICE + 1;
    s.on_push(t0, other);
    assert_eq!(pushed_seqs(&drain(&mut s)), [2]);
    assert_eq!(s.last_delivered_seq(), Seq(2));
}

#[test]
fn pushes_of_another_owner_are_ignored() {
    let t0 = Instant::now();
    let mut s = signed_in(SessionConfig::default(), t0, 0);
    let mut push = user_push(1);
    push.owner_id = USER + 1;
    s.on_push(t0, push);
    assert!(drain(&mut s).is_empty());
}

// ----------------------------------------------------------------- property

/// One step of the simulated world around a session.
#[derive(Debug, Clone)]
enum Op {
    /// The server appends an entry; its push enters the stream.
    Append,
    /// The stream delivers the pending push at this index (reordering).
    Deliver(usize),
    /// The stream delivers a pending push but keeps it (duplicate).
    Duplicate(usize),
    /// The stream breaks: pending pushes from this index on are lost. The
    /// router notices and asks for a resync at once, or (`false`) later.
    Break(usize, bool),
    /// A stale push of an old entry arrives.
    Stale(u64),
    /// The router asks for a resync (a break it noticed late, or a
    /// spurious one).
    Resync,
    /// The outstanding gap sync is answered: served when the list ended at
    /// `head - lag`, but never before the call was made (it is
    /// linearizable), at most `limit` entries; or it fails.
    Answer { lag: u64, limit: u64, fail: bool },
    /// Time passes.
    Tick(u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => Just(Op::Append),
        4 => any::<usize>().prop_map(Op::Deliver),
        1 => any::<usize>().prop_map(Op::Duplicate),
        1 => (any::<usize>(), any::<bool>()).prop_map(|(i, now)| Op::Break(i, now)),
        1 => (0u64..50).prop_map(Op::Stale),
        1 => Just(Op::Resync),
        2 => (0u64..4, 1u64..6, proptest::bool::weighted(0.2))
            .prop_map(|(lag, limit, fail)| Op::Answer { lag, limit, fail }),
        1 => (0u64..3000).prop_map(Op::Tick),
    ]
}

/// The simulated world: the server's list head, the push stream, the time,
/// the one gap sync in flight (id, `after_seq`, head when it was made),
/// whether a break still awaits the router's resync, and everything the
/// client received.
struct World {
    session: Session,
    now: Instant,
    head: u64,
    stream: Vec<u64>,
    sync: Option<(CallId, u64, u64)>,
    resync_owed: bool,
    received: Vec<u64>,
    start: u64,
}

impl World {
    fn new(start: u64, buffer_limit: usize) -> World {
        let now = Instant::now();
        let config = SessionConfig {
            heartbeat_interval: Duration::from_secs(1 << 20),
            max_resync_failures: u32::MAX,
            push_buffer_limit: buffer_limit,
            ..SessionConfig::default()
        };
        let session = signed_in(config, now, start);
        World {
            session,
            now,
            head: start,
            stream: Vec::new(),
            sync: None,
            resync_owed: false,
            received: Vec::new(),
            start,
        }
    }

    /// Collects what the session did and checks the client's view so far:
    /// exactly start+1, start+2, ... with nothing missing or repeated.
    fn collect(&mut self) {
        let actions = drain(&mut self.session);
        self.session.on_written(usize::MAX);
        assert!(!self.session.is_closed(), "session closed: {actions:?}");
        if let Some((id, after)) = sync_call(&actions) {
            assert!(self.sync.is_none(), "at most one gap sync in flight");
            assert_eq!(after, self.session_last_before(&actions), "syncs from the last delivered seq");
            self.sync = Some((id, after, self.head));
        }
        self.received.extend(pushed_seqs(&actions));
        let expected: Vec<u64> = (self.start + 1..=self.start + self.received.len() as u64).collect();
        assert_eq!(self.received, expected, "in order, no gaps, no duplicates");
        assert!(self.received.last().copied().unwrap_or(self.start) <= self.head);
    }

    /// The seq the client had when the actions' sync call was issued: the
    /// last push sent before that call, or what it had before.
    fn session_last_before(&self, actions: &[rim_gateway::Action]) -> u64 {
        let mut last = self.received.last().copied().unwrap_or(self.start);
        for action in actions {
            match action {
                rim_gateway::Action::Send(p) if p.command == Command::Message as i32 => last = p.seq,
                rim_gateway::Action::Call(_) => break,
                _ => {}
            }
        }
        last
    }

    fn answer(&mut self, lag: u64, limit: u64, fail: bool) {
        let Some((id, after, head_at_call)) = self.sync.take() else { return };
        let result = if fail {
            Err(CallError::new(ErrorCode::ErrorUnavailable, "no leader"))
        } else {
            let served_head = self.head.saturating_sub(lag).max(head_at_call).max(after);
            let end = served_head.min(after + limit);
            Ok(sync_reply(after + 1..=end, end < served_head, served_head))
        };
        self.session.on_reply(self.now, id, result);
        self.collect();
    }

    fn apply(&mut self, op: Op) {
        match op {
            Op::Append => {
                self.head += 1;
                self.stream.push(self.head);
            }
            Op::Deliver(i) | Op::Duplicate(i) if !self.stream.is_empty() => {
                let i = i % self.stream.len();
                let seq = self.stream[i];
                if matches!(op, Op::Deliver(_)) {
                    self.stream.remove(i);
                }
                self.session.on_push(self.now, user_push(seq));
            }
            Op::Deliver(_) | Op::Duplicate(_) => {}
            Op::Break(i, resync_now) => {
                self.stream.truncate(i % (self.stream.len() + 1));
                if resync_now {
                    self.session.on_resync_needed(self.now);
                } else {
                    self.resync_owed = true;
                }
            }
            Op::Stale(back) => {
                let seq = self.head.saturating_sub(back);
                if seq > 0 {
                    self.session.on_push(self.now, user_push(seq));
                }
            }
            Op::Resync => {
                self.resync_owed = false;
                self.session.on_resync_needed(self.now);
            }
            Op::Answer { lag, limit, fail } => self.answer(lag, limit, fail),
            Op::Tick(ms) => {
                self.now += Duration::from_millis(ms);
                self.session.on_tick(self.now);
            }
        }
        self.collect();
    }

    /// The stream delivers what it still holds, the router makes the resync
    /// it still owes (if any), and syncs are answered fully until the
    /// session is idle: the client must then have the whole list.
    fn settle(&mut self) {
        for seq in std::mem::take(&mut self.stream) {
            self.session.on_push(self.now, user_push(seq));
            self.collect();
        }
        if self.resync_owed {
            self.session.on_resync_needed(self.now);
            self.collect();
        }
        for _ in 0..1000 {
            if self.sync.is_some() {
                self.answer(0, 50, false);
            } else if self.session.is_resyncing() {
                self.now += self.session.config().resync_retry_delay;
                self.session.on_tick(self.now);
                self.collect();
            } else {
                break;
            }
        }
        assert!(!self.session.is_resyncing());
        assert_eq!(self.received, (self.start + 1..=self.head).collect::<Vec<_>>());
    }
}

fn run(start: u64, buffer_limit: usize, ops: Vec<Op>) {
    let mut world = World::new(start, buffer_limit);
    for op in ops {
        world.apply(op);
    }
    world.settle();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1024, ..ProptestConfig::default() })]

    /// Short histories: the last events (a break, a stale sync answer) are
    /// not papered over by later pushes.
    #[test]
    fn every_seq_reaches_the_client_exactly_once_in_order(
        start in 0u64..5,
        buffer_limit in 1usize..8,
        ops in proptest::collection::vec(op(), 0..40),
    ) {
        run(start, buffer_limit, ops);
    }

    /// Long histories: many overlapping gaps, overflows and retries.
    #[test]
    fn every_seq_reaches_the_client_exactly_once_in_order_long(
        start in 0u64..5,
        buffer_limit in 1usize..8,
        ops in proptest::collection::vec(op(), 100..400),
    ) {
        run(start, buffer_limit, ops);
    }
}
