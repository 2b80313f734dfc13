//! rim logic node (planned).
//!
//! Will own: hosting the meta group and data shards as openraft groups over
//! one RocksDB (`rim-raft-store`), the Raft network over gRPC, the client-,
//! gateway- and business-facing gRPC services, proposal batching (group
//! commit), the outbox relay that delivers cross-shard messages exactly once,
//! the push hub streaming applied entries to gateways, `/metrics` and
//! `/healthz`.
