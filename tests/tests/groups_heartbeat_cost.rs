//! A figure, not a check: the broker's CPU while 1,000 members in 100 groups heartbeat at
//! their interval (5 s with the default 45 s session timeout). Ignored by default; run with
//! `cargo test --release -p rill-tests --test groups_heartbeat_cost -- --ignored --nocapture`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rill_proto::v1 as pb;
use rill_tests::{BrokerProcess, Clients};
use tokio::time::Instant;

const GROUPS: usize = 100;
const MEMBERS_PER_GROUP: usize = 10;
const MEASURE: Duration = Duration::from_secs(20);

/// The process's user + system CPU time, from /proc (in clock ticks of 10 ms).
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read stat");
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields[11].parse().expect("utime");
    let stime: u64 = fields[12].parse().expect("stime");
    utime + stime
}

#[tokio::test]
#[ignore = "a figure for BENCHMARKS.md, not a check"]
async fn heartbeat_cost_of_1000_members_in_100_groups() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = BrokerProcess::spawn(dir.path(), &[]).await.expect("broker");
    let pid = broker.pid().expect("pid");
    let mut c = Clients::connect(broker.url()).await.expect("connect");
    c.create_topic("t", 12).await.expect("create");
    let deadline = Instant::now() + Duration::from_secs(15) + MEASURE;
    let mut tasks = Vec::new();
    // Heartbeats sent while the broker's CPU is measured.
    let measuring = Arc::new(AtomicBool::new(false));
    let measured = Arc::new(AtomicU64::new(0));
    for g in 0..GROUPS {
        for _ in 0..MEMBERS_PER_GROUP {
            let mut groups = c.groups.clone();
            let (measuring, measured) = (Arc::clone(&measuring), Arc::clone(&measured));
            tasks.push(tokio::spawn(async move {
                let group = format!("g{g}");
                let mut r = groups
                    .group_heartbeat(pb::GroupHeartbeatRequest {
                        group: group.clone(),
                        member_id: String::new(),
                        member_epoch: 0,
                        instance_id: None,
                        subscribed_topics: Some(pb::TopicList {
                            topics: vec!["t".into()],
                        }),
                        owned_partitions: None,
                        session_timeout_ms: None,
                        rebalance_timeout_ms: None,
                        assignor: None,
                    })
                    .await
                    .expect("join")
                    .into_inner();
                let mut beats = 0u64;
                while Instant::now() < deadline {
                    // Quick rounds while reconciling, then the broker's interval.
                    let wait = if r.reconciling {
                        50
                    } else {
                        u64::from(r.heartbeat_interval_ms)
                    };
                    tokio::time::sleep(Duration::from_millis(wait)).await;
                    r = groups
                        .group_heartbeat(pb::GroupHeartbeatRequest {
                            group: group.clone(),
                            member_id: r.member_id.clone(),
                            member_epoch: r.member_epoch,
                            instance_id: None,
                            subscribed_topics: None,
                            owned_partitions: r.assignment.clone(),
                            session_timeout_ms: None,
                            rebalance_timeout_ms: None,
                            assignor: None,
                        })
                        .await
                        .expect("beat")
                        .into_inner();
                    beats += 1;
                    if measuring.load(Ordering::Relaxed) {
                        measured.fetch_add(1, Ordering::Relaxed);
                    }
                }
                beats
            }));
        }
    }
    // Let the joins settle, then measure the steady state.
    tokio::time::sleep(Duration::from_secs(15)).await;
    let start = cpu_ticks(pid);
    let started = Instant::now();
    measuring.store(true, Ordering::Relaxed);
    tokio::time::sleep(MEASURE).await;
    measuring.store(false, Ordering::Relaxed);
    let ticks = cpu_ticks(pid) - start;
    let secs = started.elapsed().as_secs_f64();
    let mut beats = 0;
    for t in tasks {
        beats += t.await.expect("member task");
    }
    println!(
        "heartbeat cost: {} members in {GROUPS} groups, {beats} heartbeats in total, {} ({:.0}/s) while measured; broker CPU {:.2}% of one core over {secs:.1} s of steady state",
        GROUPS * MEMBERS_PER_GROUP,
        measured.load(Ordering::Relaxed),
        measured.load(Ordering::Relaxed) as f64 / secs,
        ticks as f64 / 100.0 / secs * 100.0
    );
    broker.stop().await.expect("stop");
}
