//! `rill.v1.Log/Fetch` framed by hand, so stored batches reach the socket without a copy.
//!
//! Through tonic's codec, a response is encoded by prost into one contiguous buffer: every
//! stored batch of a raw-batch fetch was copied once in user space (16% of the broker's
//! catch-up profile, `BENCHMARKS.md`). [`LogRoutes`] takes the Log service's place on the
//! server and answers `Fetch` itself: it decodes the request, runs the same
//! [`crate::fetch::fetch`] with the same authorization, and writes the gRPC message frame
//! *around* the stored batches, as a body of chained [`Bytes`]: the frame prefix and the
//! fields before `batches`, then for each batch its field key and length (a few bytes) and the
//! batch itself (a slice of the storage's mapping, handed to the HTTP/2 layer as it is), then
//! the fields after `batches`, then the `grpc-status` trailer. The bytes on the wire are
//! those prost would write for the same `FetchResponse` (fields in number order, defaults
//! omitted), so every client decodes them with the generated types. Every other Log RPC goes
//! to the generated server unchanged.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{BufMut, Bytes, BytesMut};
use http_body::Frame;
use http_body_util::BodyExt;
use prost::encoding::{encode_key, encode_varint, encoded_len_varint, WireType};
use prost::Message;
use rill_proto::v1::log_server::LogServer;
use rill_proto::v1::{FetchRequest, FetchResponse};
use tonic::body::Body;
use tonic::server::NamedService;
use tonic::Status;

use super::LogService;
use crate::auth::{self, Operation, Resource};
use crate::error::BrokerError;
use crate::fetch::{fetch, parse_grpc_timeout};
use crate::state::Broker;

/// The path this module answers; every other path goes to the generated server.
const FETCH_PATH: &str = "/rill.v1.Log/Fetch";
/// A FetchRequest is a topic name and a few integers: anything larger is refused unread.
const MAX_REQUEST_BYTES: usize = 64 << 10;
/// The field number of `FetchResponse.batches` (`log.proto`).
const BATCHES_FIELD: u32 = 4;
/// The gRPC message prefix: a compressed flag and a big-endian length.
const GRPC_PREFIX_BYTES: usize = 5;
/// h2 copies a DATA frame shorter than 256 bytes into its write buffer, but queues a longer
/// one apart, to be written by reference; nothing can be buffered after such a frame until
/// it is written. A small response sent as one piece therefore left its `grpc-status`
/// trailer for a second `writev` (a second TCP segment the client must wait for). Its pieces
/// stay under this size instead, so the whole response goes out in one write.
const H2_COPIED_FRAME_BYTES: usize = 255;
/// Responses up to this size are cut into [`H2_COPIED_FRAME_BYTES`] pieces (at most 17
/// DATA frames, 9 bytes of frame header each, and no byte copied by us); larger ones are
/// sent as they are, where one more write is nothing next to the bytes moved.
const SMALL_RESPONSE_BYTES: usize = 4096;

/// The Log service as served: `Fetch` framed by hand, the other RPCs by the generated
/// [`LogServer`]. A cheap clone, like every tower service the server holds.
#[derive(Debug, Clone)]
pub struct LogRoutes {
    inner: LogServer<LogService>,
    broker: Broker,
}

impl LogRoutes {
    /// Routes `Fetch` to the hand-framed path and everything else to `inner`.
    pub fn new(inner: LogServer<LogService>, broker: Broker) -> Self {
        LogRoutes { inner, broker }
    }
}

impl NamedService for LogRoutes {
    const NAME: &'static str = <LogServer<LogService> as NamedService>::NAME;
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

impl tower_service::Service<http::Request<Body>> for LogRoutes {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<http::Response<Body>, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        <LogServer<LogService> as tower_service::Service<http::Request<Body>>>::poll_ready(
            &mut self.inner,
            cx,
        )
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        if request.uri().path() == FETCH_PATH {
            let broker = self.broker.clone();
            Box::pin(async move { Ok(serve_fetch(&broker, request).await) })
        } else {
            self.inner.call(request)
        }
    }
}

/// One Fetch call: its response, or its error as a trailers-only response (as tonic
/// answers a handler's error, so clients and the metrics layer see the same thing).
async fn serve_fetch(broker: &Broker, request: http::Request<Body>) -> http::Response<Body> {
    match fetch_frames(broker, request).await {
        Ok(body) => {
            let mut response = http::Response::new(Body::new(body));
            response.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/grpc"),
            );
            response
        }
        Err(e) => Status::from(e).into_http(),
    }
}

async fn fetch_frames(
    broker: &Broker,
    request: http::Request<Body>,
) -> Result<FrameBody, BrokerError> {
    let (parts, body) = request.into_parts();
    if let Some(encoding) = parts.headers.get("grpc-encoding") {
        if encoding.as_bytes() != b"identity" {
            return Err(BrokerError::invalid(format!(
                "Fetch: compressed requests are not supported (grpc-encoding {encoding:?})"
            )));
        }
    }
    let client_timeout = parts
        .headers
        .get("grpc-timeout")
        .and_then(|v| v.to_str().ok())
        .and_then(parse_grpc_timeout);
    let req = read_request(body).await?;
    auth::check(
        broker,
        &parts.extensions,
        Operation::Consume,
        Resource::topic(&req.topic),
    )?;
    let resp = fetch(broker, req, client_timeout).await?;
    encode_response(resp)
}

/// Reads the request body: exactly one uncompressed gRPC message holding a FetchRequest.
async fn read_request(body: Body) -> Result<FetchRequest, BrokerError> {
    let collected = http_body_util::Limited::new(body, MAX_REQUEST_BYTES)
        .collect()
        .await
        .map_err(|e| {
            BrokerError::invalid(format!(
                "Fetch: the request body failed or exceeds {MAX_REQUEST_BYTES} bytes: {e}"
            ))
        })?
        .to_bytes();
    let Some((prefix, message)) = collected.split_first_chunk::<GRPC_PREFIX_BYTES>() else {
        return Err(BrokerError::invalid(
            "Fetch: the request holds no gRPC message",
        ));
    };
    let [compressed, len @ ..] = *prefix;
    if compressed != 0 {
        return Err(BrokerError::invalid(
            "Fetch: compressed requests are not supported",
        ));
    }
    let len = u32::from_be_bytes(len) as usize;
    if len != message.len() {
        return Err(BrokerError::invalid(format!(
            "Fetch: the request must hold exactly one message (framed length {len}, {} bytes \
             follow)",
            message.len()
        )));
    }
    FetchRequest::decode(message)
        .map_err(|e| BrokerError::invalid(format!("message does not decode: {e}")))
}

/// The response's gRPC frame: the prefix, the fields before `batches` and after it encoded
/// by prost, and each batch shared as it is, with its key and length before it. All the
/// small pieces live in one buffer, so a response costs one allocation besides the chunk
/// queue.
pub fn encode_response(mut resp: FetchResponse) -> Result<FrameBody, BrokerError> {
    let batches = std::mem::take(&mut resp.batches);
    // Fields 1-3 (topic, partition, records): the response with the later fields at their
    // defaults, which prost omits.
    let (high_watermark, log_start_offset, next_offset) =
        (resp.high_watermark, resp.log_start_offset, resp.next_offset);
    resp.high_watermark = 0;
    resp.log_start_offset = 0;
    resp.next_offset = 0;
    let head = resp;
    // Fields 5-7.
    let tail = FetchResponse {
        high_watermark,
        log_start_offset,
        next_offset,
        ..FetchResponse::default()
    };
    let batch_key_bytes = 1; // field 4, length-delimited: one byte.
    let batches_len: usize = batches
        .iter()
        .map(|b| batch_key_bytes + encoded_len_varint(b.len() as u64) + b.len())
        .sum();
    let message_len = head.encoded_len() + batches_len + tail.encoded_len();
    let framed_len = u32::try_from(message_len).map_err(|_| {
        BrokerError::Internal(format!(
            "a Fetch response of {message_len} bytes exceeds a gRPC frame"
        ))
    })?;

    let small = GRPC_PREFIX_BYTES
        + head.encoded_len()
        + batches.len() * (batch_key_bytes + 10)
        + tail.encoded_len();
    let mut buf = BytesMut::with_capacity(small);
    buf.put_u8(0);
    buf.put_u32(framed_len);
    head.encode(&mut buf)
        .map_err(|e| BrokerError::Internal(format!("encoding a Fetch response: {e}")))?;
    // Each batch's key and length end the piece before it, so the chunks alternate.
    let mut ends = Vec::with_capacity(batches.len() + 1);
    for batch in &batches {
        encode_key(BATCHES_FIELD, WireType::LengthDelimited, &mut buf);
        encode_varint(batch.len() as u64, &mut buf);
        ends.push(buf.len());
    }
    tail.encode(&mut buf)
        .map_err(|e| BrokerError::Internal(format!("encoding a Fetch response: {e}")))?;
    ends.push(buf.len());
    let small = buf.freeze();

    let mut chunks = VecDeque::with_capacity(batches.len() * 2 + 1);
    let mut start = 0;
    let mut batches = batches.into_iter();
    for end in ends {
        if end > start {
            chunks.push_back(small.slice(start..end));
        }
        start = end;
        if let Some(batch) = batches.next().filter(|b| !b.is_empty()) {
            chunks.push_back(batch);
        }
    }
    let remaining = chunks.iter().map(Bytes::len).sum();
    if remaining <= SMALL_RESPONSE_BYTES {
        chunks = cut_for_one_write(chunks);
    }
    Ok(FrameBody {
        remaining,
        chunks,
        trailers_sent: false,
    })
}

/// The same bytes, as slices (no copy) of at most [`H2_COPIED_FRAME_BYTES`] each, which h2
/// copies into its write buffer together with the trailer that follows.
fn cut_for_one_write(chunks: VecDeque<Bytes>) -> VecDeque<Bytes> {
    let pieces = chunks
        .iter()
        .map(|c| c.len().div_ceil(H2_COPIED_FRAME_BYTES))
        .sum();
    let mut out = VecDeque::with_capacity(pieces);
    for mut chunk in chunks {
        while chunk.len() > H2_COPIED_FRAME_BYTES {
            out.push_back(chunk.split_to(H2_COPIED_FRAME_BYTES));
        }
        if !chunk.is_empty() {
            out.push_back(chunk);
        }
    }
    out
}

/// A unary gRPC response body: the message's chunks as they are, then `grpc-status: 0`.
#[derive(Debug)]
pub struct FrameBody {
    chunks: VecDeque<Bytes>,
    remaining: usize,
    trailers_sent: bool,
}

impl FrameBody {
    /// The chunks not yet sent (for tests: they must be the stored bytes themselves).
    pub fn chunks(&self) -> impl Iterator<Item = &Bytes> {
        self.chunks.iter()
    }
}

impl http_body::Body for FrameBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if let Some(chunk) = self.chunks.pop_front() {
            self.remaining -= chunk.len();
            return Poll::Ready(Some(Ok(Frame::data(chunk))));
        }
        if self.trailers_sent {
            return Poll::Ready(None);
        }
        self.trailers_sent = true;
        let mut trailers = http::HeaderMap::with_capacity(1);
        trailers.insert(Status::GRPC_STATUS, http::HeaderValue::from_static("0"));
        Poll::Ready(Some(Ok(Frame::trailers(trailers))))
    }

    fn is_end_stream(&self) -> bool {
        self.chunks.is_empty() && self.trailers_sent
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(self.remaining as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rill_proto::v1::{FetchedRecord, Header};

    fn concat(body: &FrameBody) -> Vec<u8> {
        body.chunks().flat_map(|c| c.iter().copied()).collect()
    }

    fn batch(len: usize, fill: u8) -> Bytes {
        Bytes::from(vec![fill; len])
    }

    /// The hand-made frame must be byte-identical to tonic's: the 5-byte prefix and prost's
    /// encoding of the same message. Catches a wrong field key, length, order or prefix.
    #[test]
    fn the_frame_is_the_bytes_prost_writes() {
        let cases = [
            FetchResponse::default(),
            FetchResponse {
                topic: "orders".into(),
                partition: 7,
                batches: vec![batch(1, 1), batch(127, 2), batch(128, 3), batch(105_064, 4)],
                high_watermark: 1_000_000,
                log_start_offset: 3,
                next_offset: 999_900,
                ..FetchResponse::default()
            },
            FetchResponse {
                topic: "t".into(),
                records: vec![FetchedRecord {
                    offset: 5,
                    timestamp_ms: 9,
                    key: Some(Bytes::from_static(b"k")),
                    value: Bytes::from_static(b"value"),
                    headers: vec![Header {
                        key: "h".into(),
                        value: Bytes::from_static(b"x"),
                    }],
                }],
                next_offset: 6,
                high_watermark: 6,
                ..FetchResponse::default()
            },
            // Only batches: an empty head and tail.
            FetchResponse {
                batches: vec![batch(300, 9), Bytes::new()],
                ..FetchResponse::default()
            },
        ];
        for resp in cases {
            let mut expected = vec![0u8];
            expected.extend((resp.encoded_len() as u32).to_be_bytes());
            expected.extend(resp.encode_to_vec());
            let body = encode_response(resp.clone()).expect("encode");
            let wire = concat(&body);
            assert_eq!(wire, expected, "for {:?}", resp.topic);
            let decoded = FetchResponse::decode(&wire[GRPC_PREFIX_BYTES..]).expect("decode");
            assert_eq!(decoded, resp);
        }
    }

    /// Zero-copy: every batch goes out as the very `Bytes` it came in as (same memory), not
    /// a copy. Catches a return to encoding the batches into a buffer.
    #[test]
    fn each_batch_is_handed_over_without_a_copy() {
        let stored = Bytes::from(vec![7u8; 300_000]);
        let batches = vec![
            stored.slice(0..100_000),
            stored.slice(100_000..250_000),
            stored.slice(250_000..300_000),
        ];
        let body = encode_response(FetchResponse {
            topic: "t".into(),
            batches: batches.clone(),
            next_offset: 3,
            ..FetchResponse::default()
        })
        .expect("encode");
        for batch in &batches {
            assert!(
                body.chunks()
                    .any(|c| c.as_ptr() == batch.as_ptr() && c.len() == batch.len()),
                "a batch of {} bytes was copied",
                batch.len()
            );
        }
        // The head, three keys with lengths, the tail: small pieces between the batches.
        let small: usize = body
            .chunks()
            .filter(|c| c.len() < 100)
            .map(Bytes::len)
            .sum();
        assert!(small < 64, "{small} bytes of framing");
    }

    /// A small response goes out in pieces h2 copies into its write buffer (under 256
    /// bytes), so its trailer shares the response's one write; a large one keeps its
    /// batches whole. Catches a small response sent as one long DATA frame, whose trailer
    /// then needs a second write (the e2e tail's extra TCP segment).
    #[test]
    fn a_small_response_is_cut_into_frames_h2_copies() {
        let stored = Bytes::from(vec![3u8; 1_100]);
        let resp = FetchResponse {
            topic: "t".into(),
            batches: vec![stored.clone()],
            next_offset: 1,
            ..FetchResponse::default()
        };
        let body = encode_response(resp.clone()).expect("encode");
        assert!(body.chunks().count() > 1);
        assert!(body.chunks().all(|c| c.len() <= H2_COPIED_FRAME_BYTES));
        // Still the stored memory, sliced, and still the bytes prost writes.
        let base = stored.as_ptr() as usize;
        assert!(body
            .chunks()
            .filter(|c| c.len() == H2_COPIED_FRAME_BYTES)
            .any(|c| (c.as_ptr() as usize).wrapping_sub(base) < stored.len()));
        let mut expected = vec![0u8];
        expected.extend((resp.encoded_len() as u32).to_be_bytes());
        expected.extend(resp.encode_to_vec());
        assert_eq!(concat(&body), expected);

        let big = encode_response(FetchResponse {
            batches: vec![batch(SMALL_RESPONSE_BYTES, 1)],
            ..FetchResponse::default()
        })
        .expect("encode");
        assert!(big.chunks().any(|c| c.len() == SMALL_RESPONSE_BYTES));
    }

    #[tokio::test]
    async fn the_body_ends_with_an_ok_status_trailer() {
        let mut body = encode_response(FetchResponse {
            batches: vec![batch(10, 1)],
            ..FetchResponse::default()
        })
        .expect("encode");
        let mut data = 0;
        let mut trailers = None;
        while let Some(frame) = body.frame().await {
            let frame = frame.expect("infallible");
            match frame.into_data() {
                Ok(d) => data += d.len(),
                Err(frame) => trailers = frame.into_trailers().ok(),
            }
        }
        assert_eq!(data, GRPC_PREFIX_BYTES + 2 + 10);
        let trailers = trailers.expect("trailers");
        assert_eq!(trailers.get("grpc-status").expect("status"), "0");
        assert!(http_body::Body::is_end_stream(&body));
    }
}
