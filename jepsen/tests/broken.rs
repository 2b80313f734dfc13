//! The harness catches deliberately broken builds (issue "jepsen", self-test):
//! each `rim node --sabotage` flag, run through the real harness (processes,
//! proxies, nemesis, workload, checker), is reported with the anomaly it
//! exists for. A checker that cannot fail proves nothing.
//!
//! The nemesis is aimed at the fault each flag needs (isolating leaders for
//! ack-before-commit, isolating a node for stale reads, crashing every node
//! for skip-fsync) and repeated several times per run, so one run is enough.
//! Skip-fsync bypasses the WAL, so a crash loses everything not yet flushed,
//! cluster membership included; its run therefore restarts every node
//! cleanly after set-up (persisting the membership and users), and only the
//! messages acked later are at risk.
//!
//! `no-relay-dedup` has no harness run here: its duplicates need a relay
//! retry after a delivery that committed, i.e. a fault between two nodes
//! that lead different shards, and where leaders sit is up to the cluster,
//! so a run caught it only sometimes. `node/tests/broken.rs` forces the
//! retry in process, and the checker's hand-made `duplicate` history shows
//! the kind is reported.
//!
//! The correct build is checked under the same harness by the CI smoke run (`make test`: `rim-jepsen test
//! --nodes 3 --time-limit 60 --nemesis partition,kill,pause`).
//!
//! Needs the built `rim` binary (`cargo build -p rim`, or `RIM_BIN`). Runs
//! one at a time: each starts three nodes and a gateway.

use std::time::Duration;

use rim_jepsen::checker::Validity;
use rim_jepsen::nemesis::{Fault, NemesisOptions, Shape, Target};
use rim_jepsen::run::{RunOutcome, TestOptions, run_test};

async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    LOCK.lock().await
}

fn options(sabotage: &str, faults: Vec<Fault>, shapes: Vec<Shape>, targets: Vec<Target>) -> TestOptions {
    let bin = rim_jepsen::control::rim_bin().unwrap_or_else(|e| panic!("{e}"));
    let mut o = TestOptions::new(bin, 7);
    o.shards = 2;
    o.time_limit = Duration::from_secs(25);
    o.recovery_time = Duration::from_secs(1);
    o.workload.users = 4;
    o.workload.op_timeout = Duration::from_secs(3);
    o.nemesis = NemesisOptions { faults, interval: Duration::from_secs(3), seed: 7, shapes, targets };
    o.store = std::env::temp_dir().join("rim-jepsen-broken");
    o.sabotage = Some(sabotage.into());
    o.progress = false;
    o.min_acked = 50;
    // See the module docs: persist membership and users before the crashes.
    o.restart_after_setup = sabotage == "skip-fsync";
    o
}

async fn run(opts: TestOptions) -> RunOutcome {
    let _guard = serial().await;
    match run_test(opts).await {
        Ok(o) => o,
        Err(e) => panic!("the harness could not run: {e}"),
    }
}

/// Asserts the run found at least one of `kinds`, and prints where to look.
fn assert_caught(outcome: &RunOutcome, kinds: &[&str]) {
    let text = rim_jepsen::checker::render_text(&outcome.results);
    assert_eq!(
        outcome.results.valid,
        Validity::Invalid,
        "not caught; run dir {}:\n{text}",
        outcome.dir.display()
    );
    let found: Vec<&String> =
        outcome.results.anomaly_types.iter().filter(|k| kinds.contains(&k.as_str())).collect();
    assert!(
        !found.is_empty(),
        "expected one of {kinds:?}, found {:?}; run dir {}:\n{text}",
        outcome.results.anomaly_types,
        outcome.dir.display()
    );
    assert!(
        outcome.results.stats.nemesis_events > 0,
        "no fault was injected; run dir {}",
        outcome.dir.display()
    );
    let counts: Vec<String> =
        outcome.results.anomalies.iter().map(|(kind, g)| format!("{kind}: {}", g.count)).collect();
    eprintln!("caught: {}", counts.join(", "));
    // Caught as expected: the run dir (hundreds of MB of node data) can go.
    let _ = std::fs::remove_dir_all(&outcome.dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ack_before_commit_is_caught_as_lost_acks() {
    let o =
        run(options("ack-before-commit", vec![Fault::Partition], vec![Shape::IsolateLeader], vec![])).await;
    assert_caught(&o, &["lost-ack"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_reads_are_caught() {
    let o = run(options("stale-reads", vec![Fault::Partition], vec![Shape::Isolate], vec![])).await;
    assert_caught(&o, &["stale-read"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_webhook_events_are_caught_as_lost_events() {
    let mut o = options("drop-events", vec![Fault::Webhook], vec![], vec![]);
    o.webhook_receiver = Some(env!("CARGO_BIN_EXE_rim-jepsen").into());
    let o = run(o).await;
    assert_caught(&o, &["lost-event"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skip_fsync_is_caught_when_every_node_crashes() {
    let o = run(options("skip-fsync", vec![Fault::Kill], vec![], vec![Target::All])).await;
    assert_caught(&o, &["lost-ack", "lost-entry", "divergence"]);
}
