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
use rim_cluster::{Placement, TokenKey};
use rim_proto::ErrorCode;
use rim_proto::store::{self, Op, OpResult, Proposal, ProposalResult, op::Op as O};
use rim_proto::v1::{OnlinePush, RaftRequest};
use rim_raft_store::ShardId;

use crate::auth::CodeVerifier;
use crate::config::NodeConfig;
use crate::error::{Error, Result};
use crate::group::{Group, now_ms};
use crate::net::{CallError, Peers};

/// The meta group's shard id.
pub const META: ShardId = ShardId(0);

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
    pub groups: RwLock<BTreeMap<u32, Arc<Group>>>,
    /// Latest cluster map known here.
    pub placement: RwLock<Option<Arc<Placement>>>,
    /// Token signing key (from the cluster secret).
    pub tokens: TokenKey,
    /// Phone sign-in code verifier.
    pub codes: Arc<dyn CodeVerifier>,
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
    pub fn new(config: NodeConfig, peers: Peers, tokens: TokenKey, codes: Arc<dyn CodeVerifier>) -> Core {
        let timeout = Duration::from_millis(config.request_timeout_ms);
        Core {
            config,
            peers,
            groups: RwLock::new(BTreeMap::new()),
            placement: RwLock::new(None),
            tokens,
            codes,
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
    pub fn id(&self) -> u64 {
        self.config.id
    }

    /// A hosted group.
    pub fn group(&self, shard: u32) -> Option<Arc<Group>> {
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

    /// Re-reads the cluster map from the local meta replica if it is newer.
    pub fn refresh_placement(&self) -> Result<()> {
        let Some(meta) = self.group(META.0) else { return Ok(()) };
        let Some(map) = meta.reader.cluster_map()? else { return Ok(()) };
        let mut cur = self.placement.write().expect("placement lock");
        if cur.as_ref().is_none_or(|p| p.version() < map.version) {
            match Placement::new(map) {
                Ok(p) => *cur = Some(Arc::new(p)),
                Err(e) => tracing::error!(error = %e, "ignoring an invalid cluster map"),
            }
        }
        Ok(())
    }

    /// Changes the cluster map with `edit` and stores it as the next version
    /// (compare-and-set on the version, retried a few times on conflicts).
    pub async fn update_map(&self, edit: impl Fn(&mut rim_proto::v1::ClusterMap)) -> Result<u64> {
        for _ in 0..5 {
            self.refresh_placement()?;
            let mut map = self.placement()?.map().clone();
            edit(&mut map);
            map.version += 1;
            Placement::new(map.clone())
                .map_err(|e| Error::rejected(ErrorCode::ErrorBadRequest, e.to_string()))?;
            let op = Op { op: Some(O::SetClusterMap(store::SetClusterMap { map: Some(map.clone()) })) };
            match self.propose(META.0, op).await {
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
    pub fn shard_of_user(&self, user: u64) -> Result<u32> {
        Ok(self.placement()?.shard_of_user(user))
    }

    /// Proposes `op` on `shard`, wherever its leader is; returns the op's
    /// result, with rejections turned into [`Error::Rejected`].
    pub async fn propose(&self, shard: u32, op: Op) -> Result<OpResult> {
        let r = self.propose_raw(shard, op).await?;
        match ErrorCode::try_from(r.code) {
            Ok(ErrorCode::Ok) => Ok(r),
            Ok(code) => Err(Error::rejected(code, r.message)),
            Err(_) => Err(Error::rejected(ErrorCode::ErrorInternal, r.message)),
        }
    }

    /// Like [`Core::propose`] but returns rejections as results.
    pub async fn propose_raw(&self, shard: u32, op: Op) -> Result<OpResult> {
        let deadline = Instant::now() + self.timeout;
        let mut hint: Option<u64> = None;
        let mut backoff = Duration::from_millis(20);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Error::Timeout(format!("no leader of group {shard} accepted the write in time")));
            }
            let local = self.group(shard);
            let leader = hint.take().or_else(|| local.as_ref().and_then(|g| g.leader()));
            let attempt = match (leader, &local) {
                (Some(l), Some(g)) if l == self.id() => g.propose(op.clone(), left).await,
                (Some(l), _) => self.propose_remote(shard, l, &op, left).await,
                (None, _) => Err(Error::Unavailable(format!("group {shard} has no leader"))),
            };
            match attempt {
                Err(Error::NotLeader { leader: Some(l), .. }) if Some(l) != leader => hint = Some(l),
                Err(e @ (Error::NotLeader { .. } | Error::Unavailable(_))) => {
                    tracing::debug!(shard, error = %e, "retrying write");
                    tokio::time::sleep(backoff.min(left)).await;
                    backoff = (backoff * 2).min(Duration::from_millis(300));
                }
                other => return other,
            }
        }
    }

    /// The internal address of node `node`: from any hosted group's
    /// membership, else from the cluster map.
    pub fn node_addr(&self, shard: u32, node: u64) -> Option<String> {
        if let Some(a) = self.group(shard).and_then(|g| g.member_addr(node)) {
            return Some(a);
        }
        if let Some(a) = self.all_groups().iter().find_map(|g| g.member_addr(node)) {
            return Some(a);
        }
        self.placement().ok().and_then(|p| p.node(node).map(|n| n.internal_addr.clone()))
    }

    async fn propose_remote(&self, shard: u32, node: u64, op: &Op, left: Duration) -> Result<OpResult> {
        let addr = self
            .node_addr(shard, node)
            .ok_or_else(|| Error::Unavailable(format!("no address for node {node}")))?;
        let payload = Proposal { now_ms: 0, ops: vec![op.clone()] }.encode_to_vec();
        let req = RaftRequest {
            group_id: shard,
            payload: payload.into(),
            target_node_id: node,
            from_node_id: self.id(),
        };
        let msg = self.peers.request(req, left);
        let reply = self
            .peers
            .call(node, &addr, left, |mut c, _| async move { c.propose(msg).await })
            .await
            .map_err(call_error)?;
        match ErrorCode::try_from(reply.code).unwrap_or(ErrorCode::ErrorInternal) {
            ErrorCode::Ok => {
                let mut r = ProposalResult::decode(reply.payload.as_ref())
                    .map_err(|e| Error::Internal(format!("bad propose reply: {e}")))?;
                r.results.pop().ok_or_else(|| Error::Internal("empty propose reply".into()))
            }
            ErrorCode::ErrorNotLeader => Err(Error::NotLeader { shard, leader: reply.message.parse().ok() }),
            ErrorCode::ErrorTimeout => Err(Error::Timeout(reply.message)),
            ErrorCode::ErrorUnavailable => Err(Error::Unavailable(reply.message)),
            code => Err(Error::rejected(code, reply.message)),
        }
    }

    /// Returns the local replica of `shard` once it reflects every write
    /// acknowledged before this call (a linearizable read), or at once with
    /// follower reads (or the `stale_reads` sabotage) on.
    pub async fn read_barrier(&self, shard: u32) -> Result<Arc<Group>> {
        let group = self
            .group(shard)
            .ok_or_else(|| Error::Unavailable(format!("group {shard} is not hosted here")))?;
        if self.config.follower_reads || self.config.sabotage.stale_reads {
            return Ok(group);
        }
        let deadline = Instant::now() + self.timeout;
        let mut backoff = Duration::from_millis(20);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Error::Timeout(format!("read barrier of group {shard}")));
            }
            let attempt = match group.leader() {
                Some(l) if l == self.id() => group.read_index(left).await,
                Some(l) => self.read_index_remote(shard, l, left).await,
                None => Err(Error::Unavailable(format!("group {shard} has no leader"))),
            };
            match attempt {
                Ok(index) => {
                    group.wait_applied(index, deadline.saturating_duration_since(Instant::now())).await?;
                    return Ok(group);
                }
                Err(Error::NotLeader { .. } | Error::Unavailable(_)) => {
                    tokio::time::sleep(backoff.min(left)).await;
                    backoff = (backoff * 2).min(Duration::from_millis(300));
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn read_index_remote(&self, shard: u32, node: u64, left: Duration) -> Result<u64> {
        let addr = self
            .node_addr(shard, node)
            .ok_or_else(|| Error::Unavailable(format!("no address for node {node}")))?;
        let req = RaftRequest {
            group_id: shard,
            payload: Default::default(),
            target_node_id: node,
            from_node_id: self.id(),
        };
        let msg = self.peers.request(req, left);
        let reply = self
            .peers
            .call(node, &addr, left, |mut c, _| async move { c.read_index(msg).await })
            .await
            .map_err(call_error)?;
        match ErrorCode::try_from(reply.code).unwrap_or(ErrorCode::ErrorInternal) {
            ErrorCode::Ok => {
                let b: [u8; 8] = reply
                    .payload
                    .as_ref()
                    .try_into()
                    .map_err(|_| Error::Internal("bad read index".into()))?;
                Ok(u64::from_be_bytes(b))
            }
            ErrorCode::ErrorNotLeader => Err(Error::NotLeader { shard, leader: reply.message.parse().ok() }),
            _ => Err(Error::Unavailable(reply.message)),
        }
    }

    /// Hands an online-only push to the push streams of `shard`'s leader:
    /// locally when this node leads it, else over `RaftService.Push`,
    /// following leader hints until the request deadline. Nothing is
    /// stored: connections that are not online when it arrives miss it.
    /// A retry after a timeout may deliver it twice.
    pub async fn push_online(&self, shard: u32, push: OnlinePush) -> Result<()> {
        let deadline = Instant::now() + self.timeout;
        let push = Arc::new(push);
        let mut hint: Option<u64> = None;
        let mut backoff = Duration::from_millis(20);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Error::Timeout(format!("no leader of group {shard} took the push in time")));
            }
            let local = self.group(shard);
            let leader = hint
                .take()
                .or_else(|| local.as_ref().and_then(|g| g.leader()))
                .or_else(|| self.placement().ok().and_then(|p| p.leader_hint(shard).map(|n| n.node_id)));
            let attempt = match (leader, &local) {
                (Some(l), Some(g)) if l == self.id() => g.push_online(push.clone()).map(|_| ()),
                (Some(l), _) => self.push_remote(shard, l, &push, left).await,
                (None, _) => Err(Error::Unavailable(format!("group {shard} has no leader"))),
            };
            match attempt {
                Err(Error::NotLeader { leader: Some(l), .. }) if Some(l) != leader => hint = Some(l),
                Err(e @ (Error::NotLeader { .. } | Error::Unavailable(_))) => {
                    tracing::debug!(shard, error = %e, "retrying online push");
                    tokio::time::sleep(backoff.min(left)).await;
                    backoff = (backoff * 2).min(Duration::from_millis(300));
                }
                other => return other,
            }
        }
    }

    async fn push_remote(&self, shard: u32, node: u64, push: &OnlinePush, left: Duration) -> Result<()> {
        let addr = self
            .node_addr(shard, node)
            .ok_or_else(|| Error::Unavailable(format!("no address for node {node}")))?;
        let req = RaftRequest {
            group_id: shard,
            payload: push.encode_to_vec().into(),
            target_node_id: node,
            from_node_id: self.id(),
        };
        let msg = self.peers.request(req, left);
        let reply = self
            .peers
            .call(node, &addr, left, |mut c, _| async move { c.push(msg).await })
            .await
            .map_err(call_error)?;
        match ErrorCode::try_from(reply.code).unwrap_or(ErrorCode::ErrorInternal) {
            ErrorCode::Ok => Ok(()),
            ErrorCode::ErrorNotLeader => Err(Error::NotLeader { shard, leader: reply.message.parse().ok() }),
            ErrorCode::ErrorUnavailable => Err(Error::Unavailable(reply.message)),
            code => Err(Error::rejected(code, reply.message)),
        }
    }

    /// A fresh id of `kind`, from a block reserved in the meta group.
    pub async fn allocate_id(&self, kind: store::IdKind) -> Result<u64> {
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
        let r = self.propose(META.0, op).await?;
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

    /// Verifies a device token: signature and expiry, then (when this node
    /// holds a replica of the user's shard) the device's token version, so
    /// logout and revoke take effect. Versions only grow, so a local replica
    /// that is ahead settles a revocation at once; one that lacks the device
    /// or is behind the token is first brought up to date (read barrier).
    pub async fn verify_token(&self, user: u64, device: u64, token: &str) -> Result<rim_cluster::Claims> {
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
        let Ok(shard) = self.shard_of_user(user) else { return Ok(claims) };
        let Some(local) = self.group(shard) else { return Ok(claims) };
        let (u, d) = (rim_raft_store::UserId(user), rim_raft_store::DeviceId(device));
        let mut dev = local.reader.device(u, d)?;
        if dev.as_ref().is_none_or(|d| d.token_version < claims.token_version) {
            dev = self.read_barrier(shard).await?.reader.device(u, d)?;
        }
        match dev {
            Some(d) if d.token_version == claims.token_version => Ok(claims),
            Some(_) => Err(Error::rejected(ErrorCode::ErrorTokenRevoked, "device signed out")),
            None => Err(Error::rejected(ErrorCode::ErrorDeviceNotFound, "unknown device")),
        }
    }

    /// Issues a token for a device at its current token version.
    pub fn issue_token(&self, user: u64, device: u64, token_version: u64) -> (String, i64) {
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
