//! Zero-copy reading: a view of one batch, walks over batches, records and headers. Nothing
//! here allocates; every view borrows the bytes it was given.

use super::header::{verify_crc, BatchHeader};
use super::{BatchError, HEADER_LEN};
use crate::cursor::Cursor;

/// A zero-copy view of one batch whose header has been checked.
#[derive(Debug, Clone, Copy)]
pub struct BatchView<'a> {
    header: BatchHeader,
    bytes: &'a [u8],
}

impl<'a> BatchView<'a> {
    /// Views the batch at the start of `buf`. Checks the header ([`BatchHeader::parse`]) and
    /// that the whole batch is in `buf`, which may hold more after it; the view covers exactly
    /// the one batch. Neither the CRC nor the records are checked: see
    /// [`BatchView::validate`] and [`verify_crc`].
    pub fn parse(buf: &'a [u8]) -> Result<BatchView<'a>, BatchError> {
        let header = BatchHeader::parse(buf)?;
        let end = header.total_len();
        let bytes = buf.get(..end).ok_or(BatchError::Truncated {
            needed: end,
            available: buf.len(),
        })?;
        Ok(BatchView { header, bytes })
    }

    /// The header.
    pub fn header(&self) -> &BatchHeader {
        &self.header
    }

    /// The batch's bytes, exactly [`BatchHeader::total_len`] of them.
    pub fn as_bytes(&self) -> &'a [u8] {
        self.bytes
    }

    /// Checks everything the format requires: the CRC first (cheap, and it catches most
    /// damage with a precise error), then every record's structure, header keys' UTF-8, and
    /// the header's max timestamp. A batch built elsewhere is trusted only after this. A
    /// compressed batch is decompressed (bounded by [`super::MAX_DECOMPRESSED_BATCH_BYTES`])
    /// and its records checked; see [`BatchView::validate_within`] for a lower bound.
    pub fn validate(&self) -> Result<(), BatchError> {
        self.validate_within(super::MAX_DECOMPRESSED_BATCH_BYTES)
    }

    /// [`BatchView::validate`], with a compressed batch refused when it decompresses to more
    /// than `max_decompressed_bytes` (the whole plain batch, header included).
    pub fn validate_within(&self, max_decompressed_bytes: usize) -> Result<(), BatchError> {
        if self.header.compression_codec() != 0 {
            let plain = super::decompress(self.bytes, max_decompressed_bytes)?;
            return BatchView::parse(&plain)?.validate_within(max_decompressed_bytes);
        }
        verify_crc(self.bytes)?;
        let mut max_timestamp = i64::MIN;
        // The records iterator checks each record fully (headers included), the offset
        // deltas, the count, and that nothing follows the last record.
        for record in self.records() {
            max_timestamp = max_timestamp.max(record?.timestamp_ms);
        }
        if max_timestamp != self.header.max_timestamp {
            return Err(BatchError::MaxTimestampMismatch {
                stored: self.header.max_timestamp,
                actual: max_timestamp,
            });
        }
        Ok(())
    }

    /// The records, decoded lazily without allocation. Each record is checked as it is
    /// decoded (its fields fill its length exactly, its offset delta is its index, its
    /// timestamp does not overflow, its header keys are UTF-8); after the last record, bytes
    /// left over are an error. The first error ends the iteration. A compressed batch yields
    /// one [`BatchError::Compressed`]: read the records of its [`super::decompress`]ed form.
    pub fn records(&self) -> Records<'a> {
        let codec = self.header.compression_codec();
        Records {
            compressed: codec,
            header: self.header,
            // The header check guarantees at least HEADER_LEN bytes; the fallback only keeps
            // this free of any panic path.
            rest: self.bytes.get(HEADER_LEN..).unwrap_or_default(),
            index: 0,
            failed: false,
        }
    }
}

/// Walks consecutive batches from the start of `buf`, checking each header (not the CRC).
/// The walk stops at the end of `buf`; anything that is not a whole batch (a torn tail, a
/// zeroed region, garbage) yields one error and ends it.
pub fn batches(buf: &[u8]) -> Batches<'_> {
    Batches {
        rest: buf,
        failed: false,
    }
}

/// Iterator returned by [`batches`].
#[derive(Debug, Clone)]
pub struct Batches<'a> {
    rest: &'a [u8],
    failed: bool,
}

impl<'a> Batches<'a> {
    /// The bytes not walked yet: after an error, they start at the bad batch.
    pub fn remaining(&self) -> &'a [u8] {
        self.rest
    }
}

impl<'a> Iterator for Batches<'a> {
    type Item = Result<BatchView<'a>, BatchError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.rest.is_empty() {
            return None;
        }
        match BatchView::parse(self.rest) {
            Ok(view) => {
                self.rest = self.rest.get(view.bytes.len()..).unwrap_or_default();
                Some(Ok(view))
            }
            Err(e) => {
                self.failed = true;
                Some(Err(e))
            }
        }
    }
}

impl std::iter::FusedIterator for Batches<'_> {}

/// One record, borrowed from its batch.
#[derive(Debug, Clone, Copy)]
pub struct RecordView<'a> {
    /// The record's offset (base offset + its index).
    pub offset: u64,
    /// The record's timestamp, in ms since the Unix epoch.
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
    /// The headers, in order, as `(key, value)`. They were checked when the record was
    /// decoded, so a record from [`Records`] never yields an error here.
    pub fn headers(&self) -> Headers<'a> {
        Headers {
            rest: self.header_bytes,
            left: self.header_count,
            record: self.index,
            header: 0,
        }
    }

    /// The number of headers.
    pub fn header_count(&self) -> u16 {
        self.header_count
    }
}

/// Iterator over a record's headers. Yields an error for a malformed header, then stops.
#[derive(Debug, Clone)]
pub struct Headers<'a> {
    rest: &'a [u8],
    left: u16,
    record: u32,
    header: u16,
}

impl<'a> Headers<'a> {
    fn parse_one(&mut self) -> Result<(&'a str, &'a [u8]), BatchError> {
        let bad = |reason| BatchError::BadRecord {
            index: self.record,
            reason,
        };
        let mut c = Cursor(self.rest);
        let key_len = c
            .u16()
            .ok_or(bad("header key length past the record end"))?;
        let key = c
            .take(usize::from(key_len))
            .ok_or(bad("header key exceeds the record"))?;
        let key = std::str::from_utf8(key).map_err(|_| BatchError::InvalidUtf8Header {
            index: self.record,
            header: self.header,
        })?;
        let value_len = c
            .u32()
            .ok_or(bad("header value length past the record end"))?;
        let value = c
            .take(value_len as usize)
            .ok_or(bad("header value exceeds the record"))?;
        self.rest = c.0;
        Ok((key, value))
    }
}

impl<'a> Iterator for Headers<'a> {
    type Item = Result<(&'a str, &'a [u8]), BatchError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.left == 0 {
            return None;
        }
        let result = self.parse_one();
        self.left = if result.is_ok() { self.left - 1 } else { 0 };
        self.header = self.header.wrapping_add(1);
        Some(result)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (0, Some(usize::from(self.left)))
    }
}

impl std::iter::FusedIterator for Headers<'_> {}

/// Iterator over a batch's records; see [`BatchView::records`].
#[derive(Debug, Clone)]
pub struct Records<'a> {
    /// The codec of a compressed batch (its records cannot be read as they are), else 0.
    compressed: u8,
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
        let len = outer.u32().ok_or(bad("record length past the batch end"))?;
        let body = outer
            .take(len as usize)
            .ok_or(bad("record length exceeds the batch"))?;
        let mut c = Cursor(body);
        let delta = c.u32().ok_or(bad("offset delta past the record end"))?;
        if delta != index {
            return Err(bad("offset delta is not the record's index"));
        }
        let timestamp_delta = c.u64().ok_or(bad("timestamp delta past the record end"))? as i64;
        let timestamp_ms = self
            .header
            .first_timestamp
            .checked_add(timestamp_delta)
            .ok_or(BatchError::TimestampOverflow {
                index,
                first: self.header.first_timestamp,
                delta: timestamp_delta,
            })?;
        let key_len = c.u32().ok_or(bad("key length past the record end"))? as i32;
        let key = match key_len {
            -1 => None,
            n => {
                let n = usize::try_from(n).map_err(|_| bad("key length below -1"))?;
                Some(c.take(n).ok_or(bad("key exceeds the record"))?)
            }
        };
        let value_len = c.u32().ok_or(bad("value length past the record end"))?;
        let value = c
            .take(value_len as usize)
            .ok_or(bad("value exceeds the record"))?;
        let header_count = c.u16().ok_or(bad("header count past the record end"))?;
        let offset = self
            .header
            .base_offset
            .checked_add(u64::from(index))
            .ok_or(bad("offset overflows"))?;
        let record = RecordView {
            offset,
            timestamp_ms,
            key,
            value,
            header_count,
            header_bytes: c.0,
            index,
        };
        // Check the headers now, so that a record handed out is wholly valid and its
        // header iterator cannot fail; they must fill the record exactly.
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
        if self.compressed != 0 {
            self.failed = true;
            return Some(Err(BatchError::Compressed(self.compressed)));
        }
        if self.index >= self.header.record_count {
            if self.rest.is_empty() {
                return None;
            }
            self.failed = true;
            return Some(Err(BatchError::BadRecord {
                index: self.index,
                reason: "bytes after the last record",
            }));
        }
        let record = self.parse_one();
        self.failed = record.is_err();
        Some(record)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = self.header.record_count.saturating_sub(self.index) as usize;
        // One more item is possible: the error for bytes after the last record.
        (0, Some(left.saturating_add(1)))
    }
}

impl std::iter::FusedIterator for Records<'_> {}
