//! The conversation view (design section 5): computed at read time from the
//! user's own list and the lists of the user's super groups; nothing is
//! written per send.
//!
//! * **Own list**: the newest [`OWN_TAIL`] entries, grouped by conversation:
//!   1:1 by peer (the recipient when the caller sent it, else the sender),
//!   small groups by group id, system entries (friend changes, business
//!   pushes) into one SYSTEM line. Conversations whose last entry is older
//!   than that window are not listed.
//! * **Super groups**: one line per super group the caller belongs to, from
//!   the newest [`GROUP_SCAN`] entries of the group's list after the caller's
//!   join point. A small group that became a super group keeps one line: its
//!   small-era entries (in the own list, read positions by own-list seq) and
//!   its super-era entries (in the group list, by group seq) are merged, the
//!   group-list scan stopping at the conversion notice.
//! * Rooms are not listed (no membership).
//!
//! `last_message` is the newest entry that is not a read receipt.
//! `unread_count` counts entries after the caller's read position that the
//! caller did not send, other than receipts, recalls and recalled messages.
//! When a super group has more unread entries than the scan reaches, the
//! entries beyond it are counted as unread (an upper bound).

use std::collections::{BTreeMap, HashMap, HashSet};

use prost::Message as _;
use rim_proto::store::{self, notification::Event};
use rim_proto::v1::{
    ContentType, Conversation, ConversationKind, ListConversationsReply, ListConversationsRequest, Message,
};
use rim_raft_store::{GroupId, UserId};

use super::ops;
use crate::core::Core;
use crate::error::Result;
use crate::read::ShardView;

/// Entries of the caller's own list the view is computed from.
pub const OWN_TAIL: usize = 2_000;
/// Entries of each super group's list scanned for its line.
pub const GROUP_SCAN: usize = 500;
/// Lines returned when the request asks for 0.
pub const DEFAULT_LIMIT: u32 = 50;
/// Most lines one call returns.
pub const MAX_LIMIT: u32 = 200;

/// One line being computed.
#[derive(Debug, Default)]
struct Line {
    last: Option<Message>,
    unread: u64,
    mentions: u32,
    read_seq: u64,
}

impl Line {
    /// Folds `m` (visited newest first) into the line.
    fn visit(&mut self, user: u64, m: &Message, recalled: &HashSet<u64>) {
        let receipt = m.content_type == ContentType::ReadReceipt as i32;
        if self.last.is_none() && !receipt {
            self.last = Some(m.clone());
        }
        let counts = !receipt
            && m.content_type != ContentType::Recall as i32
            && m.sender_user_id != user
            && !recalled.contains(&m.message_id);
        if m.seq > self.read_seq && counts {
            self.unread += 1;
            if m.mentions.contains(&user) {
                self.mentions += 1;
            }
        }
    }

    fn time(&self) -> i64 {
        self.last.as_ref().map_or(0, |m| m.send_time_ms)
    }
}

/// Message ids recalled by RECALL entries among `entries`.
fn recalled(entries: &[Message]) -> HashSet<u64> {
    entries.iter().filter(|m| m.content_type == ContentType::Recall as i32).map(|m| m.refers_to).collect()
}

/// Whether `m` announces that a small group became a super group.
fn is_conversion(m: &Message) -> bool {
    m.content_type == ContentType::Notification as i32
        && matches!(
            store::Notification::decode(m.content.as_ref()).map(|n| n.event),
            Ok(Some(Event::GroupConverted(_)))
        )
}

type Key = (ConversationKind, u64);

/// Lines from the caller's own list (newest first).
fn own_lines(user: u64, tail: &[Message], reads: &HashMap<(i32, u64), u64>) -> BTreeMap<Key, Line> {
    let recalled = recalled(tail);
    let mut lines: BTreeMap<Key, Line> = BTreeMap::new();
    for m in tail {
        let key = match ConversationKind::try_from(m.conversation_kind) {
            Ok(ConversationKind::User) => {
                let peer = if m.sender_user_id == user { m.conversation_id } else { m.sender_user_id };
                (ConversationKind::User, peer)
            }
            Ok(ConversationKind::Group) => (ConversationKind::Group, m.conversation_id),
            Ok(ConversationKind::System) => (ConversationKind::System, 0),
            // Super-group and room entries are read from their group lists.
            _ => continue,
        };
        let line = lines.entry(key).or_insert_with(|| Line {
            read_seq: reads.get(&(key.0 as i32, key.1)).copied().unwrap_or(0),
            ..Line::default()
        });
        line.visit(user, m, &recalled);
    }
    lines
}

/// The line of one super group, from its shard's replica.
async fn super_line(r: &ShardView<'_>, user: u64, g: u64, read: u64) -> Result<Option<Line>> {
    let Some(member) = r.member(GroupId(g), UserId(user)).await? else { return Ok(None) };
    let head = r.group_head(GroupId(g)).await?;
    let tail = r.group_tail(GroupId(g), GROUP_SCAN).await?;
    let recalled = recalled(&tail);
    let joined = member.joined_group_seq;
    let mut line = Line { read_seq: read.max(joined), ..Line::default() };
    let mut reached_start = tail.len() < GROUP_SCAN;
    for m in &tail {
        if m.seq <= joined {
            reached_start = true;
            break;
        }
        line.visit(user, m, &recalled);
        if is_conversion(m) {
            // Older entries are the small era: counted from the own list.
            reached_start = true;
            break;
        }
    }
    if !reached_start && let Some(oldest) = tail.last() {
        let lower = line.read_seq.max(head.first_seq.max(1) - 1);
        line.unread += seqs_between(lower, oldest.seq);
    }
    line.read_seq = read;
    Ok(Some(line))
}

/// How many seqs lie strictly between `lower` and `upper`. A read position
/// is the client's number (a super group's is not clamped to the group's
/// head), so `lower` may be anything up to `u64::MAX`.
fn seqs_between(lower: u64, upper: u64) -> u64 {
    upper.saturating_sub(lower).saturating_sub(1)
}

/// The caller's conversations, newest first.
pub async fn list(core: &Core, u: UserId, req: ListConversationsRequest) -> Result<ListConversationsReply> {
    let limit = (if req.limit == 0 { DEFAULT_LIMIT } else { req.limit.min(MAX_LIMIT) }) as usize;
    let placement = core.placement()?;
    let g = core.view(placement.shard_of_user(u)).await?;
    let user = u.0;
    let tail = g.tail(u, OWN_TAIL).await?;
    let reads: HashMap<(i32, u64), u64> =
        g.read_positions(u).await?.into_iter().map(|(k, c, r)| ((k, c), r.read_seq)).collect();
    let supers: Vec<u64> = g
        .user_groups(u)
        .await?
        .into_iter()
        .filter(|r| r.kind() == store::GroupKind::Super)
        .map(|r| r.group_id)
        .collect();
    let last_seq = g.user_head(u).await?.last_seq.max(tail.first().map_or(0, |m| m.seq));
    let mut lines = own_lines(user, &tail, &reads);

    let replicas =
        ops::views_lenient(core, supers.iter().map(|g| placement.shard_of_group(GroupId(*g)))).await;
    for gid in supers {
        let shard = placement.shard_of_group(GroupId(gid));
        let read = reads.get(&(ConversationKind::SuperGroup as i32, gid)).copied().unwrap_or(0);
        let line = match replicas.get(&shard) {
            Some(Ok(r)) => super_line(r, user, gid, read).await,
            Some(Err(e)) => Err(crate::error::Error::Unavailable(e.to_string())),
            None => continue,
        };
        let mut line = match line {
            Ok(Some(l)) => l,
            Ok(None) => continue,
            Err(e) => {
                tracing::warn!(user, group = gid, error = %e, "conversation view skips a super group");
                continue;
            }
        };
        if let Some(small) = lines.remove(&(ConversationKind::Group, gid)) {
            line.unread += small.unread;
            line.mentions += small.mentions;
            if small.time() > line.time() || line.last.is_none() {
                line.last = small.last;
            }
        }
        lines.insert((ConversationKind::SuperGroup, gid), line);
    }

    let mut out: Vec<(Key, Line)> = lines
        .into_iter()
        .filter(|(_, l)| l.last.is_some() && (req.before_ms <= 0 || l.time() < req.before_ms))
        .collect();
    out.sort_by(|(ka, a), (kb, b)| b.time().cmp(&a.time()).then_with(|| ka.cmp(kb)));
    let has_more = out.len() > limit;
    out.truncate(limit);
    let conversations = out
        .into_iter()
        .map(|((kind, id), l)| Conversation {
            conversation_kind: kind as i32,
            conversation_id: id,
            last_message: l.last,
            unread_count: l.unread,
            read_seq: l.read_seq,
            unread_mentions: l.mentions,
        })
        .collect();
    Ok(ListConversationsReply { conversations, has_more, last_seq })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seqs_between_counts_the_gap_and_never_overflows() {
        assert_eq!(seqs_between(0, 1), 0);
        assert_eq!(seqs_between(0, 5), 4);
        assert_eq!(seqs_between(4, 5), 0);
        assert_eq!(seqs_between(5, 5), 0);
        assert_eq!(seqs_between(6, 5), 0, "a read position past the scan counts nothing");
        assert_eq!(seqs_between(u64::MAX, 5), 0, "a read position of 2^64-1 counts nothing");
        assert_eq!(seqs_between(u64::MAX - 1, u64::MAX), 0);
        assert_eq!(seqs_between(0, u64::MAX), u64::MAX - 1);
    }

    fn msg(seq: u64, kind: ConversationKind, conv: u64, sender: u64, ct: ContentType) -> Message {
        Message {
            message_id: 1000 + seq,
            seq,
            conversation_kind: kind as i32,
            conversation_id: conv,
            sender_user_id: sender,
            content_type: ct as i32,
            send_time_ms: seq as i64,
            ..Default::default()
        }
    }

    #[test]
    fn own_list_groups_by_peer_and_counts_unread_after_the_read_position() {
        use ConversationKind as K;
        let me = 1;
        let mut tail = vec![
            msg(1, K::User, me, 2, ContentType::Text), // from 2
            msg(2, K::User, 2, me, ContentType::Text), // to 2
            msg(3, K::User, me, 2, ContentType::Text), // from 2
            msg(4, K::Group, 9, 3, ContentType::Text),
            msg(5, K::User, me, 2, ContentType::Text), // from 2, recalled below
            msg(6, K::User, me, 2, ContentType::Recall),
            msg(7, K::User, me, 2, ContentType::ReadReceipt),
            msg(8, K::System, 0, 0, ContentType::Notification),
            msg(9, K::Room, 5, 3, ContentType::Text),
        ];
        tail[5].refers_to = 1005;
        tail[3].mentions = vec![me];
        tail.reverse();
        let reads = HashMap::from([((K::User as i32, 2), 1)]);
        let lines = own_lines(me, &tail, &reads);
        assert_eq!(lines.len(), 3, "{lines:?}");
        let peer = &lines[&(K::User, 2)];
        // seq 3 only: 1 is read, 2 is own, 5 recalled, 6 a recall, 7 a receipt.
        assert_eq!(peer.unread, 1);
        assert_eq!(peer.read_seq, 1);
        assert_eq!(peer.last.as_ref().unwrap().seq, 6, "receipts are never the last message");
        let group = &lines[&(K::Group, 9)];
        assert_eq!((group.unread, group.mentions), (1, 1));
        assert_eq!(lines[&(K::System, 0)].unread, 1);
    }
}
