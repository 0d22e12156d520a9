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

#[derive(Debug, Default, Clone)]
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
        }
    }
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
    /// The offset memory holds every record before. Locked while the log is read into
    /// memory, so two refreshes never apply the same records.
    applied_next: parking_lot::Mutex<u64>,
    /// Serialises changes: append, then apply.
    writer: tokio::sync::Mutex<()>,
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
    /// topic). Blocking (file work): call it on the blocking pool.
    pub fn open(store: Store, config: &SecurityConfig) -> Result<Security, BrokerError> {
        let mut state = State::default();
        let log = security_log(&store)?;
        let start = log.log_start_offset();
        let (replayed, applied_next) = replay(&log, start, &mut state)?;
        tracing::info!(
            records = replayed,
            principals = state.principals.len(),
            tokens = state.tokens.len(),
            acls = state.acls.len(),
            auth = config.auth,
            "security state loaded from {SECURITY_TOPIC}"
        );
        Ok(Security {
            inner: Arc::new(Inner {
                enabled: config.auth,
                admin_hash: config.admin_token.as_ref().map(|t| token_hash(&t.0)),
                cluster_hash: config.cluster_token.as_ref().map(|t| token_hash(&t.0)),
                store,
                state: RwLock::new(state),
                applied_next: parking_lot::Mutex::new(applied_next),
                writer: tokio::sync::Mutex::new(()),
            }),
        })
    }
}

/// The `__security` log, created (one partition, flushed on every append, kept forever) if
/// missing.
fn security_log(store: &Store) -> Result<PartitionLog, BrokerError> {
    Ok(store
        .internal_topic(SECURITY_TOPIC, security_topic_config())?
        .partition(0)?)
}

/// The config of the `__security` topic: one partition, flushed on every append, kept
/// forever.
pub fn security_topic_config() -> TopicConfig {
    TopicConfig {
        partitions: 1,
        retention_ms: None,
        retention_bytes: None,
        flush: FlushPolicy::Always,
        // Small: the state is a few records per principal, token and rule.
        segment_bytes: 1 << 20,
        ..TopicConfig::default()
    }
}

/// Applies every record of `log` from offset `from` to `state`; returns how many, and the
/// offset it reached.
fn replay(log: &PartitionLog, from: u64, state: &mut State) -> Result<(u64, u64), BrokerError> {
    let mut replayed = 0u64;
    let end = crate::internal::replay_values(log, from, corrupt, |offset, value| {
        let decoded = SecurityRecord::decode(value)
            .map_err(|e| corrupt(format!("the record at offset {offset}: {e}")))?;
        state.apply(decoded);
        replayed += 1;
        Ok(())
    })?;
    Ok((replayed, end))
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
    async fn commit(&self, broker: &Broker, record: SecurityRecord) -> Result<(), BrokerError> {
        let _writer = self.inner.writer.lock().await;
        let value = Bytes::from(record.encode());
        let record = Record {
            key: None,
            value,
            headers: Vec::new(),
            timestamp_ms: rill_storage::log::now_ms(),
        };
        crate::internal::append(broker, SECURITY_TOPIC, 0, vec![record]).await?;
        self.refresh().await
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

    fn refresh_blocking(&self) -> Result<(), BrokerError> {
        let mut applied = self.inner.applied_next.lock();
        let log = security_log(&self.inner.store)?;
        if *applied >= log.high_watermark() && *applied >= log.log_start_offset() {
            return Ok(());
        }
        let mut state = self.inner.state.read().clone();
        let (_, next) = replay(&log, *applied, &mut state)?;
        *self.inner.state.write() = state;
        *applied = next;
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

    /// The tokens (of `principal`, or all when empty), oldest first.
    pub fn tokens(&self, principal: &str) -> Vec<TokenEntry> {
        let state = self.inner.state.read();
        state
            .order
            .iter()
            .filter_map(|(_, hash)| state.tokens.get(hash))
            .filter(|t| principal.is_empty() || t.principal == principal)
            .cloned()
            .collect()
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

fn corrupt(what: String) -> BrokerError {
    BrokerError::Internal(format!(
        "the {SECURITY_TOPIC} topic cannot be replayed ({what}); the broker will not start \
         with a security state it cannot read"
    ))
}
