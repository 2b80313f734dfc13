//! `timeline.html`, after `jepsen.checker.timeline`: a self-contained page
//! (inline CSS, no scripts) with one column per process, the nemesis first,
//! and time running down.
//!
//! * Each call is a box from its invocation to its completion, coloured by
//!   outcome: ok green, fail pink, info orange; an invocation never
//!   completed is a dashed box to the history's end. Lines without an
//!   invocation (pushes, nemesis events) are small boxes in the right half
//!   of their column.
//! * Hovering a box shows its `f`, a value summary, node, error, times and
//!   history indices. Boxes of ops named in the checker's anomaly examples
//!   are outlined in red, with the anomaly kinds in the tooltip.
//! * Fault windows are translucent bands across all columns, one colour per
//!   kind; other nemesis events are dashed lines with a label.
//! * Only calls starting in the first [`MAX_TIMELINE_OPS`] history lines are
//!   drawn, so big runs stay openable; the page says so when it cuts.

use super::calls::Call;
use super::windows::FaultTimeline;
use super::{millis, seconds, truncate};
use crate::checker::{Results, Validity};
use crate::history::{Op, OpBody, Process};
use std::collections::HashMap;
use std::fmt::Write;

/// The timeline draws calls starting in the first this many history lines.
pub const MAX_TIMELINE_OPS: usize = 20_000;

const GUTTER: f64 = 70.0;
const MIN_BOX: f64 = 3.0;
const MIN_INSTANT_BOX: f64 = 6.0;
const MAX_TABLE_ROWS: usize = 200;

/// A rendered page.
pub(crate) struct Page {
    /// The HTML.
    pub(crate) html: String,
    /// History lines drawn.
    pub(crate) rendered_ops: u64,
}

const CSS: &str = "body{font:12px sans-serif;margin:8px;color:#222}\
h1{font-size:18px;margin:4px 0}\
table{border-collapse:collapse;margin:6px 0}td,th{border:1px solid #ccc;padding:1px 6px;text-align:left}\
.legend span{display:inline-block;padding:1px 8px;margin-right:6px;border:1px solid rgba(0,0,0,.3)}\
.tl{position:relative;margin-top:8px}\
.heads{position:sticky;top:0;height:22px;background:#fff;z-index:5;border-bottom:1px solid #999}\
.head{position:absolute;top:3px;text-align:center;font-weight:bold;overflow:hidden;white-space:nowrap}\
.body{position:relative}\
.col{position:absolute;top:0;z-index:0}.col.odd{background:#f7f7f7}\
.tick{position:absolute;left:0;border-top:1px solid #e4e4e4;font-size:10px;color:#777;z-index:0}\
.band{position:absolute;left:0;z-index:1;font-size:10px;overflow:hidden}\
.band span{position:absolute;left:72px;top:1px}\
.marker{position:absolute;left:0;border-top:2px dashed #333;z-index:3;font-size:10px}\
.marker span{position:absolute;left:72px;top:-7px;background:#fff;padding:0 3px}\
.op{position:absolute;box-sizing:border-box;overflow:hidden;white-space:nowrap;font-size:10px;\
line-height:11px;padding:0 2px;border:1px solid rgba(0,0,0,.3);border-radius:2px;z-index:2}\
.ok{background:#8fd17d}.fail{background:#f6a7c1}.info{background:#ffb74d}\
.open{background:#ffe0b2;border-style:dashed}\
.flagged{outline:2px solid #d00;z-index:4}";

/// Renders the page.
pub(crate) fn render(
    ops: &[Op],
    calls: &[Call<'_>],
    faults: &FaultTimeline,
    results: &Results,
    end_ns: u64,
) -> Page {
    let shown: Vec<&Call<'_>> = calls.iter().filter(|c| c.position < MAX_TIMELINE_OPS).collect();
    let cut = ops.len() > MAX_TIMELINE_OPS;
    let rendered_ops: u64 = shown.iter().map(|c| c.indices().count() as u64).sum();
    let t_max = if cut { shown.iter().map(|c| c.end).max().unwrap_or(0) } else { end_ns };

    let mut processes: Vec<&Process> = shown.iter().map(|c| c.process()).collect();
    processes.sort_by_key(|p| (!p.is_nemesis(), *p));
    processes.dedup();
    let column: HashMap<&Process, usize> = processes.iter().enumerate().map(|(i, p)| (*p, i)).collect();
    let col_w = if processes.len() > 100 { 64.0 } else { 120.0 };
    let width = GUTTER + col_w * processes.len().max(1) as f64;

    let duration_ms = millis(t_max).max(1.0);
    let budget = (shown.len() as f64 * 10.0).clamp(800.0, 150_000.0);
    let px_per_ms = (budget / duration_ms).clamp(0.002, 20.0);
    let y = |ns: u64| millis(ns) * px_per_ms;
    let height = y(t_max) + 30.0;

    let mut h = String::with_capacity(4096 + shown.len() * 320);
    h.push_str("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>rim jepsen timeline</title>");
    let _ = write!(h, "<style>{CSS}</style></head><body>\n<h1>Timeline</h1>\n");
    header(&mut h, ops.len(), rendered_ops, cut, faults, results);

    let _ = write!(
        h,
        "<div class=\"tl\" style=\"width:{width:.0}px\">\n<div class=\"heads\" style=\"width:{width:.0}px\">"
    );
    for (i, p) in processes.iter().enumerate() {
        let name = if p.is_nemesis() { p.to_string() } else { format!("process {p}") };
        let _ = write!(
            h,
            "<div class=\"head\" style=\"left:{:.0}px;width:{:.0}px\">{}</div>",
            GUTTER + col_w * i as f64,
            col_w,
            esc(&name)
        );
    }
    let _ = writeln!(h, "</div>\n<div class=\"body\" style=\"height:{height:.0}px\">");
    for (i, p) in processes.iter().enumerate() {
        let _ = writeln!(
            h,
            "<div class=\"col{}\" data-process=\"{}\" style=\"left:{:.0}px;width:{:.0}px;height:{height:.0}px\"></div>",
            if i % 2 == 1 { " odd" } else { "" },
            esc(&p.to_string()),
            GUTTER + col_w * i as f64,
            col_w
        );
    }
    ticks(&mut h, t_max, px_per_ms, width);

    let t_max_s = seconds(t_max);
    for w in faults.windows.iter().filter(|w| w.start_s <= t_max_s) {
        let (r, g, b) = faults.colour(&w.kind);
        let top = w.start_s * 1e3 * px_per_ms;
        let bottom = w.end_s.min(t_max_s) * 1e3 * px_per_ms;
        let title = format!(
            "{} {:.3} s → {:.3} s{}\n{}",
            w.kind,
            w.start_s,
            w.end_s,
            if w.closed { "" } else { " (never stopped)" },
            truncate(&w.value.to_string(), 300)
        );
        let _ = writeln!(
            h,
            "<div class=\"band\" data-kind=\"{k}\" style=\"top:{top:.1}px;height:{:.1}px;width:{width:.0}px;\
             background:rgba({r},{g},{b},0.16);border-top:1px solid rgb({r},{g},{b})\" title=\"{}\"><span>{k}</span></div>",
            (bottom - top).max(2.0),
            esc(&title),
            k = esc(&w.kind),
        );
    }
    for m in faults.markers.iter().filter(|m| m.time_s <= t_max_s) {
        let title =
            format!("{} at {:.3} s (op {})\n{}", m.f, m.time_s, m.op, truncate(&m.value.to_string(), 300));
        let _ = writeln!(
            h,
            "<div class=\"marker\" style=\"top:{:.1}px;width:{width:.0}px\" title=\"{}\"><span>{}</span></div>",
            m.time_s * 1e3 * px_per_ms,
            esc(&title),
            esc(&m.f)
        );
    }

    let flagged = flagged_ops(results);
    for c in &shown {
        let Some(&col) = column.get(c.process()) else { continue };
        let kinds: Vec<&str> = {
            let mut k: Vec<&str> =
                c.indices().flat_map(|i| flagged.get(&i).into_iter().flatten()).copied().collect();
            k.sort_unstable();
            k.dedup();
            k
        };
        let instant = c.invoke.is_none();
        let left = GUTTER + col_w * col as f64 + if instant { col_w / 2.0 } else { 3.0 };
        let box_w = if instant { col_w / 2.0 - 3.0 } else { col_w - 6.0 };
        let top = y(c.start);
        let min_h = if instant { MIN_INSTANT_BOX } else { MIN_BOX };
        let box_h = (y(c.end.min(t_max.max(c.start))) - top).max(min_h);
        let _ = writeln!(
            h,
            "<div class=\"op {}{}\" style=\"left:{left:.0}px;top:{top:.1}px;width:{box_w:.0}px;height:{box_h:.1}px\" \
             title=\"{}\">{}</div>",
            c.outcome.name(),
            if kinds.is_empty() { "" } else { " flagged" },
            esc(&tooltip(c, &kinds)),
            esc(&truncate(&label(c.op), 28))
        );
    }
    h.push_str("</div>\n</div>\n</body></html>\n");
    Page { html: h, rendered_ops }
}

/// Verdict, counts, legend and the fault table.
fn header(h: &mut String, total: usize, rendered: u64, cut: bool, faults: &FaultTimeline, results: &Results) {
    let verdict = match results.valid {
        Validity::Valid => "valid",
        Validity::Invalid => "INVALID",
        Validity::Unknown => "unknown",
    };
    let _ = write!(h, "<p>Verdict: <b>{verdict}</b>");
    if !results.anomaly_types.is_empty() {
        let _ = write!(h, "; anomalies: {}", esc(&results.anomaly_types.join(", ")));
    }
    let _ = writeln!(h, ". {total} history lines; {rendered} drawn.</p>");
    if cut {
        let _ = writeln!(
            h,
            "<p><b>Only the calls starting in the first {MAX_TIMELINE_OPS} of {total} history lines are shown.</b></p>"
        );
    }
    h.push_str("<p class=\"legend\"><span class=\"ok\">ok</span><span class=\"fail\">fail</span>");
    h.push_str("<span class=\"info\">info</span><span class=\"open\">never completed</span>");
    h.push_str("<span class=\"flagged\">in an anomaly</span>");
    for kind in faults.kinds() {
        let (r, g, b) = faults.colour(&kind);
        let _ = write!(h, "<span style=\"background:rgba({r},{g},{b},0.3)\">fault: {}</span>", esc(&kind));
    }
    h.push_str("</p>\n");
    if faults.windows.is_empty() {
        return;
    }
    h.push_str("<table><tr><th>fault</th><th>start s</th><th>end s</th><th>value</th></tr>\n");
    for w in faults.windows.iter().take(MAX_TABLE_ROWS) {
        let _ = writeln!(
            h,
            "<tr><td>{}</td><td>{:.3}</td><td>{:.3}{}</td><td>{}</td></tr>",
            esc(&w.kind),
            w.start_s,
            w.end_s,
            if w.closed { "" } else { " (end of history)" },
            esc(&truncate(&w.value.to_string(), 120))
        );
    }
    if faults.windows.len() > MAX_TABLE_ROWS {
        let _ =
            writeln!(h, "<tr><td colspan=\"4\">… {} more</td></tr>", faults.windows.len() - MAX_TABLE_ROWS);
    }
    h.push_str("</table>\n");
}

/// Horizontal time ticks every "nice" step of at least 80 px.
fn ticks(h: &mut String, t_max: u64, px_per_ms: f64, width: f64) {
    const STEPS_S: [f64; 19] = [
        0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0,
        300.0, 600.0,
    ];
    let step = STEPS_S.iter().copied().find(|s| s * 1e3 * px_per_ms >= 80.0).unwrap_or(1800.0);
    let end_s = seconds(t_max);
    let mut i = 0u64;
    while (i as f64) * step <= end_s && i <= 100_000 {
        let t = i as f64 * step;
        let _ = writeln!(
            h,
            "<div class=\"tick\" style=\"top:{:.1}px;width:{width:.0}px\">{}</div>",
            t * 1e3 * px_per_ms,
            format_s(t, step)
        );
        i += 1;
    }
}

fn format_s(t: f64, step: f64) -> String {
    if step < 0.01 {
        format!("{t:.3} s")
    } else if step < 1.0 {
        format!("{t:.2} s")
    } else {
        format!("{t:.0} s")
    }
}

/// History index → anomaly kinds whose examples name it.
fn flagged_ops(results: &Results) -> HashMap<u64, Vec<&str>> {
    let mut out: HashMap<u64, Vec<&str>> = HashMap::new();
    for (kind, group) in &results.anomalies {
        for a in &group.examples {
            for &i in &a.ops {
                out.entry(i).or_default().push(kind.as_str());
            }
        }
    }
    out
}

/// `u3`, or `g77` for a group's list.
fn list(user: u64, group: Option<u64>) -> String {
    group.map_or_else(|| format!("u{user}"), |g| format!("g{g}"))
}

/// The short text inside a box.
fn label(op: &Op) -> String {
    match &op.body {
        OpBody::Send(v) => format!("send {}", v.client_msg_id),
        OpBody::Sync(v) => match &v.entries {
            Some(e) => format!("sync {}>{} +{}", list(v.user, v.group), v.after, e.len()),
            None => format!("sync {}>{}", list(v.user, v.group), v.after),
        },
        OpBody::FinalRead(v) => format!("final {}", list(v.user, v.group)),
        OpBody::CreateGroup(v) => match v.kind {
            crate::history::ConvKind::Super => "create super group".to_string(),
            _ => "create small group".to_string(),
        },
        OpBody::Other { f, .. } => f.clone(),
    }
}

/// The hover text of a call.
fn tooltip(c: &Call<'_>, anomalies: &[&str]) -> String {
    let op = c.op;
    let mut t = format!("process {} {} {}\n{}", op.process, op.f(), c.outcome.name(), value_summary(op));
    if let Some(node) = &op.node {
        let _ = write!(t, "\nnode {}", truncate(node, 100));
    }
    if let Some(error) = &op.error {
        let _ = write!(t, "\nerror: {}", truncate(error, 300));
    }
    match (c.invoke, c.completion) {
        (Some(i), Some(done)) => {
            let _ = write!(
                t,
                "\ninvoke {:.3} s → {} {:.3} s ({:.1} ms)",
                seconds(i.time),
                c.outcome.name(),
                seconds(done.time),
                millis(done.time.saturating_sub(i.time))
            );
        }
        (Some(i), None) => {
            let _ = write!(t, "\ninvoke {:.3} s, never completed", seconds(i.time));
        }
        (None, _) => {
            let _ = write!(t, "\nat {:.3} s", seconds(op.time));
        }
    }
    let indices: Vec<String> = c.indices().map(|i| i.to_string()).collect();
    let _ = write!(t, "\nops {}", indices.join(", "));
    if !anomalies.is_empty() {
        let _ = write!(t, "\nANOMALY: {}", anomalies.join(", "));
    }
    t
}

/// A bounded, readable summary of an op's value.
fn value_summary(op: &Op) -> String {
    match &op.body {
        OpBody::Send(v) => {
            let to = if v.kind.is_group() { format!("g{}", v.to) } else { format!("u{}", v.to) };
            let mut s = format!("{} from u{} (device {}) to {to}", v.client_msg_id, v.from, v.device);
            if let Some(seq) = v.seq {
                let _ = write!(s, ", seq {seq}");
            }
            if let Some(seq) = v.group_seq {
                let _ = write!(s, ", group seq {seq}");
            }
            if let Some(id) = v.message_id {
                let _ = write!(s, ", message {id}");
            }
            truncate(&s, 300)
        }
        OpBody::Sync(v) => {
            let mut s =
                format!("{} device {} of u{} after {}", list(v.user, v.group), v.device, v.user, v.after);
            if let Some(limit) = v.limit {
                let _ = write!(s, " limit {limit}");
            }
            if let Some(e) = &v.entries {
                s.push_str(&entries(e.iter().map(|e| (Some(e.seq), e.client_msg_id.as_str())), e.len()));
            }
            if let Some(more) = v.has_more {
                let _ = write!(s, "; has_more {more}");
            }
            if let Some(last) = v.last_seq {
                let _ = write!(s, "; last_seq {last}");
            }
            s
        }
        OpBody::CreateGroup(v) => {
            let mut s = format!("{:?} group of u{} with {:?}", v.kind, v.owner, v.members);
            if let Some(g) = v.group {
                let _ = write!(s, ": g{g}");
            }
            s
        }
        OpBody::FinalRead(v) => {
            let mut s = list(v.user, v.group);
            if let Some(e) = &v.entries {
                s.push_str(&entries(e.iter().map(|e| (Some(e.seq), e.client_msg_id.as_str())), e.len()));
            }
            if let Some(last) = v.last_seq {
                let _ = write!(s, "; last_seq {last}");
            }
            s
        }
        OpBody::Other { value, .. } => match value.get("entries").and_then(|e| e.as_array()) {
            Some(list) => {
                let mut head = serde_json::Map::new();
                if let Some(o) = value.as_object() {
                    for (k, v) in o.iter().filter(|(k, _)| *k != "entries") {
                        head.insert(k.clone(), v.clone());
                    }
                }
                let ids = list.iter().map(|e| {
                    (
                        e.get("seq").and_then(|s| s.as_u64()),
                        e.get("client_msg_id").and_then(|i| i.as_str()).unwrap_or("?"),
                    )
                });
                format!(
                    "{}{}",
                    truncate(&serde_json::Value::Object(head).to_string(), 200),
                    entries(ids, list.len())
                )
            }
            None => truncate(&value.to_string(), 300),
        },
    }
}

/// `; 3 entries: 39:p2-12, 40:p7-31, …` with at most 8 listed.
fn entries<'a>(items: impl Iterator<Item = (Option<u64>, &'a str)>, len: usize) -> String {
    const LISTED: usize = 8;
    let listed: Vec<String> = items
        .take(LISTED)
        .map(|(seq, id)| match seq {
            Some(seq) => format!("{seq}:{}", truncate(id, 40)),
            None => truncate(id, 40),
        })
        .collect();
    let more = if len > LISTED { format!(", … {} more", len - LISTED) } else { String::new() };
    format!("; {len} entries: {}{more}", listed.join(", "))
}

/// Escapes text for HTML content and quoted attributes.
pub(crate) fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for ch in s.chars() {
        match ch {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}
