//! The mio TCP transport end to end: real sockets speaking the varint
//! framing, against a real in-process 3-node cluster where nodes are
//! needed.
#![allow(missing_docs)]

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use prost::Message as _;
use rim_gateway::SessionConfig;
use rim_gateway::router::{PushRouter, RouterOptions};
use rim_gateway::tcp::{DEFAULT_FIRST_CONN_ID, TcpGateway, TcpOptions};
use rim_gateway::upstream::{Upstream, UpstreamOptions};
use rim_proto::ErrorCode;
use rim_proto::codec::{FrameDecoder, encode_frame};
use rim_proto::ids::{DeviceId, UserId};
use rim_proto::v1::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

mod cluster;
mod wire;
use cluster::{Cluster, SECRET, free_addr, new_device, register, serial};
use wire::{Client, WAIT};

/// A gateway over `seeds`, with its router.
struct Gateway {
    tcp: Option<TcpGateway>,
    router: PushRouter,
}

impl Gateway {
    fn start(seeds: Vec<String>, config: SessionConfig, options: TcpOptions) -> Gateway {
        Gateway::start_with(seeds, config, options, None)
    }

    fn start_with(
        seeds: Vec<String>,
        config: SessionConfig,
        options: TcpOptions,
        conn_ids: Option<Arc<AtomicU64>>,
    ) -> Gateway {
        let mut opts = UpstreamOptions::new(seeds, SECRET, "gw-tcp-test");
        opts.request_timeout = Duration::from_secs(10);
        let upstream = Upstream::new(opts).unwrap();
        let router_opts = RouterOptions { subscribe_timeout: Duration::from_secs(3), request_queue: 16 };
        let router = PushRouter::new(upstream.clone(), router_opts);
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let runtime = tokio::runtime::Handle::current();
        let tcp = match conn_ids {
            None => TcpGateway::start(listener, upstream, router.clone(), config, runtime, options),
            Some(ids) => TcpGateway::start_with_conn_ids(
                listener,
                upstream,
                router.clone(),
                config,
                runtime,
                options,
                ids,
            ),
        }
        .unwrap();
        Gateway { tcp: Some(tcp), router }
    }

    fn addr(&self) -> std::net::SocketAddr {
        self.tcp.as_ref().unwrap().local_addr()
    }

    async fn shutdown(mut self) {
        let tcp = self.tcp.take().unwrap();
        tokio::task::spawn_blocking(move || tcp.shutdown()).await.unwrap();
        self.router.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_clients_sign_in_send_and_receive_pushes() {
    let _g = serial().await;
    let c = Cluster::start(3, 2).await;
    let alice = register(&c, "alice").await;
    let bob = register(&c, "bob").await;
    let bob2 = new_device(&c, "bob").await;
    assert_eq!(bob2.user, bob.user);
    assert_ne!(bob2.device, bob.device);
    let gw = Gateway::start(c.seeds(), SessionConfig::default(), TcpOptions::default());

    let mut a = Client::connect(gw.addr()).await;
    let mut b = Client::connect(gw.addr()).await;
    let mut b2 = Client::connect(gw.addr()).await;
    let out = a.sign_in(&alice).await;
    assert_eq!((out.user_id, out.device_id), (alice.user, alice.device));
    assert_eq!(out.heartbeat_interval_ms, 30_000);
    assert_eq!(b.sign_in(&bob).await.last_seq, 0);
    assert_eq!(b2.sign_in(&bob2).await.last_seq, 0);
    assert_eq!(gw.tcp.as_ref().unwrap().connections(), 3);
    let conns = gw.router.user_conns(UserId(bob.user));
    assert_eq!(conns.len(), 2);
    assert!(conns.iter().all(|&id| id >= DEFAULT_FIRST_CONN_ID), "{conns:?}");

    let heartbeat = a.request(Command::Heartbeat, Vec::new()).await;
    assert_eq!(heartbeat.code, ErrorCode::Ok as i32);

    let sent = a.send_text(bob.user, "hello-bob").await;
    assert_eq!(sent.seq, 1, "the entry's seq in alice's own list");
    for client in [&mut b, &mut b2] {
        let push = client.push(1).await;
        assert!(push.persisted);
        let m = push.message.unwrap();
        assert_eq!(m.client_msg_id, "hello-bob");
        assert_eq!(m.sender_user_id, alice.user);
        assert_eq!(m.message_id, sent.message_id);
    }
    // A reply to bob reaches alice as a push of her own list (seq 2).
    b.send_text(alice.user, "hi-alice").await;
    let m = a.push(2).await.message.unwrap();
    assert_eq!(m.client_msg_id, "hi-alice");

    // A clean close unregisters the connection.
    drop(b2);
    cluster::wait_for(WAIT, || (gw.router.user_conns(UserId(bob.user)).len() == 1).then_some(())).await;
    cluster::wait_for(WAIT, || (gw.tcp.as_ref().unwrap().connections() == 2).then_some(())).await;

    // Shutdown kicks every connection with ERROR_UNAVAILABLE, then closes.
    gw.shutdown().await;
    for client in [&mut a, &mut b] {
        let kick = loop {
            let p = client.next().await;
            if p.command == Command::Kick as i32 {
                break KickPush::decode(p.content).unwrap();
            }
        };
        assert_eq!(kick.code, ErrorCode::ErrorUnavailable as i32);
        client.eof().await;
    }
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_frames_sent_byte_by_byte_are_reassembled() {
    let _g = serial().await;
    let c = Cluster::start(3, 2).await;
    let alice = register(&c, "alice").await;
    let gw = Gateway::start(c.seeds(), SessionConfig::default(), TcpOptions::default());

    let mut a = Client::connect(gw.addr()).await;
    let input = SignInInput { user_id: alice.user, device_id: alice.device, token: alice.token.clone() };
    let sign_in = Packet {
        request_id: 1,
        command: Command::SignIn as i32,
        content: input.encode_to_vec().into(),
        seq: 0,
    };
    let wire = Client::frame(&sign_in);
    assert!(wire.len() > 20);
    for byte in wire.iter() {
        a.write(&[*byte]).await;
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let reply = a.reply(1).await;
    assert_eq!(reply.code, ErrorCode::Ok as i32, "{}", reply.message);
    assert_eq!(SignInOutput::decode(reply.data).unwrap().user_id, alice.user);

    // Two frames in one write, the second split over a further write.
    let hb = |id| Packet { request_id: id, command: Command::Heartbeat as i32, ..Default::default() };
    let mut wire = Client::frame(&hb(2));
    wire.extend_from_slice(&Client::frame(&hb(3)));
    wire.extend_from_slice(&Client::frame(&hb(4)));
    let cut = wire.len() - 2;
    a.write(&wire[..cut]).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    a.write(&wire[cut..]).await;
    for id in 2..=4 {
        let p = a.next().await;
        assert_eq!((p.request_id, p.command), (id, Command::Heartbeat as i32));
        assert_eq!(Reply::decode(p.content).unwrap().code, ErrorCode::Ok as i32);
    }
    gw.shutdown().await;
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_frame_above_the_maximum_gets_an_error_and_a_close() {
    let _g = serial().await;
    // No node is needed: the seed is never contacted.
    let config = SessionConfig { max_frame: 1024, ..SessionConfig::default() };
    let gw = Gateway::start(vec![free_addr()], config, TcpOptions::default());

    let mut client = Client::connect(gw.addr()).await;
    // A heartbeat first: answered (before sign-in it gets NOT_SIGNED_IN).
    client.request(Command::Heartbeat, Vec::new()).await;
    // The prefix announces 4096 bytes; only a few follow.
    let mut wire = BytesMut::new();
    prost::encoding::encode_varint(4096, &mut wire);
    wire.extend_from_slice(&[0u8; 16]);
    client.write(&wire).await;
    let p = client.next().await;
    assert_eq!((p.request_id, p.command), (0, Command::Unspecified as i32));
    let reply = Reply::decode(p.content).unwrap();
    assert_eq!(reply.code, ErrorCode::ErrorFrameTooLarge as i32, "{}", reply.message);
    client.eof().await;
    cluster::wait_for(WAIT, || (gw.tcp.as_ref().unwrap().connections() == 0).then_some(())).await;

    // A frame of exactly the maximum is fine (and not a sign-in).
    let mut client = Client::connect(gw.addr()).await;
    let mut packet = Packet { request_id: 9, command: Command::Heartbeat as i32, ..Default::default() };
    packet.content = vec![0u8; 1024 - packet.encoded_len() - 3].into();
    assert_eq!(packet.encoded_len(), 1024);
    client.write(&Client::frame(&packet)).await;
    let reply = client.reply(9).await;
    assert_eq!(reply.code, ErrorCode::ErrorNotSignedIn as i32);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_second_sign_in_of_a_device_kicks_the_first() {
    let _g = serial().await;
    let c = Cluster::start(3, 2).await;
    let alice = register(&c, "alice").await;
    let bob = register(&c, "bob").await;
    // Connection ids from a counter shared with another transport.
    let ids = Arc::new(AtomicU64::new(1_000));
    let gw = Gateway::start_with(c.seeds(), SessionConfig::default(), TcpOptions::default(), Some(ids));

    let mut a = Client::connect(gw.addr()).await;
    a.sign_in(&alice).await;
    assert_eq!(gw.router.device_conn(UserId(alice.user), DeviceId(alice.device)), Some(1_000));
    let mut first = Client::connect(gw.addr()).await;
    first.sign_in(&bob).await;
    let mut second = Client::connect(gw.addr()).await;
    second.sign_in(&bob).await;

    let p = first.next().await;
    assert_eq!(p.command, Command::Kick as i32, "got {p:?}");
    let kick = KickPush::decode(p.content).unwrap();
    assert!(
        kick.code == ErrorCode::ErrorKicked as i32 || kick.code == ErrorCode::ErrorTokenRevoked as i32,
        "kick code {}",
        kick.code
    );
    first.eof().await;

    // The second connection keeps working: heartbeats and pushes.
    let hb = second.request(Command::Heartbeat, Vec::new()).await;
    assert_eq!(hb.code, ErrorCode::Ok as i32);
    a.send_text(bob.user, "after-kick").await;
    let m = second.push(1).await.message.unwrap();
    assert_eq!(m.client_msg_id, "after-kick");
    assert_eq!(
        gw.router.device_conn(UserId(bob.user), DeviceId(bob.device)),
        Some(1_002),
        "the second connection"
    );
    assert_eq!(gw.router.user_conns(UserId(bob.user)).len(), 1);
    gw.shutdown().await;
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_connections_that_never_sign_in_get_a_small_budget() {
    let _g = serial().await;
    let gw = Gateway::start(vec![free_addr()], SessionConfig::default(), TcpOptions::default());

    // A frame above the pre-sign-in maximum is refused before it is read,
    // although it is far below the signed-in maximum.
    let mut client = Client::connect(gw.addr()).await;
    let big = rim_gateway::session::MAX_FRAME_BEFORE_SIGN_IN + 1;
    let mut wire = BytesMut::new();
    prost::encoding::encode_varint(big as u64, &mut wire);
    client.write(&wire).await;
    let p = client.next().await;
    let reply = Reply::decode(p.content).unwrap();
    assert_eq!(reply.code, ErrorCode::ErrorFrameTooLarge as i32, "{}", reply.message);
    client.eof().await;

    // Packets beyond the budget close the connection.
    let budget = SessionConfig::default().max_packets_before_sign_in;
    let mut client = Client::connect(gw.addr()).await;
    let mut wire = BytesMut::new();
    for i in 0..budget as u64 + 10 {
        let packet = Packet { request_id: i + 1, command: Command::Heartbeat as i32, ..Default::default() };
        encode_frame(&packet, &mut wire);
    }
    client.write(&wire).await;
    let mut refused = 0;
    while let Some(p) = client.read_packet(Instant::now() + WAIT).await {
        if p.request_id != 0 {
            assert_eq!(Reply::decode(p.content).unwrap().code, ErrorCode::ErrorNotSignedIn as i32);
            refused += 1;
        }
    }
    assert_eq!(refused, budget, "every packet within the budget was answered, none after it");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_a_flood_beyond_the_read_budget_is_read_to_the_end() {
    let _g = serial().await;
    let c = Cluster::start(3, 2).await;
    let alice = register(&c, "alice").await;
    let gw = Gateway::start(c.seeds(), SessionConfig::default(), TcpOptions::default());
    let mut client = Client::connect(gw.addr()).await;
    client.sign_in(&alice).await;

    // Far more than one turn's read budget in one write: edge-triggered
    // readiness reports it once, so the loop must come back for the rest.
    let n = 3 * rim_gateway::tcp::READ_BUDGET / 4096 + 7;
    let mut wire = BytesMut::new();
    for i in 0..n as u64 {
        let mut packet =
            Packet { request_id: 1_000 + i, command: Command::Heartbeat as i32, ..Default::default() };
        packet.content = vec![7u8; 4096].into();
        encode_frame(&packet, &mut wire);
    }
    let (mut reader, mut writer) = client.stream.into_split();
    let write = tokio::spawn(async move {
        writer.write_all(&wire).await.unwrap();
        writer
    });
    let mut decoder = FrameDecoder::default();
    let mut answered = 0;
    let mut buf = vec![0u8; 64 * 1024];
    let deadline = Instant::now() + WAIT;
    while answered < n {
        let left = deadline.saturating_duration_since(Instant::now());
        let read = tokio::time::timeout(left, reader.read(&mut buf)).await;
        let len = read.unwrap_or_else(|_| panic!("only {answered} of {n} heartbeats answered")).unwrap();
        assert!(len > 0, "the gateway closed after {answered} of {n} heartbeats");
        decoder.push(&buf[..len]);
        while let Some(p) = decoder.next_frame().unwrap() {
            if p.command == Command::Heartbeat as i32 {
                assert_eq!(p.request_id, 1_000 + answered as u64, "in order");
                answered += 1;
            }
        }
    }
    drop(write.await.unwrap());
    gw.shutdown().await;
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_request_before_sign_in_gets_not_signed_in() {
    let _g = serial().await;
    let gw = Gateway::start(vec![free_addr()], SessionConfig::default(), TcpOptions::default());

    let mut client = Client::connect(gw.addr()).await;
    let input = SendInput { conversation_id: 1, client_msg_id: "x".into(), ..Default::default() };
    let reply = client.request(Command::Send, input.encode_to_vec()).await;
    assert_eq!(reply.code, ErrorCode::ErrorNotSignedIn as i32, "{}", reply.message);
    // The connection stays open (docs/protocol.md).
    let reply = client.request(Command::Heartbeat, Vec::new()).await;
    assert_eq!(reply.code, ErrorCode::ErrorNotSignedIn as i32);
    assert_eq!(gw.tcp.as_ref().unwrap().connections(), 1);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_connections_beyond_the_limit_are_refused_and_timers_fire() {
    let _g = serial().await;
    let config = SessionConfig { sign_in_timeout: Duration::from_millis(300), ..SessionConfig::default() };
    let options = TcpOptions { max_connections: 2, event_loop_threads: 2, ..TcpOptions::default() };
    let gw = Gateway::start(vec![free_addr()], config, options);

    let mut one = Client::connect(gw.addr()).await;
    let mut two = Client::connect(gw.addr()).await;
    for client in [&mut one, &mut two] {
        let reply = client.request(Command::Heartbeat, Vec::new()).await;
        assert_eq!(reply.code, ErrorCode::ErrorNotSignedIn as i32);
    }
    let mut three = Client::connect(gw.addr()).await;
    three.eof().await;
    assert_eq!(gw.tcp.as_ref().unwrap().connections(), 2);

    // No sign-in within the deadline: both are closed by their timers.
    let started = Instant::now();
    one.eof().await;
    two.eof().await;
    assert!(started.elapsed() < Duration::from_secs(5));
    cluster::wait_for(WAIT, || (gw.tcp.as_ref().unwrap().connections() == 0).then_some(())).await;
    gw.shutdown().await;
}
