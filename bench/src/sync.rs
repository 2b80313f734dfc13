//! `rim bench sync`: devices that were offline while `--messages` 1:1
//! messages reached their users reconnect and catch up with `SYNC`; the
//! figure of interest is how long that takes and how many messages per
//! second a catching-up device receives.
//!
//! 1. **Accounts.** `--devices` recipient users and `--senders` sender
//!    users, by phone sign-in with the cluster's development code (cheap;
//!    `--spawn` sets one) or, without a code, by registration. The sign-in
//!    registers the recipient's device with an ack cursor of 0; it has no
//!    long connection, i.e. it is offline.
//! 2. **Fill.** Every recipient's list gets `--messages` X messages:
//!    message `k` for recipient `d` has `client_msg_id` `<run>-<d>-<k>`;
//!    the jobs `(d, k)` are interleaved over the recipients (so over the
//!    shards) and taken from one shared counter by every sender as fast as
//!    acknowledgements allow (`--fill-inflight` unanswered sends per
//!    sender). `--fill-via grpc` (default) sends with
//!    `MessageService.SendMessage` over the nodes' client listeners;
//!    `--fill-via gateway` with `SEND` over one gateway connection per
//!    sender. Retryable errors are retried with the same `client_msg_id`
//!    (idempotent); any other error fails the run. The fill time and rate
//!    are reported but are not the point. gRPC is the default because it
//!    fills faster (no gateway hop, no pushes of the senders' own copies):
//!    ~3,000 against ~2,200 messages/s on a loaded 2-core machine.
//! 3. **Settle.** A 1:1 send is acknowledged once it is in the sender's
//!    list; the recipient's copy is relayed to the recipient's shard after
//!    that (the outbox relay). The bench waits until every recipient's list
//!    head is at least X (a one-entry gRPC `Sync` as the recipient, which
//!    moves no cursor), so the devices really are X messages behind when
//!    they reconnect; the wait is reported as `relay_settle_seconds`.
//! 4. **Catch-up.** Then all devices connect at once, each on its own TCP
//!    connection: `SIGN_IN`, then `SYNC{after_seq, limit: --page}` from the
//!    device's ack cursor, one page at a time, each from the last seq
//!    received, until a page says `has_more = false` and the cursor has
//!    reached every seq known to exist (the sign-in's `last_seq`, and the
//!    seq of any push); then one `ACK` of the last seq (timed separately,
//!    not part of the catch-up). Per device: connect → signed
//!    in, signed in → has everything (the catch-up), messages per second of
//!    the catch-up, bytes received (frames, sign-in reply to last page),
//!    pages, retries. Aggregates: p50/max over the devices, and the total
//!    rate (every message synced over the time from the first connect to
//!    the last device done).
//!
//! **Verification.** Entries of a page must continue the cursor (seq =
//! cursor + 1, …): an entry beyond is a gap (`seq_gaps` counts the skipped
//! seqs), one at or below the cursor a repeat (`seq_repeats`, dropped as a
//! client would drop it). Each kept entry's `client_msg_id` is matched
//! against the device's X ids in a bitmap: `missing` ids never seen,
//! `duplicated` extra copies of an id (stored twice at different seqs),
//! `foreign` entries that are not the run's messages to that user. A
//! complete device has `received` = X, missing = duplicated = foreign = 0,
//! seqs 1..=X. `MESSAGE` pushes arriving while a device syncs (none are
//! expected after the settle: the gateway pushes only entries after the
//! sign-in's `last_seq`) are counted as `pushes_during_sync` and never as
//! received entries; their seqs only extend how far the device syncs, so
//! each entry is counted once, from its page.
//!
//! Bounds: one task per device and per fill worker, one bitmap of X bits per
//! device, reads capped at the protocol's 1 MiB frame; every request has a
//! timeout, the fill fails after `--stall` without an acknowledged send,
//! the settle after `--stall` without a list growing, and the catch-up
//! after `--sync-timeout`.

mod catch_up;
mod fill;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Args, ValueEnum};
use tokio::task::JoinSet;

use self::catch_up::{Device, Live, Plan, catch_up};
use self::fill::{Fill, fill_gateway, fill_grpc, settle, wait_fill};
use super::Outcome;
use super::accounts::{self, Api};
use super::json::Json;
use super::progress::Progress;
use super::sys;
use super::target::{Target, TargetArgs};

/// Longest wait for one reply (sign-in, a page, the ack) or one write.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Devices listed one by one in the result file (the aggregates cover all).
const MAX_LISTED_DEVICES: usize = 256;

/// How the recipients' lists are filled.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum FillVia {
    /// `MessageService.SendMessage` on the nodes' client gRPC listeners.
    Grpc,
    /// `SEND` on one gateway connection per sender.
    Gateway,
}

/// Flags of `rim bench sync`.
#[derive(Args, Debug)]
pub struct SyncArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    /// Result file (default bench-sync.json).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Recipient users, each with one offline device that reconnects and catches up.
    #[arg(long, default_value_t = 4)]
    devices: usize,
    /// Messages sent to each recipient while its device is offline.
    #[arg(long, default_value_t = 10_000)]
    messages: u64,
    /// Users sending the messages (each recipient gets messages from all of them).
    #[arg(long, default_value_t = 4)]
    senders: usize,
    /// `SYNC` page size (`SyncInput.limit`; the server caps it, at 500 today;
    /// 0 = the server's default).
    #[arg(long, default_value_t = 200)]
    page: u32,
    /// Message text size in bytes.
    #[arg(long, default_value_t = 100)]
    size: usize,
    /// How the lists are filled.
    #[arg(long, value_enum, default_value_t = FillVia::Grpc)]
    fill_via: FillVia,
    /// Unanswered fill sends per sender (the gateway allows 64 per connection).
    #[arg(long, default_value_t = 32)]
    fill_inflight: usize,
    /// The fill fails after this long without an acknowledged send.
    #[arg(long, default_value = "30s", value_parser = sys::parse_duration)]
    stall: Duration,
    /// Longest catch-up phase (first connect to the last device done).
    #[arg(long, default_value = "5m", value_parser = sys::parse_duration)]
    sync_timeout: Duration,
    /// Concurrent account set-up calls.
    #[arg(long, default_value_t = 16)]
    setup_concurrency: usize,
}

/// Runs the scenario.
pub async fn run(args: &SyncArgs, target: &Target) -> anyhow::Result<Outcome> {
    let (d, x) = (args.devices, args.messages);
    anyhow::ensure!(d >= 1, "--devices must be at least 1");
    anyhow::ensure!(x >= 1, "--messages must be at least 1");
    anyhow::ensure!(args.senders >= 1, "--senders must be at least 1");
    anyhow::ensure!(args.fill_inflight >= 1, "--fill-inflight must be at least 1");
    anyhow::ensure!(!args.stall.is_zero() && !args.sync_timeout.is_zero(), "timeouts must be positive");
    let total = (d as u64).checked_mul(x).context("--devices × --messages overflows")?;
    anyhow::ensure!(usize::try_from(x).is_ok(), "--messages too large");
    sys::check_nofile((d + args.senders) as u64 + 256, &format!("{d} devices and {} senders", args.senders))?;

    // Accounts: recipients first, then senders.
    let api = Api::new(&target.apis)?;
    let t_setup = Instant::now();
    let n_users = d + args.senders;
    let users = match target.dev_code.as_deref() {
        Some(code) => accounts::phone_users(&api, code, n_users, args.setup_concurrency).await?,
        None => accounts::users(&api, &accounts::run_prefix(), n_users, args.setup_concurrency).await?,
    };
    let (recipients, senders) = users.split_at(d);
    let setup_s = t_setup.elapsed().as_secs_f64();

    // Fill.
    let prefix = accounts::run_prefix();
    let fill = Arc::new(Fill::new(
        d as u64,
        total,
        prefix.clone(),
        args.size,
        recipients.iter().map(|c| c.user.0).collect(),
    ));
    let progress = {
        let fill = fill.clone();
        Progress::start("fill", move |elapsed| {
            let a = fill.acked.load(Ordering::Relaxed);
            format!(
                "acked {a}/{total} sends ({:.0}/s), retries {}",
                a as f64 / elapsed.as_secs_f64().max(1e-3),
                fill.retries.load(Ordering::Relaxed)
            )
        })
    };
    let workers = match args.fill_via {
        FillVia::Grpc => fill_grpc(&fill, &api, senders, args.fill_inflight),
        FillVia::Gateway => fill_gateway(&fill, target.gateway, senders, args.fill_inflight).await?,
    };
    let filled = wait_fill(&fill, workers, args.stall).await;
    let fill_s = fill.epoch.elapsed().as_secs_f64();
    progress.finish().await;
    filled?;

    // Settle: a 1:1 send is acknowledged once it is in the sender's list;
    // the recipient's copy is relayed to the recipient's shard after that.
    let t_settle = Instant::now();
    settle(&api, recipients, x, args.stall).await?;
    let settle_s = t_settle.elapsed().as_secs_f64();

    // Catch-up.
    let live = Arc::new(Live::default());
    let progress = {
        let live = live.clone();
        Progress::start("sync", move |elapsed| {
            let n = live.synced.load(Ordering::Relaxed);
            format!(
                "signed in {}/{d}, done {}/{d}, synced {n}/{total} messages ({:.0}/s)",
                live.signed_in.load(Ordering::Relaxed),
                live.done.load(Ordering::Relaxed),
                n as f64 / elapsed.as_secs_f64().max(1e-3),
            )
        })
    };
    let plan = Arc::new(Plan {
        gateway: target.gateway,
        page: args.page,
        messages: x,
        prefix,
        epoch: Instant::now(),
        deadline: Instant::now() + args.sync_timeout,
    });
    let mut tasks = JoinSet::new();
    for (i, c) in recipients.iter().cloned().enumerate() {
        tasks.spawn(catch_up(i, c, plan.clone(), live.clone()));
    }
    let mut devices: Vec<Option<Device>> = (0..d).map(|_| None).collect();
    // Each task ends by the deadline (every wait inside is capped by it); the margin covers the last ACK.
    let join_deadline = plan.deadline + REQUEST_TIMEOUT + Duration::from_secs(5);
    while let Ok(Some(r)) = tokio::time::timeout_at(join_deadline.into(), tasks.join_next()).await {
        let dev = r.context("a device task panicked")?;
        let i = dev.index;
        devices[i] = Some(dev);
    }
    tasks.abort_all();
    progress.finish().await;
    let devices: Vec<Device> = devices
        .into_iter()
        .enumerate()
        .map(|(i, dev)| {
            dev.unwrap_or_else(|| {
                let mut dev = Device::new(i, &recipients[i], x);
                dev.error = Some("did not finish by the deadline".into());
                dev
            })
        })
        .collect();

    Ok(outcome(args, &fill, fill_s, settle_s, setup_s, &devices))
}

// --------------------------------------------------------------- figures

/// min / p50 / p90 / max / mean of `v` (nearest rank; zeros when empty).
fn spread(mut v: Vec<f64>) -> Json {
    v.sort_by(f64::total_cmp);
    let q = |q: f64| {
        if v.is_empty() {
            return 0.0;
        }
        let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
        v[rank - 1]
    };
    let mean = if v.is_empty() { 0.0 } else { v.iter().sum::<f64>() / v.len() as f64 };
    Json::obj()
        .with("count", v.len())
        .with("min", q(0.0))
        .with("p50", q(0.5))
        .with("p90", q(0.9))
        .with("max", q(1.0))
        .with("mean", mean)
}

fn p50_max(v: &[f64]) -> (f64, f64) {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return (0.0, 0.0);
    }
    (v[v.len().div_ceil(2) - 1], v[v.len() - 1])
}

fn ms(us: Option<u64>) -> Json {
    us.map_or(Json::Null, |u| Json::from(u as f64 / 1000.0))
}

fn outcome(
    args: &SyncArgs,
    fill: &Fill,
    fill_s: f64,
    settle_s: f64,
    setup_s: f64,
    devices: &[Device],
) -> Outcome {
    let x = args.messages;
    let ok: Vec<&Device> = devices.iter().filter(|d| d.error.is_none()).collect();
    let sign_in: Vec<f64> = ok.iter().filter_map(|d| d.sign_in_us).map(|u| u as f64 / 1000.0).collect();
    let connect: Vec<f64> = ok.iter().filter_map(|d| d.connect_us).map(|u| u as f64 / 1000.0).collect();
    let catch_up: Vec<f64> = ok.iter().filter_map(|d| d.catch_up_us).map(|u| u as f64 / 1000.0).collect();
    let rates: Vec<f64> = ok
        .iter()
        .filter_map(|d| d.catch_up_us.map(|u| d.received as f64 / (u as f64 / 1e6).max(1e-6)))
        .collect();
    let ack: Vec<f64> = ok.iter().filter_map(|d| d.ack_us).map(|u| u as f64 / 1000.0).collect();
    let sum = |f: fn(&Device) -> u64| devices.iter().map(f).sum::<u64>();
    let received = sum(|d| d.received);
    let missing: u64 = devices.iter().map(|d| x - d.distinct()).sum();
    let duplicated = sum(|d| d.duplicated);
    let (bytes, pages) = (sum(|d| d.bytes), sum(|d| d.pages));
    let complete = devices.iter().filter(|d| d.complete(x)).count();
    let errors = devices.iter().filter(|d| d.error.is_some()).count();
    let first = devices.iter().map(|d| d.started_us).min().unwrap_or(0);
    let last = ok.iter().filter_map(|d| d.done_us).max().unwrap_or(first);
    let wall_s = (last.saturating_sub(first) as f64 / 1e6).max(1e-6);
    let total_rate = if errors == 0 { received as f64 / wall_s } else { 0.0 };
    let fill_acked = fill.acked.load(Ordering::Relaxed);

    let listed: Vec<Json> = devices
        .iter()
        .take(MAX_LISTED_DEVICES)
        .map(|d| {
            Json::obj()
                .with("user_id", d.user.0)
                .with("device_id", d.device.0)
                .with("complete", d.complete(x))
                .with("expected", x)
                .with("received", d.received)
                .with("distinct", d.distinct())
                .with("missing", x - d.distinct())
                .with("duplicated", d.duplicated)
                .with("foreign", d.foreign)
                .with("first_seq", d.first_seq)
                .with("last_seq", d.last_seq)
                .with("seq_gaps", d.seq_gaps)
                .with("seq_repeats", d.seq_repeats)
                .with("sign_in_last_seq", d.sign_in_last_seq)
                .with("sign_in_ack_seq", d.sign_in_ack_seq)
                .with("acked_seq", d.acked_seq)
                .with("connect_ms", ms(d.connect_us))
                .with("sign_in_ms", ms(d.sign_in_us))
                .with("catch_up_ms", ms(d.catch_up_us))
                .with(
                    "messages_per_second",
                    d.catch_up_us
                        .map_or(Json::Null, |u| Json::from(d.received as f64 / (u as f64 / 1e6).max(1e-6))),
                )
                .with("ack_ms", ms(d.ack_us))
                .with("bytes_received", d.bytes)
                .with("pages", d.pages)
                .with("largest_page", d.largest_page)
                .with("retries", d.retries)
                .with("pushes_during_sync", d.pushes)
                .with("error", d.error.clone().map_or(Json::Null, Json::from))
        })
        .collect();

    let results = Json::obj()
        .with("setup_seconds", setup_s)
        .with(
            "fill",
            Json::obj()
                .with("via", format!("{:?}", args.fill_via).to_lowercase())
                .with("messages", fill.total)
                .with("acked", fill_acked)
                .with("seconds", fill_s)
                .with("messages_per_second", fill_acked as f64 / fill_s.max(1e-6))
                .with("retries", fill.retries.load(Ordering::Relaxed))
                .with("errors", fill.errors.to_json())
                .with("relay_settle_seconds", settle_s),
        )
        .with(
            "sync",
            Json::obj()
                .with("devices", devices.len())
                .with("devices_complete", complete)
                .with("devices_failed", errors)
                .with("messages_expected", fill.total)
                .with("messages_received", received)
                .with("missing", missing)
                .with("duplicated", duplicated)
                .with("foreign", sum(|d| d.foreign))
                .with("seq_gaps", sum(|d| d.seq_gaps))
                .with("seq_repeats", sum(|d| d.seq_repeats))
                .with("pushes_during_sync", sum(|d| d.pushes))
                .with("wall_seconds", wall_s)
                .with("total_messages_per_second", total_rate)
                .with("connect_ms", spread(connect))
                .with("sign_in_ms", spread(sign_in.clone()))
                .with("catch_up_ms", spread(catch_up.clone()))
                .with("messages_per_second_per_device", spread(rates.clone()))
                .with("ack_ms", spread(ack))
                .with("bytes_received", bytes)
                .with("bytes_per_message", bytes as f64 / received.max(1) as f64)
                .with("pages", pages)
                .with("retries", sum(|d| d.retries)),
        )
        .with("devices_listed", listed.len())
        .with("devices", Json::Arr(listed));
    let params = Json::obj()
        .with("devices", args.devices)
        .with("messages_per_device", x)
        .with("senders", args.senders)
        .with("page", args.page)
        .with("message_bytes", args.size)
        .with("fill_via", format!("{:?}", args.fill_via).to_lowercase())
        .with("fill_inflight_per_sender", args.fill_inflight)
        .with("stall_timeout_seconds", args.stall.as_secs_f64())
        .with("sync_timeout_seconds", args.sync_timeout.as_secs_f64());
    let (si50, simax) = p50_max(&sign_in);
    let (cu50, cumax) = p50_max(&catch_up);
    let (r50, _) = p50_max(&rates);
    let summary = format!(
        "sync: {} devices × {x} messages (fill {:.0} msg/s via {}, relay settle {settle_s:.2} s); sign-in p50 {si50:.1} max {simax:.1} ms; \
         catch-up p50 {:.2} max {:.2} s, {r50:.0} msg/s per device (p50), {total_rate:.0} msg/s total; \
         {pages} pages of ≤{}, {:.1} MiB; complete {complete}/{}, missing {missing}, duplicated {duplicated}, failed {errors}",
        args.devices,
        fill_acked as f64 / fill_s.max(1e-6),
        format!("{:?}", args.fill_via).to_lowercase(),
        cu50 / 1000.0,
        cumax / 1000.0,
        args.page,
        bytes as f64 / (1024.0 * 1024.0),
        devices.len(),
    );
    Outcome { params, results, summary }
}
