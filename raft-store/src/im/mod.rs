//! The IM state machine: what a committed [`Proposal`] does to a shard.
//!
//! A shard owns the data of the users and groups whose slots map to it
//! (design section 3). Applying a proposal runs its operations in order
//! against a [`Txn`] overlay; the caller commits the overlay atomically with
//! the entry's log id, so a crash never applies an operation twice.
//!
//! # Invariants (kept by this module, checked by the tests)
//!
//! * A list's seqs start at 1 and grow by exactly 1 per append: gap-free.
//!   An entry never moves or changes seq; trimming (rooms) only advances the
//!   head's `first_seq`.
//! * A send is recorded under `(sender, scope, client_msg_id)`; a retry gets
//!   the recorded result and writes nothing.
//! * A relayed message lands in a recipient's list at most once: `Deliver`
//!   dedups by message id.
//! * A device's ack cursor never moves backwards and never passes the head.
//! * Apply is deterministic: it reads no clock (time is the proposal's
//!   `now_ms`), no randomness, no configuration that may differ between
//!   replicas. Its [`Limits`] are the shard's own state, set by entries of
//!   its log (`SetLimits`, see `limits`); only [`ApplySabotage`], off
//!   outside tests, comes from the node.
//! * A rejected operation (a typed [`Error::Rejected`]) writes nothing; the
//!   other operations of the same proposal are unaffected.
//!
//! # Cross-shard effects
//!
//! Whatever must happen in another shard (a 1:1 message to a remote user, a
//! group message to remote members) is written to this shard's **outbox** in
//! the same batch. The relay (in `rim-node`) proposes it as `Deliver` to the
//! destination and removes it with `AckOutbox` once confirmed. Notifications
//! carried that way also update the recipient's own records (its list of
//! groups, its side of a friendship), so every cross-shard side effect is
//! exactly-once.
//!
//! # Modules
//!
//! * `user`: accounts, devices, 1:1 sends, deliveries, ack cursors, and the
//!   effects of notifications on a user's records.
//! * `group`: groups, super groups, rooms, members, group sends.
//! * `social`: friend actions, recalls, read positions and receipts,
//!   persisted business pushes.
//! * `meta`: the meta group (cluster map, id allocators).
//! * `limits`: the limits a shard applies with, `SetLimits`, and the
//!   stateless checks of an operation.
//! * `events`: events for the app's backend, produced at apply, and their
//!   delivery cursors and dead letters.
//! * `presence`: device sessions and push checks (`device.online`,
//!   `device.offline`, `push.needed`) and the due checks behind them.
//! * `idempotency`: the server API's idempotency keys (`ClaimIdempotency`).

mod events;
mod group;
mod idempotency;
mod limits;
mod meta;
mod presence;
pub mod read;
mod social;
mod txn;
mod user;

use std::sync::Arc;

use rim_proto::ids::{DeviceId, GroupId, MessageId, Seq, ShardId, UserId};
use rim_proto::store::{self, op::Op as O};
use rim_proto::store::{ListHead, OpResult, Proposal, ProposalResult, ShardCounters};
use rim_proto::v1::Message;

use crate::error::{Error, Result, reject};
use crate::keys::{self, MetaTag};
pub use events::{MAX_ENDPOINT_NAME, event_id};
pub use limits::{ApplySabotage, DEFAULT_EVENT_RETENTION_MS, FRAME_ROOM, Limits, is_cluster_op};
pub use presence::{MAX_FIRE_DUE, MAX_GATEWAY_GONE};
pub use txn::Txn;

/// A list that received an entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ListRef {
    /// A user's own list.
    User(UserId),
    /// A group, super group or room list.
    Group(GroupId),
}

/// An entry appended to a list by apply (for push streams).
#[derive(Clone, Debug, PartialEq)]
pub struct Appended {
    /// The list.
    pub list: ListRef,
    /// The entry, with its seq in that list.
    pub message: Message,
}

/// What one `apply` call changed that others may want to react to.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ApplyEffects {
    /// Entries appended to lists, in apply order.
    pub appended: Vec<Appended>,
    /// Whether outbox records were written (the relay has work).
    pub outbox: bool,
    /// Devices whose token version changed (logout, revoke): `(user, device)`.
    pub revoked: Vec<(UserId, DeviceId)>,
    /// Events produced (webhook deliveries have work).
    pub events: usize,
}

/// Applies operations of one shard into a [`Txn`].
pub struct Applier<'a> {
    /// Pending writes of the current `apply` call.
    pub txn: Txn<'a>,
    /// Effects of committed operations (valid once the batch is written).
    pub effects: ApplyEffects,
    /// Effects of the operation in progress.
    op_effects: ApplyEffects,
    /// The shard being applied to (key prefix, message id high bits).
    pub shard: ShardId,
    /// The limits in force: the shard's stored ones, replaced as soon as an
    /// operation stores newer ones (`SetLimits`), so the next operation of
    /// the same batch applies with them.
    limits: Arc<Limits>,
    /// The node's own switches (tests only).
    sabotage: ApplySabotage,
    /// The current proposal's time.
    now_ms: i64,
    /// Log index of the entry being applied (event positions).
    index: u64,
    /// Ordinal of the next event of the entry being applied.
    next_event: u32,
}

impl<'a> Applier<'a> {
    /// An applier writing into `txn` for `shard`, starting with the shard's
    /// stored `limits`.
    pub fn new(txn: Txn<'a>, shard: ShardId, limits: Arc<Limits>, sabotage: ApplySabotage) -> Applier<'a> {
        Applier {
            txn,
            shard,
            limits,
            sabotage,
            now_ms: 0,
            index: 0,
            next_event: 0,
            effects: ApplyEffects::default(),
            op_effects: ApplyEffects::default(),
        }
    }

    /// The limits in force after the operations applied so far.
    pub fn limits(&self) -> &Arc<Limits> {
        &self.limits
    }

    /// Applies every operation of a proposal, the entry at log `index`;
    /// one result per operation. Err only for faults (I/O, corruption),
    /// never for rejections.
    pub fn apply(&mut self, index: u64, proposal: &Proposal) -> Result<ProposalResult> {
        self.now_ms = proposal.now_ms;
        self.index = index;
        self.next_event = 0;
        let mut results = Vec::with_capacity(proposal.ops.len());
        for op in &proposal.ops {
            let events_before = self.next_event;
            let res = self.apply_op(op);
            match res {
                Ok(r) => {
                    self.txn.commit_op();
                    let op = std::mem::take(&mut self.op_effects);
                    self.effects.appended.extend(op.appended);
                    self.effects.outbox |= op.outbox;
                    self.effects.revoked.extend(op.revoked);
                    self.effects.events += op.events;
                    results.push(r);
                }
                Err(e) if e.is_deterministic() => {
                    self.txn.abort_op();
                    self.op_effects = ApplyEffects::default();
                    self.next_event = events_before;
                    results.push(OpResult { code: e.code() as i32, message: e.to_string(), value: None });
                }
                Err(e) => return Err(e),
            }
        }
        Ok(ProposalResult { results })
    }

    fn apply_op(&mut self, op: &store::Op) -> Result<OpResult> {
        use store::op_result::Value as V;
        // Sizes and content types first: the node ran the same check before
        // proposing, so only a node of another version lets a refusal reach here.
        self.limits.check_op(op)?;
        let Some(op) = &op.op else { reject!(ErrorBadRequest, "empty operation") };
        let value = match op {
            O::CreateUser(c) => V::User(self.create_user(c)?),
            O::UpdateUser(c) => V::User(self.update_user(c)?),
            O::ClaimAccount(c) => {
                self.claim_account(c)?;
                return Ok(OpResult::default());
            }
            O::RegisterDevice(c) => V::Device(self.register_device(c)?),
            O::RevokeDevice(c) => V::Device(self.revoke_device(c)?),
            O::SendToUser(c) => V::Sent(self.send_to_user(c)?),
            O::Deliver(c) => V::Delivered(self.deliver(c)?),
            O::AckOutbox(c) => {
                for id in &c.outbox_ids {
                    self.txn.delete(keys::outbox(self.shard, *id));
                }
                return Ok(OpResult::default());
            }
            O::AckSeq(c) => V::AckSeq(self.ack_seq(c)?),
            O::SetFriend(c) => V::Friend(self.set_friend(c)?),
            O::ChangeFriend(c) => match self.change_friend(c)? {
                Some(rec) => V::Friend(rec),
                None => return Ok(OpResult::default()),
            },
            O::Recall(c) => V::Sent(self.recall(c)?),
            O::MarkRead(c) => V::ReadSeq(self.mark_read(c)?),
            O::PushToUsers(c) => V::Sent(self.push_to_users(c)?),
            O::DeleteFriend(c) => {
                self.delete_friend(c)?;
                return Ok(OpResult::default());
            }
            O::CreateGroup(c) => V::Group(self.create_group(c)?),
            O::UpdateGroup(c) => V::Group(self.update_group(c)?),
            O::AddMembers(c) => V::MembersChanged(self.add_members(c)?),
            O::RemoveMembers(c) => V::MembersChanged(self.remove_members(c)?),
            O::SetMember(c) => V::Group(self.set_member(c)?),
            O::DissolveGroup(c) => V::Group(self.dissolve_group(c)?),
            O::SendToGroup(c) => V::Sent(self.send_to_group(c)?),
            O::SetClusterMap(c) => {
                self.set_cluster_map(c)?;
                return Ok(OpResult::default());
            }
            O::AllocateIds(c) => V::Ids(self.allocate_ids(c)?),
            O::SetLimits(c) => {
                self.set_limits(c)?;
                return Ok(OpResult::default());
            }
            O::AdvanceEventCursor(c) => {
                self.advance_event_cursor(c)?;
                return Ok(OpResult::default());
            }
            O::DeadLetterEvent(c) => {
                self.dead_letter_event(c)?;
                return Ok(OpResult::default());
            }
            O::TrimEvents(c) => {
                self.trim_events(c)?;
                return Ok(OpResult::default());
            }
            O::DeviceOnline(c) => V::Device(self.device_online(c)?),
            O::DeviceOffline(c) => {
                self.device_offline(c)?;
                return Ok(OpResult::default());
            }
            O::FireDue(c) => {
                self.fire_due(c)?;
                return Ok(OpResult::default());
            }
            O::GatewayGone(c) => {
                self.gateway_gone(c)?;
                return Ok(OpResult::default());
            }
            O::RemoveDeadLetter(c) => {
                self.remove_dead_letter(c)?;
                return Ok(OpResult::default());
            }
            O::ClaimIdempotency(c) => V::Sent(self.claim_idempotency(c)?),
        };
        Ok(OpResult { code: 0, message: String::new(), value: Some(value) })
    }

    // ------------------------------------------------------------ shared helpers

    fn counters(&self) -> Result<ShardCounters> {
        Ok(self.txn.get_msg(&keys::meta(self.shard, MetaTag::Counters))?.unwrap_or_default())
    }

    /// Assigns the next message id of this shard.
    fn next_message_id(&mut self) -> Result<MessageId> {
        let mut c = self.counters()?;
        c.next_message += 1;
        self.txn.put_msg(keys::meta(self.shard, MetaTag::Counters), &c);
        Ok(MessageId::compose(self.shard, c.next_message))
    }

    /// Records a delivery owed to other shards.
    fn push_outbox(&mut self, message: Message, recipients: Vec<u64>) -> Result<()> {
        if recipients.is_empty() {
            return Ok(());
        }
        let mut c = self.counters()?;
        c.next_outbox += 1;
        self.txn.put_msg(keys::meta(self.shard, MetaTag::Counters), &c);
        let rec = store::OutboxRecord { outbox_id: c.next_outbox, message: Some(message), recipients };
        self.txn.put_msg(keys::outbox(self.shard, c.next_outbox), &rec);
        self.op_effects.outbox = true;
        Ok(())
    }

    /// Whether `user` lives in this shard.
    fn is_local_user(&self, user: UserId) -> Result<bool> {
        self.txn.exists(&keys::user(self.shard, user))
    }

    /// Appends `msg` to a local user's list at the next seq and applies the
    /// side effects of notifications. Returns the seq.
    fn append_to_user(&mut self, user: UserId, mut msg: Message) -> Result<Seq> {
        let head_key = keys::user_head(self.shard, user);
        let mut head: ListHead = self.txn.get_msg(&head_key)?.unwrap_or_default();
        let seq = next_seq(&head, &format_args!("of user {user}"))?;
        head.last_seq = seq.0;
        msg.seq = seq.0;
        self.arm_push_check(user, &mut head, seq, &msg);
        self.notification_effects(user, &msg)?;
        self.expire_dedup(user, seq)?;
        self.txn.put_msg(keys::user_msg(self.shard, user, seq), &msg);
        self.txn.put_msg(head_key, &head);
        self.op_effects.appended.push(Appended { list: ListRef::User(user), message: msg });
        Ok(seq)
    }

    /// Bounds the dedup tables: when `seq` is appended to `user`'s list, the
    /// entry `dedup_window` positions back leaves them (its delivery mark, and
    /// its idempotency record if the user sent it). Every append retires
    /// exactly one old position, so nothing is left behind.
    fn expire_dedup(&mut self, user: UserId, seq: Seq) -> Result<()> {
        let window = self.limits.dedup_window;
        let Some(old) = seq.0.checked_sub(window).filter(|o| window > 0 && *o > 0) else { return Ok(()) };
        let Some(m) = self.txn.get_msg::<Message>(&keys::user_msg(self.shard, user, Seq(old)))? else {
            return Ok(());
        };
        let mark = keys::delivered(self.shard, user, MessageId(m.message_id));
        if self.txn.get_msg::<store::DeliveredMark>(&mark)?.is_some_and(|d| d.seq == old) {
            self.txn.delete(mark);
        }
        if m.sender_user_id == user.0
            && m.conversation_kind == rim_proto::v1::ConversationKind::User as i32
            && !m.client_msg_id.is_empty()
        {
            // Read receipts of MarkRead sit in their own scope.
            let receipt = m.content_type == rim_proto::v1::ContentType::ReadReceipt as i32;
            let scopes: &[u64] = if receipt { &[0, keys::RECEIPT_SCOPE] } else { &[0] };
            for &scope in scopes {
                let idem = keys::idempotency(self.shard, user, scope, &m.client_msg_id);
                if self.txn.get_msg::<store::SendResult>(&idem)?.is_some_and(|r| r.seq == old) {
                    self.txn.delete(idem);
                }
            }
        }
        Ok(())
    }

    fn check_len(&self, what: &str, len: usize, max: usize) -> Result<()> {
        if len > max {
            return Err(Error::rejected(
                rim_proto::ErrorCode::ErrorBadRequest,
                format!("{what} is {len} bytes, the limit is {max}"),
            ));
        }
        Ok(())
    }
}

/// The seq of the next entry of a list whose head is `head`. A list whose
/// head is [`Seq::MAX`] is full: the append is refused (deterministically,
/// so every replica refuses it), never wrapped to seq 0.
fn next_seq(head: &ListHead, list: &dyn std::fmt::Display) -> Result<Seq> {
    match Seq(head.last_seq).checked_next() {
        Some(seq) => Ok(seq),
        None => reject!(ErrorInternal, "list {list} is full: no seq follows {}", head.last_seq),
    }
}

/// Checks that an id is not 0 (0 never names anything).
fn check_id(what: &str, id: u64) -> Result<()> {
    if id == 0 {
        reject!(ErrorInvalidId, "{what} must not be 0");
    }
    Ok(())
}
