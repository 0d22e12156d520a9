use super::*;

fn limits() -> Limits {
    Limits {
        ack_deadline_ms: 1_000,
        max_delivery_attempts: 3,
        max_in_flight: 10,
    }
}
