//! Issue 6.1: SIGKILL the real broker at random moments under concurrent producers, restart
//! it, and check that every acknowledged record is readable exactly once, in order, with the
//! right content and no offset gaps, and that committed group offsets are intact.
//!
//! The default run kills the broker 20 times per ack mode; `cargo test -- --ignored` runs a
//! longer soak (200 kills).

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use acked::Acked;
use bytes::Bytes;
use rill_proto::v1::{self as pb, produce_request::Payload};
use rill_tests::{BrokerProcess, Clients, SIGKILL};

const PARTITIONS: u32 = 4;

/// A tiny deterministic generator (xorshift), so a failing run can be replayed by its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

mod acked {
    //! What producers saw acknowledged, shared between their tasks.
    use std::collections::BTreeMap;
    use std::sync::Mutex;

    /// Acked records per partition: offset → value.
    #[derive(Default)]
    pub struct Acked(pub Mutex<BTreeMap<u32, BTreeMap<u64, String>>>);

    impl Acked {
        pub fn record(&self, partition: u32, base: u64, values: &[String]) {
            let mut all = self.0.lock().unwrap_or_else(|e| e.into_inner());
            let p = all.entry(partition).or_default();
            for (i, v) in values.iter().enumerate() {
                let previous = p.insert(base + i as u64, v.clone());
                assert!(previous.is_none(), "offset {} acked twice", base + i as u64);
            }
        }
    }
}

async fn produce_until_error(
    mut c: Clients,
    partition: u32,
    ack: pb::AckMode,
    first_seq: u64,
    acked: Arc<Acked>,
) -> u64 {
    let mut seq = first_seq;
    loop {
        let values: Vec<String> = (0..10)
            .map(|i| format!("p{partition}-{}", seq + i))
            .collect();
        seq += 10;
        let req = pb::ProduceRequest {
            topic: "crash".into(),
            partition: Some(partition),
            ack: ack as i32,
            payload: Some(Payload::Records(pb::RecordList {
                records: values
                    .iter()
                    .map(|v| pb::Record {
                        value: Bytes::copy_from_slice(v.as_bytes()),
                        key: Some(Bytes::from(format!("k{partition}"))),
                        ..Default::default()
                    })
                    .collect(),
            })),
            ..Default::default()
        };
        match c.log.produce(req).await {
            Ok(resp) => {
                let base = resp.into_inner().appends[0].base_offset;
                acked.record(partition, base, &values);
            }
            Err(_) => return seq,
        }
    }
}

async fn kill_loop(ack: pb::AckMode, kills: usize, seed: u64) {
    let dir = tempfile::tempdir().expect("tempdir");
    let acked = Arc::new(Acked::default());
    let mut rng = Rng(seed);
    let mut next_seq = [0u64; PARTITIONS as usize];
    let mut committed: BTreeMap<u32, u64> = BTreeMap::new();
    for round in 0..kills {
        let broker = BrokerProcess::spawn(dir.path(), &[]).await.expect("spawn");
        let mut c = Clients::connect(broker.url()).await.expect("connect");
        if round == 0 {
            c.admin
                .create_topic(pb::CreateTopicRequest {
                    name: "crash".into(),
                    config: Some(pb::TopicConfig {
                        partitions: PARTITIONS,
                        segment_bytes: Some(64 << 10),
                        ..Default::default()
                    }),
                    ..Default::default()
                })
                .await
                .expect("create");
        }
        // Commit a group offset each round, and remember the last one acknowledged.
        let p = (round as u32) % PARTITIONS;
        let offset = round as u64 * 3;
        c.groups
            .commit_offsets(pb::CommitOffsetsRequest {
                group: "g".into(),
                topic: "crash".into(),
                offsets: vec![pb::PartitionOffset {
                    partition: p,
                    offset,
                    metadata: None,
                }],
                member: None,
            })
            .await
            .expect("commit");
        committed.insert(p, offset);

        let producers: Vec<_> = (0..PARTITIONS)
            .map(|p| {
                tokio::spawn(produce_until_error(
                    c.clone(),
                    p,
                    ack,
                    next_seq[p as usize],
                    Arc::clone(&acked),
                ))
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(20 + rng.below(200))).await;
        let status = broker.signal_and_wait(SIGKILL).await.expect("kill");
        assert!(!status.success(), "killed, not exited");
        for (p, task) in producers.into_iter().enumerate() {
            next_seq[p] = task.await.expect("producer");
        }
    }

    // Restart once more and verify everything.
    let broker = BrokerProcess::spawn(dir.path(), &[]).await.expect("spawn");
    let mut c = Clients::connect(broker.url()).await.expect("connect");
    let acked = acked.0.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let (mut total_acked, mut verified) = (0usize, 0usize);
    for p in 0..PARTITIONS {
        let mut log: Vec<(u64, String)> = Vec::new();
        let mut offset = 0;
        loop {
            let resp = c.fetch("crash", p, offset, 0).await.expect("fetch");
            if resp.records.is_empty() {
                break;
            }
            for r in &resp.records {
                log.push((
                    r.offset,
                    String::from_utf8(r.value.to_vec()).expect("utf-8"),
                ));
            }
            offset = resp.next_offset;
        }
        // No offset gaps: offsets run 0, 1, 2, ...
        for (i, (o, _)) in log.iter().enumerate() {
            assert_eq!(*o, i as u64, "offset gap in partition {p}");
        }
        // Exactly once: no value twice.
        let mut seen = HashSet::new();
        for (_, v) in &log {
            assert!(seen.insert(v.clone()), "{v} appears twice in partition {p}");
        }
        // Every acked record at its acked offset, with its content; order follows.
        let mine = acked.get(&p).cloned().unwrap_or_default();
        total_acked += mine.len();
        let mut last_seq = None;
        for (offset, value) in &mine {
            let stored = log.get(*offset as usize).map(|(_, v)| v.as_str());
            assert_eq!(
                stored,
                Some(value.as_str()),
                "acked record lost or changed at {p}/{offset}"
            );
            let seq: u64 = value
                .rsplit('-')
                .next()
                .and_then(|s| s.parse().ok())
                .expect("seq");
            assert!(
                last_seq.is_none_or(|l| l < seq),
                "order broken in partition {p}"
            );
            last_seq = Some(seq);
            verified += 1;
        }
    }
    for (p, offset) in &committed {
        let got = c
            .groups
            .fetch_offsets(pb::FetchOffsetsRequest {
                group: "g".into(),
                topic: "crash".into(),
                partitions: vec![*p],
            })
            .await
            .expect("offsets")
            .into_inner();
        assert_eq!(
            got.offsets[0].offset,
            Some(*offset),
            "committed offset of partition {p}"
        );
    }
    println!(
        "kill -9 loop ({ack:?} acks): kills {kills}, records acked {total_acked}, \
         records verified {verified}, records lost {}",
        total_acked - verified
    );
    assert!(total_acked > 0, "the producers got acks");
    drop(c);
    assert!(broker.stop().await.expect("stop").success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_loop_with_durable_acks_loses_nothing_acknowledged() {
    kill_loop(pb::AckMode::Durable, 20, 0x9e37_79b9_7f4a_7c15).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_loop_with_leader_acks_loses_nothing_acknowledged() {
    kill_loop(pb::AckMode::Leader, 20, 0x2545_f491_4f6c_dd1d).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "long soak: cargo test -p rill-tests --test crash_kill9 -- --ignored"]
async fn kill_9_soak() {
    kill_loop(pb::AckMode::Durable, 100, 7).await;
    kill_loop(pb::AckMode::Leader, 100, 11).await;
}
