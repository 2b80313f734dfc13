//! A gateway process that is SIGKILLed sends no `Offline` for its
//! connections: the shard's leader notices that its push streams stayed
//! away and reports exactly its devices offline (`rim_node::sessions`),
//! while a device on a gateway that lives on stays online. Events are read
//! by pull (`GET /events`), as an app would.

mod support;

use std::time::{Duration, Instant};

use support::*;

const EVENTS_KEY: &str = "events-key-0123456789abcdef";
/// The offline grace the cluster starts with: the gateway grace is
/// three of them, at least 5 s (`rim_node::sessions::grace`).
const GRACE_MS: i64 = 1_000;

/// `device.*` events of `user`, in log order, read from `node`'s HTTP API.
async fn device_events(c: &ProcCluster, user: u64) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    let mut after = String::new();
    loop {
        let path = format!("/events?limit=1000&after={after}");
        let auth = format!("Bearer {EVENTS_KEY}");
        let (status, body) = http_get_with(&c.nodes[&1].http, &path, &[("Authorization", &auth)])
            .await
            .unwrap_or_else(|e| panic!("GET /events: {e}"));
        assert_eq!(status, 200, "GET /events: {body}");
        let page: serde_json::Value = serde_json::from_str(&body).expect("events JSON");
        for e in page["events"].as_array().expect("events") {
            if e["type"].as_str().is_some_and(|t| t.starts_with("device."))
                && e["data"]["user_id"] == user.to_string().as_str()
            {
                out.push(e.clone());
            }
        }
        after = page["next"].as_str().unwrap_or_default().to_owned();
        if page["has_more"] != true {
            return out;
        }
    }
}

fn types(events: &[serde_json::Value]) -> Vec<&str> {
    events.iter().map(|e| e["type"].as_str().unwrap_or_default()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_devices_of_a_killed_gateway_go_offline_and_no_others() {
    let _serial = serial().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("node.toml");
    std::fs::write(
        &config,
        format!(
            "[cluster_limits]\noffline_grace_ms = {GRACE_MS}\n\n[[api_keys]]\nname = \"events\"\n\
             sha256 = \"{}\"\nscopes = [\"events\"]\n",
            rim_node::credentials::api_key_digest(EVENTS_KEY)
        ),
    )
    .expect("write config");
    let c = ProcCluster::start_with(3, 2, &["--config", config.to_str().unwrap()]).await;
    let api = c.client(1);
    let doomed = api.register_and_sign_in("crash_a").await;
    let survivor = api.register_and_sign_in("crash_b").await;

    let mut dying = GatewayProc::start("gw-dying", &c.internal_addrs()).await;
    let living = GatewayProc::start("gw-living", &c.internal_addrs()).await;
    let (_a, _) = Conn::sign_in(&dying.tcp, &doomed).await;
    let (_b, _) = Conn::sign_in(&living.tcp, &survivor).await;
    for s in [&doomed, &survivor] {
        eventually(Duration::from_secs(30), "device.online", || async {
            (types(&device_events(&c, s.user.0).await) == ["device.online"]).then_some(())
        })
        .await;
    }

    let killed = Instant::now();
    dying.kill();
    let events =
        eventually(Duration::from_secs(60), "device.offline of the killed gateway's device", || async {
            let e = device_events(&c, doomed.user.0).await;
            (e.len() >= 2).then_some(e)
        })
        .await;
    assert_eq!(types(&events), ["device.online", "device.offline"], "{events:?}");
    let data = &events[1]["data"];
    assert_eq!(data["device_id"], doomed.device.0.to_string().as_str());
    assert_eq!(data["session_epoch"], 1);
    // Not before the gateway grace (5 s here) ran out: a gateway whose
    // streams break for a moment is not gone.
    assert!(killed.elapsed() >= Duration::from_secs(5), "offline after {:?}", killed.elapsed());

    // The device on the living gateway, checked by the same leaders over
    // the same time, is still online.
    assert_eq!(types(&device_events(&c, survivor.user.0).await), ["device.online"]);
    assert_eq!(types(&device_events(&c, doomed.user.0).await).len(), 2, "reported once");
    drop(living);
}
