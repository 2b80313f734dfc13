//! The app's `before_send` hook (the "plug into an app" issue §3): an HTTP
//! endpoint of the app sees each message a user sends before it is
//! proposed and allows, rejects or modifies it; when it does not answer,
//! the node's `on_failure` policy decides (`reject` on node 1, `allow` on
//! node 2 here, so one cluster proves both), and after
//! `breaker_failures` failures in a row the breaker stops calling it
//! until a probe succeeds.
#![allow(missing_docs)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::State;
use axum::routing::post;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use rim_node::hooks::{BeforeSendConfig, OnFailure};
use rim_proto::ErrorCode;
use rim_proto::ids::UserId;
use rim_proto::v1::{ContentType, ConversationKind, GroupKind};
use rim_testkit::cluster::Cluster;
use rim_testkit::grpc::{Client, Session, code};
use rim_testkit::wait::{WAIT, eventually, serial};
use serde_json::{Value, json};

/// How long one hook call may take (short: the hanging phase waits it out
/// a few times).
const TIMEOUT_MS: u64 = 300;
/// Failures in a row that open the breaker.
const BREAKER_FAILURES: u32 = 3;

const ALLOW: u8 = 0;
const REJECT: u8 = 1;
const MODIFY: u8 = 2;
const HANG: u8 = 3;

/// The app's hook: answers by `mode`, counts calls, keeps the last request.
#[derive(Default)]
struct Hook {
    mode: AtomicU8,
    calls: AtomicUsize,
    last: std::sync::Mutex<Option<Value>>,
}

async fn answer(State(hook): State<Arc<Hook>>, Json(ask): Json<Value>) -> Json<Value> {
    hook.calls.fetch_add(1, Ordering::SeqCst);
    *hook.last.lock().unwrap() = Some(ask.clone());
    match hook.mode.load(Ordering::SeqCst) {
        ALLOW => Json(json!({"action": "allow"})),
        REJECT => Json(json!({"action": "reject", "code": 4711, "reason": "no spam, please"})),
        MODIFY => {
            let content = B64.decode(ask["content"].as_str().unwrap()).unwrap();
            let loud = String::from_utf8(content).unwrap().to_uppercase();
            Json(json!({"action": "modify", "content": B64.encode(loud)}))
        }
        _ => std::future::pending().await,
    }
}

async fn start_hook() -> (Arc<Hook>, String) {
    let hook = Arc::new(Hook::default());
    let app = axum::Router::new().route("/before_send", post(answer)).with_state(hook.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/before_send", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (hook, url)
}

async fn send(client: &Client, s: &Session, to: UserId, cmid: &str, text: &str) -> Result<(), ErrorCode> {
    client.send(s, to, cmid, text).await.map(|_| ()).map_err(|e| code(&e))
}

/// The contents of the 1:1 text messages in `s`'s list, in list order.
async fn list(client: &Client, s: &Session) -> Vec<String> {
    let all = client.sync_all_retry(s).await;
    all.iter()
        .filter(|m| {
            m.conversation_kind == ConversationKind::User as i32 && m.content_type == ContentType::Text as i32
        })
        .map(|m| String::from_utf8_lossy(&m.content).into_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hook_allows_rejects_and_modifies_and_its_failures_follow_the_policy() {
    let _g = serial().await;
    let (hook, url) = start_hook().await;
    let c = Cluster::start_with(3, 2, |cfg| {
        cfg.before_send = BeforeSendConfig {
            url: url.clone(),
            timeout_ms: TIMEOUT_MS,
            on_failure: if cfg.id == 2 { OnFailure::Allow } else { OnFailure::Reject },
            breaker_failures: BREAKER_FAILURES,
            breaker_open_ms: 1_500,
            ..BeforeSendConfig::default()
        };
    })
    .await;
    let (n1, n2) = (c.client(1), c.client(2));
    let a = n1.register_and_sign_in("hook-a").await;
    let b = n1.register_and_sign_in("hook-b").await;

    // allow: the hook sees the send as it is, and it goes through.
    send(&n1, &a, b.user, "m1", "hello").await.unwrap();
    let ask = hook.last.lock().unwrap().clone().unwrap();
    assert_eq!(ask["type"], "before_send");
    assert_eq!(ask["sender_user_id"], a.user.0);
    assert_eq!(ask["sender_device_id"], a.device.0);
    assert_eq!(ask["conversation_kind"], "user");
    assert_eq!(ask["conversation_id"], b.user.0);
    assert_eq!(ask["client_msg_id"], "m1");
    assert_eq!(B64.decode(ask["content"].as_str().unwrap()).unwrap(), b"hello");

    // A group send is shown with its kind.
    let group = n1.create_group(&a, GroupKind::Small, &[b.user]).await;
    n1.send_group(&a, rim_proto::ids::GroupId(group.group_id), "g1", "to the group").await.unwrap();
    let ask = hook.last.lock().unwrap().clone().unwrap();
    assert_eq!(ask["conversation_kind"], "group");
    assert_eq!(ask["conversation_id"], group.group_id);

    // reject: a stable code, the app's code and reason, nothing stored.
    hook.mode.store(REJECT, Ordering::SeqCst);
    let refused = n1.send(&a, b.user, "m2", "buy now").await.unwrap_err();
    assert_eq!(code(&refused), ErrorCode::ErrorRejectedByApp);
    assert!(
        refused.message().contains("4711") && refused.message().contains("no spam, please"),
        "{refused:?}"
    );

    // modify: the modified content is what is stored and delivered.
    hook.mode.store(MODIFY, Ordering::SeqCst);
    send(&n1, &a, b.user, "m3", "quiet please").await.unwrap();
    assert_eq!(list(&n1, &b).await, ["hello", "QUIET PLEASE"]);

    // The hook hangs. Node 1 (on_failure = reject) refuses each send
    // after the timeout, retryably, until the breaker opens; then it
    // refuses at once without calling.
    hook.mode.store(HANG, Ordering::SeqCst);
    let before = hook.calls.load(Ordering::SeqCst);
    for i in 0..BREAKER_FAILURES {
        let t0 = Instant::now();
        let e = send(&n1, &a, b.user, &format!("h{i}"), "into the void").await.unwrap_err();
        assert_eq!(e, ErrorCode::ErrorHookUnavailable);
        assert!(e.is_retryable());
        let took = t0.elapsed();
        assert!(took >= Duration::from_millis(TIMEOUT_MS), "refused after {took:?}, before the timeout");
        assert!(took < Duration::from_millis(TIMEOUT_MS) + WAIT, "refused after {took:?}");
    }
    assert_eq!(hook.calls.load(Ordering::SeqCst) - before, BREAKER_FAILURES as usize);
    for i in 0..5 {
        let t0 = Instant::now();
        let e = send(&n1, &a, b.user, &format!("o{i}"), "breaker open").await.unwrap_err();
        assert_eq!(e, ErrorCode::ErrorHookUnavailable);
        assert!(
            t0.elapsed() < Duration::from_millis(TIMEOUT_MS),
            "an open breaker must not wait for the hook"
        );
    }
    assert_eq!(hook.calls.load(Ordering::SeqCst) - before, BREAKER_FAILURES as usize, "open: no calls");

    // Node 2 (on_failure = allow) sends unchanged while the hook hangs.
    let b2 = n2.sign_in("hook-b").await;
    let a2 = n2.sign_in("hook-a").await;
    send(&n2, &a2, b2.user, "p1", "sent anyway").await.unwrap();
    assert_eq!(list(&n2, &b2).await, ["hello", "QUIET PLEASE", "sent anyway"]);

    // The hook answers again: after the open period a probe closes the
    // breaker and node 1 sends again.
    hook.mode.store(ALLOW, Ordering::SeqCst);
    eventually(WAIT, "node 1's breaker to close", || async {
        send(&n1, &a, b.user, "after", "back again").await.ok()
    })
    .await;
    assert_eq!(list(&n1, &b).await, ["hello", "QUIET PLEASE", "sent anyway", "back again"]);
    c.shutdown().await;
}
