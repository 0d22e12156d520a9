//! Adopting another replica's producer state: the round trip from a source log to a
//! restarted one, what the adopted state answers, and that it survives a reopen and a crash.

use bytes::{Bytes, BytesMut};

use super::*;
use crate::batch::{encode_batch, BatchBuilder, Record};
use crate::config::TopicConfig;
use crate::log::LogOptions;
use crate::producers::{BASE_FILE, SNAPSHOT_FILE};

/// Small segments, so a few appends make several of them.
fn open(dir: &std::path::Path) -> PartitionLog {
    let config = TopicConfig::default().segment_bytes(4096);
    PartitionLog::open(dir, LogOptions::new("t", 0, &config)).expect("open")
}

fn plain(value: &'static [u8]) -> Bytes {
    encode_batch(&[Record {
        key: None,
        value: Bytes::from_static(value),
        headers: vec![],
        timestamp_ms: 1,
    }])
}

/// A one-record batch of producer `id` (epoch 0) at `sequence`.
fn idempotent(id: i64, sequence: i32) -> Bytes {
    let mut builder = BatchBuilder::new(BytesMut::new()).with_producer(id, 0, sequence);
    builder.push(None, b"p", &[], 1);
    builder.finish()
}

/// The raw stored batches of `log` from `offset` on, as a catch-up pull copies them.
fn batches_from(log: &PartitionLog, offset: u64) -> Vec<Vec<u8>> {
    let read = log.read(offset, 1 << 20).expect("read");
    let mut out = Vec::new();
    for chunk in &read.chunks {
        for view in crate::batch::batches(chunk) {
            let view = view.expect("valid");
            if view.header().base_offset >= offset {
                out.push(view.as_bytes().to_vec());
            }
        }
    }
    out
}

/// A source log: producer 9's batches at offsets 0..3 (sequences 0..3), then 20 plain
/// records of 1 KiB (several segments), then producer 10's batch at 23.
fn source(dir: &std::path::Path) -> PartitionLog {
    let log = open(dir);
    for sequence in 0..3 {
        log.append(&idempotent(9, sequence)).expect("append");
    }
    for _ in 0..20 {
        log.append(&encode_batch(&[Record {
            key: None,
            value: Bytes::from(vec![7u8; 1024]),
            headers: vec![],
            timestamp_ms: 1,
        }]))
        .expect("append");
    }
    log.append(&idempotent(10, 0)).expect("append");
    assert_eq!(log.high_watermark(), 24);
    log
}

/// A replica's log restarted at 20 (the source's batches below it deleted) holding the
/// source's copies from 20 up to `until`.
fn restarted_copy(dir: &std::path::Path, from: &PartitionLog, until: u64) -> PartitionLog {
    let log = open(dir);
    log.restart_at(20).expect("restart");
    for batch in batches_from(from, 20) {
        if log.high_watermark() < until {
            log.append_copy(&batch).expect("copy");
        }
    }
    assert_eq!(log.high_watermark(), until);
    log
}

/// What producer 9's batches answer on `log`: a retry of sequence 0 is a duplicate with its
/// original offset (nothing appended), and sequence 3 is the next one.
fn assert_producer_9_goes_on(log: &PartitionLog) {
    let end = log.high_watermark();
    let retry = log.append(&idempotent(9, 0)).expect("a retry");
    assert_eq!(
        (retry.base_offset, log.high_watermark()),
        (0, end),
        "the retry of a batch below the restart offset was not recognised"
    );
    let next = log.append(&idempotent(9, 3)).expect("the next sequence");
    assert_eq!(next.base_offset, end);
}

#[test]
fn a_restarted_log_adopts_its_sources_state_and_answers_as_the_source() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = source(&dir.path().join("src"));
    let (bytes, offset) = src.producer_snapshot().expect("a whole state");
    assert_eq!(offset, 24);
    let log = restarted_copy(&dir.path().join("dst"), &src, 24);
    assert!(log.producer_state_missing());
    assert!(
        log.producer_snapshot().is_none(),
        "an incomplete state is not passed on"
    );
    // Before: the copies' state knows producer 10 only.
    assert_eq!(log.producer_next_sequence(9), None);
    assert_eq!(log.restore_producers(&bytes).expect("restore"), 24);
    assert!(!log.producer_state_missing());
    assert_eq!(log.producer_next_sequence(9), Some((0, 3)));
    assert_eq!(log.producer_next_sequence(10), Some((0, 1)));
    // The same answers as the source gives.
    let on_source = src.append(&idempotent(9, 0)).expect("retry on the source");
    assert_eq!(on_source.base_offset, 0);
    assert_producer_9_goes_on(&log);
    assert_eq!(log.producer_snapshot().map(|(_, o)| o), Some(25));
}

#[test]
fn the_batches_held_past_the_adopted_offset_are_replayed_on_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = source(&dir.path().join("src"));
    // The state was read at 23, before producer 10's batch; this replica holds it already.
    let dst = restarted_copy(&dir.path().join("dst"), &src, 24);
    let bytes = {
        let partial = open(&dir.path().join("partial"));
        for sequence in 0..3 {
            partial.append(&idempotent(9, sequence)).expect("append");
        }
        let (states, _) =
            ProducerStates::decode_snapshot(&partial.producer_snapshot().expect("state").0)
                .expect("decode");
        states.encode_snapshot(23)
    };
    assert_eq!(dst.restore_producers(&bytes).expect("restore"), 23);
    assert_eq!(dst.producer_next_sequence(9), Some((0, 3)));
    assert_eq!(
        dst.producer_next_sequence(10),
        Some((0, 1)),
        "the batch past the adopted offset was not replayed"
    );
}

#[test]
fn an_adopted_state_survives_a_crash_and_an_unusable_snapshot() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = source(&dir.path().join("src"));
    let path = dir.path().join("dst");
    let log = restarted_copy(&path, &src, 24);
    let (bytes, _) = src.producer_snapshot().expect("state");
    log.restore_producers(&bytes).expect("restore");
    assert!(path.join(BASE_FILE).exists());
    assert!(!path.join(MISSING_FILE).exists());
    drop(log); // a crash: no clean close
    let log = open(&path);
    assert!(!log.producer_state_missing());
    assert_eq!(log.producer_next_sequence(9), Some((0, 3)));
    drop(log);

    // A snapshot the open cannot use (damaged; or past the recovered end, which a crash can
    // leave): the adopted state and a replay of the batches after it rebuild the state.
    std::fs::write(path.join(SNAPSHOT_FILE), b"damaged").expect("damage");
    let log = open(&path);
    assert_eq!(log.producer_next_sequence(9), Some((0, 3)));
    assert_eq!(log.producer_next_sequence(10), Some((0, 1)));
    assert_producer_9_goes_on(&log);
}

#[test]
fn a_restart_reports_the_state_missing_across_a_crash_and_a_cut_short_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = open(dir.path());
    log.append(&idempotent(9, 0)).expect("append");
    assert!(!log.producer_state_missing());
    log.restart_at(20).expect("restart");
    assert!(log.producer_state_missing());
    drop(log);
    let log = open(dir.path());
    assert!(log.producer_state_missing(), "the marker did not survive");
    drop(log);

    // A crash right after the restart marker (before anything else was written): the open
    // completing the restart marks the state missing too.
    let other = tempfile::tempdir().expect("tempdir");
    let log = open(other.path());
    log.append(&idempotent(9, 0)).expect("append");
    log.close().expect("close");
    drop(log);
    crate::recovery::write_restart_marker(other.path(), 30).expect("marker");
    let log = open(other.path());
    assert_eq!(log.log_start_offset(), 30);
    assert!(log.producer_state_missing());
}

#[test]
fn a_state_outside_the_log_or_damaged_is_refused_and_changes_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = source(&dir.path().join("src"));
    let (bytes, _) = src.producer_snapshot().expect("state");
    // This replica holds 20..22 only: a state as of 24 covers batches it lacks.
    let log = restarted_copy(&dir.path().join("dst"), &src, 22);
    assert!(matches!(
        log.restore_producers(&bytes),
        Err(StorageError::OffsetOutOfRange { offset: 24, .. })
    ));
    // A state as of 10 misses the batches 10..20, deleted here.
    let (states, _) = ProducerStates::decode_snapshot(&bytes).expect("decode");
    assert!(matches!(
        log.restore_producers(&states.encode_snapshot(10)),
        Err(StorageError::OffsetOutOfRange { offset: 10, .. })
    ));
    let mut damaged = bytes.clone();
    damaged[20] ^= 1;
    assert!(matches!(
        log.restore_producers(&damaged),
        Err(StorageError::InvalidProducerState { .. })
    ));
    assert!(log.producer_state_missing());
    assert_eq!(log.producer_next_sequence(9), None);
    assert!(!dir.path().join("dst").join(BASE_FILE).exists());
}

#[test]
fn a_new_restart_drops_an_adopted_state() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = source(&dir.path().join("src"));
    let path = dir.path().join("dst");
    let log = restarted_copy(&path, &src, 24);
    log.restore_producers(&src.producer_snapshot().expect("state").0)
        .expect("restore");
    log.restart_at(40).expect("restart again");
    assert!(log.producer_state_missing());
    assert!(!path.join(BASE_FILE).exists());
    assert!(!path.join(SNAPSHOT_FILE).exists());
    drop(log);
    let log = open(&path);
    assert!(log.producer_state_missing());
    assert_eq!(log.producer_next_sequence(9), None);
    // A plain append still works on it.
    assert_eq!(log.append(&plain(b"x")).expect("append").base_offset, 40);
}
