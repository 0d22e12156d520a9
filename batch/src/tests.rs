//! Codec tests: the spec's example, round trips, and robustness against arbitrary and
//! damaged bytes.

use super::*;
use bytes::{Bytes, BytesMut};
use proptest::prelude::*;

fn sample() -> Vec<Record> {
    vec![
        Record {
            key: Some(Bytes::from_static(b"k1")),
            value: Bytes::from_static(b"hello"),
            headers: vec![("trace".into(), Bytes::from_static(b"abc"))],
            timestamp_ms: 1_000,
        },
        Record {
            key: None,
            value: Bytes::new(),
            headers: vec![],
            timestamp_ms: 990,
        },
        Record {
            key: Some(Bytes::new()),
            value: Bytes::from_static(b"x"),
            headers: vec![
                ("a".into(), Bytes::new()),
                ("é".into(), Bytes::from_static(b"v")),
            ],
            timestamp_ms: 1_500,
        },
    ]
}

/// Validates and decodes a batch into owned records, as a consumer would.
fn decode(buf: &[u8]) -> Result<Vec<Record>, BatchError> {
    let view = BatchView::parse(buf)?;
    view.validate()?;
    view.records()
        .map(|r| {
            let r = r?;
            Ok(Record {
                key: r.key.map(Bytes::copy_from_slice),
                value: Bytes::copy_from_slice(r.value),
                headers: r
                    .headers()
                    .map(|h| h.map(|(k, v)| (k.to_string(), Bytes::copy_from_slice(v))))
                    .collect::<Result<_, _>>()?,
                timestamp_ms: r.timestamp_ms,
            })
        })
        .collect()
}

/// Recomputes the CRC after a test edited covered bytes, so the structural checks are what
/// catches the edit.
fn reseal(b: &mut [u8]) {
    let crc = crc32fast::hash(&b[CRC_START..]);
    b[CRC_OFFSET..CRC_START].copy_from_slice(&crc.to_le_bytes());
}

#[test]
fn the_checksum_is_crc32_iso_hdlc() {
    // The standard check value of CRC-32/ISO-HDLC; CRC-32C would give 0xE3069283.
    assert_eq!(crc32fast::hash(b"123456789"), 0xCBF4_3926);
    let b = encode_batch(&sample());
    let stored = u32::from_le_bytes([b[16], b[17], b[18], b[19]]);
    assert_eq!(stored, crc32fast::hash(&b[20..]));
}

#[test]
fn the_spec_example_is_what_the_builder_writes() {
    // The annotated example in FORMAT.md is normative: read its hex back and compare.
    let spec = include_str!("../../storage/FORMAT.md");
    let start = spec
        .find("<!-- example-batch")
        .expect("FORMAT.md has the example");
    let block = &spec[start..];
    let block = &block[block.find("```text\n").expect("block start") + 8..];
    let block = &block[..block.find("```").expect("block end")];
    let expected: Vec<u8> = block
        .lines()
        .flat_map(|line| {
            line.split_whitespace()
                .take_while(|t| t.len() == 2 && t.bytes().all(|c| c.is_ascii_hexdigit()))
                .map(|t| u8::from_str_radix(t, 16).expect("hex"))
        })
        .collect();
    let ts = 1_700_000_000_000;
    let mut b = BatchBuilder::default();
    b.push(Some(&b"k"[..]), b"v1", &[("h", &b"x"[..])], ts);
    b.push(None, b"", &[], ts + 5);
    let built = b.try_finish().expect("batch");
    assert_eq!(built.as_ref(), expected.as_slice());
    assert_eq!(built.len(), 127);
    decode(&built).expect("valid");
}

#[test]
fn round_trip_keeps_every_field() {
    let records = sample();
    let mut b = encode_batch(&records).to_vec();
    stamp_base_offset(&mut b, 42);
    let view = BatchView::parse(&b).expect("parse");
    let h = view.header();
    assert_eq!(
        (h.base_offset, h.record_count, h.last_offset_delta),
        (42, 3, 2)
    );
    assert_eq!((h.first_timestamp, h.max_timestamp), (1_000, 1_500));
    assert_eq!(
        (h.producer_id, h.producer_epoch, h.base_sequence),
        (-1, -1, -1)
    );
    assert_eq!((h.last_offset(), h.next_offset()), (44, 45));
    assert!(!h.log_append_time());
    assert_eq!(h.compression_codec(), 0);
    assert_eq!(decode(&b).expect("decode"), records);
    let offsets: Vec<u64> = view.records().map(|r| r.expect("record").offset).collect();
    assert_eq!(offsets, vec![42, 43, 44]);
}

#[test]
fn producer_fields_and_timestamp_type_round_trip() {
    let mut b = BatchBuilder::new(BytesMut::with_capacity(256))
        .with_producer(7, 3, 100)
        .with_log_append_time();
    b.push(None, b"v", &[], 5);
    let batch = b.finish();
    let view = BatchView::parse(&batch).expect("parse");
    view.validate().expect("valid");
    let h = view.header();
    assert_eq!(
        (h.producer_id, h.producer_epoch, h.base_sequence),
        (7, 3, 100)
    );
    assert!(h.log_append_time());
    assert_eq!(h.attributes, ATTR_LOG_APPEND_TIME);
}

#[test]
fn stamping_the_base_offset_keeps_the_checksum_valid() {
    let mut b = encode_batch(&sample()).to_vec();
    for base in [0, 1, u64::MAX / 2, u64::MAX - 3] {
        stamp_base_offset(&mut b, base);
        verify_crc(&b).expect("crc still valid");
        BatchView::parse(&b)
            .expect("parse")
            .validate()
            .expect("valid");
    }
    // Offsets past u64::MAX are refused.
    stamp_base_offset(&mut b, u64::MAX - 2);
    assert!(matches!(
        BatchHeader::parse(&b),
        Err(BatchError::OffsetOverflow { .. })
    ));
    // A buffer too short for the field is left alone rather than panicking.
    let mut short = [1u8; 5];
    stamp_base_offset(&mut short, 9);
    assert_eq!(short, [1u8; 5]);
}

#[test]
fn zeros_and_short_buffers_are_rejected() {
    assert_eq!(
        BatchHeader::parse(&[0u8; 64]),
        Err(BatchError::BadMagic { found: [0, 0] })
    );
    assert_eq!(
        BatchView::parse(&[0u8; 4096]).err(),
        Some(BatchError::BadMagic { found: [0, 0] })
    );
    assert_eq!(
        BatchHeader::parse(&[0u8; 10]),
        Err(BatchError::Truncated {
            needed: 64,
            available: 10
        })
    );
    let b = encode_batch(&sample());
    assert_eq!(
        BatchView::parse(&b[..b.len() - 1]).err(),
        Some(BatchError::Truncated {
            needed: b.len(),
            available: b.len() - 1
        })
    );
    assert!(matches!(
        verify_crc(&b[..b.len() - 1]),
        Err(BatchError::Truncated { .. })
    ));
    assert_eq!(peek_total_len(&b), Some(b.len()));
    assert_eq!(peek_total_len(&b[..11]), None);
    assert_eq!(peek_total_len(&[0u8; 12]), Some(12));
}

#[test]
fn header_rules_are_enforced() {
    let good = encode_batch(&sample()).to_vec();
    let with = |at: usize, bytes: &[u8]| {
        let mut b = good.clone();
        b[at..at + bytes.len()].copy_from_slice(bytes);
        b
    };
    let parse = |b: &[u8]| BatchHeader::parse(b).err();
    assert_eq!(
        parse(&with(field::VERSION, &[2])),
        Some(BatchError::UnsupportedVersion(2))
    );
    for (at, offset) in [
        (field::RESERVED_1, field::RESERVED_1),
        (field::RESERVED_2, field::RESERVED_2),
        (field::RESERVED_2 + 1, field::RESERVED_2),
        (field::RESERVED_3, field::RESERVED_3),
        (field::RESERVED_3 + 1, field::RESERVED_3),
    ] {
        assert_eq!(
            parse(&with(at, &[1])),
            Some(BatchError::NonZeroReserved { offset })
        );
    }
    assert_eq!(
        parse(&with(field::ATTRIBUTES, &[3, 0])),
        Some(BatchError::UnsupportedCompression(3))
    );
    assert_eq!(
        parse(&with(field::ATTRIBUTES, &[0x10, 0])),
        Some(BatchError::UnknownAttributes(0x10))
    );
    assert!(matches!(
        parse(&with(field::RECORD_COUNT, &0u32.to_le_bytes())),
        Some(BatchError::BadRecordCount {
            record_count: 0,
            ..
        })
    ));
    assert!(matches!(
        parse(&with(field::LAST_OFFSET_DELTA, &5u32.to_le_bytes())),
        Some(BatchError::BadRecordCount { .. })
    ));
    assert!(matches!(
        parse(&with(field::BATCH_LENGTH, &51u32.to_le_bytes())),
        Some(BatchError::BadBatchLength {
            batch_length: 51,
            ..
        })
    ));
    // A huge count with a matching delta is refused by the header check alone, before any
    // caller could size a buffer by it.
    let mut b = with(field::RECORD_COUNT, &u32::MAX.to_le_bytes());
    b[field::LAST_OFFSET_DELTA..field::LAST_OFFSET_DELTA + 4]
        .copy_from_slice(&(u32::MAX - 1).to_le_bytes());
    assert!(matches!(parse(&b), Some(BatchError::BadBatchLength { .. })));
}

#[test]
fn record_rules_are_enforced() {
    // One record: null key, value "v", one header "h" = "x".
    let mut builder = BatchBuilder::default();
    builder.push(None, b"v", &[("h", &b"x"[..])], 10);
    let good = builder.finish().to_vec();
    let r = HEADER_LEN; // the record's start
    let err = |edit: &dyn Fn(&mut Vec<u8>)| {
        let mut b = good.clone();
        edit(&mut b);
        reseal(&mut b);
        BatchView::parse(&b).and_then(|v| v.validate()).err()
    };
    let bad = |reason: &'static str| Some(BatchError::BadRecord { index: 0, reason });
    assert_eq!(
        err(&|b| b[r + 4] = 1),
        bad("offset delta is not the record's index")
    );
    assert_eq!(err(&|b| b[r + 16] = 0xfe), bad("key length below -1"));
    assert_eq!(err(&|b| b[r] += 1), bad("record length exceeds the batch"));
    // Header key "h" (at r + 29) becomes a lone continuation byte.
    assert_eq!(
        err(&|b| b[r + 29] = 0x80),
        Some(BatchError::InvalidUtf8Header {
            index: 0,
            header: 0
        })
    );
    // A timestamp delta that overflows the first timestamp.
    assert_eq!(
        err(&|b| {
            b[field::FIRST_TIMESTAMP..field::FIRST_TIMESTAMP + 8]
                .copy_from_slice(&i64::MAX.to_le_bytes());
            b[r + 8..r + 16].copy_from_slice(&1i64.to_le_bytes());
        }),
        Some(BatchError::TimestampOverflow {
            index: 0,
            first: i64::MAX,
            delta: 1
        })
    );
    // A byte after the last header, with both lengths grown to cover it.
    assert_eq!(
        err(&|b| {
            b.push(0);
            b[r] += 1;
            b[field::BATCH_LENGTH] += 1;
        }),
        bad("bytes after the last header")
    );
    // A byte after the last record, with the batch length grown to cover it.
    assert_eq!(
        err(&|b| {
            b.push(0);
            b[field::BATCH_LENGTH] += 1;
        }),
        Some(BatchError::BadRecord {
            index: 1,
            reason: "bytes after the last record"
        })
    );
    assert_eq!(
        err(&|b| b[field::MAX_TIMESTAMP] = 11),
        Some(BatchError::MaxTimestampMismatch {
            stored: 11,
            actual: 10
        })
    );
}

#[test]
fn a_damaged_checksum_is_reported_with_both_values() {
    let mut b = encode_batch(&sample()).to_vec();
    b[field::CRC] ^= 1;
    let stored = u32::from_le_bytes([b[16], b[17], b[18], b[19]]);
    assert_eq!(
        verify_crc(&b),
        Err(BatchError::ChecksumMismatch {
            expected: stored,
            actual: stored ^ 1
        })
    );
}

#[test]
fn batches_walks_concatenated_batches() {
    let mut buf = Vec::new();
    for i in 0..5u64 {
        let mut b = encode_batch(&sample()).to_vec();
        stamp_base_offset(&mut b, i * 3);
        buf.extend_from_slice(&b);
    }
    let bases: Vec<u64> = batches(&buf)
        .map(|v| v.expect("batch").header().base_offset)
        .collect();
    assert_eq!(bases, vec![0, 3, 6, 9, 12]);
    let one = buf.len() / 5;
    buf.extend_from_slice(&[0u8; 30]);
    let mut walk = batches(&buf);
    assert_eq!(walk.by_ref().take(5).filter(Result::is_ok).count(), 5);
    assert!(
        walk.next().expect("tail").is_err(),
        "a torn tail ends the walk"
    );
    assert_eq!(walk.remaining().len(), 30);
    assert!(walk.next().is_none());
    assert_eq!(one, encode_batch(&sample()).len());
    assert_eq!(batches(&[]).count(), 0);
}

#[test]
fn builder_refuses_what_the_format_cannot_hold() {
    let mut b = BatchBuilder::default();
    b.try_push(None, b"a", &[], i64::MIN).expect("first");
    let before = b.len_bytes();
    assert_eq!(
        b.try_push(None, b"b", &[], 1),
        Err(BatchError::TimestampOutOfRange {
            first: i64::MIN,
            timestamp: 1
        })
    );
    let long_key = "k".repeat(usize::from(u16::MAX) + 1);
    assert!(matches!(
        b.try_push(None, b"b", &[(long_key.as_str(), &b""[..])], i64::MIN),
        Err(BatchError::TooLarge {
            what: "header key length",
            ..
        })
    ));
    let many = vec![("", &b""[..]); usize::from(u16::MAX) + 1];
    assert!(matches!(
        b.try_push(None, b"b", &many, i64::MIN),
        Err(BatchError::TooLarge {
            what: "header count",
            ..
        })
    ));
    // Refusals leave the batch as it was.
    assert_eq!((b.len_bytes(), b.record_count()), (before, 1));
    assert!(b.error().is_none());

    // `push` poisons the builder instead, and `finish` then writes a batch readers refuse.
    b.push(None, b"b", &[], i64::MAX);
    assert!(matches!(
        b.error(),
        Some(BatchError::TimestampOutOfRange { .. })
    ));
    let poisoned = b.finish();
    assert_eq!(poisoned.len(), HEADER_LEN);
    assert!(matches!(
        BatchView::parse(&poisoned),
        Err(BatchError::BadRecordCount {
            record_count: 0,
            ..
        })
    ));

    let mut b = BatchBuilder::default();
    b.push(None, b"a", &[], 1);
    b.push(None, b"b", &[], i64::MIN);
    assert!(matches!(
        b.try_finish(),
        Err(BatchError::TimestampOutOfRange { .. })
    ));
    assert_eq!(BatchBuilder::default().try_finish(), Err(BatchError::Empty));
    assert!(BatchView::parse(&BatchBuilder::default().finish()).is_err());
    assert_eq!(try_encode_batch(&[]), Err(BatchError::Empty));
}

#[test]
fn builder_reuses_its_buffer_and_reports_its_size() {
    let mut buf = BytesMut::with_capacity(4096);
    buf.extend_from_slice(b"left over");
    let mut b = BatchBuilder::new(buf);
    assert!(b.is_empty());
    assert_eq!(b.len_bytes(), HEADER_LEN);
    let headers: [(&str, &[u8]); 1] = [("h", b"xyz")];
    b.push(Some(&b"key"[..]), b"value", &headers, 1);
    let size = record_size(Some(&b"key"[..]), b"value", headers.iter().copied());
    assert_eq!(size, RECORD_OVERHEAD + 3 + 5 + HEADER_OVERHEAD + 1 + 3);
    assert_eq!(b.len_bytes(), HEADER_LEN + size);
    let batch = b.finish();
    assert_eq!(batch.len(), HEADER_LEN + size);
    decode(&batch).expect("valid");
}

/// Arbitrary header keys: any chars, so any UTF-8, up to 12 of them.
fn arb_header_key() -> impl Strategy<Value = String> {
    proptest::collection::vec(any::<char>(), 0..12).prop_map(String::from_iter)
}

/// A record with a timestamp `delta` from some base; the base is added later.
fn arb_record() -> impl Strategy<Value = Record> {
    (
        proptest::option::of(proptest::collection::vec(any::<u8>(), 0..32)),
        proptest::collection::vec(any::<u8>(), 0..3000),
        proptest::collection::vec(
            (
                arb_header_key(),
                proptest::collection::vec(any::<u8>(), 0..16),
            ),
            0..=4,
        ),
        -(1i64 << 40)..(1i64 << 40),
    )
        .prop_map(|(key, value, headers, delta)| Record {
            key: key.map(Bytes::from),
            value: Bytes::from(value),
            headers: headers
                .into_iter()
                .map(|(k, v)| (k, Bytes::from(v)))
                .collect(),
            timestamp_ms: delta,
        })
}

/// 1–20 records whose timestamps lie within ±2^40 of an arbitrary base.
fn arb_records() -> impl Strategy<Value = Vec<Record>> {
    (
        proptest::collection::vec(arb_record(), 1..20),
        (i64::MIN + (1 << 41))..(i64::MAX - (1 << 41)),
    )
        .prop_map(|(mut records, base)| {
            for r in &mut records {
                r.timestamp_ms += base;
            }
            records
        })
}

proptest! {
    #[test]
    fn round_trip(records in arb_records(), base in 0u64..(1 << 60)) {
        let built = try_encode_batch(&records).expect("encodable");
        let mut b = built.to_vec();
        stamp_base_offset(&mut b, base);
        prop_assert_eq!(decode(&b).expect("decode"), records.clone());
        let view = BatchView::parse(&b).expect("view");
        let h = *view.header();
        prop_assert_eq!(h.base_offset, base);
        prop_assert_eq!(h.record_count as usize, records.len());
        prop_assert_eq!(h.last_offset_delta as usize, records.len() - 1);
        prop_assert_eq!(h.next_offset(), base + records.len() as u64);
        prop_assert_eq!(h.first_timestamp, records[0].timestamp_ms);
        let max = records.iter().map(|r| r.timestamp_ms).max().expect("non-empty");
        prop_assert_eq!(h.max_timestamp, max);
        prop_assert_eq!(h.total_len(), b.len());
        prop_assert_eq!(peek_total_len(&b), Some(b.len()));
        let sizes: usize = records.iter().map(Record::encoded_len).sum();
        prop_assert_eq!(sizes + HEADER_LEN, b.len());
        // Offsets run base.., and keys and values are views into the batch's own bytes.
        let range = b.as_ptr_range();
        for (i, r) in view.records().enumerate() {
            let r = r.expect("record");
            prop_assert_eq!(r.offset, base + i as u64);
            prop_assert!(range.contains(&r.value.as_ptr()) || r.value.is_empty());
            prop_assert_eq!(r.header_count() as usize, records[i].headers.len());
        }
    }

    /// Two timestamps whose difference does not fit an `i64` are refused as an overflow by
    /// the builder, never turned into an empty batch that readers call a bad record count;
    /// two whose difference fits round-trip exactly.
    #[test]
    fn timestamps_that_overflow_are_reported_as_such(a in any::<i64>(), b in any::<i64>()) {
        let records = [a, b].map(|timestamp_ms| Record {
            value: Bytes::from_static(b"v"),
            timestamp_ms,
            ..Default::default()
        });
        match b.checked_sub(a) {
            None => {
                prop_assert_eq!(
                    try_encode_batch(&records),
                    Err(BatchError::TimestampOutOfRange { first: a, timestamp: b })
                );
                let mut builder = BatchBuilder::default();
                builder.push(None, b"v", &[], a);
                builder.push(None, b"v", &[], b);
                prop_assert_eq!(
                    builder.error(),
                    Some(&BatchError::TimestampOutOfRange { first: a, timestamp: b })
                );
                let message = builder.error().map(ToString::to_string).unwrap_or_default();
                prop_assert!(message.contains("overflow"), "{}", message);
            }
            Some(_) => {
                let built = try_encode_batch(&records).expect("encodable");
                prop_assert_eq!(decode(&built).expect("decode"), records.to_vec());
            }
        }
    }

    /// A batch built elsewhere whose first timestamp plus a record's delta overflows is
    /// refused with that overflow, naming the record, the first timestamp and the delta.
    #[test]
    fn a_foreign_batch_whose_timestamps_overflow_is_refused_as_such(first in any::<i64>(), delta in any::<i64>()) {
        let mut b = BatchBuilder::default();
        b.push(None, b"v", &[], 0);
        let mut b = b.finish().to_vec();
        let r = HEADER_LEN;
        b[field::FIRST_TIMESTAMP..field::FIRST_TIMESTAMP + 8].copy_from_slice(&first.to_le_bytes());
        b[field::MAX_TIMESTAMP..field::MAX_TIMESTAMP + 8]
            .copy_from_slice(&first.wrapping_add(delta).to_le_bytes());
        b[r + 8..r + 16].copy_from_slice(&delta.to_le_bytes());
        reseal(&mut b);
        let checked = BatchView::parse(&b).and_then(|v| v.validate());
        match first.checked_add(delta) {
            None => prop_assert_eq!(checked, Err(BatchError::TimestampOverflow { index: 0, first, delta })),
            Some(_) => prop_assert_eq!(checked, Ok(())),
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = decode(&bytes);
        let _ = batches(&bytes).count();
        let _ = verify_crc(&bytes);
        let _ = peek_total_len(&bytes);
    }

    #[test]
    fn arbitrary_header_bytes_never_panic(mut bytes in proptest::collection::vec(any::<u8>(), 64..600), small in any::<bool>()) {
        // Make the fixed checks pass so decoding gets past them into the lengths and records.
        bytes[12..16].copy_from_slice(&[b'R', b'L', VERSION, 0]);
        bytes[20] &= 0b1000;
        bytes[21] = 0;
        bytes[22..24].fill(0);
        bytes[58..60].fill(0);
        if small {
            // A count and length that fit, so the record decoder runs on random bytes.
            let len = (bytes.len() - LENGTH_PREFIX_LEN) as u32;
            bytes[8..12].copy_from_slice(&len.to_le_bytes());
            let count = u32::from(bytes[28] % 4) + 1;
            bytes[24..28].copy_from_slice(&(count - 1).to_le_bytes());
            bytes[28..32].copy_from_slice(&count.to_le_bytes());
            reseal(&mut bytes);
        }
        let _ = decode(&bytes);
        if let Ok(v) = BatchView::parse(&bytes) {
            for r in v.records().flatten() {
                let _ = r.headers().count();
            }
        }
    }

    #[test]
    fn any_damage_after_the_base_offset_is_caught(records in arb_records(), at in any::<prop::sample::Index>(), bit in 0u8..8) {
        // Every byte but the base offset is covered by the CRC or checked by value.
        let mut b = encode_batch(&records).to_vec();
        let i = 8 + at.index(b.len() - 8);
        b[i] ^= 1 << bit;
        prop_assert!(decode(&b).is_err());
        if i >= CRC_START {
            prop_assert!(verify_crc(&b).is_err());
        }
    }

    #[test]
    fn any_byte_value_in_the_covered_part_is_caught(records in arb_records(), at in any::<prop::sample::Index>(), value in any::<u8>()) {
        let mut b = encode_batch(&records).to_vec();
        let i = CRC_START + at.index(b.len() - CRC_START);
        prop_assume!(b[i] != value);
        b[i] = value;
        prop_assert!(decode(&b).is_err());
    }

    #[test]
    fn any_truncation_is_caught(records in arb_records(), at in any::<prop::sample::Index>()) {
        let b = encode_batch(&records);
        let cut = at.index(b.len());
        prop_assert!(decode(&b[..cut]).is_err());
        prop_assert!(batches(&b[..cut]).all(|v| v.is_err()));
    }

    #[test]
    fn any_length_field_is_handled(records in arb_records(), len in any::<u32>(), extra in 0usize..64) {
        // With bytes after the batch, a wrong length still frames something, and the
        // checksum or the structure must refuse it.
        let mut b = encode_batch(&records).to_vec();
        let true_len = b.len() - LENGTH_PREFIX_LEN;
        b.extend(std::iter::repeat_n(0xAB, extra));
        b[8..12].copy_from_slice(&len.to_le_bytes());
        let ok = decode(&b).is_ok();
        prop_assert_eq!(ok, len as usize == true_len);
    }
}

mod compress;
