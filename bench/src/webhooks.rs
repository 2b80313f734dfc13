//! `rim bench webhooks`: the app's event stream under load (issue 15 §5).
//!
//! The bench is the app: an HTTP receiver in this process, which the
//! spawned nodes are configured to deliver every event to (`[[webhooks]]`),
//! while the `send` scenario's pairs ([`crate::latency`]) send 1:1 messages
//! at `--rate`. Each message's text starts with its send time, and each
//! `message.created` event carries the content, so the receiver knows
//! **send → webhook** latency without a table of sends.
//!
//! Phases:
//!
//! 1. **steady**: `--duration` at `--rate`; events per second received and
//!    delivery lag percentiles;
//! 2. **catch-up** (`--outage`, 0 to skip): the receiver answers 503 for
//!    `--outage` while the sends go on, then recovers; the time until every
//!    acknowledged message's event arrived, the events per second meanwhile,
//!    and the nodes' resident memory before, at the end of the outage and
//!    the peak during catch-up (the backlog lives in the Raft log and the
//!    shards' state, not in a queue, so memory should stay flat);
//!    With `--control` the receiver stays up through that phase: the same
//!    sends and memory readings without a backlog, to compare against;
//! 3. with `--hook-blackhole`: the nodes also have a `before_send` hook
//!    whose endpoint accepts connections and never answers, failing open
//!    after `--hook-timeout`: the steady phase's send → ack p99 shows what
//!    a dead moderation service costs senders (the breaker bounds it).
//!
//! Only `--spawn` clusters: the nodes' webhook configuration is the bench's.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use clap::Args;

use super::Outcome;
use super::connections::latency_json;
use super::hist::Histogram;
use super::json::Json;
use super::latency::{Driver, LatencyArgs, Rate};
use super::sys;
use super::target::{Target, TargetArgs};

/// The endpoint secret of the bench's nodes (a bench secret, not a real one).
const SECRET: &str = "whsec_cmltLWJlbmNoLXdlYmhvb2stc2VjcmV0LTEyMzQ1Njc=";

/// Flags of `rim bench webhooks`.
#[derive(Args, Debug)]
pub struct WebhooksArgs {
    #[command(flatten)]
    pub send: LatencyArgs,
    /// How long the receiver is down before the catch-up is measured (0: no catch-up phase).
    #[arg(long, default_value = "60s", value_parser = sys::parse_duration)]
    outage: Duration,
    /// Longest wait for the catch-up after the outage.
    #[arg(long, default_value = "15m", value_parser = sys::parse_duration)]
    catch_up_timeout: Duration,
    /// Also configure a `before_send` hook whose endpoint never answers (fails open).
    #[arg(long)]
    hook_blackhole: bool,
    /// The black-holed hook's timeout.
    #[arg(long, default_value = "200ms", value_parser = sys::parse_duration)]
    hook_timeout: Duration,
    /// A control run: the receiver stays up during `--outage` (same sends,
    /// same memory readings, no backlog).
    #[arg(long)]
    control: bool,
    /// The endpoint's `max_in_flight` (requests in flight per shard; default: the node's).
    #[arg(long)]
    max_in_flight: Option<usize>,
}

impl WebhooksArgs {
    /// The cluster flags.
    pub fn target(&self) -> &TargetArgs {
        &self.send.target
    }

    /// The result file.
    pub fn out(&self) -> &Option<PathBuf> {
        &self.send.out
    }
}

/// What the receiver saw.
#[derive(Default)]
struct Seen {
    /// Distinct event ids.
    ids: HashSet<String>,
    /// Send → webhook latency (µs) of distinct `message.created` events.
    lag: Histogram,
    /// Distinct `message.created` events.
    created: u64,
}

/// The bench's receiver.
struct Receiver {
    /// The driver's epoch: message texts start with µs since it.
    epoch: OnceLock<Instant>,
    up: AtomicBool,
    requests: AtomicU64,
    seen: Mutex<Seen>,
}

impl Receiver {
    fn seen(&self) -> std::sync::MutexGuard<'_, Seen> {
        self.seen.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn created(&self) -> u64 {
        self.seen().created
    }
}

async fn receive(State(r): State<Arc<Receiver>>, headers: axum::http::HeaderMap, body: Bytes) -> StatusCode {
    r.requests.fetch_add(1, Ordering::Relaxed);
    if !r.up.load(Ordering::Relaxed) {
        return StatusCode::SERVICE_UNAVAILABLE;
    }
    let id = headers.get("webhook-id").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
    let mut seen = r.seen();
    if !seen.ids.insert(id) {
        return StatusCode::NO_CONTENT;
    }
    let Ok(event) = serde_json::from_slice::<serde_json::Value>(&body) else {
        return StatusCode::NO_CONTENT;
    };
    if event["type"] != "message.created" {
        return StatusCode::NO_CONTENT;
    }
    seen.created += 1;
    let sent_us = event["data"]["content"]
        .as_str()
        .and_then(|c| B64.decode(c).ok())
        .and_then(|text| std::str::from_utf8(text.split(|b| *b == b' ').next()?).ok()?.parse::<u64>().ok());
    if let (Some(sent), Some(epoch)) = (sent_us, r.epoch.get()) {
        let now = Instant::now().saturating_duration_since(*epoch).as_micros() as u64;
        seen.lag.record(now.saturating_sub(sent));
    }
    StatusCode::NO_CONTENT
}

/// Started before the cluster: the receiver, the black hole, and the node
/// configuration that points at them.
pub(crate) struct Prepared {
    receiver: Arc<Receiver>,
    _config_dir: tempfile::TempDir,
    _blackhole: Option<tokio::task::JoinHandle<()>>,
}

/// Starts the receiver (and the black hole) and points the spawned nodes at
/// them through `target.node_config`.
pub(crate) async fn prepare(args: &WebhooksArgs, target: &mut TargetArgs) -> anyhow::Result<Prepared> {
    anyhow::ensure!(target.spawn, "rim bench webhooks needs --spawn (it configures the nodes' webhooks)");
    let receiver = Arc::new(Receiver {
        epoch: OnceLock::new(),
        up: AtomicBool::new(true),
        requests: AtomicU64::new(0),
        seen: Mutex::new(Seen::default()),
    });
    let app = axum::Router::new().fallback(axum::routing::post(receive)).with_state(receiver.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.context("binding the receiver")?;
    let url = format!("http://{}/rim", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, app).await });
    let mut config = format!("[[webhooks]]\nname = \"bench\"\nurl = \"{url}\"\nsecrets = [\"{SECRET}\"]\n");
    if let Some(w) = args.max_in_flight {
        config.push_str(&format!("max_in_flight = {w}\n"));
    }
    let blackhole = if args.hook_blackhole {
        let hole = tokio::net::TcpListener::bind("127.0.0.1:0").await.context("binding the black hole")?;
        let addr = hole.local_addr()?;
        config.push_str(&format!(
            "[before_send]\nurl = \"http://{addr}/before_send\"\ntimeout_ms = {}\non_failure = \"allow\"\n",
            args.hook_timeout.as_millis().max(1)
        ));
        // Accepts and holds every connection, reads nothing, answers nothing.
        Some(tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((conn, _)) = hole.accept().await {
                held.push(conn);
            }
        }))
    } else {
        None
    };
    let dir = tempfile::tempdir().context("a temp dir for the node configuration")?;
    let path = dir.path().join("webhooks.toml");
    std::fs::write(&path, config).with_context(|| format!("writing {}", path.display()))?;
    target.node_config = Some(path);
    Ok(Prepared { receiver, _config_dir: dir, _blackhole: blackhole })
}

/// Sum of the spawned nodes' resident memory, MiB.
fn nodes_rss_mib(target: &Target) -> Option<f64> {
    let pids = target.spawned.as_ref()?.pids();
    let kib: u64 =
        pids.iter().filter(|(n, _)| n.starts_with("node")).filter_map(|(_, p)| sys::rss_kib(*p)).sum();
    Some(sys::mib(kib))
}

/// Runs the phases.
pub(crate) async fn run(args: &WebhooksArgs, prepared: Prepared, target: &Target) -> anyhow::Result<Outcome> {
    let r = prepared.receiver;
    let mut driver = Driver::start(&args.send, target).await?;
    let _ = r.epoch.set(driver.epoch());
    let rate = args.send.rate;
    anyhow::ensure!(matches!(rate, Rate::PerSecond(_)), "rim bench webhooks needs a steady --rate, not max");

    // 1. Steady.
    {
        let mut seen = r.seen();
        seen.created = 0;
        seen.lag = Histogram::default();
    }
    let t0 = Instant::now();
    let steady = driver.step(rate, args.send.duration, "steady: ".into()).await;
    // Received over the step's wall time (warm-up and drain included).
    let steady_events = r.created() as f64 / t0.elapsed().as_secs_f64();
    let lag = r.seen().lag.clone();
    let mut results = Json::obj().with(
        "steady",
        Json::obj()
            .with("sends", steady.to_json())
            .with("events_per_second", steady_events)
            .with("send_to_webhook_ms", latency_json(&lag)),
    );
    let mut summary = format!(
        "webhooks: {:.0} msg/s acked, {:.0} events/s; send→webhook p50 {:.1} p99 {:.1} ms; send→ack p99 {:.1} ms",
        steady.acked_per_s(),
        steady_events,
        lag.quantile(0.5) as f64 / 1000.0,
        lag.quantile(0.99) as f64 / 1000.0,
        steady.ack.quantile(0.99) as f64 / 1000.0,
    );
    if args.hook_blackhole {
        let bound = args.hook_timeout.as_secs_f64() * 1000.0 + 20.0;
        let p99 = steady.ack.quantile(0.99) as f64 / 1000.0;
        results.set(
            "before_send_blackholed",
            Json::obj()
                .with("hook_timeout_ms", args.hook_timeout.as_secs_f64() * 1000.0)
                .with("send_to_ack_p99_ms", p99)
                .with("bound_ms", bound)
                .with("within_bound", p99 <= bound),
        );
        summary.push_str(&format!(" (hook black-holed: bound {bound:.0} ms)"));
    }

    // 2. Catch-up after an outage.
    if !args.outage.is_zero() {
        let rss_before = nodes_rss_mib(target);
        r.up.store(args.control, Ordering::Relaxed);
        // The nodes' memory is sampled every second while the sends go on.
        let stepped = AtomicBool::new(false);
        let label = if args.control { "receiver up (control): " } else { "receiver down: " };
        let step = async {
            let during = driver.step(rate, args.outage, label.into()).await;
            stepped.store(true, Ordering::Relaxed);
            during
        };
        let sample = async {
            let mut peak: f64 = 0.0;
            while !stepped.load(Ordering::Relaxed) {
                peak = peak.max(nodes_rss_mib(target).unwrap_or(0.0));
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            peak
        };
        let (during, rss_peak_outage) = tokio::join!(step, sample);
        let rss_outage_end = nodes_rss_mib(target);
        let backlog_acked = driver.acked_all();
        let created_at_recovery = r.created();
        r.up.store(true, Ordering::Relaxed);
        let t0 = Instant::now();
        let deadline = t0 + args.catch_up_timeout;
        let mut rss_peak = rss_outage_end.unwrap_or(0.0);
        // The first event after recovery waits for the retry backoff of the
        // requests that were failing (up to 30 s): the drain rate is
        // measured from it too.
        let mut first_event: Option<f64> = None;
        while r.created() < backlog_acked && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(200)).await;
            rss_peak = rss_peak.max(nodes_rss_mib(target).unwrap_or(0.0));
            if first_event.is_none() && r.created() > created_at_recovery {
                first_event = Some(t0.elapsed().as_secs_f64());
            }
        }
        let caught_up = r.created() >= backlog_acked;
        let took = t0.elapsed().as_secs_f64();
        let drained = r.created().saturating_sub(created_at_recovery);
        results.set(
            "catch_up",
            Json::obj()
                .with("outage_seconds", args.outage.as_secs_f64())
                .with("control_receiver_up", args.control)
                .with("sends_during_outage", during.to_json())
                .with("events_behind_at_recovery", backlog_acked.saturating_sub(created_at_recovery))
                .with("caught_up", caught_up)
                .with("catch_up_seconds", took)
                .with("catch_up_events_per_second", drained as f64 / took.max(1e-3))
                .with("first_event_after_recovery_seconds", first_event)
                .with(
                    "drain_events_per_second_from_first_event",
                    first_event.map(|f| drained as f64 / (took - f).max(1e-3)),
                )
                .with("nodes_rss_mib_before", rss_before)
                .with("nodes_rss_mib_peak_outage", rss_peak_outage)
                .with("nodes_rss_mib_outage_end", rss_outage_end)
                .with("nodes_rss_mib_peak_catch_up", rss_peak),
        );
        summary.push_str(&format!(
            "; after {:.0}s {}: {} behind, {} in {took:.1}s ({:.0} events/s), nodes RSS {:.0} → peak {rss_peak_outage:.0} → {:.0} → peak {rss_peak:.0} MiB",
            args.outage.as_secs_f64(),
            if args.control { "up (control)" } else { "down" },
            backlog_acked.saturating_sub(created_at_recovery),
            if caught_up { "caught up" } else { "NOT caught up" },
            drained as f64 / took.max(1e-3),
            rss_before.unwrap_or(0.0),
            rss_outage_end.unwrap_or(0.0),
        ));
    }
    results.set("receiver_requests", r.requests.load(Ordering::Relaxed));
    driver.finish().await?;
    let params = super::latency::params(&args.send)
        .with("duration_seconds", args.send.duration.as_secs_f64())
        .with("outage_seconds", args.outage.as_secs_f64())
        .with("hook_blackhole", args.hook_blackhole)
        .with("hook_timeout_ms", args.hook_timeout.as_secs_f64() * 1000.0)
        .with("control", args.control)
        .with("max_in_flight", args.max_in_flight);
    Ok(Outcome { params, results, summary })
}
