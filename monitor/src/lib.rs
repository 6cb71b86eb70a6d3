//! connwatch: kernel-level TCP connection-state monitor.
//!
//! An event travels: [`probes`] (load/attach) → [`events`] (decode the ring buffer) →
//! [`sockets`] (table, owner) → [`detect`] (one module per detector) → [`sinks`].
pub mod args;
pub mod daemon;
pub mod detect;
pub mod doctor;
pub mod engine;
pub mod events;
pub mod pipeline;
pub mod probes;
pub mod proxy;
pub mod selftest;
pub mod sinks;
pub mod sockets;
pub mod top;
pub mod watch;
