//! The CPU architectures connwatch ships for: its static builds, the image's platforms and
//! the kernel matrix's guests.

use std::path::{Path, PathBuf};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    X86_64,
    Arm64,
}

impl Arch {
    pub const ALL: [Arch; 2] = [Arch::X86_64, Arch::Arm64];

    /// Rust's target for the static (musl) build: it runs on any distribution's node and in
    /// the `FROM scratch` image.
    pub fn musl_target(self) -> &'static str {
        match self {
            Arch::X86_64 => "x86_64-unknown-linux-musl",
            Arch::Arm64 => "aarch64-unknown-linux-musl",
        }
    }

    /// Debian's name, which is also the OCI platform's architecture (`linux/arm64`).
    pub fn debian(self) -> &'static str {
        match self {
            Arch::X86_64 => "amd64",
            Arch::Arm64 => "arm64",
        }
    }

    /// The QEMU system emulator for guests of this architecture, and its Debian package.
    pub fn qemu(self) -> (&'static str, &'static str) {
        match self {
            Arch::X86_64 => ("qemu-system-x86_64", "qemu-system-x86"),
            Arch::Arm64 => ("qemu-system-aarch64", "qemu-system-arm"),
        }
    }

    /// Whether this machine runs it natively (guests then share the host's root).
    pub fn is_host(self) -> bool {
        match self {
            Arch::X86_64 => cfg!(target_arch = "x86_64"),
            Arch::Arm64 => cfg!(target_arch = "aarch64"),
        }
    }

    /// The static release build of connwatch: `target/<musl target>/release/connwatch`.
    pub fn static_bin(self, root: &Path) -> PathBuf {
        root.join("target")
            .join(self.musl_target())
            .join("release/connwatch")
    }
}
