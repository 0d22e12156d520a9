//! Issue 9 over real gRPC: one topic registry (a failed deletion leaves the topic serving),
//! the connection limit, and the record timestamp bounds.

use std::time::{Duration, Instant};

use rill_proto::v1 as pb;
use rill_tests::{Clients, TestBroker};
use tonic::Code;

/// Every wait in these tests ends by this deadline, with a message, instead of hanging.
const DEADLINE: Duration = Duration::from_secs(20);

/// Waits until `done` holds, checking after each yield; fails with `what` at the deadline.
async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

#[tokio::test]
async fn a_failed_topic_deletion_leaves_the_topic_serving_without_a_restart() {
    let broker = TestBroker::start().await.expect("broker");
    let mut c = Clients::connect(broker.url()).await.expect("connect");
    c.create_topic("keep", 2).await.expect("create");
    assert_eq!(
        c.produce_values("keep", 0, &["a"]).await.expect("produce"),
        0
    );

    // The move of the topic folder into the trash fails, as on a read-only or broken disk.
    rill_storage::store::fault::fail_next_rename(broker.data_dir().join("topics").join("keep"));
    let err = c
        .admin
        .delete_topic(pb::DeleteTopicRequest {
            name: "keep".into(),
        })
        .await
        .expect_err("the deletion fails");
    assert!(
        err.message().contains("trash") && err.message().contains("keep"),
        "the error says what failed: {err:?}"
    );

    // The topic is still there, served from live handles: no UNAVAILABLE, no restart.
    let listed = c
        .admin
        .list_topics(pb::ListTopicsRequest {})
        .await
        .expect("list")
        .into_inner();
    assert_eq!(listed.topics.len(), 1);
    let described = c
        .admin
        .describe_topic(pb::DescribeTopicRequest {
            name: "keep".into(),
        })
        .await
        .expect("describe")
        .into_inner();
    assert!(
        described
            .partitions
            .iter()
            .all(|p| p.fenced_reason.is_none()),
        "{described:?}"
    );
    assert_eq!(
        c.produce_values("keep", 0, &["b"])
            .await
            .expect("produce p0"),
        1
    );
    assert_eq!(
        c.produce_values("keep", 1, &["c"])
            .await
            .expect("produce p1"),
        0
    );
    let values = |r: pb::FetchResponse| -> Vec<String> {
        r.records
            .iter()
            .map(|r| String::from_utf8_lossy(&r.value).into_owned())
            .collect()
    };
    assert_eq!(
        values(c.fetch("keep", 0, 0, 0).await.expect("fetch p0")),
        ["a", "b"]
    );
    assert_eq!(
        values(c.fetch("keep", 1, 0, 0).await.expect("fetch p1")),
        ["c"]
    );

    // A long-poll fetch is still woken by the next append.
    let mut waiter = c.clone();
    let pending = tokio::spawn(async move { waiter.fetch("keep", 0, 2, 15_000).await });
    let state = broker.broker().clone();
    wait_until("the fetch to wait", || state.waiting_fetches() == 1).await;
    let sent = Instant::now();
    c.produce_values("keep", 0, &["d"]).await.expect("produce");
    let woken = tokio::time::timeout(DEADLINE, pending)
        .await
        .expect("the fetch answers")
        .expect("join")
        .expect("fetch");
    assert_eq!(values(woken), ["d"]);
    assert!(
        sent.elapsed() < Duration::from_secs(10),
        "woken by the append, not by its 15 s wait: {:?}",
        sent.elapsed()
    );

    // Nothing stays armed: the next deletion goes through, and the topic is gone.
    c.admin
        .delete_topic(pb::DeleteTopicRequest {
            name: "keep".into(),
        })
        .await
        .expect("delete");
    let gone = c.fetch("keep", 0, 0, 0).await.expect_err("deleted");
    assert_eq!(gone.code(), Code::NotFound);
    broker.stop().await.expect("stop");
}
