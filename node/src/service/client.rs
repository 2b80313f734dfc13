//! Client-facing gRPC: sign-in and accounts, users, messages.
//!
//! Every call except `Register`, `SignIn` and `SignInByPhone` carries
//! `user_id`, `device_id` and `token` in its metadata; the token is checked
//! (signature, expiry, and the device's token version on a local replica)
//! before anything else happens. An app's credential may stand in for the
//! token (an app-signed JWT as `token` or `authorization: Bearer`, without
//! the ids; or, with an auth callback, the app's ids and token):
//! `identity::app_caller`.

use std::sync::Arc;

use rim_proto::ErrorCode;
use rim_proto::ids::{DeviceId, Seq, UserId};
use rim_proto::metadata::{DEVICE_ID_METADATA_KEY, TOKEN_METADATA_KEY, USER_ID_METADATA_KEY};
use rim_proto::store::{self, op::Op as O};
use rim_proto::v1::auth_service_server::AuthService;
use rim_proto::v1::message_service_server::MessageService;
use rim_proto::v1::user_service_server::UserService;
use rim_proto::v1::*;
use tonic::{Request, Response, Status};

use super::accounts;
use super::conversation;
use super::ops::{self, check_id};
use crate::core::Core;
use crate::error::{Error, Result};

/// The client-facing services of a node.
#[derive(Debug, Clone)]
pub struct ClientSvc {
    /// Shared node state.
    pub core: Arc<Core>,
}

/// Who is calling, from verified metadata.
#[derive(Clone, Copy, Debug)]
pub(super) struct Caller {
    /// The signed-in user.
    pub user: UserId,
    /// The signed-in device.
    pub device: DeviceId,
}

fn meta_u64<T>(req: &Request<T>, key: &str) -> Result<u64> {
    req.metadata().get(key).and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok()).ok_or_else(|| {
        Error::rejected(ErrorCode::ErrorUnauthenticated, format!("metadata {key} missing or invalid"))
    })
}

impl ClientSvc {
    /// The caller, after checking the token in the metadata (`token`, or
    /// `authorization: Bearer <token>`). An app's credential (an app-signed
    /// JWT, or a token for the app's auth callback) is resolved like at a
    /// gateway's sign-in (`identity.rs`); a rim token needs `user_id` and
    /// `device_id` too.
    pub(super) async fn caller<T>(&self, req: &Request<T>) -> Result<Caller> {
        let meta = |key: &str| req.metadata().get(key).and_then(|v| v.to_str().ok());
        let bearer = meta("authorization").and_then(|v| v.strip_prefix("Bearer "));
        let token = bearer
            .or_else(|| meta(TOKEN_METADATA_KEY))
            .ok_or_else(|| Error::rejected(ErrorCode::ErrorUnauthenticated, "metadata token missing"))?;
        let app_ids = || Ok((meta_u64(req, USER_ID_METADATA_KEY)?, meta_u64(req, DEVICE_ID_METADATA_KEY)?));
        if let Some((user, device)) = super::identity::app_caller(&self.core, token, app_ids).await? {
            return Ok(Caller { user, device });
        }
        let user = UserId(meta_u64(req, USER_ID_METADATA_KEY)?);
        let device = DeviceId(meta_u64(req, DEVICE_ID_METADATA_KEY)?);
        self.core.verify_token(user, device, token).await?;
        Ok(Caller { user, device })
    }

    /// Hashes a password on a blocking thread, in one of the node's
    /// bounded hashing slots.
    async fn hash(&self, password: String) -> Result<String> {
        let _slot = self.core.throttle.hashing().await?;
        tokio::task::spawn_blocking(move || crate::auth::hash_password(&password))
            .await
            .map_err(|e| Error::Internal(e.to_string()))?
            .map_err(Error::Internal)
    }

    /// Whether `password` matches `phc`, checked like [`ClientSvc::hash`].
    async fn password_ok(&self, password: String, phc: String) -> Result<bool> {
        let _slot = self.core.throttle.hashing().await?;
        tokio::task::spawn_blocking(move || crate::auth::verify_password(&password, &phc))
            .await
            .map_err(|e| Error::Internal(e.to_string()))
    }

    /// Revokes every device of the caller but the calling one.
    async fn revoke_other_devices(&self, c: Caller) -> Result<()> {
        let g = self.core.view(self.core.shard_of_user(c.user)?).await?;
        for d in g.devices(c.user).await? {
            if d.device_id != c.device.0 {
                ops::revoke(&self.core, c.user, DeviceId(d.device_id)).await?;
            }
        }
        Ok(())
    }

    /// Signs `user` in on `device` (`None`: a new device).
    async fn sign_in_device(
        &self,
        user: UserId,
        device: Option<DeviceId>,
        info: Option<DeviceInfo>,
    ) -> Result<SignInReply> {
        let (device, is_new_device) = match device {
            None => (self.core.allocate_device().await?, true),
            Some(d) => (d, ops::get_device(&self.core, user, d).await?.is_none()),
        };
        let (_, token, token_expires_ms) = ops::register_device(&self.core, user, device, info, "").await?;
        Ok(SignInReply {
            user_id: user.0,
            device_id: device.0,
            token,
            token_expires_ms,
            is_new_user: false,
            is_new_device,
        })
    }
}

/// A device id from a request: 0 asks for a new device.
fn wire_device(id: u64) -> Option<DeviceId> {
    (id != 0).then_some(DeviceId(id))
}

fn valid_username(name: &str) -> bool {
    (1..=64).contains(&name.len()) && name.chars().all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
}

/// Passwords: 8..=256 bytes (the `.proto` contract).
fn check_password(password: &str) -> Result<()> {
    if !(8..=256).contains(&password.len()) {
        return Err(Error::rejected(ErrorCode::ErrorBadRequest, "password: 8-256 bytes"));
    }
    Ok(())
}

/// The client's address, for per-address limits (none in in-process tests).
fn peer_ip<T>(req: &Request<T>) -> Option<std::net::IpAddr> {
    req.remote_addr().map(|a| a.ip())
}

#[tonic::async_trait]
impl AuthService for ClientSvc {
    async fn register(&self, req: Request<RegisterRequest>) -> Result<Response<RegisterReply>, Status> {
        self.core.throttle.auth(peer_ip(&req), None)?;
        let r = req.into_inner();
        if !valid_username(&r.username) {
            return Err(
                Error::rejected(ErrorCode::ErrorBadRequest, "username: 1-64 of [A-Za-z0-9_.-]").into()
            );
        }
        check_password(&r.password)?;
        let mut user = store::CreateUser {
            username: r.username,
            nickname: r.nickname,
            avatar_url: r.avatar_url,
            extra: r.extra,
            ..Default::default()
        };
        // Whatever the state machine would refuse is refused before the
        // name is claimed: a refused registration must not burn the name.
        accounts::check_create(&self.core, &user)?;
        let name = format!("u:{}", user.username);
        let orphan = match accounts::owner(&self.core, &name).await? {
            accounts::Owner::User(_) => {
                return Err(Error::rejected(ErrorCode::ErrorAlreadyExists, "username taken").into());
            }
            accounts::Owner::Orphan(u) => Some(u),
            accounts::Owner::Nobody => None,
        };
        user.password_hash = self.hash(r.password).await?;
        let user_id = accounts::create_user(&self.core, &name, user, orphan).await?;
        Ok(Response::new(RegisterReply { user_id: user_id.0 }))
    }

    async fn sign_in(&self, req: Request<SignInRequest>) -> Result<Response<SignInReply>, Status> {
        let ip = peer_ip(&req);
        let r = req.into_inner();
        let denied =
            || Status::from(Error::rejected(ErrorCode::ErrorUnauthenticated, "wrong username or password"));
        if !valid_username(&r.username) || r.password.len() > 256 {
            return Err(denied());
        }
        let name = format!("u:{}", r.username);
        self.core.throttle.auth(ip, Some(&name))?;
        let Some(user) = accounts::account(&self.core, &name).await? else { return Err(denied()) };
        let rec = match ops::get_user(&self.core, user).await {
            Ok(rec) => rec,
            // A claim whose user was never created.
            Err(Error::Rejected { code: ErrorCode::ErrorUserNotFound, .. }) => return Err(denied()),
            Err(e) => return Err(e.into()),
        };
        if rec.password_hash.is_empty() || !self.password_ok(r.password, rec.password_hash).await? {
            return Err(denied());
        }
        Ok(Response::new(self.sign_in_device(user, wire_device(r.device_id), r.device).await?))
    }

    async fn sign_in_by_phone(
        &self,
        req: Request<SignInByPhoneRequest>,
    ) -> Result<Response<SignInReply>, Status> {
        let ip = peer_ip(&req);
        let r = req.into_inner();
        let name = format!("p:{}", r.phone);
        if r.phone.is_empty() || r.phone.len() > 32 {
            return Err(Error::rejected(ErrorCode::ErrorUnauthenticated, "wrong phone or code").into());
        }
        self.core.throttle.auth(ip, Some(&name))?;
        if !self.core.codes.verify(&r.phone, &r.code) {
            return Err(Error::rejected(ErrorCode::ErrorUnauthenticated, "wrong phone or code").into());
        }
        let (user, is_new_user) = match accounts::owner(&self.core, &name).await? {
            accounts::Owner::User(u) => (u, false),
            owner => {
                let orphan = match owner {
                    accounts::Owner::Orphan(u) => Some(u),
                    _ => None,
                };
                // The nickname is public: never the number itself.
                let last4 = r.phone.char_indices().rev().nth(3).map_or(&r.phone[..], |(i, _)| &r.phone[i..]);
                let u = store::CreateUser {
                    phone: r.phone.clone(),
                    nickname: format!("user …{last4}"),
                    ..Default::default()
                };
                accounts::check_create(&self.core, &u)?;
                (accounts::create_user(&self.core, &name, u, orphan).await?, true)
            }
        };
        let mut reply = self.sign_in_device(user, wire_device(r.device_id), r.device).await?;
        reply.is_new_user = is_new_user;
        Ok(Response::new(reply))
    }

    async fn register_device(
        &self,
        req: Request<RegisterDeviceRequest>,
    ) -> Result<Response<RegisterDeviceReply>, Status> {
        let c = self.caller(&req).await?;
        let device = self.core.allocate_device().await?;
        let (_, token, token_expires_ms) =
            ops::register_device(&self.core, c.user, device, req.into_inner().device, "").await?;
        Ok(Response::new(RegisterDeviceReply { device_id: device.0, token, token_expires_ms }))
    }

    async fn list_devices(
        &self,
        req: Request<ListDevicesRequest>,
    ) -> Result<Response<ListDevicesReply>, Status> {
        let c = self.caller(&req).await?;
        let g = self.core.view(self.core.shard_of_user(c.user)?).await?;
        let devices = g.devices(c.user).await?;
        Ok(Response::new(ListDevicesReply { devices: devices.into_iter().map(ops::device_view).collect() }))
    }

    async fn logout(&self, req: Request<LogoutRequest>) -> Result<Response<LogoutReply>, Status> {
        let c = self.caller(&req).await?;
        ops::revoke(&self.core, c.user, c.device).await?;
        Ok(Response::new(LogoutReply {}))
    }

    async fn revoke_device(
        &self,
        req: Request<RevokeDeviceRequest>,
    ) -> Result<Response<RevokeDeviceReply>, Status> {
        let c = self.caller(&req).await?;
        let device = req.into_inner().device_id;
        check_id("device_id", device)?;
        ops::revoke(&self.core, c.user, DeviceId(device)).await?;
        Ok(Response::new(RevokeDeviceReply {}))
    }
}

#[tonic::async_trait]
impl UserService for ClientSvc {
    async fn get_user(&self, req: Request<GetUserRequest>) -> Result<Response<GetUserReply>, Status> {
        let c = self.caller(&req).await?;
        let id = match req.into_inner().user_id {
            0 => c.user,
            id => UserId(id),
        };
        let u = ops::get_user(&self.core, id).await?;
        Ok(Response::new(GetUserReply { user: Some(ops::user_view(u, c.user)) }))
    }

    async fn get_users(&self, req: Request<GetUsersRequest>) -> Result<Response<GetUsersReply>, Status> {
        let c = self.caller(&req).await?;
        let ids = req.into_inner().user_ids;
        if ids.len() > 100 {
            return Err(Error::rejected(ErrorCode::ErrorBadRequest, "at most 100 users per call").into());
        }
        let mut users = Vec::new();
        for id in ids {
            match ops::get_user(&self.core, UserId(id)).await {
                Ok(u) => users.push(ops::user_view(u, c.user)),
                Err(Error::Rejected {
                    code: ErrorCode::ErrorUserNotFound | ErrorCode::ErrorInvalidId,
                    ..
                }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(Response::new(GetUsersReply { users }))
    }

    async fn update_user(
        &self,
        req: Request<UpdateUserRequest>,
    ) -> Result<Response<UpdateUserReply>, Status> {
        let c = self.caller(&req).await?;
        let r = req.into_inner();
        let password_hash = match r.new_password {
            Some(pw) => {
                check_password(&pw)?;
                let rec = ops::get_user(&self.core, c.user).await?;
                if !rec.password_hash.is_empty()
                    && !self.password_ok(r.old_password, rec.password_hash).await?
                {
                    return Err(
                        Error::rejected(ErrorCode::ErrorUnauthenticated, "old password is wrong").into()
                    );
                }
                let hash = self.hash(pw).await?;
                if !r.keep_other_devices {
                    // Before the change: a failure leaves the old password
                    // valid, so the client can simply retry.
                    self.revoke_other_devices(c).await?;
                }
                Some(hash)
            }
            None => None,
        };
        let o = O::UpdateUser(store::UpdateUser {
            user_id: c.user.0,
            nickname: r.nickname,
            avatar_url: r.avatar_url,
            extra: r.extra,
            password_hash,
        });
        let res = self.core.propose(self.core.shard_of_user(c.user)?, store::Op { op: Some(o) }).await?;
        let Some(store::op_result::Value::User(u)) = res.value else {
            return Err(Error::Internal("update returned no user".into()).into());
        };
        Ok(Response::new(UpdateUserReply { user: Some(ops::user_view(u, c.user)) }))
    }

    async fn find_user(&self, req: Request<FindUserRequest>) -> Result<Response<FindUserReply>, Status> {
        let c = self.caller(&req).await?;
        let name = req.into_inner().username;
        let not_found =
            || Status::from(Error::rejected(ErrorCode::ErrorUserNotFound, "no user has this name"));
        if !valid_username(&name) {
            return Err(not_found());
        }
        let Some(user) = accounts::account(&self.core, &format!("u:{name}")).await? else {
            return Err(not_found());
        };
        let u = ops::get_user(&self.core, user).await?;
        Ok(Response::new(FindUserReply { user: Some(ops::user_view(u, c.user)) }))
    }
}

#[tonic::async_trait]
impl MessageService for ClientSvc {
    async fn send_message(&self, req: Request<SendInput>) -> Result<Response<SendOutput>, Status> {
        let c = self.caller(&req).await?;
        let mut input = req.into_inner();
        if input.conversation_kind == ConversationKind::Unspecified as i32 {
            input.conversation_kind = ConversationKind::User as i32;
        }
        Ok(Response::new(ops::send(&self.core, c.user, c.device, input).await?))
    }

    async fn send_group_message(&self, req: Request<SendInput>) -> Result<Response<SendOutput>, Status> {
        let c = self.caller(&req).await?;
        let mut input = req.into_inner();
        if input.conversation_kind == ConversationKind::Unspecified as i32 {
            input.conversation_kind = ConversationKind::Group as i32;
        }
        Ok(Response::new(ops::send(&self.core, c.user, c.device, input).await?))
    }

    async fn sync(&self, req: Request<SyncInput>) -> Result<Response<SyncOutput>, Status> {
        let c = self.caller(&req).await?;
        Ok(Response::new(ops::sync(&self.core, c.user, req.into_inner()).await?))
    }

    async fn sync_group(&self, req: Request<SyncGroupInput>) -> Result<Response<SyncGroupOutput>, Status> {
        let c = self.caller(&req).await?;
        Ok(Response::new(ops::sync_group(&self.core, c.user, req.into_inner()).await?))
    }

    async fn ack(&self, req: Request<AckInput>) -> Result<Response<AckOutput>, Status> {
        let c = self.caller(&req).await?;
        Ok(Response::new(ops::ack(&self.core, c.user, c.device, Seq(req.into_inner().seq)).await?))
    }

    async fn recall(&self, req: Request<RecallInput>) -> Result<Response<SendOutput>, Status> {
        let c = self.caller(&req).await?;
        Ok(Response::new(ops::recall(&self.core, c.user, c.device, req.into_inner()).await?))
    }

    async fn list_conversations(
        &self,
        req: Request<ListConversationsRequest>,
    ) -> Result<Response<ListConversationsReply>, Status> {
        let c = self.caller(&req).await?;
        Ok(Response::new(conversation::list(&self.core, c.user, req.into_inner()).await?))
    }

    async fn mark_read(&self, req: Request<ReadInput>) -> Result<Response<ReadOutput>, Status> {
        let c = self.caller(&req).await?;
        Ok(Response::new(ops::mark_read(&self.core, c.user, c.device, req.into_inner()).await?))
    }
}
