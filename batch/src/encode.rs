//! Building batches: [`BatchBuilder`] writes records straight into one buffer, and
//! [`encode_batch`] wraps it for owned [`Record`]s.

use bytes::{BufMut, Bytes, BytesMut};

use super::{
    field, BatchError, ATTR_LOG_APPEND_TIME, CRC_START, HEADER_LEN, HEADER_OVERHEAD,
    LENGTH_PREFIX_LEN, MAGIC, RECORD_OVERHEAD, VERSION,
};

/// The encoded size of one record with these fields, its length field included: what it adds
/// to a batch. Saturates instead of overflowing (such a record cannot be encoded anyway).
pub fn record_size<'h>(
    key: Option<&[u8]>,
    value: &[u8],
    headers: impl IntoIterator<Item = (&'h str, &'h [u8])>,
) -> usize {
    headers.into_iter().fold(
        RECORD_OVERHEAD
            .saturating_add(key.map_or(0, <[u8]>::len))
            .saturating_add(value.len()),
        |size, (k, v)| {
            size.saturating_add(HEADER_OVERHEAD)
                .saturating_add(k.len())
                .saturating_add(v.len())
        },
    )
}

/// `Err(TooLarge)` when `len` exceeds `max`.
fn limit(what: &'static str, len: usize, max: usize) -> Result<(), BatchError> {
    if len > max {
        return Err(BatchError::TooLarge { what, len, max });
    }
    Ok(())
}

/// Writes `bytes` at `at` in the header; the offsets are [`field`] constants inside it.
fn put_at(h: &mut [u8; HEADER_LEN], at: usize, bytes: &[u8]) {
    if let Some(dst) = h.get_mut(at..at.saturating_add(bytes.len())) {
        dst.copy_from_slice(bytes);
    }
}

/// Builds one batch into a buffer: push records, then [`BatchBuilder::finish`]. The records
/// are written as they are pushed, so [`BatchBuilder::len_bytes`] is the exact size so far
/// and a caller can stop before a size limit.
#[derive(Debug)]
pub struct BatchBuilder {
    /// Header placeholder (zeros until `finish`), then the records.
    buf: BytesMut,
    count: u32,
    first_timestamp: i64,
    max_timestamp: i64,
    attributes: u16,
    producer_id: i64,
    producer_epoch: i16,
    base_sequence: i32,
    /// The first failed [`BatchBuilder::push`]: it makes `finish` produce an invalid batch.
    error: Option<BatchError>,
}

impl Default for BatchBuilder {
    fn default() -> Self {
        BatchBuilder::new(BytesMut::new())
    }
}

impl BatchBuilder {
    /// Starts a batch in `buf`, which is cleared first: pass one with capacity for the batch
    /// to avoid reallocating as records are pushed.
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
            error: None,
        }
    }

    /// Sets producer id, epoch and base sequence (default −1 each: none).
    pub fn with_producer(mut self, id: i64, epoch: i16, base_sequence: i32) -> Self {
        self.producer_id = id;
        self.producer_epoch = epoch;
        self.base_sequence = base_sequence;
        self
    }

    /// Marks the timestamps as set by the broker (log-append time) rather than the producer.
    pub fn with_log_append_time(mut self) -> Self {
        self.attributes |= ATTR_LOG_APPEND_TIME;
        self
    }

    /// Appends a record, or refuses it and leaves the batch as it was. Refused: a timestamp
    /// whose distance from the first record's does not fit an `i64`, a key over `i32::MAX`
    /// bytes, a value or header value over `u32::MAX`, a header key over `u16::MAX`, more
    /// than `u16::MAX` headers, a record or batch whose length overflows its `u32` field, or
    /// a record past `u32::MAX` of them. Header keys are UTF-8 by type.
    pub fn try_push(
        &mut self,
        key: Option<&[u8]>,
        value: &[u8],
        headers: &[(&str, &[u8])],
        timestamp_ms: i64,
    ) -> Result<(), BatchError> {
        let u32_max = u32::MAX as usize;
        if self.count == u32::MAX {
            return Err(BatchError::TooLarge {
                what: "record count",
                len: u32_max.saturating_add(1),
                max: u32_max,
            });
        }
        // The first record's timestamp is the base of every delta.
        let first = if self.count == 0 {
            timestamp_ms
        } else {
            self.first_timestamp
        };
        let delta = timestamp_ms
            .checked_sub(first)
            .ok_or(BatchError::TimestampOutOfRange {
                first,
                timestamp: timestamp_ms,
            })?;
        limit("key length", key.map_or(0, <[u8]>::len), i32::MAX as usize)?;
        limit("value length", value.len(), u32_max)?;
        limit("header count", headers.len(), usize::from(u16::MAX))?;
        for (k, v) in headers {
            limit("header key length", k.len(), usize::from(u16::MAX))?;
            limit("header value length", v.len(), u32_max)?;
        }
        let size = record_size(key, value, headers.iter().copied());
        limit("record length", size - 4, u32_max)?;
        let batch_length = (self.buf.len() - LENGTH_PREFIX_LEN).saturating_add(size);
        limit("batch length", batch_length, u32_max)?;

        // Every length below was checked against its field above, so the casts are exact.
        self.buf.reserve(size);
        self.buf.put_u32_le((size - 4) as u32);
        self.buf.put_u32_le(self.count);
        self.buf.put_i64_le(delta);
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
        self.first_timestamp = first;
        self.max_timestamp = self.max_timestamp.max(timestamp_ms);
        self.count += 1;
        Ok(())
    }

    /// Appends a record, for callers whose records are known to fit (see
    /// [`BatchBuilder::try_push`]). A record that does not fit is not written, and it poisons
    /// the builder: [`BatchBuilder::finish`] then returns a batch every reader refuses, so a
    /// record is never silently lost or mangled. [`BatchBuilder::error`] tells why.
    pub fn push(
        &mut self,
        key: Option<&[u8]>,
        value: &[u8],
        headers: &[(&str, &[u8])],
        timestamp_ms: i64,
    ) {
        if let Err(e) = self.try_push(key, value, headers, timestamp_ms) {
            self.error.get_or_insert(e);
        }
    }

    /// Why a [`BatchBuilder::push`] failed, if one did.
    pub fn error(&self) -> Option<&BatchError> {
        self.error.as_ref()
    }

    /// Records pushed so far.
    pub fn record_count(&self) -> u32 {
        self.count
    }

    /// Whether no record was pushed yet.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Bytes the batch would have if finished now (header included).
    pub fn len_bytes(&self) -> usize {
        self.buf.len()
    }

    /// Fills in the header (base offset 0, to be stamped at append) and the CRC, and returns
    /// the batch. With no records, or after a failed [`BatchBuilder::push`], it returns the
    /// header alone with a record count of 0, which every reader refuses; prefer
    /// [`BatchBuilder::try_finish`] to learn that here.
    pub fn finish(mut self) -> Bytes {
        let count = if self.error.is_some() {
            self.buf.truncate(HEADER_LEN);
            0
        } else {
            self.count
        };
        let batch_length = (self.buf.len() - LENGTH_PREFIX_LEN) as u32;
        // The header was reserved in `new`; the check only keeps this free of panic paths.
        if let Some(h) = self.buf.first_chunk_mut::<HEADER_LEN>() {
            put_at(h, field::BASE_OFFSET, &0u64.to_le_bytes());
            put_at(h, field::BATCH_LENGTH, &batch_length.to_le_bytes());
            put_at(h, field::MAGIC, &MAGIC);
            put_at(h, field::VERSION, &[VERSION]);
            put_at(h, field::ATTRIBUTES, &self.attributes.to_le_bytes());
            put_at(
                h,
                field::LAST_OFFSET_DELTA,
                &count.saturating_sub(1).to_le_bytes(),
            );
            put_at(h, field::RECORD_COUNT, &count.to_le_bytes());
            put_at(
                h,
                field::FIRST_TIMESTAMP,
                &self.first_timestamp.to_le_bytes(),
            );
            put_at(h, field::MAX_TIMESTAMP, &self.max_timestamp.to_le_bytes());
            put_at(h, field::PRODUCER_ID, &self.producer_id.to_le_bytes());
            put_at(h, field::PRODUCER_EPOCH, &self.producer_epoch.to_le_bytes());
            put_at(h, field::BASE_SEQUENCE, &self.base_sequence.to_le_bytes());
        }
        // The CRC covers everything after its own field, header fields included, so it is
        // computed last.
        let crc = crc32fast::hash(self.buf.get(CRC_START..).unwrap_or_default());
        if let Some(h) = self.buf.first_chunk_mut::<HEADER_LEN>() {
            put_at(h, field::CRC, &crc.to_le_bytes());
        }
        self.buf.freeze()
    }

    /// [`BatchBuilder::finish`], or why the batch would be invalid: no records, or the first
    /// failed [`BatchBuilder::push`].
    pub fn try_finish(mut self) -> Result<Bytes, BatchError> {
        if let Some(e) = self.error.take() {
            return Err(e);
        }
        if self.count == 0 {
            return Err(BatchError::Empty);
        }
        Ok(self.finish())
    }
}

/// An owned record, for callers that build batches from owned data.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
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

impl Record {
    /// What this record adds to a batch, in bytes ([`record_size`]).
    pub fn encoded_len(&self) -> usize {
        record_size(
            self.key.as_deref(),
            &self.value,
            self.headers.iter().map(|(k, v)| (k.as_str(), v.as_ref())),
        )
    }
}

/// Encodes `records` as one batch (base offset 0). Like [`BatchBuilder::finish`], it returns
/// a batch every reader refuses when `records` is empty or one does not fit the format; use
/// [`try_encode_batch`] to learn that here.
pub fn encode_batch(records: &[Record]) -> Bytes {
    build(records).finish()
}

/// Encodes `records` as one batch (base offset 0), or says why they make no valid batch.
pub fn try_encode_batch(records: &[Record]) -> Result<Bytes, BatchError> {
    build(records).try_finish()
}

fn build(records: &[Record]) -> BatchBuilder {
    let size = records
        .iter()
        .fold(HEADER_LEN, |n, r| n.saturating_add(r.encoded_len()));
    // Reserve the exact size (capped, as it comes from the caller's data) so the buffer
    // grows at most once.
    let mut builder = BatchBuilder::new(BytesMut::with_capacity(size.min(64 << 20)));
    let mut headers: Vec<(&str, &[u8])> = Vec::new();
    for r in records {
        headers.clear();
        headers.extend(r.headers.iter().map(|(k, v)| (k.as_str(), v.as_ref())));
        builder.push(r.key.as_deref(), &r.value, &headers, r.timestamp_ms);
    }
    builder
}
