//! The connection task's side of the group feeds ([`crate::groups`]):
//! telling group-list pushes from own-list pushes, sending subscriptions
//! and group syncs, handling their replies, and following membership
//! changes.
//!
//! # Which list a push belongs to
//!
//! A `MESSAGE` push does not say which list it comes from. An entry of a
//! super group's or room's list always has `seq == group_seq` and the kind
//! `SUPER_GROUP` or `ROOM`; the user's own list holds 1:1, small-group and
//! system entries, and copies of the group notifications that concern the
//! user (same kind, but `seq` is the user's seq). Such a copy is taken for
//! the group's entry only if its own seq happens to equal its group seq: it
//! is then the group's entry at that seq indeed, and since it may also have
//! been the own list's, the timeline syncs once to be sure
//! ([`Timeline::check_soon`](crate::timeline::Timeline::check_soon)). So a push is never taken for an own-list
//! entry it is not.

use std::time::{Duration, Instant};

use bytes::Bytes;
use prost::Message as _;
use rim_proto::ids::{GroupId, Seq};
use rim_proto::v1::{
    Command, ContentType, ConversationKind, Message, SubscribeRoomInput, SubscribeRoomOutput, SyncGroupInput,
    SyncGroupOutput, UnsubscribeRoomInput,
};
use tokio::sync::oneshot;

use super::Driver;
use crate::error::{ClientError, Result};
use crate::event::Event;
use crate::groups::{Change, change_of};
use crate::link::{Link, Purpose};

/// Whether a persisted push is an entry of a group list (see the [module
/// documentation](self)).
pub(super) fn is_group_entry(message: &Message) -> bool {
    let kind = message.conversation_kind;
    (kind == ConversationKind::SuperGroup as i32 || kind == ConversationKind::Room as i32)
        && message.seq == message.group_seq
}

impl Driver {
    /// Bookkeeping of handing `event` to the application.
    pub(super) fn handed(&mut self, event: &Event) {
        match event {
            Event::Message(m) => self.delivered = self.delivered.max(Seq(m.seq)),
            Event::GroupMessage(m) | Event::RoomMessage(m) => {
                let mut cursors = self.cursors.lock().unwrap_or_else(|e| e.into_inner());
                let cursor = cursors.entry(GroupId(m.conversation_id)).or_insert(Seq::ZERO);
                *cursor = (*cursor).max(Seq(m.seq));
            }
            _ => {}
        }
    }

    /// A request in flight failed with `error`.
    pub(super) fn fail(&mut self, purpose: Purpose, error: ClientError) {
        let now = Instant::now();
        match purpose {
            Purpose::Caller { reply, .. } => {
                let _ = reply.send(Err(error));
            }
            Purpose::Sync => {
                if let Some(timeline) = &mut self.timeline {
                    timeline.sync_failed(now);
                }
            }
            Purpose::Subscribe { group_id, generation, reply } => {
                self.feeds.subscribe_failed(group_id, generation, &error, now);
                if let Some(reply) = reply {
                    let _ = reply.send(Err(error));
                }
            }
            Purpose::GroupSync { group_id } => self.feeds.sync_failed(group_id, &error, now),
            Purpose::Ack(_) | Purpose::Heartbeat | Purpose::Ignore => {}
        }
    }

    /// An own-list entry went to the application (`message`, just queued):
    /// the feeds follow the membership change it means, if any.
    pub(super) fn follow_membership(&mut self, message: &Message) {
        match change_of(self.credentials.user_id, message) {
            Some(Change::Join { group_id, after }) if self.feeds.join(group_id, after) => {
                tracing::debug!(group = %group_id, %after, "joined a super group; subscribing");
            }
            Some(Change::Leave { group_id, code }) if self.feeds.remove(group_id) => {
                tracing::debug!(group = %group_id, "left a super group; unsubscribing");
                self.unsubscribes.push(group_id);
                let reason = "the membership ended".into();
                self.outbox.push_back(Event::Unsubscribed { group_id, code, reason });
            }
            _ => {}
        }
    }

    /// A persisted push of a group list; `full`: the application is
    /// behind.
    pub(super) fn on_group_push(&mut self, message: Message, full: bool) {
        let now = Instant::now();
        // Maybe the own list's copy of a notification (see the module docs).
        if message.content_type == ContentType::Notification as i32
            && let Some(timeline) = &mut self.timeline
            && Seq(message.seq) > timeline.last()
        {
            timeline.check_soon();
        }
        if full {
            let group_id = GroupId(message.conversation_id);
            tracing::debug!(group = %group_id, "group push shed: the application is behind");
            self.feeds.shed(group_id, Seq(message.seq), now);
        } else if !self.feeds.push(message, now) {
            tracing::trace!("push of a group not read dropped");
        }
    }

    /// After every input: `UNSUBSCRIBE_ROOM`s owed, due subscriptions and
    /// (with `room` for events) group syncs; ready group entries to the
    /// event queue.
    pub(super) fn feed_requests(&mut self, link: &mut Link, room: bool, now: Instant) {
        let timeout = self.config.request_timeout;
        for room_id in std::mem::take(&mut self.unsubscribes) {
            let content = UnsubscribeRoomInput { room_id: room_id.0 }.encode_to_vec().into();
            let _ = link.request(Command::UnsubscribeRoom, content, Purpose::Ignore, timeout, now);
        }
        while let Some((group_id, after_seq, generation)) = self.feeds.poll_subscribe(now) {
            let input = SubscribeRoomInput { room_id: group_id.0, after_seq: after_seq.0 };
            let content: Bytes = input.encode_to_vec().into();
            let purpose = Purpose::Subscribe { group_id, generation, reply: None };
            if let Err((e, purpose)) = link.request(Command::SubscribeRoom, content, purpose, timeout, now) {
                self.fail(purpose, e);
                break;
            }
        }
        while let Some((group_id, after_group_seq)) = room.then(|| self.feeds.poll_sync(now)).flatten() {
            let input = SyncGroupInput {
                group_id: group_id.0,
                after_group_seq: after_group_seq.0,
                limit: self.config.sync_page,
            };
            let purpose = Purpose::GroupSync { group_id };
            let content = input.encode_to_vec().into();
            if let Err((e, purpose)) = link.request(Command::SyncGroup, content, purpose, timeout, now) {
                self.fail(purpose, e);
                break;
            }
        }
        while let Some(event) = self.feeds.pop_ready() {
            self.outbox.push_back(event);
        }
    }

    /// The application's `subscribe_room`: subscribed at once, the reply
    /// goes back to it.
    pub(super) fn subscribe_room(
        &mut self,
        link: &mut Link,
        room_id: GroupId,
        after_seq: Seq,
        timeout: Duration,
        reply: oneshot::Sender<Result<Bytes>>,
    ) {
        self.feeds.add_room(room_id, after_seq);
        let Some((group_id, after_seq, generation)) = self.feeds.begin_subscribe(room_id) else {
            return;
        };
        let content =
            SubscribeRoomInput { room_id: group_id.0, after_seq: after_seq.0 }.encode_to_vec().into();
        let purpose = Purpose::Subscribe { group_id, generation, reply: Some(reply) };
        if let Err((e, purpose)) =
            link.request(Command::SubscribeRoom, content, purpose, timeout, Instant::now())
        {
            self.fail(purpose, e);
        }
    }

    /// The application's `unsubscribe_room`.
    pub(super) fn unsubscribe_room(
        &mut self,
        link: &mut Link,
        room_id: GroupId,
        timeout: Duration,
        reply: oneshot::Sender<Result<Bytes>>,
    ) {
        self.feeds.remove(room_id);
        let command = Command::UnsubscribeRoom;
        let content = UnsubscribeRoomInput { room_id: room_id.0 }.encode_to_vec().into();
        let purpose = Purpose::Caller { command, reply };
        if let Err((e, purpose)) = link.request(command, content, purpose, timeout, Instant::now()) {
            self.fail(purpose, e);
        }
    }

    /// The reply to a feed's `SUBSCRIBE_ROOM`.
    pub(super) fn subscribed(
        &mut self,
        group_id: GroupId,
        generation: u64,
        result: Result<Bytes>,
        reply: Option<oneshot::Sender<Result<Bytes>>>,
        now: Instant,
    ) {
        match result.and_then(|data| Ok((SubscribeRoomOutput::decode(data.clone())?, data))) {
            Ok((output, data)) => {
                self.feeds.subscribe_ok(group_id, generation, output, now);
                if let Some(reply) = reply {
                    let _ = reply.send(Ok(data));
                }
            }
            Err(e) => {
                tracing::debug!(group = %group_id, error = %e, "subscription failed");
                let purpose = Purpose::Subscribe { group_id, generation, reply };
                self.fail(purpose, e);
            }
        }
    }

    /// The reply to a feed's `SYNC_GROUP`.
    pub(super) fn group_synced(&mut self, group_id: GroupId, result: Result<Bytes>, now: Instant) {
        match result.and_then(|data| Ok(SyncGroupOutput::decode(data)?)) {
            Ok(output) => self.feeds.sync_ok(group_id, output, now),
            Err(e) => {
                tracing::debug!(group = %group_id, error = %e, "group sync failed");
                self.feeds.sync_failed(group_id, &e, now);
            }
        }
    }
}
