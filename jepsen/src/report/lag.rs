//! Delivery lag: how long after its ack a message reached its recipient.
//!
//! For every acked 1:1 send (an `ok` completion of `send`; the earliest one when
//! a payload id was acked more than once) the lag runs from the ack's time to
//! the recipient's first observation of the payload id: the earliest of
//!
//! * the completion of an `ok` `sync` of the recipient (`user == to`) whose
//!   entries hold it,
//! * the completion of an `ok` `final-read` of the recipient holding it,
//! * an `ok` `push` on a worker process, value
//!   `{"user":U,"device":D,"entries":[..]}` with `U == to`, holding it.
//!
//! Sends to oneself count too (the checker's IM-12 figure skips them). A
//! push or sync may observe a message before its sender's ack arrives: the
//! lag is then 0. Messages never observed count as *never observed*; over
//! time, [`unseen_over_time`] counts the acked messages not yet observed
//! (Jepsen's kafka "unseen").

use super::millis;
use crate::checker::Percentiles;
use crate::history::{F_PUSH, Op, OpBody, OpType, Process};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};

/// How a recipient first observed a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ObservedBy {
    /// A live push to one of its devices.
    Push,
    /// A device sync.
    Sync,
    /// A final read.
    FinalRead,
}

impl ObservedBy {
    /// The stable name (`"push"`, `"sync"`, `"final-read"`).
    pub fn name(self) -> &'static str {
        match self {
            ObservedBy::Push => "push",
            ObservedBy::Sync => "sync",
            ObservedBy::FinalRead => "final-read",
        }
    }
}

/// The delivery of one acked message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryLag {
    /// The payload id.
    pub client_msg_id: String,
    /// The recipient.
    pub to: u64,
    /// The (earliest) ack's time, ns since the test started.
    pub ack_ns: u64,
    /// The first observation by the recipient, ns, and how.
    pub seen: Option<(u64, ObservedBy)>,
}

impl DeliveryLag {
    /// Ack to first observation, ns (0 when observed before the ack).
    pub fn lag_ns(&self) -> Option<u64> {
        self.seen.map(|(t, _)| t.saturating_sub(self.ack_ns))
    }

    /// When it stopped being unseen: the later of ack and observation.
    fn seen_after_ack_ns(&self) -> Option<u64> {
        self.seen.map(|(t, _)| t.max(self.ack_ns))
    }
}

/// Delivery lags of every acked send, in order of first ack.
pub fn delivery_lags(ops: &[Op]) -> Vec<DeliveryLag> {
    let mut lags: Vec<DeliveryLag> = Vec::new();
    let mut by_id: HashMap<&str, usize> = HashMap::new();
    for op in ops.iter().filter(|o| o.op_type == OpType::Ok && !o.process.is_nemesis()) {
        let OpBody::Send(v) = &op.body else { continue };
        if !v.kind.is_user() {
            continue;
        }
        match by_id.get(v.client_msg_id.as_str()) {
            Some(&i) => lags[i].ack_ns = lags[i].ack_ns.min(op.time),
            None => {
                by_id.insert(&v.client_msg_id, lags.len());
                lags.push(DeliveryLag {
                    client_msg_id: v.client_msg_id.clone(),
                    to: v.to,
                    ack_ns: op.time,
                    seen: None,
                });
            }
        }
    }
    if lags.is_empty() {
        return lags;
    }
    for op in ops.iter().filter(|o| o.op_type == OpType::Ok && !o.process.is_nemesis()) {
        let mut observe = |user: u64, id: &str, how: ObservedBy| {
            let Some(&i) = by_id.get(id) else { return };
            let lag = &mut lags[i];
            if lag.to == user && lag.seen.is_none_or(|(t, _)| op.time < t) {
                lag.seen = Some((op.time, how));
            }
        };
        match &op.body {
            OpBody::Sync(v) if v.group.is_none() => {
                for e in v.entries.iter().flatten() {
                    observe(v.user, &e.client_msg_id, ObservedBy::Sync);
                }
            }
            OpBody::FinalRead(v) if v.group.is_none() => {
                for e in v.entries.iter().flatten() {
                    observe(v.user, &e.client_msg_id, ObservedBy::FinalRead);
                }
            }
            OpBody::Other { f, value } if f == F_PUSH && matches!(op.process, Process::Worker(_)) => {
                let Some(user) = value.get("user").and_then(|u| u.as_u64()) else { continue };
                if value.get("group").is_some_and(|g| !g.is_null()) {
                    continue;
                }
                let entries = value.get("entries").and_then(|e| e.as_array());
                for e in entries.into_iter().flatten() {
                    if let Some(id) = e.get("client_msg_id").and_then(|i| i.as_str()) {
                        observe(user, id, ObservedBy::Push);
                    }
                }
            }
            _ => {}
        }
    }
    lags
}

/// Acked messages not yet observed by their recipient, as a step function:
/// `(time ns, count from then on)`, starting at `(0, 0)` and ending at
/// `end_ns`.
pub fn unseen_over_time(lags: &[DeliveryLag], end_ns: u64) -> Vec<(u64, u64)> {
    let mut events: Vec<(u64, i64)> = Vec::with_capacity(lags.len() * 2);
    for l in lags {
        events.push((l.ack_ns, 1));
        if let Some(t) = l.seen_after_ack_ns() {
            events.push((t, -1));
        }
    }
    events.sort_unstable();
    let mut steps: Vec<(u64, u64)> = vec![(0, 0)];
    let mut count: i64 = 0;
    let mut i = 0;
    while i < events.len() {
        let t = events[i].0;
        while i < events.len() && events[i].0 == t {
            count += events[i].1;
            i += 1;
        }
        let value = count.max(0) as u64;
        match steps.last_mut() {
            Some(last) if last.0 == t => last.1 = value,
            _ => steps.push((t, value)),
        }
    }
    let last = steps.last().copied().unwrap_or((0, 0));
    if last.0 < end_ns {
        steps.push((end_ns, last.1));
    }
    steps
}

/// Figures of the delivery lag.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DeliveryLagSummary {
    /// Acked messages (distinct payload ids).
    pub acked: u64,
    /// Of those, observed by their recipient.
    pub observed: u64,
    /// Of those, never observed by their recipient.
    pub never_observed: u64,
    /// Ack to first observation, ms, of the observed ones.
    pub lag_ms: Option<Percentiles>,
    /// Observed messages by how they were first observed.
    pub first_observed_by: BTreeMap<String, u64>,
}

impl DeliveryLagSummary {
    /// Summarises lags.
    pub fn of(lags: &[DeliveryLag]) -> Self {
        let mut s = DeliveryLagSummary { acked: lags.len() as u64, ..Self::default() };
        let mut sample = Vec::with_capacity(lags.len());
        for l in lags {
            match (l.lag_ns(), l.seen) {
                (Some(lag), Some((_, how))) => {
                    s.observed += 1;
                    sample.push(lag);
                    *s.first_observed_by.entry(how.name().to_string()).or_default() += 1;
                }
                _ => s.never_observed += 1,
            }
        }
        s.lag_ms = percentiles(sample);
        s
    }
}

/// Nearest-rank percentiles of a sample in ns, as ms.
fn percentiles(mut ns: Vec<u64>) -> Option<Percentiles> {
    if ns.is_empty() {
        return None;
    }
    ns.sort_unstable();
    let at = |q: f64| {
        let i = ((ns.len() as f64 - 1.0) * q).round() as usize;
        millis(ns[i.min(ns.len() - 1)])
    };
    Some(Percentiles { count: ns.len() as u64, p50: at(0.5), p90: at(0.9), p99: at(0.99), max: at(1.0) })
}
