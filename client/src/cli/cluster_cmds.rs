//! `rill cluster ...`: the cluster's brokers, their liveness and the controller leader.

use anyhow::{Context, Result};
use clap::Subcommand;
use rill_proto::v1::ClusterStatusRequest;
use serde_json::json;

use super::{print_json, print_table, Ctx, Output};
use crate::connection::Connection;

/// Cluster commands.
#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// Each broker's liveness, the controller leader, and the partitions each broker leads,
    /// as the broker asked sees them.
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
                        if b.live { "live" } else { "down" }.to_string(),
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
