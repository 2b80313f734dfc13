//! End-to-end support shared by the gateway's socket tests: one gateway
//! serving both transports (TCP and WebSocket) on one push router, and one
//! client type that speaks either transport, so that every scenario runs
//! through real sockets on both. A gateway started with
//! [`Gateway::start_tls`] serves both over TLS, and its clients connect
//! with TLS, trusting the test CA.
#![allow(dead_code, missing_docs)]

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures::{SinkExt as _, StreamExt as _};
use prost::Message as _;
use rim_gateway::SessionConfig;
use rim_gateway::router::{PushRouter, RouterOptions};
use rim_gateway::tcp::{TcpGateway, TcpOptions};
use rim_gateway::upstream::{Upstream, UpstreamOptions};
use rim_gateway::ws::{WsGateway, packet_from_json};
use rim_proto::ErrorCode;
use rim_proto::codec::{FrameDecoder, encode_frame};
use rim_proto::v1::auth_service_client::AuthServiceClient;
use rim_proto::v1::*;
use rim_testkit::tls::TestPki;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message as WsMessage;

use crate::cluster::{Cluster, Device, SECRET};

/// How long any single wait for the gateway may take.
pub const WAIT: Duration = Duration::from_secs(20);

/// A transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Tcp,
    Ws,
}

/// A gateway serving both transports over one push router, the way the
/// `rim gateway` command runs them: one upstream, one router, one shared
/// connection-id counter.
pub struct Gateway {
    tcp: Option<TcpGateway>,
    ws_addr: SocketAddr,
    ws_stop: Option<oneshot::Sender<()>>,
    ws_task: Option<JoinHandle<()>>,
    pub router: PushRouter,
    pub upstream: Upstream,
    /// What clients trust, when the gateway serves TLS.
    pub client_tls: Option<Arc<rustls::ClientConfig>>,
}

impl Gateway {
    /// Starts both transports over `seeds`; must run on a multi-thread
    /// tokio runtime.
    pub async fn start(seeds: Vec<String>, config: SessionConfig) -> Gateway {
        Gateway::start_named(seeds, config, "gw-e2e-test").await
    }

    /// As [`start`](Self::start), with gateway id `id` (several gateways
    /// of one cluster need distinct ids).
    pub async fn start_named(seeds: Vec<String>, config: SessionConfig, id: &str) -> Gateway {
        Gateway::start_inner(seeds, config, id, None).await
    }

    /// As [`start`](Self::start), both transports over TLS with `pki`'s
    /// certificate; [`connect`](Self::connect) and the sign-in helpers
    /// connect with TLS, trusting `pki`'s CA.
    pub async fn start_tls(seeds: Vec<String>, config: SessionConfig, pki: &TestPki) -> Gateway {
        let server = rim_cluster::tls::server_config(&pki.cert, &pki.key).unwrap();
        let mut gw = Gateway::start_inner(seeds, config, "gw-e2e-tls-test", Some(server)).await;
        gw.client_tls = Some(rim_cluster::tls::client_config(&pki.ca).unwrap());
        gw
    }

    async fn start_inner(
        seeds: Vec<String>,
        config: SessionConfig,
        id: &str,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> Gateway {
        let mut opts = UpstreamOptions::new(seeds, SECRET, id);
        opts.request_timeout = Duration::from_secs(10);
        let upstream = Upstream::new(opts).unwrap();
        let router_opts = RouterOptions { subscribe_timeout: Duration::from_secs(3), request_queue: 16 };
        let router = PushRouter::new(upstream.clone(), router_opts);
        let ids = Arc::new(AtomicU64::new(1));

        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let tcp = TcpGateway::start_with_conn_ids(
            listener,
            upstream.clone(),
            router.clone(),
            config.clone(),
            tokio::runtime::Handle::current(),
            TcpOptions { tls: tls.clone(), ..TcpOptions::default() },
            ids.clone(),
        )
        .unwrap();

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let ws_addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let shutdown = async move {
            let _ = stopped.await;
        };
        let mut ws = WsGateway::new(upstream.clone(), router.clone(), config).with_conn_ids(ids);
        if let Some(tls) = tls {
            ws = ws.with_tls(tls);
        }
        let ws_task = tokio::spawn(ws.serve(listener, shutdown));
        Gateway {
            tcp: Some(tcp),
            ws_addr,
            ws_stop: Some(stop),
            ws_task: Some(ws_task),
            router,
            upstream,
            client_tls: None,
        }
    }

    pub fn addr(&self, kind: Kind) -> SocketAddr {
        match kind {
            Kind::Tcp => self.tcp.as_ref().unwrap().local_addr(),
            Kind::Ws => self.ws_addr,
        }
    }

    /// Open TCP connections.
    pub fn tcp_connections(&self) -> usize {
        self.tcp.as_ref().unwrap().connections()
    }

    pub async fn connect(&self, kind: Kind) -> Client {
        Client::connect_with(kind, self.addr(kind), None, self.client_tls.as_ref()).await
    }

    /// Connects and signs `d` in; a sign-in failing with a retryable error
    /// (the cluster is busy) is retried on a new connection, as a client
    /// would.
    pub async fn signed_in(&self, kind: Kind, d: &Device) -> (Client, SignInOutput) {
        self.signed_in_with(kind, d, None).await
    }

    /// As [`signed_in`](Self::signed_in), with the client socket's receive
    /// buffer set to `rcvbuf` bytes (a client that will not read).
    pub async fn signed_in_with(
        &self,
        kind: Kind,
        d: &Device,
        rcvbuf: Option<u32>,
    ) -> (Client, SignInOutput) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let mut client =
                Client::connect_with(kind, self.addr(kind), rcvbuf, self.client_tls.as_ref()).await;
            let reply = client.sign_in(d).await;
            if reply.code == ErrorCode::Ok as i32 {
                return (client, SignInOutput::decode(reply.data).unwrap());
            }
            let code = ErrorCode::try_from(reply.code).unwrap();
            assert!(code.is_retryable(), "sign-in: {code:?} {}", reply.message);
            assert!(Instant::now() < deadline, "sign-in kept failing: {code:?} {}", reply.message);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Stops both transports (kicking every session) and the router.
    pub async fn shutdown(mut self) {
        let tcp = self.tcp.take().unwrap();
        tokio::task::spawn_blocking(move || tcp.shutdown()).await.unwrap();
        let _ = self.ws_stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(10), self.ws_task.take().unwrap())
            .await
            .expect("the websocket gateway stopped in time")
            .unwrap();
        self.router.shutdown().await;
    }
}

/// Another device of an already registered user.
pub async fn another_device(c: &Cluster, name: &str) -> Device {
    let addr = &c.configs.values().next().unwrap().client_listen;
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap().connect_lazy();
    let mut auth = AuthServiceClient::new(ch);
    let req = SignInRequest { username: name.into(), password: "secret-pw".into(), ..Default::default() };
    let r = auth.sign_in(req).await.unwrap().into_inner();
    Device { user: r.user_id, device: r.device_id, token: r.token }
}

/// A request packet.
pub fn packet(request_id: u64, command: i32, content: Vec<u8>) -> Packet {
    Packet { request_id, command, content: content.into(), seq: 0 }
}

/// A 1:1 text message whose content is `cmid` padded to `size` bytes.
pub fn text_to(to: u64, cmid: &str, size: usize) -> SendInput {
    let mut content = cmid.as_bytes().to_vec();
    if content.len() < size {
        content.resize(size, b'.');
    }
    SendInput {
        conversation_kind: ConversationKind::User as i32,
        conversation_id: to,
        client_msg_id: cmid.into(),
        content_type: ContentType::Text as i32,
        content: content.into(),
        ..Default::default()
    }
}

/// A `MESSAGE` push (not the reply to a client's bogus `MESSAGE` request).
pub fn is_push(p: &Packet) -> bool {
    p.command == Command::Message as i32 && p.request_id == 0
}

/// A reply (to a request, or a frame-level error reply). Pushes have
/// request id 0; a reply to a client's (bogus) `MESSAGE` request does not.
pub fn is_reply(p: &Packet) -> bool {
    p.request_id != 0 || (p.command != Command::Message as i32 && p.command != Command::Kick as i32)
}

/// The message of a `MESSAGE` push, checked against the packet's seq.
pub fn message_of(p: &Packet) -> Message {
    assert!(is_push(p), "not a push: {p:?}");
    assert_eq!(p.request_id, 0, "pushes carry request id 0");
    let push = MessagePush::decode(p.content.clone()).expect("MessagePush");
    assert!(push.persisted);
    let m = push.message.expect("a pushed message");
    assert_eq!(m.seq, p.seq, "Packet.seq is the message's seq");
    m
}

/// A client's byte stream: the TCP socket, or a TLS session over it.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Io for S {}

/// A client's connection, plain or TLS.
pub type Socket = Box<dyn Io>;

/// The client side of a TLS handshake over `stream` to the gateway at
/// `addr`, trusting what `config` trusts.
pub async fn tls_handshake(
    config: &Arc<rustls::ClientConfig>,
    addr: SocketAddr,
    stream: TcpStream,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let name = rustls::pki_types::ServerName::from(addr.ip());
    let connect = tokio_rustls::TlsConnector::from(config.clone()).connect(name, stream);
    tokio::time::timeout(Duration::from_secs(5), connect).await.expect("TLS handshake in time")
}

enum Conn {
    Tcp { stream: Socket, decoder: FrameDecoder },
    Ws(Box<WebSocketStream<Socket>>),
}

/// What a read found.
#[derive(Debug)]
pub enum Read {
    Packet(Packet),
    /// The server closed (TCP end of stream or reset; WebSocket close frame,
    /// end or error), with the WebSocket close code if one came.
    Closed(Option<u16>),
    /// Nothing before the deadline.
    Timeout,
}

/// A client of either transport. Packets read while waiting for something
/// else are kept, in order, and seen by later waits.
pub struct Client {
    pub kind: Kind,
    conn: Conn,
    unread: VecDeque<Packet>,
    next_request: u64,
    /// Set once the server closed: the WebSocket close code, if any.
    pub closed: Option<Option<u16>>,
    /// The reason text of the WebSocket close frame, if one came (the
    /// gateway puts the error code's name there).
    pub close_reason: Option<String>,
    /// The TCP stream ended inside a frame.
    pub truncated: bool,
    /// Text (JSON) messages received.
    pub texts: usize,
}

impl Client {
    /// Connects; `rcvbuf` sets the socket's receive buffer first.
    pub async fn connect(kind: Kind, addr: SocketAddr, rcvbuf: Option<u32>) -> Client {
        Client::connect_with(kind, addr, rcvbuf, None).await
    }

    /// As [`connect`](Self::connect); with `tls`, over TLS (`wss://` for
    /// WebSocket) trusting what it trusts.
    pub async fn connect_with(
        kind: Kind,
        addr: SocketAddr,
        rcvbuf: Option<u32>,
        tls: Option<&Arc<rustls::ClientConfig>>,
    ) -> Client {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        if let Some(size) = rcvbuf {
            socket.set_recv_buffer_size(size).unwrap();
        }
        let stream = tokio::time::timeout(Duration::from_secs(5), socket.connect(addr))
            .await
            .expect("connected in time")
            .unwrap();
        stream.set_nodelay(true).unwrap();
        let (stream, scheme): (Socket, _) = match tls {
            None => (Box::new(stream), "ws"),
            Some(config) => {
                (Box::new(tls_handshake(config, addr, stream).await.expect("TLS handshake")), "wss")
            }
        };
        let conn = match kind {
            Kind::Tcp => Conn::Tcp { stream, decoder: FrameDecoder::default() },
            Kind::Ws => {
                let url = format!("{scheme}://{addr}/ws");
                let handshake = tokio_tungstenite::client_async(url, stream);
                let (ws, _) = tokio::time::timeout(Duration::from_secs(5), handshake)
                    .await
                    .expect("websocket handshake in time")
                    .expect("websocket handshake");
                Conn::Ws(Box::new(ws))
            }
        };
        Client {
            kind,
            conn,
            unread: VecDeque::new(),
            next_request: 0,
            closed: None,
            close_reason: None,
            truncated: false,
            texts: 0,
        }
    }

    /// Writes raw bytes on a TCP connection.
    pub async fn write_raw(&mut self, bytes: &[u8]) {
        match &mut self.conn {
            Conn::Tcp { stream, .. } => stream.write_all(bytes).await.unwrap(),
            Conn::Ws(_) => panic!("raw bytes on a websocket"),
        }
    }

    /// Sends one WebSocket message.
    pub async fn send_ws(&mut self, message: WsMessage) {
        match &mut self.conn {
            Conn::Ws(ws) => ws.send(message).await.unwrap(),
            Conn::Tcp { .. } => panic!("a websocket message on TCP"),
        }
    }

    /// Sends a packet: a frame on TCP, a binary message on WebSocket.
    pub async fn send_packet(&mut self, p: &Packet) {
        match self.kind {
            Kind::Tcp => {
                let mut wire = BytesMut::new();
                encode_frame(p, &mut wire);
                self.write_raw(&wire).await;
            }
            Kind::Ws => self.send_ws(WsMessage::Binary(Bytes::from(p.encode_to_vec()))).await,
        }
    }

    /// Sends a request with a fresh request id; returns the id.
    pub async fn send(&mut self, command: i32, content: Vec<u8>) -> u64 {
        self.next_request += 1;
        let id = self.next_request;
        self.send_packet(&packet(id, command, content)).await;
        id
    }

    /// The next thing from the server (unread packets not included).
    pub async fn read_raw(&mut self, deadline: Instant) -> Read {
        if let Some(code) = self.closed {
            return Read::Closed(code);
        }
        let read = match &mut self.conn {
            Conn::Tcp { stream, decoder } => {
                let mut buf = [0u8; 16 * 1024];
                loop {
                    if let Some(p) = decoder.next_frame().expect("well-formed frames from the gateway") {
                        break Read::Packet(p);
                    }
                    let left = deadline.saturating_duration_since(Instant::now());
                    match tokio::time::timeout(left, stream.read(&mut buf)).await {
                        Err(_) => break Read::Timeout,
                        Ok(Ok(0)) | Ok(Err(_)) => {
                            self.truncated = decoder.buffered() > 0;
                            break Read::Closed(None);
                        }
                        Ok(Ok(n)) => decoder.push(&buf[..n]),
                    }
                }
            }
            Conn::Ws(ws) => loop {
                let left = deadline.saturating_duration_since(Instant::now());
                match tokio::time::timeout(left, ws.next()).await {
                    Err(_) => break Read::Timeout,
                    Ok(Some(Ok(WsMessage::Binary(b)))) => {
                        break Read::Packet(Packet::decode(b).expect("a Packet from the gateway"));
                    }
                    Ok(Some(Ok(WsMessage::Text(t)))) => {
                        self.texts += 1;
                        break Read::Packet(packet_from_json(t.as_str()).expect("a JSON Packet"));
                    }
                    Ok(Some(Ok(WsMessage::Close(frame)))) => {
                        self.close_reason = frame.as_ref().map(|f| f.reason.as_str().to_owned());
                        break Read::Closed(frame.map(|f| u16::from(f.code)));
                    }
                    Ok(Some(Ok(_))) => {} // ping, pong
                    Ok(None) | Ok(Some(Err(_))) => break Read::Closed(None),
                }
            },
        };
        if let Read::Closed(code) = read {
            self.closed = Some(code);
        }
        read
    }

    /// The next packet (unread ones first); `None` once the server closed.
    /// Panics at the deadline.
    pub async fn next(&mut self, deadline: Instant) -> Option<Packet> {
        if let Some(p) = self.unread.pop_front() {
            return Some(p);
        }
        match self.read_raw(deadline).await {
            Read::Packet(p) => Some(p),
            Read::Closed(_) => None,
            Read::Timeout => panic!("{:?}: nothing from the gateway in time", self.kind),
        }
    }

    /// Waits for the first packet matching `pred`, keeping the others.
    pub async fn wait(&mut self, what: &str, mut pred: impl FnMut(&Packet) -> bool) -> Packet {
        if let Some(i) = self.unread.iter().position(&mut pred) {
            return self.unread.remove(i).unwrap();
        }
        let deadline = Instant::now() + WAIT;
        loop {
            match self.read_raw(deadline).await {
                Read::Packet(p) if pred(&p) => return p,
                Read::Packet(p) => self.unread.push_back(p),
                Read::Closed(code) => {
                    panic!(
                        "{:?}: closed ({code:?}, reason {:?}) while waiting for {what}; read {:?}",
                        self.kind, self.close_reason, self.unread
                    )
                }
                Read::Timeout => panic!("{:?}: no {what} in time; read {:?}", self.kind, self.unread),
            }
        }
    }

    /// The reply to `request_id`.
    pub async fn reply(&mut self, request_id: u64) -> Reply {
        let p = self
            .wait(&format!("the reply to {request_id}"), |p| p.request_id == request_id && is_reply(p))
            .await;
        Reply::decode(p.content).unwrap()
    }

    pub async fn request(&mut self, command: Command, content: Vec<u8>) -> Reply {
        let id = self.send(command as i32, content).await;
        self.reply(id).await
    }

    /// The frame-level error reply (`request_id` 0, `COMMAND_UNSPECIFIED`).
    pub async fn frame_error(&mut self) -> Reply {
        let p = self
            .wait("a frame-level error reply", |p| {
                p.request_id == 0 && p.command == Command::Unspecified as i32
            })
            .await;
        Reply::decode(p.content).unwrap()
    }

    /// The `MESSAGE` push of `seq`.
    pub async fn push(&mut self, seq: u64) -> Message {
        let p = self.wait(&format!("the push of seq {seq}"), |p| is_push(p) && p.seq == seq).await;
        message_of(&p)
    }

    /// The `MESSAGE` push of the message with `cmid`.
    pub async fn push_of(&mut self, cmid: &str) -> Message {
        let p = self
            .wait(&format!("the push of {cmid}"), |p| is_push(p) && message_of(p).client_msg_id == cmid)
            .await;
        message_of(&p)
    }

    /// Every `MESSAGE` push up to (and including) the one of `seq`, in the
    /// order received; other packets are kept.
    pub async fn pushes_through(&mut self, seq: u64) -> Vec<Message> {
        let mut out = Vec::new();
        let mut rest = VecDeque::new();
        let mut found = false;
        while let Some(p) = self.unread.pop_front() {
            if found || !is_push(&p) {
                rest.push_back(p);
                continue;
            }
            found = p.seq == seq;
            out.push(message_of(&p));
        }
        self.unread = rest;
        let deadline = Instant::now() + WAIT;
        while !found {
            match self.read_raw(deadline).await {
                Read::Packet(p) if is_push(&p) => {
                    found = p.seq == seq;
                    out.push(message_of(&p));
                }
                Read::Packet(p) => self.unread.push_back(p),
                other => panic!(
                    "{:?}: {other:?} (close reason {:?}) while waiting for the push of seq {seq}",
                    self.kind, self.close_reason
                ),
            }
        }
        out
    }

    /// The pushes read so far and not yet taken.
    pub fn unread_pushes(&self) -> Vec<Message> {
        self.unread.iter().filter(|p| is_push(p)).map(message_of).collect()
    }

    /// Reads until the server closes (within `timeout`); returns the close
    /// code and every packet not yet taken.
    pub async fn closed_within(&mut self, timeout: Duration) -> (Option<u16>, Vec<Packet>) {
        let deadline = Instant::now() + timeout;
        let mut packets: Vec<Packet> = self.unread.drain(..).collect();
        loop {
            match self.read_raw(deadline).await {
                Read::Packet(p) => packets.push(p),
                Read::Closed(code) => return (code, packets),
                Read::Timeout => panic!("{:?}: not closed within {timeout:?}; read {packets:?}", self.kind),
            }
        }
    }

    /// Expects the server to close the connection (within [`WAIT`]), with
    /// no packet before that was not taken yet.
    pub async fn expect_closed(&mut self) -> Option<u16> {
        let (code, packets) = self.closed_within(WAIT).await;
        assert!(!self.truncated, "the stream ended inside a frame");
        assert!(packets.is_empty(), "{:?}: packets before the close: {packets:?}", self.kind);
        code
    }

    /// A heartbeat round trip: proves the connection is open and answers.
    pub async fn heartbeat(&mut self) -> Reply {
        self.request(Command::Heartbeat, Vec::new()).await
    }

    /// Sends `SIGN_IN` for `d`; returns the reply.
    pub async fn sign_in(&mut self, d: &Device) -> Reply {
        let input = SignInInput { user_id: d.user, device_id: d.device, token: d.token.clone() };
        self.request(Command::SignIn, input.encode_to_vec()).await
    }

    /// Sends a text to `to`, retrying retryable errors with the same
    /// client_msg_id until acknowledged.
    pub async fn send_text(&mut self, to: u64, cmid: &str) -> SendOutput {
        self.send_sized(to, cmid, 0).await
    }

    /// As [`send_text`](Self::send_text) with `size` bytes of content.
    pub async fn send_sized(&mut self, to: u64, cmid: &str, size: usize) -> SendOutput {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let reply = self.request(Command::Send, text_to(to, cmid, size).encode_to_vec()).await;
            if reply.code == ErrorCode::Ok as i32 {
                return SendOutput::decode(reply.data).unwrap();
            }
            let code = ErrorCode::try_from(reply.code).unwrap();
            assert!(code.is_retryable(), "send {cmid}: {code:?} {}", reply.message);
            assert!(Instant::now() < deadline, "send {cmid} never acknowledged: {}", reply.message);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// One `SYNC` request.
    pub async fn sync(&mut self, after_seq: u64, limit: u32) -> SyncOutput {
        let reply = self.request(Command::Sync, SyncInput { after_seq, limit }.encode_to_vec()).await;
        assert_eq!(reply.code, ErrorCode::Ok as i32, "sync: {}", reply.message);
        SyncOutput::decode(reply.data).unwrap()
    }

    /// Syncs the user's list after `after_seq` to its end, `limit` entries
    /// per request.
    pub async fn sync_all(&mut self, after_seq: u64, limit: u32) -> Vec<Message> {
        let mut out: Vec<Message> = Vec::new();
        let mut after = after_seq;
        loop {
            let page = self.sync(after, limit).await;
            assert!(page.messages.len() <= limit as usize, "a page above the limit");
            if let Some(m) = page.messages.last() {
                after = m.seq;
            }
            let empty = page.messages.is_empty();
            out.extend(page.messages);
            if !page.has_more || empty {
                return out;
            }
        }
    }
}

/// Asserts that `messages` have seqs `first, first + 1, ...` and returns
/// their client_msg_ids in that order.
pub fn consecutive(messages: &[Message], first: u64) -> Vec<String> {
    let seqs: Vec<u64> = messages.iter().map(|m| m.seq).collect();
    let want: Vec<u64> = (first..first + messages.len() as u64).collect();
    assert_eq!(seqs, want, "seqs in order, each once");
    messages.iter().map(|m| m.client_msg_id.clone()).collect()
}
