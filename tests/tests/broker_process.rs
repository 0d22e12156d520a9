//! The real `rill-broker` binary: restarts keep everything; 10,000 waiting fetches cost no
//! thread each (their memory is measured and printed).

use std::time::Duration;

use rill_proto::v1 as pb;
use rill_tests::{BrokerProcess, Clients};

fn proc_status(pid: u32, key: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("field present")
}

#[tokio::test]
async fn topics_data_and_group_offsets_survive_a_restart_of_the_binary() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = BrokerProcess::spawn(dir.path(), &[]).await.expect("spawn");
    let mut c = Clients::connect(broker.url()).await.expect("connect");
    c.create_topic("keep", 2).await.expect("create");
    c.produce_values("keep", 0, &["a", "b"])
        .await
        .expect("produce");
    c.produce_values("keep", 1, &["c"]).await.expect("produce");
    c.groups
        .commit_offsets(pb::CommitOffsetsRequest {
            group: "g".into(),
            topic: "keep".into(),
            offsets: vec![pb::PartitionOffset {
                partition: 0,
                offset: 1,
                metadata: None,
            }],
            member: None,
        })
        .await
        .expect("commit");
    drop(c);
    let status = broker.stop().await.expect("stop");
    assert!(status.success(), "graceful exit: {status}");
    for p in 0..2 {
        let marker = dir.path().join(format!("topics/keep/{p}/clean-shutdown"));
        assert!(
            marker.exists(),
            "clean-shutdown marker written for partition {p}"
        );
    }

    let broker = BrokerProcess::spawn(dir.path(), &[])
        .await
        .expect("respawn");
    let mut c = Clients::connect(broker.url()).await.expect("connect");
    let d = c
        .admin
        .describe_topic(pb::DescribeTopicRequest {
            name: "keep".into(),
        })
        .await
        .expect("describe")
        .into_inner();
    let hwms: Vec<u64> = d.partitions.iter().map(|p| p.high_watermark).collect();
    assert_eq!(hwms, vec![2, 1]);
    let recs = c.fetch("keep", 0, 0, 0).await.expect("fetch").records;
    assert_eq!(
        recs.iter().map(|r| r.value.as_ref()).collect::<Vec<_>>(),
        vec![&b"a"[..], b"b"]
    );
    let offsets = c
        .groups
        .fetch_offsets(pb::FetchOffsetsRequest {
            group: "g".into(),
            topic: "keep".into(),
            partitions: vec![0],
        })
        .await
        .expect("offsets")
        .into_inner();
    assert_eq!(offsets.offsets[0].offset, Some(1));
    drop(c);
    assert!(broker.stop().await.expect("stop").success());
}

#[tokio::test]
async fn ten_thousand_waiting_fetches_use_no_thread_each() {
    const WAITERS: usize = 10_000;
    const CONNECTIONS: usize = 5;
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = BrokerProcess::spawn(dir.path(), &[]).await.expect("spawn");
    let pid = broker.pid().expect("pid");
    let mut clients = Vec::new();
    for _ in 0..CONNECTIONS {
        clients.push(Clients::connect(broker.url()).await.expect("connect"));
    }
    clients[0].create_topic("idle", 1).await.expect("create");
    // Warm the connections so their buffers count in the baseline.
    for c in &mut clients {
        c.fetch("idle", 0, 0, 0).await.expect("fetch");
    }
    let (rss_before, threads_before) = (proc_status(pid, "VmRSS:"), proc_status(pid, "Threads:"));

    let mut waiting = Vec::with_capacity(WAITERS);
    for i in 0..WAITERS {
        let mut c = clients[i % CONNECTIONS].clone();
        waiting.push(tokio::spawn(
            async move { c.fetch("idle", 0, 0, 60_000).await },
        ));
    }
    // Wait until the broker holds them all, as its own description reports (well before
    // their 60 s wait could end them).
    let mut admin = clients[0].admin.clone();
    let mut held = 0;
    let all_held = tokio::time::timeout(Duration::from_secs(40), async {
        while held != WAITERS {
            let d = admin
                .describe_topic(pb::DescribeTopicRequest {
                    name: "idle".into(),
                })
                .await
                .expect("describe")
                .into_inner();
            held = d.partitions[0].waiting_fetches as usize;
            tokio::task::yield_now().await;
        }
    })
    .await;
    assert!(
        all_held.is_ok(),
        "the broker held {held} of {WAITERS} fetches after 40 s"
    );
    let (rss_during, threads_during) = (proc_status(pid, "VmRSS:"), proc_status(pid, "Threads:"));
    assert!(
        waiting.iter().all(|w| !w.is_finished()),
        "all fetches still waiting"
    );
    assert!(
        threads_during <= threads_before + 4,
        "threads grew from {threads_before} to {threads_during}"
    );
    let per_waiter = (rss_during.saturating_sub(rss_before) * 1024) as f64 / WAITERS as f64;
    println!(
        "{WAITERS} waiting fetches: broker RSS {rss_before} KiB -> {rss_during} KiB \
         ({per_waiter:.0} bytes per waiting fetch), threads {threads_before} -> {threads_during}"
    );
    assert!(
        per_waiter < 64.0 * 1024.0,
        "a waiting fetch costs {per_waiter} bytes"
    );

    // One produce wakes them all.
    clients[0]
        .produce_values("idle", 0, &["wake"])
        .await
        .expect("produce");
    for w in waiting {
        let resp = w.await.expect("join").expect("fetch");
        assert_eq!(resp.records.len(), 1);
    }
    drop(clients);
    assert!(broker.stop().await.expect("stop").success());
}
