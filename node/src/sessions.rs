//! Sessions of gateways that vanished: a shard's leader takes them offline.
//!
//! A connection's close reaches the shard as a `DeviceOffline`, sent by its
//! gateway. A gateway that crashes (or is killed, or loses its host) sends
//! none, and its devices would count as online until their next sign-in.
//! Every session names its gateway *instance* (unique per gateway process)
//! and the shard indexes online devices by instance (rim-raft-store
//! `im::presence`), so the leader can close them itself:
//!
//! * a gateway keeps one push stream per shard open to the shard's leader
//!   (`service::gateway`); [`Gateways`] counts each instance's open
//!   streams on this node;
//! * every [`CHECK`], the leader lists the instances holding sessions of its
//!   shard and proposes `GatewayGone` for each one that has had no stream
//!   for [`grace`]; its devices still online go offline (`device.offline`,
//!   `offline_since_ms` = when the instance was last seen).
//!
//! Absence is timed from when this node saw the instance's last stream end,
//! or from when it first noticed the instance while leading; the record is
//! cleared when this node becomes leader, so an instance gets a full grace
//! to resubscribe after a leader change. `GatewayGone` is idempotent and
//! leaves alone a device that signed in again elsewhere.
//!
//! Known limit: a gateway that is alive but cut off from a shard's leader
//! for longer than the grace has that shard's sessions reported offline,
//! and they count as online again when the devices next sign in.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rim_proto::store::{self, Op, op::Op as O};

use crate::core::Core;
use crate::group::{Group, now_ms};

/// How often the leader looks for vanished gateways.
pub const CHECK: Duration = Duration::from_secs(1);
/// Most gateway instances one check looks at (more wait for later checks,
/// as gone ones leave the index).
const MAX_GATEWAYS: usize = 256;
/// The shortest grace, whatever the offline grace.
const MIN_GRACE: Duration = Duration::from_secs(5);

/// How long an instance may have no push stream before its sessions go
/// offline: three offline graces (a leader change and a resubscription fit
/// well inside), at least [`MIN_GRACE`]; 30 s with the default limits.
pub fn grace(offline_grace_ms: i64) -> Duration {
    Duration::from_millis(u64::try_from(offline_grace_ms.saturating_mul(3)).unwrap_or(0)).max(MIN_GRACE)
}

/// Push streams open on this node, per gateway instance, and since when an
/// instance has had none.
#[derive(Debug, Default)]
pub struct Gateways {
    seen: Mutex<HashMap<String, Seen>>,
}

#[derive(Debug, Clone, Copy)]
struct Seen {
    streams: usize,
    /// When the count last dropped to 0 (or the instance was first noticed).
    absent_since: Instant,
    absent_since_ms: i64,
}

impl Seen {
    fn absent() -> Seen {
        Seen { streams: 0, absent_since: Instant::now(), absent_since_ms: now_ms() }
    }
}

impl Gateways {
    /// A push stream of `gateway` opened.
    pub fn opened(&self, gateway: &str) {
        let mut seen = self.seen.lock().expect("gateways lock");
        seen.entry(gateway.to_owned()).or_insert_with(Seen::absent).streams += 1;
    }

    /// A push stream of `gateway` ended.
    pub fn closed(&self, gateway: &str) {
        let mut seen = self.seen.lock().expect("gateways lock");
        if let Some(s) = seen.get_mut(gateway) {
            s.streams = s.streams.saturating_sub(1);
            if s.streams == 0 {
                *s = Seen::absent();
            }
        }
    }

    /// Forgets every absence (this node just became leader): each instance
    /// without a stream gets a full grace from now.
    fn forget_absences(&self) {
        self.seen.lock().expect("gateways lock").retain(|_, s| s.streams > 0);
    }

    /// Of the instances `holding` sessions, those absent for `grace` or
    /// longer, with when they were last seen (ms). Starts the clock of the
    /// ones not seen before and drops records no longer needed.
    fn gone(&self, holding: &[String], grace: Duration) -> Vec<(String, i64)> {
        let mut seen = self.seen.lock().expect("gateways lock");
        seen.retain(|g, s| s.streams > 0 || holding.contains(g));
        holding
            .iter()
            .filter_map(|g| {
                let s = *seen.entry(g.clone()).or_insert_with(Seen::absent);
                (s.streams == 0 && s.absent_since.elapsed() >= grace).then(|| (g.clone(), s.absent_since_ms))
            })
            .collect()
    }
}

/// Runs for the life of the node.
pub async fn run(core: Arc<Core>, group: Arc<Group>) {
    let mut tick = tokio::time::interval(CHECK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut leading = false;
    loop {
        tick.tick().await;
        if !group.is_leader() {
            leading = false;
            continue;
        }
        if !leading {
            group.gateways.forget_absences();
            leading = true;
        }
        let holding = match group.reader.session_gateways(MAX_GATEWAYS) {
            Ok(h) => h,
            Err(e) => {
                tracing::debug!(group = %group.shard, error = %e, "reading session gateways");
                continue;
            }
        };
        let grace = grace(core.limits().offline_grace_ms);
        for (gateway, since_ms) in group.gateways.gone(&holding, grace) {
            tracing::info!(group = %group.shard, %gateway, "gateway gone: its sessions go offline");
            let op = Op { op: Some(O::GatewayGone(store::GatewayGone { gateway, since_ms })) };
            match group.propose(op, core.timeout).await {
                Ok(_) => metrics::counter!("rim_gateways_gone_total").increment(1),
                Err(e) => tracing::debug!(group = %group.shard, error = %e, "proposing GatewayGone"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_instance_is_gone_only_after_a_grace_without_streams() {
        let g = Gateways::default();
        let holding = vec!["a".to_owned(), "b".to_owned()];
        g.opened("a");
        assert!(g.gone(&holding, Duration::ZERO).iter().all(|(x, _)| x == "b"), "a has a stream");
        assert!(g.gone(&holding, Duration::from_secs(3600)).is_empty(), "b was only just noticed");
        g.opened("a");
        g.closed("a");
        assert_eq!(g.gone(&holding, Duration::ZERO).len(), 1, "a still has one stream");
        g.closed("a");
        let gone: Vec<_> = g.gone(&holding, Duration::ZERO).into_iter().map(|(x, _)| x).collect();
        assert_eq!(gone, ["a", "b"]);
        g.forget_absences();
        assert!(g.gone(&holding, Duration::from_secs(3600)).is_empty(), "a new leader's full grace");
        g.gone(&[], Duration::ZERO);
        assert!(g.seen.lock().unwrap().is_empty(), "records of instances holding nothing are dropped");
    }

    #[test]
    fn the_grace_is_three_offline_graces_and_at_least_five_seconds() {
        assert_eq!(grace(10_000), Duration::from_secs(30));
        assert_eq!(grace(100), MIN_GRACE);
        assert_eq!(grace(-1), MIN_GRACE);
    }
}
