//! Partition log behaviour through the public API: append and read across segments, time
//! lookups, concurrent readers, retention, group commit.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use common::{batch, decode_all, open_log, small_options};
use rill_storage::{PartitionLog, StorageError};

#[test]
fn append_assigns_offsets_and_reads_back_across_segments() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = open_log(dir.path(), small_options());
    let mut expected = Vec::new();
    for i in 0..200u64 {
        let n = 1 + (i % 5) as u32;
        let info = log.append(&batch(n, i as i64 * 10, 300)).expect("append");
        assert_eq!(info.base_offset, expected.len() as u64);
        for _ in 0..n {
            expected.push(i * 10); // the batch's first timestamp tags its values
        }
    }
    let stats = log.stats();
    assert!(
        stats.segments > 5,
        "should roll several segments, got {}",
        stats.segments
    );
    assert_eq!(stats.high_watermark, expected.len() as u64);
    assert_eq!(stats.log_start_offset, 0);

    // Read everything in small steps from every offset: each read starts with the batch that
    // holds the offset (maybe mid-batch), and records keep their offsets and contents.
    for start in 0..expected.len() as u64 {
        let read = log.read(start, 1).expect("read");
        let records = decode_all(&read.chunks);
        assert!(!records.is_empty(), "offset {start}");
        assert!(records[0].0 <= start, "the first batch holds the offset");
        assert!(records.iter().any(|r| r.0 == start));
        for (offset, value) in &records {
            assert_eq!(value[0] as u64, expected[*offset as usize] % 256);
        }
    }
    // A large read crosses segment boundaries and returns consecutive offsets.
    let all = log.read(0, usize::MAX).expect("read all");
    assert!(all.chunks.len() > 1, "crosses segments");
    let offsets: Vec<u64> = decode_all(&all.chunks).iter().map(|r| r.0).collect();
    assert_eq!(offsets, (0..expected.len() as u64).collect::<Vec<_>>());
    assert_eq!(all.next_offset, expected.len() as u64);
}

#[test]
fn reads_at_segment_boundaries_and_at_the_high_watermark() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = open_log(dir.path(), small_options());
    for i in 0..100 {
        log.append(&batch(3, i, 500)).expect("append");
    }
    // Every segment's base offset reads from exactly that batch.
    let bases: Vec<u64> = std::fs::read_dir(dir.path())
        .expect("ls")
        .filter_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            name.strip_suffix(".log")?.parse().ok()
        })
        .collect();
    assert!(bases.len() > 3);
    for base in bases {
        let read = log.read(base, 1).expect("read");
        let recs = decode_all(&read.chunks);
        assert_eq!(recs[0].0, base, "a segment starts with a batch at its base");
    }
    let hwm = log.high_watermark();
    let at_end = log.read(hwm, 1 << 20).expect("read at hwm");
    assert!(at_end.chunks.is_empty());
    assert_eq!(at_end.high_watermark, hwm);
    match log.read(hwm + 1, 1) {
        Err(StorageError::OffsetOutOfRange {
            log_start,
            high_watermark,
            offset,
            ..
        }) => {
            assert_eq!((log_start, high_watermark, offset), (0, hwm, hwm + 1));
        }
        other => panic!("expected out of range, got {other:?}"),
    }
}

#[test]
fn max_bytes_limits_reads_but_returns_at_least_one_batch() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = open_log(dir.path(), small_options());
    for i in 0..10 {
        log.append(&batch(2, i, 1000)).expect("append");
    }
    let one = log.read(0, 10).expect("read");
    assert_eq!(decode_all(&one.chunks).len(), 2, "one whole batch");
    let some = log.read(0, 4000).expect("read");
    let n = decode_all(&some.chunks).len();
    assert!((2..=8).contains(&n), "a few batches, got {n} records");
    assert!(some.size_bytes() <= 4000);
}

#[test]
fn timestamp_lookup_finds_the_first_offset_at_or_after() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = open_log(dir.path(), small_options());
    // Batch i holds 4 records with timestamps 1000*i + 0, 10, 20, 30.
    for i in 0..300 {
        log.append(&batch(4, 1000 * i, 200)).expect("append");
    }
    assert_eq!(log.offset_for_timestamp(i64::MIN).expect("lookup"), Some(0));
    assert_eq!(log.offset_for_timestamp(0).expect("lookup"), Some(0));
    assert_eq!(log.offset_for_timestamp(5).expect("lookup"), Some(1));
    assert_eq!(
        log.offset_for_timestamp(1000 * 150).expect("lookup"),
        Some(600)
    );
    assert_eq!(
        log.offset_for_timestamp(1000 * 150 + 11).expect("lookup"),
        Some(602)
    );
    assert_eq!(
        log.offset_for_timestamp(1000 * 299 + 30).expect("lookup"),
        Some(1199)
    );
    assert_eq!(
        log.offset_for_timestamp(1000 * 299 + 31).expect("lookup"),
        None
    );
    // The same after a reopen, from the persisted time indexes.
    log.close().expect("close");
    drop(log);
    let log = open_log(dir.path(), small_options());
    assert!(log.recovery_report().clean);
    assert_eq!(
        log.offset_for_timestamp(1000 * 77 + 20).expect("lookup"),
        Some(77 * 4 + 2)
    );
}

#[test]
fn concurrent_readers_see_only_whole_batches_in_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = open_log(dir.path(), small_options());
    let done = Arc::new(AtomicBool::new(false));
    let total_batches = 2000u64;
    std::thread::scope(|s| {
        for _ in 0..3 {
            let log: PartitionLog = log.clone();
            let done = Arc::clone(&done);
            s.spawn(move || {
                let mut next = 0u64;
                let started = std::time::Instant::now();
                loop {
                    // A reader that stops seeing new batches fails instead of spinning forever.
                    assert!(
                        started.elapsed() < std::time::Duration::from_secs(120),
                        "reader stuck at offset {next} of {}",
                        total_batches * 3
                    );
                    let finished = done.load(Ordering::Acquire);
                    let read = log.read(next, 64 << 10).expect("read");
                    for (offset, value) in decode_all(&read.chunks) {
                        if offset < next {
                            continue; // the first batch may start before `next`
                        }
                        assert_eq!(offset, next, "strictly increasing, no gaps");
                        // Batch b holds offsets 3b..3b+2 and values tagged with b.
                        assert_eq!(value[0] as u64, (offset / 3) % 256);
                        assert!(value.iter().all(|&b| b == value[0]), "whole record");
                        next += 1;
                    }
                    if finished && next == log.high_watermark() {
                        break;
                    }
                }
                assert_eq!(next, total_batches * 3);
            });
        }
        for b in 0..total_batches {
            log.append(&batch(3, b as i64, 100 + (b as usize % 7) * 40))
                .expect("append");
        }
        done.store(true, Ordering::Release);
    });
}

#[test]
fn bad_batches_are_refused_and_change_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = open_log(dir.path(), small_options().max_batch_bytes(2048));
    log.append(&batch(1, 0, 10)).expect("append");
    let mut corrupt = batch(1, 0, 10).to_vec();
    let last = corrupt.len() - 1;
    corrupt[last] ^= 1;
    assert!(matches!(
        log.append(&corrupt),
        Err(StorageError::InvalidBatch { .. })
    ));
    assert!(matches!(
        log.append(&[]),
        Err(StorageError::InvalidBatch { .. })
    ));
    assert!(matches!(
        log.append(&batch(1, 0, 4096)),
        Err(StorageError::BatchTooLarge { .. })
    ));
    let mut two = batch(1, 0, 10).to_vec();
    two.extend_from_slice(&batch(1, 0, 10));
    assert!(matches!(
        log.append(&two),
        Err(StorageError::InvalidBatch { .. })
    ));
    assert_eq!(log.high_watermark(), 1);
    assert_eq!(
        decode_all(&log.read(0, 1 << 20).expect("read").chunks).len(),
        1
    );
}

#[test]
fn segments_roll_by_age_and_sealed_files_are_trimmed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let options = rill_storage::LogOptions {
        segment_ms: 1,
        segment_bytes: 1 << 20,
        ..small_options()
    };
    let log = open_log(dir.path(), options);
    log.append(&batch(1, 0, 100)).expect("append");
    // The age roll needs the wall clock to move on by a millisecond.
    let start = rill_storage::log::now_ms();
    while rill_storage::log::now_ms() < start + 2 {
        std::thread::yield_now();
    }
    log.append(&batch(1, 1, 100)).expect("append");
    assert_eq!(log.stats().segments, 2, "rolled by age");
    let first = dir.path().join(format!("{:020}.log", 0));
    let preallocated = std::fs::metadata(&first).expect("stat").len();
    assert!(
        preallocated > batch(1, 0, 100).len() as u64,
        "a roll touches no file: the trim waits for the next sync"
    );
    assert!(log.background_due(), "the roll awaits its checkpoint");
    log.run_background().expect("checkpoint");
    let sealed_len = std::fs::metadata(&first).expect("stat").len();
    assert_eq!(
        sealed_len,
        batch(1, 0, 100).len() as u64,
        "trimmed to its batches"
    );
    let index = dir.path().join(format!("{:020}.timeindex", 0));
    let index_len = std::fs::metadata(&index).expect("stat").len();
    assert_eq!(index_len, 16, "the time index trimmed to its one entry");
    assert!(!log.background_due(), "nothing left to do");
    let active = dir.path().join(format!("{:020}.log", 1));
    let active_len = std::fs::metadata(&active).expect("stat").len();
    assert!(active_len >= 1 << 20, "the active segment is preallocated");
    use std::os::unix::fs::MetadataExt;
    let blocks = std::fs::metadata(&active).expect("stat").blocks() * 512;
    assert!(blocks >= active_len, "with real blocks, not a sparse file");
}
