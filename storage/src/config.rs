//! Topic configuration, flush policies and the naming rule.
//!
//! A [`TopicConfig`] is fixed when the topic is created and persisted beside its partitions
//! (see [`crate::store`]). Every value has a unit in its name and a documented default; the
//! builder-style setters say both.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::batch::{BatchError, BatchHeader, Codec};
use crate::error::{Result, StorageError};

/// The most partitions one topic may have. A request for more is refused, so a hostile or
/// mistyped request cannot make the broker create a huge number of folders and mappings.
pub const MAX_PARTITIONS: u32 = 4096;
/// The smallest segment size accepted, in bytes (small segments are useful in tests).
pub const MIN_SEGMENT_BYTES: u64 = 4096;
/// The largest segment size accepted, in bytes. Positions inside a segment are `u32`.
pub const MAX_SEGMENT_BYTES: u64 = 1 << 31;
/// The default segment size, in bytes (256 MiB).
pub const DEFAULT_SEGMENT_BYTES: u64 = 256 << 20;
/// The default segment age before a roll, in milliseconds (7 days).
pub const DEFAULT_SEGMENT_MS: u64 = 7 * 24 * 3600 * 1000;
/// The default retention time, in milliseconds (7 days).
pub const DEFAULT_RETENTION_MS: u64 = 7 * 24 * 3600 * 1000;
/// The default interval of the `interval` flush policy, in milliseconds.
pub const DEFAULT_FLUSH_INTERVAL_MS: u64 = 1000;
/// The default bound on how far a record's timestamp may be ahead of the broker's clock, in
/// milliseconds (1 hour): Kafka's default for `message.timestamp.after.max.ms` since 4.0.
/// A timestamp in the future keeps its segment from ever expiring by age, so the bound is on
/// by default; an hour covers any sane clock skew between producers and the broker.
pub const DEFAULT_TIMESTAMP_AFTER_MAX_MS: u64 = 3600 * 1000;
/// The longest name a topic or group may have.
pub const MAX_NAME_LEN: usize = 249;

/// When a partition's appended data is synced to stable storage.
///
/// Whatever the policy, a produce that asks for a `durable` ack waits for a sync that covers it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FlushPolicy {
    /// Group commit: every append is acknowledged only after a sync covers it; one sync serves
    /// every append waiting on it.
    Always,
    /// A background sync every so many milliseconds. Survives a process crash at once, a power
    /// loss up to the last sync.
    IntervalMs(u64),
    /// The page cache only: survives a process crash, not a power loss.
    Never,
}

impl Default for FlushPolicy {
    /// `interval_ms` of [`DEFAULT_FLUSH_INTERVAL_MS`].
    fn default() -> Self {
        FlushPolicy::IntervalMs(DEFAULT_FLUSH_INTERVAL_MS)
    }
}

impl fmt::Display for FlushPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FlushPolicy::Always => f.write_str("always"),
            FlushPolicy::IntervalMs(ms) => write!(f, "interval:{ms}"),
            FlushPolicy::Never => f.write_str("never"),
        }
    }
}

impl FromStr for FlushPolicy {
    type Err = String;

    /// Parses `always`, `never` or `interval:MS`.
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        match s {
            "always" => Ok(FlushPolicy::Always),
            "never" => Ok(FlushPolicy::Never),
            other => match other.strip_prefix("interval:") {
                Some(ms) => match ms.parse::<u64>() {
                    Ok(ms) if ms > 0 => Ok(FlushPolicy::IntervalMs(ms)),
                    _ => Err(format!(
                        "bad flush interval {ms:?}: expected milliseconds > 0"
                    )),
                },
                None => Err(format!(
                    "bad flush policy {other:?}: expected always, never or interval:MS"
                )),
            },
        }
    }
}

/// A topic's configuration, persisted with the topic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicConfig {
    /// Number of partitions, 1..=[`MAX_PARTITIONS`]. Default 1.
    pub partitions: u32,
    /// Delete sealed segments whose newest record is older than this, in milliseconds.
    /// `None` keeps data forever. Default [`DEFAULT_RETENTION_MS`].
    pub retention_ms: Option<u64>,
    /// Delete the oldest sealed segments while a partition holds more than this many bytes.
    /// `None` means no size limit (the default).
    pub retention_bytes: Option<u64>,
    /// Roll to a new segment when the active one would exceed this many bytes.
    /// Default [`DEFAULT_SEGMENT_BYTES`].
    pub segment_bytes: u64,
    /// Roll to a new segment when the active one is older than this, in milliseconds.
    /// Default [`DEFAULT_SEGMENT_MS`].
    pub segment_ms: u64,
    /// When appends are synced. Default `interval_ms` of [`DEFAULT_FLUSH_INTERVAL_MS`].
    pub flush: FlushPolicy,
    /// Refuse a record whose timestamp is more than this many milliseconds ahead of the
    /// broker's clock (Kafka's `message.timestamp.after.max.ms`). `None`: no bound. Default
    /// [`DEFAULT_TIMESTAMP_AFTER_MAX_MS`] (1 hour). Stored as `-1` for no bound; a
    /// `topic.toml` without it (written before the bound existed) gets the default.
    #[serde(default = "default_timestamp_after_max_ms", with = "limit_ms")]
    pub timestamp_after_max_ms: Option<u64>,
    /// Refuse a record whose timestamp is more than this many milliseconds behind the
    /// broker's clock (Kafka's `message.timestamp.before.max.ms`). `None`, no bound, is the
    /// default, as in Kafka: old timestamps are legitimate (backfills, replays, mirrored
    /// history), and they can only make a segment expire sooner, never pin it.
    #[serde(default, with = "limit_ms")]
    pub timestamp_before_max_ms: Option<u64>,
    /// How the topic's batches are stored: as the producer compressed them (`producer`, the
    /// default), or recompressed by the broker to one codec (`none`, `lz4`, `zstd`). Stored
    /// by name; a `topic.toml` without it (written before compression existed) gets
    /// `producer`.
    #[serde(default, with = "compression_name")]
    pub compression: TopicCompression,
}

/// A topic's `compression` setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TopicCompression {
    /// Keep each batch compressed as it came (Kafka's `compression.type=producer`).
    #[default]
    Producer,
    /// Store every batch with this codec, recompressing those that came otherwise.
    Codec(Codec),
}

impl TopicCompression {
    /// The codec batches are stored with, given the one a batch came with.
    pub fn stored_codec(self, came_with: Codec) -> Codec {
        match self {
            TopicCompression::Producer => came_with,
            TopicCompression::Codec(c) => c,
        }
    }
}

impl fmt::Display for TopicCompression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TopicCompression::Producer => f.write_str("producer"),
            TopicCompression::Codec(c) => write!(f, "{c}"),
        }
    }
}

impl FromStr for TopicCompression {
    type Err = String;

    /// Parses `producer`, `none`, `lz4` or `zstd`.
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        match s {
            "producer" => Ok(TopicCompression::Producer),
            other => other
                .parse::<Codec>()
                .map(TopicCompression::Codec)
                .map_err(|_| {
                    format!("bad compression {other:?}: expected producer, none, lz4 or zstd")
                }),
        }
    }
}

/// A topic's compression in `topic.toml`, by name.
mod compression_name {
    use serde::{de, Deserialize, Deserializer, Serializer};

    use super::TopicCompression;

    pub fn serialize<S: Serializer>(v: &TopicCompression, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&v.to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<TopicCompression, D::Error> {
        String::deserialize(d)?.parse().map_err(de::Error::custom)
    }
}

fn default_timestamp_after_max_ms() -> Option<u64> {
    Some(DEFAULT_TIMESTAMP_AFTER_MAX_MS)
}

/// A millisecond bound in `topic.toml`: TOML has no null, so `None` (no bound) is `-1`.
mod limit_ms {
    use serde::{de, Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &Option<u64>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            None => s.serialize_i64(-1),
            Some(ms) => s.serialize_u64(*ms),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
        match i64::deserialize(d)? {
            -1 => Ok(None),
            ms => u64::try_from(ms).map(Some).map_err(|_| {
                de::Error::custom(format!("{ms} ms: expected >= 0, or -1 for no bound"))
            }),
        }
    }
}

impl Default for TopicConfig {
    fn default() -> Self {
        TopicConfig {
            partitions: 1,
            retention_ms: Some(DEFAULT_RETENTION_MS),
            retention_bytes: None,
            segment_bytes: DEFAULT_SEGMENT_BYTES,
            segment_ms: DEFAULT_SEGMENT_MS,
            flush: FlushPolicy::default(),
            timestamp_after_max_ms: default_timestamp_after_max_ms(),
            timestamp_before_max_ms: None,
            compression: TopicCompression::Producer,
        }
    }
}

impl TopicConfig {
    /// Sets the partition count (default 1).
    pub fn partitions(mut self, partitions: u32) -> Self {
        self.partitions = partitions;
        self
    }

    /// Sets the retention time in milliseconds; `None` keeps data forever (default 7 days).
    pub fn retention_ms(mut self, retention_ms: Option<u64>) -> Self {
        self.retention_ms = retention_ms;
        self
    }

    /// Sets the size limit per partition in bytes; `None` means unlimited (the default).
    pub fn retention_bytes(mut self, retention_bytes: Option<u64>) -> Self {
        self.retention_bytes = retention_bytes;
        self
    }

    /// Sets the segment size in bytes (default 256 MiB).
    pub fn segment_bytes(mut self, segment_bytes: u64) -> Self {
        self.segment_bytes = segment_bytes;
        self
    }

    /// Sets the segment age before a roll, in milliseconds (default 7 days).
    pub fn segment_ms(mut self, segment_ms: u64) -> Self {
        self.segment_ms = segment_ms;
        self
    }

    /// Sets the flush policy (default `interval_ms` 1000).
    pub fn flush(mut self, flush: FlushPolicy) -> Self {
        self.flush = flush;
        self
    }

    /// Sets how far ahead of the broker's clock a record timestamp may be, in milliseconds;
    /// `None` for no bound (default 1 hour).
    pub fn timestamp_after_max_ms(mut self, timestamp_after_max_ms: Option<u64>) -> Self {
        self.timestamp_after_max_ms = timestamp_after_max_ms;
        self
    }

    /// Sets how far behind the broker's clock a record timestamp may be, in milliseconds;
    /// `None` for no bound (the default).
    pub fn timestamp_before_max_ms(mut self, timestamp_before_max_ms: Option<u64>) -> Self {
        self.timestamp_before_max_ms = timestamp_before_max_ms;
        self
    }

    /// Sets how batches are stored: as they came (`Producer`, the default) or recompressed to
    /// one codec.
    pub fn compression(mut self, compression: TopicCompression) -> Self {
        self.compression = compression;
        self
    }

    /// Checks one record timestamp against the topic's bounds, relative to `now_ms` (the
    /// broker's clock): [`BatchError::TimestampTooNew`] or [`BatchError::TimestampTooOld`],
    /// naming the bound.
    pub fn check_timestamp(&self, timestamp_ms: i64, now_ms: i64) -> Result<(), BatchError> {
        // i128: no difference of two i64 overflows it.
        let ahead = i128::from(timestamp_ms) - i128::from(now_ms);
        if let Some(max_ms) = self.timestamp_after_max_ms {
            if ahead > i128::from(max_ms) {
                return Err(BatchError::TimestampTooNew {
                    timestamp_ms,
                    now_ms,
                    max_ms,
                });
            }
        }
        if let Some(max_ms) = self.timestamp_before_max_ms {
            if -ahead > i128::from(max_ms) {
                return Err(BatchError::TimestampTooOld {
                    timestamp_ms,
                    now_ms,
                    max_ms,
                });
            }
        }
        Ok(())
    }

    /// Checks the record timestamps of an encoded batch against the topic's bounds (see
    /// [`TopicConfig::check_timestamp`]), before anything is written: its max timestamp
    /// against the bound ahead, and (only when that bound is set) each record's against the
    /// bound behind. A malformed header or record is reported as such; the append's full
    /// check also refuses a batch whose header's max timestamp is not its records' largest,
    /// so a lying header cannot slip a timestamp past this.
    pub fn check_batch_timestamps(&self, batch: &[u8], now_ms: i64) -> Result<(), BatchError> {
        let header = BatchHeader::parse(batch)?;
        self.check_timestamp(header.max_timestamp, now_ms)?;
        if self.timestamp_before_max_ms.is_some() {
            // Compressed records are read from the plain equivalent; the append's check
            // bounds the decompressed size again with the partition's limit.
            let plain =
                crate::batch::decompress(batch, crate::batch::MAX_DECOMPRESSED_BATCH_BYTES)?;
            let view = crate::batch::BatchView::parse(&plain)?;
            for record in view.records() {
                self.check_timestamp(record?.timestamp_ms, now_ms)?;
            }
        }
        Ok(())
    }

    /// Checks every value against its allowed range. `topic` only names the error.
    pub fn validate(&self, topic: &str) -> Result<()> {
        let bad = |reason: String| {
            Err(StorageError::InvalidConfig {
                topic: topic.to_string(),
                reason,
            })
        };
        if self.partitions == 0 || self.partitions > MAX_PARTITIONS {
            return bad(format!(
                "partitions must be 1..={MAX_PARTITIONS}, got {}",
                self.partitions
            ));
        }
        if !(MIN_SEGMENT_BYTES..=MAX_SEGMENT_BYTES).contains(&self.segment_bytes) {
            return bad(format!(
                "segment_bytes must be {MIN_SEGMENT_BYTES}..={MAX_SEGMENT_BYTES}, got {}",
                self.segment_bytes
            ));
        }
        if self.segment_ms == 0 {
            return bad("segment_ms must be > 0".to_string());
        }
        if self.retention_ms == Some(0) {
            return bad("retention_ms must be > 0, or unset for no limit".to_string());
        }
        if self.retention_bytes == Some(0) {
            return bad("retention_bytes must be > 0, or unset for no limit".to_string());
        }
        if self.flush == FlushPolicy::IntervalMs(0) {
            return bad("flush interval_ms must be > 0".to_string());
        }
        for (name, bound) in [
            ("timestamp_after_max_ms", self.timestamp_after_max_ms),
            ("timestamp_before_max_ms", self.timestamp_before_max_ms),
        ] {
            if bound.is_some_and(|ms| i64::try_from(ms).is_err()) {
                return bad(format!(
                    "{name} must be at most {}, or unset for no bound",
                    i64::MAX
                ));
            }
        }
        Ok(())
    }
}

/// Checks a topic or group name against `[a-zA-Z0-9._-]{1,249}`, refusing `.` and `..`.
///
/// A name becomes a folder or file name, so this is what keeps client input out of paths.
/// `kind` ("topic" or "group") only names the error.
pub fn validate_name(kind: &'static str, name: &str) -> Result<()> {
    let reason = if name.is_empty() {
        Some("it is empty")
    } else if name.len() > MAX_NAME_LEN {
        Some("it is longer than 249 characters")
    } else if name == "." || name == ".." {
        Some("`.` and `..` are reserved")
    } else if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        Some("only ASCII letters, digits, `.`, `_` and `-` are allowed")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(StorageError::InvalidName {
            kind,
            name: name.to_string(),
            reason,
        }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_rule() {
        for ok in ["a", "orders", "a.b_c-D9", &"x".repeat(249)] {
            assert!(validate_name("topic", ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            ".",
            "..",
            "../x",
            "a/b",
            "a b",
            "é",
            &"x".repeat(250),
            "a\0",
        ] {
            assert!(validate_name("topic", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn config_ranges_are_checked() {
        assert!(TopicConfig::default().validate("t").is_ok());
        assert!(TopicConfig::default().partitions(0).validate("t").is_err());
        assert!(TopicConfig::default()
            .partitions(MAX_PARTITIONS + 1)
            .validate("t")
            .is_err());
        assert!(TopicConfig::default()
            .segment_bytes(10)
            .validate("t")
            .is_err());
        assert!(TopicConfig::default().segment_ms(0).validate("t").is_err());
        assert!(TopicConfig::default()
            .retention_bytes(Some(0))
            .validate("t")
            .is_err());
    }

    #[test]
    fn timestamp_bounds_follow_kafka() {
        let now = 1_700_000_000_000;
        let hour = 3_600_000;
        let config = TopicConfig::default();
        // Defaults: at most an hour ahead, any age behind.
        assert!(config.check_timestamp(now + hour, now).is_ok());
        assert_eq!(
            config.check_timestamp(now + hour + 1, now),
            Err(BatchError::TimestampTooNew {
                timestamp_ms: now + hour + 1,
                now_ms: now,
                max_ms: hour as u64
            })
        );
        assert!(config.check_timestamp(0, now).is_ok());
        assert!(config.check_timestamp(i64::MIN, now).is_ok());
        let year_3000 = 32_503_680_000_000;
        let err = config
            .check_timestamp(year_3000, now)
            .expect_err("year 3000");
        assert!(
            err.to_string().contains("timestamp_after_max_ms = 3600000"),
            "{err}"
        );

        let bounded = TopicConfig::default()
            .timestamp_after_max_ms(None)
            .timestamp_before_max_ms(Some(1000));
        assert!(bounded.check_timestamp(i64::MAX, now).is_ok());
        assert!(bounded.check_timestamp(now - 1000, now).is_ok());
        let err = bounded
            .check_timestamp(now - 1001, now)
            .expect_err("too old");
        assert!(
            err.to_string().contains("timestamp_before_max_ms = 1000"),
            "{err}"
        );
        // Extremes of both clocks compare without overflow.
        assert!(bounded.check_timestamp(i64::MIN, i64::MAX).is_err());

        // A batch: its max timestamp against the bound ahead, each record against the bound
        // behind.
        let batch = |timestamps: &[i64]| {
            let mut b = crate::batch::BatchBuilder::default();
            for &t in timestamps {
                b.push(None, b"v", &[], t);
            }
            b.finish()
        };
        let both = TopicConfig::default().timestamp_before_max_ms(Some(hour as u64));
        assert!(both
            .check_batch_timestamps(&batch(&[now, now - 5]), now)
            .is_ok());
        assert!(matches!(
            both.check_batch_timestamps(&batch(&[now, now + 2 * hour, now]), now),
            Err(BatchError::TimestampTooNew { .. })
        ));
        assert!(matches!(
            both.check_batch_timestamps(&batch(&[now, now - 2 * hour, now]), now),
            Err(BatchError::TimestampTooOld { .. })
        ));
    }

    #[test]
    fn timestamp_bounds_are_stored_and_default_when_absent() {
        for config in [
            TopicConfig::default(),
            TopicConfig::default()
                .timestamp_after_max_ms(None)
                .timestamp_before_max_ms(Some(7)),
        ] {
            let text = toml::to_string(&config).expect("serialize");
            let back: TopicConfig = toml::from_str(&text).expect("parse");
            assert_eq!(back, config, "{text}");
        }
        // A topic.toml written before the bounds existed gets the defaults.
        let old = "partitions = 1\nretention_ms = 5\nsegment_bytes = 4096\nsegment_ms = 9\nflush = \"always\"\n";
        let config: TopicConfig = toml::from_str(old).expect("parse");
        assert_eq!(
            config.timestamp_after_max_ms,
            Some(DEFAULT_TIMESTAMP_AFTER_MAX_MS)
        );
        assert_eq!(config.timestamp_before_max_ms, None);
        let bad = format!("{old}timestamp_before_max_ms = -2\n");
        assert!(toml::from_str::<TopicConfig>(&bad).is_err());
        assert!(TopicConfig::default()
            .timestamp_after_max_ms(Some(u64::MAX))
            .validate("t")
            .is_err());
    }

    #[test]
    fn flush_policy_parses_and_prints() {
        for s in ["always", "never", "interval:250"] {
            let p: FlushPolicy = s.parse().expect("valid policy");
            assert_eq!(p.to_string(), s);
        }
        assert!("interval:0".parse::<FlushPolicy>().is_err());
        assert!("sometimes".parse::<FlushPolicy>().is_err());
    }
}
