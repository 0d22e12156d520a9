//! The harness for real `rill-broker` processes, shared by the end-to-end tests (`tests/`)
//! and the load generator (`benches/`), so both start, wait for and stop a broker the same
//! way.
//!
//! It depends on no Rill crate: it runs the binary and reads the line the binary prints when
//! it listens. That keeps the dependency arrows pointing down (nothing but the tests crate
//! links the broker library).
//!
//! # The map
//! - [`BrokerProcess`]: a child `rill-broker` on 127.0.0.1 (port 0 by default), killed and
//!   reaped on drop; graceful stop (SIGTERM) or crash (SIGKILL) by its own handle.
//! - [`binary_path`]: a workspace binary built on demand with the caller's cargo and profile
//!   (for tests run by `cargo test`); [`sibling_binary`]: the one beside the running
//!   executable, not built (for `rill-bench`, which runs without cargo).
//! - [`SIGKILL`], [`SIGTERM`]: the signals the harness sends.
//! - [`proxy`]: [`NetFaults`], fault-injecting TCP proxies between brokers (network
//!   partitions: cut a direction, drop its connections, heal; or blackhole it, silently, with
//!   its connections held open and forwarding nothing until healed).

pub mod proxy;

pub use proxy::NetFaults;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;

/// How long a starting broker may take to print its address: opening the store, with the
/// recovery of every partition after a crash.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a signalled broker may take to exit.
const EXIT_TIMEOUT: Duration = Duration::from_secs(60);
/// The line the broker prints on stdout once it listens, followed by the address.
const LISTENING_PREFIX: &str = "rill-broker listening on ";
/// The line the broker prints before that one when it serves metrics, followed by the
/// metrics listener's address.
pub const METRICS_PREFIX: &str = "rill-broker metrics listening on ";

/// SIGKILL: a crash, no cleanup.
pub const SIGKILL: i32 = 9;
/// SIGTERM: a graceful stop.
pub const SIGTERM: i32 = 15;

/// The folder of the running executable, with cargo's `deps/` (where test binaries live)
/// stepped out of, so it is the profile folder that holds the workspace's binaries.
fn profile_dir() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the running executable")?;
    let mut dir = exe
        .parent()
        .context("the running executable has no folder")?
        .to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    Ok(dir)
}

/// The path of workspace binary `name` beside the running executable (same profile), without
/// building it. Fails, saying how to build it, if it is not there.
pub fn sibling_binary(name: &str) -> Result<PathBuf> {
    let path = profile_dir()?.join(name);
    if !path.exists() {
        bail!("{} not found: build it first", path.display());
    }
    Ok(path)
}

/// The path of a binary of this workspace (`rill-broker`, or the CLI `rill`), built on demand:
/// `cargo test` builds only the test targets of other packages, so the first test that needs
/// a binary builds it with the same cargo and profile.
///
/// It is built as `cargo build --workspace --tests --bin NAME`, so that cargo resolves the
/// same features as `cargo test --workspace` (every member, dev-dependencies included) and the
/// binary links against the libraries that test build already compiled. Built alone (`-p
/// rill-broker`), the binary gets other features (tokio without the dev-dependencies'
/// `test-util`, for one), and cargo compiled tokio and everything above it (hyper, tonic,
/// openraft, the broker) once more for each of the two binaries: about 190 s of a clean
/// clone's CI run on 2 cores. The test targets `--tests` names are the ones `cargo test
/// --workspace` has just built, so under it they are fresh; after `cargo test -p rill-tests
/// --test X` on a clean tree they are built once.
///
/// Cargo is asked once per binary and test process: the sources do not change during a run,
/// and a cluster test that kills and restarts brokers would otherwise run `cargo build` (and
/// wait for its lock) before every restart.
pub fn binary_path(name: &str) -> Result<PathBuf> {
    /// The binaries built by this process so far, guarding the builds too.
    static BUILT: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    let dir = profile_dir()?;
    let path = dir.join(name);
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    if built.iter().any(|b| b == name) && path.exists() {
        return Ok(path);
    }
    let release = dir.file_name().is_some_and(|n| n == "release");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    let mut cmd = std::process::Command::new(cargo);
    cmd.args(["build", "--quiet", "--workspace", "--tests", "--bin", name]);
    // The variables cargo sets for a running test describe the test's own package. A build
    // script that tracks one (ring's tracks `CARGO_MANIFEST_DIR`) would see it change between
    // this build and the `cargo test` that started the test, and each would rebuild it and
    // everything above it (TLS, the broker) for the other.
    for (key, _) in std::env::vars_os() {
        let tracked = key.to_str().is_some_and(|k| {
            k.starts_with("CARGO_PKG_")
                || matches!(
                    k,
                    "CARGO_MANIFEST_DIR"
                        | "CARGO_MANIFEST_PATH"
                        | "CARGO_MANIFEST_LINKS"
                        | "CARGO_CRATE_NAME"
                        | "CARGO_BIN_NAME"
                        | "CARGO_PRIMARY_PACKAGE"
                        | "CARGO_TARGET_TMPDIR"
                )
        });
        if tracked {
            cmd.env_remove(key);
        }
    }
    if release {
        cmd.arg("--release");
    }
    // Ask cargo the first time: it is a no-op when the binary is fresh, and rebuilds a stale one.
    let status = cmd.status().context("running cargo build")?;
    if !status.success() || !path.exists() {
        bail!("could not build {} ({status})", path.display());
    }
    built.push(name.to_string());
    Ok(path)
}

/// The real `rill-broker` binary, running as a child process. Dropping it kills and reaps
/// the child; [`BrokerProcess::stop`] stops it gracefully.
pub struct BrokerProcess {
    child: Child,
    addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
    stdout_tail: JoinHandle<Vec<String>>,
}

impl BrokerProcess {
    /// Starts the workspace's binary (built on demand, see [`binary_path`]) on `data_dir`,
    /// listening on 127.0.0.1:0, and waits for the line that names the bound address.
    pub async fn spawn(data_dir: &Path, extra_args: &[&str]) -> Result<BrokerProcess> {
        Self::spawn_at(data_dir, "127.0.0.1:0", extra_args).await
    }

    /// Starts the workspace's binary on `data_dir` listening on `listen` (to restart on the
    /// same port).
    pub async fn spawn_at(
        data_dir: &Path,
        listen: &str,
        extra_args: &[&str],
    ) -> Result<BrokerProcess> {
        let binary = binary_path("rill-broker")?;
        Self::spawn_binary(&binary, data_dir, listen, extra_args).await
    }

    /// Starts the broker binary at `binary` on `data_dir` listening on `listen`, with
    /// `extra_args` after those, and waits (at most a minute) for the line that names the
    /// bound address. Its stdout is drained from then on, so it never blocks on a full pipe;
    /// its stderr (the logs, at `RUST_LOG` or `warn`) goes to ours.
    pub async fn spawn_binary(
        binary: &Path,
        data_dir: &Path,
        listen: &str,
        extra_args: &[&str],
    ) -> Result<BrokerProcess> {
        let mut child = Command::new(binary)
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
            .with_context(|| format!("spawning {}", binary.display()))?;
        let stdout = child.stdout.take().context("no stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let mut metrics_addr = None;
        let addr = tokio::time::timeout(START_TIMEOUT, async {
            while let Some(line) = lines.next_line().await? {
                if let Some(addr) = line.strip_prefix(METRICS_PREFIX) {
                    metrics_addr = Some(addr.trim().parse::<SocketAddr>()?);
                }
                if let Some(addr) = line.strip_prefix(LISTENING_PREFIX) {
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
            metrics_addr,
            stdout_tail,
        })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The metrics listener's address, when the broker was started with `--metrics-listen`.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// `http://ADDR`, for gRPC clients.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The child's pid (`None` once it has been reaped).
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Sends a signal (SIGTERM for a graceful stop, SIGKILL for a crash) and waits (at most a
    /// minute) for the exit.
    pub async fn signal_and_wait(mut self, signal: i32) -> Result<std::process::ExitStatus> {
        if let Some(pid) = self.child.id() {
            send_signal(pid, signal)?;
        }
        let status = tokio::time::timeout(EXIT_TIMEOUT, self.child.wait())
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

/// Sends `signal` to `pid` with the `kill` command rather than FFI: the harness needs no
/// unsafe code.
fn send_signal(pid: u32, signal: i32) -> Result<()> {
    let status = std::process::Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .context("running kill")?;
    if !status.success() {
        bail!("kill -{signal} {pid} failed ({status})");
    }
    Ok(())
}
