//! What the client tells the application: [`Event`]s, and the connection
//! state ([`LinkState`]).

use rim_proto::ErrorCode;
use rim_proto::ids::{GroupId, Seq};
use rim_proto::v1::Message;

use crate::transport::Endpoint;

/// One thing that happened, delivered in order through the bounded event
/// channel returned by [`Client::connect`](crate::Client::connect).
///
/// The channel ends (`recv` returns `None`) once the client stopped: after
/// [`Client::close`](crate::Client::close), [`Event::Kicked`] or
/// [`Event::SignInRejected`].
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// Signed in at `gateway`; a sync from the last delivered seq follows.
    Connected {
        /// The gateway.
        gateway: Endpoint,
        /// The user's list head at sign-in.
        last_seq: Seq,
    },
    /// The sync after a (re)connect or a gap is complete: every entry up to
    /// `last_seq` has been delivered.
    Synced {
        /// Highest seq delivered.
        last_seq: Seq,
    },
    /// An entry of the user's own list (1:1 messages, small-group messages,
    /// notifications, the user's own sends from any device). Each seq is
    /// delivered exactly once, in seq order, without gaps.
    Message(Message),
    /// An entry of a super group's list (`seq` and `group_seq` are its
    /// group seq; `conversation_id` is the group). Per group, each group
    /// seq exactly once, in order, without gaps, from the client's cursor
    /// (never before the member's join point) across reconnects; gaps are
    /// repaired with `SYNC_GROUP`. The client reads every super group of
    /// its user by itself (see [`groups`](crate::groups)).
    GroupMessage(Message),
    /// An entry of a subscribed room's list (`seq` is the room seq). Per
    /// room, increasing seqs, each at most once; rooms are lossy (entries
    /// trimmed by retention, or skipped while the client was too slow, do
    /// not come).
    RoomMessage(Message),
    /// An online-only push (not stored; seq 0): to the user, to a group or
    /// room it reads (`conversation_id`), or to everyone. Not repeated
    /// after a reconnect.
    Ephemeral(Message),
    /// The client stopped reading a super group or room: the user was
    /// removed from it or it was dissolved (after its notice was
    /// delivered), a sign-in no longer lists it, or the gateway refused its
    /// subscription (e.g. `ERROR_BAD_REQUEST` beyond the per-connection
    /// limit). It can still be read with `SYNC_GROUP` where allowed.
    Unsubscribed {
        /// The group or room.
        group_id: GroupId,
        /// Why: `ERROR_NOT_GROUP_MEMBER`, `ERROR_GROUP_NOT_FOUND`, ...
        code: ErrorCode,
        /// Detail, for logs.
        reason: String,
    },
    /// The connection was lost; the client reconnects by itself.
    Disconnected {
        /// Why, for logs.
        reason: String,
    },
    /// Another sign-in of this device (or a logout or revocation) replaced
    /// this session. The client stopped and does not reconnect: reconnecting
    /// would kick the other session in turn.
    Kicked {
        /// `ERROR_KICKED`, `ERROR_TOKEN_REVOKED`, ...
        code: ErrorCode,
        /// The server's detail.
        reason: String,
    },
    /// The gateway refused the sign-in with a non-retryable error (bad or
    /// expired token, unknown device, ...). The client stopped.
    SignInRejected {
        /// The error code.
        code: ErrorCode,
        /// The server's detail.
        message: String,
    },
}

/// Where the client's connection stands (see
/// [`Client::state`](crate::Client::state)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkState {
    /// Connecting, signing in, or waiting to reconnect.
    Connecting,
    /// Signed in at a gateway; requests can be sent.
    Online {
        /// The gateway.
        gateway: Endpoint,
    },
    /// Stopped for good (closed, kicked or sign-in rejected).
    Stopped,
}
