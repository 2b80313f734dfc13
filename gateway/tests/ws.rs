//! The WebSocket transport end to end: real WebSocket clients
//! (tokio-tungstenite) against a gateway on loopback, backed by a real
//! in-process 3-node cluster.
#![allow(missing_docs)]

use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{SinkExt as _, StreamExt as _};
use prost::Message as _;
use rim_gateway::SessionConfig;
use rim_gateway::router::{PushRouter, RouterOptions};
use rim_gateway::upstream::{Upstream, UpstreamOptions};
use rim_gateway::ws::serve_ws;
use rim_proto::ErrorCode;
use rim_proto::ids::UserId;
use rim_proto::v1::*;
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

mod cluster;
use cluster::{Cluster, Device, SECRET, free_addr, new_device, register, serial};

type Client = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A WebSocket gateway on loopback.
struct Gateway {
    addr: String,
    router: PushRouter,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl Gateway {
    async fn start(up: Upstream, config: SessionConfig) -> Gateway {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let opts = RouterOptions { subscribe_timeout: Duration::from_secs(3), request_queue: 16 };
        let router = PushRouter::new(up.clone(), opts);
        let (stop, stopped) = oneshot::channel::<()>();
        let shutdown = async move {
            let _ = stopped.await;
        };
        let task = tokio::spawn(serve_ws(listener, up, router.clone(), config, shutdown));
        Gateway { addr, router, stop: Some(stop), task }
    }

    async fn connect(&self) -> Client {
        let url = format!("ws://{}/ws", self.addr);
        let (ws, _) = tokio::time::timeout(Duration::from_secs(20), tokio_tungstenite::connect_async(url))
            .await
            .expect("connected in time")
            .expect("websocket handshake");
        ws
    }

    /// Shuts the gateway down; it must return in time.
    async fn shutdown(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(10), &mut self.task)
            .await
            .expect("gateway stopped in time")
            .unwrap();
        self.router.shutdown().await;
    }
}

fn upstream(c: &Cluster) -> Upstream {
    let mut opts = UpstreamOptions::new(c.seeds(), SECRET, "gw-ws-test");
    opts.request_timeout = Duration::from_secs(10);
    Upstream::new(opts).unwrap()
}

fn packet(request_id: u64, command: Command, content: impl prost::Message) -> Packet {
    Packet { request_id, command: command as i32, content: content.encode_to_vec().into(), seq: 0 }
}

async fn send_packet(ws: &mut Client, p: Packet) {
    ws.send(WsMessage::Binary(Bytes::from(p.encode_to_vec()))).await.unwrap();
}

/// What a client reads next (pings skipped).
#[derive(Debug)]
enum Read {
    Packet(Packet),
    Text(String),
    Closed(Option<u16>),
}

async fn read(ws: &mut Client, deadline: Instant) -> Read {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let msg = tokio::time::timeout(left, ws.next()).await.expect("a server message in time");
        match msg {
            Some(Ok(WsMessage::Binary(b))) => return Read::Packet(Packet::decode(b).unwrap()),
            Some(Ok(WsMessage::Text(t))) => return Read::Text(t.to_string()),
            Some(Ok(WsMessage::Close(frame))) => return Read::Closed(frame.map(|f| u16::from(f.code))),
            Some(Ok(_)) => {}
            None | Some(Err(_)) => return Read::Closed(None),
        }
    }
}

/// The next binary packet within `timeout`.
async fn next_packet(ws: &mut Client, timeout: Duration) -> Packet {
    match read(ws, Instant::now() + timeout).await {
        Read::Packet(p) => p,
        other => panic!("expected a packet, got {other:?}"),
    }
}

/// Waits for the reply to `request_id`, skipping pushes.
async fn reply_to(ws: &mut Client, request_id: u64) -> Reply {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match read(ws, deadline).await {
            Read::Packet(p) if p.request_id == request_id => return Reply::decode(p.content).unwrap(),
            Read::Packet(_) => {}
            other => panic!("expected the reply to {request_id}, got {other:?}"),
        }
    }
}

/// Connects and signs `d` in; a sign-in failing with a retryable error
/// (the cluster is busy) is retried on a new connection, as a client would.
async fn signed_in(gw: &Gateway, d: &Device) -> (Client, SignInOutput) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut ws = gw.connect().await;
        let input = SignInInput { user_id: d.user, device_id: d.device, token: d.token.clone() };
        send_packet(&mut ws, packet(1, Command::SignIn, input)).await;
        let reply = reply_to(&mut ws, 1).await;
        if reply.code == ErrorCode::Ok as i32 {
            return (ws, SignInOutput::decode(reply.data).unwrap());
        }
        let code = ErrorCode::try_from(reply.code).unwrap();
        assert!(code.is_retryable(), "sign-in: {code:?} {}", reply.message);
        assert!(Instant::now() < deadline, "sign-in kept failing: {code:?} {}", reply.message);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits for the MESSAGE push of `seq`.
async fn wait_message(ws: &mut Client, seq: u64) -> Message {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match read(ws, deadline).await {
            Read::Packet(p) if p.command == Command::Message as i32 && p.seq == seq => {
                let push = MessagePush::decode(p.content).unwrap();
                assert!(push.persisted);
                return push.message.unwrap();
            }
            Read::Packet(_) => {}
            other => panic!("expected the MESSAGE push of seq {seq}, got {other:?}"),
        }
    }
}

/// Reads until the server closes the connection; returns the close code and
/// the packets read before it.
async fn wait_closed(ws: &mut Client, timeout: Duration) -> (Option<u16>, Vec<Packet>) {
    let deadline = Instant::now() + timeout;
    let mut packets = Vec::new();
    loop {
        match read(ws, deadline).await {
            Read::Packet(p) => packets.push(p),
            Read::Text(t) => panic!("unexpected text message {t}"),
            Read::Closed(code) => return (code, packets),
        }
    }
}

fn text_to(to: u64, cmid: &str) -> SendInput {
    SendInput {
        conversation_kind: ConversationKind::User as i32,
        conversation_id: to,
        client_msg_id: cmid.into(),
        content_type: ContentType::Text as i32,
        content: cmid.as_bytes().to_vec().into(),
        ..Default::default()
    }
}

/// Sends over the connection, retrying retryable errors with the same
/// client_msg_id.
async fn send_text(ws: &mut Client, mut request_id: u64, to: u64, cmid: &str) -> SendOutput {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        send_packet(ws, packet(request_id, Command::Send, text_to(to, cmid))).await;
        let reply = reply_to(ws, request_id).await;
        if reply.code == ErrorCode::Ok as i32 {
            return SendOutput::decode(reply.data).unwrap();
        }
        let code = ErrorCode::try_from(reply.code).unwrap();
        assert!(code.is_retryable(), "send {cmid}: {code:?} {}", reply.message);
        assert!(Instant::now() < deadline, "send {cmid} never acknowledged");
        request_id += 1_000;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ws_message_reaches_every_device_of_the_recipient() {
    let _g = serial().await;
    let c = Cluster::start(3, 2).await;
    let alice = register(&c, "alice").await;
    let bob = register(&c, "bob").await;
    let bob2 = new_device(&c, "bob").await;
    assert_eq!(bob2.user, bob.user);
    assert_ne!(bob2.device, bob.device);
    let gw = Gateway::start(upstream(&c), SessionConfig::default()).await;

    let (mut a, out) = signed_in(&gw, &alice).await;
    assert_eq!((out.user_id, out.device_id), (alice.user, alice.device));
    assert_eq!(out.heartbeat_interval_ms, 30_000);
    let (mut b, out) = signed_in(&gw, &bob).await;
    assert_eq!(out.last_seq, 0);
    let (mut b2, _) = signed_in(&gw, &bob2).await;

    let sent = send_text(&mut a, 10, bob.user, "hello-bob").await;
    assert_ne!(sent.message_id, 0);
    for ws in [&mut b, &mut b2] {
        let m = wait_message(ws, 1).await;
        assert_eq!(m.message_id, sent.message_id);
        assert_eq!(m.client_msg_id, "hello-bob");
        assert_eq!(&m.content[..], b"hello-bob");
        assert_eq!(m.sender_user_id, alice.user);
    }

    // Shutdown kicks every connection with ERROR_UNAVAILABLE, then closes.
    let stopping = tokio::spawn(gw.shutdown());
    for ws in [&mut a, &mut b, &mut b2] {
        let (code, packets) = wait_closed(ws, Duration::from_secs(10)).await;
        let kick = packets.iter().find(|p| p.command == Command::Kick as i32).expect("a KICK before closing");
        let kick = KickPush::decode(kick.content.clone()).unwrap();
        assert_eq!(kick.code, ErrorCode::ErrorUnavailable as i32);
        assert_eq!(code, Some(1001), "going away");
    }
    stopping.await.unwrap();
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ws_second_sign_in_of_a_device_kicks_the_first() {
    let _g = serial().await;
    let c = Cluster::start(3, 2).await;
    let alice = register(&c, "alice").await;
    let bob = register(&c, "bob").await;
    let gw = Gateway::start(upstream(&c), SessionConfig::default()).await;

    let (mut a, _) = signed_in(&gw, &alice).await;
    let (mut first, _) = signed_in(&gw, &bob).await;
    let (mut second, _) = signed_in(&gw, &bob).await;

    let (code, packets) = wait_closed(&mut first, Duration::from_secs(10)).await;
    let kick = packets.iter().find(|p| p.command == Command::Kick as i32).expect("a KICK push");
    assert_eq!(kick.request_id, 0);
    assert_eq!(KickPush::decode(kick.content.clone()).unwrap().code, ErrorCode::ErrorKicked as i32);
    assert_eq!(code, Some(1008));

    // The second connection keeps working: heartbeats and pushes.
    send_packet(&mut second, packet(2, Command::Heartbeat, ())).await;
    assert_eq!(reply_to(&mut second, 2).await.code, ErrorCode::Ok as i32);
    let sent = send_text(&mut a, 10, bob.user, "after-kick").await;
    assert_eq!(wait_message(&mut second, 1).await.message_id, sent.message_id);
    let conns = gw.router.user_conns(UserId(bob.user));
    assert_eq!(conns.len(), 1, "only the second connection is routed: {conns:?}");
    gw.shutdown().await;
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ws_silent_connection_is_closed_by_the_server() {
    let _g = serial().await;
    let c = Cluster::start(3, 2).await;
    let alice = register(&c, "alice").await;
    let config = SessionConfig {
        heartbeat_interval: Duration::from_millis(200),
        max_missed_heartbeats: 3,
        ..SessionConfig::default()
    };
    let gw = Gateway::start(upstream(&c), config).await;
    let (mut ws, out) = signed_in(&gw, &alice).await;
    assert_eq!(out.heartbeat_interval_ms, 200);

    // Heartbeats keep it open well past the idle timeout (600 ms).
    let started = Instant::now();
    let mut id = 10;
    while started.elapsed() < Duration::from_millis(1500) {
        send_packet(&mut ws, packet(id, Command::Heartbeat, ())).await;
        assert_eq!(reply_to(&mut ws, id).await.code, ErrorCode::Ok as i32);
        id += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Then silence: closed after about 600 ms.
    let silent = Instant::now();
    let (code, packets) = wait_closed(&mut ws, Duration::from_secs(20)).await;
    let waited = silent.elapsed();
    assert!(waited >= Duration::from_millis(400), "closed too early: {waited:?}");
    assert!(packets.iter().all(|p| p.command == Command::Heartbeat as i32), "{packets:?}");
    assert_eq!(code, Some(1008));
    gw.shutdown().await;
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ws_text_frames_get_json_replies() {
    let _g = serial().await;
    let c = Cluster::start(3, 2).await;
    let alice = register(&c, "alice").await;
    let gw = Gateway::start(upstream(&c), SessionConfig::default()).await;
    let read_json = async |ws: &mut Client| -> serde_json::Value {
        match read(ws, Instant::now() + Duration::from_secs(20)).await {
            Read::Text(t) => serde_json::from_str(&t).unwrap(),
            other => panic!("expected a text message, got {other:?}"),
        }
    };
    let content_of = |v: &serde_json::Value| -> Vec<u8> {
        let s = v["content"].as_str().expect("content is a base64 string");
        let p = rim_gateway::ws::packet_from_json(&format!(r#"{{"content":"{s}"}}"#)).unwrap();
        p.content.to_vec()
    };

    // Sign in with a text frame whose content is a byte array (retried on
    // a new connection if the cluster is busy).
    let input = SignInInput { user_id: alice.user, device_id: alice.device, token: alice.token.clone() };
    let sign_in = serde_json::json!({"request_id": 1, "command": 1, "content": input.encode_to_vec()});
    let deadline = Instant::now() + Duration::from_secs(30);
    let (mut ws, reply) = loop {
        let mut ws = gw.connect().await;
        ws.send(WsMessage::text(sign_in.to_string())).await.unwrap();
        let v = read_json(&mut ws).await;
        assert_eq!(
            (v["request_id"].as_u64(), v["command"].as_u64(), v["seq"].as_u64()),
            (Some(1), Some(1), Some(0))
        );
        let reply = Reply::decode(&content_of(&v)[..]).unwrap();
        let code = ErrorCode::try_from(reply.code).unwrap();
        if code == ErrorCode::Ok || !code.is_retryable() || Instant::now() > deadline {
            break (ws, reply);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(reply.code, ErrorCode::Ok as i32, "{}", reply.message);
    assert_eq!(SignInOutput::decode(reply.data).unwrap().user_id, alice.user);

    // HEARTBEAT as text (command by name, camelCase, string id): a JSON reply.
    ws.send(WsMessage::text(r#"{"requestId":"7","command":"COMMAND_HEARTBEAT"}"#)).await.unwrap();
    let v = read_json(&mut ws).await;
    assert_eq!(v["request_id"], 7);
    assert_eq!(v["command"], Command::Heartbeat as i32);
    assert_eq!(v["content"], "", "an OK Reply encodes to zero bytes");

    // A binary request switches replies back to binary.
    send_packet(&mut ws, packet(8, Command::Heartbeat, ())).await;
    let p = next_packet(&mut ws, Duration::from_secs(20)).await;
    assert_eq!((p.request_id, p.command), (8, Command::Heartbeat as i32));

    // Invalid JSON: ERROR_MALFORMED_FRAME as JSON, then the connection closes.
    ws.send(WsMessage::text("{not json")).await.unwrap();
    let v = read_json(&mut ws).await;
    assert_eq!((v["request_id"].as_u64(), v["command"].as_u64()), (Some(0), Some(0)));
    assert_eq!(Reply::decode(&content_of(&v)[..]).unwrap().code, ErrorCode::ErrorMalformedFrame as i32);
    assert!(matches!(read(&mut ws, Instant::now() + Duration::from_secs(20)).await, Read::Closed(_)));
    gw.shutdown().await;
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ws_refuses_other_paths_and_bad_binary_frames() {
    let _g = serial().await;
    // No node is needed: nothing here reaches one.
    let up = Upstream::new(UpstreamOptions::new(vec![free_addr()], SECRET, "gw-ws-nodes")).unwrap();
    let config = SessionConfig { max_frame: 1024, ..SessionConfig::default() };
    let gw = Gateway::start(up, config).await;

    let refused = tokio_tungstenite::connect_async(format!("ws://{}/other", gw.addr)).await;
    match refused {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 404),
        other => panic!("expected HTTP 404, got {other:?}"),
    }

    // A command before sign-in is refused, the connection stays open.
    let mut ws = gw.connect().await;
    send_packet(&mut ws, packet(3, Command::Sync, SyncInput::default())).await;
    assert_eq!(reply_to(&mut ws, 3).await.code, ErrorCode::ErrorNotSignedIn as i32);

    // A body above the maximum frame: ERROR_FRAME_TOO_LARGE, then closed.
    ws.send(WsMessage::Binary(Bytes::from(vec![0u8; 2048]))).await.unwrap();
    let (code, packets) = wait_closed(&mut ws, Duration::from_secs(20)).await;
    assert_eq!(Reply::decode(packets[0].content.clone()).unwrap().code, ErrorCode::ErrorFrameTooLarge as i32);
    assert_eq!(code, Some(1009));

    // Garbage: ERROR_MALFORMED_FRAME, then closed.
    let mut ws = gw.connect().await;
    ws.send(WsMessage::Binary(Bytes::from_static(&[0xff, 0xff, 0xff]))).await.unwrap();
    let (_, packets) = wait_closed(&mut ws, Duration::from_secs(20)).await;
    assert_eq!(
        Reply::decode(packets[0].content.clone()).unwrap().code,
        ErrorCode::ErrorMalformedFrame as i32
    );
    gw.shutdown().await;
}
