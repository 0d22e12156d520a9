//! Unit tests of the partition state machine: replay, snapshots, and refusals.

use super::*;
use bytes::BytesMut;
use openraft::CommittedLeaderId;
use rill_storage::batch::BatchBuilder;
use rill_storage::{Store, StoreOptions};

struct NoTopics;

impl LocalTopics for NoTopics {
    fn ensure_topic(&self, _: &str, _: &TopicConfig) -> Result<(), String> {
        Ok(())
    }
    fn partition(&self, _: &str, _: u32) -> Option<PartitionLog> {
        None
    }
    fn appended(&self, _: &str, _: u32, _: u64) {}
    fn delete_topic(&self, _: &str) -> Result<(), String> {
        Ok(())
    }
}

fn batch(values: &[&str]) -> Command {
    let mut b = BatchBuilder::new(BytesMut::new());
    for v in values {
        b.push(None, v.as_bytes(), &[], 1);
    }
    encode_command(WriteAck::Quorum, 7, None, &b.finish())
}

fn apply(m: &mut PartitionMachine, index: u64, c: &Command) -> WriteReply {
    let log_id = LogId::new(CommittedLeaderId::new(1, 1), index);
    let reply = m.apply(log_id, c).expect("apply");
    bincode::deserialize(&reply.0).expect("reply")
}

#[test]
fn replaying_applied_entries_appends_nothing_and_gives_the_same_offsets() {
    let dir = tempfile::tempdir().expect("tmp");
    let store = Store::open(StoreOptions::new(dir.path())).expect("store");
    let topic = store
        .create_topic("t", TopicConfig::default())
        .expect("topic");
    let log = topic.partition(0).expect("partition");
    let (a, b, c) = (
        batch(&["a1", "a2"]),
        batch(&["b1"]),
        batch(&["c1", "c2", "c3"]),
    );
    let mut first = PartitionMachine::new("t", 0, log.clone(), Arc::new(NoTopics));
    assert_eq!(apply(&mut first, 1, &a), Ok((0, 2)));
    assert_eq!(apply(&mut first, 2, &b), Ok((2, 1)));
    assert_eq!(log.high_watermark(), 3);

    // A restart without a snapshot: openraft re-applies from the first entry.
    let mut again = PartitionMachine::new("t", 0, log.clone(), Arc::new(NoTopics));
    assert_eq!(apply(&mut again, 1, &a), Ok((0, 2)));
    assert_eq!(apply(&mut again, 2, &b), Ok((2, 1)));
    assert_eq!(log.high_watermark(), 3, "nothing appended twice");
    assert_eq!(apply(&mut again, 3, &c), Ok((3, 3)));
    assert_eq!(log.high_watermark(), 6);

    // A snapshot restores where the applies stopped, and covers only synced records: its
    // barrier syncs them (the store runs it before it saves the snapshot).
    let snap = again.snapshot().expect("snapshot");
    let barrier = again
        .snapshot_barrier()
        .expect("a partition's snapshot has a barrier");
    assert_eq!(
        apply(&mut again, 4, &b),
        Ok((6, 1)),
        "an apply before the barrier ran"
    );
    barrier().expect("barrier");
    assert!(
        log.durable_offset() >= 6,
        "a snapshot covered unsynced records"
    );
    let mut restored = PartitionMachine::new("t", 0, log.clone(), Arc::new(NoTopics));
    restored.restore(&snap).expect("restore");
    assert_eq!(apply(&mut restored, 4, &b), Ok((6, 1)));

    // An invalid batch is refused alike everywhere and changes nothing.
    let refused = apply(&mut restored, 5, &Command(vec![1, 2, 3].into()));
    assert!(refused.is_err(), "{refused:?}");
    assert_eq!(log.high_watermark(), 7);
}

#[test]
fn replaying_a_deduplicated_retry_does_not_append_a_later_batch_twice() {
    let dir = tempfile::tempdir().expect("tmp");
    let store = Store::open(StoreOptions::new(dir.path())).expect("store");
    let topic = store
        .create_topic("t", TopicConfig::default())
        .expect("topic");
    let log = topic.partition(0).expect("partition");
    let idempotent = {
        let mut b = BatchBuilder::new(BytesMut::new()).with_producer(5, 0, 0);
        b.push(None, b"a", &[], 1);
        encode_command(WriteAck::Quorum, 7, None, &b.finish())
    };
    let plain = batch(&["b1", "b2"]);
    let mut first = PartitionMachine::new("t", 0, log.clone(), Arc::new(NoTopics));
    assert_eq!(apply(&mut first, 1, &idempotent), Ok((0, 1)));
    // The producer's retry (its answer was lost) is deduplicated: nothing appended.
    assert_eq!(apply(&mut first, 2, &idempotent), Ok((0, 1)));
    assert_eq!(apply(&mut first, 3, &plain), Ok((1, 2)));
    assert_eq!(log.high_watermark(), 3);

    // A restart replays all three entries: the retry must not move the applied end,
    // or the plain batch is taken for a new one and appended a second time.
    let mut again = PartitionMachine::new("t", 0, log.clone(), Arc::new(NoTopics));
    assert_eq!(apply(&mut again, 1, &idempotent), Ok((0, 1)));
    let _ = apply(&mut again, 2, &idempotent);
    assert_eq!(apply(&mut again, 3, &plain), Ok((1, 2)));
    assert_eq!(
        log.high_watermark(),
        3,
        "a replayed batch was appended twice"
    );
    assert_eq!(apply(&mut again, 4, &batch(&["c"])), Ok((3, 1)));
}

#[test]
fn a_log_shorter_than_what_was_applied_stops_the_replica() {
    let dir = tempfile::tempdir().expect("tmp");
    let store = Store::open(StoreOptions::new(dir.path())).expect("store");
    let topic = store
        .create_topic("t", TopicConfig::default())
        .expect("topic");
    let log = topic.partition(0).expect("partition");
    let mut m = PartitionMachine::new("t", 0, log, Arc::new(NoTopics));
    m.restore(&bincode::serialize(&10u64).expect("encode"))
        .expect("restore");
    let log_id = LogId::new(CommittedLeaderId::new(1, 1), 11);
    // The local log ends at 0 but 10 records were applied: it lost acknowledged data.
    assert!(m.apply(log_id, &batch(&["x"])).is_err());
}

#[test]
fn a_batch_that_overtook_an_earlier_one_is_refused_with_the_sequence_expected() {
    let dir = tempfile::tempdir().expect("tmp");
    let store = Store::open(StoreOptions::new(dir.path())).expect("store");
    let topic = store
        .create_topic("t", TopicConfig::default())
        .expect("topic");
    let log = topic.partition(0).expect("partition");
    let from = |sequence| {
        let mut b = BatchBuilder::new(BytesMut::new()).with_producer(5, 0, sequence);
        b.push(None, b"a", &[], 1);
        encode_command(WriteAck::Quorum, 7, None, &b.finish())
    };
    let mut m = PartitionMachine::new("t", 0, log.clone(), Arc::new(NoTopics));
    // A pipelining producer's second batch reached the log first: refused, typed, so the
    // broker tells the producer to resend it (not that its batch is invalid).
    match apply(&mut m, 1, &from(1)) {
        Err(Refusal::ProducerState {
            expected_sequence: Some(0),
            message,
        }) => assert!(message.contains("partition 0"), "{message}"),
        other => panic!("expected a sequence gap expecting 0, got {other:?}"),
    }
    assert_eq!(log.high_watermark(), 0, "a refused batch was appended");
    assert_eq!(apply(&mut m, 2, &from(0)), Ok((0, 1)));
    assert_eq!(apply(&mut m, 3, &from(1)), Ok((1, 1)));
    // An invalid batch stays bad input.
    assert!(matches!(
        apply(&mut m, 4, &Command(vec![1; 20].into())),
        Err(Refusal::Invalid(_))
    ));
}

fn apply_inline(m: &mut PartitionMachine, index: u64, c: &Command) -> Option<WriteReply> {
    let log_id = LogId::new(CommittedLeaderId::new(1, 1), index);
    m.try_apply_inline(log_id, c)
        .map(|r| bincode::deserialize(&r.expect("apply").0).expect("reply"))
}

#[test]
fn an_inline_apply_appends_as_the_blocking_one_and_leaves_replays_and_refusals_alike() {
    let dir = tempfile::tempdir().expect("tmp");
    let store = Store::open(StoreOptions::new(dir.path())).expect("store");
    let topic = store
        .create_topic("t", TopicConfig::default())
        .expect("topic");
    let log = topic.partition(0).expect("partition");
    let (a, b) = (batch(&["a1", "a2"]), batch(&["b1"]));
    let mut m = PartitionMachine::new("t", 0, log.clone(), Arc::new(NoTopics));
    // The first append of a fresh log grows the file: not inline, and nothing changed.
    let first = apply_inline(&mut m, 1, &a);
    if first.is_none() {
        assert_eq!(
            log.high_watermark(),
            0,
            "a refused inline apply changed the log"
        );
        assert_eq!(m.next_offset(), 0);
        assert_eq!(apply(&mut m, 1, &a), Ok((0, 2)));
    } else {
        assert_eq!(first, Some(Ok((0, 2))));
    }
    assert_eq!(
        apply_inline(&mut m, 2, &b),
        Some(Ok((2, 1))),
        "an append to a ready segment is inline"
    );
    assert_eq!((log.high_watermark(), m.next_offset()), (3, 3));

    // A replay (a restarted machine re-applying) is left to the blocking path untouched.
    let mut again = PartitionMachine::new("t", 0, log.clone(), Arc::new(NoTopics));
    assert_eq!(apply_inline(&mut again, 1, &a), None);
    assert_eq!(
        again.next_offset(),
        0,
        "a replay left inline moved the applied end"
    );
    assert_eq!(apply(&mut again, 1, &a), Ok((0, 2)));

    // A malformed command is the blocking path's to refuse.
    assert_eq!(
        apply_inline(&mut m, 3, &Command(vec![1, 2, 3].into())),
        None
    );
    assert_eq!(log.high_watermark(), 3);
}

#[test]
fn a_topic_flushed_always_never_applies_inline() {
    let dir = tempfile::tempdir().expect("tmp");
    let store = Store::open(StoreOptions::new(dir.path())).expect("store");
    let config = TopicConfig {
        flush: rill_storage::FlushPolicy::Always,
        ..TopicConfig::default()
    };
    let topic = store.create_topic("t", config).expect("topic");
    let log = topic.partition(0).expect("partition");
    let mut m = PartitionMachine::new("t", 0, log.clone(), Arc::new(NoTopics));
    assert_eq!(apply(&mut m, 1, &batch(&["a"])), Ok((0, 1)));
    assert_eq!(
        apply_inline(&mut m, 2, &batch(&["b"])),
        None,
        "an append that syncs ran inline"
    );
    assert_eq!(log.high_watermark(), 1);
}
