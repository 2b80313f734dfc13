//! The example receiver of docs/integration.md
//! (`docs/examples/webhook_receiver.py`) works against a real cluster: it
//! verifies rim's signatures with the second of two secrets (a rotation),
//! handles each event once, and records a 1:1 message's `message.created`.
//! Needs `python3` (standard library only).
#![allow(missing_docs)]

use std::process::{Child, Command, Stdio};

use rim_node::webhooks::WebhookConfig;
use rim_testkit::cluster::Cluster;
use rim_testkit::wait::{WAIT, serial, wait_for};

const SECRET_NEW: &str = "whsec_bmV3LXNlY3JldC1vZi10aGUtZXhhbXBsZS0xMjM0NTY=";
const SECRET_OLD: &str = "whsec_b2xkLXNlY3JldC1vZi10aGUtZXhhbXBsZS0xMjM0NTY=";

/// The receiver process, killed when dropped.
struct Receiver(Child);

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_receiver_verifies_and_records_events() {
    let _g = serial().await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("events.jsonl");
    let addr = rim_testkit::free_addr_string();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/examples/webhook_receiver.py");
    // The receiver knows only the old secret: rim signs with the new one and
    // lists both, as during a rotation.
    let _receiver = Receiver(
        Command::new("python3")
            .arg(script)
            .arg(&addr)
            .env("RIM_WEBHOOK_SECRETS", SECRET_OLD)
            .env("RIM_WEBHOOK_OUT", &out)
            .stdout(Stdio::null())
            .spawn()
            .expect("python3 runs the example receiver"),
    );
    let url = format!("http://{addr}/rim");
    let c = Cluster::start_with(3, 2, |cfg| {
        cfg.webhooks = vec![WebhookConfig {
            name: "app".into(),
            url: url.clone(),
            secrets: vec![SECRET_NEW.into(), SECRET_OLD.into()],
            types: Vec::new(),
            timeout_ms: 2_000,
            ca: None,
            max_in_flight: rim_node::webhooks::DEFAULT_MAX_IN_FLIGHT,
        }];
    })
    .await;
    let client = c.client(1);
    let a = client.register_and_sign_in("example-a").await;
    let b = client.register_and_sign_in("example-b").await;
    let sent = client.send_acked(&a, b.user, "ex-1", "hello app").await;

    let events = wait_for(WAIT, "the receiver to record the message", || {
        let text = std::fs::read_to_string(&out).ok()?;
        let events: Vec<serde_json::Value> =
            text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
        events.iter().any(|e| e["type"] == "message.created").then_some(events)
    })
    .await;
    let created: Vec<&serde_json::Value> = events.iter().filter(|e| e["type"] == "message.created").collect();
    assert_eq!(created.len(), 1, "handled once: {events:?}");
    let data = &created[0]["data"];
    assert_eq!(data["message_id"], sent.message_id.to_string());
    assert_eq!(data["sender_user_id"], a.user.0.to_string());
    assert_eq!(data["recipient_user_id"], b.user.0.to_string());
    assert_eq!(data["client_msg_id"], "ex-1");
    c.shutdown().await;
}
