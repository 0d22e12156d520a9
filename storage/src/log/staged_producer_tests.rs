//! Staged idempotent batches: staged only when the producer state their publish will find
//! appends them, and, staged or not, the same outcomes and the same producer state as
//! appending every batch in order.

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;

use crate::batch::{encode_batch, BatchBuilder, Record};
use crate::config::TopicConfig;
use crate::error::StorageError;
use crate::log::{AppendInfo, LogOptions, PartitionLog};
use crate::producers::ProducerClock;

/// A log of entry clocks (a replicated partition's) with one published plain record.
fn replicated(dir: &std::path::Path) -> PartitionLog {
    let log =
        PartitionLog::open(dir, LogOptions::new("t", 0, &TopicConfig::default())).expect("open");
    log.use_entry_clock().expect("entry clock");
    let plain: Vec<Record> = vec![Record {
        key: None,
        value: Bytes::from_static(b"plain"),
        headers: vec![],
        timestamp_ms: 1,
    }];
    log.append(&encode_batch(&plain)).expect("append");
    log
}

/// Producer `id`'s batch of `count` records from sequence `seq` at `epoch`.
fn idempotent(id: i64, epoch: i16, seq: i32, count: usize) -> Bytes {
    let mut builder = BatchBuilder::new(BytesMut::new()).with_producer(id, epoch, seq);
    for i in 0..count {
        builder.push(None, format!("{id}-{seq}-{i}").as_bytes(), &[], 1);
    }
    builder.finish()
}

fn clock(now_ms: i64, cutoff_ms: i64) -> Option<ProducerClock> {
    Some(ProducerClock { now_ms, cutoff_ms })
}

fn stage_at(
    log: &PartitionLog,
    bytes: &Bytes,
    clock: Option<ProducerClock>,
) -> Option<crate::log::StagedBatch> {
    let checked = log.check_batch(bytes.clone()).expect("check");
    log.stage_at(&checked, clock).expect("stage")
}

#[test]
fn an_idempotent_batch_is_staged_when_the_state_its_publish_finds_appends_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = replicated(dir.path());
    let c = clock(10_000, 0);
    let first = stage_at(&log, &idempotent(7, 0, 0, 2), c).expect("the first is staged");
    let second = stage_at(&log, &idempotent(7, 0, 2, 3), c)
        .expect("the next in sequence after a staged batch is staged");
    assert_eq!((first.base_offset, second.base_offset), (1, 3));
    assert_eq!(
        stage_at(&log, &idempotent(7, 0, 0, 2), c),
        None,
        "a retry of a staged batch is left to its append"
    );
    assert_eq!(
        stage_at(&log, &idempotent(7, 0, 9, 1), c),
        None,
        "a sequence gap is left to its append"
    );
    assert_eq!(
        stage_at(&log, &idempotent(8, 0, 0, 1), None),
        None,
        "an idempotent batch without its entry's clock is not staged"
    );
    assert_eq!(
        log.producer_next_sequence(7),
        None,
        "staging records nothing"
    );

    assert_eq!(log.publish_staged(u64::MAX).expect("publish"), 6);
    assert_eq!(log.producer_next_sequence(7), Some((0, 5)));
    // A retry of the second, appended after its publish, gets its original offsets.
    let retry = log
        .append_verified_at(&idempotent(7, 0, 2, 3), c)
        .expect("retry");
    assert_eq!((retry.base_offset, retry.record_count), (3, 3));
    assert_eq!(log.high_watermark(), 6, "the retry appended nothing");
}

#[test]
fn a_log_of_local_clocks_stages_no_idempotent_batch() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = PartitionLog::open(dir.path(), LogOptions::new("t", 0, &TopicConfig::default()))
        .expect("open");
    log.append(&idempotent(1, 0, 0, 1)).expect("append");
    assert_eq!(stage_at(&log, &idempotent(1, 0, 1, 1), clock(1, 0)), None);
}

/// A producer idle past the cutoff that a batch staged before brings is expired for the
/// batches staged after it, as an append in order would find it, even when their own
/// clock is behind (a new leader's clock may lag the old one's; the state never moves back).
#[test]
fn the_clocks_of_the_batches_staged_before_expire_a_producer() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = replicated(dir.path());
    stage_at(&log, &idempotent(7, 0, 0, 1), clock(1_000, 0)).expect("staged");
    stage_at(&log, &idempotent(8, 0, 0, 1), clock(1_000_000, 500_000)).expect("staged");
    assert_eq!(
        stage_at(&log, &idempotent(7, 0, 1, 1), clock(1_001, 0)),
        None,
        "producer 7 expired by producer 8's clock: its sequence 1 is a gap"
    );
    stage_at(&log, &idempotent(7, 0, 0, 2), clock(1_002, 0))
        .expect("an expired producer starts again at 0");
    log.publish_staged(u64::MAX).expect("publish");
    assert_eq!(log.producer_next_sequence(7), Some((0, 2)));
}

/// A staged batch whose publish finds a verdict other than `Append` fences the partition
/// and publishes nothing: here restaged after a crash with a clock that expires its
/// producer, which no stage would have staged.
#[test]
fn a_staged_batch_the_state_refuses_at_its_publish_fences_the_partition() {
    let dir = tempfile::tempdir().expect("tempdir");
    let staged = {
        let log = replicated(dir.path());
        log.append_verified_at(&idempotent(7, 0, 0, 1), clock(1_000, 0))
            .expect("append");
        stage_at(&log, &idempotent(7, 0, 1, 1), clock(2_000, 0)).expect("staged")
        // dropped without a close: a crash
    };
    let log = PartitionLog::open(dir.path(), LogOptions::new("t", 0, &TopicConfig::default()))
        .expect("reopen");
    log.use_entry_clock().expect("entry clock");
    assert_eq!(
        log.restage_at(&[(staged, clock(9_000_000, 5_000_000))])
            .expect("restage"),
        1
    );
    let err = log.publish_staged(u64::MAX).expect_err("must fence");
    assert!(
        matches!(&err, StorageError::Fenced { topic, partition: 0, reason }
            if topic == "t" && reason.contains("producer 7")),
        "{err}"
    );
    assert!(log.fenced_reason().is_some());
    assert_eq!(log.high_watermark(), 2, "nothing was published");
}

/// One batch of the model: its producer, epoch, base sequence, record count, and how far
/// the leader's clock moved before it.
type Op = (i64, i16, i32, usize, i64);

fn op() -> impl Strategy<Value = Op> {
    // A step back is a new leader whose clock lags the old one's.
    let step = prop_oneof![Just(1i64), Just(50_000), Just(-60_000)];
    (0i64..3, 0i16..2, 0i32..8, 1usize..3, step)
}

/// What an append or a publish did with a batch.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    Appended(u64),
    Answered(u64),
    Refused,
}

fn append(log: &PartitionLog, bytes: &Bytes, clock: Option<ProducerClock>) -> Outcome {
    let before = log.high_watermark();
    match log.append_verified_at(bytes, clock) {
        Ok(AppendInfo { base_offset, .. }) if base_offset >= before => {
            Outcome::Appended(base_offset)
        }
        Ok(AppendInfo { base_offset, .. }) => Outcome::Answered(base_offset),
        Err(StorageError::ProducerRefused { .. }) => Outcome::Refused,
        Err(e) => panic!("append failed: {e}"),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Staging whatever the projection lets through, and appending the rest after
    /// publishing what is staged (as a replica applies an entry kept whole), gives every
    /// batch the outcome, and the log the producer state, of appending each batch in order.
    #[test]
    fn staging_idempotent_batches_decides_as_appending_them_in_order(
        ops in proptest::collection::vec(op(), 1..40),
        publish_every in 1usize..6,
    ) {
        let (da, db) = (tempfile::tempdir().expect("tempdir"), tempfile::tempdir().expect("tempdir"));
        let (a, b) = (replicated(da.path()), replicated(db.path()));
        let expiry_ms = 100_000;
        let mut now_ms = 1_000_000;
        for (i, (id, epoch, seq, count, step)) in ops.into_iter().enumerate() {
            now_ms += step;
            let c = clock(now_ms, now_ms - expiry_ms);
            let bytes = idempotent(id, epoch, seq, count);
            let want = append(&a, &bytes, c);
            let got = match stage_at(&b, &bytes, c) {
                Some(staged) => Outcome::Appended(staged.base_offset),
                None => {
                    b.publish_staged(u64::MAX).expect("publish");
                    append(&b, &bytes, c)
                }
            };
            prop_assert_eq!(got, want, "batch {} (producer {}, epoch {}, seq {})", i, id, epoch, seq);
            if i % publish_every == 0 {
                b.publish_staged(u64::MAX).expect("publish");
            }
        }
        b.publish_staged(u64::MAX).expect("publish");
        prop_assert_eq!(b.high_watermark(), a.high_watermark());
        for id in 0..3 {
            prop_assert_eq!(b.producer_next_sequence(id), a.producer_next_sequence(id));
        }
        prop_assert_eq!(b.producer_snapshot(), a.producer_snapshot());
    }
}
