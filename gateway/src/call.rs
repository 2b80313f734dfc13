//! What a session asks the gateway and the logic nodes for, and what comes
//! back.
//!
//! A [`Session`](crate::Session) never talks to a node itself. When it needs
//! one (a client request, its own gap-repair sync, the `Offline` notice) it
//! emits an [`Action::Call`](crate::Action::Call) holding a [`Call`]; the
//! driver hands it to [`PushRouter::call`](crate::router::PushRouter::call),
//! which serves room subscriptions itself ([`NodeCall::is_room`]) and passes
//! every other call to [`Upstream::call`](crate::upstream::Upstream::call)
//! (the matching `GatewayService` RPC, following leader hints, with a
//! timeout). The outcome comes back with
//! [`Session::on_reply`](crate::Session::on_reply) under the same
//! [`CallId`]. Outcomes of calls the session no longer waits for (it closed,
//! or the call was fire-and-forget) are ignored.
//!
//! # Invariants
//!
//! * A [`Call`] names its user and device with the id types; the request
//!   itself is the client's protobuf input, relayed as it came (the wire
//!   keeps plain integers, converted where a value is read).
//! * A failed call is a [`CallError`]: the one outcome type a session
//!   consumes, a plain value (`Clone`, `PartialEq`) carrying the code,
//!   message and retry hint relayed to the client. It stays apart from
//!   [`crate::Error`] for the reasons given there.

use bytes::Bytes;
use prost::Message as _;
use rim_proto::ErrorCode;
use rim_proto::ids::{DeviceId, UserId};
use rim_proto::v1::{
    AckInput, AckOutput, ConnSignInReply, ReadInput, ReadOutput, RecallInput, SendInput, SendOutput,
    SignInInput, SubscribeRoomInput, SubscribeRoomOutput, SyncGroupInput, SyncGroupOutput, SyncInput,
    SyncOutput, UnsubscribeRoomInput,
};

/// Identifies one call of one session. Ids are assigned by the session,
/// from 1, increasing; they are unique within the session only, so the
/// gateway keys outstanding calls by `(conn_id, CallId)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CallId(pub u64);

/// A call the gateway must make to a logic node on behalf of a connection.
#[derive(Debug, Clone, PartialEq)]
pub struct Call {
    /// Echo this id in [`Session::on_reply`](crate::Session::on_reply).
    pub id: CallId,
    /// The connection (`ConnContext.conn_id`).
    pub conn_id: u64,
    /// The user: the signed-in one, or the one claimed by `SIGN_IN`.
    pub user_id: UserId,
    /// The device: the signed-in one, or the one claimed by `SIGN_IN`.
    pub device_id: DeviceId,
    /// The device's token version the connection signed in with
    /// (`ConnContext.token_version`); `None` before sign-in.
    pub token_version: Option<u64>,
    /// What to ask.
    pub request: NodeCall,
}

/// The node request of a [`Call`]; each variant names the `GatewayService`
/// method to use and the reply variant expected ([`NodeReply`]).
#[derive(Debug, Clone, PartialEq)]
pub enum NodeCall {
    /// `ConnSignIn`; reply [`NodeReply::SignIn`].
    SignIn(SignInInput),
    /// `Sync` (a client `SYNC`, or the session's own gap repair); reply
    /// [`NodeReply::Sync`].
    Sync(SyncInput),
    /// `SyncGroup`; reply [`NodeReply::SyncGroup`].
    SyncGroup(SyncGroupInput),
    /// `Ack`; reply [`NodeReply::Ack`].
    Ack(AckInput),
    /// `Send`; reply [`NodeReply::Send`].
    Send {
        /// The client's content.
        input: SendInput,
        /// `true` for `SEND_GROUP`, `false` for `SEND`.
        group: bool,
    },
    /// `Recall`; reply [`NodeReply::Send`].
    Recall(RecallInput),
    /// `MarkRead`; reply [`NodeReply::Read`].
    MarkRead(ReadInput),
    /// `SUBSCRIBE_ROOM` (room id not 0) of a room or super group: served
    /// by the gateway itself, not relayed (see [`NodeCall::is_room`]).
    /// [`PushRouter::call`](crate::router::PushRouter::call) reads the
    /// list's head on a node (`SyncGroup`: an unknown group fails with the
    /// node's `ERROR_GROUP_NOT_FOUND`, a non-member of a super group with
    /// `ERROR_NOT_GROUP_MEMBER`) and subscribes the connection (and so the
    /// group's shard stream); reply
    /// [`NodeReply::SubscribeRoom`] for a room, [`NodeReply::SubscribeGroup`]
    /// for a super group, with the list's `last_seq` and `first_seq`. The
    /// session then syncs the backlog after `after_seq` itself
    /// (`SyncGroup` calls) and pushes it.
    SubscribeRoom(SubscribeRoomInput),
    /// `UNSUBSCRIBE_ROOM` (or `SUBSCRIBE_ROOM` of room 0): the gateway's
    /// push router drops the room (0: all rooms) for this connection (not
    /// relayed, see [`NodeCall::is_room`]);
    /// reply [`NodeReply::Empty`]. Also sent, fire and forget, when a
    /// subscription fails or its room cannot be read any more.
    UnsubscribeRoom(UnsubscribeRoomInput),
    /// `Logout`; reply [`NodeReply::Empty`]. The session closes after a
    /// successful logout.
    Logout,
    /// `Offline`, sent once when a signed-in connection ends. Fire and
    /// forget: its outcome is ignored.
    Offline {
        /// Why the connection ended (`OK` for a clean close).
        reason: ErrorCode,
        /// The session the connection was (`ConnSignInReply.session_epoch`).
        session_epoch: u64,
    },
}

impl NodeCall {
    /// Whether the push router serves this call itself (a room or
    /// super-group subscription change): it is never sent to a node, and
    /// [`Upstream::call`](crate::upstream::Upstream::call) refuses it.
    pub fn is_room(&self) -> bool {
        matches!(self, NodeCall::SubscribeRoom(_) | NodeCall::UnsubscribeRoom(_))
    }
}

/// A node's successful answer to a [`NodeCall`].
#[derive(Debug, Clone, PartialEq)]
pub enum NodeReply {
    /// Of [`NodeCall::SignIn`] (boxed: far larger than the others).
    SignIn(Box<ConnSignInReply>),
    /// Of [`NodeCall::Sync`].
    Sync(SyncOutput),
    /// Of [`NodeCall::SyncGroup`].
    SyncGroup(SyncGroupOutput),
    /// Of [`NodeCall::Ack`].
    Ack(AckOutput),
    /// Of [`NodeCall::Send`] and [`NodeCall::Recall`].
    Send(SendOutput),
    /// Of [`NodeCall::MarkRead`].
    Read(ReadOutput),
    /// Of [`NodeCall::SubscribeRoom`] of a room.
    SubscribeRoom(SubscribeRoomOutput),
    /// Of [`NodeCall::SubscribeRoom`] of a super group: `first_seq` is the
    /// first entry the member may read (after its join point, and not
    /// trimmed).
    SubscribeGroup(SubscribeRoomOutput),
    /// Of calls whose reply carries nothing ([`NodeCall::Logout`],
    /// [`NodeCall::UnsubscribeRoom`], [`NodeCall::Offline`]).
    Empty,
}

impl NodeReply {
    /// The encoded output message, as it goes into `Reply.data`.
    pub fn encode_data(&self) -> Bytes {
        let bytes = match self {
            NodeReply::SignIn(r) => r.output.clone().unwrap_or_default().encode_to_vec(),
            NodeReply::Sync(o) => o.encode_to_vec(),
            NodeReply::SyncGroup(o) => o.encode_to_vec(),
            NodeReply::Ack(o) => o.encode_to_vec(),
            NodeReply::Send(o) => o.encode_to_vec(),
            NodeReply::Read(o) => o.encode_to_vec(),
            NodeReply::SubscribeRoom(o) | NodeReply::SubscribeGroup(o) => o.encode_to_vec(),
            NodeReply::Empty => Vec::new(),
        };
        Bytes::from(bytes)
    }
}

/// A failed [`NodeCall`]: the error the node returned (`rim-code` of the
/// gRPC status), or one the gateway produced (`ERROR_TIMEOUT` when the
/// call timed out, `ERROR_UNAVAILABLE` when no node answered).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallError {
    /// The error code relayed to the client.
    pub code: ErrorCode,
    /// Detail for logs, relayed as `Reply.message`.
    pub message: String,
    /// Retry hint relayed as `Reply.retry_after_ms` (0: none).
    pub retry_after_ms: u32,
}

impl CallError {
    /// An error without a retry hint.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> CallError {
        CallError { code, message: message.into(), retry_after_ms: 0 }
    }
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({}): {}", self.code.as_str_name(), self.code as i32, self.message)
    }
}

impl std::error::Error for CallError {}
