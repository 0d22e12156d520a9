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
    let user_folders = fs::read_dir(dir.path().join("topics"))
        .expect("ls")
        .filter(|e| {
            !e.as_ref()
                .expect("entry")
                .file_name()
                .to_string_lossy()
                .starts_with("__")
        })
        .count();
    assert_eq!(user_folders, 0, "only the internal groups topic is there");
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

#[test]
fn create_list_and_describe() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    assert!(store.topics().is_empty());
    for (name, partitions) in [("zeta", 1), ("alpha", 4), ("mid.dle", 2)] {
        let t = store
            .create_topic(name, TopicConfig::default().partitions(partitions))
            .expect("create");
        assert_eq!(t.name(), name);
        assert_eq!(t.partition_count(), partitions);
        assert_eq!(t.dir(), dir.path().join("topics").join(name));
        assert!(t.dir().join("topic.toml").is_file());
    }
    let names: Vec<String> = store
        .topics()
        .iter()
        .map(|t| t.name().to_string())
        .collect();
    assert_eq!(names, vec!["alpha", "mid.dle", "zeta"]);
    let alpha = store.topic("alpha").expect("alpha");
    let partitions: Vec<u32> = alpha
        .partitions()
        .map(|(p, log)| {
            let log = log.expect("open");
            assert_eq!(log.partition(), p);
            assert_eq!(log.topic(), "alpha");
            let stats = log.stats();
            assert_eq!((stats.log_start_offset, stats.high_watermark), (0, 0));
            assert_eq!(stats.segments, 1);
            p
        })
        .collect();
    assert_eq!(partitions, vec![0, 1, 2, 3]);
    for p in 0..4 {
        assert!(dir.path().join(format!("topics/alpha/{p}")).is_dir());
    }
    assert!(matches!(
        store.topic("beta"),
        Err(StorageError::TopicNotFound { .. })
    ));
    assert!(store.damaged().is_empty());
    assert_eq!(store.data_dir(), dir.path());
}

#[test]
fn every_config_survives_reopen_and_sets_the_batch_limit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let configs = [
        TopicConfig::default(),
        TopicConfig::default()
            .partitions(2)
            .retention_ms(None)
            .retention_bytes(Some(5 << 20))
            .segment_bytes(64 << 10)
            .segment_ms(60_000)
            .flush(FlushPolicy::Never),
        TopicConfig::default().flush(FlushPolicy::IntervalMs(25)),
        TopicConfig::default().flush(FlushPolicy::Always),
    ];
    let store = Store::open(StoreOptions::new(dir.path()).max_batch_bytes(1 << 20)).expect("open");
    assert_eq!(store.options().batch_limit_bytes(), 1 << 20);
    for (i, config) in configs.iter().enumerate() {
        store
            .create_topic(&format!("t{i}"), config.clone())
            .expect("create");
    }
    store.close().expect("close");
    drop(store);
    let store = Store::open(StoreOptions::new(dir.path()).max_batch_bytes(4096)).expect("open");
    for (i, config) in configs.iter().enumerate() {
        let t = store.topic(&format!("t{i}")).expect("topic");
        assert_eq!(t.config(), config);
        let log = t.partition(0).expect("p0");
        assert_eq!(log.options().flush, config.flush);
        assert_eq!(log.options().segment_bytes, config.segment_bytes);
        assert_eq!(
            log.options().max_batch_bytes,
            4096,
            "from the store options"
        );
        assert!(matches!(
            log.append(&batch(1, 0, 8192)),
            Err(StorageError::BatchTooLarge { .. })
        ));
    }
}

#[test]
fn many_topics_reopen_with_their_data() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    for t in 0..6u32 {
        let topic = store
            .create_topic(&format!("t{t}"), TopicConfig::default().partitions(5))
            .expect("create");
        for (p, log) in topic.partitions() {
            let log = log.expect("open");
            for _ in 0..(t + p) {
                log.append(&batch(2, 0, 10)).expect("append");
            }
        }
    }
    // No close: the reopen recovers every partition.
    drop(store);
    let store = open(dir.path());
    assert_eq!(store.topics().len(), 6);
    for t in 0..6u32 {
        let topic = store.topic(&format!("t{t}")).expect("topic");
        for (p, log) in topic.partitions() {
            assert_eq!(
                log.expect("open").high_watermark(),
                u64::from(2 * (t + p)),
                "t{t}/{p}"
            );
        }
    }
}

#[test]
fn a_damaged_topic_keeps_its_data_and_its_name() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    store
        .create_topic("t", TopicConfig::default())
        .expect("create");
    store.close().expect("close");
    drop(store);
    let config = dir.path().join("topics/t/topic.toml");
    // Parses, but is out of range: also damage.
    fs::write(
        &config,
        "partitions = 0\nsegment_bytes = 4096\nsegment_ms = 1\nflush = \"never\"\n",
    )
    .expect("write");
    let store = open(dir.path());
    assert_eq!(store.damaged().len(), 1, "{:?}", store.damaged());
    assert_eq!(store.damaged()[0].0, config);
    assert!(store.topics().is_empty());
    assert!(dir.path().join("topics/t/0").is_dir(), "data kept");
    assert!(matches!(
        store.create_topic("t", TopicConfig::default()),
        Err(StorageError::TopicExists { .. })
    ));
    // Unknown fields are damage too (deny_unknown_fields), as is a file that is not TOML.
    for text in ["partitions = 1\nsurprise = true\n", "\u{0}\u{1}not toml"] {
        fs::write(&config, text).expect("write");
        let store = open(dir.path());
        assert_eq!(store.damaged().len(), 1, "{text:?}");
        assert!(store.topic("t").is_err());
    }
}

#[test]
fn a_missing_partition_folder_is_fenced_not_recreated_empty() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    let t = store
        .create_topic("t", TopicConfig::default().partitions(2))
        .expect("create");
    t.partition(1)
        .expect("p1")
        .append(&batch(3, 0, 10))
        .expect("append");
    store.close().expect("close");
    drop((store, t));
    fs::remove_dir_all(dir.path().join("topics/t/1")).expect("rm");
    let store = open(dir.path());
    let t = store.topic("t").expect("topic");
    match t.partition(1) {
        Err(StorageError::Fenced {
            topic,
            partition: 1,
            reason,
        }) => {
            assert_eq!(topic, "t");
            assert!(!reason.is_empty());
        }
        other => panic!("expected a fenced partition, got {other:?}"),
    }
    assert!(!dir.path().join("topics/t/1").exists(), "not recreated");
    let states: Vec<bool> = t.partitions().map(|(_, log)| log.is_ok()).collect();
    assert_eq!(states, vec![true, false]);
    store
        .close()
        .expect("a fenced slot does not fail the close");
}

#[test]
fn interrupted_deletions_are_finished_at_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    drop(open(dir.path()));
    let leftover = dir.path().join("trash/t-123/0");
    fs::create_dir_all(&leftover).expect("mkdir");
    fs::write(leftover.join("00000000000000000000.log"), b"old data").expect("write");
    fs::write(dir.path().join("trash/stray"), b"x").expect("write");
    let store = open(dir.path());
    assert_eq!(
        fs::read_dir(dir.path().join("trash")).expect("ls").count(),
        0
    );
    assert!(store.damaged().is_empty());
}

#[test]
fn deletion_closes_handles_and_drops_stale_offsets() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    let t = store
        .create_topic("t", TopicConfig::default())
        .expect("create");
    let log = t.partition(0).expect("p0");
    log.append(&batch(1, 0, 10)).expect("append");
    store
        .groups()
        .commit("g", "other", &[(0, 4, None)])
        .expect("commit");
    store.delete_topic("t").expect("delete");
    assert!(
        log.append(&batch(1, 0, 10)).is_err(),
        "a handle kept across a deletion no longer appends"
    );
    assert_eq!(
        fs::read_dir(dir.path().join("trash")).expect("ls").count(),
        0
    );
    assert!(matches!(
        store.delete_topic("../t"),
        Err(StorageError::InvalidName { .. })
    ));
    // Offsets a crashed deletion left behind do not apply to a new topic of the same name.
    store
        .groups()
        .commit("g", "t", &[(0, 9, None)])
        .expect("commit");
    store
        .create_topic("t", TopicConfig::default())
        .expect("create again");
    assert!(store.groups().fetch("g", "t", 0).is_none());
    assert_eq!(
        store.groups().fetch("g", "other", 0).map(|c| c.offset),
        Some(4)
    );
    drop(store);
    let store = open(dir.path());
    assert!(store.groups().fetch("g", "t", 0).is_none());
}

#[test]
fn damaged_group_files_are_reported_by_the_store() {
    let dir = tempfile::tempdir().expect("tempdir");
    drop(open(dir.path()));
    // An offsets file of an earlier version, imported at open: this one is torn.
    fs::create_dir_all(dir.path().join("groups")).expect("mkdir");
    fs::write(dir.path().join("groups/g.offsets"), b"RLGO torn").expect("write");
    let store = open(dir.path());
    assert_eq!(store.damaged().len(), 1, "{:?}", store.damaged());
    assert!(store.groups().list().is_empty());
}

#[test]
fn concurrent_creations_of_one_name_make_one_topic() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    let created = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let store = store.clone();
                s.spawn(move || {
                    store
                        .create_topic("t", TopicConfig::default().partitions(2))
                        .is_ok()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("thread"))
            .filter(|ok| *ok)
            .count()
    });
    assert_eq!(created, 1);
    assert_eq!(store.topics().len(), 1);
}
