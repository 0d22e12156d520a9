//! Result lines in the peers harness's columns, latency histograms, payloads and pacing.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

/// The column header, identical to the peers harness's (see `benches/compare.sh`), so a Rill
/// line sits under a Redis line.
pub const HEADER: &str = "system   scenario      msgs   size batch P C      secs      msg/s      MB/s   p50_us   p99_us  p999_us   max_us  note";

/// One scenario's result.
pub struct Stats {
    /// The scenario name: produce, catchup or e2e.
    pub scenario: &'static str,
    /// Messages moved.
    pub msgs: u64,
    /// Payload bytes moved.
    pub bytes: u64,
    /// Wall time of the scenario.
    pub secs: f64,
    /// Latencies in µs.
    pub hist: Histogram<u64>,
    /// Free text.
    pub note: String,
}

/// The shape parameters printed on every line.
pub struct Shape {
    /// Payload bytes.
    pub size: usize,
    /// Messages per batch.
    pub batch: u64,
    /// Producers.
    pub producers: u64,
    /// Consumers.
    pub consumers: u64,
}

impl Stats {
    /// Prints the result line.
    pub fn print(&self, shape: &Shape) {
        let q = |x: f64| {
            if self.hist.is_empty() {
                "-".to_string()
            } else {
                self.hist.value_at_quantile(x).to_string()
            }
        };
        let max = if self.hist.is_empty() {
            "-".to_string()
        } else {
            self.hist.max().to_string()
        };
        println!(
            "{:<8} {:<9} {:>8} {:>6} {:>5} {} {} {:>9.2} {:>10.0} {:>9.1} {:>8} {:>8} {:>8} {:>8}  {}",
            "rill",
            self.scenario,
            self.msgs,
            shape.size,
            shape.batch,
            shape.producers,
            shape.consumers,
            self.secs,
            self.msgs as f64 / self.secs,
            self.bytes as f64 / self.secs / 1e6,
            q(0.50),
            q(0.99),
            q(0.999),
            max,
            self.note
        );
    }
}

/// A latency histogram in µs, from 1 µs to 100 s, 3 significant digits.
pub fn hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 100_000_000, 3).expect("static histogram bounds are valid")
}

/// Records a duration in µs (at least 1).
pub fn record(h: &mut Histogram<u64>, d: Duration) {
    h.saturating_record((d.as_micros() as u64).max(1));
}

/// Nanoseconds on a monotonic clock shared by every task of this process.
pub fn now_ns() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

/// `size` incompressible bytes (xorshift), the same kind of payload the peers get.
pub fn payload(size: usize) -> Vec<u8> {
    let mut state = 0x2545_f491_4f6c_dd1du64;
    (0..size)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect()
}

/// Sleeps the current thread until message `i` is due at `rate` per second after `start`.
/// A thread sleep, not the runtime's millisecond timer, so sends are evenly spaced.
pub fn pace(start: Instant, i: u64, rate: u64) {
    let due = start + Duration::from_nanos(i.saturating_mul(1_000_000_000) / rate.max(1));
    let now = Instant::now();
    if due > now {
        std::thread::sleep(due - now);
    }
}

/// Producer `i`'s share of `n` messages split over `p` producers.
pub fn share(n: u64, p: u64, i: u64) -> u64 {
    n / p + u64::from(i < n % p)
}
