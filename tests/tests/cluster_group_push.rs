//! A consumer group's push stream (`Subscribe` with a group target) on 3 real broker
//! processes, for a replication factor 1 topic with a partition held by a broker other than
//! the one the stream runs on (the leader of `__subscriptions`, where every push stream is
//! served): the records of that partition are read from the broker holding it. A member
//! gets every record once, in order per partition, commits, and hands partitions over to a
//! second member with nothing lost or delivered twice.

use std::collections::BTreeMap;
use std::time::Duration;

use rill_client::membership::Partitions;
use rill_client::{Connection, GroupMember, MemberConfig, MemberEvent};
use rill_proto::v1 as pb;
use rill_tests::cluster::{Extra, TestCluster};
use rill_tests::{scrape, subs};
use tokio::sync::mpsc;

/// The longest an election, a commit or a delivery may take in this test.
const DEADLINE: Duration = Duration::from_secs(30);
const GROUP: &str = "billing";

/// Produces `values` to `topic`/`p` at node `at`, retrying while the partition settles.
async fn produce(cluster: &TestCluster, at: u64, topic: &str, p: u32, values: &[String]) {
    subs::produce(cluster, at, topic, p, values, DEADLINE)
        .await
        .expect("produce");
}

/// Produces `{p}-{i}` for `i` in `range` to each partition at its owner.
async fn produce_all(
    cluster: &TestCluster,
    topic: &str,
    owners: &[u64],
    range: std::ops::Range<u64>,
) {
    for (p, owner) in owners.iter().enumerate() {
        let values: Vec<String> = range.clone().map(|i| format!("{p}-{i}")).collect();
        produce(cluster, *owner, topic, p as u32, &values).await;
    }
}

/// A group push stream through node `via` for `partitions` of `topic`, with ample credits.
struct Push {
    tx: mpsc::Sender<pb::SubscribeRequest>,
    stream: tonic::Streaming<pb::SubscribeResponse>,
}

impl Push {
    /// Opens the stream, again while the cluster answers UNAVAILABLE (an election of the
    /// group's coordinator).
    async fn open(cluster: &TestCluster, via: u64, topic: &str, partitions: Vec<u32>) -> Push {
        let until = tokio::time::Instant::now() + DEADLINE;
        loop {
            match Push::try_open(cluster, via, topic, partitions.clone()).await {
                Ok(push) => return push,
                Err(s)
                    if s.code() == tonic::Code::Unavailable
                        && tokio::time::Instant::now() < until =>
                {
                    eprintln!("subscribe: {s}; retrying");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(s) => panic!("subscribe: {s}"),
            }
        }
    }

    async fn try_open(
        cluster: &TestCluster,
        via: u64,
        topic: &str,
        partitions: Vec<u32>,
    ) -> Result<Push, tonic::Status> {
        let mut subs = subs::client(cluster, via).await.expect("connect");
        let (tx, rx) = mpsc::channel(16);
        for kind in [
            pb::subscribe_request::Kind::Start(pb::SubscribeStart {
                target: Some(pb::subscribe_start::Target::Group(pb::GroupTarget {
                    group: GROUP.into(),
                    topic: topic.into(),
                    partitions,
                })),
                consumer_id: String::new(),
            }),
            pb::subscribe_request::Kind::Credits(pb::Credits {
                records: 10_000,
                bytes: 1 << 20,
            }),
        ] {
            tx.send(pb::SubscribeRequest { kind: Some(kind) })
                .await
                .expect("queue a request");
        }
        let stream = subs
            .subscribe(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await?
            .into_inner();
        Ok(Push { tx, stream })
    }

    /// The next `n` records pushed: (partition, offset, value).
    async fn take(&mut self, n: usize) -> Vec<(u32, u64, String)> {
        let mut out = Vec::new();
        while out.len() < n {
            let msg = tokio::time::timeout(DEADLINE, self.stream.message())
                .await
                .unwrap_or_else(|_| panic!("only {out:?} of {n} records within {DEADLINE:?}"))
                .expect("the stream")
                .expect("the stream ended");
            match msg.kind {
                Some(pb::subscribe_response::Kind::Record(r)) => {
                    let rec = r.record.expect("a record");
                    out.push((
                        r.partition,
                        rec.offset,
                        String::from_utf8_lossy(&rec.value).into_owned(),
                    ));
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        out
    }

    /// Nothing more comes within `ms`.
    async fn quiet(&mut self, ms: u64) {
        if let Ok(m) = tokio::time::timeout(Duration::from_millis(ms), self.stream.message()).await
        {
            panic!("pushed more than was produced: {m:?}");
        }
    }

    fn close(self) {
        drop(self.tx);
    }
}

async fn event(m: &mut GroupMember) -> MemberEvent {
    tokio::time::timeout(DEADLINE, m.next_event())
        .await
        .expect("an event in time")
        .expect("the member runs")
}

fn of(p: &Partitions, topic: &str) -> Vec<u32> {
    p.get(topic)
        .map(|s| s.iter().copied().collect())
        .unwrap_or_default()
}

/// Each record's partition and offset, after the ones seen before: its value must match,
/// and it must be the next offset of its partition (in order, none twice, none skipped).
fn check_next(next: &mut BTreeMap<u32, u64>, got: &[(u32, u64, String)]) {
    for (p, o, v) in got {
        let want = next.entry(*p).or_insert(0);
        assert_eq!(*o, *want, "partition {p}: offset {o} where {want} was next");
        assert_eq!(*v, format!("{p}-{o}"), "partition {p} offset {o}");
        *want += 1;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_push_stream_reads_partitions_held_by_other_brokers_and_hands_them_over() {
    let (cluster, serving) = subs::start_serving(3, DEADLINE)
        .await
        .expect("a cluster and its serving broker");
    let (topic, replicas) =
        subs::create_topic_away_from(&cluster, serving, "orders", (2, 1), &[serving])
            .await
            .expect("a topic with a partition away from the serving broker");
    let owners: Vec<u64> = replicas.iter().map(|r| r[0]).collect();
    eprintln!("serving {serving}, {topic} partitions on {owners:?}");
    produce_all(&cluster, &topic, &owners, 0..10).await;

    // Member a, alone, owns both partitions; its stream runs through the serving broker.
    let config = MemberConfig::new(GROUP, [topic.as_str()]).session_timeout_ms(10_000);
    let connect = |id: u64| {
        let addr = cluster.addr(id).to_string();
        async move { Connection::connect(&addr).await.expect("connect") }
    };
    let mut a = GroupMember::join(connect(serving).await, config.clone())
        .await
        .expect("a joins");
    let MemberEvent::Assigned(first) = event(&mut a).await else {
        panic!("expected an assignment");
    };
    assert_eq!(of(&first, &topic), vec![0, 1], "alone, a gets both");
    let mut push_a = Push::open(&cluster, serving, &topic, vec![0, 1]).await;
    let mut next = BTreeMap::new();
    check_next(&mut next, &push_a.take(20).await);
    push_a.quiet(300).await;
    // Records produced while the stream waits are pushed (the remote partition's long poll
    // wakes it).
    produce_all(&cluster, &topic, &owners, 10..15).await;
    check_next(&mut next, &push_a.take(10).await);
    let handed: Vec<(u32, u64)> = next.iter().map(|(p, o)| (*p, *o)).collect();
    a.commit(&topic, &handed).await.expect("a commits");

    // Member b joins through another broker: a gives one partition up after committing
    // what it was handed, and goes on with the other from its committed offset.
    let other = cluster.another(serving);
    let mut b = GroupMember::join(connect(other).await, config)
        .await
        .expect("b joins");
    let MemberEvent::Revoked(revoked) = event(&mut a).await else {
        panic!("expected a revocation");
    };
    let revoked_ps = of(&revoked, &topic);
    assert_eq!(revoked_ps.len(), 1, "a gives one partition up: {revoked:?}");
    push_a.close();
    a.release(&revoked);
    let kept: Vec<u32> = [0, 1]
        .into_iter()
        .filter(|p| !revoked_ps.contains(p))
        .collect();
    let MemberEvent::Assigned(given) = event(&mut b).await else {
        panic!("expected an assignment");
    };
    assert_eq!(of(&given, &topic), revoked_ps, "b gets what a gave up");
    let mut push_a = Push::open(&cluster, serving, &topic, kept.clone()).await;
    let mut push_b = Push::open(&cluster, other, &topic, revoked_ps.clone()).await;

    produce_all(&cluster, &topic, &owners, 15..20).await;
    let got_a = push_a.take(5).await;
    let got_b = push_b.take(5).await;
    assert!(got_a.iter().all(|(p, ..)| kept.contains(p)), "{got_a:?}");
    assert!(
        got_b.iter().all(|(p, ..)| revoked_ps.contains(p)),
        "{got_b:?}"
    );
    check_next(&mut next, &got_a);
    check_next(&mut next, &got_b);
    push_a.quiet(300).await;
    push_b.quiet(300).await;
    assert_eq!(next, BTreeMap::from([(0, 20), (1, 20)]));
    b.commit(&topic, &[(revoked_ps[0], 20)])
        .await
        .expect("b commits");
    a.commit(&topic, &[(kept[0], 20)]).await.expect("a commits");
    push_a.close();
    push_b.close();
    a.leave().await.expect("a leaves");
    b.leave().await.expect("b leaves");
}

/// A topic of two RF 1 partitions on two different brokers, one of them not `serving`:
/// its name and each partition's owner.
async fn spread_topic(cluster: &TestCluster, serving: u64) -> (String, Vec<u64>) {
    for k in 0..5 {
        let (topic, replicas) = subs::create_topic_away_from(
            cluster,
            serving,
            &format!("spread{k}"),
            (2, 1),
            &[serving],
        )
        .await
        .expect("a topic with a partition away from the serving broker");
        let owners: Vec<u64> = replicas.iter().map(|r| r[0]).collect();
        if owners[0] != owners[1] {
            return (topic, owners);
        }
    }
    panic!("no topic of two partitions on two brokers");
}

/// The serving broker's count of the group's failed remote reads.
async fn remote_failures(cluster: &TestCluster, serving: u64) -> f64 {
    let metrics = cluster.metrics_addr(serving).expect("a metrics address");
    let samples = scrape::scrape(metrics).await.expect("a scrape");
    let name = "rill_group_push_remote_read_failures_total";
    scrape::sum(&samples, name, &[("group", GROUP)])
}

/// While the holder is down, the stream's failed reads of its partition are counted under
/// the group on the serving broker (before that count, a group stream only logged them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_holder_of_one_partition_does_not_stop_the_others() {
    let metrics = Extra::args(&["--metrics-listen", "127.0.0.1:0"]);
    let (mut cluster, serving) = subs::start_serving_with(3, metrics, DEADLINE)
        .await
        .expect("a cluster and its serving broker");
    let (topic, owners) = spread_topic(&cluster, serving).await;
    // The partition to lose: one held away from the serving broker (which stays up).
    let dead_p = owners.iter().position(|o| *o != serving).expect("one away") as u32;
    let live_p = 1 - dead_p;
    let dead = owners[dead_p as usize];
    eprintln!("serving {serving}, {topic} partitions on {owners:?}, killing {dead}");
    produce_all(&cluster, &topic, &owners, 0..5).await;
    let mut push = Push::open(&cluster, serving, &topic, vec![0, 1]).await;
    let mut next = BTreeMap::new();
    check_next(&mut next, &push.take(10).await);
    assert_eq!(remote_failures(&cluster, serving).await, 0.0, "all up");

    cluster.kill(dead).await.expect("kill -9 the holder");
    let values: Vec<String> = (5..10).map(|i| format!("{live_p}-{i}")).collect();
    produce(&cluster, owners[live_p as usize], &topic, live_p, &values).await;
    let got = push.take(5).await;
    assert!(got.iter().all(|(p, ..)| *p == live_p), "{got:?}");
    check_next(&mut next, &got);
    // A stream opened while the holder is down (the partition's start unknown) pushes the
    // live partition from the log start (nothing committed).
    let mut late = Push::open(&cluster, serving, &topic, vec![0, 1]).await;
    let got = late.take(10).await;
    let mut late_next = BTreeMap::new();
    check_next(&mut late_next, &got);
    assert_eq!(late_next, BTreeMap::from([(live_p, 10)]), "{got:?}");
    late.close();
    // Each read (2 s of retries) or long poll of the dead partition that fails counts.
    let until = tokio::time::Instant::now() + DEADLINE;
    while remote_failures(&cluster, serving).await == 0.0 {
        assert!(
            tokio::time::Instant::now() < until,
            "no remote read failure of {topic}/{dead_p} counted within {DEADLINE:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Back, its new records are pushed too (the stream did not give up on it).
    cluster.restart(dead).await.expect("restart");
    let values: Vec<String> = (5..10).map(|i| format!("{dead_p}-{i}")).collect();
    produce(&cluster, dead, &topic, dead_p, &values).await;
    check_next(&mut next, &push.take(5).await);
    push.quiet(300).await;
    assert_eq!(next, BTreeMap::from([(0, 10), (1, 10)]));
    push.close();
}
