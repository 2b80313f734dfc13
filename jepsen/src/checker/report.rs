//! The readable `results.txt`.

use super::{Results, Validity};
use std::fmt::Write;

/// Renders results as text: verdict, anomalies with up to 8 examples each,
/// reasons for Unknown, warnings, and the IM-12 figures.
pub fn render_text(r: &Results) -> String {
    let mut s = String::new();
    let verdict = match r.valid {
        Validity::Valid => "VALID: no anomalies",
        Validity::Invalid => "INVALID: anomalies found",
        Validity::Unknown => "UNKNOWN: no anomalies, but not everything could be checked",
    };
    let _ = writeln!(s, "{verdict}");
    let _ = writeln!(
        s,
        "options: consistency {}, single-shard {}",
        serde_json::to_value(r.options.consistency)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default(),
        r.options.single_shard
    );
    for kind in &r.anomaly_types {
        let g = &r.anomalies[kind];
        let _ = writeln!(s, "\n{kind} ({}): {} found", g.invariant, g.count);
        for (i, a) in g.examples.iter().enumerate() {
            let _ = writeln!(s, "  {}. {}", i + 1, a.text());
        }
        if g.count > g.examples.len() as u64 {
            let _ = writeln!(s, "  ... {} more", g.count - g.examples.len() as u64);
        }
    }
    for (title, lines) in
        [("unknown because", &r.unknown), ("warnings", &r.warnings), ("not checked", &r.not_checked)]
    {
        if !lines.is_empty() {
            let _ = writeln!(s, "\n{title}:");
            for l in lines.iter() {
                let _ = writeln!(s, "  - {l}");
            }
        }
    }
    let st = &r.stats;
    let _ = writeln!(s, "\nliveness (IM-12, not part of the verdict):");
    let _ = writeln!(s, "  ops {} over {:.1} s, {} nemesis events", st.ops, st.duration_s, st.nemesis_events);
    for (name, c) in [
        ("sends", &st.sends),
        ("  of which to groups", &st.group_sends),
        ("syncs", &st.syncs),
        ("final reads", &st.final_reads),
    ] {
        let _ = writeln!(
            s,
            "  {name}: {} invoked, {} ok ({:.1}%), {} fail ({:.1}%), {} info ({:.1}%)",
            c.invoked,
            c.ok,
            100.0 * c.ok_fraction,
            c.fail,
            100.0 * c.fail_fraction,
            c.info,
            100.0 * c.info_fraction
        );
    }
    let f = &st.indeterminate_sends;
    let _ = writeln!(
        s,
        "  acked sends/s {:.1}; indeterminate sends: {} appeared, {} never appeared, {} unknown",
        st.acked_sends_per_s, f.appeared, f.never_appeared, f.unknown
    );
    for (name, p) in [("send latency", &st.send_latency_ms), ("delivery lag", &st.delivery_lag_ms)] {
        if let Some(p) = p {
            let _ = writeln!(
                s,
                "  {name} ms: p50 {:.1}, p90 {:.1}, p99 {:.1}, max {:.1} (n = {})",
                p.p50, p.p90, p.p99, p.max, p.count
            );
        }
    }
    let _ = writeln!(s, "  acked sends never returned by a recipient sync: {}", st.acked_unseen_by_recipient);
    if st.windows.len() > 1 {
        let _ = writeln!(s, "  sends per nemesis window:");
        for w in &st.windows {
            let _ = writeln!(
                s,
                "    {:>8.1}-{:<8.1} s after {:<18} {:>5} invoked, {:>5.1}% ok",
                w.start_s,
                w.end_s,
                w.opened_by,
                w.sends.invoked,
                100.0 * w.sends.ok_fraction
            );
        }
    }
    s
}
