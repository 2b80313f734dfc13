//! Events for the app's backend, produced when the entry they describe is
//! applied (issue 15 §3). Not the relay's *outbox* (`Table::Outbox`): that
//! carries messages between shards; these leave the cluster, through the
//! node's webhooks (`rim-node` `webhooks`) and `GET /events`.
//!
//! # Production
//!
//! An operation that succeeds writes its events into the same transaction
//! layer as its other writes, so a rejected operation leaves none and a
//! crash never loses or repeats one. Each event sits at its position
//! `(log index, ordinal within the entry)`, which also names it
//! (`evt_<shard>_<index>_<ordinal>`, [`event_id`]): stable, the same on every
//! replica, and in log order. Its body is the exact JSON every delivery
//! carries, built here from the entry alone (time is the proposal's
//! `now_ms`), so every replica and every retry has the same bytes.
//!
//! Exactly one shard emits each fact:
//!
//! * **1:1 message** (and its recall): the shard of the pair's lower user id,
//!   where that user's copy is appended: at the send when the sender is the
//!   lower id, or the recipient lives in the sender's shard; else at the
//!   relay's `Deliver` into the recipient's list. So all events of one
//!   conversation come from one shard in that user's list order (FIFO per
//!   conversation). A deduplicated retry or re-delivery emits nothing.
//! * **Group message** (and recall): the group's shard, at the send.
//! * **Group changes** (`group.created`, `.updated`, `.members_added`,
//!   `.members_removed`, `.member_changed`, `.converted`, `.dissolved`): the
//!   group's shard. Rooms emit `group.created` and their messages only.
//! * **Friend changes** (`friend.changed`): the actor's shard (`ChangeFriend`).
//! * **Sessions and push checks** (`device.online`, `device.offline`,
//!   `push.needed`): the user's shard (`im::presence`).
//!
//! Whether events are produced (`Limits::events`) and how long they are kept
//! (`Limits::event_retention_ms`) are replicated limits, never a node's
//! configuration: apply must be deterministic.
//!
//! # Delivery state
//!
//! * A cursor per endpoint name: every event at or before it was delivered
//!   or dead-lettered. `AdvanceEventCursor` only moves it forward.
//! * `DeadLetterEvent` copies an event into the dead letters (numbered in
//!   dead-letter order) and moves the endpoint's cursor past it.
//! * `TrimEvents` deletes events at or before the position it names that are
//!   older than the retention, and dead letters older than the retention,
//!   at most [`TRIM_PER_OP`] of each per operation.
//!
//! * `RemoveDeadLetter` deletes one dead letter of an endpoint (the server
//!   API's replay got a 2xx for it); absent, it changes nothing.
//!
//! All three tables live in the shard's `sm` range, so snapshots carry them.

use base64::Engine as _;
use rim_proto::ids::{ShardId, UserId};
use rim_proto::store::{
    self, DeadLetterRecord, EventCursor, EventRecord, GroupRecord, notification::Event as N,
};
use rim_proto::v1::{ContentType, ConversationKind, Message};
use serde::Serialize;

use super::Applier;
use super::read::Reader;
use crate::db;
use crate::error::{Result, reject};
use crate::keys::{self, MetaTag};

/// Longest endpoint name in bytes.
pub const MAX_ENDPOINT_NAME: usize = 64;
/// Most events, and most dead letters, one `TrimEvents` removes.
const TRIM_PER_OP: usize = 1_024;
/// Longest stored dead-letter reason in bytes.
const MAX_REASON: usize = 256;

/// The id of the event at `(index, ordinal)` of `shard`'s log.
pub fn event_id(shard: ShardId, index: u64, ordinal: u32) -> String {
    format!("evt_{}_{index}_{ordinal}", shard.0)
}

/// The body of every event (Standard Webhooks' payload structure). Field
/// order is declaration order: the bytes depend on the values only.
#[derive(Serialize)]
struct Envelope<'a, D: Serialize> {
    r#type: &'a str,
    event_id: &'a str,
    timestamp: String,
    data: D,
}

/// `data` of `message.created` and `message.recalled`. 64-bit ids are
/// strings (JSON numbers lose precision above 2^53).
#[derive(Serialize)]
struct MessageData {
    message_id: String,
    conversation_kind: String,
    sender_user_id: String,
    sender_device_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    recipient_user_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    group_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    group_seq: Option<u64>,
    client_msg_id: String,
    content_type: i32,
    /// Standard base64 of the content bytes.
    content: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    refers_to: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    mentions: Vec<String>,
    send_time_ms: i64,
}

/// `data` of the `group.*` events.
#[derive(Serialize, Default)]
struct GroupData {
    group_id: String,
    kind: String,
    by_user_id: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    user_ids: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    user_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    nickname: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    owner_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    member_count: Option<u32>,
}

/// `data` of `friend.changed`.
#[derive(Serialize)]
struct FriendData {
    user_id: String,
    friend_id: String,
    action: String,
    status: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    description: String,
}

fn id(x: u64) -> String {
    x.to_string()
}

/// `FRIEND_ACTION_REQUEST` → `request`.
fn enum_name(full: &str, prefix: &str) -> String {
    full.strip_prefix(prefix).unwrap_or(full).to_ascii_lowercase()
}

pub(super) fn kind_name(kind: i32) -> String {
    let k = ConversationKind::try_from(kind).unwrap_or(ConversationKind::Unspecified);
    enum_name(k.as_str_name(), "CONVERSATION_KIND_")
}

fn group_kind_name(kind: i32) -> String {
    let k = store::GroupKind::try_from(kind).unwrap_or(store::GroupKind::Unspecified);
    enum_name(k.as_str_name(), "GROUP_KIND_")
}

/// Which conversation a 1:1 pair is (lower id first).
fn pair(a: u64, b: u64) -> (u64, u64) {
    (a.min(b), a.max(b))
}

/// RFC 3339 UTC with milliseconds, from Unix ms (proleptic Gregorian).
pub(crate) fn rfc3339(ms: i64) -> String {
    let (secs, milli) = (ms.div_euclid(1000), ms.rem_euclid(1000));
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{milli:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn position(c: &EventCursor) -> (u64, u32) {
    (c.index, c.ordinal)
}

impl Applier<'_> {
    /// Writes an event of `kind` at the next position of the current entry.
    pub(super) fn emit<D: Serialize>(&mut self, kind: &str, conversation: String, data: D) -> Result<()> {
        if !self.limits.events {
            return Ok(());
        }
        let ordinal = self.next_event;
        let Some(next) = ordinal.checked_add(1) else {
            reject!(ErrorInternal, "too many events in entry {}", self.index)
        };
        self.next_event = next;
        let event_id = event_id(self.shard, self.index, ordinal);
        let envelope = Envelope { r#type: kind, event_id: &event_id, timestamp: rfc3339(self.now_ms), data };
        let body = serde_json::to_vec(&envelope)
            .map_err(|e| crate::Error::Corrupt(format!("event body of {event_id}: {e}")))?;
        let rec = EventRecord {
            event_id,
            r#type: kind.to_string(),
            created_ms: self.now_ms,
            conversation,
            body: body.into(),
            index: self.index,
            ordinal,
        };
        self.txn.put_msg(keys::event(self.shard, self.index, ordinal), &rec);
        self.op_effects.events += 1;
        Ok(())
    }

    /// `message.created` or `message.recalled` for an entry just appended
    /// (read receipts, notifications and pushes have none).
    pub(super) fn message_event(&mut self, msg: &Message) -> Result<()> {
        let kind = match ContentType::try_from(msg.content_type) {
            Ok(ContentType::Recall) => "message.recalled",
            Ok(ContentType::ReadReceipt | ContentType::Notification) => return Ok(()),
            _ => "message.created",
        };
        let direct = msg.conversation_kind == ConversationKind::User as i32;
        let conversation = if direct {
            let (lo, hi) = pair(msg.sender_user_id, msg.conversation_id);
            format!("u:{lo}:{hi}")
        } else {
            format!("g:{}", msg.conversation_id)
        };
        let data = MessageData {
            message_id: id(msg.message_id),
            conversation_kind: kind_name(msg.conversation_kind),
            sender_user_id: id(msg.sender_user_id),
            sender_device_id: id(msg.sender_device_id),
            recipient_user_id: direct.then(|| id(msg.conversation_id)),
            group_id: (!direct).then(|| id(msg.conversation_id)),
            group_seq: (!direct).then_some(msg.group_seq),
            client_msg_id: msg.client_msg_id.clone(),
            content_type: msg.content_type,
            content: base64::engine::general_purpose::STANDARD.encode(&msg.content),
            refers_to: (msg.refers_to != 0).then(|| id(msg.refers_to)),
            mentions: msg.mentions.iter().map(|m| id(*m)).collect(),
            send_time_ms: msg.send_time_ms,
        };
        self.emit(kind, conversation, data)
    }

    /// Whether the shard sending a 1:1 message from `sender` to `recipient`
    /// emits its event (module docs): the sender is the lower id, or the
    /// recipient's copy is appended here too.
    pub(super) fn emits_direct_send(sender: UserId, recipient: UserId, recipient_local: bool) -> bool {
        sender <= recipient || recipient_local
    }

    /// The event of a relayed message appended to `recipient`'s list (not a
    /// duplicate): only 1:1 messages to the pair's lower id.
    pub(super) fn delivered_event(&mut self, recipient: UserId, msg: &Message) -> Result<()> {
        if msg.conversation_kind == ConversationKind::User as i32
            && msg.conversation_id == recipient.0
            && recipient.0 < msg.sender_user_id
        {
            self.message_event(msg)?;
        }
        Ok(())
    }

    /// `group.created` for a new group (any kind).
    pub(super) fn group_created_event(&mut self, group: &GroupRecord) -> Result<()> {
        let data = GroupData {
            group_id: id(group.group_id),
            kind: group_kind_name(group.kind),
            by_user_id: id(group.owner_id),
            name: Some(group.name.clone()),
            owner_id: Some(id(group.owner_id)),
            member_count: Some(group.member_count),
            ..GroupData::default()
        };
        self.emit("group.created", format!("g:{}", group.group_id), data)
    }

    /// The `group.*` event of a group notification.
    pub(super) fn group_event(&mut self, group: &GroupRecord, by: u64, event: &N) -> Result<()> {
        let mut data = GroupData {
            group_id: id(group.group_id),
            kind: group_kind_name(group.kind),
            by_user_id: id(by),
            ..GroupData::default()
        };
        let kind = match event {
            N::GroupMembersAdded(e) => {
                data.user_ids = e.user_ids.iter().map(|u| id(*u)).collect();
                data.member_count = Some(group.member_count);
                "group.members_added"
            }
            N::GroupMembersRemoved(e) => {
                data.user_ids = e.user_ids.iter().map(|u| id(*u)).collect();
                data.member_count = Some(group.member_count);
                "group.members_removed"
            }
            N::GroupUpdated(_) => {
                data.name = Some(group.name.clone());
                data.owner_id = Some(id(group.owner_id));
                "group.updated"
            }
            N::GroupDissolved(_) => "group.dissolved",
            N::GroupConverted(_) => "group.converted",
            N::MemberChanged(e) => {
                data.user_id = Some(id(e.user_id));
                data.role = Some(enum_name(e.role().as_str_name(), "MEMBER_ROLE_"));
                data.nickname = Some(e.nickname.clone());
                "group.member_changed"
            }
            N::FriendChanged(_) => return Ok(()),
        };
        self.emit(kind, format!("g:{}", group.group_id), data)
    }

    /// `friend.changed`, in the actor's shard.
    pub(super) fn friend_event(&mut self, e: &store::FriendChanged) -> Result<()> {
        let (lo, hi) = pair(e.user_id, e.friend_id);
        let data = FriendData {
            user_id: id(e.user_id),
            friend_id: id(e.friend_id),
            action: enum_name(e.action().as_str_name(), "FRIEND_ACTION_"),
            status: enum_name(e.status().as_str_name(), "FRIEND_STATUS_"),
            description: e.description.clone(),
        };
        self.emit("friend.changed", format!("f:{lo}:{hi}"), data)
    }

    fn check_endpoint(name: &str) -> Result<()> {
        if name.is_empty() || name.len() > MAX_ENDPOINT_NAME {
            reject!(ErrorBadRequest, "endpoint name must be 1..={MAX_ENDPOINT_NAME} bytes");
        }
        Ok(())
    }

    /// Moves `endpoint`'s cursor to `to` unless it is there or further.
    fn move_cursor(&mut self, endpoint: &str, to: (u64, u32)) -> Result<()> {
        let key = keys::event_cursor(self.shard, endpoint);
        let stored = self.txn.get_msg::<EventCursor>(&key)?;
        if stored.as_ref().is_none_or(|c| position(c) < to) {
            self.txn.put_msg(key, &EventCursor { index: to.0, ordinal: to.1 });
        }
        Ok(())
    }

    pub(super) fn advance_event_cursor(&mut self, c: &store::AdvanceEventCursor) -> Result<()> {
        Self::check_endpoint(&c.endpoint)?;
        self.move_cursor(&c.endpoint, (c.index, c.ordinal))
    }

    pub(super) fn dead_letter_event(&mut self, c: &store::DeadLetterEvent) -> Result<()> {
        Self::check_endpoint(&c.endpoint)?;
        let event = self.txn.get_msg::<EventRecord>(&keys::event(self.shard, c.index, c.ordinal))?;
        if let Some(event) = event {
            let mut counters = self.counters()?;
            counters.next_dead_letter += 1;
            self.txn.put_msg(keys::meta(self.shard, MetaTag::Counters), &counters);
            let mut reason = c.reason.clone();
            if reason.len() > MAX_REASON {
                let mut cut = MAX_REASON;
                while !reason.is_char_boundary(cut) {
                    cut -= 1;
                }
                reason.truncate(cut);
            }
            let rec = DeadLetterRecord {
                endpoint: c.endpoint.clone(),
                event: Some(event),
                dead_ms: self.now_ms,
                reason,
            };
            self.txn.put_msg(keys::dead_letter(self.shard, counters.next_dead_letter), &rec);
        }
        self.move_cursor(&c.endpoint, (c.index, c.ordinal))
    }

    pub(super) fn remove_dead_letter(&mut self, c: &store::RemoveDeadLetter) -> Result<()> {
        Self::check_endpoint(&c.endpoint)?;
        let key = keys::dead_letter(self.shard, c.number);
        if self.txn.get_msg::<DeadLetterRecord>(&key)?.is_some_and(|d| d.endpoint == c.endpoint) {
            self.txn.delete(key);
        }
        Ok(())
    }

    pub(super) fn trim_events(&mut self, c: &store::TrimEvents) -> Result<()> {
        let oldest = self.now_ms.saturating_sub(self.limits.event_retention_ms);
        let prefix = keys::events_all(self.shard);
        for (k, v) in self.txn.scan_from(&prefix, &prefix, TRIM_PER_OP)? {
            let e: EventRecord = db::decode(&v)?;
            if keys::event_position(&k).is_none_or(|p| p > (c.index, c.ordinal)) || e.created_ms > oldest {
                break;
            }
            self.txn.delete(k);
        }
        let prefix = keys::dead_letters_all(self.shard);
        for (k, v) in self.txn.scan_from(&prefix, &prefix, TRIM_PER_OP)? {
            let d: DeadLetterRecord = db::decode(&v)?;
            if d.dead_ms > oldest {
                break;
            }
            self.txn.delete(k);
        }
        Ok(())
    }
}

/// Events read from a replica.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EventPage {
    /// In position order.
    pub events: Vec<EventRecord>,
    /// More events follow the last one.
    pub has_more: bool,
}

impl Reader {
    /// Events after position `after` (`None`: from the first), at most
    /// `limit`, and after the first only while their bodies total at most
    /// `max_bytes`.
    pub fn events_after(
        &self,
        after: Option<(u64, u32)>,
        limit: usize,
        max_bytes: usize,
    ) -> Result<EventPage> {
        let prefix = keys::events_all(self.shard);
        let start = match after {
            None => prefix.clone(),
            Some((i, o)) => match o.checked_add(1) {
                Some(o) => keys::event(self.shard, i, o),
                None => match i.checked_add(1) {
                    Some(i) => keys::event(self.shard, i, 0),
                    None => return Ok(EventPage::default()),
                },
            },
        };
        let (rows, mut has_more) = self.range(&prefix, start, limit.max(1))?;
        let mut events = Vec::with_capacity(rows.len());
        let mut bytes = 0usize;
        for (_, v) in &rows {
            let e: EventRecord = db::decode(v)?;
            bytes = bytes.saturating_add(e.body.len());
            if !events.is_empty() && bytes > max_bytes {
                has_more = true;
                break;
            }
            events.push(e);
        }
        Ok(EventPage { events, has_more })
    }

    /// The delivery cursor of `endpoint`, as `(index, ordinal)`.
    pub fn event_cursor(&self, endpoint: &str) -> Result<Option<(u64, u32)>> {
        Ok(self.get::<EventCursor>(&keys::event_cursor(self.shard, endpoint))?.map(|c| position(&c)))
    }

    /// Dead letters after number `after`, at most `limit`, with their numbers.
    pub fn dead_letters(&self, after: u64, limit: usize) -> Result<Vec<(u64, DeadLetterRecord)>> {
        let prefix = keys::dead_letters_all(self.shard);
        let Some(first) = after.checked_add(1) else { return Ok(Vec::new()) };
        let (rows, _) = self.range(&prefix, keys::dead_letter(self.shard, first), limit)?;
        rows.iter().map(|(k, v)| Ok((keys::last_u64(k).unwrap_or(0), db::decode(v)?))).collect()
    }

    /// Dead letters of `endpoint` after number `after`: at most `limit` of
    /// them, looking at no more than `max_scan` letters (of any endpoint).
    pub fn dead_letters_of(
        &self,
        endpoint: &str,
        after: u64,
        limit: usize,
        max_scan: usize,
    ) -> Result<store::DeadLetterList> {
        let mut out = store::DeadLetterList { scanned_to: after, ..Default::default() };
        let (mut scanned, mut at) = (0usize, after);
        while out.letters.len() < limit && scanned < max_scan {
            let page = self.dead_letters(at, (max_scan - scanned).min(256))?;
            let Some((last, _)) = page.last() else { return Ok(out) };
            at = *last;
            scanned += page.len();
            for (number, record) in page {
                if out.letters.len() == limit {
                    out.has_more = true;
                    return Ok(out);
                }
                out.scanned_to = number;
                if record.endpoint == endpoint {
                    out.letters.push(store::DeadLetter { number, record: Some(record) });
                }
            }
        }
        out.has_more = !self.dead_letters(out.scanned_to, 1)?.is_empty();
        Ok(out)
    }

    /// The oldest event's time, if any (trimming decides from it).
    pub fn oldest_event_ms(&self) -> Result<Option<i64>> {
        Ok(self.events_after(None, 1, usize::MAX)?.events.first().map(|e| e.created_ms))
    }

    /// The oldest dead letter's time, if any.
    pub fn oldest_dead_letter_ms(&self) -> Result<Option<i64>> {
        Ok(self.dead_letters(0, 1)?.first().map(|(_, d)| d.dead_ms))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339_utc() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(951_782_400_123), "2000-02-29T00:00:00.123Z");
        assert_eq!(rfc3339(1_796_601_599_999), "2026-12-06T23:59:59.999Z");
    }

    #[test]
    fn ids_name_the_position() {
        assert_eq!(event_id(ShardId(3), 42, 1), "evt_3_42_1");
    }
}
