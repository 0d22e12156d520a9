//! The three workloads of `docs/ARCHITECTURE.md`, "Benchmark workloads", against a Rill
//! broker: produce, catchup and e2e.
//!
//! The client side uses the wire contract's fast paths, as the Rust client does: produce sends
//! one pre-encoded batch per request (`--encoding batch`, the default; `records` sends
//! protobuf records instead), and catch-up reads raw stored batches.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::{Bytes, BytesMut};
use rill_client::connection::Transport;
use rill_proto::v1::{self as pb, log_client::LogClient, produce_request::Payload};
use rill_storage::batch::{self, BatchBuilder};

use crate::report::{hist, now_ns, pace, payload, record, share, Stats};

/// Everything a scenario needs to know.
#[derive(Clone, Debug)]
pub struct Run {
    /// `http://ADDR`.
    pub url: String,
    /// The topic.
    pub topic: String,
    /// Its partitions.
    pub partitions: u32,
    /// Total messages.
    pub messages: u64,
    /// Payload size.
    pub size: usize,
    /// Messages per batch.
    pub batch: u64,
    /// Producers.
    pub producers: u64,
    /// Catch-up readers.
    pub consumers: u64,
    /// Messages per catch-up read.
    pub fetch: u64,
    /// Messages in e2e.
    pub e2e_messages: u64,
    /// Send rate in e2e.
    pub e2e_rate: u64,
    /// Ack mode.
    pub ack: pb::AckMode,
    /// Send pre-encoded batches (true) or protobuf records.
    pub raw_batches: bool,
    /// Produce on one ProduceStream per producer (true) or with unary calls.
    pub stream: bool,
    /// TLS and token settings of every connection (`--secure`).
    pub options: rill_client::ConnectOptions,
}

/// A Log client on a connection made by the client library (TCP_NODELAY, 1 MiB HTTP/2
/// frames, large windows), with the message limit raised for big fetches.
pub async fn connect(
    url: &str,
    options: &rill_client::ConnectOptions,
) -> Result<LogClient<Transport>> {
    let conn = rill_client::Connection::connect_with(url, options)
        .await
        .with_context(|| format!("connecting to {url}"))?;
    Ok(conn
        .log()
        .max_decoding_message_size(256 << 20)
        .max_encoding_message_size(256 << 20))
}

fn encode(values: &[Bytes], first_ts: i64) -> Bytes {
    let mut b = BatchBuilder::new(BytesMut::with_capacity(
        values.iter().map(|v| v.len() + 32).sum::<usize>() + 64,
    ));
    for v in values {
        b.push(None, v, &[], first_ts);
    }
    b.finish()
}

/// One produce request of `values` to `run.topic`'s `partition`, in the run's encoding.
pub fn request(run: &Run, partition: u32, values: &[Bytes]) -> pb::ProduceRequest {
    let payload = if run.raw_batches {
        Payload::Batch(encode(values, rill_storage::log::now_ms()))
    } else {
        Payload::Records(pb::RecordList {
            records: values
                .iter()
                .map(|v| pb::Record {
                    value: v.clone(),
                    ..Default::default()
                })
                .collect(),
        })
    };
    pb::ProduceRequest {
        topic: run.topic.clone(),
        partition: Some(partition),
        ack: run.ack as i32,
        payload: Some(payload),
        ..Default::default()
    }
}

/// P producers, each on its own connection, each waiting for a batch's ack before the next.
pub async fn produce(run: &Run) -> Result<Stats> {
    let mut clients = Vec::new();
    for _ in 0..run.producers {
        clients.push(connect(&run.url, &run.options).await?);
    }
    let data = Bytes::from(payload(run.size));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for (i, mut client) in clients.into_iter().enumerate() {
        let run = run.clone();
        let data = data.clone();
        tasks.push(tokio::spawn(async move {
            let n = share(run.messages, run.producers, i as u64);
            let partition = i as u32 % run.partitions;
            let mut h = hist();
            let mut sent = 0;
            // On a stream, each batch is one DATA frame each way instead of a new HTTP/2
            // call; the producer still waits for each ack before sending the next batch.
            let (tx, rx) = tokio::sync::mpsc::channel::<pb::ProduceStreamRequest>(1);
            let mut acks = if run.stream {
                Some(
                    client
                        .produce_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
                        .await?
                        .into_inner(),
                )
            } else {
                None
            };
            let mut sequence = 0u64;
            while sent < n {
                let k = run.batch.min(n - sent);
                let values: Vec<Bytes> = (0..k).map(|_| data.clone()).collect();
                let t = Instant::now();
                let resp = match acks.as_mut() {
                    Some(acks) => {
                        sequence += 1;
                        tx.send(pb::ProduceStreamRequest {
                            sequence,
                            request: Some(request(&run, partition, &values)),
                        })
                        .await?;
                        let ack = acks
                            .message()
                            .await?
                            .ok_or_else(|| anyhow::anyhow!("the produce stream ended"))?;
                        if let Some(code) = ack.error_code {
                            bail!("produce failed ({code}): {}", ack.error_message);
                        }
                        ack.response.unwrap_or_default()
                    }
                    None => client
                        .produce(request(&run, partition, &values))
                        .await?
                        .into_inner(),
                };
                record(&mut h, t.elapsed());
                let written: u32 = resp.appends.iter().map(|a| a.record_count).sum();
                if u64::from(written) != k {
                    bail!("{written} records acked for {k} sent");
                }
                sent += k;
            }
            Ok(h)
        }));
    }
    let mut h = hist();
    for t in tasks {
        h.add(t.await??)?;
    }
    let secs = start.elapsed().as_secs_f64();
    Ok(Stats {
        scenario: "produce",
        msgs: run.messages,
        bytes: run.messages * run.size as u64,
        secs,
        hist: h,
        note: format!(
            "lat=per-batch ack; acks={:?} encoding={} call={}",
            run.ack,
            if run.raw_batches { "batch" } else { "records" },
            if run.stream { "stream" } else { "unary" }
        ),
    })
}

/// Fetches kept in flight per reader: the reader knows how many records each fetch returns
/// (`--fetch` of them, whole batches), so it can ask for the next ranges before the current
/// answer arrives, as the Rust consumer prefetches.
const CATCHUP_DEPTH: usize = 4;

/// One fetch of `count` records from `offset`, as raw batches; returns the answer and its
/// latency.
async fn fetch_range(
    mut client: LogClient<Transport>,
    topic: String,
    partition: u32,
    offset: u64,
    count: u64,
    max_bytes: u32,
) -> Result<(pb::FetchResponse, Duration)> {
    let t = Instant::now();
    let resp = client
        .fetch(pb::FetchRequest {
            topic,
            partition,
            offset,
            max_bytes,
            max_records: count as u32,
            encoding: pb::FetchEncoding::RawBatches as i32,
            ..Default::default()
        })
        .await?
        .into_inner();
    Ok((resp, t.elapsed()))
}

/// One reader per consumer reads every partition from offset 0 to its high watermark with
/// pipelined raw-batch fetches of `--fetch` records, decoding every record it counts.
pub async fn catchup(run: &Run) -> Result<Stats> {
    let max_bytes = ((run.fetch as usize + run.batch as usize)
        * (run.size + batch::RECORD_OVERHEAD)
        + batch::HEADER_LEN * 64)
        .min(64 << 20) as u32;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..run.consumers {
        let mut client = connect(&run.url, &run.options).await?;
        let run = run.clone();
        tasks.push(tokio::spawn(async move {
            let (mut h, mut msgs, mut bytes) = (hist(), 0u64, 0u64);
            for partition in 0..run.partitions {
                let end = client
                    .list_offsets(pb::ListOffsetsRequest {
                        topic: run.topic.clone(),
                        partition,
                        spec: Some(pb::list_offsets_request::Spec::Position(
                            pb::OffsetSpec::Latest as i32,
                        )),
                    })
                    .await?
                    .into_inner()
                    .offset;
                let (mut expected, mut next_request) = (0u64, 0u64);
                let mut in_flight = std::collections::VecDeque::new();
                while expected < end {
                    while in_flight.len() < CATCHUP_DEPTH && next_request < end {
                        in_flight.push_back((
                            next_request,
                            tokio::spawn(fetch_range(
                                client.clone(),
                                run.topic.clone(),
                                partition,
                                next_request,
                                run.fetch,
                                max_bytes,
                            )),
                        ));
                        next_request += run.fetch;
                    }
                    let Some((asked, task)) = in_flight.pop_front() else {
                        break;
                    };
                    let (resp, latency) = task.await??;
                    record(&mut h, latency);
                    if asked != expected {
                        // A speculative range that no longer lines up: drop it and ask again.
                        in_flight.clear();
                        next_request = expected;
                        continue;
                    }
                    for b in &resp.batches {
                        for view in batch::batches(b) {
                            for r in view?.records() {
                                let r = r?;
                                if r.offset >= expected {
                                    msgs += 1;
                                    bytes += r.value.len() as u64;
                                }
                            }
                        }
                    }
                    if resp.next_offset <= expected {
                        bail!("no progress at offset {expected} of partition {partition}");
                    }
                    expected = resp.next_offset;
                    if expected != asked + run.fetch {
                        in_flight.clear();
                        next_request = expected;
                    }
                }
            }
            anyhow::Ok((msgs, bytes, h))
        }));
    }
    let (mut h, mut msgs, mut bytes) = (hist(), 0, 0);
    for t in tasks {
        let (m, b, th) = t.await??;
        msgs += m;
        bytes += b;
        h.add(th)?;
    }
    Ok(Stats {
        scenario: "catchup",
        msgs,
        bytes,
        secs: start.elapsed().as_secs_f64(),
        hist: h,
        note: format!(
            "lat=per fetch of {} msgs (raw batches, {CATCHUP_DEPTH} in flight)",
            run.fetch
        ),
    })
}

/// One paced producer (one message per produce, stamped just before sending) and one consumer
/// tailing with long-poll fetches; latency is send to receive.
pub async fn e2e(run: &Run, topic: &str) -> Result<Stats> {
    let (n, rate, size) = (run.e2e_messages, run.e2e_rate, run.size.max(8));
    let mut consumer_client = connect(&run.url, &run.options).await?;
    let topic_c = topic.to_string();
    let start = Instant::now();
    let consumer = tokio::spawn(async move {
        let (mut h, mut got, mut bytes, mut offset) = (hist(), 0u64, 0u64, 0u64);
        let deadline = Instant::now() + Duration::from_secs(n / rate.max(1) + 30);
        while got < n && Instant::now() < deadline {
            let resp = consumer_client
                .fetch(pb::FetchRequest {
                    topic: topic_c.clone(),
                    partition: 0,
                    offset,
                    max_wait_ms: 1000,
                    max_bytes: 1 << 20,
                    ..Default::default()
                })
                .await?
                .into_inner();
            let now = now_ns();
            for r in &resp.records {
                let stamp = u64::from_le_bytes(r.value[..8].try_into()?);
                h.saturating_record((now.saturating_sub(stamp) / 1000).max(1));
                got += 1;
                bytes += r.value.len() as u64;
            }
            offset = resp.next_offset;
        }
        anyhow::Ok((got, bytes, h))
    });
    let url = run.url.clone();
    let options = run.options.clone();
    let mut run1 = run.clone();
    run1.topic = topic.to_string();
    // The paced producer gets its own thread and runtime, so pacing sleeps block nothing else.
    let producer = std::thread::spawn(move || -> Result<f64> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async move {
            let mut client = connect(&url, &options).await?;
            let mut buf = payload(size);
            let t0 = Instant::now();
            for i in 0..n {
                pace(t0, i, rate);
                buf[..8].copy_from_slice(&now_ns().to_le_bytes());
                let value = Bytes::copy_from_slice(&buf);
                client.produce(request(&run1, 0, &[value])).await?;
            }
            Ok(n as f64 / t0.elapsed().as_secs_f64())
        })
    });
    let (got, bytes, h) = consumer.await??;
    let secs = start.elapsed().as_secs_f64();
    let sent_rate = tokio::task::spawn_blocking(move || producer.join())
        .await?
        .map_err(|_| anyhow::anyhow!("the e2e producer panicked"))??;
    Ok(Stats {
        scenario: "e2e",
        msgs: got,
        bytes,
        secs,
        hist: h,
        note: format!(
            "lat=send->recv (long-poll); target {rate}/s, sent at {sent_rate:.0}/s, recv {got}/{n}"
        ),
    })
}
