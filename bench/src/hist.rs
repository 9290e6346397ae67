//! A fixed-size log-linear latency histogram (HDR-style): 64 linear bins per power of two, so
//! every recorded value is reported within 1/64 (1.6 %) of its true value, in constant memory
//! and with one array increment per sample. Percentiles are reported as the upper bound of the
//! bin they fall in, so they are never optimistic.

/// Linear bins per octave, as a power of two.
const SUB_BITS: u32 = 6;
/// Values below this are recorded exactly.
const LINEAR: u64 = 1 << (SUB_BITS + 1);
/// Enough bins for any `u64`.
const BINS: usize = ((64 - SUB_BITS as usize) << SUB_BITS) + LINEAR as usize;

/// Latency samples in nanoseconds.
pub struct Histogram {
    bins: Vec<u64>,
    count: u64,
    max: u64,
}

impl Histogram {
    /// An empty histogram.
    pub fn new() -> Self {
        Histogram {
            bins: vec![0; BINS],
            count: 0,
            max: 0,
        }
    }

    fn index(v: u64) -> usize {
        if v < LINEAR {
            return v as usize;
        }
        let top = 63 - v.leading_zeros();
        let shift = top - SUB_BITS;
        // `v >> shift` keeps the top SUB_BITS+1 bits: a value in [2^SUB_BITS, 2^(SUB_BITS+1)).
        ((shift as usize) << SUB_BITS) + (v >> shift) as usize
    }

    /// Largest value that falls in bin `i`.
    fn upper(i: usize) -> u64 {
        if (i as u64) < LINEAR {
            return i as u64;
        }
        let shift = (i >> SUB_BITS) as u32 - 1;
        let mantissa = (i as u64 & ((1 << SUB_BITS) - 1)) | (1 << SUB_BITS);
        // In u128: the top bin's bound is 2^64 - 1, whose `+ 1` does not fit a u64.
        let up = ((u128::from(mantissa) + 1) << shift) - 1;
        u64::try_from(up).unwrap_or(u64::MAX)
    }

    /// Records one sample.
    pub fn record(&mut self, v: u64) {
        if let Some(bin) = self.bins.get_mut(Self::index(v)) {
            *bin += 1;
        }
        self.count += 1;
        self.max = self.max.max(v);
    }

    /// Number of samples.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Largest sample recorded.
    pub fn max(&self) -> u64 {
        self.max
    }

    /// The value at quantile `q` (0..=1): the upper bound of the bin holding the sample of that
    /// rank, capped at the true maximum; 0 when empty.
    pub fn quantile(&self, q: f64) -> u64 {
        if self.count == 0 {
            return 0;
        }
        let rank = ((q * self.count as f64).ceil() as u64).clamp(1, self.count);
        let mut seen = 0;
        for (i, n) in self.bins.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return Self::upper(i).min(self.max);
            }
        }
        self.max
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bins_are_contiguous_and_precise() {
        let mut last = 0;
        for v in (0..1_000_000u64).step_by(7).chain([u64::MAX / 2, u64::MAX]) {
            let i = Histogram::index(v);
            assert!(i >= last, "index not monotonic at {v}");
            assert!(i < BINS);
            let up = Histogram::upper(i);
            assert!(up >= v, "{v} above its bin's upper bound {up}");
            assert!((up - v) as f64 <= v as f64 / 64.0 + 1.0, "{v} -> {up}");
            last = i;
        }
    }

    #[test]
    fn quantiles_of_a_uniform_spread() {
        let mut h = Histogram::new();
        for v in 1..=10_000u64 {
            h.record(v * 1000);
        }
        let p50 = h.quantile(0.5) as f64;
        assert!((p50 - 5_000_000.0).abs() / 5_000_000.0 < 0.02, "{p50}");
        let p99 = h.quantile(0.99) as f64;
        assert!((p99 - 9_900_000.0).abs() / 9_900_000.0 < 0.02, "{p99}");
        assert_eq!(h.quantile(1.0), 10_000_000);
        assert_eq!(Histogram::new().quantile(0.5), 0);
    }
}
