//! Typed anomalies with stable kind names, and the bounded collector that
//! keeps a count plus up to [`MAX_EXAMPLES`] examples per kind.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Examples kept per anomaly kind.
pub const MAX_EXAMPLES: usize = 8;

/// The kinds of anomaly. The serialised (kebab-case) names are stable: tests,
/// CI and issues refer to them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AnomalyKind {
    /// IM-1: two observations put different messages at one (list, seq).
    Divergence,
    /// IM-1: final reads of one list through different nodes have different lengths.
    FinalReadMismatch,
    /// IM-2: a message occurs at two seqs of one list, or got two message ids.
    Duplicate,
    /// IM-3: a response is not contiguous from `after + 1`, or stops short of its `last_seq`.
    Gap,
    /// IM-4: a device's later sync shows a shorter list than an earlier one.
    NonMonotonicRead,
    /// IM-5: an entry no send explains (unknown payload, wrong sender or
    /// recipient, wrong list, or seen before it was sent).
    Phantom,
    /// IM-5: an entry of a send that definitely failed.
    AbortedRead,
    /// IM-6: an acked send is missing from a final read of one of its lists.
    LostAck,
    /// IM-6: an entry a sync observed is missing from a final read of that list.
    LostEntry,
    /// IM-7: an indeterminate send is in one participant's final list but not the other's.
    PartialFanout,
    /// IM-8 / IM-8s: a sync invoked after an ack does not reach the acked seq.
    StaleRead,
    /// IM-9: seq order contradicts real-time order, or a sender's order is
    /// not kept in the recipient's list.
    Order,
    /// IM-10: the two participants' lists order a conversation differently.
    ConversationOrder,
    /// IM-11: a message sent after its device saw another one is placed before it.
    Causal,
    /// IM-13: a committed message's `message.created` event never arrived.
    LostEvent,
    /// IM-13: an event arrived for a message that was never committed, or
    /// names another sender or payload than the message.
    PhantomEvent,
    /// IM-13: one event id arrived with different bodies, or one message
    /// got two event ids.
    EventMismatch,
    /// IM-13: a conversation's events first arrived out of its order.
    EventOrder,
    /// IM-13: a webhook request did not verify under the endpoint's secrets.
    BadSignature,
}

impl AnomalyKind {
    /// Every kind, in report order.
    pub const ALL: [AnomalyKind; 19] = [
        AnomalyKind::Divergence,
        AnomalyKind::FinalReadMismatch,
        AnomalyKind::Duplicate,
        AnomalyKind::Gap,
        AnomalyKind::NonMonotonicRead,
        AnomalyKind::Phantom,
        AnomalyKind::AbortedRead,
        AnomalyKind::LostAck,
        AnomalyKind::LostEntry,
        AnomalyKind::PartialFanout,
        AnomalyKind::StaleRead,
        AnomalyKind::Order,
        AnomalyKind::ConversationOrder,
        AnomalyKind::Causal,
        AnomalyKind::LostEvent,
        AnomalyKind::PhantomEvent,
        AnomalyKind::EventMismatch,
        AnomalyKind::EventOrder,
        AnomalyKind::BadSignature,
    ];

    /// The stable name (`"lost-ack"`, ...).
    pub fn name(self) -> &'static str {
        match self {
            AnomalyKind::Divergence => "divergence",
            AnomalyKind::FinalReadMismatch => "final-read-mismatch",
            AnomalyKind::Duplicate => "duplicate",
            AnomalyKind::Gap => "gap",
            AnomalyKind::NonMonotonicRead => "non-monotonic-read",
            AnomalyKind::Phantom => "phantom",
            AnomalyKind::AbortedRead => "aborted-read",
            AnomalyKind::LostAck => "lost-ack",
            AnomalyKind::LostEntry => "lost-entry",
            AnomalyKind::PartialFanout => "partial-fanout",
            AnomalyKind::StaleRead => "stale-read",
            AnomalyKind::Order => "order",
            AnomalyKind::ConversationOrder => "conversation-order",
            AnomalyKind::Causal => "causal",
            AnomalyKind::LostEvent => "lost-event",
            AnomalyKind::PhantomEvent => "phantom-event",
            AnomalyKind::EventMismatch => "event-mismatch",
            AnomalyKind::EventOrder => "event-order",
            AnomalyKind::BadSignature => "bad-signature",
        }
    }

    /// The invariant of `reference/jepsen.md` §2.3 it violates.
    pub fn invariant(self) -> &'static str {
        match self {
            AnomalyKind::Divergence | AnomalyKind::FinalReadMismatch => "IM-1",
            AnomalyKind::Duplicate => "IM-2",
            AnomalyKind::Gap => "IM-3",
            AnomalyKind::NonMonotonicRead => "IM-4",
            AnomalyKind::Phantom | AnomalyKind::AbortedRead => "IM-5",
            AnomalyKind::LostAck | AnomalyKind::LostEntry => "IM-6",
            AnomalyKind::PartialFanout => "IM-7",
            AnomalyKind::StaleRead => "IM-8",
            AnomalyKind::Order => "IM-9",
            AnomalyKind::ConversationOrder => "IM-10",
            AnomalyKind::Causal => "IM-11",
            AnomalyKind::LostEvent
            | AnomalyKind::PhantomEvent
            | AnomalyKind::EventMismatch
            | AnomalyKind::EventOrder
            | AnomalyKind::BadSignature => "IM-13",
        }
    }
}

impl std::fmt::Display for AnomalyKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One concrete violation with its evidence.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Anomaly {
    /// What kind.
    pub kind: AnomalyKind,
    /// The user whose list is concerned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub list: Option<u64>,
    /// The group whose list is concerned (instead of a user's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<u64>,
    /// The seq concerned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    /// The payload id (`client_msg_id`) concerned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub msg: Option<String>,
    /// History indices of the operations that prove it.
    pub ops: Vec<u64>,
    /// What should have been.
    pub expected: String,
    /// What the history shows.
    pub found: String,
}

impl Anomaly {
    /// An anomaly of `kind` with no evidence yet.
    pub fn new(kind: AnomalyKind) -> Self {
        Anomaly {
            kind,
            list: None,
            group: None,
            seq: None,
            msg: None,
            ops: Vec::new(),
            expected: String::new(),
            found: String::new(),
        }
    }

    /// Sets the list: a user id, or (inside the checker) a group's list id,
    /// which sets `group`.
    pub fn list(mut self, list: u64) -> Self {
        match super::index::group_of(list) {
            Some(g) => self.group = Some(g),
            None => self.list = Some(list),
        }
        self
    }

    /// Sets the seq.
    pub fn seq(mut self, seq: u64) -> Self {
        self.seq = Some(seq);
        self
    }

    /// Sets the payload id.
    pub fn msg(mut self, msg: impl Into<String>) -> Self {
        self.msg = Some(msg.into());
        self
    }

    /// Sets the evidence ops (sorted, deduplicated).
    pub fn ops(mut self, ops: impl IntoIterator<Item = u64>) -> Self {
        let mut ops: Vec<u64> = ops.into_iter().collect();
        ops.sort_unstable();
        ops.dedup();
        self.ops = ops;
        self
    }

    /// Sets what was expected.
    pub fn expected(mut self, text: impl Into<String>) -> Self {
        self.expected = text.into();
        self
    }

    /// Sets what was found.
    pub fn found(mut self, text: impl Into<String>) -> Self {
        self.found = text.into();
        self
    }

    /// One readable line.
    pub fn text(&self) -> String {
        let mut s = String::new();
        if let Some(list) = self.list {
            s.push_str(&format!("list u{list} "));
        }
        if let Some(group) = self.group {
            s.push_str(&format!("list g{group} "));
        }
        if let Some(seq) = self.seq {
            s.push_str(&format!("seq {seq} "));
        }
        if let Some(msg) = &self.msg {
            s.push_str(&format!("msg {msg} "));
        }
        s.push_str(&format!("(ops {:?}): expected {}; found {}", self.ops, self.expected, self.found));
        s
    }
}

/// Count and examples of one kind.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AnomalyGroup {
    /// The invariant, `IM-n`.
    pub invariant: String,
    /// How many were found.
    pub count: u64,
    /// Up to [`MAX_EXAMPLES`] of them, first found first.
    pub examples: Vec<Anomaly>,
}

/// Collects anomalies, bounded per kind.
#[derive(Debug, Default)]
pub(crate) struct Sink {
    pub(crate) groups: BTreeMap<AnomalyKind, AnomalyGroup>,
}

impl Sink {
    pub(crate) fn push(&mut self, a: Anomaly) {
        let g = self.groups.entry(a.kind).or_insert_with(|| AnomalyGroup {
            invariant: a.kind.invariant().to_string(),
            count: 0,
            examples: Vec::new(),
        });
        g.count += 1;
        if g.examples.len() < MAX_EXAMPLES {
            g.examples.push(a);
        }
    }
}
