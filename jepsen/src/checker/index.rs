//! One pass over the history that pairs invocations with completions and
//! indexes sends (by interned payload id) and successful reads.
//!
//! Pairing: a worker process has at most one operation outstanding; a
//! completion belongs to its process's pending invoke. An invoke with no
//! completion counts as `info`. Irregularities (a completion without an
//! invoke, a second invoke while one is pending, a completion of another
//! `f`) are reported as warnings and make the result at best Unknown.

use crate::history::{Entry, Op, OpBody, OpType, Process};
use std::collections::HashMap;

/// Interned payload id.
pub(crate) type MsgId = u32;

/// How a call ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    Ok,
    Fail,
    Info,
}

/// What a call was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CallKind {
    Send(MsgId),
    Sync { user: u64, device: u64 },
    Final { user: u64 },
}

/// An invocation and its completion.
#[derive(Debug, Clone)]
pub(crate) struct Call {
    pub invoke: usize,
    pub complete: Option<usize>,
    pub outcome: Outcome,
    pub invoke_time: u64,
    /// `u64::MAX` without a completion.
    pub complete_time: u64,
    pub kind: CallKind,
    /// Index into [`Index::reads`] for successful syncs and final reads.
    pub read: Option<usize>,
}

/// The first successful ack of a message.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Ack {
    pub call: usize,
    pub seq: Option<u64>,
    pub time: u64,
}

/// What the history says about one payload id that some `send` invoked.
#[derive(Debug, Clone)]
pub(crate) struct MsgInfo {
    pub from: u64,
    pub to: u64,
    pub device: u64,
    /// Send calls with this payload id (retries), in invoke order.
    pub attempts: Vec<usize>,
    pub first_invoke: u64,
    pub ack: Option<Ack>,
}

/// The combined outcome of a message's attempts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MsgState {
    Acked,
    Failed,
    Indeterminate,
}

/// Sync or final read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ReadKind {
    Sync,
    Final,
}

/// A returned entry, payload id interned.
#[derive(Debug, Clone)]
pub(crate) struct ObsEntry {
    pub seq: u64,
    pub msg: MsgId,
    pub message_id: u64,
    pub from: u64,
    pub to: u64,
}

/// A successful sync or final read.
#[derive(Debug, Clone)]
pub(crate) struct Read {
    pub call: usize,
    pub kind: ReadKind,
    pub user: u64,
    pub node: Option<String>,
    pub after: u64,
    pub limit: Option<u64>,
    pub entries: Vec<ObsEntry>,
    pub has_more: Option<bool>,
    pub last_seq: Option<u64>,
}

impl Read {
    /// The highest seq the list is known to have had at read time.
    pub fn lower_head(&self) -> u64 {
        let top = self.entries.iter().map(|e| e.seq).max().unwrap_or(0);
        top.max(self.last_seq.unwrap_or(0))
    }

    /// An upper bound of the list's head at read time, if the response tells.
    pub fn upper_head(&self) -> Option<u64> {
        if let Some(last) = self.last_seq {
            return Some(last);
        }
        let n = self.entries.len() as u64;
        let truncated = self.has_more == Some(true) || self.limit.is_some_and(|l| n >= l);
        (!truncated).then_some(self.after + n)
    }
}

/// A `(list, seq) → msg` fact, in completion order.
#[derive(Debug, Clone)]
pub(crate) enum ObsSource {
    /// A send's ok completion: the message is at `seq` of the sender's list.
    Ack { call: usize, msg: MsgId, seq: u64 },
    /// Every entry of a read.
    Read(usize),
    /// A live push to a device of `user` (history index `op`): the entries
    /// claim positions in `user`'s list, so they join the agreement (IM-1)
    /// and message-id checks, but not the read checks (a push is no read).
    Push { op: u64, user: u64, entries: Vec<ObsEntry> },
}

/// The indexed history.
#[derive(Debug)]
pub(crate) struct Index<'a> {
    pub ops: &'a [Op],
    pub calls: Vec<Call>,
    /// Position in `ops` → call, for worker operations.
    pub call_of_pos: Vec<Option<usize>>,
    pub names: Vec<String>,
    pub ids: HashMap<String, MsgId>,
    /// By [`MsgId`]; `None` when no send was invoked with that payload id.
    pub msgs: Vec<Option<MsgInfo>>,
    /// Successful reads, in completion order.
    pub reads: Vec<Read>,
    /// `(list, seq) → msg` facts in completion order.
    pub obs: Vec<ObsSource>,
    /// Final reads that did not complete `ok`.
    pub unfinished_finals: Vec<usize>,
    /// Positions of nemesis completions (or info-only nemesis lines).
    pub nemesis: Vec<usize>,
    pub warnings: Vec<String>,
    /// The history breaks the pairing rules: at best Unknown.
    pub malformed: bool,
}

impl<'a> Index<'a> {
    pub fn build(ops: &'a [Op]) -> Self {
        let mut ix = Index {
            ops,
            calls: Vec::new(),
            call_of_pos: vec![None; ops.len()],
            names: Vec::new(),
            ids: HashMap::new(),
            msgs: Vec::new(),
            reads: Vec::new(),
            obs: Vec::new(),
            unfinished_finals: Vec::new(),
            nemesis: Vec::new(),
            warnings: Vec::new(),
            malformed: false,
        };
        let mut pending: HashMap<&Process, usize> = HashMap::new();
        let mut other_fs: HashMap<&str, u64> = HashMap::new();
        for (pos, op) in ops.iter().enumerate() {
            if op.process.is_nemesis() {
                if op.op_type != OpType::Invoke {
                    ix.nemesis.push(pos);
                }
                continue;
            }
            let kind = match &op.body {
                OpBody::Send(v) => CallKind::Send(ix.intern(&v.client_msg_id)),
                OpBody::Sync(v) => CallKind::Sync { user: v.user, device: v.device },
                OpBody::FinalRead(v) => CallKind::Final { user: v.user },
                // Pushes have no invoke: observations of the pushed-to
                // user's list, outside the pairing rules.
                OpBody::Other { f, value } if f == crate::history::F_PUSH => {
                    if op.op_type == OpType::Ok {
                        ix.add_push(op.index, value);
                    }
                    continue;
                }
                OpBody::Other { f, .. } => {
                    *other_fs.entry(f.as_str()).or_default() += 1;
                    continue;
                }
            };
            if op.op_type == OpType::Invoke {
                if let Some(old) = pending.insert(&op.process, ix.calls.len()) {
                    ix.warn(format!(
                        "process {} invoked op {} while op {} was pending; the earlier one counts as info",
                        op.process, op.index, ops[ix.calls[old].invoke].index
                    ));
                }
                ix.call_of_pos[pos] = Some(ix.calls.len());
                ix.calls.push(Call {
                    invoke: pos,
                    complete: None,
                    outcome: Outcome::Info,
                    invoke_time: op.time,
                    complete_time: u64::MAX,
                    kind,
                    read: None,
                });
                if let (CallKind::Send(m), OpBody::Send(v)) = (kind, &op.body) {
                    ix.add_attempt(m, v.from, v.to, v.device, op.time);
                }
                continue;
            }
            let call = match pending.remove(&op.process) {
                Some(c) if ix.ops[ix.calls[c].invoke].f() == op.f() => c,
                other => {
                    ix.warn(format!(
                        "op {} ({} {} of process {}) has no matching invoke; ignored",
                        op.index,
                        serde_json::to_string(&op.op_type).unwrap_or_default(),
                        op.f(),
                        op.process
                    ));
                    if let Some(c) = other {
                        pending.insert(&op.process, c);
                    }
                    continue;
                }
            };
            ix.call_of_pos[pos] = Some(call);
            let outcome = match op.op_type {
                OpType::Ok => Outcome::Ok,
                OpType::Fail => Outcome::Fail,
                _ => Outcome::Info,
            };
            let c = &mut ix.calls[call];
            c.complete = Some(pos);
            c.outcome = outcome;
            c.complete_time = op.time;
            ix.complete(call, pos, outcome);
        }
        for (f, n) in other_fs {
            ix.warnings.push(format!("ignored {n} worker ops with unknown f {f:?}"));
        }
        for c in 0..ix.calls.len() {
            if let (CallKind::Final { .. }, Outcome::Fail | Outcome::Info) =
                (ix.calls[c].kind, ix.calls[c].outcome)
            {
                ix.unfinished_finals.push(c);
            }
        }
        ix
    }

    fn warn(&mut self, text: String) {
        self.malformed = true;
        self.warnings.push(text);
    }

    pub fn intern(&mut self, name: &str) -> MsgId {
        if let Some(&id) = self.ids.get(name) {
            return id;
        }
        let id = self.names.len() as MsgId;
        self.names.push(name.to_string());
        self.ids.insert(name.to_string(), id);
        self.msgs.push(None);
        id
    }

    fn add_attempt(&mut self, m: MsgId, from: u64, to: u64, device: u64, time: u64) {
        let call = self.calls.len() - 1;
        match &mut self.msgs[m as usize] {
            Some(info) => {
                if (info.from, info.to) != (from, to) {
                    let text = format!(
                        "client_msg_id {} reused for a different message (u{from}→u{to} vs u{}→u{}); \
                         payload ids must be unique",
                        self.names[m as usize], info.from, info.to
                    );
                    self.warn(text);
                    return;
                }
                info.attempts.push(call);
            }
            slot @ None => {
                *slot =
                    Some(MsgInfo { from, to, device, attempts: vec![call], first_invoke: time, ack: None })
            }
        }
    }

    fn complete(&mut self, call: usize, pos: usize, outcome: Outcome) {
        let op = &self.ops[pos];
        let invoke = &self.ops[self.calls[call].invoke];
        match (self.calls[call].kind, &op.body, &invoke.body) {
            (CallKind::Send(m), OpBody::Send(v), _) if outcome == Outcome::Ok => {
                if let Some(info) = self.msgs[m as usize].as_mut()
                    && info.attempts.contains(&call)
                    && info.ack.is_none()
                {
                    info.ack = Some(Ack { call, seq: v.seq, time: op.time });
                }
                if let Some(seq) = v.seq {
                    self.obs.push(ObsSource::Ack { call, msg: m, seq });
                }
            }
            (CallKind::Sync { user, .. }, OpBody::Sync(v), OpBody::Sync(req)) if outcome == Outcome::Ok => {
                let entries = self.entries(v.entries.as_deref(), op.index);
                let read = Read {
                    call,
                    kind: ReadKind::Sync,
                    user,
                    node: op.node.clone().or_else(|| invoke.node.clone()),
                    after: req.after,
                    limit: req.limit.or(v.limit),
                    entries,
                    has_more: v.has_more,
                    last_seq: v.last_seq,
                };
                self.push_read(call, read);
            }
            (CallKind::Final { user }, OpBody::FinalRead(v), _) if outcome == Outcome::Ok => {
                let entries = self.entries(v.entries.as_deref(), op.index);
                let read = Read {
                    call,
                    kind: ReadKind::Final,
                    user,
                    node: op.node.clone().or_else(|| invoke.node.clone()),
                    after: 0,
                    limit: None,
                    entries,
                    has_more: None,
                    last_seq: v.last_seq,
                };
                self.push_read(call, read);
            }
            _ => {}
        }
    }

    fn entries(&mut self, entries: Option<&[Entry]>, index: u64) -> Vec<ObsEntry> {
        let Some(entries) = entries else {
            self.warn(format!("ok read op {index} has no entries"));
            return Vec::new();
        };
        entries
            .iter()
            .map(|e| ObsEntry {
                seq: e.seq,
                msg: self.intern(&e.client_msg_id),
                message_id: e.message_id,
                from: e.from,
                to: e.to,
            })
            .collect()
    }

    /// Records a push `{"user":U,"device":D,"entries":[..]}`; a push that
    /// does not parse is a warning, not an anomaly.
    fn add_push(&mut self, index: u64, value: &serde_json::Value) {
        #[derive(serde::Deserialize)]
        struct Push {
            user: u64,
            entries: Vec<Entry>,
        }
        match <Push as serde::Deserialize>::deserialize(value) {
            Ok(p) => {
                let entries = self.entries(Some(&p.entries), index);
                self.obs.push(ObsSource::Push { op: index, user: p.user, entries });
            }
            Err(e) => self.warnings.push(format!("push op {index} ignored: {e}")),
        }
    }

    fn push_read(&mut self, call: usize, read: Read) {
        self.calls[call].read = Some(self.reads.len());
        self.obs.push(ObsSource::Read(self.reads.len()));
        self.reads.push(read);
    }

    /// History index of a position.
    pub fn idx(&self, pos: usize) -> u64 {
        self.ops[pos].index
    }

    /// History indices of a call's invoke and completion.
    pub fn call_ops(&self, call: usize) -> Vec<u64> {
        let c = &self.calls[call];
        std::iter::once(c.invoke).chain(c.complete).map(|p| self.idx(p)).collect()
    }

    /// History index of a call's completion (or invoke).
    pub fn done_op(&self, call: usize) -> u64 {
        let c = &self.calls[call];
        self.idx(c.complete.unwrap_or(c.invoke))
    }

    pub fn name(&self, m: MsgId) -> &str {
        &self.names[m as usize]
    }

    pub fn msg(&self, m: MsgId) -> Option<&MsgInfo> {
        self.msgs[m as usize].as_ref()
    }

    pub fn state(&self, info: &MsgInfo) -> MsgState {
        if info.ack.is_some() {
            MsgState::Acked
        } else if info.attempts.iter().all(|&c| self.calls[c].outcome == Outcome::Fail) {
            MsgState::Failed
        } else {
            MsgState::Indeterminate
        }
    }

    /// The node label of a read, `?` when unknown.
    pub fn node_of(&self, read: &Read) -> String {
        read.node.clone().unwrap_or_else(|| "?".to_string())
    }
}

/// Nanoseconds to milliseconds, for texts.
pub(crate) fn ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}
