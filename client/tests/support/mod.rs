//! Test support for the client SDK's integration tests: a real in-process
//! 3-node cluster (temp dirs, loopback gRPC, dev code "123456"), gateways
//! serving TCP and WebSocket, registered users, and an event inbox that
//! waits for conditions with deadlines.
#![allow(dead_code, missing_docs)]

pub mod proxy;

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rim_client::{Backoff, Client, ClientConfig, Credentials, Endpoint, Event, NodeApi};
use rim_gateway::SessionConfig;
use rim_gateway::server::{Gateway, GatewayConfig};
use rim_gateway::tcp::TcpOptions;
use rim_node::{Node, NodeConfig, NodeOptions};
use rim_proto::v1::Message;
use tokio::sync::mpsc;

pub const SECRET: &str = "test-cluster-secret-0123456789";
pub const PASSWORD: &str = "secret-pw";
/// Longest any single condition may take on a loaded 2-core machine.
pub const WAIT: Duration = Duration::from_secs(30);

/// Cluster tests run one at a time (clusters are heavy).
pub async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    LOCK.lock().await
}

/// A loopback address outside the kernel's ephemeral range, free now and handed
/// out once per process (see `rim_testkit`): an outgoing connection cannot take
/// it before the node binds it.
pub fn free_addr() -> String {
    rim_testkit::free_addr_string()
}

/// Which gateway transport a test runs over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Tcp,
    Ws,
}

pub struct Cluster {
    pub _dirs: Vec<tempfile::TempDir>,
    pub configs: BTreeMap<u64, NodeConfig>,
    pub nodes: BTreeMap<u64, Node>,
}

impl Cluster {
    pub async fn start() -> Cluster {
        let n = 3;
        let addrs: BTreeMap<u64, String> = (1..=n).map(|id| (id, free_addr())).collect();
        let mut c = Cluster { _dirs: Vec::new(), configs: BTreeMap::new(), nodes: BTreeMap::new() };
        for id in 1..=n {
            let dir = tempfile::tempdir().unwrap();
            let cfg = NodeConfig {
                id,
                data: dir.path().to_path_buf(),
                listen: addrs[&id].clone(),
                client_listen: free_addr(),
                http_listen: free_addr(),
                bootstrap: true,
                peers: addrs.clone(),
                shards: 2,
                cluster_secret: SECRET.into(),
                heartbeat_ms: 100,
                election_min_ms: 500,
                election_max_ms: 1000,
                dev_code: Some("123456".into()),
                ..NodeConfig::default()
            };
            c._dirs.push(dir);
            c.configs.insert(id, cfg);
        }
        for id in 1..=n {
            let node = Node::start(c.configs[&id].clone(), NodeOptions::default()).await.unwrap();
            c.nodes.insert(id, node);
        }
        for node in c.nodes.values() {
            node.wait_ready(WAIT).await.unwrap();
        }
        c
    }

    pub fn seeds(&self) -> Vec<String> {
        self.configs.values().map(|c| c.listen.clone()).collect()
    }

    /// The gRPC API of node 1's public listener.
    pub fn api(&self) -> NodeApi {
        NodeApi::new(&self.configs[&1].client_listen).unwrap()
    }

    /// A gateway serving TCP and WebSocket on loopback, ready.
    pub async fn gateway(&self, id: &str) -> Gateway {
        self.gateway_with(id, SessionConfig::default()).await
    }

    /// A gateway with session settings `session`.
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
            ..GatewayConfig::default()
        };
        let gw = Gateway::start(config).await.unwrap();
        gw.wait_ready(WAIT).await.unwrap();
        gw
    }

    pub async fn shutdown(self) {
        for n in self.nodes.into_values() {
            n.shutdown().await;
        }
    }
}

/// The endpoint of `gw` for `kind`.
pub fn endpoint(gw: &Gateway, kind: Kind) -> Endpoint {
    match kind {
        Kind::Tcp => Endpoint::tcp(gw.tcp_addr().unwrap()),
        Kind::Ws => Endpoint::ws(gw.ws_addr().unwrap()),
    }
}

/// A client configuration for tests: quick retries, generous deadlines.
pub fn config(gateways: Vec<Endpoint>) -> ClientConfig {
    let mut config = ClientConfig::new(gateways);
    config.request_timeout = Duration::from_secs(10);
    config.send_deadline = WAIT;
    config.ack_interval = Duration::from_millis(200);
    config.backoff = Backoff { initial: Duration::from_millis(50), max: Duration::from_millis(500) };
    config
}

/// A unique username.
pub fn username(prefix: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    format!("{prefix}_{}_{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed))
}

/// Registers a user and signs in a first device.
pub async fn register(api: &NodeApi, prefix: &str) -> (String, Credentials) {
    let name = username(prefix);
    api.register(&name, PASSWORD).await.unwrap();
    let creds = api.sign_in(&name, PASSWORD, None).await.unwrap();
    assert_ne!(creds.device_id.0, 0);
    (name, creds)
}

/// Signs in another (new) device of `name`.
pub async fn another_device(api: &NodeApi, name: &str) -> Credentials {
    api.sign_in(name, PASSWORD, None).await.unwrap()
}

/// Polls `f` until it returns `Some`; panics after [`WAIT`].
pub async fn wait_for<T>(mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "condition not met within {WAIT:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A client's events, read as they come and kept.
pub struct Inbox {
    pub name: &'static str,
    rx: mpsc::Receiver<Event>,
    pub events: Vec<Event>,
    pub ended: bool,
}

impl Inbox {
    pub fn new(name: &'static str, rx: mpsc::Receiver<Event>) -> Inbox {
        Inbox { name, rx, events: Vec::new(), ended: false }
    }

    /// Reads events until `done(&events)` holds; panics after `WAIT`.
    pub async fn wait_until(&mut self, what: &str, mut done: impl FnMut(&[Event]) -> bool) {
        let deadline = Instant::now() + WAIT;
        while !done(&self.events) {
            assert!(!self.ended, "{}: events ended before {what}; got {:?}", self.name, self.summary());
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.rx.recv()).await {
                Ok(Some(event)) => self.events.push(event),
                Ok(None) => self.ended = true,
                Err(_) => panic!("{}: no {what} within {WAIT:?}; got {:?}", self.name, self.summary()),
            }
        }
    }

    /// Waits for at least `n` list messages.
    pub async fn wait_messages(&mut self, n: usize) {
        self.wait_until(&format!("{n} messages"), |ev| count_messages(ev) >= n).await;
    }

    /// Waits for a `Synced` event after the `k`-th `Connected` (1-based).
    pub async fn wait_synced_after_connect(&mut self, k: usize) {
        self.wait_until(&format!("sync after connect #{k}"), |ev| {
            let mut connects = 0;
            ev.iter().any(|e| {
                if matches!(e, Event::Connected { .. }) {
                    connects += 1;
                }
                connects >= k && matches!(e, Event::Synced { .. })
            })
        })
        .await;
    }

    /// Reads until the channel ends (the client stopped).
    pub async fn wait_ended(&mut self) {
        let deadline = Instant::now() + WAIT;
        while !self.ended {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.rx.recv()).await {
                Ok(Some(event)) => self.events.push(event),
                Ok(None) => self.ended = true,
                Err(_) => panic!("{}: events did not end; got {:?}", self.name, self.summary()),
            }
        }
    }

    /// Takes what arrived already, without waiting.
    pub fn drain_ready(&mut self) {
        while let Ok(event) = self.rx.try_recv() {
            self.events.push(event);
        }
    }

    pub fn messages(&self) -> Vec<&Message> {
        self.events
            .iter()
            .filter_map(|e| match e {
                Event::Message(m) => Some(m),
                _ => None,
            })
            .collect()
    }

    pub fn seqs(&self) -> Vec<u64> {
        self.messages().iter().map(|m| m.seq).collect()
    }

    /// Contents of the list messages, as strings.
    pub fn texts(&self) -> Vec<String> {
        self.messages().iter().map(|m| String::from_utf8_lossy(&m.content).into_owned()).collect()
    }

    /// Every list message exactly once, in seq order, without gaps.
    pub fn assert_in_order_once(&self) {
        let seqs = self.seqs();
        for pair in seqs.windows(2) {
            assert_eq!(pair[1], pair[0] + 1, "{}: seqs not consecutive: {seqs:?}", self.name);
        }
        let ids: HashSet<u64> = self.messages().iter().map(|m| m.message_id).collect();
        assert_eq!(ids.len(), seqs.len(), "{}: a message was delivered twice: {seqs:?}", self.name);
    }

    pub fn count(&self, pred: impl Fn(&Event) -> bool) -> usize {
        self.events.iter().filter(|e| pred(e)).count()
    }

    fn summary(&self) -> Vec<String> {
        self.events
            .iter()
            .map(|e| match e {
                Event::Message(m) => format!("msg#{}({})", m.seq, String::from_utf8_lossy(&m.content)),
                other => format!("{other:?}"),
            })
            .collect()
    }
}

pub fn count_messages(events: &[Event]) -> usize {
    events.iter().filter(|e| matches!(e, Event::Message(_))).count()
}

/// Starts a client and wraps its events.
pub fn connect(name: &'static str, config: ClientConfig, creds: Credentials) -> (Client, Inbox) {
    let (client, rx) = Client::connect(config, creds);
    (client, Inbox::new(name, rx))
}
