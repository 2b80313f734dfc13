//! The server API (`rim.server.v1.ServerApi`): what an app's backend calls
//! to manage its users, their devices and sessions, and to push
//! (docs/server-api.md). One definition, two transports: gRPC on the
//! internal listener ([`ServerApi`] below) and JSON over HTTP
//! ([`crate::http_api`]); both call the same methods of [`ServerApiSvc`],
//! which check the caller's scope first.
//!
//! # Invariants
//!
//! * Every write names an idempotency key (1..=[`MAX_IDEMPOTENCY_KEY_BYTES`]
//!   bytes). Users and devices are idempotent by construction: a user is
//!   the owner of the account name `x:<external_user_id>` (claimed once
//!   through Raft, the same name app-signed tokens sign in with), a device
//!   the one registered under its external id (mapped once by the state
//!   machine). Persisted pushes use the key as their `client_msg_id`, the
//!   state machine's existing deduplication: a retry stores nothing new and
//!   returns the first message.
//! * Revocation is the client API's: a Raft write bumping the device's
//!   token version. Its apply makes the shard leader's push streams kick the
//!   device's connections at every gateway, and every token issued before
//!   is refused from then on.
//! * Nothing here keeps state of its own: each method is a delegation to the
//!   code the client API and the push API already use.

use std::sync::Arc;

use rim_proto::ErrorCode;
use rim_proto::ids::{DeviceId, UserId};
use rim_proto::server_api::server_api_server::ServerApi;
use rim_proto::server_api::*;
use rim_proto::store::{self, op::Op as O};
use rim_proto::v1;
use rim_proto::v1::push_service_server::PushService;
use tonic::{Request, Response, Status};

use super::accounts::{self, Owner};
use super::ops;
use super::push::PushSvc;
use crate::core::Core;
use crate::credentials::{Role, role_of};
use crate::error::{Error, Result};
use crate::group::now_ms;

/// Longest idempotency key, in bytes.
pub const MAX_IDEMPOTENCY_KEY_BYTES: usize = 64;
/// Longest external id (of a user or a device), in bytes.
pub const MAX_EXTERNAL_ID_BYTES: usize = 128;

/// The server API of a node.
#[derive(Debug, Clone)]
pub struct ServerApiSvc {
    /// Shared node state.
    pub core: Arc<Core>,
}

pub(super) fn bad(message: impl Into<String>) -> Error {
    Error::rejected(ErrorCode::ErrorBadRequest, message)
}

/// An idempotency key: required, bounded.
pub(super) fn check_idempotency_key(key: &str) -> Result<()> {
    if key.is_empty() || key.len() > MAX_IDEMPOTENCY_KEY_BYTES {
        return Err(bad(format!("idempotency_key must be 1..={MAX_IDEMPOTENCY_KEY_BYTES} bytes")));
    }
    Ok(())
}

/// An external id: required, bounded, printable.
fn check_external(what: &str, id: &str) -> Result<()> {
    if id.is_empty() || id.len() > MAX_EXTERNAL_ID_BYTES || id.chars().any(char::is_control) {
        return Err(bad(format!(
            "{what} must be 1..={MAX_EXTERNAL_ID_BYTES} bytes without control characters"
        )));
    }
    Ok(())
}

/// Counts a call of `method` over `transport`, and its failure by code.
pub fn counted<T>(method: &'static str, transport: &'static str, out: Result<T>) -> Result<T> {
    metrics::counter!("rim_server_api_calls_total", "method" => method, "transport" => transport)
        .increment(1);
    if let Err(e) = &out {
        let code = e.code().as_str_name();
        metrics::counter!("rim_server_api_errors_total", "method" => method, "code" => code).increment(1);
    }
    out
}

/// A push API request carrying the caller's role, as the push API's
/// interceptor would have recorded it.
fn as_push<T>(role: Option<&Role>, msg: T) -> Request<T> {
    let mut req = Request::new(msg);
    if let Some(r) = role {
        req.extensions_mut().insert(r.clone());
    }
    req
}

fn push_content(key: String, body: Option<PushBody>) -> Option<v1::PushContent> {
    body.map(|b| v1::PushContent {
        content_type: b.content_type,
        content: b.content,
        sender_user_id: b.sender_user_id,
        client_msg_id: key,
    })
}

fn from_status(s: Status) -> Error {
    Error::rejected(rim_proto::error::code_of_status(&s), s.message().to_string())
}

impl ServerApiSvc {
    /// Refuses a caller without `scope` ([`Role::may`]).
    pub(super) fn authorize(&self, role: Option<&Role>, scope: &str) -> Result<()> {
        let keys_configured = !self.core.config.api_keys.is_empty();
        match role {
            Some(r) if r.may(scope, keys_configured) => Ok(()),
            _ => Err(Error::rejected(
                ErrorCode::ErrorPermissionDenied,
                format!("this API key lacks the scope {scope:?}"),
            )),
        }
    }

    /// The user named by rim's id, or else by the app's.
    pub(super) async fn user_of(&self, id: u64, external: &str) -> Result<UserId> {
        if id != 0 {
            ops::get_user(&self.core, UserId(id)).await?;
            return Ok(UserId(id));
        }
        check_external("external_user_id", external)?;
        match accounts::owner(&self.core, &format!("x:{external}")).await? {
            Owner::User(u) => Ok(u),
            Owner::Nobody | Owner::Orphan(_) => {
                Err(Error::rejected(ErrorCode::ErrorUserNotFound, "no user of that external_user_id"))
            }
        }
    }

    /// The device of `user` named by rim's id, or else by the app's.
    async fn device_of(&self, user: UserId, id: u64, external: &str) -> Result<store::DeviceRecord> {
        let not_found = || Error::rejected(ErrorCode::ErrorDeviceNotFound, "no such device of the user");
        if id != 0 {
            return ops::get_device(&self.core, user, DeviceId(id)).await?.ok_or_else(not_found);
        }
        check_external("device_external_id", external)?;
        let g = self.core.view(self.core.shard_of_user(user)?).await?;
        g.devices(user).await?.into_iter().find(|d| d.external_id == external).ok_or_else(not_found)
    }

    /// UpsertUser (scope `users`).
    pub async fn upsert_user(&self, role: Option<&Role>, r: UpsertUserRequest) -> Result<UpsertUserReply> {
        self.authorize(role, "users")?;
        check_idempotency_key(&r.idempotency_key)?;
        check_external("external_user_id", &r.external_user_id)?;
        let core = &self.core;
        let name = format!("x:{}", r.external_user_id);
        let profile = store::CreateUser {
            nickname: r.nickname.clone(),
            avatar_url: r.avatar_url.clone(),
            extra: r.extra.clone().into_bytes().into(),
            ..Default::default()
        };
        accounts::check_create(core, &profile)?;
        // As a first sign-in with an app-signed token: a concurrent creation
        // of the same name wins the claim, and we update the user it made.
        let mut backoff = rim_cluster::Backoff::within(core.timeout);
        let user = loop {
            let orphan = match accounts::owner(core, &name).await? {
                Owner::User(u) => break u,
                Owner::Orphan(u) => Some(u),
                Owner::Nobody => None,
            };
            match accounts::create_user(core, &name, profile.clone(), orphan).await {
                Ok(u) => return Ok(UpsertUserReply { user_id: u.0 }),
                Err(Error::Rejected { code: ErrorCode::ErrorAlreadyExists, .. }) if backoff.wait().await => {}
                Err(e) => return Err(e),
            }
        };
        let old = ops::get_user(core, user).await?;
        let changed = |new: &str, old: &str| (!new.is_empty() && new != old).then(|| new.to_string());
        let update = store::UpdateUser {
            user_id: user.0,
            nickname: changed(&r.nickname, &old.nickname),
            avatar_url: changed(&r.avatar_url, &old.avatar_url),
            extra: (!r.extra.is_empty() && r.extra.as_bytes() != old.extra.as_ref())
                .then(|| r.extra.into_bytes().into()),
            password_hash: None,
        };
        if update.nickname.is_some() || update.avatar_url.is_some() || update.extra.is_some() {
            core.propose(core.shard_of_user(user)?, ops::op(O::UpdateUser(update))).await?;
        }
        Ok(UpsertUserReply { user_id: user.0 })
    }

    /// IssueToken (scope `tokens`).
    pub async fn issue_token(&self, role: Option<&Role>, r: IssueTokenRequest) -> Result<IssueTokenReply> {
        self.authorize(role, "tokens")?;
        check_idempotency_key(&r.idempotency_key)?;
        check_external("device_external_id", &r.device_external_id)?;
        let max = self.core.config.token_ttl_secs;
        if r.ttl_secs > max {
            return Err(bad(format!("ttl_secs is at most {max}")));
        }
        let ttl = if r.ttl_secs == 0 { max } else { r.ttl_secs };
        let user = self.user_of(r.user_id, &r.external_user_id).await?;
        let device = match self.device_of(user, 0, &r.device_external_id).await {
            Ok(d) => d,
            Err(Error::Rejected { code: ErrorCode::ErrorDeviceNotFound, .. }) => {
                // A fresh id is used only if the device is still unknown when
                // the registration applies (the state machine maps an
                // external id once).
                let fresh = self.core.allocate_device().await?;
                ops::register_device(&self.core, user, fresh, None, &r.device_external_id).await?.0
            }
            Err(e) => return Err(e),
        };
        let expires_at_ms = now_ms().saturating_add(i64::try_from(ttl).unwrap_or(i64::MAX / 2000) * 1000);
        let claims = rim_cluster::Claims {
            user_id: user,
            device_id: DeviceId(device.device_id),
            expires_at_ms,
            token_version: device.token_version,
        };
        let token = self.core.tokens.sign(&claims);
        Ok(IssueTokenReply { token, user_id: user.0, device_id: device.device_id, expires_at_ms })
    }

    /// RevokeDevice (scope `sessions`).
    pub async fn revoke_device(
        &self,
        role: Option<&Role>,
        r: RevokeDeviceRequest,
    ) -> Result<RevokeDeviceReply> {
        self.authorize(role, "sessions")?;
        check_idempotency_key(&r.idempotency_key)?;
        let user = self.user_of(r.user_id, &r.external_user_id).await?;
        let device = self.device_of(user, r.device_id, &r.device_external_id).await?;
        ops::revoke(&self.core, user, DeviceId(device.device_id)).await?;
        Ok(RevokeDeviceReply { user_id: user.0, device_id: device.device_id })
    }

    /// LogoutUser (scope `sessions`): every device revoked, concurrently.
    pub async fn logout_user(&self, role: Option<&Role>, r: LogoutUserRequest) -> Result<LogoutUserReply> {
        self.authorize(role, "sessions")?;
        check_idempotency_key(&r.idempotency_key)?;
        let user = self.user_of(r.user_id, &r.external_user_id).await?;
        let g = self.core.view(self.core.shard_of_user(user)?).await?;
        let devices = g.devices(user).await?;
        let revokes = devices.iter().map(|d| ops::revoke(&self.core, user, DeviceId(d.device_id)));
        for res in futures::future::join_all(revokes).await {
            res?;
        }
        Ok(LogoutUserReply {
            user_id: user.0,
            devices_revoked: u32::try_from(devices.len()).unwrap_or(u32::MAX),
        })
    }

    fn pushes(&self) -> PushSvc {
        PushSvc { core: self.core.clone() }
    }

    /// PushToUsers (scope `push` or `push.users`; the push API checks it).
    pub async fn push_to_users(&self, role: Option<&Role>, r: PushToUsersRequest) -> Result<PushReply> {
        check_idempotency_key(&r.idempotency_key)?;
        let req = v1::PushToUsersRequest {
            user_ids: r.user_ids,
            content: push_content(r.idempotency_key, r.body),
            persist: r.persist,
        };
        let out = self.pushes().push_to_users(as_push(role, req)).await.map_err(from_status)?;
        Ok(PushReply { message_id: out.into_inner().message_id, group_seq: 0 })
    }

    /// PushToGroup (scope `push` or `push.group`).
    pub async fn push_to_group(&self, role: Option<&Role>, r: PushToGroupRequest) -> Result<PushReply> {
        check_idempotency_key(&r.idempotency_key)?;
        let req = v1::PushToGroupRequest {
            group_id: r.group_id,
            content: push_content(r.idempotency_key, r.body),
            persist: r.persist,
        };
        let out = self.pushes().push_to_group(as_push(role, req)).await.map_err(from_status)?.into_inner();
        Ok(PushReply { message_id: out.message_id, group_seq: out.group_seq })
    }

    /// PushRoom (scope `push` or `push.room`).
    pub async fn push_room(&self, role: Option<&Role>, r: PushRoomRequest) -> Result<PushReply> {
        check_idempotency_key(&r.idempotency_key)?;
        let req = v1::PushRoomRequest {
            room_id: r.room_id,
            content: push_content(r.idempotency_key, r.body),
            priority: r.priority,
            persist: r.persist,
        };
        let out = self.pushes().push_room(as_push(role, req)).await.map_err(from_status)?.into_inner();
        Ok(PushReply { message_id: out.message_id, group_seq: out.group_seq })
    }

    /// PushToAll (scope `push` or `push.all`; online-only).
    pub async fn push_to_all(&self, role: Option<&Role>, r: PushToAllRequest) -> Result<PushReply> {
        check_idempotency_key(&r.idempotency_key)?;
        let req =
            v1::PushToAllRequest { content: push_content(r.idempotency_key, r.body), priority: r.priority };
        self.pushes().push_to_all(as_push(role, req)).await.map_err(from_status)?;
        Ok(PushReply::default())
    }

    /// ListDeadLetters (scope `events`).
    pub async fn list_dead_letters(
        &self,
        role: Option<&Role>,
        r: ListDeadLettersRequest,
    ) -> Result<ListDeadLettersReply> {
        self.authorize(role, "events")?;
        crate::webhooks::replay::list(&self.core, r).await
    }

    /// ReplayDeadLetters (scope `events`).
    pub async fn replay_dead_letters(
        &self,
        role: Option<&Role>,
        r: ReplayDeadLettersRequest,
    ) -> Result<ReplayDeadLettersReply> {
        self.authorize(role, "events")?;
        check_idempotency_key(&r.idempotency_key)?;
        crate::webhooks::replay::replay(&self.core, r).await
    }
}

/// A gRPC reply: the call counted, an error as a status with `rim-code`.
fn reply<T>(method: &'static str, out: Result<T>) -> std::result::Result<Response<T>, Status> {
    Ok(Response::new(counted(method, "grpc", out)?))
}

// Each method: the caller's role from the interceptor, the shared method.
#[tonic::async_trait]
impl ServerApi for ServerApiSvc {
    async fn upsert_user(
        &self,
        req: Request<UpsertUserRequest>,
    ) -> std::result::Result<Response<UpsertUserReply>, Status> {
        let role = role_of(&req).cloned();
        reply("UpsertUser", ServerApiSvc::upsert_user(self, role.as_ref(), req.into_inner()).await)
    }

    async fn issue_token(
        &self,
        req: Request<IssueTokenRequest>,
    ) -> std::result::Result<Response<IssueTokenReply>, Status> {
        let role = role_of(&req).cloned();
        reply("IssueToken", ServerApiSvc::issue_token(self, role.as_ref(), req.into_inner()).await)
    }

    async fn revoke_device(
        &self,
        req: Request<RevokeDeviceRequest>,
    ) -> std::result::Result<Response<RevokeDeviceReply>, Status> {
        let role = role_of(&req).cloned();
        reply("RevokeDevice", ServerApiSvc::revoke_device(self, role.as_ref(), req.into_inner()).await)
    }

    async fn logout_user(
        &self,
        req: Request<LogoutUserRequest>,
    ) -> std::result::Result<Response<LogoutUserReply>, Status> {
        let role = role_of(&req).cloned();
        reply("LogoutUser", ServerApiSvc::logout_user(self, role.as_ref(), req.into_inner()).await)
    }

    async fn push_to_users(
        &self,
        req: Request<PushToUsersRequest>,
    ) -> std::result::Result<Response<PushReply>, Status> {
        let role = role_of(&req).cloned();
        reply("PushToUsers", ServerApiSvc::push_to_users(self, role.as_ref(), req.into_inner()).await)
    }

    async fn push_to_group(
        &self,
        req: Request<PushToGroupRequest>,
    ) -> std::result::Result<Response<PushReply>, Status> {
        let role = role_of(&req).cloned();
        reply("PushToGroup", ServerApiSvc::push_to_group(self, role.as_ref(), req.into_inner()).await)
    }

    async fn push_room(
        &self,
        req: Request<PushRoomRequest>,
    ) -> std::result::Result<Response<PushReply>, Status> {
        let role = role_of(&req).cloned();
        reply("PushRoom", ServerApiSvc::push_room(self, role.as_ref(), req.into_inner()).await)
    }

    async fn push_to_all(
        &self,
        req: Request<PushToAllRequest>,
    ) -> std::result::Result<Response<PushReply>, Status> {
        let role = role_of(&req).cloned();
        reply("PushToAll", ServerApiSvc::push_to_all(self, role.as_ref(), req.into_inner()).await)
    }

    async fn create_group(
        &self,
        req: Request<CreateGroupRequest>,
    ) -> std::result::Result<Response<CreateGroupReply>, Status> {
        let role = role_of(&req).cloned();
        reply("CreateGroup", ServerApiSvc::create_group(self, role.as_ref(), req.into_inner()).await)
    }

    async fn add_group_members(
        &self,
        req: Request<AddGroupMembersRequest>,
    ) -> std::result::Result<Response<AddGroupMembersReply>, Status> {
        let role = role_of(&req).cloned();
        reply("AddGroupMembers", ServerApiSvc::add_group_members(self, role.as_ref(), req.into_inner()).await)
    }

    async fn remove_group_members(
        &self,
        req: Request<RemoveGroupMembersRequest>,
    ) -> std::result::Result<Response<RemoveGroupMembersReply>, Status> {
        let role = role_of(&req).cloned();
        reply(
            "RemoveGroupMembers",
            ServerApiSvc::remove_group_members(self, role.as_ref(), req.into_inner()).await,
        )
    }

    async fn update_group(
        &self,
        req: Request<UpdateGroupRequest>,
    ) -> std::result::Result<Response<UpdateGroupReply>, Status> {
        let role = role_of(&req).cloned();
        reply("UpdateGroup", ServerApiSvc::update_group(self, role.as_ref(), req.into_inner()).await)
    }

    async fn dissolve_group(
        &self,
        req: Request<DissolveGroupRequest>,
    ) -> std::result::Result<Response<DissolveGroupReply>, Status> {
        let role = role_of(&req).cloned();
        reply("DissolveGroup", ServerApiSvc::dissolve_group(self, role.as_ref(), req.into_inner()).await)
    }

    async fn get_group(
        &self,
        req: Request<GetGroupRequest>,
    ) -> std::result::Result<Response<GetGroupReply>, Status> {
        let role = role_of(&req).cloned();
        reply("GetGroup", ServerApiSvc::get_group(self, role.as_ref(), req.into_inner()).await)
    }

    async fn list_dead_letters(
        &self,
        req: Request<ListDeadLettersRequest>,
    ) -> std::result::Result<Response<ListDeadLettersReply>, Status> {
        let role = role_of(&req).cloned();
        reply("ListDeadLetters", ServerApiSvc::list_dead_letters(self, role.as_ref(), req.into_inner()).await)
    }

    async fn replay_dead_letters(
        &self,
        req: Request<ReplayDeadLettersRequest>,
    ) -> std::result::Result<Response<ReplayDeadLettersReply>, Status> {
        let role = role_of(&req).cloned();
        reply(
            "ReplayDeadLetters",
            ServerApiSvc::replay_dead_letters(self, role.as_ref(), req.into_inner()).await,
        )
    }
}
