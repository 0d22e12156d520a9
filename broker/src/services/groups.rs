//! `rill.v1.Groups`: committed offsets, lag, and resets.

use rill_proto::v1::groups_server::Groups;
use rill_proto::v1::reset_group_offsets_request::Target;
use rill_proto::v1::{
    CommitOffsetsRequest, CommitOffsetsResponse, CommittedOffset, DescribeGroupRequest,
    DescribeGroupResponse, FetchOffsetsRequest, FetchOffsetsResponse, GroupPartition,
    ListGroupsRequest, ListGroupsResponse, OffsetChange, ResetGroupOffsetsRequest,
    ResetGroupOffsetsResponse,
};
use rill_storage::config::validate_name;
use rill_storage::StorageError;
use tonic::{Request, Response, Status};

use crate::auth::{self, Operation, Resource};
use crate::error::BrokerError;
use crate::state::Broker;

/// The Groups service.
#[derive(Debug, Clone)]
pub struct GroupsService {
    broker: Broker,
}

impl GroupsService {
    /// A service over the broker state.
    pub fn new(broker: Broker) -> Self {
        GroupsService { broker }
    }

    /// Commits offsets durably on the blocking pool (the commit fsyncs).
    async fn commit(
        &self,
        group: String,
        topic: String,
        offsets: Vec<(u32, u64, Option<String>)>,
    ) -> Result<(), BrokerError> {
        let groups = self.broker.store().groups().clone();
        tokio::task::spawn_blocking(move || groups.commit(&group, &topic, &offsets)).await??;
        Ok(())
    }

    /// The partitions a request names, or all of the topic's; each must exist.
    fn partitions(&self, topic: &str, wanted: &[u32]) -> Result<Vec<u32>, BrokerError> {
        let t = self.broker.topic(topic)?;
        if wanted.is_empty() {
            return Ok((0..t.topic.partition_count()).collect());
        }
        for &p in wanted {
            if p >= t.topic.partition_count() {
                return Err(StorageError::PartitionNotFound {
                    topic: topic.to_string(),
                    partition: p,
                    partitions: t.topic.partition_count(),
                }
                .into());
            }
        }
        Ok(wanted.to_vec())
    }
}

#[tonic::async_trait]
impl Groups for GroupsService {
    async fn commit_offsets(
        &self,
        request: Request<CommitOffsetsRequest>,
    ) -> Result<Response<CommitOffsetsResponse>, Status> {
        let (group, topic) = (&request.get_ref().group, &request.get_ref().topic);
        let caller = auth::check(
            &self.broker,
            request.extensions(),
            Operation::Consume,
            Resource::group(group),
        )?;
        if let Some(s) = self.broker.security() {
            s.authorize(&caller, Operation::Consume, &Resource::topic(topic))?;
        }
        let req = request.into_inner();
        validate_name("group", &req.group).map_err(BrokerError::from)?;
        if req.offsets.is_empty() {
            return Err(BrokerError::invalid("commit without offsets").into());
        }
        let wanted: Vec<u32> = req.offsets.iter().map(|o| o.partition).collect();
        self.partitions(&req.topic, &wanted)?;
        let offsets = req
            .offsets
            .into_iter()
            .map(|o| (o.partition, o.offset, o.metadata))
            .collect();
        self.commit(req.group, req.topic, offsets).await?;
        Ok(Response::new(CommitOffsetsResponse {}))
    }

    async fn fetch_offsets(
        &self,
        request: Request<FetchOffsetsRequest>,
    ) -> Result<Response<FetchOffsetsResponse>, Status> {
        let group = Resource::group(&request.get_ref().group);
        auth::check(
            &self.broker,
            request.extensions(),
            Operation::Describe,
            group,
        )?;
        let req = request.into_inner();
        validate_name("group", &req.group).map_err(BrokerError::from)?;
        let partitions = self.partitions(&req.topic, &req.partitions)?;
        let groups = self.broker.store().groups();
        let offsets = partitions
            .into_iter()
            .map(|p| {
                let c = groups.fetch(&req.group, &req.topic, p);
                CommittedOffset {
                    partition: p,
                    offset: c.as_ref().map(|c| c.offset),
                    metadata: c.and_then(|c| c.metadata),
                }
            })
            .collect();
        Ok(Response::new(FetchOffsetsResponse { offsets }))
    }

    async fn list_groups(
        &self,
        request: Request<ListGroupsRequest>,
    ) -> Result<Response<ListGroupsResponse>, Status> {
        // Lists only the groups the caller may describe.
        let caller = auth::caller(&self.broker, request.extensions())?;
        let security = self.broker.security();
        let mut groups = self.broker.store().groups().list();
        groups.retain(|g| {
            security.is_none_or(|s| s.may(&caller, Operation::Describe, &Resource::group(g)))
        });
        Ok(Response::new(ListGroupsResponse { groups }))
    }

    async fn describe_group(
        &self,
        request: Request<DescribeGroupRequest>,
    ) -> Result<Response<DescribeGroupResponse>, Status> {
        let group = Resource::group(&request.get_ref().group);
        auth::check(
            &self.broker,
            request.extensions(),
            Operation::Describe,
            group,
        )?;
        let req = request.into_inner();
        validate_name("group", &req.group).map_err(BrokerError::from)?;
        let committed = self
            .broker
            .store()
            .groups()
            .group_offsets(&req.group)
            .map_err(BrokerError::from)?;
        let partitions = committed
            .into_iter()
            .map(|(topic, partition, c)| {
                let log = self
                    .broker
                    .topic(&topic)
                    .and_then(|t| t.log(partition))
                    .ok();
                let (log_start, hwm) = log
                    .map(|l| (l.log_start_offset(), l.high_watermark()))
                    .unwrap_or((0, 0));
                GroupPartition {
                    topic,
                    partition,
                    committed_offset: c.offset,
                    high_watermark: hwm,
                    log_start_offset: log_start,
                    lag: hwm.saturating_sub(c.offset.max(log_start)),
                    metadata: c.metadata,
                }
            })
            .collect();
        Ok(Response::new(DescribeGroupResponse {
            group: req.group,
            partitions,
        }))
    }

    async fn reset_group_offsets(
        &self,
        request: Request<ResetGroupOffsetsRequest>,
    ) -> Result<Response<ResetGroupOffsetsResponse>, Status> {
        let group = Resource::group(&request.get_ref().group);
        let caller = auth::check(&self.broker, request.extensions(), Operation::Alter, group)?;
        tracing::info!(
            target: "rill::audit",
            by = %caller.principal,
            group = %request.get_ref().group,
            topic = %request.get_ref().topic,
            dry_run = request.get_ref().dry_run,
            "group offsets reset requested"
        );
        let req = request.into_inner();
        validate_name("group", &req.group).map_err(BrokerError::from)?;
        let Some(target) = req.target else {
            return Err(BrokerError::invalid(
                "reset needs a target: earliest, latest, an offset, a timestamp or a shift",
            )
            .into());
        };
        let topic = self.broker.topic(&req.topic)?;
        let partitions = self.partitions(&req.topic, &req.partitions)?;
        let groups = self.broker.store().groups().clone();
        let mut changes = Vec::with_capacity(partitions.len());
        for p in partitions {
            let log = topic.log(p)?;
            let (start, end) = (log.log_start_offset(), log.high_watermark());
            let previous = groups.fetch(&req.group, &req.topic, p).map(|c| c.offset);
            let wanted = match target {
                Target::ToEarliest(_) => start,
                Target::ToLatest(_) => end,
                Target::ToOffset(o) => o,
                Target::ToTimestampMs(ts) => {
                    let l = log.clone();
                    tokio::task::spawn_blocking(move || l.offset_for_timestamp(ts))
                        .await
                        .map_err(BrokerError::from)?
                        .map_err(BrokerError::from)?
                        .unwrap_or(end)
                }
                Target::ShiftBy(n) => {
                    let base = previous.unwrap_or(start) as i128;
                    (base + i128::from(n)).clamp(0, i128::from(u64::MAX)) as u64
                }
            };
            changes.push(OffsetChange {
                partition: p,
                previous_offset: previous,
                new_offset: wanted.clamp(start, end),
            });
        }
        let applied = !req.dry_run;
        if applied {
            let offsets = changes
                .iter()
                .map(|c| (c.partition, c.new_offset, None))
                .collect();
            self.commit(req.group, req.topic, offsets).await?;
        }
        Ok(Response::new(ResetGroupOffsetsResponse {
            changes,
            applied,
        }))
    }
}
