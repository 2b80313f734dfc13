//! The harness on a correct build in `--retry-same-id` mode: sends whose
//! outcome was unknown are re-sent with the same payload id while shard
//! leaders are being killed, and the checker still finds every message once
//! per list (server-side deduplication, IM-2) and nothing lost (IM-6). The
//! workload's groups take part: two small groups and a super group are
//! created, sent to over both client paths and read.
//!
//! (The plain mode is the CI smoke run of `make test`.) Needs the built
//! `rim` binary (`cargo build -p rim`, or `RIM_BIN`).

use std::collections::HashMap;
use std::time::Duration;

use rim_jepsen::checker::Validity;
use rim_jepsen::history::{ConvKind, OpBody, OpType, read_history};
use rim_jepsen::nemesis::{Fault, Target};
use rim_jepsen::run::{TestOptions, run_test};
use rim_jepsen::workload::GatewayTransport;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_same_id_under_leader_kills_is_valid() {
    let bin = rim_jepsen::control::rim_bin().unwrap_or_else(|e| panic!("{e}"));
    let mut opts = TestOptions::new(bin, 11);
    opts.shards = 2;
    opts.time_limit = Duration::from_secs(25);
    opts.recovery_time = Duration::from_secs(1);
    opts.workload.users = 4;
    // Short: more sends end indeterminate, so more are retried.
    opts.workload.op_timeout = Duration::from_millis(1500);
    opts.workload.retry_same_id = true;
    opts.workload.transport = GatewayTransport::Tcp;
    opts.nemesis.faults = vec![Fault::Kill, Fault::Pause];
    opts.nemesis.interval = Duration::from_secs(3);
    opts.nemesis.targets = vec![Target::Leader];
    opts.store = std::env::temp_dir().join("rim-jepsen-harness");
    opts.progress = false;
    opts.min_acked = 100;
    let outcome = run_test(opts).await.unwrap_or_else(|e| panic!("the harness could not run: {e}"));
    let text = rim_jepsen::checker::render_text(&outcome.results);
    assert_eq!(outcome.results.valid, Validity::Valid, "run dir {}:\n{text}", outcome.dir.display());

    // The mode did what it is for: some payload ids were sent more than once.
    let history = read_history(outcome.dir.join("history.jsonl")).unwrap();
    let mut attempts: HashMap<String, u32> = HashMap::new();
    let mut group_acks: HashMap<(ConvKind, &str), u32> = HashMap::new();
    let mut group_reads = 0;
    for op in &history.ops {
        match (op.op_type, &op.body) {
            (OpType::Invoke, OpBody::Send(v)) => *attempts.entry(v.client_msg_id.clone()).or_default() += 1,
            (OpType::Ok, OpBody::Send(v)) if v.kind.is_group() => {
                *group_acks.entry((v.kind, op.node.as_deref().unwrap_or("?"))).or_default() += 1;
            }
            (OpType::Ok, OpBody::Sync(v)) if v.group.is_some() => group_reads += 1,
            _ => {}
        }
    }
    let kinds: Vec<ConvKind> = outcome.summary.groups.iter().map(|g| g.kind).collect();
    assert_eq!(kinds, [ConvKind::Group, ConvKind::Group, ConvKind::Super], "{:?}", outcome.summary);
    for kind in [ConvKind::Group, ConvKind::Super] {
        let gw = group_acks.get(&(kind, "gw")).copied().unwrap_or(0);
        let grpc: u32 =
            group_acks.iter().filter(|((k, n), _)| *k == kind && *n != "gw").map(|(_, c)| c).sum();
        assert!(gw > 0 && grpc > 0, "acked {kind:?} sends: {gw} via the gateway, {grpc} via gRPC");
    }
    assert!(group_reads > 0, "no super-group read");
    assert!(outcome.summary.final_reads.missing_groups.is_empty(), "{:?}", outcome.summary.final_reads);
    let retried = attempts.values().filter(|n| **n > 1).count();
    assert!(retried > 0, "no payload id was re-sent; run dir {}:\n{text}", outcome.dir.display());
    assert!(outcome.results.stats.nemesis_events > 0, "no fault injected");
    assert!(outcome.summary.final_reads.missing.is_empty(), "{:?}", outcome.summary.final_reads);
    let _ = std::fs::remove_dir_all(&outcome.dir);
}
