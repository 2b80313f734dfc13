//! The server API over HTTP/JSON (docs/server-api.md, docs/openapi.json):
//! `POST /v1/<Method>` on the node's HTTP listener, the JSON form of the
//! same `rim.server.v1` messages the gRPC service takes (field names as in
//! the .proto file, `bytes` as base64, missing fields at their defaults,
//! unknown fields refused), served by the same [`ServerApiSvc`] methods.
//!
//! * Auth: `Authorization: Bearer <api key>`, checked against the same
//!   `[[api_keys]]` digests (constant time) as the gRPC metadata. Only API
//!   keys: without any configured, every call is refused 401.
//! * Bounds: a body of at most [`MAX_BODY_BYTES`] (else 413), at most
//!   [`MAX_CONCURRENT_CALLS`] calls in flight per node (others wait).
//! * Errors: a JSON object `{"code": "ERROR_...", "message": "..."}` with
//!   the stable code of docs/protocol.md and the HTTP status of
//!   [`http_status`].
//!
//! [`routes`] lists what [`router`] serves, from the same table; the
//! OpenAPI document is checked against it (`node/tests/server_api.rs`).

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use rim_proto::ErrorCode;
use rim_proto::server_api::*;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tonic::metadata::MetadataMap;

use crate::core::Core;
use crate::credentials::{API_KEY_METADATA_KEY, Credentials, Role};
use crate::error::{Error, Result};
use crate::service::{ServerApiSvc, counted};

/// Largest request body, in bytes (a push's content, base64, fits).
pub const MAX_BODY_BYTES: usize = 256 * 1024;
/// Most calls in flight on one node's HTTP API.
pub const MAX_CONCURRENT_CALLS: usize = 256;

/// One route of the HTTP API: its path and the JSON field names of its
/// request and reply, from the messages themselves.
#[derive(Debug, Clone)]
pub struct Route {
    /// `/v1/<Method>`.
    pub path: &'static str,
    /// The request message's name in `rim.server.v1`.
    pub request: &'static str,
    /// The reply message's name.
    pub reply: &'static str,
}

/// The JSON field names of a message (its default, serialized).
pub fn json_fields<T: Serialize + Default>() -> Vec<String> {
    match serde_json::to_value(T::default()) {
        Ok(serde_json::Value::Object(m)) => m.keys().cloned().collect(),
        _ => Vec::new(),
    }
}

/// Every message of the API by name, with its JSON field names.
pub fn messages() -> Vec<(&'static str, Vec<String>)> {
    macro_rules! fields {
        ($($t:ident),*) => { vec![$((stringify!($t), json_fields::<$t>())),*] };
    }
    fields!(
        UpsertUserRequest,
        UpsertUserReply,
        IssueTokenRequest,
        IssueTokenReply,
        RevokeDeviceRequest,
        RevokeDeviceReply,
        LogoutUserRequest,
        LogoutUserReply,
        PushBody,
        PushToUsersRequest,
        PushToGroupRequest,
        PushRoomRequest,
        PushToAllRequest,
        PushReply,
        GroupInfo,
        GroupMemberInfo,
        CreateGroupRequest,
        CreateGroupReply,
        AddGroupMembersRequest,
        AddGroupMembersReply,
        RemoveGroupMembersRequest,
        RemoveGroupMembersReply,
        UpdateGroupRequest,
        UpdateGroupReply,
        DissolveGroupRequest,
        DissolveGroupReply,
        GetGroupRequest,
        GetGroupReply,
        DeadLetterInfo,
        ListDeadLettersRequest,
        ListDeadLettersReply,
        ReplayDeadLettersRequest,
        ReplayResult,
        ReplayDeadLettersReply
    )
}

#[derive(Clone)]
struct Api {
    svc: ServerApiSvc,
    creds: Credentials,
}

/// The table of routes: mounts them on a router and lists them.
macro_rules! routes {
    ($($name:literal => $method:ident($req:ident) -> $reply:ident;)*) => {
        /// What [`router`] serves.
        pub fn routes() -> Vec<Route> {
            vec![$(Route {
                path: concat!("/v1/", $name),
                request: stringify!($req),
                reply: stringify!($reply),
            }),*]
        }

        fn mount(r: Router<Api>) -> Router<Api> {
            r$(.route(
                concat!("/v1/", $name),
                post(|State(api): State<Api>, headers: HeaderMap, body: Body| async move {
                    call::<$req, $reply, _>($name, &api, &headers, body, |svc, role, req| async move {
                        svc.$method(role.as_ref(), req).await
                    })
                    .await
                }),
            ))*
        }
    };
}

routes! {
    "UpsertUser" => upsert_user(UpsertUserRequest) -> UpsertUserReply;
    "IssueToken" => issue_token(IssueTokenRequest) -> IssueTokenReply;
    "RevokeDevice" => revoke_device(RevokeDeviceRequest) -> RevokeDeviceReply;
    "LogoutUser" => logout_user(LogoutUserRequest) -> LogoutUserReply;
    "PushToUsers" => push_to_users(PushToUsersRequest) -> PushReply;
    "PushToGroup" => push_to_group(PushToGroupRequest) -> PushReply;
    "PushRoom" => push_room(PushRoomRequest) -> PushReply;
    "PushToAll" => push_to_all(PushToAllRequest) -> PushReply;
    "CreateGroup" => create_group(CreateGroupRequest) -> CreateGroupReply;
    "AddGroupMembers" => add_group_members(AddGroupMembersRequest) -> AddGroupMembersReply;
    "RemoveGroupMembers" => remove_group_members(RemoveGroupMembersRequest) -> RemoveGroupMembersReply;
    "UpdateGroup" => update_group(UpdateGroupRequest) -> UpdateGroupReply;
    "DissolveGroup" => dissolve_group(DissolveGroupRequest) -> DissolveGroupReply;
    "GetGroup" => get_group(GetGroupRequest) -> GetGroupReply;
    "ListDeadLetters" => list_dead_letters(ListDeadLettersRequest) -> ListDeadLettersReply;
    "ReplayDeadLetters" => replay_dead_letters(ReplayDeadLettersRequest) -> ReplayDeadLettersReply;
}

/// The HTTP API's router (merged into the node's HTTP endpoints).
pub fn router(core: Arc<Core>, creds: Credentials) -> Router {
    let api = Api { svc: ServerApiSvc { core }, creds };
    mount(Router::new()).layer(tower::limit::ConcurrencyLimitLayer::new(MAX_CONCURRENT_CALLS)).with_state(api)
}

/// The HTTP status of an error code.
pub fn http_status(code: ErrorCode) -> StatusCode {
    use tonic::Code as C;
    if code == ErrorCode::ErrorFrameTooLarge {
        return StatusCode::PAYLOAD_TOO_LARGE;
    }
    match code.grpc_code() {
        C::Ok => StatusCode::OK,
        C::InvalidArgument | C::OutOfRange | C::FailedPrecondition => StatusCode::BAD_REQUEST,
        C::Unauthenticated => StatusCode::UNAUTHORIZED,
        C::PermissionDenied => StatusCode::FORBIDDEN,
        C::NotFound | C::Unimplemented => StatusCode::NOT_FOUND,
        C::AlreadyExists | C::Aborted => StatusCode::CONFLICT,
        C::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        C::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        C::DeadlineExceeded | C::Cancelled => StatusCode::GATEWAY_TIMEOUT,
        C::Unknown | C::Internal | C::DataLoss => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// The JSON body of an error.
#[derive(Serialize)]
struct ErrorBody {
    code: &'static str,
    message: String,
}

pub(crate) fn error_response(e: &Error) -> Response {
    let code = e.code();
    let message = match e {
        Error::Rejected { message, .. } => message.clone(),
        _ => e.to_string(),
    };
    (http_status(code), axum::Json(ErrorBody { code: code.as_str_name(), message })).into_response()
}

/// The caller's role, from `Authorization: Bearer <api key>`.
pub(crate) fn role(creds: &Credentials, headers: &HeaderMap) -> Result<Role> {
    let unauthenticated = || Error::rejected(ErrorCode::ErrorUnauthenticated, "a valid API key is required");
    let value = headers.get(header::AUTHORIZATION).ok_or_else(unauthenticated)?;
    let key = value.as_bytes().strip_prefix(b"Bearer ").ok_or_else(unauthenticated)?;
    let mut metadata = MetadataMap::new();
    let key = tonic::metadata::MetadataValue::try_from(key).map_err(|_| unauthenticated())?;
    metadata.insert(API_KEY_METADATA_KEY, key);
    match creds.role(&metadata) {
        Some(r @ Role::Push { .. }) => Ok(r),
        _ => Err(unauthenticated()),
    }
}

/// One call: authenticate, read and decode the bounded body, run, encode.
async fn call<Req, Reply, Fut>(
    name: &'static str,
    api: &Api,
    headers: &HeaderMap,
    body: Body,
    run: impl FnOnce(ServerApiSvc, Option<Role>, Req) -> Fut,
) -> Response
where
    Req: DeserializeOwned,
    Reply: Serialize,
    Fut: Future<Output = Result<Reply>>,
{
    let out = async {
        let role = role(&api.creds, headers)?;
        let bytes = axum::body::to_bytes(body, MAX_BODY_BYTES).await.map_err(|_| {
            Error::rejected(ErrorCode::ErrorFrameTooLarge, format!("the body exceeds {MAX_BODY_BYTES} bytes"))
        })?;
        let req: Req = serde_json::from_slice(&bytes)
            .map_err(|e| Error::rejected(ErrorCode::ErrorBadRequest, format!("invalid JSON body: {e}")))?;
        run(api.svc.clone(), Some(role), req).await
    };
    match counted(name, "http", out.await) {
        Ok(reply) => axum::Json(reply).into_response(),
        Err(e) => error_response(&e),
    }
}
