//! What a scenario runs against: a cluster the bench spawns as child
//! processes (`--spawn`), or an existing one given by addresses.
//!
//! A spawned cluster is three `rim node` processes (this same binary,
//! bootstrapped together, data in a temp directory) and one `rim gateway`,
//! each in its own process group with its output in a log file next to the
//! data. [`Spawned`] kills (SIGKILL) and reaps them when dropped, which
//! happens on success, on error and on Ctrl-C (the scenario future is
//! dropped first); only a SIGKILL of the bench itself leaves them running.
//!
//! A scenario may also kill one node on purpose ([`Spawned::kill_node`],
//! `rim bench failover`) and start it again on the same data and addresses
//! ([`Spawned::restart_node`]); the children sit behind a mutex so that
//! works through the shared `&Target` every scenario gets.

use std::fs::File;
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use rim_proto::v1::ClusterStatusRequest;
use rim_proto::v1::admin_service_client::AdminServiceClient;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::json::Json;

/// Cluster secret of a spawned cluster when none is given.
const SPAWN_SECRET: &str = "rim-bench-secret-local-only";

/// Phone sign-in code of a spawned cluster (its nodes run with `--dev-code`).
pub const SPAWN_DEV_CODE: &str = "135790";

/// Flags choosing the cluster (shared by every scenario).
#[derive(Args, Debug, Clone)]
pub struct TargetArgs {
    /// Start 3 `rim node` and 1 `rim gateway` child processes on loopback
    /// (temp data, killed when the bench ends).
    #[arg(long)]
    pub spawn: bool,
    /// Gateway TCP address (without --spawn).
    #[arg(long, required_unless_present = "spawn", conflicts_with = "spawn")]
    pub gateway: Option<String>,
    /// Client gRPC address(es) of logic nodes, comma-separated (without --spawn).
    #[arg(long, value_delimiter = ',', required_unless_present = "spawn", conflicts_with = "spawn")]
    pub api: Vec<String>,
    /// PID of the gateway process, to read its RSS (without --spawn).
    #[arg(long, conflicts_with = "spawn")]
    pub gateway_pid: Option<u32>,
    /// Internal address of a node: with --cluster-secret, the cluster shape
    /// is read from its admin service and recorded (without --spawn).
    #[arg(long, conflicts_with = "spawn")]
    pub admin: Option<String>,
    /// Cluster secret (of the spawned cluster, or for --admin).
    #[arg(long, env = "RIM_CLUSTER_SECRET", hide_env_values = true)]
    pub cluster_secret: Option<String>,
    /// Data shards of a spawned cluster.
    #[arg(long, default_value_t = 4)]
    pub shards: u32,
    /// Event-loop threads of a spawned gateway (default: one per core).
    #[arg(long)]
    pub gateway_threads: Option<usize>,
    /// `RIM_LOG` filter of the spawned processes (default: their own default).
    #[arg(long)]
    pub child_log: Option<String>,
    /// Parent directory of a spawned cluster's data and logs (default: the
    /// system temp dir); the run's own subdirectory is removed afterwards
    /// unless --keep.
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
    /// Keep a spawned cluster's data and logs.
    #[arg(long)]
    pub keep: bool,
    /// The cluster's development phone code (`rim node --dev-code`), for
    /// scenarios that make many users cheaply (without --spawn).
    #[arg(long, conflicts_with = "spawn")]
    pub dev_code: Option<String>,
    /// A TOML file every spawned node also reads (`rim node --config`); set
    /// by scenarios that configure the nodes (`webhooks`), not a flag.
    #[arg(skip)]
    pub node_config: Option<PathBuf>,
}

/// A resolved target.
pub struct Target {
    /// Gateway TCP address.
    pub gateway: SocketAddr,
    /// Client gRPC addresses of logic nodes.
    pub apis: Vec<String>,
    /// The gateway's PID, if known (RSS).
    pub gateway_pid: Option<u32>,
    /// The cluster shape, for the result file.
    pub shape: Json,
    /// The child processes, when spawned (kept alive by this field).
    pub spawned: Option<Spawned>,
    /// Phone sign-in code, if the cluster has one.
    pub dev_code: Option<String>,
}

impl Target {
    /// Spawns a cluster or resolves the given addresses.
    pub async fn resolve(args: &TargetArgs) -> anyhow::Result<Target> {
        if args.spawn {
            return spawn(args).await;
        }
        let gw = args.gateway.as_deref().context("--gateway is required without --spawn")?;
        let gateway = tokio::net::lookup_host(gw)
            .await
            .with_context(|| format!("resolving --gateway {gw}"))?
            .find(SocketAddr::is_ipv4)
            .with_context(|| format!("--gateway {gw}: no IPv4 address"))?;
        anyhow::ensure!(!args.api.is_empty(), "--api is required without --spawn");
        let mut shape = Json::obj()
            .with("spawned", false)
            .with("fsync", "as configured on the nodes (default on)")
            .with("gateway", gw)
            .with("api", args.api.clone());
        if let (Some(admin), Some(secret)) = (&args.admin, &args.cluster_secret) {
            shape.set("map", map_shape(admin, secret).await);
        }
        Ok(Target {
            gateway,
            apis: args.api.clone(),
            gateway_pid: args.gateway_pid,
            shape,
            spawned: None,
            dev_code: args.dev_code.clone(),
        })
    }
}

/// Running child processes and their directory.
pub struct Spawned {
    dir: PathBuf,
    remove_dir: bool,
    secret: String,
    child_log: Option<String>,
    nodes: Vec<SpawnedNode>,
    children: Mutex<Vec<ChildProc>>,
}

/// A spawned `rim node`: its id and listen addresses.
#[derive(Debug, Clone)]
pub struct SpawnedNode {
    /// Node id (1, 2, 3).
    pub id: u64,
    /// Internal gRPC address (Raft, gateway, admin services).
    pub internal: String,
    /// Client gRPC address.
    pub client: String,
    /// HTTP address (`/healthz`, `/metrics`).
    pub http: String,
}

/// One child process: its name (`node-<id>` or `gateway`), the process,
/// its log file and its arguments (to start it again).
struct ChildProc {
    name: String,
    child: Child,
    log: PathBuf,
    args: Vec<String>,
}

impl Spawned {
    fn children(&self) -> MutexGuard<'_, Vec<ChildProc>> {
        self.children.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Fails (with the log tail) if a child exited on its own.
    fn check_alive(&self) -> anyhow::Result<()> {
        for c in self.children().iter_mut() {
            if let Ok(Some(status)) = c.child.try_wait() {
                bail!(
                    "{} exited with {status}; log tail ({}):\n{}",
                    c.name,
                    c.log.display(),
                    tail(&c.log, 30)
                );
            }
        }
        Ok(())
    }

    /// The directory with the data and the logs.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The cluster secret the nodes and the gateway were started with.
    pub fn secret(&self) -> &str {
        &self.secret
    }

    /// Names (`node-<id>`, `gateway`) and PIDs of the children, in start order.
    pub fn pids(&self) -> Vec<(String, u32)> {
        self.children().iter().map(|c| (c.name.clone(), c.child.id())).collect()
    }

    /// The nodes, in id order.
    pub fn nodes(&self) -> &[SpawnedNode] {
        &self.nodes
    }

    /// Sends SIGKILL to node `id` (no shutdown, no flush: a crash); returns
    /// its PID. The process is reaped later (by [`Spawned::restart_node`]
    /// or on drop).
    pub fn kill_node(&self, id: u64) -> anyhow::Result<u32> {
        let name = format!("node-{id}");
        let mut children = self.children();
        let c = children.iter_mut().find(|c| c.name == name).with_context(|| format!("no spawned {name}"))?;
        if let Some(status) = c.child.try_wait().with_context(|| format!("checking {name}"))? {
            bail!("{name} already exited ({status}); log tail ({}):\n{}", c.log.display(), tail(&c.log, 15));
        }
        let pid = c.child.id();
        c.child.kill().with_context(|| format!("sending SIGKILL to {name} (pid {pid})"))?;
        Ok(pid)
    }

    /// Starts node `id` again (after [`Spawned::kill_node`]) with the same
    /// arguments, data and addresses, its output appended to its log, and
    /// waits up to `timeout` for its `/healthz`; returns the new PID.
    pub async fn restart_node(&self, id: u64, timeout: Duration) -> anyhow::Result<u32> {
        let name = format!("node-{id}");
        let node = self.nodes.iter().find(|n| n.id == id).with_context(|| format!("no spawned {name}"))?;
        // The old process must be gone (SIGKILL is quick, but not instant).
        let deadline = Instant::now() + Duration::from_secs(5);
        let args = loop {
            {
                let mut children = self.children();
                let c = children
                    .iter_mut()
                    .find(|c| c.name == name)
                    .with_context(|| format!("no spawned {name}"))?;
                if c.child.try_wait().with_context(|| format!("checking {name}"))?.is_some() {
                    break c.args.clone();
                }
            }
            if Instant::now() >= deadline {
                bail!("{name} is still running; kill it first");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let pid = self.start(&name, &args, true)?;
        wait_healthy(self, &node.http, timeout)
            .await
            .with_context(|| format!("waiting for the restarted {name}"))?;
        Ok(pid)
    }

    /// Starts a child (replacing an exited one of the same name), its
    /// output in `<name>.log` (appended to when `append`).
    fn start(&self, name: &str, args: &[String], append: bool) -> anyhow::Result<u32> {
        let log_path = self.dir.join(format!("{name}.log"));
        let log = File::options()
            .create(true)
            .append(append)
            .write(true)
            .truncate(!append)
            .open(&log_path)
            .with_context(|| format!("creating {}", log_path.display()))?;
        let mut cmd = Command::new(std::env::current_exe().context("locating the rim binary")?);
        for (k, _) in std::env::vars() {
            if k.starts_with("RIM_") {
                cmd.env_remove(k);
            }
        }
        if let Some(filter) = &self.child_log {
            cmd.env("RIM_LOG", filter);
        }
        cmd.args(args)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .process_group(0);
        let child = cmd.spawn().with_context(|| format!("starting {name}"))?;
        let pid = child.id();
        let proc = ChildProc { name: name.to_string(), child, log: log_path, args: args.to_vec() };
        let mut children = self.children();
        match children.iter_mut().find(|c| c.name == name) {
            Some(old) => *old = proc,
            None => children.push(proc),
        }
        Ok(pid)
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let children = self.children.get_mut().unwrap_or_else(PoisonError::into_inner);
        for c in children.iter_mut() {
            let _ = c.child.kill();
            let _ = c.child.wait();
        }
        if self.remove_dir {
            let _ = std::fs::remove_dir_all(&self.dir);
        } else {
            eprintln!("rim bench: cluster data and logs kept in {}", self.dir.display());
        }
    }
}

/// A loopback address outside the kernel's ephemeral range, free now and
/// handed out once per process (see `rim_testkit`): an outgoing connection
/// cannot take it before the spawned node binds it.
fn free_addr() -> String {
    rim_testkit::free_addr_string()
}

async fn spawn(args: &TargetArgs) -> anyhow::Result<Target> {
    let secret = args.cluster_secret.clone().unwrap_or_else(|| SPAWN_SECRET.to_string());
    anyhow::ensure!(secret.len() >= 16, "the cluster secret must be at least 16 bytes");
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.subsec_nanos();
    let parent = args.work_dir.clone().unwrap_or_else(std::env::temp_dir);
    let (dir, remove_dir) = (parent.join(format!("rim-bench-{}-{nanos}", std::process::id())), !args.keep);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut sp = Spawned {
        dir: dir.clone(),
        remove_dir,
        secret: secret.clone(),
        child_log: args.child_log.clone(),
        nodes: Vec::new(),
        children: Mutex::new(Vec::new()),
    };
    let internal: Vec<String> = (0..3).map(|_| free_addr()).collect();
    let peers =
        internal.iter().enumerate().map(|(i, a)| format!("{}={a}", i + 1)).collect::<Vec<_>>().join(",");
    let mut apis = Vec::new();
    let mut https = Vec::new();
    for (i, listen) in internal.iter().enumerate() {
        let (client, http) = (free_addr(), free_addr());
        let id = (i + 1).to_string();
        let node_args: Vec<String> = [
            "node",
            "--id",
            &id,
            "--data",
            &dir.join(format!("node-{id}")).display().to_string(),
            "--listen",
            listen,
            "--client-listen",
            &client,
            "--http-listen",
            &http,
            "--bootstrap",
            "--peers",
            &peers,
            "--shards",
            &args.shards.to_string(),
            "--cluster-secret",
            &secret,
            "--dev-code",
            SPAWN_DEV_CODE,
            // Benchmarks measure capacity, not the per-user rate limits.
            "--no-rate-limits",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let mut node_args = node_args;
        if let Some(config) = &args.node_config {
            node_args.extend(["--config".to_string(), config.display().to_string()]);
        }
        sp.start(&format!("node-{id}"), &node_args, false)?;
        sp.nodes.push(SpawnedNode {
            id: i as u64 + 1,
            internal: listen.clone(),
            client: client.clone(),
            http: http.clone(),
        });
        apis.push(client);
        https.push(http);
    }
    for h in &https {
        wait_healthy(&sp, h, Duration::from_secs(60)).await.context("waiting for the nodes")?;
    }
    let (tcp, http) = (free_addr(), free_addr());
    let mut gw_args: Vec<String> = [
        "gateway",
        "--tcp",
        &tcp,
        "--http",
        &http,
        "--seeds",
        &internal.join(","),
        "--cluster-secret",
        &secret,
        "--id",
        "bench-gateway",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if let Some(t) = args.gateway_threads {
        gw_args.extend(["--threads".to_string(), t.to_string()]);
    }
    let gateway_pid = sp.start("gateway", &gw_args, false)?;
    wait_healthy(&sp, &http, Duration::from_secs(30)).await.context("waiting for the gateway")?;
    let shape = Json::obj()
        .with("spawned", true)
        .with("nodes", 3u64)
        .with("shards", args.shards)
        .with("gateways", 1u64)
        .with(
            "gateway_threads",
            args.gateway_threads
                .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())),
        )
        .with("map", map_shape(&internal[0], &secret).await)
        .with("processes", "3 × rim node, 1 × rim gateway and the bench on this machine, over loopback")
        // Spawned nodes run with the default `fsync = true` (no flag turns it
        // off): an ack means the entry is fsynced on a quorum.
        .with("fsync", true);
    Ok(Target {
        gateway: tcp.parse()?,
        apis,
        gateway_pid: Some(gateway_pid),
        shape,
        spawned: Some(sp),
        dev_code: Some(SPAWN_DEV_CODE.to_string()),
    })
}

/// Polls `http://addr/healthz` until it answers 200.
async fn wait_healthy(sp: &Spawned, addr: &str, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        sp.check_alive()?;
        let last = match http_get(addr, "/healthz").await {
            Ok((200, _)) => return Ok(()),
            Ok((code, body)) => format!("{code} {}", body.trim()),
            Err(e) => e.to_string(),
        };
        if Instant::now() >= deadline {
            let logs: Vec<String> =
                sp.children().iter().map(|c| format!("--- {} ---\n{}", c.name, tail(&c.log, 15))).collect();
            bail!("{addr} not healthy within {timeout:?} (last: {last}); log tails:\n{}", logs.join("\n"));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A minimal HTTP/1.0 GET with a 2 s timeout: (status, body).
async fn http_get(addr: &str, path: &str) -> anyhow::Result<(u16, String)> {
    let io = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes()).await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        anyhow::Ok(String::from_utf8_lossy(&buf).into_owned())
    };
    let text = tokio::time::timeout(Duration::from_secs(2), io).await.context("timeout")??;
    let status = text
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse::<u16>().ok())
        .with_context(|| format!("bad response {text:?}"))?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Ok((status, body))
}

/// The last `n` lines of a file.
fn tail(path: &Path, n: usize) -> String {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(n)..].join("\n")
        }
        Err(e) => format!("<cannot read {}: {e}>", path.display()),
    }
}

/// Nodes, data shards and replicas per shard as the cluster map says
/// (`null` if the admin service cannot be asked within 5 s).
async fn map_shape(internal: &str, secret: &str) -> Json {
    let ask = async {
        let ch = tonic::transport::Endpoint::from_shared(format!("http://{internal}"))?
            .connect_timeout(Duration::from_secs(2))
            .connect_lazy();
        let mut r = tonic::Request::new(ClusterStatusRequest::default());
        r.set_timeout(Duration::from_secs(5));
        r.metadata_mut().insert(rim_proto::metadata::CLUSTER_SECRET_METADATA_KEY, secret.parse()?);
        let reply = AdminServiceClient::new(ch).cluster_status(r).await?.into_inner();
        let map = reply.map.context("no cluster map yet")?;
        let data: Vec<_> = map.shards.iter().filter(|s| s.shard_id != 0).collect();
        anyhow::Ok(
            Json::obj()
                .with("version", map.version)
                .with("nodes", map.nodes.len())
                .with("data_shards", data.len())
                .with("replicas_per_shard", data.iter().map(|s| s.replicas.len()).max().unwrap_or(0)),
        )
    };
    match tokio::time::timeout(Duration::from_secs(6), ask).await {
        Ok(Ok(j)) => j,
        Ok(Err(e)) => Json::Str(format!("unavailable: {e:#}")),
        Err(_) => Json::Str("unavailable: timeout".into()),
    }
}
