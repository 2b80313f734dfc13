//! Reads against real time: IM-4 per-device monotonic reads and IM-8
//! linearizable (or read-your-writes) reads.
//!
//! Both walk the history once in order. A sync response bounds the list's
//! head at read time from below (its highest entry, or `last_seq`) and, when
//! it tells, from above (`last_seq`, or `after + entries` when it was not cut
//! by the page limit).
//!
//! * **non-monotonic-read** (IM-4): for each device, a sync invoked after an
//!   earlier sync of the same device completed must not show a shorter list:
//!   its upper bound must be at least the earlier lower bound. (Entries at or
//!   below `after` are reported by the `gap` check.)
//! * **stale-read** (IM-8): a sync invoked after a send was acked must reach
//!   the acked seq: its upper bound is at least that seq. With
//!   `Consistency::Linearizable` this applies to every device reading the
//!   list the ack names (the sender's list, or the group's list for a group
//!   send, read with `SyncGroup`), and (with `single_shard`, where every
//!   recipient copy is written by the acked entry itself) to the recipients'
//!   lists at the message's agreed seq there. With `Consistency::Session`
//!   (IM-8s) only the sending device's own syncs of that list are checked.
//!   With `Consistency::Eventual` the check is off.
//!
//! Devices are keyed by (user, device): device ids repeat across users.

use super::anomaly::{Anomaly, AnomalyKind, Sink};
use super::index::{CallKind, Index, ListId, MsgId, Outcome, group_list, list_name, ms};
use super::lists::Positions;
use super::{CheckOptions, Consistency};
use std::collections::HashMap;

#[derive(Clone, Copy)]
struct Floor {
    seq: u64,
    call: usize,
}

#[derive(Clone, Copy)]
struct Required {
    seq: u64,
    msg: MsgId,
    call: usize,
    time: u64,
}

fn raise<K: std::hash::Hash + Eq>(map: &mut HashMap<K, Required>, key: K, r: Required) {
    let e = map.entry(key).or_insert(r);
    if r.seq > e.seq {
        *e = r;
    }
}

fn last_text(last: Option<u64>) -> String {
    last.map_or_else(|| "no last_seq".to_string(), |l| format!("last_seq {l}"))
}

/// IM-4 and IM-8.
pub(crate) fn check(ix: &Index, pos: &Positions, options: &CheckOptions, sink: &mut Sink) {
    let mut floors: HashMap<(ListId, u64, u64), Floor> = HashMap::new();
    let mut at_invoke_floor: HashMap<usize, Floor> = HashMap::new();
    let mut required_list: HashMap<ListId, Required> = HashMap::new();
    let mut required_device: HashMap<(ListId, u64, u64), Required> = HashMap::new();
    let mut at_invoke_req: HashMap<usize, Required> = HashMap::new();
    for (p, call) in ix.call_of_pos.iter().enumerate() {
        let Some(c) = *call else { continue };
        let call = &ix.calls[c];
        match call.kind {
            CallKind::Sync { list, user, device } if call.invoke == p => {
                if let Some(&f) = floors.get(&(list, user, device)) {
                    at_invoke_floor.insert(c, f);
                }
                let req = match options.consistency {
                    Consistency::Linearizable => required_list.get(&list),
                    Consistency::Session => required_device.get(&(list, user, device)),
                    Consistency::Eventual => None,
                };
                if let Some(&r) = req {
                    at_invoke_req.insert(c, r);
                }
            }
            CallKind::Sync { list, user, device }
                if call.complete == Some(p) && call.outcome == Outcome::Ok =>
            {
                let Some(r) = call.read else { continue };
                let read = &ix.reads[r];
                let upper = read.upper_head();
                if let (Some(f), Some(up)) = (at_invoke_floor.get(&c), upper)
                    && up < f.seq
                {
                    sink.push(
                        Anomaly::new(AnomalyKind::NonMonotonicRead)
                            .list(list)
                            .seq(f.seq)
                            .ops(ix.call_ops(f.call).into_iter().chain(ix.call_ops(c)))
                            .expected(format!(
                                "device {device} of u{user} never to see {} shrink: op {} saw it reach seq {}",
                                list_name(list),
                                ix.done_op(f.call),
                                f.seq
                            ))
                            .found(format!(
                                "the later sync (after {}, {} entries, {}) shows at most seq {up}",
                                read.after,
                                read.entries.len(),
                                last_text(read.last_seq)
                            )),
                    );
                }
                let lower = read.lower_head();
                let f = floors.entry((list, user, device)).or_insert(Floor { seq: lower, call: c });
                if lower > f.seq {
                    *f = Floor { seq: lower, call: c };
                }
                if let (Some(req), Some(up)) = (at_invoke_req.get(&c), upper)
                    && up < req.seq
                {
                    let name = ix.name(req.msg);
                    sink.push(
                        Anomaly::new(AnomalyKind::StaleRead)
                            .list(list)
                            .seq(req.seq)
                            .msg(name)
                            .ops(ix.call_ops(req.call).into_iter().chain(ix.call_ops(c)))
                            .expected(format!(
                                "a sync of {} invoked {:.1} ms after {name} was acked (op {}) to reach its seq {}",
                                list_name(list),
                                ms(call.invoke_time.saturating_sub(req.time)),
                                ix.done_op(req.call),
                                req.seq
                            ))
                            .found(format!(
                                "device {device} of u{user}: its sync (after {}, {} entries, {}) ends at or below seq {up}: \
                                 {} acked entries missing",
                                read.after,
                                read.entries.len(),
                                last_text(read.last_seq),
                                req.seq - up
                            )),
                    );
                }
            }
            CallKind::Send(m) if call.complete == Some(p) && call.outcome == Outcome::Ok => {
                let Some(info) = ix.msg(m) else { continue };
                if !info.attempts.contains(&c) {
                    continue;
                }
                let acked = match ix.ops[p].body {
                    crate::history::OpBody::Send(ref v) if v.kind.is_group() => {
                        v.group_seq.map(|s| (group_list(v.to), s))
                    }
                    crate::history::OpBody::Send(ref v) => v.seq.map(|s| (v.from, s)),
                    _ => None,
                };
                if let Some((list, seq)) = acked {
                    let r = Required { seq, msg: m, call: c, time: call.complete_time };
                    raise(&mut required_list, list, r);
                    raise(&mut required_device, (list, info.from, info.device), r);
                }
                for list in ix.written_by_ack(info, options.single_shard) {
                    if acked.is_some_and(|(l, _)| l == list) {
                        continue;
                    }
                    if let Some(seq) = pos.seq(list, m) {
                        raise(
                            &mut required_list,
                            list,
                            Required { seq, msg: m, call: c, time: call.complete_time },
                        );
                    }
                }
            }
            _ => {}
        }
    }
}
