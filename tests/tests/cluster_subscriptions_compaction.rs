//! Compaction of the replicated `__subscriptions` topic on 3 real broker processes: its
//! leader rewrites the subscription state through Raft once the topic has grown by a
//! segment, and every replica deletes its own segments before the rewrite, so the topic
//! stays bounded; after kill -9 of the leader, the new leader delivers exactly the records
//! that were not acknowledged.

use std::time::Duration;

use rill_proto::v1 as pb;
use rill_proto::v1::subscriptions_client::SubscriptionsClient;
use rill_tests::cluster::{create_request, while_unavailable, Extra, TestCluster};
use tonic::transport::Channel;

/// The longest an election, a commit or a failover may take in this test.
const DEADLINE: Duration = Duration::from_secs(30);
/// The longest compaction may take to show on every replica's disk (the leader's background
/// task is woken by the write that crosses the threshold; followers act as they apply the
/// marker).
const COMPACTION_DEADLINE: Duration = Duration::from_secs(30);
const SUBSCRIPTIONS_TOPIC: &str = "__subscriptions";
/// Tiny `__subscriptions` segments (the smallest accepted), so a few hundred acks compact the
/// topic several times.
const SEGMENT_BYTES: &str = "16384";
/// Records in the subscribed topic.
const RECORDS: u64 = 200;
/// Records acknowledged one by one (each ack is a commit of the partition's whole state).
const ACKED_ONE_BY_ONE: u64 = 150;
const CONSUMER: &str = "worker";

/// Retries `call` on UNAVAILABLE until the deadline; any other error fails the test.
async fn retrying<T, F, Fut>(what: &str, call: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, tonic::Status>>,
{
    while_unavailable(DEADLINE, call)
        .await
        .unwrap_or_else(|s| panic!("{what}: {s:?}"))
}

async fn subscriptions(cluster: &TestCluster, via: u64) -> SubscriptionsClient<Channel> {
    let c = cluster.clients(via).await.expect("connect");
    SubscriptionsClient::new(c.channel.clone())
}

/// Receives up to `n` records of `workers` through `subs`: their offsets in partition 0.
async fn receive(subs: &SubscriptionsClient<Channel>, n: u32) -> Vec<u64> {
    retrying("receive", || {
        let mut subs = subs.clone();
        let req = pb::ReceiveRequest {
            subscription: "workers".into(),
            consumer_id: CONSUMER.into(),
            max_records: n,
            max_wait_ms: 1_000,
            max_bytes: 0,
        };
        async move { subs.receive(req).await }
    })
    .await
    .into_inner()
    .records
    .iter()
    .map(|r| {
        assert_eq!(r.partition, 0);
        r.record.as_ref().map_or(u64::MAX, |x| x.offset)
    })
    .collect()
}

/// Acknowledges offsets `first..=last` of partition 0 through `subs`.
async fn ack(subs: &SubscriptionsClient<Channel>, first: u64, last: u64) {
    retrying("ack", || {
        let mut subs = subs.clone();
        let req = pb::AcknowledgeRequest {
            subscription: "workers".into(),
            consumer_id: CONSUMER.into(),
            ranges: vec![pb::AckRange {
                partition: 0,
                first_offset: first,
                last_offset: last,
            }],
            r#type: pb::AckType::Ack as i32,
            delay_ms: 0,
            error: String::new(),
        };
        async move { subs.acknowledge(req).await }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicated_subscriptions_compact_on_every_replica_and_survive_kill_9_of_the_leader() {
    let mut cluster = TestCluster::start_with(
        3,
        Extra::args(&["--subscriptions-segment-bytes", SEGMENT_BYTES]),
    )
    .await
    .expect("start");
    cluster
        .wait_controller_leader(DEADLINE)
        .await
        .expect("a controller leader");
    let mut admin = cluster.clients(1).await.expect("connect").admin;
    admin
        .create_topic(create_request("jobs", 1, 3))
        .await
        .expect("create jobs");
    let jobs_leader = cluster
        .wait_partition_leader("jobs", 0, DEADLINE)
        .await
        .expect("leader of jobs");
    let values: Vec<String> = (0..RECORDS).map(|i| format!("job-{i}")).collect();
    let refs: Vec<&str> = values.iter().map(String::as_str).collect();
    cluster
        .clients(jobs_leader)
        .await
        .expect("connect")
        .produce_values("jobs", 0, &refs)
        .await
        .expect("produce");

    let leader = cluster
        .wait_partition_leader(SUBSCRIPTIONS_TOPIC, 0, DEADLINE)
        .await
        .expect("leader of __subscriptions");
    let subs = subscriptions(&cluster, leader).await;
    retrying("create subscription", || {
        let mut subs = subs.clone();
        let req = pb::CreateSubscriptionRequest {
            name: "workers".into(),
            config: Some(pb::SubscriptionConfig {
                topic: "jobs".into(),
                ack_deadline_ms: 120_000,
                ..Default::default()
            }),
            start: pb::StartPosition::Earliest as i32,
        };
        async move { subs.create(req).await }
    })
    .await;

    // Many small changes through the leader: records taken ten at a time, each acked alone.
    let mut next = 0;
    while next < ACKED_ONE_BY_ONE {
        let got = receive(&subs, 10).await;
        assert_eq!(got, (next..next + 10).collect::<Vec<_>>());
        for offset in got {
            ack(&subs, offset, offset).await;
        }
        next += 10;
    }
    // Ten more taken, three of them acked: seven stay locked to the leader's consumer.
    let got = receive(&subs, 10).await;
    assert_eq!(got, (next..next + 10).collect::<Vec<_>>());
    ack(&subs, next, next + 2).await;
    let acked_below = next + 3;

    let starts = cluster
        .wait_log_starts_past_zero(SUBSCRIPTIONS_TOPIC, 0, COMPACTION_DEADLINE)
        .await
        .expect("compacted on every replica");
    println!("{SUBSCRIPTIONS_TOPIC} log starts after {acked_below} acks: {starts:?}");

    // kill -9 the leader: the new leader rebuilds from its compacted replica and delivers
    // exactly the records not acknowledged (the seven locked at the dead leader, and those
    // never delivered).
    cluster.kill(leader).await.expect("kill");
    let survivor = cluster.running()[0];
    let subs = subscriptions(&cluster, survivor).await;
    let mut seen = Vec::new();
    let until = tokio::time::Instant::now() + DEADLINE;
    while (seen.len() as u64) < RECORDS - acked_below {
        assert!(
            tokio::time::Instant::now() < until,
            "only {seen:?} came back"
        );
        seen.extend(receive(&subs, 100).await);
    }
    seen.sort_unstable();
    assert_eq!(
        seen,
        (acked_below..RECORDS).collect::<Vec<_>>(),
        "exactly the records not acked, once each"
    );
}
