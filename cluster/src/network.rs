//! The sending side of broker-to-broker Raft traffic: openraft's `RaftNetworkFactory` over the
//! internal `rill.v1.Raft` gRPC service.
//!
//! One HTTP/2 channel per peer address is shared by every group ([`Peers`]); each request
//! names its group, so one connection multiplexes the controller and all partition groups.
//! Channels use the broker's [`PeerTransport`]: TLS when the brokers serve TLS, and the
//! cluster token that proves to a peer that the caller is a broker.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{Backoff, RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use parking_lot::Mutex;
use rill_proto::v1::raft_client::RaftClient;
use rill_proto::v1::raft_reply::Result as ReplyResult;
use rill_proto::v1::{RaftMessage, RaftReply};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

use crate::failover::{refused_for_log, ElectionNotes};
use crate::types::{GroupId, Node, NodeId, TypeConfig};

/// How long a connection attempt to a peer may take.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
/// After this long without a byte from a peer while calls are open to it, an HTTP/2 ping
/// asks whether the connection still carries anything (Raft traffic, 100 ms heartbeats,
/// keeps a healthy connection from ever needing one).
const PEER_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(1);
/// How long that ping may go unanswered before the connection is taken for dead: every
/// call open on it fails with UNAVAILABLE and the next call connects again. A silent
/// network (packets dropped, nothing refused or reset) leaves a connection open forever;
/// without this, a call without a deadline of its own (a forwarded group or security call,
/// a watch) waited on it forever. Generous, so that a loaded but live peer is not cut off.
const PEER_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(3);
/// The first pause before retrying an unreachable peer, doubled on each failure up to
/// [`UNREACHABLE_BACKOFF_MAX`] (openraft's default is a flat 500 ms; a restarted broker is
/// often back sooner, and failover time counts).
const UNREACHABLE_BACKOFF: Duration = Duration::from_millis(100);
/// The longest pause before retrying an unreachable peer.
const UNREACHABLE_BACKOFF_MAX: Duration = Duration::from_millis(800);
/// The largest Raft message sent or received.
pub const MAX_RAFT_MESSAGE_BYTES: usize = 64 << 20;

/// How a broker reaches its peers: plaintext or TLS, and the credential it sends.
#[derive(Clone, Default)]
pub struct PeerTransport {
    /// TLS to peers (trusting the CA that signed their certificates); plaintext when `None`.
    pub tls: Option<ClientTlsConfig>,
    /// The cluster token, sent as `authorization: Bearer <token>` on every call to a peer.
    pub token: Option<MetadataValue<Ascii>>,
    /// The address connections to loopback peers leave from (see
    /// [`crate::ClusterConfig::source_ip`]); `None`: the system chooses.
    pub source_ip: Option<IpAddr>,
}

impl std::fmt::Debug for PeerTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the token: configs are logged.
        f.debug_struct("PeerTransport")
            .field("tls", &self.tls.is_some())
            .field("token", &self.token.is_some())
            .field("source_ip", &self.source_ip)
            .finish()
    }
}

impl PeerTransport {
    /// A lazily connected channel to `addr` (`host:port`) with this transport's TLS and token.
    pub fn connect_lazy(&self, addr: &str) -> Result<PeerChannel, tonic::transport::Error> {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let mut endpoint = Endpoint::from_shared(format!("{scheme}://{addr}"))?
            .connect_timeout(CONNECT_TIMEOUT)
            .http2_keep_alive_interval(PEER_KEEPALIVE_INTERVAL)
            .keep_alive_timeout(PEER_KEEPALIVE_TIMEOUT)
            .tcp_nodelay(true)
            .local_address(source_for(self.source_ip, addr));
        if let Some(tls) = &self.tls {
            endpoint = endpoint.tls_config(tls.clone())?;
        }
        Ok(InterceptedService::new(
            endpoint.connect_lazy(),
            PeerAuth(self.token.clone()),
        ))
    }
}

/// Adds the cluster token to each call to a peer.
#[derive(Clone, Debug)]
pub struct PeerAuth(Option<MetadataValue<Ascii>>);

impl tonic::service::Interceptor for PeerAuth {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(token) = &self.0 {
            req.metadata_mut().insert("authorization", token.clone());
        }
        Ok(req)
    }
}

/// A channel to a peer, with the cluster token added to each call.
pub type PeerChannel = InterceptedService<Channel, PeerAuth>;

/// The channels to peers, by address, shared by every group of a broker.
#[derive(Clone, Default)]
pub struct Peers {
    transport: PeerTransport,
    channels: Arc<Mutex<HashMap<String, PeerChannel>>>,
}

impl Peers {
    /// Channels made with `transport`.
    pub fn new(transport: PeerTransport) -> Self {
        Peers {
            transport,
            channels: Arc::default(),
        }
    }

    /// The channel to `addr` (`host:port`), created lazily on first use.
    pub(crate) fn channel(&self, addr: &str) -> Result<PeerChannel, tonic::transport::Error> {
        let mut channels = self.channels.lock();
        if let Some(c) = channels.get(addr) {
            return Ok(c.clone());
        }
        let channel = self.transport.connect_lazy(addr)?;
        channels.insert(addr.to_string(), channel.clone());
        Ok(channel)
    }

    /// The address connections to loopback peers leave from (see [`source_for`]).
    pub(crate) fn source_ip(&self) -> Option<IpAddr> {
        self.transport.source_ip
    }
}

/// The local address a connection to `addr` leaves from: `source` when both it and the
/// target are loopback addresses of the same family (brokers on one machine, each on its own
/// 127.0.0.N), else the system's choice. A loopback source could not reach another host.
pub(crate) fn source_for(source: Option<IpAddr>, addr: &str) -> Option<IpAddr> {
    let source = source.filter(IpAddr::is_loopback)?;
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let target: IpAddr = host.parse().ok()?;
    (target.is_loopback() && target.is_ipv4() == source.is_ipv4()).then_some(source)
}

/// Makes the network clients of one group.
#[derive(Clone)]
pub struct GroupNetwork {
    group: GroupId,
    from: NodeId,
    peers: Peers,
    notes: Arc<ElectionNotes>,
}

impl GroupNetwork {
    /// The network of `group` on node `from`, over the shared `peers`, noting what vote
    /// requests show in `notes`.
    pub fn new(group: GroupId, from: NodeId, peers: Peers, notes: Arc<ElectionNotes>) -> Self {
        GroupNetwork {
            group,
            from,
            peers,
            notes,
        }
    }
}

impl RaftNetworkFactory<TypeConfig> for GroupNetwork {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &Node) -> PeerClient {
        PeerClient {
            group: self.group,
            from: self.from,
            to: target,
            channel: self.peers.channel(&node.addr).map_err(|e| e.to_string()),
            notes: self.notes.clone(),
            append: AppendPath::Stream(None),
        }
    }
}

/// Sends one group's Raft messages to one peer.
pub struct PeerClient {
    group: GroupId,
    from: NodeId,
    to: NodeId,
    /// The channel, or why none could be made (a malformed address).
    channel: Result<PeerChannel, String>,
    notes: Arc<ElectionNotes>,
    /// How AppendEntries requests go to the peer.
    append: AppendPath,
}

/// How a [`PeerClient`] sends AppendEntries.
enum AppendPath {
    /// On an `AppendStream` kept open to the peer (`None` until the next request opens one).
    Stream(Option<Box<AppendStream>>),
    /// One unary `AppendEntries` call each: the peer does not serve `AppendStream`.
    Unary,
}

/// An open `AppendStream`: requests go in through `requests`, and `replies` answers them
/// one for one, in order. Only one request is outstanding at a time (openraft sends one
/// group's entries to a follower one request after another), so the next reply always
/// answers the request just sent; a request that fails or times out drops the stream, so a
/// late reply can never be taken for the next request's.
struct AppendStream {
    requests: tokio::sync::mpsc::Sender<RaftMessage>,
    replies: tonic::Streaming<RaftReply>,
    /// The server takes commands beside the envelope ([`commands`]).
    detach: bool,
}

/// Why a call to a peer failed, before openraft's error types are chosen.
enum CallError<E> {
    /// Not connected or refused: openraft backs off before retrying.
    Unreachable(String),
    /// Any other transport or encoding failure.
    Network(String),
    /// The remote group answered with an error.
    Remote(E),
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Message(String);

impl PeerClient {
    /// The message that carries `request` to this client's peer and group.
    fn message<Req: Serialize>(&self, request: &Req) -> Result<RaftMessage, String> {
        let payload = bincode::serialize(request).map_err(|e| e.to_string())?;
        Ok(RaftMessage {
            group_id: self.group,
            from_node: self.from,
            to_node: self.to,
            payload: Bytes::from(payload),
            commands: Vec::new(),
        })
    }

    /// The error a refusing status becomes, as for a unary call.
    fn status_error<E>(&self, status: &tonic::Status) -> CallError<E> {
        let text = format!(
            "group {} node {} -> {}: {status}",
            self.group, self.from, self.to
        );
        match status.code() {
            // Not connected, or the peer does not host this group yet.
            tonic::Code::Unavailable | tonic::Code::NotFound => CallError::Unreachable(text),
            _ => CallError::Network(text),
        }
    }

    /// Sends an AppendEntries request on the open stream (opening one first if none is),
    /// within openraft's deadline; falls back to a unary call for a peer without streams.
    async fn append(
        &mut self,
        request: AppendEntriesRequest<TypeConfig>,
        option: &RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, CallError<RaftError<NodeId>>> {
        if matches!(self.append, AppendPath::Unary) {
            return self.call(RpcKind::Append, &request, option).await;
        }
        let deadline = option.hard_ttl();
        match tokio::time::timeout(deadline, self.append_on_stream(request)).await {
            Ok(Ok(Ok(reply))) => decode_reply(reply),
            Ok(Ok(Err(request))) => {
                // The peer has no `AppendStream`: from now on, unary calls.
                self.append = AppendPath::Unary;
                self.call(RpcKind::Append, &request, option).await
            }
            Ok(Err(e)) => {
                self.append = AppendPath::Stream(None);
                Err(e)
            }
            Err(_) => {
                self.append = AppendPath::Stream(None);
                Err(CallError::Network(format!(
                    "group {} node {} -> {}: no AppendEntries reply within {} ms",
                    self.group,
                    self.from,
                    self.to,
                    deadline.as_millis()
                )))
            }
        }
    }

    /// One request and its reply on the stream; the request back when the peer does not
    /// serve streams.
    async fn append_on_stream<E>(
        &mut self,
        mut request: AppendEntriesRequest<TypeConfig>,
    ) -> Result<Result<RaftReply, AppendEntriesRequest<TypeConfig>>, CallError<E>> {
        if let AppendPath::Stream(None) = self.append {
            let channel = self.channel.clone().map_err(CallError::Unreachable)?;
            let mut client = RaftClient::new(channel)
                .max_decoding_message_size(MAX_RAFT_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_RAFT_MESSAGE_BYTES);
            // One request is outstanding at a time, so one slot is enough.
            let (requests, outbound) = tokio::sync::mpsc::channel(1);
            let opened = client
                .append_stream(tokio_stream::wrappers::ReceiverStream::new(outbound))
                .await;
            let (detach, replies) = match opened {
                Ok(r) => (
                    r.metadata().get(commands::COMMANDS_HEADER).is_some(),
                    r.into_inner(),
                ),
                Err(status) if status.code() == tonic::Code::Unimplemented => {
                    return Ok(Err(request))
                }
                Err(status) => return Err(self.status_error(&status)),
            };
            self.append = AppendPath::Stream(Some(Box::new(AppendStream {
                requests,
                replies,
                detach,
            })));
        }
        let AppendPath::Stream(Some(stream)) = &mut self.append else {
            return Ok(Err(request));
        };
        let commands = if stream.detach {
            commands::detach(&mut request)
        } else {
            Vec::new()
        };
        let payload =
            bincode::serialize(&request).map_err(|e| CallError::Network(e.to_string()))?;
        let message = RaftMessage {
            group_id: self.group,
            from_node: self.from,
            to_node: self.to,
            payload: Bytes::from(payload),
            commands,
        };
        if stream.requests.send(message).await.is_err() {
            return Err(CallError::Network(format!(
                "group {} node {} -> {}: the AppendEntries stream closed",
                self.group, self.from, self.to
            )));
        }
        match stream.replies.message().await {
            Ok(Some(reply)) => Ok(Ok(reply)),
            Ok(None) => Err(CallError::Network(format!(
                "group {} node {} -> {}: the AppendEntries stream ended",
                self.group, self.from, self.to
            ))),
            Err(status) => Err(self.status_error(&status)),
        }
    }

    async fn call<Req, Resp, E>(
        &self,
        kind: RpcKind,
        request: &Req,
        option: &RPCOption,
    ) -> Result<Resp, CallError<E>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: DeserializeOwned,
    {
        let channel = self.channel.clone().map_err(CallError::Unreachable)?;
        let message = self.message(request).map_err(CallError::Network)?;
        let mut client = RaftClient::new(channel)
            .max_decoding_message_size(MAX_RAFT_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_RAFT_MESSAGE_BYTES);
        let mut request = tonic::Request::new(message);
        request.set_timeout(option.hard_ttl());
        let reply = match kind {
            RpcKind::Append => client.append_entries(request).await,
            RpcKind::Vote => client.vote(request).await,
            RpcKind::Snapshot => client.install_snapshot(request).await,
        };
        match reply {
            Ok(r) => decode_reply(r.into_inner()),
            Err(status) => Err(self.status_error(&status)),
        }
    }

    fn to_rpc_error<E: std::error::Error>(
        &self,
        e: CallError<RaftError<NodeId, E>>,
    ) -> RPCError<NodeId, Node, RaftError<NodeId, E>> {
        match e {
            CallError::Unreachable(m) => RPCError::Unreachable(Unreachable::new(&Message(m))),
            CallError::Network(m) => RPCError::Network(NetworkError::new(&Message(m))),
            CallError::Remote(e) => RPCError::RemoteError(RemoteError::new(self.to, e)),
        }
    }
}

/// A group's answer from its reply: the openraft response, or the Raft error it returned.
fn decode_reply<Resp: DeserializeOwned, E: DeserializeOwned>(
    reply: RaftReply,
) -> Result<Resp, CallError<E>> {
    match reply.result {
        Some(ReplyResult::Ok(bytes)) => {
            bincode::deserialize(&bytes).map_err(|e| CallError::Network(e.to_string()))
        }
        Some(ReplyResult::RaftError(bytes)) => Err(CallError::Remote(
            bincode::deserialize(&bytes).map_err(|e| CallError::Network(e.to_string()))?,
        )),
        None => Err(CallError::Network("an empty Raft reply".into())),
    }
}

/// Which RPC of the `Raft` service a message goes to.
#[derive(Clone, Copy)]
enum RpcKind {
    Append,
    Vote,
    Snapshot,
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, Node, RaftError<NodeId>>> {
        self.append(rpc, &option)
            .await
            .map_err(|e| self.to_rpc_error(e))
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, Node, RaftError<NodeId, InstallSnapshotError>>,
    > {
        self.call(RpcKind::Snapshot, &rpc, &option)
            .await
            .map_err(|e| self.to_rpc_error(e))
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, Node, RaftError<NodeId>>> {
        // In flight until answered, failed, or dropped at openraft's timeout.
        let _in_flight = self.notes.vote_sent(self.group);
        let answer: VoteResponse<NodeId> = self
            .call(RpcKind::Vote, &rpc, &option)
            .await
            .map_err(|e| self.to_rpc_error(e))?;
        if refused_for_log(&rpc, &answer) {
            self.notes.outlogged(self.group);
        }
        Ok(answer)
    }

    fn backoff(&self) -> Backoff {
        Backoff::new(std::iter::successors(Some(UNREACHABLE_BACKOFF), |d| {
            Some((*d * 2).min(UNREACHABLE_BACKOFF_MAX))
        }))
    }
}

mod commands;
pub(crate) use commands::{attach as attach_commands, COMMANDS_HEADER};

#[cfg(test)]
mod stream_tests;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_loopback_source_is_used_only_for_loopback_peers_of_its_family() {
        let v4: IpAddr = "127.0.1.2".parse().expect("ip");
        assert_eq!(source_for(Some(v4), "127.0.2.3:7000"), Some(v4));
        assert_eq!(source_for(Some(v4), "10.0.0.3:7000"), None);
        assert_eq!(source_for(Some(v4), "broker-3:7000"), None);
        assert_eq!(source_for(Some(v4), "[::1]:7000"), None);
        assert_eq!(source_for(None, "127.0.0.1:7000"), None);
        let wide: IpAddr = "10.0.0.2".parse().expect("ip");
        assert_eq!(source_for(Some(wide), "127.0.0.1:7000"), None);
        let v6: IpAddr = "::1".parse().expect("ip");
        assert_eq!(source_for(Some(v6), "[::1]:7000"), Some(v6));
    }

    /// A peer behind a silent network: its connections are accepted (by a proxy, or a
    /// kernel's listen backlog) but nothing ever comes back, and nothing is reset. A call
    /// without a deadline of its own must still fail, with UNAVAILABLE (which callers
    /// retry), once the keep-alive ping goes unanswered, rather than wait forever.
    #[tokio::test]
    async fn a_call_to_a_peer_that_accepts_but_never_answers_fails_unavailable() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        // Accepts and holds every connection, reading and writing nothing.
        let holder = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                held.push(socket);
            }
        });
        let channel = PeerTransport::default()
            .connect_lazy(&addr.to_string())
            .expect("channel");
        let request = tonic::Request::new(rill_proto::v1::PingRequest::default());
        let started = tokio::time::Instant::now();
        // Far above the keep-alive's bound (interval + timeout), far below forever.
        let bound = 4 * (PEER_KEEPALIVE_INTERVAL + PEER_KEEPALIVE_TIMEOUT);
        let answer = tokio::time::timeout(bound, RaftClient::new(channel).ping(request))
            .await
            .expect("a call to a silent peer must fail, not hang");
        holder.abort();
        let status = answer.expect_err("nothing answered");
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
        assert!(
            started.elapsed() >= PEER_KEEPALIVE_TIMEOUT,
            "failed after {:?}, before the ping could time out: {status:?}",
            started.elapsed()
        );
    }
}
