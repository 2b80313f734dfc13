//! Operations shared by the client-facing and gateway-facing services. The
//! services only differ in how they learn who is asking (token metadata vs.
//! the gateway's connection context); what a send, sync or ack does is here.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use rim_proto::ErrorCode;
use rim_proto::ids::{DeviceId, GroupId, Seq, ShardId, UserId};
use rim_proto::store::{self, DeviceRecord, UserRecord, op::Op as O};
use rim_proto::v1::{self, ConversationKind};

use crate::core::Core;
use crate::error::{Error, Result};
use crate::read::ShardView;

/// Largest page a sync returns.
pub const MAX_SYNC_LIMIT: u32 = 500;
/// Page size when the client asks for 0.
pub const DEFAULT_SYNC_LIMIT: u32 = 100;

pub(super) fn op(o: O) -> store::Op {
    store::Op { op: Some(o) }
}

fn clamp_limit(limit: u32) -> usize {
    (if limit == 0 { DEFAULT_SYNC_LIMIT } else { limit.min(MAX_SYNC_LIMIT) }) as usize
}

/// A user as `viewer` may see it: never credentials, and the phone number
/// only to the user themself.
pub fn user_view(u: UserRecord, viewer: UserId) -> v1::User {
    let phone = if u.user_id == viewer.0 { u.phone } else { String::new() };
    v1::User {
        user_id: u.user_id,
        username: u.username,
        nickname: u.nickname,
        avatar_url: u.avatar_url,
        extra: u.extra,
        created_ms: u.created_ms,
        updated_ms: u.updated_ms,
        phone,
    }
}

/// Public view of a device.
pub fn device_view(d: DeviceRecord) -> v1::Device {
    v1::Device {
        device_id: d.device_id,
        user_id: d.user_id,
        info: Some(v1::DeviceInfo {
            device_type: d.device_type,
            brand: d.brand,
            model: d.model,
            system_version: d.system_version,
            sdk_version: d.sdk_version,
        }),
        ack_seq: d.ack_seq,
        created_ms: d.created_ms,
        updated_ms: d.updated_ms,
        revoked: false,
    }
}

/// Checks an id from a request (the wire form, before it becomes an id
/// type: 0 names nothing).
pub fn check_id(what: &str, id: u64) -> Result<()> {
    if id == 0 {
        return Err(Error::rejected(ErrorCode::ErrorInvalidId, format!("{what} must not be 0")));
    }
    Ok(())
}

/// Sends a message as `(user, device)`.
pub async fn send(
    core: &Core,
    user: UserId,
    device: DeviceId,
    input: v1::SendInput,
) -> Result<v1::SendOutput> {
    check_id("conversation_id", input.conversation_id)?;
    core.throttle.send(user, input.content.len())?;
    let input = match &core.before_send {
        Some(hook) => hook.check(user, device, input).await?,
        None => input,
    };
    let kind = ConversationKind::try_from(input.conversation_kind).unwrap_or(ConversationKind::Unspecified);
    let placement = core.placement()?;
    let (shard, o) = match kind {
        ConversationKind::User => {
            if input.conversation_id != user.0 {
                ensure_user_exists(core, UserId(input.conversation_id)).await?;
            }
            let o = O::SendToUser(store::SendToUser {
                sender_user_id: user.0,
                sender_device_id: device.0,
                recipient_user_id: input.conversation_id,
                client_msg_id: input.client_msg_id,
                content_type: input.content_type,
                content: input.content,
                refers_to: input.refers_to,
            });
            (placement.shard_of_user(user), o)
        }
        ConversationKind::Group | ConversationKind::SuperGroup | ConversationKind::Room => {
            let o = O::SendToGroup(store::SendToGroup {
                group_id: input.conversation_id,
                sender_user_id: user.0,
                sender_device_id: device.0,
                client_msg_id: input.client_msg_id,
                content_type: input.content_type,
                content: input.content,
                mentions: input.mentions,
                refers_to: input.refers_to,
                request_digest: Default::default(),
            });
            (placement.shard_of_group(GroupId(input.conversation_id)), o)
        }
        _ => return Err(Error::rejected(ErrorCode::ErrorBadRequest, "unknown conversation kind")),
    };
    let t0 = std::time::Instant::now();
    let r = core.propose(shard, op(o)).await?;
    metrics::histogram!("rim_send_seconds").record(t0.elapsed().as_secs_f64());
    match r.value {
        Some(store::op_result::Value::Sent(s)) => Ok(v1::SendOutput {
            seq: s.seq,
            message_id: s.message_id,
            send_time_ms: s.send_time_ms,
            group_seq: s.group_seq,
        }),
        _ => Err(Error::Internal("send returned no result".into())),
    }
}

/// Fails with `ERROR_USER_NOT_FOUND` unless `user` exists. Users are never
/// deleted, so a local replica that has the user settles it without a read
/// barrier; only an absent user costs a linearizable read.
pub async fn ensure_user_exists(core: &Core, user: UserId) -> Result<()> {
    let shard = core.shard_of_user(user)?;
    if let Some(g) = core.group(shard)
        && g.reader.user(user)?.is_some()
    {
        return Ok(());
    }
    get_user(core, user).await.map(|_| ())
}

/// Reads `user`'s list after `after_seq`.
pub async fn sync(core: &Core, user: UserId, input: v1::SyncInput) -> Result<v1::SyncOutput> {
    let shard = core.shard_of_user(user)?;
    let g = core.view(shard).await?;
    // Entries and last_seq come from one snapshot (see `Reader::sync`).
    let page = g.sync(user, Seq(input.after_seq), clamp_limit(input.limit)).await?;
    Ok(v1::SyncOutput { messages: page.messages, has_more: page.has_more, last_seq: page.head.last_seq })
}

/// Reads a group list after `after_group_seq`, for a member (or anyone, for rooms).
pub async fn sync_group(core: &Core, user: UserId, input: v1::SyncGroupInput) -> Result<v1::SyncGroupOutput> {
    check_id("group_id", input.group_id)?;
    let group_id = GroupId(input.group_id);
    let shard = core.placement()?.shard_of_group(group_id);
    let g = core.view(shard).await?;
    let group = g
        .group(group_id)
        .await?
        .filter(|gr| !gr.dissolved)
        .ok_or_else(|| Error::rejected(ErrorCode::ErrorGroupNotFound, "group not found"))?;
    let mut after = input.after_group_seq;
    if group.kind() != store::GroupKind::Room {
        let m = g
            .member(group_id, user)
            .await?
            .ok_or_else(|| Error::rejected(ErrorCode::ErrorNotGroupMember, "not a member"))?;
        after = after.max(m.joined_group_seq);
    }
    let page = g.sync_group(group_id, Seq(after), clamp_limit(input.limit)).await?;
    Ok(v1::SyncGroupOutput {
        messages: page.messages,
        has_more: page.has_more,
        last_group_seq: page.head.last_seq,
        first_group_seq: page.head.first_seq.max(1),
    })
}

/// Moves a device's ack cursor.
pub async fn ack(core: &Core, user: UserId, device: DeviceId, seq: Seq) -> Result<v1::AckOutput> {
    let shard = core.shard_of_user(user)?;
    let ack = store::AckSeq { user_id: user.0, device_id: device.0, seq: seq.0 };
    let r = core.propose(shard, op(O::AckSeq(ack))).await?;
    match r.value {
        Some(store::op_result::Value::AckSeq(ack_seq)) => Ok(v1::AckOutput { ack_seq }),
        _ => Err(Error::Internal("ack returned no cursor".into())),
    }
}

/// Bumps a device's token version (logout, kick).
pub async fn revoke(core: &Core, user: UserId, device: DeviceId) -> Result<()> {
    let shard = core.shard_of_user(user)?;
    core.propose(shard, op(O::RevokeDevice(store::RevokeDevice { user_id: user.0, device_id: device.0 })))
        .await?;
    Ok(())
}

/// Starts a session of a signed-in device (`DeviceOnline`); returns its
/// epoch, which the session's close names ([`session_ended`]).
/// `gateway` is the gateway instance holding the connection
/// (`crate::sessions`).
pub async fn session_started(core: &Core, user: UserId, device: DeviceId, gateway: &str) -> Result<u64> {
    let shard = core.shard_of_user(user)?;
    let o = O::DeviceOnline(store::DeviceOnline {
        user_id: user.0,
        device_id: device.0,
        gateway: gateway.into(),
    });
    match core.propose(shard, op(o)).await?.value {
        Some(store::op_result::Value::Device(d)) => Ok(d.session_epoch),
        _ => Err(Error::rejected(ErrorCode::ErrorInternal, "DeviceOnline without a device")),
    }
}

/// Closes session `epoch` of a device (`DeviceOffline`): ignored unless it
/// is the device's current session.
pub async fn session_ended(
    core: &Core,
    user: UserId,
    device: DeviceId,
    epoch: u64,
    reason: i32,
) -> Result<()> {
    let shard = core.shard_of_user(user)?;
    let o = O::DeviceOffline(store::DeviceOffline { user_id: user.0, device_id: device.0, epoch, reason });
    core.propose(shard, op(o)).await?;
    Ok(())
}

/// Registers (or re-registers) a device and issues a token for it. With
/// `external_id` (the app's id of the device, app-signed tokens), `device`
/// is used only if the user has no device of that id yet; the record
/// returned names the device actually registered.
pub async fn register_device(
    core: &Core,
    user: UserId,
    device: DeviceId,
    info: Option<v1::DeviceInfo>,
    external_id: &str,
) -> Result<(DeviceRecord, String, i64)> {
    let info = info.unwrap_or_default();
    if v1::DeviceType::try_from(info.device_type).is_err() {
        let t = info.device_type;
        return Err(Error::rejected(ErrorCode::ErrorBadRequest, format!("unknown device_type {t}")));
    }
    let shard = core.shard_of_user(user)?;
    let o = O::RegisterDevice(store::RegisterDevice {
        user_id: user.0,
        device_id: device.0,
        device_type: info.device_type,
        brand: info.brand,
        model: info.model,
        system_version: info.system_version,
        sdk_version: info.sdk_version,
        external_id: external_id.to_string(),
    });
    let r = core.propose(shard, op(o)).await?;
    let Some(store::op_result::Value::Device(d)) = r.value else {
        return Err(Error::Internal("device registration returned no device".into()));
    };
    let (token, expires) = core.issue_token(user, DeviceId(d.device_id), d.token_version);
    Ok((d, token, expires))
}

/// A user's record, read linearizably.
pub async fn get_user(core: &Core, user: UserId) -> Result<UserRecord> {
    check_id("user_id", user.0)?;
    let g = core.view(core.shard_of_user(user)?).await?;
    g.user(user).await?.ok_or_else(|| Error::rejected(ErrorCode::ErrorUserNotFound, "user not found"))
}

/// A device's record, read linearizably.
pub async fn get_device(core: &Core, user: UserId, device: DeviceId) -> Result<Option<DeviceRecord>> {
    let g = core.view(core.shard_of_user(user)?).await?;
    g.device(user, device).await
}

/// Recalls a message as `(user, device)`: proposed to the caller's shard for
/// 1:1 (`seq` = the message's seq in the caller's list), to the group's shard
/// for groups (`seq` = its group seq).
pub async fn recall(
    core: &Core,
    user: UserId,
    device: DeviceId,
    input: v1::RecallInput,
) -> Result<v1::SendOutput> {
    check_id("message_id", input.message_id)?;
    check_id("seq", input.seq)?;
    let kind = ConversationKind::try_from(input.conversation_kind).unwrap_or(ConversationKind::Unspecified);
    let shard = match kind {
        ConversationKind::User => core.shard_of_user(user)?,
        ConversationKind::Group | ConversationKind::SuperGroup | ConversationKind::Room => {
            check_id("conversation_id", input.conversation_id)?;
            core.placement()?.shard_of_group(GroupId(input.conversation_id))
        }
        _ => {
            return Err(Error::rejected(
                ErrorCode::ErrorBadRequest,
                "recall needs a user or group conversation",
            ));
        }
    };
    let o = O::Recall(store::Recall {
        user_id: user.0,
        device_id: device.0,
        conversation_kind: input.conversation_kind,
        conversation_id: input.conversation_id,
        message_id: input.message_id,
        seq: input.seq,
        client_msg_id: input.client_msg_id,
    });
    let r = core.propose(shard, op(o)).await?;
    metrics::counter!("rim_recalls_total").increment(1);
    match r.value {
        Some(store::op_result::Value::Sent(s)) => Ok(v1::SendOutput {
            seq: s.seq,
            message_id: s.message_id,
            send_time_ms: s.send_time_ms,
            group_seq: s.group_seq,
        }),
        _ => Err(Error::Internal("recall returned no result".into())),
    }
}

/// Moves `user`'s read position in a conversation (and, 1:1 with a
/// `receipt_message_id`, sends the peer a read receipt).
pub async fn mark_read(
    core: &Core,
    user: UserId,
    device: DeviceId,
    input: v1::ReadInput,
) -> Result<v1::ReadOutput> {
    let kind = ConversationKind::try_from(input.conversation_kind).unwrap_or(ConversationKind::Unspecified);
    if kind == ConversationKind::Unspecified {
        return Err(Error::rejected(ErrorCode::ErrorBadRequest, "conversation_kind is required"));
    }
    if kind != ConversationKind::System {
        check_id("conversation_id", input.conversation_id)?;
    }
    // A read position names a conversation that exists: no records for
    // made-up ids. (The state machine checks a receipt's message.)
    match kind {
        ConversationKind::User if input.conversation_id != user.0 => {
            ensure_user_exists(core, UserId(input.conversation_id)).await?;
        }
        ConversationKind::Group | ConversationKind::SuperGroup | ConversationKind::Room => {
            let group = GroupId(input.conversation_id);
            let g = core.view(core.placement()?.shard_of_group(group)).await?;
            if g.group(group).await?.is_none() {
                return Err(Error::rejected(ErrorCode::ErrorGroupNotFound, format!("no group {group}")));
            }
        }
        _ => {}
    }
    let o = O::MarkRead(store::MarkRead {
        user_id: user.0,
        device_id: device.0,
        conversation_kind: input.conversation_kind,
        conversation_id: input.conversation_id,
        read_seq: input.read_seq,
        receipt_message_id: if kind == ConversationKind::User { input.receipt_message_id } else { 0 },
    });
    let r = core.propose(core.shard_of_user(user)?, op(o)).await?;
    match r.value {
        Some(store::op_result::Value::ReadSeq(read_seq)) => Ok(v1::ReadOutput { read_seq }),
        _ => Err(Error::Internal("mark read returned no position".into())),
    }
}

/// Linearizable views of several shards at once (`Core::view`: read
/// barriers of local replicas, forwarded reads for the others); fails with
/// the first shard that cannot be read.
pub async fn views(
    core: &Core,
    shards: impl IntoIterator<Item = ShardId>,
) -> Result<BTreeMap<ShardId, ShardView<'_>>> {
    let mut out = BTreeMap::new();
    for (shard, g) in views_lenient(core, shards).await {
        out.insert(shard, g?);
    }
    Ok(out)
}

/// Like [`views`], but returns each shard's outcome.
pub async fn views_lenient(
    core: &Core,
    shards: impl IntoIterator<Item = ShardId>,
) -> BTreeMap<ShardId, Result<ShardView<'_>>> {
    let shards: BTreeSet<ShardId> = shards.into_iter().collect();
    let reads = shards.into_iter().map(|s| async move { (s, core.view(s).await) });
    futures::future::join_all(reads).await.into_iter().collect()
}

/// Fails with `ERROR_USER_NOT_FOUND` (naming the first) unless every user
/// exists; like [`ensure_user_exists`], local replicas settle existing users.
pub async fn ensure_users_exist(core: &Core, users: &[UserId]) -> Result<()> {
    let placement = core.placement()?;
    let mut unsure = Vec::new();
    for &u in users {
        check_id("user_id", u.0)?;
        let shard = placement.shard_of_user(u);
        let known = match core.group(shard) {
            Some(g) => g.reader.user(u)?.is_some(),
            None => false,
        };
        if !known {
            unsure.push((shard, u));
        }
    }
    if unsure.is_empty() {
        return Ok(());
    }
    let groups = views(core, unsure.iter().map(|(s, _)| *s)).await?;
    for (shard, u) in unsure {
        if groups[&shard].user(u).await?.is_none() {
            return Err(Error::rejected(ErrorCode::ErrorUserNotFound, format!("user {u} not found")));
        }
    }
    Ok(())
}

/// Profiles of `users` as `viewer` sees them, best effort: users whose
/// shard cannot be read in time (or that do not exist) are left out.
pub async fn profiles(core: &Core, viewer: UserId, users: &[UserId]) -> HashMap<UserId, v1::User> {
    let Ok(placement) = core.placement() else { return HashMap::new() };
    let groups = views_lenient(core, users.iter().map(|u| placement.shard_of_user(*u))).await;
    let mut out = HashMap::new();
    for &u in users {
        let Some(Ok(g)) = groups.get(&placement.shard_of_user(u)) else { continue };
        match g.user(u).await {
            Ok(Some(rec)) => {
                out.insert(u, user_view(rec, viewer));
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(user = %u, error = %e, "reading a profile"),
        }
    }
    out
}

/// Public view of one side of a friendship.
pub fn friend_view(f: store::FriendRecord, profile: Option<v1::User>) -> v1::Friend {
    v1::Friend {
        friend_id: f.friend_id,
        status: f.status,
        remarks: f.remarks,
        extra: f.extra,
        created_ms: f.created_ms,
        updated_ms: f.updated_ms,
        profile,
        description: f.description,
    }
}

/// Public view of a group; `last_group_seq` is reported for super groups
/// and rooms only (small groups are read from the members' own lists).
pub fn group_view(g: store::GroupRecord, last_group_seq: Seq) -> v1::Group {
    let small = g.kind() == store::GroupKind::Small;
    v1::Group {
        group_id: g.group_id,
        kind: g.kind,
        name: g.name,
        avatar_url: g.avatar_url,
        introduction: g.introduction,
        extra: g.extra,
        owner_id: g.owner_id,
        member_count: g.member_count,
        created_ms: g.created_ms,
        updated_ms: g.updated_ms,
        dissolved: g.dissolved,
        retention: g.retention.map(|r| v1::Retention { max_count: r.max_count, max_age_ms: r.max_age_ms }),
        last_group_seq: if small { 0 } else { last_group_seq.0 },
    }
}

/// Public view of a member.
pub fn member_view(m: store::MemberRecord, profile: Option<v1::User>) -> v1::GroupMember {
    v1::GroupMember {
        user_id: m.user_id,
        role: m.role,
        nickname: m.nickname,
        joined_ms: m.joined_ms,
        joined_group_seq: m.joined_group_seq,
        extra: m.extra,
        profile,
    }
}
