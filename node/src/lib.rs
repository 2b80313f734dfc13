//! rim logic node.
//!
//! A node hosts the meta group (shard 0: the cluster map and id allocators)
//! and data shards, each an openraft group over the node's single RocksDB
//! (`rim-raft-store`). It serves three listeners:
//!
//! * **internal** (cluster secret required): Raft traffic between nodes,
//!   forwarded proposals, read-index barriers and online-only pushes, the
//!   gateway-facing service with push subscriptions, the business push
//!   service, and the admin service;
//! * **client**: sign-in, users, friends, groups and messages over gRPC,
//!   authenticated by device tokens in the metadata;
//! * **http**: `/metrics` and `/healthz`.
//!
//! # Write path
//!
//! Any node accepts a write and routes it to the owning shard's leader
//! ([`core`]); the leader's proposer batches concurrent operations into one
//! Raft entry ([`group`]); the reply is sent after the entry is committed on
//! a quorum (fsynced) and applied. Cross-shard effects go through the
//! outbox [`relay`], exactly once.
//!
//! # Guarantees (docs/consistency.md)
//!
//! * An acknowledged send is committed on a quorum and survives any minority
//!   of crashes; a partitioned minority cannot acknowledge anything.
//! * Reads are linearizable unless `follower_reads` is on.
//! * Every operation is idempotent under retry, so a timeout (unknown
//!   outcome) is resolved by retrying with the same `client_msg_id`.
//! * Replicas of a group apply with the same limits whatever their nodes'
//!   configuration: the limits are replicated state ([`limits`]).

pub mod auth;
pub mod auth_callback;
pub mod balance;
pub mod config;
pub mod core;
pub mod credentials;
pub mod due;
pub mod error;
pub mod group;
pub mod grpc;
pub mod hooks;
pub mod http;
pub mod http_api;
pub mod http_client;
pub mod jwks;
pub mod jwt;
pub mod limits;
pub mod net;
mod node;
pub mod read;
pub mod relay;
pub mod service;
pub mod sessions;
pub mod throttle;
pub mod transfer;
pub mod webhooks;

pub use config::{NodeConfig, Sabotage};
pub use error::{Error, Result};
pub use node::{Node, NodeOptions};
