//! Helpers of the real-process group tests: a `rill consume --group` child process whose
//! printed records and ownership changes the test reads, a broker with a topic, producers.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rill_client::{Admin, Connection, Producer, ProducerConfig, ProducerRecord, TopicSettings};
use rill_tests::{binary_path, BrokerProcess};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// One ownership change printed by a consumer.
#[derive(Debug, Clone)]
pub(crate) struct Change {
    pub(crate) what: String,
    pub(crate) partitions: Vec<u32>,
    pub(crate) member: String,
    pub(crate) epoch: i32,
    pub(crate) at_ms: u128,
    pub(crate) line: String,
}

/// What a consumer process printed so far.
#[derive(Debug, Default)]
pub(crate) struct Seen {
    /// (partition, offset, value), in the order printed.
    pub(crate) records: Vec<(u32, u64, String)>,
    /// When each record was read by the test.
    pub(crate) read_at: Vec<Instant>,
    pub(crate) changes: Vec<Change>,
    pub(crate) stderr: Vec<String>,
}

/// A `rill consume --group` child process; killed on drop.
pub(crate) struct ConsumerProc {
    pub(crate) name: String,
    pub(crate) child: Child,
    pub(crate) seen: Arc<Mutex<Seen>>,
    /// Set when the test sends SIGINT (or SIGKILL): the process hands out nothing after it.
    pub(crate) stopped_at_ms: Option<u128>,
}

pub(crate) fn now_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis())
}

pub(crate) fn parse_change(line: &str) -> Option<Change> {
    let mut words = line.split(' ');
    let what = words.next()?.to_string();
    if !["assigned", "revoked", "lost"].contains(&what.as_str()) {
        return None;
    }
    let fields: HashMap<&str, &str> = words.filter_map(|w| w.split_once('=')).collect();
    Some(Change {
        what,
        partitions: fields
            .get("partitions")?
            .split(',')
            .filter(|p| !p.is_empty())
            .map(|p| p.parse().expect("a partition number"))
            .collect(),
        member: fields.get("member")?.to_string(),
        epoch: fields.get("epoch")?.parse().ok()?,
        at_ms: fields.get("at_ms")?.parse().ok()?,
        line: line.to_string(),
    })
}

impl ConsumerProc {
    pub(crate) async fn spawn(
        broker: &str,
        name: &str,
        topic: &str,
        group: &str,
        extra: &[&str],
        notify: &Arc<Notify>,
    ) -> ConsumerProc {
        let mut child = Command::new(binary_path("rill").expect("rill binary"))
            .args(["--broker", broker, "--output", "json", "consume", topic])
            .args(["--group", group, "-f", "-v"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn rill consume");
        let seen = Arc::new(Mutex::new(Seen::default()));
        let stdout = child.stdout.take().expect("stdout");
        let (s, n) = (Arc::clone(&seen), Arc::clone(notify));
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let v: serde_json::Value = serde_json::from_str(&line).expect("a JSON record");
                let record = (
                    v["partition"].as_u64().expect("partition") as u32,
                    v["offset"].as_u64().expect("offset"),
                    v["value"].as_str().expect("value").to_string(),
                );
                let mut seen = s.lock().expect("seen");
                seen.records.push(record);
                seen.read_at.push(Instant::now());
                drop(seen);
                n.notify_waiters();
            }
        });
        let stderr = child.stderr.take().expect("stderr");
        let (s, n) = (Arc::clone(&seen), Arc::clone(notify));
        tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let mut seen = s.lock().expect("seen");
                if let Some(change) = parse_change(&line) {
                    seen.changes.push(change);
                }
                seen.stderr.push(line);
                drop(seen);
                n.notify_waiters();
            }
        });
        ConsumerProc {
            name: name.to_string(),
            child,
            seen,
            stopped_at_ms: None,
        }
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id().expect("running")
    }

    /// The partitions owned now, by the printed changes.
    pub(crate) fn owned(&self) -> BTreeSet<u32> {
        let mut owned = BTreeSet::new();
        for c in &self.seen.lock().expect("seen").changes {
            match c.what.as_str() {
                "assigned" => owned.extend(&c.partitions),
                _ => c.partitions.iter().for_each(|p| {
                    owned.remove(p);
                }),
            }
        }
        owned
    }

    pub(crate) fn records(&self) -> Vec<(u32, u64, String)> {
        self.seen.lock().expect("seen").records.clone()
    }

    /// How many records of `partition` were read in `from..to`.
    pub(crate) fn read_between(&self, partition: u32, from: Instant, to: Instant) -> usize {
        let seen = self.seen.lock().expect("seen");
        seen.records
            .iter()
            .zip(&seen.read_at)
            .filter(|((p, _, _), &at)| *p == partition && at >= from && at < to)
            .count()
    }

    pub(crate) fn changes(&self) -> Vec<Change> {
        self.seen.lock().expect("seen").changes.clone()
    }

    pub(crate) fn stderr(&self) -> String {
        self.seen.lock().expect("seen").stderr.join("\n")
    }

    pub(crate) fn signal(&mut self, signal: &str) {
        if matches!(signal, "INT" | "KILL") {
            self.stopped_at_ms = Some(now_ms());
        }
        let status = std::process::Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status()
            .expect("kill");
        assert!(status.success(), "kill -{signal} {}", self.name);
    }

    /// SIGINT (Ctrl-C: commit what was printed, leave) and the exit, which must be clean.
    pub(crate) async fn interrupt(&mut self) {
        self.signal("INT");
        let status = tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .expect("exits within 30 s")
            .expect("wait");
        assert!(
            status.success(),
            "{} exited with {status}:\n{}",
            self.name,
            self.stderr()
        );
    }

    pub(crate) async fn kill9(&mut self) {
        self.signal("KILL");
        tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .expect("exits within 30 s")
            .expect("wait");
    }
}

/// Waits until `cond` holds, woken by every line any consumer prints; fails after `limit`.
pub(crate) async fn wait_for(
    notify: &Notify,
    what: &str,
    limit: Duration,
    mut cond: impl FnMut() -> bool,
) {
    let deadline = Instant::now() + limit;
    loop {
        let woken = notify.notified();
        tokio::pin!(woken);
        woken.as_mut().enable();
        if cond() {
            return;
        }
        if tokio::time::timeout_at(deadline, woken).await.is_err() {
            assert!(cond(), "gave up after {limit:?} waiting for {what}");
            return;
        }
    }
}

pub(crate) struct Setup {
    pub(crate) broker: BrokerProcess,
    pub(crate) _dir: tempfile::TempDir,
    pub(crate) conn: Connection,
    pub(crate) notify: Arc<Notify>,
}

pub(crate) async fn setup(topic: &str, partitions: u32) -> Setup {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = BrokerProcess::spawn(dir.path(), &[]).await.expect("broker");
    let conn = Connection::connect(&broker.addr().to_string())
        .await
        .expect("connect");
    Admin::new(conn.clone())
        .create_topic(topic, TopicSettings::new().partitions(partitions))
        .await
        .expect("create");
    Setup {
        broker,
        _dir: dir,
        conn,
        notify: Arc::new(Notify::new()),
    }
}

pub(crate) async fn produce(conn: &Connection, topic: &str, partitions: u32, per_partition: u64) {
    let producer = Producer::new(conn.clone(), ProducerConfig::new());
    for i in 0..per_partition {
        for p in 0..partitions {
            producer
                .send(ProducerRecord::new(topic, format!("p{p}-{i}")).partition(p))
                .await
                .expect("send");
        }
    }
    producer.flush().await.expect("flush");
}

pub(crate) async fn committed(
    conn: &Connection,
    group: &str,
    topic: &str,
    partitions: &[u32],
) -> BTreeMap<u32, Option<u64>> {
    Admin::new(conn.clone())
        .fetch_offsets(group, topic, partitions)
        .await
        .expect("fetch offsets")
        .into_iter()
        .map(|c| (c.partition, c.offset))
        .collect()
}

/// Records printed per partition: offset → how many times.
pub(crate) fn counts(records: &[(u32, u64, String)]) -> BTreeMap<(u32, u64), usize> {
    let mut out = BTreeMap::new();
    for (p, o, _) in records {
        *out.entry((*p, *o)).or_insert(0) += 1;
    }
    out
}

/// Produces to every partition of `topic`, round robin, until `stop`; returns each partition's
/// end offset.
pub(crate) fn keep_producing(
    conn: &Connection,
    topic: &'static str,
    partitions: u32,
    stop: &CancellationToken,
) -> tokio::task::JoinHandle<BTreeMap<u32, u64>> {
    let (conn, stop) = (conn.clone(), stop.clone());
    tokio::spawn(async move {
        let producer = Producer::new(conn, ProducerConfig::new());
        let mut ends = BTreeMap::<u32, u64>::new();
        let mut i = 0u64;
        while !stop.is_cancelled() {
            let p = (i % u64::from(partitions)) as u32;
            let (_, offset) = producer
                .send_and_wait(ProducerRecord::new(topic, format!("{topic}{i}")).partition(p))
                .await
                .expect("produce");
            ends.insert(p, offset + 1);
            i += 1;
        }
        ends
    })
}
