//! Real-process group tests: a small group whose members live on every
//! shard keeps one order of its messages in every member's list, also when
//! the leader of the group's shard is SIGKILLed during the traffic.
//!
//! Logs of every process go to `node.log` in its temp dir.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use rim_proto::ids::{GroupId, ShardId, UserId};
use rim_proto::v1::{ContentType, ConversationKind, GroupKind, Message};
use support::*;

/// Signs in users by phone until every shard holds at least `per_shard` of them.
async fn users_on_every_shard(c: &ProcCluster, client: &Client, per_shard: usize) -> Vec<Session> {
    let placement = c.placement(1).await;
    let shards = placement.data_shards().count();
    let mut count: BTreeMap<ShardId, usize> = BTreeMap::new();
    let mut users = Vec::new();
    for i in 0..200 {
        let s = client.phone_sign_in(&format!("+1555000{i:04}")).await;
        let shard = placement.shard_of_user(s.user);
        *count.entry(shard).or_default() += 1;
        users.push(s);
        if count.len() == shards && count.values().all(|n| *n >= per_shard) {
            return users;
        }
    }
    panic!("200 users did not cover all {shards} shards: {count:?}");
}

/// The group's text messages in a member's list, as client_msg_ids in list order.
fn group_texts(list: &[Message], group: GroupId) -> Vec<&Message> {
    list.iter()
        .filter(|m| {
            m.conversation_kind == ConversationKind::Group as i32
                && m.conversation_id == group.0
                && m.content_type == ContentType::Text as i32
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_order_holds_across_a_leader_kill_of_the_group_shard() {
    let _g = serial().await;
    let t0 = Instant::now();
    let mut c = ProcCluster::start(3, 4).await;
    let first = c.client(1);
    let users = users_on_every_shard(&c, &first, 1).await;
    let owner = users[0].clone();
    let members: Vec<UserId> = users.iter().map(|s| s.user).collect();
    let group = first.create_group(&owner, GroupKind::Small, &members).await;
    let gid = GroupId(group.group_id);
    assert_eq!(group.kind, GroupKind::Small as i32);
    assert_eq!(group.member_count as usize, members.len());
    let placement = c.placement(1).await;
    let shard = placement.shard_of_group(gid);
    let victim = c.leader(shard, Duration::from_secs(20)).await;
    eprintln!(
        "group {gid} on shard {shard} led by node {victim}, {} members ({:?})",
        members.len(),
        t0.elapsed()
    );

    // Three senders on different shards send concurrently, each through a
    // node that survives; the group shard's leader dies half way.
    let survivors: Vec<u64> = c.ids().into_iter().filter(|i| *i != victim).collect();
    let senders: Vec<Session> = users.iter().take(3).cloned().collect();
    let mut tasks = Vec::new();
    let (half_tx, mut half_rx) = tokio::sync::mpsc::channel::<()>(8);
    for (k, s) in senders.iter().enumerate() {
        let via = c.client(survivors[k % survivors.len()]);
        let s = s.clone();
        let half_tx = half_tx.clone();
        tasks.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            for i in 0..20 {
                if i == 10 {
                    let _ = half_tx.send(()).await;
                }
                let cmid = format!("g{k}-{i}");
                let text = format!("text {k}/{i}");
                let out = retry(Duration::from_secs(40), &format!("send {cmid}"), || {
                    via.send_group(&s, gid, &cmid, &text)
                })
                .await;
                assert_eq!(out.seq, 0, "group sends report group_seq, not seq");
                acked.push((out.group_seq, out.message_id, cmid));
            }
            acked
        }));
    }
    drop(half_tx);
    half_rx.recv().await.expect("a sender reached half way");
    c.kill(victim);
    eprintln!("SIGKILLed node {victim}, leader of shard {shard} ({:?})", t0.elapsed());
    let mut acked: Vec<(u64, u64, String)> = Vec::new();
    for t in tasks {
        acked.extend(t.await.expect("sender task"));
    }
    assert_eq!(acked.len(), 60);
    // Each sender's acks are in its own send order; group seqs are unique.
    let seqs: BTreeSet<u64> = acked.iter().map(|a| a.0).collect();
    assert_eq!(seqs.len(), 60, "60 distinct group seqs: {acked:?}");
    acked.sort();
    let want: Vec<&str> = acked.iter().map(|a| a.2.as_str()).collect();
    let ids: BTreeMap<&str, (u64, u64)> = acked.iter().map(|a| (a.2.as_str(), (a.0, a.1))).collect();

    c.node(victim).spawn();
    c.node(victim).wait_healthy(Duration::from_secs(40)).await;
    eprintln!("node {victim} back ({:?})", t0.elapsed());

    // Every member, through every node, eventually holds the 60 messages
    // exactly once each, in group-seq order, with the acked ids and seqs.
    for id in c.ids() {
        let client = c.client(id);
        for m in &users {
            let what = format!("user {}'s list through node {id}", m.user);
            let list = eventually(Duration::from_secs(40), &what, || async {
                match client.sync_all(m).await {
                    Ok(l) if group_texts(&l, gid).len() >= 60 => Some(l),
                    Ok(_) => None,
                    Err(e) => {
                        assert!(code(&e).is_retryable(), "{what}: {e:?}");
                        None
                    }
                }
            })
            .await;
            let got = group_texts(&list, gid);
            let got_ids: Vec<&str> = got.iter().map(|m| m.client_msg_id.as_str()).collect();
            assert_eq!(got_ids, want, "{what}: order of the group's messages");
            for msg in got {
                let (gseq, mid) = ids[msg.client_msg_id.as_str()];
                assert_eq!((msg.group_seq, msg.message_id), (gseq, mid), "{what}: {}", msg.client_msg_id);
            }
            let seqs: Vec<u64> = list.iter().map(|m| m.seq).collect();
            assert_eq!(seqs, (1..=list.len() as u64).collect::<Vec<_>>(), "{what}: gap-free seqs");
        }
    }
    eprintln!("group_order_holds_across_a_leader_kill_of_the_group_shard: {:?}", t0.elapsed());
}
