//! Final reads: IM-1 agreement between nodes, IM-6 durability, IM-7 atomic
//! fan-out.
//!
//! A final read is a complete read of one list (a user's, or a super group's
//! read by a member) through one node after healing. The lists a message
//! belongs in ([`Index::lists_of`]) are `{from, to}` for a 1:1 message (one
//! list when a user writes to themself), every member's list for a
//! small-group message (members from the history's `create-group`), and the
//! group's list for a super-group message.
//!
//! * **final-read-mismatch** (IM-1): final reads of one list through
//!   different nodes have different lengths (differing contents at a seq are
//!   reported as `divergence`).
//! * **lost-ack** (IM-6): an acked send is missing from some final read of
//!   one of its lists.
//! * **lost-entry** (IM-6): an indeterminate send that a sync returned is
//!   missing from some final read of that list (a committed entry was lost;
//!   acked ones are lost-acks, unknown or failed ones phantoms or aborted reads).
//! * **partial-fanout** (IM-7): an indeterminate send is in the final reads of
//!   some of its lists and in none of another's. (An acked send missing
//!   somewhere is a lost-ack.) Indeterminate sends that appear in every
//!   list, or in none, are fine.
//!
//! These checks need final reads: without any, or when a list of an acked
//! send has no final read, or a final read did not complete, or a small
//! group's members are unknown, the verdict can be at best Unknown.

use super::anomaly::{Anomaly, AnomalyKind, Sink};
use super::index::{Index, ListId, MsgId, MsgState, ReadKind, list_name};
use std::collections::{BTreeMap, BTreeSet, HashSet};

/// What the final reads say about indeterminate sends (for the stats).
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct InfoFates {
    pub appeared: u64,
    pub absent: u64,
    pub unknown: u64,
}

pub(crate) struct Final {
    pub read: usize,
    pub set: HashSet<MsgId>,
}

/// Final reads by list.
pub(crate) fn finals_by_list(ix: &Index) -> BTreeMap<ListId, Vec<Final>> {
    let mut finals: BTreeMap<ListId, Vec<Final>> = BTreeMap::new();
    for (r, read) in ix.reads.iter().enumerate() {
        if read.kind == ReadKind::Final {
            let set = read.entries.iter().map(|e| e.msg).collect();
            finals.entry(read.list).or_default().push(Final { read: r, set });
        }
    }
    finals
}

/// Runs the final-read checks; pushes reasons for an Unknown verdict.
pub(crate) fn check(
    ix: &Index,
    finals: &BTreeMap<ListId, Vec<Final>>,
    sink: &mut Sink,
    unknown: &mut Vec<String>,
) -> InfoFates {
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
        if let super::index::CallKind::Final { list } = ix.calls[c].kind {
            unknown.push(format!(
                "the final read of {} through {node} did not complete (ops {:?})",
                list_name(list),
                ix.call_ops(c)
            ));
        }
    }
    agreement(ix, finals, sink, unknown);

    let mut fates = InfoFates::default();
    let mut unread: BTreeSet<ListId> = BTreeSet::new();
    let mut unknown_groups: BTreeSet<u64> = BTreeSet::new();
    for (m, info) in ix.msgs.iter().enumerate() {
        let Some(info) = info else { continue };
        let m = m as MsgId;
        let name = ix.name(m);
        let state = ix.state(info);
        let Some(lists) = ix.lists_of(info) else {
            if state != MsgState::Failed {
                unknown_groups.insert(info.to);
            }
            if state == MsgState::Indeterminate {
                fates.unknown += 1;
            }
            continue;
        };
        match state {
            MsgState::Acked => {
                let ack = info.ack.expect("acked");
                let at = ix.acked_at(info);
                for &list in &lists {
                    let Some(fs) = finals.get(&list) else {
                        unread.insert(list);
                        continue;
                    };
                    let missing: Vec<&Final> = fs.iter().filter(|f| !f.set.contains(&m)).collect();
                    if missing.is_empty() {
                        continue;
                    }
                    let seq_text = match at {
                        Some((l, s)) if l == list => format!(", seq {s} in {}", list_name(l)),
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
                            "{name} ({}, acked by op {}{seq_text}) in every final read of {}",
                            ix.conv(info),
                            ix.done_op(ack.call),
                            list_name(list)
                        ))
                        .found(found.join(", "));
                    if let Some((l, s)) = at
                        && l == list
                    {
                        a = a.seq(s);
                    }
                    sink.push(a);
                }
            }
            MsgState::Indeterminate => {
                let present: Vec<Option<bool>> = lists
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
                    let has: Vec<String> = lists
                        .iter()
                        .zip(&present)
                        .filter(|(_, p)| **p == Some(true))
                        .map(|(l, _)| list_name(*l))
                        .collect();
                    let lacks: Vec<ListId> = lists
                        .iter()
                        .zip(&present)
                        .filter(|(_, p)| **p == Some(false))
                        .map(|(l, _)| *l)
                        .collect();
                    let lacks_names: Vec<String> = lacks.iter().map(|l| list_name(*l)).collect();
                    sink.push(
                        Anomaly::new(AnomalyKind::PartialFanout)
                            .list(lacks[0])
                            .msg(name)
                            .ops(
                                info.attempts.iter().flat_map(|&c| ix.call_ops(c)).chain(
                                    lacks
                                        .iter()
                                        .flat_map(|l| &finals[l])
                                        .map(|f| ix.done_op(ix.reads[f.read].call)),
                                ),
                            )
                            .expected(format!(
                                "indeterminate send {name} ({}) in all of its lists' final reads or in none",
                                ix.conv(info)
                            ))
                            .found(format!(
                                "in the final lists of {} but not in those of {}",
                                has.join(", "),
                                lacks_names.join(", ")
                            )),
                    );
                }
            }
            MsgState::Failed => {}
        }
    }
    if !unread.is_empty() {
        let v: Vec<String> = unread.iter().take(8).map(|l| list_name(*l)).collect();
        unknown.push(format!(
            "{} lists with acked messages have no final read, so IM-6 is unchecked for them: {}",
            unread.len(),
            v.join(", ")
        ));
    }
    if !unknown_groups.is_empty() {
        let v: Vec<String> = unknown_groups.iter().take(8).map(|g| format!("g{g}")).collect();
        unknown.push(format!(
            "{} small groups were sent to but their members are unknown (no ok create-group), so \
             IM-6/IM-7 are unchecked for them: {}",
            unknown_groups.len(),
            v.join(", ")
        ));
    }
    lost_entries(ix, finals, sink);
    fates
}

/// Final-read mismatch (IM-1) and coverage: every node that served a final
/// read should serve one of every list.
fn agreement(ix: &Index, finals: &BTreeMap<ListId, Vec<Final>>, sink: &mut Sink, unknown: &mut Vec<String>) {
    let nodes: BTreeSet<String> = finals.values().flatten().map(|f| ix.node_of(&ix.reads[f.read])).collect();
    let mut uncovered = Vec::new();
    for (&list, fs) in finals {
        let have: BTreeSet<String> = fs.iter().map(|f| ix.node_of(&ix.reads[f.read])).collect();
        let missing: Vec<&String> = nodes.difference(&have).collect();
        if !missing.is_empty() {
            uncovered.push(format!("{} (not through {missing:?})", list_name(list)));
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
                    .list(list)
                    .ops(fs.iter().flat_map(|f| ix.call_ops(ix.reads[f.read].call)))
                    .expected(format!("every node's final read of {} to be the same list", list_name(list)))
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
}

/// Entries seen by syncs must survive (acked ones are covered above).
fn lost_entries(ix: &Index, finals: &BTreeMap<ListId, Vec<Final>>, sink: &mut Sink) {
    let mut reported: HashSet<(ListId, MsgId)> = HashSet::new();
    for read in ix.reads.iter().filter(|r| r.kind == ReadKind::Sync) {
        let Some(fs) = finals.get(&read.list) else { continue };
        for e in &read.entries {
            // Acked ones are lost-acks; unknown and failed ones are phantoms or aborted reads.
            let indeterminate = ix.msg(e.msg).is_some_and(|i| ix.state(i) == MsgState::Indeterminate);
            if !indeterminate || reported.contains(&(read.list, e.msg)) {
                continue;
            }
            let missing: Vec<&Final> = fs.iter().filter(|f| !f.set.contains(&e.msg)).collect();
            if missing.is_empty() {
                continue;
            }
            reported.insert((read.list, e.msg));
            let name = ix.name(e.msg);
            let nodes: Vec<String> = missing.iter().map(|f| ix.node_of(&ix.reads[f.read])).collect();
            sink.push(
                Anomaly::new(AnomalyKind::LostEntry)
                    .list(read.list)
                    .seq(e.seq)
                    .msg(name)
                    .ops(
                        ix.call_ops(read.call)
                            .into_iter()
                            .chain(missing.iter().map(|f| ix.done_op(ix.reads[f.read].call))),
                    )
                    .expected(format!(
                        "{name}, returned by a sync at seq {}, in every final read of {}",
                        e.seq,
                        list_name(read.list)
                    ))
                    .found(format!("missing from the final read via {}", nodes.join(", "))),
            );
        }
    }
}
