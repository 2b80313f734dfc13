//! The cluster's limits: one value in the meta group, carried into every
//! group's log.
//!
//! `rim-raft-store` makes the limits a group applies with a function of the
//! group's own log: a `SetLimits` entry changes them from the next operation
//! on, a repeated or older version changes nothing, and a group without any
//! applies with `Limits::default()` (its `im::limits` docs). This module
//! decides what goes into those logs.
//!
//! * **The canonical value** is `ClusterMap.limits` in the meta group,
//!   written with the map's compare-and-set, so it has one history. Every
//!   node with a data replica is a voter or learner of the meta group and
//!   reads it from its own replica; gateways see it in `GetClusterMap`.
//! * **Bootstrap**: a new cluster's first map carries the bootstrapping
//!   node's [`NodeConfig::initial_limits`] (`small_group_limit` and
//!   `[cluster_limits]`) as version 1. When several nodes bootstrap
//!   together, the map stored first wins: give them the same values. A
//!   cluster whose map has no limits (bootstrapped by an older build) gets
//!   its meta leader's the same way ([`propagate`] seeds them). The
//!   configuration is never read again.
//! * **Changes**: only [`set`], behind the admin `SetLimits` call: validated
//!   (`Limits::validate`), a compare-and-set on the limits version, stored
//!   with the next version.
//! * **Propagation**: every node runs [`propagate`]; for each group it leads
//!   whose stored version is below the map's, it proposes `SetLimits` with
//!   the map's value. A lost leadership or a timeout is retried at the next
//!   tick by whoever leads then, and a duplicate is a no-op, so every group
//!   with a leader reaches the map's version within a few ticks.
//! * **Checks before proposing** use the node's view, [`Core::limits`] (the
//!   map's), which may run ahead of a group's own: they spare the log an
//!   operation apply would refuse, but apply decides.
//! * **Before the first limits**: a group's leader holds client operations
//!   back (`Unavailable`, which the router retries) until its replica
//!   applied limits (`Group::propose`), so the defaults a group without
//!   limits applies with only ever meet the relay's operations and entries
//!   an older build wrote.
//!
//! # Invariants
//!
//! * The map's limits are never removed and their version never decreases
//!   (the meta group's apply refuses such a map).
//! * A group only ever stores values the map held: propagation proposes the
//!   map's, and the meta group adopts its map's. So a group's stored version
//!   is at most the map's, and groups at the same version hold the same
//!   limits.
//! * Until a change reaches a group's log, the group applies with its older
//!   limits, and so does every replica of it: a change is late, never
//!   divergent.
//! * Every client operation a leader of this build accepted follows a
//!   `SetLimits` in its group's log.
//!
//! [`NodeConfig::initial_limits`]: crate::config::NodeConfig::initial_limits

use std::sync::Arc;
use std::time::Duration;

use rim_proto::ErrorCode;
use rim_proto::ids::ShardId;
use rim_proto::store::{self, Op, op::Op as O};
use rim_proto::v1::{ClusterLimits, GroupLimits};
use rim_raft_store::Limits;

use crate::core::{Core, META};
use crate::error::{Error, Result};
use crate::group::Group;

/// How often a node compares the groups it leads with the cluster map.
const TICK: Duration = Duration::from_millis(250);

/// Keeps the groups this node leads at the cluster map's limits, and seeds
/// the map's limits from this node's configuration when it leads the meta
/// group of a cluster that has none. Runs until the node stops.
pub async fn propagate(core: Arc<Core>) {
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Ok(p) = core.placement() else { continue };
        match p.map().limits {
            Some(want) => {
                for g in core.all_groups() {
                    if g.shard != META && g.is_leader() && stored_version(&g) < want.version {
                        catch_up(&core, &g, want).await;
                    }
                }
            }
            None if core.group(META).is_some_and(|g| g.is_leader()) => seed(&core).await,
            None => {}
        }
    }
}

/// Proposes the cluster's limits `want` to `g`, which this node leads.
async fn catch_up(core: &Core, g: &Group, want: ClusterLimits) {
    let op = Op { op: Some(O::SetLimits(store::SetLimits { limits: Some(want) })) };
    match g.propose(op, core.timeout).await {
        Ok(r) if r.code == ErrorCode::Ok as i32 => {
            tracing::info!(group = %g.shard, version = want.version, "the group applies the cluster's limits");
        }
        Ok(r) => tracing::debug!(group = %g.shard, message = %r.message, "SetLimits refused"),
        Err(e) => tracing::debug!(group = %g.shard, error = %e, "proposing SetLimits"),
    }
}

/// Stores this node's configured limits as the cluster's first (version
/// 1), unless the map got some meanwhile.
async fn seed(core: &Core) {
    let limits = core.config.initial_limits().to_proto(1);
    let seeded = core
        .update_map(|map| {
            map.limits.get_or_insert(limits);
            Ok(())
        })
        .await;
    match seeded {
        Ok(version) => tracing::info!(version, "the cluster's limits seeded from this node's configuration"),
        Err(e) => tracing::debug!(error = %e, "seeding the cluster's limits"),
    }
}

/// The limits version `g`'s local replica applies with (0: none, or
/// unreadable: treated as behind).
fn stored_version(g: &Group) -> u64 {
    match g.reader.limits() {
        Ok(stored) => stored.map_or(0, |l| l.version),
        Err(e) => {
            tracing::debug!(group = %g.shard, error = %e, "reading the group's limits");
            0
        }
    }
}

/// The hosted groups whose local replica applies with older limits than the
/// cluster map's (all of them while this node knows no map with limits).
pub fn behind(core: &Core) -> Vec<ShardId> {
    let want = core.placement().ok().and_then(|p| p.map().limits).map(|l| l.version);
    core.all_groups().iter().filter(|g| want.is_none_or(|w| stored_version(g) < w)).map(|g| g.shard).collect()
}

/// The limits version each hosted group's local replica applies with.
pub fn applied(core: &Core) -> Vec<GroupLimits> {
    core.all_groups()
        .iter()
        .map(|g| GroupLimits { group_id: g.shard.0, version: stored_version(g) })
        .collect()
}

/// Makes `want` the cluster's limits, if `want.version` is the version the
/// map holds (0: none yet): a compare-and-set, so a change made since the
/// caller read them is refused, not overwritten. Returns the stored value,
/// at the next version. `ERROR_BAD_REQUEST` for values that break an
/// invariant (`Limits::validate`) or a stale version.
pub async fn set(core: &Core, want: ClusterLimits) -> Result<ClusterLimits> {
    Limits::from_proto(&want)?;
    let version = want.version.checked_add(1).ok_or_else(|| bad("the limits version is exhausted".into()))?;
    let next = ClusterLimits { version, ..want };
    core.update_map(|map| {
        let current = map.limits.map_or(0, |l| l.version);
        if current != want.version {
            return Err(bad(format!(
                "the limits are at version {current}, not {}: read them again",
                want.version
            )));
        }
        map.limits = Some(next);
        Ok(())
    })
    .await?;
    Ok(next)
}

fn bad(message: String) -> Error {
    Error::rejected(ErrorCode::ErrorBadRequest, message)
}
