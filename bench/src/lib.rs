//! Load generation against a rim cluster: the library behind `rim bench`.
//! Each run measures one scenario, writes its figures to a JSON result file
//! and prints a one-line summary on stdout.
//!
//! ```text
//! rim bench send --spawn --pairs 256 --rate 2000 --duration 30s
//! rim bench send --spawn --pairs 256 --rate max
//! rim bench send --spawn --pairs 256 --rate 1000 --slo 50ms
//! rim bench send --gateway 127.0.0.1:7400 --api 127.0.0.1:7101 --rate 1000
//! rim bench connections --spawn --connections 50000
//! rim bench fanout --spawn --kind super --members 10000 --online 10000
//! rim bench failover --spawn
//! rim bench sync --spawn --devices 4 --messages 10000
//! rim bench webhooks --spawn --rate 1000 --outage 10m
//! ```
//!
//! # Scenarios
//!
//! One clap subcommand each, and one module (or a module with submodules)
//! each:
//!
//! * `send` (`latency`; alias `latency`): 1:1 messages between pairs of
//!   connected users at a target rate or as fast as acks allow; send → ack
//!   and send → delivered latency percentiles; with `--slo` (`slo`), a
//!   search for the highest rate whose p99 stays within the bound.
//! * `connections`: idle signed-in TCP connections; the gateway's resident
//!   memory per connection and the sign-in rate.
//! * `fanout`: group messages (small or super group) to many online
//!   members; deliveries per second and send → delivered latency.
//! * `failover`: steady 1:1 load while a shard leader is killed; the
//!   write-unavailability window and whether anything acknowledged was lost.
//! * `sync`: devices offline for many messages reconnect; catch-up time
//!   and messages per second of sync, every message checked.
//! * `webhooks`: the app's event stream while `send` runs: events per
//!   second, send → webhook lag, catch-up after a receiver outage with the
//!   nodes' memory, and sends with a black-holed `before_send` hook.
//!
//! # Layout
//!
//! Below the scenarios sit the pieces they share:
//!
//! * `target`: what a scenario runs against, either a cluster it spawns
//!   itself (`--spawn`: 3 × `rim node` + 1 × `rim gateway` as child
//!   processes on loopback ports from `rim-testkit`) or given addresses.
//! * `accounts`: users and devices, made over the nodes' client gRPC.
//! * `wire`: the long connections, which speak the framed protocol of
//!   `docs/protocol.md` directly on tokio sockets (the `rim_proto::v1`
//!   types and `rim_proto::codec` framing), one small task per connection,
//!   so the client side stays light. The bench does not use `rim-client`:
//!   it must control every request id, retry and heartbeat to measure them.
//! * `hist` (fixed-size latency histograms), `progress` (the live
//!   stderr line, bounded error tallies), `cpu` and `sys` (`/proc`
//!   facts), `json` (the result file).
//!
//! # Result file and bounds
//!
//! The result file holds the parameters, the figures, the machine (cores,
//! memory, load average at start and end), the build profile, the cluster
//! shape and the git revision. Every wait has a timeout, every queue and
//! every tally a bound; latencies go to fixed-size histograms.
//!
//! # Running it
//!
//! [`run`] is called by the `rim` binary, and only from it: a spawned
//! cluster is started as `<this executable> node ...` and `<this executable>
//! gateway ...`. The caller's `stop` future (the binary passes its Ctrl-C /
//! SIGTERM signal) ends the run early; the spawned processes are killed
//! whenever the run ends, because dropping its future drops the
//! `target::Spawned` that owns them.
//!
//! # Errors
//!
//! The bench reports failures with `anyhow` rather than a crate error enum.
//! It is a reporting tool: every error ends the run and is printed to a
//! human, with the context chain ("preparing the cluster: waiting for the
//! nodes: ... log tail ..."). No caller branches on a kind of failure, so
//! an enum would only name variants nobody matches. Where a scenario does
//! act on a failure (a retryable error code, a refused sign-in) it reads
//! the protocol's `ErrorCode` or a small local enum (`wire::SignInError`).

mod accounts;
mod connections;
mod cpu;
mod failover;
mod fanout;
mod hist;
mod json;
mod latency;
mod progress;
mod slo;
mod sync;
mod sys;
mod target;
mod webhooks;
mod wire;

use std::future::Future;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, anyhow};
use clap::{Args, Subcommand};

use self::json::Json;
use self::target::Target;

/// Flags of `rim bench`.
#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand, Debug)]
enum Scenario {
    /// Idle signed-in TCP connections: gateway RSS per connection and sign-in rate.
    Connections(connections::ConnectionsArgs),
    /// 1:1 messages at a target rate (or as fast as acks allow; `--slo` searches
    /// the highest rate within a p99 bound): send→ack and send→delivered latency.
    #[command(visible_alias = "latency", alias = "delivery-latency")]
    Send(latency::LatencyArgs),
    /// Group messages to many online members: deliveries per second and latency.
    Fanout(fanout::FanoutArgs),
    /// Steady 1:1 load while a shard leader is killed: write-unavailability window, acked losses.
    Failover(failover::FailoverArgs),
    /// A device offline for many messages reconnects: catch-up time and sync rate.
    Sync(sync::SyncArgs),
    /// The app's event stream under load: events/s, send→webhook lag, catch-up
    /// after a receiver outage, sends with a black-holed before_send hook.
    Webhooks(webhooks::WebhooksArgs),
}

/// What a scenario measured.
struct Outcome {
    /// The scenario's parameters.
    params: Json,
    /// The figures.
    results: Json,
    /// One line for stdout.
    summary: String,
}

/// Runs a scenario, writes its result file and prints its summary; stops
/// early (with an error, the spawned cluster killed) when `stop` resolves.
/// Must run in the `rim` binary (see the crate docs).
pub async fn run(args: BenchArgs, stop: impl Future<Output = ()>) -> anyhow::Result<()> {
    tokio::select! {
        r = run_scenario(args) => r,
        () = stop => Err(anyhow!("interrupted")),
    }
}

async fn run_scenario(args: BenchArgs) -> anyhow::Result<()> {
    let (name, target_args, out) = match &args.scenario {
        Scenario::Connections(a) => ("connections", &a.target, &a.out),
        Scenario::Send(a) => ("send", &a.target, &a.out),
        Scenario::Fanout(a) => ("fanout", &a.target, &a.out),
        Scenario::Failover(a) => ("failover", &a.target, &a.out),
        Scenario::Sync(a) => ("sync", &a.target, &a.out),
        Scenario::Webhooks(a) => ("webhooks", a.target(), a.out()),
    };
    let out = out.clone().unwrap_or_else(|| PathBuf::from(format!("bench-{name}.json")));
    let started = sys::unix_now();
    let machine = sys::machine();
    let t0 = Instant::now();
    let mut target_args = target_args.clone();
    let prepared = match &args.scenario {
        Scenario::Webhooks(a) => Some(webhooks::prepare(a, &mut target_args).await?),
        _ => None,
    };
    let target = Target::resolve(&target_args).await.context("preparing the cluster")?;
    if let Some(sp) = &target.spawned {
        eprintln!(
            "rim bench: cluster up (data and logs in {}), gateway {}",
            sp.dir().display(),
            target.gateway
        );
    }
    let outcome = match &args.scenario {
        Scenario::Connections(a) => connections::run(a, &target).await,
        Scenario::Send(a) => latency::run(a, &target).await,
        Scenario::Fanout(a) => fanout::run(a, &target).await,
        Scenario::Failover(a) => failover::run(a, &target).await,
        Scenario::Sync(a) => sync::run(a, &target).await,
        Scenario::Webhooks(a) => {
            let prepared = prepared.context("the webhooks scenario was not prepared")?;
            webhooks::run(a, prepared, &target).await
        }
    }?;
    let result = Json::obj()
        .with("scenario", name)
        .with("started_unix", started)
        .with("wall_seconds", t0.elapsed().as_secs_f64())
        .with("git_revision", sys::git_revision())
        .with("build_profile", sys::build_profile())
        .with("machine", machine)
        .with("loadavg_end", sys::loadavg())
        .with("cluster", target.shape.clone())
        .with("params", outcome.params)
        .with("results", outcome.results);
    drop(target);
    std::fs::write(&out, result.pretty()).with_context(|| format!("writing {}", out.display()))?;
    println!("{} (details: {})", outcome.summary, out.display());
    Ok(())
}
