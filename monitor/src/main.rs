use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Kernel-level TCP connection monitor: which process, which peer, how long idle, when a
/// connection is reset or closed under an application.
#[derive(Debug, Parser)]
#[command(name = "connwatch", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print resets (and with --all, every state change) live, as they happen.
    Watch(monitor::watch::WatchArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => return fail(anyhow::Error::new(err).context("starting the async runtime")),
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Watch(args) => monitor::watch::run(args).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => fail(err),
    }
}

/// One line: what went wrong and, from the innermost context, what to do.
fn fail(err: anyhow::Error) -> ExitCode {
    eprintln!("connwatch: error: {err:#}");
    ExitCode::FAILURE
}
