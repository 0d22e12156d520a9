//! Recovery: write, crash (drop without close) or damage the files, reopen, and assert that
//! the longest valid prefix survives and that what was cut is reported.

mod common;

use std::fs::{self, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use common::{batch, decode_all, open_log, small_options};
use proptest::prelude::*;
use rill_storage::{LogOptions, StorageError, TopicConfig};

fn one_segment_options() -> LogOptions {
    let config = TopicConfig::default()
        .segment_bytes(1 << 20)
        .retention_ms(None);
    LogOptions::new("t", 0, &config)
}

fn segment_files(dir: &Path, ext: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .expect("ls")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == ext))
        .collect();
    files.sort();
    files
}

fn copy_dir(from: &Path, to: &Path) {
    for entry in fs::read_dir(from).expect("ls") {
        let entry = entry.expect("entry");
        fs::copy(entry.path(), to.join(entry.file_name())).expect("copy");
    }
}

/// Writes batches of 1..=4 records into one segment, crashes, and returns the byte position
/// where each batch ends with the record count so far.
fn write_and_crash(dir: &Path, batches: u32) -> Vec<(u64, u64)> {
    let log = open_log(dir, one_segment_options());
    let mut ends = Vec::new();
    let mut pos = 0u64;
    for i in 0..batches {
        let b = batch(1 + i % 4, i64::from(i), 50 + (i as usize * 37) % 300);
        let info = log.append(&b).expect("append");
        pos += b.len() as u64;
        ends.push((pos, info.next_offset));
    }
    drop(log); // no close: as if the process died
    ends
}

fn records_before(ends: &[(u64, u64)], cut: u64) -> u64 {
    ends.iter()
        .take_while(|(end, _)| *end <= cut)
        .last()
        .map_or(0, |(_, n)| *n)
}

#[test]
fn clean_reopen_validates_nothing_and_keeps_everything() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = open_log(dir.path(), small_options());
    for i in 0..100 {
        log.append(&batch(2, i, 400)).expect("append");
    }
    log.close().expect("close");
    assert!(matches!(
        log.append(&batch(1, 0, 1)),
        Err(StorageError::Closed)
    ));
    drop(log);
    let log = open_log(dir.path(), small_options());
    let report = log.recovery_report();
    assert!(report.clean);
    assert_eq!(report.scanned_bytes, 0);
    assert!(report.cuts.is_empty());
    assert_eq!(log.high_watermark(), 200);
    assert_eq!(
        decode_all(&log.read(0, usize::MAX).expect("read").chunks).len(),
        200
    );
    // Appending after a clean open works, and a crash after it is not mistaken for clean.
    log.append(&batch(1, 1, 10)).expect("append");
    drop(log);
    let log = open_log(dir.path(), small_options());
    assert!(!log.recovery_report().clean);
    assert_eq!(log.high_watermark(), 201);
}

#[test]
fn crash_keeps_every_appended_batch() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ends = write_and_crash(dir.path(), 300);
    let log = open_log(dir.path(), one_segment_options());
    let report = log.recovery_report().clone();
    assert!(!report.clean);
    assert_eq!(report.scanned_bytes, ends.last().expect("batches").0);
    assert!(
        report.cuts.is_empty(),
        "a zero tail is the end, not damage: {report:?}"
    );
    assert_eq!(log.high_watermark(), ends.last().expect("batches").1);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// The log file truncated at any point recovers exactly the batches wholly before it.
    #[test]
    fn truncated_log_recovers_the_longest_valid_prefix(frac in 0.0f64..1.0) {
        let pristine = tempfile::tempdir().expect("tempdir");
        let ends = write_and_crash(pristine.path(), 60);
        let total = ends.last().expect("batches").0;
        let cut = (total as f64 * frac) as u64;
        let dir = tempfile::tempdir().expect("tempdir");
        copy_dir(pristine.path(), dir.path());
        let log_file = &segment_files(dir.path(), "log")[0];
        OpenOptions::new().write(true).open(log_file).expect("open")
            .set_len(cut).expect("truncate");
        let log = open_log(dir.path(), one_segment_options());
        let kept = records_before(&ends, cut);
        prop_assert_eq!(log.high_watermark(), kept);
        let read = log.read(0, usize::MAX).expect("read");
        prop_assert_eq!(decode_all(&read.chunks).len() as u64, kept);
        let at_boundary = cut == 0 || ends.iter().any(|(e, _)| *e == cut);
        // A partial batch that is all zeros so far (a cut inside the first batch's zero base
        // offset) reads as preallocated space, not as a torn write: nothing to report.
        let last_end = ends.iter().map(|(e, _)| *e).filter(|e| *e <= cut).max().unwrap_or(0);
        let pristine_bytes = fs::read(&segment_files(pristine.path(), "log")[0]).expect("read");
        let zeros_only = pristine_bytes[last_end as usize..cut as usize].iter().all(|b| *b == 0);
        let reported = !at_boundary && !zeros_only;
        prop_assert_eq!(log.recovery_report().cuts.len(), usize::from(reported));
        if reported {
            let c = &log.recovery_report().cuts[0];
            prop_assert_eq!(c.offset, kept);
            prop_assert_eq!(c.position + c.bytes, cut);
        }
        // The log takes appends at the right offset afterwards.
        let info = log.append(&batch(1, 0, 10)).expect("append");
        prop_assert_eq!(info.base_offset, kept);
    }
}

#[test]
fn garbage_after_the_tail_is_cut() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ends = write_and_crash(dir.path(), 40);
    let (end, count) = *ends.last().expect("batches");
    let log_file = &segment_files(dir.path(), "log")[0];
    let mut f = OpenOptions::new().write(true).open(log_file).expect("open");
    f.seek(SeekFrom::Start(end)).expect("seek");
    let garbage: Vec<u8> = (0..777u32).map(|i| (i * 31 + 7) as u8).collect();
    f.write_all(&garbage).expect("write");
    drop(f);
    let size = fs::metadata(log_file).expect("stat").len();
    let log = open_log(dir.path(), one_segment_options());
    assert_eq!(log.high_watermark(), count);
    let cuts = &log.recovery_report().cuts;
    assert_eq!(cuts.len(), 1);
    assert_eq!((cuts[0].position, cuts[0].bytes), (end, size - end));
    // The tail reads as zeros again: a second crash-reopen finds nothing to cut.
    log.append(&batch(1, 5, 10)).expect("append");
    drop(log);
    let log = open_log(dir.path(), one_segment_options());
    assert!(log.recovery_report().cuts.is_empty());
    assert_eq!(log.high_watermark(), count + 1);
}

#[test]
fn zeroed_tail_is_cut_at_the_last_whole_batch() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ends = write_and_crash(dir.path(), 40);
    let (end, _) = *ends.last().expect("batches");
    let zero_from = end - 200; // a torn last write: its end never reached the disk
    let log_file = &segment_files(dir.path(), "log")[0];
    let mut f = OpenOptions::new().write(true).open(log_file).expect("open");
    f.seek(SeekFrom::Start(zero_from)).expect("seek");
    f.write_all(&[0u8; 200]).expect("write");
    drop(f);
    let log = open_log(dir.path(), one_segment_options());
    assert_eq!(log.high_watermark(), records_before(&ends, zero_from));
    assert_eq!(log.recovery_report().cuts.len(), 1);
}

#[test]
fn missing_or_truncated_indexes_are_rebuilt() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = open_log(dir.path(), small_options());
    for i in 0..200 {
        log.append(&batch(2, 1000 * i, 300)).expect("append");
    }
    log.close().expect("close");
    drop(log);
    let indexes = segment_files(dir.path(), "index");
    let times = segment_files(dir.path(), "timeindex");
    assert!(indexes.len() > 4);
    fs::remove_file(&indexes[0]).expect("delete index");
    let f = OpenOptions::new()
        .write(true)
        .open(&indexes[1])
        .expect("open");
    f.set_len(f.metadata().expect("stat").len() - 3)
        .expect("truncate");
    drop(f);
    fs::write(&times[2], b"").expect("empty time index");
    let log = open_log(dir.path(), small_options());
    assert!(log.recovery_report().rebuilt_indexes >= 3);
    let read = log.read(0, usize::MAX).expect("read");
    assert_eq!(decode_all(&read.chunks).len(), 400);
    for i in [0i64, 17, 60, 111, 199] {
        let at = log.offset_for_timestamp(1000 * i).expect("lookup");
        assert_eq!(at, Some(2 * i as u64));
        let read = log.read(2 * i as u64 + 1, 1).expect("read");
        assert_eq!(decode_all(&read.chunks)[1].0, 2 * i as u64 + 1);
    }
}

#[test]
fn missing_recovery_point_scans_everything() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = open_log(dir.path(), small_options());
    for i in 0..100 {
        log.append(&batch(2, i, 300)).expect("append");
    }
    let total = log.stats().size_bytes;
    log.checkpoint().expect("checkpoint");
    assert!(
        dir.path().join("recovery-point").exists(),
        "a checkpoint writes the recovery point"
    );
    drop(log);
    fs::remove_file(dir.path().join("recovery-point")).expect("remove recovery point");
    let log = open_log(dir.path(), small_options());
    assert_eq!(log.recovery_report().scanned_bytes, total);
    assert_eq!(log.high_watermark(), 200);
    // With the recovery point in place, a crash scans only the active segment.
    log.append(&batch(1, 1, 10)).expect("append");
    let (active, total) = (log.stats(), log.stats().size_bytes);
    drop(log);
    let log = open_log(dir.path(), small_options());
    assert!(
        log.recovery_report().scanned_bytes < total / 2,
        "{active:?}"
    );
}

#[test]
fn flipped_byte_in_a_sealed_segment_is_data_loss_on_read() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = open_log(dir.path(), small_options());
    let mut positions = Vec::new();
    let mut pos = 0;
    for i in 0..100 {
        let b = batch(2, i, 300);
        let info = log.append(&b).expect("append");
        if info.base_offset < 20 {
            positions.push((info.base_offset, pos));
        }
        pos += b.len() as u64;
    }
    log.close().expect("close");
    drop(log);
    // Damage the value of the batch at offsets 10..12 in the first (sealed) segment.
    let (damaged_offset, damaged_pos) = positions[5];
    let first = &segment_files(dir.path(), "log")[0];
    let mut bytes = fs::read(first).expect("read");
    bytes[damaged_pos as usize + 200] ^= 0x01;
    fs::write(first, &bytes).expect("write");

    let log = open_log(dir.path(), small_options());
    match log.read(damaged_offset, 1) {
        Err(StorageError::DataLoss {
            offset, partition, ..
        }) => {
            assert_eq!((offset, partition), (damaged_offset, 0));
        }
        other => panic!("expected data loss, got {other:?}"),
    }
    match log.read(damaged_offset + 1, 1 << 20) {
        Err(StorageError::DataLoss { .. }) => {}
        other => panic!("expected data loss, got {other:?}"),
    }
    // A read before it stops short of the damage; reads after it work.
    let before = log.read(0, usize::MAX).expect("read before");
    let offsets: Vec<u64> = decode_all(&before.chunks).iter().map(|r| r.0).collect();
    assert_eq!(offsets, (0..damaged_offset).collect::<Vec<_>>());
    let after = log
        .read(damaged_offset + 2, usize::MAX)
        .expect("read after");
    assert_eq!(decode_all(&after.chunks)[0].0, damaged_offset + 2);
}

#[test]
fn retention_by_time_and_size_deletes_exactly_the_right_segments() {
    let dir = tempfile::tempdir().expect("tempdir");
    let options = LogOptions {
        retention_ms: Some(10_000),
        ..small_options()
    };
    let log = open_log(dir.path(), options.clone());
    // Timestamps rise by 100 ms per batch; 1 batch of ~2 KiB, so ~7 per 16 KiB segment.
    for i in 0..100 {
        log.append(&batch(1, 100 * i, 2000)).expect("append");
    }
    let segments = segment_files(dir.path(), "log");
    assert!(segments.len() > 10);
    let before = log.stats();
    // "now" such that records older than 5_000 ms are expired.
    let outcome = log.apply_retention(15_000).expect("retention");
    let start = log.log_start_offset();
    assert!(outcome.deleted_segments > 0);
    assert_eq!(outcome.log_start_offset, start);
    // Batch i has timestamp 100 i, so offset 50 is the first record not older than the
    // cutoff (5_000): exactly the segments wholly before it go.
    let bases: Vec<u64> = segments
        .iter()
        .map(|p| {
            let stem = p.file_stem().and_then(|s| s.to_str()).expect("name");
            stem.parse().expect("base offset")
        })
        .collect();
    let expected_start = *bases.iter().filter(|&&b| b <= 50).max().expect("a base");
    assert_eq!(start, expected_start);
    let read = log.read(start, usize::MAX).expect("read");
    assert_eq!(
        decode_all(&read.chunks).len() as u64,
        before.high_watermark - start
    );
    let remaining = segment_files(dir.path(), "log");
    assert_eq!(
        remaining.len(),
        segments.len() - outcome.deleted_segments as usize
    );
    assert!(matches!(
        log.read(0, 1),
        Err(StorageError::OffsetOutOfRange { .. })
    ));

    // By size: keep at most ~40 KiB (the active segment always stays).
    let sized = LogOptions {
        retention_ms: None,
        retention_bytes: Some(40 << 10),
        ..small_options()
    };
    log.close().expect("close");
    drop(log);
    let log = open_log(dir.path(), sized.clone());
    assert_eq!(
        log.log_start_offset(),
        start,
        "log start persists across reopen"
    );
    log.apply_retention(0).expect("retention");
    assert!(log.stats().size_bytes <= 40 << 10);
    assert!(
        log.stats().size_bytes + (16 << 10) > 40 << 10,
        "deleted no more than needed"
    );
    let start2 = log.log_start_offset();
    assert!(start2 > start);
    drop(log); // crash: the start still persists
    let log = open_log(dir.path(), sized);
    assert_eq!(log.log_start_offset(), start2);
    assert_eq!(log.high_watermark(), 100);
}

#[test]
fn a_clean_close_leaves_a_marker_and_a_recovery_point() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = open_log(dir.path(), small_options());
    for i in 0..60 {
        log.append(&batch(2, i, 400)).expect("append");
    }
    assert!(log.stats().segments > 3, "several segments");
    log.close().expect("close");
    drop(log);
    assert!(dir.path().join("clean-shutdown").exists());
    assert!(dir.path().join("recovery-point").exists());
    // Without the marker (as after a crash that followed the clean start), only the active
    // segment is scanned: the recovery point covers the rest.
    fs::remove_file(dir.path().join("clean-shutdown")).expect("remove marker");
    let log = open_log(dir.path(), small_options());
    let report = log.recovery_report();
    assert!(!report.clean);
    assert!(
        report.scanned_bytes < 16 << 10,
        "scanned {} bytes",
        report.scanned_bytes
    );
    assert_eq!(log.high_watermark(), 120);
}

/// A cut inside the first batch's leading zero bytes (its base offset 0) leaves a file of
/// zeros, which recovery cannot tell from preallocated space: it recovers an empty log and
/// reports no cut (found by the proptest above at a cut of 1 byte).
#[test]
fn a_cut_inside_the_first_batchs_zero_bytes_recovers_an_empty_log() {
    let pristine = tempfile::tempdir().expect("tempdir");
    write_and_crash(pristine.path(), 5);
    for cut in 1..8u64 {
        let dir = tempfile::tempdir().expect("tempdir");
        copy_dir(pristine.path(), dir.path());
        let log_file = &segment_files(dir.path(), "log")[0];
        OpenOptions::new()
            .write(true)
            .open(log_file)
            .expect("open")
            .set_len(cut)
            .expect("truncate");
        let log = open_log(dir.path(), one_segment_options());
        assert_eq!(log.high_watermark(), 0, "cut at {cut}");
        let info = log.append(&batch(1, 0, 10)).expect("append");
        assert_eq!(info.base_offset, 0, "cut at {cut}");
    }
}
