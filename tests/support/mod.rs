//! Harness for real-process tests: `rim node` processes with temp data dirs,
//! free loopback ports and per-process log files, `rim gateway` processes,
//! and a raw framed-protocol connection to a gateway.
//!
//! The gRPC client, sessions, deadline loops and the `serial` lock come from
//! `rim_testkit` (re-exported here), shared with the in-process tests.
#![allow(dead_code, missing_docs)]

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use prost::Message as _;
use rim_proto::ids::{NodeId, ShardId};
use rim_proto::v1::admin_service_client::AdminServiceClient;
use rim_proto::v1::*;
pub use rim_testkit::grpc::*;
pub use rim_testkit::wait::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The built `rim` binary.
pub fn rim_bin() -> &'static str {
    env!("CARGO_BIN_EXE_rim")
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
    pub id: NodeId,
    pub internal: String,
    pub client: String,
    pub http: String,
    args: Vec<String>,
    child: Option<Child>,
    runs: u32,
    dir: tempfile::TempDir,
}

impl NodeProc {
    fn new(id: NodeId, internal: String, peers: &str, shards: u32, extra: &[&str]) -> NodeProc {
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
            // As in the in-process harness: the rate limits have tests of their own.
            "--no-rate-limits".into(),
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
    http_get_with(addr, path, &[]).await
}

/// [`http_get`] with extra request headers.
pub async fn http_get_with(
    addr: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<(u16, String), String> {
    let extra: String = headers.iter().map(|(k, v)| format!("{k}: {v}\r\n")).collect();
    let io = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.map_err(|e| format!("connect: {e}"))?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n{extra}\r\n").as_bytes())
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
    pub nodes: BTreeMap<NodeId, NodeProc>,
}

impl ProcCluster {
    /// Starts `n` nodes with `--bootstrap --peers ...` and waits until each is healthy.
    pub async fn start(n: u64, shards: u32) -> ProcCluster {
        ProcCluster::start_with(n, shards, &[]).await
    }

    /// The nodes of a new cluster (`--bootstrap`, `extra` flags for every
    /// node), none started yet.
    pub fn create(n: u64, shards: u32, extra: &[&str]) -> ProcCluster {
        let internal: BTreeMap<NodeId, String> = (1..=n).map(|id| (id, free_addr())).collect();
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

    pub fn ids(&self) -> Vec<NodeId> {
        self.nodes.keys().copied().collect()
    }

    pub fn node(&mut self, id: NodeId) -> &mut NodeProc {
        self.nodes.get_mut(&id).expect("no such node")
    }

    /// Waits until every running node is healthy.
    pub async fn wait_all_healthy(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        for p in self.nodes.values_mut().filter(|p| p.is_running()) {
            p.wait_healthy(deadline.saturating_duration_since(Instant::now())).await;
        }
    }

    pub fn kill(&mut self, id: NodeId) {
        self.node(id).kill();
    }

    pub fn kill_all(&mut self) {
        for p in self.nodes.values_mut() {
            p.kill();
        }
    }

    pub fn client(&self, id: NodeId) -> Client {
        Client::connect(&self.nodes[&id].client)
    }

    /// The admin view of node `id` (internal listener, cluster secret).
    pub async fn status(&self, id: NodeId) -> Result<ClusterStatusReply, tonic::Status> {
        let ch = endpoint(&self.nodes[&id].internal).connect_lazy();
        let mut r = with_secret(ClusterStatusRequest::default());
        r.set_timeout(Duration::from_secs(5));
        AdminServiceClient::new(ch).cluster_status(r).await.map(|r| r.into_inner())
    }

    /// The placement as node `id` knows it, waiting until it has a cluster
    /// map (a healthy node may not have one yet).
    pub async fn placement(&self, id: NodeId) -> rim_cluster::Placement {
        let map = eventually(Duration::from_secs(20), &format!("node {id} has a cluster map"), || async {
            retry(Duration::from_secs(20), "cluster_status", || self.status(id)).await.map
        })
        .await;
        rim_cluster::Placement::new(map).expect("valid map")
    }

    /// The leader of `shard` that every running node hosting it agrees on.
    pub async fn leader(&self, shard: ShardId, timeout: Duration) -> NodeId {
        let deadline = Instant::now() + timeout;
        loop {
            let mut seen = Vec::new();
            for (id, p) in &self.nodes {
                if !p.is_running() {
                    continue;
                }
                // Nodes without a replica of the shard have no say.
                match self.status(*id).await {
                    Ok(s) => match s.groups.iter().find(|g| g.group_id == shard.0) {
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
        GatewayProc::start_with(id, seeds, &[]).await
    }

    /// [`GatewayProc::start`] with `extra` flags.
    pub async fn start_with(id: &str, seeds: &[String], extra: &[&str]) -> GatewayProc {
        let dir = tempfile::tempdir().expect("tempdir");
        let (tcp, http) = (free_addr(), free_addr());
        let log = File::create(dir.path().join("gateway.log")).expect("gateway log");
        let err = log.try_clone().expect("clone log");
        let child = rim_command()
            .args(["gateway", "--id", id, "--tcp", &tcp, "--http", &http, "--cluster-secret", SECRET])
            .args(["--seeds", &seeds.join(",")])
            .args(extra)
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

    /// SIGKILL, then reap: the gateway gets no chance to tell the nodes.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
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
        let input = SignInInput { user_id: s.user.0, device_id: s.device.0, token: s.token.clone() };
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
