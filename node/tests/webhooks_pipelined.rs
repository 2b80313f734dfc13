//! Pipelined webhook delivery (issue 15 §3): up to `max_in_flight`
//! requests per (shard, endpoint) at once, never two of one conversation,
//! each conversation's events in order, and the cursor committed over the
//! finished prefix only.
//!
//! One cluster, two endpoints on one receiver: `piped` (W = 8) and `serial`
//! (W = 1). The receiver first fails every request (so a backlog of many
//! conversations builds in one shard), then answers 2xx after a delay, and
//! records, per endpoint and shard, how many requests it holds at once, and
//! for every request when it arrived and when its 2xx was sent (one global
//! sequence). Checked: `piped` overlaps requests of one shard (more than
//! one at once, never more than 8), `serial` never does; for both, in every
//! conversation, no request for a message arrives before the previous
//! message's 2xx was sent, and first arrivals follow the send order; every
//! message arrives; each endpoint's committed cursor reaches the last event.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::Path;
use axum::http::{HeaderMap, StatusCode};
use rim_node::NodeConfig;
use rim_node::webhooks::WebhookConfig;
use rim_proto::ids::UserId;
use rim_testkit::cluster::Cluster;
use rim_testkit::grpc::{Client, Session};
use rim_testkit::wait::{WAIT, serial, wait_for};

const SHARDS: u32 = 2;
const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
/// How long the receiver holds each request it accepts.
const HOLD: Duration = Duration::from_millis(100);
const PIPED_W: usize = 8;

/// One request: which endpoint, which message, when it arrived and (if
/// accepted) when its 2xx was sent, on the receiver's sequence.
#[derive(Clone, Debug)]
struct Request {
    endpoint: String,
    event_id: String,
    message_id: u64,
    arrived: u64,
    answered: Option<u64>,
}

#[derive(Default)]
struct Receiver {
    failing: AtomicBool,
    seq: AtomicU64,
    requests: Mutex<Vec<Request>>,
    /// (endpoint, shard) → (held now, most held at once).
    held: Mutex<HashMap<(String, String), (usize, usize)>>,
}

impl Receiver {
    fn tick(&self) -> u64 {
        self.seq.fetch_add(1, Ordering::SeqCst)
    }

    fn requests(&self) -> Vec<Request> {
        self.requests.lock().unwrap().clone()
    }

    /// Most requests of `endpoint` held at once for any one shard.
    fn most_held(&self, endpoint: &str) -> usize {
        let held = self.held.lock().unwrap();
        held.iter().filter(|((e, _), _)| e == endpoint).map(|(_, (_, most))| *most).max().unwrap_or(0)
    }

    async fn handle(
        self: Arc<Self>,
        endpoint: String,
        headers: HeaderMap,
        body: axum::body::Bytes,
    ) -> StatusCode {
        let event_id = headers.get("webhook-id").unwrap().to_str().unwrap().to_string();
        // evt_<shard>_<index>_<ordinal>
        let shard = event_id.split('_').nth(1).unwrap().to_string();
        let j: serde_json::Value = serde_json::from_slice(&body).unwrap();
        let message_id = j["data"]["message_id"].as_str().and_then(|m| m.parse().ok()).unwrap_or(0);
        let key = (endpoint.clone(), shard);
        {
            let mut held = self.held.lock().unwrap();
            let h = held.entry(key.clone()).or_default();
            h.0 += 1;
            h.1 = h.1.max(h.0);
        }
        let arrived = self.tick();
        let accept = !self.failing.load(Ordering::SeqCst);
        if accept {
            // A slow receiver: what pipelining is for.
            tokio::time::sleep(HOLD).await;
        }
        let answered = accept.then(|| self.tick());
        self.requests.lock().unwrap().push(Request { endpoint, event_id, message_id, arrived, answered });
        self.held.lock().unwrap().get_mut(&key).unwrap().0 -= 1;
        if accept { StatusCode::NO_CONTENT } else { StatusCode::SERVICE_UNAVAILABLE }
    }
}

async fn receiver() -> (Arc<Receiver>, String) {
    let r = Arc::new(Receiver::default());
    let state = r.clone();
    let app = axum::Router::new().route(
        "/{endpoint}",
        axum::routing::post(
            move |Path(endpoint): Path<String>, headers: HeaderMap, body: axum::body::Bytes| {
                state.clone().handle(endpoint, headers, body)
            },
        ),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (r, url)
}

fn endpoint(name: &str, url: &str, max_in_flight: usize) -> WebhookConfig {
    WebhookConfig {
        name: name.into(),
        url: format!("{url}/{name}"),
        secrets: vec![SECRET.into()],
        types: vec!["message.created".into()],
        timeout_ms: 5_000,
        ca: None,
        max_in_flight,
    }
}

/// Users on the shard of `of`.
async fn neighbours(c: &Cluster, client: &Client, of: &Session, count: usize) -> Vec<Session> {
    let mut out = Vec::new();
    for i in 0..count * 40 {
        let name = format!("pipe_n{i}");
        let id = client.register(&name).await;
        if c.shard_of_user(id) == c.shard_of_user(of.user) {
            out.push(client.sign_in(&name).await);
            if out.len() == count {
                return out;
            }
        }
    }
    panic!("not {count} users on the shard of {}", of.user);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_overlap_up_to_w_yet_each_conversation_stays_in_order() {
    let _g = serial().await;
    let (r, url) = receiver().await;
    let c = Cluster::start_with(3, SHARDS, move |cfg: &mut NodeConfig| {
        cfg.webhooks = vec![endpoint("piped", &url, PIPED_W), endpoint("serial", &url, 1)];
    })
    .await;
    let client = c.client(1);
    let hub = client.register_and_sign_in("pipe_hub").await;
    let others = neighbours(&c, &client, &hub, 6).await;
    let shard = c.shard_of_user(hub.user);

    // A backlog of 6 conversations in one shard, while the receiver fails.
    r.failing.store(true, Ordering::SeqCst);
    // (lower, higher) user → message ids in send order (sequential acked
    // sends in one shard: the log order).
    let mut conversations: BTreeMap<(UserId, UserId), Vec<u64>> = BTreeMap::new();
    for round in 0..5 {
        for (i, n) in others.iter().enumerate() {
            let (from, to) = if (round + i) % 2 == 0 { (&hub, n) } else { (n, &hub) };
            let m = client.send_acked(from, to.user, &format!("p{round}_{i}"), "pipelined").await;
            let pair = (hub.user.min(n.user), hub.user.max(n.user));
            conversations.entry(pair).or_default().push(m.message_id);
        }
    }
    wait_for(WAIT, "failed requests while the backlog builds", || {
        (r.requests().iter().filter(|q| q.answered.is_none()).count() >= 2).then_some(())
    })
    .await;
    r.failing.store(false, Ordering::SeqCst);

    let all: Vec<u64> = conversations.values().flatten().copied().collect();
    for name in ["piped", "serial"] {
        wait_for(WAIT * 3, &format!("every message delivered to {name}"), || {
            let requests = r.requests();
            let ok = |m: &u64| {
                requests.iter().any(|q| q.endpoint == name && q.message_id == *m && q.answered.is_some())
            };
            all.iter().all(ok).then_some(())
        })
        .await;
    }

    let piped = r.most_held("piped");
    assert!(piped > 1, "W = 8: requests of one shard overlap (at most {piped} at once)");
    assert!(piped <= PIPED_W, "never more than W = {PIPED_W} in flight per shard ({piped})");
    assert_eq!(r.most_held("serial"), 1, "W = 1: one request at a time per shard");

    let requests = r.requests();
    for name in ["piped", "serial"] {
        for (pair, sent) in &conversations {
            let of = |m: u64| requests.iter().filter(move |q| q.endpoint == name && q.message_id == m);
            for w in sent.windows(2) {
                let (earlier, later) = (w[0], w[1]);
                let earlier_ok = of(earlier).filter_map(|q| q.answered).min().unwrap();
                let later_first = of(later).map(|q| q.arrived).min().unwrap();
                assert!(
                    later_first > earlier_ok,
                    "{name}, conversation {pair:?}: message {later} was sent before {earlier} got its 2xx"
                );
            }
            let mut first_ok: Vec<(u64, u64)> =
                sent.iter().map(|m| (of(*m).filter_map(|q| q.answered).min().unwrap(), *m)).collect();
            first_ok.sort_unstable();
            let order: Vec<u64> = first_ok.into_iter().map(|(_, m)| m).collect();
            assert_eq!(&order, sent, "{name}, conversation {pair:?}: 2xx in send order");
        }
    }

    // The committed cursor passes the last event of the shard, for both.
    let last =
        requests.iter().filter(|q| q.event_id.starts_with(&format!("evt_{}_", shard.0))).max_by_key(|q| {
            let mut parts = q.event_id.rsplit('_');
            let ordinal: u32 = parts.next().unwrap().parse().unwrap();
            let index: u64 = parts.next().unwrap().parse().unwrap();
            (index, ordinal)
        });
    let last = last.unwrap().event_id.clone();
    for name in ["piped", "serial"] {
        wait_for(WAIT, &format!("{name}'s cursor committed to {last}"), || {
            let leader = c.nodes.values().find(|n| n.core.group(shard).is_some_and(|g| g.is_leader()))?;
            let cursor = leader.core.group(shard)?.reader.event_cursor(name).ok()??;
            (format!("evt_{}_{}_{}", shard.0, cursor.0, cursor.1) == last).then_some(())
        })
        .await;
    }
    c.replicas_identical(shard).await;
    c.shutdown().await;
}
