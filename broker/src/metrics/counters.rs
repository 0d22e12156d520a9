//! Per-topic traffic counters, bumped on the produce and fetch paths and read by the metrics
//! collector at scrape time (and by DescribeTopic).
//!
//! Plain relaxed atomics held by each topic's serving state: a bump is two uncontended adds
//! with no lookup, no lock and no label hashing, whether or not metrics are served.

use std::sync::atomic::{AtomicU64, Ordering};

/// Records and bytes produced to and fetched from one topic since the broker started (or
/// since the topic was created, if later).
#[derive(Debug, Default)]
pub struct TopicCounters {
    records_produced: AtomicU64,
    bytes_produced: AtomicU64,
    records_fetched: AtomicU64,
    bytes_fetched: AtomicU64,
}

/// A copy of [`TopicCounters`] at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TopicTraffic {
    /// Records appended.
    pub records_produced: u64,
    /// Stored batch bytes appended.
    pub bytes_produced: u64,
    /// Records returned by fetches.
    pub records_fetched: u64,
    /// Stored batch bytes read to serve fetches.
    pub bytes_fetched: u64,
}

impl TopicCounters {
    /// Counts one appended batch of `records` records and `bytes` bytes.
    pub fn produced(&self, records: u64, bytes: u64) {
        self.records_produced.fetch_add(records, Ordering::Relaxed);
        self.bytes_produced.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Counts one fetch that returned `records` records read from `bytes` stored bytes.
    pub fn fetched(&self, records: u64, bytes: u64) {
        if records > 0 || bytes > 0 {
            self.records_fetched.fetch_add(records, Ordering::Relaxed);
            self.bytes_fetched.fetch_add(bytes, Ordering::Relaxed);
        }
    }

    /// The counts now.
    pub fn get(&self) -> TopicTraffic {
        TopicTraffic {
            records_produced: self.records_produced.load(Ordering::Relaxed),
            bytes_produced: self.bytes_produced.load(Ordering::Relaxed),
            records_fetched: self.records_fetched.load(Ordering::Relaxed),
            bytes_fetched: self.bytes_fetched.load(Ordering::Relaxed),
        }
    }
}
