//! Topics through the controller on 3 real broker processes: replication factor 1 topics are
//! known to every broker and served by their partitions' owners through any of them; deletes
//! reach every broker (one down at the time too, after its restart) by tombstones; a recreate
//! starts empty; a restart deletes nothing while the metadata replays; internal and unknown
//! topics cannot be deleted.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use rill_proto::v1 as pb;
use rill_tests::cluster::{while_unavailable, TestCluster};
use tonic::Code;

/// The longest an election, a commit or a broker following the metadata may take here.
const DEADLINE: Duration = Duration::from_secs(30);

/// Polls `check` until it holds; fails the test with `what` after the deadline.
async fn wait_until<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let until = tokio::time::Instant::now() + DEADLINE;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < until,
            "{what}: not within {DEADLINE:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Retries `call` while it answers UNAVAILABLE (see [`while_unavailable`]).
async fn retrying<T, F, Fut>(call: F) -> Result<T, tonic::Status>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, tonic::Status>>,
{
    while_unavailable(DEADLINE, call).await
}

async fn create(
    cluster: &TestCluster,
    via: u64,
    name: &str,
    partitions: u32,
    rf: u32,
) -> Result<(), tonic::Status> {
    retrying(|| async {
        let mut admin = cluster.clients(via).await.expect("connect").admin;
        admin
            .create_topic(pb::CreateTopicRequest {
                name: name.into(),
                config: Some(pb::TopicConfig {
                    partitions,
                    ..Default::default()
                }),
                replication_factor: Some(rf),
            })
            .await
            .map(|_| ())
    })
    .await
}

async fn delete(cluster: &TestCluster, via: u64, name: &str) -> Result<(), tonic::Status> {
    retrying(|| async {
        let mut admin = cluster.clients(via).await.expect("connect").admin;
        admin
            .delete_topic(pb::DeleteTopicRequest { name: name.into() })
            .await
            .map(|_| ())
    })
    .await
}

/// The topics node `id` lists; `None` if it does not answer.
async fn listed(cluster: &TestCluster, id: u64) -> Option<BTreeSet<String>> {
    let mut admin = cluster.clients(id).await.ok()?.admin;
    let topics = admin
        .list_topics(pb::ListTopicsRequest {})
        .await
        .ok()?
        .into_inner()
        .topics;
    Some(topics.into_iter().map(|t| t.name).collect())
}

async fn lists(cluster: &TestCluster, id: u64, name: &str) -> Option<bool> {
    listed(cluster, id).await.map(|t| t.contains(name))
}

/// Node `id`'s line for `name` in `raft/replicated-topics`, split at tabs.
fn setup_line(cluster: &TestCluster, id: u64, name: &str) -> Option<Vec<String>> {
    let text = std::fs::read_to_string(cluster.data_dir(id).join("raft/replicated-topics")).ok()?;
    text.lines()
        .map(|l| l.split('\t').map(str::to_string).collect::<Vec<_>>())
        .find(|fields| fields[0] == name)
}

/// The partition groups node `id` records for `name`.
fn groups_of(cluster: &TestCluster, id: u64, name: &str) -> Vec<u64> {
    let line = setup_line(cluster, id, name).expect("a setup line");
    assert_eq!(line.len(), 4, "{line:?}");
    line[3]
        .split(',')
        .map(|g| g.parse().expect("a group id"))
        .collect()
}

fn topic_dir(cluster: &TestCluster, id: u64, name: &str) -> PathBuf {
    cluster.data_dir(id).join("topics").join(name)
}

fn group_dir(cluster: &TestCluster, id: u64, group: u64) -> PathBuf {
    cluster.data_dir(id).join("raft").join(group.to_string())
}

/// Whether node `id` holds nothing of `name`: not listed, no data folder, none of `groups`'
/// Raft folders, no line in `replicated-topics`.
async fn holds_nothing_of(cluster: &TestCluster, id: u64, name: &str, groups: &[u64]) -> bool {
    lists(cluster, id, name).await == Some(false)
        && !topic_dir(cluster, id, name).exists()
        && groups.iter().all(|g| !group_dir(cluster, id, *g).exists())
        && setup_line(cluster, id, name).is_none()
}

/// A client-library producer bootstrapped through node `via` only.
async fn producer_via(cluster: &TestCluster, via: u64) -> rill_client::Producer {
    let conn = rill_client::Connection::connect(&cluster.addr(via).to_string())
        .await
        .expect("connect");
    rill_client::Producer::new(
        conn,
        rill_client::ProducerConfig::new().retry_timeout_ms(30_000),
    )
}

/// Sends `values` to partition `p` of `topic` one by one; returns offset → value.
async fn send(
    producer: &rill_client::Producer,
    topic: &str,
    p: u32,
    values: &[String],
) -> BTreeMap<u64, String> {
    let mut acked = BTreeMap::new();
    for v in values {
        let (partition, offset) = producer
            .send_and_wait(rill_client::ProducerRecord::new(topic, v.clone()).partition(p))
            .await
            .unwrap_or_else(|e| panic!("{topic}/{p}: {v} not acknowledged: {e}"));
        assert_eq!(partition, p);
        acked.insert(offset, v.clone());
    }
    acked
}

/// The owner of each partition of a replication factor 1 topic, as node `id`'s metadata
/// says.
async fn owners(cluster: &TestCluster, id: u64, name: &str) -> Vec<u64> {
    let md = cluster.metadata(id, name).await.expect("metadata");
    let topic = md
        .topics
        .iter()
        .find(|t| t.name == name)
        .expect("in the metadata");
    assert_eq!(topic.replication_factor, 1);
    topic
        .partitions
        .iter()
        .map(|p| {
            assert_eq!(p.replicas.len(), 1, "one replica: {p:?}");
            p.replicas[0]
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_rf1_topic_is_known_to_every_broker_and_served_by_its_owners_through_any_broker() {
    let cluster = TestCluster::start(3).await.expect("start");
    cluster
        .wait_controller_leader(DEADLINE)
        .await
        .expect("controller");
    create(&cluster, 1, "solo", 3, 1).await.expect("create");
    for id in cluster.ids() {
        wait_until(&format!("node {id} lists solo"), || async {
            lists(&cluster, id, "solo").await == Some(true)
        })
        .await;
    }
    let owners = owners(&cluster, 3, "solo").await;
    assert_eq!(
        owners.iter().copied().collect::<BTreeSet<_>>(),
        cluster.ids().into_iter().collect::<BTreeSet<_>>(),
        "the placement spreads the partitions over the brokers: {owners:?}"
    );
    let status = cluster.status(2).await.expect("status");
    for (p, owner) in owners.iter().enumerate() {
        let b = status
            .brokers
            .iter()
            .find(|b| b.node_id == *owner)
            .expect("the owner");
        assert!(
            b.partitions_led.contains(&format!("solo/{p}")),
            "the owner leads its partition in ClusterStatus: {status:?}"
        );
    }

    // Produce to every partition through each broker in turn: the producer follows the
    // redirect to the partition's owner.
    let mut acked: Vec<BTreeMap<u64, String>> = vec![BTreeMap::new(); 3];
    for via in cluster.ids() {
        let producer = producer_via(&cluster, via).await;
        for p in 0..3u32 {
            let values: Vec<String> = (0..3).map(|i| format!("via{via}-p{p}-{i}")).collect();
            acked[p as usize].extend(send(&producer, "solo", p, &values).await);
        }
    }
    for (p, owner) in owners.iter().enumerate() {
        let p = p as u32;
        let expected = &acked[p as usize];
        assert_eq!(
            expected.keys().copied().collect::<Vec<_>>(),
            (0..9).collect::<Vec<u64>>(),
            "one log per partition: consecutive offsets"
        );
        for id in cluster.ids() {
            let mut c = cluster.clients(id).await.expect("connect");
            match c.fetch("solo", p, 0, 0).await {
                Ok(_) if id == *owner => {
                    let got = cluster.read_all(id, "solo", p).await.expect("read");
                    assert_eq!(&got, expected, "the owner {owner} of partition {p}");
                }
                Ok(r) => panic!("node {id} served partition {p} owned by {owner}: {r:?}"),
                Err(s) => {
                    assert_ne!(id, *owner, "the owner refused: {s:?}");
                    assert_eq!(s.code(), Code::FailedPrecondition, "{s:?}");
                    let named = s
                        .metadata()
                        .get("rill-leader")
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_string);
                    assert_eq!(
                        named,
                        Some(cluster.addr(*owner).to_string()),
                        "node {id} names the owner of partition {p}"
                    );
                }
            }
        }
    }

    // Every broker describes each partition with its holder's figures, not its own empty
    // copy's.
    for id in cluster.ids() {
        let mut c = cluster.clients(id).await.expect("connect");
        let d = c
            .admin
            .describe_topic(pb::DescribeTopicRequest {
                name: "solo".into(),
            })
            .await
            .expect("describe")
            .into_inner();
        for p in &d.partitions {
            assert_eq!(
                p.high_watermark, 9,
                "node {id} describes partition {} by its owner's log: {d:?}",
                p.partition
            );
        }
    }

    // A subscription on it is served by the leader of `__subscriptions`, which owns one
    // partition of the three: it reads the other two from their owners.
    rill_tests::subs::create(
        &cluster,
        3,
        "solo-sub",
        pb::SubscriptionConfig {
            topic: "solo".into(),
            ..Default::default()
        },
    )
    .await
    .expect("a subscription on an RF 1 topic");
    let mut got = BTreeSet::new();
    let until = tokio::time::Instant::now() + DEADLINE;
    while got.len() < 27 && tokio::time::Instant::now() < until {
        let records = rill_tests::subs::receive(&cluster, 3, "solo-sub", "w", (100, 1_000))
            .await
            .expect("receive");
        got.extend(
            records
                .into_iter()
                .map(|r| (r.partition, r.record.map_or(u64::MAX, |x| x.offset))),
        );
    }
    let expected: BTreeSet<(u32, u64)> = (0..3).flat_map(|p| (0..9).map(move |o| (p, o))).collect();
    assert_eq!(got, expected, "every record of every owner's partition");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_reaches_every_broker_one_down_meanwhile_too_and_a_recreate_starts_empty() {
    let mut cluster = TestCluster::start(3).await.expect("start");
    cluster
        .wait_controller_leader(DEADLINE)
        .await
        .expect("controller");
    create(&cluster, 1, "gone", 2, 3).await.expect("create");
    let leader = cluster
        .wait_partition_leader("gone", 0, DEADLINE)
        .await
        .expect("leader");
    let producer = producer_via(&cluster, leader).await;
    for p in 0..2u32 {
        let values: Vec<String> = (0..5).map(|i| format!("old-{p}-{i}")).collect();
        send(&producer, "gone", p, &values).await;
        for id in cluster.ids() {
            cluster
                .wait_records(id, "gone", p, 5, DEADLINE)
                .await
                .expect("replicated");
        }
    }
    drop(producer);
    let old_groups = groups_of(&cluster, 1, "gone");
    assert_eq!(old_groups.len(), 2);
    let via = cluster.another(leader);
    let down = cluster
        .ids()
        .into_iter()
        .find(|id| *id != leader && *id != via)
        .expect("a third broker");

    cluster.kill(down).await.expect("kill -9");
    delete(&cluster, via, "gone")
        .await
        .expect("delete through a non-leader");
    for id in [leader, via] {
        wait_until(&format!("node {id} removes every trace of gone"), || {
            holds_nothing_of(&cluster, id, "gone", &old_groups)
        })
        .await;
    }
    assert!(
        topic_dir(&cluster, down, "gone").exists()
            && old_groups
                .iter()
                .all(|g| group_dir(&cluster, down, *g).exists()),
        "the broker that was down still holds its copy"
    );
    cluster.restart(down).await.expect("restart");
    wait_until(
        &format!("node {down}, down during the delete, removes its copy after its restart"),
        || holds_nothing_of(&cluster, down, "gone", &old_groups),
    )
    .await;

    // The same name again: new groups, every replica empty from offset 0.
    create(&cluster, down, "gone", 2, 3)
        .await
        .expect("recreate");
    for id in cluster.ids() {
        wait_until(&format!("node {id} sets the new gone up"), || async {
            setup_line(&cluster, id, "gone").is_some()
                && lists(&cluster, id, "gone").await == Some(true)
        })
        .await;
        let groups = groups_of(&cluster, id, "gone");
        assert!(
            groups.iter().all(|g| !old_groups.contains(g)),
            "fresh groups: {groups:?} after {old_groups:?}"
        );
        for p in 0..2u32 {
            let r = cluster
                .clients(id)
                .await
                .expect("connect")
                .fetch("gone", p, 0, 0)
                .await
                .expect("a replica serves the new topic");
            assert_eq!(
                (r.high_watermark, r.records.len()),
                (0, 0),
                "node {id} partition {p} starts empty"
            );
        }
    }
    let producer = producer_via(&cluster, via).await;
    for p in 0..2u32 {
        let values: Vec<String> = (0..3).map(|i| format!("new-{p}-{i}")).collect();
        let acked = send(&producer, "gone", p, &values).await;
        assert_eq!(acked.keys().copied().collect::<Vec<_>>(), vec![0, 1, 2]);
        for id in cluster.ids() {
            cluster
                .wait_records(id, "gone", p, 3, DEADLINE)
                .await
                .expect("replicated");
            let got = cluster.read_all(id, "gone", p).await.expect("read");
            assert_eq!(got, acked, "node {id} partition {p}: only the new records");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_broker_deletes_nothing_while_its_metadata_replays() {
    let mut cluster = TestCluster::start(3).await.expect("start");
    cluster
        .wait_controller_leader(DEADLINE)
        .await
        .expect("controller");
    create(&cluster, 1, "kept", 1, 3)
        .await
        .expect("create rf 3");
    create(&cluster, 1, "kept1", 3, 1)
        .await
        .expect("create rf 1");
    let owners = owners(&cluster, 1, "kept1").await;
    let producer = producer_via(&cluster, 1).await;
    let values: Vec<String> = (0..5).map(|i| format!("r{i}")).collect();
    let replicated = send(&producer, "kept", 0, &values).await;
    let mut single = Vec::new();
    for p in 0..3u32 {
        let values: Vec<String> = (0..4).map(|i| format!("p{p}-{i}")).collect();
        single.push(send(&producer, "kept1", p, &values).await);
    }
    drop(producer);
    // A broker that owns a replication factor 1 partition: its records exist nowhere else.
    let restarted = owners[1];
    cluster
        .wait_records(restarted, "kept", 0, 5, DEADLINE)
        .await
        .expect("replicated");
    cluster.kill(restarted).await.expect("kill -9");
    cluster.restart(restarted).await.expect("restart");
    // Once its metadata names both topics again, the replay is past their creation.
    wait_until(
        "the restarted broker's metadata has both topics",
        || async {
            let md = |t: &'static str| cluster.metadata(restarted, t);
            match (md("kept").await, md("kept1").await) {
                (Ok(a), Ok(b)) => a.topics.len() == 1 && b.topics.len() == 1,
                _ => false,
            }
        },
    )
    .await;
    assert_eq!(
        cluster
            .read_all(restarted, "kept1", 1)
            .await
            .expect("read the owned partition"),
        single[1],
        "the owned partition keeps its records"
    );
    cluster
        .wait_records(restarted, "kept", 0, 5, DEADLINE)
        .await
        .expect("caught up");
    assert_eq!(
        cluster.read_all(restarted, "kept", 0).await.expect("read"),
        replicated
    );
    let listed = listed(&cluster, restarted).await.expect("list");
    assert!(
        listed.contains("kept") && listed.contains("kept1"),
        "{listed:?}"
    );
    assert!(setup_line(&cluster, restarted, "kept").is_some());
    assert!(setup_line(&cluster, restarted, "kept1").is_some());
    // And it still takes writes for its partition, at the next offset.
    let producer = producer_via(&cluster, restarted).await;
    let more = send(&producer, "kept1", 1, &["after".to_string()]).await;
    assert_eq!(more.keys().copied().collect::<Vec<_>>(), vec![4]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_an_internal_or_unknown_topic_is_refused_and_changes_nothing() {
    let cluster = TestCluster::start(3).await.expect("start");
    cluster
        .wait_controller_leader(DEADLINE)
        .await
        .expect("controller");
    create(&cluster, 1, "stays", 2, 1).await.expect("create");
    wait_until("__groups is created", || async {
        cluster
            .metadata(1, "__groups")
            .await
            .is_ok_and(|m| m.topics.len() == 1)
    })
    .await;
    for id in cluster.ids() {
        wait_until(&format!("node {id} sets the topics up"), || async {
            setup_line(&cluster, id, "__groups").is_some()
                && lists(&cluster, id, "stays").await == Some(true)
        })
        .await;
    }
    for (via, name) in [(2, "__groups"), (3, "__security")] {
        let err = delete(&cluster, via, name).await.expect_err("internal");
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert!(
            err.message().contains(name) && err.message().contains("internal"),
            "{err:?}"
        );
    }
    let err = delete(&cluster, 3, "nothing-here")
        .await
        .expect_err("unknown");
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    assert!(err.message().contains("nothing-here"), "{err:?}");
    for id in cluster.ids() {
        assert!(setup_line(&cluster, id, "__groups").is_some(), "node {id}");
        assert_eq!(lists(&cluster, id, "stays").await, Some(true), "node {id}");
        let md = cluster.metadata(id, "__groups").await.expect("metadata");
        assert_eq!(md.topics.len(), 1, "node {id} still has __groups");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_down_through_a_delete_and_a_recreate_drops_the_old_data_for_the_new_topic() {
    let mut cluster = TestCluster::start(3).await.expect("start");
    cluster
        .wait_controller_leader(DEADLINE)
        .await
        .expect("controller");
    create(&cluster, 1, "again", 1, 3).await.expect("create");
    let producer = producer_via(&cluster, 1).await;
    let old: Vec<String> = (0..6).map(|i| format!("old-{i}")).collect();
    send(&producer, "again", 0, &old).await;
    drop(producer);
    let down = 3;
    cluster
        .wait_records(down, "again", 0, 6, DEADLINE)
        .await
        .expect("replicated");
    let old_groups = groups_of(&cluster, down, "again");
    let old_incarnation: u64 = setup_line(&cluster, down, "again").expect("line")[1]
        .parse()
        .expect("incarnation");
    cluster.kill(down).await.expect("kill -9");
    delete(&cluster, 1, "again").await.expect("delete");
    // Recreated on the two live brokers once they see the third one down (the placement
    // takes live brokers only), so it holds no replica of the new topic.
    for id in [1, 2] {
        cluster
            .wait_live(id, &[1, 2], DEADLINE)
            .await
            .expect("node 3 seen down");
    }
    create(&cluster, 2, "again", 1, 2).await.expect("recreate");
    let producer = producer_via(&cluster, 2).await;
    let new = send(&producer, "again", 0, &["new-0".to_string()]).await;
    assert_eq!(new.keys().copied().collect::<Vec<_>>(), vec![0]);
    drop(producer);

    cluster.restart(down).await.expect("restart");
    wait_until(
        "the returning broker sets the new incarnation up in place of the old one",
        || async {
            setup_line(&cluster, down, "again").is_some_and(|l| {
                l.len() == 4 && l[1].parse::<u64>().is_ok_and(|i| i > old_incarnation)
            }) && lists(&cluster, down, "again").await == Some(true)
        },
    )
    .await;
    for g in &old_groups {
        assert!(
            !group_dir(&cluster, down, *g).exists(),
            "the old incarnation's group {g} is gone"
        );
    }
    // Its local copy is the new, empty one: none of the old records (asked for its own
    // figures; a plain describe gives those of the replica holding the partition).
    let mut admin = cluster.clients(down).await.expect("connect").admin;
    let mut local = tonic::Request::new(pb::DescribeTopicRequest {
        name: "again".into(),
    });
    local
        .metadata_mut()
        .insert("rill-describe-local", "1".parse().expect("value"));
    let described = admin
        .describe_topic(local)
        .await
        .expect("describe")
        .into_inner();
    assert_eq!(described.partitions.len(), 1);
    assert_eq!(
        described.partitions[0].high_watermark, 0,
        "the old incarnation's records are gone"
    );
    let held = admin
        .describe_topic(pb::DescribeTopicRequest {
            name: "again".into(),
        })
        .await
        .expect("describe")
        .into_inner();
    assert_eq!(
        held.partitions[0].high_watermark, 1,
        "described by the new topic's replica: {held:?}"
    );
    // Reads through it go to a replica of the new topic, which holds only the new record.
    let err = cluster
        .clients(down)
        .await
        .expect("connect")
        .fetch("again", 0, 0, 0)
        .await
        .expect_err("no replica here");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    for id in [1, 2] {
        let got = cluster.read_all(id, "again", 0).await.expect("read");
        assert_eq!(got, new, "node {id}");
    }
}
