//! The push router: per-shard push streams and the route of every user to
//! its connections (design section 6).
//!
//! # Routes
//!
//! A signed-in connection is registered with [`PushRouter::register`]
//! (from [`Action::Register`](crate::Action::Register)) and gives the
//! router a [`ConnSink`] through which it receives [`ConnEvent`]s. The
//! router keeps user → connections and (user, device) → connection. A
//! second registration of the same device on another connection kicks the
//! older one (a [`ConnEvent::Kick`] with `ERROR_KICKED`) and takes over the
//! route; the older connection's [`PushRouter::unregister`] then removes
//! nothing, as it no longer owns the route.
//!
//! # Rooms and super groups
//!
//! A connection may also read rooms and super groups (both "rooms" here:
//! group ids whose list the connection reads; [`PushRouter::subscribe_room`], at
//! most [`MAX_ROOMS_PER_CONNECTION`] together, reached through
//! [`Upstream::call`](crate::upstream::Upstream::call) of a
//! [`NodeCall::SubscribeRoom`](crate::NodeCall::SubscribeRoom)). The router
//! keeps room → connections; the room's shard (`shard_of_group` of the
//! cluster map) carries the room id in its stream's group ids while some
//! connection here reads it, and each `PushedMessage` of a group list
//! (`LIST_KIND_GROUP`, owner = the room) goes to the room's connections.
//! Room changes of one connection are ordered by the session's call ids (the
//! calls run concurrently): a subscribe older than a later unsubscribe of
//! the same room (or of every room) is ignored, and so is an unsubscribe
//! older than a later subscribe. A connection's rooms go with it when it is
//! unregistered, kicked or dropped; a room no connection reads any more is
//! removed from its stream. When a super group's notification ends a
//! user's membership (removed, or the group dissolved), each session of
//! the user delivers it and then unsubscribes the group itself.
//!
//! # Streams
//!
//! Per data shard the router runs one task holding one `Subscribe` stream
//! to the shard's leader. The task finds the leader (the learned hint, the
//! map's hint, then every node in turn; a `StreamEnd{ERROR_NOT_LEADER}`
//! names the new leader), with a deadline per attempt and exponential
//! backoff between failures. The first request carries the whole set of
//! users with connections here; later ones carry adds and removes as
//! connections come and go. Every `PushedMessage` is handed to each
//! connection of its owner (a broadcast, owner 0, to every connection whose
//! user lives in the stream's shard: every shard leader sends a broadcast
//! once, so each connection gets it once); `KickDevice` to that device's
//! connections.
//!
//! Whenever a stream is (re)established, every connection of the shard's
//! users and of the shard's rooms gets [`ConnEvent::ResyncNeeded`] (feed it to
//! [`Session::on_resync_needed`](crate::Session::on_resync_needed)): pushes
//! may have been lost while no stream was up, and seqs are gap-free, so a
//! sync from the last delivered seq finds them. A newly registered
//! connection gets one too once its user is on the stream (at once if the
//! user already was), and the connections of a room once the room is on
//! the stream (not if it already was: the session reads the room's backlog
//! after subscribing anyway).
//!
//! Caveat: the node acknowledges only a stream's first request, so after
//! an add on a live stream the resync is signalled once the add is handed
//! to the stream, not once the leader applied it. An entry appended in
//! that short window is found by the session at the next push's gap check.
//!
//! # Slow connections
//!
//! The router never waits for a connection: [`ConnSink::deliver`] must not
//! block. If it refuses an event (queue full), the connection is dropped
//! from every route and [`ConnSink::overflowed`] is called; for a channel
//! sink the router's sender is dropped, so the connection's receiver ends
//! after the queued events and the connection must then close (and its
//! client syncs after reconnecting).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rim_proto::ErrorCode;
use rim_proto::v1::gateway_service_client::GatewayServiceClient;
use rim_proto::v1::subscribe_event::Event;
use rim_proto::v1::{KickDevice, KickPush, ListKind, PushedMessage, SubscribeEvent, SubscribeRequest};
use tokio::sync::{Notify, mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::call::{CallError, CallId};
use crate::session::MAX_ROOMS_PER_CONNECTION;
use crate::upstream::Upstream;

/// Rooms a connection left whose leaving call is remembered (to ignore a
/// subscribe call overtaken by it); beyond it the oldest are forgotten.
const LEFT_ROOMS_REMEMBERED: usize = 128;

/// What the router tells one connection.
#[derive(Debug, Clone, PartialEq)]
pub enum ConnEvent {
    /// An entry for the connection's user (or a broadcast): feed it to
    /// [`Session::on_push`](crate::Session::on_push).
    Push(PushedMessage),
    /// The connection is kicked: [`Session::on_kick`](crate::Session::on_kick).
    /// The router has already dropped its routes.
    Kick(KickPush),
    /// Pushes of the user's list or of a subscribed room may have been
    /// missed: [`Session::on_resync_needed`](crate::Session::on_resync_needed).
    ResyncNeeded,
}

/// Where the router delivers a connection's events.
pub trait ConnSink: Send + Sync + 'static {
    /// Queues `event` for the connection without blocking; `false` if it
    /// cannot be queued (queue full or connection gone).
    fn deliver(&self, event: ConnEvent) -> bool;

    /// The router dropped the connection because [`deliver`](Self::deliver)
    /// refused an event: the connection must close. Called once, after
    /// which the sink is dropped. The default does nothing.
    fn overflowed(&self) {}
}

/// A bounded channel as a sink: when it is full the router drops its
/// sender, so the receiver ends once drained (`recv()` returns `None`),
/// which tells the connection to close.
impl ConnSink for mpsc::Sender<ConnEvent> {
    fn deliver(&self, event: ConnEvent) -> bool {
        self.try_send(event).is_ok()
    }
}

/// Timers of a [`PushRouter`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouterOptions {
    /// Deadline for opening a stream and receiving its first event.
    pub subscribe_timeout: Duration,
    /// First delay after a failed subscription attempt.
    pub backoff_min: Duration,
    /// Largest delay between attempts.
    pub backoff_max: Duration,
    /// Subscription changes queued towards one stream.
    pub request_queue: usize,
}

impl Default for RouterOptions {
    fn default() -> Self {
        RouterOptions {
            subscribe_timeout: Duration::from_secs(5),
            backoff_min: Duration::from_millis(50),
            backoff_max: Duration::from_secs(2),
            request_queue: 64,
        }
    }
}

/// Counters of a [`PushRouter`], for tests and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RouterStats {
    /// Streams that reached `Subscribed`, over all shards.
    pub subscriptions: u64,
    /// Streams that ended or broke after being established.
    pub stream_breaks: u64,
    /// Connections dropped because their sink refused an event.
    pub overflows: u64,
    /// Connections kicked (second sign-in here, or a `KickDevice`).
    pub kicks: u64,
}

/// Routes pushes to connections and keeps the per-shard push streams. See
/// the [module documentation](self). Cheap to clone; call
/// [`shutdown`](Self::shutdown) to stop its tasks.
#[derive(Clone)]
pub struct PushRouter {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for PushRouter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PushRouter").field("gateway_id", &self.inner.upstream.gateway_id()).finish()
    }
}

pub(crate) struct Inner {
    upstream: Upstream,
    runtime: tokio::runtime::Handle,
    options: RouterOptions,
    state: Mutex<State>,
    stop: watch::Sender<bool>,
}

struct Conn {
    user_id: u64,
    device_id: u64,
    shard_id: u32,
    sink: Box<dyn ConnSink>,
    rooms: ConnRooms,
}

/// The rooms of one connection, with the session call ids that changed
/// them (calls of one session have increasing ids).
#[derive(Default)]
struct ConnRooms {
    /// Subscribed rooms, each with the call that subscribed it.
    rooms: HashMap<u64, u64>,
    /// Rooms left, each with the call that left it (bounded).
    left: HashMap<u64, u64>,
    /// The last call that left every room.
    left_all: u64,
}

/// The connections reading one room.
struct Room {
    shard_id: u32,
    conns: BTreeSet<u64>,
}

#[derive(Default)]
struct ShardState {
    /// Users with at least one connection here.
    members: HashSet<u64>,
    /// Users in the subscription of the live stream (empty while none).
    subscribed: HashSet<u64>,
    /// Rooms with at least one connection here.
    rooms: HashSet<u64>,
    /// Rooms in the subscription of the live stream (empty while none).
    subscribed_rooms: HashSet<u64>,
    /// Wakes the shard's task when `members` changed.
    notify: Arc<Notify>,
    task: Option<JoinHandle<()>>,
    /// Address of the node serving the live stream.
    leader: Option<String>,
}

#[derive(Default)]
struct State {
    conns: HashMap<u64, Conn>,
    devices: HashMap<(u64, u64), u64>,
    users: HashMap<u64, BTreeSet<u64>>,
    rooms: HashMap<u64, Room>,
    shards: HashMap<u32, ShardState>,
    stats: RouterStats,
    stopped: bool,
}

impl State {
    /// Removes a connection from every route; wakes its shard's task if its
    /// user has no connection left.
    fn remove_conn(&mut self, conn_id: u64) -> Option<Conn> {
        let conn = self.conns.remove(&conn_id)?;
        let key = (conn.user_id, conn.device_id);
        if self.devices.get(&key) == Some(&conn_id) {
            self.devices.remove(&key);
        }
        if let Some(set) = self.users.get_mut(&conn.user_id) {
            set.remove(&conn_id);
            if set.is_empty() {
                self.users.remove(&conn.user_id);
                if let Some(shard) = self.shards.get_mut(&conn.shard_id) {
                    shard.members.remove(&conn.user_id);
                    shard.notify.notify_one();
                }
            }
        }
        for &room in conn.rooms.rooms.keys() {
            self.remove_room(conn_id, room);
        }
        Some(conn)
    }

    /// Takes `conn_id` off `room`'s readers; wakes the room's shard task if
    /// no connection reads it any more.
    fn remove_room(&mut self, conn_id: u64, room: u64) {
        let Some(r) = self.rooms.get_mut(&room) else { return };
        r.conns.remove(&conn_id);
        if r.conns.is_empty() {
            let shard_id = r.shard_id;
            self.rooms.remove(&room);
            if let Some(shard) = self.shards.get_mut(&shard_id) {
                shard.rooms.remove(&room);
                shard.notify.notify_one();
            }
        }
    }

    fn room_conns(&self, room: u64) -> Vec<u64> {
        self.rooms.get(&room).map(|r| r.conns.iter().copied().collect()).unwrap_or_default()
    }

    /// Delivers `event` to each of `conns`; drops those that refuse it.
    fn deliver(&mut self, conns: &[u64], event: &ConnEvent) {
        let mut refused = Vec::new();
        for id in conns {
            if let Some(c) = self.conns.get(id)
                && !c.sink.deliver(event.clone())
            {
                refused.push(*id);
            }
        }
        for id in refused {
            if let Some(c) = self.remove_conn(id) {
                tracing::info!(conn = id, user = c.user_id, "connection too slow for its pushes; dropped");
                self.stats.overflows += 1;
                c.sink.overflowed();
            }
        }
    }

    fn conns_of(&self, user_id: u64) -> Vec<u64> {
        self.users.get(&user_id).map(|s| s.iter().copied().collect()).unwrap_or_default()
    }

    /// Kicks and drops one connection.
    fn kick(&mut self, conn_id: u64, push: KickPush) {
        if let Some(c) = self.remove_conn(conn_id) {
            self.stats.kicks += 1;
            if !c.sink.deliver(ConnEvent::Kick(push)) {
                c.sink.overflowed();
            }
        }
    }
}

impl PushRouter {
    /// A router using `upstream` to reach the nodes. Streams are opened
    /// lazily, when a shard gets its first connection, as tasks on the
    /// tokio runtime this is called in (the other methods may be called
    /// from any thread).
    ///
    /// # Panics
    ///
    /// If called outside a tokio runtime.
    pub fn new(upstream: Upstream, options: RouterOptions) -> PushRouter {
        let (stop, _) = watch::channel(false);
        let runtime = tokio::runtime::Handle::current();
        let state = Mutex::new(State::default());
        let inner = Arc::new(Inner { upstream, runtime, options, state, stop });
        inner.upstream.set_router(Arc::downgrade(&inner));
        PushRouter { inner }
    }

    pub(crate) fn from_inner(inner: Arc<Inner>) -> PushRouter {
        PushRouter { inner }
    }

    /// The upstream it uses.
    pub fn upstream(&self) -> &Upstream {
        &self.inner.upstream
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Connection `conn_id` now serves `(user_id, device_id)` of shard
    /// `shard_id` (from [`Action::Register`](crate::Action::Register)).
    /// Kicks an older connection of the same device. The connection gets
    /// [`ConnEvent::ResyncNeeded`] once its user is on the shard's stream.
    pub fn register(&self, conn_id: u64, user_id: u64, device_id: u64, shard_id: u32, sink: impl ConnSink) {
        let mut st = self.state();
        if st.stopped {
            sink.overflowed();
            return;
        }
        // Re-registration of the same connection: start afresh.
        st.remove_conn(conn_id);
        if let Some(&old) = st.devices.get(&(user_id, device_id))
            && old != conn_id
        {
            let push = KickPush {
                code: ErrorCode::ErrorKicked as i32,
                reason: "the device signed in on another connection".into(),
            };
            st.kick(old, push);
        }
        let conn = Conn { user_id, device_id, shard_id, sink: Box::new(sink), rooms: ConnRooms::default() };
        st.conns.insert(conn_id, conn);
        st.devices.insert((user_id, device_id), conn_id);
        st.users.entry(user_id).or_default().insert(conn_id);
        let shard = st.shards.entry(shard_id).or_default();
        shard.members.insert(user_id);
        let live = shard.subscribed.contains(&user_id);
        if shard.task.is_none() {
            let task = shard_task(self.inner.clone(), shard_id, shard.notify.clone());
            shard.task = Some(self.inner.runtime.spawn(task));
        }
        shard.notify.notify_one();
        if live {
            st.deliver(&[conn_id], &ConnEvent::ResyncNeeded);
        }
    }

    /// Connection `conn_id` no longer serves `(user_id, device_id)`. Does
    /// nothing unless the connection is still registered for exactly that
    /// user and device (a kicked connection never removes its
    /// replacement). Returns whether a route was removed.
    pub fn unregister(&self, conn_id: u64, user_id: u64, device_id: u64) -> bool {
        let mut st = self.state();
        let matches =
            st.conns.get(&conn_id).is_some_and(|c| c.user_id == user_id && c.device_id == device_id);
        matches && st.remove_conn(conn_id).is_some()
    }

    /// Connection `conn_id` (registered) now reads room `room_id`, whose
    /// list lives on shard `shard_id`; `call` is the session's call that
    /// asked. A stale call (the connection left the room, or every room,
    /// in a later call) changes nothing. Fails with `ERROR_UNAVAILABLE` if
    /// the connection is not registered (it is closing) or the router
    /// stopped, and with `ERROR_BAD_REQUEST` beyond
    /// [`MAX_ROOMS_PER_CONNECTION`] rooms.
    pub fn subscribe_room(
        &self,
        conn_id: u64,
        room_id: u64,
        shard_id: u32,
        call: CallId,
    ) -> Result<(), CallError> {
        let mut st = self.state();
        if st.stopped {
            return Err(CallError::new(ErrorCode::ErrorUnavailable, "the gateway is shutting down"));
        }
        let Some(conn) = st.conns.get_mut(&conn_id) else {
            return Err(CallError::new(ErrorCode::ErrorUnavailable, "the connection is closing"));
        };
        let rooms = &mut conn.rooms;
        let left = rooms.left.get(&room_id).copied().unwrap_or(0).max(rooms.left_all);
        let subscribed = rooms.rooms.get(&room_id).copied();
        if call.0 <= left.max(subscribed.unwrap_or(0)) {
            return Ok(());
        }
        if subscribed.is_none() && rooms.rooms.len() >= MAX_ROOMS_PER_CONNECTION {
            let reason = format!("at most {MAX_ROOMS_PER_CONNECTION} rooms per connection");
            return Err(CallError::new(ErrorCode::ErrorBadRequest, reason));
        }
        rooms.rooms.insert(room_id, call.0);
        rooms.left.remove(&room_id);
        let room = st.rooms.entry(room_id).or_insert_with(|| Room { shard_id, conns: BTreeSet::new() });
        room.conns.insert(conn_id);
        let shard_id = room.shard_id;
        let shard = st.shards.entry(shard_id).or_default();
        if shard.rooms.insert(room_id) {
            shard.notify.notify_one();
        }
        if shard.task.is_none() {
            let task = shard_task(self.inner.clone(), shard_id, shard.notify.clone());
            shard.task = Some(self.inner.runtime.spawn(task));
            shard.notify.notify_one();
        }
        Ok(())
    }

    /// Connection `conn_id` no longer reads room `room_id` (0: any room);
    /// `call` is the session's call that asked. Rooms subscribed by a
    /// later call stay.
    pub fn unsubscribe_room(&self, conn_id: u64, room_id: u64, call: CallId) {
        let mut st = self.state();
        let Some(conn) = st.conns.get_mut(&conn_id) else { return };
        let rooms = &mut conn.rooms;
        let gone: Vec<u64> = if room_id == 0 {
            rooms.left_all = rooms.left_all.max(call.0);
            let gone: Vec<u64> =
                rooms.rooms.iter().filter(|(_, id)| **id < call.0).map(|(r, _)| *r).collect();
            for r in &gone {
                rooms.rooms.remove(r);
            }
            gone
        } else {
            if rooms.rooms.get(&room_id).is_some_and(|id| *id > call.0) {
                return;
            }
            let left = rooms.left.entry(room_id).or_insert(0);
            *left = (*left).max(call.0);
            if rooms.left.len() > LEFT_ROOMS_REMEMBERED
                && let Some((&oldest, _)) = rooms.left.iter().min_by_key(|(_, id)| **id)
            {
                rooms.left.remove(&oldest);
            }
            rooms.rooms.remove(&room_id).map(|_| room_id).into_iter().collect()
        };
        for room in gone {
            st.remove_room(conn_id, room);
        }
    }

    /// The connections reading room `room_id`, ascending.
    pub fn room_conns(&self, room_id: u64) -> Vec<u64> {
        self.state().room_conns(room_id)
    }

    /// Whether a live stream's subscription includes room `room_id`.
    pub fn is_room_subscribed(&self, room_id: u64) -> bool {
        self.state().shards.values().any(|s| s.subscribed_rooms.contains(&room_id))
    }

    /// The connection currently registered for a device.
    pub fn device_conn(&self, user_id: u64, device_id: u64) -> Option<u64> {
        self.state().devices.get(&(user_id, device_id)).copied()
    }

    /// The connections registered for a user, ascending.
    pub fn user_conns(&self, user_id: u64) -> Vec<u64> {
        self.state().conns_of(user_id)
    }

    /// Whether shard `shard_id` has a live stream whose subscription
    /// includes `user_id`.
    pub fn is_subscribed(&self, shard_id: u32, user_id: u64) -> bool {
        self.state().shards.get(&shard_id).is_some_and(|s| s.subscribed.contains(&user_id))
    }

    /// Address of the node serving shard `shard_id`'s live stream.
    pub fn stream_node(&self, shard_id: u32) -> Option<String> {
        self.state().shards.get(&shard_id).and_then(|s| s.leader.clone())
    }

    /// Counters since creation.
    pub fn stats(&self) -> RouterStats {
        self.state().stats
    }

    /// Stops every stream task and drops every connection's sink (without
    /// kicking; the gateway does that). Registrations after this are
    /// refused.
    pub async fn shutdown(&self) {
        let tasks: Vec<JoinHandle<()>> = {
            let mut st = self.state();
            st.stopped = true;
            st.conns.clear();
            st.devices.clear();
            st.users.clear();
            st.rooms.clear();
            st.shards.values_mut().filter_map(|s| s.task.take()).collect()
        };
        // Stored even if no task has subscribed yet (send would drop it).
        self.inner.stop.send_replace(true);
        for t in tasks {
            let _ = t.await;
        }
    }
}

/// How a stream ended.
enum StreamOutcome {
    /// Try this address next (the node named the leader).
    Hint(String),
    /// Try another node, after a backoff.
    Retry,
    /// The router stopped.
    Stopped,
}

/// Keeps shard `shard_id`'s stream up until the router stops.
async fn shard_task(inner: Arc<Inner>, shard_id: u32, notify: Arc<Notify>) {
    let mut stop = inner.stop.subscribe();
    let opts = inner.options.clone();
    let mut backoff = opts.backoff_min;
    let mut hint: Option<String> = None;
    let mut failed: Option<String> = None;
    let mut rotation = 0usize;
    // Hints followed without a backoff since the last one; bounded so that
    // stale hints pointing at each other cannot spin.
    let mut hops = 0u32;
    loop {
        if *stop.borrow() {
            return;
        }
        let known = inner.upstream.leader_addr(shard_id).filter(|a| failed.as_ref() != Some(a));
        let addr = match hint.take().or(known) {
            Some(a) => a,
            None => {
                if inner.upstream.cluster_map().is_none() {
                    let _ = inner.upstream.refresh_map().await;
                }
                let mut nodes = inner.upstream.node_addrs();
                if nodes.len() > 1 {
                    nodes.retain(|a| failed.as_ref() != Some(a));
                }
                rotation = rotation.wrapping_add(1);
                nodes[rotation % nodes.len()].clone()
            }
        };
        let outcome = run_stream(&inner, shard_id, &addr, &notify, &mut stop, &mut backoff).await;
        {
            let mut st = inner.state.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(s) = st.shards.get_mut(&shard_id) {
                s.subscribed.clear();
                s.subscribed_rooms.clear();
                s.leader = None;
            }
        }
        match outcome {
            StreamOutcome::Stopped => return,
            StreamOutcome::Hint(h) if h != addr => {
                inner.upstream.note_not_leader(shard_id, &addr);
                inner.upstream.note_leader(shard_id, &h);
                failed = Some(addr);
                hint = Some(h);
                hops += 1;
                if hops <= 3 {
                    continue;
                }
            }
            StreamOutcome::Hint(_) | StreamOutcome::Retry => {
                inner.upstream.note_not_leader(shard_id, &addr);
                failed = Some(addr);
            }
        }
        hops = 0;
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stop.changed() => return,
        }
        backoff = (backoff * 2).min(opts.backoff_max);
    }
}

/// Opens one stream at `addr` and serves it until it ends.
async fn run_stream(
    inner: &Arc<Inner>,
    shard_id: u32,
    addr: &str,
    notify: &Notify,
    stop: &mut watch::Receiver<bool>,
    backoff: &mut Duration,
) -> StreamOutcome {
    let opts = &inner.options;
    let upstream = &inner.upstream;
    let gateway_id = upstream.gateway_id().to_string();
    let ch = match upstream.channel(addr) {
        Ok(ch) => ch,
        Err(_) => return StreamOutcome::Retry,
    };
    let mut sent = {
        let st = inner.state.lock().unwrap_or_else(|e| e.into_inner());
        st.shards
            .get(&shard_id)
            .map(|s| Sent { users: s.members.clone(), rooms: s.rooms.clone() })
            .unwrap_or_default()
    };
    let (tx, rx) = mpsc::channel::<SubscribeRequest>(opts.request_queue.max(1));
    let first = SubscribeRequest {
        gateway_id: gateway_id.clone(),
        shard_id,
        reset: true,
        add_user_ids: sent.users.iter().copied().collect(),
        add_group_ids: sent.rooms.iter().copied().collect(),
        ..Default::default()
    };
    if tx.try_send(first).is_err() {
        return StreamOutcome::Retry;
    }
    let req = upstream.request(tokio_stream::wrappers::ReceiverStream::new(rx), None);
    let deadline = Instant::now() + opts.subscribe_timeout;
    let open = async {
        let mut stream = GatewayServiceClient::new(ch).subscribe(req).await?.into_inner();
        let first = stream.message().await?;
        Ok::<_, tonic::Status>((stream, first))
    };
    let (mut stream, first) = tokio::select! {
        r = tokio::time::timeout_at(deadline, open) => match r {
            Ok(Ok(v)) => v,
            Ok(Err(status)) => {
                tracing::debug!(shard = shard_id, node = addr, %status, "subscribe failed");
                return match rim_proto::error::leader_of_status(&status) {
                    Some(h) if !h.is_empty() => StreamOutcome::Hint(h.to_string()),
                    _ => StreamOutcome::Retry,
                };
            }
            Err(_) => {
                tracing::debug!(shard = shard_id, node = addr, "subscribe timed out");
                return StreamOutcome::Retry;
            }
        },
        _ = stop.changed() => return StreamOutcome::Stopped,
    };
    match first.and_then(|e| e.event) {
        Some(Event::Subscribed(_)) => {}
        Some(Event::End(end)) => return end_outcome(inner, shard_id, addr, &end),
        other => {
            tracing::debug!(shard = shard_id, node = addr, ?other, "unexpected first subscribe event");
            return StreamOutcome::Retry;
        }
    }
    // Live: everyone of this shard resyncs (pushes may have been missed).
    *backoff = opts.backoff_min;
    upstream.note_leader(shard_id, addr);
    tracing::info!(
        shard = shard_id,
        node = addr,
        users = sent.users.len(),
        rooms = sent.rooms.len(),
        "push stream subscribed"
    );
    {
        let mut st = inner.state.lock().unwrap_or_else(|e| e.into_inner());
        st.stats.subscriptions += 1;
        let (members, rooms): (Vec<u64>, Vec<u64>) = match st.shards.get_mut(&shard_id) {
            Some(s) => {
                s.subscribed = sent.users.clone();
                s.subscribed_rooms = sent.rooms.clone();
                s.leader = Some(addr.to_string());
                (s.members.iter().copied().collect(), s.rooms.iter().copied().collect())
            }
            None => (Vec::new(), Vec::new()),
        };
        // Members and rooms added since the snapshot are handled by the
        // diff below.
        let mut conns: BTreeSet<u64> =
            members.iter().filter(|u| sent.users.contains(u)).flat_map(|u| st.conns_of(*u)).collect();
        conns.extend(rooms.iter().filter(|r| sent.rooms.contains(r)).flat_map(|r| st.room_conns(*r)));
        let conns: Vec<u64> = conns.into_iter().collect();
        st.deliver(&conns, &ConnEvent::ResyncNeeded);
    }
    notify.notify_one();
    let outcome = loop {
        tokio::select! {
            _ = notify.notified() => {
                if let Err(()) = sync_members(inner, shard_id, &gateway_id, &tx, &mut sent).await {
                    break StreamOutcome::Retry;
                }
            }
            ev = stream.message() => match ev {
                Ok(Some(SubscribeEvent { event: Some(ev) })) => match ev {
                    Event::Message(m) => route_push(inner, shard_id, m),
                    Event::Kick(k) => route_kick(inner, k),
                    Event::Subscribed(_) => {}
                    Event::End(end) => break end_outcome(inner, shard_id, addr, &end),
                },
                Ok(Some(SubscribeEvent { event: None })) => {}
                Ok(None) => break StreamOutcome::Retry,
                Err(status) => {
                    tracing::debug!(shard = shard_id, node = addr, %status, "push stream broke");
                    break StreamOutcome::Retry;
                }
            },
            _ = stop.changed() => break StreamOutcome::Stopped,
        }
    };
    if !matches!(outcome, StreamOutcome::Stopped) {
        tracing::info!(shard = shard_id, node = addr, "push stream ended; re-subscribing");
        let mut st = inner.state.lock().unwrap_or_else(|e| e.into_inner());
        st.stats.stream_breaks += 1;
    }
    outcome
}

/// What a stream's subscription carries.
#[derive(Default)]
struct Sent {
    users: HashSet<u64>,
    rooms: HashSet<u64>,
}

/// Sends the difference between the shard's members and rooms and what the
/// stream carries; signals a resync to the connections of users and rooms
/// just added.
async fn sync_members(
    inner: &Arc<Inner>,
    shard_id: u32,
    gateway_id: &str,
    tx: &mpsc::Sender<SubscribeRequest>,
    sent: &mut Sent,
) -> Result<(), ()> {
    let (members, rooms) = {
        let st = inner.state.lock().unwrap_or_else(|e| e.into_inner());
        st.shards.get(&shard_id).map(|s| (s.members.clone(), s.rooms.clone())).unwrap_or_default()
    };
    let add: Vec<u64> = members.difference(&sent.users).copied().collect();
    let remove: Vec<u64> = sent.users.difference(&members).copied().collect();
    let add_rooms: Vec<u64> = rooms.difference(&sent.rooms).copied().collect();
    let remove_rooms: Vec<u64> = sent.rooms.difference(&rooms).copied().collect();
    if add.is_empty() && remove.is_empty() && add_rooms.is_empty() && remove_rooms.is_empty() {
        return Ok(());
    }
    let req = SubscribeRequest {
        gateway_id: gateway_id.to_string(),
        shard_id,
        reset: false,
        add_user_ids: add.clone(),
        remove_user_ids: remove.clone(),
        add_group_ids: add_rooms.clone(),
        remove_group_ids: remove_rooms.clone(),
    };
    let timeout = inner.options.subscribe_timeout;
    if tokio::time::timeout(timeout, tx.send(req)).await.map_or(true, |r| r.is_err()) {
        return Err(());
    }
    for u in &remove {
        sent.users.remove(u);
    }
    sent.users.extend(add.iter().copied());
    for r in &remove_rooms {
        sent.rooms.remove(r);
    }
    sent.rooms.extend(add_rooms.iter().copied());
    let mut st = inner.state.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(s) = st.shards.get_mut(&shard_id) {
        s.subscribed = sent.users.clone();
        s.subscribed_rooms = sent.rooms.clone();
    }
    let mut conns: BTreeSet<u64> = add.iter().flat_map(|u| st.conns_of(*u)).collect();
    conns.extend(add_rooms.iter().flat_map(|r| st.room_conns(*r)));
    let conns: Vec<u64> = conns.into_iter().collect();
    st.deliver(&conns, &ConnEvent::ResyncNeeded);
    Ok(())
}

fn end_outcome(inner: &Inner, shard_id: u32, addr: &str, end: &rim_proto::v1::StreamEnd) -> StreamOutcome {
    let code = rim_proto::error::code_from_number(end.code);
    tracing::debug!(shard = shard_id, node = addr, code = code.as_str_name(), leader = %end.leader_addr, "stream end");
    if let Some(map) = inner.upstream.cluster_map()
        && end.cluster_map_version > map.version()
    {
        // Refreshed by the task's next attempt when it needs node addresses.
        let up = inner.upstream.clone();
        inner.runtime.spawn(async move {
            let _ = up.refresh_map().await;
        });
    }
    let hinted = if !end.leader_addr.is_empty() {
        Some(end.leader_addr.clone())
    } else if end.leader_node_id != 0 {
        inner.upstream.node_addr(end.leader_node_id)
    } else {
        None
    };
    match hinted {
        Some(h) if code == ErrorCode::ErrorNotLeader || h != addr => StreamOutcome::Hint(h),
        _ => StreamOutcome::Retry,
    }
}

/// Hands a push that came on shard `shard_id`'s stream to its connections.
fn route_push(inner: &Inner, shard_id: u32, push: PushedMessage) {
    let mut st = inner.state.lock().unwrap_or_else(|e| e.into_inner());
    let conns: Vec<u64> = if push.owner_id == 0 && push.list_kind != ListKind::Group as i32 {
        // A broadcast: every shard leader sends it once, each to the
        // connections of its own users, so each connection gets it once.
        st.conns.iter().filter(|(_, c)| c.shard_id == shard_id).map(|(id, _)| *id).collect()
    } else if push.list_kind == ListKind::Group as i32 {
        // Rooms and super groups.
        st.room_conns(push.owner_id)
    } else {
        st.conns_of(push.owner_id)
    };
    st.deliver(&conns, &ConnEvent::Push(push));
}

fn route_kick(inner: &Inner, kick: KickDevice) {
    let gateway_id = inner.upstream.gateway_id();
    let mut st = inner.state.lock().unwrap_or_else(|e| e.into_inner());
    let targets: Vec<u64> = st
        .conns_of(kick.user_id)
        .into_iter()
        .filter(|id| st.conns.get(id).is_some_and(|c| c.device_id == kick.device_id))
        .filter(|id| !(kick.keep_conn_id == *id && kick.keep_gateway_id == gateway_id))
        .collect();
    let push = kick.push.unwrap_or(KickPush {
        code: ErrorCode::ErrorTokenRevoked as i32,
        reason: "the device was signed out".into(),
    });
    for id in targets {
        st.kick(id, push.clone());
    }
}

#[cfg(test)]
mod tests;
