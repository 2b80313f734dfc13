//! What a hostile client can make a node do, through the client gRPC API
//! (the hostile-clients issue): oversized or forged requests are refused
//! with a coded error before anything reaches the Raft log, and a profile
//! shows its phone number to its owner only.

use rim_proto::ErrorCode;
use rim_proto::error::CODE_METADATA_KEY;
use rim_proto::ids::{ShardId, UserId};
use rim_proto::v1::message_service_client::MessageServiceClient;
use rim_proto::v1::user_service_client::UserServiceClient;
use rim_proto::v1::*;
use rim_testkit::cluster::Cluster;
use rim_testkit::grpc::{Client, Session, code};
use rim_testkit::wait::serial;

/// The last log index of `shard` on its leader.
async fn log_index(c: &Cluster, shard: ShardId) -> u64 {
    let leader = c.leader(shard).await;
    let group = c.node(leader).core.group(shard).expect("the leader hosts the shard");
    group.raft.metrics().borrow().last_log_index.unwrap_or(0)
}

fn send_input(to: UserId, cmid: &str, content_type: ContentType, content: Vec<u8>) -> SendInput {
    SendInput {
        conversation_kind: ConversationKind::User as i32,
        conversation_id: to.0,
        client_msg_id: cmid.into(),
        content_type: content_type as i32,
        content: content.into(),
        ..Default::default()
    }
}

async fn send(client: &Client, s: &Session, input: SendInput) -> Result<SendOutput, tonic::Status> {
    let mut m = MessageServiceClient::new(client.channel.clone());
    m.send_message(Client::authed(s, input)).await.map(|r| r.into_inner())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_and_forged_sends_are_refused_before_the_log() {
    let _g = serial().await;
    let c = Cluster::start(3, 1).await;
    let client = c.client(1);
    let a = client.register_and_sign_in("limits_a").await;
    let b = client.register_and_sign_in("limits_b").await;
    let shard = c.shard_of_user(a.user);
    let before = log_index(&c, shard).await;

    // Content over the 64 KiB limit, in a request under the gRPC limit.
    let big = send_input(b.user, "big-1", ContentType::Text, vec![b'x'; 200 << 10]);
    let err = send(&client, &a, big).await.unwrap_err();
    assert_eq!(code(&err), ErrorCode::ErrorContentTooLarge, "{err:?}");
    // Types only the server makes.
    for t in [ContentType::Recall, ContentType::ReadReceipt, ContentType::Notification] {
        let forged = send_input(b.user, &format!("forged-{}", t as i32), t, b"x".to_vec());
        let err = send(&client, &a, forged).await.unwrap_err();
        assert_eq!(code(&err), ErrorCode::ErrorBadRequest, "{t:?}: {err:?}");
    }
    // A 10 MiB request: refused by the transport before decoding, with a code.
    let huge = send_input(b.user, "huge-1", ContentType::Text, vec![b'x'; 10 << 20]);
    let err = send(&client, &a, huge).await.unwrap_err();
    assert!(err.metadata().get(CODE_METADATA_KEY).is_some(), "no rim-code: {err:?}");
    assert_eq!(code(&err), ErrorCode::ErrorFrameTooLarge, "{err:?}");

    assert_eq!(log_index(&c, shard).await, before, "a refused request reached the Raft log");
    // An honest send still works, and is the only new entry.
    client.send_acked(&a, b.user, "fine-1", "hello").await;
    assert!(log_index(&c, shard).await > before);
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_phone_number_is_shown_to_its_owner_only() {
    let _g = serial().await;
    let c = Cluster::start(3, 1).await;
    let client = c.client(1);
    let phone = "+15550100";
    let owner = client.phone_sign_in(phone).await;
    let other = client.register_and_sign_in("limits_other").await;
    let mut users = UserServiceClient::new(client.channel.clone());

    let own = users.get_user(Client::authed(&owner, GetUserRequest { user_id: 0 })).await.unwrap();
    assert_eq!(own.into_inner().user.unwrap().phone, phone, "the owner sees it");
    let req = GetUserRequest { user_id: owner.user.0 };
    let seen = users.get_user(Client::authed(&other, req)).await.unwrap().into_inner().user.unwrap();
    assert_eq!((seen.user_id, seen.phone.as_str()), (owner.user.0, ""), "GetUser hides it");
    assert!(!seen.nickname.contains(phone), "nor does the default nickname show it: {}", seen.nickname);
    let req = GetUsersRequest { user_ids: vec![owner.user.0, other.user.0] };
    let seen = users.get_users(Client::authed(&other, req)).await.unwrap().into_inner().users;
    assert_eq!(seen.len(), 2);
    assert!(seen.iter().all(|u| u.phone.is_empty()), "GetUsers hides it: {seen:?}");
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_of_a_revoked_device_is_refused_by_its_next_call() {
    use rim_proto::v1::auth_service_client::AuthServiceClient;
    use rim_proto::v1::gateway_service_client::GatewayServiceClient;
    use rim_testkit::grpc::{endpoint, with_secret};

    let _g = serial().await;
    let c = Cluster::start(1, 1).await;
    let client = c.client(1);
    let s = client.register_and_sign_in("revoked_conn").await;
    let mut gw = GatewayServiceClient::new(endpoint(&c.configs[&1].listen).connect_lazy());
    let ctx = |token_version: Option<u64>| ConnContext {
        user_id: s.user.0,
        device_id: s.device.0,
        token_version,
        ..Default::default()
    };
    let input = SignInInput { user_id: s.user.0, device_id: s.device.0, token: s.token.clone() };
    let signed = gw
        .conn_sign_in(with_secret(ConnSignInRequest { conn: Some(ctx(None)), input: Some(input) }))
        .await
        .unwrap()
        .into_inner();
    assert!(signed.token_expires_ms > 0, "the gateway learns when to close the connection");
    let version = Some(signed.token_version);
    let sync = |token_version: Option<u64>| ConnSyncRequest {
        conn: Some(ctx(token_version)),
        input: Some(SyncInput::default()),
    };
    gw.sync(with_secret(sync(version))).await.expect("signed in: served");

    // The device logs out elsewhere (the connection's kick is not what this
    // tests): its connection's next call is refused.
    let mut auth = AuthServiceClient::new(client.channel.clone());
    auth.logout(Client::authed(&s, LogoutRequest {})).await.unwrap();
    let err = gw.sync(with_secret(sync(version))).await.unwrap_err();
    assert_eq!(code(&err), ErrorCode::ErrorTokenRevoked, "{err:?}");
    let err = gw
        .send(with_secret(ConnSendRequest {
            conn: Some(ctx(version)),
            input: Some(send_input(s.user, "after-logout", ContentType::Text, b"x".to_vec())),
            group: false,
        }))
        .await
        .unwrap_err();
    assert_eq!(code(&err), ErrorCode::ErrorTokenRevoked, "{err:?}");
    c.shutdown().await;
}
