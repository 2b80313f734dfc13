//! Starting and stopping a logic node.
//!
//! Start-up order: open the database, open the meta group, learn which
//! groups to host (from the local meta replica's cluster map; for a new
//! cluster from the bootstrap peers; for a joining node from a seed), start
//! those groups, bind and serve the listeners, then background tasks: the
//! bootstrap of a new cluster, the cluster-map refresher, the propagation of
//! the cluster's limits, one outbox relay per data shard, and the HTTP
//! endpoints.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use openraft::BasicNode;
use rim_cluster::{LinkTls, Placement};
use rim_proto::ids::ShardId;
use rim_proto::server_api::server_api_server::ServerApiServer;
use rim_proto::store::{self, op::Op as O};
use rim_proto::v1::admin_service_client::AdminServiceClient;
use rim_proto::v1::admin_service_server::AdminServiceServer;
use rim_proto::v1::auth_service_server::AuthServiceServer;
use rim_proto::v1::friend_service_server::FriendServiceServer;
use rim_proto::v1::gateway_service_server::GatewayServiceServer;
use rim_proto::v1::group_service_server::GroupServiceServer;
use rim_proto::v1::message_service_server::MessageServiceServer;
use rim_proto::v1::push_service_server::PushServiceServer;
use rim_proto::v1::raft_service_server::RaftServiceServer;
use rim_proto::v1::user_service_server::UserServiceServer;
use rim_proto::v1::{ClusterMap, GetClusterMapRequest, NodeInfo, NodeState};
use rim_raft_store::{ApplySabotage, Db, DbOptions};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::service::interceptor::InterceptedService;

use crate::auth::{CodeVerifier, FixedCodeVerifier, NoCodeVerifier};
use crate::config::NodeConfig;
use crate::core::{Core, META};
use crate::credentials::Credentials;
use crate::error::{Error, Result};
use crate::group::{Group, ProposerOptions};
use crate::net::{LinkFilter, Peers};
use crate::service::{AdminSvc, ClientSvc, GatewaySvc, PushSvc, RaftSvc, ServerApiSvc};

/// Options of [`Node::start`] beyond the configuration.
#[derive(Clone, Default)]
pub struct NodeOptions {
    /// Cuts links between nodes (tests only).
    pub link_filter: Option<LinkFilter>,
}

/// A running logic node. Dropping it does not stop it; call [`Node::shutdown`].
pub struct Node {
    /// Shared state (for tests and embedding).
    pub core: Arc<Core>,
    /// The database; closed when the last group using it is gone.
    db: Db,
    tasks: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node").field("id", &self.core.id()).finish()
    }
}

/// Most entries in one `AppendEntries` (openraft's default is 300).
const MAX_PAYLOAD_ENTRIES: u64 = 8;

fn raft_config(c: &NodeConfig) -> Result<Arc<openraft::Config>> {
    let cfg = openraft::Config {
        cluster_name: "rim".into(),
        heartbeat_interval: c.heartbeat_ms,
        election_timeout_min: c.election_min_ms,
        election_timeout_max: c.election_max_ms,
        install_snapshot_timeout: 5_000,
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(c.snapshot_after),
        max_in_snapshot_log_to_keep: c.keep_logs_after_snapshot,
        purge_batch_size: (c.snapshot_after / 4).clamp(1, 256),
        // openraft bounds an AppendEntries by entry count only, and times it
        // out after one heartbeat interval; with entries of up to
        // `MAX_ENTRY_BYTES` this keeps one RPC at a few MiB, which a loaded
        // follower can take and fsync within that time.
        max_payload_entries: MAX_PAYLOAD_ENTRIES,
        ..Default::default()
    };
    Ok(Arc::new(cfg.validate().map_err(|e| Error::Config(e.to_string()))?))
}

async fn bind(addr: &str) -> Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|e| Error::Config(format!("cannot listen on {addr}: {e}")))
}

/// The map a new cluster starts with, from the bootstrap peers, with the
/// limits of this node's configuration.
fn bootstrap_map(c: &NodeConfig) -> Result<ClusterMap> {
    let nodes: Vec<NodeInfo> = c
        .peers
        .iter()
        .map(|(id, addr)| NodeInfo {
            node_id: *id,
            state: NodeState::Active as i32,
            internal_addr: addr.clone(),
            ..Default::default()
        })
        .collect();
    let map = rim_cluster::bootstrap_map(&nodes, c.shards, c.slots, c.replication)
        .map_err(|e| Error::Config(e.to_string()))?;
    Ok(ClusterMap { limits: Some(c.initial_limits().to_proto(1)), ..map })
}

impl Node {
    /// Starts a node; returns once its listeners accept connections.
    pub async fn start(config: NodeConfig, opts: NodeOptions) -> Result<Node> {
        config.validate()?;
        if config.sabotage.any() {
            tracing::error!(
                node = config.id,
                sabotage = %config.sabotage,
                "SABOTAGE ON: this node deliberately breaks safety (consistency self-test only); \
                 acknowledged writes can be lost, duplicated or read stale. Never use it for real data."
            );
        }
        let db = Db::open(&DbOptions {
            sync: config.fsync,
            skip_fsync: config.sabotage.skip_fsync,
            ..DbOptions::new(&config.data)
        })?;
        if !config.fsync {
            tracing::warn!("fsync is OFF: acknowledged writes can be lost on a crash");
        }
        let tokens = config.token_keys()?;
        let codes: Arc<dyn CodeVerifier> = match &config.dev_code {
            Some(code) => Arc::new(FixedCodeVerifier::new(code.clone())),
            None => Arc::new(NoCodeVerifier),
        };
        let tls = match &config.tls {
            Some(files) => Some(LinkTls::load(files).map_err(|e| Error::Config(format!("tls: {e}")))?),
            None => None,
        };
        let peers = Peers::new(
            config.id,
            config.cluster_secret.clone(),
            opts.link_filter.clone(),
            config.peer_via.clone(),
            tls,
        );
        let sabotage = ApplySabotage { no_relay_dedup: config.sabotage.no_relay_dedup };
        let core = Arc::new(Core::new(config.clone(), peers, tokens, codes));
        let internal = bind(&config.listen).await?;
        let client = bind(&config.client_listen).await?;
        let http = bind(&config.http_listen).await?;

        let raft = raft_config(&config)?;
        let popts = ProposerOptions {
            max_batch_ops: config.max_batch_ops,
            max_inflight: config.max_inflight_proposals,
            ack_before_commit: config.sabotage.ack_before_commit,
        };
        let start_group = |shard: ShardId| {
            let (core, raft, db) = (core.clone(), raft.clone(), db.clone());
            async move {
                let g =
                    Group::start(core.id(), &db, shard, sabotage, raft, core.peers.clone(), popts).await?;
                core.groups.write().expect("groups lock").insert(shard, g.clone());
                Ok::<_, Error>(g)
            }
        };
        start_group(META).await?;
        core.refresh_placement()?;

        // Which groups live here, and the membership of a new cluster.
        let mut init: Option<ClusterMap> = None;
        let shards: Vec<ShardId> = if let Ok(p) = core.placement() {
            p.shards_on_node(core.id())
        } else if config.bootstrap {
            let map = bootstrap_map(&config)?;
            let p = Placement::new(map.clone()).map_err(|e| Error::Config(e.to_string()))?;
            init = Some(map);
            p.shards_on_node(core.id())
        } else if let Some(seed) = &config.join {
            let map = fetch_map(&core, seed).await?;
            map.shards.iter().map(|s| ShardId(s.shard_id)).collect()
        } else {
            return Err(Error::Config(format!(
                "{} holds no cluster yet: start with --bootstrap --peers ... or --join SEED",
                config.data.display()
            )));
        };
        // Plus every group this node holds Raft state for (e.g. replicas
        // added by `admin add-node`, which the map does not list).
        let mut shards: std::collections::BTreeSet<ShardId> = shards.into_iter().collect();
        shards.extend(db.shards_with_state()?);
        for s in shards.into_iter().filter(|s| *s != META) {
            start_group(s).await?;
        }

        let mut tasks = Vec::new();
        let (internal_server, client_server) = (server_builder(&core, true)?, server_builder(&core, false)?);
        tasks.push(tokio::spawn(serve_internal(core.clone(), internal_server, internal)));
        tasks.push(tokio::spawn(serve_client(core.clone(), client_server, client)));
        let http_core = core.clone();
        tasks.push(tokio::spawn(async move {
            if let Err(e) = crate::http::serve(http_core, http).await {
                tracing::error!(error = %e, "http server stopped");
            }
        }));
        if let Some(map) = init {
            initialize(&core, &map).await?;
            tasks.push(tokio::spawn(publish_initial_map(core.clone(), map)));
        }
        tasks.push(tokio::spawn(maintain_map(core.clone())));
        tasks.push(tokio::spawn(keep_meta_learners(core.clone())));
        tasks.push(tokio::spawn(crate::balance::run(core.clone())));
        tasks.push(tokio::spawn(crate::limits::propagate(core.clone())));
        if let Some(jwks) = core.jwt.as_ref().and_then(|j| j.jwks()) {
            tasks.push(tokio::spawn(jwks.clone().run()));
        }
        for g in core.all_groups() {
            tasks.push(tokio::spawn(watch_leader(g.clone())));
            if g.shard != META {
                tasks.extend(crate::webhooks::spawn(&core, &g));
                tasks.push(tokio::spawn(crate::due::run(core.clone(), g.clone())));
                tasks.push(tokio::spawn(crate::sessions::run(core.clone(), g.clone())));
                tasks.push(tokio::spawn(crate::relay::run(core.clone(), g)));
            }
        }
        tracing::info!(
            node = core.id(),
            internal = %config.listen,
            client = %config.client_listen,
            http = %config.http_listen,
            groups = core.all_groups().len(),
            "node started"
        );
        Ok(Node { core, db, tasks })
    }

    /// Stops every server, task and group of the node, and returns once the
    /// database is closed (so the data directory can be reopened at once),
    /// or after 10 s if an embedder still holds a group (then it closes when
    /// that handle drops).
    pub async fn shutdown(self) {
        let Node { core, db, mut tasks } = self;
        core.stopping.send_replace(true);
        // Servers drain (graceful), background loops are aborted.
        let servers: Vec<_> = tasks.drain(..2).collect();
        for t in &tasks {
            t.abort();
        }
        for t in servers {
            let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
        }
        for t in tasks {
            let _ = t.await;
        }
        for g in core.all_groups() {
            let _ = g.raft.shutdown().await;
        }
        core.groups.write().expect("groups lock").clear();
        drop(core);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while db.handles() > 1 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if db.handles() > 1 {
            tracing::warn!(handles = db.handles(), "database still referenced after shutdown");
        }
    }

    /// Waits until every hosted group has a leader and applies with the
    /// cluster's limits (or the timeout passes).
    pub async fn wait_ready(&self, timeout: Duration) -> Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let groups = self.core.all_groups();
            let _ = self.core.refresh_placement();
            let led = groups.iter().all(|g| g.leader().is_some()) && self.core.placement().is_ok();
            if led && crate::limits::behind(&self.core).is_empty() {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                let what = if led { "groups behind the cluster's limits" } else { "groups without a leader" };
                return Err(Error::Timeout(what.into()));
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

/// Initializes the groups of a new cluster that this node is a voter of,
/// with the map's voters (idempotent: an already initialized group is left
/// alone). Every voter of a group initializes it with the same membership,
/// so whichever starts first, they agree; a node that is not a voter of a
/// group (the meta group on a cluster larger than its voter count, a data
/// shard on a cluster larger than the replication factor) leaves it alone
/// and is brought in by the group's leader (as a meta learner, see
/// [`keep_meta_learners`]).
async fn initialize(core: &Core, map: &ClusterMap) -> Result<()> {
    let addr = |id: u64| {
        map.nodes.iter().find(|n| n.node_id == id).map(|n| n.internal_addr.clone()).unwrap_or_default()
    };
    let voter = |r: &rim_proto::v1::Replica| r.role != rim_proto::v1::ReplicaRole::Learner as i32;
    for shard in &map.shards {
        if !shard.replicas.iter().any(|r| r.node_id == core.id() && voter(r)) {
            continue;
        }
        let Some(g) = core.group(ShardId(shard.shard_id)) else { continue };
        let members: BTreeMap<u64, BasicNode> = shard
            .replicas
            .iter()
            .filter(|r| voter(r))
            .map(|r| (r.node_id, BasicNode { addr: addr(r.node_id) }))
            .collect();
        match g.raft.initialize(members).await {
            Ok(()) => tracing::info!(group = shard.shard_id, "initialized"),
            Err(openraft::error::RaftError::APIError(openraft::error::InitializeError::NotAllowed(_))) => {}
            Err(e) => return Err(Error::Internal(format!("initializing group {}: {e}", shard.shard_id))),
        }
    }
    Ok(())
}

/// Writes the bootstrap map into the meta group (once; later attempts lose
/// the compare-and-set harmlessly).
async fn publish_initial_map(core: Arc<Core>, map: ClusterMap) {
    loop {
        if core.placement().is_ok() {
            return;
        }
        let op = store::Op { op: Some(O::SetClusterMap(store::SetClusterMap { map: Some(map.clone()) })) };
        match core.propose_raw(META, op).await {
            Ok(_) => {
                let _ = core.refresh_placement();
                if core.placement().is_ok() {
                    return;
                }
            }
            Err(e) => tracing::debug!(error = %e, "publishing the initial cluster map"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// On the meta group's leader: makes every node that holds a replica of a
/// data shard a learner of the meta group unless it is a voter, and drops
/// learners that hold none any more (removed nodes).
///
/// The meta group has a few voters (`META_REPLICATION`, or the replication
/// factor); on a larger cluster the other nodes would not know the cluster
/// map. As learners they receive every map version as it commits, read it
/// from their own replica (routing, `GetClusterMap` for gateways) and know
/// the meta leader, without weighing on its quorum.
async fn keep_meta_learners(core: Arc<Core>) {
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let (Some(meta), Ok(p)) = (core.group(META), core.placement()) else { continue };
        if !meta.is_leader() {
            continue;
        }
        let membership = meta.raft.metrics().borrow().membership_config.membership().clone();
        let voters: std::collections::BTreeSet<u64> = membership.voter_ids().collect();
        let members: std::collections::BTreeSet<u64> = membership.nodes().map(|(id, _)| *id).collect();
        let holds_data = |id: u64| p.data_shards().any(|s| s.replicas.iter().any(|r| r.node_id == id));
        for n in p.nodes() {
            let wanted =
                n.state == NodeState::Active as i32 && holds_data(n.node_id) && !n.internal_addr.is_empty();
            if wanted && !members.contains(&n.node_id) {
                let node = BasicNode { addr: n.internal_addr.clone() };
                match meta.raft.add_learner(n.node_id, node, false).await {
                    Ok(_) => tracing::info!(node = n.node_id, "node added to the meta group as a learner"),
                    Err(e) => tracing::debug!(node = n.node_id, error = %e, "adding a meta learner"),
                }
            }
        }
        let stale: std::collections::BTreeSet<u64> = members
            .iter()
            .copied()
            .filter(|id| !voters.contains(id) && p.node(*id).is_some() && !holds_data(*id))
            .collect();
        if !stale.is_empty() {
            let change = openraft::ChangeMembers::RemoveNodes(stale.clone());
            match meta.raft.change_membership(change, false).await {
                Ok(_) => tracing::info!(nodes = ?stale, "meta learners without replicas removed"),
                Err(e) => tracing::debug!(error = %e, "removing meta learners"),
            }
        }
    }
}

/// Keeps the cached map fresh and this node's addresses in it current.
async fn maintain_map(core: Arc<Core>) {
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tick.tick().await;
        if let Err(e) = core.refresh_placement() {
            tracing::warn!(error = %e, "reading the cluster map");
            continue;
        }
        let Ok(p) = core.placement() else { continue };
        let c = &core.config;
        let me = NodeInfo {
            node_id: c.id,
            state: NodeState::Active as i32,
            internal_addr: c.listen.clone(),
            client_addr: c.client_listen.clone(),
            http_addr: c.http_listen.clone(),
        };
        if p.node(c.id) == Some(&me) {
            continue;
        }
        let mut map = p.map().clone();
        map.nodes.retain(|n| n.node_id != c.id);
        map.nodes.push(me);
        map.nodes.sort_by_key(|n| n.node_id);
        map.version += 1;
        let op = store::Op { op: Some(O::SetClusterMap(store::SetClusterMap { map: Some(map) })) };
        if let Err(e) = core.propose(META, op).await {
            tracing::debug!(error = %e, "registering this node's addresses");
        }
    }
}

/// Counts leader changes of a group.
async fn watch_leader(g: Arc<Group>) {
    let mut rx = g.raft.metrics();
    let mut last = rx.borrow().current_leader;
    while rx.changed().await.is_ok() {
        let now = rx.borrow().current_leader;
        if now != last {
            metrics::counter!("rim_leader_changes_total", "group" => g.shard.0.to_string()).increment(1);
            tracing::info!(group = %g.shard, leader = ?now, "leader changed");
            last = now;
        }
    }
}

async fn fetch_map(core: &Core, seed: &str) -> Result<ClusterMap> {
    let ch = rim_cluster::tls::endpoint(seed, core.peers.tls())
        .map_err(|e| Error::Config(e.to_string()))?
        .connect()
        .await
        .map_err(|e| Error::Unavailable(format!("seed {seed}: {e}")))?;
    let mut client = AdminServiceClient::new(ch);
    let req = core.peers.request(GetClusterMapRequest { known_version: 0 }, core.timeout);
    let map =
        client.get_cluster_map(req).await.map_err(|e| Error::Unavailable(format!("seed {seed}: {e}")))?;
    map.into_inner().map.ok_or_else(|| Error::Unavailable("seed has no cluster map".into()))
}

async fn serve_internal(core: Arc<Core>, builder: tonic::transport::Server, listener: TcpListener) {
    use crate::credentials::Role;
    let creds = match Credentials::from_config(&core.config) {
        Ok(c) => c,
        Err(e) => return tracing::error!(error = %e, "internal listener not started"),
    };
    creds.warn_fallbacks(&core.config);
    let raft = InterceptedService::new(
        RaftServiceServer::new(RaftSvc { core: core.clone() })
            .max_decoding_message_size(crate::net::RAFT_MESSAGE_LIMIT)
            .max_encoding_message_size(crate::net::RAFT_MESSAGE_LIMIT),
        creds.interceptor("RaftService", |r| *r == Role::Peer),
    );
    let gateway = GatewayServiceServer::with_interceptor(
        GatewaySvc { core: core.clone() },
        creds.interceptor("GatewayService", |r| matches!(r, Role::Peer | Role::Gateway)),
    );
    // Which push methods a key may call is the handlers' check (scopes).
    let push = PushServiceServer::with_interceptor(
        PushSvc { core: core.clone() },
        creds.interceptor("PushService", |r| matches!(r, Role::Peer | Role::Push { .. })),
    );
    // The server API: as the push API, scopes checked per method.
    let server_api = InterceptedService::new(
        ServerApiServer::new(ServerApiSvc { core: core.clone() })
            .max_decoding_message_size(crate::http_api::MAX_BODY_BYTES),
        creds.api_interceptor("ServerApi", |r| matches!(r, Role::Peer | Role::Push { .. })),
    );
    // Gateways read the map; changes need an admin (the handlers' check).
    let admin = AdminServiceServer::with_interceptor(
        AdminSvc { core: core.clone() },
        creds.interceptor("AdminService", |r| matches!(r, Role::Peer | Role::Admin | Role::Gateway)),
    );
    // Authenticated peers only: no request timeout (a snapshot upload and
    // a push subscription run as long as they need) and no per-connection
    // limit (a gateway multiplexes its connections' calls on a few
    // channels); keepalive finds dead peers.
    let res = builder
        .http2_keepalive_interval(Some(crate::grpc::KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(crate::grpc::KEEPALIVE_TIMEOUT))
        .layer(tower::util::MapResponseLayer::new(crate::grpc::fill_rim_code))
        .add_service(raft)
        .add_service(gateway)
        .add_service(push)
        .add_service(server_api)
        .add_service(admin)
        .serve_with_incoming_shutdown(incoming(listener), async move { core.stopped().await })
        .await;
    if let Err(e) = res {
        tracing::error!(error = %e, "internal listener stopped");
    }
}

/// A gRPC server builder, serving TLS when the node has it (`verify_clients`:
/// require client certificates if the configuration asks for mutual TLS).
fn server_builder(core: &Core, verify_clients: bool) -> Result<tonic::transport::Server> {
    let builder = tonic::transport::Server::builder();
    let Some(tls) = core.peers.tls() else { return Ok(builder) };
    let config = tls.server(verify_clients).map_err(|e| Error::Config(format!("tls: {e}")))?;
    builder.tls_config(config).map_err(|e| Error::Config(format!("tls: {e}")))
}

/// The accepted connections of `listener`, with Nagle's algorithm off.
///
/// tonic ignores its own `tcp_nodelay` setting for an incoming stream, and
/// with Nagle on, a small reply written while the peer delays its ACK waited
/// up to 40 ms: 1:1 sends at 300 msg/s had an ack p90 of 57 ms, most of it
/// that wait (docs/benchmarks.md).
fn incoming(listener: TcpListener) -> impl futures::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    TcpListenerStream::new(listener).map(|accepted| {
        accepted.inspect(|stream| {
            if let Err(e) = stream.set_nodelay(true) {
                tracing::debug!(error = %e, "cannot turn Nagle's algorithm off");
            }
        })
    })
}

async fn serve_client(core: Arc<Core>, builder: tonic::transport::Server, listener: TcpListener) {
    let svc = ClientSvc { core: core.clone() };
    let limit = crate::grpc::MAX_CLIENT_REQUEST;
    // Every client is a stranger: bounded concurrent calls per connection,
    // every call done (or cut off) within the node's own deadline plus the
    // wait for a password-hashing slot, and keepalive to drop dead peers.
    let per_connection = core.config.limits.grpc_calls_per_connection.max(1);
    let deadline = core.timeout + crate::throttle::HASH_WAIT + crate::grpc::KEEPALIVE_TIMEOUT;
    let res = builder
        .concurrency_limit_per_connection(per_connection)
        .max_concurrent_streams(u32::try_from(per_connection).ok())
        .timeout(deadline)
        .http2_keepalive_interval(Some(crate::grpc::KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(crate::grpc::KEEPALIVE_TIMEOUT))
        .layer(tower::util::MapResponseLayer::new(crate::grpc::fill_rim_code))
        .add_service(AuthServiceServer::new(svc.clone()).max_decoding_message_size(limit))
        .add_service(UserServiceServer::new(svc.clone()).max_decoding_message_size(limit))
        .add_service(FriendServiceServer::new(svc.clone()).max_decoding_message_size(limit))
        .add_service(GroupServiceServer::new(svc.clone()).max_decoding_message_size(limit))
        .add_service(MessageServiceServer::new(svc).max_decoding_message_size(limit))
        .serve_with_incoming_shutdown(incoming(listener), async move { core.stopped().await })
        .await;
    if let Err(e) = res {
        tracing::error!(error = %e, "client listener stopped");
    }
}
