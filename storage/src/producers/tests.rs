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
    s.advance(ProducerClock::at(1_700_000_000_000, 60_000));
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
    s.apply_at(&header(2, 0, 0, 1), 1, now + 1);
    s.advance(ProducerClock::at(now + 1001, 1000));
    s.expire_producer(2);
    assert_eq!(s.len(), 2, "producer 2 is not idle past the expiry yet");
    s.expire_producer(1);
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
}

/// The state's clock and cutoff only move forward: an append that brings an older clock
/// (a new leader whose clock is behind) neither revives a producer a sweep dropped nor
/// counts as older activity.
#[test]
fn the_clock_and_the_cutoff_never_move_back() {
    let mut s = ProducerStates::default();
    let h = header(1, 0, 0, 1);
    let t = h.max_timestamp + 10_000;
    assert_eq!(s.advance(ProducerClock::at(t, 1000)), t);
    assert_eq!(
        s.advance(ProducerClock::at(t - 5000, 1000)),
        t,
        "an older clock"
    );
    assert_eq!(s.cutoff_ms(), t - 1000);
    s.apply_at(&h, 0, s.clock_ms());
    s.advance(ProducerClock::at(t + 1001, 1000));
    s.sweep();
    assert!(s.is_empty(), "idle past the cutoff");
    s.advance(ProducerClock::at(t, 1000));
    assert_eq!(s.cutoff_ms(), t + 1, "the cutoff stays");
}

/// Replaying a log where a producer expired and started again at sequence 0 (same epoch)
/// forgets its batches before the restart, as the append that found it expired did; and a
/// replayed batch counts as active at the clock its entry brings when it is replayed.
#[test]
fn a_replay_forgets_the_batches_before_an_expiry_and_touch_brings_the_entrys_clock() {
    let mut live = ProducerStates::default();
    let first = header(1, 0, 0, 3);
    let t = first.max_timestamp + 10_000;
    live.advance(ProducerClock::at(t, 1000));
    live.apply_at(&first, 0, live.clock_ms());
    live.advance(ProducerClock::at(t + 2000, 1000));
    live.expire_producer(1);
    let again = header(1, 0, 0, 2);
    assert_eq!(live.check(&again), Ok(Verdict::Append));
    live.apply_at(&again, 3, live.clock_ms());

    // The rebuild from the log alone: no clocks, then the entries' clocks replayed.
    let mut rebuilt = ProducerStates::default();
    rebuilt.apply_at(&first, 0, i64::MIN);
    rebuilt.apply_at(&again, 3, i64::MIN);
    rebuilt.advance(ProducerClock::at(t, 1000));
    rebuilt.touch(&first);
    rebuilt.advance(ProducerClock::at(t + 2000, 1000));
    rebuilt.touch(&again);
    assert_eq!(rebuilt, live);
    assert_eq!(
        rebuilt.check(&header(1, 0, 0, 3)),
        Err(ProducerError::SequenceGap {
            producer_id: 1,
            expected: 2,
            received: 0
        }),
        "the batch before the expiry is not remembered"
    );
}

/// A version 1 snapshot (no clock) is still read, as a state that has seen no clock.
#[test]
fn a_version_1_snapshot_is_read_without_a_clock() {
    let mut s = ProducerStates::default();
    s.apply(&header(4, 1, 0, 2), 10);
    let v2 = s.encode_snapshot(12);
    // Version 1: the same bytes without the two clock fields, with its own CRC.
    let mut v1 = v2[..16].to_vec();
    v1[4] = 1;
    v1.extend_from_slice(&v2[32..v2.len() - 4]);
    let crc = crc32fast::hash(&v1);
    v1.extend_from_slice(&crc.to_le_bytes());
    assert_eq!(ProducerStates::decode_snapshot(&v1), Some((s, 12)));
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

proptest::proptest! {
    /// Any state, built by any appends and clocks, survives its snapshot's encoding.
    #[test]
    fn any_state_round_trips_through_its_snapshot(
        appends in proptest::collection::vec(
            (0i64..4, 0i16..3, 0i32..1000, 1u32..5, proptest::num::i64::ANY, 0u64..u64::MAX),
            0..40,
        ),
        offset in proptest::num::u64::ANY,
    ) {
        let mut s = ProducerStates::default();
        for (i, (id, epoch, seq, count, now, expiry)) in appends.into_iter().enumerate() {
            s.advance(ProducerClock::at(now, expiry));
            s.apply_at(&header(id, epoch, seq, count), i as u64 * 10, s.clock_ms());
        }
        let bytes = s.encode_snapshot(offset);
        proptest::prop_assert_eq!(ProducerStates::decode_snapshot(&bytes), Some((s, offset)));
    }
}
