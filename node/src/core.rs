//! What every service of a node shares: the hosted groups, the cached
//! cluster map, routing of writes and reads to group leaders, id
//! allocation and token checks.
//!
//! # Routing
//!
//! A write for group `g` goes to `g`'s leader: directly into the local
//! proposer when this node leads `g`, otherwise over the internal `Propose`
//! RPC to the node this replica believes leads (addresses come from the
//! group's own Raft membership). A `NotLeader` answer carries the new hint;
//! the router follows hints and backs off until the request's deadline. All
//! operations are idempotent under retry (see `Group::propose`).
//!
//! A linearizable read first obtains a read index from the leader (locally
//! or via `ReadIndex`), waits until the local replica applied it, then reads
//! locally. With `follower_reads` (or the test-only `stale_reads` sabotage)
//! the barrier is skipped.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use prost::Message as _;
use rim_cluster::Backoff;
use rim_cluster::{Placement, TokenKeys};
use rim_proto::ErrorCode;
use rim_proto::ids::{DeviceId, GroupId, NodeId, ShardId, UserId};
use rim_proto::store::{self, Op, OpResult, Proposal, ProposalResult, op::Op as O};
use rim_proto::v1::raft_service_client::RaftServiceClient;
use rim_proto::v1::{OnlinePush, RaftReply, RaftRequest};
use rim_raft_store::Limits;

use crate::auth::CodeVerifier;
use crate::config::NodeConfig;
use crate::error::{Error, Result};
use crate::group::{Group, now_ms};
use crate::net::{CallError, Peers};

pub use rim_cluster::META_SHARD as META;

/// Where [`Core::on_leader`] runs an attempt.
#[derive(Debug, Clone)]
pub enum Target {
    /// This node leads the group.
    Local(Arc<Group>),
    /// The node with this id is believed to lead it (or hosts it).
    Remote(NodeId),
}

/// Ids handed out locally from blocks reserved in the meta group.
#[derive(Debug, Default)]
struct IdBlock {
    next: u64,
    end: u64,
}

/// Shared state of one logic node.
pub struct Core {
    /// Validated configuration.
    pub config: NodeConfig,
    /// Connections to peers.
    pub peers: Peers,
    /// Hosted groups by shard id.
    pub groups: RwLock<BTreeMap<ShardId, Arc<Group>>>,
    /// Latest cluster map known here.
    pub placement: RwLock<Option<Arc<Placement>>>,
    /// Token keys: one signs, all verify.
    pub tokens: TokenKeys,
    /// Verifier of app-signed tokens (`[jwt]`), if configured.
    pub jwt: Option<crate::jwt::JwtVerifier>,
    /// The app's `before_send` hook (`[before_send]`), if configured.
    pub before_send: Option<crate::hooks::BeforeSend>,
    /// The app's auth callback (`[auth_callback]`), if configured.
    pub auth_callback: Option<crate::auth_callback::AuthCallback>,
    /// Phone sign-in code verifier.
    pub codes: Arc<dyn CodeVerifier>,
    /// This node's view of the cluster's limits (the cluster map's, or the
    /// defaults a group without limits applies with): writes are checked
    /// against it before proposing. Not decisive: each group applies with
    /// the limits its own log set (`crate::limits`).
    limits: RwLock<Arc<Limits>>,
    /// Client rate limits and the password-hashing slots.
    pub throttle: crate::throttle::Throttle,
    /// Request deadline inside the node.
    pub timeout: Duration,
    id_blocks: Mutex<BTreeMap<i32, IdBlock>>,
    /// Flips to `true` when the node shuts down (servers and streams stop).
    pub stopping: tokio::sync::watch::Sender<bool>,
}

impl std::fmt::Debug for Core {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Core").field("id", &self.config.id).finish()
    }
}

impl Core {
    /// A core over opened storage.
    pub fn new(config: NodeConfig, peers: Peers, tokens: TokenKeys, codes: Arc<dyn CodeVerifier>) -> Core {
        let timeout = Duration::from_millis(config.request_timeout_ms);
        let throttle = crate::throttle::Throttle::new(&config.limits);
        // `NodeConfig::validate` already refused a configuration this fails on.
        let jwt = crate::jwt::JwtVerifier::from_config(&config.jwt).ok().flatten();
        let before_send = crate::hooks::BeforeSend::from_config(&config.before_send).ok().flatten();
        let auth_callback =
            crate::auth_callback::AuthCallback::from_config(&config.auth_callback).ok().flatten();
        Core {
            jwt,
            before_send,
            auth_callback,
            throttle,
            config,
            peers,
            groups: RwLock::new(BTreeMap::new()),
            placement: RwLock::new(None),
            tokens,
            codes,
            limits: RwLock::default(),
            timeout,
            id_blocks: Mutex::new(BTreeMap::new()),
            stopping: tokio::sync::watch::Sender::new(false),
        }
    }

    /// Resolves once the node is shutting down.
    pub async fn stopped(&self) {
        let mut rx = self.stopping.subscribe();
        let _ = rx.wait_for(|s| *s).await;
    }

    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.config.id
    }

    /// A hosted group.
    pub fn group(&self, shard: ShardId) -> Option<Arc<Group>> {
        self.groups.read().expect("groups lock").get(&shard).cloned()
    }

    /// Every hosted group.
    pub fn all_groups(&self) -> Vec<Arc<Group>> {
        self.groups.read().expect("groups lock").values().cloned().collect()
    }

    /// The cached cluster map (shared: reading it on every request is cheap).
    pub fn placement(&self) -> Result<Arc<Placement>> {
        self.placement
            .read()
            .expect("placement lock")
            .clone()
            .ok_or_else(|| Error::Unavailable("cluster map not known yet".into()))
    }

    /// This node's view of the cluster's limits (see the field).
    pub fn limits(&self) -> Arc<Limits> {
        self.limits.read().expect("limits lock").clone()
    }

    /// Re-reads the cluster map from the local meta replica if it is newer,
    /// and with it this node's view of the cluster's limits.
    pub fn refresh_placement(&self) -> Result<()> {
        let Some(meta) = self.group(META) else { return Ok(()) };
        let Some(map) = meta.reader.cluster_map()? else { return Ok(()) };
        let mut cur = self.placement.write().expect("placement lock");
        if cur.as_ref().is_none_or(|p| p.version() < map.version) {
            // As the groups do with their stored limits: the meta group's
            // apply checked them.
            let limits = Limits::of_stored(map.limits.as_ref());
            match Placement::new(map) {
                Ok(p) => {
                    *cur = Some(Arc::new(p));
                    *self.limits.write().expect("limits lock") = Arc::new(limits);
                }
                Err(e) => tracing::error!(error = %e, "ignoring an invalid cluster map"),
            }
        }
        Ok(())
    }

    /// Changes the cluster map with `edit` and stores it as the next version
    /// (compare-and-set on the version, retried a few times on conflicts);
    /// returns that version. An edit that changes nothing writes nothing
    /// (the current version); an edit's error is returned as it is.
    pub async fn update_map(
        &self,
        edit: impl Fn(&mut rim_proto::v1::ClusterMap) -> Result<()>,
    ) -> Result<u64> {
        for _ in 0..5 {
            self.refresh_placement()?;
            let current = self.placement()?;
            let mut map = current.map().clone();
            edit(&mut map)?;
            if map == *current.map() {
                return Ok(map.version);
            }
            map.version += 1;
            Placement::new(map.clone())
                .map_err(|e| Error::rejected(ErrorCode::ErrorBadRequest, e.to_string()))?;
            let op = Op { op: Some(O::SetClusterMap(store::SetClusterMap { map: Some(map.clone()) })) };
            match self.propose(META, op).await {
                Ok(_) => {
                    self.refresh_placement()?;
                    return Ok(map.version);
                }
                Err(Error::Rejected { code: ErrorCode::ErrorBadRequest, .. }) => continue, // lost the race
                Err(e) => return Err(e),
            }
        }
        Err(Error::Unavailable("the cluster map kept changing; retry".into()))
    }

    /// The shard of a user.
    pub fn shard_of_user(&self, user: UserId) -> Result<ShardId> {
        Ok(self.placement()?.shard_of_user(user))
    }

    /// Proposes `op` on `shard`, wherever its leader is; returns the op's
    /// result, with rejections turned into [`Error::Rejected`].
    pub async fn propose(&self, shard: ShardId, op: Op) -> Result<OpResult> {
        let r = self.propose_raw(shard, op).await?;
        match ErrorCode::try_from(r.code) {
            Ok(ErrorCode::Ok) => Ok(r),
            Ok(code) => Err(Error::rejected(code, r.message)),
            Err(_) => Err(Error::rejected(ErrorCode::ErrorInternal, r.message)),
        }
    }

    /// Like [`Core::propose`] but returns rejections as results. An
    /// operation that [`Limits::check_op`] refuses is refused here, before
    /// it is forwarded or written to any log.
    pub async fn propose_raw(&self, shard: ShardId, op: Op) -> Result<OpResult> {
        if let Err(e) = self.limits().check_op(&op) {
            return Ok(OpResult { code: e.code() as i32, message: e.to_string(), value: None });
        }
        self.on_leader(shard, "write", |target, left| {
            let op = op.clone();
            async move {
                match target {
                    Target::Local(g) => g.propose(op, left).await,
                    Target::Remote(node) => self.propose_remote(shard, node, &op, left).await,
                }
            }
        })
        .await
    }

    /// Runs `attempt` at the leader of `shard` (this node's group, or a peer
    /// by id), following `NotLeader` hints at once and waiting with
    /// [`Backoff`] after other retryable outcomes, until the request
    /// deadline. The one leader-following loop of the node: writes, read
    /// barriers, forwarded reads and online pushes all go through it.
    ///
    /// Without a local replica of `shard` (a cluster larger than the
    /// replication factor), the leader is first the map's hint, then each
    /// voter of the map in turn: a voter that does not lead answers with a
    /// hint or `Unavailable`.
    pub async fn on_leader<T, F, Fut>(&self, shard: ShardId, what: &str, mut attempt: F) -> Result<T>
    where
        F: FnMut(Target, Duration) -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        let mut backoff = Backoff::within(self.timeout);
        let mut hint: Option<NodeId> = None;
        let mut round = 0usize;
        loop {
            let left = backoff.left();
            if left.is_zero() {
                return Err(Error::Timeout(format!("{what} on group {shard}: no leader answered in time")));
            }
            let local = self.group(shard);
            let leader = match (hint.take(), &local) {
                (Some(h), _) => Some(h),
                (None, Some(g)) => g.leader(),
                (None, None) => self.guess_leader(shard, round),
            };
            round += 1;
            let outcome = match (leader, &local) {
                (Some(l), Some(g)) if l == self.id() => attempt(Target::Local(g.clone()), left).await,
                (Some(l), _) if l != self.id() => attempt(Target::Remote(l), left).await,
                _ => Err(Error::Unavailable(format!("group {shard} has no leader"))),
            };
            match outcome {
                Err(Error::NotLeader { leader: Some(l), .. }) if Some(l) != leader => hint = Some(l),
                Err(e) if rim_cluster::retryable(e.code()) => {
                    tracing::debug!(%shard, what, error = %e, "retrying at the leader");
                    backoff.wait().await;
                }
                other => return other,
            }
        }
    }

    /// For a group not hosted here: the map's leader hint on the first
    /// round, then the group's voters in turn.
    fn guess_leader(&self, shard: ShardId, round: usize) -> Option<NodeId> {
        let p = self.placement().ok()?;
        if round == 0
            && let Some(n) = p.leader_hint(shard)
        {
            return Some(n.node_id);
        }
        let voters: Vec<NodeId> = p.replicas_of(shard).into_iter().filter(|v| *v != self.id()).collect();
        (!voters.is_empty()).then(|| voters[round % voters.len()])
    }

    /// The internal address of node `node`: from any hosted group's
    /// membership, else from the cluster map.
    pub fn node_addr(&self, shard: ShardId, node: NodeId) -> Option<String> {
        if let Some(a) = self.group(shard).and_then(|g| g.member_addr(node)) {
            return Some(a);
        }
        if let Some(a) = self.all_groups().iter().find_map(|g| g.member_addr(node)) {
            return Some(a);
        }
        self.placement().ok().and_then(|p| p.node(node).map(|n| n.internal_addr.clone()))
    }

    /// One internal `RaftService` call of `shard` at `node`; the reply's
    /// payload when it is OK, else the reply's code as an [`Error`].
    pub(crate) async fn call_peer<F, Fut>(
        &self,
        shard: ShardId,
        node: NodeId,
        payload: Vec<u8>,
        left: Duration,
        rpc: F,
    ) -> Result<bytes::Bytes>
    where
        F: FnOnce(RaftServiceClient<tonic::transport::Channel>, tonic::Request<RaftRequest>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<RaftReply>, tonic::Status>>,
    {
        let addr = self
            .node_addr(shard, node)
            .ok_or_else(|| Error::Unavailable(format!("no address for node {node}")))?;
        let req = RaftRequest {
            group_id: shard.0,
            payload: payload.into(),
            target_node_id: node,
            from_node_id: self.id(),
        };
        let msg = self.peers.request(req, left);
        let reply = self.peers.call(node, &addr, left, |c, _| rpc(c, msg)).await.map_err(call_error)?;
        match ErrorCode::try_from(reply.code).unwrap_or(ErrorCode::ErrorInternal) {
            ErrorCode::Ok => Ok(reply.payload),
            ErrorCode::ErrorNotLeader => {
                let leader = reply.message.parse().ok();
                Err(Error::NotLeader { shard, leader, addr: leader.and_then(|l| self.node_addr(shard, l)) })
            }
            ErrorCode::ErrorTimeout => Err(Error::Timeout(reply.message)),
            ErrorCode::ErrorUnavailable => Err(Error::Unavailable(reply.message)),
            code => Err(Error::rejected(code, reply.message)),
        }
    }

    async fn propose_remote(
        &self,
        shard: ShardId,
        node: NodeId,
        op: &Op,
        left: Duration,
    ) -> Result<OpResult> {
        let payload = Proposal { now_ms: 0, ops: vec![op.clone()] }.encode_to_vec();
        let reply = self
            .call_peer(shard, node, payload, left, |mut c, msg| async move { c.propose(msg).await })
            .await?;
        let mut r = ProposalResult::decode(reply.as_ref())
            .map_err(|e| Error::Internal(format!("bad propose reply: {e}")))?;
        r.results.pop().ok_or_else(|| Error::Internal("empty propose reply".into()))
    }

    /// Returns the local replica of `shard` once it reflects every write
    /// acknowledged before this call (a linearizable read), or at once with
    /// follower reads (or the `stale_reads` sabotage) on.
    pub async fn read_barrier(&self, shard: ShardId) -> Result<Arc<Group>> {
        let group = self
            .group(shard)
            .ok_or_else(|| Error::Unavailable(format!("group {shard} is not hosted here")))?;
        if self.config.follower_reads || self.config.sabotage.stale_reads {
            return Ok(group);
        }
        let deadline = Instant::now() + self.timeout;
        let index = self
            .on_leader(shard, "read barrier", |target, left| async move {
                match target {
                    Target::Local(g) => g.read_index(left).await,
                    Target::Remote(node) => self.read_index_remote(shard, node, left).await,
                }
            })
            .await?;
        group.wait_applied(index, deadline.saturating_duration_since(Instant::now())).await?;
        Ok(group)
    }

    async fn read_index_remote(&self, shard: ShardId, node: NodeId, left: Duration) -> Result<u64> {
        let reply = self
            .call_peer(shard, node, Vec::new(), left, |mut c, msg| async move { c.read_index(msg).await })
            .await?;
        let b: [u8; 8] = reply.as_ref().try_into().map_err(|_| Error::Internal("bad read index".into()))?;
        Ok(u64::from_be_bytes(b))
    }

    /// Hands an online-only push to the push streams of `shard`'s leader:
    /// locally when this node leads it, else over `RaftService.Push`,
    /// following leader hints until the request deadline. Nothing is
    /// stored: connections that are not online when it arrives miss it.
    /// A retry after a timeout may deliver it twice.
    pub async fn push_online(&self, shard: ShardId, push: OnlinePush) -> Result<()> {
        let push = Arc::new(push);
        self.on_leader(shard, "online push", |target, left| {
            let push = push.clone();
            async move {
                match target {
                    Target::Local(g) => g.push_online(push).map(|_| ()),
                    Target::Remote(node) => {
                        let payload = push.encode_to_vec();
                        self.call_peer(
                            shard,
                            node,
                            payload,
                            left,
                            |mut c, msg| async move { c.push(msg).await },
                        )
                        .await
                        .map(|_| ())
                    }
                }
            }
        })
        .await
    }

    /// A fresh user id.
    pub async fn allocate_user(&self) -> Result<UserId> {
        self.allocate_id(store::IdKind::User).await.map(UserId)
    }

    /// A fresh device id.
    pub async fn allocate_device(&self) -> Result<DeviceId> {
        self.allocate_id(store::IdKind::Device).await.map(DeviceId)
    }

    /// A fresh group id.
    pub async fn allocate_group(&self) -> Result<GroupId> {
        self.allocate_id(store::IdKind::Group).await.map(GroupId)
    }

    /// A fresh id of `kind`, from a block reserved in the meta group.
    async fn allocate_id(&self, kind: store::IdKind) -> Result<u64> {
        const BLOCK: u32 = 100;
        {
            let mut blocks = self.id_blocks.lock().expect("id lock");
            let b = blocks.entry(kind as i32).or_default();
            if b.next < b.end {
                b.next += 1;
                return Ok(b.next - 1);
            }
        }
        let op = Op { op: Some(O::AllocateIds(store::AllocateIds { kind: kind as i32, count: BLOCK })) };
        let r = self.propose(META, op).await?;
        let Some(store::op_result::Value::Ids(range)) = r.value else {
            return Err(Error::Internal("id allocation returned no range".into()));
        };
        let mut blocks = self.id_blocks.lock().expect("id lock");
        let b = blocks.entry(kind as i32).or_default();
        // Use the new block; any remainder of a block fetched concurrently is dropped
        // (ids are never reused, gaps are fine).
        b.next = range.first + 1;
        b.end = range.first + u64::from(range.count);
        Ok(range.first)
    }

    /// Verifies a device token: signature and expiry, then the device's
    /// token version in the user's shard, so logout and revoke take effect.
    /// Versions only grow, so a local replica that is ahead settles a
    /// revocation at once; one that lacks the device or is behind the token
    /// is first brought up to date (read barrier). A node without a replica
    /// of the shard forwards the read (`Core::view`).
    pub async fn verify_token(
        &self,
        user: UserId,
        device: DeviceId,
        token: &str,
    ) -> Result<rim_cluster::Claims> {
        let claims = self.token_claims(user, device, token)?;
        let shard = self.shard_of_user(user)?;
        let (u, d) = (user, device);
        let dev = match self.group(shard) {
            Some(local) => {
                let dev = local.reader.device(u, d)?;
                if dev.as_ref().is_none_or(|x| x.token_version < claims.token_version) {
                    self.read_barrier(shard).await?.reader.device(u, d)?
                } else {
                    dev
                }
            }
            // Not hosted here: a forwarded linearizable read.
            None => self.view(shard).await?.device(u, d).await?,
        };
        match dev {
            Some(d) if d.token_version == claims.token_version => Ok(claims),
            Some(_) => Err(Error::rejected(ErrorCode::ErrorTokenRevoked, "device signed out")),
            None => Err(Error::rejected(ErrorCode::ErrorDeviceNotFound, "unknown device")),
        }
    }

    /// The claims of `token` if its signature and expiry are valid and it
    /// names `(user, device)`: the local, stateless half of
    /// [`Core::verify_token`], checked before any read barrier is spent on
    /// the caller.
    pub fn token_claims(&self, user: UserId, device: DeviceId, token: &str) -> Result<rim_cluster::Claims> {
        let claims = self
            .tokens
            .verify(token, now_ms())
            .map_err(|e| Error::rejected(e.code(), format!("token refused: {e}")))?;
        if claims.user_id != user || claims.device_id != device {
            return Err(Error::rejected(
                ErrorCode::ErrorUnauthenticated,
                "token belongs to another user or device",
            ));
        }
        Ok(claims)
    }

    /// Refuses, with `ERROR_TOKEN_REVOKED`, a connection of `(user, device)`
    /// signed in at token version `version` if this node's replica of the
    /// user's shard holds a newer version (the device logged out or was
    /// revoked since). A local read without a barrier: cheap enough for
    /// every gateway call, and a lagging replica only delays the refusal.
    /// A shard not hosted here, or a replica that has not seen the version
    /// yet: no refusal.
    pub fn check_device_version(&self, user: UserId, device: DeviceId, version: u64) -> Result<()> {
        let Some(local) = self.group(self.shard_of_user(user)?) else { return Ok(()) };
        match local.reader.device(user, device)? {
            Some(d) if d.token_version > version => {
                Err(Error::rejected(ErrorCode::ErrorTokenRevoked, "device signed out"))
            }
            _ => Ok(()),
        }
    }

    /// Issues a token for a device at its current token version.
    pub fn issue_token(&self, user: UserId, device: DeviceId, token_version: u64) -> (String, i64) {
        let expires = now_ms() + (self.config.token_ttl_secs as i64) * 1000;
        let claims =
            rim_cluster::Claims { user_id: user, device_id: device, expires_at_ms: expires, token_version };
        (self.tokens.sign(&claims), expires)
    }
}

fn call_error(e: CallError) -> Error {
    match e {
        CallError::Unreachable(..) => Error::Unavailable(e.to_string()),
        CallError::Status(_, s) => Error::Unavailable(format!("peer refused: {s}")),
    }
}
