//! In-process fault tests: partitions, snapshots, relay under leader
//! changes, push streams, health endpoints.

use std::collections::BTreeSet;
use std::time::Duration;

use futures::StreamExt;
use rim_cluster::META_SHARD;
use rim_proto::ids::{Seq, ShardId};
use rim_proto::store::{self, op::Op as O};
use rim_proto::v1::gateway_service_client::GatewayServiceClient;
use rim_proto::v1::subscribe_event::Event;
use rim_proto::v1::{SubscribeEvent, SubscribeRequest};
use rim_testkit::cluster::*;
use rim_testkit::grpc::*;
use rim_testkit::wait::*;

fn send_op(from: u64, to: u64, cmid: &str) -> store::Op {
    store::Op {
        op: Some(O::SendToUser(store::SendToUser {
            sender_user_id: from,
            sender_device_id: 1,
            recipient_user_id: to,
            client_msg_id: cmid.into(),
            content_type: rim_proto::v1::ContentType::Text as i32,
            content: b"x".to_vec().into(),
            refers_to: 0,
        })),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_minority_leader_cannot_acknowledge() {
    let _g = serial().await;
    let c = Cluster::start(3, 4).await;
    let client = c.client(1);
    let (alice, bob) = users_on_two_shards(&c, &client, "p").await;
    let shard = c.shard_of_user(alice.user);
    let old = c.leader(shard).await;
    c.isolate(old);

    // The old leader is alone: its write must not be acknowledged.
    let g = c.node(old).core.group(shard).unwrap();
    let res = g.propose(send_op(alice.user.0, bob.user.0, "minority"), Duration::from_secs(3)).await;
    assert!(res.is_err(), "a minority leader acknowledged a write: {res:?}");

    // The majority elects a new leader and takes writes.
    let majority: Vec<u64> = (1..=3).filter(|i| *i != old).collect();
    let new = wait_for(Duration::from_secs(20), &format!("a majority leader of shard {shard}"), || {
        let l = c.node(majority[0]).core.group(shard).unwrap().leader()?;
        (l != old && c.node(l).core.group(shard).unwrap().is_leader()).then_some(l)
    })
    .await;
    let via = c.client(majority[0]);
    let ok = via.send_acked(&alice, bob.user, "majority", "payload").await;

    c.heal();
    // Everyone converges on the majority's history; the minority write is gone.
    let target = c.node(new).core.group(shard).unwrap().raft.metrics().borrow().last_applied.unwrap().index;
    for id in 1..=3 {
        let g = c.node(id).core.group(shard).unwrap();
        g.wait_applied(target, Duration::from_secs(30)).await.unwrap();
        let list = texts(&g.reader.sync(alice.user, Seq(0), 100).unwrap().messages);
        assert_eq!(list, vec![(ok.seq, "majority".to_string())], "node {id}");
    }
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_far_behind_catches_up_by_snapshot() {
    let _g = serial().await;
    let mut c = Cluster::start_with(3, 2, |cfg| {
        cfg.snapshot_after = 20;
        cfg.keep_logs_after_snapshot = 0;
    })
    .await;
    let client = c.client(1);
    let (alice, bob) = users_on_two_shards(&c, &client, "s").await;
    let shard = c.shard_of_user(alice.user);
    let leader = c.leader(shard).await;
    let lagger = (1..=3).find(|i| *i != leader && *i != 1).unwrap();
    c.stop_node(lagger).await;

    let mut acked = Vec::new();
    for i in 0..80 {
        let o = client.send_acked(&alice, bob.user, &format!("m{i}"), "payload").await;
        acked.push((o.seq, format!("m{i}")));
    }
    // The log behind the leader's snapshot is gone.
    let lg = c.node(leader).core.group(shard).unwrap();
    let purged = wait_for(Duration::from_secs(20), &format!("a purged log on node {leader}"), || {
        lg.raft.metrics().borrow().purged
    })
    .await;
    assert!(purged.index > 10, "log purged up to {purged:?}");

    c.start_node(lagger).await;
    let g = c.node(lagger).core.group(shard).unwrap();
    let target = lg.raft.metrics().borrow().last_applied.unwrap().index;
    g.wait_applied(target, Duration::from_secs(30)).await.unwrap();
    let snap = g.raft.metrics().borrow().snapshot;
    assert!(snap.is_some_and(|s| s.index >= purged.index), "caught up without a snapshot? {snap:?}");
    assert_eq!(texts(&g.reader.sync(alice.user, Seq(0), 500).unwrap().messages), acked);
    // The relay keeps writing (outbox acks) for a moment: compare the
    // replicas once they have applied the same index.
    c.replicas_identical(shard).await;
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_delivers_exactly_once_across_a_destination_leader_change() {
    let _g = serial().await;
    let mut c = Cluster::start(3, 4).await;
    let client = c.client(1);
    let (alice, bob) = users_on_two_shards(&c, &client, "r").await;
    let dest = c.shard_of_user(bob.user);
    let victim = c.leader(dest).await;
    let via_id = (1..=3).find(|i| *i != victim).unwrap();
    let via = c.client(via_id);
    for i in 0..40 {
        if i == 10 {
            c.stop_node(victim).await;
        }
        via.send_acked(&alice, bob.user, &format!("d{i}"), "payload").await;
    }
    let list = eventually(Duration::from_secs(30), "40 messages in bob's list", || async {
        Some(via.sync_all(&bob).await.unwrap()).filter(|l| l.len() >= 40)
    })
    .await;
    let got: Vec<String> = list.iter().map(|m| m.client_msg_id.clone()).collect();
    let want: Vec<String> = (0..40).map(|i| format!("d{i}")).collect();
    assert_eq!(got, want, "every message once, in the sender's order");
    c.start_node(victim).await;
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shard_leaders_push_applied_entries_to_subscribed_gateways() {
    let _g = serial().await;
    let mut c = Cluster::start(3, 4).await;
    let client = c.client(1);
    let (alice, bob) = users_on_two_shards(&c, &client, "u").await;
    let shard = c.shard_of_user(bob.user);
    let leader = c.leader(shard).await;

    let ch = tonic::transport::Endpoint::from_shared(format!("http://{}", c.configs[&leader].listen))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut gw = GatewayServiceClient::new(ch);
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    tx.send(SubscribeRequest {
        gateway_id: "gw-test".into(),
        shard_id: shard.0,
        add_user_ids: vec![bob.user.0],
        ..Default::default()
    })
    .await
    .unwrap();
    let mut req = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    req.metadata_mut().insert(rim_proto::metadata::CLUSTER_SECRET_METADATA_KEY, SECRET.parse().unwrap());
    let mut stream = gw.subscribe(req).await.unwrap().into_inner();
    assert!(matches!(next(&mut stream).await.unwrap().unwrap().event, Some(Event::Subscribed(1))));

    let sent = client.send_acked(&alice, bob.user, "pushed", "payload").await;
    let ev = next(&mut stream).await.unwrap().unwrap();
    match ev.event {
        Some(Event::Message(m)) => {
            assert_eq!(m.owner_id, bob.user.0);
            assert_eq!(m.seq, 1);
            assert_eq!(m.message.unwrap().message_id, sent.message_id);
        }
        other => panic!("expected a push, got {other:?}"),
    }
    // A stream is not a subscription to everything: alice's own list is not pushed here.
    // When the leader goes away the stream ends, so the gateway re-subscribes and syncs.
    c.stop_node(leader).await;
    let end = next(&mut stream).await;
    assert!(
        matches!(&end, None | Some(Err(_)) | Some(Ok(SubscribeEvent { event: Some(Event::End(_)) }))),
        "stream must end when the leader stops: {end:?}"
    );
    c.shutdown().await;
}

async fn next(s: &mut tonic::Streaming<SubscribeEvent>) -> Option<Result<SubscribeEvent, tonic::Status>> {
    tokio::time::timeout(Duration::from_secs(20), s.next()).await.expect("stream event within 20 s")
}

fn secret<T>(mut r: tonic::Request<T>) -> tonic::Request<T> {
    r.metadata_mut().insert(rim_proto::metadata::CLUSTER_SECRET_METADATA_KEY, SECRET.parse().unwrap());
    r
}

async fn http_get(addr: &str, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes()).await.unwrap();
    let mut body = String::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut body)).await.unwrap().unwrap();
    let status = body.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_serve_health_and_prometheus_metrics() {
    let _g = serial().await;
    let c = Cluster::start(3, 2).await;
    let client = c.client(1);
    let (alice, bob) = users_on_two_shards(&c, &client, "h").await;
    client.send_acked(&alice, bob.user, "m", "payload").await;
    let (status, body) = http_get(&c.configs[&1].http_listen, "/healthz").await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = http_get(&c.configs[&1].http_listen, "/metrics").await;
    assert_eq!(status, 200);
    for name in ["rim_proposals_total", "rim_raft_term", "rim_raft_applied_index", "rim_send_seconds"] {
        assert!(body.contains(name), "/metrics lacks {name}:\n{body}");
    }
    let ids: BTreeSet<u64> = [alice.user.0, bob.user.0].into();
    assert_eq!(ids.len(), 2);
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_and_remove_a_node_safely() {
    let _g = serial().await;
    let mut c = Cluster::start(3, 2).await;
    let client = c.client(1);
    let (alice, bob) = users_on_two_shards(&c, &client, "n").await;
    for i in 0..10 {
        client.send_acked(&alice, bob.user, &format!("before{i}"), "payload").await;
    }
    // A fourth node joins through node 1.
    let mut cfg = c.configs[&1].clone();
    let dir = tempfile::tempdir().unwrap();
    let free = rim_testkit::free_addr_string;
    cfg.id = 4;
    cfg.data = dir.path().to_path_buf();
    cfg.listen = free();
    cfg.client_listen = free();
    cfg.http_listen = free();
    cfg.bootstrap = false;
    cfg.join = Some(c.configs[&1].listen.clone());
    c.dirs.insert(4, dir);
    c.configs.insert(4, cfg.clone());
    c.start_node(4).await;

    let addrs: std::collections::BTreeMap<u64, String> =
        c.configs.iter().map(|(k, v)| (*k, v.listen.clone())).collect();
    let admin = |id: u64| {
        let addr = addrs[&id].clone();
        async move {
            let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
                .unwrap()
                .connect()
                .await
                .unwrap();
            rim_proto::v1::admin_service_client::AdminServiceClient::new(ch)
        }
    };
    for shard in [META_SHARD, ShardId(1), ShardId(2)] {
        let leader = c.leader(shard).await;
        let req = rim_proto::v1::AddNodeRequest {
            node_id: 4,
            internal_addr: cfg.listen.clone(),
            group_ids: vec![shard.0],
            ..Default::default()
        };
        admin(leader).await.add_node(secret(tonic::Request::new(req))).await.unwrap();
    }
    // Node 4 is a voter everywhere and holds the data.
    let shard = c.shard_of_user(alice.user);
    let g4 = c.node(4).core.group(shard).unwrap();
    let target = c
        .node(c.leader(shard).await)
        .core
        .group(shard)
        .unwrap()
        .raft
        .metrics()
        .borrow()
        .last_applied
        .unwrap()
        .index;
    g4.wait_applied(target, Duration::from_secs(30)).await.unwrap();
    let voters: BTreeSet<u64> =
        g4.raft.metrics().borrow().membership_config.membership().voter_ids().collect();
    assert_eq!(voters, [1, 2, 3, 4].into());
    assert_eq!(texts(&g4.reader.sync(alice.user, Seq(0), 100).unwrap().messages).len(), 10);
    // The cluster map records the new replica.
    let map = wait_for(Duration::from_secs(10), "node 4 in the cluster map", || {
        let _ = c.node(1).core.refresh_placement();
        c.node(1).core.placement().ok().filter(|p| p.replicas_of(shard).contains(&4))
    })
    .await;
    assert!(map.node(4).is_some(), "node 4 registered its addresses");

    // Node 4 restarts and hosts its replicas again.
    drop(g4);
    c.stop_node(4).await;
    c.start_node(4).await;
    assert!(c.node(4).core.group(shard).is_some(), "replica reopened after restart");

    // Stop two followers; removing the third would leave the leader alone
    // among {leader, stopped, stopped}: refused.
    let leader = c.leader(shard).await;
    let others: Vec<u64> = [1, 2, 3, 4].into_iter().filter(|n| *n != leader).collect();
    let (keep, down_a, down_b) = (others[0], others[1], others[2]);
    c.stop_node(down_a).await;
    c.stop_node(down_b).await;
    let req = rim_proto::v1::RemoveNodeRequest { node_id: keep, group_ids: vec![shard.0] };
    let err = admin(leader).await.remove_node(secret(tonic::Request::new(req))).await.unwrap_err();
    assert_eq!(code(&err), rim_proto::ErrorCode::ErrorBadRequest, "{err:?}");
    // Removing a down node is fine while a majority of the rest is up.
    c.start_node(down_a).await;
    let leader = c.leader(shard).await;
    let req = rim_proto::v1::RemoveNodeRequest { node_id: down_b, group_ids: vec![shard.0] };
    admin(leader).await.remove_node(secret(tonic::Request::new(req))).await.unwrap();
    let voters: BTreeSet<u64> = c
        .node(leader)
        .core
        .group(shard)
        .unwrap()
        .raft
        .metrics()
        .borrow()
        .membership_config
        .membership()
        .voter_ids()
        .collect();
    let expected: BTreeSet<u64> = [1, 2, 3, 4].into_iter().filter(|n| *n != down_b).collect();
    assert_eq!(voters, expected);
    let via = c.client(leader);
    via.send_acked(&alice, bob.user, "after-remove", "payload").await;
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_sends_share_raft_entries() {
    let _g = serial().await;
    let c = Cluster::start_with(3, 2, |cfg| cfg.max_inflight_proposals = 1).await;
    let client = c.client(1);
    client.register("batcher").await;
    let me = client.sign_in("batcher").await;
    let shard = c.shard_of_user(me.user);
    let leader = c.leader(shard).await;
    let via = c.client(leader);
    let g = c.node(leader).core.group(shard).unwrap();
    let before = g.raft.metrics().borrow().last_log_index.unwrap_or(0);
    // 100 notes-to-self at once (no relay work), through the leader.
    let sends: Vec<_> = (0..100)
        .map(|i| {
            let (via, me) = (via.clone(), me.clone());
            tokio::spawn(async move { via.send_acked(&me, me.user, &format!("n{i}"), "payload").await })
        })
        .collect();
    let mut seqs: Vec<u64> = Vec::new();
    for s in sends {
        seqs.push(s.await.unwrap().seq);
    }
    seqs.sort_unstable();
    assert_eq!(seqs, (1..=100).collect::<Vec<_>>(), "every send acked once, gap-free");
    let entries = g.raft.metrics().borrow().last_log_index.unwrap_or(0) - before;
    assert!(entries <= 50, "100 concurrent sends took {entries} Raft entries: not batched");
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_connection_sign_in_checks_tokens_linearizably() {
    let _g = serial().await;
    let c = Cluster::start(3, 2).await;
    let client = c.client(1);
    client.register("gwuser").await;
    let s = client.sign_in("gwuser").await;
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{}", c.configs[&2].listen))
        .unwrap()
        .connect_lazy();
    let mut gw = GatewayServiceClient::new(ch);
    let sign_in = |token: &str| rim_proto::v1::ConnSignInRequest {
        conn: Some(rim_proto::v1::ConnContext {
            user_id: s.user.0,
            device_id: s.device.0,
            ..Default::default()
        }),
        input: Some(rim_proto::v1::SignInInput {
            user_id: s.user.0,
            device_id: s.device.0,
            token: token.into(),
        }),
    };
    // The internal listener wants the cluster secret.
    let err = gw.conn_sign_in(sign_in(&s.token)).await.unwrap_err();
    assert_eq!(code(&err), rim_proto::ErrorCode::ErrorPermissionDenied);

    let ok = gw.conn_sign_in(secret(tonic::Request::new(sign_in(&s.token)))).await.unwrap().into_inner();
    assert_eq!(ok.output.unwrap().user_id, s.user.0);
    let err = gw.conn_sign_in(secret(tonic::Request::new(sign_in("v1.1.2.3.4.00")))).await.unwrap_err();
    assert_eq!(code(&err), rim_proto::ErrorCode::ErrorUnauthenticated);

    // A logout acknowledged through node 1 is seen at once by a sign-in at node 2.
    let mut auth = rim_proto::v1::auth_service_client::AuthServiceClient::new(client.channel.clone());
    auth.logout(Client::authed(&s, rim_proto::v1::LogoutRequest {})).await.unwrap();
    let err = gw.conn_sign_in(secret(tonic::Request::new(sign_in(&s.token)))).await.unwrap_err();
    assert_eq!(code(&err), rim_proto::ErrorCode::ErrorTokenRevoked);
    c.shutdown().await;
}
