//! Run reports: the pictures and figures a person looks at after a run
//! (reference/jepsen.md §6.2 item 7), written next to `history.jsonl` by
//! [`write_report`].
//!
//! | file | shows | module |
//! |---|---|---|
//! | `timeline.html` | one column per process, every operation a box from invoke to completion, coloured by outcome; fault windows as bands, other nemesis events as lines; ops named in anomaly examples outlined in red | `timeline` |
//! | `latency.svg` | invoke-to-completion latency of sends and syncs over time, by outcome, with per-bucket p50 / p99 of ok sends | `plots` |
//! | `rate.svg` | completed operations per second, by `f` and outcome | `plots` |
//! | `lag.svg` | delivery lag (ack to the recipient's first observation) over time, and the count of acked messages not yet observed ("unseen") | `plots`, `lag` |
//! | `report.json` | [`ReportSummary`]: lag percentiles, op counts, fault windows, files | this module |
//!
//! Every figure shades the fault windows parsed by [`fault_timeline`] (one
//! colour per fault kind). Times are seconds since the test started (the
//! history's `time` is nanoseconds since then). Reports never fail on odd
//! histories: an empty history, one with only nemesis events, unpaired
//! invocations or huge values all give (mostly empty) pictures.

mod calls;
mod lag;
mod plots;
mod timeline;
mod windows;

pub use lag::{DeliveryLag, DeliveryLagSummary, ObservedBy, delivery_lags, unseen_over_time};
pub use timeline::MAX_TIMELINE_OPS;
pub use windows::{FaultTimeline, FaultWindow, NemesisMarker, fault_timeline};

use crate::checker::Results;
use crate::history::Op;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};

/// File name of the timeline.
pub const TIMELINE_FILE: &str = "timeline.html";
/// File name of the latency plot.
pub const LATENCY_FILE: &str = "latency.svg";
/// File name of the throughput plot.
pub const RATE_FILE: &str = "rate.svg";
/// File name of the delivery-lag plot.
pub const LAG_FILE: &str = "lag.svg";
/// File name of the summary.
pub const SUMMARY_FILE: &str = "report.json";

/// The files a report wrote.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReportFiles {
    /// `timeline.html`.
    pub timeline: PathBuf,
    /// `latency.svg`.
    pub latency: PathBuf,
    /// `rate.svg`.
    pub rate: PathBuf,
    /// `lag.svg`.
    pub lag: PathBuf,
    /// `report.json`.
    pub summary: PathBuf,
}

/// What a report found, also written as `report.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReportSummary {
    /// Lines in the history.
    pub ops: u64,
    /// The history's last time, seconds since the test started.
    pub duration_s: f64,
    /// History lines the timeline shows: the calls starting in the first
    /// [`MAX_TIMELINE_OPS`] lines, with their completions.
    pub timeline_ops: u64,
    /// History lines by `f`, then by type (`invoke`, `ok`, `fail`, `info`).
    pub op_counts: BTreeMap<String, BTreeMap<String, u64>>,
    /// Ack to first observation by the recipient.
    pub delivery_lag: DeliveryLagSummary,
    /// Fault windows, by start time.
    pub fault_windows: Vec<FaultWindow>,
    /// Nemesis events that open or close no window (`final-heal`, ...).
    pub nemesis_markers: Vec<NemesisMarker>,
    /// The verdict of the checker results the report was made with.
    pub valid: crate::checker::Validity,
    /// The files written.
    pub files: ReportFiles,
}

/// Writes `timeline.html`, `latency.svg`, `rate.svg`, `lag.svg` and
/// `report.json` into `dir` (created if missing) and returns the summary.
///
/// `results` are the checker's results for `ops`: the verdict goes into the
/// summary and the timeline, and ops named in anomaly examples are outlined.
/// Only I/O errors fail it.
pub fn write_report(dir: &Path, ops: &[Op], results: &Results) -> io::Result<ReportSummary> {
    std::fs::create_dir_all(dir)?;
    let end_ns = ops.iter().map(|o| o.time).max().unwrap_or(0);
    let faults = fault_timeline(ops);
    let calls = calls::pair(ops, end_ns);
    let lags = delivery_lags(ops);
    let unseen = unseen_over_time(&lags, end_ns);
    let files = ReportFiles {
        timeline: dir.join(TIMELINE_FILE),
        latency: dir.join(LATENCY_FILE),
        rate: dir.join(RATE_FILE),
        lag: dir.join(LAG_FILE),
        summary: dir.join(SUMMARY_FILE),
    };

    let page = timeline::render(ops, &calls, &faults, results, end_ns);
    std::fs::write(&files.timeline, page.html)?;
    let frame = plots::Frame { faults: &faults, end_s: seconds(end_ns) };
    std::fs::write(&files.latency, plots::latency(&frame, &calls)?)?;
    std::fs::write(&files.rate, plots::rate(&frame, &calls)?)?;
    std::fs::write(&files.lag, plots::lag(&frame, &lags, &unseen)?)?;

    let summary = ReportSummary {
        ops: ops.len() as u64,
        duration_s: seconds(end_ns),
        timeline_ops: page.rendered_ops,
        op_counts: op_counts(ops),
        delivery_lag: DeliveryLagSummary::of(&lags),
        fault_windows: faults.windows.clone(),
        nemesis_markers: faults.markers.clone(),
        valid: results.valid,
        files,
    };
    let json = serde_json::to_string_pretty(&summary).map_err(io::Error::other)?;
    std::fs::write(&summary.files.summary, json + "\n")?;
    Ok(summary)
}

/// History lines by `f` and type.
fn op_counts(ops: &[Op]) -> BTreeMap<String, BTreeMap<String, u64>> {
    let mut counts: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
    for op in ops {
        *counts
            .entry(op.f().to_string())
            .or_default()
            .entry(type_name(op.op_type).to_string())
            .or_default() += 1;
    }
    counts
}

/// The history name of an op type.
pub(crate) fn type_name(t: crate::history::OpType) -> &'static str {
    use crate::history::OpType;
    match t {
        OpType::Invoke => "invoke",
        OpType::Ok => "ok",
        OpType::Fail => "fail",
        OpType::Info => "info",
    }
}

/// Nanoseconds to seconds.
pub(crate) fn seconds(ns: u64) -> f64 {
    ns as f64 / 1e9
}

/// Nanoseconds to milliseconds.
pub(crate) fn millis(ns: u64) -> f64 {
    ns as f64 / 1e6
}

/// At most `max` characters of `s`, with `…` when cut.
pub(crate) fn truncate(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((cut, _)) => format!("{}…", &s[..cut]),
        None => s.to_string(),
    }
}
