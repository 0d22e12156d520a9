"""Unit tests of rill_batch against the annotated example batch in storage/FORMAT.md.

The Rust codec's tests check the same bytes, so the Python decoder and the broker agree on
the format. Run: python -m unittest test_batch
"""

import pathlib
import re
import struct
import unittest
import zlib

from rill_batch import BatchError, Record, decode_batch, decode_batches

FORMAT_MD = pathlib.Path(__file__).resolve().parent.parent.parent / "storage" / "FORMAT.md"
_HEX_LINE = re.compile(r"^((?:[0-9a-f]{2} )*[0-9a-f]{2})(?:\s{2,}|$)")


def example_batch() -> bytes:
    """The bytes of the example batch in FORMAT.md (the block after `<!-- example-batch`)."""
    text = FORMAT_MD.read_text(encoding="utf-8")
    start = text.index("<!-- example-batch")
    block = text[text.index("```text", start) + len("```text") : text.index("```\n", start + 30)]
    out = bytearray()
    for line in block.strip().splitlines():
        match = _HEX_LINE.match(line)
        if not match:
            raise AssertionError(f"FORMAT.md example: no bytes on line {line!r}")
        out.extend(bytes.fromhex(match.group(1)))
    return bytes(out)


def with_crc(batch: bytearray) -> bytes:
    """Recomputes the CRC after a deliberate change, so a later check is the one that fails."""
    struct.pack_into("<I", batch, 16, zlib.crc32(bytes(batch[20:])))
    return bytes(batch)


class ExampleBatch(unittest.TestCase):
    """The FORMAT.md example decodes to exactly the records it describes."""

    def test_decodes_the_documented_records(self):
        batch = example_batch()
        self.assertEqual(len(batch), 127)
        self.assertEqual(
            decode_batch(batch),
            [
                Record(0, 1_700_000_000_000, b"k", b"v1", [("h", b"x")]),
                Record(1, 1_700_000_000_005, None, b"", []),
            ],
        )

    def test_a_stamped_base_offset_needs_no_new_crc(self):
        # The broker stamps the base offset into a client's batch without recomputing the
        # CRC: a decoder that checked the CRC over the whole batch would refuse every batch.
        batch = bytearray(example_batch())
        struct.pack_into("<Q", batch, 0, 1000)
        self.assertEqual([r.offset for r in decode_batch(bytes(batch))], [1000, 1001])

    def test_batches_back_to_back(self):
        first = bytearray(example_batch())
        second = bytearray(example_batch())
        struct.pack_into("<Q", second, 0, 2)
        self.assertEqual([r.offset for r in decode_batches(bytes(first + second))], [0, 1, 2, 3])


class Refused(unittest.TestCase):
    """A batch that fails any check is refused whole, never partly served."""

    def assert_refused(self, batch: bytes, why: str):
        with self.assertRaisesRegex(BatchError, why):
            decode_batch(batch)

    def test_a_flipped_byte_fails_the_crc(self):
        for position in (33, 70, 100, 126):
            batch = bytearray(example_batch())
            batch[position] ^= 0x01
            self.assert_refused(bytes(batch), "CRC")

    def test_a_truncated_batch(self):
        batch = example_batch()
        self.assert_refused(batch[:63], "shorter than the 64-byte header")
        self.assert_refused(batch[:-1], "does not frame")
        with self.assertRaisesRegex(BatchError, "too short"):
            decode_batches(batch + batch[:5])

    def test_wrong_magic_version_reserved_or_codec(self):
        for position, value, why in (
            (12, ord("X"), "magic"),
            (14, 2, "version"),
            (15, 1, "reserved"),
            (20, 1, "attributes"),
        ):
            batch = bytearray(example_batch())
            batch[position] = value
            self.assert_refused(with_crc(batch), why)

    def test_inconsistent_record_count(self):
        batch = bytearray(example_batch())
        struct.pack_into("<I", batch, 28, 3)
        self.assert_refused(with_crc(batch), "record count")

    def test_a_record_length_past_the_batch(self):
        batch = bytearray(example_batch())
        struct.pack_into("<I", batch, 64, 200)
        self.assert_refused(with_crc(batch), "record length")

    def test_a_header_key_that_is_not_utf8(self):
        batch = bytearray(example_batch())
        # Record 0's one header key "h" is the byte after "01 00" following the header count.
        position = batch.index(b"\x01\x00\x68")
        batch[position + 2] = 0xFF
        self.assert_refused(with_crc(batch), "UTF-8")

    def test_a_wrong_max_timestamp(self):
        batch = bytearray(example_batch())
        struct.pack_into("<q", batch, 40, 1_700_000_000_004)
        self.assert_refused(with_crc(batch), "max timestamp")


if __name__ == "__main__":
    unittest.main()
