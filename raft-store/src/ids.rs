//! Domain identifiers, re-exported from their home in [`rim_proto::ids`]
//! (which documents the vocabulary and its invariants), so existing
//! `rim_raft_store::ids::*` paths keep working.

pub use rim_proto::ids::*;
