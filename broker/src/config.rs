//! The broker's configuration: typed, with documented defaults, and layered by the binary
//! (defaults, then a TOML file, then environment variables, then flags).
//!
//! The library takes a finished [`Config`]; only [`crate::cli`] (used by `main`) reads files,
//! the environment and flags.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use rill_storage::TopicConfig;
use serde::Deserialize;

/// The default listen address: loopback only, so a fresh broker is not exposed.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7171";
/// The default data folder, relative to the working directory.
pub const DEFAULT_DATA_DIR: &str = "rill-data";
/// The default largest batch (and gRPC message) accepted, in bytes.
pub const DEFAULT_MAX_BATCH_BYTES: usize = 16 << 20;
/// The default cap on a fetch's `max_wait_ms`.
pub const DEFAULT_MAX_FETCH_WAIT_MS: u64 = 30_000;
/// The default cap on bytes returned by one fetch.
pub const DEFAULT_MAX_FETCH_BYTES: usize = 16 << 20;
/// The default interval between retention passes, in milliseconds.
pub const DEFAULT_RETENTION_CHECK_MS: u64 = 60_000;
/// The default limit on fetches waiting at once.
pub const DEFAULT_MAX_WAITING_FETCHES: usize = 100_000;
/// The default limit on client connections served at once. Each costs a file descriptor
/// and its HTTP/2 buffers; keep it below the process's open-file limit (`ulimit -n`, often
/// 1024 by default) less the files the broker holds.
pub const DEFAULT_MAX_CONNECTIONS: usize = 1000;
/// The default limit on concurrent calls (HTTP/2 streams) of one connection. hyper's default
/// of 200 would queue long-poll fetches behind each other on a shared connection; the
/// broker's waiting-fetch limit bounds the total instead.
pub const DEFAULT_MAX_CONCURRENT_STREAMS: u32 = 4096;

/// The default time an idle idempotent producer's state is kept, in ms: 7 days, as Kafka's
/// `producer.id.expiration.ms`.
pub const DEFAULT_PRODUCER_ID_EXPIRATION_MS: u64 =
    rill_storage::producers::DEFAULT_PRODUCER_EXPIRY_MS;

/// Everything the broker needs to run.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where topics and group offsets live. Default `./rill-data`.
    pub data_dir: PathBuf,
    /// The address to listen on; port 0 picks a free one. Default `127.0.0.1:7171`.
    pub listen: SocketAddr,
    /// The largest batch (and request) accepted, in bytes. Default 16 MiB.
    pub max_batch_bytes: usize,
    /// The longest a fetch may wait, in milliseconds, whatever it asks. Default 30 s.
    pub max_fetch_wait_ms: u64,
    /// How long after its last batch to a partition an idempotent producer's state there
    /// (its epoch and last sequences) is kept, in ms. A producer idle longer is unknown to
    /// that partition: its next batch must start again at sequence 0, and a retry of an
    /// older batch is no longer recognised. Default 7 days.
    pub producer_id_expiration_ms: u64,
    /// The segment size of the groups topic (`__groups`), in bytes, used only when the topic
    /// is created (a data folder, or a cluster, keeps the one it was made with). It is also
    /// the growth, per partition, after which the partition is snapshotted and its older
    /// segments deleted. Default 256 KiB.
    pub groups_segment_bytes: u64,
    /// The segment size of the subscriptions topic (`__subscriptions`), in bytes, used only
    /// when the topic is created (a data folder, or a cluster, keeps the one it was made
    /// with). It is also the growth after which the topic is compacted and its older segments
    /// deleted. Default 1 MiB.
    pub subscriptions_segment_bytes: u64,
    /// The segment size of the security and producer-id topics (`__security`,
    /// `__producers`), in bytes, used only when a topic is created (a data folder, or a
    /// cluster, keeps the one it was made with). It is also the growth after which each is
    /// compacted (its latest state rewritten) and its older segments deleted. Default 1 MiB.
    pub state_segment_bytes: u64,
    /// The most bytes one fetch returns, whatever it asks. Default 16 MiB.
    pub max_fetch_bytes: usize,
    /// How often retention runs, in milliseconds. Default 60 s.
    pub retention_check_ms: u64,
    /// The most fetches that may wait at once; more get RESOURCE_EXHAUSTED. Default 100,000.
    pub max_waiting_fetches: usize,
    /// The most client connections served at once. A connection over the limit has its
    /// calls answered RESOURCE_EXHAUSTED (naming the limit), then is closed. Default 1000.
    pub max_connections: usize,
    /// The most concurrent calls (HTTP/2 streams) one connection may have; further calls on
    /// it wait for one to end. Default 4096.
    pub max_concurrent_streams: u32,
    /// Defaults for topics created without a value (partitions, retention, segments, flush).
    pub topic_defaults: TopicConfig,
    /// TLS and authentication (`docs/SECURITY.md`). Default: plaintext, no authentication,
    /// which the broker accepts only on a loopback address.
    pub security: crate::auth::SecurityConfig,
    /// Where to serve Prometheus metrics (`/metrics`); off when `None`, the default.
    pub metrics_listen: Option<SocketAddr>,
    /// Export the per-partition series (log offsets, size, segments). Default true.
    pub metrics_per_partition: bool,
    /// Export the per-group series (committed offset and lag per partition) and the
    /// per-subscription ones (backlog, in flight, outcomes). Default true.
    pub metrics_per_group: bool,
    /// Cluster membership (`--node-id`, `--peers`); `None` runs a single broker, exactly as
    /// without replication.
    pub cluster: Option<rill_cluster::ClusterConfig>,
    /// Hosts (names or IP addresses, exactly) that subscriptions may push to, beside
    /// loopback (`localhost`, 127.0.0.0/8, `::1`), which is always allowed. Default: none, so
    /// a topic admin cannot make the broker call other hosts.
    pub push_endpoint_allow: Vec<String>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: PathBuf::from(DEFAULT_DATA_DIR),
            listen: SocketAddr::from(([127, 0, 0, 1], 7171)),
            max_batch_bytes: DEFAULT_MAX_BATCH_BYTES,
            max_fetch_wait_ms: DEFAULT_MAX_FETCH_WAIT_MS,
            producer_id_expiration_ms: DEFAULT_PRODUCER_ID_EXPIRATION_MS,
            groups_segment_bytes: rill_storage::groups::DEFAULT_GROUPS_SEGMENT_BYTES,
            subscriptions_segment_bytes:
                crate::subscriptions::persist::DEFAULT_SUBSCRIPTIONS_SEGMENT_BYTES,
            state_segment_bytes: crate::internal::compact::DEFAULT_STATE_SEGMENT_BYTES,
            max_fetch_bytes: DEFAULT_MAX_FETCH_BYTES,
            retention_check_ms: DEFAULT_RETENTION_CHECK_MS,
            max_waiting_fetches: DEFAULT_MAX_WAITING_FETCHES,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_concurrent_streams: DEFAULT_MAX_CONCURRENT_STREAMS,
            topic_defaults: TopicConfig::default(),
            security: crate::auth::SecurityConfig::default(),
            metrics_listen: None,
            metrics_per_partition: true,
            metrics_per_group: true,
            cluster: None,
            push_endpoint_allow: Vec::new(),
        }
    }
}

impl Config {
    /// A config with defaults and the given data folder.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Config {
            data_dir: data_dir.into(),
            ..Config::default()
        }
    }

    /// Sets the listen address (default `127.0.0.1:7171`; port 0 picks a free port).
    pub fn listen(mut self, listen: SocketAddr) -> Self {
        self.listen = listen;
        self
    }

    /// Sets the largest batch accepted, in bytes (default 16 MiB).
    pub fn max_batch_bytes(mut self, max_batch_bytes: usize) -> Self {
        self.max_batch_bytes = max_batch_bytes;
        self
    }

    /// Sets the cap on a fetch's wait, in milliseconds (default 30,000).
    pub fn max_fetch_wait_ms(mut self, max_fetch_wait_ms: u64) -> Self {
        self.max_fetch_wait_ms = max_fetch_wait_ms;
        self
    }

    /// Sets how long an idle idempotent producer's state is kept, in ms (default 7 days).
    pub fn producer_id_expiration_ms(mut self, producer_id_expiration_ms: u64) -> Self {
        self.producer_id_expiration_ms = producer_id_expiration_ms;
        self
    }

    /// Sets the segment size of a new groups topic, in bytes (default 256 KiB).
    pub fn groups_segment_bytes(mut self, groups_segment_bytes: u64) -> Self {
        self.groups_segment_bytes = groups_segment_bytes;
        self
    }

    /// Sets the segment size of a new subscriptions topic, in bytes (default 1 MiB).
    pub fn subscriptions_segment_bytes(mut self, subscriptions_segment_bytes: u64) -> Self {
        self.subscriptions_segment_bytes = subscriptions_segment_bytes;
        self
    }

    /// Sets the segment size of new `__security` and `__producers` topics, in bytes (default
    /// 1 MiB).
    pub fn state_segment_bytes(mut self, state_segment_bytes: u64) -> Self {
        self.state_segment_bytes = state_segment_bytes;
        self
    }

    /// Sets the interval between retention passes, in milliseconds (default 60,000).
    pub fn retention_check_ms(mut self, retention_check_ms: u64) -> Self {
        self.retention_check_ms = retention_check_ms;
        self
    }

    /// Sets the limit on fetches waiting at once (default 100,000).
    pub fn max_waiting_fetches(mut self, max_waiting_fetches: usize) -> Self {
        self.max_waiting_fetches = max_waiting_fetches;
        self
    }

    /// Sets the limit on client connections served at once (default 1000).
    pub fn max_connections(mut self, max_connections: usize) -> Self {
        self.max_connections = max_connections;
        self
    }

    /// Sets the limit on concurrent calls per connection (default 4096).
    pub fn max_concurrent_streams(mut self, max_concurrent_streams: u32) -> Self {
        self.max_concurrent_streams = max_concurrent_streams;
        self
    }

    /// Sets the defaults for new topics.
    pub fn topic_defaults(mut self, topic_defaults: TopicConfig) -> Self {
        self.topic_defaults = topic_defaults;
        self
    }

    /// Serves Prometheus metrics on `addr` (port 0 picks a free port).
    pub fn metrics_listen(mut self, addr: SocketAddr) -> Self {
        self.metrics_listen = Some(addr);
        self
    }

    /// The retention interval as a [`Duration`].
    pub fn retention_interval(&self) -> Duration {
        Duration::from_millis(self.retention_check_ms.max(1))
    }
}

/// The TOML file's shape. Every key is optional; unknown keys are refused.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// See [`Config::data_dir`].
    pub data_dir: Option<PathBuf>,
    /// See [`Config::listen`].
    pub listen: Option<SocketAddr>,
    /// See [`Config::max_batch_bytes`].
    pub max_batch_bytes: Option<usize>,
    /// See [`Config::max_fetch_wait_ms`].
    pub max_fetch_wait_ms: Option<u64>,
    /// See [`Config::max_fetch_bytes`].
    pub max_fetch_bytes: Option<usize>,
    /// See [`Config::producer_id_expiration_ms`].
    pub producer_id_expiration_ms: Option<u64>,
    /// See [`Config::retention_check_ms`].
    pub retention_check_ms: Option<u64>,
    /// See [`Config::groups_segment_bytes`].
    pub groups_segment_bytes: Option<u64>,
    /// See [`Config::subscriptions_segment_bytes`].
    pub subscriptions_segment_bytes: Option<u64>,
    /// See [`Config::state_segment_bytes`].
    pub state_segment_bytes: Option<u64>,
    /// See [`Config::max_waiting_fetches`].
    pub max_waiting_fetches: Option<usize>,
    /// See [`Config::max_connections`].
    pub max_connections: Option<usize>,
    /// See [`Config::max_concurrent_streams`].
    pub max_concurrent_streams: Option<u32>,
    /// See [`crate::auth::SecurityConfig::tls_cert`].
    pub tls_cert: Option<PathBuf>,
    /// See [`crate::auth::SecurityConfig::tls_key`].
    pub tls_key: Option<PathBuf>,
    /// See [`crate::auth::SecurityConfig::tls_client_ca`].
    pub tls_client_ca: Option<PathBuf>,
    /// See [`crate::auth::SecurityConfig::auth`].
    pub auth: Option<bool>,
    /// A file holding the bootstrap admin token (one line); `RILL_ADMIN_TOKEN` wins.
    pub admin_token_file: Option<PathBuf>,
    /// A file holding the cluster token (one line); `RILL_CLUSTER_TOKEN` wins.
    pub cluster_token_file: Option<PathBuf>,
    /// See [`crate::auth::SecurityConfig::tls_peer_ca`].
    pub tls_peer_ca: Option<PathBuf>,
    /// See [`crate::auth::SecurityConfig::open_reflection`].
    pub open_reflection: Option<bool>,
    /// See [`Config::metrics_listen`].
    pub metrics_listen: Option<SocketAddr>,
    /// See [`Config::metrics_per_partition`].
    pub metrics_per_partition: Option<bool>,
    /// See [`Config::metrics_per_group`].
    pub metrics_per_group: Option<bool>,
    /// See [`Config::push_endpoint_allow`].
    pub push_endpoint_allow: Option<Vec<String>>,
    /// Topic defaults, as a `[topic_defaults]` table.
    pub topic_defaults: Option<FileTopicDefaults>,
    /// This broker's node id in a cluster; requires `peers`.
    pub node_id: Option<u64>,
    /// The cluster's brokers, `1=HOST:PORT,2=HOST:PORT,...`; requires `node_id`.
    pub peers: Option<String>,
    /// The address other brokers reach this one at, when not the listen address; it must
    /// be this broker's own `peers` entry.
    pub advertise: Option<String>,
    /// Raft entries between snapshots of each replicated group (default 5,000).
    pub raft_snapshot_entries: Option<u64>,
    /// The size at which each replicated group's Raft log file is sealed (default 64 MiB).
    pub raft_log_segment_bytes: Option<u64>,
}

/// The `[topic_defaults]` table of the TOML file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileTopicDefaults {
    /// Partitions of a new topic.
    pub partitions: Option<u32>,
    /// Retention time in ms; 0 keeps data forever.
    pub retention_ms: Option<u64>,
    /// Retention size per partition in bytes; 0 means no limit.
    pub retention_bytes: Option<u64>,
    /// Segment size in bytes.
    pub segment_bytes: Option<u64>,
    /// Segment age in ms.
    pub segment_ms: Option<u64>,
    /// Flush policy: `always`, `never` or `interval:MS`.
    pub flush: Option<String>,
    /// How far ahead of the broker's clock a record timestamp may be, in ms; -1 for no bound.
    pub timestamp_after_max_ms: Option<i64>,
    /// How far behind the broker's clock a record timestamp may be, in ms; -1 for no bound.
    pub timestamp_before_max_ms: Option<i64>,
}
