//! A log of entry clocks ([`PartitionLog::use_entry_clock`]): producer expiry is decided by
//! the clock each append brings, never by this broker's, and a reopened log replaying its
//! entries holds the state the first applies left.

use bytes::{Bytes, BytesMut};

use super::*;
use crate::batch::{BatchBuilder, BatchHeader};
use crate::config::TopicConfig;
use crate::log::{LogOptions, PartitionLog};
use crate::StorageError;

/// Ten days ago, by this machine's clock: entries stamped then are long past any expiry
/// used here, so a decision by this broker's clock would differ from one by theirs.
fn long_ago() -> i64 {
    crate::log::now_ms() - 10 * 24 * 3600 * 1000
}

/// An idempotent batch of `count` records, all timestamped `ts_ms`.
fn batch_at(id: i64, seq: i32, count: u32, ts_ms: i64) -> Bytes {
    let mut b = BatchBuilder::new(BytesMut::new()).with_producer(id, 0, seq);
    for i in 0..count {
        b.push(None, format!("p{id}-{seq}-{i}").as_bytes(), &[], ts_ms);
    }
    b.finish()
}

/// A log of entry clocks in `dir`; this broker's own expiry (7 days) is never used.
fn open_entry_log(dir: &std::path::Path) -> PartitionLog {
    let log =
        PartitionLog::open(dir, LogOptions::new("t", 0, &TopicConfig::default())).expect("open");
    log.use_entry_clock().expect("entry clock");
    log
}

const EXPIRY_MS: u64 = 1000;

/// The leader found the producer idle past its expiry at this entry's clock: every replica
/// refuses its next sequence, however soon after the first batch it applies it by its own
/// clock (the bug: a replica applying at another time decided otherwise, and its offsets
/// then differed from the leader's).
#[test]
fn expiry_is_decided_by_the_entrys_clock_not_the_brokers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = open_entry_log(dir.path());
    let t = long_ago();
    let first = log
        .append_verified_at(&batch_at(1, 0, 2, t), Some(ProducerClock::at(t, EXPIRY_MS)))
        .expect("first");
    assert_eq!(first.base_offset, 0);
    // Within the expiry by the entries' clock (although ten days old by this broker's).
    let within = ProducerClock::at(t + EXPIRY_MS as i64 - 1, EXPIRY_MS);
    assert_eq!(
        log.append_verified_at(&batch_at(1, 2, 1, t), Some(within))
            .expect("within the expiry")
            .base_offset,
        2
    );
    // Past it by the entries' clock, a moment later by this broker's.
    let past = ProducerClock::at(t + 2 * EXPIRY_MS as i64 + 1, EXPIRY_MS);
    let refused = log.append_verified_at(&batch_at(1, 3, 1, t), Some(past));
    assert!(
        matches!(
            refused,
            Err(StorageError::ProducerRefused {
                source: ProducerError::SequenceGap {
                    expected: 0,
                    received: 3,
                    ..
                },
                ..
            })
        ),
        "expired at the entry's clock: {refused:?}"
    );
    assert_eq!(
        log.high_watermark(),
        3,
        "the refused batch appended nothing"
    );
    // An entry without a clock decides by the clock the state holds: expired still.
    assert!(log.append_verified_at(&batch_at(1, 3, 1, t), None).is_err());
    assert_eq!(
        log.append_verified_at(&batch_at(1, 0, 1, t), None)
            .expect("a fresh start at 0")
            .base_offset,
        3
    );
}

/// The appends of `entries` (producer, sequence, count, clock offset from `t`), each with
/// its entry's clock; returns their base offsets.
fn apply_all(log: &PartitionLog, t: i64, entries: &[(i64, i32, u32, i64)]) -> Vec<u64> {
    entries
        .iter()
        .map(|&(id, seq, count, dt)| {
            log.append_verified_at(
                &batch_at(id, seq, count, t),
                Some(ProducerClock::at(t + dt, EXPIRY_MS)),
            )
            .expect("append")
            .base_offset
        })
        .collect()
}

/// After a crash, the rebuild from the snapshot and the log, then the replay of the entries
/// (the Raft log's, from before the snapshot), gives back the state the first applies left,
/// clocks included: otherwise the next entry could be decided otherwise than on the
/// replicas that did not restart.
#[test]
fn a_reopened_log_replaying_its_entries_holds_the_state_the_applies_left() {
    let dir = tempfile::tempdir().expect("tempdir");
    let t = long_ago();
    // Producer 2 expires at the fourth entry's clock and starts again at 0; the fifth
    // entry's clock is older than the fourth's (a new leader's clock behind), so producer 1
    // counts as active at the state's clock, 1,500.
    let entries = [
        (1, 0, 2, 0),
        (2, 0, 1, 10),
        (1, 2, 1, 500),
        (2, 0, 3, 1500),
        (1, 3, 2, 1400),
        (2, 3, 1, 2000),
    ];
    let log = open_entry_log(dir.path());
    let offsets = apply_all(&log, t, &entries[..3]);
    assert_eq!(log.checkpoint_producers().expect("checkpoint"), 4);
    let offsets = [offsets, apply_all(&log, t, &entries[3..])].concat();
    let (live, end) = log.producer_snapshot().expect("whole");
    assert_eq!(end, 10);
    drop(log); // a crash: no close, no snapshot at the end

    // The mode is the log's own, from its folder: no call needed after the first.
    let log = PartitionLog::open(dir.path(), LogOptions::new("t", 0, &TopicConfig::default()))
        .expect("reopen");
    assert!(
        log.entry_clock(),
        "producer-clock-entries was not honoured at open"
    );
    let (rebuilt, _) = log.producer_snapshot().expect("whole");
    assert_ne!(
        rebuilt, live,
        "the batches past the snapshot lack their entries' clocks until replayed"
    );
    // The replica replays every entry past its Raft snapshot, some below the producer
    // snapshot's offset: those change nothing.
    for (&(id, seq, count, dt), &base) in entries.iter().zip(&offsets) {
        let header = BatchHeader::parse(&batch_at(id, seq, count, t)).expect("header");
        log.replay_entry(
            &header,
            Some(base),
            Some(ProducerClock::at(t + dt, EXPIRY_MS)),
        );
    }
    let (replayed, _) = log.producer_snapshot().expect("whole");
    assert_eq!(
        ProducerStates::decode_snapshot(&replayed),
        ProducerStates::decode_snapshot(&live)
    );
    // And the next entry is decided alike: producer 1 at 2,450 is within 1,000 of 1,500.
    let next = ProducerClock::at(t + 2450, EXPIRY_MS);
    assert_eq!(
        log.append_verified_at(&batch_at(1, 5, 1, t), Some(next))
            .expect("within the expiry")
            .base_offset,
        10
    );
}
