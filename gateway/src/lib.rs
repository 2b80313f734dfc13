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
//! * **Node calls** ([`upstream`]): [`Action::Call`] is carried out on a tokio
//!   runtime against the shard leaders (cached cluster map, `NotLeader`
//!   hints followed) and the outcome comes back to the connection's event
//!   loop through a channel and a waker, as [`Session::on_reply`].
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
//!
//! # What exists so far
//!
//! The session state machine ([`session`]), the user-list delivery logic it
//! uses (`delivery`, crate-private), the call types ([`call`]), the node
//! client ([`upstream`]: cluster map, leader routing, retries within a
//! deadline), the push router ([`router`]: per-shard subscription streams,
//! kicks, resync signals), the mio TCP transport ([`tcp`]) and the WebSocket
//! transport ([`ws`]), each tested end to end against an in-process cluster.
//! When both transports serve one router they must share one connection-id
//! counter (`TcpGateway::start_with_conn_ids`, `WsGateway::with_conn_ids`).
//! Still to come: the `rim gateway` command wiring them together, the client
//! SDK, `rim chat`, and room / super-group push routing.

mod action;
pub mod call;
mod config;
mod delivery;
mod notice;
pub mod router;
pub mod server;
pub mod session;
pub mod tcp;
pub mod upstream;
pub mod ws;

pub use call::{Call, CallError, CallId, NodeCall, NodeReply};
pub use server::{Gateway, GatewayConfig, GatewayError};
pub use session::{Action, Identity, Phase, Session, SessionConfig};
