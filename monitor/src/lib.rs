//! connwatch: kernel-level TCP connection-state monitor.
//!
//! An event travels: [`probes`] (load/attach) → [`events`] (decode the ring buffer) →
//! [`sockets`] (table, owner) → [`detect`] (one module per detector) → [`sinks`].
pub mod args;

/// Maps and sets on the per-event paths, keyed by socket addresses, inodes and tuples:
/// foldhash hashes such keys several times faster than std's SipHash (which the profile
/// under churn showed at 18% of the daemon), and is seeded per process.
pub type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
/// See [`FastMap`].
pub type FastSet<K> = std::collections::HashSet<K, foldhash::fast::RandomState>;

pub mod bounds;
pub mod cli;
pub mod common;
pub mod daemon;
pub mod detect;
pub mod doctor;
pub mod engine;
pub mod events;
pub mod http;
#[cfg(test)]
mod layers_tests;
pub mod output;
pub mod pipeline;
pub mod probes;
pub mod proxy;
#[cfg(test)]
mod readme_tests;
pub mod relay;
pub mod resolver;
pub mod selftest;
pub mod sinks;
pub mod sockets;
pub mod top;
pub mod watch;
