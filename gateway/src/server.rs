//! A whole gateway process: both transports over one router, plus HTTP.
//!
//! [`Gateway::start`] builds one [`Upstream`] (the node client, knowing only
//! seed addresses) and one [`PushRouter`] (per-shard push streams), then
//! starts whichever transports are configured: the mio TCP transport
//! ([`TcpGateway`], its own event-loop threads) and the WebSocket transport
//! ([`WsGateway`], tasks on the tokio runtime), plus `/metrics` and
//! `/healthz` over HTTP.
//!
//! # Invariants
//!
//! * Both transports register with the same router, so they draw connection
//!   ids from **one** counter: ids never collide, and a device signing in
//!   over WebSocket kicks its older TCP connection and vice versa.
//! * Each client listener speaks one protocol ([`GatewayConfig::tcp_protocol`],
//!   [`GatewayConfig::ws_protocol`]): rim's, or gim's translated at the
//!   edge ([`crate::gim`]); a gim connection is the same session with the
//!   same bounds, on the same router and connection-id counter.
//! * With [`GatewayConfig::tls`] both client listeners speak TLS (TCP
//!   inside TLS, WebSocket as `wss://`) with the same certificate; no
//!   plaintext port is opened beside them.
//! * [`Gateway::shutdown`] stops accepting first, then tells every client
//!   (`KICK` with `ERROR_UNAVAILABLE`, so SDKs reconnect elsewhere), drains
//!   what is queued within a short linger, and only then closes the push
//!   streams. A gateway holds no durable state, so nothing is lost: clients
//!   sync from their last seq wherever they reconnect.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::http::StatusCode;
use axum::routing::get;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::error::{Error, Result};
use crate::router::{PushRouter, RouterOptions};
use crate::tcp::{DEFAULT_FIRST_CONN_ID, TcpGateway, TcpOptions};
use crate::upstream::{Upstream, UpstreamOptions};
use crate::ws::WsGateway;
use crate::{Protocol, SessionConfig};

/// Everything a gateway process needs. [`Default`] listens nowhere and
/// knows no seeds: set at least one listener and the seeds.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// TCP (framed protobuf) listener, e.g. `0.0.0.0:7400`.
    pub tcp_listen: Option<String>,
    /// WebSocket listener (path `/ws`), e.g. `0.0.0.0:7500`.
    pub ws_listen: Option<String>,
    /// Protocol of the TCP listener (default rim; gim: gim's `connect`
    /// packets, `docs/protocol.md` "gim clients").
    pub tcp_protocol: Protocol,
    /// Protocol of the WebSocket listener (default rim).
    pub ws_protocol: Protocol,
    /// HTTP listener for `/metrics` and `/healthz`.
    pub http_listen: Option<String>,
    /// Internal addresses of some logic nodes (any one that answers is
    /// enough).
    pub seeds: Vec<String>,
    /// The shared cluster secret.
    pub cluster_secret: String,
    /// TLS of the client-facing listeners (TCP and WebSocket alike), from
    /// [`rim_cluster::tls::server_config`]; `None` serves plaintext.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// TLS of the links to the nodes; `None` dials plaintext.
    pub upstream_tls: Option<rim_cluster::LinkTls>,
    /// This gateway's id (stable for the process's life; shown by nodes).
    pub gateway_id: String,
    /// Deadline of one node call, retries included.
    pub request_timeout: Duration,
    /// Session limits and timers (both transports).
    pub session: SessionConfig,
    /// TCP event loops, and the connection limit of each transport (TCP and
    /// WebSocket alike). Its `tls` and `protocol` are not read:
    /// [`tls`](Self::tls) serves both transports, and each listener has
    /// its own protocol.
    pub tcp: TcpOptions,
    /// Push-stream timers.
    pub router: RouterOptions,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        GatewayConfig {
            tcp_listen: None,
            ws_listen: None,
            tcp_protocol: Protocol::Rim,
            ws_protocol: Protocol::Rim,
            http_listen: None,
            seeds: Vec::new(),
            cluster_secret: String::new(),
            tls: None,
            upstream_tls: None,
            gateway_id: format!("gw-{}", std::process::id()),
            request_timeout: Duration::from_secs(5),
            session: SessionConfig::default(),
            tcp: TcpOptions { event_loop_threads: threads, ..TcpOptions::default() },
            router: RouterOptions::default(),
        }
    }
}

/// The id this process speaks to the nodes with: the configured id and a
/// random suffix, so every process is its own instance even when a
/// restarted gateway keeps its configured id. The nodes index sessions by
/// it and take the sessions of an instance whose push streams vanished
/// offline (rim-node `sessions`). At most 100 bytes of the configured id
/// are kept (the nodes accept 128).
fn instance_id(configured: &str) -> String {
    let mut end = configured.len().min(100);
    while !configured.is_char_boundary(end) {
        end -= 1;
    }
    // std's per-process random hash keys: random enough to tell two
    // processes of one gateway apart.
    use std::hash::{BuildHasher, Hasher};
    let nonce = std::collections::hash_map::RandomState::new().build_hasher().finish() as u32;
    format!("{}.{nonce:08x}", &configured[..end])
}

/// A running gateway. Stop it with [`shutdown`](Self::shutdown).
pub struct Gateway {
    upstream: Upstream,
    router: PushRouter,
    tcp: Option<TcpGateway>,
    /// Open TCP connections (shared with the TCP transport).
    tcp_open: Option<Arc<AtomicUsize>>,
    tcp_addr: Option<SocketAddr>,
    ws: Option<(oneshot::Sender<()>, JoinHandle<()>)>,
    ws_addr: Option<SocketAddr>,
    http: Option<JoinHandle<()>>,
    http_addr: Option<SocketAddr>,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("tcp", &self.tcp_addr)
            .field("ws", &self.ws_addr)
            .field("http", &self.http_addr)
            .finish()
    }
}

impl Gateway {
    /// Binds the configured listeners and starts serving. Must be called on
    /// a tokio runtime (node calls and the WebSocket transport run on it).
    /// Does not wait for the cluster: see [`wait_ready`](Self::wait_ready).
    pub async fn start(config: GatewayConfig) -> Result<Gateway> {
        if config.tcp_listen.is_none() && config.ws_listen.is_none() {
            return Err(Error::Config("neither a TCP nor a WebSocket listener is set".into()));
        }
        if config.seeds.is_empty() {
            return Err(Error::Config("no seed node addresses".into()));
        }
        let mut options = UpstreamOptions::new(
            config.seeds.clone(),
            config.cluster_secret.clone(),
            instance_id(&config.gateway_id),
        );
        options.request_timeout = config.request_timeout;
        options.tls = config.upstream_tls.clone();
        let upstream = Upstream::new(options)?;
        let router = PushRouter::new(upstream.clone(), config.router.clone());
        let conn_ids = Arc::new(AtomicU64::new(DEFAULT_FIRST_CONN_ID));
        let mut gw = Gateway {
            upstream: upstream.clone(),
            router: router.clone(),
            tcp: None,
            tcp_open: None,
            tcp_addr: None,
            ws: None,
            ws_addr: None,
            http: None,
            http_addr: None,
        };

        if let Some(addr) = &config.tcp_listen {
            let listener = std::net::TcpListener::bind(addr.as_str())
                .map_err(|source| Error::Bind { addr: addr.clone(), source })?;
            let options =
                TcpOptions { tls: config.tls.clone(), protocol: config.tcp_protocol, ..config.tcp.clone() };
            let tcp = TcpGateway::start_with_conn_ids(
                listener,
                upstream.clone(),
                router.clone(),
                config.session.clone(),
                tokio::runtime::Handle::current(),
                options,
                conn_ids.clone(),
            )
            .map_err(|e| match e {
                Error::Io(source) => Error::Bind { addr: addr.clone(), source },
                other => other,
            })?;
            gw.tcp_addr = Some(tcp.local_addr());
            gw.tcp_open = Some(tcp.connection_counter());
            gw.tcp = Some(tcp);
        }
        if let Some(addr) = &config.ws_listen {
            let listener = bind_tokio(addr).await?;
            gw.ws_addr = listener.local_addr().ok();
            let (tls, protocol) = (config.tls.is_some(), config.ws_protocol.as_str());
            tracing::info!(addr = ?gw.ws_addr, tls, protocol, "WebSocket gateway listening on /ws");
            let (stop_tx, stop_rx) = oneshot::channel::<()>();
            let mut ws = WsGateway::new(upstream.clone(), router.clone(), config.session.clone())
                .with_conn_ids(conn_ids.clone())
                .with_max_connections(config.tcp.max_connections)
                .with_protocol(config.ws_protocol);
            if let Some(tls) = &config.tls {
                ws = ws.with_tls(tls.clone());
            }
            let task = tokio::spawn(ws.serve(listener, async move {
                let _ = stop_rx.await;
            }));
            gw.ws = Some((stop_tx, task));
        }
        if let Some(addr) = &config.http_listen {
            let listener = bind_tokio(addr).await?;
            gw.http_addr = listener.local_addr().ok();
            let app = http_app(upstream, router, gw.tcp_open.clone());
            gw.http = Some(tokio::spawn(async move {
                if let Err(e) = axum::serve(listener, app).await {
                    tracing::warn!(error = %e, "gateway HTTP server stopped");
                }
            }));
        }
        Ok(gw)
    }

    /// Waits until the cluster map has been loaded from a seed, so that
    /// sign-ins can be routed.
    pub async fn wait_ready(&self, timeout: Duration) -> Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match self.upstream.ensure_map().await {
                Ok(_) => return Ok(()),
                Err(e) if tokio::time::Instant::now() >= deadline => {
                    return Err(Error::Call(e));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    /// The bound TCP address, if serving TCP.
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.tcp_addr
    }

    /// The bound WebSocket address, if serving WebSocket.
    pub fn ws_addr(&self) -> Option<SocketAddr> {
        self.ws_addr
    }

    /// The bound HTTP address, if serving `/metrics`.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http_addr
    }

    /// The push router (tests and metrics).
    pub fn router(&self) -> &PushRouter {
        &self.router
    }

    /// Open TCP connections.
    pub fn tcp_connections(&self) -> usize {
        self.tcp_open.as_ref().map_or(0, |n| n.load(Ordering::Acquire))
    }

    /// Stops accepting, tells every client to go elsewhere, drains within a
    /// short linger, closes the push streams. Returns when all is stopped.
    pub async fn shutdown(mut self) {
        if let Some((stop, task)) = self.ws.take() {
            let _ = stop.send(());
            let _ = task.await;
        }
        if let Some(tcp) = self.tcp.take() {
            // Joins event-loop threads: keep it off the async workers.
            let _ = tokio::task::spawn_blocking(move || tcp.shutdown()).await;
        }
        self.router.shutdown().await;
        if let Some(http) = self.http.take() {
            http.abort();
        }
        tracing::info!("gateway stopped");
    }
}

async fn bind_tokio(addr: &str) -> Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await.map_err(|source| Error::Bind { addr: addr.to_string(), source })
}

fn http_app(upstream: Upstream, router: PushRouter, tcp_open: Option<Arc<AtomicUsize>>) -> Router {
    let health_upstream = upstream.clone();
    Router::new()
        .route(
            "/metrics",
            get(move || {
                let (router, upstream) = (router.clone(), upstream.clone());
                let tcp_open = tcp_open.as_ref().map(|n| n.load(Ordering::Acquire));
                async move { render_metrics(&router, &upstream, tcp_open) }
            }),
        )
        .route(
            "/healthz",
            get(move || {
                let upstream = health_upstream.clone();
                async move {
                    if upstream.cluster_map().is_some() {
                        (StatusCode::OK, "ok\n")
                    } else {
                        (StatusCode::SERVICE_UNAVAILABLE, "cluster map not loaded yet\n")
                    }
                }
            }),
        )
}

/// Prometheus text exposition of the gateway's counters.
fn render_metrics(router: &PushRouter, upstream: &Upstream, tcp_open: Option<usize>) -> String {
    use std::fmt::Write;
    let s = router.stats();
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, value: u64| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}");
    };
    if let Some(open) = tcp_open {
        metric("rim_gateway_tcp_connections", "gauge", "Open TCP client connections.", open as u64);
    }
    metric("rim_gateway_push_subscriptions_total", "counter", "Push streams established.", s.subscriptions);
    metric("rim_gateway_push_stream_breaks_total", "counter", "Push streams that broke.", s.stream_breaks);
    metric(
        "rim_gateway_slow_connection_drops_total",
        "counter",
        "Connections closed because their send queue was full.",
        s.overflows,
    );
    metric("rim_gateway_kicks_total", "counter", "Connections kicked by a newer sign-in.", s.kicks);
    metric(
        "rim_gateway_ws_connections_refused_total",
        "counter",
        "WebSocket connections refused at the connection limit.",
        crate::ws::refused_total(),
    );
    metric(
        "rim_gateway_offline_notices_dropped_total",
        "counter",
        "Best-effort offline notices dropped because too many were in flight.",
        crate::notice::dropped_total(),
    );
    metric(
        "rim_gateway_online_pushes_dropped_total",
        "counter",
        "Normal-priority online-only pushes dropped for connections whose send queue was more than half full.",
        crate::session::online_pushes_dropped_total(),
    );
    let batches = upstream.send_batch_stats();
    metric(
        "rim_gateway_send_batches_total",
        "counter",
        "SendBatch RPCs sent to the nodes (each carries one or more client sends).",
        batches.batches,
    );
    metric(
        "rim_gateway_send_batch_items_total",
        "counter",
        "Client sends carried by SendBatch RPCs.",
        batches.items,
    );
    metric(
        "rim_gateway_send_unbatched_total",
        "counter",
        "Client sends that went as a unary Send: batch queue full, or the node does not know SendBatch.",
        batches.unbatched,
    );
    metric(
        "rim_gateway_cluster_map_loaded",
        "gauge",
        "1 once the cluster map is known.",
        u64::from(upstream.cluster_map().is_some()),
    );
    out
}
