//! `rim-jepsen check DIR`: exit codes and the files written.

mod common;

use common::H;
use rim_jepsen::history::HistoryWriter;
use std::io::Write;
use std::process::Command;

fn write_history(dir: &std::path::Path, h: &H) {
    let mut w = HistoryWriter::create(dir.join("history.jsonl")).unwrap();
    for op in &h.ops {
        w.append_as_is(op).unwrap();
    }
}

fn run_check(dir: &std::path::Path, extra: &[&str]) -> (i32, String) {
    let out =
        Command::new(env!("CARGO_BIN_EXE_rim-jepsen")).arg("check").arg(dir).args(extra).output().unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn check_exit_codes_and_files() {
    // Valid.
    let dir = tempfile::tempdir().unwrap();
    let mut h = H::new();
    h.ok_send(1, 2, "a", 1);
    h.finals(1, &["a"]);
    h.finals(2, &["a"]);
    write_history(dir.path(), &h);
    let (code, stdout) = run_check(dir.path(), &[]);
    assert_eq!(code, 0, "{stdout}");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("results.json")).unwrap()).unwrap();
    assert_eq!(json["valid"], serde_json::json!(true));
    assert!(std::fs::read_to_string(dir.path().join("results.txt")).unwrap().starts_with("VALID"));

    // A crash mid-line: the truncated tail is tolerated with a warning.
    let mut f = std::fs::OpenOptions::new().append(true).open(dir.path().join("history.jsonl")).unwrap();
    f.write_all(br#"{"index":99,"time":5,"type":"inv"#).unwrap();
    drop(f);
    let (code, _) = run_check(dir.path(), &["--quiet"]);
    assert_eq!(code, 0);
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("results.json")).unwrap()).unwrap();
    assert!(json["warnings"][0].as_str().unwrap().contains("truncated"), "{json}");

    // Anomalies: the acked message is missing from u2's final reads.
    let dir = tempfile::tempdir().unwrap();
    let mut h = H::new();
    h.ok_send(1, 2, "a", 1);
    h.finals(1, &["a"]);
    h.finals(2, &[]);
    write_history(dir.path(), &h);
    let (code, stdout) = run_check(dir.path(), &[]);
    assert_eq!(code, 1, "{stdout}");
    assert!(stdout.contains("lost-ack (IM-6)"), "{stdout}");
    let txt = std::fs::read_to_string(dir.path().join("results.txt")).unwrap();
    assert!(txt.contains("msg a"), "{txt}");

    // Unknown: no final reads.
    let dir = tempfile::tempdir().unwrap();
    let mut h = H::new();
    h.ok_send(1, 2, "a", 1);
    write_history(dir.path(), &h);
    assert_eq!(run_check(dir.path(), &["--consistency", "session"]).0, 2);

    // No history at all.
    let dir = tempfile::tempdir().unwrap();
    assert_eq!(run_check(dir.path(), &[]).0, 2);
}
