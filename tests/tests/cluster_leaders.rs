//! The client library finds partition leaders through `Cluster.Metadata` before its first
//! request, instead of sending it to the bootstrap broker and following the redirect; and a
//! single broker (no `Cluster` service) is asked once per producer, not once per request.
//! Counted on the brokers' own `rill_requests_total`, scraped from `/metrics`. A raw
//! produce whose keyed records span partitions led by different brokers is refused whole.
//! And a broker without a replica of a partition names its leader, past a stopped replica.

use std::net::SocketAddr;
use std::time::Duration;

use rill_client::{Connection, Producer, ProducerConfig, ProducerRecord};
use rill_proto::partitioner::partition_for_key;
use rill_proto::v1 as pb;
use rill_tests::cluster::{Extra, TestCluster};
use rill_tests::{scrape, BrokerProcess, Clients};

/// The longest an election, a commit or a scrape may take in this test.
const DEADLINE: Duration = Duration::from_secs(30);

/// The sum of `rill_requests_total` over the samples whose `rpc` label is `rpc` (any code).
async fn requests(metrics: SocketAddr, rpc: &str) -> f64 {
    let samples = scrape::scrape(metrics).await.expect("a scrape");
    scrape::sum(&samples, "rill_requests_total", &[("rpc", rpc)])
}

/// Node `id`'s view of who leads each partition of `topic` (0: none known).
async fn leaders(cluster: &TestCluster, id: u64, topic: &str) -> Vec<u64> {
    match cluster.metadata(id, topic).await {
        Ok(m) => m
            .topics
            .first()
            .map(|t| t.partitions.iter().map(|p| p.leader).collect())
            .unwrap_or_default(),
        Err(_) => Vec::new(),
    }
}

/// Every broker's agreed view of who leads each partition of `topic`, once all three agree
/// and know a leader for every partition.
async fn agreed_leaders(cluster: &TestCluster, topic: &str, partitions: usize) -> Vec<u64> {
    let until = tokio::time::Instant::now() + DEADLINE;
    loop {
        let views = [
            leaders(cluster, 1, topic).await,
            leaders(cluster, 2, topic).await,
            leaders(cluster, 3, topic).await,
        ];
        if views[0].len() == partitions
            && views[0].iter().all(|l| *l != 0)
            && views.iter().all(|v| *v == views[0])
        {
            return views[0].clone();
        }
        assert!(
            tokio::time::Instant::now() < until,
            "no agreed leaders: {views:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A producer bootstrapped at broker 1 alone sends to a partition that another broker
/// leads: the produce goes straight to that leader. Broker 1 is never sent a Produce (no
/// FAILED_PRECONDITION redirect), asked `Metadata` once, and the leader appends the record.
/// Sending the first request to the bootstrap broker and following its `rill-leader`
/// redirect (the client before leader discovery) fails the first assertion.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_produce_goes_straight_to_a_leader_that_is_not_the_bootstrap_broker() {
    let cluster = TestCluster::start_with(3, Extra::args(&["--metrics-listen", "127.0.0.1:0"]))
        .await
        .expect("3 brokers, each with its metrics");
    let metrics = |id: u64| cluster.metrics_addr(id).expect("a metrics address");
    cluster
        .create_topic("lead", 3, 3, DEADLINE)
        .await
        .expect("creating the topic");
    // Every broker agrees on each partition's leader; take one that broker 1 does not lead
    // (placement spreads the leaders).
    let agreed = agreed_leaders(&cluster, "lead", 3).await;
    let (partition, leader) = agreed
        .iter()
        .enumerate()
        .find(|(_, l)| **l != 1)
        .map(|(p, l)| (p as u32, *l))
        .expect("a partition that broker 1 does not lead");
    let produce = "rill.v1.Log/Produce";
    let metadata = "rill.v1.Cluster/Metadata";
    let produces_before = requests(metrics(1), produce).await;
    let metadata_before = requests(metrics(1), metadata).await;
    let leader_before = requests(metrics(leader), produce).await;

    let conn = Connection::connect(&cluster.addr(1).to_string())
        .await
        .expect("connect");
    let producer = Producer::new(conn, ProducerConfig::new().linger_ms(0));
    let (p, offset) = producer
        .send_and_wait(ProducerRecord::new("lead", "straight").partition(partition))
        .await
        .expect("acknowledged");
    assert_eq!((p, offset), (partition, 0));
    for i in 0..10 {
        producer
            .send_and_wait(ProducerRecord::new("lead", format!("m{i}")).partition(partition))
            .await
            .expect("acknowledged");
    }

    assert_eq!(
        requests(metrics(1), produce).await - produces_before,
        0.0,
        "the bootstrap broker (1) was sent a Produce for partition {partition}, which node \
         {leader} leads"
    );
    assert_eq!(
        requests(metrics(leader), produce).await - leader_before,
        11.0,
        "node {leader}, the leader, takes every produce"
    );
    assert_eq!(
        requests(metrics(1), metadata).await - metadata_before,
        1.0,
        "one Metadata call for the topic, not one per request"
    );
}

/// A produce without a partition whose keyed records land in partitions led by different
/// brokers (the broker partitions them by key) is refused whole, before anything is
/// written: it fails with FAILED_PRECONDITION naming the partition not led there and its
/// leader (`rill-leader`), and the partition the broker does lead gets none of its records.
/// Handing the batches over one after another, as before the check, appends the led
/// partition's record and fails the high-watermark assertion (a retry sent elsewhere would
/// then write it twice).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyed_produce_spanning_leaders_is_refused_whole_and_writes_nothing() {
    let cluster = TestCluster::start(3).await.expect("3 brokers");
    cluster
        .create_topic("span", 3, 3, DEADLINE)
        .await
        .expect("creating the topic");
    let leaders = agreed_leaders(&cluster, "span", 3).await;
    // A broker that leads one partition and not another (placement spreads leaders).
    let (broker, own) = leaders
        .iter()
        .enumerate()
        .find(|(_, l)| leaders.iter().any(|other| other != *l))
        .map(|(p, l)| (*l, p as u32))
        .expect("leaders on two brokers at least");
    let other = (0..3u32)
        .find(|p| leaders[*p as usize] != broker)
        .expect("a partition led elsewhere");
    let key_for = |want: u32| {
        (0..10_000)
            .map(|i| format!("key-{i}"))
            .find(|k| partition_for_key(k.as_bytes(), 3) == want)
            .expect("a key for the partition")
    };
    let record = |key: String| pb::Record {
        key: Some(key.into_bytes().into()),
        value: bytes::Bytes::from_static(b"spanning"),
        ..Default::default()
    };
    let mut c = cluster.clients(broker).await.expect("connect");
    let request = pb::ProduceRequest {
        topic: "span".into(),
        partition: None,
        payload: Some(pb::produce_request::Payload::Records(pb::RecordList {
            records: vec![record(key_for(own)), record(key_for(other))],
        })),
        ..Default::default()
    };
    let status = tokio::time::timeout(DEADLINE, c.log.produce(request))
        .await
        .expect("an answer within the deadline")
        .expect_err("a partition of the request is not led by the broker asked");
    assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
    assert!(
        status
            .message()
            .contains(&format!("topic span partition {other}")),
        "{status:?}"
    );
    let named = status
        .metadata()
        .get("rill-leader")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let leader_addr = cluster.addr(leaders[other as usize]).to_string();
    assert_eq!(named.as_deref(), Some(leader_addr.as_str()), "{status:?}");

    // Nothing was written, not even to the partition the broker leads.
    let fetched = tokio::time::timeout(DEADLINE, c.fetch("span", own, 0, 0))
        .await
        .expect("an answer within the deadline")
        .expect("fetch");
    assert_eq!(
        fetched.high_watermark, 0,
        "partition {own} (led by node {broker}) took a record of the refused request"
    );
    // The same records, each sent to its own partition's leader, are taken.
    for (p, key) in [(own, key_for(own)), (other, key_for(other))] {
        let mut at_leader = cluster.clients(leaders[p as usize]).await.expect("connect");
        let produced = at_leader.log.produce(pb::ProduceRequest {
            topic: "span".into(),
            partition: Some(p),
            payload: Some(pb::produce_request::Payload::Records(pb::RecordList {
                records: vec![record(key)],
            })),
            ..Default::default()
        });
        tokio::time::timeout(DEADLINE, produced)
            .await
            .expect("an answer within the deadline")
            .expect("a produce to the partition's leader");
    }
}

/// A single broker has no `Cluster` service: the producer asks once, remembers the
/// UNIMPLEMENTED, and sends every batch to the broker with no further lookup. A lookup
/// before each request (or each partition's first) would show here as more than one call.
#[tokio::test]
async fn a_single_broker_is_asked_for_leaders_once_per_producer() {
    let dir = tempfile::tempdir().expect("dir");
    let broker = BrokerProcess::spawn(dir.path(), &["--metrics-listen", "127.0.0.1:0"])
        .await
        .expect("broker");
    let metrics = broker
        .metrics_addr()
        .expect("the metrics address is printed");
    let mut clients = Clients::connect(broker.url()).await.expect("connect");
    clients.create_topic("solo", 3).await.expect("create");
    let before =
        requests(metrics, "unknown").await + requests(metrics, "rill.v1.Cluster/Metadata").await;

    let conn = Connection::connect(&broker.addr().to_string())
        .await
        .expect("connect");
    let producer = Producer::new(conn, ProducerConfig::new().linger_ms(0));
    for i in 0..30u32 {
        producer
            .send_and_wait(ProducerRecord::new("solo", format!("m{i}")).partition(i % 3))
            .await
            .expect("acknowledged");
    }
    let asked = requests(metrics, "unknown").await
        + requests(metrics, "rill.v1.Cluster/Metadata").await
        - before;
    assert!(asked <= 1.0, "Metadata asked {asked} times for 30 produces");
    assert_eq!(requests(metrics, "rill.v1.Log/Produce").await, 30.0);
    broker.stop().await.expect("stop");
}

/// A broker without a replica of a partition names its leader by asking a replica. With the
/// first replica it asks stopped by SIGSTOP (it takes the call and never answers), the ask
/// moves on to the next replica after its timeout, which names the same leader: a paused
/// leader of a replication factor 2 partition stays its leader, since its one follower cannot
/// win an election alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_without_a_replica_names_the_leader_past_a_stopped_replica() {
    let cluster = TestCluster::start_with_topic_rf("two", 1, 2)
        .await
        .expect("3 brokers and an RF 2 topic");
    let leader = cluster
        .wait_partition_leader_among("two", 0, DEADLINE)
        .await
        .expect("leader");
    let seen = cluster.metadata(leader, "two").await.expect("metadata");
    let replicas = seen.topics[0].partitions[0].replicas.clone();
    let outsider = cluster
        .ids()
        .into_iter()
        .find(|id| !replicas.contains(id))
        .expect("a broker without a replica");
    // The outsider asks live replicas in the replica list's order, the preferred leader
    // first: make the leader that replica, stopped while still counted live.
    assert_eq!(replicas.first(), Some(&leader), "{seen:?}");
    cluster.signal(leader, "STOP").await.expect("SIGSTOP");
    let named = cluster.metadata(outsider, "two").await;
    cluster.signal(leader, "CONT").await.expect("SIGCONT");
    let named = named.expect("the outsider answers");
    let part = &named.topics[0].partitions[0];
    assert_eq!(
        (part.leader, part.leader_address.clone()),
        (leader, cluster.addr(leader).to_string()),
        "named by the other replica: {part:?}"
    );
}
