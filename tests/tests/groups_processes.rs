//! Group membership with real processes: a real broker binary and real `rill consume --group`
//! processes, killed (-9), stopped (SIGSTOP), resumed and interrupted by the test.
//!
//! The consumers run with `--output json -v`: stdout carries the records (partition, offset,
//! value) and stderr a line per ownership change, with the member id, the epoch and the
//! wall-clock time, which the checks below compare across processes.

#[path = "groups_processes/procs.rs"]
mod procs;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use procs::{committed, counts, keep_producing, produce, setup, wait_for, ConsumerProc};
use rill_client::{Admin, GroupMember, MemberConfig, MemberEvent};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

#[tokio::test]
async fn a_killed_consumer_s_partitions_move_after_the_session_timeout_and_resume_from_the_commit()
{
    const SESSION_MS: u64 = 3_000;
    let s = setup("t", 4).await;
    let addr = s.broker.addr().to_string();
    let args = ["--session-timeout-ms", "3000"];
    produce(&s.conn, "t", 4, 25).await;
    let mut a = ConsumerProc::spawn(&addr, "a", "t", "g", &args, &s.notify).await;
    wait_for(
        &s.notify,
        "a to own 4 and print 100",
        Duration::from_secs(30),
        || a.owned().len() == 4 && a.records().len() == 100,
    )
    .await;
    let mut b = ConsumerProc::spawn(&addr, "b", "t", "g", &args, &s.notify).await;
    wait_for(&s.notify, "a 2 / b 2", Duration::from_secs(30), || {
        a.owned().len() == 2 && b.owned().len() == 2
    })
    .await;
    let a_parts: Vec<u32> = a.owned().into_iter().collect();
    let b_parts: Vec<u32> = b.owned().into_iter().collect();
    // More records; a is killed as soon as it printed its share, so some of them are likely
    // uncommitted (it commits every second).
    produce(&s.conn, "t", 4, 10).await;
    wait_for(
        &s.notify,
        "a to print its new records",
        Duration::from_secs(30),
        || {
            let c = counts(&a.records());
            a_parts.iter().all(|&p| c.contains_key(&(p, 34)))
        },
    )
    .await;
    a.kill9().await;
    let killed = Instant::now();
    // Nobody owns a's partitions until they move: what is committed now is where they resume.
    let at_kill = committed(&s.conn, "g", "t", &a_parts).await;
    wait_for(&s.notify, "b to own all 4", Duration::from_secs(30), || {
        b.owned().len() == 4
    })
    .await;
    let moved = killed.elapsed();
    // The session timeout plus a heartbeat interval (1 s), with a wide margin for a loaded
    // machine; the figure itself is measured by benches/groups.py.
    assert!(
        moved < Duration::from_millis(SESSION_MS + 1_000 + 6_000),
        "a's partitions moved {moved:?} after the kill"
    );
    wait_for(
        &s.notify,
        "b to print every record",
        Duration::from_secs(30),
        || {
            let c = counts(&b.records());
            a_parts
                .iter()
                .chain(&b_parts)
                .all(|&p| c.contains_key(&(p, 34)))
        },
    )
    .await;
    let (a_recs, b_recs) = (a.records(), b.records());
    for &p in &a_parts {
        let from = at_kill[&p].expect("a committed before the kill");
        let first = b_recs.iter().find(|r| r.0 == p).expect("b read p").1;
        assert_eq!(
            first, from,
            "partition {p} resumed from its committed offset"
        );
    }
    let (ca, cb) = (counts(&a_recs), counts(&b_recs));
    for p in 0..4u32 {
        for o in 0..35u64 {
            let (na, nb) = (
                ca.get(&(p, o)).copied().unwrap_or(0),
                cb.get(&(p, o)).copied().unwrap_or(0),
            );
            assert!(na + nb >= 1, "record {p}@{o} was never consumed");
            assert!(na <= 1 && nb <= 1, "{p}@{o} printed twice by one consumer");
            if na + nb == 2 {
                // Only a's uncommitted window at the kill is read again.
                assert!(
                    a_parts.contains(&p),
                    "{p}@{o} duplicated on a partition b always had"
                );
                assert!(
                    o >= at_kill[&p].unwrap_or(0),
                    "{p}@{o} was committed, yet read twice"
                );
            }
        }
    }
    b.interrupt().await;
    s.broker.stop().await.expect("stop");
}

#[tokio::test]
async fn three_consumers_get_two_partitions_each_and_keep_consuming_while_a_fourth_joins() {
    let s = setup("f", 6).await;
    let addr = s.broker.addr().to_string();
    // A long session (a 3.3 s heartbeat interval) makes the rebalance last seconds.
    let args = ["--session-timeout-ms", "10000"];
    let stop = CancellationToken::new();
    let producing = keep_producing(&s.conn, "f", 6, &stop);
    let mut procs = Vec::new();
    for i in 0..3 {
        procs.push(ConsumerProc::spawn(&addr, &format!("c{i}"), "f", "g", &args, &s.notify).await);
    }
    wait_for(
        &s.notify,
        "three consumers with two partitions each",
        Duration::from_secs(60),
        || procs.iter().all(|c| c.owned().len() == 2),
    )
    .await;
    let before: Vec<BTreeSet<u32>> = procs.iter().map(ConsumerProc::owned).collect();
    let changes_before: Vec<usize> = procs.iter().map(|c| c.changes().len()).collect();
    let joined = Instant::now();
    procs.push(ConsumerProc::spawn(&addr, "c3", "f", "g", &args, &s.notify).await);
    wait_for(
        &s.notify,
        "the fourth to get its share",
        Duration::from_secs(60),
        || {
            !procs[3].owned().is_empty()
                && procs.iter().map(|c| c.owned().len()).sum::<usize>() == 6
        },
    )
    .await;
    let settled = Instant::now();
    let given = procs[3].owned();
    assert!((1..=2).contains(&given.len()), "the fourth got {given:?}");
    for (i, c) in procs[..3].iter().enumerate() {
        let kept: BTreeSet<u32> = before[i].intersection(&c.owned()).copied().collect();
        assert!(
            c.owned().is_subset(&before[i]),
            "{} only gave partitions up",
            c.name
        );
        for &p in &kept {
            // No pause: records of a kept partition were read throughout the rebalance.
            assert!(
                c.read_between(p, joined, settled) > 0,
                "{} read nothing of its kept partition {p} during the rebalance ({:?})",
                c.name,
                settled - joined
            );
            assert!(
                c.changes()[changes_before[i]..]
                    .iter()
                    .all(|ch| !ch.partitions.contains(&p)),
                "{} kept {p} without a revocation",
                c.name
            );
        }
    }
    // The moved partitions were never owned twice: each old owner printed its revocation
    // (after which it hands out nothing of them) before the fourth printed the assignment.
    let newcomer = procs[3].changes();
    for (i, c) in procs[..3].iter().enumerate() {
        for &p in before[i].difference(&c.owned()) {
            let revoked_at = c.changes()[changes_before[i]..]
                .iter()
                .find(|ch| ch.what == "revoked" && ch.partitions.contains(&p))
                .map(|ch| ch.at_ms)
                .unwrap_or_else(|| panic!("{} gave {p} up without a revocation", c.name));
            let assigned_at = newcomer
                .iter()
                .find(|ch| ch.what == "assigned" && ch.partitions.contains(&p))
                .map(|ch| ch.at_ms)
                .unwrap_or_else(|| panic!("c3 never got {p}"));
            assert!(
                revoked_at <= assigned_at,
                "partition {p}: {} revoked it at {revoked_at}, c3 got it at {assigned_at}",
                c.name
            );
        }
    }
    stop.cancel();
    producing.await.expect("producer");
    // The handover resumed exactly where the old owner stopped: it committed what it
    // printed before giving the partition up, so nothing is read twice or skipped.
    for (i, c) in procs[..3].iter().enumerate() {
        for &p in before[i].difference(&c.owned()) {
            let offsets = |proc: &ConsumerProc| -> BTreeSet<u64> {
                proc.records()
                    .iter()
                    .filter(|r| r.0 == p)
                    .map(|r| r.1)
                    .collect()
            };
            wait_for(
                &s.notify,
                &format!("c3 to continue partition {p} right after {}", c.name),
                Duration::from_secs(30),
                || {
                    let (old, new) = (offsets(c), offsets(&procs[3]));
                    old.last()
                        .zip(new.first())
                        .is_some_and(|(o, n)| o + 1 == *n)
                },
            )
            .await;
            let (old, new) = (offsets(c), offsets(&procs[3]));
            assert!(old.is_disjoint(&new), "partition {p} read twice");
        }
    }
    for c in &mut procs {
        c.interrupt().await;
    }
    s.broker.stop().await.expect("stop");
}

#[tokio::test]
async fn scaling_1_to_6_to_2_consumers_loses_nothing_and_never_shares_a_partition() {
    let s = setup("s", 6).await;
    let addr = s.broker.addr().to_string();
    let args = ["--session-timeout-ms", "10000"];
    // A producer running throughout.
    let stop = CancellationToken::new();
    let producing = keep_producing(&s.conn, "s", 6, &stop);
    let mut procs = vec![ConsumerProc::spawn(&addr, "c0", "s", "g", &args, &s.notify).await];
    wait_for(
        &s.notify,
        "c0 to own 6 and consume",
        Duration::from_secs(30),
        || procs[0].owned().len() == 6 && !procs[0].records().is_empty(),
    )
    .await;
    for i in 1..6 {
        procs.push(ConsumerProc::spawn(&addr, &format!("c{i}"), "s", "g", &args, &s.notify).await);
    }
    wait_for(
        &s.notify,
        "six consumers with one partition each",
        Duration::from_secs(60),
        || procs.iter().all(|c| c.owned().len() == 1),
    )
    .await;
    let printed: Vec<usize> = procs.iter().map(|c| c.records().len()).collect();
    wait_for(
        &s.notify,
        "each of the six to consume",
        Duration::from_secs(30),
        || {
            procs
                .iter()
                .zip(&printed)
                .all(|(c, &n)| c.records().len() > n)
        },
    )
    .await;
    for c in &mut procs[2..] {
        c.interrupt().await;
    }
    wait_for(
        &s.notify,
        "two consumers with three partitions each",
        Duration::from_secs(60),
        || procs[0].owned().len() == 3 && procs[1].owned().len() == 3,
    )
    .await;
    stop.cancel();
    let ends = producing.await.expect("producer");
    wait_for(
        &s.notify,
        "every record consumed",
        Duration::from_secs(60),
        || {
            let all: Vec<_> = procs.iter().flat_map(ConsumerProc::records).collect();
            let c = counts(&all);
            ends.iter()
                .all(|(&p, &end)| (0..end).all(|o| c.contains_key(&(p, o))))
        },
    )
    .await;
    procs[0].interrupt().await;
    procs[1].interrupt().await;

    let all: Vec<_> = procs.iter().flat_map(ConsumerProc::records).collect();
    let c = counts(&all);
    // Every handover was graceful (a revocation or a Ctrl-C), and each commits what was
    // printed before the partition moves: nothing is read twice.
    let twice: Vec<_> = c.iter().filter(|(_, &n)| n > 1).map(|(k, _)| k).collect();
    assert!(twice.is_empty(), "read more than once: {twice:?}");
    // Ownership intervals per partition, from each consumer's changes: they never overlap.
    let mut intervals: BTreeMap<u32, Vec<(u128, u128, String)>> = BTreeMap::new();
    for proc in &procs {
        let mut open: BTreeMap<u32, u128> = BTreeMap::new();
        for ch in proc.changes() {
            for &p in &ch.partitions {
                if ch.what == "assigned" {
                    open.insert(p, ch.at_ms);
                } else if let Some(start) = open.remove(&p) {
                    intervals
                        .entry(p)
                        .or_default()
                        .push((start, ch.at_ms, proc.name.clone()));
                }
            }
        }
        let end = proc.stopped_at_ms.expect("stopped by the test");
        for (p, start) in open {
            intervals
                .entry(p)
                .or_default()
                .push((start, end, proc.name.clone()));
        }
    }
    assert_eq!(
        intervals.len(),
        6,
        "every partition was owned: {intervals:?}"
    );
    for (p, list) in &mut intervals {
        list.sort();
        for pair in list.windows(2) {
            assert!(
                pair[0].1 <= pair[1].0,
                "partition {p} owned by {} until {} and by {} from {}",
                pair[0].2,
                pair[0].1,
                pair[1].2,
                pair[1].0
            );
        }
    }
    s.broker.stop().await.expect("stop");
}

#[tokio::test]
async fn a_zombie_consumer_s_commits_are_refused_and_change_nothing() {
    let s = setup("z", 2).await;
    let addr = s.broker.addr().to_string();
    produce(&s.conn, "z", 2, 10).await;
    let mut a = ConsumerProc::spawn(
        &addr,
        "a",
        "z",
        "g",
        &["--session-timeout-ms", "2000"],
        &s.notify,
    )
    .await;
    wait_for(
        &s.notify,
        "a to own 2 and print 20",
        Duration::from_secs(30),
        || a.owned().len() == 2 && a.records().len() == 20,
    )
    .await;
    // a commits every second; the broker has no event for it, so poll.
    let deadline = Instant::now() + Duration::from_secs(30);
    while committed(&s.conn, "g", "z", &[0, 1])
        .await
        .values()
        .any(|o| *o != Some(10))
    {
        assert!(Instant::now() < deadline, "a never committed 10, 10");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let last = a.changes().last().cloned().expect("a change");
    // New records, and a is stopped as soon as it printed them: it commits every second, and
    // at once only for the first record after an idle spell, so it is stopped holding
    // printed, uncommitted records. Resumed, its first move is to commit them.
    produce(&s.conn, "z", 2, 10).await;
    wait_for(&s.notify, "a to print 40", Duration::from_secs(30), || {
        a.records().len() == 40
    })
    .await;
    a.signal("STOP");
    let at_stop = committed(&s.conn, "g", "z", &[0, 1]).await;
    if at_stop.values().all(|o| *o == Some(20)) {
        // Too slow a machine: a committed everything before it was stopped. The checks below
        // still hold, but its commit after the resume is then empty.
        eprintln!("note: a committed everything before SIGSTOP; the zombie commits nothing");
    }

    // The new owner, driven by the test: once a is removed it owns both partitions, and
    // rewinds them to 3 (the owner may).
    let mut b = GroupMember::join(
        s.conn.clone(),
        MemberConfig::new("g", ["z"]).session_timeout_ms(2_000),
    )
    .await
    .expect("join");
    let mut owned = BTreeSet::new();
    while owned.len() < 2 {
        match tokio::time::timeout(Duration::from_secs(20), b.next_event()).await {
            Ok(Some(MemberEvent::Assigned(given))) => {
                owned.extend(given.get("z").cloned().unwrap_or_default())
            }
            other => panic!("expected an assignment, got {other:?}"),
        }
    }
    b.commit("z", &[(0, 3), (1, 3)])
        .await
        .expect("the owner commits");
    // More records, for the zombie's fetches to hand out when it wakes up.
    produce(&s.conn, "z", 2, 10).await;

    a.signal("CONT");
    wait_for(
        &s.notify,
        "the zombie to learn it is fenced",
        Duration::from_secs(30),
        || a.changes().iter().any(|c| c.what == "lost"),
    )
    .await;
    let lost = a
        .changes()
        .into_iter()
        .find(|c| c.what == "lost")
        .expect("lost");
    for part in ["\"g\"", &format!("\"{}\"", last.member), "epoch"] {
        assert!(
            lost.line.contains(part),
            "the refusal names {part}: {}",
            lost.line
        );
    }
    assert_eq!(
        committed(&s.conn, "g", "z", &[0, 1])
            .await
            .values()
            .copied()
            .collect::<Vec<_>>(),
        vec![Some(3), Some(3)],
        "the zombie moved the group's offsets; its stderr:\n{}",
        a.stderr()
    );
    // b leaves: a (rejoined) takes both partitions and resumes from the owner's commit.
    let before = a.records().len();
    b.leave().await.expect("leave");
    wait_for(
        &s.notify,
        "a to own both again and read",
        Duration::from_secs(30),
        || {
            a.owned().len() == 2 && {
                let c = counts(&a.records()[before..]);
                c.contains_key(&(0, 3)) && c.contains_key(&(1, 3))
            }
        },
    )
    .await;
    for p in [0, 1] {
        let first = a.records()[before..]
            .iter()
            .find(|r| r.0 == p)
            .expect("read")
            .1;
        assert_eq!(first, 3, "partition {p} resumed from the owner's commit");
    }
    assert!(a
        .changes()
        .iter()
        .any(|c| c.what == "assigned" && c.epoch > last.epoch));
    a.interrupt().await;
    s.broker.stop().await.expect("stop");
}

#[tokio::test]
async fn a_static_member_restarted_within_its_session_gets_its_partitions_back_without_a_rebalance()
{
    let s = setup("st", 4).await;
    let addr = s.broker.addr().to_string();
    let with = |id: &'static str| ["--session-timeout-ms", "10000", "--instance-id", id];
    let mut a = ConsumerProc::spawn(&addr, "a", "st", "g", &with("host-a"), &s.notify).await;
    let mut b = ConsumerProc::spawn(&addr, "b", "st", "g", &with("host-b"), &s.notify).await;
    wait_for(&s.notify, "a 2 / b 2", Duration::from_secs(30), || {
        a.owned().len() == 2 && b.owned().len() == 2
    })
    .await;
    let admin = Admin::new(s.conn.clone());
    let described = admin.describe_group("g").await.expect("describe");
    let a_parts = a.owned();
    let b_changes = b.changes().len();

    a.kill9().await;
    let restarted = Instant::now();
    let mut a2 = ConsumerProc::spawn(&addr, "a2", "st", "g", &with("host-a"), &s.notify).await;
    wait_for(
        &s.notify,
        "the restarted a to own its partitions",
        Duration::from_secs(8),
        || !a2.owned().is_empty(),
    )
    .await;
    assert!(
        restarted.elapsed() < Duration::from_secs(10),
        "within the session timeout"
    );
    assert_eq!(a2.owned(), a_parts, "the same partitions");
    let after = admin.describe_group("g").await.expect("describe");
    assert_eq!(after.group_epoch, described.group_epoch, "no rebalance");
    assert_eq!(
        b.changes().len(),
        b_changes,
        "b saw no change: {:?}",
        b.changes()
    );
    // Records for both to print (a `-f` run that printed nothing exits with status 1).
    produce(&s.conn, "st", 4, 1).await;
    wait_for(&s.notify, "both to print", Duration::from_secs(30), || {
        !a2.records().is_empty() && !b.records().is_empty()
    })
    .await;
    a2.interrupt().await;
    b.interrupt().await;
    s.broker.stop().await.expect("stop");
}
