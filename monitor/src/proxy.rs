//! `connwatch proxy`: a TCP proxy that does to idle connections what load balancers, NATs
//! and database proxies do in production, so the incidents can be reproduced on a laptop.
//!
//! - `--reset-idle-after`: RST to the client (AWS NLB, RDS Proxy, a conntrack flush).
//! - `--fin-idle-after`: a graceful close (pgbouncer `server_idle_timeout`, HAProxy).
//! - `--blackhole-idle-after`: keep the connection open but forward nothing, ever again (a
//!   stateful firewall that forgot the flow): writes are accepted and lead nowhere.
use std::net::SocketAddr;

use anyhow::Result;

use crate::relay::{Faults, bind, serve};

#[derive(Debug, Clone, clap::Args)]
pub struct ProxyArgs {
    /// Address to accept clients on.
    #[arg(long, value_name = "ADDR")]
    pub listen: SocketAddr,
    /// Address to forward to.
    #[arg(long, value_name = "ADDR")]
    pub upstream: SocketAddr,
    #[command(flatten)]
    pub faults: Faults,
}

pub async fn run(args: ProxyArgs) -> Result<()> {
    let listener = bind(args.listen).await?;
    let shutdown = crate::common::Shutdown::install()?;
    log::info!(
        "proxying {} → {} ({})",
        args.listen,
        args.upstream,
        args.faults.describe()
    );
    tokio::select! {
        result = serve(listener, args.upstream, args.faults) => result,
        () = shutdown.received() => Ok(()),
    }
}
