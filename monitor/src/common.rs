//! What the commands share beyond the engine: how they stop (a signal, a closed stdout).
//! Commands import this module, never each other.
use std::io::{self, ErrorKind};

use anyhow::{Context as _, Result};
use tokio::signal::unix::{Signal, SignalKind, signal};

use crate::engine::Flow;

/// A closed stdout (e.g. `| head`) ends the command quietly; other write errors are errors.
pub fn output_closed(err: io::Error) -> Result<Flow> {
    if err.kind() == ErrorKind::BrokenPipe {
        Ok(Flow::Stop)
    } else {
        Err(err).context("writing to stdout")
    }
}

/// SIGTERM and SIGINT, caught from the moment this is made: commands install it before
/// they say they are ready, so a signal sent right after never meets the default action
/// (which would kill the process with a non-zero status and leave no summary).
pub struct Shutdown {
    sigterm: Signal,
    sigint: Signal,
}

impl Shutdown {
    pub fn install() -> Result<Shutdown> {
        Ok(Shutdown {
            sigterm: signal(SignalKind::terminate()).context("installing SIGTERM handler")?,
            sigint: signal(SignalKind::interrupt()).context("installing SIGINT handler")?,
        })
    }

    /// Resolves at the first SIGTERM or SIGINT.
    pub async fn received(mut self) {
        tokio::select! {
            _ = self.sigterm.recv() => {}
            _ = self.sigint.recv() => {}
        }
    }
}
