//! Push with a subscriber that grants huge credits and never reads its stream: the broker
//! (a real process) holds a bounded amount of memory however much is appended, because the
//! pusher waits on its small queue and HTTP/2 flow control (the subscriber's window fills
//! and is never reopened).

use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use rill_proto::v1::{self as pb, produce_request::Payload};
use rill_tests::{BrokerProcess, Clients};

/// Anonymous resident memory (heap, stacks), in KiB: log segments the broker maps are
/// file-backed and not counted, as the kernel can drop them at will.
fn rss_anon_kib(pid: u32) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    text.lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("RssAnon")
}

async fn produce_mib(c: &mut Clients, mib: usize) -> Result<()> {
    let value = Bytes::from(vec![7u8; 64 << 10]);
    for _ in 0..mib {
        let records = (0..16)
            .map(|_| pb::Record {
                value: value.clone(),
                ..Default::default()
            })
            .collect();
        c.log
            .produce(pb::ProduceRequest {
                topic: "big".into(),
                partition: Some(0),
                ack: 0,
                payload: Some(Payload::Records(pb::RecordList { records })),
                ..Default::default()
            })
            .await?;
    }
    Ok(())
}

#[tokio::test]
async fn a_subscriber_that_never_reads_keeps_broker_memory_bounded() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let broker = BrokerProcess::spawn(dir.path(), &[]).await?;
    let pid = broker.pid().context("pid")?;
    let mut c = Clients::connect(broker.url()).await?;
    c.create_topic("big", 1).await?;
    let mut subs =
        rill_proto::v1::subscriptions_client::SubscriptionsClient::new(c.channel.clone());
    subs.create(pb::CreateSubscriptionRequest {
        name: "s".into(),
        config: Some(pb::SubscriptionConfig {
            topic: "big".into(),
            ..Default::default()
        }),
        start: pb::StartPosition::Earliest as i32,
    })
    .await?;
    produce_mib(&mut c, 8).await?;
    let before = rss_anon_kib(pid);

    // Both modes, each with credits for everything, on its own connection; neither stream
    // is ever read.
    let mut held = Vec::new();
    for start in [
        pb::subscribe_start::Target::Group(pb::GroupTarget {
            group: "g".into(),
            topic: "big".into(),
            partitions: vec![],
        }),
        pb::subscribe_start::Target::Subscription("s".into()),
    ] {
        let own = Clients::connect(broker.url()).await?;
        let mut client =
            rill_proto::v1::subscriptions_client::SubscriptionsClient::new(own.channel.clone());
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tx.send(pb::SubscribeRequest {
            kind: Some(pb::subscribe_request::Kind::Start(pb::SubscribeStart {
                target: Some(start),
                consumer_id: "never-reads".into(),
            })),
        })
        .await?;
        tx.send(pb::SubscribeRequest {
            kind: Some(pb::subscribe_request::Kind::Credits(pb::Credits {
                records: 1_000_000,
                bytes: 1 << 40,
            })),
        })
        .await?;
        let stream = client
            .subscribe(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await?
            .into_inner();
        held.push((tx, stream, own));
    }
    produce_mib(&mut c, 96).await?;
    // Give the pushers time to run into their bounds.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let after = rss_anon_kib(pid);
    println!(
        "never-reading subscribers: broker RssAnon {before} KiB before, {after} KiB after 96 MiB \
         appended"
    );
    assert!(
        after < before + 40 * 1024,
        "broker anonymous memory grew from {before} KiB to {after} KiB"
    );
    // The broker still serves others meanwhile.
    let d = subs
        .describe(pb::DescribeSubscriptionRequest { name: "s".into() })
        .await?
        .into_inner();
    assert!(d.in_flight > 0, "the queue stream acquired records");
    drop(held);
    broker.signal_and_wait(rill_tests::SIGTERM).await?;
    Ok(())
}
