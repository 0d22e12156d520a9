//! Unit tests of the partition state machine's apply of entries whose records are below its
//! log start (its log restarted past its snapshot): the applied point it learns from another
//! replica, and keeps for a restart. The helpers serve `adopt_tests` too.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::BytesMut;
use openraft::CommittedLeaderId;
use rill_proto::v1::raft_server::{Raft as RaftRpc, RaftServer};
use rill_proto::v1::{
    AppliedPointReply, AppliedPointRequest, PingReply, PingRequest, RaftMessage, RaftReply,
    WatchEvent, WatchRequest,
};
use rill_storage::batch::BatchBuilder;
use rill_storage::{Store, StoreOptions};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use super::*;
use crate::catch_up::CatchUp;

pub(super) struct NoTopics;

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

/// The group the tests' machines replicate.
pub(super) const GROUP: u64 = 9;

/// A replica that answers only `AppliedPoint`, with a fixed point and producer state, and
/// counts the calls.
#[derive(Clone)]
pub(super) struct PointPeer {
    pub(super) point: (u64, u64),
    /// The producer state it sends (empty: none, as an older broker).
    pub(super) producer_states: Vec<u8>,
    pub(super) asked: Arc<AtomicU64>,
}

type Boxed<T> = std::pin::Pin<Box<dyn futures::Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl RaftRpc for PointPeer {
    async fn append_entries(&self, _: Request<RaftMessage>) -> Result<Response<RaftReply>, Status> {
        Err(Status::unimplemented("not scripted"))
    }

    type AppendStreamStream = Boxed<RaftReply>;

    async fn append_stream(
        &self,
        _: Request<Streaming<RaftMessage>>,
    ) -> Result<Response<Self::AppendStreamStream>, Status> {
        Err(Status::unimplemented("not scripted"))
    }

    async fn vote(&self, _: Request<RaftMessage>) -> Result<Response<RaftReply>, Status> {
        Err(Status::unimplemented("not scripted"))
    }

    async fn install_snapshot(
        &self,
        _: Request<RaftMessage>,
    ) -> Result<Response<RaftReply>, Status> {
        Err(Status::unimplemented("not scripted"))
    }

    async fn ping(&self, _: Request<PingRequest>) -> Result<Response<PingReply>, Status> {
        Err(Status::unimplemented("not scripted"))
    }

    type WatchStream = Boxed<WatchEvent>;

    async fn watch(&self, _: Request<WatchRequest>) -> Result<Response<Self::WatchStream>, Status> {
        Err(Status::unimplemented("not scripted"))
    }

    async fn applied_point(
        &self,
        request: Request<AppliedPointRequest>,
    ) -> Result<Response<AppliedPointReply>, Status> {
        let asked = request.into_inner();
        if (asked.group_id, asked.from_node, asked.to_node) != (GROUP, 1, 2) {
            return Err(Status::invalid_argument(format!("{asked:?}")));
        }
        self.asked.fetch_add(1, Ordering::SeqCst);
        Ok(Response::new(AppliedPointReply {
            applied_index: self.point.0,
            applied_end: self.point.1,
            producer_states: self.producer_states.clone().into(),
        }))
    }
}

/// Serves `peer` on a port of 127.0.0.1 of `rt` until the returned token is cancelled.
pub(super) fn serve(
    rt: &tokio::runtime::Runtime,
    peer: PointPeer,
) -> (SocketAddr, CancellationToken, tokio::task::JoinHandle<()>) {
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let stop = CancellationToken::new();
    let until = stop.clone();
    let server = rt.spawn(async move {
        tonic::transport::Server::builder()
            .add_service(RaftServer::new(peer))
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                until.cancelled_owned(),
            )
            .await
            .expect("serve");
    });
    (addr, stop, server)
}

pub(super) fn plain(values: &[&str]) -> Command {
    let mut b = BatchBuilder::new(BytesMut::new());
    for v in values {
        b.push(None, v.as_bytes(), &[], 1);
    }
    encode_command(WriteAck::Quorum, 7, None, &b.finish())
}

pub(super) fn idempotent(producer: i64, sequence: i32, value: &str) -> Command {
    let mut b = BatchBuilder::new(BytesMut::new()).with_producer(producer, 0, sequence);
    b.push(None, value.as_bytes(), &[], 1);
    encode_command(WriteAck::Quorum, 7, None, &b.finish())
}

pub(super) fn log_id(index: u64) -> LogId {
    LogId::new(CommittedLeaderId::new(1, 1), index)
}

/// The index and end of `m`'s applied point after entry `index`.
pub(super) fn point_of(m: &PartitionMachine, index: u64) -> Option<(u64, u64)> {
    m.applied_point(Some(log_id(index)))
        .map(|report| (report.index, report.end))
}

pub(super) fn apply(m: &mut PartitionMachine, index: u64, c: &Command) -> WriteReply {
    let reply = m
        .apply(log_id(index), c)
        .unwrap_or_else(|e| panic!("apply of entry {index}: {e}"));
    bincode::deserialize(&reply.0).expect("reply")
}

pub(super) fn log_of(store: &Store) -> PartitionLog {
    store
        .create_topic("t", TopicConfig::default())
        .expect("topic")
        .partition(0)
        .expect("partition")
}

/// The raw stored batches of `log` from `offset` on (as a pull copies them).
pub(super) fn batches_from(log: &PartitionLog, offset: u64) -> Vec<Vec<u8>> {
    let read = log.read(offset, 1 << 20).expect("read");
    let mut out = Vec::new();
    for chunk in &read.chunks {
        let mut rest: &[u8] = chunk;
        while !rest.is_empty() {
            let header = BatchHeader::parse(rest).expect("batch");
            let len = header.total_len();
            out.push(rest[..len].to_vec());
            rest = &rest[len..];
        }
    }
    out
}

#[test]
fn entries_below_a_restarted_log_start_are_applied_from_a_learned_point_and_replayed_alike() {
    // The source replica applies, and snapshots after entry 1 (applied end 2):
    //   1 plain a1 a2 -> [0, 2)   2 idempotent seq 0 -> [2, 3)   3 its retry -> nothing
    //   4 plain b -> [3, 4)       5 plain c1 c2 -> [4, 6)
    let entries = [
        plain(&["a1", "a2"]),
        idempotent(5, 0, "p0"),
        idempotent(5, 0, "p0"),
        plain(&["b"]),
        plain(&["c1", "c2"]),
    ];
    let source_dir = tempfile::tempdir().expect("tmp");
    let source_store = Store::open(StoreOptions::new(source_dir.path())).expect("store");
    let source_log = log_of(&source_store);
    let mut source = PartitionMachine::new("t", 0, source_log.clone(), Arc::new(NoTopics));
    let mut snapshot = None;
    let offsets = [(0, 2), (2, 1), (2, 1), (3, 1), (4, 2)];
    for (i, entry) in entries.iter().enumerate() {
        assert_eq!(apply(&mut source, i as u64 + 1, entry), Ok(offsets[i]));
        if i == 0 {
            snapshot = Some(source.snapshot().expect("snapshot"));
        }
    }
    assert_eq!(source.next_offset(), 6);
    assert_eq!(point_of(&source, 5), Some((5, 6)));
    let snapshot = snapshot.expect("a snapshot after entry 1");

    // This replica installed the snapshot (applied end 2), but its source had deleted the
    // records below 4 by retention: its log restarted at 4 and pulled [4, 6).
    let dir = tempfile::tempdir().expect("tmp");
    let store = Store::open(StoreOptions::new(dir.path().join("data"))).expect("store");
    let log = log_of(&store);
    log.restart_at(4).expect("restart");
    for batch in batches_from(&source_log, 4) {
        log.append_copy(&batch).expect("append");
    }
    assert_eq!((log.log_start_offset(), log.high_watermark()), (4, 6));

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let asked = Arc::new(AtomicU64::new(0));
    let peer = PointPeer {
        point: (5, 6),
        producer_states: Vec::new(),
        asked: asked.clone(),
    };
    let (addr, stop, server) = serve(&rt, peer);
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
    m.restore(&snapshot).expect("restore");

    // Entries 2-5 follow the snapshot and lie below the log start: the idempotent batch and
    // its retry cannot be read back, so the point is learned once, and none appends.
    for (i, entry) in entries.iter().enumerate().skip(1) {
        let reply = apply(&mut m, i as u64 + 1, entry);
        assert!(reply.is_err(), "entry {}: {reply:?}", i + 1);
    }
    assert_eq!(asked.load(Ordering::SeqCst), 1, "the point was asked again");
    // The peer sent no producer state (as an older broker): the log keeps the copies' state
    // and still reports it missing.
    assert!(log.producer_state_missing());
    assert_eq!(
        log.high_watermark(),
        6,
        "an entry below the log start appended"
    );
    // While it answers them, it reports the point it learned, and its applied end is not
    // exact (a leader must not predict offsets from it).
    assert_eq!(point_of(&m, 3), Some((5, 6)));
    assert_eq!(m.exact_next_offset(), None);
    // Later entries land where the source gives them.
    assert_eq!(apply(&mut m, 6, &plain(&["d"])), Ok((6, 1)));
    assert_eq!(m.exact_next_offset(), Some(7));
    assert_eq!(apply(&mut m, 7, &plain(&["e1", "e2"])), Ok((7, 2)));
    assert_eq!((m.next_offset(), log.high_watermark()), (9, 9));
    assert_eq!(point_of(&m, 7), Some((7, 9)));

    rt.block_on(async {
        stop.cancel();
        tokio::time::timeout(Duration::from_secs(10), server)
            .await
            .expect("the server stopped")
            .expect("server task");
    });

    // A restart (kill -9 right after) replays from the same snapshot with no replica to
    // ask: the kept point answers the same entries alike.
    let mut again = PartitionMachine::new("t", 0, log.clone(), Arc::new(NoTopics));
    again.open(&group_dir).expect("open");
    again.restore(&snapshot).expect("restore");
    for (i, entry) in entries.iter().enumerate().skip(1) {
        let reply = apply(&mut again, i as u64 + 1, entry);
        assert!(reply.is_err(), "entry {}: {reply:?}", i + 1);
    }
    assert_eq!(apply(&mut again, 6, &plain(&["d"])), Ok((6, 1)));
    assert_eq!(apply(&mut again, 7, &plain(&["e1", "e2"])), Ok((7, 2)));
    assert_eq!(apply(&mut again, 8, &plain(&["f"])), Ok((9, 1)));
    assert_eq!(
        log.high_watermark(),
        10,
        "a replayed entry was appended twice"
    );
}

#[test]
fn without_a_point_a_plain_replay_below_the_log_start_still_counts_its_records() {
    // The old behaviour for plain batches: no replica is asked (there is none here).
    let dir = tempfile::tempdir().expect("tmp");
    let store = Store::open(StoreOptions::new(dir.path())).expect("store");
    let log = log_of(&store);
    log.restart_at(3).expect("restart");
    let mut m = PartitionMachine::new("t", 0, log.clone(), Arc::new(NoTopics));
    assert_eq!(apply(&mut m, 1, &plain(&["a1", "a2"])), Ok((0, 2)));
    assert_eq!(apply(&mut m, 2, &plain(&["b"])), Ok((2, 1)));
    assert_eq!(apply(&mut m, 3, &plain(&["c"])), Ok((3, 1)));
    assert_eq!(log.high_watermark(), 4);
}
