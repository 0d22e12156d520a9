//! Consumer-group membership over gRPC against a real broker: the broker assigns partitions to
//! live members, moves them incrementally when members join, leave or die, keeps static
//! members' partitions across a restart, fences stale members' commits, and keeps all of it
//! across a broker restart.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use rill_proto::v1 as pb;
use rill_tests::{Clients, TestBroker};
use tokio::time::{sleep, Instant};
use tonic::Code;

type Owned = BTreeMap<String, BTreeSet<u32>>;

/// A member driven by the test: a well-behaved client that owns what it was last given.
#[derive(Debug, Clone, Default)]
struct Member {
    id: String,
    epoch: i32,
    owned: Owned,
    interval_ms: u32,
}

fn set(owned: &Owned) -> pb::PartitionSet {
    pb::PartitionSet {
        topics: owned
            .iter()
            .map(|(t, ps)| pb::TopicPartitions {
                topic: t.clone(),
                partitions: ps.iter().copied().collect(),
            })
            .collect(),
    }
}

fn from_set(set: Option<pb::PartitionSet>) -> Owned {
    let mut out = Owned::new();
    for tp in set.unwrap_or_default().topics {
        out.entry(tp.topic).or_default().extend(tp.partitions);
    }
    out
}

fn count(owned: &Owned) -> usize {
    owned.values().map(BTreeSet::len).sum()
}

fn join_req(group: &str, topics: &[&str], instance: Option<&str>) -> pb::GroupHeartbeatRequest {
    pb::GroupHeartbeatRequest {
        group: group.into(),
        member_id: String::new(),
        member_epoch: 0,
        instance_id: instance.map(str::to_string),
        subscribed_topics: Some(pb::TopicList {
            topics: topics.iter().map(|t| t.to_string()).collect(),
        }),
        owned_partitions: None,
        session_timeout_ms: None,
        rebalance_timeout_ms: None,
        assignor: None,
    }
}

impl Member {
    async fn join(c: &mut Clients, group: &str, topics: &[&str], instance: Option<&str>) -> Member {
        let mut m = Member::default();
        let r = c
            .groups
            .group_heartbeat(join_req(group, topics, instance))
            .await
            .expect("join")
            .into_inner();
        m.apply(r);
        m
    }

    fn apply(&mut self, r: pb::GroupHeartbeatResponse) -> pb::GroupHeartbeatResponse {
        self.id.clone_from(&r.member_id);
        self.epoch = r.member_epoch;
        self.owned = from_set(r.assignment.clone());
        self.interval_ms = r.heartbeat_interval_ms;
        r
    }

    /// One heartbeat reporting what it owns; it then owns what the answer gives it.
    async fn beat(
        &mut self,
        c: &mut Clients,
        group: &str,
    ) -> Result<pb::GroupHeartbeatResponse, tonic::Status> {
        let r = c
            .groups
            .group_heartbeat(pb::GroupHeartbeatRequest {
                group: group.into(),
                member_id: self.id.clone(),
                member_epoch: self.epoch,
                instance_id: None,
                subscribed_topics: None,
                owned_partitions: Some(set(&self.owned)),
                session_timeout_ms: None,
                rebalance_timeout_ms: None,
                assignor: None,
            })
            .await?
            .into_inner();
        Ok(self.apply(r))
    }
}

/// No partition is owned by two members.
fn assert_disjoint(members: &[Member]) {
    let mut seen = BTreeMap::new();
    for m in members {
        for (t, ps) in &m.owned {
            for p in ps {
                if let Some(other) = seen.insert((t.clone(), *p), m.id.clone()) {
                    panic!("{t}/{p} owned by {other} and {}", m.id);
                }
            }
        }
    }
}

/// Heartbeats every member in rounds until none is reconciling, checking after each round
/// that no partition has two owners. Fails after 10 s.
async fn settle(c: &mut Clients, group: &str, members: &mut [Member]) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut reconciling = false;
        for m in members.iter_mut() {
            reconciling |= m.beat(c, group).await.expect("beat").reconciling;
        }
        assert_disjoint(members);
        if !reconciling {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the group never settled: {members:?}"
        );
        sleep(Duration::from_millis(20)).await;
    }
}

async fn describe(c: &mut Clients, group: &str) -> pb::DescribeGroupResponse {
    c.groups
        .describe_group(pb::DescribeGroupRequest {
            group: group.into(),
        })
        .await
        .expect("describe")
        .into_inner()
}

async fn setup(partitions: u32) -> (TestBroker, Clients) {
    let broker = TestBroker::start().await.expect("broker");
    let mut c = Clients::connect(broker.url()).await.expect("connect");
    c.create_topic("t", partitions).await.expect("create");
    (broker, c)
}

#[tokio::test]
async fn three_members_share_six_partitions_and_a_fourth_takes_only_its_share() {
    let (broker, mut c) = setup(6).await;
    let mut members = Vec::new();
    for _ in 0..3 {
        members.push(Member::join(&mut c, "g", &["t"], None).await);
    }
    settle(&mut c, "g", &mut members).await;
    for m in &members {
        assert_eq!(count(&m.owned), 2, "{members:?}");
    }
    let before: Vec<Owned> = members.iter().map(|m| m.owned.clone()).collect();
    members.push(Member::join(&mut c, "g", &["t"], None).await);
    settle(&mut c, "g", &mut members).await;
    let total: usize = members.iter().map(|m| count(&m.owned)).sum();
    assert_eq!(total, 6, "{members:?}");
    assert!(
        count(&members[3].owned) >= 1,
        "the newcomer gets partitions"
    );
    for (m, old) in members.iter().zip(&before) {
        for (t, ps) in &m.owned {
            assert!(
                ps.is_subset(&old[t]),
                "{} gained partitions instead of keeping its own: {members:?}",
                m.id
            );
        }
    }
    let d = describe(&mut c, "g").await;
    assert_eq!(d.state, "stable");
    assert_eq!(d.members.len(), 4);
    assert_eq!(d.assignor, "uniform");
    assert!(d.group_epoch >= 4, "{}", d.group_epoch);
    for dm in &d.members {
        let m = members
            .iter()
            .find(|m| m.id == dm.member_id)
            .expect("known");
        assert_eq!(from_set(dm.assigned.clone()), m.owned);
        assert!(dm.client_address.starts_with("127.0.0.1:"), "{dm:?}");
    }
    broker.stop().await.expect("stop");
}

#[tokio::test]
async fn a_silent_member_loses_its_partitions_after_the_session_timeout() {
    let (broker, mut c) = setup(6).await;
    let mut req = join_req("g", &["t"], None);
    req.session_timeout_ms = Some(1_000);
    let mut a = Member::default();
    a.apply(
        c.groups
            .group_heartbeat(req)
            .await
            .expect("join")
            .into_inner(),
    );
    assert_eq!(a.interval_ms, 333, "a third of the session timeout");
    let mut b = Member::join(&mut c, "g", &["t"], None).await;
    let mut both = vec![a, b.clone()];
    settle(&mut c, "g", &mut both).await;
    let mut a = both.remove(0);
    assert_eq!(count(&a.owned), 3);
    // b goes silent; a keeps heartbeating at its interval.
    let silent_at = Instant::now();
    let deadline = silent_at + Duration::from_secs(10);
    while count(&a.owned) < 6 {
        assert!(
            Instant::now() < deadline,
            "b's partitions never moved: {a:?}"
        );
        sleep(Duration::from_millis(u64::from(a.interval_ms))).await;
        a.beat(&mut c, "g").await.expect("beat");
    }
    assert!(
        silent_at.elapsed() >= Duration::from_millis(900),
        "moved before the session timeout"
    );
    let err = b.beat(&mut c, "g").await.expect_err("b was removed");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains(&b.id), "{}", err.message());
    broker.stop().await.expect("stop");
}

#[tokio::test]
async fn a_static_member_restart_keeps_its_partitions_and_the_group_epoch() {
    let (broker, mut c) = setup(6).await;
    let mut members = vec![
        Member::join(&mut c, "g", &["t"], Some("host-a")).await,
        Member::join(&mut c, "g", &["t"], Some("host-b")).await,
    ];
    settle(&mut c, "g", &mut members).await;
    let epoch = describe(&mut c, "g").await.group_epoch;
    let old = members[0].clone();
    // The process restarts (no leave) and rejoins with the same instance id.
    let back = Member::join(&mut c, "g", &["t"], Some("host-a")).await;
    assert_ne!(back.id, old.id);
    assert_eq!(back.owned, old.owned, "the same partitions at once");
    assert_eq!(back.epoch, old.epoch);
    let d = describe(&mut c, "g").await;
    assert_eq!(d.group_epoch, epoch, "no rebalance");
    assert_eq!(d.members.len(), 2);
    assert!(d
        .members
        .iter()
        .any(|m| m.instance_id.as_deref() == Some("host-a") && m.member_id == back.id));
    let mut stale = old;
    assert_eq!(
        stale.beat(&mut c, "g").await.expect_err("replaced").code(),
        Code::FailedPrecondition
    );
    broker.stop().await.expect("stop");
}

fn commit_req(member: Option<(&str, i32)>, offset: u64) -> pb::CommitOffsetsRequest {
    pb::CommitOffsetsRequest {
        group: "g".into(),
        topic: "t".into(),
        offsets: vec![pb::PartitionOffset {
            partition: 0,
            offset,
            metadata: None,
        }],
        member: member.map(|(id, epoch)| pb::MemberIdentity {
            member_id: id.into(),
            member_epoch: epoch,
        }),
    }
}

async fn committed(c: &mut Clients) -> Option<u64> {
    c.groups
        .fetch_offsets(pb::FetchOffsetsRequest {
            group: "g".into(),
            topic: "t".into(),
            partitions: vec![0],
        })
        .await
        .expect("fetch")
        .into_inner()
        .offsets[0]
        .offset
}

#[tokio::test]
async fn commits_from_stale_or_unknown_members_are_refused_and_change_nothing() {
    let (broker, mut c) = setup(2).await;
    let mut members = vec![Member::join(&mut c, "g", &["t"], None).await];
    settle(&mut c, "g", &mut members).await;
    let m = members[0].clone();
    c.groups
        .commit_offsets(commit_req(Some((&m.id, m.epoch)), 5))
        .await
        .expect("a current member commits");
    assert_eq!(committed(&mut c).await, Some(5));
    let err = c
        .groups
        .commit_offsets(commit_req(Some((&m.id, m.epoch - 1)), 9))
        .await
        .expect_err("stale epoch");
    assert_eq!(err.code(), Code::FailedPrecondition);
    for part in [
        "\"g\"",
        m.id.as_str(),
        &(m.epoch - 1).to_string(),
        &m.epoch.to_string(),
    ] {
        assert!(
            err.message().contains(part),
            "{} names {part}",
            err.message()
        );
    }
    let err = c
        .groups
        .commit_offsets(commit_req(Some(("zombie", 3)), 9))
        .await
        .expect_err("unknown member");
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("zombie"), "{}", err.message());
    assert_eq!(
        committed(&mut c).await,
        Some(5),
        "refused commits changed nothing"
    );
    c.groups
        .commit_offsets(commit_req(None, 7))
        .await
        .expect("a plain commit without membership still works");
    assert_eq!(committed(&mut c).await, Some(7));
    broker.stop().await.expect("stop");
}

#[tokio::test]
async fn bad_heartbeats_are_refused_and_odd_groups_work() {
    let (broker, mut c) = setup(2).await;
    let mut m = Member::join(&mut c, "g", &["t"], None).await;
    let good = m.clone();
    m.epoch += 7;
    let err = m.beat(&mut c, "g").await.expect_err("wrong epoch");
    assert_eq!(err.code(), Code::FailedPrecondition);
    m.id = "nobody".into();
    m.epoch = good.epoch;
    let err = m.beat(&mut c, "g").await.expect_err("unknown member");
    assert_eq!(err.code(), Code::FailedPrecondition);
    for bad in [
        join_req("bad/group", &["t"], None),
        join_req("", &["t"], None),
        join_req("g", &[], None),
        join_req("g", &["bad topic"], None),
        pb::GroupHeartbeatRequest {
            assignor: Some("fastest".into()),
            ..join_req("g", &["t"], None)
        },
        pb::GroupHeartbeatRequest {
            session_timeout_ms: Some(10),
            ..join_req("g", &["t"], None)
        },
    ] {
        let shown = format!("{bad:?}");
        let err = c.groups.group_heartbeat(bad).await.expect_err(&shown);
        assert_eq!(err.code(), Code::InvalidArgument, "{shown}: {err:?}");
    }
    let d = describe(&mut c, "g").await;
    assert_eq!(d.members.len(), 1, "refused heartbeats changed nothing");
    let mut ghost = Member {
        id: "ghost-member".into(),
        epoch: 3,
        ..Member::default()
    };
    let err = ghost.beat(&mut c, "ghost").await.expect_err("unknown");
    assert_eq!(err.code(), Code::FailedPrecondition);
    let err = c
        .groups
        .group_heartbeat(join_req("ghost", &[], None))
        .await
        .expect_err("no topics");
    assert_eq!(err.code(), Code::InvalidArgument);
    let list = c
        .groups
        .list_groups(pb::ListGroupsRequest {})
        .await
        .expect("list")
        .into_inner();
    assert_eq!(
        list.groups,
        vec!["g".to_string()],
        "no trace of the refused group"
    );

    // More members than partitions: the extra ones are told they get nothing.
    let mut members: Vec<Member> = vec![good];
    for _ in 0..3 {
        members.push(Member::join(&mut c, "g", &["t"], None).await);
    }
    settle(&mut c, "g", &mut members).await;
    let counts: Vec<usize> = members.iter().map(|m| count(&m.owned)).collect();
    assert_eq!(counts.iter().sum::<usize>(), 2, "{counts:?}");
    assert_eq!(counts.iter().filter(|&&n| n == 0).count(), 2, "{counts:?}");

    // A subscription to a topic that does not exist yet is allowed, and assigned once the
    // topic appears.
    let mut later = vec![Member::join(&mut c, "h", &["later"], None).await];
    settle(&mut c, "h", &mut later).await;
    assert!(later[0].owned.is_empty());
    c.create_topic("later", 3).await.expect("create");
    settle(&mut c, "h", &mut later).await;
    assert_eq!(count(&later[0].owned), 3);
    broker.stop().await.expect("stop");
}

#[tokio::test]
async fn membership_survives_a_broker_restart() {
    let (broker, mut c) = setup(4).await;
    let mut members = vec![
        Member::join(&mut c, "g", &["t"], None).await,
        Member::join(&mut c, "g", &["t"], Some("static")).await,
    ];
    settle(&mut c, "g", &mut members).await;
    c.groups
        .commit_offsets(commit_req(Some((&members[0].id, members[0].epoch)), 3))
        .await
        .expect("commit");
    let epoch = describe(&mut c, "g").await.group_epoch;
    let before: Vec<Member> = members.clone();
    drop(c);
    let dir = broker.stop().await.expect("stop").expect("dir");
    let config = rill_broker::Config::new(dir.path());
    let broker = TestBroker::start_with(config, Some(dir))
        .await
        .expect("restart");
    let mut c = Clients::connect(broker.url()).await.expect("connect");
    settle(&mut c, "g", &mut members).await;
    for (m, old) in members.iter().zip(&before) {
        assert_eq!((&m.id, m.epoch, &m.owned), (&old.id, old.epoch, &old.owned));
    }
    let d = describe(&mut c, "g").await;
    assert_eq!(d.group_epoch, epoch, "no rebalance across the restart");
    assert_eq!(d.state, "stable");
    assert_eq!(committed(&mut c).await, Some(3));
    broker.stop().await.expect("stop");
}

#[tokio::test]
async fn groups_are_listed_with_members_and_deleted_only_when_empty() {
    let (broker, mut c) = setup(2).await;
    let mut m = Member::join(&mut c, "busy", &["t"], None).await;
    c.groups
        .commit_offsets(pb::CommitOffsetsRequest {
            group: "idle".into(),
            ..commit_req(None, 1)
        })
        .await
        .expect("commit");
    let list = c
        .groups
        .list_groups(pb::ListGroupsRequest {})
        .await
        .expect("list")
        .into_inner();
    assert_eq!(list.groups, vec!["busy".to_string(), "idle".to_string()]);
    let busy = &list.summaries[0];
    assert_eq!((busy.group.as_str(), busy.member_count), ("busy", 1));
    assert_eq!(list.summaries[1].state, "empty");
    // An offset reset of a group with live members would race their commits.
    let reset = |dry_run: bool| pb::ResetGroupOffsetsRequest {
        group: "busy".into(),
        topic: "t".into(),
        partitions: vec![],
        target: Some(pb::reset_group_offsets_request::Target::ToEarliest(true)),
        dry_run,
    };
    let err = c
        .groups
        .reset_group_offsets(reset(false))
        .await
        .expect_err("members alive");
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("offset reset"), "{}", err.message());
    c.groups
        .reset_group_offsets(reset(true))
        .await
        .expect("a dry run is allowed");
    let delete = |g: &str| pb::DeleteGroupRequest { group: g.into() };
    let err = c
        .groups
        .delete_group(delete("busy"))
        .await
        .expect_err("members alive");
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("busy"), "{}", err.message());
    // The member leaves; then the group can go.
    m.epoch = -1;
    let left = m.beat(&mut c, "busy").await.expect("leave");
    assert_eq!(left.member_epoch, -1);
    c.groups.delete_group(delete("busy")).await.expect("delete");
    c.groups.delete_group(delete("idle")).await.expect("delete");
    let err = c
        .groups
        .delete_group(delete("idle"))
        .await
        .expect_err("gone");
    assert_eq!(err.code(), Code::NotFound);
    let list = c
        .groups
        .list_groups(pb::ListGroupsRequest {})
        .await
        .expect("list")
        .into_inner();
    assert!(list.groups.is_empty(), "{list:?}");
    broker.stop().await.expect("stop");
}

#[tokio::test]
async fn internal_topic_names_are_reserved() {
    let (broker, mut c) = setup(1).await;
    for name in ["__groups", "__mine"] {
        let err = c.create_topic(name, 1).await.expect_err("reserved");
        let status = err.downcast_ref::<tonic::Status>().expect("a status");
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(
            status.message().contains("reserved"),
            "{}",
            status.message()
        );
    }
    let topics = c
        .admin
        .list_topics(pb::ListTopicsRequest {})
        .await
        .expect("list")
        .into_inner();
    assert!(
        format!("{topics:?}").contains("\"t\"") && !format!("{topics:?}").contains("__groups"),
        "the internal topic is not listed: {topics:?}"
    );
    broker.stop().await.expect("stop");
}
