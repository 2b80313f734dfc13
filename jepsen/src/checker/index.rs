//! One pass over the history that pairs invocations with completions and
//! indexes sends (by interned payload id) and successful reads.
//!
//! Pairing: a worker process has at most one operation outstanding; a
//! completion belongs to its process's pending invoke. An invoke with no
//! completion counts as `info`. Irregularities (a completion without an
//! invoke, a second invoke while one is pending, a completion of another
//! `f`) are reported as warnings and make the result at best Unknown.

use crate::history::{ConvKind, Entry, Op, OpBody, OpType, Process};
use std::collections::{BTreeMap, HashMap};

/// Interned payload id (notifications: `#n<message id>`).
pub(crate) type MsgId = u32;

/// A list: a user's (the user id) or a group's (the group id with
/// [`GROUP_BIT`] set). Texts name them `u<id>` and `g<id>`.
pub(crate) type ListId = u64;

/// Marks a group's list in a [`ListId`]; rim's ids stay below 2^63.
const GROUP_BIT: u64 = 1 << 63;

/// The list of group `g`.
pub(crate) fn group_list(g: u64) -> ListId {
    g | GROUP_BIT
}

/// The group whose list `list` is, if it is a group's.
pub(crate) fn group_of(list: ListId) -> Option<u64> {
    (list & GROUP_BIT != 0).then_some(list & !GROUP_BIT)
}

/// `u3` or `g77`.
pub(crate) fn list_name(list: ListId) -> String {
    match group_of(list) {
        Some(g) => format!("g{g}"),
        None => format!("u{list}"),
    }
}

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
    /// A device of `user` reads `list` (its own, or a group's).
    Sync {
        list: ListId,
        user: u64,
        device: u64,
    },
    Final {
        list: ListId,
    },
    CreateGroup,
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
    /// 1:1: the seq in the sender's list.
    pub seq: Option<u64>,
    /// Group sends: the seq in the group's list.
    pub group_seq: Option<u64>,
    pub time: u64,
}

/// What the history says about one payload id that some `send` invoked.
#[derive(Debug, Clone)]
pub(crate) struct MsgInfo {
    pub from: u64,
    /// The recipient user, or the group of a group send.
    pub to: u64,
    pub kind: ConvKind,
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
    pub kind: ConvKind,
    /// 0 when not a group message (or not recorded).
    pub group_seq: u64,
    pub notification: bool,
}

/// A successful sync or final read.
#[derive(Debug, Clone)]
pub(crate) struct Read {
    pub call: usize,
    pub kind: ReadKind,
    pub list: ListId,
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
    /// A send's ok completion: the message is at `seq` of `list` (the
    /// sender's list for 1:1 sends, the group's list for group sends).
    Ack { call: usize, msg: MsgId, list: ListId, seq: u64 },
    /// Every entry of a read.
    Read(usize),
    /// A live push to a device (history index `op`): the entries claim
    /// positions in `list`, so they join the agreement (IM-1) and message-id
    /// checks, but not the read checks (a push is no read).
    Push { op: u64, list: ListId, entries: Vec<ObsEntry> },
}

/// A group created at set-up.
#[derive(Debug, Clone)]
pub(crate) struct GroupMeta {
    pub kind: ConvKind,
    /// Every member, ascending.
    pub members: Vec<u64>,
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
    /// Groups whose creation completed `ok`, by id.
    pub groups: BTreeMap<u64, GroupMeta>,
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
            groups: BTreeMap::new(),
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
                OpBody::Sync(v) => CallKind::Sync {
                    list: v.group.map_or(v.user, group_list),
                    user: v.user,
                    device: v.device,
                },
                OpBody::FinalRead(v) => CallKind::Final { list: v.group.map_or(v.user, group_list) },
                OpBody::CreateGroup(_) => CallKind::CreateGroup,
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
                    ix.add_attempt(m, v, op.time);
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

    fn add_attempt(&mut self, m: MsgId, v: &crate::history::SendValue, time: u64) {
        let call = self.calls.len() - 1;
        match &mut self.msgs[m as usize] {
            Some(info) => {
                if (info.from, info.to, info.kind) != (v.from, v.to, v.kind) {
                    let text = format!(
                        "client_msg_id {} reused for a different message ({} vs {}); payload ids must be unique",
                        self.names[m as usize],
                        conv_text(v.from, v.to, v.kind),
                        conv_text(info.from, info.to, info.kind)
                    );
                    self.warn(text);
                    return;
                }
                info.attempts.push(call);
            }
            slot @ None => {
                *slot = Some(MsgInfo {
                    from: v.from,
                    to: v.to,
                    kind: v.kind,
                    device: v.device,
                    attempts: vec![call],
                    first_invoke: time,
                    ack: None,
                })
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
                    info.ack = Some(Ack { call, seq: v.seq, group_seq: v.group_seq, time: op.time });
                }
                let at = if v.kind.is_group() {
                    v.group_seq.map(|s| (group_list(v.to), s))
                } else {
                    v.seq.map(|s| (v.from, s))
                };
                if let Some((list, seq)) = at {
                    self.obs.push(ObsSource::Ack { call, msg: m, list, seq });
                }
            }
            (CallKind::CreateGroup, OpBody::CreateGroup(v), _) if outcome == Outcome::Ok => {
                if let Some(g) = v.group {
                    let mut members = v.members.clone();
                    members.push(v.owner);
                    members.sort_unstable();
                    members.dedup();
                    self.groups.insert(g, GroupMeta { kind: v.kind, members });
                }
            }
            (CallKind::Sync { list, .. }, OpBody::Sync(v), OpBody::Sync(req)) if outcome == Outcome::Ok => {
                let entries = self.entries(v.entries.as_deref(), op.index);
                let read = Read {
                    call,
                    kind: ReadKind::Sync,
                    list,
                    node: op.node.clone().or_else(|| invoke.node.clone()),
                    after: req.after,
                    limit: req.limit.or(v.limit),
                    entries,
                    has_more: v.has_more,
                    last_seq: v.last_seq,
                };
                self.push_read(call, read);
            }
            (CallKind::Final { list }, OpBody::FinalRead(v), _) if outcome == Outcome::Ok => {
                let entries = self.entries(v.entries.as_deref(), op.index);
                let read = Read {
                    call,
                    kind: ReadKind::Final,
                    list,
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
                msg: if e.notification {
                    self.intern(&format!("#n{}", e.message_id))
                } else {
                    self.intern(&e.client_msg_id)
                },
                message_id: e.message_id,
                from: e.from,
                to: e.to,
                kind: e.kind,
                group_seq: e.group_seq,
                notification: e.notification,
            })
            .collect()
    }

    /// Records a push `{"user":U,"device":D,"entries":[..]}` (with
    /// `"group":G`: entries of G's list); a push that does not parse is a
    /// warning, not an anomaly.
    fn add_push(&mut self, index: u64, value: &serde_json::Value) {
        #[derive(serde::Deserialize)]
        struct Push {
            user: u64,
            #[serde(default)]
            group: Option<u64>,
            entries: Vec<Entry>,
        }
        match <Push as serde::Deserialize>::deserialize(value) {
            Ok(p) => {
                let entries = self.entries(Some(&p.entries), index);
                let list = p.group.map_or(p.user, group_list);
                self.obs.push(ObsSource::Push { op: index, list, entries });
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

    /// Every list a message belongs in: both users of a 1:1 message (one
    /// when a user writes to themself), every member's list for a small
    /// group (`None` when the group's members are unknown), the group's list
    /// for a super group or room, none for other kinds.
    pub fn lists_of(&self, info: &MsgInfo) -> Option<Vec<ListId>> {
        match info.kind {
            ConvKind::User if info.from == info.to => Some(vec![info.from]),
            ConvKind::User => Some(vec![info.from, info.to]),
            ConvKind::Group => self.groups.get(&info.to).map(|g| g.members.clone()),
            ConvKind::Super | ConvKind::Room => Some(vec![group_list(info.to)]),
            ConvKind::System => Some(Vec::new()),
        }
    }

    /// The lists the acked entry itself writes, where real-time order and
    /// linearizable reads hold: the sender's list (1:1) or the group's
    /// list, plus, with `single_shard`, every recipient's list.
    pub fn written_by_ack(&self, info: &MsgInfo, single_shard: bool) -> Vec<ListId> {
        let mut out = match info.kind {
            ConvKind::User => vec![info.from],
            _ => vec![group_list(info.to)],
        };
        if single_shard {
            out.extend(self.lists_of(info).unwrap_or_default());
            out.sort_unstable();
            out.dedup();
        }
        out
    }

    /// The acked position: `(list, seq)` in the sender's list (1:1) or the
    /// group's list.
    pub fn acked_at(&self, info: &MsgInfo) -> Option<(ListId, u64)> {
        let ack = info.ack?;
        match info.kind {
            ConvKind::User => ack.seq.map(|s| (info.from, s)),
            _ => ack.group_seq.map(|s| (group_list(info.to), s)),
        }
    }

    /// `u1→u2`, `u1→g7 (small group)`, ...
    pub fn conv(&self, info: &MsgInfo) -> String {
        conv_text(info.from, info.to, info.kind)
    }
}

/// `u1→u2`, `u1→g7 (small group)`, `u1→g7 (super group)`.
pub(crate) fn conv_text(from: u64, to: u64, kind: ConvKind) -> String {
    match kind {
        ConvKind::User => format!("u{from}→u{to}"),
        ConvKind::Group => format!("u{from}→g{to} (small group)"),
        ConvKind::Super => format!("u{from}→g{to} (super group)"),
        ConvKind::Room => format!("u{from}→g{to} (room)"),
        ConvKind::System => format!("u{from}→{to} (system)"),
    }
}

/// Nanoseconds to milliseconds, for texts.
pub(crate) fn ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}
