//! gim clients, unchanged (issue 15 §4): a gateway whose listeners speak
//! gim's `connect` protocol (`tcp_protocol` / `ws_protocol` = gim), against
//! an in-process cluster, on both transports. The client here is written
//! from gim's own definitions (the `gim_proto` module below), not from
//! rim's: it signs in with a rim-issued token, gets its string request ids
//! echoed, heartbeats (echoed byte for byte), receives a rim user's 1:1
//! messages and a room's messages as gim `Message`s, and is refused the way
//! gim refuses (code 10000 before sign-in, a non-zero code for a bad token)
//! within rim's bounds (packets before sign-in, request id length,
//! malformed frames).
#![allow(missing_docs)]

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::{Buf as _, Bytes, BytesMut};
use futures::{SinkExt as _, StreamExt as _};
use prost::Message as _;
use rim_gateway::tcp::TcpOptions;
use rim_gateway::{Gateway, GatewayConfig, Protocol, SessionConfig};
use rim_proto::ErrorCode;
use rim_proto::ids::GroupId;
use rim_proto::store;
use rim_proto::v1::{Command, ContentType, ConversationKind, SendInput, SendOutput};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message as WsMessage;

mod cluster;
mod wire;
use cluster::{Cluster, Device, SECRET, register, serial};

/// gim's long-connection messages, transcribed from gim's
/// `pkg/protocol/proto/connect/connect.ext.proto` and
/// `pkg/protocol/proto/logic/message.ext.proto` as
/// `../shared/reference/gim.md` sections 2.1 and 2.4 give them (field
/// numbers and types are gim's). Deliberately not the gateway's own
/// `rim_gateway::gim::proto`.
mod gim_proto {
    /// `PacketCommand`.
    pub const PC_UNKNOWN: i32 = 0;
    pub const PC_SIGN_IN: i32 = 1;
    pub const PC_HEARTBEAT: i32 = 2;
    pub const PC_SUBSCRIBE_ROOM: i32 = 3;
    pub const PC_MESSAGE: i32 = 4;
    /// `MessageCommand`.
    pub const MC_USER_MESSAGE: i32 = 1;
    pub const MC_GROUP_MESSAGE: i32 = 2;

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Packet {
        #[prost(string, tag = "1")]
        pub request_id: String,
        #[prost(int32, tag = "2")]
        pub command: i32,
        #[prost(bytes = "vec", tag = "3")]
        pub content: Vec<u8>,
        #[prost(uint64, tag = "4")]
        pub seq: u64,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Message {
        #[prost(int32, tag = "2")]
        pub command: i32,
        #[prost(bytes = "vec", tag = "3")]
        pub content: Vec<u8>,
        #[prost(uint64, tag = "4")]
        pub seq: u64,
        #[prost(int64, tag = "5")]
        pub created_at: i64,
        #[prost(uint64, tag = "6")]
        pub room_id: u64,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct SignInRequest {
        #[prost(uint64, tag = "1")]
        pub user_id: u64,
        #[prost(uint64, tag = "2")]
        pub device_id: u64,
        #[prost(string, tag = "3")]
        pub token: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct SubscribeRoomRequest {
        #[prost(uint64, tag = "1")]
        pub room_id: u64,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Reply {
        #[prost(int32, tag = "1")]
        pub code: i32,
        #[prost(string, tag = "2")]
        pub message: String,
        #[prost(bytes = "vec", tag = "3")]
        pub data: Vec<u8>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct User {
        #[prost(uint64, tag = "1")]
        pub user_id: u64,
        #[prost(uint64, tag = "2")]
        pub device_id: u64,
        #[prost(string, tag = "3")]
        pub nickname: String,
        #[prost(string, tag = "4")]
        pub avatar_url: String,
        #[prost(string, tag = "5")]
        pub extra: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct UserMessagePush {
        #[prost(message, optional, tag = "1")]
        pub from_user: Option<User>,
        #[prost(uint64, tag = "2")]
        pub to_user_id: u64,
        #[prost(bytes = "vec", tag = "3")]
        pub content: Vec<u8>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct GroupMessagePush {
        #[prost(message, optional, tag = "1")]
        pub from_user: Option<User>,
        #[prost(uint64, tag = "2")]
        pub group_id: u64,
        #[prost(bytes = "vec", tag = "3")]
        pub content: Vec<u8>,
    }
}

use gim_proto::*;

const WAIT: Duration = Duration::from_secs(20);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transport {
    Tcp,
    Ws,
}

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>;

/// A gim client: gim's framing (TCP: uvarint length + Packet, as Go's
/// `binary.PutUvarint`; WebSocket: one Packet per binary message at /ws).
enum GimClient {
    Tcp { stream: TcpStream, buf: BytesMut },
    Ws(Box<Ws>),
}

impl GimClient {
    async fn connect(gw: &Gateway, transport: Transport) -> GimClient {
        match transport {
            Transport::Tcp => {
                let stream = TcpStream::connect(gw.tcp_addr().unwrap()).await.unwrap();
                GimClient::Tcp { stream, buf: BytesMut::new() }
            }
            Transport::Ws => {
                let url = format!("ws://{}/ws", gw.ws_addr().unwrap());
                let (ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
                GimClient::Ws(Box::new(ws))
            }
        }
    }

    /// Sends one packet's bytes.
    async fn send_raw(&mut self, body: Vec<u8>) {
        match self {
            GimClient::Tcp { stream, .. } => {
                let mut frame = Vec::new();
                let mut len = body.len() as u64;
                while len >= 0x80 {
                    frame.push((len as u8) | 0x80);
                    len >>= 7;
                }
                frame.push(len as u8);
                frame.extend_from_slice(&body);
                stream.write_all(&frame).await.unwrap();
            }
            GimClient::Ws(ws) => ws.send(WsMessage::Binary(body.into())).await.unwrap(),
        }
    }

    async fn send(&mut self, request_id: &str, command: i32, content: Vec<u8>) {
        let p = Packet { request_id: request_id.into(), command, content, seq: 0 };
        self.send_raw(p.encode_to_vec()).await;
    }

    /// The next packet's bytes; `None` once the server closed.
    async fn next_raw(&mut self) -> Option<Bytes> {
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self {
                GimClient::Tcp { stream, buf } => {
                    if let Some(body) = take_frame(buf) {
                        return Some(body);
                    }
                    let mut chunk = [0u8; 4096];
                    match tokio::time::timeout(left, stream.read(&mut chunk)).await {
                        Err(_) => panic!("nothing from the gateway in time"),
                        Ok(Ok(0) | Err(_)) => {
                            assert!(buf.is_empty(), "the stream ended inside a frame");
                            return None;
                        }
                        Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                GimClient::Ws(ws) => match tokio::time::timeout(left, ws.next()).await {
                    Err(_) => panic!("nothing from the gateway in time"),
                    Ok(None | Some(Err(_)) | Some(Ok(WsMessage::Close(_)))) => return None,
                    Ok(Some(Ok(WsMessage::Binary(data)))) => return Some(data),
                    Ok(Some(Ok(other))) => assert!(!other.is_text(), "gim gets binary messages only"),
                },
            }
        }
    }

    async fn next(&mut self) -> Option<Packet> {
        self.next_raw().await.map(|b| Packet::decode(b).expect("a gim Packet"))
    }

    /// The next packet, which must be the reply to `request_id`.
    async fn reply(&mut self, request_id: &str, command: i32) -> Reply {
        let p = self.next().await.expect("a reply, not the end");
        assert_eq!((p.request_id.as_str(), p.command), (request_id, command), "{p:?}");
        Reply::decode(&p.content[..]).unwrap()
    }

    async fn request(&mut self, request_id: &str, command: i32, content: Vec<u8>) -> Reply {
        self.send(request_id, command, content).await;
        self.reply(request_id, command).await
    }

    async fn sign_in(&mut self, d: &Device) -> Reply {
        let input = SignInRequest { user_id: d.user, device_id: d.device, token: d.token.clone() };
        self.request("登录-1", PC_SIGN_IN, input.encode_to_vec()).await
    }

    /// The next `PC_MESSAGE` push (nothing else may come first).
    async fn push(&mut self) -> Message {
        let p = self.next().await.expect("a push, not the end");
        assert_eq!((p.request_id.as_str(), p.command, p.seq), ("", PC_MESSAGE, 0), "{p:?}");
        Message::decode(&p.content[..]).unwrap()
    }

    /// Expects the server to close, after at most `before` more packets.
    async fn closed(&mut self, before: usize) -> Vec<Packet> {
        let mut got = Vec::new();
        while let Some(p) = self.next().await {
            got.push(p);
            assert!(got.len() <= before, "still open after {got:?}");
        }
        got
    }
}

/// Takes one uvarint-framed body off the front of `buf`.
fn take_frame(buf: &mut BytesMut) -> Option<Bytes> {
    let (mut len, mut shift, mut prefix) = (0u64, 0, 0);
    loop {
        let byte = *buf.get(prefix)?;
        len |= u64::from(byte & 0x7f) << shift;
        prefix += 1;
        shift += 7;
        if byte & 0x80 == 0 {
            break;
        }
    }
    if buf.len() < prefix + len as usize {
        return None;
    }
    buf.advance(prefix);
    Some(buf.split_to(len as usize).freeze())
}

/// A gateway whose TCP and WebSocket listeners both speak gim.
async fn gim_gateway(c: &Cluster, session: SessionConfig) -> Gateway {
    let config = GatewayConfig {
        session,
        tcp_listen: Some("127.0.0.1:0".into()),
        ws_listen: Some("127.0.0.1:0".into()),
        tcp_protocol: Protocol::Gim,
        ws_protocol: Protocol::Gim,
        seeds: c.seeds(),
        cluster_secret: SECRET.into(),
        gateway_id: "gim".into(),
        request_timeout: Duration::from_secs(10),
        tcp: TcpOptions { event_loop_threads: 1, ..TcpOptions::default() },
        ..GatewayConfig::default()
    };
    let gw = Gateway::start(config).await.unwrap();
    gw.wait_ready(WAIT).await.unwrap();
    gw
}

async fn create_room(c: &Cluster, room: u64) {
    let node = c.nodes.values().next().unwrap();
    let shard = node.core.placement().unwrap().shard_of_group(GroupId(room));
    let create = store::CreateGroup {
        group_id: room,
        kind: store::GroupKind::Room as i32,
        name: format!("room{room}"),
        ..Default::default()
    };
    let op = store::Op { op: Some(store::op::Op::CreateGroup(create)) };
    node.core.propose(shard, op).await.expect("room created");
}

/// A rim client's `SEND_GROUP` of `text` to `room`, retried while retryable.
async fn send_room(rim: &mut wire::Client, room: u64, text: &str) -> SendOutput {
    let input = SendInput {
        conversation_kind: ConversationKind::Room as i32,
        conversation_id: room,
        client_msg_id: text.into(),
        content_type: ContentType::Text as i32,
        content: text.as_bytes().to_vec().into(),
        ..Default::default()
    };
    let deadline = Instant::now() + WAIT;
    loop {
        let reply = rim.request(Command::SendGroup, input.encode_to_vec()).await;
        if reply.code == ErrorCode::Ok as i32 {
            return SendOutput::decode(reply.data).unwrap();
        }
        let code = ErrorCode::try_from(reply.code).unwrap();
        assert!(code.is_retryable() && Instant::now() < deadline, "room send: {code:?} {}", reply.message);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn now_secs() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
}

/// The whole gim flow on one transport: `alice` speaks gim, `bob` is a
/// rim client (rim's own protocol, on the cluster's ordinary gateway).
async fn gim_client_flow(c: &Cluster, gw: &Gateway, rim_gw: &Gateway, transport: Transport, n: u64) {
    let alice = register(c, &format!("gim-alice-{n}")).await;
    let bob = register(c, &format!("gim-bob-{n}")).await;
    let mut rim = wire::Client::connect(rim_gw.tcp_addr().unwrap()).await;
    rim.sign_in(&bob).await;

    let mut a = GimClient::connect(gw, transport).await;
    // Before sign-in: gim's 10000, and the connection stays open.
    let early = a.request("early", PC_HEARTBEAT, Vec::new()).await;
    assert_eq!(early.code, 10000, "{early:?}");
    let early =
        a.request("early-sub", PC_SUBSCRIBE_ROOM, SubscribeRoomRequest { room_id: 1 }.encode_to_vec()).await;
    assert_eq!(early.code, 10000, "{early:?}");

    // Sign-in with rim's ids and token; the string request id comes back.
    let signed = a.sign_in(&alice).await;
    assert_eq!((signed.code, signed.message.as_str()), (0, ""), "{transport:?}");

    // A heartbeat is echoed unchanged, byte for byte.
    let hb = Packet { request_id: "hb-❤".into(), command: PC_HEARTBEAT, content: Vec::new(), seq: 0 }
        .encode_to_vec();
    a.send_raw(hb.clone()).await;
    assert_eq!(a.next_raw().await.as_deref(), Some(&hb[..]), "{transport:?}");

    // Bob's 1:1 messages arrive as gim's MC_USER_MESSAGE with Alice's list seqs.
    let before = now_secs();
    let mut seqs = Vec::new();
    for text in ["hello from rim", "second"] {
        rim.send_text(alice.user, text).await;
        let m = a.push().await;
        assert_eq!(m.command, MC_USER_MESSAGE, "{m:?}");
        assert!(m.created_at >= before - 1 && m.created_at <= now_secs() + 1, "seconds: {}", m.created_at);
        assert_eq!(m.room_id, 0);
        let u = UserMessagePush::decode(&m.content[..]).unwrap();
        let from = u.from_user.unwrap();
        assert_eq!((from.user_id, from.device_id, u.to_user_id), (bob.user, bob.device, alice.user));
        assert_eq!(u.content, text.as_bytes());
        seqs.push(m.seq);
    }
    assert!(seqs[0] > 0 && seqs[1] == seqs[0] + 1, "the list seqs: {seqs:?}");

    // A room: subscribe, then Bob's room message arrives with room_id set.
    let room = 700_000 + n;
    create_room(c, room).await;
    let sub =
        a.request("sub-1", PC_SUBSCRIBE_ROOM, SubscribeRoomRequest { room_id: room }.encode_to_vec()).await;
    assert_eq!(sub.code, 0, "{sub:?}");
    send_room(&mut rim, room, "in the room").await;
    let m = a.push().await;
    assert_eq!((m.command, m.room_id, m.seq), (MC_GROUP_MESSAGE, room, 0), "{m:?}");
    let g = GroupMessagePush::decode(&m.content[..]).unwrap();
    assert_eq!(
        (g.from_user.unwrap().user_id, g.group_id, g.content.as_slice()),
        (bob.user, room, &b"in the room"[..])
    );
    // An unknown room is refused with gim's group-not-found code.
    let bad =
        a.request("sub-2", PC_SUBSCRIBE_ROOM, SubscribeRoomRequest { room_id: 1 }.encode_to_vec()).await;
    assert_eq!(bad.code, 10220, "{bad:?}");

    // rim commands are not reachable through gim's packets: 5 is rim's SYNC.
    let sync = a.request("not-gim", 5, Vec::new()).await;
    assert_eq!(sync.code, ErrorCode::ErrorUnknownCommand as i32, "{sync:?}");

    // A request id above 64 bytes is refused (PC_UNKNOWN, empty request id), then closed.
    a.send(&"x".repeat(65), PC_HEARTBEAT, Vec::new()).await;
    let refused = a.closed(1).await;
    assert_eq!((refused[0].request_id.as_str(), refused[0].command), ("", PC_UNKNOWN));
    let r = Reply::decode(&refused[0].content[..]).unwrap();
    assert_eq!(r.code, ErrorCode::ErrorMalformedFrame as i32, "{r:?}");
    assert!(r.message.contains("request_id of 65 bytes"), "{r:?}");

    // A bad token gets a non-zero code (gim's 10000), and the connection
    // closes (gim kept it open).
    let mut bad = GimClient::connect(gw, transport).await;
    let wrong = SignInRequest { user_id: alice.user, device_id: alice.device, token: "not-the-token".into() };
    let r = bad.request("login", PC_SIGN_IN, wrong.encode_to_vec()).await;
    assert_eq!(r.code, 10000, "{r:?}");
    bad.closed(0).await;

    // Bytes that are not a Packet: a clear refusal, then closed.
    let mut garbage = GimClient::connect(gw, transport).await;
    garbage.send_raw(vec![0x0a, 0x05, 0xff]).await;
    let refused = garbage.closed(1).await;
    let r = Reply::decode(&refused[0].content[..]).unwrap();
    assert_eq!((refused[0].command, r.code), (PC_UNKNOWN, ErrorCode::ErrorMalformedFrame as i32));

    // Before sign-in the connection may send 64 packets (each answered with
    // 10000); the 65th closes it.
    let mut chatty = GimClient::connect(gw, transport).await;
    for i in 0..65 {
        chatty.send(&format!("hb{i}"), PC_HEARTBEAT, Vec::new()).await;
    }
    let answered = chatty.closed(64).await;
    assert_eq!(answered.len(), 64);
    assert!(answered.iter().all(|p| Reply::decode(&p.content[..]).unwrap().code == 10000));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gim_client_signs_in_heartbeats_and_receives_rim_messages_over_tcp_and_websocket() {
    let _g = serial().await;
    let c = Cluster::start(3, 2).await;
    let rim_gw = c.gateway("rim").await;
    let gw = gim_gateway(&c, SessionConfig::default()).await;
    gim_client_flow(&c, &gw, &rim_gw, Transport::Tcp, 1).await;
    gim_client_flow(&c, &gw, &rim_gw, Transport::Ws, 2).await;
    gw.shutdown().await;
    rim_gw.shutdown().await;
    c.shutdown().await;
}

/// The session counts what it queues in rim frames while a gim connection
/// writes gim frames of other sizes: what is written is credited back in
/// the session's units, so a client that reads everything never fills a
/// small send queue, however long it runs (a drift would close it as slow).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prompt_gim_reader_never_fills_the_send_queue() {
    let _g = serial().await;
    let c = Cluster::start(1, 1).await;
    let gw = gim_gateway(&c, SessionConfig { send_queue_limit: 2048, ..SessionConfig::default() }).await;
    for (transport, n) in [(Transport::Tcp, 1), (Transport::Ws, 2)] {
        let alice = register(&c, &format!("gim-prompt-{n}")).await;
        let mut a = GimClient::connect(&gw, transport).await;
        assert_eq!(a.sign_in(&alice).await.code, 0);
        // Empty request ids first (gim frames smaller than the rim ones the
        // session counts: uncredited, 1000 of them would pass the limit),
        // then long ones (larger).
        for i in 0..1500 {
            let id = if i < 1000 { String::new() } else { format!("{i:0>60}") };
            let hb =
                Packet { request_id: id, command: PC_HEARTBEAT, content: Vec::new(), seq: 0 }.encode_to_vec();
            a.send_raw(hb.clone()).await;
            assert_eq!(a.next_raw().await.as_deref(), Some(&hb[..]), "{transport:?}: heartbeat {i}");
        }
    }
    gw.shutdown().await;
    c.shutdown().await;
}
