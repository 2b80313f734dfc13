//! WebSocket limits against hostile clients (the hostile-clients issue §1):
//! a connection cap like TCP's, and a small message budget before sign-in,
//! checked before any JSON is parsed. No cluster is needed: both act
//! before a session calls a node.
#![allow(missing_docs)]

use std::time::{Duration, Instant};

use futures::{SinkExt as _, StreamExt as _};
use prost::Message as _;
use rim_gateway::SessionConfig;
use rim_gateway::router::{PushRouter, RouterOptions};
use rim_gateway::upstream::{Upstream, UpstreamOptions};
use rim_gateway::ws::{MAX_MESSAGE_BEFORE_SIGN_IN, WsGateway};
use rim_proto::ErrorCode;
use rim_proto::v1::{Packet, Reply};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Client = WebSocketStream<MaybeTlsStream<TcpStream>>;
const DEADLINE: Duration = Duration::from_secs(20);

/// A WebSocket gateway serving at most `max` connections, with nodes it
/// never reaches; and the sender that stops it.
async fn gateway(max: usize) -> (String, oneshot::Sender<()>) {
    // Nothing listens on port 1: the tests never get as far as a node call.
    let opts = UpstreamOptions::new(vec!["127.0.0.1:1".into()], rim_testkit::grpc::SECRET, "gw-ws-limits");
    let up = Upstream::new(opts).unwrap();
    let router = PushRouter::new(
        up.clone(),
        RouterOptions { subscribe_timeout: Duration::from_secs(3), request_queue: 16 },
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (stop, stopped) = oneshot::channel::<()>();
    let ws = WsGateway::new(up, router, SessionConfig::default()).with_max_connections(max);
    tokio::spawn(ws.serve(listener, async move {
        let _ = stopped.await;
    }));
    (addr, stop)
}

async fn connect(addr: &str) -> Result<Client, String> {
    let url = format!("ws://{addr}/ws");
    match tokio::time::timeout(DEADLINE, tokio_tungstenite::connect_async(url)).await {
        Ok(Ok((ws, _))) => Ok(ws),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => panic!("no handshake answer within {DEADLINE:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_limit_are_refused_until_one_closes() {
    let (addr, _stop) = gateway(2).await;
    let first = connect(&addr).await.expect("first connection");
    let _second = connect(&addr).await.expect("second connection");
    let third = connect(&addr).await;
    assert!(third.is_err(), "a third connection was served");
    drop(first);
    // The slot frees once the closed connection's task ended.
    let deadline = Instant::now() + DEADLINE;
    loop {
        if connect(&addr).await.is_ok() {
            break;
        }
        assert!(Instant::now() < deadline, "no connection accepted after one closed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(rim_gateway::ws::refused_total() >= 1);
}

/// Reads until the gateway closes the connection; returns the error replies.
async fn replies_until_closed(ws: &mut Client) -> Vec<Reply> {
    let mut replies = Vec::new();
    let deadline = Instant::now() + DEADLINE;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, ws.next()).await {
            Ok(Some(Ok(WsMessage::Binary(data)))) => {
                let packet = Packet::decode(data).unwrap();
                replies.push(Reply::decode(packet.content).unwrap());
            }
            Ok(Some(Ok(WsMessage::Close(_)) | Err(_)) | None) => return replies,
            Ok(Some(Ok(_))) => {}
            Err(_) => panic!("the connection stayed open; replies so far: {replies:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_message_before_sign_in_closes_the_connection_unparsed() {
    let (addr, _stop) = gateway(10).await;
    for message in [
        WsMessage::Text("{".repeat(MAX_MESSAGE_BEFORE_SIGN_IN + 1).into()),
        WsMessage::Binary(vec![0u8; MAX_MESSAGE_BEFORE_SIGN_IN + 1].into()),
    ] {
        let mut ws = connect(&addr).await.unwrap();
        ws.send(message).await.unwrap();
        let replies = replies_until_closed(&mut ws).await;
        let codes: Vec<i32> = replies.iter().map(|r| r.code).collect();
        assert_eq!(codes, [ErrorCode::ErrorFrameTooLarge as i32], "{replies:?}");
    }
}
