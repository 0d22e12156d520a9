//! The record-batch format, version 1, and its zero-copy codec.
//!
//! A batch is the unit of storage and of transfer: the broker stamps a batch's base offset
//! and appends its bytes as they are; fetches serve them as they are. `storage/FORMAT.md`
//! is the normative spec; the layout in short (all integers little-endian, fixed width):
//!
//! | offset | width | field |
//! |---|---|---|
//! | 0 | 8 | base offset (`u64`), stamped at append, **not** covered by the CRC |
//! | 8 | 4 | batch length (`u32`): bytes after this field, **not** covered by the CRC |
//! | 12 | 2 | magic `RL` |
//! | 14 | 1 | version = 1 |
//! | 15 | 1 | reserved, 0 |
//! | 16 | 4 | CRC-32/ISO-HDLC (crc32fast; not CRC-32C) of bytes `[20, end)` |
//! | 20 | 2 | attributes: bits 0–2 compression (0 = none), bit 3 timestamp type |
//! | 22 | 2 | reserved, 0 |
//! | 24 | 4 | last offset delta (`u32`) = record count − 1 |
//! | 28 | 4 | record count (`u32`, ≥ 1) |
//! | 32 | 8 | first timestamp (`i64` ms): the base of the records' timestamp deltas |
//! | 40 | 8 | max timestamp (`i64` ms) |
//! | 48 | 8 | producer id (`i64`, −1 = none) |
//! | 56 | 2 | producer epoch (`i16`, −1 = none) |
//! | 58 | 2 | reserved, 0 |
//! | 60 | 4 | base sequence (`i32`, −1 = none) |
//! | 64 | … | records |
//!
//! Each record: `u32` record length (bytes after this field), `u32` offset delta (its index),
//! `i64` timestamp delta, `i32` key length (−1 = null key) and key, `u32` value length and
//! value, `u16` header count, then per header `u16` key length, UTF-8 key, `u32` value length,
//! value. The records fill the batch exactly.
//!
//! Decoding never panics and never allocates from a length field: every length is checked
//! against the bytes that remain.

use bytes::{BufMut, Bytes, BytesMut};

use crate::cursor::Cursor;

/// Bytes in a batch header.
pub const HEADER_LEN: usize = 64;
/// Bytes before the part the batch length counts: base offset and length.
pub const LENGTH_PREFIX_LEN: usize = 12;
/// The magic bytes at offset 12.
pub const MAGIC: [u8; 2] = *b"RL";
/// The format version this code reads and writes.
pub const VERSION: u8 = 1;
/// Where the CRC field starts; the CRC covers everything after it.
pub const CRC_OFFSET: usize = 16;
/// Where the CRC-covered bytes start.
pub const CRC_START: usize = 20;
/// Bytes of fixed fields in one record, besides its key, value and headers.
pub const RECORD_OVERHEAD: usize = 4 + 4 + 8 + 4 + 4 + 2;
/// Attribute bit: timestamps were set by the broker (log-append time).
pub const ATTR_LOG_APPEND_TIME: u16 = 1 << 3;
const ATTR_COMPRESSION_MASK: u16 = 0b111;
const ATTR_KNOWN: u16 = ATTR_COMPRESSION_MASK | ATTR_LOG_APPEND_TIME;

/// What is wrong with a batch's bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BatchError {
    /// Fewer bytes than the header or the length field needs.
    #[error("truncated batch: needs {needed} bytes, has {available}")]
    Truncated {
        /// Bytes needed.
        needed: usize,
        /// Bytes available.
        available: usize,
    },
    /// The magic bytes are wrong (a zeroed region reads as this).
    #[error("bad magic bytes")]
    BadMagic,
    /// The version is not one this code reads.
    #[error("unsupported batch version {0}")]
    UnsupportedVersion(u8),
    /// The CRC does not match the bytes.
    #[error("checksum mismatch: stored {expected:#010x}, computed {actual:#010x}")]
    ChecksumMismatch {
        /// The CRC in the header.
        expected: u32,
        /// The CRC of the bytes.
        actual: u32,
    },
    /// A length or count field is impossible.
    #[error("bad batch length or count")]
    BadLength,
    /// A compression codec this code does not implement.
    #[error("unsupported compression codec {0}")]
    UnsupportedCompression(u8),
    /// Unknown attribute bits are set.
    #[error("unknown attribute bits {0:#06x}")]
    UnknownAttributes(u16),
    /// A record is malformed.
    #[error("bad record {index}: {reason}")]
    BadRecord {
        /// The record's index in the batch.
        index: u32,
        /// What is wrong.
        reason: &'static str,
    },
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

/// The fixed header of a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchHeader {
    /// Offset of the first record.
    pub base_offset: u64,
    /// Bytes after the length field.
    pub batch_length: u32,
    /// The stored CRC.
    pub crc: u32,
    /// Attribute bits.
    pub attributes: u16,
    /// Record count − 1.
    pub last_offset_delta: u32,
    /// Number of records.
    pub record_count: u32,
    /// Base of the records' timestamp deltas, in ms.
    pub first_timestamp: i64,
    /// Largest record timestamp, in ms.
    pub max_timestamp: i64,
    /// Producer id, −1 for none.
    pub producer_id: i64,
    /// Producer epoch, −1 for none.
    pub producer_epoch: i16,
    /// Base sequence, −1 for none.
    pub base_sequence: i32,
}

impl BatchHeader {
    /// Parses and checks the fixed header at the start of `buf`, without the CRC or the
    /// records: enough to walk batches quickly. `buf` may hold more after the batch.
    pub fn parse(buf: &[u8]) -> Result<BatchHeader, BatchError> {
        if buf.len() < HEADER_LEN {
            return Err(BatchError::Truncated {
                needed: HEADER_LEN,
                available: buf.len(),
            });
        }
        if buf[12..14] != MAGIC {
            return Err(BatchError::BadMagic);
        }
        if buf[14] != VERSION {
            return Err(BatchError::UnsupportedVersion(buf[14]));
        }
        let h = BatchHeader {
            base_offset: u64_at(buf, 0),
            batch_length: u32_at(buf, 8),
            crc: u32_at(buf, CRC_OFFSET),
            attributes: u16_at(buf, 20),
            last_offset_delta: u32_at(buf, 24),
            record_count: u32_at(buf, 28),
            first_timestamp: u64_at(buf, 32) as i64,
            max_timestamp: u64_at(buf, 40) as i64,
            producer_id: u64_at(buf, 48) as i64,
            producer_epoch: u16_at(buf, 56) as i16,
            base_sequence: u32_at(buf, 60) as i32,
        };
        if (h.batch_length as usize) < HEADER_LEN - LENGTH_PREFIX_LEN
            || h.record_count == 0
            || h.last_offset_delta != h.record_count - 1
            || h.base_offset
                .checked_add(u64::from(h.record_count))
                .is_none()
        {
            return Err(BatchError::BadLength);
        }
        if h.attributes & !ATTR_KNOWN != 0 {
            return Err(BatchError::UnknownAttributes(h.attributes));
        }
        let codec = (h.attributes & ATTR_COMPRESSION_MASK) as u8;
        if codec != 0 {
            return Err(BatchError::UnsupportedCompression(codec));
        }
        Ok(h)
    }

    /// The whole batch's size in bytes.
    pub fn total_len(&self) -> usize {
        self.batch_length as usize + LENGTH_PREFIX_LEN
    }

    /// The last record's offset.
    pub fn last_offset(&self) -> u64 {
        self.base_offset + u64::from(self.last_offset_delta)
    }

    /// The offset after this batch.
    pub fn next_offset(&self) -> u64 {
        self.base_offset + u64::from(self.record_count)
    }
}

/// Checks the CRC of the batch at the start of `batch` (which must hold the whole batch).
pub fn verify_crc(batch: &[u8]) -> Result<(), BatchError> {
    let header = BatchHeader::parse(batch)?;
    let end = header.total_len();
    if batch.len() < end {
        return Err(BatchError::Truncated {
            needed: end,
            available: batch.len(),
        });
    }
    let actual = crc32fast::hash(&batch[CRC_START..end]);
    if actual != header.crc {
        return Err(BatchError::ChecksumMismatch {
            expected: header.crc,
            actual,
        });
    }
    Ok(())
}

/// Writes the base offset field (outside the CRC, so nothing is recomputed).
pub fn stamp_base_offset(buf: &mut [u8], base_offset: u64) {
    if buf.len() >= 8 {
        buf[..8].copy_from_slice(&base_offset.to_le_bytes());
    }
}

/// A zero-copy view of one batch.
#[derive(Debug, Clone, Copy)]
pub struct BatchView<'a> {
    header: BatchHeader,
    bytes: &'a [u8],
}

impl<'a> BatchView<'a> {
    /// Views the batch at the start of `buf` (header checked; the batch must fit in `buf`).
    pub fn parse(buf: &'a [u8]) -> Result<BatchView<'a>, BatchError> {
        let header = BatchHeader::parse(buf)?;
        let end = header.total_len();
        if buf.len() < end {
            return Err(BatchError::Truncated {
                needed: end,
                available: buf.len(),
            });
        }
        Ok(BatchView {
            header,
            bytes: &buf[..end],
        })
    }

    /// The header.
    pub fn header(&self) -> &BatchHeader {
        &self.header
    }

    /// The batch's bytes.
    pub fn as_bytes(&self) -> &'a [u8] {
        self.bytes
    }

    /// Checks the CRC and every record's structure.
    pub fn validate(&self) -> Result<(), BatchError> {
        verify_crc(self.bytes)?;
        let mut max_ts = i64::MIN;
        let mut count = 0u32;
        for record in self.records() {
            let r = record?;
            max_ts = max_ts.max(r.timestamp_ms);
            for h in r.headers() {
                h?;
            }
            count += 1;
        }
        if count != self.header.record_count || max_ts != self.header.max_timestamp {
            return Err(BatchError::BadLength);
        }
        Ok(())
    }

    /// The records, decoded lazily without allocation. An error ends the iteration.
    pub fn records(&self) -> Records<'a> {
        Records {
            header: self.header,
            rest: &self.bytes[HEADER_LEN..],
            index: 0,
            failed: false,
        }
    }
}

/// Walks consecutive batches in `buf`; an error (or a torn tail) ends the walk.
pub fn batches(buf: &[u8]) -> Batches<'_> {
    Batches {
        rest: buf,
        failed: false,
    }
}

/// Iterator returned by [`batches`].
#[derive(Debug)]
pub struct Batches<'a> {
    rest: &'a [u8],
    failed: bool,
}

impl<'a> Iterator for Batches<'a> {
    type Item = Result<BatchView<'a>, BatchError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.rest.is_empty() {
            return None;
        }
        match BatchView::parse(self.rest) {
            Ok(view) => {
                self.rest = &self.rest[view.bytes.len()..];
                Some(Ok(view))
            }
            Err(e) => {
                self.failed = true;
                Some(Err(e))
            }
        }
    }
}

/// One record, borrowed from its batch.
#[derive(Debug, Clone, Copy)]
pub struct RecordView<'a> {
    /// The record's offset (base offset + its index).
    pub offset: u64,
    /// The record's timestamp, in ms.
    pub timestamp_ms: i64,
    /// The key, `None` for a null key.
    pub key: Option<&'a [u8]>,
    /// The value.
    pub value: &'a [u8],
    header_count: u16,
    header_bytes: &'a [u8],
    index: u32,
}

impl<'a> RecordView<'a> {
    /// The headers, in order, as `(key, value)`.
    pub fn headers(&self) -> Headers<'a> {
        Headers {
            rest: self.header_bytes,
            left: self.header_count,
            index: self.index,
        }
    }
}

/// Iterator over a record's headers. Yields an error for a malformed header.
#[derive(Debug, Clone)]
pub struct Headers<'a> {
    rest: &'a [u8],
    left: u16,
    index: u32,
}

impl<'a> Iterator for Headers<'a> {
    type Item = Result<(&'a str, &'a [u8]), BatchError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        let bad = |reason| BatchError::BadRecord {
            index: self.index,
            reason,
        };
        let mut cur = Cursor(self.rest);
        let result = (|| {
            let klen = cur.u16().ok_or(bad("header key length"))? as usize;
            let key = cur.take(klen).ok_or(bad("header key"))?;
            let key = std::str::from_utf8(key).map_err(|_| bad("header key is not UTF-8"))?;
            let vlen = cur.u32().ok_or(bad("header value length"))? as usize;
            let value = cur.take(vlen).ok_or(bad("header value"))?;
            Ok((key, value))
        })();
        match result {
            Ok(kv) => {
                self.rest = cur.0;
                Some(Ok(kv))
            }
            Err(e) => {
                self.left = 0;
                Some(Err(e))
            }
        }
    }
}

/// Iterator over a batch's records.
#[derive(Debug, Clone)]
pub struct Records<'a> {
    header: BatchHeader,
    rest: &'a [u8],
    index: u32,
    failed: bool,
}

impl<'a> Records<'a> {
    fn parse_one(&mut self) -> Result<RecordView<'a>, BatchError> {
        let index = self.index;
        let bad = |reason| BatchError::BadRecord { index, reason };
        let mut outer = Cursor(self.rest);
        let len = outer.u32().ok_or(bad("record length"))? as usize;
        let body = outer
            .take(len)
            .ok_or(bad("record length exceeds the batch"))?;
        let mut c = Cursor(body);
        let delta = c.u32().ok_or(bad("offset delta"))?;
        if delta != index {
            return Err(bad("offset delta is not the record's index"));
        }
        let ts_delta = c.u64().ok_or(bad("timestamp delta"))? as i64;
        let timestamp_ms = self
            .header
            .first_timestamp
            .checked_add(ts_delta)
            .ok_or(bad("timestamp overflows"))?;
        let klen = c.u32().ok_or(bad("key length"))? as i32;
        let key = match klen {
            -1 => None,
            n if n >= 0 => Some(c.take(n as usize).ok_or(bad("key"))?),
            _ => return Err(bad("negative key length")),
        };
        let vlen = c.u32().ok_or(bad("value length"))? as usize;
        let value = c.take(vlen).ok_or(bad("value"))?;
        let header_count = c.u16().ok_or(bad("header count"))?;
        let record = RecordView {
            offset: self.header.base_offset + u64::from(index),
            timestamp_ms,
            key,
            value,
            header_count,
            header_bytes: c.0,
            index,
        };
        // The headers must fill the record exactly.
        let mut headers = record.headers();
        for h in &mut headers {
            h?;
        }
        if !headers.rest.is_empty() {
            return Err(bad("bytes after the last header"));
        }
        self.rest = outer.0;
        self.index += 1;
        Ok(record)
    }
}

impl<'a> Iterator for Records<'a> {
    type Item = Result<RecordView<'a>, BatchError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        if self.index >= self.header.record_count {
            if !self.rest.is_empty() {
                self.failed = true;
                return Some(Err(BatchError::BadRecord {
                    index: self.index,
                    reason: "bytes after the last record",
                }));
            }
            return None;
        }
        let r = self.parse_one();
        if r.is_err() {
            self.failed = true;
        }
        Some(r)
    }
}

/// The encoded size of one record with these fields.
pub fn record_size<'h>(
    key: Option<&[u8]>,
    value: &[u8],
    headers: impl IntoIterator<Item = (&'h str, &'h [u8])>,
) -> usize {
    RECORD_OVERHEAD
        + key.map_or(0, <[u8]>::len)
        + value.len()
        + headers
            .into_iter()
            .map(|(k, v)| 2 + k.len() + 4 + v.len())
            .sum::<usize>()
}

/// Builds one batch into a buffer. Push records, then [`BatchBuilder::finish`].
#[derive(Debug)]
pub struct BatchBuilder {
    buf: BytesMut,
    count: u32,
    first_timestamp: i64,
    max_timestamp: i64,
    attributes: u16,
    producer_id: i64,
    producer_epoch: i16,
    base_sequence: i32,
}

impl Default for BatchBuilder {
    fn default() -> Self {
        BatchBuilder::new(BytesMut::new())
    }
}

impl BatchBuilder {
    /// Starts a batch in `buf` (cleared first; reuse one to avoid allocating).
    pub fn new(mut buf: BytesMut) -> Self {
        buf.clear();
        buf.put_bytes(0, HEADER_LEN);
        BatchBuilder {
            buf,
            count: 0,
            first_timestamp: 0,
            max_timestamp: i64::MIN,
            attributes: 0,
            producer_id: -1,
            producer_epoch: -1,
            base_sequence: -1,
        }
    }

    /// Sets producer id, epoch and base sequence (default −1: none).
    pub fn with_producer(mut self, id: i64, epoch: i16, base_sequence: i32) -> Self {
        self.producer_id = id;
        self.producer_epoch = epoch;
        self.base_sequence = base_sequence;
        self
    }

    /// Marks the timestamps as set by the broker (log-append time).
    pub fn with_log_append_time(mut self) -> Self {
        self.attributes |= ATTR_LOG_APPEND_TIME;
        self
    }

    /// Appends a record. Header keys are UTF-8 by type. Lengths over the format's limits
    /// (a key or value of 2 GiB, more than 65,535 headers) are a caller bug and are cut.
    pub fn push(
        &mut self,
        key: Option<&[u8]>,
        value: &[u8],
        headers: &[(&str, &[u8])],
        timestamp_ms: i64,
    ) {
        if self.count == 0 {
            self.first_timestamp = timestamp_ms;
        }
        self.max_timestamp = self.max_timestamp.max(timestamp_ms);
        let headers = &headers[..headers.len().min(usize::from(u16::MAX))];
        let size = record_size(key, value, headers.iter().copied()) - 4;
        self.buf.reserve(size + 4);
        self.buf.put_u32_le(size as u32);
        self.buf.put_u32_le(self.count);
        self.buf
            .put_i64_le(timestamp_ms.wrapping_sub(self.first_timestamp));
        match key {
            None => self.buf.put_i32_le(-1),
            Some(k) => {
                self.buf.put_i32_le(k.len() as i32);
                self.buf.put_slice(k);
            }
        }
        self.buf.put_u32_le(value.len() as u32);
        self.buf.put_slice(value);
        self.buf.put_u16_le(headers.len() as u16);
        for (k, v) in headers {
            self.buf.put_u16_le(k.len() as u16);
            self.buf.put_slice(k.as_bytes());
            self.buf.put_u32_le(v.len() as u32);
            self.buf.put_slice(v);
        }
        self.count += 1;
    }

    /// Records pushed so far.
    pub fn record_count(&self) -> u32 {
        self.count
    }

    /// Bytes the batch would have if finished now.
    pub fn len_bytes(&self) -> usize {
        self.buf.len()
    }

    /// Fills in the header (base offset 0) and the CRC, and returns the batch.
    pub fn finish(mut self) -> Bytes {
        let total = self.buf.len();
        let b = &mut self.buf[..];
        b[8..12].copy_from_slice(&((total - LENGTH_PREFIX_LEN) as u32).to_le_bytes());
        b[12..14].copy_from_slice(&MAGIC);
        b[14] = VERSION;
        b[20..22].copy_from_slice(&self.attributes.to_le_bytes());
        b[24..28].copy_from_slice(&self.count.saturating_sub(1).to_le_bytes());
        b[28..32].copy_from_slice(&self.count.to_le_bytes());
        b[32..40].copy_from_slice(&self.first_timestamp.to_le_bytes());
        b[40..48].copy_from_slice(&self.max_timestamp.to_le_bytes());
        b[48..56].copy_from_slice(&self.producer_id.to_le_bytes());
        b[56..58].copy_from_slice(&self.producer_epoch.to_le_bytes());
        b[60..64].copy_from_slice(&self.base_sequence.to_le_bytes());
        let crc = crc32fast::hash(&b[CRC_START..]);
        b[CRC_OFFSET..CRC_START].copy_from_slice(&crc.to_le_bytes());
        self.buf.freeze()
    }
}

/// An owned record, for callers that build batches from owned data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The key, `None` for a null key.
    pub key: Option<Bytes>,
    /// The value.
    pub value: Bytes,
    /// Headers, in order.
    pub headers: Vec<(String, Bytes)>,
    /// Timestamp in ms since the Unix epoch.
    pub timestamp_ms: i64,
}

/// Encodes `records` as one batch (base offset 0).
pub fn encode_batch(records: &[Record]) -> Bytes {
    let mut builder = BatchBuilder::default();
    let mut headers: Vec<(&str, &[u8])> = Vec::new();
    for r in records {
        headers.clear();
        headers.extend(r.headers.iter().map(|(k, v)| (k.as_str(), v.as_ref())));
        builder.push(r.key.as_deref(), &r.value, &headers, r.timestamp_ms);
    }
    builder.finish()
}

#[cfg(test)]
mod tests;
