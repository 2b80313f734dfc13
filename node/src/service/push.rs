//! The business push API (`PushService`, internal listener, cluster secret
//! required): gim's PushToUsers, group push, PushRoom and PushToAll.
//!
//! * **Persisted** pushes are list entries like any message: `PushToUsers`
//!   appends one SYSTEM entry to each recipient's list (one operation on the
//!   first recipient's shard; the relay delivers to the others exactly once),
//!   group and room pushes are group sends by the business sender 0. They
//!   reach offline users by sync and are idempotent by `client_msg_id`;
//!   that key reused for another push (other targets or body) is refused
//!   `ERROR_ALREADY_EXISTS` (a digest kept with the idempotency record).
//! * **Online-only** pushes are stored nowhere: the node builds the message
//!   (`message_id` 0, seq 0, `persisted` false) and hands it to the push
//!   streams of the shard leaders owning the targets ([`Core::push_online`]);
//!   connections online at that moment get it, others never do.
//!
//! Clients cannot tell a push from a notification made by the server
//! itself, so `CONTENT_TYPE_NOTIFICATION` is refused in every push.

use std::collections::BTreeMap;
use std::sync::Arc;

use rim_proto::ErrorCode;
use rim_proto::ids::{GroupId, ShardId, UserId};
use rim_proto::store::{self, op::Op as O};
use rim_proto::v1::push_service_server::PushService;
use rim_proto::v1::*;
use tonic::{Request, Response, Status};

use super::ops::{check_id, op};
use crate::core::Core;
use crate::error::{Error, Result};
use crate::group::now_ms;

/// Most recipients of one `PushToUsers`.
pub const MAX_PUSH_USERS: usize = 1_000;

/// The business push service of a node.
#[derive(Debug, Clone)]
pub struct PushSvc {
    /// Shared node state.
    pub core: Arc<Core>,
}

fn counted(target: &'static str, persisted: bool) {
    let persisted = if persisted { "true" } else { "false" };
    metrics::counter!("rim_pushes_total", "target" => target, "persisted" => persisted).increment(1);
}

/// The push body, checked: present, not a notification, a known (or
/// business, > 1000) content type, within the content size limit of this
/// node's view of the cluster's limits (online-only pushes are never
/// applied, so this is their only check).
fn content(core: &Core, c: Option<PushContent>) -> Result<PushContent> {
    let c = c.ok_or_else(|| Error::rejected(ErrorCode::ErrorBadRequest, "content is required"))?;
    match ContentType::try_from(c.content_type) {
        Ok(ContentType::Notification) => {
            return Err(Error::rejected(ErrorCode::ErrorBadRequest, "pushes cannot be notifications"));
        }
        Ok(_) => {}
        Err(_) if c.content_type > 1000 => {}
        Err(_) => {
            return Err(Error::rejected(
                ErrorCode::ErrorBadRequest,
                format!("unknown content type {}", c.content_type),
            ));
        }
    }
    let max = core.limits().max_content_bytes;
    if c.content.len() > max {
        return Err(Error::rejected(
            ErrorCode::ErrorContentTooLarge,
            format!("content is {} bytes, the limit is {max}", c.content.len()),
        ));
    }
    Ok(c)
}

/// An online-only push of `c` in conversation `(kind, id)`.
fn online(c: &PushContent, kind: ConversationKind, id: u64, priority: i32) -> PushedMessage {
    PushedMessage {
        list_kind: ListKind::Unspecified as i32,
        owner_id: 0,
        seq: 0,
        message: Some(Message {
            message_id: 0,
            sender_user_id: c.sender_user_id,
            conversation_kind: kind as i32,
            conversation_id: id,
            client_msg_id: c.client_msg_id.clone(),
            send_time_ms: now_ms(),
            content_type: c.content_type,
            content: c.content.clone(),
            ..Default::default()
        }),
        priority,
        persisted: false,
        skip_device_id: 0,
    }
}

fn conversation_kind(kind: store::GroupKind) -> ConversationKind {
    match kind {
        store::GroupKind::Super => ConversationKind::SuperGroup,
        store::GroupKind::Room => ConversationKind::Room,
        _ => ConversationKind::Group,
    }
}

/// Group sends need an idempotency key: a push without one gets a fresh one
/// (so it is not idempotent, as documented).
fn group_client_msg_id(core: &Core, given: String) -> String {
    if given.is_empty() { format!("push-{}-{:016x}", core.id(), rand::random::<u64>()) } else { given }
}

/// A digest of a persisted push (its targets, sorted, and its body), kept
/// with the push's idempotency record by the state machine: the same
/// `client_msg_id` reused for another push is refused
/// `ERROR_ALREADY_EXISTS`. Empty without a `client_msg_id`.
fn request_digest(targets: &[u64], c: &PushContent) -> bytes::Bytes {
    use sha2::{Digest, Sha256};
    if c.client_msg_id.is_empty() {
        return bytes::Bytes::new();
    }
    let mut sorted = targets.to_vec();
    sorted.sort_unstable();
    let mut h = Sha256::new();
    h.update((sorted.len() as u64).to_be_bytes());
    for t in sorted {
        h.update(t.to_be_bytes());
    }
    h.update(c.content_type.to_be_bytes());
    h.update(c.sender_user_id.to_be_bytes());
    h.update(&c.content);
    h.finalize().to_vec().into()
}

/// Distinct recipients in request order, 1..=[`MAX_PUSH_USERS`], none 0.
fn recipients(ids: Vec<u64>) -> Result<Vec<u64>> {
    let mut seen = std::collections::HashSet::new();
    let ids: Vec<u64> = ids.into_iter().filter(|u| seen.insert(*u)).collect();
    if ids.is_empty() || ids.len() > MAX_PUSH_USERS {
        return Err(Error::rejected(
            ErrorCode::ErrorBadRequest,
            format!("a push needs 1..={MAX_PUSH_USERS} recipients"),
        ));
    }
    for &u in &ids {
        check_id("user_id", u)?;
    }
    Ok(ids)
}

/// Hands one online push per shard to the shards' leaders, concurrently;
/// fails (after trying all) with the first failure.
async fn push_to_shards(core: &Core, pushes: BTreeMap<ShardId, OnlinePush>) -> Result<()> {
    let sends = pushes.into_iter().map(|(shard, p)| async move { (shard, core.push_online(shard, p).await) });
    let mut first = None;
    for (shard, res) in futures::future::join_all(sends).await {
        if let Err(e) = res {
            tracing::warn!(%shard, error = %e, "online push not handed to the shard leader");
            first.get_or_insert(e);
        }
    }
    first.map_or(Ok(()), Err)
}

/// Online-only push to users, grouped by the shard that owns them.
async fn push_users_online(core: &Core, users: &[u64], push: PushedMessage) -> Result<()> {
    let placement = core.placement()?;
    let mut by_shard: BTreeMap<ShardId, OnlinePush> = BTreeMap::new();
    for &u in users {
        by_shard
            .entry(placement.shard_of_user(UserId(u)))
            .or_insert_with(|| OnlinePush { push: Some(push.clone()), ..Default::default() })
            .user_ids
            .push(u);
    }
    push_to_shards(core, by_shard).await
}

impl PushSvc {
    /// Whether the caller may use `scope` of the push API
    /// ([`crate::credentials`]: API keys by scope; the cluster secret only
    /// while no API key is configured).
    fn authorize<T>(&self, req: &Request<T>, scope: &str) -> Result<(), Status> {
        let keys_configured = !self.core.config.api_keys.is_empty();
        match crate::credentials::role_of(req) {
            Some(role) if role.may_push(scope, keys_configured) => Ok(()),
            _ => Err(crate::credentials::denied(&format!("this credential may not use {scope}"))),
        }
    }

    /// The group's live record, read linearizably on its shard, and the
    /// shard's replica.
    async fn group(&self, g: u64) -> Result<(crate::read::ShardView<'_>, store::GroupRecord)> {
        check_id("group_id", g)?;
        let replica = self.core.view(self.core.placement()?.shard_of_group(GroupId(g))).await?;
        let rec =
            replica.group(GroupId(g)).await?.filter(|r| !r.dissolved).ok_or_else(|| {
                Error::rejected(ErrorCode::ErrorGroupNotFound, format!("group {g} not found"))
            })?;
        Ok((replica, rec))
    }

    /// A persisted push to a group or room: a group send by sender 0.
    async fn send_to_group(&self, g: u64, c: PushContent) -> Result<store::SendResult> {
        let request_digest = request_digest(&[g], &c);
        let o = O::SendToGroup(store::SendToGroup {
            group_id: g,
            sender_user_id: 0,
            sender_device_id: 0,
            client_msg_id: group_client_msg_id(&self.core, c.client_msg_id),
            content_type: c.content_type,
            content: c.content,
            mentions: Vec::new(),
            refers_to: 0,
            request_digest,
        });
        let r = self.core.propose(self.core.placement()?.shard_of_group(GroupId(g)), op(o)).await?;
        match r.value {
            Some(store::op_result::Value::Sent(s)) => Ok(s),
            _ => Err(Error::Internal("group push returned no result".into())),
        }
    }

    /// An online-only push to the streams subscribed to a super group or room.
    async fn push_group_online(&self, g: u64, push: PushedMessage) -> Result<()> {
        let shard = self.core.placement()?.shard_of_group(GroupId(g));
        let p = OnlinePush { group_ids: vec![g], push: Some(push), ..Default::default() };
        push_to_shards(&self.core, BTreeMap::from([(shard, p)])).await
    }
}

#[tonic::async_trait]
impl PushService for PushSvc {
    async fn push_to_users(
        &self,
        req: Request<PushToUsersRequest>,
    ) -> Result<Response<PushToUsersReply>, Status> {
        self.authorize(&req, "push.users")?;
        let r = req.into_inner();
        let c = content(&self.core, r.content)?;
        let users = recipients(r.user_ids)?;
        counted("users", r.persist);
        if !r.persist {
            push_users_online(&self.core, &users, online(&c, ConversationKind::System, 0, 0)).await?;
            return Ok(Response::new(PushToUsersReply { message_id: 0 }));
        }
        let shard = self.core.shard_of_user(UserId(users[0]))?;
        let request_digest = request_digest(&users, &c);
        let o = O::PushToUsers(store::PushToUsers {
            user_ids: users,
            sender_user_id: c.sender_user_id,
            content_type: c.content_type,
            content: c.content,
            client_msg_id: c.client_msg_id,
            request_digest,
        });
        let res = self.core.propose(shard, op(o)).await?;
        match res.value {
            Some(store::op_result::Value::Sent(s)) => {
                Ok(Response::new(PushToUsersReply { message_id: s.message_id }))
            }
            _ => Err(Error::Internal("push returned no result".into()).into()),
        }
    }

    async fn push_to_group(
        &self,
        req: Request<PushToGroupRequest>,
    ) -> Result<Response<PushToGroupReply>, Status> {
        self.authorize(&req, "push.group")?;
        let r = req.into_inner();
        let c = content(&self.core, r.content)?;
        check_id("group_id", r.group_id)?;
        counted("group", r.persist);
        if r.persist {
            let s = self.send_to_group(r.group_id, c).await?;
            return Ok(Response::new(PushToGroupReply { message_id: s.message_id, group_seq: s.group_seq }));
        }
        let (replica, rec) = self.group(r.group_id).await?;
        let push = online(&c, conversation_kind(rec.kind()), r.group_id, 0);
        if rec.kind() != store::GroupKind::Small {
            self.push_group_online(r.group_id, push).await?;
        } else {
            // Small groups are pushed to their members' own streams.
            let mut members = Vec::with_capacity(rec.member_count as usize);
            let mut after = UserId(0);
            loop {
                let (page, more) = replica.members(GroupId(r.group_id), after, 1_000).await?;
                members.extend(page.iter().map(|m| m.user_id));
                match page.last() {
                    Some(m) if more => after = UserId(m.user_id),
                    _ => break,
                }
            }
            if !members.is_empty() {
                push_users_online(&self.core, &members, push).await?;
            }
        }
        Ok(Response::new(PushToGroupReply { message_id: 0, group_seq: 0 }))
    }

    async fn push_room(&self, req: Request<PushRoomRequest>) -> Result<Response<PushRoomReply>, Status> {
        self.authorize(&req, "push.room")?;
        let r = req.into_inner();
        let c = content(&self.core, r.content)?;
        let (_, rec) = self.group(r.room_id).await?;
        if rec.kind() != store::GroupKind::Room {
            return Err(
                Error::rejected(ErrorCode::ErrorBadRequest, format!("{} is not a room", r.room_id)).into()
            );
        }
        counted("room", r.persist);
        if r.persist {
            let s = self.send_to_group(r.room_id, c).await?;
            return Ok(Response::new(PushRoomReply { message_id: s.message_id, group_seq: s.group_seq }));
        }
        self.push_group_online(r.room_id, online(&c, ConversationKind::Room, r.room_id, r.priority)).await?;
        Ok(Response::new(PushRoomReply { message_id: 0, group_seq: 0 }))
    }

    async fn push_to_all(&self, req: Request<PushToAllRequest>) -> Result<Response<PushToAllReply>, Status> {
        self.authorize(&req, "push.all")?;
        let r = req.into_inner();
        let c = content(&self.core, r.content)?;
        counted("all", false);
        let push = online(&c, ConversationKind::System, 0, r.priority);
        let pushes: BTreeMap<ShardId, OnlinePush> = self
            .core
            .placement()?
            .data_shards()
            .map(|s| {
                (
                    ShardId(s.shard_id),
                    OnlinePush { all: true, push: Some(push.clone()), ..Default::default() },
                )
            })
            .collect();
        push_to_shards(&self.core, pushes).await?;
        Ok(Response::new(PushToAllReply {}))
    }
}
