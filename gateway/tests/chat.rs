//! Chat through the gateway end to end, on both transports (and mixed):
//! every device of both users gets each entry of its user's list once and
//! in seq order; an offline device catches up by syncing; a second sign-in
//! of a device kicks the first without disturbing the second.
#![allow(missing_docs)]

use std::time::Instant;

use prost::Message as _;
use rim_gateway::SessionConfig;
use rim_proto::ErrorCode;
use rim_proto::ids::{DeviceId, UserId};
use rim_proto::v1::*;

mod cluster;
mod e2e;
use cluster::{Cluster, register, serial, wait_for};
use e2e::{Gateway, Kind, WAIT, another_device, consecutive};

/// Alice and Bob, two devices each, on the transports `kinds` (alice's
/// first, alice's second, bob's first, bob's second), chat: each device
/// gets its user's list, seq 1 to 5, exactly once and in order — the
/// receiver's devices and the sender's second device, and the sending
/// device itself (the node does not skip it).
async fn two_users_chat(kinds: [Kind; 4]) {
    let _g = serial().await;
    let c = Cluster::start(3, 2).await;
    let alice = register(&c, "alice").await;
    let alice2 = another_device(&c, "alice").await;
    let bob = register(&c, "bob").await;
    let bob2 = another_device(&c, "bob").await;
    let gw = Gateway::start(c.seeds(), SessionConfig::default()).await;

    let (mut a1, out) = gw.signed_in(kinds[0], &alice).await;
    assert_eq!((out.user_id, out.device_id, out.last_seq), (alice.user, alice.device, 0));
    let (mut a2, _) = gw.signed_in(kinds[1], &alice2).await;
    let (mut b1, _) = gw.signed_in(kinds[2], &bob).await;
    let (mut b2, out) = gw.signed_in(kinds[3], &bob2).await;
    assert_eq!((out.user_id, out.device_id, out.last_seq), (bob.user, bob2.device, 0));
    assert_eq!(gw.router.user_conns(UserId(alice.user)).len(), 2);
    assert_eq!(gw.router.user_conns(UserId(bob.user)).len(), 2);

    // Both lists hold the same entries in the same order: seq i is cmids[i-1].
    let script = [(true, "a-1"), (true, "a-2"), (false, "b-1"), (true, "a-3"), (false, "b-2")];
    let mut ids = Vec::new();
    for (i, (from_alice, cmid)) in script.iter().enumerate() {
        let out = if *from_alice {
            a1.send_text(bob.user, cmid).await
        } else {
            b1.send_text(alice.user, cmid).await
        };
        assert_eq!(out.seq, i as u64 + 1, "{cmid}: its seq in the sender's own list");
        ids.push(out.message_id);
    }
    let cmids: Vec<&str> = script.iter().map(|(_, c)| *c).collect();
    for (name, client) in [("alice 1", &mut a1), ("alice 2", &mut a2), ("bob 1", &mut b1), ("bob 2", &mut b2)]
    {
        let got = client.pushes_through(5).await;
        assert_eq!(consecutive(&got, 1), cmids, "{name} ({:?})", client.kind);
        let got_ids: Vec<u64> = got.iter().map(|m| m.message_id).collect();
        assert_eq!(got_ids, ids, "{name}: the same entries");
        // A round trip after the last push: no further (duplicate) push.
        assert_eq!(client.heartbeat().await.code, ErrorCode::Ok as i32);
        assert!(client.unread_pushes().is_empty(), "{name}: {:?}", client.unread_pushes());
    }
    let m = &b2.sync_all(0, 10).await;
    assert_eq!(consecutive(m, 1), cmids, "the stored list agrees");
    gw.shutdown().await;
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_two_users_chat_every_device_gets_each_entry_once_in_order() {
    two_users_chat([Kind::Tcp; 4]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ws_two_users_chat_every_device_gets_each_entry_once_in_order() {
    two_users_chat([Kind::Ws; 4]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_transports_chat_every_device_gets_each_entry_once_in_order() {
    two_users_chat([Kind::Ws, Kind::Tcp, Kind::Tcp, Kind::Ws]).await;
}

/// Bob's device gets two messages, acknowledges them, goes offline while
/// five more arrive, reconnects (on `kind`) and syncs from its last seq in
/// pages of two: exactly the five it missed, in order; later messages are
/// pushed, none of the synced ones twice.
async fn offline_device_syncs_on_reconnect(kind: Kind) {
    let _g = serial().await;
    let c = Cluster::start(3, 2).await;
    let alice = register(&c, "alice").await;
    let bob = register(&c, "bob").await;
    let gw = Gateway::start(c.seeds(), SessionConfig::default()).await;
    let (mut a, _) = gw.signed_in(Kind::Tcp, &alice).await;

    let (mut b, _) = gw.signed_in(kind, &bob).await;
    a.send_text(bob.user, "m1").await;
    a.send_text(bob.user, "m2").await;
    assert_eq!(consecutive(&b.pushes_through(2).await, 1), ["m1", "m2"]);
    let ack = b.request(Command::Ack, AckInput { seq: 2 }.encode_to_vec()).await;
    assert_eq!(ack.code, ErrorCode::Ok as i32, "{}", ack.message);
    assert_eq!(AckOutput::decode(ack.data).unwrap().ack_seq, 2);
    let last = 2;
    drop(b);
    wait_for(WAIT, || gw.router.device_conn(UserId(bob.user), DeviceId(bob.device)).is_none().then_some(()))
        .await;

    let missed: Vec<String> = (3..=7).map(|i| format!("m{i}")).collect();
    for cmid in &missed {
        a.send_text(bob.user, cmid).await;
    }

    let (mut b, out) = gw.signed_in(kind, &bob).await;
    assert_eq!((out.last_seq, out.ack_seq), (7, 2), "the list's end and the stored cursor");
    let synced = b.sync_all(last, 2).await;
    assert_eq!(consecutive(&synced, last + 1), missed, "none missing, none twice");

    a.send_text(bob.user, "m8").await;
    let pushed = b.pushes_through(8).await;
    assert_eq!(consecutive(&pushed, 8), ["m8"], "only what came after the sign-in is pushed");
    assert_eq!(b.heartbeat().await.code, ErrorCode::Ok as i32);
    assert!(b.unread_pushes().is_empty(), "{:?}", b.unread_pushes());
    // Syncing again is idempotent.
    assert_eq!(consecutive(&b.sync_all(last, 100).await, last + 1).len(), 6);
    gw.shutdown().await;
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_offline_device_syncs_what_it_missed_on_reconnect() {
    offline_device_syncs_on_reconnect(Kind::Tcp).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ws_offline_device_syncs_what_it_missed_on_reconnect() {
    offline_device_syncs_on_reconnect(Kind::Ws).await;
}

/// Bob's device signs in on `first`, then again on `second`: the first
/// gets a KICK with ERROR_KICKED and is closed; once it is gone (and its
/// client closed its socket too) the second still gets every push.
async fn second_sign_in_kicks_the_first(first: Kind, second: Kind) {
    let _g = serial().await;
    let c = Cluster::start(3, 2).await;
    let alice = register(&c, "alice").await;
    let bob = register(&c, "bob").await;
    let gw = Gateway::start(c.seeds(), SessionConfig::default()).await;
    let (mut a, _) = gw.signed_in(Kind::Tcp, &alice).await;

    let (mut old, _) = gw.signed_in(first, &bob).await;
    a.send_text(bob.user, "before").await;
    assert_eq!(old.push(1).await.client_msg_id, "before");
    let old_conn = gw.router.device_conn(UserId(bob.user), DeviceId(bob.device)).unwrap();

    let (mut new, out) = gw.signed_in(second, &bob).await;
    assert_eq!(out.last_seq, 1);
    let new_conn = gw.router.device_conn(UserId(bob.user), DeviceId(bob.device)).unwrap();
    assert_ne!(new_conn, old_conn);

    let (code, packets) = old.closed_within(WAIT).await;
    let kicks: Vec<&Packet> = packets.iter().filter(|p| p.command == Command::Kick as i32).collect();
    assert_eq!(kicks.len(), 1, "one KICK: {packets:?}");
    assert_eq!(kicks[0].request_id, 0);
    let kick = KickPush::decode(kicks[0].content.clone()).unwrap();
    assert_eq!(kick.code, ErrorCode::ErrorKicked as i32, "{}", kick.reason);
    assert_eq!(packets.last().map(|p| p.command), Some(Command::Kick as i32), "the KICK comes last");
    if first == Kind::Ws {
        assert_eq!(code, Some(1008), "policy close");
    }
    drop(old);

    // The old connection's end (unregister, offline notice) left the new
    // one's route alone: it keeps getting every push.
    assert_eq!(gw.router.user_conns(UserId(bob.user)), [new_conn]);
    for (seq, cmid) in [(2, "after-1"), (3, "after-2"), (4, "after-3")] {
        a.send_text(bob.user, cmid).await;
        assert_eq!(new.push(seq).await.client_msg_id, cmid);
    }
    assert_eq!(new.heartbeat().await.code, ErrorCode::Ok as i32);
    assert_eq!(gw.router.device_conn(UserId(bob.user), DeviceId(bob.device)), Some(new_conn));
    assert_eq!(gw.router.stats().kicks, 1);
    let started = Instant::now();
    gw.shutdown().await;
    assert!(started.elapsed() < WAIT);
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_then_ws_second_sign_in_of_a_device_kicks_the_first() {
    second_sign_in_kicks_the_first(Kind::Tcp, Kind::Ws).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ws_then_tcp_second_sign_in_of_a_device_kicks_the_first() {
    second_sign_in_kicks_the_first(Kind::Ws, Kind::Tcp).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_then_tcp_second_sign_in_of_a_device_kicks_the_first() {
    second_sign_in_kicks_the_first(Kind::Tcp, Kind::Tcp).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ws_then_ws_second_sign_in_of_a_device_kicks_the_first() {
    second_sign_in_kicks_the_first(Kind::Ws, Kind::Ws).await;
}
