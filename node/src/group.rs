//! One Raft group hosted by this node, and its proposal batcher.
//!
//! # Group commit at the proposal layer
//!
//! Every write to a group goes through its proposer: a bounded queue
//! drained by one task that packs whatever is waiting (up to
//! `max_batch_ops` operations and [`MAX_ENTRY_BYTES`]) into one Raft entry.
//! At most `max_inflight_proposals` entries are in flight; while they are,
//! new operations accumulate, so under load batches grow and one fsync
//! round commits many messages. Idle, a lone operation is proposed at once.
//! Entries are handed to openraft in queue order, so operations keep their
//! submission order in the log.
//!
//! The outbox relay's operations (`Deliver`, `AckOutbox`) have a queue of
//! their own that the proposer drains first: they carry messages already
//! acknowledged to their senders, and behind a full client queue their
//! latency (the delivery latency of every cross-shard message) grew with
//! the client load while the relay backlog grew without bound. Order is
//! kept within each queue; the two carry unrelated operations.
//!
//! # Limits
//!
//! A leader accepts client operations only once its replica applied the
//! cluster's limits (a `SetLimits`, see `crate::limits`); until then it
//! answers `Unavailable`, which the router retries. The `SetLimits` entry
//! then precedes every client operation in the log, so none applies with
//! the built-in defaults a group holding no limits falls back to. The
//! relay's and the meta group's operations are never held back.
//!
//! # Reads
//!
//! [`Group::read_index`] is openraft's read index on the leader: it confirms
//! leadership with a quorum and waits until the leader applied everything
//! committed before the read. A follower can use the returned index as a
//! barrier ([`Group::wait_applied`]) and then read its own replica; the read
//! is still linearizable.
//!
//! # Sabotage
//!
//! With `ack_before_commit` (test-only, see `Sabotage`), a send is answered
//! as soon as it is queued for Raft, with a seq and message id predicted from
//! the local replica; the real entry may never commit.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use openraft::error::{CheckIsLeaderError, ClientWriteError, RaftError};
use openraft::{BasicNode, Raft};
use rim_proto::ids::NodeId;
use rim_proto::store::{self, Op, OpResult, Proposal, op::Op as O};
use rim_proto::v1::OnlinePush;
use rim_raft_store::{
    AppliedEvent, ApplySabotage, Db, GroupId, MessageId, Reader, Request, ShardId, TypeConfig, UserId,
};
use tokio::sync::{Semaphore, broadcast, mpsc, oneshot};

use crate::error::{Error, Result};
use crate::net::{GroupNetwork, Peers};

/// Capacity of a group's proposal queue; beyond it writes get `ERROR_BUSY`.
const PROPOSAL_QUEUE: usize = 16_384;
/// Most encoded bytes of operations packed into one Raft entry (an entry
/// may exceed it by its last operation, itself bounded by the content
/// limits): keeps `AppendEntries` small, see `node.rs`.
pub const MAX_ENTRY_BYTES: usize = 256 << 10;
/// Capacity of a group's relay queue (its relay has a few operations in
/// flight at a time; forwarded ones from other nodes' relays add a few).
const INTERNAL_QUEUE: usize = 1_024;
/// Capacity of a group's applied-effects channel.
const EVENT_CHANNEL: usize = 4_096;
/// Capacity of a group's online-push channel (a push stream that falls this
/// far behind misses online-only pushes; they are never stored).
const ONLINE_CHANNEL: usize = 1_024;

/// Tuning of a group's proposer.
#[derive(Clone, Copy, Debug)]
pub struct ProposerOptions {
    /// Most operations per Raft entry.
    pub max_batch_ops: usize,
    /// Most entries in flight.
    pub max_inflight: usize,
    /// Sabotage (tests only): answer sends before they commit.
    pub ack_before_commit: bool,
}

/// State of the `ack_before_commit` sabotage: the last values handed out, so
/// that predictions keep growing while the real entries are in flight.
#[derive(Debug, Default)]
struct Predictions {
    /// Last predicted message counter of the shard.
    message: u64,
    /// Last predicted seq per list: `(false, user)` or `(true, group)`.
    seqs: HashMap<(bool, u64), u64>,
}

type Reply = oneshot::Sender<Result<OpResult>>;

/// A Raft group on this node.
pub struct Group {
    /// The group (0 = meta group).
    pub shard: ShardId,
    /// The openraft instance.
    pub raft: Raft<TypeConfig>,
    /// Reads of the local replica's state.
    pub reader: Reader,
    /// Effects of applied entries (push hub, relay).
    pub events: broadcast::Sender<Arc<AppliedEvent>>,
    /// Online-only pushes for this group's push streams (only the leader
    /// sends on it; see [`Group::push_online`]).
    pub online: broadcast::Sender<Arc<OnlinePush>>,
    proposals: mpsc::Sender<(Op, Reply)>,
    /// The relay's operations, proposed before the client queue's.
    internal: mpsc::Sender<(Op, Reply)>,
    /// `Some` only with the `ack_before_commit` sabotage.
    early_acks: Option<Mutex<Predictions>>,
    /// Set once this replica was seen to hold limits (never removed).
    limits_applied: AtomicBool,
    /// Gateway instances' push streams open here (the leader's view of
    /// which gateways are alive, `crate::sessions`).
    pub gateways: crate::sessions::Gateways,
    /// The proposer holds a read guard while it hands a batch to Raft; a
    /// leader transfer (`crate::transfer`) holds the write guard, so no new
    /// entry is appended while the target catches up and campaigns.
    pub(crate) fence: Arc<tokio::sync::RwLock<()>>,
}

impl std::fmt::Debug for Group {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Group").field("shard", &self.shard).finish()
    }
}

/// Milliseconds since the Unix epoch (the proposer's clock).
pub fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

impl Group {
    /// Opens the group's storage and starts its Raft instance and proposer.
    pub async fn start(
        node_id: u64,
        db: &Db,
        shard: ShardId,
        sabotage: ApplySabotage,
        config: Arc<openraft::Config>,
        peers: Peers,
        opts: ProposerOptions,
    ) -> Result<Arc<Group>> {
        let (events, _) = broadcast::channel(EVENT_CHANNEL);
        let (log, sm) = rim_raft_store::open_shard(db, shard, sabotage)?;
        let reader = sm.reader();
        let sm = sm.with_events(events.clone());
        let network = GroupNetwork { group: shard, peers };
        let raft = Raft::new(node_id, config, network, log, sm)
            .await
            .map_err(|e| Error::Internal(format!("starting group {shard}: {e}")))?;
        let (tx, rx) = mpsc::channel(PROPOSAL_QUEUE);
        let (itx, irx) = mpsc::channel(INTERNAL_QUEUE);
        let fence = Arc::new(tokio::sync::RwLock::new(()));
        let queues = Queues { internal: irx, clients: rx };
        tokio::spawn(run_proposer(raft.clone(), queues, opts, shard, fence.clone()));
        let early_acks = opts.ack_before_commit.then(Mutex::default);
        let (online, _) = broadcast::channel(ONLINE_CHANNEL);
        Ok(Arc::new(Group {
            shard,
            raft,
            reader,
            events,
            online,
            proposals: tx,
            internal: itx,
            early_acks,
            limits_applied: AtomicBool::new(false),
            gateways: crate::sessions::Gateways::default(),
            fence,
        }))
    }

    /// This node's id in the group.
    pub fn raft_id(&self) -> NodeId {
        self.raft.metrics().borrow().id
    }

    /// Whether this replica is the leader.
    pub fn is_leader(&self) -> bool {
        self.leader() == Some(self.raft_id())
    }

    /// The current leader as this replica knows it.
    pub fn leader(&self) -> Option<NodeId> {
        self.raft.metrics().borrow().current_leader
    }

    /// `NotLeader` naming this replica's idea of the leader and its address.
    pub fn not_leader(&self) -> Error {
        let leader = self.leader();
        Error::NotLeader { shard: self.shard, leader, addr: leader.and_then(|l| self.member_addr(l)) }
    }

    /// The internal address of a member of this group.
    pub fn member_addr(&self, node: NodeId) -> Option<String> {
        let m = self.raft.metrics().borrow().membership_config.clone();
        m.membership().get_node(&node).map(|n: &BasicNode| n.addr.clone())
    }

    /// Proposes one operation; resolves when it is committed and applied.
    ///
    /// A follower refuses with `NotLeader` before submitting anything. Once
    /// submitted, a lost leadership also reports `NotLeader`, although the
    /// entry may still commit: every operation is therefore idempotent under
    /// retry (sends by client_msg_id, deliveries by message id, ...).
    pub async fn propose(&self, op: Op, timeout: Duration) -> Result<OpResult> {
        if self.leader() != Some(self.raft_id()) {
            return Err(self.not_leader());
        }
        if !rim_raft_store::im::is_cluster_op(&op) && !self.has_limits() {
            return Err(Error::Unavailable(format!(
                "group {} has not applied the cluster's limits yet",
                self.shard
            )));
        }
        let (tx, rx) = oneshot::channel();
        let early = match &self.early_acks {
            None => None,
            Some(p) => self.predict(p, &op)?,
        };
        let queue = match &op.op {
            Some(O::Deliver(_) | O::AckOutbox(_)) => &self.internal,
            _ => &self.proposals,
        };
        queue.try_send((op, tx)).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => {
                Error::rejected(rim_proto::ErrorCode::ErrorBusy, "proposal queue full")
            }
            mpsc::error::TrySendError::Closed(_) => {
                Error::Unavailable(format!("group {} stopped", self.shard))
            }
        })?;
        if let Some(r) = early {
            // Sabotage: answered before the entry commits (or even reaches Raft).
            return Ok(r);
        }
        match tokio::time::timeout(timeout, rx).await {
            Err(_) => Err(Error::Timeout(format!("group {} did not commit within {timeout:?}", self.shard))),
            Ok(Err(_)) => Err(Error::Unavailable(format!("group {} stopped", self.shard))),
            Ok(Ok(r)) => r,
        }
    }

    /// Whether this replica applies with limits the log set (see the module
    /// docs); a read of the local state until the first yes.
    pub fn has_limits(&self) -> bool {
        if self.limits_applied.load(Ordering::Relaxed) {
            return true;
        }
        let applied = self.reader.limits().is_ok_and(|l| l.is_some());
        if applied {
            self.limits_applied.store(true, Ordering::Relaxed);
        }
        applied
    }

    /// The `ack_before_commit` sabotage: a plausible result for a send,
    /// predicted from the local replica's heads and counters (`None`: not a
    /// send, answered normally).
    fn predict(&self, p: &Mutex<Predictions>, op: &Op) -> Result<Option<OpResult>> {
        let (list, head) = match &op.op {
            Some(O::SendToUser(s)) => {
                ((false, s.sender_user_id), self.reader.user_head(UserId(s.sender_user_id))?.last_seq)
            }
            Some(O::SendToGroup(s)) => {
                ((true, s.group_id), self.reader.group_head(GroupId(s.group_id))?.last_seq)
            }
            _ => return Ok(None),
        };
        let counter = self.reader.counters()?.next_message;
        let mut p = p.lock().expect("predictions lock");
        p.message = p.message.max(counter) + 1;
        let message_id = MessageId::compose(self.shard, p.message).0;
        let last = p.seqs.entry(list).or_default();
        *last = (*last).max(head) + 1;
        let seq = *last;
        let sent = store::SendResult {
            seq: if list.0 { 0 } else { seq },
            message_id,
            send_time_ms: now_ms(),
            group_seq: if list.0 { seq } else { 0 },
            request_digest: Default::default(),
        };
        Ok(Some(OpResult {
            code: rim_proto::ErrorCode::Ok as i32,
            value: Some(store::op_result::Value::Sent(sent)),
            ..Default::default()
        }))
    }

    /// Hands an online-only push to this group's push streams; returns how
    /// many streams were listening. Only the leader serves push streams, so
    /// a follower refuses with `NotLeader`. Nothing is stored.
    pub fn push_online(&self, push: Arc<OnlinePush>) -> Result<usize> {
        if !self.is_leader() {
            return Err(self.not_leader());
        }
        // No receiver: nobody of this shard is online here; not an error.
        Ok(self.online.send(push).unwrap_or(0))
    }

    /// Confirms leadership and returns the index reads must wait for.
    pub async fn read_index(&self, timeout: Duration) -> Result<u64> {
        let res = tokio::time::timeout(timeout, self.raft.ensure_linearizable())
            .await
            .map_err(|_| Error::Timeout(format!("read index of group {}", self.shard)))?;
        match res {
            Ok(log_id) => Ok(log_id.map(|l| l.index).unwrap_or(0)),
            Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f))) => Err(Error::NotLeader {
                shard: self.shard,
                leader: f.leader_id,
                addr: f.leader_node.map(|n| n.addr),
            }),
            Err(e) => Err(Error::Unavailable(e.to_string())),
        }
    }

    /// Waits until this replica applied `index`.
    pub async fn wait_applied(&self, index: u64, timeout: Duration) -> Result<()> {
        self.raft
            .wait(Some(timeout))
            .applied_index_at_least(Some(index), "read barrier")
            .await
            .map(|_| ())
            .map_err(|e| Error::Timeout(format!("group {} applying up to {index}: {e}", self.shard)))
    }
}

/// Drains the proposal queue into Raft entries (see the module doc).
/// A proposer's two queues (see the module doc).
struct Queues {
    internal: mpsc::Receiver<(Op, Reply)>,
    clients: mpsc::Receiver<(Op, Reply)>,
}

impl Queues {
    /// The next operation, the relay's first; `None` once both are closed.
    async fn recv(&mut self) -> Option<(Op, Reply)> {
        tokio::select! {
            biased;
            Some(x) = self.internal.recv() => Some(x),
            Some(x) = self.clients.recv() => Some(x),
            else => None,
        }
    }

    /// A waiting operation, the relay's first.
    fn try_recv(&mut self) -> Option<(Op, Reply)> {
        self.internal.try_recv().or_else(|_| self.clients.try_recv()).ok()
    }
}

async fn run_proposer(
    raft: Raft<TypeConfig>,
    mut queues: Queues,
    opts: ProposerOptions,
    shard: ShardId,
    fence: Arc<tokio::sync::RwLock<()>>,
) {
    let inflight = Arc::new(Semaphore::new(opts.max_inflight));
    while let Some(first) = queues.recv().await {
        // Wait for capacity first: operations arriving meanwhile join this batch.
        let Ok(permit) = inflight.clone().acquire_owned().await else { return };
        let mut bytes = prost::Message::encoded_len(&first.0);
        let mut ops = vec![first.0];
        let mut replies = vec![first.1];
        while ops.len() < opts.max_batch_ops && bytes < MAX_ENTRY_BYTES {
            match queues.try_recv() {
                Some((op, reply)) => {
                    bytes += prost::Message::encoded_len(&op);
                    ops.push(op);
                    replies.push(reply);
                }
                None => break,
            }
        }
        metrics::counter!("rim_proposals_total").increment(1);
        metrics::histogram!("rim_proposal_batch_ops").record(ops.len() as f64);
        // Held until the batch is in Raft's queue: a leader transfer waits
        // for it, and no batch is handed over while a transfer holds it.
        let fenced = fence.read().await;
        let proposal = Proposal { now_ms: now_ms(), ops };
        let submitted = raft.client_write_ff(Request(proposal)).await;
        drop(fenced);
        match submitted {
            Err(fatal) => {
                for r in replies {
                    let _ = r.send(Err(Error::Unavailable(format!("raft stopped: {fatal}"))));
                }
            }
            Ok(done) => {
                tokio::spawn(async move {
                    let _permit = permit;
                    let outcome = done.await;
                    match outcome {
                        Ok(Ok(resp)) => {
                            metrics::counter!("rim_commits_total").increment(1);
                            let mut results = resp.data.0.results.into_iter();
                            for r in replies {
                                let res =
                                    results.next().ok_or_else(|| Error::Internal("missing op result".into()));
                                let _ = r.send(res);
                            }
                        }
                        Ok(Err(ClientWriteError::ForwardToLeader(f))) => {
                            for r in replies {
                                let _ = r.send(Err(Error::NotLeader {
                                    shard,
                                    leader: f.leader_id,
                                    addr: f.leader_node.clone().map(|n| n.addr),
                                }));
                            }
                        }
                        Ok(Err(e)) => {
                            for r in replies {
                                let _ = r.send(Err(Error::Internal(e.to_string())));
                            }
                        }
                        Err(_) => {
                            for r in replies {
                                let _ = r.send(Err(Error::Unavailable("raft dropped the proposal".into())));
                            }
                        }
                    }
                });
            }
        }
    }
}
