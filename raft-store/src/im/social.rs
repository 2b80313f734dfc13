//! Friend actions, recalls, read positions and receipts, persisted business
//! pushes.
//!
//! # Friends
//!
//! A friendship is two [`FriendRecord`]s, one in each user's shard. An action
//! (`ChangeFriend`) runs in the actor's shard: it changes the actor's record
//! and appends a `FriendChanged` notification to both users' lists (the other
//! user's through the outbox when remote). The other side's record changes
//! when that notification lands in its list ([`Applier::friend_effects`]),
//! so the relay's exactly-once, in-order delivery is what keeps both sides in
//! step. Crossing requests (each asked the other before seeing the other's
//! request) end with both sides ACCEPTED.
//!
//! # Recalls
//!
//! A recall never changes the recalled entry (entries are immutable once in a
//! list): it is a new `CONTENT_TYPE_RECALL` entry whose `refers_to` is the
//! recalled message id, appended exactly like a send of the same conversation
//! and idempotent by `client_msg_id` like one.
//!
//! # Read positions
//!
//! One [`store::ReadRecord`] per (user, conversation), shared by the user's
//! devices, only moving forward. 1:1 reads may send the peer a
//! `CONTENT_TYPE_READ_RECEIPT` entry, at most once per read message (its
//! idempotency record sits in [`keys::RECEIPT_SCOPE`]).
//!
//! # Business pushes
//!
//! `PushToUsers` appends one SYSTEM entry to each recipient's list. With a
//! `client_msg_id` it is idempotent: the result sits under sender 0 in
//! [`keys::PUSH_SCOPE`], and a push log retires those records in push order
//! once `dedup_window` newer logged pushes followed (the same bound as sends).

use prost::Message as _;
use rim_proto::ids::{GroupId, MessageId, Seq, UserId};
use rim_proto::store::notification::Event;
use rim_proto::store::{
    self, FriendAction, FriendRecord, FriendStatus, GroupKind, ListHead, MemberRole, SendResult,
};
use rim_proto::v1::{ContentType, ConversationKind, Message};

use super::{Applier, check_id, next_seq};
use crate::error::{Result, reject};
use crate::keys::{self, MetaTag};

impl Applier<'_> {
    /// A friend action of `c.user_id` towards `c.friend_id`. Returns the
    /// actor's record after it (`None`: the relation is gone).
    pub(super) fn change_friend(&mut self, c: &store::ChangeFriend) -> Result<Option<FriendRecord>> {
        check_id("friend_id", c.friend_id)?;
        if c.user_id == c.friend_id {
            reject!(ErrorBadRequest, "a user cannot befriend themselves");
        }
        let action = match FriendAction::try_from(c.action) {
            Ok(a) if a != FriendAction::Unspecified => a,
            _ => reject!(ErrorBadRequest, "unknown friend action {}", c.action),
        };
        self.check_len("remarks", c.remarks.len(), self.limits.max_name_bytes)?;
        self.check_len("description", c.description.len(), 4 * self.limits.max_name_bytes)?;
        let actor = UserId(c.user_id);
        if !self.is_local_user(actor)? {
            reject!(ErrorUserNotFound, "user {} not found", c.user_id);
        }
        let key = keys::friend(self.shard, actor, UserId(c.friend_id));
        let old = self.txn.get_msg::<FriendRecord>(&key)?;
        let old_status = old.as_ref().map(FriendRecord::status);
        let fresh = || FriendRecord { friend_id: c.friend_id, created_ms: self.now_ms, ..Default::default() };
        // Each action is idempotent: an action whose outcome already holds
        // (a retry after an unknown outcome, or a repeat) writes nothing,
        // notifies nobody and answers with the current record.
        let settled = match action {
            FriendAction::Request => {
                matches!(old_status, Some(FriendStatus::Accepted))
                    || (old_status == Some(FriendStatus::RequestSent)
                        && (c.description.is_empty()
                            || old.as_ref().is_some_and(|r| r.description == c.description))
                        && (c.remarks.is_empty() || old.as_ref().is_some_and(|r| r.remarks == c.remarks)))
            }
            FriendAction::Accept => {
                old_status == Some(FriendStatus::Accepted)
                    && (c.remarks.is_empty() || old.as_ref().is_some_and(|r| r.remarks == c.remarks))
            }
            FriendAction::Reject => old.is_none(),
            FriendAction::Delete | FriendAction::Unspecified => old.is_none(),
        };
        if settled {
            return Ok(old);
        }
        let mut notified = action;
        let after = match action {
            FriendAction::Request => {
                let status = match old_status {
                    // The other side asked first: this request accepts it.
                    Some(FriendStatus::RequestReceived) => {
                        notified = FriendAction::Accept;
                        FriendStatus::Accepted
                    }
                    _ => FriendStatus::RequestSent,
                };
                let mut rec = old.unwrap_or_else(fresh);
                rec.set_status(status);
                if !c.description.is_empty() {
                    rec.description = c.description.clone();
                }
                Some(rec)
            }
            FriendAction::Accept => match old {
                Some(mut rec) if old_status == Some(FriendStatus::RequestReceived) => {
                    rec.set_status(FriendStatus::Accepted);
                    Some(rec)
                }
                _ => reject!(ErrorNotFriend, "user {} has no request from {}", c.user_id, c.friend_id),
            },
            FriendAction::Reject => {
                if old_status != Some(FriendStatus::RequestReceived) {
                    reject!(ErrorNotFriend, "user {} has no request from {}", c.user_id, c.friend_id);
                }
                None
            }
            FriendAction::Delete | FriendAction::Unspecified => None,
        };
        let after = after.map(|mut rec| {
            if !c.remarks.is_empty() {
                rec.remarks = c.remarks.clone();
            }
            rec.updated_ms = self.now_ms;
            rec
        });
        match &after {
            Some(rec) => self.txn.put_msg(key, rec),
            None => self.txn.delete(key),
        }

        let changed = store::FriendChanged {
            user_id: c.user_id,
            friend_id: c.friend_id,
            status: after.as_ref().map_or(FriendStatus::Unspecified, FriendRecord::status) as i32,
            action: notified as i32,
            description: c.description.clone(),
        };
        self.friend_event(&changed)?;
        let event = Event::FriendChanged(changed);
        let msg = Message {
            message_id: self.next_message_id()?.0,
            sender_user_id: c.user_id,
            conversation_kind: ConversationKind::System as i32,
            conversation_id: 0,
            send_time_ms: self.now_ms,
            content_type: ContentType::Notification as i32,
            content: store::Notification { event: Some(event) }.encode_to_vec().into(),
            ..Default::default()
        };
        self.append_to_user(actor, msg.clone())?;
        let friend = UserId(c.friend_id);
        if self.is_local_user(friend)? {
            self.append_to_user(friend, msg)?;
        } else {
            self.push_outbox(msg, vec![friend.0])?;
        }
        Ok(after)
    }

    /// The other side of a friend action: `user` (the action's `friend_id`)
    /// updates its record about the actor when the notification lands in its
    /// list. Times come from the notification.
    pub(super) fn friend_effects(
        &mut self,
        user: UserId,
        msg: &Message,
        e: &store::FriendChanged,
    ) -> Result<()> {
        let key = keys::friend(self.shard, user, UserId(e.user_id));
        let rec = self.txn.get_msg::<FriendRecord>(&key)?;
        let status = rec.as_ref().map(FriendRecord::status);
        match e.action() {
            FriendAction::Request => {
                let mut rec = rec.unwrap_or_else(|| FriendRecord {
                    friend_id: e.user_id,
                    created_ms: msg.send_time_ms,
                    ..Default::default()
                });
                if matches!(status, Some(FriendStatus::RequestSent | FriendStatus::Accepted)) {
                    // Crossing requests, or a request towards a friend.
                    rec.set_status(FriendStatus::Accepted);
                } else {
                    rec.set_status(FriendStatus::RequestReceived);
                    if !e.description.is_empty() {
                        rec.description = e.description.clone();
                    }
                }
                rec.updated_ms = msg.send_time_ms;
                self.txn.put_msg(key, &rec);
            }
            FriendAction::Accept => {
                if let Some(mut rec) = rec {
                    rec.set_status(FriendStatus::Accepted);
                    rec.updated_ms = msg.send_time_ms;
                    self.txn.put_msg(key, &rec);
                }
            }
            FriendAction::Reject => {
                if status == Some(FriendStatus::RequestSent) {
                    self.txn.delete(key);
                }
            }
            FriendAction::Delete => {
                if rec.is_some() {
                    self.txn.delete(key);
                }
            }
            FriendAction::Unspecified => {}
        }
        Ok(())
    }

    /// Recalls a message: 1:1 in the caller's shard, groups in the group's.
    pub(super) fn recall(&mut self, c: &store::Recall) -> Result<SendResult> {
        match ConversationKind::try_from(c.conversation_kind) {
            Ok(ConversationKind::User) => self.recall_direct(c),
            Ok(ConversationKind::Group | ConversationKind::SuperGroup | ConversationKind::Room) => {
                self.recall_in_group(c)
            }
            _ => reject!(ErrorBadRequest, "cannot recall in conversation kind {}", c.conversation_kind),
        }
    }

    fn recall_direct(&mut self, c: &store::Recall) -> Result<SendResult> {
        let caller = UserId(c.user_id);
        if !self.is_local_user(caller)? {
            reject!(ErrorUserNotFound, "user {} not found", c.user_id);
        }
        let idem_key = keys::idempotency(self.shard, caller, 0, &c.client_msg_id);
        if let Some(done) = self.txn.get_msg::<SendResult>(&idem_key)? {
            return Ok(done);
        }
        let original = self.txn.get_msg::<Message>(&keys::user_msg(self.shard, caller, Seq(c.seq)))?;
        let Some(original) = original.filter(|m| c.message_id != 0 && m.message_id == c.message_id) else {
            reject!(
                ErrorMessageNotFound,
                "message {} is not at seq {} of user {}",
                c.message_id,
                c.seq,
                c.user_id
            );
        };
        check_recallable(&original)?;
        if original.conversation_kind != ConversationKind::User as i32 || original.sender_user_id != c.user_id
        {
            reject!(ErrorPermissionDenied, "user {} may only recall its own 1:1 messages", c.user_id);
        }
        if c.conversation_id != 0 && c.conversation_id != original.conversation_id {
            reject!(
                ErrorMessageNotFound,
                "message {} is not in conversation {}",
                c.message_id,
                c.conversation_id
            );
        }
        self.check_recall_window(&original)?;
        let msg = Message {
            sender_user_id: c.user_id,
            sender_device_id: c.device_id,
            conversation_id: original.conversation_id,
            client_msg_id: c.client_msg_id.clone(),
            content_type: ContentType::Recall as i32,
            refers_to: c.message_id,
            ..Default::default()
        };
        self.send_direct(msg, idem_key)
    }

    /// Group recall: the sender (still a member; any room user) within the
    /// window, or an owner or admin (or the business API, user 0) any time.
    fn recall_in_group(&mut self, c: &store::Recall) -> Result<SendResult> {
        let g = c.conversation_id;
        let idem_key = keys::idempotency(self.shard, UserId(c.user_id), g, &c.client_msg_id);
        if let Some(done) = self.txn.get_msg::<SendResult>(&idem_key)? {
            return Ok(done);
        }
        let group = self.load_group(g)?;
        let original = self.txn.get_msg::<Message>(&keys::group_msg(self.shard, GroupId(g), Seq(c.seq)))?;
        let Some(original) = original.filter(|m| c.message_id != 0 && m.message_id == c.message_id) else {
            reject!(ErrorMessageNotFound, "message {} is not at seq {} of group {g}", c.message_id, c.seq);
        };
        check_recallable(&original)?;
        let role = match c.user_id {
            0 => Some(MemberRole::Owner),
            u => self.member(g, u)?.map(|m| m.role()),
        };
        if role.is_none_or(|r| r < MemberRole::Admin) {
            let member = role.is_some() || group.kind() == GroupKind::Room;
            if !member || original.sender_user_id != c.user_id {
                reject!(
                    ErrorPermissionDenied,
                    "user {} may not recall message {} in group {g}",
                    c.user_id,
                    c.message_id
                );
            }
            self.check_recall_window(&original)?;
        }
        let msg = Message {
            sender_user_id: c.user_id,
            sender_device_id: c.device_id,
            client_msg_id: c.client_msg_id.clone(),
            content_type: ContentType::Recall as i32,
            refers_to: c.message_id,
            ..Default::default()
        };
        self.group_send(&group, msg, idem_key)
    }

    fn check_recall_window(&self, original: &Message) -> Result<()> {
        let window = self.limits.recall_window_ms;
        if window > 0 && self.now_ms.saturating_sub(original.send_time_ms) > window {
            reject!(ErrorRecallWindowPassed, "message {} is older than {window} ms", original.message_id);
        }
        Ok(())
    }

    /// Moves a user's read position in a conversation forward; for 1:1 with a
    /// `receipt_message_id`, sends the peer a read receipt (once per message).
    /// Returns the stored position.
    pub(super) fn mark_read(&mut self, c: &store::MarkRead) -> Result<u64> {
        use ConversationKind as K;
        let kind = match K::try_from(c.conversation_kind) {
            Ok(k) if k != K::Unspecified => k,
            _ => reject!(ErrorBadRequest, "unknown conversation kind {}", c.conversation_kind),
        };
        if c.conversation_id == 0 && kind != K::System {
            reject!(ErrorBadRequest, "conversation_id must not be 0");
        }
        let user = UserId(c.user_id);
        if !self.is_local_user(user)? {
            reject!(ErrorUserNotFound, "user {} not found", c.user_id);
        }
        let mut target = c.read_seq;
        if matches!(kind, K::User | K::Group | K::System) {
            // Positions in the user's own list: never past its head.
            let head: ListHead = self.txn.get_msg(&keys::user_head(self.shard, user))?.unwrap_or_default();
            target = target.min(head.last_seq);
        }
        let key = keys::read(self.shard, user, kind as u8, c.conversation_id);
        let mut rec = self.txn.get_msg::<store::ReadRecord>(&key)?.unwrap_or_default();
        if target > rec.read_seq {
            rec.read_seq = target;
            rec.updated_ms = self.now_ms;
            self.txn.put_msg(key, &rec);
        }
        if kind == K::User && c.receipt_message_id != 0 {
            // A receipt names a message the peer sent this user (found by
            // its delivery mark, within the dedup window): never an
            // arbitrary id.
            let mark = keys::delivered(self.shard, user, MessageId(c.receipt_message_id));
            let received = match self.txn.get_msg::<store::DeliveredMark>(&mark)? {
                Some(m) => self.txn.get_msg::<Message>(&keys::user_msg(self.shard, user, Seq(m.seq)))?,
                None => None,
            };
            if received.is_none_or(|m| m.sender_user_id != c.conversation_id) {
                reject!(
                    ErrorMessageNotFound,
                    "no message {} from user {} to acknowledge",
                    c.receipt_message_id,
                    c.conversation_id
                );
            }
            let cmid = keys::receipt_client_msg_id(MessageId(c.receipt_message_id));
            let idem_key = keys::idempotency(self.shard, user, keys::RECEIPT_SCOPE, &cmid);
            if !self.txn.exists(&idem_key)? {
                let msg = Message {
                    sender_user_id: c.user_id,
                    sender_device_id: c.device_id,
                    conversation_id: c.conversation_id,
                    client_msg_id: cmid,
                    content_type: ContentType::ReadReceipt as i32,
                    refers_to: c.receipt_message_id,
                    ..Default::default()
                };
                self.send_direct(msg, idem_key)?;
            }
        }
        Ok(rec.read_seq)
    }

    /// A persisted business push: one SYSTEM entry in each recipient's list.
    pub(super) fn push_to_users(&mut self, c: &store::PushToUsers) -> Result<SendResult> {
        if c.user_ids.is_empty() {
            reject!(ErrorBadRequest, "a push needs at least one recipient");
        }
        self.check_user_ids(&c.user_ids)?;
        let idem_key = if c.client_msg_id.is_empty() {
            None
        } else {
            Some(keys::idempotency(self.shard, UserId(0), keys::PUSH_SCOPE, &c.client_msg_id))
        };
        if let Some(k) = &idem_key
            && let Some(done) = self.txn.get_msg::<SendResult>(k)?
        {
            check_same_request(&done, &c.request_digest)?;
            return Ok(done);
        }
        let message_id = self.next_message_id()?.0;
        let msg = Message {
            message_id,
            sender_user_id: c.sender_user_id,
            conversation_kind: ConversationKind::System as i32,
            conversation_id: 0,
            client_msg_id: c.client_msg_id.clone(),
            send_time_ms: self.now_ms,
            content_type: c.content_type,
            content: c.content.clone(),
            ..Default::default()
        };
        let mut ids = c.user_ids.clone();
        ids.sort_unstable();
        ids.dedup();
        let mut remote = Vec::new();
        for u in ids {
            if self.is_local_user(UserId(u))? {
                self.append_to_user(UserId(u), msg.clone())?;
            } else {
                remote.push(u);
            }
        }
        self.push_outbox(msg, remote)?;
        let result = SendResult {
            seq: 0,
            message_id,
            send_time_ms: self.now_ms,
            group_seq: 0,
            request_digest: c.request_digest.clone(),
        };
        if let Some(k) = idem_key {
            self.txn.put_msg(k, &result);
            self.log_push(message_id, &c.client_msg_id)?;
        }
        Ok(result)
    }

    /// Logs an idempotent push and retires the one `dedup_window` pushes back
    /// (its idempotency record leaves with it, as for list entries).
    fn log_push(&mut self, message_id: u64, client_msg_id: &str) -> Result<()> {
        let head_key = keys::meta(self.shard, MetaTag::PushHead);
        let mut head: ListHead = self.txn.get_msg(&head_key)?.unwrap_or_default();
        head.last_seq = next_seq(&head, &"of idempotent pushes")?.0;
        let stub = Message { message_id, client_msg_id: client_msg_id.to_owned(), ..Default::default() };
        self.txn.put_msg(keys::push_log(self.shard, head.last_seq), &stub);
        self.txn.put_msg(head_key, &head);
        let window = self.limits.dedup_window;
        let Some(old) = head.last_seq.checked_sub(window).filter(|o| window > 0 && *o > 0) else {
            return Ok(());
        };
        let old_key = keys::push_log(self.shard, old);
        if let Some(stub) = self.txn.get_msg::<Message>(&old_key)? {
            let idem = keys::idempotency(self.shard, UserId(0), keys::PUSH_SCOPE, &stub.client_msg_id);
            if self.txn.get_msg::<SendResult>(&idem)?.is_some_and(|r| r.message_id == stub.message_id) {
                self.txn.delete(idem);
            }
            self.txn.delete(old_key);
        }
        Ok(())
    }
}

/// Recalls, receipts and notifications cannot be recalled.
fn check_recallable(original: &Message) -> Result<()> {
    let t = original.content_type;
    if t == ContentType::Recall as i32
        || t == ContentType::ReadReceipt as i32
        || t == ContentType::Notification as i32
    {
        reject!(ErrorBadRequest, "message {} cannot be recalled (content type {t})", original.message_id);
    }
    Ok(())
}

/// Refuses a business push reusing an idempotency key for another request:
/// both digests known and different (a record without one, or a push
/// without one, is a plain retry).
pub(super) fn check_same_request(done: &SendResult, digest: &[u8]) -> Result<()> {
    if !digest.is_empty() && !done.request_digest.is_empty() && done.request_digest != digest {
        reject!(ErrorAlreadyExists, "the idempotency key was used for another request");
    }
    Ok(())
}
