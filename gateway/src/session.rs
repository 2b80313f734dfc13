//! The sans-IO session state machine of one client connection.
//!
//! A [`Session`] is driven by its transport (TCP on mio, or WebSocket) and by
//! the gateway around it. It owns no socket, no task, no timer and no clock:
//! every input method takes the current time, and every effect is an
//! [`Action`] queued inside the session, which the driver drains with
//! [`Session::poll_action`] (or [`Session::drain_actions`]) after each input.
//!
//! # Inputs
//!
//! | method | from |
//! |---|---|
//! | [`on_packet`](Session::on_packet) | a decoded client packet |
//! | [`on_decode_error`](Session::on_decode_error) | the framing decoder failed |
//! | [`on_activity`](Session::on_activity) | a WebSocket ping or pong (no packet) |
//! | [`on_tick`](Session::on_tick) | time passed ([`next_deadline`](Session::next_deadline) says when) |
//! | [`on_reply`](Session::on_reply) | the outcome of a [`Call`] the session asked for |
//! | [`on_push`](Session::on_push) | the push router: an entry for this connection |
//! | [`on_resync_needed`](Session::on_resync_needed) | the push router: the stream broke or just (re)subscribed |
//! | [`on_kick`](Session::on_kick), [`on_shutdown`](Session::on_shutdown) | the push router or the gateway |
//! | [`on_written`](Session::on_written) | the transport flushed bytes |
//! | [`on_close`](Session::on_close) | the peer closed, or the socket failed |
//!
//! # Outputs
//!
//! [`Action::Send`] (a packet for the client), [`Action::Call`] (a node call
//! to make), [`Action::Register`] / [`Action::Unregister`] (tell the push
//! router), and [`Action::Close`], always the last action of a session. The
//! driver performs actions in order: a `Send` queued before a `Close` is
//! written before the socket closes (within a short linger).
//!
//! # Rules
//!
//! * The first packet must be `SIGN_IN`. Another command before it gets
//!   `ERROR_NOT_SIGNED_IN` (the connection stays open, as `docs/protocol.md`
//!   says, unless [`SessionConfig::close_before_sign_in`]). Packets that
//!   arrive while the sign-in call is in flight are held (bounded) and
//!   handled after it succeeds. A failed sign-in is replied to, then the
//!   session closes. No sign-in within [`SessionConfig::sign_in_timeout`]
//!   closes it; a `SIGN_IN` whose node call is still out by then is first
//!   answered with `ERROR_TIMEOUT` (retryable).
//! * `HEARTBEAT` is answered with `Reply{OK}` (empty content). A connection
//!   from which no packet (nor WebSocket ping or pong,
//!   [`on_activity`](Session::on_activity)) arrived for
//!   `max_missed_heartbeats` × `heartbeat_interval` is closed. The idle
//!   timer pauses while the sign-in call is out (the client is waiting for
//!   the server) and restarts when the sign-in succeeds.
//! * Requests map to node calls; replies echo `request_id` and `command`.
//!   Unknown commands get `ERROR_UNKNOWN_COMMAND`, undecodable content
//!   `ERROR_BAD_REQUEST`, too many requests in flight `ERROR_BUSY`; the
//!   connection stays open. A successful `LOGOUT` is replied to, then the
//!   session closes.
//! * Pushes of the user's own list are delivered in seq order without gaps
//!   or duplicates (see the crate-private `delivery` module): a gap, or a resync request, makes
//!   the session sync from the last delivered seq while it holds back newer
//!   pushes.
//! * Rooms and super groups (`SUBSCRIBE_ROOM` / `UNSUBSCRIBE_ROOM`, the
//!   `groups` child module): a connection may be subscribed to at most
//!   [`MAX_ROOMS_PER_CONNECTION`] rooms and super groups together. The
//!   subscription is kept by the push router (the [`Call`] of the request
//!   goes to it, not to a node: see [`NodeCall::SubscribeRoom`] and
//!   [`PushRouter::call`](crate::router::PushRouter::call)); once it is in place the
//!   client gets `SubscribeRoomOutput`, then the list's entries after
//!   `after_seq` (`after_seq` 0: live only for a room, from the member's
//!   join point for a super group), then live entries, each once and in
//!   group-seq order: every subscription has its own gap-repaired list
//!   (the `delivery` module, synced with `SyncGroup`), held back while its
//!   backlog is read and repaired after a resync request. A room id 0 in
//!   `SUBSCRIBE_ROOM` leaves every room (gim), as does `UNSUBSCRIBE_ROOM`
//!   with room 0. A failed `SUBSCRIBE_ROOM` (an unknown group, a group the
//!   user is not a member of, a small group) leaves the connection
//!   unsubscribed from it; a list that cannot be read any more (a non
//!   retryable `SyncGroup` error) is dropped silently; a super group the
//!   user is removed from, or that is dissolved, is dropped after its
//!   notification is delivered.
//! * Online-only pushes (not persisted, seq 0; the `online` child module)
//!   are sent as they come, without gap checks; normal-priority ones are
//!   dropped for a connection whose send queue is more than half full.
//! * The session counts the bytes it queued for the client (TCP frame
//!   lengths) minus those the transport reports written; above
//!   [`SessionConfig::send_queue_limit`] it closes with `ERROR_BUSY` rather
//!   than wait. Normal-priority room pushes are skipped instead.
//! * A kick sends a `KICK` push, then closes. After the close, inputs are
//!   ignored.
//! * Ids: the session's public surface (its [`Identity`], [`Action`]s,
//!   [`Call`]s, [`Session::rooms`], the seqs it reports) uses the id types
//!   of [`rim_proto::ids`]; the packets it decodes and encodes keep the
//!   wire's integers, converted once where a field is read.

mod groups;
mod online;

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use bytes::Bytes;
use prost::Message as _;
use rim_proto::ErrorCode;
use rim_proto::codec::encoded_frame_len;
use rim_proto::ids::{DeviceId, GroupId, Seq, ShardId, UserId};
use rim_proto::v1::{
    AckInput, Command, KickPush, ListKind, MessagePush, Packet, PushedMessage, ReadInput, RecallInput, Reply,
    SendInput, SignInInput, SyncGroupInput, SyncInput, UnsubscribeRoomInput,
};
use rim_proto::{CodecError, v1::Message};

pub use crate::action::{Action, Identity, Phase};
use crate::call::{Call, CallError, CallId, NodeCall, NodeReply};
pub use crate::config::SessionConfig;
use crate::delivery::{Entry, UserList};
pub(crate) use online::dropped_total as online_pushes_dropped_total;

/// What an outstanding call is for.
#[derive(Debug, Clone, Copy)]
enum Pending {
    /// The connection's sign-in.
    SignIn { request_id: u64 },
    /// A client request, replied to with the node's answer.
    Request { request_id: u64, command: i32 },
    /// A client `LOGOUT`: replied to, then the session closes.
    Logout { request_id: u64 },
    /// The session's own gap-repair sync.
    GapSync,
    /// A client `SUBSCRIBE_ROOM`: replied to, then the room's backlog is
    /// synced.
    SubscribeRoom { request_id: u64, room_id: GroupId },
    /// The backlog or gap-repair sync of a subscribed room.
    RoomSync { room_id: GroupId },
}

/// Most rooms and super groups (together) one connection may be subscribed
/// to at once; a `SUBSCRIBE_ROOM` of another one beyond it gets
/// `ERROR_BAD_REQUEST`. A client subscribes every super group of its user
/// (`SignInOutput.super_groups`), so a user in more super groups than this
/// reads the others with `SYNC_GROUP` only. Each subscription holds back at
/// most [`SessionConfig::group_push_buffer_limit`] pushes while it repairs
/// a gap, which bounds a connection's memory.
pub const MAX_ROOMS_PER_CONNECTION: usize = 64;

/// Largest frame (TCP) or message (WebSocket) a connection may send before
/// it signed in: a `SIGN_IN` with its token is well under 1 KiB, even as
/// JSON. Anything larger closes the connection with
/// `ERROR_FRAME_TOO_LARGE` before it is decoded.
pub const MAX_FRAME_BEFORE_SIGN_IN: usize = 16 << 10;

/// State that exists once signed in.
#[derive(Debug)]
struct Signed {
    id: Identity,
    /// The device's token version at sign-in, sent with every call.
    token_version: u64,
    /// The session this connection is, named by its `Offline`.
    session_epoch: u64,
    /// When the token expires: the session closes with
    /// `ERROR_TOKEN_EXPIRED` then.
    expires_at: Option<Instant>,
    list: UserList,
    /// Subscribed rooms and super groups: delivery state of each list
    /// (group seqs).
    rooms: HashMap<GroupId, UserList>,
    /// Which of `rooms` are super groups (known once subscribed).
    super_groups: HashSet<GroupId>,
}

#[derive(Debug)]
enum State {
    AwaitingSignIn,
    SigningIn { held: VecDeque<Packet> },
    SignedIn(Box<Signed>),
    Closed,
}

/// One client connection's protocol state. See the [module
/// documentation](self).
#[derive(Debug)]
pub struct Session {
    conn_id: u64,
    config: SessionConfig,
    created: Instant,
    last_activity: Instant,
    state: State,
    next_call: u64,
    pending: HashMap<CallId, Pending>,
    queued_bytes: usize,
    /// Packets received before the sign-in completed.
    early_packets: usize,
    /// Normal-priority online-only pushes dropped (queue more than half full).
    dropped_pushes: u64,
    actions: VecDeque<Action>,
}

impl Session {
    /// A session for connection `conn_id`, accepted at `now`.
    pub fn new(conn_id: u64, config: SessionConfig, now: Instant) -> Session {
        Session {
            conn_id,
            config,
            created: now,
            last_activity: now,
            state: State::AwaitingSignIn,
            next_call: 0,
            pending: HashMap::new(),
            queued_bytes: 0,
            early_packets: 0,
            dropped_pushes: 0,
            actions: VecDeque::new(),
        }
    }

    /// The connection id given at creation.
    pub fn conn_id(&self) -> u64 {
        self.conn_id
    }

    /// The configuration.
    pub fn config(&self) -> &SessionConfig {
        &self.config
    }

    /// Where the session is in its life.
    pub fn phase(&self) -> Phase {
        match self.state {
            State::AwaitingSignIn => Phase::AwaitingSignIn,
            State::SigningIn { .. } => Phase::SigningIn,
            State::SignedIn(_) => Phase::SignedIn,
            State::Closed => Phase::Closed,
        }
    }

    /// Whether the session has closed.
    pub fn is_closed(&self) -> bool {
        matches!(self.state, State::Closed)
    }

    /// Whether the sign-in completed (and the session is not closed).
    pub fn is_signed_in(&self) -> bool {
        matches!(self.state, State::SignedIn(_))
    }

    /// The signed-in user and device.
    pub fn identity(&self) -> Option<Identity> {
        match &self.state {
            State::SignedIn(s) => Some(s.id),
            _ => None,
        }
    }

    /// Highest seq of the user's list delivered to the client (or known to
    /// it at sign-in); [`Seq::ZERO`] before sign-in.
    pub fn last_delivered_seq(&self) -> Seq {
        match &self.state {
            State::SignedIn(s) => s.list.last(),
            _ => Seq::ZERO,
        }
    }

    /// Whether a gap-repair sync is in flight or waiting for a retry.
    pub fn is_resyncing(&self) -> bool {
        matches!(&self.state, State::SignedIn(s) if s.list.is_syncing())
    }

    /// Pushes of the user's list held back until a gap-repair sync catches
    /// up.
    pub fn held_pushes(&self) -> usize {
        match &self.state {
            State::SignedIn(s) => s.list.buffered(),
            _ => 0,
        }
    }

    /// The rooms and super groups the connection is subscribed to,
    /// ascending.
    pub fn rooms(&self) -> Vec<GroupId> {
        let mut rooms: Vec<GroupId> = match &self.state {
            State::SignedIn(s) => s.rooms.keys().copied().collect(),
            _ => Vec::new(),
        };
        rooms.sort_unstable();
        rooms
    }

    /// Highest seq of a subscribed room's list delivered to the client (or
    /// skipped: before `after_seq`, or trimmed by the room's retention).
    pub fn last_room_seq(&self, room_id: GroupId) -> Option<Seq> {
        match &self.state {
            State::SignedIn(s) => s.rooms.get(&room_id).map(UserList::last),
            _ => None,
        }
    }

    /// Bytes queued for the client and not yet reported written.
    pub fn queued_bytes(&self) -> usize {
        self.queued_bytes
    }

    /// The earliest time at which [`on_tick`](Self::on_tick) has something
    /// to do; `None` once closed.
    pub fn next_deadline(&self) -> Option<Instant> {
        let idle = self.last_activity + self.config.idle_timeout();
        let sign_in = self.created + self.config.sign_in_timeout;
        match &self.state {
            State::Closed => None,
            State::AwaitingSignIn => Some(idle.min(sign_in)),
            // The client waits for the node: only the sign-in deadline runs.
            State::SigningIn { .. } => Some(sign_in),
            State::SignedIn(s) => Some(
                s.rooms
                    .values()
                    .filter_map(UserList::deadline)
                    .chain(s.list.deadline())
                    .chain(s.expires_at)
                    .fold(idle, Instant::min),
            ),
        }
    }

    /// The next action to carry out, if any.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// Every queued action, in order.
    pub fn drain_actions(&mut self) -> std::collections::vec_deque::Drain<'_, Action> {
        self.actions.drain(..)
    }

    // ------------------------------------------------------------ inputs

    /// A packet decoded from the client. Any packet counts as activity.
    pub fn on_packet(&mut self, now: Instant, packet: Packet) {
        if self.is_closed() {
            return;
        }
        self.last_activity = now;
        if !self.is_signed_in() {
            self.early_packets += 1;
            if self.early_packets > self.config.max_packets_before_sign_in {
                return self.close(ErrorCode::ErrorNotSignedIn, "too many packets before sign-in");
            }
        }
        match &mut self.state {
            State::Closed => {}
            State::AwaitingSignIn => {
                if packet.command == Command::SignIn as i32 {
                    self.start_sign_in(packet);
                } else {
                    self.reply_error(
                        &packet,
                        ErrorCode::ErrorNotSignedIn,
                        "the first packet must be SIGN_IN",
                    );
                    if self.config.close_before_sign_in {
                        self.close(ErrorCode::ErrorNotSignedIn, "a command before SIGN_IN");
                    }
                }
            }
            State::SigningIn { held } => {
                if packet.command == Command::SignIn as i32 {
                    self.reply_error(&packet, ErrorCode::ErrorBadRequest, "sign-in already in progress");
                } else if packet.command == Command::Heartbeat as i32 {
                    self.reply(&packet, Reply::ok(Bytes::new()));
                } else if held.len() < self.config.max_pending_before_sign_in {
                    held.push_back(packet);
                } else {
                    self.reply_error(
                        &packet,
                        ErrorCode::ErrorBusy,
                        "too many requests before sign-in completed",
                    );
                }
            }
            State::SignedIn(_) => self.handle_request(packet),
        }
    }

    /// Transport-level activity that carries no packet: a WebSocket ping or
    /// pong from the client. It resets the idle timer as a packet does
    /// (`docs/protocol.md` section 5: ping/pong frames count as activity),
    /// but nothing else: the sign-in deadline still runs from the
    /// connection's start.
    pub fn on_activity(&mut self, now: Instant) {
        if !self.is_closed() {
            self.last_activity = now;
        }
    }

    /// The framing decoder failed. Every codec error closes the connection;
    /// all but transport errors are first answered with an error reply
    /// (`request_id` 0, `COMMAND_UNSPECIFIED`), as `docs/protocol.md` says.
    pub fn on_decode_error(&mut self, now: Instant, error: &CodecError) {
        if self.is_closed() {
            return;
        }
        self.last_activity = now;
        let code = error.code();
        let reason = error.to_string();
        if !matches!(error, CodecError::Io(_)) {
            let reply = Reply::error(code, reason.clone());
            self.send(Packet { content: reply.encode_to_vec().into(), ..Default::default() });
        }
        self.close(code, reason);
    }

    /// Time passed: sign-in deadline, idle timeout, retry of a failed
    /// gap-repair sync.
    pub fn on_tick(&mut self, now: Instant) {
        if self.is_closed() {
            return;
        }
        let signed_in = matches!(self.state, State::SignedIn(_));
        if !signed_in && now >= self.created + self.config.sign_in_timeout {
            let secs = self.config.sign_in_timeout.as_secs_f64();
            // A SIGN_IN whose node call is still out is answered before the
            // close: every SIGN_IN gets a reply, and this one is retryable
            // (the node was slow, the client did nothing wrong). Closing
            // without it left the client with a bare close.
            let in_flight = self.pending.values().find_map(|p| match p {
                Pending::SignIn { request_id } => Some(*request_id),
                _ => None,
            });
            if let Some(request_id) = in_flight {
                let reason = format!("sign-in did not complete within {secs} s");
                let reply = Reply::error(ErrorCode::ErrorTimeout, reason.clone());
                self.reply_to(request_id, Command::SignIn as i32, reply);
                return self.close(ErrorCode::ErrorTimeout, reason);
            }
            self.close(ErrorCode::ErrorNotSignedIn, format!("no sign-in within {secs} s"));
            return;
        }
        // While the sign-in call is out the client is waiting for us, not
        // silent: the idle timer does not run (see `next_deadline`).
        let idle_timer = !matches!(self.state, State::SigningIn { .. });
        if idle_timer && now >= self.last_activity + self.config.idle_timeout() {
            let secs = self.config.idle_timeout().as_secs_f64();
            self.close(ErrorCode::ErrorTimeout, format!("no packet from the client for {secs} s"));
            return;
        }
        let expired = matches!(&self.state, State::SignedIn(s) if s.expires_at.is_some_and(|at| now >= at));
        if expired {
            let kick = KickPush {
                code: ErrorCode::ErrorTokenExpired as i32,
                reason: "the token expired; sign in again".into(),
            };
            return self.on_kick(now, kick);
        }
        if let State::SignedIn(s) = &mut self.state {
            let user = s.list.tick(now);
            let rooms: Vec<GroupId> =
                s.rooms.iter_mut().filter_map(|(r, l)| l.tick(now).then_some(*r)).collect();
            if user {
                self.start_gap_sync();
            }
            for room_id in rooms {
                self.start_room_sync(room_id);
            }
        }
    }

    /// The outcome of call `id`. Outcomes of calls the session does not
    /// wait for are ignored.
    pub fn on_reply(&mut self, now: Instant, id: CallId, result: Result<NodeReply, CallError>) {
        if self.is_closed() {
            return;
        }
        let Some(pending) = self.pending.remove(&id) else {
            return;
        };
        // A node that finds the device signed out (its kick was lost, or
        // the token expired meanwhile) ends the connection, whatever the call.
        let signed_out = match &result {
            Err(e) if matches!(e.code, ErrorCode::ErrorTokenRevoked | ErrorCode::ErrorTokenExpired) => {
                Some(KickPush { code: e.code as i32, reason: e.message.clone() })
            }
            _ => None,
        };
        if let (Some(kick), true) = (signed_out, self.is_signed_in()) {
            let request = match pending {
                Pending::Request { request_id, command } => Some((request_id, command)),
                Pending::Logout { request_id } => Some((request_id, Command::Logout as i32)),
                Pending::SubscribeRoom { request_id, .. } => {
                    Some((request_id, Command::SubscribeRoom as i32))
                }
                Pending::SignIn { .. } | Pending::GapSync | Pending::RoomSync { .. } => None,
            };
            if let (Some((request_id, command)), Err(e)) = (request, &result) {
                self.reply_to(request_id, command, error_reply(e));
            }
            return self.on_kick(now, kick);
        }
        match pending {
            Pending::SignIn { request_id } => self.finish_sign_in(now, request_id, result),
            Pending::Request { request_id, command } => {
                let reply = match result {
                    Ok(reply) => Reply::ok(reply.encode_data()),
                    Err(e) => error_reply(&e),
                };
                self.reply_to(request_id, command, reply);
            }
            Pending::Logout { request_id } => match result {
                Ok(reply) => {
                    self.reply_to(request_id, Command::Logout as i32, Reply::ok(reply.encode_data()));
                    self.close(ErrorCode::Ok, "logged out");
                }
                Err(e) => self.reply_to(request_id, Command::Logout as i32, error_reply(&e)),
            },
            Pending::GapSync => self.finish_gap_sync(now, id, result),
            Pending::SubscribeRoom { request_id, room_id } => {
                self.finish_subscribe_room(id, request_id, room_id, result)
            }
            Pending::RoomSync { room_id } => self.finish_room_sync(now, id, room_id, result),
        }
    }

    /// An entry for this connection from the push router.
    ///
    /// * The user's own list (`LIST_KIND_USER`, persisted, seq > 0): in
    ///   order, gap-repaired, deduplicated.
    /// * A subscribed room's or super group's list (`LIST_KIND_GROUP`,
    ///   owner = the group): in group-seq order, gap-repaired, deduplicated,
    ///   as the user's list; a normal-priority room entry is skipped
    ///   (counted as delivered) rather than overflow the send queue; an
    ///   entry ending the user's membership ends the subscription (the
    ///   `groups` child module). Lists the connection does not read are
    ///   ignored.
    /// * Online-only pushes (seq 0 or not persisted), broadcasts included:
    ///   sent as they come, without gap checks (the `online` child module).
    ///
    /// Pushes whose `skip_device_id` is this connection's device are not
    /// sent (the device has the entry from its SEND reply) but count as
    /// delivered. Pushes before sign-in are ignored.
    pub fn on_push(&mut self, _now: Instant, push: PushedMessage) {
        let State::SignedIn(signed) = &mut self.state else {
            return;
        };
        if push.seq == 0 || !push.persisted {
            return self.on_online_push(push);
        }
        match ListKind::try_from(push.list_kind) {
            Ok(ListKind::User) => {
                if UserId(push.owner_id) != signed.id.user_id {
                    tracing::debug!(
                        conn = self.conn_id,
                        owner = push.owner_id,
                        "push for another user dropped"
                    );
                    return;
                }
                let skip = skips(&push, signed.id.device_id);
                let message = push.message.unwrap_or_default();
                let mut out = Vec::new();
                let sync = signed.list.push(Entry { seq: Seq(push.seq), message, send: !skip }, &mut out);
                self.deliver(out);
                if sync {
                    self.start_gap_sync();
                }
            }
            Ok(ListKind::Group) => self.on_group_push(push),
            Ok(ListKind::Unspecified) | Err(_) => {
                // Of no list: nothing to order or repair.
                if !skips(&push, signed.id.device_id) {
                    self.send_push(Seq(push.seq), push.message.unwrap_or_default(), false);
                }
            }
        }
    }

    /// The push stream of the user's shard or of a subscribed room's shard
    /// broke (or was just re-established, or just took the user's or a
    /// room's subscription): pushes may have been lost, so sync the user's
    /// list and every subscribed room from the last delivered seq. Ignored
    /// before sign-in.
    pub fn on_resync_needed(&mut self, _now: Instant) {
        let State::SignedIn(s) = &mut self.state else {
            return;
        };
        let user = s.list.resync();
        let rooms: Vec<GroupId> = s.rooms.iter_mut().filter_map(|(r, l)| l.resync().then_some(*r)).collect();
        if user {
            self.start_gap_sync();
        }
        for room_id in rooms {
            self.start_room_sync(room_id);
        }
    }

    /// The connection is kicked (another sign-in of the device, logout or
    /// revocation elsewhere): a `KICK` push with `kick`, then close with
    /// its code.
    pub fn on_kick(&mut self, _now: Instant, kick: KickPush) {
        if self.is_closed() {
            return;
        }
        let code = ErrorCode::try_from(kick.code).unwrap_or(ErrorCode::ErrorKicked);
        let reason = kick.reason.clone();
        self.send(Packet {
            request_id: 0,
            command: Command::Kick as i32,
            content: kick.encode_to_vec().into(),
            seq: 0,
        });
        self.close(code, reason);
    }

    /// The gateway is shutting down: a `KICK` push with
    /// `ERROR_UNAVAILABLE` (the client reconnects elsewhere), then close.
    pub fn on_shutdown(&mut self, now: Instant) {
        let kick =
            KickPush { code: ErrorCode::ErrorUnavailable as i32, reason: "gateway shutting down".into() };
        self.on_kick(now, kick);
    }

    /// The transport wrote `bytes` of what the session queued (TCP: bytes
    /// written to the socket; WebSocket: `encoded_frame_len` of each packet
    /// the writer hands to the socket, counted before the write so that a
    /// client's answer to a packet never finds it still queued).
    pub fn on_written(&mut self, bytes: usize) {
        self.queued_bytes = self.queued_bytes.saturating_sub(bytes);
    }

    /// The peer closed the connection or the socket failed. Emits the
    /// router and node notices but no [`Action::Close`].
    pub fn on_close(&mut self, _now: Instant) {
        if self.is_closed() {
            return;
        }
        self.finish(ErrorCode::Ok);
    }

    // ----------------------------------------------------------- sign-in

    fn start_sign_in(&mut self, packet: Packet) {
        let input = match SignInInput::decode(packet.content.clone()) {
            Ok(input) => input,
            Err(e) => {
                let reason = format!("SIGN_IN content: {e}");
                self.reply_error(&packet, ErrorCode::ErrorBadRequest, reason.clone());
                self.close(ErrorCode::ErrorBadRequest, reason);
                return;
            }
        };
        let (user_id, device_id) = (UserId(input.user_id), DeviceId(input.device_id));
        self.state = State::SigningIn { held: VecDeque::new() };
        let id = self.call_as(user_id, device_id, NodeCall::SignIn(input));
        self.pending.insert(id, Pending::SignIn { request_id: packet.request_id });
    }

    fn finish_sign_in(&mut self, now: Instant, request_id: u64, result: Result<NodeReply, CallError>) {
        let command = Command::SignIn as i32;
        let reply = match result {
            Ok(NodeReply::SignIn(reply)) => *reply,
            Ok(other) => {
                let e = CallError::new(ErrorCode::ErrorInternal, format!("sign-in got {other:?}"));
                return self.fail_sign_in(request_id, e);
            }
            Err(e) => return self.fail_sign_in(request_id, e),
        };
        let Some(mut output) = reply.output else {
            let e = CallError::new(ErrorCode::ErrorInternal, "sign-in reply without output");
            return self.fail_sign_in(request_id, e);
        };
        if output.user_id == 0 || output.device_id == 0 {
            let e = CallError::new(ErrorCode::ErrorInternal, "sign-in reply without user or device");
            return self.fail_sign_in(request_id, e);
        }
        output.heartbeat_interval_ms =
            u32::try_from(self.config.heartbeat_interval.as_millis()).unwrap_or(u32::MAX);
        let id = Identity { user_id: UserId(output.user_id), device_id: DeviceId(output.device_id) };
        let expires_at = expiry_instant(now, reply.token_expires_ms);
        let held = match std::mem::replace(&mut self.state, State::Closed) {
            State::SigningIn { held } => held,
            _ => VecDeque::new(),
        };
        // The idle clock starts now: the client learns its heartbeat
        // interval from this reply, however long the sign-in call took.
        self.last_activity = self.last_activity.max(now);
        self.state = State::SignedIn(Box::new(Signed {
            id,
            token_version: reply.token_version,
            session_epoch: reply.session_epoch,
            expires_at,
            list: UserList::new(Seq(output.last_seq), self.config.push_buffer_limit),
            rooms: HashMap::new(),
            super_groups: HashSet::new(),
        }));
        // Register before the reply: a transport that writes on another
        // task (WebSocket) could otherwise let the client see its sign-in
        // succeed, and sign the device in again elsewhere, before this route
        // exists, so that this older connection would kick the newer one.
        // Once the client has the reply, the route is in place.
        self.push_action(Action::Register {
            conn_id: self.conn_id,
            user_id: id.user_id,
            device_id: id.device_id,
            shard_id: ShardId(reply.shard_id),
        });
        self.reply_to(request_id, command, Reply::ok(output.encode_to_vec()));
        for packet in held {
            if self.is_closed() {
                break;
            }
            self.handle_request(packet);
        }
    }

    fn fail_sign_in(&mut self, request_id: u64, error: CallError) {
        self.reply_to(request_id, Command::SignIn as i32, error_reply(&error));
        self.close(error.code, error.message);
    }

    // ---------------------------------------------------------- requests

    fn handle_request(&mut self, packet: Packet) {
        let Ok(command) = Command::try_from(packet.command) else {
            let reason = format!("unknown command {}", packet.command);
            return self.reply_error(&packet, ErrorCode::ErrorUnknownCommand, reason);
        };
        match command {
            Command::SignIn => self.reply_error(&packet, ErrorCode::ErrorBadRequest, "already signed in"),
            Command::Heartbeat => self.reply(&packet, Reply::ok(Bytes::new())),
            Command::SubscribeRoom => self.subscribe_room(packet),
            Command::Sync => self.request(packet, |i: SyncInput| NodeCall::Sync(i)),
            Command::Ack => self.request(packet, |i: AckInput| NodeCall::Ack(i)),
            Command::Send => self.request(packet, |input: SendInput| NodeCall::Send { input, group: false }),
            Command::SendGroup => {
                self.request(packet, |input: SendInput| NodeCall::Send { input, group: true })
            }
            Command::SyncGroup => self.request(packet, |i: SyncGroupInput| NodeCall::SyncGroup(i)),
            Command::UnsubscribeRoom => match UnsubscribeRoomInput::decode(packet.content.clone()) {
                Ok(input) => {
                    self.leave_rooms(&packet, (input.room_id != 0).then_some(GroupId(input.room_id)))
                }
                Err(e) => self.reply_error(&packet, ErrorCode::ErrorBadRequest, format!("bad content: {e}")),
            },
            Command::Recall => self.request(packet, |i: RecallInput| NodeCall::Recall(i)),
            Command::Read => self.request(packet, |i: ReadInput| NodeCall::MarkRead(i)),
            Command::Logout => self.request(packet, |()| NodeCall::Logout),
            Command::Unspecified | Command::Message | Command::Kick => {
                let reason = format!("{} is not a request", command.as_str_name());
                self.reply_error(&packet, ErrorCode::ErrorUnknownCommand, reason);
            }
        }
    }

    /// Decodes the request's content as `T` and issues the node call built
    /// from it.
    fn request<T: prost::Message + Default>(&mut self, packet: Packet, make: impl FnOnce(T) -> NodeCall) {
        let input = match T::decode(packet.content.clone()) {
            Ok(input) => input,
            Err(e) => {
                return self.reply_error(&packet, ErrorCode::ErrorBadRequest, format!("bad content: {e}"));
            }
        };
        if self.requests_full() {
            return self.reply_error(&packet, ErrorCode::ErrorBusy, "too many requests in flight");
        }
        let call = make(input);
        let pending = if call == NodeCall::Logout {
            Pending::Logout { request_id: packet.request_id }
        } else {
            Pending::Request { request_id: packet.request_id, command: packet.command }
        };
        let id = self.call(call);
        self.pending.insert(id, pending);
    }

    /// Whether [`SessionConfig::max_inflight_requests`] client requests
    /// are waiting for a node (the session's own syncs do not count).
    fn requests_full(&self) -> bool {
        let own = |p: &&Pending| matches!(p, Pending::GapSync | Pending::RoomSync { .. });
        let inflight = self.pending.values().filter(|p| !own(p)).count();
        inflight >= self.config.max_inflight_requests
    }

    // ----------------------------------------------------- push delivery

    fn start_gap_sync(&mut self) {
        let State::SignedIn(s) = &self.state else {
            return;
        };
        let after_seq = s.list.last().0;
        let id = self.call(NodeCall::Sync(SyncInput { after_seq, limit: self.config.resync_batch }));
        self.pending.insert(id, Pending::GapSync);
        if let State::SignedIn(s) = &mut self.state {
            s.list.sync_started(id);
        }
    }

    fn finish_gap_sync(&mut self, now: Instant, id: CallId, result: Result<NodeReply, CallError>) {
        let State::SignedIn(s) = &mut self.state else {
            return;
        };
        if !s.list.is_sync_call(id) {
            return;
        }
        let delay = self.config.resync_retry_delay;
        let mut out = Vec::new();
        let again = match result {
            Ok(NodeReply::Sync(output)) => s.list.sync_ok(now, delay, output, &mut out),
            Ok(other) => {
                tracing::warn!(conn = self.conn_id, ?other, "gap sync got a reply of the wrong kind");
                s.list.sync_failed(now, delay);
                false
            }
            Err(e) => {
                tracing::debug!(conn = self.conn_id, error = %e, "gap sync failed; retrying");
                s.list.sync_failed(now, delay);
                false
            }
        };
        let failures = s.list.failures();
        self.deliver(out);
        if failures >= self.config.max_resync_failures {
            self.close(
                ErrorCode::ErrorUnavailable,
                format!("cannot sync the user's list ({failures} attempts)"),
            );
        } else if again {
            self.start_gap_sync();
        }
    }

    fn deliver(&mut self, entries: Vec<Entry>) {
        for entry in entries {
            if self.is_closed() {
                return;
            }
            if entry.send {
                self.send_push(entry.seq, entry.message, false);
            }
        }
    }

    /// Sends a `MESSAGE` push of a stored entry. A `droppable` push that
    /// does not fit in the send queue is dropped; any other closes the
    /// session instead.
    fn send_push(&mut self, seq: Seq, message: Message, droppable: bool) {
        let content = MessagePush { message: Some(message), persisted: true }.encode_to_vec();
        let packet =
            Packet { request_id: 0, command: Command::Message as i32, content: content.into(), seq: seq.0 };
        if packet.encoded_len() > self.config.max_frame {
            let reason = format!("push of seq {seq} exceeds the maximum frame");
            return self.close(ErrorCode::ErrorInternal, reason);
        }
        if droppable && self.queued_bytes + encoded_frame_len(&packet) > self.config.send_queue_limit {
            tracing::debug!(conn = self.conn_id, %seq, "normal-priority push dropped for a slow connection");
            return;
        }
        self.send(packet);
    }

    // ---------------------------------------------------------- plumbing

    fn reply(&mut self, request: &Packet, reply: Reply) {
        self.reply_to(request.request_id, request.command, reply);
    }

    fn reply_error(&mut self, request: &Packet, code: ErrorCode, message: impl Into<String>) {
        self.reply(request, Reply::error(code, message));
    }

    fn reply_to(&mut self, request_id: u64, command: i32, reply: Reply) {
        let mut packet = Packet { request_id, command, content: reply.encode_to_vec().into(), seq: 0 };
        if packet.encoded_len() > self.config.max_frame {
            let small = Reply::error(ErrorCode::ErrorInternal, "reply exceeds the maximum frame");
            packet.content = small.encode_to_vec().into();
        }
        self.send(packet);
    }

    /// Queues a packet for the client, or closes the session if the send
    /// queue would exceed its limit.
    fn send(&mut self, packet: Packet) {
        if self.is_closed() {
            return;
        }
        let len = encoded_frame_len(&packet);
        if self.queued_bytes + len > self.config.send_queue_limit {
            let reason = format!(
                "send queue full ({} bytes queued, limit {}): client too slow",
                self.queued_bytes, self.config.send_queue_limit
            );
            return self.close(ErrorCode::ErrorBusy, reason);
        }
        self.queued_bytes += len;
        self.push_action(Action::Send(packet));
    }

    fn call(&mut self, request: NodeCall) -> CallId {
        let (user_id, device_id) =
            self.identity().map_or((UserId(0), DeviceId(0)), |i| (i.user_id, i.device_id));
        self.call_as(user_id, device_id, request)
    }

    fn call_as(&mut self, user_id: UserId, device_id: DeviceId, request: NodeCall) -> CallId {
        self.next_call += 1;
        let id = CallId(self.next_call);
        let token_version = match &self.state {
            State::SignedIn(s) => Some(s.token_version),
            _ => None,
        };
        let call = Call { id, conn_id: self.conn_id, user_id, device_id, token_version, request };
        self.push_action(Action::Call(call));
        id
    }

    fn push_action(&mut self, action: Action) {
        self.actions.push_back(action);
    }

    /// Closes the session: router and node notices, then [`Action::Close`].
    fn close(&mut self, code: ErrorCode, reason: impl Into<String>) {
        if self.is_closed() {
            return;
        }
        let reason = reason.into();
        tracing::debug!(conn = self.conn_id, code = code.as_str_name(), %reason, "closing session");
        self.finish(code);
        self.push_action(Action::Close { code, reason });
    }

    /// Enters `Closed`, emitting `Unregister` and the `Offline` call if
    /// signed in.
    fn finish(&mut self, reason: ErrorCode) {
        if let Some(id) = self.identity() {
            self.push_action(Action::Unregister {
                conn_id: self.conn_id,
                user_id: id.user_id,
                device_id: id.device_id,
            });
            let session_epoch = match &self.state {
                State::SignedIn(s) => s.session_epoch,
                _ => 0,
            };
            self.call(NodeCall::Offline { reason, session_epoch });
        }
        self.state = State::Closed;
        self.pending.clear();
    }
}

/// Whether `push` names `device` as the one to skip (it has the entry from
/// its `SEND` reply).
fn skips(push: &PushedMessage, device: DeviceId) -> bool {
    push.skip_device_id != 0 && DeviceId(push.skip_device_id) == device
}

/// The instant a token expiring at Unix ms `expires_ms` expires, as seen
/// from `now` (`None`: no expiry given).
fn expiry_instant(now: Instant, expires_ms: i64) -> Option<Instant> {
    if expires_ms <= 0 {
        return None;
    }
    let wall_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
    let left = u64::try_from(expires_ms.saturating_sub(wall_ms)).unwrap_or(0);
    Some(now + Duration::from_millis(left))
}

/// The `Reply` relaying a failed call.
fn error_reply(error: &CallError) -> Reply {
    Reply { retry_after_ms: error.retry_after_ms, ..Reply::error(error.code, error.message.clone()) }
}
