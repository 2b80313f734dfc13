//! The cluster's limits are replicated state (issue 14 §5): nodes whose
//! configurations disagree still apply with one set of limits, those of the
//! bootstrap, on every replica of every group; an admin changes them with
//! `AdminService.SetLimits` and every group's apply follows; no other
//! credential can change them.
//!
//! Before, each node applied with its own configuration: with different
//! `small_group_limit`s, one replica stored a group as small and another as
//! super, and their states diverged.

use rim_node::NodeConfig;
use std::time::Duration;

use rim_proto::ErrorCode;
use rim_proto::ids::{GroupId, ShardId, UserId};
use rim_proto::metadata::CLUSTER_SECRET_METADATA_KEY;
use rim_proto::store::{self, GroupKind as StoredKind, op::Op as O};
use rim_proto::v1::admin_service_client::AdminServiceClient;
use rim_proto::v1::message_service_client::MessageServiceClient;
use rim_proto::v1::*;
use rim_raft_store::Limits;
use rim_testkit::cluster::{Cluster, users_on_two_shards};
use rim_testkit::grpc::{Client, Session, code, endpoint};
use rim_testkit::wait::{WAIT, eventually, serial, wait_for};

/// Data shards of the test clusters.
const SHARDS: u32 = 2;

/// Gives node `id` limits no other node has.
fn disagree(cfg: &mut NodeConfig) {
    let i = cfg.id as usize;
    cfg.small_group_limit = [0, 2, 3, 4][i];
    cfg.cluster_limits.max_content_bytes = [0, 1000, 2000, 4000][i];
}

/// The cluster map's limits, as node 1 knows them.
fn cluster_limits(c: &Cluster) -> ClusterLimits {
    let p = c.node(1).core.placement().expect("a cluster map");
    p.map().limits.expect("the map carries limits")
}

/// Sends `len` bytes from `from` to `to` through `client`.
async fn send_of(client: &Client, from: &Session, to: UserId, cmid: &str, len: usize) -> ErrorCode {
    let input = SendInput {
        conversation_kind: ConversationKind::User as i32,
        conversation_id: to.0,
        client_msg_id: cmid.into(),
        content_type: ContentType::Text as i32,
        content: vec![b'x'; len].into(),
        ..Default::default()
    };
    let mut m = MessageServiceClient::new(client.channel.clone());
    m.send_message(Client::authed(from, input)).await.map_or_else(|e| code(&e), |_| ErrorCode::Ok)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_apply_the_bootstrap_limits_whatever_their_configuration() {
    let _g = serial().await;
    let c = Cluster::start_with(3, SHARDS, disagree).await;
    // Ready means every group applies with the cluster's limits already.
    let want = cluster_limits(&c);
    assert_eq!(want.version, 1);
    let boot = c.configs.values().find(|cfg| cfg.initial_limits().to_proto(1) == want);
    assert!(boot.is_some(), "the limits are one bootstrapping node's: {want:?}");
    for (id, n) in &c.nodes {
        assert_eq!(n.core.limits().as_ref(), &Limits::from_proto(&want).unwrap(), "node {id}'s view");
        for g in n.core.all_groups() {
            assert_eq!(g.reader.limits().unwrap(), Some(want), "node {id}, group {}", g.shard);
        }
    }

    // A size is accepted or refused the same way through every node,
    // whatever that node's own configuration says.
    let client = c.client(1);
    let (alice, bob) = users_on_two_shards(&c, &client, "lim").await;
    let max = want.max_content_bytes as usize;
    for id in 1..=3 {
        let via = c.client(id);
        let fits = send_of(&via, &alice, bob.user, &format!("fits-{id}"), max).await;
        assert_eq!(fits, ErrorCode::Ok, "{max} bytes through node {id}");
        let over = send_of(&via, &alice, bob.user, &format!("over-{id}"), max + 1).await;
        assert_eq!(over, ErrorCode::ErrorContentTooLarge, "{} bytes through node {id}", max + 1);
    }

    // A group of three is small or super by the cluster's limit, on every
    // replica of its shard.
    let carol = client.register_and_sign_in("lim_carol").await;
    let group = client.create_group(&alice, GroupKind::Small, &[bob.user, carol.user]).await;
    let super_group = 3 > want.small_group_limit;
    let kind = if super_group { StoredKind::Super } else { StoredKind::Small };
    assert_eq!(group.kind == GroupKind::Super as i32, super_group, "{group:?}");
    let shard = c.node(1).core.placement().unwrap().shard_of_group(GroupId(group.group_id));
    c.replicas_identical(shard).await;
    for (id, n) in &c.nodes {
        let g = n.core.group(shard).expect("every node hosts every shard");
        let stored = g.reader.group(GroupId(group.group_id)).unwrap().expect("the group");
        assert_eq!(stored.kind(), kind, "node {id} (limit {})", want.small_group_limit);
    }
    for shard in 0..=SHARDS {
        c.replicas_identical(ShardId(shard)).await;
    }
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_meta_leader_seeds_limits_into_a_cluster_that_has_none() {
    use rim_raft_store::db::{self, CF_SM};
    use rim_raft_store::keys::{self, MetaTag};
    use rim_raft_store::{Db, DbOptions};

    let _g = serial().await;
    let mut c = Cluster::start_with(1, 1, |cfg| {
        cfg.small_group_limit = 7;
        cfg.cluster_limits.max_content_bytes = 1000;
    })
    .await;
    let client = c.client(1);
    let alice = client.register_and_sign_in("seed_alice").await;
    let bob = client.register_and_sign_in("seed_bob").await;
    // Make the data what a build before replicated limits left: a map
    // without limits, and groups that store none.
    c.stop_node(1).await;
    {
        let d = Db::open(&DbOptions::new(&c.configs[&1].data)).unwrap();
        let (raw, cf) = (d.raw(), d.cf(CF_SM));
        let key = keys::cluster_map(ShardId(0));
        let mut map: ClusterMap = db::decode(&raw.get_cf(cf, &key).unwrap().unwrap()).unwrap();
        map.limits = None;
        raw.put_cf(cf, &key, db::encode(&map)).unwrap();
        for shard in [0, 1] {
            raw.delete_cf(cf, keys::meta(ShardId(shard), MetaTag::Limits)).unwrap();
        }
    }
    c.start_node(1).await;
    // At once, before anything is seeded: the group's leader holds the send
    // back until its group applies the limits, so it is refused by them,
    // not stored under the built-in defaults (64 KiB).
    let early = eventually(WAIT, "the early send answered", || async {
        let got = send_of(&client, &alice, bob.user, "early", 2000).await;
        (!got.is_retryable()).then_some(got)
    })
    .await;
    assert_eq!(early, ErrorCode::ErrorContentTooLarge);
    // Ready once the limits are back in the map and in every group.
    c.wait_ready().await;
    let want = cluster_limits(&c);
    assert_eq!((want.version, want.small_group_limit), (1, 7), "the meta leader's configuration");
    for g in c.node(1).core.all_groups() {
        assert_eq!(g.reader.limits().unwrap(), Some(want), "group {}", g.shard);
    }
    c.shutdown().await;
}

const ADMIN: &str = "admin-secret-for-tests";
const GATEWAY: &str = "gateway-secret-for-tests";

/// `msg` for node 1's internal listener, presenting `secret` (none: no
/// credential at all).
fn as_caller<T>(secret: Option<&str>, msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    if let Some(s) = secret {
        r.metadata_mut().insert(CLUSTER_SECRET_METADATA_KEY, s.parse().unwrap());
    }
    r
}

fn code_of<T>(r: Result<T, tonic::Status>) -> ErrorCode {
    r.map_or_else(|e| code(&e), |_| ErrorCode::Ok)
}

/// A send of `len` bytes from `from` to `to`, as an operation.
fn send_op(from: &Session, to: UserId, cmid: &str, len: usize) -> store::Op {
    store::Op {
        op: Some(O::SendToUser(store::SendToUser {
            sender_user_id: from.user.0,
            sender_device_id: from.device.0,
            recipient_user_id: to.0,
            client_msg_id: cmid.into(),
            content_type: ContentType::Text as i32,
            content: vec![b'y'; len].into(),
            refers_to: 0,
        })),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_changes_the_limits_and_every_group_applies_them() {
    let _g = serial().await;
    let c = Cluster::start_with(3, SHARDS, |cfg| {
        disagree(cfg);
        cfg.admin_secret = ADMIN.into();
        cfg.gateway_secret = GATEWAY.into();
    })
    .await;
    let mut admin = AdminServiceClient::new(endpoint(&c.configs[&1].listen).connect_lazy());
    let got = admin.get_limits(as_caller(Some(GATEWAY), GetLimitsRequest {})).await.unwrap().into_inner();
    let v1 = got.limits.expect("the cluster's limits");
    assert_eq!(v1, cluster_limits(&c), "read through any credential of the admin service");
    assert_eq!(got.groups.len(), SHARDS as usize + 1);
    assert!(got.groups.iter().all(|g| g.version == 1), "{:?}", got.groups);

    // One sender on each data shard; a message at the limit goes through.
    let client = c.client(1);
    let (alice, bob) = users_on_two_shards(&c, &client, "adm").await;
    let old = v1.max_content_bytes as usize;
    for (from, to) in [(&alice, bob.user), (&bob, alice.user)] {
        assert_eq!(send_of(&client, from, to, &format!("old-{}", from.user), old).await, ErrorCode::Ok);
    }

    // Only the admin may change them, and only to valid values, from the
    // version it read.
    let lower = ClusterLimits { max_content_bytes: 500, ..v1 };
    let set = |limits| SetLimitsRequest { limits: Some(limits) };
    let denied = ErrorCode::ErrorPermissionDenied;
    assert_eq!(code_of(admin.set_limits(as_caller(Some(GATEWAY), set(lower))).await), denied, "a gateway");
    assert_eq!(code_of(admin.set_limits(as_caller(None, set(lower))).await), denied, "no credential");
    let invalid = ClusterLimits { max_op_bytes: 100, ..lower };
    let bad = ErrorCode::ErrorBadRequest;
    assert_eq!(code_of(admin.set_limits(as_caller(Some(ADMIN), set(invalid))).await), bad, "invalid");
    let stale = ClusterLimits { version: 0, ..lower };
    assert_eq!(code_of(admin.set_limits(as_caller(Some(ADMIN), set(stale))).await), bad, "stale version");
    assert_eq!(cluster_limits(&c), v1, "nothing changed");

    let stored = admin.set_limits(as_caller(Some(ADMIN), set(lower))).await.unwrap().into_inner();
    let v2 = stored.limits.unwrap();
    assert_eq!(v2, ClusterLimits { version: 2, ..lower });
    wait_for(WAIT, "every replica of every group at version 2", || {
        let versions = c.nodes.values().flat_map(|n| n.core.all_groups()).map(|g| g.reader.limits());
        versions.map(|l| l.unwrap().map_or(0, |l| l.version)).all(|v| v == 2).then_some(())
    })
    .await;

    // A size accepted before is refused now, through every node and by the
    // apply of every data shard (proposed on the leader, past the node's
    // own check).
    for id in 1..=3 {
        let via = c.client(id);
        for (from, to) in [(&alice, bob.user), (&bob, alice.user)] {
            let got = send_of(&via, from, to, &format!("new-{id}-{}", from.user), old).await;
            assert_eq!(got, ErrorCode::ErrorContentTooLarge, "through node {id}");
        }
    }
    for (from, to) in [(&alice, bob.user), (&bob, alice.user)] {
        let shard = c.shard_of_user(from.user);
        let leader = c.node(c.leader(shard).await).core.group(shard).unwrap();
        let r = leader.propose(send_op(from, to, "raw", old), Duration::from_secs(10)).await.unwrap();
        assert_eq!(r.code, ErrorCode::ErrorContentTooLarge as i32, "apply of group {shard}: {}", r.message);
        let r = leader.propose(send_op(from, to, "raw-small", 500), Duration::from_secs(10)).await.unwrap();
        assert_eq!(r.code, ErrorCode::Ok as i32, "group {shard}: {}", r.message);
    }
    let got = admin.get_limits(as_caller(Some(ADMIN), GetLimitsRequest {})).await.unwrap().into_inner();
    assert_eq!(got.limits, Some(v2));
    for shard in 0..=SHARDS {
        c.replicas_identical(ShardId(shard)).await;
    }
    c.shutdown().await;
}
