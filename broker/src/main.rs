//! `rill-broker`: parses the config and runs the broker until SIGINT or SIGTERM.

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
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = workers {
        runtime.worker_threads(n.max(1));
    }
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
