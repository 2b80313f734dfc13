//! The cluster's limits are replicated state (issue 14 §5): nodes whose
//! configurations disagree still apply with one set of limits, those of the
//! bootstrap, on every replica of every group.
//!
//! Before, each node applied with its own configuration: with different
//! `small_group_limit`s, one replica stored a group as small and another as
//! super, and their states diverged.

use rim_node::NodeConfig;
use rim_proto::ErrorCode;
use rim_proto::ids::{GroupId, ShardId, UserId};
use rim_proto::store::GroupKind as StoredKind;
use rim_proto::v1::message_service_client::MessageServiceClient;
use rim_proto::v1::*;
use rim_raft_store::Limits;
use rim_testkit::cluster::{Cluster, users_on_two_shards};
use rim_testkit::grpc::{Client, Session, code};
use rim_testkit::wait::serial;

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
    let mut c = Cluster::start_with(1, 1, |cfg| cfg.small_group_limit = 7).await;
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
    // Ready once the limits are back in the map and in every group.
    c.wait_ready().await;
    let want = cluster_limits(&c);
    assert_eq!((want.version, want.small_group_limit), (1, 7), "the meta leader's configuration");
    for g in c.node(1).core.all_groups() {
        assert_eq!(g.reader.limits().unwrap(), Some(want), "group {}", g.shard);
    }
    c.shutdown().await;
}
