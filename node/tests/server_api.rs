//! The server API (rim issue 15 §2; docs/server-api.md), over gRPC and
//! HTTP/JSON: users upserted once, tokens that sign devices in through a
//! gateway, revocation that closes their connections cluster-wide (with
//! the close latency measured), pushes deduplicated by their idempotency
//! key, API keys and their scopes, bounds, and the OpenAPI document
//! checked against the code.
#![allow(missing_docs)]

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use base64::Engine as _;
use prost::Message as _;
use rim_node::credentials::{API_KEY_METADATA_KEY, ApiKeyConfig, api_key_digest};
use rim_node::http_api;
use rim_proto::ErrorCode;
use rim_proto::ids::{DeviceId, UserId};
use rim_proto::server_api::server_api_client::ServerApiClient;
use rim_proto::server_api::*;
use rim_proto::v1::{Command, ContentType, GroupKind, KickPush, SignInInput};
use rim_testkit::cluster::Cluster;
use rim_testkit::grpc::{Session, code};
use rim_testkit::wait::{WAIT, serial};
use serde_json::{Value, json};

// The gateway tests' TCP client (and the `Device` it names), shared.
#[path = "../../gateway/tests/cluster/mod.rs"]
mod cluster;
#[path = "../../gateway/tests/wire/mod.rs"]
mod wire;
use wire::Client as TcpClient;

/// Every scope.
const FULL_KEY: &str = "server-api-key-full-0123456789";
/// Scope `users` only.
const USERS_KEY: &str = "server-api-key-users-0123456789";

fn keys(cfg: &mut rim_node::config::NodeConfig) {
    let key = |name: &str, key: &str, scopes: &[&str]| ApiKeyConfig {
        name: name.into(),
        sha256: api_key_digest(key),
        scopes: scopes.iter().map(|s| s.to_string()).collect(),
    };
    cfg.api_keys = vec![
        key("backend", FULL_KEY, &["users", "tokens", "sessions", "push"]),
        key("profiles", USERS_KEY, &["users"]),
    ];
}

/// A JSON call; the status and the body.
async fn http(c: &Cluster, key: Option<&str>, method: &str, body: Vec<u8>) -> (u16, Value) {
    let url = format!("http://{}/v1/{method}", c.configs[&1].http_listen);
    let mut req = reqwest::Client::new().post(url).header("content-type", "application/json").body(body);
    if let Some(k) = key {
        req = req.header("authorization", format!("Bearer {k}"));
    }
    let resp = req.timeout(WAIT).send().await.expect("the HTTP API answers");
    let status = resp.status().as_u16();
    let bytes = resp.bytes().await.unwrap();
    (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

/// A JSON call that must succeed (retried while the cluster is busy
/// electing: 503 and 504 are retryable).
async fn ok(c: &Cluster, method: &str, body: Value) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let (status, out) = http(c, Some(FULL_KEY), method, body.to_string().into_bytes()).await;
        if status == 200 {
            return out;
        }
        assert!(status == 503 || status == 504, "{method} {body}: {status} {out}");
        assert!(Instant::now() < deadline, "{method} never succeeded: {out}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn grpc(c: &Cluster) -> ServerApiClient<tonic::transport::Channel> {
    let addr = &c.configs[&2].listen;
    ServerApiClient::new(
        tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap().connect_lazy(),
    )
}

fn keyed<T>(key: Option<&str>, msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.set_timeout(WAIT);
    if let Some(k) = key {
        r.metadata_mut().insert(API_KEY_METADATA_KEY, k.parse().unwrap());
    }
    r
}

/// Signs in over TCP at the gateway; the reply's code.
async fn sign_in(addr: std::net::SocketAddr, user: u64, device: u64, token: &str) -> (TcpClient, ErrorCode) {
    let mut c = TcpClient::connect(addr).await;
    let input = SignInInput { user_id: user, device_id: device, token: token.into() };
    let reply = c.request(Command::SignIn, input.encode_to_vec()).await;
    (c, ErrorCode::try_from(reply.code).unwrap())
}

/// Waits for the connection's KICK (token revoked) and its end; when the
/// kick arrived.
async fn kicked(mut c: TcpClient) -> Instant {
    let mut at = None;
    while let Some(p) = c.read_packet(Instant::now() + WAIT).await {
        if p.command == Command::Kick as i32 {
            let kick = KickPush::decode(p.content).unwrap();
            assert_eq!(kick.code, ErrorCode::ErrorTokenRevoked as i32, "{kick:?}");
            at.get_or_insert_with(Instant::now);
        }
    }
    at.expect("the connection ended without a KICK")
}

fn token_of(v: &Value) -> (u64, u64, String) {
    (
        v["user_id"].as_u64().unwrap(),
        v["device_id"].as_u64().unwrap(),
        v["token"].as_str().unwrap().to_string(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_tokens_and_revocation_over_http_and_grpc() {
    let _g = serial().await;
    let c = Cluster::start_with(3, 2, keys).await;
    let gw = c.gateway("server-api").await;
    let addr = gw.tcp_addr().unwrap();
    let mut api = grpc(&c);

    // Upsert: twice over HTTP, once over gRPC: one user.
    let upsert = json!({"idempotency_key": "u-1", "external_user_id": "alice", "nickname": "Alice"});
    let alice = ok(&c, "UpsertUser", upsert.clone()).await["user_id"].as_u64().unwrap();
    assert!(alice > 0);
    assert_eq!(ok(&c, "UpsertUser", upsert).await["user_id"].as_u64(), Some(alice));
    let again = UpsertUserRequest {
        idempotency_key: "u-2".into(),
        external_user_id: "alice".into(),
        nickname: "Alice B.".into(),
        ..Default::default()
    };
    assert_eq!(api.upsert_user(keyed(Some(FULL_KEY), again)).await.unwrap().into_inner().user_id, alice);
    let bob = ok(&c, "UpsertUser", json!({"idempotency_key": "u-3", "external_user_id": "bob"})).await;
    let bob = bob["user_id"].as_u64().unwrap();
    assert_ne!(bob, alice);

    // Tokens: over HTTP by external id, over gRPC by rim id; the same
    // device again for the same external device id.
    let issue = json!({"idempotency_key": "t-1", "external_user_id": "alice", "device_external_id": "phone"});
    let (user, phone, phone_token) = token_of(&ok(&c, "IssueToken", issue.clone()).await);
    assert_eq!(user, alice);
    assert_eq!(token_of(&ok(&c, "IssueToken", issue).await).1, phone, "one device per external id");
    let req = IssueTokenRequest {
        idempotency_key: "t-2".into(),
        user_id: bob,
        device_external_id: "tablet".into(),
        ttl_secs: 600,
        ..Default::default()
    };
    let bob_token = api.issue_token(keyed(Some(FULL_KEY), req)).await.unwrap().into_inner();
    assert_eq!(bob_token.user_id, bob);
    let left = bob_token.expires_at_ms - rim_node::group::now_ms();
    assert!(left > 0 && left <= 600_000, "the ttl asked for: {left} ms");

    // The devices sign in through the gateway and chat.
    let (mut a, code_a) = sign_in(addr, alice, phone, &phone_token).await;
    assert_eq!(code_a, ErrorCode::Ok);
    let (mut b, code_b) = sign_in(addr, bob, bob_token.device_id, &bob_token.token).await;
    assert_eq!(code_b, ErrorCode::Ok);
    let sent = a.send_text(bob, "hello-bob").await;
    let push = b.push(sent.seq.max(1)).await;
    assert_eq!(push.message.unwrap().sender_user_id, alice);

    // A persisted push with an idempotency key, twice (HTTP, then gRPC):
    // one message, which bob's device receives once.
    let body = json!({"content_type": ContentType::Text as i32, "content": "cHVzaGVk", "sender_user_id": 0});
    let p1 = ok(
        &c,
        "PushToUsers",
        json!({"idempotency_key": "p-1", "user_ids": [bob], "body": body, "persist": true}),
    )
    .await;
    let again = PushToUsersRequest {
        idempotency_key: "p-1".into(),
        user_ids: vec![bob],
        body: Some(PushBody {
            content_type: ContentType::Text as i32,
            content: b"pushed".to_vec().into(),
            sender_user_id: 0,
        }),
        persist: true,
    };
    let p2 = api.push_to_users(keyed(Some(FULL_KEY), again)).await.unwrap().into_inner();
    assert!(p2.message_id > 0);
    assert_eq!(p1["message_id"].as_u64(), Some(p2.message_id), "a retry returns the first push");
    // The key reused for another body (HTTP) or other recipients (gRPC): refused.
    let other = json!({"idempotency_key": "p-1", "user_ids": [bob], "persist": true,
                       "body": {"content_type": ContentType::Text as i32, "content": "b3RoZXI="}});
    let (status, err) = http(&c, Some(FULL_KEY), "PushToUsers", other.to_string().into_bytes()).await;
    assert_eq!((status, err["code"].as_str()), (409, Some("ERROR_ALREADY_EXISTS")), "{err}");
    let elsewhere = PushToUsersRequest {
        idempotency_key: "p-1".into(),
        user_ids: vec![bob, alice],
        body: Some(PushBody {
            content_type: ContentType::Text as i32,
            content: b"pushed".to_vec().into(),
            sender_user_id: 0,
        }),
        persist: true,
    };
    let e = api.push_to_users(keyed(Some(FULL_KEY), elsewhere)).await.unwrap_err();
    assert_eq!((e.code(), code(&e)), (tonic::Code::AlreadyExists, ErrorCode::ErrorAlreadyExists));
    let session =
        Session { user: UserId(bob), device: DeviceId(bob_token.device_id), token: bob_token.token.clone() };
    let client = c.client(1);
    let list = client.sync_all_retry(&session).await;
    let pushed: Vec<_> = list.iter().filter(|m| m.content.as_ref() == b"pushed").collect();
    assert_eq!(pushed.len(), 1, "stored once: {list:?}");

    // The same for a persisted group push (the group send's record).
    let group = client.create_group(&session, GroupKind::Small, &[UserId(alice)]).await.group_id;
    let to_group = |text: &str| {
        let content = base64::engine::general_purpose::STANDARD.encode(text);
        json!({"idempotency_key": "g-1", "group_id": group, "persist": true,
               "body": {"content_type": ContentType::Text as i32, "content": content}})
    };
    let g1 = ok(&c, "PushToGroup", to_group("team")).await;
    assert!(g1["message_id"].as_u64().unwrap() > 0);
    assert_eq!(ok(&c, "PushToGroup", to_group("team")).await, g1, "a retry returns the first push");
    let (status, err) =
        http(&c, Some(FULL_KEY), "PushToGroup", to_group("another").to_string().into_bytes()).await;
    assert_eq!((status, err["code"].as_str()), (409, Some("ERROR_ALREADY_EXISTS")), "{err}");

    // Revoke alice's phone over HTTP: the gateway closes its connection,
    // its token no longer signs in; a new token does.
    ok(
        &c,
        "RevokeDevice",
        json!({"idempotency_key": "r-1", "external_user_id": "alice", "device_external_id": "phone"}),
    )
    .await;
    kicked(a).await;
    assert_eq!(sign_in(addr, alice, phone, &phone_token).await.1, ErrorCode::ErrorTokenRevoked);
    let fresh = ok(
        &c,
        "IssueToken",
        json!({"idempotency_key": "t-3", "user_id": alice, "device_external_id": "phone"}),
    )
    .await;
    let (_, same_phone, fresh_token) = token_of(&fresh);
    assert_eq!(same_phone, phone);
    assert_eq!(sign_in(addr, alice, phone, &fresh_token).await.1, ErrorCode::Ok);

    // Log bob out everywhere over gRPC.
    let out = api
        .logout_user(keyed(
            Some(FULL_KEY),
            LogoutUserRequest { idempotency_key: "l-1".into(), user_id: bob, ..Default::default() },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(out.devices_revoked, 1);
    kicked(b).await;
    assert_eq!(
        sign_in(addr, bob, bob_token.device_id, &bob_token.token).await.1,
        ErrorCode::ErrorTokenRevoked
    );

    // Unknown users and devices.
    let (status, err) = http(
        &c,
        Some(FULL_KEY),
        "IssueToken",
        json!({"idempotency_key": "t-4", "external_user_id": "nobody", "device_external_id": "x"})
            .to_string()
            .into_bytes(),
    )
    .await;
    assert_eq!((status, err["code"].as_str()), (404, Some("ERROR_USER_NOT_FOUND")));

    gw.shutdown().await;
    c.shutdown().await;
}

/// Revocation closes sessions cluster-wide: devices connected through two
/// gateways, each revoked over HTTP; the time from sending the revocation
/// to the connection's KICK, printed as p50/p99 (docs/benchmarks.md).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_over_http_closes_connections_at_every_gateway() {
    const DEVICES: usize = 10;
    let _g = serial().await;
    let c = Cluster::start_with(3, 2, keys).await;
    let gateways = [c.gateway("revoke-a").await, c.gateway("revoke-b").await];
    let mut latencies = Vec::new();
    for i in 0..DEVICES {
        let ext = format!("user-{i}");
        ok(&c, "UpsertUser", json!({"idempotency_key": format!("u{i}"), "external_user_id": ext})).await;
        let issue =
            json!({"idempotency_key": format!("t{i}"), "external_user_id": ext, "device_external_id": "d"});
        let (user, device, token) = token_of(&ok(&c, "IssueToken", issue).await);
        let addr = gateways[i % 2].tcp_addr().unwrap();
        let (conn, code) = sign_in(addr, user, device, &token).await;
        assert_eq!(code, ErrorCode::Ok);
        let waiter = tokio::spawn(kicked(conn));
        let started = Instant::now();
        ok(&c, "LogoutUser", json!({"idempotency_key": format!("l{i}"), "user_id": user})).await;
        let at = waiter.await.unwrap();
        latencies.push(at.saturating_duration_since(started));
        assert_eq!(sign_in(addr, user, device, &token).await.1, ErrorCode::ErrorTokenRevoked);
    }
    latencies.sort();
    let p = |q: f64| latencies[((latencies.len() as f64 * q).ceil() as usize).clamp(1, latencies.len()) - 1];
    println!(
        "server API revocation → connection closed, {DEVICES} devices over 2 gateways: p50 {:?} p99 {:?} max {:?}",
        p(0.5),
        p(0.99),
        latencies.last().unwrap()
    );
    for gw in gateways {
        gw.shutdown().await;
    }
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_scopes_and_bounds() {
    let _g = serial().await;
    let c = Cluster::start_with(3, 2, keys).await;
    let mut api = grpc(&c);
    let upsert = json!({"idempotency_key": "k", "external_user_id": "carol"}).to_string().into_bytes();
    let error = |v: &Value| v["code"].as_str().unwrap_or_default().to_string();

    // HTTP: no key, a wrong key: 401; a key without the scope: 403.
    let (s, v) = http(&c, None, "UpsertUser", upsert.clone()).await;
    assert_eq!((s, error(&v)), (401, "ERROR_UNAUTHENTICATED".into()));
    let (s, v) = http(&c, Some("not-a-key"), "UpsertUser", upsert.clone()).await;
    assert_eq!((s, error(&v)), (401, "ERROR_UNAUTHENTICATED".into()));
    let issue = json!({"idempotency_key": "k", "external_user_id": "carol", "device_external_id": "d"});
    let (s, v) = http(&c, Some(USERS_KEY), "IssueToken", issue.to_string().into_bytes()).await;
    assert_eq!((s, error(&v)), (403, "ERROR_PERMISSION_DENIED".into()));
    let push = json!({"idempotency_key": "k", "user_ids": [1], "body": {"content_type": 1, "content": ""}});
    let (s, v) = http(&c, Some(USERS_KEY), "PushToUsers", push.to_string().into_bytes()).await;
    assert_eq!((s, error(&v)), (403, "ERROR_PERMISSION_DENIED".into()), "push scopes too");

    // gRPC: the same.
    let req = || UpsertUserRequest {
        idempotency_key: "k".into(),
        external_user_id: "carol".into(),
        ..Default::default()
    };
    assert_eq!(
        code(&api.upsert_user(keyed(None, req())).await.unwrap_err()),
        ErrorCode::ErrorUnauthenticated
    );
    assert_eq!(
        code(&api.upsert_user(keyed(Some("not-a-key"), req())).await.unwrap_err()),
        ErrorCode::ErrorUnauthenticated
    );
    let e = api.upsert_user(keyed(Some("not-a-key"), req())).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated);
    let issue = IssueTokenRequest {
        idempotency_key: "k".into(),
        user_id: 1,
        device_external_id: "d".into(),
        ..Default::default()
    };
    let e = api.issue_token(keyed(Some(USERS_KEY), issue)).await.unwrap_err();
    assert_eq!((e.code(), code(&e)), (tonic::Code::PermissionDenied, ErrorCode::ErrorPermissionDenied));
    assert!(api.upsert_user(keyed(Some(USERS_KEY), req())).await.is_ok(), "its own scope");

    // Bounds: the idempotency key, external ids, the ttl, the body.
    let long_key = "k".repeat(65);
    for body in [
        json!({"idempotency_key": long_key, "external_user_id": "carol"}),
        json!({"idempotency_key": "", "external_user_id": "carol"}),
        json!({"idempotency_key": "k", "external_user_id": "c".repeat(129)}),
        json!({"idempotency_key": "k", "external_user_id": "carol", "unknown_field": 1}),
    ] {
        let (s, v) = http(&c, Some(FULL_KEY), "UpsertUser", body.to_string().into_bytes()).await;
        assert_eq!((s, error(&v)), (400, "ERROR_BAD_REQUEST".into()), "{body}");
    }
    let (s, v) = http(&c, Some(FULL_KEY), "UpsertUser", b"{not json".to_vec()).await;
    assert_eq!((s, error(&v)), (400, "ERROR_BAD_REQUEST".into()));
    let too_long = json!({"idempotency_key": "k", "external_user_id": "carol", "device_external_id": "d", "ttl_secs": u64::MAX});
    let (s, v) = http(&c, Some(FULL_KEY), "IssueToken", too_long.to_string().into_bytes()).await;
    assert_eq!((s, error(&v)), (400, "ERROR_BAD_REQUEST".into()), "ttl above token_ttl_secs");
    let huge = vec![b' '; http_api::MAX_BODY_BYTES + 1];
    let (s, v) = http(&c, Some(FULL_KEY), "UpsertUser", huge).await;
    assert_eq!((s, error(&v)), (413, "ERROR_FRAME_TOO_LARGE".into()));
    let big = UpsertUserRequest {
        idempotency_key: "k".into(),
        external_user_id: "carol".into(),
        extra: "x".repeat(http_api::MAX_BODY_BYTES),
        ..Default::default()
    };
    let e = api.upsert_user(keyed(Some(FULL_KEY), big)).await.unwrap_err();
    assert_eq!(code(&e), ErrorCode::ErrorFrameTooLarge, "{e:?}");
    let long = UpsertUserRequest {
        idempotency_key: long_key,
        external_user_id: "carol".into(),
        ..Default::default()
    };
    assert_eq!(
        code(&api.upsert_user(keyed(Some(FULL_KEY), long)).await.unwrap_err()),
        ErrorCode::ErrorBadRequest
    );
    c.shutdown().await;
}

/// docs/openapi.json describes exactly the routes the router serves, and
/// each schema has exactly the JSON fields of its proto message (both
/// taken from the code: the route table and the messages' serialization).
#[test]
fn the_openapi_document_matches_the_code() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/openapi.json");
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let routes = http_api::routes();
    let served: BTreeSet<&str> = routes.iter().map(|r| r.path).collect();
    let documented: BTreeSet<&str> = doc["paths"].as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(served, documented, "routes served vs documented");
    let schema_ref =
        |v: &Value| v["$ref"].as_str().unwrap().trim_start_matches("#/components/schemas/").to_string();
    for r in &routes {
        let op = &doc["paths"][r.path]["post"];
        assert_eq!(
            schema_ref(&op["requestBody"]["content"]["application/json"]["schema"]),
            r.request,
            "{}",
            r.path
        );
        assert_eq!(
            schema_ref(&op["responses"]["200"]["content"]["application/json"]["schema"]),
            r.reply,
            "{}",
            r.path
        );
    }
    let schemas = doc["components"]["schemas"].as_object().unwrap();
    let messages = http_api::messages();
    for (name, fields) in &messages {
        let props = schemas.get(*name).unwrap_or_else(|| panic!("{name} is not documented"))["properties"]
            .as_object()
            .unwrap();
        let documented: BTreeSet<&str> = props.keys().map(String::as_str).collect();
        let real: BTreeSet<&str> = fields.iter().map(String::as_str).collect();
        assert_eq!(documented, real, "the fields of {name}");
    }
    let known: BTreeSet<&str> = messages.iter().map(|(n, _)| *n).chain(["Error"]).collect();
    let all: BTreeSet<&str> = schemas.keys().map(String::as_str).collect();
    assert_eq!(all, known, "schemas of no message");
    for r in &routes {
        assert!(
            known.contains(r.request) && known.contains(r.reply),
            "{r:?}: messages() lists every route's"
        );
    }
}
