//! A gRPC client of one node's client listener, as tests use it: register
//! and sign in users, send and read, groups, each typed with the id types.
//!
//! Two kinds of helpers:
//!
//! * **Plain calls** ([`Client::send`], [`Client::sync_all`],
//!   [`Client::send_group`], [`Client::sync_group_all`]) return the call's
//!   `Result`, for tests that check refusals. [`Client::register`] and
//!   [`Client::sign_in`] panic on any error: a test's setup, on a cluster
//!   that is ready.
//! * **Retrying calls** ([`Client::register_and_sign_in`],
//!   [`Client::phone_sign_in`], [`Client::send_acked`],
//!   [`Client::sync_all_retry`], [`Client::create_group`]) repeat retryable
//!   errors under a deadline (see [`retry`]), for tests that run through
//!   leader changes and restarts. A retried send keeps its `client_msg_id`,
//!   so it is never a second message.

use std::time::{Duration, Instant};

use rim_proto::ErrorCode;
use rim_proto::ids::{DeviceId, GroupId, UserId};
use rim_proto::metadata::{
    CLUSTER_SECRET_METADATA_KEY, DEVICE_ID_METADATA_KEY, TOKEN_METADATA_KEY, USER_ID_METADATA_KEY,
};
use rim_proto::v1::auth_service_client::AuthServiceClient;
use rim_proto::v1::group_service_client::GroupServiceClient;
use rim_proto::v1::message_service_client::MessageServiceClient;
use rim_proto::v1::{
    ContentType, ConversationKind, CreateGroupRequest, Group, GroupKind, Message, RegisterRequest, SendInput,
    SendOutput, SignInByPhoneRequest, SignInRequest, SyncGroupInput, SyncInput,
};
use tonic::transport::{Channel, Endpoint};

use crate::wait::retry;

/// The cluster secret of every test cluster (at least 16 characters).
pub const SECRET: &str = "test-cluster-secret-0123456789";
/// The fixed phone sign-in code of every test node (`dev_code`).
pub const DEV_CODE: &str = "123456";
/// The password of every user the helpers register.
pub const PASSWORD: &str = "secret-pw";

/// How long one call may take before the client gives up on it.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the retrying helpers keep retrying.
const RETRY_FOR: Duration = Duration::from_secs(30);

/// A lazily connected endpoint of `addr` (`host:port`, plain HTTP/2).
pub fn endpoint(addr: &str) -> Endpoint {
    endpoint_with(addr, None)
}

/// [`endpoint`], over TLS with `tls` when it is set.
pub fn endpoint_with(addr: &str, tls: Option<&rim_cluster::LinkTls>) -> Endpoint {
    rim_cluster::tls::endpoint(addr, tls)
        .unwrap_or_else(|e| panic!("bad address {addr}: {e}"))
        .connect_timeout(Duration::from_secs(2))
}

/// A request to a node's internal listener: `msg` with the cluster secret
/// ([`SECRET`]) and a call timeout.
pub fn with_secret<T>(msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.set_timeout(CALL_TIMEOUT);
    r.metadata_mut().insert(CLUSTER_SECRET_METADATA_KEY, SECRET.parse().expect("secret metadata"));
    r
}

/// A signed-in device: what authenticated calls carry.
#[derive(Clone, Debug)]
pub struct Session {
    /// The signed-in user.
    pub user: UserId,
    /// The device the sign-in created.
    pub device: DeviceId,
    /// Its token.
    pub token: String,
}

/// A gRPC client of one node's client listener (the public API). Cloning
/// shares the connection.
#[derive(Clone)]
pub struct Client {
    /// The connection, for service clients the helpers do not cover.
    pub channel: Channel,
}

impl Client {
    /// A client of the node whose client listener is `addr`. Connects on
    /// first use (and reconnects after a restart).
    pub fn connect(addr: &str) -> Client {
        Client::connect_with(addr, None)
    }

    /// [`Client::connect`], over TLS with `tls` when it is set.
    pub fn connect_with(addr: &str, tls: Option<&rim_cluster::LinkTls>) -> Client {
        Client { channel: endpoint_with(addr, tls).connect_lazy() }
    }

    /// `msg` as a request of `s` (user, device and token metadata), with a
    /// call timeout.
    pub fn authed<T>(s: &Session, msg: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        r.set_timeout(CALL_TIMEOUT);
        r.metadata_mut().insert(USER_ID_METADATA_KEY, s.user.to_string().parse().expect("metadata"));
        r.metadata_mut().insert(DEVICE_ID_METADATA_KEY, s.device.to_string().parse().expect("metadata"));
        r.metadata_mut().insert(TOKEN_METADATA_KEY, s.token.parse().expect("metadata"));
        r
    }

    fn auth(&self) -> AuthServiceClient<Channel> {
        AuthServiceClient::new(self.channel.clone())
    }

    fn messages(&self) -> MessageServiceClient<Channel> {
        MessageServiceClient::new(self.channel.clone())
    }

    /// Registers `username` with [`PASSWORD`]; its user id.
    ///
    /// # Panics
    ///
    /// On any error (no retries: see [`Client::register_and_sign_in`]).
    pub async fn register(&self, username: &str) -> UserId {
        let req =
            RegisterRequest { username: username.into(), password: PASSWORD.into(), ..Default::default() };
        let r = self.auth().register(req).await.unwrap_or_else(|e| panic!("register {username}: {e:?}"));
        UserId(r.into_inner().user_id)
    }

    /// Signs `username` in on a new device.
    ///
    /// # Panics
    ///
    /// On any error (no retries).
    pub async fn sign_in(&self, username: &str) -> Session {
        let req =
            SignInRequest { username: username.into(), password: PASSWORD.into(), ..Default::default() };
        let r = self.auth().sign_in(req).await.unwrap_or_else(|e| panic!("sign in {username}: {e:?}"));
        let r = r.into_inner();
        Session { user: UserId(r.user_id), device: DeviceId(r.device_id), token: r.token }
    }

    /// Registers `username` (a retry that finds it already registered is
    /// fine: the first attempt went through) and signs in a new device,
    /// retrying retryable errors.
    pub async fn register_and_sign_in(&self, username: &str) -> Session {
        let deadline = Instant::now() + RETRY_FOR;
        let mut attempts = 0;
        loop {
            attempts += 1;
            let mut req = tonic::Request::new(RegisterRequest {
                username: username.into(),
                password: PASSWORD.into(),
                ..Default::default()
            });
            req.set_timeout(CALL_TIMEOUT);
            match self.auth().register(req).await {
                Ok(_) => break,
                Err(e) if attempts > 1 && code(&e) == ErrorCode::ErrorAlreadyExists => break,
                Err(e) => {
                    assert!(code(&e).is_retryable(), "register {username}: {e:?}");
                    assert!(Instant::now() < deadline, "register {username}: still failing: {e:?}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        let r = retry(RETRY_FOR, &format!("sign in {username}"), || {
            let mut auth = self.auth();
            let mut req = tonic::Request::new(SignInRequest {
                username: username.into(),
                password: PASSWORD.into(),
                ..Default::default()
            });
            req.set_timeout(CALL_TIMEOUT);
            async move { auth.sign_in(req).await.map(|r| r.into_inner()) }
        })
        .await;
        Session { user: UserId(r.user_id), device: DeviceId(r.device_id), token: r.token }
    }

    /// Signs in by phone with [`DEV_CODE`] (no password hashing, so cheap),
    /// creating the user on first use; retries retryable errors.
    pub async fn phone_sign_in(&self, phone: &str) -> Session {
        let r = retry(RETRY_FOR, &format!("sign in by phone {phone}"), || {
            let mut auth = self.auth();
            let mut req = tonic::Request::new(SignInByPhoneRequest {
                phone: phone.into(),
                code: DEV_CODE.into(),
                ..Default::default()
            });
            req.set_timeout(CALL_TIMEOUT);
            async move { auth.sign_in_by_phone(req).await.map(|r| r.into_inner()) }
        })
        .await;
        Session { user: UserId(r.user_id), device: DeviceId(r.device_id), token: r.token }
    }

    /// Sends the text `text` from `s` to the user `to` with the idempotency
    /// key `cmid`.
    pub async fn send(
        &self,
        s: &Session,
        to: UserId,
        cmid: &str,
        text: &str,
    ) -> Result<SendOutput, tonic::Status> {
        let input = SendInput {
            conversation_kind: ConversationKind::User as i32,
            conversation_id: to.0,
            client_msg_id: cmid.into(),
            content_type: ContentType::Text as i32,
            content: text.as_bytes().to_vec().into(),
            ..Default::default()
        };
        self.messages().send_message(Self::authed(s, input)).await.map(|r| r.into_inner())
    }

    /// [`Client::send`] until acknowledged, retrying retryable errors with
    /// the same `cmid` (so never a duplicate).
    pub async fn send_acked(&self, s: &Session, to: UserId, cmid: &str, text: &str) -> SendOutput {
        retry(RETRY_FOR, &format!("send {cmid}"), || self.send(s, to, cmid, text)).await
    }

    /// The whole list of `s.user`, page by page.
    pub async fn sync_all(&self, s: &Session) -> Result<Vec<Message>, tonic::Status> {
        let mut m = self.messages();
        let mut out = Vec::new();
        let mut after = 0;
        loop {
            let r = m.sync(Self::authed(s, SyncInput { after_seq: after, limit: 200 })).await?.into_inner();
            after = r.messages.last().map(|x| x.seq).unwrap_or(after);
            out.extend(r.messages);
            if !r.has_more {
                return Ok(out);
            }
        }
    }

    /// [`Client::sync_all`], retrying retryable errors.
    pub async fn sync_all_retry(&self, s: &Session) -> Vec<Message> {
        retry(RETRY_FOR, &format!("sync of user {}", s.user), || self.sync_all(s)).await
    }

    /// Creates a group of `kind` owned by `owner` with `members`, retrying
    /// retryable errors (a retry may create a second group, which the test
    /// never sees).
    pub async fn create_group(&self, owner: &Session, kind: GroupKind, members: &[UserId]) -> Group {
        retry(RETRY_FOR, "create group", || {
            let mut g = GroupServiceClient::new(self.channel.clone());
            let req = CreateGroupRequest {
                kind: kind as i32,
                name: "test group".into(),
                member_ids: members.iter().map(|m| m.0).collect(),
                ..Default::default()
            };
            let req = Self::authed(owner, req);
            async move { g.create_group(req).await.map(|r| r.into_inner().group.expect("group")) }
        })
        .await
    }

    /// Sends the text `text` from `s` to `group` (any kind: the node reads
    /// it from the group) with the idempotency key `cmid`.
    pub async fn send_group(
        &self,
        s: &Session,
        group: GroupId,
        cmid: &str,
        text: &str,
    ) -> Result<SendOutput, tonic::Status> {
        let input = SendInput {
            conversation_id: group.0,
            client_msg_id: cmid.into(),
            content_type: ContentType::Text as i32,
            content: text.as_bytes().to_vec().into(),
            ..Default::default()
        };
        self.messages().send_group_message(Self::authed(s, input)).await.map(|r| r.into_inner())
    }

    /// The whole of a super group's (or room's) list as `s` may read it,
    /// page by page.
    pub async fn sync_group_all(&self, s: &Session, group: GroupId) -> Result<Vec<Message>, tonic::Status> {
        let mut m = self.messages();
        let mut out = Vec::new();
        let mut after = 0;
        loop {
            let input = SyncGroupInput { group_id: group.0, after_group_seq: after, limit: 200 };
            let r = m.sync_group(Self::authed(s, input)).await?.into_inner();
            after = r.messages.last().map(|x| x.group_seq.max(x.seq)).unwrap_or(after);
            out.extend(r.messages);
            if !r.has_more {
                return Ok(out);
            }
        }
    }
}

/// The `rim-code` of a failed call.
pub fn code(s: &tonic::Status) -> ErrorCode {
    rim_proto::error::code_of_status(s)
}

/// The text messages of a list, as `(seq, client_msg_id)` in list order.
pub fn texts(list: &[Message]) -> Vec<(u64, String)> {
    list.iter()
        .filter(|m| m.content_type == ContentType::Text as i32)
        .map(|m| (m.seq, m.client_msg_id.clone()))
        .collect()
}
