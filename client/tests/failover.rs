//! The SDK's connection management end to end against a real in-process
//! 3-node cluster and real gateways, over TCP and WebSocket: reconnecting
//! to another gateway, being kicked by a second sign-in, a refused
//! sign-in, and the gRPC helpers.
#![allow(missing_docs)]

mod support;

use std::time::Duration;

use rim_client::{ClientError, Credentials, Event, LinkState, new_client_msg_id};
use rim_gateway::SessionConfig;
use rim_proto::ErrorCode;
use rim_proto::ids::{DeviceId, Seq, UserId};
use rim_proto::v1::{Command, ContentType, ConversationKind, SendInput};
use support::proxy::PacketProxy;
use support::{Kind, another_device, api, cluster, config, connect, endpoint, register, serial, wait_for};

/// With two gateways, the one the client is on shuts down: the client
/// reconnects to the other, syncs, and gets every message sent meanwhile
/// exactly once.
async fn reconnects_to_another_gateway(kind: Kind) {
    let _serial = serial().await;
    let cluster = cluster().await;
    let gw1 = cluster.gateway("gw-1").await;
    let gw2 = cluster.gateway("gw-2").await;
    let api = api(&cluster);
    let (_, alice) = register(&api, "alice").await;
    let (_, bob) = register(&api, "bob").await;
    let bob_id = bob.user_id;

    let (e1, e2) = (endpoint(&gw1, kind), endpoint(&gw2, kind));
    let (a, mut a_in) = connect("alice", config(vec![e2.clone()]), alice);
    let (b, mut b_in) = connect("bob", config(vec![e1.clone(), e2.clone()]), bob);
    a_in.wait_synced_after_connect(1).await;
    b_in.wait_synced_after_connect(1).await;
    assert_eq!(b.state(), LinkState::Online { gateway: e1.clone() });
    for i in 0..5 {
        a.send(bob_id, ContentType::Text, format!("m{i}")).await.unwrap();
    }
    b_in.wait_messages(5).await;

    // Alice keeps sending while Bob's gateway goes away.
    let sending = tokio::spawn({
        let a = a.clone();
        async move {
            for i in 5..30 {
                a.send(bob_id, ContentType::Text, format!("m{i}")).await.unwrap();
            }
        }
    });
    gw1.shutdown().await;
    sending.await.unwrap();

    b_in.wait_messages(30).await;
    b_in.assert_in_order_once();
    assert_eq!(b_in.texts(), (0..30).map(|i| format!("m{i}")).collect::<Vec<_>>());
    b_in.wait_synced_after_connect(2).await;
    let connected: Vec<&Event> =
        b_in.events.iter().filter(|e| matches!(e, Event::Connected { .. })).collect();
    assert!(
        matches!(connected.as_slice(), [
        Event::Connected { gateway: g1, .. },
        Event::Connected { gateway: g2, .. },
    ] if *g1 == e1 && *g2 == e2),
        "{connected:?}"
    );
    assert_eq!(b_in.count(|e| matches!(e, Event::Disconnected { .. })), 1);
    assert_eq!(b.state(), LinkState::Online { gateway: e2 });

    // Bob's client still works on the new gateway.
    let out = b.send(alice_id(&a), ContentType::Text, "back").await.unwrap();
    assert_eq!(out.seq, 31);
    b_in.wait_messages(31).await;
    b_in.assert_in_order_once();

    a.close().await;
    b.close().await;
    gw2.shutdown().await;
    cluster.shutdown().await;
}

fn alice_id(client: &rim_client::Client) -> UserId {
    client.credentials().user_id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnects_to_another_gateway_over_tcp() {
    reconnects_to_another_gateway(Kind::Tcp).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnects_to_another_gateway_over_ws() {
    reconnects_to_another_gateway(Kind::Ws).await;
}

/// A second client signing in as the same device kicks the first, which
/// reports `Kicked` and stops instead of reconnecting (which would kick the
/// second in turn). The second keeps working.
async fn second_sign_in_kicks_the_first(kind: Kind) {
    let _serial = serial().await;
    let cluster = cluster().await;
    let gw = cluster.gateway("gw-kick").await;
    let api = api(&cluster);
    let (_, alice) = register(&api, "alice").await;
    let (_, bob) = register(&api, "bob").await;
    let gateways = vec![endpoint(&gw, kind)];

    let (first, mut first_in) = connect("bob first", config(gateways.clone()), bob.clone());
    first_in.wait_synced_after_connect(1).await;
    let (second, mut second_in) = connect("bob second", config(gateways.clone()), bob.clone());
    second_in.wait_synced_after_connect(1).await;

    first_in.wait_ended().await;
    let last = first_in.events.last().unwrap();
    assert!(matches!(last, Event::Kicked { code: ErrorCode::ErrorKicked, .. }), "{last:?}");
    assert_eq!(first.state(), LinkState::Stopped);
    assert_eq!(first_in.count(|e| matches!(e, Event::Connected { .. })), 1);
    let err = first.send(alice.user_id, ContentType::Text, "from the kicked one").await.unwrap_err();
    assert!(matches!(err, ClientError::Closed), "{err:?}");

    // The second session is undisturbed and receives messages.
    let (a, mut a_in) = connect("alice", config(gateways), alice);
    a_in.wait_synced_after_connect(1).await;
    a.send(bob.user_id, ContentType::Text, "hi").await.unwrap();
    second_in.wait_messages(1).await;
    second_in.drain_ready();
    assert_eq!(second_in.count(|e| matches!(e, Event::Kicked { .. } | Event::Disconnected { .. })), 0);
    assert!(matches!(second.state(), LinkState::Online { .. }));

    a.close().await;
    second.close().await;
    first.close().await; // already stopped: returns at once
    gw.shutdown().await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_sign_in_kicks_the_first_over_tcp() {
    second_sign_in_kicks_the_first(Kind::Tcp).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_sign_in_kicks_the_first_over_ws() {
    second_sign_in_kicks_the_first(Kind::Ws).await;
}

/// A sign-in with a bad token is reported and stops the client; the gRPC
/// helpers register, sign in by password and phone code, list devices and
/// read history.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_sign_in_and_grpc_helpers() {
    let _serial = serial().await;
    let cluster = cluster().await;
    let gw = cluster.gateway("gw-api").await;
    let api = api(&cluster);
    let (name, alice) = register(&api, "alice").await;
    let alice2 = another_device(&api, &name).await;
    assert_eq!(alice2.user_id, alice.user_id);
    assert_ne!(alice2.device_id, alice.device_id);

    for kind in [Kind::Tcp, Kind::Ws] {
        let forged = Credentials { token: "not-a-token".into(), ..alice.clone() };
        let (client, mut inbox) = connect("forged", config(vec![endpoint(&gw, kind)]), forged);
        inbox.wait_ended().await;
        let last = inbox.events.last().unwrap();
        assert!(
            matches!(last, Event::SignInRejected { code, .. } if code.class() == rim_proto::error::ErrorClass::Auth),
            "{last:?}"
        );
        assert_eq!(client.state(), LinkState::Stopped);
    }

    // Wrong password and duplicate usernames map to their codes.
    let err = api.sign_in(&name, "wrong-password", None).await.unwrap_err();
    assert_eq!(err.code(), ErrorCode::ErrorUnauthenticated, "{err:?}");
    let err = api.register(&name, "another-password").await.unwrap_err();
    assert_eq!(err.code(), ErrorCode::ErrorAlreadyExists, "{err:?}");

    // Devices, profile and history over gRPC.
    let alice_api = api.authenticated(alice.clone());
    let devices = alice_api.list_devices().await.unwrap();
    let ids: Vec<DeviceId> = devices.iter().map(|d| DeviceId(d.device_id)).collect();
    assert!(ids.contains(&alice.device_id) && ids.contains(&alice2.device_id), "{ids:?}");
    assert_eq!(alice_api.get_user(None).await.unwrap().username, name);
    assert_eq!(alice_api.find_user(&name).await.unwrap().user_id, alice.user_id.0);
    let err = alice_api.find_user("nobody_by_this_name").await.unwrap_err();
    assert_eq!(err.code(), ErrorCode::ErrorUserNotFound, "{err:?}");
    let phone = api.sign_in_by_phone("+15550100", "123456", None).await.unwrap();
    assert_ne!(phone.user_id, alice.user_id);
    let err = api.sign_in_by_phone("+15550100", "000000", None).await.unwrap_err();
    assert_eq!(err.code(), ErrorCode::ErrorUnauthenticated, "{err:?}");

    let (client, mut inbox) = connect("alice", config(vec![endpoint(&gw, Kind::Tcp)]), alice.clone());
    inbox.wait_synced_after_connect(1).await;
    for i in 0..5 {
        client.send(phone.user_id, ContentType::Text, format!("h{i}")).await.unwrap();
    }
    let history = alice_api.history(Seq::ZERO, 100).await.unwrap();
    assert_eq!(history.iter().map(|m| m.seq).collect::<Vec<_>>(), [1, 2, 3, 4, 5]);
    assert_eq!(alice_api.history(Seq(3), 100).await.unwrap().len(), 2);
    assert_eq!(alice_api.history(Seq::ZERO, 2).await.unwrap().len(), 2);
    let page = client.sync_page(Seq(1), 2).await.unwrap();
    assert_eq!(page.messages.iter().map(|m| m.seq).collect::<Vec<_>>(), [2, 3]);
    assert!(page.has_more);
    assert!(client.ack(Seq(4)).await.unwrap() >= Seq(4));
    let unauthenticated = api.list_devices().await.unwrap_err();
    assert_eq!(unauthenticated.code(), ErrorCode::ErrorUnauthenticated);

    client.close().await;
    gw.shutdown().await;
    cluster.shutdown().await;
}

/// Heartbeats at the interval the gateway announces keep an idle connection
/// open; a gateway that goes silent for three intervals is given up, and
/// the client reconnects and syncs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_and_silent_gateway_detection() {
    let _serial = serial().await;
    let cluster = cluster().await;
    let session =
        SessionConfig { heartbeat_interval: Duration::from_millis(300), ..SessionConfig::default() };
    let gw = cluster.gateway_with("gw-heartbeat", session).await;
    let api = api(&cluster);
    let (_, alice) = register(&api, "alice").await;
    let (_, bob) = register(&api, "bob").await;
    let alice_api = api.authenticated(alice);

    for (round, kind) in [Kind::Tcp, Kind::Ws].into_iter().enumerate() {
        let upstream = match kind {
            Kind::Tcp => gw.tcp_addr().unwrap(),
            Kind::Ws => gw.ws_addr().unwrap(),
        };
        let proxy = PacketProxy::start(kind, upstream).await;
        let (b, mut b_in) = connect("bob", config(vec![proxy.endpoint()]), bob.clone());
        b_in.wait_synced_after_connect(1).await;

        // Idle for well over the gateway's 900 ms idle timeout.
        wait_for(|| (proxy.count(Command::Heartbeat) >= 8).then_some(())).await;
        b_in.drain_ready();
        assert_eq!(b_in.count(|e| matches!(e, Event::Disconnected { .. })), 0, "{kind:?}");

        // The gateway goes silent (its packets are held back).
        proxy.hold_replies(true);
        b_in.wait_until("disconnect", |ev| ev.iter().any(|e| matches!(e, Event::Disconnected { .. }))).await;
        proxy.hold_replies(false);
        b_in.wait_synced_after_connect(2).await;

        let input = SendInput {
            conversation_kind: ConversationKind::User as i32,
            conversation_id: bob.user_id.0,
            client_msg_id: new_client_msg_id(),
            content_type: ContentType::Text as i32,
            content: format!("after round {round}").into_bytes().into(),
            ..Default::default()
        };
        let sent = alice_api.send_message(input).await.unwrap();
        b_in.wait_messages(1).await;
        b_in.assert_in_order_once();
        assert_eq!(b_in.seqs(), [round as u64 + 1], "{kind:?}");
        assert_eq!(b_in.messages()[0].message_id, sent.message_id);
        b.close().await;
    }
    gw.shutdown().await;
    cluster.shutdown().await;
}
