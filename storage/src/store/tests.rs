//! Tests of the store that need its private parts (failure injection, the open pool).

use super::*;
use crate::fsutil::inject;

/// Folders in `<data>/topics` other than the internal topics'.
fn user_topic_folders(data: &Path) -> usize {
    fs::read_dir(data.join("topics"))
        .expect("ls")
        .filter(|e| {
            !e.as_ref()
                .expect("entry")
                .file_name()
                .to_string_lossy()
                .starts_with(INTERNAL_TOPIC_PREFIX)
        })
        .count()
}

#[test]
fn a_creation_that_fails_leaves_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(StoreOptions::new(dir.path())).expect("open");
    // One partition opens on this thread, where the injected failure applies: the
    // segment's preallocation fails as on a full disk.
    inject::fail_preallocate_after(Some(0));
    let err = store
        .create_topic("t", TopicConfig::default())
        .expect_err("the disk is full");
    inject::fail_preallocate_after(None);
    assert!(err.is_no_space(), "the original error is kept: {err:?}");
    assert_eq!(user_topic_folders(dir.path()), 0);
    assert!(matches!(
        store.topic("t"),
        Err(StorageError::TopicNotFound { .. })
    ));
    store
        .create_topic("t", TopicConfig::default())
        .expect("the name is free");
}

#[test]
fn an_unstorable_config_is_refused_before_anything_is_made() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(StoreOptions::new(dir.path())).expect("open");
    let err = store
        .create_topic("t", TopicConfig::default().segment_ms(u64::MAX))
        .expect_err("TOML integers stop at i64::MAX");
    assert!(matches!(err, StorageError::InvalidConfig { .. }), "{err:?}");
    assert_eq!(user_topic_folders(dir.path()), 0);
}

#[test]
fn folders_are_created_with_missing_ancestors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let deep = dir.path().join("a/b/c");
    create_dir_durable(&deep).expect("create");
    assert!(deep.is_dir());
    create_dir_durable(&deep).expect("exists already");
    fs::write(dir.path().join("file"), b"x").expect("write");
    assert!(create_dir_durable(&dir.path().join("file/sub")).is_err());
}

#[test]
fn parallel_open_returns_results_in_job_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = TopicConfig::default();
    let jobs: Vec<PartitionJob<'_>> = (0..20)
        .map(|partition| PartitionJob {
            topic: "t",
            dir: dir.path().join(partition.to_string()),
            partition,
            config: &config,
            limits: StoreOptions::new(dir.path()).limits(),
            // Odd partitions have no folder, so they fail.
            must_exist: partition % 2 == 1,
        })
        .collect();
    let results = open_partitions(&jobs);
    assert_eq!(results.len(), 20);
    for (p, result) in (0u32..).zip(&results) {
        match result {
            Ok(log) => {
                assert_eq!(p % 2, 0);
                assert_eq!(log.partition(), p);
            }
            Err(_) => assert_eq!(p % 2, 1),
        }
    }
}

#[test]
fn a_deletion_whose_move_fails_keeps_every_handle_serving() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(StoreOptions::new(dir.path())).expect("open");
    let topic = store
        .create_topic("t", TopicConfig::default().partitions(2))
        .expect("create");
    let batch = crate::batch::encode_batch(&[crate::batch::Record {
        value: bytes::Bytes::from_static(b"v"),
        timestamp_ms: 1,
        ..Default::default()
    }]);
    topic
        .partition(0)
        .expect("p0")
        .append(&batch)
        .expect("append");

    fault::fail_next_rename(topic.dir());
    let err = store.delete_topic("t").expect_err("the move fails");
    assert!(
        matches!(err, StorageError::Io { .. }),
        "the I/O error is returned: {err:?}"
    );
    // The store lists the very same topic again, and the handle taken before the deletion
    // (as the broker holds one) appends and reads without a restart.
    assert!(store.topic("t").expect("still there").is_same(&topic));
    assert_eq!(store.topics().len(), 1);
    for p in 0..2 {
        let log = topic.partition(p).expect("reopened");
        let info = log.append(&batch).expect("appends again");
        assert_eq!(info.base_offset, u64::from(p == 0));
        assert_eq!(
            log.read(0, 1 << 20).expect("read").high_watermark,
            info.next_offset
        );
    }
    // Nothing was left armed: the next deletion goes through.
    store.delete_topic("t").expect("delete");
    assert!(matches!(
        store.topic("t"),
        Err(StorageError::TopicNotFound { .. })
    ));
    assert!(topic
        .partition(0)
        .expect("closed log")
        .append(&batch)
        .is_err());
}
