//! The Raft network over gRPC, both ends.
//!
//! One tonic `Channel` per peer node is shared by every group (a channel is
//! a cheap, cloneable, multiplexed HTTP/2 connection). Each request names its
//! group (`group_id`) and carries the openraft request encoded with postcard;
//! the reply carries `Result<response, RaftError>` the same way. Snapshots
//! travel in openraft's chunks (`snapshot_max_chunk_size`), each chunk one
//! message of the `Snapshot` stream.
//!
//! Every call has a deadline (openraft's `RPCOption::hard_ttl`, or the
//! request timeout for forwarded proposals). Transport failures become
//! `Unreachable` so openraft backs off instead of spinning.
//!
//! [`LinkFilter`] lets tests cut links between nodes (a partition) without
//! touching sockets: a blocked link fails like an unreachable peer.
//!
//! # Why a second error type
//!
//! [`CallError`] is the outcome of one peer call at the transport level,
//! the node crate's one error type besides [`crate::Error`]. This module
//! maps it onto openraft's network errors (`Unreachable` makes openraft back
//! off, an error status is a `NetworkError`), and `Core` maps it onto
//! [`crate::Error`] (`Unavailable`); keeping the peer id and the raw
//! status until then lets each side choose its own meaning.

// openraft's RPC error types are large and fixed by its traits.
#![allow(clippy::result_large_err)]

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::BasicNode;
use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use rim_cluster::LinkTls;
use rim_proto::ids::{NodeId, ShardId};
use rim_proto::metadata::CLUSTER_SECRET_METADATA_KEY;
use rim_proto::v1::raft_service_client::RaftServiceClient;
use rim_proto::v1::{RaftReply, RaftRequest, SnapshotChunk};
use rim_raft_store::TypeConfig;
use tonic::transport::Channel;

/// Largest Raft RPC message, both directions. An `AppendEntries` carries at
/// most `max_payload_entries` entries of at most `MAX_ENTRY_BYTES` each (see
/// `group.rs` and `node.rs`), far below this; tonic's default of 4 MiB was
/// not, and a follower refused such a batch on every retry.
pub const RAFT_MESSAGE_LIMIT: usize = 64 << 20;

/// Most entry bytes sent in one `AppendEntries` (at least one entry is
/// always sent; entries are at most `MAX_ENTRY_BYTES`). openraft times an
/// `AppendEntries` out after one heartbeat interval whatever its size, and a
/// batch that a loaded follower cannot take and fsync in that time was
/// retried, whole, for ever.
pub const APPEND_BUDGET: usize = 512 << 10;

/// Decides whether the link `from → to` is cut (tests only).
pub type LinkFilter = Arc<dyn Fn(u64, u64) -> bool + Send + Sync>;

/// Connections to peer nodes, shared by all groups of this node.
#[derive(Clone)]
pub struct Peers {
    inner: Arc<PeersInner>,
}

struct PeersInner {
    me: u64,
    secret: String,
    channels: Mutex<HashMap<String, Channel>>,
    filter: Option<LinkFilter>,
    /// Per-peer dial addresses overriding the cluster's (`peer_via`).
    via: BTreeMap<u64, String>,
    /// TLS of every peer link (`None`: plaintext).
    tls: Option<LinkTls>,
}

impl std::fmt::Debug for Peers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peers").field("me", &self.inner.me).finish()
    }
}

/// Why a call to a peer failed.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The link is cut, the peer is down or the call timed out.
    #[error("peer {0} unreachable: {1}")]
    Unreachable(NodeId, String),
    /// The peer answered with an error status.
    #[error("peer {0} refused: {1}")]
    Status(NodeId, tonic::Status),
}

impl Peers {
    /// Connections from node `me`, authenticated with `secret`; peer `id`
    /// is dialled at `via[id]` when present (see `NodeConfig::peer_via`),
    /// else at the address the caller got from the cluster; over TLS when
    /// `tls` is set.
    pub fn new(
        me: NodeId,
        secret: String,
        filter: Option<LinkFilter>,
        via: BTreeMap<NodeId, String>,
        tls: Option<LinkTls>,
    ) -> Peers {
        let channels = Mutex::new(HashMap::new());
        Peers { inner: Arc::new(PeersInner { me, secret, channels, filter, via, tls }) }
    }

    /// TLS of the peer links, if any.
    pub fn tls(&self) -> Option<&LinkTls> {
        self.inner.tls.as_ref()
    }

    /// This node's id.
    pub fn me(&self) -> u64 {
        self.inner.me
    }

    /// Whether the link to `to` is usable (not cut by a test filter).
    pub fn link_up(&self, to: NodeId) -> bool {
        self.inner.filter.as_ref().is_none_or(|f| !f(self.inner.me, to))
    }

    fn channel(&self, addr: &str) -> Result<Channel, String> {
        let mut map = self.inner.channels.lock().expect("peer map lock");
        if let Some(c) = map.get(addr) {
            return Ok(c.clone());
        }
        let ep = rim_cluster::tls::endpoint(addr, self.inner.tls.as_ref())
            .map_err(|e| e.to_string())?
            .connect_timeout(Duration::from_millis(500))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10));
        let ch = ep.connect_lazy();
        map.insert(addr.to_string(), ch.clone());
        Ok(ch)
    }

    /// A Raft-service client for the node at `addr`.
    pub fn raft_client(&self, addr: &str) -> Result<RaftServiceClient<Channel>, String> {
        Ok(RaftServiceClient::new(self.channel(addr)?)
            .max_decoding_message_size(RAFT_MESSAGE_LIMIT)
            .max_encoding_message_size(RAFT_MESSAGE_LIMIT))
    }

    /// A request carrying the secret and a deadline.
    pub fn request<T>(&self, msg: T, timeout: Duration) -> tonic::Request<T> {
        let mut req = tonic::Request::new(msg);
        req.set_timeout(timeout);
        if let Ok(v) = self.inner.secret.parse() {
            req.metadata_mut().insert(CLUSTER_SECRET_METADATA_KEY, v);
        }
        req
    }

    /// Sends `req` to node `to` at `addr` (or at its `peer_via` address)
    /// with `call`, honouring cut links.
    pub async fn call<F, Fut>(
        &self,
        to: u64,
        addr: &str,
        timeout: Duration,
        call: F,
    ) -> Result<RaftReply, CallError>
    where
        F: FnOnce(RaftServiceClient<Channel>, Duration) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<RaftReply>, tonic::Status>>,
    {
        if !self.link_up(to) {
            return Err(CallError::Unreachable(to, "link cut".into()));
        }
        let addr = self.inner.via.get(&to).map_or(addr, String::as_str);
        let client = self.raft_client(addr).map_err(|e| CallError::Unreachable(to, e))?;
        let t0 = std::time::Instant::now();
        let res = tokio::time::timeout(timeout, call(client, timeout)).await;
        metrics::histogram!("rim_peer_rpc_seconds").record(t0.elapsed().as_secs_f64());
        match res {
            Err(_) => Err(CallError::Unreachable(to, format!("no answer within {timeout:?}"))),
            Ok(Err(s)) if matches!(s.code(), tonic::Code::Unavailable | tonic::Code::DeadlineExceeded) => {
                Err(CallError::Unreachable(to, s.message().to_string()))
            }
            Ok(Err(s)) => Err(CallError::Status(to, s)),
            Ok(Ok(r)) => Ok(r.into_inner()),
        }
    }
}

/// Creates per-target network clients for one group.
#[derive(Clone, Debug)]
pub struct GroupNetwork {
    /// The group.
    pub group: ShardId,
    /// Shared connections.
    pub peers: Peers,
}

impl RaftNetworkFactory<TypeConfig> for GroupNetwork {
    type Network = PeerLink;

    async fn new_client(&mut self, target: u64, node: &BasicNode) -> PeerLink {
        PeerLink { target, addr: node.addr.clone(), group: self.group, peers: self.peers.clone() }
    }
}

/// The Raft client of one group towards one peer.
#[derive(Debug)]
pub struct PeerLink {
    target: u64,
    addr: String,
    group: ShardId,
    peers: Peers,
}

type RpcErr<E> = RPCError<u64, BasicNode, RaftError<u64, E>>;

impl PeerLink {
    fn request(&self, payload: Vec<u8>) -> RaftRequest {
        RaftRequest {
            group_id: self.group.0,
            payload: payload.into(),
            target_node_id: self.target,
            from_node_id: self.peers.me(),
        }
    }

    /// Decodes a reply of `Result<R, RaftError<E>>`.
    fn decode<R, E>(&self, reply: Result<RaftReply, CallError>) -> Result<R, RpcErr<E>>
    where
        R: serde::de::DeserializeOwned,
        E: std::error::Error + serde::de::DeserializeOwned,
    {
        let reply = match reply {
            Ok(r) => r,
            Err(e @ CallError::Unreachable(..)) => return Err(RPCError::Unreachable(Unreachable::new(&e))),
            Err(e @ CallError::Status(..)) => return Err(RPCError::Network(NetworkError::new(&e))),
        };
        if reply.code != 0 {
            let e =
                std::io::Error::other(format!("peer {}: code {} {}", self.target, reply.code, reply.message));
            return Err(RPCError::Unreachable(Unreachable::new(&e)));
        }
        let res: Result<R, RaftError<u64, E>> =
            postcard::from_bytes(&reply.payload).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        res.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }

    fn encode<T: serde::Serialize, E: std::error::Error>(&self, t: &T) -> Result<Vec<u8>, RpcErr<E>> {
        postcard::to_allocvec(t).map_err(|e| RPCError::Network(NetworkError::new(&e)))
    }
}

/// The application bytes of an entry (what dominates its encoded size).
fn entry_bytes(e: &rim_raft_store::raft::Entry) -> usize {
    match &e.payload {
        openraft::EntryPayload::Normal(r) => prost::Message::encoded_len(&r.0),
        _ => 64,
    }
}

/// Keeps the longest prefix of `entries` within [`APPEND_BUDGET`] bytes (at
/// least one entry); returns the log id of the last one kept if any were
/// dropped.
fn fit_append(entries: &mut Vec<rim_raft_store::raft::Entry>) -> Option<openraft::LogId<u64>> {
    let mut bytes = 0;
    let keep = entries
        .iter()
        .position(|e| {
            bytes += entry_bytes(e);
            bytes > APPEND_BUDGET
        })
        .map_or(entries.len(), |over| over.max(1));
    if keep >= entries.len() {
        return None;
    }
    entries.truncate(keep);
    entries.last().map(|e| e.log_id)
}

impl RaftNetwork<TypeConfig> for PeerLink {
    async fn append_entries(
        &mut self,
        mut rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<u64>, RpcErr<openraft::error::Infallible>> {
        // openraft gives every AppendEntries one heartbeat interval, however
        // many bytes it carries: send a prefix that fits, and report it as a
        // partial success so openraft sends the rest next.
        let sent_up_to = fit_append(&mut rpc.entries);
        let req = self.request(self.encode(&rpc)?);
        let msg = self.peers.request(req, option.hard_ttl());
        let reply = self
            .peers
            .call(self.target, &self.addr, option.hard_ttl(), |mut c, _| async move { c.append(msg).await })
            .await;
        match (self.decode(reply)?, sent_up_to) {
            (AppendEntriesResponse::Success, Some(last)) => {
                Ok(AppendEntriesResponse::PartialSuccess(Some(last)))
            }
            (other, _) => Ok(other),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<u64>, RpcErr<InstallSnapshotError>> {
        let chunk = SnapshotChunk {
            group_id: self.group.0,
            header: self.encode(&rpc)?.into(),
            offset: rpc.offset,
            payload: Default::default(),
            done: rpc.done,
            target_node_id: self.target,
            from_node_id: self.peers.me(),
        };
        let msg = self.peers.request(tokio_stream::iter(vec![chunk]), option.hard_ttl());
        let reply = self
            .peers
            .call(self.target, &self.addr, option.hard_ttl(), |mut c, _| async move { c.snapshot(msg).await })
            .await;
        self.decode(reply)
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<u64>,
        option: RPCOption,
    ) -> Result<VoteResponse<u64>, RpcErr<openraft::error::Infallible>> {
        let req = self.request(self.encode(&rpc)?);
        let msg = self.peers.request(req, option.hard_ttl());
        let reply = self
            .peers
            .call(self.target, &self.addr, option.hard_ttl(), |mut c, _| async move { c.vote(msg).await })
            .await;
        self.decode(reply)
    }
}

#[cfg(test)]
mod tests {
    use openraft::{CommittedLeaderId, EntryPayload, LogId};
    use rim_proto::store::{self, Proposal, op::Op as O};
    use rim_raft_store::Request;
    use rim_raft_store::raft::Entry;

    use super::*;

    /// An entry at `index` whose application payload is about `bytes` long.
    fn entry(index: u64, bytes: usize) -> Entry {
        let push = store::PushToUsers { content: vec![0u8; bytes].into(), ..Default::default() };
        let proposal = Proposal { now_ms: 1, ops: vec![store::Op { op: Some(O::PushToUsers(push)) }] };
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Normal(Request(proposal)),
        }
    }

    #[test]
    fn appends_are_cut_to_the_byte_budget_keeping_at_least_one_entry() {
        let quarter = APPEND_BUDGET / 4;
        let mut small: Vec<Entry> = (1..=3).map(|i| entry(i, quarter)).collect();
        assert_eq!(fit_append(&mut small), None, "within the budget: all of it");
        assert_eq!(small.len(), 3);

        let mut big: Vec<Entry> = (1..=8).map(|i| entry(i, quarter)).collect();
        let last = fit_append(&mut big).expect("cut");
        assert_eq!(big.len(), 3, "three quarters and a bit fit, the fourth does not");
        assert_eq!(last.index, 3);
        assert!(big.iter().map(entry_bytes).sum::<usize>() <= APPEND_BUDGET);

        let mut huge = vec![entry(1, 2 * APPEND_BUDGET), entry(2, 10)];
        assert_eq!(fit_append(&mut huge).map(|l| l.index), Some(1), "one entry even above the budget");
        assert_eq!(huge.len(), 1);

        let mut none: Vec<Entry> = Vec::new();
        assert_eq!(fit_append(&mut none), None);
    }
}
