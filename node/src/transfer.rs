//! Leader transfer: moves the leadership of one group to a named voter
//! (`AdminService.TransferLeader`, `rim admin transfer-leader`, and the
//! leader balancer, `crate::balance`).
//!
//! # Why not just elect
//!
//! openraft 0.9 has no transfer API. A voter refuses a vote request while
//! its *leader lease* holds: its vote is committed and it heard from the
//! leader less than `election_max_ms` ago. A target that simply campaigns
//! is therefore refused by every follower, and its higher term then makes
//! the old leader step down when it next replicates to it: a disruption
//! worth an election timeout and more, not a transfer.
//!
//! # The approach: the old leader votes for the target
//!
//! The lease check reads the time the *receiver's own* vote last changed
//! or was touched. A follower's vote is touched by every heartbeat, but the
//! leader's own vote only changes when it is elected: a leader that has led
//! for longer than the lease no longer protects itself, and grants a vote
//! request of a higher term whose last log id is at least its own. With
//! three voters (rim's replication factor) the target's own vote plus the
//! old leader's is a quorum, so the target wins in one vote round trip with
//! no one waiting out a lease. The steps, on the leader:
//!
//! 1. check the target: a voter of the group, not this node, reachable;
//! 2. wait until this node has led for longer than the lease (leadership
//!    times are recorded by [`watch`]; unknown counts as "just now");
//! 3. **fence** the group: take the write side of `Group::fence`, so the
//!    proposer hands no new batch to Raft (client operations queue up
//!    behind it; nothing is refused), then read the leader's last log index
//!    through Raft's own queue (every batch handed over before is in it);
//! 4. wait, within [`CATCH_UP`], until the target's matched index is that
//!    last index: its log is then at least the leader's, so the leader will
//!    grant its vote. A target that does not catch up fails the transfer
//!    here, before anything changed ("lagging");
//! 5. with more than three voters the old leader's vote is not enough: it
//!    stops its heartbeats for a lease, so the other followers' leases
//!    expire too (the write pause then includes one lease);
//! 6. ask the target to campaign (the internal `campaign` flag of
//!    `TransferLeader`), and wait, within [`TAKE_OVER`], until this node sees
//!    the target lead;
//! 7. lift the fence and restore heartbeats, whatever happened. The queued
//!    operations then reach Raft on a follower, are answered `NotLeader`
//!    with the new leader's hint, and the router retries them there.
//!
//! Writes pause from step 3 to the new leader's first commit: the catch-up
//! of entries already in flight, one vote round trip, the new leader's
//! blank entry, and the clients' redirect. Measured by `tests/transfer.rs`
//! on a loaded 2-core machine: 11-35 ms between two acknowledged sends,
//! against 0.8-1.6 s for an election (docs/operations.md, section 5b).
//!
//! # Safety
//!
//! Nothing here bypasses Raft's rules: the target wins an ordinary election
//! with votes granted by ordinary vote handling, so at most one leader per
//! term and the log-matching properties hold as ever. The fence only delays
//! proposals. The risk is liveness: a campaign that fails (a target that
//! died between step 4 and 6) still raises its term, and the old leader
//! steps down when it sees it; the group then elects a leader normally, as
//! after any crash. A transfer reports that as an error naming the leader.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use rim_proto::ErrorCode;
use rim_proto::ids::{NodeId, ShardId};
use rim_proto::v1::TransferLeaderRequest;
use rim_proto::v1::admin_service_client::AdminServiceClient;

use crate::core::Core;
use crate::error::{Error, Result};
use crate::group::Group;

/// How long the target has to reach the leader's last index once the group
/// is fenced (the pause this can add is bounded by it).
pub const CATCH_UP: Duration = Duration::from_secs(2);
/// How long the target has to win once asked to campaign.
pub const TAKE_OVER: Duration = Duration::from_secs(3);
/// Margin added to the lease before the old leader is relied on to vote.
const LEASE_MARGIN: Duration = Duration::from_millis(50);

/// When this process's node `(node, shard)` became leader, and in which term.
type Since = HashMap<(NodeId, ShardId), (u64, Instant)>;

fn since() -> &'static Mutex<Since> {
    static SINCE: OnceLock<Mutex<Since>> = OnceLock::new();
    SINCE.get_or_init(Mutex::default)
}

/// Records, for the life of the node, when it becomes leader of `g`: a
/// transfer waits until the old leader's own lease is over (module doc).
pub async fn watch(node: NodeId, g: Arc<Group>) {
    let mut rx = g.raft.metrics();
    loop {
        {
            let m = rx.borrow_and_update();
            let key = (node, g.shard);
            let mut map = since().lock().expect("since lock");
            if m.current_leader == Some(m.id) {
                let term = m.current_term;
                if map.get(&key).is_none_or(|(t, _)| *t != term) {
                    map.insert(key, (term, Instant::now()));
                }
            } else {
                map.remove(&key);
            }
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}

/// When this node's current leadership of `g` began (now if unknown).
fn leading_since(node: NodeId, g: &Group) -> Instant {
    let term = g.raft.metrics().borrow().current_term;
    match since().lock().expect("since lock").get(&(node, g.shard)) {
        Some((t, at)) if *t == term => *at,
        _ => Instant::now(),
    }
}

/// Moves the leadership of `shard` to `to` (0: the most caught-up other
/// voter); returns the leader afterwards. Run on a node that does not lead
/// the group, the request goes to the leader it knows (once: `forwarded`).
pub async fn transfer(core: &Core, shard: ShardId, to: NodeId, forwarded: bool) -> Result<NodeId> {
    match core.group(shard) {
        Some(g) if g.is_leader() => lead_transfer(core, &g, to).await,
        local if !forwarded => {
            // The leader this node knows, else every voter of the map in turn.
            let mut candidates: Vec<NodeId> = local.and_then(|g| g.leader()).into_iter().collect();
            if let Ok(p) = core.placement() {
                for n in p.replicas_of(shard) {
                    if !candidates.contains(&n) {
                        candidates.push(n);
                    }
                }
            }
            let mut last = Error::Unavailable(format!("group {shard} has no known leader"));
            for node in candidates.into_iter().filter(|n| *n != core.id()) {
                let req = TransferLeaderRequest {
                    group_id: shard.0,
                    to_node_id: to,
                    campaign: false,
                    forwarded: true,
                };
                match admin_call(core, shard, node, req, CATCH_UP + TAKE_OVER + core.timeout).await {
                    Ok(leader) => return Ok(leader),
                    Err(e @ Error::NotLeader { .. }) => last = e,
                    Err(e) => return Err(e),
                }
            }
            Err(last)
        }
        Some(g) => Err(g.not_leader()),
        None => Err(Error::NotLeader { shard, leader: None, addr: None }),
    }
}

/// Starts an election of `shard` on this node now (the `campaign` request a
/// leader sends its target). Refused unless this node is a follower voter.
pub async fn campaign(core: &Core, shard: ShardId) -> Result<()> {
    let g = core
        .group(shard)
        .ok_or_else(|| Error::Unavailable(format!("group {shard} is not hosted on node {}", core.id())))?;
    let m = g.raft.metrics().borrow().clone();
    if !m.membership_config.membership().voter_ids().any(|v| v == m.id) {
        return Err(bad(format!("node {} is not a voter of group {shard}", m.id)));
    }
    if m.current_leader == Some(m.id) {
        return Ok(());
    }
    tracing::info!(group = %shard, "campaigning at the leader's request (leader transfer)");
    g.raft.trigger().elect().await.map_err(|e| Error::Internal(format!("group {shard}: elect: {e}")))
}

/// The transfer on the group's leader (module doc, steps 1-7).
async fn lead_transfer(core: &Core, g: &Group, to: NodeId) -> Result<NodeId> {
    let shard = g.shard;
    let me = core.id();
    let m = g.raft.metrics().borrow().clone();
    let voters: Vec<NodeId> = m.membership_config.membership().voter_ids().collect();
    let matched = |m: &openraft::RaftMetrics<NodeId, openraft::BasicNode>, n: NodeId| {
        m.replication.as_ref().and_then(|r| r.get(&n).cloned().flatten()).map(|l| l.index)
    };
    let to = if to == 0 {
        // The most caught-up other voter whose link is up.
        voters
            .iter()
            .copied()
            .filter(|v| *v != me)
            .max_by_key(|v| (core.peers.link_up(*v), matched(&m, *v), std::cmp::Reverse(*v)))
            .ok_or_else(|| bad(format!("group {shard} has no other voter")))?
    } else {
        to
    };
    if to == me {
        return Ok(me);
    }
    if !voters.contains(&to) {
        return Err(bad(format!("node {to} is not a voter of group {shard} (voters {voters:?})")));
    }
    // Step 2: the old leader's own lease.
    let lease = Duration::from_millis(core.config.election_max_ms) + LEASE_MARGIN;
    let ready = leading_since(me, g) + lease;
    tokio::time::sleep_until(ready.into()).await;
    if !g.is_leader() {
        return Err(g.not_leader());
    }
    let started = Instant::now();
    // Step 3: fence, then the last index through Raft's queue.
    let fence = g.fence.write().await;
    let last = g
        .raft
        .with_raft_state(|s| last_index_of(&format!("{:?}", s.log_ids)))
        .await
        .map_err(|e| Error::Internal(format!("group {shard}: {e}")))?
        .unwrap_or_else(|| g.raft.metrics().borrow().last_log_index.unwrap_or(0));
    let many = voters.len() > 3;
    let outcome = async {
        // Step 4: the target catches up.
        let caught_up = g
            .raft
            .wait(Some(CATCH_UP))
            .metrics(|x| matched(x, to) >= Some(last) || x.current_leader != Some(me), "target caught up")
            .await;
        let now = g.raft.metrics().borrow().clone();
        if now.current_leader != Some(me) {
            return Err(g.not_leader());
        }
        if caught_up.is_err() {
            return Err(Error::Unavailable(format!(
                "group {shard}: node {to} is lagging or down: matched {:?} of the leader's {last} after {CATCH_UP:?}; \
                 node {me} still leads",
                matched(&now, to)
            )));
        }
        // Step 5: more than three voters: let the followers' leases run out.
        if many {
            g.raft.runtime_config().heartbeat(false);
            tokio::time::sleep(lease).await;
        }
        // Step 6: the target campaigns.
        let req = TransferLeaderRequest { group_id: shard.0, to_node_id: to, campaign: true, forwarded: true };
        admin_call(core, shard, to, req, core.timeout).await.map_err(|e| {
            Error::Unavailable(format!("group {shard}: node {to} did not campaign: {e}; node {me} still leads"))
        })?;
        let won = g
            .raft
            .wait(Some(TAKE_OVER))
            .metrics(|x| x.current_leader == Some(to), "target leads")
            .await;
        match won {
            Ok(_) => Ok(to),
            Err(_) => {
                let leader = g.leader();
                Err(Error::Unavailable(format!(
                    "group {shard}: node {to} did not take over within {TAKE_OVER:?}; leader now {leader:?}"
                )))
            }
        }
    }
    .await;
    // Step 7.
    if many {
        g.raft.runtime_config().heartbeat(true);
    }
    drop(fence);
    let took = started.elapsed();
    match &outcome {
        Ok(_) => {
            // Time from the fence to the target leading (not counting the
            // lease wait of step 2, during which writes flow).
            metrics::counter!("rim_leader_transfers_total", "outcome" => "ok").increment(1);
            metrics::histogram!("rim_leader_transfer_seconds").record(took.as_secs_f64());
            tracing::info!(group = %shard, from = me, to, ?took, "leadership transferred");
        }
        Err(e) => {
            metrics::counter!("rim_leader_transfers_total", "outcome" => "failed").increment(1);
            tracing::warn!(group = %shard, from = me, to, ?took, error = %e, "leader transfer failed");
        }
    }
    outcome
}

/// The last log index in the `Debug` text of openraft's `LogIdList`, whose
/// last id is the last log id (openraft 0.9 exposes it to no public API).
/// `None` if the text has no index (a format change: the caller falls back
/// to the metrics, which may lag by one Raft loop). A unit test pins it.
fn last_index_of(log_ids: &str) -> Option<u64> {
    let (_, tail) = log_ids.rsplit_once("index: ")?;
    tail.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
}

fn bad(msg: String) -> Error {
    Error::rejected(ErrorCode::ErrorBadRequest, msg)
}

/// One `AdminService.TransferLeader` call to node `node`.
async fn admin_call(
    core: &Core,
    shard: ShardId,
    node: NodeId,
    req: TransferLeaderRequest,
    timeout: Duration,
) -> Result<NodeId> {
    let addr = core
        .node_addr(shard, node)
        .ok_or_else(|| Error::Unavailable(format!("no address for node {node}")))?;
    let ch = rim_cluster::tls::endpoint(&addr, core.peers.tls())
        .map_err(|e| Error::Config(e.to_string()))?
        .connect_timeout(Duration::from_secs(1))
        .connect()
        .await
        .map_err(|e| Error::Unavailable(format!("node {node} at {addr} is unreachable: {e}")))?;
    let reply = AdminServiceClient::new(ch)
        .transfer_leader(core.peers.request(req, timeout))
        .await
        .map_err(|s| from_status(shard, s))?;
    Ok(reply.into_inner().leader_node_id)
}

/// A peer's refusal as an [`Error`], keeping "not the leader" recognisable.
fn from_status(shard: ShardId, s: tonic::Status) -> Error {
    match rim_proto::error::code_of_status(&s) {
        ErrorCode::ErrorNotLeader => Error::NotLeader { shard, leader: None, addr: None },
        ErrorCode::ErrorBadRequest => bad(s.message().to_string()),
        _ => Error::Unavailable(s.message().to_string()),
    }
}

#[cfg(test)]
mod tests {
    use openraft::{BasicNode, CommittedLeaderId, LogId, RaftState};

    use super::last_index_of;

    #[test]
    fn the_last_log_index_is_read_from_openraft_log_id_list() {
        // `LogIdList` cannot be built outside openraft: its derived `Debug`
        // around the real `LogId` `Debug`, and a real empty one.
        let id = |t, i| format!("{:?}", LogId::new(CommittedLeaderId::new(t, 1u64), i));
        let text = format!("LogIdList {{ key_log_ids: [{}, {}, {}] }}", id(1, 0), id(2, 17), id(2, 1234));
        assert_eq!(last_index_of(&text), Some(1234));
        let empty = RaftState::<u64, BasicNode, tokio::time::Instant>::default();
        assert_eq!(last_index_of(&format!("{:?}", empty.log_ids)), None);
    }
}
