//! gRPC services of a node.

mod accounts;
mod admin;
mod client;
pub mod conversation;
mod friend;
mod gateway;
mod groups;
mod identity;
pub mod ops;
mod push;
mod raft;
mod server_api;
mod server_api_groups;

pub use admin::{AdminSvc, group_status};
pub use client::ClientSvc;
pub use gateway::GatewaySvc;
pub use push::PushSvc;
pub use raft::RaftSvc;
pub use server_api::{ServerApiSvc, counted};
