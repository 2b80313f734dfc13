//! [`Client`]: the application's handle on one signed-in device.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use prost::Message as _;
use rim_proto::ids::{GroupId, MessageId, Seq, UserId};
use rim_proto::v1::{
    AckInput, AckOutput, Command, ContentType, ConversationKind, ReadInput, ReadOutput, RecallInput,
    SendInput, SendOutput, SubscribeRoomOutput, SyncGroupInput, SyncGroupOutput, SyncInput, SyncOutput,
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
    /// Highest group seq handed to the application, per super group or
    /// room (kept by the connection task).
    cursors: Arc<Mutex<HashMap<GroupId, Seq>>>,
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
        let cursors = Arc::new(Mutex::new(config.group_cursors.clone()));
        let driver = Driver::new(
            config.clone(),
            credentials.clone(),
            requests_rx,
            events_tx,
            state_tx,
            cursors.clone(),
        );
        let task = tokio::spawn(driver.run());
        let inner = Inner {
            config,
            credentials,
            requests: requests_tx,
            state: state_rx,
            task: Mutex::new(Some(task)),
            cursors,
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
        to_user: UserId,
        content_type: ContentType,
        content: impl Into<Bytes>,
    ) -> Result<SendOutput> {
        let input = SendInput {
            conversation_kind: ConversationKind::User as i32,
            conversation_id: to_user.0,
            client_msg_id: new_client_msg_id(),
            content_type: content_type as i32,
            content: content.into(),
            ..Default::default()
        };
        self.send_input(input).await
    }

    /// Sends a message to group, super group or room `group_id`
    /// (`SEND_GROUP`), with retries like [`send`](Client::send). The
    /// output's `seq` is 0; its `group_seq` is the position in the group's
    /// list (small groups: the order shared by every member's copy).
    pub async fn send_group(
        &self,
        group_id: GroupId,
        content_type: ContentType,
        content: impl Into<Bytes>,
    ) -> Result<SendOutput> {
        let input = SendInput {
            conversation_id: group_id.0,
            client_msg_id: new_client_msg_id(),
            content_type: content_type as i32,
            content: content.into(),
            ..Default::default()
        };
        self.send_group_input(input).await
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
        let data = self.with_retry(command, input.encode_to_vec().into(), &input.client_msg_id).await?;
        Ok(SendOutput::decode(data)?)
    }

    /// `command` with `content`, an idempotent request keyed by
    /// `client_msg_id`, retried until [`ClientConfig::send_deadline`].
    async fn with_retry(&self, command: Command, content: Bytes, client_msg_id: &str) -> Result<Bytes> {
        let config = &self.inner.config;
        let deadline = Instant::now() + config.send_deadline;
        let mut attempt = 0;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let error = match self.request(command, content.clone(), left.min(config.request_timeout)).await {
                Ok(data) => return Ok(data),
                Err(e) => e,
            };
            let wait = error.retry_after().unwrap_or_else(|| SEND_BACKOFF.delay(attempt));
            if !error.is_retryable() || Instant::now() + wait >= deadline {
                return Err(error);
            }
            tracing::debug!(client_msg_id, ?command, attempt, error = %error, "request failed; retrying");
            attempt += 1;
            tokio::time::sleep(wait).await;
        }
    }

    /// Reads one page of the user's list after `after_seq` (at most
    /// `limit` entries, 0 = server default). Independent of the event
    /// stream: for history views.
    pub async fn sync_page(&self, after_seq: Seq, limit: u32) -> Result<SyncOutput> {
        let content = SyncInput { after_seq: after_seq.0, limit }.encode_to_vec().into();
        let data = self.request(Command::Sync, content, self.inner.config.request_timeout).await?;
        Ok(SyncOutput::decode(data)?)
    }

    /// Reads one page of super group or room `group_id`'s list after
    /// `after_group_seq` (at most `limit` entries, 0 = server default; a
    /// super group never before the member's join point). Independent of
    /// the event stream: for history views.
    pub async fn sync_group(
        &self,
        group_id: GroupId,
        after_group_seq: Seq,
        limit: u32,
    ) -> Result<SyncGroupOutput> {
        let input = SyncGroupInput { group_id: group_id.0, after_group_seq: after_group_seq.0, limit };
        let content = input.encode_to_vec().into();
        let data = self.request(Command::SyncGroup, content, self.inner.config.request_timeout).await?;
        Ok(SyncGroupOutput::decode(data)?)
    }

    /// Recalls the caller's own message `message_id` of conversation
    /// (`kind`, `conversation_id`), which sits at `seq` (its seq in the
    /// caller's list for 1:1, its group seq for groups). The recall is a
    /// new entry; retried like [`send`](Client::send) with one generated
    /// `client_msg_id`.
    ///
    /// `conversation_id` is the other user's id for 1:1 (`UserId.0`) and
    /// the group's for groups and rooms (`GroupId.0`): `kind` says which.
    pub async fn recall(
        &self,
        kind: ConversationKind,
        conversation_id: u64,
        message_id: MessageId,
        seq: Seq,
    ) -> Result<SendOutput> {
        let input = RecallInput {
            conversation_kind: kind as i32,
            conversation_id,
            message_id: message_id.0,
            client_msg_id: new_client_msg_id(),
            seq: seq.0,
        };
        self.recall_input(input).await
    }

    /// [`recall`](Client::recall) of `input` as is (a `client_msg_id` is
    /// generated if empty), with retries.
    pub async fn recall_input(&self, mut input: RecallInput) -> Result<SendOutput> {
        if input.client_msg_id.is_empty() {
            input.client_msg_id = new_client_msg_id();
        }
        let data =
            self.with_retry(Command::Recall, input.encode_to_vec().into(), &input.client_msg_id).await?;
        Ok(SendOutput::decode(data)?)
    }

    /// Marks conversation (`kind`, `conversation_id`) read up to `read_seq`
    /// (own-list seq for 1:1 and small groups, group seq for super groups
    /// and rooms); returns the stored read position (it only moves
    /// forward). One attempt. `conversation_id` is a user's or a group's
    /// id, as `kind` says (see [`recall`](Client::recall)).
    pub async fn mark_read(
        &self,
        kind: ConversationKind,
        conversation_id: u64,
        read_seq: Seq,
    ) -> Result<Seq> {
        let input = ReadInput {
            conversation_kind: kind as i32,
            conversation_id,
            read_seq: read_seq.0,
            receipt_message_id: 0,
        };
        Ok(Seq(self.mark_read_input(input).await?.read_seq))
    }

    /// `READ` of `input` as is (e.g. with a 1:1 read receipt). One attempt.
    pub async fn mark_read_input(&self, input: ReadInput) -> Result<ReadOutput> {
        let data = self
            .request(Command::Read, input.encode_to_vec().into(), self.inner.config.request_timeout)
            .await?;
        Ok(ReadOutput::decode(data)?)
    }

    /// Reads room `room_id` from now on: its entries after `after_seq`
    /// ([`Seq::ZERO`]: from its end; never before its oldest retained entry), then live
    /// ones, as [`Event::RoomMessage`]s. The client subscribes it again
    /// after every reconnect, after the last room seq it delivered.
    /// Subscribing again restarts from the new `after_seq`. Waits for a
    /// connection (within the request timeout); a refusal (unknown room,
    /// `ERROR_BAD_REQUEST` beyond the per-connection limit) is returned and
    /// the room is not read.
    pub async fn subscribe_room(&self, room_id: GroupId, after_seq: Seq) -> Result<SubscribeRoomOutput> {
        let timeout = self.inner.config.request_timeout;
        let data = self
            .feed_request(timeout, |timeout, reply| Request::Subscribe { room_id, after_seq, timeout, reply })
            .await?;
        Ok(SubscribeRoomOutput::decode(data)?)
    }

    /// Stops reading room `room_id` (at once, whether or not the gateway
    /// answers).
    pub async fn unsubscribe_room(&self, room_id: GroupId) -> Result<()> {
        let timeout = self.inner.config.request_timeout;
        self.feed_request(timeout, |timeout, reply| Request::Unsubscribe { room_id, timeout, reply }).await?;
        Ok(())
    }

    /// The last group seq handed to the application of each super group and
    /// room read (including those of [`ClientConfig::group_cursors`]). Save
    /// them to resume from them in a later run.
    pub fn group_cursors(&self) -> HashMap<GroupId, Seq> {
        self.inner.cursors.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// A subscription request to the connection task, within `timeout`.
    async fn feed_request(
        &self,
        timeout: Duration,
        make: impl FnOnce(Duration, oneshot::Sender<Result<Bytes>>) -> Request,
    ) -> Result<Bytes> {
        let deadline = Instant::now() + timeout;
        self.online_by(deadline).await?;
        let (reply, answer) = oneshot::channel();
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout_at(deadline, self.inner.requests.send(make(left, reply))).await {
            Err(_) => return Err(ClientError::Overloaded("request queue")),
            Ok(Err(_)) => return Err(ClientError::Closed),
            Ok(Ok(())) => {}
        }
        match tokio::time::timeout_at(deadline + Duration::from_secs(1), answer).await {
            Err(_) => Err(ClientError::Timeout(timeout)),
            Ok(Err(_)) => Err(ClientError::Closed),
            Ok(Ok(result)) => result,
        }
    }

    /// Acknowledges every entry up to `seq` now; returns the stored cursor.
    /// (With [`ClientConfig::auto_ack`] delivered entries are acknowledged
    /// anyway.)
    pub async fn ack(&self, seq: Seq) -> Result<Seq> {
        let content = AckInput { seq: seq.0 }.encode_to_vec().into();
        let data = self.request(Command::Ack, content, self.inner.config.request_timeout).await?;
        Ok(Seq(AckOutput::decode(data)?.ack_seq))
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
