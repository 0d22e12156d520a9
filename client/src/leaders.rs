//! [`Leaders`]: following partition leaders in a cluster.
//!
//! A broker that does not lead a replicated partition refuses a produce with
//! FAILED_PRECONDITION and the leader's address in the `rill-leader` metadata key. [`Leaders`]
//! remembers, per partition, the connection to the leader it was sent to, and keeps one
//! connection per address, so a producer follows a leader change with one redirected retry.
//! A single broker never answers that way, and this costs nothing there.

use std::collections::HashMap;

use std::sync::{Mutex, MutexGuard};
use tonic::{Code, Status};

use crate::connection::Connection;
use crate::error::Result;

/// The metadata key a broker puts the partition leader's address in.
pub const LEADER_METADATA_KEY: &str = "rill-leader";

/// The leader's address a refusal names, if it is a not-the-leader refusal.
pub fn leader_hint(status: &Status) -> Option<String> {
    if status.code() != Code::FailedPrecondition {
        return None;
    }
    status
        .metadata()
        .get(LEADER_METADATA_KEY)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

/// Locks a mutex; a poisoned one is still consistent here (plain map inserts and removes).
trait Guard<T> {
    fn guard(&self) -> MutexGuard<'_, T>;
}

impl<T> Guard<T> for Mutex<T> {
    fn guard(&self) -> MutexGuard<'_, T> {
        self.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Connections to partition leaders, by partition and by address.
#[derive(Debug, Default)]
pub struct Leaders {
    by_partition: Mutex<HashMap<(String, u32), Connection>>,
    by_address: Mutex<HashMap<String, Connection>>,
}

impl Leaders {
    /// The connection last known to lead partition `p` of `topic`, if any.
    pub fn get(&self, topic: &str, p: u32) -> Option<Connection> {
        self.by_partition
            .guard()
            .get(&(topic.to_string(), p))
            .cloned()
    }

    /// Records `address` as the leader of partition `p` of `topic` and returns a connection
    /// to it (reused if one is open). A new connection takes `origin`'s TLS and token
    /// settings: a leader of a cluster that wants TLS and tokens wants them as much as the
    /// broker first connected to.
    pub async fn follow(
        &self,
        origin: &Connection,
        topic: &str,
        p: u32,
        address: &str,
    ) -> Result<Connection> {
        let known = self.by_address.guard().get(address).cloned();
        let conn = match known {
            Some(c) => c,
            None => {
                let c = origin.connect_like(address).await?;
                self.by_address
                    .guard()
                    .insert(address.to_string(), c.clone());
                c
            }
        };
        self.by_partition
            .guard()
            .insert((topic.to_string(), p), conn.clone());
        Ok(conn)
    }

    /// Uses `conn` for partition `p` of `topic` until a leader is named.
    pub fn set(&self, topic: &str, p: u32, conn: Connection) {
        self.by_partition
            .guard()
            .insert((topic.to_string(), p), conn);
    }

    /// Forgets partition `p`'s leader (its connection failed).
    pub fn forget(&self, topic: &str, p: u32) {
        self.by_partition.guard().remove(&(topic.to_string(), p));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_failed_precondition_with_the_key_is_a_hint() {
        let mut s = Status::failed_precondition("not the leader");
        assert_eq!(leader_hint(&s), None);
        s.metadata_mut().insert(
            LEADER_METADATA_KEY,
            "127.0.0.1:7003".parse().expect("value"),
        );
        assert_eq!(leader_hint(&s).as_deref(), Some("127.0.0.1:7003"));
        let mut u = Status::unavailable("no leader");
        u.metadata_mut().insert(
            LEADER_METADATA_KEY,
            "127.0.0.1:7003".parse().expect("value"),
        );
        assert_eq!(leader_hint(&u), None);
    }
}
