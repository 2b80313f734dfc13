//! Clusters larger than the replication factor: 5 and 7 `rim node`
//! processes with 3 replicas per group bootstrap, elect a leader in every
//! group, serve every request on every node (nodes without a replica of a
//! shard forward writes and reads), deliver between users on every pair of
//! shards, and stay available when any single node is SIGKILLed.
//!
//! Every test before these used three nodes, where every node hosts every
//! group; a 5-node bootstrap then failed at once (nodes outside the meta
//! group's voters tried to initialize it).

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use rim_proto::ids::{GroupId, NodeId, ShardId, UserId};
use rim_proto::v1::gateway_service_client::GatewayServiceClient;
use rim_proto::v1::group_service_client::GroupServiceClient;
use rim_proto::v1::message_service_client::MessageServiceClient;
use rim_proto::v1::user_service_client::UserServiceClient;
use rim_proto::v1::*;
use support::*;

const WAIT: Duration = Duration::from_secs(60);

/// `rim admin status` through node `via` lists every group of the cluster
/// with a leader, although no node hosts them all.
fn admin_status_lists_every_group(c: &ProcCluster, via: NodeId, groups: usize) {
    let out = rim_command()
        .args(["admin", "--addr", &c.nodes[&via].internal, "--cluster-secret", SECRET, "status"])
        .output()
        .expect("run rim admin");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "rim admin status: {stdout}{}", String::from_utf8_lossy(&out.stderr));
    let rows: Vec<(u32, u64)> = stdout
        .lines()
        .skip_while(|l| !l.starts_with("groups, as their leaders report them"))
        .skip(2)
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            Some((w.next()?.parse().ok()?, w.next()?.parse().ok()?))
        })
        .collect();
    assert_eq!(rows.len(), groups, "every group listed:\n{stdout}");
    assert!(rows.iter().all(|(_, leader)| *leader != 0), "every group has a leader:\n{stdout}");
}

/// One phone user per data shard, each signed in through a different node.
async fn one_user_per_shard(c: &ProcCluster, tag: &str) -> BTreeMap<ShardId, Session> {
    let placement = c.placement(1).await;
    let shards: BTreeSet<ShardId> = placement.data_shards().map(|s| ShardId(s.shard_id)).collect();
    let ids = c.ids();
    let mut users = BTreeMap::new();
    for i in 0..400u64 {
        let via = ids[i as usize % ids.len()];
        let s = c.client(via).phone_sign_in(&format!("+49{tag}{i:06}")).await;
        users.entry(placement.shard_of_user(s.user)).or_insert(s);
        if users.len() == shards.len() {
            return users;
        }
    }
    panic!("no user on some shard: {:?} of {shards:?}", users.keys().collect::<Vec<_>>());
}

/// Every group of the map has a leader that every running node agrees on,
/// and every node holds a replica of the meta group (voter or learner), so
/// every node knows the map.
async fn check_layout(c: &ProcCluster) {
    let placement = c.placement(1).await;
    for s in placement.shards() {
        let shard = ShardId(s.shard_id);
        let l = c.leader(shard, WAIT).await;
        assert!(placement.replicas_of(shard).contains(&l), "leader {l} of {shard} is not a voter");
    }
    for id in c.ids() {
        let p = c.placement(id).await;
        assert_eq!(p.shards().len(), placement.shards().len(), "node {id} knows the map");
        let status = retry(WAIT, "cluster_status", || c.status(id)).await;
        let hosted: BTreeSet<ShardId> = status.groups.iter().map(|g| ShardId(g.group_id)).collect();
        let expected: BTreeSet<ShardId> =
            placement.shards_on_node(id).into_iter().chain([rim_cluster::META_SHARD]).collect();
        assert_eq!(hosted, expected, "node {id} hosts exactly its groups and the meta group");
        let meta =
            status.groups.iter().find(|g| g.group_id == rim_cluster::META_SHARD.0).expect("meta group");
        assert!(meta.leader_node_id != 0, "node {id} knows the meta leader");
    }
}

/// For every ordered pair of shards, the user on the first sends to the user
/// on the second through a rotating running node; every message shows up
/// in the recipient's list (read through yet another node).
async fn sends_between_every_pair(c: &ProcCluster, users: &BTreeMap<ShardId, Session>, tag: &str) {
    let running: Vec<NodeId> = c.nodes.values().filter(|n| n.is_running()).map(|n| n.id).collect();
    let mut expected: BTreeMap<UserId, Vec<String>> = BTreeMap::new();
    let mut k = 0usize;
    for (sa, a) in users {
        for (sb, b) in users {
            if a.user == b.user {
                continue;
            }
            let via = running[k % running.len()];
            k += 1;
            let cmid = format!("{tag}-{sa}-{sb}");
            c.client(via).send_acked(a, b.user, &cmid, &cmid).await;
            expected.entry(b.user).or_default().push(cmid);
        }
    }
    for (i, (user, cmids)) in expected.iter().enumerate() {
        let s = users.values().find(|s| s.user == *user).expect("session");
        let via = running[(k + i) % running.len()];
        let client = c.client(via);
        eventually(WAIT, &format!("user {user} received {tag}"), || async {
            let list = client.sync_all(s).await.ok()?;
            let got: BTreeSet<String> = list.iter().map(|m| m.client_msg_id.clone()).collect();
            cmids.iter().all(|x| got.contains(x)).then_some(())
        })
        .await;
    }
}

/// A node that hosts no replica of `shard`.
fn outsider(placement: &rim_cluster::Placement, shard: ShardId) -> Option<NodeId> {
    let voters = placement.replicas_of(shard);
    placement.nodes().iter().map(|n| n.node_id).find(|id| !voters.contains(id))
}

/// Requests of every kind, each sent to a node without a replica of the
/// shards involved: the node forwards the writes and the reads.
async fn everything_on_nodes_without_a_replica(c: &ProcCluster, users: &BTreeMap<ShardId, Session>) {
    let placement = c.placement(1).await;
    for (shard, s) in users {
        let Some(out) = outsider(&placement, *shard) else { continue };
        let client = c.client(out);
        // User reads: profile, own list, devices, conversations.
        let u = UserServiceClient::new(client.channel.clone());
        let me = retry(WAIT, "get_user", || {
            let r = Client::authed(s, GetUserRequest { user_id: s.user.0 });
            let mut u = u.clone();
            async move { u.get_user(r).await.map(|r| r.into_inner()) }
        })
        .await;
        assert_eq!(me.user.map(|x| x.user_id), Some(s.user.0));
        let list = retry(WAIT, "sync on an outsider", || client.sync_all(s)).await;
        assert!(!list.is_empty(), "user {} has messages", s.user);
        let m = MessageServiceClient::new(client.channel.clone());
        let conv = retry(WAIT, "list_conversations", || {
            let r = Client::authed(s, ListConversationsRequest::default());
            let mut m = m.clone();
            async move { m.list_conversations(r).await.map(|r| r.into_inner()) }
        })
        .await;
        assert!(!conv.conversations.is_empty(), "conversations of {}", s.user);
    }

    // Groups: a small group and a super group with a member on every shard,
    // created, written and read through nodes without the group's replica.
    let owner = users.values().next().expect("a user");
    let members: Vec<UserId> = users.values().map(|s| s.user).filter(|u| *u != owner.user).collect();
    for kind in [GroupKind::Small, GroupKind::Super] {
        let g = c.client(1).create_group(owner, kind, &members).await;
        let gid = GroupId(g.group_id);
        let gshard = placement.shard_of_group(gid);
        let Some(out) = outsider(&placement, gshard) else { continue };
        let client = c.client(out);
        let cmid = format!("group-{}", g.group_id);
        retry(WAIT, "send_group on an outsider", || client.send_group(owner, gid, &cmid, "hi all")).await;
        for s in users.values() {
            let gs = GroupServiceClient::new(client.channel.clone());
            let got = retry(WAIT, "get_group on an outsider", || {
                let r = Client::authed(s, GetGroupRequest { group_id: g.group_id });
                let mut gs = gs.clone();
                async move { gs.get_group(r).await.map(|r| r.into_inner()) }
            })
            .await;
            assert_eq!(got.group.map(|x| x.group_id), Some(g.group_id));
            eventually(WAIT, "the group in list_my_groups on an outsider", || {
                let r = Client::authed(s, ListMyGroupsRequest::default());
                let mut gs = gs.clone();
                async move {
                    let mine = gs.list_my_groups(r).await.ok()?.into_inner();
                    mine.groups.iter().any(|x| x.group_id == g.group_id).then_some(())
                }
            })
            .await;
            if kind == GroupKind::Super {
                let feed = retry(WAIT, "sync_group on an outsider", || client.sync_group_all(s, gid)).await;
                assert!(
                    feed.iter().any(|m| m.client_msg_id == cmid),
                    "user {} reads the super group",
                    s.user
                );
            } else {
                eventually(WAIT, "small-group message in every member's list", || async {
                    let list = client.sync_all(s).await.ok()?;
                    list.iter().any(|m| m.client_msg_id == cmid).then_some(())
                })
                .await;
            }
        }
    }

    // The gateway-facing service of an outsider: a connection sign-in of a
    // user whose shard it does not host (token checked by a forwarded read).
    for (shard, s) in users {
        let Some(out) = outsider(&placement, *shard) else { continue };
        let gw = GatewayServiceClient::new(endpoint(&c.nodes[&out].internal).connect_lazy());
        let reply = retry(WAIT, "conn_sign_in on an outsider", || {
            let r = with_secret(ConnSignInRequest {
                conn: Some(ConnContext {
                    user_id: s.user.0,
                    device_id: s.device.0,
                    gateway_id: "sizes-test".into(),
                    conn_id: 1,
                    client_addr: "127.0.0.1:1".into(),
                    token_version: None,
                }),
                input: Some(SignInInput { user_id: s.user.0, device_id: s.device.0, token: s.token.clone() }),
            });
            let mut gw = gw.clone();
            async move { gw.conn_sign_in(r).await.map(|r| r.into_inner()) }
        })
        .await;
        assert_eq!(reply.output.map(|o| o.user_id), Some(s.user.0));
        // A forged token is refused there too.
        let r = with_secret(ConnSignInRequest {
            conn: None,
            input: Some(SignInInput { user_id: s.user.0, device_id: s.device.0, token: "forged".into() }),
        });
        let err = gw.clone().conn_sign_in(r).await.expect_err("forged token");
        assert!(!code(&err).is_retryable(), "forged token: {err:?}");
    }
}

/// Sign-in over a gateway for the user of every shard, then a message from
/// each to each: every push arrives on its connection.
async fn chat_over_a_gateway(c: &ProcCluster, users: &BTreeMap<ShardId, Session>, tag: &str) {
    let gw = GatewayProc::start(&format!("gw-{tag}"), &c.internal_addrs()).await;
    let mut conns = Vec::new();
    for s in users.values() {
        conns.push((s.clone(), Conn::sign_in(&gw.tcp, s).await.0));
    }
    for i in 0..conns.len() {
        for j in 0..conns.len() {
            if i == j {
                continue;
            }
            let to = conns[j].0.user.0;
            let send = SendInput {
                conversation_kind: ConversationKind::User as i32,
                conversation_id: to,
                client_msg_id: format!("{tag}-gw-{i}-{j}"),
                content_type: ContentType::Text as i32,
                content: b"over the gateway".to_vec().into(),
                ..Default::default()
            };
            let (_, conn) = &mut conns[i];
            conn.call(Command::Send, &send).await.unwrap_or_else(|r| panic!("send {i}->{j}: {r:?}"));
        }
    }
    let n = conns.len();
    for (j, (s, conn)) in conns.iter_mut().enumerate() {
        let want: BTreeSet<String> =
            (0..n).filter(|i| *i != j).map(|i| format!("{tag}-gw-{i}-{j}")).collect();
        let got = conn
            .messages_until(WAIT, |ms| {
                let have: BTreeSet<&str> = ms.iter().map(|m| m.client_msg_id.as_str()).collect();
                want.iter().all(|w| have.contains(w.as_str()))
            })
            .await;
        let have: BTreeSet<String> = got.iter().map(|m| m.client_msg_id.clone()).collect();
        assert!(want.is_subset(&have), "user {} got {have:?}, wants {want:?}\n{}", s.user, gw.log_tail(30));
    }
}

/// Kills each node in turn: with any one node down, every group still has
/// a quorum, and sends between every pair of shards go through.
async fn survives_any_single_kill(c: &mut ProcCluster, users: &BTreeMap<ShardId, Session>) {
    for id in c.ids() {
        c.kill(id);
        sends_between_every_pair(c, users, &format!("without-{id}")).await;
        c.node(id).spawn();
        c.wait_all_healthy(WAIT).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_nodes_bootstrap_serve_everywhere_and_survive_any_kill() {
    let _g = serial().await;
    let mut c = ProcCluster::start(5, 4).await;
    check_layout(&c).await;
    admin_status_lists_every_group(&c, 5, 5);
    let users = one_user_per_shard(&c, "5").await;
    sends_between_every_pair(&c, &users, "boot").await;
    everything_on_nodes_without_a_replica(&c, &users).await;
    chat_over_a_gateway(&c, &users, "five").await;
    survives_any_single_kill(&mut c, &users).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seven_nodes_bootstrap_serve_and_survive_any_kill() {
    let _g = serial().await;
    let mut c = ProcCluster::start(7, 6).await;
    check_layout(&c).await;
    let users = one_user_per_shard(&c, "7").await;
    sends_between_every_pair(&c, &users, "boot").await;
    survives_any_single_kill(&mut c, &users).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_start_in_any_order_with_any_replication() {
    let _g = serial().await;
    // Replication 1 on 4 nodes; node 4 comes up only once the others serve.
    let mut c = ProcCluster::create(4, 4, &["--replication", "1"]);
    for id in [2, 3, 1] {
        c.node(id).spawn();
    }
    c.wait_all_healthy(WAIT).await;
    c.node(4).spawn();
    c.wait_all_healthy(WAIT).await;
    check_layout(&c).await;
    let users = one_user_per_shard(&c, "4").await;
    sends_between_every_pair(&c, &users, "boot").await;
    // Every node restarted, in another order: every group and its data come back.
    for id in [3, 1, 4, 2] {
        c.kill(id);
    }
    for id in [4, 2, 1, 3] {
        c.node(id).spawn();
    }
    c.wait_all_healthy(WAIT).await;
    check_layout(&c).await;
    sends_between_every_pair(&c, &users, "after-restart").await;

    // A single node is a cluster too.
    drop(c);
    let c = ProcCluster::start(1, 2).await;
    check_layout(&c).await;
    let users = one_user_per_shard(&c, "1").await;
    sends_between_every_pair(&c, &users, "single").await;

    // Replication 5 on 5 nodes: every group (the meta group too) has 5
    // voters, so any two nodes may be down at once.
    drop(c);
    let mut c = ProcCluster::start_with(5, 2, &["--replication", "5"]).await;
    check_layout(&c).await;
    let placement = c.placement(1).await;
    assert!(placement.shards().iter().all(|s| s.replicas.len() == 5), "5 voters everywhere");
    let users = one_user_per_shard(&c, "55").await;
    sends_between_every_pair(&c, &users, "r5").await;
    c.kill(1);
    c.kill(4);
    sends_between_every_pair(&c, &users, "r5-two-down").await;
}
