//! The store: topics on disk, configs that survive reopen, bad input refused, damage
//! contained.

mod common;

use std::fs;

use common::{batch, decode_all};
use rill_storage::{FlushPolicy, StorageError, Store, StoreOptions, TopicConfig};

fn open(dir: &std::path::Path) -> Store {
    Store::open(StoreOptions::new(dir)).expect("open store")
}

#[test]
fn topics_and_offsets_survive_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    let config = TopicConfig::default()
        .partitions(3)
        .retention_bytes(Some(1 << 30))
        .segment_bytes(1 << 20)
        .flush(FlushPolicy::Always);
    let t = store
        .create_topic("orders", config.clone())
        .expect("create");
    assert_eq!(t.partition_count(), 3);
    t.partition(2)
        .expect("p2")
        .append(&batch(3, 5, 10))
        .expect("append");
    store
        .groups()
        .commit("g", "orders", &[(2, 2, Some("m".into()))])
        .expect("commit");
    store
        .create_topic("a.b-c_d", TopicConfig::default())
        .expect("create");
    let names: Vec<String> = store
        .topics()
        .iter()
        .map(|t| t.name().to_string())
        .collect();
    assert_eq!(names, vec!["a.b-c_d", "orders"]);
    store.close().expect("close");
    drop((store, t));

    let store = open(dir.path());
    let t = store.topic("orders").expect("topic");
    assert_eq!(t.config(), &config);
    let log = t.partition(2).expect("p2");
    assert!(log.recovery_report().clean);
    assert_eq!(
        decode_all(&log.read(0, 1 << 20).expect("read").chunks).len(),
        3
    );
    assert_eq!(
        store.groups().fetch("g", "orders", 2).map(|c| c.offset),
        Some(2)
    );
    assert!(matches!(
        t.partition(3),
        Err(StorageError::PartitionNotFound { partitions: 3, .. })
    ));
}

#[test]
fn bad_names_and_configs_are_refused_and_create_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    for name in ["", ".", "..", "../x", "a/b", "a b", &"x".repeat(250)] {
        assert!(
            matches!(
                store.create_topic(name, TopicConfig::default()),
                Err(StorageError::InvalidName { .. })
            ),
            "{name:?}"
        );
    }
    for config in [
        TopicConfig::default().partitions(0),
        TopicConfig::default().partitions(100_000),
        TopicConfig::default().segment_bytes(1),
    ] {
        assert!(matches!(
            store.create_topic("t", config),
            Err(StorageError::InvalidConfig { .. })
        ));
    }
    assert_eq!(
        fs::read_dir(dir.path().join("topics")).expect("ls").count(),
        0
    );
    store
        .create_topic("t", TopicConfig::default())
        .expect("create");
    assert!(matches!(
        store.create_topic("t", TopicConfig::default()),
        Err(StorageError::TopicExists { .. })
    ));
}

#[test]
fn delete_removes_the_folder_and_frees_the_name() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    let t = store
        .create_topic("t", TopicConfig::default().partitions(2))
        .expect("create");
    t.partition(0)
        .expect("p0")
        .append(&batch(1, 0, 10))
        .expect("append");
    store
        .groups()
        .commit("g", "t", &[(0, 1, None)])
        .expect("commit");
    store.delete_topic("t").expect("delete");
    assert!(!dir.path().join("topics/t").exists());
    assert!(matches!(
        store.topic("t"),
        Err(StorageError::TopicNotFound { .. })
    ));
    assert!(store.groups().fetch("g", "t", 0).is_none());
    assert!(matches!(
        store.delete_topic("t"),
        Err(StorageError::TopicNotFound { .. })
    ));
    let t = store
        .create_topic("t", TopicConfig::default())
        .expect("create again");
    assert_eq!(t.partition(0).expect("p0").high_watermark(), 0);
}

#[test]
fn interrupted_creation_and_damage_do_not_stop_the_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    store
        .create_topic("good", TopicConfig::default().partitions(3))
        .expect("create");
    store
        .create_topic("bad-config", TopicConfig::default())
        .expect("create");
    store.close().expect("close");
    drop(store);
    // A creation that crashed before writing topic.toml.
    fs::create_dir_all(dir.path().join("topics/half/0")).expect("mkdir");
    // A damaged config.
    fs::write(
        dir.path().join("topics/bad-config/topic.toml"),
        "partitions = \"x\"",
    )
    .expect("write");
    // A partition whose folder became a file: it cannot be opened.
    let p1 = dir.path().join("topics/good/1");
    fs::remove_dir_all(&p1).expect("rm");
    fs::write(&p1, b"not a folder").expect("write");

    let store = open(dir.path());
    assert!(
        !dir.path().join("topics/half").exists(),
        "half-created topic removed"
    );
    assert!(matches!(
        store.topic("bad-config"),
        Err(StorageError::TopicNotFound { .. })
    ));
    assert_eq!(store.damaged().len(), 1, "{:?}", store.damaged());
    let good = store.topic("good").expect("good");
    assert!(matches!(
        good.partition(1),
        Err(StorageError::Fenced { partition: 1, .. })
    ));
    good.partition(0)
        .expect("p0")
        .append(&batch(1, 0, 1))
        .expect("p0 serves");
    good.partition(2)
        .expect("p2")
        .append(&batch(1, 0, 1))
        .expect("p2 serves");
}
