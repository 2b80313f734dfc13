//! Fires the due checks of a shard (`rim_raft_store::im::presence`): on the
//! shard's leader, every [`TICK`], the checks whose time has come are
//! proposed as one `FireDue`, which decides at apply whether a device went
//! offline (`device.offline`) or is behind (`push.needed`).
//!
//! The checks live in the shard's replicated state, so a new leader simply
//! continues; `FireDue` is idempotent, so a check proposed twice (an old
//! and a new leader, a retried proposal) fires once. Time comes from this
//! node's clock, and apply skips a check not due at the proposal's time:
//! a leader whose clock is ahead fires checks early by its skew at most.

use std::sync::Arc;
use std::time::Duration;

use rim_proto::store::{self, Op, op::Op as O};

use crate::core::Core;
use crate::group::{Group, now_ms};

/// How often the leader looks for due checks: the precision of the offline
/// grace and the push delay.
pub const TICK: Duration = Duration::from_millis(250);
/// Most checks one `FireDue` carries (more wait for the next tick).
const BATCH: usize = 256;
const _: () = assert!(BATCH <= rim_raft_store::im::MAX_FIRE_DUE);

/// Runs for the life of the node.
pub async fn run(core: Arc<Core>, group: Arc<Group>) {
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if !group.is_leader() {
            continue;
        }
        let entries = match group.reader.due_checks(now_ms(), BATCH) {
            Ok(e) if e.is_empty() => continue,
            Ok(e) => e,
            Err(e) => {
                tracing::debug!(group = %group.shard, error = %e, "reading due checks");
                continue;
            }
        };
        let n = entries.len() as u64;
        let op = Op { op: Some(O::FireDue(store::FireDue { entries })) };
        match group.propose(op, core.timeout).await {
            Ok(_) => metrics::counter!("rim_due_checks_fired_total").increment(n),
            Err(e) => tracing::debug!(group = %group.shard, error = %e, "firing due checks"),
        }
    }
}
