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
