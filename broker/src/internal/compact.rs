//! Compaction of the broker's keyed state topics (`__subscriptions`, `__security`,
//! `__producers`): what the three share.
//!
//! A state topic grows by one record per change. Once it has grown by about a segment since
//! its last compaction ([`Growth`]; `__security` and `__producers` check it after each
//! change with [`compact_if_due`]; `__subscriptions` counts from the log with [`bytes_from`]
//! when opened and compacts from a background task), its writer (the single broker, or in a cluster the
//! settled leader of the topic's one partition, holding the state's writer lock throughout so
//! no change lands between) appends a **rewrite** of the latest state in batches of about a quarter segment,
//! each one durable commit ([`rewrite`]), then a **marker** record holding the offset where
//! the rewrite began. Every replica, the single broker too, deletes its own sealed segments
//! that end before that offset when its tail of the log reads the marker ([`delete_before`]),
//! so the topic stays bounded and no replica deletes what another still reads.
//!
//! What makes it safe is owned by each topic (its module doc argues it): replay of the
//! records from any later log start, through the whole rewrite, must give the state the
//! rewrite restated; and a rewrite cut short (a crash, a leader change) leaves batches
//! without a marker, so nothing is deleted for it and replay over them must change nothing.

use bytes::Bytes;
use rill_storage::batch::Record;
use rill_storage::PartitionLog;

use crate::error::BrokerError;
use crate::state::Broker;

/// The default segment size of `__security` and `__producers` (`--state-segment-bytes`):
/// each is compacted once it has grown by about this much since its last compaction.
pub const DEFAULT_STATE_SEGMENT_BYTES: u64 = 1 << 20;

/// How much a state topic grew since its last compaction marker, as its tail of the log read
/// it (every writer's records, so a new leader or a restarted broker knows it too), and when
/// its writer compacts next.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Growth {
    /// Bytes of the records read after the last marker (all read, if none).
    since_marker_bytes: u64,
    /// After a failed compaction: the growth at which the next is tried, so a failing one is
    /// not retried at every change.
    retry_at_bytes: u64,
}

impl Growth {
    /// Counts a read of the log: `bytes` read after its last marker, if it read one
    /// (`marker_read`), else all it read.
    pub fn read(&mut self, marker_read: bool, bytes: u64) {
        if marker_read {
            *self = Growth {
                since_marker_bytes: bytes,
                retry_at_bytes: 0,
            };
        } else {
            self.since_marker_bytes += bytes;
        }
    }

    /// Whether the topic grew by `threshold_bytes` (a segment) since its last compaction.
    pub fn due(&self, threshold_bytes: u64) -> bool {
        self.since_marker_bytes >= threshold_bytes.max(self.retry_at_bytes)
    }

    /// A compaction failed: the next is tried once the topic grew by `threshold_bytes` more.
    pub fn failed(&mut self, threshold_bytes: u64) {
        self.retry_at_bytes = self.since_marker_bytes.saturating_add(threshold_bytes);
    }
}

/// After a change its writer committed (holding the topic's writer lock): compacts the
/// topic with `compact` when its growth, `growth(tail)` of the tail's lock, reached
/// `threshold_bytes` (a segment; tests hold it off) since the last compaction. The change is
/// stored whatever happens here: a compaction cut short changes nothing (each topic's module
/// doc argues it), so a failure is logged and the next is tried a threshold later.
pub async fn compact_if_due<T, F, Fut>(
    topic: &str,
    threshold_bytes: &std::sync::atomic::AtomicU64,
    tail: &parking_lot::Mutex<T>,
    growth: fn(&mut T) -> &mut Growth,
    compact: F,
) where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Result<(), BrokerError>>,
{
    let threshold_bytes = threshold_bytes.load(std::sync::atomic::Ordering::Relaxed);
    if !growth(&mut tail.lock()).due(threshold_bytes) {
        return;
    }
    if let Err(e) = compact().await {
        tracing::warn!(error = %e, "{topic} compaction failed");
        growth(&mut tail.lock()).failed(threshold_bytes);
    }
}

/// The bytes of `log`'s batches from the one holding offset `from` (or its log start, if
/// later) to its end: a state topic's growth since its last marker, read from the log when a
/// writer starts (a restarted broker, a new leader). Blocking: it reads those batches, about
/// a segment's worth when the topic is compacted on time.
pub fn bytes_from(log: &PartitionLog, from: u64) -> Result<u64, BrokerError> {
    let mut offset = from.max(log.log_start_offset());
    let mut bytes = 0u64;
    while offset < log.high_watermark() {
        let read = log.read(offset, BYTES_FROM_READ_BYTES)?;
        bytes += read.size_bytes() as u64;
        if read.next_offset <= offset {
            break;
        }
        offset = read.next_offset;
    }
    Ok(bytes)
}

/// How much [`bytes_from`] reads per call.
const BYTES_FROM_READ_BYTES: usize = 4 << 20;

/// The bytes a record adds to a batch, near enough for sizing one.
pub fn record_bytes(record: &Record) -> usize {
    record.value.len() + record.key.as_ref().map_or(0, Bytes::len)
}

/// Packs `groups` of records, in order, into batches of about `limit_bytes`: each group
/// whole in one batch (a group is what must never be split by a crash between batches), a
/// group larger than the limit in a batch of its own.
pub fn pack(groups: impl IntoIterator<Item = Vec<Record>>, limit_bytes: usize) -> Vec<Vec<Record>> {
    let mut batches = Vec::new();
    let mut batch: Vec<Record> = Vec::new();
    let mut batch_bytes = 0usize;
    for group in groups {
        let bytes: usize = group.iter().map(record_bytes).sum();
        if !batch.is_empty() && batch_bytes + bytes > limit_bytes {
            batches.push(std::mem::take(&mut batch));
            batch_bytes = 0;
        }
        batch_bytes += bytes;
        batch.extend(group);
    }
    if !batch.is_empty() {
        batches.push(batch);
    }
    batches
}

/// Appends the rewrite `batches` to partition 0 of the state topic `topic`, each a durable
/// commit (a Raft commit in a cluster, see [`crate::internal::append`]), then the marker
/// `marker(start)`, where `start` is the offset of the rewrite's first record, or `end` (the
/// log's end before the rewrite) when there is nothing to rewrite. Returns `start`. The
/// caller holds the topic's writer lock throughout. Deleting the segments before `start` is
/// left to whoever tails the log ([`delete_before`]): one deleter per log.
pub async fn rewrite(
    broker: &Broker,
    topic: &str,
    batches: Vec<Vec<Record>>,
    end: u64,
    marker: impl FnOnce(u64) -> Record,
) -> Result<u64, BrokerError> {
    let mut start = None;
    for batch in batches {
        let encoded = rill_storage::batch::try_encode_batch(&batch)
            .map_err(|e| BrokerError::Internal(format!("cannot build a {topic} batch: {e}")))?;
        let base_offset = crate::internal::append_batch_at(broker, topic, 0, encoded).await?;
        start.get_or_insert(base_offset);
    }
    let start = start.unwrap_or(end);
    crate::internal::append(broker, topic, 0, vec![marker(start)]).await?;
    Ok(start)
}

/// A record of a state topic, keyed or not, stamped now.
pub fn record(key: Option<Bytes>, value: Bytes) -> Record {
    Record {
        key,
        value,
        headers: Vec::new(),
        timestamp_ms: rill_storage::log::now_ms(),
    }
}

/// Deletes the sealed segments of `topic`'s `log` that end before `start` (a compaction's
/// first offset); returns how many. A failure is logged and leaves them for the next marker.
/// Blocking.
pub fn delete_before(topic: &str, log: &PartitionLog, start: u64) -> u32 {
    match log.delete_segments_before(start) {
        Ok(deleted) => {
            if deleted.deleted_segments > 0 {
                tracing::info!(
                    topic,
                    start,
                    deleted_segments = deleted.deleted_segments,
                    "segments before a compaction deleted"
                );
            }
            deleted.deleted_segments
        }
        Err(e) => {
            tracing::warn!(topic, start, error = %e, "cannot delete the segments a compaction replaced; the next one retries");
            0
        }
    }
}

/// Test support: copies the batches of `from` in `offsets` to `to`, as a replica's apply
/// appends them.
#[cfg(test)]
pub(crate) fn copy_batches(from: &PartitionLog, offsets: std::ops::Range<u64>, to: &PartitionLog) {
    let mut at = offsets.start;
    while at < offsets.end {
        let read = from.read(at, 1 << 20).expect("read");
        for chunk in &read.chunks {
            for batch in rill_storage::batch::batches(chunk) {
                let batch = batch.expect("a batch");
                let base = batch.header().base_offset;
                if base >= at && base < offsets.end {
                    let appended = to
                        .append(&Bytes::copy_from_slice(batch.as_bytes()))
                        .expect("append");
                    assert_eq!(appended.base_offset, base, "the replica's offsets match");
                }
            }
        }
        if read.next_offset <= at {
            break;
        }
        at = read.next_offset;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(n: usize, bytes: usize) -> Vec<Record> {
        (0..n)
            .map(|_| record(None, Bytes::from(vec![0u8; bytes])))
            .collect()
    }

    #[test]
    fn growth_counts_from_the_last_marker_and_backs_off_after_a_failure() {
        let mut g = Growth::default();
        g.read(false, 600);
        assert!(!g.due(1000));
        g.read(false, 500);
        assert!(g.due(1000), "1100 bytes since no marker");
        g.failed(1000);
        g.read(false, 100);
        assert!(!g.due(1000), "a failed compaction waits a threshold more");
        g.read(false, 1000);
        assert!(g.due(1000));
        g.read(true, 10);
        assert!(!g.due(1000), "a marker restarts the count");
        assert_eq!(
            g,
            Growth {
                since_marker_bytes: 10,
                retry_at_bytes: 0
            }
        );
    }

    /// The trigger both state topics share: no compaction below the threshold, one at it;
    /// after a failed one, none until the topic grew by a threshold more; none while the
    /// threshold is held off.
    #[tokio::test]
    async fn compacts_when_due_and_backs_off_a_threshold_after_a_failure() {
        use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
        let threshold = AtomicU64::new(1000);
        let tail = parking_lot::Mutex::new(Growth::default());
        let calls = AtomicU32::new(0);
        let counted = &calls;
        let run = |ok: bool| {
            compact_if_due(
                "t",
                &threshold,
                &tail,
                |g| g,
                move || async move {
                    counted.fetch_add(1, Ordering::Relaxed);
                    if ok {
                        Ok(())
                    } else {
                        Err(BrokerError::Internal("no space".into()))
                    }
                },
            )
        };
        tail.lock().read(false, 999);
        run(true).await;
        assert_eq!(calls.load(Ordering::Relaxed), 0, "below the threshold");
        tail.lock().read(false, 1);
        run(false).await;
        assert_eq!(calls.load(Ordering::Relaxed), 1, "at the threshold");
        tail.lock().read(false, 999);
        run(true).await;
        assert_eq!(
            calls.load(Ordering::Relaxed),
            1,
            "backing off after the failure"
        );
        tail.lock().read(false, 1);
        run(true).await;
        assert_eq!(
            calls.load(Ordering::Relaxed),
            2,
            "a threshold after the failure"
        );
        threshold.store(u64::MAX, Ordering::Relaxed);
        tail.lock().read(false, 1 << 40);
        run(true).await;
        assert_eq!(calls.load(Ordering::Relaxed), 2, "held off");
    }

    #[test]
    fn groups_stay_whole_and_batches_stay_near_the_limit() {
        let batches = pack(
            vec![group(2, 10), group(1, 10), group(3, 10), group(1, 100)],
            40,
        );
        let sizes: Vec<usize> = batches.iter().map(Vec::len).collect();
        // 20 + 10 fit; the group of 3 (30) would pass 40: a new batch; the big group alone.
        assert_eq!(sizes, vec![3, 3, 1]);
        assert!(pack(Vec::<Vec<Record>>::new(), 40).is_empty());
    }
}
