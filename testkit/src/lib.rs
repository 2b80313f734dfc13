//! rim's test harness: one place for what every cluster test needs.
//!
//! | module | what it holds | available |
//! | --- | --- | --- |
//! | [`ports`] | loopback ports outside the kernel's ephemeral range ([`free_port`], [`free_addr_string`], ...) | always |
//! | [`wait`] | the [`serial`](wait::serial) lock and deadline loops: [`wait_for`](wait::wait_for), [`eventually`](wait::eventually), [`retry`](wait::retry) | always |
//! | [`panics`] | a [`PanicCounter`](panics::PanicCounter) for tests that assert nothing panicked | always |
//! | [`grpc`] | a gRPC [`Client`](grpc::Client) of a node's client listener, signed-in [`Session`](grpc::Session)s, [`code`](grpc::code), [`texts`](grpc::texts) | always |
//! | [`tls`] | a [`TestPki`](tls::TestPki): a CA, a loopback certificate, and an untrusted CA, as PEM files | always |
//! | `cluster` | an in-process `Cluster` of real `rim-node` nodes, with link cuts | feature `cluster` |
//!
//! Everything speaks the id types of [`rim_proto::ids`]: a [`Session`](grpc::Session)
//! holds a `UserId` and a `DeviceId`, the cluster answers `ShardId`s, and
//! the wire's plain integers appear only inside protobuf messages.
//!
//! # Using it
//!
//! Crates that only need ports (`rim-bench`, `rim-jepsen`) depend on
//! `rim-testkit` as it is. Integration tests that start nodes in the test
//! process enable the feature, which pulls in `rim-node`:
//!
//! ```toml
//! [dev-dependencies]
//! rim-testkit = { workspace = true, features = ["cluster"] }
//! ```
//!
//! (`rim-node`'s own integration tests do too: a dev-dependency cycle
//! node → testkit → node is fine for integration tests.)
//!
//! A typical test:
//!
//! ```ignore
//! use rim_testkit::{cluster::*, grpc::*, wait::*};
//!
//! #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
//! async fn a_message_arrives() {
//!     let _g = serial().await;
//!     let c = Cluster::start(3, 4).await;
//!     let client = c.client(1);
//!     let (alice, bob) = users_on_two_shards(&c, &client, "x").await;
//!     client.send_acked(&alice, bob.user, "m1", "hello").await;
//!     eventually(WAIT, "bob has m1", || async {
//!         client.sync_all(&bob).await.ok().filter(|l| !l.is_empty())
//!     })
//!     .await;
//!     c.shutdown().await;
//! }
//! ```
//!
//! # The rules
//!
//! * **Heavy tests run one at a time.** A test that starts a cluster (or
//!   processes) takes [`serial`](wait::serial) first: the test machines have
//!   two cores, and clusters that share them miss their Raft deadlines.
//! * **Deadlines, never fixed sleeps.** Wait for the condition itself with
//!   [`wait_for`](wait::wait_for) (a synchronous probe, such as a node's
//!   Raft metrics) or [`eventually`](wait::eventually) (an async probe, such
//!   as a gRPC read) under a generous deadline, and name what is awaited so a
//!   timeout says what did not happen. A sleep is either too short on a
//!   loaded machine or wastes time on an idle one.
//! * **Retry only what may be retried.** [`retry`](wait::retry) repeats a
//!   call on codes that `ErrorCode::is_retryable` allows (no leader yet,
//!   unavailable, ...) and fails the test at once on any other: a retry must
//!   never hide a wrong answer. Writes that are retried keep their
//!   idempotency key (`client_msg_id`), as real clients do.
//! * **Ports outside the ephemeral range.** Addresses come from [`ports`]
//!   (never `127.0.0.1:0` picked ahead of the bind): the kernel never hands
//!   those ports to outgoing connections, so only another explicit bind can
//!   take one, and the cluster retries a start that failed with "cannot
//!   listen" on new ports.

pub mod grpc;
pub mod panics;
pub mod ports;
pub mod tls;
pub mod wait;

#[cfg(feature = "cluster")]
pub mod cluster;

pub use ports::{ephemeral_range, free_addr, free_addr_string, free_port, free_ports};
