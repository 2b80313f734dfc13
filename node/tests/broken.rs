//! Deliberately broken builds: each `[sabotage]` flag produces the anomaly
//! it exists for, in an in-process cluster (or, for `skip_fsync`, a node in
//! a child process that really crashes), and the same scenario without the
//! flag does not. The consistency harness relies on these flags to show that
//! its checker catches real anomalies.

use std::collections::BTreeMap;
use std::time::Duration;

use rim_node::{Node, NodeConfig, NodeOptions, Sabotage};
use rim_proto::ids::{DeviceId, NodeId, Seq, ShardId, UserId};
use rim_proto::v1::auth_service_client::AuthServiceClient;
use rim_proto::v1::message_service_client::MessageServiceClient;
use rim_proto::v1::{Message, SignInRequest, SyncInput};
use rim_testkit::cluster::*;
use rim_testkit::grpc::*;
use rim_testkit::wait::*;

/// How often `cmid` appears in a list.
fn count(list: &[Message], cmid: &str) -> usize {
    list.iter().filter(|m| m.client_msg_id == cmid).count()
}

/// A user's list as the local replica of node `id` holds it.
fn local_list(c: &Cluster, id: NodeId, user: UserId) -> Vec<Message> {
    let g = c.node(id).core.group(c.shard_of_user(user)).unwrap();
    g.reader.sync(user, Seq(0), 500).unwrap().messages
}

/// Waits until every running node applied what `leader` has applied.
async fn converge(c: &Cluster, shard: ShardId, leader: NodeId) {
    let target =
        c.node(leader).core.group(shard).unwrap().raft.metrics().borrow().last_applied.unwrap().index;
    for n in c.nodes.values() {
        n.core.group(shard).unwrap().wait_applied(target, Duration::from_secs(30)).await.unwrap();
    }
}

/// Waits until a node other than `old` leads `shard`, as node `via` sees it.
async fn new_leader(c: &Cluster, shard: ShardId, old: NodeId, via: NodeId) -> NodeId {
    wait_for(Duration::from_secs(20), &format!("a new leader of shard {shard} other than node {old}"), || {
        let l = c.node(via).core.group(shard).unwrap().leader()?;
        (l != old && c.node(l).core.group(shard).unwrap().is_leader()).then_some(l)
    })
    .await
}

// ------------------------------------------------------------ ack_before_commit

/// Sends three notes-to-self through a shard leader right after it was cut
/// off, heals, and returns `(acked, lists)`: the acked sends and, per node,
/// the final list.
async fn sends_through_a_cut_off_leader(
    sabotage: bool,
) -> (Vec<(String, rim_proto::v1::SendOutput)>, BTreeMap<NodeId, Vec<Message>>) {
    let c = Cluster::start_with(3, 2, |cfg| {
        cfg.sabotage.ack_before_commit = sabotage;
        cfg.request_timeout_ms = 1_500;
    })
    .await;
    let client = c.client(1);
    client.register("abc").await;
    let me = client.sign_in("abc").await;
    let shard = c.shard_of_user(me.user);
    let old = c.leader(shard).await;
    let via_old = c.client(old);
    via_old.send_acked(&me, me.user, "before", "payload").await;
    // (With the sabotage that ack means nothing yet: wait until it is applied everywhere.)
    wait_for(Duration::from_secs(20), "\"before\" applied on every node", || {
        (1..=3).all(|id| count(&local_list(&c, id, me.user), "before") == 1).then_some(())
    })
    .await;

    c.isolate(old);
    let mut acked = Vec::new();
    for i in 0..3 {
        let cmid = format!("cut{i}");
        if let Ok(out) = via_old.send(&me, me.user, &cmid, "payload").await {
            acked.push((cmid, out));
        }
    }
    let other = (1..=3).find(|i| *i != old).unwrap();
    let new = new_leader(&c, shard, old, other).await;
    c.client(new).send_acked(&me, me.user, "after", "payload").await;
    c.heal();
    converge(&c, shard, new).await;
    // (Again, with the sabotage "after" may not have committed at its ack.)
    wait_for(Duration::from_secs(20), "\"after\" applied on every node", || {
        (1..=3).all(|id| count(&local_list(&c, id, me.user), "after") == 1).then_some(())
    })
    .await;
    let lists = (1..=3).map(|id| (id, local_list(&c, id, me.user))).collect();
    c.shutdown().await;
    (acked, lists)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ack_before_commit_loses_acked_sends_of_a_cut_off_leader() {
    let _g = serial().await;
    let (acked, lists) = sends_through_a_cut_off_leader(true).await;
    assert_eq!(acked.len(), 3, "every send through the cut-off leader was acked");
    for (cmid, out) in &acked {
        assert!(out.seq > 0 && out.message_id != 0, "{cmid}: implausible ack {out:?}");
    }
    for (id, list) in &lists {
        assert_eq!((count(list, "before"), count(list, "after")), (1, 1), "node {id}: {list:?}");
        for (cmid, _) in &acked {
            assert_eq!(count(list, cmid), 0, "node {id} holds {cmid}: the anomaly did not happen");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_ack_before_commit_a_cut_off_leader_acks_nothing() {
    let _g = serial().await;
    let (acked, lists) = sends_through_a_cut_off_leader(false).await;
    assert!(acked.is_empty(), "a minority leader acknowledged {acked:?}");
    for (id, list) in &lists {
        assert_eq!((count(list, "before"), count(list, "after")), (1, 1), "node {id}: {list:?}");
    }
}

// ------------------------------------------------------------ stale_reads

/// Sends a message while a follower is cut off, then syncs through that
/// follower; returns the sync's outcome.
async fn sync_through_a_cut_off_follower(sabotage: bool) -> Result<Vec<Message>, tonic::Status> {
    let c = Cluster::start_with(3, 2, |cfg| {
        cfg.sabotage.stale_reads = sabotage;
        cfg.request_timeout_ms = 1_500;
    })
    .await;
    let client = c.client(1);
    client.register("stale").await;
    // With the sabotage, sign-in's own reads are stale too: retry until node 1 caught up.
    let me = eventually(Duration::from_secs(20), "a sign-in served by node 1", || async {
        let mut a = AuthServiceClient::new(client.channel.clone());
        let req = SignInRequest { username: "stale".into(), password: PASSWORD.into(), ..Default::default() };
        let r = a.sign_in(req).await.ok()?.into_inner();
        Some(Session { user: UserId(r.user_id), device: DeviceId(r.device_id), token: r.token })
    })
    .await;
    let shard = c.shard_of_user(me.user);
    let leader = c.leader(shard).await;
    let follower = (1..=3).find(|i| *i != leader).unwrap();
    c.client(leader).send_acked(&me, me.user, "old", "payload").await;
    // The follower has the device (token check) and the first message.
    wait_for(Duration::from_secs(20), &format!("\"old\" on follower {follower}"), || {
        (count(&local_list(&c, follower, me.user), "old") == 1).then_some(())
    })
    .await;

    c.isolate(follower);
    let fresh = c.client(leader).send_acked(&me, me.user, "fresh", "payload").await;
    assert!(fresh.seq > 0);
    let mut m = MessageServiceClient::new(c.client(follower).channel);
    let res = m.sync(Client::authed(&me, SyncInput { after_seq: 0, limit: 100 })).await;
    c.heal();
    c.shutdown().await;
    res.map(|r| r.into_inner().messages)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_reads_miss_an_acked_write_on_a_cut_off_follower() {
    let _g = serial().await;
    let list = sync_through_a_cut_off_follower(true).await.expect("a stale read is served");
    assert_eq!(count(&list, "old"), 1, "{list:?}");
    assert_eq!(count(&list, "fresh"), 0, "the read saw the acked write: the anomaly did not happen");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_stale_reads_a_cut_off_follower_refuses_to_read() {
    let _g = serial().await;
    let res = sync_through_a_cut_off_follower(false).await;
    assert!(res.is_err(), "a cut-off follower served a read without its barrier: {res:?}");
}

// ------------------------------------------------------------ no_relay_dedup

/// Alice (shard A) sends to Carol (shard C, made unavailable) and then to Bob
/// (shard B). Every relay round delivers to B but fails for C, so the round
/// is retried from Carol's record on, redelivering Bob's message each time.
/// Returns how often Bob's list holds it after at least two retries.
async fn copies_after_relay_retries(sabotage: bool) -> usize {
    let c = Cluster::start_with(3, 4, |cfg| {
        cfg.sabotage.no_relay_dedup = sabotage;
        cfg.request_timeout_ms = 1_500;
    })
    .await;
    let client = c.client(1);
    let (alice, bob) = users_on_two_shards(&c, &client, "dd").await;
    let (a, b) = (c.shard_of_user(alice.user), c.shard_of_user(bob.user));
    let mut carol = None;
    for i in 0..60 {
        let id = client.register(&format!("ddc{i}")).await;
        if ![a, b].contains(&c.shard_of_user(id)) {
            carol = Some(id);
            break;
        }
    }
    let carol = carol.expect("a user on a third shard");
    let shard_c = c.shard_of_user(carol);
    // Every replica knows Carol (the send checks she exists), then C loses
    // its quorum: its group stops on two nodes.
    wait_for(Duration::from_secs(20), "every replica knows carol", || {
        let known = |id: NodeId| c.node(id).core.group(shard_c).unwrap().reader.user(carol).unwrap();
        (1..=3).all(|id| known(id).is_some()).then_some(())
    })
    .await;
    for id in [2, 3] {
        c.node(id).core.group(shard_c).unwrap().raft.shutdown().await.unwrap();
    }

    client.send_acked(&alice, carol, "to-carol", "payload").await;
    client.send_acked(&alice, bob.user, "to-bob", "payload").await;

    let leader_b = c.leader(b).await;
    let gb = c.node(leader_b).core.group(b).unwrap();
    let applied = || gb.raft.metrics().borrow().last_applied.map(|l| l.index).unwrap_or(0);
    let bob_list = || gb.reader.sync(bob.user, Seq(0), 500).unwrap().messages;
    // The first delivery, then two more `Deliver` entries on B: retries (no
    // other writes go to B meanwhile).
    let first = wait_for(Duration::from_secs(30), "bob's first delivery", || {
        (count(&bob_list(), "to-bob") > 0).then(applied)
    })
    .await;
    wait_for(Duration::from_secs(30), "two more entries on shard B", || {
        (applied() >= first + 2).then_some(())
    })
    .await;
    let copies = count(&bob_list(), "to-bob");
    assert_eq!(count(&bob_list(), "to-carol"), 0);
    drop(gb);
    c.shutdown().await;
    copies
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_relay_dedup_duplicates_a_retried_delivery() {
    let _g = serial().await;
    let copies = copies_after_relay_retries(true).await;
    assert!(copies >= 2, "Bob holds {copies} copies: the anomaly did not happen");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_retries_are_deduplicated_without_the_sabotage() {
    let _g = serial().await;
    assert_eq!(copies_after_relay_retries(false).await, 1);
}

// ------------------------------------------------------------ skip_fsync

const CRASH_DIR: &str = "RIM_BROKEN_CRASH_DIR";
const CRASH_ADDRS: &str = "RIM_BROKEN_CRASH_ADDRS";
const CRASH_SABOTAGE: &str = "RIM_BROKEN_CRASH_SABOTAGE";

/// A one-node cluster (one shard) on `dir`; `addrs` = internal, client, http.
fn single_node(dir: &std::path::Path, addrs: &[String], skip_fsync: bool) -> NodeConfig {
    NodeConfig {
        id: 1,
        data: dir.to_path_buf(),
        listen: addrs[0].clone(),
        client_listen: addrs[1].clone(),
        http_listen: addrs[2].clone(),
        bootstrap: true,
        peers: [(1, addrs[0].clone())].into(),
        shards: 1,
        replication: 1,
        cluster_secret: SECRET.into(),
        election_min_ms: 300,
        election_max_ms: 600,
        sabotage: Sabotage { skip_fsync, ..Sabotage::default() },
        ..NodeConfig::default()
    }
}

/// The crashing half of the `skip_fsync` test, run in a child process by
/// [`skip_fsync_loses_acked_sends_when_the_majority_crashes`] (a no-op when
/// run directly). It sets up a user, restarts cleanly (so the setup is on
/// disk either way), sends five acked messages, records them and aborts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skip_fsync_crash_child() {
    let (Ok(dir), Ok(addrs)) = (std::env::var(CRASH_DIR), std::env::var(CRASH_ADDRS)) else { return };
    let dir = std::path::PathBuf::from(dir);
    let addrs: Vec<String> = addrs.split(',').map(String::from).collect();
    let cfg = single_node(&dir, &addrs, std::env::var(CRASH_SABOTAGE).as_deref() == Ok("1"));
    let node = Node::start(cfg.clone(), NodeOptions::default()).await.unwrap();
    node.wait_ready(Duration::from_secs(30)).await.unwrap();
    let client = Client::connect(&cfg.client_listen);
    client.register("crash").await;
    node.shutdown().await;

    let node = Node::start(cfg.clone(), NodeOptions::default()).await.unwrap();
    node.wait_ready(Duration::from_secs(30)).await.unwrap();
    let me = client.sign_in("crash").await;
    let mut record = format!("{}\n", me.user);
    for i in 0..5 {
        let out = client.send_acked(&me, me.user, &format!("c{i}"), "payload").await;
        record.push_str(&format!("c{i} {}\n", out.seq));
    }
    let path = dir.join("acked.txt");
    std::fs::write(&path, record).unwrap();
    std::fs::File::open(&path).unwrap().sync_all().unwrap();
    // A crash: no shutdown, no flush, no destructors.
    std::process::abort();
}

/// Runs the child, restarts its node on the same data and returns the
/// acked sends and the user's list after recovery.
async fn crash_and_recover(skip_fsync: bool) -> (Vec<String>, Vec<Message>) {
    let dir = tempfile::tempdir().unwrap();
    let addrs: Vec<String> = (0..3).map(|_| rim_testkit::free_addr_string()).collect();
    let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
    cmd.args(["skip_fsync_crash_child", "--exact", "--nocapture", "--test-threads=1"])
        .env(CRASH_DIR, dir.path())
        .env(CRASH_ADDRS, addrs.join(","))
        .env(CRASH_SABOTAGE, if skip_fsync { "1" } else { "0" });
    let out = tokio::task::spawn_blocking(move || cmd.output()).await.unwrap().unwrap();
    assert!(!out.status.success(), "the child must crash: {}", String::from_utf8_lossy(&out.stdout));
    let record = std::fs::read_to_string(dir.path().join("acked.txt"))
        .unwrap_or_else(|e| panic!("child wrote no record ({e}): {}", String::from_utf8_lossy(&out.stderr)));
    let mut lines = record.lines();
    let user = UserId(lines.next().unwrap().parse().unwrap());
    let acked: Vec<String> = lines.map(|l| l.split(' ').next().unwrap().to_string()).collect();
    assert_eq!(acked.len(), 5, "{record}");

    let cfg = single_node(dir.path(), &addrs, skip_fsync);
    let node = Node::start(cfg, NodeOptions::default()).await.unwrap();
    node.wait_ready(Duration::from_secs(30)).await.unwrap();
    let g = node.core.group(node.core.shard_of_user(user).unwrap()).unwrap();
    // Everything in the recovered log is applied before we look.
    let last = g.raft.metrics().borrow().last_log_index.unwrap_or(0);
    g.wait_applied(last, Duration::from_secs(30)).await.unwrap();
    let list = g.reader.sync(user, Seq(0), 100).unwrap().messages;
    drop(g);
    node.shutdown().await;
    (acked, list)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skip_fsync_loses_acked_sends_when_the_majority_crashes() {
    let _g = serial().await;
    let (acked, list) = crash_and_recover(true).await;
    for cmid in &acked {
        assert_eq!(count(&list, cmid), 0, "{cmid} survived the crash: the anomaly did not happen");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_skip_fsync_acked_sends_survive_a_crash() {
    let _g = serial().await;
    let (acked, list) = crash_and_recover(false).await;
    for cmid in &acked {
        assert_eq!(count(&list, cmid), 1, "{cmid} lost in a crash although fsynced: {list:?}");
    }
}
