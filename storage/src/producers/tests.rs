//! The producer state machine, its snapshot, and its rebuild from the log.

use bytes::{Bytes, BytesMut};

use super::*;
use crate::batch::{BatchBuilder, BatchHeader};
use crate::config::TopicConfig;
use crate::log::{LogOptions, PartitionLog};

/// An idempotent batch of `count` records.
fn batch(id: i64, epoch: i16, seq: i32, count: u32) -> Bytes {
    let mut b = BatchBuilder::new(BytesMut::new()).with_producer(id, epoch, seq);
    for i in 0..count {
        b.push(
            None,
            format!("v{seq}-{i}").as_bytes(),
            &[],
            crate::log::now_ms(),
        );
    }
    b.finish()
}

fn header(id: i64, epoch: i16, seq: i32, count: u32) -> BatchHeader {
    BatchHeader::parse(&batch(id, epoch, seq, count)).expect("header")
}

#[test]
fn the_next_sequence_appends_a_retry_is_a_duplicate_a_gap_is_refused() {
    let mut s = ProducerStates::default();
    assert_eq!(s.check(&header(7, 0, 0, 3)), Ok(Verdict::Append));
    s.apply(&header(7, 0, 0, 3), 100);
    assert_eq!(s.check(&header(7, 0, 3, 2)), Ok(Verdict::Append));
    s.apply(&header(7, 0, 3, 2), 103);
    match s.check(&header(7, 0, 0, 3)) {
        Ok(Verdict::Duplicate(b)) => assert_eq!((b.base_offset, b.record_count), (100, 3)),
        other => panic!("expected a duplicate, got {other:?}"),
    }
    assert_eq!(
        s.check(&header(7, 0, 6, 1)),
        Err(ProducerError::SequenceGap {
            producer_id: 7,
            expected: 5,
            received: 6
        })
    );
    // A new producer starts at 0.
    assert!(matches!(
        s.check(&header(8, 0, 4, 1)),
        Err(ProducerError::SequenceGap { expected: 0, .. })
    ));
}

/// The next sequence a producer's batch must start at is the one the check expects; a
/// stray answer (the first sequence of the last batch, or no wrap) is caught here.
#[test]
fn next_sequence_is_the_sequence_the_check_expects() {
    let mut s = ProducerStates::default();
    assert_eq!(s.next_sequence(7), None, "unknown: a new producer");
    s.apply(&header(7, 2, 0, 3), 0);
    assert_eq!(s.next_sequence(7), Some((2, 3)));
    assert_eq!(s.check(&header(7, 2, 3, 1)), Ok(Verdict::Append));
    s.apply(&header(7, 2, i32::MAX - 1, 2), 3);
    assert_eq!(s.next_sequence(7), Some((2, 0)), "wraps past i32::MAX");
}

#[test]
fn a_stale_epoch_is_refused_and_a_new_epoch_restarts_at_zero() {
    let mut s = ProducerStates::default();
    s.apply(&header(1, 2, 0, 1), 0);
    assert_eq!(
        s.check(&header(1, 1, 1, 1)),
        Err(ProducerError::StaleEpoch {
            producer_id: 1,
            epoch: 1,
            current: 2
        })
    );
    assert!(matches!(
        s.check(&header(1, 3, 5, 1)),
        Err(ProducerError::SequenceGap { expected: 0, .. })
    ));
    assert_eq!(s.check(&header(1, 3, 0, 1)), Ok(Verdict::Append));
    s.apply(&header(1, 3, 0, 1), 1);
    assert!(matches!(
        s.check(&header(1, 2, 1, 1)),
        Err(ProducerError::StaleEpoch { .. })
    ));
}

#[test]
fn sequences_wrap_from_i32_max_to_zero() {
    assert_eq!(advance(i32::MAX, 1), 0);
    assert_eq!(advance(i32::MAX - 1, 3), 1);
    let mut s = ProducerStates::default();
    // A producer whose state says it is near the top (as a long-lived one would be).
    s.apply(&header(5, 0, 0, 1), 0);
    let p = s.producers.get_mut(&5).expect("state");
    p.batches.back_mut().expect("batch").last_sequence = i32::MAX - 2;
    // Records MAX-1, MAX, 0, 1: the batch wraps.
    assert_eq!(s.check(&header(5, 0, i32::MAX - 1, 4)), Ok(Verdict::Append));
    s.apply(&header(5, 0, i32::MAX - 1, 4), 1);
    assert_eq!(s.check(&header(5, 0, 2, 1)), Ok(Verdict::Append));
    assert!(matches!(
        s.check(&header(5, 0, i32::MAX - 1, 4)),
        Ok(Verdict::Duplicate(_))
    ));
}

#[test]
fn bad_producer_fields_are_refused() {
    let s = ProducerStates::default();
    for (id, epoch, seq) in [(-2, 0, 0), (3, -1, 0), (3, 0, -1)] {
        assert!(
            matches!(
                s.check(&header(id, epoch, seq, 1)),
                Err(ProducerError::BadFields { .. })
            ),
            "{id} {epoch} {seq}"
        );
    }
    assert_eq!(s.check(&header(-1, -1, -1, 1)), Ok(Verdict::Append));
}

#[test]
fn only_the_last_five_batches_are_remembered() {
    let mut s = ProducerStates::default();
    for i in 0..7 {
        s.apply(&header(1, 0, i, 1), i as u64);
    }
    assert!(matches!(
        s.check(&header(1, 0, 2, 1)),
        Ok(Verdict::Duplicate(_))
    ));
    assert!(matches!(
        s.check(&header(1, 0, 1, 1)),
        Err(ProducerError::SequenceGap { .. })
    ));
}

#[test]
fn the_snapshot_round_trips_and_damage_is_detected() {
    let mut s = ProducerStates::default();
    for i in 0..3 {
        s.apply(&header(1, 0, i * 2, 2), i as u64 * 2);
        s.apply(&header(9, 4, i, 1), 100 + i as u64);
    }
    let bytes = s.encode_snapshot(42);
    assert_eq!(
        ProducerStates::decode_snapshot(&bytes),
        Some((s.clone(), 42))
    );
    for i in 0..bytes.len() {
        let mut bad = bytes.clone();
        bad[i] ^= 1;
        assert_eq!(ProducerStates::decode_snapshot(&bad), None, "byte {i}");
    }
    assert_eq!(
        ProducerStates::decode_snapshot(&bytes[..bytes.len() - 1]),
        None
    );
}

#[test]
fn idle_producers_expire() {
    let mut s = ProducerStates::default();
    let h = header(1, 0, 0, 1);
    s.apply(&h, 0);
    s.expire(h.max_timestamp + 1000, 1000);
    assert_eq!(s.len(), 1);
    s.expire(h.max_timestamp + 1001, 1000);
    assert!(s.is_empty());
}

/// A producer writing old timestamps (a backfill) counts as active at the broker's clock,
/// so it does not expire between two of its batches; one idle past the expiry is dropped at
/// its next batch, without waiting for a sweep.
#[test]
fn activity_counts_the_brokers_clock_and_one_idle_producer_expires_at_its_next_batch() {
    let mut s = ProducerStates::default();
    let old = header(1, 0, 0, 1);
    let now = old.max_timestamp + 10 * 24 * 3600 * 1000;
    s.apply_at(&old, 0, now);
    s.expire(now + 1000, 1000);
    assert_eq!(
        s.len(),
        1,
        "active at the broker's clock, whatever its timestamps"
    );
    s.apply_at(&header(2, 0, 0, 1), 1, now);
    s.expire_producer(1, now + 1001, 1000);
    assert_eq!(s.len(), 1, "producer 1 expired, producer 2 untouched");
    assert_eq!(
        s.check(&header(1, 0, 1, 1)),
        Err(ProducerError::SequenceGap {
            producer_id: 1,
            expected: 0,
            received: 1
        }),
        "an expired producer is unknown: it must start again at 0"
    );
    s.expire_producer(2, now + 1000, 1000);
    assert_eq!(s.len(), 1, "not idle past the expiry yet");
}

fn open(dir: &std::path::Path) -> PartitionLog {
    PartitionLog::open(dir, LogOptions::new("t", 0, &TopicConfig::default())).expect("open")
}

#[test]
fn a_retried_batch_gets_its_original_offsets_and_appends_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = open(dir.path());
    let first = log.append(&batch(3, 0, 0, 2)).expect("append");
    let second = log.append(&batch(3, 0, 2, 2)).expect("append");
    let retry = log.append(&batch(3, 0, 0, 2)).expect("retry");
    assert_eq!(retry.base_offset, first.base_offset);
    assert_eq!(log.high_watermark(), second.next_offset);
    let err = log.append(&batch(3, 0, 9, 1)).expect_err("gap");
    assert!(matches!(err, StorageError::ProducerRefused { .. }), "{err}");
    assert!(err.to_string().contains("expected 4, received 9"), "{err}");
    assert_eq!(
        log.high_watermark(),
        second.next_offset,
        "a refusal appends nothing"
    );
}

/// The state survives a crash (no clean close: rebuilt from the log) and a clean close
/// (rebuilt from the snapshot).
#[test]
fn the_state_is_rebuilt_after_a_crash_and_after_a_clean_close() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = open(dir.path());
    let first = log.append(&batch(3, 0, 0, 2)).expect("append");
    log.append(&batch(3, 0, 2, 2)).expect("append");
    log.flush().expect("flush");
    drop(log); // a crash: no clean-shutdown marker, no snapshot
    let log = open(dir.path());
    assert_eq!(
        log.append(&batch(3, 0, 0, 2)).expect("retry").base_offset,
        first.base_offset
    );
    assert!(log.append(&batch(3, 0, 5, 1)).is_err());
    log.append(&batch(3, 0, 4, 1)).expect("next");
    log.close().expect("close");
    assert!(dir.path().join(SNAPSHOT_FILE).exists());
    drop(log);
    let log = open(dir.path());
    assert!(matches!(
        log.append(&batch(3, 0, 5, 1)),
        Ok(info) if info.base_offset == 5
    ));
    assert!(log.append(&batch(3, 0, 4, 1)).expect("retry").base_offset == 4);
}

#[test]
fn a_snapshot_past_the_end_of_the_log_is_ignored() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = open(dir.path());
    log.append(&batch(3, 0, 0, 1)).expect("append");
    log.close().expect("close");
    drop(log);
    // A snapshot claiming state up to offset 1000, with a producer the log never saw.
    let mut s = ProducerStates::default();
    s.apply(&header(77, 0, 0, 1), 999);
    write_snapshot(dir.path(), &s, 1000).expect("write");
    let log = open(dir.path());
    assert!(
        log.append(&batch(77, 0, 1, 1)).is_err(),
        "77 is unknown here"
    );
    assert_eq!(log.append(&batch(3, 0, 0, 1)).expect("dup").base_offset, 0);
}
