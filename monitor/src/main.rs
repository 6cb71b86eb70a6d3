use std::process::ExitCode;

use clap::Parser;
use monitor::cli::{Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    monitor::output::install_logger(cli.log_level);
    // Two workers: the daemon's HTTP endpoints stay responsive while the event loop works.
    let result = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime.block_on(async {
            match cli.command {
                Command::Watch(args) => monitor::watch::run(args).await,
                Command::Daemon(args) => monitor::daemon::run(args).await,
                Command::Top(args) => monitor::top::run(args).await,
                Command::Proxy(args) => monitor::proxy::run(args).await,
                Command::Doctor(args) => monitor::doctor::run(&args),
                Command::Selftest(args) => monitor::selftest::run(args).await,
            }
        }),
        Err(err) => Err(anyhow::Error::new(err).context("starting the async runtime")),
    };
    let code = match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => fail(&err),
    };
    // A reader that stopped reading loses the rest: the process still exits.
    monitor::output::finish(EXIT_FLUSH);
    code
}

/// How long stdout and stderr may take to drain at exit.
const EXIT_FLUSH: std::time::Duration = std::time::Duration::from_millis(500);

/// One line: what went wrong and, from the innermost context, what to do.
fn fail(err: &anyhow::Error) -> ExitCode {
    log::error!("{err:#}");
    ExitCode::FAILURE
}
