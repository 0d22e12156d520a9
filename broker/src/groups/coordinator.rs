//! [`Coordinator`]: every group's membership, in memory, persisted to the groups topic on
//! every change, and rebuilt from it at start.
//!
//! Each group sits behind its own async lock, held across a change and its durable write,
//! so a group's changes are applied and stored in one order and a heartbeat is answered only
//! once its change is stored. A failed write restores the state from before the change.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use rill_storage::Store;
use tokio::sync::{Mutex, OwnedMutexGuard};

use super::persist;
use super::state::{Group, Heartbeat, MembershipError, Reply};
use crate::error::BrokerError;
use crate::state::Broker;

/// Every group's membership. Cheap to clone: a handle around shared state.
#[derive(Debug, Clone)]
pub struct Coordinator {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// Group name → its state. A plain lock, held only to find or insert an entry.
    groups: parking_lot::Mutex<HashMap<String, Arc<Mutex<Group>>>>,
    /// The monotonic clock's zero.
    started: Instant,
    /// Member ids are `<prefix>-<n>`: the prefix (the start time) keeps them unique across
    /// restarts of the broker.
    id_prefix: String,
    next_id: AtomicU64,
}

impl Coordinator {
    /// Rebuilds every group from the metadata in the store's groups topic. A group whose
    /// stored state does not decode is logged and starts empty (its offsets are kept).
    pub fn load(store: &Store) -> Coordinator {
        let unix_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        let coordinator = Coordinator {
            inner: Arc::new(Inner {
                groups: parking_lot::Mutex::new(HashMap::new()),
                started: Instant::now(),
                // Random bits keep ids unique between brokers of a cluster too.
                id_prefix: format!("{unix_ms:x}{:04x}", rand::random::<u16>()),
                next_id: AtomicU64::new(0),
            }),
        };
        let now = coordinator.now_ms();
        let mut groups = coordinator.inner.groups.lock();
        for (name, bytes) in store.groups().all_metadata() {
            match persist::decode(&name, &bytes, now) {
                Ok(group) => {
                    groups.insert(name, Arc::new(Mutex::new(group)));
                }
                Err(reason) => {
                    tracing::error!(group = %name, reason = %reason, "damaged group membership state; the group starts with no members");
                }
            }
        }
        drop(groups);
        coordinator
    }

    /// Rebuilds the groups of partition `p` of the groups topic from the store's view (a
    /// broker that just became that partition's leader, with its view caught up): the
    /// in-memory state of those groups is replaced, and members' session timers restart.
    pub fn reload_partition(&self, store: &Store, p: u32) {
        let groups = store.groups();
        let now = self.now_ms();
        let mut fresh = HashMap::new();
        for (name, bytes) in groups.all_metadata() {
            if groups.partition_of(&name) != p {
                continue;
            }
            match persist::decode(&name, &bytes, now) {
                Ok(group) => {
                    fresh.insert(name, Arc::new(Mutex::new(group)));
                }
                Err(reason) => {
                    tracing::error!(group = %name, reason = %reason, "damaged group membership state; the group starts with no members");
                }
            }
        }
        let mut map = self.inner.groups.lock();
        map.retain(|name, _| groups.partition_of(name) != p);
        map.extend(fresh);
    }

    /// Each group's live members, for metrics. Blocking (it waits for each group's lock):
    /// call it off the async worker threads, as a scrape does.
    pub fn live_member_counts(&self) -> Vec<(String, usize)> {
        let groups: Vec<(String, Arc<Mutex<Group>>)> = self
            .inner
            .groups
            .lock()
            .iter()
            .map(|(name, g)| (name.clone(), Arc::clone(g)))
            .collect();
        groups
            .into_iter()
            .map(|(name, g)| {
                let live = g.blocking_lock().live_members();
                (name, live)
            })
            .collect()
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.inner.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn new_member_id(&self) -> String {
        let n = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        format!("{}-{n}", self.inner.id_prefix)
    }

    fn entry(&self, name: &str) -> Arc<Mutex<Group>> {
        Arc::clone(
            self.inner
                .groups
                .lock()
                .entry(name.to_string())
                .or_insert_with(|| Arc::new(Mutex::new(Group::new(name)))),
        )
    }

    fn existing(&self, name: &str) -> Option<Arc<Mutex<Group>>> {
        self.inner.groups.lock().get(name).cloned()
    }

    /// Handles a heartbeat for `group`, storing any change before answering.
    pub async fn heartbeat(
        &self,
        broker: &Broker,
        group: &str,
        hb: Heartbeat,
    ) -> Result<Reply, BrokerError> {
        let slot = self.entry(group);
        let mut g = slot.lock().await;
        let before = g.clone();
        let now = self.now_ms();
        let size = |t: &str| broker.topic(t).ok().map(|t| t.topic.partition_count());
        let mut new_id = || self.new_member_id();
        let mut result = g
            .heartbeat(hb, now, &size, &mut new_id)
            .map_err(BrokerError::from);
        if result.is_ok() && !persist::same_stored(&before, &g) {
            if let Err(e) = store_group(broker, &g).await {
                *g = before;
                result = Err(e);
            }
        }
        drop(g);
        self.forget_if_pristine(group, &slot);
        result
    }

    /// Drops `group`'s entry when it holds nothing (a refused first heartbeat created it):
    /// bad input leaves no trace. Only when the entry is still `slot` and nobody holds it.
    fn forget_if_pristine(&self, group: &str, slot: &Arc<Mutex<Group>>) {
        let mut groups = self.inner.groups.lock();
        let Some(current) = groups.get(group) else {
            return;
        };
        if !Arc::ptr_eq(current, slot) {
            return;
        }
        let pristine = current
            .try_lock()
            .is_ok_and(|g| g.members.is_empty() && g.epoch == 0);
        if pristine {
            groups.remove(group);
        }
    }

    /// Checks that `member_id` is a member of `group` at `epoch`, and returns the group's
    /// lock, held: the caller commits while holding it, so no change of membership slips
    /// between the check and the commit.
    pub async fn lock_for_commit(
        &self,
        group: &str,
        member_id: &str,
        epoch: i32,
    ) -> Result<OwnedMutexGuard<Group>, BrokerError> {
        let Some(slot) = self.existing(group) else {
            return Err(MembershipError::UnknownMember {
                group: group.to_string(),
                member: member_id.to_string(),
                given: epoch,
            }
            .into());
        };
        let g = slot.lock_owned().await;
        g.check_commit(member_id, epoch)?;
        Ok(g)
    }

    /// Fails with [`MembershipError::GroupNotEmpty`] while `group` has live members: moving
    /// the offsets of partitions that members are consuming would race their commits.
    pub async fn check_no_live_members(
        &self,
        group: &str,
        action: &'static str,
    ) -> Result<(), BrokerError> {
        let Some(slot) = self.existing(group) else {
            return Ok(());
        };
        let live = slot.lock().await.live_members();
        if live > 0 {
            return Err(MembershipError::GroupNotEmpty {
                group: group.to_string(),
                members: live,
                action,
            }
            .into());
        }
        Ok(())
    }

    /// A copy of `group`'s membership, if it has any state.
    pub async fn snapshot(&self, group: &str) -> Option<Group> {
        let slot = self.existing(group)?;
        let g = slot.lock().await;
        Some(g.clone())
    }

    /// Every group with membership state, sorted by name.
    pub async fn all(&self) -> Vec<Group> {
        let mut slots: Vec<(String, Arc<Mutex<Group>>)> = self
            .inner
            .groups
            .lock()
            .iter()
            .map(|(n, g)| (n.clone(), Arc::clone(g)))
            .collect();
        slots.sort_by(|a, b| a.0.cmp(&b.0));
        let mut out = Vec::with_capacity(slots.len());
        for (_, slot) in slots {
            out.push(slot.lock().await.clone());
        }
        out
    }

    /// Deletes `group` (offsets and state). Refused while it has live members.
    pub async fn delete(&self, broker: &Broker, group: &str) -> Result<(), BrokerError> {
        let slot = self.existing(group);
        let guard = match &slot {
            Some(slot) => Some(slot.lock().await),
            None => None,
        };
        if let Some(g) = &guard {
            let live = g.live_members();
            if live > 0 {
                return Err(MembershipError::GroupNotEmpty {
                    group: group.to_string(),
                    members: live,
                    action: "a deletion",
                }
                .into());
            }
        }
        let groups = broker.store().groups().clone();
        let name = group.to_string();
        let deleted = tokio::task::spawn_blocking(move || groups.delete_group(&name)).await?;
        // Forget the in-memory state whether or not the store had anything for it.
        self.inner.groups.lock().remove(group);
        drop(guard);
        deleted.map_err(BrokerError::from)
    }

    /// Removes timed-out members of every group, recomputes the targets and stores what
    /// changed. Returns how many members were removed.
    /// Only groups coordinated here count: in a cluster, those of the groups partitions this
    /// broker leads.
    pub async fn expire(&self, broker: &Broker) -> usize {
        let slots: Vec<Arc<Mutex<Group>>> = self
            .inner
            .groups
            .lock()
            .iter()
            .filter(|(name, _)| coordinates(broker, name))
            .map(|(_, slot)| Arc::clone(slot))
            .collect();
        let mut removed = 0;
        for slot in slots {
            let mut g = slot.lock().await;
            let before = g.clone();
            let gone = g.expire(self.now_ms());
            if gone.is_empty() {
                continue;
            }
            let size = |t: &str| broker.topic(t).ok().map(|t| t.topic.partition_count());
            g.refresh_target(&size);
            tracing::info!(group = %g.name, members = ?gone, "members removed: session or rebalance timeout");
            if let Err(e) = store_group(broker, &g).await {
                // Keep them until the write works: the next tick retries.
                tracing::warn!(group = %g.name, error = %e, "cannot store a membership change");
                *g = before;
                continue;
            }
            removed += gone.len();
        }
        removed
    }
}

/// Whether this broker coordinates `group`: always on a single broker; in a cluster, when it
/// is the settled leader of the group's partition of the groups topic.
pub fn coordinates(broker: &Broker, group: &str) -> bool {
    let p = broker.store().groups().partition_of(group);
    matches!(
        crate::internal::route(broker, rill_storage::groups::GROUPS_TOPIC, p),
        Ok(crate::internal::Route::Here)
    )
}

/// Stores `group`'s state durably in the groups topic.
async fn store_group(broker: &Broker, group: &Group) -> Result<(), BrokerError> {
    let bytes = persist::encode(group);
    let groups = broker.store().groups().clone();
    let name = group.name.clone();
    tokio::task::spawn_blocking(move || groups.put_metadata(&name, bytes)).await??;
    Ok(())
}
