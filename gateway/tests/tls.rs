//! TLS on the gateway's client-facing listeners, end to end with real
//! sockets: the TCP transport (rustls driven sans-IO on the mio loop) and
//! WebSocket (`wss://`, tokio-rustls). Sessions work over both, big
//! messages and bursts included; an untrusted certificate, plaintext on a
//! TLS port, a handshake that never completes and garbage after the
//! handshake each end their own connection only, while the clients
//! connected meanwhile keep working.
#![allow(missing_docs)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use prost::Message as _;
use rim_gateway::SessionConfig;
use rim_proto::ErrorCode;
use rim_proto::codec::FrameDecoder;
use rim_proto::ids::UserId;
use rim_proto::v1::*;
use rim_testkit::tls::TestPki;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

mod cluster;
mod e2e;
use cluster::{Device, free_addr, register, serial, wait_for};
use e2e::{Client, Gateway, Kind, WAIT, another_device, tls_handshake};

/// Alice (TLS TCP) sends to bob, whose two devices are on TLS TCP and WSS;
/// each check proves all three connections still work.
struct Witness {
    alice: Client,
    bob: [Client; 2],
    bob_id: u64,
    seq: u64,
}

impl Witness {
    async fn start(c: &cluster::Cluster, gw: &Gateway) -> Witness {
        let alice = register(c, "witness-alice").await;
        let bob = register(c, "witness-bob").await;
        let bob2 = another_device(c, "witness-bob").await;
        let (alice_c, _) = gw.signed_in(Kind::Tcp, &alice).await;
        let (bob_tcp, _) = gw.signed_in(Kind::Tcp, &bob).await;
        let (bob_ws, _) = gw.signed_in(Kind::Ws, &bob2).await;
        Witness { alice: alice_c, bob: [bob_tcp, bob_ws], bob_id: bob.user, seq: 0 }
    }

    /// A message of `size` bytes from alice reaches both of bob's devices
    /// intact.
    async fn check_sized(&mut self, after: &str, size: usize) {
        self.seq += 1;
        let cmid = format!("witness-{}", self.seq);
        self.alice.send_sized(self.bob_id, &cmid, size).await;
        let want = e2e::text_to(self.bob_id, &cmid, size).content;
        for client in &mut self.bob {
            let m = client.push(self.seq).await;
            assert_eq!(m.client_msg_id, cmid, "{:?} after {after}", client.kind);
            assert!(m.content == want, "{:?}: content of {cmid} changed after {after}", client.kind);
        }
    }

    async fn check(&mut self, after: &str) {
        self.check_sized(after, 0).await;
    }

    /// A burst of `n` messages sent without waiting for replies: both of
    /// bob's devices get all of them intact, each once and in seq order
    /// (the order of concurrent sends is the nodes' to choose).
    async fn burst(&mut self, n: u64) {
        let first = self.seq + 1;
        let cmids: Vec<String> = (0..n).map(|i| format!("burst-{i}")).collect();
        let mut ids = Vec::new();
        for cmid in &cmids {
            let input = e2e::text_to(self.bob_id, cmid, 700).encode_to_vec();
            ids.push(self.alice.send(Command::Send as i32, input).await);
        }
        for (id, cmid) in ids.into_iter().zip(&cmids) {
            if self.alice.reply(id).await.code != ErrorCode::Ok as i32 {
                self.alice.send_sized(self.bob_id, cmid, 700).await; // same id: idempotent
            }
        }
        self.seq += n;
        let mut want = cmids.clone();
        want.sort();
        for client in &mut self.bob {
            let got = client.pushes_through(self.seq).await;
            let mut order = e2e::consecutive(&got, first);
            for m in &got {
                assert!(m.content == e2e::text_to(self.bob_id, &m.client_msg_id, 700).content, "intact");
            }
            order.sort();
            assert_eq!(order, want, "{:?}", client.kind);
        }
    }
}

/// Signs `d` in over a raw TLS connection, then sends far more than one
/// turn's read budget of heartbeats in one write: edge-triggered readiness
/// reports them once, rustls decrypts them in batches, and every one is
/// answered, in order.
async fn flood_beyond_the_read_budget(gw: &Gateway, d: &Device) {
    let addr = gw.addr(Kind::Tcp);
    let tls = tls_handshake(gw.client_tls.as_ref().unwrap(), addr, tcp_connect(addr).await).await.unwrap();
    let (mut reader, mut writer) = tokio::io::split(tls);
    let mut decoder = FrameDecoder::default();
    let mut buf = vec![0u8; 64 * 1024];
    let deadline = Instant::now() + WAIT;
    let mut next = async |reader: &mut tokio::io::ReadHalf<_>, decoder: &mut FrameDecoder| loop {
        if let Some(p) = decoder.next_frame().unwrap() {
            return p;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        let n = tokio::time::timeout(left, reader.read(&mut buf)).await.expect("replies in time").unwrap();
        assert!(n > 0, "the gateway closed the flooding connection");
        decoder.push(&buf[..n]);
    };
    let input = SignInInput { user_id: d.user, device_id: d.device, token: d.token.clone() };
    writer.write_all(&frame(&e2e::packet(1, Command::SignIn as i32, input.encode_to_vec()))).await.unwrap();
    let reply = next(&mut reader, &mut decoder).await;
    assert_eq!(Reply::decode(reply.content).unwrap().code, ErrorCode::Ok as i32, "sign-in");

    let n = 3 * rim_gateway::tcp::READ_BUDGET / 4096 + 7;
    let mut wire = bytes::BytesMut::new();
    for i in 0..n as u64 {
        wire.extend_from_slice(&frame(&e2e::packet(1_000 + i, Command::Heartbeat as i32, vec![7u8; 4096])));
    }
    let write = tokio::spawn(async move {
        writer.write_all(&wire).await.unwrap();
        writer
    });
    let mut answered = 0;
    while answered < n {
        let p = next(&mut reader, &mut decoder).await;
        if p.command == Command::Heartbeat as i32 {
            assert_eq!(p.request_id, 1_000 + answered as u64, "in order");
            assert_eq!(Reply::decode(p.content).unwrap().code, ErrorCode::Ok as i32);
            answered += 1;
        }
    }
    drop(write.await.unwrap());
}

/// `packet` as a frame on the wire.
fn frame(packet: &Packet) -> bytes::BytesMut {
    let mut wire = bytes::BytesMut::new();
    rim_proto::codec::encode_frame(packet, &mut wire);
    wire
}

/// Reads until the server closes `stream` (end of stream or reset); returns
/// how long that took and the bytes read meanwhile. Panics after [`WAIT`].
async fn closed(stream: &mut (impl AsyncRead + Unpin)) -> (Duration, Vec<u8>) {
    let started = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = WAIT.saturating_sub(started.elapsed());
        match tokio::time::timeout(left, stream.read(&mut buf)).await {
            Err(_) => panic!("not closed within {WAIT:?}; read {} bytes", got.len()),
            Ok(Ok(0)) | Ok(Err(_)) => return (started.elapsed(), got),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

async fn tcp_connect(addr: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect(addr).await.unwrap();
    stream.set_nodelay(true).unwrap();
    stream
}

/// What the server sends a client whose bytes are not TLS: nothing, or a
/// TLS alert record, never a frame.
fn assert_no_frame(bytes: &[u8], what: &str) {
    assert!(bytes.is_empty() || bytes[0] == 0x15, "{what}: got {bytes:?}, not an alert");
}

/// The start of a genuine ClientHello for `addr`.
fn client_hello(config: &std::sync::Arc<rustls::ClientConfig>, addr: SocketAddr) -> Vec<u8> {
    let name = rustls::pki_types::ServerName::from(addr.ip());
    let mut conn = rustls::ClientConnection::new(config.clone(), name).unwrap();
    let mut hello = Vec::new();
    conn.write_tls(&mut hello).unwrap();
    assert!(hello.len() > 100, "a ClientHello of {} bytes", hello.len());
    hello
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_sessions_work_and_untrusted_or_plaintext_clients_are_refused() {
    let _g = serial().await;
    let c = cluster::Cluster::start(3, 2).await;
    let pki = TestPki::new();
    let gw = Gateway::start_tls(c.seeds(), SessionConfig::default(), &pki).await;
    let mut w = Witness::start(&c, &gw).await;
    w.check("start").await;
    // The largest content a message may have (64 KiB): four TLS records
    // and more; then a burst.
    w.check_sized("a small message", 64 * 1024).await;
    w.burst(60).await;
    w.check("a burst").await;
    flood_beyond_the_read_budget(&gw, &register(&c, "flood").await).await;
    w.check("a flood").await;

    // A client that trusts only another CA refuses the gateway's
    // certificate: the handshake fails, on both transports.
    let untrusted = rim_cluster::tls::client_config(&pki.other_ca).unwrap();
    for kind in [Kind::Tcp, Kind::Ws] {
        let addr = gw.addr(kind);
        let err = tls_handshake(&untrusted, addr, tcp_connect(addr).await).await.unwrap_err();
        assert!(err.to_string().contains("UnknownIssuer"), "{kind:?}: {err}");
        w.check(&format!("an untrusted certificate on {kind:?}")).await;
    }

    // Plaintext to the TLS TCP port: a valid SIGN_IN frame gets no session,
    // only the close (and perhaps an alert).
    let carol = register(&c, "carol").await;
    let mut plain = tcp_connect(gw.addr(Kind::Tcp)).await;
    let input = SignInInput { user_id: carol.user, device_id: carol.device, token: carol.token.clone() };
    plain.write_all(&frame(&e2e::packet(1, Command::SignIn as i32, input.encode_to_vec()))).await.unwrap();
    let (_, got) = closed(&mut plain).await;
    assert_no_frame(&got, "plaintext SIGN_IN on the TLS port");
    assert!(gw.router.user_conns(UserId(carol.user)).is_empty(), "a plaintext client got a session");
    w.check("a plaintext SIGN_IN").await;

    // A plaintext WebSocket upgrade to the wss:// port fails.
    let addr = gw.addr(Kind::Ws);
    let upgrade = tokio_tungstenite::client_async(format!("ws://{addr}/ws"), tcp_connect(addr).await);
    let refused = tokio::time::timeout(WAIT, upgrade).await.expect("refused in time");
    assert!(refused.is_err(), "a plaintext upgrade on the wss:// port succeeded");
    w.check("a plaintext websocket upgrade").await;

    // The well-behaved TLS clients are the only TCP connections left.
    wait_for(WAIT, || (gw.tcp_connections() == 2).then_some(())).await;
    gw.shutdown().await;
    c.shutdown().await;
}

/// A client that connects and stays silent, and one that sends half a
/// ClientHello, are closed at the sign-in deadline, on both transports;
/// a TLS client connected meanwhile is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_handshakes_that_never_complete_are_closed_at_the_sign_in_deadline() {
    let _g = serial().await;
    let pki = TestPki::new();
    let timeout = Duration::from_millis(800);
    let config = SessionConfig { sign_in_timeout: timeout, ..SessionConfig::default() };
    // No node is needed: nobody signs in.
    let gw = Gateway::start_tls(vec![free_addr()], config, &pki).await;
    let client_tls = gw.client_tls.clone().unwrap();
    for kind in [Kind::Tcp, Kind::Ws] {
        let addr = gw.addr(kind);
        let connected = Instant::now();
        let mut silent = tcp_connect(addr).await;
        let mut partial = tcp_connect(addr).await;
        let hello = client_hello(&client_tls, addr);
        partial.write_all(&hello[..hello.len() / 2]).await.unwrap();
        // Meanwhile a complete handshake is served: its heartbeat before
        // sign-in gets ERROR_NOT_SIGNED_IN over TLS.
        let mut honest = gw.connect(kind).await;
        assert_eq!(honest.heartbeat().await.code, ErrorCode::ErrorNotSignedIn as i32);

        for (what, stream) in [("silent", &mut silent), ("half a ClientHello", &mut partial)] {
            let (_, got) = closed(stream).await;
            let after = connected.elapsed();
            assert!(got.is_empty(), "{kind:?} {what}: got {got:?}");
            assert!(after >= timeout / 2, "{kind:?} {what}: closed after {after:?}, before the deadline");
            assert!(after < Duration::from_secs(5), "{kind:?} {what}: closed only after {after:?}");
        }
    }
    wait_for(WAIT, || (gw.tcp_connections() == 0).then_some(())).await;
    gw.shutdown().await;
}

/// Bytes that are not TLS records after a completed handshake (and a record
/// that does not decrypt, and one announcing more than a record may hold)
/// close that connection at once; another connection is not affected.
/// An application-data record of 32 bytes that no key decrypts.
const BAD_RECORD: [u8; 37] = {
    let mut r = [0xab; 37];
    (r[0], r[1], r[2], r[3], r[4]) = (0x17, 0x03, 0x03, 0x00, 0x20);
    r
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_garbage_after_the_handshake_closes_only_that_connection() {
    let _g = serial().await;
    let pki = TestPki::new();
    // A sign-in deadline far away: the closes below are not its doing.
    let config = SessionConfig { sign_in_timeout: Duration::from_secs(60), ..SessionConfig::default() };
    let gw = Gateway::start_tls(vec![free_addr()], config, &pki).await;
    let client_tls = gw.client_tls.clone().unwrap();
    let garbage: [&[u8]; 3] =
        [b"\x05GET / HTTP/1.1\r\n\r\n", &BAD_RECORD, &[0x17, 0x03, 0x03, 0xff, 0xff, 0x00]];
    for kind in [Kind::Tcp, Kind::Ws] {
        let addr = gw.addr(kind);
        let mut honest = gw.connect(kind).await;
        for bytes in garbage {
            let mut tls = tls_handshake(&client_tls, addr, tcp_connect(addr).await).await.unwrap();
            let (after, got) = match kind {
                Kind::Tcp => {
                    // The connection is up: a heartbeat is answered.
                    tls.write_all(&frame(&e2e::packet(1, Command::Heartbeat as i32, Vec::new())))
                        .await
                        .unwrap();
                    let mut buf = [0u8; 256];
                    assert!(tls.read(&mut buf).await.unwrap() > 0, "{kind:?}: the heartbeat's reply");
                    tls.get_mut().0.write_all(bytes).await.unwrap();
                    closed(&mut tls).await
                }
                Kind::Ws => {
                    let url = format!("wss://{addr}/ws");
                    let (mut ws, _) = tokio_tungstenite::client_async(url, tls).await.unwrap();
                    ws.get_mut().get_mut().0.write_all(bytes).await.unwrap();
                    let started = Instant::now();
                    let end = tokio::time::timeout(WAIT, ws.next()).await.expect("closed in time");
                    assert!(!matches!(end, Some(Ok(ref m)) if m.is_binary()), "{kind:?}: got {end:?}");
                    (started.elapsed(), Vec::new())
                }
            };
            assert!(after < Duration::from_secs(5), "{kind:?}: closed only after {after:?}");
            assert!(got.is_empty(), "{kind:?}: got {got:?} after garbage");
            assert_eq!(honest.heartbeat().await.code, ErrorCode::ErrorNotSignedIn as i32, "{kind:?}");
        }
    }
    gw.shutdown().await;
}

/// Closes end with the peer's `close_notify` (a clean TLS end, not a bare
/// TCP end that could hide a truncation): at shutdown on both transports,
/// and after a refused frame on TCP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_closes_send_close_notify() {
    let _g = serial().await;
    let pki = TestPki::new();
    let config = SessionConfig { max_frame: 1024, ..SessionConfig::default() };
    let gw = Gateway::start_tls(vec![free_addr()], config, &pki).await;
    let client_tls = gw.client_tls.clone().unwrap();
    let heartbeat = frame(&e2e::packet(1, Command::Heartbeat as i32, Vec::new()));
    let connect_tcp = async || {
        let addr = gw.addr(Kind::Tcp);
        let mut tls = tls_handshake(&client_tls, addr, tcp_connect(addr).await).await.unwrap();
        tls.write_all(&heartbeat).await.unwrap();
        let mut buf = [0u8; 256];
        assert!(tls.read(&mut buf).await.unwrap() > 0, "the heartbeat's reply");
        tls
    };
    // Reads to the end: `Ok(0)` from tokio-rustls is close_notify, an
    // unexpected end of the TCP stream is an error.
    async fn clean_end(stream: &mut (impl AsyncRead + Unpin)) -> Vec<u8> {
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match tokio::time::timeout(WAIT, stream.read(&mut buf)).await.expect("closed in time") {
                Ok(0) => return got,
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) => panic!("no close_notify: {e}"),
            }
        }
    }

    // A frame above the maximum: the error reply, then close_notify.
    let mut refused = connect_tcp().await;
    let mut wire = bytes::BytesMut::new();
    prost::encoding::encode_varint(4096, &mut wire);
    refused.write_all(&wire).await.unwrap();
    let mut decoder = FrameDecoder::default();
    decoder.push(&clean_end(&mut refused).await);
    let reply = Reply::decode(decoder.next_frame().unwrap().expect("the error reply").content).unwrap();
    assert_eq!(reply.code, ErrorCode::ErrorFrameTooLarge as i32);

    let mut tcp = connect_tcp().await;
    let mut raw_ws = {
        let addr = gw.addr(Kind::Ws);
        let tls = tls_handshake(&client_tls, addr, tcp_connect(addr).await).await.unwrap();
        tokio_tungstenite::client_async(format!("wss://{addr}/ws"), tls).await.unwrap().0
    };
    let shutdown = tokio::spawn(gw.shutdown());
    clean_end(&mut tcp).await;
    // The WebSocket close handshake, then close_notify: the stream ends
    // without an error.
    loop {
        match tokio::time::timeout(WAIT, raw_ws.next()).await.expect("closed in time") {
            Some(Ok(m)) if m.is_close() => {}
            Some(Ok(_)) => {}
            Some(Err(e)) => panic!("wss: {e}"),
            None => break,
        }
    }
    assert_eq!(clean_end(raw_ws.get_mut()).await, b"", "nothing after close_notify");
    shutdown.await.unwrap();
}
