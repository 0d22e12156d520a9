//! `rill-broker`: parses the config and runs the broker until SIGINT or SIGTERM.

use anyhow::Result;
use clap::Parser;
use tokio_util::sync::CancellationToken;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> Result<()> {
    rill_broker::init_tracing();
    let config = rill_broker::cli::load(rill_broker::cli::Flags::parse())?;
    let shutdown = CancellationToken::new();
    tokio::spawn(rill_broker::shutdown_on_signals(shutdown.clone()));
    rill_broker::run(config, shutdown).await
}
