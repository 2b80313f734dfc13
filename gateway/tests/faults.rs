//! Misbehaving clients, end to end on both transports: silent ones, ones
//! sending bad input, and ones that stop reading. Each gets exactly what
//! `docs/protocol.md` promises (error code, connection closed or kept), and
//! the gateway keeps serving the well-behaved clients connected meanwhile.
#![allow(missing_docs)]

use std::time::{Duration, Instant};

use bytes::Bytes;
use prost::Message as _;
use rim_gateway::SessionConfig;
use rim_proto::ErrorCode;
use rim_proto::ids::{DeviceId, UserId};
use rim_proto::v1::*;
use rim_testkit::tls::TestPki;
use tokio_tungstenite::tungstenite::Message as WsMessage;

mod cluster;
mod e2e;
use cluster::{Cluster, Device, register, serial, wait_for};
use e2e::{Client, Gateway, Kind, Read, WAIT, another_device, consecutive};

/// The largest frame of the bad-input tests' gateway.
const MAX_FRAME: usize = 64 * 1024;

/// Connections that must keep working whatever other clients do: alice
/// sends to bob, whose two devices are on either transport.
struct Witness {
    alice: Client,
    bob_tcp: Client,
    bob_ws: Client,
    bob: u64,
    seq: u64,
}

impl Witness {
    async fn start(c: &Cluster, gw: &Gateway) -> Witness {
        let alice = register(c, "witness-alice").await;
        let bob = register(c, "witness-bob").await;
        let bob2 = another_device(c, "witness-bob").await;
        let (alice_c, _) = gw.signed_in(Kind::Tcp, &alice).await;
        let (bob_tcp, _) = gw.signed_in(Kind::Tcp, &bob).await;
        let (bob_ws, _) = gw.signed_in(Kind::Ws, &bob2).await;
        Witness { alice: alice_c, bob_tcp, bob_ws, bob: bob.user, seq: 0 }
    }

    /// A message from alice reaches both of bob's devices.
    async fn check(&mut self, after: &str) {
        self.seq += 1;
        let cmid = format!("witness-{}", self.seq);
        self.alice.send_text(self.bob, &cmid).await;
        for client in [&mut self.bob_tcp, &mut self.bob_ws] {
            assert_eq!(client.push(self.seq).await.client_msg_id, cmid, "after {after}");
        }
    }
}

/// A frame-level error: `code` in a reply with request id 0 and
/// `COMMAND_UNSPECIFIED`, then the close (WebSocket close code `ws_code`).
async fn expect_frame_error(client: &mut Client, code: ErrorCode, ws_code: u16) {
    let reply = client.frame_error().await;
    assert_eq!(reply.code, code as i32, "{:?}: {}", client.kind, reply.message);
    let closed = client.expect_closed().await;
    if client.kind == Kind::Ws {
        assert_eq!(closed, Some(ws_code));
    }
}

/// The cases both transports share: commands before sign-in, unknown
/// commands, undecodable content, failed sign-ins.
async fn session_errors(c: &Cluster, gw: &Gateway, kind: Kind, w: &mut Witness) {
    let carol = register(c, &format!("carol-{kind:?}")).await;

    // Before SIGN_IN: ERROR_NOT_SIGNED_IN, echoing id and command; the
    // connection stays open and can still sign in.
    let mut client = gw.connect(kind).await;
    let send = e2e::text_to(w.bob, "too-early", 0).encode_to_vec();
    let id = client.send(Command::Send as i32, send).await;
    let p = client.wait("the reply", |p| p.request_id == id).await;
    assert_eq!(p.command, Command::Send as i32);
    assert_eq!(Reply::decode(p.content).unwrap().code, ErrorCode::ErrorNotSignedIn as i32);
    assert_eq!(client.heartbeat().await.code, ErrorCode::ErrorNotSignedIn as i32);
    let unknown = client.send(999, Vec::new()).await;
    assert_eq!(client.reply(unknown).await.code, ErrorCode::ErrorNotSignedIn as i32);
    let reply = client.sign_in(&carol).await;
    assert_eq!(reply.code, ErrorCode::Ok as i32, "{}", reply.message);
    w.check("a command before sign-in").await;

    // An unknown command number, and a push command sent by a client:
    // ERROR_UNKNOWN_COMMAND, echoing the command; the connection stays open.
    let id = client.send(999, b"whatever".to_vec()).await;
    let p = client.wait("the reply to 999", |p| p.request_id == id).await;
    assert_eq!(p.command, 999);
    assert_eq!(Reply::decode(p.content).unwrap().code, ErrorCode::ErrorUnknownCommand as i32);
    let id = client.send(Command::Message as i32, Vec::new()).await;
    assert_eq!(client.reply(id).await.code, ErrorCode::ErrorUnknownCommand as i32);
    // Content that is not the command's input: ERROR_BAD_REQUEST, open.
    let id = client.send(Command::Send as i32, vec![0xff, 0xff, 0xff]).await;
    assert_eq!(client.reply(id).await.code, ErrorCode::ErrorBadRequest as i32);
    assert_eq!(client.heartbeat().await.code, ErrorCode::Ok as i32);
    w.check("an unknown command").await;
    // The connection still gets its own pushes.
    w.alice.send_text(carol.user, "to-carol").await;
    assert_eq!(client.push(1).await.client_msg_id, "to-carol");

    // A bad token: ERROR_UNAUTHENTICATED, then closed.
    let forged = Device { token: "not-a-token".into(), ..carol.clone() };
    let mut client = gw.connect(kind).await;
    assert_eq!(client.sign_in(&forged).await.code, ErrorCode::ErrorUnauthenticated as i32);
    let closed = client.expect_closed().await;
    if kind == Kind::Ws {
        assert_eq!(closed, Some(1008));
    }
    w.check("a bad token").await;
    // Another device's token: refused the same way.
    let stolen = Device { device: carol.device + 1_000, ..carol.clone() };
    let mut client = gw.connect(kind).await;
    assert_eq!(client.sign_in(&stolen).await.code, ErrorCode::ErrorUnauthenticated as i32);
    client.expect_closed().await;
    w.check("another device's token").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_bad_input_gets_the_documented_errors_and_others_are_unaffected() {
    let _g = serial().await;
    let c = Cluster::start(3, 2).await;
    let config = SessionConfig { max_frame: MAX_FRAME, ..SessionConfig::default() };
    let gw = Gateway::start(c.seeds(), config).await;
    let mut w = Witness::start(&c, &gw).await;
    w.check("start").await;

    session_errors(&c, &gw, Kind::Tcp, &mut w).await;

    // A prefix announcing more than the maximum: refused at once, before
    // the body arrives.
    let mut client = gw.connect(Kind::Tcp).await;
    let mut wire = Vec::new();
    prost::encoding::encode_varint(MAX_FRAME as u64 + 1, &mut wire);
    wire.extend_from_slice(&[0u8; 8]);
    client.write_raw(&wire).await;
    expect_frame_error(&mut client, ErrorCode::ErrorFrameTooLarge, 0).await;
    w.check("a frame over the limit").await;

    // A prefix longer than 10 bytes, and one overflowing 64 bits.
    let mut client = gw.connect(Kind::Tcp).await;
    client.write_raw(&[0x80; 11]).await;
    expect_frame_error(&mut client, ErrorCode::ErrorMalformedFrame, 0).await;
    let mut client = gw.connect(Kind::Tcp).await;
    client.write_raw(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02]).await;
    expect_frame_error(&mut client, ErrorCode::ErrorMalformedFrame, 0).await;
    w.check("a malformed prefix").await;

    // A body that is not a Packet, on a signed-in connection: its route
    // goes with it.
    let dave = register(&c, "dave").await;
    let (mut client, _) = gw.signed_in(Kind::Tcp, &dave).await;
    assert_eq!(gw.router.user_conns(UserId(dave.user)).len(), 1);
    client.write_raw(&[0x03, 0xff, 0xff, 0xff]).await;
    expect_frame_error(&mut client, ErrorCode::ErrorMalformedFrame, 0).await;
    wait_for(WAIT, || gw.router.user_conns(UserId(dave.user)).is_empty().then_some(())).await;
    w.check("a malformed body").await;

    // Garbage: a valid prefix, then bytes that are no Packet.
    let mut client = gw.connect(Kind::Tcp).await;
    client.write_raw(b"\x05GET / HTTP/1.1\r\n\r\n").await;
    expect_frame_error(&mut client, ErrorCode::ErrorMalformedFrame, 0).await;
    w.check("garbage").await;

    // Only the witnesses' TCP connections are left.
    wait_for(WAIT, || (gw.tcp_connections() == 2).then_some(())).await;
    gw.shutdown().await;
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ws_bad_input_gets_the_documented_errors_and_others_are_unaffected() {
    let _g = serial().await;
    let c = Cluster::start(3, 2).await;
    let config = SessionConfig { max_frame: MAX_FRAME, ..SessionConfig::default() };
    let gw = Gateway::start(c.seeds(), config).await;
    let mut w = Witness::start(&c, &gw).await;
    w.check("start").await;

    session_errors(&c, &gw, Kind::Ws, &mut w).await;

    // A binary message above the maximum frame: ERROR_FRAME_TOO_LARGE,
    // close 1009 (too big); also one beyond what the WebSocket layer reads.
    for size in [MAX_FRAME + 1, 5 * MAX_FRAME] {
        let mut client = gw.connect(Kind::Ws).await;
        client.send_ws(WsMessage::Binary(Bytes::from(vec![0u8; size]))).await;
        expect_frame_error(&mut client, ErrorCode::ErrorFrameTooLarge, 1009).await;
        w.check(&format!("a binary message of {size} bytes")).await;
    }

    // A binary message that is not a Packet: ERROR_MALFORMED_FRAME, 1008.
    let mut client = gw.connect(Kind::Ws).await;
    client.send_ws(WsMessage::Binary(Bytes::from_static(&[0xff, 0xff, 0xff]))).await;
    expect_frame_error(&mut client, ErrorCode::ErrorMalformedFrame, 1008).await;
    w.check("a bad binary message").await;

    // Text that is not JSON, or not a packet's JSON: the error comes back
    // as text, then the close.
    for text in ["{not json", r#"{"command":"NO_SUCH_COMMAND"}"#, r#"[1, 2]"#] {
        let mut client = gw.connect(Kind::Ws).await;
        client.send_ws(WsMessage::text(text)).await;
        expect_frame_error(&mut client, ErrorCode::ErrorMalformedFrame, 1008).await;
        assert_eq!(client.texts, 1, "the error reply is a text message");
        w.check(&format!("the text {text}")).await;
    }

    // A text packet whose content makes it larger than the maximum frame.
    let mut client = gw.connect(Kind::Ws).await;
    let big = serde_json::json!({"request_id": 1, "command": 2, "content": vec![1u8; MAX_FRAME]});
    client.send_ws(WsMessage::text(big.to_string())).await;
    expect_frame_error(&mut client, ErrorCode::ErrorFrameTooLarge, 1009).await;
    w.check("a text packet over the limit").await;

    // A bad binary message on a signed-in connection: its route goes.
    let dave = register(&c, "dave").await;
    let (mut client, _) = gw.signed_in(Kind::Ws, &dave).await;
    client.send_ws(WsMessage::Binary(Bytes::from_static(&[0x0a, 0x05]))).await;
    expect_frame_error(&mut client, ErrorCode::ErrorMalformedFrame, 1008).await;
    wait_for(WAIT, || gw.router.user_conns(UserId(dave.user)).is_empty().then_some(())).await;
    w.check("a malformed message after sign-in").await;
    gw.shutdown().await;
    c.shutdown().await;
}

/// A node that never answers (it accepts TCP connections, but speaks no
/// HTTP/2) makes the sign-in call outlast the sign-in deadline: the client
/// still gets a reply to its SIGN_IN, the retryable ERROR_TIMEOUT, then the
/// close. The idle timeout (600 ms) is shorter than that deadline, and does
/// not cut the sign-in short.
async fn slow_sign_in_gets_a_retryable_timeout(kind: Kind) {
    let _g = serial().await;
    let black_hole = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let config = SessionConfig {
        sign_in_timeout: Duration::from_millis(1500),
        heartbeat_interval: Duration::from_millis(200),
        ..SessionConfig::default()
    };
    let gw = Gateway::start(vec![black_hole.local_addr().unwrap().to_string()], config).await;
    let device = Device { user: 10_001, device: 20_001, token: "tk".into() };
    let mut client = gw.connect(kind).await;
    let started = Instant::now();
    let reply = client.sign_in(&device).await;
    assert_eq!(reply.code, ErrorCode::ErrorTimeout as i32, "{}", reply.message);
    assert!(started.elapsed() >= Duration::from_millis(1000), "{:?}", started.elapsed());
    let closed = client.expect_closed().await;
    if kind == Kind::Ws {
        assert_eq!(closed, Some(1008));
    }
    gw.shutdown().await;
    drop(black_hole);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_slow_sign_in_gets_a_retryable_timeout_before_the_close() {
    slow_sign_in_gets_a_retryable_timeout(Kind::Tcp).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ws_slow_sign_in_gets_a_retryable_timeout_before_the_close() {
    slow_sign_in_gets_a_retryable_timeout(Kind::Ws).await;
}

/// A session kept alive by heartbeats past the idle timeout, then closed
/// after about three silent intervals.
async fn silent_connection_is_closed(kind: Kind) {
    let _g = serial().await;
    let c = Cluster::start(3, 2).await;
    let alice = register(&c, "alice").await;
    let config = SessionConfig { heartbeat_interval: Duration::from_millis(200), ..SessionConfig::default() };
    let gw = Gateway::start(c.seeds(), config).await;
    let (mut client, out) = gw.signed_in(kind, &alice).await;
    assert_eq!(out.heartbeat_interval_ms, 200);

    let started = Instant::now();
    while started.elapsed() < Duration::from_millis(1500) {
        assert_eq!(client.heartbeat().await.code, ErrorCode::Ok as i32);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let silent = Instant::now();
    let code = client.expect_closed().await;
    let waited = silent.elapsed();
    assert!(waited >= Duration::from_millis(450), "closed too early: {waited:?}");
    if kind == Kind::Ws {
        assert_eq!(code, Some(1008));
    }
    wait_for(WAIT, || gw.router.user_conns(UserId(alice.user)).is_empty().then_some(())).await;

    // Silence before sign-in is timed out the same way.
    let mut client = gw.connect(kind).await;
    client.expect_closed().await;
    gw.shutdown().await;
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_silent_connection_is_closed_after_the_idle_timeout() {
    silent_connection_is_closed(Kind::Tcp).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ws_silent_connection_is_closed_after_the_idle_timeout() {
    silent_connection_is_closed(Kind::Ws).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ws_pings_and_pongs_count_as_activity() {
    let _g = serial().await;
    let c = Cluster::start(3, 2).await;
    let alice = register(&c, "alice").await;
    let config = SessionConfig { heartbeat_interval: Duration::from_millis(200), ..SessionConfig::default() };
    let gw = Gateway::start(c.seeds(), config).await;
    let (mut client, _) = gw.signed_in(Kind::Ws, &alice).await;

    // Only pings, then only (unsolicited) pongs, for 2.5 idle timeouts
    // each: the connection stays open.
    for frame in [WsMessage::Ping(Bytes::from_static(b"p")), WsMessage::Pong(Bytes::from_static(b"q"))] {
        let started = Instant::now();
        while started.elapsed() < Duration::from_millis(1500) {
            client.send_ws(frame.clone()).await;
            let read = client.read_raw(Instant::now() + Duration::from_millis(100)).await;
            assert!(matches!(read, Read::Timeout), "nothing but pongs expected, got {read:?}");
        }
    }
    assert_eq!(client.heartbeat().await.code, ErrorCode::Ok as i32, "still open");

    // They do not replace silence: without them the timeout applies.
    let silent = Instant::now();
    assert_eq!(client.expect_closed().await, Some(1008));
    assert!(silent.elapsed() >= Duration::from_millis(450));
    gw.shutdown().await;
    c.shutdown().await;
}

/// Bob's first device stops reading while alice sends him 64 KiB messages;
/// the gateway closes it once its send queue passes the limit, while his
/// second device gets every message promptly. Reconnecting and syncing
/// from its last seq, the slow device gets exactly what it missed. With
/// `tls`, every connection is TLS: what rustls holds for the slow device
/// must count (or be bounded) like the plaintext queue.
async fn slow_reader_is_disconnected(kind: Kind, tls: bool) {
    // Large messages, so that the kernel's socket buffers (megabytes on
    // loopback) fill after a few dozen.
    const SIZE: usize = 64 * 1024;
    let _g = serial().await;
    let c = Cluster::start(3, 2).await;
    let alice = register(&c, "alice").await;
    let bob = register(&c, "bob").await;
    let bob2 = another_device(&c, "bob").await;
    // Gap-repair pages must fit the small send queue too: a resync signal
    // (e.g. the router re-subscribing) makes the session sync by itself.
    let config = SessionConfig { send_queue_limit: 4 * SIZE, resync_batch: 2, ..SessionConfig::default() };
    let pki = TestPki::new();
    let gw = match tls {
        false => Gateway::start(c.seeds(), config).await,
        true => Gateway::start_tls(c.seeds(), config, &pki).await,
    };
    let (mut a, _) = gw.signed_in(Kind::Tcp, &alice).await;
    let (mut slow, _) = gw.signed_in_with(kind, &bob, Some(4096)).await;
    let slow_conn = gw.router.device_conn(UserId(bob.user), DeviceId(bob.device)).unwrap();
    let (mut fast, _) = gw.signed_in(kind, &bob2).await;

    // The fast device reads on its own task, noting when each push came.
    let reader = tokio::spawn(async move {
        let mut got: Vec<(Message, Instant)> = Vec::new();
        loop {
            let deadline = Instant::now() + Duration::from_secs(60);
            let p = fast.next(deadline).await.expect("the fast device stays connected");
            if e2e::is_push(&p) {
                let m = e2e::message_of(&p);
                let last = m.client_msg_id == "last";
                got.push((m, Instant::now()));
                if last {
                    return (fast, got);
                }
            }
        }
    });

    let mut sent: Vec<(String, Instant)> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut after_drop = 0;
    while after_drop < 5 {
        assert!(Instant::now() < deadline, "the slow device was never dropped ({} sent)", sent.len());
        let cmid = format!("s{}", sent.len() + 1);
        let started = Instant::now();
        a.send_sized(bob.user, &cmid, SIZE).await;
        sent.push((cmid, started));
        if gw.router.device_conn(UserId(bob.user), DeviceId(bob.device)) != Some(slow_conn) {
            after_drop += 1;
        }
    }
    a.send_text(bob.user, "last").await;
    sent.push(("last".into(), Instant::now()));
    let (mut fast, got) =
        tokio::time::timeout(WAIT, reader).await.expect("the fast device got everything").unwrap();

    // The fast device: every message, in order, each promptly.
    let got_msgs: Vec<Message> = got.iter().map(|(m, _)| m.clone()).collect();
    let cmids: Vec<String> = sent.iter().map(|(c, _)| c.clone()).collect();
    assert_eq!(consecutive(&got_msgs, 1), cmids);
    for ((m, at), (_, started)) in got.iter().zip(&sent) {
        let lag = at.saturating_duration_since(*started);
        assert!(lag < Duration::from_secs(5), "{} took {lag:?}", m.client_msg_id);
        assert!(m.content.len() >= SIZE || m.client_msg_id == "last");
    }
    assert_eq!(fast.heartbeat().await.code, ErrorCode::Ok as i32);

    // The slow device: a prefix of the list, then the end of the stream.
    let (_, packets) = slow.closed_within(WAIT).await;
    let prefix: Vec<Message> = packets.iter().filter(|p| e2e::is_push(p)).map(e2e::message_of).collect();
    let prefix = consecutive(&prefix, 1);
    assert!(prefix.len() < cmids.len(), "the slow device cannot have got everything");
    assert_eq!(prefix[..], cmids[..prefix.len()]);
    eprintln!("{kind:?} (TLS {tls}): slow device dropped after {} of {} messages", prefix.len(), cmids.len());
    drop(slow);
    if kind == Kind::Tcp {
        // alice and the fast device are left.
        wait_for(WAIT, || (gw.tcp_connections() == 2).then_some(())).await;
    }

    // It recovers by reconnecting and syncing.
    let (mut slow, out) = gw.signed_in(kind, &bob).await;
    assert_eq!(out.last_seq, cmids.len() as u64);
    // Pages of 2 entries: a reply larger than the send queue limit would
    // close the connection as a slow one.
    let rest = slow.sync_all(prefix.len() as u64, 2).await;
    assert_eq!(consecutive(&rest, prefix.len() as u64 + 1), cmids[prefix.len()..]);
    gw.shutdown().await;
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_client_that_stops_reading_is_disconnected_others_keep_receiving() {
    slow_reader_is_disconnected(Kind::Tcp, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ws_client_that_stops_reading_is_disconnected_others_keep_receiving() {
    slow_reader_is_disconnected(Kind::Ws, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_tcp_client_that_stops_reading_is_disconnected_others_keep_receiving() {
    slow_reader_is_disconnected(Kind::Tcp, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wss_client_that_stops_reading_is_disconnected_others_keep_receiving() {
    slow_reader_is_disconnected(Kind::Ws, true).await;
}
