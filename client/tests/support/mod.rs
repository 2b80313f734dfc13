//! Test support for the client SDK's integration tests, over the shared
//! harness (`rim_testkit`): its in-process cluster and gateways, plus what
//! only SDK tests need (client configs, registered users, and an event
//! inbox that waits for conditions with deadlines).
#![allow(dead_code, missing_docs, unused_imports)]

pub mod proxy;

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rim_client::{Backoff, Client, ClientConfig, Credentials, Endpoint, Event, NodeApi};
use rim_gateway::server::Gateway;
use rim_proto::v1::Message;
use tokio::sync::mpsc;

pub use rim_testkit::grpc::SECRET;
pub const PASSWORD: &str = "secret-pw";
/// Longest any single condition may take on a loaded 2-core machine.
pub const WAIT: Duration = Duration::from_secs(30);

pub use rim_testkit::cluster::Cluster;
pub use rim_testkit::free_addr_string as free_addr;
pub use rim_testkit::wait::serial;

/// Which gateway transport a test runs over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Tcp,
    Ws,
}

/// The client SDK's gRPC API of node 1's public listener.
pub fn api(c: &Cluster) -> NodeApi {
    NodeApi::new(&c.configs[&1].client_listen).unwrap()
}

/// The cluster every SDK test runs against: 3 nodes, 2 data shards.
pub async fn cluster() -> Cluster {
    Cluster::start(3, 2).await
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
pub async fn wait_for<T>(f: impl FnMut() -> Option<T>) -> T {
    rim_testkit::wait::wait_for(WAIT, "condition", f).await
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
