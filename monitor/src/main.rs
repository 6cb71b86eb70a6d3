use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Kernel-level TCP connection monitor: which process, which peer, how long idle, when a
/// connection is reset or closed under an application.
#[derive(Debug, Parser)]
#[command(name = "connwatch", version)]
struct Cli {
    /// What connwatch says on stderr: error, warn, info, debug or trace. Debug adds the
    /// kernel programs' own diagnostics (`kernel:` lines), which are off, at no cost, below.
    #[arg(long, global = true, env = "RUST_LOG", value_name = "LEVEL", default_value = "info",
          value_parser = monitor::output::parse_log_level)]
    log_level: log::Level,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print resets, closes and their impact live, as they happen.
    Watch(monitor::watch::WatchArgs),
    /// Pools (process × endpoint) live, like top: idle, active, CLOSE_WAIT, stalled.
    Top(monitor::top::TopArgs),
    /// Check that connwatch can run on this node: kernel, BTF, tracepoints, capabilities.
    Doctor(monitor::doctor::DoctorArgs),
    /// A TCP proxy that resets, closes or blackholes idle connections, to reproduce incidents.
    Proxy(monitor::proxy::ProxyArgs),
    /// Prove on this node that an idle reset is caught and attributed (exit 0 if so).
    Selftest(monitor::selftest::SelftestArgs),
    /// Run as the node agent: Prometheus /metrics, /healthz, /readyz and JSON event logs.
    Daemon(monitor::daemon::DaemonArgs),
}

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
                Command::Doctor(args) => monitor::doctor::run(args).await,
                Command::Selftest(args) => monitor::selftest::run(args).await,
            }
        }),
        Err(err) => Err(anyhow::Error::new(err).context("starting the async runtime")),
    };
    let code = match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => fail(err),
    };
    // A reader that stopped reading loses the rest: the process still exits.
    monitor::output::finish(EXIT_FLUSH);
    code
}

/// How long stdout and stderr may take to drain at exit.
const EXIT_FLUSH: std::time::Duration = std::time::Duration::from_millis(500);

/// One line: what went wrong and, from the innermost context, what to do.
fn fail(err: anyhow::Error) -> ExitCode {
    log::error!("{err:#}");
    ExitCode::FAILURE
}
