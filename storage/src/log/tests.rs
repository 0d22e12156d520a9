//! Fencing: a failed sync makes the partition refuse writes while reads go on.

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
    let info = log.append(&one_record()).expect("append");
    log.sync_through(info.next_offset).expect("sync");

    let info = log.append(&one_record()).expect("append");
    log.inject_sync_failure();
    let err = log
        .sync_through(info.next_offset)
        .expect_err("sync must fail");
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
