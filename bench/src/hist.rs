//! A fixed-size log-linear latency histogram (microseconds).
//!
//! Values below 256 are counted exactly; above, every power of two is split
//! into 128 equal buckets, so a reported quantile is within 0.4 % of a value
//! that was recorded (the bucket's midpoint is reported, clamped to the
//! recorded minimum and maximum). The histogram never grows: 7 424 buckets
//! cover all of `u64`, about 58 KiB.

/// log2 of the number of buckets per power of two.
const SUB_BITS: u32 = 7;
/// Buckets per power of two (also the first value that is not exact / 2).
const SUB: u64 = 1 << SUB_BITS;
/// Number of buckets covering `0..=u64::MAX`.
const BUCKETS: usize = ((64 - SUB_BITS) as usize) * SUB as usize + SUB as usize;

/// A latency histogram; see the module docs for its precision.
#[derive(Clone)]
pub struct Histogram {
    counts: Box<[u64]>,
    count: u64,
    sum: u128,
    min: u64,
    max: u64,
}

impl std::fmt::Debug for Histogram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Histogram")
            .field("count", &self.count)
            .field("min", &self.min)
            .field("max", &self.max)
            .finish()
    }
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram { counts: vec![0; BUCKETS].into_boxed_slice(), count: 0, sum: 0, min: u64::MAX, max: 0 }
    }
}

/// Bucket of a value.
fn index(v: u64) -> usize {
    if v < 2 * SUB {
        return v as usize;
    }
    let e = 63 - v.leading_zeros(); // ≥ SUB_BITS + 1
    let top = v >> (e - SUB_BITS); // in SUB..2*SUB
    ((e - SUB_BITS) as u64 * SUB + top) as usize
}

/// Smallest and largest value of a bucket.
fn bounds(i: usize) -> (u64, u64) {
    let i = i as u64;
    if i < 2 * SUB {
        return (i, i);
    }
    let shift = (i / SUB - 1) as u32;
    let top = i % SUB + SUB;
    let low = top << shift;
    (low, low + ((1u64 << shift) - 1))
}

impl Histogram {
    /// Counts one value.
    pub fn record(&mut self, v: u64) {
        self.counts[index(v)] += 1;
        self.count += 1;
        self.sum += u128::from(v);
        self.min = self.min.min(v);
        self.max = self.max.max(v);
    }

    /// Values recorded.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Largest value recorded (0 if none).
    pub fn max(&self) -> u64 {
        self.max
    }

    /// Smallest value recorded (0 if none).
    pub fn min(&self) -> u64 {
        if self.count == 0 { 0 } else { self.min }
    }

    /// Mean of the recorded values (0 if none).
    pub fn mean(&self) -> f64 {
        if self.count == 0 { 0.0 } else { self.sum as f64 / self.count as f64 }
    }

    /// The value at quantile `q` (0..=1): the smallest recorded value such
    /// that at least `q` of all values are at or below it, up to the bucket
    /// precision. 0 if nothing was recorded.
    pub fn quantile(&self, q: f64) -> u64 {
        if self.count == 0 {
            return 0;
        }
        let rank = ((q.clamp(0.0, 1.0) * self.count as f64).ceil() as u64).max(1);
        if rank >= self.count {
            return self.max;
        }
        let mut seen = 0;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                let (low, high) = bounds(i);
                return (low + (high - low) / 2).clamp(self.min, self.max);
            }
        }
        self.max
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_cover_every_value_in_order() {
        assert_eq!(index(u64::MAX), BUCKETS - 1);
        let mut prev_high = None;
        for i in 0..BUCKETS {
            let (low, high) = bounds(i);
            assert!(low <= high);
            assert_eq!(index(low), i, "low of {i}");
            assert_eq!(index(high), i, "high of {i}");
            if let Some(p) = prev_high {
                assert_eq!(low, p + 1, "bucket {i} starts right after the previous one");
            }
            prev_high = Some(high);
            // Relative width stays under 1/SUB.
            assert!((high - low) as f64 <= low as f64 / SUB as f64 + 1.0);
        }
        assert_eq!(prev_high, Some(u64::MAX));
    }

    #[test]
    fn quantiles_of_a_uniform_sample() {
        let mut h = Histogram::default();
        for v in 1..=100_000u64 {
            h.record(v);
        }
        assert_eq!(h.count(), 100_000);
        assert_eq!(h.min(), 1);
        assert_eq!(h.max(), 100_000);
        assert!((h.mean() - 50_000.5).abs() < 1e-6);
        for (q, exact) in [(0.5, 50_000.0), (0.9, 90_000.0), (0.99, 99_000.0), (0.999, 99_900.0)] {
            let got = h.quantile(q) as f64;
            assert!((got - exact).abs() / exact < 0.005, "q{q}: {got} vs {exact}");
        }
        assert_eq!(h.quantile(1.0), 100_000);
        assert_eq!(h.quantile(0.0), 1);
    }

    #[test]
    fn small_values_are_exact_and_outliers_show() {
        let mut h = Histogram::default();
        for _ in 0..99 {
            h.record(7);
        }
        h.record(5_000_000);
        assert_eq!(h.quantile(0.5), 7);
        assert_eq!(h.quantile(0.99), 7);
        assert_eq!(h.quantile(0.999), 5_000_000);
        assert_eq!(Histogram::default().quantile(0.5), 0);
        assert_eq!(Histogram::default().min(), 0);
    }
}
