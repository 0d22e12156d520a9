//! Issue 12, compression over real gRPC: compressed batches stored as they came, read back
//! through both fetch encodings; bombs, truncated data and unknown codecs refused; a topic's
//! codec applied by the broker.

use bytes::{Bytes, BytesMut};
use rill_proto::v1::{self as pb, produce_request::Payload};
use rill_storage::batch::{self, BatchBuilder, BatchHeader, Codec};
use rill_tests::{Clients, TestBroker};
use tonic::Code;

/// A client-built batch of `n` JSON-ish records.
fn plain_batch(n: usize) -> Bytes {
    let mut b = BatchBuilder::new(BytesMut::new());
    let now = rill_storage::log::now_ms();
    for i in 0..n {
        let value = format!(r#"{{"level":"info","msg":"request served","id":{i}}}"#);
        b.push(
            Some(format!("k{i}").as_bytes()),
            value.as_bytes(),
            &[("h", b"x")],
            now,
        );
    }
    b.finish()
}

fn batch_req(topic: &str, partition: u32, batch: Bytes) -> pb::ProduceRequest {
    pb::ProduceRequest {
        topic: topic.into(),
        partition: Some(partition),
        ack: pb::AckMode::Leader as i32,
        payload: Some(Payload::Batch(batch)),
        ..Default::default()
    }
}

async fn fetch(c: &mut Clients, topic: &str, raw: bool) -> pb::FetchResponse {
    c.log
        .fetch(pb::FetchRequest {
            topic: topic.into(),
            partition: 0,
            offset: 0,
            encoding: if raw {
                pb::FetchEncoding::RawBatches as i32
            } else {
                pb::FetchEncoding::Records as i32
            },
            ..Default::default()
        })
        .await
        .expect("fetch")
        .into_inner()
}

async fn create(c: &mut Clients, topic: &str, compression: Option<&str>) {
    c.admin
        .create_topic(pb::CreateTopicRequest {
            name: topic.into(),
            config: Some(pb::TopicConfig {
                partitions: 1,
                compression: compression.map(str::to_string),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .expect("create");
}

#[tokio::test]
async fn a_compressed_batch_is_stored_as_it_came_and_read_through_both_encodings() {
    let broker = TestBroker::start().await.expect("broker");
    let mut c = Clients::connect(broker.url()).await.expect("connect");
    let plain = plain_batch(50);
    for codec in [Codec::Lz4, Codec::Zstd] {
        let topic = format!("c-{codec}");
        create(&mut c, &topic, None).await;
        let packed = batch::compress(&plain, codec).expect("compress");
        assert!(packed.len() < plain.len() / 2, "{codec}: JSON compresses");
        c.log
            .produce(batch_req(&topic, 0, packed.clone()))
            .await
            .expect("produce");
        // Raw: the stored bytes, compressed, exactly as sent (base offset 0 stamped).
        let raw = fetch(&mut c, &topic, true).await;
        assert_eq!(raw.batches.len(), 1);
        assert_eq!(raw.batches[0], packed, "{codec}: stored as it came");
        let h = BatchHeader::parse(&raw.batches[0]).expect("header");
        assert_eq!(h.compression_codec(), codec.bits());
        // Records: decompressed by the broker.
        let recs = fetch(&mut c, &topic, false).await.records;
        assert_eq!(recs.len(), 50, "{codec}");
        for (i, r) in recs.iter().enumerate() {
            assert_eq!(r.offset, i as u64);
            assert_eq!(r.key.as_deref(), Some(format!("k{i}").as_bytes()));
            assert!(std::str::from_utf8(&r.value)
                .expect("utf8")
                .ends_with(&format!("\"id\":{i}}}")));
            assert_eq!(r.headers.len(), 1);
        }
    }
    broker.stop().await.expect("stop");
}

#[tokio::test]
async fn bombs_truncated_data_and_unknown_codecs_are_refused_and_change_nothing() {
    let broker = TestBroker::start().await.expect("broker");
    let mut c = Clients::connect(broker.url()).await.expect("connect");
    create(&mut c, "bad", None).await;
    let max = broker.broker().config().max_batch_bytes;
    // A bomb: a batch of one record of zeros, larger than the broker's limit once
    // decompressed, tiny compressed.
    let mut big = BatchBuilder::new(BytesMut::new());
    big.push(
        None,
        &vec![0u8; max + 1024],
        &[],
        rill_storage::log::now_ms(),
    );
    let big = big.finish();
    for codec in [Codec::Lz4, Codec::Zstd] {
        let bomb = batch::compress(&big, codec).expect("compress");
        assert!(bomb.len() < max / 100);
        let err = c
            .log
            .produce(batch_req("bad", 0, bomb))
            .await
            .expect_err("bomb");
        assert_eq!(
            err.code(),
            Code::InvalidArgument,
            "{codec}: {}",
            err.message()
        );
        assert!(
            err.message().contains("decompresses to more than"),
            "{}",
            err.message()
        );
        assert!(
            err.message().contains("\"bad\" partition 0"),
            "{}",
            err.message()
        );
    }
    // Truncated: the compressed section cut short, length and CRC made consistent.
    let plain = plain_batch(20);
    for codec in [Codec::Lz4, Codec::Zstd] {
        let packed = batch::compress(&plain, codec).expect("compress");
        let mut cut = packed[..packed.len() - 7].to_vec();
        let len = (cut.len() - batch::LENGTH_PREFIX_LEN) as u32;
        cut[batch::field::BATCH_LENGTH..batch::field::BATCH_LENGTH + 4]
            .copy_from_slice(&len.to_le_bytes());
        let crc = crc(&cut);
        cut[batch::CRC_OFFSET..batch::CRC_START].copy_from_slice(&crc.to_le_bytes());
        let err = c
            .log
            .produce(batch_req("bad", 0, Bytes::from(cut)))
            .await
            .expect_err("truncated");
        assert_eq!(
            err.code(),
            Code::InvalidArgument,
            "{codec}: {}",
            err.message()
        );
        assert!(
            err.message().contains("do not decompress"),
            "{}",
            err.message()
        );
    }
    // An unknown codec (3).
    let mut unknown = plain.to_vec();
    unknown[batch::field::ATTRIBUTES] |= 3;
    let crc = crc(&unknown);
    unknown[batch::CRC_OFFSET..batch::CRC_START].copy_from_slice(&crc.to_le_bytes());
    let err = c
        .log
        .produce(batch_req("bad", 0, Bytes::from(unknown)))
        .await
        .expect_err("unknown codec");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("compression codec 3"),
        "{}",
        err.message()
    );
    let fetched = fetch(&mut c, "bad", true).await;
    assert_eq!(fetched.high_watermark, 0, "nothing was appended");
    broker.stop().await.expect("stop");
}

fn crc(batch: &[u8]) -> u32 {
    // The format's CRC (CRC-32/ISO-HDLC) over everything after the field.
    let mut h = Crc32::new();
    h.update(&batch[batch::CRC_START..]);
    h.finish()
}

/// A bitwise CRC-32/ISO-HDLC, so the test does not lean on the code under test.
struct Crc32(u32);

impl Crc32 {
    fn new() -> Self {
        Crc32(0xFFFF_FFFF)
    }
    fn update(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= u32::from(b);
            for _ in 0..8 {
                let mask = (self.0 & 1).wrapping_neg();
                self.0 = (self.0 >> 1) ^ (0xEDB8_8320 & mask);
            }
        }
    }
    fn finish(&self) -> u32 {
        !self.0
    }
}

#[tokio::test]
async fn a_topic_codec_is_applied_to_every_batch_whatever_came() {
    let broker = TestBroker::start().await.expect("broker");
    let mut c = Clients::connect(broker.url()).await.expect("connect");
    create(&mut c, "z", Some("zstd")).await;
    // Plain pre-encoded, lz4 pre-encoded, and protobuf records asking for lz4: all stored
    // as zstd.
    let plain = plain_batch(10);
    c.log
        .produce(batch_req("z", 0, plain.clone()))
        .await
        .expect("plain");
    c.log
        .produce(batch_req(
            "z",
            0,
            batch::compress(&plain, Codec::Lz4).expect("lz4"),
        ))
        .await
        .expect("lz4");
    let records = (0..10)
        .map(|i| pb::Record {
            value: Bytes::from(format!("record {i}")),
            ..Default::default()
        })
        .collect();
    c.log
        .produce(pb::ProduceRequest {
            topic: "z".into(),
            partition: Some(0),
            payload: Some(Payload::Records(pb::RecordList { records })),
            compression: pb::Compression::Lz4 as i32,
            ..Default::default()
        })
        .await
        .expect("records");
    let raw = fetch(&mut c, "z", true).await;
    assert_eq!(raw.batches.len(), 3);
    for b in &raw.batches {
        let h = BatchHeader::parse(b).expect("header");
        assert_eq!(h.compression_codec(), Codec::Zstd.bits());
    }
    assert_eq!(fetch(&mut c, "z", false).await.records.len(), 30);
    // The setting is reported, and a bad one refused.
    let d = c
        .admin
        .describe_topic(pb::DescribeTopicRequest { name: "z".into() })
        .await
        .expect("describe")
        .into_inner();
    let config = d.config.expect("config");
    assert_eq!(config.compression.as_deref(), Some("zstd"));
    let err = c
        .admin
        .create_topic(pb::CreateTopicRequest {
            name: "g".into(),
            config: Some(pb::TopicConfig {
                partitions: 1,
                compression: Some("gzip".into()),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .expect_err("gzip");
    assert_eq!(err.code(), Code::InvalidArgument);
    broker.stop().await.expect("stop");
}

#[tokio::test]
async fn a_records_produce_asking_for_lz4_is_stored_compressed() {
    let broker = TestBroker::start().await.expect("broker");
    let mut c = Clients::connect(broker.url()).await.expect("connect");
    create(&mut c, "p", None).await;
    let records = (0..100)
        .map(|i| pb::Record {
            value: Bytes::from(format!(r#"{{"n":{i},"pad":"aaaaaaaaaaaaaaaaaaaaaaaa"}}"#)),
            ..Default::default()
        })
        .collect();
    c.log
        .produce(pb::ProduceRequest {
            topic: "p".into(),
            partition: Some(0),
            payload: Some(Payload::Records(pb::RecordList { records })),
            compression: pb::Compression::Lz4 as i32,
            ..Default::default()
        })
        .await
        .expect("records");
    let raw = fetch(&mut c, "p", true).await;
    let h = BatchHeader::parse(&raw.batches[0]).expect("header");
    assert_eq!(h.compression_codec(), Codec::Lz4.bits());
    let recs = fetch(&mut c, "p", false).await.records;
    assert_eq!(recs.len(), 100);
    assert_eq!(&recs[99].value[..8], b"{\"n\":99,");
    broker.stop().await.expect("stop");
}

/// A TCP proxy to `broker` that records every byte its clients send. Stopped (with every
/// connection it serves) by `stop`.
async fn recording_proxy(
    broker: std::net::SocketAddr,
    stop: tokio_util::sync::CancellationToken,
    sent: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
) -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        let mut conns = tokio::task::JoinSet::new();
        loop {
            let client = tokio::select! {
                _ = stop.cancelled() => break,
                c = listener.accept() => match c { Ok((c, _)) => c, Err(_) => break },
            };
            let (sent, stop) = (std::sync::Arc::clone(&sent), stop.clone());
            conns.spawn(async move {
                let Ok(upstream) = tokio::net::TcpStream::connect(broker).await else {
                    return;
                };
                let (mut cr, mut cw) = client.into_split();
                let (mut ur, mut uw) = upstream.into_split();
                let up = async {
                    let mut buf = vec![0u8; 64 << 10];
                    loop {
                        let n = match cr.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        sent.lock().expect("lock").extend_from_slice(&buf[..n]);
                        if uw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                };
                let down = tokio::io::copy(&mut ur, &mut cw);
                tokio::select! {
                    _ = stop.cancelled() => {}
                    _ = up => {}
                    _ = down => {}
                }
            });
        }
        conns.shutdown().await;
    });
    (addr, task)
}

/// `Producer` with a codec compresses its batches itself: the batches the broker stores are
/// byte for byte what the client sent (the broker did not recompress them, and the client
/// sent them compressed: far fewer bytes than the records hold), and they read back whole.
#[tokio::test]
async fn the_producer_compresses_its_batches_and_the_broker_stores_them_as_sent() {
    use rill_client::{Compression, Connection, Producer, ProducerConfig, ProducerRecord};
    const RECORDS: usize = 400;
    let broker = TestBroker::start().await.expect("broker");
    let mut c = Clients::connect(broker.url()).await.expect("connect");
    for (codec, compression) in [
        (Codec::Lz4, Compression::Lz4),
        (Codec::Zstd, Compression::Zstd),
    ] {
        let topic = format!("client-{codec}");
        create(&mut c, &topic, None).await;
        let stop = tokio_util::sync::CancellationToken::new();
        let sent = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (proxy, proxy_task) =
            recording_proxy(broker.addr(), stop.clone(), std::sync::Arc::clone(&sent)).await;
        let conn = Connection::connect(&proxy.to_string())
            .await
            .expect("connect via proxy");
        let producer = Producer::new(
            conn,
            ProducerConfig::new()
                .linger_ms(20)
                .batch_bytes(32 << 10)
                .compression(compression),
        );
        let value = |i: usize| {
            format!(
                r#"{{"ts":"2026-11-30T05:00:00Z","level":"info","service":"checkout","msg":"request served","path":"/api/v1/orders","status":200,"id":{i}}}"#
            )
        };
        let mut acks = Vec::new();
        let mut payload_bytes = 0;
        for i in 0..RECORDS {
            payload_bytes += value(i).len();
            let record = ProducerRecord::new(topic.clone(), value(i))
                .partition(0)
                .header("h", "x");
            acks.push(producer.send(record).await.expect("send"));
        }
        for (i, ack) in acks.into_iter().enumerate() {
            assert_eq!(ack.await.expect("ack"), (0, i as u64));
        }
        drop(producer);
        stop.cancel();
        proxy_task.await.expect("proxy");
        let sent = std::mem::take(&mut *sent.lock().expect("lock"));
        assert!(
            sent.len() < payload_bytes / 3,
            "{codec}: the client sent {} bytes for {payload_bytes} bytes of records: not \
             compressed",
            sent.len()
        );
        let raw = fetch(&mut c, &topic, true).await;
        assert!(!raw.batches.is_empty());
        let mut count = 0;
        for stored in &raw.batches {
            let h = BatchHeader::parse(stored).expect("header");
            assert_eq!(
                h.compression_codec(),
                codec.bits(),
                "{codec}: stored compressed"
            );
            assert!(
                h.producer_id >= 0 && h.base_sequence >= 0,
                "idempotent batch"
            );
            count += h.record_count as usize;
            // What the broker stores is what the client sent, but the base offset it stamps.
            let mut as_sent = stored.to_vec();
            as_sent[..8].copy_from_slice(&0u64.to_le_bytes());
            assert!(
                sent.windows(as_sent.len()).any(|w| w == as_sent.as_slice()),
                "{codec}: the stored batch at offset {} is not the one the client sent",
                h.base_offset
            );
        }
        assert!(count > 0 && count <= RECORDS, "{codec}: {count} records");
        // Every record reads back, decompressed, through the records encoding.
        let mut offset = 0u64;
        while offset < RECORDS as u64 {
            let recs = c.fetch(&topic, 0, offset, 0).await.expect("fetch").records;
            assert!(!recs.is_empty(), "{codec}: records stop at offset {offset}");
            for r in &recs {
                assert_eq!(r.offset, offset);
                assert_eq!(r.value, value(offset as usize).as_bytes(), "{codec}");
                assert_eq!(r.headers.len(), 1);
                offset += 1;
            }
        }
    }
    broker.stop().await.expect("stop");
}
