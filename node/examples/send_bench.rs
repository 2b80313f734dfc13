//! 1:1 send throughput and ack latency through client gRPC on a 3-node
//! cluster (fsync on), all in one process on this machine.
//!
//! ```sh
//! cargo run -p rim-node --example send_bench -- [senders] [seconds] [users]
//! ```
//!
//! Senders write through all three nodes round-robin (two thirds of the
//! sends are forwarded to the shard leader). Prints a progress line every
//! second and a summary at the end (docs/benchmarks.md).
#![allow(missing_docs)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rim_node::{Node, NodeConfig, NodeOptions};
use rim_proto::metadata::{DEVICE_ID_METADATA_KEY, TOKEN_METADATA_KEY, USER_ID_METADATA_KEY};
use rim_proto::v1::auth_service_client::AuthServiceClient;
use rim_proto::v1::message_service_client::MessageServiceClient;
use rim_proto::v1::*;

/// A loopback address outside the kernel's ephemeral range, free now and handed
/// out once per process (see `rim_testkit`): an outgoing connection cannot take
/// it before the node binds it.
fn free_addr() -> String {
    rim_testkit::free_addr_string()
}

fn authed<T>(user: u64, device: u64, token: &str, msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.set_timeout(Duration::from_secs(10));
    r.metadata_mut().insert(USER_ID_METADATA_KEY, user.to_string().parse().unwrap());
    r.metadata_mut().insert(DEVICE_ID_METADATA_KEY, device.to_string().parse().unwrap());
    r.metadata_mut().insert(TOKEN_METADATA_KEY, token.parse().unwrap());
    r
}

fn pct(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<u64> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let senders = *args.first().unwrap_or(&64) as usize;
    let seconds = *args.get(1).unwrap_or(&10);
    let users = (*args.get(2).unwrap_or(&64) as usize).max(2);

    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir()).collect::<Result<_, _>>()?;
    let peers: std::collections::BTreeMap<u64, String> = (1..=3).map(|i| (i, free_addr())).collect();
    let mut nodes = Vec::new();
    let mut client_addrs = Vec::new();
    for id in 1..=3u64 {
        let cfg = NodeConfig {
            id,
            data: dirs[id as usize - 1].path().to_path_buf(),
            listen: peers[&id].clone(),
            client_listen: free_addr(),
            http_listen: free_addr(),
            bootstrap: true,
            peers: peers.clone(),
            shards: 4,
            cluster_secret: "bench-secret-0123456789".into(),
            ..NodeConfig::default()
        };
        client_addrs.push(cfg.client_listen.clone());
        nodes.push(Node::start(cfg, NodeOptions::default()).await?);
    }
    for n in &nodes {
        n.wait_ready(Duration::from_secs(60)).await?;
    }
    let channels: Vec<_> = client_addrs
        .iter()
        .map(|a| tonic::transport::Endpoint::from_shared(format!("http://{a}")).unwrap().connect_lazy())
        .collect();

    eprintln!("registering {users} users ...");
    let mut sessions = Vec::new();
    let mut auth = AuthServiceClient::new(channels[0].clone());
    for i in 0..users {
        let name = format!("bench{i}");
        auth.register(RegisterRequest {
            username: name.clone(),
            password: "bench-pw".into(),
            ..Default::default()
        })
        .await?;
        let r = auth
            .sign_in(SignInRequest { username: name, password: "bench-pw".into(), ..Default::default() })
            .await?
            .into_inner();
        sessions.push((r.user_id, r.device_id, r.token));
    }
    let sessions = Arc::new(sessions);
    let acked = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let end = start + Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    for s in 0..senders {
        let (sessions, acked, errors) = (sessions.clone(), acked.clone(), errors.clone());
        let mut client = MessageServiceClient::new(channels[s % 3].clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let (user, device, token) = sessions[s % sessions.len()].clone();
            let to = sessions[(s + 1) % sessions.len()].0;
            let mut n = 0u64;
            while Instant::now() < end {
                n += 1;
                let input = SendInput {
                    conversation_kind: ConversationKind::User as i32,
                    conversation_id: to,
                    client_msg_id: format!("{s}-{n}"),
                    content_type: ContentType::Text as i32,
                    content: vec![b'x'; 100].into(),
                    ..Default::default()
                };
                let t = Instant::now();
                match client.send_message(authed(user, device, &token, input)).await {
                    Ok(_) => {
                        lat.push(t.elapsed().as_micros() as u32);
                        acked.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            lat
        }));
    }
    let mut last = 0;
    while Instant::now() < end {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = acked.load(Ordering::Relaxed);
        eprintln!(
            "[{:>3.0}s] {:>7} msg/s  acked {:>8}  errors {}",
            start.elapsed().as_secs_f64(),
            now - last,
            now,
            errors.load(Ordering::Relaxed)
        );
        last = now;
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await?);
    }
    let elapsed = start.elapsed().as_secs_f64();
    all.sort_unstable();
    println!(
        "send_bench: senders={senders} users={users} secs={seconds} fsync=on nodes=3 shards=4 | {:.0} msg/s | ack p50 {:.1} ms p90 {:.1} ms p99 {:.1} ms max {:.1} ms | errors {}",
        all.len() as f64 / elapsed,
        pct(&all, 0.50),
        pct(&all, 0.90),
        pct(&all, 0.99),
        pct(&all, 1.0),
        errors.load(Ordering::Relaxed)
    );
    for n in nodes {
        n.shutdown().await;
    }
    Ok(())
}
