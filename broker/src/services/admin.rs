//! `rill.v1.Admin`: create, delete, list and describe topics.

use rill_proto::v1 as pb;
use rill_proto::v1::admin_server::Admin;
use rill_proto::v1::flush_policy::Policy;
use rill_storage::log::effective_max_batch_bytes;
use rill_storage::{FlushPolicy, TopicConfig};
use tonic::{Request, Response, Status};

use crate::auth::{self, Operation, Resource};
use crate::error::BrokerError;
use crate::state::{Broker, TopicState};

/// The Admin service.
#[derive(Debug, Clone)]
pub struct AdminService {
    broker: Broker,
}

impl AdminService {
    /// A service over the broker state.
    pub fn new(broker: Broker) -> Self {
        AdminService { broker }
    }
}

/// Resolves a requested config over the broker's topic defaults. Negative retention means
/// "no limit"; absent values take the default.
pub fn resolve_config(
    req: Option<pb::TopicConfig>,
    defaults: &TopicConfig,
) -> Result<TopicConfig, BrokerError> {
    let mut config = defaults.clone();
    let Some(req) = req else { return Ok(config) };
    if req.partitions > 0 {
        config.partitions = req.partitions;
    }
    let limit = |v: i64, what: &str| -> Result<Option<u64>, BrokerError> {
        match v {
            -1 => Ok(None),
            v if v > 0 => Ok(Some(v as u64)),
            v => Err(BrokerError::invalid(format!(
                "{what} must be > 0, or -1 for no limit; got {v}"
            ))),
        }
    };
    if let Some(v) = req.retention_ms {
        config.retention_ms = limit(v, "retention_ms")?;
    }
    if let Some(v) = req.retention_bytes {
        config.retention_bytes = limit(v, "retention_bytes")?;
    }
    if let Some(v) = req.segment_bytes {
        config.segment_bytes = v;
    }
    if let Some(v) = req.segment_ms {
        config.segment_ms = u64::try_from(v)
            .map_err(|_| BrokerError::invalid(format!("segment_ms must be > 0; got {v}")))?;
    }
    let bound = |v: i64, what: &str| -> Result<Option<u64>, BrokerError> {
        match v {
            -1 => Ok(None),
            v => u64::try_from(v).map(Some).map_err(|_| {
                BrokerError::invalid(format!("{what} must be >= 0, or -1 for no bound; got {v}"))
            }),
        }
    };
    if let Some(v) = req.timestamp_after_max_ms {
        config.timestamp_after_max_ms = bound(v, "timestamp_after_max_ms")?;
    }
    if let Some(v) = req.timestamp_before_max_ms {
        config.timestamp_before_max_ms = bound(v, "timestamp_before_max_ms")?;
    }
    if let Some(c) = req.compression {
        config.compression = c.parse().map_err(BrokerError::invalid)?;
    }
    if let Some(policy) = req.flush.and_then(|f| f.policy) {
        config.flush = match policy {
            Policy::Always(_) => FlushPolicy::Always,
            Policy::Never(_) => FlushPolicy::Never,
            Policy::IntervalMs(ms) => FlushPolicy::IntervalMs(ms),
        };
    }
    Ok(config)
}

/// The wire form of a resolved config.
pub fn config_to_pb(c: &TopicConfig) -> pb::TopicConfig {
    let opt = |v: Option<u64>| Some(v.map_or(-1, |v| i64::try_from(v).unwrap_or(i64::MAX)));
    pb::TopicConfig {
        partitions: c.partitions,
        retention_ms: opt(c.retention_ms),
        retention_bytes: opt(c.retention_bytes),
        segment_bytes: Some(c.segment_bytes),
        segment_ms: Some(i64::try_from(c.segment_ms).unwrap_or(i64::MAX)),
        flush: Some(pb::FlushPolicy {
            policy: Some(match c.flush {
                FlushPolicy::Always => Policy::Always(pb::Always {}),
                FlushPolicy::Never => Policy::Never(pb::Never {}),
                FlushPolicy::IntervalMs(ms) => Policy::IntervalMs(ms),
            }),
        }),
        timestamp_after_max_ms: opt(c.timestamp_after_max_ms),
        timestamp_before_max_ms: opt(c.timestamp_before_max_ms),
        compression: Some(c.compression.to_string()),
    }
}

/// Describes a topic: its config, the largest batch it accepts with the broker's
/// `max_batch_bytes`, and each partition's figures.
pub fn describe(state: &TopicState, max_batch_bytes: usize) -> pb::TopicDescription {
    let topic = &state.topic;
    let partitions = topic
        .partitions()
        .map(|(p, log)| match log {
            Ok(log) => {
                let s = log.stats();
                pb::PartitionDescription {
                    partition: p,
                    log_start_offset: s.log_start_offset,
                    high_watermark: s.high_watermark,
                    size_bytes: s.size_bytes,
                    segments: s.segments,
                    fenced_reason: log.fenced_reason(),
                    waiting_fetches: state.waiting_fetches(p),
                }
            }
            Err(e) => pb::PartitionDescription {
                partition: p,
                fenced_reason: Some(e.to_string()),
                ..Default::default()
            },
        })
        .collect();
    pb::TopicDescription {
        name: topic.name().to_string(),
        config: Some(config_to_pb(topic.config())),
        partitions,
        max_batch_bytes: effective_max_batch_bytes(max_batch_bytes, topic.config().segment_bytes)
            as u64,
        records_fetched: state.counters.get().records_fetched,
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn create_topic(
        &self,
        request: Request<pb::CreateTopicRequest>,
    ) -> Result<Response<pb::CreateTopicResponse>, Status> {
        self.broker.check_running()?;
        let topic = Resource::topic(&request.get_ref().name);
        let caller = auth::check(&self.broker, request.extensions(), Operation::Create, topic)?;
        let req = request.into_inner();
        // In a cluster every topic goes through the controller (replication factor 1 too);
        // without one, a replication factor above 1 is refused there.
        let clustered = self.broker.replication().is_some();
        if let Some(rf) = req
            .replication_factor
            .filter(|rf| *rf > 1 || clustered)
            .or(clustered.then_some(1))
        {
            let rf = rf.max(1);
            let config = resolve_config(req.config.clone(), &self.broker.config().topic_defaults)?;
            crate::cluster::create_replicated(&self.broker, &req, config, rf).await?;
            let state = self.broker.topic(&req.name)?;
            return Ok(Response::new(pb::CreateTopicResponse {
                topic: Some(describe(&state, self.broker.config().max_batch_bytes)),
            }));
        }
        let config = resolve_config(req.config.clone(), &self.broker.config().topic_defaults)?;
        let store = self.broker.store().clone();
        let name = req.name;
        let topic = tokio::task::spawn_blocking(move || store.create_topic(&name, config))
            .await
            .map_err(BrokerError::from)?
            .map_err(BrokerError::from)?;
        let state = self.broker.attach(topic);
        tracing::info!(
            topic = state.name(),
            partitions = state.topic.partition_count(),
            "topic created"
        );
        tracing::info!(target: "rill::audit", by = %caller.principal, topic = state.name(), "topic created");
        Ok(Response::new(pb::CreateTopicResponse {
            topic: Some(describe(&state, self.broker.config().max_batch_bytes)),
        }))
    }

    async fn delete_topic(
        &self,
        request: Request<pb::DeleteTopicRequest>,
    ) -> Result<Response<pb::DeleteTopicResponse>, Status> {
        self.broker.check_running()?;
        let topic = Resource::topic(&request.get_ref().name);
        let caller = auth::check(&self.broker, request.extensions(), Operation::Delete, topic)?;
        let name = request.into_inner().name;
        rill_storage::config::validate_name("topic", &name).map_err(BrokerError::from)?;
        if let Some(r) = self.broker.replication() {
            // In a cluster, a topic is deleted through the controller, everywhere; only a
            // local topic the controller does not know (made before this broker joined a
            // cluster) is deleted here alone, as on a single broker.
            if r.is_known(&name) || self.broker.topic(&name).is_err() {
                crate::cluster::delete_replicated(&self.broker, &name).await?;
                tracing::info!(topic = %name, "topic deleted through the controller");
                tracing::info!(target: "rill::audit", by = %caller.principal, topic = %name, "topic deleted");
                return Ok(Response::new(pb::DeleteTopicResponse {}));
            }
        }
        let store = self.broker.store().clone();
        let broker = self.broker.clone();
        let n = name.clone();
        // The store is the one registry; the broker's wake-ups follow it, here and at every
        // lookup, so a failed deletion (the store reopens the topic) leaves nothing stale,
        // and neither does a caller that goes away before this finishes.
        tokio::task::spawn_blocking(move || {
            let deleted = store.delete_topic(&n);
            broker.forget_deleted(&n);
            deleted
        })
        .await
        .map_err(BrokerError::from)?
        .map_err(BrokerError::from)?;
        tracing::info!(topic = %name, "topic deleted");
        tracing::info!(target: "rill::audit", by = %caller.principal, topic = %name, "topic deleted");
        Ok(Response::new(pb::DeleteTopicResponse {}))
    }

    async fn list_topics(
        &self,
        request: Request<pb::ListTopicsRequest>,
    ) -> Result<Response<pb::ListTopicsResponse>, Status> {
        // Lists only the topics the caller may describe.
        let caller = auth::caller(&self.broker, request.extensions())?;
        let security = self.broker.security();
        let topics = self
            .broker
            .topics()
            .iter()
            .filter(|t| {
                security
                    .is_none_or(|s| s.may(&caller, Operation::Describe, &Resource::topic(t.name())))
            })
            .map(|t| pb::TopicSummary {
                name: t.name().to_string(),
                partitions: t.topic.partition_count(),
            })
            .collect();
        Ok(Response::new(pb::ListTopicsResponse { topics }))
    }

    async fn describe_topic(
        &self,
        request: Request<pb::DescribeTopicRequest>,
    ) -> Result<Response<pb::TopicDescription>, Status> {
        let topic = Resource::topic(&request.get_ref().name);
        auth::check(
            &self.broker,
            request.extensions(),
            Operation::Describe,
            topic,
        )?;
        let local_only = request.metadata().get(DESCRIBE_LOCAL_ONLY).is_some();
        let name = request.into_inner().name;
        let state = self.broker.topic(&name)?;
        let mut description = describe(&state, self.broker.config().max_batch_bytes);
        if !local_only {
            self.describe_held_elsewhere(&mut description).await;
        }
        Ok(Response::new(description))
    }
}

/// Request metadata asking `DescribeTopic` for this broker's own figures only: the ask of
/// [`AdminService::describe_held_elsewhere`], which must not fan out again.
pub const DESCRIBE_LOCAL_ONLY: &str = "rill-describe-local";

impl AdminService {
    /// In a cluster, replaces the figures of each partition this broker holds no replica of
    /// (its local copy is empty) with those of the broker that holds it, asked once per
    /// broker. A broker that does not answer leaves the local figures.
    async fn describe_held_elsewhere(&self, description: &mut pb::TopicDescription) {
        let Some(r) = self.broker.replication() else {
            return;
        };
        let mut holders: Vec<(String, Vec<u32>)> = Vec::new();
        for part in &description.partitions {
            if let Err(rill_cluster::partition::WriteError::NotLeader {
                leader: Some((_, address)),
                ..
            }) = r.check_readable(&description.name, part.partition)
            {
                match holders.iter_mut().find(|(a, _)| *a == address) {
                    Some((_, ps)) => ps.push(part.partition),
                    None => holders.push((address, vec![part.partition])),
                }
            }
        }
        for (address, partitions) in holders {
            let Ok(channel) = crate::internal::channel(&self.broker, &address) else {
                continue;
            };
            let mut request = Request::new(pb::DescribeTopicRequest {
                name: description.name.clone(),
            });
            request.metadata_mut().insert(
                DESCRIBE_LOCAL_ONLY,
                tonic::metadata::MetadataValue::from_static("1"),
            );
            let answer = pb::admin_client::AdminClient::new(channel)
                .describe_topic(request)
                .await;
            let remote = match answer {
                Ok(r) => r.into_inner(),
                Err(e) => {
                    tracing::debug!(%address, error = %e, "describe at the holder failed");
                    continue;
                }
            };
            for p in partitions {
                if let (Some(local), Some(there)) = (
                    description.partitions.iter_mut().find(|d| d.partition == p),
                    remote.partitions.iter().find(|d| d.partition == p),
                ) {
                    *local = there.clone();
                }
            }
        }
    }
}
