//! Tests of the group state: commits and metadata through the groups topic, replay at reopen,
//! snapshots and compaction, damage, the legacy import, and both codecs.

use std::fs;

use super::*;
use crate::store::{Store, StoreOptions};
use proptest::prelude::*;

/// Opens a store with a small groups topic (2 partitions of 16 KiB segments), so tests roll
/// and compact segments quickly.
fn open(dir: &Path) -> Store {
    Store::open(StoreOptions::new(dir).groups_topic(2, 16 << 10)).expect("open store")
}

fn offset(g: &GroupStore, group: &str, topic: &str, p: u32) -> Option<u64> {
    g.fetch(group, topic, p).map(|c| c.offset)
}

/// Closes and reopens the store, returning the new one.
fn reopen(store: Store, dir: &Path) -> Store {
    store.close().expect("close");
    drop(store);
    open(dir)
}

/// Every (group, topic, partition) → offset, for comparing whole states.
fn all_offsets(g: &GroupStore) -> BTreeMap<(String, String, u32), u64> {
    let mut seen = BTreeMap::new();
    for group in g.list() {
        for (topic, p, c) in g.group_offsets(&group).unwrap_or_default() {
            seen.insert((group.clone(), topic, p), c.offset);
        }
    }
    seen
}

fn end_offsets(g: &GroupStore) -> Vec<u64> {
    g.topic()
        .partitions()
        .map(|(_, log)| log.expect("open").high_watermark())
        .collect()
}

#[test]
fn commit_then_fetch() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    let g = store.groups();
    assert_eq!(offset(g, "g", "t", 0), None);
    let before_ms = now_ms();
    g.commit("g", "t", &[(0, 5, None), (1, 7, Some("m".into()))])
        .expect("commit");
    let c = g.fetch("g", "t", 1).expect("committed");
    assert_eq!(c.offset, 7);
    assert_eq!(c.metadata.as_deref(), Some("m"));
    assert!(c.commit_time_ms >= before_ms && c.commit_time_ms <= now_ms());
    g.commit("g", "t", &[(0, 9, None)]).expect("commit");
    assert_eq!(offset(g, "g", "t", 0), Some(9));
    assert_eq!(offset(g, "g", "t", 1), Some(7), "other partitions stay");
    assert_eq!(offset(g, "g", "u", 0), None);
    assert_eq!(offset(g, "h", "t", 0), None);
    assert_eq!(g.list(), vec!["g".to_string()]);
    let all = g.group_offsets("g").expect("offsets");
    let keys: Vec<(&str, u32, u64)> = all
        .iter()
        .map(|(t, p, c)| (t.as_str(), *p, c.offset))
        .collect();
    assert_eq!(keys, vec![("t", 0, 9), ("t", 1, 7)]);
    assert!(matches!(
        g.group_offsets("nobody"),
        Err(StorageError::GroupNotFound { .. })
    ));
}

#[test]
fn commits_are_records_of_the_groups_topic_in_the_groups_partition() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    let g = store.groups();
    assert_eq!(g.topic().name(), GROUPS_TOPIC);
    assert!(
        store.topics().is_empty(),
        "the internal topic is not listed"
    );
    let before = end_offsets(g);
    g.commit("payments", "t", &[(0, 1, None), (1, 2, None)])
        .expect("commit");
    let after = end_offsets(g);
    let p = g.partition_of("payments") as usize;
    for (i, (b, a)) in before.iter().zip(&after).enumerate() {
        let expected = if i == p { b + 1 } else { *b };
        assert_eq!(
            *a, expected,
            "partition {i}: one record, in the group's partition"
        );
    }
    // The record is an ordinary record keyed by the group, readable through the log.
    let log = g.topic().partition(p as u32).expect("log");
    let read = log.read(before[p], 1 << 20).expect("read");
    let batch = crate::batch::BatchView::parse(&read.chunks[0]).expect("batch");
    let record = batch.records().next().expect("one").expect("valid");
    assert_eq!(record.key, Some(b"payments".as_slice()));
    match GroupRecord::decode(record.value).expect("decode") {
        GroupRecord::Commit {
            group,
            topic,
            entries,
        } => {
            assert_eq!((group.as_str(), topic.as_str()), ("payments", "t"));
            assert_eq!(entries.len(), 2);
        }
        other => panic!("expected a commit, got {other:?}"),
    }
}

#[test]
fn the_group_partition_is_kafkas_murmur2() {
    // Kafka's UtilsTest vectors for murmur2, as the proto partitioner also checks.
    assert_eq!(murmur2(b"21") as i32, -973_932_308);
    assert_eq!(murmur2(b"foobar") as i32, -790_332_482);
    assert_eq!(murmur2(b"a-little-bit-long-string") as i32, -985_981_536);
    assert_eq!(partition_for_group("anything", 1), 0);
    assert_eq!(partition_for_group("anything", 0), 0, "no division by zero");
}

#[test]
fn reopen_sees_the_last_commits_with_metadata() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    let g = store.groups();
    g.commit("g", "t", &[(0, 5, Some("first".into()))])
        .expect("commit");
    g.commit("g", "t", &[(0, 6, Some("second".into())), (2, 1, None)])
        .expect("commit");
    g.commit("g", "u", &[(0, 3, Some(String::new()))])
        .expect("commit");
    g.commit("h", "t", &[(0, 11, None)]).expect("commit");
    let before = g.group_offsets("g").expect("offsets");
    let store = reopen(store, dir.path());
    let g = store.groups();
    assert_eq!(g.group_offsets("g").expect("offsets"), before);
    let c = g.fetch("g", "t", 0).expect("committed");
    assert_eq!((c.offset, c.metadata.as_deref()), (6, Some("second")));
    assert_eq!(
        g.fetch("g", "u", 0).and_then(|c| c.metadata),
        Some(String::new()),
        "empty metadata is not none"
    );
    assert_eq!(g.fetch("g", "t", 2).map(|c| c.metadata), Some(None));
    assert_eq!(offset(g, "h", "t", 0), Some(11));
    assert_eq!(g.list(), vec!["g".to_string(), "h".to_string()]);
    assert!(g.damaged().is_empty());
}

#[test]
fn a_crash_without_close_keeps_every_acknowledged_commit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    for i in 0..20u64 {
        store
            .groups()
            .commit(&format!("g{}", i % 3), "t", &[(0, i, None)])
            .expect("commit");
    }
    let before = all_offsets(store.groups());
    // No close: the next open recovers the groups topic like any partition after a crash.
    drop(store);
    let store = open(dir.path());
    assert_eq!(all_offsets(store.groups()), before);
}

#[test]
fn many_commits_then_reopen_match_a_model() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    let mut model: BTreeMap<(String, String, u32), u64> = BTreeMap::new();
    for i in 0..300u64 {
        let group = format!("g{}", i % 4);
        let topic = format!("t{}", i % 3);
        let entries: Vec<(u32, u64, Option<String>)> = (0..(i % 5) as u32)
            .map(|p| (p, i * 10 + u64::from(p), Some(format!("m{i}"))))
            .collect();
        store
            .groups()
            .commit(&group, &topic, &entries)
            .expect("commit");
        for (p, o, _) in &entries {
            model.insert((group.clone(), topic.clone(), *p), *o);
        }
    }
    let store = reopen(store, dir.path());
    assert_eq!(all_offsets(store.groups()), model);
}

#[test]
fn concurrent_commits_all_land_and_survive_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    let g = store.groups().clone();
    std::thread::scope(|s| {
        for thread in 0..4u32 {
            let g = g.clone();
            s.spawn(move || {
                for i in 0..25u64 {
                    // Two threads share each group, each on its own partition.
                    let group = format!("g{}", thread % 2);
                    g.commit(&group, "t", &[(thread, i, None)]).expect("commit");
                }
            });
        }
    });
    drop(g);
    let store = reopen(store, dir.path());
    for thread in 0..4u32 {
        assert_eq!(
            offset(store.groups(), &format!("g{}", thread % 2), "t", thread),
            Some(24)
        );
    }
}

#[test]
fn bad_input_is_refused_and_changes_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    let g = store.groups();
    g.commit("g", "t", &[(0, 1, None)]).expect("commit");
    let ends = end_offsets(g);
    for bad in ["", ".", "..", "../x", "a/b", "a b"] {
        assert!(matches!(
            g.commit(bad, "t", &[(0, 2, None)]),
            Err(StorageError::InvalidName { kind: "group", .. })
        ));
        assert!(matches!(
            g.commit("g", bad, &[(0, 2, None)]),
            Err(StorageError::InvalidName { kind: "topic", .. })
        ));
        assert!(matches!(
            g.put_metadata(bad, vec![1]),
            Err(StorageError::InvalidName { kind: "group", .. })
        ));
    }
    let too_long = "x".repeat(MAX_METADATA_BYTES + 1);
    assert!(matches!(
        g.commit("g", "t", &[(1, 2, None), (0, 2, Some(too_long))]),
        Err(StorageError::InvalidConfig { .. })
    ));
    assert!(matches!(
        g.put_metadata("g", vec![0; MAX_GROUP_METADATA_BYTES + 1]),
        Err(StorageError::InvalidConfig { .. })
    ));
    assert!(matches!(
        g.delete_group("nobody"),
        Err(StorageError::GroupNotFound { .. })
    ));
    // A change larger than half a segment of the groups topic (8 KiB here).
    let big: Vec<(u32, u64, Option<String>)> = (0..4)
        .map(|p| (p, 1, Some("z".repeat(MAX_METADATA_BYTES))))
        .collect();
    match g.commit("g", "t", &big) {
        Err(StorageError::InvalidConfig { reason, .. }) => {
            assert!(reason.contains("does not fit"), "{reason}")
        }
        other => panic!("expected InvalidConfig, got {other:?}"),
    }
    g.commit("g", "t", &[]).expect("an empty commit is a no-op");
    g.commit("e", "t", &[]).expect("an empty commit is a no-op");
    assert_eq!(end_offsets(g), ends, "nothing was written");
    // The limit itself is allowed.
    g.commit("m", "t", &[(0, 1, Some("y".repeat(MAX_METADATA_BYTES)))])
        .expect("metadata at the limit");
    assert_eq!(offset(g, "g", "t", 0), Some(1));
    assert_eq!(offset(g, "g", "t", 1), None, "a refused call lands nothing");
    assert_eq!(g.list(), vec!["g".to_string(), "m".to_string()]);
}

#[test]
fn metadata_is_kept_replaced_cleared_and_deleted_with_the_group() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    let g = store.groups();
    g.put_metadata("members", b"v1".to_vec()).expect("put");
    g.put_metadata("members", b"v2".to_vec()).expect("put");
    g.put_metadata("other", b"x".to_vec()).expect("put");
    g.commit("other", "t", &[(0, 4, None)]).expect("commit");
    assert_eq!(g.metadata("members").as_deref(), Some(b"v2".as_slice()));
    assert_eq!(
        g.list(),
        vec!["members".to_string(), "other".to_string()],
        "a group with only metadata is listed"
    );
    let store = reopen(store, dir.path());
    let g = store.groups();
    assert_eq!(g.metadata("members").as_deref(), Some(b"v2".as_slice()));
    let all: Vec<String> = g.all_metadata().into_iter().map(|(n, _)| n).collect();
    assert_eq!(all, vec!["members".to_string(), "other".to_string()]);
    g.put_metadata("members", Vec::new()).expect("clear");
    assert_eq!(g.metadata("members"), None);
    assert_eq!(g.list(), vec!["other".to_string()]);
    g.delete_group("other").expect("delete");
    assert!(g.list().is_empty());
    assert_eq!(offset(g, "other", "t", 0), None);
    let store = reopen(store, dir.path());
    assert!(store.groups().list().is_empty(), "deletions survive reopen");
}

#[test]
fn deleting_a_topic_forgets_only_its_offsets() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    let g = store.groups();
    g.commit("a", "t", &[(0, 1, None)]).expect("commit");
    g.commit("a", "u", &[(0, 2, None)]).expect("commit");
    g.commit("b", "t", &[(0, 3, None)]).expect("commit");
    g.commit("c", "u", &[(0, 4, None)]).expect("commit");
    let ends = end_offsets(g);
    g.delete_topic("t").expect("delete topic");
    assert_eq!(
        end_offsets(g).iter().sum::<u64>(),
        ends.iter().sum::<u64>() + 2,
        "one record per affected group, none for c"
    );
    assert_eq!(offset(g, "a", "t", 0), None);
    assert_eq!(offset(g, "a", "u", 0), Some(2));
    assert_eq!(g.list(), vec!["a".to_string(), "c".to_string()]);
    g.delete_topic("nothing-here").expect("no-op");
    let store = reopen(store, dir.path());
    let g = store.groups();
    assert_eq!(g.list(), vec!["a".to_string(), "c".to_string()]);
    assert_eq!(offset(g, "a", "t", 0), None);
    assert_eq!(offset(g, "c", "u", 0), Some(4));
}

#[test]
fn snapshots_bound_the_log_and_replay_to_the_same_state() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    let g = store.groups().clone();
    let mut max_segments = 0;
    for i in 0..2_000u64 {
        let group = format!("g{}", i % 7);
        g.commit(&group, &format!("t{}", i % 2), &[((i % 3) as u32, i, None)])
            .expect("commit");
        if i % 5 == 0 {
            g.put_metadata(&group, i.to_le_bytes().to_vec())
                .expect("metadata");
        }
        if i % 50 == 0 {
            g.compact_if_due().expect("compact");
        }
        let segments: u32 = g
            .topic()
            .partitions()
            .map(|(_, l)| l.expect("open").stats().segments)
            .max()
            .unwrap_or(0);
        max_segments = max_segments.max(segments);
    }
    let starts: Vec<u64> = g
        .topic()
        .partitions()
        .map(|(_, l)| l.expect("open").log_start_offset())
        .collect();
    assert!(
        starts.iter().all(|&s| s > 0),
        "old segments were deleted: {starts:?}"
    );
    assert!(
        max_segments <= 6,
        "compaction keeps a few 16 KiB segments per partition, saw {max_segments}"
    );
    let offsets = all_offsets(&g);
    let metadata = g.all_metadata();
    drop(g);
    let store = reopen(store, dir.path());
    assert_eq!(all_offsets(store.groups()), offsets);
    assert_eq!(store.groups().all_metadata(), metadata);
    assert!(store.groups().damaged().is_empty());
}

#[test]
fn a_snapshot_of_an_emptied_partition_replays_empty() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    let g = store.groups();
    g.commit("gone", "t", &[(0, 1, None)]).expect("commit");
    g.delete_group("gone").expect("delete");
    let outcome = g.snapshot(g.partition_of("gone")).expect("snapshot");
    assert_eq!(outcome.groups, 0);
    let store = reopen(store, dir.path());
    assert!(store.groups().list().is_empty());
}

#[test]
fn a_damaged_record_is_reported_and_what_came_before_is_kept() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    let g = store.groups();
    g.commit("g", "t", &[(0, 1, None)]).expect("commit");
    let p = g.partition_of("g");
    let log = g.topic().partition(p).expect("log");
    // A valid batch whose value is not a groups record (an unknown version).
    let batch = crate::batch::encode_batch(&[crate::batch::Record {
        key: Some(bytes::Bytes::from_static(b"g")),
        value: bytes::Bytes::from_static(&[9, 9, 9]),
        headers: vec![],
        timestamp_ms: 1,
    }]);
    log.append(&batch).expect("append");
    log.flush().expect("flush");
    let store = reopen(store, dir.path());
    let g = store.groups();
    assert_eq!(offset(g, "g", "t", 0), Some(1), "state before the damage");
    assert_eq!(g.damaged().len(), 1, "{:?}", g.damaged());
    assert!(g.damaged()[0].1.contains("version"), "{:?}", g.damaged());
    assert_eq!(store.damaged().len(), 1, "the store reports it too");
}

#[test]
fn internal_topic_names_are_reserved() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    for name in [GROUPS_TOPIC, "__other"] {
        match store.create_topic(name, TopicConfig::default()) {
            Err(StorageError::InvalidName { reason, .. }) => {
                assert!(reason.contains("reserved"), "{reason}")
            }
            other => panic!("{name}: expected InvalidName, got {other:?}"),
        }
    }
    assert!(matches!(
        store.delete_topic(GROUPS_TOPIC),
        Err(StorageError::TopicNotFound { .. })
    ));
    assert!(store.topic(GROUPS_TOPIC).is_err());
    store
        .create_topic("_single", TopicConfig::default())
        .expect("one underscore is an ordinary name");
}

/// Writes a legacy offsets file for `group`.
fn write_legacy(dir: &Path, group: &str, map: &GroupMap) {
    let folder = dir.join("groups");
    fs::create_dir_all(&folder).expect("mkdir");
    let bytes = legacy::encode(map).expect("encode");
    fs::write(folder.join(format!("{group}.offsets")), bytes).expect("write");
}

fn legacy_map(entries: &[(&str, u32, u64)]) -> GroupMap {
    let mut map = GroupMap::new();
    for (topic, p, o) in entries {
        map.entry(topic.to_string()).or_default().insert(
            *p,
            CommittedOffset {
                offset: *o,
                metadata: Some("old".into()),
                commit_time_ms: 42,
            },
        );
    }
    map
}

#[test]
fn legacy_files_are_imported_once_and_never_override_newer_commits() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_legacy(
        dir.path(),
        "old",
        &legacy_map(&[("t", 0, 10), ("t", 1, 11)]),
    );
    let store = open(dir.path());
    let g = store.groups();
    let c = g.fetch("old", "t", 1).expect("imported");
    assert_eq!((c.offset, c.commit_time_ms), (11, 42));
    assert_eq!(c.metadata.as_deref(), Some("old"));
    let folder = dir.path().join("groups");
    assert!(!folder.join("old.offsets").exists(), "moved aside");
    assert!(folder.join("old.offsets.imported").exists(), "kept");
    g.commit("old", "t", &[(0, 99, None)]).expect("commit");
    // A second copy of the file (as if the rename had been lost) fills only what is missing.
    write_legacy(dir.path(), "old", &legacy_map(&[("t", 0, 10), ("u", 0, 5)]));
    let store = reopen(store, dir.path());
    let g = store.groups();
    assert_eq!(offset(g, "old", "t", 0), Some(99), "the newer commit wins");
    assert_eq!(
        offset(g, "old", "u", 0),
        Some(5),
        "the missing entry is filled"
    );
    assert!(g.damaged().is_empty());
}

#[test]
fn damaged_legacy_files_are_set_aside_and_reported() {
    let dir = tempfile::tempdir().expect("tempdir");
    let folder = dir.path().join("groups");
    fs::create_dir_all(&folder).expect("mkdir");
    fs::write(folder.join("g.offsets"), b"first").expect("write");
    drop(open(dir.path()));
    fs::write(folder.join("g.offsets"), b"second").expect("write");
    // A folder where a file should be: reading it fails, and the open goes on.
    fs::create_dir(folder.join("dir.offsets")).expect("mkdir");
    let tmp = folder.join("h.offsets.tmp");
    fs::write(&tmp, b"garbage from a crash mid-commit").expect("write");
    let store = open(dir.path());
    let g = store.groups();
    let damaged: Vec<&PathBuf> = g.damaged().iter().map(|(p, _)| p).collect();
    assert!(
        damaged.contains(&&folder.join("g.offsets.corrupt.1")),
        "{damaged:?}"
    );
    assert_eq!(g.damaged().len(), 2, "{:?}", g.damaged());
    assert_eq!(
        fs::read(folder.join("g.offsets.corrupt")).expect("read"),
        b"first"
    );
    assert!(!tmp.exists(), "leftover temp files are removed");
    assert!(g.list().is_empty());
    g.commit("g", "t", &[(0, 1, None)])
        .expect("the group works");
}

/// Legacy bytes must decode to exactly what was encoded, or be refused.
fn legacy_accepts(bytes: &[u8], committed: &GroupMap) -> bool {
    match legacy::decode(bytes) {
        Ok(map) => {
            assert_eq!(
                &map, committed,
                "an accepted file must hold exactly what was committed"
            );
            true
        }
        Err(_) => false,
    }
}

#[test]
fn torn_or_flipped_legacy_files_are_never_misread() {
    let committed = legacy_map(&[("t", 0, 123_456), ("t", 1, 99), ("other", 4, 1 << 40)]);
    let good = legacy::encode(&committed).expect("encode");
    assert!(legacy_accepts(&good, &committed));
    for len in 0..good.len() {
        assert!(
            !legacy_accepts(&good[..len], &committed),
            "truncated to {len}"
        );
    }
    let mut longer = good.clone();
    longer.extend_from_slice(&[0; 4]);
    assert!(!legacy_accepts(&longer, &committed));
    for i in 0..good.len() {
        for mask in [0x01u8, 0x80, 0xff] {
            let mut bad = good.clone();
            bad[i] ^= mask;
            assert!(!legacy_accepts(&bad, &committed), "byte {i} ^ {mask:#x}");
        }
    }
}

fn arb_map() -> impl Strategy<Value = GroupMap> {
    proptest::collection::vec(
        (
            "[a-zA-Z0-9._-]{1,12}",
            any::<u32>(),
            any::<u64>(),
            any::<i64>(),
            proptest::option::of("\\PC{0,20}"),
        ),
        0..20,
    )
    .prop_map(|entries| {
        let mut map = GroupMap::new();
        for (topic, p, offset, commit_time_ms, metadata) in entries {
            if validate_name("topic", &topic).is_ok() {
                map.entry(topic).or_default().insert(
                    p,
                    CommittedOffset {
                        offset,
                        metadata,
                        commit_time_ms,
                    },
                );
            }
        }
        map.retain(|_, partitions| !partitions.is_empty());
        map
    })
}

fn arb_name() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9_-][a-zA-Z0-9._-]{0,15}"
}

fn arb_record() -> impl Strategy<Value = GroupRecord> {
    prop_oneof![
        (arb_name(), arb_name(), arb_map()).prop_map(|(group, topic, map)| {
            GroupRecord::Commit {
                group,
                topic,
                entries: map
                    .into_values()
                    .flat_map(|partitions| partitions.into_iter())
                    .collect(),
            }
        }),
        (arb_name(), arb_name())
            .prop_map(|(group, topic)| GroupRecord::ForgetTopic { group, topic }),
        (arb_name(), proptest::collection::vec(any::<u8>(), 0..64))
            .prop_map(|(group, metadata)| GroupRecord::Metadata { group, metadata }),
        arb_name().prop_map(|group| GroupRecord::ForgetGroup { group }),
        Just(GroupRecord::SnapshotMarker),
        (
            arb_name(),
            arb_map(),
            proptest::option::of(proptest::collection::vec(any::<u8>(), 0..64))
        )
            .prop_map(|(group, offsets, metadata)| GroupRecord::GroupSnapshot {
                group,
                offsets,
                metadata
            }),
    ]
}

proptest! {
    #[test]
    fn record_codec_round_trips(record in arb_record()) {
        let bytes = record.encode().expect("encode");
        prop_assert_eq!(GroupRecord::decode(&bytes).expect("decode"), record);
    }

    /// Every strict prefix of a record is refused, never misread.
    #[test]
    fn truncated_records_are_refused(record in arb_record()) {
        let bytes = record.encode().expect("encode");
        for len in 0..bytes.len() {
            prop_assert!(GroupRecord::decode(&bytes[..len]).is_err(), "prefix of {len}");
        }
    }

    /// Arbitrary bytes after a valid version and kind must decode or be refused, never
    /// panic; whatever decodes re-encodes to the same bytes.
    #[test]
    fn arbitrary_record_bytes_never_panic(
        kind in 0u8..8,
        tail in proptest::collection::vec(any::<u8>(), 0..256),
    ) {
        let mut bytes = vec![RECORD_VERSION, kind];
        bytes.extend_from_slice(&tail);
        if let Ok(record) = GroupRecord::decode(&bytes) {
            prop_assert_eq!(record.encode().expect("encode"), bytes);
        }
    }

    #[test]
    fn legacy_codec_round_trips(map in arb_map()) {
        let bytes = legacy::encode(&map).expect("encode");
        prop_assert_eq!(legacy::decode(&bytes).expect("decode"), map);
    }

    #[test]
    fn arbitrary_legacy_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        let _ = legacy::decode(&bytes);
    }
}

/// A replicated writer as the Raft apply behaves: the batch is appended to every replica's
/// log (here the leader's and one follower's), and `append` returns once the leader's holds it.
#[derive(Debug)]
struct ApplyToAll(Vec<Store>);

impl GroupsWriter for ApplyToAll {
    fn append(&self, partition: u32, batch: Bytes) -> Result<()> {
        for store in &self.0 {
            let log = store.groups().topic().partition(partition)?;
            let info = log.append(&batch)?;
            log.sync_through(info.next_offset)?;
        }
        Ok(())
    }
}

#[test]
fn a_replicated_store_writes_only_through_its_writer_and_followers_catch_up_from_the_log() {
    let (a, b) = (
        tempfile::tempdir().expect("a"),
        tempfile::tempdir().expect("b"),
    );
    let (leader, follower) = (open(a.path()), open(b.path()));
    leader
        .groups()
        .replicate_with(Arc::new(ApplyToAll(vec![leader.clone(), follower.clone()])));
    assert!(leader.groups().is_replicated());
    assert!(
        leader.groups().compact_if_due().expect("no-op").is_empty(),
        "nothing is due on a fresh topic"
    );
    let g = leader.groups();
    g.commit("g1", "t", &[(0, 5, None)]).expect("commit");
    g.commit("g2", "t", &[(1, 7, None)]).expect("commit");
    g.put_metadata("g1", b"members".to_vec()).expect("metadata");
    g.commit("g1", "t", &[(0, 6, None)]).expect("commit");
    assert_eq!(
        offset(g, "g1", "t", 0),
        Some(6),
        "the leader's view follows its log"
    );

    // The follower's view lags until it catches up with its log.
    let f = follower.groups();
    assert_eq!(offset(f, "g1", "t", 0), None);
    for p in 0..2 {
        let end = f.catch_up(p).expect("catch up");
        assert_eq!(end, f.topic().partition(p).expect("p").high_watermark());
    }
    assert_eq!(all_offsets(f), all_offsets(g));
    assert_eq!(f.metadata("g1").as_deref(), Some(&b"members"[..]));

    // A delete goes through the log too, and a caught-up follower forgets the group.
    g.delete_group("g1").expect("delete");
    assert!(offset(g, "g1", "t", 0).is_none());
    for p in 0..2 {
        f.catch_up(p).expect("catch up");
    }
    assert_eq!(f.list(), vec!["g2".to_string()]);
    assert!(f.metadata("g1").is_none());

    // A failing writer changes nothing: the view holds only what the log holds.
    #[derive(Debug)]
    struct Down;
    impl GroupsWriter for Down {
        fn append(&self, partition: u32, _: Bytes) -> Result<()> {
            Err(StorageError::Unavailable {
                topic: GROUPS_TOPIC.into(),
                partition,
                reason: "no quorum".into(),
            })
        }
    }
    g.replicate_with(Arc::new(Down));
    let before = end_offsets(g);
    let err = g.commit("g2", "t", &[(1, 99, None)]).expect_err("down");
    assert!(matches!(err, StorageError::Unavailable { .. }), "{err}");
    assert_eq!(offset(g, "g2", "t", 1), Some(7));
    assert_eq!(end_offsets(g), before);
}

#[path = "tests/replicated.rs"]
mod replicated;
