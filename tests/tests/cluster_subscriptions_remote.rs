//! Subscriptions on topics without a replica on the broker that serves them (the leader of
//! `__subscriptions`), on 3 real broker processes: that broker reads the records from the
//! broker holding them, waits for new ones with a long poll there, and produces dead letters
//! at the dead-letter partition's leader. After kill -9 of the serving broker the new one
//! delivers exactly the records not acknowledged. A holder that dies stalls only its own
//! partition; a webhook pusher is woken by the long poll too.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rill_proto::v1 as pb;
use rill_tests::cluster::TestCluster;
use rill_tests::hooks::HookServer;
use rill_tests::subs::{self, SUBSCRIPTIONS_TOPIC};

/// The longest an election, a commit or a failover may take in this test.
const DEADLINE: Duration = Duration::from_secs(30);
const CONSUMER: &str = "worker";

/// Produces `values` to `topic`/`p` at node `at`, retrying while the partition settles.
async fn produce(cluster: &TestCluster, at: u64, topic: &str, p: u32, values: &[String]) {
    subs::produce(cluster, at, topic, p, values, DEADLINE)
        .await
        .expect("produce");
}

/// Receives through node `via` until `n` records came (or the deadline passed): (partition,
/// offset, delivery count, value) of each.
async fn receive_n(
    cluster: &TestCluster,
    via: u64,
    sub: &str,
    n: usize,
) -> Vec<(u32, u64, u32, String)> {
    let mut got = Vec::new();
    let until = tokio::time::Instant::now() + DEADLINE;
    while got.len() < n && tokio::time::Instant::now() < until {
        let records = subs::receive(cluster, via, sub, CONSUMER, (100, 1_000))
            .await
            .expect("receive");
        got.extend(records.into_iter().map(|r| {
            let rec = r.record.expect("a record");
            (
                r.partition,
                rec.offset,
                r.delivery_count,
                String::from_utf8_lossy(&rec.value).into_owned(),
            )
        }));
    }
    got
}

/// The values of `topic`/0, read at node `at`, once it holds `n` records.
async fn values_at(cluster: &TestCluster, at: u64, topic: &str, n: u64) -> Vec<String> {
    cluster
        .wait_records(at, topic, 0, n, DEADLINE)
        .await
        .expect("records");
    cluster
        .read_all(at, topic, 0)
        .await
        .expect("read")
        .into_values()
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_on_an_rf1_topic_held_elsewhere_delivers_dead_letters_and_survives_kill_9() {
    let (mut cluster, serving) = subs::start_serving(3, DEADLINE)
        .await
        .expect("a cluster and its serving broker");
    // The topic and the dead-letter topic each live on one broker, not the serving one
    // (which is killed below; they must outlive it).
    let (topic, replicas) =
        subs::create_topic_away_from(&cluster, serving, "jobs", (1, 1), &[serving])
            .await
            .expect("a topic away from the serving broker");
    let owner = replicas[0][0];
    let (dlq, replicas) =
        subs::create_topic_away_from(&cluster, serving, "dead", (1, 1), &[serving])
            .await
            .expect("a dead-letter topic away from the serving broker");
    let dlq_owner = replicas[0][0];
    eprintln!("serving {serving}, {topic} on {owner}, {dlq} on {dlq_owner}");

    let values: Vec<String> = (0..10).map(|i| format!("job-{i}")).collect();
    produce(&cluster, owner, &topic, 0, &values).await;
    // Created through the topic's owner: forwarded to the serving broker, which used to
    // refuse a topic it holds no replica of.
    subs::create(
        &cluster,
        owner,
        "workers",
        pb::SubscriptionConfig {
            topic: topic.clone(),
            ack_deadline_ms: 60_000,
            max_delivery_attempts: 2,
            dead_letter_topic: dlq.clone(),
            ..Default::default()
        },
    )
    .await
    .expect("a subscription on a topic held by another broker");

    // Every record, once, read from the owner's log.
    let got = receive_n(&cluster, serving, "workers", 10).await;
    let offsets: Vec<u64> = got.iter().map(|g| g.1).collect();
    assert_eq!(offsets, (0..10).collect::<Vec<_>>(), "{got:?}");
    assert!(got
        .iter()
        .all(|g| g.0 == 0 && g.2 == 1 && g.3 == values[g.1 as usize]));

    // 0..=5 acked; 6 and 7 nacked twice (their attempts run out: dead letters); 8 and 9 held.
    for o in 0..=5 {
        subs::settle(
            &cluster,
            serving,
            "workers",
            CONSUMER,
            (0, o),
            pb::AckType::Ack,
        )
        .await
        .expect("ack");
    }
    for o in [6, 7] {
        subs::settle(
            &cluster,
            serving,
            "workers",
            CONSUMER,
            (0, o),
            pb::AckType::Nack,
        )
        .await
        .expect("nack");
    }
    let again = receive_n(&cluster, serving, "workers", 2).await;
    let again: Vec<(u64, u32)> = again.iter().map(|g| (g.1, g.2)).collect();
    assert_eq!(
        again,
        vec![(6, 2), (7, 2)],
        "the nacked records, second delivery"
    );
    for o in [6, 7] {
        subs::settle(
            &cluster,
            serving,
            "workers",
            CONSUMER,
            (0, o),
            pb::AckType::Nack,
        )
        .await
        .expect("last nack");
    }
    assert_eq!(
        values_at(&cluster, dlq_owner, &dlq, 2).await,
        vec!["job-6".to_string(), "job-7".to_string()],
        "the dead-letter topic, on another broker, holds exactly the two"
    );

    // A consumer waiting when a record is produced gets it: the serving broker long-polls
    // the owner. (Nothing else is deliverable: 8 and 9 are held for a minute, so without
    // the long poll this receive would end empty after its 10 s.)
    let waiting = {
        let subs_client = subs::client(&cluster, serving).await.expect("connect");
        tokio::spawn(async move {
            let mut c = subs_client;
            c.receive(pb::ReceiveRequest {
                subscription: "workers".into(),
                consumer_id: CONSUMER.into(),
                max_records: 10,
                max_wait_ms: 10_000,
                max_bytes: 0,
            })
            .await
        })
    };
    // Let the receive start waiting first (if it did not yet, the record is simply there).
    tokio::time::sleep(Duration::from_millis(300)).await;
    produce(&cluster, owner, &topic, 0, &["job-10".to_string()]).await;
    let late = waiting
        .await
        .expect("join")
        .expect("receive")
        .into_inner()
        .records;
    let late: Vec<u64> = late
        .iter()
        .filter_map(|r| r.record.as_ref())
        .map(|r| r.offset)
        .collect();
    assert_eq!(
        late,
        vec![10],
        "the record produced while the consumer waited"
    );
    subs::settle(
        &cluster,
        serving,
        "workers",
        CONSUMER,
        (0, 10),
        pb::AckType::Ack,
    )
    .await
    .expect("ack 10");

    // kill -9 the serving broker: the new one (holding the topic or not) delivers exactly
    // the records not acknowledged, whose locks died with the old one.
    cluster.kill(serving).await.expect("kill");
    let next = cluster
        .wait_partition_leader(SUBSCRIPTIONS_TOPIC, 0, DEADLINE)
        .await
        .expect("a new leader of __subscriptions");
    eprintln!("serving now {next}");
    let after = receive_n(&cluster, next, "workers", 2).await;
    let after: BTreeSet<u64> = after.iter().map(|g| g.1).collect();
    assert_eq!(
        after,
        BTreeSet::from([8, 9]),
        "exactly the records not acked"
    );
    let more = subs::receive(&cluster, next, "workers", "other", (100, 1_000))
        .await
        .expect("receive");
    assert!(more.is_empty(), "nothing else: {more:?}");
    let d = subs::describe(&cluster, next, "workers")
        .await
        .expect("describe");
    assert_eq!(d.dead_lettered, 2, "{d:?}");
    assert_eq!(d.partitions[0].high_watermark, 11, "the owner's end: {d:?}");
    assert_eq!(
        values_at(&cluster, dlq_owner, &dlq, 2).await.len(),
        2,
        "no dead letter twice"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_on_an_rf2_topic_of_3_brokers_delivers_every_partition_once() {
    let (cluster, serving) = subs::start_serving(3, DEADLINE)
        .await
        .expect("a cluster and its serving broker");
    let (topic, replicas) =
        subs::create_topic_away_from(&cluster, serving, "pairs", (3, 2), &[serving])
            .await
            .expect("a partition without a replica on the serving broker");
    eprintln!("serving {serving}, {topic} replicas {replicas:?}");
    let mut expected = BTreeSet::new();
    for p in 0..3u32 {
        let leader = cluster
            .wait_partition_leader_among(&topic, p, DEADLINE)
            .await
            .expect("partition leader");
        let values: Vec<String> = (0..5).map(|i| format!("p{p}-{i}")).collect();
        produce(&cluster, leader, &topic, p, &values).await;
        expected.extend((0..5u64).map(|o| (p, o)));
    }
    subs::create(
        &cluster,
        serving,
        "pairs-sub",
        pb::SubscriptionConfig {
            topic: topic.clone(),
            ..Default::default()
        },
    )
    .await
    .expect("a subscription on an RF 2 topic");
    let got = receive_n(&cluster, serving, "pairs-sub", expected.len()).await;
    let seen: Vec<(u32, u64)> = got.iter().map(|g| (g.0, g.1)).collect();
    assert_eq!(seen.len(), expected.len(), "each once: {got:?}");
    assert_eq!(seen.iter().copied().collect::<BTreeSet<_>>(), expected);
    assert!(
        got.iter().all(|g| g.3 == format!("p{}-{}", g.0, g.1)),
        "{got:?}"
    );
    for (p, o) in &seen {
        subs::settle(
            &cluster,
            serving,
            "pairs-sub",
            CONSUMER,
            (*p, *o),
            pb::AckType::Ack,
        )
        .await
        .expect("ack");
    }
    let more = subs::receive(&cluster, serving, "pairs-sub", CONSUMER, (100, 500))
        .await
        .expect("receive");
    assert!(more.is_empty(), "every record acked: {more:?}");
    let d = subs::describe(&cluster, serving, "pairs-sub")
        .await
        .expect("describe");
    // Described from the holders' logs: each partition's end, nothing left.
    let ends: Vec<(u32, u64, u64)> = d
        .partitions
        .iter()
        .map(|p| (p.partition, p.high_watermark, p.ack_floor))
        .collect();
    assert_eq!(ends, vec![(0, 5, 5), (1, 5, 5), (2, 5, 5)], "{d:?}");
    assert_eq!(d.backlog, 0, "{d:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_holder_of_one_partition_does_not_stall_the_others_and_its_records_come_after_its_restart(
) {
    let (mut cluster, serving) = subs::start_serving(3, DEADLINE)
        .await
        .expect("a cluster and its serving broker");
    let (topic, replicas) =
        subs::create_topic_away_from(&cluster, serving, "spread", (3, 1), &[serving])
            .await
            .expect("a partition away from the serving broker");
    let owners: Vec<u64> = replicas.iter().map(|r| r[0]).collect();
    let (victim_partition, victim) = owners
        .iter()
        .enumerate()
        .find(|(_, o)| **o != serving)
        .map(|(p, o)| (p as u32, *o))
        .expect("a partition held elsewhere");
    eprintln!("serving {serving}, {topic} owners {owners:?}, killing {victim}");
    for (p, owner) in owners.iter().enumerate() {
        let values: Vec<String> = (0..2).map(|i| format!("p{p}-{i}")).collect();
        produce(&cluster, *owner, &topic, p as u32, &values).await;
    }
    subs::create(
        &cluster,
        serving,
        "spread-sub",
        pb::SubscriptionConfig {
            topic: topic.clone(),
            ..Default::default()
        },
    )
    .await
    .expect("subscription");
    let first = receive_n(&cluster, serving, "spread-sub", 6).await;
    assert_eq!(first.len(), 6, "{first:?}");
    // All acked but one record of the partition about to lose its holder, nacked: it is due
    // again at once, so the next passes must read that partition.
    for g in &first {
        let kind = if (g.0, g.1) == (victim_partition, 1) {
            pb::AckType::Nack
        } else {
            pb::AckType::Ack
        };
        subs::settle(&cluster, serving, "spread-sub", CONSUMER, (g.0, g.1), kind)
            .await
            .expect("settle");
    }

    // The holder of that partition dies: the others are still delivered (each pass leaves
    // the dead one out, then skips it for a while), and acked.
    cluster.kill(victim).await.expect("kill");
    let mut expected = BTreeSet::new();
    for (p, owner) in owners.iter().enumerate() {
        if *owner == victim {
            continue;
        }
        let values: Vec<String> = (2..4).map(|i| format!("p{p}-{i}")).collect();
        produce(&cluster, *owner, &topic, p as u32, &values).await;
        expected.extend([(p as u32, 2u64), (p as u32, 3)]);
    }
    let during = receive_n(&cluster, serving, "spread-sub", expected.len()).await;
    let during_set: BTreeSet<(u32, u64)> = during.iter().map(|g| (g.0, g.1)).collect();
    assert_eq!(
        during_set, expected,
        "the live partitions' records: {during:?}"
    );
    for (p, o) in &during_set {
        subs::settle(
            &cluster,
            serving,
            "spread-sub",
            CONSUMER,
            (*p, *o),
            pb::AckType::Ack,
        )
        .await
        .expect("an ack while another partition's holder is down");
    }

    // Back: the nacked record comes again, and a new one.
    cluster.restart(victim).await.expect("restart");
    produce(
        &cluster,
        victim,
        &topic,
        victim_partition,
        &["late".to_string()],
    )
    .await;
    let after = receive_n(&cluster, serving, "spread-sub", 2).await;
    let after: BTreeSet<(u32, u64)> = after.iter().map(|g| (g.0, g.1)).collect();
    assert_eq!(
        after,
        BTreeSet::from([(victim_partition, 1), (victim_partition, 2)]),
        "the restarted holder's records"
    );
}

/// Notes each POSTed record's offset and acks it.
async fn hook(
    axum::extract::State(seen): axum::extract::State<Arc<Mutex<BTreeSet<u64>>>>,
    body: bytes::Bytes,
) -> axum::http::StatusCode {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(&body) else {
        return axum::http::StatusCode::BAD_REQUEST;
    };
    if let Some(o) = v["message"]["offset"].as_u64() {
        seen.lock().expect("lock").insert(o);
    }
    axum::http::StatusCode::OK
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_on_a_topic_held_elsewhere_gets_the_records_produced_while_it_waits() {
    let (cluster, serving) = subs::start_serving(3, DEADLINE)
        .await
        .expect("a cluster and its serving broker");
    let (topic, replicas) =
        subs::create_topic_away_from(&cluster, serving, "hooked", (1, 1), &[serving])
            .await
            .expect("a topic away from the serving broker");
    let owner = replicas[0][0];
    let seen: Arc<Mutex<BTreeSet<u64>>> = Arc::default();
    let server = HookServer::start(
        axum::Router::new()
            .route("/hook", axum::routing::post(hook))
            .with_state(Arc::clone(&seen)),
    )
    .await
    .expect("hook server");
    let first: Vec<String> = (0..5).map(|i| format!("first-{i}")).collect();
    produce(&cluster, owner, &topic, 0, &first).await;
    subs::create(
        &cluster,
        serving,
        "hooked-sub",
        pb::SubscriptionConfig {
            topic: topic.clone(),
            push: Some(pb::PushConfig {
                endpoint: server.endpoint.clone(),
                ..Default::default()
            }),
            ..Default::default()
        },
    )
    .await
    .expect("a webhook subscription");
    let wait_for = |n: u64| {
        let seen = Arc::clone(&seen);
        async move {
            let until = tokio::time::Instant::now() + DEADLINE;
            loop {
                let got = seen.lock().expect("lock").clone();
                if got == (0..n).collect::<BTreeSet<u64>>() {
                    return;
                }
                assert!(
                    tokio::time::Instant::now() < until,
                    "POSTed {got:?}, expected 0..{n}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    wait_for(5).await;
    // The pusher is idle now: only the long poll at the owner can wake it.
    let later: Vec<String> = (0..5).map(|i| format!("later-{i}")).collect();
    produce(&cluster, owner, &topic, 0, &later).await;
    wait_for(10).await;
    server.stop().await.expect("stop the hook server");
}
