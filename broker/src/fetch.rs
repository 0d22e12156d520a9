//! The long-poll Fetch and ListOffsets.
//!
//! A fetch reads at once; if fewer than `min_bytes` came back it waits for the partition's
//! next append (woken by the append itself through a `watch` channel), for its deadline, or
//! for shutdown, whichever comes first, then reads again. The deadline is the smaller of the
//! request's `max_wait_ms`, the server's cap, and the client's own gRPC deadline minus a
//! margin, so the response always arrives before the client gives up. If the client goes
//! away, tonic drops this future and the wait ends with it.
//!
//! Reads of data the storage calls hot (appended or already read by this process) run
//! inline; others (the first read of data found on disk at start, with its checksum check and
//! its page-ins) run on the blocking pool.

use std::time::Duration;

use rill_proto::v1::{FetchEncoding, FetchRequest, FetchResponse, FetchedRecord, Header};
use rill_storage::batch;
use rill_storage::{PartitionLog, ReadResult};
use tokio::time::Instant;

use crate::error::BrokerError;
use crate::state::Broker;

/// Fetches never return more than this many records, whatever they ask.
const MAX_RECORDS_PER_FETCH: usize = 1_000_000;

/// Parses a `grpc-timeout` header value (`<digits><unit>`, unit one of `HMSmun`).
pub fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// How long this fetch may wait: the request's wish, capped by the server, and ended early
/// enough (a tenth of the client's deadline, at least 20 ms) that the answer beats the
/// client's own timeout.
pub fn wait_budget(
    max_wait_ms: u32,
    server_cap_ms: u64,
    client_timeout: Option<Duration>,
) -> Duration {
    let mut wait = Duration::from_millis(u64::from(max_wait_ms).min(server_cap_ms));
    if let Some(timeout) = client_timeout {
        let margin = (timeout / 10).max(Duration::from_millis(20));
        wait = wait.min(timeout.saturating_sub(margin));
    }
    wait
}

/// Serves one fetch, waiting as the request allows.
pub async fn fetch(
    broker: &Broker,
    req: FetchRequest,
    client_timeout: Option<Duration>,
) -> Result<FetchResponse, BrokerError> {
    broker.check_running()?;
    let topic = broker.topic(&req.topic)?;
    if let Some(replication) = broker.replication() {
        // A broker without a replica of a replicated partition has only an empty copy.
        replication.check_readable(&req.topic, req.partition)?;
    }
    let log = topic.log(req.partition)?;
    let max_bytes = match req.max_bytes {
        0 => broker.config().max_fetch_bytes,
        n => (n as usize).min(broker.config().max_fetch_bytes),
    };
    let min_bytes = req.min_bytes.max(1) as usize;
    let max_records = match req.max_records {
        0 => MAX_RECORDS_PER_FETCH,
        n => (n as usize).min(MAX_RECORDS_PER_FETCH),
    };
    let raw = req.encoding() == FetchEncoding::RawBatches;
    let deadline = Instant::now()
        + wait_budget(
            req.max_wait_ms,
            broker.config().max_fetch_wait_ms,
            client_timeout,
        );

    let mut read = read_log(&log, req.offset, max_bytes).await?;
    if read.size_bytes() < min_bytes && Instant::now() < deadline {
        let _slot = broker.waiter_slot()?;
        let Some(mut changes) = topic.subscribe(req.partition) else {
            return Err(BrokerError::Internal("partition without a watch".into()));
        };
        loop {
            // Mark the current value seen, then re-read, so an append between the first
            // read and this point is not missed.
            changes.borrow_and_update();
            read = read_log(&log, req.offset, max_bytes).await?;
            if read.size_bytes() >= min_bytes {
                break;
            }
            tokio::select! {
                _ = broker.shutdown().cancelled() => break,
                _ = tokio::time::sleep_until(deadline) => {
                    read = read_log(&log, req.offset, max_bytes).await?;
                    break;
                }
                changed = changes.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    // The topic may have been deleted meanwhile.
                    if !std::sync::Arc::ptr_eq(&broker.topic(&req.topic)?, &topic) {
                        return Err(rill_storage::StorageError::TopicNotFound {
                            topic: req.topic.clone(),
                        }
                        .into());
                    }
                }
            }
        }
    }
    let read_bytes = read.size_bytes() as u64;
    let resp = build_response(&req, read, max_records, raw);
    let records = resp.next_offset.saturating_sub(req.offset);
    topic.counters.fetched(records, read_bytes);
    Ok(resp)
}

/// Reads inline when the storage says the data is hot ([`PartitionLog::is_hot`]), else on
/// the blocking pool, so page-ins of cold data and first-read checksum checks never run on
/// an async worker.
async fn read_log(
    log: &PartitionLog,
    offset: u64,
    max_bytes: usize,
) -> Result<ReadResult, BrokerError> {
    if log.is_hot(offset, max_bytes) {
        return Ok(log.read(offset, max_bytes)?);
    }
    let log = log.clone();
    Ok(tokio::task::spawn_blocking(move || log.read(offset, max_bytes)).await??)
}

/// Turns stored batches into the response: raw batches as they are (trimmed to whole batches
/// within `max_records`), or decoded records from `req.offset` on, sharing the stored bytes.
fn build_response(
    req: &FetchRequest,
    read: ReadResult,
    max_records: usize,
    raw: bool,
) -> FetchResponse {
    let mut resp = FetchResponse {
        topic: req.topic.clone(),
        partition: req.partition,
        high_watermark: read.high_watermark,
        log_start_offset: read.log_start_offset,
        next_offset: req.offset,
        ..FetchResponse::default()
    };
    let mut count = 0usize;
    'chunks: for chunk in &read.chunks {
        let mut batch_start = 0usize;
        for view in batch::batches(chunk) {
            // Stored batches were checked on append and by the read path; a failure here
            // ends the response at the last good record.
            let Ok(view) = view else { break 'chunks };
            let header = *view.header();
            let len = header.total_len();
            if raw {
                let records_after = header
                    .next_offset()
                    .saturating_sub(req.offset.max(header.base_offset))
                    as usize;
                if count > 0 && count + records_after > max_records {
                    break 'chunks;
                }
                count += records_after;
                resp.batches
                    .push(chunk.slice(batch_start..batch_start + len));
                resp.next_offset = header.next_offset();
            } else {
                // A compressed batch's records are read from its plain form (it was bounded
                // at append); a plain batch is read in place.
                let plain =
                    match batch::decompress(view.as_bytes(), batch::MAX_DECOMPRESSED_BATCH_BYTES) {
                        Ok(std::borrow::Cow::Owned(b)) => Some(bytes::Bytes::from(b)),
                        Ok(std::borrow::Cow::Borrowed(_)) => None,
                        Err(_) => break 'chunks,
                    };
                let (chunk, view) = match &plain {
                    Some(b) => match batch::BatchView::parse(b) {
                        Ok(v) => (b, v),
                        Err(_) => break 'chunks,
                    },
                    None => (chunk, view),
                };
                for record in view.records() {
                    let Ok(record) = record else { break 'chunks };
                    if record.offset < req.offset {
                        continue;
                    }
                    if count >= max_records {
                        break 'chunks;
                    }
                    count += 1;
                    resp.next_offset = record.offset + 1;
                    resp.records.push(FetchedRecord {
                        offset: record.offset,
                        timestamp_ms: record.timestamp_ms,
                        key: record.key.map(|k| chunk.slice_ref(k)),
                        value: chunk.slice_ref(record.value),
                        headers: record
                            .headers()
                            .flatten()
                            .map(|(k, v)| Header {
                                key: k.to_string(),
                                value: chunk.slice_ref(v),
                            })
                            .collect(),
                    });
                }
            }
            batch_start += len;
            if count >= max_records {
                break 'chunks;
            }
        }
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse() {
        assert_eq!(parse_grpc_timeout("100m"), Some(Duration::from_millis(100)));
        assert_eq!(parse_grpc_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("m"), None);
        assert_eq!(parse_grpc_timeout("12x"), None);
        assert_eq!(parse_grpc_timeout(""), None);
    }

    #[test]
    fn the_wait_ends_before_the_client_deadline() {
        assert_eq!(wait_budget(500, 30_000, None), Duration::from_millis(500));
        assert_eq!(wait_budget(60_000, 30_000, None), Duration::from_secs(30));
        let w = wait_budget(5_000, 30_000, Some(Duration::from_secs(1)));
        assert!(
            w < Duration::from_secs(1) && w >= Duration::from_millis(800),
            "{w:?}"
        );
        assert_eq!(
            wait_budget(1000, 30_000, Some(Duration::from_millis(3))),
            Duration::ZERO
        );
    }
}
