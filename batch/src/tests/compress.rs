//! Compressed batches: round trips per codec, bombs, truncated data, unknown codecs.

use super::*;

const CODECS: [Codec; 2] = [Codec::Lz4, Codec::Zstd];

/// A batch of one record whose value is `len` zero bytes: it compresses extremely well.
fn zeros_batch(len: usize) -> Bytes {
    try_encode_batch(&[Record {
        key: None,
        value: Bytes::from(vec![0u8; len]),
        headers: vec![],
        timestamp_ms: 1_000,
    }])
    .expect("encodable")
}

proptest! {
    #[test]
    fn every_codec_round_trips(records in arb_records(), base in 0u64..(1 << 60)) {
        let plain = try_encode_batch(&records).expect("encodable");
        for codec in CODECS {
            let mut packed = compress(&plain, codec).expect("compress").to_vec();
            stamp_base_offset(&mut packed, base);
            let view = BatchView::parse(&packed).expect("view");
            prop_assert_eq!(view.header().compression_codec(), codec.bits());
            prop_assert_eq!(view.header().record_count as usize, records.len());
            view.validate().expect("a compressed batch validates");
            let back = decompress(&packed, MAX_DECOMPRESSED_BATCH_BYTES).expect("decompress");
            // The plain equivalent is the original batch, with the stamped base offset.
            let mut expected = plain.to_vec();
            stamp_base_offset(&mut expected, base);
            prop_assert_eq!(&back[..], &expected[..]);
            prop_assert_eq!(decode(&back).expect("decode"), records.clone());
        }
    }
}

#[test]
fn codec_values_and_names_are_the_documented_ones() {
    assert_eq!(Codec::None.bits(), 0);
    assert_eq!(Codec::Lz4.bits(), 1);
    assert_eq!(Codec::Zstd.bits(), 2);
    for c in [Codec::None, Codec::Lz4, Codec::Zstd] {
        assert_eq!(Codec::from_bits(c.bits()), Some(c));
        assert_eq!(c.name().parse::<Codec>(), Ok(c));
    }
    for bits in 3..=7 {
        assert_eq!(Codec::from_bits(bits), None);
    }
    assert!("gzip".parse::<Codec>().is_err());
}

#[test]
fn records_of_a_compressed_batch_are_not_read_as_plain_bytes() {
    let packed = compress(&encode_batch(&sample()), Codec::Lz4).expect("compress");
    let view = BatchView::parse(&packed).expect("view");
    let first = view.records().next().expect("one item");
    assert_eq!(first.err(), Some(BatchError::Compressed(1)));
    assert_eq!(
        compress(&packed, Codec::Zstd).err(),
        Some(BatchError::Compressed(1)),
        "compressing twice is refused"
    );
}

#[test]
fn a_bomb_is_refused_at_the_bound() {
    let plain = zeros_batch(8 << 20);
    for codec in CODECS {
        let packed = compress(&plain, codec).expect("compress");
        assert!(packed.len() < 64 << 10, "{codec}: {} bytes", packed.len());
        match decompress(&packed, 1 << 20) {
            Err(BatchError::DecompressedTooLarge { max_bytes, .. }) => {
                assert_eq!(max_bytes, 1 << 20)
            }
            other => panic!("{codec}: expected DecompressedTooLarge, got {other:?}"),
        }
        let view = BatchView::parse(&packed).expect("view");
        assert!(matches!(
            view.validate_within(1 << 20),
            Err(BatchError::DecompressedTooLarge { .. })
        ));
        // Exactly at the limit is fine.
        decompress(&packed, plain.len()).expect("at the limit");
        assert!(decompress(&packed, plain.len() - 1).is_err());
    }
}

#[test]
fn an_lz4_size_prefix_past_the_bound_is_refused_before_allocating() {
    let packed = compress(&encode_batch(&sample()), Codec::Lz4).expect("compress");
    let mut b = packed.to_vec();
    // Claim 3 GiB of records: refused from the prefix alone.
    b[HEADER_LEN..HEADER_LEN + 4].copy_from_slice(&(3u32 << 30).to_le_bytes());
    reseal(&mut b);
    assert!(matches!(
        decompress(&b, MAX_DECOMPRESSED_BATCH_BYTES),
        Err(BatchError::DecompressedTooLarge { .. })
    ));
}

/// Cuts the compressed records section to `keep` bytes, with a consistent length and CRC, so
/// only the decompressor can notice.
fn truncated(packed: &[u8], keep: usize) -> Vec<u8> {
    let mut b = packed[..HEADER_LEN + keep].to_vec();
    let len = (b.len() - LENGTH_PREFIX_LEN) as u32;
    b[field::BATCH_LENGTH..field::BATCH_LENGTH + 4].copy_from_slice(&len.to_le_bytes());
    reseal(&mut b);
    b
}

#[test]
fn truncated_compressed_records_are_refused() {
    let plain = encode_batch(&sample());
    for codec in CODECS {
        let packed = compress(&plain, codec).expect("compress");
        let section = packed.len() - HEADER_LEN;
        for keep in [0, 1, 3, section / 2, section - 1] {
            let b = truncated(&packed, keep);
            let view = BatchView::parse(&b).expect("the header alone is fine");
            let err = view.validate().expect_err("truncated");
            assert!(
                matches!(err, BatchError::BadCompressedData { .. }),
                "{codec} keeping {keep}: {err:?}"
            );
        }
    }
}

#[test]
fn garbage_in_place_of_compressed_records_is_refused() {
    let plain = encode_batch(&sample());
    for codec in CODECS {
        let mut b = compress(&plain, codec).expect("compress").to_vec();
        for byte in &mut b[HEADER_LEN + 4..] {
            *byte ^= 0x5a;
        }
        reseal(&mut b);
        let view = BatchView::parse(&b).expect("header");
        assert!(view.validate().is_err(), "{codec}");
    }
}

#[test]
fn a_compressed_batch_with_a_wrong_crc_is_refused() {
    let mut b = compress(&encode_batch(&sample()), Codec::Zstd)
        .expect("compress")
        .to_vec();
    let last = b.len() - 1;
    b[last] ^= 1;
    assert!(matches!(
        decompress(&b, MAX_DECOMPRESSED_BATCH_BYTES),
        Err(BatchError::ChecksumMismatch { .. })
    ));
}
