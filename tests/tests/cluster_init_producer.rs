//! A producer of the client library starts although the first broker of its bootstrap list
//! is cut off from the other two (3 real broker processes, broker-to-broker traffic through
//! the fault-injecting proxies of `TestCluster::start_partitionable`; clients reach every
//! broker directly).
//!
//! `InitProducer` is answered by the leader of the internal topic `__producers`. The client
//! sends it there (the leader `Cluster.Metadata` names), and leaves a broker that cannot
//! answer for the leader the other brokers name. Two splits, each with an idempotent
//! producer and a named one, bootstrapped at the cut-off broker first:
//! 1. the cut-off broker follows `__producers`: it cannot reach the leader to forward to;
//! 2. the cut-off broker leads `__producers` (until the majority elects another): it cannot
//!    commit a named producer's epoch.
//!
//! Each producer must start and have a record acknowledged within [`START_DEADLINE`].

use std::time::Duration;

use rill_proto::v1 as pb;
use rill_tests::cluster::TestCluster;

/// The internal topic whose leader gives producer ids.
const PRODUCERS_TOPIC: &str = "__producers";
/// The topic the producers write.
const TOPIC: &str = "initp";
/// The longest an election, a commit or a catch-up may take in this test.
const DEADLINE: Duration = Duration::from_secs(30);
/// The longest a producer may take, bootstrapped at the cut-off broker, to start and have
/// its first record acknowledged: an election on the majority side, the client's 1 s wait
/// before it asks the other brokers, and commits, with wide margins for a loaded machine.
/// (Before the client routed `InitProducer`, the producers below never started.)
const START_DEADLINE: Duration = Duration::from_secs(20);

/// Node `id`'s address, then the other brokers': the bootstrap list of the producers.
fn bootstrap_from(cluster: &TestCluster, id: u64) -> String {
    std::iter::once(id)
        .chain(cluster.ids().into_iter().filter(|o| *o != id))
        .map(|o| cluster.addr(o).to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// Starts a producer (named `name`, or unnamed) bootstrapped at `bootstrap` and sends
/// `value`; returns the offset it was acknowledged at, or why not within
/// [`START_DEADLINE`].
async fn start_and_send(bootstrap: &str, name: Option<&str>, value: &str) -> Result<u64, String> {
    let attempt = async {
        let conn = rill_client::Connection::connect(bootstrap)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let mut config = rill_client::ProducerConfig::new()
            .acks(rill_client::Acks::Quorum)
            // Longer than the deadline: a producer that cannot start is caught by the
            // deadline, not by its own budget.
            .retry_timeout_ms(2 * DEADLINE.as_millis() as u64);
        if let Some(name) = name {
            config = config.producer_name(name);
        }
        let producer = rill_client::Producer::new(conn, config);
        let record = rill_client::ProducerRecord::new(TOPIC, value.to_string()).partition(0);
        let (_, offset) = producer
            .send_and_wait(record)
            .await
            .map_err(|e| format!("send: {e}"))?;
        Ok(offset)
    };
    tokio::time::timeout(START_DEADLINE, attempt)
        .await
        .map_err(|_| format!("no acknowledgement within {START_DEADLINE:?}"))?
}

/// With node `cut` isolated from the other brokers, an unnamed and a named producer
/// bootstrapped at it start and have their records acknowledged. Returns (offset, value).
async fn producers_start(cluster: &TestCluster, cut: u64, split: &str) -> Vec<(u64, String)> {
    let bootstrap = bootstrap_from(cluster, cut);
    let mut acked = Vec::new();
    for name in [None, Some("initp-named")] {
        let value = format!("{split}-{}", name.unwrap_or("unnamed"));
        let started = tokio::time::Instant::now();
        let offset = start_and_send(&bootstrap, name, &value)
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "{split}: a producer {} bootstrapped at the isolated node {cut} did not \
                     start: {e}",
                    name.map_or("without a name".to_string(), |n| format!("named {n}"))
                )
            });
        eprintln!(
            "{split}: {value} acknowledged at {offset} after {:?}",
            started.elapsed()
        );
        acked.push((offset, value));
    }
    acked
}

/// Heals the split and waits until every broker reports every other live and all agree on
/// `__producers`' leader, which it returns.
async fn heal(cluster: &TestCluster) -> u64 {
    cluster.heal().expect("heal");
    for id in cluster.ids() {
        cluster
            .wait_live(id, &cluster.ids(), DEADLINE)
            .await
            .expect("every broker live again");
    }
    cluster
        .wait_partition_leader(PRODUCERS_TOPIC, 0, DEADLINE)
        .await
        .expect("an agreed leader of __producers")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producers_start_through_a_bootstrap_broker_cut_off_from_the_others() {
    let cluster = TestCluster::start_partitionable(3).await.expect("start");
    cluster
        .wait_controller_leader(DEADLINE)
        .await
        .expect("controller");
    let mut c = cluster.clients(1).await.expect("connect");
    c.admin
        .create_topic(pb::CreateTopicRequest {
            name: TOPIC.into(),
            config: Some(pb::TopicConfig {
                partitions: 1,
                ..Default::default()
            }),
            replication_factor: Some(3),
        })
        .await
        .expect("create rf 3");
    cluster
        .wait_partition_leader(TOPIC, 0, DEADLINE)
        .await
        .expect("a leader of the topic");
    let leader = cluster
        .wait_partition_leader(PRODUCERS_TOPIC, 0, DEADLINE)
        .await
        .expect("a leader of __producers");
    let mut acked = Vec::new();

    // 1. A follower of `__producers` cut off: it cannot forward to the leader.
    let follower = cluster.another(leader);
    cluster.isolate(follower).expect("isolate");
    eprintln!("split 1: node {follower} (a follower of {PRODUCERS_TOPIC}) isolated");
    acked.extend(producers_start(&cluster, follower, "follower-cut").await);
    let leader = heal(&cluster).await;

    // 2. The leader of `__producers` cut off: it cannot commit a named producer's epoch,
    // and the majority elects another leader.
    cluster.isolate(leader).expect("isolate");
    eprintln!("split 2: node {leader} (the leader of {PRODUCERS_TOPIC}) isolated");
    acked.extend(producers_start(&cluster, leader, "leader-cut").await);
    heal(&cluster).await;

    // Every acknowledged record is on every broker, at its offset.
    let end = acked.iter().map(|(o, _)| o + 1).max().unwrap_or(0);
    for id in cluster.ids() {
        cluster
            .wait_records(id, TOPIC, 0, end, DEADLINE)
            .await
            .expect("records replicated");
        let log = cluster.read_all(id, TOPIC, 0).await.expect("read");
        for (offset, value) in &acked {
            assert_eq!(
                log.get(offset),
                Some(value),
                "node {id}: {TOPIC}/0 at {offset}"
            );
        }
    }
}
