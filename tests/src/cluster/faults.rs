//! Faults injected into a running cluster: network partitions (refusing or silent) through
//! the proxies of a partitionable cluster, kill -9, signals (pause and continue), and wiped data folders.

use std::net::IpAddr;

use anyhow::{Context, Result};
use rill_testkit::NetFaults;
use tokio::process::{Child, Command};

use super::spawn::START_DEADLINE;
use super::TestCluster;

impl TestCluster {
    /// Cuts node `id` off from every other broker, both directions, dropping the
    /// connections in flight; clients still reach it. Only on a partitionable cluster.
    pub fn isolate(&self, id: u64) -> Result<()> {
        let (faults, others) = self.faults_and_others(id)?;
        faults.isolate(self.addr(id).ip(), &others);
        Ok(())
    }

    /// Cuts node `id` off from every other broker silently, both directions: the
    /// connections in flight stay open but carry nothing, new ones are accepted but carry
    /// nothing, and no side sees a reset (a dead switch, a firewall dropping packets); clients
    /// still reach it. [`TestCluster::heal`] resumes the held connections. Only on a
    /// partitionable cluster.
    pub fn isolate_silently(&self, id: u64) -> Result<()> {
        let (faults, others) = self.faults_and_others(id)?;
        faults.isolate_silently(self.addr(id).ip(), &others);
        Ok(())
    }

    /// The proxies, and the listen IPs of every broker but `id`.
    fn faults_and_others(&self, id: u64) -> Result<(&NetFaults, Vec<IpAddr>)> {
        let faults = self
            .faults
            .as_ref()
            .context("not a partitionable cluster")?;
        anyhow::ensure!(self.nodes.contains_key(&id), "no node {id}");
        let others = self
            .nodes
            .iter()
            .filter(|(other, _)| **other != id)
            .map(|(_, n)| n.addr.ip())
            .collect();
        Ok((faults, others))
    }

    /// Lets all broker-to-broker traffic through again (cut or silent).
    pub fn heal(&self) -> Result<()> {
        self.faults
            .as_ref()
            .context("not a partitionable cluster")?
            .heal();
        Ok(())
    }

    /// kill -9 node `id` and reap it.
    pub async fn kill(&mut self, id: u64) -> Result<()> {
        let node = self.nodes.get_mut(&id).context("no such node")?;
        if let Some(mut child) = node.child.take() {
            child.start_kill()?;
            tokio::time::timeout(START_DEADLINE, child.wait())
                .await
                .context("reaping a killed broker")??;
        }
        Ok(())
    }

    /// Sends `signal` (`STOP`, `CONT`, ...) to node `id`'s process with the `kill` command.
    pub async fn signal(&self, id: u64, signal: &str) -> Result<()> {
        let pid = self.nodes[&id]
            .child
            .as_ref()
            .and_then(Child::id)
            .context("node not running")?;
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(pid.to_string())
            .status()
            .await?;
        anyhow::ensure!(status.success(), "kill -{signal} {pid} failed");
        Ok(())
    }

    /// Deletes everything in node `id`'s data folder (the node must be stopped).
    pub fn wipe(&self, id: u64) -> Result<()> {
        let node = &self.nodes[&id];
        anyhow::ensure!(node.child.is_none(), "node {id} is running");
        for entry in std::fs::read_dir(node.dir.path())? {
            let path = entry?.path();
            if path.is_dir() {
                std::fs::remove_dir_all(&path)?;
            } else {
                std::fs::remove_file(&path)?;
            }
        }
        Ok(())
    }
}
