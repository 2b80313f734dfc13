//! What a session asks its driver to do, and how it describes itself.
//!
//! Invariants: users, devices and shards are named with the id types of
//! [`rim_proto::ids`]; [`Action::Close`] is always a session's last action.

use rim_proto::ErrorCode;
use rim_proto::ids::{DeviceId, ShardId, UserId};
use rim_proto::v1::Packet;

use crate::call::Call;

/// An effect the driver must carry out, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Write this packet to the client.
    Send(Packet),
    /// Make this node call and report its outcome with
    /// [`Session::on_reply`](crate::Session::on_reply).
    Call(Call),
    /// The connection now serves `(user_id, device_id)`: the push router
    /// routes the user's pushes to it, subscribes the user on the push
    /// stream of shard `shard_id` if needed, and kicks any older connection
    /// of the same device (at this gateway; the node kicks it elsewhere).
    /// Once the subscription is in effect (or at once, if it already was)
    /// the router must call
    /// [`Session::on_resync_needed`](crate::Session::on_resync_needed), so
    /// that entries appended between the sign-in and the subscription are
    /// not missed.
    Register {
        /// The connection.
        conn_id: u64,
        /// The signed-in user.
        user_id: UserId,
        /// The signed-in device.
        device_id: DeviceId,
        /// The shard owning the user (`ConnSignInReply.shard_id`).
        shard_id: ShardId,
    },
    /// The connection no longer serves `(user_id, device_id)`. The router
    /// removes the route only if it still points at `conn_id`, so a kicked
    /// connection never removes its replacement.
    Unregister {
        /// The connection.
        conn_id: u64,
        /// Its user.
        user_id: UserId,
        /// Its device.
        device_id: DeviceId,
    },
    /// Close the connection (after writing what was sent before). Always
    /// the last action; no other follows.
    Close {
        /// Why, as an error code (`OK` for a clean close).
        code: ErrorCode,
        /// Detail for logs.
        reason: String,
    },
}

/// Where a session is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Connected, waiting for `SIGN_IN`.
    AwaitingSignIn,
    /// The sign-in call is in flight.
    SigningIn,
    /// Signed in.
    SignedIn,
    /// Closed; inputs are ignored.
    Closed,
}

/// The signed-in identity of a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Identity {
    /// The user.
    pub user_id: UserId,
    /// The device.
    pub device_id: DeviceId,
}
