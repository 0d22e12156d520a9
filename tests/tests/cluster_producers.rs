//! The producer-id registry on replicated storage, on 3 real broker processes: `InitProducer`
//! is answered by the leader of the internal topic `__producers` (other brokers forward),
//! a named producer keeps its id and has its epoch raised across kill -9 of that leader, the
//! older epoch is fenced at a partition leader that is another broker, and no id is given
//! twice before and after the failover.

use std::collections::BTreeSet;
use std::time::Duration;

use bytes::Bytes;
use rill_proto::v1::{self as pb, produce_request::Payload};
use rill_tests::cluster::{while_unavailable, TestCluster};
use tonic::Code;

const PRODUCERS_TOPIC: &str = "__producers";

/// The longest an election, a commit or a failover may take in this test.
const DEADLINE: Duration = Duration::from_secs(30);

/// Retries `call` while it answers UNAVAILABLE (see [`while_unavailable`]).
async fn retrying<T, F, Fut>(call: F) -> Result<T, tonic::Status>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, tonic::Status>>,
{
    while_unavailable(DEADLINE, call).await
}

/// InitProducer through node `via` (retried while the registry has no settled leader).
async fn init(cluster: &TestCluster, via: u64, name: Option<&str>) -> (i64, i32) {
    let c = cluster.clients(via).await.expect("connect");
    let r = retrying(|| {
        let mut log = c.log.clone();
        let req = pb::InitProducerRequest {
            producer_name: name.map(str::to_string),
        };
        async move { log.init_producer(req).await }
    })
    .await
    .unwrap_or_else(|s| panic!("init producer via node {via}: {s:?}"))
    .into_inner();
    (r.producer_id, r.producer_epoch)
}

/// An idempotent produce of one record to `topic`/0 through node `via`.
async fn produce(
    cluster: &TestCluster,
    via: u64,
    topic: &str,
    (id, epoch, seq): (i64, i32, i32),
    value: &str,
) -> Result<pb::ProduceResponse, tonic::Status> {
    let c = cluster.clients(via).await.expect("connect");
    retrying(|| {
        let mut log = c.log.clone();
        let req = pb::ProduceRequest {
            topic: topic.into(),
            partition: Some(0),
            ack: pb::AckMode::Quorum as i32,
            payload: Some(Payload::Records(pb::RecordList {
                records: vec![pb::Record {
                    value: Bytes::copy_from_slice(value.as_bytes()),
                    ..Default::default()
                }],
            })),
            producer_id: Some(id),
            producer_epoch: Some(epoch),
            base_sequence: Some(seq),
            ..Default::default()
        };
        async move { log.produce(req).await }
    })
    .await
    .map(tonic::Response::into_inner)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_named_producer_keeps_its_id_and_is_fenced_across_kill_9_of_the_registry_leader() {
    let mut cluster = TestCluster::start_with_topic("orders", 1)
        .await
        .expect("start");

    // The registry is replicated on all three brokers.
    let leader = cluster
        .wait_partition_leader(PRODUCERS_TOPIC, 0, DEADLINE)
        .await
        .expect("a leader of __producers");
    let md = cluster
        .metadata(1, PRODUCERS_TOPIC)
        .await
        .expect("metadata");
    let replicas = &md.topics[0].partitions[0].replicas;
    assert_eq!(replicas.len(), 3, "{PRODUCERS_TOPIC} is replicated 3 ways");

    // Through a broker that does not lead the registry: forwarded to its leader.
    let others: Vec<u64> = cluster
        .ids()
        .into_iter()
        .filter(|id| *id != leader)
        .collect();
    let (id, epoch) = init(&cluster, others[0], Some("p")).await;
    let mut given = BTreeSet::from([id]);
    for via in cluster.ids() {
        let (unnamed, e) = init(&cluster, via, None).await;
        assert_eq!(e, 0);
        assert!(
            given.insert(unnamed),
            "id {unnamed} given twice (via node {via})"
        );
    }

    // The named producer writes through the partition's leader.
    let orders = cluster
        .wait_partition_leader("orders", 0, DEADLINE)
        .await
        .expect("orders leader");
    produce(&cluster, orders, "orders", (id, epoch, 0), "old-0")
        .await
        .expect("the first instance produces");

    // kill -9 the registry's leader; a new instance of "p" through a survivor keeps the id
    // and gets the next epoch.
    cluster.kill(leader).await.expect("kill");
    let (same, next) = init(&cluster, others[1], Some("p")).await;
    assert_eq!(
        (same, next),
        (id, epoch + 1),
        "the name's id and epoch survived"
    );
    let new_leader = cluster
        .wait_partition_leader(PRODUCERS_TOPIC, 0, DEADLINE)
        .await
        .expect("a new leader of __producers");
    assert_ne!(new_leader, leader);

    // The old instance is fenced at the partition's leader (whichever broker it is now),
    // before the new instance wrote anything there; the new one produces.
    let orders = cluster
        .wait_partition_leader("orders", 0, DEADLINE)
        .await
        .expect("orders leader after the kill");
    let stale = produce(&cluster, orders, "orders", (id, epoch, 1), "old-1")
        .await
        .expect_err("the old epoch is fenced");
    assert_eq!(stale.code(), Code::FailedPrecondition, "{stale:?}");
    assert!(stale.message().contains("fenced"), "{}", stale.message());
    produce(&cluster, orders, "orders", (id, next, 0), "new-0")
        .await
        .expect("the new instance produces");

    // Ids given after the failover repeat none given before it, and every broker accepts
    // them at once (the new leader committed a fresh block before serving).
    for via in cluster.running() {
        let (unnamed, _) = init(&cluster, via, None).await;
        assert!(
            given.insert(unnamed),
            "id {unnamed} given twice after the failover (via node {via})"
        );
        produce(&cluster, orders, "orders", (unnamed, 0, 0), "fresh")
            .await
            .unwrap_or_else(|s| panic!("a fresh id {unnamed} is accepted: {s:?}"));
    }

    let all = cluster.read_all(orders, "orders", 0).await.expect("read");
    let values: Vec<&str> = all.values().map(String::as_str).collect();
    assert_eq!(
        &values[..2],
        ["old-0", "new-0"],
        "the fenced record is absent"
    );
}
