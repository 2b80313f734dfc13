//! Harness for real-process tests: `rim node` processes with temp data dirs,
//! free loopback ports and per-process log files, plus a small gRPC client
//! that retries retryable errors under a deadline.
#![allow(dead_code, missing_docs)]

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::future::Future;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use prost::Message as _;
use rim_proto::ErrorCode;
use rim_proto::metadata::{
    CLUSTER_SECRET_METADATA_KEY, DEVICE_ID_METADATA_KEY, TOKEN_METADATA_KEY, USER_ID_METADATA_KEY,
};
use rim_proto::v1::admin_service_client::AdminServiceClient;
use rim_proto::v1::auth_service_client::AuthServiceClient;
use rim_proto::v1::group_service_client::GroupServiceClient;
use rim_proto::v1::message_service_client::MessageServiceClient;
use rim_proto::v1::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::Channel;

/// Cluster secret of every test cluster (≥ 16 characters).
pub const SECRET: &str = "process-test-secret-0123456789";
/// Fixed phone sign-in code of the test nodes.
pub const DEV_CODE: &str = "123456";
/// Password of every registered test user.
pub const PASSWORD: &str = "secret-pw";

/// The built `rim` binary.
pub fn rim_bin() -> &'static str {
    env!("CARGO_BIN_EXE_rim")
}

/// The tests start whole clusters: run them one at a time (2 cores).
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

/// A `rim` command with no inherited `RIM_*` settings, in its own process group.
pub fn rim_command() -> Command {
    let mut cmd = Command::new(rim_bin());
    for (k, _) in std::env::vars() {
        if k.starts_with("RIM_") {
            cmd.env_remove(k);
        }
    }
    cmd.env("NO_COLOR", "1").stdin(Stdio::null()).process_group(0);
    cmd
}

/// The last `n` lines of a file (or why it cannot be read).
pub fn tail(path: &Path, n: usize) -> String {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(n)..].join("\n")
        }
        Err(e) => format!("<cannot read {}: {e}>", path.display()),
    }
}

/// One `rim node` process (running or not) with its temp dir, which holds
/// `data/` and `node.log` (stdout and stderr of every run, appended).
pub struct NodeProc {
    pub id: u64,
    pub internal: String,
    pub client: String,
    pub http: String,
    args: Vec<String>,
    child: Option<Child>,
    runs: u32,
    dir: tempfile::TempDir,
}

impl NodeProc {
    fn new(id: u64, internal: String, peers: &str, shards: u32, extra: &[&str]) -> NodeProc {
        let dir = tempfile::tempdir().expect("tempdir");
        let (client, http) = (free_addr(), free_addr());
        let data = dir.path().join("data");
        let mut args: Vec<String> = vec![
            "node".into(),
            "--id".into(),
            id.to_string(),
            "--data".into(),
            data.display().to_string(),
            "--listen".into(),
            internal.clone(),
            "--client-listen".into(),
            client.clone(),
            "--http-listen".into(),
            http.clone(),
            "--bootstrap".into(),
            "--peers".into(),
            peers.into(),
            "--shards".into(),
            shards.to_string(),
            "--cluster-secret".into(),
            SECRET.into(),
            "--dev-code".into(),
            DEV_CODE.into(),
        ];
        args.extend(extra.iter().map(|a| a.to_string()));
        NodeProc { id, internal, client, http, args, child: None, runs: 0, dir }
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("node.log")
    }

    /// Starts the process with the same flags and data dir as before.
    pub fn spawn(&mut self) {
        assert!(self.child.is_none(), "node {} is already running", self.id);
        self.runs += 1;
        let mut log = OpenOptions::new().create(true).append(true).open(self.log_path()).expect("open log");
        use std::io::Write;
        writeln!(log, "===== run {} of node {}: rim {} =====", self.runs, self.id, self.args.join(" "))
            .expect("write log");
        let err: File = log.try_clone().expect("clone log");
        let child = rim_command()
            .args(&self.args)
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(err))
            .spawn()
            .expect("spawn rim node");
        self.child = Some(child);
    }

    /// SIGKILL (`Child::kill` on unix), then reap.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Panics (with the log tail) if the process has exited on its own.
    fn check_alive(&mut self) {
        if let Some(c) = self.child.as_mut()
            && let Ok(Some(status)) = c.try_wait()
        {
            self.child = None;
            panic!(
                "node {} exited on its own with {status}; log tail:\n{}",
                self.id,
                tail(&self.log_path(), 40)
            );
        }
    }

    pub fn log_tail(&self, n: usize) -> String {
        tail(&self.log_path(), n)
    }

    /// Polls `/healthz` until it answers 200 (every group has a leader).
    pub async fn wait_healthy(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            self.check_alive();
            let last = match http_get(&self.http, "/healthz").await {
                Ok((200, _)) => return,
                Ok((code, body)) => format!("{code} {}", body.trim()),
                Err(e) => e,
            };
            assert!(
                Instant::now() < deadline,
                "node {} not healthy within {timeout:?} (last: {last}); log tail:\n{}",
                self.id,
                self.log_tail(40)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A minimal HTTP/1.0 GET: (status, body).
pub async fn http_get(addr: &str, path: &str) -> Result<(u16, String), String> {
    let io = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.map_err(|e| format!("connect: {e}"))?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
            .await
            .map_err(|e| format!("write: {e}"))?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.map_err(|e| format!("read: {e}"))?;
        Ok::<_, String>(String::from_utf8_lossy(&buf).into_owned())
    };
    let text =
        tokio::time::timeout(Duration::from_secs(2), io).await.map_err(|_| "timeout".to_string())??;
    let status = text
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse::<u16>().ok())
        .ok_or_else(|| format!("bad response {text:?}"))?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Ok((status, body))
}

/// N `rim node` processes bootstrapped together.
pub struct ProcCluster {
    pub nodes: BTreeMap<u64, NodeProc>,
}

impl ProcCluster {
    /// Starts `n` nodes with `--bootstrap --peers ...` and waits until each is healthy.
    pub async fn start(n: u64, shards: u32) -> ProcCluster {
        ProcCluster::start_with(n, shards, &[]).await
    }

    /// The nodes of a new cluster (`--bootstrap`, `extra` flags for every
    /// node), none started yet.
    pub fn create(n: u64, shards: u32, extra: &[&str]) -> ProcCluster {
        let internal: BTreeMap<u64, String> = (1..=n).map(|id| (id, free_addr())).collect();
        let peers = internal.iter().map(|(id, a)| format!("{id}={a}")).collect::<Vec<_>>().join(",");
        ProcCluster {
            nodes: internal
                .into_iter()
                .map(|(id, a)| (id, NodeProc::new(id, a, &peers, shards, extra)))
                .collect(),
        }
    }

    /// Like [`ProcCluster::start`], with `extra` flags for every node.
    pub async fn start_with(n: u64, shards: u32, extra: &[&str]) -> ProcCluster {
        let mut c = ProcCluster::create(n, shards, extra);
        for p in c.nodes.values_mut() {
            p.spawn();
        }
        c.wait_all_healthy(Duration::from_secs(60)).await;
        c
    }

    pub fn ids(&self) -> Vec<u64> {
        self.nodes.keys().copied().collect()
    }

    pub fn node(&mut self, id: u64) -> &mut NodeProc {
        self.nodes.get_mut(&id).expect("no such node")
    }

    /// Waits until every running node is healthy.
    pub async fn wait_all_healthy(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        for p in self.nodes.values_mut().filter(|p| p.is_running()) {
            p.wait_healthy(deadline.saturating_duration_since(Instant::now())).await;
        }
    }

    pub fn kill(&mut self, id: u64) {
        self.node(id).kill();
    }

    pub fn kill_all(&mut self) {
        for p in self.nodes.values_mut() {
            p.kill();
        }
    }

    pub fn client(&self, id: u64) -> Client {
        Client::connect(&self.nodes[&id].client)
    }

    /// The admin view of node `id` (internal listener, cluster secret).
    pub async fn status(&self, id: u64) -> Result<ClusterStatusReply, tonic::Status> {
        let ch = endpoint(&self.nodes[&id].internal).connect_lazy();
        let mut r = tonic::Request::new(ClusterStatusRequest::default());
        r.set_timeout(Duration::from_secs(5));
        r.metadata_mut().insert(CLUSTER_SECRET_METADATA_KEY, SECRET.parse().expect("secret metadata"));
        AdminServiceClient::new(ch).cluster_status(r).await.map(|r| r.into_inner())
    }

    /// The placement as node `id` knows it, waiting until it has a cluster
    /// map (a healthy node may not have one yet).
    pub async fn placement(&self, id: u64) -> rim_cluster::Placement {
        let map = eventually(Duration::from_secs(20), &format!("node {id} has a cluster map"), || async {
            retry(Duration::from_secs(20), "cluster_status", || self.status(id)).await.map
        })
        .await;
        rim_cluster::Placement::new(map).expect("valid map")
    }

    /// The leader of `shard` that every running node hosting it agrees on.
    pub async fn leader(&self, shard: u32, timeout: Duration) -> u64 {
        let deadline = Instant::now() + timeout;
        loop {
            let mut seen = Vec::new();
            for (id, p) in &self.nodes {
                if !p.is_running() {
                    continue;
                }
                // Nodes without a replica of the shard have no say.
                match self.status(*id).await {
                    Ok(s) => match s.groups.iter().find(|g| g.group_id == shard) {
                        Some(g) => seen.push(g.leader_node_id),
                        None => continue,
                    },
                    Err(_) => seen.push(0),
                }
            }
            if let Some(&l) = seen.first()
                && l != 0
                && seen.iter().all(|x| *x == l)
                && self.nodes.get(&l).is_some_and(NodeProc::is_running)
            {
                return l;
            }
            assert!(
                Instant::now() < deadline,
                "no agreed leader of shard {shard} within {timeout:?}: {seen:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for ProcCluster {
    fn drop(&mut self) {
        self.kill_all();
        if std::thread::panicking() {
            for p in self.nodes.values() {
                eprintln!(
                    "----- node {} log tail ({}) -----\n{}",
                    p.id,
                    p.log_path().display(),
                    p.log_tail(60)
                );
            }
        }
    }
}

fn endpoint(addr: &str) -> tonic::transport::Endpoint {
    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("endpoint")
        .connect_timeout(Duration::from_secs(2))
}

/// The `rim-code` of a failed call.
pub fn code(s: &tonic::Status) -> ErrorCode {
    rim_proto::error::code_of_status(s)
}

/// Runs `f` until it succeeds; retryable errors are retried until `timeout`,
/// any other error fails the test.
pub async fn retry<T, F, Fut>(timeout: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, tonic::Status>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        match f().await {
            Ok(v) => return v,
            Err(e) => {
                assert!(code(&e).is_retryable(), "{what}: non-retryable error {:?}: {e:?}", code(&e));
                assert!(Instant::now() < deadline, "{what}: still failing after {timeout:?}: {e:?}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Polls the async probe `f` until it returns `Some`, or panics after `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: not within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A signed-in device.
#[derive(Clone, Debug)]
pub struct Session {
    pub user: u64,
    pub device: u64,
    pub token: String,
}

/// A gRPC client of one node's client listener.
#[derive(Clone)]
pub struct Client {
    pub channel: Channel,
}

impl Client {
    pub fn connect(addr: &str) -> Client {
        Client { channel: endpoint(addr).connect_lazy() }
    }

    pub fn authed<T>(s: &Session, msg: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        r.set_timeout(Duration::from_secs(10));
        r.metadata_mut().insert(USER_ID_METADATA_KEY, s.user.to_string().parse().expect("metadata"));
        r.metadata_mut().insert(DEVICE_ID_METADATA_KEY, s.device.to_string().parse().expect("metadata"));
        r.metadata_mut().insert(TOKEN_METADATA_KEY, s.token.parse().expect("metadata"));
        r
    }

    /// Registers `username` (a retry that finds it already registered is
    /// fine: the first attempt went through) and signs in a new device.
    pub async fn register_and_sign_in(&self, username: &str) -> Session {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut attempts = 0;
        loop {
            attempts += 1;
            let mut a = AuthServiceClient::new(self.channel.clone());
            let mut req = tonic::Request::new(RegisterRequest {
                username: username.into(),
                password: PASSWORD.into(),
                ..Default::default()
            });
            req.set_timeout(Duration::from_secs(10));
            match a.register(req).await {
                Ok(_) => break,
                Err(e) if attempts > 1 && code(&e) == ErrorCode::ErrorAlreadyExists => break,
                Err(e) => {
                    assert!(code(&e).is_retryable(), "register {username}: {e:?}");
                    assert!(Instant::now() < deadline, "register {username}: still failing: {e:?}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        let r = retry(Duration::from_secs(30), "sign_in", || {
            let mut a = AuthServiceClient::new(self.channel.clone());
            let mut req = tonic::Request::new(SignInRequest {
                username: username.into(),
                password: PASSWORD.into(),
                ..Default::default()
            });
            req.set_timeout(Duration::from_secs(10));
            async move { a.sign_in(req).await.map(|r| r.into_inner()) }
        })
        .await;
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

    /// Sends until acknowledged, retrying with the same `client_msg_id`.
    pub async fn send_acked(&self, s: &Session, to: u64, cmid: &str, text: &str) -> SendOutput {
        retry(Duration::from_secs(30), &format!("send {cmid}"), || self.send(s, to, cmid, text)).await
    }

    /// The whole list of `s.user`, page by page.
    pub async fn sync_all(&self, s: &Session) -> Result<Vec<Message>, tonic::Status> {
        let mut m = MessageServiceClient::new(self.channel.clone());
        let mut out = Vec::new();
        let mut after = 0;
        loop {
            let r = m.sync(Self::authed(s, SyncInput { after_seq: after, limit: 200 })).await?.into_inner();
            after = r.messages.last().map(|x| x.seq).unwrap_or(after);
            out.extend(r.messages);
            if !r.has_more {
                return Ok(out);
            }
        }
    }

    /// Signs in by phone (the dev code; no password hashing, so cheap),
    /// creating the user on first use.
    pub async fn phone_sign_in(&self, phone: &str) -> Session {
        let r = retry(Duration::from_secs(30), "sign_in_by_phone", || {
            let mut a = AuthServiceClient::new(self.channel.clone());
            let mut req = tonic::Request::new(SignInByPhoneRequest {
                phone: phone.into(),
                code: DEV_CODE.into(),
                ..Default::default()
            });
            req.set_timeout(Duration::from_secs(10));
            async move { a.sign_in_by_phone(req).await.map(|r| r.into_inner()) }
        })
        .await;
        Session { user: r.user_id, device: r.device_id, token: r.token }
    }

    /// Creates a group owned by `owner` (retrying retryable errors; a
    /// retry may create a second group, which tests never see).
    pub async fn create_group(&self, owner: &Session, kind: GroupKind, members: &[u64]) -> Group {
        retry(Duration::from_secs(30), "create_group", || {
            let mut g = GroupServiceClient::new(self.channel.clone());
            let req = CreateGroupRequest {
                kind: kind as i32,
                name: "test group".into(),
                member_ids: members.to_vec(),
                ..Default::default()
            };
            let req = Self::authed(owner, req);
            async move { g.create_group(req).await.map(|r| r.into_inner().group.expect("group")) }
        })
        .await
    }

    /// Sends a text to a group.
    pub async fn send_group(
        &self,
        s: &Session,
        group: u64,
        cmid: &str,
        text: &str,
    ) -> Result<SendOutput, tonic::Status> {
        let mut m = MessageServiceClient::new(self.channel.clone());
        let input = SendInput {
            conversation_id: group,
            client_msg_id: cmid.into(),
            content_type: ContentType::Text as i32,
            content: text.as_bytes().to_vec().into(),
            ..Default::default()
        };
        m.send_group_message(Self::authed(s, input)).await.map(|r| r.into_inner())
    }

    /// The whole of a super group's (or room's) list as `s` may read it.
    pub async fn sync_group_all(&self, s: &Session, group: u64) -> Result<Vec<Message>, tonic::Status> {
        let mut m = MessageServiceClient::new(self.channel.clone());
        let mut out = Vec::new();
        let mut after = 0;
        loop {
            let input = SyncGroupInput { group_id: group, after_group_seq: after, limit: 200 };
            let r = m.sync_group(Self::authed(s, input)).await?.into_inner();
            after = r.messages.last().map(|x| x.group_seq.max(x.seq)).unwrap_or(after);
            out.extend(r.messages);
            if !r.has_more {
                return Ok(out);
            }
        }
    }

    /// `sync_all`, retrying retryable errors.
    pub async fn sync_all_retry(&self, s: &Session) -> Vec<Message> {
        retry(Duration::from_secs(30), "sync", || self.sync_all(s)).await
    }
}

/// Text messages of a list, as `(seq, client_msg_id)`.
pub fn texts(list: &[Message]) -> Vec<(u64, String)> {
    list.iter()
        .filter(|m| m.content_type == ContentType::Text as i32)
        .map(|m| (m.seq, m.client_msg_id.clone()))
        .collect()
}

/// One `rim gateway` process (TCP listener) against the cluster's internal
/// addresses, with its log in a temp dir. Killed on drop.
pub struct GatewayProc {
    pub tcp: String,
    pub http: String,
    child: Child,
    dir: tempfile::TempDir,
}

impl GatewayProc {
    /// Starts a gateway named `id` with `seeds` (internal node addresses)
    /// and waits until its `/healthz` answers 200.
    pub async fn start(id: &str, seeds: &[String]) -> GatewayProc {
        let dir = tempfile::tempdir().expect("tempdir");
        let (tcp, http) = (free_addr(), free_addr());
        let log = File::create(dir.path().join("gateway.log")).expect("gateway log");
        let err = log.try_clone().expect("clone log");
        let child = rim_command()
            .args(["gateway", "--id", id, "--tcp", &tcp, "--http", &http, "--cluster-secret", SECRET])
            .args(["--seeds", &seeds.join(",")])
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(err))
            .spawn()
            .expect("spawn rim gateway");
        let g = GatewayProc { tcp, http, child, dir };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok((200, _)) = http_get(&g.http, "/healthz").await {
                return g;
            }
            assert!(Instant::now() < deadline, "gateway {id} not healthy; log:\n{}", g.log_tail(40));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn log_tail(&self, n: usize) -> String {
        tail(&self.dir.path().join("gateway.log"), n)
    }
}

impl Drop for GatewayProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl ProcCluster {
    /// Internal addresses of every node (gateway seeds).
    pub fn internal_addrs(&self) -> Vec<String> {
        self.nodes.values().map(|n| n.internal.clone()).collect()
    }
}

/// A raw framed-protocol connection to a gateway (docs/protocol.md).
pub struct Conn {
    stream: tokio::net::TcpStream,
    dec: rim_proto::FrameDecoder,
    next_id: u64,
    /// Packets read while waiting for a reply, in arrival order.
    pub pushes: Vec<Packet>,
}

impl Conn {
    /// Connects and signs in; returns the connection and its SignInOutput.
    pub async fn sign_in(gateway: &str, s: &Session) -> (Conn, SignInOutput) {
        let stream = tokio::time::timeout(Duration::from_secs(10), tokio::net::TcpStream::connect(gateway))
            .await
            .expect("connect timeout")
            .expect("connect");
        let mut c = Conn { stream, dec: rim_proto::FrameDecoder::default(), next_id: 0, pushes: Vec::new() };
        let input = SignInInput { user_id: s.user, device_id: s.device, token: s.token.clone() };
        let out = c
            .call(rim_proto::v1::Command::SignIn, &input)
            .await
            .unwrap_or_else(|r| panic!("sign-in of {}: {r:?}", s.user));
        (c, prost::Message::decode(out.as_slice()).expect("SignInOutput"))
    }

    async fn write(&mut self, p: &Packet) {
        let mut buf = bytes::BytesMut::new();
        rim_proto::codec::encode_frame(p, &mut buf);
        tokio::time::timeout(Duration::from_secs(10), self.stream.write_all(&buf))
            .await
            .expect("write timeout")
            .expect("write");
    }

    /// The next packet within `timeout`, or None.
    pub async fn read(&mut self, timeout: Duration) -> Option<Packet> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut buf = [0u8; 16 * 1024];
        loop {
            if let Some(p) = self.dec.next_frame().expect("well-formed frames") {
                return Some(p);
            }
            let n = tokio::time::timeout_at(deadline, self.stream.read(&mut buf)).await.ok()?.expect("read");
            assert!(n > 0, "gateway closed the connection");
            self.dec.push(&buf[..n]);
        }
    }

    /// Sends a request and waits for its reply; Ok(data) or Err(reply).
    pub async fn call<M: prost::Message>(
        &mut self,
        command: rim_proto::v1::Command,
        input: &M,
    ) -> Result<Vec<u8>, Reply> {
        self.next_id += 1;
        let id = self.next_id;
        let p =
            Packet { request_id: id, command: command as i32, content: input.encode_to_vec().into(), seq: 0 };
        self.write(&p).await;
        loop {
            let p = self.read(Duration::from_secs(20)).await.expect("no reply within 20 s");
            if p.request_id == id && p.command == command as i32 {
                let r: Reply = prost::Message::decode(p.content.as_ref()).expect("Reply");
                return if r.code == 0 { Ok(r.data.to_vec()) } else { Err(r) };
            }
            self.pushes.push(p);
        }
    }

    /// MESSAGE pushes read so far (and within `timeout` until `done` holds).
    pub async fn messages_until(
        &mut self,
        timeout: Duration,
        done: impl Fn(&[Message]) -> bool,
    ) -> Vec<Message> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let msgs: Vec<Message> = self
                .pushes
                .iter()
                .filter(|p| p.command == rim_proto::v1::Command::Message as i32)
                .filter_map(|p| MessagePush::decode(p.content.as_ref()).ok()?.message)
                .collect();
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if done(&msgs) || left.is_zero() {
                return msgs;
            }
            if let Some(p) = self.read(left).await {
                self.pushes.push(p);
            }
        }
    }
}
