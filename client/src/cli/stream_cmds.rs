//! `rill produce` and `rill consume`.

use std::collections::HashMap;
use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use clap::{Args, ValueEnum};
use serde_json::json;

use super::empty_read::{why_empty, PartitionSpan, Start};
use super::{bytes_json, parse_header, parse_since, print_json, Ctx, Output};
use crate::admin::{Admin, OffsetQuery};
use crate::connection::Connection;
use crate::consumer::{AutoOffsetReset, Consumer, ConsumerConfig, ConsumerEvent, SeekTo};
use crate::producer::{Acks, Compression, Producer, ProducerConfig, ProducerRecord};

/// Ack modes on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AcksArg {
    /// Appended on the partition leader (not yet replicated).
    Leader,
    /// Committed by a majority of the replicas (the leader alone with replication factor 1).
    Quorum,
    /// Synced to disk (by a majority of the replicas).
    Durable,
}

/// `rill produce`.
#[derive(Debug, Args)]
pub struct ProduceArgs {
    /// The topic.
    pub topic: String,
    /// Read lines from this file instead of stdin.
    #[arg(long)]
    pub file: Option<PathBuf>,
    /// The key of every record.
    #[arg(long, conflicts_with = "key_separator")]
    pub key: Option<String>,
    /// Split each line at the first SEP into key and value.
    #[arg(long)]
    pub key_separator: Option<String>,
    /// A header `k=v` on every record (repeatable).
    #[arg(long = "header", value_parser = parse_header)]
    pub headers: Vec<(String, String)>,
    /// Send every record to this partition.
    #[arg(long)]
    pub partition: Option<u32>,
    /// What each record's acknowledgement waits for.
    #[arg(long, value_enum, default_value_t = AcksArg::Quorum)]
    pub acks: AcksArg,
    /// Compress the batches here, before sending: none, lz4 or zstd (the broker stores them
    /// as they come, unless the topic's compression names another codec).
    #[arg(long, default_value = "none", value_parser = ["none", "lz4", "zstd"])]
    pub compression: String,
    /// Turn off idempotence: a retried batch may then be appended twice.
    #[arg(long)]
    pub no_idempotence: bool,
}

/// `rill consume --help`'s closing text: an example and the exit status.
pub const CONSUME_AFTER_HELP: &str = "\
Example:
  rill consume orders --partition 0 --offset 42 -n 10
  rill consume orders --group billing -f -v
  rill consume orders refunds --group billing -f

With --group and no --partition, it is a member of the group: the broker assigns it a share
of the partitions (several of them share the topic), and it commits what it printed before it
gives a partition up and when it stops (Ctrl-C). With --group, several topics may be given:
the member subscribes to all of them, and each printed line starts with the record's topic
and a tab (--output json carries the topic anyway).

Exit status:
  0  the read worked, even if it printed nothing; then a note on stderr says why (the start
     offset is past the end, --since is after the newest record, the topic is empty)
  1  an error (unknown topic or partition, no broker), or -f interrupted before any record
  2  a bad command line";

/// `rill consume`.
#[derive(Debug, Args)]
pub struct ConsumeArgs {
    /// The topic.
    pub topic: String,
    /// With --group: more topics the member subscribes to (the group assigns partitions of
    /// all of them).
    #[arg(requires = "group", conflicts_with_all = ["partition", "subscription", "push"])]
    pub more_topics: Vec<String>,
    /// Consume as a member of this group: start at its committed offsets and commit what was
    /// printed. Without --partition the broker assigns the partitions.
    #[arg(long)]
    pub group: Option<String>,
    /// With --group: a static member with this instance id (a restart within the session
    /// timeout gets the same partitions back).
    #[arg(long, requires = "group")]
    pub instance_id: Option<String>,
    /// With --group: the group's session timeout, ms (500 to 3600000; the broker's default
    /// is 45000).
    #[arg(long, requires = "group")]
    pub session_timeout_ms: Option<u32>,
    /// Print partition assignment changes on stderr (with the member id, epoch and time).
    #[arg(short = 'v', long)]
    pub verbose: bool,
    /// Start at the first retained record (even with a group's committed offsets).
    #[arg(long, conflicts_with_all = ["offset", "since"])]
    pub from_beginning: bool,
    /// Start at this offset.
    #[arg(long, conflicts_with = "since")]
    pub offset: Option<u64>,
    /// Start at the first record at or after a time (RFC 3339) or a duration ago (10m).
    #[arg(long, value_parser = parse_since)]
    pub since: Option<i64>,
    /// Stop after this many records.
    #[arg(short = 'n', long)]
    pub max_messages: Option<u64>,
    /// Keep waiting for new records until Ctrl-C (otherwise stop at the end of the log).
    #[arg(short = 'f', long)]
    pub follow: bool,
    /// Only this partition.
    #[arg(long)]
    pub partition: Option<u32>,
    /// Print the key before the value (tab-separated).
    #[arg(long)]
    pub print_key: bool,
    /// Print the headers before the value (tab-separated).
    #[arg(long)]
    pub print_headers: bool,
    /// Consume from this queue subscription instead of offsets: each record is acked once
    /// printed.
    #[arg(long, conflicts_with_all = ["from_beginning", "offset", "since", "partition"])]
    pub subscription: Option<String>,
    /// Have the broker push records (a gRPC stream with credits) for --subscription or
    /// --group, instead of long-polling.
    #[arg(long)]
    pub push: bool,
}

/// Runs `rill produce`.
pub async fn produce(conn: Connection, ctx: Ctx, args: ProduceArgs) -> Result<()> {
    let acks = match args.acks {
        AcksArg::Leader => Acks::Leader,
        AcksArg::Quorum => Acks::Quorum,
        AcksArg::Durable => Acks::Durable,
    };
    let compression: Compression = args.compression.parse().map_err(anyhow::Error::msg)?;
    let producer = Producer::new(
        conn,
        ProducerConfig::new()
            .acks(acks)
            .compression(compression)
            .idempotence(!args.no_idempotence),
    );
    let (reader, total): (Box<dyn BufRead>, Option<u64>) = match &args.file {
        Some(path) => {
            let f =
                std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
            let len = f.metadata().map(|m| m.len()).ok();
            (Box::new(std::io::BufReader::new(f)), len)
        }
        None => (Box::new(std::io::stdin().lock()), None),
    };
    let progress = match total {
        Some(len) if std::io::stderr().is_terminal() => {
            let bar = indicatif::ProgressBar::new(len);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            Some(bar)
        }
        _ => None,
    };
    let headers: Vec<(String, Bytes)> = args
        .headers
        .iter()
        .map(|(k, v)| (k.clone(), Bytes::from(v.clone())))
        .collect();
    let mut acks = Vec::new();
    let mut count = 0u64;
    for line in reader.lines() {
        let line = line.context("reading input")?;
        if let Some(bar) = &progress {
            bar.inc(line.len() as u64 + 1);
        }
        let (key, value) = match (&args.key, &args.key_separator) {
            (Some(k), _) => (Some(k.clone()), line),
            (None, Some(sep)) => match line.split_once(sep.as_str()) {
                Some((k, v)) => (Some(k.to_string()), v.to_string()),
                None => (None, line),
            },
            (None, None) => (None, line),
        };
        let mut record = ProducerRecord::new(args.topic.clone(), value);
        record.key = key.map(Bytes::from);
        record.partition = args.partition;
        record.headers = headers.clone();
        acks.push(producer.send(record).await?);
        count += 1;
        // Keep memory bounded on huge inputs: settle acknowledgements as we go.
        if acks.len() >= 10_000 {
            for ack in acks.drain(..) {
                ack.await?;
            }
        }
    }
    producer.flush().await?;
    let mut partitions: HashMap<u32, u64> = HashMap::new();
    for ack in acks {
        let (p, _) = ack.await?;
        *partitions.entry(p).or_default() += 1;
    }
    if let Some(bar) = progress {
        bar.finish_and_clear();
    }
    if ctx.output == Output::Json {
        print_json(&json!({"topic": args.topic, "records": count}))
    } else {
        eprintln!("produced {count} records to {}", args.topic);
        Ok(())
    }
}

pub(super) fn format_record(
    ctx: Ctx,
    args: &ConsumeArgs,
    r: &crate::consumer::ConsumedRecord,
) -> String {
    if ctx.output == Output::Json {
        let (value, value_b64) = bytes_json(&r.value);
        let key = r.key.as_ref().map(|k| bytes_json(k));
        let mut obj = json!({
            "topic": r.topic,
            "partition": r.partition,
            "offset": r.offset,
            "timestamp_ms": r.timestamp_ms,
            "key": key.as_ref().map(|(k, _)| k.clone()),
            "value": value,
            "headers": r.headers.iter().map(|(k, v)| (k.clone(), bytes_json(v).0)).collect::<serde_json::Map<_, _>>(),
        });
        if value_b64 {
            obj["value_encoding"] = json!("base64");
        }
        if key.as_ref().is_some_and(|(_, b64)| *b64) {
            obj["key_encoding"] = json!("base64");
        }
        return obj.to_string();
    }
    let mut out = String::new();
    if !args.more_topics.is_empty() {
        out.push_str(&r.topic);
        out.push('\t');
    }
    if args.print_headers {
        let h: Vec<String> = r
            .headers
            .iter()
            .map(|(k, v)| format!("{k}={}", String::from_utf8_lossy(v)))
            .collect();
        out.push_str(&h.join(","));
        out.push('\t');
    }
    if args.print_key {
        out.push_str(
            &r.key
                .as_ref()
                .map_or("null".into(), |k| String::from_utf8_lossy(k).into_owned()),
        );
        out.push('\t');
    }
    out.push_str(&String::from_utf8_lossy(&r.value));
    out
}

/// One line about a membership change, for `--verbose`: what, which partitions, the member id
/// and epoch, and the wall-clock time in ms (so ownership intervals of several consumers can
/// be compared).
fn membership_line(consumer: &Consumer, what: &str, topic: &str, partitions: &[u32]) -> String {
    let at_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let list: Vec<String> = partitions.iter().map(u32::to_string).collect();
    format!(
        "{what} topic={topic} partitions={} member={} epoch={} at_ms={at_ms}",
        list.join(","),
        consumer.member_id().unwrap_or_default(),
        consumer.member_epoch().unwrap_or_default(),
    )
}

/// Runs `rill consume`.
pub async fn consume(conn: Connection, ctx: Ctx, args: ConsumeArgs) -> Result<()> {
    if args.subscription.is_some() || args.push {
        return super::subscription_cmds::consume(conn, ctx, args).await;
    }
    let mut config = ConsumerConfig::new().auto_offset_reset(AutoOffsetReset::Earliest);
    if let Some(g) = &args.group {
        config = config.group(g.clone());
        if args.follow {
            config = config.auto_commit_interval_ms(Some(1000));
        }
        if let Some(id) = &args.instance_id {
            config = config.instance_id(id.clone());
        }
        if let Some(ms) = args.session_timeout_ms {
            config = config.session_timeout_ms(ms);
        }
    }
    let mut consumer = if args.more_topics.is_empty() {
        let partitions = args.partition.map(|p| vec![p]);
        Consumer::subscribe(conn.clone(), config, &args.topic, partitions).await?
    } else {
        Consumer::subscribe_topics(conn.clone(), config, &consumer_topics(&args)).await?
    };
    let mut chosen: Vec<(String, u32)> = consumer.positions().into_keys().collect();
    chosen.sort();
    for (t, p) in &chosen {
        if args.from_beginning {
            consumer.seek_in(t, *p, SeekTo::Beginning).await?;
        } else if let Some(o) = args.offset {
            consumer.seek_in(t, *p, SeekTo::Offset(o)).await?;
        } else if let Some(ts) = args.since {
            consumer.seek_in(t, *p, SeekTo::Timestamp(ts)).await?;
        }
    }
    // Without --follow, stop at the end of the log as it was at the start.
    let admin = Admin::new(conn);
    let starts = consumer.positions();
    let mut spans: Vec<(String, PartitionSpan)> = Vec::new();
    for (t, p) in chosen {
        let o = admin.list_offsets(&t, p, OffsetQuery::Latest).await?;
        let position = starts.get(&(t.clone(), p)).copied().unwrap_or(0);
        spans.push((
            t,
            PartitionSpan {
                partition: p,
                position,
                log_start: o.log_start_offset,
                high_watermark: o.offset,
            },
        ));
    }
    let ends: HashMap<(String, u32), u64> = spans
        .iter()
        .map(|(t, s)| ((t.clone(), s.partition), s.high_watermark))
        .collect();
    let caught_up = |consumer: &Consumer| {
        consumer
            .positions()
            .iter()
            .all(|(tp, pos)| *pos >= ends.get(tp).copied().unwrap_or(0))
    };
    let mut printed = 0u64;
    let mut reached_end = false;
    let mut out = std::io::stdout().lock();
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        if args.max_messages.is_some_and(|n| printed >= n) {
            break;
        }
        if !args.follow && caught_up(&consumer) {
            reached_end = true;
            break;
        }
        let event = tokio::select! {
            _ = &mut ctrl_c => break,
            e = consumer.next() => e?,
        };
        match event {
            ConsumerEvent::Record(r) => {
                writeln!(out, "{}", format_record(ctx, &args, &r))?;
                printed += 1;
            }
            ConsumerEvent::Assigned { topic, partitions } => {
                if args.verbose {
                    eprintln!(
                        "{}",
                        membership_line(&consumer, "assigned", &topic, &partitions)
                    );
                }
            }
            ConsumerEvent::Revoked { topic, partitions } => {
                // Printed before the partitions are given up (at the next call): nothing of
                // them is printed after this line.
                if args.verbose {
                    eprintln!(
                        "{}",
                        membership_line(&consumer, "revoked", &topic, &partitions)
                    );
                }
            }
            ConsumerEvent::Lost {
                topic,
                partitions,
                reason,
            } => {
                if args.verbose {
                    let line = membership_line(&consumer, "lost", &topic, &partitions);
                    // Last, and as it is: the broker's message names the group, the member
                    // and the epochs.
                    eprintln!("{line} reason: {reason}");
                }
            }
            ConsumerEvent::Skipped {
                partition,
                from,
                to,
                reason,
                ..
            } => {
                // The broker's reason names the offset and the valid range.
                let reason = if reason.is_empty() {
                    format!("offset {from} is out of range")
                } else {
                    reason
                };
                eprintln!("warning: partition {partition}: {reason}; continuing from offset {to}");
            }
        }
    }
    out.flush()?;
    drop(out);
    if args.group.is_some() {
        consumer.commit().await?;
    }
    // A group member leaves the group, so its partitions move at once.
    consumer.close().await?;
    if reached_end && printed == 0 {
        let start = if let Some(o) = args.offset {
            Start::Offset(o)
        } else if let Some(ms) = args.since {
            Start::Since(ms)
        } else if let (Some(g), false) = (&args.group, args.from_beginning) {
            Start::Group(g)
        } else {
            Start::Beginning
        };
        for topic in consumer_topics(&args) {
            let of_topic: Vec<PartitionSpan> = spans
                .iter()
                .filter(|(t, _)| *t == topic)
                .map(|(_, s)| *s)
                .collect();
            eprintln!("note: {}", why_empty(&topic, start, &of_topic));
        }
    }
    if args.follow && args.max_messages.is_none() && printed == 0 {
        bail!("interrupted before any record arrived");
    }
    Ok(())
}

/// The topics `rill consume` was given, in order.
fn consumer_topics(args: &ConsumeArgs) -> Vec<String> {
    let mut topics = vec![args.topic.clone()];
    topics.extend(args.more_topics.iter().cloned());
    topics
}
