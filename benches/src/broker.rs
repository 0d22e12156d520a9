//! Starting a `rill-broker` process for a run, on a temp folder removed afterwards.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// A broker this run started; killed and reaped, and its folder removed, on drop.
pub struct OwnBroker {
    child: Child,
    /// Its address.
    pub addr: SocketAddr,
    _dir: tempfile::TempDir,
}

/// The `rill-broker` binary beside this one (same profile), or `RILL_BROKER_BIN`.
fn broker_binary() -> Result<PathBuf> {
    if let Ok(p) = std::env::var("RILL_BROKER_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe()?;
    let path = exe.with_file_name("rill-broker");
    if !path.exists() {
        bail!(
            "{} not found: build it with `cargo build --release -p rill-broker`, or pass --broker ADDR",
            path.display()
        );
    }
    Ok(path)
}

impl OwnBroker {
    /// Starts the broker on a new temp folder with `extra` flags and waits until it listens.
    pub async fn start(extra: &[String]) -> Result<OwnBroker> {
        let dir = tempfile::Builder::new().prefix("rill-bench.").tempdir()?;
        let mut child = Command::new(broker_binary()?)
            .arg("--data-dir")
            .arg(dir.path())
            .args(["--listen", "127.0.0.1:0"])
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("starting rill-broker")?;
        let stdout = child.stdout.take().context("no stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let addr = tokio::time::timeout(Duration::from_secs(60), async {
            while let Some(line) = lines.next_line().await? {
                if let Some(a) = line.strip_prefix("rill-broker listening on ") {
                    return Ok::<SocketAddr, anyhow::Error>(a.trim().parse()?);
                }
            }
            bail!("rill-broker exited before listening")
        })
        .await
        .context("waiting for rill-broker")??;
        // Keep draining its stdout so it never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(OwnBroker {
            child,
            addr,
            _dir: dir,
        })
    }

    /// Stops it with SIGTERM (a clean shutdown) and waits.
    pub async fn stop(mut self) -> Result<()> {
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill")
                .arg(pid.to_string())
                .status();
        }
        tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await??;
        Ok(())
    }
}
