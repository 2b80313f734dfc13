//! The SDK over TLS: `tls://` (TCP inside TLS) and `wss://` endpoints
//! against a real gateway serving TLS (what `rim gateway --tls-cert
//! --tls-key` runs) and a real in-process 3-node cluster. Two users chat
//! both ways, with the largest messages allowed and bursts of concurrent
//! sends. (A client trusting another CA is refused: the transport's unit
//! tests and the gateway's `tests/tls.rs`.)
#![allow(missing_docs)]

mod support;

use std::collections::HashSet;

use rim_client::{Client, Endpoint};
use rim_gateway::server::{Gateway, GatewayConfig};
use rim_gateway::tcp::TcpOptions;
use rim_proto::ids::UserId;
use rim_proto::v1::ContentType;
use rim_testkit::tls::TestPki;
use support::{Cluster, Kind, SECRET, WAIT, api, cluster, config, connect, register, serial};

/// The largest content the nodes accept.
const BIG: usize = 64 * 1024;
/// Sends of one burst, issued at once.
const BURST: usize = 40;

/// A gateway serving TLS on both transports with `pki`'s certificate.
async fn tls_gateway(c: &Cluster, pki: &TestPki) -> Gateway {
    let config = GatewayConfig {
        tcp_listen: Some("127.0.0.1:0".into()),
        ws_listen: Some("127.0.0.1:0".into()),
        seeds: c.seeds(),
        cluster_secret: SECRET.into(),
        gateway_id: "gw-tls".into(),
        tls: Some(rim_cluster::tls::server_config(&pki.cert, &pki.key).unwrap()),
        tcp: TcpOptions { event_loop_threads: 1, ..TcpOptions::default() },
        ..GatewayConfig::default()
    };
    let gw = Gateway::start(config).await.unwrap();
    gw.wait_ready(WAIT).await.unwrap();
    gw
}

fn tls_endpoint(gw: &Gateway, kind: Kind) -> Endpoint {
    match kind {
        Kind::Tcp => Endpoint::tls(gw.tcp_addr().unwrap()),
        Kind::Ws => Endpoint::wss(gw.ws_addr().unwrap()),
    }
}

/// One big message, then a burst of concurrent sends, from `from` to `to`.
async fn big_and_burst(from: &Client, to: UserId, tag: &str) {
    from.send(to, ContentType::Text, tag.repeat(BIG)).await.unwrap();
    let burst = (0..BURST).map(|i| from.send(to, ContentType::Text, format!("{tag}{i}")));
    for sent in futures::future::join_all(burst).await {
        sent.unwrap();
    }
}

async fn two_users_chat_over_tls(kind: Kind) {
    let _serial = serial().await;
    let cluster = cluster().await;
    let pki = TestPki::new();
    let gw = tls_gateway(&cluster, &pki).await;
    let api = api(&cluster);
    let (_, alice) = register(&api, "alice").await;
    let (_, bob) = register(&api, "bob").await;
    let mut trusted = config(vec![tls_endpoint(&gw, kind)]);
    trusted.tls = Some(rim_cluster::tls::client_config(&pki.ca).unwrap());
    let (a, mut a_in) = connect("alice", trusted.clone(), alice.clone());
    let (b, mut b_in) = connect("bob", trusted, bob.clone());
    for inbox in [&mut a_in, &mut b_in] {
        inbox.wait_synced_after_connect(1).await;
    }

    tokio::join!(big_and_burst(&a, bob.user_id, "a"), big_and_burst(&b, alice.user_id, "b"));
    let total = 2 * (1 + BURST);
    for inbox in [&mut a_in, &mut b_in] {
        inbox.wait_messages(total).await;
        inbox.assert_in_order_once();
        let texts: HashSet<String> = inbox.texts().into_iter().collect();
        for tag in ["a", "b"] {
            assert!(texts.contains(&tag.repeat(BIG)), "{}: the big message from {tag}, intact", inbox.name);
            for i in 0..BURST {
                assert!(texts.contains(&format!("{tag}{i}")), "{}: {tag}{i}", inbox.name);
            }
        }
        assert_eq!(texts.len(), total, "{}", inbox.name);
    }

    a.close().await;
    b.close().await;
    gw.shutdown().await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_users_chat_over_tls_tcp() {
    two_users_chat_over_tls(Kind::Tcp).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_users_chat_over_wss() {
    two_users_chat_over_tls(Kind::Ws).await;
}
