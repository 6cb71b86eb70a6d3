//! The command line: a library item so that unit tests can hold README.md to its flags.
use clap::{Parser, Subcommand};

/// Kernel-level TCP connection monitor: which process, which peer, how long idle, when a
/// connection is reset or closed under an application.
#[derive(Debug, Parser)]
#[command(name = "connwatch", version)]
pub struct Cli {
    /// What connwatch says on stderr: error, warn, info, debug or trace. Debug adds the
    /// kernel programs' own diagnostics (`kernel:` lines), which are off, at no cost, below.
    #[arg(long, global = true, env = "RUST_LOG", value_name = "LEVEL", default_value = "info",
          value_parser = crate::output::parse_log_level)]
    pub log_level: log::Level,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print resets, closes and their impact live, as they happen.
    Watch(crate::watch::WatchArgs),
    /// Pools (process × endpoint) live, like top: idle, active, CLOSE_WAIT, stalled.
    Top(crate::top::TopArgs),
    /// Check that connwatch can run on this node: kernel, BTF, tracepoints, capabilities.
    Doctor(crate::doctor::DoctorArgs),
    /// A TCP proxy that resets, closes or blackholes idle connections, to reproduce incidents.
    Proxy(crate::proxy::ProxyArgs),
    /// Prove on this node that an idle reset is caught and attributed (exit 0 if so).
    Selftest(crate::selftest::SelftestArgs),
    /// Run as the node agent: Prometheus /metrics, /healthz, /readyz and JSON event logs.
    Daemon(crate::daemon::DaemonArgs),
}
