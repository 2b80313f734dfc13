//! User-keyed operations: accounts, devices, friends, 1:1 sends, relayed
//! deliveries and ack cursors.

use prost::Message as _;
use rim_proto::ids::{DeviceId, GroupId, MessageId, UserId};
use rim_proto::store::{self, DeliverResult, DeviceRecord, SendResult, UserRecord};
use rim_proto::v1::{ConversationKind, Message};

use super::{Applier, check_id};
use crate::error::{Result, reject};
use crate::keys;

impl Applier<'_> {
    pub(super) fn create_user(&mut self, c: &store::CreateUser) -> Result<UserRecord> {
        check_id("user_id", c.user_id)?;
        let m = self.limits.max_name_bytes;
        self.check_len("username", c.username.len(), m)?;
        self.check_len("nickname", c.nickname.len(), m)?;
        self.check_len("phone", c.phone.len(), m)?;
        self.check_len("avatar_url", c.avatar_url.len(), m)?;
        self.check_len("extra", c.extra.len(), self.limits.max_extra_bytes)?;
        let key = keys::user(self.shard, UserId(c.user_id));
        if self.txn.exists(&key)? {
            reject!(ErrorAlreadyExists, "user {} already exists", c.user_id);
        }
        let rec = UserRecord {
            user_id: c.user_id,
            username: c.username.clone(),
            password_hash: c.password_hash.clone(),
            phone: c.phone.clone(),
            nickname: c.nickname.clone(),
            avatar_url: c.avatar_url.clone(),
            extra: c.extra.clone(),
            created_ms: self.now_ms,
            updated_ms: self.now_ms,
        };
        self.txn.put_msg(key, &rec);
        Ok(rec)
    }

    pub(super) fn update_user(&mut self, c: &store::UpdateUser) -> Result<UserRecord> {
        let key = keys::user(self.shard, UserId(c.user_id));
        let Some(mut rec) = self.txn.get_msg::<UserRecord>(&key)? else {
            reject!(ErrorUserNotFound, "user {} not found", c.user_id);
        };
        let m = self.limits.max_name_bytes;
        if let Some(v) = &c.nickname {
            self.check_len("nickname", v.len(), m)?;
            rec.nickname = v.clone();
        }
        if let Some(v) = &c.avatar_url {
            self.check_len("avatar_url", v.len(), m)?;
            rec.avatar_url = v.clone();
        }
        if let Some(v) = &c.extra {
            self.check_len("extra", v.len(), self.limits.max_extra_bytes)?;
            rec.extra = v.clone();
        }
        if let Some(v) = &c.password_hash {
            rec.password_hash = v.clone();
        }
        rec.updated_ms = self.now_ms;
        self.txn.put_msg(key, &rec);
        Ok(rec)
    }

    pub(super) fn claim_account(&mut self, c: &store::ClaimAccount) -> Result<()> {
        check_id("user_id", c.user_id)?;
        if c.name.is_empty() {
            reject!(ErrorBadRequest, "account name must not be empty");
        }
        self.check_len("account name", c.name.len(), self.limits.max_name_bytes)?;
        let key = keys::account(self.shard, &c.name);
        let claim = store::AccountRecord { user_id: c.user_id, claimed_ms: self.now_ms };
        match self.txn.get_msg::<store::AccountRecord>(&key)? {
            Some(a) if a.user_id == c.user_id => Ok(()),
            // An orphaned claim, old enough that no registration can still
            // be creating its user: taken over.
            Some(a)
                if c.replaces_user_id != 0
                    && a.user_id == c.replaces_user_id
                    && self.now_ms.saturating_sub(a.claimed_ms) >= self.limits.orphan_claim_ms =>
            {
                self.txn.put_msg(key, &claim);
                Ok(())
            }
            Some(_) => reject!(ErrorAlreadyExists, "account name {:?} is taken", c.name),
            None => {
                self.txn.put_msg(key, &claim);
                Ok(())
            }
        }
    }

    pub(super) fn register_device(&mut self, c: &store::RegisterDevice) -> Result<DeviceRecord> {
        check_id("device_id", c.device_id)?;
        let user = UserId(c.user_id);
        if !self.is_local_user(user)? {
            reject!(ErrorUserNotFound, "user {} not found", c.user_id);
        }
        let m = self.limits.max_name_bytes;
        for (what, v) in [
            ("brand", &c.brand),
            ("model", &c.model),
            ("system_version", &c.system_version),
            ("sdk_version", &c.sdk_version),
        ] {
            self.check_len(what, v.len(), m)?;
        }
        // An app's device id names one device of the user for good: the
        // first registration maps it, later ones (retries, concurrent
        // sign-ins of the same device) register that device again.
        let mut device = DeviceId(c.device_id);
        if !c.external_id.is_empty() {
            self.check_len("external_id", c.external_id.len(), m)?;
            let index = keys::external_device(self.shard, user, &c.external_id);
            match self.txn.get(&index)?.and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok()) {
                Some(id) => device = DeviceId(u64::from_be_bytes(id)),
                None => self.txn.put(index, device.0.to_be_bytes().to_vec()),
            }
        }
        let key = keys::device(self.shard, user, device);
        // Re-registering keeps the token version and the ack cursor.
        let old = self.txn.get_msg::<DeviceRecord>(&key)?.unwrap_or_default();
        let rec = DeviceRecord {
            device_id: device.0,
            external_id: if c.external_id.is_empty() {
                old.external_id.clone()
            } else {
                c.external_id.clone()
            },
            revoked_ms: old.revoked_ms,
            user_id: c.user_id,
            device_type: c.device_type,
            brand: c.brand.clone(),
            model: c.model.clone(),
            system_version: c.system_version.clone(),
            sdk_version: c.sdk_version.clone(),
            token_version: old.token_version,
            ack_seq: old.ack_seq,
            created_ms: if old.created_ms == 0 { self.now_ms } else { old.created_ms },
            updated_ms: self.now_ms,
            // Sessions and push checks (`im::presence`) go on.
            ..old
        };
        self.txn.put_msg(key, &rec);
        Ok(rec)
    }

    pub(super) fn revoke_device(&mut self, c: &store::RevokeDevice) -> Result<DeviceRecord> {
        let key = keys::device(self.shard, UserId(c.user_id), DeviceId(c.device_id));
        let Some(mut rec) = self.txn.get_msg::<DeviceRecord>(&key)? else {
            reject!(ErrorDeviceNotFound, "device {} of user {} not found", c.device_id, c.user_id);
        };
        rec.token_version += 1;
        rec.updated_ms = self.now_ms;
        rec.revoked_ms = self.now_ms;
        rec.signed_out = true;
        self.txn.put_msg(key, &rec);
        self.op_effects.revoked.push((UserId(c.user_id), DeviceId(c.device_id)));
        Ok(rec)
    }

    /// Sets the actor's side of a friendship directly (no notification) and
    /// returns it. `status` UNSPECIFIED keeps the status, and then needs an
    /// existing record.
    pub(super) fn set_friend(&mut self, c: &store::SetFriend) -> Result<store::FriendRecord> {
        check_id("friend_id", c.friend_id)?;
        if c.user_id == c.friend_id {
            reject!(ErrorBadRequest, "a user cannot befriend themselves");
        }
        if !self.is_local_user(UserId(c.user_id))? {
            reject!(ErrorUserNotFound, "user {} not found", c.user_id);
        }
        let status = match store::FriendStatus::try_from(c.status) {
            Ok(s) => s,
            Err(_) => reject!(ErrorBadRequest, "unknown friend status {}", c.status),
        };
        let key = keys::friend(self.shard, UserId(c.user_id), UserId(c.friend_id));
        let existing = self.txn.get_msg::<store::FriendRecord>(&key)?;
        let mut rec = match existing {
            Some(rec) => rec,
            None if status == store::FriendStatus::Unspecified => {
                reject!(ErrorNotFriend, "user {} has no friend {}", c.user_id, c.friend_id)
            }
            None => {
                store::FriendRecord { friend_id: c.friend_id, created_ms: self.now_ms, ..Default::default() }
            }
        };
        if status != store::FriendStatus::Unspecified {
            rec.set_status(status);
        }
        if let Some(r) = &c.remarks {
            self.check_len("remarks", r.len(), self.limits.max_name_bytes)?;
            rec.remarks = r.clone();
        }
        if let Some(e) = &c.extra {
            self.check_len("extra", e.len(), self.limits.max_extra_bytes)?;
            rec.extra = e.clone();
        }
        rec.updated_ms = self.now_ms;
        self.txn.put_msg(key, &rec);
        Ok(rec)
    }

    pub(super) fn delete_friend(&mut self, c: &store::DeleteFriend) -> Result<()> {
        let key = keys::friend(self.shard, UserId(c.user_id), UserId(c.friend_id));
        if !self.txn.exists(&key)? {
            reject!(ErrorNotFriend, "user {} has no friend {}", c.user_id, c.friend_id);
        }
        self.txn.delete(key);
        Ok(())
    }

    /// A 1:1 send: one entry in the sender's list and, in the same batch, the
    /// recipient's copy (local recipient) or an outbox record (remote one).
    pub(super) fn send_to_user(&mut self, c: &store::SendToUser) -> Result<SendResult> {
        let sender = UserId(c.sender_user_id);
        check_id("recipient_user_id", c.recipient_user_id)?;
        if !self.is_local_user(sender)? {
            reject!(ErrorUserNotFound, "sender {} not found", c.sender_user_id);
        }
        let idem_key = keys::idempotency(self.shard, sender, 0, &c.client_msg_id);
        if let Some(done) = self.txn.get_msg::<SendResult>(&idem_key)? {
            return Ok(done);
        }

        let msg = Message {
            sender_user_id: c.sender_user_id,
            sender_device_id: c.sender_device_id,
            conversation_id: c.recipient_user_id,
            client_msg_id: c.client_msg_id.clone(),
            content_type: c.content_type,
            content: c.content.clone(),
            refers_to: c.refers_to,
            ..Default::default()
        };
        self.send_direct(msg, idem_key)
    }

    /// Appends a 1:1 entry (`msg` without id, kind and time) from
    /// `msg.sender_user_id` to `msg.conversation_id`: to the sender's list and
    /// to the recipient's (local) or the outbox (remote). Records the result
    /// under `idem_key`. The caller checked the sender and the content.
    pub(super) fn send_direct(&mut self, mut msg: Message, idem_key: Vec<u8>) -> Result<SendResult> {
        let message_id = self.next_message_id()?;
        msg.message_id = message_id.0;
        msg.conversation_kind = ConversationKind::User as i32;
        msg.send_time_ms = self.now_ms;
        let sender = UserId(msg.sender_user_id);
        let recipient = UserId(msg.conversation_id);
        let seq = self.append_to_user(sender, msg.clone())?;
        let recipient_local = recipient == sender || self.is_local_user(recipient)?;
        if Self::emits_direct_send(sender, recipient, recipient_local) {
            self.message_event(&msg)?;
        }
        if recipient != sender {
            if recipient_local {
                // The same mark a relayed delivery leaves: it lets MarkRead
                // find the message a read receipt names.
                let mark_key = keys::delivered(self.shard, recipient, message_id);
                let at = self.append_to_user(recipient, msg)?;
                self.txn.put_msg(mark_key, &store::DeliveredMark { seq: at.0 });
            } else {
                self.push_outbox(msg, vec![recipient.0])?;
            }
        }
        let result = SendResult {
            seq: seq.0,
            message_id: message_id.0,
            send_time_ms: self.now_ms,
            ..Default::default()
        };
        self.txn.put_msg(idem_key, &result);
        Ok(result)
    }

    /// Appends relayed messages, each at most once per recipient.
    pub(super) fn deliver(&mut self, c: &store::Deliver) -> Result<DeliverResult> {
        let mut out = DeliverResult::default();
        for item in &c.items {
            let Some(msg) = &item.message else { reject!(ErrorBadRequest, "delivery without a message") };
            check_id("message_id", msg.message_id)?;
            for &r in &item.recipients {
                let user = UserId(r);
                if !self.is_local_user(user)? {
                    out.missing_users.push(r);
                    out.seqs.push(0);
                    continue;
                }
                let mark_key = keys::delivered(self.shard, user, MessageId(msg.message_id));
                if !self.sabotage.no_relay_dedup
                    && let Some(mark) = self.txn.get_msg::<store::DeliveredMark>(&mark_key)?
                {
                    out.seqs.push(mark.seq);
                    continue;
                }
                let seq = self.append_to_user(user, msg.clone())?;
                self.txn.put_msg(mark_key, &store::DeliveredMark { seq: seq.0 });
                self.delivered_event(user, msg)?;
                out.seqs.push(seq.0);
            }
        }
        Ok(out)
    }

    /// Moves a device's ack cursor forward (never back, never past the head).
    pub(super) fn ack_seq(&mut self, c: &store::AckSeq) -> Result<u64> {
        let user = UserId(c.user_id);
        let key = keys::device(self.shard, user, DeviceId(c.device_id));
        let Some(mut dev) = self.txn.get_msg::<DeviceRecord>(&key)? else {
            reject!(ErrorDeviceNotFound, "device {} of user {} not found", c.device_id, c.user_id);
        };
        let head: store::ListHead = self.txn.get_msg(&keys::user_head(self.shard, user))?.unwrap_or_default();
        let target = c.seq.min(head.last_seq);
        if target > dev.ack_seq {
            dev.ack_seq = target;
            self.txn.put_msg(key, &dev);
        }
        Ok(dev.ack_seq)
    }

    /// Side effects of a notification landing in `user`'s list: the user's
    /// own records follow the change (its list of groups, its friends).
    pub(super) fn notification_effects(&mut self, user: UserId, msg: &Message) -> Result<()> {
        use store::notification::Event;
        if msg.content_type != rim_proto::v1::ContentType::Notification as i32 {
            return Ok(());
        }
        let Ok(n) = store::Notification::decode(msg.content.as_ref()) else {
            // Notifications are produced by apply itself; a bad one is stored
            // as is and has no effect.
            return Ok(());
        };
        match n.event {
            Some(Event::GroupMembersAdded(e)) if e.user_ids.contains(&user.0) => {
                let rec = store::UserGroupRecord {
                    group_id: e.group_id,
                    kind: e.kind,
                    joined_ms: msg.send_time_ms,
                    joined_group_seq: e.group_seq,
                };
                self.txn.put_msg(keys::user_group(self.shard, user, GroupId(e.group_id)), &rec);
            }
            Some(Event::GroupMembersRemoved(e)) if e.user_ids.contains(&user.0) => {
                self.txn.delete(keys::user_group(self.shard, user, GroupId(e.group_id)));
            }
            Some(Event::GroupDissolved(e)) => {
                self.txn.delete(keys::user_group(self.shard, user, GroupId(e.group_id)));
            }
            Some(Event::GroupConverted(e)) => {
                let key = keys::user_group(self.shard, user, GroupId(e.group_id));
                if let Some(mut rec) = self.txn.get_msg::<store::UserGroupRecord>(&key)? {
                    rec.kind = e.kind;
                    self.txn.put_msg(key, &rec);
                }
            }
            Some(Event::FriendChanged(e)) if e.friend_id == user.0 && e.user_id != user.0 => {
                self.friend_effects(user, msg, &e)?;
            }
            _ => {}
        }
        Ok(())
    }
}
