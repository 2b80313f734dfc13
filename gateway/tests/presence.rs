//! Sessions and push checks end to end (issue 15 §3): real connections
//! through a gateway produce `device.online` / `device.offline` in the
//! replicated event log, a reconnect within the grace produces neither,
//! and `push.needed` names exactly the devices that did not acknowledge a
//! received message in time, whether or not they are connected.
#![allow(missing_docs)]

use prost::Message as _;
use rim_proto::ids::{ShardId, UserId};
use rim_proto::v1::{AckInput, Command, ErrorCode};
use rim_testkit::wait::WAIT;

mod cluster;
mod wire;
use cluster::*;
use wire::Client as TcpClient;

const GRACE_MS: i64 = 5_000;
const PUSH_AFTER_MS: i64 = 5_000;

async fn start() -> Cluster {
    Cluster::start_with(3, 1, |cfg| {
        cfg.cluster_limits.offline_grace_ms = GRACE_MS;
        cfg.cluster_limits.push_needed_after_ms = PUSH_AFTER_MS;
    })
    .await
}

/// Bodies of the events of type `t` about `user`, as the shard's leader
/// has applied them.
async fn events(c: &Cluster, user: u64, t: &str) -> Vec<serde_json::Value> {
    let shard: ShardId = c.shard_of_user(UserId(user));
    let leader = c.leader(shard).await;
    let reader = &c.node(leader).core.group(shard).unwrap().reader;
    let user = user.to_string();
    reader
        .events_after(None, 10_000, usize::MAX)
        .unwrap()
        .events
        .iter()
        .filter(|e| e.r#type == t)
        .map(|e| serde_json::from_slice::<serde_json::Value>(&e.body).unwrap())
        .filter(|j| j["data"]["user_id"] == user.as_str())
        .collect()
}

/// Waits until there are `n` events of type `t` about `user`; returns them.
async fn wait_events(c: &Cluster, user: u64, t: &str, n: usize) -> Vec<serde_json::Value> {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let got = events(c, user, t).await;
        if got.len() >= n {
            return got;
        }
        assert!(std::time::Instant::now() < deadline, "{n} {t} events of user {user}, got {got:?}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

async fn connect(gw: std::net::SocketAddr, d: &Device) -> TcpClient {
    let mut client = TcpClient::connect(gw).await;
    client.sign_in(d).await;
    client
}

async fn ack(client: &mut TcpClient, seq: u64) {
    let reply = client.request(Command::Ack, AckInput { seq }.encode_to_vec()).await;
    assert_eq!(reply.code, ErrorCode::Ok as i32, "ack {seq}: {}", reply.message);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_go_online_and_offline_and_a_quick_reconnect_is_neither() {
    let _g = serial().await;
    let c = start().await;
    let gw = c.gateway("gw-presence").await;
    let addr = gw.tcp_addr().unwrap();
    let a = register(&c, "pr_a").await;

    let first = connect(addr, &a).await;
    let online = wait_events(&c, a.user, "device.online", 1).await;
    assert_eq!(online[0]["data"]["device_id"], a.device.to_string());
    assert_eq!(online[0]["data"]["session_epoch"], 1);

    // Closed and back at once (well within the grace): one presence.
    drop(first);
    let second = connect(addr, &a).await;
    // Closed for good: offline after the grace, naming the second session.
    drop(second);
    let offline = wait_events(&c, a.user, "device.offline", 1).await;
    assert_eq!(offline.len(), 1, "the quick reconnect was no offline: {offline:?}");
    assert_eq!(offline[0]["data"]["session_epoch"], 2);
    let since = offline[0]["data"]["offline_since_ms"].as_i64().unwrap();
    let at = chrono_ms(offline[0]["timestamp"].as_str().unwrap());
    assert!(at - since >= GRACE_MS, "offline only after the grace: {} ms", at - since);
    assert_eq!(events(&c, a.user, "device.online").await.len(), 1);

    // A new session after the offline is a new presence.
    let _third = connect(addr, &a).await;
    let online = wait_events(&c, a.user, "device.online", 2).await;
    assert_eq!(online[1]["data"]["session_epoch"], 3);
    gw.shutdown().await;
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_needed_names_only_the_devices_that_did_not_acknowledge() {
    let _g = serial().await;
    let c = start().await;
    let gw = c.gateway("gw-push").await;
    let addr = gw.tcp_addr().unwrap();
    let a1 = register(&c, "pn_a").await;
    // A second device of the same user, signed in once and never connected.
    let a2 = new_device(&c, "pn_a").await;
    assert_ne!(a1.device, a2.device);
    let b = register(&c, "pn_b").await;

    let mut phone = connect(addr, &a1).await;
    let mut sender = connect(addr, &b).await;
    sender.send_text(a1.user, "m1").await;
    sender.send_text(a1.user, "m2").await;
    // The connected device acknowledges what it got.
    let pushed = phone.push(2).await;
    ack(&mut phone, pushed.message.unwrap().seq).await;

    let push = wait_events(&c, a1.user, "push.needed", 1).await;
    assert_eq!(push.len(), 1, "{push:?}");
    let d = &push[0]["data"];
    assert_eq!(d["device_id"], a2.device.to_string(), "only the device that did not acknowledge");
    assert_eq!((d["from_seq"].as_u64(), d["to_seq"].as_u64()), (Some(1), Some(2)));
    assert_eq!(d["online"], false);
    assert_eq!(d["last_sender_user_id"], b.user.to_string());

    // The other way round: the connected device falls behind, the other
    // one catches up in time. The same check reports the first only.
    let mut tablet = connect(addr, &a2).await;
    sender.send_text(a1.user, "m3").await;
    let pushed = tablet.push(3).await;
    ack(&mut tablet, pushed.message.unwrap().seq).await;
    let push = wait_events(&c, a1.user, "push.needed", 2).await;
    assert_eq!(push.len(), 2, "{push:?}");
    let d = &push[1]["data"];
    assert_eq!(d["device_id"], a1.device.to_string());
    assert_eq!(d["online"], true, "connected, yet behind: a push is needed");
    assert_eq!((d["from_seq"].as_u64(), d["to_seq"].as_u64()), (Some(3), Some(3)));
    gw.shutdown().await;
    c.shutdown().await;
}

/// Unix ms of an event's RFC 3339 UTC `timestamp` (`YYYY-MM-DDTHH:MM:SS.mmmZ`).
fn chrono_ms(t: &str) -> i64 {
    let n = |r: std::ops::Range<usize>| t[r].parse::<i64>().unwrap();
    let (y, m, d) = (n(0..4), n(5..7), n(8..10));
    // Days from civil (Howard Hinnant).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    ((days * 24 + n(11..13)) * 60 + n(14..16)) * 60_000 + n(17..19) * 1000 + n(20..23)
}
