//! `rim bench send` end to end: each run spawns its own cluster (3 × `rim
//! node` + `rim gateway`) and the test reads the JSON result file. The runs
//! go one after the other in a single test, so two clusters never compete
//! for the machine. Only consistency is asserted, never timings.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Runs `rim bench send <args> --spawn --out <dir>/<name>.json` within
/// `timeout` and returns the result file's `results` and `params`.
fn bench(dir: &Path, name: &str, args: &[&str], timeout: Duration) -> (Value, Value) {
    let out = dir.join(format!("{name}.json"));
    let (stdout, stderr) = (dir.join(format!("{name}.stdout")), dir.join(format!("{name}.stderr")));
    let mut child = Command::new(env!("CARGO_BIN_EXE_rim"))
        .args(["bench", "send", "--spawn", "--work-dir"])
        .arg(dir)
        .arg("--out")
        .arg(&out)
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&stdout).unwrap())
        .stderr(std::fs::File::create(&stderr).unwrap())
        .spawn()
        .expect("starting rim bench");
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() >= deadline {
            // SIGINT first: the bench then kills the cluster it spawned.
            let _ = Command::new("kill").args(["-INT", &child.id().to_string()]).status();
            let stop = Instant::now() + Duration::from_secs(10);
            while child.try_wait().unwrap().is_none() && Instant::now() < stop {
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = child.kill();
            let _ = child.wait();
            panic!("{name}: no result within {timeout:?}; stderr:\n{}", tail(&stderr));
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "{name}: {status}; stderr:\n{}", tail(&stderr));
    let summary = std::fs::read_to_string(&stdout).unwrap();
    eprintln!("{name}: {}", summary.trim());
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert_eq!(v["scenario"], "send");
    (v["results"].clone(), v["params"].clone())
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

fn num(v: &Value, what: &str) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("{what}: not a number: {v}"))
}

fn count(v: &Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or_else(|| panic!("{key}: not a count: {}", v[key]))
}

/// p50 ≤ p90 ≤ p99 ≤ p99.9 ≤ max, all present, `count` samples.
fn assert_percentiles(h: &Value, samples: u64, what: &str) {
    assert_eq!(count(h, "count"), samples, "{what}: count");
    let qs: Vec<f64> = ["min", "p50", "p90", "p99", "p99_9", "max"]
        .iter()
        .map(|k| num(&h[*k], &format!("{what}.{k}")))
        .collect();
    assert!(qs.windows(2).all(|w| w[0] <= w[1]), "{what}: not ordered: {h}");
    assert!(samples == 0 || qs[0] > 0.0, "{what}: a latency of zero: {h}");
}

/// A run (or step) where every measured send was acked and delivered.
fn assert_complete(r: &Value, what: &str) {
    let sent = count(r, "sent");
    assert!(sent > 0, "{what}: nothing sent");
    assert_eq!(count(r, "acked_ok"), sent, "{what}: acked == sent");
    assert_eq!(count(r, "delivered"), sent, "{what}: delivered == acked");
    assert_eq!(count(r, "errors_total"), 0, "{what}: errors {}", r["errors"]);
    assert_eq!(count(r, "unanswered_after_drain"), 0, "{what}");
    assert_eq!(count(r, "undelivered_after_drain"), 0, "{what}");
    assert_percentiles(&r["send_to_ack_ms"], sent, &format!("{what}: send_to_ack_ms"));
    assert_percentiles(&r["send_to_delivered_ms"], sent, &format!("{what}: send_to_delivered_ms"));
}

#[test]
fn send_fixed_rate_closed_loop_and_slo_search() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();

    // (a) Open loop: 10 pairs at 200 msg/s for 5 s.
    let (r, p) = bench(
        dir,
        "fixed",
        &["--pairs", "10", "--rate", "200", "--duration", "5s", "--warmup", "1s"],
        Duration::from_secs(90),
    );
    assert_eq!(p["loop"], "open");
    assert_complete(&r, "fixed");
    // At most one send per sender per tick: 1000 and one tick of each sender.
    let sent = count(&r, "sent");
    assert!(sent <= 1010, "fixed: sent {sent}");
    assert_eq!(num(&r["target_rate_per_second"], "target"), 200.0);

    // Closed loop: each sender keeps 4 sends outstanding.
    let (r, p) = bench(
        dir,
        "closed",
        &["--pairs", "5", "--rate", "max", "--max-inflight", "4", "--duration", "2s", "--warmup", "0.5s"],
        Duration::from_secs(60),
    );
    assert_eq!(p["loop"], "closed");
    assert_eq!(r["target_rate_per_second"], "max");
    assert_complete(&r, "closed");
    let acked_per_s = num(&r["ack_throughput_per_second"], "ack throughput");
    assert!((acked_per_s - count(&r, "acked_ok") as f64 / 2.0).abs() < 0.01, "closed: acks/s");

    // (b) SLO search: tiny steps, at most 2 narrowing steps after the first miss.
    let bound_ms = 150.0;
    let (r, _) = bench(
        dir,
        "slo",
        &[
            "--pairs",
            "10",
            "--rate",
            "200",
            "--slo",
            "150ms",
            "--step-duration",
            "1s",
            "--warmup",
            "0.5s",
            "--drain",
            "3s",
            "--search-steps",
            "2",
        ],
        Duration::from_secs(150),
    );
    assert_eq!(r["slo"]["quantile"], "p99");
    assert_eq!(r["slo"]["on"], "ack");
    assert_eq!(num(&r["slo"]["bound_ms"], "bound"), bound_ms);
    let steps = r["steps"].as_array().expect("steps");
    assert!(steps.len() >= 2, "at least two steps: {steps:?}");
    let (mut lo, mut hi) = (None::<f64>, None::<f64>);
    let mut narrowings = 0;
    for (i, s) in steps.iter().enumerate() {
        let what = format!("step {i}");
        assert_eq!(count(s, "step"), i as u64);
        let rate = num(&s["target_rate_per_second"], &what);
        let (phase, met) = (s["phase"].as_str().unwrap(), s["slo"]["met"].as_bool().unwrap());
        // The rule: start, double while met, then halve (nothing met yet) or bisect.
        let (want_phase, want_rate) = match (i, lo, hi) {
            (0, _, _) => ("start", 200.0),
            (_, Some(l), None) => ("double", 2.0 * l),
            (_, None, Some(h)) => ("halve", (h / 2.0).round()),
            (_, Some(l), Some(h)) => ("bisect", ((l + h) / 2.0).round()),
            (_, None, None) => unreachable!(),
        };
        assert_eq!(phase, want_phase, "{what}: {s}");
        assert!((rate - want_rate).abs() < 1e-6, "{what}: rate {rate}, want {want_rate}");
        assert!(lo.is_none_or(|l| l < rate) && hi.is_none_or(|h| rate < h), "{what}: outside the bracket");
        if phase == "halve" || phase == "bisect" {
            narrowings += 1;
        }
        // Met means: measured quantile within the bound.
        if met {
            let m = num(&s["slo"]["measured_ms"], &format!("{what}: measured_ms"));
            assert!(m <= bound_ms, "{what}: met with {m} ms");
            lo = Some(lo.map_or(rate, |l: f64| l.max(rate)));
        } else {
            hi = Some(hi.map_or(rate, |h: f64| h.min(rate)));
        }
        // Every step's own figures are consistent, whatever the verdict.
        let sent = count(s, "sent");
        assert!(count(s, "acked_ok") <= sent && count(s, "delivered") <= count(s, "acked_ok"), "{what}");
        assert_percentiles(&s["send_to_ack_ms"], count(s, "acked_ok"), &format!("{what}: ack"));
        assert_percentiles(&s["send_to_delivered_ms"], count(s, "delivered"), &format!("{what}: delivered"));
    }
    assert!(narrowings <= 2, "{narrowings} narrowing steps");
    match (&r["answer"], lo) {
        (Value::Null, None) => assert!(r["max_rate_within_slo_per_second"].is_null()),
        (a, Some(best)) if a.is_object() => {
            let s = &steps[count(a, "step") as usize];
            assert_eq!(s["slo"]["met"], true, "answer: {a}");
            assert_eq!(
                num(&s["target_rate_per_second"], "answer step"),
                best,
                "answer: the highest met rate"
            );
            assert_eq!(num(&r["max_rate_within_slo_per_second"], "max rate"), best);
            assert!(num(&a["measured_ms"], "answer measured_ms") <= bound_ms);
        }
        (a, lo) => panic!("answer {a} but highest met rate {lo:?}"),
    }
    assert_eq!(count(&r["totals"], "broken_connections"), 0, "stopped: {}", r["stopped"]);
}
