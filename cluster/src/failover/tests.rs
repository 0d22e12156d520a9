use super::*;

use crate::peers::ClusterConfig;
use crate::service::RaftService;
use openraft::raft::{VoteRequest, VoteResponse};
use openraft::{CommittedLeaderId, LogId, Vote};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// A first look of node `me` in a 3-voter group whose leader 3 died, everyone else live.
fn tick(me: NodeId) -> Tick {
    Tick {
        me,
        dead: 3,
        leader: Some(3),
        voted_for: Some(3),
        voters: [1, 2, 3].into(),
        live: [1, 2].into(),
        first: true,
        expired: false,
        outlogged: false,
        asked: false,
        votes_in_flight: 0,
        since_elect: None,
    }
}

/// A later look: one interval after the first round.
fn later(me: NodeId) -> Tick {
    Tick {
        first: false,
        leader: None,
        voted_for: Some(me),
        since_elect: Some(RETRY_INTERVAL),
        ..tick(me)
    }
}

#[tokio::test]
async fn a_refused_connection_is_down_and_an_accepted_one_is_not() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let accepted = probe(&addr, None).await;
    assert_eq!(accepted, Probe::Accepted);
    assert_eq!(verdict(accepted), Verdict::CheckAgain, "a live listener");
    drop(listener);
    let refused = probe(&addr, None).await;
    assert_eq!(refused, Probe::Refused);
    assert_eq!(verdict(refused), Verdict::Down, "nothing listens any more");
}

#[tokio::test]
async fn an_address_that_does_not_answer_decides_nothing() {
    // Unresolvable: nothing is known, so nothing is decided (the timers handle it).
    let unknown = probe("no-such-broker.invalid:7171", None).await;
    assert_eq!(unknown, Probe::Unknown);
    assert_eq!(verdict(unknown), Verdict::Undecided);
    // Only a refusal means down: a timeout (a paused or cut-off peer) never does, and a
    // reset (a listener closing) is looked at again.
    assert_eq!(verdict(Probe::Unknown), Verdict::Undecided);
    assert_eq!(
        verdict(Probe::Failed(std::io::ErrorKind::ConnectionReset)),
        Verdict::CheckAgain
    );
}

#[test]
fn every_surviving_voter_elects_once_at_once_to_give_up_its_lease() {
    assert_eq!(decide(&tick(2)), Step::Elect, "the driver");
    assert_eq!(decide(&tick(1)), Step::Elect, "the other survivor");
}

#[test]
fn after_the_first_round_the_highest_live_voter_elects_every_interval_the_next_every_third() {
    assert_eq!(decide(&later(2)), Step::Elect);
    assert_eq!(decide(&later(1)), Step::Wait);
    let two = Tick {
        since_elect: Some(RETRY_INTERVAL * 2),
        ..later(1)
    };
    assert_eq!(decide(&two), Step::Wait);
    let three = Tick {
        since_elect: Some(RETRY_INTERVAL * 3),
        ..later(1)
    };
    assert_eq!(
        decide(&three),
        Step::Elect,
        "in case the driver cannot help"
    );
    // The leader still named as the dead one (no election seen yet) changes nothing.
    let stale = Tick {
        leader: Some(3),
        ..later(2)
    };
    assert_eq!(decide(&stale), Step::Elect);
}

#[test]
fn a_voter_not_live_here_does_not_drive_and_the_next_one_does() {
    // Five voters, 3 dead, 5 not heard from: 4 drives, 2 and 1 wait.
    let five = |me| Tick {
        voters: [1, 2, 3, 4, 5].into(),
        live: [1, 2, 4].into(),
        ..later(me)
    };
    assert_eq!(decide(&five(4)), Step::Elect);
    assert_eq!(decide(&five(2)), Step::Wait);
    assert_eq!(decide(&five(1)), Step::Wait);
    let at = |me, intervals| Tick {
        since_elect: Some(RETRY_INTERVAL * intervals),
        ..five(me)
    };
    assert_eq!(decide(&at(2, 3)), Step::Elect, "rank 1: every 3 intervals");
    assert_eq!(decide(&at(1, 3)), Step::Wait, "rank 2: every 5 intervals");
    assert_eq!(decide(&at(1, 5)), Step::Elect);
}

#[test]
fn it_stops_as_soon_as_a_leader_is_known() {
    for me in [1, 2] {
        for leader in [1, 2] {
            let t = Tick {
                leader: Some(leader),
                ..later(me)
            };
            assert_eq!(decide(&t), Step::Stop, "node {me}, leader {leader}");
            let first = Tick {
                leader: Some(leader),
                ..tick(me)
            };
            assert_eq!(decide(&first), Step::Stop, "a leader already elected");
        }
    }
}

#[test]
fn it_stops_at_the_deadline_without_a_live_majority_or_as_a_non_voter() {
    let expired = Tick {
        expired: true,
        ..later(2)
    };
    assert_eq!(decide(&expired), Step::Stop);
    // 1 is not live either: 2 alone cannot win, so it does not raise terms in vain.
    let alone = Tick {
        live: [2].into(),
        ..tick(2)
    };
    assert_eq!(decide(&alone), Step::Stop);
    let learner = Tick {
        voters: [1, 2, 3].into(),
        ..tick(4)
    };
    assert_eq!(decide(&learner), Step::Stop);
}

#[test]
fn a_driver_outlogged_stops_electing_and_the_voter_with_the_longer_log_drives() {
    let outlogged = Tick {
        outlogged: true,
        since_elect: Some(RETRY_INTERVAL * 10),
        ..later(2)
    };
    assert_eq!(decide(&outlogged), Step::Wait);
    let asked = Tick {
        asked: true,
        ..later(1)
    };
    assert_eq!(decide(&asked), Step::Elect);
}

#[test]
fn it_does_not_cut_short_a_round_whose_votes_are_in_flight() {
    let pending = Tick {
        votes_in_flight: 1,
        ..later(2)
    };
    assert_eq!(decide(&pending), Step::Wait);
}

#[test]
fn votes_are_counted_in_flight_until_their_guard_drops() {
    let notes = Arc::new(ElectionNotes::default());
    let a = notes.vote_sent(7);
    let b = notes.vote_sent(7);
    assert_eq!(notes.get(7).votes_in_flight, 2);
    assert_eq!(notes.get(8).votes_in_flight, 0);
    drop(a);
    assert_eq!(notes.get(7).votes_in_flight, 1);
    drop(b);
    assert_eq!(notes.get(7).votes_in_flight, 0);
    assert!(notes.get(7).outlogged_at.is_none());
    notes.outlogged(7);
    notes.refused_shorter(9);
    assert!(notes.get(7).outlogged_at.is_some());
    assert!(notes.get(9).refused_shorter_at.is_some());
}

#[test]
fn a_refusal_for_a_longer_log_is_told_from_other_refusals() {
    let log = |term, index| Some(LogId::new(CommittedLeaderId::new(term, 1), index));
    let request = VoteRequest::new(Vote::new(5, 2), log(4, 10));
    let longer = VoteResponse::new(Vote::new(4, 1), log(4, 12), false);
    assert!(refused_for_log(&request, &longer));
    let lease = VoteResponse::new(Vote::new(4, 1), log(4, 10), false);
    assert!(
        !refused_for_log(&request, &lease),
        "same log: refused for the lease"
    );
    let granted = VoteResponse::new(Vote::new(5, 2), log(4, 9), true);
    assert!(!refused_for_log(&request, &granted));
}

/// A `Raft` service of node 2 (of 1 and 2) served on a loopback port until `stop` fires.
async fn serve_node_2(
    dir: &std::path::Path,
    stop: CancellationToken,
) -> (String, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let peers = format!("1=127.0.0.1:1,2={addr}").parse().expect("peers");
    let config = ClusterConfig::new(2, peers).expect("config");
    let node = ClusterNode::new(config, dir, stop.clone(), TaskTracker::new()).expect("node");
    let service = RaftService::with_registry(node.host().clone(), node.registry());
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    let server = tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(service.into_server())
            .serve_with_incoming_shutdown(incoming, stop.cancelled_owned())
            .await;
    });
    (addr, server)
}

#[tokio::test]
async fn a_watch_stays_open_while_the_peer_runs_and_its_end_then_a_refusal_is_down() {
    let dir = tempfile::tempdir().expect("tempdir");
    let stop = CancellationToken::new();
    let (addr, server) = serve_node_2(dir.path(), stop.clone()).await;
    let peers = crate::network::Peers::default();
    let mut stream = open_watch(peers.channel(&addr).expect("channel"), 1, 2, OPEN_TIMEOUT)
        .await
        .expect("the watch opens with node 2's event");
    // A watch of another node id is refused.
    let wrong = open_watch(peers.channel(&addr).expect("channel"), 1, 3, OPEN_TIMEOUT).await;
    assert!(wrong.is_err(), "{wrong:?}");
    // Open while the peer runs.
    let open = tokio::time::timeout(Duration::from_millis(300), stream.message()).await;
    assert!(
        open.is_err(),
        "the watch ended while its peer ran: {open:?}"
    );
    // The peer stops (a graceful stop here; a kill closes the connection instead): the
    // stream ends, and the server, not held up by it, releases its port.
    stop.cancel();
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        while let Ok(Some(_)) = stream.message().await {}
    })
    .await;
    assert!(ended.is_ok(), "the watch outlived its peer's shutdown");
    tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .expect("the server stops despite the open watch")
        .expect("server task");
    assert_eq!(verdict(probe(&addr, None).await), Verdict::Down);
}

#[test]
fn a_voter_that_granted_another_candidate_its_vote_does_not_run_against_it() {
    let granted = Tick {
        voted_for: Some(1),
        since_elect: Some(RETRY_INTERVAL * 10),
        ..later(2)
    };
    assert_eq!(decide(&granted), Step::Wait);
    // A vote learned from a candidate with a shorter log (which cannot win) does not stop
    // the voter that refused it.
    let asked = Tick {
        voted_for: Some(2),
        asked: true,
        ..later(1)
    };
    assert_eq!(decide(&asked), Step::Elect);
    // A vote still for the dead leader (not yet given up) is no reason to wait.
    let stale = Tick {
        voted_for: Some(3),
        ..later(2)
    };
    assert_eq!(decide(&stale), Step::Elect);
}
