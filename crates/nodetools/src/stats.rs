//! Latency percentiles and the etcd verdict. Pure.

use serde::{Deserialize, Serialize};

/// etcd's documented minimum: the 99th percentile of WAL fdatasync must stay
/// under 10 ms, otherwise heartbeats are missed and leaders flap.
pub const ETCD_P99_LIMIT_NS: u64 = 10_000_000;
/// What the seed calls good (local NVMe): p99 under 2 ms.
pub const ETCD_P99_GOOD_NS: u64 = 2_000_000;

/// Nearest-rank percentile of an ascending-sorted slice: the smallest sample
/// such that at least `p` percent of all samples are less than or equal to it.
/// This is the definition fio uses (it walks its histogram until the running
/// count reaches `p/100 * n`), so the two agree up to fio's bucket width.
/// Returns `None` for an empty slice; `p` is clamped to (0, 100].
pub fn percentile(sorted: &[u64], p: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let n = sorted.len();
    let p = p.clamp(0.0, 100.0);
    // rank in 1..=n; the small epsilon keeps e.g. 0.99*100 = 98.99999 from rounding up to 100.
    let rank = ((p / 100.0) * n as f64 - 1e-9).ceil().max(1.0) as usize;
    Some(sorted[rank.min(n) - 1])
}

/// Summary of a set of latency samples in nanoseconds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LatencySummary {
    pub count: u64,
    pub min_ns: u64,
    pub mean_ns: u64,
    pub p50_ns: u64,
    pub p90_ns: u64,
    pub p99_ns: u64,
    pub p99_9_ns: u64,
    pub max_ns: u64,
}

/// Sorts `samples` in place and summarizes them; `None` when empty.
pub fn summarize(samples: &mut [u64]) -> Option<LatencySummary> {
    if samples.is_empty() {
        return None;
    }
    samples.sort_unstable();
    let sum: u128 = samples.iter().map(|&s| s as u128).sum();
    let pc = |p| percentile(samples, p).expect("non-empty");
    Some(LatencySummary {
        count: samples.len() as u64,
        min_ns: samples[0],
        mean_ns: (sum / samples.len() as u128) as u64,
        p50_ns: pc(50.0),
        p90_ns: pc(90.0),
        p99_ns: pc(99.0),
        p99_9_ns: pc(99.9),
        max_ns: *samples.last().expect("non-empty"),
    })
}

/// How a disk's fdatasync p99 rates for etcd.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FsyncVerdict {
    /// p99 < 2 ms: what the seed calls good (local NVMe).
    Good,
    /// 2 ms <= p99 < 10 ms: meets etcd's minimum, but leaves little headroom.
    Acceptable,
    /// p99 >= 10 ms: below etcd's minimum; expect leader elections under load.
    TooSlow,
}

impl FsyncVerdict {
    pub fn from_p99(p99_ns: u64) -> Self {
        if p99_ns < ETCD_P99_GOOD_NS {
            FsyncVerdict::Good
        } else if p99_ns < ETCD_P99_LIMIT_NS {
            FsyncVerdict::Acceptable
        } else {
            FsyncVerdict::TooSlow
        }
    }

    pub fn explain(self) -> &'static str {
        match self {
            FsyncVerdict::Good => "GOOD: fdatasync p99 is under 2 ms, fine for etcd",
            FsyncVerdict::Acceptable => {
                "ACCEPTABLE: fdatasync p99 is under etcd's 10 ms minimum but above the 2 ms the seed calls good; put etcd on a faster local disk (NVMe) for headroom"
            }
            FsyncVerdict::TooSlow => {
                "TOO SLOW: fdatasync p99 is at or above etcd's 10 ms minimum; etcd will miss heartbeats and elect leaders under load. Move etcd's data dir to a local SSD/NVMe disk without noisy neighbours"
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_on_known_data() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 50.0), Some(50));
        assert_eq!(percentile(&v, 90.0), Some(90));
        assert_eq!(percentile(&v, 99.0), Some(99));
        assert_eq!(percentile(&v, 99.9), Some(100));
        assert_eq!(percentile(&v, 100.0), Some(100));
        assert_eq!(percentile(&v, 0.0), Some(1));
        assert_eq!(percentile(&v, 1.0), Some(1));
        assert_eq!(percentile(&v, 1.5), Some(2));
        // 1000 samples: p99.9 is the 999th.
        let v: Vec<u64> = (1..=1000).collect();
        assert_eq!(percentile(&v, 99.9), Some(999));
        assert_eq!(percentile(&v, 99.0), Some(990));
        // tiny sets
        assert_eq!(percentile(&[7], 50.0), Some(7));
        assert_eq!(percentile(&[1, 2], 50.0), Some(1));
        assert_eq!(percentile(&[1, 2], 51.0), Some(2));
        assert_eq!(percentile(&[], 50.0), None);
    }

    #[test]
    fn summary_sorts_and_computes() {
        // A skewed distribution: 990 fast syncs and 10 slow ones.
        let mut v: Vec<u64> = Vec::new();
        for i in 0..990 {
            v.push(100_000 + i);
        }
        for i in 0..10 {
            v.push(20_000_000 + i);
        }
        v.reverse();
        let s = summarize(&mut v).unwrap();
        assert_eq!(s.count, 1000);
        assert_eq!(s.min_ns, 100_000);
        assert_eq!(s.max_ns, 20_000_009);
        assert_eq!(s.p50_ns, 100_499);
        assert_eq!(s.p90_ns, 100_899);
        assert_eq!(s.p99_ns, 100_989); // the 990th sample is still fast
        assert_eq!(s.p99_9_ns, 20_000_008);
        assert_eq!(s.mean_ns, (990 * 100_000 + (0..990).sum::<u64>() + 10 * 20_000_000 + 45) / 1000);
        assert!(summarize(&mut []).is_none());
    }

    #[test]
    fn verdict_thresholds() {
        assert_eq!(FsyncVerdict::from_p99(0), FsyncVerdict::Good);
        assert_eq!(FsyncVerdict::from_p99(1_999_999), FsyncVerdict::Good);
        assert_eq!(FsyncVerdict::from_p99(2_000_000), FsyncVerdict::Acceptable);
        assert_eq!(FsyncVerdict::from_p99(9_999_999), FsyncVerdict::Acceptable);
        assert_eq!(FsyncVerdict::from_p99(10_000_000), FsyncVerdict::TooSlow);
        assert_eq!(FsyncVerdict::from_p99(u64::MAX), FsyncVerdict::TooSlow);
    }
}
