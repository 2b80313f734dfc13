//! Real-process tests of the business push API and of recall and read
//! receipts over the long connection: `rim node` × 3 and a `rim gateway`,
//! clients speaking the framed protocol.

mod support;

use std::time::{Duration, Instant};

use prost::Message as _;
use rim_proto::v1::push_service_client::PushServiceClient;
use rim_proto::v1::*;
use support::*;

/// A PushService client on a node's internal listener (cluster secret).
fn push_client(addr: &str) -> PushServiceClient<tonic::transport::Channel> {
    PushServiceClient::new(endpoint(addr).connect_lazy())
}

fn content(text: &str, cmid: &str) -> PushContent {
    PushContent {
        content_type: 1001,
        content: text.as_bytes().to_vec().into(),
        sender_user_id: 0,
        client_msg_id: cmid.into(),
    }
}

/// MESSAGE pushes read so far on `conn`, as (packet seq, persisted, message).
fn pushes(conn: &Conn) -> Vec<(u64, bool, Message)> {
    conn.pushes
        .iter()
        .filter(|p| p.command == Command::Message as i32)
        .filter_map(|p| {
            let mp = MessagePush::decode(p.content.as_ref()).ok()?;
            Some((p.seq, mp.persisted, mp.message?))
        })
        .collect()
}

/// Reads `conn` until `done` holds for its pushes (or 20 s pass).
async fn wait_pushes(conn: &mut Conn, what: &str, done: impl Fn(&[(u64, bool, Message)]) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done(&pushes(conn)) {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "{what}: pushes so far {:?}", pushes(conn));
        if let Some(p) = conn.read(left).await {
            conn.pushes.push(p);
        }
    }
}

fn with_content<'a>(ps: &'a [(u64, bool, Message)], text: &str) -> Vec<&'a (u64, bool, Message)> {
    ps.iter().filter(|(_, _, m)| m.content.as_ref() == text.as_bytes()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn business_pushes_reach_connections_online_only_or_persisted() {
    let _g = serial().await;
    let c = ProcCluster::start(3, 4).await;
    let gw = GatewayProc::start("gw-push", &c.internal_addrs()).await;
    let api = c.client(1);
    let placement = c.placement(1).await;
    // Users until two shards are covered.
    let mut users = Vec::new();
    for i in 0..40 {
        users.push(api.phone_sign_in(&format!("+3361000{i:04}")).await);
        let shards: std::collections::BTreeSet<rim_proto::ids::ShardId> =
            users.iter().map(|s: &Session| placement.shard_of_user(s.user)).collect();
        if users.len() >= 3 && shards.len() >= 2 {
            break;
        }
    }
    let mut conns = Vec::new();
    for s in &users {
        conns.push(Conn::sign_in(&gw.tcp, s).await.0);
    }
    let push = push_client(&c.internal_addrs()[1]);

    // A persisted push to every user first: once a connection got it, its
    // user's shard stream is up (online-only pushes reach only live streams).
    let ids: Vec<u64> = users.iter().map(|s| s.user.0).collect();
    let req2 = PushToUsersRequest {
        user_ids: ids.clone(),
        content: Some(content("stored-2", "biz-2")),
        persist: true,
    };
    let stored = retry(Duration::from_secs(20), "persisted push", || {
        let mut p = push.clone();
        let req = with_secret(req2.clone());
        async move { p.push_to_users(req).await.map(|r| r.into_inner()) }
    })
    .await;
    assert_ne!(stored.message_id, 0, "a persisted push has a message id");
    for (i, conn) in conns.iter_mut().enumerate() {
        let what = format!("connection of user {}", users[i].user);
        wait_pushes(conn, &what, |ps| !with_content(ps, "stored-2").is_empty()).await;
        let ps = pushes(conn);
        let s = with_content(&ps, "stored-2");
        assert_eq!(s.len(), 1, "{what}: the persisted push once");
        assert!(s[0].1 && s[0].0 > 0 && s[0].0 == s[0].2.seq, "{what}: persisted push carries its seq");
        assert_eq!(s[0].2.conversation_kind, ConversationKind::System as i32);
    }
    // Online-only to one user: that connection only, seq 0, not persisted.
    let req = PushToUsersRequest {
        user_ids: vec![users[0].user.0],
        content: Some(content("hey-0", "")),
        persist: false,
    };
    let r = retry(Duration::from_secs(20), "push to users", || {
        let mut p = push.clone();
        let req = with_secret(req.clone());
        async move { p.push_to_users(req).await.map(|r| r.into_inner()) }
    })
    .await;
    assert_eq!(r.message_id, 0, "online-only pushes store nothing");

    // PushToAll: every connection once (users on several shards; every shard
    // leader sends it). A persisted push after it, on the same streams, makes
    // a late second copy unlikely to go unseen.
    let req = PushToAllRequest { content: Some(content("all-1", "")), priority: PushPriority::High as i32 };
    retry(Duration::from_secs(20), "push to all", || {
        let mut p = push.clone();
        let req = with_secret(req.clone());
        async move { p.push_to_all(req).await.map(|r| r.into_inner()) }
    })
    .await;
    let req3 = PushToUsersRequest {
        user_ids: ids.clone(),
        content: Some(content("stored-3", "biz-3")),
        persist: true,
    };
    retry(Duration::from_secs(20), "persisted push 3", || {
        let mut p = push.clone();
        let req = with_secret(req3.clone());
        async move { p.push_to_users(req).await.map(|r| r.into_inner()) }
    })
    .await;
    for (i, conn) in conns.iter_mut().enumerate() {
        let what = format!("connection of user {}", users[i].user);
        wait_pushes(conn, &what, |ps| {
            !with_content(ps, "stored-3").is_empty()
                && !with_content(ps, "all-1").is_empty()
                && (i != 0 || !with_content(ps, "hey-0").is_empty())
        })
        .await;
        let ps = pushes(conn);
        assert_eq!(with_content(&ps, "all-1").len(), 1, "{what}: the broadcast once");
        let own = with_content(&ps, "hey-0");
        assert_eq!(own.len(), usize::from(i == 0), "{what}: the online push to user 0 only");
        if i == 0 {
            assert_eq!((own[0].0, own[0].1), (0, false), "online-only: packet seq 0, persisted false");
        }
    }
    // The persisted push is in every list exactly once, also after a retry with the same key.
    retry(Duration::from_secs(20), "persisted push retry", || {
        let mut p = push.clone();
        let req = with_secret(req2.clone());
        async move { p.push_to_users(req).await.map(|r| r.into_inner()) }
    })
    .await;
    for s in &users {
        let list = eventually(Duration::from_secs(20), "persisted push in list", || async {
            let l = api.sync_all(s).await.ok()?;
            l.iter().any(|m| m.content.as_ref() == b"stored-2").then_some(l)
        })
        .await;
        let n = list.iter().filter(|m| m.content.as_ref() == b"stored-2").count();
        assert_eq!(n, 1, "user {}: the persisted push once in the list", s.user);
    }
    // Clients cannot have the API forge notifications.
    let bad = PushToUsersRequest {
        user_ids: vec![users[0].user.0],
        content: Some(PushContent { content_type: ContentType::Notification as i32, ..content("x", "") }),
        persist: true,
    };
    let err = push.clone().push_to_users(with_secret(bad)).await.expect_err("notification refused");
    assert_eq!(code(&err), ErrorCode::ErrorBadRequest);
    // Without the cluster secret the API refuses.
    let mut unauth = tonic::Request::new(PushToAllRequest { content: Some(content("x", "")), priority: 0 });
    unauth.set_timeout(Duration::from_secs(10));
    assert!(push.clone().push_to_all(unauth).await.is_err(), "PushToAll without the secret");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recall_and_read_receipts_over_the_connection() {
    let _g = serial().await;
    let c = ProcCluster::start(3, 4).await;
    let gw = GatewayProc::start("gw-recall", &c.internal_addrs()).await;
    let api = c.client(1);
    let alice = api.phone_sign_in("+3362000001").await;
    let bob = api.phone_sign_in("+3362000002").await;
    let (mut ca, _) = Conn::sign_in(&gw.tcp, &alice).await;
    let (mut cb, _) = Conn::sign_in(&gw.tcp, &bob).await;

    let send = SendInput {
        conversation_kind: ConversationKind::User as i32,
        conversation_id: bob.user.0,
        client_msg_id: "r-1".into(),
        content_type: ContentType::Text as i32,
        content: b"oops".to_vec().into(),
        ..Default::default()
    };
    let sent = SendOutput::decode(ca.call(Command::Send, &send).await.expect("send").as_slice())
        .expect("SendOutput");
    wait_pushes(&mut cb, "bob gets the message", |ps| !with_content(ps, "oops").is_empty()).await;
    let bob_seq = with_content(&pushes(&cb), "oops")[0].0;

    // Alice recalls it: a new RECALL entry referring to it, pushed to bob.
    let recall = RecallInput {
        conversation_kind: ConversationKind::User as i32,
        conversation_id: bob.user.0,
        message_id: sent.message_id,
        client_msg_id: "r-1-recall".into(),
        seq: sent.seq,
    };
    let r =
        SendOutput::decode(ca.call(Command::Recall, &recall).await.expect("recall").as_slice()).expect("out");
    assert_eq!(r.seq, sent.seq + 1, "the recall is the next entry of alice's list");
    wait_pushes(&mut cb, "bob gets the recall", |ps| {
        ps.iter()
            .any(|(_, _, m)| m.content_type == ContentType::Recall as i32 && m.refers_to == sent.message_id)
    })
    .await;
    // Bob cannot recall alice's message.
    let foreign = RecallInput {
        conversation_id: alice.user.0,
        client_msg_id: "r-x".into(),
        seq: bob_seq,
        ..recall.clone()
    };
    let err = cb.call(Command::Recall, &foreign).await.expect_err("foreign recall refused");
    assert_eq!(err.code, ErrorCode::ErrorPermissionDenied as i32, "{err:?}");

    // Bob reads up to the message with a receipt: alice gets a READ_RECEIPT push.
    let read = ReadInput {
        conversation_kind: ConversationKind::User as i32,
        conversation_id: alice.user.0,
        read_seq: bob_seq,
        receipt_message_id: sent.message_id,
    };
    let out = ReadOutput::decode(cb.call(Command::Read, &read).await.expect("read").as_slice()).expect("out");
    assert_eq!(out.read_seq, bob_seq);
    wait_pushes(&mut ca, "alice gets the receipt", |ps| {
        ps.iter().any(|(_, _, m)| {
            m.content_type == ContentType::ReadReceipt as i32 && m.refers_to == sent.message_id
        })
    })
    .await;
    // A repeated READ neither moves back nor sends a second receipt.
    let older = ReadInput { read_seq: 1, ..read };
    let out =
        ReadOutput::decode(cb.call(Command::Read, &older).await.expect("read").as_slice()).expect("out");
    assert_eq!(out.read_seq, bob_seq, "read positions only move forward");
    let list = api.sync_all_retry(&alice).await;
    let receipts = list.iter().filter(|m| m.content_type == ContentType::ReadReceipt as i32).count();
    assert_eq!(receipts, 1, "one receipt in alice's list: {list:?}");
}
