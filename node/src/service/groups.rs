//! Client-facing `GroupService`: groups, super groups and rooms, and their
//! members.
//!
//! Every change is one operation on the group's shard, which checks the
//! caller's role (members read and send; admins update and add/remove
//! members; the owner also sets roles, transfers and dissolves) and
//! announces it to the members with a notification. A user's own list of
//! groups (`ListMyGroups`, the conversation view, super groups at sign-in)
//! follows through the relay: eventually, normally within milliseconds.

use rim_proto::ErrorCode;
use rim_proto::ids::{GroupId, Seq, ShardId, UserId};
use rim_proto::store::{self, op::Op as O};
use rim_proto::v1::group_service_server::GroupService;
use rim_proto::v1::*;
use tonic::{Request, Response, Status};

use super::client::ClientSvc;
use super::ops::{self, check_id, op};
use crate::error::{Error, Result};
use crate::read::ShardView;

/// Members listed per page when the request asks for 0.
pub const DEFAULT_MEMBERS_PAGE: u32 = 100;
/// Most members listed per page.
pub const MAX_MEMBERS_PAGE: u32 = 500;
/// Most user ids in one membership change.
pub const MAX_USERS_PER_CALL: usize = 1_000;

fn counted(op: &'static str) {
    metrics::counter!("rim_group_ops_total", "op" => op).increment(1);
}

pub(super) fn not_found(g: u64) -> Error {
    Error::rejected(ErrorCode::ErrorGroupNotFound, format!("group {g} not found"))
}

/// Distinct ids in request order, at most [`MAX_USERS_PER_CALL`], none 0.
pub(super) fn user_ids(ids: Vec<u64>) -> Result<Vec<UserId>> {
    let mut seen = std::collections::HashSet::new();
    let ids: Vec<u64> = ids.into_iter().filter(|u| seen.insert(*u)).collect();
    if ids.len() > MAX_USERS_PER_CALL {
        return Err(Error::rejected(
            ErrorCode::ErrorBadRequest,
            format!("at most {MAX_USERS_PER_CALL} users per call"),
        ));
    }
    for &u in &ids {
        check_id("user_id", u)?;
    }
    Ok(ids.into_iter().map(UserId).collect())
}

/// User ids as the stored operations carry them.
pub(super) fn wire(ids: &[UserId]) -> Vec<u64> {
    ids.iter().map(|u| u.0).collect()
}

impl ClientSvc {
    pub(super) fn group_shard(&self, g: u64) -> Result<ShardId> {
        check_id("group_id", g)?;
        Ok(self.core.placement()?.shard_of_group(GroupId(g)))
    }

    /// The group's shard replica (linearizable) and its live record.
    pub(super) async fn load_group(&self, g: u64) -> Result<(ShardView<'_>, store::GroupRecord)> {
        let replica = self.core.view(self.group_shard(g)?).await?;
        let rec = replica.group(GroupId(g)).await?.filter(|r| !r.dissolved).ok_or_else(|| not_found(g))?;
        Ok((replica, rec))
    }

    /// The public view of a group just written, with its list head.
    async fn group_reply(&self, rec: store::GroupRecord) -> Result<Group> {
        let head = if rec.kind() == store::GroupKind::Small {
            Seq::ZERO
        } else {
            let replica = self.core.view(self.group_shard(rec.group_id)?).await?;
            Seq(replica.group_head(GroupId(rec.group_id)).await?.last_seq)
        };
        Ok(ops::group_view(rec, head))
    }

    pub(super) async fn propose_group(&self, g: u64, o: O) -> Result<store::op_result::Value> {
        let r = self.core.propose(self.group_shard(g)?, op(o)).await?;
        r.value.ok_or_else(|| Error::Internal("group operation returned nothing".into()))
    }

    pub(super) async fn members_changed(&self, g: u64, o: O) -> Result<Vec<u64>> {
        match self.propose_group(g, o).await? {
            store::op_result::Value::MembersChanged(m) => Ok(m.user_ids),
            _ => Err(Error::Internal("membership change returned something else".into())),
        }
    }
}

#[tonic::async_trait]
impl GroupService for ClientSvc {
    async fn create_group(
        &self,
        req: Request<CreateGroupRequest>,
    ) -> Result<Response<CreateGroupReply>, Status> {
        let c = self.caller(&req).await?;
        let r = req.into_inner();
        let kind = match GroupKind::try_from(r.kind) {
            Ok(GroupKind::Unspecified | GroupKind::Small) => GroupKind::Small,
            Ok(k) => k,
            Err(_) => return Err(Error::rejected(ErrorCode::ErrorBadRequest, "unknown group kind").into()),
        };
        let members = if kind == GroupKind::Room {
            Vec::new()
        } else {
            let mut ids = user_ids(r.member_ids)?;
            ids.retain(|u| *u != c.user);
            ops::ensure_users_exist(&self.core, &ids).await?;
            ids
        };
        let id = self.core.allocate_group().await?.0;
        let o = O::CreateGroup(store::CreateGroup {
            group_id: id,
            kind: kind as i32,
            owner_id: c.user.0,
            name: r.name,
            avatar_url: r.avatar_url,
            introduction: r.introduction,
            extra: r.extra,
            member_ids: wire(&members),
            retention: r
                .retention
                .map(|r| store::Retention { max_count: r.max_count, max_age_ms: r.max_age_ms }),
        });
        let rec = match self.propose_group(id, o).await {
            Ok(store::op_result::Value::Group(g)) => g,
            Ok(_) => return Err(Error::Internal("create returned no group".into()).into()),
            // A retried proposal of this fresh id that had already committed.
            Err(Error::Rejected { code: ErrorCode::ErrorAlreadyExists, .. }) => self.load_group(id).await?.1,
            Err(e) => return Err(e.into()),
        };
        counted("create");
        Ok(Response::new(CreateGroupReply { group: Some(self.group_reply(rec).await?) }))
    }

    async fn update_group(
        &self,
        req: Request<UpdateGroupRequest>,
    ) -> Result<Response<UpdateGroupReply>, Status> {
        let c = self.caller(&req).await?;
        let r = req.into_inner();
        let o = O::UpdateGroup(store::UpdateGroup {
            group_id: r.group_id,
            by_user_id: c.user.0,
            name: r.name,
            avatar_url: r.avatar_url,
            introduction: r.introduction,
            extra: r.extra,
        });
        let store::op_result::Value::Group(rec) = self.propose_group(r.group_id, o).await? else {
            return Err(Error::Internal("update returned no group".into()).into());
        };
        counted("update");
        Ok(Response::new(UpdateGroupReply { group: Some(self.group_reply(rec).await?) }))
    }

    async fn get_group(&self, req: Request<GetGroupRequest>) -> Result<Response<GetGroupReply>, Status> {
        let c = self.caller(&req).await?;
        let g = req.into_inner().group_id;
        let (replica, rec) = self.load_group(g).await?;
        let me = replica.member(GroupId(g), c.user).await?;
        if me.is_none() && rec.kind() != store::GroupKind::Room {
            return Err(Error::rejected(ErrorCode::ErrorNotGroupMember, "not a member of this group").into());
        }
        let head = replica.group_head(GroupId(g)).await?;
        Ok(Response::new(GetGroupReply {
            group: Some(ops::group_view(rec, Seq(head.last_seq))),
            me: me.map(|m| ops::member_view(m, None)),
        }))
    }

    async fn list_my_groups(
        &self,
        req: Request<ListMyGroupsRequest>,
    ) -> Result<Response<ListMyGroupsReply>, Status> {
        let c = self.caller(&req).await?;
        let placement = self.core.placement()?;
        let mine = self.core.view(placement.shard_of_user(c.user)).await?;
        let records = mine.user_groups(c.user).await?;
        let replicas =
            ops::views(&self.core, records.iter().map(|r| placement.shard_of_group(GroupId(r.group_id))))
                .await?;
        let mut groups = Vec::with_capacity(records.len());
        for r in records {
            let replica = &replicas[&placement.shard_of_group(GroupId(r.group_id))];
            let g = GroupId(r.group_id);
            let Some(rec) = replica.group(g).await?.filter(|x| !x.dissolved) else {
                continue;
            };
            // The own list of groups follows removals through the relay:
            // the group's shard has the last word.
            if replica.member(g, c.user).await?.is_none() {
                continue;
            }
            let head = replica.group_head(g).await?;
            groups.push(ops::group_view(rec, Seq(head.last_seq)));
        }
        groups.sort_by_key(|g| g.group_id);
        Ok(Response::new(ListMyGroupsReply { groups }))
    }

    async fn list_group_members(
        &self,
        req: Request<ListGroupMembersRequest>,
    ) -> Result<Response<ListGroupMembersReply>, Status> {
        let c = self.caller(&req).await?;
        let r = req.into_inner();
        let (replica, rec) = self.load_group(r.group_id).await?;
        let g = GroupId(r.group_id);
        if rec.kind() == store::GroupKind::Room {
            return Ok(Response::new(ListGroupMembersReply { members: Vec::new(), has_more: false }));
        }
        if replica.member(g, c.user).await?.is_none() {
            return Err(Error::rejected(ErrorCode::ErrorNotGroupMember, "not a member of this group").into());
        }
        let limit = if r.limit == 0 { DEFAULT_MEMBERS_PAGE } else { r.limit.min(MAX_MEMBERS_PAGE) };
        let (members, has_more) = replica.members(g, UserId(r.after_user_id), limit as usize).await?;
        let mut profiles = if r.with_profiles {
            let ids: Vec<UserId> = members.iter().map(|m| UserId(m.user_id)).collect();
            ops::profiles(&self.core, c.user, &ids).await
        } else {
            Default::default()
        };
        let members = members
            .into_iter()
            .map(|m| {
                let p = profiles.remove(&UserId(m.user_id));
                ops::member_view(m, p)
            })
            .collect();
        Ok(Response::new(ListGroupMembersReply { members, has_more }))
    }

    async fn add_group_members(
        &self,
        req: Request<AddGroupMembersRequest>,
    ) -> Result<Response<AddGroupMembersReply>, Status> {
        let c = self.caller(&req).await?;
        let r = req.into_inner();
        let ids = user_ids(r.user_ids)?;
        ops::ensure_users_exist(&self.core, &ids).await?;
        let o = O::AddMembers(store::AddMembers {
            group_id: r.group_id,
            by_user_id: c.user.0,
            user_ids: wire(&ids),
        });
        let added = self.members_changed(r.group_id, o).await?;
        counted("add_members");
        Ok(Response::new(AddGroupMembersReply { added_user_ids: added }))
    }

    async fn remove_group_members(
        &self,
        req: Request<RemoveGroupMembersRequest>,
    ) -> Result<Response<RemoveGroupMembersReply>, Status> {
        let c = self.caller(&req).await?;
        let r = req.into_inner();
        let ids = user_ids(r.user_ids)?;
        let o = O::RemoveMembers(store::RemoveMembers {
            group_id: r.group_id,
            by_user_id: c.user.0,
            user_ids: wire(&ids),
        });
        let removed = self.members_changed(r.group_id, o).await?;
        counted("remove_members");
        Ok(Response::new(RemoveGroupMembersReply { removed_user_ids: removed }))
    }

    async fn set_group_member(
        &self,
        req: Request<SetGroupMemberRequest>,
    ) -> Result<Response<SetGroupMemberReply>, Status> {
        let c = self.caller(&req).await?;
        let r = req.into_inner();
        check_id("user_id", r.user_id)?;
        if r.extra.is_some() {
            // The stored SetMember operation has no such field yet.
            return Err(Error::rejected(
                ErrorCode::ErrorBadRequest,
                "a member's extra cannot be set in this version",
            )
            .into());
        }
        let o = O::SetMember(store::SetMember {
            group_id: r.group_id,
            by_user_id: c.user.0,
            user_id: r.user_id,
            role: r.role,
            nickname: r.nickname,
        });
        self.propose_group(r.group_id, o).await?;
        counted("set_member");
        let (replica, _) = self.load_group(r.group_id).await?;
        let m = replica
            .member(GroupId(r.group_id), UserId(r.user_id))
            .await?
            .ok_or_else(|| Error::rejected(ErrorCode::ErrorNotGroupMember, "no longer a member"))?;
        Ok(Response::new(SetGroupMemberReply { member: Some(ops::member_view(m, None)) }))
    }

    async fn leave_group(
        &self,
        req: Request<LeaveGroupRequest>,
    ) -> Result<Response<LeaveGroupReply>, Status> {
        let c = self.caller(&req).await?;
        let g = req.into_inner().group_id;
        let o = O::RemoveMembers(store::RemoveMembers {
            group_id: g,
            by_user_id: c.user.0,
            user_ids: vec![c.user.0],
        });
        self.members_changed(g, o).await?;
        counted("leave");
        Ok(Response::new(LeaveGroupReply {}))
    }

    async fn transfer_group(
        &self,
        req: Request<TransferGroupRequest>,
    ) -> Result<Response<TransferGroupReply>, Status> {
        let c = self.caller(&req).await?;
        let r = req.into_inner();
        check_id("new_owner_id", r.new_owner_id)?;
        let o = O::SetMember(store::SetMember {
            group_id: r.group_id,
            by_user_id: c.user.0,
            user_id: r.new_owner_id,
            role: store::MemberRole::Owner as i32,
            nickname: None,
        });
        self.propose_group(r.group_id, o).await?;
        counted("transfer");
        Ok(Response::new(TransferGroupReply {}))
    }

    async fn dissolve_group(
        &self,
        req: Request<DissolveGroupRequest>,
    ) -> Result<Response<DissolveGroupReply>, Status> {
        let c = self.caller(&req).await?;
        let g = req.into_inner().group_id;
        let o = O::DissolveGroup(store::DissolveGroup { group_id: g, by_user_id: c.user.0 });
        self.propose_group(g, o).await?;
        counted("dissolve");
        Ok(Response::new(DissolveGroupReply {}))
    }
}
