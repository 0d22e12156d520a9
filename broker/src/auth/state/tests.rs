//! Compaction of `__security`: a rewrite cut short anywhere leaves the state exactly as it
//! was (a revoked token stays revoked), a complete one deletes the segments before it and
//! replays to the live state, a replica deletes only at the marker, and a replica whose log
//! restarts past what it held fails closed until the rewrite is whole.

use std::path::Path;
use std::sync::atomic::Ordering;

use rill_storage::StoreOptions;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::super::acl::{Pattern, Permission};
use super::*;
use crate::internal::compact::copy_batches;

/// A small segment: a few dozen changes span several, and a rewrite of a few kilobytes
/// spans several batches of a quarter segment.
const SEGMENT_BYTES: u64 = 4 << 10;

/// A single broker over `dir` with its security state; `__security` in segments of
/// `segment_bytes`.
fn single(dir: &Path, segment_bytes: u64) -> (Broker, Security) {
    let store = Store::open(StoreOptions::new(dir)).expect("open the store");
    let security = Security::open(store.clone(), &SecurityConfig::default(), segment_bytes)
        .expect("open the security state");
    let broker = Broker::new(
        store,
        crate::Config::new(dir),
        CancellationToken::new(),
        TaskTracker::new(),
    );
    (broker, security)
}

fn close(broker: Broker, security: Security) {
    broker.store().close().expect("close");
    drop((broker, security));
}

fn rule(principal: &str, topic: &str, permission: Permission) -> AclRule {
    AclRule {
        principal: principal.to_string(),
        resource_type: ResourceType::Topic,
        resource_name: topic.to_string(),
        pattern: Pattern::Prefix,
        operation: Operation::Produce,
        permission,
    }
}

/// Tokens that must authenticate, and tokens that must not (revoked or expired).
#[derive(Default)]
struct Tokens {
    live: Vec<String>,
    refused: Vec<String>,
}

/// Principals, tokens (some revoked, one expired) and rules (some removed), `rounds` times
/// over; creation times increase, so tokens list in a known order.
async fn populate(security: &Security, broker: &Broker, rounds: u32) -> Tokens {
    let mut tokens = Tokens::default();
    let now = rill_storage::log::now_ms();
    let mut clock = now - 1_000_000;
    for round in 0..rounds {
        for p in 0..4 {
            let principal = format!("app-{p}");
            security
                .create_principal(broker, &principal)
                .await
                .expect("principal");
            for t in 0..3 {
                clock += 1;
                let (token, entry) = security
                    .create_token(broker, &principal, 0, clock)
                    .await
                    .expect("token");
                if (round + p + t) % 3 == 0 {
                    security
                        .revoke_token(broker, &entry.id)
                        .await
                        .expect("revoke");
                    tokens.refused.push(token);
                } else {
                    tokens.live.push(token);
                }
            }
            let allow = rule(&principal, &format!("orders-{round}-"), Permission::Allow);
            let deny = rule(
                &principal,
                &format!("orders-{round}-secret"),
                Permission::Deny,
            );
            security.add_acl(broker, allow.clone()).await.expect("acl");
            security.add_acl(broker, deny).await.expect("acl");
            if p % 2 == 0 {
                security.remove_acl(broker, allow).await.expect("remove");
            }
        }
    }
    clock += 1;
    let (expired, _) = security
        .create_token(broker, "app-0", 1, clock)
        .await
        .expect("token");
    tokens.refused.push(expired);
    tokens
}

fn assert_authenticates(security: &Security, tokens: &Tokens, when: &str) {
    let now = rill_storage::log::now_ms();
    for t in &tokens.live {
        security
            .authenticate_token(t, now)
            .unwrap_or_else(|e| panic!("a live token is refused {when}: {e}"));
    }
    for t in &tokens.refused {
        assert!(
            security.authenticate_token(t, now).is_err(),
            "a revoked or expired token authenticates {when}"
        );
    }
}

fn state(security: &Security) -> State {
    security.inner.state.read().clone()
}

/// What a complete compaction keeps: principals, the live tokens in their order, the rules
/// as a set (their order decides nothing).
fn live(security: &Security) -> (Vec<String>, Vec<TokenEntry>, Vec<AclRule>) {
    let now = rill_storage::log::now_ms();
    let tokens = security
        .tokens("")
        .into_iter()
        .filter(|t| !t.revoked && (t.expires_at_ms == 0 || t.expires_at_ms > now))
        .collect();
    let mut acls = security.acls("");
    acls.sort_by_key(|r| format!("{r:?}"));
    (security.principals(), tokens, acls)
}

fn log_of(security: &Security) -> PartitionLog {
    security_log(&security.inner.store, SEGMENT_BYTES).expect("the log")
}

/// Every marker in `log`: (its offset, the start it names).
fn markers(log: &PartitionLog) -> Vec<(u64, u64)> {
    let mut found = Vec::new();
    crate::internal::replay_values(log, 0, corrupt, |offset, value| {
        if let SecurityRecord::Compacted { start } = SecurityRecord::decode(value).expect("decodes")
        {
            found.push((offset, start));
        }
        Ok(())
    })
    .expect("read the log");
    found
}

/// A rewrite stopped after any of its batches (the broker killed before the rest was
/// written, or a failover): nothing was deleted, and replay of the old records then the
/// partial rewrite gives exactly the state before it; a revoked token is still refused.
/// Without the rule that a known token's `TokenCreated` changes nothing, the restated
/// tokens would list twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rewrite_cut_short_after_any_batch_keeps_exactly_the_state() {
    const LIMIT_BYTES: usize = 1024;
    let batches = {
        let dir = tempfile::tempdir().expect("tempdir");
        let (broker, security) = single(dir.path(), 1 << 20);
        populate(&security, &broker, 2).await;
        security
            .rewrite_batches(LIMIT_BYTES)
            .expect("memory is whole")
            .0
            .len()
    };
    assert!(
        batches >= 3,
        "the state must span several batches to test a cut between them, got {batches}"
    );
    for k in 1..=batches {
        let dir = tempfile::tempdir().expect("tempdir");
        let (broker, security) = single(dir.path(), 1 << 20);
        let tokens = populate(&security, &broker, 2).await;
        let before = state(&security);
        let (rewrite, _) = security.rewrite_batches(LIMIT_BYTES).expect("whole");
        for batch in rewrite.into_iter().take(k) {
            crate::internal::append(&broker, SECURITY_TOPIC, 0, batch)
                .await
                .expect("append a rewrite batch");
        }
        // This broker's tail reads them, ...
        security.refresh().await.expect("refresh");
        assert_eq!(
            state(&security),
            before,
            "tail after batch {k} of {batches}"
        );
        assert_eq!(
            log_of(&security).log_start_offset(),
            0,
            "no marker, no deletion"
        );
        close(broker, security);
        // ... and so does a restart.
        let (_broker, security) = single(dir.path(), 1 << 20);
        assert_eq!(
            state(&security),
            before,
            "replay after a rewrite cut after batch {k} of {batches}"
        );
        assert_authenticates(&security, &tokens, &format!("after batch {k}"));
    }
}

/// On a single broker: once a segment's worth was appended, the live state is rewritten, a
/// marker names where, and the segments before it are deleted; a restart replays to the same
/// live state, and no revoked or expired token comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compaction_deletes_the_segments_before_it_and_replays_to_the_live_state() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (broker, security) = single(dir.path(), SEGMENT_BYTES);
    let tokens = populate(&security, &broker, 6).await;
    let log = log_of(&security);
    let start = log.log_start_offset();
    assert!(start > 0, "the log start should move past 0");
    let found = markers(&log);
    assert!(!found.is_empty(), "a marker ends each compaction");
    for (offset, marker_start) in &found {
        assert!(
            start <= *marker_start && marker_start <= offset,
            "log start {start}, marker at {offset} naming {marker_start}"
        );
    }
    let expected = live(&security);
    assert_authenticates(&security, &tokens, "before the restart");
    drop(log);
    close(broker, security);
    let (_broker, security) = single(dir.path(), SEGMENT_BYTES);
    assert_eq!(log_of(&security).log_start_offset(), start);
    assert_eq!(live(&security), expected);
    assert_authenticates(&security, &tokens, "after the restart");
}

/// A replica (another broker's copy, fed batch by batch as Raft applies them) deletes its
/// segments before a rewrite only once its tail reads the rewrite's marker; then a replica
/// whose memory lags behind the leader's log start (its log restarted there, past a
/// revocation it never read) refuses every token until it has read a whole rewrite, and
/// then refuses the revoked one. Without the rebuild, it would fold the rewrite onto its
/// old memory, where the revoked token is still live.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_deletes_at_the_marker_and_one_past_a_gap_fails_closed_until_whole() {
    let (leader_dir, replica_dir) = (
        tempfile::tempdir().expect("tempdir"),
        tempfile::tempdir().expect("tempdir"),
    );
    let (broker, leader) = single(leader_dir.path(), SEGMENT_BYTES);
    let replica_store = Store::open(StoreOptions::new(replica_dir.path())).expect("store");
    let replica =
        Security::open(replica_store, &SecurityConfig::default(), SEGMENT_BYTES).expect("replica");
    let (leader_log, replica_log) = (log_of(&leader), log_of(&replica));

    // Several segments' worth with compaction held off, then one compaction.
    leader
        .inner
        .compact_after_bytes
        .store(u64::MAX, Ordering::Relaxed);
    let tokens = populate(&leader, &broker, 4).await;
    let before = leader_log.high_watermark();
    copy_batches(&leader_log, 0..before, &replica_log);
    replica.refresh().await.expect("refresh");
    {
        let _writer = leader.inner.writer.lock().await;
        leader.compact(&broker).await.expect("compact");
    }
    assert!(leader_log.log_start_offset() > 0, "the leader deleted");
    let (marker, start) = *markers(&leader_log).last().expect("a marker");
    assert_eq!(
        start, before,
        "the rewrite starts at the log's end before it"
    );

    copy_batches(&leader_log, before..marker, &replica_log);
    replica.refresh().await.expect("refresh");
    assert_eq!(
        replica_log.log_start_offset(),
        0,
        "no marker, nothing deleted"
    );
    copy_batches(&leader_log, marker..marker + 1, &replica_log);
    replica.refresh().await.expect("refresh");
    assert_eq!(
        replica_log.log_start_offset(),
        leader_log.log_start_offset(),
        "the replica deletes the same segments"
    );
    assert_eq!(live(&replica), live(&leader));
    assert_authenticates(&replica, &tokens, "on the replica");

    // A lagging replica: a token live when it last read, revoked after, then the leader
    // writes and compacts past that revocation.
    let lagging_dir = tempfile::tempdir().expect("tempdir");
    let lagging_store = Store::open(StoreOptions::new(lagging_dir.path())).expect("store");
    let lagging =
        Security::open(lagging_store, &SecurityConfig::default(), SEGMENT_BYTES).expect("lagging");
    let lagging_log = log_of(&lagging);
    let (victim, entry) = leader
        .create_token(&broker, "app-1", 0, rill_storage::log::now_ms())
        .await
        .expect("token");
    let read_to = leader_log.high_watermark();
    // It joins at the leader's log start, past the first rewrite's deleted segments.
    lagging_log
        .restart_at(leader_log.log_start_offset())
        .expect("restart");
    copy_batches(
        &leader_log,
        leader_log.log_start_offset()..read_to,
        &lagging_log,
    );
    lagging.refresh().await.expect("refresh");
    let now = rill_storage::log::now_ms();
    lagging
        .authenticate_token(&victim, now)
        .expect("live when the lagging replica read it");
    leader
        .revoke_token(&broker, &entry.id)
        .await
        .expect("revoke");
    populate(&leader, &broker, 2).await;
    {
        let _writer = leader.inner.writer.lock().await;
        leader.compact(&broker).await.expect("compact");
    }
    let leader_start = leader_log.log_start_offset();
    assert!(
        leader_start > read_to,
        "the leader deleted past the lagging replica's end"
    );
    let (marker, _) = *markers(&leader_log).last().expect("a marker");

    lagging_log.restart_at(leader_start).expect("restart");
    copy_batches(&leader_log, leader_start..marker, &lagging_log);
    lagging.refresh().await.expect("refresh");
    for t in tokens.live.iter().chain([&victim]) {
        assert!(
            lagging.authenticate_token(t, now).is_err(),
            "a partial state authenticates nothing"
        );
    }
    copy_batches(&leader_log, marker..marker + 1, &lagging_log);
    lagging.refresh().await.expect("refresh");
    assert!(
        lagging.authenticate_token(&victim, now).is_err(),
        "the revocation in the gap holds"
    );
    assert_authenticates(&lagging, &tokens, "on the rebuilt replica");
    assert_eq!(live(&lagging), live(&leader));
}
