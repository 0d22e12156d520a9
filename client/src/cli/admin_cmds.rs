//! `rill topic …` and `rill group …`.

use anyhow::{bail, Result};
use clap::Args;
use serde_json::json;

use super::{
    parse_duration, print_json, print_table, units, Ctx, GroupCommand, Output, TopicCommand,
};
use crate::admin::{Admin, Flush, ResetTo, TopicSettings};
use crate::connection::Connection;

/// `rill topic create`.
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// The topic name.
    pub name: String,
    /// Number of partitions [default: the broker's].
    #[arg(long)]
    pub partitions: Option<u32>,
    /// Keep records this long (7d, 12h, 30m), or `forever` [default: the broker's, 7d].
    #[arg(long)]
    pub retention: Option<String>,
    /// Keep at most this many bytes per partition [default: no limit].
    #[arg(long)]
    pub retention_bytes: Option<u64>,
    /// Segment size in bytes [default: the broker's, 256 MiB].
    #[arg(long)]
    pub segment_bytes: Option<u64>,
    /// Flush policy: always, interval:MS or never [default: the broker's, interval:1000].
    #[arg(long)]
    pub flush: Option<Flush>,
    /// Replicas per partition, on distinct brokers of a cluster [default: 1].
    #[arg(long)]
    pub replication_factor: Option<u32>,
    /// How batches are stored: producer (as they came), none, lz4 or zstd
    /// [default: producer].
    #[arg(long, value_parser = ["producer", "none", "lz4", "zstd"])]
    pub compression: Option<String>,
}

/// `rill group reset-offsets`.
#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("target").required(true).args(["to_earliest", "to_latest", "to_offset", "to_datetime", "shift_by"])))]
pub struct ResetArgs {
    /// The group.
    pub group: String,
    /// The topic.
    #[arg(long)]
    pub topic: String,
    /// Only this partition (repeatable) [default: all].
    #[arg(long)]
    pub partition: Vec<u32>,
    /// To the first retained offset.
    #[arg(long)]
    pub to_earliest: bool,
    /// To the high watermark.
    #[arg(long)]
    pub to_latest: bool,
    /// To this offset.
    #[arg(long)]
    pub to_offset: Option<u64>,
    /// To the first offset at or after this time (RFC 3339, or a duration ago like 1h).
    #[arg(long)]
    pub to_datetime: Option<String>,
    /// By this many offsets from the committed one.
    #[arg(long, allow_hyphen_values = true)]
    pub shift_by: Option<i64>,
    /// Apply the change (without it, only show it).
    #[arg(long)]
    pub execute: bool,
}

fn flush_text(f: &Option<rill_proto::v1::FlushPolicy>) -> String {
    use rill_proto::v1::flush_policy::Policy;
    match f.as_ref().and_then(|f| f.policy.as_ref()) {
        Some(Policy::Always(_)) => "always".into(),
        Some(Policy::Never(_)) => "never".into(),
        Some(Policy::IntervalMs(ms)) => format!("interval:{ms}"),
        None => "-".into(),
    }
}

fn describe_json(d: &rill_proto::v1::TopicDescription) -> serde_json::Value {
    let c = d.config.clone().unwrap_or_default();
    json!({
        "name": d.name,
        "max_batch_bytes": d.max_batch_bytes,
        "partitions": d.partitions.iter().map(|p| json!({
            "partition": p.partition,
            "log_start_offset": p.log_start_offset,
            "high_watermark": p.high_watermark,
            "size_bytes": p.size_bytes,
            "segments": p.segments,
            "waiting_fetches": p.waiting_fetches,
            "fenced_reason": p.fenced_reason,
        })).collect::<Vec<_>>(),
        "config": {
            "partitions": c.partitions,
            "retention_ms": c.retention_ms,
            "retention_bytes": c.retention_bytes,
            "segment_bytes": c.segment_bytes,
            "segment_ms": c.segment_ms,
            "flush": flush_text(&c.flush),
            "compression": c.compression,
        },
    })
}

fn print_description(ctx: Ctx, d: &rill_proto::v1::TopicDescription) -> Result<()> {
    if ctx.output == Output::Json {
        return print_json(&describe_json(d));
    }
    let c = d.config.clone().unwrap_or_default();
    println!(
        "topic {}: {} partitions, retention {}, retention bytes {}, segment bytes {}, flush {}, compression {}, max batch {}",
        d.name,
        c.partitions,
        units::limit(c.retention_ms, units::duration_ms),
        units::limit(c.retention_bytes, units::bytes),
        c.segment_bytes.map_or("-".into(), units::bytes),
        flush_text(&c.flush),
        c.compression.as_deref().unwrap_or("producer"),
        units::bytes(d.max_batch_bytes)
    );
    let rows: Vec<Vec<String>> = d
        .partitions
        .iter()
        .map(|p| {
            vec![
                p.partition.to_string(),
                p.log_start_offset.to_string(),
                p.high_watermark.to_string(),
                units::bytes(p.size_bytes),
                p.segments.to_string(),
                p.fenced_reason.clone().unwrap_or_else(|| "ok".into()),
            ]
        })
        .collect();
    print_table(
        &[
            "PARTITION",
            "LOG-START",
            "HIGH-WATERMARK",
            "SIZE",
            "SEGMENTS",
            "STATUS",
        ],
        &rows,
    )
}

/// Runs a topic command.
pub async fn topic(conn: Connection, ctx: Ctx, command: TopicCommand) -> Result<()> {
    let admin = Admin::new(conn.clone());
    match command {
        TopicCommand::Create(args) => {
            let mut settings = TopicSettings::new();
            if let Some(n) = args.partitions {
                settings = settings.partitions(n);
            }
            if let Some(r) = args.replication_factor {
                settings = settings.replication_factor(r);
            }
            if let Some(r) = &args.retention {
                let retention = match r.as_str() {
                    "forever" | "-1" => None,
                    other => Some(parse_duration(other).map_err(anyhow::Error::msg)?),
                };
                settings = settings.retention(retention);
            }
            if let Some(b) = args.retention_bytes {
                settings = settings.retention_bytes(Some(b));
            }
            if let Some(b) = args.segment_bytes {
                settings = settings.segment_bytes(b);
            }
            if let Some(f) = args.flush {
                settings = settings.flush(f);
            }
            if let Some(c) = &args.compression {
                settings = settings.compression(c.clone());
            }
            let d = admin.create_topic(&args.name, settings).await?;
            if ctx.output == Output::Json {
                print_json(&describe_json(&d))
            } else {
                println!(
                    "created topic {} with {} partitions",
                    d.name,
                    d.partitions.len()
                );
                Ok(())
            }
        }
        TopicCommand::List => {
            let topics = admin.list_topics().await?;
            if ctx.output == Output::Json {
                return print_json(&json!(topics
                    .iter()
                    .map(|t| json!({"name": t.name, "partitions": t.partitions}))
                    .collect::<Vec<_>>()));
            }
            let rows: Vec<Vec<String>> = topics
                .iter()
                .map(|t| vec![t.name.clone(), t.partitions.to_string()])
                .collect();
            print_table(&["TOPIC", "PARTITIONS"], &rows)
        }
        TopicCommand::Describe { name } => {
            let d = admin.describe_topic(&name).await?;
            // In a cluster: replicas, leader, in-sync or lagging (none for a single broker).
            let replication = super::cluster_cmds::replication(&conn, &name).await?;
            match replication {
                Some(r) if ctx.output == Output::Json => {
                    let mut v = describe_json(&d);
                    v["replication"] = super::cluster_cmds::replication_json(&r);
                    print_json(&v)
                }
                Some(r) => {
                    print_description(ctx, &d)?;
                    super::cluster_cmds::print_replication(&r)
                }
                None => print_description(ctx, &d),
            }
        }
        TopicCommand::Delete { name } => {
            admin.delete_topic(&name).await?;
            if ctx.output == Output::Json {
                print_json(&json!({"deleted": name}))
            } else {
                println!("deleted topic {name}");
                Ok(())
            }
        }
    }
}

/// Runs a group command.
pub async fn group(conn: Connection, ctx: Ctx, command: GroupCommand) -> Result<()> {
    let admin = Admin::new(conn);
    match command {
        GroupCommand::List => {
            let groups = admin.list_group_summaries().await?;
            if ctx.output == Output::Json {
                return print_json(&json!(groups
                    .iter()
                    .map(|g| json!({"group": g.group, "state": g.state, "members": g.member_count}))
                    .collect::<Vec<_>>()));
            }
            let rows: Vec<Vec<String>> = groups
                .into_iter()
                .map(|g| vec![g.group, g.state, g.member_count.to_string()])
                .collect();
            print_table(&["GROUP", "STATE", "MEMBERS"], &rows)
        }
        GroupCommand::Describe { group } => {
            let d = admin.describe_group(&group).await?;
            // Which member owns each partition, for the partition rows.
            let mut owner: std::collections::HashMap<(String, u32), String> =
                std::collections::HashMap::new();
            for m in &d.members {
                for tp in m.assigned.iter().flat_map(|s| s.topics.iter()) {
                    for p in &tp.partitions {
                        owner.insert((tp.topic.clone(), *p), m.member_id.clone());
                    }
                }
            }
            let sets = |s: &Option<rill_proto::v1::PartitionSet>| {
                s.iter()
                    .flat_map(|s| s.topics.iter())
                    .map(|tp| json!({"topic": tp.topic, "partitions": tp.partitions}))
                    .collect::<Vec<_>>()
            };
            if ctx.output == Output::Json {
                return print_json(&json!({
                    "group": d.group,
                    "state": d.state,
                    "group_epoch": d.group_epoch,
                    "assignor": d.assignor,
                    "members": d.members.iter().map(|m| json!({
                        "member_id": m.member_id, "instance_id": m.instance_id,
                        "client_address": m.client_address, "member_epoch": m.member_epoch,
                        "subscribed_topics": m.subscribed_topics, "assigned": sets(&m.assigned),
                    })).collect::<Vec<_>>(),
                    "partitions": d.partitions.iter().map(|p| json!({
                        "topic": p.topic, "partition": p.partition, "committed_offset": p.committed_offset,
                        "high_watermark": p.high_watermark, "log_start_offset": p.log_start_offset, "lag": p.lag,
                        "owner": owner.get(&(p.topic.clone(), p.partition)),
                    })).collect::<Vec<_>>(),
                }));
            }
            println!(
                "group {}  state {}  epoch {}  members {}",
                d.group,
                d.state,
                d.group_epoch,
                d.members.len()
            );
            if !d.members.is_empty() {
                let rows: Vec<Vec<String>> = d
                    .members
                    .iter()
                    .map(|m| {
                        let assigned = m
                            .assigned
                            .iter()
                            .flat_map(|s| s.topics.iter())
                            .map(|tp| {
                                let ps: Vec<String> =
                                    tp.partitions.iter().map(u32::to_string).collect();
                                format!("{}[{}]", tp.topic, ps.join(","))
                            })
                            .collect::<Vec<_>>()
                            .join(" ");
                        vec![
                            m.member_id.clone(),
                            m.instance_id.clone().unwrap_or_else(|| "-".into()),
                            m.client_address.clone(),
                            m.member_epoch.to_string(),
                            if assigned.is_empty() {
                                "-".into()
                            } else {
                                assigned
                            },
                        ]
                    })
                    .collect();
                print_table(
                    &["MEMBER", "INSTANCE", "CLIENT", "EPOCH", "PARTITIONS"],
                    &rows,
                )?;
                println!();
            }
            let rows: Vec<Vec<String>> = d
                .partitions
                .iter()
                .map(|p| {
                    vec![
                        p.topic.clone(),
                        p.partition.to_string(),
                        p.committed_offset.to_string(),
                        p.high_watermark.to_string(),
                        p.lag.to_string(),
                        owner
                            .get(&(p.topic.clone(), p.partition))
                            .cloned()
                            .unwrap_or_else(|| "-".into()),
                    ]
                })
                .collect();
            print_table(
                &[
                    "TOPIC",
                    "PARTITION",
                    "COMMITTED",
                    "HIGH-WATERMARK",
                    "LAG",
                    "OWNER",
                ],
                &rows,
            )
        }
        GroupCommand::Delete { group } => {
            admin.delete_group(&group).await?;
            if ctx.output == Output::Json {
                return print_json(&json!({"group": group, "deleted": true}));
            }
            println!("group {group} deleted");
            Ok(())
        }
        GroupCommand::ResetOffsets(args) => {
            let to = if args.to_earliest {
                ResetTo::Earliest
            } else if args.to_latest {
                ResetTo::Latest
            } else if let Some(o) = args.to_offset {
                ResetTo::Offset(o)
            } else if let Some(t) = &args.to_datetime {
                ResetTo::Timestamp(super::parse_since(t).map_err(anyhow::Error::msg)?)
            } else if let Some(n) = args.shift_by {
                ResetTo::ShiftBy(n)
            } else {
                bail!("choose one of --to-earliest, --to-latest, --to-offset, --to-datetime, --shift-by");
            };
            let resp = admin
                .reset_group_offsets(&args.group, &args.topic, &args.partition, to, !args.execute)
                .await?;
            if ctx.output == Output::Json {
                return print_json(&json!({
                    "group": args.group, "topic": args.topic, "applied": resp.applied,
                    "changes": resp.changes.iter().map(|c| json!({
                        "partition": c.partition, "previous_offset": c.previous_offset, "new_offset": c.new_offset,
                    })).collect::<Vec<_>>(),
                }));
            }
            let rows: Vec<Vec<String>> = resp
                .changes
                .iter()
                .map(|c| {
                    vec![
                        args.topic.clone(),
                        c.partition.to_string(),
                        c.previous_offset.map_or("-".into(), |o| o.to_string()),
                        c.new_offset.to_string(),
                    ]
                })
                .collect();
            print_table(&["TOPIC", "PARTITION", "CURRENT", "NEW"], &rows)?;
            if resp.applied {
                println!("offsets of group {} reset", args.group);
            } else {
                println!("dry run: nothing changed (add --execute to apply)");
            }
            Ok(())
        }
    }
}
