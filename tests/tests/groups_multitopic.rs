//! A `Consumer` built with a group and a topic list against a real broker: two members share
//! the partitions of two topics, each `(topic, partition)` owned by exactly one of them, and
//! the records of both topics arrive, each carrying its topic.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rill_client::{
    AutoOffsetReset, Connection, Consumer, ConsumerConfig, ConsumerEvent, Producer, ProducerConfig,
    ProducerRecord,
};
use rill_tests::{Clients, TestBroker};
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// What one member's task saw.
#[derive(Debug, Default)]
struct Seen {
    /// Owned `(topic, partition)`s, by the membership events.
    owned: BTreeSet<(String, u32)>,
    /// Every topic an `Assigned` event named.
    assigned_topics: BTreeSet<String>,
    /// `(topic, partition, offset)` → the record's value.
    records: BTreeMap<(String, u32, u64), String>,
}

/// Runs a member until `stop`, then closes it (leaving the group).
fn member(
    conn: Connection,
    topics: &'static [&'static str],
    stop: CancellationToken,
    seen: Arc<Mutex<Seen>>,
    notify: Arc<Notify>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let config = ConsumerConfig::new()
            .group("g")
            .auto_offset_reset(AutoOffsetReset::Earliest)
            .session_timeout_ms(3_000);
        let mut c = Consumer::subscribe_topics(conn, config, topics)
            .await
            .expect("join with two topics");
        assert_eq!(c.topics(), ["a", "b"], "each topic once, in order");
        while !stop.is_cancelled() {
            let event = tokio::select! {
                _ = stop.cancelled() => break,
                e = c.next() => e.expect("next"),
            };
            let mut s = seen.lock().expect("seen");
            match event {
                ConsumerEvent::Record(r) => {
                    s.records.insert(
                        (r.topic.clone(), r.partition, r.offset),
                        String::from_utf8_lossy(&r.value).into_owned(),
                    );
                }
                ConsumerEvent::Assigned { topic, partitions } => {
                    s.assigned_topics.insert(topic.clone());
                    s.owned
                        .extend(partitions.into_iter().map(|p| (topic.clone(), p)));
                }
                ConsumerEvent::Revoked { topic, partitions }
                | ConsumerEvent::Lost {
                    topic, partitions, ..
                } => {
                    for p in partitions {
                        s.owned.remove(&(topic.clone(), p));
                    }
                }
                ConsumerEvent::Skipped { .. } => {}
            }
            drop(s);
            notify.notify_waiters();
        }
        c.close().await.expect("close");
    })
}

/// Waits until `cond` holds, woken by every event of either member; fails after 60 s.
async fn wait_for(notify: &Notify, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let woken = notify.notified();
        tokio::pin!(woken);
        woken.as_mut().enable();
        if cond() {
            return;
        }
        if tokio::time::timeout_at(deadline, woken).await.is_err() {
            assert!(cond(), "gave up after 60 s waiting for {what}");
            return;
        }
    }
}

#[tokio::test]
async fn two_members_share_the_partitions_of_two_topics_and_get_the_records_of_both() {
    const TOPICS: &[&str] = &["a", "b", "a"];
    let broker = TestBroker::start().await.expect("broker");
    let addr = broker.addr().to_string();
    let mut c = Clients::connect(broker.url()).await.expect("connect");
    c.create_topic("a", 3).await.expect("create a");
    c.create_topic("b", 2).await.expect("create b");
    let all: BTreeSet<(String, u32)> = [("a", 3), ("b", 2)]
        .iter()
        .flat_map(|&(t, n)| (0..n).map(move |p| (t.to_string(), p)))
        .collect();
    let conn = Connection::connect(&addr).await.expect("connect");
    let producer = Producer::new(conn.clone(), ProducerConfig::new());
    let produce = |round: u32| {
        let producer = &producer;
        let all = &all;
        async move {
            for (t, p) in all {
                for i in 0..5 {
                    producer
                        .send(
                            ProducerRecord::new(t.clone(), format!("{t}-{p}-{round}-{i}"))
                                .partition(*p),
                        )
                        .await
                        .expect("send");
                }
            }
            producer.flush().await.expect("flush");
        }
    };
    produce(0).await;

    let notify = Arc::new(Notify::new());
    let stop = CancellationToken::new();
    let first = Arc::new(Mutex::new(Seen::default()));
    let second = Arc::new(Mutex::new(Seen::default()));
    let one = member(
        Connection::connect(&addr).await.expect("connect"),
        TOPICS,
        stop.clone(),
        Arc::clone(&first),
        Arc::clone(&notify),
    );
    wait_for(&notify, "the first member to own both topics", || {
        first.lock().expect("seen").owned == all
    })
    .await;
    let two = member(
        Connection::connect(&addr).await.expect("connect"),
        TOPICS,
        stop.clone(),
        Arc::clone(&second),
        Arc::clone(&notify),
    );
    let split = || {
        let (f, s) = (first.lock().expect("seen"), second.lock().expect("seen"));
        f.owned.is_disjoint(&s.owned)
            && f.owned.union(&s.owned).cloned().collect::<BTreeSet<_>>() == all
            && f.owned.len() >= 2
            && s.owned.len() >= 2
    };
    wait_for(&notify, "the partitions of both topics split", split).await;
    // Records produced now go to whoever owns each partition after the split.
    produce(1).await;
    let expected = all.len() * 5 * 2;
    wait_for(&notify, "every record of both topics", || {
        let (f, s) = (first.lock().expect("seen"), second.lock().expect("seen"));
        f.records
            .keys()
            .chain(s.records.keys())
            .collect::<BTreeSet<_>>()
            .len()
            == expected
    })
    .await;
    assert!(split(), "still split after the records arrived");
    {
        let (f, s) = (first.lock().expect("seen"), second.lock().expect("seen"));
        // Round 1 went out after the split: each of its records reached only the owner of
        // its partition.
        for (seen, other) in [(&f, &s), (&s, &f)] {
            for ((t, p, _), v) in seen
                .records
                .iter()
                .filter(|(_, v)| v.split('-').nth(2) == Some("1"))
            {
                assert!(
                    seen.owned.contains(&(t.clone(), *p))
                        && !other.owned.contains(&(t.clone(), *p)),
                    "{v} of {t}/{p} reached a member that does not own it"
                );
            }
        }
        for ((t, p, _), v) in f.records.iter().chain(s.records.iter()) {
            assert!(
                v.starts_with(&format!("{t}-{p}-")),
                "{v} carries topic {t} partition {p}"
            );
        }
        assert_eq!(
            f.assigned_topics.len(),
            2,
            "assigned events name both topics"
        );
        assert!(!s.assigned_topics.is_empty());
    }
    stop.cancel();
    one.await.expect("first member");
    two.await.expect("second member");
    broker.stop().await.expect("stop");
}
