//! `rim-jepsen test`: one complete run (`reference/jepsen.md` §1 and §6).
//!
//! 1. Start N `rim node` processes behind the proxy mesh (and, with the
//!    clock nemesis, under libfaketime) and one `rim gateway` (TCP and WS),
//!    all in the run directory `STORE/<unix-time>-s<seed>/` (`STORE/latest`
//!    points at it); read the groups' layout (every group's voters) from the
//!    cluster map, for the nemesis and `test.json`.
//! 2. Register the users and sign in their devices, create the groups
//!    (before any fault).
//! 3. For `time_limit`: the workload ([`crate::workload`]) and the nemesis
//!    ([`crate::nemesis`]) run together, writing `history.jsonl`; a progress
//!    line shows sends, syncs, pushes and faults.
//! 4. Final phase: heal, restart, wait for health; wait until relays have
//!    drained and every list stopped growing (bounded); then final reads of
//!    every list through every node.
//! 5. Check the history ([`crate::checker`]: `results.json`,
//!    `results.txt`), render the report ([`crate::report`]) and write
//!    `test.json` (options, seed, git revision, figures).
//!
//! Nothing outlives the run: dropping the cluster and gateway kills them.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Mutex, watch};
use tokio::time::Instant;

use crate::checker::{CheckOptions, Consistency, Results};
use crate::control::{Cluster, ClusterOptions, Layout, find_faketime, http_get};
use crate::error::{Error, Result, io_err};
use crate::groups;
use crate::history::read_history;
use crate::nemesis::{self, Fault, NemesisOptions};
use crate::recorder::Recorder;
use crate::workload::{self, Account, Endpoints, FinalReads, WorkloadOptions};

/// Everything a run needs.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TestOptions {
    /// The `rim` binary.
    pub bin: PathBuf,
    /// Nodes (ids 1..=n).
    pub nodes: u64,
    /// Data shards.
    pub shards: u32,
    /// How long the workload and nemesis run.
    pub time_limit: Duration,
    /// Quiet time after recovery, before the final reads settle.
    pub recovery_time: Duration,
    /// The workload.
    pub workload: WorkloadOptions,
    /// The nemesis.
    pub nemesis: NemesisOptions,
    /// Where run directories go.
    pub store: PathBuf,
    /// Extra environment of every node, e.g. `RIM_REQUEST_TIMEOUT_MS`.
    pub node_env: Vec<(String, String)>,
    /// TEST ONLY: `rim node --sabotage` flags (deliberately broken build).
    pub sabotage: Option<String>,
    /// IM-8 strength to check.
    pub consistency: Consistency,
    /// Print the progress line.
    pub progress: bool,
    /// After set-up, stop every node gracefully (SIGTERM: the node closes
    /// its database, which persists everything) and start it again, one at
    /// a time. The skip-fsync self-test needs it so that the cluster
    /// membership and the users survive the crashes it then injects.
    pub restart_after_setup: bool,
    /// Keep the nodes' data dirs of a valid run (they are always kept when
    /// the verdict is not valid; logs, history and report are always kept).
    pub keep_data: bool,
    /// Fewer acked sends than this makes the verdict at best unknown: a
    /// run that did nothing proves nothing.
    pub min_acked: u64,
    /// The `rim-jepsen` binary to run the app's webhook receiver with
    /// (`webhook-receiver`); none: no webhooks, IM-13 not checked.
    pub webhook_receiver: Option<PathBuf>,
}

impl TestOptions {
    /// The defaults of `rim-jepsen test` (3 nodes, 4 shards, 60 s,
    /// partition/kill/pause every ~5 s, 6 users × 2 devices at 40 ops/s),
    /// with run dirs under the system temp dir; tests adjust the fields.
    pub fn new(bin: PathBuf, seed: u64) -> TestOptions {
        TestOptions {
            bin,
            nodes: 3,
            shards: 4,
            time_limit: Duration::from_secs(60),
            recovery_time: Duration::from_secs(3),
            workload: WorkloadOptions {
                users: 6,
                devices: 2,
                rate: 40.0,
                op_timeout: Duration::from_secs(5),
                retry_same_id: false,
                transport: crate::workload::GatewayTransport::Mixed,
                group_sends: 0.3,
                seed,
            },
            nemesis: NemesisOptions {
                faults: vec![Fault::Partition, Fault::Kill, Fault::Pause],
                interval: Duration::from_secs(5),
                seed,
                shapes: Vec::new(),
                targets: Vec::new(),
            },
            store: std::env::temp_dir().join("rim-jepsen"),
            node_env: Vec::new(),
            sabotage: None,
            consistency: Consistency::Linearizable,
            progress: true,
            min_acked: 0,
            restart_after_setup: false,
            keep_data: false,
            webhook_receiver: None,
        }
    }
}

/// What a run produced.
#[derive(Debug)]
pub struct RunOutcome {
    /// The run directory.
    pub dir: PathBuf,
    /// The checker's verdict.
    pub results: Results,
    /// Figures of the run (also in `test.json`).
    pub summary: RunSummary,
}

/// Figures of a run, written to `test.json` with the options.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct RunSummary {
    /// Faults that were asked for but skipped, with why.
    pub skipped: Vec<String>,
    /// Counters at the end of the workload.
    pub counters: crate::recorder::CounterSnapshot,
    /// Final reads done and missing.
    pub final_reads: FinalReads,
    /// The groups created at set-up (ids, kinds, members).
    pub groups: Vec<crate::groups::Group>,
    /// Where the Raft groups live (the voters of each), read at
    /// set-up; empty if no node told it.
    pub layout: Layout,
    /// Recovery error, if the cluster did not heal in time.
    pub recovery_error: Option<String>,
    /// Whether the lists settled before the final reads.
    pub settled: bool,
    /// Seconds the whole run took.
    pub wall_secs: f64,
    /// `git rev-parse --short HEAD` where the harness ran.
    pub git_rev: String,
    /// Committed messages whose `message.created` had not arrived when the
    /// harness stopped waiting (runs with a webhook receiver only).
    pub webhook_events_missing: Option<usize>,
}

/// Waits until the receiver holds a `message.created` for every committed
/// message the history shows, at most `timeout`, and gives up earlier when
/// nothing arrived for [`EVENTS_STALLED`] (longer than the nodes' longest
/// retry backoff, so a delivery in backoff is not cut off); returns the
/// receipts and how many were still missing.
async fn wait_for_events(
    dir: &Path,
    receipts: &Path,
    timeout: Duration,
) -> Result<(Vec<crate::webhooks::Receipt>, usize)> {
    let deadline = Instant::now() + timeout;
    let (mut last_count, mut last_change) = (usize::MAX, Instant::now());
    loop {
        let history = read_history(dir.join("history.jsonl"))?;
        let got = crate::webhooks::read_receipts(receipts)?;
        let missing = crate::checker::missing_events(&history.ops, &got);
        if got.len() != last_count {
            (last_count, last_change) = (got.len(), Instant::now());
        }
        if missing == 0 || Instant::now() >= deadline || last_change.elapsed() >= EVENTS_STALLED {
            return Ok((got, missing));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// How long the final wait for webhook events tolerates no new delivery.
const EVENTS_STALLED: Duration = Duration::from_secs(45);

/// Runs one test. Needs a multi-threaded tokio runtime. An error means the
/// run could not be carried out (the verdict is then "unknown").
pub async fn run_test(mut opts: TestOptions) -> Result<RunOutcome> {
    let started = Instant::now();
    let mut summary = RunSummary { git_rev: git_rev(), ..RunSummary::default() };
    let dir = run_dir(&opts.store, opts.nemesis.seed)?;
    say(opts.progress, &format!("rim-jepsen: run dir {} (seed {})", dir.display(), opts.nemesis.seed));

    let faketime = if opts.nemesis.faults.contains(&Fault::Clock) { find_faketime() } else { None };
    if opts.nemesis.faults.contains(&Fault::Clock) && faketime.is_none() {
        opts.nemesis.faults.retain(|f| *f != Fault::Clock);
        let why = "clock nemesis skipped: libfaketime not installed (apt-get install faketime)".to_string();
        say(true, &format!("rim-jepsen: {why}"));
        summary.skipped.push(why);
    }

    let mut copts = ClusterOptions::new(opts.bin.clone(), opts.nodes);
    copts.shards = opts.shards;
    copts.proxied = true;
    copts.dir = Some(dir.clone());
    copts.faketime = faketime;
    copts.env = opts.node_env.clone();
    if let Some(s) = &opts.sabotage {
        copts.extra_args.extend(["--sabotage".to_string(), s.clone()]);
    }
    let receiver = match &opts.webhook_receiver {
        Some(bin) => {
            let secret = crate::webhooks::secret_for(opts.nemesis.seed);
            let r = crate::webhooks::ReceiverProcess::start(bin, &dir, &secret).await?;
            let config = dir.join("webhooks.toml");
            std::fs::write(&config, crate::webhooks::node_config(&r.url(), &secret))
                .map_err(io_err("writing webhooks.toml"))?;
            copts.extra_args.extend(["--config".to_string(), config.display().to_string()]);
            Some(r)
        }
        None => {
            opts.nemesis.faults.retain(|f| *f != Fault::Webhook);
            None
        }
    };
    let mut cluster = Cluster::start(copts).await?;
    cluster.receiver = receiver;
    cluster.wait_healthy(Duration::from_secs(120)).await?;
    match cluster.layout().await {
        Ok(layout) => summary.layout = layout,
        Err(e) => {
            let why = format!("layout unknown, shard-majority faults take a cluster majority: {e}");
            say(true, &format!("rim-jepsen: {why}"));
            summary.skipped.push(why);
        }
    }
    let mut gateway = cluster.start_gateway()?;
    gateway.wait_healthy(Duration::from_secs(60)).await?;
    let endpoints = Endpoints {
        gateway_tcp: gateway.tcp,
        gateway_ws: gateway.ws,
        nodes: cluster.nodes().map(|n| (n.id, n.client)).collect(),
    };
    let http: BTreeMap<u64, std::net::SocketAddr> = cluster.nodes().map(|n| (n.id, n.http)).collect();

    let recorder =
        Arc::new(Recorder::create(&dir.join("history.jsonl")).map_err(io_err("creating history.jsonl"))?);
    let accounts =
        workload::setup(&endpoints, &opts.workload, Instant::now() + Duration::from_secs(90)).await?;
    if opts.workload.group_sends > 0.0 {
        let deadline = Instant::now() + Duration::from_secs(60);
        match groups::setup(&recorder, &endpoints, &accounts, opts.workload.op_timeout, deadline).await {
            Ok(g) => summary.groups = g,
            Err(Error::GroupsUnimplemented(e)) => {
                let why = format!("group sends skipped: the nodes do not serve GroupService ({e})");
                say(true, &format!("rim-jepsen: {why}"));
                summary.skipped.push(why);
            }
            Err(e) => return Err(e),
        }
    }
    say(
        opts.progress,
        &format!(
            "rim-jepsen: {} users, {} devices each, {} groups; running for {:?}",
            accounts.len(),
            opts.workload.devices,
            summary.groups.len(),
            opts.time_limit
        ),
    );

    if opts.restart_after_setup {
        for id in cluster.ids() {
            cluster.node_mut(id).proc().stop(Duration::from_secs(20));
            cluster.start_node(id)?;
            cluster.wait_healthy(Duration::from_secs(120)).await?;
        }
    }
    let cluster = Arc::new(Mutex::new(cluster));
    let (stop_tx, stop_rx) = watch::channel(false);
    let nemesis_task = tokio::spawn(nemesis::run(
        cluster.clone(),
        recorder.clone(),
        opts.nemesis.clone(),
        summary.layout.clone(),
        stop_rx.clone(),
    ));
    let progress_task =
        tokio::spawn(progress(recorder.clone(), opts.time_limit, opts.progress, stop_rx.clone()));
    let workload_run =
        workload::run(recorder.clone(), &accounts, &summary.groups, &endpoints, &opts.workload, stop_rx);
    let timer = async {
        tokio::time::sleep(opts.time_limit).await;
        let _ = stop_tx.send(true);
    };
    tokio::join!(workload_run, timer);
    let _ = nemesis_task.await;
    let _ = progress_task.await;
    summary.counters = recorder.snapshot();

    say(opts.progress, "rim-jepsen: final phase: heal, restart, recover");
    if let Err(e) = nemesis::final_phase(&cluster, &mut gateway, &recorder, Duration::from_secs(120)).await {
        say(true, &format!("rim-jepsen: recovery failed: {e}"));
        summary.recovery_error = Some(e);
    }
    tokio::time::sleep(opts.recovery_time).await;
    summary.settled =
        settle(&accounts, &endpoints, &http, opts.workload.op_timeout, Duration::from_secs(60)).await;
    let deadline = Instant::now() + Duration::from_secs(120);
    summary.final_reads =
        workload::final_reads(&recorder, &accounts, &endpoints, opts.workload.op_timeout, deadline).await;
    groups::final_reads(
        &recorder,
        &summary.groups,
        &accounts,
        &endpoints,
        opts.workload.op_timeout,
        deadline,
        &mut summary.final_reads,
    )
    .await;
    let receipts = match cluster.lock().await.receiver.as_ref().map(|r| r.receipts().to_path_buf()) {
        Some(path) => {
            say(opts.progress, "rim-jepsen: waiting for the webhook events of every committed message");
            let (receipts, missing) = wait_for_events(&dir, &path, Duration::from_secs(120)).await?;
            summary.webhook_events_missing = Some(missing);
            Some(receipts)
        }
        None => None,
    };
    let write_error = recorder.error();
    drop(recorder);
    gateway.stop(Duration::from_secs(5));
    drop(gateway);
    cluster.lock().await.kill_all();

    let history = read_history(dir.join("history.jsonl"))?;
    let mut results = crate::checker::check_loaded_with(
        &history,
        &CheckOptions { consistency: opts.consistency, single_shard: false },
        receipts.as_deref(),
    );
    if summary.counters.sends_ok < opts.min_acked {
        results.mark_unknown(format!(
            "only {} acked sends, fewer than the {} required",
            summary.counters.sends_ok, opts.min_acked
        ));
    }
    if let Some(e) = write_error
        .or_else(|| summary.recovery_error.clone().map(|e| format!("the cluster did not recover: {e}")))
    {
        results.mark_unknown(e);
    }
    crate::checker::write_results(&dir, &results)?;
    crate::report::write_report(&dir, &history.ops, &results).map_err(io_err("writing the report"))?;
    if results.valid == crate::checker::Validity::Valid && !opts.keep_data {
        // A few hundred MB per run otherwise (RocksDB preallocates).
        for id in 1..=opts.nodes {
            let _ = std::fs::remove_dir_all(dir.join(format!("n{id}")).join("data"));
        }
    }
    summary.wall_secs = started.elapsed().as_secs_f64();
    let test = serde_json::json!({ "options": opts, "summary": summary });
    std::fs::write(dir.join("test.json"), serde_json::to_vec_pretty(&test).unwrap_or_default())
        .map_err(io_err("writing test.json"))?;
    Ok(RunOutcome { dir, results, summary })
}

fn say(on: bool, line: &str) {
    if on {
        eprintln!("{line}");
    }
}

/// Creates `store/<unix-secs>-s<seed>` and points `store/latest` at it.
fn run_dir(store: &Path, seed: u64) -> Result<PathBuf> {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let name = format!("{secs}-s{seed}");
    let dir = store.join(&name);
    std::fs::create_dir_all(&dir).map_err(io_err(format!("creating {}", dir.display())))?;
    let latest = store.join("latest");
    let _ = std::fs::remove_file(&latest);
    let _ = std::os::unix::fs::symlink(&name, &latest);
    Ok(dir)
}

fn git_rev() -> String {
    if let Ok(v) = std::env::var("RIM_GIT_REV") {
        return v;
    }
    std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into())
}

/// Prints a progress line every second on a terminal (every 10 s
/// otherwise) until `stop`.
async fn progress(recorder: Arc<Recorder>, limit: Duration, on: bool, mut stop: watch::Receiver<bool>) {
    if !on {
        return;
    }
    let tty = std::io::stderr().is_terminal();
    let every = if tty { Duration::from_secs(1) } else { Duration::from_secs(10) };
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.wait_for(|s| *s) => break,
        }
        let c = recorder.snapshot();
        let line = format!(
            "[{:>4.0}s/{}s] sends ok {} (groups {}) info {} fail {} · syncs {} · pushes {} · nemesis events {}",
            recorder.elapsed_secs(),
            limit.as_secs(),
            c.sends_ok,
            c.group_sends_ok,
            c.sends_info,
            c.sends_fail,
            c.syncs,
            c.pushes,
            c.faults
        );
        if tty {
            eprint!("\r{line}\x1b[K");
        } else {
            eprintln!("{line}");
        }
    }
    if tty {
        eprintln!();
    }
}

/// Waits (at most `timeout`) until no node reports a relay backlog and
/// every user's list head stayed the same over one poll, so final reads see
/// what the relays still had to deliver. True if it settled.
async fn settle(
    accounts: &[Account],
    endpoints: &Endpoints,
    http: &BTreeMap<u64, std::net::SocketAddr>,
    op_timeout: Duration,
    timeout: Duration,
) -> bool {
    let deadline = Instant::now() + timeout;
    let mut previous: Option<Vec<u64>> = None;
    while Instant::now() < deadline {
        let mut backlog = 0.0;
        for addr in http.values() {
            if let Ok((200, body)) = http_get(*addr, "/metrics", Duration::from_secs(2)).await {
                backlog += body
                    .lines()
                    .filter(|l| l.starts_with("rim_relay_backlog"))
                    .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                    .sum::<f64>();
            }
        }
        let heads = list_heads(accounts, endpoints, op_timeout).await;
        if backlog == 0.0 && heads.is_some() && heads == previous {
            return true;
        }
        previous = heads;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    false
}

/// Every user's list head, read through the first node that answers.
async fn list_heads(accounts: &[Account], endpoints: &Endpoints, op_timeout: Duration) -> Option<Vec<u64>> {
    let apis: Vec<rim_client::NodeApi> = endpoints
        .nodes
        .values()
        .filter_map(|a| rim_client::NodeApi::new(&a.to_string()).ok())
        .map(|api| api.with_timeout(op_timeout))
        .collect();
    let mut heads = Vec::new();
    'users: for account in accounts {
        let creds = account.devices.first()?;
        for api in &apis {
            let api = api.authenticated(creds.clone());
            if let Ok(Ok(out)) =
                tokio::time::timeout(op_timeout, api.sync_page(rim_proto::ids::Seq::ZERO, 1)).await
            {
                heads.push(out.last_seq);
                continue 'users;
            }
        }
        return None;
    }
    Some(heads)
}
