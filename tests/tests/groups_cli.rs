//! `rill group list | describe | delete` against a real broker with live members: state,
//! group epoch, members with their instance ids, addresses and partitions, lag, and a delete
//! refused while members are alive.

use rill_proto::v1 as pb;
use rill_tests::{rill_cli, Clients, TestBroker};
use serde_json::Value;

async fn run(broker: &str, args: &[&str]) -> (bool, String, String) {
    rill_cli(broker, args, "").await.expect("run rill")
}

async fn json(broker: &str, args: &[&str]) -> Value {
    let mut full = vec!["--output", "json"];
    full.extend_from_slice(args);
    let (ok, out, err) = run(broker, &full).await;
    assert!(ok, "rill {args:?} failed: {err}");
    serde_json::from_str(out.trim()).expect("one JSON document")
}

fn join(instance: Option<&str>) -> pb::GroupHeartbeatRequest {
    pb::GroupHeartbeatRequest {
        group: "g".into(),
        member_id: String::new(),
        member_epoch: 0,
        instance_id: instance.map(str::to_string),
        subscribed_topics: Some(pb::TopicList {
            topics: vec!["t".into()],
        }),
        owned_partitions: None,
        session_timeout_ms: None,
        rebalance_timeout_ms: None,
        assignor: Some("range".into()),
    }
}

/// Heartbeats both members until neither is reconciling; returns their last answers.
async fn settle(c: &mut Clients, members: &mut [pb::GroupHeartbeatResponse]) {
    for _ in 0..50 {
        let mut reconciling = false;
        for m in members.iter_mut() {
            let r = c
                .groups
                .group_heartbeat(pb::GroupHeartbeatRequest {
                    group: "g".into(),
                    member_id: m.member_id.clone(),
                    member_epoch: m.member_epoch,
                    owned_partitions: m.assignment.clone(),
                    subscribed_topics: None,
                    instance_id: None,
                    session_timeout_ms: None,
                    rebalance_timeout_ms: None,
                    assignor: None,
                })
                .await
                .expect("beat")
                .into_inner();
            reconciling |= r.reconciling;
            *m = r;
        }
        if !reconciling {
            return;
        }
    }
    panic!("the group never settled: {members:?}");
}

#[tokio::test]
async fn describe_list_and_delete_show_members_and_refuse_while_alive() {
    // Built (if stale) before the members join: a build can outlast their session timeout.
    rill_tests::binary_path("rill").expect("the rill binary");
    let broker = TestBroker::start().await.expect("broker");
    let addr = broker.addr().to_string();
    let mut c = Clients::connect(broker.url()).await.expect("connect");
    c.create_topic("t", 4).await.expect("create");
    c.produce_values("t", 0, &["a", "b", "c"])
        .await
        .expect("produce");
    let mut members = Vec::new();
    for instance in [Some("host-1"), None] {
        members.push(
            c.groups
                .group_heartbeat(join(instance))
                .await
                .expect("join")
                .into_inner(),
        );
    }
    settle(&mut c, &mut members).await;
    c.groups
        .commit_offsets(pb::CommitOffsetsRequest {
            group: "g".into(),
            topic: "t".into(),
            offsets: vec![pb::PartitionOffset {
                partition: 0,
                offset: 1,
                metadata: None,
            }],
            member: Some(pb::MemberIdentity {
                member_id: members[0].member_id.clone(),
                member_epoch: members[0].member_epoch,
            }),
        })
        .await
        .expect("commit");

    let d = json(&addr, &["group", "describe", "g"]).await;
    assert_eq!(d["state"], "stable", "{d}");
    assert_eq!(d["assignor"], "range");
    assert_eq!(
        d["group_epoch"].as_i64(),
        Some(i64::from(members[1].group_epoch))
    );
    let listed = d["members"].as_array().expect("members");
    assert_eq!(listed.len(), 2, "{d}");
    let first = listed
        .iter()
        .find(|m| m["member_id"] == members[0].member_id.as_str())
        .expect("first member");
    assert_eq!(first["instance_id"], "host-1");
    assert!(
        first["client_address"]
            .as_str()
            .is_some_and(|a| a.starts_with("127.0.0.1:")),
        "{first}"
    );
    assert_eq!(
        first["assigned"][0]["partitions"],
        serde_json::json!([0, 1]),
        "range: {d}"
    );
    let p0 = &d["partitions"][0];
    assert_eq!(
        (p0["lag"].as_u64(), p0["owner"].as_str()),
        (Some(2), Some(members[0].member_id.as_str()))
    );

    let (ok, table, _) = run(&addr, &["group", "describe", "g"]).await;
    assert!(ok);
    for part in ["state stable", "host-1", "t[0,1]", "t[2,3]", "LAG", "OWNER"] {
        assert!(table.contains(part), "{part} in {table}");
    }
    let list = json(&addr, &["group", "list"]).await;
    assert_eq!(
        list,
        serde_json::json!([{"group": "g", "state": "stable", "members": 2}])
    );
    let (ok, table, _) = run(&addr, &["group", "list"]).await;
    assert!(
        ok && table.contains("MEMBERS") && table.contains("stable"),
        "{table}"
    );

    let (ok, _, err) = run(&addr, &["group", "delete", "g"]).await;
    assert!(!ok, "refused while members are alive");
    assert!(err.contains("live member"), "{err}");
    for m in &members {
        c.groups
            .group_heartbeat(pb::GroupHeartbeatRequest {
                group: "g".into(),
                member_id: m.member_id.clone(),
                member_epoch: -1,
                owned_partitions: None,
                subscribed_topics: None,
                instance_id: None,
                session_timeout_ms: None,
                rebalance_timeout_ms: None,
                assignor: None,
            })
            .await
            .expect("leave");
    }
    let (ok, out, err) = run(&addr, &["group", "delete", "g"]).await;
    assert!(ok, "{err}");
    assert!(out.contains("deleted"), "{out}");
    assert_eq!(json(&addr, &["group", "list"]).await, serde_json::json!([]));
    broker.stop().await.expect("stop");
}

#[tokio::test]
async fn consume_with_a_group_takes_several_topics_and_commits_each() {
    rill_tests::binary_path("rill").expect("the rill binary");
    let broker = TestBroker::start().await.expect("broker");
    let addr = broker.addr().to_string();
    let mut c = Clients::connect(broker.url()).await.expect("connect");
    c.create_topic("a", 2).await.expect("create a");
    c.create_topic("b", 1).await.expect("create b");
    c.produce_values("a", 0, &["a0", "a1"])
        .await
        .expect("produce");
    c.produce_values("a", 1, &["a2"]).await.expect("produce");
    c.produce_values("b", 0, &["b0", "b1"])
        .await
        .expect("produce");

    // Several topics need a group (exit status 2: a bad command line).
    let (ok, _, err) = run(&addr, &["consume", "a", "b"]).await;
    assert!(!ok && err.contains("--group"), "{err}");

    let consume = ["consume", "a", "b", "--group", "g", "-f", "-n"];
    let (ok, out, err) = run(&addr, &[&consume[..], &["5"]].concat()).await;
    assert!(ok, "{err}");
    let mut lines: Vec<&str> = out.lines().collect();
    lines.sort_unstable();
    assert_eq!(lines, ["a\ta0", "a\ta1", "a\ta2", "b\tb0", "b\tb1"]);

    // Both topics' offsets were committed: a new member gets only what came after.
    c.produce_values("b", 0, &["b2"]).await.expect("produce");
    let (ok, out, err) = run(&addr, &[&consume[..], &["1"]].concat()).await;
    assert!(ok, "{err}");
    assert_eq!(out.trim_end(), "b\tb2");
    broker.stop().await.expect("stop");
}
