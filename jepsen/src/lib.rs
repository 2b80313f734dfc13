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
//! * [`proxy`]: per-link TCP proxies (pass, delay, hold, reset, per
//!   direction) and the partition shapes (isolate, halves, bridge,
//!   majorities ring) as Jepsen-style grudges over a [`proxy::ProxyMesh`];
//! * [`control`]: real `rim node` / `rim gateway` processes in their own
//!   process groups (kill, pause, resume, restart, health), optionally
//!   wired through the proxy mesh: each node gets its own `--peers` with
//!   the proxy address of every other node, so Raft traffic crosses the
//!   proxies (see the module for the start-up race the harness avoids and
//!   the node-side leaks: snapshots and membership changes carry the
//!   leader's address view).
//!
//! * [`process`]: one OS process in its own process group under a
//!   watchdog, with its log and signals (used by [`control`]);
//! * [`workload`]: users with several devices sending 1:1 messages and
//!   syncing, through the gateway (TCP/WS, SDK) and client gRPC, plus the
//!   final reads of every list through every node;
//! * [`groups`]: the workload's small groups and super group: creation at
//!   set-up, group sends and super-group reads on both client paths, final
//!   reads of super groups' lists;
//! * [`nemesis`]: the seeded fault schedule (partition, kill, pause, clock)
//!   and the final heal-and-recover phase;
//! * [`recorder`]: the shared, flushed-per-line history sink;
//! * [`run`]: one complete `rim-jepsen test` run, from start-up to verdict;
//! * [`webhooks`]: the run's webhook receiver (its own process, a target
//!   of the nemesis) and its receipts, which the checker holds against
//!   the committed messages (IM-13);
//! * [`report`]: the run's HTML timeline and SVG plots with fault windows,
//!   and delivery lag.
//!
//! The harness's errors (controlling processes, setting up the workload,
//! reading a history, writing a run's files) are one type, [`Error`] (see
//! [`error`]), with its [`Result`]: a variant says what went wrong and what
//! the caller does next.

pub mod checker;
pub mod control;
pub mod error;
pub mod groups;
pub mod history;
pub mod nemesis;
pub mod process;
pub mod proxy;
pub mod recorder;
pub mod report;
pub mod run;
pub mod webhooks;
pub mod workload;

pub use error::{Error, Result};
