//! Fencing, full disks, oversize batches and fault injection.

use super::*;
use crate::batch::{encode_batch, Record};

fn one_record() -> Bytes {
    encode_batch(&[Record {
        key: None,
        value: Bytes::from_static(b"v"),
        headers: vec![],
        timestamp_ms: 1,
    }])
}

#[test]
fn a_failed_sync_fences_writes_but_not_reads() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = TopicConfig::default().flush(FlushPolicy::Always);
    let log = PartitionLog::open(dir.path(), LogOptions::new("t", 3, &config)).expect("open");
    let syncs = log.sync_count();
    let info = log.append(&one_record()).expect("append");
    assert_eq!(
        log.sync_count(),
        syncs + 1,
        "`always` synced before returning"
    );
    assert!(log.durable_offset() >= info.next_offset);

    // Under `always` the append itself waits for the sync, so its failure is the append's:
    // the batch is in the log but never acknowledged.
    log.inject_sync_failure();
    let err = log.append(&one_record()).expect_err("the sync must fail");
    assert!(err.to_string().contains("injected"), "{err}");

    match log.append(&one_record()) {
        Err(StorageError::Fenced {
            topic,
            partition,
            reason,
        }) => {
            assert_eq!((topic.as_str(), partition), ("t", 3));
            assert!(reason.contains("sync failed"), "{reason}");
        }
        other => panic!("expected fenced, got {other:?}"),
    }
    assert!(matches!(log.flush(), Err(StorageError::Fenced { .. })));
    assert!(log.fenced_reason().is_some());
    // Reads still work, and the high watermark did not move.
    assert_eq!(log.high_watermark(), 2);
    assert_eq!(log.read(0, 1 << 20).expect("read").chunks.len(), 1);
    // A fenced partition closes without a clean marker: the next open scans it.
    log.close().expect("close");
    drop(log);
    let log = PartitionLog::open(dir.path(), LogOptions::new("t", 3, &config)).expect("reopen");
    assert!(!log.recovery_report().clean);
    assert_eq!(log.high_watermark(), 2);
}

/// A small real filesystem, unmounted on drop.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> std::result::Result<Tmpfs, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .stderr(std::process::Stdio::null())
            .status()
            .map_err(|e| e.to_string())?;
        if status.success() {
            Ok(Tmpfs { dir })
        } else {
            Err(format!("mount exited with {status}"))
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(self.dir.path())
            .status();
    }
}

fn kib_record(tag: u8) -> Bytes {
    encode_batch(&[Record {
        key: None,
        value: Bytes::from(vec![tag; 4000]),
        headers: vec![],
        timestamp_ms: i64::from(tag),
    }])
}

/// Appends until the disk is full, checks that the failure is a clean error that wrote
/// nothing, frees space with retention, and checks that appends work again and nothing
/// acknowledged was lost.
fn fill_free_and_check(dir: &std::path::Path) {
    let config = TopicConfig::default()
        .segment_bytes(64 << 10)
        .retention_ms(None)
        .retention_bytes(Some(128 << 10));
    let options = LogOptions::new("full", 0, &config);
    let log = PartitionLog::open(dir, options.clone()).expect("open");
    let mut acked = 0u64;
    let err = loop {
        match log.append(&kib_record((acked % 250) as u8)) {
            Ok(info) => acked = info.next_offset,
            Err(e) => break e,
        }
        assert!(acked < 100_000, "the disk never filled");
    };
    assert!(matches!(err, StorageError::NoSpace { .. }), "{err:?}");
    assert!(err.to_string().contains("full"), "names the topic: {err}");
    assert_eq!(
        log.high_watermark(),
        acked,
        "the failed append wrote nothing"
    );
    assert!(log.fenced_reason().is_none(), "a full disk does not fence");
    let read = log.read(0, usize::MAX).expect("read");
    let n: usize = read
        .chunks
        .iter()
        .flat_map(|c| crate::batch::batches(c))
        .map(|b| b.expect("batch").validate().map(|_| 1).expect("valid"))
        .sum();
    assert_eq!(n as u64, acked);
    // A reader's bytes keep a deleted file's blocks in use: let go of them first.
    drop(read);
    // Free space by retention, then append again.
    let outcome = log.apply_retention(now_ms()).expect("retention");
    assert!(outcome.deleted_segments > 0);
    let start = log.log_start_offset();
    let info = log
        .append(&kib_record(7))
        .expect("append after freeing space");
    assert_eq!(info.base_offset, acked);
    log.close().expect("close");
    drop(log);
    let log = PartitionLog::open(dir, options).expect("reopen");
    assert_eq!(
        (log.log_start_offset(), log.high_watermark()),
        (start, acked + 1)
    );
    let read = log.read(start, usize::MAX).expect("read");
    assert!(!read.chunks.is_empty());
}

#[test]
fn a_full_disk_is_an_error_not_a_crash() {
    match Tmpfs::mount("1m") {
        Ok(fs) => fill_free_and_check(&fs.dir.path().join("p")),
        Err(why) => {
            // No mount here (not root, or no tmpfs): fail the allocations through the same
            // code path instead, after a few succeed.
            eprintln!("cannot mount a tmpfs ({why}); injecting ENOSPC into preallocation");
            crate::fsutil::inject::fail_preallocate_after(Some(12));
            let dir = tempfile::tempdir().expect("tempdir");
            fill_free_and_check(dir.path());
            crate::fsutil::inject::fail_preallocate_after(None);
        }
    }
}

#[test]
fn injected_preallocation_failure_is_no_space() {
    let dir = tempfile::tempdir().expect("tempdir");
    crate::fsutil::inject::fail_preallocate_after(Some(12));
    fill_free_and_check(dir.path());
    crate::fsutil::inject::fail_preallocate_after(None);
}

fn record_of(len: usize) -> Bytes {
    encode_batch(&[Record {
        key: None,
        value: Bytes::from(vec![b'x'; len]),
        headers: vec![],
        timestamp_ms: 1,
    }])
}

#[test]
fn an_oversize_batch_is_refused_and_the_partition_keeps_serving() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = TopicConfig::default().segment_bytes(4096);
    let options = LogOptions::new("tiny", 2, &config);
    assert_eq!(options.effective_max_batch_bytes(), 4096);
    let log = PartitionLog::open(dir.path(), options).expect("open");
    log.append(&one_record()).expect("a small batch fits");

    let big = record_of(20_000);
    match log.append(&big) {
        Err(StorageError::BatchTooLarge {
            topic,
            partition,
            size_bytes,
            max_bytes,
        }) => {
            assert_eq!((topic.as_str(), partition), ("tiny", 2));
            assert_eq!((size_bytes, max_bytes), (big.len(), 4096));
        }
        other => panic!("expected BatchTooLarge, got {other:?}"),
    }
    assert_eq!(log.fenced_reason(), None, "client input never fences");
    assert_eq!(log.high_watermark(), 1, "nothing was written");

    // A batch that fills a segment exactly is the largest accepted.
    let exact = {
        let overhead = record_of(0).len();
        record_of(4096 - overhead)
    };
    assert_eq!(exact.len(), 4096);
    let info = log.append(&exact).expect("a batch of one whole segment");
    assert_eq!(info.base_offset, 1);
    let info = log
        .append(&one_record())
        .expect("and the partition goes on");
    assert_eq!(info.base_offset, 2);
    assert_eq!(
        log.stats().segments,
        3,
        "each batch that did not fit rolled"
    );
    let read = log.read(0, usize::MAX).expect("read");
    let records: usize = read
        .chunks
        .iter()
        .flat_map(|c| crate::batch::batches(c))
        .map(|b| b.expect("batch").header().record_count as usize)
        .sum();
    assert_eq!(records, 3);
}

#[test]
fn group_commit_serves_many_writers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = TopicConfig::default().flush(FlushPolicy::Always);
    let log = PartitionLog::open(dir.path(), LogOptions::new("t", 0, &config)).expect("open");
    // A sync as slow as a hard disk's, so that writers arrive while one is running whatever
    // the disk under the test is.
    log.inject_sync_delay(std::time::Duration::from_millis(2));
    const WRITERS: u64 = 8;
    const APPENDS_EACH: u64 = 50;
    std::thread::scope(|s| {
        for _ in 0..WRITERS {
            let log = log.clone();
            s.spawn(move || {
                for _ in 0..APPENDS_EACH {
                    let before = log.sync_count();
                    // `always`: the append returns only once a sync covers it.
                    let info = log.append(&one_record()).expect("append");
                    assert!(
                        log.sync_count() > before,
                        "a sync ran after append {} was written",
                        info.base_offset
                    );
                    assert!(
                        log.durable_offset() >= info.next_offset,
                        "and covered it: durable to {}, appended to {}",
                        log.durable_offset(),
                        info.next_offset
                    );
                }
            });
        }
    });
    let appends = WRITERS * APPENDS_EACH;
    assert_eq!(log.high_watermark(), appends);
    let syncs = log.sync_count();
    assert!(
        syncs < appends,
        "one sync served several writers: {syncs} syncs for {appends} appends"
    );
    eprintln!("{syncs} syncs for {appends} appends");
    log.flush().expect("flush");
    assert_eq!(log.sync_count(), syncs, "nothing was left to sync");
}

fn open_small(dir: &std::path::Path, config: &TopicConfig) -> PartitionLog {
    PartitionLog::open(dir, LogOptions::new("t", 0, config)).expect("open")
}

#[test]
fn a_failed_roll_does_not_fence() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = open_small(dir.path(), &TopicConfig::default().segment_bytes(4096));
    log.append(&record_of(3000)).expect("append");
    // A folder where the next segment's index must go: the roll's rename fails.
    let blocked = dir.path().join(format!("{:020}.index", 1));
    std::fs::create_dir(&blocked).expect("mkdir");
    let err = log
        .append(&record_of(3000))
        .expect_err("the roll cannot rename");
    assert!(matches!(err, StorageError::Io { .. }), "{err:?}");
    assert_eq!(log.fenced_reason(), None, "nothing written was at risk");
    assert_eq!((log.high_watermark(), log.stats().segments), (1, 1));
    std::fs::remove_dir(&blocked).expect("rmdir");
    let info = log.append(&record_of(3000)).expect("the next roll works");
    assert_eq!((info.base_offset, log.stats().segments), (1, 2));
}

#[test]
fn a_failed_recovery_point_write_does_not_fence() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = open_small(dir.path(), &TopicConfig::default().segment_bytes(4096));
    log.append(&record_of(3000)).expect("append");
    log.append(&record_of(3000)).expect("append, rolling");
    assert!(log.background_due(), "the roll awaits its checkpoint");
    // The temp name of the recovery point's atomic write is taken by a folder.
    let blocked = dir.path().join("recovery-point.tmp");
    std::fs::create_dir(&blocked).expect("mkdir");
    log.checkpoint()
        .expect("the sealed segment and the folder are synced; the point waits");
    assert_eq!(log.fenced_reason(), None);
    assert!(!dir.path().join("recovery-point").exists());
    assert!(log.background_due(), "the checkpoint is retried");
    std::fs::remove_dir(&blocked).expect("rmdir");
    log.run_background().expect("checkpoint");
    assert!(dir.path().join("recovery-point").exists());
    assert!(!log.background_due());
}

#[test]
fn a_failed_deletion_is_retried_and_does_not_fence() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = TopicConfig::default()
        .segment_bytes(4096)
        .retention_ms(None)
        .retention_bytes(Some(1));
    let log = open_small(dir.path(), &config);
    for _ in 0..3 {
        log.append(&record_of(3000)).expect("append");
    }
    assert_eq!(log.stats().segments, 3);
    // Segment 0's time index cannot be deleted: a non-empty folder stands in its place.
    let time_index = dir.path().join(format!("{:020}.timeindex", 0));
    std::fs::remove_file(&time_index).expect("rm");
    std::fs::create_dir(&time_index).expect("mkdir");
    std::fs::write(time_index.join("pin"), b"x").expect("pin");
    log.apply_retention(now_ms())
        .expect_err("one file cannot be deleted");
    assert_eq!(log.fenced_reason(), None, "deleting is not writing");
    assert_eq!(
        log.log_start_offset(),
        2,
        "both sealed segments left the log"
    );
    let segment_1 = dir.path().join(format!("{:020}.log", 1));
    assert!(segment_1.exists(), "deletion stops at the first failure");
    log.append(&one_record()).expect("appends go on");

    std::fs::remove_dir_all(&time_index).expect("unpin");
    let outcome = log.apply_retention(now_ms()).expect("retried");
    assert_eq!(outcome.deleted_segments, 2);
    assert!(!segment_1.exists());
    assert!(!dir.path().join(format!("{:020}.log", 0)).exists());
}

#[test]
fn the_interval_flush_runs_when_due_and_only_then() {
    let dir = tempfile::tempdir().expect("tempdir");
    let hourly = open_small(
        &dir.path().join("hourly"),
        &TopicConfig::default().flush(FlushPolicy::IntervalMs(3_600_000)),
    );
    hourly.append(&one_record()).expect("append");
    assert!(!hourly.background_due(), "not due within the hour");
    assert_eq!(hourly.durable_offset(), 0);

    let never = open_small(
        &dir.path().join("never"),
        &TopicConfig::default().flush(FlushPolicy::Never),
    );
    never.append(&one_record()).expect("append");
    assert!(!never.background_due(), "`never` has no periodic sync");

    let fast = open_small(
        &dir.path().join("fast"),
        &TopicConfig::default().flush(FlushPolicy::IntervalMs(1)),
    );
    let info = fast.append(&one_record()).expect("append");
    assert_eq!(fast.sync_count(), 0, "a `leader` append does not sync");
    std::thread::sleep(std::time::Duration::from_millis(2));
    assert!(fast.background_due(), "due after its interval");
    fast.run_background().expect("flush");
    assert_eq!(fast.sync_count(), 1);
    assert!(fast.durable_offset() >= info.next_offset);
    std::thread::sleep(std::time::Duration::from_millis(2));
    assert!(!fast.background_due(), "nothing unsynced, nothing due");
}

#[test]
fn data_found_at_open_is_cold_until_its_first_read_checks_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = TopicConfig::default();
    let log = open_small(dir.path(), &config);
    for _ in 0..10 {
        log.append(&one_record()).expect("append");
    }
    assert!(log.is_hot(0, usize::MAX), "appended by this process");
    log.close().expect("close");
    drop(log);

    let log = open_small(dir.path(), &config);
    assert!(log.recovery_report().clean);
    assert!(!log.is_hot(0, 1 << 20), "found on disk: unchecked");
    assert!(
        log.is_hot(10, 1 << 20),
        "nothing to read at the high watermark"
    );
    log.append(&one_record()).expect("append");
    assert!(log.is_hot(10, 1 << 20), "appended since open");
    assert!(!log.is_hot(9, 1 << 20));
    let read = log.read(0, usize::MAX).expect("the first read checks");
    assert_eq!(read.next_offset, 11);
    assert!(log.is_hot(0, usize::MAX), "checked by the first read");
}

/// Batches below, at and above the one-pwrite size (a stamped copy written whole) and the
/// two-pwrite path (stamped header, then the rest) read back as the bytes appended, each
/// with its own base offset. Catches a copy that is cut short, stamped at the wrong place,
/// or written at the wrong position.
#[test]
fn small_and_large_batches_read_back_as_appended() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = PartitionLog::open(
        dir.path(),
        LogOptions::new("sizes", 0, &TopicConfig::default()),
    )
    .expect("open");
    let overhead = record_of(0).len();
    let sizes = [1, 4096 - overhead, 4097 - overhead, 100_000, 3];
    let mut appended = Vec::new();
    for (i, len) in sizes.into_iter().enumerate() {
        let batch = record_of(len);
        let info = log.append(&batch).expect("append");
        assert_eq!(info.base_offset, i as u64);
        appended.push(batch);
    }
    let read = log.read(0, usize::MAX).expect("read");
    let stored: Vec<_> = read
        .chunks
        .iter()
        .flat_map(|c| crate::batch::batches(c))
        .map(|b| b.expect("batch").as_bytes().to_vec())
        .collect();
    assert_eq!(stored.len(), appended.len());
    for (i, (stored, sent)) in stored.iter().zip(&appended).enumerate() {
        assert_eq!(stored.len(), sent.len(), "batch {i}");
        assert_eq!(
            crate::batch::BatchView::parse(stored)
                .expect("parse")
                .header()
                .base_offset,
            i as u64
        );
        // Past the stamped base offset (the first 8 bytes), the bytes are those sent.
        assert_eq!(stored[8..], sent[8..], "batch {i}");
    }
}

#[test]
fn a_verified_batch_is_checked_for_its_shape_but_not_its_checksum_again() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = TopicConfig::default();
    let log =
        PartitionLog::open(dir.path(), LogOptions::new("verified", 0, &config)).expect("open");
    // A flipped byte in the last record's value: the checksum no longer matches.
    let mut flipped = record_of(64).to_vec();
    let last = flipped.len() - 1;
    flipped[last] ^= 0xff;
    let flipped = Bytes::from(flipped);
    assert!(matches!(
        log.check_batch(flipped.clone()),
        Err(StorageError::InvalidBatch { .. })
    ));
    assert!(matches!(
        log.append(&flipped),
        Err(StorageError::InvalidBatch { .. })
    ));
    log.check_verified_batch(flipped.clone())
        .expect("the checksum is not checked again");
    // The shape still is: a batch cut short is refused both ways, and changes nothing.
    let short = one_record().slice(..20);
    assert!(log.check_verified_batch(short.clone()).is_err());
    assert!(log.append_verified(&short).is_err());
    assert_eq!(log.high_watermark(), 0);
    let info = log.append_verified(&one_record()).expect("appended");
    assert_eq!((info.base_offset, log.high_watermark()), (0, 1));
}
