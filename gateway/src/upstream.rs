//! The gateway's connection to the logic nodes.
//!
//! An [`Upstream`] knows only the seed addresses at first. It loads the
//! cluster map from any node (`AdminService.GetClusterMap`, cluster secret
//! in the [`CLUSTER_SECRET_METADATA_KEY`] metadata entry), caches it, and refreshes
//! it on demand ([`Upstream::refresh_map`]) or when a node answers
//! `ERROR_WRONG_SHARD`.
//!
//! [`Upstream::call`] carries out a session's node [`Call`] with the
//! matching `GatewayService` RPC. Any node can answer a unary call (it
//! forwards to the right shard's leader), but the user's shard leader is
//! tried first when known (from the map's hints, from `rim-leader` hints of
//! earlier answers, or from the push router's stream ends). A node that is
//! unreachable or answers an outcome [`rim_cluster::retryable`] calls worth
//! another try (`ERROR_UNAVAILABLE`, `ERROR_NOT_LEADER`), or
//! `ERROR_WRONG_SHARD` (which also refreshes the map), is skipped for the
//! next one (the hinted leader first); after a full round the call waits
//! the shared [`Backoff`] and starts another, until the call's deadline
//! ([`UpstreamOptions::request_timeout`]). Then the call fails with
//! `ERROR_TIMEOUT` if some attempt was cut off by the deadline, or
//! `ERROR_UNAVAILABLE` if no node answered.
//!
//! Room and super-group subscriptions are not node calls: the push router
//! serves them ([`PushRouter::call`](crate::router::PushRouter::call)),
//! and `Upstream` knows nothing of it. Given one,
//! [`Upstream::call`] fails with `ERROR_UNKNOWN_COMMAND`.
//!
//! Sends ([`NodeCall::Send`]) are batched: an attempt at a node hands the
//! `ConnSendRequest` to that node's batcher, which carries the sends waiting
//! for one node in one `SendBatch` RPC ([`batch`] module documentation), and
//! gets back exactly the status the unary `Send` would have produced, so the
//! retries above treat both alike. A full batch queue, or a node that does
//! not know `SendBatch` yet, gets the unary `Send`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use rim_cluster::{Backoff, LinkTls, Placement, retryable};
use rim_proto::ErrorCode;
use rim_proto::ids::{NodeId, ShardId, UserId};
use rim_proto::metadata::CLUSTER_SECRET_METADATA_KEY;
use rim_proto::v1::admin_service_client::AdminServiceClient;
use rim_proto::v1::gateway_service_client::GatewayServiceClient;
use rim_proto::v1::{
    ConnAckRequest, ConnContext, ConnLogoutRequest, ConnOfflineRequest, ConnReadRequest, ConnRecallRequest,
    ConnSendRequest, ConnSignInRequest, ConnSyncGroupRequest, ConnSyncRequest, GetClusterMapRequest,
    NodeState, SendOutput,
};
use tonic::transport::Channel;

use crate::call::{Call, CallError, NodeCall, NodeReply};
use crate::error::Error;

pub mod batch;

pub use batch::SendBatchStats;

/// How an [`Upstream`] reaches the cluster.
#[derive(Debug, Clone)]
pub struct UpstreamOptions {
    /// Internal (`host:port`) addresses of some logic nodes; any one that
    /// answers is enough to load the cluster map.
    pub seeds: Vec<String>,
    /// The shared cluster secret.
    pub cluster_secret: String,
    /// Deadline of one call, all retries included.
    pub request_timeout: Duration,
    /// This gateway's id, stable for the process's life
    /// (`ConnContext.gateway_id`, `SubscribeRequest.gateway_id`).
    pub gateway_id: String,
    /// TLS of the links to the nodes (`None`: plaintext).
    pub tls: Option<LinkTls>,
}

impl UpstreamOptions {
    /// Options with the default request timeout (5 s).
    pub fn new(seeds: Vec<String>, cluster_secret: impl Into<String>, gateway_id: impl Into<String>) -> Self {
        UpstreamOptions {
            seeds,
            cluster_secret: cluster_secret.into(),
            request_timeout: Duration::from_secs(5),
            gateway_id: gateway_id.into(),
            tls: None,
        }
    }
}

/// Shortest time an attempt on one node is given (unless the call's
/// deadline is nearer).
const MIN_ATTEMPT: Duration = Duration::from_millis(500);
/// Longest time to open a TCP connection to a node.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// The gateway's client of the logic nodes. Cheap to clone (shared state).
#[derive(Debug, Clone)]
pub struct Upstream {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    options: UpstreamOptions,
    secret: tonic::metadata::MetadataValue<tonic::metadata::Ascii>,
    channels: Mutex<HashMap<String, Channel>>,
    /// Per node address, the batcher of `Send` calls (over the channel
    /// of that address).
    batchers: batch::Batchers,
    map: RwLock<Option<Arc<Placement>>>,
    /// Leader hints learned from answers and stream ends, by shard; they
    /// override the map's hints.
    leaders: Mutex<HashMap<ShardId, LeaderHint>>,
    /// Spreads calls without a known leader over the nodes.
    next: AtomicUsize,
}

/// What the upstream learned about a shard's leader.
#[derive(Debug, Clone, PartialEq, Eq)]
enum LeaderHint {
    /// This address leads (or led) the shard.
    At(String),
    /// This address failed as the leader: ignore a map hint naming it.
    NotAt(String),
}

/// The result of one attempt on one node.
enum Attempt {
    Done(Result<NodeReply, CallError>),
    /// Try another node; `hint` names the leader if the node knew it.
    Next {
        error: CallError,
        hint: Option<String>,
        refresh: bool,
        timed_out: bool,
    },
}

impl Upstream {
    /// An upstream over `options.seeds`. Connects lazily: nothing is
    /// contacted until the first call or [`refresh_map`](Self::refresh_map).
    /// Fails with [`Error::Config`] without seeds, with a zero request
    /// timeout, a secret that is not ASCII metadata, or a seed that does
    /// not form a URI.
    pub fn new(options: UpstreamOptions) -> crate::Result<Upstream> {
        if options.seeds.is_empty() {
            return Err(Error::Config("no seed node addresses".into()));
        }
        if options.request_timeout.is_zero() {
            return Err(Error::Config("the request timeout must be positive".into()));
        }
        let secret: tonic::metadata::MetadataValue<tonic::metadata::Ascii> =
            options
                .cluster_secret
                .parse()
                .map_err(|_| Error::Config("the cluster secret is not valid ASCII metadata".into()))?;
        for seed in &options.seeds {
            rim_cluster::tls::endpoint(seed, options.tls.as_ref())
                .map_err(|_| Error::Config(format!("bad node address {seed:?}")))?;
        }
        let batchers = batch::Batchers::new(secret.clone(), options.request_timeout);
        Ok(Upstream {
            inner: Arc::new(Inner {
                options,
                secret,
                channels: Mutex::new(HashMap::new()),
                batchers,
                map: RwLock::new(None),
                leaders: Mutex::new(HashMap::new()),
                next: AtomicUsize::new(0),
            }),
        })
    }

    /// The options given at creation.
    pub fn options(&self) -> &UpstreamOptions {
        &self.inner.options
    }

    /// How sends were batched so far (`/metrics`).
    pub fn send_batch_stats(&self) -> SendBatchStats {
        self.inner.batchers.stats()
    }

    /// This gateway's id.
    pub fn gateway_id(&self) -> &str {
        &self.inner.options.gateway_id
    }

    /// A (lazily connecting, cached) channel to the node at `addr`.
    pub fn channel(&self, addr: &str) -> Result<Channel, CallError> {
        let mut channels = self.inner.channels.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(ch) = channels.get(addr) {
            return Ok(ch.clone());
        }
        let endpoint = rim_cluster::tls::endpoint(addr, self.inner.options.tls.as_ref())
            .map_err(|e| CallError::new(ErrorCode::ErrorInternal, format!("bad node address {addr}: {e}")))?
            .connect_timeout(CONNECT_TIMEOUT.min(self.inner.options.request_timeout))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(10))
            .keep_alive_while_idle(true);
        let ch = endpoint.connect_lazy();
        channels.insert(addr.to_string(), ch.clone());
        Ok(ch)
    }

    /// `msg` as a request carrying the cluster secret, with a gRPC timeout
    /// if given (long-lived streams pass `None`).
    pub fn request<T>(&self, msg: T, timeout: Option<Duration>) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        r.metadata_mut().insert(CLUSTER_SECRET_METADATA_KEY, self.inner.secret.clone());
        if let Some(t) = timeout {
            r.set_timeout(t);
        }
        r
    }

    /// The cached cluster map, if loaded.
    pub fn cluster_map(&self) -> Option<Arc<Placement>> {
        self.inner.map.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Loads the cluster map from the first node that answers (known nodes
    /// first, then the seeds) and caches it; keeps the cached one if it is
    /// newer. Fails with `ERROR_UNAVAILABLE` if no node answered within the
    /// request timeout.
    pub async fn refresh_map(&self) -> Result<Arc<Placement>, CallError> {
        let deadline = Instant::now() + self.inner.options.request_timeout;
        let mut last = CallError::new(ErrorCode::ErrorUnavailable, "no node answered");
        for addr in self.node_addrs() {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            let ch = self.channel(&addr)?;
            let left = deadline - now;
            let req = self.request(GetClusterMapRequest { known_version: 0 }, Some(left));
            let answer = tokio::time::timeout(left, AdminServiceClient::new(ch).get_cluster_map(req)).await;
            let map = match answer {
                Ok(Ok(reply)) => reply.into_inner().map,
                Ok(Err(status)) => {
                    last = status_error(&status);
                    continue;
                }
                Err(_) => {
                    last = CallError::new(ErrorCode::ErrorTimeout, format!("{addr}: cluster map timed out"));
                    continue;
                }
            };
            let Some(map) = map else { continue };
            match Placement::new(map) {
                Ok(p) => return Ok(self.store_map(p)),
                Err(e) => {
                    last =
                        CallError::new(ErrorCode::ErrorInternal, format!("{addr}: invalid cluster map: {e}"));
                }
            }
        }
        if last.code == ErrorCode::ErrorTimeout {
            last.code = ErrorCode::ErrorUnavailable;
        }
        Err(last)
    }

    fn store_map(&self, p: Placement) -> Arc<Placement> {
        let mut map = self.inner.map.write().unwrap_or_else(|e| e.into_inner());
        match &*map {
            Some(old) if old.version() > p.version() => old.clone(),
            _ => {
                let p = Arc::new(p);
                *map = Some(p.clone());
                p
            }
        }
    }

    /// The cached map, loading it first if there is none.
    pub async fn ensure_map(&self) -> Result<Arc<Placement>, CallError> {
        match self.cluster_map() {
            Some(m) => Ok(m),
            None => self.refresh_map().await,
        }
    }

    /// Internal addresses of every serving node known from the map, then
    /// the seeds not among them.
    pub fn node_addrs(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        if let Some(map) = self.cluster_map() {
            for n in map.nodes() {
                let serving = n.state == NodeState::Active as i32 || n.state == NodeState::Joining as i32;
                if serving && !n.internal_addr.is_empty() && !out.contains(&n.internal_addr) {
                    out.push(n.internal_addr.clone());
                }
            }
        }
        for s in &self.inner.options.seeds {
            if !out.contains(s) {
                out.push(s.clone());
            }
        }
        out
    }

    /// The shard of a user, if the map is loaded.
    pub fn shard_of_user(&self, user_id: UserId) -> Option<ShardId> {
        self.cluster_map().map(|m| m.shard_of_user(user_id))
    }

    /// The ids of the data shards, if the map is loaded.
    pub fn data_shards(&self) -> Vec<ShardId> {
        self.cluster_map().map(|m| m.data_shards().map(|s| ShardId(s.shard_id)).collect()).unwrap_or_default()
    }

    /// The best known leader address of a shard: a learned hint, else the
    /// map's hint.
    pub fn leader_addr(&self, shard_id: ShardId) -> Option<String> {
        let learned = self.inner.leaders.lock().unwrap_or_else(|e| e.into_inner()).get(&shard_id).cloned();
        let not_at = match learned {
            Some(LeaderHint::At(a)) => return Some(a),
            Some(LeaderHint::NotAt(a)) => Some(a),
            None => None,
        };
        let map = self.cluster_map()?;
        map.leader_hint(shard_id)
            .map(|n| n.internal_addr.clone())
            .filter(|a| !a.is_empty() && not_at.as_ref() != Some(a))
    }

    /// Records that `addr` leads shard `shard_id`.
    pub fn note_leader(&self, shard_id: ShardId, addr: &str) {
        if addr.is_empty() {
            return;
        }
        let mut leaders = self.inner.leaders.lock().unwrap_or_else(|e| e.into_inner());
        leaders.insert(shard_id, LeaderHint::At(addr.to_string()));
    }

    /// Records that `addr` failed as shard `shard_id`'s leader (unreachable,
    /// or no longer leading): it is not preferred until named again.
    pub fn note_not_leader(&self, shard_id: ShardId, addr: &str) {
        let mut leaders = self.inner.leaders.lock().unwrap_or_else(|e| e.into_inner());
        let stale = match leaders.get(&shard_id) {
            Some(LeaderHint::At(a)) => a == addr,
            Some(LeaderHint::NotAt(_)) | None => true,
        };
        if stale {
            leaders.insert(shard_id, LeaderHint::NotAt(addr.to_string()));
        }
    }

    /// The internal address of a node of the cached map.
    pub fn node_addr(&self, node_id: NodeId) -> Option<String> {
        let map = self.cluster_map()?;
        map.node(node_id).map(|n| n.internal_addr.clone()).filter(|a| !a.is_empty())
    }

    /// The order in which to try nodes for a call about `user_id`: its
    /// shard's leader first if known, then the other nodes, rotated so that
    /// calls spread.
    fn candidates(&self, shard: Option<ShardId>) -> Vec<String> {
        let mut nodes = self.node_addrs();
        if !nodes.is_empty() {
            let k = self.inner.next.fetch_add(1, Ordering::Relaxed) % nodes.len();
            nodes.rotate_left(k);
        }
        if let Some(leader) = shard.and_then(|s| self.leader_addr(s)) {
            nodes.retain(|a| *a != leader);
            nodes.insert(0, leader);
        }
        nodes
    }

    /// Carries out `call` (see the [module documentation](self)).
    pub async fn call(&self, call: &Call) -> Result<NodeReply, CallError> {
        if call.request.is_room() {
            let reason = "room subscriptions are served by the push router, not by a node";
            return Err(CallError::new(ErrorCode::ErrorUnknownCommand, reason));
        }
        self.call_node(call).await
    }

    /// Carries out a call served by a node.
    async fn call_node(&self, call: &Call) -> Result<NodeReply, CallError> {
        let mut backoff = Backoff::within(self.inner.options.request_timeout);
        if self.cluster_map().is_none() {
            // Without the map every node is still a candidate (the seeds),
            // so a failure here only costs the leader preference.
            if let Err(e) = self.refresh_map().await {
                tracing::debug!(error = %e, "cluster map unavailable; using the seeds");
            }
        }
        let user = match &call.request {
            NodeCall::SignIn(input) => UserId(input.user_id),
            _ => call.user_id,
        };
        let mut last = CallError::new(ErrorCode::ErrorUnavailable, "no node answered");
        let mut timed_out = false;
        loop {
            let shard = if user != UserId(0) { self.shard_of_user(user) } else { None };
            let mut queue = self.candidates(shard);
            let mut tried: Vec<String> = Vec::new();
            let mut refresh = false;
            while let Some(addr) = (!queue.is_empty()).then(|| queue.remove(0)) {
                if tried.contains(&addr) {
                    continue;
                }
                let left = backoff.left();
                if left.is_zero() {
                    return Err(give_up(last, timed_out));
                }
                tried.push(addr.clone());
                // One node may not take the whole budget: another may answer.
                let budget = self.inner.options.request_timeout / 2;
                let limit = if budget >= MIN_ATTEMPT { left.min(budget) } else { left };
                match self.attempt(&addr, call, limit).await {
                    Attempt::Done(r) => return r,
                    Attempt::Next { error, hint, refresh: r, timed_out: t } => {
                        tracing::debug!(node = %addr, error = %error, "node call failed; trying another node");
                        refresh |= r;
                        timed_out |= t;
                        last = error;
                        if let Some(s) = shard
                            && self.leader_addr(s).as_deref() == Some(addr.as_str())
                        {
                            self.note_not_leader(s, &addr);
                        }
                        if let Some(h) = hint.filter(|h| !h.is_empty() && !tried.contains(h)) {
                            if let Some(s) = shard {
                                self.note_leader(s, &h);
                            }
                            queue.insert(0, h);
                        }
                    }
                }
            }
            if refresh {
                let _ = self.refresh_map().await;
            }
            if !backoff.wait().await {
                return Err(give_up(last, timed_out));
            }
        }
    }

    /// One attempt of `call` at `addr`, limited to `left`.
    async fn attempt(&self, addr: &str, call: &Call, left: Duration) -> Attempt {
        let ch = match self.channel(addr) {
            Ok(ch) => ch,
            Err(e) => return Attempt::Done(Err(e)),
        };
        match tokio::time::timeout(left, self.rpc(addr, ch, call, left)).await {
            Err(_) => Attempt::Next {
                error: CallError::new(ErrorCode::ErrorTimeout, format!("{addr}: no answer in time")),
                hint: None,
                refresh: false,
                timed_out: true,
            },
            Ok(Ok(reply)) => Attempt::Done(Ok(reply)),
            Ok(Err(status)) => {
                let error = status_error(&status);
                let hint = rim_proto::error::leader_of_status(&status).map(str::to_string);
                match error.code {
                    code if retryable(code) => {
                        Attempt::Next { error, hint, refresh: false, timed_out: false }
                    }
                    ErrorCode::ErrorWrongShard => {
                        Attempt::Next { error, hint, refresh: true, timed_out: false }
                    }
                    ErrorCode::ErrorTimeout
                        if matches!(
                            status.code(),
                            tonic::Code::DeadlineExceeded | tonic::Code::Cancelled
                        ) && rim_code_missing(&status) =>
                    {
                        // Our own deadline (set on the request) passed.
                        Attempt::Next { error, hint: None, refresh: false, timed_out: true }
                    }
                    _ => Attempt::Done(Err(error)),
                }
            }
        }
    }

    /// The connection context of `call`.
    fn conn(&self, call: &Call) -> Option<ConnContext> {
        Some(ConnContext {
            user_id: call.user_id.0,
            device_id: call.device_id.0,
            gateway_id: self.inner.options.gateway_id.clone(),
            conn_id: call.conn_id,
            client_addr: String::new(),
            token_version: call.token_version,
        })
    }

    /// A `Send` at `addr` (over `ch`): through the batcher of `addr`, or
    /// unary when it says so; either way, what the unary call would return.
    /// `req` builds the request (twice only when a queued send must go
    /// unary after all).
    async fn send(
        &self,
        addr: &str,
        ch: Channel,
        req: impl Fn() -> ConnSendRequest,
        left: Duration,
    ) -> Result<SendOutput, tonic::Status> {
        match self.inner.batchers.submit(addr, &ch, req()) {
            batch::Submit::Queued(rx) => match rx.await {
                Ok(batch::Outcome::Done(r)) => return r,
                Ok(batch::Outcome::Unary) => {}
                Err(_) => {
                    let msg = format!("{addr}: the send batcher stopped");
                    return Err(rim_proto::error::status(ErrorCode::ErrorUnavailable, msg));
                }
            },
            batch::Submit::Unary => {}
        }
        let mut gw = GatewayServiceClient::new(ch);
        Ok(gw.send(self.request(req(), Some(left))).await?.into_inner())
    }

    /// The `GatewayService` RPC of `call` on `ch` (the channel of `addr`);
    /// sends go through the batcher of `addr`.
    async fn rpc(
        &self,
        addr: &str,
        ch: Channel,
        call: &Call,
        left: Duration,
    ) -> Result<NodeReply, tonic::Status> {
        let conn = self.conn(call);
        let mut gw = GatewayServiceClient::new(ch.clone());
        let t = Some(left);
        Ok(match &call.request {
            NodeCall::SignIn(input) => {
                let req = ConnSignInRequest { conn, input: Some(input.clone()) };
                NodeReply::SignIn(Box::new(gw.conn_sign_in(self.request(req, t)).await?.into_inner()))
            }
            NodeCall::Sync(input) => {
                let req = ConnSyncRequest { conn, input: Some(*input) };
                NodeReply::Sync(gw.sync(self.request(req, t)).await?.into_inner())
            }
            NodeCall::SyncGroup(input) => {
                let req = ConnSyncGroupRequest { conn, input: Some(*input) };
                NodeReply::SyncGroup(gw.sync_group(self.request(req, t)).await?.into_inner())
            }
            NodeCall::Ack(input) => {
                let req = ConnAckRequest { conn, input: Some(*input) };
                NodeReply::Ack(gw.ack(self.request(req, t)).await?.into_inner())
            }
            NodeCall::Send { input, group } => {
                let req =
                    || ConnSendRequest { conn: conn.clone(), input: Some(input.clone()), group: *group };
                NodeReply::Send(self.send(addr, ch, req, left).await?)
            }
            NodeCall::Recall(input) => {
                let req = ConnRecallRequest { conn, input: Some(input.clone()) };
                NodeReply::Send(gw.recall(self.request(req, t)).await?.into_inner())
            }
            NodeCall::MarkRead(input) => {
                let req = ConnReadRequest { conn, input: Some(*input) };
                NodeReply::Read(gw.mark_read(self.request(req, t)).await?.into_inner())
            }
            NodeCall::Logout => {
                gw.logout(self.request(ConnLogoutRequest { conn }, t)).await?;
                NodeReply::Empty
            }
            NodeCall::Offline { reason, session_epoch } => {
                let req = ConnOfflineRequest { conn, reason: *reason as i32, session_epoch: *session_epoch };
                gw.offline(self.request(req, t)).await?;
                NodeReply::Empty
            }
            NodeCall::SubscribeRoom(_) | NodeCall::UnsubscribeRoom(_) => {
                let reason = "room subscriptions are served by the push router";
                return Err(rim_proto::error::status(ErrorCode::ErrorUnknownCommand, reason));
            }
        })
    }
}

fn rim_code_missing(status: &tonic::Status) -> bool {
    status.metadata().get(rim_proto::error::CODE_METADATA_KEY).is_none()
}

/// The [`CallError`] of a node's error status.
pub fn status_error(status: &tonic::Status) -> CallError {
    let code = rim_proto::error::code_of_status(status);
    let retry_after_ms = match rim_proto::error::retry_after_of_status(status) {
        0 if code == ErrorCode::ErrorBusy => 100,
        hint => hint,
    };
    CallError { code, message: status.message().to_string(), retry_after_ms }
}

fn give_up(last: CallError, timed_out: bool) -> CallError {
    if timed_out {
        CallError::new(ErrorCode::ErrorTimeout, format!("call timed out; last error: {}", last.message))
    } else if retryable(last.code) || last.code == ErrorCode::ErrorWrongShard {
        CallError {
            code: ErrorCode::ErrorUnavailable,
            message: format!("no node could serve the call: {}", last.message),
            retry_after_ms: 200,
        }
    } else {
        last
    }
}
