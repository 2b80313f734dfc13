//! Group administration through the server API (rim issue 15 §2;
//! docs/server-api.md): groups created, changed and dissolved over
//! HTTP/JSON and gRPC on behalf of the app, seen by their members through
//! the client API; idempotency keys claimed with the request's digest (a
//! retry acts on the same group, the key reused with another request is
//! refused); the `groups` scope enforced.
#![allow(missing_docs)]

use std::time::{Duration, Instant};

use rim_node::credentials::{API_KEY_METADATA_KEY, ApiKeyConfig, api_key_digest};
use rim_proto::ErrorCode;
use rim_proto::server_api::server_api_client::ServerApiClient;
use rim_proto::server_api::{CreateGroupRequest, GetGroupRequest};
use rim_proto::v1::group_service_client::GroupServiceClient;
use rim_proto::v1::{self, ListMyGroupsRequest};
use rim_testkit::cluster::Cluster;
use rim_testkit::grpc::{Client, Session, code};
use rim_testkit::wait::{WAIT, eventually, serial};
use serde_json::{Value, json};

/// Scopes `users` and `groups`.
const GROUPS_KEY: &str = "server-api-key-groups-0123456789";
/// Scope `users` only.
const USERS_KEY: &str = "server-api-key-users-0123456789";

fn keys(cfg: &mut rim_node::config::NodeConfig) {
    let key = |name: &str, key: &str, scopes: &[&str]| ApiKeyConfig {
        name: name.into(),
        sha256: api_key_digest(key),
        scopes: scopes.iter().map(|s| s.to_string()).collect(),
    };
    cfg.api_keys =
        vec![key("backend", GROUPS_KEY, &["users", "groups"]), key("profiles", USERS_KEY, &["users"])];
}

/// A JSON call; the status and the body.
async fn http(c: &Cluster, key: Option<&str>, method: &str, body: &Value) -> (u16, Value) {
    let url = format!("http://{}/v1/{method}", c.configs[&1].http_listen);
    let mut req = reqwest::Client::new().post(url).json(body);
    if let Some(k) = key {
        req = req.bearer_auth(k);
    }
    let resp = req.timeout(WAIT).send().await.expect("the HTTP API answers");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// A call with the groups key whose status is not a transient 503/504
/// (retried while the cluster elects).
async fn call(c: &Cluster, method: &str, body: Value) -> (u16, Value) {
    let deadline = Instant::now() + WAIT;
    loop {
        let (status, out) = http(c, Some(GROUPS_KEY), method, &body).await;
        if (status != 503 && status != 504) || Instant::now() > deadline {
            return (status, out);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A call that must succeed.
async fn ok(c: &Cluster, method: &str, body: Value) -> Value {
    let (status, out) = call(c, method, body.clone()).await;
    assert_eq!(status, 200, "{method} {body}: {out}");
    out
}

fn error(v: &Value) -> String {
    v["code"].as_str().unwrap_or_default().to_string()
}

fn ids(v: &Value) -> Vec<u64> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).collect()
}

/// The client API's GetGroup as `s`: the error code, OK when it is seen.
async fn member_view(client: &Client, s: &Session, group: u64) -> ErrorCode {
    let mut g = GroupServiceClient::new(client.channel.clone());
    match g.get_group(Client::authed(s, v1::GetGroupRequest { group_id: group })).await {
        Ok(_) => ErrorCode::Ok,
        Err(e) => code(&e),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn groups_are_administered_for_the_app_idempotently_and_by_scope() {
    let _g = serial().await;
    let c = Cluster::start_with(3, 2, keys).await;
    let client = c.client(1);
    let owner = client.register_and_sign_in("sag_owner").await;
    let m1 = client.register_and_sign_in("sag_m1").await;
    let m2 = client.register_and_sign_in("sag_m2").await;

    // Created over HTTP; a retry answers the same group.
    let create = json!({
        "idempotency_key": "create-1",
        "owner_user_id": owner.user.0,
        "name": "Team",
        "introduction": "the notice",
        "extra": "{\"crm\":7}",
        "member_user_ids": [m1.user.0],
    });
    let group = ok(&c, "CreateGroup", create.clone()).await["group"].clone();
    let g = group["group_id"].as_u64().unwrap();
    assert!(g > 0);
    assert_eq!(group["owner_user_id"].as_u64(), Some(owner.user.0));
    assert_eq!(group["member_count"].as_u64(), Some(2));
    assert_eq!((group["name"].as_str(), group["extra"].as_str()), (Some("Team"), Some("{\"crm\":7}")));
    assert_eq!(ok(&c, "CreateGroup", create.clone()).await["group"]["group_id"].as_u64(), Some(g));
    // The same key and request over gRPC: still the same group.
    let mut api = ServerApiClient::new(
        tonic::transport::Endpoint::from_shared(format!("http://{}", c.configs[&2].listen))
            .unwrap()
            .connect_lazy(),
    );
    let mut req = tonic::Request::new(CreateGroupRequest {
        idempotency_key: "create-1".into(),
        owner_user_id: owner.user.0,
        name: "Team".into(),
        introduction: "the notice".into(),
        extra: "{\"crm\":7}".into(),
        member_user_ids: vec![m1.user.0],
        ..Default::default()
    });
    req.metadata_mut().insert(API_KEY_METADATA_KEY, GROUPS_KEY.parse().unwrap());
    let again = api.create_group(req).await.unwrap().into_inner().group.unwrap();
    assert_eq!(again.group_id, g, "a retry over gRPC");
    // The key reused for another request is refused, and makes no group.
    let other = json!({"idempotency_key": "create-1", "owner_user_id": owner.user.0, "name": "Other"});
    let (s, v) = call(&c, "CreateGroup", other).await;
    assert_eq!((s, error(&v)), (409, "ERROR_ALREADY_EXISTS".into()), "{v}");

    // The members see it through the client API: at once on the group's
    // shard, and in their own list of groups through the relay.
    assert_eq!(member_view(&client, &m1, g).await, ErrorCode::Ok);
    assert_eq!(member_view(&client, &m2, g).await, ErrorCode::ErrorNotGroupMember);
    eventually(WAIT, "the group in m1's list of groups", || {
        let mut gs = GroupServiceClient::new(client.channel.clone());
        let req = Client::authed(&m1, ListMyGroupsRequest {});
        async move {
            let list = gs.list_my_groups(req).await.ok()?.into_inner().groups;
            list.iter().any(|x| x.group_id == g && x.name == "Team").then_some(())
        }
    })
    .await;

    // Scopes: a key without `groups` is refused, as is no key.
    let probe = json!({"group_id": g});
    let (s, v) = http(&c, Some(USERS_KEY), "GetGroup", &probe).await;
    assert_eq!((s, error(&v)), (403, "ERROR_PERMISSION_DENIED".into()));
    let (s, v) = http(&c, Some(USERS_KEY), "CreateGroup", &create).await;
    assert_eq!((s, error(&v)), (403, "ERROR_PERMISSION_DENIED".into()));
    let (s, _) = http(&c, None, "GetGroup", &probe).await;
    assert_eq!(s, 401);

    // Members added: once per key; the key reused differently is refused.
    let add = json!({"idempotency_key": "add-1", "group_id": g, "user_ids": [m2.user.0]});
    assert_eq!(ids(&ok(&c, "AddGroupMembers", add.clone()).await["added_user_ids"]), vec![m2.user.0]);
    assert!(ids(&ok(&c, "AddGroupMembers", add).await["added_user_ids"]).is_empty(), "a retry adds nobody");
    let (s, v) = call(
        &c,
        "AddGroupMembers",
        json!({"idempotency_key": "add-1", "group_id": g, "user_ids": [m1.user.0]}),
    )
    .await;
    assert_eq!((s, error(&v)), (409, "ERROR_ALREADY_EXISTS".into()), "{v}");
    assert_eq!(member_view(&client, &m2, g).await, ErrorCode::Ok);
    // Acting as a plain member: the member's rights, not the owner's.
    let as_m1 = json!({"idempotency_key": "add-2", "group_id": g, "by_user_id": m1.user.0, "user_ids": [owner.user.0]});
    let (s, v) = call(&c, "AddGroupMembers", as_m1).await;
    assert_eq!((s, error(&v)), (403, "ERROR_PERMISSION_DENIED".into()), "{v}");

    // Updated, and read back with its members.
    let update =
        json!({"idempotency_key": "upd-1", "group_id": g, "name": "Team 2", "introduction": "new notice"});
    let updated = ok(&c, "UpdateGroup", update).await["group"].clone();
    assert_eq!(
        (updated["name"].as_str(), updated["introduction"].as_str()),
        (Some("Team 2"), Some("new notice"))
    );
    assert_eq!(updated["extra"].as_str(), Some("{\"crm\":7}"), "empty fields are unchanged");
    let got = ok(&c, "GetGroup", json!({"group_id": g})).await;
    let mut members: Vec<u64> =
        got["members"].as_array().unwrap().iter().map(|m| m["user_id"].as_u64().unwrap()).collect();
    members.sort_unstable();
    let mut want = vec![owner.user.0, m1.user.0, m2.user.0];
    want.sort_unstable();
    assert_eq!(members, want);
    let owner_row = got["members"].as_array().unwrap().iter().find(|m| m["user_id"] == owner.user.0).unwrap();
    assert_eq!(owner_row["role"].as_i64(), Some(v1::MemberRole::Owner as i64));
    // A page of one.
    let page = ok(&c, "GetGroup", json!({"group_id": g, "limit": 1})).await;
    assert_eq!((page["members"].as_array().unwrap().len(), page["has_more"].as_bool()), (1, Some(true)));

    // Removed: the member loses the group.
    let remove = json!({"idempotency_key": "rm-1", "group_id": g, "user_ids": [m2.user.0]});
    assert_eq!(ids(&ok(&c, "RemoveGroupMembers", remove).await["removed_user_ids"]), vec![m2.user.0]);
    assert_eq!(member_view(&client, &m2, g).await, ErrorCode::ErrorNotGroupMember);

    // Dissolved; a retry answers the same; the group is gone for everyone.
    let dissolve = json!({"idempotency_key": "dis-1", "group_id": g});
    assert_eq!(ok(&c, "DissolveGroup", dissolve.clone()).await["group_id"].as_u64(), Some(g));
    assert_eq!(ok(&c, "DissolveGroup", dissolve).await["group_id"].as_u64(), Some(g));
    let (s, v) = call(&c, "GetGroup", json!({"group_id": g})).await;
    assert_eq!((s, error(&v)), (404, "ERROR_GROUP_NOT_FOUND".into()), "{v}");
    assert_eq!(member_view(&client, &m1, g).await, ErrorCode::ErrorGroupNotFound);

    // Bad input: clear errors, nothing created.
    for (body, why) in [
        (json!({"owner_user_id": owner.user.0}), "no idempotency key"),
        (json!({"idempotency_key": "k".repeat(65), "owner_user_id": owner.user.0}), "key too long"),
        (json!({"idempotency_key": "bad-1", "owner_user_id": owner.user.0, "kind": 3}), "rooms"),
        (
            json!({"idempotency_key": "bad-2", "owner_user_id": owner.user.0, "name": "x".repeat(10_000)}),
            "name",
        ),
    ] {
        let (s, v) = call(&c, "CreateGroup", body).await;
        assert_eq!(s, 400, "{why}: {v}");
    }
    let (s, v) =
        call(&c, "CreateGroup", json!({"idempotency_key": "bad-3", "owner_user_id": 999_999_999})).await;
    assert_eq!((s, error(&v)), (404, "ERROR_USER_NOT_FOUND".into()), "{v}");
    let get = GetGroupRequest { group_id: 0, ..Default::default() };
    let mut req = tonic::Request::new(get);
    req.metadata_mut().insert(API_KEY_METADATA_KEY, GROUPS_KEY.parse().unwrap());
    assert_eq!(code(&api.get_group(req).await.unwrap_err()), ErrorCode::ErrorInvalidId);
    c.shutdown().await;
}
