//! `rill`: the command-line tool. Parses the command line and runs it; an error is one line
//! on stderr and a non-zero exit status.

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = rill_client::cli::Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(rill_client::cli::run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", rill_client::cli::error_line(&e));
            std::process::ExitCode::FAILURE
        }
    }
}
