//! The push router: per-shard push streams, the route of every user to
//! its connections (design section 6), and the one place a session's
//! [`Call`](crate::Call)s are carried out ([`PushRouter::call`]).
//!
//! # Layout
//!
//! * this file: routes (user → connections, device → connection, room →
//!   connections), registration, kicks, delivery to [`ConnSink`]s;
//! * `rooms`: the session's room calls, served here rather than by a node
//!   ([`PushRouter::call`], [`PushRouter::subscribe_room`],
//!   [`PushRouter::unsubscribe_room`]);
//! * `stream`: one task per data shard keeping its `Subscribe` stream, and
//!   the routing of what arrives on it.
//!
//! The router owns its [`Upstream`] and uses it (node calls, leader hints,
//! the cluster map); the upstream knows nothing of the router.
//!
//! # Invariants
//!
//! * A device has at most one route here; a connection's routes and rooms
//!   go with it when it is unregistered, kicked or dropped.
//! * A shard's `members` and `rooms` are exactly the users and rooms with a
//!   connection here; its stream task brings the live subscription to them.
//! * The router never blocks on a connection (see "Slow connections").
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
//! most [`MAX_ROOMS_PER_CONNECTION`](crate::session::MAX_ROOMS_PER_CONNECTION)
//! together, reached through [`PushRouter::call`] of a
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
//! names the new leader), with a deadline per attempt and the shared
//! exponential backoff ([`rim_cluster::Backoff`], without a deadline: a
//! stream is retried for as long as the router runs) between failures. The
//! first request carries the whole set of
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
use rim_proto::ids::{DeviceId, GroupId, ShardId, UserId};
use rim_proto::v1::{KickPush, PushedMessage};
use tokio::sync::{Notify, mpsc, watch};
use tokio::task::JoinHandle;

use crate::upstream::Upstream;

mod rooms;
mod stream;

use rooms::{ConnRooms, Room};

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
    /// Deadline for opening a stream and receiving its first event. The
    /// waits between failed attempts are the shared retry policy's
    /// ([`rim_cluster::Backoff`]), not options.
    pub subscribe_timeout: Duration,
    /// Subscription changes queued towards one stream.
    pub request_queue: usize,
}

impl Default for RouterOptions {
    fn default() -> Self {
        RouterOptions { subscribe_timeout: Duration::from_secs(5), request_queue: 64 }
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

struct Inner {
    upstream: Upstream,
    runtime: tokio::runtime::Handle,
    options: RouterOptions,
    state: Mutex<State>,
    stop: watch::Sender<bool>,
}

struct Conn {
    user_id: UserId,
    device_id: DeviceId,
    shard_id: ShardId,
    sink: Box<dyn ConnSink>,
    rooms: ConnRooms,
}

#[derive(Default)]
struct ShardState {
    /// Users with at least one connection here.
    members: HashSet<UserId>,
    /// Users in the subscription of the live stream (empty while none).
    subscribed: HashSet<UserId>,
    /// Rooms with at least one connection here.
    rooms: HashSet<GroupId>,
    /// Rooms in the subscription of the live stream (empty while none).
    subscribed_rooms: HashSet<GroupId>,
    /// Wakes the shard's task when `members` changed.
    notify: Arc<Notify>,
    task: Option<JoinHandle<()>>,
    /// Address of the node serving the live stream.
    leader: Option<String>,
}

#[derive(Default)]
struct State {
    conns: HashMap<u64, Conn>,
    devices: HashMap<(UserId, DeviceId), u64>,
    users: HashMap<UserId, BTreeSet<u64>>,
    rooms: HashMap<GroupId, Room>,
    shards: HashMap<ShardId, ShardState>,
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
    fn remove_room(&mut self, conn_id: u64, room: GroupId) {
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

    fn room_conns(&self, room: GroupId) -> Vec<u64> {
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
                tracing::info!(conn = id, user = %c.user_id, "connection too slow for its pushes; dropped");
                self.stats.overflows += 1;
                c.sink.overflowed();
            }
        }
    }

    fn conns_of(&self, user_id: UserId) -> Vec<u64> {
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
    pub fn register(
        &self,
        conn_id: u64,
        user_id: UserId,
        device_id: DeviceId,
        shard_id: ShardId,
        sink: impl ConnSink,
    ) {
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
            let task = stream::shard_task(self.inner.clone(), shard_id, shard.notify.clone());
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
    pub fn unregister(&self, conn_id: u64, user_id: UserId, device_id: DeviceId) -> bool {
        let mut st = self.state();
        let matches =
            st.conns.get(&conn_id).is_some_and(|c| c.user_id == user_id && c.device_id == device_id);
        matches && st.remove_conn(conn_id).is_some()
    }

    /// The connection currently registered for a device.
    pub fn device_conn(&self, user_id: UserId, device_id: DeviceId) -> Option<u64> {
        self.state().devices.get(&(user_id, device_id)).copied()
    }

    /// The connections registered for a user, ascending.
    pub fn user_conns(&self, user_id: UserId) -> Vec<u64> {
        self.state().conns_of(user_id)
    }

    /// Whether shard `shard_id` has a live stream whose subscription
    /// includes `user_id`.
    pub fn is_subscribed(&self, shard_id: ShardId, user_id: UserId) -> bool {
        self.state().shards.get(&shard_id).is_some_and(|s| s.subscribed.contains(&user_id))
    }

    /// Address of the node serving shard `shard_id`'s live stream.
    pub fn stream_node(&self, shard_id: ShardId) -> Option<String> {
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

#[cfg(test)]
mod tests;
