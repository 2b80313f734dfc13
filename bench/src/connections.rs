//! `rim bench connections`: M idle, signed-in TCP connections to one
//! gateway; reports the gateway's resident memory per connection and the
//! sign-in rate.
//!
//! 1. Registers `--users` users by gRPC and gives them devices
//!    (`RegisterDevice`) until there is one device per connection:
//!    connection `i` is device `i / users` of user `i % users`.
//! 2. Reads the gateway's `VmRSS` (`/proc/PID/status`), then opens the
//!    connections, at most `--concurrency` connecting or signing in at once.
//!    Each binds its socket to `127.0.0.(2 + i % K)` first (`--local-ips K`,
//!    loopback gateways only), so more than one port range of connections
//!    fit, sends `SIGN_IN` and waits for `OK`.
//! 3. Holds them idle for `--hold` (heartbeating at the announced interval,
//!    as a real client would), reads `VmRSS` again, closes them, and reads it
//!    once more a few seconds later.
//!
//! RSS per connection = (RSS after the hold − RSS before) / connections;
//! the marginal figure uses the growth from half the connections to all of
//! them instead, which leaves out one-off allocations (per-user push
//! subscriptions, buffers that grow once). Kernel socket memory is not in
//! RSS; the `Slab` delta of `/proc/meminfo` (both ends of every connection,
//! and the rest of the machine) is recorded as a rough indication.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use rim_proto::v1::Command;
use tokio::io::AsyncWriteExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};

use super::Outcome;
use super::accounts::{self, Api, Cred};
use super::hist::Histogram;
use super::json::Json;
use super::progress::{Progress, Tally, code_name};
use super::sys::{self, mib};
use super::target::{Target, TargetArgs};
use super::wire::{self, Reader, SignInError};

/// Flags of `rim bench connections`.
#[derive(Args, Debug)]
pub struct ConnectionsArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    /// Result file (default bench-connections.json).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Connections to open.
    #[arg(long, default_value_t = 10_000)]
    connections: usize,
    /// Users owning the connections' devices (each registration costs an argon2 hash).
    #[arg(long, default_value_t = 100)]
    users: usize,
    /// Connections connecting or signing in at once.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Concurrent user registrations.
    #[arg(long, default_value_t = 4)]
    user_concurrency: usize,
    /// Concurrent device registrations.
    #[arg(long, default_value_t = 32)]
    device_concurrency: usize,
    /// Spread source addresses over 127.0.0.2..=127.0.0.(1+K) (0: let the OS choose).
    #[arg(long, default_value_t = 16)]
    local_ips: u8,
    /// How long to hold the connections idle after the last sign-in.
    #[arg(long, default_value = "10s", value_parser = sys::parse_duration)]
    hold: Duration,
    /// Timeout of one connection's connect + sign-in.
    #[arg(long, default_value = "15s", value_parser = sys::parse_duration)]
    sign_in_timeout: Duration,
}

/// Counters shared by the connection tasks.
#[derive(Default)]
struct Shared {
    signed: AtomicUsize,
    failed: AtomicUsize,
    /// Signed-in connections the gateway closed (or kicked) later.
    closed: AtomicUsize,
    /// Tasks still running.
    live: AtomicUsize,
    /// Microseconds from the first connect to the latest successful sign-in.
    last_ok_us: AtomicU64,
    errors: Tally,
    /// Connect + sign-in latency, microseconds.
    sign_in: Mutex<Histogram>,
}

/// One RSS sample: seconds since the first connect, connections signed in, gateway RSS.
type Sample = (f64, usize, Option<u64>);

/// Most RSS samples kept (one a second).
const MAX_SAMPLES: usize = 3600;

/// Runs the scenario.
pub async fn run(args: &ConnectionsArgs, target: &Target) -> anyhow::Result<Outcome> {
    let m = args.connections;
    anyhow::ensure!(m >= 1 && args.users >= 1, "--connections and --users must be at least 1");
    anyhow::ensure!(args.local_ips <= 250, "--local-ips must be at most 250");
    let users = args.users.min(m);
    let need = m as u64 + 256;
    sys::check_nofile(need, &format!("{m} connections"))?;
    if let Some(pid) = target.gateway_pid
        && let Some((soft, _)) = sys::nofile_limits(Some(pid))
    {
        anyhow::ensure!(
            soft >= need,
            "the gateway (pid {pid}) may open only {soft} files; {m} connections need {need}"
        );
    }
    let local = |i: usize| -> Option<Ipv4Addr> {
        (args.local_ips > 0 && target.gateway.ip().is_loopback())
            .then(|| Ipv4Addr::new(127, 0, 0, 2 + (i % usize::from(args.local_ips)) as u8))
    };

    // 1. Accounts.
    let api = Api::new(&target.apis)?;
    let t_accounts = Instant::now();
    let owners = accounts::users(&api, &accounts::run_prefix(), users, args.user_concurrency).await?;
    let extra: Vec<usize> = (0..users).map(|u| m / users + usize::from(u < m % users) - 1).collect();
    let devices = accounts::devices(&api, &owners, &extra, args.device_concurrency).await?;
    let accounts_s = t_accounts.elapsed().as_secs_f64();
    let creds: Vec<Cred> = (0..m).map(|i| devices[i % users][i / users].clone()).collect();

    // 2. Open.
    let pid = target.gateway_pid;
    let rss = move || pid.and_then(sys::rss_kib);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (rss_before, self_before, slab_before) = (rss(), sys::self_rss_kib(), sys::meminfo_kib("Slab:"));
    let sh = Arc::new(Shared::default());
    let samples: Arc<Mutex<Vec<Sample>>> = Arc::default();
    let (stop_tx, stop_rx) = watch::channel(false);
    let t0 = Instant::now();
    let progress = {
        let (sh, samples) = (sh.clone(), samples.clone());
        let mut last = (0.0, 0usize);
        Progress::start("connections", move |elapsed| {
            let (signed, failed) = (sh.signed.load(Ordering::Relaxed), sh.failed.load(Ordering::Relaxed));
            let now = rss();
            let mut s = samples.lock().unwrap_or_else(PoisonError::into_inner);
            if s.len() < MAX_SAMPLES {
                s.push((elapsed.as_secs_f64(), signed, now));
            }
            let rate = (signed - last.1) as f64 / (elapsed.as_secs_f64() - last.0).max(1e-3);
            last = (elapsed.as_secs_f64(), signed);
            let p = sh.sign_in.lock().unwrap_or_else(PoisonError::into_inner);
            format!(
                "signed in {signed}/{m} ({rate:.0}/s), failed {failed}, closed {}, sign-in p50 {:.1} ms p99 {:.1} ms, gateway RSS {}",
                sh.closed.load(Ordering::Relaxed),
                p.quantile(0.5) as f64 / 1000.0,
                p.quantile(0.99) as f64 / 1000.0,
                now.map_or("?".into(), |k| format!("{:.1} MiB", mib(k)))
            )
        })
    };
    let sem = Arc::new(Semaphore::new(args.concurrency.max(1)));
    for (i, cred) in creds.into_iter().enumerate() {
        let permit = tokio::time::timeout(args.sign_in_timeout * 2, sem.clone().acquire_owned())
            .await
            .context("no connection slot freed in time")??;
        sh.live.fetch_add(1, Ordering::Relaxed);
        let task = Conn { gateway: target.gateway, local: local(i), cred, timeout: args.sign_in_timeout, t0 };
        tokio::spawn(task.run(permit, sh.clone(), stop_rx.clone()));
    }
    let deadline = Instant::now() + args.sign_in_timeout + Duration::from_secs(5);
    while sh.signed.load(Ordering::Relaxed) + sh.failed.load(Ordering::Relaxed) < m
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let signed = sh.signed.load(Ordering::Relaxed);
    let open_s = sh.last_ok_us.load(Ordering::Relaxed) as f64 / 1e6;
    let (rss_signed, self_signed) = (rss(), sys::self_rss_kib());

    // 3. Hold, measure, close.
    tokio::time::sleep(args.hold).await;
    let (rss_held, slab_held) = (rss(), sys::meminfo_kib("Slab:"));
    let held_samples = samples.lock().unwrap_or_else(PoisonError::into_inner).len();
    let open_after_hold = signed - sh.closed.load(Ordering::Relaxed);
    let _ = stop_tx.send(true);
    let deadline = Instant::now() + Duration::from_secs(30);
    while sh.live.load(Ordering::Relaxed) > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rss_closed = rss();
    progress.finish().await;

    // Figures.
    let per_conn = |after: Option<u64>| match (after, rss_before) {
        (Some(a), Some(b)) if signed > 0 => Some((a as f64 - b as f64) * 1024.0 / signed as f64),
        _ => None,
    };
    let marginal = {
        let s = samples.lock().unwrap_or_else(PoisonError::into_inner);
        let half = s[..held_samples.min(s.len())].iter().find(|x| x.1 >= signed / 2 && x.1 > 0).copied();
        match (half, rss_held) {
            (Some((_, n, Some(r))), Some(end)) if signed > n => {
                Some((end as f64 - r as f64) * 1024.0 / (signed - n) as f64)
            }
            _ => None,
        }
    };
    let hist = sh.sign_in.lock().unwrap_or_else(PoisonError::into_inner).clone();
    let rate = if open_s > 0.0 { signed as f64 / open_s } else { 0.0 };
    let delta = |a: Option<u64>, b: Option<u64>| a.zip(b).map(|(a, b)| a as i64 - b as i64);
    let results = Json::obj()
        .with("connections_signed_in", signed)
        .with("connections_failed", sh.failed.load(Ordering::Relaxed))
        .with("errors", sh.errors.to_json())
        .with("open_after_hold", open_after_hold)
        .with("accounts_seconds", accounts_s)
        .with("sign_in_seconds", open_s)
        .with("sign_ins_per_second", rate)
        .with("sign_in_latency_ms", latency_json(&hist))
        .with("gateway_pid", pid)
        .with(
            "gateway_rss_kib",
            Json::obj()
                .with("before", rss_before)
                .with("all_signed_in", rss_signed)
                .with("after_hold", rss_held)
                .with("after_close", rss_closed),
        )
        .with("gateway_rss_bytes_per_connection", per_conn(rss_held))
        .with("gateway_rss_bytes_per_connection_marginal", marginal)
        .with(
            "bench_rss_bytes_per_connection",
            delta(self_signed, self_before).map(|d| d as f64 * 1024.0 / signed.max(1) as f64),
        )
        .with("kernel_slab_delta_kib", delta(slab_held, slab_before))
        .with(
            "rss_samples",
            Json::Arr(
                samples
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .iter()
                    .map(|(t, n, r)| Json::Arr(vec![Json::from(*t), Json::from(*n), Json::from(*r)]))
                    .collect(),
            ),
        );
    let params = Json::obj()
        .with("connections", m)
        .with("users", users)
        .with("concurrency", args.concurrency)
        .with("local_ips", args.local_ips)
        .with("hold_seconds", args.hold.as_secs_f64())
        .with("sign_in_timeout_seconds", args.sign_in_timeout.as_secs_f64());
    let summary = format!(
        "connections: {signed}/{m} signed in ({} failed) at {rate:.0}/s; gateway RSS {} → {} = {} per connection (marginal {}); {} still open after {:?}",
        sh.failed.load(Ordering::Relaxed),
        rss_before.map_or("?".into(), |k| format!("{:.1} MiB", mib(k))),
        rss_held.map_or("?".into(), |k| format!("{:.1} MiB", mib(k))),
        per_conn(rss_held).map_or("?".into(), |b| format!("{:.2} KiB", b / 1024.0)),
        marginal.map_or("?".into(), |b| format!("{:.2} KiB", b / 1024.0)),
        open_after_hold,
        args.hold,
    );
    Ok(Outcome { params, results, summary })
}

/// p50/p90/p99/p99.9/max/mean in milliseconds.
pub fn latency_json(h: &Histogram) -> Json {
    let ms = |us: u64| us as f64 / 1000.0;
    Json::obj()
        .with("count", h.count())
        .with("min", ms(h.min()))
        .with("p50", ms(h.quantile(0.5)))
        .with("p90", ms(h.quantile(0.9)))
        .with("p99", ms(h.quantile(0.99)))
        .with("p99_9", ms(h.quantile(0.999)))
        .with("max", ms(h.max()))
        .with("mean", h.mean() / 1000.0)
}

/// One connection: connect, sign in, stay idle until told to stop.
struct Conn {
    gateway: std::net::SocketAddr,
    local: Option<Ipv4Addr>,
    cred: Cred,
    timeout: Duration,
    t0: Instant,
}

impl Conn {
    async fn run(self, permit: OwnedSemaphorePermit, sh: Arc<Shared>, mut stop: watch::Receiver<bool>) {
        let started = Instant::now();
        let mut reader = Reader::new(256);
        let opened = async {
            let mut s = tokio::time::timeout(self.timeout, wire::connect(self.gateway, self.local, true))
                .await
                .map_err(|_| "connect: timeout".to_string())?
                .map_err(|e| format!("connect: {}", e.kind()))?;
            let left = self.timeout.saturating_sub(started.elapsed());
            let c = &self.cred;
            match wire::sign_in(&mut s, &mut reader, c.user, c.device, &c.token, left).await {
                Ok(hb) => Ok((s, hb)),
                Err(SignInError::Refused(code, _)) => Err(format!("sign-in refused: {}", code_name(code))),
                Err(SignInError::Io(e)) => {
                    Err(format!("sign-in: {}", e.chars().take(60).collect::<String>()))
                }
            }
        }
        .await;
        drop(permit);
        let (mut s, hb) = match opened {
            Ok(x) => x,
            Err(e) => {
                sh.errors.add(e);
                sh.failed.fetch_add(1, Ordering::Relaxed);
                sh.live.fetch_sub(1, Ordering::Relaxed);
                return;
            }
        };
        sh.sign_in
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .record(started.elapsed().as_micros() as u64);
        sh.last_ok_us.fetch_max(self.t0.elapsed().as_micros() as u64, Ordering::Relaxed);
        sh.signed.fetch_add(1, Ordering::Relaxed);
        let mut beat = tokio::time::interval_at(tokio::time::Instant::now() + hb, hb);
        let mut request_id = 1;
        let closed = loop {
            tokio::select! {
                p = reader.next(&mut s) => match p {
                    Ok(Some(p)) if p.command == Command::Kick as i32 => {
                        break Some(format!("kicked: {}", code_name(wire::kick_code(&p.content))));
                    }
                    Ok(Some(_)) => {}
                    Ok(None) => break Some("closed by the gateway".to_string()),
                    Err(e) => break Some(format!("read: {}", e.to_string().chars().take(60).collect::<String>())),
                },
                _ = beat.tick() => {
                    request_id += 1;
                    let f = wire::request_frame(request_id, Command::Heartbeat, &());
                    match tokio::time::timeout(Duration::from_secs(5), s.write_all(&f)).await {
                        Ok(Ok(())) => {}
                        _ => break Some("heartbeat write failed".to_string()),
                    }
                }
                _ = stop.changed() => break None,
            }
        };
        if let Some(why) = closed {
            sh.errors.add(why);
            sh.closed.fetch_add(1, Ordering::Relaxed);
        }
        sh.live.fetch_sub(1, Ordering::Relaxed);
    }
}
