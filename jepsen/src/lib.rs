//! rim consistency harness (planned).
//!
//! Will own: starting real `rim node` processes with fault injection (kill,
//! pause, per-link proxies for partitions, clock offsets), a client workload,
//! the operation history as JSONL, and a checker for the IM invariants
//! IM-1..IM-12 of the consistency contract, with reports.
