//! `rim gateway`: a stateless gateway process in front of a cluster.
//!
//! Any number of gateways can serve one cluster; each knows only some seed
//! node addresses. SIGTERM or Ctrl-C stops accepting, tells clients to
//! reconnect elsewhere, drains and exits.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use rim_cluster::{LinkTls, LinkTlsConfig};
use rim_gateway::{Gateway, GatewayConfig, Protocol};

/// Flags of `rim gateway` (each also readable from its `RIM_GATEWAY_*`
/// environment variable; the cluster secret from `RIM_CLUSTER_SECRET`).
#[derive(Args, Debug)]
pub struct GatewayArgs {
    /// TCP listener (framed protobuf), e.g. 0.0.0.0:7400.
    #[arg(long, env = "RIM_GATEWAY_TCP")]
    tcp: Option<String>,
    /// WebSocket listener (path /ws), e.g. 0.0.0.0:7500.
    #[arg(long, env = "RIM_GATEWAY_WS")]
    ws: Option<String>,
    /// Protocol of the TCP listener: rim (default) or gim (gim's connect
    /// packets, for apps built for gim; docs/protocol.md "gim clients").
    #[arg(long, env = "RIM_GATEWAY_TCP_PROTOCOL", default_value = "rim")]
    tcp_protocol: Protocol,
    /// Protocol of the WebSocket listener: rim (default) or gim.
    #[arg(long, env = "RIM_GATEWAY_WS_PROTOCOL", default_value = "rim")]
    ws_protocol: Protocol,
    /// HTTP listener for /metrics and /healthz.
    #[arg(long, env = "RIM_GATEWAY_HTTP")]
    http: Option<String>,
    /// Internal addresses of some logic nodes, comma-separated.
    #[arg(long, env = "RIM_GATEWAY_SEEDS", value_delimiter = ',', required = true)]
    seeds: Vec<String>,
    /// The nodes' gateway secret (`gateway_secret`), or their cluster
    /// secret where no gateway secret is set.
    #[arg(long, alias = "gateway-secret", env = "RIM_CLUSTER_SECRET", hide_env_values = true)]
    cluster_secret: String,
    /// Gateway id shown by the nodes (default: gw-<pid>).
    #[arg(long, env = "RIM_GATEWAY_ID")]
    id: Option<String>,
    /// TCP event-loop threads (default: one per core).
    #[arg(long, env = "RIM_GATEWAY_THREADS")]
    threads: Option<usize>,
    /// Most open TCP connections.
    #[arg(long, env = "RIM_GATEWAY_MAX_CONNECTIONS")]
    max_connections: Option<usize>,
    /// Heartbeat interval told to clients, in seconds (idle timeout = 3 intervals).
    #[arg(long, env = "RIM_GATEWAY_HEARTBEAT_SECS")]
    heartbeat_secs: Option<u64>,
    /// Certificate chain (PEM) of the client-facing listeners: with
    /// --tls-key, TCP speaks TLS and WebSocket is wss://.
    #[arg(long, env = "RIM_GATEWAY_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --tls-cert.
    #[arg(long, env = "RIM_GATEWAY_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// CA bundle (PEM) verifying the nodes: the links to them use TLS.
    #[arg(long, env = "RIM_GATEWAY_UPSTREAM_CA")]
    upstream_ca: Option<PathBuf>,
    /// Client certificate (PEM) presented to nodes that require one.
    #[arg(long, env = "RIM_GATEWAY_UPSTREAM_CERT", requires_all = ["upstream_key", "upstream_ca"])]
    upstream_cert: Option<PathBuf>,
    /// Private key (PEM) of --upstream-cert.
    #[arg(long, env = "RIM_GATEWAY_UPSTREAM_KEY", requires = "upstream_cert")]
    upstream_key: Option<PathBuf>,
    /// Name the nodes' certificates carry (default: each seed's host).
    #[arg(long, env = "RIM_GATEWAY_UPSTREAM_SERVER_NAME", requires = "upstream_ca")]
    upstream_server_name: Option<String>,
}

impl GatewayArgs {
    /// The typed configuration these flags describe.
    pub fn into_config(self) -> anyhow::Result<GatewayConfig> {
        let mut c = GatewayConfig {
            tcp_listen: self.tcp,
            ws_listen: self.ws,
            tcp_protocol: self.tcp_protocol,
            ws_protocol: self.ws_protocol,
            http_listen: self.http,
            seeds: self.seeds.into_iter().map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect(),
            cluster_secret: self.cluster_secret,
            ..GatewayConfig::default()
        };
        if let Some(id) = self.id {
            c.gateway_id = id;
        }
        if let Some(t) = self.threads {
            anyhow::ensure!(t >= 1, "--threads must be at least 1");
            c.tcp.event_loop_threads = t;
        }
        if let Some(m) = self.max_connections {
            c.tcp.max_connections = m;
        }
        if let Some(h) = self.heartbeat_secs {
            anyhow::ensure!(h >= 1, "--heartbeat-secs must be at least 1");
            c.session.heartbeat_interval = Duration::from_secs(h);
        }
        if let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) {
            c.tls = Some(rim_cluster::tls::server_config(cert, key)?);
        }
        if let Some(ca) = self.upstream_ca {
            let files = LinkTlsConfig {
                ca,
                cert: self.upstream_cert,
                key: self.upstream_key,
                require_client_cert: false,
                server_name: self.upstream_server_name,
            };
            c.upstream_tls = Some(LinkTls::load(&files)?);
        }
        anyhow::ensure!(c.cluster_secret.len() >= 16, "the cluster secret must be at least 16 bytes");
        Ok(c)
    }
}

/// Runs a gateway until SIGTERM or Ctrl-C.
pub async fn run(args: GatewayArgs) -> anyhow::Result<()> {
    let config = args.into_config()?;
    let (tcp, ws) = if config.tls.is_some() { ("TCP+TLS", "wss") } else { ("TCP", "ws") };
    let (tcp_protocol, ws_protocol) = (config.tcp_protocol, config.ws_protocol);
    let gateway = Gateway::start(config).await.context("starting the gateway")?;
    if let Some(a) = gateway.tcp_addr() {
        println!("rim gateway: {tcp} on {a} ({tcp_protocol} protocol)");
    }
    if let Some(a) = gateway.ws_addr() {
        println!("rim gateway: WebSocket on {ws}://{a}/ws ({ws_protocol} protocol)");
    }
    if let Some(a) = gateway.http_addr() {
        println!("rim gateway: metrics on http://{a}/metrics");
    }
    tokio::select! {
        r = gateway.wait_ready(Duration::from_secs(30)) => match r {
            Ok(()) => tracing::info!("cluster map loaded; serving"),
            Err(e) => tracing::warn!(error = %e, "cluster not reachable yet; sign-ins fail until it is"),
        },
        () = crate::shutdown_signal() => {
            gateway.shutdown().await;
            return Ok(());
        }
    }
    crate::shutdown_signal().await;
    tracing::info!("shutting down");
    gateway.shutdown().await;
    Ok(())
}
