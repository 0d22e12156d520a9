//! The one retry policy of the client: exponential backoff with jitter (from `backon`) around
//! an operation, retrying only what [`ClientError::is_retryable`] calls transient.
//!
//! The producer retries a batch until its `retry_timeout_ms` budget is spent
//! ([`RetryPolicy::produce`]); a consumer's fetch task retries for as long as the consumer
//! lives ([`RetryPolicy::fetch`]), since a broker restart must not end a subscription.
//! Jitter spreads the retries of many partitions (and many clients) so that a restarted
//! broker is not hit by all of them at the same instant.

use std::future::Future;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use tokio::time::Instant;

use crate::error::{ClientError, Result};

/// How an operation is retried: delays grow from `min_delay` by a factor of 2 up to
/// `max_delay`, each stretched by a random jitter of up to 100 %, until `give_up_after` has
/// passed since the first attempt (never, when `None`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RetryPolicy {
    min_delay: Duration,
    max_delay: Duration,
    give_up_after: Option<Duration>,
}

impl RetryPolicy {
    /// A producer's batch: 20 ms to 1 s, giving up after `retry_timeout`.
    pub(crate) fn produce(retry_timeout: Duration) -> Self {
        RetryPolicy {
            min_delay: Duration::from_millis(20),
            max_delay: Duration::from_secs(1),
            give_up_after: Some(retry_timeout),
        }
    }

    /// The same policy with its longest pause capped at `max_delay`.
    pub(crate) fn with_max_delay(mut self, max_delay: Duration) -> Self {
        self.max_delay = max_delay.max(self.min_delay);
        self
    }

    /// A consumer's fetch: 50 ms to 2 s, for as long as the consumer lives.
    pub(crate) fn fetch() -> Self {
        RetryPolicy {
            min_delay: Duration::from_millis(50),
            max_delay: Duration::from_secs(2),
            give_up_after: None,
        }
    }

    /// How long retries may go on (a long time when unbounded).
    pub(crate) fn budget(&self) -> Duration {
        self.give_up_after
            .unwrap_or(Duration::from_secs(365 * 24 * 3600))
    }

    /// The backoff schedule. Its total of sleeps is capped by `give_up_after` as well, so a
    /// retry never sleeps past the budget.
    fn backoff(&self) -> ExponentialBuilder {
        ExponentialBuilder::new()
            .with_min_delay(self.min_delay)
            .with_max_delay(self.max_delay)
            .with_factor(2.0)
            .with_jitter()
            .without_max_times()
            .with_total_delay(self.give_up_after)
    }

    /// Runs `op` until it succeeds, fails with an error that is not retryable, or the budget
    /// is spent; returns the last result. `what` names the operation in debug logs.
    pub(crate) async fn run<T, F, Fut>(&self, what: &str, op: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        // The budget is wall-clock time from the first attempt (attempts take time too, and
        // a connect to a dead broker can be slow), on tokio's clock so tests can pause it.
        let give_up_at = self.give_up_after.map(|d| Instant::now() + d);
        op.retry(self.backoff())
            .sleep(tokio::time::sleep)
            .when(|e: &ClientError| {
                e.is_retryable() && give_up_at.is_none_or(|at| Instant::now() < at)
            })
            .notify(|e: &ClientError, delay: Duration| {
                tracing::debug!(what, error = %e, ?delay, "retrying");
            })
            .await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use backon::BackoffBuilder;
    use tonic::Status;

    use super::*;

    fn unavailable() -> ClientError {
        ClientError::broker(Some("t"), Some(0), Status::unavailable("restarting"))
    }

    #[tokio::test(start_paused = true)]
    async fn transient_errors_are_retried_until_success() {
        let attempts = AtomicU32::new(0);
        let result = RetryPolicy::produce(Duration::from_secs(30))
            .run("test", || async {
                if attempts.fetch_add(1, Ordering::SeqCst) < 3 {
                    Err(unavailable())
                } else {
                    Ok(7)
                }
            })
            .await;
        assert_eq!(result.expect("succeeds on the 4th attempt"), 7);
        assert_eq!(attempts.load(Ordering::SeqCst), 4);
    }

    #[tokio::test(start_paused = true)]
    async fn final_errors_are_not_retried() {
        let attempts = AtomicU32::new(0);
        let result: Result<()> = RetryPolicy::produce(Duration::from_secs(30))
            .run("test", || async {
                attempts.fetch_add(1, Ordering::SeqCst);
                Err(ClientError::broker(
                    Some("t"),
                    Some(0),
                    Status::invalid_argument("too big"),
                ))
            })
            .await;
        assert_eq!(
            result.expect_err("final").code(),
            Some(tonic::Code::InvalidArgument)
        );
        assert_eq!(attempts.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn it_gives_up_when_the_budget_is_spent() {
        let attempts = AtomicU32::new(0);
        let start = Instant::now();
        let result: Result<()> = RetryPolicy::produce(Duration::from_secs(5))
            .run("test", || async {
                attempts.fetch_add(1, Ordering::SeqCst);
                Err(unavailable())
            })
            .await;
        let e = result.expect_err("gives up");
        assert!(e.is_retryable(), "the last error is returned: {e:?}");
        let n = attempts.load(Ordering::SeqCst);
        // Delays of at least 20, 40, ..., 1000 ms: more than a few attempts, far fewer
        // than a busy loop would make.
        assert!((4..=60).contains(&n), "{n} attempts");
        let spent = start.elapsed();
        assert!(
            spent <= Duration::from_secs(5),
            "slept past the budget: {spent:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_budget_counts_slow_attempts() {
        // Each attempt takes 2 s (a slow connect): the 5 s budget ends after about three,
        // although the sleeps alone stay far below it.
        let attempts = AtomicU32::new(0);
        let result: Result<()> = RetryPolicy::produce(Duration::from_secs(5))
            .run("test", || async {
                attempts.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_secs(2)).await;
                Err(unavailable())
            })
            .await;
        assert!(result.is_err());
        assert!(attempts.load(Ordering::SeqCst) <= 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_fetch_retries_for_as_long_as_it_takes() {
        let attempts = AtomicU32::new(0);
        let result = RetryPolicy::fetch()
            .run("test", || async {
                if attempts.fetch_add(1, Ordering::SeqCst) < 200 {
                    Err(unavailable())
                } else {
                    Ok(())
                }
            })
            .await;
        assert!(result.is_ok(), "no budget: {result:?}");
        assert_eq!(attempts.load(Ordering::SeqCst), 201);
    }

    #[test]
    fn delays_grow_are_capped_and_jittered() {
        let policy = RetryPolicy::fetch();
        let delays: Vec<Duration> = policy.backoff().build().take(20).collect();
        assert_eq!(delays.len(), 20);
        let mut base = policy.min_delay;
        for d in &delays {
            assert!(*d >= base && *d <= base * 2, "{d:?} outside [{base:?}, 2x]");
            base = (base * 2).min(policy.max_delay);
        }
        // Jitter: two schedules differ (the chance of 20 equal random draws is nil).
        let again: Vec<Duration> = policy.backoff().build().take(20).collect();
        assert_ne!(delays, again, "delays are jittered");
    }

    #[test]
    fn a_capped_policy_never_pauses_longer_than_twice_its_cap() {
        let policy = RetryPolicy::produce(Duration::from_secs(30))
            .with_max_delay(Duration::from_millis(100));
        let delays: Vec<Duration> = policy.backoff().build().take(30).collect();
        assert!(!delays.is_empty());
        for d in &delays {
            // Jitter stretches a pause by up to 100 %.
            assert!(*d <= Duration::from_millis(200), "{d:?} over the cap");
        }
    }
}
