//! Real `rim node` and `rim gateway` processes under the harness's control
//! (`reference/jepsen.md` §6.2 "Cluster (db)").
//!
//! * [`rim_bin`] finds the built `rim` binary (`RIM_BIN`, then the cargo
//!   target dir), or explains how to build it.
//! * [`Cluster::start`] spawns N nodes bootstrapped together, each with its
//!   own data dir and `node.log` (stdout and stderr of every run, appended)
//!   under one root dir (a temp dir by default, kept and printed when the
//!   harness panics), each in its own process group.
//! * With [`ClusterOptions::proxied`], node-to-node traffic (Raft RPCs,
//!   forwarded proposals, read-index calls) goes through a [`ProxyMesh`]:
//!   every node gets the same `--peers` (the real addresses, which end up in
//!   the Raft membership and the cluster map, so gateways and leader hints
//!   use them) and its own `--peer-via j=<proxy i→j>,...`, which only its
//!   outgoing internal calls follow.
//! * Faults: [`Cluster::kill`] (SIGKILL), [`Cluster::pause`] (SIGSTOP),
//!   [`Cluster::resume`] (SIGCONT), [`Cluster::restart`]; signals go to the
//!   whole process group through the `kill` command (no `unsafe`, no libc).
//! * [`NodeProcess::wait_healthy`] polls `/healthz` on the node's HTTP
//!   listener under a deadline (a node is healthy when the groups it hosts
//!   have leaders, so on more nodes than the replication factor it says
//!   nothing about the groups it does not host); [`NodeProcess::raft`]
//!   reads the Raft gauges of its hosted groups from `/metrics`.
//! * [`Cluster::layout`] reads every group's voters from the cluster map
//!   of the admin service.
//! * [`GatewayProcess`]: a `rim gateway` seeded with the nodes' real
//!   internal addresses (clients and gateways are never partitioned).
//!
//! No process outlives the harness: [`Drop`] SIGKILLs every process group,
//! and each process runs under a tiny `sh` watchdog that SIGKILLs it when
//! the harness's end of its stdin pipe closes, which also covers a harness
//! that dies without unwinding.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use crate::error::{Error, Result, io_err};
pub use crate::process::{Proc, http_get, signal_group, tail};
use crate::proxy::ProxyMesh;
use rim_proto::ids::NodeId;
use rim_proto::metadata::CLUSTER_SECRET_METADATA_KEY;
use rim_proto::v1::admin_service_client::AdminServiceClient;
use rim_proto::v1::{ClusterMap, GetClusterMapRequest, ReplicaRole};

/// Default cluster secret of harness clusters (≥ 16 characters).
pub const SECRET: &str = "jepsen-harness-secret-0123456789";
/// The per-node libfaketime offset file, in the node's dir.
pub const FAKETIME_FILE: &str = "faketime";

/// Where Debian's `faketime` package puts the library, if installed.
pub fn find_faketime() -> Option<PathBuf> {
    [
        "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
        "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1",
        "/usr/lib/faketime/libfaketime.so.1",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.is_file())
}

/// Default fixed phone sign-in code of harness nodes.
pub const DEV_CODE: &str = "123456";

/// The built `rim` binary: `$RIM_BIN`, else `debug/rim` (then `release/rim`)
/// in `$CARGO_TARGET_DIR`, in the target dir holding the running executable
/// (a test binary lives in `<target>/debug/deps/`), or in
/// `/root/.cache/rim-target`. The error says how to build it.
pub fn rim_bin() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("RIM_BIN") {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(Error::NoRimBinary(format!("RIM_BIN={} is not a file", p.display())))
        };
    }
    let mut dirs: Vec<PathBuf> = Vec::new();
    if let Some(t) = std::env::var_os("CARGO_TARGET_DIR") {
        dirs.push(PathBuf::from(t));
    }
    if let Ok(exe) = std::env::current_exe() {
        // <target>/<profile>/deps/<test> or <target>/<profile>/<bin>
        for a in exe.ancestors().skip(1).take(3) {
            if a.join("debug").is_dir() || a.join("release").is_dir() {
                dirs.push(a.to_path_buf());
            }
        }
    }
    dirs.push(PathBuf::from("/root/.cache/rim-target"));
    let mut tried = Vec::new();
    for d in &dirs {
        for profile in ["debug", "release"] {
            let p = d.join(profile).join("rim");
            if p.is_file() {
                return Ok(p);
            }
            tried.push(p.display().to_string());
        }
    }
    Err(Error::NoRimBinary(format!(
        "the rim binary was not found (tried {}); build it with `cargo build -p rim` \
         or point RIM_BIN at it",
        tried.join(", ")
    )))
}

/// A loopback address that was free a moment ago, from below the kernel's
/// ephemeral port range (see `rim-testkit`), so no outgoing connection can
/// take it before the process it is meant for binds it.
pub fn free_addr() -> SocketAddr {
    rim_testkit::free_addr()
}

/// One Raft group as a node's `/metrics` shows it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GroupGauges {
    /// Whether this node believes it leads the group.
    pub is_leader: bool,
    /// The current term.
    pub term: u64,
    /// The last log index.
    pub last_log_index: u64,
    /// The last applied index.
    pub applied_index: u64,
}

/// Parses the `rim_raft_*{group="G"}` gauges of a Prometheus text page.
pub fn parse_raft_gauges(text: &str) -> BTreeMap<u32, GroupGauges> {
    let mut out: BTreeMap<u32, GroupGauges> = BTreeMap::new();
    for line in text.lines().filter(|l| l.starts_with("rim_raft_")) {
        let Some((name, rest)) = line.split_once("{group=\"") else { continue };
        let Some((group, rest)) = rest.split_once('"') else { continue };
        let (Ok(group), Some(value)) = (group.parse::<u32>(), rest.rsplit(' ').next()) else { continue };
        let Ok(v) = value.trim().parse::<f64>() else { continue };
        let g = out.entry(group).or_default();
        let v = v.max(0.0) as u64;
        match name {
            "rim_raft_is_leader" => g.is_leader = v == 1,
            "rim_raft_term" => g.term = v,
            "rim_raft_last_log_index" => g.last_log_index = v,
            "rim_raft_applied_index" => g.applied_index = v,
            _ => {}
        }
    }
    out
}

/// Where the Raft groups live, from the cluster map: with more nodes than
/// the replication factor each data shard has its own few voters (the
/// meta group's learners, the nodes outside its voters, are kept by its
/// leader and not recorded in the map).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Layout {
    /// Group id (0: the meta group) → its voters, ascending.
    pub voters: BTreeMap<u32, Vec<u64>>,
}

impl Layout {
    /// The voters a cluster map records (learner replicas left out).
    pub fn from_map(map: &ClusterMap) -> Layout {
        let mut voters: BTreeMap<u32, Vec<u64>> = BTreeMap::new();
        for shard in &map.shards {
            let nodes = voters.entry(shard.shard_id).or_default();
            nodes.extend(
                shard.replicas.iter().filter(|r| r.role != ReplicaRole::Learner as i32).map(|r| r.node_id),
            );
            nodes.sort_unstable();
            nodes.dedup();
        }
        Layout { voters }
    }

    /// The data shards (every group but the meta group 0) and their voters.
    pub fn data_shards(&self) -> impl Iterator<Item = (u32, &[u64])> {
        self.voters.iter().filter(|(g, _)| **g != 0).map(|(g, v)| (*g, v.as_slice()))
    }

    /// The groups, ascending, that have no quorum while the nodes `down`
    /// are: at most half of their voters are left.
    pub fn without_quorum(&self, down: &[u64]) -> Vec<u32> {
        self.voters
            .iter()
            .filter(|(_, v)| {
                let left = v.iter().filter(|n| !down.contains(n)).count();
                !v.is_empty() && 2 * left <= v.len()
            })
            .map(|(g, _)| *g)
            .collect()
    }
}

/// Timeout of one admin call.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(3);

/// `AdminService.GetClusterMap` of the node whose internal listener is
/// `addr`.
async fn cluster_map(addr: SocketAddr, secret: &str) -> std::result::Result<ClusterMap, String> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| e.to_string())?
        .connect_timeout(ADMIN_TIMEOUT)
        .connect_lazy();
    let mut request = tonic::Request::new(GetClusterMapRequest { known_version: 0 });
    request.set_timeout(ADMIN_TIMEOUT);
    let secret = secret.parse().map_err(|_| "the cluster secret is not valid metadata".to_string())?;
    request.metadata_mut().insert(CLUSTER_SECRET_METADATA_KEY, secret);
    let reply =
        tokio::time::timeout(ADMIN_TIMEOUT, AdminServiceClient::new(channel).get_cluster_map(request))
            .await
            .map_err(|_| "timed out".to_string())?
            .map_err(|s| format!("{}: {}", s.code(), s.message()))?;
    reply.into_inner().map.ok_or_else(|| "no cluster map yet".to_string())
}

/// One `rim node` process: its addresses, data dir and log.
#[derive(Debug)]
pub struct NodeProcess {
    /// Node id (≥ 1).
    pub id: NodeId,
    /// The real internal listener (Raft, gateways, admin).
    pub listen: SocketAddr,
    /// The client gRPC listener.
    pub client: SocketAddr,
    /// The HTTP listener (`/healthz`, `/metrics`).
    pub http: SocketAddr,
    /// The node's directory: `data/` and `node.log`.
    pub dir: PathBuf,
    proc: Proc,
}

impl NodeProcess {
    /// The data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// The process (signals, log).
    pub fn proc(&mut self) -> &mut Proc {
        &mut self.proc
    }

    /// The log file.
    pub fn log_path(&self) -> &Path {
        self.proc.log_path()
    }

    /// Whether it is running (paused counts).
    pub fn is_running(&mut self) -> bool {
        self.proc.is_running()
    }

    /// Polls `/healthz` until 200 (every hosted group has a leader and a
    /// leader hears from a quorum), failing fast if the process exits.
    pub async fn wait_healthy(&mut self, timeout: Duration) -> Result<()> {
        let http = self.http;
        self.proc.wait_http_ok(http, "/healthz", timeout).await
    }

    /// One `/healthz` probe: (status, body), or why it failed.
    pub async fn healthz(&self) -> std::result::Result<(u16, String), String> {
        http_get(self.http, "/healthz", Duration::from_secs(2)).await
    }

    /// The Raft gauges of every hosted group, from `/metrics`.
    pub async fn raft(&self) -> std::result::Result<BTreeMap<u32, GroupGauges>, String> {
        match http_get(self.http, "/metrics", Duration::from_secs(2)).await? {
            (200, body) => Ok(parse_raft_gauges(&body)),
            (code, body) => Err(format!("/metrics: {code} {}", body.trim())),
        }
    }
}

/// How to start a cluster.
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    /// The `rim` binary (see [`rim_bin`]).
    pub bin: PathBuf,
    /// Number of nodes (ids 1..=n).
    pub nodes: u64,
    /// Data shards (`--shards`).
    pub shards: u32,
    /// Route Raft traffic through a [`ProxyMesh`].
    pub proxied: bool,
    /// Root of the node dirs (`n1/`, `n2/`, ...); `None`: a temp dir,
    /// removed on drop unless the harness is panicking.
    pub dir: Option<PathBuf>,
    /// `--cluster-secret`.
    pub secret: String,
    /// `--dev-code`.
    pub dev_code: Option<String>,
    /// Extra `rim node` flags for every node.
    pub extra_args: Vec<String>,
    /// Extra environment for every node, e.g. `RIM_ELECTION_MIN_MS` (the
    /// harness's own `RIM_*` variables are never inherited).
    pub env: Vec<(String, String)>,
    /// libfaketime's library: when set, every node runs under it with a
    /// per-node offset file (see [`Cluster::set_clock_offset`]), monotonic
    /// clocks untouched (`FAKETIME_DONT_FAKE_MONOTONIC=1`: faking them
    /// stalls tokio timers).
    pub faketime: Option<PathBuf>,
}

impl ClusterOptions {
    /// `nodes` nodes of `bin`, 2 shards, direct links, defaults otherwise.
    pub fn new(bin: PathBuf, nodes: u64) -> ClusterOptions {
        ClusterOptions {
            bin,
            nodes,
            shards: 2,
            proxied: false,
            dir: None,
            secret: SECRET.into(),
            dev_code: Some(DEV_CODE.into()),
            extra_args: Vec::new(),
            env: Vec::new(),
            faketime: None,
        }
    }
}

/// N `rim node` processes bootstrapped together, optionally behind a
/// [`ProxyMesh`]. Dropping it kills every process.
#[derive(Debug)]
pub struct Cluster {
    nodes: BTreeMap<u64, NodeProcess>,
    mesh: Option<ProxyMesh>,
    opts: ClusterOptions,
    root: PathBuf,
    tmp: Option<tempfile::TempDir>,
    gateways: u32,
    /// The run's webhook receiver, if it has one (a nemesis target too).
    pub receiver: Option<crate::webhooks::ReceiverProcess>,
}

impl Cluster {
    /// Spawns every node (without waiting for health: see
    /// [`Cluster::wait_healthy`]). Needs a tokio runtime when proxied.
    pub async fn start(opts: ClusterOptions) -> Result<Cluster> {
        if !opts.bin.is_file() {
            return Err(Error::NoRimBinary(format!("{} is not a file", opts.bin.display())));
        }
        let (root, tmp) = match &opts.dir {
            Some(d) => {
                std::fs::create_dir_all(d).map_err(io_err(format!("creating {}", d.display())))?;
                (d.clone(), None)
            }
            None => {
                let t = tempfile::Builder::new()
                    .prefix("rim-jepsen-")
                    .tempdir()
                    .map_err(io_err("creating a temp dir"))?;
                (t.path().to_path_buf(), Some(t))
            }
        };
        let listen: BTreeMap<u64, SocketAddr> = (1..=opts.nodes).map(|id| (id, free_addr())).collect();
        let mesh = if opts.proxied {
            Some(ProxyMesh::start(&listen).await.map_err(io_err("starting the proxy mesh"))?)
        } else {
            None
        };
        let peers = listen.iter().map(|(id, a)| format!("{id}={a}")).collect::<Vec<_>>().join(",");
        let mut nodes = BTreeMap::new();
        for (&id, &addr) in &listen {
            let dir = root.join(format!("n{id}"));
            std::fs::create_dir_all(&dir).map_err(io_err(format!("creating {}", dir.display())))?;
            let (client, http) = (free_addr(), free_addr());
            let mut args: Vec<String> = vec![
                "node".into(),
                "--id".into(),
                id.to_string(),
                "--data".into(),
                dir.join("data").display().to_string(),
                "--listen".into(),
                addr.to_string(),
                "--client-listen".into(),
                client.to_string(),
                "--http-listen".into(),
                http.to_string(),
                "--bootstrap".into(),
                "--peers".into(),
                peers.clone(),
                "--shards".into(),
                opts.shards.to_string(),
                "--cluster-secret".into(),
                opts.secret.clone(),
            ];
            if let Some(code) = &opts.dev_code {
                args.extend(["--dev-code".into(), code.clone()]);
            }
            if let Some(m) = &mesh {
                args.extend(["--peer-via".into(), m.via_arg(id)]);
            }
            args.extend(opts.extra_args.iter().cloned());
            let mut env = opts.env.clone();
            if let Some(lib) = &opts.faketime {
                let file = dir.join(FAKETIME_FILE);
                std::fs::write(&file, "+0\n").map_err(io_err(format!("writing {}", file.display())))?;
                env.extend([
                    ("LD_PRELOAD".to_string(), lib.display().to_string()),
                    ("FAKETIME_DONT_FAKE_MONOTONIC".to_string(), "1".to_string()),
                    ("FAKETIME_TIMESTAMP_FILE".to_string(), file.display().to_string()),
                    ("FAKETIME_CACHE_DURATION".to_string(), "1".to_string()),
                ]);
            }
            let proc = Proc::new(&format!("node {id}"), &opts.bin, args, env, dir.join("node.log"));
            nodes.insert(id, NodeProcess { id, listen: addr, client, http, dir, proc });
        }
        let mut c = Cluster { nodes, mesh, opts, root, tmp, gateways: 0, receiver: None };
        for n in c.nodes.values_mut() {
            n.proc.spawn()?;
        }
        Ok(c)
    }

    /// The node ids, ascending.
    pub fn ids(&self) -> Vec<u64> {
        self.nodes.keys().copied().collect()
    }

    /// Node `id` (panics on an unknown id).
    pub fn node(&self, id: NodeId) -> &NodeProcess {
        self.nodes.get(&id).unwrap_or_else(|| panic!("no node {id}"))
    }

    /// Node `id`, mutably.
    pub fn node_mut(&mut self, id: NodeId) -> &mut NodeProcess {
        self.nodes.get_mut(&id).unwrap_or_else(|| panic!("no node {id}"))
    }

    /// Every node.
    pub fn nodes(&self) -> impl Iterator<Item = &NodeProcess> {
        self.nodes.values()
    }

    /// The proxies between the nodes, when started with `proxied`.
    pub fn mesh(&self) -> Option<&ProxyMesh> {
        self.mesh.as_ref()
    }

    /// The root dir of the node dirs.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The cluster secret.
    pub fn secret(&self) -> &str {
        &self.opts.secret
    }

    /// The real internal addresses (for gateways and admin clients).
    pub fn internal_addrs(&self) -> Vec<SocketAddr> {
        self.nodes.values().map(|n| n.listen).collect()
    }

    /// The layout of the cluster map held by the first running, unpaused
    /// node that answers; the error lists every node's failure.
    pub async fn layout(&mut self) -> std::result::Result<Layout, String> {
        let mut errors = Vec::new();
        for n in self.nodes.values_mut() {
            if !n.proc.is_running() || n.proc.is_paused() {
                continue;
            }
            match cluster_map(n.listen, &self.opts.secret).await {
                Ok(map) => return Ok(Layout::from_map(&map)),
                Err(e) => errors.push(format!("node {}: {e}", n.id)),
            }
        }
        Err(format!("no node told the cluster map ({})", errors.join("; ")))
    }

    /// Waits until every running, unpaused node is healthy.
    pub async fn wait_healthy(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        for n in self.nodes.values_mut() {
            if n.proc.is_running() && !n.proc.is_paused() {
                n.wait_healthy(deadline.saturating_duration_since(Instant::now())).await?;
            }
        }
        Ok(())
    }

    /// SIGKILL node `id` (no-op when it is not running).
    pub fn kill(&mut self, id: NodeId) {
        self.node_mut(id).proc.kill();
    }

    /// SIGSTOP node `id`.
    pub fn pause(&mut self, id: NodeId) -> Result<()> {
        self.node_mut(id).proc.pause()
    }

    /// SIGCONT node `id`.
    pub fn resume(&mut self, id: NodeId) -> Result<()> {
        self.node_mut(id).proc.resume()
    }

    /// Starts node `id` again with its data dir (no-op when running).
    pub fn start_node(&mut self, id: NodeId) -> Result<()> {
        self.node_mut(id).proc.spawn()
    }

    /// SIGKILL, then start again with the same data dir and flags.
    pub fn restart(&mut self, id: NodeId) -> Result<()> {
        self.kill(id);
        self.start_node(id)
    }

    /// Shifts node `id`'s wall clock by `offset_secs` from real time (takes
    /// effect within a second; needs [`ClusterOptions::faketime`]).
    pub fn set_clock_offset(&mut self, id: NodeId, offset_secs: i64) -> Result<()> {
        if self.opts.faketime.is_none() {
            return Err(Error::NoFaketime);
        }
        let file = self.node(id).dir.join(FAKETIME_FILE);
        std::fs::write(&file, format!("{offset_secs:+}\n"))
            .map_err(io_err(format!("writing {}", file.display())))
    }

    /// Kills every node.
    pub fn kill_all(&mut self) {
        for n in self.nodes.values_mut() {
            n.proc.kill();
        }
    }

    /// The last `n` log lines of every node.
    pub fn log_tails(&self, n: usize) -> String {
        let mut out = String::new();
        for p in self.nodes.values() {
            out.push_str(&format!(
                "----- node {} log tail ({}) -----\n{}\n",
                p.id,
                p.log_path().display(),
                p.proc.log_tail(n)
            ));
        }
        out
    }

    /// Starts a `rim gateway` seeded with every node's real internal
    /// address; its log goes to `gw<k>/gateway.log` under the root dir.
    pub fn start_gateway(&mut self) -> Result<GatewayProcess> {
        self.gateways += 1;
        let dir = self.root.join(format!("gw{}", self.gateways));
        GatewayProcess::start(&self.opts.bin, &self.internal_addrs(), &self.opts.secret, &dir)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.kill_all();
        if std::thread::panicking() {
            eprintln!("{}", self.log_tails(60));
            if let Some(t) = self.tmp.take() {
                eprintln!("keeping the cluster dir {}", t.keep().display());
            }
        }
    }
}

/// A `rim gateway` process. Dropping it kills it.
#[derive(Debug)]
pub struct GatewayProcess {
    /// The TCP (framed protobuf) listener.
    pub tcp: SocketAddr,
    /// The WebSocket listener (`/ws`).
    pub ws: SocketAddr,
    /// The HTTP listener (`/healthz`, `/metrics`).
    pub http: SocketAddr,
    proc: Proc,
}

impl GatewayProcess {
    /// Spawns a gateway with TCP, WebSocket and HTTP listeners on free loopback ports,
    /// logging to `dir/gateway.log`.
    pub fn start(bin: &Path, seeds: &[SocketAddr], secret: &str, dir: &Path) -> Result<GatewayProcess> {
        std::fs::create_dir_all(dir).map_err(io_err(format!("creating {}", dir.display())))?;
        let (tcp, ws, http) = (free_addr(), free_addr(), free_addr());
        let seeds = seeds.iter().map(ToString::to_string).collect::<Vec<_>>().join(",");
        let args = vec![
            "gateway".into(),
            "--tcp".into(),
            tcp.to_string(),
            "--ws".into(),
            ws.to_string(),
            "--http".into(),
            http.to_string(),
            "--seeds".into(),
            seeds,
            "--cluster-secret".into(),
            secret.into(),
        ];
        let mut proc = Proc::new("gateway", bin, args, Vec::new(), dir.join("gateway.log"));
        proc.spawn()?;
        Ok(GatewayProcess { tcp, ws, http, proc })
    }

    /// The process (signals, log).
    pub fn proc(&mut self) -> &mut Proc {
        &mut self.proc
    }

    /// Polls `/healthz` until 200.
    pub async fn wait_healthy(&mut self, timeout: Duration) -> Result<()> {
        let http = self.http;
        self.proc.wait_http_ok(http, "/healthz", timeout).await
    }

    /// SIGTERM (drain), then SIGKILL after `grace`; the exit status if it
    /// stopped by itself.
    pub fn stop(&mut self, grace: Duration) -> Option<ExitStatus> {
        self.proc.stop(grace)
    }

    /// SIGKILL.
    pub fn kill(&mut self) {
        self.proc.kill();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rim_proto::v1::{Replica, ShardInfo};

    #[test]
    fn a_layout_lists_each_groups_voters() {
        let replica = |node_id, role: ReplicaRole| Replica { node_id, role: role as i32 };
        let shard = |shard_id, replicas| ShardInfo { shard_id, replicas, leader_node_id: 0 };
        let map = ClusterMap {
            shards: vec![
                shard(
                    0,
                    vec![
                        replica(3, ReplicaRole::Voter),
                        replica(1, ReplicaRole::Voter),
                        replica(2, ReplicaRole::Voter),
                        replica(5, ReplicaRole::Learner),
                        replica(4, ReplicaRole::Learner),
                    ],
                ),
                shard(
                    1,
                    vec![
                        replica(4, ReplicaRole::Voter),
                        replica(5, ReplicaRole::Voter),
                        replica(1, ReplicaRole::Voter),
                    ],
                ),
            ],
            ..ClusterMap::default()
        };
        let layout = Layout::from_map(&map);
        assert_eq!(layout.voters, BTreeMap::from([(0, vec![1, 2, 3]), (1, vec![1, 4, 5])]));
        assert_eq!(layout.data_shards().collect::<Vec<_>>(), vec![(1, &[1, 4, 5][..])]);
    }

    #[test]
    fn groups_lose_their_quorum_with_half_of_their_voters() {
        // The bootstrap layout of 5 nodes and 4 shards.
        let layout = Layout {
            voters: [
                (0, vec![1, 2, 3]),
                (1, vec![1, 4, 5]),
                (2, vec![2, 3, 4]),
                (3, vec![1, 2, 5]),
                (4, vec![3, 4, 5]),
            ]
            .into(),
        };
        assert_eq!(layout.without_quorum(&[]), Vec::<u32>::new());
        assert_eq!(layout.without_quorum(&[3]), Vec::<u32>::new());
        // Two of shard 1's voters are also two of shard 4's.
        assert_eq!(layout.without_quorum(&[4, 5]), vec![1, 4]);
        assert_eq!(layout.without_quorum(&[1, 2]), vec![0, 3]);
        assert_eq!(layout.without_quorum(&[1, 2, 3, 4, 5]), vec![0, 1, 2, 3, 4]);
        let even = Layout { voters: [(1, vec![1, 2, 3, 4])].into() };
        assert_eq!(even.without_quorum(&[1, 2]), vec![1], "two of four is no majority");
    }
}
