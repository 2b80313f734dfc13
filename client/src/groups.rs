//! The client's view of the super groups and rooms it reads: one feed per
//! subscribed group list, sans-IO like the [`Timeline`].
//!
//! # Super groups
//!
//! After every sign-in the client subscribes (`SUBSCRIBE_ROOM`) each super
//! group of `SignInOutput.super_groups`, after its cursor: the last group
//! seq made ready by this client, else the one the application gave in
//! [`ClientConfig::group_cursors`](crate::ClientConfig::group_cursors),
//! else the member's join point (`joined_group_seq`). The gateway then
//! pushes what follows, then live entries. Each feed is a [`Timeline`] of
//! group seqs: a push that skips a seq is held and the gap synced with
//! `SYNC_GROUP` from the cursor (paging while `has_more`), so
//! [`Event::GroupMessage`]s carry each group seq once, in order, without
//! gaps (except what the member may not read: before its join point, or
//! trimmed by retention, which is skipped). Entries of a converted group
//! from before its conversion (`CONVERSATION_KIND_GROUP`) are in the
//! members' own lists and are not repeated.
//!
//! Membership follows the notifications ([`change_of`]): a
//! `group_members_added` of a super group naming the user, or a
//! `group_converted` to a super group, subscribes it; a
//! `group_members_removed` naming the user, or a `group_dissolved`, ends
//! it (after the notice is delivered) with [`Event::Unsubscribed`]. A super
//! group no longer listed at a sign-in ends the same way.
//!
//! # Rooms
//!
//! Rooms are subscribed by the application
//! ([`Client::subscribe_room`](crate::Client::subscribe_room)) and
//! subscribed again after every reconnect, after the last room seq made
//! ready. Rooms are lossy by design (retention, normal-priority entries
//! skipped for slow connections), so a room feed only keeps the order:
//! [`Event::RoomMessage`]s have increasing room seqs, each at most once.
//!
//! # Bounds
//!
//! At most [`MAX_SUBSCRIBING`] subscriptions and [`MAX_SYNCING`] group
//! syncs are in flight at once; each super group holds back at most the
//! configured push buffer. A subscription the gateway refuses with a
//! retryable error (or that times out) is tried again after the retry
//! delay; any other refusal ends the feed with [`Event::Unsubscribed`].

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use prost::Message as _;
use rim_proto::ErrorCode;
use rim_proto::ids::{GroupId, Seq, UserId};
use rim_proto::store::notification::Event as Notice;
use rim_proto::store::{GroupKind, Notification};
use rim_proto::v1::{
    ContentType, ConversationKind, GroupHead, Message, SubscribeRoomOutput, SyncGroupOutput, SyncOutput,
};

use crate::error::ClientError;
use crate::event::Event;
use crate::timeline::{SyncProgress, Timeline};

/// Subscriptions in flight at once.
pub const MAX_SUBSCRIBING: usize = 8;
/// Group syncs in flight at once.
pub const MAX_SYNCING: usize = 4;

/// What a feed reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FeedKind {
    /// A super group the user is a member of (subscribed by the client).
    SuperGroup,
    /// A room the application subscribed.
    Room,
}

/// A membership change the client follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// The user may now read super group `group_id` after `after`.
    Join {
        /// The super group.
        group_id: GroupId,
        /// Its group seq already covered (the notice itself).
        after: Seq,
    },
    /// The user may no longer read `group_id`.
    Leave {
        /// The group.
        group_id: GroupId,
        /// `ERROR_NOT_GROUP_MEMBER` (removed) or `ERROR_GROUP_NOT_FOUND`
        /// (dissolved).
        code: ErrorCode,
    },
}

/// The membership change `message` (an entry of the user's own list or of
/// a group list) means for user `me`, if any.
pub fn change_of(me: UserId, message: &Message) -> Option<Change> {
    if message.content_type != ContentType::Notification as i32 {
        return None;
    }
    let notification = Notification::decode(message.content.as_ref()).ok()?;
    // The notice's own position in the group list.
    let at = Seq(message.group_seq);
    match notification.event? {
        Notice::GroupMembersAdded(e) if e.kind == GroupKind::Super as i32 && e.user_ids.contains(&me.0) => {
            Some(Change::Join { group_id: GroupId(e.group_id), after: at.max(Seq(e.group_seq)) })
        }
        Notice::GroupConverted(e) if e.kind == GroupKind::Super as i32 => {
            Some(Change::Join { group_id: GroupId(e.group_id), after: at })
        }
        Notice::GroupMembersRemoved(e) if e.user_ids.contains(&me.0) => {
            Some(Change::Leave { group_id: GroupId(e.group_id), code: ErrorCode::ErrorNotGroupMember })
        }
        Notice::GroupDissolved(e) => {
            Some(Change::Leave { group_id: GroupId(e.group_id), code: ErrorCode::ErrorGroupNotFound })
        }
        _ => None,
    }
}

/// Where a feed's subscription stands on the current connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sub {
    /// To be sent.
    Needed,
    /// Sent; `generation` tells its reply from a stale one.
    InFlight,
    /// In place.
    Active,
    /// Refused for now: send again at `at`.
    Waiting { at: Instant },
}

#[derive(Debug)]
enum Cursor {
    /// A super group: gap-free.
    Super { timeline: Timeline, syncing: bool },
    /// A room: increasing only.
    Room { last: Seq },
}

#[derive(Debug)]
struct Feed {
    cursor: Cursor,
    sub: Sub,
    generation: u64,
}

impl Feed {
    fn last(&self) -> Seq {
        match &self.cursor {
            Cursor::Super { timeline, .. } => timeline.last(),
            Cursor::Room { last } => *last,
        }
    }

    fn kind(&self) -> FeedKind {
        match self.cursor {
            Cursor::Super { .. } => FeedKind::SuperGroup,
            Cursor::Room { .. } => FeedKind::Room,
        }
    }
}

/// The feeds of one client. See the [module documentation](self).
#[derive(Debug)]
pub struct Feeds {
    me: UserId,
    feeds: HashMap<GroupId, Feed>,
    buffer_limit: usize,
    retry_delay: Duration,
    next_generation: u64,
    ready: VecDeque<Event>,
}

impl Feeds {
    /// No feeds yet; super groups hold back at most `buffer_limit` pushes,
    /// and refused subscriptions and failed syncs wait `retry_delay`.
    pub fn new(buffer_limit: usize, retry_delay: Duration) -> Feeds {
        Feeds {
            me: UserId::default(),
            feeds: HashMap::new(),
            buffer_limit,
            retry_delay,
            next_generation: 0,
            ready: VecDeque::new(),
        }
    }

    /// Signed in as `me` with `heads` listed: a feed for each super group
    /// (starting after the feed's cursor, else `resume`'s, else the join
    /// point), the super groups no longer listed ended, and every feed to
    /// be subscribed on the new connection.
    pub fn signed_in(
        &mut self,
        me: UserId,
        heads: &[GroupHead],
        resume: &HashMap<GroupId, Seq>,
        now: Instant,
    ) {
        self.me = me;
        let listed: Vec<GroupId> = heads.iter().map(|h| GroupId(h.group_id)).collect();
        let gone: Vec<GroupId> = self
            .feeds
            .iter()
            .filter(|(g, f)| f.kind() == FeedKind::SuperGroup && !listed.contains(g))
            .map(|(g, _)| *g)
            .collect();
        for group_id in gone {
            self.end(group_id, ErrorCode::ErrorNotGroupMember, "no longer a member");
        }
        for h in heads {
            let group_id = GroupId(h.group_id);
            let joined = Seq(h.joined_group_seq);
            match self.feeds.get_mut(&group_id) {
                // Its cursor rules; nothing before the join point is readable.
                Some(Feed { cursor: Cursor::Super { timeline, .. }, .. }) => {
                    timeline.skip_to(joined, now);
                    self.collect(group_id);
                }
                Some(_) => {}
                None => {
                    let start = resume.get(&group_id).copied().unwrap_or(Seq::ZERO).max(joined);
                    self.join(group_id, start);
                }
            }
        }
        for feed in self.feeds.values_mut() {
            feed.sub = Sub::Needed;
            if let Cursor::Super { timeline, syncing } = &mut feed.cursor {
                timeline.resubscribed();
                *syncing = false;
            }
        }
    }

    /// The connection was lost: requests in flight are forgotten.
    pub fn disconnected(&mut self) {
        for feed in self.feeds.values_mut() {
            feed.sub = Sub::Needed;
            if let Cursor::Super { syncing, .. } = &mut feed.cursor {
                *syncing = false;
            }
        }
    }

    /// Reads super group `group_id` after `after`, unless a feed reads it
    /// already (its cursor is kept). Returns whether a feed was added.
    pub fn join(&mut self, group_id: GroupId, after: Seq) -> bool {
        if self.feeds.contains_key(&group_id) {
            return false;
        }
        let timeline = Timeline::caught_up(after, self.buffer_limit, self.retry_delay);
        let feed =
            Feed { cursor: Cursor::Super { timeline, syncing: false }, sub: Sub::Needed, generation: 0 };
        self.feeds.insert(group_id, feed);
        true
    }

    /// Reads room `room_id` after `after` ([`Seq::ZERO`]: from its end),
    /// replacing a feed of it.
    pub fn add_room(&mut self, room_id: GroupId, after: Seq) {
        let feed = Feed { cursor: Cursor::Room { last: after }, sub: Sub::Needed, generation: 0 };
        self.feeds.insert(room_id, feed);
    }

    /// Stops reading `group_id`; whether it was read.
    pub fn remove(&mut self, group_id: GroupId) -> bool {
        self.feeds.remove(&group_id).is_some()
    }

    /// Whether `group_id` is read.
    pub fn contains(&self, group_id: GroupId) -> bool {
        self.feeds.contains_key(&group_id)
    }

    /// The kind of the feed of `group_id`.
    pub fn kind(&self, group_id: GroupId) -> Option<FeedKind> {
        self.feeds.get(&group_id).map(Feed::kind)
    }

    /// The last group seq made ready of each feed.
    pub fn cursors(&self) -> HashMap<GroupId, Seq> {
        self.feeds.iter().map(|(g, f)| (*g, f.last())).collect()
    }

    /// The next subscription to send, if one is due and fewer than
    /// [`MAX_SUBSCRIBING`] are in flight: `(group_id, after_seq,
    /// generation)`. It counts as in flight.
    pub fn poll_subscribe(&mut self, now: Instant) -> Option<(GroupId, Seq, u64)> {
        let in_flight = self.feeds.values().filter(|f| f.sub == Sub::InFlight).count();
        if in_flight >= MAX_SUBSCRIBING {
            return None;
        }
        let group_id = self
            .feeds
            .iter()
            .find(|(_, f)| match f.sub {
                Sub::Needed => true,
                Sub::Waiting { at } => now >= at,
                Sub::InFlight | Sub::Active => false,
            })
            .map(|(g, _)| *g)?;
        self.begin_subscribe(group_id)
    }

    /// Marks `group_id`'s subscription as sent now (whatever is in flight);
    /// `(group_id, after_seq, generation)`.
    pub fn begin_subscribe(&mut self, group_id: GroupId) -> Option<(GroupId, Seq, u64)> {
        self.next_generation += 1;
        let generation = self.next_generation;
        let feed = self.feeds.get_mut(&group_id)?;
        feed.sub = Sub::InFlight;
        feed.generation = generation;
        Some((group_id, feed.last(), generation))
    }

    /// The subscription `generation` of `group_id` is in place.
    pub fn subscribe_ok(
        &mut self,
        group_id: GroupId,
        generation: u64,
        output: SubscribeRoomOutput,
        now: Instant,
    ) {
        let Some(feed) = self.feeds.get_mut(&group_id).filter(|f| f.generation == generation) else {
            return;
        };
        feed.sub = Sub::Active;
        let floor = Seq(output.first_seq.saturating_sub(1));
        let head = Seq(output.last_seq);
        match &mut feed.cursor {
            Cursor::Super { timeline, .. } => {
                timeline.skip_to(floor, now);
                timeline.observe_head(head, now);
            }
            // As the gateway: 0 is the room's end; never before its first entry.
            Cursor::Room { last } => {
                *last = if *last == Seq::ZERO { head } else { (*last).min(head) }.max(floor);
            }
        }
        self.collect(group_id);
    }

    /// The subscription `generation` of `group_id` failed with `error`. A
    /// retryable failure (timeouts and lost connections included) is tried
    /// again later; any other ends the feed (returned `true`).
    pub fn subscribe_failed(
        &mut self,
        group_id: GroupId,
        generation: u64,
        error: &ClientError,
        now: Instant,
    ) -> bool {
        let Some(feed) = self.feeds.get_mut(&group_id).filter(|f| f.generation == generation) else {
            return false;
        };
        if error.is_retryable() {
            feed.sub = Sub::Waiting { at: now + self.retry_delay };
            return false;
        }
        self.end(group_id, error.code(), &error.to_string());
        true
    }

    /// A pushed entry of a group list (`message.conversation_id`'s). Returns
    /// `false` if no feed reads that list.
    pub fn push(&mut self, message: Message, now: Instant) -> bool {
        let group_id = GroupId(message.conversation_id);
        let Some(feed) = self.feeds.get_mut(&group_id) else {
            return false;
        };
        match &mut feed.cursor {
            Cursor::Super { timeline, .. } => timeline.push(message, now),
            Cursor::Room { last } => {
                if Seq(message.seq) > *last {
                    *last = Seq(message.seq);
                    self.ready.push_back(Event::RoomMessage(message));
                }
                return true;
            }
        }
        self.collect(group_id);
        true
    }

    /// A push of `group_id` at `seq` the client had no room for: a super
    /// group syncs it later; a room's is lost.
    pub fn shed(&mut self, group_id: GroupId, seq: Seq, now: Instant) {
        if let Some(Feed { cursor: Cursor::Super { timeline, .. }, .. }) = self.feeds.get_mut(&group_id) {
            timeline.shed(seq, now);
        }
    }

    /// The next group sync to send, if one is due and fewer than
    /// [`MAX_SYNCING`] are in flight: `(group_id, after_group_seq)`. It
    /// counts as in flight.
    pub fn poll_sync(&mut self, now: Instant) -> Option<(GroupId, Seq)> {
        let syncing =
            self.feeds.values().filter(|f| matches!(f.cursor, Cursor::Super { syncing: true, .. })).count();
        if syncing >= MAX_SYNCING {
            return None;
        }
        for (group_id, feed) in &mut self.feeds {
            if feed.sub != Sub::Active {
                continue;
            }
            if let Cursor::Super { timeline, syncing: s @ false } = &mut feed.cursor
                && let Some(after) = timeline.poll_sync(now)
            {
                *s = true;
                return Some((*group_id, after));
            }
        }
        None
    }

    /// The sync of `group_id` in flight returned `output`.
    pub fn sync_ok(&mut self, group_id: GroupId, output: SyncGroupOutput, now: Instant) {
        let Some(Feed { cursor: Cursor::Super { timeline, syncing }, .. }) = self.feeds.get_mut(&group_id)
        else {
            return;
        };
        if !std::mem::replace(syncing, false) {
            return; // stale
        }
        // The list starts later than asked: trimmed, or the join point.
        let mut floor = Seq(output.first_group_seq.saturating_sub(1));
        if let Some(first) = output.messages.iter().map(|m| m.seq).min() {
            floor = floor.max(Seq(first.saturating_sub(1)));
        }
        timeline.skip_to(floor, now);
        let output = SyncOutput {
            messages: output.messages,
            has_more: output.has_more,
            last_seq: output.last_group_seq,
        };
        let _: SyncProgress = timeline.sync_ok(output, now);
        self.collect(group_id);
    }

    /// The sync of `group_id` in flight failed with `error`. A
    /// non-retryable failure (no longer a member, the group is gone) ends
    /// the feed; any other is retried after the delay.
    pub fn sync_failed(&mut self, group_id: GroupId, error: &ClientError, now: Instant) {
        let Some(Feed { cursor: Cursor::Super { timeline, syncing }, .. }) = self.feeds.get_mut(&group_id)
        else {
            return;
        };
        if !std::mem::replace(syncing, false) {
            return;
        }
        if error.is_retryable() {
            timeline.sync_failed(now);
        } else {
            self.end(group_id, error.code(), &error.to_string());
        }
    }

    /// When [`poll_subscribe`](Self::poll_subscribe) or
    /// [`poll_sync`](Self::poll_sync) may next have something to do.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.feeds
            .values()
            .filter_map(|f| match (&f.sub, &f.cursor) {
                (Sub::Waiting { at }, _) => Some(*at),
                (Sub::Active, Cursor::Super { timeline, .. }) => timeline.next_deadline(),
                _ => None,
            })
            .min()
    }

    /// The next event ready for the application.
    pub fn pop_ready(&mut self) -> Option<Event> {
        self.ready.pop_front()
    }

    /// Events ready.
    pub fn ready_len(&self) -> usize {
        self.ready.len()
    }

    /// Moves the entries `group_id`'s timeline made ready to the events;
    /// ends the feed after an entry that ends the membership.
    fn collect(&mut self, group_id: GroupId) {
        let Some(Feed { cursor: Cursor::Super { timeline, .. }, .. }) = self.feeds.get_mut(&group_id) else {
            return;
        };
        let mut leave = None;
        while let Some(message) = timeline.pop_ready() {
            if message.conversation_kind == ConversationKind::Group as i32 {
                continue; // before the conversion: in the own list
            }
            if let Some(Change::Leave { group_id: g, code }) = change_of(self.me, &message)
                && g == group_id
            {
                leave = Some(code);
            }
            self.ready.push_back(Event::GroupMessage(message));
            if leave.is_some() {
                break;
            }
        }
        if let Some(code) = leave {
            self.end(group_id, code, "the membership ended");
        }
    }

    /// Ends a feed with [`Event::Unsubscribed`].
    fn end(&mut self, group_id: GroupId, code: ErrorCode, reason: &str) {
        if self.feeds.remove(&group_id).is_some() {
            self.ready.push_back(Event::Unsubscribed { group_id, code, reason: reason.to_string() });
        }
    }
}

#[cfg(test)]
mod tests;
