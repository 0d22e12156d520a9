//! Process-wide durability statistics: how many group-commit syncs ran, how long they took
//! (a fixed-bucket histogram), and how many failed.
//!
//! Plain atomics, so the engine stays free of any metrics library: the broker's metrics
//! collector reads a [`SyncSnapshot`] at scrape time and encodes it. Recording costs three
//! relaxed atomic adds per sync, next to an fsync that takes far longer. The figures are
//! process-wide (one broker per process), so every partition's log shares them.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// The upper bounds of the sync-duration buckets, in seconds; a last, unbounded bucket
/// follows. From 100 µs (a sync with nothing to write) to 2.5 s (a struggling disk).
pub const SYNC_BUCKETS_SECONDS: [f64; 12] = [
    0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 2.5,
];

/// Counts of syncs and their durations. See [`sync_stats`] for the process's one instance.
#[derive(Debug)]
pub struct SyncStats {
    /// Per bucket (not cumulative): syncs whose duration fell in it; the last is unbounded.
    buckets: [AtomicU64; SYNC_BUCKETS_SECONDS.len() + 1],
    sum_nanos: AtomicU64,
    count: AtomicU64,
    errors: AtomicU64,
}

/// A consistent-enough copy of [`SyncStats`] for one scrape.
#[derive(Debug, Clone, PartialEq)]
pub struct SyncSnapshot {
    /// Syncs that completed, successfully or not.
    pub count: u64,
    /// Their total duration, in seconds.
    pub sum_seconds: f64,
    /// `(upper bound in seconds, syncs in this bucket)`, not cumulative; the last bound is
    /// infinity.
    pub buckets: Vec<(f64, u64)>,
    /// Syncs (and checkpoints) that failed, each of which fenced its partition.
    pub errors: u64,
}

static SYNC_STATS: SyncStats = SyncStats::new();

/// The process's sync statistics, recorded by every [`crate::PartitionLog`].
pub fn sync_stats() -> &'static SyncStats {
    &SYNC_STATS
}

impl SyncStats {
    const fn new() -> Self {
        SyncStats {
            buckets: [const { AtomicU64::new(0) }; SYNC_BUCKETS_SECONDS.len() + 1],
            sum_nanos: AtomicU64::new(0),
            count: AtomicU64::new(0),
            errors: AtomicU64::new(0),
        }
    }

    /// Records one sync that took `took`.
    pub fn record(&self, took: Duration) {
        let seconds = took.as_secs_f64();
        let bucket = SYNC_BUCKETS_SECONDS
            .iter()
            .position(|&upper| seconds <= upper)
            .unwrap_or(SYNC_BUCKETS_SECONDS.len());
        self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// Records one failed sync or checkpoint.
    pub fn record_error(&self) {
        self.errors.fetch_add(1, Ordering::Relaxed);
    }

    /// The figures now. The count is the buckets' sum, so the two always agree.
    pub fn snapshot(&self) -> SyncSnapshot {
        let buckets: Vec<(f64, u64)> = SYNC_BUCKETS_SECONDS
            .iter()
            .copied()
            .chain(std::iter::once(f64::INFINITY))
            .zip(&self.buckets)
            .map(|(upper, n)| (upper, n.load(Ordering::Relaxed)))
            .collect();
        SyncSnapshot {
            count: buckets.iter().map(|(_, n)| n).sum(),
            sum_seconds: self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9,
            buckets,
            errors: self.errors.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_land_in_their_bucket() {
        let stats = SyncStats::new();
        stats.record(Duration::from_micros(50));
        stats.record(Duration::from_millis(3));
        stats.record(Duration::from_secs(10));
        stats.record_error();
        let s = stats.snapshot();
        assert_eq!(s.count, 3);
        assert_eq!(s.errors, 1);
        assert_eq!(s.buckets[0], (0.0001, 1));
        assert_eq!(s.buckets[4], (0.005, 1), "3 ms is in the 5 ms bucket");
        assert_eq!(s.buckets.last().copied(), Some((f64::INFINITY, 1)));
        assert!((s.sum_seconds - 10.00305).abs() < 1e-6);
    }
}
