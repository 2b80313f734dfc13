//! The operation history: typed operations, a streaming JSONL writer and a
//! tolerant reader.
//!
//! One line of `history.jsonl` is one [`Op`], with Jepsen's field names:
//!
//! | field | meaning |
//! |---|---|
//! | `index` | position in the history, 0, 1, 2, ... |
//! | `time` | nanoseconds since the test started (the harness's monotonic clock) |
//! | `type` | `invoke`, `ok` (it happened), `fail` (it definitely did not happen), `info` (unknown) |
//! | `process` | a worker number, or `"nemesis"` |
//! | `f` | `send`, `sync`, `final-read`, or a nemesis function (`partition-start`, `kill`, ...) |
//! | `value` | the operation's arguments (invoke) and results (completion), see below |
//! | `node` | optional: the node the client talked to (required for `final-read`) |
//! | `error` | optional: the error text of a `fail`/`info` completion |
//!
//! Each worker process runs one operation at a time: an `invoke` line is
//! written before the request goes out, and its completion (`ok`, `fail` or
//! `info`) after the answer. A process whose operation ended `info` is
//! considered crashed and must not invoke again; the worker continues under a
//! new process number. An `invoke` without a completion (the history ends
//! first) counts as `info`.
//!
//! Values by `f` (completions repeat the invoke's fields and add results):
//!
//! * `send` ([`SendValue`]): `{"from":3,"device":31,"to":9,"client_msg_id":"p7-31"}`; the
//!   `ok` completion adds `seq` (the message's seq in the **sender's** list) and
//!   `message_id`. A group send names the conversation kind and the group:
//!   `{"from":3,"device":31,"kind":"group","to":77,"client_msg_id":"p7-32"}`
//!   (`kind` `group` for a small group, `super` for a super group; `to` is
//!   the group id); its `ok` completion adds `group_seq` (the message's seq
//!   in the group's list) and `message_id`, and no `seq`.
//! * `sync` ([`SyncValue`]): a device's read of its user's list:
//!   `{"user":9,"device":91,"after":38,"limit":100}`; `ok` adds `entries`
//!   (`[{"seq":39,"message_id":..,"client_msg_id":"p2-12","from":2,"to":9}]`),
//!   `has_more` and `last_seq`. With `"group":77` it is a read of the group's
//!   list (`SyncGroup`) by a member: `after`, the entries' `seq` and
//!   `last_seq` are group seqs.
//! * `final-read` ([`FinalReadValue`]): the complete list of `user`, read
//!   through `node` (all pages) after healing; `ok` adds `entries` and
//!   optionally `last_seq`. With `"group":77`: the complete list of that
//!   group, read by member `user`.
//! * Entries of group messages add `kind` (`group`, `super`), `group_seq`
//!   (the message's seq in the group list, equal in every copy) and `to` is
//!   the group id. A server notification (e.g. "members added", written by
//!   `create-group`) has `"notification":true` and an empty `client_msg_id`.
//! * `create-group` ([`GroupValue`], set-up, before any fault):
//!   `{"kind":"group","owner":3,"members":[3,5,9],"name":".."}`; `ok` adds
//!   `group` (the id). `members` includes the owner. A group's lists are
//!   named `g<id>` in texts, users' lists `u<id>`.
//! * `push` (kept as [`OpBody::Other`], type `ok`, no invoke): a device
//!   received entries of its user's list as a live push over its gateway
//!   connection: `{"user":9,"device":91,"entries":[..]}`. The checker uses
//!   them as observations of `user`'s list (agreement, message ids); reports
//!   use them for delivery lag (ack to first observation). With `"group":77`
//!   the entries are of that group's list (a super-group push).
//! * nemesis operations (process `"nemesis"`, type `info`, kept as
//!   [`OpBody::Other`]): `start-<fault>` opens a fault window and
//!   `stop-<fault>` closes it (`fault` = `partition`, `kill`, `pause`,
//!   `clock`), with `value` naming the targets, e.g.
//!   `{"nodes":[2],"shape":"isolate"}`; the final phase logs `final-heal`
//!   and `recovered`.
//! * anything else ([`OpBody::Other`]): unknown functions, kept as raw JSON.
//!
//! Payload ids (`client_msg_id`) must be unique per message in a history
//! (e.g. `p<process>-<n>`); several `send` invokes with the same id are
//! retries of one message.

use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::{self, BufRead, BufReader, BufWriter, Write};
use std::path::Path;

use crate::error::{Error, Result, io_err};

/// `f` of a send.
pub const F_SEND: &str = "send";
/// `f` of a device sync.
pub const F_SYNC: &str = "sync";
/// `f` of a final read.
pub const F_FINAL_READ: &str = "final-read";
/// `f` of a live push observed by a device (no invoke).
pub const F_PUSH: &str = "push";
/// `f` of a group creation at set-up.
pub const F_CREATE_GROUP: &str = "create-group";
/// The process name of the nemesis.
pub const NEMESIS: &str = "nemesis";

/// Jepsen's operation type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OpType {
    /// The operation starts.
    Invoke,
    /// It happened.
    Ok,
    /// It definitely did not happen.
    Fail,
    /// Unknown: it may or may not have happened (timeout, crash, retryable code).
    Info,
}

/// A logical process: a worker number or a name (`"nemesis"`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Process {
    /// A client worker.
    Worker(u64),
    /// A named process, `"nemesis"` in practice.
    Named(String),
}

impl Process {
    /// The nemesis process.
    pub fn nemesis() -> Self {
        Process::Named(NEMESIS.to_string())
    }

    /// Whether this is the nemesis.
    pub fn is_nemesis(&self) -> bool {
        matches!(self, Process::Named(n) if n == NEMESIS)
    }
}

impl std::fmt::Display for Process {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Process::Worker(n) => write!(f, "{n}"),
            Process::Named(n) => f.write_str(n),
        }
    }
}

/// The kind of conversation a send or a list entry belongs to (rim's
/// `ConversationKind`). Serialised lowercase; `user` (1:1) is the default and
/// is left out of the JSON, so histories without kinds read as 1:1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConvKind {
    /// 1:1: `to` is the recipient user.
    #[default]
    User,
    /// Small group (write diffusion): `to` is the group.
    Group,
    /// Super group (read diffusion): `to` is the group.
    Super,
    /// Room: `to` is the room.
    Room,
    /// System notification.
    System,
}

impl ConvKind {
    /// 1:1.
    pub fn is_user(&self) -> bool {
        *self == ConvKind::User
    }

    /// A small or super group, or a room: `to` names a group list.
    pub fn is_group(&self) -> bool {
        matches!(self, ConvKind::Group | ConvKind::Super | ConvKind::Room)
    }
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

fn is_false(v: &bool) -> bool {
    !*v
}

/// Value of a `send`: from user `from`, device `device`, to user `to` (1:1)
/// or to group `to` (`kind` group or super).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct SendValue {
    /// Sender user id.
    pub from: u64,
    /// Sender device id.
    pub device: u64,
    /// Conversation kind; `user` (1:1) when absent.
    #[serde(default, skip_serializing_if = "ConvKind::is_user")]
    pub kind: ConvKind,
    /// Recipient user id, or the group id of a group send.
    pub to: u64,
    /// The unique payload id, used as rim's idempotency key.
    pub client_msg_id: String,
    /// `ok` only: the message's seq in the sender's list (1:1 sends).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    /// `ok` only: the server-assigned message id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_id: Option<u64>,
    /// `ok` only, group sends: the message's seq in the group's list.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_seq: Option<u64>,
}

/// One entry of a list as returned by a sync or a final read.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Entry {
    /// Position in the list that was read.
    pub seq: u64,
    /// Server message id; 0 when not recorded.
    #[serde(default)]
    pub message_id: u64,
    /// Payload id (empty for notifications).
    pub client_msg_id: String,
    /// Sender user id.
    pub from: u64,
    /// Recipient user id, or the group id of a group message.
    pub to: u64,
    /// Conversation kind; `user` when absent.
    #[serde(default, skip_serializing_if = "ConvKind::is_user")]
    pub kind: ConvKind,
    /// Group messages: the seq in the group's list (equal in every copy).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub group_seq: u64,
    /// A server notification (no send explains it).
    #[serde(default, skip_serializing_if = "is_false")]
    pub notification: bool,
}

/// Value of a `sync`: device `device` of `user` reads `user`'s list after
/// `after`, or (with `group`) that group's list after group seq `after`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct SyncValue {
    /// Owner of the list (the reader, for a group list).
    pub user: u64,
    /// Reading device.
    pub device: u64,
    /// A read of this group's list (`SyncGroup`) instead of `user`'s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<u64>,
    /// Cursor: entries with seq > `after` are asked for.
    pub after: u64,
    /// Page size asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u64>,
    /// `ok` only: the returned entries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entries: Option<Vec<Entry>>,
    /// `ok` only: whether the server had more entries than returned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub has_more: Option<bool>,
    /// `ok` only: the list's last seq as reported by the server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seq: Option<u64>,
}

/// Value of a `final-read`: the complete list of `user`, or of `group` as
/// read by member `user` (through the op's `node`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct FinalReadValue {
    /// Owner of the list (the reader, for a group list).
    pub user: u64,
    /// The complete list of this group instead of `user`'s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<u64>,
    /// `ok` only: every entry of the list, seq 1 first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entries: Option<Vec<Entry>>,
    /// `ok` only, optional: the list's last seq as reported by the server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seq: Option<u64>,
}

/// Value of a `create-group`: `owner` creates a group of `kind` with
/// `members` (owner included); `ok` adds the new `group` id.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct GroupValue {
    /// `group` (small) or `super`.
    pub kind: ConvKind,
    /// The creating user, also a member.
    pub owner: u64,
    /// Every member, the owner included, ascending.
    pub members: Vec<u64>,
    /// Display name.
    #[serde(default)]
    pub name: String,
    /// `ok` only: the group id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<u64>,
}

/// The typed `f` + `value` of an operation.
#[derive(Debug, Clone, PartialEq)]
pub enum OpBody {
    /// `f = "send"`.
    Send(SendValue),
    /// `f = "sync"`.
    Sync(SyncValue),
    /// `f = "final-read"`.
    FinalRead(FinalReadValue),
    /// `f = "create-group"`.
    CreateGroup(GroupValue),
    /// Nemesis operations and any other `f`, kept as raw JSON.
    Other {
        /// The function name.
        f: String,
        /// The raw value.
        value: serde_json::Value,
    },
}

impl OpBody {
    /// The `f` field.
    pub fn f(&self) -> &str {
        match self {
            OpBody::Send(_) => F_SEND,
            OpBody::Sync(_) => F_SYNC,
            OpBody::FinalRead(_) => F_FINAL_READ,
            OpBody::CreateGroup(_) => F_CREATE_GROUP,
            OpBody::Other { f, .. } => f,
        }
    }
}

/// One history line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "RawOp", into = "RawOp")]
pub struct Op {
    /// Position in the history.
    pub index: u64,
    /// Nanoseconds since the test started.
    pub time: u64,
    /// invoke / ok / fail / info.
    pub op_type: OpType,
    /// Worker number or `"nemesis"`.
    pub process: Process,
    /// The node the client talked to, if any.
    pub node: Option<String>,
    /// Error text of a failed or indeterminate completion.
    pub error: Option<String>,
    /// `f` and `value`.
    pub body: OpBody,
}

impl Op {
    /// A new operation with index 0 (the writer assigns indices), no node, no error.
    pub fn new(op_type: OpType, process: Process, time: u64, body: OpBody) -> Self {
        Op { index: 0, time, op_type, process, node: None, error: None, body }
    }

    /// Sets the node.
    pub fn with_node(mut self, node: impl Into<String>) -> Self {
        self.node = Some(node.into());
        self
    }

    /// Sets the error text.
    pub fn with_error(mut self, error: impl Into<String>) -> Self {
        self.error = Some(error.into());
        self
    }

    /// Sets the index.
    pub fn with_index(mut self, index: u64) -> Self {
        self.index = index;
        self
    }

    /// The `f` field.
    pub fn f(&self) -> &str {
        self.body.f()
    }
}

/// The on-disk shape of an [`Op`].
#[derive(Serialize, Deserialize)]
struct RawOp {
    index: u64,
    time: u64,
    #[serde(rename = "type")]
    op_type: OpType,
    process: Process,
    f: String,
    #[serde(default)]
    value: serde_json::Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    node: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

impl TryFrom<RawOp> for Op {
    type Error = String;

    fn try_from(raw: RawOp) -> Result<Self, String> {
        let typed = |e: serde_json::Error| format!("bad value of {:?}: {e}", raw.f);
        let body = match raw.f.as_str() {
            F_SEND if !raw.process.is_nemesis() => {
                OpBody::Send(serde_json::from_value(raw.value.clone()).map_err(typed)?)
            }
            F_SYNC if !raw.process.is_nemesis() => {
                OpBody::Sync(serde_json::from_value(raw.value.clone()).map_err(typed)?)
            }
            F_FINAL_READ if !raw.process.is_nemesis() => {
                OpBody::FinalRead(serde_json::from_value(raw.value.clone()).map_err(typed)?)
            }
            F_CREATE_GROUP if !raw.process.is_nemesis() => {
                OpBody::CreateGroup(serde_json::from_value(raw.value.clone()).map_err(typed)?)
            }
            _ => OpBody::Other { f: raw.f.clone(), value: raw.value.clone() },
        };
        Ok(Op {
            index: raw.index,
            time: raw.time,
            op_type: raw.op_type,
            process: raw.process,
            node: raw.node,
            error: raw.error,
            body,
        })
    }
}

impl From<Op> for RawOp {
    fn from(op: Op) -> Self {
        let f = op.f().to_string();
        let value = match op.body {
            OpBody::Send(v) => serde_json::to_value(v),
            OpBody::Sync(v) => serde_json::to_value(v),
            OpBody::FinalRead(v) => serde_json::to_value(v),
            OpBody::CreateGroup(v) => serde_json::to_value(v),
            OpBody::Other { value, .. } => Ok(value),
        }
        .unwrap_or(serde_json::Value::Null);
        RawOp {
            index: op.index,
            time: op.time,
            op_type: op.op_type,
            process: op.process,
            f,
            value,
            node: op.node,
            error: op.error,
        }
    }
}

/// Streaming JSONL writer: one line per op, flushed as it is written, so a
/// crash loses at most the line being written. Buffering is bounded by one
/// line (each line is serialised first, then written and flushed).
pub struct HistoryWriter<W: Write> {
    out: BufWriter<W>,
    next_index: u64,
    line: Vec<u8>,
}

impl HistoryWriter<File> {
    /// Creates (or truncates) `path`.
    pub fn create(path: impl AsRef<Path>) -> io::Result<Self> {
        Ok(HistoryWriter::new(File::create(path)?))
    }
}

impl<W: Write> HistoryWriter<W> {
    /// Wraps a writer; indices start at 0.
    pub fn new(w: W) -> Self {
        HistoryWriter { out: BufWriter::with_capacity(64 * 1024, w), next_index: 0, line: Vec::new() }
    }

    /// Assigns the next index to `op`, writes and flushes it, and returns it.
    pub fn append(&mut self, mut op: Op) -> io::Result<Op> {
        op.index = self.next_index;
        self.append_as_is(&op)?;
        Ok(op)
    }

    /// Writes `op` with its own index (the next assigned index follows it).
    pub fn append_as_is(&mut self, op: &Op) -> io::Result<()> {
        self.line.clear();
        serde_json::to_writer(&mut self.line, op).map_err(io::Error::other)?;
        self.line.push(b'\n');
        self.out.write_all(&self.line)?;
        self.out.flush()?;
        self.next_index = self.next_index.max(op.index + 1);
        if self.line.capacity() > 1 << 20 {
            self.line = Vec::new();
        }
        Ok(())
    }

    /// The index the next [`append`](Self::append) assigns.
    pub fn next_index(&self) -> u64 {
        self.next_index
    }

    /// Flushes and returns the inner writer.
    pub fn into_inner(self) -> io::Result<W> {
        self.out.into_inner().map_err(|e| e.into_error())
    }
}

/// A history read from JSONL.
#[derive(Debug, Clone, Default)]
pub struct LoadedHistory {
    /// The operations, in file order.
    pub ops: Vec<Op>,
    /// Problems that were tolerated (a truncated last line).
    pub warnings: Vec<String>,
}

/// What [`Error::Io`] says of a history that could not be read.
const READING: &str = "reading the history";

/// Reads `path` (see [`parse_history`]).
pub fn read_history(path: impl AsRef<Path>) -> Result<LoadedHistory> {
    parse_history(BufReader::new(File::open(path).map_err(io_err(READING))?))
}

/// Parses JSONL. Blank lines are skipped. A last line that does not parse
/// (the writer crashed mid-line) is dropped with a warning; any other bad
/// line is an error.
pub fn parse_history(mut input: impl BufRead) -> Result<LoadedHistory> {
    let mut out = LoadedHistory::default();
    let mut line = String::new();
    let mut pending: Option<(usize, String)> = None;
    let mut number = 0;
    loop {
        line.clear();
        if input.read_line(&mut line).map_err(io_err(READING))? == 0 {
            break;
        }
        number += 1;
        if let Some((n, message)) = pending.take() {
            return Err(Error::BadHistoryLine { line: n, message });
        }
        let text = line.trim();
        if text.is_empty() {
            continue;
        }
        match serde_json::from_str::<Op>(text) {
            Ok(op) => out.ops.push(op),
            Err(e) => pending = Some((number, e.to_string())),
        }
    }
    if let Some((n, message)) = pending {
        out.warnings.push(format!("ignored the truncated last line {n} of the history: {message}"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn send_invoke() -> Op {
        Op::new(
            OpType::Invoke,
            Process::Worker(7),
            12,
            OpBody::Send(SendValue {
                from: 3,
                device: 31,
                to: 9,
                client_msg_id: "p7-1".into(),
                ..SendValue::default()
            }),
        )
        .with_node("n2")
    }

    #[test]
    fn ops_round_trip_with_jepsen_field_names() {
        let op = send_invoke().with_index(4);
        let text = serde_json::to_string(&op).unwrap();
        assert!(text.contains(r#""type":"invoke""#), "{text}");
        assert!(text.contains(r#""f":"send""#), "{text}");
        assert!(text.contains(r#""process":7"#), "{text}");
        assert_eq!(serde_json::from_str::<Op>(&text).unwrap(), op);

        let nemesis = Op::new(
            OpType::Info,
            Process::nemesis(),
            5,
            OpBody::Other {
                f: "partition-start".into(),
                value: serde_json::json!({"grudge": {"n1": ["n2"]}}),
            },
        );
        let text = serde_json::to_string(&nemesis).unwrap();
        assert!(text.contains(r#""process":"nemesis""#), "{text}");
        assert_eq!(serde_json::from_str::<Op>(&text).unwrap(), nemesis);
    }

    #[test]
    fn old_one_to_one_lines_parse_and_group_fields_round_trip() {
        let old = r#"{"index":0,"time":1,"type":"ok","process":2,"f":"sync","value":{"user":9,"device":1,"after":0,"entries":[{"seq":1,"message_id":5,"client_msg_id":"p1-1","from":3,"to":9}]}}"#;
        let op: Op = serde_json::from_str(old).unwrap();
        let OpBody::Sync(v) = &op.body else { panic!("{op:?}") };
        assert_eq!(v.group, None);
        let e = &v.entries.as_ref().unwrap()[0];
        assert_eq!((e.kind, e.group_seq, e.notification), (ConvKind::User, 0, false));
        let again: serde_json::Value = serde_json::from_str(&serde_json::to_string(&op).unwrap()).unwrap();
        let before: serde_json::Value = serde_json::from_str(old).unwrap();
        assert_eq!(again, before, "1:1 lines are written as before");

        let send = Op::new(
            OpType::Ok,
            Process::Worker(4),
            9,
            OpBody::Send(SendValue {
                from: 3,
                device: 1,
                kind: ConvKind::Super,
                to: 77,
                client_msg_id: "p4-2".into(),
                message_id: Some(12),
                group_seq: Some(3),
                ..SendValue::default()
            }),
        );
        let text = serde_json::to_string(&send).unwrap();
        assert!(text.contains(r#""kind":"super""#) && text.contains(r#""group_seq":3"#), "{text}");
        assert_eq!(serde_json::from_str::<Op>(&text).unwrap(), send);

        let create = Op::new(
            OpType::Ok,
            Process::Worker(900_000),
            1,
            OpBody::CreateGroup(GroupValue {
                kind: ConvKind::Group,
                owner: 3,
                members: vec![3, 5],
                name: "g".into(),
                group: Some(77),
            }),
        );
        let text = serde_json::to_string(&create).unwrap();
        assert!(text.contains(r#""f":"create-group""#), "{text}");
        assert_eq!(serde_json::from_str::<Op>(&text).unwrap(), create);
    }

    #[test]
    fn writer_assigns_indices_and_reader_tolerates_a_truncated_tail() {
        let mut w = HistoryWriter::new(Vec::new());
        let a = w.append(send_invoke()).unwrap();
        let b = w.append(send_invoke()).unwrap();
        assert_eq!((a.index, b.index), (0, 1));
        let mut bytes = w.into_inner().unwrap();
        bytes.extend_from_slice(br#"{"index":2,"time":1"#);
        let h = parse_history(&bytes[..]).unwrap();
        assert_eq!(h.ops.len(), 2);
        assert_eq!(h.warnings.len(), 1, "{:?}", h.warnings);
    }

    #[test]
    fn a_bad_line_in_the_middle_is_an_error() {
        let good = serde_json::to_string(&send_invoke()).unwrap();
        let text = format!("{good}\nnot json\n{good}\n");
        match parse_history(text.as_bytes()) {
            Err(Error::BadHistoryLine { line, .. }) => assert_eq!(line, 2),
            other => panic!("{other:?}"),
        }
    }
}
