//! `rill-codec-bench`: issue 12's figures against a `rill-broker` process of the same build.
//!
//! - Per codec (none, lz4, zstd) on deterministic JSON log lines: bytes on disk, produce
//!   msg/s with the library `Producer`, and catch-up MB/s of uncompressed payload with the
//!   library `Consumer` (records fetches, which the broker decompresses).
//! - Produce msg/s with the idempotent producer and 5 batches in flight per partition,
//!   against 1 in flight (idempotent and not).
//! - Where compression runs: the `Producer` compressing its own batches (the topic keeps what
//!   came), against the producer sending plain batches to a topic whose `compression` makes
//!   the broker compress them; produce msg/s, and the CPU seconds the broker process and this
//!   (client) process spent on each run.
//!
//! ```sh
//! cargo build --release -p rill-broker -p rill-bench
//! target/release/rill-codec-bench --records 200000
//! ```

use std::time::Instant;

use anyhow::{Context, Result};
use clap::Parser;
use rill_client::{
    Admin, Compression, Connection, Producer, ProducerConfig, ProducerRecord, TopicSettings,
};
use rill_proto::v1 as pb;
use rill_testkit::BrokerProcess;

#[derive(Parser)]
#[command(about = "Compression and idempotence figures (issue 12)")]
struct Args {
    /// Records per run.
    #[arg(long, default_value_t = 200_000)]
    records: u64,
    /// Partitions of each topic.
    #[arg(long, default_value_t = 4)]
    partitions: u32,
}

/// A deterministic JSON log line (xorshift-driven), about 150 bytes.
fn line(rng: &mut u64, i: u64) -> String {
    const LEVELS: [&str; 4] = ["info", "info", "warn", "error"];
    const PATHS: [&str; 5] = [
        "/api/orders",
        "/api/users",
        "/health",
        "/api/cart",
        "/login",
    ];
    *rng ^= *rng << 13;
    *rng ^= *rng >> 7;
    *rng ^= *rng << 17;
    let r = *rng;
    format!(
        r#"{{"ts":"2026-11-30T02:{:02}:{:02}.{:03}Z","level":"{}","path":"{}","status":{},"latency_ms":{},"request_id":"{:016x}","seq":{i}}}"#,
        (i / 60_000) % 60,
        (i / 1000) % 60,
        i % 1000,
        LEVELS[(r % 4) as usize],
        PATHS[((r >> 8) % 5) as usize],
        [200, 200, 201, 404, 500][((r >> 16) % 5) as usize],
        (r >> 24) % 900,
        r >> 3,
    )
}

async fn produce(
    conn: &Connection,
    topic: &str,
    records: u64,
    config: ProducerConfig,
) -> Result<(f64, u64)> {
    let producer = Producer::new(conn.clone(), config);
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut payload = 0u64;
    let start = Instant::now();
    let mut acks = Vec::with_capacity(4096);
    for i in 0..records {
        let value = line(&mut rng, i);
        payload += value.len() as u64;
        acks.push(producer.send(ProducerRecord::new(topic, value)).await?);
        if acks.len() == 4096 {
            for a in acks.drain(..) {
                a.await?;
            }
        }
    }
    for a in acks {
        a.await?;
    }
    Ok((records as f64 / start.elapsed().as_secs_f64(), payload))
}

async fn catch_up(conn: &Connection, topic: &str, partitions: u32, records: u64) -> Result<f64> {
    let start = Instant::now();
    let mut bytes = 0u64;
    let mut seen = 0u64;
    let mut log = conn.log();
    for partition in 0..partitions {
        let mut offset = 0;
        loop {
            let r = log
                .fetch(pb::FetchRequest {
                    topic: topic.into(),
                    partition,
                    offset,
                    max_bytes: 4 << 20,
                    encoding: pb::FetchEncoding::Records as i32,
                    ..Default::default()
                })
                .await?
                .into_inner();
            for rec in &r.records {
                bytes += rec.value.len() as u64;
            }
            seen += r.records.len() as u64;
            offset = r.next_offset;
            if offset >= r.high_watermark || r.records.is_empty() {
                break;
            }
        }
    }
    anyhow::ensure!(seen == records, "read {seen} of {records} records");
    Ok(bytes as f64 / 1e6 / start.elapsed().as_secs_f64())
}

/// CPU seconds (user + system) process `pid` has used, from `/proc/<pid>/stat` (Linux; the
/// fields count USER_HZ ticks, 100 per second on Linux's user-space ABI). `None` elsewhere.
fn cpu_seconds(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces: count fields after its closing parenthesis.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 11 and 12 after the name.
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / 100.0)
}

async fn disk_bytes(admin: &Admin, topic: &str) -> Result<u64> {
    let d = admin.describe_topic(topic).await?;
    Ok(d.partitions.iter().map(|p| p.size_bytes).sum())
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let dir = tempfile::Builder::new().prefix("rill-bench.").tempdir()?;
    let bin = rill_testkit::sibling_binary("rill-broker").context("build rill-broker too")?;
    let broker = BrokerProcess::spawn_binary(&bin, dir.path(), "127.0.0.1:0", &[]).await?;
    let conn = Connection::connect(&broker.addr().to_string()).await?;
    let admin = Admin::new(conn.clone());
    println!(
        "{} records of JSON log lines, {} partitions, leader acks",
        args.records, args.partitions
    );
    println!("codec  bytes_on_disk  ratio  produce_msg_s  catch_up_MB_s (uncompressed)");
    let mut plain = 0u64;
    for (name, codec) in [
        ("none", Compression::None),
        ("lz4", Compression::Lz4),
        ("zstd", Compression::Zstd),
    ] {
        let topic = format!("codec-{name}");
        admin
            .create_topic(&topic, TopicSettings::new().partitions(args.partitions))
            .await?;
        let (rate, _payload) = produce(
            &conn,
            &topic,
            args.records,
            ProducerConfig::new().compression(codec),
        )
        .await?;
        let disk = disk_bytes(&admin, &topic).await?;
        if plain == 0 {
            plain = disk;
        }
        let mbs = catch_up(&conn, &topic, args.partitions, args.records).await?;
        println!(
            "{name:<6} {disk:>13}  {:>5.2}  {rate:>13.0}  {mbs:>13.1}",
            plain as f64 / disk as f64
        );
    }
    println!("producer                      produce_msg_s");
    for (n, (label, config)) in [
        ("idempotent, 5 in flight", ProducerConfig::new()),
        (
            "idempotent, 1 in flight",
            ProducerConfig::new().max_in_flight(1),
        ),
        (
            "not idempotent (1 in flight)",
            ProducerConfig::new().idempotence(false),
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let topic = format!("idem-{n}");
        admin
            .create_topic(&topic, TopicSettings::new().partitions(args.partitions))
            .await?;
        let (rate, _) = produce(&conn, &topic, args.records, config).await?;
        println!("{label:<29} {rate:>13.0}");
    }
    let broker_pid = broker.pid().map(|p| p.to_string()).unwrap_or_default();
    println!("compression  where   produce_msg_s  broker_cpu_s  client_cpu_s");
    for (name, codec) in [("lz4", Compression::Lz4), ("zstd", Compression::Zstd)] {
        for (place, producer_codec, topic_codec) in [
            ("client", codec, None),
            ("broker", Compression::None, Some(name)),
        ] {
            let topic = format!("where-{name}-{place}");
            let mut settings = TopicSettings::new().partitions(args.partitions);
            if let Some(c) = topic_codec {
                settings = settings.compression(c);
            }
            admin.create_topic(&topic, settings).await?;
            let (broker_cpu, client_cpu) = (cpu_seconds(&broker_pid), cpu_seconds("self"));
            let (rate, _) = produce(
                &conn,
                &topic,
                args.records,
                ProducerConfig::new().compression(producer_codec),
            )
            .await?;
            let spent = |before: Option<f64>, pid: &str| match (before, cpu_seconds(pid)) {
                (Some(b), Some(a)) => format!("{:.2}", a - b),
                _ => "n/a".to_string(),
            };
            println!(
                "{name:<12} {place:<7} {rate:>13.0}  {:>12}  {:>12}",
                spent(broker_cpu, &broker_pid),
                spent(client_cpu, "self")
            );
        }
    }
    broker.stop().await?;
    Ok(())
}
