//! Thin typed wrappers over the node's client-facing gRPC services
//! (`AuthService`, `UserService`, `MessageService` on a node's public
//! listener): accounts and sign-in, devices, profiles, and history.
//!
//! Every node forwards to the right shard leader, so one address suffices.
//! Authenticated calls carry the metadata entries `user_id`, `device_id`
//! and `token` ([`NodeApi::authenticated`]). Errors become
//! [`ClientError::Server`] with the `rim-code` of the status. Calls are not
//! retried here; [`ClientError::is_retryable`] says whether they may be.

use std::time::Duration;

use rim_proto::ErrorCode;
use rim_proto::ids::{DeviceId, Seq, UserId};
use rim_proto::metadata::{DEVICE_ID_METADATA_KEY, TOKEN_METADATA_KEY, USER_ID_METADATA_KEY};
use rim_proto::v1::auth_service_client::AuthServiceClient;
use rim_proto::v1::message_service_client::MessageServiceClient;
use rim_proto::v1::user_service_client::UserServiceClient;
use rim_proto::v1::{
    AckInput, Device, DeviceInfo, FindUserRequest, GetUserRequest, ListConversationsReply,
    ListConversationsRequest, ListDevicesRequest, LogoutRequest, Message, RegisterRequest, SendInput,
    SendOutput, SignInByPhoneRequest, SignInReply, SignInRequest, SyncInput, SyncOutput, User,
};
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, Endpoint as GrpcEndpoint};

use crate::config::Credentials;
use crate::error::{ClientError, Result};

/// Default time allowed for one gRPC call.
pub const DEFAULT_RPC_TIMEOUT: Duration = Duration::from_secs(10);

/// A client of one node's public gRPC listener, optionally signed in.
/// Cheap to clone (the channel is shared).
#[derive(Debug, Clone)]
pub struct NodeApi {
    channel: Channel,
    timeout: Duration,
    credentials: Option<Credentials>,
}

impl NodeApi {
    /// A client of the node at `addr` (`host:port` or `http://host:port`).
    /// Connects lazily, on the first call.
    pub fn new(addr: &str) -> Result<NodeApi> {
        let uri = if addr.contains("://") { addr.to_string() } else { format!("http://{addr}") };
        let endpoint = GrpcEndpoint::from_shared(uri)
            .map_err(|e| ClientError::InvalidAddress(addr.to_string(), e.to_string()))?
            .connect_timeout(Duration::from_secs(5));
        Ok(NodeApi { channel: endpoint.connect_lazy(), timeout: DEFAULT_RPC_TIMEOUT, credentials: None })
    }

    /// The same client with `timeout` per call.
    pub fn with_timeout(mut self, timeout: Duration) -> NodeApi {
        self.timeout = timeout;
        self
    }

    /// The same client, calling as `credentials`.
    pub fn authenticated(&self, credentials: Credentials) -> NodeApi {
        NodeApi { credentials: Some(credentials), ..self.clone() }
    }

    /// Whom authenticated calls are made as.
    pub fn credentials(&self) -> Option<&Credentials> {
        self.credentials.as_ref()
    }

    // --------------------------------------------------------- no auth

    /// Creates a user; returns its id. `ERROR_ALREADY_EXISTS` if the
    /// username is taken.
    pub async fn register(&self, username: &str, password: &str) -> Result<UserId> {
        let request =
            RegisterRequest { username: username.into(), password: password.into(), ..Default::default() };
        let reply = self.auth().register(self.plain(request)).await?;
        Ok(UserId(reply.into_inner().user_id))
    }

    /// Signs in with username and password as `device_id` (`None` registers
    /// a new device); returns `(user_id, device_id, token)`.
    pub async fn sign_in(
        &self,
        username: &str,
        password: &str,
        device_id: Option<DeviceId>,
    ) -> Result<Credentials> {
        let request = SignInRequest {
            username: username.into(),
            password: password.into(),
            device_id: wire_device(device_id),
            device: Some(sdk_device()),
        };
        let reply = self.auth().sign_in(self.plain(request)).await?;
        Ok(credentials_of(reply.into_inner()))
    }

    /// Signs in with a phone number and one-time code (creating the user on
    /// first use) as `device_id` (`None` registers a new device).
    pub async fn sign_in_by_phone(
        &self,
        phone: &str,
        code: &str,
        device_id: Option<DeviceId>,
    ) -> Result<Credentials> {
        let request = SignInByPhoneRequest {
            phone: phone.into(),
            code: code.into(),
            device_id: wire_device(device_id),
            device: Some(sdk_device()),
        };
        let reply = self.auth().sign_in_by_phone(self.plain(request)).await?;
        Ok(credentials_of(reply.into_inner()))
    }

    // ---------------------------------------------------- authenticated

    /// The caller's devices (revoked ones included).
    pub async fn list_devices(&self) -> Result<Vec<Device>> {
        let reply = self.auth().list_devices(self.signed(ListDevicesRequest {})?).await?;
        Ok(reply.into_inner().devices)
    }

    /// Signs the calling device out (its tokens are revoked and its
    /// connection kicked).
    pub async fn logout(&self) -> Result<()> {
        self.auth().logout(self.signed(LogoutRequest {})?).await?;
        Ok(())
    }

    /// A user's profile; `None` = the caller.
    pub async fn get_user(&self, user_id: Option<UserId>) -> Result<User> {
        // The SDK resolves "the caller" itself: nodes answer a 0 id with
        // ERROR_INVALID_ID although `GetUserRequest` documents it as "the
        // caller".
        let user_id = user_id.or(self.credentials.as_ref().map(|c| c.user_id)).unwrap_or_default();
        let request = self.signed(GetUserRequest { user_id: user_id.0 })?;
        let reply = UserServiceClient::new(self.channel.clone()).get_user(request).await?;
        reply
            .into_inner()
            .user
            .ok_or_else(|| ClientError::server(ErrorCode::ErrorInternal, "no user in reply"))
    }

    /// The profile of the user registered as `username`;
    /// `ERROR_USER_NOT_FOUND` if there is none.
    pub async fn find_user(&self, username: &str) -> Result<User> {
        let request = self.signed(FindUserRequest { username: username.into() })?;
        let reply = UserServiceClient::new(self.channel.clone()).find_user(request).await?;
        reply
            .into_inner()
            .user
            .ok_or_else(|| ClientError::server(ErrorCode::ErrorInternal, "no user in reply"))
    }

    /// One page of the caller's list after `after_seq` (`limit` 0 = server
    /// default).
    pub async fn sync_page(&self, after_seq: Seq, limit: u32) -> Result<SyncOutput> {
        let request = self.signed(SyncInput { after_seq: after_seq.0, limit })?;
        let reply = self.messages().sync(request).await?;
        Ok(reply.into_inner())
    }

    /// The caller's history after `after_seq` ([`Seq::ZERO`] = from the
    /// start), paging until the end of the list or `max` entries.
    pub async fn history(&self, after_seq: Seq, max: usize) -> Result<Vec<Message>> {
        let mut out: Vec<Message> = Vec::new();
        let mut cursor = after_seq;
        while out.len() < max {
            let page = self.sync_page(cursor, 0).await?;
            let before = out.len();
            for message in page.messages {
                if Seq(message.seq) > cursor && out.len() < max {
                    cursor = Seq(message.seq);
                    out.push(message);
                }
            }
            if !page.has_more || out.len() == before {
                break;
            }
        }
        Ok(out)
    }

    /// Moves the calling device's ack cursor to `seq`; returns the stored
    /// cursor.
    pub async fn ack(&self, seq: Seq) -> Result<Seq> {
        let reply = self.messages().ack(self.signed(AckInput { seq: seq.0 })?).await?;
        Ok(Seq(reply.into_inner().ack_seq))
    }

    /// Sends a message over gRPC (no retry; the long connection's
    /// [`Client::send`](crate::Client::send) retries).
    pub async fn send_message(&self, input: SendInput) -> Result<SendOutput> {
        let reply = self.messages().send_message(self.signed(input)?).await?;
        Ok(reply.into_inner())
    }

    /// The caller's conversations, newest first.
    pub async fn list_conversations(&self, limit: u32, before_ms: i64) -> Result<ListConversationsReply> {
        let request = ListConversationsRequest { limit, before_ms };
        Ok(self.messages().list_conversations(self.signed(request)?).await?.into_inner())
    }

    // -------------------------------------------------------- plumbing

    fn auth(&self) -> AuthServiceClient<Channel> {
        AuthServiceClient::new(self.channel.clone())
    }

    fn messages(&self) -> MessageServiceClient<Channel> {
        MessageServiceClient::new(self.channel.clone())
    }

    /// A request without authentication.
    fn plain<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        request.set_timeout(self.timeout);
        request
    }

    /// A request carrying the credentials' metadata.
    fn signed<T>(&self, message: T) -> Result<tonic::Request<T>> {
        let credentials = self.credentials.as_ref().ok_or_else(|| {
            ClientError::server(
                ErrorCode::ErrorUnauthenticated,
                "no credentials (use NodeApi::authenticated)",
            )
        })?;
        let mut request = self.plain(message);
        let token = MetadataValue::try_from(credentials.token.as_str()).map_err(|_| {
            ClientError::server(ErrorCode::ErrorUnauthenticated, "token is not valid metadata")
        })?;
        let metadata = request.metadata_mut();
        metadata.insert(USER_ID_METADATA_KEY, credentials.user_id.0.into());
        metadata.insert(DEVICE_ID_METADATA_KEY, credentials.device_id.0.into());
        metadata.insert(TOKEN_METADATA_KEY, token);
        Ok(request)
    }
}

fn credentials_of(reply: SignInReply) -> Credentials {
    Credentials { user_id: UserId(reply.user_id), device_id: DeviceId(reply.device_id), token: reply.token }
}

/// The wire's `device_id` of a sign-in: 0 asks for a new device.
fn wire_device(device_id: Option<DeviceId>) -> u64 {
    device_id.map_or(0, |d| d.0)
}

/// How this SDK describes a device it registers.
fn sdk_device() -> DeviceInfo {
    DeviceInfo { sdk_version: format!("rim-client {}", env!("CARGO_PKG_VERSION")), ..Default::default() }
}
