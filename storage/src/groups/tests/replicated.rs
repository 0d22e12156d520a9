//! Compaction of a replicated groups topic: the leader commits its snapshot through the
//! writer, and every replica deletes its own segments before it at the marker.

use std::sync::atomic::AtomicUsize;
use std::sync::mpsc;
use std::time::Duration;

use super::*;
use crate::batch::batches;

/// A replicated writer as the Raft apply and the broker's follow hook behave: the batch is
/// appended to every replica's log, then every replica's view catches up (so a follower's
/// walk stops between the batches of a snapshot). Append number `hold.0` (counted from 1)
/// first waits for `hold.1` to be signalled.
#[derive(Debug)]
struct ApplyAndFollow {
    stores: Vec<Store>,
    appends: AtomicUsize,
    hold: Mutex<Option<(usize, mpsc::Receiver<()>)>>,
}

impl ApplyAndFollow {
    fn new(stores: Vec<Store>) -> Arc<Self> {
        Arc::new(ApplyAndFollow {
            stores,
            appends: AtomicUsize::new(0),
            hold: Mutex::new(None),
        })
    }
}

impl GroupsWriter for ApplyAndFollow {
    fn append(&self, partition: u32, batch: Bytes) -> Result<()> {
        let n = self.appends.fetch_add(1, Ordering::SeqCst) + 1;
        let held = {
            let mut hold = self.hold.lock();
            match hold.take() {
                Some((at, release)) if at == n => Some(release),
                other => {
                    *hold = other;
                    None
                }
            }
        };
        if let Some(release) = held {
            release
                .recv_timeout(Duration::from_secs(30))
                .expect("the test releases the held append");
        }
        for store in &self.stores {
            let log = store.groups().topic().partition(partition)?;
            let info = log.append(&batch)?;
            log.sync_through(info.next_offset)?;
        }
        for store in &self.stores {
            store.groups().catch_up(partition)?;
        }
        Ok(())
    }
}

fn log_starts(g: &GroupStore) -> Vec<u64> {
    g.topic()
        .partitions()
        .map(|(_, l)| l.expect("open").log_start_offset())
        .collect()
}

/// Commits enough to make every partition due several times: 40 groups, each with offsets
/// (and commit metadata) for up to 30 partitions of one topic, so that a snapshot takes
/// several batches of half a 16 KiB segment, and group metadata.
fn commit_many(g: &GroupStore, rounds: u64, mut between: impl FnMut(u64)) {
    for i in 0..rounds {
        let group = format!("g{}", i % 40);
        let partition = ((i / 40) % 30) as u32;
        g.commit(
            &group,
            "t",
            &[(partition, i, Some(format!("m{i}-{}", "x".repeat(40))))],
        )
        .expect("commit");
        if i % 7 == 0 {
            g.put_metadata(&group, i.to_le_bytes().to_vec())
                .expect("metadata");
        }
        between(i);
    }
}

#[test]
fn the_leaders_snapshot_reaches_every_replica_which_deletes_its_segments_before_it() {
    let (a, b) = (
        tempfile::tempdir().expect("a"),
        tempfile::tempdir().expect("b"),
    );
    let (leader, follower) = (open(a.path()), open(b.path()));
    let writer = ApplyAndFollow::new(vec![leader.clone(), follower.clone()]);
    leader.groups().replicate_with(writer);
    let g = leader.groups();
    let mut snapshots = Vec::new();
    commit_many(g, 2_400, |i| {
        if i % 100 == 0 {
            snapshots.extend(g.compact_if_due().expect("compact"));
        }
    });
    assert!(
        snapshots.len() >= 4,
        "every partition was due more than once: {snapshots:?}"
    );
    assert!(
        snapshots.iter().all(|s| s.groups > 0),
        "each snapshot holds the partition's groups: {snapshots:?}"
    );
    let f = follower.groups();
    assert!(
        log_starts(g).iter().all(|&s| s > 0),
        "the leader deleted its segments before a snapshot: {:?}",
        log_starts(g)
    );
    assert!(
        log_starts(f).iter().all(|&s| s > 0),
        "the follower deleted its own segments at the marker: {:?}",
        log_starts(f)
    );
    assert_eq!(
        end_offsets(f),
        end_offsets(g),
        "same records at the same offsets"
    );
    assert_eq!(all_offsets(f), all_offsets(g));
    assert_eq!(f.all_metadata(), g.all_metadata());
    let segments: u32 = f
        .topic()
        .partitions()
        .map(|(_, l)| l.expect("open").stats().segments)
        .max()
        .unwrap_or(0);
    assert!(
        segments <= 8,
        "the follower's log stays bounded, {segments} segments"
    );

    // A fresh store on each replica's log, replayed from its new log start, holds exactly
    // the same offsets (with their metadata) and group metadata.
    let expected: Vec<_> = g
        .list()
        .into_iter()
        .map(|group| (group.clone(), g.group_offsets(&group).expect("offsets")))
        .collect();
    let metadata = g.all_metadata();
    // Closing both also ends the writer's clones of them.
    leader.close().expect("close leader");
    follower.close().expect("close follower");
    for dir in [a.path(), b.path()] {
        let store = open(dir);
        let r = store.groups();
        assert!(r.damaged().is_empty(), "{:?}", r.damaged());
        let got: Vec<_> = r
            .list()
            .into_iter()
            .map(|group| (group.clone(), r.group_offsets(&group).expect("offsets")))
            .collect();
        assert_eq!(got, expected, "replay of {dir:?} from its log start");
        assert_eq!(r.all_metadata(), metadata);
        store.close().expect("close");
    }
}

#[test]
fn a_change_during_a_replicated_snapshot_waits_and_never_lands_inside_it() {
    let dir = tempfile::tempdir().expect("dir");
    let leader = open(dir.path());
    let writer = ApplyAndFollow::new(vec![leader.clone()]);
    leader
        .groups()
        .replicate_with(Arc::clone(&writer) as Arc<dyn GroupsWriter>);
    let g = leader.groups().clone();
    commit_many(&g, 1_200, |_| {});
    let p = g.partition_of("g0");
    let before = g.topic().partition(p).expect("p").high_watermark();

    // Hold the snapshot's second batch: its first is in the log, the rest is not.
    let (release, held) = mpsc::channel();
    let next = writer.appends.load(Ordering::SeqCst);
    *writer.hold.lock() = Some((next + 2, held));
    let snapshotting = {
        let g = g.clone();
        std::thread::spawn(move || g.snapshot(p))
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while writer.appends.load(Ordering::SeqCst) < next + 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "the snapshot never reached its second batch"
        );
        std::thread::yield_now();
    }
    let committing = {
        let g = g.clone();
        std::thread::spawn(move || g.commit("g0", "t", &[(0, 99_999, None)]))
    };
    // The change waits for the snapshot: give it ample time to land if it would.
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !committing.is_finished(),
        "a change of the partition went through during its snapshot"
    );
    release.send(()).expect("release");
    let outcome = snapshotting.join().expect("join").expect("snapshot");
    committing.join().expect("join").expect("commit");
    assert!(outcome.groups > 0);
    assert_eq!(offset(&g, "g0", "t", 0), Some(99_999));

    // In the log, from the snapshot's first record to its marker, only snapshot records.
    let log = g.topic().partition(p).expect("p");
    let read = log.read(before, 64 << 20).expect("read");
    let mut kinds = Vec::new();
    for chunk in &read.chunks {
        for batch in batches(chunk) {
            for record in batch.expect("batch").records() {
                let record = record.expect("record");
                if record.offset >= before {
                    kinds.push(match GroupRecord::decode(record.value).expect("decode") {
                        GroupRecord::GroupSnapshot { .. } => 'S',
                        GroupRecord::SnapshotMarker => 'M',
                        _ => 'C',
                    });
                }
            }
        }
    }
    let kinds: String = kinds.into_iter().collect();
    assert!(
        kinds.starts_with('S') && kinds.ends_with("MC") && !kinds[..kinds.len() - 1].contains('C'),
        "the snapshot's records, then the change: {kinds}"
    );
    leader.close().expect("close");
}

/// A writer that commits its first `ok` appends (to every replica, then their views catch
/// up) and refuses the rest, as a leader that lost its leadership mid-snapshot.
#[derive(Debug)]
struct LosesLeadership {
    inner: Arc<ApplyAndFollow>,
    ok: usize,
}

impl GroupsWriter for LosesLeadership {
    fn append(&self, partition: u32, batch: Bytes) -> Result<()> {
        if self.inner.appends.load(Ordering::SeqCst) >= self.ok {
            return Err(StorageError::Unavailable {
                topic: GROUPS_TOPIC.into(),
                partition,
                reason: "not the leader any more".into(),
            });
        }
        self.inner.append(partition, batch)
    }
}

#[test]
fn a_snapshot_cut_short_by_a_leader_change_then_the_new_leaders_snapshot_replay_the_same() {
    let (a, b) = (
        tempfile::tempdir().expect("a"),
        tempfile::tempdir().expect("b"),
    );
    let (old, new) = (open(a.path()), open(b.path()));
    let both = ApplyAndFollow::new(vec![old.clone(), new.clone()]);
    old.groups()
        .replicate_with(Arc::clone(&both) as Arc<dyn GroupsWriter>);
    commit_many(old.groups(), 1_200, |_| {});
    let p = old.groups().partition_of("g0");

    // The old leader's snapshot commits its first batch, then loses the leadership.
    let ok = both.appends.load(Ordering::SeqCst) + 1;
    old.groups().replicate_with(Arc::new(LosesLeadership {
        inner: Arc::clone(&both),
        ok,
    }));
    let start_before = new
        .groups()
        .topic()
        .partition(p)
        .expect("p")
        .log_start_offset();
    let err = old.groups().snapshot(p).expect_err("cut short");
    assert!(matches!(err, StorageError::Unavailable { .. }), "{err}");
    assert_eq!(
        new.groups()
            .topic()
            .partition(p)
            .expect("p")
            .log_start_offset(),
        start_before,
        "a snapshot without its marker deletes nothing"
    );

    // The new leader snapshots at once: its records follow the partial run directly.
    let again = ApplyAndFollow::new(vec![old.clone(), new.clone()]);
    new.groups().replicate_with(again);
    let outcome = new.groups().snapshot(p).expect("snapshot");
    assert!(outcome.groups > 0);
    for store in [&old, &new] {
        assert!(
            store
                .groups()
                .topic()
                .partition(p)
                .expect("p")
                .log_start_offset()
                > start_before,
            "each replica deleted before the snapshot"
        );
    }
    let expected = all_offsets(new.groups());
    let metadata = new.groups().all_metadata();
    assert_eq!(all_offsets(old.groups()), expected);
    old.close().expect("close old");
    new.close().expect("close new");
    for dir in [a.path(), b.path()] {
        let store = open(dir);
        assert_eq!(all_offsets(store.groups()), expected, "replay of {dir:?}");
        assert_eq!(store.groups().all_metadata(), metadata);
        store.close().expect("close");
    }
}
