//! Producer expiry in a replicated partition goes by the leader's clock that each entry
//! carries: replicas applying the same entries at different times, or after a restart,
//! append the same batches (docs/REPLICATION.md, "Producer expiry").

use std::time::Duration;

use bytes::BytesMut;
use openraft::CommittedLeaderId;
use rill_storage::batch::BatchBuilder;
use rill_storage::log::{now_ms, LogOptions};
use rill_storage::producers::ProducerClock;

use super::below_start_tests::NoTopics;
use super::state_machine::split_command;
use super::*;
use crate::machine::Machine;

/// An idempotent batch of producer 5 at `sequence`, in a command stamped with `clock`.
fn stamped(sequence: i32, clock: ProducerClock) -> Command {
    let mut b = BatchBuilder::new(BytesMut::new()).with_producer(5, 0, sequence);
    b.push(None, b"v", &[], 1);
    encode_command(WriteAck::Quorum, 7, Some(clock), &b.finish())
}

/// A replica: its partition log, on a broker whose producer expiry is [`EXPIRY_MS`] as the
/// leader's, and its machine, opened as a group's start opens them (the log then uses the
/// entries' clocks).
fn replica(dir: &std::path::Path) -> (PartitionLog, PartitionMachine) {
    let options = LogOptions::new("t", 0, &TopicConfig::default()).producer_expiry_ms(EXPIRY_MS);
    let log = PartitionLog::open(&dir.join("log"), options).expect("open");
    let mut machine = PartitionMachine::new("t", 0, log.clone(), Arc::new(NoTopics));
    let group = dir.join("group");
    std::fs::create_dir_all(&group).expect("group dir");
    machine.open(&group).expect("machine open");
    (log, machine)
}

fn apply(m: &mut PartitionMachine, index: u64, c: &Command) -> WriteReply {
    let log_id = LogId::new(CommittedLeaderId::new(1, 1), index);
    let reply = m.apply(log_id, c).expect("apply");
    bincode::deserialize(&reply.0).expect("reply")
}

const EXPIRY_MS: u64 = 50;

/// The leader proposed sequence 1 within the producer's expiry (by its clock). A follower
/// that applies it later than the expiry after sequence 0, by its own clock (it lagged, or
/// was down), must still append it: deciding by its own clock it refused it, and from there
/// on its offsets differed from the leader's.
#[test]
fn a_lagging_replica_appends_what_the_leader_appended() {
    let t = now_ms();
    let entries = [
        stamped(0, ProducerClock::at(t, EXPIRY_MS)),
        stamped(1, ProducerClock::at(t + 10, EXPIRY_MS)),
    ];
    let (leader_dir, lagging_dir) = (
        tempfile::tempdir().expect("tmp"),
        tempfile::tempdir().expect("tmp"),
    );
    let (_, mut leader) = replica(leader_dir.path());
    let (lagging_log, mut lagging) = replica(lagging_dir.path());
    assert_eq!(apply(&mut leader, 1, &entries[0]), Ok((0, 1)));
    assert_eq!(apply(&mut leader, 2, &entries[1]), Ok((1, 1)));
    assert_eq!(apply(&mut lagging, 1, &entries[0]), Ok((0, 1)));
    // The lag: more than the expiry passes on the follower's clock between the two applies.
    let until = t + 3 * EXPIRY_MS as i64;
    while now_ms() < until {
        std::thread::sleep(Duration::from_millis(EXPIRY_MS));
    }
    assert_eq!(
        apply(&mut lagging, 2, &entries[1]),
        Ok((1, 1)),
        "the lagging replica decided by its own clock"
    );
    assert_eq!(lagging_log.high_watermark(), 2);
}

/// The same entries, applied on one replica without a restart and on another that crashed
/// (no clean close) and replays them from its Raft log, leave the same producer state, so
/// the next entry, near its producer's expiry, is decided alike on both.
#[test]
fn a_restarted_replica_replaying_its_entries_decides_the_next_one_alike() {
    let t = now_ms() - 24 * 3600 * 1000;
    let clock = |dt: i64| ProducerClock::at(t + dt, EXPIRY_MS);
    let entries = [
        stamped(0, clock(0)),
        stamped(1, clock(30)),
        stamped(2, clock(40)),
    ];
    let dir = tempfile::tempdir().expect("tmp");
    let (log, mut m) = replica(dir.path());
    for (i, e) in entries.iter().enumerate() {
        assert_eq!(apply(&mut m, i as u64 + 1, e), Ok((i as u64, 1)));
    }
    let live = log.producer_snapshot().expect("whole");
    drop((log, m)); // a crash: no close

    let (log, mut m) = replica(dir.path());
    for (i, e) in entries.iter().enumerate() {
        assert_eq!(apply(&mut m, i as u64 + 1, e), Ok((i as u64, 1)), "replay");
    }
    assert_eq!(log.high_watermark(), 3, "a replay appended");
    assert_eq!(log.producer_snapshot().expect("whole"), live);
    // Within the expiry of the producer's last activity (40) by the next entry's clock (85).
    assert_eq!(apply(&mut m, 4, &stamped(3, clock(85))), Ok((3, 1)));
}

/// A command whose flag says a clock follows but which ends inside it is bad input: refused
/// as invalid, and nothing is appended or moved.
#[test]
fn a_command_cut_inside_its_clock_is_refused_and_changes_nothing() {
    let dir = tempfile::tempdir().expect("tmp");
    let (log, mut m) = replica(dir.path());
    let whole = stamped(0, ProducerClock::at(now_ms(), EXPIRY_MS));
    let cut = Command(whole.0.slice(..9 + 8));
    let before = log.producer_snapshot().expect("whole");
    assert!(matches!(apply(&mut m, 1, &cut), Err(Refusal::Invalid(_))));
    assert_eq!((log.high_watermark(), m.next_offset()), (0, 0));
    assert_eq!(
        log.producer_snapshot().expect("whole"),
        before,
        "the producer state moved"
    );
    assert_eq!(apply(&mut m, 2, &whole), Ok((0, 1)));
}

proptest::proptest! {
    /// A command, with or without a clock, splits into what it was made of.
    #[test]
    fn a_command_splits_into_its_parts(
        ack in proptest::sample::select(vec![WriteAck::Leader, WriteAck::Quorum, WriteAck::Durable]),
        token in proptest::num::u64::ANY,
        clock in proptest::option::of((proptest::num::i64::ANY, proptest::num::i64::ANY)),
        batch in proptest::collection::vec(proptest::num::u8::ANY, 0..200),
    ) {
        let clock = clock.map(|(now_ms, cutoff_ms)| ProducerClock { now_ms, cutoff_ms });
        let command = encode_command(ack, token, clock, &batch);
        let parts = split_command(&command).expect("split");
        proptest::prop_assert_eq!(parts.ack_code, ack.code());
        proptest::prop_assert_eq!(parts.token, token);
        proptest::prop_assert_eq!(parts.clock, clock);
        proptest::prop_assert_eq!(parts.batch, &batch[..]);
        // Cut short inside its clock, it splits into nothing.
        if clock.is_some() {
            let cut = Command(command.0.slice(..9 + 15));
            proptest::prop_assert_eq!(split_command(&cut), None);
        }
    }
}
