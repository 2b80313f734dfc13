//! `rim bench latency` (alias `delivery-latency`): P pairs of users, each
//! with one device connected to the gateway over TCP; the first of each
//! pair sends 1:1 text messages to the second at `--rate` messages per
//! second in aggregate (open loop: every sender ticks at `pairs / rate`,
//! phases spread evenly), for `--warmup` (not recorded) plus `--duration`.
//!
//! * **send → ack**: from writing `SEND` to reading its reply. The send
//!   time (µs since the run's epoch) is the packet's `request_id`, so no
//!   table of sends in flight is needed.
//! * **send → delivered**: from writing `SEND` to reading the `MESSAGE` push
//!   at the recipient's connection. The send time is the first word of the
//!   message text; sender and recipient share the bench's clock.
//!
//! A sender with `--max-inflight` sends unanswered skips its tick (counted
//! as `skipped`): the offered rate then drops below the target, which the
//! summary shows. After the last send the bench waits up to `--drain` for
//! outstanding acks and deliveries; measured sends acknowledged but not
//! delivered by then are `undelivered`. Recipients heartbeat at the
//! announced interval; nobody ACKs (pushes need no ACK to flow).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use rim_proto::v1::Command;
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::Outcome;
use super::accounts::{self, Api, Cred};
use super::connections::latency_json;
use super::hist::Histogram;
use super::json::Json;
use super::progress::{Progress, Tally, code_name};
use super::sys;
use super::target::{Target, TargetArgs};
use super::wire::{self, Reader};

/// Flags of `rim bench latency`.
#[derive(Args, Debug)]
pub struct LatencyArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    /// Result file (default bench-latency.json).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Sender → recipient pairs (2 × pairs users and connections).
    #[arg(long, default_value_t = 50)]
    pairs: usize,
    /// Target aggregate send rate, messages per second.
    #[arg(long, default_value_t = 500.0)]
    rate: f64,
    /// Measured sending time.
    #[arg(long, default_value = "30s", value_parser = sys::parse_duration)]
    duration: Duration,
    /// Sending time before the measurement (not recorded).
    #[arg(long, default_value = "3s", value_parser = sys::parse_duration)]
    warmup: Duration,
    /// Most unanswered sends per sender (the gateway allows 64).
    #[arg(long, default_value_t = 32)]
    max_inflight: usize,
    /// Message text size in bytes.
    #[arg(long, default_value_t = 100)]
    size: usize,
    /// Longest wait for outstanding acks and deliveries after the last send.
    #[arg(long, default_value = "10s", value_parser = sys::parse_duration)]
    drain: Duration,
    /// Concurrent user registrations.
    #[arg(long, default_value_t = 4)]
    user_concurrency: usize,
}

/// State shared by every task of a run.
struct Run {
    epoch: Instant,
    /// Send times (µs since `epoch`) in `from..to` are measured.
    from: u64,
    to: u64,
    sent: AtomicU64,
    sent_all: AtomicU64,
    acked: AtomicU64,
    acked_all: AtomicU64,
    delivered: AtomicU64,
    delivered_all: AtomicU64,
    skipped: AtomicU64,
    /// Pushes of the sender's own messages to its own device.
    echoes: AtomicU64,
    /// Pushes at a recipient that are not from its sender or not ours.
    unexpected: AtomicU64,
    inflight: AtomicI64,
    stopping: AtomicBool,
    errors: Tally,
    ack: Mutex<Histogram>,
    delivery: Mutex<Histogram>,
}

impl Run {
    fn now_us(&self) -> u64 {
        Instant::now().saturating_duration_since(self.epoch).as_micros() as u64
    }

    fn measured(&self, t: u64) -> bool {
        (self.from..self.to).contains(&t)
    }
}

fn lock(h: &Mutex<Histogram>) -> std::sync::MutexGuard<'_, Histogram> {
    h.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Runs the scenario.
pub async fn run(args: &LatencyArgs, target: &Target) -> anyhow::Result<Outcome> {
    let p = args.pairs;
    anyhow::ensure!(p >= 1, "--pairs must be at least 1");
    anyhow::ensure!(args.rate > 0.0 && args.rate.is_finite(), "--rate must be positive");
    anyhow::ensure!(!args.duration.is_zero(), "--duration must be positive");
    anyhow::ensure!(args.max_inflight >= 1, "--max-inflight must be at least 1");
    sys::check_nofile(2 * p as u64 + 256, &format!("{p} pairs"))?;

    // Accounts and connections.
    let api = Api::new(&target.apis)?;
    let prefix = accounts::run_prefix();
    let users = accounts::users(&api, &prefix, 2 * p, args.user_concurrency).await?;
    let mut conns = connect_all(target.gateway, &users).await?;

    // Sending.
    let epoch = Instant::now() + Duration::from_millis(200);
    let from = args.warmup.as_micros() as u64;
    let run = Arc::new(Run {
        epoch,
        from,
        to: from + args.duration.as_micros() as u64,
        sent: AtomicU64::new(0),
        sent_all: AtomicU64::new(0),
        acked: AtomicU64::new(0),
        acked_all: AtomicU64::new(0),
        delivered: AtomicU64::new(0),
        delivered_all: AtomicU64::new(0),
        skipped: AtomicU64::new(0),
        echoes: AtomicU64::new(0),
        unexpected: AtomicU64::new(0),
        inflight: AtomicI64::new(0),
        stopping: AtomicBool::new(false),
        errors: Tally::default(),
        ack: Mutex::new(Histogram::default()),
        delivery: Mutex::new(Histogram::default()),
    });
    let period = Duration::from_secs_f64(p as f64 / args.rate);
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut readers = JoinSet::new();
    let mut writers = JoinSet::new();
    for i in (0..p).rev() {
        let (recipient, sender) = (conns.pop().context("connection")?, conns.pop().context("connection")?);
        let (s_rd, s_wr) = sender.stream.into_split();
        let (r_rd, r_wr) = recipient.stream.into_split();
        let inflight = Arc::new(AtomicUsize::new(0));
        readers.spawn(read_sender(s_rd, sender.reader, run.clone(), inflight.clone()));
        readers.spawn(read_recipient(r_rd, recipient.reader, sender.user, run.clone()));
        let sending = Sending {
            to: recipient.user,
            id_prefix: format!("{prefix}-{i}"),
            offset: period.mul_f64(i as f64 / p as f64),
            period,
            max_inflight: args.max_inflight,
            size: args.size,
        };
        writers.spawn(sending.run(s_wr, run.clone(), inflight));
        writers.spawn(heartbeat(r_wr, recipient.heartbeat, stop_rx.clone()));
    }
    let progress = {
        let run = run.clone();
        let mut last = (0.0, 0u64);
        Progress::start("latency", move |_| {
            let t = run.now_us() as f64 / 1e6;
            let sent = run.sent_all.load(Ordering::Relaxed);
            let rate = (sent - last.1) as f64 / (t - last.0).max(1e-3);
            last = (t, sent);
            let phase = if run.now_us() < run.from {
                "warmup"
            } else if run.now_us() < run.to {
                "measuring"
            } else {
                "draining"
            };
            let (a, d) = (lock(&run.ack), lock(&run.delivery));
            format!(
                "{phase} {t:.0}s: {rate:.0} msg/s, sent {sent}, acked {}, delivered {}, ack p50/p99 {:.1}/{:.1} ms, delivered p50/p99 {:.1}/{:.1} ms, errors {}, skipped {}",
                run.acked_all.load(Ordering::Relaxed),
                run.delivered_all.load(Ordering::Relaxed),
                a.quantile(0.5) as f64 / 1000.0,
                a.quantile(0.99) as f64 / 1000.0,
                d.quantile(0.5) as f64 / 1000.0,
                d.quantile(0.99) as f64 / 1000.0,
                run.errors.total(),
                run.skipped.load(Ordering::Relaxed),
            )
        })
    };

    // Wait for the senders (they stop at the end of the window), then drain.
    let send_end = epoch + Duration::from_micros(run.to);
    tokio::time::sleep_until(send_end.into()).await;
    let mut write_halves = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let _ = stop_tx.send(true); // heartbeats of recipients end too; their halves are kept below
    while let Ok(Some(r)) = tokio::time::timeout_at(deadline, writers.join_next()).await {
        write_halves.push(r.context("a writer task panicked")?);
    }
    let drain_start = Instant::now();
    while drain_start.elapsed() < args.drain
        && (run.inflight.load(Ordering::Relaxed) > 0
            || run.delivered_all.load(Ordering::Relaxed) < run.acked_all.load(Ordering::Relaxed))
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let drain_s = drain_start.elapsed().as_secs_f64();
    run.stopping.store(true, Ordering::Relaxed);
    readers.abort_all();
    while tokio::time::timeout(Duration::from_secs(5), readers.join_next()).await.is_ok_and(|r| r.is_some()) {
    }
    drop(write_halves);
    progress.finish().await;

    // Figures.
    let secs = args.duration.as_secs_f64();
    let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let (ack, delivery) = (lock(&run.ack).clone(), lock(&run.delivery).clone());
    let undelivered = n(&run.acked).saturating_sub(n(&run.delivered));
    let results = Json::obj()
        .with("sent", n(&run.sent))
        .with("acked_ok", n(&run.acked))
        .with("delivered", n(&run.delivered))
        .with("undelivered_after_drain", undelivered)
        .with("skipped_at_inflight_limit", n(&run.skipped))
        .with("errors", run.errors.to_json())
        .with("errors_total", run.errors.total())
        .with("send_rate_per_second", n(&run.sent) as f64 / secs)
        .with("ack_throughput_per_second", n(&run.acked) as f64 / secs)
        .with("delivered_throughput_per_second", n(&run.delivered) as f64 / secs)
        .with("send_to_ack_ms", latency_json(&ack))
        .with("send_to_delivered_ms", latency_json(&delivery))
        .with("own_message_pushes_to_sender", n(&run.echoes))
        .with("unexpected_pushes", n(&run.unexpected))
        .with(
            "including_warmup",
            Json::obj()
                .with("sent", n(&run.sent_all))
                .with("acked_ok", n(&run.acked_all))
                .with("delivered", n(&run.delivered_all)),
        )
        .with("drain_seconds", drain_s);
    let params = Json::obj()
        .with("pairs", p)
        .with("target_rate_per_second", args.rate)
        .with("duration_seconds", secs)
        .with("warmup_seconds", args.warmup.as_secs_f64())
        .with("max_inflight_per_sender", args.max_inflight)
        .with("message_bytes", args.size)
        .with("drain_timeout_seconds", args.drain.as_secs_f64());
    let ms = |h: &Histogram, q: f64| h.quantile(q) as f64 / 1000.0;
    let summary = format!(
        "latency: target {:.0} msg/s, sent {:.0}/s, acked {:.0}/s; ack p50 {:.1} p99 {:.1} p99.9 {:.1} max {:.1} ms; \
         delivered p50 {:.1} p99 {:.1} p99.9 {:.1} max {:.1} ms; errors {}, skipped {}, undelivered {}",
        args.rate,
        n(&run.sent) as f64 / secs,
        n(&run.acked) as f64 / secs,
        ms(&ack, 0.5),
        ms(&ack, 0.99),
        ms(&ack, 0.999),
        ack.max() as f64 / 1000.0,
        ms(&delivery, 0.5),
        ms(&delivery, 0.99),
        ms(&delivery, 0.999),
        delivery.max() as f64 / 1000.0,
        run.errors.total(),
        n(&run.skipped),
        undelivered,
    );
    Ok(Outcome { params, results, summary })
}

/// A signed-in connection.
pub(super) struct Connected {
    pub(super) user: u64,
    pub(super) stream: tokio::net::TcpStream,
    pub(super) reader: Reader,
    pub(super) heartbeat: Duration,
}

/// Connects and signs in every user's device, 16 at a time.
pub(super) async fn connect_all(
    gateway: std::net::SocketAddr,
    users: &[Cred],
) -> anyhow::Result<Vec<Connected>> {
    let sem = Arc::new(tokio::sync::Semaphore::new(16));
    let mut tasks = JoinSet::new();
    for (i, c) in users.iter().cloned().enumerate() {
        let sem = sem.clone();
        tasks.spawn(async move {
            let _permit = sem.acquire_owned().await?;
            let mut stream =
                tokio::time::timeout(Duration::from_secs(10), wire::connect(gateway, None, false))
                    .await
                    .context("connect timeout")??;
            let mut reader = Reader::new(16 * 1024);
            let hb =
                wire::sign_in(&mut stream, &mut reader, c.user, c.device, &c.token, Duration::from_secs(15))
                    .await
                    .map_err(|e| anyhow::anyhow!("sign-in of user {}: {e}", c.user))?;
            anyhow::Ok((i, Connected { user: c.user, stream, reader, heartbeat: hb }))
        });
    }
    let mut out: Vec<Option<Connected>> = (0..users.len()).map(|_| None).collect();
    while let Some(r) = tasks.join_next().await {
        let (i, c) = r.context("connect task panicked")??;
        out[i] = Some(c);
    }
    out.into_iter().map(|c| c.context("missing connection")).collect()
}

/// One sender's schedule.
struct Sending {
    to: u64,
    id_prefix: String,
    offset: Duration,
    period: Duration,
    max_inflight: usize,
    size: usize,
}

impl Sending {
    /// Sends until the end of the measured window; returns the write half
    /// (dropping it would half-close the connection, and the gateway closes
    /// a half-closed connection at once).
    async fn run(self, mut wr: OwnedWriteHalf, run: Arc<Run>, inflight: Arc<AtomicUsize>) -> OwnedWriteHalf {
        let start = tokio::time::Instant::from_std(run.epoch + self.offset);
        let mut tick = tokio::time::interval_at(start, self.period);
        let (mut last, mut n) = (0u64, 0u64);
        loop {
            tick.tick().await;
            let t = run.now_us().max(last + 1);
            if t >= run.to {
                return wr;
            }
            if inflight.load(Ordering::Relaxed) >= self.max_inflight {
                if run.measured(t) {
                    run.skipped.fetch_add(1, Ordering::Relaxed);
                }
                continue;
            }
            last = t;
            n += 1;
            let mut text = format!("{t} ").into_bytes();
            text.resize(self.size.max(text.len()), b'x');
            let input = wire::send_input(self.to, &format!("{}-{n}", self.id_prefix), &text);
            let frame = wire::frame(&wire::request(t, Command::Send, input));
            inflight.fetch_add(1, Ordering::Relaxed);
            run.inflight.fetch_add(1, Ordering::Relaxed);
            if !matches!(tokio::time::timeout(Duration::from_secs(5), wr.write_all(&frame)).await, Ok(Ok(())))
            {
                inflight.fetch_sub(1, Ordering::Relaxed);
                run.inflight.fetch_sub(1, Ordering::Relaxed);
                run.errors.add("send: write failed");
                return wr;
            }
            run.sent_all.fetch_add(1, Ordering::Relaxed);
            if run.measured(t) {
                run.sent.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Heartbeats a recipient until stopped; returns the write half.
pub(super) async fn heartbeat(
    mut wr: OwnedWriteHalf,
    every: Duration,
    mut stop: watch::Receiver<bool>,
) -> OwnedWriteHalf {
    let mut beat = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    let mut id = 1;
    loop {
        tokio::select! {
            _ = beat.tick() => {
                id += 1;
                let f = wire::frame(&wire::request(id, Command::Heartbeat, Vec::new()));
                if !matches!(tokio::time::timeout(Duration::from_secs(5), wr.write_all(&f)).await, Ok(Ok(()))) {
                    return wr;
                }
            }
            _ = stop.changed() => return wr,
        }
    }
}

/// Reads a sender's connection: replies to `SEND` (ack latency), its own
/// message copies, kicks.
async fn read_sender(mut rd: OwnedReadHalf, mut reader: Reader, run: Arc<Run>, inflight: Arc<AtomicUsize>) {
    loop {
        let p = match reader.next(&mut rd).await {
            Ok(Some(p)) => p,
            other => return closed(&run, "sender", other.err()),
        };
        if p.command == Command::Send as i32 && p.request_id != 0 {
            inflight.fetch_sub(1, Ordering::Relaxed);
            run.inflight.fetch_sub(1, Ordering::Relaxed);
            let now = run.now_us();
            match wire::reply(&p.content) {
                Ok(r) if r.code == 0 => {
                    run.acked_all.fetch_add(1, Ordering::Relaxed);
                    if run.measured(p.request_id) {
                        run.acked.fetch_add(1, Ordering::Relaxed);
                        lock(&run.ack).record(now.saturating_sub(p.request_id));
                    }
                }
                Ok(r) => run.errors.add(format!("send: {}", code_name(r.code))),
                Err(_) => run.errors.add("send: malformed reply"),
            }
        } else if p.command == Command::Message as i32 {
            run.echoes.fetch_add(1, Ordering::Relaxed);
        } else if p.command == Command::Kick as i32 {
            run.errors.add(format!("sender kicked: {}", code_name(wire::kick_code(&p.content))));
        }
    }
}

/// Reads a recipient's connection: `MESSAGE` pushes from its sender
/// (delivery latency).
async fn read_recipient(mut rd: OwnedReadHalf, mut reader: Reader, sender: u64, run: Arc<Run>) {
    loop {
        let p = match reader.next(&mut rd).await {
            Ok(Some(p)) => p,
            other => return closed(&run, "recipient", other.err()),
        };
        if p.command == Command::Kick as i32 {
            run.errors.add(format!("recipient kicked: {}", code_name(wire::kick_code(&p.content))));
            continue;
        }
        if p.command != Command::Message as i32 {
            continue;
        }
        let now = run.now_us();
        let sent_at = wire::pushed_message(&p.content).and_then(|(from, text)| {
            let t = std::str::from_utf8(text.split(|b| *b == b' ').next()?).ok()?.parse::<u64>().ok()?;
            (from == sender).then_some(t)
        });
        match sent_at {
            Some(t) => {
                run.delivered_all.fetch_add(1, Ordering::Relaxed);
                if run.measured(t) {
                    run.delivered.fetch_add(1, Ordering::Relaxed);
                    lock(&run.delivery).record(now.saturating_sub(t));
                }
            }
            None => {
                run.unexpected.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Counts an unexpected end of a connection (not when the run is stopping).
fn closed(run: &Run, who: &str, err: Option<anyhow::Error>) {
    if run.stopping.load(Ordering::Relaxed) {
        return;
    }
    match err {
        Some(e) => run
            .errors
            .add(format!("{who} connection: {}", e.to_string().chars().take(60).collect::<String>())),
        None => run.errors.add(format!("{who} connection closed by the gateway")),
    }
}
