//! Issue 6.4: hostile requests against the real broker binary. Each gets the right status,
//! the broker's memory stays bounded (its RSS is measured and printed), and other clients are
//! served meanwhile. 10,000 concurrent long-polls are in `broker_process.rs`.

use std::time::Duration;

use bytes::Bytes;
use rill_proto::v1::{self as pb, produce_request::Payload};
use rill_tests::{BrokerProcess, Clients};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;

fn rss_kib(pid: u32) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    text.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS")
}

/// A request whose `name` field holds arbitrary bytes (the real one is a `string`).
#[derive(Clone, PartialEq, prost::Message)]
struct RawNameRequest {
    #[prost(bytes = "vec", tag = "1")]
    name: Vec<u8>,
}

async fn describe_raw(
    channel: tonic::transport::Channel,
    name: Vec<u8>,
) -> Result<pb::TopicDescription, tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let path = tonic::codegen::http::uri::PathAndQuery::from_static("/rill.v1.Admin/DescribeTopic");
    let codec = rill_proto::codec::StrictCodec::<RawNameRequest, pb::TopicDescription>::default();
    grpc.unary(tonic::Request::new(RawNameRequest { name }), path, codec)
        .await
        .map(tonic::Response::into_inner)
}

fn one(value: Bytes) -> pb::ProduceRequest {
    pb::ProduceRequest {
        topic: "h".into(),
        partition: Some(0),
        ack: 0,
        payload: Some(Payload::Records(pb::RecordList {
            records: vec![pb::Record {
                value,
                ..Default::default()
            }],
        })),
        ..Default::default()
    }
}

#[tokio::test]
async fn hostile_requests_get_their_status_and_memory_stays_bounded() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = BrokerProcess::spawn(dir.path(), &["--max-batch-bytes", "1048576"])
        .await
        .expect("spawn");
    let pid = broker.pid().expect("pid");
    let mut c = Clients::connect(broker.url()).await.expect("connect");
    c.create_topic("h", 1).await.expect("create");
    c.produce_values("h", 0, &["a", "b", "c"])
        .await
        .expect("produce");
    let rss_start = rss_kib(pid);

    // An oversized record: refused by the broker's own limit.
    let err = c
        .log
        .produce(one(Bytes::from(vec![1u8; (1 << 20) + 1000])))
        .await
        .expect_err("too big");
    assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
    // An oversized request: refused by the transport limit before it is decoded.
    let err = c
        .log
        .produce(one(Bytes::from(vec![1u8; 3 << 20])))
        .await
        .expect_err("too big");
    assert!(
        matches!(
            err.code(),
            Code::OutOfRange | Code::ResourceExhausted | Code::InvalidArgument
        ),
        "{err:?}"
    );

    // max_bytes of 2^31 is capped by the server; max_records 0 means no limit.
    let resp = c
        .log
        .fetch(pb::FetchRequest {
            topic: "h".into(),
            max_bytes: 1 << 31,
            max_records: 0,
            ..Default::default()
        })
        .await
        .expect("fetch")
        .into_inner();
    assert_eq!(resp.records.len(), 3);

    // 100,000 partitions.
    let err = c
        .admin
        .create_topic(pb::CreateTopicRequest {
            name: "huge".into(),
            config: Some(pb::TopicConfig {
                partitions: 100_000,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .expect_err("too many partitions");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(!dir.path().join("topics/huge").exists());

    // Names with invalid UTF-8 or path separators.
    let err = describe_raw(c.channel.clone(), vec![b'a', 0xff, 0xfe])
        .await
        .expect_err("bad utf-8");
    assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
    for name in ["../x", "a/b", "..", "/etc"] {
        let err = describe_raw(c.channel.clone(), name.as_bytes().to_vec())
            .await
            .expect_err("bad name");
        assert_eq!(
            err.code(),
            Code::InvalidArgument,
            "{name}: {}",
            err.message()
        );
    }

    // Garbage bytes on the gRPC port: the connection is dropped, nothing else is affected.
    let mut raw = tokio::net::TcpStream::connect(broker.addr())
        .await
        .expect("tcp");
    let garbage: Vec<u8> = (0..65_536u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let _ = raw.write_all(&garbage).await;
    let mut sink = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(10), raw.read_to_end(&mut sink)).await;
    assert!(closed.is_ok(), "the broker closes a garbage connection");

    // A client that opens a produce stream, sends without end, and never reads its acks:
    // backpressure stops it; the broker's memory stays bounded and others are served.
    let mut stuck = c.log.clone();
    let requests = tokio_stream::iter((0u64..).map(|i| pb::ProduceStreamRequest {
        sequence: i,
        request: Some(one(Bytes::from(vec![7u8; 16 << 10]))),
    }));
    let stuck_call = tokio::spawn(async move {
        let acks = stuck.produce_stream(requests).await;
        // Hold the response stream without ever reading it.
        tokio::time::sleep(Duration::from_secs(3600)).await;
        drop(acks);
    });
    // While it pushes, other clients are served and the broker's memory stays bounded: the
    // acks it cannot deliver wait in bounded queues and the HTTP/2 window, and the data it
    // sends goes to the log, not to memory.
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        c.fetch("h", 0, 0, 0).await.expect("others are served");
        c.produce_values("h", 0, &["still served"])
            .await
            .expect("produce");
        assert!(rss_kib(pid) < 512 * 1024, "broker RSS {} KiB", rss_kib(pid));
    }
    let rss_end = rss_kib(pid);
    println!("hostile requests: broker RSS {rss_start} KiB at start, {rss_end} KiB at the end");
    assert!(rss_end < 512 * 1024, "broker RSS {rss_end} KiB");
    stuck_call.abort();
    drop(c);
    assert!(broker.stop().await.expect("stop").success());
}
