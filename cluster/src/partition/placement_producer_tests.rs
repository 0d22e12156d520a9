//! Idempotent producers' batches in the partition log as the Raft log: placed when their
//! producer state will append them, written once, read back whole with their entry's clock;
//! a retry kept whole and answered with the original offsets; a crash between the two
//! writes; a stub whose records are gone still moving the producer clock.

use bytes::BytesMut;
use openraft::storage::RaftLogReader;
use openraft::EntryPayload;
use rill_storage::batch::BatchBuilder;
use rill_storage::producers::{ProducerClock, ProducerStates};
use rill_storage::StagedBatch;

use super::placement_tests::{apply, entry, plain, replica, tags, Replica};
use super::state_machine::split_command;
use super::stub::encode_stub;
use super::*;
use crate::log_store::LogStore;

/// Producer 7's batch of 3 records of about 500 bytes, tagged, from sequence `seq`, in a
/// `quorum` command whose clock is `now_ms` (cutoff 0: nobody expires).
fn idempotent(tag: u8, seq: i32, now_ms: i64) -> Command {
    let mut builder = BatchBuilder::new(BytesMut::new()).with_producer(7, 0, seq);
    for i in 0..3 {
        builder.push(None, &vec![tag; 500 + i], &[], 1_000);
    }
    let clock = ProducerClock {
        now_ms,
        cutoff_ms: 0,
    };
    encode_command(
        WriteAck::Quorum,
        u64::from(tag),
        Some(clock),
        &builder.finish(),
    )
}

/// The command of entry `index` as openraft reads it back, its batch's base offset zeroed
/// (a batch read back from the partition log carries the offset its apply gave it).
fn read_back(store: &LogStore, index: u64) -> Command {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut store = store.clone();
    let mut entries = rt
        .block_on(store.try_get_log_entries(index..=index))
        .expect("entries");
    let Some(EntryPayload::Normal(command)) = entries.pop().map(|e| e.payload) else {
        panic!("entry {index} is not a normal entry");
    };
    let parts = split_command(&command).expect("a command, not a stub");
    let mut batch = parts.batch.to_vec();
    batch[..8].copy_from_slice(&0u64.to_le_bytes());
    encode_command(
        super::placement::ack_of(parts.ack_code),
        parts.token,
        parts.clock,
        &batch,
    )
}

/// The partition log's producer state.
fn producer_state(r: &Replica) -> ProducerStates {
    let (bytes, _) = r.log.producer_snapshot().expect("a whole state");
    ProducerStates::decode_snapshot(&bytes).expect("decodes").0
}

/// Entry 1, a plain batch, appended and applied: the place of the next entry is known.
fn started(r: &mut Replica) {
    r.store
        .append_blocking(vec![entry(1, &plain(1))])
        .expect("append");
    assert_eq!(apply(r, 1, &plain(1)), Ok((0, 4)));
}

#[test]
fn an_idempotent_batch_is_placed_and_its_retry_is_kept_whole_and_answered() {
    let dir = tempfile::tempdir().expect("tmp");
    let mut r = replica(dir.path());
    started(&mut r);
    let (first, retry, next) = (
        idempotent(2, 0, 5_000),
        idempotent(2, 0, 5_001),
        idempotent(3, 3, 5_002),
    );

    let before = r.store.file_bytes();
    r.store
        .append_blocking(vec![entry(2, &first)])
        .expect("append");
    let framed = r.store.file_bytes() - before;
    assert!(framed < 300, "the frame holds a stub: {framed} bytes");
    assert_eq!(r.log.log_end(), 7, "the batch is staged");
    assert_eq!(r.log.high_watermark(), 4, "and not readable");
    assert_eq!(
        read_back(&r.store, 2),
        first,
        "read back whole, with its clock"
    );

    let before = r.store.file_bytes();
    r.store
        .append_blocking(vec![entry(3, &retry), entry(4, &next)])
        .expect("append");
    let framed = r.store.file_bytes() - before;
    assert!(
        framed > 3_000,
        "a retry of a placed batch is kept whole, and so is the entry after it: {framed} bytes"
    );
    assert_eq!(r.log.log_end(), 7, "neither is staged");

    assert_eq!(apply(&mut r, 2, &first), Ok((4, 3)));
    assert_eq!(
        producer_state(&r).clock_ms(),
        5_000,
        "the publish moved the clock"
    );
    assert_eq!(r.log.producer_next_sequence(7), Some((0, 3)));
    assert_eq!(
        apply(&mut r, 3, &retry),
        Ok((4, 3)),
        "the retry is answered with the original offsets"
    );
    assert_eq!(apply(&mut r, 4, &next), Ok((7, 3)));
    assert_eq!(
        tags(&r.log, 0),
        [vec![1u8; 4], vec![2; 3], vec![3; 3]].concat()
    );
}

#[test]
fn after_a_crash_a_placed_idempotent_batch_applies_once_by_its_clock() {
    let dir = tempfile::tempdir().expect("tmp");
    let first = idempotent(2, 0, 5_000);
    {
        let mut r = replica(dir.path());
        started(&mut r);
        r.store
            .append_blocking(vec![entry(2, &first)])
            .expect("append");
        assert_eq!(r.log.log_end(), 7);
        // A crash: entry 2 is placed, not applied; nothing is closed.
    }
    let mut r = replica(dir.path());
    assert_eq!((r.log.high_watermark(), r.log.log_end()), (4, 7));
    assert_eq!(
        read_back(&r.store, 2),
        first,
        "the stub reads back whole, with its clock"
    );
    assert_eq!(apply(&mut r, 1, &plain(1)), Ok((0, 4)), "a replay");
    assert_eq!(apply(&mut r, 2, &first), Ok((4, 3)));
    assert_eq!(producer_state(&r).clock_ms(), 5_000);
    let retry = idempotent(2, 0, 5_001);
    r.store
        .append_blocking(vec![entry(3, &retry)])
        .expect("append");
    assert_eq!(
        apply(&mut r, 3, &retry),
        Ok((4, 3)),
        "answered, not appended"
    );
    assert_eq!(r.log.high_watermark(), 7);
}

/// The stub of an idempotent batch whose records retention deleted on the leader, applied
/// on a replica that holds them (a replay after its restart): counted, and its clock moves
/// the producer state as the apply of its batch did the first time.
#[test]
fn a_stub_of_an_idempotent_batch_the_leader_cannot_read_moves_the_producer_clock() {
    let dir = tempfile::tempdir().expect("tmp");
    let whole = idempotent(2, 0, 5_000);
    {
        let mut r = replica(dir.path());
        assert_eq!(apply(&mut r, 1, &whole), Ok((0, 3)));
    }
    let mut r = replica(dir.path());
    let batch = split_command(&whole).expect("command").batch.to_vec();
    let clock = ProducerClock {
        now_ms: 9_000,
        cutoff_ms: 10,
    };
    let gone = encode_stub(
        WriteAck::Quorum.code(),
        2,
        &StagedBatch {
            base_offset: 0,
            record_count: 3,
            len: batch.len() as u32,
            crc: 1,
        },
        Some((clock, &batch)),
    );
    assert!(
        matches!(apply(&mut r, 1, &gone), Err(Refusal::Invalid(m)) if m.contains("deleted by retention"))
    );
    assert_eq!(r.machine.next_offset(), 3, "its records count");
    let state = producer_state(&r);
    assert_eq!((state.clock_ms(), state.cutoff_ms()), (9_000, 10));
    assert_eq!(r.log.producer_next_sequence(7), Some((0, 3)));
}
