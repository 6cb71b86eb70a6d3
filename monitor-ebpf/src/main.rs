//! Kernel half of connwatch: one tiny program per hook, all feeding the `EVENTS` ring buffer.
//!
//! Each capability's kernel half shares its name with the userspace half
//! (`reset.rs` ↔ `monitor/src/detect/reset.rs`).
#![no_std]
#![no_main]
// BPF inline assembly (the connect counter's atomic add) is unstable; the eBPF build is on
// nightly anyway (`-Z build-std`).
#![feature(asm_experimental_arch)]
// Every helper is inlined into the programs that use it: a BPF-to-BPF call stops the
// verifier's state pruning (Linux 6.1 then exceeded its instruction limit, see kernel.rs).
#![expect(
    clippy::inline_always,
    reason = "the programs must stay free of BPF-to-BPF calls for the verifier"
)]

mod doctor;
mod event;
mod kernel;
mod maps;
mod owner;
mod reset;
mod state;
mod used_after;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any reachable panic, so this is never executed.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
