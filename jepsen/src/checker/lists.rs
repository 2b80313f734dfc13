//! Structure of the lists: IM-1 agreement, IM-2 no duplicates, IM-3 dense
//! and contiguous responses, IM-5 no phantoms.
//!
//! Every `(list, seq) → msg` fact (send acks: the sender's list at the acked
//! seq, or the group's list at the acked group seq; every entry of every
//! sync, final read and push; and, for each copy of a group message in a
//! member's list, the group's list at the copy's `group_seq`) goes into one
//! map keyed by `(list, seq)`, in completion order. Group lists are lists
//! like users' lists: a copy carrying another group seq than the ack or the
//! other copies puts one message at two seqs of the group's list (a
//! duplicate), two messages claiming one group seq are a divergence. A second, different message at a
//! slot is a **divergence** (IM-1), and the slot is marked conflicted. The
//! non-conflicted slots form the agreed lists; a message at two agreed seqs
//! of one list is a **duplicate** (IM-2), and so is a payload id seen with
//! two different server message ids. The agreed seq of each message in each
//! list (when unique) feeds the order checks.

use super::anomaly::{Anomaly, AnomalyKind, Sink};
use super::index::{Index, ListId, MsgId, MsgInfo, MsgState, ObsEntry, ObsSource, ReadKind, conv_text};
use super::index::{group_list, list_name};
use crate::history::ConvKind;
use std::collections::{HashMap, HashSet};

/// Agreed positions of messages in lists.
#[derive(Debug, Default)]
pub(crate) struct Positions {
    /// `(list, msg) → seq`, for messages at exactly one agreed seq of the list.
    pub seq_of: HashMap<(ListId, MsgId), u64>,
    /// Per list: `(seq, msg)` of those messages, sorted by seq.
    pub lists: HashMap<ListId, Vec<(u64, MsgId)>>,
    /// Per list: every seq any observation claimed, sorted.
    pub claimed: HashMap<ListId, Vec<u64>>,
}

impl Positions {
    pub fn seq(&self, list: u64, m: MsgId) -> Option<u64> {
        self.seq_of.get(&(list, m)).copied()
    }
}

/// `(list, msg)`.
type ListMsg = (u64, MsgId);
/// `(seq, op index)`.
type SeqAt = (u64, u64);

struct Slot {
    msg: MsgId,
    op: u64,
    conflicted: bool,
}

/// IM-1 and IM-2; returns the agreed positions.
pub(crate) fn agreement(ix: &Index, sink: &mut Sink) -> Positions {
    let mut slots: HashMap<(u64, u64), Slot> = HashMap::new();
    let mut ids: HashMap<MsgId, (u64, u64)> = HashMap::new();
    let mut id_reported: HashSet<MsgId> = HashSet::new();
    let mut observe =
        |list: ListId, seq: u64, m: MsgId, op: u64, sink: &mut Sink| match slots.get_mut(&(list, seq)) {
            None => {
                slots.insert((list, seq), Slot { msg: m, op, conflicted: false });
            }
            Some(slot) if slot.msg != m && !slot.conflicted => {
                slot.conflicted = true;
                sink.push(
                    Anomaly::new(AnomalyKind::Divergence)
                        .list(list)
                        .seq(seq)
                        .ops([slot.op, op])
                        .expected(format!(
                            "one message at {}/{seq}; op {} saw {}",
                            list_name(list),
                            slot.op,
                            ix.name(slot.msg)
                        ))
                        .found(format!("op {op} saw {}", ix.name(m))),
                );
            }
            Some(_) => {}
        };
    let mut check_id = |m: MsgId, id: u64, op: u64, sink: &mut Sink| {
        if id == 0 {
            return;
        }
        match ids.get(&m) {
            None => {
                ids.insert(m, (id, op));
            }
            Some(&(first, first_op)) if first != id && id_reported.insert(m) => sink.push(
                Anomaly::new(AnomalyKind::Duplicate)
                    .msg(ix.name(m))
                    .ops([first_op, op])
                    .expected(format!("one message id for {}; op {first_op} says {first}", ix.name(m)))
                    .found(format!("op {op} says {id}: the payload was applied twice")),
            ),
            Some(_) => {}
        }
    };
    for src in &ix.obs {
        match src {
            &ObsSource::Ack { call, msg, list, seq } => {
                let op = ix.done_op(call);
                observe(list, seq, msg, op, sink);
                let pos = ix.calls[call].complete.unwrap_or(ix.calls[call].invoke);
                if let crate::history::OpBody::Send(v) = &ix.ops[pos].body
                    && let Some(id) = v.message_id
                {
                    check_id(msg, id, op, sink);
                }
            }
            &ObsSource::Read(r) => {
                let read = &ix.reads[r];
                let op = ix.done_op(read.call);
                for e in &read.entries {
                    observe(read.list, e.seq, e.msg, op, sink);
                    if let Some(at) = group_seq_fact(e) {
                        observe(at.0, at.1, e.msg, op, sink);
                    }
                    check_id(e.msg, e.message_id, op, sink);
                }
            }
            ObsSource::Push { op, list, entries } => {
                for e in entries {
                    observe(*list, e.seq, e.msg, *op, sink);
                    if let Some(at) = group_seq_fact(e) {
                        observe(at.0, at.1, e.msg, *op, sink);
                    }
                    check_id(e.msg, e.message_id, *op, sink);
                }
            }
        }
    }

    // Agreed seqs per (list, msg).
    let mut seqs: HashMap<ListMsg, Vec<SeqAt>> = HashMap::new();
    let mut out = Positions::default();
    for (&(list, seq), slot) in &slots {
        out.claimed.entry(list).or_default().push(seq);
        if !slot.conflicted {
            seqs.entry((list, slot.msg)).or_default().push((seq, slot.op));
        }
    }
    for v in out.claimed.values_mut() {
        v.sort_unstable();
    }
    let mut dups: Vec<(ListMsg, Vec<SeqAt>)> = Vec::new();
    for (key, mut at) in seqs {
        if at.len() == 1 {
            out.seq_of.insert(key, at[0].0);
            out.lists.entry(key.0).or_default().push((at[0].0, key.1));
        } else {
            at.sort_unstable();
            dups.push((key, at));
        }
    }
    dups.sort_unstable_by_key(|(_, at)| at[0].1);
    for ((list, m), at) in dups {
        let where_: Vec<String> = at.iter().map(|(s, op)| format!("seq {s} (op {op})")).collect();
        sink.push(
            Anomaly::new(AnomalyKind::Duplicate)
                .list(list)
                .msg(ix.name(m))
                .seq(at[1].0)
                .ops(at.iter().map(|a| a.1))
                .expected(format!("{} at most once in {}'s list", ix.name(m), list_name(list)))
                .found(format!("at {}", where_.join(", "))),
        );
    }
    for l in out.lists.values_mut() {
        l.sort_unstable();
    }
    out
}

/// A group message's copy also claims its place in the group's list.
fn group_seq_fact(e: &ObsEntry) -> Option<(ListId, u64)> {
    (e.kind.is_group() && e.group_seq > 0).then(|| (group_list(e.to), e.group_seq))
}

/// IM-3: each response is exactly `after+1, after+2, ...`; a final read is
/// `1..=len` and, when it reports `last_seq`, ends there; a sync that says
/// `has_more = false` reaches its `last_seq`.
pub(crate) fn contiguity(ix: &Index, sink: &mut Sink) {
    for read in &ix.reads {
        let ops = ix.call_ops(read.call);
        let what = match read.kind {
            ReadKind::Sync => format!("sync after {}", read.after),
            ReadKind::Final => format!("final read through {}", ix.node_of(read)),
        };
        let bad = read.entries.iter().enumerate().find(|(i, e)| e.seq != read.after + 1 + *i as u64);
        if let Some((i, e)) = bad {
            let expected = read.after + 1 + i as u64;
            let got: Vec<u64> = read.entries.iter().map(|e| e.seq).take(12).collect();
            sink.push(
                Anomaly::new(AnomalyKind::Gap)
                    .list(read.list)
                    .seq(expected)
                    .ops(ops)
                    .expected(format!(
                        "{what} of {} to be contiguous: seq {expected} at position {i}",
                        list_name(read.list)
                    ))
                    .found(format!("seq {} ({}); seqs {got:?}", e.seq, ix.name(e.msg))),
            );
            continue;
        }
        let end = read.after + read.entries.len() as u64;
        let short = match read.kind {
            ReadKind::Final => read.last_seq.filter(|&l| l != end),
            ReadKind::Sync => read.last_seq.filter(|&l| read.has_more == Some(false) && l > end),
        };
        if let Some(last) = short {
            sink.push(
                Anomaly::new(AnomalyKind::Gap)
                    .list(read.list)
                    .seq(end + 1)
                    .ops(ops)
                    .expected(format!("{what} of {} to reach its last_seq {last}", list_name(read.list)))
                    .found(format!("it ends at seq {end} with nothing more to read")),
            );
        }
    }
}

/// IM-5: every read entry belongs to an invoked send with the same sender,
/// recipient and conversation kind, sits in one of that message's lists (the
/// two users' lists of a 1:1 message; a member's list or the group's list of
/// a small-group message; the group's list of a super-group message), was
/// sent by a member (group messages), was read no earlier than the send's
/// first invoke, and does not belong to a definitely failed send
/// (`aborted-read`). Server notifications are not sends and are skipped.
/// Reported once per (list, message).
pub(crate) fn phantoms(ix: &Index, sink: &mut Sink) {
    let mut seen: HashSet<(ListId, MsgId)> = HashSet::new();
    for read in &ix.reads {
        let call = &ix.calls[read.call];
        for e in &read.entries {
            if e.notification || !seen.insert((read.list, e.msg)) {
                continue;
            }
            let name = ix.name(e.msg);
            let base = || Anomaly::new(AnomalyKind::Phantom).list(read.list).seq(e.seq).msg(name);
            let Some(info) = ix.msg(e.msg) else {
                sink.push(
                    base()
                        .ops(ix.call_ops(read.call))
                        .expected("every entry to come from an invoked send")
                        .found(format!("no send of {name} was invoked")),
                );
                continue;
            };
            let send_ops: Vec<u64> = info.attempts.iter().flat_map(|&c| ix.call_ops(c)).collect();
            let ops = || ix.call_ops(read.call).into_iter().chain(send_ops.iter().copied());
            if (e.from, e.to, e.kind) != (info.from, info.to, info.kind) {
                sink.push(
                    base()
                        .ops(ops())
                        .expected(format!("{name} {}", ix.conv(info)))
                        .found(format!("the entry says {}", conv_text(e.from, e.to, e.kind))),
                );
            } else if let Some(why) = misplaced(ix, info, read.list) {
                sink.push(base().ops(ops()).expected(format!("{name} ({})", ix.conv(info))).found(why));
            } else if call.complete_time < info.first_invoke {
                sink.push(
                    base().ops(ops()).expected(format!("{name} read only after its send was invoked")).found(
                        format!(
                            "the read completed at {:.3} ms, the send was invoked at {:.3} ms",
                            super::index::ms(call.complete_time),
                            super::index::ms(info.first_invoke)
                        ),
                    ),
                );
            } else if ix.state(info) == MsgState::Failed {
                sink.push(
                    Anomaly::new(AnomalyKind::AbortedRead)
                        .list(read.list)
                        .seq(e.seq)
                        .msg(name)
                        .ops(ops())
                        .expected(format!("{name}, whose send definitely failed, in no list"))
                        .found(format!("it is at seq {} of {}'s list", e.seq, list_name(read.list))),
                );
            }
        }
    }
}

/// Why `info`'s message may not be in `list`, if it may not: a list that is
/// not one of its lists (misdelivery), or a group message whose sender is
/// not a member. Small groups with unknown members are not judged.
fn misplaced(ix: &Index, info: &MsgInfo, list: ListId) -> Option<String> {
    let group = info.kind.is_group().then(|| ix.groups.get(&info.to)).flatten();
    if let Some(g) = group
        && !g.members.contains(&info.from)
    {
        return Some(format!("its sender u{} is not a member of g{}", info.from, info.to));
    }
    let mut allowed = match (info.kind, group) {
        (ConvKind::Group, None) => return None,
        _ => ix.lists_of(info).unwrap_or_default(),
    };
    if info.kind.is_group() {
        allowed.push(group_list(info.to));
    }
    if allowed.contains(&list) {
        return None;
    }
    let names: Vec<String> = allowed.iter().take(8).map(|&l| list_name(l)).collect();
    Some(format!(
        "it is in {}'s list (misdelivery); it belongs only in {}",
        list_name(list),
        names.join(", ")
    ))
}
