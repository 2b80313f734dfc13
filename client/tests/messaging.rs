//! The SDK end to end against a real in-process 3-node cluster and a real
//! gateway, over TCP and WebSocket: chatting between multi-device users,
//! catching up after being offline, and idempotent send retries.
#![allow(missing_docs)]

mod support;

use std::collections::HashSet;
use std::time::Duration;

use rim_client::{Event, Resume, new_client_msg_id};
use rim_proto::ids::Seq;
use rim_proto::v1::{ContentType, ConversationKind, SendInput};
use support::proxy::PacketProxy;
use support::{Kind, another_device, api, cluster, config, connect, endpoint, register, serial};

/// Alice (two devices) and Bob (two devices) chat. Every device gets every
/// entry of its user's list exactly once, in seq order; a sender's other
/// device gets its own sent messages too, and so does the sending device.
async fn two_users_chat(kind: Kind) {
    let _serial = serial().await;
    let cluster = cluster().await;
    let gw = cluster.gateway("gw-chat").await;
    let api = api(&cluster);
    let (alice_name, alice1) = register(&api, "alice").await;
    let alice2 = another_device(&api, &alice_name).await;
    let (bob_name, bob1) = register(&api, "bob").await;
    let bob2 = another_device(&api, &bob_name).await;
    let (alice_id, bob_id) = (alice1.user_id, bob1.user_id);

    let gateways = vec![endpoint(&gw, kind)];
    // Alice's sending device and Bob's second device have tiny queues: as
    // nobody reads their events during the sends, pushes are shed and
    // synced later (in pages of 3), while SEND replies still get through.
    let mut small = config(gateways.clone());
    small.event_queue = 2;
    small.push_buffer = 2;
    small.sync_page = 3;
    let (a1, mut a1_in) = connect("alice1", small.clone(), alice1);
    let (a2, mut a2_in) = connect("alice2", config(gateways.clone()), alice2);
    let (b1, mut b1_in) = connect("bob1", config(gateways.clone()), bob1);
    let (b2, mut b2_in) = connect("bob2", small, bob2);
    for inbox in [&mut a1_in, &mut a2_in, &mut b1_in, &mut b2_in] {
        inbox.wait_synced_after_connect(1).await;
    }

    // Interleaved sends both ways; each side's sends are sequential, the two
    // sides run concurrently.
    let n = 12;
    let alice_sends = async {
        let mut outs = Vec::new();
        for i in 0..n {
            outs.push(a1.send(bob_id, ContentType::Text, format!("a{i}")).await.unwrap());
        }
        outs
    };
    let bob_sends = async {
        let mut outs = Vec::new();
        for i in 0..n {
            outs.push(b1.send(alice_id, ContentType::Text, format!("b{i}")).await.unwrap());
        }
        outs
    };
    let (alice_outs, bob_outs) = tokio::join!(alice_sends, bob_sends);
    // Each SendOutput.seq is the entry's seq in the sender's own list.
    let alice_seqs: HashSet<u64> = alice_outs.iter().map(|o| o.seq).collect();
    assert_eq!(alice_seqs.len(), n);

    let total = 2 * n;
    for inbox in [&mut a1_in, &mut a2_in, &mut b1_in, &mut b2_in] {
        inbox.wait_messages(total).await;
        inbox.assert_in_order_once();
        assert_eq!(inbox.seqs(), (1..=total as u64).collect::<Vec<_>>(), "{}", inbox.name);
        // Each side's own messages appear in the order they were sent.
        let texts = inbox.texts();
        let mine: Vec<&String> = texts.iter().filter(|t| t.starts_with('a')).collect();
        let expected: Vec<String> = (0..n).map(|i| format!("a{i}")).collect();
        assert_eq!(mine, expected.iter().collect::<Vec<_>>(), "{}", inbox.name);
    }
    // Both of Alice's devices hold her own sends at the seqs SEND reported.
    for inbox in [&a1_in, &a2_in] {
        let own: HashSet<u64> =
            inbox.messages().iter().filter(|m| m.sender_user_id == alice_id.0).map(|m| m.seq).collect();
        assert_eq!(own, alice_seqs, "{}", inbox.name);
    }
    // The message ids agree between sender and receiver.
    let bob_got: HashSet<u64> =
        b2_in.messages().iter().filter(|m| m.sender_user_id == alice_id.0).map(|m| m.message_id).collect();
    let alice_sent: HashSet<u64> = alice_outs.iter().map(|o| o.message_id).collect();
    assert_eq!(bob_got, alice_sent);
    assert!(bob_outs.iter().all(|o| o.seq > 0 && o.message_id > 0));

    for client in [&a1, &a2, &b1, &b2] {
        client.close().await;
    }
    b1_in.wait_ended().await;
    assert_eq!(b1_in.count(|e| matches!(e, Event::Disconnected { .. })), 0);
    gw.shutdown().await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_users_chat_over_tcp() {
    two_users_chat(Kind::Tcp).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_users_chat_over_ws() {
    two_users_chat(Kind::Ws).await;
}

/// A device that was closed while messages arrived gets all of them on its
/// next start (from its ack cursor, acknowledged on close), none twice.
async fn offline_device_catches_up(kind: Kind) {
    let _serial = serial().await;
    let cluster = cluster().await;
    let gw = cluster.gateway("gw-offline").await;
    let api = api(&cluster);
    let (_, alice) = register(&api, "alice").await;
    let (_, bob) = register(&api, "bob").await;
    let bob_id = bob.user_id;
    let gateways = vec![endpoint(&gw, kind)];

    let (a, mut a_in) = connect("alice", config(gateways.clone()), alice);
    let (b, mut b_in) = connect("bob", config(gateways.clone()), bob.clone());
    a_in.wait_synced_after_connect(1).await;
    b_in.wait_synced_after_connect(1).await;
    for i in 0..3 {
        a.send(bob_id, ContentType::Text, format!("m{i}")).await.unwrap();
    }
    b_in.wait_messages(3).await;
    b.close().await; // acknowledges seq 3
    b_in.wait_ended().await;
    assert_eq!(b_in.seqs(), [1, 2, 3]);

    // Bob is offline: these go to his list only.
    for i in 3..20 {
        a.send(bob_id, ContentType::Text, format!("m{i}")).await.unwrap();
    }
    let (b, mut b_in) = connect("bob again", config(gateways.clone()), bob.clone());
    b_in.wait_messages(17).await;
    b_in.wait_until("synced", |ev| ev.iter().any(|e| matches!(e, Event::Synced { .. }))).await;
    b_in.assert_in_order_once();
    assert_eq!(b_in.seqs(), (4..=20).collect::<Vec<_>>());
    assert_eq!(b_in.texts(), (3..20).map(|i| format!("m{i}")).collect::<Vec<_>>());

    // A third start with an explicit cursor resumes there instead.
    b.close().await;
    let mut cfg = config(gateways);
    cfg.resume = Resume::After(Seq(15));
    let (b, mut b_in) = connect("bob from 15", cfg, bob);
    b_in.wait_until("synced", |ev| ev.iter().any(|e| matches!(e, Event::Synced { .. }))).await;
    b_in.assert_in_order_once();
    assert_eq!(b_in.seqs(), (16..=20).collect::<Vec<_>>());

    b.close().await;
    a.close().await;
    gw.shutdown().await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_device_catches_up_over_tcp() {
    offline_device_catches_up(Kind::Tcp).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_device_catches_up_over_ws() {
    offline_device_catches_up(Kind::Ws).await;
}

/// Sending the same `client_msg_id` again returns the first outcome and
/// stores nothing new; a send whose reply is held back past the request
/// timeout is retried with the same id and stored once.
async fn send_retry_is_idempotent(kind: Kind) {
    let _serial = serial().await;
    let cluster = cluster().await;
    let gw = cluster.gateway("gw-retry").await;
    let api = api(&cluster);
    let (_, alice) = register(&api, "alice").await;
    let (_, bob) = register(&api, "bob").await;
    let bob_id = bob.user_id;

    // 1. The low-level API: the same id twice.
    let (a, mut a_in) = connect("alice", config(vec![endpoint(&gw, kind)]), alice.clone());
    a_in.wait_synced_after_connect(1).await;
    let input = SendInput {
        conversation_kind: ConversationKind::User as i32,
        conversation_id: bob_id.0,
        client_msg_id: new_client_msg_id(),
        content_type: ContentType::Text as i32,
        content: "once".into(),
        ..Default::default()
    };
    let first = a.send_once(input.clone()).await.unwrap();
    let again = a.send_once(input.clone()).await.unwrap();
    let retried = a.send_input(input.clone()).await.unwrap();
    assert_eq!(first, again);
    assert_eq!(first, retried);
    a.close().await;

    // 2. A reply that comes too late: the proxy holds the gateway's packets
    // until the client has sent the SEND a second time.
    let upstream = match kind {
        Kind::Tcp => gw.tcp_addr().unwrap(),
        Kind::Ws => gw.ws_addr().unwrap(),
    };
    let proxy = PacketProxy::start(kind, upstream).await;
    let mut cfg = config(vec![proxy.endpoint()]);
    cfg.request_timeout = Duration::from_secs(1);
    cfg.resume = Resume::After(Seq::ZERO);
    let (a, mut a_in) = connect("alice via proxy", cfg, alice.clone());
    a_in.wait_synced_after_connect(1).await;
    proxy.hold_replies(true);
    let sends_before = proxy.sends();
    let sending = tokio::spawn({
        let a = a.clone();
        async move { a.send(bob_id, ContentType::Text, "late reply").await }
    });
    support::wait_for(|| (proxy.sends() >= sends_before + 2).then_some(())).await;
    proxy.hold_replies(false);
    let late = sending.await.unwrap().unwrap();
    assert!(late.seq > first.seq);

    // Each message is stored once in both lists.
    let alice_api = api.authenticated(alice);
    let bob_api = api.authenticated(bob);
    for (who, list) in [
        ("alice", alice_api.history(Seq::ZERO, 100).await.unwrap()),
        ("bob", bob_api.history(Seq::ZERO, 100).await.unwrap()),
    ] {
        let texts: Vec<String> =
            list.iter().map(|m| String::from_utf8_lossy(&m.content).into_owned()).collect();
        assert_eq!(texts, ["once", "late reply"], "{who}'s list");
        let ids: HashSet<&str> = list.iter().map(|m| m.client_msg_id.as_str()).collect();
        assert_eq!(ids.len(), 2);
        assert!(ids.contains(input.client_msg_id.as_str()));
    }
    // The sender's own event stream has both, once.
    a_in.wait_messages(2).await;
    a_in.assert_in_order_once();

    a.close().await;
    drop(proxy);
    gw.shutdown().await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_retry_is_idempotent_over_tcp() {
    send_retry_is_idempotent(Kind::Tcp).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_retry_is_idempotent_over_ws() {
    send_retry_is_idempotent(Kind::Ws).await;
}
