//! `rim bench send` (aliases `latency`, `delivery-latency`): P pairs of
//! users, each with one device connected to the gateway over TCP; the first
//! of each pair sends 1:1 text messages to the second.
//!
//! Three ways to drive it:
//!
//! * **open loop** (`--rate 500`): `--rate` messages per second in
//!   aggregate; every sender ticks every `pairs / rate`, phases spread
//!   evenly, for `--warmup` (not recorded) plus `--duration`.
//! * **closed loop** (`--rate max`): every sender keeps `--max-inflight`
//!   sends outstanding and sends the next one on each reply; the throughput
//!   is the acks per second.
//! * **SLO search** (`--slo 100ms`, see [`super::slo`]): a series of open
//!   loop steps at different rates on the same connections, to find the
//!   highest rate whose p99 (or `--slo-quantile`) stays within the bound.
//!
//! What is measured:
//!
//! * **send → ack**: from writing `SEND` to reading its reply. The send
//!   time (µs since the run's epoch) is the packet's `request_id`, so no
//!   table of sends in flight is needed.
//! * **send → delivered**: from writing `SEND` to reading the `MESSAGE` push
//!   at the recipient's connection. The send time is the first word of the
//!   message text; sender and recipient share the bench's clock.
//!
//! The connections and the tasks that drive them are in [`driver`]; this
//! module holds the flags, the checks and the result of a single run.

mod driver;

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

pub(crate) use self::driver::{Driver, StepFigures};
use super::Outcome;
use super::json::Json;
use super::slo::{self, SloArgs};
use super::sys;
use super::target::{Target, TargetArgs};

/// Flags of `rim bench send`.
#[derive(Args, Debug)]
pub struct LatencyArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    /// Result file (default bench-send.json).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Sender → recipient pairs (2 × pairs users and connections).
    #[arg(long, default_value_t = 50)]
    pub(super) pairs: usize,
    /// Aggregate send rate in messages per second (open loop), or `max`: every
    /// sender keeps --max-inflight sends outstanding and sends the next on each
    /// reply (closed loop). With --slo: the first rate of the search.
    #[arg(long, default_value = "500", value_parser = parse_rate)]
    pub(super) rate: Rate,
    /// Measured sending time of a single run (with --slo see --step-duration).
    #[arg(long, default_value = "30s", value_parser = sys::parse_duration)]
    pub(super) duration: Duration,
    /// Sending time before each measured window (not recorded).
    #[arg(long, default_value = "3s", value_parser = sys::parse_duration)]
    pub(super) warmup: Duration,
    /// Most unanswered sends per sender (the gateway allows 64).
    #[arg(long, default_value_t = 32)]
    pub(super) max_inflight: usize,
    /// Message text size in bytes.
    #[arg(long, default_value_t = 100)]
    pub(super) size: usize,
    /// Longest wait for outstanding acks and deliveries after each measured window.
    #[arg(long, default_value = "10s", value_parser = sys::parse_duration)]
    pub(super) drain: Duration,
    /// Concurrent user registrations.
    #[arg(long, default_value_t = 4)]
    pub(super) user_concurrency: usize,
    #[command(flatten)]
    pub(super) slo: SloArgs,
}

/// A target send rate.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Rate {
    /// Messages per second in aggregate (open loop).
    PerSecond(f64),
    /// As fast as replies allow (closed loop).
    Max,
}

impl Rate {
    /// `500` or `"max"`.
    pub(super) fn json(self) -> Json {
        match self {
            Rate::PerSecond(r) => Json::from(r),
            Rate::Max => Json::from("max"),
        }
    }
}

/// Parses `--rate`: a positive number of messages per second, or `max`.
fn parse_rate(s: &str) -> Result<Rate, String> {
    let s = s.trim();
    if s.eq_ignore_ascii_case("max") {
        return Ok(Rate::Max);
    }
    match s.parse::<f64>() {
        Ok(r) if r > 0.0 && r.is_finite() => Ok(Rate::PerSecond(r)),
        _ => Err(format!("bad rate {s:?}: a positive number of messages per second, or max")),
    }
}

/// Runs the scenario: one step, or the SLO search with `--slo`.
pub async fn run(args: &LatencyArgs, target: &Target) -> anyhow::Result<Outcome> {
    let p = args.pairs;
    anyhow::ensure!(p >= 1, "--pairs must be at least 1");
    anyhow::ensure!(!args.duration.is_zero(), "--duration must be positive");
    anyhow::ensure!(args.max_inflight >= 1, "--max-inflight must be at least 1");
    slo::check(args)?;
    sys::check_nofile(2 * p as u64 + 256, &format!("{p} pairs"))?;
    let mut driver = Driver::start(args, target).await?;
    let outcome = if args.slo.slo.is_some() {
        slo::search(args, &mut driver).await
    } else {
        let f = driver.step(args.rate, args.duration, String::new()).await;
        single(args, &f, driver.totals())
    };
    driver.finish().await?;
    Ok(outcome)
}

/// The parameters every mode shares.
pub(super) fn params(args: &LatencyArgs) -> Json {
    Json::obj()
        .with("pairs", args.pairs)
        .with("target_rate_per_second", args.rate.json())
        .with("loop", if args.rate == Rate::Max { "closed" } else { "open" })
        .with("warmup_seconds", args.warmup.as_secs_f64())
        .with("max_inflight_per_sender", args.max_inflight)
        .with("message_bytes", args.size)
        .with("drain_timeout_seconds", args.drain.as_secs_f64())
}

/// The outcome of a single run.
fn single(args: &LatencyArgs, f: &StepFigures, totals: Json) -> Outcome {
    let mut results = f.to_json();
    results.set("including_warmup", totals);
    let params = params(args).with("duration_seconds", args.duration.as_secs_f64());
    let head = match args.rate {
        Rate::PerSecond(r) => format!("send: target {r:.0} msg/s, sent {:.0}/s", f.sent_per_s()),
        Rate::Max => format!(
            "send: closed loop ({} in flight per sender), sent {:.0}/s",
            args.max_inflight,
            f.sent_per_s()
        ),
    };
    let summary = format!(
        "{head}, acked {:.0}/s, delivered {:.0}/s; {}; errors {}, skipped {}, unanswered {}, undelivered {}; {}",
        f.acked_per_s(),
        f.delivered_per_s(),
        f.latencies(),
        f.errors_total,
        f.skipped,
        f.sent.saturating_sub(f.replied),
        f.acked.saturating_sub(f.delivered),
        f.cpu.1,
    );
    Outcome { params, results, summary }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse() {
        assert_eq!(parse_rate("500"), Ok(Rate::PerSecond(500.0)));
        assert_eq!(parse_rate(" 2.5 "), Ok(Rate::PerSecond(2.5)));
        assert_eq!(parse_rate("MAX"), Ok(Rate::Max));
        for bad in ["0", "-3", "inf", "NaN", "fast", ""] {
            assert!(parse_rate(bad).is_err(), "{bad:?}");
        }
    }
}
