//! Compression of a batch's records section: the codecs, and the conversions between a plain
//! batch and a compressed one.
//!
//! Only the records section (every byte after the 64-byte header) is compressed; the header
//! stays plain, so framing, offsets, the indexes and the CRC work as for any batch. The CRC
//! covers the bytes as stored, the compressed records included. Decompression is always
//! bounded: a batch whose records would decompress past the caller's limit is refused before
//! more than the limit (plus one byte) is produced, so a small "bomb" cannot exhaust memory.

use std::borrow::Cow;
use std::fmt;
use std::io::Read;
use std::str::FromStr;

use bytes::Bytes;

use super::header::BatchHeader;
use super::{field, BatchError, ATTR_COMPRESSION_MASK, CRC_START, HEADER_LEN, LENGTH_PREFIX_LEN};

/// The largest batch a compressed batch may decompress to under the format (1 GiB). The
/// broker's own limit (its `max_batch_bytes`) is lower and is what a produce is held to; this
/// bound is what a reader with no better limit (recovery) uses.
pub const MAX_DECOMPRESSED_BATCH_BYTES: usize = 1 << 30;

/// zstd's compression level: its default, a good ratio at several hundred MB/s.
const ZSTD_LEVEL: i32 = 3;

/// A compression codec, as stored in attribute bits 0–2.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Codec {
    /// No compression (0).
    #[default]
    None,
    /// LZ4 block format with the decompressed size in front (1).
    Lz4,
    /// One Zstandard frame (2).
    Zstd,
}

impl Codec {
    /// The attribute bits value.
    pub fn bits(self) -> u8 {
        match self {
            Codec::None => 0,
            Codec::Lz4 => 1,
            Codec::Zstd => 2,
        }
    }

    /// The codec of attribute value `bits`, or `None` for a value no codec has.
    pub fn from_bits(bits: u8) -> Option<Codec> {
        match bits {
            0 => Some(Codec::None),
            1 => Some(Codec::Lz4),
            2 => Some(Codec::Zstd),
            _ => None,
        }
    }

    /// Its name: `none`, `lz4` or `zstd`.
    pub fn name(self) -> &'static str {
        match self {
            Codec::None => "none",
            Codec::Lz4 => "lz4",
            Codec::Zstd => "zstd",
        }
    }
}

impl fmt::Display for Codec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Codec {
    type Err = String;

    /// Parses `none`, `lz4` or `zstd`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "none" => Ok(Codec::None),
            "lz4" => Ok(Codec::Lz4),
            "zstd" => Ok(Codec::Zstd),
            other => Err(format!(
                "unknown compression codec {other:?}: expected none, lz4 or zstd"
            )),
        }
    }
}

/// The batch's codec. The header parse already refused values no codec has.
fn codec_of(header: &BatchHeader) -> Result<Codec, BatchError> {
    let bits = header.compression_codec();
    Codec::from_bits(bits).ok_or(BatchError::UnsupportedCompression(bits))
}

/// Rebuilds a batch from `header` with `records` as its records section and `codec` in its
/// attributes: the length and the CRC are recomputed; everything else in the header is kept.
fn rebuild(header_bytes: &[u8], records: &[u8], codec: Codec) -> Result<Vec<u8>, BatchError> {
    let batch_length =
        u32::try_from(HEADER_LEN - LENGTH_PREFIX_LEN + records.len()).map_err(|_| {
            BatchError::TooLarge {
                what: "batch",
                len: HEADER_LEN + records.len(),
                max: u32::MAX as usize,
            }
        })?;
    let mut out = Vec::with_capacity(HEADER_LEN + records.len());
    out.extend_from_slice(header_bytes);
    out.extend_from_slice(records);
    out[field::BATCH_LENGTH..field::BATCH_LENGTH + 4].copy_from_slice(&batch_length.to_le_bytes());
    let attrs = u16::from_le_bytes([out[field::ATTRIBUTES], out[field::ATTRIBUTES + 1]]);
    let attrs = (attrs & !ATTR_COMPRESSION_MASK) | u16::from(codec.bits());
    out[field::ATTRIBUTES..field::ATTRIBUTES + 2].copy_from_slice(&attrs.to_le_bytes());
    let crc = crc32fast::hash(&out[CRC_START..]);
    out[field::CRC..field::CRC + 4].copy_from_slice(&crc.to_le_bytes());
    Ok(out)
}

/// The header and records section of the whole batch at the start of `batch`.
fn split(batch: &[u8]) -> Result<(BatchHeader, &[u8], &[u8]), BatchError> {
    let header = BatchHeader::parse(batch)?;
    let end = header.total_len();
    let whole = batch.get(..end).ok_or(BatchError::Truncated {
        needed: end,
        available: batch.len(),
    })?;
    let (head, records) = whole.split_at(HEADER_LEN);
    Ok((header, head, records))
}

/// Compresses the plain batch at the start of `batch` with `codec`: the same header fields
/// and records, the records section compressed, the length and CRC recomputed. `Codec::None`
/// returns the batch as it is. A batch already compressed is refused (decompress it first).
pub fn compress(batch: &[u8], codec: Codec) -> Result<Bytes, BatchError> {
    let (header, head, records) = split(batch)?;
    let current = codec_of(&header)?;
    if current != Codec::None {
        return Err(BatchError::Compressed(current.bits()));
    }
    let compressed = match codec {
        Codec::None => return Ok(Bytes::copy_from_slice(&batch[..header.total_len()])),
        Codec::Lz4 => lz4_flex::block::compress_prepend_size(records),
        Codec::Zstd => zstd::bulk::compress(records, ZSTD_LEVEL).map_err(|e| {
            BatchError::BadCompressedData {
                codec: Codec::Zstd.bits(),
                reason: e.to_string(),
            }
        })?,
    };
    rebuild(head, &compressed, codec).map(Bytes::from)
}

/// The plain equivalent of the batch at the start of `batch`: for a compressed batch, the same
/// header fields with codec 0 and the records decompressed (length and CRC recomputed); a
/// plain batch is returned as it is, borrowed. The decompressed batch may take at most
/// `max_batch_bytes`, or the batch is refused ([`BatchError::DecompressedTooLarge`]) having
/// produced no more than that. Damaged or truncated compressed data is
/// [`BatchError::BadCompressedData`]. The CRC is checked first; the records of the result are
/// not (see [`super::BatchView::validate`]).
pub fn decompress(batch: &[u8], max_batch_bytes: usize) -> Result<Cow<'_, [u8]>, BatchError> {
    let (header, head, records) = split(batch)?;
    let codec = codec_of(&header)?;
    if codec != Codec::None {
        super::verify_crc(batch)?;
    }
    let max_records = max_batch_bytes.saturating_sub(HEADER_LEN);
    let too_large = |decompressed: usize| BatchError::DecompressedTooLarge {
        codec: codec.bits(),
        decompressed_bytes: decompressed.saturating_add(HEADER_LEN),
        max_bytes: max_batch_bytes,
    };
    let bad = |reason: String| BatchError::BadCompressedData {
        codec: codec.bits(),
        reason,
    };
    let plain = match codec {
        Codec::None => return Ok(Cow::Borrowed(&batch[..header.total_len()])),
        Codec::Lz4 => {
            let (size, block) = records
                .split_first_chunk::<4>()
                .ok_or_else(|| bad("shorter than its 4-byte size prefix".into()))?;
            let size = u32::from_le_bytes(*size) as usize;
            // The size is checked before anything is allocated for it.
            if size > max_records {
                return Err(too_large(size));
            }
            let out = lz4_flex::block::decompress(block, size).map_err(|e| bad(e.to_string()))?;
            if out.len() != size {
                return Err(bad(format!(
                    "decompressed to {} bytes, but its prefix says {size}",
                    out.len()
                )));
            }
            out
        }
        Codec::Zstd => {
            let decoder = zstd::stream::read::Decoder::with_buffer(records)
                .map_err(|e| bad(e.to_string()))?
                .single_frame();
            let mut out = Vec::new();
            // One byte past the limit tells a bomb from a batch exactly at the limit.
            decoder
                .take(max_records as u64 + 1)
                .read_to_end(&mut out)
                .map_err(|e| bad(e.to_string()))?;
            if out.len() > max_records {
                return Err(too_large(out.len()));
            }
            out
        }
    };
    rebuild(head, &plain, Codec::None).map(Cow::Owned)
}
