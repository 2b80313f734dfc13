//! Operations shared by the client-facing and gateway-facing services. The
//! services only differ in how they learn who is asking (token metadata vs.
//! the gateway's connection context); what a send, sync or ack does is here.

use rim_proto::ErrorCode;
use rim_proto::store::{self, DeviceRecord, UserRecord, op::Op as O};
use rim_proto::v1::{self, ConversationKind};
use rim_raft_store::{DeviceId, GroupId, Seq, UserId};

use crate::core::Core;
use crate::error::{Error, Result};

/// Largest page a sync returns.
pub const MAX_SYNC_LIMIT: u32 = 500;
/// Page size when the client asks for 0.
pub const DEFAULT_SYNC_LIMIT: u32 = 100;

fn op(o: O) -> store::Op {
    store::Op { op: Some(o) }
}

fn clamp_limit(limit: u32) -> usize {
    (if limit == 0 { DEFAULT_SYNC_LIMIT } else { limit.min(MAX_SYNC_LIMIT) }) as usize
}

/// Public view of a user (no credentials).
pub fn user_view(u: UserRecord) -> v1::User {
    v1::User {
        user_id: u.user_id,
        username: u.username,
        nickname: u.nickname,
        avatar_url: u.avatar_url,
        extra: u.extra,
        created_ms: u.created_ms,
        updated_ms: u.updated_ms,
        phone: u.phone,
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

/// Checks an id from a request.
pub fn check_id(what: &str, id: u64) -> Result<()> {
    if id == 0 {
        return Err(Error::rejected(ErrorCode::ErrorInvalidId, format!("{what} must not be 0")));
    }
    Ok(())
}

/// Sends a message as `(user, device)`.
pub async fn send(core: &Core, user: u64, device: u64, input: v1::SendInput) -> Result<v1::SendOutput> {
    check_id("conversation_id", input.conversation_id)?;
    let kind = ConversationKind::try_from(input.conversation_kind).unwrap_or(ConversationKind::Unspecified);
    let placement = core.placement()?;
    let (shard, o) = match kind {
        ConversationKind::User => {
            if input.conversation_id != user {
                ensure_user_exists(core, input.conversation_id).await?;
            }
            let o = O::SendToUser(store::SendToUser {
                sender_user_id: user,
                sender_device_id: device,
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
                sender_user_id: user,
                sender_device_id: device,
                client_msg_id: input.client_msg_id,
                content_type: input.content_type,
                content: input.content,
                mentions: input.mentions,
                refers_to: input.refers_to,
            });
            (placement.shard_of_group(input.conversation_id), o)
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
pub async fn ensure_user_exists(core: &Core, user: u64) -> Result<()> {
    let shard = core.shard_of_user(user)?;
    if let Some(g) = core.group(shard)
        && g.reader.user(UserId(user))?.is_some()
    {
        return Ok(());
    }
    get_user(core, user).await.map(|_| ())
}

/// Reads `user`'s list after `after_seq`.
pub async fn sync(core: &Core, user: u64, input: v1::SyncInput) -> Result<v1::SyncOutput> {
    let shard = core.shard_of_user(user)?;
    let g = core.read_barrier(shard).await?;
    // Entries and last_seq come from one snapshot (see `Reader::sync`).
    let page = g.reader.sync(UserId(user), Seq(input.after_seq), clamp_limit(input.limit))?;
    Ok(v1::SyncOutput { messages: page.messages, has_more: page.has_more, last_seq: page.head.last_seq })
}

/// Reads a group list after `after_group_seq`, for a member (or anyone, for rooms).
pub async fn sync_group(core: &Core, user: u64, input: v1::SyncGroupInput) -> Result<v1::SyncGroupOutput> {
    check_id("group_id", input.group_id)?;
    let shard = core.placement()?.shard_of_group(input.group_id);
    let g = core.read_barrier(shard).await?;
    let group = g
        .reader
        .group(GroupId(input.group_id))?
        .filter(|gr| !gr.dissolved)
        .ok_or_else(|| Error::rejected(ErrorCode::ErrorGroupNotFound, "group not found"))?;
    let mut after = input.after_group_seq;
    if group.kind() != store::GroupKind::Room {
        let m = g
            .reader
            .member(GroupId(input.group_id), UserId(user))?
            .ok_or_else(|| Error::rejected(ErrorCode::ErrorNotGroupMember, "not a member"))?;
        after = after.max(m.joined_group_seq);
    }
    let page = g.reader.sync_group(GroupId(input.group_id), Seq(after), clamp_limit(input.limit))?;
    Ok(v1::SyncGroupOutput {
        messages: page.messages,
        has_more: page.has_more,
        last_group_seq: page.head.last_seq,
        first_group_seq: page.head.first_seq.max(1),
    })
}

/// Moves a device's ack cursor.
pub async fn ack(core: &Core, user: u64, device: u64, seq: u64) -> Result<v1::AckOutput> {
    let shard = core.shard_of_user(user)?;
    let r =
        core.propose(shard, op(O::AckSeq(store::AckSeq { user_id: user, device_id: device, seq }))).await?;
    match r.value {
        Some(store::op_result::Value::AckSeq(ack_seq)) => Ok(v1::AckOutput { ack_seq }),
        _ => Err(Error::Internal("ack returned no cursor".into())),
    }
}

/// Bumps a device's token version (logout, kick).
pub async fn revoke(core: &Core, user: u64, device: u64) -> Result<()> {
    let shard = core.shard_of_user(user)?;
    core.propose(shard, op(O::RevokeDevice(store::RevokeDevice { user_id: user, device_id: device })))
        .await?;
    Ok(())
}

/// Registers (or re-registers) a device and issues a token for it.
pub async fn register_device(
    core: &Core,
    user: u64,
    device: u64,
    info: Option<v1::DeviceInfo>,
) -> Result<(DeviceRecord, String, i64)> {
    let info = info.unwrap_or_default();
    let shard = core.shard_of_user(user)?;
    let o = O::RegisterDevice(store::RegisterDevice {
        user_id: user,
        device_id: device,
        device_type: info.device_type,
        brand: info.brand,
        model: info.model,
        system_version: info.system_version,
        sdk_version: info.sdk_version,
    });
    let r = core.propose(shard, op(o)).await?;
    let Some(store::op_result::Value::Device(d)) = r.value else {
        return Err(Error::Internal("device registration returned no device".into()));
    };
    let (token, expires) = core.issue_token(user, device, d.token_version);
    Ok((d, token, expires))
}

/// A user's record, read linearizably.
pub async fn get_user(core: &Core, user: u64) -> Result<UserRecord> {
    check_id("user_id", user)?;
    let g = core.read_barrier(core.shard_of_user(user)?).await?;
    g.reader
        .user(UserId(user))?
        .ok_or_else(|| Error::rejected(ErrorCode::ErrorUserNotFound, "user not found"))
}

/// A device's record, read linearizably.
pub async fn get_device(core: &Core, user: u64, device: u64) -> Result<Option<DeviceRecord>> {
    let g = core.read_barrier(core.shard_of_user(user)?).await?;
    Ok(g.reader.device(UserId(user), DeviceId(device))?)
}
