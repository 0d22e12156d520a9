//! `rill.v1.Log`: Produce, ProduceStream, Fetch, ListOffsets and InitProducer.

use std::future::Future;
use std::pin::Pin;

use rill_proto::v1::list_offsets_request::Spec;
use rill_proto::v1::log_server::Log;
use rill_proto::v1::{
    FetchRequest, FetchResponse, InitProducerRequest, InitProducerResponse, ListOffsetsRequest,
    ListOffsetsResponse, OffsetSpec, ProduceRequest, ProduceResponse, ProduceStreamRequest,
    ProduceStreamResponse,
};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use crate::auth::{self, Operation, Resource};
use crate::error::BrokerError;
use crate::fetch::{fetch, parse_grpc_timeout};
use crate::produce;
use crate::state::Broker;

/// How many produce requests of one stream may be in flight (appended, awaiting their ack).
const STREAM_PIPELINE_DEPTH: usize = 64;

/// The metadata key that marks an `InitProducer` forwarded by another broker to the leader
/// of `__producers` (it is not forwarded again).
const FORWARDED: &str = "rill-forwarded";

/// How long a forwarded `InitProducer` may take at the leader of `__producers`: its commit
/// deadline (10 s) with room to spare. A leader that does not answer by then (cut off from
/// this broker with its packets dropped, or paused) makes the forward UNAVAILABLE, which the
/// client retries, perhaps at another broker, instead of being held without end.
const INIT_PRODUCER_FORWARD_MS: u64 = 15_000;

/// The Log service.
#[derive(Debug, Clone)]
pub struct LogService {
    broker: Broker,
}

impl LogService {
    /// A service over the broker state.
    pub fn new(broker: Broker) -> Self {
        LogService { broker }
    }
}

type ProduceStreamOut = Pin<Box<dyn Stream<Item = Result<ProduceStreamResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Log for LogService {
    async fn produce(
        &self,
        request: Request<ProduceRequest>,
    ) -> Result<Response<ProduceResponse>, Status> {
        let topic = Resource::topic(&request.get_ref().topic);
        auth::check(
            &self.broker,
            request.extensions(),
            Operation::Produce,
            topic,
        )?;
        let resp = produce::produce(&self.broker, request.into_inner()).await?;
        Ok(Response::new(resp))
    }

    type ProduceStreamStream = ProduceStreamOut;

    /// Appends each request in arrival order as soon as it arrives (an append that needs
    /// file work is awaited on the blocking pool before the next request is read), and acks
    /// in that order. Acks that wait for a sync are pipelined: later requests are appended
    /// meanwhile, and one group-commit sync covers them together. A replicated topic's
    /// requests are proposed to Raft in arrival order the same way, and their commits
    /// awaited meanwhile.
    async fn produce_stream(
        &self,
        request: Request<Streaming<ProduceStreamRequest>>,
    ) -> Result<Response<Self::ProduceStreamStream>, Status> {
        // Each message names its topic: the caller is checked on each (see crate::auth).
        let caller = auth::caller(&self.broker, request.extensions())?;
        let mut inbound = request.into_inner();
        let broker = self.broker.clone();
        let (ack_tx, ack_rx) = mpsc::channel::<StreamAck>(STREAM_PIPELINE_DEPTH);
        // Reader: appends in order, hands each ack (ready, or waiting on a sync) to the
        // writer in order.
        let shutdown = broker.shutdown().clone();
        let tasks = broker.tasks().clone();
        tasks.spawn(async move {
            loop {
                let msg = tokio::select! {
                    _ = shutdown.cancelled() => break,
                    msg = inbound.next() => msg,
                };
                let Some(Ok(msg)) = msg else { break };
                let sequence = msg.sequence;
                let ack = match msg.request {
                    None => StreamAck::Ready(stream_error(
                        sequence,
                        BrokerError::invalid("stream message without a request"),
                    )),
                    Some(req)
                        if broker
                            .replication()
                            .is_some_and(|r| r.is_replicated(&req.topic)) =>
                    'replicated: {
                        if let Some(s) = broker.security() {
                            let topic = Resource::topic(&req.topic);
                            if let Err(e) = s.authorize(&caller, Operation::Produce, &topic) {
                                break 'replicated StreamAck::Ready(stream_error(sequence, e));
                            }
                        }
                        // Replicated: proposed here, in arrival order (openraft logs
                        // client writes in the order they are handed over); only the wait
                        // for the commit runs on a task of its own, so later requests of
                        // the stream are proposed meanwhile, and acks stay in order.
                        match submit_replicated(&broker, req).await {
                            Err(e) => StreamAck::Ready(stream_error(sequence, e)),
                            Ok(submitted) => {
                                let (tx, rx) = oneshot::channel();
                                tokio::spawn(async move {
                                    let resp = match submitted.acked().await {
                                        Ok(r) => ProduceStreamResponse {
                                            sequence,
                                            response: Some(r),
                                            ..Default::default()
                                        },
                                        Err(e) => stream_error(sequence, e),
                                    };
                                    let _ = tx.send(resp);
                                });
                                StreamAck::Pending(rx)
                            }
                        }
                    }
                    Some(req) => match async {
                        if let Some(s) = broker.security() {
                            let topic = Resource::topic(&req.topic);
                            s.authorize(&caller, Operation::Produce, &topic)?;
                        }
                        prepare_and_append(&broker, req).await
                    }
                    .await
                    {
                        Err(e) => StreamAck::Ready(stream_error(sequence, e)),
                        Ok((prepared, appended)) if !produce::needs_settle(&appended) => {
                            // Nothing to wait for: settling returns at once.
                            StreamAck::Ready(settled(sequence, &prepared, appended).await)
                        }
                        Ok((prepared, appended)) => {
                            let (tx, rx) = oneshot::channel();
                            tokio::spawn(async move {
                                let _ = tx.send(settled(sequence, &prepared, appended).await);
                            });
                            StreamAck::Pending(rx)
                        }
                    },
                };
                if ack_tx.send(ack).await.is_err() {
                    break;
                }
            }
        });
        // The response stream hands out the acks strictly in request order, awaiting each
        // pending one in turn; HTTP/2 polls it directly (no writer task, no second channel:
        // one task wake-up fewer per batch).
        Ok(Response::new(Box::pin(AcksInOrder {
            acks: ack_rx,
            waiting: None,
        })))
    }

    /// The generated Fetch path. The broker's server answers Fetch in
    /// [`super::LogRoutes`] instead (the same [`fetch`], framed without a copy); this one
    /// serves a plain `LogServer<LogService>` embedded elsewhere.
    async fn fetch(
        &self,
        request: Request<FetchRequest>,
    ) -> Result<Response<FetchResponse>, Status> {
        let client_timeout = request
            .metadata()
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .and_then(parse_grpc_timeout);
        let topic = Resource::topic(&request.get_ref().topic);
        auth::check(
            &self.broker,
            request.extensions(),
            Operation::Consume,
            topic,
        )?;
        let resp = fetch(&self.broker, request.into_inner(), client_timeout).await?;
        Ok(Response::new(resp))
    }

    async fn init_producer(
        &self,
        request: Request<InitProducerRequest>,
    ) -> Result<Response<InitProducerResponse>, Status> {
        // Getting an id is part of producing; no topic is named yet, so any caller allowed
        // to connect may ask (the produce itself is authorized per topic).
        auth::caller(&self.broker, request.extensions())?;
        let ids = self.broker.producers()?.clone();
        // In a cluster the leader of `__producers` gives ids; another broker forwards (as
        // itself: the leader only needs an authenticated caller), once: a forwarded request
        // that reaches a broker which does not lead either (two views of an election) is
        // answered UNAVAILABLE, for the client to retry, rather than bounced on.
        if let crate::internal::Route::Leader(address) =
            crate::internal::route(&self.broker, crate::producers::PRODUCERS_TOPIC, 0)?
        {
            if request.metadata().contains_key(FORWARDED) {
                return Err(BrokerError::ReplicationUnavailable(format!(
                    "a forwarded InitProducer reached a broker that does not lead {}; the \
                     leader is at {address}; retry",
                    crate::producers::PRODUCERS_TOPIC
                ))
                .into());
            }
            let channel = crate::internal::channel(&self.broker, &address)?;
            let deadline = std::time::Duration::from_millis(INIT_PRODUCER_FORWARD_MS);
            let mut forwarded = Request::new(request.into_inner());
            forwarded.set_timeout(deadline);
            forwarded
                .metadata_mut()
                .insert(FORWARDED, tonic::metadata::MetadataValue::from_static("1"));
            let mut leader = rill_proto::v1::log_client::LogClient::new(channel);
            // A connection the split cut (CANCELLED) or refused is UNAVAILABLE, as a
            // deadline passed: the client retries either.
            return match tokio::time::timeout(deadline, leader.init_producer(forwarded)).await {
                Ok(answer) => crate::internal::relayed(answer),
                Err(_) => Err(BrokerError::ReplicationUnavailable(format!(
                    "the leader of {} at {address} did not answer a forwarded InitProducer \
                     within {INIT_PRODUCER_FORWARD_MS} ms; retry",
                    crate::producers::PRODUCERS_TOPIC
                ))
                .into()),
            };
        }
        let name = request.into_inner().producer_name;
        let (producer_id, epoch) = ids.init(&self.broker, name.as_deref()).await?;
        Ok(Response::new(InitProducerResponse {
            producer_id,
            producer_epoch: i32::from(epoch),
        }))
    }

    async fn list_offsets(
        &self,
        request: Request<ListOffsetsRequest>,
    ) -> Result<Response<ListOffsetsResponse>, Status> {
        let topic = Resource::topic(&request.get_ref().topic);
        auth::check(
            &self.broker,
            request.extensions(),
            Operation::Describe,
            topic,
        )?;
        let req = request.into_inner();
        let topic = self.broker.topic(&req.topic).map_err(Status::from)?;
        if let Some(replication) = self.broker.replication() {
            replication
                .check_readable(&req.topic, req.partition)
                .map_err(BrokerError::from)?;
        }
        let log = topic.log(req.partition)?;
        let log_start = log.log_start_offset();
        let high_watermark = log.high_watermark();
        let offset = match req.spec {
            Some(Spec::TimestampMs(ts)) => {
                let l = log.clone();
                tokio::task::spawn_blocking(move || l.offset_for_timestamp(ts))
                    .await
                    .map_err(BrokerError::from)?
                    .map_err(BrokerError::from)?
                    .unwrap_or(high_watermark)
            }
            Some(Spec::Position(p)) if p == OffsetSpec::Latest as i32 => high_watermark,
            _ => log_start,
        };
        Ok(Response::new(ListOffsetsResponse {
            offset,
            log_start_offset: log_start,
            high_watermark,
        }))
    }
}

/// One stream request's ack, in request order: ready now, or once its sync completes.
enum StreamAck {
    Ready(ProduceStreamResponse),
    Pending(oneshot::Receiver<ProduceStreamResponse>),
}

/// A ProduceStream's responses: its acks in request order, each pending one awaited before
/// the next is looked at. Ends when the reader is done, or when a pending ack's task went
/// away without answering.
struct AcksInOrder {
    acks: mpsc::Receiver<StreamAck>,
    waiting: Option<oneshot::Receiver<ProduceStreamResponse>>,
}

impl Stream for AcksInOrder {
    type Item = Result<ProduceStreamResponse, Status>;

    fn poll_next(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        use std::task::Poll;
        let this = &mut *self;
        loop {
            if let Some(waiting) = this.waiting.as_mut() {
                let done = std::task::ready!(Pin::new(waiting).poll(cx));
                this.waiting = None;
                return Poll::Ready(done.ok().map(Ok));
            }
            match std::task::ready!(this.acks.poll_recv(cx)) {
                None => return Poll::Ready(None),
                Some(StreamAck::Ready(resp)) => return Poll::Ready(Some(Ok(resp))),
                Some(StreamAck::Pending(rx)) => this.waiting = Some(rx),
            }
        }
    }
}

/// Checks a request to a replicated topic and hands its batches to their Raft groups
/// ([`crate::cluster::submit_replicated`]).
async fn submit_replicated(
    broker: &Broker,
    req: ProduceRequest,
) -> Result<crate::cluster::ReplicatedProduce, BrokerError> {
    produce::await_producer_known(broker, &req).await;
    let prepared = produce::prepare(broker, req)?;
    let Some(replication) = broker.replication() else {
        return Err(BrokerError::Internal(format!(
            "topic {} is replicated but this broker is not in a cluster",
            prepared.topic_name()
        )));
    };
    crate::cluster::submit_replicated(replication, &prepared).await
}

async fn prepare_and_append(
    broker: &Broker,
    req: ProduceRequest,
) -> Result<(produce::Prepared, produce::Appended), BrokerError> {
    produce::await_producer_known(broker, &req).await;
    let prepared = produce::prepare(broker, req)?;
    let appended = produce::append(&prepared).await?;
    Ok((prepared, appended))
}

/// Settles a stream request's appends and builds its ack.
async fn settled(
    sequence: u64,
    prepared: &produce::Prepared,
    appended: produce::Appended,
) -> ProduceStreamResponse {
    match produce::settle(prepared, appended).await {
        Ok(infos) => ProduceStreamResponse {
            sequence,
            response: Some(produce::response(&infos)),
            ..Default::default()
        },
        Err(e) => stream_error(sequence, e),
    }
}

fn stream_error(sequence: u64, e: BrokerError) -> ProduceStreamResponse {
    ProduceStreamResponse {
        sequence,
        response: None,
        error_code: Some(e.code() as i32),
        error_message: e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ack(sequence: u64) -> ProduceStreamResponse {
        ProduceStreamResponse {
            sequence,
            ..Default::default()
        }
    }

    /// Acks come out in request order even when a later one is ready first: a pending ack
    /// holds back the ones after it. A pending ack whose task went away ends the stream.
    /// Catches a response stream that hands out acks as they complete.
    #[tokio::test]
    async fn acks_come_out_in_request_order() {
        let (tx, rx) = mpsc::channel(8);
        let mut out = AcksInOrder {
            acks: rx,
            waiting: None,
        };
        let (slow_tx, slow_rx) = oneshot::channel();
        let (lost_tx, lost_rx) = oneshot::channel::<ProduceStreamResponse>();
        tx.send(StreamAck::Ready(ack(0))).await.expect("send");
        tx.send(StreamAck::Pending(slow_rx)).await.expect("send");
        tx.send(StreamAck::Ready(ack(2))).await.expect("send");
        tx.send(StreamAck::Pending(lost_rx)).await.expect("send");
        tx.send(StreamAck::Ready(ack(4))).await.expect("send");

        let next = |out: &mut AcksInOrder| {
            let waker = std::task::Waker::noop();
            let mut cx = std::task::Context::from_waker(waker);
            Pin::new(out).poll_next(&mut cx)
        };
        let sequence = |p: std::task::Poll<Option<Result<ProduceStreamResponse, Status>>>| match p {
            std::task::Poll::Ready(Some(Ok(r))) => Some(r.sequence),
            _ => None,
        };
        assert_eq!(sequence(next(&mut out)), Some(0));
        assert!(
            next(&mut out).is_pending(),
            "ack 1 is not ready: ack 2 waits"
        );
        slow_tx.send(ack(1)).expect("send");
        assert_eq!(sequence(next(&mut out)), Some(1));
        assert_eq!(sequence(next(&mut out)), Some(2));
        drop(lost_tx);
        assert!(
            matches!(next(&mut out), std::task::Poll::Ready(None)),
            "a lost ack ends the stream"
        );
    }
}
