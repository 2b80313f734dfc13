//! [`Client`]: the application's handle on one signed-in device.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use prost::Message as _;
use rim_proto::v1::{
    AckInput, AckOutput, Command, ContentType, ConversationKind, SendInput, SendOutput, SyncInput, SyncOutput,
};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::config::{Backoff, ClientConfig, Credentials};
use crate::driver::{Driver, Request};
use crate::error::{ClientError, Result};
use crate::event::{Event, LinkState};
use crate::transport::Endpoint;

/// How long [`Client::close`] waits for the connection task.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(10);

/// Backoff between the attempts of one send.
const SEND_BACKOFF: Backoff = Backoff { initial: Duration::from_millis(50), max: Duration::from_secs(1) };

/// A new random `client_msg_id` (128 random bits, hex).
pub fn new_client_msg_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// A signed-in device's connection to rim, kept alive across gateway
/// failures. Cheap to clone; every clone drives the same connection.
///
/// Created by [`Client::connect`], which returns the event channel too.
/// See the [crate documentation](crate) for the guarantees.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    config: Arc<ClientConfig>,
    credentials: Credentials,
    requests: mpsc::Sender<Request>,
    state: watch::Receiver<LinkState>,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("credentials", &self.inner.credentials)
            .field("state", &*self.inner.state.borrow())
            .finish()
    }
}

impl Client {
    /// Starts a client for `credentials` with `config`: connects in the
    /// background (to `config.gateways` in rotation), signs in, syncs, and
    /// keeps reconnecting until closed, kicked or rejected. Returns the
    /// handle and the bounded event channel ([`ClientConfig::event_queue`]).
    ///
    /// Must be called inside a tokio runtime.
    pub fn connect(config: ClientConfig, credentials: Credentials) -> (Client, mpsc::Receiver<Event>) {
        let config = Arc::new(config);
        let (requests_tx, requests_rx) = mpsc::channel(config.command_queue.max(1));
        let (events_tx, events_rx) = mpsc::channel(config.event_queue.max(1));
        let (state_tx, state_rx) = watch::channel(LinkState::Connecting);
        let driver = Driver::new(config.clone(), credentials.clone(), requests_rx, events_tx, state_tx);
        let task = tokio::spawn(driver.run());
        let inner = Inner {
            config,
            credentials,
            requests: requests_tx,
            state: state_rx,
            task: Mutex::new(Some(task)),
        };
        (Client { inner: Arc::new(inner) }, events_rx)
    }

    /// The device this client signs in as.
    pub fn credentials(&self) -> &Credentials {
        &self.inner.credentials
    }

    /// The configuration.
    pub fn config(&self) -> &ClientConfig {
        &self.inner.config
    }

    /// Where the connection stands now.
    pub fn state(&self) -> LinkState {
        self.inner.state.borrow().clone()
    }

    /// Waits until signed in at a gateway (at most `timeout`); returns it.
    pub async fn wait_online(&self, timeout: Duration) -> Result<Endpoint> {
        self.online_by(Instant::now() + timeout).await
    }

    async fn online_by(&self, deadline: Instant) -> Result<Endpoint> {
        let mut state = self.inner.state.clone();
        let waited = tokio::time::timeout_at(
            deadline,
            state.wait_for(|s| matches!(s, LinkState::Online { .. } | LinkState::Stopped)),
        )
        .await;
        match waited {
            Err(_) => Err(ClientError::NotConnected),
            Ok(Err(_)) => Err(ClientError::Closed),
            Ok(Ok(s)) => match &*s {
                LinkState::Online { gateway } => Ok(gateway.clone()),
                _ => Err(ClientError::Closed),
            },
        }
    }

    /// Sends one request and waits for its reply's data, within `timeout`
    /// (waiting for a connection included). One attempt, no retry: the
    /// escape hatch for commands without a typed method.
    pub async fn request(&self, command: Command, content: Bytes, timeout: Duration) -> Result<Bytes> {
        let deadline = Instant::now() + timeout;
        self.online_by(deadline).await?;
        let (reply, answer) = oneshot::channel();
        let left = deadline.saturating_duration_since(Instant::now());
        let request = Request::Call { command, content, timeout: left, reply };
        match tokio::time::timeout_at(deadline, self.inner.requests.send(request)).await {
            Err(_) => return Err(ClientError::Overloaded("request queue")),
            Ok(Err(_)) => return Err(ClientError::Closed),
            Ok(Ok(())) => {}
        }
        // The connection task enforces the timeout; this is a backstop.
        match tokio::time::timeout_at(deadline + Duration::from_secs(1), answer).await {
            Err(_) => Err(ClientError::Timeout(timeout)),
            Ok(Err(_)) => Err(ClientError::Closed),
            Ok(Ok(result)) => result,
        }
    }

    /// Sends a text or other message to user `to_user`, retrying with the
    /// same generated `client_msg_id` until it is stored or
    /// [`ClientConfig::send_deadline`] passes (see [`send_input`]).
    ///
    /// [`send_input`]: Client::send_input
    pub async fn send(
        &self,
        to_user: u64,
        content_type: ContentType,
        content: impl Into<Bytes>,
    ) -> Result<SendOutput> {
        let input = SendInput {
            conversation_kind: ConversationKind::User as i32,
            conversation_id: to_user,
            client_msg_id: new_client_msg_id(),
            content_type: content_type as i32,
            content: content.into(),
            ..Default::default()
        };
        self.send_input(input).await
    }

    /// Sends a message to group, super group or room `group_id`, with
    /// retries like [`send`](Client::send). The output's `seq` is 0; its
    /// `group_seq` is the position in the group.
    pub async fn send_group(
        &self,
        group_id: u64,
        content_type: ContentType,
        content: impl Into<Bytes>,
    ) -> Result<SendOutput> {
        let input = SendInput {
            conversation_id: group_id,
            client_msg_id: new_client_msg_id(),
            content_type: content_type as i32,
            content: content.into(),
            ..Default::default()
        };
        self.send_input(input).await
    }

    /// Sends the 1:1 message `input` (`SEND`), retrying on timeouts, lost
    /// connections and retryable codes with the same `client_msg_id` (one
    /// is generated if empty) until [`ClientConfig::send_deadline`], with a
    /// short jittered backoff (or the server's `retry_after_ms`).
    /// Non-retryable errors return at once. The server stores a
    /// `client_msg_id` once, so retries never duplicate the message.
    pub async fn send_input(&self, input: SendInput) -> Result<SendOutput> {
        self.send_with_retry(Command::Send, input).await
    }

    /// [`send_input`](Client::send_input) for `SEND_GROUP`.
    pub async fn send_group_input(&self, input: SendInput) -> Result<SendOutput> {
        self.send_with_retry(Command::SendGroup, input).await
    }

    /// One `SEND` attempt of `input` as is, within the request timeout: no
    /// retry, no generated id. Sending the same `client_msg_id` again
    /// returns the first outcome.
    pub async fn send_once(&self, input: SendInput) -> Result<SendOutput> {
        let data = self
            .request(Command::Send, input.encode_to_vec().into(), self.inner.config.request_timeout)
            .await?;
        Ok(SendOutput::decode(data)?)
    }

    async fn send_with_retry(&self, command: Command, mut input: SendInput) -> Result<SendOutput> {
        if input.client_msg_id.is_empty() {
            input.client_msg_id = new_client_msg_id();
        }
        let content: Bytes = input.encode_to_vec().into();
        let config = &self.inner.config;
        let deadline = Instant::now() + config.send_deadline;
        let mut attempt = 0;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let error = match self.request(command, content.clone(), left.min(config.request_timeout)).await {
                Ok(data) => return Ok(SendOutput::decode(data)?),
                Err(e) => e,
            };
            let wait = error.retry_after().unwrap_or_else(|| SEND_BACKOFF.delay(attempt));
            if !error.is_retryable() || Instant::now() + wait >= deadline {
                return Err(error);
            }
            tracing::debug!(client_msg_id = %input.client_msg_id, attempt, error = %error, "send failed; retrying");
            attempt += 1;
            tokio::time::sleep(wait).await;
        }
    }

    /// Reads one page of the user's list after `after_seq` (at most
    /// `limit` entries, 0 = server default). Independent of the event
    /// stream: for history views.
    pub async fn sync_page(&self, after_seq: u64, limit: u32) -> Result<SyncOutput> {
        let content = SyncInput { after_seq, limit }.encode_to_vec().into();
        let data = self.request(Command::Sync, content, self.inner.config.request_timeout).await?;
        Ok(SyncOutput::decode(data)?)
    }

    /// Acknowledges every entry up to `seq` now; returns the stored cursor.
    /// (With [`ClientConfig::auto_ack`] delivered entries are acknowledged
    /// anyway.)
    pub async fn ack(&self, seq: u64) -> Result<u64> {
        let content = AckInput { seq }.encode_to_vec().into();
        let data = self.request(Command::Ack, content, self.inner.config.request_timeout).await?;
        Ok(AckOutput::decode(data)?.ack_seq)
    }

    /// Closes the client: acknowledges what was delivered to the event
    /// channel (if [`auto_ack`](ClientConfig::auto_ack)), closes the
    /// connection and stops the connection task, waiting for it (at most
    /// 10 s). Events already in the channel can still be read, then it ends;
    /// entries not yet handed over are not acknowledged, so the next client
    /// of the device gets them. Requests in flight fail. Idempotent; every
    /// clone is closed.
    pub async fn close(&self) {
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, self.inner.requests.send(Request::Close)).await;
        let task = self.inner.task.lock().ok().and_then(|mut t| t.take());
        if let Some(mut task) = task
            && tokio::time::timeout(CLOSE_TIMEOUT, &mut task).await.is_err()
        {
            task.abort();
        }
    }
}
