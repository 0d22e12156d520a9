//! The partition log as the Raft log: a plain batch is written once, at its Raft append, and
//! readable only after its apply; the Raft log's frame holds a stub; a restart, a truncation
//! and a crash between the two writes leave the log and the Raft log agreeing.

use bytes::Bytes;
use openraft::storage::{RaftLogReader, RaftLogStorage};
use openraft::{CommittedLeaderId, EntryPayload};
use proptest::prelude::*;
use rill_storage::batch::{encode_batch, Record};
use rill_storage::log::LogOptions;
use rill_storage::producers::ProducerClock;
use rill_storage::StagedBatch;

use super::below_start_tests::NoTopics;
use super::placement::ack_of;
use super::state_machine::split_command;
use super::stub::{encode_stub, parse_stub};
use super::*;
use crate::log_store::{LogPolicy, LogStore};
use crate::machine::Machine;
use crate::types::Entry;

pub(super) fn log_id(index: u64) -> LogId {
    LogId::new(CommittedLeaderId::new(1, 1), index)
}

/// A plain batch of 4 records of 500 bytes, tagged, in a `quorum` command.
pub(super) fn plain(tag: u8) -> Command {
    acked(tag, WriteAck::Quorum)
}

/// [`plain`]'s batch with `ack`.
fn acked(tag: u8, ack: WriteAck) -> Command {
    let records: Vec<Record> = (0..4)
        .map(|i| Record {
            key: None,
            value: Bytes::from(vec![tag; 500 + i]),
            headers: vec![],
            timestamp_ms: 1_000,
        })
        .collect();
    encode_command(ack, u64::from(tag), None, &encode_batch(&records))
}

pub(super) fn entry(index: u64, command: &Command) -> Entry {
    Entry {
        log_id: log_id(index),
        payload: EntryPayload::Normal(command.clone()),
    }
}

/// A replica as a group's start opens it: its partition log, its machine, and its Raft log
/// with the machine's placement.
pub(super) struct Replica {
    pub(super) log: PartitionLog,
    pub(super) machine: PartitionMachine,
    pub(super) store: LogStore,
}

pub(super) fn replica(dir: &std::path::Path) -> Replica {
    let log = PartitionLog::open(
        &dir.join("log"),
        LogOptions::new("t", 0, &TopicConfig::default()),
    )
    .expect("open log");
    let mut machine = PartitionMachine::new("t", 0, log.clone(), Arc::new(NoTopics));
    let group = dir.join("group");
    std::fs::create_dir_all(&group).expect("group dir");
    let policy = LogPolicy {
        must_sync: PartitionMachine::must_sync,
        placement: machine.placement(),
        ..LogPolicy::default()
    };
    let store = LogStore::open_with(&group, policy).expect("open Raft log");
    machine.open(&group).expect("open machine");
    Replica {
        log,
        machine,
        store,
    }
}

pub(super) fn apply(r: &mut Replica, index: u64, c: &Command) -> WriteReply {
    let reply = r.machine.apply(log_id(index), c).expect("apply");
    bincode::deserialize(&reply.0).expect("reply")
}

/// Entry 1 appended (kept whole: where it goes is not known yet) and applied, then entries
/// 2 and 3 appended: both placed, neither applied.
fn place_two(r: &mut Replica) {
    r.store
        .append_blocking(vec![entry(1, &plain(1))])
        .expect("append");
    apply(r, 1, &plain(1)).expect("applied");
    r.store
        .append_blocking(vec![entry(2, &plain(2)), entry(3, &plain(3))])
        .expect("append");
}

/// The values of the records readable from `from` on, one byte each (the tag).
pub(super) fn tags(log: &PartitionLog, from: u64) -> Vec<u8> {
    let read = log.read(from, 1 << 20).expect("read");
    let mut out = Vec::new();
    for chunk in &read.chunks {
        for view in rill_storage::batch::batches(chunk) {
            let view = view.expect("batch");
            for record in view.records() {
                out.push(record.expect("record").value[0]);
            }
        }
    }
    out
}

/// The entries of `range` as openraft reads them, each batch's base offset zeroed: a batch
/// read back from the partition log carries the offset its apply gives it, which the
/// command's own bytes did not (every apply stamps its own).
fn read_entries(store: &LogStore, range: std::ops::RangeInclusive<u64>) -> Vec<Entry> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut store = store.clone();
    let entries = rt
        .block_on(store.try_get_log_entries(range))
        .expect("entries");
    entries
        .into_iter()
        .map(|e| match e.payload {
            EntryPayload::Normal(c) => {
                let parts = split_command(&c).expect("a command, not a stub");
                let mut batch = parts.batch.to_vec();
                batch[..8].copy_from_slice(&0u64.to_le_bytes());
                Entry {
                    log_id: e.log_id,
                    payload: EntryPayload::Normal(encode_command(
                        ack_of(parts.ack_code),
                        parts.token,
                        None,
                        &batch,
                    )),
                }
            }
            _ => e,
        })
        .collect()
}

#[test]
fn a_plain_batch_is_written_once_and_read_only_after_its_apply() {
    let dir = tempfile::tempdir().expect("tmp");
    let mut r = replica(dir.path());
    // Where the first entry goes is not known until an apply says so: kept whole.
    let before = r.store.file_bytes();
    r.store
        .append_blocking(vec![entry(1, &plain(1))])
        .expect("append");
    let whole = r.store.file_bytes() - before;
    assert!(
        whole > 2_000,
        "the first entry is written whole: {whole} bytes"
    );
    assert_eq!(r.log.log_end(), 0, "and not placed");
    assert_eq!(apply(&mut r, 1, &plain(1)), Ok((0, 4)));

    let before = r.store.file_bytes();
    r.store
        .append_blocking(vec![entry(2, &plain(2)), entry(3, &plain(3))])
        .expect("append");
    let stubs = r.store.file_bytes() - before;
    assert!(
        stubs < 300,
        "placed entries' frame holds stubs: {stubs} bytes"
    );
    assert_eq!(r.log.log_end(), 12, "both batches are in the partition log");
    assert_eq!(r.log.high_watermark(), 4, "neither is readable yet");
    assert_eq!(tags(&r.log, 4), Vec::<u8>::new());
    // openraft reads the whole commands back (they are still in memory).
    let back = read_entries(&r.store, 2..=3);
    assert_eq!(back, vec![entry(2, &plain(2)), entry(3, &plain(3))]);

    assert_eq!(apply(&mut r, 2, &plain(2)), Ok((4, 4)));
    assert_eq!(tags(&r.log, 4), vec![2; 4]);
    assert_eq!(r.log.high_watermark(), 8);
    assert_eq!(apply(&mut r, 3, &plain(3)), Ok((8, 4)));
    assert_eq!(tags(&r.log, 0), [[1u8; 4], [2; 4], [3; 4]].concat());
}

/// A `durable` batch is placed as a `quorum` one is, and the append that must be fsynced
/// before it counts reports only once the partition log holding the batch is synced too (the
/// Raft log's fsync then makes a stub durable that names data on disk).
#[test]
fn a_durable_batch_is_placed_and_synced_before_its_append_reports() {
    let dir = tempfile::tempdir().expect("tmp");
    let mut r = replica(dir.path());
    r.store
        .append_blocking(vec![entry(1, &plain(1))])
        .expect("append");
    assert_eq!(apply(&mut r, 1, &plain(1)), Ok((0, 4)));

    let durable = acked(2, WriteAck::Durable);
    let (bytes, syncs) = (r.store.file_bytes(), r.log.sync_count());
    r.store
        .append_blocking(vec![entry(2, &durable)])
        .expect("append");
    let framed = r.store.file_bytes() - bytes;
    assert!(framed < 200, "the frame holds a stub: {framed} bytes");
    assert_eq!(r.log.log_end(), 8, "the batch is staged");
    assert!(
        r.log.sync_count() > syncs,
        "the staged batch was synced before the append reported"
    );
    assert_eq!(apply(&mut r, 2, &durable), Ok((4, 4)));
    assert_eq!(tags(&r.log, 0), [[1u8; 4], [2; 4]].concat());
}

#[test]
fn after_a_crash_placed_entries_read_back_whole_and_apply_once() {
    let dir = tempfile::tempdir().expect("tmp");
    {
        let mut r = replica(dir.path());
        place_two(&mut r);
        apply(&mut r, 2, &plain(2)).expect("applied");
        // A crash: entry 3 is placed, not applied; nothing is closed.
    }
    let mut r = replica(dir.path());
    assert_eq!(
        r.log.high_watermark(),
        8,
        "entry 3's batch stays unreadable"
    );
    assert_eq!(r.log.log_end(), 12, "but placed");
    // Replayed from their frames (stubs), the entries come back whole: entry 2 from the
    // published records, entry 3 from the staged batch.
    let back = read_entries(&r.store, 1..=3);
    assert_eq!(
        back,
        vec![
            entry(1, &plain(1)),
            entry(2, &plain(2)),
            entry(3, &plain(3))
        ]
    );
    // openraft re-applies them all (no snapshot): each lands once.
    for (i, e) in back.iter().enumerate() {
        let EntryPayload::Normal(c) = &e.payload else {
            panic!("normal")
        };
        assert_eq!(
            apply(&mut r, i as u64 + 1, c),
            Ok((4 * i as u64, 4)),
            "entry {}",
            i + 1
        );
    }
    assert_eq!(tags(&r.log, 0), [[1u8; 4], [2; 4], [3; 4]].concat());
    assert_eq!(r.log.log_end(), 12);
}

#[test]
fn a_truncated_tail_drops_its_placed_batches_and_the_new_entries_take_their_offsets() {
    let dir = tempfile::tempdir().expect("tmp");
    let mut r = replica(dir.path());
    place_two(&mut r);
    // A new leader's log differs from index 3 on.
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let mut store = r.store.clone();
    rt.block_on(store.truncate(log_id(3))).expect("truncate");
    assert_eq!(r.log.log_end(), 8, "entry 3's batch is dropped");
    let other = Entry {
        log_id: LogId::new(CommittedLeaderId::new(2, 2), 3),
        payload: EntryPayload::Normal(plain(9)),
    };
    r.store
        .append_blocking(vec![other.clone()])
        .expect("append");
    assert_eq!(r.log.log_end(), 12, "placed again, at the same offsets");
    apply(&mut r, 2, &plain(2)).expect("applied");
    assert_eq!(
        bincode::deserialize::<WriteReply>(
            &r.machine.apply(other.log_id, &plain(9)).expect("apply").0
        )
        .expect("reply"),
        Ok((8, 4))
    );
    assert_eq!(tags(&r.log, 8), vec![9; 4]);
    drop(r);
    // After a restart the truncated entry stays gone.
    let r = replica(dir.path());
    let back = read_entries(&r.store, 3..=3);
    assert_eq!(back, vec![other]);
}

#[test]
fn a_stub_whose_batch_a_crash_lost_is_cut_from_the_raft_log_at_open() {
    let dir = tempfile::tempdir().expect("tmp");
    {
        let mut r = replica(dir.path());
        place_two(&mut r);
        // The second staged batch's data never reached the disk: zero it in the segment.
        let segment = std::fs::read_dir(dir.path().join("log"))
            .expect("dir")
            .filter_map(Result::ok)
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|x| x == "log"))
            .expect("segment");
        let staged = r.log.staged();
        let third_at = published_bytes(&r.log) + u64::from(staged[0].len);
        use std::os::unix::fs::FileExt;
        std::fs::OpenOptions::new()
            .write(true)
            .open(&segment)
            .expect("segment")
            .write_all_at(&vec![0u8; staged[1].len as usize], third_at)
            .expect("zero");
    }
    let r = replica(dir.path());
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let mut store = r.store.clone();
    let state = rt.block_on(store.get_log_state()).expect("state");
    assert_eq!(
        state.last_log_id.map(|l| l.index),
        Some(2),
        "entry 3's batch is gone, and so is entry 3"
    );
    assert_eq!(r.log.log_end(), 8, "entry 2's batch is staged again");
    drop(r);
    let r = replica(dir.path());
    assert_eq!(r.log.log_end(), 8, "and the cut stays after another open");
}

/// The bytes the partition log's records take (one segment).
fn published_bytes(log: &PartitionLog) -> u64 {
    log.stats().size_bytes
}

#[test]
fn a_stub_whose_records_are_gone_is_applied_as_records_this_replica_cannot_have() {
    let dir = tempfile::tempdir().expect("tmp");
    let mut r = replica(dir.path());
    let gone = encode_stub(
        WriteAck::Quorum.code(),
        7,
        &StagedBatch {
            base_offset: 0,
            record_count: 5,
            len: 100,
            crc: 1,
        },
        None,
    );
    // Missing here too: the log restarts after them, as a catch-up past retention does.
    assert!(
        matches!(apply(&mut r, 1, &gone), Err(Refusal::Invalid(m)) if m.contains("deleted by retention"))
    );
    assert_eq!((r.log.log_start_offset(), r.log.high_watermark()), (5, 5));
    assert_eq!(r.machine.next_offset(), 5);
    assert_eq!(apply(&mut r, 2, &plain(2)), Ok((5, 4)));
    // Replayed after a restart (no snapshot): held already, so only counted.
    drop(r);
    let mut r = replica(dir.path());
    assert!(matches!(apply(&mut r, 1, &gone), Err(Refusal::Invalid(_))));
    assert_eq!(apply(&mut r, 2, &plain(2)), Ok((5, 4)));
    assert_eq!(r.log.high_watermark(), 9);
}

proptest! {
    /// A stub round-trips, is never taken for a command, and counts its records.
    #[test]
    fn stubs_round_trip_and_are_never_commands(
        ack in 1u8..=3, token: u64, base: u64, count: u32, len: u32, crc: u32,
        clock in proptest::option::of((any::<i64>(), any::<i64>())),
        header in proptest::collection::vec(any::<u8>(), 64..100),
    ) {
        let batch = StagedBatch { base_offset: base, record_count: count, len, crc };
        let clock = clock.map(|(now_ms, cutoff_ms)| ProducerClock { now_ms, cutoff_ms });
        let stub = encode_stub(ack, token, &batch, clock.map(|c| (c, &header[..])));
        let parsed = parse_stub(&stub).expect("a stub");
        prop_assert_eq!((parsed.ack_code, parsed.token, parsed.batch), (ack, token, batch));
        prop_assert_eq!(parsed.producer.map(|p| p.clock), clock);
        if let Some(p) = parsed.producer {
            prop_assert_eq!(&p.header[..], &header[..64], "the header is the batch's first 64 bytes");
        }
        prop_assert!(split_command(&stub).is_none());
        prop_assert_eq!(command_records(&stub), u64::from(count));
        prop_assert!(parse_stub(&plain(1)).is_none());
    }
}

/// A stub read back from the Raft log that names a batch the partition log does not hold as
/// it says (another checksum, another length, or past the records) is an error naming the
/// topic, partition and offset, never another batch's command; and it changes nothing.
#[test]
fn a_stub_naming_another_batch_is_refused_and_changes_nothing() {
    let dir = tempfile::tempdir().expect("tmp");
    let mut r = replica(dir.path());
    place_two(&mut r);
    apply(&mut r, 2, &plain(2)).expect("applied");
    let placement = r.machine.placement().expect("placement");
    let staged = r.log.staged()[0];
    let published = StagedBatch {
        base_offset: 4,
        ..staged
    };
    for (what, batch) in [
        (
            "a staged batch's checksum",
            StagedBatch {
                crc: staged.crc ^ 1,
                ..staged
            },
        ),
        (
            "a staged batch's length",
            StagedBatch {
                len: staged.len + 1,
                ..staged
            },
        ),
        (
            "a published batch's checksum",
            StagedBatch {
                crc: published.crc ^ 1,
                ..published
            },
        ),
        (
            "records past the log's end",
            StagedBatch {
                base_offset: 40,
                ..staged
            },
        ),
    ] {
        let stub = encode_stub(WriteAck::Quorum.code(), 9, &batch, None);
        let err = placement.unstub(&stub).expect_err(what);
        let message = err.to_string();
        assert!(
            message.contains("topic t partition 0") && message.contains("offset"),
            "{what}: {message}"
        );
    }
    assert_eq!((r.log.high_watermark(), r.log.log_end()), (8, 12));
    assert_eq!(r.log.staged(), vec![staged]);
    assert_eq!(apply(&mut r, 3, &plain(3)), Ok((8, 4)));
}
