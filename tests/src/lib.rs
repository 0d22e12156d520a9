//! End-to-end test harness: a real broker on 127.0.0.1 port 0, in this process or as the
//! `rill-broker` binary, and helpers for the real client and CLI.
//!
//! Every broker a test starts is stopped by the test's own handle: [`TestBroker`] cancels
//! and awaits its server on [`TestBroker::stop`] (and cancels on drop); [`BrokerProcess`]
//! kills and reaps its child on drop. Data folders are temp folders removed on drop.

pub mod cluster;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tempfile::TempDir;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
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

/// The path of a binary of this workspace (`rill-broker` from package `rill-broker`, `rill`
/// from `rill-client`), built on demand: `cargo test` builds only the test targets of other
/// packages, so the first test that needs a binary builds it with the same cargo and profile.
pub fn binary_path(package: &str, name: &str) -> Result<PathBuf> {
    static BUILD: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let exe = std::env::current_exe()?;
    let mut dir = exe
        .parent()
        .context("test binary has no folder")?
        .to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let path = dir.join(name);
    let _guard = BUILD.lock().unwrap_or_else(|e| e.into_inner());
    let release = dir.file_name().is_some_and(|n| n == "release");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    let mut cmd = std::process::Command::new(cargo);
    cmd.args(["build", "--quiet", "-p", package, "--bin", name]);
    if release {
        cmd.arg("--release");
    }
    // Always ask cargo: it is a no-op when the binary is fresh, and rebuilds a stale one.
    let status = cmd.status().context("running cargo build")?;
    if !status.success() || !path.exists() {
        bail!("could not build {} ({status})", path.display());
    }
    Ok(path)
}

/// The real `rill-broker` binary, running as a child process.
pub struct BrokerProcess {
    child: Child,
    addr: SocketAddr,
    stdout_tail: JoinHandle<Vec<String>>,
}

impl BrokerProcess {
    /// Starts the binary on `data_dir`, listening on 127.0.0.1:0, and waits for the line that
    /// names the bound address.
    pub async fn spawn(data_dir: &Path, extra_args: &[&str]) -> Result<BrokerProcess> {
        Self::spawn_at(data_dir, "127.0.0.1:0", extra_args).await
    }

    /// Starts the binary on `data_dir` listening on `listen` (to restart on the same port).
    pub async fn spawn_at(
        data_dir: &Path,
        listen: &str,
        extra_args: &[&str],
    ) -> Result<BrokerProcess> {
        let mut child = Command::new(binary_path("rill-broker", "rill-broker")?)
            .arg("--data-dir")
            .arg(data_dir)
            .arg("--listen")
            .arg(listen)
            .args(extra_args)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context("spawning rill-broker")?;
        let stdout = child.stdout.take().context("no stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let addr = tokio::time::timeout(Duration::from_secs(60), async {
            while let Some(line) = lines.next_line().await? {
                if let Some(addr) = line.strip_prefix("rill-broker listening on ") {
                    return Ok::<_, anyhow::Error>(addr.trim().parse::<SocketAddr>()?);
                }
            }
            bail!("rill-broker exited before listening")
        })
        .await
        .context("waiting for rill-broker to listen")??;
        let stdout_tail = tokio::spawn(async move {
            let mut rest = Vec::new();
            while let Ok(Some(line)) = lines.next_line().await {
                rest.push(line);
            }
            rest
        });
        Ok(BrokerProcess {
            child,
            addr,
            stdout_tail,
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

    /// The child's pid.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Sends a signal (SIGTERM for a graceful stop, SIGKILL for a crash) and waits for exit.
    pub async fn signal_and_wait(mut self, signal: i32) -> Result<std::process::ExitStatus> {
        if let Some(pid) = self.child.id() {
            let rc = send_signal(pid, signal);
            if rc != 0 {
                bail!("kill({pid}, {signal}) failed");
            }
        }
        let status = tokio::time::timeout(Duration::from_secs(60), self.child.wait())
            .await
            .context("broker did not exit")??;
        let _ = (&mut self.stdout_tail).await;
        Ok(status)
    }

    /// Stops the broker gracefully (SIGTERM) and waits for it.
    pub async fn stop(self) -> Result<std::process::ExitStatus> {
        self.signal_and_wait(SIGTERM).await
    }
}

/// SIGKILL.
pub const SIGKILL: i32 = 9;
/// SIGTERM.
pub const SIGTERM: i32 = 15;

fn send_signal(pid: u32, signal: i32) -> i32 {
    // Use the `kill` command rather than FFI: tests need no unsafe code.
    match std::process::Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
    {
        Ok(s) if s.success() => 0,
        _ => -1,
    }
}

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
                ack: 0,
                payload: Some(rill_proto::v1::produce_request::Payload::Records(
                    rill_proto::v1::RecordList { records },
                )),
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
    let mut child = Command::new(binary_path("rill-client", "rill")?)
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
    }
}
