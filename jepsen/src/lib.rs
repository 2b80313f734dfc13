//! rim consistency harness.
//!
//! This crate holds the Jepsen-style history model and the checker for the
//! IM invariants IM-1..IM-12 of `reference/jepsen.md` §2.3, matched against
//! rim's contract in `docs/consistency.md`:
//!
//! * [`history`]: typed operations with Jepsen's field names, a streaming
//!   JSONL writer and a reader that tolerates a truncated last line;
//! * [`checker`]: a pure function from a history to [`checker::Results`]
//!   (verdict, anomalies by kind with examples, liveness figures), plus
//!   [`checker::check_dir`] behind `rim-jepsen check DIR`.
//!
//! Still planned: starting real `rim node` processes with fault injection
//! (kill, pause, per-link proxies for partitions, clock offsets) and the
//! client workload that writes the history (`rim-jepsen test`).

pub mod checker;
pub mod history;
