//! The registry: ids never given twice, epochs that fence, the old file's import, and
//! compaction (a rewrite cut short anywhere changes nothing; a complete one deletes the
//! segments before it; a replica deletes only at the marker).

use rill_storage::StoreOptions;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use std::sync::atomic::Ordering;

use super::*;
use crate::internal::compact::copy_batches;

/// A single broker over `dir` with its registry (importing an old file, as a single
/// broker does).
fn single(dir: &Path) -> (Broker, ProducerIds) {
    single_with(dir, 1 << 20)
}

/// [`single`] with `__producers` in segments of `segment_bytes`.
fn single_with(dir: &Path, segment_bytes: u64) -> (Broker, ProducerIds) {
    let store = Store::open(StoreOptions::new(dir)).expect("open");
    let ids = ProducerIds::open(store.clone(), true, segment_bytes).expect("ids");
    let broker = Broker::new(
        store,
        crate::Config::new(dir),
        CancellationToken::new(),
        TaskTracker::new(),
    );
    (broker, ids)
}

#[tokio::test]
async fn ids_are_never_given_twice_and_names_are_fenced_by_epoch() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (broker, ids) = single(dir.path());
    assert_eq!(ids.init(&broker, None).await.expect("init"), (0, 0));
    assert_eq!(ids.init(&broker, Some("app")).await.expect("init"), (1, 0));
    assert_eq!(ids.init(&broker, None).await.expect("init"), (2, 0));
    ids.check(1, 0).expect("current epoch");
    assert_eq!(ids.init(&broker, Some("app")).await.expect("init"), (1, 1));
    assert!(matches!(
        ids.check(1, 0),
        Err(BrokerError::ProducerFenced { current: 1, .. })
    ));
    assert!(matches!(
        ids.check(3, 0),
        Err(BrokerError::UnknownProducerId { producer_id: 3 })
    ));
    assert!(ids.init(&broker, Some("bad/name")).await.is_err());
    broker.store().close().expect("close");
    drop((broker, ids));
    // After a restart: the counter and the epochs are where they were.
    let (broker, ids) = single(dir.path());
    assert_eq!(ids.init(&broker, None).await.expect("init"), (3, 0));
    assert_eq!(ids.init(&broker, Some("app")).await.expect("init"), (1, 2));
    assert!(ids.check(1, 1).is_err());
}

#[tokio::test]
async fn an_old_registry_file_is_imported_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join(FILE),
        "next_id = 7\n[named.app]\nid = 4\nepoch = 2\n",
    )
    .expect("write");
    let (broker, ids) = single(dir.path());
    assert!(!dir.path().join(FILE).exists(), "renamed once imported");
    assert!(dir.path().join(IMPORTED_FILE).exists());
    assert!(ids.check(4, 1).is_err(), "the old epoch still fences");
    assert_eq!(ids.init(&broker, Some("app")).await.expect("init"), (4, 3));
    assert_eq!(ids.init(&broker, None).await.expect("init"), (7, 0));
    broker.store().close().expect("close");
    drop((broker, ids));
    // Imported once: a reopen replays the topic, not the renamed file.
    let (broker, ids) = single(dir.path());
    assert_eq!(ids.init(&broker, None).await.expect("init"), (8, 0));
    assert_eq!(ids.init(&broker, Some("app")).await.expect("init"), (4, 4));
}

#[test]
fn records_round_trip_and_bad_bytes_are_refused() {
    for r in [
        ProducerRecord::IdBlock { next_id: 7 },
        ProducerRecord::NamedProducer {
            name: "app".into(),
            id: 3,
            epoch: 2,
        },
    ] {
        assert_eq!(ProducerRecord::decode(&r.encode()).expect("decode"), r);
    }
    assert!(ProducerRecord::decode(b"").is_err());
    assert!(ProducerRecord::decode(b"\x02{}").is_err());
    assert!(ProducerRecord::decode(b"\x01{\"type\":\"other\"}").is_err());
}

#[test]
fn a_block_always_holds_the_id_given_and_a_cluster_commits_the_next_one_early() {
    // A single broker: one id per block, committed with the id.
    assert_eq!(next_block(5, 5, false), Some(6));
    // A cluster: nothing to commit while half a block remains after the id ...
    assert_eq!(next_block(0, 1000, true), None);
    assert_eq!(next_block(499, 1000, true), None);
    // ... then the next whole block, before the current one runs out.
    assert_eq!(next_block(500, 1000, true), Some(2000));
    // A writer whose cursor is at the end (just started) gets a block holding its id.
    assert_eq!(next_block(1000, 1000, true), Some(2000));
    for (id, end, clustered) in [(7, 3, false), (7, 3, true), (2999, 3000, true)] {
        let next = next_block(id, end, clustered).expect("a block");
        assert!(next > id, "block end {next} holds id {id}");
    }
}

#[test]
fn the_newest_epoch_of_an_id_fences_and_blocks_bound_the_known_ids() {
    let mut state = State::default();
    state.apply(ProducerRecord::IdBlock { next_id: 10 });
    // A block never shrinks the known ids (records apply in log order, but a stale
    // writer's block may come after a newer one).
    state.apply(ProducerRecord::IdBlock { next_id: 4 });
    assert_eq!(state.block_end, 10);
    state.apply(ProducerRecord::NamedProducer {
        name: "app".into(),
        id: 2,
        epoch: 5,
    });
    assert_eq!(state.epochs.get(&2), Some(&5));
}

/// A small segment: a few dozen inits span several.
const SEGMENT_BYTES: u64 = 4 << 10;

fn close(broker: Broker, ids: ProducerIds) {
    broker.store().close().expect("close");
    drop((broker, ids));
}

fn state(ids: &ProducerIds) -> State {
    ids.inner.state.read().clone()
}

fn log_of(ids: &ProducerIds) -> PartitionLog {
    producers_log(&ids.inner.store, SEGMENT_BYTES).expect("the log")
}

/// Unnamed and named inits, `rounds` times; the first round also wears out the epoch of
/// the name `worn`, which then moves to a new id: its old id must stay fenced at its last
/// epoch. Returns that old id.
async fn populate(ids: &ProducerIds, broker: &Broker, rounds: u32) -> i64 {
    let (worn, _) = ids.init(broker, Some("worn")).await.expect("init");
    let record = ProducerRecord::NamedProducer {
        name: "worn".into(),
        id: worn,
        epoch: i16::MAX,
    };
    crate::internal::append(broker, PRODUCERS_TOPIC, 0, to_records(&[record]))
        .await
        .expect("append");
    ids.refresh().await.expect("refresh");
    let (moved, epoch) = ids.init(broker, Some("worn")).await.expect("init");
    assert_ne!(moved, worn, "an exhausted epoch takes a new id");
    assert_eq!(epoch, 0);
    for _ in 0..rounds {
        for _ in 0..3 {
            ids.init(broker, None).await.expect("init");
        }
        for n in 0..6 {
            ids.init(broker, Some(&format!("app-{n}")))
                .await
                .expect("init");
        }
    }
    worn
}

/// What a restart must keep: no id given twice (the next unnamed init gets the block end),
/// a named producer's re-init keeps its id with a higher epoch, and the id a name left stays
/// fenced at its last epoch.
async fn assert_registry_holds(ids: &ProducerIds, broker: &Broker, before: &State, worn: i64) {
    let (next, _) = ids.init(broker, None).await.expect("init");
    assert_eq!(next, before.block_end, "no id is given twice");
    let app = before.named["app-0"];
    assert_eq!(
        ids.init(broker, Some("app-0")).await.expect("init"),
        (app.id, app.epoch + 1),
        "the same id, a higher epoch"
    );
    assert!(
        matches!(
            ids.check(worn, i16::MAX - 1),
            Err(BrokerError::ProducerFenced {
                current: i16::MAX,
                ..
            })
        ),
        "the id a name left stays fenced"
    );
}

/// Every marker in `log`: (its offset, the start it names).
fn markers(log: &PartitionLog) -> Vec<(u64, u64)> {
    let mut found = Vec::new();
    crate::internal::replay_values(log, 0, corrupt, |offset, value| {
        if let ProducerRecord::Compacted { start } = ProducerRecord::decode(value).expect("decodes")
        {
            found.push((offset, start));
        }
        Ok(())
    })
    .expect("read the log");
    found
}

/// A rewrite stopped after any of its batches (a crash, a failover): nothing was deleted,
/// and replay of the old records then the partial rewrite gives exactly the registry before
/// it, on this broker's tail and after a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rewrite_cut_short_after_any_batch_keeps_exactly_the_registry() {
    const LIMIT_BYTES: usize = 128;
    let batches = {
        let dir = tempfile::tempdir().expect("tempdir");
        let (broker, ids) = single(dir.path());
        populate(&ids, &broker, 2).await;
        ids.rewrite_batches(LIMIT_BYTES).0.len()
    };
    assert!(
        batches >= 3,
        "the registry must span several batches to test a cut between them, got {batches}"
    );
    for k in 1..=batches {
        let dir = tempfile::tempdir().expect("tempdir");
        let (broker, ids) = single(dir.path());
        let worn = populate(&ids, &broker, 2).await;
        let before = state(&ids);
        let (rewrite, _) = ids.rewrite_batches(LIMIT_BYTES);
        for batch in rewrite.into_iter().take(k) {
            crate::internal::append(&broker, PRODUCERS_TOPIC, 0, batch)
                .await
                .expect("append a rewrite batch");
        }
        ids.refresh().await.expect("refresh");
        assert_eq!(state(&ids), before, "tail after batch {k} of {batches}");
        assert_eq!(log_of(&ids).log_start_offset(), 0, "no marker, no deletion");
        close(broker, ids);
        let (broker, ids) = single(dir.path());
        assert_eq!(
            state(&ids),
            before,
            "replay after a rewrite cut after batch {k} of {batches}"
        );
        assert_registry_holds(&ids, &broker, &before, worn).await;
    }
}

/// On a single broker: once a segment's worth was appended, the registry is rewritten, a
/// marker names where, and the segments before it are deleted; a restart replays to exactly
/// the same registry (the block end, every name's id and epoch, every id's newest epoch).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compaction_deletes_the_segments_before_it_and_replays_to_the_same_registry() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (broker, ids) = single_with(dir.path(), SEGMENT_BYTES);
    let worn = populate(&ids, &broker, 12).await;
    let log = log_of(&ids);
    let start = log.log_start_offset();
    assert!(start > 0, "the log start should move past 0");
    let found = markers(&log);
    assert!(!found.is_empty(), "a marker ends each compaction");
    for (offset, marker_start) in &found {
        assert!(
            start <= *marker_start && marker_start <= offset,
            "log start {start}, marker at {offset} naming {marker_start}"
        );
    }
    let before = state(&ids);
    drop(log);
    close(broker, ids);
    let (broker, ids) = single_with(dir.path(), SEGMENT_BYTES);
    assert_eq!(log_of(&ids).log_start_offset(), start);
    assert_eq!(state(&ids), before);
    assert_registry_holds(&ids, &broker, &before, worn).await;
}

/// A replica (another broker's copy, fed batch by batch as Raft applies them) deletes its
/// segments before a rewrite only once it reads the rewrite's marker, and holds the same
/// registry throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_deletes_its_segments_before_a_rewrite_only_at_its_marker() {
    let (leader_dir, replica_dir) = (
        tempfile::tempdir().expect("tempdir"),
        tempfile::tempdir().expect("tempdir"),
    );
    let (broker, leader) = single_with(leader_dir.path(), SEGMENT_BYTES);
    let replica_store = Store::open(StoreOptions::new(replica_dir.path())).expect("store");
    let replica = ProducerIds::open(replica_store, false, SEGMENT_BYTES).expect("replica");
    let (leader_log, replica_log) = (log_of(&leader), log_of(&replica));
    leader
        .inner
        .compact_after_bytes
        .store(u64::MAX, Ordering::Relaxed);
    populate(&leader, &broker, 8).await;
    let before = leader_log.high_watermark();
    copy_batches(&leader_log, 0..before, &replica_log);
    replica.refresh().await.expect("refresh");
    {
        let _cursor = leader.inner.cursor.lock().await;
        leader.compact(&broker).await.expect("compact");
    }
    assert!(leader_log.log_start_offset() > 0, "the leader deleted");
    let (marker, start) = *markers(&leader_log).last().expect("a marker");
    assert_eq!(
        start, before,
        "the rewrite starts at the log's end before it"
    );

    copy_batches(&leader_log, before..marker, &replica_log);
    replica.refresh().await.expect("refresh");
    assert_eq!(
        replica_log.log_start_offset(),
        0,
        "no marker, nothing deleted"
    );
    assert_eq!(state(&replica), state(&leader));
    copy_batches(&leader_log, marker..marker + 1, &replica_log);
    replica.refresh().await.expect("refresh");
    assert_eq!(
        replica_log.log_start_offset(),
        leader_log.log_start_offset(),
        "the replica deletes the same segments"
    );
    assert_eq!(state(&replica), state(&leader));
}

fn any_record() -> impl proptest::strategy::Strategy<Value = ProducerRecord> {
    use proptest::prelude::*;
    prop_oneof![
        any::<i64>().prop_map(|next_id| ProducerRecord::IdBlock { next_id }),
        (".{0,30}", any::<i64>(), any::<i16>())
            .prop_map(|(name, id, epoch)| ProducerRecord::NamedProducer { name, id, epoch }),
        any::<u64>().prop_map(|start| ProducerRecord::Compacted { start }),
    ]
}

proptest::proptest! {
    /// Every record, the compaction marker too, reads back as written.
    #[test]
    fn every_record_round_trips(r in any_record()) {
        proptest::prop_assert_eq!(ProducerRecord::decode(&r.encode()).expect("decodes"), r);
    }

    /// Arbitrary bytes are an error, never a panic.
    #[test]
    fn garbage_is_an_error(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64)) {
        let _ = ProducerRecord::decode(&bytes);
    }
}
