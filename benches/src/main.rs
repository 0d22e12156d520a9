//! `rill-bench`: Rill's load generator. It runs the workloads of `docs/ARCHITECTURE.md`,
//! "Benchmark workloads" (produce, catchup, e2e) with the same flags and output columns as the
//! optional peers harness that `benches/compare.sh` runs, so Rill's lines sit under Redis's
//! and NATS's. By default it starts its own broker (the
//! `rill-broker` binary beside it) on a temp folder and removes it afterwards; `--broker ADDR`
//! uses a running one.

mod broker;
mod library;
mod push;
mod report;
mod scenarios;
mod secure;

use std::time::Duration;

use anyhow::{bail, Result};
use clap::Parser;
use rill_proto::v1 as pb;

use crate::report::{Shape, HEADER};
use crate::scenarios::Run;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Flags: the peers harness's, then Rill's own.
#[derive(Parser, Debug)]
#[command(
    name = "rill-bench",
    version,
    about = "Rill load generator (produce, catchup, e2e)"
)]
struct Flags {
    /// Total messages for produce (split over producers) and catch-up.
    #[arg(long, default_value_t = 1_000_000)]
    messages: u64,
    /// Payload size in bytes (at least 8: e2e stamps the send time in the first 8).
    #[arg(long, default_value_t = 1024)]
    size: usize,
    /// Messages per acknowledged produce batch.
    #[arg(long, default_value_t = 100)]
    batch: u64,
    /// Concurrent producers (one connection each).
    #[arg(long, default_value_t = 1)]
    producers: u64,
    /// Independent catch-up readers, each reading all messages.
    #[arg(long, default_value_t = 1)]
    consumers: u64,
    /// Messages per catch-up read.
    #[arg(long, default_value_t = 1000)]
    fetch: u64,
    /// Messages sent in the e2e scenario.
    #[arg(long, default_value_t = 20_000)]
    e2e_messages: u64,
    /// Send rate of the e2e scenario, messages per second.
    #[arg(long, default_value_t = 5_000)]
    e2e_rate: u64,
    /// Upper bound for each scenario, in seconds.
    #[arg(long, default_value_t = 300)]
    timeout: u64,
    /// Scenarios to run, comma separated: produce, catchup, e2e, produce-library (the
    /// produce workload through the client library's pipelining Producer), and push,
    /// push-queue, webhook, webhook-e2e (issue 13's push delivery).
    #[arg(long, value_delimiter = ',', default_value = "produce,catchup,e2e")]
    scenarios: Vec<String>,
    /// Print the column header first.
    #[arg(long)]
    header: bool,
    /// Partitions of the benchmark topic (producer i writes partition i mod N).
    #[arg(long, default_value_t = 1)]
    partitions: u32,
    /// Produce ack mode: leader, quorum or durable (quorum is leader with replication factor 1).
    #[arg(long, default_value = "leader")]
    acks: String,
    /// Flush policy of the benchmark topic: always, interval:MS or never.
    #[arg(long, default_value = "interval:1000")]
    flush: String,
    /// Produce encoding: batch (pre-encoded, the Rust client's fast path) or records.
    #[arg(long, default_value = "batch")]
    encoding: String,
    /// Produce calls: stream (one ProduceStream per producer, each batch acked before the
    /// next is sent) or unary (one Produce call per batch).
    #[arg(long, default_value = "stream")]
    call: String,
    /// Batches per partition the `produce-library` scenario's Producer keeps in flight
    /// (1 to 5).
    #[arg(long, default_value_t = rill_client::MAX_IN_FLIGHT)]
    max_in_flight: usize,
    /// Records per webhook POST in the webhook scenarios (the subscription's
    /// max_batch_records).
    #[arg(long, default_value_t = 1)]
    webhook_batch: u32,
    /// Use a running broker at this address instead of starting one.
    #[arg(long)]
    broker: Option<String>,
    /// An extra flag for the broker this run starts (repeatable), e.g.
    /// `--broker-arg=--metrics-listen=127.0.0.1:9464`.
    #[arg(
        long = "broker-arg",
        allow_hyphen_values = true,
        conflicts_with = "broker"
    )]
    broker_args: Vec<String>,
    /// Catch-up only: read the topic a previous run left on `--broker`, without recreating
    /// or loading it (for profiling the fetch path alone).
    #[arg(long, requires = "broker")]
    reuse_topic: bool,
    /// Run the broker this run starts with TLS (a certificate made for the run) and token
    /// authentication, and every client as a principal whose ACLs allow the benchmark topics,
    /// to measure what security costs.
    #[arg(long, conflicts_with = "broker")]
    secure: bool,
    /// Replication factor of the benchmark topics (a cluster: `--broker` is any of its
    /// brokers; the produce, catchup and e2e scenarios then talk to the leader of each
    /// topic's partition 0, found with the `Metadata` RPC).
    #[arg(long, requires = "broker")]
    replication_factor: Option<u32>,
}

fn flush_policy(s: &str) -> Result<pb::FlushPolicy> {
    use pb::flush_policy::Policy;
    let policy = match s {
        "always" => Policy::Always(pb::Always {}),
        "never" => Policy::Never(pb::Never {}),
        other => match other
            .strip_prefix("interval:")
            .and_then(|ms| ms.parse().ok())
        {
            Some(ms) => Policy::IntervalMs(ms),
            None => bail!("--flush must be always, never or interval:MS"),
        },
    };
    Ok(pb::FlushPolicy {
        policy: Some(policy),
    })
}

async fn create_topic(
    url: &str,
    options: &rill_client::ConnectOptions,
    name: &str,
    partitions: u32,
    flush: &pb::FlushPolicy,
    replication_factor: Option<u32>,
) -> Result<()> {
    let mut admin = rill_client::Connection::connect_with(url, options)
        .await?
        .admin();
    let _ = admin
        .delete_topic(pb::DeleteTopicRequest { name: name.into() })
        .await;
    admin
        .create_topic(pb::CreateTopicRequest {
            name: name.into(),
            config: Some(pb::TopicConfig {
                partitions,
                flush: Some(*flush),
                retention_ms: Some(-1),
                ..Default::default()
            }),
            replication_factor,
        })
        .await?;
    Ok(())
}

/// The URL of the broker that leads partition 0 of `topic`, asked of the broker at `url`
/// until an election has named one (at most 10 s).
async fn leader_url(
    url: &str,
    options: &rill_client::ConnectOptions,
    topic: &str,
) -> Result<String> {
    let mut cluster = rill_client::Connection::connect_with(url, options)
        .await?
        .cluster();
    let scheme = url.split_once("://").map_or("http", |(s, _)| s);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let md = cluster
            .metadata(pb::MetadataRequest {
                topics: vec![topic.to_string()],
            })
            .await?
            .into_inner();
        let leader = md
            .topics
            .iter()
            .flat_map(|t| &t.partitions)
            .find(|p| p.partition == 0 && !p.leader_address.is_empty());
        if let Some(p) = leader {
            return Ok(format!("{scheme}://{}", p.leader_address));
        }
        if std::time::Instant::now() > deadline {
            bail!("no leader of topic {topic} partition 0 within 10 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn bounded<F>(flags: &Flags, shape: &Shape, scenario: &str, f: F)
where
    F: std::future::Future<Output = Result<report::Stats>>,
{
    eprintln!("[rill] {scenario} ...");
    match tokio::time::timeout(Duration::from_secs(flags.timeout), f).await {
        Ok(Ok(stats)) => stats.print(shape),
        Ok(Err(e)) => println!("{:<8} {scenario:<9} ERROR {e:#}", "rill"),
        Err(_) => println!(
            "{:<8} {scenario:<9} TIMEOUT after {} s",
            "rill", flags.timeout
        ),
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let flags = Flags::parse();
    if flags.size < 8
        || flags.batch == 0
        || flags.producers == 0
        || flags.consumers == 0
        || flags.e2e_rate == 0
        || flags.partitions == 0
    {
        bail!("need --size >= 8 and non-zero --batch, --producers, --consumers, --e2e-rate, --partitions");
    }
    let ack = match flags.acks.as_str() {
        "leader" => pb::AckMode::Leader,
        "durable" => pb::AckMode::Durable,
        "quorum" => pb::AckMode::Quorum,
        _ => bail!("--acks must be leader, quorum or durable"),
    };
    let raw_batches = match flags.encoding.as_str() {
        "batch" => true,
        "records" => false,
        _ => bail!("--encoding must be batch or records"),
    };
    let stream = match flags.call.as_str() {
        "stream" => true,
        "unary" => false,
        _ => bail!("--call must be stream or unary"),
    };
    let flush = flush_policy(&flags.flush)?;
    report::now_ns();
    let secure = match flags.secure {
        true => Some(secure::Secure::new()?),
        false => None,
    };
    let own = match (&flags.broker, &secure) {
        (Some(_), _) => None,
        (None, Some(s)) => {
            let mut args = s.broker_args();
            args.extend(flags.broker_args.iter().cloned());
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            Some(broker::OwnBroker::start(&args).await?)
        }
        (None, None) => {
            let extra: Vec<&str> = flags.broker_args.iter().map(String::as_str).collect();
            Some(broker::OwnBroker::start(&extra).await?)
        }
    };
    let scheme = if secure.is_some() { "https" } else { "http" };
    let url = match (&flags.broker, &own) {
        (Some(addr), _) if addr.starts_with("http") => addr.clone(),
        (Some(addr), _) => format!("http://{addr}"),
        (None, Some(b)) => format!("{scheme}://{}", b.addr()),
        (None, None) => unreachable!("a broker was started when none was given"),
    };
    let options = match &secure {
        Some(s) => s.client_options(&url).await?,
        None => rill_client::ConnectOptions::new(),
    };
    if flags.header {
        println!("{HEADER}");
    }
    let shape = Shape {
        size: flags.size,
        batch: flags.batch,
        producers: flags.producers,
        consumers: flags.consumers,
    };
    let mut run = Run {
        url: url.clone(),
        topic: "rill-bench".into(),
        partitions: flags.partitions,
        messages: flags.messages,
        size: flags.size,
        batch: flags.batch,
        producers: flags.producers,
        consumers: flags.consumers,
        fetch: flags.fetch,
        e2e_messages: flags.e2e_messages,
        e2e_rate: flags.e2e_rate,
        ack,
        raw_batches,
        stream,
        options: options.clone(),
    };
    let wants = |s: &str| flags.scenarios.iter().any(|x| x == s);
    if (wants("produce") || wants("produce-library") || wants("catchup")) && !flags.reuse_topic {
        create_topic(
            &url,
            &options,
            &run.topic,
            run.partitions,
            &flush,
            flags.replication_factor,
        )
        .await?;
    }
    let main_topic = wants("produce") || wants("produce-library") || wants("catchup");
    if flags.replication_factor.is_some() && main_topic && !flags.reuse_topic {
        run.url = leader_url(&url, &options, &run.topic).await?;
    }
    if wants("produce") {
        bounded(&flags, &shape, "produce", scenarios::produce(&run)).await;
    } else if wants("catchup") && !flags.reuse_topic && !wants("produce-library") {
        // Catch-up needs data: load it untimed.
        scenarios::produce(&run).await?;
    }
    if wants("produce-library") {
        bounded(
            &flags,
            &shape,
            "produce-library",
            library::produce_library(&run, flags.max_in_flight),
        )
        .await;
    }
    if wants("catchup") {
        bounded(&flags, &shape, "catchup", scenarios::catchup(&run)).await;
    }
    if wants("e2e") {
        create_topic(
            &url,
            &options,
            "rill-bench-e2e",
            1,
            &flush,
            flags.replication_factor,
        )
        .await?;
        let mut e2e_run = run.clone();
        if flags.replication_factor.is_some() {
            e2e_run.url = leader_url(&url, &options, "rill-bench-e2e").await?;
        }
        bounded(
            &flags,
            &shape,
            "e2e",
            scenarios::e2e(&e2e_run, "rill-bench-e2e"),
        )
        .await;
    }
    for (scenario, topic) in [
        ("push", "rill-bench-push"),
        ("push-queue", "rill-bench-push-q"),
        ("webhook", "rill-bench-hook"),
        ("webhook-e2e", "rill-bench-hook-e2e"),
    ] {
        if !wants(scenario) {
            continue;
        }
        create_topic(&url, &options, topic, 1, &flush, flags.replication_factor).await?;
        let batch = flags.webhook_batch;
        match scenario {
            "push" => bounded(&flags, &shape, scenario, push::push(&run, topic, false)).await,
            "push-queue" => bounded(&flags, &shape, scenario, push::push(&run, topic, true)).await,
            "webhook" => bounded(&flags, &shape, scenario, push::webhook(&run, topic, batch)).await,
            _ => {
                bounded(
                    &flags,
                    &shape,
                    scenario,
                    push::webhook_e2e(&run, topic, batch),
                )
                .await
            }
        }
    }
    if let Some(b) = own {
        b.stop().await?;
    }
    Ok(())
}
