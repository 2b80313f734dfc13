//! The WebSocket transport (tokio-tungstenite): `GET /ws`, one tokio task
//! per connection, each owning one [`Session`].
//!
//! # Messages
//!
//! * **Binary messages** carry exactly one protobuf `Packet` each, without
//!   a length prefix (`docs/protocol.md` section 5). A body above
//!   [`SessionConfig::max_frame`] gets `ERROR_FRAME_TOO_LARGE`, one that is
//!   not a `Packet` `ERROR_MALFORMED_FRAME`; both then close.
//! * **Text messages** carry the same `Packet` as a JSON object (see
//!   [JSON form](#json-form)). Invalid JSON gets `ERROR_MALFORMED_FRAME` and
//!   closes, as an invalid binary body does.
//! * The server answers in the form of the client's most recent message:
//!   replies and pushes are binary messages until the client sends a text
//!   message, then text messages until it sends a binary one again.
//! * WebSocket pings are answered with pongs (by tungstenite). Pings and
//!   pongs from the client count as activity ([`Session::on_activity`]):
//!   they reset the idle timer, as `docs/protocol.md` section 5 says, so a
//!   browser or proxy that keeps the socket alive with pings is not timed
//!   out. They are not packets: the server sends no `HEARTBEAT` reply.
//! * Other paths than [`WS_PATH`] are refused with HTTP 404 during the
//!   handshake.
//! * The upgrade URL may carry the sign-in (`/ws?token=...`, module
//!   [`url`]): it runs as the first packet, `SIGN_IN` with request id 0.
//! * With [`WsGateway::with_protocol`]`(`[`Protocol::Gim`]`)` every message
//!   (binary, or the bytes of a text message) is one gim `Packet`, translated by
//!   [`crate::gim`]; the server writes binary messages only, and bytes are
//!   counted at the size the session counted (the rim packet's).
//!
//! # TLS (`wss://`)
//!
//! With [`WsGateway::with_tls`], every accepted connection is first the
//! server side of a TLS handshake (tokio-rustls), then the WebSocket
//! handshake runs over it; everything after is the same. The TLS handshake
//! runs in the connection's task, so it counts against the connection
//! limit, and it must complete within [`SessionConfig::sign_in_timeout`]
//! (a client that connects and never finishes it is dropped, as one that
//! never signs in is). A failed handshake (an untrusted certificate on the
//! client's side, plaintext sent to the TLS port, garbage) ends that
//! connection only.
//!
//! # JSON form
//!
//! A deliberately small mapping of `Packet`, one object per text message:
//!
//! ```json
//! {"request_id": 7, "command": 2, "content": "", "seq": 0}
//! ```
//!
//! * The server always writes exactly these four fields: `request_id`,
//!   `command` and `seq` as JSON numbers, `content` (the protobuf-encoded
//!   input, `Reply` or push message, as in binary packets) as standard
//!   base64 with padding. This is also valid input for protobuf's canonical
//!   JSON parsers (they accept original field names and numeric int64 and
//!   enum values).
//! * The server reads leniently: every field is optional (default 0 or
//!   empty); `requestId` is accepted for `request_id`; integers may be JSON
//!   numbers or decimal strings; `command` may also be a name
//!   (`"COMMAND_HEARTBEAT"` or `"HEARTBEAT"`); `content` may be base64
//!   (standard or URL-safe alphabet, padding optional) or an array of byte
//!   values (`[8, 1]`); unknown fields are ignored.
//!
//! # Driving the session
//!
//! The connection task feeds its [`Session`] with decoded packets, decode
//! errors, timer ticks ([`Session::next_deadline`]), call outcomes and push
//! router events, and carries out its [`Action`]s in order:
//!
//! * `Send`: queued to the connection's writer task (bounded queue); as the
//!   writer hands each packet to the socket, [`Session::on_written`] gets
//!   its `encoded_frame_len` (counted just before the write, so that a
//!   client answering a packet never finds it still counted as queued).
//!   A client that stops reading makes the session's send-queue limit close
//!   the connection; if the writer queue itself fills, the connection is
//!   dropped at once.
//! * `Call`: [`PushRouter::call`] (room subscriptions there, node calls
//!   through [`Upstream::call`]) on a spawned task, its outcome fed back with
//!   [`Session::on_reply`] (the `Offline` call after a close is a bounded,
//!   best-effort notice: see the `notice` module).
//! * `Register` / `Unregister`: [`PushRouter::register`] with a bounded
//!   channel sink whose [`ConnEvent`]s become [`Session::on_push`],
//!   [`Session::on_kick`] and [`Session::on_resync_needed`];
//!   [`PushRouter::unregister`]. If the router drops the sink (the
//!   connection's push queue overflowed), the session is kicked with
//!   `ERROR_BUSY`: the client reconnects and syncs.
//! * `Close`: a close frame after everything queued before it, then a short
//!   linger for the client's close reply, then the end of the byte stream
//!   (`close_notify` under TLS).
//!
//! Close frames carry `1000` (normal) for `OK`, `1001` (going away) for
//! `ERROR_UNAVAILABLE`, `1009` (too big) for `ERROR_FRAME_TOO_LARGE`, and
//! `1008` (policy) otherwise; the reason is the error code's name.
//!
//! # Shutdown
//!
//! When the shutdown future resolves, the gateway stops accepting, calls
//! [`Session::on_shutdown`] on every session (a `KICK` with
//! `ERROR_UNAVAILABLE`, then close) and returns once every connection task
//! ended. The [`PushRouter`] is left running; its owner shuts it down.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::stream::{SplitSink, SplitStream};
use futures::{SinkExt as _, StreamExt as _};
use prost::Message as _;
use rim_proto::codec::{decode_unframed, encoded_frame_len};
use rim_proto::v1::{Command, Packet};
use rim_proto::{CodecError, ErrorCode};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::error::{CapacityError, Error as WsError};
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

use crate::Protocol;
use crate::call::{CallError, CallId, NodeCall, NodeReply};
use crate::error::{Error, Result};
use crate::gim::Translator;
use crate::notice::Notices;
use crate::router::{ConnEvent, PushRouter};
use crate::session::{Action, Session, SessionConfig};
use crate::upstream::Upstream;

mod url;

/// The only path at which WebSocket upgrades are accepted.
pub const WS_PATH: &str = "/ws";

/// Router events queued for one connection before the router drops it.
const PUSH_QUEUE: usize = 1024;
/// WebSocket messages queued for one connection's writer before the
/// connection is dropped (the session's byte limit usually closes it first).
const OUT_QUEUE: usize = 4096;
/// Longest time for the WebSocket handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest message a connection may send before it signed in (the
/// session's [`MAX_FRAME_BEFORE_SIGN_IN`](crate::session::MAX_FRAME_BEFORE_SIGN_IN)).
pub const MAX_MESSAGE_BEFORE_SIGN_IN: usize = crate::session::MAX_FRAME_BEFORE_SIGN_IN;
/// Default for [`WsGateway::with_max_connections`] (the same as TCP's).
pub const DEFAULT_MAX_CONNECTIONS: usize = 100_000;
/// How long a closing connection may take to write what it queued, and
/// then to receive the client's close reply.
const LINGER: Duration = Duration::from_secs(2);
/// Bytes the writer batches before flushing.
const FLUSH_BATCH: usize = 64 * 1024;

/// Connection ids handed out by gateways built with [`WsGateway::new`].
static CONN_IDS: AtomicU64 = AtomicU64::new(1);

/// WebSocket connections refused at the connection limit, process-wide.
static REFUSED: AtomicU64 = AtomicU64::new(0);

/// WebSocket connections refused because the gateway served
/// [`WsGateway::with_max_connections`] already (every gateway of the process).
pub fn refused_total() -> u64 {
    REFUSED.load(Ordering::Relaxed)
}

/// A WebSocket gateway: accepts connections at [`WS_PATH`] and runs one
/// session per connection. See the [module documentation](self).
#[derive(Debug, Clone)]
pub struct WsGateway {
    upstream: Upstream,
    router: PushRouter,
    config: SessionConfig,
    conn_ids: ConnIds,
    max_connections: usize,
    tls: Option<Arc<rustls::ServerConfig>>,
    protocol: Protocol,
}

/// Where connection ids come from.
#[derive(Debug, Clone)]
enum ConnIds {
    /// The process-wide counter of this module.
    Global,
    /// A counter shared with the caller (e.g. with another transport on the
    /// same push router).
    Shared(Arc<AtomicU64>),
}

impl ConnIds {
    fn next(&self) -> u64 {
        match self {
            ConnIds::Global => CONN_IDS.fetch_add(1, Ordering::Relaxed),
            ConnIds::Shared(c) => c.fetch_add(1, Ordering::Relaxed),
        }
    }
}

impl WsGateway {
    /// A gateway whose sessions call the nodes through `upstream`, register
    /// with `router` and use `config`. Connection ids come from a
    /// process-wide counter of this module.
    pub fn new(upstream: Upstream, router: PushRouter, config: SessionConfig) -> WsGateway {
        WsGateway {
            upstream,
            router,
            config,
            conn_ids: ConnIds::Global,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            tls: None,
            protocol: Protocol::Rim,
        }
    }

    /// Speaks `protocol` with every client (default [`Protocol::Rim`]).
    pub fn with_protocol(mut self, protocol: Protocol) -> WsGateway {
        self.protocol = protocol;
        self
    }

    /// Serves `wss://`: every connection is a TLS session with `config`
    /// (e.g. [`rim_cluster::tls::server_config`]) before its WebSocket
    /// handshake. See [TLS](self#tls-wss).
    pub fn with_tls(mut self, config: Arc<rustls::ServerConfig>) -> WsGateway {
        self.tls = Some(config);
        self
    }

    /// Serves at most `max` connections at once; beyond it a new connection
    /// is closed as soon as it is accepted, before its handshake.
    pub fn with_max_connections(mut self, max: usize) -> WsGateway {
        self.max_connections = max;
        self
    }

    /// Takes connection ids from `counter` (`fetch_add(1)`) instead. Every
    /// transport registering with the same [`PushRouter`] must draw its ids
    /// from one counter, so that they never collide.
    pub fn with_conn_ids(mut self, counter: Arc<AtomicU64>) -> WsGateway {
        self.conn_ids = ConnIds::Shared(counter);
        self
    }

    /// Accepts connections on `listener` until `shutdown` resolves, then
    /// kicks every session ([`Session::on_shutdown`]) and returns once all
    /// connection tasks ended. Must run on a tokio runtime.
    pub async fn serve(self, listener: TcpListener, shutdown: impl Future<Output = ()>) {
        let max_message = self.config.max_frame.saturating_mul(4).saturating_add(4096);
        let ws_config =
            WebSocketConfig::default().max_message_size(Some(max_message)).max_frame_size(Some(max_message));
        let shared = Arc::new(Shared {
            upstream: self.upstream,
            router: self.router,
            config: self.config,
            ws_config,
            notices: Notices::default(),
            tls: self.tls.map(tokio_rustls::TlsAcceptor::from),
            protocol: self.protocol,
        });
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut tasks = JoinSet::new();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                accepted = listener.accept() => match accepted {
                    Ok((tcp, peer)) if tasks.len() >= self.max_connections => {
                        tracing::debug!(%peer, max = self.max_connections, "websocket connection limit reached; refused");
                        REFUSED.fetch_add(1, Ordering::Relaxed);
                        drop(tcp);
                    }
                    Ok((tcp, peer)) => {
                        let _ = tcp.set_nodelay(true);
                        let conn_id = self.conn_ids.next();
                        tasks.spawn(connection(shared.clone(), tcp, peer, conn_id, stop_rx.clone()));
                    }
                    Err(e) => {
                        // Out of file descriptors and the like: back off a little.
                        tracing::warn!(error = %e, "websocket accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
                Some(done) = tasks.join_next(), if !tasks.is_empty() => log_join(done),
            }
        }
        drop(listener);
        tracing::info!(connections = tasks.len(), "websocket gateway shutting down");
        let _ = stop_tx.send(true);
        while let Some(done) = tasks.join_next().await {
            log_join(done);
        }
    }
}

/// Runs a WebSocket gateway on `listener` until `shutdown` resolves; see
/// [`WsGateway::serve`]. Connection ids come from this module's
/// process-wide counter ([`WsGateway::with_conn_ids`] to share one).
pub async fn serve_ws(
    listener: TcpListener,
    upstream: Upstream,
    router: PushRouter,
    config: SessionConfig,
    shutdown: impl Future<Output = ()>,
) {
    WsGateway::new(upstream, router, config).serve(listener, shutdown).await;
}

fn log_join(done: Result<(), tokio::task::JoinError>) {
    if let Err(e) = done
        && e.is_panic()
    {
        tracing::error!(error = %e, "websocket connection task panicked");
    }
}

/// What every connection task of a gateway shares.
struct Shared {
    upstream: Upstream,
    router: PushRouter,
    config: SessionConfig,
    ws_config: WebSocketConfig,
    notices: Notices,
    tls: Option<tokio_rustls::TlsAcceptor>,
    protocol: Protocol,
}

/// A connection's byte stream: the TCP socket, or a TLS session over it.
trait Socket: AsyncRead + AsyncWrite + Unpin + Send {}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Socket for S {}

type Ws = WebSocketStream<Box<dyn Socket>>;
/// The writing half of a WebSocket connection over `S`.
type WsSink<S> = SplitSink<WebSocketStream<S>, Message>;

/// Handshake callback: only [`WS_PATH`] is upgraded.
#[allow(clippy::result_large_err, reason = "the signature is tungstenite's `Callback`")]
fn check_path(request: &Request, response: Response) -> Result<Response, ErrorResponse> {
    if request.uri().path() == WS_PATH {
        return Ok(response);
    }
    let mut refused = ErrorResponse::new(Some(format!("no websocket endpoint here; use {WS_PATH}")));
    *refused.status_mut() = http::StatusCode::NOT_FOUND;
    Err(refused)
}

/// One connection, from the handshake to the end.
async fn connection(
    shared: Arc<Shared>,
    tcp: TcpStream,
    peer: SocketAddr,
    conn_id: u64,
    mut stop: watch::Receiver<bool>,
) {
    let socket: Box<dyn Socket> = match &shared.tls {
        None => Box::new(tcp),
        Some(acceptor) => {
            let handshake = acceptor.accept(tcp);
            let limit = shared.config.sign_in_timeout;
            let Some(tls) = bounded(handshake, limit, &mut stop, "TLS handshake", conn_id, peer).await else {
                return;
            };
            Box::new(tls)
        }
    };
    // What the upgrade URL asked for; its token is never logged.
    let options = std::sync::Mutex::new(url::UrlOptions::default());
    #[allow(clippy::result_large_err, reason = "the signature is tungstenite's `Callback`")]
    let callback = |request: &Request, response: Response| {
        let response = check_path(request, response)?;
        match url::parse(request.uri().query()) {
            Ok(o) => {
                *options.lock().unwrap_or_else(|e| e.into_inner()) = o;
                Ok(response)
            }
            Err(why) => {
                let mut refused = ErrorResponse::new(Some(why));
                *refused.status_mut() = http::StatusCode::BAD_REQUEST;
                Err(refused)
            }
        }
    };
    let handshake = tokio_tungstenite::accept_hdr_async_with_config(socket, callback, Some(shared.ws_config));
    let Some(ws) =
        bounded(handshake, HANDSHAKE_TIMEOUT, &mut stop, "websocket handshake", conn_id, peer).await
    else {
        return;
    };
    let options = options.into_inner().unwrap_or_else(|e| e.into_inner());
    tracing::debug!(conn = conn_id, %peer, "websocket connection open");
    let (sink, stream) = ws.split();
    let (out_tx, out_rx) = mpsc::channel(OUT_QUEUE);
    let written = Arc::new(AtomicUsize::new(0));
    let writer = tokio::spawn(write_loop(sink, out_rx, written.clone()));
    let reply_queue = shared.config.max_inflight_requests + shared.config.max_pending_before_sign_in + 8;
    let (reply_tx, reply_rx) = mpsc::channel(reply_queue);
    let session = Session::new(conn_id, shared.config.clone(), Instant::now());
    let gim = (shared.protocol == Protocol::Gim).then(|| Box::new(Translator::new(shared.config.max_frame)));
    let mut conn = Conn {
        json: options.json && gim.is_none(),
        gim,
        shared,
        session,
        out: Some(out_tx),
        written,
        reply_tx,
        events: None,
        ending: Ending::Open,
    };
    if let Some(input) = options.sign_in {
        let content = Bytes::from(input.encode_to_vec());
        let packet = Packet { request_id: 0, command: Command::SignIn as i32, content, seq: 0 };
        conn.session.on_packet(Instant::now(), packet);
        conn.run_actions();
    }
    let stream = conn.run(stream, reply_rx, stop).await;
    conn.finish(stream, writer).await;
    tracing::debug!(conn = conn_id, %peer, "websocket connection ended");
}

/// Runs a handshake for at most `limit`, unless the gateway stops first;
/// `None` (logged as `what` failing) if it failed, timed out or was cut.
async fn bounded<T, E: std::fmt::Display>(
    handshake: impl Future<Output = std::result::Result<T, E>>,
    limit: Duration,
    stop: &mut watch::Receiver<bool>,
    what: &str,
    conn_id: u64,
    peer: SocketAddr,
) -> Option<T> {
    tokio::select! {
        r = tokio::time::timeout(limit, handshake) => match r {
            Ok(Ok(done)) => Some(done),
            Ok(Err(e)) => {
                tracing::debug!(conn = conn_id, %peer, error = %e, "{what} failed");
                None
            }
            Err(_) => {
                tracing::debug!(conn = conn_id, %peer, "{what} timed out");
                None
            }
        },
        _ = stop.wait_for(|s| *s) => None,
    }
}

/// The outcome of one node call.
type CallOutcome = (CallId, Result<NodeReply, CallError>);

/// How a connection ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    /// Still open.
    Open,
    /// The session closed: a close frame is queued.
    Closing,
    /// The client closed (or its stream ended): flush the close reply.
    PeerClosed,
    /// The peer went away, or the connection must be dropped at once.
    Dropped,
}

/// What the writer task is asked to do.
enum Out {
    /// Write a message; the `usize` is the bytes to report as written.
    Message(Message, usize),
    /// Write a close frame, then stop.
    Close(CloseFrame),
}

/// The connection task's state around its session.
struct Conn {
    shared: Arc<Shared>,
    session: Session,
    /// Whether the client's most recent message was text (JSON).
    json: bool,
    /// gim's protocol, translated: `Some` on a gim listener.
    gim: Option<Box<Translator>>,
    /// To the writer task; `None` once dropped.
    out: Option<mpsc::Sender<Out>>,
    /// Bytes flushed by the writer, not yet reported to the session.
    written: Arc<AtomicUsize>,
    reply_tx: mpsc::Sender<CallOutcome>,
    /// Events from the push router, once registered.
    events: Option<mpsc::Receiver<ConnEvent>>,
    ending: Ending,
}

impl Conn {
    /// Drives the session until it closes; returns the read half.
    async fn run(
        &mut self,
        mut stream: SplitStream<Ws>,
        mut replies: mpsc::Receiver<CallOutcome>,
        mut stop: watch::Receiver<bool>,
    ) -> SplitStream<Ws> {
        let mut stopping = false;
        while !self.session.is_closed() {
            let deadline = self.session.next_deadline();
            let sleep_to = deadline.map_or_else(far_future, tokio::time::Instant::from_std);
            tokio::select! {
                msg = stream.next() => self.on_message(msg),
                Some((id, result)) = replies.recv() => {
                    self.sync_written();
                    self.session.on_reply(Instant::now(), id, result);
                }
                event = next_event(&mut self.events) => self.on_event(event),
                () = tokio::time::sleep_until(sleep_to), if deadline.is_some() => {
                    self.sync_written();
                    self.session.on_tick(Instant::now());
                }
                _ = stop.wait_for(|s| *s), if !stopping => {
                    stopping = true;
                    self.session.on_shutdown(Instant::now());
                }
            }
            self.run_actions();
        }
        stream
    }

    /// Reports bytes the writer flushed.
    fn sync_written(&mut self) {
        let bytes = self.written.swap(0, Ordering::AcqRel);
        if bytes > 0 {
            self.session.on_written(bytes);
        }
    }

    fn on_message(&mut self, msg: Option<Result<Message, WsError>>) {
        self.sync_written();
        let now = Instant::now();
        let max_frame = self.shared.config.max_frame;
        // Before sign-in, a message is bounded far below the frame limit:
        // nobody may make the gateway parse megabytes without a token.
        let early = self.session.identity().is_none();
        let len = match &msg {
            Some(Ok(Message::Binary(data))) => data.len(),
            Some(Ok(Message::Text(text))) => text.len(),
            _ => 0,
        };
        if early && len > MAX_MESSAGE_BEFORE_SIGN_IN {
            let e = CodecError::FrameTooLarge { len: len as u64, max: MAX_MESSAGE_BEFORE_SIGN_IN };
            self.session.on_decode_error(now, &e);
            return;
        }
        match msg {
            Some(Ok(Message::Binary(data))) if self.gim.is_some() => self.on_gim(now, data),
            Some(Ok(Message::Text(text))) if self.gim.is_some() => self.on_gim(now, Bytes::from(text)),
            Some(Ok(Message::Binary(data))) => {
                self.json = false;
                match decode_unframed(data, max_frame) {
                    Ok(packet) => self.session.on_packet(now, packet),
                    Err(e) => self.session.on_decode_error(now, &e),
                }
            }
            Some(Ok(Message::Text(text))) => {
                self.json = true;
                match packet_from_json(text.as_str()) {
                    Ok(packet) if packet.encoded_len() > max_frame => {
                        let e =
                            CodecError::FrameTooLarge { len: packet.encoded_len() as u64, max: max_frame };
                        self.session.on_decode_error(now, &e);
                    }
                    Ok(packet) => self.session.on_packet(now, packet),
                    Err(e) => {
                        self.session.on_decode_error(now, &CodecError::BadPacket(json_decode_error(&e)))
                    }
                }
            }
            // Control frames are activity too (protocol section 5); without
            // this a client keeping the socket alive with pings only was
            // closed after the idle timeout.
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => self.session.on_activity(now),
            Some(Ok(Message::Frame(_))) => {}
            Some(Err(WsError::Capacity(CapacityError::MessageTooLong { size, .. }))) => {
                let e = CodecError::FrameTooLarge { len: size as u64, max: max_frame };
                self.session.on_decode_error(now, &e);
            }
            Some(Ok(Message::Close(_))) | None => {
                self.session.on_close(now);
                self.ending = Ending::PeerClosed;
            }
            Some(Err(e)) => {
                tracing::debug!(conn = self.session.conn_id(), error = %e, "websocket read failed");
                self.session.on_close(now);
                self.ending = Ending::Dropped;
            }
        }
    }

    /// A gim listener's message: one gim `Packet`.
    fn on_gim(&mut self, now: Instant, data: Bytes) {
        let max = self.shared.config.max_frame;
        let Some(gim) = &mut self.gim else { return };
        if data.len() > max {
            let e = CodecError::FrameTooLarge { len: data.len() as u64, max };
            return self.session.on_decode_error(now, &e);
        }
        gim.on_frame(&mut self.session, now, data);
    }

    fn on_event(&mut self, event: Option<ConnEvent>) {
        self.sync_written();
        let now = Instant::now();
        match event {
            Some(ConnEvent::Push(push)) => self.session.on_push(now, push),
            Some(ConnEvent::Kick(kick)) => self.session.on_kick(now, kick),
            Some(ConnEvent::ResyncNeeded) => self.session.on_resync_needed(now),
            None => {
                // The router dropped this connection: its push queue
                // overflowed (or the router stopped). Pushes were lost.
                self.events = None;
                let kick = rim_proto::v1::KickPush {
                    code: ErrorCode::ErrorBusy as i32,
                    reason: "too many pushes queued for this connection; reconnect and sync".into(),
                };
                self.session.on_kick(now, kick);
            }
        }
    }

    /// Carries out the session's actions, in order.
    fn run_actions(&mut self) {
        while let Some(action) = self.session.poll_action() {
            match action {
                Action::Send(packet) => self.send(packet),
                Action::Call(call) if matches!(call.request, NodeCall::Offline { .. }) => {
                    // Best effort and bounded (see the notice module).
                    self.shared.notices.send(&tokio::runtime::Handle::current(), &self.shared.upstream, call);
                }
                Action::Call(call) => {
                    // Room calls are served by the router, the rest by a node.
                    let router = self.shared.router.clone();
                    let replies = self.reply_tx.clone();
                    tokio::spawn(async move {
                        let result = router.call(&call).await;
                        let _ = replies.send((call.id, result)).await;
                    });
                }
                Action::Register { conn_id, user_id, device_id, shard_id } => {
                    let (tx, rx) = mpsc::channel(PUSH_QUEUE);
                    self.events = Some(rx);
                    self.shared.router.register(conn_id, user_id, device_id, shard_id, tx);
                }
                Action::Unregister { conn_id, user_id, device_id } => {
                    self.shared.router.unregister(conn_id, user_id, device_id);
                }
                Action::Close { code, reason } => {
                    tracing::debug!(
                        conn = self.session.conn_id(),
                        code = code.as_str_name(),
                        %reason,
                        "closing websocket"
                    );
                    if self.ending == Ending::Open {
                        self.ending = Ending::Closing;
                        self.queue(Out::Close(close_frame(code)));
                    }
                }
            }
        }
    }

    fn send(&mut self, packet: Packet) {
        if self.ending == Ending::Dropped {
            return;
        }
        let len = encoded_frame_len(&packet);
        if let Some(gim) = &mut self.gim {
            match gim.outbound(&packet) {
                Some(body) => self.queue(Out::Message(Message::Binary(body), len)),
                None => self.session.on_written(len),
            }
            return;
        }
        let message = if self.json {
            Message::Text(Utf8Bytes::from(packet_to_json(&packet)))
        } else {
            Message::Binary(Bytes::from(packet.encode_to_vec()))
        };
        self.queue(Out::Message(message, len));
    }

    /// Hands `out` to the writer; drops the connection if its queue is full.
    fn queue(&mut self, out: Out) {
        let Some(tx) = &self.out else {
            return;
        };
        if let Err(e) = tx.try_send(out) {
            let why = match e {
                mpsc::error::TrySendError::Full(_) => "writer queue full",
                mpsc::error::TrySendError::Closed(_) => "write failed",
            };
            tracing::debug!(conn = self.session.conn_id(), why, "dropping the websocket connection");
            self.out = None;
            self.ending = Ending::Dropped;
            self.session.on_close(Instant::now());
        }
    }

    /// After the session closed: lets the writer finish (close frame
    /// included) and waits briefly for the client's close reply.
    async fn finish(
        mut self,
        mut stream: SplitStream<Ws>,
        mut writer: JoinHandle<Option<WsSink<Box<dyn Socket>>>>,
    ) {
        // Late actions (none are expected after the close) are still honoured.
        self.run_actions();
        self.events = None;
        let ending = if self.out.is_none() { Ending::Dropped } else { self.ending };
        // Dropping the queue's sender lets the writer finish: after a close
        // frame, or by closing the sink (which flushes a close reply).
        self.out = None;
        if ending == Ending::Dropped {
            writer.abort();
            return;
        }
        let sink = match tokio::time::timeout(LINGER, &mut writer).await {
            Ok(Ok(sink)) => sink,
            Ok(Err(_)) => return,
            Err(_) => {
                writer.abort();
                return;
            }
        };
        if ending == Ending::Closing {
            let drain = async {
                while let Some(Ok(msg)) = stream.next().await {
                    if msg.is_close() {
                        break;
                    }
                }
            };
            let _ = tokio::time::timeout(LINGER, drain).await;
        }
        // Last, the end of the byte stream itself: under TLS a close_notify,
        // so that the client can tell a complete stream from a cut one (in
        // plaintext a FIN, as dropping the socket would send).
        if let Some(sink) = sink
            && let Ok(mut ws) = stream.reunite(sink)
        {
            let _ = tokio::time::timeout(LINGER, ws.get_mut().shutdown()).await;
        }
    }
}

/// The next router event, or never if not registered.
async fn next_event(events: &mut Option<mpsc::Receiver<ConnEvent>>) -> Option<ConnEvent> {
    match events {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

fn far_future() -> tokio::time::Instant {
    tokio::time::Instant::now() + Duration::from_secs(86_400)
}

/// Writes what the connection queues, flushing in batches, and counts the
/// bytes handed to the socket in `written`.
///
/// Invariant: a message is counted in `written` *before* any of its bytes
/// are written (fed to the sink, which may write at once, or flushed), so
/// that by the time the client can have read a message, and so send a
/// request in answer to it, the session will see it as written
/// ([`Conn::sync_written`] runs before every client message is handled).
/// Counting after the flush, as this did, left a window (the writer task
/// descheduled between the socket write and the count) in which a client
/// syncing page by page got its next page refused as over the send-queue
/// limit, the previous page, already read, being still counted: a
/// reconnected device was closed as a slow consumer while reading
/// promptly. The price is that the batch being written (at most
/// [`FLUSH_BATCH`] plus one message) is not counted while a slow client
/// keeps it from leaving; everything queued behind it is, so a client that
/// stops reading still hits the limit.
///
/// Returns the sink once everything was written (the close frame, or the
/// close reply when the queue's sender went away), `None` if a write
/// failed.
async fn write_loop<S>(
    mut sink: WsSink<S>,
    mut rx: mpsc::Receiver<Out>,
    written: Arc<AtomicUsize>,
) -> Option<WsSink<S>>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    while let Some(first) = rx.recv().await {
        let mut batch = 0usize;
        let mut next = Some(first);
        while let Some(out) = next.take() {
            match out {
                Out::Message(message, len) => {
                    // Before the bytes can reach the client: see above.
                    written.fetch_add(len, Ordering::AcqRel);
                    sink.feed(message).await.ok()?;
                    batch += len;
                }
                Out::Close(frame) => {
                    sink.feed(Message::Close(Some(frame))).await.ok()?;
                    sink.flush().await.ok()?;
                    return Some(sink);
                }
            }
            if batch < FLUSH_BATCH {
                next = rx.try_recv().ok();
            }
        }
        sink.flush().await.ok()?;
    }
    sink.close().await.ok()?;
    Some(sink)
}

/// The close frame ending a session closed with `code`.
fn close_frame(code: ErrorCode) -> CloseFrame {
    let ws_code = match code {
        ErrorCode::Ok => CloseCode::Normal,
        ErrorCode::ErrorUnavailable => CloseCode::Away,
        ErrorCode::ErrorFrameTooLarge => CloseCode::Size,
        _ => CloseCode::Policy,
    };
    CloseFrame { code: ws_code, reason: Utf8Bytes::from_static(code.as_str_name()) }
}

// ------------------------------------------------------------------ JSON

/// `error` (of [`packet_from_json`]) as the decode error of a
/// [`CodecError::BadPacket`].
fn json_decode_error(error: &Error) -> prost::DecodeError {
    // prost offers no other way to build a DecodeError with a message.
    #[allow(deprecated)]
    prost::DecodeError::new(error.to_string())
}

/// `packet` in the [JSON form](self#json-form) the server writes:
/// `{"request_id":…,"command":…,"content":"<base64>","seq":…}`.
pub fn packet_to_json(packet: &Packet) -> String {
    serde_json::json!({
        "request_id": packet.request_id,
        "command": packet.command,
        "content": base64_encode(&packet.content),
        "seq": packet.seq,
    })
    .to_string()
}

/// Reads a `Packet` from its [JSON form](self#json-form) (leniently, as
/// documented there).
pub fn packet_from_json(text: &str) -> Result<Packet> {
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| Error::BadPacket(format!("not JSON: {e}")))?;
    let serde_json::Value::Object(obj) = value else {
        return Err(Error::BadPacket("not a JSON object".into()));
    };
    let field = |names: &[&str]| names.iter().find_map(|n| obj.get(*n)).filter(|v| !v.is_null());
    let request_id = field(&["request_id", "requestId"]).map(|v| json_u64(v, "request_id")).transpose()?;
    let seq = field(&["seq"]).map(|v| json_u64(v, "seq")).transpose()?;
    let command = field(&["command"]).map(json_command).transpose()?;
    let content = match field(&["content"]) {
        None => Bytes::new(),
        Some(serde_json::Value::String(s)) => Bytes::from(
            base64_decode(s).ok_or_else(|| Error::BadPacket("content is not valid base64".into()))?,
        ),
        Some(serde_json::Value::Array(items)) => {
            let bytes: Option<Vec<u8>> =
                items.iter().map(|v| v.as_u64().and_then(|b| u8::try_from(b).ok())).collect();
            Bytes::from(bytes.ok_or_else(|| Error::BadPacket("content array holds a non-byte".into()))?)
        }
        Some(_) => return Err(Error::BadPacket("content must be a base64 string or a byte array".into())),
    };
    Ok(Packet {
        request_id: request_id.unwrap_or(0),
        command: command.unwrap_or(0),
        content,
        seq: seq.unwrap_or(0),
    })
}

fn json_u64(value: &serde_json::Value, name: &str) -> Result<u64> {
    let parsed = match value {
        serde_json::Value::Number(n) => n.as_u64(),
        serde_json::Value::String(s) => s.parse().ok(),
        _ => None,
    };
    parsed.ok_or_else(|| Error::BadPacket(format!("{name} must be an unsigned integer")))
}

fn json_command(value: &serde_json::Value) -> Result<i32> {
    let parsed = match value {
        serde_json::Value::Number(n) => n.as_i64().and_then(|c| i32::try_from(c).ok()),
        serde_json::Value::String(s) => s
            .parse::<i32>()
            .ok()
            .or_else(|| Command::from_str_name(s).map(|c| c as i32))
            .or_else(|| Command::from_str_name(&format!("COMMAND_{s}")).map(|c| c as i32)),
        _ => None,
    };
    parsed.ok_or_else(|| Error::BadPacket("command must be a number or a command name".into()))
}

const BASE64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 with padding.
fn base64_encode(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [chunk[0], chunk.get(1).copied().unwrap_or(0), chunk.get(2).copied().unwrap_or(0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(BASE64[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Base64 in the standard or URL-safe alphabet, padding optional.
fn base64_decode(text: &str) -> Option<Vec<u8>> {
    let text = text.trim_end_matches('=');
    if text.len() % 4 == 1 {
        return None;
    }
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let mut acc = 0u32;
    let mut bits = 0u32;
    for c in text.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' | b'-' => 62,
            b'/' | b'_' => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trips() {
        for len in 0..40 {
            let data: Vec<u8> = (0..len).map(|i| (i * 37 + 11) as u8).collect();
            let text = base64_encode(&data);
            assert_eq!(text.len() % 4, 0);
            assert_eq!(base64_decode(&text).unwrap(), data);
            assert_eq!(base64_decode(text.trim_end_matches('=')).unwrap(), data);
        }
        assert_eq!(base64_encode(b"foobar"), "Zm9vYmFy");
        assert_eq!(base64_encode(b"fo"), "Zm8=");
        assert_eq!(base64_decode("-_8").unwrap(), [0xfb, 0xff]);
        assert!(base64_decode("a").is_none());
        assert!(base64_decode("a*bc").is_none());
    }

    #[test]
    fn json_packets_round_trip_and_read_leniently() {
        let p = Packet { request_id: 9, command: 7, content: Bytes::from_static(&[8, 1, 0xff]), seq: 3 };
        let text = packet_to_json(&p);
        assert_eq!(packet_from_json(&text).unwrap(), p);
        let loose = r#"{"requestId":"9","command":"SEND","content":[8,1,255],"seq":"3","extra":1}"#;
        assert_eq!(packet_from_json(loose).unwrap(), p);
        let named = r#"{"request_id":9,"command":"COMMAND_SEND","content":"CAH_","seq":3}"#;
        assert_eq!(packet_from_json(named).unwrap(), p);
        assert_eq!(packet_from_json("{}").unwrap(), Packet::default());
        assert!(packet_from_json("[1]").is_err());
        assert!(packet_from_json(r#"{"command":"NOPE"}"#).is_err());
        assert!(packet_from_json(r#"{"content":[256]}"#).is_err());
        assert!(packet_from_json(r#"{"request_id":-1}"#).is_err());
    }

    /// A server socket that notes, at each write, how many bytes the
    /// writer had counted as written by then.
    struct Watched {
        inner: tokio::io::DuplexStream,
        written: Arc<AtomicUsize>,
        credited_at_writes: Arc<std::sync::Mutex<Vec<usize>>>,
    }

    impl tokio::io::AsyncRead for Watched {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
        }
    }

    impl tokio::io::AsyncWrite for Watched {
        fn poll_write(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> std::task::Poll<std::io::Result<usize>> {
            let credited = self.written.load(Ordering::Acquire);
            let r = std::pin::Pin::new(&mut self.inner).poll_write(cx, buf);
            if matches!(r, std::task::Poll::Ready(Ok(n)) if n > 0) {
                self.credited_at_writes.lock().unwrap().push(credited);
            }
            r
        }

        fn poll_flush(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::pin::Pin::new(&mut self.inner).poll_flush(cx)
        }

        fn poll_shutdown(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
        }
    }

    /// The race behind a flaky slow-reader test: a client syncing page by
    /// page answers each page as soon as it has read it, and the session
    /// must by then count that page as written, or two pages (each under
    /// the send-queue limit, together over it) close the connection as a
    /// slow one. So every byte of a message leaves with the message already
    /// counted.
    #[tokio::test]
    async fn messages_are_counted_written_before_their_bytes_leave() {
        use tokio_tungstenite::tungstenite::protocol::Role;
        let (server, client) = tokio::io::duplex(4096);
        let written = Arc::new(AtomicUsize::new(0));
        let credited_at_writes = Arc::new(std::sync::Mutex::new(Vec::new()));
        let watched = Watched {
            inner: server,
            written: written.clone(),
            credited_at_writes: credited_at_writes.clone(),
        };
        let (sink, _stream) = WebSocketStream::from_raw_socket(watched, Role::Server, None).await.split();
        let (tx, rx) = mpsc::channel(8);
        let writer = tokio::spawn(write_loop(sink, rx, written.clone()));
        let mut client = WebSocketStream::from_raw_socket(client, Role::Client, None).await;

        let mut total = 0;
        for (i, size) in [100_000usize, 10, 70_000].into_iter().enumerate() {
            let packet =
                Packet { request_id: i as u64 + 1, content: vec![7u8; size].into(), ..Default::default() };
            let len = encoded_frame_len(&packet);
            tx.send(Out::Message(Message::Binary(packet.encode_to_vec().into()), len)).await.unwrap();
            let got = client.next().await.unwrap().unwrap();
            assert_eq!(Packet::decode(got.into_data()).unwrap(), packet);
            total += len;
            // The client has the message: it is counted, and was before
            // any of its bytes were written.
            assert_eq!(written.load(Ordering::Acquire), total);
            let writes = std::mem::take(&mut *credited_at_writes.lock().unwrap());
            assert!(!writes.is_empty());
            assert!(
                writes.iter().all(|&c| c == total),
                "message {i}: counted {writes:?} at its writes, want {total} at each"
            );
        }
        drop(tx);
        writer.await.unwrap();
    }

    #[test]
    fn only_the_ws_path_is_upgraded() {
        let req = |uri: &str| Request::builder().uri(uri).body(()).unwrap();
        assert!(check_path(&req("/ws"), Response::default()).is_ok());
        assert!(check_path(&req("/ws?x=1"), Response::default()).is_ok());
        let refused = check_path(&req("/other"), Response::default()).unwrap_err();
        assert_eq!(refused.status(), http::StatusCode::NOT_FOUND);
    }
}
