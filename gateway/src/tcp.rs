//! The TCP transport: varint-length-delimited `Packet` frames
//! ([`rim_proto::codec`]) on mio (epoll) event loops.
//!
//! # Structure
//!
//! [`TcpGateway::start`] spawns [`TcpOptions::event_loop_threads`] event-loop
//! threads (default one). There is no thread or task per connection: each
//! loop owns a [`mio::Poll`], a clone of the listening socket, a
//! [`mio::Waker`] and a slab of connections. A connection is its link (the
//! socket, plain or TLS, and an outbound plaintext queue: the `link`
//! module), its wire (the `wire` module: a
//! [`FrameDecoder`](rim_proto::codec::FrameDecoder) holding the bytes of an
//! incomplete frame, or for [`Protocol::Gim`] gim's framing and the
//! [`crate::gim`] translator), its [`Session`] and a connection id that doubles as a generation number:
//! messages addressed to a slab key whose connection has been replaced are
//! recognised by the id and dropped.
//!
//! * **Readable**: read into one scratch buffer per loop (under TLS,
//!   decrypted at once, all of it), feed the plaintext to the decoder, hand
//!   every frame to [`Session::on_packet`] (a decode error to
//!   [`Session::on_decode_error`]). A connection is read until `WouldBlock`
//!   (mio is edge-triggered) or until it used its [`READ_BUDGET`] for this
//!   turn of the loop (bytes off the wire: ciphertext under TLS); then it
//!   goes to the back of the loop's ready queue and is read again after
//!   every other event, timer and reply of the turn was handled, so one
//!   flooding client cannot starve the others nor the timers. End of stream
//!   (or the peer's TLS `close_notify`), a read error or a TLS error ends
//!   the connection ([`Session::on_close`]).
//! * **Writable**: flush the queue and report what left with
//!   [`Session::on_written`] (under TLS, the plaintext of records that left
//!   whole). Interest in `WRITABLE` is registered only while there is
//!   something to write after a write hit `WouldBlock`.
//! * **Timers**: a heap of per-connection deadlines from
//!   [`Session::next_deadline`] sets the poll timeout;
//!   [`Session::on_tick`] runs when one passes.
//! * **Actions**: [`Action::Send`] encodes a frame into the queue;
//!   [`Action::Call`] runs [`PushRouter::call`] (room subscriptions there,
//!   node calls through [`Upstream::call`]) on the tokio runtime, whose
//!   outcome comes back through the loop's bounded channel plus its waker
//!   ([`Session::on_reply`]); [`Action::Register`] / [`Action::Unregister`]
//!   go to the [`PushRouter`], with a sink that queues the router's
//!   [`ConnEvent`]s into the same channel; [`Action::Close`] stops reading,
//!   flushes what is queued (within a short linger) and closes the socket.
//! * **Wake-ups** are coalesced: a producer calls [`mio::Waker::wake`] only
//!   when it flips the loop's pending flag, which the loop clears before it
//!   drains the channel.
//!
//! Connections beyond [`TcpOptions::max_connections`] (over all loops) are
//! accepted and closed at once. [`TcpGateway::shutdown`] stops accepting,
//! sends every session's `KICK` ([`Session::on_shutdown`]), flushes, closes
//! and joins the threads.
//!
//! # TLS
//!
//! With [`TcpOptions::tls`], every accepted connection is the server side of
//! a rustls [`ServerConnection`](rustls::ServerConnection) driven sans-IO on
//! the loop: the same frames, inside TLS records. The `link` module holds
//! the only code that differs; its invariants:
//!
//! * a connection's plaintext is processed before the loop waits again:
//!   rustls never holds decrypted bytes across a wait, so edge-triggered
//!   readiness strands nothing;
//! * rustls holds at most one record of a connection's output (plus the
//!   handshake): the session's send-queue limit still bounds what a slow
//!   reader costs, and still closes it;
//! * the handshake is part of the time to sign in: a client that connects
//!   and never completes it is closed at
//!   [`SessionConfig::sign_in_timeout`] like one that never signs in;
//! * a TLS alert or garbage ends that connection only; a closing connection
//!   sends `close_notify` after its last frame (kick, shutdown, any close).
//!
//! # Limits
//!
//! * A peer's end of stream closes the connection at once, even if replies
//!   were still due (a half-closed client gets nothing more).
//! * A connection that floods the gateway is read [`READ_BUDGET`] bytes per
//!   turn; its session's own limits (in-flight requests, send queue, packets
//!   before sign-in) bound the work it causes.
//! * Before its sign-in completed, a connection's frames may be at most
//!   [`MAX_FRAME_BEFORE_SIGN_IN`](crate::session::MAX_FRAME_BEFORE_SIGN_IN)
//!   bytes (either protocol); the decoder's limit rises to
//!   [`SessionConfig::max_frame`] once the session signed in.
//! * If the router refuses an event because the loop's channel is full, the
//!   connection is kicked with `ERROR_UNAVAILABLE` (its client reconnects
//!   and syncs).
//! * TLS handshakes run on the event loop's thread: their public-key
//!   operations (a fraction of a millisecond with an ECDSA key such as
//!   `rim_cluster::tls::pki` makes, more with RSA) delay the loop's other
//!   connections while many clients connect at once.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token, Waker};
use rim_proto::ErrorCode;
use rim_proto::v1::KickPush;
use slab::Slab;
use tokio::sync::mpsc;

use crate::Protocol;
use crate::call::{Call, CallError, CallId, NodeCall, NodeReply};
use crate::notice::Notices;
use crate::router::{ConnEvent, ConnSink, PushRouter};
use crate::session::{Action, Session, SessionConfig};
use crate::upstream::Upstream;

mod link;
mod wire;

use link::{Link, Read};
pub use link::{TLS_BUFFER_LIMIT, TLS_RECORD};
use wire::Wire;

/// Token of the listening socket (outside any slab key in practice).
const LISTENER: Token = Token(usize::MAX - 1);
/// Token of the loop's waker.
const WAKER: Token = Token(usize::MAX - 2);
/// Bytes read from a socket at once, into the loop's scratch buffer.
const SCRATCH: usize = 64 * 1024;
/// Bytes read from one connection per turn of the event loop (off the
/// wire: ciphertext under TLS).
pub const READ_BUDGET: usize = 4 * SCRATCH;
/// Messages (call outcomes and router events) queued towards one loop.
const INBOUND_QUEUE: usize = 64 * 1024;
/// How long a closing connection may take to flush what is queued.
const CLOSE_LINGER: Duration = Duration::from_secs(2);
/// How long a shutting-down loop waits for its connections to flush.
const SHUTDOWN_LINGER: Duration = Duration::from_secs(2);

/// First connection id of the process-wide counter used by
/// [`TcpGateway::start`]: far above the WebSocket transport's default
/// counter (which starts at 1), so the two never collide on one router.
pub const DEFAULT_FIRST_CONN_ID: u64 = 1 << 48;

/// The process-wide connection-id counter of [`TcpGateway::start`].
fn default_conn_ids() -> Arc<AtomicU64> {
    static IDS: OnceLock<Arc<AtomicU64>> = OnceLock::new();
    IDS.get_or_init(|| Arc::new(AtomicU64::new(DEFAULT_FIRST_CONN_ID))).clone()
}

/// Options of a [`TcpGateway`].
#[derive(Debug, Clone)]
pub struct TcpOptions {
    /// Most open connections over all event loops; connections beyond it
    /// are closed as soon as they are accepted (default 100 000).
    pub max_connections: usize,
    /// Event-loop threads, each serving its share of the connections
    /// (default 1; 0 is taken as 1).
    pub event_loop_threads: usize,
    /// TLS: every connection is the server side of a TLS session with this
    /// configuration (e.g. [`rim_cluster::tls::server_config`]); `None`
    /// (the default) speaks plaintext. [`Gateway::start`](crate::Gateway::start)
    /// sets it from [`GatewayConfig::tls`](crate::GatewayConfig::tls).
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// The client protocol of every connection (default [`Protocol::Rim`];
    /// [`Protocol::Gim`]: gim's packets, translated by [`crate::gim`]).
    pub protocol: Protocol,
}

impl Default for TcpOptions {
    fn default() -> Self {
        TcpOptions { max_connections: 100_000, event_loop_threads: 1, tls: None, protocol: Protocol::Rim }
    }
}

/// A running TCP gateway: its event-loop threads and what is needed to stop
/// them. Dropping it shuts it down too.
#[derive(Debug)]
pub struct TcpGateway {
    local_addr: SocketAddr,
    loops: Vec<(Arc<Shared>, JoinHandle<()>)>,
    open: Arc<AtomicUsize>,
}

impl TcpGateway {
    /// Serves `listener` (already bound and listening; it is made
    /// non-blocking here) with [`TcpOptions::event_loop_threads`] event
    /// loops. Node calls run on `runtime` with `upstream`; signed-in
    /// connections are registered with `router`. Every connection's session
    /// uses `config`; its [`SessionConfig::max_frame`] is also the largest
    /// frame accepted from clients.
    ///
    /// Connection ids come from a process-wide counter starting at
    /// [`DEFAULT_FIRST_CONN_ID`]; see
    /// [`start_with_conn_ids`](Self::start_with_conn_ids) to share one.
    pub fn start(
        listener: std::net::TcpListener,
        upstream: Upstream,
        router: PushRouter,
        config: SessionConfig,
        runtime: tokio::runtime::Handle,
        options: TcpOptions,
    ) -> crate::Result<TcpGateway> {
        Self::start_with_conn_ids(listener, upstream, router, config, runtime, options, default_conn_ids())
    }

    /// As [`start`](Self::start), taking connection ids from `conn_ids`
    /// (`fetch_add(1)`). Every transport registering with the same
    /// [`PushRouter`] must draw its ids from one counter, so that they never
    /// collide (the WebSocket transport's `with_conn_ids` takes the same
    /// kind of counter).
    pub fn start_with_conn_ids(
        listener: std::net::TcpListener,
        upstream: Upstream,
        router: PushRouter,
        config: SessionConfig,
        runtime: tokio::runtime::Handle,
        options: TcpOptions,
        conn_ids: Arc<AtomicU64>,
    ) -> crate::Result<TcpGateway> {
        listener.set_nonblocking(true)?;
        let local_addr = listener.local_addr()?;
        let open = Arc::new(AtomicUsize::new(0));
        let threads = options.event_loop_threads.max(1);
        let notices = Notices::default();
        let mut gateway = TcpGateway { local_addr, loops: Vec::with_capacity(threads), open: open.clone() };
        for i in 0..threads {
            let poll = Poll::new()?;
            let waker = Waker::new(poll.registry(), WAKER)?;
            let mut socket = TcpListener::from_std(listener.try_clone()?);
            poll.registry().register(&mut socket, LISTENER, Interest::READABLE)?;
            let shared = Arc::new(Shared {
                waker,
                pending: AtomicBool::new(false),
                stop: AtomicBool::new(false),
                overflowed: Mutex::new(Vec::new()),
            });
            let (tx, rx) = mpsc::channel(INBOUND_QUEUE);
            let event_loop = EventLoop {
                poll,
                listener: Some(socket),
                slab: Slab::new(),
                timers: BinaryHeap::new(),
                scratch: vec![0; SCRATCH],
                ready: VecDeque::new(),
                rx,
                ctx: Ctx {
                    upstream: upstream.clone(),
                    router: router.clone(),
                    runtime: runtime.clone(),
                    config: config.clone(),
                    tx,
                    shared: shared.clone(),
                    open: open.clone(),
                    max_connections: options.max_connections,
                    tls: options.tls.clone(),
                    protocol: options.protocol,
                    conn_ids: conn_ids.clone(),
                    notices: notices.clone(),
                },
                stopping: None,
            };
            let thread =
                std::thread::Builder::new().name(format!("rim-tcp-{i}")).spawn(move || event_loop.run())?;
            gateway.loops.push((shared, thread));
        }
        let (tls, protocol) = (options.tls.is_some(), options.protocol.as_str());
        tracing::info!(addr = %local_addr, threads, tls, protocol, "TCP gateway listening");
        Ok(gateway)
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Connections currently open, over all loops.
    pub fn connections(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    /// The live count behind [`connections`](Self::connections), for
    /// readers that outlive this handle (metrics).
    pub fn connection_counter(&self) -> Arc<AtomicUsize> {
        self.open.clone()
    }

    /// Stops accepting, kicks every session with `ERROR_UNAVAILABLE`
    /// ([`Session::on_shutdown`]), flushes (within a short linger), closes
    /// every connection and joins the event-loop threads. Blocks the
    /// calling thread meanwhile (at most a few seconds).
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        for (shared, _) in &self.loops {
            shared.stop.store(true, Ordering::Release);
            shared.wake();
        }
        for (_, thread) in self.loops.drain(..) {
            if thread.join().is_err() {
                tracing::error!("a TCP event loop panicked");
            }
        }
    }
}

impl Drop for TcpGateway {
    fn drop(&mut self) {
        self.stop();
    }
}

/// What one loop shares with the threads that talk to it.
#[derive(Debug)]
struct Shared {
    waker: Waker,
    /// Set when a wake-up is pending; the loop clears it before draining.
    pending: AtomicBool,
    /// The gateway is shutting down.
    stop: AtomicBool,
    /// Connections the router dropped (their sink refused an event).
    overflowed: Mutex<Vec<(usize, u64)>>,
}

impl Shared {
    /// Wakes the loop unless a wake-up is already pending.
    fn wake(&self) {
        if !self.pending.swap(true, Ordering::AcqRel)
            && let Err(e) = self.waker.wake()
        {
            tracing::warn!(error = %e, "cannot wake a TCP event loop");
        }
    }
}

/// A message for one connection of a loop, addressed by slab key and
/// connection id.
#[derive(Debug)]
enum Inbound {
    /// The outcome of a node call.
    Reply { key: usize, conn_id: u64, id: CallId, result: Result<NodeReply, CallError> },
    /// An event from the push router.
    Event { key: usize, conn_id: u64, event: ConnEvent },
}

/// The router's way into a loop for one connection.
struct LoopSink {
    key: usize,
    conn_id: u64,
    tx: mpsc::Sender<Inbound>,
    shared: Arc<Shared>,
}

impl ConnSink for LoopSink {
    fn deliver(&self, event: ConnEvent) -> bool {
        let ok = self.tx.try_send(Inbound::Event { key: self.key, conn_id: self.conn_id, event }).is_ok();
        if ok {
            self.shared.wake();
        }
        ok
    }

    fn overflowed(&self) {
        self.shared.overflowed.lock().unwrap_or_else(|e| e.into_inner()).push((self.key, self.conn_id));
        self.shared.wake();
    }
}

/// One connection.
struct Conn {
    /// Connection id, unique among the router's connections: also the
    /// generation of the slab key.
    id: u64,
    /// The socket (plain or TLS) and the encoded frames not yet written.
    link: Link,
    /// Framing and protocol: bytes in, packets out.
    wire: Wire,
    session: Session,
    /// Whether `WRITABLE` is registered.
    write_interest: bool,
    /// Set once closing: the time by which the queue must be flushed.
    closing: Option<Instant>,
    /// The earliest timer entry in the heap for this connection.
    scheduled: Option<Instant>,
}

impl Conn {
    /// When the connection next needs a tick (or its linger ends).
    fn deadline(&self) -> Option<Instant> {
        match (self.session.next_deadline(), self.closing) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

/// What the loop needs besides its connections.
struct Ctx {
    upstream: Upstream,
    router: PushRouter,
    runtime: tokio::runtime::Handle,
    config: SessionConfig,
    tx: mpsc::Sender<Inbound>,
    shared: Arc<Shared>,
    /// Open connections over all loops of the gateway.
    open: Arc<AtomicUsize>,
    max_connections: usize,
    /// TLS of every connection, if any.
    tls: Option<Arc<rustls::ServerConfig>>,
    /// The client protocol of every connection.
    protocol: Protocol,
    /// Where connection ids come from.
    conn_ids: Arc<AtomicU64>,
    /// Bounded best-effort `Offline` notices (shared by all loops).
    notices: Notices,
}

impl Ctx {
    /// Runs `call` on the runtime; its outcome comes back as an
    /// [`Inbound::Reply`] (except for fire-and-forget calls).
    fn spawn_call(&self, key: usize, conn_id: u64, call: Call) {
        if matches!(call.request, NodeCall::Offline { .. }) {
            // Best effort and bounded: a mass disconnect must not become
            // one concurrent node call per closed connection.
            self.notices.send(&self.runtime, &self.upstream, call);
            return;
        }
        // Room calls are served by the router, the rest by a node.
        let router = self.router.clone();
        let tx = self.tx.clone();
        let shared = self.shared.clone();
        self.runtime.spawn(async move {
            let result = router.call(&call).await;
            // Waits for room rather than lose the outcome the session waits for.
            if tx.send(Inbound::Reply { key, conn_id, id: call.id, result }).await.is_ok() {
                shared.wake();
            }
        });
    }

    /// Carries out the router and node effects of a session that ends
    /// without a socket to write to.
    fn finish_actions(&self, key: usize, conn: &mut Conn) {
        while let Some(action) = conn.session.poll_action() {
            match action {
                Action::Call(call) => self.spawn_call(key, conn.id, call),
                Action::Unregister { conn_id, user_id, device_id } => {
                    self.router.unregister(conn_id, user_id, device_id);
                }
                Action::Send(_) | Action::Register { .. } | Action::Close { .. } => {}
            }
        }
    }
}

/// One event loop and everything it owns.
struct EventLoop {
    poll: Poll,
    /// `None` once shutting down.
    listener: Option<TcpListener>,
    slab: Slab<Conn>,
    /// Timer entries `(deadline, slab key, connection id)`; stale entries
    /// are skipped when they come up.
    timers: BinaryHeap<Reverse<(Instant, usize, u64)>>,
    scratch: Vec<u8>,
    /// Connections `(slab key, id)` that used their read budget and may
    /// have more to read.
    ready: VecDeque<(usize, u64)>,
    rx: mpsc::Receiver<Inbound>,
    ctx: Ctx,
    /// Set once shutting down: when to give up flushing.
    stopping: Option<Instant>,
}

impl EventLoop {
    fn run(mut self) {
        let mut events = Events::with_capacity(1024);
        let mut busy = false;
        loop {
            let timeout = if busy { Some(Duration::ZERO) } else { self.timeout(Instant::now()) };
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                tracing::error!(error = %e, "TCP event loop cannot poll; stopping");
                break;
            }
            let now = Instant::now();
            for event in events.iter() {
                match event.token() {
                    LISTENER => self.accept(now),
                    WAKER => {}
                    Token(key) => {
                        if event.is_readable() || event.is_read_closed() || event.is_error() {
                            self.on_readable(key, now);
                        }
                        if event.is_writable() && self.slab.contains(key) {
                            self.drive(key, now);
                        }
                    }
                }
            }
            busy = self.drain_inbound(now);
            busy |= self.read_ready(now);
            if self.stopping.is_none() && self.ctx.shared.stop.load(Ordering::Acquire) {
                self.begin_shutdown(now);
            }
            self.fire_timers(now);
            if let Some(deadline) = self.stopping
                && (self.slab.is_empty() || Instant::now() >= deadline)
            {
                break;
            }
        }
        let now = Instant::now();
        let keys: Vec<usize> = self.slab.iter().map(|(key, _)| key).collect();
        for key in keys {
            self.remove(key, now);
        }
    }

    /// The poll timeout: until the earliest timer (or the shutdown linger).
    fn timeout(&self, now: Instant) -> Option<Duration> {
        let timer = self.timers.peek().map(|Reverse((at, _, _))| *at);
        let at = match (timer, self.stopping) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        at.map(|at| at.saturating_duration_since(now))
    }

    fn accept(&mut self, now: Instant) {
        loop {
            let Some(listener) = self.listener.as_ref() else {
                return;
            };
            let (stream, peer) = match listener.accept() {
                Ok(accepted) => accepted,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    return;
                }
            };
            let open = self.ctx.open.clone();
            if open.fetch_add(1, Ordering::AcqRel) >= self.ctx.max_connections {
                open.fetch_sub(1, Ordering::AcqRel);
                tracing::debug!(%peer, max = self.ctx.max_connections, "connection limit reached; refused");
                drop(stream);
                continue;
            }
            if let Err(e) = self.insert(stream, now) {
                open.fetch_sub(1, Ordering::AcqRel);
                tracing::warn!(%peer, error = %e, "cannot register a connection");
            }
        }
    }

    fn insert(&mut self, stream: TcpStream, now: Instant) -> io::Result<()> {
        let _ = stream.set_nodelay(true);
        let mut link = Link::new(stream, self.ctx.tls.as_ref()).map_err(io::Error::other)?;
        let entry = self.slab.vacant_entry();
        let key = entry.key();
        self.poll.registry().register(link.socket(), Token(key), Interest::READABLE)?;
        let id = self.ctx.conn_ids.fetch_add(1, Ordering::Relaxed);
        let config = self.ctx.config.clone();
        let wire = Wire::new(self.ctx.protocol, &config);
        // A TLS handshake is part of the time to sign in: the session's
        // deadline runs from here.
        entry.insert(Conn {
            id,
            link,
            wire,
            session: Session::new(id, config, now),
            write_interest: false,
            closing: None,
            scheduled: None,
        });
        self.schedule(key, now);
        Ok(())
    }

    /// Reads the connections that used their budget last turn (those
    /// queued before this call, once each); returns whether any is still
    /// queued.
    fn read_ready(&mut self, now: Instant) -> bool {
        for _ in 0..self.ready.len() {
            let Some((key, id)) = self.ready.pop_front() else { break };
            if self.slab.get(key).is_some_and(|c| c.id == id) {
                self.on_readable(key, now);
            }
        }
        !self.ready.is_empty()
    }

    /// Reads until `WouldBlock` or [`READ_BUDGET`], feeding the session;
    /// ends the connection at end of stream or on a read error.
    fn on_readable(&mut self, key: usize, now: Instant) {
        let Some(id) = self.slab.get(key).map(|c| c.id) else {
            return;
        };
        let mut budget = READ_BUDGET;
        loop {
            let Some(conn) = self.slab.get_mut(key).filter(|c| c.id == id) else {
                return;
            };
            if budget == 0 {
                // More may be waiting: edge-triggered readiness will not
                // say so again, so the loop comes back for it.
                self.ready.push_back((key, id));
                return;
            }
            // Input of a closing connection is read (and decrypted) but
            // discarded.
            let discard = conn.closing.is_some() || conn.session.is_closed();
            let wire = &mut conn.wire;
            match conn.link.read(&mut self.scratch, |plain| {
                if !discard {
                    wire.push(plain);
                }
            }) {
                Ok(Read::End) => break,
                Ok(Read::Bytes(n)) => {
                    budget = budget.saturating_sub(n);
                    if discard {
                        continue;
                    }
                    conn.wire.feed(&mut conn.session, now);
                    self.drive(key, now);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::debug!(conn = id, error = %e, "read failed");
                    break;
                }
            }
        }
        // End of stream or a read error.
        if self.slab.get(key).is_some_and(|c| c.id == id) {
            self.remove(key, now);
        }
    }

    /// Carries out the session's queued actions, flushes the outbound
    /// queue, adjusts interest and timers, and ends the connection once it
    /// closed and flushed.
    fn drive(&mut self, key: usize, now: Instant) {
        let Some(conn) = self.slab.get_mut(key) else {
            return;
        };
        let ctx = &self.ctx;
        while let Some(action) = conn.session.poll_action() {
            match action {
                Action::Send(packet) => conn.wire.encode(&mut conn.session, &packet, conn.link.queue()),
                Action::Call(call) => ctx.spawn_call(key, conn.id, call),
                Action::Register { conn_id, user_id, device_id, shard_id } => {
                    let sink =
                        LoopSink { key, conn_id: conn.id, tx: ctx.tx.clone(), shared: ctx.shared.clone() };
                    ctx.router.register(conn_id, user_id, device_id, shard_id, sink);
                }
                Action::Unregister { conn_id, user_id, device_id } => {
                    ctx.router.unregister(conn_id, user_id, device_id);
                }
                Action::Close { code, reason } => {
                    tracing::debug!(conn = conn.id, code = code.as_str_name(), %reason, "closing connection");
                    conn.closing.get_or_insert(now + CLOSE_LINGER);
                }
            }
        }
        match conn.link.flush(conn.closing.is_some()) {
            Ok(n) if n > 0 => conn.session.on_written(conn.wire.written(n)),
            Ok(_) => {}
            Err(e) => {
                tracing::debug!(conn = conn.id, error = %e, "write failed");
                return self.remove(key, now);
            }
        }
        if conn.closing.is_some() && conn.link.closed_cleanly() {
            return self.remove(key, now);
        }
        let want = conn.link.wants_write();
        if want != conn.write_interest {
            let interest = if want { Interest::READABLE | Interest::WRITABLE } else { Interest::READABLE };
            if let Err(e) = self.poll.registry().reregister(conn.link.socket(), Token(key), interest) {
                tracing::warn!(conn = conn.id, error = %e, "cannot reregister a connection");
                return self.remove(key, now);
            }
            conn.write_interest = want;
        }
        self.schedule(key, now);
    }

    /// Makes sure the timer heap has an entry no later than the
    /// connection's deadline.
    fn schedule(&mut self, key: usize, now: Instant) {
        let Some(conn) = self.slab.get_mut(key) else {
            return;
        };
        let Some(at) = conn.deadline() else {
            return;
        };
        // Never in the past: a deadline a tick did not move cannot spin.
        let at = at.max(now + Duration::from_millis(1));
        if conn.scheduled.is_none_or(|s| at < s) {
            conn.scheduled = Some(at);
            self.timers.push(Reverse((at, key, conn.id)));
        }
    }

    fn fire_timers(&mut self, now: Instant) {
        while let Some(&Reverse((at, key, id))) = self.timers.peek() {
            if at > now {
                return;
            }
            self.timers.pop();
            let Some(conn) = self.slab.get_mut(key).filter(|c| c.id == id && c.scheduled == Some(at)) else {
                continue; // stale
            };
            conn.scheduled = None;
            if conn.closing.is_some_and(|linger| now >= linger) {
                tracing::debug!(conn = id, "closing connection did not flush in time");
                self.remove(key, now);
                continue;
            }
            conn.session.on_tick(now);
            self.drive(key, now);
        }
    }

    /// Handles the call outcomes and router events queued for this loop;
    /// returns whether more may be waiting.
    fn drain_inbound(&mut self, now: Instant) -> bool {
        self.ctx.shared.pending.store(false, Ordering::Release);
        let overflowed =
            std::mem::take(&mut *self.ctx.shared.overflowed.lock().unwrap_or_else(|e| e.into_inner()));
        for (key, id) in overflowed {
            if let Some(conn) = self.slab.get_mut(key).filter(|c| c.id == id) {
                let kick = KickPush {
                    code: ErrorCode::ErrorUnavailable as i32,
                    reason: "too many pushes queued; reconnect and sync".into(),
                };
                conn.session.on_kick(now, kick);
                self.drive(key, now);
            }
        }
        for _ in 0..INBOUND_QUEUE {
            let message = match self.rx.try_recv() {
                Ok(message) => message,
                Err(_) => return false,
            };
            let (key, id) = match &message {
                Inbound::Reply { key, conn_id, .. } | Inbound::Event { key, conn_id, .. } => (*key, *conn_id),
            };
            let Some(conn) = self.slab.get_mut(key).filter(|c| c.id == id) else {
                continue; // for a connection that is gone
            };
            match message {
                Inbound::Reply { id, result, .. } => conn.session.on_reply(now, id, result),
                Inbound::Event { event, .. } => match event {
                    ConnEvent::Push(push) => conn.session.on_push(now, push),
                    ConnEvent::Kick(kick) => conn.session.on_kick(now, kick),
                    ConnEvent::ResyncNeeded => conn.session.on_resync_needed(now),
                },
            }
            self.drive(key, now);
        }
        true
    }

    /// Stops accepting and kicks every session.
    fn begin_shutdown(&mut self, now: Instant) {
        tracing::info!(connections = self.slab.len(), "TCP event loop shutting down");
        self.stopping = Some(now + SHUTDOWN_LINGER);
        if let Some(mut listener) = self.listener.take() {
            let _ = self.poll.registry().deregister(&mut listener);
        }
        let keys: Vec<usize> = self.slab.iter().map(|(key, _)| key).collect();
        for key in keys {
            if let Some(conn) = self.slab.get_mut(key) {
                conn.session.on_shutdown(now);
            }
            self.drive(key, now);
        }
    }

    /// Ends a connection: closes its session if still open (router and
    /// node notices), deregisters and closes the socket.
    fn remove(&mut self, key: usize, now: Instant) {
        let Some(mut conn) = self.slab.try_remove(key) else {
            return;
        };
        if !conn.session.is_closed() {
            conn.session.on_close(now);
        }
        self.ctx.finish_actions(key, &mut conn);
        let _ = self.poll.registry().deregister(conn.link.socket());
        conn.link.shutdown();
        self.ctx.open.fetch_sub(1, Ordering::AcqRel);
        tracing::trace!(conn = conn.id, "connection ended");
    }
}
