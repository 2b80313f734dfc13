//! `rim bench sync --spawn` end to end: two offline devices get 2,000
//! messages each, reconnect and catch up; the result file must show every
//! device with exactly the messages sent to it (no gap, no duplicate), a
//! positive sync rate, and the run's machine, build and cluster records.
//!
//! No timing bounds: the machine may be loaded. The bench gets a deadline;
//! past it, it is stopped with SIGTERM (which kills its spawned cluster),
//! then SIGKILL.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const DEVICES: u64 = 2;
const MESSAGES: u64 = 2_000;

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

fn num(v: &Value, path: &str) -> f64 {
    v.pointer(path)
        .and_then(Value::as_f64)
        .unwrap_or_else(|| panic!("{path} missing or not a number in {v:#}"))
}

#[test]
fn offline_devices_catch_up_with_every_message() {
    let dir = tempfile::tempdir().expect("temp dir");
    let out = dir.path().join("bench-sync.json");
    let mut child = Command::new(env!("CARGO_BIN_EXE_rim"))
        .args([
            "bench",
            "sync",
            "--spawn",
            "--shards",
            "2",
            "--devices",
            &DEVICES.to_string(),
            "--messages",
            &MESSAGES.to_string(),
            "--senders",
            "2",
            "--page",
            "300",
            "--stall",
            "60s",
            "--sync-timeout",
            "120s",
            "--out",
        ])
        .arg(&out)
        .arg("--work-dir")
        .arg(dir.path())
        .env_remove("RIM_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting rim bench sync");
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
        status.unwrap_or_else(|| panic!("rim bench sync did not finish in time; stderr tail:\n{tail}"));
    assert!(status.success(), "rim bench sync failed ({status}); stdout:\n{stdout}\nstderr tail:\n{tail}");
    assert!(stdout.contains("sync: "), "no summary line in stdout:\n{stdout}");

    let text = std::fs::read_to_string(&out).expect("result file");
    let r: Value = serde_json::from_str(&text).expect("result file is JSON");
    assert_eq!(r["scenario"], "sync");
    for key in ["machine", "build_profile", "git_revision", "cluster"] {
        assert!(r.get(key).is_some(), "{key} missing from the result");
    }
    assert!(r["machine"].is_object(), "machine: {}", r["machine"]);
    assert!(r["build_profile"].is_string(), "build_profile: {}", r["build_profile"]);
    assert_eq!(r["cluster"]["spawned"], true, "cluster: {}", r["cluster"]);
    assert_eq!(r["cluster"]["fsync"], true, "fsync setting recorded: {}", r["cluster"]);
    assert_eq!(r["params"]["devices"], DEVICES);
    assert_eq!(r["params"]["messages_per_device"], MESSAGES);

    assert_eq!(num(&r, "/results/fill/acked"), (DEVICES * MESSAGES) as f64);
    let sync = &r["results"]["sync"];
    assert_eq!(sync["devices_complete"], DEVICES, "sync: {sync:#}");
    assert_eq!(sync["devices_failed"], 0, "sync: {sync:#}");
    assert_eq!(sync["missing"], 0, "sync: {sync:#}");
    assert_eq!(sync["duplicated"], 0, "sync: {sync:#}");
    assert_eq!(sync["messages_received"], DEVICES * MESSAGES, "sync: {sync:#}");
    assert!(num(&r, "/results/sync/total_messages_per_second") > 0.0, "sync: {sync:#}");
    assert!(num(&r, "/results/sync/bytes_received") > 0.0, "sync: {sync:#}");

    let devices = r["results"]["devices"].as_array().expect("devices array");
    assert_eq!(devices.len() as u64, DEVICES);
    for d in devices {
        assert!(d["error"].is_null(), "device: {d:#}");
        assert_eq!(d["complete"], true, "device: {d:#}");
        assert_eq!(d["received"], MESSAGES, "device: {d:#}");
        assert_eq!(d["distinct"], MESSAGES, "device: {d:#}");
        assert_eq!(d["missing"], 0, "device: {d:#}");
        assert_eq!(d["duplicated"], 0, "device: {d:#}");
        assert_eq!(d["foreign"], 0, "device: {d:#}");
        assert_eq!(d["seq_gaps"], 0, "device: {d:#}");
        assert_eq!(d["seq_repeats"], 0, "device: {d:#}");
        assert_eq!(
            (d["first_seq"].as_u64(), d["last_seq"].as_u64()),
            (Some(1), Some(MESSAGES)),
            "device: {d:#}"
        );
        assert_eq!(d["acked_seq"], MESSAGES, "device: {d:#}");
        assert!(num(d, "/messages_per_second") > 0.0, "device: {d:#}");
        assert!(num(d, "/pages") >= (MESSAGES as f64 / 300.0).ceil(), "device: {d:#}");
    }
}
