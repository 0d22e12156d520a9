//! `rill.v1.Groups`: committed offsets, lag, resets, and membership (heartbeats, fenced
//! member commits, group deletion) through the [`Coordinator`].

use rill_cluster::network::PeerChannel;
use rill_proto::v1::groups_client::GroupsClient;
use rill_proto::v1::groups_server::Groups;
use rill_proto::v1::reset_group_offsets_request::Target;
use rill_proto::v1::{
    CommitOffsetsRequest, CommitOffsetsResponse, CommittedOffset, DeleteGroupRequest,
    DeleteGroupResponse, DescribeGroupRequest, DescribeGroupResponse, FetchOffsetsRequest,
    FetchOffsetsResponse, GroupHeartbeatRequest, GroupHeartbeatResponse, GroupMember,
    GroupPartition, GroupSummary, ListGroupsRequest, ListGroupsResponse, OffsetChange,
    ResetGroupOffsetsRequest, ResetGroupOffsetsResponse,
};
use rill_storage::config::validate_name;
use rill_storage::groups::GROUPS_TOPIC;
use rill_storage::StorageError;
use tonic::{Request, Response, Status};

use crate::auth::{self, Operation, Resource};
use crate::error::BrokerError;
use crate::groups::persist::{from_set, to_set};
use crate::groups::state::Heartbeat;
use crate::groups::Coordinator;
use crate::internal::{self, Route};
use crate::state::Broker;

/// Request metadata asking a broker's `ListGroups` for only the groups it coordinates: one
/// broker asks every coordinator so for a cluster-wide listing with current member counts.
pub const COORDINATED_ONLY: &str = "rill-coordinated-only";

/// The Groups service.
#[derive(Debug, Clone)]
pub struct GroupsService {
    broker: Broker,
    coordinator: Coordinator,
}

impl GroupsService {
    /// A service over the broker state and its group coordinator.
    pub fn new(broker: Broker, coordinator: Coordinator) -> Self {
        GroupsService {
            broker,
            coordinator,
        }
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

    /// A client to `group`'s coordinator when that is another broker (in a cluster, the
    /// leader of the group's partition of the groups topic); `None` when it is this one.
    /// The caller was authorized here; the coordinator trusts this broker's cluster token.
    fn coordinator_elsewhere(
        &self,
        group: &str,
    ) -> Result<Option<GroupsClient<PeerChannel>>, BrokerError> {
        let p = self.broker.store().groups().partition_of(group);
        match internal::route(&self.broker, GROUPS_TOPIC, p)? {
            Route::Here => Ok(None),
            Route::Leader(address) => Ok(Some(GroupsClient::new(internal::channel(
                &self.broker,
                &address,
            )?))),
        }
    }

    /// The groups this broker knows, sorted, with their state and live members as its
    /// coordinator sees them; with `coordinated_only`, just the groups it coordinates (whose
    /// summaries are current).
    async fn local_summaries(&self, coordinated_only: bool) -> Vec<GroupSummary> {
        let mut names = self.broker.store().groups().list();
        let members = self.coordinator.all().await;
        names.extend(members.iter().map(|g| g.name.clone()));
        names.sort_unstable();
        names.dedup();
        if coordinated_only {
            names.retain(|g| crate::groups::coordinator::coordinates(&self.broker, g));
        }
        names
            .into_iter()
            .map(|name| {
                let g = members.iter().find(|g| g.name == name);
                GroupSummary {
                    state: g.map_or("empty", |g| g.state()).to_string(),
                    member_count: g.map_or(0, |g| g.live_members() as u32),
                    group: name,
                }
            })
            .collect()
    }

    /// Every group of the cluster, each summarized by its coordinator: memberships live only
    /// in the coordinator's memory, so every broker leading a partition of the groups topic
    /// is asked for the groups it coordinates (this one included), and the answers merged.
    /// UNAVAILABLE when a partition has no settled leader or its leader does not answer.
    async fn cluster_summaries(&self) -> Result<Vec<GroupSummary>, Status> {
        let mut here = false;
        let mut elsewhere: Vec<String> = Vec::new();
        for p in 0..self.broker.store().groups().partition_count() {
            match internal::route(&self.broker, GROUPS_TOPIC, p)? {
                Route::Here => here = true,
                Route::Leader(address) => {
                    if !elsewhere.contains(&address) {
                        elsewhere.push(address);
                    }
                }
            }
        }
        let mut summaries = if here {
            self.local_summaries(true).await
        } else {
            Vec::new()
        };
        for address in elsewhere {
            let mut peer = GroupsClient::new(internal::channel(&self.broker, &address)?);
            let mut request = Request::new(ListGroupsRequest::default());
            request.metadata_mut().insert(
                COORDINATED_ONLY,
                tonic::metadata::MetadataValue::from_static("1"),
            );
            let answer = internal::relayed(peer.list_groups(request).await)?;
            summaries.extend(answer.into_inner().summaries);
        }
        summaries.sort_unstable_by(|a, b| a.group.cmp(&b.group));
        // A group whose partition changed leader between two answers may come twice.
        summaries.dedup_by(|a, b| a.group == b.group);
        Ok(summaries)
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
        if let Some(mut coordinator) = self.coordinator_elsewhere(&req.group)? {
            return internal::relayed(coordinator.commit_offsets(req).await);
        }
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
        // A member's commit holds its group's lock from the epoch check to the durable
        // write, so a fencing cannot slip in between.
        let _member = match &req.member {
            Some(m) => Some(
                self.coordinator
                    .lock_for_commit(&req.group, &m.member_id, m.member_epoch)
                    .await?,
            ),
            None => None,
        };
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
        if let Some(mut coordinator) = self.coordinator_elsewhere(&req.group)? {
            return internal::relayed(coordinator.fetch_offsets(req).await);
        }
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
        let caller = auth::caller(&self.broker, request.extensions())?;
        let coordinated_only = request.metadata().get(COORDINATED_ONLY).is_some();
        let mut summaries = if coordinated_only || internal::replication(&self.broker).is_none() {
            self.local_summaries(coordinated_only).await
        } else {
            self.cluster_summaries().await?
        };
        // Lists only the groups the caller may describe.
        if let Some(s) = self.broker.security() {
            summaries.retain(|g| s.may(&caller, Operation::Describe, &Resource::group(&g.group)));
        }
        Ok(Response::new(ListGroupsResponse {
            groups: summaries.iter().map(|g| g.group.clone()).collect(),
            summaries,
        }))
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
        if let Some(mut coordinator) = self.coordinator_elsewhere(&req.group)? {
            return internal::relayed(coordinator.describe_group(req).await);
        }
        let membership = self.coordinator.snapshot(&req.group).await;
        let committed = match self.broker.store().groups().group_offsets(&req.group) {
            Ok(committed) => committed,
            // A group with members but no commits yet is still a group.
            Err(StorageError::GroupNotFound { .. }) if membership.is_some() => Vec::new(),
            Err(e) => return Err(BrokerError::from(e).into()),
        };
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
        let (state, group_epoch, assignor, members) = match membership {
            Some(g) => (
                g.state().to_string(),
                g.epoch,
                g.assignor.to_string(),
                g.members
                    .values()
                    .filter(|m| !m.left_static)
                    .map(|m| {
                        let mut owned = m.assigned.clone();
                        for (t, ps) in &m.revoking {
                            owned.entry(t.clone()).or_default().extend(ps);
                        }
                        GroupMember {
                            member_id: m.id.clone(),
                            instance_id: m.instance_id.clone(),
                            client_address: m.client_address.clone(),
                            member_epoch: m.epoch,
                            subscribed_topics: m.subscribed.iter().cloned().collect(),
                            assigned: Some(to_set(&owned)),
                            target: Some(to_set(&m.target)),
                        }
                    })
                    .collect(),
            ),
            None => ("empty".to_string(), 0, String::new(), Vec::new()),
        };
        Ok(Response::new(DescribeGroupResponse {
            group: req.group,
            partitions,
            state,
            group_epoch,
            members,
            assignor,
        }))
    }

    async fn group_heartbeat(
        &self,
        request: Request<GroupHeartbeatRequest>,
    ) -> Result<Response<GroupHeartbeatResponse>, Status> {
        self.broker.check_running()?;
        // Joining (and staying in) a group is consuming through it, and from each topic it
        // subscribes to.
        let group = Resource::group(&request.get_ref().group);
        let caller = auth::check(
            &self.broker,
            request.extensions(),
            Operation::Consume,
            group,
        )?;
        if let (Some(s), Some(topics)) =
            (self.broker.security(), &request.get_ref().subscribed_topics)
        {
            for t in &topics.topics {
                s.authorize(&caller, Operation::Consume, &Resource::topic(t))?;
            }
        }
        let client_address = request
            .remote_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        let req = request.into_inner();
        validate_name("group", &req.group).map_err(BrokerError::from)?;
        if let Some(mut coordinator) = self.coordinator_elsewhere(&req.group)? {
            return internal::relayed(coordinator.group_heartbeat(req).await);
        }
        let assignor = match &req.assignor {
            Some(name) => Some(name.parse().map_err(BrokerError::InvalidArgument)?),
            None => None,
        };
        let hb = Heartbeat {
            member_id: req.member_id,
            member_epoch: req.member_epoch,
            instance_id: req.instance_id,
            subscribed: req
                .subscribed_topics
                .map(|l| l.topics.into_iter().collect()),
            owned: req.owned_partitions.as_ref().map(from_set),
            client_address,
            session_timeout_ms: req.session_timeout_ms,
            rebalance_timeout_ms: req.rebalance_timeout_ms,
            assignor,
        };
        let reply = self
            .coordinator
            .heartbeat(&self.broker, &req.group, hb)
            .await?;
        Ok(Response::new(GroupHeartbeatResponse {
            member_id: reply.member_id,
            member_epoch: reply.member_epoch,
            heartbeat_interval_ms: reply.heartbeat_interval_ms,
            assignment: Some(to_set(&reply.assignment)),
            group_epoch: reply.group_epoch,
            reconciling: reply.reconciling,
        }))
    }

    async fn delete_group(
        &self,
        request: Request<DeleteGroupRequest>,
    ) -> Result<Response<DeleteGroupResponse>, Status> {
        let group = Resource::group(&request.get_ref().group);
        let caller = auth::check(&self.broker, request.extensions(), Operation::Delete, group)?;
        tracing::info!(
            target: "rill::audit",
            by = %caller.principal,
            group = %request.get_ref().group,
            "group deletion requested"
        );
        let req = request.into_inner();
        validate_name("group", &req.group).map_err(BrokerError::from)?;
        if let Some(mut coordinator) = self.coordinator_elsewhere(&req.group)? {
            return internal::relayed(coordinator.delete_group(req).await);
        }
        self.coordinator.delete(&self.broker, &req.group).await?;
        Ok(Response::new(DeleteGroupResponse {}))
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
        if let Some(mut coordinator) = self.coordinator_elsewhere(&req.group)? {
            return internal::relayed(coordinator.reset_group_offsets(req).await);
        }
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
            self.coordinator
                .check_no_live_members(&req.group, "an offset reset")
                .await?;
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
