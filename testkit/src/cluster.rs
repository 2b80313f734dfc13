//! An in-process cluster: N real `rim-node` nodes in the test process, real
//! gRPC on loopback, temp data dirs, and a switchboard that cuts the links
//! between nodes.
//!
//! Every node bootstraps together with the others (`peers` = all of them),
//! elects fast (100 ms heartbeats, 500-1000 ms elections), signs tokens with
//! [`SECRET`] and signs phones in with [`DEV_CODE`](crate::grpc::DEV_CODE).
//! [`Cluster::start_with`] may change any of that before the nodes start.
//!
//! Link cuts ([`Cluster::isolate`], [`Cluster::heal`]) act on the internal
//! links (Raft, forwarding, relay) through the node's `LinkFilter`; the
//! client listeners stay reachable, so a test can still call a cut-off node.
//!
//! [`Cluster::gateway`] starts a gateway in the process too (TCP and
//! WebSocket on ports the kernel picks, one event loop thread), seeded with
//! every node's internal address.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rim_gateway::SessionConfig;
use rim_gateway::server::{Gateway, GatewayConfig};
use rim_gateway::tcp::TcpOptions;
use rim_node::{Node, NodeConfig, NodeOptions};
use rim_proto::ids::{NodeId, ShardId, UserId};

use crate::grpc::{Client, DEV_CODE, SECRET, Session};
use crate::wait::{WAIT, wait_for};

/// How often a start that could not bind its ports is tried again.
const START_ATTEMPTS: u32 = 5;
/// How long a started node may take until every group it hosts has a leader.
const READY: Duration = Duration::from_secs(30);

/// N nodes in this process. The maps are keyed by node id (1..=N at start)
/// and public, so a test can add a node (a config and a dir) and start it
/// with [`Cluster::start_node`].
pub struct Cluster {
    /// The data dir of every node, removed on drop.
    pub dirs: BTreeMap<NodeId, tempfile::TempDir>,
    /// The config of every node, running or not.
    pub configs: BTreeMap<NodeId, NodeConfig>,
    /// The running nodes.
    pub nodes: BTreeMap<NodeId, Node>,
    /// The cut links, as `(from, to)`; a link is cut both ways if either
    /// direction is listed.
    pub cuts: Arc<RwLock<HashSet<(NodeId, NodeId)>>>,
}

impl Cluster {
    /// Starts `n` nodes with `shards` data shards and waits until every
    /// node is ready (each of its groups has a leader).
    pub async fn start(n: u64, shards: u32) -> Cluster {
        Cluster::start_with(n, shards, |_| {}).await
    }

    /// [`Cluster::start`] with every node's config passed through `tweak`
    /// first (sabotage flags, timeouts, snapshot thresholds, ...).
    ///
    /// The ports are picked before the nodes bind them (outside the
    /// ephemeral range, so no outgoing connection can take one), but another
    /// test process may still bind one meanwhile: a start that fails with
    /// "cannot listen" is retried from scratch with new ports and data dirs.
    pub async fn start_with(n: u64, shards: u32, tweak: impl Fn(&mut NodeConfig)) -> Cluster {
        let mut attempt = 1;
        loop {
            match Cluster::try_start(n, shards, &tweak).await {
                Ok(c) => return c,
                Err(e) if attempt < START_ATTEMPTS && e.contains("cannot listen") => {
                    eprintln!("cluster start attempt {attempt} failed ({e}); retrying with new ports");
                    attempt += 1;
                }
                Err(e) => panic!("cluster start failed: {e}"),
            }
        }
    }

    async fn try_start(n: u64, shards: u32, tweak: &impl Fn(&mut NodeConfig)) -> Result<Cluster, String> {
        let addrs: BTreeMap<NodeId, String> = (1..=n).map(|id| (id, crate::free_addr_string())).collect();
        let mut c = Cluster {
            dirs: BTreeMap::new(),
            configs: BTreeMap::new(),
            nodes: BTreeMap::new(),
            cuts: Arc::new(RwLock::new(HashSet::new())),
        };
        for &id in addrs.keys() {
            let dir = tempfile::tempdir().map_err(|e| format!("temp dir: {e}"))?;
            let mut cfg = NodeConfig {
                id,
                data: dir.path().to_path_buf(),
                listen: addrs[&id].clone(),
                client_listen: crate::free_addr_string(),
                http_listen: crate::free_addr_string(),
                bootstrap: true,
                peers: addrs.clone(),
                shards,
                cluster_secret: SECRET.into(),
                heartbeat_ms: 100,
                election_min_ms: 500,
                election_max_ms: 1000,
                dev_code: Some(DEV_CODE.into()),
                // Tests send as fast as they can from one user; the tests of
                // the rate limits themselves set the limits they check.
                limits: rim_node::throttle::RateLimits::unlimited(),
                // Leaders stay where elections put them: tests place faults
                // on leaders they looked up. The balancer is tested against
                // real processes (tests/transfer.rs), which run it as
                // deployed.
                balance: rim_node::config::BalanceConfig { enabled: false, ..Default::default() },
                ..NodeConfig::default()
            };
            tweak(&mut cfg);
            c.dirs.insert(id, dir);
            c.configs.insert(id, cfg);
        }
        for &id in addrs.keys() {
            if let Err(e) = c.try_start_node(id).await {
                c.shutdown().await;
                return Err(e);
            }
        }
        c.wait_ready().await;
        Ok(c)
    }

    /// Starts node `id` from its config (again, after [`Cluster::stop_node`],
    /// on the same data dir), with the cluster's link filter.
    ///
    /// # Panics
    ///
    /// If the node does not start.
    pub async fn start_node(&mut self, id: NodeId) {
        if let Err(e) = self.try_start_node(id).await {
            panic!("node {id} did not start: {e}");
        }
    }

    async fn try_start_node(&mut self, id: NodeId) -> Result<(), String> {
        let cuts = self.cuts.clone();
        let filter: rim_node::net::LinkFilter = Arc::new(move |a, b| {
            let cuts = cuts.read().expect("cuts lock");
            cuts.contains(&(a, b)) || cuts.contains(&(b, a))
        });
        let cfg = self.configs.get(&id).unwrap_or_else(|| panic!("no config for node {id}")).clone();
        let node =
            Node::start(cfg, NodeOptions { link_filter: Some(filter) }).await.map_err(|e| e.to_string())?;
        self.nodes.insert(id, node);
        Ok(())
    }

    /// Stops node `id` (a clean shutdown) if it runs; its data stays.
    pub async fn stop_node(&mut self, id: NodeId) {
        if let Some(n) = self.nodes.remove(&id) {
            n.shutdown().await;
        }
    }

    /// Waits until every running node is ready.
    pub async fn wait_ready(&self) {
        for (id, n) in &self.nodes {
            n.wait_ready(READY).await.unwrap_or_else(|e| panic!("node {id} not ready: {e}"));
        }
    }

    /// Cuts every link between `id` and the other nodes (both ways).
    pub fn isolate(&self, id: NodeId) {
        let mut cuts = self.cuts.write().expect("cuts lock");
        for &other in self.configs.keys() {
            if other != id {
                cuts.insert((id, other));
            }
        }
    }

    /// Restores every cut link.
    pub fn heal(&self) {
        self.cuts.write().expect("cuts lock").clear();
    }

    /// The running node `id`.
    ///
    /// # Panics
    ///
    /// If it does not run.
    pub fn node(&self, id: NodeId) -> &Node {
        self.nodes.get(&id).unwrap_or_else(|| panic!("node {id} is not running"))
    }

    /// The leader of `shard` as the running nodes see it, waiting (up to
    /// [`WAIT`]) until one of them names a running node that agrees it leads.
    pub async fn leader(&self, shard: ShardId) -> NodeId {
        wait_for(WAIT, &format!("a leader of shard {shard}"), || {
            let leaders: HashSet<Option<NodeId>> =
                self.nodes.values().filter_map(|n| n.core.group(shard)).map(|g| g.leader()).collect();
            match leaders.iter().flatten().next() {
                Some(l)
                    if self.nodes.get(l).and_then(|n| n.core.group(shard)).is_some_and(|g| g.is_leader()) =>
                {
                    Some(*l)
                }
                _ => None,
            }
        })
        .await
    }

    /// Waits (up to [`WAIT`]) until every running node's replica of `shard`
    /// has applied the same index and holds byte-identical state (the same
    /// `Reader::digest`), and returns that digest.
    ///
    /// # Panics
    ///
    /// If they do not get there within [`WAIT`].
    pub async fn replicas_identical(&self, shard: ShardId) -> [u8; 32] {
        wait_for(WAIT, &format!("every replica of group {shard} at one index with one digest"), || {
            let groups: Vec<_> = self.nodes.values().filter_map(|n| n.core.group(shard)).collect();
            let at: HashSet<_> =
                groups.iter().map(|g| g.raft.metrics().borrow().last_applied.map(|l| l.index)).collect();
            let digests: HashSet<[u8; 32]> = groups.iter().filter_map(|g| g.reader.digest().ok()).collect();
            match (at.len(), digests.iter().next()) {
                (1, Some(d)) if digests.len() == 1 && groups.len() > 1 => Some(*d),
                _ => None,
            }
        })
        .await
    }

    /// The shard that holds `user`, by the placement of a running node.
    pub fn shard_of_user(&self, user: UserId) -> ShardId {
        let node = self.nodes.values().next().expect("a running node");
        node.core.shard_of_user(user).unwrap_or_else(|e| panic!("shard of user {user}: {e}"))
    }

    /// The internal addresses of every node (a gateway's seeds).
    pub fn seeds(&self) -> Vec<String> {
        self.configs.values().map(|c| c.listen.clone()).collect()
    }

    /// A gateway serving TCP and WebSocket on loopback, following this
    /// cluster, ready to take connections.
    pub async fn gateway(&self, id: &str) -> Gateway {
        self.gateway_with(id, SessionConfig::default()).await
    }

    /// [`Cluster::gateway`] with session settings `session`.
    pub async fn gateway_with(&self, id: &str, session: SessionConfig) -> Gateway {
        let config = GatewayConfig {
            session,
            tcp_listen: Some("127.0.0.1:0".into()),
            ws_listen: Some("127.0.0.1:0".into()),
            seeds: self.seeds(),
            cluster_secret: SECRET.into(),
            gateway_id: id.into(),
            request_timeout: Duration::from_secs(10),
            tcp: TcpOptions { event_loop_threads: 1, ..TcpOptions::default() },
            upstream_tls: self.tls(),
            ..GatewayConfig::default()
        };
        let gw = Gateway::start(config).await.unwrap_or_else(|e| panic!("gateway {id}: {e}"));
        gw.wait_ready(READY).await.unwrap_or_else(|e| panic!("gateway {id} not ready: {e}"));
        gw
    }

    /// A gRPC client of node `id`'s client listener (over TLS if the
    /// nodes serve it).
    pub fn client(&self, id: NodeId) -> Client {
        let cfg = self.configs.get(&id).unwrap_or_else(|| panic!("no config for node {id}"));
        Client::connect_with(&cfg.client_listen, self.tls().as_ref())
    }

    /// The TLS material of the nodes' links (the first node's `tls`), as a
    /// client of them uses it; `None` for a plaintext cluster.
    pub fn tls(&self) -> Option<rim_cluster::LinkTls> {
        let files = self.configs.values().next()?.tls.as_ref()?;
        Some(rim_cluster::LinkTls::load(files).unwrap_or_else(|e| panic!("the cluster's TLS files: {e}")))
    }

    /// Stops every node.
    pub async fn shutdown(self) {
        for n in self.nodes.into_values() {
            n.shutdown().await;
        }
    }
}

/// Registers `{prefix}a`, then `{prefix}b0`, `{prefix}b1`, ... until one
/// lives on another shard than `{prefix}a`; both signed in.
///
/// # Panics
///
/// If 50 users all land on the shard of the first.
pub async fn users_on_two_shards(c: &Cluster, client: &Client, prefix: &str) -> (Session, Session) {
    let first = format!("{prefix}a");
    client.register(&first).await;
    let a = client.sign_in(&first).await;
    for i in 0..50 {
        let name = format!("{prefix}b{i}");
        let id = client.register(&name).await;
        if c.shard_of_user(id) != c.shard_of_user(a.user) {
            return (a, client.sign_in(&name).await);
        }
    }
    panic!("no user landed on another shard than {first}");
}
