//! Order: IM-9 append order, IM-10 conversation order, IM-11 causal order.
//! All use the agreed seqs of [`Positions`]; messages without one agreed seq
//! in a list (conflicted, duplicated or absent) are skipped there.
//!
//! * **order** (IM-9), two forms:
//!   * real time: in list `L`, if message `a` was acked before message `b`
//!     was first invoked, then `seq_L(a) < seq_L(b)`. rim promises this only
//!     for entries written by the acked Raft entry itself, so by default it
//!     is checked among each user's own sends in their own list and among
//!     the messages of each group in the group's list (known from acks,
//!     super-group reads and the `group_seq` of members' copies); with
//!     `single_shard` among all messages of every list. Indeterminate sends
//!     count as never acked. O(n log n) per list (sort plus a suffix minimum
//!     of ack times).
//!   * per sender: for each (sender, recipient) pair, the sender's messages
//!     to that recipient appear in the recipient's list in the order of the
//!     sender's list (rim's in-order relay). Together with the real-time form
//!     on the sender's list this covers FIFO order of one process's
//!     successive sends.
//! * **conversation-order** (IM-10): both participants' lists order the
//!   messages of a 1:1 conversation (both directions) identically. rim
//!   promises this only within a shard, so it is checked only with
//!   `single_shard`, and only for pairs whose per-direction order is intact
//!   (otherwise the `order` anomaly already says it). Groups: see the
//!   `groups` module (always checked).
//! * **causal** (IM-11): if a device's sync returned `m1` (a message of the
//!   conversation between its user `u` and `v`) before the device invoked the
//!   send `m2` from `u` to `v`, then `m1` precedes `m2` in both `u`'s and
//!   `v`'s lists, wherever both are present. Tracked per (device, peer) as the
//!   highest agreed seq seen in each of the two lists, so one pass suffices.

use super::CheckOptions;
use super::anomaly::{Anomaly, AnomalyKind, Sink};
use super::index::{CallKind, Index, MsgId, MsgState, Outcome, list_name, ms};
use super::lists::Positions;
use std::collections::{BTreeMap, HashMap, HashSet};

/// Runs IM-9, IM-10 (with `single_shard`) and IM-11.
pub(crate) fn check(ix: &Index, pos: &Positions, options: &CheckOptions, sink: &mut Sink) {
    real_time(ix, pos, options, sink);
    let broken = per_sender(ix, pos, sink);
    if options.single_shard {
        conversations(ix, pos, &broken, sink);
    }
    causal(ix, pos, sink);
}

/// A message's seqs in two lists: `(seq in the first, seq in the second, msg)`.
type TwoSeqs = (u64, u64, MsgId);

fn ack_time(ix: &Index, m: MsgId) -> u64 {
    ix.msg(m).and_then(|i| i.ack).map_or(u64::MAX, |a| a.time)
}

fn real_time(ix: &Index, pos: &Positions, options: &CheckOptions, sink: &mut Sink) {
    let mut lists: Vec<(&u64, &Vec<(u64, MsgId)>)> = pos.lists.iter().collect();
    lists.sort_unstable_by_key(|(l, _)| **l);
    for (&list, entries) in lists {
        let candidates: Vec<(u64, MsgId)> = entries
            .iter()
            .copied()
            .filter(|&(_, m)| {
                ix.msg(m).is_some_and(|i| {
                    ix.state(i) != MsgState::Failed
                        && ix.written_by_ack(i, options.single_shard).contains(&list)
                })
            })
            .collect();
        // suffix[i] = (earliest ack time, msg) among candidates[i..].
        let mut suffix: Vec<(u64, MsgId)> = vec![(u64::MAX, 0); candidates.len() + 1];
        for i in (0..candidates.len()).rev() {
            let m = candidates[i].1;
            let t = ack_time(ix, m);
            suffix[i] = if t < suffix[i + 1].0 { (t, m) } else { suffix[i + 1] };
        }
        for (i, &(seq, m)) in candidates.iter().enumerate() {
            let info = ix.msg(m).expect("candidate");
            let (t, later) = suffix[i + 1];
            if t >= info.first_invoke {
                continue;
            }
            let later_info = ix.msg(later).expect("candidate");
            let later_seq = pos.seq(list, later).unwrap_or(0);
            let ack = later_info.ack.expect("acked");
            sink.push(
                Anomaly::new(AnomalyKind::Order)
                    .list(list)
                    .seq(seq)
                    .msg(ix.name(m))
                    .ops(ix.call_ops(ack.call).into_iter().chain(ix.call_ops(info.attempts[0])))
                    .expected(format!(
                        "{} (acked at {:.3} ms by op {}) before {} (invoked at {:.3} ms) in {}'s list",
                        ix.name(later),
                        ms(ack.time),
                        ix.done_op(ack.call),
                        ix.name(m),
                        ms(info.first_invoke),
                        list_name(list)
                    ))
                    .found(format!("{} at seq {seq}, {} at seq {later_seq}", ix.name(m), ix.name(later))),
            );
        }
    }
}

/// Per-sender order; returns the (sender, recipient) pairs found broken.
fn per_sender(ix: &Index, pos: &Positions, sink: &mut Sink) -> HashSet<(u64, u64)> {
    let mut pairs: BTreeMap<(u64, u64), Vec<TwoSeqs>> = BTreeMap::new();
    for (m, info) in ix.msgs.iter().enumerate() {
        let Some(info) = info else { continue };
        let m = m as MsgId;
        if info.from == info.to || !info.kind.is_user() {
            continue;
        }
        if let (Some(a), Some(b)) = (pos.seq(info.from, m), pos.seq(info.to, m)) {
            pairs.entry((info.from, info.to)).or_default().push((a, b, m));
        }
    }
    let mut broken = HashSet::new();
    for ((from, to), mut v) in pairs {
        v.sort_unstable();
        for w in v.windows(2) {
            let ((a1, b1, m1), (a2, b2, m2)) = (w[0], w[1]);
            if b2 > b1 {
                continue;
            }
            broken.insert((from, to));
            let ops = [m1, m2].into_iter().filter_map(|m| ix.msg(m)).flat_map(|i| ix.call_ops(i.attempts[0]));
            sink.push(
                Anomaly::new(AnomalyKind::Order)
                    .list(to)
                    .seq(b2)
                    .msg(ix.name(m2))
                    .ops(ops)
                    .expected(format!(
                        "u{from}'s messages to u{to} in u{to}'s list in the sender's order: {} (seq {a1} in u{from}) \
                         before {} (seq {a2} in u{from})",
                        ix.name(m1),
                        ix.name(m2)
                    ))
                    .found(format!("in u{to}'s list {} is at seq {b1} and {} at seq {b2}", ix.name(m1), ix.name(m2))),
            );
        }
    }
    broken
}

fn conversations(ix: &Index, pos: &Positions, broken: &HashSet<(u64, u64)>, sink: &mut Sink) {
    let mut convs: BTreeMap<(u64, u64), Vec<TwoSeqs>> = BTreeMap::new();
    for (m, info) in ix.msgs.iter().enumerate() {
        let Some(info) = info else { continue };
        let m = m as MsgId;
        if info.from == info.to || !info.kind.is_user() {
            continue;
        }
        let (a, b) = (info.from.min(info.to), info.from.max(info.to));
        if let (Some(sa), Some(sb)) = (pos.seq(a, m), pos.seq(b, m)) {
            convs.entry((a, b)).or_default().push((sa, sb, m));
        }
    }
    for ((a, b), mut v) in convs {
        if broken.contains(&(a, b)) || broken.contains(&(b, a)) {
            continue;
        }
        v.sort_unstable();
        for w in v.windows(2) {
            let ((a1, b1, m1), (a2, b2, m2)) = (w[0], w[1]);
            if b2 > b1 {
                continue;
            }
            let ops = [m1, m2].into_iter().filter_map(|m| ix.msg(m)).flat_map(|i| ix.call_ops(i.attempts[0]));
            sink.push(
                Anomaly::new(AnomalyKind::ConversationOrder)
                    .list(b)
                    .seq(b2)
                    .msg(ix.name(m2))
                    .ops(ops)
                    .expected(format!(
                        "u{a} and u{b} to order their conversation alike: u{a} has {} (seq {a1}) before {} (seq {a2})",
                        ix.name(m1),
                        ix.name(m2)
                    ))
                    .found(format!("u{b} has {} at seq {b1} and {} at seq {b2}", ix.name(m1), ix.name(m2))),
            );
        }
    }
}

/// Highest agreed seq seen, in the device's own list and in the peer's.
#[derive(Clone, Copy, Default)]
struct Seen {
    own: Option<(u64, MsgId, usize)>,
    peer: Option<(u64, MsgId, usize)>,
}

fn bump(slot: &mut Option<(u64, MsgId, usize)>, seq: Option<u64>, m: MsgId, call: usize) {
    if let Some(s) = seq
        && slot.is_none_or(|(cur, _, _)| s > cur)
    {
        *slot = Some((s, m, call));
    }
}

fn causal(ix: &Index, pos: &Positions, sink: &mut Sink) {
    let mut seen: HashMap<(u64, u64, u64), Seen> = HashMap::new();
    let mut checks: Vec<(MsgId, usize, Seen)> = Vec::new();
    let mut first_attempt: HashSet<MsgId> = HashSet::new();
    for (p, call) in ix.call_of_pos.iter().enumerate() {
        let Some(c) = *call else { continue };
        let call = &ix.calls[c];
        match call.kind {
            CallKind::Sync { list, user, device }
                if list == user && call.complete == Some(p) && call.outcome == Outcome::Ok =>
            {
                let Some(r) = call.read else { continue };
                for e in &ix.reads[r].entries {
                    let Some(info) = ix.msg(e.msg).filter(|i| i.kind.is_user()) else { continue };
                    let peer = if info.from == user {
                        info.to
                    } else if info.to == user {
                        info.from
                    } else {
                        continue;
                    };
                    let s = seen.entry((user, device, peer)).or_default();
                    bump(&mut s.own, pos.seq(user, e.msg), e.msg, c);
                    bump(&mut s.peer, pos.seq(peer, e.msg), e.msg, c);
                }
            }
            CallKind::Send(m) if call.invoke == p && first_attempt.insert(m) => {
                let Some(info) = ix.msg(m).filter(|i| i.kind.is_user()) else { continue };
                if let Some(&s) = seen.get(&(info.from, info.device, info.to)) {
                    checks.push((m, c, s));
                }
            }
            _ => {}
        }
    }
    for (m2, send_call, s) in checks {
        let info = ix.msg(m2).expect("sent");
        for (list, slot) in [(info.from, s.own), (info.to, s.peer)] {
            let (Some((s1, m1, read_call)), Some(s2)) = (slot, pos.seq(list, m2)) else { continue };
            if m1 == m2 || s1 < s2 {
                continue;
            }
            sink.push(
                Anomaly::new(AnomalyKind::Causal)
                    .list(list)
                    .seq(s2)
                    .msg(ix.name(m2))
                    .ops(ix.call_ops(read_call).into_iter().chain(ix.call_ops(send_call)))
                    .expected(format!(
                        "{} after {} in u{list}'s list: device {} of u{} saw {} (op {}) before sending {}",
                        ix.name(m2),
                        ix.name(m1),
                        info.device,
                        info.from,
                        ix.name(m1),
                        ix.done_op(read_call),
                        ix.name(m2)
                    ))
                    .found(format!("{} at seq {s2}, {} at seq {s1}", ix.name(m2), ix.name(m1))),
            );
        }
    }
}
