//! Tests of the membership state machine: joins, moves, timeouts, static members, fencing,
//! bad input, and a property test that no partition ever has two owners.

use super::*;
use proptest::prelude::*;

/// A group driven by hand: a clock, topic sizes, and cooperative members.
struct Sim {
    g: Group,
    now: u64,
    topics: BTreeMap<String, u32>,
    next_id: u32,
}

impl Sim {
    fn new(topics: &[(&str, u32)]) -> Self {
        Sim {
            g: Group::new("g"),
            now: 1_000,
            topics: topics.iter().map(|(t, n)| (t.to_string(), *n)).collect(),
            next_id: 0,
        }
    }

    fn hb(&mut self, hb: Heartbeat) -> Result<Reply, MembershipError> {
        let topics = self.topics.clone();
        let next = &mut self.next_id;
        let mut new_id = || {
            *next += 1;
            format!("m{next}")
        };
        self.g
            .heartbeat(hb, self.now, &|t: &str| topics.get(t).copied(), &mut new_id)
    }

    fn join(&mut self, topics: &[&str], instance: Option<&str>) -> Reply {
        self.hb(Heartbeat {
            member_epoch: 0,
            instance_id: instance.map(str::to_string),
            subscribed: Some(topics.iter().map(|t| t.to_string()).collect()),
            client_address: "127.0.0.1:1".into(),
            ..Heartbeat::default()
        })
        .expect("join")
    }

    /// A cooperative heartbeat: the member reports owning exactly what it was assigned.
    fn beat(&mut self, id: &str) -> Result<Reply, MembershipError> {
        let m = self.g.members.get(id).cloned();
        let (epoch, owned) = m.map_or((1, Partitions::new()), |m| (m.epoch, m.assigned));
        self.hb(Heartbeat {
            member_id: id.to_string(),
            member_epoch: epoch,
            owned: Some(owned),
            ..Heartbeat::default()
        })
    }

    /// Heartbeats every member a few rounds.
    fn settle(&mut self) {
        for _ in 0..4 {
            let ids: Vec<String> = self.g.members.keys().cloned().collect();
            for id in ids {
                self.beat(&id).expect("beat");
            }
        }
    }

    fn count(&self, id: &str) -> usize {
        self.g.members[id]
            .assigned
            .values()
            .map(BTreeSet::len)
            .sum()
    }
}

/// No partition is owned (assigned or revoking) by two members.
fn assert_single_owners(g: &Group) {
    let mut seen = BTreeMap::new();
    for m in g.members.values() {
        for (t, ps) in m.assigned.iter().chain(m.revoking.iter()) {
            for &p in ps {
                if let Some(other) = seen.insert((t.clone(), p), m.id.clone()) {
                    panic!("{t}/{p} owned by {other} and {}", m.id);
                }
            }
        }
    }
}

#[test]
fn three_members_get_two_partitions_each_and_the_group_is_stable() {
    let mut s = Sim::new(&[("t", 6)]);
    let ids: Vec<String> = (0..3).map(|_| s.join(&["t"], None).member_id).collect();
    s.settle();
    for id in &ids {
        assert_eq!(s.count(id), 2, "{id}: {:?}", s.g.members[id]);
    }
    assert_eq!(s.g.state(), "stable");
    assert_eq!(s.g.epoch, 3, "one bump per join");
    assert_single_owners(&s.g);
}

#[test]
fn a_fourth_member_gets_partitions_only_after_their_owners_release_them() {
    let mut s = Sim::new(&[("t", 6)]);
    let ids: Vec<String> = (0..3).map(|_| s.join(&["t"], None).member_id).collect();
    s.settle();
    let before: BTreeMap<String, Partitions> = ids
        .iter()
        .map(|id| (id.clone(), s.g.members[id].assigned.clone()))
        .collect();
    let d = s.join(&["t"], None);
    assert!(d.assignment.is_empty(), "nothing is free yet: {d:?}");
    assert!(d.reconciling);
    // The old members learn what to release; until they do, the newcomer waits.
    for id in &ids {
        s.hb(Heartbeat {
            member_id: id.clone(),
            member_epoch: s.g.members[id].epoch,
            owned: Some(before[id].clone()),
            ..Heartbeat::default()
        })
        .expect("beat");
    }
    assert_single_owners(&s.g);
    assert!(s.beat(&d.member_id).expect("beat").assignment.is_empty());
    s.settle();
    let gained = s.count(&d.member_id);
    assert!(gained >= 1, "the newcomer gets its share");
    let mut kept = 0;
    for id in &ids {
        let now = &s.g.members[id].assigned;
        kept += before[id]["t"]
            .iter()
            .filter(|p| now.get("t").is_some_and(|n| n.contains(p)))
            .count();
        assert!(s.count(id) >= 1);
    }
    assert_eq!(kept, 6 - gained, "only the newcomer's share moved");
    assert_eq!(s.g.state(), "stable");
}

#[test]
fn a_silent_member_is_removed_after_the_session_timeout() {
    let mut s = Sim::new(&[("t", 4)]);
    let a = s.hb(Heartbeat {
        member_epoch: 0,
        subscribed: Some(BTreeSet::from(["t".to_string()])),
        session_timeout_ms: Some(1_000),
        ..Heartbeat::default()
    });
    let a = a.expect("join").member_id;
    let b = s.join(&["t"], None).member_id;
    s.settle();
    assert_eq!(s.g.heartbeat_interval_ms(), 333);
    s.now += 900;
    s.beat(&a).expect("a stays");
    assert!(s.g.expire(s.now).is_empty(), "not yet");
    s.now += 200;
    assert_eq!(s.g.expire(s.now), vec![b.clone()]);
    s.settle();
    assert_eq!(s.count(&a), 4, "the survivor owns everything");
    assert!(matches!(
        s.beat(&b),
        Err(MembershipError::UnknownMember { .. })
    ));
}

#[test]
fn a_static_member_that_returns_keeps_its_partitions_and_the_group_epoch() {
    let mut s = Sim::new(&[("t", 6)]);
    let a = s.join(&["t"], Some("host-a")).member_id;
    let _b = s.join(&["t"], Some("host-b")).member_id;
    s.settle();
    let owned = s.g.members[&a].assigned.clone();
    let epoch = s.g.epoch;
    let member_epoch = s.g.members[&a].epoch;
    // A restart without a leave (kill -9), or with a static leave: both come back the same.
    for leave_first in [false, true] {
        let old =
            s.g.members
                .values()
                .find(|m| m.instance_id.as_deref() == Some("host-a"))
                .map(|m| m.id.clone())
                .expect("present");
        if leave_first {
            let r = s
                .hb(Heartbeat {
                    member_id: old.clone(),
                    member_epoch: -2,
                    ..Heartbeat::default()
                })
                .expect("static leave");
            assert_eq!(r.member_epoch, -2);
            assert_eq!(s.g.live_members(), 1);
        }
        let back = s.join(&["t"], Some("host-a"));
        assert_ne!(back.member_id, old, "a new member id");
        assert_eq!(back.assignment, owned, "the same partitions");
        assert_eq!(back.member_epoch, member_epoch);
        assert_eq!(s.g.epoch, epoch, "no rebalance");
        assert!(matches!(
            s.beat(&old),
            Err(MembershipError::UnknownMember { .. })
        ));
    }
}

#[test]
fn a_member_that_keeps_a_revoked_partition_is_fenced_by_the_rebalance_timeout() {
    let mut s = Sim::new(&[("t", 2)]);
    let a = s.hb(Heartbeat {
        member_epoch: 0,
        subscribed: Some(BTreeSet::from(["t".to_string()])),
        rebalance_timeout_ms: Some(2_000),
        ..Heartbeat::default()
    });
    let a = a.expect("join").member_id;
    s.settle();
    let b = s.join(&["t"], None).member_id;
    // `a` keeps reporting both partitions: it never releases.
    let stubborn = |s: &mut Sim| {
        let all = BTreeMap::from([("t".to_string(), BTreeSet::from([0, 1]))]);
        s.hb(Heartbeat {
            member_id: a.clone(),
            member_epoch: s.g.members[&a].epoch,
            owned: Some(all),
            ..Heartbeat::default()
        })
    };
    stubborn(&mut s).expect("beat");
    s.beat(&b).expect("beat");
    assert_eq!(s.count(&b), 0, "b waits for a's release");
    s.now += 1_500;
    stubborn(&mut s).expect("beat");
    assert!(s.g.expire(s.now).is_empty());
    s.now += 1_000;
    assert_eq!(s.g.expire(s.now), vec![a.clone()]);
    s.settle();
    assert_eq!(s.count(&b), 2);
}

#[test]
fn stale_epochs_unknown_members_and_bad_input_are_refused_and_change_nothing() {
    let mut s = Sim::new(&[("t", 3)]);
    let a = s.join(&["t"], None).member_id;
    s.settle();
    let before = s.g.clone();
    let epoch = s.g.members[&a].epoch;
    let err = s
        .hb(Heartbeat {
            member_id: a.clone(),
            member_epoch: epoch + 5,
            ..Heartbeat::default()
        })
        .expect_err("wrong epoch");
    let text = err.to_string();
    assert!(matches!(err, MembershipError::FencedEpoch { .. }));
    for part in [
        "\"g\"",
        a.as_str(),
        &(epoch + 5).to_string(),
        &epoch.to_string(),
    ] {
        assert!(text.contains(part), "{text} names {part}");
    }
    assert!(matches!(
        s.beat("nobody"),
        Err(MembershipError::UnknownMember { .. })
    ));
    let bad = [
        Heartbeat {
            member_epoch: 0,
            ..Heartbeat::default()
        },
        Heartbeat {
            member_epoch: 0,
            subscribed: Some(BTreeSet::from(["bad/name".to_string()])),
            ..Heartbeat::default()
        },
        Heartbeat {
            member_epoch: 0,
            subscribed: Some(BTreeSet::from(["t".to_string()])),
            session_timeout_ms: Some(1),
            ..Heartbeat::default()
        },
        Heartbeat {
            member_epoch: 0,
            member_id: "x".repeat(200),
            subscribed: Some(BTreeSet::from(["t".to_string()])),
            ..Heartbeat::default()
        },
        Heartbeat {
            member_epoch: -3,
            member_id: a.clone(),
            ..Heartbeat::default()
        },
        Heartbeat {
            member_epoch: 4,
            ..Heartbeat::default()
        },
        Heartbeat {
            member_epoch: -2,
            member_id: a.clone(),
            ..Heartbeat::default()
        },
    ];
    for hb in bad {
        let shown = format!("{hb:?}");
        assert!(s.hb(hb).is_err(), "{shown}");
    }
    assert!(matches!(
        s.g.check_commit(&a, epoch - 1),
        Err(MembershipError::FencedEpoch { .. })
    ));
    assert!(s.g.check_commit(&a, epoch).is_ok());
    assert!(matches!(
        s.g.check_commit("nobody", 1),
        Err(MembershipError::UnknownMember { .. })
    ));
    assert_eq!(s.g, before, "nothing changed");
}

#[test]
fn topics_that_appear_later_are_assigned_and_extra_members_get_nothing() {
    let mut s = Sim::new(&[]);
    let ids: Vec<String> = (0..3).map(|_| s.join(&["later"], None).member_id).collect();
    s.settle();
    assert!(ids.iter().all(|id| s.count(id) == 0));
    assert_eq!(s.g.state(), "stable");
    s.topics.insert("later".into(), 2);
    let epoch = s.g.epoch;
    s.settle();
    assert_eq!(
        s.g.epoch,
        epoch + 1,
        "a topic size change is a new group epoch"
    );
    let counts: Vec<usize> = ids.iter().map(|id| s.count(id)).collect();
    assert_eq!(counts.iter().sum::<usize>(), 2);
    assert_eq!(counts.iter().filter(|&&c| c == 0).count(), 1, "{counts:?}");
}

#[test]
fn a_lost_answer_is_tolerated_once() {
    let mut s = Sim::new(&[("t", 2)]);
    let a = s.join(&["t"], None);
    s.settle();
    let b = s.join(&["t"], None).member_id;
    s.settle();
    let m = s.g.members[&a.member_id].clone();
    assert!(m.epoch > m.previous_epoch);
    // The member never saw its last answer: it still sends its previous epoch.
    s.hb(Heartbeat {
        member_id: a.member_id.clone(),
        member_epoch: m.previous_epoch,
        owned: Some(m.assigned.clone()),
        ..Heartbeat::default()
    })
    .expect("previous epoch with owned partitions it has");
    let _ = b;
}

#[derive(Debug, Clone)]
enum Op {
    Join(u8),
    Leave(u8),
    /// A heartbeat; true when the member releases what it was told to.
    Beat(u8, bool),
    Tick(u16),
    Resize(u8),
}

fn arb_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0u8..6).prop_map(Op::Join),
        (0u8..6).prop_map(Op::Leave),
        (0u8..6, any::<bool>()).prop_map(|(m, r)| Op::Beat(m, r)),
        (0u16..1500).prop_map(Op::Tick),
        (1u8..9).prop_map(Op::Resize),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// Across random joins, leaves, heartbeats (cooperative or stubborn), time passing
    /// (expiries) and topic growth, no partition is ever owned by two members; and once
    /// everyone cooperates, the group settles with every partition owned.
    #[test]
    fn no_partition_is_ever_owned_by_two_members(ops in proptest::collection::vec(arb_op(), 1..80)) {
        let mut s = Sim::new(&[("t", 4), ("u", 3)]);
        s.g.session_timeout_ms = 2_000;
        s.g.rebalance_timeout_ms = 1_000;
        // Slot → member id, for members the test drives.
        let mut slots: BTreeMap<u8, String> = BTreeMap::new();
        for op in ops {
            match op {
                Op::Join(slot) => {
                    let topics: &[&str] = if slot % 2 == 0 { &["t", "u"] } else { &["t"] };
                    let r = s.join(topics, (slot == 5).then_some("static"));
                    slots.insert(slot, r.member_id);
                }
                Op::Leave(slot) => {
                    if let Some(id) = slots.remove(&slot) {
                        let _ = s.hb(Heartbeat { member_id: id, member_epoch: -1, ..Heartbeat::default() });
                    }
                }
                Op::Beat(slot, release) => {
                    if let Some(id) = slots.get(&slot).cloned() {
                        if let Some(m) = s.g.members.get(&id).cloned() {
                            let mut owned = m.assigned.clone();
                            if !release {
                                for (t, ps) in &m.revoking {
                                    owned.entry(t.clone()).or_default().extend(ps);
                                }
                            }
                            let _ = s.hb(Heartbeat { member_id: id, member_epoch: m.epoch, owned: Some(owned), ..Heartbeat::default() });
                        }
                    }
                }
                Op::Tick(ms) => {
                    s.now += u64::from(ms);
                    s.g.expire(s.now);
                }
                Op::Resize(n) => {
                    // Topics only grow, as in Kafka.
                    let t = s.topics.entry("t".into()).or_insert(0);
                    *t = (*t).max(u32::from(n));
                }
            }
            assert_single_owners(&s.g);
        }
        s.settle();
        assert_single_owners(&s.g);
        if s.g.members.values().any(|m| m.subscribed.contains("t")) {
            let owned: usize = s.g.members.values().flat_map(|m| m.assigned.get("t")).map(BTreeSet::len).sum();
            prop_assert_eq!(owned as u32, s.topics["t"], "every partition of t is owned once settled");
            prop_assert_eq!(s.g.state(), "stable");
        }
    }
}
