//! Storage engine microbenchmarks (issue 2's figures): append with each flush mode, catch-up
//! read of 1 GiB, and open time of a 1 GiB partition after a clean shutdown and after a crash.
//!
//! `cargo bench -p rill-bench --bench storage`. Data goes under `target/bench-data` (the
//! same disk as the build) and is removed afterwards.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use rill_storage::batch::BatchBuilder;
use rill_storage::recovery::{CLEAN_MARKER_FILE, RECOVERY_POINT_FILE};
use rill_storage::{FlushPolicy, LogOptions, PartitionLog, TopicConfig};

const RECORD_BYTES: usize = 1024;
const BATCH_RECORDS: usize = 100;
const GIB: u64 = 1 << 30;

fn bench_dir(name: &str) -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../target/bench-data")
        .join(name);
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).expect("bench folder");
    root
}

fn options(segment_bytes: u64, flush: FlushPolicy) -> LogOptions {
    let config = TopicConfig::default()
        .segment_bytes(segment_bytes)
        .retention_ms(None)
        .flush(flush);
    LogOptions::new("bench", 0, &config)
}

/// One batch of 100 records of 1 KiB of incompressible bytes.
fn batch() -> Bytes {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let value: Vec<u8> = (0..RECORD_BYTES)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect();
    let mut b = BatchBuilder::new(BytesMut::with_capacity(
        BATCH_RECORDS * (RECORD_BYTES + 32) + 64,
    ));
    for i in 0..BATCH_RECORDS {
        b.push(None, &value, &[], i as i64);
    }
    b.finish()
}

/// Records and bytes of `n` batches, so criterion prints both records/s and bytes/s.
fn per_batches(batch: &Bytes, n: u64) -> Throughput {
    Throughput::ElementsAndBytes {
        elements: BATCH_RECORDS as u64 * n,
        bytes: batch.len() as u64 * n,
    }
}

fn append(c: &mut Criterion) {
    let batch = batch();
    let mut g = c.benchmark_group("append_1KiB_x100");
    g.sample_size(10).measurement_time(Duration::from_secs(5));

    // A burst: 256 MiB into a fresh partition, within what the page cache absorbs before
    // write-back throttling (dirty_background_ratio) starts.
    g.throughput(per_batches(&batch, 2560));
    g.bench_function("flush_never_burst_256MiB", |b| {
        b.iter_custom(|iters| {
            let mut spent = Duration::ZERO;
            for i in 0..iters {
                let dir = bench_dir(&format!("append-burst-{i}"));
                let log =
                    PartitionLog::open(&dir, options(256 << 20, FlushPolicy::Never)).expect("open");
                let start = Instant::now();
                for _ in 0..2560 {
                    log.append(&batch).expect("append");
                }
                spent += start.elapsed();
                drop(log);
                let _ = std::fs::remove_dir_all(&dir);
            }
            spent
        })
    });
    // Sustained: as long as the measurement runs, so the disk's write-back speed shows.
    g.throughput(per_batches(&batch, 1));
    let dir = bench_dir("append-never");
    let log = PartitionLog::open(&dir, options(256 << 20, FlushPolicy::Never)).expect("open");
    g.bench_function("flush_never_sustained", |b| {
        b.iter(|| log.append(&batch).expect("append"))
    });
    drop(log);
    let _ = std::fs::remove_dir_all(&dir);

    for writers in [1usize, 8] {
        let dir = bench_dir(&format!("append-always-{writers}"));
        let log = PartitionLog::open(&dir, options(256 << 20, FlushPolicy::Always)).expect("open");
        g.throughput(per_batches(&batch, writers as u64));
        g.bench_with_input(
            BenchmarkId::new("flush_always_writers", writers),
            &writers,
            |b, &writers| {
                b.iter_custom(|iters| {
                    let start = Instant::now();
                    std::thread::scope(|s| {
                        for _ in 0..writers {
                            let log = log.clone();
                            let batch = batch.clone();
                            s.spawn(move || {
                                for _ in 0..iters {
                                    let info = log.append(&batch).expect("append");
                                    log.sync_through(info.next_offset).expect("sync");
                                }
                            });
                        }
                    });
                    start.elapsed()
                })
            },
        );
        drop(log);
        let _ = std::fs::remove_dir_all(&dir);
    }
    g.finish();
}

/// Writes about `bytes` of batches into a fresh partition and returns it.
fn fill(dir: &Path, bytes: u64, segment_bytes: u64) -> PartitionLog {
    let batch = batch();
    let log = PartitionLog::open(dir, options(segment_bytes, FlushPolicy::Never)).expect("open");
    let mut written = 0;
    while written < bytes {
        log.append(&batch).expect("append");
        written += batch.len() as u64;
    }
    log
}

fn catch_up(c: &mut Criterion) {
    let dir = bench_dir("read");
    let log = fill(&dir, GIB, 256 << 20);
    let total = log.stats().size_bytes;
    let mut g = c.benchmark_group("catch_up_read");
    g.throughput(Throughput::Bytes(total));
    g.sample_size(10).measurement_time(Duration::from_secs(10));
    g.bench_function("1GiB_16MiB_reads", |b| {
        b.iter(|| {
            let (mut offset, mut seen) = (0u64, 0usize);
            loop {
                let read = log.read(offset, 16 << 20).expect("read");
                if read.chunks.is_empty() {
                    break;
                }
                seen += read.size_bytes();
                offset = read.next_offset;
            }
            assert_eq!(seen as u64, total);
        })
    });
    g.bench_function("1GiB_16MiB_reads_walking_headers", |b| {
        b.iter(|| {
            let (mut offset, mut records) = (0u64, 0u64);
            loop {
                let read = log.read(offset, 16 << 20).expect("read");
                if read.chunks.is_empty() {
                    break;
                }
                for chunk in &read.chunks {
                    for view in rill_storage::batch::batches(chunk) {
                        records += u64::from(view.expect("batch").header().record_count);
                    }
                }
                offset = read.next_offset;
            }
            assert_eq!(records, log.high_watermark());
        })
    });
    g.bench_function("1GiB_16MiB_reads_checksumming_every_byte", |b| {
        b.iter(|| {
            let (mut offset, mut crc) = (0u64, crc32fast::Hasher::new());
            loop {
                let read = log.read(offset, 16 << 20).expect("read");
                if read.chunks.is_empty() {
                    break;
                }
                for chunk in &read.chunks {
                    crc.update(chunk);
                }
                offset = read.next_offset;
            }
            crc.finalize()
        })
    });
    g.finish();
    log.close().expect("close");
    drop(log);

    // As a reader right after a broker restart sees it: a fresh open has verified nothing, so
    // the first read of each batch checks its CRC inside the engine. The open (well under a
    // millisecond after a clean close) is timed too.
    let opts = options(256 << 20, FlushPolicy::Never);
    let mut g = c.benchmark_group("catch_up_read");
    g.throughput(Throughput::Bytes(total));
    g.sample_size(10).measurement_time(Duration::from_secs(10));
    g.bench_function("1GiB_16MiB_reads_after_reopen_engine_checks_crc", |b| {
        b.iter_custom(|iters| {
            let mut spent = Duration::ZERO;
            for _ in 0..iters {
                let start = Instant::now();
                let log = PartitionLog::open(&dir, opts.clone()).expect("open");
                let (mut offset, mut seen) = (0u64, 0usize);
                loop {
                    let read = log.read(offset, 16 << 20).expect("read");
                    if read.chunks.is_empty() {
                        break;
                    }
                    seen += read.size_bytes();
                    offset = read.next_offset;
                }
                spent += start.elapsed();
                assert_eq!(seen as u64, total);
                log.close().expect("close");
            }
            spent
        })
    });
    g.finish();
    let _ = std::fs::remove_dir_all(&dir);
}

fn open_time(c: &mut Criterion) {
    let dir = bench_dir("open");
    let log = fill(&dir, GIB, 128 << 20);
    let total = log.stats().size_bytes;
    let segments = log.stats().segments;
    log.close().expect("close");
    drop(log);
    let opts = options(128 << 20, FlushPolicy::Never);
    let mut g = c.benchmark_group(format!("open_1GiB_{segments}_segments"));
    g.sample_size(10).measurement_time(Duration::from_secs(5));
    g.bench_function("after_clean_shutdown", |b| {
        b.iter_custom(|iters| {
            let mut spent = Duration::ZERO;
            for _ in 0..iters {
                let start = Instant::now();
                let log = PartitionLog::open(&dir, opts.clone()).expect("open");
                spent += start.elapsed();
                assert!(log.recovery_report().clean);
                log.close().expect("close");
            }
            spent
        })
    });
    // After a crash with no recovery point, the whole GiB is scanned and checksummed.
    g.throughput(Throughput::Bytes(total));
    g.bench_function("after_crash_full_scan", |b| {
        b.iter_custom(|iters| {
            let mut spent = Duration::ZERO;
            for _ in 0..iters {
                let _ = std::fs::remove_file(dir.join(CLEAN_MARKER_FILE));
                let _ = std::fs::remove_file(dir.join(RECOVERY_POINT_FILE));
                let start = Instant::now();
                let log = PartitionLog::open(&dir, opts.clone()).expect("open");
                spent += start.elapsed();
                assert_eq!(log.recovery_report().scanned_bytes, total);
                drop(log); // crash again
            }
            spent
        })
    });
    g.finish();
    let _ = std::fs::remove_dir_all(&dir);
}

criterion_group!(benches, append, catch_up, open_time);
criterion_main!(benches);
