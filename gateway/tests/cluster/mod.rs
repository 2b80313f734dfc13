//! Test support shared by the gateway's integration tests: a real
//! in-process 3-node cluster (real gRPC on loopback, temp data dirs) and
//! registered devices.
#![allow(dead_code, missing_docs)]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rim_node::{Node, NodeConfig, NodeOptions};
use rim_proto::ids::{ShardId, UserId};
use rim_proto::v1::auth_service_client::AuthServiceClient;
use rim_proto::v1::*;

pub const SECRET: &str = "test-cluster-secret-0123456789";

/// Cluster tests run one at a time.
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

pub struct Cluster {
    pub _dirs: Vec<tempfile::TempDir>,
    pub configs: BTreeMap<u64, NodeConfig>,
    pub nodes: BTreeMap<u64, Node>,
}

impl Cluster {
    /// Starts `n` nodes with `shards` data shards and waits until every
    /// group has a leader. The ports are picked before the nodes bind them
    /// (outside the ephemeral range, so no outgoing connection can take one),
    /// but another test process may still bind one meanwhile: such a start is
    /// retried from scratch with new ports and data directories.
    pub async fn start(n: u64, shards: u32) -> Cluster {
        let mut attempt = 1;
        loop {
            match Cluster::try_start(n, shards).await {
                Ok(c) => return c,
                Err(e) if attempt < 5 && e.contains("cannot listen") => {
                    eprintln!("cluster start attempt {attempt} failed ({e}); retrying with new ports");
                    attempt += 1;
                }
                Err(e) => panic!("cluster start failed: {e}"),
            }
        }
    }

    async fn try_start(n: u64, shards: u32) -> Result<Cluster, String> {
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
                shards,
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
            match Node::start(c.configs[&id].clone(), NodeOptions::default()).await {
                Ok(node) => {
                    c.nodes.insert(id, node);
                }
                Err(e) => {
                    c.shutdown().await;
                    return Err(e.to_string());
                }
            }
        }
        for node in c.nodes.values() {
            node.wait_ready(Duration::from_secs(30)).await.unwrap();
        }
        Ok(c)
    }

    pub fn seeds(&self) -> Vec<String> {
        self.configs.values().map(|c| c.listen.clone()).collect()
    }

    pub async fn stop_node(&mut self, id: u64) {
        if let Some(n) = self.nodes.remove(&id) {
            n.shutdown().await;
        }
    }

    /// The leader of `shard` among running nodes, waiting for one.
    pub async fn leader(&self, shard: ShardId) -> u64 {
        wait_for(Duration::from_secs(20), || {
            self.nodes
                .iter()
                .find(|(_, n)| n.core.group(shard).is_some_and(|g| g.is_leader()))
                .map(|(id, _)| *id)
        })
        .await
    }

    pub fn shard_of_user(&self, user: u64) -> ShardId {
        self.nodes.values().next().unwrap().core.shard_of_user(UserId(user)).unwrap()
    }

    pub async fn shutdown(self) {
        for n in self.nodes.into_values() {
            n.shutdown().await;
        }
    }
}

/// Polls `f` until it returns `Some`, or panics after `timeout`.
pub async fn wait_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "condition not met within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A registered, signed-in device.
#[derive(Debug, Clone)]
pub struct Device {
    pub user: u64,
    pub device: u64,
    pub token: String,
}

pub async fn register(c: &Cluster, name: &str) -> Device {
    let addr = &c.configs.values().next().unwrap().client_listen;
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap().connect_lazy();
    let mut auth = AuthServiceClient::new(ch);
    let req = RegisterRequest { username: name.into(), password: "secret-pw".into(), ..Default::default() };
    auth.register(req).await.unwrap();
    let req = SignInRequest { username: name.into(), password: "secret-pw".into(), ..Default::default() };
    let r = auth.sign_in(req).await.unwrap().into_inner();
    Device { user: r.user_id, device: r.device_id, token: r.token }
}
