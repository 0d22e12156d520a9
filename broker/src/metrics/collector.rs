//! The gauges and counters computed at scrape time from the broker's state: nothing here
//! runs on the produce or fetch path. Each scrape walks the topics, their partitions and
//! the groups' committed offsets (all in memory), reads the storage engine's sync figures
//! and `/proc/self`.
//!
//! The per-partition and per-group series can be switched off
//! ([`crate::Config::metrics_per_partition`], [`crate::Config::metrics_per_group`]); the
//! per-topic and broker-wide ones are always exported.

use std::fmt;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use rill_storage::stats::SyncSnapshot;

use crate::metrics::process;
use crate::state::Broker;

/// Reads the broker's state at each scrape.
#[derive(Debug)]
pub struct BrokerCollector {
    broker: Broker,
    /// Group membership, for members per group.
    coordinator: Option<crate::groups::Coordinator>,
}

impl BrokerCollector {
    /// A collector over `broker` and, when given, its groups' membership.
    pub fn new(broker: Broker, coordinator: Option<crate::groups::Coordinator>) -> Self {
        BrokerCollector {
            broker,
            coordinator,
        }
    }
}

/// This broker's replication figures (all zero for a broker without a cluster).
#[derive(Default)]
struct ReplicationFigures {
    leader_partitions: u64,
    under_replicated: u64,
    elections: u64,
    /// Each follower's progress in the partitions this broker leads, with the topic and
    /// partition.
    lag: Vec<(String, u32, rill_cluster::ReplicaProgress)>,
}

fn replication_figures(broker: &Broker, per_partition: bool) -> ReplicationFigures {
    let Some(replication) = broker.replication() else {
        return ReplicationFigures::default();
    };
    let me = replication.node_id();
    let mut figures = ReplicationFigures {
        elections: replication.terms(),
        ..ReplicationFigures::default()
    };
    for (topic, p) in replication.hosted_partitions() {
        // Only the leader knows its replicas' progress.
        let Some(states) = replication.replica_states(&topic, p) else {
            continue;
        };
        figures.leader_partitions += 1;
        // Out of sync: behind what is committed, or not heard from (a dead replica holds
        // everything committed until the next write).
        if states
            .iter()
            .any(|s| !s.in_sync || !replication.is_live(s.node))
        {
            figures.under_replicated += 1;
        }
        if per_partition {
            figures.lag.extend(
                states
                    .into_iter()
                    .filter(|s| s.node != me)
                    .map(|s| (topic.clone(), p, s)),
            );
        }
    }
    figures
}

/// One partition's figures, gathered before encoding.
struct PartitionRow {
    topic: String,
    partition: String,
    log_start_offset: u64,
    high_watermark: u64,
    size_bytes: u64,
    segments: u32,
}

/// One group partition's committed offset and lag.
struct GroupRow {
    group: String,
    topic: String,
    partition: String,
    committed_offset: u64,
    lag_records: u64,
}

/// Encodes one family: a descriptor, then one sample per `(labels, value)`.
fn family<L: EncodeLabelSet, M: EncodeMetric>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    samples: impl IntoIterator<Item = (L, M)>,
) -> fmt::Result {
    let mut metric = encoder.encode_descriptor(name, help, None, kind)?;
    for (labels, value) in samples {
        value.encode(metric.encode_family(&labels)?)?;
    }
    Ok(())
}

/// Encodes one unlabelled gauge.
fn gauge(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: u64) -> fmt::Result {
    let metric = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    ConstGauge::new(value).encode(metric)
}

/// The storage engine's sync figures as a histogram.
struct SyncHistogram(SyncSnapshot);

impl EncodeMetric for SyncHistogram {
    fn encode(&self, mut encoder: prometheus_client::encoding::MetricEncoder) -> fmt::Result {
        encoder.encode_histogram::<prometheus_client::encoding::NoLabelSet>(
            self.0.sum_seconds,
            self.0.count,
            &self.0.buckets,
            None,
        )
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

impl Collector for BrokerCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let config = self.broker.config();
        let topics = self.broker.topics();
        let mut partitions = Vec::new();
        let mut fenced = 0u64;
        let mut partition_count = 0u64;
        let mut topic_sizes = Vec::with_capacity(topics.len());
        for state in &topics {
            let mut size = 0u64;
            for (p, log) in state.topic.partitions() {
                partition_count += 1;
                let Ok(log) = log else {
                    fenced += 1;
                    continue;
                };
                if log.fenced_reason().is_some() {
                    fenced += 1;
                }
                let s = log.stats();
                size += s.size_bytes;
                if config.metrics_per_partition {
                    partitions.push(PartitionRow {
                        topic: state.name().to_string(),
                        partition: p.to_string(),
                        log_start_offset: s.log_start_offset,
                        high_watermark: s.high_watermark,
                        size_bytes: s.size_bytes,
                        segments: s.segments,
                    });
                }
            }
            topic_sizes.push((state.name(), size));
        }

        let traffic: Vec<_> = topics
            .iter()
            .map(|t| (t.name(), t.counters.get()))
            .collect();
        let topic_label = |name: &str| [("topic", name.to_string())];
        family(
            &mut encoder,
            "rill_records_produced",
            "Records appended, by topic",
            MetricType::Counter,
            traffic
                .iter()
                .map(|(n, t)| (topic_label(n), ConstCounter::new(t.records_produced))),
        )?;
        family(
            &mut encoder,
            "rill_produced_bytes",
            "Stored batch bytes appended, by topic",
            MetricType::Counter,
            traffic
                .iter()
                .map(|(n, t)| (topic_label(n), ConstCounter::new(t.bytes_produced))),
        )?;
        family(
            &mut encoder,
            "rill_records_fetched",
            "Records returned by fetches, by topic",
            MetricType::Counter,
            traffic
                .iter()
                .map(|(n, t)| (topic_label(n), ConstCounter::new(t.records_fetched))),
        )?;
        family(
            &mut encoder,
            "rill_fetched_bytes",
            "Stored batch bytes read to serve fetches, by topic",
            MetricType::Counter,
            traffic
                .iter()
                .map(|(n, t)| (topic_label(n), ConstCounter::new(t.bytes_fetched))),
        )?;
        family(
            &mut encoder,
            "rill_topic_size_bytes",
            "Bytes of log held on disk, by topic (all partitions)",
            MetricType::Gauge,
            topic_sizes
                .iter()
                .map(|(n, size)| (topic_label(n), ConstGauge::new(*size))),
        )?;
        gauge(
            &mut encoder,
            "rill_topics",
            "Topics served",
            topics.len() as u64,
        )?;
        gauge(
            &mut encoder,
            "rill_partitions",
            "Partitions served, over all topics",
            partition_count,
        )?;
        gauge(
            &mut encoder,
            "rill_fenced_partitions",
            "Partitions refusing writes after a disk failure, until the broker restarts",
            fenced,
        )?;

        let replication = replication_figures(&self.broker, config.metrics_per_partition);
        gauge(
            &mut encoder,
            "rill_leader_partitions",
            "Replicated partitions this broker leads",
            replication.leader_partitions,
        )?;
        gauge(
            &mut encoder,
            "rill_under_replicated_partitions",
            "Partitions this broker leads with a replica behind the committed entries or not live",
            replication.under_replicated,
        )?;
        {
            let metric = encoder.encode_descriptor(
                "rill_raft_elections",
                "Raft elections (terms) of the groups hosted here, controller included",
                None,
                MetricType::Counter,
            )?;
            ConstCounter::new(replication.elections).encode(metric)?;
        }
        if config.metrics_per_partition {
            family(
                &mut encoder,
                "rill_replica_lag_entries",
                "Raft entries a replica is behind its leader, by partition and replica (on the leader)",
                MetricType::Gauge,
                replication.lag.iter().map(|(topic, p, s)| {
                    (
                        [
                            ("topic", topic.clone()),
                            ("partition", p.to_string()),
                            ("replica", s.node.to_string()),
                        ],
                        ConstGauge::new(s.lag_entries),
                    )
                }),
            )?;
            family(
                &mut encoder,
                "rill_replica_lag_records",
                "Records a replica lacks of its leader's log, by partition and replica (on the leader; absent when the leader's Raft log no longer holds them all)",
                MetricType::Gauge,
                replication.lag.iter().filter_map(|(topic, p, s)| {
                    Some((
                        [
                            ("topic", topic.clone()),
                            ("partition", p.to_string()),
                            ("replica", s.node.to_string()),
                        ],
                        ConstGauge::new(s.lag_records?),
                    ))
                }),
            )?;
        }

        if config.metrics_per_partition {
            let labels = |r: &PartitionRow| {
                [
                    ("topic", r.topic.clone()),
                    ("partition", r.partition.clone()),
                ]
            };
            family(
                &mut encoder,
                "rill_partition_log_start_offset",
                "The first offset still retained, by partition",
                MetricType::Gauge,
                partitions
                    .iter()
                    .map(|r| (labels(r), ConstGauge::new(r.log_start_offset))),
            )?;
            family(
                &mut encoder,
                "rill_partition_high_watermark",
                "The offset the next append will get, by partition",
                MetricType::Gauge,
                partitions
                    .iter()
                    .map(|r| (labels(r), ConstGauge::new(r.high_watermark))),
            )?;
            family(
                &mut encoder,
                "rill_partition_size_bytes",
                "Bytes of log held on disk, by partition",
                MetricType::Gauge,
                partitions
                    .iter()
                    .map(|r| (labels(r), ConstGauge::new(r.size_bytes))),
            )?;
            family(
                &mut encoder,
                "rill_partition_segments",
                "Segment files, by partition",
                MetricType::Gauge,
                partitions
                    .iter()
                    .map(|r| (labels(r), ConstGauge::new(u64::from(r.segments)))),
            )?;
        }

        let groups = self.broker.store().groups();
        let names = groups.list();
        gauge(
            &mut encoder,
            "rill_groups",
            "Consumer groups with committed offsets",
            names.len() as u64,
        )?;
        if config.metrics_per_group {
            let by_name: std::collections::HashMap<&str, &crate::state::TopicState> =
                topics.iter().map(|t| (t.name(), &**t)).collect();
            let mut rows = Vec::new();
            for group in &names {
                // A group deleted since the listing has nothing to report.
                let Ok(offsets) = groups.group_offsets(group) else {
                    continue;
                };
                for (topic, p, committed) in offsets {
                    // A committed offset of a deleted topic, or of a fenced partition, has no
                    // high watermark to measure lag against.
                    let Some(log) = by_name
                        .get(topic.as_str())
                        .and_then(|t| t.topic.partition(p).ok())
                    else {
                        continue;
                    };
                    let hwm = log.high_watermark();
                    let start = log.log_start_offset();
                    rows.push(GroupRow {
                        group: group.clone(),
                        topic,
                        partition: p.to_string(),
                        committed_offset: committed.offset,
                        // As DescribeGroup computes it: records past the committed offset
                        // (or past the log start, if retention went beyond it).
                        lag_records: hwm.saturating_sub(committed.offset.max(start)),
                    });
                }
            }
            let labels = |r: &GroupRow| {
                [
                    ("group", r.group.clone()),
                    ("topic", r.topic.clone()),
                    ("partition", r.partition.clone()),
                ]
            };
            // Members per group: every group with members or committed offsets.
            let mut members: std::collections::BTreeMap<String, u64> =
                names.iter().map(|g| (g.clone(), 0)).collect();
            if let Some(coordinator) = &self.coordinator {
                for (group, live) in coordinator.live_member_counts() {
                    members.insert(group, live as u64);
                }
            }
            family(
                &mut encoder,
                "rill_group_members",
                "Live members of a group, by group",
                MetricType::Gauge,
                members
                    .iter()
                    .map(|(g, n)| ([("group", g.clone())], ConstGauge::new(*n))),
            )?;
            family(
                &mut encoder,
                "rill_group_committed_offset",
                "A group's committed offset, by group and partition",
                MetricType::Gauge,
                rows.iter()
                    .map(|r| (labels(r), ConstGauge::new(r.committed_offset))),
            )?;
            family(
                &mut encoder,
                "rill_group_lag_records",
                "Records past a group's committed offset, by group and partition",
                MetricType::Gauge,
                rows.iter()
                    .map(|r| (labels(r), ConstGauge::new(r.lag_records))),
            )?;
        }

        gauge(
            &mut encoder,
            "rill_waiting_fetches",
            "Long-poll fetches waiting for data now",
            self.broker.waiting_fetches() as u64,
        )?;
        gauge(
            &mut encoder,
            "rill_connections",
            "Client connections served now",
            self.broker.open_connections() as u64,
        )?;

        let sync = rill_storage::stats::sync_stats().snapshot();
        let errors = sync.errors;
        {
            let metric = encoder.encode_descriptor(
                "rill_fsync_duration_seconds",
                "Time of each group-commit sync of a partition (its count is the syncs run)",
                None,
                MetricType::Histogram,
            )?;
            SyncHistogram(sync).encode(metric)?;
        }
        {
            let metric = encoder.encode_descriptor(
                "rill_flush_errors",
                "Syncs and checkpoints that failed (each fences its partition)",
                None,
                MetricType::Counter,
            )?;
            ConstCounter::new(errors).encode(metric)?;
        }

        let figures = process::read();
        if let Some(bytes) = figures.resident_bytes {
            gauge(
                &mut encoder,
                "process_resident_memory_bytes",
                "Resident memory of the broker process",
                bytes,
            )?;
        }
        if let Some(n) = figures.open_fds {
            gauge(
                &mut encoder,
                "process_open_fds",
                "Open file descriptors of the broker process",
                n,
            )?;
        }
        Ok(())
    }
}
