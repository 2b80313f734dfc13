//! An in-process cluster: N real nodes in one test process, real gRPC on
//! loopback, temp data dirs, and a switchboard that cuts links.
#![allow(dead_code, missing_docs)]

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use rim_node::{Node, NodeConfig, NodeOptions};
use rim_proto::metadata::{DEVICE_ID_METADATA_KEY, TOKEN_METADATA_KEY, USER_ID_METADATA_KEY};
use rim_proto::v1::auth_service_client::AuthServiceClient;
use rim_proto::v1::message_service_client::MessageServiceClient;
use rim_proto::v1::*;
use tonic::transport::Channel;

pub const SECRET: &str = "test-cluster-secret-0123456789";

/// Heavy cluster tests run one at a time: the machine has 2 cores.
pub async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    LOCK.lock().await
}

/// A loopback address outside the kernel's ephemeral range, free now and handed
/// out once per process (see `rim_testkit`): an outgoing connection cannot take
/// it before the node binds it.
fn free_addr() -> String {
    rim_testkit::free_addr_string()
}

pub struct Cluster {
    pub dirs: BTreeMap<u64, tempfile::TempDir>,
    pub configs: BTreeMap<u64, NodeConfig>,
    pub nodes: BTreeMap<u64, Node>,
    pub cuts: Arc<RwLock<HashSet<(u64, u64)>>>,
}

impl Cluster {
    pub async fn start(n: u64, shards: u32, tweak: impl Fn(&mut NodeConfig)) -> Cluster {
        let ids: Vec<u64> = (1..=n).collect();
        let addrs: BTreeMap<u64, String> = ids.iter().map(|id| (*id, free_addr())).collect();
        let mut c = Cluster {
            dirs: BTreeMap::new(),
            configs: BTreeMap::new(),
            nodes: BTreeMap::new(),
            cuts: Arc::new(RwLock::new(HashSet::new())),
        };
        for &id in &ids {
            let dir = tempfile::tempdir().unwrap();
            let mut cfg = NodeConfig {
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
            tweak(&mut cfg);
            c.dirs.insert(id, dir);
            c.configs.insert(id, cfg);
        }
        for &id in &ids {
            c.start_node(id).await;
        }
        c.wait_ready().await;
        c
    }

    pub async fn start_node(&mut self, id: u64) {
        let cuts = self.cuts.clone();
        let filter: rim_node::net::LinkFilter = Arc::new(move |a, b| {
            let cuts = cuts.read().unwrap();
            cuts.contains(&(a, b)) || cuts.contains(&(b, a))
        });
        let node =
            Node::start(self.configs[&id].clone(), NodeOptions { link_filter: Some(filter) }).await.unwrap();
        self.nodes.insert(id, node);
    }

    pub async fn stop_node(&mut self, id: u64) {
        if let Some(n) = self.nodes.remove(&id) {
            n.shutdown().await;
        }
    }

    pub async fn wait_ready(&self) {
        for n in self.nodes.values() {
            n.wait_ready(Duration::from_secs(30)).await.unwrap();
        }
    }

    /// Cuts every link between `id` and the other nodes.
    pub fn isolate(&self, id: u64) {
        let mut cuts = self.cuts.write().unwrap();
        for other in self.configs.keys() {
            if *other != id {
                cuts.insert((id, *other));
            }
        }
    }

    pub fn heal(&self) {
        self.cuts.write().unwrap().clear();
    }

    pub fn node(&self, id: u64) -> &Node {
        &self.nodes[&id]
    }

    /// The leader of `shard` as seen by a running node, waiting for one.
    pub async fn leader(&self, shard: u32) -> u64 {
        wait_for(Duration::from_secs(20), || {
            let leaders: HashSet<Option<u64>> =
                self.nodes.values().filter_map(|n| n.core.group(shard)).map(|g| g.leader()).collect();
            match leaders.iter().flatten().next() {
                Some(l)
                    if self.nodes.contains_key(l) && self.nodes[l].core.group(shard).unwrap().is_leader() =>
                {
                    Some(*l)
                }
                _ => None,
            }
        })
        .await
    }

    pub fn shard_of_user(&self, user: u64) -> u32 {
        self.nodes.values().next().unwrap().core.shard_of_user(user).unwrap()
    }

    pub async fn client(&self, id: u64) -> Client {
        Client::connect(&self.configs[&id].client_listen).await
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

/// A signed-in device.
#[derive(Clone, Debug)]
pub struct Session {
    pub user: u64,
    pub device: u64,
    pub token: String,
}

/// A gRPC client of one node.
#[derive(Clone)]
pub struct Client {
    pub channel: Channel,
}

impl Client {
    pub async fn connect(addr: &str) -> Client {
        let channel =
            tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap().connect_lazy();
        Client { channel }
    }

    pub fn authed<T>(s: &Session, msg: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        r.set_timeout(Duration::from_secs(10));
        r.metadata_mut().insert(USER_ID_METADATA_KEY, s.user.to_string().parse().unwrap());
        r.metadata_mut().insert(DEVICE_ID_METADATA_KEY, s.device.to_string().parse().unwrap());
        r.metadata_mut().insert(TOKEN_METADATA_KEY, s.token.parse().unwrap());
        r
    }

    pub async fn register(&self, username: &str) -> u64 {
        let mut a = AuthServiceClient::new(self.channel.clone());
        let req =
            RegisterRequest { username: username.into(), password: "secret-pw".into(), ..Default::default() };
        a.register(req).await.unwrap().into_inner().user_id
    }

    pub async fn sign_in(&self, username: &str) -> Session {
        let mut a = AuthServiceClient::new(self.channel.clone());
        let req =
            SignInRequest { username: username.into(), password: "secret-pw".into(), ..Default::default() };
        let r = a.sign_in(req).await.unwrap().into_inner();
        Session { user: r.user_id, device: r.device_id, token: r.token }
    }

    pub async fn send(
        &self,
        s: &Session,
        to: u64,
        cmid: &str,
        text: &str,
    ) -> Result<SendOutput, tonic::Status> {
        let mut m = MessageServiceClient::new(self.channel.clone());
        let input = SendInput {
            conversation_kind: ConversationKind::User as i32,
            conversation_id: to,
            client_msg_id: cmid.into(),
            content_type: ContentType::Text as i32,
            content: text.as_bytes().to_vec().into(),
            ..Default::default()
        };
        m.send_message(Self::authed(s, input)).await.map(|r| r.into_inner())
    }

    pub async fn sync_all(&self, s: &Session) -> Vec<Message> {
        let mut m = MessageServiceClient::new(self.channel.clone());
        let mut out = Vec::new();
        let mut after = 0;
        loop {
            let r = m
                .sync(Self::authed(s, SyncInput { after_seq: after, limit: 200 }))
                .await
                .unwrap()
                .into_inner();
            after = r.messages.last().map(|x| x.seq).unwrap_or(after);
            out.extend(r.messages);
            if !r.has_more {
                return out;
            }
        }
    }
}

/// The `rim-code` of a failed call.
pub fn code(s: &tonic::Status) -> rim_proto::ErrorCode {
    rim_proto::error::code_of_status(s)
}

/// Text messages of a list, as `(seq, client_msg_id)`.
pub fn texts(list: &[Message]) -> Vec<(u64, String)> {
    list.iter()
        .filter(|m| m.content_type == ContentType::Text as i32)
        .map(|m| (m.seq, m.client_msg_id.clone()))
        .collect()
}

/// `wait_for` for async probes.
pub async fn wait_for_async<T, F, Fut>(timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "condition not met within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Registers `{prefix}a`, then users until one lives on another shard.
pub async fn users_on_two_shards(c: &Cluster, client: &Client, prefix: &str) -> (Session, Session) {
    client.register(&format!("{prefix}a")).await;
    let a = client.sign_in(&format!("{prefix}a")).await;
    for i in 0..50 {
        let name = format!("{prefix}b{i}");
        let id = client.register(&name).await;
        if c.shard_of_user(id) != c.shard_of_user(a.user) {
            return (a, client.sign_in(&name).await);
        }
    }
    panic!("no user landed on another shard");
}

/// Sends, retrying with the same client_msg_id on retryable errors.
pub async fn send_until_acked(client: &Client, s: &Session, to: u64, cmid: &str) -> SendOutput {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match client.send(s, to, cmid, "payload").await {
            Ok(o) => return o,
            Err(e) => {
                assert!(code(&e).is_retryable(), "unexpected error {e:?}");
                assert!(Instant::now() < deadline, "send {cmid} never acknowledged");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

impl Cluster {
    /// Stops every node.
    pub async fn shutdown(self) {
        for n in self.nodes.into_values() {
            n.shutdown().await;
        }
    }
}
