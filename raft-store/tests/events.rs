//! Events produced at apply (`im::events`): exactly one per fact, ids from
//! the log position, nothing for rejected or deduplicated operations, and
//! the delivery state (cursors, dead letters, trimming).

mod common;

use common::*;
use openraft::storage::RaftStateMachine;
use rim_proto::store::{self, EventRecord, GroupKind, op::Op as O};
use rim_raft_store::{Limits, Reader};

const A: u64 = 101;
const B: u64 = 202;
const C: u64 = 303;

fn events(r: &Reader) -> Vec<EventRecord> {
    r.events_after(None, 10_000, usize::MAX).unwrap().events
}

fn json(e: &EventRecord) -> serde_json::Value {
    serde_json::from_slice(&e.body).unwrap()
}

fn types(r: &Reader) -> Vec<String> {
    events(r).iter().map(|e| e.r#type.clone()).collect()
}

#[tokio::test]
async fn one_event_per_send_named_by_its_log_position() {
    let mut n = Node::new(&[1]);
    n.apply(1, vec![create_user(A), create_user(B)]).await; // index 1
    let first = sent(&n.apply1(1, send(A, B, "m1", "hello")).await); // index 2
    let second = sent(&n.apply1(1, send(B, A, "m2", "back")).await); // index 3
    let got = events(&n.reader(1));
    assert_eq!(got.len(), 2, "one event per message, same-shard pair: {got:?}");
    assert_eq!(got[0].event_id, "evt_1_2_0");
    assert_eq!(got[1].event_id, "evt_1_3_0");
    for (e, s) in got.iter().zip([&first, &second]) {
        let j = json(e);
        assert_eq!(j["type"], "message.created");
        assert_eq!(j["event_id"], e.event_id.as_str());
        assert_eq!(j["data"]["message_id"], s.message_id.to_string());
        assert_eq!(e.created_ms, 1_700_000_000_000, "the proposal's time");
        assert_eq!(j["timestamp"], "2023-11-14T22:13:20.000Z");
        assert_eq!(e.conversation, format!("u:{A}:{B}"));
    }
    assert_eq!(json(&got[0])["data"]["content"], "aGVsbG8=", "content in base64");

    // A retry writes nothing, so no event; a rejected op leaves none and
    // does not use up an ordinal.
    n.apply1(1, send(A, B, "m1", "hello")).await;
    let res = n.apply(1, vec![send(C, A, "bad", "no such sender"), send(A, B, "m3", "x")]).await;
    assert_ne!(code(&res[0]), rim_proto::ErrorCode::Ok);
    let got = events(&n.reader(1));
    assert_eq!(got.len(), 3);
    assert_eq!(got[2].event_id, "evt_1_5_0", "index 5, ordinal 0 despite the rejected op before it");
}

#[tokio::test]
async fn a_cross_shard_pair_emits_on_the_lower_users_shard_once() {
    // A (lower id) lives in shard 1, B in shard 2.
    let mut n = Node::new(&[1, 2]);
    n.apply1(1, create_user(A)).await;
    n.apply1(2, create_user(B)).await;
    n.apply1(1, send(A, B, "a1", "to B")).await;
    n.apply1(2, send(B, A, "b1", "to A")).await;
    assert_eq!(types(&n.reader(1)), ["message.created"], "A's send: on A's shard at once");
    assert!(types(&n.reader(2)).is_empty(), "B's send to the lower A: not on B's shard");

    // The relay delivers B's message into A's list: the event appears there,
    // once, however often the delivery is retried.
    let rec = n.reader(2).outbox(0, 10).unwrap().remove(0);
    let deliver = op(O::Deliver(store::Deliver { items: vec![rec] }));
    n.apply1(1, deliver.clone()).await;
    n.apply1(1, deliver).await;
    let got = events(&n.reader(1));
    assert_eq!(got.len(), 2);
    assert_eq!(json(&got[1])["data"]["sender_user_id"], B.to_string());
    assert_eq!(got[1].conversation, got[0].conversation, "one conversation key for both directions");
    // The copy relayed from A to B emits nothing on B's shard.
    let rec = n.reader(1).outbox(0, 10).unwrap().remove(0);
    n.apply1(2, op(O::Deliver(store::Deliver { items: vec![rec] }))).await;
    assert!(types(&n.reader(2)).is_empty());
}

#[tokio::test]
async fn group_changes_and_messages_emit_on_the_groups_shard() {
    let mut n = Node::new(&[1]);
    n.apply(1, vec![create_user(A), create_user(B)]).await;
    n.apply1(1, create_group(7, GroupKind::Small, A, &[B])).await;
    let s = sent(&n.apply1(1, send_group(7, B, "g1", "hi all")).await);
    let got = events(&n.reader(1));
    let kinds: Vec<&str> = got.iter().map(|e| e.r#type.as_str()).collect();
    assert_eq!(kinds, ["group.created", "group.members_added", "message.created"]);
    assert_eq!(got[0].ordinal, 0);
    assert_eq!(got[1].ordinal, 1, "two events of one op: consecutive ordinals");
    let m = json(&got[2]);
    assert_eq!(m["data"]["group_id"], "7");
    assert_eq!(m["data"]["group_seq"], s.group_seq);
    assert_eq!(got[2].conversation, "g:7");
}

#[tokio::test]
async fn events_off_in_the_limits_produce_nothing() {
    let mut n = Node::with_limits(&[1], Limits { events: false, ..Limits::default() });
    n.apply(1, vec![create_user(A), create_user(B)]).await;
    n.apply1(1, send(A, B, "m1", "hello")).await;
    assert!(events(&n.reader(1)).is_empty());
}

#[tokio::test]
async fn cursors_move_forward_dead_letters_copy_and_trim_respects_retention() {
    let day = Limits::default().event_retention_ms;
    let mut n = Node::new(&[1]);
    n.apply(1, vec![create_user(A), create_user(B)]).await;
    for i in 0..3 {
        n.apply1(1, send(A, B, &format!("m{i}"), "x")).await; // indexes 2, 3, 4
    }
    let advance = |index| {
        op(O::AdvanceEventCursor(store::AdvanceEventCursor { endpoint: "crm".into(), index, ordinal: 0 }))
    };
    n.apply1(1, advance(3)).await;
    n.apply1(1, advance(2)).await;
    assert_eq!(n.reader(1).event_cursor("crm").unwrap(), Some((3, 0)), "never backwards");
    let bad = n.apply1(1, advance_named("", 4)).await;
    assert_eq!(code(&bad), rim_proto::ErrorCode::ErrorBadRequest);

    let dead =
        store::DeadLetterEvent { endpoint: "crm".into(), index: 4, ordinal: 0, reason: "HTTP 500".into() };
    n.apply1(1, op(O::DeadLetterEvent(dead))).await;
    let r = n.reader(1);
    assert_eq!(r.event_cursor("crm").unwrap(), Some((4, 0)), "the cursor passes a dead letter");
    let letters = r.dead_letters(0, 10).unwrap();
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].1.event.as_ref().unwrap().event_id, "evt_1_4_0");

    // Trim up to index 3: nothing is old enough yet.
    let trim = |index| op(O::TrimEvents(store::TrimEvents { index, ordinal: 0 }));
    n.apply1(1, trim(3)).await;
    assert_eq!(events(&n.reader(1)).len(), 3);
    // A day later: events at or before index 3 go, index 4 stays, and the
    // dead letter (dead a day ago) goes too.
    let e = n.entry(1, 1_700_000_000_000 + day, vec![trim(3)]);
    n.sm(1).apply(vec![e]).await.unwrap();
    let left: Vec<String> = events(&n.reader(1)).iter().map(|e| e.event_id.clone()).collect();
    assert_eq!(left, ["evt_1_4_0"]);
    assert!(n.reader(1).dead_letters(0, 10).unwrap().is_empty());
}

fn advance_named(endpoint: &str, index: u64) -> store::Op {
    op(O::AdvanceEventCursor(store::AdvanceEventCursor { endpoint: endpoint.into(), index, ordinal: 0 }))
}

#[tokio::test]
async fn replicas_applying_the_same_log_hold_identical_events() {
    let mut one = Node::new(&[1]);
    let mut two = Node::new(&[1]);
    for n in [&mut one, &mut two] {
        n.apply(1, vec![create_user(A), create_user(B), create_user(C)]).await;
        n.apply(1, vec![send(A, B, "m1", "x"), send(C, A, "m2", "y"), send(B, C, "m3", "z")]).await;
        n.apply1(1, create_group(9, GroupKind::Super, A, &[B, C])).await;
    }
    assert_eq!(events(&one.reader(1)), events(&two.reader(1)));
    assert_eq!(one.reader(1).digest().unwrap(), two.reader(1).digest().unwrap());
    assert_eq!(events(&one.reader(1)).len(), 5);
}
