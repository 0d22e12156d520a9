//! Reading a subscription's records from its topic's log: new ones from an offset, and
//! given offsets again (redeliveries, dead letters). Blocking (page-ins, first-read checks):
//! call these on the blocking pool.

use rill_proto::v1::{FetchedRecord, Header};
use rill_storage::batch;
use rill_storage::PartitionLog;

use crate::error::BrokerError;

/// The bytes of a record that count against a byte budget: key and value.
pub fn record_bytes(r: &FetchedRecord) -> usize {
    r.value.len() + r.key.as_ref().map_or(0, |k| k.len())
}

/// Up to `max_records` records from `from` on, stopping before the record that would take
/// the total past `max_bytes` (the first record is always returned, so a large record is
/// never stuck).
pub fn read_from(
    log: &PartitionLog,
    from: u64,
    max_records: usize,
    max_bytes: usize,
) -> Result<Vec<FetchedRecord>, BrokerError> {
    let mut out = Vec::new();
    let mut bytes = 0usize;
    let mut offset = from.max(log.log_start_offset());
    while out.len() < max_records && offset < log.high_watermark() {
        let before = offset;
        let read = log.read(offset, max_bytes.clamp(1, 4 << 20))?;
        if read.chunks.is_empty() {
            break;
        }
        for chunk in &read.chunks {
            for view in batch::batches(chunk) {
                // Stored batches were checked on append and by the read path; a failure here
                // ends the read at the last good record.
                let Ok(view) = view else { return Ok(out) };
                for record in view.records() {
                    let Ok(record) = record else { return Ok(out) };
                    if record.offset < offset {
                        continue;
                    }
                    let r = FetchedRecord {
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
                    };
                    let size = record_bytes(&r);
                    if out.len() >= max_records || (!out.is_empty() && bytes + size > max_bytes) {
                        return Ok(out);
                    }
                    bytes += size;
                    offset = record.offset + 1;
                    out.push(r);
                }
            }
        }
        let advanced = offset.max(read.next_offset);
        if advanced == before {
            break;
        }
        offset = advanced;
    }
    Ok(out)
}

/// The records at `offsets` (sorted, ascending) that the log still holds.
pub fn read_at(log: &PartitionLog, offsets: &[u64]) -> Result<Vec<FetchedRecord>, BrokerError> {
    let mut out = Vec::with_capacity(offsets.len());
    let mut i = 0;
    while i < offsets.len() {
        let o = offsets[i];
        if o < log.log_start_offset() || o >= log.high_watermark() {
            i += 1;
            continue;
        }
        // One read covers the batch holding `o` and often the next wanted ones.
        let got = read_from(log, o, usize::MAX, 64 << 10)?;
        take_wanted(offsets, &mut i, got, &mut out);
    }
    Ok(out)
}

/// Moves the records of `got` (a read from `offsets[*i]` on, in offset order) whose offsets
/// are wanted into `out`, and `*i` past every wanted offset the read covered (past
/// `offsets[*i]` alone when it returned nothing), so the caller reads on from the next one.
pub(crate) fn take_wanted(
    offsets: &[u64],
    i: &mut usize,
    got: Vec<FetchedRecord>,
    out: &mut Vec<FetchedRecord>,
) {
    let Some(last) = got.last().map(|r| r.offset) else {
        *i += 1;
        return;
    };
    let mut got = got.into_iter().peekable();
    while *i < offsets.len() && offsets[*i] <= last {
        while got.peek().is_some_and(|r| r.offset < offsets[*i]) {
            got.next();
        }
        if let Some(r) = got.peek().filter(|r| r.offset == offsets[*i]) {
            out.push(r.clone());
        }
        *i += 1;
    }
}
