//! The `produce-library` scenario: the `produce` workload (the same records, the same batches)
//! sent through the client library's [`Producer`], which keeps up to `--max-in-flight`
//! batches per partition in flight (idempotent, in order) instead of waiting for each ack.
//! It is a real user's path and its own row: the standard `produce` workload, which waits for
//! each ack, stays the headline figure.

use std::time::Instant;

use anyhow::{bail, Result};
use bytes::Bytes;
use rill_client::{Acks, DeliveryFuture, Producer, ProducerConfig, ProducerRecord};
use rill_proto::v1 as pb;
use tokio::sync::mpsc;

use crate::report::{hist, payload, record, share, Stats};
use crate::scenarios::Run;

/// What the library's producer counts for each record beside its value (see
/// `ProducerConfig::buffer_memory_bytes`): a batch closes after exactly `--batch` records when
/// its byte limit is `batch × (size + this)`.
const RECORD_ACCOUNTING_BYTES: usize = 32;

/// How long a partial batch may wait for more records: far longer than the producer takes to
/// queue one batch's records, so every batch but the last (sent by the final flush) is full.
const LINGER_MS: u64 = 1_000;

/// Acknowledgements the collector may lag behind the sends before a send waits.
const PENDING_ACKS: usize = 100_000;

fn acks(mode: pb::AckMode) -> Acks {
    match mode {
        pb::AckMode::Leader => Acks::Leader,
        pb::AckMode::Durable => Acks::Durable,
        _ => Acks::Quorum,
    }
}

/// P library producers, one connection each, producer i writing partition i mod N; each
/// sends its share of `--messages` records and waits only for the buffer. Latency is per
/// batch: from the send of a batch's last record to its ack, so it includes the wait for an
/// in-flight slot.
pub async fn produce_library(run: &Run, max_in_flight: usize) -> Result<Stats> {
    let batch_bytes = run.batch as usize * (run.size + RECORD_ACCOUNTING_BYTES);
    let config = ProducerConfig::new()
        .acks(acks(run.ack))
        .max_in_flight(max_in_flight)
        .batch_bytes(batch_bytes)
        // Room for the batches in flight and the one being gathered: a send waits once they
        // are full, so the latency measured is a batch's, not a deep queue's.
        .buffer_memory_bytes((max_in_flight.clamp(1, rill_client::MAX_IN_FLIGHT) + 1) * batch_bytes)
        .linger_ms(LINGER_MS);
    let mut producers = Vec::new();
    for _ in 0..run.producers {
        let conn = rill_client::Connection::connect_with(&run.url, &run.options).await?;
        producers.push(Producer::new(conn, config.clone()));
    }
    let data = Bytes::from(payload(run.size));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for (i, producer) in producers.into_iter().enumerate() {
        let run = run.clone();
        let data = data.clone();
        tasks.push(tokio::spawn(async move {
            let n = share(run.messages, run.producers, i as u64);
            let partition = i as u32 % run.partitions;
            let (tx, mut rx) = mpsc::channel::<(Option<Instant>, DeliveryFuture)>(PENDING_ACKS);
            let collector = tokio::spawn(async move {
                let (mut h, mut acked) = (hist(), 0u64);
                while let Some((sent, ack)) = rx.recv().await {
                    ack.await?;
                    acked += 1;
                    if let Some(sent) = sent {
                        record(&mut h, sent.elapsed());
                    }
                }
                anyhow::Ok((h, acked))
            });
            for j in 0..n {
                let ack = producer
                    .send(ProducerRecord::new(run.topic.clone(), data.clone()).partition(partition))
                    .await?;
                let last_of_batch = (j + 1) % run.batch == 0 || j + 1 == n;
                if tx
                    .send((last_of_batch.then(Instant::now), ack))
                    .await
                    .is_err()
                {
                    // The collector stopped on a failed ack: its error is the answer.
                    break;
                }
            }
            drop(tx);
            producer.flush().await?;
            let (h, acked) = collector.await??;
            if acked != n {
                bail!("{acked} records acked for {n} sent");
            }
            Ok(h)
        }));
    }
    let mut h = hist();
    for t in tasks {
        h.add(t.await??)?;
    }
    Ok(Stats {
        scenario: "produce-library",
        msgs: run.messages,
        bytes: run.messages * run.size as u64,
        secs: start.elapsed().as_secs_f64(),
        hist: h,
        note: format!(
            "lat=per batch, last record's send->ack; library Producer, max_in_flight={max_in_flight}, acks={:?}",
            run.ack
        ),
    })
}
