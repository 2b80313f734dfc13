//! Separate credentials (the hostile-clients issue §2), against a real node:
//! the gateway secret, the admin secret and the push API's keys each open
//! only their own services, and token keys rotate without signing anybody
//! out.

use rim_node::credentials::{API_KEY_METADATA_KEY, ApiKeyConfig, TokenKeyConfig, api_key_digest};
use rim_proto::ErrorCode;
use rim_proto::ids::{DeviceId, UserId};
use rim_proto::metadata::CLUSTER_SECRET_METADATA_KEY;
use rim_proto::v1::admin_service_client::AdminServiceClient;
use rim_proto::v1::auth_service_client::AuthServiceClient;
use rim_proto::v1::gateway_service_client::GatewayServiceClient;
use rim_proto::v1::push_service_client::PushServiceClient;
use rim_proto::v1::raft_service_client::RaftServiceClient;
use rim_proto::v1::user_service_client::UserServiceClient;
use rim_proto::v1::*;
use rim_testkit::cluster::Cluster;
use rim_testkit::grpc::{Client, PASSWORD, Session, code, endpoint};
use rim_testkit::wait::{WAIT, retry, serial};
use tonic::transport::Channel;

const GATEWAY: &str = "gateway-secret-for-tests";
const ADMIN: &str = "admin-secret-for-tests";
const API_KEY: &str = "api-key-of-the-backend";

fn with<T>(key: &'static str, value: &str, msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut().insert(key, value.parse().unwrap());
    r
}

fn secret<T>(value: &str, msg: T) -> tonic::Request<T> {
    with(CLUSTER_SECRET_METADATA_KEY, value, msg)
}

fn internal(c: &Cluster) -> Channel {
    endpoint(&c.configs[&1].listen).connect_lazy()
}

fn code_of<T>(r: Result<T, tonic::Status>) -> ErrorCode {
    r.map_or_else(|e| code(&e), |_| ErrorCode::Ok)
}

fn push_users(to: u64) -> PushToUsersRequest {
    let content = PushContent { content_type: 1001, content: b"hi".to_vec().into(), ..Default::default() };
    PushToUsersRequest { user_ids: vec![to], content: Some(content), persist: true }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_credential_opens_only_its_own_services() {
    let _g = serial().await;
    let c = Cluster::start_with(1, 1, |cfg| {
        cfg.gateway_secret = GATEWAY.into();
        cfg.admin_secret = ADMIN.into();
        cfg.api_keys = vec![ApiKeyConfig {
            name: "backend".into(),
            sha256: api_key_digest(API_KEY),
            scopes: vec!["push.users".into()],
        }];
    })
    .await;
    let user = c.client(1).register_and_sign_in("cred_user").await;
    let ch = internal(&c);
    let denied = ErrorCode::ErrorPermissionDenied;

    // Raft: nodes only.
    let mut raft = RaftServiceClient::new(ch.clone());
    for s in [GATEWAY, ADMIN] {
        assert_eq!(code_of(raft.vote(secret(s, RaftRequest::default())).await), denied, "{s}");
    }
    // Gateways: their secret passes (the token check then refuses the
    // made-up sign-in); the admin secret and an API key do not.
    let mut gw = GatewayServiceClient::new(ch.clone());
    let sign_in = || ConnSignInRequest {
        conn: Some(ConnContext { user_id: user.user.0, device_id: user.device.0, ..Default::default() }),
        input: Some(SignInInput { user_id: user.user.0, device_id: user.device.0, token: "forged".into() }),
    };
    assert_eq!(code_of(gw.conn_sign_in(secret(GATEWAY, sign_in())).await), ErrorCode::ErrorUnauthenticated);
    assert_eq!(code_of(gw.conn_sign_in(secret(ADMIN, sign_in())).await), denied);
    assert_eq!(code_of(gw.conn_sign_in(with(API_KEY_METADATA_KEY, API_KEY, sign_in())).await), denied);
    // Admin: a gateway reads the map but changes nothing; the admin may.
    let mut admin = AdminServiceClient::new(ch.clone());
    let map = GetClusterMapRequest { known_version: 0 };
    assert_eq!(code_of(admin.get_cluster_map(secret(GATEWAY, map)).await), ErrorCode::Ok);
    let add = AddNodeRequest::default();
    assert_eq!(code_of(admin.add_node(secret(GATEWAY, add.clone())).await), denied);
    assert_eq!(
        code_of(admin.add_node(secret(ADMIN, add)).await),
        ErrorCode::ErrorBadRequest,
        "past the check"
    );
    // Push: the key within its scopes only; nothing else once keys exist.
    let mut push = PushServiceClient::new(ch.clone());
    let ok = push.push_to_users(with(API_KEY_METADATA_KEY, API_KEY, push_users(user.user.0))).await;
    assert_eq!(code_of(ok), ErrorCode::Ok);
    let all = PushToAllRequest { content: Some(PushContent::default()), ..Default::default() };
    assert_eq!(code_of(push.push_to_all(with(API_KEY_METADATA_KEY, API_KEY, all)).await), denied, "scope");
    let wrong = with(API_KEY_METADATA_KEY, "api-key-of-someone-else", push_users(user.user.0));
    assert_eq!(code_of(push.push_to_users(wrong).await), denied);
    for s in [rim_testkit::grpc::SECRET, GATEWAY, ADMIN] {
        assert_eq!(code_of(push.push_to_users(secret(s, push_users(user.user.0))).await), denied, "{s}");
    }
    c.shutdown().await;
}

/// `GetUser` as `s`: its code once it is not a retryable one (the node may
/// still be electing itself after a restart).
async fn get_user(c: &Cluster, s: &Session) -> ErrorCode {
    let mut users = UserServiceClient::new(c.client(1).channel.clone());
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let got = code_of(users.get_user(Client::authed(s, GetUserRequest { user_id: 0 })).await);
        if !got.is_retryable() || std::time::Instant::now() > deadline {
            return got;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

async fn sign_in(c: &Cluster, name: &str) -> Session {
    let ch = c.client(1).channel.clone();
    let r = retry(WAIT, "sign in", || {
        let mut auth = AuthServiceClient::new(ch.clone());
        let req = SignInRequest { username: name.into(), password: PASSWORD.into(), ..Default::default() };
        async move { auth.sign_in(req).await }
    })
    .await
    .into_inner();
    Session { user: UserId(r.user_id), device: DeviceId(r.device_id), token: r.token }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_keys_rotate_without_signing_anybody_out() {
    let _g = serial().await;
    let key = |id: &str| TokenKeyConfig { id: id.into(), secret: format!("token-secret-of-{id}") };
    let mut c = Cluster::start_with(1, 1, |cfg| cfg.token_keys = vec![key("old")]).await;
    let first = c.client(1).register_and_sign_in("rotating").await;
    assert_eq!(get_user(&c, &first).await, ErrorCode::Ok);

    // Both keys, the new one signing: old tokens still work.
    let restart = async |c: &mut Cluster, keys: Vec<TokenKeyConfig>, signing: &str| {
        c.stop_node(1).await;
        let cfg = c.configs.get_mut(&1).unwrap();
        cfg.token_keys = keys;
        cfg.token_signing_key = signing.into();
        c.start_node(1).await;
        c.wait_ready().await;
    };
    restart(&mut c, vec![key("old"), key("new")], "new").await;
    assert_eq!(get_user(&c, &first).await, ErrorCode::Ok, "a token of the old key");
    let second = sign_in(&c, "rotating").await;
    assert_eq!(get_user(&c, &second).await, ErrorCode::Ok);

    // The old key removed: its tokens are refused, the new key's are not.
    restart(&mut c, vec![key("new")], "new").await;
    assert_eq!(get_user(&c, &first).await, ErrorCode::ErrorUnauthenticated);
    assert_eq!(get_user(&c, &second).await, ErrorCode::Ok);
    c.shutdown().await;
}
