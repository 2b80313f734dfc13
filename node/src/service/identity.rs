//! Sign-in with an app-signed token, or a token the app's auth callback
//! vouches for: the app's user and device become rim's, created on first
//! sight through Raft.
//!
//! [`sign_in_with_jwt`] verifies the token locally ([`crate::jwt`]), then
//! maps the app's user id (`sub`) to the user owning the account name
//! `x:<sub>` ([`accounts`]), creating it from the token's claims if there is
//! none, and the app's device id to the device of that user registered
//! under it, registering one if there is none.
//!
//! [`sign_in_with_callback`] asks the app ([`crate::auth_callback`]) about
//! the app's user id, device id and token, and maps them the same way: the
//! user id in decimal is the `sub`, the device id in decimal the device.
//! The app is the authority on its tokens there: no expiry or revocation
//! time comes with them, so the connection has no expiry, and the app
//! refuses a token to keep a device out.
//!
//! # Invariants
//!
//! * Provisioning is idempotent: concurrent first sign-ins of one `sub`
//!   make one user (the name's claim is unique; the loser reads the
//!   winner's), and of one device make one device (the state machine maps
//!   an external device id once, `RegisterDevice.external_id`).
//! * A sign-in that finds its user and device writes nothing: a reconnect
//!   storm of app-signed tokens costs reads, never Raft writes, and never a
//!   call to the app.
//! * Revocation sticks: a device revoked at time T refuses every token the
//!   app issued (`iat`, in seconds) at or before T's second; the app signs
//!   a new one to sign the device in again.

use rim_proto::ErrorCode;
use rim_proto::ids::{DeviceId, UserId};
use rim_proto::store::{self, DeviceRecord};

use super::accounts::{self, Owner};
use super::ops;
use crate::core::Core;
use crate::error::{Error, Result};
use crate::jwt::ExternalIdentity;

/// Who an app-signed token (or the app's callback) signed in.
#[derive(Debug)]
pub(super) struct AppSignIn {
    /// rim's user of the app's `sub`.
    pub user: UserId,
    /// rim's device of the app's device id, as registered.
    pub device: DeviceRecord,
    /// What the token said.
    pub identity: ExternalIdentity,
}

/// Verifies `token` and finds (or creates) its user and device.
async fn sign_in_with_jwt(core: &Core, token: &str) -> Result<AppSignIn> {
    let verifier = core.jwt.as_ref().ok_or_else(|| {
        Error::rejected(ErrorCode::ErrorUnauthenticated, "app-signed tokens are not enabled")
    })?;
    let identity = verifier.verify(token).await?;
    let user = provision_user(core, &identity).await?;
    let device = provision_device(core, user, &identity).await?;
    if device.revoked_ms > 0 && identity.issued_at_ms / 1000 <= device.revoked_ms / 1000 {
        return Err(Error::rejected(
            ErrorCode::ErrorTokenRevoked,
            "device signed out: the token was issued before (or in the second of) its revocation",
        ));
    }
    Ok(AppSignIn { user, device, identity })
}

/// Whether a sign-in with `token` goes to the app's auth callback: one is
/// configured and the token is not a rim token (nor, when `[jwt]` is on, a
/// JWT: the caller tries that first).
fn uses_callback(core: &Core, token: &str) -> bool {
    core.auth_callback.is_some() && !crate::auth_callback::is_rim_token(token)
}

/// Asks the app's callback whether `token` is its token of its user
/// `app_user` on its device `app_device`, then finds (or creates) their
/// user and device.
async fn sign_in_with_callback(
    core: &Core,
    app_user: u64,
    app_device: u64,
    token: &str,
) -> Result<AppSignIn> {
    let callback = core.auth_callback.as_ref().ok_or_else(|| {
        Error::rejected(ErrorCode::ErrorUnauthenticated, "the app's auth callback is not configured")
    })?;
    callback.check(app_user, app_device, token).await?;
    let identity = ExternalIdentity {
        subject: app_user.to_string(),
        device: app_device.to_string(),
        name: String::new(),
        expires_at_ms: 0,
        issued_at_ms: crate::group::now_ms(),
    };
    let user = provision_user(core, &identity).await?;
    let device = provision_device(core, user, &identity).await?;
    Ok(AppSignIn { user, device, identity })
}

/// A sign-in with the app's credential in `input`: an app-signed JWT (when
/// `[jwt]` is on), or the app's ids and a token for its callback. `None`
/// if the token is for rim to check.
pub(super) async fn app_sign_in(
    core: &Core,
    input: &rim_proto::v1::SignInInput,
) -> Result<Option<AppSignIn>> {
    app_credential(core, &input.token, || Ok((input.user_id, input.device_id))).await
}

/// The user and device of a client API call authenticated by the app's
/// credential `token` ([`app_sign_in`]; `app_ids` gives the app's user and
/// device ids from the metadata, for the callback). `None` if `token` is
/// for rim to check.
///
/// Each call resolves the identity again (reads, no writes once the user
/// and device exist): a JWT costs no call to the app, a callback token one
/// per `cache_secs`.
pub(super) async fn app_caller(
    core: &Core,
    token: &str,
    app_ids: impl FnOnce() -> Result<(u64, u64)>,
) -> Result<Option<(UserId, DeviceId)>> {
    Ok(app_credential(core, token, app_ids).await?.map(|s| (s.user, device_id(&s))))
}

async fn app_credential(
    core: &Core,
    token: &str,
    app_ids: impl FnOnce() -> Result<(u64, u64)>,
) -> Result<Option<AppSignIn>> {
    if core.jwt.is_some() && crate::jwt::JwtVerifier::looks_like_jwt(token) {
        return Ok(Some(sign_in_with_jwt(core, token).await?));
    }
    if uses_callback(core, token) {
        let (user, device) = app_ids()?;
        return Ok(Some(sign_in_with_callback(core, user, device, token).await?));
    }
    Ok(None)
}

async fn provision_user(core: &Core, id: &ExternalIdentity) -> Result<UserId> {
    let name = format!("x:{}", id.subject);
    let mut nickname = id.name.clone();
    nickname.truncate(nickname.floor_char_boundary(core.limits().max_name_bytes));
    let user = store::CreateUser { nickname, ..Default::default() };
    accounts::check_create(core, &user)?;
    // A concurrent first sign-in of the same user may claim the name
    // between our read and our claim, and create its user a moment later:
    // then the claim is refused, and we read again until that user exists.
    let mut backoff = rim_cluster::Backoff::within(core.timeout);
    loop {
        let orphan = match accounts::owner(core, &name).await? {
            Owner::User(u) => return Ok(u),
            Owner::Orphan(u) => Some(u),
            Owner::Nobody => None,
        };
        match accounts::create_user(core, &name, user.clone(), orphan).await {
            Ok(u) => return Ok(u),
            Err(Error::Rejected { code: ErrorCode::ErrorAlreadyExists, .. }) if backoff.wait().await => {}
            Err(Error::Rejected { code: ErrorCode::ErrorAlreadyExists, .. }) => {
                return Err(Error::Unavailable(format!(
                    "the user of {name:?} is being created elsewhere; retry"
                )));
            }
            Err(e) => return Err(e),
        }
    }
}

async fn provision_device(core: &Core, user: UserId, id: &ExternalIdentity) -> Result<DeviceRecord> {
    let g = core.view(core.shard_of_user(user)?).await?;
    if let Some(d) = g.devices(user).await?.into_iter().find(|d| d.external_id == id.device) {
        return Ok(d);
    }
    // A fresh id is used only if the device is still unknown when the
    // registration applies; otherwise the device registered meanwhile is.
    let fresh = core.allocate_device().await?;
    let (device, _, _) = ops::register_device(core, user, fresh, None, &id.device).await?;
    Ok(device)
}

/// The device id of a sign-in reply.
pub(super) fn device_id(s: &AppSignIn) -> DeviceId {
    DeviceId(s.device.device_id)
}
