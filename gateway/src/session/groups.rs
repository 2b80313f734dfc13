//! Rooms and super groups on one connection: `SUBSCRIBE_ROOM` /
//! `UNSUBSCRIBE_ROOM`, the backlog and gap repair of each subscribed list
//! (`SyncGroup`), delivery of its pushes, and the end of a super group's
//! subscription when the user leaves it.
//!
//! A super group (read diffusion) is read exactly like a room: the client
//! subscribes it with `SUBSCRIBE_ROOM{room_id: group, after_seq: its last
//! group seq}` and gets the entries after that seq (never before the
//! member's join point: the node's `SyncGroup` enforces it), then live
//! entries, each once and in group-seq order. The differences:
//!
//! * Membership: the node refuses a non-member's `SyncGroup` with
//!   `ERROR_NOT_GROUP_MEMBER`, which fails the subscription (see
//!   [`PushRouter::call`](crate::router::PushRouter::call)).
//!
//! Subscribed lists are keyed by [`GroupId`]; room 0 of the protocol
//! ("every room") is `None` here, never `GroupId(0)`.
//! * `after_seq` 0 means "from the member's join point" for a super group
//!   (everything the member may read), but "live only" for a room.
//! * Priority: live room entries of normal priority are skipped rather
//!   than overflow the send queue (rooms are lossy by design); super-group
//!   entries are never skipped (a connection too slow for them is closed,
//!   and its client resumes from its cursor).
//! * The end: an entry that is a `group_members_removed` notification
//!   naming this connection's user, or a `group_dissolved` notification, is
//!   delivered and then ends the subscription (here and in the push
//!   router, whose stream drops the group once no connection reads it).
//!   The member can no longer read the list, so if that entry arrives
//!   while a gap is being repaired it is sent at once, out of order.
//! * A converted group's entries from before its conversion (small-group
//!   entries, `CONVERSATION_KIND_GROUP`) are in the members' own lists: they
//!   count as delivered but are not sent from the group list.
//!
//! Reading a backlog is paced: while the send queue is more than half full
//! the next page waits [`SessionConfig::resync_retry_delay`] instead of
//! being read at once (a large super-group backlog must not overflow the
//! queue and close the connection).
//!
//! [`SessionConfig::resync_retry_delay`]: crate::SessionConfig::resync_retry_delay

use std::time::Instant;

use prost::Message as _;
use rim_proto::ErrorCode;
use rim_proto::ids::{GroupId, Seq};
use rim_proto::v1::{
    Command, ConversationKind, Packet, PushPriority, PushedMessage, Reply, SubscribeRoomInput,
    SubscribeRoomOutput, SyncGroupInput, SyncOutput, UnsubscribeRoomInput,
};

use super::{MAX_ROOMS_PER_CONNECTION, Pending, Session, State, error_reply};
use crate::call::{CallError, CallId, NodeCall, NodeReply};
use crate::delivery::{Entry, UserList};
use crate::membership;

impl Session {
    /// `SUBSCRIBE_ROOM`: the call goes to the push router
    /// ([`PushRouter::call`](crate::router::PushRouter::call)); live pushes
    /// of the room are held back from now until its backlog has been read.
    pub(super) fn subscribe_room(&mut self, packet: Packet) {
        let input = match SubscribeRoomInput::decode(packet.content.clone()) {
            Ok(input) => input,
            Err(e) => {
                return self.reply_error(&packet, ErrorCode::ErrorBadRequest, format!("bad content: {e}"));
            }
        };
        if input.room_id == 0 {
            // gim: SUBSCRIBE_ROOM of room 0 leaves every room
            // (`SubscribeRoomInput.room_id`); the reply carries an empty
            // SubscribeRoomOutput.
            return self.leave_rooms(&packet, None);
        }
        if self.requests_full() {
            return self.reply_error(&packet, ErrorCode::ErrorBusy, "too many requests in flight");
        }
        let State::SignedIn(s) = &self.state else {
            return;
        };
        let room_id = GroupId(input.room_id);
        if !s.rooms.contains_key(&room_id) && s.rooms.len() >= MAX_ROOMS_PER_CONNECTION {
            let reason = format!("at most {MAX_ROOMS_PER_CONNECTION} rooms and super groups per connection");
            return self.reply_error(&packet, ErrorCode::ErrorBadRequest, reason);
        }
        let id = self.call(NodeCall::SubscribeRoom(input));
        let mut list = UserList::new(Seq(input.after_seq), self.config.group_push_buffer_limit);
        // Held back until the backlog is read (see `finish_subscribe_room`).
        list.sync_started(id);
        if let State::SignedIn(s) = &mut self.state {
            s.rooms.insert(room_id, list);
        }
        let pending = Pending::SubscribeRoom { request_id: packet.request_id, room_id };
        self.pending.insert(id, pending);
    }

    /// `UNSUBSCRIBE_ROOM` (or `SUBSCRIBE_ROOM` of room 0): the room
    /// (`None`: every room) is dropped here at once and from the push
    /// router by the call, whose outcome is the reply.
    pub(super) fn leave_rooms(&mut self, packet: &Packet, room: Option<GroupId>) {
        if self.requests_full() {
            return self.reply_error(packet, ErrorCode::ErrorBusy, "too many requests in flight");
        }
        if let State::SignedIn(s) = &mut self.state {
            match room {
                None => {
                    s.rooms.clear();
                    s.super_groups.clear();
                }
                Some(room_id) => {
                    s.rooms.remove(&room_id);
                    s.super_groups.remove(&room_id);
                }
            }
        }
        let room_id = room.map_or(0, |r| r.0);
        let id = self.call(NodeCall::UnsubscribeRoom(UnsubscribeRoomInput { room_id }));
        self.pending.insert(id, Pending::Request { request_id: packet.request_id, command: packet.command });
    }

    /// Drops a room here and, fire and forget, from the push router.
    pub(super) fn drop_room(&mut self, room_id: GroupId) {
        if let State::SignedIn(s) = &mut self.state {
            s.rooms.remove(&room_id);
            s.super_groups.remove(&room_id);
        }
        self.call(NodeCall::UnsubscribeRoom(UnsubscribeRoomInput { room_id: room_id.0 }));
    }

    fn is_subscribed(&self, room_id: GroupId) -> bool {
        matches!(&self.state, State::SignedIn(s) if s.rooms.contains_key(&room_id))
    }

    pub(super) fn finish_subscribe_room(
        &mut self,
        id: CallId,
        request_id: u64,
        room_id: GroupId,
        result: Result<NodeReply, CallError>,
    ) {
        let command = Command::SubscribeRoom as i32;
        // Not current if the room was left or subscribed again meanwhile.
        let current = matches!(&self.state, State::SignedIn(s) if s.rooms.get(&room_id).is_some_and(|l| l.is_sync_call(id)));
        let (output, super_group) = match result {
            Ok(NodeReply::SubscribeRoom(output)) => (output, false),
            Ok(NodeReply::SubscribeGroup(output)) => (output, true),
            other => {
                let e = match other {
                    Err(e) => e,
                    Ok(other) => {
                        CallError::new(ErrorCode::ErrorInternal, format!("SUBSCRIBE_ROOM got {other:?}"))
                    }
                };
                self.reply_to(request_id, command, error_reply(&e));
                if current {
                    self.drop_room(room_id);
                }
                return;
            }
        };
        self.reply_to(request_id, command, Reply::ok(output.encode_to_vec()));
        if !current {
            return;
        }
        if let State::SignedIn(s) = &mut self.state
            && let Some(list) = s.rooms.get_mut(&room_id)
        {
            list.restart_at(start_after(list.last(), &output, super_group));
            if super_group {
                s.super_groups.insert(room_id);
            } else {
                s.super_groups.remove(&room_id);
            }
        }
        // The backlog, and whatever was appended while subscribing (the
        // held-back pushes are released once it has caught up).
        self.start_room_sync(room_id);
    }

    pub(super) fn start_room_sync(&mut self, room_id: GroupId) {
        let State::SignedIn(s) = &self.state else {
            return;
        };
        let Some(list) = s.rooms.get(&room_id) else {
            return;
        };
        let input = SyncGroupInput {
            group_id: room_id.0,
            after_group_seq: list.last().0,
            limit: self.config.resync_batch,
        };
        let id = self.call(NodeCall::SyncGroup(input));
        self.pending.insert(id, Pending::RoomSync { room_id });
        if let State::SignedIn(s) = &mut self.state
            && let Some(list) = s.rooms.get_mut(&room_id)
        {
            list.sync_started(id);
        }
    }

    pub(super) fn finish_room_sync(
        &mut self,
        now: Instant,
        id: CallId,
        room_id: GroupId,
        result: Result<NodeReply, CallError>,
    ) {
        let delay = self.config.resync_retry_delay;
        let State::SignedIn(s) = &mut self.state else {
            return;
        };
        let Some(list) = s.rooms.get_mut(&room_id) else {
            return;
        };
        if !list.is_sync_call(id) {
            return;
        }
        let mut out = Vec::new();
        let again = match result {
            Ok(NodeReply::SyncGroup(output)) => {
                // Entries trimmed by the room's retention are skipped.
                let floor = Seq(output.first_group_seq.saturating_sub(1));
                if list.last() < floor {
                    list.restart_at(floor);
                }
                let output = SyncOutput {
                    messages: output.messages,
                    has_more: output.has_more,
                    last_seq: output.last_group_seq,
                };
                list.sync_ok(now, delay, output, &mut out)
            }
            Ok(other) => {
                tracing::warn!(
                    conn = self.conn_id,
                    room = %room_id,
                    ?other,
                    "room sync got a reply of the wrong kind"
                );
                list.sync_failed(now, delay);
                false
            }
            Err(e) if !e.code.is_retryable() => {
                tracing::info!(conn = self.conn_id, room = %room_id, error = %e, "room cannot be read; unsubscribed");
                self.drop_room(room_id);
                return;
            }
            Err(e) => {
                tracing::debug!(conn = self.conn_id, room = %room_id, error = %e, "room sync failed; retrying");
                list.sync_failed(now, delay);
                false
            }
        };
        let failures = list.failures();
        self.deliver_group(room_id, out, true);
        if failures >= self.config.max_resync_failures {
            return self.close(
                ErrorCode::ErrorUnavailable,
                format!("cannot sync room {room_id} ({failures} attempts)"),
            );
        }
        if !again {
            return;
        }
        // Pacing: while the client is behind, the next page waits.
        let behind = self.queued_bytes > self.config.send_queue_limit / 2;
        match &mut self.state {
            State::SignedIn(s) if behind => {
                if let Some(list) = s.rooms.get_mut(&room_id) {
                    list.defer(now + delay);
                }
            }
            State::SignedIn(s) if s.rooms.contains_key(&room_id) => self.start_room_sync(room_id),
            _ => {}
        }
    }

    /// A persisted push of a group list (`LIST_KIND_GROUP`, owner = the
    /// room or super group). Ignored unless the connection reads it.
    pub(super) fn on_group_push(&mut self, push: PushedMessage) {
        let State::SignedIn(s) = &mut self.state else {
            return;
        };
        let room_id = GroupId(push.owner_id);
        let user_id = s.id.user_id;
        let skip = super::skips(&push, s.id.device_id);
        let Some(list) = s.rooms.get_mut(&room_id) else {
            tracing::trace!(conn = self.conn_id, group = %room_id, "push of a list not subscribed dropped");
            return;
        };
        let message = push.message.unwrap_or_default();
        let ends = membership::ends(&message, room_id, user_id);
        let last_word = ends.then(|| message.clone());
        let mut out = Vec::new();
        let seq = Seq(push.seq);
        let sync = list.push(Entry { seq, message, send: !skip }, &mut out);
        let caught_up = list.last() >= seq;
        let high = push.priority == PushPriority::High as i32;
        self.deliver_group(room_id, out, high);
        if let Some(message) = last_word.filter(|_| !caught_up && self.is_subscribed(room_id)) {
            // The member can no longer read the list: the gap before this
            // entry cannot be repaired, but the client must learn of the end.
            if !skip {
                self.send_push(seq, message, false);
            }
            self.drop_room(room_id);
            return;
        }
        if sync && self.is_subscribed(room_id) {
            self.start_room_sync(room_id);
        }
    }

    /// Sends entries of a group list, in order (see the [module
    /// documentation](self) for which are skipped). After an entry that
    /// ends the user's membership the subscription is dropped and the rest
    /// are not sent. `high`: the entries may not be skipped for a slow
    /// connection (backlog and gap repair, or a high-priority push).
    fn deliver_group(&mut self, room_id: GroupId, entries: Vec<Entry>, high: bool) {
        let State::SignedIn(s) = &self.state else {
            return;
        };
        let user_id = s.id.user_id;
        let droppable = !high && !s.super_groups.contains(&room_id);
        for entry in entries {
            if self.is_closed() {
                return;
            }
            let ends = membership::ends(&entry.message, room_id, user_id);
            if entry.send && entry.message.conversation_kind != ConversationKind::Group as i32 {
                self.send_push(entry.seq, entry.message, droppable);
            }
            if ends {
                tracing::debug!(conn = self.conn_id, group = %room_id, "membership ended; unsubscribed");
                self.drop_room(room_id);
                return;
            }
        }
    }
}

/// Where a subscription's delivery starts: after the client's `after_seq`
/// (0: the room's end, or a super group's join point), never past the
/// list's end, never before its first readable entry.
fn start_after(after: Seq, output: &SubscribeRoomOutput, super_group: bool) -> Seq {
    let last = Seq(output.last_seq);
    let start = if after == Seq::ZERO && !super_group { last } else { after.min(last) };
    start.max(Seq(output.first_seq.saturating_sub(1)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_after_clamps_to_the_readable_range() {
        let out = SubscribeRoomOutput { last_seq: 10, first_seq: 4 };
        assert_eq!(start_after(Seq(0), &out, false), Seq(10), "a room: live only");
        assert_eq!(start_after(Seq(0), &out, true), Seq(3), "a super group: from the join point");
        assert_eq!(start_after(Seq(2), &out, true), Seq(3));
        assert_eq!(start_after(Seq(7), &out, false), Seq(7));
        assert_eq!(start_after(Seq(99), &out, true), Seq(10));
    }
}
