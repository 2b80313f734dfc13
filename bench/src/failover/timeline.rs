//! Bookkeeping around the kill (see [`super`]): the [`Timeline`] of acks
//! and pushes per time bucket, the ack [`Window`] of a set of senders
//! (acks before / after the kill, kill to first ack, longest gap), and the
//! longest push silence. Times are µs since the run's epoch.
//!
//! Invariants:
//!
//! * The timeline is fixed-size: at most [`TIMELINE_BUCKETS`] + 1 buckets
//!   of at least [`MIN_BUCKET`], allocated up front; events beyond its
//!   span are not counted.
//! * Recovery is the first ack of an attempt written at or after the kill:
//!   an attempt written before the kill and acked just after it does not
//!   count. The longest gap is one that ends after the kill, starting at
//!   the last ack before it (or at the kill); acks after the end of the
//!   load start no gap.
//! * Pure functions of what they are given: no I/O, no clock.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::load::Acked;
use crate::json::Json;

/// Most buckets of the timeline (their width grows for long runs).
const TIMELINE_BUCKETS: u64 = 1_200;
/// Narrowest timeline bucket.
const MIN_BUCKET: Duration = Duration::from_millis(100);

/// Timeline series.
pub(super) const ACKS_TARGET: usize = 0;
pub(super) const ACKS_OTHER: usize = 1;
pub(super) const PUSHES_TARGET: usize = 2;
pub(super) const PUSHES_OTHER: usize = 3;
const SERIES: [&str; 4] = [
    "acks_target_shard",
    "acks_other_shards",
    "pushes_to_target_shard_recipients",
    "pushes_to_other_recipients",
];

/// Counts per time bucket (fixed size; later events are not counted).
pub(super) struct Timeline {
    bucket_us: u64,
    series: [Vec<AtomicU64>; 4],
}

impl Timeline {
    pub(super) fn new(span: Duration) -> Timeline {
        let bucket_us =
            (span.as_micros() as u64).div_ceil(TIMELINE_BUCKETS).max(MIN_BUCKET.as_micros() as u64);
        let n = (span.as_micros() as u64).div_ceil(bucket_us) as usize + 1;
        Timeline { bucket_us, series: std::array::from_fn(|_| (0..n).map(|_| AtomicU64::new(0)).collect()) }
    }

    pub(super) fn add(&self, series: usize, t_us: u64) {
        if let Some(c) = self.series[series].get((t_us / self.bucket_us) as usize) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Acks of a set of senders around the kill (times in µs since the epoch).
pub(super) struct Window {
    pub(super) before: u64,
    pub(super) after: u64,
    /// From the kill to the first ack of an attempt written after it.
    pub(super) first_ack_us: Option<u64>,
    /// The longest gap between consecutive acks that ends after the kill
    /// (it starts at the last ack before the kill, or at the kill).
    pub(super) gap: Option<(u64, u64)>,
    /// The longest gap between consecutive acks before the kill.
    pub(super) gap_before_kill: Option<u64>,
    kill_us: u64,
}

impl Window {
    /// Acks read after `end_us` (the end of the load) start no gap.
    pub(super) fn of(acks: &[&Acked], kill_us: u64, end_us: u64) -> Window {
        let mut times: Vec<u64> = acks.iter().map(|a| a.acked_us).collect();
        times.sort_unstable();
        let split = times.partition_point(|t| *t < kill_us);
        let (pre, post) = times.split_at(split);
        let first_ack_us =
            acks.iter().filter(|a| a.attempt_us >= kill_us).map(|a| a.acked_us - kill_us).min();
        let mut gap: Option<(u64, u64)> = None;
        let mut prev = pre.last().copied().unwrap_or(kill_us);
        for &t in post {
            if prev <= end_us && gap.is_none_or(|(a, b)| t - prev > b - a) {
                gap = Some((prev, t));
            }
            prev = t;
        }
        let gap_before_kill = pre.windows(2).map(|w| w[1] - w[0]).max();
        Window {
            before: pre.len() as u64,
            after: post.len() as u64,
            first_ack_us,
            gap,
            gap_before_kill,
            kill_us,
        }
    }

    pub(super) fn to_json(&self) -> Json {
        let ms = |us: u64| us as f64 / 1e3;
        let rel = |t: u64| (t as f64 - self.kill_us as f64) / 1e3;
        Json::obj()
            .with("acked_before_kill", self.before)
            .with("acked_after_kill", self.after)
            .with("recovered", self.first_ack_us.is_some())
            .with("kill_to_first_ack_ms", self.first_ack_us.map(ms))
            .with("longest_ack_gap_ms", self.gap.map(|(a, b)| ms(b - a)))
            .with("longest_ack_gap_from_ms", self.gap.map(|(a, _)| rel(a)))
            .with("longest_ack_gap_to_ms", self.gap.map(|(_, b)| rel(b)))
            .with("longest_ack_gap_before_kill_ms", self.gap_before_kill.map(ms))
    }
}

/// The longest run of empty buckets of `series` from the kill's bucket to
/// the end of the load, in µs (at the timeline's resolution); `None` if
/// the series saw nothing before the kill (nothing to miss).
pub(super) fn silence_us(t: &Timeline, series: usize, kill_us: u64, end_us: u64) -> Option<u64> {
    let s = &t.series[series];
    let (from, to) = ((kill_us / t.bucket_us) as usize, ((end_us / t.bucket_us) as usize).min(s.len()));
    if s[..from.min(s.len())].iter().all(|c| c.load(Ordering::Relaxed) == 0) {
        return None;
    }
    let (mut run, mut longest) = (0u64, 0u64);
    for c in s.get(from..to).unwrap_or(&[]) {
        run = if c.load(Ordering::Relaxed) == 0 { run + 1 } else { 0 };
        longest = longest.max(run);
    }
    Some(longest * t.bucket_us)
}

/// The timeline as JSON: bucket width, the kill's bucket, every series up
/// to the end of the load.
pub(super) fn timeline_json(t: &Timeline, kill_us: u64, end_us: u64) -> Json {
    let len = ((end_us / t.bucket_us) as usize + 1).min(t.series[0].len());
    let mut j = Json::obj()
        .with("bucket_ms", t.bucket_us as f64 / 1e3)
        .with("kill_bucket", kill_us / t.bucket_us)
        .with("note", "bucket i counts events in [i, i+1) × bucket_ms from the start of the load");
    for (name, series) in SERIES.iter().zip(&t.series) {
        let v: Vec<u64> = series[..len].iter().map(|c| c.load(Ordering::Relaxed)).collect();
        j.set(name, v);
    }
    j
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ack(n: u32, attempt_us: u64, acked_us: u64) -> Acked {
        Acked { n, first_us: attempt_us, attempt_us, acked_us }
    }

    #[test]
    fn window_measures_the_gap_across_the_kill() {
        let acks = [ack(1, 0, 100), ack(2, 150, 200), ack(3, 900, 1_000), ack(4, 1_050, 1_100)];
        let refs: Vec<&Acked> = acks.iter().collect();
        let w = Window::of(&refs, 500, 2_000);
        assert_eq!((w.before, w.after), (2, 2));
        assert_eq!(w.gap, Some((200, 1_000)));
        assert_eq!(w.first_ack_us, Some(500)); // attempt at 900, acked at 1000
        assert_eq!(w.gap_before_kill, Some(100));
        // No ack after the kill: not recovered, no gap.
        let w = Window::of(&refs[..2], 500, 2_000);
        assert_eq!((w.gap, w.first_ack_us), (None, None));
        // An ack right after the kill of an attempt written before it is no recovery.
        let acks = [ack(1, 0, 100), ack(2, 450, 510), ack(3, 600, 3_000)];
        let refs: Vec<&Acked> = acks.iter().collect();
        let w = Window::of(&refs, 500, 5_000);
        assert_eq!(w.first_ack_us, Some(2_500));
        assert_eq!(w.gap, Some((510, 3_000)));
    }

    #[test]
    fn timeline_is_bounded() {
        let t = Timeline::new(Duration::from_secs(3600));
        assert!(t.series[0].len() as u64 <= TIMELINE_BUCKETS + 1);
        t.add(ACKS_TARGET, u64::MAX); // beyond the end: not counted
        t.add(ACKS_TARGET, 0);
        assert_eq!(t.series[ACKS_TARGET][0].load(Ordering::Relaxed), 1);
    }
}
