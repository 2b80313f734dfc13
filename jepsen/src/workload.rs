//! The client workload (`reference/jepsen.md` §6.2 item 4): users with
//! several devices sending 1:1 messages with unique payload ids and reading
//! their lists, through the gateway (TCP or WebSocket) and through client
//! gRPC on any node.
//!
//! * Every device is one worker, i.e. one logical process of the history.
//!   Even-numbered devices of a user talk through the gateway with the
//!   `rim-client` SDK (one connection; pushes it delivers are recorded as
//!   `push` ops), odd-numbered ones through client gRPC, each operation to
//!   a randomly chosen node (not only leaders).
//! * Operations: `send` to a random other user (payload id `p<worker>-<n>`)
//!   or, for a fraction `group_sends` of the sends, to a random group of the
//!   user; `sync` from the device's own cursor (the last seq its syncs
//!   returned), and now and then a full sync from 0; and, for members of a
//!   super group, reads of the group's list from the device's own group
//!   cursor ([`crate::groups`]).
//! * No silent retries. A send that times out or ends with a retry-class
//!   or internal error is `info` (it may have happened), and the worker
//!   continues as a new process (process + concurrency), as Jepsen does.
//!   Validation and auth errors, and a request the SDK never sent, are
//!   `fail`. Reads have no effect, so a failed read is `fail`.
//! * `--retry-same-id`: after an `info` send the worker's next operation
//!   re-sends the same payload id (at most [`MAX_RETRIES`] times), which
//!   makes the history exercise the server's deduplication: one message,
//!   one copy per list, whatever the number of attempts.
//! * After the run: complete final reads of every user's list through every
//!   node ([`final_reads`]), and of every super group's list
//!   ([`crate::groups::final_reads`]).
//!
//! Every wait has a deadline: each request is bounded by the op timeout,
//! set-up and final reads by their own deadlines.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rim_client::{Client, ClientConfig, ClientError, Credentials, Endpoint, Event, NodeApi};
use rim_proto::ErrorCode;
use rim_proto::ids::{DeviceId, GroupId, NodeId, Seq, UserId};
use rim_proto::v1::{ContentType, Message, SendInput, SendOutput, SyncOutput};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::error::{Error, Result};
use crate::groups::{Group, GroupRpc, conv_kind, conversation_kind, gateway_send_group, gateway_sync_group};
use crate::history::{
    ConvKind, Entry, F_PUSH, FinalReadValue, OpBody, OpType, Process, SendValue, SyncValue,
};
use crate::recorder::Recorder;

/// Most re-sends of one payload id in `--retry-same-id` mode.
pub const MAX_RETRIES: u32 = 3;
/// Page size of device syncs.
const SYNC_LIMIT: u32 = 50;
/// Page size of final reads.
const FINAL_PAGE: u32 = 500;
/// Process numbers of final reads start here (plus the node id).
pub const FINAL_READ_PROCESS_BASE: u64 = 1_000_000;

/// Which gateway transport gateway devices use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum GatewayTransport {
    /// Framed protobuf over TCP.
    Tcp,
    /// WebSocket binary frames.
    Ws,
    /// TCP for odd user numbers, WebSocket for even ones.
    #[default]
    Mixed,
}

impl std::str::FromStr for GatewayTransport {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "tcp" => Ok(GatewayTransport::Tcp),
            "ws" => Ok(GatewayTransport::Ws),
            "mixed" => Ok(GatewayTransport::Mixed),
            other => Err(format!("unknown transport {other:?} (tcp, ws, mixed)")),
        }
    }
}

/// Workload settings.
#[derive(Debug, Clone, serde::Serialize)]
pub struct WorkloadOptions {
    /// Users.
    pub users: u64,
    /// Devices per user (each a worker).
    pub devices: u64,
    /// Target operations per second, all workers together.
    pub rate: f64,
    /// Deadline of one request.
    pub op_timeout: Duration,
    /// Re-send the same payload id after an indeterminate send.
    pub retry_same_id: bool,
    /// Gateway transport of gateway devices.
    pub transport: GatewayTransport,
    /// Fraction of sends that go to a group of the sender (0: no groups are
    /// created).
    pub group_sends: f64,
    /// Seed of every random choice.
    pub seed: u64,
}

/// Where clients connect.
#[derive(Debug, Clone)]
pub struct Endpoints {
    /// The gateway's TCP listener.
    pub gateway_tcp: SocketAddr,
    /// The gateway's WebSocket listener.
    pub gateway_ws: SocketAddr,
    /// Client gRPC listener of each node.
    pub nodes: BTreeMap<NodeId, SocketAddr>,
}

/// A registered user and its signed-in devices.
#[derive(Debug, Clone)]
pub struct Account {
    /// The user id.
    pub user: UserId,
    /// Credentials of devices 1..=devices.
    pub devices: Vec<Credentials>,
}

/// Registers `opts.users` users and signs in their devices, trying the
/// nodes in turn until `deadline`.
pub async fn setup(endpoints: &Endpoints, opts: &WorkloadOptions, deadline: Instant) -> Result<Vec<Account>> {
    let apis: Vec<NodeApi> = endpoints
        .nodes
        .values()
        .filter_map(|a| NodeApi::new(&a.to_string()).ok())
        .map(|api| api.with_timeout(opts.op_timeout))
        .collect();
    let mut accounts = Vec::new();
    let mut turn = 0usize;
    for u in 1..=opts.users {
        let name = format!("j{}u{u}", opts.seed % 100_000);
        let password = format!("pw-{name}-jepsen");
        let mut devices = Vec::new();
        let mut last = String::from("no node to ask");
        for d in 1..=opts.devices {
            loop {
                if Instant::now() >= deadline {
                    return Err(Error::UserSetupFailed { name, last });
                }
                turn += 1;
                let Some(api) = apis.get(turn % apis.len().max(1)) else {
                    return Err(Error::UserSetupFailed { name, last });
                };
                if d == 1 {
                    match api.register(&name, &password).await {
                        Ok(_) => {}
                        Err(e) if e.code() == ErrorCode::ErrorAlreadyExists => {}
                        Err(e) => {
                            last = e.to_string();
                            tokio::time::sleep(Duration::from_millis(200)).await;
                            continue;
                        }
                    }
                }
                match api.sign_in(&name, &password, Some(DeviceId(d))).await {
                    Ok(c) => {
                        devices.push(c);
                        break;
                    }
                    Err(e) => {
                        last = e.to_string();
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
        }
        let user = devices.first().map_or(UserId::default(), |c| c.user_id);
        accounts.push(Account { user, devices });
    }
    Ok(accounts)
}

/// How one worker reaches the cluster.
enum Conn {
    /// Through the gateway with the SDK.
    Gateway(Client),
    /// Client gRPC, one authenticated client per node (plus its group calls).
    Grpc(Vec<(u64, NodeApi, GroupRpc)>),
}

/// One device's worker.
struct Worker {
    /// Worker number (0-based), the first process number.
    number: u64,
    /// Current process number.
    process: u64,
    /// Workers in total (the process-number stride).
    stride: u64,
    creds: Credentials,
    peers: Vec<u64>,
    /// The user's groups: `(id, kind)`.
    groups: Vec<(u64, ConvKind)>,
    conn: Conn,
    cursor: u64,
    /// The device's cursor in each super group's list.
    group_cursors: HashMap<u64, u64>,
    sent: u64,
    op_timeout: Duration,
    /// `--retry-same-id`: the payload to re-send and attempts made.
    retry: Option<(SendValue, u32)>,
    rng: StdRng,
}

/// Runs every worker until `stop` turns true; returns when all have
/// finished their last operation and closed their connections.
pub async fn run(
    recorder: Arc<Recorder>,
    accounts: &[Account],
    groups: &[Group],
    endpoints: &Endpoints,
    opts: &WorkloadOptions,
    stop: watch::Receiver<bool>,
) {
    let users: Vec<u64> = accounts.iter().map(|a| a.user.0).collect();
    let stride = accounts.iter().map(|a| a.devices.len() as u64).sum::<u64>().max(1);
    let mut tasks = tokio::task::JoinSet::new();
    let mut number = 0u64;
    for (ui, account) in accounts.iter().enumerate() {
        for (di, creds) in account.devices.iter().enumerate() {
            let conn = if di % 2 == 0 {
                let ws = match opts.transport {
                    GatewayTransport::Tcp => false,
                    GatewayTransport::Ws => true,
                    GatewayTransport::Mixed => ui % 2 == 1,
                };
                let endpoint = if ws {
                    Endpoint::ws(endpoints.gateway_ws)
                } else {
                    Endpoint::tcp(endpoints.gateway_tcp)
                };
                let mut config = ClientConfig::new(vec![endpoint]);
                config.request_timeout = opts.op_timeout;
                config.connect_timeout = Duration::from_secs(2);
                let (client, events) = Client::connect(config, creds.clone());
                tasks.spawn(record_pushes(recorder.clone(), number, creds.clone(), events));
                Conn::Gateway(client)
            } else {
                let apis = endpoints
                    .nodes
                    .iter()
                    .filter_map(|(id, a)| {
                        let api = NodeApi::new(&a.to_string()).ok()?;
                        let api = api.with_timeout(opts.op_timeout).authenticated(creds.clone());
                        Some((*id, api, GroupRpc::new(*a, opts.op_timeout).ok()?))
                    })
                    .collect();
                Conn::Grpc(apis)
            };
            let worker = Worker {
                number,
                process: number,
                stride,
                creds: creds.clone(),
                peers: users.iter().copied().filter(|u| *u != account.user.0).collect(),
                groups: groups
                    .iter()
                    .filter(|g| g.members.contains(&account.user.0))
                    .map(|g| (g.id, g.kind))
                    .collect(),
                conn,
                cursor: 0,
                group_cursors: HashMap::new(),
                sent: 0,
                op_timeout: opts.op_timeout,
                retry: None,
                rng: StdRng::seed_from_u64(opts.seed ^ (number.wrapping_mul(0x9e37_79b9_7f4a_7c15))),
            };
            tasks.spawn(worker.run(recorder.clone(), opts.clone(), stride as f64, stop.clone()));
            number += 1;
        }
    }
    while tasks.join_next().await.is_some() {}
}

/// Records the SDK's deliveries to one gateway device as `push` ops until
/// the client stops.
async fn record_pushes(
    recorder: Arc<Recorder>,
    process: u64,
    creds: Credentials,
    mut events: tokio::sync::mpsc::Receiver<Event>,
) {
    while let Some(event) = events.recv().await {
        let (m, group) = match event {
            Event::Message(m) => (m, None),
            Event::GroupMessage(m) => {
                let g = m.conversation_id;
                (m, Some(g))
            }
            _ => continue,
        };
        let mut value = serde_json::json!({
            "user": creds.user_id.0,
            "device": creds.device_id.0,
            "entries": [entry(&m)],
        });
        if let Some(g) = group {
            value["group"] = g.into();
        }
        let body = OpBody::Other { f: F_PUSH.into(), value };
        recorder.record(OpType::Ok, Process::Worker(process), body, Some("gw"), None);
    }
}

/// A list entry as the history records it.
pub(crate) fn entry(m: &Message) -> Entry {
    Entry {
        seq: m.seq,
        message_id: m.message_id,
        client_msg_id: m.client_msg_id.clone(),
        from: m.sender_user_id,
        to: m.conversation_id,
        kind: conv_kind(m.conversation_kind),
        group_seq: m.group_seq,
        notification: m.content_type == ContentType::Notification as i32,
    }
}

/// Whether a failed send definitely did not happen.
fn definitely_not_sent(e: &ClientError) -> bool {
    match e {
        ClientError::NotConnected | ClientError::Overloaded(_) | ClientError::InvalidAddress(..) => true,
        ClientError::Server { .. } => {
            let class = e.code() as i32 / 1000;
            (2..=4).contains(&class)
        }
        _ => false,
    }
}

impl Worker {
    async fn run(
        mut self,
        recorder: Arc<Recorder>,
        opts: WorkloadOptions,
        workers: f64,
        stop: watch::Receiver<bool>,
    ) {
        // Mean pause between this worker's operations for the target rate.
        let mean = if opts.rate > 0.0 { workers / opts.rate } else { 0.0 };
        if let Conn::Gateway(c) = &self.conn {
            // Best effort: a gateway that is not up yet makes sends fail.
            let _ = c.wait_online(Duration::from_secs(10)).await;
        }
        while !*stop.borrow() {
            let pause = Duration::from_secs_f64(self.rng.gen_range(0.0..=2.0 * mean));
            let mut stop_wait = stop.clone();
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = stop_wait.wait_for(|s| *s) => break,
            }
            let roll: f64 = self.rng.gen_range(0.0..1.0);
            // Reads of a super group of the user: a quarter of the cursor
            // syncs and of the full ones.
            let supers: Vec<u64> =
                self.groups.iter().filter(|g| g.1 == ConvKind::Super).map(|g| g.0).collect();
            let group_read = if !supers.is_empty() && ((0.87..0.95).contains(&roll) || roll >= 0.9875) {
                Some(supers[self.rng.gen_range(0..supers.len())])
            } else {
                None
            };
            if self.retry.is_some() || roll < 0.65 {
                self.send(&recorder, &opts).await;
            } else if let Some(g) = group_read {
                let after = if roll < 0.95 { self.group_cursors.get(&g).copied().unwrap_or(0) } else { 0 };
                self.group_sync(&recorder, g, after).await;
            } else if roll < 0.95 {
                let after = self.cursor;
                self.sync(&recorder, after).await;
            } else {
                self.sync(&recorder, 0).await;
            }
        }
        if let Conn::Gateway(c) = &self.conn {
            c.close().await;
        }
    }

    fn node_label(&self, node: Option<u64>) -> String {
        node.map_or_else(|| "gw".to_string(), |n| format!("n{n}"))
    }

    /// Picks the gRPC node for the next request (`None`: the gateway).
    fn pick(&mut self) -> Option<(u64, NodeApi, GroupRpc)> {
        match &self.conn {
            Conn::Gateway(_) => None,
            Conn::Grpc(apis) if apis.is_empty() => None,
            Conn::Grpc(apis) => {
                let i = self.rng.gen_range(0..apis.len());
                Some(apis[i].clone())
            }
        }
    }

    async fn send(&mut self, recorder: &Recorder, opts: &WorkloadOptions) {
        let (mut value, attempts) = match self.retry.take() {
            Some((v, n)) => (v, n),
            None => {
                self.sent += 1;
                let (to, kind) =
                    if !self.groups.is_empty() && self.rng.gen_bool(opts.group_sends.clamp(0.0, 1.0)) {
                        self.groups[self.rng.gen_range(0..self.groups.len())]
                    } else if self.peers.is_empty() {
                        (self.creds.user_id.0, ConvKind::User)
                    } else {
                        (self.peers[self.rng.gen_range(0..self.peers.len())], ConvKind::User)
                    };
                let v = SendValue {
                    from: self.creds.user_id.0,
                    device: self.creds.device_id.0,
                    kind,
                    to,
                    client_msg_id: format!("p{}-{}", self.number, self.sent),
                    ..SendValue::default()
                };
                (v, 0)
            }
        };
        let group = value.kind.is_group();
        let input = SendInput {
            conversation_kind: conversation_kind(value.kind) as i32,
            conversation_id: value.to,
            client_msg_id: value.client_msg_id.clone(),
            content_type: ContentType::Text as i32,
            content: value.client_msg_id.clone().into_bytes().into(),
            ..Default::default()
        };
        let target = self.pick();
        let node = self.node_label(target.as_ref().map(|t| t.0));
        let process = Process::Worker(self.process);
        recorder.record(OpType::Invoke, process.clone(), OpBody::Send(value.clone()), Some(&node), None);
        let t = opts.op_timeout;
        let result: Result<SendOutput, ClientError> = match (&self.conn, target) {
            (_, Some((_, _, rpc))) if group => bounded(t, rpc.send_group(&self.creds, input)).await,
            (_, Some((_, api, _))) => bounded(t, api.send_message(input)).await,
            (Conn::Gateway(c), None) if group => bounded(t, gateway_send_group(c, input, t)).await,
            (Conn::Gateway(c), None) => bounded(t, c.send_once(input)).await,
            (Conn::Grpc(_), None) => Err(ClientError::NotConnected),
        };
        match result {
            Ok(out) => {
                if group {
                    value.group_seq = Some(out.group_seq);
                } else {
                    value.seq = Some(out.seq);
                }
                value.message_id = Some(out.message_id);
                recorder.record(OpType::Ok, process, OpBody::Send(value), Some(&node), None);
            }
            Err(e) if definitely_not_sent(&e) => {
                recorder.record(OpType::Fail, process, OpBody::Send(value), Some(&node), Some(e.to_string()));
            }
            Err(e) => {
                recorder.record(
                    OpType::Info,
                    process,
                    OpBody::Send(value.clone()),
                    Some(&node),
                    Some(e.to_string()),
                );
                // Crashed process: continue as a new one.
                self.process += self.stride;
                if opts.retry_same_id && attempts < MAX_RETRIES {
                    self.retry = Some((value, attempts + 1));
                }
            }
        }
    }

    async fn sync(&mut self, recorder: &Recorder, after: u64) {
        let mut value = SyncValue {
            user: self.creds.user_id.0,
            device: self.creds.device_id.0,
            after,
            limit: Some(u64::from(SYNC_LIMIT)),
            ..SyncValue::default()
        };
        let target = self.pick();
        let node = self.node_label(target.as_ref().map(|t| t.0));
        let process = Process::Worker(self.process);
        let timeout = self.op_timeout;
        recorder.record(OpType::Invoke, process.clone(), OpBody::Sync(value.clone()), Some(&node), None);
        let result: Result<SyncOutput, ClientError> = match (&self.conn, target) {
            (_, Some((_, api, _))) => bounded(timeout, api.sync_page(Seq(after), SYNC_LIMIT)).await,
            (Conn::Gateway(c), None) => bounded(timeout, c.sync_page(Seq(after), SYNC_LIMIT)).await,
            (Conn::Grpc(_), None) => Err(ClientError::NotConnected),
        };
        match result {
            Ok(out) => {
                let entries: Vec<Entry> = out.messages.iter().map(entry).collect();
                if let Some(last) = entries.last() {
                    self.cursor = self.cursor.max(last.seq);
                }
                value.entries = Some(entries);
                value.has_more = Some(out.has_more);
                value.last_seq = Some(out.last_seq);
                recorder.record(OpType::Ok, process, OpBody::Sync(value), Some(&node), None);
            }
            Err(e) => {
                recorder.record(OpType::Fail, process, OpBody::Sync(value), Some(&node), Some(e.to_string()));
            }
        }
    }
}

impl Worker {
    /// Reads super group `group`'s list after group seq `after` (a `sync`
    /// op with `group` set); moves the device's group cursor.
    async fn group_sync(&mut self, recorder: &Recorder, group: u64, after: u64) {
        let mut value = SyncValue {
            user: self.creds.user_id.0,
            device: self.creds.device_id.0,
            group: Some(group),
            after,
            limit: Some(u64::from(SYNC_LIMIT)),
            ..SyncValue::default()
        };
        let target = self.pick();
        let node = self.node_label(target.as_ref().map(|t| t.0));
        let process = Process::Worker(self.process);
        let t = self.op_timeout;
        recorder.record(OpType::Invoke, process.clone(), OpBody::Sync(value.clone()), Some(&node), None);
        let (group_id, after_seq) = (GroupId(group), Seq(after));
        let result = match (&self.conn, target) {
            (_, Some((_, _, rpc))) => {
                bounded(t, rpc.sync_group(&self.creds, group_id, after_seq, SYNC_LIMIT)).await
            }
            (Conn::Gateway(c), None) => {
                bounded(t, gateway_sync_group(c, group_id, after_seq, SYNC_LIMIT, t)).await
            }
            (Conn::Grpc(_), None) => Err(ClientError::NotConnected),
        };
        match result {
            Ok(out) => {
                let entries: Vec<Entry> = out.messages.iter().map(entry).collect();
                if let Some(last) = entries.last() {
                    let c = self.group_cursors.entry(group).or_default();
                    *c = (*c).max(last.seq);
                }
                value.entries = Some(entries);
                value.has_more = Some(out.has_more);
                value.last_seq = Some(out.last_group_seq);
                recorder.record(OpType::Ok, process, OpBody::Sync(value), Some(&node), None);
            }
            Err(e) => {
                recorder.record(OpType::Fail, process, OpBody::Sync(value), Some(&node), Some(e.to_string()));
            }
        }
    }
}

/// `fut` within `timeout`; a timeout is [`ClientError::Timeout`].
pub(crate) async fn bounded<T>(
    timeout: Duration,
    fut: impl std::future::Future<Output = Result<T, ClientError>>,
) -> Result<T, ClientError> {
    tokio::time::timeout(timeout, fut).await.unwrap_or(Err(ClientError::Timeout(timeout)))
}

/// Outcome of the final reads.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct FinalReads {
    /// `(list, node)` pairs read completely (users' and super groups' lists).
    pub complete: u64,
    /// `(user, node)` pairs that could not be read before the deadline.
    pub missing: Vec<(u64, u64)>,
    /// `(group, node)` pairs that could not be read before the deadline.
    pub missing_groups: Vec<(u64, u64)>,
}

/// Reads every user's complete list through every node (all pages), as
/// `final-read` ops of process [`FINAL_READ_PROCESS_BASE`] + node id,
/// retrying a failed read until `deadline`.
pub async fn final_reads(
    recorder: &Recorder,
    accounts: &[Account],
    endpoints: &Endpoints,
    op_timeout: Duration,
    deadline: Instant,
) -> FinalReads {
    let mut out = FinalReads::default();
    for (&node, addr) in &endpoints.nodes {
        let Ok(api) = NodeApi::new(&addr.to_string()) else { continue };
        let api = api.with_timeout(op_timeout);
        let process = Process::Worker(FINAL_READ_PROCESS_BASE + node);
        let label = format!("n{node}");
        for account in accounts {
            let Some(creds) = account.devices.first() else { continue };
            let api = api.authenticated(creds.clone());
            let mut done = false;
            while !done && Instant::now() < deadline {
                let value = FinalReadValue { user: account.user.0, ..FinalReadValue::default() };
                recorder.record(
                    OpType::Invoke,
                    process.clone(),
                    OpBody::FinalRead(value.clone()),
                    Some(&label),
                    None,
                );
                match read_all(&api, deadline).await {
                    Ok((entries, last_seq)) => {
                        let value =
                            FinalReadValue { entries: Some(entries), last_seq: Some(last_seq), ..value };
                        recorder.record(
                            OpType::Ok,
                            process.clone(),
                            OpBody::FinalRead(value),
                            Some(&label),
                            None,
                        );
                        done = true;
                    }
                    Err(e) => {
                        recorder.record(
                            OpType::Fail,
                            process.clone(),
                            OpBody::FinalRead(value),
                            Some(&label),
                            Some(e.to_string()),
                        );
                        tokio::time::sleep(Duration::from_millis(300)).await;
                    }
                }
            }
            if done {
                out.complete += 1;
            } else {
                out.missing.push((account.user.0, node));
            }
        }
    }
    out
}

/// Every page of the caller's list: the entries and the last page's `last_seq`.
async fn read_all(api: &NodeApi, deadline: Instant) -> Result<(Vec<Entry>, u64), ClientError> {
    let mut entries = Vec::new();
    let mut after = Seq::ZERO;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let page = bounded(left, api.sync_page(after, FINAL_PAGE)).await?;
        let before = entries.len();
        for m in &page.messages {
            if Seq(m.seq) > after {
                after = Seq(m.seq);
                entries.push(entry(m));
            }
        }
        if !page.has_more || entries.len() == before {
            return Ok((entries, page.last_seq));
        }
    }
}
