//! Fault windows and nemesis markers, parsed from the nemesis's lines
//! (process `"nemesis"`, any type but `invoke`).
//!
//! * `start-<kind>` (or `<kind>-start`) opens a window of `kind`, keeping
//!   the op's value (e.g. `{"nodes":[2],"shape":"isolate"}`).
//! * `stop-<kind>` (or `<kind>-stop`) closes one open window of `kind`: the
//!   oldest whose value equals the stop's value, else the oldest with the
//!   same `nodes`, else the oldest of that kind. A stop that closes nothing
//!   becomes a marker.
//! * Windows still open at the end close at the history's last time
//!   (`closed = false`).
//! * Every other nemesis line (`final-heal`, `recovered`, ...) is an instant
//!   [`NemesisMarker`].
//!
//! Each fault kind gets one colour, shared by all pictures.

use super::seconds;
use crate::history::{Op, OpBody, OpType};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A time span during which a fault was active.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FaultWindow {
    /// The fault: `partition`, `kill`, `pause`, `clock`, ...
    pub kind: String,
    /// Start, seconds since the test started.
    pub start_s: f64,
    /// End, seconds (≥ `start_s`).
    pub end_s: f64,
    /// The value of the opening op (targets, shape, ...).
    pub value: Value,
    /// Whether a stop op closed it (else it lasted to the history's end).
    pub closed: bool,
    /// History index of the opening op.
    pub start_op: u64,
    /// History index of the closing op.
    pub stop_op: Option<u64>,
}

/// A nemesis event with no duration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NemesisMarker {
    /// The op's `f`.
    pub f: String,
    /// When, seconds since the test started.
    pub time_s: f64,
    /// The op's value.
    pub value: Value,
    /// History index of the op.
    pub op: u64,
}

/// Everything the nemesis did, as windows and markers.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FaultTimeline {
    /// Windows by start time.
    pub windows: Vec<FaultWindow>,
    /// Markers by time.
    pub markers: Vec<NemesisMarker>,
}

impl FaultTimeline {
    /// The distinct kinds of fault, in order of first appearance.
    pub fn kinds(&self) -> Vec<String> {
        let mut kinds: Vec<String> = Vec::new();
        for w in &self.windows {
            if !kinds.contains(&w.kind) {
                kinds.push(w.kind.clone());
            }
        }
        kinds
    }

    /// The colour of a fault kind, as RGB.
    pub(crate) fn colour(&self, kind: &str) -> (u8, u8, u8) {
        match kind {
            "partition" => (66, 133, 244),
            "kill" => (120, 120, 120),
            "pause" => (156, 39, 176),
            "clock" => (230, 180, 0),
            _ => {
                const OTHERS: [(u8, u8, u8); 6] = [
                    (0, 150, 136),
                    (121, 85, 72),
                    (63, 81, 181),
                    (205, 220, 57),
                    (0, 188, 212),
                    (233, 30, 99),
                ];
                let i = self
                    .kinds()
                    .iter()
                    .filter(|k| !matches!(k.as_str(), "partition" | "kill" | "pause" | "clock"))
                    .position(|k| k == kind)
                    .unwrap_or(0);
                OTHERS[i % OTHERS.len()]
            }
        }
    }
}

/// Whether a nemesis `f` opens or closes a window, and of which kind.
fn edge(f: &str) -> Option<(bool, &str)> {
    let (opens, kind) = if let Some(k) = f.strip_prefix("start-") {
        (true, k)
    } else if let Some(k) = f.strip_prefix("stop-") {
        (false, k)
    } else if let Some(k) = f.strip_suffix("-start") {
        (true, k)
    } else if let Some(k) = f.strip_suffix("-stop") {
        (false, k)
    } else {
        return None;
    };
    (!kind.is_empty()).then_some((opens, kind))
}

/// Parses the nemesis lines of a history (see the module docs).
pub fn fault_timeline(ops: &[Op]) -> FaultTimeline {
    let end_ns = ops.iter().map(|o| o.time).max().unwrap_or(0);
    let mut out = FaultTimeline::default();
    // Open windows, oldest first, with their start time in ns.
    let mut open: Vec<(u64, FaultWindow)> = Vec::new();
    for op in ops.iter().filter(|o| o.process.is_nemesis() && o.op_type != OpType::Invoke) {
        let (f, value) = match &op.body {
            OpBody::Other { f, value } => (f.as_str(), value),
            _ => continue,
        };
        match edge(f) {
            Some((true, kind)) => open.push((
                op.time,
                FaultWindow {
                    kind: kind.to_string(),
                    start_s: seconds(op.time),
                    end_s: seconds(op.time),
                    value: value.clone(),
                    closed: false,
                    start_op: op.index,
                    stop_op: None,
                },
            )),
            Some((false, kind)) => match closing(&open, kind, value) {
                Some(i) => {
                    let (start, mut w) = open.remove(i);
                    w.end_s = seconds(op.time.max(start));
                    w.closed = true;
                    w.stop_op = Some(op.index);
                    out.windows.push(w);
                }
                None => out.markers.push(marker(op, f, value)),
            },
            None => out.markers.push(marker(op, f, value)),
        }
    }
    for (start, mut w) in open {
        w.end_s = seconds(end_ns.max(start));
        out.windows.push(w);
    }
    out.windows.sort_by(|a, b| a.start_s.total_cmp(&b.start_s).then(a.start_op.cmp(&b.start_op)));
    out.markers.sort_by(|a, b| a.time_s.total_cmp(&b.time_s).then(a.op.cmp(&b.op)));
    out
}

/// Which open window a stop of `kind` with `value` closes.
fn closing(open: &[(u64, FaultWindow)], kind: &str, value: &Value) -> Option<usize> {
    let of_kind = || open.iter().enumerate().filter(|(_, (_, w))| w.kind == kind);
    let same_value = || of_kind().find(|(_, (_, w))| !value.is_null() && w.value == *value);
    let same_nodes = || {
        let nodes = value.get("nodes")?;
        of_kind().find(|(_, (_, w))| w.value.get("nodes") == Some(nodes))
    };
    same_value().or_else(same_nodes).or_else(|| of_kind().next()).map(|(i, _)| i)
}

fn marker(op: &Op, f: &str, value: &Value) -> NemesisMarker {
    NemesisMarker { f: f.to_string(), time_s: seconds(op.time), value: value.clone(), op: op.index }
}
