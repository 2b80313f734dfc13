//! Group conversations: IM-10 order of small groups, IM-3 density of a small
//! group's list as its members' copies show it, and IM-11 for group sends.
//!
//! The other invariants treat a group's list like any list (`lists`,
//! `durability`, `reads`, `order`): super-group lists are read with
//! `SyncGroup`, and every copy of a small-group message in a member's list
//! also claims its place `(group list, group_seq)`.
//!
//! * **conversation-order** (IM-10): in every member's list, the messages of
//!   a small group (and its notifications) appear in ascending group-seq
//!   order, so all members order the group alike and as the group's list
//!   does. The group seq of a message is its agreed seq in the group's list
//!   (from the ack and every copy), else the copy's own `group_seq`. Where
//!   group seqs are unknown, the members' lists are compared with each other
//!   directly: common messages must be in the same relative order.
//! * **gap** (IM-3): the group seqs of a small group that acks and members'
//!   copies claim are dense, `1..=max`, once every member's list was read in
//!   full. A hole is a message the group's list holds that reached no member
//!   (and whose ack, if any, was lost): all-or-nothing fan-out broken in a
//!   way no single list shows. rim relays a group's messages to each
//!   destination in group-seq order, so after the final phase every member
//!   holds a prefix of the group's list at least.
//! * **causal** (IM-11): a device that saw message `m1` of a group (in its
//!   user's list or the group's list) before it invoked the send of `m2` to
//!   that group must see `m2` placed after `m1`: group seq of `m1` < group
//!   seq of `m2`.

use super::anomaly::{Anomaly, AnomalyKind, Sink};
use super::durability::Final;
use super::index::{CallKind, Index, ListId, MsgId, ObsEntry, Outcome, group_list, list_name};
use super::lists::Positions;
use crate::history::ConvKind;
use std::collections::{BTreeMap, HashMap, HashSet};

/// Runs the group checks.
pub(crate) fn check(ix: &Index, pos: &Positions, finals: &BTreeMap<ListId, Vec<Final>>, sink: &mut Sink) {
    order(ix, pos, finals, sink);
    density(ix, pos, finals, sink);
    causal(ix, pos, sink);
}

/// The group seq of `m` in group `g`: agreed, else the copy's own.
fn gseq(pos: &Positions, g: u64, m: MsgId, e: &ObsEntry) -> Option<u64> {
    pos.seq(group_list(g), m).or((e.group_seq > 0).then_some(e.group_seq))
}

/// One small-group entry of a member's list: `(seq in the list, msg, group seq)`.
type Copy = (u64, MsgId, Option<u64>);

fn order(ix: &Index, pos: &Positions, finals: &BTreeMap<ListId, Vec<Final>>, sink: &mut Sink) {
    // group → member list → its copies in list order (first final read of each list).
    let mut copies: BTreeMap<u64, BTreeMap<ListId, Vec<Copy>>> = BTreeMap::new();
    for (&list, fs) in finals {
        if super::index::group_of(list).is_some() {
            continue;
        }
        let read = &ix.reads[fs[0].read];
        for e in read.entries.iter().filter(|e| e.kind == ConvKind::Group) {
            let v = copies.entry(e.to).or_default().entry(list).or_default();
            v.push((e.seq, e.msg, gseq(pos, e.to, e.msg, e)));
        }
    }
    for (g, lists) in copies {
        let ops = |list: ListId| finals[&list].iter().map(|f| ix.done_op(ix.reads[f.read].call));
        let mut intact: Vec<ListId> = Vec::new();
        for (&list, v) in &lists {
            let mut prev: Option<(u64, MsgId, u64)> = None;
            let mut ok = true;
            for &(seq, m, gs) in v {
                let Some(gs) = gs else { continue };
                if let Some((pseq, pm, pgs)) = prev
                    && gs <= pgs
                {
                    ok = false;
                    sink.push(
                        Anomaly::new(AnomalyKind::ConversationOrder)
                            .list(list)
                            .seq(seq)
                            .msg(ix.name(m))
                            .ops(ops(list))
                            .expected(format!(
                                "every member's list to hold g{g}'s messages in group-seq order: {} (group seq \
                                 {gs}) before {} (group seq {pgs})",
                                ix.name(m),
                                ix.name(pm)
                            ))
                            .found(format!(
                                "{} has {} at seq {pseq} and {} at seq {seq}",
                                list_name(list),
                                ix.name(pm),
                                ix.name(m)
                            )),
                    );
                }
                prev = Some((seq, m, gs));
            }
            if ok {
                intact.push(list);
            }
        }
        // Members compared with each other (group seqs unknown somewhere).
        let Some((&reference, rest)) = intact.split_first() else { continue };
        let rank: HashMap<MsgId, (usize, u64)> =
            lists[&reference].iter().enumerate().map(|(i, c)| (c.1, (i, c.0))).collect();
        for &list in rest {
            let mut prev: Option<(usize, u64, u64, MsgId)> = None;
            for &(seq, m, _) in &lists[&list] {
                let Some(&(r, rseq)) = rank.get(&m) else { continue };
                if let Some((pr, prseq, pseq, pm)) = prev
                    && r < pr
                {
                    sink.push(
                        Anomaly::new(AnomalyKind::ConversationOrder)
                            .list(list)
                            .seq(seq)
                            .msg(ix.name(m))
                            .ops(ops(list).chain(ops(reference)))
                            .expected(format!(
                                "all members to order g{g}'s messages alike: {} has {} (seq {rseq}) before {} \
                                 (seq {prseq})",
                                list_name(reference),
                                ix.name(m),
                                ix.name(pm)
                            ))
                            .found(format!(
                                "{} has {} at seq {pseq} and {} at seq {seq}",
                                list_name(list),
                                ix.name(pm),
                                ix.name(m)
                            )),
                    );
                    break;
                }
                prev = Some((r, rseq, seq, m));
            }
        }
    }
}

fn density(ix: &Index, pos: &Positions, finals: &BTreeMap<ListId, Vec<Final>>, sink: &mut Sink) {
    for (&g, meta) in &ix.groups {
        if meta.kind != ConvKind::Group || !meta.members.iter().all(|u| finals.contains_key(u)) {
            continue;
        }
        let Some(claimed) = pos.claimed.get(&group_list(g)) else { continue };
        let max = claimed.last().copied().unwrap_or(0);
        let missing: Vec<u64> = (1..=max).filter(|s| claimed.binary_search(s).is_err()).collect();
        let Some(&first) = missing.first() else { continue };
        let shown: Vec<String> = missing.iter().take(12).map(u64::to_string).collect();
        sink.push(
            Anomaly::new(AnomalyKind::Gap)
                .list(group_list(g))
                .seq(first)
                .ops(meta.members.iter().flat_map(|u| &finals[u]).map(|f| ix.done_op(ix.reads[f.read].call)))
                .expected(format!(
                    "the group seqs of small group g{g} (acks and the copies in its members' final lists) \
                     to be dense, 1..={max}"
                ))
                .found(format!(
                    "{} group seqs no member holds and no ack names: {}",
                    missing.len(),
                    shown.join(", ")
                )),
        );
    }
}

fn causal(ix: &Index, pos: &Positions, sink: &mut Sink) {
    // (user, device, group) → highest group seq seen: (seq, msg, read call).
    let mut seen: HashMap<(u64, u64, u64), (u64, MsgId, usize)> = HashMap::new();
    let mut checks: Vec<(MsgId, usize, (u64, MsgId, usize))> = Vec::new();
    let mut first_attempt: HashSet<MsgId> = HashSet::new();
    for (p, call) in ix.call_of_pos.iter().enumerate() {
        let Some(c) = *call else { continue };
        let call = &ix.calls[c];
        match call.kind {
            CallKind::Sync { user, device, .. }
                if call.complete == Some(p) && call.outcome == Outcome::Ok =>
            {
                let Some(r) = call.read else { continue };
                for e in ix.reads[r].entries.iter().filter(|e| e.kind.is_group()) {
                    let Some(gs) = gseq(pos, e.to, e.msg, e) else { continue };
                    let slot = seen.entry((user, device, e.to)).or_insert((gs, e.msg, c));
                    if gs > slot.0 {
                        *slot = (gs, e.msg, c);
                    }
                }
            }
            CallKind::Send(m) if call.invoke == p && first_attempt.insert(m) => {
                let Some(info) = ix.msg(m).filter(|i| i.kind.is_group()) else { continue };
                if let Some(&s) = seen.get(&(info.from, info.device, info.to)) {
                    checks.push((m, c, s));
                }
            }
            _ => {}
        }
    }
    for (m2, send_call, (s1, m1, read_call)) in checks {
        let info = ix.msg(m2).expect("sent");
        let Some(s2) = pos.seq(group_list(info.to), m2) else { continue };
        if m1 == m2 || s1 < s2 {
            continue;
        }
        sink.push(
            Anomaly::new(AnomalyKind::Causal)
                .list(group_list(info.to))
                .seq(s2)
                .msg(ix.name(m2))
                .ops(ix.call_ops(read_call).into_iter().chain(ix.call_ops(send_call)))
                .expected(format!(
                    "{} after {} in g{}: device {} of u{} saw {} (op {}) before sending {}",
                    ix.name(m2),
                    ix.name(m1),
                    info.to,
                    info.device,
                    info.from,
                    ix.name(m1),
                    ix.done_op(read_call),
                    ix.name(m2)
                ))
                .found(format!("{} at group seq {s2}, {} at group seq {s1}", ix.name(m2), ix.name(m1))),
        );
    }
}
