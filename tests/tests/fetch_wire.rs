//! The hand-framed Fetch (issue 17) over real gRPC: what goes on the wire is what the
//! generated types decode, and its batches are the stored bytes as they are.

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::{Buf, Bytes};
use prost::Message;
use rill_proto::v1::{self as pb, FetchEncoding};
use rill_tests::{produce_req, record, Clients, TestBroker};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::{Code, Status};

/// Encodes the request with prost; hands back the response message's bytes undecoded.
#[derive(Default)]
struct WireCodec;

struct RequestEncoder;
struct WireDecoder;

impl Codec for WireCodec {
    type Encode = pb::FetchRequest;
    type Decode = Bytes;
    type Encoder = RequestEncoder;
    type Decoder = WireDecoder;
    fn encoder(&mut self) -> RequestEncoder {
        RequestEncoder
    }
    fn decoder(&mut self) -> WireDecoder {
        WireDecoder
    }
}

impl Encoder for RequestEncoder {
    type Item = pb::FetchRequest;
    type Error = Status;
    fn encode(&mut self, item: pb::FetchRequest, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        item.encode(dst)
            .map_err(|e| Status::internal(e.to_string()))
    }
}

impl Decoder for WireDecoder {
    type Item = Bytes;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

/// The response message exactly as the broker framed it.
async fn fetch_wire(c: &Clients, req: pb::FetchRequest) -> Result<Bytes, Status> {
    let mut grpc = tonic::client::Grpc::new(c.channel.clone()).max_decoding_message_size(64 << 20);
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    let path = http::uri::PathAndQuery::from_static("/rill.v1.Log/Fetch");
    grpc.unary(tonic::Request::new(req), path, WireCodec)
        .await
        .map(tonic::Response::into_inner)
}

/// The one segment file of the topic's partition 0.
fn segment_file(data_dir: &Path, topic: &str) -> PathBuf {
    fn walk(dir: &Path, topic: &str, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).expect("read dir").flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(&path, topic, out);
            } else if path.file_name().and_then(|n| n.to_str()) == Some("00000000000000000000.log")
                && path.to_string_lossy().contains(topic)
            {
                out.push(path);
            }
        }
    }
    let mut found = Vec::new();
    walk(data_dir, topic, &mut found);
    assert_eq!(found.len(), 1, "segments of {topic}: {found:?}");
    found.remove(0)
}

/// A raw-batch fetch decodes with the generated `FetchResponse`, carries the same fields as a
/// fetch through the generated client, and its batches, in order, are the segment file's
/// bytes as stored. Catches a frame that prost cannot decode (wrong prefix, key or length), a
/// lost or reordered batch, and batches that are re-encoded rather than sent as stored.
#[tokio::test]
async fn raw_fetch_on_the_wire_is_the_stored_batches() {
    let broker = TestBroker::start().await.expect("broker");
    let mut c = Clients::connect(broker.url()).await.expect("connect");
    c.create_topic("wire", 1).await.expect("create");
    // Batches of different sizes, one per produce, some larger than a 16 KiB HTTP/2 frame.
    let mut produced = 0u64;
    for (i, (count, size)) in [(1, 10), (50, 100), (3, 40_000), (200, 1_000), (7, 3)]
        .into_iter()
        .enumerate()
    {
        let value = format!("{i}").repeat(size);
        let records = (0..count)
            .map(|_| record(Some("k"), &value, None, &[]))
            .collect();
        c.log
            .produce(produce_req("wire", Some(0), records))
            .await
            .expect("produce");
        produced += count;
    }
    let req = pb::FetchRequest {
        topic: "wire".into(),
        partition: 0,
        offset: 0,
        encoding: FetchEncoding::RawBatches as i32,
        ..Default::default()
    };
    let wire = fetch_wire(&c, req.clone()).await.expect("fetch");
    let resp = pb::FetchResponse::decode(wire.clone()).expect("the wire bytes decode");
    assert_eq!(resp.topic, "wire");
    assert_eq!(resp.batches.len(), 5);
    assert_eq!(resp.next_offset, produced);
    assert_eq!(resp.high_watermark, produced);
    assert_eq!(resp.log_start_offset, 0);
    assert!(resp.records.is_empty());
    // Exactly prost's encoding of the decoded message: nothing extra, nothing reordered.
    assert_eq!(resp.encode_to_vec(), wire.to_vec());

    // The batches are the segment's bytes, in order, as stored.
    let stored = std::fs::read(segment_file(broker.data_dir(), "wire")).expect("segment");
    let mut at = 0;
    for batch in &resp.batches {
        assert_eq!(
            &stored[at..at + batch.len()],
            &batch[..],
            "the batch at file position {at} differs from the stored one"
        );
        at += batch.len();
    }

    // The generated client sees the same response.
    let generated = c.log.fetch(req).await.expect("fetch").into_inner();
    assert_eq!(generated, resp);
    broker.stop().await.expect("stop");
}

/// A records fetch, a fetch past the end after a wait, and an error all keep their meaning
/// through the hand-framed path: the decoded records, an empty answer at the deadline, and
/// NOT_FOUND naming the topic as a trailers-only status. Catches a hand-framed path that
/// drops fields, hangs, or turns errors into transport failures.
#[tokio::test]
async fn records_fetches_waits_and_errors_keep_their_meaning() {
    let broker = TestBroker::start().await.expect("broker");
    let mut c = Clients::connect(broker.url()).await.expect("connect");
    c.create_topic("wire2", 1).await.expect("create");
    c.log
        .produce(produce_req(
            "wire2",
            Some(0),
            vec![
                record(Some("a"), "one", Some(11), &[("h", "x")]),
                record(None, "two", Some(12), &[]),
            ],
        ))
        .await
        .expect("produce");
    let resp = c.fetch("wire2", 0, 1, 0).await.expect("fetch");
    assert_eq!(resp.records.len(), 1);
    assert_eq!(resp.records[0].offset, 1);
    assert_eq!(&resp.records[0].value[..], b"two");
    assert_eq!(resp.records[0].timestamp_ms, 12);
    assert_eq!(resp.next_offset, 2);

    let waited = tokio::time::timeout(Duration::from_secs(30), c.fetch("wire2", 0, 2, 50))
        .await
        .expect("the wait ends by its max_wait_ms")
        .expect("fetch");
    assert!(waited.records.is_empty() && waited.batches.is_empty());
    assert_eq!(waited.next_offset, 2);

    let err = c.fetch("nope", 0, 0, 0).await.expect_err("unknown topic");
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    assert!(err.message().contains("nope"), "{err:?}");
    broker.stop().await.expect("stop");
}

/// A request that is not one FetchRequest is refused with INVALID_ARGUMENT and the broker
/// keeps serving. Catches a hand-framed decoder that panics, hangs or answers INTERNAL.
#[tokio::test]
async fn an_undecodable_fetch_request_is_invalid_argument() {
    let broker = TestBroker::start().await.expect("broker");
    let mut c = Clients::connect(broker.url()).await.expect("connect");
    c.create_topic("wire3", 1).await.expect("create");
    // Field 1 (topic, a string) holding invalid UTF-8.
    let bad = Bytes::from_static(&[0x0a, 0x02, 0xff, 0xfe]);
    let mut grpc = tonic::client::Grpc::new(c.channel.clone());
    grpc.ready().await.expect("ready");
    let path = http::uri::PathAndQuery::from_static("/rill.v1.Log/Fetch");
    let err = grpc
        .unary(tonic::Request::new(bad), path, BytesCodec)
        .await
        .expect_err("bad request");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    // Still serving.
    c.fetch("wire3", 0, 0, 0).await.expect("fetch after");
    broker.stop().await.expect("stop");
}

/// Sends raw message bytes; reads raw message bytes.
#[derive(Default)]
struct BytesCodec;
struct BytesEncoder;

impl Codec for BytesCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = BytesEncoder;
    type Decoder = WireDecoder;
    fn encoder(&mut self) -> BytesEncoder {
        BytesEncoder
    }
    fn decoder(&mut self) -> WireDecoder {
        WireDecoder
    }
}

impl Encoder for BytesEncoder {
    type Item = Bytes;
    type Error = Status;
    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        bytes::BufMut::put_slice(dst, &item);
        Ok(())
    }
}
