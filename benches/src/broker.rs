//! Starting a `rill-broker` process for a run, on a temp folder removed afterwards. The
//! process itself is run by `rill-testkit`'s [`BrokerProcess`], the harness the end-to-end
//! tests use too.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use rill_testkit::BrokerProcess;

/// A broker this run started; killed and reaped, and its folder removed, on drop.
pub struct OwnBroker {
    process: BrokerProcess,
    // Dropped after the process: the folder outlives the broker that uses it.
    _dir: tempfile::TempDir,
}

/// The `rill-broker` binary beside this one (same profile), or `RILL_BROKER_BIN`. Not built
/// here: `rill-bench` runs without cargo (`benches/compare.sh` builds both first).
fn broker_binary() -> Result<PathBuf> {
    if let Ok(p) = std::env::var("RILL_BROKER_BIN") {
        return Ok(PathBuf::from(p));
    }
    rill_testkit::sibling_binary("rill-broker")
        .context("`cargo build --release -p rill-broker`, or pass --broker ADDR")
}

impl OwnBroker {
    /// Starts the broker on a new temp folder with `extra` flags and waits until it listens.
    pub async fn start(extra: &[&str]) -> Result<OwnBroker> {
        // `benches/compare.sh` recognises a leftover broker by this folder prefix.
        let dir = tempfile::Builder::new().prefix("rill-bench.").tempdir()?;
        let process =
            BrokerProcess::spawn_binary(&broker_binary()?, dir.path(), "127.0.0.1:0", extra)
                .await?;
        Ok(OwnBroker { process, _dir: dir })
    }

    /// Its address.
    pub fn addr(&self) -> SocketAddr {
        self.process.addr()
    }

    /// Stops it with SIGTERM (a clean shutdown) and waits; an unclean exit is an error.
    pub async fn stop(self) -> Result<()> {
        let status = self.process.stop().await?;
        if !status.success() {
            bail!("rill-broker exited with {status}");
        }
        Ok(())
    }
}
