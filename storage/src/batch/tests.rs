//! Codec tests: round trips and robustness against arbitrary and damaged bytes.

use super::*;
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

#[test]
fn the_checksum_is_crc32_iso_hdlc() {
    // The standard check value of CRC-32/ISO-HDLC; CRC-32C would give 0xE3069283.
    assert_eq!(crc32fast::hash(b"123456789"), 0xCBF4_3926);
    let b = encode_batch(&sample());
    let stored = u32::from_le_bytes([b[16], b[17], b[18], b[19]]);
    assert_eq!(stored, crc32fast::hash(&b[20..]));
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
    assert_eq!(h.next_offset(), 45);
    assert_eq!(decode(&b).expect("decode"), records);
    let offsets: Vec<u64> = view.records().map(|r| r.expect("record").offset).collect();
    assert_eq!(offsets, vec![42, 43, 44]);
}

#[test]
fn stamping_the_base_offset_keeps_the_checksum_valid() {
    let mut b = encode_batch(&sample()).to_vec();
    for base in [0, 1, u64::MAX / 2] {
        stamp_base_offset(&mut b, base);
        verify_crc(&b).expect("crc still valid");
    }
}

#[test]
fn zeros_and_short_buffers_are_rejected() {
    assert_eq!(BatchHeader::parse(&[0u8; 64]), Err(BatchError::BadMagic));
    assert!(matches!(
        BatchHeader::parse(&[0u8; 10]),
        Err(BatchError::Truncated { .. })
    ));
    let b = encode_batch(&sample());
    assert!(matches!(
        BatchView::parse(&b[..b.len() - 1]),
        Err(BatchError::Truncated { .. })
    ));
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
    buf.extend_from_slice(&[0u8; 30]);
    assert!(
        batches(&buf).last().expect("last").is_err(),
        "a torn tail ends the walk"
    );
}

fn arb_record() -> impl Strategy<Value = Record> {
    (
        proptest::option::of(proptest::collection::vec(any::<u8>(), 0..32)),
        proptest::collection::vec(any::<u8>(), 0..3000),
        proptest::collection::vec(
            ("\\PC{0,12}", proptest::collection::vec(any::<u8>(), 0..16)),
            0..4,
        ),
        -(1i64 << 40)..(1i64 << 40),
    )
        .prop_map(|(key, value, headers, ts)| Record {
            key: key.map(Bytes::from),
            value: Bytes::from(value),
            headers: headers
                .into_iter()
                .map(|(k, v)| (k, Bytes::from(v)))
                .collect(),
            timestamp_ms: ts,
        })
}

proptest! {
    #[test]
    fn round_trip(records in proptest::collection::vec(arb_record(), 1..20), base in 0u64..(1 << 60)) {
        let mut b = encode_batch(&records).to_vec();
        stamp_base_offset(&mut b, base);
        prop_assert_eq!(decode(&b).expect("decode"), records.clone());
        let h = BatchHeader::parse(&b).expect("header");
        prop_assert_eq!(h.record_count as usize, records.len());
        prop_assert_eq!(h.max_timestamp, records.iter().map(|r| r.timestamp_ms).max().unwrap_or(0));
        prop_assert_eq!(h.total_len(), b.len());
        let sizes: usize = records.iter().map(|r| record_size(
            r.key.as_deref(), &r.value, r.headers.iter().map(|(k, v)| (k.as_str(), v.as_ref())))).sum();
        prop_assert_eq!(sizes + HEADER_LEN, b.len());
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = decode(&bytes);
        let _ = batches(&bytes).count();
        let _ = verify_crc(&bytes);
    }

    #[test]
    fn arbitrary_header_bytes_never_panic(mut bytes in proptest::collection::vec(any::<u8>(), 64..600)) {
        // Make the magic and version right so decoding gets past them into the lengths.
        bytes[12] = b'R';
        bytes[13] = b'L';
        bytes[14] = VERSION;
        let _ = decode(&bytes);
        let view = BatchView::parse(&bytes);
        if let Ok(v) = view {
            for r in v.records().flatten() {
                let _ = r.headers().count();
            }
        }
    }

    #[test]
    fn any_flipped_covered_byte_is_caught(records in proptest::collection::vec(arb_record(), 1..5), at in any::<prop::sample::Index>(), bit in 0u8..8) {
        let mut b = encode_batch(&records).to_vec();
        let i = CRC_START + at.index(b.len() - CRC_START);
        b[i] ^= 1 << bit;
        prop_assert!(decode(&b).is_err());
    }

    #[test]
    fn any_truncation_is_caught(records in proptest::collection::vec(arb_record(), 1..5), at in any::<prop::sample::Index>()) {
        let b = encode_batch(&records);
        let cut = at.index(b.len());
        prop_assert!(decode(&b[..cut]).is_err());
    }

    #[test]
    fn any_length_field_is_handled(records in proptest::collection::vec(arb_record(), 1..5), len in any::<u32>()) {
        let mut b = encode_batch(&records).to_vec();
        b[8..12].copy_from_slice(&len.to_le_bytes());
        let ok = decode(&b).is_ok();
        prop_assert!(!ok || len as usize == b.len() - LENGTH_PREFIX_LEN);
    }
}
