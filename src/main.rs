//! The `rim` binary: a thin command line over the library crates.
//!
//! Each subcommand parses its flags into the typed options of a library and
//! calls it: `rim node` runs a logic node (`rim-node`), `rim admin` talks to
//! a node's admin service, `rim gateway` runs a gateway (`rim-gateway`),
//! `rim cert` writes TLS certificates,
//! `rim dev` starts a local cluster with a gateway, `rim bench` measures a
//! cluster (`rim-bench`).

/// mimalloc instead of glibc's allocator: the gateway and the nodes allocate
/// and free small buffers per message on many threads, where glibc spent a
/// measurable share of the CPU in `malloc_consolidate` and `free`
/// (docs/benchmarks.md, "Where the CPU goes").
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod admin;
mod cert;
mod chat;
mod dev;
mod gateway;

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use rim_node::NodeConfig;

#[derive(Parser, Debug)]
#[command(name = "rim", version, about = "rim: a Raft-replicated instant-messaging backend")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a logic node.
    Node(NodeArgs),
    /// Run a stateless gateway (TCP and/or WebSocket) in front of a cluster.
    Gateway(gateway::GatewayArgs),
    /// Inspect and change a running cluster.
    Admin(admin::AdminArgs),
    /// Write a private CA and a certificate signed by it (PEM) for TLS.
    Cert(cert::CertArgs),
    /// Interactive terminal chat client (through a gateway).
    Chat(chat::ChatArgs),
    /// Load generation and performance figures against a cluster.
    Bench(rim_bench::BenchArgs),
    /// Local development cluster: 3 logic nodes and a gateway in one process, data in ./rim-data.
    Dev(dev::DevArgs),
}

/// Flags of `rim node`. Precedence: `RIM_*` environment > flags > `--config`
/// file > defaults.
#[derive(Args, Debug, Default)]
struct NodeArgs {
    /// TOML configuration file (keys as in `NodeConfig`, see docs/operations.md).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Node id (≥ 1, unique, never reused).
    #[arg(long)]
    id: Option<u64>,
    /// Data directory.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Internal listener (Raft, gateways, admin).
    #[arg(long)]
    listen: Option<String>,
    /// Client gRPC listener.
    #[arg(long)]
    client_listen: Option<String>,
    /// HTTP listener (/metrics, /healthz).
    #[arg(long)]
    http_listen: Option<String>,
    /// Create a new cluster from --peers.
    #[arg(long)]
    bootstrap: bool,
    /// Initial members: id=internal_addr,...
    #[arg(long)]
    peers: Option<String>,
    /// Dial peers at these addresses instead of their cluster addresses:
    /// id=addr,... (test harnesses: one proxy per link; also RIM_PEER_VIA).
    #[arg(long, value_name = "ID=ADDR,...")]
    peer_via: Option<String>,
    /// Join the cluster of this running node (internal address).
    #[arg(long)]
    join: Option<String>,
    /// Data shards of a new cluster.
    #[arg(long)]
    shards: Option<u32>,
    /// Voters per data shard of a new cluster (default 3, capped at the
    /// node count; the meta group gets max(this, 3)).
    #[arg(long)]
    replication: Option<usize>,
    /// Shared cluster secret (also RIM_CLUSTER_SECRET).
    #[arg(long)]
    cluster_secret: Option<String>,
    /// TLS certificate chain (PEM) of this node's gRPC listeners, also
    /// presented to peers that require client certificates (`[tls]`).
    #[arg(long, env = "RIM_TLS_CERT", requires_all = ["tls_key", "tls_ca"])]
    tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --tls-cert.
    #[arg(long, env = "RIM_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// CA bundle (PEM) verifying peers (and, with
    /// --tls-require-client-cert, every caller of the internal listener).
    #[arg(long, env = "RIM_TLS_CA", requires = "tls_cert")]
    tls_ca: Option<PathBuf>,
    /// Mutual TLS: the internal listener requires a client certificate
    /// signed by --tls-ca.
    #[arg(long, requires = "tls_cert")]
    tls_require_client_cert: bool,
    /// Name every peer's certificate carries (default: each address's host).
    #[arg(long, env = "RIM_TLS_SERVER_NAME", requires = "tls_cert")]
    tls_server_name: Option<String>,
    /// Development: accept this fixed phone sign-in code (logged loudly).
    #[arg(long)]
    dev_code: Option<String>,
    /// Serve reads from the local replica without a read barrier (weaker).
    #[arg(long)]
    follower_reads: bool,
    /// Turn every client rate limit off (`[limits]`, docs/security.md):
    /// for benchmarks that measure raw capacity, never in production.
    #[arg(long)]
    no_rate_limits: bool,
    /// Turn the leader balancer off (`[balance] enabled = false`): leaders
    /// stay where elections put them.
    #[arg(long)]
    no_balance: bool,
    /// TEST ONLY: deliberately break safety for the consistency self-test
    /// (ack-before-commit,stale-reads,skip-fsync,no-relay-dedup; also RIM_SABOTAGE).
    #[arg(long, value_name = "FLAGS")]
    sabotage: Option<String>,
}

impl NodeArgs {
    fn into_config(self) -> anyhow::Result<NodeConfig> {
        let mut c = match &self.config {
            Some(p) => NodeConfig::from_toml(
                &std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?,
            )?,
            None => NodeConfig::default(),
        };
        if let Some(v) = self.id {
            c.id = v;
        }
        if let Some(v) = self.data {
            c.data = v;
        }
        if let Some(v) = self.listen {
            c.listen = v;
        }
        if let Some(v) = self.client_listen {
            c.client_listen = v;
        }
        if let Some(v) = self.http_listen {
            c.http_listen = v;
        }
        if self.bootstrap {
            c.bootstrap = true;
        }
        if let Some(v) = self.peers {
            c.peers = rim_node::config::parse_peers(&v)?;
        }
        if let Some(v) = self.peer_via {
            c.peer_via = rim_node::config::parse_peers(&v)?;
        }
        if let Some(v) = self.join {
            c.join = Some(v);
        }
        if let Some(v) = self.shards {
            c.shards = v;
        }
        if let Some(v) = self.replication {
            c.replication = v;
        }
        if let Some(v) = self.cluster_secret {
            c.cluster_secret = v;
        }
        if let (Some(cert), Some(key), Some(ca)) = (self.tls_cert, self.tls_key, self.tls_ca) {
            c.tls = Some(rim_cluster::LinkTlsConfig {
                ca,
                cert: Some(cert),
                key: Some(key),
                require_client_cert: self.tls_require_client_cert,
                server_name: self.tls_server_name,
            });
        }
        if let Some(v) = self.dev_code {
            c.dev_code = Some(v);
        }
        if self.follower_reads {
            c.follower_reads = true;
        }
        if self.no_balance {
            c.balance.enabled = false;
        }
        if self.no_rate_limits {
            c.limits = rim_node::throttle::RateLimits::unlimited();
        }
        if let Some(v) = self.sabotage {
            c.sabotage = rim_node::Sabotage::parse(&v)?;
        }
        c.apply_env(std::env::vars())?;
        c.validate()?;
        Ok(c)
    }
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("RIM_LOG")
                .unwrap_or_else(|_| "info,openraft=error".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let rt = tokio::runtime::Runtime::new()?;
    let result = match cli.command {
        Command::Node(args) => rt.block_on(run_node(args.into_config()?)),
        Command::Gateway(args) => rt.block_on(gateway::run(args)),
        Command::Admin(args) => rt.block_on(admin::run(args)),
        Command::Cert(args) => cert::run(args),
        Command::Dev(args) => rt.block_on(dev::run(args)),
        Command::Chat(args) => rt.block_on(chat::run(args)),
        Command::Bench(args) => rt.block_on(rim_bench::run(args, shutdown_signal())),
    };
    // A blocking stdin read (`rim chat`, `rim dev`) would keep a plain
    // runtime drop waiting for a line that never comes.
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    result
}

async fn run_node(config: NodeConfig) -> anyhow::Result<()> {
    let node = rim_node::Node::start(config, rim_node::NodeOptions::default()).await?;
    shutdown_signal().await;
    tracing::info!("shutting down");
    node.shutdown().await;
    Ok(())
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
    }
}
