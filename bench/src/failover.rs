//! `rim bench failover`: steady 1:1 load through the gateway while the
//! leader of one data shard is SIGKILLed; how long that shard cannot take
//! writes, and whether anything acknowledged was lost.
//!
//! # Design
//!
//! `--pairs` pairs of users (phone sign-in with the cluster's development
//! code), each user with one device signed in over TCP. The first of each
//! pair sends 1:1 messages to the second, open loop at `--rate` in
//! aggregate, for `--kill-after`; then the bench asks every node's admin
//! service (`ClusterStatus`, cluster secret) who leads the **target shard**
//! (`--shard`, default the data shard holding the most senders: a 1:1 send
//! is committed by the sender's shard), SIGKILLs that node's process, keeps
//! the load going for `--after`, stops sending and drains (`--drain`).
//! Optionally the node is started again `--restart-after` the kill.
//!
//! Senders behave like a real client (and like `rim-client`): every message
//! has its own `client_msg_id`; a retryable error reply (1xxx) or no reply
//! within `--reply-timeout` (above the gateway's 5 s node-call deadline)
//! resends it with the **same** `client_msg_id` after a short backoff (or
//! the reply's `retry_after_ms`), so the server's idempotency record makes an
//! acked-after-retry message count once; a non-retryable error gives the
//! message up (`failed`). At most `--max-inflight` messages per sender are
//! unresolved (awaiting a reply or a retry); a tick finding that many is
//! skipped. Messages still unresolved at the end of the drain have an
//! unknown outcome (`unresolved`), like a client that gave up.
//!
//! # Figures
//!
//! * **Write unavailability** of the target shard (senders on it): the
//!   time from the kill to the first successful ack of an attempt written
//!   after the kill (`kill_to_first_ack_ms`), and the longest gap between
//!   consecutive acks that ends after the kill (`longest_ack_gap_ms`, with
//!   the longest gap before the kill as the steady-state baseline); the
//!   longest silence of pushes to recipients on the shard (at the
//!   timeline's resolution). The same per data shard, and for the senders
//!   on shards the killed node did not lead (`control`; `null` when it led
//!   them all, which is common: a freshly bootstrapped cluster often has
//!   one node leading every group). The leader change as the admin service
//!   saw it (`leader_elected_ms`), and a timeline of acks and pushes per
//!   bucket (100 ms, wider for long runs).
//! * **Losses**: after the run every sender's and recipient's list is read
//!   back over gRPC (`MessageService.Sync`) from the surviving nodes; each
//!   acked `client_msg_id` must appear exactly once in both lists (the
//!   recipient's copy arrives through the outbox relay, so reading repeats
//!   until complete or `--verify-timeout`): `acked`, `found`, `lost`
//!   (missing from either list), `duplicated` (any of our ids more than once
//!   in a list), plus `unacked_stored` (failed or unresolved sends that did
//!   commit, which is allowed: their outcome was unknown to the client).
//! * **Errors** by code, before and after the kill, for the target shard
//!   and the others, with the first distinct error texts as examples.
//!
//! # Invariants
//!
//! Every wait has a timeout (connect, sign-in, writes 5 s, replies
//! `--reply-timeout`, drain, admin calls 3 s, leader search 10 s, read-back
//! `--verify-timeout`). Everything kept is bounded: at most `--max-inflight`
//! unresolved messages per sender, one small record per acked message with
//! the total number of messages capped by the flags' validation
//! ([`MAX_MESSAGES`]), a fixed number of timeline buckets, bounded error
//! tallies and example lists. A sender's task selects over its reader
//! (`wire::Reader::next` only awaits the socket read, so it is cancel-safe),
//! its tick, its retry timer and its heartbeat. The scenario needs `--spawn`: it kills a
//! process it started (an external cluster would need a way to kill and
//! restart its nodes, which the bench does not have), and the spawned
//! children are killed when the bench ends whatever happens.

mod admin;
mod load;
mod placement;
mod timeline;
mod verify;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use rim_cluster::Placement;
use tokio::sync::watch;
use tokio::task::JoinSet;

use self::admin::{cluster_map, leaders};
use self::load::{Acked, Phase, Run, Sender, SenderReport, read_recipient};
use self::placement::choose_shard;
use self::timeline::{PUSHES_TARGET, Window, silence_us, timeline_json};
use self::verify::{Check, verify};
use super::Outcome;
use super::accounts::{self, Api, Cred};
use super::connections::latency_json;
use super::hist::Histogram;
use super::json::Json;
use super::progress::{Progress, Tally};
use super::sys;
use super::target::{Target, TargetArgs};
use super::wire::{connect_all, heartbeat};

/// Most messages one run may send (`rate × (kill-after + after)`), so the
/// per-message records stay bounded.
const MAX_MESSAGES: f64 = 2_000_000.0;
/// Example ids kept per verification failure kind.
const EXAMPLES: usize = 10;
/// How long the leader of the target shard is searched for before the kill.
const LEADER_SEARCH: Duration = Duration::from_secs(10);

/// Flags of `rim bench failover`.
#[derive(Args, Debug)]
pub struct FailoverArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    /// Result file (default bench-failover.json).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Sender → recipient pairs (2 × pairs users and connections).
    #[arg(long, default_value_t = 32)]
    pairs: usize,
    /// Target aggregate send rate, new messages per second (retries come on top).
    #[arg(long, default_value_t = 200.0)]
    rate: f64,
    /// Steady load before the kill.
    #[arg(long, default_value = "5s", value_parser = sys::parse_duration)]
    kill_after: Duration,
    /// Load after the kill.
    #[arg(long, default_value = "10s", value_parser = sys::parse_duration)]
    after: Duration,
    /// Data shard whose leader is killed (default: the shard with the most senders).
    #[arg(long)]
    shard: Option<u32>,
    /// Start the killed node again this long after the kill (below --after; default: never).
    #[arg(long, value_parser = sys::parse_duration)]
    restart_after: Option<Duration>,
    /// Most unresolved messages per sender (awaiting a reply or a retry).
    #[arg(long, default_value_t = 32)]
    max_inflight: usize,
    /// A send without a reply this long is resent with the same client_msg_id
    /// (keep it above the gateway's 5 s node-call deadline).
    #[arg(long, default_value = "8s", value_parser = sys::parse_duration)]
    reply_timeout: Duration,
    /// Longest wait for unresolved messages (with their retries) after the load stops.
    #[arg(long, default_value = "20s", value_parser = sys::parse_duration)]
    drain: Duration,
    /// Longest wait for every acked message to appear in both lists on read-back.
    #[arg(long, default_value = "30s", value_parser = sys::parse_duration)]
    verify_timeout: Duration,
    /// Message text size in bytes.
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// Concurrent user sign-ins.
    #[arg(long, default_value_t = 16)]
    setup_concurrency: usize,
}

/// One pair: who sends to whom, and where they live.
struct Pair {
    sender: Cred,
    recipient: Cred,
    sender_shard: u32,
    recipient_shard: u32,
}

/// Runs the scenario.
pub async fn run(args: &FailoverArgs, target: &Target) -> anyhow::Result<Outcome> {
    let p = args.pairs;
    anyhow::ensure!(p >= 1, "--pairs must be at least 1");
    anyhow::ensure!(args.rate > 0.0 && args.rate.is_finite(), "--rate must be positive");
    anyhow::ensure!(!args.kill_after.is_zero(), "--kill-after must be positive");
    anyhow::ensure!(!args.after.is_zero(), "--after must be positive");
    anyhow::ensure!(args.max_inflight >= 1, "--max-inflight must be at least 1");
    anyhow::ensure!(!args.reply_timeout.is_zero(), "--reply-timeout must be positive");
    let planned = args.rate * (args.kill_after + args.after).as_secs_f64();
    anyhow::ensure!(
        planned <= MAX_MESSAGES,
        "--rate × (--kill-after + --after) plans {planned:.0} messages; at most {MAX_MESSAGES} are kept track of"
    );
    if let Some(r) = args.restart_after {
        anyhow::ensure!(r < args.after, "--restart-after must be below --after");
    }
    let sp = target.spawned.as_ref().context(
        "failover needs --spawn: it SIGKILLs a `rim node` process the bench started itself (and can \
         restart); against an existing cluster, kill a leader by hand while `rim bench send` runs",
    )?;
    let code = target.dev_code.as_deref().context("failover needs the cluster's development code")?;
    sys::check_nofile(2 * p as u64 + 256, &format!("{p} pairs"))?;

    // Accounts, placement, pairs.
    let api = Api::new(&target.apis)?;
    let users = accounts::phone_users(&api, code, 2 * p, args.setup_concurrency).await?;
    let map = cluster_map(sp).await?;
    let placement = Placement::new(map.clone()).context("the cluster map")?;
    let mut pairs = Vec::with_capacity(p);
    for i in 0..p {
        let (sender, recipient) = (users[2 * i].clone(), users[2 * i + 1].clone());
        pairs.push(Pair {
            sender_shard: placement.shard_of_user(sender.user).0,
            recipient_shard: placement.shard_of_user(recipient.user).0,
            sender,
            recipient,
        });
    }
    let data_shards: BTreeSet<u32> = map.shards.iter().map(|s| s.shard_id).filter(|s| *s != 0).collect();
    let target_shard = choose_shard(args.shard, &pairs, &data_shards)?;
    eprintln!(
        "rim bench: target shard {target_shard}: senders of {} of {p} pairs, recipients of {}",
        pairs.iter().filter(|x| x.sender_shard == target_shard).count(),
        pairs.iter().filter(|x| x.recipient_shard == target_shard).count()
    );

    let creds: Vec<Cred> = pairs.iter().flat_map(|x| [x.sender.clone(), x.recipient.clone()]).collect();
    let mut conns = connect_all(target.gateway, &creds).await?;

    // Load.
    let slack = Duration::from_secs(15); // leader search, drain joins
    let span = args.kill_after + args.after + args.drain + slack;
    let epoch = Instant::now() + Duration::from_millis(200);
    let run = Arc::new(Run::new(epoch, span));
    let prefix = accounts::run_prefix();
    let period = Duration::from_secs_f64(p as f64 / args.rate);
    let (phase_tx, phase_rx) = watch::channel(Phase::Load);
    let (beat_stop_tx, beat_stop_rx) = watch::channel(false);
    let mut senders = JoinSet::new();
    let mut recipients = JoinSet::new();
    let mut beats = JoinSet::new();
    for (i, x) in pairs.iter().enumerate().rev() {
        let (recipient, sender) = (conns.pop().context("connection")?, conns.pop().context("connection")?);
        let (s_rd, s_wr) = sender.stream.into_split();
        let (r_rd, r_wr) = recipient.stream.into_split();
        let s = Sender {
            pair: i,
            to: x.recipient.user,
            cmid_prefix: format!("{prefix}-{i}-"),
            on_target: x.sender_shard == target_shard,
            offset: period.mul_f64(i as f64 / p as f64),
            period,
            max_inflight: args.max_inflight,
            reply_timeout_us: args.reply_timeout.as_micros() as u64,
            size: args.size,
            heartbeat: sender.heartbeat,
        };
        senders.spawn(s.run(s_rd, sender.reader, s_wr, run.clone(), phase_rx.clone()));
        let on_target = x.recipient_shard == target_shard;
        recipients.spawn(read_recipient(r_rd, recipient.reader, x.sender.user, on_target, run.clone()));
        beats.spawn(heartbeat(r_wr, recipient.heartbeat, beat_stop_rx.clone()));
    }
    let progress = {
        let (run, phase_rx) = (run.clone(), phase_rx.clone());
        let mut last = (0.0, 0u64, 0u64);
        Progress::start("failover", move |_| {
            let t = run.now_us() as f64 / 1e6;
            let (acked, acked_target) =
                (run.acked.load(Ordering::Relaxed), run.acked_target.load(Ordering::Relaxed));
            let dt = (t - last.0).max(1e-3);
            let (rate, rate_target) = ((acked - last.1) as f64 / dt, (acked_target - last.2) as f64 / dt);
            last = (t, acked, acked_target);
            let phase = match *phase_rx.borrow() {
                Phase::Load if run.killed() => "after kill",
                Phase::Load => "steady",
                Phase::Drain => "draining",
                Phase::Halt => "stopped",
            };
            format!(
                "{phase} {t:.0}s: sent {}, acked {acked} ({rate:.0}/s), target shard acked {acked_target} \
                 ({rate_target:.0}/s), unresolved {}, retries {}, errors {}",
                run.sent.load(Ordering::Relaxed),
                run.pending.load(Ordering::Relaxed),
                run.retries.load(Ordering::Relaxed),
                run.errors_before.total() + run.errors_after.total(),
            )
        })
    };

    // The kill.
    tokio::time::sleep_until((epoch + args.kill_after).into()).await;
    let before = leaders(sp, &[], LEADER_SEARCH, |l| l.contains_key(&target_shard))
        .await
        .with_context(|| format!("finding the leader of shard {target_shard}"))?;
    let (victim, term_before) = before[&target_shard];
    let groups_led: Vec<u32> = before.iter().filter(|(_, (n, _))| *n == victim).map(|(g, _)| *g).collect();
    let pid = sp.kill_node(victim)?;
    let kill_at = Instant::now();
    let kill_us = kill_at.saturating_duration_since(epoch).as_micros() as u64;
    run.kill_us.store(kill_us, Ordering::Relaxed);
    eprintln!(
        "rim bench: killed node {victim} (pid {pid}), leader of shard {target_shard} (term {term_before}) \
         and of groups {groups_led:?}, at {:.1}s",
        kill_us as f64 / 1e6
    );
    let send_end = kill_at + args.after;
    let send_end_us = send_end.saturating_duration_since(epoch).as_micros() as u64;
    let alive: Vec<u64> = sp.nodes().iter().map(|n| n.id).filter(|id| *id != victim).collect();
    let election = async {
        let t0 = Instant::now();
        let found = leaders(sp, &[victim], send_end.saturating_duration_since(t0), |l| {
            l.get(&target_shard).is_some_and(|(n, term)| *n != victim && *term > term_before)
        })
        .await;
        found.ok().and_then(|l| l.get(&target_shard).copied()).map(|(n, term)| (n, term, t0.elapsed()))
    };
    let restart = async {
        let after = args.restart_after?;
        tokio::time::sleep_until((kill_at + after).into()).await;
        let t0 = Instant::now();
        let r = sp.restart_node(victim, Duration::from_secs(30)).await;
        Some((after, t0.elapsed(), r))
    };
    let stop_load = async {
        tokio::time::sleep_until(send_end.into()).await;
        let _ = phase_tx.send(Phase::Drain);
    };
    let (elected, restarted, ()) = tokio::join!(election, restart, stop_load);

    // Drain: unresolved messages keep being retried until resolved or the deadline.
    let drain_start = Instant::now();
    while drain_start.elapsed() < args.drain && run.pending.load(Ordering::Relaxed) > 0 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let drain_s = drain_start.elapsed().as_secs_f64();
    let load_end_us = run.now_us();
    run.stopping.store(true, Ordering::Relaxed);
    let _ = phase_tx.send(Phase::Halt);
    let mut reports = Vec::with_capacity(p);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while let Ok(Some(r)) = tokio::time::timeout_at(deadline, senders.join_next()).await {
        reports.push(r.context("a sender task panicked")?);
    }
    anyhow::ensure!(reports.len() == p, "{} of {p} senders did not stop within 10 s", p - reports.len());
    reports.sort_by_key(|r| r.pair);
    recipients.abort_all();
    while tokio::time::timeout(Duration::from_secs(5), recipients.join_next())
        .await
        .is_ok_and(|r| r.is_some())
    {}
    let _ = beat_stop_tx.send(true);
    while tokio::time::timeout(Duration::from_secs(5), beats.join_next()).await.is_ok_and(|r| r.is_some()) {}
    progress.finish().await;

    // Read-back from the surviving nodes.
    let survivors: Vec<String> =
        sp.nodes().iter().filter(|n| n.id != victim).map(|n| n.client.clone()).collect();
    let read_api = Api::new(&survivors)?;
    let t_verify = Instant::now();
    let check = verify(&read_api, &pairs, &reports, &prefix, args.verify_timeout).await?;
    let verify_s = t_verify.elapsed().as_secs_f64();

    Ok(outcome(
        args,
        Finished {
            run: &run,
            pairs: &pairs,
            reports: &reports,
            data_shards: &data_shards,
            target_shard,
            leaders_before: &before,
            victim,
            pid,
            term_before,
            kill_us,
            send_end_us,
            load_end_us,
            elected,
            restarted,
            check,
            verify_s,
            drain_s,
            alive,
        },
    ))
}

/// What a finished run hands to [`outcome`] (times in µs since the epoch).
struct Finished<'a> {
    run: &'a Run,
    pairs: &'a [Pair],
    reports: &'a [SenderReport],
    data_shards: &'a BTreeSet<u32>,
    target_shard: u32,
    /// Every group's `(leader, term)` just before the kill.
    leaders_before: &'a BTreeMap<u32, (u64, u64)>,
    victim: u64,
    pid: u32,
    term_before: u64,
    kill_us: u64,
    send_end_us: u64,
    load_end_us: u64,
    /// The new leader, its term, and when the admin service showed it.
    elected: Option<(u64, u64, Duration)>,
    /// When the node was restarted, how long until healthy, its new PID.
    restarted: Option<(Duration, Duration, anyhow::Result<u32>)>,
    check: Check,
    verify_s: f64,
    drain_s: f64,
    /// The nodes not killed.
    alive: Vec<u64>,
}

/// The figures of a finished run.
fn outcome(args: &FailoverArgs, f: Finished<'_>) -> Outcome {
    let Finished {
        run,
        pairs,
        reports,
        data_shards,
        target_shard,
        leaders_before: before,
        victim,
        pid,
        term_before,
        kill_us,
        send_end_us,
        load_end_us,
        elected,
        restarted,
        check,
        verify_s,
        drain_s,
        alive,
    } = f;
    let p = pairs.len();
    let groups_led: Vec<u32> = before.iter().filter(|(_, (n, _))| *n == victim).map(|(g, _)| *g).collect();
    let target_senders = pairs.iter().filter(|x| x.sender_shard == target_shard).count();
    let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let led_by_victim = |s: u32| groups_led.contains(&s);
    let acks_where = |pred: &dyn Fn(&Pair) -> bool| -> Vec<&Acked> {
        reports.iter().filter(|r| pred(&pairs[r.pair])).flat_map(|r| r.acked.iter()).collect()
    };
    let target_acks = acks_where(&|x| x.sender_shard == target_shard);
    let target_window = Window::of(&target_acks, kill_us, send_end_us);
    let all_window = Window::of(&acks_where(&|_| true), kill_us, send_end_us);
    let control_acks = acks_where(&|x| !led_by_victim(x.sender_shard));
    let control_shards: Vec<u32> = data_shards.iter().copied().filter(|s| !led_by_victim(*s)).collect();
    let control_senders = pairs.iter().filter(|x| !led_by_victim(x.sender_shard)).count();
    let control_window = Window::of(&control_acks, kill_us, send_end_us);
    let mut shards_json = Vec::new();
    for &s in data_shards {
        let w = Window::of(&acks_where(&|x| x.sender_shard == s), kill_us, send_end_us);
        shards_json.push(
            w.to_json()
                .with("shard", s)
                .with("leader_before_kill", before.get(&s).map(|(n, _)| *n))
                .with("led_by_killed_node", led_by_victim(s))
                .with("senders", pairs.iter().filter(|x| x.sender_shard == s).count())
                .with("recipients", pairs.iter().filter(|x| x.recipient_shard == s).count()),
        );
    }
    let mut after_kill_latency = Histogram::default();
    for a in &target_acks {
        if a.acked_us >= kill_us {
            after_kill_latency.record(a.acked_us - a.first_us);
        }
    }
    let unresolved: usize = reports.iter().map(|r| r.unresolved.len()).sum();
    let restart_json = match &restarted {
        None => Json::Null,
        Some((at, took, Ok(pid))) => Json::obj()
            .with("after_kill_ms", at.as_secs_f64() * 1e3)
            .with("healthy_after_ms", took.as_secs_f64() * 1e3)
            .with("pid", *pid),
        Some((at, _, Err(e))) => {
            Json::obj().with("after_kill_ms", at.as_secs_f64() * 1e3).with("error", format!("{e:#}"))
        }
    };
    let killed = Json::obj()
        .with("node_id", victim)
        .with("pid", pid)
        .with("shard", target_shard)
        .with("term_before", term_before)
        .with("groups_led", groups_led.clone())
        .with("kill_at_seconds", kill_us as f64 / 1e6)
        .with("new_leader_node_id", elected.map(|(n, _, _)| n))
        .with("new_leader_term", elected.map(|(_, t, _)| t))
        .with("leader_elected_ms", elected.map(|(_, _, d)| d.as_secs_f64() * 1e3))
        .with("surviving_nodes", alive)
        .with("restart", restart_json);
    let errors_total = run.errors_before.total() + run.errors_after.total();
    let results = Json::obj()
        .with("killed", killed)
        .with(
            "unavailability",
            target_window
                .to_json()
                .with("shard", target_shard)
                .with("senders", target_senders)
                .with("send_to_ack_ms_acked_after_kill", latency_json(&after_kill_latency))
                .with("recipients", pairs.iter().filter(|x| x.recipient_shard == target_shard).count())
                .with(
                    "longest_push_silence_ms_target_recipients",
                    silence_us(&run.timeline, PUSHES_TARGET, kill_us, send_end_us).map(|us| us as f64 / 1e3),
                ),
        )
        .with(
            "control",
            // `null` when the killed node led every shard some sender is on.
            if control_senders == 0 {
                Json::Null
            } else {
                control_window
                    .to_json()
                    .with("senders", control_senders)
                    .with("shards_not_led_by_killed_node", control_shards)
            },
        )
        .with("shards", Json::Arr(shards_json))
        .with("sent", n(&run.sent))
        .with("attempts", n(&run.attempts))
        .with("retries", n(&run.retries))
        .with("acked", n(&run.acked))
        .with("acked_before_kill", all_window.before)
        .with("acked_after_kill", all_window.after)
        .with("failed", n(&run.failed))
        .with("unresolved", unresolved)
        .with("skipped_at_inflight_limit", n(&run.skipped))
        .with("late_replies", n(&run.late_replies))
        .with("verification", check.to_json().with("seconds", verify_s))
        .with("errors_before_kill", run.errors_before.to_json())
        .with("errors_after_kill", run.errors_after.to_json())
        .with("errors_total", errors_total)
        .with("error_examples", run.error_examples.lock().unwrap_or_else(PoisonError::into_inner).clone())
        .with(
            "pushes",
            Json::obj()
                .with("delivered", n(&run.pushes))
                .with("duplicate_seqs", n(&run.push_duplicates))
                .with("seq_gaps", n(&run.push_gaps)),
        )
        .with("timeline", timeline_json(&run.timeline, kill_us, load_end_us))
        .with("drain_seconds", drain_s);
    let params = Json::obj()
        .with("pairs", p)
        .with("target_rate_per_second", args.rate)
        .with("kill_after_seconds", args.kill_after.as_secs_f64())
        .with("after_seconds", args.after.as_secs_f64())
        .with("shard", args.shard)
        .with("restart_after_seconds", args.restart_after.map(|d| d.as_secs_f64()))
        .with("max_inflight_per_sender", args.max_inflight)
        .with("reply_timeout_seconds", args.reply_timeout.as_secs_f64())
        .with("drain_timeout_seconds", args.drain.as_secs_f64())
        .with("verify_timeout_seconds", args.verify_timeout.as_secs_f64())
        .with("message_bytes", args.size);
    let ms = |v: Option<u64>| v.map_or_else(|| "none".to_string(), |us| format!("{:.0} ms", us as f64 / 1e3));
    let summary = format!(
        "failover: killed node {victim} (leader of shard {target_shard}{}) at {:.1}s; shard {target_shard} \
         writes: first ack {} after the kill, longest ack gap {} (steady {}), new leader seen after {}; \
         acked {} ({} before / {} after the kill), lost {}, duplicated {}, unresolved {unresolved}; \
         errors after the kill {}",
        if groups_led.len() > 1 {
            format!(" and {} other groups", groups_led.len() - 1)
        } else {
            String::new()
        },
        kill_us as f64 / 1e6,
        ms(target_window.first_ack_us),
        ms(target_window.gap.map(|(a, b)| b - a)),
        ms(target_window.gap_before_kill),
        elected.map_or_else(|| "never".to_string(), |(_, _, d)| format!("{:.0} ms", d.as_secs_f64() * 1e3)),
        check.acked,
        all_window.before,
        all_window.after,
        check.lost,
        check.duplicated,
        top_errors(&run.errors_after),
    );
    Outcome { params, results, summary }
}

/// The most frequent error kinds of a tally, for the summary.
fn top_errors(t: &Tally) -> String {
    let Json::Obj(fields) = t.to_json() else { return String::new() };
    let mut kinds: Vec<(String, i128)> = fields
        .into_iter()
        .filter_map(|(k, v)| match v {
            Json::Int(n) => Some((k, n)),
            _ => None,
        })
        .collect();
    let total: i128 = kinds.iter().map(|(_, n)| n).sum();
    kinds.sort_by_key(|k| std::cmp::Reverse(k.1));
    let top: Vec<String> = kinds.iter().take(3).map(|(k, n)| format!("{k} {n}")).collect();
    if top.is_empty() { "0".to_string() } else { format!("{total} ({})", top.join(", ")) }
}
