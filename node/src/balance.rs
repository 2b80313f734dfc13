//! The leader balancer: spreads the data shards' leaders evenly over the
//! nodes hosting them, and moves leaders off nodes being removed.
//!
//! Elections put leaders wherever a node happened to campaign first; at
//! start-up that is often one node for every shard, which then serves every
//! write. The meta group's leader (one balancer in the cluster at a time,
//! and a new one simply continues: the balancer keeps no state but its
//! cool-down) looks every `[balance] interval_ms` at the shards' leaders and
//! voters and, when [`plan`] finds a move, runs one leader transfer
//! (`crate::transfer`), then waits `cooldown_ms` before the next move. Off
//! with `[balance] enabled = false` or `rim node --no-balance`.
//!
//! # Planning (a pure function, unit-tested)
//!
//! [`plan`] takes the current leaders, each shard's voters and the nodes to
//! avoid, and returns at most one move:
//!
//! 1. a shard led by a node to avoid moves to its least-loaded voter that is
//!    not avoided (the meta group too);
//! 2. otherwise the data shards even out: a shard moves from its leader to
//!    one of its voters leading at least two fewer shards (the most loaded
//!    leader first, to the least loaded voter). With every node hosting
//!    every shard this ends with each node leading ⌈S/N⌉ or ⌊S/N⌋ shards;
//!    each move lowers the sum of squared loads, so planning never cycles.
//!
//! The nodes to avoid are those the cluster map marks `LEAVING` ([`avoid`]):
//! the hook a drain command sets. Shards without a known leader are left
//! alone (an election is under way).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rim_proto::ids::{NodeId, ShardId};
use rim_proto::v1::admin_service_client::AdminServiceClient;
use rim_proto::v1::{ClusterStatusRequest, NodeState, ReplicaRole};

use crate::core::{Core, META};

/// One leader move.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Move {
    /// The group.
    pub shard: ShardId,
    /// Its current leader.
    pub from: NodeId,
    /// The voter that should lead it.
    pub to: NodeId,
}

/// What the balancer knows of the groups: each one's leader (if known) and
/// voters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct View {
    /// Leader per group, where one is known.
    pub leaders: BTreeMap<ShardId, NodeId>,
    /// Voters per group.
    pub voters: BTreeMap<ShardId, BTreeSet<NodeId>>,
}

/// At most one move towards balanced leaders away from `avoid` (module doc).
pub fn plan(view: &View, avoid: &BTreeSet<NodeId>) -> Option<Move> {
    // Load: data shards led per node, over every voter of a data shard.
    let mut load: BTreeMap<NodeId, usize> = BTreeMap::new();
    for (shard, voters) in &view.voters {
        if *shard != META {
            for v in voters {
                load.entry(*v).or_default();
            }
        }
    }
    for (shard, leader) in &view.leaders {
        if *shard != META {
            *load.entry(*leader).or_default() += 1;
        }
    }
    let load_of = |n: &NodeId| load.get(n).copied().unwrap_or(0);
    // 1. Away from the nodes to avoid.
    for (shard, leader) in &view.leaders {
        if !avoid.contains(leader) {
            continue;
        }
        let to = view
            .voters
            .get(shard)
            .into_iter()
            .flatten()
            .filter(|v| !avoid.contains(v) && *v != leader)
            .min_by_key(|v| (load_of(v), **v));
        if let Some(to) = to {
            return Some(Move { shard: *shard, from: *leader, to: *to });
        }
    }
    // 2. Even out the data shards: the biggest gap first.
    let mut best: Option<(usize, Move)> = None;
    for (shard, leader) in &view.leaders {
        if *shard == META {
            continue;
        }
        let from_load = load_of(leader);
        let to = view
            .voters
            .get(shard)
            .into_iter()
            .flatten()
            .filter(|v| !avoid.contains(v) && *v != leader)
            .min_by_key(|v| (load_of(v), **v));
        let Some(to) = to else { continue };
        let gap = from_load.saturating_sub(load_of(to));
        if gap >= 2 && best.as_ref().is_none_or(|(g, _)| gap > *g) {
            best = Some((gap, Move { shard: *shard, from: *leader, to: *to }));
        }
    }
    best.map(|(_, m)| m)
}

/// The nodes leaders should move away from: those the cluster map marks
/// `LEAVING` (being removed).
pub fn avoid(core: &Core) -> BTreeSet<NodeId> {
    let Ok(p) = core.placement() else { return BTreeSet::new() };
    p.nodes().iter().filter(|n| n.state == NodeState::Leaving as i32).map(|n| n.node_id).collect()
}

/// Runs for the life of the node: records this node's leaderships for
/// `crate::transfer` and, when enabled, balances while this node leads the
/// meta group.
pub async fn run(core: Arc<Core>) {
    let mut watchers = tokio::task::JoinSet::new();
    for g in core.all_groups() {
        watchers.spawn(crate::transfer::watch(core.id(), g));
    }
    let cfg = core.config.balance;
    if !cfg.enabled {
        core.stopped().await;
        return;
    }
    let cooldown = Duration::from_millis(cfg.cooldown_ms);
    let mut tick = tokio::time::interval(Duration::from_millis(cfg.interval_ms.max(10)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_move: Option<Instant> = None;
    loop {
        tick.tick().await;
        if !core.group(META).is_some_and(|g| g.is_leader()) {
            continue;
        }
        if last_move.is_some_and(|t| t.elapsed() < cooldown) {
            continue;
        }
        let view = gather(&core).await;
        let Some(mv) = plan(&view, &avoid(&core)) else { continue };
        last_move = Some(Instant::now());
        tracing::info!(group = %mv.shard, from = mv.from, to = mv.to, "balancing leaders");
        match crate::transfer::transfer(&core, mv.shard, mv.to, false).await {
            Ok(_) => metrics::counter!("rim_balance_moves_total").increment(1),
            Err(e) => tracing::warn!(group = %mv.shard, to = mv.to, error = %e, "balancing move failed"),
        }
    }
}

/// The leaders and voters of every group of the map: from this node's
/// groups, and for groups it does not host from the other nodes' status.
async fn gather(core: &Core) -> View {
    let mut view = View::default();
    for g in core.all_groups() {
        let m = g.raft.metrics().borrow().clone();
        view.voters.insert(g.shard, m.membership_config.membership().voter_ids().collect());
        if let Some(l) = m.current_leader {
            view.leaders.insert(g.shard, l);
        }
    }
    let Ok(p) = core.placement() else { return view };
    let missing: Vec<ShardId> =
        p.shards().iter().map(|s| ShardId(s.shard_id)).filter(|s| !view.voters.contains_key(s)).collect();
    if missing.is_empty() {
        return view;
    }
    for n in p.nodes().iter().filter(|n| n.node_id != core.id()) {
        let Ok(ch) = rim_cluster::tls::endpoint(&n.internal_addr, core.peers.tls()) else { continue };
        let Ok(ch) = ch.connect_timeout(Duration::from_secs(1)).connect().await else { continue };
        let req = core.peers.request(ClusterStatusRequest::default(), Duration::from_secs(2));
        let Ok(s) = AdminServiceClient::new(ch).cluster_status(req).await else { continue };
        for g in s.into_inner().groups {
            let shard = ShardId(g.group_id);
            if !missing.contains(&shard) || view.leaders.contains_key(&shard) {
                continue;
            }
            let voters = g.replicas.iter().filter(|r| r.role == ReplicaRole::Voter as i32).map(|r| r.node_id);
            view.voters.insert(shard, voters.collect());
            // Only a leader's own report counts (others may be stale).
            if g.leader_node_id == n.node_id {
                view.leaders.insert(shard, n.node_id);
            }
        }
    }
    view
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(leaders: &[(u32, u64)], voters: &[(u32, &[u64])]) -> View {
        View {
            leaders: leaders.iter().map(|(s, n)| (ShardId(*s), *n)).collect(),
            voters: voters.iter().map(|(s, v)| (ShardId(*s), v.iter().copied().collect())).collect(),
        }
    }

    fn all(shards: u32, nodes: &[u64]) -> Vec<(u32, &[u64])> {
        (0..=shards).map(|s| (s, nodes)).collect()
    }

    /// Applies plans until none is left; returns the loads and the moves.
    fn settle(mut v: View, avoid: &BTreeSet<NodeId>) -> (BTreeMap<NodeId, usize>, usize) {
        let mut moves = 0;
        while let Some(m) = plan(&v, avoid) {
            assert_eq!(v.leaders[&m.shard], m.from);
            assert!(v.voters[&m.shard].contains(&m.to), "{m:?} to a non-voter");
            v.leaders.insert(m.shard, m.to);
            moves += 1;
            assert!(moves < 100, "planning does not converge");
        }
        let mut load = BTreeMap::new();
        for (s, l) in &v.leaders {
            if *s != META {
                *load.entry(*l).or_insert(0) += 1;
            }
        }
        (load, moves)
    }

    #[test]
    fn balanced_leaders_stay() {
        let v = view(&[(0, 1), (1, 1), (2, 2), (3, 3)], &all(3, &[1, 2, 3]));
        assert_eq!(plan(&v, &BTreeSet::new()), None);
        // 4 shards over 3 nodes: 2/1/1 is as even as it gets.
        let v = view(&[(1, 1), (2, 2), (3, 3), (4, 1)], &all(4, &[1, 2, 3]));
        assert_eq!(plan(&v, &BTreeSet::new()), None);
    }

    #[test]
    fn one_node_leading_everything_spreads_out_one_move_at_a_time() {
        let v = view(&[(0, 1), (1, 1), (2, 1), (3, 1), (4, 1)], &all(4, &[1, 2, 3]));
        let first = plan(&v, &BTreeSet::new()).expect("a move");
        assert_eq!(first.from, 1);
        assert_eq!(first.to, 2, "the least loaded voter, lowest id first");
        let (load, moves) = settle(v, &BTreeSet::new());
        assert_eq!(moves, 2);
        assert_eq!(load.values().copied().collect::<Vec<_>>(), vec![2, 1, 1]);
    }

    #[test]
    fn the_meta_group_is_not_counted_nor_moved_for_balance() {
        let v = view(&[(0, 1), (1, 2), (2, 3), (3, 1)], &all(3, &[1, 2, 3]));
        assert_eq!(plan(&v, &BTreeSet::new()), None);
    }

    #[test]
    fn leaders_leave_avoided_nodes_including_the_meta_group() {
        let avoid = BTreeSet::from([1]);
        let v = view(&[(0, 1), (1, 1), (2, 2), (3, 3)], &all(3, &[1, 2, 3]));
        let m = plan(&v, &avoid).expect("a move");
        assert_eq!((m.shard, m.from), (META, 1));
        let (load, _) = settle(v, &avoid);
        assert!(!load.contains_key(&1), "{load:?}");
        // Not moved back onto it for balance either.
        let v = view(&[(1, 2), (2, 2), (3, 3), (4, 3)], &all(4, &[1, 2, 3]));
        assert_eq!(plan(&v, &avoid), None);
    }

    #[test]
    fn moves_only_to_voters_of_the_shard() {
        // Five nodes, three replicas per shard: shard 1 on 1,2,3; shard 2 on 1,4,5.
        let v = view(&[(1, 1), (2, 1), (3, 1)], &[(1, &[1, 2, 3]), (2, &[1, 4, 5]), (3, &[1, 2, 3])]);
        let (load, moves) = settle(v, &BTreeSet::new());
        assert!(moves >= 1);
        assert!(load.values().all(|l| *l <= 1), "{load:?}");
    }

    #[test]
    fn unknown_leaders_and_lone_voters_are_left_alone() {
        let v = view(&[(1, 1)], &[(1, &[1]), (2, &[1, 2]), (3, &[1, 2])]);
        assert_eq!(plan(&v, &BTreeSet::new()), None);
        let v = view(&[(1, 1)], &[(1, &[1])]);
        assert_eq!(plan(&v, &BTreeSet::from([1])), None);
    }
}
