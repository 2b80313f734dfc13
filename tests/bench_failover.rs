//! `rim bench failover --spawn` end to end: a spawned 3-node cluster and
//! gateway under steady 1:1 load, the leader of one data shard SIGKILLed,
//! the load kept going, every list read back. The result file must show
//! a killed leader (node and shard), restarted while the load goes on,
//! acks before and after the kill, a measured write-unavailability window,
//! and no acked message lost or duplicated. No timing bound is asserted (the machine is shared).

use std::fs::File;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Longest the bench may run (it plans about 25 s on an idle machine).
const RUN_DEADLINE: Duration = Duration::from_secs(150);

/// Waits for `child` until `deadline`; past it, interrupts it (SIGINT: the
/// bench kills its cluster on the way out) and fails.
fn wait_with_deadline(child: &mut Child, deadline: Instant, stderr: &Path) -> ExitStatus {
    loop {
        if let Some(status) = child.try_wait().expect("polling the bench") {
            return status;
        }
        if Instant::now() >= deadline {
            let _ = Command::new("kill").args(["-INT", &child.id().to_string()]).status();
            let grace = Instant::now() + Duration::from_secs(15);
            while Instant::now() < grace && child.try_wait().ok().flatten().is_none() {
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = child.kill();
            let _ = child.wait();
            panic!("the bench ran longer than {RUN_DEADLINE:?}; stderr:\n{}", tail(stderr, 40));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn uint(v: &Value, path: &str) -> u64 {
    v.pointer(path).and_then(Value::as_u64).unwrap_or_else(|| panic!("{path} is not a count in {v:#}"))
}

fn finite(v: &Value, path: &str) -> f64 {
    let x =
        v.pointer(path).and_then(Value::as_f64).unwrap_or_else(|| panic!("{path} is not a number in {v:#}"));
    assert!(x.is_finite() && x >= 0.0, "{path} = {x}");
    x
}

#[test]
fn failover_keeps_every_acked_message_and_measures_the_window() {
    let dir = tempfile::tempdir().expect("temp dir");
    let out = dir.path().join("failover.json");
    let (stdout, stderr) = (dir.path().join("stdout.log"), dir.path().join("stderr.log"));
    let mut child = Command::new(env!("CARGO_BIN_EXE_rim"))
        .args(["bench", "failover", "--spawn", "--shards", "4"])
        .args(["--pairs", "8", "--rate", "80", "--kill-after", "3s", "--after", "5s"])
        .args(["--restart-after", "3s", "--drain", "15s", "--verify-timeout", "20s"])
        .arg("--work-dir")
        .arg(dir.path())
        .arg("--out")
        .arg(&out)
        .env_remove("RIM_CLUSTER_SECRET")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(File::create(&stdout).expect("stdout file"))
        .stderr(File::create(&stderr).expect("stderr file"))
        .spawn()
        .expect("starting rim bench failover");
    let status = wait_with_deadline(&mut child, Instant::now() + RUN_DEADLINE, &stderr);
    assert!(status.success(), "rim bench failover: {status}; stderr:\n{}", tail(&stderr, 40));
    let summary = std::fs::read_to_string(&stdout).expect("stdout");
    assert!(summary.contains("failover: killed node"), "summary: {summary}");

    let json: Value =
        serde_json::from_str(&std::fs::read_to_string(&out).expect("result file")).expect("result JSON");
    assert_eq!(json["scenario"], "failover");
    let r = &json["results"];

    // A leader was killed: its node and shard are named.
    let node = uint(r, "/killed/node_id");
    assert!((1..=3).contains(&node), "killed node {node}");
    let shard = uint(r, "/killed/shard");
    assert!(shard >= 1, "killed shard {shard} must be a data shard");
    assert_eq!(uint(r, "/unavailability/shard"), shard);
    let led = r["killed"]["groups_led"].as_array().expect("groups_led");
    assert!(led.iter().any(|g| g.as_u64() == Some(shard)), "the victim led {led:?}, not shard {shard}");
    if let Some(new_leader) = r["killed"]["new_leader_node_id"].as_u64() {
        assert_ne!(new_leader, node, "the new leader is the killed node");
    }
    // It was started again while the load went on.
    let restart = &r["killed"]["restart"];
    assert!(restart["pid"].as_u64().is_some(), "restart of node {node}: {restart:#}");

    // Acks before and after the kill, overall and on the killed shard.
    assert!(uint(r, "/acked_before_kill") > 0, "nothing acked before the kill");
    assert!(uint(r, "/acked_after_kill") > 0, "nothing acked after the kill");
    assert!(uint(r, "/unavailability/acked_before_kill") > 0, "killed shard: nothing acked before");
    assert!(uint(r, "/unavailability/acked_after_kill") > 0, "killed shard: nothing acked after");

    // The window is measured.
    assert_eq!(r["unavailability"]["recovered"], true, "{:#}", r["unavailability"]);
    finite(r, "/unavailability/kill_to_first_ack_ms");
    let gap = finite(r, "/unavailability/longest_ack_gap_ms");
    assert!(gap > 0.0, "longest ack gap {gap}");

    // Nothing acked lost, nothing duplicated.
    let v = &r["verification"];
    let acked = uint(v, "/acked");
    assert_eq!(acked, uint(r, "/acked"), "every acked message was checked");
    assert!(acked > 0);
    assert_eq!(uint(v, "/lost"), 0, "lost acked messages: {v:#}");
    assert_eq!(uint(v, "/duplicated"), 0, "duplicated messages: {v:#}");
    assert_eq!(uint(v, "/found"), acked, "{v:#}");

    // The spawned cluster is gone with its directory.
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .expect("work dir")
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with("rim-bench-"))
        .collect();
    assert!(left.is_empty(), "cluster directory left behind: {left:?}");
}
