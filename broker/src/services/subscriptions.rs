//! `rill.v1.Subscriptions`: queue subscriptions (admin, Receive, Acknowledge) and the push
//! stream, over [`Subscriptions`].

use std::pin::Pin;

use rill_proto::v1::subscriptions_server::Subscriptions as SubscriptionsRpc;
use rill_proto::v1::{
    AcknowledgeRequest, AcknowledgeResponse, CreateSubscriptionRequest, CreateSubscriptionResponse,
    DeleteSubscriptionRequest, DeleteSubscriptionResponse, DescribeSubscriptionRequest,
    DescribeSubscriptionResponse, ListSubscriptionsRequest, ListSubscriptionsResponse,
    ReceiveRequest, ReceiveResponse, SeekSubscriptionRequest, SeekSubscriptionResponse,
    SeekedPartition, StartPosition, SubscribeRequest, SubscribeResponse, SubscriptionPartition,
    SubscriptionSummary,
};
use rill_storage::log::now_ms;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use crate::auth::{self, Operation, Resource};
use crate::error::BrokerError;
use crate::fetch::{parse_grpc_timeout, wait_budget};
use crate::internal::{self, Route};
use crate::state::Broker;
use crate::subscriptions::persist::SUBSCRIPTIONS_TOPIC;
use crate::subscriptions::{config_to_pb, settle_config, Ack, Subscriptions};
use rill_cluster::network::PeerChannel;
use rill_proto::v1::subscriptions_client::SubscriptionsClient;

/// The Subscriptions service.
#[derive(Debug, Clone)]
pub struct SubscriptionsService {
    broker: Broker,
    subs: Subscriptions,
}

impl SubscriptionsService {
    /// A service over the broker state and its subscriptions.
    pub fn new(broker: Broker, subs: Subscriptions) -> Self {
        SubscriptionsService { broker, subs }
    }

    /// The caller may also do `op` on `topic` (the subscription's topic), when security is on.
    fn also_topic<T>(
        &self,
        request: &Request<T>,
        op: Operation,
        topic: &str,
    ) -> Result<(), BrokerError> {
        let caller = auth::caller(&self.broker, request.extensions())?;
        if let Some(s) = self.broker.security() {
            s.authorize(&caller, op, &Resource::topic(topic))?;
        }
        Ok(())
    }
}

impl SubscriptionsService {
    /// A client to the leader of `__subscriptions` when that is another broker (in a
    /// cluster only that broker serves subscriptions); `None` when it is this one. Calls
    /// go there on behalf of the caller, who is authorized there.
    fn leader_elsewhere(&self) -> Result<Option<SubscriptionsClient<PeerChannel>>, BrokerError> {
        match internal::route(&self.broker, SUBSCRIPTIONS_TOPIC, 0)? {
            Route::Here => Ok(None),
            Route::Leader(address) => Ok(Some(SubscriptionsClient::new(internal::channel(
                &self.broker,
                &address,
            )?))),
        }
    }
}

/// Forwards `$request` to the leader of `__subscriptions` with `$method` when that is
/// another broker, returning its answer from the handler.
macro_rules! forward_unary {
    ($self:ident, $request:ident, $method:ident) => {
        if let Some(mut leader) = $self.leader_elsewhere()? {
            let caller = auth::caller(&$self.broker, $request.extensions())?;
            return internal::relayed(
                leader
                    .$method(internal::on_behalf(&caller, $request.into_inner())?)
                    .await,
            );
        }
    };
}

/// The push stream's type.
pub type SubscribeStream = Pin<Box<dyn Stream<Item = Result<SubscribeResponse, Status>> + Send>>;

#[tonic::async_trait]
impl SubscriptionsRpc for SubscriptionsService {
    async fn create(
        &self,
        request: Request<CreateSubscriptionRequest>,
    ) -> Result<Response<CreateSubscriptionResponse>, Status> {
        forward_unary!(self, request, create);
        let name = request.get_ref().name.clone();
        auth::check(
            &self.broker,
            request.extensions(),
            Operation::Create,
            Resource::subscription(&name),
        )?;
        let config = request.get_ref().config.clone().unwrap_or_default();
        self.also_topic(&request, Operation::Describe, &config.topic)?;
        if !config.dead_letter_topic.is_empty() {
            // The broker writes there on the creator's behalf.
            self.also_topic(&request, Operation::Produce, &config.dead_letter_topic)?;
        }
        let from_earliest = request.get_ref().start() == StartPosition::Earliest;
        let config = settle_config(&name, &config, from_earliest)?;
        self.subs
            .create(&self.broker, &name, config.clone())
            .await?;
        Ok(Response::new(CreateSubscriptionResponse {
            config: Some(config_to_pb(&config)),
        }))
    }

    async fn list(
        &self,
        request: Request<ListSubscriptionsRequest>,
    ) -> Result<Response<ListSubscriptionsResponse>, Status> {
        forward_unary!(self, request, list);
        let caller = auth::caller(&self.broker, request.extensions())?;
        let mut all = self.subs.list();
        // Lists only the subscriptions the caller may describe.
        if let Some(s) = self.broker.security() {
            all.retain(|(n, _)| s.may(&caller, Operation::Describe, &Resource::subscription(n)));
        }
        Ok(Response::new(ListSubscriptionsResponse {
            subscriptions: all
                .into_iter()
                .map(|(name, topic)| SubscriptionSummary { name, topic })
                .collect(),
        }))
    }

    async fn describe(
        &self,
        request: Request<DescribeSubscriptionRequest>,
    ) -> Result<Response<DescribeSubscriptionResponse>, Status> {
        forward_unary!(self, request, describe);
        let name = request.get_ref().name.clone();
        auth::check(
            &self.broker,
            request.extensions(),
            Operation::Describe,
            Resource::subscription(&name),
        )?;
        let d = self.subs.describe(&self.broker, &name).await?;
        let now = now_ms();
        let partitions: Vec<SubscriptionPartition> = d
            .partitions
            .iter()
            .map(|(p, s, hwm)| SubscriptionPartition {
                partition: *p,
                ack_floor: s.floor,
                next_offset: s.next,
                high_watermark: *hwm,
                backlog: s.backlog(*hwm),
                in_flight: s.in_flight(now),
                redelivery_pending: s.redelivery_pending(now),
            })
            .collect();
        Ok(Response::new(DescribeSubscriptionResponse {
            name,
            config: Some(config_to_pb(&d.config)),
            backlog: partitions.iter().map(|p| p.backlog).sum(),
            in_flight: partitions.iter().map(|p| p.in_flight).sum(),
            oldest_unacked_age_ms: d.oldest_unacked_ms.map_or(0, |t| (now - t).max(0)),
            dead_lettered: d.partitions.iter().map(|(_, s, _)| s.dead_lettered).sum(),
            archived: d.partitions.iter().map(|(_, s, _)| s.archived).sum(),
            partitions,
        }))
    }

    async fn delete(
        &self,
        request: Request<DeleteSubscriptionRequest>,
    ) -> Result<Response<DeleteSubscriptionResponse>, Status> {
        forward_unary!(self, request, delete);
        let name = request.get_ref().name.clone();
        auth::check(
            &self.broker,
            request.extensions(),
            Operation::Delete,
            Resource::subscription(&name),
        )?;
        self.subs.delete(&name).await?;
        Ok(Response::new(DeleteSubscriptionResponse {}))
    }

    async fn seek(
        &self,
        request: Request<SeekSubscriptionRequest>,
    ) -> Result<Response<SeekSubscriptionResponse>, Status> {
        forward_unary!(self, request, seek);
        let name = request.get_ref().name.clone();
        auth::check(
            &self.broker,
            request.extensions(),
            Operation::Alter,
            Resource::subscription(&name),
        )?;
        let req = request.into_inner();
        let target = req.target.ok_or_else(|| {
            BrokerError::invalid(format!(
                "seek of subscription {name:?} needs to_offset or to_timestamp_ms"
            ))
        })?;
        let moved = self
            .subs
            .seek(&self.broker, &name, target, req.partition)
            .await?;
        Ok(Response::new(SeekSubscriptionResponse {
            partitions: moved
                .into_iter()
                .map(|(partition, offset)| SeekedPartition { partition, offset })
                .collect(),
        }))
    }

    async fn receive(
        &self,
        request: Request<ReceiveRequest>,
    ) -> Result<Response<ReceiveResponse>, Status> {
        forward_unary!(self, request, receive);
        let name = request.get_ref().subscription.clone();
        auth::check(
            &self.broker,
            request.extensions(),
            Operation::Consume,
            Resource::subscription(&name),
        )?;
        let topic = self.subs.get(&name)?.config().topic.clone();
        self.also_topic(&request, Operation::Consume, &topic)?;
        let client_timeout = request
            .metadata()
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .and_then(parse_grpc_timeout);
        let req = request.into_inner();
        let wait = wait_budget(
            req.max_wait_ms,
            self.broker.config().max_fetch_wait_ms,
            client_timeout,
        );
        let max_bytes = match req.max_bytes {
            0 => self.broker.config().max_fetch_bytes,
            n => (n as usize).min(self.broker.config().max_fetch_bytes),
        };
        let records = self
            .subs
            .receive(
                &self.broker,
                &name,
                &req.consumer_id,
                req.max_records as usize,
                max_bytes,
                wait,
            )
            .await?;
        Ok(Response::new(ReceiveResponse { records }))
    }

    async fn acknowledge(
        &self,
        request: Request<AcknowledgeRequest>,
    ) -> Result<Response<AcknowledgeResponse>, Status> {
        forward_unary!(self, request, acknowledge);
        let name = request.get_ref().subscription.clone();
        auth::check(
            &self.broker,
            request.extensions(),
            Operation::Consume,
            Resource::subscription(&name),
        )?;
        let req = request.into_inner();
        let ack = Ack::from_pb(&req.ranges, req.r#type, req.delay_ms, &req.error)?;
        let (records, lock_deadline_ms) = self
            .subs
            .acknowledge(&self.broker, &name, &req.consumer_id, &ack)
            .await?;
        Ok(Response::new(AcknowledgeResponse {
            records,
            lock_deadline_ms,
        }))
    }

    type SubscribeStream = SubscribeStream;

    async fn subscribe(
        &self,
        request: Request<Streaming<SubscribeRequest>>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let caller = auth::caller(&self.broker, request.extensions())?;
        if let Some(mut leader) = self.leader_elsewhere()? {
            // The push stream runs at the leader; this broker relays both directions.
            let inbound = request.into_inner().map_while(Result::ok);
            let relayed = internal::relayed(
                leader
                    .subscribe(internal::on_behalf(&caller, inbound)?)
                    .await,
            )?
            .into_inner();
            return Ok(Response::new(Box::pin(relayed)));
        }
        let stream = crate::subscriptions::push::start(
            self.broker.clone(),
            self.subs.clone(),
            caller,
            request.into_inner(),
        )
        .await?;
        Ok(Response::new(stream))
    }
}
