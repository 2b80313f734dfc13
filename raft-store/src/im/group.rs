//! Group-keyed operations: groups, super groups and rooms, their members and
//! their lists.
//!
//! Every group has a list `(group, group_seq) → message` in its shard, for
//! all three kinds: it is the group's canonical order, what super-group and
//! room members sync from, and what lets a small group turn into a super group
//! without losing history. A small group additionally copies each message
//! into every member's own list (write diffusion): local members directly,
//! remote members through one outbox record.

use prost::Message as _;
use rim_proto::ids::{GroupId, Seq, UserId};
use rim_proto::store::notification::Event;
use rim_proto::store::{
    self, GroupKind, GroupRecord, ListHead, MemberRecord, MemberRole, MembersChanged, SendResult,
};
use rim_proto::v1::{ContentType, ConversationKind, Message};

use super::{Applier, check_id, next_seq};
use crate::error::{Result, reject};
use crate::keys;

impl Applier<'_> {
    pub(super) fn load_group(&self, g: u64) -> Result<GroupRecord> {
        match self.txn.get_msg::<GroupRecord>(&keys::group(self.shard, GroupId(g)))? {
            Some(rec) if !rec.dissolved => Ok(rec),
            _ => reject!(ErrorGroupNotFound, "group {g} not found"),
        }
    }

    pub(super) fn member(&self, g: u64, u: u64) -> Result<Option<MemberRecord>> {
        self.txn.get_msg(&keys::member(self.shard, GroupId(g), UserId(u)))
    }

    pub(super) fn member_ids(&self, g: u64) -> Result<Vec<u64>> {
        let rows = self.txn.scan_prefix(&keys::members_of(self.shard, GroupId(g)))?;
        Ok(rows.iter().filter_map(|(k, _)| keys::last_u64(k)).collect())
    }

    /// The role `by` acts with; 0 is the business API, which may do anything.
    fn role_of(&self, g: u64, by: u64) -> Result<MemberRole> {
        if by == 0 {
            return Ok(MemberRole::Owner);
        }
        match self.member(g, by)? {
            Some(m) => Ok(m.role()),
            None => reject!(ErrorNotGroupMember, "user {by} is not a member of group {g}"),
        }
    }

    fn require_manager(&self, g: u64, by: u64) -> Result<MemberRole> {
        let role = self.role_of(g, by)?;
        if role < MemberRole::Admin {
            reject!(ErrorPermissionDenied, "only the owner or an admin may manage group {g}");
        }
        Ok(role)
    }

    pub(super) fn conversation_kind(kind: GroupKind) -> ConversationKind {
        match kind {
            GroupKind::Super => ConversationKind::SuperGroup,
            GroupKind::Room => ConversationKind::Room,
            _ => ConversationKind::Group,
        }
    }

    /// Appends `msg` to the group list and diffuses it: to every member for a
    /// small group, plus to `also` (users affected by a membership change).
    pub(super) fn post(&mut self, group: &GroupRecord, mut msg: Message, also: &[u64]) -> Result<Seq> {
        let gid = GroupId(group.group_id);
        let head_key = keys::group_head(self.shard, gid);
        let mut head: ListHead = self.txn.get_msg(&head_key)?.unwrap_or_default();
        let seq = next_seq(&head, &format_args!("of group {gid}"))?;
        head.last_seq = seq.0;
        head.first_seq = head.first_seq.max(1);
        msg.group_seq = seq.0;
        msg.seq = seq.0;
        if let Some(old) =
            seq.0.checked_sub(self.limits.dedup_window).filter(|o| self.limits.dedup_window > 0 && *o > 0)
            && let Some(m) = self.txn.get_msg::<Message>(&keys::group_msg(self.shard, gid, Seq(old)))?
        {
            self.forget_group_send(gid, &m)?;
        }
        self.txn.put_msg(keys::group_msg(self.shard, gid, seq), &msg);
        self.op_effects
            .appended
            .push(super::Appended { list: super::ListRef::Group(gid), message: msg.clone() });
        self.trim(gid, group.retention.as_ref(), &mut head)?;
        self.txn.put_msg(head_key, &head);

        let mut recipients =
            if group.kind() == GroupKind::Small { self.member_ids(group.group_id)? } else { vec![] };
        recipients.extend_from_slice(also);
        recipients.sort_unstable();
        recipients.dedup();
        let mut remote = Vec::new();
        for r in recipients {
            if self.is_local_user(UserId(r))? {
                self.append_to_user(UserId(r), msg.clone())?;
            } else {
                remote.push(r);
            }
        }
        self.push_outbox(msg, remote)?;
        Ok(seq)
    }

    /// Drops the oldest entries beyond the retention (count and age), at most
    /// `max_trim_per_op` per call so apply stays bounded.
    fn trim(&mut self, g: GroupId, retention: Option<&store::Retention>, head: &mut ListHead) -> Result<()> {
        let Some(r) = retention else { return Ok(()) };
        for _ in 0..self.limits.max_trim_per_op {
            // 1 <= first_seq <= last_seq: the list holds at least the entry
            // just appended, and trimming never removes the newest one.
            let count = head.last_seq - head.first_seq + 1;
            let oldest_key = keys::group_msg(self.shard, g, Seq(head.first_seq));
            let over_count = r.max_count > 0 && count > r.max_count;
            let too_old = r.max_age_ms > 0
                && count > 1
                && self
                    .txn
                    .get_msg::<Message>(&oldest_key)?
                    .is_some_and(|m| m.send_time_ms < self.now_ms.saturating_sub(r.max_age_ms));
            if !over_count && !too_old {
                break;
            }
            if let Some(m) = self.txn.get_msg::<Message>(&oldest_key)? {
                self.forget_group_send(g, &m)?;
            }
            self.txn.delete(oldest_key);
            head.first_seq += 1;
        }
        Ok(())
    }

    /// Drops the idempotency record of a group-list entry leaving the dedup
    /// window (or trimmed by retention).
    fn forget_group_send(&mut self, g: GroupId, m: &Message) -> Result<()> {
        if m.client_msg_id.is_empty() {
            return Ok(());
        }
        let idem = keys::idempotency(self.shard, UserId(m.sender_user_id), g.0, &m.client_msg_id);
        if self.txn.get_msg::<SendResult>(&idem)?.is_some_and(|r| r.group_seq == m.group_seq) {
            self.txn.delete(idem);
        }
        Ok(())
    }

    fn notify(&mut self, group: &GroupRecord, by: u64, event: Event, also: &[u64]) -> Result<Seq> {
        self.group_event(group, by, &event)?;
        let content = store::Notification { event: Some(event) }.encode_to_vec();
        let msg = Message {
            message_id: self.next_message_id()?.0,
            sender_user_id: by,
            conversation_kind: Self::conversation_kind(group.kind()) as i32,
            conversation_id: group.group_id,
            send_time_ms: self.now_ms,
            content_type: ContentType::Notification as i32,
            content: content.into(),
            ..Default::default()
        };
        self.post(group, msg, also)
    }

    fn save_group(&mut self, group: &GroupRecord) {
        self.txn.put_msg(keys::group(self.shard, GroupId(group.group_id)), group);
    }

    /// Turns a small group into a super group once it outgrows the limit.
    /// Returns whether it did.
    fn maybe_convert(&self, group: &mut GroupRecord) -> bool {
        if group.kind() == GroupKind::Small && group.member_count > self.limits.small_group_limit {
            group.set_kind(GroupKind::Super);
            return true;
        }
        false
    }

    pub(super) fn create_group(&mut self, c: &store::CreateGroup) -> Result<GroupRecord> {
        check_id("group_id", c.group_id)?;
        let m = self.limits.max_name_bytes;
        self.check_len("name", c.name.len(), m)?;
        self.check_len("avatar_url", c.avatar_url.len(), m)?;
        self.check_len("introduction", c.introduction.len(), 4 * m)?;
        self.check_len("extra", c.extra.len(), self.limits.max_extra_bytes)?;
        if self.txn.exists(&keys::group(self.shard, GroupId(c.group_id)))? {
            reject!(ErrorAlreadyExists, "group {} already exists", c.group_id);
        }
        let kind = match GroupKind::try_from(c.kind) {
            Ok(GroupKind::Unspecified) | Ok(GroupKind::Small) => GroupKind::Small,
            Ok(k) => k,
            Err(_) => reject!(ErrorBadRequest, "unknown group kind {}", c.kind),
        };
        let mut group = GroupRecord {
            group_id: c.group_id,
            kind: kind as i32,
            name: c.name.clone(),
            avatar_url: c.avatar_url.clone(),
            introduction: c.introduction.clone(),
            extra: c.extra.clone(),
            owner_id: c.owner_id,
            created_ms: self.now_ms,
            updated_ms: self.now_ms,
            retention: c.retention,
            ..Default::default()
        };
        if kind == GroupKind::Room {
            if !c.member_ids.is_empty() {
                reject!(ErrorBadRequest, "rooms have no members");
            }
            if group.retention.is_none() {
                group.retention = Some(self.limits.room_retention);
            }
            self.save_group(&group);
            self.group_created_event(&group)?;
            return Ok(group);
        }
        check_id("owner_id", c.owner_id)?;
        let mut ids: Vec<u64> = c.member_ids.iter().copied().chain([c.owner_id]).collect();
        ids.sort_unstable();
        ids.dedup();
        self.check_member_ids(&ids, 0)?;
        for &u in &ids {
            let role = if u == c.owner_id { MemberRole::Owner } else { MemberRole::Member };
            let rec =
                MemberRecord { user_id: u, role: role as i32, joined_ms: self.now_ms, ..Default::default() };
            self.txn.put_msg(keys::member(self.shard, GroupId(c.group_id), UserId(u)), &rec);
        }
        group.member_count = ids.len() as u32;
        if self.limits.small_group_limit == 0 {
            group.set_kind(GroupKind::Super);
        }
        // A group created above the limit is born super: nobody ever read it
        // as a small group, and the creation notice below carries the kind,
        // so no conversion notice is needed.
        self.maybe_convert(&mut group);
        self.save_group(&group);
        self.group_created_event(&group)?;
        let event = Event::GroupMembersAdded(store::GroupMembersChanged {
            group_id: c.group_id,
            kind: group.kind,
            by_user_id: c.owner_id,
            user_ids: ids.clone(),
            group_seq: 0,
        });
        self.notify(&group, c.owner_id, event, &ids)?;
        Ok(group)
    }

    fn check_member_ids(&self, ids: &[u64], existing: u32) -> Result<()> {
        self.check_user_ids(ids)?;
        if existing as usize + ids.len() > self.limits.max_group_members as usize {
            reject!(ErrorGroupFull, "a group holds at most {} members", self.limits.max_group_members);
        }
        Ok(())
    }

    /// At most `max_members_per_op` ids, none of them 0.
    pub(super) fn check_user_ids(&self, ids: &[u64]) -> Result<()> {
        if ids.len() > self.limits.max_members_per_op {
            reject!(ErrorBadRequest, "at most {} users per operation", self.limits.max_members_per_op);
        }
        if ids.contains(&0) {
            reject!(ErrorInvalidId, "user id must not be 0");
        }
        Ok(())
    }

    pub(super) fn update_group(&mut self, c: &store::UpdateGroup) -> Result<GroupRecord> {
        let mut group = self.load_group(c.group_id)?;
        if group.kind() != GroupKind::Room {
            self.require_manager(c.group_id, c.by_user_id)?;
        } else if c.by_user_id != 0 {
            reject!(ErrorPermissionDenied, "rooms are managed by the business API");
        }
        let before = group.clone();
        let m = self.limits.max_name_bytes;
        if let Some(v) = &c.name {
            self.check_len("name", v.len(), m)?;
            group.name = v.clone();
        }
        if let Some(v) = &c.avatar_url {
            self.check_len("avatar_url", v.len(), m)?;
            group.avatar_url = v.clone();
        }
        if let Some(v) = &c.introduction {
            self.check_len("introduction", v.len(), 4 * m)?;
            group.introduction = v.clone();
        }
        if let Some(v) = &c.extra {
            self.check_len("extra", v.len(), self.limits.max_extra_bytes)?;
            group.extra = v.clone();
        }
        if group == before {
            // Nothing changes (a retry of an update that was applied): no
            // write, no second notification.
            return Ok(group);
        }
        group.updated_ms = self.now_ms;
        self.save_group(&group);
        if group.kind() != GroupKind::Room {
            let event = Event::GroupUpdated(store::GroupChanged {
                group_id: c.group_id,
                by_user_id: c.by_user_id,
                kind: group.kind,
            });
            self.notify(&group, c.by_user_id, event, &[])?;
        }
        Ok(group)
    }

    pub(super) fn add_members(&mut self, c: &store::AddMembers) -> Result<MembersChanged> {
        let mut group = self.load_group(c.group_id)?;
        if group.kind() == GroupKind::Room {
            reject!(ErrorBadRequest, "rooms have no members");
        }
        self.require_manager(c.group_id, c.by_user_id)?;
        self.check_user_ids(&c.user_ids)?;
        let mut new = Vec::new();
        for &u in &c.user_ids {
            if !new.contains(&u) && self.member(c.group_id, u)?.is_none() {
                new.push(u);
            }
        }
        self.check_member_ids(&new, group.member_count)?;
        let head: ListHead =
            self.txn.get_msg(&keys::group_head(self.shard, GroupId(c.group_id)))?.unwrap_or_default();
        for &u in &new {
            let rec = MemberRecord {
                user_id: u,
                role: MemberRole::Member as i32,
                joined_ms: self.now_ms,
                joined_group_seq: head.last_seq,
                ..Default::default()
            };
            self.txn.put_msg(keys::member(self.shard, GroupId(c.group_id), UserId(u)), &rec);
        }
        group.member_count += new.len() as u32;
        group.updated_ms = self.now_ms;
        let converted = self.maybe_convert(&mut group);
        self.save_group(&group);
        if converted {
            // Into every member's own list (the group no longer diffuses), before
            // the membership notice: a member that switches to the group list
            // after this notice's group seq still sees the membership change.
            let members = self.member_ids(c.group_id)?;
            let event = Event::GroupConverted(store::GroupChanged {
                group_id: c.group_id,
                by_user_id: c.by_user_id,
                kind: group.kind,
            });
            self.notify(&group, c.by_user_id, event, &members)?;
        }
        if !new.is_empty() {
            let event = Event::GroupMembersAdded(store::GroupMembersChanged {
                group_id: c.group_id,
                kind: group.kind,
                by_user_id: c.by_user_id,
                user_ids: new.clone(),
                group_seq: head.last_seq,
            });
            self.notify(&group, c.by_user_id, event, &new)?;
        }
        Ok(MembersChanged { group: Some(group), user_ids: new })
    }

    pub(super) fn remove_members(&mut self, c: &store::RemoveMembers) -> Result<MembersChanged> {
        let mut group = self.load_group(c.group_id)?;
        if group.kind() == GroupKind::Room {
            reject!(ErrorBadRequest, "rooms have no members");
        }
        let by_role = self.role_of(c.group_id, c.by_user_id)?;
        let mut removed = Vec::new();
        for &u in &c.user_ids {
            let Some(m) = self.member(c.group_id, u)? else { continue };
            if m.role() == MemberRole::Owner {
                reject!(
                    ErrorPermissionDenied,
                    "the owner cannot leave or be removed; transfer ownership first"
                );
            }
            let leaving = u == c.by_user_id;
            if !leaving && by_role <= m.role() {
                reject!(ErrorPermissionDenied, "user {} may not remove user {u}", c.by_user_id);
            }
            if !removed.contains(&u) {
                removed.push(u);
            }
        }
        if removed.is_empty() {
            return Ok(MembersChanged { group: Some(group), user_ids: removed });
        }
        // Notify first, so the removed users still receive the notification.
        group.member_count -= removed.len() as u32;
        group.updated_ms = self.now_ms;
        let event = Event::GroupMembersRemoved(store::GroupMembersChanged {
            group_id: c.group_id,
            kind: group.kind,
            by_user_id: c.by_user_id,
            user_ids: removed.clone(),
            group_seq: 0,
        });
        self.notify(&group, c.by_user_id, event, &removed)?;
        for &u in &removed {
            self.txn.delete(keys::member(self.shard, GroupId(c.group_id), UserId(u)));
        }
        self.save_group(&group);
        Ok(MembersChanged { group: Some(group), user_ids: removed })
    }

    /// Changes a member's role (owner only; OWNER transfers ownership, the old
    /// owner staying as an admin) and/or nickname (the member or an admin).
    pub(super) fn set_member(&mut self, c: &store::SetMember) -> Result<GroupRecord> {
        let mut group = self.load_group(c.group_id)?;
        let by_role = self.role_of(c.group_id, c.by_user_id)?;
        let Some(mut target) = self.member(c.group_id, c.user_id)? else {
            reject!(ErrorNotGroupMember, "user {} is not a member of group {}", c.user_id, c.group_id);
        };
        let unchanged = target.clone();
        let role = match MemberRole::try_from(c.role) {
            Ok(r) => r,
            Err(_) => reject!(ErrorBadRequest, "unknown member role {}", c.role),
        };
        if let Some(nick) = &c.nickname {
            if c.user_id != c.by_user_id && by_role < MemberRole::Admin {
                reject!(ErrorPermissionDenied, "only admins may rename other members");
            }
            self.check_len("nickname", nick.len(), self.limits.max_name_bytes)?;
            target.nickname = nick.clone();
        }
        let mut demoted = None;
        if role != MemberRole::Unspecified && role != target.role() {
            if by_role != MemberRole::Owner {
                reject!(ErrorPermissionDenied, "only the owner may change roles");
            }
            if target.role() == MemberRole::Owner {
                reject!(ErrorPermissionDenied, "transfer ownership instead of demoting the owner");
            }
            if role == MemberRole::Owner {
                // Transfer: the old owner stays as an admin.
                if let Some(mut prev) = self.member(c.group_id, group.owner_id)? {
                    prev.set_role(MemberRole::Admin);
                    let key = keys::member(self.shard, GroupId(c.group_id), UserId(prev.user_id));
                    self.txn.put_msg(key, &prev);
                    demoted = Some(prev);
                }
                group.owner_id = c.user_id;
            }
            target.set_role(role);
        }
        if target == unchanged {
            // Nothing changes (a retried call): no write, no notification.
            return Ok(group);
        }
        self.txn.put_msg(keys::member(self.shard, GroupId(c.group_id), UserId(c.user_id)), &target);
        group.updated_ms = self.now_ms;
        self.save_group(&group);
        for m in demoted.iter().chain([&target]) {
            let event = Event::MemberChanged(store::MemberChanged {
                group_id: c.group_id,
                by_user_id: c.by_user_id,
                user_id: m.user_id,
                role: m.role,
                nickname: m.nickname.clone(),
            });
            self.notify(&group, c.by_user_id, event, &[])?;
        }
        Ok(group)
    }

    pub(super) fn dissolve_group(&mut self, c: &store::DissolveGroup) -> Result<GroupRecord> {
        // A retry by the owner after the group was dissolved gets the same
        // answer (the owner is kept in the dissolved record).
        if let Some(done) = self.txn.get_msg::<GroupRecord>(&keys::group(self.shard, GroupId(c.group_id)))?
            && done.dissolved
            && done.owner_id == c.by_user_id
            && c.by_user_id != 0
        {
            return Ok(done);
        }
        let mut group = self.load_group(c.group_id)?;
        if self.role_of(c.group_id, c.by_user_id)? != MemberRole::Owner {
            reject!(ErrorPermissionDenied, "only the owner may dissolve group {}", c.group_id);
        }
        let members = self.member_ids(c.group_id)?;
        let event = Event::GroupDissolved(store::GroupChanged {
            group_id: c.group_id,
            by_user_id: c.by_user_id,
            kind: group.kind,
        });
        self.notify(&group, c.by_user_id, event, &members)?;
        for u in members {
            self.txn.delete(keys::member(self.shard, GroupId(c.group_id), UserId(u)));
        }
        group.dissolved = true;
        group.member_count = 0;
        group.updated_ms = self.now_ms;
        self.save_group(&group);
        Ok(group)
    }

    /// A group send; sender 0 is the business API (no membership needed).
    pub(super) fn send_to_group(&mut self, c: &store::SendToGroup) -> Result<SendResult> {
        // A retry returns the original result even if the sender left since.
        let idem_key = keys::idempotency(self.shard, UserId(c.sender_user_id), c.group_id, &c.client_msg_id);
        if let Some(done) = self.txn.get_msg::<SendResult>(&idem_key)? {
            super::social::check_same_request(&done, &c.request_digest)?;
            return Ok(done);
        }
        let group = self.load_group(c.group_id)?;
        if c.sender_user_id != 0
            && group.kind() != GroupKind::Room
            && self.member(c.group_id, c.sender_user_id)?.is_none()
        {
            reject!(ErrorNotGroupMember, "user {} is not a member of group {}", c.sender_user_id, c.group_id);
        }
        let msg = Message {
            sender_user_id: c.sender_user_id,
            sender_device_id: c.sender_device_id,
            client_msg_id: c.client_msg_id.clone(),
            content_type: c.content_type,
            content: c.content.clone(),
            refers_to: c.refers_to,
            mentions: c.mentions.clone(),
            ..Default::default()
        };
        if c.request_digest.is_empty() {
            return self.group_send(&group, msg, idem_key);
        }
        let mut result = self.group_send(&group, msg, idem_key.clone())?;
        result.request_digest = c.request_digest.clone();
        self.txn.put_msg(idem_key, &result);
        Ok(result)
    }

    /// Posts `msg` (without id, conversation and time) to `group` and records
    /// the result under `idem_key`. The caller checked sender and content.
    pub(super) fn group_send(
        &mut self,
        group: &GroupRecord,
        mut msg: Message,
        idem_key: Vec<u8>,
    ) -> Result<SendResult> {
        let message_id = self.next_message_id()?;
        msg.message_id = message_id.0;
        msg.conversation_kind = Self::conversation_kind(group.kind()) as i32;
        msg.conversation_id = group.group_id;
        msg.send_time_ms = self.now_ms;
        let group_seq = self.post(group, msg.clone(), &[])?;
        msg.group_seq = group_seq.0;
        self.message_event(&msg)?;
        let result = SendResult {
            seq: 0,
            message_id: message_id.0,
            send_time_ms: self.now_ms,
            group_seq: group_seq.0,
            request_digest: Default::default(),
        };
        self.txn.put_msg(idem_key, &result);
        Ok(result)
    }
}
