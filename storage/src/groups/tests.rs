//! Tests of the group offsets: commits, reopen, torn and flipped files, the codec.

use super::*;
use proptest::prelude::*;

fn open(dir: &Path) -> GroupStore {
    GroupStore::open(dir).expect("open group store")
}

fn offset(g: &GroupStore, group: &str, topic: &str, p: u32) -> Option<u64> {
    g.fetch(group, topic, p).map(|c| c.offset)
}

#[test]
fn commit_then_fetch() {
    let dir = tempfile::tempdir().expect("tempdir");
    let g = open(dir.path());
    assert_eq!(offset(&g, "g", "t", 0), None);
    let before_ms = now_ms();
    g.commit("g", "t", &[(0, 5, None), (1, 7, Some("m".into()))])
        .expect("commit");
    let c = g.fetch("g", "t", 1).expect("committed");
    assert_eq!(c.offset, 7);
    assert_eq!(c.metadata.as_deref(), Some("m"));
    assert!(c.commit_time_ms >= before_ms && c.commit_time_ms <= now_ms());
    g.commit("g", "t", &[(0, 9, None)]).expect("commit");
    assert_eq!(offset(&g, "g", "t", 0), Some(9));
    assert_eq!(offset(&g, "g", "t", 1), Some(7), "other partitions stay");
    assert_eq!(offset(&g, "g", "u", 0), None);
    assert_eq!(offset(&g, "h", "t", 0), None);
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
fn reopen_sees_the_last_commits_with_metadata() {
    let dir = tempfile::tempdir().expect("tempdir");
    let g = open(dir.path());
    g.commit("g", "t", &[(0, 5, Some("first".into()))])
        .expect("commit");
    g.commit("g", "t", &[(0, 6, Some("second".into())), (2, 1, None)])
        .expect("commit");
    g.commit("g", "u", &[(0, 3, Some(String::new()))])
        .expect("commit");
    g.commit("h", "t", &[(0, 11, None)]).expect("commit");
    let before = g.group_offsets("g").expect("offsets");
    drop(g);
    let g = open(dir.path());
    assert_eq!(g.group_offsets("g").expect("offsets"), before);
    let c = g.fetch("g", "t", 0).expect("committed");
    assert_eq!((c.offset, c.metadata.as_deref()), (6, Some("second")));
    assert_eq!(
        g.fetch("g", "u", 0).and_then(|c| c.metadata),
        Some(String::new()),
        "empty metadata is not none"
    );
    assert_eq!(g.fetch("g", "t", 2).map(|c| c.metadata), Some(None));
    assert_eq!(offset(&g, "h", "t", 0), Some(11));
    assert_eq!(g.list(), vec!["g".to_string(), "h".to_string()]);
    assert!(g.damaged().is_empty());
}

#[test]
fn many_commits_then_reopen_match_a_model() {
    let dir = tempfile::tempdir().expect("tempdir");
    let g = open(dir.path());
    let mut model: BTreeMap<(String, String, u32), u64> = BTreeMap::new();
    for i in 0..300u64 {
        let group = format!("g{}", i % 4);
        let topic = format!("t{}", i % 3);
        let entries: Vec<(u32, u64, Option<String>)> = (0..(i % 5) as u32)
            .map(|p| (p, i * 10 + u64::from(p), Some(format!("m{i}"))))
            .collect();
        g.commit(&group, &topic, &entries).expect("commit");
        for (p, o, _) in &entries {
            model.insert((group.clone(), topic.clone(), *p), *o);
        }
    }
    drop(g);
    let g = open(dir.path());
    let mut seen = BTreeMap::new();
    for group in g.list() {
        for (topic, p, c) in g.group_offsets(&group).expect("offsets") {
            seen.insert((group.clone(), topic, p), c.offset);
        }
    }
    assert_eq!(seen, model);
}

#[test]
fn concurrent_commits_all_land_and_survive_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let g = open(dir.path());
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
    let g = open(dir.path());
    for thread in 0..4u32 {
        assert_eq!(
            offset(&g, &format!("g{}", thread % 2), "t", thread),
            Some(24)
        );
    }
}

#[test]
fn bad_input_is_refused_and_changes_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let g = open(dir.path());
    g.commit("g", "t", &[(0, 1, None)]).expect("commit");
    let file = dir.path().join("g.offsets");
    let bytes = fs::read(&file).expect("read");
    for bad in ["", ".", "..", "../x", "a/b", "a b"] {
        assert!(matches!(
            g.commit(bad, "t", &[(0, 2, None)]),
            Err(StorageError::InvalidName { kind: "group", .. })
        ));
        assert!(matches!(
            g.commit("g", bad, &[(0, 2, None)]),
            Err(StorageError::InvalidName { kind: "topic", .. })
        ));
    }
    let too_long = "x".repeat(MAX_METADATA_BYTES + 1);
    assert!(matches!(
        g.commit("g", "t", &[(1, 2, None), (0, 2, Some(too_long))]),
        Err(StorageError::InvalidConfig { .. })
    ));
    g.commit("g", "t", &[]).expect("an empty commit is a no-op");
    g.commit("e", "t", &[]).expect("an empty commit is a no-op");
    // The limit itself is allowed.
    g.commit("m", "t", &[(0, 1, Some("y".repeat(MAX_METADATA_BYTES)))])
        .expect("metadata at the limit");

    assert_eq!(offset(&g, "g", "t", 0), Some(1));
    assert_eq!(
        offset(&g, "g", "t", 1),
        None,
        "a refused call lands nothing"
    );
    assert_eq!(g.list(), vec!["g".to_string(), "m".to_string()]);
    assert_eq!(fs::read(&file).expect("read"), bytes);
    let mut names: Vec<String> = fs::read_dir(dir.path())
        .expect("ls")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, vec!["g.offsets", "m.offsets"]);
}

/// Writes `bytes` as group `g`'s file (beside an intact group `h`), reopens, and checks
/// that the result is either exactly what was committed or no commits at all, reported
/// as damaged. Returns whether the file was accepted.
fn reopen_with(dir: &Path, bytes: &[u8], committed: &GroupMap) -> bool {
    for entry in fs::read_dir(dir).expect("ls") {
        let path = entry.expect("entry").path();
        if path.to_string_lossy().contains(CORRUPT_SUFFIX) {
            fs::remove_file(&path).expect("rm corrupt");
        }
    }
    let path = dir.join("g.offsets");
    fs::write(&path, bytes).expect("write");
    let g = open(dir);
    assert_eq!(offset(&g, "h", "t", 0), Some(77), "other groups unaffected");
    match g.group_offsets("g") {
        Ok(_) => {
            assert_eq!(
                g.inner.groups.read().get("g").map(|m| GroupMap::clone(m)),
                Some(committed.clone()),
                "an accepted file must hold exactly what was committed"
            );
            assert!(g.damaged().is_empty());
            true
        }
        Err(_) => {
            assert_eq!(g.fetch("g", "t", 0), None);
            assert_eq!(g.damaged().len(), 1, "{:?}", g.damaged());
            let (aside, _) = &g.damaged()[0];
            assert!(!path.exists(), "moved aside");
            assert_eq!(fs::read(aside).expect("kept"), bytes, "data kept");
            false
        }
    }
}

#[test]
fn torn_files_are_never_misread() {
    let dir = tempfile::tempdir().expect("tempdir");
    let g = open(dir.path());
    g.commit("h", "t", &[(0, 77, None)]).expect("commit");
    g.commit(
        "g",
        "t",
        &[(0, 123_456, Some("meta".into())), (1, 99, None)],
    )
    .expect("commit");
    g.commit("g", "other", &[(4, 1 << 40, Some("x".into()))])
        .expect("commit");
    let committed = GroupMap::clone(&g.inner.groups.read()["g"]);
    drop(g);
    let good = fs::read(dir.path().join("g.offsets")).expect("read");
    assert!(reopen_with(dir.path(), &good, &committed), "intact file");
    for len in 0..good.len() {
        assert!(
            !reopen_with(dir.path(), &good[..len], &committed),
            "truncated to {len} bytes was accepted"
        );
    }
    // Extra bytes after a valid file are damage too.
    let mut longer = good.clone();
    longer.extend_from_slice(&[0; 4]);
    assert!(!reopen_with(dir.path(), &longer, &committed));
}

#[test]
fn flipped_bytes_are_never_misread() {
    let dir = tempfile::tempdir().expect("tempdir");
    let g = open(dir.path());
    g.commit("h", "t", &[(0, 77, None)]).expect("commit");
    g.commit("g", "t", &[(0, 5, Some("meta".into())), (3, 1_000, None)])
        .expect("commit");
    let committed = GroupMap::clone(&g.inner.groups.read()["g"]);
    drop(g);
    let good = fs::read(dir.path().join("g.offsets")).expect("read");
    for i in 0..good.len() {
        for mask in [0x01u8, 0x80, 0xff] {
            let mut bad = good.clone();
            bad[i] ^= mask;
            assert!(
                !reopen_with(dir.path(), &bad, &committed),
                "byte {i} ^ {mask:#x} was accepted"
            );
        }
    }
}

#[test]
fn a_second_damaged_file_keeps_the_first_copy() {
    let dir = tempfile::tempdir().expect("tempdir");
    fs::write(dir.path().join("g.offsets"), b"first").expect("write");
    drop(open(dir.path()));
    fs::write(dir.path().join("g.offsets"), b"second").expect("write");
    let g = open(dir.path());
    assert_eq!(g.damaged()[0].0, dir.path().join("g.offsets.corrupt.1"));
    assert_eq!(
        fs::read(dir.path().join("g.offsets.corrupt")).expect("read"),
        b"first"
    );
    // The group works again, and the damaged copies are not read as groups.
    g.commit("g", "t", &[(0, 1, None)]).expect("commit");
    drop(g);
    let g = open(dir.path());
    assert_eq!(g.list(), vec!["g".to_string()]);
    assert!(g.damaged().is_empty());
}

#[test]
fn leftover_temp_files_are_ignored_and_removed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let g = open(dir.path());
    g.commit("g", "t", &[(0, 1, None)]).expect("commit");
    drop(g);
    let tmp = dir.path().join("g.offsets.tmp");
    fs::write(&tmp, b"garbage from a crash mid-commit").expect("write");
    let g = open(dir.path());
    assert_eq!(offset(&g, "g", "t", 0), Some(1));
    assert!(g.damaged().is_empty());
    assert!(!tmp.exists());
}

#[test]
fn unreadable_file_does_not_stop_the_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    // A folder where a file should be: reading it fails.
    fs::create_dir(dir.path().join("g.offsets")).expect("mkdir");
    let g = open(dir.path());
    assert_eq!(g.damaged().len(), 1);
    g.commit("g", "t", &[(0, 1, None)]).expect("commit");
    assert_eq!(offset(&g, "g", "t", 0), Some(1));
}

#[test]
fn deleting_a_topic_rewrites_only_affected_groups() {
    let dir = tempfile::tempdir().expect("tempdir");
    let g = open(dir.path());
    g.commit("a", "t", &[(0, 1, None)]).expect("commit");
    g.commit("a", "u", &[(0, 2, None)]).expect("commit");
    g.commit("b", "t", &[(0, 3, None)]).expect("commit");
    g.commit("c", "u", &[(0, 4, None)]).expect("commit");
    let c_file = dir.path().join("c.offsets");
    let c_before = fs::metadata(&c_file).expect("stat").modified().ok();
    g.delete_topic("t").expect("delete topic");
    assert_eq!(offset(&g, "a", "t", 0), None);
    assert_eq!(offset(&g, "a", "u", 0), Some(2));
    assert_eq!(g.list(), vec!["a".to_string(), "c".to_string()]);
    assert!(
        !dir.path().join("b.offsets").exists(),
        "emptied group file removed"
    );
    assert_eq!(
        fs::metadata(&c_file).expect("stat").modified().ok(),
        c_before
    );
    g.delete_topic("nothing-here").expect("no-op");
    drop(g);
    let g = open(dir.path());
    assert_eq!(g.list(), vec!["a".to_string(), "c".to_string()]);
    assert_eq!(offset(&g, "a", "t", 0), None);
    assert_eq!(offset(&g, "c", "u", 0), Some(4));
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

proptest! {
    #[test]
    fn codec_round_trips(map in arb_map()) {
        let bytes = encode(&map).expect("encode");
        prop_assert_eq!(decode(&bytes).expect("decode"), map);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        let _ = decode(&bytes);
    }

    /// Arbitrary bodies under a valid checksum reach the structural checks, which must
    /// refuse or decode without panicking; whatever decodes re-encodes to the same bytes.
    #[test]
    fn arbitrary_bodies_with_a_valid_checksum_never_panic(
        tail in proptest::collection::vec(any::<u8>(), 0..256),
        count in 0u32..8,
    ) {
        let mut bytes = MAGIC.to_vec();
        bytes.push(VERSION);
        bytes.extend_from_slice(&count.to_le_bytes());
        bytes.extend_from_slice(&tail);
        let crc = crc32fast::hash(&bytes);
        bytes.extend_from_slice(&crc.to_le_bytes());
        if let Ok(map) = decode(&bytes) {
            prop_assert_eq!(encode(&map).expect("encode"), bytes);
        }
    }
}
