//! The broker binary's configuration layers: defaults, then a TOML file (`--config`), then
//! `RILL_*` environment variables, then flags. Unknown TOML keys are refused.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Parser;

use crate::config::{Config, FileConfig};

/// The smallest groups topic segment accepted: one change may take half a segment, and a
/// group's membership state with its offsets must fit.
const MIN_GROUPS_SEGMENT_BYTES: u64 = 16 << 10;
/// The smallest subscriptions topic segment accepted: a compaction writes each subscription
/// whole in one batch of about a quarter segment.
const MIN_SUBSCRIPTIONS_SEGMENT_BYTES: u64 = 16 << 10;
/// The smallest `__security` / `__producers` segment accepted: a compaction writes the state
/// in batches of about a quarter segment.
const MIN_STATE_SEGMENT_BYTES: u64 = 16 << 10;
/// The largest Raft log file size `raft_log_segment_bytes` may set.
const MAX_RAFT_LOG_SEGMENT_BYTES: u64 = 1 << 30;

/// Command-line flags of `rill-broker`; each also reads a `RILL_*` environment variable.
#[derive(Debug, Parser)]
#[command(name = "rill-broker", version, about = "The Rill log broker")]
pub struct Flags {
    /// A TOML config file; flags and environment variables override its values.
    #[arg(long, env = "RILL_CONFIG")]
    pub config: Option<PathBuf>,
    /// Where topics and group offsets are stored [default: ./rill-data].
    #[arg(long, env = "RILL_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// The address to listen on; port 0 picks a free port [default: 127.0.0.1:7171].
    #[arg(long, env = "RILL_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// The largest batch and request accepted, in bytes [default: 16 MiB].
    #[arg(long, env = "RILL_MAX_BATCH_BYTES")]
    pub max_batch_bytes: Option<usize>,
    /// The cap on a fetch's wait, in milliseconds [default: 30000].
    #[arg(long, env = "RILL_MAX_FETCH_WAIT_MS")]
    pub max_fetch_wait_ms: Option<u64>,
    /// How long an idle idempotent producer's state is kept in each partition, in
    /// milliseconds; afterwards its next batch must start again at sequence 0
    /// [default: 604800000, 7 days].
    #[arg(long, env = "RILL_PRODUCER_ID_EXPIRATION_MS")]
    pub producer_id_expiration_ms: Option<u64>,
    /// How often retention runs, in milliseconds [default: 60000].
    #[arg(long, env = "RILL_RETENTION_CHECK_MS")]
    pub retention_check_ms: Option<u64>,
    /// The segment size of the groups topic when it is created, in bytes; also how much a
    /// groups partition grows before it is snapshotted and compacted [default: 262144].
    #[arg(long, env = "RILL_GROUPS_SEGMENT_BYTES")]
    pub groups_segment_bytes: Option<u64>,
    /// The segment size of the subscriptions topic when it is created, in bytes; also how
    /// much it grows before it is compacted [default: 1048576].
    #[arg(long, env = "RILL_SUBSCRIPTIONS_SEGMENT_BYTES")]
    pub subscriptions_segment_bytes: Option<u64>,
    /// The segment size of the security and producer-id topics when they are created, in
    /// bytes; also how much each grows before it is compacted [default: 1048576].
    #[arg(long, env = "RILL_STATE_SEGMENT_BYTES")]
    pub state_segment_bytes: Option<u64>,
    /// The flush policy of new topics that name none: always, never or interval:MS
    /// [default: interval:1000].
    #[arg(long, env = "RILL_DEFAULT_FLUSH")]
    pub default_flush: Option<String>,
    /// The most client connections served at once; more are answered RESOURCE_EXHAUSTED and
    /// closed [default: 1000].
    #[arg(long, env = "RILL_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// The most concurrent calls (HTTP/2 streams) per connection [default: 4096].
    #[arg(long, env = "RILL_MAX_CONCURRENT_STREAMS")]
    pub max_concurrent_streams: Option<u32>,
    /// Serve Prometheus metrics at http://HOST:PORT/metrics; port 0 picks a free port and
    /// the bound address is printed [default: off].
    #[arg(long, env = "RILL_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// Export per-partition series (one set per partition) [default: true].
    #[arg(long, env = "RILL_METRICS_PER_PARTITION")]
    pub metrics_per_partition: Option<bool>,
    /// Export per-group series (one set per group and partition, and per subscription)
    /// [default: true].
    #[arg(long, env = "RILL_METRICS_PER_GROUP")]
    pub metrics_per_group: Option<bool>,
    /// A host (name or IP address) that subscriptions may push to, beside loopback; repeat
    /// for more [default: loopback only].
    #[arg(
        long = "push-endpoint-allow",
        value_delimiter = ',',
        env = "RILL_PUSH_ENDPOINT_ALLOW"
    )]
    pub push_endpoint_allow: Vec<String>,
    /// Async worker threads [default: one per core but one, at least 1]. Blocking disk work
    /// (syncs, opens) runs on a separate pool either way.
    #[arg(long, env = "RILL_WORKER_THREADS")]
    pub worker_threads: Option<usize>,
    /// The server's TLS certificate chain (PEM); with --tls-key the broker serves TLS only.
    #[arg(long, env = "RILL_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// The server's TLS private key (PEM).
    #[arg(long, env = "RILL_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// CA certificates (PEM) for client certificates (mutual TLS); a verified certificate's
    /// subject common name becomes the caller's principal.
    #[arg(long, env = "RILL_TLS_CLIENT_CA")]
    pub tls_client_ca: Option<PathBuf>,
    /// Require authentication (a bearer token or a client certificate) on every call but
    /// health. Also on when an admin token is configured.
    #[arg(long, env = "RILL_AUTH")]
    pub auth: bool,
    /// A file holding the bootstrap admin token; the RILL_ADMIN_TOKEN variable wins.
    #[arg(long, env = "RILL_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,
    /// The bootstrap admin token. Read from the environment only, so it never shows in a
    /// process list.
    #[arg(
        long = "admin-token-from-env-only",
        env = "RILL_ADMIN_TOKEN",
        hide = true,
        hide_env_values = true
    )]
    pub admin_token: Option<String>,
    /// Serve a non-loopback address without authentication. Anyone who can reach the port
    /// can then read, write and delete every topic.
    #[arg(long, env = "RILL_INSECURE_NO_AUTH")]
    pub insecure_no_auth: bool,
    /// A file holding the cluster token, which the brokers of a cluster send each other
    /// (and which alone opens the internal replication service); RILL_CLUSTER_TOKEN wins.
    #[arg(long, env = "RILL_CLUSTER_TOKEN_FILE")]
    pub cluster_token_file: Option<PathBuf>,
    /// The cluster token. Read from the environment only, so it never shows in a process
    /// list.
    #[arg(
        long = "cluster-token-from-env-only",
        env = "RILL_CLUSTER_TOKEN",
        hide = true,
        hide_env_values = true
    )]
    pub cluster_token: Option<String>,
    /// CA certificates (PEM) of the peer brokers' certificates, for broker-to-broker TLS
    /// [default: --tls-client-ca].
    #[arg(long, env = "RILL_TLS_PEER_CA")]
    pub tls_peer_ca: Option<PathBuf>,
    /// Keep gRPC reflection open to unauthenticated callers when authentication is on;
    /// false makes it need a token or client certificate [default: true].
    #[arg(long, env = "RILL_OPEN_REFLECTION")]
    pub open_reflection: Option<bool>,
    /// This broker's node id in a cluster (1 or more); requires --peers.
    #[arg(long, env = "RILL_NODE_ID")]
    pub node_id: Option<u64>,
    /// Every broker of the cluster, this one included: 1=HOST:PORT,2=HOST:PORT,...;
    /// requires --node-id. Without both, the broker runs alone, unreplicated.
    #[arg(long, env = "RILL_PEERS")]
    pub peers: Option<String>,
    /// The address other brokers reach this one at (HOST:PORT), when it is not the listen
    /// address (a proxy, a NAT, a container port mapping); it must be this broker's own
    /// --peers entry [default: the listen address].
    #[arg(long, env = "RILL_ADVERTISE")]
    pub advertise: Option<String>,
    /// Raft entries between snapshots of each replicated group, after which its Raft log is
    /// purged; a follower further behind catches up by snapshot [default: 5000].
    #[arg(long, env = "RILL_RAFT_SNAPSHOT_ENTRIES")]
    pub raft_snapshot_entries: Option<u64>,
    /// The size at which each replicated group's Raft log file is sealed and the next begun
    /// (sealed files are deleted whole once purged), 4096 to 1073741824 [default: 67108864].
    #[arg(long, env = "RILL_RAFT_LOG_SEGMENT_BYTES")]
    pub raft_log_segment_bytes: Option<u64>,
}

/// Builds the config from flags (already merged with the environment by clap) over the file
/// over the defaults.
pub fn load(flags: Flags) -> Result<Config> {
    let security_flags = flags_security(&flags);
    let file = match &flags.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading config file {}", path.display()))?;
            toml::from_str::<FileConfig>(&text)
                .with_context(|| format!("parsing config file {}", path.display()))?
        }
        None => FileConfig::default(),
    };
    let mut config = Config::default();
    load_security(&mut config.security, &security_flags, &file)?;
    if let Some(v) = flags.data_dir.or(file.data_dir) {
        config.data_dir = v;
    }
    if let Some(v) = flags.listen.or(file.listen) {
        config.listen = v;
    }
    if let Some(v) = flags.max_batch_bytes.or(file.max_batch_bytes) {
        config.max_batch_bytes = v;
    }
    if let Some(v) = flags.max_fetch_wait_ms.or(file.max_fetch_wait_ms) {
        config.max_fetch_wait_ms = v;
    }
    if let Some(v) = file.max_fetch_bytes {
        config.max_fetch_bytes = v;
    }
    if let Some(v) = flags
        .producer_id_expiration_ms
        .or(file.producer_id_expiration_ms)
    {
        config.producer_id_expiration_ms = v;
    }
    if let Some(v) = flags.retention_check_ms.or(file.retention_check_ms) {
        config.retention_check_ms = v;
    }
    if let Some(v) = flags.groups_segment_bytes.or(file.groups_segment_bytes) {
        config.groups_segment_bytes = v;
    }
    if let Some(v) = flags
        .subscriptions_segment_bytes
        .or(file.subscriptions_segment_bytes)
    {
        config.subscriptions_segment_bytes = v;
    }
    if let Some(v) = flags.state_segment_bytes.or(file.state_segment_bytes) {
        config.state_segment_bytes = v;
    }
    if let Some(v) = file.max_waiting_fetches {
        config.max_waiting_fetches = v;
    }
    if let Some(v) = flags.max_connections.or(file.max_connections) {
        config.max_connections = v;
    }
    if let Some(v) = flags.max_concurrent_streams.or(file.max_concurrent_streams) {
        config.max_concurrent_streams = v;
    }
    if let Some(v) = flags.metrics_listen.or(file.metrics_listen) {
        config.metrics_listen = Some(v);
    }
    if let Some(v) = flags.metrics_per_partition.or(file.metrics_per_partition) {
        config.metrics_per_partition = v;
    }
    if let Some(v) = flags.metrics_per_group.or(file.metrics_per_group) {
        config.metrics_per_group = v;
    }
    if !flags.push_endpoint_allow.is_empty() {
        config.push_endpoint_allow = flags.push_endpoint_allow.clone();
    } else if let Some(v) = file.push_endpoint_allow.clone() {
        config.push_endpoint_allow = v;
    }
    let defaults = file.topic_defaults.unwrap_or_default();
    let t = &mut config.topic_defaults;
    if let Some(v) = defaults.partitions {
        t.partitions = v;
    }
    if let Some(v) = defaults.retention_ms {
        t.retention_ms = (v > 0).then_some(v);
    }
    if let Some(v) = defaults.retention_bytes {
        t.retention_bytes = (v > 0).then_some(v);
    }
    if let Some(v) = defaults.segment_bytes {
        t.segment_bytes = v;
    }
    if let Some(v) = defaults.segment_ms {
        t.segment_ms = v;
    }
    let bound = |v: i64, what: &str| match v {
        -1 => Ok(None),
        v => u64::try_from(v)
            .map(Some)
            .map_err(|_| anyhow::anyhow!("{what} must be >= 0, or -1 for no bound; got {v}")),
    };
    if let Some(v) = defaults.timestamp_after_max_ms {
        t.timestamp_after_max_ms = bound(v, "timestamp_after_max_ms")?;
    }
    if let Some(v) = defaults.timestamp_before_max_ms {
        t.timestamp_before_max_ms = bound(v, "timestamp_before_max_ms")?;
    }
    if let Some(v) = flags.default_flush.or(defaults.flush) {
        t.flush = v
            .parse()
            .map_err(|e: String| anyhow::anyhow!("default flush policy: {e}"))?;
    }
    config
        .topic_defaults
        .validate("(topic defaults)")
        .context("invalid [topic_defaults]")?;
    anyhow::ensure!(
        config.max_batch_bytes >= 1024,
        "max_batch_bytes must be at least 1024"
    );
    anyhow::ensure!(
        (MIN_GROUPS_SEGMENT_BYTES..=rill_storage::config::MAX_SEGMENT_BYTES)
            .contains(&config.groups_segment_bytes),
        "groups_segment_bytes must be {MIN_GROUPS_SEGMENT_BYTES}..={}, got {}",
        rill_storage::config::MAX_SEGMENT_BYTES,
        config.groups_segment_bytes
    );
    anyhow::ensure!(
        (MIN_SUBSCRIPTIONS_SEGMENT_BYTES..=rill_storage::config::MAX_SEGMENT_BYTES)
            .contains(&config.subscriptions_segment_bytes),
        "subscriptions_segment_bytes must be {MIN_SUBSCRIPTIONS_SEGMENT_BYTES}..={}, got {}",
        rill_storage::config::MAX_SEGMENT_BYTES,
        config.subscriptions_segment_bytes
    );
    anyhow::ensure!(
        (MIN_STATE_SEGMENT_BYTES..=rill_storage::config::MAX_SEGMENT_BYTES)
            .contains(&config.state_segment_bytes),
        "state_segment_bytes must be {MIN_STATE_SEGMENT_BYTES}..={}, got {}",
        rill_storage::config::MAX_SEGMENT_BYTES,
        config.state_segment_bytes
    );
    anyhow::ensure!(
        config.producer_id_expiration_ms >= 1,
        "producer_id_expiration_ms must be at least 1"
    );
    anyhow::ensure!(
        (1..=tokio::sync::Semaphore::MAX_PERMITS).contains(&config.max_connections),
        "max_connections must be at least 1"
    );
    anyhow::ensure!(
        config.max_concurrent_streams >= 1,
        "max_concurrent_streams must be at least 1"
    );
    check_protected_mode(&config)?;
    config.cluster = crate::cluster::config(
        flags.node_id.or(file.node_id),
        flags.peers.or(file.peers),
        config.listen,
        flags.advertise.or(file.advertise),
    )?;
    if let Some(entries) = flags.raft_snapshot_entries.or(file.raft_snapshot_entries) {
        anyhow::ensure!(entries >= 1, "raft_snapshot_entries must be at least 1");
        match config.cluster.as_mut() {
            Some(c) => c.snapshot_entries = entries,
            None => anyhow::bail!("raft_snapshot_entries needs a cluster (--node-id, --peers)"),
        }
    }
    if let Some(bytes) = flags.raft_log_segment_bytes.or(file.raft_log_segment_bytes) {
        anyhow::ensure!(
            (rill_cluster::log_store::MIN_SEGMENT_BYTES..=MAX_RAFT_LOG_SEGMENT_BYTES)
                .contains(&bytes),
            "raft_log_segment_bytes must be {} to {MAX_RAFT_LOG_SEGMENT_BYTES}, got {bytes}",
            rill_cluster::log_store::MIN_SEGMENT_BYTES
        );
        match config.cluster.as_mut() {
            Some(c) => c.raft_log_segment_bytes = bytes,
            None => anyhow::bail!("raft_log_segment_bytes needs a cluster (--node-id, --peers)"),
        }
    }
    Ok(config)
}

/// The security flags, taken out of [`Flags`] before the rest is consumed.
struct SecurityFlags {
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    tls_client_ca: Option<PathBuf>,
    auth: bool,
    admin_token_file: Option<PathBuf>,
    admin_token: Option<String>,
    insecure_no_auth: bool,
    open_reflection: Option<bool>,
    cluster_token_file: Option<PathBuf>,
    cluster_token: Option<String>,
    tls_peer_ca: Option<PathBuf>,
}

fn flags_security(flags: &Flags) -> SecurityFlags {
    SecurityFlags {
        tls_cert: flags.tls_cert.clone(),
        tls_key: flags.tls_key.clone(),
        tls_client_ca: flags.tls_client_ca.clone(),
        auth: flags.auth,
        admin_token_file: flags.admin_token_file.clone(),
        admin_token: flags.admin_token.clone(),
        insecure_no_auth: flags.insecure_no_auth,
        open_reflection: flags.open_reflection,
        cluster_token_file: flags.cluster_token_file.clone(),
        cluster_token: flags.cluster_token.clone(),
        tls_peer_ca: flags.tls_peer_ca.clone(),
    }
}

/// Layers the security settings: flags and environment over the file.
fn load_security(
    security: &mut crate::auth::SecurityConfig,
    flags: &SecurityFlags,
    file: &FileConfig,
) -> Result<()> {
    security.tls_cert = flags.tls_cert.clone().or(file.tls_cert.clone());
    security.tls_key = flags.tls_key.clone().or(file.tls_key.clone());
    security.tls_client_ca = flags.tls_client_ca.clone().or(file.tls_client_ca.clone());
    security.insecure_no_auth = flags.insecure_no_auth;
    if let Some(v) = flags.open_reflection.or(file.open_reflection) {
        security.open_reflection = v;
    }
    security.tls_peer_ca = flags.tls_peer_ca.clone().or(file.tls_peer_ca.clone());
    security.cluster_token = secret(
        &flags.cluster_token,
        flags
            .cluster_token_file
            .as_ref()
            .or(file.cluster_token_file.as_ref()),
        "cluster token",
    )?;
    let token = match (
        &flags.admin_token,
        flags
            .admin_token_file
            .as_ref()
            .or(file.admin_token_file.as_ref()),
    ) {
        (Some(t), _) => Some(t.trim().to_string()),
        (None, Some(path)) => Some(
            std::fs::read_to_string(path)
                .with_context(|| format!("reading the admin token file {}", path.display()))?
                .trim()
                .to_string(),
        ),
        (None, None) => None,
    };
    if let Some(t) = &token {
        anyhow::ensure!(
            t.len() >= 16,
            "the admin token must be at least 16 characters (use a random one)"
        );
    }
    security.admin_token = token.map(crate::auth::Secret);
    security.auth = flags.auth || file.auth.unwrap_or(false) || security.admin_token.is_some();
    Ok(())
}

/// A secret from the environment (wins) or a file, at least 16 characters.
fn secret(
    from_env: &Option<String>,
    file: Option<&PathBuf>,
    what: &str,
) -> Result<Option<crate::auth::Secret>> {
    let token = match (from_env, file) {
        (Some(t), _) => t.trim().to_string(),
        (None, Some(path)) => std::fs::read_to_string(path)
            .with_context(|| format!("reading the {what} file {}", path.display()))?
            .trim()
            .to_string(),
        (None, None) => return Ok(None),
    };
    anyhow::ensure!(
        token.len() >= 16,
        "the {what} must be at least 16 characters (use a random one)"
    );
    Ok(Some(crate::auth::Secret(token)))
}

/// Protected mode: a broker on a non-loopback address must authenticate its callers, unless
/// told explicitly not to.
pub fn check_protected_mode(config: &Config) -> Result<()> {
    let s = &config.security;
    if !s.auth && !s.insecure_no_auth && !config.listen.ip().is_loopback() {
        anyhow::bail!(
            "refusing to listen on {} without authentication: anyone who can reach that \
             address could read, write and delete every topic. Either turn authentication on \
             (set RILL_ADMIN_TOKEN or admin_token_file, or --auth), listen on a loopback \
             address (127.0.0.1:7171), or, on a network you trust, pass --insecure-no-auth",
            config.listen
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags(args: &[&str]) -> Flags {
        let mut all = vec!["rill-broker"];
        all.extend_from_slice(args);
        Flags::try_parse_from(all).expect("flags parse")
    }

    #[test]
    fn raft_log_segment_bytes_reaches_the_cluster_config_and_bad_values_are_refused() {
        let cluster = ["--node-id", "1", "--peers", "1=127.0.0.1:7171"];
        let default = load(flags(&cluster)).expect("load");
        assert_eq!(
            default.cluster.map(|c| c.raft_log_segment_bytes),
            Some(64 << 20),
            "64 MiB by default"
        );
        let mut args = cluster.to_vec();
        args.extend(["--raft-log-segment-bytes", "65536"]);
        let set = load(flags(&args)).expect("load");
        assert_eq!(set.cluster.map(|c| c.raft_log_segment_bytes), Some(65_536));
        for bad in ["100", "2147483648"] {
            let mut args = cluster.to_vec();
            args.extend(["--raft-log-segment-bytes", bad]);
            let err = load(flags(&args)).expect_err("out of range");
            assert!(
                format!("{err:#}").contains("raft_log_segment_bytes must be 4096 to"),
                "{err:#}"
            );
        }
        let err = load(flags(&["--raft-log-segment-bytes", "65536"])).expect_err("no cluster");
        assert!(format!("{err:#}").contains("needs a cluster"), "{err:#}");
    }

    #[test]
    fn subscriptions_segment_bytes_layers_file_under_flag_and_refuses_tiny_segments() {
        assert_eq!(
            load(flags(&[])).expect("load").subscriptions_segment_bytes,
            1 << 20,
            "1 MiB by default"
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("rill.toml");
        std::fs::write(&path, "subscriptions_segment_bytes = 65536\n").expect("write");
        let p = path.to_str().expect("utf-8 path");
        let from_file = load(flags(&["--config", p])).expect("load");
        assert_eq!(from_file.subscriptions_segment_bytes, 65_536);
        let flagged = load(flags(&[
            "--config",
            p,
            "--subscriptions-segment-bytes",
            "16384",
        ]))
        .expect("load");
        assert_eq!(flagged.subscriptions_segment_bytes, 16_384, "the flag wins");
        let err = load(flags(&["--subscriptions-segment-bytes", "4096"])).expect_err("too small");
        assert!(
            format!("{err:#}").contains("subscriptions_segment_bytes must be"),
            "{err:#}"
        );
    }

    #[test]
    fn state_segment_bytes_layers_file_under_flag_and_refuses_tiny_segments() {
        assert_eq!(
            load(flags(&[])).expect("load").state_segment_bytes,
            1 << 20,
            "1 MiB by default"
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("rill.toml");
        std::fs::write(&path, "state_segment_bytes = 65536\n").expect("write");
        let p = path.to_str().expect("utf-8 path");
        assert_eq!(
            load(flags(&["--config", p]))
                .expect("load")
                .state_segment_bytes,
            65_536
        );
        let flagged =
            load(flags(&["--config", p, "--state-segment-bytes", "16384"])).expect("load");
        assert_eq!(flagged.state_segment_bytes, 16_384, "the flag wins");
        let err = load(flags(&["--state-segment-bytes", "4096"])).expect_err("too small");
        assert!(
            format!("{err:#}").contains("state_segment_bytes must be"),
            "{err:#}"
        );
    }

    #[test]
    fn producer_id_expiration_layers_file_under_flag_and_refuses_zero() {
        assert_eq!(
            load(flags(&[])).expect("load").producer_id_expiration_ms,
            7 * 24 * 3600 * 1000,
            "7 days by default"
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("rill.toml");
        std::fs::write(&path, "producer_id_expiration_ms = 60000\n").expect("write");
        let p = path.to_str().expect("utf-8 path");
        let from_file = load(flags(&["--config", p])).expect("load");
        assert_eq!(from_file.producer_id_expiration_ms, 60_000);
        let flagged = load(flags(&[
            "--config",
            p,
            "--producer-id-expiration-ms",
            "500",
        ]))
        .expect("load");
        assert_eq!(flagged.producer_id_expiration_ms, 500, "the flag wins");
        let zero = load(flags(&["--producer-id-expiration-ms", "0"])).expect_err("zero");
        assert!(
            zero.to_string().contains("producer_id_expiration_ms"),
            "{zero}"
        );
    }

    #[test]
    fn layers_file_under_flags() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("rill.toml");
        std::fs::write(
            &path,
            "data_dir = \"/from/file\"\nlisten = \"127.0.0.1:9000\"\nmax_connections = 3\n\
             max_concurrent_streams = 9\nmetrics_listen = \"127.0.0.1:0\"\n\
             metrics_per_group = false\n[topic_defaults]\npartitions = 3\nflush = \"always\"\n\
             timestamp_after_max_ms = -1\ntimestamp_before_max_ms = 60000\n",
        )
        .expect("write");
        let p = path.to_str().expect("utf-8 path");
        let config = load(flags(&[
            "--config",
            p,
            "--listen",
            "127.0.0.1:0",
            "--max-connections",
            "7",
        ]))
        .expect("load");
        assert_eq!(config.max_connections, 7, "the flag wins over the file");
        assert_eq!(config.max_concurrent_streams, 9, "from the file");
        assert_eq!(
            config.metrics_listen,
            Some("127.0.0.1:0".parse().expect("addr"))
        );
        assert!(!config.metrics_per_group && config.metrics_per_partition);
        assert_eq!(config.data_dir, PathBuf::from("/from/file"));
        assert_eq!(config.listen, "127.0.0.1:0".parse().expect("addr"));
        assert_eq!(config.topic_defaults.partitions, 3);
        assert_eq!(config.topic_defaults.timestamp_after_max_ms, None);
        assert_eq!(config.topic_defaults.timestamp_before_max_ms, Some(60_000));
        assert_eq!(
            config.topic_defaults.flush,
            rill_storage::FlushPolicy::Always
        );
    }

    #[test]
    fn cluster_security_and_reflection_settings_load_from_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let token = dir.path().join("cluster.token");
        std::fs::write(&token, "cluster-token-0123456789\n").expect("write");
        let path = dir.path().join("rill.toml");
        std::fs::write(
            &path,
            format!(
                "open_reflection = false\ntls_peer_ca = \"/etc/rill/peers.pem\"\n\
                 cluster_token_file = {:?}\n",
                token.to_str().expect("utf-8 path")
            ),
        )
        .expect("write");
        let config = load(flags(&["--config", path.to_str().expect("utf-8 path")])).expect("load");
        let s = &config.security;
        assert!(!s.open_reflection);
        assert_eq!(s.tls_peer_ca, Some(PathBuf::from("/etc/rill/peers.pem")));
        assert_eq!(
            s.cluster_token.as_ref().map(|t| t.0.as_str()),
            Some("cluster-token-0123456789")
        );
        assert!(load(flags(&[])).expect("defaults").security.open_reflection);

        std::fs::write(&token, "short\n").expect("write");
        let err =
            load(flags(&["--config", path.to_str().expect("utf-8 path")])).expect_err("too short");
        assert!(format!("{err:#}").contains("cluster token"), "{err:#}");
    }

    #[test]
    fn unknown_keys_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("rill.toml");
        std::fs::write(&path, "data_dir = \"x\"\nlisten_port = 5\n").expect("write");
        let p = path.to_str().expect("utf-8 path");
        let err = load(flags(&["--config", p])).expect_err("unknown key");
        assert!(format!("{err:#}").contains("listen_port"), "{err:#}");
    }

    #[test]
    fn protected_mode_refuses_an_open_network_address() {
        let err = load(flags(&["--listen", "0.0.0.0:7171"])).expect_err("refused");
        assert!(format!("{err:#}").contains("--insecure-no-auth"), "{err:#}");
        let config =
            load(flags(&["--listen", "0.0.0.0:7171", "--insecure-no-auth"])).expect("explicit");
        assert!(!config.security.auth);
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("admin.token");
        std::fs::write(&path, "0123456789abcdef0123\n").expect("write");
        let p = path.to_str().expect("utf-8 path");
        let config = load(flags(&[
            "--listen",
            "0.0.0.0:7171",
            "--admin-token-file",
            p,
        ]))
        .expect("auth on");
        assert!(config.security.auth);
        assert_eq!(
            config.security.admin_token,
            Some(crate::auth::Secret("0123456789abcdef0123".into()))
        );
        assert!(
            !format!("{config:?}").contains("0123456789abcdef"),
            "never in Debug"
        );
    }

    #[test]
    fn security_settings_layer_file_under_flags() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("rill.toml");
        std::fs::write(
            &path,
            "tls_cert = \"/file/cert.pem\"\ntls_key = \"/file/key.pem\"\n\
             tls_client_ca = \"/file/ca.pem\"\nauth = true\n",
        )
        .expect("write");
        let p = path.to_str().expect("utf-8 path");
        let config = load(flags(&["--config", p, "--tls-cert", "/flag/cert.pem"])).expect("load");
        let s = &config.security;
        assert_eq!(
            s.tls_cert,
            Some(PathBuf::from("/flag/cert.pem")),
            "the flag wins"
        );
        assert_eq!(s.tls_key, Some(PathBuf::from("/file/key.pem")));
        assert_eq!(s.tls_client_ca, Some(PathBuf::from("/file/ca.pem")));
        assert!(s.auth && s.tls() && s.admin_token.is_none());
    }

    #[test]
    fn defaults_are_loopback_and_a_local_folder() {
        let config = load(flags(&[])).expect("load");
        assert!(config.listen.ip().is_loopback());
        assert!(config.data_dir.is_relative());
        assert_eq!(
            config.metrics_listen, None,
            "metrics are off unless asked for"
        );
    }
}
