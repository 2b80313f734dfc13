//! The SVG plots, drawn with `plotters` (x: seconds since the test started;
//! fault windows shaded with one colour per kind, other nemesis events as
//! thin vertical lines):
//!
//! * `latency.svg`: one point per completed send and sync at its invocation
//!   time, y = invoke-to-completion latency in ms (log scale), coloured by
//!   outcome (circles: sends, triangles: syncs), plus p50 / p99 lines of ok
//!   sends per time bucket. Above [`MAX_POINTS`] points every k-th is drawn.
//! * `rate.svg`: completions per second per time bucket, one line per `f`
//!   and outcome (ok / info / fail sends, syncs, pushes, final reads).
//! * `lag.svg`: top, the delivery lag of each acked message at its ack time
//!   (coloured by how it was first observed; never-observed messages as red
//!   crosses at the top edge); bottom, the count of acked messages not yet
//!   observed by their recipient.
//!
//! Time buckets are 1 s wide, wider for runs over 2000 s and narrower for
//! runs under 20 s (rates stay per second).

use super::calls::{Call, Outcome};
use super::lag::{DeliveryLag, ObservedBy};
use super::windows::FaultTimeline;
use super::{millis, seconds};
use crate::history::{F_FINAL_READ, F_PUSH, F_SEND, F_SYNC};
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;
use std::collections::BTreeMap;
use std::io;

/// Points drawn per plot at most.
pub(crate) const MAX_POINTS: usize = 40_000;

const SIZE: (u32, u32) = (1200, 520);
const LAG_SIZE: (u32, u32) = (1200, 720);

/// What every plot shares: the faults and the time axis.
pub(crate) struct Frame<'a> {
    /// Fault windows and markers.
    pub(crate) faults: &'a FaultTimeline,
    /// The history's last time, s.
    pub(crate) end_s: f64,
}

impl Frame<'_> {
    fn x_range(&self) -> std::ops::Range<f64> {
        let end = if self.end_s.is_finite() { self.end_s.max(0.001) } else { 1.0 };
        0.0..end * 1.02
    }

    /// 1 s for runs of 20 s to 2000 s, wider above, narrower below.
    fn bucket_s(&self) -> f64 {
        if self.end_s < 2.0 {
            0.01
        } else if self.end_s < 20.0 {
            0.1
        } else {
            (self.end_s / 2000.0).ceil().max(1.0)
        }
    }
}

fn io_err(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(format!("drawing a plot: {e}"))
}

/// Colour of a (f, outcome) series.
fn series_colour(f: &str, outcome: Outcome) -> RGBColor {
    match (f, outcome) {
        (F_SEND, Outcome::Ok) => RGBColor(46, 160, 44),
        (F_SEND, Outcome::Info) => RGBColor(255, 140, 0),
        (F_SEND, _) => RGBColor(220, 40, 120),
        (F_SYNC, Outcome::Ok) => RGBColor(31, 100, 200),
        (F_SYNC, Outcome::Info) => RGBColor(200, 120, 40),
        (F_SYNC, _) => RGBColor(170, 60, 160),
        (F_PUSH, _) => RGBColor(120, 60, 200),
        (F_FINAL_READ, _) => RGBColor(90, 90, 90),
        _ => RGBColor(0, 170, 170),
    }
}

/// Shades fault windows and draws nemesis markers over the y span `y`.
fn shade<DB, Y>(
    chart: &mut ChartContext<'_, DB, Cartesian2d<RangedCoordf64, Y>>,
    faults: &FaultTimeline,
    y: (f64, f64),
    legend: bool,
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>>
where
    DB: DrawingBackend,
    Y: Ranged<ValueType = f64>,
{
    for kind in faults.kinds() {
        let (r, g, b) = faults.colour(&kind);
        let colour = RGBColor(r, g, b);
        let bands = faults.windows.iter().filter(|w| w.kind == kind).map(move |w| {
            Rectangle::new([(w.start_s, y.0), (w.end_s.max(w.start_s), y.1)], colour.mix(0.15).filled())
        });
        let drawn = chart.draw_series(bands)?;
        if legend {
            drawn.label(format!("fault: {kind}")).legend(move |(x, y)| {
                Rectangle::new([(x, y - 5), (x + 14, y + 5)], colour.mix(0.4).filled())
            });
        }
    }
    let marks = faults
        .markers
        .iter()
        .map(|m| PathElement::new(vec![(m.time_s, y.0), (m.time_s, y.1)], BLACK.mix(0.4)));
    chart.draw_series(marks)?;
    let labels = faults.markers.iter().map(|m| Text::new(m.f.clone(), (m.time_s, y.1), ("sans-serif", 11)));
    chart.draw_series(labels)?;
    Ok(())
}

/// Every `stride`-th item so that at most [`MAX_POINTS`] of `total` remain.
fn stride(total: usize) -> usize {
    total.div_ceil(MAX_POINTS).max(1)
}

/// `latency.svg`.
pub(crate) fn latency(frame: &Frame<'_>, calls: &[Call<'_>]) -> io::Result<String> {
    let mut points: BTreeMap<(&str, Outcome), Vec<(f64, f64)>> = BTreeMap::new();
    for c in calls.iter().filter(|c| !c.process().is_nemesis()) {
        let f = c.f();
        if f != F_SEND && f != F_SYNC {
            continue;
        }
        if let Some(lat) = c.latency() {
            points.entry((f, c.outcome)).or_default().push((seconds(c.start), millis(lat)));
        }
    }
    let all = || points.values().flatten().map(|p| p.1);
    let lo = all().filter(|&v| v > 0.0).fold(f64::INFINITY, f64::min);
    let lo = if lo.is_finite() { (lo / 2.0).max(0.001) } else { 0.1 };
    let hi = all().fold(lo * 10.0, f64::max) * 2.0;
    let total: usize = points.values().map(Vec::len).sum();
    let step = stride(total);

    let bucket = frame.bucket_s();
    let mut buckets: BTreeMap<u64, Vec<f64>> = BTreeMap::new();
    for &(t, l) in points.get(&(F_SEND, Outcome::Ok)).into_iter().flatten() {
        buckets.entry((t / bucket) as u64).or_default().push(l);
    }
    let quantile = |q: f64| -> Vec<(f64, f64)> {
        buckets
            .iter()
            .map(|(b, v)| {
                let mut v = v.clone();
                v.sort_by(f64::total_cmp);
                let i = ((v.len() as f64 - 1.0) * q).round() as usize;
                ((*b as f64 + 0.5) * bucket, v.get(i).copied().unwrap_or(lo).max(lo))
            })
            .collect()
    };

    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(io_err)?;
        let caption = if step > 1 {
            format!("latency of sends and syncs (every {step}th of {total} points)")
        } else {
            format!("latency of sends and syncs ({total} points)")
        };
        let mut chart = ChartBuilder::on(&root)
            .caption(caption, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(64)
            .build_cartesian_2d(frame.x_range(), (lo..hi).log_scale())
            .map_err(io_err)?;
        chart.configure_mesh().x_desc("time (s)").y_desc("latency (ms)").draw().map_err(io_err)?;
        shade(&mut chart, frame.faults, (lo, hi), true).map_err(io_err)?;
        for (&(f, outcome), pts) in &points {
            let colour = series_colour(f, outcome);
            let style = colour.mix(0.6).filled();
            let drawn = pts.iter().step_by(step).map(|&(x, y)| (x, y.max(lo)));
            let anno = if f == F_SEND {
                chart.draw_series(drawn.map(|p| Circle::new(p, 2, style))).map_err(io_err)?
            } else {
                chart.draw_series(drawn.map(|p| TriangleMarker::new(p, 3, style))).map_err(io_err)?
            };
            anno.label(format!("{f} {}", outcome.name()))
                .legend(move |(x, y)| Circle::new((x + 7, y), 4, colour.filled()));
        }
        for (q, name, colour) in
            [(0.5, "p50 ok sends", RGBColor(0, 90, 0)), (0.99, "p99 ok sends", RGBColor(160, 0, 0))]
        {
            chart
                .draw_series(LineSeries::new(quantile(q), colour.stroke_width(2)))
                .map_err(io_err)?
                .label(name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 14, y)], colour.stroke_width(2)));
        }
        legend(&mut chart)?;
        root.present().map_err(io_err)?;
    }
    Ok(svg)
}

/// `rate.svg`.
pub(crate) fn rate(frame: &Frame<'_>, calls: &[Call<'_>]) -> io::Result<String> {
    let bucket = frame.bucket_s();
    let n_buckets = (frame.end_s.max(0.0) / bucket) as usize + 1;
    let mut series: BTreeMap<(&str, Outcome), Vec<u64>> = BTreeMap::new();
    for c in calls.iter().filter(|c| !c.process().is_nemesis() && c.completion.is_some()) {
        let b = ((seconds(c.end) / bucket) as usize).min(n_buckets - 1);
        series.entry((c.f(), c.outcome)).or_insert_with(|| vec![0; n_buckets])[b] += 1;
    }
    let hi = series.values().flatten().fold(1.0f64, |m, &n| m.max(n as f64 / bucket)) * 1.1;

    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(io_err)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(format!("completed operations per second ({bucket} s buckets)"), ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(64)
            .build_cartesian_2d(frame.x_range(), 0.0..hi)
            .map_err(io_err)?;
        chart.configure_mesh().x_desc("time (s)").y_desc("ops/s").draw().map_err(io_err)?;
        shade(&mut chart, frame.faults, (0.0, hi), true).map_err(io_err)?;
        for (&(f, outcome), counts) in &series {
            let colour = series_colour(f, outcome);
            let line =
                counts.iter().enumerate().map(|(b, &n)| ((b as f64 + 0.5) * bucket, n as f64 / bucket));
            chart
                .draw_series(LineSeries::new(line, colour.stroke_width(2)))
                .map_err(io_err)?
                .label(format!("{f} {}", outcome.name()))
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 14, y)], colour.stroke_width(2)));
        }
        legend(&mut chart)?;
        root.present().map_err(io_err)?;
    }
    Ok(svg)
}

/// `lag.svg`.
pub(crate) fn lag(frame: &Frame<'_>, lags: &[DeliveryLag], unseen: &[(u64, u64)]) -> io::Result<String> {
    let mut seen: BTreeMap<ObservedBy, Vec<(f64, f64)>> = BTreeMap::new();
    let mut never: Vec<f64> = Vec::new();
    for l in lags {
        match (l.lag_ns(), l.seen) {
            (Some(lag), Some((_, how))) => {
                seen.entry(how).or_default().push((seconds(l.ack_ns), millis(lag)))
            }
            _ => never.push(seconds(l.ack_ns)),
        }
    }
    let hi = seen.values().flatten().fold(1.0f64, |m, p| m.max(p.1)) * 1.1;
    let step = stride(lags.len());
    let unseen_hi = unseen.iter().fold(1.0f64, |m, p| m.max(p.1 as f64)) * 1.1;
    let mut steps: Vec<(f64, f64)> = Vec::with_capacity(unseen.len() * 2);
    for w in unseen.windows(2) {
        steps.push((seconds(w[0].0), w[0].1 as f64));
        steps.push((seconds(w[1].0), w[0].1 as f64));
    }
    if let Some(&(t, n)) = unseen.last() {
        steps.push((seconds(t), n as f64));
    }

    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, LAG_SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(io_err)?;
        let (top, bottom) = root.split_vertically(LAG_SIZE.1 * 3 / 5);
        let observed: usize = seen.values().map(Vec::len).sum();
        let mut chart = ChartBuilder::on(&top)
            .caption(
                format!(
                    "delivery lag: ack to first observation by the recipient ({observed} observed, {} never)",
                    never.len()
                ),
                ("sans-serif", 18),
            )
            .margin(12)
            .x_label_area_size(32)
            .y_label_area_size(64)
            .build_cartesian_2d(frame.x_range(), 0.0..hi)
            .map_err(io_err)?;
        chart.configure_mesh().x_desc("ack time (s)").y_desc("lag (ms)").draw().map_err(io_err)?;
        shade(&mut chart, frame.faults, (0.0, hi), true).map_err(io_err)?;
        for (how, pts) in &seen {
            let colour = match how {
                ObservedBy::Push => RGBColor(120, 60, 200),
                ObservedBy::Sync => RGBColor(31, 100, 200),
                ObservedBy::FinalRead => RGBColor(90, 90, 90),
            };
            chart
                .draw_series(pts.iter().step_by(step).map(|&p| Circle::new(p, 2, colour.mix(0.6).filled())))
                .map_err(io_err)?
                .label(format!("first seen by {}", how.name()))
                .legend(move |(x, y)| Circle::new((x + 7, y), 4, colour.filled()));
        }
        if !never.is_empty() {
            chart
                .draw_series(never.iter().step_by(step).map(|&t| Cross::new((t, hi), 4, RED.stroke_width(2))))
                .map_err(io_err)?
                .label("never observed (top edge)")
                .legend(|(x, y)| Cross::new((x + 7, y), 4, RED.stroke_width(2)));
        }
        legend(&mut chart)?;

        let mut chart = ChartBuilder::on(&bottom)
            .caption("acked messages not yet observed by their recipient (unseen)", ("sans-serif", 16))
            .margin(12)
            .x_label_area_size(32)
            .y_label_area_size(64)
            .build_cartesian_2d(frame.x_range(), 0.0..unseen_hi)
            .map_err(io_err)?;
        chart.configure_mesh().x_desc("time (s)").y_desc("unseen").draw().map_err(io_err)?;
        shade(&mut chart, frame.faults, (0.0, unseen_hi), false).map_err(io_err)?;
        chart.draw_series(LineSeries::new(steps, RED.stroke_width(2))).map_err(io_err)?;
        root.present().map_err(io_err)?;
    }
    Ok(svg)
}

fn legend<'a, DB, Y>(chart: &mut ChartContext<'a, DB, Cartesian2d<RangedCoordf64, Y>>) -> io::Result<()>
where
    DB: DrawingBackend + 'a,
    Y: Ranged<ValueType = f64>,
{
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.4))
        .label_font(("sans-serif", 12))
        .draw()
        .map_err(io_err)
}
