//! Structure of the lists: IM-1 agreement, IM-2 no duplicates, IM-3 dense
//! and contiguous responses, IM-5 no phantoms.
//!
//! Every `(list, seq) → msg` fact (send acks: the sender's list at the acked
//! seq; every entry of every sync and final read) goes into one map keyed by
//! `(list, seq)`, in completion order. A second, different message at a
//! slot is a **divergence** (IM-1), and the slot is marked conflicted. The
//! non-conflicted slots form the agreed lists; a message at two agreed seqs
//! of one list is a **duplicate** (IM-2), and so is a payload id seen with
//! two different server message ids. The agreed seq of each message in each
//! list (when unique) feeds the order checks.

use super::anomaly::{Anomaly, AnomalyKind, Sink};
use super::index::{Index, MsgId, MsgState, ObsSource, ReadKind};
use std::collections::{HashMap, HashSet};

/// Agreed positions of messages in lists.
#[derive(Debug, Default)]
pub(crate) struct Positions {
    /// `(list, msg) → seq`, for messages at exactly one agreed seq of the list.
    pub seq_of: HashMap<(u64, MsgId), u64>,
    /// Per list: `(seq, msg)` of those messages, sorted by seq.
    pub lists: HashMap<u64, Vec<(u64, MsgId)>>,
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
        |list: u64, seq: u64, m: MsgId, op: u64, sink: &mut Sink| match slots.get_mut(&(list, seq)) {
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
                            "one message at u{list}/{seq}; op {} saw {}",
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
            &ObsSource::Ack { call, msg, seq } => {
                let Some(info) = ix.msg(msg) else { continue };
                let op = ix.done_op(call);
                observe(info.from, seq, msg, op, sink);
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
                    observe(read.user, e.seq, e.msg, op, sink);
                    check_id(e.msg, e.message_id, op, sink);
                }
            }
            ObsSource::Push { op, user, entries } => {
                for e in entries {
                    observe(*user, e.seq, e.msg, *op, sink);
                    check_id(e.msg, e.message_id, *op, sink);
                }
            }
        }
    }

    // Agreed seqs per (list, msg).
    let mut seqs: HashMap<ListMsg, Vec<SeqAt>> = HashMap::new();
    for (&(list, seq), slot) in &slots {
        if !slot.conflicted {
            seqs.entry((list, slot.msg)).or_default().push((seq, slot.op));
        }
    }
    let mut out = Positions::default();
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
                .expected(format!("{} at most once in u{list}'s list", ix.name(m)))
                .found(format!("at {}", where_.join(", "))),
        );
    }
    for l in out.lists.values_mut() {
        l.sort_unstable();
    }
    out
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
                    .list(read.user)
                    .seq(expected)
                    .ops(ops)
                    .expected(format!(
                        "{what} of u{} to be contiguous: seq {expected} at position {i}",
                        read.user
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
                    .list(read.user)
                    .seq(end + 1)
                    .ops(ops)
                    .expected(format!("{what} of u{} to reach its last_seq {last}", read.user))
                    .found(format!("it ends at seq {end} with nothing more to read")),
            );
        }
    }
}

/// IM-5: every read entry belongs to an invoked send with the same sender
/// and recipient, sits in one of those two users' lists, was read no earlier
/// than the send's first invoke, and does not belong to a definitely failed
/// send (`aborted-read`). Reported once per (list, message).
pub(crate) fn phantoms(ix: &Index, sink: &mut Sink) {
    let mut seen: HashSet<(u64, MsgId)> = HashSet::new();
    for read in &ix.reads {
        let call = &ix.calls[read.call];
        for e in &read.entries {
            if !seen.insert((read.user, e.msg)) {
                continue;
            }
            let name = ix.name(e.msg);
            let base = || Anomaly::new(AnomalyKind::Phantom).list(read.user).seq(e.seq).msg(name);
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
            if (e.from, e.to) != (info.from, info.to) {
                sink.push(
                    base()
                        .ops(ops())
                        .expected(format!("{name} from u{} to u{}", info.from, info.to))
                        .found(format!("the entry says from u{} to u{}", e.from, e.to)),
                );
            } else if read.user != info.from && read.user != info.to {
                sink.push(
                    base()
                        .ops(ops())
                        .expected(format!("{name} only in u{}'s and u{}'s lists", info.from, info.to))
                        .found(format!("it is in u{}'s list (misdelivery)", read.user)),
                );
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
                        .list(read.user)
                        .seq(e.seq)
                        .msg(name)
                        .ops(ops())
                        .expected(format!("{name}, whose send definitely failed, in no list"))
                        .found(format!("it is at seq {} of u{}'s list", e.seq, read.user)),
                );
            }
        }
    }
}
