use super::*;

fn limits() -> Limits {
    Limits {
        ack_deadline_ms: 1_000,
        max_delivery_attempts: 3,
        max_in_flight: 10,
    }
}

const IDS: (&str, &str, u32) = ("s", "t", 0);

/// A partition with offsets `0..n` taken and locked to `c` at time 0.
fn delivered(n: u64, c: &str) -> PartitionState {
    let mut s = PartitionState::starting_at(0);
    for o in 0..n {
        s.take_new(o);
        s.lock(o, c, 0, &limits()).expect("pending");
    }
    s
}

#[test]
fn acks_in_any_order_collapse_into_the_floor() {
    let mut s = delivered(5, "a");
    for o in [3, 1, 4] {
        s.check_held(IDS, "a", (o, o), 10).expect("held");
        s.apply(0, (o, o), AckKind::Ack, None, 10, &limits());
    }
    assert_eq!(s.floor, 0, "offset 0 still pending");
    assert_eq!(s.done, vec![(1, 2), (3, 5)]);
    s.apply(0, (0, 0), AckKind::Ack, None, 10, &limits());
    s.apply(0, (2, 2), AckKind::Ack, None, 10, &limits());
    assert_eq!((s.floor, s.done.len(), s.pending.len()), (5, 0, 0));
    s.validate().expect("consistent");
}

#[test]
fn a_locked_record_is_not_handed_out_again_until_its_lock_ends() {
    let mut s = delivered(2, "a");
    assert!(s.redeliverable(500, 10).is_empty(), "both locked");
    assert!(
        s.expire(0, 1_000, &limits()).is_empty(),
        "deadline itself still holds"
    );
    assert!(s.redeliverable(1_000, 10).is_empty());
    assert!(s.expire(0, 1_001, &limits()).is_empty(), "1 of 3 attempts");
    assert_eq!(s.redeliverable(1_001, 10), vec![0, 1]);
    let (count, deadline) = s.lock(0, "b", 1_001, &limits()).expect("pending");
    assert_eq!((count, deadline), (2, 2_001));
}

#[test]
fn an_ack_after_expiry_is_refused_and_changes_nothing() {
    let mut s = delivered(1, "a");
    let before = s.clone();
    let err = s.check_held(IDS, "a", (0, 0), 1_001).expect_err("expired");
    assert!(
        matches!(err, SubscriptionError::NotHeld { offset: 0, .. }),
        "{err}"
    );
    assert_eq!(s, before);
    s.expire(0, 1_001, &limits());
    let err = s.check_held(IDS, "a", (0, 0), 1_002).expect_err("released");
    assert!(err.to_string().contains("offset 0"), "{err}");
}

#[test]
fn another_consumers_record_and_never_delivered_ones_are_refused() {
    let s = delivered(3, "a");
    assert!(matches!(
        s.check_held(IDS, "b", (1, 1), 10),
        Err(SubscriptionError::NotHeld { offset: 1, .. })
    ));
    assert!(matches!(
        s.check_held(IDS, "a", (2, 7), 10),
        Err(SubscriptionError::NeverDelivered { next: 3, .. })
    ));
    assert!(matches!(
        s.check_held(IDS, "a", (2, 1), 10),
        Err(SubscriptionError::Invalid(_))
    ));
    assert_eq!(s.check_held(IDS, "a", (0, 2), 10), Ok(3));
}

#[test]
fn a_done_record_is_not_held() {
    let mut s = delivered(3, "a");
    s.apply(0, (1, 1), AckKind::Ack, None, 10, &limits());
    assert!(matches!(
        s.check_held(IDS, "a", (0, 2), 10),
        Err(SubscriptionError::NotHeld { offset: 1, .. })
    ));
}

#[test]
fn nack_releases_after_its_delay_and_extend_renews_the_lock() {
    let mut s = delivered(2, "a");
    s.apply(
        0,
        (0, 0),
        AckKind::Nack { delay_ms: 300 },
        Some("boom"),
        100,
        &limits(),
    );
    assert!(s.redeliverable(399, 10).is_empty(), "not before the delay");
    assert_eq!(s.redeliverable(400, 10), vec![0]);
    assert_eq!(s.pending[&0].last_error.as_deref(), Some("boom"));
    let (_, d) = s.apply(0, (1, 1), AckKind::Extend, None, 900, &limits());
    assert_eq!(d, 1_900);
    s.check_held(IDS, "a", (1, 1), 1_500).expect("extended");
}

#[test]
fn the_last_attempt_dead_letters_with_the_count_and_error() {
    let l = limits();
    let mut s = PartitionState::starting_at(7);
    s.take_new(7);
    let mut now = 0;
    for attempt in 1..=3 {
        assert_eq!(s.redeliverable(now, 10), vec![7], "attempt {attempt}");
        s.lock(7, "a", now, &l);
        now += 2_000;
        let out = s.expire(0, now, &l);
        if attempt < 3 {
            assert!(out.is_empty());
        } else {
            assert_eq!(
                out,
                vec![DeadLetter {
                    partition: 0,
                    offset: 7,
                    attempts: 3,
                    last_error: Some("ack deadline expired".into())
                }]
            );
        }
    }
    assert_eq!((s.floor, s.pending.len()), (8, 0));
}

#[test]
fn reject_dead_letters_at_once() {
    let mut s = delivered(2, "a");
    let (out, _) = s.apply(0, (0, 1), AckKind::Reject, Some("bad"), 10, &limits());
    assert_eq!(out.len(), 2);
    assert_eq!(out[0].last_error.as_deref(), Some("bad"));
    assert_eq!(s.floor, 2);
}

#[test]
fn the_in_flight_bound_stops_new_records() {
    let s = delivered(10, "a");
    assert!(!s.has_room(&limits()));
    let mut s = s;
    s.apply(0, (0, 0), AckKind::Ack, None, 10, &limits());
    assert!(s.has_room(&limits()));
}

#[test]
fn a_restart_drops_locks_so_records_come_back_at_once() {
    let mut s = delivered(2, "a");
    s.drop_locks();
    assert_eq!(s.redeliverable(1, 10), vec![0, 1]);
    assert_eq!(s.pending[&0].delivery_count, 1, "the count survives");
}

#[test]
fn seek_and_retention_move_the_floor() {
    let mut s = delivered(5, "a");
    s.clamp_to_log_start(3);
    assert_eq!((s.floor, s.pending.len()), (3, 2));
    s.validate().expect("consistent");
    s.seek(100);
    assert_eq!((s.floor, s.next, s.pending.len()), (100, 100, 0));
    s.take_new(105);
    assert_eq!(s.done, vec![]);
    assert_eq!(s.floor, 105, "offsets skipped over (gone) count as done");
    s.validate().expect("consistent");
}

#[test]
fn backlog_counts_what_is_not_done() {
    let mut s = delivered(5, "a");
    s.apply(0, (3, 3), AckKind::Ack, None, 10, &limits());
    assert_eq!(s.backlog(20), 19);
    assert_eq!(s.in_flight(10), 4);
    assert_eq!(s.in_flight(5_000), 0, "expired locks are not in flight");
}
