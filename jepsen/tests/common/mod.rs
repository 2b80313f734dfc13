//! A compact builder of hand-made histories for the checker tests.

#![allow(dead_code)]

use rim_jepsen::checker::{AnomalyKind, CheckOptions, Results, Validity, check};
use rim_jepsen::history::{
    ConvKind, Entry, FinalReadValue, GroupValue, Op, OpBody, OpType, Process, SendValue, SyncValue,
};
use std::collections::HashMap;

/// Nodes final reads go through.
pub const NODES: [&str; 3] = ["n1", "n2", "n3"];

/// A pending send invoke.
#[derive(Clone, Copy)]
pub struct Pending {
    process: u64,
    value_index: usize,
}

/// Builds a history op by op; time advances 1 ms per op, every call gets a fresh process.
#[derive(Default)]
pub struct H {
    pub ops: Vec<Op>,
    time: u64,
    next_process: u64,
    /// payload id → (from, to, message id)
    sent: HashMap<String, (u64, u64, u64)>,
    /// payload id of a group send → (kind, group seq it got)
    group_sends: HashMap<String, (ConvKind, u64)>,
    /// group id → kind
    groups: HashMap<u64, ConvKind>,
}

impl H {
    pub fn new() -> Self {
        H::default()
    }

    fn push(&mut self, op_type: OpType, process: Process, body: OpBody) -> usize {
        self.time += 1_000_000;
        let op = Op::new(op_type, process, self.time, body).with_index(self.ops.len() as u64);
        self.ops.push(op);
        self.ops.len() - 1
    }

    fn process(&mut self) -> u64 {
        self.next_process += 1;
        self.next_process
    }

    fn send_value(&mut self, from: u64, device: u64, to: u64, id: &str) -> SendValue {
        let n = self.sent.len() as u64;
        self.sent.entry(id.to_string()).or_insert((from, to, 9000 + n));
        SendValue { from, device, to, client_msg_id: id.to_string(), ..SendValue::default() }
    }

    /// Invokes a send from `from`'s device `from*10+1`.
    pub fn invoke_send(&mut self, from: u64, to: u64, id: &str) -> Pending {
        self.invoke_send_dev(from, from * 10 + 1, to, id)
    }

    /// Invokes a send from a given device.
    pub fn invoke_send_dev(&mut self, from: u64, device: u64, to: u64, id: &str) -> Pending {
        let p = self.process();
        let v = self.send_value(from, device, to, id);
        let i = self.push(OpType::Invoke, Process::Worker(p), OpBody::Send(v));
        Pending { process: p, value_index: i }
    }

    /// Completes a send: `Some(seq)` = ok with that seq in the sender's list.
    pub fn complete_send(&mut self, pending: Pending, op_type: OpType, seq: Option<u64>) {
        let OpBody::Send(mut v) = self.ops[pending.value_index].body.clone() else { unreachable!() };
        if op_type == OpType::Ok {
            v.seq = seq;
            v.message_id = Some(self.sent[&v.client_msg_id].2);
        }
        self.push(op_type, Process::Worker(pending.process), OpBody::Send(v));
    }

    pub fn ok_send(&mut self, from: u64, to: u64, id: &str, seq: u64) {
        let p = self.invoke_send(from, to, id);
        self.complete_send(p, OpType::Ok, Some(seq));
    }

    pub fn info_send(&mut self, from: u64, to: u64, id: &str) {
        let p = self.invoke_send(from, to, id);
        self.complete_send(p, OpType::Info, None);
    }

    pub fn fail_send(&mut self, from: u64, to: u64, id: &str) {
        let p = self.invoke_send(from, to, id);
        self.complete_send(p, OpType::Fail, None);
    }

    /// Entries for payload ids at seqs `first..`.
    pub fn entries_from(&self, first: u64, ids: &[&str]) -> Vec<Entry> {
        ids.iter().enumerate().map(|(i, id)| self.entry(first + i as u64, id)).collect()
    }

    /// One entry, sender and recipient from the send (unknown ids: 99 → 99);
    /// group messages also carry their kind and group seq. `#n<group>` is
    /// the creation notification of that group (group seq 1).
    pub fn entry(&self, seq: u64, id: &str) -> Entry {
        if let Some(g) = id.strip_prefix("#n").and_then(|g| g.parse::<u64>().ok()) {
            return self.notification(seq, g);
        }
        let (from, to, message_id) = self.sent.get(id).copied().unwrap_or((99, 99, 0));
        let (kind, group_seq) = self.group_sends.get(id).copied().unwrap_or_default();
        Entry {
            seq,
            message_id,
            client_msg_id: id.to_string(),
            from,
            to,
            kind,
            group_seq,
            ..Entry::default()
        }
    }

    /// The "members added" notification of group `g` at `seq` of a list.
    pub fn notification(&self, seq: u64, g: u64) -> Entry {
        Entry {
            seq,
            message_id: 50_000 + g,
            from: 1,
            to: g,
            kind: self.groups.get(&g).copied().unwrap_or(ConvKind::Group),
            group_seq: 1,
            notification: true,
            ..Entry::default()
        }
    }

    /// Records the creation of group `g` (`kind` group or super) by
    /// `members[0]`, and returns `g`.
    pub fn create_group(&mut self, g: u64, kind: ConvKind, members: &[u64]) -> u64 {
        let p = self.process();
        let mut v = GroupValue {
            kind,
            owner: members[0],
            members: members.to_vec(),
            name: format!("g{g}"),
            group: None,
        };
        self.push(OpType::Invoke, Process::Worker(p), OpBody::CreateGroup(v.clone()));
        v.group = Some(g);
        self.push(OpType::Ok, Process::Worker(p), OpBody::CreateGroup(v));
        self.groups.insert(g, kind);
        g
    }

    /// Invokes a send from `from` to group `g`; `group_seq` is where it
    /// lands if it is applied (entries and an ok completion use it).
    pub fn invoke_group_send(&mut self, from: u64, g: u64, id: &str, group_seq: u64) -> Pending {
        let kind = self.groups.get(&g).copied().unwrap_or(ConvKind::Group);
        self.group_sends.insert(id.to_string(), (kind, group_seq));
        let p = self.process();
        let mut v = self.send_value(from, from * 10 + 1, g, id);
        v.kind = kind;
        let i = self.push(OpType::Invoke, Process::Worker(p), OpBody::Send(v));
        Pending { process: p, value_index: i }
    }

    /// Completes a group send (ok: with its group seq and message id).
    pub fn complete_group_send(&mut self, pending: Pending, op_type: OpType) {
        let OpBody::Send(mut v) = self.ops[pending.value_index].body.clone() else { unreachable!() };
        if op_type == OpType::Ok {
            v.group_seq = Some(self.group_sends[&v.client_msg_id].1);
            v.message_id = Some(self.sent[&v.client_msg_id].2);
        }
        self.push(op_type, Process::Worker(pending.process), OpBody::Send(v));
    }

    pub fn ok_group_send(&mut self, from: u64, g: u64, id: &str, group_seq: u64) {
        let p = self.invoke_group_send(from, g, id, group_seq);
        self.complete_group_send(p, OpType::Ok);
    }

    pub fn info_group_send(&mut self, from: u64, g: u64, id: &str, group_seq: u64) {
        let p = self.invoke_group_send(from, g, id, group_seq);
        self.complete_group_send(p, OpType::Info);
    }

    /// A read of group `g`'s list by device `user*10+1` after group seq `after`.
    pub fn group_sync(&mut self, user: u64, g: u64, after: u64, entries: Vec<Entry>, last_seq: Option<u64>) {
        let p = self.process();
        let mut v = SyncValue {
            user,
            device: user * 10 + 1,
            group: Some(g),
            after,
            limit: Some(100),
            ..SyncValue::default()
        };
        self.push(OpType::Invoke, Process::Worker(p), OpBody::Sync(v.clone()));
        v.entries = Some(entries);
        v.has_more = Some(false);
        v.last_seq = last_seq;
        self.push(OpType::Ok, Process::Worker(p), OpBody::Sync(v));
    }

    /// Final reads of group `g`'s list (read by `reader`) through every
    /// node, all returning `ids` from group seq 1.
    pub fn group_finals(&mut self, g: u64, reader: u64, ids: &[&str]) {
        for node in NODES {
            let e = self.entries_from(1, ids);
            let p = self.process();
            let mut v = FinalReadValue { user: reader, group: Some(g), ..FinalReadValue::default() };
            let i = self.push(OpType::Invoke, Process::Worker(p), OpBody::FinalRead(v.clone()));
            self.ops[i].node = Some(node.into());
            v.last_seq = Some(e.len() as u64);
            v.entries = Some(e);
            let i = self.push(OpType::Ok, Process::Worker(p), OpBody::FinalRead(v));
            self.ops[i].node = Some(node.into());
        }
    }

    /// A sync of `user`'s list by device `user*10+1`.
    pub fn sync(&mut self, user: u64, after: u64, entries: Vec<Entry>, last_seq: Option<u64>) {
        self.sync_dev(user, user * 10 + 1, after, entries, last_seq)
    }

    pub fn sync_dev(
        &mut self,
        user: u64,
        device: u64,
        after: u64,
        entries: Vec<Entry>,
        last_seq: Option<u64>,
    ) {
        let p = self.process();
        let mut v = SyncValue { user, device, after, limit: Some(100), ..SyncValue::default() };
        self.push(OpType::Invoke, Process::Worker(p), OpBody::Sync(v.clone()));
        v.entries = Some(entries);
        v.has_more = Some(false);
        v.last_seq = last_seq;
        self.push(OpType::Ok, Process::Worker(p), OpBody::Sync(v));
    }

    /// A final read of `user` through `node` returning `entries`.
    pub fn final_raw(&mut self, user: u64, node: &str, entries: Vec<Entry>) {
        let p = self.process();
        let mut v = FinalReadValue { user, ..FinalReadValue::default() };
        let i = self.push(OpType::Invoke, Process::Worker(p), OpBody::FinalRead(v.clone()));
        self.ops[i].node = Some(node.into());
        v.entries = Some(entries);
        let i = self.push(OpType::Ok, Process::Worker(p), OpBody::FinalRead(v));
        self.ops[i].node = Some(node.into());
    }

    /// Final reads of `user` through every node, all returning `ids` from seq 1.
    pub fn finals(&mut self, user: u64, ids: &[&str]) {
        for node in NODES {
            let e = self.entries_from(1, ids);
            self.final_raw(user, node, e);
        }
    }

    /// A live push of `entries` to a device of `user` (no invoke).
    pub fn push_to(&mut self, user: u64, entries: Vec<Entry>) {
        let p = self.process();
        let value = serde_json::json!({ "user": user, "device": 1, "entries": entries });
        self.push(
            OpType::Ok,
            Process::Worker(p),
            OpBody::Other { f: rim_jepsen::history::F_PUSH.into(), value },
        );
    }

    pub fn nemesis(&mut self, f: &str) {
        self.push(
            OpType::Info,
            Process::nemesis(),
            OpBody::Other { f: f.into(), value: serde_json::Value::Null },
        );
    }

    pub fn check(&self) -> Results {
        check(&self.ops, &CheckOptions::default())
    }

    pub fn check_with(&self, options: CheckOptions) -> Results {
        check(&self.ops, &options)
    }
}

/// Asserts the results hold exactly `kind` and prints its first example.
pub fn assert_only(r: &Results, kind: AnomalyKind) {
    assert_eq!(r.valid, Validity::Invalid, "{}", rim_jepsen::checker::render_text(r));
    assert_eq!(r.anomaly_types, vec![kind.name().to_string()], "{}", rim_jepsen::checker::render_text(r));
    let g = &r.anomalies[kind.name()];
    assert!(g.count >= 1 && !g.examples.is_empty());
    let text = g.examples[0].text();
    assert!(!g.examples[0].ops.is_empty(), "{text}");
    assert!(!g.examples[0].expected.is_empty() && !g.examples[0].found.is_empty(), "{text}");
    eprintln!("{kind}: {text}");
}

/// Asserts a valid verdict.
pub fn assert_valid(r: &Results) {
    assert_eq!(r.valid, Validity::Valid, "{}", rim_jepsen::checker::render_text(r));
}
