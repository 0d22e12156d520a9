//! Compaction of `__subscriptions`: a rewrite cut short anywhere leaves the state as it was,
//! and a complete one deletes the segments before it and replays to the same state.

use std::path::Path;

use rill_storage::{Store, StoreOptions};

use super::*;
use crate::subscriptions::state::Pending;

/// The smallest accepted segment: a rewrite's batches are a quarter of it, so a few
/// kilobytes of state span several batches.
const SEGMENT_BYTES: u64 = 16 << 10;

/// Names whose keys interleave in byte order (`a`, `a-b`, `a-b/0`, `a/0`: `-` sorts before
/// `/`), so a rewrite in plain key order would split each subscription even without a batch
/// boundary between them.
const NAMES: [&str; 8] = [
    "a",
    "a-b",
    "a.c",
    "orders",
    "orders-eu",
    "orders_us",
    "jobs",
    "jobs-2",
];
const PARTITIONS: u32 = 3;

fn config(topic: &str) -> StoredConfig {
    StoredConfig {
        topic: topic.to_string(),
        ack_deadline_ms: 30_000,
        max_delivery_attempts: 5,
        dead_letter_topic: None,
        max_in_flight_per_partition: 1000,
        from_earliest: true,
        push: None,
    }
}

/// A partition state after some deliveries and acks; its size varies with `seed`, so batch
/// boundaries fall in varied places.
fn acked_state(seed: u64) -> PartitionState {
    let floor = seed * 100 + 7;
    let mut state = PartitionState::starting_at(floor);
    let pending = seed % 3 + 1;
    for i in 0..pending {
        state.pending.insert(
            floor + 2 * i,
            Pending {
                delivery_count: 1 + i as u32,
                lock: None,
                not_before_ms: 0,
                last_error: Some("e".repeat((seed % 5) as usize)),
            },
        );
        state.done.push((floor + 2 * i + 1, floor + 2 * i + 2));
    }
    state.next = floor + 2 * pending;
    state.dead_lettered = seed;
    state
}

/// Creates every subscription (its partitions at some acked state, as after a seek), then
/// acks on partition 0 of each, all below the compaction threshold. Returns what was
/// written, in order.
fn populate(log: &mut StateLog) -> Vec<SubscriptionRecord> {
    let mut written = Vec::new();
    for (i, name) in NAMES.iter().enumerate() {
        let mut change = vec![SubscriptionRecord::Created {
            name: name.to_string(),
            config: config(&format!("topic-{i}")),
        }];
        change.extend((0..PARTITIONS).map(|p| SubscriptionRecord::Partition {
            name: name.to_string(),
            partition: p,
            state: acked_state(i as u64 * 7 + u64::from(p)),
        }));
        log.write(&change).expect("create");
        written.extend(change);
    }
    for (i, name) in NAMES.iter().enumerate() {
        let ack = SubscriptionRecord::Partition {
            name: name.to_string(),
            partition: 0,
            state: acked_state(i as u64 * 7 + 1000),
        };
        log.write(std::slice::from_ref(&ack)).expect("ack");
        written.push(ack);
    }
    written
}

fn open(dir: &Path) -> (Store, StateLog, Vec<SubscriptionRecord>) {
    let store = Store::open(StoreOptions::new(dir)).expect("open the store");
    let (log, replayed) = StateLog::open(&store, SEGMENT_BYTES).expect("open the log");
    (store, log, replayed)
}

/// A rewrite stopped after any of its batches (the broker killed before the rest was
/// written, or a failover): the segments before it are still there, and replay over them and
/// the partial rewrite gives every subscription exactly the state before the compaction.
#[test]
fn a_rewrite_cut_short_after_any_batch_keeps_every_subscriptions_state() {
    let batches = {
        let dir = tempfile::tempdir().expect("tempdir");
        let (_store, mut log, _) = open(dir.path());
        populate(&mut log);
        log.rewrite_batches().len()
    };
    assert!(
        batches >= 3,
        "the state must span several batches to test a cut between them, got {batches}"
    );
    for k in 1..=batches {
        let dir = tempfile::tempdir().expect("tempdir");
        let expected = {
            let (_store, mut log, _) = open(dir.path());
            let written = populate(&mut log);
            assert_eq!(log.log.log_start_offset(), 0, "no compaction ran yet");
            for batch in log.rewrite_batches().iter().take(k) {
                log.append_raw(batch).expect("append a rewrite batch");
            }
            fold(written)
        };
        let (_store, _log, replayed) = open(dir.path());
        let got = fold(replayed);
        assert_eq!(
            got.keys().collect::<Vec<_>>(),
            expected.keys().collect::<Vec<_>>(),
            "subscriptions after a rewrite cut after batch {k} of {batches}"
        );
        for (name, (config, partitions)) in &expected {
            assert_eq!(
                &got[name],
                &(config.clone(), partitions.clone()),
                "subscription {name} after a rewrite cut after batch {k} of {batches}"
            );
        }
    }
}

/// Acks on every partition of every subscription, `rounds` times, compacting whenever due
/// after a write as the background task does; returns what was written.
fn ack_rounds(log: &mut StateLog, rounds: u64) -> Vec<SubscriptionRecord> {
    acks(log, rounds, true)
}

/// Acks on every partition of every subscription, `rounds` times, each one write as a
/// request makes it, then (if `compact`) a compaction when due; returns what was written.
fn acks(log: &mut StateLog, rounds: u64, compact: bool) -> Vec<SubscriptionRecord> {
    let mut written = Vec::new();
    for round in 1..=rounds {
        for (i, name) in NAMES.iter().enumerate() {
            for p in 0..PARTITIONS {
                let ack = SubscriptionRecord::Partition {
                    name: name.to_string(),
                    partition: p,
                    state: acked_state(round * 1000 + i as u64 * 7 + u64::from(p)),
                };
                log.write(std::slice::from_ref(&ack)).expect("ack");
                if compact {
                    log.compact_if_due().expect("compact");
                }
                written.push(ack);
            }
        }
    }
    written
}

/// Every marker in `log`: (its offset, the start it names).
fn markers(log: &PartitionLog) -> Vec<(u64, u64)> {
    let mut found = Vec::new();
    crate::internal::replay_values(log, 0, corrupt, |offset, value| {
        if let SubscriptionRecord::Compacted { start } =
            SubscriptionRecord::decode(value).expect("decodes")
        {
            found.push((offset, start));
        }
        Ok(())
    })
    .expect("read the log");
    found
}

/// On a single broker: once a segment's worth was appended, a compaction (the background
/// task's, run here after each write) rewrites the state, a marker
/// names where, and the segments before it are deleted; replay from the new log start (which
/// skips the marker) gives the same state, and the deleted part never comes back.
#[test]
fn a_compaction_deletes_the_segments_before_it_and_replays_to_the_same_state() {
    let dir = tempfile::tempdir().expect("tempdir");
    let expected = {
        let (_store, mut log, _) = open(dir.path());
        let mut written = populate(&mut log);
        written.extend(ack_rounds(&mut log, 6));
        let start = log.log.log_start_offset();
        assert!(start > 0, "the log start should move past 0");
        let found = markers(&log.log);
        assert!(!found.is_empty(), "a marker ends each compaction");
        for (offset, marker_start) in &found {
            assert!(
                start <= *marker_start && marker_start <= offset,
                "log start {start}, marker at {offset} naming {marker_start}"
            );
        }
        fold(written)
    };
    let (_store, log, replayed) = open(dir.path());
    assert!(log.log.log_start_offset() > 0);
    assert_eq!(fold(replayed), expected);
}

/// Copies the batches of `from` in `offsets` to `to`, as a replica's apply appends them.
fn copy_batches(from: &PartitionLog, offsets: std::ops::Range<u64>, to: &PartitionLog) {
    let mut at = offsets.start;
    while at < offsets.end {
        let read = from.read(at, 1 << 20).expect("read");
        for chunk in &read.chunks {
            for batch in rill_storage::batch::batches(chunk) {
                let batch = batch.expect("a batch");
                let base = batch.header().base_offset;
                if base >= at && base < offsets.end {
                    let appended = to
                        .append(&Bytes::copy_from_slice(batch.as_bytes()))
                        .expect("append");
                    assert_eq!(appended.base_offset, base, "the replica's offsets match");
                }
            }
        }
        at = read.next_offset;
    }
}

/// A replica (another broker's copy, fed batch by batch as Raft applies them) deletes its
/// segments before a rewrite only once it reads the rewrite's marker, and its log then
/// replays to the same state; a rewrite with no marker (cut short) deletes nothing.
#[test]
fn a_replica_deletes_its_segments_before_a_rewrite_only_at_its_marker() {
    let (leader_dir, replica_dir) = (
        tempfile::tempdir().expect("tempdir"),
        tempfile::tempdir().expect("tempdir"),
    );
    let (_leader_store, mut leader, _) = open(leader_dir.path());
    let (_replica_store, replica, _) = open(replica_dir.path());
    // The leader writes several segments' worth with compaction held off, then compacts.
    leader.segment_bytes = u64::MAX;
    let mut written = populate(&mut leader);
    written.extend(ack_rounds(&mut leader, 4));
    leader.segment_bytes = SEGMENT_BYTES;
    let before = leader.log.high_watermark();
    copy_batches(&leader.log, 0..before, &replica.log);
    leader.compact().expect("compact");
    assert!(leader.log.log_start_offset() > 0, "the leader deleted");
    let (marker, start) = *markers(&leader.log).last().expect("a marker");
    assert_eq!(
        start, before,
        "the rewrite starts at the log's end before it"
    );

    // The rewrite without its marker: nothing to delete yet.
    copy_batches(&leader.log, before..marker, &replica.log);
    let read_to = apply_markers(&replica.log, 0).expect("tail");
    assert_eq!(read_to, marker);
    assert_eq!(
        replica.log.log_start_offset(),
        0,
        "no marker, nothing deleted"
    );

    // The marker: the replica deletes what the leader deleted.
    copy_batches(&leader.log, marker..marker + 1, &replica.log);
    let read_to = apply_markers(&replica.log, read_to).expect("tail");
    assert_eq!(read_to, marker + 1);
    assert_eq!(
        replica.log.log_start_offset(),
        leader.log.log_start_offset(),
        "the replica deletes the same segments"
    );
    drop((replica, _replica_store));
    let (_store, _log, replayed) = open(replica_dir.path());
    assert_eq!(fold(replayed), fold(written));
}

/// A write that takes the log past the threshold is stored and returns without compacting
/// (a client's ack does not wait for a rewrite: before, the write ran the whole compaction
/// inline); the log says it is due, and the background task's call then compacts it.
#[test]
fn a_write_past_the_threshold_does_not_compact_and_leaves_it_due() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_store, mut log, _) = open(dir.path());
    let mut written = populate(&mut log);
    let mut writes = 0;
    while !log.compaction_due() {
        written.extend(acks(&mut log, 1, false));
        writes += 1;
        assert!(writes < 100, "the log never became due a compaction");
    }
    // Past the threshold by more than a segment: the oldest segment is sealed.
    written.extend(acks(&mut log, 2, false));
    assert!(log.compaction_due());
    assert!(markers(&log.log).is_empty(), "no write compacted");
    assert_eq!(log.log.log_start_offset(), 0, "nothing deleted by a write");

    assert!(log.compact_if_due().expect("compact"), "it was due");
    assert!(!log.compaction_due(), "a compaction restarts the count");
    assert!(
        !log.compact_if_due().expect("no-op"),
        "nothing due any more"
    );
    assert_eq!(markers(&log.log).len(), 1);
    assert!(
        log.log.log_start_offset() > 0,
        "the segments before it deleted"
    );
    drop(log);
    let (_store, _log, replayed) = open(dir.path());
    assert_eq!(fold(replayed), fold(written));
}

/// The growth since the last marker is read from the log when it is opened: a broker
/// restarted (or a new leader, which reopens its replica) after the log grew past the
/// threshold without a compaction (the writer was killed first) compacts it, without waiting for a segment of its own
/// writes; and a log opened right after a compaction is not due.
#[test]
fn growth_since_the_last_marker_is_read_from_the_log_when_opened() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut written = {
        let (_store, mut log, _) = open(dir.path());
        let mut written = populate(&mut log);
        written.extend(acks(&mut log, 4, false));
        assert!(markers(&log.log).is_empty());
        written
    };
    {
        let (_store, mut log, _) = open(dir.path());
        assert!(
            log.compaction_due(),
            "the previous writer's growth is counted"
        );
        assert!(log.compact_if_due().expect("compact"));
        assert!(
            log.log.log_start_offset() > 0,
            "the segments before it deleted"
        );
        // A little more after the marker: counted, and far below the threshold.
        written.extend(acks(&mut log, 1, false));
    }
    let (_store, mut log, replayed) = open(dir.path());
    assert!(
        !log.compaction_due(),
        "only the bytes after the marker count"
    );
    assert!(log.growth.due(1), "the bytes after the marker are counted");
    assert!(!log.compact_if_due().expect("no-op"));
    assert_eq!(fold(replayed), fold(written));
}
