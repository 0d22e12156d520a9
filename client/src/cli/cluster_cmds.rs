//! `rill cluster ...`: the cluster's brokers, their liveness and the controller leader.

use anyhow::{Context, Result};
use clap::Subcommand;
use rill_proto::v1::{ClusterStatusRequest, MetadataRequest, PartitionMetadata};
use serde_json::json;

use super::{print_json, print_table, Ctx, Output};
use crate::connection::Connection;

/// Cluster commands.
#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// Each broker's liveness, the controller leader, and the partitions each broker leads,
    /// as the broker asked sees them.
    #[command(after_help = "Example:\n  rill cluster status --output json")]
    Status,
}

/// Runs a cluster command.
pub async fn cluster(conn: Connection, ctx: Ctx, command: ClusterCommand) -> Result<()> {
    match command {
        ClusterCommand::Status => {
            let status = conn
                .cluster()
                .cluster_status(ClusterStatusRequest {})
                .await
                .map_err(|s| {
                    if s.code() == tonic::Code::Unimplemented {
                        anyhow::anyhow!(
                            "the broker at {} runs alone (started without --node-id and --peers)",
                            conn.addr()
                        )
                    } else {
                        anyhow::anyhow!("{}", s.message())
                    }
                })
                .with_context(|| format!("cluster status from {}", conn.addr()))?
                .into_inner();
            if ctx.output == Output::Json {
                let brokers: Vec<_> = status
                    .brokers
                    .iter()
                    .map(|b| {
                        json!({
                            "node_id": b.node_id,
                            "address": b.address,
                            "live": b.live,
                            "last_seen_ms": b.last_seen_ms,
                            "down_detected_ms": b.down_detected_ms,
                            "controller_leader": b.controller_leader,
                            "partitions_led": b.partitions_led,
                        })
                    })
                    .collect();
                return print_json(&json!({
                    "answered_by": status.answered_by,
                    "controller_leader": (status.controller_leader != 0).then_some(status.controller_leader),
                    "controller_term": status.controller_term,
                    "brokers": brokers,
                }));
            }
            let leader = match status.controller_leader {
                0 => "none (election running)".to_string(),
                n => n.to_string(),
            };
            println!(
                "controller leader: {leader} (term {}), as seen by node {}",
                status.controller_term, status.answered_by
            );
            let rows: Vec<Vec<String>> = status
                .brokers
                .iter()
                .map(|b| {
                    vec![
                        b.node_id.to_string(),
                        b.address.clone(),
                        match (b.live, b.down_detected_ms) {
                            (true, _) => "live".to_string(),
                            // Its connections closed and a new one was refused.
                            (false, Some(ms)) => format!("down (gone {ms} ms ago)"),
                            (false, None) => "down".to_string(),
                        },
                        b.last_seen_ms
                            .map_or("never".to_string(), |ms| format!("{ms} ms ago")),
                        if b.controller_leader { "yes" } else { "" }.to_string(),
                        b.partitions_led.join(","),
                    ]
                })
                .collect();
            print_table(
                &[
                    "NODE",
                    "ADDRESS",
                    "STATE",
                    "LAST SEEN",
                    "CONTROLLER",
                    "LEADS",
                ],
                &rows,
            )
        }
    }
}

/// A replicated topic's partitions as their leaders see them: `None` when the broker runs
/// alone or the topic is not in the cluster's metadata (a replication factor 1 topic).
pub async fn replication(conn: &Connection, topic: &str) -> Result<Option<Vec<PartitionMetadata>>> {
    let request = MetadataRequest {
        topics: vec![topic.to_string()],
    };
    let metadata = match conn.cluster().metadata(request.clone()).await {
        Ok(m) => m.into_inner(),
        Err(s) if s.code() == tonic::Code::Unimplemented => return Ok(None),
        Err(s) => anyhow::bail!("metadata of topic {topic}: {}", s.message()),
    };
    let Some(t) = metadata.topics.into_iter().find(|t| t.name == topic) else {
        return Ok(None);
    };
    if t.replication_factor <= 1 {
        return Ok(None);
    }
    let mut partitions = t.partitions;
    // Only a partition's leader knows its replicas' lag: ask the leaders this broker is not.
    for p in partitions.iter_mut() {
        if !p.replica_states.is_empty() || p.leader_address.is_empty() {
            continue;
        }
        let Ok(leader) = conn.connect_like(&p.leader_address).await else {
            continue;
        };
        if let Ok(m) = leader.cluster().metadata(request.clone()).await {
            if let Some(lp) = m
                .into_inner()
                .topics
                .into_iter()
                .flat_map(|t| t.partitions)
                .find(|x| x.partition == p.partition)
            {
                *p = lp;
            }
        }
    }
    Ok(Some(partitions))
}

/// The replication part of `rill topic describe`, as JSON.
pub fn replication_json(partitions: &[PartitionMetadata]) -> serde_json::Value {
    json!(partitions
        .iter()
        .map(|p| json!({
            "partition": p.partition,
            "leader": (p.leader != 0).then_some(p.leader),
            "replicas": p.replicas,
            "in_sync": p.in_sync,
            "replica_states": p.replica_states.iter().map(|r| json!({
                "node_id": r.node_id,
                "in_sync": r.in_sync,
                "lag_entries": r.lag_entries,
                "lag_records": r.lag_records,
            })).collect::<Vec<_>>(),
        }))
        .collect::<Vec<_>>())
}

/// A lagging replica as the table shows it: its node, and how far behind it is in entries
/// and, when the leader knows, records.
fn lagging(r: &rill_proto::v1::ReplicaState) -> String {
    match r.lag_records {
        Some(records) => format!(
            "{}:lagging({} entries, {records} records behind)",
            r.node_id, r.lag_entries
        ),
        None => format!("{}:lagging({} entries behind)", r.node_id, r.lag_entries),
    }
}

/// The replication part of `rill topic describe`, as a table.
pub fn print_replication(partitions: &[PartitionMetadata]) -> Result<()> {
    println!();
    let rows: Vec<Vec<String>> = partitions
        .iter()
        .map(|p| {
            let states = if p.replica_states.is_empty() {
                "unknown (no leader)".to_string()
            } else {
                p.replica_states
                    .iter()
                    .map(|r| {
                        if r.in_sync {
                            format!("{}:in-sync", r.node_id)
                        } else {
                            lagging(r)
                        }
                    })
                    .collect::<Vec<_>>()
                    .join(" ")
            };
            vec![
                p.partition.to_string(),
                match p.leader {
                    0 => "none".to_string(),
                    l => l.to_string(),
                },
                p.replicas
                    .iter()
                    .map(u64::to_string)
                    .collect::<Vec<_>>()
                    .join(","),
                states,
            ]
        })
        .collect();
    print_table(&["PARTITION", "LEADER", "REPLICAS", "STATE"], &rows)
}
