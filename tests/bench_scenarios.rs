//! `rim bench connections` and `rim bench fanout` end to end, each on a
//! cluster it spawns: the result files must show every connection signed in
//! and held, a gateway memory figure per connection, and every group message
//! delivered to every online member exactly as counted (small and super
//! groups), with the run's records. The scenarios run one after the other in
//! one test (each spawns 3 nodes and a gateway; two at once would crowd a
//! 2-core machine).
//!
//! No timing bounds: the machine may be loaded. Each bench gets a deadline;
//! past it, it is stopped with SIGTERM (which kills its spawned cluster),
//! then SIGKILL.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Waits for `child` until `deadline`; then SIGTERM, 10 s of grace, SIGKILL.
fn wait_or_stop(child: &mut Child, deadline: Duration) -> Option<std::process::ExitStatus> {
    let start = Instant::now();
    while start.elapsed() < deadline {
        if let Some(status) = child.try_wait().expect("waiting for rim bench") {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    let grace = Instant::now();
    while grace.elapsed() < Duration::from_secs(10) {
        if child.try_wait().ok().flatten().is_some() {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

/// Runs `rim bench ARGS --spawn --out DIR/NAME.json`; returns the result
/// file and the summary line, failing with the stderr tail otherwise.
fn bench(dir: &Path, name: &str, args: &[&str]) -> (Value, String) {
    let out = dir.join(format!("{name}.json"));
    let mut child = Command::new(env!("CARGO_BIN_EXE_rim"))
        .arg("bench")
        .args(args)
        .args(["--spawn", "--shards", "2", "--out"])
        .arg(&out)
        .arg("--work-dir")
        .arg(dir)
        .env_remove("RIM_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting rim bench");
    // Drain the pipes on threads so the child never blocks on a full pipe.
    let mut so = child.stdout.take().expect("stdout");
    let mut se = child.stderr.take().expect("stderr");
    let so = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut so, &mut s);
        s
    });
    let se = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut se, &mut s);
        s
    });
    let status = wait_or_stop(&mut child, Duration::from_secs(240));
    let (stdout, stderr) = (so.join().unwrap_or_default(), se.join().unwrap_or_default());
    let tail: String =
        stderr.lines().rev().take(40).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n");
    let status =
        status.unwrap_or_else(|| panic!("rim bench {name} did not finish in time; stderr tail:\n{tail}"));
    assert!(status.success(), "rim bench {name} failed ({status}); stdout:\n{stdout}\nstderr tail:\n{tail}");
    let text = std::fs::read_to_string(&out).unwrap_or_else(|e| panic!("reading {}: {e}", out.display()));
    let v: Value = serde_json::from_str(&text).expect("the result file is JSON");
    for key in ["machine", "build_profile", "git_revision", "cluster", "params", "results"] {
        assert!(v.get(key).is_some(), "{name}: {key} missing from the result");
    }
    assert_eq!(v["cluster"]["fsync"], true, "{name}: fsync setting recorded: {}", v["cluster"]);
    (v, stdout)
}

fn num(v: &Value, path: &str) -> f64 {
    v.pointer(path)
        .and_then(Value::as_f64)
        .unwrap_or_else(|| panic!("{path} missing or not a number in {v:#}"))
}

#[test]
fn connections_and_group_fanout_report_complete_figures() {
    let dir = tempfile::tempdir().expect("temp dir");

    // Idle connections: all signed in, all still open after the hold.
    let (c, summary) = bench(
        dir.path(),
        "connections",
        &["connections", "--connections", "300", "--users", "10", "--local-ips", "4", "--hold", "1s"],
    );
    assert!(summary.contains("connections: 300/300"), "summary: {summary}");
    assert_eq!(num(&c, "/results/connections_signed_in"), 300.0);
    assert_eq!(num(&c, "/results/connections_failed"), 0.0);
    assert_eq!(num(&c, "/results/open_after_hold"), 300.0);
    assert!(num(&c, "/results/sign_ins_per_second") > 0.0);
    assert!(num(&c, "/results/gateway_rss_kib/all_signed_in") > 0.0, "gateway RSS read: {c:#}");
    assert!(c["results"]["gateway_rss_bytes_per_connection"].is_number(), "per-connection figure: {c:#}");
    assert_eq!(num(&c, "/results/sign_in_latency_ms/count"), 300.0);

    // Small group (write diffusion): 20 messages to 19 other online members.
    let (s, _) = bench(
        dir.path(),
        "fanout-small",
        &["fanout", "--kind", "small", "--members", "20", "--messages", "20", "--rate", "20"],
    );
    assert_eq!(num(&s, "/results/acked_ok"), 20.0, "{s:#}");
    assert_eq!(num(&s, "/results/deliveries_expected"), 20.0 * 19.0);
    assert_eq!(num(&s, "/results/delivered"), 20.0 * 19.0, "{s:#}");
    assert_eq!(num(&s, "/results/missing_after_drain"), 0.0);
    // `unexpected_pushes` may count a membership notice pushed late: not asserted.
    assert_eq!(num(&s, "/results/errors_total"), 0.0, "{s:#}");
    let d = &s["results"]["send_to_delivered_ms"];
    assert!(num(d, "/p50") <= num(d, "/p99") && num(d, "/p99") <= num(d, "/max"), "ordered: {d}");

    // Super group (read diffusion): 30 of 50 members online get every message.
    let (g, _) = bench(
        dir.path(),
        "fanout-super",
        &[
            "fanout",
            "--kind",
            "super",
            "--members",
            "50",
            "--online",
            "30",
            "--messages",
            "10",
            "--rate",
            "10",
        ],
    );
    assert_eq!(num(&g, "/results/acked_ok"), 10.0, "{g:#}");
    assert_eq!(num(&g, "/results/deliveries_expected"), 10.0 * 29.0);
    assert_eq!(num(&g, "/results/delivered"), 10.0 * 29.0, "{g:#}");
    assert_eq!(num(&g, "/results/missing_after_drain"), 0.0);
    assert_eq!(num(&g, "/results/errors_total"), 0.0, "{g:#}");
}
