//! Pairs invocations with their completions into calls, the unit every
//! picture draws: a call spans invoke → completion on one process.
//!
//! A completion on a process whose open invocation has the same `f` closes
//! it. A completion with no such invocation (a `push`, a nemesis event
//! logged without an invoke, a malformed history) is a call of its own, of
//! zero length. An invocation never completed stays [`Outcome::Open`] and
//! ends at the history's last time; a second invocation on the same process
//! leaves the first open.

use crate::history::{Op, OpType, Process};
use std::collections::HashMap;

/// How a call ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Outcome {
    /// `ok`.
    Ok,
    /// `fail`.
    Fail,
    /// `info`.
    Info,
    /// Never completed.
    Open,
}

impl Outcome {
    /// CSS class and legend name.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Fail => "fail",
            Outcome::Info => "info",
            Outcome::Open => "open",
        }
    }

    fn of(t: OpType) -> Self {
        match t {
            OpType::Ok => Outcome::Ok,
            OpType::Fail => Outcome::Fail,
            OpType::Info => Outcome::Info,
            OpType::Invoke => Outcome::Open,
        }
    }
}

/// One invocation and its completion (either may be missing, not both).
#[derive(Debug, Clone)]
pub(crate) struct Call<'a> {
    /// The invocation, if any.
    pub(crate) invoke: Option<&'a Op>,
    /// The completion, if any.
    pub(crate) completion: Option<&'a Op>,
    /// The completion if any, else the invocation.
    pub(crate) op: &'a Op,
    /// How it ended.
    pub(crate) outcome: Outcome,
    /// Start, ns.
    pub(crate) start: u64,
    /// End, ns (≥ start; the history's end for open calls).
    pub(crate) end: u64,
    /// Position in the history slice of its first line.
    pub(crate) position: usize,
}

impl<'a> Call<'a> {
    /// `f`.
    pub(crate) fn f(&self) -> &'a str {
        self.op.f()
    }

    /// The process.
    pub(crate) fn process(&self) -> &'a Process {
        &self.op.process
    }

    /// Invoke-to-completion time, ns, when both exist.
    pub(crate) fn latency(&self) -> Option<u64> {
        match (self.invoke, self.completion) {
            (Some(i), Some(c)) => Some(c.time.saturating_sub(i.time)),
            _ => None,
        }
    }

    /// History indices of its lines.
    pub(crate) fn indices(&self) -> impl Iterator<Item = u64> + '_ {
        self.invoke.iter().chain(self.completion.iter()).map(|o| o.index)
    }
}

/// Pairs the history into calls, ordered by their first line.
pub(crate) fn pair(ops: &[Op], end_ns: u64) -> Vec<Call<'_>> {
    let mut calls: Vec<Call<'_>> = Vec::with_capacity(ops.len() / 2 + 1);
    let mut open: HashMap<&Process, usize> = HashMap::new();
    for (position, op) in ops.iter().enumerate() {
        if op.op_type == OpType::Invoke {
            open.insert(&op.process, calls.len());
            calls.push(Call {
                invoke: Some(op),
                completion: None,
                op,
                outcome: Outcome::Open,
                start: op.time,
                end: end_ns.max(op.time),
                position,
            });
            continue;
        }
        let outcome = Outcome::of(op.op_type);
        let pending = open.get(&op.process).copied().filter(|&i| calls[i].f() == op.f());
        match pending {
            Some(i) => {
                open.remove(&op.process);
                let call = &mut calls[i];
                call.completion = Some(op);
                call.op = op;
                call.outcome = outcome;
                call.end = op.time.max(call.start);
            }
            None => calls.push(Call {
                invoke: None,
                completion: Some(op),
                op,
                outcome,
                start: op.time,
                end: op.time,
                position,
            }),
        }
    }
    calls
}
