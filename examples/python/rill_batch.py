"""Decodes Rill record batches, as a Fetch with FETCH_ENCODING_RAW_BATCHES returns them.

The layout is storage/FORMAT.md, "Record batch": a 64-byte header, then the records, all
integers little-endian. The checksum is CRC-32/ISO-HDLC, which is exactly zlib.crc32 (not
CRC-32C), over every byte after the CRC field. A batch that fails any check is refused
whole: no record of it is ever handed out.

Only the standard library is used, so this file can be copied into any project.
"""

import struct
import zlib
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

# base offset u64, batch length u32, magic 2s, version u8, reserved u8, crc u32,
# attributes u16, reserved u16, last offset delta u32, record count u32,
# first timestamp i64, max timestamp i64, producer id i64, producer epoch i16,
# reserved u16, base sequence i32: 64 bytes in all.
_HEADER = struct.Struct("<QI2sBBIHHIIqqqhHi")
HEADER_BYTES = _HEADER.size
assert HEADER_BYTES == 64
MAGIC = b"RL"
VERSION = 1
# Bytes of the header after the batch length field: the batch length is at least this.
_HEADER_AFTER_LENGTH = HEADER_BYTES - 12
# The smallest record (empty value, null key, no headers).
_MIN_RECORD_BYTES = 26
# Attribute bits 0-2: the codec (0 = none, the only one in version 1); bit 3: timestamp type.
_ATTR_CODEC_MASK = 0b0111
_ATTR_KNOWN_MASK = 0b1111
_I64_MIN, _I64_MAX = -(2**63), 2**63 - 1
_U64_MAX = 2**64 - 1


class BatchError(ValueError):
    """The bytes are not a valid batch; the message says which check failed and where."""


@dataclass
class Record:
    """One record: the same fields as rill.v1.FetchedRecord."""

    offset: int
    timestamp_ms: int
    key: Optional[bytes]
    value: bytes
    headers: List[Tuple[str, bytes]] = field(default_factory=list)


def decode_batches(data: bytes) -> List[Record]:
    """Decodes every batch in `data` (one or more back to back) into records."""
    records: List[Record] = []
    pos = 0
    while pos < len(data):
        size = batch_size(data, pos)
        records.extend(decode_batch(data[pos : pos + size]))
        pos += size
    return records


def batch_size(data: bytes, pos: int = 0) -> int:
    """The total size of the batch starting at `pos`, from its length field."""
    if len(data) - pos < 12:
        raise BatchError(f"at byte {pos}: {len(data) - pos} bytes, too short for a batch")
    (length,) = struct.unpack_from("<I", data, pos + 8)
    return 12 + length


def decode_batch(batch: bytes) -> List[Record]:
    """Checks one whole batch (storage/FORMAT.md, "Validity") and returns its records."""
    if len(batch) < HEADER_BYTES:
        raise BatchError(f"{len(batch)} bytes, shorter than the {HEADER_BYTES}-byte header")
    (
        base_offset,
        length,
        magic,
        version,
        reserved_15,
        crc,
        attributes,
        reserved_22,
        last_offset_delta,
        record_count,
        first_timestamp,
        max_timestamp,
        _producer_id,
        _producer_epoch,
        reserved_58,
        _base_sequence,
    ) = _HEADER.unpack_from(batch, 0)
    where = f"batch at offset {base_offset}"
    if length < _HEADER_AFTER_LENGTH or 12 + length != len(batch):
        raise BatchError(f"{where}: batch length {length} does not frame {len(batch)} bytes")
    if magic != MAGIC:
        raise BatchError(f"{where}: magic {magic!r}, not {MAGIC!r}")
    if version != VERSION:
        raise BatchError(f"{where}: version {version}, this reader knows only {VERSION}")
    if reserved_15 or reserved_22 or reserved_58:
        raise BatchError(f"{where}: a reserved header field is not 0")
    if attributes & ~_ATTR_KNOWN_MASK or attributes & _ATTR_CODEC_MASK:
        raise BatchError(f"{where}: attributes {attributes:#06x} not supported")
    if (
        record_count < 1
        or last_offset_delta != record_count - 1
        or record_count * _MIN_RECORD_BYTES > length - _HEADER_AFTER_LENGTH
        or base_offset + record_count > _U64_MAX
    ):
        raise BatchError(f"{where}: record count {record_count} is inconsistent")
    # The CRC covers bytes [20, end): everything after the CRC field. The base offset,
    # which the broker stamps into batches clients built, lies outside it.
    actual = zlib.crc32(batch[20:])
    if actual != crc:
        raise BatchError(f"{where}: CRC {actual:#010x} does not match the stored {crc:#010x}")

    records = []
    pos = HEADER_BYTES
    largest = None
    for delta in range(record_count):
        record, pos = _decode_record(batch, pos, base_offset, first_timestamp, delta, where)
        largest = record.timestamp_ms if largest is None else max(largest, record.timestamp_ms)
        records.append(record)
    if pos != len(batch):
        raise BatchError(f"{where}: {len(batch) - pos} bytes after the last record")
    if largest != max_timestamp:
        raise BatchError(f"{where}: max timestamp {max_timestamp}, records' largest {largest}")
    return records


def _decode_record(
    batch: bytes, pos: int, base_offset: int, first_timestamp: int, delta: int, where: str
) -> Tuple[Record, int]:
    """Decodes the record at `pos`; returns it and the position after it."""
    here = f"{where}, record {delta}"
    if len(batch) - pos < _MIN_RECORD_BYTES:
        raise BatchError(f"{here}: truncated")
    record_length, offset_delta, timestamp_delta, key_length = struct.unpack_from(
        "<IIqi", batch, pos
    )
    end = pos + 4 + record_length
    if record_length < _MIN_RECORD_BYTES - 4 or end > len(batch):
        raise BatchError(f"{here}: record length {record_length} does not fit the batch")
    if offset_delta != delta:
        raise BatchError(f"{here}: offset delta {offset_delta}, expected {delta}")
    timestamp = first_timestamp + timestamp_delta
    if not _I64_MIN <= timestamp <= _I64_MAX:
        raise BatchError(f"{here}: the timestamp overflows")
    pos += 20

    def take(n: int) -> bytes:
        nonlocal pos
        if n < 0 or pos + n > end:
            raise BatchError(f"{here}: a length runs past the record")
        out = batch[pos : pos + n]
        pos += n
        return out

    def take_u(fmt: str) -> int:
        return struct.unpack("<" + fmt, take(struct.calcsize(fmt)))[0]

    if key_length < -1:
        raise BatchError(f"{here}: key length {key_length}")
    key = None if key_length == -1 else take(key_length)
    value = take(take_u("I"))
    headers = []
    for _ in range(take_u("H")):
        raw_key = take(take_u("H"))
        try:
            header_key = raw_key.decode("utf-8")
        except UnicodeDecodeError as err:
            raise BatchError(f"{here}: a header key is not UTF-8") from err
        headers.append((header_key, take(take_u("I"))))
    if pos != end:
        raise BatchError(f"{here}: {end - pos} bytes left inside the record")
    return Record(base_offset + delta, timestamp, key, value, headers), end
