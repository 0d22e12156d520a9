//! Helpers shared by the storage integration tests.
#![allow(dead_code)]

use std::path::Path;

use bytes::Bytes;
use rill_storage::batch::{self, Record};
use rill_storage::{LogOptions, PartitionLog, TopicConfig};

/// Options with tiny segments (16 KiB), so tests roll many of them.
pub fn small_options() -> LogOptions {
    let config = TopicConfig::default()
        .segment_bytes(16 << 10)
        .retention_ms(None);
    LogOptions::new("t", 0, &config)
}

/// Opens (or creates) a log, panicking with the error on failure.
pub fn open_log(dir: &Path, options: LogOptions) -> PartitionLog {
    PartitionLog::open(dir, options).expect("open log")
}

/// A batch of `n` records: record j has timestamp `ts0 + 10 j`, key `k{j}`, one header, and a
/// value of `value_len` bytes all equal to `ts0 % 256` (a tag tests can check).
pub fn batch(n: u32, ts0: i64, value_len: usize) -> Bytes {
    let records: Vec<Record> = (0..n)
        .map(|j| Record {
            key: Some(Bytes::from(format!("k{j}"))),
            value: Bytes::from(vec![ts0.rem_euclid(256) as u8; value_len.max(1)]),
            headers: vec![("h".to_string(), Bytes::from_static(b"v"))],
            timestamp_ms: ts0 + 10 * i64::from(j),
        })
        .collect();
    batch::encode_batch(&records)
}

/// Decodes every record in `chunks` to `(offset, value)`, checking each batch fully.
pub fn decode_all(chunks: &[Bytes]) -> Vec<(u64, Vec<u8>)> {
    let mut out = Vec::new();
    for chunk in chunks {
        for view in batch::batches(chunk) {
            let view = view.expect("valid batch");
            view.validate().expect("checksum and structure");
            for record in view.records() {
                let record = record.expect("record");
                out.push((record.offset, record.value.to_vec()));
            }
        }
    }
    out
}
