//! The fault-injecting relay behind `connwatch proxy` and `connwatch selftest`: it does to
//! idle connections what load balancers, NATs and database proxies do in production.
use std::{io, net::SocketAddr, time::Duration};

use anyhow::{Context as _, Result, anyhow};
use bytes::BytesMut;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    time::{Instant, sleep_until},
};

use crate::args::parse_positive_duration;

/// Bytes each direction of a relayed connection reads at a time.
const RELAY_BUFFER: usize = 16 * 1024;

/// What to do to a connection idle (no data either way) for a while.
#[derive(Debug, Clone, Copy, Default, clap::Args)]
pub struct Faults {
    /// Reset (RST) connections idle this long.
    #[arg(long, value_name = "DURATION", value_parser = parse_positive_duration)]
    pub reset_idle_after: Option<Duration>,
    /// Close (FIN) connections idle this long.
    #[arg(long, value_name = "DURATION", value_parser = parse_positive_duration)]
    pub fin_idle_after: Option<Duration>,
    /// Stop forwarding anything on connections idle this long, keeping them open.
    #[arg(long, value_name = "DURATION", value_parser = parse_positive_duration)]
    pub blackhole_idle_after: Option<Duration>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    Reset,
    Fin,
    Blackhole,
}

impl Faults {
    /// The fault that fires first, and after how much idle time.
    fn first(&self) -> Option<(Duration, Fault)> {
        [
            self.reset_idle_after.map(|d| (d, Fault::Reset)),
            self.fin_idle_after.map(|d| (d, Fault::Fin)),
            self.blackhole_idle_after.map(|d| (d, Fault::Blackhole)),
        ]
        .into_iter()
        .flatten()
        .min_by_key(|(after, _)| *after)
    }

    pub fn describe(&self) -> String {
        match self.first() {
            None => "no faults".into(),
            Some((after, fault)) => format!(
                "{} connections idle for {}",
                match fault {
                    Fault::Reset => "reset (RST)",
                    Fault::Fin => "close (FIN)",
                    Fault::Blackhole => "blackhole",
                },
                humantime::format_duration(after)
            ),
        }
    }
}

/// Binds `listen`; the returned future serves until dropped.
pub async fn bind(listen: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(listen)
        .await
        .map_err(|err| match err.kind() {
            io::ErrorKind::AddrInUse => {
                anyhow!("cannot listen on {listen}: the port is in use: pick another with --listen")
            }
            _ => anyhow!("cannot listen on {listen}: {err}"),
        })
}

/// Accepts clients forever, relaying each to `upstream` with `faults`.
pub async fn serve(listener: TcpListener, upstream: SocketAddr, faults: Faults) -> Result<()> {
    loop {
        let (client, peer) = listener.accept().await.context("accepting a client")?;
        tokio::spawn(async move {
            if let Err(err) = relay(client, peer, upstream, faults).await {
                log::info!("proxy: {peer}: {err:#}");
            }
        });
    }
}

async fn relay(
    mut client: TcpStream,
    peer: SocketAddr,
    upstream: SocketAddr,
    faults: Faults,
) -> Result<()> {
    let mut server = TcpStream::connect(upstream)
        .await
        .with_context(|| format!("connecting to upstream {upstream}"))?;
    // Reused for every read (cleared after each write): no zeroing, no allocation per read.
    let mut from_client = BytesMut::with_capacity(RELAY_BUFFER);
    let mut from_server = BytesMut::with_capacity(RELAY_BUFFER);
    let mut last_data = Instant::now();
    let mut blackholed = false;
    let fault = faults.first();
    loop {
        let fires_at = fault
            .filter(|_| !blackholed)
            .map(|(after, _)| last_data + after);
        tokio::select! {
            read = client.read_buf(&mut from_client) => {
                if read? == 0 {
                    return Ok(()); // client closed; dropping both closes upstream too
                }
                if !blackholed {
                    last_data = Instant::now();
                    server.write_all(&from_client).await?;
                }
                from_client.clear();
            }
            read = server.read_buf(&mut from_server) => {
                if read? == 0 {
                    return Ok(());
                }
                if !blackholed {
                    last_data = Instant::now();
                    client.write_all(&from_server).await?;
                }
                from_server.clear();
            }
            () = sleep_until(fires_at.unwrap_or_else(Instant::now)), if fires_at.is_some() => {
                let (after, kind) = fault.expect("timer armed only with a fault");
                log::info!(
                    "proxy: {peer}: idle for {}: {}",
                    humantime::format_duration(after),
                    match kind {
                        Fault::Reset => "reset",
                        Fault::Fin => "closed",
                        Fault::Blackhole => "blackholed",
                    }
                );
                match kind {
                    Fault::Reset => {
                        socket2::SockRef::from(&client).set_linger(Some(Duration::ZERO))?;
                        return Ok(());
                    }
                    Fault::Fin => return Ok(()),
                    Fault::Blackhole => blackholed = true,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn earliest_fault_wins() {
        let faults = Faults {
            reset_idle_after: Some(Duration::from_secs(5)),
            fin_idle_after: Some(Duration::from_secs(2)),
            blackhole_idle_after: None,
        };
        assert_eq!(faults.first(), Some((Duration::from_secs(2), Fault::Fin)));
        assert_eq!(faults.describe(), "close (FIN) connections idle for 2s");
        assert_eq!(Faults::default().first(), None);
    }
}
