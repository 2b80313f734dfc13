//! Client-facing `FriendService`: friend requests and the friend list.
//!
//! Every action is one `ChangeFriend` in the caller's shard; the other
//! user's side follows when the notification reaches their list through the
//! relay (exactly once, in order), so the two sides agree eventually,
//! normally within milliseconds.

use rim_proto::ErrorCode;
use rim_proto::ids::UserId;
use rim_proto::store::{self, FriendAction, op::Op as O};
use rim_proto::v1::friend_service_server::FriendService;
use rim_proto::v1::*;
use tonic::{Request, Response, Status};

use super::client::ClientSvc;
use super::ops::{self, check_id, op};
use crate::error::{Error, Result};

fn action_name(a: FriendAction) -> &'static str {
    match a {
        FriendAction::Request => "request",
        FriendAction::Accept => "accept",
        FriendAction::Reject => "reject",
        FriendAction::Delete => "delete",
        FriendAction::Unspecified => "unspecified",
    }
}

impl ClientSvc {
    /// Runs a friend action of `user` towards `friend`; returns the caller's
    /// record after it (`None`: the relation is gone).
    async fn change_friend(
        &self,
        user: UserId,
        friend: UserId,
        action: FriendAction,
        remarks: String,
        description: String,
    ) -> Result<Option<store::FriendRecord>> {
        check_id("friend_id", friend.0)?;
        if friend == user {
            return Err(Error::rejected(ErrorCode::ErrorBadRequest, "a user cannot befriend themselves"));
        }
        let o = O::ChangeFriend(store::ChangeFriend {
            user_id: user.0,
            friend_id: friend.0,
            action: action as i32,
            remarks,
            description,
        });
        let r = self.core.propose(self.core.shard_of_user(user)?, op(o)).await?;
        metrics::counter!("rim_friend_ops_total", "op" => action_name(action)).increment(1);
        match r.value {
            Some(store::op_result::Value::Friend(f)) => Ok(Some(f)),
            None => Ok(None),
            Some(_) => Err(Error::Internal("friend action returned something else".into())),
        }
    }

    /// The caller's record after an action that must leave one, with the
    /// friend's profile (best effort).
    async fn friend_reply(&self, rec: Option<store::FriendRecord>) -> Result<Friend> {
        let rec = rec.ok_or_else(|| Error::Internal("friend action returned no record".into()))?;
        let friend = UserId(rec.friend_id);
        let mut profile = ops::profiles(&self.core, &[friend]).await;
        let p = profile.remove(&friend);
        Ok(ops::friend_view(rec, p))
    }
}

#[tonic::async_trait]
impl FriendService for ClientSvc {
    async fn send_friend_request(
        &self,
        req: Request<SendFriendRequestRequest>,
    ) -> Result<Response<SendFriendRequestReply>, Status> {
        let c = self.caller(&req).await?;
        let r = req.into_inner();
        check_id("friend_id", r.friend_id)?;
        ops::ensure_user_exists(&self.core, UserId(r.friend_id)).await?;
        let rec = self
            .change_friend(c.user, UserId(r.friend_id), FriendAction::Request, r.remarks, r.description)
            .await?;
        Ok(Response::new(SendFriendRequestReply { friend: Some(self.friend_reply(rec).await?) }))
    }

    async fn accept_friend_request(
        &self,
        req: Request<AcceptFriendRequestRequest>,
    ) -> Result<Response<AcceptFriendRequestReply>, Status> {
        let c = self.caller(&req).await?;
        let r = req.into_inner();
        let rec = self
            .change_friend(c.user, UserId(r.friend_id), FriendAction::Accept, r.remarks, String::new())
            .await?;
        Ok(Response::new(AcceptFriendRequestReply { friend: Some(self.friend_reply(rec).await?) }))
    }

    async fn reject_friend_request(
        &self,
        req: Request<RejectFriendRequestRequest>,
    ) -> Result<Response<RejectFriendRequestReply>, Status> {
        let c = self.caller(&req).await?;
        let r = req.into_inner();
        self.change_friend(c.user, UserId(r.friend_id), FriendAction::Reject, String::new(), String::new())
            .await?;
        Ok(Response::new(RejectFriendRequestReply {}))
    }

    async fn delete_friend(
        &self,
        req: Request<DeleteFriendRequest>,
    ) -> Result<Response<DeleteFriendReply>, Status> {
        let c = self.caller(&req).await?;
        let r = req.into_inner();
        self.change_friend(c.user, UserId(r.friend_id), FriendAction::Delete, String::new(), String::new())
            .await?;
        Ok(Response::new(DeleteFriendReply {}))
    }

    async fn set_friend(&self, req: Request<SetFriendRequest>) -> Result<Response<SetFriendReply>, Status> {
        let c = self.caller(&req).await?;
        let r = req.into_inner();
        check_id("friend_id", r.friend_id)?;
        let shard = self.core.shard_of_user(c.user)?;
        let o = O::SetFriend(store::SetFriend {
            user_id: c.user.0,
            friend_id: r.friend_id,
            status: store::FriendStatus::Unspecified as i32,
            remarks: r.remarks,
            extra: r.extra,
        });
        let res = self.core.propose(shard, op(o)).await?;
        metrics::counter!("rim_friend_ops_total", "op" => "set").increment(1);
        let rec = match res.value {
            Some(store::op_result::Value::Friend(f)) => Some(f),
            // The record as applied (this replica waits for the write).
            _ => {
                let g = self.core.view(shard).await?;
                let friends = g.friends(c.user).await?;
                friends.into_iter().find(|f| f.friend_id == r.friend_id)
            }
        };
        let rec = rec.ok_or_else(|| Error::rejected(ErrorCode::ErrorNotFriend, "no such friend"))?;
        Ok(Response::new(SetFriendReply { friend: Some(self.friend_reply(Some(rec)).await?) }))
    }

    async fn list_friends(
        &self,
        req: Request<ListFriendsRequest>,
    ) -> Result<Response<ListFriendsReply>, Status> {
        let c = self.caller(&req).await?;
        let include_pending = req.into_inner().include_pending;
        let g = self.core.view(self.core.shard_of_user(c.user)?).await?;
        let mut friends: Vec<store::FriendRecord> = g
            .friends(c.user)
            .await?
            .into_iter()
            .filter(|f| include_pending || f.status() == store::FriendStatus::Accepted)
            .collect();
        friends.sort_by_key(|f| f.friend_id);
        let ids: Vec<UserId> = friends.iter().map(|f| UserId(f.friend_id)).collect();
        let mut profiles = ops::profiles(&self.core, &ids).await;
        let friends = friends
            .into_iter()
            .map(|f| {
                let p = profiles.remove(&UserId(f.friend_id));
                ops::friend_view(f, p)
            })
            .collect();
        Ok(Response::new(ListFriendsReply { friends }))
    }
}
