//! Property tests: histories generated from a simulated correct system (one
//! shard, linearizable, atomic fan-out; some outcomes hidden as `info`, some
//! of those applied later or never; 1:1 sends, sends to a small group whose
//! messages are copied into every member's list, and to a super group read
//! with group syncs) check valid under the strictest options, and one random
//! mutation of a final read or an ack is always flagged.

use proptest::prelude::*;
use rim_jepsen::checker::{CheckOptions, Consistency, Validity, check, render_text};
use rim_jepsen::history::{
    ConvKind, Entry, FinalReadValue, GroupValue, Op, OpBody, OpType, Process, SendValue, SyncValue,
};
use std::collections::{HashMap, VecDeque};

const USERS: u64 = 3;
/// The small group (users 1 and 2) and the super group (every user).
const SMALL: u64 = 101;
const SUPER: u64 = 102;

fn members(g: u64) -> Vec<u64> {
    if g == SMALL { vec![1, 2] } else { (1..=USERS).collect() }
}

#[derive(Debug, Clone)]
enum Step {
    /// Send from `from` to the `k`-th other user; `outcome`: 0-4 ok, 5 fail,
    /// 6 info applied, 7 info applied later, 8 info never applied.
    Send { from: u64, k: u64, outcome: u8 },
    /// A device sync from its cursor.
    Sync { user: u64, limit: u64 },
    /// Send to the small group (`sup` false, from user 1 or 2) or the super
    /// group; `outcome` as for `Send`.
    GroupSend { from: u64, sup: bool, outcome: u8 },
    /// A read of the super group's list from the device's group cursor.
    GroupSync { user: u64, limit: u64 },
    /// Apply the oldest pending indeterminate send.
    Apply,
    /// A nemesis event.
    Nemesis,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => (1..=USERS, 1..USERS, 0u8..9).prop_map(|(from, k, outcome)| Step::Send { from, k, outcome }),
        3 => (1..=USERS, 1u64..4).prop_map(|(user, limit)| Step::Sync { user, limit }),
        3 => (1..=USERS, any::<bool>(), 0u8..9).prop_map(|(from, sup, outcome)| Step::GroupSend { from, sup, outcome }),
        1 => (1..=USERS, 1u64..4).prop_map(|(user, limit)| Step::GroupSync { user, limit }),
        1 => Just(Step::Apply),
        1 => Just(Step::Nemesis),
    ]
}

#[derive(Default)]
struct Sim {
    ops: Vec<Op>,
    time: u64,
    process: u64,
    lists: HashMap<u64, Vec<Entry>>,
    /// Group lists by group id.
    glists: HashMap<u64, Vec<Entry>>,
    cursors: HashMap<u64, u64>,
    gcursors: HashMap<u64, u64>,
    pending: VecDeque<(u64, u64, String, u64, ConvKind)>,
    next_msg: u64,
}

impl Sim {
    fn push(&mut self, op_type: OpType, process: u64, body: OpBody, node: Option<&str>) {
        self.time += 1_000_000;
        let mut op =
            Op::new(op_type, Process::Worker(process), self.time, body).with_index(self.ops.len() as u64);
        op.node = node.map(str::to_string);
        self.ops.push(op);
    }

    fn apply(&mut self, from: u64, to: u64, id: &str, message_id: u64) -> u64 {
        for user in [from, to] {
            let list = self.lists.entry(user).or_default();
            let seq = list.len() as u64 + 1;
            list.push(Entry { seq, message_id, client_msg_id: id.to_string(), from, to, ..Entry::default() });
        }
        self.lists[&from].len() as u64
    }

    /// Appends to the group's list and, for the small group, to every
    /// member's list (same message id and group seq); returns the group seq.
    fn apply_group(&mut self, from: u64, g: u64, id: &str, message_id: u64) -> u64 {
        let kind = if g == SMALL { ConvKind::Group } else { ConvKind::Super };
        let entry = |seq, group_seq| Entry {
            seq,
            message_id,
            client_msg_id: id.to_string(),
            from,
            to: g,
            kind,
            group_seq,
            notification: false,
        };
        let glist = self.glists.entry(g).or_default();
        let gs = glist.len() as u64 + 1;
        glist.push(entry(gs, gs));
        if g == SMALL {
            for u in members(g) {
                let list = self.lists.entry(u).or_default();
                list.push(entry(list.len() as u64 + 1, gs));
            }
        }
        gs
    }

    fn apply_any(&mut self, from: u64, to: u64, id: &str, message_id: u64, kind: ConvKind) -> u64 {
        if kind.is_user() {
            self.apply(from, to, id, message_id)
        } else {
            self.apply_group(from, to, id, message_id)
        }
    }

    fn create_groups(&mut self) {
        for (g, kind) in [(SMALL, ConvKind::Group), (SUPER, ConvKind::Super)] {
            self.process += 1;
            let p = self.process;
            let mut v = GroupValue { kind, owner: 1, members: members(g), name: String::new(), group: None };
            self.push(OpType::Invoke, p, OpBody::CreateGroup(v.clone()), Some("n1"));
            v.group = Some(g);
            self.push(OpType::Ok, p, OpBody::CreateGroup(v), Some("n1"));
        }
    }

    fn run(steps: &[Step]) -> Vec<Op> {
        let mut s = Sim::default();
        s.create_groups();
        for st in steps {
            s.process += 1;
            let p = s.process;
            match *st {
                Step::Send { .. } | Step::GroupSend { .. } => {
                    let (from, to, kind, outcome) = match *st {
                        Step::Send { from, k, outcome } => {
                            (from, (from - 1 + k) % USERS + 1, ConvKind::User, outcome)
                        }
                        Step::GroupSend { from, sup: true, outcome } => {
                            (from, SUPER, ConvKind::Super, outcome)
                        }
                        Step::GroupSend { from, outcome, .. } => {
                            ((from - 1) % 2 + 1, SMALL, ConvKind::Group, outcome)
                        }
                        _ => unreachable!(),
                    };
                    s.next_msg += 1;
                    let id = format!("p{p}-1");
                    let message_id = 1000 + s.next_msg;
                    let mut v = SendValue {
                        from,
                        device: from * 10 + 1,
                        kind,
                        to,
                        client_msg_id: id.clone(),
                        ..SendValue::default()
                    };
                    s.push(OpType::Invoke, p, OpBody::Send(v.clone()), Some("n1"));
                    match outcome {
                        0..=4 => {
                            let at = s.apply_any(from, to, &id, message_id, kind);
                            if kind.is_user() {
                                v.seq = Some(at);
                            } else {
                                v.group_seq = Some(at);
                            }
                            v.message_id = Some(message_id);
                            s.push(OpType::Ok, p, OpBody::Send(v), Some("n1"));
                        }
                        5 => s.push(OpType::Fail, p, OpBody::Send(v), Some("n1")),
                        _ => {
                            if outcome == 6 {
                                s.apply_any(from, to, &id, message_id, kind);
                            } else if outcome == 7 {
                                s.pending.push_back((from, to, id.clone(), message_id, kind));
                            }
                            s.push(OpType::Info, p, OpBody::Send(v), Some("n1"));
                        }
                    }
                }
                Step::Sync { user, limit } => {
                    let after = s.cursors.get(&user).copied().unwrap_or(0);
                    let mut v = SyncValue {
                        user,
                        device: user * 10 + 1,
                        after,
                        limit: Some(limit),
                        ..SyncValue::default()
                    };
                    s.push(OpType::Invoke, p, OpBody::Sync(v.clone()), Some("n2"));
                    let list = s.lists.get(&user).cloned().unwrap_or_default();
                    let end = (after + limit).min(list.len() as u64);
                    v.entries = Some(list[after as usize..end as usize].to_vec());
                    v.has_more = Some(end < list.len() as u64);
                    v.last_seq = Some(list.len() as u64);
                    s.cursors.insert(user, end);
                    s.push(OpType::Ok, p, OpBody::Sync(v), Some("n2"));
                }
                Step::GroupSync { user, limit } => {
                    let after = s.gcursors.get(&user).copied().unwrap_or(0);
                    let mut v = SyncValue {
                        user,
                        device: user * 10 + 1,
                        group: Some(SUPER),
                        after,
                        limit: Some(limit),
                        ..SyncValue::default()
                    };
                    s.push(OpType::Invoke, p, OpBody::Sync(v.clone()), Some("n3"));
                    let list = s.glists.get(&SUPER).cloned().unwrap_or_default();
                    let end = (after + limit).min(list.len() as u64);
                    v.entries = Some(list[after as usize..end as usize].to_vec());
                    v.has_more = Some(end < list.len() as u64);
                    v.last_seq = Some(list.len() as u64);
                    s.gcursors.insert(user, end);
                    s.push(OpType::Ok, p, OpBody::Sync(v), Some("n3"));
                }
                Step::Apply => {
                    if let Some((from, to, id, mid, kind)) = s.pending.pop_front() {
                        s.apply_any(from, to, &id, mid, kind);
                    }
                }
                Step::Nemesis => {
                    s.time += 1_000_000;
                    let op = Op::new(
                        OpType::Info,
                        Process::nemesis(),
                        s.time,
                        OpBody::Other {
                            f: "partition-start".into(),
                            value: serde_json::json!({"n1": ["n2"]}),
                        },
                    )
                    .with_index(s.ops.len() as u64);
                    s.ops.push(op);
                }
            }
        }
        for user in 1..=USERS {
            for node in ["n1", "n2", "n3"] {
                s.process += 1;
                let p = s.process;
                let mut v = FinalReadValue { user, ..FinalReadValue::default() };
                s.push(OpType::Invoke, p, OpBody::FinalRead(v.clone()), Some(node));
                let list = s.lists.get(&user).cloned().unwrap_or_default();
                v.last_seq = Some(list.len() as u64);
                v.entries = Some(list);
                s.push(OpType::Ok, p, OpBody::FinalRead(v), Some(node));
            }
        }
        for node in ["n1", "n2", "n3"] {
            s.process += 1;
            let p = s.process;
            let mut v = FinalReadValue { user: 1, group: Some(SUPER), ..FinalReadValue::default() };
            s.push(OpType::Invoke, p, OpBody::FinalRead(v.clone()), Some(node));
            let list = s.glists.get(&SUPER).cloned().unwrap_or_default();
            v.last_seq = Some(list.len() as u64);
            v.entries = Some(list);
            s.push(OpType::Ok, p, OpBody::FinalRead(v), Some(node));
        }
        s.ops
    }
}

fn history() -> impl Strategy<Value = Vec<Op>> {
    // The first send is acked, so there is always something to mutate.
    prop::collection::vec(step(), 0..60).prop_map(|mut steps| {
        steps.insert(0, Step::Send { from: 1, k: 1, outcome: 0 });
        Sim::run(&steps)
    })
}

fn strict() -> CheckOptions {
    CheckOptions { consistency: Consistency::Linearizable, single_shard: true }
}

fn final_reads(ops: &[Op]) -> Vec<usize> {
    ops.iter()
        .enumerate()
        .filter(|(_, o)| o.op_type == OpType::Ok && matches!(&o.body, OpBody::FinalRead(v) if v.entries.as_ref().is_some_and(|e| !e.is_empty())))
        .map(|(i, _)| i)
        .collect()
}

fn entries(op: &mut Op) -> &mut Vec<Entry> {
    match &mut op.body {
        OpBody::FinalRead(v) => v.entries.as_mut().expect("ok final read"),
        _ => unreachable!(),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn histories_of_a_correct_system_are_valid(ops in history()) {
        for options in [strict(), CheckOptions::default()] {
            let r = check(&ops, &options);
            prop_assert_eq!(r.valid, Validity::Valid, "{}", render_text(&r));
        }
    }

    #[test]
    fn one_mutation_is_flagged(ops in history(), kind in 0u8..5, a in any::<prop::sample::Index>(), b in any::<prop::sample::Index>()) {
        let mut ops = ops;
        let finals = final_reads(&ops);
        let target = finals[a.index(finals.len())];
        let what = match kind {
            0 => {
                // Drop an entry (renumbering the rest, so the list stays dense).
                let e = entries(&mut ops[target]);
                let i = b.index(e.len());
                e.remove(i);
                for (j, x) in e.iter_mut().enumerate() {
                    x.seq = j as u64 + 1;
                }
                if let OpBody::FinalRead(v) = &mut ops[target].body { v.last_seq = None; }
                "drop"
            }
            1 => {
                let e = entries(&mut ops[target]);
                let mut copy = e[b.index(e.len())].clone();
                copy.seq = e.len() as u64 + 1;
                e.push(copy);
                if let OpBody::FinalRead(v) = &mut ops[target].body { v.last_seq = None; }
                "duplicate"
            }
            2 => {
                let e = entries(&mut ops[target]);
                prop_assume!(e.len() >= 2);
                let i = b.index(e.len() - 1);
                let (s1, s2) = (e[i].seq, e[i + 1].seq);
                e.swap(i, i + 1);
                e[i].seq = s1;
                e[i + 1].seq = s2;
                "swap"
            }
            3 => {
                let e = entries(&mut ops[target]);
                let i = b.index(e.len());
                e[i].seq += 1 + (i as u64 % 3);
                "change seq"
            }
            _ => {
                // Change the seq of an ack.
                let acks: Vec<usize> = ops.iter().enumerate()
                    .filter(|(_, o)| o.op_type == OpType::Ok && matches!(o.body, OpBody::Send(_)))
                    .map(|(i, _)| i).collect();
                let i = acks[b.index(acks.len())];
                if let OpBody::Send(v) = &mut ops[i].body {
                    v.seq = v.seq.map(|s| s + 1);
                    v.group_seq = v.group_seq.map(|s| s + 1);
                }
                "ack seq"
            }
        };
        let r = check(&ops, &strict());
        prop_assert_eq!(r.valid, Validity::Invalid, "{} not flagged:\n{}", what, render_text(&r));
        let r = check(&ops, &CheckOptions::default());
        prop_assert_eq!(r.valid, Validity::Invalid, "{} not flagged with default options:\n{}", what, render_text(&r));
    }
}

#[test]
fn a_long_history_checks_quickly() {
    let steps: Vec<Step> = (0..20_000u64)
        .map(|i| match i % 5 {
            0..=2 => Step::Send { from: i % USERS + 1, k: i % 2 + 1, outcome: (i % 9) as u8 },
            3 => Step::Sync { user: i % USERS + 1, limit: 50 },
            _ => Step::Apply,
        })
        .collect();
    let ops = Sim::run(&steps);
    let start = std::time::Instant::now();
    let r = check(&ops, &strict());
    assert_eq!(r.valid, Validity::Valid, "{}", render_text(&r));
    assert!(start.elapsed().as_secs() < 20, "took {:?}", start.elapsed());
}
