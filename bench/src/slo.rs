//! `rim bench send --slo 100ms`: the highest open-loop rate whose latency
//! quantile (`--slo-quantile`, default p99, of send → ack or with
//! `--slo-on delivered` of send → delivered) stays within the bound.
//!
//! The search runs steps of `--warmup` plus `--step-duration` on the
//! connections and accounts of [`Driver`] (nobody registers or reconnects
//! between steps; each step measures only its own window of send times and
//! is drained before the next, see [`super::latency`]). The rule
//! ([`Search`]):
//!
//! 1. The first step runs at `--rate`.
//! 2. While every step met the SLO, the next doubles the rate (at most
//!    [`MAX_DOUBLINGS`] times).
//! 3. After the first miss, up to `--search-steps` steps narrow the
//!    bracket: halving the missed rate while nothing met the SLO yet,
//!    bisecting between the highest rate that met it and the lowest that
//!    missed it otherwise (rounded to whole messages per second). It stops
//!    early when the bracket is within 2 % or the rate would fall below
//!    1 msg/s.
//!
//! Every next rate therefore lies strictly between the highest rate that
//! met the SLO so far (or 0) and the lowest that missed it (or ∞), and the
//! answer is the highest rate that met it (or none).
//!
//! A step meets the SLO ([`verdict`]) when
//! * the offered rate was reached: measured sends ≥ 95 % of rate × duration
//!   (less one send per sender for the tick phase); skipped sends at the
//!   in-flight limit or a bench that cannot keep up mean saturation, a miss;
//! * and the quantile holds over *all* measured sends, a send without a
//!   successful ack (or delivery) by the end of the drain counting as slower
//!   than any bound: at least `q` × sent of them were acked (delivered)
//!   within the bound.
//!
//! The search stops as well when a connection breaks. Steps are bounded:
//! at most 1 + [`MAX_DOUBLINGS`] + `--search-steps` (≤ 16).

use std::time::Duration;

use clap::{Args, ValueEnum};

use super::Outcome;
use super::hist::Histogram;
use super::json::Json;
use super::latency::{Driver, LatencyArgs, Rate, StepFigures, params};
use super::sys;

/// Most doublings while every step meets the SLO.
pub const MAX_DOUBLINGS: u32 = 12;

/// The bracket is narrow enough when within this fraction of its top.
const CONVERGED: f64 = 0.02;

/// Lowest rate the search tries.
const MIN_RATE: f64 = 1.0;

/// Share of the target sends a step must make to count as offered.
const OFFERED: f64 = 0.95;

/// Flags of the SLO search (part of `rim bench send`).
#[derive(Args, Debug)]
pub struct SloArgs {
    /// Search the highest rate whose latency quantile stays within this bound
    /// (e.g. 100ms): steps from --rate, doubling while met, then bisecting.
    #[arg(long, value_parser = sys::parse_duration)]
    pub slo: Option<Duration>,
    /// The quantile --slo bounds: p50, p90, p99, p99.9 or a fraction such as 0.995.
    #[arg(long, default_value = "p99", value_parser = parse_quantile, requires = "slo")]
    pub slo_quantile: Quantile,
    /// The latency --slo bounds: send → ack or send → delivered to the recipient.
    #[arg(long, value_enum, default_value_t = SloOn::Ack, requires = "slo")]
    pub slo_on: SloOn,
    /// Measured time of each search step (each after --warmup).
    #[arg(long, default_value = "10s", value_parser = sys::parse_duration, requires = "slo")]
    pub step_duration: Duration,
    /// Most halving or bisection steps after the first miss.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(0..=16), requires = "slo")]
    pub search_steps: u32,
}

/// A quantile and how it was named.
#[derive(Clone, Debug, PartialEq)]
pub struct Quantile {
    /// In (0, 1).
    pub q: f64,
    /// `p99`, `p99.9`, …
    pub label: String,
}

/// Parses `p99`, `p99.9`, `99.9%` or `0.999`.
fn parse_quantile(s: &str) -> Result<Quantile, String> {
    let t = s.trim();
    let q = if let Some(p) = t.strip_prefix(['p', 'P']).or_else(|| t.strip_suffix('%')) {
        p.parse::<f64>().ok().map(|v| v / 100.0)
    } else {
        t.parse::<f64>().ok()
    };
    match q {
        Some(q) if q > 0.0 && q < 1.0 => {
            let pct = format!("{:.4}", q * 100.0);
            Ok(Quantile { q, label: format!("p{}", pct.trim_end_matches('0').trim_end_matches('.')) })
        }
        _ => Err(format!("bad quantile {s:?}: p50, p90, p99, p99.9 or a fraction in (0, 1)")),
    }
}

/// Which latency the SLO bounds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum SloOn {
    /// Send → ack.
    Ack,
    /// Send → delivered to the recipient's connection.
    Delivered,
}

impl SloOn {
    fn name(self) -> &'static str {
        match self {
            SloOn::Ack => "ack",
            SloOn::Delivered => "delivered",
        }
    }
}

/// Checks the flags of a search (nothing to check without `--slo`).
pub(super) fn check(args: &LatencyArgs) -> anyhow::Result<()> {
    let Some(bound) = args.slo.slo else { return Ok(()) };
    anyhow::ensure!(!bound.is_zero(), "--slo must be positive");
    anyhow::ensure!(
        matches!(args.rate, Rate::PerSecond(_)),
        "--slo searches open-loop rates: give the first one with --rate N (not max)"
    );
    anyhow::ensure!(!args.slo.step_duration.is_zero(), "--step-duration must be positive");
    Ok(())
}

/// How a step's rate was chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// `--rate`.
    Start,
    /// Twice the previous rate (every step so far met the SLO).
    Double,
    /// Half the lowest missed rate (none met the SLO yet).
    Halve,
    /// Between the highest met and the lowest missed rate.
    Bisect,
}

impl Phase {
    fn name(self) -> &'static str {
        match self {
            Phase::Start => "start",
            Phase::Double => "double",
            Phase::Halve => "halve",
            Phase::Bisect => "bisect",
        }
    }
}

/// The search's state: see the module docs for the rule.
#[derive(Debug)]
pub struct Search {
    start: f64,
    last: Option<f64>,
    /// Highest rate that met the SLO.
    lo: Option<f64>,
    /// Lowest rate that missed it.
    hi: Option<f64>,
    doublings: u32,
    narrowings: u32,
    max_narrowings: u32,
}

impl Search {
    /// A search from `start` with at most `steps` halving or bisection steps.
    pub fn new(start: f64, steps: u32) -> Search {
        Search { start, last: None, lo: None, hi: None, doublings: 0, narrowings: 0, max_narrowings: steps }
    }

    /// The next rate to try, or why the search is over.
    pub fn next(&self) -> Result<(f64, Phase), &'static str> {
        let Some(last) = self.last else { return Ok((self.start, Phase::Start)) };
        let Some(hi) = self.hi else {
            if self.doublings >= MAX_DOUBLINGS {
                return Err("doubling limit reached: every step met the SLO");
            }
            return Ok((2.0 * last, Phase::Double));
        };
        if self.narrowings >= self.max_narrowings {
            return Err("search steps done");
        }
        match self.lo {
            None => {
                let r = (hi / 2.0).round();
                if r < MIN_RATE || r >= hi {
                    Err("no rate down to 1 msg/s met the SLO")
                } else {
                    Ok((r, Phase::Halve))
                }
            }
            Some(lo) => {
                let r = ((lo + hi) / 2.0).round();
                if hi - lo <= CONVERGED * hi || r <= lo || r >= hi {
                    Err("converged")
                } else {
                    Ok((r, Phase::Bisect))
                }
            }
        }
    }

    /// Takes the outcome of a step at `rate` chosen by `phase`.
    pub fn record(&mut self, rate: f64, phase: Phase, met: bool) {
        self.last = Some(rate);
        if met {
            self.lo = Some(self.lo.map_or(rate, |lo| lo.max(rate)));
        } else {
            self.hi = Some(self.hi.map_or(rate, |hi| hi.min(rate)));
        }
        match phase {
            Phase::Start => {}
            Phase::Double => self.doublings += 1,
            Phase::Halve | Phase::Bisect => self.narrowings += 1,
        }
    }
}

/// Whether a step met the SLO, and why.
#[derive(Debug)]
pub struct Verdict {
    /// Offered rate reached and quantile within the bound.
    pub met: bool,
    /// The quantile over all measured sends (µs); `None` when too few were
    /// answered for it to be finite.
    pub measured_us: Option<u64>,
    /// One line.
    pub reason: String,
}

/// The quantile `q` of `sent` samples of which only those in `h` finished:
/// the others count as slower than anything. `None` if it falls among them.
fn quantile_of_all(h: &Histogram, sent: u64, q: f64) -> Option<u64> {
    if sent == 0 {
        return None;
    }
    let rank = ((q * sent as f64).ceil() as u64).max(1);
    (rank <= h.count()).then(|| h.quantile((rank as f64 - 0.5) / h.count() as f64))
}

/// Judges a step (see the module docs).
pub fn verdict(f: &StepFigures, pairs: usize, bound: Duration, quantile: &Quantile, on: SloOn) -> Verdict {
    let h = match on {
        SloOn::Ack => &f.ack,
        SloOn::Delivered => &f.delivery,
    };
    let measured_us = quantile_of_all(h, f.sent, quantile.q);
    let bound_us = bound.as_micros() as u64;
    let expected = match f.rate {
        Rate::PerSecond(r) => r * f.duration.as_secs_f64(),
        Rate::Max => 0.0,
    };
    let (name, label) = (on.name(), &quantile.label);
    let ms = |us: u64| us as f64 / 1000.0;
    let (met, reason) = if f.sent == 0 {
        (false, "nothing sent".to_string())
    } else if (f.sent as f64) < OFFERED * expected - pairs as f64 {
        let reason = format!(
            "offered rate not reached: sent {:.0}/s of {:.0}/s, {} skipped at the in-flight limit",
            f.sent_per_s(),
            expected / f.duration.as_secs_f64(),
            f.skipped
        );
        (false, reason)
    } else {
        match measured_us {
            None => {
                let what = if on == SloOn::Ack { "acked" } else { "delivered" };
                (false, format!("{label} not reached: only {} of {} sends {what}", h.count(), f.sent))
            }
            Some(v) if v <= bound_us => {
                (true, format!("{name} {label} {:.1} ms <= {:.1} ms", ms(v), ms(bound_us)))
            }
            Some(v) => (false, format!("{name} {label} {:.1} ms > {:.1} ms", ms(v), ms(bound_us))),
        }
    };
    Verdict { met, measured_us, reason }
}

/// Runs the search on `driver`'s connections.
pub(super) async fn search(args: &LatencyArgs, driver: &mut Driver) -> Outcome {
    let a = &args.slo;
    let bound = a.slo.unwrap_or_default();
    let start = match args.rate {
        Rate::PerSecond(r) => r,
        Rate::Max => 1000.0, // refused by `check`
    };
    let mut search = Search::new(start, a.search_steps);
    let mut steps: Vec<(StepFigures, Phase, Verdict)> = Vec::new();
    let stopped = loop {
        let (rate, phase) = match search.next() {
            Ok(next) => next,
            Err(why) => break why.to_string(),
        };
        let n = steps.len() + 1;
        let label = format!("step {n} ({}, {rate:.0} msg/s) ", phase.name());
        let f = driver.step(Rate::PerSecond(rate), a.step_duration, label).await;
        let v = verdict(&f, args.pairs, bound, &a.slo_quantile, a.slo_on);
        eprintln!(
            "rim bench send: step {n} ({}) {rate:.0} msg/s: {} ({}); sent {:.0}/s, acked {:.0}/s, delivered {:.0}/s; {}; errors {}",
            phase.name(),
            if v.met { "met" } else { "missed" },
            v.reason,
            f.sent_per_s(),
            f.acked_per_s(),
            f.delivered_per_s(),
            f.latencies(),
            f.errors_total,
        );
        search.record(rate, phase, v.met);
        steps.push((f, phase, v));
        if driver.broken() > 0 {
            break format!("{} connection(s) broke", driver.broken());
        }
    };

    let answer = steps
        .iter()
        .enumerate()
        .filter(|(_, (_, _, v))| v.met)
        .max_by(|(_, (x, _, _)), (_, (y, _, _))| rate_of(x).total_cmp(&rate_of(y)));
    let ms = |us: u64| us as f64 / 1000.0;
    let slo_json = Json::obj()
        .with("bound_ms", bound.as_secs_f64() * 1000.0)
        .with("quantile", a.slo_quantile.label.as_str())
        .with("quantile_fraction", a.slo_quantile.q)
        .with("on", a.slo_on.name());
    let step_json: Vec<Json> = steps
        .iter()
        .enumerate()
        .map(|(i, (f, phase, v))| {
            let mut j = Json::obj().with("step", i).with("phase", phase.name()).with(
                "slo",
                Json::obj()
                    .with("met", v.met)
                    .with("measured_ms", v.measured_us.map(ms))
                    .with("reason", v.reason.as_str()),
            );
            if let (Json::Obj(fields), Json::Obj(more)) = (&mut j, f.to_json()) {
                fields.extend(more);
            }
            j
        })
        .collect();
    let answer_json = match answer {
        Some((i, (f, _, v))) => Json::obj()
            .with("step", i)
            .with("rate_per_second", rate_of(f))
            .with("measured_ms", v.measured_us.map(ms))
            .with("ack_throughput_per_second", f.acked_per_s()),
        None => Json::Null,
    };
    let results = Json::obj()
        .with("slo", slo_json.clone())
        .with("max_rate_within_slo_per_second", answer.map(|(_, (f, _, _))| rate_of(f)))
        .with("answer", answer_json)
        .with("stopped", stopped.as_str())
        .with("steps", step_json)
        .with("totals", driver.totals());
    let params = params(args)
        .with("slo", slo_json)
        .with("step_duration_seconds", a.step_duration.as_secs_f64())
        .with("search_steps", a.search_steps)
        .with("max_doublings", MAX_DOUBLINGS);

    let what =
        format!("{} {} <= {:.0} ms", a.slo_on.name(), a.slo_quantile.label, ms(bound.as_micros() as u64));
    let trail: Vec<String> = steps
        .iter()
        .map(|(f, _, v)| format!("{:.0}{}", rate_of(f), if v.met { " ok" } else { " miss" }))
        .collect();
    let head = match answer {
        Some((_, (f, _, _))) => format!(
            "send --slo: highest rate with {what}: {:.0} msg/s (sent {:.0}/s, acked {:.0}/s, delivered {:.0}/s; {}; errors {})",
            rate_of(f),
            f.sent_per_s(),
            f.acked_per_s(),
            f.delivered_per_s(),
            f.latencies(),
            f.errors_total
        ),
        None => format!("send --slo: no rate tried met {what}"),
    };
    let summary = format!("{head}; {} steps: {}; stopped: {stopped}", steps.len(), trail.join(", "));
    Outcome { params, results, summary }
}

fn rate_of(f: &StepFigures) -> f64 {
    match f.rate {
        Rate::PerSecond(r) => r,
        Rate::Max => f64::INFINITY,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_parse() {
        let q = |s: &str| parse_quantile(s).map(|q| (q.q, q.label));
        assert_eq!(q("p99"), Ok((0.99, "p99".into())));
        assert_eq!(q("p99.9").map(|x| x.1), Ok("p99.9".into()));
        assert!((parse_quantile("p99.9").unwrap().q - 0.999).abs() < 1e-12);
        assert_eq!(q("0.5"), Ok((0.5, "p50".into())));
        assert_eq!(q("90%").map(|x| x.1), Ok("p90".into()));
        assert_eq!(q("0.995").map(|x| x.1), Ok("p99.5".into()));
        for bad in ["p100", "p0", "1", "0", "x", "", "-0.5"] {
            assert!(parse_quantile(bad).is_err(), "{bad:?}");
        }
    }

    /// Runs the search against a system that meets the SLO up to `capacity`.
    fn simulate(start: f64, steps: u32, capacity: f64) -> (Vec<(f64, Phase, bool)>, &'static str) {
        let mut s = Search::new(start, steps);
        let mut seen = Vec::new();
        loop {
            match s.next() {
                Ok((r, phase)) => {
                    let met = r <= capacity;
                    s.record(r, phase, met);
                    seen.push((r, phase, met));
                }
                Err(why) => return (seen, why),
            }
            assert!(seen.len() <= 1 + MAX_DOUBLINGS as usize + steps as usize);
        }
    }

    #[test]
    fn doubles_then_bisects() {
        let (seen, why) = simulate(500.0, 4, 2600.0);
        let rates: Vec<f64> = seen.iter().map(|s| s.0).collect();
        assert_eq!(rates, [500.0, 1000.0, 2000.0, 4000.0, 3000.0, 2500.0, 2750.0, 2625.0]);
        assert_eq!(seen[3].1, Phase::Double);
        assert_eq!(seen[4].1, Phase::Bisect);
        assert_eq!(why, "search steps done");
    }

    #[test]
    fn halves_when_the_start_misses_and_stops_at_the_floor() {
        let (seen, _) = simulate(1000.0, 3, 300.0);
        let rates: Vec<f64> = seen.iter().map(|s| s.0).collect();
        assert_eq!(rates, [1000.0, 500.0, 250.0, 375.0]);
        assert_eq!(seen[1].1, Phase::Halve);
        assert_eq!(seen[3].1, Phase::Bisect);
        let (seen, why) = simulate(4.0, 16, 0.0);
        assert_eq!(seen.iter().map(|s| s.0).collect::<Vec<_>>(), [4.0, 2.0, 1.0]);
        assert_eq!(why, "no rate down to 1 msg/s met the SLO");
    }

    #[test]
    fn stops_when_converged_or_after_the_doubling_limit() {
        let (seen, why) = simulate(100.0, 16, 130.0);
        assert_eq!(why, "converged");
        assert!(seen.len() < 1 + 1 + 16);
        let (seen, why) = simulate(1.0, 4, f64::INFINITY);
        assert_eq!(seen.len(), 1 + MAX_DOUBLINGS as usize);
        assert_eq!(why, "doubling limit reached: every step met the SLO");
    }

    #[test]
    fn every_next_rate_lies_inside_the_bracket() {
        for capacity in [0.5, 3.0, 77.0, 999.0, 1000.0, 1001.0, 12_345.0] {
            for start in [1.0, 10.0, 1000.0] {
                let (seen, _) = simulate(start, 6, capacity);
                for i in 1..seen.len() {
                    let lo = seen[..i].iter().filter(|s| s.2).map(|s| s.0).fold(0.0, f64::max);
                    let hi = seen[..i].iter().filter(|s| !s.2).map(|s| s.0).fold(f64::INFINITY, f64::min);
                    assert!(lo < seen[i].0 && seen[i].0 < hi, "{capacity} {start}: {seen:?}");
                }
            }
        }
    }

    #[test]
    fn unanswered_sends_count_as_slowest() {
        let mut h = Histogram::default();
        for v in 1..=990u64 {
            h.record(v);
        }
        // 990 of 1000 answered: p99 is the slowest answered one, p99.9 infinite.
        assert_eq!(quantile_of_all(&h, 1000, 0.99), Some(990));
        assert_eq!(quantile_of_all(&h, 1000, 0.999), None);
        assert_eq!(quantile_of_all(&h, 200, 0.5), Some(100));
        assert_eq!(quantile_of_all(&h, 0, 0.5), None);
    }
}
