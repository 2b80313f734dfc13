//! Real-process tests of leader transfer and the leader balancer
//! (docs/operations.md, "Leader transfer and balance"): 3 `rim node`
//! processes on loopback, driven through the admin and client gRPC APIs.

mod support;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rim_proto::ids::{NodeId, ShardId};
use rim_proto::v1::admin_service_client::AdminServiceClient;
use rim_proto::v1::*;
use support::*;

/// `TransferLeader` of `shard` to `to`, asked of the node at `via`.
async fn transfer(via: &str, shard: ShardId, to: NodeId) -> Result<NodeId, tonic::Status> {
    let ch = endpoint(via).connect_lazy();
    let mut r =
        with_secret(TransferLeaderRequest { group_id: shard.0, to_node_id: to, ..Default::default() });
    r.set_timeout(Duration::from_secs(30));
    AdminServiceClient::new(ch).transfer_leader(r).await.map(|r| r.into_inner().leader_node_id)
}

fn internal_addrs(c: &mut ProcCluster) -> BTreeMap<NodeId, String> {
    c.ids().into_iter().map(|id| (id, c.node(id).internal.clone())).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_shard_moves_to_a_named_node_and_back_under_load() {
    let _g = serial().await;
    let mut c = ProcCluster::start_with(3, 3, &["--no-balance"]).await;
    let addrs = internal_addrs(&mut c);
    let client = c.client(1);
    let alice = client.register_and_sign_in("tr_alice").await;
    let bob = client.register_and_sign_in("tr_bob").await;
    let placement = c.placement(1).await;
    let busy = placement.shard_of_user(alice.user);

    // Three concurrent senders (as alice, to bob) through node 1's client API.
    let acks: Arc<Mutex<Vec<(Instant, String)>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut senders = Vec::new();
    for w in 0..3 {
        let (client, alice, acks, stop) = (c.client(1 + w % 3), alice.clone(), acks.clone(), stop.clone());
        let to = bob.user;
        senders.push(tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let text = format!("w{w}-{i}");
                client.send_acked(&alice, to, &text, &text).await;
                acks.lock().unwrap().push((Instant::now(), text));
                i += 1;
            }
        }));
    }
    eventually(WAIT, "the senders get going", || async { (acks.lock().unwrap().len() >= 30).then_some(()) })
        .await;

    let mut pauses = Vec::new();
    let shards: Vec<ShardId> = placement.shards().iter().map(|s| ShardId(s.shard_id)).collect();
    for shard in shards {
        let before = c.leader(shard, WAIT).await;
        let target = c.ids().into_iter().find(|n| *n != before).expect("another node");
        // Asked of a node that does not lead: it forwards to the leader.
        let via = c.ids().into_iter().find(|n| *n != before && *n != target).expect("a third node");
        for (from, to) in [(before, target), (target, before)] {
            let started = Instant::now();
            let got = transfer(&addrs[&via], shard, to).await;
            let took = started.elapsed();
            assert_eq!(got.map_err(|s| s.message().to_string()), Ok(to), "group {shard}: {from} -> {to}");
            assert_eq!(c.leader(shard, WAIT).await, to, "group {shard} is led by {to}");
            if shard == busy {
                // The write pause: the longest gap between two acks around the transfer.
                tokio::time::sleep(Duration::from_millis(500)).await;
                let acks = acks.lock().unwrap();
                let times: Vec<Instant> = acks.iter().map(|a| a.0).collect();
                let first = times.iter().rposition(|t| *t < started).unwrap_or(0);
                let gap = times[first..]
                    .windows(2)
                    .filter(|w| w[0] <= started + took)
                    .map(|w| w[1] - w[0])
                    .max()
                    .unwrap_or_default();
                eprintln!("group {shard}: {from} -> {to} took {took:?}; write pause {gap:?}");
                pauses.push(gap);
            } else {
                eprintln!("group {shard}: {from} -> {to} took {took:?}");
            }
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for s in senders {
        s.await.expect("sender");
    }
    eprintln!("WRITE PAUSE during transfers of group {busy} under load: {pauses:?}");
    assert!(!pauses.is_empty());

    // Every acked message is in bob's list exactly once.
    let acked: Vec<String> = acks.lock().unwrap().iter().map(|a| a.1.clone()).collect();
    eventually(WAIT, "every acked message reaches bob once", || async {
        let list = client.sync_all(&bob).await.ok()?;
        let mut seen: BTreeMap<String, usize> = BTreeMap::new();
        for (_, t) in texts(&list) {
            *seen.entry(t).or_default() += 1;
        }
        let missing = acked.iter().filter(|t| !seen.contains_key(*t)).count();
        assert!(seen.values().all(|n| *n == 1), "a message delivered twice: {seen:?}");
        (missing == 0).then_some(())
    })
    .await;
    eprintln!("{} acked messages read back once each", acked.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transfer_to_a_killed_node_fails_and_the_group_keeps_a_leader() {
    let _g = serial().await;
    let mut c = ProcCluster::start_with(3, 3, &["--no-balance"]).await;
    let addrs = internal_addrs(&mut c);
    let client = c.client(1);
    let alice = client.register_and_sign_in("trk_alice").await;
    let shard = c.placement(1).await.shard_of_user(alice.user);
    let leader = c.leader(shard, WAIT).await;
    let victim = c.ids().into_iter().find(|n| *n != leader).expect("a follower");
    c.kill(victim);
    let started = Instant::now();
    let got = transfer(&addrs[&leader], shard, victim).await;
    eprintln!("transfer to killed node {victim}: {got:?} after {:?}", started.elapsed());
    assert!(got.is_err(), "a transfer to a dead node must fail: {got:?}");
    let now = c.leader(shard, WAIT).await;
    assert_ne!(now, victim);
    eprintln!("group {shard} still led by node {now} (was {leader})");
    // Writes go on (through a live node).
    c.client(now).send_acked(&alice, alice.user, "after", "after").await;
    // A node that is not a voter is refused outright.
    let err = transfer(&addrs[&leader], shard, 99).await.expect_err("not a voter");
    assert!(err.message().contains("not a voter"), "{err:?}");

    // `rim admin transfer-leader` to the live follower, asked of node `now`.
    let third = c.ids().into_iter().find(|n| *n != now && *n != victim).expect("a live follower");
    let out = rim_command()
        .args(["admin", "--addr", &addrs[&now], "--cluster-secret", SECRET, "transfer-leader"])
        .args([shard.0.to_string(), third.to_string()])
        .output()
        .expect("run rim admin");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout} {}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains(&format!("leader is now node {third}")), "{stdout}");
    assert_eq!(c.leader(shard, WAIT).await, third);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_balancer_spreads_leaders_over_all_nodes() {
    let _g = serial().await;
    let c = ProcCluster::start(3, 3).await;
    let placement = c.placement(1).await;
    let data: Vec<ShardId> = placement.data_shards().map(|s| ShardId(s.shard_id)).collect();
    assert_eq!(data.len(), 3);
    let started = Instant::now();
    let spread = eventually(Duration::from_secs(90), "leaders spread over the 3 nodes", || async {
        let mut leaders = BTreeMap::new();
        for s in &data {
            leaders.insert(*s, c.leader(*s, WAIT).await);
        }
        let mut load: BTreeMap<NodeId, usize> = BTreeMap::new();
        for l in leaders.values() {
            *load.entry(*l).or_default() += 1;
        }
        (load.len() == 3).then_some(leaders)
    })
    .await;
    eprintln!("leaders spread after {:?}: {spread:?}", started.elapsed());
}
