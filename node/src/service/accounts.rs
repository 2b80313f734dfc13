//! Account names and the users that own them: the one place that claims a
//! name and creates its user, for every way a user comes to exist
//! (registration, phone sign-in, an app-signed token seen for the first
//! time).
//!
//! A name lives in the shard of its slot; its user in the user's shard. So
//! creating a user is two proposals: the claim (unique: a second claim of a
//! name is refused `ERROR_ALREADY_EXISTS`), then the user record. A claim
//! whose user was never created (the process died in between) is an
//! *orphan*, taken over by the next creation once it is old enough
//! (`Limits::orphan_claim_ms`).
//!
//! Names are namespaced by how they sign in: `u:` usernames, `p:` phone
//! numbers, `x:` the app's user ids of app-signed tokens.

use rim_proto::ErrorCode;
use rim_proto::ids::UserId;
use rim_proto::store::{self, op::Op as O};

use super::ops;
use crate::core::Core;
use crate::error::{Error, Result};

/// Who owns an account name ([`owner`]).
pub(super) enum Owner {
    Nobody,
    User(UserId),
    Orphan(UserId),
}

/// The user that claimed `name`, read linearizably.
pub(super) async fn account(core: &Core, name: &str) -> Result<Option<UserId>> {
    let shard = core.placement()?.shard_of_account(name);
    let g = core.view(shard).await?;
    g.account(name).await
}

/// Who owns `name`: nobody, a user, or a claim whose user was never
/// created (a creation interrupted between its two steps), which a new
/// creation may take over once it is old enough.
pub(super) async fn owner(core: &Core, name: &str) -> Result<Owner> {
    let Some(user) = account(core, name).await? else { return Ok(Owner::Nobody) };
    match ops::get_user(core, user).await {
        Ok(_) => Ok(Owner::User(user)),
        Err(Error::Rejected { code: ErrorCode::ErrorUserNotFound, .. }) => Ok(Owner::Orphan(user)),
        Err(e) => Err(e),
    }
}

/// Refuses a user record the state machine would refuse (field sizes),
/// before any name is claimed for it.
pub(super) fn check_create(core: &Core, user: &store::CreateUser) -> Result<()> {
    let probe =
        store::Op { op: Some(O::CreateUser(store::CreateUser { user_id: u64::MAX, ..user.clone() })) };
    core.limits().check_op(&probe).map_err(Error::from)
}

/// Creates a user owning the account `name` (taking it over from
/// `orphan`, a claim whose user was never created, if given).
pub(super) async fn create_user(
    core: &Core,
    name: &str,
    user: store::CreateUser,
    orphan: Option<UserId>,
) -> Result<UserId> {
    let id = core.allocate_user().await?;
    let shard = core.placement()?.shard_of_account(name);
    let claim = O::ClaimAccount(store::ClaimAccount {
        name: name.to_string(),
        user_id: id.0,
        replaces_user_id: orphan.map_or(0, |u| u.0),
    });
    core.propose(shard, store::Op { op: Some(claim) }).await?;
    let create = O::CreateUser(store::CreateUser { user_id: id.0, ..user });
    match core.propose(core.shard_of_user(id)?, store::Op { op: Some(create) }).await {
        // A retried creation of this fresh id already happened.
        Ok(_) | Err(Error::Rejected { code: ErrorCode::ErrorAlreadyExists, .. }) => Ok(id),
        Err(e) => Err(e),
    }
}
