//! End-to-end test harness: a real broker on 127.0.0.1 port 0, in this process or as the
//! `rill-broker` binary, and helpers for the real client and CLI.
//!
//! Every broker a test starts is stopped by the test's own handle: [`TestBroker`] cancels
//! and awaits its server on [`TestBroker::stop`] (and cancels on drop); [`BrokerProcess`]
//! kills and reaps its child on drop. Data folders are temp folders removed on drop.
//!
//! # The map
//! - [`TestBroker`]: a broker inside the test process (the `rill-broker` library).
//! - [`BrokerProcess`], [`binary_path`], [`SIGKILL`], [`SIGTERM`]: the real binary as a child
//!   process; re-exported from `rill-testkit`, which `rill-bench` shares.
//! - [`Clients`]: the raw generated gRPC clients, for tests of the wire contract.
//! - [`rill_cli`]: the real `rill` CLI.
//! - [`record`], [`produce_req`]: request builders.
//! - [`wait_until`]: a wait on a condition with a deadline; [`skip`]: a loud, detectable skip.
//! - [`certs`]: a test CA and its certificates (rcgen); [`cluster`]: a cluster of processes
//!   (its submodules: starting brokers and ports, faults (kill, signals, wipe, partitions),
//!   and status queries and waits); [`hooks`]: a local HTTP server for webhook tests;
//!   [`subs`]: subscription calls on a cluster, retried through elections, and topics placed
//!   away from a broker.
//! - [`scrape`]: a broker's `/metrics`, fetched and parsed.

pub mod certs;
pub mod cluster;
pub mod hooks;
pub mod scrape;
pub mod subs;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tempfile::TempDir;
use tokio::process::Command;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// A broker running inside the test process, on a fresh temp folder (or a given one).
pub struct TestBroker {
    addr: SocketAddr,
    shutdown: CancellationToken,
    handle: Option<JoinHandle<Result<()>>>,
    dir: Option<TempDir>,
    data_dir: PathBuf,
    broker: rill_broker::Broker,
}

impl TestBroker {
    /// Starts a broker with default settings on a new temp folder.
    pub async fn start() -> Result<TestBroker> {
        let dir = tempfile::tempdir()?;
        let config = rill_broker::Config::new(dir.path());
        Self::start_with(config, Some(dir)).await
    }

    /// Starts a broker with `config` (its listen address is forced to 127.0.0.1:0). `dir`, if
    /// given, is kept alive (and removed) with the broker.
    pub async fn start_with(
        config: rill_broker::Config,
        dir: Option<TempDir>,
    ) -> Result<TestBroker> {
        let config = config.listen(SocketAddr::from(([127, 0, 0, 1], 0)));
        let data_dir = config.data_dir.clone();
        let shutdown = CancellationToken::new();
        let server = rill_broker::Server::bind(config, shutdown.clone()).await?;
        let addr = server.local_addr();
        let broker = server.broker().clone();
        let handle = tokio::spawn(server.serve());
        Ok(TestBroker {
            addr,
            shutdown,
            handle: Some(handle),
            dir,
            data_dir,
            broker,
        })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR`, for gRPC clients.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The data folder.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The broker's shared state.
    pub fn broker(&self) -> &rill_broker::Broker {
        &self.broker
    }

    /// Stops the broker gracefully and waits for it; returns the temp folder so a test can
    /// restart on the same data.
    pub async fn stop(mut self) -> Result<Option<TempDir>> {
        self.shutdown.cancel();
        if let Some(handle) = self.handle.take() {
            handle.await.context("broker task panicked")??;
        }
        Ok(self.dir.take())
    }
}

impl Drop for TestBroker {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

// The broker-process harness is shared with `rill-bench`; it lives in `rill-testkit` and is
// re-exported here under the names the tests use.
pub use rill_testkit::{binary_path, BrokerProcess, SIGKILL, SIGTERM};

/// Raw generated gRPC clients on one channel, for tests of the wire contract itself.
#[derive(Clone)]
pub struct Clients {
    /// `rill.v1.Log`.
    pub log: rill_proto::v1::log_client::LogClient<tonic::transport::Channel>,
    /// `rill.v1.Groups`.
    pub groups: rill_proto::v1::groups_client::GroupsClient<tonic::transport::Channel>,
    /// `rill.v1.Admin`.
    pub admin: rill_proto::v1::admin_client::AdminClient<tonic::transport::Channel>,
    /// The channel, for other clients (health, reflection).
    pub channel: tonic::transport::Channel,
}

impl Clients {
    /// Connects to `url` (`http://ADDR`).
    pub async fn connect(url: String) -> Result<Clients> {
        let channel = tonic::transport::Endpoint::from_shared(url)?
            .tcp_nodelay(true)
            .connect()
            .await?;
        let limit = 64 << 20;
        Ok(Clients {
            log: rill_proto::v1::log_client::LogClient::new(channel.clone())
                .max_decoding_message_size(limit)
                .max_encoding_message_size(limit),
            groups: rill_proto::v1::groups_client::GroupsClient::new(channel.clone()),
            admin: rill_proto::v1::admin_client::AdminClient::new(channel.clone()),
            channel,
        })
    }

    /// Creates a topic with `partitions` partitions and otherwise default settings.
    pub async fn create_topic(&mut self, name: &str, partitions: u32) -> Result<()> {
        self.admin
            .create_topic(rill_proto::v1::CreateTopicRequest {
                name: name.into(),
                config: Some(rill_proto::v1::TopicConfig {
                    partitions,
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await?;
        Ok(())
    }

    /// Produces `values` (no keys) to one partition and returns the base offset.
    pub async fn produce_values(
        &mut self,
        topic: &str,
        partition: u32,
        values: &[&str],
    ) -> Result<u64> {
        self.produce_values_acked(topic, partition, values, None)
            .await
    }

    /// [`Clients::produce_values`] with ack mode `ack` (`None`: the broker's default).
    pub async fn produce_values_acked(
        &mut self,
        topic: &str,
        partition: u32,
        values: &[&str],
        ack: Option<rill_proto::v1::AckMode>,
    ) -> Result<u64> {
        let records = values
            .iter()
            .map(|v| rill_proto::v1::Record {
                value: bytes::Bytes::copy_from_slice(v.as_bytes()),
                ..Default::default()
            })
            .collect();
        let resp = self
            .log
            .produce(rill_proto::v1::ProduceRequest {
                topic: topic.into(),
                partition: Some(partition),
                ack: ack.map_or(0, |a| a as i32),
                payload: Some(rill_proto::v1::produce_request::Payload::Records(
                    rill_proto::v1::RecordList { records },
                )),
                ..Default::default()
            })
            .await?
            .into_inner();
        Ok(resp.appends.first().map_or(0, |a| a.base_offset))
    }

    /// Fetches from `offset` with the given wait and returns the response.
    pub async fn fetch(
        &mut self,
        topic: &str,
        partition: u32,
        offset: u64,
        max_wait_ms: u32,
    ) -> std::result::Result<rill_proto::v1::FetchResponse, tonic::Status> {
        self.log
            .fetch(rill_proto::v1::FetchRequest {
                topic: topic.into(),
                partition,
                offset,
                max_wait_ms,
                ..Default::default()
            })
            .await
            .map(tonic::Response::into_inner)
    }
}

/// Runs the real `rill` CLI against `broker` with `args`, feeding `stdin`; returns
/// (exit success, stdout, stderr).
pub async fn rill_cli(broker: &str, args: &[&str], stdin: &str) -> Result<(bool, String, String)> {
    use tokio::io::AsyncWriteExt;
    let mut child = Command::new(binary_path("rill")?)
        .arg("--broker")
        .arg(broker)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("spawning rill")?;
    let mut input = child.stdin.take().context("no stdin")?;
    input.write_all(stdin.as_bytes()).await?;
    drop(input);
    let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .context("rill did not finish")??;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// A protobuf record with an optional key, a value, a timestamp and headers.
pub fn record(
    key: Option<&str>,
    value: &str,
    ts: Option<i64>,
    headers: &[(&str, &str)],
) -> rill_proto::v1::Record {
    rill_proto::v1::Record {
        key: key.map(|k| bytes::Bytes::copy_from_slice(k.as_bytes())),
        value: bytes::Bytes::copy_from_slice(value.as_bytes()),
        headers: headers
            .iter()
            .map(|(k, v)| rill_proto::v1::Header {
                key: k.to_string(),
                value: bytes::Bytes::copy_from_slice(v.as_bytes()),
            })
            .collect(),
        timestamp_ms: ts,
    }
}

/// A leader-acked produce request of protobuf records.
pub fn produce_req(
    topic: &str,
    partition: Option<u32>,
    records: Vec<rill_proto::v1::Record>,
) -> rill_proto::v1::ProduceRequest {
    rill_proto::v1::ProduceRequest {
        topic: topic.into(),
        partition,
        ack: rill_proto::v1::AckMode::Leader as i32,
        payload: Some(rill_proto::v1::produce_request::Payload::Records(
            rill_proto::v1::RecordList { records },
        )),
        ..Default::default()
    }
}

/// Polls `cond` until it holds, yielding to the runtime between polls (for state that has no
/// event to await, such as the broker's count of waiting fetches). Fails, naming `what`, once
/// `limit` has passed: every wait in a test has a deadline instead of hanging.
pub async fn wait_until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) -> Result<()> {
    let start = std::time::Instant::now();
    while !cond() {
        if start.elapsed() >= limit {
            bail!("gave up after {limit:?} waiting for {what}");
        }
        tokio::task::yield_now().await;
    }
    Ok(())
}

/// Declares that `test` cannot run on this machine, and why, so it can return early without
/// passing silently:
/// - if the environment variable `required_by` is `1`, this machine is meant to run it, so
///   this panics and the test fails (`.ci/run` sets `RILL_REQUIRE_TMPFS=1` when it runs as
///   root);
/// - otherwise it writes `SKIPPED` to the real stderr, which `cargo test` does not capture,
///   and appends a line to the file named by `RILL_SKIPPED_FILE`, if set, which `.ci/run`
///   lists at the end of its run.
pub fn skip(test: &str, why: &str, required_by: &str) {
    use std::io::Write;
    if std::env::var(required_by).is_ok_and(|v| v == "1") {
        panic!("{test} must run here ({required_by}=1) but cannot: {why}");
    }
    let line = format!("SKIPPED {test}: {why} (set {required_by}=1 to make this a failure)");
    // `eprintln!` is captured by the test harness and shown only on failure; a direct write
    // to the process's stderr is not.
    let _ = writeln!(std::io::stderr().lock(), "\n*** {line} ***\n");
    if let Ok(path) = std::env::var("RILL_SKIPPED_FILE") {
        let appended = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .and_then(|mut f| writeln!(f, "{line}"));
        if let Err(e) = appended {
            panic!("{line}; and it could not be recorded in {path}: {e}");
        }
    }
}
