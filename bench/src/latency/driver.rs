//! The connections of a `rim bench send` run and the tasks driving them:
//! one writer task per sender, one reader task per connection, and the
//! [`Driver`] that runs steps on them.
//!
//! Design and invariants:
//!
//! * Accounts and connections are made once. A run is one or more *steps*
//!   ([`Driver::step`]); between steps the connections stay open (senders
//!   and recipients heartbeat while idle) and nobody registers again.
//! * Each step has its own [`Window`]: warmup `start..from`, measured
//!   `from..to` (send times, µs since the epoch), with its own counters,
//!   histograms and error tally. Windows of successive steps are disjoint
//!   and a reply or push counts only in the current window and only if its
//!   send time lies in that window's measured range, so a late answer of
//!   one step never enters the figures of the next.
//! * Each sender holds a semaphore of `--max-inflight` permits: a send takes
//!   one, its reply (success or error) gives it back. In the open loop a
//!   tick that finds no permit is skipped (counted as `skipped`, and the
//!   offered rate drops below the target, which the summary shows); in the
//!   closed loop the sender waits for a permit until the window ends.
//! * After a step's last send the driver waits up to `--drain` until every
//!   measured send of the step is answered and every acked one delivered;
//!   what is missing by then is `unanswered` / `undelivered`.
//! * Every wait has a timeout; histograms have a fixed size ([`Histogram`]),
//!   error tallies a bounded number of kinds, the steps a bounded count.
//!   Recipients heartbeat at the announced interval; nobody ACKs (pushes need
//!   no ACK to flow).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use anyhow::Context;
use rim_proto::ids::UserId;
use rim_proto::v1::Command;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;

use super::{LatencyArgs, Rate};
use crate::accounts::{self, Api};
use crate::connections::latency_json;
use crate::cpu::CpuMeter;
use crate::hist::Histogram;
use crate::json::Json;
use crate::progress::{Progress, Tally, code_name};
use crate::target::Target;
use crate::wire::{self, Reader, connect_all, heartbeat, write_frame};

/// The figures of one step: counters and histograms of its measured window.
struct Window {
    /// Send times (µs since the epoch) in `start..from` are warmup, in
    /// `from..to` measured.
    start: u64,
    from: u64,
    to: u64,
    sent: AtomicU64,
    /// Measured sends answered (success or error).
    replied: AtomicU64,
    acked: AtomicU64,
    delivered: AtomicU64,
    skipped: AtomicU64,
    /// Errors that happened while this window was current (drain included).
    errors: Tally,
    ack: Mutex<Histogram>,
    delivery: Mutex<Histogram>,
}

impl Window {
    fn new(start: u64, from: u64, to: u64) -> Window {
        Window {
            start,
            from,
            to,
            sent: AtomicU64::new(0),
            replied: AtomicU64::new(0),
            acked: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            skipped: AtomicU64::new(0),
            errors: Tally::default(),
            ack: Mutex::new(Histogram::default()),
            delivery: Mutex::new(Histogram::default()),
        }
    }

    fn measured(&self, t: u64) -> bool {
        (self.from..self.to).contains(&t)
    }
}

/// State shared by every task of a run.
struct Run {
    epoch: Instant,
    /// The current step's window.
    window: RwLock<Arc<Window>>,
    /// What the progress line calls the current step.
    label: Mutex<String>,
    sent_all: AtomicU64,
    acked_all: AtomicU64,
    delivered_all: AtomicU64,
    /// Pushes of the sender's own messages to its own device.
    echoes: AtomicU64,
    /// Pushes at a recipient that are not from its sender or not ours.
    unexpected: AtomicU64,
    /// Connections that ended while the run was going on.
    broken: AtomicU64,
    stopping: AtomicBool,
    /// Every error of the run (each window also counts its own).
    errors: Tally,
}

impl Run {
    fn now_us(&self) -> u64 {
        Instant::now().saturating_duration_since(self.epoch).as_micros() as u64
    }

    fn window(&self) -> Arc<Window> {
        self.window.read().unwrap_or_else(PoisonError::into_inner).clone()
    }

    fn error(&self, kind: String) {
        self.window().errors.add(kind.clone());
        self.errors.add(kind);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What the senders do in a step.
struct Plan {
    window: Arc<Window>,
    /// Tick period of each sender (open loop), `None` for the closed loop.
    period: Option<Duration>,
}

/// What one step measured (a snapshot taken after its drain).
pub(crate) struct StepFigures {
    pub(crate) rate: Rate,
    pub(crate) duration: Duration,
    pub(crate) sent: u64,
    pub(crate) replied: u64,
    pub(crate) acked: u64,
    pub(crate) delivered: u64,
    pub(crate) skipped: u64,
    pub(crate) errors: Json,
    pub(crate) errors_total: u64,
    pub(crate) ack: Histogram,
    pub(crate) delivery: Histogram,
    pub(crate) drain: Duration,
    /// CPU use of the measured window (see [`CpuMeter::used`]).
    pub(crate) cpu: (Json, String),
}

impl StepFigures {
    fn per_s(&self, n: u64) -> f64 {
        n as f64 / self.duration.as_secs_f64()
    }

    /// Measured sends per second.
    pub(crate) fn sent_per_s(&self) -> f64 {
        self.per_s(self.sent)
    }

    /// Successful acks per second (of measured sends).
    pub(crate) fn acked_per_s(&self) -> f64 {
        self.per_s(self.acked)
    }

    /// Deliveries per second (of measured sends).
    pub(crate) fn delivered_per_s(&self) -> f64 {
        self.per_s(self.delivered)
    }

    /// The step's figures as JSON.
    pub(crate) fn to_json(&self) -> Json {
        Json::obj()
            .with("target_rate_per_second", self.rate.json())
            .with("duration_seconds", self.duration.as_secs_f64())
            .with("sent", self.sent)
            .with("acked_ok", self.acked)
            .with("delivered", self.delivered)
            .with("unanswered_after_drain", self.sent.saturating_sub(self.replied))
            .with("undelivered_after_drain", self.acked.saturating_sub(self.delivered))
            .with("skipped_at_inflight_limit", self.skipped)
            .with("errors", self.errors.clone())
            .with("errors_total", self.errors_total)
            .with("send_rate_per_second", self.sent_per_s())
            .with("ack_throughput_per_second", self.acked_per_s())
            .with("delivered_throughput_per_second", self.delivered_per_s())
            .with("send_to_ack_ms", latency_json(&self.ack))
            .with("send_to_delivered_ms", latency_json(&self.delivery))
            .with("drain_seconds", self.drain.as_secs_f64())
            .with("cpu", self.cpu.0.clone())
    }

    /// `ack p50 … p90 … p99 … p99.9 … max … ms; delivered p50 … ms`.
    pub(crate) fn latencies(&self) -> String {
        fn one(name: &str, h: &Histogram) -> String {
            let ms = |q: f64| h.quantile(q) as f64 / 1000.0;
            format!(
                "{name} p50 {:.1} p90 {:.1} p99 {:.1} p99.9 {:.1} max {:.1} ms",
                ms(0.5),
                ms(0.9),
                ms(0.99),
                ms(0.999),
                h.max() as f64 / 1000.0
            )
        }
        format!("{}; {}", one("ack", &self.ack), one("delivered", &self.delivery))
    }
}

/// The connections of a run and the tasks driving them.
pub(crate) struct Driver {
    run: Arc<Run>,
    pairs: usize,
    warmup: Duration,
    drain: Duration,
    plans: watch::Sender<Option<Arc<Plan>>>,
    stop: watch::Sender<bool>,
    writers: JoinSet<OwnedWriteHalf>,
    readers: JoinSet<()>,
    progress: Option<Progress>,
    cpu: CpuMeter,
}

impl Driver {
    /// Registers 2 × pairs users, connects them and starts the per-connection
    /// tasks (idle until the first step).
    pub(crate) async fn start(args: &LatencyArgs, target: &Target) -> anyhow::Result<Driver> {
        let p = args.pairs;
        let api = Api::new(&target.apis)?;
        let prefix = accounts::run_prefix();
        let users = accounts::users(&api, &prefix, 2 * p, args.user_concurrency).await?;
        let mut conns = connect_all(target.gateway, &users).await?;
        let run = Arc::new(Run {
            epoch: Instant::now(),
            window: RwLock::new(Arc::new(Window::new(0, 0, 0))),
            label: Mutex::new(String::new()),
            sent_all: AtomicU64::new(0),
            acked_all: AtomicU64::new(0),
            delivered_all: AtomicU64::new(0),
            echoes: AtomicU64::new(0),
            unexpected: AtomicU64::new(0),
            broken: AtomicU64::new(0),
            stopping: AtomicBool::new(false),
            errors: Tally::default(),
        });
        let (plans, plans_rx) = watch::channel(None::<Arc<Plan>>);
        let (stop, stop_rx) = watch::channel(false);
        let (mut readers, mut writers) = (JoinSet::new(), JoinSet::new());
        for i in (0..p).rev() {
            let (recipient, sender) =
                (conns.pop().context("connection")?, conns.pop().context("connection")?);
            let (s_rd, s_wr) = sender.stream.into_split();
            let (r_rd, r_wr) = recipient.stream.into_split();
            let permits = Arc::new(Semaphore::new(args.max_inflight));
            readers.spawn(read_sender(s_rd, sender.reader, run.clone(), permits.clone()));
            readers.spawn(read_recipient(r_rd, recipient.reader, sender.user, run.clone()));
            let s = Sender {
                to: recipient.user,
                id_prefix: format!("{prefix}-{i}"),
                phase: i as f64 / p as f64,
                size: args.size,
                permits,
                heartbeat: sender.heartbeat,
                n: 0,
                last: 0,
            };
            writers.spawn(s.run(s_wr, run.clone(), plans_rx.clone()));
            writers.spawn(heartbeat(r_wr, recipient.heartbeat, stop_rx.clone()));
        }
        let progress = {
            let run = run.clone();
            let mut last = (0.0, 0u64);
            Progress::start("send", move |_| {
                let t = run.now_us() as f64 / 1e6;
                let sent = run.sent_all.load(Ordering::Relaxed);
                let rate = (sent - last.1) as f64 / (t - last.0).max(1e-3);
                last = (t, sent);
                let w = run.window();
                let now = run.now_us();
                let phase = if now < w.from {
                    "warmup"
                } else if now < w.to {
                    "measuring"
                } else {
                    "draining"
                };
                let (a, d) = (lock(&w.ack), lock(&w.delivery));
                format!(
                    "{}{phase} {t:.0}s: {rate:.0} msg/s, sent {sent}, acked {}, delivered {}, ack p50/p99 {:.1}/{:.1} ms, delivered p50/p99 {:.1}/{:.1} ms, errors {}, skipped {}",
                    lock(&run.label),
                    run.acked_all.load(Ordering::Relaxed),
                    run.delivered_all.load(Ordering::Relaxed),
                    a.quantile(0.5) as f64 / 1000.0,
                    a.quantile(0.99) as f64 / 1000.0,
                    d.quantile(0.5) as f64 / 1000.0,
                    d.quantile(0.99) as f64 / 1000.0,
                    run.errors.total(),
                    w.skipped.load(Ordering::Relaxed),
                )
            })
        };
        Ok(Driver {
            run,
            pairs: p,
            warmup: args.warmup,
            drain: args.drain,
            plans,
            stop,
            writers,
            readers,
            progress: Some(progress),
            cpu: CpuMeter::new(target),
        })
    }

    /// Runs one step: `--warmup` then `duration` of sending at `rate`, then
    /// the drain; returns the figures of its measured window.
    pub(crate) async fn step(&mut self, rate: Rate, duration: Duration, label: String) -> StepFigures {
        let run = &self.run;
        *lock(&run.label) = label;
        let start = run.now_us() + 50_000;
        let from = start + self.warmup.as_micros() as u64;
        let to = from + duration.as_micros() as u64;
        let window = Arc::new(Window::new(start, from, to));
        *run.window.write().unwrap_or_else(PoisonError::into_inner) = window.clone();
        let period = match rate {
            Rate::PerSecond(r) => Some(Duration::from_secs_f64(self.pairs as f64 / r)),
            Rate::Max => None,
        };
        let _ = self.plans.send(Some(Arc::new(Plan { window: window.clone(), period })));
        tokio::time::sleep_until((run.epoch + Duration::from_micros(from)).into()).await;
        let cpu_from = self.cpu.sample();
        tokio::time::sleep_until((run.epoch + Duration::from_micros(to)).into()).await;
        let cpu_to = self.cpu.sample();
        // Senders stop at `to`; a write started just before may still count a send.
        let drain_start = Instant::now();
        let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
        while drain_start.elapsed() < self.drain
            && (n(&window.replied) < n(&window.sent) || n(&window.delivered) < n(&window.acked))
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        StepFigures {
            rate,
            duration,
            sent: n(&window.sent),
            replied: n(&window.replied),
            acked: n(&window.acked),
            delivered: n(&window.delivered),
            skipped: n(&window.skipped),
            errors: window.errors.to_json(),
            errors_total: window.errors.total(),
            ack: lock(&window.ack).clone(),
            delivery: lock(&window.delivery).clone(),
            drain: drain_start.elapsed(),
            cpu: self.cpu.used(&cpu_from, &cpu_to, duration.as_secs_f64(), n(&window.acked)),
        }
    }

    /// Connections that ended while the run was going on (0 if all are up).
    pub(crate) fn broken(&self) -> u64 {
        self.run.broken.load(Ordering::Relaxed)
    }

    /// Run-wide figures (all steps, warmups included).
    /// The run's epoch: message texts start with their send time in µs since it.
    pub(crate) fn epoch(&self) -> Instant {
        self.run.epoch
    }

    /// Successful acks so far, warm-ups included.
    pub(crate) fn acked_all(&self) -> u64 {
        self.run.acked_all.load(Ordering::Relaxed)
    }

    pub(crate) fn totals(&self) -> Json {
        let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Json::obj()
            .with("sent", n(&self.run.sent_all))
            .with("acked_ok", n(&self.run.acked_all))
            .with("delivered", n(&self.run.delivered_all))
            .with("errors", self.run.errors.to_json())
            .with("errors_total", self.run.errors.total())
            .with("own_message_pushes_to_sender", n(&self.run.echoes))
            .with("unexpected_pushes", n(&self.run.unexpected))
            .with("broken_connections", n(&self.run.broken))
    }

    /// Stops every task and closes the connections.
    pub(crate) async fn finish(mut self) -> anyhow::Result<()> {
        let _ = self.plans.send(None);
        let _ = self.stop.send(true);
        let mut write_halves = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while let Ok(Some(r)) = tokio::time::timeout_at(deadline, self.writers.join_next()).await {
            write_halves.push(r.context("a writer task panicked")?);
        }
        self.run.stopping.store(true, Ordering::Relaxed);
        self.writers.abort_all();
        self.readers.abort_all();
        while tokio::time::timeout(Duration::from_secs(5), self.readers.join_next())
            .await
            .is_ok_and(|r| r.is_some())
        {}
        drop(write_halves);
        if let Some(p) = self.progress.take() {
            p.finish().await;
        }
        Ok(())
    }
}

/// One sender: its recipient, its in-flight permits and its send counter.
struct Sender {
    to: UserId,
    id_prefix: String,
    /// Offset of its ticks within a period, as a fraction of the period.
    phase: f64,
    size: usize,
    permits: Arc<Semaphore>,
    heartbeat: Duration,
    /// Sends so far (client message ids).
    n: u64,
    /// Send time of the last send (request ids stay unique).
    last: u64,
}

impl Sender {
    /// Runs every plan it is given, heartbeating while idle, until the plan
    /// channel says stop or a write fails; returns the write half (dropping
    /// it would half-close the connection, and the gateway closes a
    /// half-closed connection at once).
    async fn run(
        mut self,
        mut wr: OwnedWriteHalf,
        run: Arc<Run>,
        mut plans: watch::Receiver<Option<Arc<Plan>>>,
    ) -> OwnedWriteHalf {
        let mut beat = tokio::time::interval_at(tokio::time::Instant::now() + self.heartbeat, self.heartbeat);
        let mut beat_id = 0u64;
        loop {
            tokio::select! {
                changed = plans.changed() => {
                    let plan = plans.borrow_and_update().clone();
                    let (Ok(()), Some(plan)) = (changed, plan) else { return wr };
                    if !self.step(&mut wr, &run, &plan).await {
                        return wr;
                    }
                    beat.reset();
                }
                _ = beat.tick() => {
                    beat_id += 1;
                    let f = wire::request_frame(beat_id, Command::Heartbeat, &());
                    if !write_frame(&mut wr, &f).await {
                        run.error("sender heartbeat: write failed".into());
                        return wr;
                    }
                }
            }
        }
    }

    /// Sends during a plan's window; false if a write failed.
    async fn step(&mut self, wr: &mut OwnedWriteHalf, run: &Run, plan: &Plan) -> bool {
        let w = &plan.window;
        let at = |us: u64| tokio::time::Instant::from_std(run.epoch + Duration::from_micros(us));
        match plan.period {
            Some(period) => {
                let mut tick = tokio::time::interval_at(at(w.start) + period.mul_f64(self.phase), period);
                loop {
                    tick.tick().await;
                    let t = run.now_us().max(self.last + 1);
                    if t >= w.to {
                        return true;
                    }
                    match self.permits.try_acquire() {
                        Ok(p) => p.forget(),
                        Err(_) => {
                            if w.measured(t) {
                                w.skipped.fetch_add(1, Ordering::Relaxed);
                            }
                            continue;
                        }
                    }
                    if !self.send(wr, run, w, t).await {
                        return false;
                    }
                }
            }
            None => {
                tokio::time::sleep_until(at(w.start)).await;
                loop {
                    match tokio::time::timeout_at(at(w.to), self.permits.acquire()).await {
                        Ok(Ok(p)) => p.forget(),
                        _ => return true,
                    }
                    let t = run.now_us().max(self.last + 1);
                    if t >= w.to {
                        self.permits.add_permits(1);
                        return true;
                    }
                    if !self.send(wr, run, w, t).await {
                        return false;
                    }
                }
            }
        }
    }

    /// Writes one `SEND` stamped `t` (its permit is taken); false if the write failed.
    async fn send(&mut self, wr: &mut OwnedWriteHalf, run: &Run, w: &Window, t: u64) -> bool {
        self.last = t;
        self.n += 1;
        let mut text = format!("{t} ").into_bytes();
        text.resize(self.size.max(text.len()), b'x');
        let input = wire::send_input(self.to, &format!("{}-{}", self.id_prefix, self.n), &text);
        let frame = wire::request_frame(t, Command::Send, &input);
        if !write_frame(wr, &frame).await {
            self.permits.add_permits(1);
            run.error("send: write failed".into());
            return false;
        }
        run.sent_all.fetch_add(1, Ordering::Relaxed);
        if w.measured(t) {
            w.sent.fetch_add(1, Ordering::Relaxed);
        }
        true
    }
}

/// Reads a sender's connection: replies to `SEND` (ack latency; each gives
/// a permit back), its own message copies, kicks.
async fn read_sender(mut rd: OwnedReadHalf, mut reader: Reader, run: Arc<Run>, permits: Arc<Semaphore>) {
    loop {
        let p = match reader.next(&mut rd).await {
            Ok(Some(p)) => p,
            other => return closed(&run, "sender", other.err()),
        };
        if p.command == Command::Send as i32 && p.request_id != 0 {
            permits.add_permits(1);
            let now = run.now_us();
            let w = run.window();
            let measured = w.measured(p.request_id);
            if measured {
                w.replied.fetch_add(1, Ordering::Relaxed);
            }
            match wire::reply(&p.content) {
                Ok(r) if r.code == 0 => {
                    run.acked_all.fetch_add(1, Ordering::Relaxed);
                    if measured {
                        // The histogram first: the drain reads `acked` as "recorded".
                        lock(&w.ack).record(now.saturating_sub(p.request_id));
                        w.acked.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Ok(r) => run.error(format!("send: {}", code_name(r.code))),
                Err(_) => run.error("send: malformed reply".into()),
            }
        } else if p.command == Command::Message as i32 {
            run.echoes.fetch_add(1, Ordering::Relaxed);
        } else if p.command == Command::Kick as i32 {
            run.error(format!("sender kicked: {}", code_name(wire::kick_code(&p.content))));
        }
    }
}

/// Reads a recipient's connection: `MESSAGE` pushes from its sender
/// (delivery latency).
async fn read_recipient(mut rd: OwnedReadHalf, mut reader: Reader, sender: UserId, run: Arc<Run>) {
    loop {
        let p = match reader.next(&mut rd).await {
            Ok(Some(p)) => p,
            other => return closed(&run, "recipient", other.err()),
        };
        if p.command == Command::Kick as i32 {
            run.error(format!("recipient kicked: {}", code_name(wire::kick_code(&p.content))));
            continue;
        }
        if p.command != Command::Message as i32 {
            continue;
        }
        let now = run.now_us();
        let sent_at = wire::stamp_from(&p.content, sender);
        match sent_at {
            Some(t) => {
                run.delivered_all.fetch_add(1, Ordering::Relaxed);
                let w = run.window();
                if w.measured(t) {
                    lock(&w.delivery).record(now.saturating_sub(t));
                    w.delivered.fetch_add(1, Ordering::Relaxed);
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
    run.broken.fetch_add(1, Ordering::Relaxed);
    match err {
        Some(e) => {
            run.error(format!("{who} connection: {}", e.to_string().chars().take(60).collect::<String>()))
        }
        None => run.error(format!("{who} connection closed by the gateway")),
    }
}
