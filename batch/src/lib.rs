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
//! | 20 | 2 | attributes: bits 0–2 compression (0 none, 1 lz4, 2 zstd), bit 3 timestamp type |
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
//! value. The records fill the batch exactly. In a compressed batch the records section (every
//! byte after the header) is compressed as a whole and the header stays plain; [`decompress`]
//! gives the plain equivalent, whose records can be read.
//!
//! # Three levels of checking
//! - [`BatchHeader::parse`]: the fixed 64-byte header only (no CRC, no records). Cheap enough
//!   to walk a segment batch by batch; recovery and the segment reader use it.
//! - [`verify_crc`]: the checksum of one whole batch; what the read path checks once per
//!   stored batch.
//! - [`BatchView::validate`]: the checksum and every record's structure; what a batch built
//!   elsewhere (a client's, or one met by recovery) must pass before it is trusted.
//!
//! Decoding never panics, never indexes out of bounds and never allocates from a length
//! field: every length is checked against the bytes that remain. Reading records allocates
//! nothing: [`RecordView`]s borrow the batch's bytes.
//!
//! # Who uses it
//! The log engine (`rill-storage`, which re-exports this crate as `rill_storage::batch`)
//! validates, stores and serves batches; the client library (`rill-client`) builds and
//! compresses its producer's batches with the same code, so both sides agree on every byte.
//! It depends on no other Rill crate.
//!
//! # The map
//! - `header`: [`BatchHeader`], the CRC, base-offset stamping.
//! - `encode`: [`BatchBuilder`] and [`encode_batch`].
//! - `decode`: [`BatchView`], record iteration and validation.
//! - `compress`: [`Codec`], [`compress`] and the bounded [`decompress`].
//! - [`cursor`]: the bounds-checked little-endian reader every decoder uses.

// No `unwrap` outside tests: these decoders read bytes from disk and the network, and their
// failures are typed errors.
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

mod compress;
pub mod cursor;
mod decode;
mod encode;
mod header;

pub use compress::{compress, decompress, Codec, MAX_DECOMPRESSED_BATCH_BYTES};
pub use decode::{batches, BatchView, Batches, Headers, RecordView, Records};
pub use encode::{encode_batch, record_size, try_encode_batch, BatchBuilder, Record};
pub use header::{peek_total_len, stamp_base_offset, verify_crc, BatchHeader};

/// Bytes in a batch header.
pub const HEADER_LEN: usize = 64;
/// Bytes before the part the batch length counts: base offset and length.
pub const LENGTH_PREFIX_LEN: usize = 12;
/// The magic bytes at offset 12.
pub const MAGIC: [u8; 2] = *b"RL";
/// The format version this code reads and writes.
pub const VERSION: u8 = 1;
/// Where the CRC field starts; the CRC covers everything after it.
pub const CRC_OFFSET: usize = field::CRC;
/// Where the CRC-covered bytes start.
pub const CRC_START: usize = field::ATTRIBUTES;
/// Bytes of fixed fields in one record, besides its key, value and headers; also the size of
/// the smallest record (null key, empty value, no headers).
pub const RECORD_OVERHEAD: usize = 4 + 4 + 8 + 4 + 4 + 2;
/// Bytes of fixed fields in one record header, besides its key and value.
pub const HEADER_OVERHEAD: usize = 2 + 4;
/// Attribute bits holding the compression codec.
pub const ATTR_COMPRESSION_MASK: u16 = 0b111;
/// Attribute bit: timestamps were set by the broker (log-append time), not by the producer.
pub const ATTR_LOG_APPEND_TIME: u16 = 1 << 3;
/// Every attribute bit version 1 defines; any other set bit is refused.
const ATTR_KNOWN: u16 = ATTR_COMPRESSION_MASK | ATTR_LOG_APPEND_TIME;

/// Byte offsets of the header's fields, from the start of the batch.
pub mod field {
    /// `u64` base offset (outside the CRC).
    pub const BASE_OFFSET: usize = 0;
    /// `u32` batch length: bytes after this field (outside the CRC).
    pub const BATCH_LENGTH: usize = 8;
    /// `[u8; 2]` magic `RL` (outside the CRC).
    pub const MAGIC: usize = 12;
    /// `u8` format version (outside the CRC).
    pub const VERSION: usize = 14;
    /// `u8` reserved, 0 (outside the CRC).
    pub const RESERVED_1: usize = 15;
    /// `u32` CRC-32/ISO-HDLC of every byte after this field.
    pub const CRC: usize = 16;
    /// `u16` attributes; the first byte the CRC covers.
    pub const ATTRIBUTES: usize = 20;
    /// `u16` reserved, 0.
    pub const RESERVED_2: usize = 22;
    /// `u32` last offset delta = record count − 1.
    pub const LAST_OFFSET_DELTA: usize = 24;
    /// `u32` record count.
    pub const RECORD_COUNT: usize = 28;
    /// `i64` first timestamp: the base of the records' timestamp deltas.
    pub const FIRST_TIMESTAMP: usize = 32;
    /// `i64` max timestamp.
    pub const MAX_TIMESTAMP: usize = 40;
    /// `i64` producer id.
    pub const PRODUCER_ID: usize = 48;
    /// `i16` producer epoch.
    pub const PRODUCER_EPOCH: usize = 56;
    /// `u16` reserved, 0.
    pub const RESERVED_3: usize = 58;
    /// `i32` base sequence.
    pub const BASE_SEQUENCE: usize = 60;
    /// The first record.
    pub const RECORDS: usize = super::HEADER_LEN;
}

/// What is wrong with a batch's bytes, or with a record that cannot be encoded.
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
    #[error("bad magic bytes {found:02x?}, expected \"RL\"")]
    BadMagic {
        /// The two bytes found at offset 12.
        found: [u8; 2],
    },
    /// The version is not one this code reads; it is refused, never guessed at.
    #[error("unsupported batch version {0}")]
    UnsupportedVersion(u8),
    /// A reserved header field is not zero.
    #[error("reserved header field at byte {offset} is not zero")]
    NonZeroReserved {
        /// The field's byte offset in the header.
        offset: usize,
    },
    /// The CRC does not match the bytes.
    #[error("checksum mismatch: stored {expected:#010x}, computed {actual:#010x}")]
    ChecksumMismatch {
        /// The CRC in the header.
        expected: u32,
        /// The CRC of the bytes.
        actual: u32,
    },
    /// The batch does not fit where it stands: a caller found its length or its base offset
    /// inconsistent with its surroundings (the buffer holding it, the previous batch).
    #[error("batch length or base offset does not fit where the batch stands")]
    BadLength,
    /// The batch length field is impossible for its header or its record count.
    #[error("bad batch length {batch_length}: {reason}")]
    BadBatchLength {
        /// The length field.
        batch_length: u32,
        /// What is wrong.
        reason: &'static str,
    },
    /// The record count is zero, or disagrees with the last offset delta.
    #[error("bad record count {record_count} with last offset delta {last_offset_delta}")]
    BadRecordCount {
        /// The record count field.
        record_count: u32,
        /// The last offset delta field.
        last_offset_delta: u32,
    },
    /// The batch's offsets would pass `u64::MAX`.
    #[error("base offset {base_offset} plus {record_count} records overflows")]
    OffsetOverflow {
        /// The base offset field.
        base_offset: u64,
        /// The record count field.
        record_count: u32,
    },
    /// A compression codec this code does not implement.
    #[error("unsupported compression codec {0} (known: 0 none, 1 lz4, 2 zstd)")]
    UnsupportedCompression(u8),
    /// The batch's records are compressed with this codec: decompress it first
    /// ([`decompress`]) to read them, or to compress it with another codec.
    #[error("the batch's records are compressed (codec {0}): decompress it first")]
    Compressed(u8),
    /// The compressed records section does not decompress: damaged or truncated data.
    #[error("compressed records (codec {codec}) do not decompress: {reason}")]
    BadCompressedData {
        /// The codec's value.
        codec: u8,
        /// What the decompressor reported.
        reason: String,
    },
    /// The records decompress to more than the limit allows (a decompression bomb, or just
    /// a batch too large for this partition).
    #[error(
        "compressed batch (codec {codec}) decompresses to more than {max_bytes} bytes \
         (at least {decompressed_bytes})"
    )]
    DecompressedTooLarge {
        /// The codec's value.
        codec: u8,
        /// How many bytes the batch decompressed to before it was stopped.
        decompressed_bytes: usize,
        /// The limit.
        max_bytes: usize,
    },
    /// Unknown attribute bits are set.
    #[error("unknown attribute bits in {0:#06x}")]
    UnknownAttributes(u16),
    /// A record is malformed.
    #[error("bad record {index}: {reason}")]
    BadRecord {
        /// The record's index in the batch.
        index: u32,
        /// What is wrong.
        reason: &'static str,
    },
    /// A record header's key is not UTF-8.
    #[error("record {index}: header {header} key is not UTF-8")]
    InvalidUtf8Header {
        /// The record's index in the batch.
        index: u32,
        /// The header's index in the record.
        header: u16,
    },
    /// The header's max timestamp is not the largest record timestamp.
    #[error("max timestamp {stored} in the header, but the largest record timestamp is {actual}")]
    MaxTimestampMismatch {
        /// The header's max timestamp.
        stored: i64,
        /// The largest record timestamp.
        actual: i64,
    },
    /// A record's timestamp delta, added to the batch's first timestamp, overflows an `i64`.
    #[error(
        "record {index}: timestamp overflows: the batch's first timestamp {first} plus the \
         record's delta {delta} does not fit a 64-bit millisecond timestamp"
    )]
    TimestampOverflow {
        /// The record's index in the batch.
        index: u32,
        /// The batch's first timestamp.
        first: i64,
        /// The record's timestamp delta.
        delta: i64,
    },
    /// A record timestamp is further ahead of the broker's clock than the topic allows.
    #[error(
        "record timestamp {timestamp_ms} is more than timestamp_after_max_ms = {max_ms} ms \
         ahead of the broker's clock ({now_ms})"
    )]
    TimestampTooNew {
        /// The record's timestamp, in ms since the epoch.
        timestamp_ms: i64,
        /// The broker's clock, in ms since the epoch.
        now_ms: i64,
        /// The topic's bound, `timestamp_after_max_ms`.
        max_ms: u64,
    },
    /// A record timestamp is further behind the broker's clock than the topic allows.
    #[error(
        "record timestamp {timestamp_ms} is more than timestamp_before_max_ms = {max_ms} ms \
         behind the broker's clock ({now_ms})"
    )]
    TimestampTooOld {
        /// The record's timestamp, in ms since the epoch.
        timestamp_ms: i64,
        /// The broker's clock, in ms since the epoch.
        now_ms: i64,
        /// The topic's bound, `timestamp_before_max_ms`.
        max_ms: u64,
    },
    /// Encoding: a record's timestamp is too far from the batch's first timestamp for its
    /// delta to fit in an `i64`.
    #[error(
        "timestamps overflow: record timestamp {timestamp} is too far from the batch's first \
         timestamp {first} for their difference to fit 64 bits"
    )]
    TimestampOutOfRange {
        /// The batch's first timestamp.
        first: i64,
        /// The record's timestamp.
        timestamp: i64,
    },
    /// Encoding: a length or count exceeds what its field can hold.
    #[error("{what} of {len} exceeds the format's limit of {max}")]
    TooLarge {
        /// Which length or count.
        what: &'static str,
        /// Its value.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// Encoding: a batch needs at least one record.
    #[error("empty batch: a batch needs at least one record")]
    Empty,
}

#[cfg(test)]
mod tests;
