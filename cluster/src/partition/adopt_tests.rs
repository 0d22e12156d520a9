//! Unit tests of a restarted partition log adopting its source's idempotent-producer state,
//! on both paths that restart a log: the apply of entries below the log start (which learns
//! an applied point) and a snapshot install. After either, a producer whose batches all lie
//! below the restart offset is known: its retry is answered as a duplicate with the original
//! offsets, and its next sequence is accepted, exactly as on the source.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rill_storage::{Store, StoreOptions};

use super::below_start_tests::{
    apply, batches_from, idempotent, log_id, log_of, plain, serve, NoTopics, PointPeer, GROUP,
};
use super::*;
use crate::catch_up::CatchUp;
use crate::machine::Machine;

/// The source replica's entries: producer 5's batches lie at [2, 4), below the offset 5 the
/// other replica's log restarts at.
///   1 plain a1 a2 -> [0, 2)   2 producer 5 seq 0 -> [2, 3)   3 producer 5 seq 1 -> [3, 4)
///   4 plain b -> [4, 5)       5 plain c1 c2 -> [5, 7)
fn entries() -> Vec<Command> {
    vec![
        plain(&["a1", "a2"]),
        idempotent(5, 0, "p0"),
        idempotent(5, 1, "p1"),
        plain(&["b"]),
        plain(&["c1", "c2"]),
    ]
}

/// What producer 5 sends after the restart, as entries 6, 7 and 8: a retry of its second
/// batch, a retry of its first, and its next batch; and the answers the source gives them.
fn after() -> (Vec<Command>, Vec<WriteReply>) {
    (
        vec![
            idempotent(5, 1, "p1"),
            idempotent(5, 0, "p0"),
            idempotent(5, 2, "p2"),
        ],
        vec![Ok((3, 1)), Ok((2, 1)), Ok((7, 1))],
    )
}

/// A source that applied `entries()`, its log, and its snapshot after entry `snapshot_at`.
struct Source {
    _dir: tempfile::TempDir,
    _store: Store,
    log: PartitionLog,
    machine: PartitionMachine,
    snapshot: Vec<u8>,
}

fn source(snapshot_at: u64) -> Source {
    let dir = tempfile::tempdir().expect("tmp");
    let store = Store::open(StoreOptions::new(dir.path())).expect("store");
    let log = log_of(&store);
    let mut machine = PartitionMachine::new("t", 0, log.clone(), Arc::new(NoTopics));
    let offsets = [(0, 2), (2, 1), (3, 1), (4, 1), (5, 2)];
    let mut snapshot = None;
    for (i, entry) in entries().iter().enumerate() {
        let index = i as u64 + 1;
        assert_eq!(apply(&mut machine, index, entry), Ok(offsets[i]));
        if index == snapshot_at {
            snapshot = Some(machine.snapshot().expect("snapshot"));
        }
    }
    Source {
        _dir: dir,
        _store: store,
        log,
        machine,
        snapshot: snapshot.expect("a snapshot"),
    }
}

/// A peer serving the source's applied point after entry 5, with its producer state.
fn peer_of(source: &Source, asked: &Arc<AtomicU64>) -> PointPeer {
    let report = source
        .machine
        .applied_point(Some(log_id(5)))
        .expect("a point");
    assert_eq!((report.index, report.end), (5, 7));
    let producer_states = report.producer_states.expect("the source's state is whole");
    assert_eq!(
        rill_storage::producers::snapshot_offset(&producer_states),
        Some(7),
        "the state is read with the point, as of the log's end"
    );
    PointPeer {
        point: (5, 7),
        producer_states,
        asked: asked.clone(),
    }
}

/// This replica's log: restarted at 5 (the source's log start, its records below deleted by
/// retention) with the source's batches from 5 copied, as a pull leaves it.
fn restarted(store: &Store, source: &Source) -> PartitionLog {
    let log = log_of(store);
    log.restart_at(5).expect("restart");
    for batch in batches_from(&source.log, 5) {
        log.append_copy(&batch).expect("copy");
    }
    assert_eq!((log.log_start_offset(), log.high_watermark()), (5, 7));
    assert!(log.producer_state_missing());
    log
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime")
}

/// Applies `after()` to `m` and to the source, which answer alike, and checks `log`'s end.
fn producer_goes_on(m: &mut PartitionMachine, source: &mut Source, log: &PartitionLog) {
    let (commands, want) = after();
    for (i, command) in commands.iter().enumerate() {
        let index = 6 + i as u64;
        assert_eq!(apply(&mut source.machine, index, command), want[i]);
        assert_eq!(
            apply(m, index, command),
            want[i],
            "entry {index}: this replica answers otherwise than its source"
        );
    }
    assert_eq!(log.high_watermark(), 8, "a retry was appended again");
    assert_eq!(source.log.high_watermark(), 8);
}

fn stop(
    rt: &tokio::runtime::Runtime,
    stop: tokio_util::sync::CancellationToken,
    server: tokio::task::JoinHandle<()>,
) {
    rt.block_on(async {
        stop.cancel();
        tokio::time::timeout(Duration::from_secs(10), server)
            .await
            .expect("the server stopped")
            .expect("server task");
    });
}

#[test]
fn entries_below_a_restarted_log_start_adopt_the_sources_producer_state() {
    let mut source = source(1);
    let rt = runtime();
    let asked = Arc::new(AtomicU64::new(0));
    let (addr, cancel, server) = serve(&rt, peer_of(&source, &asked));

    let dir = tempfile::tempdir().expect("tmp");
    let store = Store::open(StoreOptions::new(dir.path().join("data"))).expect("store");
    let log = restarted(&store, &source);
    let group_dir = dir.path().join("group");
    std::fs::create_dir_all(&group_dir).expect("group dir");
    let catch_up = CatchUp {
        sources: vec![(2, addr.to_string())],
        group: GROUP,
        node_id: 1,
        runtime: rt.handle().clone(),
        transport: Default::default(),
    };
    let mut m =
        PartitionMachine::new("t", 0, log.clone(), Arc::new(NoTopics)).with_catch_up(catch_up);
    m.open(&group_dir).expect("open");
    m.restore(&source.snapshot).expect("restore");
    // Entries 2-5 lie below the log start: the point (and the state with it) is learned.
    for (i, entry) in entries().iter().enumerate().skip(1) {
        let reply = apply(&mut m, i as u64 + 1, entry);
        assert!(reply.is_err(), "entry {}: {reply:?}", i + 1);
    }
    assert_eq!(asked.load(Ordering::SeqCst), 1);
    assert!(!log.producer_state_missing(), "no state was adopted");
    assert_eq!(log.producer_next_sequence(5), Some((0, 2)));
    stop(&rt, cancel, server);

    producer_goes_on(&mut m, &mut source, &log);
}

#[test]
fn an_install_on_a_restarted_log_adopts_the_sources_producer_state() {
    // The leader's snapshot ends at 7, and this replica's log reaches it already: an earlier
    // try of the install restarted it and pulled the records, then the process died.
    let mut source = source(5);
    let rt = runtime();
    let asked = Arc::new(AtomicU64::new(0));
    let (addr, cancel, server) = serve(&rt, peer_of(&source, &asked));

    let dir = tempfile::tempdir().expect("tmp");
    let store = Store::open(StoreOptions::new(dir.path().join("data"))).expect("store");
    let log = restarted(&store, &source);
    let catch_up = CatchUp {
        sources: vec![(2, addr.to_string())],
        group: GROUP,
        node_id: 1,
        runtime: rt.handle().clone(),
        transport: Default::default(),
    };
    let mut m =
        PartitionMachine::new("t", 0, log.clone(), Arc::new(NoTopics)).with_catch_up(catch_up);
    m.install(None, &source.snapshot).expect("install");
    assert_eq!(m.next_offset(), 7);
    assert_eq!(asked.load(Ordering::SeqCst), 1);
    assert!(!log.producer_state_missing(), "no state was adopted");
    stop(&rt, cancel, server);

    producer_goes_on(&mut m, &mut source, &log);
}

#[test]
fn an_install_on_a_log_with_its_own_state_asks_nothing() {
    // A log that was never restarted holds its producers' whole state: no question.
    let source = source(5);
    let dir = tempfile::tempdir().expect("tmp");
    let store = Store::open(StoreOptions::new(dir.path())).expect("store");
    let log = log_of(&store);
    for batch in batches_from(&source.log, 0) {
        log.append_copy(&batch).expect("copy");
    }
    let rt = runtime();
    let catch_up = CatchUp {
        // Nothing listens there: a question would fail the install.
        sources: vec![(2, "127.0.0.1:1".to_string())],
        group: GROUP,
        node_id: 1,
        runtime: rt.handle().clone(),
        transport: Default::default(),
    };
    let mut m =
        PartitionMachine::new("t", 0, log.clone(), Arc::new(NoTopics)).with_catch_up(catch_up);
    m.install(None, &source.snapshot).expect("install");
    assert_eq!(m.next_offset(), 7);
    assert_eq!(log.producer_next_sequence(5), Some((0, 2)));
}
