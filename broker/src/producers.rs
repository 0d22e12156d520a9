//! Producer ids: the broker's registry behind `InitProducer`.
//!
//! Ids are handed out in order from a counter kept in `<data>/producer-ids` (TOML, replaced
//! atomically), so an id is never given twice, even across restarts, and an id at or past the
//! counter is one this broker never gave (refused at produce). In a cluster each broker gives
//! ids from its own range (node id × 2^40 onwards), so no two brokers give the same id, and an
//! id from another broker's range is accepted (its partitions' sequences still apply). A named producer keeps its id,
//! and each `InitProducer` with its name raises its epoch, which fences the older instance:
//! its batches are refused from then on. The per-partition sequences live with each
//! partition's log (`rill_storage::producers`), where they are rebuilt from the batches.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::error::BrokerError;

/// The registry's file name in the data folder.
pub const FILE: &str = "producer-ids";

/// A named producer's id and current epoch.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
struct Named {
    id: i64,
    epoch: i16,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Registry {
    /// The next id to give; every id below it was given.
    next_id: i64,
    /// Producer name → its id and current epoch.
    #[serde(default)]
    named: BTreeMap<String, Named>,
}

/// The broker's producer ids. Cheap to clone.
#[derive(Debug, Clone)]
pub struct ProducerIds {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    path: PathBuf,
    /// The first id of this broker's range: 0 alone, node id × 2^40 in a cluster.
    first_id: i64,
    /// In a cluster: ids outside this broker's range were given by another broker.
    clustered: bool,
    /// A plain lock: held for the lookup and the file write of one `InitProducer`, which runs
    /// on the blocking pool; produce checks take it only to read.
    registry: Mutex<Registry>,
    /// Id → epoch of the named producers, for the produce check.
    epochs: Mutex<BTreeMap<i64, i16>>,
}

impl ProducerIds {
    /// Opens the registry in `data_dir` (empty when the file is missing); `node_id` is the
    /// broker's in a cluster. Blocking.
    pub fn open(data_dir: &Path, node_id: Option<u64>) -> Result<Self, BrokerError> {
        let first_id = node_id.map_or(0, |n| ((n & 0x7f_ffff) as i64) << 40);
        let path = data_dir.join(FILE);
        let registry = match std::fs::read_to_string(&path) {
            Ok(text) => toml::from_str::<Registry>(&text).map_err(|e| {
                BrokerError::Internal(format!("{} does not parse: {e}", path.display()))
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Registry {
                next_id: first_id,
                named: BTreeMap::new(),
            },
            Err(e) => {
                return Err(BrokerError::Internal(format!(
                    "cannot read {}: {e}",
                    path.display()
                )))
            }
        };
        let epochs = registry.named.values().map(|n| (n.id, n.epoch)).collect();
        Ok(ProducerIds {
            inner: Arc::new(Inner {
                path,
                first_id,
                clustered: node_id.is_some(),
                registry: Mutex::new(registry),
                epochs: Mutex::new(epochs),
            }),
        })
    }

    /// Gives an id and epoch: a fresh id with epoch 0, or for `name` its id with the next
    /// epoch. Durable before it returns. Blocking (a file write).
    pub fn init(&self, name: Option<&str>) -> Result<(i64, i16), BrokerError> {
        if let Some(name) = name {
            rill_storage::config::validate_name("producer", name)?;
        }
        let mut registry = self.inner.registry.lock();
        let mut next = registry.clone();
        let given = match name {
            None => {
                let id = next.next_id;
                next.next_id += 1;
                (id, 0)
            }
            Some(name) => match next.named.get(name).copied() {
                Some(n) if n.epoch == i16::MAX => {
                    // Kafka gives a new id when the epoch would overflow.
                    let id = next.next_id;
                    next.next_id += 1;
                    (id, 0)
                }
                Some(n) => (n.id, n.epoch + 1),
                None => {
                    let id = next.next_id;
                    next.next_id += 1;
                    (id, 0)
                }
            },
        };
        if let Some(name) = name {
            next.named.insert(
                name.to_string(),
                Named {
                    id: given.0,
                    epoch: given.1,
                },
            );
        }
        let text = toml::to_string(&next)
            .map_err(|e| BrokerError::Internal(format!("encoding producer ids: {e}")))?;
        rill_storage::fsutil::atomic_write(&self.inner.path, text.as_bytes())?;
        *registry = next;
        if name.is_some() {
            self.inner.epochs.lock().insert(given.0, given.1);
        }
        Ok(given)
    }

    /// Checks a batch's producer id and epoch against what this broker gave: an id it never
    /// gave, or an epoch older than a named producer's latest, is refused
    /// (FAILED_PRECONDITION). Sequences are checked by the partition.
    pub fn check(&self, producer_id: i64, epoch: i16) -> Result<(), BrokerError> {
        if producer_id == -1 {
            return Ok(());
        }
        let next_id = self.inner.registry.lock().next_id;
        let ours = producer_id >= self.inner.first_id && producer_id < next_id;
        let elsewhere = self.inner.clustered
            && producer_id >= 0
            && !(self.inner.first_id..self.inner.first_id + (1 << 40)).contains(&producer_id);
        if !ours && !elsewhere {
            return Err(BrokerError::UnknownProducerId { producer_id });
        }
        if let Some(&current) = self.inner.epochs.lock().get(&producer_id) {
            if epoch < current {
                return Err(BrokerError::ProducerFenced {
                    producer_id,
                    epoch,
                    current,
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_a_cluster_each_broker_gives_its_own_range() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ids = ProducerIds::open(dir.path(), Some(2)).expect("open");
        assert_eq!(ids.init(None).expect("init"), (2 << 40, 0));
        // Given by broker 1: accepted here; an unused id of this broker's range is not.
        ids.check(1 << 40, 0).expect("another broker's id");
        assert!(ids.check((2 << 40) + 1, 0).is_err());
    }

    #[test]
    fn ids_are_never_given_twice_and_names_are_fenced_by_epoch() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ids = ProducerIds::open(dir.path(), None).expect("open");
        assert_eq!(ids.init(None).expect("init"), (0, 0));
        assert_eq!(ids.init(Some("app")).expect("init"), (1, 0));
        assert_eq!(ids.init(None).expect("init"), (2, 0));
        ids.check(1, 0).expect("current epoch");
        assert_eq!(ids.init(Some("app")).expect("init"), (1, 1));
        assert!(matches!(
            ids.check(1, 0),
            Err(BrokerError::ProducerFenced { current: 1, .. })
        ));
        assert!(matches!(
            ids.check(3, 0),
            Err(BrokerError::UnknownProducerId { producer_id: 3 })
        ));
        assert!(ids.init(Some("bad/name")).is_err());
        drop(ids);
        // After a restart: the counter and the epochs are where they were.
        let ids = ProducerIds::open(dir.path(), None).expect("reopen");
        assert_eq!(ids.init(None).expect("init"), (3, 0));
        assert_eq!(ids.init(Some("app")).expect("init"), (1, 2));
        assert!(ids.check(1, 1).is_err());
    }
}
