//! Reports of hand-made histories: the files, the fault windows, the
//! delivery lag and the timeline's escaping and cap.

use rim_jepsen::checker::{CheckOptions, Results, check};
use rim_jepsen::history::{Entry, F_PUSH, FinalReadValue, Op, OpBody, OpType, Process, SendValue, SyncValue};
use rim_jepsen::report::{
    FaultWindow, MAX_TIMELINE_OPS, ObservedBy, ReportSummary, delivery_lags, fault_timeline,
    unseen_over_time, write_report,
};
use serde_json::{Value, json};
use std::path::Path;

const MS: u64 = 1_000_000;

/// Builds a history with explicit times; indices follow the order of lines.
#[derive(Default)]
struct History {
    ops: Vec<Op>,
}

impl History {
    fn add(&mut self, op: Op) {
        let i = self.ops.len() as u64;
        self.ops.push(op.with_index(i));
    }

    fn send(&mut self, process: u64, from: u64, to: u64, id: &str, invoke_ms: u64, done_ms: u64, t: OpType) {
        let v =
            SendValue { from, device: from * 10 + 1, to, client_msg_id: id.into(), ..SendValue::default() };
        self.add(Op::new(OpType::Invoke, Process::Worker(process), invoke_ms * MS, OpBody::Send(v.clone())));
        let done = if t == OpType::Ok { SendValue { seq: Some(1), message_id: Some(77), ..v } } else { v };
        let mut op = Op::new(t, Process::Worker(process), done_ms * MS, OpBody::Send(done)).with_node("n1");
        if t != OpType::Ok {
            op = op.with_error("deadline exceeded <after 1s>");
        }
        self.add(op);
    }

    fn sync(&mut self, process: u64, user: u64, ids: &[(&str, u64)], invoke_ms: u64, done_ms: u64) {
        let v = SyncValue { user, device: user * 10 + 1, after: 0, limit: Some(100), ..SyncValue::default() };
        self.add(Op::new(OpType::Invoke, Process::Worker(process), invoke_ms * MS, OpBody::Sync(v.clone())));
        let entries = entries(user, ids);
        let done = SyncValue {
            last_seq: Some(entries.len() as u64),
            entries: Some(entries),
            has_more: Some(false),
            ..v
        };
        self.add(Op::new(OpType::Ok, Process::Worker(process), done_ms * MS, OpBody::Sync(done)));
    }

    fn push(&mut self, process: u64, user: u64, ids: &[(&str, u64)], at_ms: u64) {
        let value = json!({"user": user, "device": user * 10 + 1, "entries": entries(user, ids)});
        self.add(Op::new(
            OpType::Ok,
            Process::Worker(process),
            at_ms * MS,
            OpBody::Other { f: F_PUSH.into(), value },
        ));
    }

    fn final_read(&mut self, process: u64, user: u64, ids: &[(&str, u64)], at_ms: u64) {
        let v = FinalReadValue { user, ..FinalReadValue::default() };
        self.add(
            Op::new(OpType::Invoke, Process::Worker(process), at_ms * MS, OpBody::FinalRead(v.clone()))
                .with_node("n1"),
        );
        let done = FinalReadValue { entries: Some(entries(user, ids)), ..v };
        self.add(
            Op::new(OpType::Ok, Process::Worker(process), (at_ms + 1) * MS, OpBody::FinalRead(done))
                .with_node("n1"),
        );
    }

    fn nemesis(&mut self, f: &str, value: Value, at_ms: u64) {
        self.add(Op::new(OpType::Info, Process::nemesis(), at_ms * MS, OpBody::Other { f: f.into(), value }));
    }

    fn results(&self) -> Results {
        check(&self.ops, &CheckOptions::default())
    }

    fn report(&self, dir: &Path) -> ReportSummary {
        write_report(dir, &self.ops, &self.results()).expect("report written")
    }
}

/// Entries of `user`'s list, seq 1 first; `(id, sender)` pairs.
fn entries(user: u64, ids: &[(&str, u64)]) -> Vec<Entry> {
    ids.iter()
        .enumerate()
        .map(|(i, (id, from))| Entry {
            seq: i as u64 + 1,
            message_id: 0,
            client_msg_id: id.to_string(),
            from: *from,
            to: if *from == user { 0 } else { user },
            ..Entry::default()
        })
        .collect()
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn assert_svg(path: &Path) {
    let text = read(path);
    assert!(text.starts_with("<svg"), "{}: {}", path.display(), &text[..text.len().min(200)]);
    assert!(text.trim_end().ends_with("</svg>"), "{}", path.display());
}

fn window(w: &FaultWindow) -> (&str, f64, f64, bool) {
    (w.kind.as_str(), w.start_s, w.end_s, w.closed)
}

/// u1 sends a to u2 (a push shows it 10 ms before the ack), b to u3 (u3's
/// sync sees it 300 ms after the ack), and u2 sends c to u1 (never seen).
fn lag_history() -> History {
    let mut h = History::default();
    h.send(1, 1, 2, "a", 0, 100, OpType::Ok);
    h.push(2, 2, &[("a", 1)], 90);
    h.send(1, 1, 3, "b", 150, 200, OpType::Ok);
    // The sender's own list holds b earlier: not the recipient's observation.
    h.sync(1, 1, &[("b", 1)], 210, 250);
    h.send(2, 2, 1, "c", 260, 300, OpType::Ok);
    h.sync(3, 3, &[("b", 1)], 400, 500);
    h
}

#[test]
fn delivery_lag_counts_pushes_syncs_and_unseen_messages() {
    let h = lag_history();
    let lags = delivery_lags(&h.ops);
    let by_id: Vec<(&str, Option<u64>, Option<ObservedBy>)> =
        lags.iter().map(|l| (l.client_msg_id.as_str(), l.lag_ns(), l.seen.map(|s| s.1))).collect();
    assert_eq!(
        by_id,
        vec![
            ("a", Some(0), Some(ObservedBy::Push)),
            ("b", Some(300 * MS), Some(ObservedBy::Sync)),
            ("c", None, None),
        ]
    );

    // a: acked and already seen at 100 ms; b unseen 200..500 ms; c from 300 ms on.
    let unseen = unseen_over_time(&lags, 600 * MS);
    assert_eq!(
        unseen,
        vec![(0, 0), (100 * MS, 0), (200 * MS, 1), (300 * MS, 2), (500 * MS, 1), (600 * MS, 1)]
    );

    let dir = tempfile::tempdir().unwrap();
    let s = h.report(dir.path());
    let lag = &s.delivery_lag;
    assert_eq!((lag.acked, lag.observed, lag.never_observed), (3, 2, 1));
    let p = lag.lag_ms.as_ref().expect("percentiles");
    assert_eq!(p.count, 2);
    assert_eq!(p.max, 300.0);
    assert!(p.p50 == 0.0 || p.p50 == 300.0, "{p:?}");
    assert_eq!(lag.first_observed_by.get("push"), Some(&1));
    assert_eq!(lag.first_observed_by.get("sync"), Some(&1));
    assert_svg(&s.files.lag);
}

#[test]
fn a_final_read_is_an_observation_and_the_earliest_one_wins() {
    let mut h = History::default();
    h.send(1, 1, 2, "a", 0, 100, OpType::Ok);
    h.final_read(3, 2, &[("a", 1)], 900);
    h.sync(2, 2, &[("a", 1)], 600, 700);
    let lags = delivery_lags(&h.ops);
    assert_eq!(lags[0].lag_ns(), Some(600 * MS));
    assert_eq!(lags[0].seen.map(|s| s.1), Some(ObservedBy::Sync));

    let mut h = History::default();
    h.send(1, 1, 2, "a", 0, 100, OpType::Ok);
    h.final_read(3, 2, &[("a", 1)], 900);
    assert_eq!(delivery_lags(&h.ops)[0].seen.map(|s| s.1), Some(ObservedBy::FinalRead));
}

#[test]
fn fault_windows_pair_starts_with_stops() {
    let mut h = History::default();
    h.nemesis("start-partition", json!({"nodes": [1], "shape": "isolate"}), 1000);
    h.nemesis("start-partition", json!({"nodes": [2], "shape": "isolate"}), 2000);
    h.nemesis("stop-partition", json!({"nodes": [2]}), 3000);
    h.nemesis("stop-partition", Value::Null, 4000);
    h.nemesis("start-pause", json!({"nodes": [3]}), 5000);
    h.nemesis("stop-clock", json!({"nodes": [3]}), 5500);
    h.nemesis("kill-start", json!({"nodes": [2]}), 5600);
    h.nemesis("kill-stop", json!({"nodes": [2]}), 5700);
    h.nemesis("final-heal", Value::Null, 5800);
    h.send(1, 1, 2, "a", 5900, 6000, OpType::Ok);

    let faults = fault_timeline(&h.ops);
    let windows: Vec<_> = faults.windows.iter().map(window).collect();
    assert_eq!(
        windows,
        vec![
            ("partition", 1.0, 4.0, true),
            ("partition", 2.0, 3.0, true),
            ("pause", 5.0, 6.0, false),
            ("kill", 5.6, 5.7, true),
        ]
    );
    assert_eq!(faults.windows[0].value["nodes"], json!([1]));
    assert_eq!(faults.windows[1].stop_op, Some(2));
    assert_eq!(faults.windows[2].stop_op, None);
    let markers: Vec<&str> = faults.markers.iter().map(|m| m.f.as_str()).collect();
    assert_eq!(markers, ["stop-clock", "final-heal"]);
    assert_eq!(faults.kinds(), ["partition", "pause", "kill"]);

    let dir = tempfile::tempdir().unwrap();
    let s = h.report(dir.path());
    assert_eq!(s.fault_windows, faults.windows);
    assert_eq!(s.nemesis_markers, faults.markers);
}

#[test]
fn a_run_with_faults_writes_every_file() {
    let mut h = lag_history();
    h.nemesis("start-partition", json!({"nodes": [2], "shape": "isolate"}), 120);
    h.send(6, 3, 1, "d", 130, 330, OpType::Info);
    h.send(7, 3, 2, "e", 140, 180, OpType::Fail);
    h.nemesis("stop-partition", json!({"nodes": [2]}), 350);
    h.nemesis("start-kill", json!({"nodes": [3]}), 550);
    h.nemesis("final-heal", Value::Null, 560);
    // An invocation the history never completes.
    let v = SyncValue { user: 2, device: 21, after: 0, limit: None, ..SyncValue::default() };
    h.add(Op::new(OpType::Invoke, Process::Worker(5), 570 * MS, OpBody::Sync(v)));

    let dir = tempfile::tempdir().unwrap();
    let s = h.report(dir.path());
    for svg in [&s.files.latency, &s.files.rate, &s.files.lag] {
        assert_svg(svg);
    }
    assert!(read(&s.files.latency).contains("send ok"));
    assert!(read(&s.files.rate).contains("fault: partition"));

    let html = read(&s.files.timeline);
    assert!(html.starts_with("<!DOCTYPE html>"));
    for p in ["1", "2", "3", "5", "6", "7", "nemesis"] {
        assert!(html.contains(&format!("data-process=\"{p}\"")), "no column for process {p}");
    }
    assert!(html.contains("data-kind=\"partition\""), "no partition band");
    assert!(html.contains("data-kind=\"kill\""), "no kill band");
    assert!(html.contains("final-heal"));
    assert!(html.contains("class=\"op info\"") && html.contains("class=\"op fail\""));
    assert!(html.contains("class=\"op open\""), "the uncompleted sync");
    assert!(html.contains("deadline exceeded &lt;after 1s&gt;"));
    assert!(!html.contains("<script"));

    let windows: Vec<_> = s.fault_windows.iter().map(window).collect();
    assert_eq!(windows, vec![("partition", 0.12, 0.35, true), ("kill", 0.55, 0.57, false)]);
    assert_eq!(s.ops, h.ops.len() as u64);
    assert_eq!(s.timeline_ops, h.ops.len() as u64);
    assert_eq!(s.op_counts["send"]["invoke"], 5);
    assert_eq!(s.op_counts["send"]["ok"], 3);
    assert_eq!(s.op_counts["send"]["info"], 1);
    assert_eq!(s.op_counts["push"]["ok"], 1);
    assert_eq!(s.op_counts["sync"]["invoke"], 3);

    let saved: ReportSummary = serde_json::from_str(&read(&s.files.summary)).expect("report.json parses");
    assert_eq!(saved, s);
    assert_eq!(s.files.summary, dir.path().join("report.json"));
}

#[test]
fn the_timeline_escapes_html() {
    let mut h = History::default();
    let evil = "<script>alert(\"x\")</script>&'";
    h.send(1, 1, 2, evil, 0, 10, OpType::Ok);
    h.nemesis("start-<blink>", json!({"note": "</div><script>"}), 5);
    let dir = tempfile::tempdir().unwrap();
    let s = h.report(dir.path());
    let html = read(&s.files.timeline);
    assert!(!html.contains("<script"), "unescaped script tag");
    assert!(!html.contains("<blink>"));
    assert!(html.contains("&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&amp;&#39;"));
    assert_svg(&s.files.rate);
    assert!(!read(&s.files.rate).contains("<blink>"), "fault kinds are escaped in plots too");
}

#[test]
fn empty_and_nemesis_only_histories_give_empty_reports() {
    let dir = tempfile::tempdir().unwrap();
    let s = History::default().report(&dir.path().join("new-dir"));
    assert_eq!((s.ops, s.timeline_ops, s.delivery_lag.acked), (0, 0, 0));
    assert!(s.fault_windows.is_empty() && s.delivery_lag.lag_ms.is_none());
    for svg in [&s.files.latency, &s.files.rate, &s.files.lag] {
        assert_svg(svg);
    }
    assert!(read(&s.files.timeline).contains("</html>"));

    let mut h = History::default();
    h.nemesis("start-clock", json!({"nodes": [1], "offset_ms": 5000}), 0);
    h.nemesis("recovered", Value::Null, 0);
    let dir = tempfile::tempdir().unwrap();
    let s = h.report(dir.path());
    assert_eq!(s.fault_windows.len(), 1);
    assert_eq!((s.fault_windows[0].start_s, s.fault_windows[0].end_s), (0.0, 0.0));
    assert!(read(&s.files.timeline).contains("data-process=\"nemesis\""));
    assert_svg(&s.files.latency);
}

#[test]
fn big_runs_and_huge_values_stay_bounded() {
    let mut h = History::default();
    let n = MAX_TIMELINE_OPS as u64 / 2 + 2_000;
    h.nemesis("start-partition", json!({"blob": "x".repeat(1 << 20)}), 0);
    let huge: Vec<(String, u64)> = (0..50_000).map(|i| (format!("p-{i}"), 1)).collect();
    let huge: Vec<(&str, u64)> = huge.iter().map(|(s, f)| (s.as_str(), *f)).collect();
    h.sync(99, 2, &huge, 0, 5);
    for i in 0..n {
        h.send(i % 20, 1, 2, &format!("p-{i}"), i, i + 1, if i % 7 == 0 { OpType::Info } else { OpType::Ok });
    }

    let dir = tempfile::tempdir().unwrap();
    let s = h.report(dir.path());
    assert!(s.timeline_ops <= MAX_TIMELINE_OPS as u64 + 1, "{}", s.timeline_ops);
    assert!(s.ops > MAX_TIMELINE_OPS as u64);
    let html = read(&s.files.timeline);
    assert!(html.contains(&format!("first {MAX_TIMELINE_OPS} of {} history lines", s.ops)));
    assert!(html.len() < 12 << 20, "{} bytes", html.len());
    assert!(!html.contains(&"x".repeat(1000)), "the huge value is cut");
    assert_eq!(s.fault_windows.len(), 1);
    assert!(s.delivery_lag.observed > 0);
    for svg in [&s.files.latency, &s.files.rate, &s.files.lag] {
        assert_svg(svg);
    }
}
