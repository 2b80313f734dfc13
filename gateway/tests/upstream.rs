//! The gateway's node client and push router against a real in-process
//! 3-node cluster (real gRPC on loopback, temp data dirs).
#![allow(missing_docs)]

use std::time::{Duration, Instant};

use rim_gateway::router::{ConnEvent, PushRouter, RouterOptions};
use rim_gateway::upstream::{Upstream, UpstreamOptions};
use rim_gateway::{Call, CallId, NodeCall, NodeReply};
use rim_proto::ErrorCode;
use rim_proto::ids::{DeviceId, ShardId, UserId};
use rim_proto::v1::*;
use tokio::sync::mpsc;

mod cluster;
use cluster::{Cluster, Device, SECRET, free_addr, register, serial, wait_for};

fn upstream(c: &Cluster) -> Upstream {
    let mut opts = UpstreamOptions::new(c.seeds(), SECRET, "gw-test");
    opts.request_timeout = Duration::from_secs(10);
    Upstream::new(opts).unwrap()
}

fn call(id: u64, conn_id: u64, d: &Device, request: NodeCall) -> Call {
    Call {
        id: CallId(id),
        conn_id,
        user_id: UserId(d.user),
        device_id: DeviceId(d.device),
        token_version: None,
        request,
    }
}

fn sign_in(d: &Device, token: &str) -> NodeCall {
    NodeCall::SignIn(SignInInput { user_id: d.user, device_id: d.device, token: token.into() })
}

fn text(to: u64, cmid: &str) -> NodeCall {
    NodeCall::Send {
        input: SendInput {
            conversation_kind: ConversationKind::User as i32,
            conversation_id: to,
            client_msg_id: cmid.into(),
            content_type: ContentType::Text as i32,
            content: cmid.as_bytes().to_vec().into(),
            ..Default::default()
        },
        group: false,
    }
}

/// Sends through the upstream, retrying retryable errors (same client_msg_id).
async fn send(up: &Upstream, from: &Device, to: u64, cmid: &str) -> SendOutput {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match up.call(&call(1, 1, from, text(to, cmid))).await {
            Ok(NodeReply::Send(o)) => return o,
            Ok(other) => panic!("send got {other:?}"),
            Err(e) => {
                assert!(e.code.is_retryable(), "send {cmid}: {e}");
                assert!(Instant::now() < deadline, "send {cmid} never acknowledged: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// The next event of a connection within `timeout`; `None` if its channel
/// closed.
async fn next_event(rx: &mut mpsc::Receiver<ConnEvent>, timeout: Duration) -> Option<ConnEvent> {
    tokio::time::timeout(timeout, rx.recv()).await.expect("connection event in time")
}

/// Waits for a push of `user`'s list with `seq`, skipping other events;
/// returns whether a resync was signalled before it.
async fn wait_push(rx: &mut mpsc::Receiver<ConnEvent>, user: u64, seq: u64) -> (PushedMessage, bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut resync = false;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match next_event(rx, left).await {
            Some(ConnEvent::Push(p)) if p.owner_id == user && p.seq == seq => return (p, resync),
            Some(ConnEvent::Push(_)) => {}
            Some(ConnEvent::ResyncNeeded) => resync = true,
            other => panic!("expected a push of seq {seq}, got {other:?}"),
        }
    }
}

/// Waits until the connection is told to resync.
async fn wait_resync(rx: &mut mpsc::Receiver<ConnEvent>) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match next_event(rx, left).await {
            Some(ConnEvent::ResyncNeeded) => return,
            Some(ConnEvent::Push(_)) => {}
            other => panic!("expected a resync, got {other:?}"),
        }
    }
}

fn fast_router(up: &Upstream) -> PushRouter {
    let opts = RouterOptions { subscribe_timeout: Duration::from_secs(3), request_queue: 16 };
    PushRouter::new(up.clone(), opts)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_signs_in_sends_and_syncs() -> anyhow::Result<()> {
    let _g = serial().await;
    let c = Cluster::start(3, 2).await;
    let alice = register(&c, "alice").await;
    let bob = register(&c, "bob").await;
    let up = upstream(&c);
    let map = up.refresh_map().await?;
    assert!(map.data_shards().count() >= 2, "the map lists the data shards");
    assert_eq!(up.shard_of_user(UserId(bob.user)), Some(c.shard_of_user(UserId(bob.user))));

    // (a) sign-in: a valid token succeeds, a bad one fails with an auth code.
    match up.call(&call(1, 10, &alice, sign_in(&alice, &alice.token))).await {
        Ok(NodeReply::SignIn(r)) => {
            let out = r.output.unwrap();
            assert_eq!((out.user_id, out.device_id), (alice.user, alice.device));
            assert_eq!(ShardId(r.shard_id), c.shard_of_user(UserId(alice.user)));
        }
        other => panic!("sign-in failed: {other:?}"),
    }
    let bad = up.call(&call(2, 11, &alice, sign_in(&alice, "not-a-token"))).await.unwrap_err();
    assert_eq!(bad.code, ErrorCode::ErrorUnauthenticated, "{bad}");
    let mut forged = alice.token.clone();
    forged.push('x');
    let bad = up.call(&call(3, 11, &alice, sign_in(&alice, &forged))).await.unwrap_err();
    assert_eq!(bad.code, ErrorCode::ErrorUnauthenticated, "{bad}");
    // Bob's token does not sign alice in.
    let bad = up.call(&call(4, 11, &alice, sign_in(&alice, &bob.token))).await.unwrap_err();
    assert_eq!(bad.code, ErrorCode::ErrorUnauthenticated, "{bad}");

    // (b) send, then sync on both sides.
    let sent = send(&up, &alice, bob.user, "hello-bob").await;
    assert!(sent.message_id != 0);
    let again = send(&up, &alice, bob.user, "hello-bob").await;
    assert_eq!(again.message_id, sent.message_id, "a retry with the same client_msg_id is idempotent");
    let sync = NodeCall::Sync(SyncInput { after_seq: 0, limit: 50 });
    let out = match up.call(&call(5, 12, &bob, sync.clone())).await? {
        NodeReply::Sync(o) => o,
        other => panic!("sync got {other:?}"),
    };
    let texts: Vec<&str> = out.messages.iter().map(|m| m.client_msg_id.as_str()).collect();
    assert_eq!(texts, ["hello-bob"]);
    assert_eq!(out.messages[0].message_id, sent.message_id);
    match up.call(&call(6, 10, &alice, sync)).await? {
        NodeReply::Sync(o) => assert!(o.messages.iter().any(|m| m.client_msg_id == "hello-bob")),
        other => panic!("sync got {other:?}"),
    }
    let ack = NodeCall::Ack(AckInput { seq: out.messages[0].seq });
    assert!(matches!(up.call(&call(7, 12, &bob, ack)).await?, NodeReply::Ack(_)));
    let off = NodeCall::Offline { reason: ErrorCode::Ok, session_epoch: 1 };
    assert_eq!(up.call(&call(8, 12, &bob, off)).await?, NodeReply::Empty);

    // A sync for an unknown user is refused, not retried forever.
    let ghost = Device { user: 999_999_999, device: 1, token: String::new() };
    let started = Instant::now();
    let err =
        up.call(&call(9, 13, &ghost, sign_in(&ghost, &alice.token))).await.expect_err("ghost cannot sign in");
    assert!(!err.code.is_retryable(), "{err}");
    assert!(started.elapsed() < Duration::from_secs(5));
    c.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_without_a_live_node_times_out_quickly() {
    let _g = serial().await;
    let dead = free_addr();
    let mut opts = UpstreamOptions::new(vec![dead], SECRET, "gw-dead");
    opts.request_timeout = Duration::from_millis(800);
    let up = Upstream::new(opts).unwrap();
    let d = Device { user: 1, device: 1, token: "t".into() };
    let started = Instant::now();
    let err = up.call(&call(1, 1, &d, sign_in(&d, "t"))).await.unwrap_err();
    assert!(matches!(err.code, ErrorCode::ErrorUnavailable | ErrorCode::ErrorTimeout), "{err}");
    assert!(started.elapsed() < Duration::from_secs(3), "took {:?}", started.elapsed());
    assert!(Upstream::new(UpstreamOptions::new(vec![], SECRET, "x")).is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_delivers_pushes_and_kicks_older_device_connections() -> anyhow::Result<()> {
    let _g = serial().await;
    let c = Cluster::start(3, 2).await;
    let alice = register(&c, "alice").await;
    let bob = register(&c, "bob").await;
    let up = upstream(&c);
    up.refresh_map().await?;
    let router = fast_router(&up);
    let shard = c.shard_of_user(UserId(bob.user));

    // (c) bob's connection gets a resync once subscribed, then alice's message.
    let (tx1, mut rx1) = mpsc::channel(64);
    router.register(101, UserId(bob.user), DeviceId(bob.device), shard, tx1);
    wait_resync(&mut rx1).await;
    assert!(router.is_subscribed(shard, UserId(bob.user)));
    let leader = c.leader(shard).await;
    assert_eq!(router.stream_node(shard).as_deref(), Some(c.configs[&leader].listen.as_str()));
    let sent = send(&up, &alice, bob.user, "m1").await;
    let (push, _) = wait_push(&mut rx1, bob.user, 1).await;
    assert_eq!(push.message.unwrap().message_id, sent.message_id);

    // (e) the same device on another connection kicks the first.
    let (tx2, mut rx2) = mpsc::channel(64);
    router.register(102, UserId(bob.user), DeviceId(bob.device), shard, tx2);
    loop {
        match next_event(&mut rx1, Duration::from_secs(5)).await {
            Some(ConnEvent::Kick(k)) => {
                assert_eq!(k.code, ErrorCode::ErrorKicked as i32);
                break;
            }
            Some(ConnEvent::ResyncNeeded | ConnEvent::Push(_)) => {}
            None => panic!("the first connection was dropped without a kick"),
        }
    }
    assert!(next_event(&mut rx1, Duration::from_secs(5)).await.is_none(), "kicked: its channel closes");
    // The user stayed subscribed, so the new connection resyncs at once.
    wait_resync(&mut rx2).await;
    assert!(
        !router.unregister(101, UserId(bob.user), DeviceId(bob.device)),
        "the kicked connection removes nothing"
    );
    assert_eq!(router.device_conn(UserId(bob.user), DeviceId(bob.device)), Some(102));
    assert_eq!(router.user_conns(UserId(bob.user)), [102]);
    assert!(router.is_subscribed(shard, UserId(bob.user)));
    send(&up, &alice, bob.user, "m2").await;
    let (push, _) = wait_push(&mut rx2, bob.user, 2).await;
    assert_eq!(push.message.unwrap().client_msg_id, "m2");
    assert_eq!(router.stats().kicks, 1);

    // A second device of bob gets pushes too; its own unregister removes only it.
    let (tx3, mut rx3) = mpsc::channel(64);
    // Registered from a thread outside the runtime, as a mio event loop would.
    std::thread::scope(|s| {
        s.spawn(|| router.register(103, UserId(bob.user), DeviceId(bob.device + 1_000), shard, tx3));
    });
    wait_resync(&mut rx3).await;
    send(&up, &alice, bob.user, "m3").await;
    wait_push(&mut rx2, bob.user, 3).await;
    wait_push(&mut rx3, bob.user, 3).await;
    assert!(router.unregister(103, UserId(bob.user), DeviceId(bob.device + 1_000)));
    assert_eq!(router.user_conns(UserId(bob.user)), [102]);

    // A connection that stops reading is dropped; the others keep receiving.
    let (tx4, rx4) = mpsc::channel(1);
    router.register(104, UserId(bob.user), DeviceId(bob.device + 2_000), shard, tx4);
    for i in 4..8 {
        send(&up, &alice, bob.user, &format!("m{i}")).await;
        wait_push(&mut rx2, bob.user, i).await;
    }
    wait_for(Duration::from_secs(5), || (router.stats().overflows == 1).then_some(())).await;
    assert_eq!(router.user_conns(UserId(bob.user)), [102]);
    drop(rx4);

    // The last unregister removes the user from the stream.
    assert!(router.unregister(102, UserId(bob.user), DeviceId(bob.device)));
    wait_for(Duration::from_secs(5), || (!router.is_subscribed(shard, UserId(bob.user))).then_some(())).await;
    router.shutdown().await;
    c.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_resubscribes_to_the_new_leader_and_signals_resync() -> anyhow::Result<()> {
    let _g = serial().await;
    let mut c = Cluster::start(3, 2).await;
    let alice = register(&c, "alice").await;
    let bob = register(&c, "bob").await;
    let up = upstream(&c);
    up.refresh_map().await?;
    let router = fast_router(&up);
    let shard = c.shard_of_user(UserId(bob.user));

    let (tx, mut rx) = mpsc::channel(256);
    router.register(7, UserId(bob.user), DeviceId(bob.device), shard, tx);
    wait_resync(&mut rx).await;
    send(&up, &alice, bob.user, "before").await;
    wait_push(&mut rx, bob.user, 1).await;

    // (d) stop the shard's leader: the router finds the new one and resyncs.
    let old = c.leader(shard).await;
    let old_addr = c.configs[&old].listen.clone();
    assert_eq!(router.stream_node(shard).as_deref(), Some(old_addr.as_str()));
    let subscriptions = router.stats().subscriptions;
    c.stop_node(old).await;
    wait_resync(&mut rx).await;
    let new_addr = router.stream_node(shard).expect("a live stream after the resync signal");
    assert_ne!(new_addr, old_addr);
    let new = c.leader(shard).await;
    assert_eq!(new_addr, c.configs[&new].listen);
    assert!(router.stats().subscriptions > subscriptions);
    assert!(router.stats().stream_breaks >= 1);

    // Later pushes arrive through the new stream.
    for (i, seq) in (2..5).enumerate() {
        send(&up, &alice, bob.user, &format!("after{i}")).await;
        let (push, _) = wait_push(&mut rx, bob.user, seq).await;
        assert_eq!(push.message.unwrap().client_msg_id, format!("after{i}"));
    }
    router.shutdown().await;
    c.shutdown().await;
    Ok(())
}
