//! The client library's group member handle against a real broker: background heartbeats,
//! assigned and revoked events with an explicit release, member commits, leaving, and losing
//! partitions when fenced.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use rill_client::membership::Partitions;
use rill_client::{Connection, GroupMember, MemberConfig, MemberEvent};
use rill_tests::{Clients, TestBroker};
use tokio::time::timeout;

async fn event(m: &mut GroupMember) -> MemberEvent {
    timeout(Duration::from_secs(10), m.next_event())
        .await
        .expect("an event within 10 s")
        .expect("the member runs")
}

fn count(p: &Partitions) -> usize {
    p.values().map(BTreeSet::len).sum()
}

#[tokio::test]
async fn members_hand_partitions_over_only_after_release() {
    let broker = TestBroker::start().await.expect("broker");
    let addr = broker.addr().to_string();
    let mut c = Clients::connect(broker.url()).await.expect("connect");
    c.create_topic("t", 4).await.expect("create");
    let config = MemberConfig::new("g", ["t"]).session_timeout_ms(3_000);
    let mut a = GroupMember::join(
        Connection::connect(&addr).await.expect("connect"),
        config.clone(),
    )
    .await
    .expect("join");
    let MemberEvent::Assigned(first) = event(&mut a).await else {
        panic!("expected an assignment");
    };
    assert_eq!(count(&first), 4, "alone, it gets everything");
    a.commit("t", &[(0, 0)]).await.expect("a member commit");

    let mut b = GroupMember::join(Connection::connect(&addr).await.expect("connect"), config)
        .await
        .expect("join");
    let MemberEvent::Revoked(revoked) = event(&mut a).await else {
        panic!("expected a revocation");
    };
    assert_eq!(count(&revoked), 2);
    // Until a releases them, b owns none of them.
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    let b_owned = b.owned();
    for (t, ps) in &revoked {
        assert!(
            b_owned.get(t).is_none_or(|owned| owned.is_disjoint(ps)),
            "b got {b_owned:?} before a released {revoked:?}"
        );
    }
    a.release(&revoked);
    let MemberEvent::Assigned(given) = event(&mut b).await else {
        panic!("expected an assignment");
    };
    assert_eq!(given, revoked, "exactly what a released");
    assert_eq!(count(&a.owned()), 2);

    // a leaves: b gets the rest.
    a.leave().await.expect("leave");
    let MemberEvent::Assigned(rest) = event(&mut b).await else {
        panic!("expected the rest");
    };
    let mut all: BTreeMap<String, BTreeSet<u32>> = given.clone();
    for (t, ps) in rest {
        all.entry(t).or_default().extend(ps);
    }
    assert_eq!(count(&all), 4);
    assert_eq!(b.owned(), all);
    b.leave().await.expect("leave");
    broker.stop().await.expect("stop");
}

#[tokio::test]
async fn a_member_replaced_by_its_instance_loses_its_partitions_and_rejoins() {
    let broker = TestBroker::start().await.expect("broker");
    let addr = broker.addr().to_string();
    let mut c = Clients::connect(broker.url()).await.expect("connect");
    c.create_topic("t", 2).await.expect("create");
    let config = MemberConfig::new("g", ["t"])
        .instance_id("host")
        .session_timeout_ms(3_000);
    let mut old = GroupMember::join(
        Connection::connect(&addr).await.expect("connect"),
        config.clone(),
    )
    .await
    .expect("join");
    assert!(matches!(event(&mut old).await, MemberEvent::Assigned(_)));
    let old_epoch = old.member_epoch();
    // A second process with the same instance id takes the place: the first is fenced.
    let mut new = GroupMember::join(Connection::connect(&addr).await.expect("connect"), config)
        .await
        .expect("join");
    let MemberEvent::Assigned(taken) = event(&mut new).await else {
        panic!("expected the partitions");
    };
    assert_eq!(count(&taken), 2);
    assert_eq!(new.member_epoch(), old_epoch, "no rebalance");
    let err = old.commit("t", &[(0, 1)]).await.expect_err("fenced");
    assert_eq!(err.code(), Some(tonic::Code::FailedPrecondition));
    assert!(matches!(event(&mut old).await, MemberEvent::Lost(_)));
    drop(old);
    new.leave().await.expect("leave");
    broker.stop().await.expect("stop");
}
