//! [`Admin`]: every Admin and Groups RPC, with friendly argument types. Results are the
//! contract's own messages (`rill_proto::v1::*`), which carry every field the broker returns.

use std::sync::Arc;
use std::time::Duration;

use rill_proto::v1 as pb;
use rill_proto::v1::flush_policy::Policy;
use rill_proto::v1::list_offsets_request::Spec;
use rill_proto::v1::reset_group_offsets_request::Target;

use crate::connection::Connection;
use crate::error::{ClientError, Result};
use crate::leaders::Leaders;

/// When a topic's appends are synced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flush {
    /// Every produce waits for a sync (group commit).
    Always,
    /// A background sync every so many milliseconds.
    IntervalMs(u64),
    /// No explicit sync.
    Never,
}

impl std::str::FromStr for Flush {
    type Err = String;

    /// Parses `always`, `never` or `interval:MS`.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "always" => Ok(Flush::Always),
            "never" => Ok(Flush::Never),
            other => other
                .strip_prefix("interval:")
                .and_then(|ms| ms.parse().ok())
                .filter(|&ms| ms > 0)
                .map(Flush::IntervalMs)
                .ok_or_else(|| {
                    format!("bad flush policy {other:?}: use always, never or interval:MS")
                }),
        }
    }
}

/// Settings of a new topic; unset values take the broker's defaults.
#[derive(Debug, Clone, Default)]
pub struct TopicSettings {
    partitions: u32,
    retention_ms: Option<i64>,
    retention_bytes: Option<i64>,
    segment_bytes: Option<u64>,
    flush: Option<Flush>,
    replication_factor: Option<u32>,
    compression: Option<String>,
}

impl TopicSettings {
    /// Replicas per partition on distinct brokers of a cluster (default 1). More than the
    /// live brokers is refused with FAILED_PRECONDITION.
    pub fn replication_factor(mut self, replication_factor: u32) -> Self {
        self.replication_factor = Some(replication_factor);
        self
    }

    /// Defaults for everything (the broker's).
    pub fn new() -> Self {
        TopicSettings::default()
    }

    /// Number of partitions (default: the broker's, 1 unless configured).
    pub fn partitions(mut self, partitions: u32) -> Self {
        self.partitions = partitions;
        self
    }

    /// Keep records this long; `None` keeps them forever (default: the broker's, 7 days).
    pub fn retention(mut self, retention: Option<Duration>) -> Self {
        self.retention_ms =
            Some(retention.map_or(-1, |d| d.as_millis().min(i64::MAX as u128) as i64));
        self
    }

    /// Keep at most this many bytes per partition; `None` for no limit (the default).
    pub fn retention_bytes(mut self, bytes: Option<u64>) -> Self {
        self.retention_bytes = Some(bytes.map_or(-1, |b| b.min(i64::MAX as u64) as i64));
        self
    }

    /// Segment size in bytes (default: the broker's, 256 MiB).
    pub fn segment_bytes(mut self, bytes: u64) -> Self {
        self.segment_bytes = Some(bytes);
        self
    }

    /// The flush policy (default: the broker's, `interval:1000`).
    pub fn flush(mut self, flush: Flush) -> Self {
        self.flush = Some(flush);
        self
    }

    /// How the broker stores the topic's batches: `producer` (the default: as they came),
    /// or a codec it recompresses every batch to: `none`, `lz4` or `zstd`.
    pub fn compression(mut self, compression: impl Into<String>) -> Self {
        self.compression = Some(compression.into());
        self
    }

    fn into_pb(self) -> pb::TopicConfig {
        pb::TopicConfig {
            partitions: self.partitions,
            retention_ms: self.retention_ms,
            retention_bytes: self.retention_bytes,
            segment_bytes: self.segment_bytes,
            segment_ms: None,
            timestamp_after_max_ms: None,
            timestamp_before_max_ms: None,
            compression: self.compression,
            flush: self.flush.map(|f| pb::FlushPolicy {
                policy: Some(match f {
                    Flush::Always => Policy::Always(pb::Always {}),
                    Flush::Never => Policy::Never(pb::Never {}),
                    Flush::IntervalMs(ms) => Policy::IntervalMs(ms),
                }),
            }),
        }
    }
}

/// Where to look up an offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OffsetQuery {
    /// The first retained offset.
    Earliest,
    /// The high watermark (the next offset to be written).
    Latest,
    /// The first offset at or after this time, in ms since the epoch.
    Timestamp(i64),
}

/// Where to move a group's offsets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResetTo {
    /// The log start.
    Earliest,
    /// The high watermark.
    Latest,
    /// An offset (clamped to what is retained).
    Offset(u64),
    /// The first offset at or after this time, in ms since the epoch.
    Timestamp(i64),
    /// A shift from the committed offset.
    ShiftBy(i64),
}

/// The admin client: topics, offsets and groups.
#[derive(Debug, Clone)]
pub struct Admin {
    conn: Connection,
    /// Partition leaders in a cluster, found through `Metadata` and shared by the clones.
    leaders: Arc<Leaders>,
}

fn status(topic: Option<&str>) -> impl Fn(tonic::Status) -> ClientError + '_ {
    move |s| ClientError::broker(topic, None, s)
}

impl Admin {
    /// An admin client on `conn`.
    pub fn new(conn: Connection) -> Self {
        Admin::with_leaders(conn, Arc::default())
    }

    /// An admin client on `conn` that shares `leaders` with the client it belongs to.
    pub(crate) fn with_leaders(conn: Connection, leaders: Arc<Leaders>) -> Self {
        Admin { conn, leaders }
    }

    /// Creates a topic.
    pub async fn create_topic(
        &self,
        name: &str,
        settings: TopicSettings,
    ) -> Result<pb::TopicDescription> {
        let resp = self
            .conn
            .admin()
            .create_topic(pb::CreateTopicRequest {
                name: name.into(),
                replication_factor: settings.replication_factor,
                config: Some(settings.into_pb()),
            })
            .await
            .map_err(status(Some(name)))?;
        resp.into_inner()
            .topic
            .ok_or_else(|| ClientError::Invalid("the broker returned no description".into()))
    }

    /// Deletes a topic, its data and its committed offsets.
    pub async fn delete_topic(&self, name: &str) -> Result<()> {
        self.conn
            .admin()
            .delete_topic(pb::DeleteTopicRequest { name: name.into() })
            .await
            .map_err(status(Some(name)))?;
        Ok(())
    }

    /// Lists topics, sorted by name.
    pub async fn list_topics(&self) -> Result<Vec<pb::TopicSummary>> {
        Ok(self
            .conn
            .admin()
            .list_topics(pb::ListTopicsRequest {})
            .await
            .map_err(status(None))?
            .into_inner()
            .topics)
    }

    /// Describes a topic: config and per-partition offsets, size and segments.
    pub async fn describe_topic(&self, name: &str) -> Result<pb::TopicDescription> {
        Ok(self
            .conn
            .admin()
            .describe_topic(pb::DescribeTopicRequest { name: name.into() })
            .await
            .map_err(status(Some(name)))?
            .into_inner())
    }

    /// Looks up an offset of one partition. In a cluster, the partition's leader answers
    /// (found through `Metadata`, once per topic and admin client); a broker that holds no
    /// replica of the partition names one, which is asked instead.
    pub async fn list_offsets(
        &self,
        topic: &str,
        partition: u32,
        query: OffsetQuery,
    ) -> Result<pb::ListOffsetsResponse> {
        let Some(leader) = self.leaders.find(&self.conn, topic, partition).await else {
            return list_offsets_at(&self.conn, topic, partition, query).await;
        };
        match list_offsets_at(&leader, topic, partition, query).await {
            Err(e) if e.is_retryable() => {
                // The leader went away: the broker first connected to answers or redirects.
                self.leaders.forget(topic, partition);
                list_offsets_at(&self.conn, topic, partition, query).await
            }
            answer => answer,
        }
    }

    /// Commits `(partition, offset)` pairs of `group` for `topic`, durably and atomically.
    pub async fn commit_offsets(
        &self,
        group: &str,
        topic: &str,
        offsets: &[(u32, u64)],
    ) -> Result<()> {
        self.conn
            .groups()
            .commit_offsets(pb::CommitOffsetsRequest {
                group: group.into(),
                topic: topic.into(),
                offsets: offsets
                    .iter()
                    .map(|&(partition, offset)| pb::PartitionOffset {
                        partition,
                        offset,
                        metadata: None,
                    })
                    .collect(),
                member: None,
            })
            .await
            .map_err(status(Some(topic)))?;
        Ok(())
    }

    /// The committed offsets of `group` for `topic` (all partitions when `partitions` is empty).
    pub async fn fetch_offsets(
        &self,
        group: &str,
        topic: &str,
        partitions: &[u32],
    ) -> Result<Vec<pb::CommittedOffset>> {
        Ok(self
            .conn
            .groups()
            .fetch_offsets(pb::FetchOffsetsRequest {
                group: group.into(),
                topic: topic.into(),
                partitions: partitions.to_vec(),
            })
            .await
            .map_err(status(Some(topic)))?
            .into_inner()
            .offsets)
    }

    /// The groups that have committed offsets.
    pub async fn list_groups(&self) -> Result<Vec<String>> {
        Ok(self
            .conn
            .groups()
            .list_groups(pb::ListGroupsRequest {})
            .await
            .map_err(status(None))?
            .into_inner()
            .groups)
    }

    /// Every group with its state (`empty`, `stable`, `reconciling`) and live member count.
    pub async fn list_group_summaries(&self) -> Result<Vec<pb::GroupSummary>> {
        Ok(self
            .conn
            .groups()
            .list_groups(pb::ListGroupsRequest {})
            .await
            .map_err(status(None))?
            .into_inner()
            .summaries)
    }

    /// Deletes a group's offsets and state; refused while it has live members.
    pub async fn delete_group(&self, group: &str) -> Result<()> {
        self.conn
            .groups()
            .delete_group(pb::DeleteGroupRequest {
                group: group.into(),
            })
            .await
            .map_err(status(None))?;
        Ok(())
    }

    /// A group's committed offsets with the high watermark and lag of each partition.
    pub async fn describe_group(&self, group: &str) -> Result<pb::DescribeGroupResponse> {
        Ok(self
            .conn
            .groups()
            .describe_group(pb::DescribeGroupRequest {
                group: group.into(),
            })
            .await
            .map_err(status(None))?
            .into_inner())
    }

    /// Moves a group's offsets for `topic` (all partitions when `partitions` is empty). With
    /// `dry_run`, only returns the change.
    pub async fn reset_group_offsets(
        &self,
        group: &str,
        topic: &str,
        partitions: &[u32],
        to: ResetTo,
        dry_run: bool,
    ) -> Result<pb::ResetGroupOffsetsResponse> {
        let target = match to {
            ResetTo::Earliest => Target::ToEarliest(true),
            ResetTo::Latest => Target::ToLatest(true),
            ResetTo::Offset(o) => Target::ToOffset(o),
            ResetTo::Timestamp(ts) => Target::ToTimestampMs(ts),
            ResetTo::ShiftBy(n) => Target::ShiftBy(n),
        };
        Ok(self
            .conn
            .groups()
            .reset_group_offsets(pb::ResetGroupOffsetsRequest {
                group: group.into(),
                topic: topic.into(),
                partitions: partitions.to_vec(),
                target: Some(target),
                dry_run,
            })
            .await
            .map_err(status(Some(topic)))?
            .into_inner())
    }
}

/// [`Admin::list_offsets`] asked of `conn`'s broker (following one redirect to a replica),
/// not of the leader: how a consumer reads the offsets of the replica it fetches from.
pub(crate) async fn list_offsets_at(
    conn: &Connection,
    topic: &str,
    partition: u32,
    query: OffsetQuery,
) -> Result<pb::ListOffsetsResponse> {
    let spec = match query {
        OffsetQuery::Earliest => Spec::Position(pb::OffsetSpec::Earliest as i32),
        OffsetQuery::Latest => Spec::Position(pb::OffsetSpec::Latest as i32),
        OffsetQuery::Timestamp(ts) => Spec::TimestampMs(ts),
    };
    let request = pb::ListOffsetsRequest {
        topic: topic.into(),
        partition,
        spec: Some(spec),
    };
    let answer = match conn.log().list_offsets(request.clone()).await {
        // A broker without a replica of the partition (in a cluster) names one.
        Err(status) => match crate::leaders::leader_hint(&status) {
            Some(replica) => {
                let conn = conn.connect_like(&replica).await?;
                conn.log().list_offsets(request).await
            }
            None => Err(status),
        },
        answer => answer,
    };
    Ok(answer
        .map_err(|s| ClientError::broker(Some(topic), Some(partition), s))?
        .into_inner())
}
