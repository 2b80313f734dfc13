//! Sends are batched towards the nodes (`SendBatch`) without changing what
//! clients see: many connections sending at once each get every ack once
//! with the right seq and every message of their list once, in order, and
//! the gateway's `/metrics` shows sends sharing RPCs. A node that predates
//! `SendBatch` is sent unary `Send`s instead.
#![allow(missing_docs)]

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::Stream;
use rim_gateway::upstream::{Upstream, UpstreamOptions};
use rim_gateway::{Call, CallId, Gateway, GatewayConfig, NodeCall, NodeReply};
use rim_proto::ErrorCode;
use rim_proto::ids::{DeviceId, UserId};
use rim_proto::v1::gateway_service_server::{GatewayService, GatewayServiceServer};
use rim_proto::v1::*;
use tonic::{Request, Response, Status, Streaming};

mod cluster;
mod e2e;
use cluster::{Cluster, Device, SECRET, register, serial};
use e2e::{Client, Kind, WAIT, consecutive};

/// Connections sending at once, and messages each sends.
const CONNS: usize = 50;
const PER_CONN: usize = 20;

/// Connects on `kind` and signs `d` in, retrying retryable refusals.
async fn signed_in(gw: &Gateway, kind: Kind, d: &Device) -> Client {
    let addr = match kind {
        Kind::Tcp => gw.tcp_addr(),
        Kind::Ws => gw.ws_addr(),
    }
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut client = Client::connect(kind, addr, None).await;
        let reply = client.sign_in(d).await;
        if reply.code == ErrorCode::Ok as i32 {
            return client;
        }
        let code = ErrorCode::try_from(reply.code).unwrap();
        assert!(code.is_retryable(), "sign-in: {code:?} {}", reply.message);
        assert!(Instant::now() < deadline, "sign-in kept failing: {code:?} {}", reply.message);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The value of counter `name` in the gateway's `/metrics`.
async fn metric(gw: &Gateway, name: &str) -> u64 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = gw.http_addr().unwrap();
    let mut s = tokio::time::timeout(WAIT, tokio::net::TcpStream::connect(addr)).await.unwrap().unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n").await.unwrap();
    let mut body = String::new();
    tokio::time::timeout(WAIT, s.read_to_string(&mut body)).await.unwrap().unwrap();
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or_else(|| panic!("{name} not in /metrics:\n{body}"))
}

fn cmid(conn: usize, i: usize) -> String {
    format!("c{conn}-m{i}")
}

/// 50 connections (half TCP, half WebSocket) each send 20 messages, one
/// after the other, all connections at once; connection `i` writes to the
/// user of connection `i + 1`. Every list then holds the 20 sends of its
/// user and the 20 it received, each once: every connection gets pushes of
/// seqs 1 to 40 exactly once and in order, its own sends under the seqs it
/// was acknowledged with and in the order it sent them, its sender's in
/// that sender's order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_sends_are_batched_and_each_acked_and_delivered_once_in_order() {
    let _g = serial().await;
    let c = Cluster::start(3, 2).await;
    let names: Vec<String> = (0..CONNS).map(|i| format!("batch{i}")).collect();
    let devices: Vec<Device> = futures::future::join_all(names.iter().map(|n| register(&c, n))).await;
    let config = GatewayConfig {
        tcp_listen: Some("127.0.0.1:0".into()),
        ws_listen: Some("127.0.0.1:0".into()),
        http_listen: Some("127.0.0.1:0".into()),
        seeds: c.seeds(),
        cluster_secret: SECRET.into(),
        gateway_id: "gw-batch-test".into(),
        request_timeout: Duration::from_secs(10),
        ..GatewayConfig::default()
    };
    let gw = Gateway::start(config).await.unwrap();
    gw.wait_ready(WAIT).await.unwrap();
    let mut clients = Vec::new();
    for (i, d) in devices.iter().enumerate() {
        let kind = if i % 2 == 0 { Kind::Tcp } else { Kind::Ws };
        clients.push(signed_in(&gw, kind, d).await);
    }
    assert_eq!(metric(&gw, "rim_gateway_send_batch_items_total").await, 0);

    // All connections send at once, each waiting for its acks in turn.
    let tasks: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(i, mut client)| {
            let to = devices[(i + 1) % CONNS].user;
            tokio::spawn(async move {
                let mut acks = Vec::new();
                for m in 0..PER_CONN {
                    acks.push(client.send_text(to, &cmid(i, m)).await.seq);
                }
                (client, acks)
            })
        })
        .collect();
    let mut done = Vec::new();
    for t in tasks {
        done.push(tokio::time::timeout(Duration::from_secs(120), t).await.expect("sends finished").unwrap());
    }

    let total = (2 * PER_CONN) as u64;
    for (i, (client, acks)) in done.iter_mut().enumerate() {
        let mut sorted = acks.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), PER_CONN, "conn {i}: distinct seqs {acks:?}");
        assert!(acks.windows(2).all(|w| w[0] < w[1]), "conn {i}: acks in send order {acks:?}");
        assert!(acks.iter().all(|s| (1..=total).contains(s)), "conn {i}: {acks:?}");

        let pushed = client.pushes_through(total).await;
        let cmids = consecutive(&pushed, 1); // seqs 1..=40, each once, in order
        let at: HashMap<&str, u64> = pushed.iter().map(|m| (m.client_msg_id.as_str(), m.seq)).collect();
        let own: Vec<String> = (0..PER_CONN).map(|m| cmid(i, m)).collect();
        for (m, id) in own.iter().enumerate() {
            assert_eq!(at.get(id.as_str()), Some(&acks[m]), "conn {i}: {id} pushed under its ack's seq");
        }
        let from = (i + CONNS - 1) % CONNS;
        let received: Vec<&String> = cmids.iter().filter(|c| c.starts_with(&format!("c{from}-"))).collect();
        let want: Vec<String> = (0..PER_CONN).map(|m| cmid(from, m)).collect();
        assert_eq!(received, want.iter().collect::<Vec<_>>(), "conn {i}: its sender's messages, in order");
        assert_eq!(cmids.len(), own.len() + want.len(), "conn {i}: nothing else");
        // A round trip after the last push: no duplicate push, no extra reply.
        assert_eq!(client.heartbeat().await.code, ErrorCode::Ok as i32);
        assert!(client.unread_pushes().is_empty(), "conn {i}: {:?}", client.unread_pushes());
    }

    let batches = metric(&gw, "rim_gateway_send_batches_total").await;
    let items = metric(&gw, "rim_gateway_send_batch_items_total").await;
    eprintln!("{batches} SendBatch RPCs carried {items} sends");
    assert!(items >= (CONNS * PER_CONN) as u64, "every send went in a batch: {items}");
    assert!(batches < items, "sends shared RPCs: {batches} batches for {items} sends");
    assert_eq!(metric(&gw, "rim_gateway_send_unbatched_total").await, 0);
    drop(done);
    gw.shutdown().await;
    c.shutdown().await;
}

/// A node that predates `SendBatch`: it answers `Send` only.
#[derive(Default)]
struct Counts {
    sends: AtomicU64,
    batches: AtomicU64,
}

#[derive(Clone, Default)]
struct OldNode(Arc<Counts>);

type EventStream = Pin<Box<dyn Stream<Item = Result<SubscribeEvent, Status>> + Send>>;

#[tonic::async_trait]
impl GatewayService for OldNode {
    async fn conn_sign_in(&self, _: Request<ConnSignInRequest>) -> Result<Response<ConnSignInReply>, Status> {
        Err(Status::unimplemented("test node"))
    }
    async fn sync(&self, _: Request<ConnSyncRequest>) -> Result<Response<SyncOutput>, Status> {
        Err(Status::unimplemented("test node"))
    }
    async fn sync_group(
        &self,
        _: Request<ConnSyncGroupRequest>,
    ) -> Result<Response<SyncGroupOutput>, Status> {
        Err(Status::unimplemented("test node"))
    }
    async fn ack(&self, _: Request<ConnAckRequest>) -> Result<Response<AckOutput>, Status> {
        Err(Status::unimplemented("test node"))
    }
    async fn send(&self, req: Request<ConnSendRequest>) -> Result<Response<SendOutput>, Status> {
        let n = self.0.sends.fetch_add(1, Ordering::SeqCst) + 1;
        let input = req.into_inner().input.unwrap_or_default();
        Ok(Response::new(SendOutput { seq: n, message_id: input.content.len() as u64, ..Default::default() }))
    }
    async fn send_batch(
        &self,
        _: Request<ConnSendBatchRequest>,
    ) -> Result<Response<ConnSendBatchReply>, Status> {
        // What tonic answers for a method the server does not have.
        self.0.batches.fetch_add(1, Ordering::SeqCst);
        Err(Status::unimplemented("unknown method SendBatch"))
    }
    async fn recall(&self, _: Request<ConnRecallRequest>) -> Result<Response<SendOutput>, Status> {
        Err(Status::unimplemented("test node"))
    }
    async fn mark_read(&self, _: Request<ConnReadRequest>) -> Result<Response<ReadOutput>, Status> {
        Err(Status::unimplemented("test node"))
    }
    async fn logout(&self, _: Request<ConnLogoutRequest>) -> Result<Response<ConnLogoutReply>, Status> {
        Err(Status::unimplemented("test node"))
    }
    async fn offline(&self, _: Request<ConnOfflineRequest>) -> Result<Response<ConnOfflineReply>, Status> {
        Err(Status::unimplemented("test node"))
    }
    type SubscribeStream = EventStream;
    async fn subscribe(
        &self,
        _: Request<Streaming<SubscribeRequest>>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        Err(Status::unimplemented("test node"))
    }
}

/// Sends through an upstream whose only node answers `UNIMPLEMENTED` to
/// `SendBatch`: every send is answered (by the unary `Send`), once; after
/// the first refusal sends go unary without trying a batch again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_without_send_batch_gets_unary_sends() {
    let node = OldNode::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(GatewayServiceServer::new(node.clone()))
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                async move {
                    let _ = stopped.await;
                },
            ),
    );
    let mut opts = UpstreamOptions::new(vec![addr], SECRET, "gw-old-node-test");
    opts.request_timeout = Duration::from_secs(5);
    let up = Upstream::new(opts).unwrap();
    let send = |i: usize| {
        let up = up.clone();
        async move {
            let input = SendInput {
                conversation_kind: ConversationKind::User as i32,
                conversation_id: 2,
                client_msg_id: format!("m{i}"),
                content: vec![b'x'; i].into(),
                ..Default::default()
            };
            let call = Call {
                id: CallId(1),
                conn_id: i as u64,
                user_id: UserId(1),
                device_id: DeviceId(1),
                token_version: None,
                request: NodeCall::Send { input, group: false },
            };
            match up.call(&call).await {
                Ok(NodeReply::Send(o)) => o,
                other => panic!("send {i}: {other:?}"),
            }
        }
    };

    let first: Vec<SendOutput> = futures::future::join_all((0..20).map(send)).await;
    for (i, o) in first.iter().enumerate() {
        assert_eq!(o.message_id, i as u64, "send {i} got its own answer");
    }
    let batches = node.0.batches.load(Ordering::SeqCst);
    assert!(batches >= 1, "a batch was tried first");
    let more: Vec<SendOutput> = futures::future::join_all((20..30).map(send)).await;
    assert!(more.iter().enumerate().all(|(k, o)| o.message_id == 20 + k as u64));
    assert_eq!(node.0.batches.load(Ordering::SeqCst), batches, "no batch after the refusal");
    assert_eq!(node.0.sends.load(Ordering::SeqCst), 30, "each send served once");
    let mut seqs: Vec<u64> = first.iter().chain(&more).map(|o| o.seq).collect();
    seqs.sort_unstable();
    assert_eq!(seqs, (1..=30).collect::<Vec<_>>());
    let stats = up.send_batch_stats();
    assert_eq!(stats.unbatched, 30, "{stats:?}");
    let _ = stop.send(());
    tokio::time::timeout(WAIT, server).await.unwrap().unwrap().unwrap();
}
