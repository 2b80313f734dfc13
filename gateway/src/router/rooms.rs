//! Rooms and super groups in the push router: the session's room calls
//! ([`NodeCall::SubscribeRoom`], [`NodeCall::UnsubscribeRoom`]) are served
//! here, not by a node, and the router keeps room → connections.
//!
//! [`PushRouter::call`] is where a driver hands every [`Call`] of a
//! session: the two room calls are carried out here, every other call goes
//! to [`Upstream::call`](crate::upstream::Upstream::call). So the
//! dependency runs one way: the router uses its upstream (for the
//! `SyncGroup` head read below and for its streams), the upstream knows
//! nothing of the router.
//!
//! `SUBSCRIBE_ROOM` reads the list's head with a `SyncGroup` node call (so
//! an unknown group fails with the node's `ERROR_GROUP_NOT_FOUND`, a group
//! the user may not read with `ERROR_NOT_GROUP_MEMBER`), tells a room from a
//! super group by the kind of its entries (a small group fails with
//! `ERROR_BAD_REQUEST`: its messages are in the members' own lists; a
//! converted one is a super group), then subscribes the connection
//! ([`PushRouter::subscribe_room`]). `UNSUBSCRIBE_ROOM` only drops the
//! subscription ([`PushRouter::unsubscribe_room`]).
//!
//! # Invariants
//!
//! * Room changes of one connection are ordered by the session's call ids
//!   (the calls run concurrently): a subscribe older than a later
//!   unsubscribe of the same room (or of every room) is ignored, and so is
//!   an unsubscribe older than a later subscribe.
//! * A connection reads at most [`MAX_ROOMS_PER_CONNECTION`] rooms.
//! * A room is in its shard's `rooms` exactly while some connection here
//!   reads it.

use std::collections::{BTreeSet, HashMap};

use rim_proto::ErrorCode;
use rim_proto::ids::{GroupId, Seq, ShardId};
use rim_proto::v1::{
    ConversationKind, SubscribeRoomInput, SubscribeRoomOutput, SyncGroupInput, SyncGroupOutput,
};

use super::{PushRouter, stream};
use crate::call::{Call, CallError, CallId, NodeCall, NodeReply};
use crate::session::MAX_ROOMS_PER_CONNECTION;

/// Rooms a connection left whose leaving call is remembered (to ignore a
/// subscribe call overtaken by it); beyond it the oldest are forgotten.
const LEFT_ROOMS_REMEMBERED: usize = 128;

/// The rooms of one connection, with the session call ids that changed
/// them (calls of one session have increasing ids).
#[derive(Default)]
pub(super) struct ConnRooms {
    /// Subscribed rooms, each with the call that subscribed it.
    pub(super) rooms: HashMap<GroupId, u64>,
    /// Rooms left, each with the call that left it (bounded).
    left: HashMap<GroupId, u64>,
    /// The last call that left every room.
    left_all: u64,
}

/// The connections reading one room.
pub(super) struct Room {
    pub(super) shard_id: ShardId,
    pub(super) conns: BTreeSet<u64>,
}

impl PushRouter {
    /// Carries out a session's `call`: a room call ([`NodeCall::is_room`])
    /// here, any other with the router's
    /// [`Upstream`](crate::upstream::Upstream).
    ///
    /// `SUBSCRIBE_ROOM` reads the list's head with a `SyncGroup` node call
    /// (an unknown group fails with the node's `ERROR_GROUP_NOT_FOUND`, a
    /// group the user may not read with `ERROR_NOT_GROUP_MEMBER`, a small
    /// group with `ERROR_BAD_REQUEST`), then subscribes the connection
    /// ([`subscribe_room`](Self::subscribe_room)). `UNSUBSCRIBE_ROOM` only
    /// drops the subscription ([`unsubscribe_room`](Self::unsubscribe_room)).
    /// Neither reaches a node as such.
    pub async fn call(&self, call: &Call) -> Result<NodeReply, CallError> {
        match &call.request {
            NodeCall::SubscribeRoom(input) => self.subscribe_room_call(call, *input).await,
            NodeCall::UnsubscribeRoom(input) => {
                let room = (input.room_id != 0).then_some(GroupId(input.room_id));
                self.unsubscribe_room(call.conn_id, room, call.id);
                Ok(NodeReply::Empty)
            }
            _ => self.upstream().call(call).await,
        }
    }

    /// `SUBSCRIBE_ROOM`: the list's head from a node, then the
    /// subscription (see the [module documentation](self)).
    async fn subscribe_room_call(
        &self,
        call: &Call,
        input: SubscribeRoomInput,
    ) -> Result<NodeReply, CallError> {
        if input.room_id == 0 {
            return Err(CallError::new(ErrorCode::ErrorInvalidId, "room_id must not be 0"));
        }
        let room = GroupId(input.room_id);
        let head = self.read_group(call, room, Seq::ZERO).await?;
        let last_seq = head.last_group_seq;
        let first = head.messages.first().map(|m| (m.seq, m.conversation_kind));
        // Every entry of a room is a room entry, every entry of a super group
        // a super-group entry (or, for a converted group, a small-group entry
        // before its conversion: the newest entry tells). A member reads at
        // least its join notice, so an empty list is a room.
        let super_group = match first {
            None => false,
            Some((_, k)) if k == ConversationKind::Room as i32 => false,
            Some((_, k)) if k == ConversationKind::SuperGroup as i32 => true,
            Some((seq, k)) if k == ConversationKind::Group as i32 && last_seq > seq => {
                let newest = self.read_group(call, room, Seq(last_seq - 1)).await?;
                let kind = newest.messages.first().map(|m| m.conversation_kind);
                if kind != Some(ConversationKind::SuperGroup as i32) {
                    return Err(not_readable(room));
                }
                true
            }
            Some(_) => return Err(not_readable(room)),
        };
        let shard = self.upstream().ensure_map().await?.shard_of_group(room);
        self.subscribe_room(call.conn_id, room, shard, call.id)?;
        if super_group {
            // The first entry the member may read: after its join point.
            let first_seq =
                first.map_or(last_seq.saturating_add(1), |(seq, _)| seq).max(head.first_group_seq);
            return Ok(NodeReply::SubscribeGroup(SubscribeRoomOutput { last_seq, first_seq }));
        }
        Ok(NodeReply::SubscribeRoom(SubscribeRoomOutput { last_seq, first_seq: head.first_group_seq }))
    }

    /// One entry of group `group_id`'s list after `after` (a `SyncGroup`
    /// node call on behalf of `call`'s connection), with the list's head.
    async fn read_group(
        &self,
        call: &Call,
        group_id: GroupId,
        after: Seq,
    ) -> Result<SyncGroupOutput, CallError> {
        let input = SyncGroupInput { group_id: group_id.0, after_group_seq: after.0, limit: 1 };
        let probe = Call { request: NodeCall::SyncGroup(input), ..call.clone() };
        match self.upstream().call(&probe).await? {
            NodeReply::SyncGroup(output) => Ok(output),
            other => Err(CallError::new(ErrorCode::ErrorInternal, format!("group head read got {other:?}"))),
        }
    }

    /// Connection `conn_id` (registered) now reads room `room_id`, whose
    /// list lives on shard `shard_id`; `call` is the session's call that
    /// asked. A stale call (the connection left the room, or every room,
    /// in a later call) changes nothing. Fails with `ERROR_UNAVAILABLE` if
    /// the connection is not registered (it is closing) or the router
    /// stopped, and with `ERROR_BAD_REQUEST` beyond
    /// [`MAX_ROOMS_PER_CONNECTION`] rooms.
    pub fn subscribe_room(
        &self,
        conn_id: u64,
        room_id: GroupId,
        shard_id: ShardId,
        call: CallId,
    ) -> Result<(), CallError> {
        let mut st = self.state();
        if st.stopped {
            return Err(CallError::new(ErrorCode::ErrorUnavailable, "the gateway is shutting down"));
        }
        let Some(conn) = st.conns.get_mut(&conn_id) else {
            return Err(CallError::new(ErrorCode::ErrorUnavailable, "the connection is closing"));
        };
        let rooms = &mut conn.rooms;
        let left = rooms.left.get(&room_id).copied().unwrap_or(0).max(rooms.left_all);
        let subscribed = rooms.rooms.get(&room_id).copied();
        if call.0 <= left.max(subscribed.unwrap_or(0)) {
            return Ok(());
        }
        if subscribed.is_none() && rooms.rooms.len() >= MAX_ROOMS_PER_CONNECTION {
            let reason = format!("at most {MAX_ROOMS_PER_CONNECTION} rooms per connection");
            return Err(CallError::new(ErrorCode::ErrorBadRequest, reason));
        }
        rooms.rooms.insert(room_id, call.0);
        rooms.left.remove(&room_id);
        let room = st.rooms.entry(room_id).or_insert_with(|| Room { shard_id, conns: BTreeSet::new() });
        room.conns.insert(conn_id);
        let shard_id = room.shard_id;
        let shard = st.shards.entry(shard_id).or_default();
        if shard.rooms.insert(room_id) {
            shard.notify.notify_one();
        }
        if shard.task.is_none() {
            let task = stream::shard_task(self.inner.clone(), shard_id, shard.notify.clone());
            shard.task = Some(self.inner.runtime.spawn(task));
            shard.notify.notify_one();
        }
        Ok(())
    }

    /// Connection `conn_id` no longer reads room `room_id` (`None`: any
    /// room); `call` is the session's call that asked. Rooms subscribed by
    /// a later call stay.
    pub fn unsubscribe_room(&self, conn_id: u64, room_id: Option<GroupId>, call: CallId) {
        let mut st = self.state();
        let Some(conn) = st.conns.get_mut(&conn_id) else { return };
        let rooms = &mut conn.rooms;
        let gone: Vec<GroupId> = match room_id {
            None => {
                rooms.left_all = rooms.left_all.max(call.0);
                let gone: Vec<GroupId> =
                    rooms.rooms.iter().filter(|(_, id)| **id < call.0).map(|(r, _)| *r).collect();
                for r in &gone {
                    rooms.rooms.remove(r);
                }
                gone
            }
            Some(room_id) => {
                if rooms.rooms.get(&room_id).is_some_and(|id| *id > call.0) {
                    return;
                }
                let left = rooms.left.entry(room_id).or_insert(0);
                *left = (*left).max(call.0);
                if rooms.left.len() > LEFT_ROOMS_REMEMBERED
                    && let Some((&oldest, _)) = rooms.left.iter().min_by_key(|(_, id)| **id)
                {
                    rooms.left.remove(&oldest);
                }
                rooms.rooms.remove(&room_id).map(|_| room_id).into_iter().collect()
            }
        };
        for room in gone {
            st.remove_room(conn_id, room);
        }
    }

    /// The connections reading room `room_id`, ascending.
    pub fn room_conns(&self, room_id: GroupId) -> Vec<u64> {
        self.state().room_conns(room_id)
    }

    /// Whether a live stream's subscription includes room `room_id`.
    pub fn is_room_subscribed(&self, room_id: GroupId) -> bool {
        self.state().shards.values().any(|s| s.subscribed_rooms.contains(&room_id))
    }
}

/// `SUBSCRIBE_ROOM` of a group that is neither a room nor a super group.
fn not_readable(group_id: GroupId) -> CallError {
    let reason = format!(
        "group {group_id} is neither a room nor a super group (a small group's messages are in its members' own lists)"
    );
    CallError::new(ErrorCode::ErrorBadRequest, reason)
}
