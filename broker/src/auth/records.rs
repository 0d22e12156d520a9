//! The records of the internal `__security` topic and their codec.
//!
//! Every change to principals, tokens and rules is one record, appended durably before the
//! change takes effect; the broker replays them in order at start. A record's value is one
//! version byte ([`VERSION`]) then a JSON object tagged by `type`. The layout is documented
//! in `docs/SECURITY.md`.

use serde::{Deserialize, Serialize};

use super::acl::AclRule;

/// The version byte that starts every record this broker writes.
pub const VERSION: u8 = 1;

/// One change to the security state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum SecurityRecord {
    /// A principal was created.
    PrincipalCreated {
        /// Its name.
        name: String,
    },
    /// A token was created; only its hash is kept.
    TokenCreated {
        /// The token's id (not a secret).
        id: String,
        /// The principal it authenticates as.
        principal: String,
        /// The SHA-256 of the token, as lowercase hex.
        sha256: String,
        /// Creation time, ms since the Unix epoch.
        created_at_ms: i64,
        /// Expiry, ms since the Unix epoch; 0 for never.
        expires_at_ms: i64,
    },
    /// A token was revoked.
    TokenRevoked {
        /// The token's id.
        id: String,
    },
    /// A rule was added.
    AclAdded {
        /// The rule.
        rule: AclRule,
    },
    /// Every rule equal to this one was removed.
    AclRemoved {
        /// The rule.
        rule: AclRule,
    },
    /// A compaction: the records from offset `start` to this one restate the whole state,
    /// so the segments before `start` may be deleted (see `auth::state`).
    Compacted {
        /// The offset of the rewrite's first record.
        start: u64,
    },
}

/// Why a stored record cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// The record is empty.
    #[error("empty security record")]
    Empty,
    /// Written by a newer broker (or damaged).
    #[error("security record version {0} is not understood (this broker reads {VERSION})")]
    Version(u8),
    /// The JSON does not decode.
    #[error("security record does not decode: {0}")]
    Json(#[source] serde_json::Error),
}

impl SecurityRecord {
    /// The record's bytes: the version byte, then JSON.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![VERSION];
        // Serializing plain strings, integers and enums cannot fail.
        serde_json::to_writer(&mut out, self).expect("a security record always serializes");
        out
    }

    /// Reads a record's bytes.
    pub fn decode(bytes: &[u8]) -> Result<SecurityRecord, RecordError> {
        let (&version, json) = bytes.split_first().ok_or(RecordError::Empty)?;
        if version != VERSION {
            return Err(RecordError::Version(version));
        }
        serde_json::from_slice(json).map_err(RecordError::Json)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::super::acl::{Operation, Pattern, Permission, ResourceType};
    use super::*;

    fn rule() -> impl Strategy<Value = AclRule> {
        (
            ".{0,20}",
            prop::sample::select(vec![
                ResourceType::Topic,
                ResourceType::Group,
                ResourceType::Subscription,
                ResourceType::Cluster,
            ]),
            ".{0,20}",
            prop::sample::select(vec![Pattern::Literal, Pattern::Prefix]),
            prop::sample::select(Operation::ALL.to_vec()),
            prop::sample::select(vec![Permission::Allow, Permission::Deny]),
        )
            .prop_map(
                |(principal, resource_type, resource_name, pattern, operation, permission)| {
                    AclRule {
                        principal,
                        resource_type,
                        resource_name,
                        pattern,
                        operation,
                        permission,
                    }
                },
            )
    }

    fn record() -> impl Strategy<Value = SecurityRecord> {
        prop_oneof![
            ".{0,30}".prop_map(|name| SecurityRecord::PrincipalCreated { name }),
            (
                ".{0,30}",
                ".{0,30}",
                "[0-9a-f]{64}",
                any::<i64>(),
                any::<i64>()
            )
                .prop_map(|(id, principal, sha256, created_at_ms, expires_at_ms)| {
                    SecurityRecord::TokenCreated {
                        id,
                        principal,
                        sha256,
                        created_at_ms,
                        expires_at_ms,
                    }
                }),
            ".{0,30}".prop_map(|id| SecurityRecord::TokenRevoked { id }),
            rule().prop_map(|rule| SecurityRecord::AclAdded { rule }),
            rule().prop_map(|rule| SecurityRecord::AclRemoved { rule }),
            any::<u64>().prop_map(|start| SecurityRecord::Compacted { start }),
        ]
    }

    proptest! {
        /// Every record reads back as written.
        #[test]
        fn records_round_trip(r in record()) {
            prop_assert_eq!(SecurityRecord::decode(&r.encode()).expect("decodes"), r);
        }

        /// Arbitrary bytes are an error, never a panic.
        #[test]
        fn garbage_is_an_error(bytes in prop::collection::vec(any::<u8>(), 0..64)) {
            let _ = SecurityRecord::decode(&bytes);
        }
    }

    #[test]
    fn an_unknown_version_is_refused() {
        let mut bytes = SecurityRecord::TokenRevoked { id: "x".into() }.encode();
        bytes[0] = 2;
        assert!(matches!(
            SecurityRecord::decode(&bytes),
            Err(RecordError::Version(2))
        ));
        assert!(matches!(
            SecurityRecord::decode(&[]),
            Err(RecordError::Empty)
        ));
    }
}
