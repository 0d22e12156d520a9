//! [`Security`]: principals, token hashes and rules, kept in the internal `__security` topic
//! (one partition, flushed on every append) and in memory.
//!
//! Each change is appended durably to the topic first (in a cluster, a Raft commit fsynced
//! by a majority: see [`crate::internal`]) and reaches memory only from the log, under one
//! async lock, so memory never holds what the log would not replay. At start the topic is
//! replayed from its first record; a record that does not decode stops the start rather
//! than skip a revocation. In a cluster every broker's memory follows its replica of the
//! log ([`Security::refresh`]), so each authenticates with every principal, token and rule,
//! and a revocation takes effect everywhere within a commit's time.
//!
//! # Compaction
//! Once the topic has grown by about a segment (`--state-segment-bytes`) since the last
//! compaction marker (counted by the log's tail, so a new leader or a restarted broker
//! knows it too), the writer (the single broker, or the settled leader of `__security`),
//! holding the writer lock so no change lands between, rewrites the live state
//! ([`crate::internal::compact`]): every principal, every token neither revoked nor expired,
//! every rule, in batches of about a quarter segment (each a durable commit), then a
//! [`SecurityRecord::Compacted`] marker naming the rewrite's first offset. Whoever tails the
//! log (the single broker's own refresh, every replica's in a cluster) deletes its sealed
//! segments that end before that offset once it reads the marker.
//!
//! Why a revocation never comes back:
//! - **A rewrite cut short** (a crash, a leader change: no marker) deletes nothing, so
//!   replay reads every old record, then some rewrite records. Each of those restates an
//!   item live when the rewrite began, and nothing changed between (the writer lock; a new
//!   leader's entries come after all of the old one's). Replaying them changes nothing:
//!   a principal or a rule already held is not added twice, and a `TokenCreated` whose hash
//!   is known changes nothing (it never clears a revocation, nor reorders). So the replay
//!   is exactly the state before the rewrite: a revoked token is still revoked, a removed
//!   rule still removed (the rewrite did not restate them, and the old records hold the
//!   revocation and the removal).
//! - **A complete compaction** deletes only segments before the marker's rewrite. Replay
//!   then reads a tail of the old records (every record of an item that comes after any of
//!   its records it kept: a revocation is after its token's creation, a removal after its
//!   rule's addition), then the whole rewrite, which restates every live item. An item
//!   revoked or removed before the rewrite is either absent, or created and revoked again
//!   within the tail; never live. The state is the one before the rewrite, less the revoked
//!   and expired tokens it dropped (refused as unknown instead of revoked or expired; a
//!   token expired by the clock stays dropped if the clock is set back). Tokens list by
//!   creation time, so their order holds; rules may list in another order, which decides
//!   nothing (a deny wins wherever it sits).
//! - **A replica whose log starts later** than its memory reached (a follower whose log was
//!   restarted at its leader's log start, after the leader deleted what it lacked) cannot
//!   fold the new records onto its memory: a revocation in the gap would be missed. It
//!   rebuilds from an empty state and, until it has read a marker whose rewrite its log
//!   holds whole (one always follows: its leader deleted only before such a marker), it
//!   authenticates no token and allows no rule (only the admin and cluster tokens, which
//!   are configuration): it fails closed rather than serve a partial state. Open does the
//!   same for a log that does not start at offset 0.
//!
//! A broker older than the marker refuses to start on a log holding one ("cannot be
//! replayed": the record kind does not decode), rather than guess.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::RwLock;
use rand::RngCore;
use rill_storage::batch::Record;
use rill_storage::{FlushPolicy, PartitionLog, Store, TopicConfig};
use sha2::{Digest, Sha256};

use super::acl::{self, AclRule, Operation, Resource, ResourceType};
use super::records::SecurityRecord;
use super::{
    AuthMethod, Caller, SecurityConfig, ADMIN_PRINCIPAL, BROKER_PRINCIPAL, SECURITY_TOPIC,
};
use crate::error::BrokerError;
use crate::state::Broker;

/// Bytes of randomness in a token (192 bits).
const TOKEN_BYTES: usize = 24;
/// The prefix of every token, so a leaked one is recognisable to secret scanners.
const TOKEN_PREFIX: &str = "rill_";

/// What the broker knows of one token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenEntry {
    /// The token's id.
    pub id: String,
    /// Its principal.
    pub principal: String,
    /// Creation time, ms since the Unix epoch.
    pub created_at_ms: i64,
    /// Expiry, ms since the Unix epoch; 0 for never.
    pub expires_at_ms: i64,
    /// Whether it was revoked.
    pub revoked: bool,
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct State {
    principals: BTreeSet<String>,
    /// SHA-256 hex → token, in creation order by `order`.
    tokens: HashMap<String, TokenEntry>,
    /// Token ids in creation order, with their hash.
    order: Vec<(String, String)>,
    acls: Vec<AclRule>,
}

impl State {
    fn apply(&mut self, record: SecurityRecord) {
        match record {
            SecurityRecord::PrincipalCreated { name } => {
                self.principals.insert(name);
            }
            SecurityRecord::TokenCreated {
                id,
                principal,
                sha256,
                created_at_ms,
                expires_at_ms,
            } => {
                // Known: a compaction restating it (module doc). It changes nothing, and
                // above all never clears a revocation.
                if self.tokens.contains_key(&sha256) {
                    return;
                }
                self.order.push((id.clone(), sha256.clone()));
                self.tokens.insert(
                    sha256,
                    TokenEntry {
                        id,
                        principal,
                        created_at_ms,
                        expires_at_ms,
                        revoked: false,
                    },
                );
            }
            SecurityRecord::TokenRevoked { id } => {
                if let Some((_, hash)) = self.order.iter().find(|(i, _)| *i == id) {
                    if let Some(t) = self.tokens.get_mut(hash) {
                        t.revoked = true;
                    }
                }
            }
            SecurityRecord::AclAdded { rule } => {
                if !self.acls.contains(&rule) {
                    self.acls.push(rule);
                }
            }
            SecurityRecord::AclRemoved { rule } => self.acls.retain(|r| *r != rule),
            SecurityRecord::Compacted { .. } => {}
        }
    }

    /// The records that restate the live state at `now_ms`: every principal, every token
    /// neither revoked nor expired (in creation order), every rule (in order).
    fn rewrite(&self, now_ms: i64) -> Vec<SecurityRecord> {
        let principals = self
            .principals
            .iter()
            .map(|name| SecurityRecord::PrincipalCreated { name: name.clone() });
        let tokens = self.order.iter().filter_map(|(_, hash)| {
            let t = self.tokens.get(hash)?;
            let expired = t.expires_at_ms != 0 && t.expires_at_ms <= now_ms;
            (!t.revoked && !expired).then(|| SecurityRecord::TokenCreated {
                id: t.id.clone(),
                principal: t.principal.clone(),
                sha256: hash.clone(),
                created_at_ms: t.created_at_ms,
                expires_at_ms: t.expires_at_ms,
            })
        });
        let rules = self
            .acls
            .iter()
            .map(|rule| SecurityRecord::AclAdded { rule: rule.clone() });
        principals.chain(tokens).chain(rules).collect()
    }
}

/// How far memory follows the log.
#[derive(Debug, Default)]
struct Tail {
    /// The offset memory holds every record before.
    next: u64,
    /// Set while rebuilding from a log that starts after what memory held (module doc):
    /// that log start, and the state replayed from it, published once a marker whose rewrite
    /// starts at or after it has been read.
    rebuilding: Option<(u64, State)>,
    /// The growth since the last compaction, which the writer compacts on.
    growth: crate::internal::compact::Growth,
}

/// The security state of a broker. A cheap clone.
#[derive(Debug, Clone)]
pub struct Security {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    enabled: bool,
    admin_hash: Option<String>,
    /// The cluster token's hash: the credential brokers send each other.
    cluster_hash: Option<String>,
    store: Store,
    /// A plain lock: held only to read or apply, never across an await.
    state: RwLock<State>,
    /// How far memory follows the log. Locked while the log is read into memory, so two
    /// refreshes never apply the same records.
    tail: parking_lot::Mutex<Tail>,
    /// Serialises changes (append, then apply), compactions included.
    writer: tokio::sync::Mutex<()>,
    /// The segment size of a `__security` created here (`--state-segment-bytes`).
    segment_bytes: u64,
    /// The growth since the last compaction that starts one: `segment_bytes` (tests hold it
    /// off).
    compact_after_bytes: std::sync::atomic::AtomicU64,
}

/// The SHA-256 of a token, as lowercase hex.
pub fn token_hash(token: &str) -> String {
    hex(&Sha256::digest(token.as_bytes()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn random_hex(n: usize) -> String {
    let mut buf = vec![0u8; n];
    rand::rng().fill_bytes(&mut buf);
    hex(&buf)
}

/// Checks a principal's name: 1 to 249 characters of `[a-zA-Z0-9._@=,-]`.
pub fn validate_principal(name: &str) -> Result<(), BrokerError> {
    let ok = !name.is_empty()
        && name.len() <= 249
        && name != "*"
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._@=,-".contains(c));
    if ok {
        Ok(())
    } else {
        Err(BrokerError::invalid(format!(
            "bad principal name {name:?}: use 1 to 249 characters of [a-zA-Z0-9._@=,-]"
        )))
    }
}

impl Security {
    /// Opens the security state: replays the `__security` topic when it exists (it is
    /// created by the first change, so a broker that never uses security has no such
    /// topic). `segment_bytes` is the segment size if the topic is created here. Blocking
    /// (file work): call it on the blocking pool.
    pub fn open(
        store: Store,
        config: &SecurityConfig,
        segment_bytes: u64,
    ) -> Result<Security, BrokerError> {
        let security = Security {
            inner: Arc::new(Inner {
                enabled: config.auth,
                admin_hash: config.admin_token.as_ref().map(|t| token_hash(&t.0)),
                cluster_hash: config.cluster_token.as_ref().map(|t| token_hash(&t.0)),
                store,
                state: RwLock::new(State::default()),
                tail: parking_lot::Mutex::new(Tail::default()),
                writer: tokio::sync::Mutex::new(()),
                segment_bytes,
                compact_after_bytes: std::sync::atomic::AtomicU64::new(segment_bytes),
            }),
        };
        // From offset 0: a log that starts later is rebuilt as after a gap (module doc). A
        // marker read here is acted on again: a crash may have come between it and the
        // deletion.
        security.refresh_blocking()?;
        {
            let state = security.inner.state.read();
            tracing::info!(
                principals = state.principals.len(),
                tokens = state.tokens.len(),
                acls = state.acls.len(),
                auth = config.auth,
                "security state loaded from {SECURITY_TOPIC}"
            );
        }
        Ok(security)
    }
}

/// The `__security` log, created (one partition, flushed on every append, kept forever) if
/// missing.
fn security_log(store: &Store, segment_bytes: u64) -> Result<PartitionLog, BrokerError> {
    Ok(store
        .internal_topic(SECURITY_TOPIC, security_topic_config(segment_bytes))?
        .partition(0)?)
}

/// The config of the `__security` topic: one partition, flushed on every append, kept
/// forever (compaction bounds it), in segments of `segment_bytes` (`--state-segment-bytes`).
/// Used when the topic is created; an existing topic keeps its own.
pub fn security_topic_config(segment_bytes: u64) -> TopicConfig {
    TopicConfig {
        partitions: 1,
        retention_ms: None,
        retention_bytes: None,
        flush: FlushPolicy::Always,
        segment_bytes,
        ..TopicConfig::default()
    }
}

/// What [`replay`] read.
struct Read {
    /// The offset reached.
    end: u64,
    /// The start of the last compaction marker read, if any.
    marker: Option<u64>,
    /// Bytes of the records after that marker (all read, if none).
    bytes: u64,
}

/// Applies every record of `log` from offset `from` to `state`.
fn replay(log: &PartitionLog, from: u64, state: &mut State) -> Result<Read, BrokerError> {
    let (mut marker, mut bytes) = (None, 0u64);
    let end = crate::internal::replay_values(log, from, corrupt, |offset, value| {
        let decoded = SecurityRecord::decode(value)
            .map_err(|e| corrupt(format!("the record at offset {offset}: {e}")))?;
        if let SecurityRecord::Compacted { start } = decoded {
            (marker, bytes) = (Some(start), 0);
        } else {
            bytes += value.len() as u64;
        }
        state.apply(decoded);
        Ok(())
    })?;
    Ok(Read { end, marker, bytes })
}

impl Security {
    /// Whether callers must authenticate.
    pub fn enabled(&self) -> bool {
        self.inner.enabled
    }

    /// The caller a bearer token stands for, or UNAUTHENTICATED (unknown, revoked or
    /// expired; the message does not say which token matched what).
    pub fn authenticate_token(&self, token: &str, now_ms: i64) -> Result<Caller, BrokerError> {
        let hash = token_hash(token);
        if self.inner.admin_hash.as_deref() == Some(hash.as_str()) {
            return Ok(Caller {
                principal: ADMIN_PRINCIPAL.to_string(),
                method: AuthMethod::AdminToken,
                superuser: true,
            });
        }
        if self.inner.cluster_hash.as_deref() == Some(hash.as_str()) {
            // A peer broker: it replicates every topic and forwards what its own callers
            // were already authorized for.
            return Ok(Caller {
                principal: BROKER_PRINCIPAL.to_string(),
                method: AuthMethod::Broker,
                superuser: true,
            });
        }
        let state = self.inner.state.read();
        match state.tokens.get(&hash) {
            Some(t) if t.revoked => Err(BrokerError::Unauthenticated(format!(
                "token {} is revoked",
                t.id
            ))),
            Some(t) if t.expires_at_ms != 0 && t.expires_at_ms <= now_ms => Err(
                BrokerError::Unauthenticated(format!("token {} has expired", t.id)),
            ),
            Some(t) => Ok(Caller {
                principal: t.principal.clone(),
                method: AuthMethod::Token,
                superuser: false,
            }),
            None => Err(BrokerError::Unauthenticated("unknown token".into())),
        }
    }

    /// Allows `caller` to do `op` on `resource`, or PERMISSION_DENIED naming the operation
    /// and the resource (never the rules). Internal topics (`__` prefix) need `admin`.
    /// Denials are logged with the principal, the operation and the resource.
    pub fn authorize(
        &self,
        caller: &Caller,
        op: Operation,
        resource: &Resource,
    ) -> Result<(), BrokerError> {
        if caller.superuser {
            return Ok(());
        }
        let internal = resource.kind == ResourceType::Topic && resource.name.starts_with("__");
        let needed = if internal && op != Operation::Describe {
            Operation::Admin
        } else {
            op
        };
        let allowed = acl::decide(
            &self.inner.state.read().acls,
            &caller.principal,
            needed,
            resource,
        );
        if allowed {
            return Ok(());
        }
        tracing::warn!(
            principal = %caller.principal,
            operation = %op,
            resource = %resource,
            "authorization denied"
        );
        Err(BrokerError::PermissionDenied {
            principal: caller.principal.clone(),
            operation: op,
            resource: resource.to_string(),
        })
    }

    /// Whether `caller` may do `op` on `resource` (for filtering lists; logs nothing).
    pub fn may(&self, caller: &Caller, op: Operation, resource: &Resource) -> bool {
        caller.superuser
            || acl::decide(
                &self.inner.state.read().acls,
                &caller.principal,
                op,
                resource,
            )
    }

    /// Appends `record` durably to `__security` (through `broker`: a Raft commit in a
    /// cluster), then brings memory up to the log, which now holds it.
    /// Compacts the topic once it has grown by a segment since the last compaction.
    async fn commit(&self, broker: &Broker, record: SecurityRecord) -> Result<(), BrokerError> {
        let _writer = self.inner.writer.lock().await;
        let record = security_record(&record);
        crate::internal::append(broker, SECURITY_TOPIC, 0, vec![record]).await?;
        self.refresh().await?;
        crate::internal::compact::compact_if_due(
            SECURITY_TOPIC,
            &self.inner.compact_after_bytes,
            &self.inner.tail,
            |t| &mut t.growth,
            || self.compact(broker),
        )
        .await;
        Ok(())
    }

    /// Rewrites the live state and appends the marker (module doc); the tail of the log, here
    /// [`Self::refresh`], deletes the segments before the rewrite. The caller holds the
    /// writer lock, so the state does not change meanwhile.
    async fn compact(&self, broker: &Broker) -> Result<(), BrokerError> {
        let limit = usize::try_from(self.inner.segment_bytes / 4).unwrap_or(usize::MAX);
        let Some((batches, end)) = self.rewrite_batches(limit) else {
            // Memory does not hold the whole state yet: a rewrite of it would lose some.
            return Ok(());
        };
        let count: usize = batches.iter().map(Vec::len).sum();
        let start =
            crate::internal::compact::rewrite(broker, SECURITY_TOPIC, batches, end, |start| {
                security_record(&SecurityRecord::Compacted { start })
            })
            .await?;
        self.refresh().await?;
        tracing::info!(start, records = count, "{SECURITY_TOPIC} compacted");
        Ok(())
    }

    /// The batches of a rewrite of the live state (each of about `limit_bytes`), and the
    /// offset memory reached (where the marker goes when there is nothing to rewrite); `None`
    /// while memory is being rebuilt.
    fn rewrite_batches(&self, limit_bytes: usize) -> Option<(Vec<Vec<Record>>, u64)> {
        let tail = self.inner.tail.lock();
        if tail.rebuilding.is_some() {
            return None;
        }
        let records = self.inner.state.read().rewrite(rill_storage::log::now_ms());
        let batches = crate::internal::compact::pack(
            records.iter().map(|r| vec![security_record(r)]),
            limit_bytes,
        );
        Some((batches, tail.next))
    }

    /// Applies to memory what this broker's `__security` log holds beyond it: the changes
    /// other brokers committed (in a cluster), or this one's last. Runs on the blocking pool.
    pub async fn refresh(&self) -> Result<(), BrokerError> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.refresh_blocking()).await?
    }

    /// Keeps memory following this broker's replica of `__security` in a cluster (see
    /// [`crate::internal::follow`]); nothing on a single broker.
    pub fn follow(&self, broker: &Broker) {
        let (a, b) = (self.clone(), self.clone());
        crate::internal::follow(
            broker,
            SECURITY_TOPIC,
            1,
            move |_| {
                let s = a.clone();
                async move {
                    if let Err(e) = s.refresh().await {
                        tracing::error!(error = %e, "the security state cannot follow its log");
                    }
                }
            },
            move |_| {
                let s = b.clone();
                async move { s.refresh().await }
            },
        );
    }

    /// Reads the log beyond memory into it; deletes the segments before a compaction marker
    /// it reads (this replica's own, module doc). Blocking.
    fn refresh_blocking(&self) -> Result<(), BrokerError> {
        let mut tail = self.inner.tail.lock();
        let log = security_log(&self.inner.store, self.inner.segment_bytes)?;
        let log_start = log.log_start_offset();
        if tail.next >= log.high_watermark() && tail.next >= log_start {
            return Ok(());
        }
        if tail.next < log_start {
            // Records between memory and the log start are gone: rebuild, failing closed.
            tracing::warn!(
                applied = tail.next,
                log_start,
                "{SECURITY_TOPIC} starts after what memory holds; rebuilding the security \
                 state from the log (no token authenticates until it is whole)"
            );
            tail.rebuilding = Some((log_start, State::default()));
            tail.next = log_start;
            tail.growth = crate::internal::compact::Growth::default();
            *self.inner.state.write() = State::default();
        }
        let mut state = match &tail.rebuilding {
            Some((_, rebuilt)) => rebuilt.clone(),
            None => self.inner.state.read().clone(),
        };
        let Read { end, marker, bytes } = replay(&log, tail.next, &mut state)?;
        tail.next = end;
        tail.growth.read(marker.is_some(), bytes);
        match tail.rebuilding.take() {
            Some((from, _)) if marker.is_none_or(|start| start < from) => {
                tail.rebuilding = Some((from, state));
            }
            _ => *self.inner.state.write() = state,
        }
        if let Some(start) = marker {
            crate::internal::compact::delete_before(SECURITY_TOPIC, &log, start);
        }
        Ok(())
    }

    /// Creates a principal (nothing changes when it exists).
    pub async fn create_principal(&self, broker: &Broker, name: &str) -> Result<(), BrokerError> {
        validate_principal(name)?;
        if self.inner.state.read().principals.contains(name) {
            return Ok(());
        }
        self.commit(
            broker,
            SecurityRecord::PrincipalCreated {
                name: name.to_string(),
            },
        )
        .await
    }

    /// The principals, sorted.
    pub fn principals(&self) -> Vec<String> {
        self.inner.state.read().principals.iter().cloned().collect()
    }

    /// Creates a token for an existing principal; returns the token (shown once) and its
    /// entry.
    pub async fn create_token(
        &self,
        broker: &Broker,
        principal: &str,
        expires_in_ms: u64,
        now_ms: i64,
    ) -> Result<(String, TokenEntry), BrokerError> {
        if !self.inner.state.read().principals.contains(principal) {
            return Err(BrokerError::invalid(format!(
                "principal {principal:?} does not exist; create it first"
            )));
        }
        let token = format!("{TOKEN_PREFIX}{}", random_hex(TOKEN_BYTES));
        let id = random_hex(8);
        let expires_at_ms = if expires_in_ms == 0 {
            0
        } else {
            now_ms.saturating_add(i64::try_from(expires_in_ms).unwrap_or(i64::MAX))
        };
        self.commit(
            broker,
            SecurityRecord::TokenCreated {
                id: id.clone(),
                principal: principal.to_string(),
                sha256: token_hash(&token),
                created_at_ms: now_ms,
                expires_at_ms,
            },
        )
        .await?;
        let entry = TokenEntry {
            id,
            principal: principal.to_string(),
            created_at_ms: now_ms,
            expires_at_ms,
            revoked: false,
        };
        Ok((token, entry))
    }

    /// The tokens (of `principal`, or all when empty), oldest first (by creation time, then
    /// in log order: a compaction may restate older tokens after newer ones).
    pub fn tokens(&self, principal: &str) -> Vec<TokenEntry> {
        let state = self.inner.state.read();
        let mut tokens: Vec<TokenEntry> = state
            .order
            .iter()
            .filter_map(|(_, hash)| state.tokens.get(hash))
            .filter(|t| principal.is_empty() || t.principal == principal)
            .cloned()
            .collect();
        tokens.sort_by_key(|t| t.created_at_ms);
        tokens
    }

    /// Revokes a token by id; NOT_FOUND-like INVALID_ARGUMENT when no token has that id.
    pub async fn revoke_token(&self, broker: &Broker, id: &str) -> Result<(), BrokerError> {
        if !self.inner.state.read().order.iter().any(|(i, _)| i == id) {
            return Err(BrokerError::invalid(format!("no token has id {id:?}")));
        }
        self.commit(broker, SecurityRecord::TokenRevoked { id: id.to_string() })
            .await
    }

    /// Adds a rule (nothing changes when an equal one exists).
    pub async fn add_acl(&self, broker: &Broker, rule: AclRule) -> Result<(), BrokerError> {
        rule.validate().map_err(BrokerError::invalid)?;
        if self.inner.state.read().acls.contains(&rule) {
            return Ok(());
        }
        self.commit(broker, SecurityRecord::AclAdded { rule }).await
    }

    /// Removes every rule equal to `rule`; returns how many there were.
    pub async fn remove_acl(&self, broker: &Broker, rule: AclRule) -> Result<u32, BrokerError> {
        let n = self
            .inner
            .state
            .read()
            .acls
            .iter()
            .filter(|r| **r == rule)
            .count();
        if n > 0 {
            self.commit(broker, SecurityRecord::AclRemoved { rule })
                .await?;
        }
        Ok(u32::try_from(n).unwrap_or(u32::MAX))
    }

    /// The rules (of `principal`, or all when empty), in the order they were added.
    pub fn acls(&self, principal: &str) -> Vec<AclRule> {
        self.inner
            .state
            .read()
            .acls
            .iter()
            .filter(|r| principal.is_empty() || r.principal == principal)
            .cloned()
            .collect()
    }
}

/// A `__security` record holding `record`, stamped now.
fn security_record(record: &SecurityRecord) -> Record {
    crate::internal::compact::record(None, Bytes::from(record.encode()))
}

fn corrupt(what: String) -> BrokerError {
    BrokerError::Internal(format!(
        "the {SECURITY_TOPIC} topic cannot be replayed ({what}); the broker will not start \
         with a security state it cannot read"
    ))
}

#[cfg(test)]
mod tests;
