//! Events through webhooks and `GET /events` (issue 15 §3), against a
//! receiver in the test that records every request and can be told to fail.
//!
//! What is checked: every message produces exactly one `message.created`
//! (arriving at least once, every copy with the same id and bytes), in the
//! order of the conversation; signatures verify with each of two secrets
//! (verifier written from the Standard Webhooks spec here, not the node's
//! signer); failures are retried with identical bodies; a new leader resumes
//! from the committed cursor; expired events become dead letters; the pull
//! API pages through the same bytes and refuses keys without `events`.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use axum::http::{HeaderMap, StatusCode};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use rim_node::NodeConfig;
use rim_node::credentials::{ApiKeyConfig, api_key_digest};
use rim_node::webhooks::WebhookConfig;
use rim_proto::ids::{GroupId, ShardId};
use rim_proto::v1::GroupKind;
use rim_testkit::cluster::{Cluster, users_on_two_shards};
use rim_testkit::grpc::{Client, Session};
use rim_testkit::wait::{WAIT, eventually, serial, wait_for};
use sha2::Sha256;

const SHARDS: u32 = 2;
const SECRET_OLD: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const SECRET_NEW: &str = "whsec_c2VjcmV0LW9mLXRoZS1uZXctcm90YXRpb24=";
const EVENTS_KEY: &str = "key-with-the-events-scope";
const PUSH_KEY: &str = "key-with-the-push-scope";

/// One request the receiver got.
#[derive(Clone, Debug)]
struct Got {
    id: String,
    timestamp: String,
    signature: String,
    body: Vec<u8>,
    /// Whether the receiver answered 2xx.
    accepted: bool,
}

#[derive(Default)]
struct Receiver {
    got: Mutex<Vec<Got>>,
    failing: AtomicBool,
}

impl Receiver {
    fn got(&self) -> Vec<Got> {
        self.got.lock().unwrap().clone()
    }

    /// `message_id` → every accepted copy of its `message.created`.
    fn created(&self) -> BTreeMap<u64, Vec<Got>> {
        let mut out: BTreeMap<u64, Vec<Got>> = BTreeMap::new();
        for g in self.got().into_iter().filter(|g| g.accepted) {
            let j: serde_json::Value = serde_json::from_slice(&g.body).unwrap();
            if j["type"] == "message.created" {
                out.entry(j["data"]["message_id"].as_str().unwrap().parse().unwrap()).or_default().push(g);
            }
        }
        out
    }
}

/// Serves the receiver on a free port; its URL.
async fn receiver() -> (Arc<Receiver>, String) {
    let r = Arc::new(Receiver::default());
    let state = r.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |headers: HeaderMap, body: axum::body::Bytes| {
            let r = state.clone();
            async move {
                let h = |n: &str| headers.get(n).map(|v| v.to_str().unwrap().to_string()).unwrap_or_default();
                let accepted = !r.failing.load(Ordering::SeqCst);
                r.got.lock().unwrap().push(Got {
                    id: h("webhook-id"),
                    timestamp: h("webhook-timestamp"),
                    signature: h("webhook-signature"),
                    body: body.to_vec(),
                    accepted,
                });
                if accepted { StatusCode::NO_CONTENT } else { StatusCode::INTERNAL_SERVER_ERROR }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (r, url)
}

/// Standard Webhooks verification with one `whsec_` secret: some `v1,`
/// signature of the header is the HMAC-SHA256 of `id.timestamp.body`.
fn verifies(secret: &str, g: &Got) -> bool {
    let key = STANDARD.decode(secret.strip_prefix("whsec_").unwrap()).unwrap();
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).unwrap();
    mac.update(format!("{}.{}.", g.id, g.timestamp).as_bytes());
    mac.update(&g.body);
    let expected = format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()));
    g.signature.split(' ').any(|s| s == expected)
}

fn webhook(url: &str) -> WebhookConfig {
    WebhookConfig {
        name: "backend".into(),
        url: url.into(),
        secrets: vec![SECRET_NEW.into(), SECRET_OLD.into()],
        types: Vec::new(),
        timeout_ms: 2_000,
        ca: None,
        max_in_flight: rim_node::webhooks::DEFAULT_MAX_IN_FLIGHT,
    }
}

fn with_webhook(url: String) -> impl Fn(&mut NodeConfig) {
    move |cfg: &mut NodeConfig| {
        cfg.webhooks = vec![webhook(&url)];
        cfg.api_keys = vec![
            ApiKeyConfig {
                name: "events".into(),
                sha256: api_key_digest(EVENTS_KEY),
                scopes: vec!["events".into()],
            },
            ApiKeyConfig {
                name: "push".into(),
                sha256: api_key_digest(PUSH_KEY),
                scopes: vec!["push".into()],
            },
        ];
    }
}

/// A user on the same shard as `of`.
async fn neighbour(c: &Cluster, client: &Client, of: &Session, prefix: &str) -> Session {
    for i in 0..50 {
        let name = format!("{prefix}{i}");
        let id = client.register(&name).await;
        if c.shard_of_user(id) == c.shard_of_user(of.user) {
            return client.sign_in(&name).await;
        }
    }
    panic!("no user landed on the shard of {}", of.user);
}

/// Waits until every id in `ids` was accepted at least once.
async fn wait_delivered(r: &Receiver, ids: &[u64]) {
    wait_for(WAIT, "every message's event delivered", || {
        let created = r.created();
        ids.iter().all(|id| created.contains_key(id)).then_some(())
    })
    .await;
}

/// Every copy of one event carries the same id and bytes.
fn copies_identical(r: &Receiver) {
    let mut by_id: HashMap<String, Vec<u8>> = HashMap::new();
    for g in r.got() {
        let first = by_id.entry(g.id.clone()).or_insert_with(|| g.body.clone());
        assert_eq!(*first, g.body, "every copy of {} carries the same bytes", g.id);
    }
}

async fn pull(http: &str, key: Option<&str>, after: &str, limit: usize) -> (u16, serde_json::Value) {
    let mut req = reqwest::Client::new().get(format!("http://{http}/events")).query(&[("after", after)]);
    req = req.query(&[("limit", limit)]);
    if let Some(k) = key {
        req = req.bearer_auth(k);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(serde_json::Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_message_arrives_once_per_id_in_conversation_order_signed_and_pullable() {
    let _g = serial().await;
    let (r, url) = receiver().await;
    let c = Cluster::start_with(3, SHARDS, with_webhook(url)).await;
    let client = c.client(1);
    let (a, b) = users_on_two_shards(&c, &client, "wh1_").await;
    let n = neighbour(&c, &client, &a, "wh1_n").await;
    let group = client.create_group(&a, GroupKind::Small, &[b.user, n.user]).await;
    let gid = GroupId(group.group_id);

    let mut sent = Vec::new();
    for i in 0..3 {
        sent.push(client.send_acked(&a, b.user, &format!("ab{i}"), "a to b").await.message_id);
        sent.push(client.send_acked(&b, a.user, &format!("ba{i}"), "b to a").await.message_id);
        sent.push(client.send_acked(&n, a.user, &format!("na{i}"), "n to a").await.message_id);
        sent.push(client.send_acked(&a, n.user, &format!("an{i}"), "a to n").await.message_id);
        let g = client.send_group(&b, gid, &format!("g{i}"), "to the group").await.unwrap();
        sent.push(g.message_id);
    }
    wait_delivered(&r, &sent).await;

    let created = r.created();
    let ids: Vec<u64> = created.keys().copied().collect();
    let mut want = sent.clone();
    want.sort_unstable();
    assert_eq!(ids, want, "exactly the messages sent, nothing else of that type");
    for (m, copies) in &created {
        let distinct: std::collections::HashSet<&str> = copies.iter().map(|g| g.id.as_str()).collect();
        assert_eq!(distinct.len(), 1, "message {m} has one event id");
    }
    copies_identical(&r);
    for g in r.got() {
        assert!(verifies(SECRET_NEW, &g), "the new secret verifies {}", g.id);
        assert!(verifies(SECRET_OLD, &g), "the old secret verifies {}", g.id);
        let mut tampered = g.clone();
        tampered.body.push(b' ');
        assert!(!verifies(SECRET_NEW, &tampered));
    }

    // FIFO per conversation: first arrivals follow the lower user's list.
    let first_arrival: Vec<u64> = {
        let mut seen = Vec::new();
        for g in r.got().into_iter().filter(|g| g.accepted) {
            let j: serde_json::Value = serde_json::from_slice(&g.body).unwrap();
            if j["type"] == "message.created" {
                let id: u64 = j["data"]["message_id"].as_str().unwrap().parse().unwrap();
                if !seen.contains(&id) {
                    seen.push(id);
                }
            }
        }
        seen
    };
    let pairs = [(&a, &b), (&a, &n)];
    for (x, y) in pairs {
        let lower = if x.user < y.user { x } else { y };
        let conv: Vec<u64> = {
            let list = client.sync_all_retry(lower).await;
            let other = if lower.user == x.user { y.user } else { x.user };
            list.iter()
                .filter(|m| {
                    m.conversation_kind == rim_proto::v1::ConversationKind::User as i32
                        && (m.conversation_id == other.0 || m.sender_user_id == other.0)
                })
                .map(|m| m.message_id)
                .collect()
        };
        let arrived: Vec<u64> = first_arrival.iter().copied().filter(|id| conv.contains(id)).collect();
        assert_eq!(arrived, conv, "events of a conversation arrive in its order");
        assert_eq!(conv.len(), 6);
    }

    // The pull API: the same bytes, page by page, only with the events scope.
    let http = c.configs[&1].http_listen.clone();
    assert_eq!(pull(&http, None, "", 10).await.0, 401);
    assert_eq!(pull(&http, Some(PUSH_KEY), "", 10).await.0, 403);
    assert_eq!(pull(&http, Some(EVENTS_KEY), "junk", 10).await.0, 400);
    let mut after = String::new();
    let mut pulled: Vec<serde_json::Value> = Vec::new();
    for _ in 0..100 {
        let (status, page) = pull(&http, Some(EVENTS_KEY), &after, 4).await;
        assert_eq!(status, 200, "{page}");
        let events = page["events"].as_array().unwrap();
        assert!(events.len() <= 4);
        pulled.extend(events.iter().cloned());
        after = page["next"].as_str().unwrap().to_string();
        if !page["has_more"].as_bool().unwrap() {
            break;
        }
    }
    let pulled_ids: Vec<&str> = pulled.iter().map(|e| e["event_id"].as_str().unwrap()).collect();
    let mut unique = pulled_ids.clone();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(unique.len(), pulled_ids.len(), "no event twice in a pull");
    for g in r.got() {
        let e = pulled.iter().find(|e| e["event_id"] == g.id.as_str());
        let e = e.unwrap_or_else(|| panic!("{} delivered but not pulled", g.id));
        assert_eq!(serde_json::from_slice::<serde_json::Value>(&g.body).unwrap(), *e);
    }
    let (_, empty) = pull(&http, Some(EVENTS_KEY), &after, 4).await;
    assert_eq!(empty["events"].as_array().unwrap().len(), 0, "nothing after the last cursor");
    for s in 1..=SHARDS {
        c.replicas_identical(ShardId(s)).await;
    }
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_are_retried_with_identical_bytes_and_a_new_leader_resumes_from_the_cursor() {
    let _g = serial().await;
    let (r, url) = receiver().await;
    let c = Cluster::start_with(3, SHARDS, with_webhook(url)).await;
    let client = c.client(1);
    let a = client.register_and_sign_in("wh2_a").await;
    let b = neighbour(&c, &client, &a, "wh2_b").await;
    let shard = c.shard_of_user(a.user);

    // Phase 1: delivered, and the cursor committed past them.
    let mut first = Vec::new();
    for i in 0..5 {
        first.push(client.send_acked(&a, b.user, &format!("p1_{i}"), "one").await.message_id);
    }
    wait_delivered(&r, &first).await;
    let leader = c.leader(shard).await;
    let last = r.got().last().unwrap().id.clone();
    wait_for(WAIT, "the cursor committed past phase 1", || {
        let cursor = c.node(leader).core.group(shard)?.reader.event_cursor("backend").ok()??;
        (format!("evt_{}_{}_{}", shard.0, cursor.0, cursor.1) == last).then_some(())
    })
    .await;

    // Phase 2: the receiver fails; deliveries are retried.
    r.failing.store(true, Ordering::SeqCst);
    let mut second = Vec::new();
    for i in 0..3 {
        second.push(client.send_acked(&a, b.user, &format!("p2_{i}"), "two").await.message_id);
    }
    wait_for(WAIT, "retries of a failing delivery", || {
        (r.got().iter().filter(|g| !g.accepted).count() >= 3).then_some(())
    })
    .await;

    // The leader dies mid-delivery; the receiver recovers.
    let survivor = c.nodes.keys().copied().find(|id| *id != leader).unwrap();
    let mut c = c;
    c.stop_node(leader).await;
    r.failing.store(false, Ordering::SeqCst);
    let client = c.client(survivor);
    let mut third = Vec::new();
    for i in 0..3 {
        third.push(client.send_acked(&a, b.user, &format!("p3_{i}"), "three").await.message_id);
    }
    let all: Vec<u64> = first.iter().chain(&second).chain(&third).copied().collect();
    wait_delivered(&r, &all).await;
    assert_ne!(c.leader(shard).await, leader);

    copies_identical(&r);
    let created = r.created();
    for m in &first {
        assert_eq!(created[m].len(), 1, "message {m} was past the committed cursor: never sent again");
    }
    let failed = r.got().into_iter().filter(|g| !g.accepted).collect::<Vec<_>>();
    for f in &failed {
        let ok = r.got().into_iter().find(|g| g.accepted && g.id == f.id);
        assert!(ok.is_some_and(|g| g.body == f.body), "{} retried with the same bytes", f.id);
    }
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_older_than_the_retention_become_dead_letters_and_are_trimmed() {
    let _g = serial().await;
    let (r, url) = receiver().await;
    r.failing.store(true, Ordering::SeqCst);
    let tweak = with_webhook(url);
    let c = Cluster::start_with(3, SHARDS, move |cfg| {
        tweak(cfg);
        // A replicated limit: the bootstrap seeds it into every group's log.
        cfg.cluster_limits.event_retention_ms = 1_500;
    })
    .await;
    let client = c.client(1);
    let a = client.register_and_sign_in("wh3_a").await;
    let b = neighbour(&c, &client, &a, "wh3_b").await;
    let shard = c.shard_of_user(a.user);
    for i in 0..2 {
        client.send_acked(&a, b.user, &format!("d{i}"), "doomed").await;
    }
    let letters = wait_for(WAIT, "two dead letters", || {
        let leader = c.nodes.values().find(|n| n.core.group(shard).is_some_and(|g| g.is_leader()))?;
        let letters = leader.core.group(shard)?.reader.dead_letters(0, 10).ok()?;
        (letters.len() == 2).then_some(letters)
    })
    .await;
    for (_, d) in &letters {
        assert_eq!(d.endpoint, "backend");
        assert_eq!(d.reason, "HTTP 500");
        let e = d.event.as_ref().unwrap();
        assert!(r.got().iter().any(|g| g.id == e.event_id), "{} was tried", e.event_id);
    }
    // The first was retried until it expired (the second, queued behind it,
    // may have expired by its first try).
    let first = letters[0].1.event.as_ref().unwrap();
    let tries = r.got().iter().filter(|g| g.id == first.event_id).count();
    assert!(tries >= 2, "{} was retried before it was dead-lettered ({tries} tries)", first.event_id);
    // Past the retention, the events and then the dead letters are trimmed
    // on every replica.
    wait_for(WAIT, "events and dead letters trimmed", || {
        c.nodes
            .values()
            .all(|n| {
                let g = n.core.group(shard).unwrap();
                g.reader.events_after(None, 10, usize::MAX).unwrap().events.is_empty()
                    && g.reader.dead_letters(0, 10).unwrap().is_empty()
            })
            .then_some(())
    })
    .await;
    c.replicas_identical(shard).await;
    assert!(r.got().iter().all(|g| !g.accepted));
    c.shutdown().await;
}

/// A server API call on node 1's HTTP listener; the status and the body.
async fn server_api(
    c: &Cluster,
    key: &str,
    method: &str,
    body: serde_json::Value,
) -> (u16, serde_json::Value) {
    let url = format!("http://{}/v1/{method}", c.configs[&1].http_listen);
    let resp = reqwest::Client::new().post(url).bearer_auth(key).json(&body).send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(serde_json::Value::Null))
}

/// `ListDeadLetters` of the endpoint "backend" from the start.
async fn dead_letters(c: &Cluster) -> Vec<serde_json::Value> {
    let (s, v) =
        server_api(c, EVENTS_KEY, "ListDeadLetters", serde_json::json!({"endpoint": "backend"})).await;
    assert_eq!(s, 200, "{v}");
    v["letters"].as_array().unwrap().clone()
}

/// Dead letters listed and replayed through the server API (issue 15 §3):
/// a letter carries the exact bytes the receiver was sent; a replay to a
/// still-failing receiver keeps it; a replay to a healthy one delivers the
/// same bytes under the same `webhook-id`, signed, and removes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_listed_and_replayed_through_the_server_api() {
    let _g = serial().await;
    let (r, url) = receiver().await;
    r.failing.store(true, Ordering::SeqCst);
    let tweak = with_webhook(url);
    let c = Cluster::start_with(3, SHARDS, move |cfg| {
        tweak(cfg);
        cfg.cluster_limits.event_retention_ms = 4_000;
    })
    .await;
    let client = c.client(1);
    let a = client.register_and_sign_in("wh4_a").await;
    let b = neighbour(&c, &client, &a, "wh4_b").await;
    for i in 0..2 {
        client.send_acked(&a, b.user, &format!("r{i}"), "replay me").await;
    }
    let letters = eventually(WAIT, "two dead letters listed", || async {
        let l = dead_letters(&c).await;
        (l.len() == 2).then_some(l)
    })
    .await;
    // Keep them: a long retention from now on (dead letters are trimmed
    // one retention after they were written).
    let core = &c.node(1).core;
    let mut limits = core.placement().unwrap().map().limits.unwrap();
    limits.event_retention_ms = 600_000;
    rim_node::limits::set(core, limits).await.unwrap();
    for l in &letters {
        let id = l["event_id"].as_str().unwrap();
        let sent = r.got().into_iter().find(|g| g.id == id).expect("the receiver was sent it");
        assert_eq!(l["body"].as_str().unwrap().as_bytes(), sent.body, "{id}: the exact bytes");
        assert_eq!((l["type"].as_str(), l["reason"].as_str()), (Some("message.created"), Some("HTTP 500")));
        assert!(l["letter_id"].as_str().unwrap().starts_with("dl_"));
    }
    // Paging.
    let (_, first) =
        server_api(&c, EVENTS_KEY, "ListDeadLetters", serde_json::json!({"endpoint": "backend", "limit": 1}))
            .await;
    assert_eq!(first["letters"].as_array().unwrap().len(), 1);
    assert_eq!(first["has_more"].as_bool(), Some(true));
    let after = serde_json::json!({"endpoint": "backend", "after": first["next"]});
    let (_, second) = server_api(&c, EVENTS_KEY, "ListDeadLetters", after).await;
    assert_eq!(second["letters"].as_array().unwrap()[0]["letter_id"], letters[1]["letter_id"]);

    // Replayed to a receiver that still fails: reported, kept.
    let one = letters[0]["letter_id"].clone();
    let replay =
        serde_json::json!({"idempotency_key": "replay-1", "endpoint": "backend", "letter_ids": [one]});
    let (s, v) = server_api(&c, EVENTS_KEY, "ReplayDeadLetters", replay.clone()).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!((v["replayed"].as_u64(), v["failed"].as_u64()), (Some(0), Some(1)), "{v}");
    assert_eq!(v["results"][0]["reason"].as_str(), Some("HTTP 500"));
    assert_eq!(dead_letters(&c).await.len(), 2, "a failed replay keeps the letter");

    // Healthy again: every letter replayed with its id and bytes, signed.
    r.failing.store(false, Ordering::SeqCst);
    let all = serde_json::json!({"idempotency_key": "replay-2", "endpoint": "backend", "all": true});
    let (s, v) = server_api(&c, EVENTS_KEY, "ReplayDeadLetters", all).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!((v["replayed"].as_u64(), v["failed"].as_u64()), (Some(2), Some(0)), "{v}");
    for l in &letters {
        let id = l["event_id"].as_str().unwrap();
        let got = r.got().into_iter().find(|g| g.accepted && g.id == id).expect("replayed");
        assert_eq!(got.body, l["body"].as_str().unwrap().as_bytes(), "{id}: identical body");
        assert!(verifies(SECRET_OLD, &got) && verifies(SECRET_NEW, &got), "{id}: signed");
    }
    assert!(dead_letters(&c).await.is_empty(), "replayed letters are removed");
    let (_, v) = server_api(&c, EVENTS_KEY, "ReplayDeadLetters", replay).await;
    assert_eq!(v["results"][0]["outcome"].as_str(), Some("not_found"), "{v}");
    copies_identical(&r);

    // Scope and bad input.
    let list = serde_json::json!({"endpoint": "backend"});
    let (s, v) = server_api(&c, PUSH_KEY, "ListDeadLetters", list).await;
    assert_eq!((s, v["code"].as_str()), (403, Some("ERROR_PERMISSION_DENIED")));
    let unknown = serde_json::json!({"idempotency_key": "k", "endpoint": "nope", "all": true});
    assert_eq!(server_api(&c, EVENTS_KEY, "ReplayDeadLetters", unknown).await.0, 400);
    let too_many: Vec<String> = (1..=101).map(|n| format!("dl_1_{n}")).collect();
    let many = serde_json::json!({"idempotency_key": "k", "endpoint": "backend", "letter_ids": too_many});
    assert_eq!(server_api(&c, EVENTS_KEY, "ReplayDeadLetters", many).await.0, 400);
    c.shutdown().await;
}
