//! rim placement: slots, shards, the meta group, routing and device tokens.
//!
//! # Slots
//!
//! Every piece of durable state is keyed by a user id, a group id (rooms share
//! the group id space) or an account's login name. A key's **slot** is
//! `crc32(kind tag ‖ key bytes) % slots` ([`slot_of`], [`slot_of_name`]). The
//! slot count is fixed when the cluster is bootstrapped (default
//! [`DEFAULT_SLOTS`] = 256) and never changes: it is what lets a cluster grow
//! by moving whole slots between shards instead of rehashing keys. The kind tag
//! keeps user 5 and group 5 apart.
//!
//! # Shards
//!
//! Each slot is owned by one **shard**: an openraft group with its own log,
//! vote and state machine, replicated on `R` voters (default 3, or every node
//! if the cluster is smaller), plus learners while a node catches up. A shard
//! owns many slots; everything keyed by a user (profile, devices, seq counter,
//! message list, friends, outbox) lives in that user's shard, so a user's
//! writes are linearised by one Raft group.
//!
//! # The meta group
//!
//! Group 0 ([`META_SHARD`]) holds the **cluster map**
//! ([`rim_proto::v1::ClusterMap`]): every node ever added (id, addresses,
//! state), every group with its voters and learners, the slot → shard table,
//! and a version bumped on every change. It owns no slot. A new cluster writes
//! [`bootstrap_map`]'s output as version 1.
//!
//! # Routing
//!
//! [`Placement`] wraps one map version after validating it, and answers "where
//! is key K": key → slot → shard ([`Placement::shard_of_user`], ...) → voters
//! and leader hint ([`Placement::leader_hint`]). Every node serves its map;
//! gateways and clients cache it, and refresh on `ERROR_WRONG_SHARD`, on a
//! newer version, or update just the leader hint on `ERROR_NOT_LEADER`
//! ([`Placement::set_leader`]).
//!
//! # Retries
//!
//! Whoever follows a group's leader (a node forwarding a write or a read, a
//! gateway calling a node) waits between rounds with [`Backoff`] and retries
//! only what [`retryable`] allows ([`retry`]).
//!
//! # Rate limits
//!
//! Every limit on how often a client may do something (sign in, register,
//! send) is a [`Limiter`] of token buckets ([`rate`]).
//!
//! # Tokens
//!
//! A device token ([`token`]) is HMAC-SHA256-signed with a key derived from
//! the cluster secret over `(user, device, expiry, token version)`, so any
//! gateway verifies it locally ([`TokenKey::verify`]). Revocation is a version
//! bump in the user's shard, checked by the caller at connection sign-in.
//!
//! # TLS
//!
//! [`tls`] loads certificates once and builds every TLS configuration: the
//! internal gRPC links ([`tls::LinkTls`], [`tls::endpoint`]) and the
//! gateway's client-facing listeners ([`tls::server_config`]).
//!
//! # Invariants
//!
//! * A key's slot depends only on its kind, its bytes and the slot count.
//! * In a valid map every slot has exactly one owner, a data shard (id ≥ 1)
//!   listed in the map; so routing a key never fails.
//! * Every group has at least one voter; replicas live only on known nodes
//!   that are not removed; node and shard ids are unique, node ids non-zero.
//! * Leader ids are hints: never trusted for correctness, only for the first
//!   attempt. A write's correctness comes from Raft, which refuses it on a
//!   non-leader.
//! * A token verifies only if it was signed with this cluster's key over
//!   exactly its text, and only before its expiry.

pub mod error;
pub mod placement;
pub mod rate;
pub mod retry;
pub mod tls;
pub mod token;

pub use error::{Error, Result};
pub use placement::{
    DEFAULT_REPLICATION, DEFAULT_SLOTS, Key, KeyKind, MAX_SLOTS, META_REPLICATION, META_SHARD, Placement,
    bootstrap_map, slot_of,
};
pub use rate::{Limited, Limiter, Rate};
pub use retry::{Backoff, retryable};
pub use tls::{LinkTls, LinkTlsConfig};
pub use token::{Claims, MAX_TOKEN_LEN, TOKEN_FORMAT, TokenError, TokenKey, TokenKeys};
