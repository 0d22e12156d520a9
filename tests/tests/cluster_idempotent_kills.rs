//! The client library's idempotent producer, 5 batches in flight, while the partition's
//! leader is killed with kill -9 again and again (3 real broker processes): every
//! acknowledged record is on every replica exactly once, at its acknowledged offset, in the
//! order it was sent, and no record appears twice, acknowledged or not. Its batches are
//! written once, at the Raft append (docs/REPLICATION.md, "Which entries are placed"), so a
//! kill lands between a batch's two writes, or between its stage and its apply, and a
//! retry sent to the next leader must still be answered, never written again.

use std::collections::BTreeMap;
use std::time::Duration;

use rill_tests::cluster::TestCluster;

/// The longest an election, a commit or a catch-up may take in this test.
const DEADLINE: Duration = Duration::from_secs(30);
/// Records sent before each kill, without waiting for their acks.
const PER_ROUND: usize = 60;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_leader_under_an_idempotent_producer_writes_every_record_once() {
    kill_the_leader_under_an_idempotent_producer(5).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "long: 30 leader kills"]
async fn kill_9_of_the_leader_thirty_times_under_an_idempotent_producer() {
    kill_the_leader_under_an_idempotent_producer(30).await;
}

/// Sends [`PER_ROUND`] records, kills the partition's leader with kill -9 while they are in
/// flight and restarts it, `kills` times, then checks every replica (see the module docs).
async fn kill_the_leader_under_an_idempotent_producer(kills: usize) {
    let mut cluster = TestCluster::start_with_topic("once", 1)
        .await
        .expect("3 brokers and an RF 3 topic");
    cluster
        .wait_partition_leader("once", 0, DEADLINE)
        .await
        .expect("leader");
    let list = cluster
        .ids()
        .iter()
        .map(|id| cluster.addr(*id).to_string())
        .collect::<Vec<_>>()
        .join(",");
    let conn = rill_client::Connection::connect(&list)
        .await
        .expect("connect through the list");
    let producer = rill_client::Producer::new(
        conn,
        rill_client::ProducerConfig::new()
            .retry_timeout_ms(30_000)
            .max_in_flight(5),
    );

    let mut sent: Vec<String> = Vec::new();
    let mut acked: BTreeMap<u64, String> = BTreeMap::new();
    let mut elections = 0;
    for round in 0..=kills {
        let mut deliveries = Vec::new();
        for i in 0..PER_ROUND {
            let value = format!("r{round}-m{i}");
            sent.push(value.clone());
            let record = rill_client::ProducerRecord::new("once", value.clone()).partition(0);
            deliveries.push((value, producer.send(record).await.expect("queued")));
        }
        if round < kills {
            // Killed while the round's batches are in flight.
            let leader = cluster
                .wait_partition_leader("once", 0, DEADLINE)
                .await
                .expect("leader");
            cluster.kill(leader).await.expect("kill -9");
            cluster.restart(leader).await.expect("restart");
            elections += 1;
        }
        for (value, delivery) in deliveries {
            let (_, offset) = tokio::time::timeout(DEADLINE, delivery)
                .await
                .expect("acknowledged within the deadline")
                .expect("acknowledged through the kills");
            assert!(
                acked.insert(offset, value.clone()).is_none(),
                "offset {offset} acknowledged twice"
            );
        }
    }
    assert_eq!(acked.len(), sent.len(), "every record acknowledged");

    let end = acked.keys().next_back().map_or(0, |o| o + 1);
    for id in cluster.ids() {
        cluster
            .wait_records(id, "once", 0, end, DEADLINE)
            .await
            .expect("records");
        let got = cluster.read_all(id, "once", 0).await.expect("read");
        for (offset, value) in &acked {
            assert_eq!(got.get(offset), Some(value), "node {id} offset {offset}");
        }
        let mut seen: BTreeMap<&String, u64> = BTreeMap::new();
        for (offset, value) in &got {
            if let Some(first) = seen.insert(value, *offset) {
                panic!("node {id}: {value} at offset {first} and again at {offset}");
            }
        }
        let order: Vec<&String> = got.values().collect();
        let want: Vec<&String> = sent.iter().collect();
        assert_eq!(
            order, want,
            "node {id}: the log holds what was sent, in order"
        );
    }
    println!(
        "kills {kills}, elections >= {elections}, records acked {}, lost 0, duplicates 0",
        acked.len()
    );
}
