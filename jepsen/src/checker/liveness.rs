//! IM-12 liveness figures: reported, never part of the verdict.
//!
//! * outcome counts and fractions of sends (and of group sends among them),
//!   syncs and final reads;
//! * acked sends per second over the whole run;
//! * the fate of indeterminate sends per the final reads;
//! * send latency (invoke to ok) percentiles;
//! * delivery lag of 1:1 sends: from a send's ack to the completion of the
//!   recipient's first sync returning it (clamped at 0: a sync may see a message before
//!   its sender's ack arrives), and how many acked sends no recipient sync
//!   ever returned;
//! * windows between nemesis events: sends invoked in each window and the
//!   fraction that were acked.

use super::durability::InfoFates;
use super::index::{CallKind, Index, Outcome};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// Counts of one kind of operation.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct OutcomeCounts {
    /// Invocations.
    pub invoked: u64,
    /// `ok` completions.
    pub ok: u64,
    /// `fail` completions.
    pub fail: u64,
    /// `info` completions and invocations never completed.
    pub info: u64,
    /// ok / invoked (0 when nothing was invoked).
    pub ok_fraction: f64,
    /// fail / invoked.
    pub fail_fraction: f64,
    /// info / invoked.
    pub info_fraction: f64,
}

impl OutcomeCounts {
    fn add(&mut self, outcome: Outcome) {
        self.invoked += 1;
        match outcome {
            Outcome::Ok => self.ok += 1,
            Outcome::Fail => self.fail += 1,
            Outcome::Info => self.info += 1,
        }
    }

    fn finish(&mut self) {
        if self.invoked > 0 {
            let n = self.invoked as f64;
            self.ok_fraction = self.ok as f64 / n;
            self.fail_fraction = self.fail as f64 / n;
            self.info_fraction = self.info as f64 / n;
        }
    }
}

/// Percentiles of a sample, in milliseconds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Percentiles {
    /// Sample size.
    pub count: u64,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Maximum.
    pub max: f64,
}

impl Percentiles {
    fn of(mut ns: Vec<u64>) -> Option<Self> {
        if ns.is_empty() {
            return None;
        }
        ns.sort_unstable();
        let at = |q: f64| {
            let i = ((ns.len() as f64 - 1.0) * q).round() as usize;
            ns[i] as f64 / 1e6
        };
        Some(Percentiles { count: ns.len() as u64, p50: at(0.5), p90: at(0.9), p99: at(0.99), max: at(1.0) })
    }
}

/// What became of indeterminate sends, per the final reads.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct IndeterminateFates {
    /// In the participants' final lists.
    pub appeared: u64,
    /// In no final list.
    pub never_appeared: u64,
    /// No final read to tell.
    pub unknown: u64,
}

/// Sends in the time between two nemesis events.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Window {
    /// Start, seconds since the test started.
    pub start_s: f64,
    /// End, seconds (the last op's time for the last window).
    pub end_s: f64,
    /// `f` of the nemesis event that opened it, `"start"` for the first.
    pub opened_by: String,
    /// Outcomes of the sends invoked in it.
    pub sends: OutcomeCounts,
}

/// All figures.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    /// Lines in the history.
    pub ops: u64,
    /// Time from the first to the last op, seconds.
    pub duration_s: f64,
    /// Send attempts.
    pub sends: OutcomeCounts,
    /// Send attempts to groups (included in `sends`).
    #[serde(default)]
    pub group_sends: OutcomeCounts,
    /// Distinct payloads sent.
    pub messages: u64,
    /// Device syncs.
    pub syncs: OutcomeCounts,
    /// Final reads.
    pub final_reads: OutcomeCounts,
    /// Nemesis events.
    pub nemesis_events: u64,
    /// Acked send attempts per second of the run.
    pub acked_sends_per_s: f64,
    /// Fate of indeterminate sends.
    pub indeterminate_sends: IndeterminateFates,
    /// Invoke-to-ok latency of sends.
    pub send_latency_ms: Option<Percentiles>,
    /// Ack to the recipient's first sync returning the message.
    pub delivery_lag_ms: Option<Percentiles>,
    /// Acked 1:1 sends to another user that no sync of the recipient returned.
    pub acked_unseen_by_recipient: u64,
    /// Sends per window between nemesis events.
    pub windows: Vec<Window>,
    /// Distinct `message.created` events the webhook receiver got (runs
    /// with a receiver only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook_events: Option<u64>,
}

pub(crate) fn stats(ix: &Index, fates: InfoFates) -> Stats {
    let mut s = Stats { ops: ix.ops.len() as u64, ..Stats::default() };
    let t0 = ix.ops.iter().map(|o| o.time).min().unwrap_or(0);
    let t1 = ix.ops.iter().map(|o| o.time).max().unwrap_or(0);
    s.duration_s = (t1 - t0) as f64 / 1e9;
    s.nemesis_events = ix.nemesis.len() as u64;

    let mut bounds: Vec<(u64, String)> = vec![(t0, "start".to_string())];
    for &p in &ix.nemesis {
        bounds.push((ix.ops[p].time, ix.ops[p].f().to_string()));
    }
    s.windows = bounds
        .iter()
        .enumerate()
        .map(|(i, (t, f))| Window {
            start_s: (t - t0) as f64 / 1e9,
            end_s: (bounds.get(i + 1).map_or(t1, |b| b.0) - t0) as f64 / 1e9,
            opened_by: f.clone(),
            sends: OutcomeCounts::default(),
        })
        .collect();

    let mut latencies = Vec::new();
    for call in &ix.calls {
        match call.kind {
            CallKind::Send(m) => {
                s.sends.add(call.outcome);
                if ix.msg(m).is_some_and(|i| i.kind.is_group()) {
                    s.group_sends.add(call.outcome);
                }
                let w = bounds.partition_point(|b| b.0 <= call.invoke_time).saturating_sub(1);
                s.windows[w].sends.add(call.outcome);
                if call.outcome == Outcome::Ok {
                    latencies.push(call.complete_time.saturating_sub(call.invoke_time));
                }
            }
            CallKind::Sync { .. } => s.syncs.add(call.outcome),
            CallKind::Final { .. } => s.final_reads.add(call.outcome),
            CallKind::CreateGroup => {}
        }
    }
    for c in [&mut s.sends, &mut s.group_sends, &mut s.syncs, &mut s.final_reads] {
        c.finish();
    }
    for w in &mut s.windows {
        w.sends.finish();
    }
    s.messages = ix.msgs.iter().flatten().count() as u64;
    if s.duration_s > 0.0 {
        s.acked_sends_per_s = s.sends.ok as f64 / s.duration_s;
    }
    s.indeterminate_sends =
        IndeterminateFates { appeared: fates.appeared, never_appeared: fates.absent, unknown: fates.unknown };
    s.send_latency_ms = Percentiles::of(latencies);

    let mut first_seen: HashMap<u32, u64> = HashMap::new();
    for read in ix.reads.iter().filter(|r| r.kind == super::index::ReadKind::Sync) {
        let t = ix.calls[read.call].complete_time;
        for e in &read.entries {
            if ix.msg(e.msg).is_some_and(|i| i.kind.is_user() && i.to == read.list && i.from != read.list) {
                let v = first_seen.entry(e.msg).or_insert(t);
                *v = (*v).min(t);
            }
        }
    }
    let mut lags = Vec::new();
    for (m, info) in ix.msgs.iter().enumerate() {
        let Some(info) = info else { continue };
        let Some(ack) = info.ack else { continue };
        if info.from == info.to || !info.kind.is_user() {
            continue;
        }
        match first_seen.get(&(m as u32)) {
            Some(&t) => lags.push(t.saturating_sub(ack.time)),
            None => s.acked_unseen_by_recipient += 1,
        }
    }
    s.delivery_lag_ms = Percentiles::of(lags);
    s
}
