//! Ack modes of replicated partitions, on 3 real broker processes: `quorum` and `durable`
//! acknowledged records survive kill -9 of any broker, again and again; a `leader` ack answers
//! from the leader's own append (it does not wait for a majority) and gives the offset the
//! commit gives.

use std::collections::BTreeMap;
use std::time::Duration;

use rill_proto::v1 as pb;
use rill_tests::cluster::TestCluster;
use rill_tests::Clients;

/// The longest an election, a commit or a catch-up may take in these tests.
const DEADLINE: Duration = Duration::from_secs(30);

async fn clients(cluster: &TestCluster, id: u64) -> Clients {
    cluster.clients(id).await.expect("connect")
}

async fn create(cluster: &TestCluster, name: &str) {
    cluster
        .wait_controller_leader(DEADLINE)
        .await
        .expect("controller");
    let mut c = clients(cluster, 1).await;
    c.admin
        .create_topic(pb::CreateTopicRequest {
            name: name.into(),
            config: Some(pb::TopicConfig {
                partitions: 1,
                ..Default::default()
            }),
            replication_factor: Some(3),
        })
        .await
        .expect("create");
}

/// Produces `values` to partition 0 of `topic` with `ack`; returns the base offset.
async fn produce(
    c: &mut Clients,
    topic: &str,
    values: &[String],
    ack: pb::AckMode,
) -> Result<u64, tonic::Status> {
    let records = values
        .iter()
        .map(|v| pb::Record {
            value: bytes::Bytes::copy_from_slice(v.as_bytes()),
            ..Default::default()
        })
        .collect();
    let resp = c
        .log
        .produce(pb::ProduceRequest {
            topic: topic.into(),
            partition: Some(0),
            ack: ack as i32,
            payload: Some(pb::produce_request::Payload::Records(pb::RecordList {
                records,
            })),
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(resp.appends.len(), 1);
    assert_eq!(resp.appends[0].record_count as usize, values.len());
    Ok(resp.appends[0].base_offset)
}

/// Every record of partition 0 on node `id`: offset → value.
async fn read_all(cluster: &TestCluster, id: u64, topic: &str) -> BTreeMap<u64, String> {
    cluster.read_all(id, topic, 0).await.expect("read")
}

/// Waits until node `id` holds at least `n` records of partition 0.
async fn wait_records(cluster: &TestCluster, id: u64, topic: &str, n: u64) {
    cluster
        .wait_records(id, topic, 0, n, DEADLINE)
        .await
        .expect("records")
}

/// Checks that every replica holds every acknowledged record at its acknowledged offset,
/// exactly once, and that the replicas agree; returns how many were lost.
async fn verify(cluster: &TestCluster, topic: &str, acked: &BTreeMap<u64, String>) -> usize {
    let end = acked.keys().next_back().map_or(0, |o| o + 1);
    let mut lost = 0;
    let mut logs = Vec::new();
    for id in cluster.ids() {
        wait_records(cluster, id, topic, end).await;
        let got = read_all(cluster, id, topic).await;
        lost += acked
            .iter()
            .filter(|(offset, value)| got.get(offset) != Some(value))
            .count();
        let mut seen = std::collections::HashSet::new();
        for v in got.values() {
            assert!(seen.insert(v.clone()), "node {id}: {v} appears twice");
        }
        logs.push((id, got));
    }
    for (id, log) in &logs[1..] {
        for (offset, value) in log {
            if let Some(other) = logs[0].1.get(offset) {
                assert_eq!(
                    other, value,
                    "nodes {} and {id} differ at offset {offset}",
                    logs[0].0
                );
            }
        }
    }
    lost
}

/// kill -9 of every broker in turn (the leader or a follower), restarted each time, while
/// writes with `quorum` and `durable` acks alternate: no acknowledged record is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quorum_and_durable_acks_survive_kill_9_of_any_broker_in_turn() {
    let mut cluster = TestCluster::start(3).await.expect("start");
    create(&cluster, "acks").await;
    let mut acked: BTreeMap<u64, String> = BTreeMap::new();
    let mut next = 0u64;
    let mut kills = 0;
    for round in 0..=6u64 {
        let leader = cluster
            .wait_partition_leader("acks", 0, DEADLINE)
            .await
            .expect("leader");
        let mut c = clients(&cluster, leader).await;
        for i in 0..6 {
            let ack = if i % 2 == 0 {
                pb::AckMode::Quorum
            } else {
                pb::AckMode::Durable
            };
            let values: Vec<String> = (0..3)
                .map(|_| {
                    next += 1;
                    format!("{ack:?}-{next}")
                })
                .collect();
            // A failed write is not acknowledged and not checked.
            if let Ok(base) = produce(&mut c, "acks", &values, ack).await {
                for (k, v) in values.into_iter().enumerate() {
                    assert!(
                        acked.insert(base + k as u64, v).is_none(),
                        "offset acknowledged twice"
                    );
                }
            }
        }
        if round < 6 {
            // Nodes 1, 2, 3 in turn: sometimes the leader, sometimes a follower.
            let victim = round % 3 + 1;
            cluster.kill(victim).await.expect("kill -9");
            kills += 1;
            cluster
                .wait_partition_leader_among("acks", 0, DEADLINE)
                .await
                .expect("a leader among the others");
            cluster.restart(victim).await.expect("restart");
        }
    }
    let lost = verify(&cluster, "acks", &acked).await;
    println!(
        "quorum/durable acks: kills {kills}, records acked {}, records lost {lost}",
        acked.len()
    );
    assert!(!acked.is_empty());
    assert_eq!(lost, 0, "acknowledged records lost");
}

/// With both followers stopped (SIGSTOP), a `leader` ack still answers (it waits only for the
/// leader's own append) while a `quorum` write cannot be acknowledged. Concurrent `leader`
/// acks give the offsets their records get once committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_acks_answer_from_the_leader_alone_at_the_offsets_the_commit_gives() {
    let cluster = TestCluster::start(3).await.expect("start");
    create(&cluster, "lead").await;
    let leader = cluster
        .wait_partition_leader("lead", 0, DEADLINE)
        .await
        .expect("leader");

    // Concurrent writers, mixing leader and quorum acks: each acknowledged offset must hold
    // exactly that record once everything has committed.
    let mut tasks = Vec::new();
    for w in 0..4 {
        let mut c = clients(&cluster, leader).await;
        tasks.push(tokio::spawn(async move {
            let ack = if w == 3 {
                pb::AckMode::Quorum
            } else {
                pb::AckMode::Leader
            };
            let mut acked = Vec::new();
            for i in 0..15 {
                let values: Vec<String> =
                    (0..1 + (i % 3)).map(|k| format!("w{w}-{i}-{k}")).collect();
                let base = produce(&mut c, "lead", &values, ack)
                    .await
                    .expect("produce");
                acked.extend(
                    values
                        .into_iter()
                        .enumerate()
                        .map(|(k, v)| (base + k as u64, v)),
                );
            }
            acked
        }));
    }
    let mut acked: BTreeMap<u64, String> = BTreeMap::new();
    for t in tasks {
        for (offset, value) in t.await.expect("writer") {
            assert!(
                acked.insert(offset, value).is_none(),
                "offset {offset} acknowledged twice"
            );
        }
    }
    let lost = verify(&cluster, "lead", &acked).await;
    assert_eq!(lost, 0, "a leader ack gave another offset than the commit");

    // Both followers stopped: no majority.
    let followers: Vec<u64> = cluster
        .ids()
        .into_iter()
        .filter(|id| *id != leader)
        .collect();
    for f in &followers {
        cluster.signal(*f, "STOP").await.expect("SIGSTOP");
    }
    let mut q = clients(&cluster, leader).await;
    let quorum = tokio::spawn(async move {
        produce(
            &mut q,
            "lead",
            &["quorum-paused".to_string()],
            pb::AckMode::Quorum,
        )
        .await
    });
    let mut l = clients(&cluster, leader).await;
    let leader_acked = tokio::time::timeout(
        DEADLINE,
        produce(
            &mut l,
            "lead",
            &["leader-paused".to_string()],
            pb::AckMode::Leader,
        ),
    )
    .await
    .expect("a leader ack answers without a majority")
    .expect("leader ack");
    // The quorum write has not been acknowledged: nothing can commit without a majority.
    assert!(
        !quorum.is_finished() || matches!(quorum.await, Ok(Err(_))),
        "a quorum ack came without a majority"
    );
    for f in &followers {
        cluster.signal(*f, "CONT").await.expect("SIGCONT");
    }
    // After the pause the replicas agree; the leader-acked record is either where it was
    // acknowledged (committed) or gone (a new leader was elected without it): never
    // elsewhere.
    let longest = {
        let end = acked.len() as u64;
        let mut logs = Vec::new();
        for id in cluster.ids() {
            wait_records(&cluster, id, "lead", end).await;
            logs.push(read_all(&cluster, id, "lead").await);
        }
        let longest = logs.iter().max_by_key(|l| l.len()).expect("logs").clone();
        for log in &logs {
            for (o, v) in log {
                assert_eq!(longest.get(o), Some(v), "replicas differ at offset {o}");
            }
        }
        longest
    };
    if let Some((offset, _)) = longest.iter().find(|(_, v)| *v == "leader-paused") {
        assert_eq!(*offset, leader_acked, "a leader-acked record moved");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipelining_idempotent_producer_lands_every_batch_once_in_order() {
    use rill_client::{Producer, ProducerConfig, ProducerRecord};
    let cluster = TestCluster::start(3).await.expect("start");
    create(&cluster, "pipe").await;
    let leader = cluster
        .wait_partition_leader("pipe", 0, DEADLINE)
        .await
        .expect("leader");
    let conn = rill_client::Connection::connect(&cluster.addr(leader).to_string())
        .await
        .expect("connect");
    // 5 batches of 10 records in flight: the broker may put a batch into the Raft log before
    // an earlier one; the partition then refuses it with the sequence it expects and the
    // producer resends it, rather than failing it as invalid.
    let producer = Producer::new(
        conn,
        ProducerConfig::new()
            .max_in_flight(5)
            .batch_bytes(10 * (6 + 32))
            .linger_ms(1_000),
    );
    let n = 200;
    let mut acks = Vec::new();
    for i in 0..n {
        let record = ProducerRecord::new("pipe", format!("r{i:05}")).partition(0);
        acks.push(producer.send(record).await.expect("send"));
    }
    producer.flush().await.expect("flush");
    for (i, ack) in acks.into_iter().enumerate() {
        let acked = tokio::time::timeout(DEADLINE, ack)
            .await
            .expect("acked in time")
            .expect("acked");
        assert_eq!(
            acked,
            (0, i as u64),
            "record {i} acknowledged at another offset"
        );
    }
    let stored = read_all(&cluster, leader, "pipe").await;
    let expected: BTreeMap<u64, String> = (0..n).map(|i| (i, format!("r{i:05}"))).collect();
    assert_eq!(stored, expected, "each record once, in order");
}
