//! The receiving side of broker-to-broker Raft traffic: the internal `rill.v1.Raft` gRPC
//! service, which hands each message to the addressed group of this broker's [`GroupHost`].

use bytes::Bytes;
use futures::StreamExt;
use rill_proto::v1::raft_reply::Result as ReplyResult;
use rill_proto::v1::raft_server::{Raft as RaftRpc, RaftServer};
use rill_proto::v1::{
    AppliedPointReply, AppliedPointRequest, PingReply, PingRequest, RaftMessage, RaftReply,
    WatchEvent, WatchRequest,
};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::sync::Arc;
use tonic::{Request, Response, Status, Streaming};

use crate::failover::refused_for_log;
use crate::host::GroupHost;
use crate::network::{attach_commands, COMMANDS_HEADER, MAX_RAFT_MESSAGE_BYTES};
use crate::node::Registry;
use crate::types::{NodeId, Raft, TypeConfig};
use openraft::raft::AppendEntriesRequest;

/// The `rill.v1.Raft` service of one broker.
#[derive(Clone)]
pub struct RaftService {
    host: GroupHost,
    registry: Option<Arc<Registry>>,
}

impl RaftService {
    /// The service for `host`'s groups, without a peers registry: pings are refused
    /// (for groups run outside a broker, as in tests).
    pub fn new(host: GroupHost) -> Self {
        RaftService {
            host,
            registry: None,
        }
    }

    /// The service of a cluster member: its groups and its peers registry.
    pub fn with_registry(host: GroupHost, registry: Arc<Registry>) -> Self {
        RaftService {
            host,
            registry: Some(registry),
        }
    }

    /// The tonic server for this service, with message limits fit for Raft batches.
    pub fn into_server(self) -> RaftServer<RaftService> {
        RaftServer::new(self)
            .max_decoding_message_size(MAX_RAFT_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_RAFT_MESSAGE_BYTES)
    }

    /// The addressed group and the decoded request, or the status that refuses it.
    fn route<T: DeserializeOwned>(&self, message: &RaftMessage) -> Result<(Raft, T), Status> {
        if message.to_node != self.host.node_id() {
            // A peers list that points at the wrong broker: never let it vote or append here.
            return Err(Status::failed_precondition(format!(
                "this broker is node {}, not node {} (message from node {}); check --peers",
                self.host.node_id(),
                message.to_node,
                message.from_node
            )));
        }
        let raft = self.host.group(message.group_id).ok_or_else(|| {
            Status::not_found(format!(
                "Raft group {} does not run on node {}",
                message.group_id,
                self.host.node_id()
            ))
        })?;
        let request = bincode::deserialize(&message.payload).map_err(|e| {
            Status::invalid_argument(format!(
                "undecodable Raft message for group {}: {e}",
                message.group_id
            ))
        })?;
        Ok((raft, request))
    }

    /// The addressed group and the AppendEntries request, its commands put back from beside
    /// the envelope when the sender detached them.
    fn route_append(
        &self,
        message: RaftMessage,
    ) -> Result<(Raft, AppendEntriesRequest<TypeConfig>), Status> {
        let (raft, mut request) = self.route(&message)?;
        attach_commands(&mut request, message.commands).map_err(|e| {
            Status::invalid_argument(format!(
                "malformed AppendEntries for group {}: {e}",
                message.group_id
            ))
        })?;
        Ok((raft, request))
    }
}

/// Encodes a group's answer, success or Raft error, as a reply.
fn reply<T: Serialize, E: Serialize>(result: Result<T, E>) -> Result<Response<RaftReply>, Status> {
    let result = match result {
        Ok(v) => ReplyResult::Ok(encode(&v)?),
        Err(e) => ReplyResult::RaftError(encode(&e)?),
    };
    Ok(Response::new(RaftReply {
        result: Some(result),
    }))
}

fn encode<T: Serialize>(value: &T) -> Result<Bytes, Status> {
    bincode::serialize(value)
        .map(Bytes::from)
        .map_err(|e| Status::internal(format!("encoding a Raft reply: {e}")))
}

#[tonic::async_trait]
impl RaftRpc for RaftService {
    async fn append_entries(
        &self,
        request: Request<RaftMessage>,
    ) -> Result<Response<RaftReply>, Status> {
        let (raft, rpc) = self.route_append(request.into_inner())?;
        reply(raft.append_entries(rpc).await)
    }

    type AppendStreamStream =
        std::pin::Pin<Box<dyn futures::Stream<Item = Result<RaftReply, Status>> + Send>>;

    async fn append_stream(
        &self,
        request: Request<Streaming<RaftMessage>>,
    ) -> Result<Response<Self::AppendStreamStream>, Status> {
        // The replies are produced as the connection polls for them: each waits for the
        // next request, hands it to its group and yields the answer, so requests are
        // answered one at a time and in order, with no task or channel in between. A
        // refused request ends the stream with its status (the sender opens a new one).
        // Waiting for a request stops at shutdown, so an idle stream does not hold up a
        // graceful stop; a request being applied is answered first.
        let shutdown = self
            .registry
            .as_ref()
            .map(|r| r.shutdown().clone())
            .unwrap_or_default();
        let service = self.clone();
        let replies = futures::stream::unfold(Some(request.into_inner()), move |inbound| {
            let service = service.clone();
            let shutdown = shutdown.clone();
            async move {
                let mut inbound = inbound?;
                let message = tokio::select! {
                    m = inbound.message() => m,
                    () = shutdown.cancelled() => return None,
                };
                let answer = match message {
                    Ok(Some(message)) => match service.route_append(message) {
                        Ok((raft, rpc)) => {
                            reply(raft.append_entries(rpc).await).map(Response::into_inner)
                        }
                        Err(status) => Err(status),
                    },
                    Ok(None) => return None,
                    Err(status) => Err(status),
                };
                let next = answer.is_ok().then_some(inbound);
                Some((answer, next))
            }
        });
        let mut response = Response::new(Box::pin(replies) as Self::AppendStreamStream);
        // This server takes commands beside the envelope (see `network::commands`).
        response.metadata_mut().insert(
            COMMANDS_HEADER,
            tonic::metadata::MetadataValue::from_static("1"),
        );
        Ok(response)
    }

    async fn vote(&self, request: Request<RaftMessage>) -> Result<Response<RaftReply>, Status> {
        if let Some(until) = self.host.vote_quiet_until() {
            // The candidate treats this as an unreachable voter and asks again later.
            return Err(Status::unavailable(format!(
                "node {} started without Raft state and does not vote for another {} ms",
                self.host.node_id(),
                until
                    .saturating_duration_since(std::time::Instant::now())
                    .as_millis()
            )));
        }
        let group = request.get_ref().group_id;
        let (raft, rpc): (Raft, openraft::raft::VoteRequest<NodeId>) =
            self.route(request.get_ref())?;
        let answer = raft.vote(rpc.clone()).await;
        if let Ok(answer) = &answer {
            if refused_for_log(&rpc, answer) {
                // This broker holds more of the log than the candidate: if the group's
                // leader was found dead, its election driver campaigns here instead.
                self.host.election_notes().refused_shorter(group);
            }
        }
        reply(answer)
    }

    async fn install_snapshot(
        &self,
        request: Request<RaftMessage>,
    ) -> Result<Response<RaftReply>, Status> {
        let (raft, rpc) = self.route(request.get_ref())?;
        reply(raft.install_snapshot(rpc).await)
    }

    type WatchStream =
        std::pin::Pin<Box<dyn futures::Stream<Item = Result<WatchEvent, Status>> + Send>>;

    async fn watch(
        &self,
        request: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let registry = self
            .registry
            .as_ref()
            .ok_or_else(|| Status::unimplemented("this broker is not in a cluster"))?;
        let watch = request.get_ref();
        if watch.to_node != self.host.node_id() {
            return Err(Status::failed_precondition(format!(
                "this broker is node {}, not node {} (watch from node {}); check --peers",
                self.host.node_id(),
                watch.to_node,
                watch.from_node
            )));
        }
        // One event, then nothing until this broker shuts down: the stream must not hold
        // up a graceful stop. A killed broker's stream breaks with its connection.
        let shutdown = registry.shutdown().clone();
        let first = futures::stream::once(futures::future::ready(Ok(registry.watch_event())));
        let end = futures::stream::once(async move { shutdown.cancelled_owned().await })
            .filter_map(|()| futures::future::ready(None));
        Ok(Response::new(Box::pin(first.chain(end))))
    }

    async fn applied_point(
        &self,
        request: Request<AppliedPointRequest>,
    ) -> Result<Response<AppliedPointReply>, Status> {
        let asked = request.into_inner();
        if asked.to_node != self.host.node_id() {
            return Err(Status::failed_precondition(format!(
                "this broker is node {}, not node {} (applied point asked by node {}); check --peers",
                self.host.node_id(),
                asked.to_node,
                asked.from_node
            )));
        }
        let group = asked.group_id;
        let reader = self.host.applied_point(group).ok_or_else(|| {
            Status::not_found(format!(
                "Raft group {group} does not run on node {}",
                self.host.node_id()
            ))
        })?;
        // The read waits for an apply in progress (it holds the machine): not on a worker.
        let point = tokio::task::spawn_blocking(move || reader())
            .await
            .map_err(|e| Status::internal(format!("reading group {group}'s applied point: {e}")))?;
        let report = point.ok_or_else(|| {
            Status::failed_precondition(format!(
                "Raft group {group} on node {} has no applied point (not a partition, or nothing applied yet)",
                self.host.node_id()
            ))
        })?;
        Ok(Response::new(AppliedPointReply {
            applied_index: report.index,
            applied_end: report.end,
            producer_states: report.producer_states.unwrap_or_default().into(),
        }))
    }

    async fn ping(&self, request: Request<PingRequest>) -> Result<Response<PingReply>, Status> {
        let registry = self
            .registry
            .as_ref()
            .ok_or_else(|| Status::unimplemented("this broker is not in a cluster"))?;
        registry.answer_ping(request.get_ref()).map(Response::new)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::RaftTimings;

    fn vote_message(to_node: u64) -> Request<RaftMessage> {
        Request::new(RaftMessage {
            group_id: 7,
            from_node: 2,
            to_node,
            payload: Bytes::new(),
            commands: Vec::new(),
        })
    }

    #[tokio::test]
    async fn a_broker_started_without_raft_state_does_not_vote_for_an_election_timeout() {
        let dir = tempfile::tempdir().expect("tempdir");
        let timings = RaftTimings::default();
        let host = GroupHost::new(1, dir.path().join("raft"), timings).expect("host");
        let until = host.vote_quiet_until().expect("quiet after an empty start");
        let window = until.saturating_duration_since(std::time::Instant::now());
        assert!(window <= std::time::Duration::from_millis(timings.election_max_ms));
        let err = RaftService::new(host)
            .vote(vote_message(1))
            .await
            .expect_err("refused");
        assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
        assert!(err.message().contains("does not vote"), "{err:?}");
    }

    #[tokio::test]
    async fn an_applied_point_is_refused_for_another_node_or_an_unknown_group() {
        let dir = tempfile::tempdir().expect("tempdir");
        let host =
            GroupHost::new(1, dir.path().join("raft"), RaftTimings::default()).expect("host");
        let service = RaftService::new(host);
        let ask = |to_node| {
            Request::new(AppliedPointRequest {
                group_id: 7,
                from_node: 2,
                to_node,
            })
        };
        let err = service.applied_point(ask(3)).await.expect_err("not node 3");
        assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
        let err = service.applied_point(ask(1)).await.expect_err("no group 7");
        assert_eq!(err.code(), tonic::Code::NotFound, "{err:?}");
        assert!(err.message().contains("group 7"), "{err:?}");
    }

    #[tokio::test]
    async fn a_broker_that_found_its_raft_state_votes_at_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join("raft").join("0")).expect("a group folder");
        let host =
            GroupHost::new(1, dir.path().join("raft"), RaftTimings::default()).expect("host");
        assert!(host.vote_quiet_until().is_none());
        // Past the quiet check: the unknown group is what refuses it.
        let err = RaftService::new(host)
            .vote(vote_message(1))
            .await
            .expect_err("no group 7");
        assert_eq!(err.code(), tonic::Code::NotFound, "{err:?}");
    }
}
