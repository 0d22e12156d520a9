//! Compaction of the replicated `__security` and `__producers` topics on 3 real broker
//! processes with authentication on: each topic's leader rewrites its latest state through
//! Raft once the topic has grown by a segment, and every replica deletes its own segments
//! before the rewrite, so both stay bounded. Then kill -9 of the `__security` leader: a
//! revoked token stays refused and a live one authenticates on every broker, the restarted
//! one (replaying its compacted log) too; and kill -9 of the `__producers` leader: a named
//! producer's re-init keeps its id with a higher epoch, and no id is given twice.

use std::collections::BTreeSet;
use std::time::Duration;

use rill_proto::v1 as pb;
use rill_tests::cluster::{while_unavailable, Extra, TestCluster};

const SECURITY_TOPIC: &str = "__security";
const PRODUCERS_TOPIC: &str = "__producers";
const ADMIN: &str = "admin-token-for-tests-0123456789";
const CLUSTER: &str = "cluster-token-for-tests-98765432";

/// The longest an election, a commit or a failover may take in this test.
const DEADLINE: Duration = Duration::from_secs(30);
/// The longest compaction may take to show on every replica's disk (it runs within the
/// change that crosses the threshold; followers act as they apply the marker).
const COMPACTION_DEADLINE: Duration = Duration::from_secs(30);
/// Tiny state segments (the smallest accepted), so a few hundred changes compact each topic.
const SEGMENT_BYTES: &str = "16384";
/// Tokens created, and of them the ones revoked (every one but each fourth).
const TOKENS: usize = 160;
/// Named producers, each initialised this many times (a commit of its id and epoch each).
const NAMES: usize = 4;
const INITS_PER_NAME: usize = 110;

/// Retries `call` on UNAVAILABLE until the deadline, through the client library's errors;
/// any other error fails the test.
async fn retrying<T, F, Fut>(what: &str, mut call: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    while_unavailable(DEADLINE, || {
        let fut = call();
        async move { fut.await.map(tonic::Response::into_inner) }
    })
    .await
    .unwrap_or_else(|s| panic!("{what}: {s:?}"))
}

async fn connect(cluster: &TestCluster, id: u64, token: &str) -> rill_client::Connection {
    let options = rill_client::ConnectOptions::new().token(token);
    rill_client::Connection::connect_with(&cluster.addr(id).to_string(), &options)
        .await
        .expect("connect")
}

/// Calls `$method` of the Security service on `$conn` with `$req`, retrying on UNAVAILABLE.
macro_rules! security {
    ($conn:expr, $method:ident, $req:expr) => {
        retrying(stringify!($method), || {
            let mut c = $conn.security();
            let req = $req;
            async move { c.$method(req).await }
        })
        .await
    };
}

/// InitProducer through `conn` (retried while the registry has no settled leader).
async fn init(conn: &rill_client::Connection, name: Option<&str>) -> (i64, i32) {
    let r = retrying("init producer", || {
        let mut log = conn.log();
        let req = pb::InitProducerRequest {
            producer_name: name.map(str::to_string),
        };
        async move { log.init_producer(req).await }
    })
    .await;
    (r.producer_id, r.producer_epoch)
}

/// Who node `id` says `token` is: the principal, or the status (UNAUTHENTICATED for a token
/// it refuses). A node that answers UNAVAILABLE (just restarted) is asked again.
async fn who(cluster: &TestCluster, id: u64, token: &str) -> Result<String, tonic::Status> {
    let c = connect(cluster, id, token).await;
    while_unavailable(DEADLINE, || {
        let mut s = c.security();
        async move { s.who_am_i(pb::WhoAmIRequest {}).await }
    })
    .await
    .map(|r| r.into_inner().principal)
}

/// Waits until node `id` authenticates `live` as alice (a broker just restarted may trail
/// the commit for a moment), then checks it refuses every token of `revoked`.
async fn assert_tokens(cluster: &TestCluster, id: u64, live: &[String], revoked: &[String]) {
    let until = tokio::time::Instant::now() + DEADLINE;
    for token in live {
        loop {
            match who(cluster, id, token).await {
                Ok(p) => {
                    assert_eq!(p, "alice", "node {id}");
                    break;
                }
                Err(s) => {
                    assert!(
                        tokio::time::Instant::now() < until,
                        "node {id} refuses a live token: {s:?}"
                    );
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
    for token in revoked {
        match who(cluster, id, token).await {
            Err(s) if s.code() == tonic::Code::Unauthenticated => {}
            other => panic!("node {id} accepts a revoked token: {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn security_and_producers_compact_on_every_replica_and_survive_kill_9_of_their_leaders() {
    let extra = Extra {
        args: vec!["--state-segment-bytes".into(), SEGMENT_BYTES.into()],
        env: vec![
            ("RILL_ADMIN_TOKEN".into(), ADMIN.into()),
            ("RILL_CLUSTER_TOKEN".into(), CLUSTER.into()),
        ],
    };
    let mut cluster = TestCluster::start_with(3, extra).await.expect("start");
    let admin = connect(&cluster, 1, ADMIN).await;

    // Many token creates and revokes: the first ones' records end up in deleted segments.
    security!(
        admin,
        create_principal,
        pb::CreatePrincipalRequest {
            name: "alice".into()
        }
    );
    let (mut live, mut revoked) = (Vec::new(), Vec::new());
    for i in 0..TOKENS {
        let token = security!(
            admin,
            create_token,
            pb::CreateTokenRequest {
                principal: "alice".into(),
                expires_in_ms: 0,
            }
        );
        if i % 4 == 0 {
            live.push(token.token);
        } else {
            security!(
                admin,
                revoke_token,
                pb::RevokeTokenRequest {
                    token_id: token.token_id.clone()
                }
            );
            revoked.push(token.token);
        }
    }

    // Many named producer inits (each raises an epoch: a commit), and some unnamed ones.
    let producer = connect(&cluster, 1, ADMIN).await;
    let mut ids = BTreeSet::new();
    let mut named = Vec::new();
    for round in 0..INITS_PER_NAME {
        for n in 0..NAMES {
            let (id, epoch) = init(&producer, Some(&format!("app-{n}"))).await;
            if round == INITS_PER_NAME - 1 {
                named.push((id, epoch));
            }
        }
        if round % 10 == 0 {
            let (id, _) = init(&producer, None).await;
            assert!(ids.insert(id), "id {id} given twice");
        }
    }
    ids.extend(named.iter().map(|(id, _)| *id));

    for topic in [SECURITY_TOPIC, PRODUCERS_TOPIC] {
        let starts = cluster
            .wait_log_starts_past_zero(topic, 0, COMPACTION_DEADLINE)
            .await
            .expect("compacted on every replica");
        println!("{topic} log starts: {starts:?}");
    }
    // The oldest token, created and never revoked, and the first revoked one: both had their
    // records in segments now deleted everywhere.
    let (live, revoked) = (
        vec![live[0].clone(), live[live.len() - 1].clone()],
        vec![revoked[0].clone(), revoked[revoked.len() - 1].clone()],
    );

    // kill -9 the __security leader: the survivors hold, and so does the restarted one,
    // which replays its compacted log.
    let security_leader = cluster
        .wait_partition_leader_as(Some(ADMIN), SECURITY_TOPIC, 0, DEADLINE)
        .await
        .expect("leader of __security");
    cluster.kill(security_leader).await.expect("kill");
    for id in cluster.running() {
        assert_tokens(&cluster, id, &live, &revoked).await;
    }
    cluster.restart(security_leader).await.expect("restart");
    for id in cluster.ids() {
        assert_tokens(&cluster, id, &live, &revoked).await;
    }

    // kill -9 the __producers leader: a named producer's re-init keeps its id with a higher
    // epoch, and a fresh id was never given before.
    let producers_leader = cluster
        .wait_partition_leader_as(Some(ADMIN), PRODUCERS_TOPIC, 0, DEADLINE)
        .await
        .expect("leader of __producers");
    cluster.kill(producers_leader).await.expect("kill");
    let survivor = cluster.running()[0];
    let producer = connect(&cluster, survivor, ADMIN).await;
    for (n, (id, epoch)) in named.iter().enumerate() {
        let (again, next) = init(&producer, Some(&format!("app-{n}"))).await;
        assert_eq!(again, *id, "app-{n} keeps its id");
        assert!(next > *epoch, "app-{n}'s epoch {next} after {epoch}");
    }
    for _ in 0..5 {
        let (id, _) = init(&producer, None).await;
        assert!(ids.insert(id), "id {id} given twice");
    }
}
