//! Sessions and push checks (`im::presence`): `device.online` only when a
//! device was offline, `device.offline` only after the grace with no new
//! session, `push.needed` once per unacknowledged message and device, and
//! `FireDue` idempotent, and the sessions of a vanished gateway taken
//! offline by `GatewayGone`.

mod common;

use common::*;
use openraft::storage::RaftStateMachine;
use rim_proto::store::{self, DueKind, EventRecord, op::Op as O, op_result::Value as V};
use rim_raft_store::{Limits, Reader};

const A: u64 = 101;
const B: u64 = 202;
const T0: i64 = 1_700_000_000_000;
const GRACE: i64 = 5_000;
const AFTER: i64 = 20_000;

fn node() -> Node {
    let limits = Limits { offline_grace_ms: GRACE, push_needed_after_ms: AFTER, ..Limits::default() };
    Node::with_limits(&[1], limits)
}

async fn at(n: &mut Node, now_ms: i64, ops: Vec<store::Op>) -> Vec<store::OpResult> {
    let e = n.entry(1, now_ms, ops);
    let mut r = n.sm(1).apply(vec![e]).await.unwrap();
    r.pop().unwrap().0.results
}

fn online(user: u64, device: u64) -> store::Op {
    online_at(user, device, "gw-test")
}

fn online_at(user: u64, device: u64, gateway: &str) -> store::Op {
    op(O::DeviceOnline(store::DeviceOnline { user_id: user, device_id: device, gateway: gateway.into() }))
}

fn gone(gateway: &str, since_ms: i64) -> store::Op {
    op(O::GatewayGone(store::GatewayGone { gateway: gateway.into(), since_ms }))
}

fn offline(user: u64, device: u64, epoch: u64) -> store::Op {
    op(O::DeviceOffline(store::DeviceOffline { user_id: user, device_id: device, epoch, reason: 0 }))
}

fn ack(user: u64, device: u64, seq: u64) -> store::Op {
    op(O::AckSeq(store::AckSeq { user_id: user, device_id: device, seq }))
}

/// What the leader's due task would propose at `now_ms`.
fn fire(r: &Reader, now_ms: i64) -> store::Op {
    op(O::FireDue(store::FireDue { entries: r.due_checks(now_ms, 100).unwrap() }))
}

fn epoch(r: &store::OpResult) -> u64 {
    match &r.value {
        Some(V::Device(d)) => d.session_epoch,
        other => panic!("expected a device, got {other:?} ({})", r.message),
    }
}

fn events(r: &Reader) -> Vec<EventRecord> {
    r.events_after(None, 10_000, usize::MAX).unwrap().events
}

fn of_type(r: &Reader, t: &str) -> Vec<serde_json::Value> {
    events(r).iter().filter(|e| e.r#type == t).map(|e| serde_json::from_slice(&e.body).unwrap()).collect()
}

#[tokio::test]
async fn a_session_goes_offline_only_after_the_grace() {
    let mut n = node();
    at(&mut n, T0, vec![create_user(A), register_device(A, 1)]).await;
    let e1 = epoch(&at(&mut n, T0, vec![online(A, 1)]).await[0]);
    assert_eq!(e1, 1);
    let on = of_type(&n.reader(1), "device.online");
    assert_eq!(on.len(), 1);
    assert_eq!(on[0]["data"]["device_id"], "1");
    assert_eq!(on[0]["data"]["session_epoch"], 1);

    at(&mut n, T0 + 1_000, vec![offline(A, 1, e1)]).await;
    let due = n.reader(1).due_checks(i64::MAX, 10).unwrap();
    assert_eq!(due.len(), 1);
    assert_eq!((due[0].due_ms, due[0].kind()), (T0 + 1_000 + GRACE, DueKind::Offline));
    assert!(
        n.reader(1).due_checks(T0 + 1_000 + GRACE - 1, 10).unwrap().is_empty(),
        "not due before its time"
    );

    // A FireDue proposed early (a leader with a fast clock) changes nothing.
    let early = op(O::FireDue(store::FireDue { entries: due.clone() }));
    at(&mut n, T0 + 1_000 + GRACE - 1, vec![early]).await;
    assert!(of_type(&n.reader(1), "device.offline").is_empty());

    let now = T0 + 1_000 + GRACE;
    let f = fire(&n.reader(1), now);
    at(&mut n, now, vec![f.clone()]).await;
    let off = of_type(&n.reader(1), "device.offline");
    assert_eq!(off.len(), 1);
    assert_eq!(off[0]["data"]["session_epoch"], 1);
    assert_eq!(off[0]["data"]["offline_since_ms"], T0 + 1_000);
    assert!(!n.reader(1).device(A.into(), 1.into()).unwrap().unwrap().online);
    // Proposed twice (a new leader repeating it): nothing more.
    at(&mut n, now + 1, vec![f]).await;
    assert_eq!(of_type(&n.reader(1), "device.offline").len(), 1);
    assert!(n.reader(1).due_checks(i64::MAX, 10).unwrap().is_empty());

    // Back online: a new session, a new event.
    let e2 = epoch(&at(&mut n, now + 2, vec![online(A, 1)]).await[0]);
    assert_eq!(e2, 2);
    assert_eq!(of_type(&n.reader(1), "device.online").len(), 2);
}

#[tokio::test]
async fn a_quick_reconnect_or_a_stale_close_is_no_offline() {
    let mut n = node();
    at(&mut n, T0, vec![create_user(A), register_device(A, 1)]).await;
    let e1 = epoch(&at(&mut n, T0, vec![online(A, 1)]).await[0]);
    at(&mut n, T0 + 100, vec![offline(A, 1, e1)]).await;
    // Reconnects within the grace: the check goes away, no event.
    let e2 = epoch(&at(&mut n, T0 + 200, vec![online(A, 1)]).await[0]);
    assert!(e2 > e1);
    assert!(n.reader(1).due_checks(i64::MAX, 10).unwrap().is_empty());
    // A second connection, then the first one's close arrives late: the
    // newer session stays.
    let e3 = epoch(&at(&mut n, T0 + 300, vec![online(A, 1)]).await[0]);
    at(&mut n, T0 + 400, vec![offline(A, 1, e2)]).await;
    assert!(n.reader(1).due_checks(i64::MAX, 10).unwrap().is_empty(), "a stale close is ignored");
    let f = fire(&n.reader(1), T0 + 100 + GRACE);
    at(&mut n, T0 + 100 + GRACE, vec![f]).await;
    assert_eq!(of_type(&n.reader(1), "device.online").len(), 1, "one presence throughout");
    assert!(of_type(&n.reader(1), "device.offline").is_empty());
    assert!(n.reader(1).device(A.into(), 1.into()).unwrap().unwrap().online);
    // The current session's close does count.
    at(&mut n, T0 + 500, vec![offline(A, 1, e3)]).await;
    let f = fire(&n.reader(1), T0 + 500 + GRACE);
    at(&mut n, T0 + 500 + GRACE, vec![f]).await;
    assert_eq!(of_type(&n.reader(1), "device.offline").len(), 1);
    // An unknown device is refused with a stable code.
    let r = at(&mut n, T0, vec![online(A, 9)]).await;
    assert_eq!(code(&r[0]), rim_proto::ErrorCode::ErrorDeviceNotFound);
}

#[tokio::test]
async fn push_needed_covers_each_unacknowledged_message_once_per_device() {
    let mut n = node();
    at(&mut n, T0, vec![create_user(A), create_user(B), register_device(B, 1), register_device(B, 2)]).await;
    at(&mut n, T0, vec![register_device(B, 3)]).await;
    at(&mut n, T0, vec![op(O::RevokeDevice(store::RevokeDevice { user_id: B, device_id: 3 }))]).await;
    // B's own send arms nothing; A's two messages arm one check.
    at(&mut n, T0, vec![send(B, A, "b1", "mine")]).await;
    assert!(n.reader(1).due_checks(i64::MAX, 10).unwrap().iter().all(|d| d.user_id != B));
    at(&mut n, T0 + 10, vec![send(A, B, "a1", "one")]).await;
    at(&mut n, T0 + 20, vec![send(A, B, "a2", "two")]).await;
    let due: Vec<_> =
        n.reader(1).due_checks(i64::MAX, 10).unwrap().into_iter().filter(|d| d.user_id == B).collect();
    assert_eq!(due.len(), 1, "one pending check per user: {due:?}");
    assert_eq!((due[0].due_ms, due[0].kind()), (T0 + 10 + AFTER, DueKind::Push));
    // Device 1 acks everything in time; device 2 acks nothing; device 3 is
    // signed out.
    at(&mut n, T0 + 30, vec![ack(B, 1, 3)]).await;
    let now = T0 + 10 + AFTER;
    let f = fire(&n.reader(1), now);
    at(&mut n, now, vec![f.clone()]).await;
    let push = of_type(&n.reader(1), "push.needed");
    assert_eq!(push.len(), 1, "device 2 only: {push:?}");
    let d = &push[0]["data"];
    assert_eq!((d["user_id"].as_str(), d["device_id"].as_str()), (Some("202"), Some("2")));
    assert_eq!(
        (d["ack_seq"].as_u64(), d["from_seq"].as_u64(), d["to_seq"].as_u64()),
        (Some(0), Some(1), Some(3))
    );
    assert_eq!(d["last_sender_user_id"], A.to_string());
    assert_eq!(d["last_conversation_id"], A.to_string(), "the peer of B's 1:1 conversation");
    at(&mut n, now + 1, vec![f]).await;
    assert_eq!(of_type(&n.reader(1), "push.needed").len(), 1, "FireDue is idempotent");

    // A third message: device 2 is told only about it; device 1, which
    // acked the earlier ones, is behind now too.
    at(&mut n, now + 100, vec![send(A, B, "a3", "three")]).await;
    let f = fire(&n.reader(1), now + 100 + AFTER);
    at(&mut n, now + 100 + AFTER, vec![f]).await;
    let push = of_type(&n.reader(1), "push.needed");
    assert_eq!(push.len(), 3, "{push:?}");
    let ranges: Vec<_> = push[1..]
        .iter()
        .map(|p| {
            let d = &p["data"];
            (
                d["device_id"].as_str().unwrap().to_string(),
                d["from_seq"].as_u64().unwrap(),
                d["to_seq"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(ranges, [("1".to_string(), 4, 4), ("2".to_string(), 4, 4)]);

    // Acked in time: no event.
    at(&mut n, now + 200, vec![send(A, B, "a4", "four")]).await;
    at(&mut n, now + 300, vec![ack(B, 1, 5), ack(B, 2, 5)]).await;
    let f = fire(&n.reader(1), now + 200 + AFTER);
    at(&mut n, now + 200 + AFTER, vec![f]).await;
    assert_eq!(of_type(&n.reader(1), "push.needed").len(), 3);
    assert!(n.reader(1).due_checks(i64::MAX, 10).unwrap().is_empty());
}

#[tokio::test]
async fn checks_can_be_switched_off_by_the_replicated_limits() {
    let limits = Limits { presence_events: false, push_needed_after_ms: 0, ..Limits::default() };
    let mut n = Node::with_limits(&[1], limits);
    at(&mut n, T0, vec![create_user(A), create_user(B), register_device(B, 1)]).await;
    let e = epoch(&at(&mut n, T0, vec![online(B, 1)]).await[0]);
    at(&mut n, T0, vec![send(A, B, "a1", "one"), offline(B, 1, e)]).await;
    let due = n.reader(1).due_checks(i64::MAX, 10).unwrap();
    assert_eq!(due.len(), 1, "sessions are still tracked, push checks are not: {due:?}");
    let f = fire(&n.reader(1), i64::MAX);
    at(&mut n, T0 + 100_000, vec![f]).await;
    assert!(!n.reader(1).device(B.into(), 1.into()).unwrap().unwrap().online);
    let types: Vec<String> = events(&n.reader(1)).into_iter().map(|e| e.r#type).collect();
    assert_eq!(types, ["message.created"]);
}

#[tokio::test]
async fn the_sessions_of_a_vanished_gateway_go_offline_and_no_others() {
    let mut n = node();
    let mut setup = vec![create_user(A)];
    setup.extend((1..=4).map(|d| register_device(A, d)));
    at(&mut n, T0, setup).await;
    at(&mut n, T0, vec![online_at(A, 1, "gw-a"), online_at(A, 2, "gw-b"), online_at(A, 3, "gw-a")]).await;
    let e4 = epoch(&at(&mut n, T0, vec![online_at(A, 4, "gw-a")]).await[0]);
    // Device 3 moves to gw-b; device 4's connection closes (its offline is
    // pending in the grace).
    at(&mut n, T0 + 10, vec![online_at(A, 3, "gw-b"), offline(A, 4, e4)]).await;
    assert_eq!(n.reader(1).session_gateways(10).unwrap(), ["gw-a", "gw-b"]);
    assert_eq!(n.reader(1).session_gateways(1).unwrap(), ["gw-a"], "bounded by the limit");

    at(&mut n, T0 + 100, vec![gone("gw-a", T0 + 50)]).await;
    let off = of_type(&n.reader(1), "device.offline");
    let mut devices: Vec<_> =
        off.iter().map(|e| e["data"]["device_id"].as_str().unwrap().to_owned()).collect();
    devices.sort();
    assert_eq!(devices, ["1", "4"], "the sessions still at gw-a, closing or not");
    assert!(off.iter().all(|e| e["data"]["offline_since_ms"] == T0 + 50));
    let r = n.reader(1);
    assert!(!r.device(A.into(), 1.into()).unwrap().unwrap().online);
    assert!(r.device(A.into(), 3.into()).unwrap().unwrap().online, "moved to gw-b: left alone");
    assert!(r.device(A.into(), 2.into()).unwrap().unwrap().online);
    assert!(r.due_checks(i64::MAX, 10).unwrap().is_empty(), "device 4's pending check is dropped");
    assert_eq!(r.session_gateways(10).unwrap(), ["gw-b"]);

    // Proposed again (a retry, a new leader): nothing more.
    at(&mut n, T0 + 200, vec![gone("gw-a", T0 + 50)]).await;
    assert_eq!(of_type(&n.reader(1), "device.offline").len(), 2);

    // The ordinary way out removes the session entry too.
    let e2 = n.reader(1).device(A.into(), 2.into()).unwrap().unwrap().session_epoch;
    let e3 = n.reader(1).device(A.into(), 3.into()).unwrap().unwrap().session_epoch;
    at(&mut n, T0 + 300, vec![offline(A, 2, e2), offline(A, 3, e3)]).await;
    let now = T0 + 300 + GRACE;
    let f = fire(&n.reader(1), now);
    at(&mut n, now, vec![f]).await;
    assert_eq!(of_type(&n.reader(1), "device.offline").len(), 4);
    assert!(n.reader(1).session_gateways(10).unwrap().is_empty());
}

#[tokio::test]
async fn a_gateway_id_is_bounded() {
    let mut n = node();
    at(&mut n, T0, vec![create_user(A), register_device(A, 1)]).await;
    let long = "g".repeat(rim_raft_store::keys::MAX_GATEWAY_LEN + 1);
    let r = at(&mut n, T0, vec![online_at(A, 1, &long), gone("", 0)]).await;
    assert_eq!(r[0].code, rim_proto::ErrorCode::ErrorBadRequest as i32, "{}", r[0].message);
    assert_eq!(r[1].code, rim_proto::ErrorCode::ErrorBadRequest as i32, "{}", r[1].message);
    assert!(!n.reader(1).device(A.into(), 1.into()).unwrap().unwrap().online);
}
