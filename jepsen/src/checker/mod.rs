//! The IM checker: a pure function from a history to [`Results`], re-runnable
//! on a saved `history.jsonl`.
//!
//! # Model
//!
//! Every user owns one list with gap-free seqs from 1. A 1:1 send from `a`
//! to `b` is appended once to `a`'s list and once to `b`'s (once in total
//! when `a == b`); its ack carries the seq in the sender's list.
//!
//! Every group owns one list too (`g<id>`, group seqs from 1). A send to a
//! small group is appended to the group's list and copied once into every
//! member's list (members from the history's `create-group`), each copy
//! carrying the same message id and group seq; a send to a super group is
//! appended to the group's list only, which members read with `SyncGroup`.
//! A group send's ack carries the group seq. Server notifications (entries
//! no send explains, e.g. "members added") take part in agreement and
//! duplicates, not in the send-based checks. A send is
//! *acked* when any attempt with its payload id (`client_msg_id`) completed
//! `ok`, *failed* when every attempt completed `fail` (rim then guarantees it
//! was never proposed), and *indeterminate* otherwise: it may appear or not,
//! but at most once, and in all of its lists or in none. *Final reads* are
//! complete reads of every list through every node after healing.
//!
//! # Invariants (reference/jepsen.md §2.3) and anomaly kinds
//!
//! | ID | kind(s) | rule |
//! |---|---|---|
//! | IM-1 | `divergence`, `final-read-mismatch` | each (list, seq) holds one message across acks, syncs, devices and nodes; final reads of a list through every node are identical |
//! | IM-2 | `duplicate` | a message occurs at most once per list and has one message id |
//! | IM-3 | `gap` | every response is contiguous from `after + 1`; a final read is exactly `1..=len` (and ends at its `last_seq`); a sync with `has_more = false` reaches its `last_seq`; the group seqs of a small group that acks and copies claim are `1..=max` |
//! | IM-4 | `non-monotonic-read` | a device's later sync never shows a shorter list than its earlier ones |
//! | IM-5 | `phantom`, `aborted-read` | every entry comes from an invoked send with the same sender, recipient and conversation kind, only in that message's lists (group messages: sent by a member), read no earlier than the send was invoked; never from a definitely failed send |
//! | IM-6 | `lost-ack`, `lost-entry` | every acked send is in every final read of each of its lists (both participants; every member of a small group; a super group's list); every entry a sync returned is in every final read of its list |
//! | IM-7 | `partial-fanout` | an indeterminate send is in all of its lists' final reads or in none (both participants; every member of a small group) |
//! | IM-8 / IM-8s | `stale-read` | a sync invoked after an ack reaches the acked seq (for whom: see [`Consistency`]) |
//! | IM-9 | `order` | seq order respects real time for entries written by the acked entry; a sender's order is kept in each recipient's list |
//! | IM-10 | `conversation-order` | both participants order a 1:1 conversation identically (only with [`CheckOptions::single_shard`]); every member's list holds a small group's messages in group-seq order (always) |
//! | IM-11 | `causal` | a message sent after its device saw another message of the conversation is placed after it in both lists (groups: a later group seq) |
//! | IM-13 | `lost-event`, `phantom-event`, `event-mismatch`, `event-order`, `bad-signature` | with webhook receipts (`webhooks.jsonl`): every committed message's `message.created` arrives at least once, with one event id and byte-identical bodies, signed, first arrivals in conversation order, and no event of anything else (`webhooks`) |
//! | IM-12 | (stats) | liveness figures, never part of the verdict: [`Stats`] |
//!
//! The private modules state each rule precisely: `lists` (IM-1, 2, 3, 5),
//! `durability` (final reads: IM-1, 6, 7), `reads` (IM-4, 8), `order`
//! (IM-9, 10, 11), `groups` (IM-10, IM-3 of small groups' lists, IM-11 of
//! group sends), `liveness` (IM-12).
//!
//! # Verdict
//!
//! * `Invalid` if any anomaly was found;
//! * else `Unknown` if something could not be verified: no final read
//!   completed, a final read failed or timed out, a list with acked messages
//!   has no final read, a list lacks a final read through some node that
//!   served others, or the history breaks the invoke/complete pairing rules;
//! * else `Valid`.
//!
//! Cost: one pass to index, hash maps keyed by payload id and (list, seq),
//! sorting per list for order checks: O(n log n) in the history size.

mod anomaly;
mod durability;
mod groups;
mod index;
mod lists;
mod liveness;
mod order;
mod reads;
mod report;
mod webhooks;

pub use anomaly::{Anomaly, AnomalyGroup, AnomalyKind, MAX_EXAMPLES};
pub use liveness::{IndeterminateFates, OutcomeCounts, Percentiles, Stats, Window};
pub use report::render_text;

use crate::error::{Result, io_err};
use crate::history::{LoadedHistory, Op, read_history};
use crate::webhooks::Receipt;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

/// Which read guarantee IM-8 checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Consistency {
    /// IM-8: any device's sync invoked after an ack reaches the acked seq of
    /// the sender's list (and of the recipient's list with `single_shard`).
    #[default]
    Linearizable,
    /// IM-8s: only the sending device's own later syncs must reach it.
    Session,
    /// No read-recency check (e.g. `follower_reads = true`).
    Eventual,
}

impl std::str::FromStr for Consistency {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "linearizable" => Ok(Consistency::Linearizable),
            "session" => Ok(Consistency::Session),
            "eventual" => Ok(Consistency::Eventual),
            other => Err(format!("unknown consistency {other:?} (linearizable, session, eventual)")),
        }
    }
}

/// Checker options.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct CheckOptions {
    /// IM-8 strength.
    pub consistency: Consistency,
    /// Every user lives in one shard, so a recipient's copy is written by the
    /// acked entry itself: enables IM-8 and real-time IM-9 on recipients'
    /// lists, and IM-10 for 1:1 conversations. Off by default, because rim's
    /// cross-shard relay promises neither (docs/consistency.md §5).
    pub single_shard: bool,
}

/// The verdict. Serialised like Jepsen's `valid?`: `true`, `false` or `"unknown"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Validity {
    /// Checked, nothing found.
    Valid,
    /// Anomalies found.
    Invalid,
    /// Nothing found, but something could not be checked.
    Unknown,
}

impl Validity {
    /// Process exit code: 0 valid, 1 anomalies, 2 unknown.
    pub fn exit_code(self) -> i32 {
        match self {
            Validity::Valid => 0,
            Validity::Invalid => 1,
            Validity::Unknown => 2,
        }
    }
}

impl Serialize for Validity {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Validity::Valid => s.serialize_bool(true),
            Validity::Invalid => s.serialize_bool(false),
            Validity::Unknown => s.serialize_str("unknown"),
        }
    }
}

impl<'de> Deserialize<'de> for Validity {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match serde_json::Value::deserialize(d)? {
            serde_json::Value::Bool(true) => Ok(Validity::Valid),
            serde_json::Value::Bool(false) => Ok(Validity::Invalid),
            serde_json::Value::String(s) if s == "unknown" => Ok(Validity::Unknown),
            other => Err(serde::de::Error::custom(format!("bad valid value {other}"))),
        }
    }
}

/// What the checker found.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Results {
    /// The verdict.
    pub valid: Validity,
    /// The kinds found, in report order.
    pub anomaly_types: Vec<String>,
    /// Per kind name: invariant, count and up to [`MAX_EXAMPLES`] examples.
    pub anomalies: BTreeMap<String, AnomalyGroup>,
    /// Why the verdict is (at best) Unknown.
    pub unknown: Vec<String>,
    /// Tolerated problems of the history (pairing, truncated tail, ...).
    pub warnings: Vec<String>,
    /// Invariants the options left out.
    pub not_checked: Vec<String>,
    /// The options used.
    pub options: CheckOptions,
    /// IM-12 liveness figures and counts.
    pub stats: Stats,
}

impl Results {
    /// The count of `kind` (0 when not found).
    pub fn count(&self, kind: AnomalyKind) -> u64 {
        self.anomalies.get(kind.name()).map_or(0, |g| g.count)
    }

    /// Adds a reason the run cannot be fully trusted (the harness lost
    /// history lines, the cluster did not recover): a valid verdict becomes
    /// unknown; anomalies found stay anomalies.
    pub fn mark_unknown(&mut self, reason: impl Into<String>) {
        self.unknown.push(reason.into());
        if self.valid == Validity::Valid {
            self.valid = Validity::Unknown;
        }
    }
}

/// Checks a history.
pub fn check(ops: &[Op], options: &CheckOptions) -> Results {
    check_with_receipts(ops, options, None)
}

/// Checks a history and, when given, the webhook receiver's receipts (IM-13).
pub fn check_with_receipts(ops: &[Op], options: &CheckOptions, receipts: Option<&[Receipt]>) -> Results {
    let ix = index::Index::build(ops);
    let mut sink = anomaly::Sink::default();
    let mut unknown = Vec::new();
    let positions = lists::agreement(&ix, &mut sink);
    lists::contiguity(&ix, &mut sink);
    lists::phantoms(&ix, &mut sink);
    let finals = durability::finals_by_list(&ix);
    let fates = durability::check(&ix, &finals, &mut sink, &mut unknown);
    reads::check(&ix, &positions, options, &mut sink);
    order::check(&ix, &positions, options, &mut sink);
    groups::check(&ix, &positions, &finals, &mut sink);
    let mut stats = liveness::stats(&ix, fates);
    if let Some(receipts) = receipts {
        stats.webhook_events = Some(webhooks::check(ops, receipts, &mut sink) as u64);
    }

    if ix.malformed {
        unknown.push("the history breaks the invoke/completion pairing rules (see warnings)".to_string());
    }
    let mut not_checked = Vec::new();
    match options.consistency {
        Consistency::Linearizable => {}
        Consistency::Session => {
            not_checked.push("IM-8 for other devices (session: only read-your-writes, IM-8s)".to_string())
        }
        Consistency::Eventual => not_checked.push("IM-8 / IM-8s (consistency eventual)".to_string()),
    }
    if receipts.is_none() {
        not_checked.push("IM-13 (no webhook receipts)".to_string());
    }
    if !options.single_shard {
        not_checked.push(
            "IM-10 for 1:1 conversations, and IM-8 / real-time IM-9 on recipients' lists (not single-shard)"
                .to_string(),
        );
    }
    let anomaly_types: Vec<String> = AnomalyKind::ALL
        .iter()
        .filter(|k| sink.groups.contains_key(k))
        .map(|k| k.name().to_string())
        .collect();
    let valid = if !anomaly_types.is_empty() {
        Validity::Invalid
    } else if !unknown.is_empty() {
        Validity::Unknown
    } else {
        Validity::Valid
    };
    Results {
        valid,
        anomaly_types,
        anomalies: sink.groups.into_iter().map(|(k, g)| (k.name().to_string(), g)).collect(),
        unknown,
        warnings: ix.warnings,
        not_checked,
        options: *options,
        stats,
    }
}

/// How many committed messages of `ops` have no `message.created` among
/// `receipts` yet.
pub fn missing_events(ops: &[Op], receipts: &[Receipt]) -> usize {
    webhooks::missing(ops, receipts)
}

/// Checks a loaded history, carrying its reader warnings into the results.
pub fn check_loaded(history: &LoadedHistory, options: &CheckOptions) -> Results {
    check_loaded_with(history, options, None)
}

/// [`check_loaded`] with the webhook receiver's receipts, when the run had one.
pub fn check_loaded_with(
    history: &LoadedHistory,
    options: &CheckOptions,
    receipts: Option<&[Receipt]>,
) -> Results {
    let mut results = check_with_receipts(&history.ops, options, receipts);
    let mut warnings = history.warnings.clone();
    warnings.append(&mut results.warnings);
    results.warnings = warnings;
    results
}

/// Reads `dir/history.jsonl`, checks it, writes `dir/results.json` and
/// `dir/results.txt`, and returns the results.
pub fn check_dir(dir: &Path, options: &CheckOptions) -> Result<Results> {
    let history = read_history(dir.join("history.jsonl"))?;
    let receipts_path = crate::webhooks::receipts_path(dir);
    let receipts =
        receipts_path.exists().then(|| crate::webhooks::read_receipts(&receipts_path)).transpose()?;
    let results = check_loaded_with(&history, options, receipts.as_deref());
    write_results(dir, &results)?;
    Ok(results)
}

/// Writes `dir/results.json` and `dir/results.txt`.
pub fn write_results(dir: &Path, results: &Results) -> Result<()> {
    let write = |name: &str, text: String| {
        let path = dir.join(name);
        std::fs::write(&path, text).map_err(io_err(format!("writing {}", path.display())))
    };
    let json = serde_json::to_string_pretty(results).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"));
    write("results.json", json + "\n")?;
    write("results.txt", render_text(results))
}
