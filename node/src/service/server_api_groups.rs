//! Group administration of the server API (scope `groups`,
//! docs/server-api.md): the client API's group operations
//! (`service::groups`, `rim-raft-store` `im::group`), acting for the app.
//!
//! # Acting user
//!
//! The stored operations check the acting user's role. The app names it:
//! `by_user_id`, or 0 for the group's owner (read linearizably first), so a
//! trusted backend may do whatever the owner may, and a named member only
//! what that member may.
//!
//! # Idempotency
//!
//! Every write first claims its idempotency key through Raft
//! (`ClaimIdempotency` on the shard of the key): the record holds the
//! SHA-256 of the method and the request without its key, and the group
//! id. The first claim stores it; a retry with the same request gets the
//! record back and acts on the same group; another request under the key is
//! refused `ERROR_ALREADY_EXISTS` before anything is written. The action
//! itself is then idempotent in effect: creating a group under a claimed id
//! that exists answers that group, adding or removing members that were
//! already added or removed changes nothing, a dissolved group stays
//! dissolved.

use rim_proto::ErrorCode;
use rim_proto::ids::{GroupId, Seq, UserId};
use rim_proto::server_api::*;
use rim_proto::store::{self, op::Op as O};
use rim_proto::v1;
use sha2::{Digest, Sha256};

use super::client::ClientSvc;
use super::groups::{DEFAULT_MEMBERS_PAGE, MAX_MEMBERS_PAGE, not_found, user_ids, wire};
use super::ops::{self, check_id};
use super::server_api::{ServerApiSvc, bad, check_idempotency_key};
use crate::credentials::Role;
use crate::error::{Error, Result};

/// The digest a claim records: the method and the request without its key.
fn digest(method: &str, request: &impl prost::Message) -> Vec<u8> {
    let mut h = Sha256::new();
    h.update(method.as_bytes());
    h.update([0]);
    h.update(request.encode_to_vec());
    h.finalize().to_vec()
}

/// The server API's view of a group record.
fn group_info(g: store::GroupRecord) -> GroupInfo {
    let v = ops::group_view(g, Seq::ZERO);
    GroupInfo {
        group_id: v.group_id,
        kind: v.kind,
        name: v.name,
        avatar_url: v.avatar_url,
        introduction: v.introduction,
        extra: String::from_utf8_lossy(&v.extra).into_owned(),
        owner_user_id: v.owner_id,
        member_count: v.member_count,
        created_ms: v.created_ms,
        updated_ms: v.updated_ms,
    }
}

fn changed(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

impl ServerApiSvc {
    fn client(&self) -> ClientSvc {
        ClientSvc { core: self.core.clone() }
    }

    /// Claims `key` for `request` (digest of `method` and the request
    /// without its key), offering `value`; the value the key holds.
    async fn claim(&self, method: &str, key: &str, request: &impl prost::Message, value: u64) -> Result<u64> {
        let shard = self.core.placement()?.shard_of_account(&format!("idem:{key}"));
        let o = O::ClaimIdempotency(store::ClaimIdempotency {
            key: key.to_string(),
            request_digest: digest(method, request).into(),
            value,
        });
        match self.core.propose(shard, ops::op(o)).await?.value {
            Some(store::op_result::Value::Sent(r)) => Ok(r.message_id),
            _ => Err(Error::Internal("an idempotency claim returned nothing".into())),
        }
    }

    /// The acting user: `by`, or the group's owner when 0.
    async fn acting(&self, group: u64, by: u64) -> Result<u64> {
        if by != 0 {
            return Ok(by);
        }
        Ok(self.client().load_group(group).await?.1.owner_id)
    }

    /// CreateGroup (scope `groups`).
    pub async fn create_group(&self, role: Option<&Role>, r: CreateGroupRequest) -> Result<CreateGroupReply> {
        self.authorize(role, "groups")?;
        check_idempotency_key(&r.idempotency_key)?;
        let kind = match v1::GroupKind::try_from(r.kind) {
            Ok(v1::GroupKind::Unspecified | v1::GroupKind::Small) => v1::GroupKind::Small,
            Ok(v1::GroupKind::Super) => v1::GroupKind::Super,
            _ => return Err(bad("kind must be 0 or 1 (small) or 2 (super)")),
        };
        let owner = self.user_of(r.owner_user_id, &r.owner_external_user_id).await?;
        let mut members = user_ids(r.member_user_ids.clone())?;
        members.retain(|u| *u != owner);
        ops::ensure_users_exist(&self.core, &members).await?;
        let create = |group_id: u64| store::CreateGroup {
            group_id,
            kind: kind as i32,
            owner_id: owner.0,
            name: r.name.clone(),
            avatar_url: r.avatar_url.clone(),
            introduction: r.introduction.clone(),
            extra: r.extra.clone().into_bytes().into(),
            member_ids: wire(&members),
            retention: None,
        };
        // Sizes first, so a refused request claims no key.
        self.core.limits().check_op(&ops::op(O::CreateGroup(create(u64::MAX))))?;
        let fresh = self.core.allocate_group().await?.0;
        let unkeyed = CreateGroupRequest { idempotency_key: String::new(), ..r.clone() };
        let id = self.claim("CreateGroup", &r.idempotency_key, &unkeyed, fresh).await?;
        let client = self.client();
        let rec = match client.propose_group(id, O::CreateGroup(create(id))).await {
            Ok(store::op_result::Value::Group(g)) => g,
            Ok(_) => return Err(Error::Internal("create returned no group".into())),
            // A retry: the group of the claimed id exists.
            Err(Error::Rejected { code: ErrorCode::ErrorAlreadyExists, .. }) => {
                client.load_group(id).await?.1
            }
            Err(e) => return Err(e),
        };
        metrics::counter!("rim_group_ops_total", "op" => "server_create").increment(1);
        Ok(CreateGroupReply { group: Some(group_info(rec)) })
    }

    /// AddGroupMembers (scope `groups`).
    pub async fn add_group_members(
        &self,
        role: Option<&Role>,
        r: AddGroupMembersRequest,
    ) -> Result<AddGroupMembersReply> {
        self.authorize(role, "groups")?;
        check_idempotency_key(&r.idempotency_key)?;
        check_id("group_id", r.group_id)?;
        let ids = user_ids(r.user_ids.clone())?;
        if ids.is_empty() {
            return Err(bad("user_ids must name at least one user"));
        }
        ops::ensure_users_exist(&self.core, &ids).await?;
        let by = self.acting(r.group_id, r.by_user_id).await?;
        let unkeyed = AddGroupMembersRequest { idempotency_key: String::new(), ..r.clone() };
        self.claim("AddGroupMembers", &r.idempotency_key, &unkeyed, r.group_id).await?;
        let o =
            O::AddMembers(store::AddMembers { group_id: r.group_id, by_user_id: by, user_ids: wire(&ids) });
        let added = self.client().members_changed(r.group_id, o).await?;
        Ok(AddGroupMembersReply { added_user_ids: added })
    }

    /// RemoveGroupMembers (scope `groups`).
    pub async fn remove_group_members(
        &self,
        role: Option<&Role>,
        r: RemoveGroupMembersRequest,
    ) -> Result<RemoveGroupMembersReply> {
        self.authorize(role, "groups")?;
        check_idempotency_key(&r.idempotency_key)?;
        check_id("group_id", r.group_id)?;
        let ids = user_ids(r.user_ids.clone())?;
        if ids.is_empty() {
            return Err(bad("user_ids must name at least one user"));
        }
        let by = self.acting(r.group_id, r.by_user_id).await?;
        let unkeyed = RemoveGroupMembersRequest { idempotency_key: String::new(), ..r.clone() };
        self.claim("RemoveGroupMembers", &r.idempotency_key, &unkeyed, r.group_id).await?;
        let o = O::RemoveMembers(store::RemoveMembers {
            group_id: r.group_id,
            by_user_id: by,
            user_ids: wire(&ids),
        });
        let removed = self.client().members_changed(r.group_id, o).await?;
        Ok(RemoveGroupMembersReply { removed_user_ids: removed })
    }

    /// UpdateGroup (scope `groups`): empty fields unchanged.
    pub async fn update_group(&self, role: Option<&Role>, r: UpdateGroupRequest) -> Result<UpdateGroupReply> {
        self.authorize(role, "groups")?;
        check_idempotency_key(&r.idempotency_key)?;
        check_id("group_id", r.group_id)?;
        let by = self.acting(r.group_id, r.by_user_id).await?;
        let unkeyed = UpdateGroupRequest { idempotency_key: String::new(), ..r.clone() };
        let o = O::UpdateGroup(store::UpdateGroup {
            group_id: r.group_id,
            by_user_id: by,
            name: changed(r.name),
            avatar_url: changed(r.avatar_url),
            introduction: changed(r.introduction),
            extra: changed(r.extra).map(|e| e.into_bytes().into()),
        });
        self.core.limits().check_op(&ops::op(o.clone()))?;
        self.claim("UpdateGroup", &r.idempotency_key, &unkeyed, r.group_id).await?;
        let store::op_result::Value::Group(rec) = self.client().propose_group(r.group_id, o).await? else {
            return Err(Error::Internal("update returned no group".into()));
        };
        Ok(UpdateGroupReply { group: Some(group_info(rec)) })
    }

    /// DissolveGroup (scope `groups`): a retry of a dissolution that
    /// happened answers as the first call.
    pub async fn dissolve_group(
        &self,
        role: Option<&Role>,
        r: DissolveGroupRequest,
    ) -> Result<DissolveGroupReply> {
        self.authorize(role, "groups")?;
        check_idempotency_key(&r.idempotency_key)?;
        let g = r.group_id;
        check_id("group_id", g)?;
        let client = self.client();
        let replica = self.core.view(client.group_shard(g)?).await?;
        let rec = replica.group(GroupId(g)).await?.ok_or_else(|| not_found(g))?;
        let unkeyed = DissolveGroupRequest { idempotency_key: String::new(), ..r.clone() };
        self.claim("DissolveGroup", &r.idempotency_key, &unkeyed, g).await?;
        if rec.dissolved {
            return Ok(DissolveGroupReply { group_id: g });
        }
        let by = if r.by_user_id == 0 { rec.owner_id } else { r.by_user_id };
        let o = O::DissolveGroup(store::DissolveGroup { group_id: g, by_user_id: by });
        client.propose_group(g, o).await?;
        Ok(DissolveGroupReply { group_id: g })
    }

    /// GetGroup (scope `groups`): the group and a page of its members.
    pub async fn get_group(&self, role: Option<&Role>, r: GetGroupRequest) -> Result<GetGroupReply> {
        self.authorize(role, "groups")?;
        let client = self.client();
        let (replica, rec) = client.load_group(r.group_id).await?;
        let limit = if r.limit == 0 { DEFAULT_MEMBERS_PAGE } else { r.limit.min(MAX_MEMBERS_PAGE) };
        let (members, has_more) =
            replica.members(GroupId(r.group_id), UserId(r.after_user_id), limit as usize).await?;
        let members = members
            .into_iter()
            .map(|m| GroupMemberInfo {
                user_id: m.user_id,
                role: m.role,
                nickname: m.nickname,
                joined_ms: m.joined_ms,
            })
            .collect();
        Ok(GetGroupReply { group: Some(group_info(rec)), members, has_more })
    }
}
