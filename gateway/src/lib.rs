//! rim gateways: where clients hold their long-lived connections.
//!
//! A gateway is stateless: it keeps connections and soft routing state, and
//! every durable fact lives on the logic nodes. Any number of gateways can
//! serve one cluster; a client that loses its gateway reconnects to another
//! and syncs (design sections 6 and 7, `docs/protocol.md`).
//!
//! # Design
//!
//! * **Sessions** ([`session`]): one [`Session`] per connection, a sans-IO
//!   state machine holding the whole client protocol: the sign-in deadline,
//!   heartbeats and the idle timeout, mapping requests to node calls and
//!   their answers back to replies, in-order and gap-free delivery of pushed
//!   entries (the `delivery` module, gim issue #46), the bounded send queue, kicks and
//!   closing. It owns no socket, task or clock: inputs carry the time,
//!   effects come out as [`Action`]s. So it is tested without a network,
//!   and every transport behaves the same.
//! * **Transports** ([`tcp`], [`ws`]): adapters that turn bytes into
//!   [`Session::on_packet`] calls and [`Action::Send`] into bytes. The TCP
//!   transport runs a few mio (epoll) event loops, each owning its
//!   connections in a slab with per-connection read buffers
//!   ([`rim_proto::FrameDecoder`]) and write queues, and timers from
//!   [`Session::next_deadline`]; no thread or task per connection. The
//!   WebSocket transport (tokio-tungstenite, `/ws`) carries one `Packet` per
//!   binary message, or its JSON form in text messages.
//! * **Calls** ([`call`], [`upstream`]): [`Action::Call`] is handed to
//!   [`PushRouter::call`](router::PushRouter::call) on a tokio runtime. Room
//!   subscriptions are served there; every other call is a node call,
//!   carried out by [`Upstream::call`](upstream::Upstream::call) against the
//!   shard leaders (cached cluster map, `NotLeader` hints followed, rounds
//!   spaced by the cluster's one retry policy, [`rim_cluster::Backoff`]).
//!   The outcome comes back to the connection's event loop through a
//!   channel and a waker, as [`Session::on_reply`].
//! * **Push router** ([`router`]): maps `(user, device)` to the connection that
//!   serves it ([`Action::Register`], [`Action::Unregister`]; a second
//!   sign-in of a device kicks the older connection with
//!   [`Session::on_kick`], and the older one's unregister never removes the
//!   newer route). Per shard it keeps one `Subscribe` stream to the leader
//!   carrying the user and group ids it has connections for, hands each
//!   `PushedMessage` to the sessions of its owner ([`Session::on_push`]),
//!   and after a stream break or a new subscription calls
//!   [`Session::on_resync_needed`] so that sessions sync from the last seq
//!   they delivered.
//! * **The process** ([`server`]): [`Gateway::start`] wires both transports
//!   to one router and one connection-id counter, serves `/metrics` and
//!   `/healthz`, and shuts down cleanly (stop accepting, `KICK` every client
//!   with `ERROR_UNAVAILABLE`, drain, close the push streams). `rim gateway`
//!   is a thin command over it; operations are in `docs/gateway.md`.
//! * **gim clients** ([`gim`]): a listener with [`Protocol::Gim`] speaks
//!   gim's `connect` protocol; each connection's packets are translated at
//!   the edge into the same [`Session`], so every bound holds unchanged.
//! * **Best-effort notices** (`notice`): `Offline` calls when a connection
//!   ends are bounded (a mass disconnect must not become one node call per
//!   connection) and dropped beyond the bound: nothing durable needs them.
//!
//! # Invariants
//!
//! * The dependency runs one way: transports → router → upstream. The
//!   upstream knows nothing of the router or the sessions.
//! * Every public signature names users, devices, groups, seqs and shards
//!   with the id types of [`rim_proto::ids`]; the generated protobuf
//!   structs keep their integers, converted where they are read.
//! * Fallible public APIs return [`Result`] with the crate's [`Error`]
//!   (stable [`Error::code`]); the one other error type, [`CallError`], is
//!   a node call's outcome as the session relays it (see the `error`
//!   module).

mod action;
pub mod call;
mod config;
mod delivery;
mod error;
pub mod gim;
mod membership;
mod notice;
pub mod router;
pub mod server;
pub mod session;
pub mod tcp;
pub mod upstream;
pub mod ws;

pub use call::{Call, CallError, CallId, NodeCall, NodeReply};
pub use config::Protocol;
pub use error::{Error, Result};
pub use server::{Gateway, GatewayConfig};
pub use session::{Action, Identity, Phase, Session, SessionConfig};
