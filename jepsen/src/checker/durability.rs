//! Final reads: IM-1 agreement between nodes, IM-6 durability, IM-7 atomic
//! fan-out.
//!
//! A final read is a complete read of one user's list through one node after
//! healing. The participants of a 1:1 message are `{from, to}` (one list when
//! a user writes to themself).
//!
//! * **final-read-mismatch** (IM-1): final reads of one list through
//!   different nodes have different lengths (differing contents at a seq are
//!   reported as `divergence`).
//! * **lost-ack** (IM-6): an acked send is missing from some final read of
//!   one of its participants.
//! * **lost-entry** (IM-6): an indeterminate send that a sync returned is
//!   missing from some final read of that list (a committed entry was lost;
//!   acked ones are lost-acks, unknown or failed ones phantoms or aborted reads).
//! * **partial-fanout** (IM-7): an indeterminate send is in the final reads of
//!   one participant and in none of the other's. (An acked send missing
//!   somewhere is a lost-ack.) Indeterminate sends that appear in every
//!   participant's list, or in none, are fine.
//!
//! These checks need final reads: without any, or when a participant of an
//! acked send has no final read, or a final read did not complete, the
//! verdict can be at best Unknown.

use super::anomaly::{Anomaly, AnomalyKind, Sink};
use super::index::{Index, MsgId, MsgState, ReadKind};
use std::collections::{BTreeMap, BTreeSet, HashSet};

/// What the final reads say about indeterminate sends (for the stats).
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct InfoFates {
    pub appeared: u64,
    pub absent: u64,
    pub unknown: u64,
}

struct Final {
    read: usize,
    set: HashSet<MsgId>,
}

/// Runs the final-read checks; pushes reasons for an Unknown verdict.
pub(crate) fn check(ix: &Index, sink: &mut Sink, unknown: &mut Vec<String>) -> InfoFates {
    let mut finals: BTreeMap<u64, Vec<Final>> = BTreeMap::new();
    for (r, read) in ix.reads.iter().enumerate() {
        if read.kind == ReadKind::Final {
            let set = read.entries.iter().map(|e| e.msg).collect();
            finals.entry(read.user).or_default().push(Final { read: r, set });
        }
    }
    if finals.is_empty() {
        unknown.push(
            "no final read completed: durability (IM-6), atomic fan-out (IM-7) and final agreement \
                      (IM-1) were not checked"
                .to_string(),
        );
    }
    for &c in &ix.unfinished_finals {
        let pos = ix.calls[c].invoke;
        let node = ix.ops[pos].node.clone().unwrap_or_else(|| "?".into());
        if let super::index::CallKind::Final { user } = ix.calls[c].kind {
            unknown.push(format!(
                "the final read of u{user} through {node} did not complete (ops {:?})",
                ix.call_ops(c)
            ));
        }
    }

    // Every node that served a final read should serve one of every list.
    let nodes: BTreeSet<String> = finals.values().flatten().map(|f| ix.node_of(&ix.reads[f.read])).collect();
    let mut uncovered = Vec::new();
    for (user, fs) in &finals {
        let have: BTreeSet<String> = fs.iter().map(|f| ix.node_of(&ix.reads[f.read])).collect();
        let missing: Vec<&String> = nodes.difference(&have).collect();
        if !missing.is_empty() {
            uncovered.push(format!("u{user} (not through {missing:?})"));
        }
        let lens: BTreeSet<usize> = fs.iter().map(|f| ix.reads[f.read].entries.len()).collect();
        if lens.len() > 1 {
            let by_node: Vec<String> = fs
                .iter()
                .map(|f| {
                    format!("{}: {} entries", ix.node_of(&ix.reads[f.read]), ix.reads[f.read].entries.len())
                })
                .collect();
            sink.push(
                Anomaly::new(AnomalyKind::FinalReadMismatch)
                    .list(*user)
                    .ops(fs.iter().flat_map(|f| ix.call_ops(ix.reads[f.read].call)))
                    .expected(format!("every node's final read of u{user} to be the same list"))
                    .found(by_node.join(", ")),
            );
        }
    }
    if !uncovered.is_empty() {
        unknown.push(format!(
            "{} lists lack a final read through some node: {}",
            uncovered.len(),
            uncovered.iter().take(8).cloned().collect::<Vec<_>>().join("; ")
        ));
    }

    let mut fates = InfoFates::default();
    let mut unread: BTreeSet<u64> = BTreeSet::new();
    for (m, info) in ix.msgs.iter().enumerate() {
        let Some(info) = info else { continue };
        let m = m as MsgId;
        let name = ix.name(m);
        let participants: Vec<u64> =
            if info.from == info.to { vec![info.from] } else { vec![info.from, info.to] };
        match ix.state(info) {
            MsgState::Acked => {
                let ack = info.ack.expect("acked");
                for &list in &participants {
                    let Some(fs) = finals.get(&list) else {
                        unread.insert(list);
                        continue;
                    };
                    let missing: Vec<&Final> = fs.iter().filter(|f| !f.set.contains(&m)).collect();
                    if missing.is_empty() {
                        continue;
                    }
                    let seq_text = match ack.seq {
                        Some(s) if list == info.from => format!(", seq {s} in the sender's list"),
                        _ => String::new(),
                    };
                    let found: Vec<String> = missing
                        .iter()
                        .map(|f| {
                            let r = &ix.reads[f.read];
                            format!("missing via {} ({} entries)", ix.node_of(r), r.entries.len())
                        })
                        .collect();
                    let mut a = Anomaly::new(AnomalyKind::LostAck)
                        .list(list)
                        .msg(name)
                        .ops(
                            ix.call_ops(ack.call)
                                .into_iter()
                                .chain(missing.iter().map(|f| ix.done_op(ix.reads[f.read].call))),
                        )
                        .expected(format!(
                            "{name} (u{}→u{}, acked by op {}{seq_text}) in every final read of u{list}",
                            info.from,
                            info.to,
                            ix.done_op(ack.call)
                        ))
                        .found(found.join(", "));
                    if list == info.from
                        && let Some(s) = ack.seq
                    {
                        a = a.seq(s);
                    }
                    sink.push(a);
                }
            }
            MsgState::Indeterminate => {
                let present: Vec<Option<bool>> = participants
                    .iter()
                    .map(|l| finals.get(l).map(|fs| fs.iter().any(|f| f.set.contains(&m))))
                    .collect();
                if present.iter().any(Option::is_none) {
                    fates.unknown += 1;
                } else if present.iter().all(|p| *p == Some(true)) {
                    fates.appeared += 1;
                } else if present.iter().all(|p| *p == Some(false)) {
                    fates.absent += 1;
                } else {
                    fates.appeared += 1;
                    let Some(i) = present.iter().position(|p| *p == Some(false)) else { continue };
                    let lacks = participants[i];
                    let has = participants[1 - i];
                    sink.push(
                        Anomaly::new(AnomalyKind::PartialFanout)
                            .list(lacks)
                            .msg(name)
                            .ops(
                                info.attempts
                                    .iter()
                                    .flat_map(|&c| ix.call_ops(c))
                                    .chain(finals[&lacks].iter().map(|f| ix.done_op(ix.reads[f.read].call))),
                            )
                            .expected(format!(
                                "indeterminate send {name} (u{}→u{}) in all participants' final lists or in none",
                                info.from, info.to
                            ))
                            .found(format!("in u{has}'s final list but not in u{lacks}'s")),
                    );
                }
            }
            MsgState::Failed => {}
        }
    }
    if !unread.is_empty() {
        let v: Vec<String> = unread.iter().take(8).map(|u| format!("u{u}")).collect();
        unknown.push(format!(
            "{} lists with acked messages have no final read, so IM-6 is unchecked for them: {}",
            unread.len(),
            v.join(", ")
        ));
    }

    // Entries seen by syncs must survive (acked ones are covered above).
    let mut reported: HashSet<(u64, MsgId)> = HashSet::new();
    for read in ix.reads.iter().filter(|r| r.kind == ReadKind::Sync) {
        let Some(fs) = finals.get(&read.user) else { continue };
        for e in &read.entries {
            // Acked ones are lost-acks; unknown and failed ones are phantoms or aborted reads.
            let indeterminate = ix.msg(e.msg).is_some_and(|i| ix.state(i) == MsgState::Indeterminate);
            if !indeterminate || reported.contains(&(read.user, e.msg)) {
                continue;
            }
            let missing: Vec<&Final> = fs.iter().filter(|f| !f.set.contains(&e.msg)).collect();
            if missing.is_empty() {
                continue;
            }
            reported.insert((read.user, e.msg));
            let name = ix.name(e.msg);
            let nodes: Vec<String> = missing.iter().map(|f| ix.node_of(&ix.reads[f.read])).collect();
            sink.push(
                Anomaly::new(AnomalyKind::LostEntry)
                    .list(read.user)
                    .seq(e.seq)
                    .msg(name)
                    .ops(
                        ix.call_ops(read.call)
                            .into_iter()
                            .chain(missing.iter().map(|f| ix.done_op(ix.reads[f.read].call))),
                    )
                    .expected(format!(
                        "{name}, returned by a sync at seq {}, in every final read of u{}",
                        e.seq, read.user
                    ))
                    .found(format!("missing from the final read via {}", nodes.join(", "))),
            );
        }
    }
    fates
}
