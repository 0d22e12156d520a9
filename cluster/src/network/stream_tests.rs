//! The sending side's `AppendStream` against a scripted peer: a stream is opened once and
//! reused, a request that times out never lets its late reply answer the next request, and
//! a peer without streams gets unary calls, and commands go beside the envelope only to a
//! peer that says it takes them. (The real service on both sides is covered by
//! the Raft group tests and the cluster's end-to-end tests.)

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{AppendEntriesRequest, AppendEntriesResponse};
use openraft::{CommittedLeaderId, LogId, Vote};
use rill_proto::v1::raft_reply::Result as ReplyResult;
use rill_proto::v1::raft_server::{Raft as RaftRpc, RaftServer};
use rill_proto::v1::{
    AppliedPointReply, AppliedPointRequest, PingReply, PingRequest, RaftMessage, RaftReply,
    WatchEvent, WatchRequest,
};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use super::{GroupNetwork, Peers};
use crate::failover::ElectionNotes;
use crate::types::{Node, NodeId, TypeConfig};

/// A peer that answers each AppendEntries with `PartialSuccess(prev_log_id)` of the
/// request, so a reply names the request it answers.
#[derive(Clone, Default)]
struct ScriptedPeer {
    /// Serve `AppendStream` (else it is UNIMPLEMENTED, as on a broker from before it).
    streams: bool,
    /// How long the reply to the first streamed request is held back.
    first_reply_delay_ms: u64,
    /// Answer `AppendStream` with the header that asks for commands beside the envelope.
    takes_commands: bool,
    stream_opens: Arc<AtomicUsize>,
    streamed_requests: Arc<AtomicUsize>,
    unary_calls: Arc<AtomicUsize>,
    /// Each streamed message's envelope size and the commands beside it.
    received: Arc<parking_lot::Mutex<Vec<Received>>>,
}

/// A streamed message's envelope size and the commands beside it.
type Received = (usize, Vec<bytes::Bytes>);

/// The reply a [`ScriptedPeer`] gives `message`.
fn echo(message: &RaftMessage) -> Result<RaftReply, Status> {
    let request: AppendEntriesRequest<TypeConfig> = bincode::deserialize(&message.payload)
        .map_err(|e| Status::invalid_argument(e.to_string()))?;
    let response = AppendEntriesResponse::<NodeId>::PartialSuccess(request.prev_log_id);
    let bytes = bincode::serialize(&response).map_err(|e| Status::internal(e.to_string()))?;
    Ok(RaftReply {
        result: Some(ReplyResult::Ok(bytes.into())),
    })
}

type Boxed<T> = std::pin::Pin<Box<dyn futures::Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl RaftRpc for ScriptedPeer {
    async fn append_entries(
        &self,
        request: Request<RaftMessage>,
    ) -> Result<Response<RaftReply>, Status> {
        self.unary_calls.fetch_add(1, Ordering::SeqCst);
        echo(request.get_ref()).map(Response::new)
    }

    type AppendStreamStream = Boxed<RaftReply>;

    async fn append_stream(
        &self,
        request: Request<Streaming<RaftMessage>>,
    ) -> Result<Response<Self::AppendStreamStream>, Status> {
        if !self.streams {
            return Err(Status::unimplemented("no AppendStream here"));
        }
        self.stream_opens.fetch_add(1, Ordering::SeqCst);
        let peer = self.clone();
        let replies = request.into_inner().then(move |message| {
            let peer = peer.clone();
            async move {
                let message = message?;
                peer.received
                    .lock()
                    .push((message.payload.len(), message.commands.clone()));
                let n = peer.streamed_requests.fetch_add(1, Ordering::SeqCst);
                if n == 0 && peer.first_reply_delay_ms > 0 {
                    tokio::time::sleep(Duration::from_millis(peer.first_reply_delay_ms)).await;
                }
                echo(&message)
            }
        });
        let mut response = Response::new(Box::pin(replies) as Self::AppendStreamStream);
        if self.takes_commands {
            response.metadata_mut().insert(
                super::COMMANDS_HEADER,
                tonic::metadata::MetadataValue::from_static("1"),
            );
        }
        Ok(response)
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

    async fn applied_point(
        &self,
        _: Request<AppliedPointRequest>,
    ) -> Result<Response<AppliedPointReply>, Status> {
        Err(Status::unimplemented("not scripted"))
    }

    type WatchStream = Boxed<WatchEvent>;

    async fn watch(&self, _: Request<WatchRequest>) -> Result<Response<Self::WatchStream>, Status> {
        Err(Status::unimplemented("not scripted"))
    }
}

/// Serves `peer` on a port of 127.0.0.1 until the returned token is cancelled.
async fn serve(peer: ScriptedPeer) -> (SocketAddr, CancellationToken, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let stop = CancellationToken::new();
    let until = stop.clone();
    let server = tokio::spawn(async move {
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

/// Stops a server started by [`serve`] and waits (with a deadline) until it has stopped.
async fn stop_serving(stop: CancellationToken, server: tokio::task::JoinHandle<()>) {
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .expect("server stops")
        .expect("server task");
}

/// An AppendEntries request that `echo` answers with `PartialSuccess` of index `n`.
fn request(n: u64) -> AppendEntriesRequest<TypeConfig> {
    AppendEntriesRequest {
        vote: Vote::new_committed(1, 1),
        prev_log_id: Some(LogId::new(CommittedLeaderId::new(1, 1), n)),
        entries: Vec::new(),
        leader_commit: None,
    }
}

fn answered(n: u64) -> AppendEntriesResponse<NodeId> {
    AppendEntriesResponse::PartialSuccess(Some(LogId::new(CommittedLeaderId::new(1, 1), n)))
}

async fn client_to(addr: SocketAddr) -> super::PeerClient {
    let mut network = GroupNetwork::new(7, 1, Peers::default(), Arc::new(ElectionNotes::default()));
    network.new_client(2, &Node::new(addr.to_string())).await
}

#[tokio::test]
async fn requests_share_one_stream_and_each_gets_its_own_reply() {
    let peer = ScriptedPeer {
        streams: true,
        ..ScriptedPeer::default()
    };
    let (addr, stop, server) = serve(peer.clone()).await;
    let mut client = client_to(addr).await;
    let option = RPCOption::new(Duration::from_secs(10));
    for n in 1..=20 {
        let reply = client
            .append_entries(request(n), option.clone())
            .await
            .expect("answered");
        assert_eq!(reply, answered(n));
    }
    assert_eq!(peer.stream_opens.load(Ordering::SeqCst), 1);
    assert_eq!(peer.streamed_requests.load(Ordering::SeqCst), 20);
    assert_eq!(peer.unary_calls.load(Ordering::SeqCst), 0);
    drop(client);
    stop_serving(stop, server).await;
}

#[tokio::test]
async fn a_reply_that_comes_after_its_deadline_never_answers_the_next_request() {
    let peer = ScriptedPeer {
        streams: true,
        first_reply_delay_ms: 400,
        ..ScriptedPeer::default()
    };
    let (addr, stop, server) = serve(peer.clone()).await;
    let mut client = client_to(addr).await;
    let err = client
        .append_entries(request(1), RPCOption::new(Duration::from_millis(100)))
        .await
        .expect_err("the first reply is late");
    assert!(err.to_string().contains("no AppendEntries reply"), "{err}");
    // The late reply to request 1 arrives while request 2 waits: on the old stream it would
    // be taken for request 2's. The timeout dropped that stream, so request 2 opens another.
    let reply = client
        .append_entries(request(2), RPCOption::new(Duration::from_secs(10)))
        .await
        .expect("answered");
    assert_eq!(reply, answered(2));
    assert_eq!(peer.stream_opens.load(Ordering::SeqCst), 2);
    drop(client);
    stop_serving(stop, server).await;
}

#[tokio::test]
async fn a_peer_without_streams_gets_unary_calls() {
    let peer = ScriptedPeer::default();
    let (addr, stop, server) = serve(peer.clone()).await;
    let mut client = client_to(addr).await;
    let option = RPCOption::new(Duration::from_secs(10));
    for n in 1..=5 {
        let reply = client
            .append_entries(request(n), option.clone())
            .await
            .expect("answered");
        assert_eq!(reply, answered(n));
    }
    assert_eq!(peer.unary_calls.load(Ordering::SeqCst), 5);
    assert_eq!(peer.stream_opens.load(Ordering::SeqCst), 0);
    drop(client);
    stop_serving(stop, server).await;
}

/// A request carrying three 4 KiB batches, with a blank entry between them.
fn request_with_batches() -> (AppendEntriesRequest<TypeConfig>, Vec<bytes::Bytes>) {
    let batches: Vec<bytes::Bytes> = (0..3u8).map(|b| vec![b; 4096].into()).collect();
    let log_id = |i| LogId::new(CommittedLeaderId::new(1, 1), i);
    let mut entries: Vec<crate::types::Entry> = batches
        .iter()
        .enumerate()
        .map(|(i, b)| crate::types::Entry {
            log_id: log_id(10 + i as u64),
            payload: openraft::EntryPayload::Normal(crate::types::Command(b.clone())),
        })
        .collect();
    entries.insert(
        1,
        crate::types::Entry {
            log_id: log_id(100),
            payload: openraft::EntryPayload::Blank,
        },
    );
    let mut r = request(9);
    r.entries = entries;
    (r, batches)
}

#[tokio::test]
async fn commands_go_beside_the_envelope_only_to_a_peer_that_takes_them() {
    for takes_commands in [true, false] {
        let peer = ScriptedPeer {
            streams: true,
            takes_commands,
            ..ScriptedPeer::default()
        };
        let (addr, stop, server) = serve(peer.clone()).await;
        let mut client = client_to(addr).await;
        let (sent, batches) = request_with_batches();
        let reply = client
            .append_entries(sent, RPCOption::new(Duration::from_secs(10)))
            .await
            .expect("answered");
        assert_eq!(reply, answered(9));
        let received = peer.received.lock().clone();
        assert_eq!(received.len(), 1);
        let (envelope_bytes, commands) = &received[0];
        if takes_commands {
            assert_eq!(commands, &batches, "the batches, in entry order");
            assert!(*envelope_bytes < 1024, "envelope of {envelope_bytes} bytes");
        } else {
            assert!(commands.is_empty());
            assert!(
                *envelope_bytes > 3 * 4096,
                "envelope of {envelope_bytes} bytes"
            );
        }
        drop(client);
        stop_serving(stop, server).await;
    }
}
