//! Revocation reaches live connections (the hostile-clients issue §3): a
//! device revoked elsewhere is disconnected from the gateway within a
//! bounded time, live (the shard leader's push stream carries the kick) and
//! across a leader change (the kick may be lost with the stream; the gap
//! sync after the reconnect carries the device's token version, which the
//! node refuses). Prints the p50/p99 time from the revocation's
//! acknowledgement to the client's `KICK`.
#![allow(missing_docs)]

use std::time::{Duration, Instant};

use prost::Message as _;
use rim_proto::ErrorCode;
use rim_proto::ids::ShardId;
use rim_proto::v1::auth_service_client::AuthServiceClient;
use rim_proto::v1::*;
use rim_testkit::cluster::Cluster;
use rim_testkit::grpc::{Client, PASSWORD, Session, code};
use rim_testkit::wait::{WAIT, retry, serial};

mod cluster;
mod wire;
use wire::Client as TcpClient;

/// Devices revoked per phase.
const DEVICES: usize = 6;

/// A signed-in TCP connection of `s`.
async fn connect(addr: std::net::SocketAddr, s: &Session) -> TcpClient {
    let mut client = TcpClient::connect(addr).await;
    client.sign_in_as(s.user.0, s.device.0, &s.token).await;
    client
}

/// Waits for the connection's `KICK` with `ERROR_TOKEN_REVOKED`, then its
/// end; returns when the kick arrived.
async fn kicked(mut client: TcpClient) -> Instant {
    let mut at = None;
    while let Some(p) = client.read_packet(Instant::now() + WAIT).await {
        if p.command == Command::Kick as i32 {
            let kick = KickPush::decode(p.content).unwrap();
            assert_eq!(kick.code, ErrorCode::ErrorTokenRevoked as i32, "{kick:?}");
            at.get_or_insert_with(Instant::now);
        }
    }
    at.expect("the connection ended without a KICK")
}

async fn revoke(client: &Client, by: &Session, victim: &Session) -> Instant {
    let what = format!("revoke device {}", victim.device);
    retry(WAIT, &what, || {
        let mut auth = AuthServiceClient::new(client.channel.clone());
        let req = Client::authed(by, RevokeDeviceRequest { device_id: victim.device.0 });
        async move { auth.revoke_device(req).await }
    })
    .await;
    Instant::now()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_devices_are_disconnected_live_and_across_a_leader_change() {
    let _g = serial().await;
    let mut c = Cluster::start(3, 1).await;
    let client = c.client(1);
    let owner = client.register_and_sign_in("rv_owner").await;
    // More devices of one account than its sign-in rate allows at once:
    // registered from the signed-in one.
    let mut devices = Vec::new();
    let mut auth = AuthServiceClient::new(client.channel.clone());
    for _ in 0..2 * DEVICES {
        let req = Client::authed(&owner, RegisterDeviceRequest::default());
        let r = auth.register_device(req).await.unwrap().into_inner();
        devices.push(Session {
            user: owner.user,
            device: rim_proto::ids::DeviceId(r.device_id),
            token: r.token,
        });
    }
    let gw = c.gateway("gw-revocation").await;
    let addr = gw.tcp_addr().unwrap();
    let mut lags = Vec::new();

    // Live: the leader's stream carries each kick.
    for victim in &devices[..DEVICES] {
        let kick = tokio::spawn(kicked(connect(addr, victim).await));
        let acked = revoke(&client, &owner, victim).await;
        lags.push(kick.await.unwrap().saturating_duration_since(acked));
    }

    // Across a leader change: the connections' stream breaks with the
    // leader; revocations commit while the gateway looks for the new one.
    let mut open = Vec::new();
    for victim in &devices[DEVICES..] {
        open.push(tokio::spawn(kicked(connect(addr, victim).await)));
    }
    let leader = c.leader(ShardId(1)).await;
    c.stop_node(leader).await;
    let survivor = c.client(if leader == 1 { 2 } else { 1 });
    let mut acks = Vec::new();
    for victim in &devices[DEVICES..] {
        acks.push(revoke(&survivor, &owner, victim).await);
    }
    for (kick, acked) in open.into_iter().zip(acks) {
        lags.push(kick.await.unwrap().saturating_duration_since(acked));
    }

    lags.sort();
    let (p50, p99) = (percentile(&lags, 0.5), percentile(&lags, 0.99));
    println!("revocation to KICK over {} devices: p50 {p50:?}, p99 {p99:?}", lags.len());
    assert!(p99 < WAIT, "p99 {p99:?}");
    // The revoked tokens are dead for good.
    let again = retry(WAIT, "sign in", || {
        let mut auth = AuthServiceClient::new(survivor.channel.clone());
        let req =
            SignInRequest { username: "rv_owner".into(), password: PASSWORD.into(), ..Default::default() };
        async move { auth.sign_in(req).await }
    })
    .await;
    assert!(!again.into_inner().token.is_empty(), "the account itself still signs in");
    let dead = &devices[0];
    let mut users = rim_proto::v1::user_service_client::UserServiceClient::new(survivor.channel.clone());
    let e = users.get_user(Client::authed(dead, GetUserRequest { user_id: 0 })).await.unwrap_err();
    assert_eq!(code(&e), ErrorCode::ErrorTokenRevoked);
    gw.shutdown().await;
    c.shutdown().await;
}
