//! The fixed 64-byte batch header: parsing without touching the records, the CRC check, and
//! stamping the base offset.

use super::{
    field, BatchError, ATTR_COMPRESSION_MASK, ATTR_KNOWN, ATTR_LOG_APPEND_TIME, CRC_START,
    HEADER_LEN, LENGTH_PREFIX_LEN, MAGIC, RECORD_OVERHEAD, VERSION,
};

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

/// `N` bytes of the header at `at`. The offsets are the constants of [`field`], all inside
/// the header, so the zero fallback is never taken; it exists so that a wrong constant could
/// never turn into a panic on untrusted input.
fn bytes_at<const N: usize>(h: &[u8; HEADER_LEN], at: usize) -> [u8; N] {
    h.get(at..at.saturating_add(N))
        .and_then(|s| <[u8; N]>::try_from(s).ok())
        .unwrap_or([0; N])
}

impl BatchHeader {
    /// Parses and checks the fixed header at the start of `buf`, without the CRC or the
    /// records: enough to walk batches quickly. `buf` may hold more after the batch, and need
    /// not hold the whole batch (see [`BatchHeader::total_len`]).
    ///
    /// Checks, in order: at least 64 bytes; magic (so a zeroed region fails here, as
    /// [`BatchError::BadMagic`]); version; reserved fields zero; the length at least the
    /// header and large enough for the record count; count ≥ 1 and equal to the last offset
    /// delta + 1; offsets that do not overflow; attributes.
    pub fn parse(buf: &[u8]) -> Result<BatchHeader, BatchError> {
        let Some(h) = buf.first_chunk::<HEADER_LEN>() else {
            return Err(BatchError::Truncated {
                needed: HEADER_LEN,
                available: buf.len(),
            });
        };
        let magic: [u8; 2] = bytes_at(h, field::MAGIC);
        if magic != MAGIC {
            return Err(BatchError::BadMagic { found: magic });
        }
        let [version] = bytes_at(h, field::VERSION);
        if version != VERSION {
            return Err(BatchError::UnsupportedVersion(version));
        }
        // Reserved fields must be zero so a later version can give them a meaning that this
        // one is sure never to misread.
        let [reserved_1] = bytes_at::<1>(h, field::RESERVED_1);
        for (offset, zero) in [
            (field::RESERVED_1, reserved_1 == 0),
            (
                field::RESERVED_2,
                bytes_at::<2>(h, field::RESERVED_2) == [0; 2],
            ),
            (
                field::RESERVED_3,
                bytes_at::<2>(h, field::RESERVED_3) == [0; 2],
            ),
        ] {
            if !zero {
                return Err(BatchError::NonZeroReserved { offset });
            }
        }
        let header = BatchHeader {
            base_offset: u64::from_le_bytes(bytes_at(h, field::BASE_OFFSET)),
            batch_length: u32::from_le_bytes(bytes_at(h, field::BATCH_LENGTH)),
            crc: u32::from_le_bytes(bytes_at(h, field::CRC)),
            attributes: u16::from_le_bytes(bytes_at(h, field::ATTRIBUTES)),
            last_offset_delta: u32::from_le_bytes(bytes_at(h, field::LAST_OFFSET_DELTA)),
            record_count: u32::from_le_bytes(bytes_at(h, field::RECORD_COUNT)),
            first_timestamp: i64::from_le_bytes(bytes_at(h, field::FIRST_TIMESTAMP)),
            max_timestamp: i64::from_le_bytes(bytes_at(h, field::MAX_TIMESTAMP)),
            producer_id: i64::from_le_bytes(bytes_at(h, field::PRODUCER_ID)),
            producer_epoch: i16::from_le_bytes(bytes_at(h, field::PRODUCER_EPOCH)),
            base_sequence: i32::from_le_bytes(bytes_at(h, field::BASE_SEQUENCE)),
        };
        header.check()?;
        Ok(header)
    }

    /// The consistency checks of [`BatchHeader::parse`] past magic, version and reserved.
    fn check(&self) -> Result<(), BatchError> {
        let records_len = (self.batch_length as usize)
            .checked_sub(HEADER_LEN - LENGTH_PREFIX_LEN)
            .ok_or(BatchError::BadBatchLength {
                batch_length: self.batch_length,
                reason: "shorter than the header",
            })?;
        if self.record_count == 0 || self.last_offset_delta != self.record_count - 1 {
            return Err(BatchError::BadRecordCount {
                record_count: self.record_count,
                last_offset_delta: self.last_offset_delta,
            });
        }
        // Every record takes at least RECORD_OVERHEAD bytes, so a count the length cannot
        // hold is refused here; a caller may then size a buffer by the count safely.
        // (A compressed records section may be far smaller: its count is checked against the
        // decompressed records.)
        if self.compression_codec() == 0
            && (self.record_count as usize).saturating_mul(RECORD_OVERHEAD) > records_len
        {
            return Err(BatchError::BadBatchLength {
                batch_length: self.batch_length,
                reason: "too short for the record count",
            });
        }
        if self
            .base_offset
            .checked_add(u64::from(self.record_count))
            .is_none()
        {
            return Err(BatchError::OffsetOverflow {
                base_offset: self.base_offset,
                record_count: self.record_count,
            });
        }
        if self.attributes & !ATTR_KNOWN != 0 {
            return Err(BatchError::UnknownAttributes(self.attributes));
        }
        let codec = self.compression_codec();
        if super::Codec::from_bits(codec).is_none() {
            return Err(BatchError::UnsupportedCompression(codec));
        }
        Ok(())
    }

    /// The whole batch's size in bytes.
    pub fn total_len(&self) -> usize {
        self.batch_length as usize + LENGTH_PREFIX_LEN
    }

    /// The last record's offset. Saturates rather than overflowing, which only a header not
    /// from [`BatchHeader::parse`] could do.
    pub fn last_offset(&self) -> u64 {
        self.base_offset
            .saturating_add(u64::from(self.last_offset_delta))
    }

    /// The offset after this batch (saturating, as [`BatchHeader::last_offset`]).
    pub fn next_offset(&self) -> u64 {
        self.base_offset
            .saturating_add(u64::from(self.record_count))
    }

    /// The compression codec's value (attribute bits 0–2): 0 none, 1 lz4, 2 zstd (see
    /// [`super::Codec`]).
    pub fn compression_codec(&self) -> u8 {
        // The mask keeps three bits, so the cast cannot truncate.
        (self.attributes & ATTR_COMPRESSION_MASK) as u8
    }

    /// Whether the timestamps are log-append time (set by the broker) rather than create time
    /// (set by the producer).
    pub fn log_append_time(&self) -> bool {
        self.attributes & ATTR_LOG_APPEND_TIME != 0
    }
}

/// The total size of the batch starting at `buf`, from its length field alone, or `None` when
/// `buf` is too short to hold the field. Nothing else is checked: use it to frame a stream,
/// then [`BatchHeader::parse`] to trust what it frames.
pub fn peek_total_len(buf: &[u8]) -> Option<usize> {
    let prefix = buf.first_chunk::<LENGTH_PREFIX_LEN>()?;
    let len: [u8; 4] = prefix
        .get(field::BATCH_LENGTH..LENGTH_PREFIX_LEN)
        .and_then(|s| s.try_into().ok())?;
    Some(u32::from_le_bytes(len) as usize + LENGTH_PREFIX_LEN)
}

/// Checks the CRC of the batch at the start of `batch`, which must hold the whole batch (and
/// may hold more after it). The header is parsed first, so a bad header is reported as such.
pub fn verify_crc(batch: &[u8]) -> Result<(), BatchError> {
    let header = BatchHeader::parse(batch)?;
    let end = header.total_len();
    let covered = batch.get(CRC_START..end).ok_or(BatchError::Truncated {
        needed: end,
        available: batch.len(),
    })?;
    let actual = crc32fast::hash(covered);
    if actual != header.crc {
        return Err(BatchError::ChecksumMismatch {
            expected: header.crc,
            actual,
        });
    }
    Ok(())
}

/// Writes the base offset field. It lies outside the CRC, so nothing is recomputed: this is
/// how the broker assigns offsets to a batch a client built. A buffer shorter than the field
/// cannot hold a batch and is left as it is (parsing it fails anyway).
pub fn stamp_base_offset(buf: &mut [u8], base_offset: u64) {
    if let Some(f) = buf.first_chunk_mut::<8>() {
        *f = base_offset.to_le_bytes();
    }
}
