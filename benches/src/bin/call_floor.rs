//! `rill-call-floor`: the floor under the e2e figure. One client makes one call at a time,
//! paced, and times each answer: an empty gRPC call to a broker (`grpc.health.v1.Health/Check`,
//! through the client library's `Connection`, the transport every Rill RPC takes), and a RESP
//! `PING` to a Redis server (raw TCP, `TCP_NODELAY`). Neither touches a log, so the difference
//! between the two is what the protocols and their stacks cost, not what either broker does.
//!
//! Each is run on a current-thread runtime (as the e2e producer runs) and from a task on a
//! two-worker multi-thread runtime (as the e2e consumer runs), rounds interleaved. Calls are
//! paced, so every call starts from idle, as the e2e's calls do at 5,000/s: on the
//! current-thread runtime the thread sleeps until the next call is due; on the multi-thread
//! one a pacing thread of its own hands the task each call's start, so no worker is blocked.
//!
//! ```sh
//! cargo build --release -p rill-broker -p rill-bench
//! redis-server --port 6390 --save '' --appendonly no &
//! target/release/rill-call-floor --redis 127.0.0.1:6390
//! ```

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use hdrhistogram::Histogram;
use rill_client::Connection;
use rill_testkit::BrokerProcess;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Clone)]
#[command(about = "One call at a time: an empty gRPC call against a RESP PING")]
struct Args {
    /// Calls per run.
    #[arg(long, default_value_t = 20_000)]
    calls: u64,
    /// Calls per second (each waits for the previous answer).
    #[arg(long, default_value_t = 5_000)]
    rate: u64,
    /// Rounds; each round runs every combination once.
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    /// A running Redis server (HOST:PORT); without it only the gRPC calls run.
    #[arg(long)]
    redis: Option<String>,
    /// A running broker (HOST:PORT); without it one is started from the sibling `rill-broker`.
    #[arg(long)]
    broker: Option<String>,
}

/// What a run calls.
#[derive(Clone, Copy)]
enum Target {
    /// `grpc.health.v1.Health/Check` on the broker.
    Grpc,
    /// `PING` on the Redis server.
    Resp,
}

/// Where the calling loop runs.
#[derive(Clone, Copy)]
enum Flavor {
    /// A current-thread runtime of its own.
    Current,
    /// A task on a two-worker multi-thread runtime.
    Multi,
}

/// A latency histogram in µs.
fn hist() -> Result<Histogram<u64>> {
    Ok(Histogram::new_with_bounds(1, 100_000_000, 3)?)
}

/// Blocks until call `i` is due.
fn pace(t0: Instant, i: u64, rate: u64) {
    let due = t0 + Duration::from_nanos(i.saturating_mul(1_000_000_000) / rate.max(1));
    let now = Instant::now();
    if due > now {
        std::thread::sleep(due - now);
    }
}

/// When each call may start: the calling thread sleeps until it is due, or a pacing thread
/// hands the start over a channel (a task on a multi-thread runtime must not block its worker).
enum Pacer {
    /// Sleep on the calling thread.
    Sleep { t0: Instant, rate: u64 },
    /// Starts sent by a pacing thread.
    Ticks(tokio::sync::mpsc::UnboundedReceiver<()>),
}

impl Pacer {
    /// A pacer for the flavor's calling loop; `Ticks` starts its pacing thread.
    fn new(flavor: Flavor, calls: u64, rate: u64) -> Self {
        match flavor {
            Flavor::Current => Self::Sleep {
                t0: Instant::now(),
                rate,
            },
            Flavor::Multi => {
                let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
                std::thread::spawn(move || {
                    let t0 = Instant::now();
                    for i in 0..calls {
                        pace(t0, i, rate);
                        if tx.send(()).is_err() {
                            return;
                        }
                    }
                });
                Self::Ticks(rx)
            }
        }
    }

    /// Waits until call `i` may start.
    async fn wait(&mut self, i: u64) -> Result<()> {
        match self {
            Self::Sleep { t0, rate } => pace(*t0, i, *rate),
            Self::Ticks(rx) => rx.recv().await.context("the pacing thread stopped early")?,
        }
        Ok(())
    }
}

/// Makes `calls` paced calls to `addr` and returns their latencies.
async fn run_calls(
    target: Target,
    addr: String,
    calls: u64,
    rate: u64,
    flavor: Flavor,
) -> Result<Histogram<u64>> {
    let mut h = hist()?;
    match target {
        Target::Grpc => {
            let conn = Connection::connect(&addr).await?;
            let mut client = tonic_health::pb::health_client::HealthClient::new(conn.transport());
            let mut pacer = Pacer::new(flavor, calls, rate);
            for i in 0..calls {
                pacer.wait(i).await?;
                let t = Instant::now();
                client
                    .check(tonic_health::pb::HealthCheckRequest::default())
                    .await?;
                h.saturating_record(t.elapsed().as_micros() as u64);
            }
        }
        Target::Resp => {
            let mut s = tokio::net::TcpStream::connect(&addr)
                .await
                .with_context(|| format!("connecting to Redis at {addr}"))?;
            s.set_nodelay(true)?;
            let mut buf = [0u8; 64];
            let mut pacer = Pacer::new(flavor, calls, rate);
            for i in 0..calls {
                pacer.wait(i).await?;
                let t = Instant::now();
                s.write_all(b"PING\r\n").await?;
                let mut got = 0;
                while !buf[..got].ends_with(b"\r\n") {
                    let n = s.read(&mut buf[got..]).await?;
                    anyhow::ensure!(n > 0 && got + n < buf.len(), "unexpected PING answer");
                    got += n;
                }
                anyhow::ensure!(&buf[..got] == b"+PONG\r\n", "unexpected PING answer");
                h.saturating_record(t.elapsed().as_micros() as u64);
            }
        }
    }
    Ok(h)
}

/// One run on a thread of its own, with the runtime `flavor`.
fn run(
    flavor: Flavor,
    target: Target,
    addr: String,
    calls: u64,
    rate: u64,
) -> Result<Histogram<u64>> {
    let thread = std::thread::spawn(move || -> Result<Histogram<u64>> {
        match flavor {
            Flavor::Current => tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(run_calls(target, addr, calls, rate, flavor)),
            Flavor::Multi => {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()?;
                rt.block_on(async move {
                    tokio::spawn(run_calls(target, addr, calls, rate, flavor)).await?
                })
            }
        }
    });
    thread
        .join()
        .map_err(|_| anyhow::anyhow!("the calling thread panicked"))?
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let args = Args::parse();
    let dir = tempfile::Builder::new()
        .prefix("rill-call-floor.")
        .tempdir()?;
    let (_broker, broker_addr) = match &args.broker {
        Some(a) => (None, a.clone()),
        None => {
            let bin =
                rill_testkit::sibling_binary("rill-broker").context("build rill-broker too")?;
            let b = BrokerProcess::spawn_binary(&bin, dir.path(), "127.0.0.1:0", &[]).await?;
            let a = b.addr().to_string();
            (Some(b), a)
        }
    };
    println!(
        "{} calls per run at {}/s, one in flight; latency per call in µs",
        args.calls, args.rate
    );
    println!("round  runtime  call         p50    p90    p99  p99.9     max");
    for round in 1..=args.rounds {
        for (flavor, fname) in [(Flavor::Current, "current"), (Flavor::Multi, "multi")] {
            let mut targets = vec![(Target::Grpc, "grpc-health", broker_addr.clone())];
            if let Some(r) = &args.redis {
                targets.push((Target::Resp, "resp-ping", r.clone()));
            }
            for (target, tname, addr) in targets {
                let (calls, rate) = (args.calls, args.rate);
                let h = tokio::task::spawn_blocking(move || run(flavor, target, addr, calls, rate))
                    .await??;
                println!(
                    "{round:>5}  {fname:<7}  {tname:<11} {:>5} {:>6} {:>6} {:>6} {:>7}",
                    h.value_at_quantile(0.5),
                    h.value_at_quantile(0.9),
                    h.value_at_quantile(0.99),
                    h.value_at_quantile(0.999),
                    h.max()
                );
            }
        }
    }
    Ok(())
}
