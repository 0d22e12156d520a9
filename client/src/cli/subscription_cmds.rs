//! `rill subscription create|list|describe|delete|seek`, and the queue and push forms of
//! `rill consume` (`--subscription`, `--push`).

use std::io::Write;

use anyhow::{bail, Result};
use clap::{Args, Subcommand};
use rill_proto::v1 as pb;
use serde_json::json;

use super::stream_cmds::{format_record, ConsumeArgs};
use super::{parse_duration, parse_since, print_json, units, Ctx, Output};
use crate::connection::Connection;
use crate::consumer::ConsumedRecord;
use crate::subscription::{PushStream, PushTarget, QueueConsumer, QueueRecord, Subscriptions};

/// Subscription commands.
#[derive(Debug, Subcommand)]
pub enum SubscriptionCommand {
    /// Create a queue subscription on a topic.
    #[command(
        after_help = "Example:\n  rill subscription create jobs --topic orders --ack-deadline 30s --max-attempts 5 --dead-letter-topic orders.dlq\n  rill subscription create hooks --topic orders --push-endpoint http://127.0.0.1:8080/hook --ordered --max-batch-records 10"
    )]
    Create(CreateArgs),
    /// List subscriptions.
    #[command(after_help = "Example:\n  rill subscription list --output json")]
    List,
    /// Show a subscription's backlog, in-flight records, oldest unacknowledged age and dead
    /// letters, per partition.
    #[command(after_help = "Example:\n  rill subscription describe jobs")]
    Describe {
        /// The subscription.
        name: String,
    },
    /// Delete a subscription and its state (the topic stays).
    #[command(after_help = "Example:\n  rill subscription delete jobs")]
    Delete {
        /// The subscription.
        name: String,
    },
    /// Replay or skip: records before the target count as acknowledged, from it on as new.
    #[command(
        after_help = "Example:\n  rill subscription seek jobs --to-datetime 2026-11-30T00:00:00Z"
    )]
    Seek(SeekArgs),
}

/// `rill subscription create`.
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// The subscription's name.
    pub name: String,
    /// The topic it reads.
    #[arg(long)]
    pub topic: String,
    /// How long a delivered record stays locked to its consumer (30s).
    #[arg(long, value_parser = parse_duration)]
    pub ack_deadline: Option<std::time::Duration>,
    /// Deliveries before a record is dead-lettered or archived (5).
    #[arg(long)]
    pub max_attempts: Option<u32>,
    /// Where records past their attempts and rejected ones go (else they are archived).
    #[arg(long)]
    pub dead_letter_topic: Option<String>,
    /// Records delivered and not done at once, per partition (1000).
    #[arg(long)]
    pub max_in_flight_per_partition: Option<u32>,
    /// Have the broker POST each record to this http(s) URL (a webhook); the broker allows
    /// loopback hosts and those in its push_endpoint_allow list.
    #[arg(long)]
    pub push_endpoint: Option<String>,
    /// Shortest wait before a failed POST is retried (100ms).
    #[arg(long, value_parser = parse_duration, requires = "push_endpoint")]
    pub min_backoff: Option<std::time::Duration>,
    /// Longest wait before a retry (60s).
    #[arg(long, value_parser = parse_duration, requires = "push_endpoint")]
    pub max_backoff: Option<std::time::Duration>,
    /// POSTs outstanding at once (100).
    #[arg(long, requires = "push_endpoint")]
    pub max_in_flight: Option<u32>,
    /// Sign every POST (HMAC-SHA256) with the secret in this environment variable.
    #[arg(long, requires = "push_endpoint")]
    pub signing_secret_env: Option<String>,
    /// Deliver records with the same key one at a time, in offset order: the next only
    /// after the one before is acked or dead-lettered (a failing key blocks only itself).
    #[arg(long, requires = "push_endpoint")]
    pub ordered: bool,
    /// Records per POST, in a `messages` array, acked or nacked together (1: one record per
    /// POST, in a `message` envelope).
    #[arg(long, requires = "push_endpoint")]
    pub max_batch_records: Option<u32>,
    /// Start at the first retained record (default: only records appended from now on).
    #[arg(long)]
    pub from_beginning: bool,
}

/// `rill subscription seek`.
#[derive(Debug, Args)]
pub struct SeekArgs {
    /// The subscription.
    pub name: String,
    /// To this offset (in every partition, or in --partition).
    #[arg(
        long,
        conflicts_with = "to_datetime",
        required_unless_present = "to_datetime"
    )]
    pub to_offset: Option<u64>,
    /// To the first record at or after a time (RFC 3339) or a duration ago (10m).
    #[arg(long, value_parser = parse_since)]
    pub to_datetime: Option<i64>,
    /// Only this partition.
    #[arg(long)]
    pub partition: Option<u32>,
}

/// Runs a subscription command.
pub async fn subscription(conn: Connection, ctx: Ctx, command: SubscriptionCommand) -> Result<()> {
    let subs = Subscriptions::new(conn);
    match command {
        SubscriptionCommand::Create(a) => {
            let ms = |d: Option<std::time::Duration>| -> Result<u32> {
                Ok(match d {
                    Some(d) => u32::try_from(d.as_millis())
                        .map_err(|_| anyhow::anyhow!("a duration is too long"))?,
                    None => 0,
                })
            };
            let push = match &a.push_endpoint {
                None => None,
                Some(endpoint) => Some(pb::PushConfig {
                    endpoint: endpoint.clone(),
                    min_backoff_ms: ms(a.min_backoff)?,
                    max_backoff_ms: ms(a.max_backoff)?,
                    max_in_flight: a.max_in_flight.unwrap_or(0),
                    signing_secret: match &a.signing_secret_env {
                        Some(var) => std::env::var(var).map_err(|_| {
                            anyhow::anyhow!("--signing-secret-env: {var} is not set")
                        })?,
                        None => String::new(),
                    },
                    ordered: a.ordered,
                    max_batch_records: a.max_batch_records.unwrap_or(0),
                }),
            };
            let config = pb::SubscriptionConfig {
                topic: a.topic,
                ack_deadline_ms: ms(a.ack_deadline)?,
                max_delivery_attempts: a.max_attempts.unwrap_or(0),
                dead_letter_topic: a.dead_letter_topic.unwrap_or_default(),
                max_in_flight_per_partition: a.max_in_flight_per_partition.unwrap_or(0),
                push,
            };
            let c = subs.create(&a.name, config, a.from_beginning).await?;
            match ctx.output {
                Output::Json => print_json(&config_json(&a.name, &c))?,
                Output::Table => println!(
                    "created subscription {} on topic {} (ack deadline {}, {} attempts, {})",
                    a.name,
                    c.topic,
                    units::duration_ms(u64::from(c.ack_deadline_ms)),
                    c.max_delivery_attempts,
                    if c.dead_letter_topic.is_empty() {
                        "archived after that".to_string()
                    } else {
                        format!("then to {}", c.dead_letter_topic)
                    }
                ),
            }
        }
        SubscriptionCommand::List => {
            let all = subs.list().await?;
            match ctx.output {
                Output::Json => print_json(&json!(all
                    .iter()
                    .map(|s| json!({"name": s.name, "topic": s.topic}))
                    .collect::<Vec<_>>()))?,
                Output::Table => {
                    println!("{:<30} TOPIC", "NAME");
                    for s in all {
                        println!("{:<30} {}", s.name, s.topic);
                    }
                }
            }
        }
        SubscriptionCommand::Describe { name } => {
            let d = subs.describe(&name).await?;
            describe_out(ctx, &d)?;
        }
        SubscriptionCommand::Delete { name } => {
            subs.delete(&name).await?;
            if ctx.output == Output::Table {
                println!("deleted subscription {name}");
            } else {
                print_json(&json!({"deleted": name}))?;
            }
        }
        SubscriptionCommand::Seek(a) => {
            let target = match (a.to_offset, a.to_datetime) {
                (Some(o), _) => pb::seek_subscription_request::Target::ToOffset(o),
                (None, Some(t)) => pb::seek_subscription_request::Target::ToTimestampMs(t),
                (None, None) => bail!("give --to-offset or --to-datetime"),
            };
            let moved = subs.seek(&a.name, target, a.partition).await?;
            match ctx.output {
                Output::Json => print_json(&json!(moved
                    .iter()
                    .map(|(p, o)| json!({"partition": p, "offset": o}))
                    .collect::<Vec<_>>()))?,
                Output::Table => {
                    for (p, o) in moved {
                        println!("partition {p}: now at offset {o}");
                    }
                }
            }
        }
    }
    Ok(())
}

fn config_json(name: &str, c: &pb::SubscriptionConfig) -> serde_json::Value {
    json!({
        "name": name,
        "topic": c.topic,
        "ack_deadline_ms": c.ack_deadline_ms,
        "max_delivery_attempts": c.max_delivery_attempts,
        "dead_letter_topic": (!c.dead_letter_topic.is_empty()).then_some(&c.dead_letter_topic),
        "max_in_flight_per_partition": c.max_in_flight_per_partition,
        "push": c.push.as_ref().map(|p| json!({
            "endpoint": p.endpoint,
            "min_backoff_ms": p.min_backoff_ms,
            "max_backoff_ms": p.max_backoff_ms,
            "max_in_flight": p.max_in_flight,
            "ordered": p.ordered,
            "max_batch_records": p.max_batch_records,
        })),
    })
}

fn describe_out(ctx: Ctx, d: &pb::DescribeSubscriptionResponse) -> Result<()> {
    let c = d.config.clone().unwrap_or_default();
    if ctx.output == Output::Json {
        let mut v = config_json(&d.name, &c);
        v["backlog"] = json!(d.backlog);
        v["in_flight"] = json!(d.in_flight);
        v["oldest_unacked_age_ms"] = json!(d.oldest_unacked_age_ms);
        v["dead_lettered"] = json!(d.dead_lettered);
        v["archived"] = json!(d.archived);
        v["partitions"] = json!(d
            .partitions
            .iter()
            .map(|p| json!({
                "partition": p.partition,
                "ack_floor": p.ack_floor,
                "next_offset": p.next_offset,
                "high_watermark": p.high_watermark,
                "backlog": p.backlog,
                "in_flight": p.in_flight,
                "redelivery_pending": p.redelivery_pending,
            }))
            .collect::<Vec<_>>());
        return print_json(&v);
    }
    let mut out = std::io::stdout().lock();
    writeln!(out, "subscription {} on topic {}", d.name, c.topic)?;
    writeln!(
        out,
        "  ack deadline {}, {} attempts, dead letters to {}, at most {} in flight per partition",
        units::duration_ms(u64::from(c.ack_deadline_ms)),
        c.max_delivery_attempts,
        if c.dead_letter_topic.is_empty() {
            "(archived)"
        } else {
            &c.dead_letter_topic
        },
        c.max_in_flight_per_partition
    )?;
    if let Some(p) = &c.push {
        writeln!(
            out,
            "  pushed to {} (backoff {}..{}, at most {} requests outstanding, {} per POST{})",
            p.endpoint,
            units::duration_ms(u64::from(p.min_backoff_ms)),
            units::duration_ms(u64::from(p.max_backoff_ms)),
            p.max_in_flight,
            p.max_batch_records.max(1),
            if p.ordered { ", ordered by key" } else { "" }
        )?;
    }
    writeln!(
        out,
        "  backlog {}, in flight {}, oldest unacked {}, dead-lettered {}, archived {}",
        d.backlog,
        d.in_flight,
        if d.backlog == 0 {
            "-".to_string()
        } else {
            units::age_ms(u64::try_from(d.oldest_unacked_age_ms).unwrap_or(0))
        },
        d.dead_lettered,
        d.archived
    )?;
    writeln!(
        out,
        "{:>9} {:>12} {:>12} {:>14} {:>10} {:>10} {:>12}",
        "PARTITION", "ACK-FLOOR", "NEXT", "HIGH-WATERMARK", "BACKLOG", "IN-FLIGHT", "REDELIVERY"
    )?;
    for p in &d.partitions {
        writeln!(
            out,
            "{:>9} {:>12} {:>12} {:>14} {:>10} {:>10} {:>12}",
            p.partition,
            p.ack_floor,
            p.next_offset,
            p.high_watermark,
            p.backlog,
            p.in_flight,
            p.redelivery_pending
        )?;
    }
    Ok(())
}

fn as_consumed(topic: &str, r: QueueRecord) -> ConsumedRecord {
    ConsumedRecord {
        topic: topic.to_string(),
        partition: r.partition,
        offset: r.offset,
        timestamp_ms: r.timestamp_ms,
        key: r.key,
        value: r.value,
        headers: r.headers,
    }
}

/// `rill consume T --subscription S` (acks each record once printed) and
/// `rill consume T --push` (with --group or --subscription).
pub async fn consume(conn: Connection, ctx: Ctx, args: ConsumeArgs) -> Result<()> {
    let consumer_id = format!("rill-cli-{}", std::process::id());
    let mut printed = 0u64;
    let done = |printed: u64| args.max_messages.is_some_and(|n| printed >= n);
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    if args.push {
        let target = match (&args.subscription, &args.group) {
            (Some(name), _) => PushTarget::Subscription {
                name: name.clone(),
                consumer_id,
            },
            (None, Some(group)) => PushTarget::Group {
                group: group.clone(),
                topic: args.topic.clone(),
            },
            (None, None) => bail!("--push needs --subscription or --group"),
        };
        let queue = matches!(target, PushTarget::Subscription { .. });
        let window = args.max_messages.unwrap_or(500).clamp(1, 500);
        let mut stream = PushStream::open(&conn, target, window, 16 << 20).await?;
        while !done(printed) {
            let next = tokio::select! {
                _ = &mut ctrl_c => break,
                r = stream.next() => r?,
            };
            let Some(r) = next else { break };
            let at = (r.partition, r.offset);
            println!(
                "{}",
                format_record(ctx, &args, &as_consumed(&args.topic, r))
            );
            printed += 1;
            if queue {
                stream.ack(&[at]).await?;
            }
        }
        return Ok(stream.close().await?);
    }
    let Some(name) = &args.subscription else {
        bail!("--subscription is required here");
    };
    let consumer = QueueConsumer::new(conn, name, &consumer_id);
    let wait_ms = if args.follow { 5_000 } else { 1_000 };
    loop {
        if done(printed) {
            break;
        }
        let want = args.max_messages.map_or(500, |n| (n - printed).min(500)) as u32;
        let got = tokio::select! {
            _ = &mut ctrl_c => break,
            r = consumer.receive(want, wait_ms) => r?,
        };
        if got.is_empty() && !args.follow {
            break;
        }
        let mut out = std::io::stdout().lock();
        let mut acked = Vec::with_capacity(got.len());
        for r in got {
            let at = (r.partition, r.offset);
            writeln!(
                out,
                "{}",
                format_record(ctx, &args, &as_consumed(&args.topic, r))
            )?;
            acked.push(at);
        }
        out.flush()?;
        drop(out);
        printed += acked.len() as u64;
        // Acked once printed: a crash before this line means redelivery, not loss.
        if !acked.is_empty() {
            consumer.ack(&acked).await?;
        }
    }
    Ok(())
}
