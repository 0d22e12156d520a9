//! Staged appends: invisible until published, dropped from an offset, and kept across a
//! crash only where the caller vouches for them.

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;

use crate::batch::{encode_batch, BatchBuilder, BatchHeader, Record};
use crate::config::TopicConfig;
use crate::error::StorageError;
use crate::log::{LogOptions, PartitionLog, StagedBatch};

/// A plain batch of `count` records whose values start with `tag`.
fn batch(tag: u8, count: usize) -> Bytes {
    let records: Vec<Record> = (0..count)
        .map(|i| Record {
            key: None,
            value: Bytes::from(vec![tag; 10 + i]),
            headers: vec![],
            timestamp_ms: 1_000 + i as i64,
        })
        .collect();
    encode_batch(&records)
}

fn open(dir: &std::path::Path) -> PartitionLog {
    PartitionLog::open(dir, LogOptions::new("t", 0, &TopicConfig::default())).expect("open")
}

/// A log with one published record, so the clean-shutdown marker is gone and stages run.
fn started(dir: &std::path::Path) -> PartitionLog {
    let log = open(dir);
    log.append(&batch(0, 1)).expect("append");
    log
}

fn stage(log: &PartitionLog, bytes: &Bytes) -> StagedBatch {
    let checked = log.check_batch(bytes.clone()).expect("check");
    log.stage(&checked).expect("stage").expect("staged")
}

/// Every published batch from `from`, each as its bytes with the base offset zeroed (as a
/// producer sends it), with its base offset.
fn published(log: &PartitionLog, from: u64) -> Vec<(u64, Vec<u8>)> {
    let read = log.read(from, 1 << 30).expect("read");
    let mut out = Vec::new();
    for chunk in read.chunks {
        let mut rest = &chunk[..];
        while !rest.is_empty() {
            let header = BatchHeader::parse(rest).expect("header");
            let (one, tail) = rest.split_at(header.total_len());
            let mut bytes = one.to_vec();
            bytes[..8].copy_from_slice(&0u64.to_le_bytes());
            out.push((header.base_offset, bytes));
            rest = tail;
        }
    }
    out
}

#[test]
fn staged_batches_are_read_by_nobody_until_published_in_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = started(dir.path());
    let (a, b) = (batch(1, 3), batch(2, 4));
    let sa = stage(&log, &a);
    let sb = stage(&log, &b);
    assert_eq!((sa.base_offset, sa.next_offset()), (1, 4));
    assert_eq!((sb.base_offset, sb.next_offset()), (4, 8));
    assert_eq!(log.high_watermark(), 1, "staging publishes nothing");
    assert_eq!(log.log_end(), 8);
    assert!(log.read(1, 1 << 20).expect("read").chunks.is_empty());
    assert!(matches!(
        log.read(2, 1 << 20),
        Err(StorageError::OffsetOutOfRange { .. })
    ));

    // Through the middle of the second: only the first is published.
    assert_eq!(log.publish_staged(5).expect("publish"), 4);
    assert_eq!(published(&log, 1), vec![(1, a.to_vec())]);
    assert_eq!(log.staged(), vec![sb]);
    assert_eq!(log.publish_staged(8).expect("publish"), 8);
    assert_eq!(published(&log, 1), vec![(1, a.to_vec()), (4, b.to_vec())]);
    assert!(log.staged().is_empty());
    assert_eq!(log.log_end(), 8);
    // An append goes on after them.
    assert_eq!(log.append(&batch(3, 2)).expect("append").base_offset, 8);
}

#[test]
fn a_staged_batch_reads_back_as_it_will_be_published() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = started(dir.path());
    let big = batch(7, 300); // past the one-write size: written as a head and a body
    let s = stage(&log, &big);
    let back = log.staged_batch(s.base_offset).expect("staged");
    assert!(log.staged_batch(s.base_offset + 1).is_none());
    log.publish_staged(s.next_offset()).expect("publish");
    let read = log.read(s.base_offset, 1 << 20).expect("read");
    assert_eq!(read.chunks.concat(), back.to_vec());
}

#[test]
fn appends_and_restarts_are_refused_while_batches_are_staged_and_change_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = started(dir.path());
    let s = stage(&log, &batch(1, 2));
    for result in [log.append(&batch(9, 1)).map(|_| ()), log.restart_at(100)] {
        match result {
            Err(StorageError::Staged {
                topic,
                partition,
                offset,
                ..
            }) => assert_eq!((topic.as_str(), partition, offset), ("t", 0, 1)),
            other => panic!("expected a staged refusal, got {other:?}"),
        }
    }
    assert_eq!((log.high_watermark(), log.log_end()), (1, 3));
    log.publish_staged(s.next_offset()).expect("publish");
    assert_eq!(log.append(&batch(9, 1)).expect("append").base_offset, 3);
}

#[test]
fn an_idempotent_batch_or_one_that_needs_a_roll_is_not_staged() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = TopicConfig::default().segment_bytes(64 << 10);
    let log = PartitionLog::open(dir.path(), LogOptions::new("t", 0, &config)).expect("open");
    log.append(&batch(0, 1)).expect("append");
    let mut builder = BatchBuilder::new(BytesMut::new()).with_producer(7, 0, 0);
    builder.push(None, b"p", &[], 1);
    let idempotent = builder.finish();
    let checked = log.check_batch(idempotent).expect("check");
    assert_eq!(log.stage(&checked).expect("stage"), None);
    // Fill the segment with staged batches until one does not fit: declined, not an error.
    let chunk = batch(2, 200);
    let mut staged = 0;
    loop {
        let checked = log.check_batch(chunk.clone()).expect("check");
        match log.stage(&checked).expect("stage") {
            Some(_) => staged += 1,
            None => break,
        }
        assert!(staged < 1_000, "a 64 KiB segment holds few of them");
    }
    assert!(staged >= 1);
    assert_eq!(log.high_watermark(), 1);
}

#[test]
fn growing_ahead_lets_stages_go_on_past_the_allocated_blocks() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = started(dir.path());
    let chunk = batch(5, 400);
    let checked = log.check_batch(chunk.clone()).expect("check");
    let mut staged = 0u64;
    while log.stage(&checked).expect("stage").is_some() {
        staged += 1;
        assert!(staged < 10_000, "the first allocated chunk is finite");
    }
    assert!(
        log.room_past_end() < chunk.len() as u64,
        "declined for want of room"
    );
    log.grow_ahead(4 * chunk.len() as u64).expect("grow");
    assert!(log.room_past_end() >= 4 * chunk.len() as u64);
    assert!(
        log.stage(&checked).expect("stage").is_some(),
        "stages go on"
    );
    // Nothing was published meanwhile, and all of it publishes in order.
    assert_eq!(log.high_watermark(), 1);
    log.publish_staged(u64::MAX).expect("publish");
    assert_eq!(log.high_watermark(), 1 + 400 * (staged + 1));
}

#[test]
fn unstaging_drops_the_tail_and_its_place_is_written_again() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = started(dir.path());
    let s1 = stage(&log, &batch(1, 2));
    let s2 = stage(&log, &batch(2, 2));
    stage(&log, &batch(3, 2));
    // Not where a staged batch starts: refused, nothing dropped.
    assert!(matches!(
        log.unstage_from(s2.base_offset + 1),
        Err(StorageError::Staged { .. })
    ));
    assert_eq!(log.log_end(), 7);
    assert_eq!(log.unstage_from(s2.base_offset).expect("unstage"), 2);
    assert_eq!(log.staged(), vec![s1]);
    assert_eq!(log.log_end(), s2.base_offset);
    let other = batch(4, 5);
    let s4 = stage(&log, &other);
    assert_eq!(s4.base_offset, s2.base_offset);
    log.publish_staged(u64::MAX).expect("publish");
    assert_eq!(published(&log, s4.base_offset), vec![(3, other.to_vec())]);
    assert_eq!(log.high_watermark(), 8);
    // Nothing staged from there: nothing to drop.
    assert_eq!(log.unstage_from(8).expect("unstage"), 0);
}

#[test]
fn after_a_crash_only_the_staged_batches_the_caller_vouches_for_are_kept() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (a, b, c) = (batch(1, 2), batch(2, 3), batch(3, 4));
    let staged = {
        let log = started(dir.path());
        vec![stage(&log, &a), stage(&log, &b), stage(&log, &c)]
        // dropped without a close: a crash
    };
    let log = open(dir.path());
    assert!(!log.recovery_report().clean);
    assert!(
        log.recovery_report().cuts.is_empty(),
        "a staged run is not damage: {:?}",
        log.recovery_report()
    );
    assert_eq!(
        log.high_watermark(),
        1,
        "staged batches are not published by a crash"
    );
    assert_eq!(log.log_end(), 1, "nor staged again until vouched for");
    // The caller's Raft log holds the first two only.
    assert_eq!(log.restage(&staged[..2]).expect("restage"), 2);
    assert_eq!(log.staged(), staged[..2].to_vec());
    assert_eq!(log.log_end(), staged[1].next_offset());
    log.publish_staged(u64::MAX).expect("publish");
    assert_eq!(published(&log, 1), vec![(1, a.to_vec()), (3, b.to_vec())]);
    drop(log);
    // The third was forgotten for good: a later open does not offer it again.
    let log = open(dir.path());
    assert_eq!(log.high_watermark(), 6);
    assert_eq!(log.restage(&staged[2..]).expect("restage"), 0);
    assert_eq!(log.log_end(), 6);
}

#[test]
fn a_clean_close_keeps_staged_batches_for_the_next_open_to_vouch_for() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = batch(1, 2);
    let s = {
        let log = started(dir.path());
        let s = stage(&log, &a);
        log.close().expect("close");
        s
    };
    let log = open(dir.path());
    assert!(log.recovery_report().clean);
    assert_eq!(log.high_watermark(), 1);
    // A wrong checksum does not match.
    let wrong = StagedBatch {
        crc: s.crc ^ 1,
        ..s
    };
    assert_eq!(log.restage(&[wrong]).expect("restage"), 0);
    drop(log);
    let log = open(dir.path());
    assert_eq!(
        log.restage(&[s]).expect("restage"),
        0,
        "forgotten by the last restage"
    );

    // And when vouched for at once, after a clean close:
    let dir = tempfile::tempdir().expect("tempdir");
    let s = {
        let log = started(dir.path());
        let s = stage(&log, &a);
        log.close().expect("close");
        s
    };
    let log = open(dir.path());
    assert_eq!(log.restage(&[s]).expect("restage"), 1);
    log.publish_staged(s.next_offset()).expect("publish");
    assert_eq!(published(&log, 1), vec![(1, a.to_vec())]);
}

/// A record of the stages (a Raft log's stubs) fsynced after `sync_staged` must find every
/// batch it names on disk, published since or not: the sync covers what was staged since
/// the last one, and only that.
#[test]
fn syncing_staged_batches_covers_those_published_since_and_nothing_twice() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = started(dir.path());
    let syncs = |log: &PartitionLog| log.sync_count();
    let before = syncs(&log);
    log.sync_staged().expect("sync");
    assert_eq!(syncs(&log), before, "nothing staged: no sync");

    let a = stage(&log, &batch(1, 2));
    log.publish_staged(a.next_offset()).expect("publish");
    assert!(log.staged().is_empty());
    log.sync_staged().expect("sync");
    assert_eq!(
        syncs(&log),
        before + 1,
        "a batch staged and published since the last sync is synced"
    );
    log.sync_staged().expect("sync");
    assert_eq!(syncs(&log), before + 1, "nothing staged since: no sync");

    stage(&log, &batch(2, 2));
    log.sync_staged().expect("sync");
    assert_eq!(syncs(&log), before + 2, "a staged batch is synced");
}

/// A failed sync of staged batches fences the partition (after a failed fsync the kernel
/// may have dropped the pages, and a retry could report success without them): stages and
/// appends are refused from then on, naming the topic and partition, and what was
/// published stays readable.
#[test]
fn a_failed_sync_of_staged_batches_fences_the_partition() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = started(dir.path());
    let staged = stage(&log, &batch(1, 2));
    log.inject_sync_failure();
    let err = log.sync_staged().expect_err("the sync must fail");
    assert!(err.to_string().contains("injected"), "{err}");
    let reason = log.fenced_reason().expect("fenced");
    assert!(reason.contains("staged"), "{reason}");

    let checked = log.check_batch(batch(2, 1)).expect("check");
    assert!(matches!(
        log.stage(&checked),
        Err(StorageError::Fenced { ref topic, partition: 0, .. }) if topic == "t"
    ));
    assert!(matches!(
        log.append(&batch(3, 1)),
        Err(StorageError::Fenced { .. })
    ));
    assert_eq!(log.staged(), vec![staged], "nothing staged or dropped");
    assert_eq!(log.high_watermark(), 1);
    assert_eq!(
        published(&log, 0).len(),
        1,
        "the published record is still read"
    );
}

#[test]
fn garbage_after_a_staged_run_is_cut_and_the_run_kept() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = {
        let log = started(dir.path());
        let s = stage(&log, &batch(1, 2));
        let segment = log.active();
        use std::os::unix::fs::FileExt;
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(segment.path())
            .expect("open segment");
        let end = log.inner.staging.lock().batches[0].at.end();
        file.write_all_at(b"torn garbage", end).expect("garbage");
        s
    };
    let log = open(dir.path());
    let cuts = &log.recovery_report().cuts;
    assert_eq!(cuts.len(), 1, "{cuts:?}");
    assert_eq!(log.restage(&[s]).expect("restage"), 1);
    assert_eq!(log.log_end(), s.next_offset());
}

/// One step of the model test.
#[derive(Debug, Clone)]
enum Op {
    Stage(u8, usize),
    Publish(u8),
    Unstage(u8),
    Append(u8),
    Crash,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (any::<u8>(), 1usize..6).prop_map(|(t, n)| Op::Stage(t, n)),
        2 => any::<u8>().prop_map(Op::Publish),
        1 => any::<u8>().prop_map(Op::Unstage),
        1 => any::<u8>().prop_map(Op::Append),
        1 => Just(Op::Crash),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Against a model (published batches, staged batches): whatever the order of stages,
    /// publications, drops, appends and crashes (after which the model's staged batches are
    /// vouched for again), reads return exactly the published batches, in order.
    #[test]
    fn staging_matches_a_model(ops in proptest::collection::vec(op(), 1..30)) {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut log = started(dir.path());
        let mut published_model: Vec<(u64, Vec<u8>)> = Vec::new();
        let mut staged_model: Vec<(StagedBatch, Vec<u8>)> = Vec::new();
        for op in ops {
            match op {
                Op::Stage(tag, n) => {
                    let b = batch(tag, n);
                    let checked = log.check_batch(b.clone()).expect("check");
                    if let Some(s) = log.stage(&checked).expect("stage") {
                        staged_model.push((s, b.to_vec()));
                    }
                }
                Op::Publish(k) => {
                    let through = staged_model
                        .get(usize::from(k) % (staged_model.len() + 1))
                        .map_or(0, |(s, _)| s.next_offset());
                    log.publish_staged(through).expect("publish");
                    while staged_model.first().is_some_and(|(s, _)| s.next_offset() <= through) {
                        let (s, b) = staged_model.remove(0);
                        published_model.push((s.base_offset, b));
                    }
                }
                Op::Unstage(k) => {
                    if !staged_model.is_empty() {
                        let at = usize::from(k) % staged_model.len();
                        log.unstage_from(staged_model[at].0.base_offset).expect("unstage");
                        staged_model.truncate(at);
                    }
                }
                Op::Append(tag) => {
                    let b = batch(tag, 1);
                    let result = log.append(&b);
                    if staged_model.is_empty() {
                        let info = result.expect("append");
                        published_model.push((info.base_offset, b.to_vec()));
                    } else {
                        let refused = matches!(result, Err(StorageError::Staged { .. }));
                        prop_assert!(refused, "an append while staged must be refused");
                    }
                }
                Op::Crash => {
                    drop(log);
                    log = open(dir.path());
                    let expected: Vec<StagedBatch> = staged_model.iter().map(|(s, _)| *s).collect();
                    prop_assert_eq!(log.restage(&expected).expect("restage"), expected.len());
                    // The marker is gone after a crash: stages run at once.
                }
            }
            let end = published_model.last().map_or(1, |(base, b)| {
                base + u64::from(BatchHeader::parse(b).expect("header").record_count)
            });
            prop_assert_eq!(log.high_watermark(), end);
            prop_assert_eq!(
                log.log_end(),
                staged_model.last().map_or(end, |(s, _)| s.next_offset())
            );
            prop_assert_eq!(&published(&log, 1), &published_model);
        }
    }
}
