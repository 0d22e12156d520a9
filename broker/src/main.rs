//! `rill-broker`: parses the config and runs the broker until SIGINT or SIGTERM.

#![deny(clippy::unwrap_used)]

use anyhow::{Context, Result};
use clap::Parser;
use tokio_util::sync::CancellationToken;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> Result<()> {
    rill_broker::init_tracing();
    let flags = rill_broker::cli::Flags::parse();
    let workers = flags.worker_threads;
    let config = rill_broker::cli::load(flags)?;
    // By default one async worker per core but one: the remaining core is left to the
    // kernel's network processing and the blocking pool's syncs, which on small machines
    // serve the broker better than a second worker contending with them (measured on 2 cores:
    // the same throughput, a lower end-to-end p99; see BENCHMARKS.md).
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    runtime.worker_threads(workers.unwrap_or(cores.saturating_sub(1)).max(1));
    let runtime = runtime
        .enable_all()
        .build()
        .context("starting the runtime")?;
    runtime.block_on(async {
        let shutdown = CancellationToken::new();
        tokio::spawn(rill_broker::shutdown_on_signals(shutdown.clone()));
        rill_broker::run(config, shutdown).await
    })
}
