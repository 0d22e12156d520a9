//! [`Leaders`]: finding and following partition leaders in a cluster.
//!
//! Before the first request to a partition, [`Leaders::find`] asks the bootstrap broker's
//! `Cluster.Metadata` for the topic (one call per topic, shared by its partitions) and sends
//! the request straight to the leader it names. A single broker has no `Cluster` service: its
//! UNIMPLEMENTED is remembered, so it costs one call per client and nothing per request.
//!
//! When a try to a leader fails with UNAVAILABLE or a broken connection
//! ([`Leaders::leave`]), or goes unanswered for long ([`Leaders::watch_try`]), the other
//! brokers are asked who leads, and the answer naming the leader of the highest Raft term
//! wins ([`rank_leaders`]): a leader cut off from the others keeps naming itself, in an older
//! term than the one the majority elected its successor in, so it is left for the new one.
//!
//! A broker that does not lead a replicated partition refuses a produce with
//! FAILED_PRECONDITION and the leader's address in the `rill-leader` metadata key;
//! [`Leaders::follow`] takes that too. One connection per address is kept and shared.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rill_proto::v1 as pb;
use tokio::time::Instant;
use tonic::{Code, Status};

use crate::connection::Connection;
use crate::error::{ClientError, Result};

/// The metadata key a broker puts the partition leader's address in.
pub const LEADER_METADATA_KEY: &str = "rill-leader";

/// How long one broker may take to accept a connection, or to answer `Metadata`, while
/// leaders are looked up: a paused or cut-off broker must not hold the lookup up.
pub const LOOKUP_TIMEOUT: Duration = Duration::from_secs(2);

/// How long a try at a cluster broker goes unanswered before the other brokers are asked
/// whether a newer leader was elected ([`Leaders::watch_try`]). A healthy leader answers far
/// sooner; asking costs one `Metadata` call per other broker, nothing when the answer comes.
pub const LEADER_CHECK_AFTER_MS: u64 = 1_000;
/// How often they are asked again while the try stays unanswered.
pub const LEADER_CHECK_EVERY_MS: u64 = 500;

/// What became of a try watched by [`Leaders::watch_try`].
#[derive(Debug)]
pub enum Watched<T> {
    /// The broker answered (or failed).
    Answer(std::result::Result<T, Status>),
    /// The broker did not answer, and the other brokers name the broker at this address as
    /// the leader of a newer term: the partition is routed there, and the try was dropped.
    Moved(String),
}

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

/// What one broker's `Metadata` answer says about one partition's leader.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaderView {
    /// The leader's node id; 0 when the broker knows none.
    pub leader: u64,
    /// The leader's address; empty when the broker knows none.
    pub address: String,
    /// The Raft term the leader leads in (0 for a partition that is not replicated).
    pub term: u64,
}

/// A broker some answer named as a partition's leader.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// Its node id.
    pub node_id: u64,
    /// Its address.
    pub address: String,
    /// The highest term any answer named it leader in.
    pub term: u64,
}

/// The leaders several brokers' answers name for one partition, best first: the highest
/// term first (Raft elects at most one leader per term, so it is the newest leader), then
/// the one more answers name, then the lower node id. Answers that know no leader are left
/// out; each broker appears once, with the highest term it was named in.
pub fn rank_leaders(views: &[LeaderView]) -> Vec<Candidate> {
    // node id -> (address, term, answers naming it in that term)
    let mut named: HashMap<u64, (String, u64, usize)> = HashMap::new();
    for v in views
        .iter()
        .filter(|v| v.leader != 0 && !v.address.is_empty())
    {
        let e = named
            .entry(v.leader)
            .or_insert_with(|| (v.address.clone(), v.term, 0));
        if v.term > e.1 {
            *e = (v.address.clone(), v.term, 0);
        }
        if v.term == e.1 {
            e.2 += 1;
        }
    }
    let mut ranked: Vec<(Candidate, usize)> = named
        .into_iter()
        .map(|(node_id, (address, term, votes))| {
            (
                Candidate {
                    node_id,
                    address,
                    term,
                },
                votes,
            )
        })
        .collect();
    ranked.sort_by(|(a, av), (b, bv)| {
        b.term
            .cmp(&a.term)
            .then(bv.cmp(av))
            .then(a.node_id.cmp(&b.node_id))
    });
    ranked.into_iter().map(|(c, _)| c).collect()
}

/// The partition's leader as `answer` names it.
fn view_of(answer: &pb::MetadataResponse, topic: &str, p: u32) -> Option<LeaderView> {
    let t = answer.topics.iter().find(|t| t.name == topic)?;
    let m = t.partitions.iter().find(|m| m.partition == p)?;
    Some(LeaderView {
        leader: m.leader,
        address: m.leader_address.clone(),
        term: m.leader_term,
    })
}

/// Where requests for one partition go now.
#[derive(Debug, Clone)]
struct Route {
    conn: Connection,
    /// The term `Metadata` named the leader in (0 after a redirect or a fallback).
    term: u64,
}

/// Whether the brokers answer `Cluster.Metadata`.
#[derive(Debug, Default, Clone)]
enum Discovery {
    /// Not asked yet.
    #[default]
    Unknown,
    /// A single broker (UNIMPLEMENTED), or one that will not tell: requests go to the
    /// bootstrap broker and follow redirects.
    Unsupported,
    /// A cluster, with its brokers as the last answer listed them: `(node id, address)`.
    Brokers(Vec<(u64, String)>),
}

/// The last `Metadata` round for a topic: the ranked leaders of each partition.
#[derive(Debug)]
struct TopicView {
    fetched_at: Instant,
    ranked: HashMap<u32, Vec<Candidate>>,
}

type TopicCell = Arc<tokio::sync::Mutex<Option<TopicView>>>;

/// Connections to partition leaders, by partition and by address, and what the brokers said.
#[derive(Debug, Default)]
pub struct Leaders {
    routes: Mutex<HashMap<(String, u32), Route>>,
    by_address: Mutex<HashMap<String, Connection>>,
    discovery: Mutex<Discovery>,
    /// Per topic: the last lookup, behind an async lock so that the partitions of a topic
    /// looking their leaders up at once share one round of `Metadata` calls.
    topics: Mutex<HashMap<String, TopicCell>>,
}

impl Leaders {
    /// The connection partition `p` of `topic` uses now, if one was chosen.
    pub fn get(&self, topic: &str, p: u32) -> Option<Connection> {
        self.routes
            .guard()
            .get(&(topic.to_string(), p))
            .map(|r| r.conn.clone())
    }

    /// Whether the brokers are known to be a cluster (they answered `Metadata`).
    pub fn is_cluster(&self) -> bool {
        matches!(*self.discovery.guard(), Discovery::Brokers(_))
    }

    /// The connection to partition `p`'s leader: the one in use, or the one `Metadata`
    /// names (asked of `origin`, the bootstrap broker, once per topic; of the other brokers
    /// when it names none). `None` on a single broker, or when no broker knows a leader: the
    /// caller then sends to `origin`, which redirects or answers UNAVAILABLE.
    pub async fn find(&self, origin: &Connection, topic: &str, p: u32) -> Option<Connection> {
        if let Some(c) = self.get(topic, p) {
            return Some(c);
        }
        if matches!(*self.discovery.guard(), Discovery::Unsupported) {
            return None;
        }
        let ranked = self.lookup(origin, topic, p, None, None).await;
        self.take_first(origin, topic, p, &ranked).await
    }

    /// After a try at `failed` (partition `p`'s leader as far as known) failed with
    /// UNAVAILABLE, a broken connection or no answer: asks the other brokers who leads and
    /// routes the partition to the leader of the newest term that accepts a connection,
    /// which may be `failed` again when no broker knows a newer one. When none names a
    /// leader (an election is running), the next broker of the list after `failed` takes the
    /// next try. Returns the connection chosen.
    pub async fn leave(
        &self,
        origin: &Connection,
        topic: &str,
        p: u32,
        failed: &Connection,
    ) -> Option<Connection> {
        let since = Instant::now();
        if matches!(*self.discovery.guard(), Discovery::Unsupported) {
            self.forget(topic, p);
            return None;
        }
        let ranked = self
            .lookup(origin, topic, p, Some(since), Some(failed.addr()))
            .await;
        if let Some(c) = self.take_first(origin, topic, p, &ranked).await {
            return Some(c);
        }
        self.forget(topic, p);
        let next = failed
            .clone()
            .with_bootstrap(origin.bootstrap())
            .next_in_list()
            .await?;
        self.set(topic, p, next.clone());
        Some(next)
    }

    /// While a try at `current` goes unanswered: asks the other brokers who leads, and when
    /// they name another broker as leader of a newer term than the one `current` was chosen
    /// in (a leader cut off from the majority, which elected a successor), routes partition
    /// `p` there and returns its connection. `None`: `current` is still the best known.
    pub async fn newer(
        &self,
        origin: &Connection,
        topic: &str,
        p: u32,
        current: &Connection,
    ) -> Option<Connection> {
        let known_term = self
            .routes
            .guard()
            .get(&(topic.to_string(), p))
            .map_or(0, |r| r.term);
        let ranked = self
            .lookup(origin, topic, p, Some(Instant::now()), Some(current.addr()))
            .await;
        let best = ranked.first()?;
        if best.address == current.addr() || best.term <= known_term {
            return None;
        }
        let conn = self.connect(origin, &best.address).await.ok()?;
        tracing::debug!(topic, partition = p, from = current.addr(), to = %best.address, term = best.term, "leaving an unanswering leader for a newer one");
        self.route(topic, p, conn.clone(), best.term);
        Some(conn)
    }

    /// Awaits `call`, a try at `current` for partition `p` of `topic`. A try unanswered for
    /// [`LEADER_CHECK_AFTER_MS`] makes it ask the other brokers who leads, and again every
    /// [`LEADER_CHECK_EVERY_MS`] (see [`Leaders::newer`]): when they name another broker as
    /// leader of a newer term (`current` was cut off from the majority, which elected a
    /// successor), the try is dropped and the new leader's address returned. Brokers known not to
    /// answer `Metadata` (a single broker) are not asked: the try is simply awaited.
    pub async fn watch_try<T>(
        &self,
        origin: &Connection,
        topic: &str,
        p: u32,
        current: &Connection,
        call: impl std::future::Future<Output = std::result::Result<T, Status>>,
    ) -> Watched<T> {
        if matches!(*self.discovery.guard(), Discovery::Unsupported) {
            return Watched::Answer(call.await);
        }
        let watch = async {
            let mut wait = Duration::from_millis(LEADER_CHECK_AFTER_MS);
            loop {
                tokio::time::sleep(wait).await;
                if let Some(newer) = self.newer(origin, topic, p, current).await {
                    return newer;
                }
                wait = Duration::from_millis(LEADER_CHECK_EVERY_MS);
            }
        };
        tokio::select! {
            answer = call => Watched::Answer(answer),
            newer = watch => Watched::Moved(newer.addr().to_string()),
        }
    }

    /// Records `address` as the leader of partition `p` of `topic` (a redirect named it) and
    /// returns a connection to it (reused if one is open). A new connection takes `origin`'s
    /// TLS and token settings: a leader of a cluster that wants TLS and tokens wants them as
    /// much as the broker first connected to.
    pub async fn follow(
        &self,
        origin: &Connection,
        topic: &str,
        p: u32,
        address: &str,
    ) -> Result<Connection> {
        let conn = self.connect(origin, address).await?;
        self.set(topic, p, conn.clone());
        Ok(conn)
    }

    /// Uses `conn` for partition `p` of `topic` until a leader is named.
    pub fn set(&self, topic: &str, p: u32, conn: Connection) {
        self.route(topic, p, conn, 0);
    }

    /// Forgets partition `p`'s leader (its connection failed).
    pub fn forget(&self, topic: &str, p: u32) {
        self.routes.guard().remove(&(topic.to_string(), p));
    }

    fn route(&self, topic: &str, p: u32, conn: Connection, term: u64) {
        self.routes
            .guard()
            .insert((topic.to_string(), p), Route { conn, term });
    }

    /// Routes partition `p` to the first of `ranked` that accepts a connection.
    async fn take_first(
        &self,
        origin: &Connection,
        topic: &str,
        p: u32,
        ranked: &[Candidate],
    ) -> Option<Connection> {
        for c in ranked {
            if let Ok(conn) = self.connect(origin, &c.address).await {
                self.route(topic, p, conn.clone(), c.term);
                return Some(conn);
            }
        }
        None
    }

    /// A connection to `address` with `origin`'s settings and address list, reused if one
    /// is open; at most [`LOOKUP_TIMEOUT`] to make.
    async fn connect(&self, origin: &Connection, address: &str) -> Result<Connection> {
        if address == origin.addr() {
            return Ok(origin.clone());
        }
        if let Some(c) = self.by_address.guard().get(address).cloned() {
            return Ok(c);
        }
        let made = connect_within(origin, address).await?;
        let mut by_address = self.by_address.guard();
        Ok(by_address
            .entry(address.to_string())
            .or_insert(made)
            .clone())
    }

    fn topic_cell(&self, topic: &str) -> TopicCell {
        Arc::clone(self.topics.guard().entry(topic.to_string()).or_default())
    }

    /// The ranked leaders of partition `p` of `topic`. Without `fresh_since`: from the
    /// topic's last lookup if it names one, else from `origin`'s answer, else from every
    /// known broker's. With it: from a round of every known broker but `avoid` made after
    /// `fresh_since` (shared with the topic's other partitions that ask at the same time).
    async fn lookup(
        &self,
        origin: &Connection,
        topic: &str,
        p: u32,
        fresh_since: Option<Instant>,
        avoid: Option<&str>,
    ) -> Vec<Candidate> {
        let cell = self.topic_cell(topic);
        let mut view = cell.lock().await;
        if matches!(*self.discovery.guard(), Discovery::Unsupported) {
            // Learnt while this waited for the lock.
            return Vec::new();
        }
        if let Some(v) = view.as_ref() {
            let fresh = fresh_since.is_none_or(|t| v.fetched_at >= t);
            match v.ranked.get(&p) {
                Some(r) if fresh && !r.is_empty() => return r.clone(),
                _ if fresh && fresh_since.is_some() => return Vec::new(),
                _ => {}
            }
        }
        let mut answers = Vec::new();
        if fresh_since.is_none() {
            match ask(origin, topic).await {
                Ok(a) => {
                    let named = view_of(&a, topic, p).is_some_and(|v| v.leader != 0);
                    self.learn_brokers(&a);
                    answers.push(a);
                    if named {
                        let fetched = store(&mut view, answers, topic);
                        return fetched.get(&p).cloned().unwrap_or_default();
                    }
                }
                Err(s) if unsupported(&s) => {
                    *self.discovery.guard() = Discovery::Unsupported;
                    return Vec::new();
                }
                Err(_) => {}
            }
        }
        // Every other broker known, at once, each within its own deadline.
        let asked: Vec<String> = self
            .brokers(origin)
            .into_iter()
            .filter(|a| Some(a.as_str()) != avoid)
            .filter(|a| fresh_since.is_some() || a != origin.addr())
            .collect();
        let mut round = tokio::task::JoinSet::new();
        for address in asked {
            let open = if address == origin.addr() {
                Some(origin.clone())
            } else {
                self.by_address.guard().get(&address).cloned()
            };
            let origin = origin.clone();
            let topic = topic.to_string();
            round.spawn(async move {
                let (conn, made) = match open {
                    Some(c) => (c, false),
                    None => match connect_within(&origin, &address).await {
                        Ok(c) => (c, true),
                        Err(_) => return None,
                    },
                };
                let answer = ask(&conn, &topic).await.ok();
                Some((address, made.then_some(conn), answer))
            });
        }
        while let Some(done) = round.join_next().await {
            let Ok(Some((address, made, answer))) = done else {
                continue;
            };
            if let Some(conn) = made {
                self.by_address.guard().entry(address).or_insert(conn);
            }
            if let Some(a) = answer {
                self.learn_brokers(&a);
                answers.push(a);
            }
        }
        let fetched = store(&mut view, answers, topic);
        fetched.get(&p).cloned().unwrap_or_default()
    }

    /// The brokers' addresses: as the last `Metadata` answer listed them, else the
    /// bootstrap list.
    fn brokers(&self, origin: &Connection) -> Vec<String> {
        match &*self.discovery.guard() {
            Discovery::Brokers(b) if !b.is_empty() => b.iter().map(|(_, a)| a.clone()).collect(),
            _ => origin
                .bootstrap()
                .split(',')
                .map(str::trim)
                .filter(|a| !a.is_empty())
                .map(str::to_string)
                .collect(),
        }
    }

    fn learn_brokers(&self, answer: &pb::MetadataResponse) {
        if answer.brokers.is_empty() {
            return;
        }
        *self.discovery.guard() = Discovery::Brokers(
            answer
                .brokers
                .iter()
                .map(|b| (b.node_id, b.address.clone()))
                .collect(),
        );
    }
}

/// A new connection to `address` with `origin`'s settings and address list, within
/// [`LOOKUP_TIMEOUT`].
async fn connect_within(origin: &Connection, address: &str) -> Result<Connection> {
    Ok(
        tokio::time::timeout(LOOKUP_TIMEOUT, origin.connect_like(address))
            .await
            .map_err(|_| ClientError::Connect {
                addr: address.to_string(),
                message: format!("no connection within {} ms", LOOKUP_TIMEOUT.as_millis()),
            })??
            .with_bootstrap(origin.bootstrap()),
    )
}

/// Ranks every partition of `topic` over `answers` and keeps it as the topic's last lookup.
fn store(
    view: &mut Option<TopicView>,
    answers: Vec<pb::MetadataResponse>,
    topic: &str,
) -> HashMap<u32, Vec<Candidate>> {
    let mut views: HashMap<u32, Vec<LeaderView>> = HashMap::new();
    for a in &answers {
        for t in a.topics.iter().filter(|t| t.name == topic) {
            for m in &t.partitions {
                if let Some(v) = view_of(a, topic, m.partition) {
                    views.entry(m.partition).or_default().push(v);
                }
            }
        }
    }
    let ranked: HashMap<u32, Vec<Candidate>> = views
        .into_iter()
        .map(|(p, v)| (p, rank_leaders(&v)))
        .collect();
    *view = Some(TopicView {
        fetched_at: Instant::now(),
        ranked: ranked.clone(),
    });
    ranked
}

/// Whether a `Metadata` refusal means the brokers will never answer it (a single broker, or
/// a client not allowed to ask): leaders are then found by redirects alone.
fn unsupported(status: &Status) -> bool {
    matches!(
        status.code(),
        Code::Unimplemented | Code::PermissionDenied | Code::Unauthenticated
    )
}

/// `conn`'s broker's `Metadata` for `topic`, within [`LOOKUP_TIMEOUT`].
async fn ask(conn: &Connection, topic: &str) -> std::result::Result<pb::MetadataResponse, Status> {
    let mut request = tonic::Request::new(pb::MetadataRequest {
        topics: vec![topic.to_string()],
    });
    request.set_timeout(LOOKUP_TIMEOUT);
    match tokio::time::timeout(LOOKUP_TIMEOUT, conn.cluster().metadata(request)).await {
        Ok(answer) => answer.map(tonic::Response::into_inner),
        Err(_) => Err(Status::deadline_exceeded(format!(
            "no Metadata answer from {} within {} ms",
            conn.addr(),
            LOOKUP_TIMEOUT.as_millis()
        ))),
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

    fn v(leader: u64, term: u64) -> LeaderView {
        LeaderView {
            leader,
            address: if leader == 0 {
                String::new()
            } else {
                format!("10.0.0.{leader}:7171")
            },
            term,
        }
    }

    fn order(ranked: &[Candidate]) -> Vec<(u64, u64)> {
        ranked.iter().map(|c| (c.node_id, c.term)).collect()
    }

    /// The isolated old leader still names itself (term 4), a majority broker that has not
    /// heard of the election yet names it too; the newly elected leader's term wins.
    #[test]
    fn the_leader_of_the_newest_term_wins_over_a_stale_majority_of_answers() {
        let ranked = rank_leaders(&[v(1, 4), v(1, 4), v(2, 5)]);
        assert_eq!(order(&ranked), vec![(2, 5), (1, 4)]);
        assert_eq!(ranked[0].address, "10.0.0.2:7171");
    }

    #[test]
    fn answers_without_a_leader_are_left_out() {
        assert!(rank_leaders(&[v(0, 0), v(0, 7)]).is_empty());
        assert!(rank_leaders(&[]).is_empty());
        let no_address = LeaderView {
            leader: 3,
            address: String::new(),
            term: 9,
        };
        assert_eq!(order(&rank_leaders(&[no_address, v(2, 1)])), vec![(2, 1)]);
    }

    /// A broker named in an old term and again in a newer one counts once, with the newer.
    #[test]
    fn each_broker_appears_once_with_its_highest_term() {
        let ranked = rank_leaders(&[v(3, 2), v(3, 6), v(1, 5)]);
        assert_eq!(order(&ranked), vec![(3, 6), (1, 5)]);
    }

    /// Equal terms (a partition that is not replicated: term 0 everywhere): the leader more
    /// answers name comes first, then the lower node id.
    #[test]
    fn equal_terms_go_to_the_most_named_then_the_lowest_id() {
        assert_eq!(
            order(&rank_leaders(&[v(3, 0), v(2, 0), v(3, 0)])),
            vec![(3, 0), (2, 0)]
        );
        assert_eq!(
            order(&rank_leaders(&[v(3, 0), v(2, 0)])),
            vec![(2, 0), (3, 0)]
        );
    }

    #[test]
    fn a_partition_is_read_from_the_answer_of_its_topic() {
        let answer = pb::MetadataResponse {
            topics: vec![pb::TopicMetadata {
                name: "t".into(),
                replication_factor: 3,
                partitions: vec![pb::PartitionMetadata {
                    partition: 2,
                    leader: 3,
                    leader_address: "h:3".into(),
                    leader_term: 8,
                    ..Default::default()
                }],
            }],
            ..Default::default()
        };
        assert_eq!(
            view_of(&answer, "t", 2),
            Some(LeaderView {
                leader: 3,
                address: "h:3".into(),
                term: 8
            })
        );
        assert_eq!(view_of(&answer, "t", 0), None);
        assert_eq!(view_of(&answer, "u", 2), None);
    }
}
