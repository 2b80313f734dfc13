//! gRPC services of a node.

mod admin;
mod client;
mod gateway;
pub mod ops;
mod raft;

pub use admin::{AdminSvc, group_status};
pub use client::ClientSvc;
pub use gateway::GatewaySvc;
pub use raft::RaftSvc;
