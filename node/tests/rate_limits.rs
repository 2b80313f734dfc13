//! Rate limits and account rules against hostile clients (the
//! hostile-clients issue §4 and §5), through the client gRPC API of a real
//! cluster: sends per user, sign-ins per account and per address, the
//! password rules, registrations that are refused without burning the name,
//! and a password change that signs the other devices out.

use std::time::Duration;

use rim_proto::ErrorCode;
use rim_proto::error::{RETRY_AFTER_METADATA_KEY, retry_after_of_status};
use rim_proto::v1::auth_service_client::AuthServiceClient;
use rim_proto::v1::message_service_client::MessageServiceClient;
use rim_proto::v1::user_service_client::UserServiceClient;
use rim_proto::v1::*;
use rim_testkit::cluster::Cluster;
use rim_testkit::grpc::{Client, PASSWORD, Session, code};
use rim_testkit::wait::serial;
use tonic::transport::Channel;

fn text(to: &Session, cmid: &str) -> SendInput {
    SendInput {
        conversation_kind: ConversationKind::User as i32,
        conversation_id: to.user.0,
        client_msg_id: cmid.into(),
        content_type: ContentType::Text as i32,
        content: cmid.as_bytes().to_vec().into(),
        ..Default::default()
    }
}

async fn send(client: &Client, s: &Session, input: SendInput) -> Result<SendOutput, tonic::Status> {
    let mut m = MessageServiceClient::new(client.channel.clone());
    m.send_message(Client::authed(s, input)).await.map(|r| r.into_inner())
}

fn auth(client: &Client) -> AuthServiceClient<Channel> {
    AuthServiceClient::new(client.channel.clone())
}

async fn sign_in(client: &Client, username: &str, password: &str) -> Result<SignInReply, tonic::Status> {
    let req = SignInRequest { username: username.into(), password: password.into(), ..Default::default() };
    auth(client).sign_in(req).await.map(|r| r.into_inner())
}

async fn register(client: &Client, req: RegisterRequest) -> Result<RegisterReply, tonic::Status> {
    auth(client).register(req).await.map(|r| r.into_inner())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sends_and_sign_ins_are_limited_with_a_retry_hint() {
    let _g = serial().await;
    let c = Cluster::start_with(1, 1, |cfg| {
        // One message per 5 s after a burst of 3: the burst and the
        // refused attempt below take far less on any machine.
        cfg.limits.sends_per_sec = 0.2;
        cfg.limits.send_burst = 3.0;
        cfg.limits.sign_ins_per_account_per_min = 0.01;
        cfg.limits.sign_in_account_burst = 3.0;
    })
    .await;
    let client = c.client(1);
    let a = client.register_and_sign_in("rl_a").await;
    let b = client.register_and_sign_in("rl_b").await;

    // A burst of three, then ERROR_RATE_LIMITED with a hint; nothing stored.
    for i in 0..3 {
        send(&client, &a, text(&b, &format!("burst-{i}"))).await.unwrap();
    }
    let err = send(&client, &a, text(&b, "over")).await.unwrap_err();
    assert_eq!(code(&err), ErrorCode::ErrorRateLimited, "{err:?}");
    let hint = retry_after_of_status(&err);
    assert!((1..=5_000).contains(&hint), "{RETRY_AFTER_METADATA_KEY} = {hint}");
    // Another user's budget is their own.
    send(&client, &b, text(&a, "b-1")).await.unwrap();
    // After the hint, the same request goes through.
    tokio::time::sleep(Duration::from_millis(u64::from(hint) + 50)).await;
    send(&client, &a, text(&b, "over")).await.unwrap();
    let list = client.sync_all(&b).await.unwrap();
    let got: Vec<&str> =
        list.iter().filter(|m| m.sender_user_id == a.user.0).map(|m| m.client_msg_id.as_str()).collect();
    assert_eq!(got, ["burst-0", "burst-1", "burst-2", "over"], "the refused attempt stored nothing");

    // Sign-in attempts per account: "rl_a" signed in once above; two more
    // (right or wrong password) use its burst, then it is limited, while
    // another account is not.
    assert_eq!(
        code(&sign_in(&client, "rl_a", "wrong-password").await.unwrap_err()),
        ErrorCode::ErrorUnauthenticated
    );
    sign_in(&client, "rl_a", PASSWORD).await.unwrap();
    let err = sign_in(&client, "rl_a", PASSWORD).await.unwrap_err();
    assert_eq!(code(&err), ErrorCode::ErrorRateLimited, "{err:?}");
    assert!(retry_after_of_status(&err) > 0);
    sign_in(&client, "rl_b", PASSWORD).await.unwrap();
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn account_calls_are_limited_per_address() {
    let _g = serial().await;
    let c = Cluster::start_with(1, 1, |cfg| {
        cfg.limits.auth_per_ip_per_sec = 0.01;
        cfg.limits.auth_ip_burst = 3.0;
        // The test client is local: count it like a remote one.
        cfg.limits.auth_limit_loopback = true;
    })
    .await;
    let client = c.client(1);
    let req = |name: &str| RegisterRequest {
        username: name.into(),
        password: PASSWORD.into(),
        ..Default::default()
    };
    register(&client, req("ip_1")).await.unwrap();
    register(&client, req("ip_2")).await.unwrap();
    let r = sign_in(&client, "ip_1", PASSWORD).await.unwrap();
    let session = Session {
        user: rim_proto::ids::UserId(r.user_id),
        device: rim_proto::ids::DeviceId(r.device_id),
        token: r.token,
    };
    // Register, SignIn and SignInByPhone share the address's budget.
    let err = register(&client, req("ip_3")).await.unwrap_err();
    assert_eq!(code(&err), ErrorCode::ErrorRateLimited, "{err:?}");
    let err = sign_in(&client, "ip_2", PASSWORD).await.unwrap_err();
    assert_eq!(code(&err), ErrorCode::ErrorRateLimited, "{err:?}");
    let phone =
        SignInByPhoneRequest { phone: "+15550199".into(), code: "123456".into(), ..Default::default() };
    let err = auth(&client).sign_in_by_phone(phone).await.unwrap_err();
    assert_eq!(code(&err), ErrorCode::ErrorRateLimited, "{err:?}");
    assert!(retry_after_of_status(&err) > 1_000, "the hint says how long: {err:?}");
    // The limited registration did not claim the name; other calls of a
    // signed-in user are not account calls.
    let mut users = UserServiceClient::new(client.channel.clone());
    let find = FindUserRequest { username: "ip_3".into() };
    let err = users.find_user(Client::authed(&session, find)).await.unwrap_err();
    assert_eq!(code(&err), ErrorCode::ErrorUserNotFound, "{err:?}");
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn account_rules_hold_and_refusals_burn_nothing() {
    let _g = serial().await;
    let c = Cluster::start(1, 1).await;
    let client = c.client(1);

    // Passwords are 8..=256 bytes.
    let short =
        RegisterRequest { username: "rules_a".into(), password: "7-bytes".into(), ..Default::default() };
    assert_eq!(code(&register(&client, short).await.unwrap_err()), ErrorCode::ErrorBadRequest);
    // A field the state machine refuses is refused before the name is
    // claimed: the same name registers fine afterwards.
    let long = RegisterRequest {
        username: "rules_a".into(),
        password: PASSWORD.into(),
        nickname: "n".repeat(300),
        ..Default::default()
    };
    assert_eq!(code(&register(&client, long).await.unwrap_err()), ErrorCode::ErrorBadRequest);
    let ok = RegisterRequest { username: "rules_a".into(), password: PASSWORD.into(), ..Default::default() };
    register(&client, ok).await.expect("the refused registrations left the name free");

    // A device type that is not in the enum.
    let req = SignInRequest {
        username: "rules_a".into(),
        password: PASSWORD.into(),
        device: Some(DeviceInfo { device_type: 99, ..Default::default() }),
        ..Default::default()
    };
    assert_eq!(code(&auth(&client).sign_in(req).await.unwrap_err()), ErrorCode::ErrorBadRequest);
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_change_signs_the_other_devices_out_unless_asked_not_to() {
    let _g = serial().await;
    let c = Cluster::start(1, 1).await;
    let client = c.client(1);
    let phone = client.register_and_sign_in("pwc").await;
    let laptop = client.sign_in("pwc").await;
    let tablet = client.sign_in("pwc").await;
    let mut users = UserServiceClient::new(client.channel.clone());
    let me = |s: &Session| Client::authed(s, GetUserRequest { user_id: 0 });

    // Keeping the other devices is an option.
    let keep = UpdateUserRequest {
        new_password: Some("second-password".into()),
        old_password: PASSWORD.into(),
        keep_other_devices: true,
        ..Default::default()
    };
    users.update_user(Client::authed(&phone, keep)).await.unwrap();
    users.get_user(me(&laptop)).await.expect("kept signed in");

    // By default the others are revoked; the caller stays signed in.
    let change = UpdateUserRequest {
        new_password: Some("third-password".into()),
        old_password: "second-password".into(),
        ..Default::default()
    };
    users.update_user(Client::authed(&laptop, change)).await.unwrap();
    users.get_user(me(&laptop)).await.expect("the caller stays signed in");
    for other in [&phone, &tablet] {
        let err = users.get_user(me(other)).await.unwrap_err();
        assert_eq!(code(&err), ErrorCode::ErrorTokenRevoked, "{err:?}");
    }
    assert_eq!(
        code(&sign_in(&client, "pwc", "second-password").await.unwrap_err()),
        ErrorCode::ErrorUnauthenticated
    );
    sign_in(&client, "pwc", "third-password").await.unwrap();
    c.shutdown().await;
}
