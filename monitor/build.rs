//! Builds `monitor-ebpf` for the bpf target so that plain `cargo build`/`clippy`/`test` work
//! (aya-template's layout). The object lands in OUT_DIR and is embedded by `probes`.
use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .ok_or_else(|| anyhow!("monitor/ has no parent directory"))?;
    let ebpf_dir = root.join("monitor-ebpf");
    let ebpf_dir = ebpf_dir.to_str().context("workspace path is not UTF-8")?;
    // aya-build watches the eBPF crate's directory; it cannot know that the kernel programs
    // also compile monitor-common, so watch that too (the template's build-dependency trick
    // would make monitor-ebpf build for the host as well).
    println!(
        "cargo:rerun-if-changed={}",
        root.join("monitor-common").display()
    );
    aya_build::build_ebpf(
        [Package {
            name: "monitor-ebpf",
            root_dir: ebpf_dir,
            ..Default::default()
        }],
        // "nightly": the bpf target needs -Z build-std=core; xtask installs rust-src for it and
        // refuses a nightly other than the pinned one (NIGHTLY_DATE in xtask/src/main.rs).
        Toolchain::Custom("nightly"),
    )
}
