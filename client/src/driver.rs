//! The connection task: one per [`Client`](crate::Client), owning the
//! connection, the [`Timeline`] and the event queue.
//!
//! # Life cycle
//!
//! ```text
//! loop:
//!   connect + SIGN_IN at gateway i (rotating)
//!     refused (2xxx, 3xxx, 4xxx)  -> SignInRejected, stop
//!     failed (network, timeout, 1xxx, 5xxx) -> backoff, next gateway
//!     ok -> Connected, sync, online loop until:
//!       KICK of the auth class (or a WebSocket close naming one) -> Kicked, stop
//!       lost link, silent gateway, KICK unavailable/busy, failing syncs
//!                                  -> Disconnected, backoff, next gateway
//!       close() or every handle dropped -> final ACK, close link, stop
//! ```
//!
//! The online loop waits for: a packet (replies are matched to requests by
//! `request_id`; pushes go to the timeline or to a group feed, see the
//! `feeds` child module), a command from a handle, room in the event
//! channel, the next timer (heartbeat, ACK, request deadlines, the
//! timeline's retry or gap check, the silent-server check), or the writer
//! task stopping. After every input it starts a sync if the timeline asks
//! for one, sends the subscriptions and group syncs the feeds ask for, and
//! moves ready entries to the event queue.
//!
//! # Bounds
//!
//! Every queue is bounded: commands from handles, packets to the writer,
//! events to the application (`outbox` plus the channel), and the
//! timeline's held pushes. The task never stops reading from the gateway
//! (replies must get through even when the application does not read its
//! events). When the application falls behind and `outbox` holds
//! [`ClientConfig::event_queue`] events, pushes are shed instead: list
//! entries are left to a later sync, which only starts while `outbox` has
//! room (so it holds at most `event_queue + sync_page + push_buffer`
//! events); room and online-only pushes are dropped, super-group entries
//! are left to a later group sync.

mod feeds;

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use prost::Message as _;
use rim_proto::ErrorCode;
use rim_proto::error::{ErrorClass, code_from_number};
use rim_proto::ids::{GroupId, Seq, UserId};
use rim_proto::v1::{
    AckInput, AckOutput, Command, ContentType, KickPush, MessagePush, Packet, Reply, SendOutput, SyncInput,
    SyncOutput,
};
use tokio::sync::{mpsc, oneshot, watch};

use crate::config::{ClientConfig, Credentials, Resume};
use crate::error::{ClientError, Result};
use crate::event::{Event, LinkState};
use crate::groups::Feeds;
use crate::link::{Link, Purpose, SignInFailure, SignedIn, sign_in};
use crate::timeline::{SyncProgress, Timeline};
use crate::transport::{Endpoint, LinkReader};

/// What a [`Client`](crate::Client) handle asks of the connection task.
#[derive(Debug)]
pub(crate) enum Request {
    /// Send `command` with `content`; the reply's data (or error) comes back.
    Call { command: Command, content: Bytes, timeout: Duration, reply: oneshot::Sender<Result<Bytes>> },
    /// Read room `room_id` after `after_seq` (see `groups`); the
    /// `SUBSCRIBE_ROOM` reply's data (or error) comes back.
    Subscribe { room_id: GroupId, after_seq: Seq, timeout: Duration, reply: oneshot::Sender<Result<Bytes>> },
    /// Stop reading room `room_id`; the `UNSUBSCRIBE_ROOM` reply comes back
    /// (at once if offline: nothing is subscribed then).
    Unsubscribe { room_id: GroupId, timeout: Duration, reply: oneshot::Sender<Result<Bytes>> },
    /// Flush the ACK, close the connection, stop.
    Close,
}

/// How an online period (or a connection attempt) ended.
#[derive(Debug)]
enum End {
    /// close() or every handle dropped.
    Closed,
    /// Lost; reconnect.
    Lost(String),
    /// Stop for good with this last event.
    Stop(Event),
}

/// The connection task's state across connections.
pub(crate) struct Driver {
    config: Arc<ClientConfig>,
    credentials: Credentials,
    requests: mpsc::Receiver<Request>,
    events: mpsc::Sender<Event>,
    /// Events waiting for room in the channel.
    outbox: VecDeque<Event>,
    state: watch::Sender<LinkState>,
    /// `None` until the first sign-in says where to start.
    timeline: Option<Timeline>,
    /// Highest seq handed to the application.
    delivered: Seq,
    /// The server's ack cursor for this device, as far as known.
    acked: Seq,
    /// The super groups and rooms read.
    feeds: Feeds,
    /// Groups to send `UNSUBSCRIBE_ROOM` for (the user left them).
    unsubscribes: Vec<GroupId>,
    /// Highest group seq handed to the application per group, shared with
    /// the handles ([`Client::group_cursors`](crate::Client::group_cursors)).
    cursors: Arc<Mutex<HashMap<GroupId, Seq>>>,
    /// Index of the next gateway to try.
    next_gateway: usize,
    /// Failed attempts since the last successful sign-in.
    attempt: u32,
    /// When the next automatic ACK is due (armed while `delivered > acked`).
    next_ack: Option<Instant>,
}

impl Driver {
    pub(crate) fn new(
        config: Arc<ClientConfig>,
        credentials: Credentials,
        requests: mpsc::Receiver<Request>,
        events: mpsc::Sender<Event>,
        state: watch::Sender<LinkState>,
        cursors: Arc<Mutex<HashMap<GroupId, Seq>>>,
    ) -> Driver {
        let feeds = Feeds::new(config.push_buffer, config.sync_retry_delay);
        Driver {
            config,
            credentials,
            requests,
            events,
            outbox: VecDeque::new(),
            state,
            timeline: None,
            delivered: Seq::ZERO,
            acked: Seq::ZERO,
            feeds,
            unsubscribes: Vec::new(),
            cursors,
            next_gateway: 0,
            attempt: 0,
            next_ack: None,
        }
    }

    /// Runs until closed, kicked or rejected.
    pub(crate) async fn run(mut self) {
        loop {
            let (end, was_online) = match self.connect().await {
                Ok(Some((signed_in, gateway))) => (self.online(signed_in, gateway).await, true),
                Ok(None) => (End::Closed, false),
                Err(end) => (end, false),
            };
            match end {
                End::Closed => {
                    // Not handed over, so not acknowledged: a later client
                    // gets these again. Closing must not wait for a reader.
                    self.outbox.clear();
                    break;
                }
                End::Stop(event) => {
                    tracing::info!(?event, "client stopped");
                    self.outbox.push_back(event);
                    break;
                }
                End::Lost(reason) => {
                    if was_online {
                        tracing::debug!(%reason, "connection lost; reconnecting");
                        let _ = self.state.send(LinkState::Connecting);
                        if let Some(timeline) = &mut self.timeline {
                            timeline.disconnected();
                        }
                        self.feeds.disconnected();
                        self.notify(Event::Disconnected { reason });
                    } else {
                        tracing::debug!(%reason, attempt = self.attempt, "connecting failed");
                    }
                    if !self.backoff().await {
                        break;
                    }
                }
            }
        }
        let _ = self.state.send(LinkState::Stopped);
        self.requests.close();
        while let Ok(request) = self.requests.try_recv() {
            refuse(request, ClientError::Closed);
        }
        self.flush_outbox().await;
    }

    // ------------------------------------------------------------ offline

    /// Connects to the next gateway and signs in, serving handles meanwhile.
    /// `Ok(None)`: closed while connecting.
    async fn connect(&mut self) -> Result<Option<(SignedIn, Endpoint)>, End> {
        let gateways = &self.config.gateways;
        if gateways.is_empty() {
            return Err(End::Stop(Event::SignInRejected {
                code: ErrorCode::ErrorBadRequest,
                message: "no gateway configured".into(),
            }));
        }
        let endpoint = gateways[self.next_gateway % gateways.len()].clone();
        self.next_gateway = (self.next_gateway + 1) % gateways.len();
        let config = self.config.clone();
        let credentials = self.credentials.clone();
        let attempt = sign_in(&config, &credentials, &endpoint);
        tokio::pin!(attempt);
        let events = self.events.clone();
        loop {
            self.drop_events_if_unwanted();
            tokio::select! {
                result = &mut attempt => return match result {
                    Ok(signed_in) => Ok(Some((signed_in, endpoint.clone()))),
                    Err(SignInFailure::Retry(e)) => Err(End::Lost(format!("{endpoint}: {e}"))),
                    Err(SignInFailure::Fatal(e)) => {
                        let message = e.to_string();
                        Err(End::Stop(Event::SignInRejected { code: e.code(), message }))
                    }
                },
                request = self.requests.recv() => if !self.serve_offline(request) {
                    return Ok(None);
                },
                Ok(permit) = events.reserve(), if !self.outbox.is_empty() => {
                    if let Some(event) = self.outbox.pop_front() {
                        self.handed(&event);
                        permit.send(event);
                    }
                }
            }
        }
    }

    /// Waits before the next attempt. `false`: closed meanwhile.
    async fn backoff(&mut self) -> bool {
        let delay = self.config.backoff.delay(self.attempt);
        self.attempt = self.attempt.saturating_add(1);
        let until = tokio::time::Instant::now() + delay;
        let events = self.events.clone();
        loop {
            self.drop_events_if_unwanted();
            tokio::select! {
                () = tokio::time::sleep_until(until) => return true,
                request = self.requests.recv() => if !self.serve_offline(request) {
                    return false;
                },
                Ok(permit) = events.reserve(), if !self.outbox.is_empty() => {
                    if let Some(event) = self.outbox.pop_front() {
                        self.handed(&event);
                        permit.send(event);
                    }
                }
            }
        }
    }

    /// A handle's request while not connected. `false`: stop.
    fn serve_offline(&mut self, request: Option<Request>) -> bool {
        match request {
            None | Some(Request::Close) => false,
            Some(Request::Unsubscribe { room_id, reply, .. }) => {
                // Nothing is subscribed while offline.
                self.feeds.remove(room_id);
                let _ = reply.send(Ok(Bytes::new()));
                true
            }
            Some(request) => {
                refuse(request, ClientError::NotConnected);
                true
            }
        }
    }

    /// Queues a connection event (`Connected`, `Disconnected`),
    /// unless the application is so far behind that the queue is full: a
    /// client that keeps reconnecting must not pile them up.
    fn notify(&mut self, event: Event) {
        if self.outbox.len() < self.config.event_queue {
            self.outbox.push_back(event);
        } else {
            tracing::debug!(?event, "connection event dropped: the application is behind");
        }
    }

    /// If the application dropped its event receiver, events are discarded.
    fn drop_events_if_unwanted(&mut self) {
        if self.events.is_closed() {
            self.outbox.clear();
        }
    }

    /// Hands the remaining events (ending with the one saying why the client
    /// stopped) over before stopping, within the request timeout in all.
    async fn flush_outbox(&mut self) {
        let deadline = tokio::time::Instant::now() + self.config.request_timeout;
        while let Some(event) = self.outbox.pop_front() {
            match tokio::time::timeout_at(deadline, self.events.send(event)).await {
                Ok(Ok(())) => {}
                _ => return,
            }
        }
    }

    // ------------------------------------------------------------- online

    /// Runs one signed-in connection until it ends.
    async fn online(&mut self, signed_in: SignedIn, gateway: Endpoint) -> End {
        let SignedIn { mut reader, writer, output, early } = signed_in;
        let now = Instant::now();
        let heartbeat = match output.heartbeat_interval_ms {
            0 => self.config.heartbeat_interval,
            ms => Duration::from_millis(u64::from(ms)),
        };
        let mut link = Link::start(&self.config, writer, heartbeat, now);
        self.attempt = 0;
        self.next_ack = None;
        let ack_seq = Seq(output.ack_seq);
        let last_seq = Seq(output.last_seq);
        if self.timeline.is_none() {
            let start = match self.config.resume {
                Resume::FromAck => ack_seq,
                Resume::After(seq) => seq,
            };
            self.delivered = start;
            self.timeline = Some(Timeline::new(start, self.config.push_buffer, self.config.sync_retry_delay));
        }
        self.acked = self.acked.max(ack_seq);
        if let Some(timeline) = &mut self.timeline {
            timeline.connected();
            timeline.observe_head(last_seq, now);
        }
        self.unsubscribes.clear();
        let me = UserId(output.user_id);
        self.feeds.signed_in(me, &output.super_groups, &self.config.group_cursors, now);
        tracing::debug!(%gateway, %last_seq, %ack_seq, "signed in");
        let _ = self.state.send(LinkState::Online { gateway: gateway.clone() });
        self.notify(Event::Connected { gateway, last_seq });

        let mut end = None;
        for packet in early {
            end = end.or(self.on_packet(&mut link, packet));
        }
        self.after_input(&mut link);
        let end = match end {
            Some(end) => end,
            None => self.online_loop(&mut reader, &mut link).await,
        };
        for purpose in link.drain() {
            self.fail(purpose, ClientError::ConnectionLost("the connection ended".into()));
        }
        if matches!(end, End::Closed) {
            self.final_ack(&mut reader, &mut link).await;
            link.close().await;
        } else {
            link.abort();
        }
        end
    }

    async fn online_loop(&mut self, reader: &mut LinkReader, link: &mut Link) -> End {
        // A clone, so that a permit does not borrow `self`.
        let events = self.events.clone();
        loop {
            self.drop_events_if_unwanted();
            let deadline = tokio::time::Instant::from_std(self.next_deadline(link));
            tokio::select! {
                packet = reader.recv() => match packet {
                    Ok(Some(packet)) => {
                        link.last_heard = Instant::now();
                        if let Some(end) = self.on_packet(link, packet) {
                            return end;
                        }
                    }
                    Ok(None) => return End::Lost("the gateway closed the connection".into()),
                    Err(ClientError::Kicked { code, reason }) => return End::Stop(Event::Kicked { code, reason }),
                    Err(e) => return End::Lost(e.to_string()),
                },
                request = self.requests.recv() => match request {
                    None | Some(Request::Close) => return End::Closed,
                    Some(Request::Call { command, content, timeout, reply }) => {
                        let purpose = Purpose::Caller { command, reply };
                        if let Err((e, purpose)) = link.request(command, content, purpose, timeout, Instant::now()) {
                            self.fail(purpose, e);
                        }
                    }
                    Some(Request::Subscribe { room_id, after_seq, timeout, reply }) => {
                        self.subscribe_room(link, room_id, after_seq, timeout, reply);
                    }
                    Some(Request::Unsubscribe { room_id, timeout, reply }) => {
                        self.unsubscribe_room(link, room_id, timeout, reply);
                    }
                },
                Ok(permit) = events.reserve(), if !self.outbox.is_empty() => {
                    if let Some(event) = self.outbox.pop_front() {
                        self.handed(&event);
                        permit.send(event);
                    }
                }
                () = tokio::time::sleep_until(deadline) => {
                    if let Some(end) = self.on_tick(link) {
                        return end;
                    }
                }
                () = link.writer_stopped() => return End::Lost("writing to the gateway failed".into()),
            }
            self.after_input(link);
        }
    }

    /// The earliest timer of the connection.
    fn next_deadline(&self, link: &Link) -> Instant {
        let silent_after = link.heartbeat_interval.saturating_mul(self.config.max_missed_heartbeats.max(1));
        let mut next = link.next_heartbeat.min(link.last_heard + silent_after);
        if let Some(at) = link.next_request_deadline() {
            next = next.min(at);
        }
        // Without room for events no sync starts (see `after_input`); room
        // comes with a permit, which wakes the loop anyway.
        let room = self.outbox.len() < self.config.event_queue;
        if let Some(at) = self.timeline.as_ref().and_then(Timeline::next_deadline).filter(|_| room) {
            next = next.min(at);
        }
        if let Some(at) = self.next_ack {
            next = next.min(at);
        }
        if let Some(at) = self.feeds.next_deadline().filter(|_| room) {
            next = next.min(at);
        }
        next
    }

    /// Timers: request deadlines, heartbeat, silent server, automatic ACK.
    fn on_tick(&mut self, link: &mut Link) -> Option<End> {
        let now = Instant::now();
        for (purpose, timeout) in link.expired(now) {
            self.fail(purpose, ClientError::Timeout(timeout));
        }
        if let Some(end) = self.check_sync_failures() {
            return Some(end);
        }
        let silent_after = link.heartbeat_interval.saturating_mul(self.config.max_missed_heartbeats.max(1));
        if now >= link.last_heard + silent_after {
            return Some(End::Lost(format!("no packet from the gateway for {silent_after:?}")));
        }
        if now >= link.next_heartbeat {
            link.next_heartbeat = now + link.heartbeat_interval;
            let _ = link.request(
                Command::Heartbeat,
                Bytes::new(),
                Purpose::Heartbeat,
                link.heartbeat_interval,
                now,
            );
        }
        if self.next_ack.is_some_and(|at| now >= at) {
            self.next_ack = None;
            if self.delivered > self.acked && !link.ack_in_flight() {
                let seq = self.delivered;
                let content = AckInput { seq: seq.0 }.encode_to_vec().into();
                let timeout = self.config.request_timeout;
                let _ = link.request(Command::Ack, content, Purpose::Ack(seq), timeout, now);
            }
        }
        None
    }

    /// After every input: arm the ACK timer, start a sync if needed, queue
    /// ready entries.
    fn after_input(&mut self, link: &mut Link) {
        let now = Instant::now();
        if self.config.auto_ack && self.delivered > self.acked && self.next_ack.is_none() {
            self.next_ack = Some(now + self.config.ack_interval);
        }
        let room = self.outbox.len() < self.config.event_queue;
        if let Some(timeline) = &mut self.timeline {
            // `poll_sync` counts the sync as started: ask only if it can start.
            if let Some(after_seq) = room.then(|| timeline.poll_sync(now)).flatten() {
                let input = SyncInput { after_seq: after_seq.0, limit: self.config.sync_page };
                let content = input.encode_to_vec().into();
                let timeout = self.config.request_timeout;
                if link.request(Command::Sync, content, Purpose::Sync, timeout, now).is_err() {
                    timeline.sync_failed(now);
                }
            }
        }
        self.queue_own_ready();
        self.feed_requests(link, room, now);
    }

    /// Moves the own list's ready entries to the event queue, following
    /// the membership changes among them.
    fn queue_own_ready(&mut self) {
        while let Some(message) = self.timeline.as_mut().and_then(Timeline::pop_ready) {
            let notification = message.content_type == ContentType::Notification as i32;
            let kept = notification.then(|| message.clone());
            self.outbox.push_back(Event::Message(message));
            if let Some(message) = kept {
                self.follow_membership(&message);
            }
        }
    }

    /// Too many failed syncs in a row: try another connection.
    fn check_sync_failures(&self) -> Option<End> {
        let failures = self.timeline.as_ref().map_or(0, Timeline::failures);
        (failures >= self.config.max_sync_failures.max(1))
            .then(|| End::Lost(format!("syncing failed {failures} times in a row")))
    }

    fn on_packet(&mut self, link: &mut Link, packet: Packet) -> Option<End> {
        if packet.request_id != 0 {
            self.on_reply(link, packet);
            return self.check_sync_failures();
        }
        match Command::try_from(packet.command) {
            Ok(Command::Message) => {
                self.on_push(packet);
                None
            }
            Ok(Command::Kick) => {
                let kick = KickPush::decode(packet.content).unwrap_or_default();
                let code = code_from_number(kick.code);
                if ErrorClass::of(kick.code) == ErrorClass::Auth {
                    Some(End::Stop(Event::Kicked { code, reason: kick.reason }))
                } else {
                    // Shutting down, or we were too slow: go elsewhere.
                    Some(End::Lost(format!("gateway kick ({}): {}", code.as_str_name(), kick.reason)))
                }
            }
            Ok(Command::Unspecified) => {
                // A frame-level error reply (request_id 0); the server closes.
                let reply = Reply::decode(packet.content).unwrap_or_default();
                Some(End::Lost(format!("gateway error {}: {}", reply.code, reply.message)))
            }
            _ => {
                // A push this SDK does not know (a newer server): ignore it.
                tracing::debug!(command = packet.command, "unknown push ignored");
                None
            }
        }
    }

    fn on_reply(&mut self, link: &mut Link, packet: Packet) {
        let Some(purpose) = link.answered(packet.request_id) else {
            return; // timed out already, or a heartbeat echo we forgot
        };
        let now = Instant::now();
        let result = match Reply::decode(packet.content) {
            Ok(reply) if reply.code == 0 => Ok(reply.data),
            Ok(reply) => Err(ClientError::from_reply(&reply)),
            Err(e) => Err(ClientError::Decode(e)),
        };
        match purpose {
            Purpose::Caller { command, reply } => {
                if let Ok(data) = &result {
                    self.observe_reply(command, data, now);
                }
                let _ = reply.send(result);
            }
            Purpose::Sync => {
                let Some(timeline) = &mut self.timeline else { return };
                match result.and_then(|data| Ok(SyncOutput::decode(data)?)) {
                    Ok(output) => {
                        if timeline.sync_ok(output, now) == SyncProgress::CaughtUp {
                            let last_seq = timeline.last();
                            self.queue_own_ready();
                            // Bounded like the entries: syncs start only with room.
                            self.outbox.push_back(Event::Synced { last_seq });
                        }
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "sync failed");
                        timeline.sync_failed(now);
                    }
                }
            }
            Purpose::Ack(seq) => match result.and_then(|data| Ok(AckOutput::decode(data)?)) {
                Ok(output) => self.acked = self.acked.max(Seq(output.ack_seq)).max(seq),
                Err(e) => tracing::debug!(error = %e, %seq, "ack failed"),
            },
            Purpose::Heartbeat | Purpose::Ignore => {}
            Purpose::Subscribe { group_id, generation, reply } => {
                self.subscribed(group_id, generation, result, reply, now);
            }
            Purpose::GroupSync { group_id } => self.group_synced(group_id, result, now),
        }
    }

    /// Learns from successful application requests: a 1:1 send's seq is the
    /// list's head; an explicit ACK moves the cursor.
    fn observe_reply(&mut self, command: Command, data: &Bytes, now: Instant) {
        match command {
            Command::Send => {
                if let (Ok(out), Some(timeline)) = (SendOutput::decode(data.clone()), &mut self.timeline) {
                    timeline.observe_head(Seq(out.seq), now);
                }
            }
            Command::Ack => {
                if let Ok(out) = AckOutput::decode(data.clone()) {
                    self.acked = self.acked.max(Seq(out.ack_seq));
                }
            }
            _ => {}
        }
    }

    fn on_push(&mut self, packet: Packet) {
        let push = match MessagePush::decode(packet.content) {
            Ok(push) => push,
            Err(e) => {
                tracing::warn!(error = %e, seq = packet.seq, "undecodable push dropped");
                return; // a sync repairs the gap if it was a list entry
            }
        };
        let mut message = push.message.unwrap_or_default();
        if message.seq == 0 {
            message.seq = packet.seq;
        }
        let full = self.outbox.len() >= self.config.event_queue;
        if !push.persisted || message.seq == 0 {
            if full {
                tracing::debug!("online-only push shed: the application is behind");
            } else {
                self.outbox.push_back(Event::Ephemeral(message));
            }
            return;
        }
        if feeds::is_group_entry(&message) {
            return self.on_group_push(message, full);
        }
        if let Some(timeline) = &mut self.timeline {
            if full {
                timeline.shed(Seq(message.seq), Instant::now()); // synced once there is room
            } else {
                timeline.push(message, Instant::now());
            }
        }
    }

    /// Before a clean close: acknowledge what was delivered, waiting (within
    /// the request timeout) for the reply.
    async fn final_ack(&mut self, reader: &mut LinkReader, link: &mut Link) {
        if !self.config.auto_ack || self.delivered <= self.acked {
            return;
        }
        let seq = self.delivered;
        let now = Instant::now();
        let content = AckInput { seq: seq.0 }.encode_to_vec().into();
        let Ok(request_id) =
            link.request(Command::Ack, content, Purpose::Ack(seq), self.config.request_timeout, now)
        else {
            return;
        };
        let wait = async {
            while let Ok(Some(packet)) = reader.recv().await {
                if packet.request_id == request_id {
                    return Reply::decode(packet.content).is_ok_and(|r| r.code == 0);
                }
            }
            false
        };
        match tokio::time::timeout(self.config.request_timeout, wait).await {
            Ok(true) => self.acked = seq,
            _ => tracing::debug!(%seq, "final ack not confirmed"),
        }
    }
}

/// Answers a handle's request with `error`.
fn refuse(request: Request, error: ClientError) {
    match request {
        Request::Call { reply, .. }
        | Request::Subscribe { reply, .. }
        | Request::Unsubscribe { reply, .. } => {
            let _ = reply.send(Err(error));
        }
        Request::Close => {}
    }
}
