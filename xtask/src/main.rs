//! `cargo xtask`: the project's entry points, installing what a fresh machine lacks first.
//!
//! - `cargo xtask run -- watch`: build connwatch (release) and run it with the given args.
//! - `cargo xtask test`: fmt, clippy and the whole test suite (loads real eBPF programs).
//! - `cargo xtask bench`: measure connwatch's cost side by side; writes BENCHMARKS.md.
//! - `cargo xtask setup`: only install the prerequisites.
mod bench;

use std::{
    env,
    ffi::OsString,
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install the build and test prerequisites that are missing.
    Setup,
    /// Build connwatch in release mode and run it: `cargo xtask run -- watch --json`.
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// Measure connwatch's cost against no monitor and bpftrace; writes BENCHMARKS.md.
    Bench,
    /// (bench helper) hold N loopback connections until stdin closes.
    #[command(hide = true)]
    HoldSockets { connections: usize },
    /// Check formatting and lints, then run every test (needs root: tests load eBPF).
    Test {
        /// Extra arguments for `cargo test`, e.g. `-- idle_reset`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
}

/// The toolchain that builds the eBPF programs: needs nightly for `-Z build-std`.
/// Never updated by xtask: a new nightly would bring an LLVM bpf-linker was not built for.
const NIGHTLY: &str = "nightly";
/// bpf-linker known to build against LLVM 22 with `--features llvm-22`.
const BPF_LINKER_VERSION: &str = "0.13.0";
/// Debian packages the tests drive: bpftool (BTF cross-check), ip/ss (netns, `ss -K`),
/// setpriv (unprivileged run, running PostgreSQL), prometheus (scrapes the daemon),
/// PostgreSQL (real stalled queries), python3 (a second client process).
/// Command (or absolute path, one `*` allowed) → package.
const TEST_TOOLS: &[(&str, &str)] = &[
    ("bpftool", "bpftool"),
    ("prometheus", "prometheus"),
    ("/usr/lib/postgresql/*/bin/postgres", "postgresql"),
    ("python3", "python3"),
    ("node", "nodejs"),
    ("nft", "nftables"),
    ("npm", "npm"),
    ("ip", "iproute2"),
    ("ss", "iproute2"),
    ("setpriv", "util-linux"),
];

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("xtask: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    let root = workspace_root()?;
    env::set_current_dir(&root)?;
    put_cargo_bin_on_path()?;
    match cli.command {
        Task::Setup => {
            setup_build()?;
            setup_test_tools()?;
            setup_validators(&root)?;
            Ok(ExitCode::SUCCESS)
        }
        Task::Run { args } => {
            setup_build()?;
            step("building connwatch (release)");
            check(cargo().args(["build", "--release", "--package", "monitor"]))?;
            let status = Command::new(root.join("target/release/connwatch"))
                .args(args)
                .status()
                .context("starting target/release/connwatch")?;
            Ok(exit_code(status.code()))
        }
        Task::HoldSockets { connections } => {
            bench::hold_sockets(connections)?;
            Ok(ExitCode::SUCCESS)
        }
        Task::Bench => {
            require_root("the benchmark loads eBPF programs")?;
            setup_build()?;
            if which("bpftrace").is_none() {
                apt_install(&["bpftrace"])?;
            }
            step("building connwatch (release)");
            check(cargo().args(["build", "--release", "--package", "monitor"]))?;
            bench::run(&root, root.join("target/release/connwatch"))?;
            Ok(ExitCode::SUCCESS)
        }
        Task::Test { args } => {
            require_root("the tests load eBPF programs and create network namespaces")?;
            setup_build()?;
            setup_test_tools()?;
            setup_validators(&root)?;
            step("cargo fmt --check");
            check(cargo().args(["fmt", "--all", "--", "--check"]))?;
            step("cargo clippy -D warnings");
            check(cargo().args(["clippy", "--all-targets", "--", "-D", "warnings"]))?;
            step("cargo clippy -D warnings (eBPF programs, bpf target)");
            check(
                Command::new("rustup")
                    .args([
                        "run",
                        NIGHTLY,
                        "cargo",
                        "clippy",
                        "--target",
                        "bpfel-unknown-none",
                    ])
                    .args(["-Z", "build-std=core", "--", "-D", "warnings"])
                    .current_dir(root.join("monitor-ebpf"))
                    // Nightly artifacts apart from stable's, so neither invalidates the other.
                    .env("CARGO_TARGET_DIR", root.join("target/ebpf-clippy"))
                    // Set by the outer (stable) cargo; they would pick the wrong compiler.
                    .env_remove("RUSTC")
                    .env_remove("RUSTC_WORKSPACE_WRAPPER"),
            )?;
            step("cargo test");
            let status = cargo()
                .arg("test")
                .args(args)
                .status()
                .context("running cargo test")?;
            Ok(exit_code(status.code()))
        }
    }
}

fn setup_build() -> Result<()> {
    if !command_succeeds(Command::new("rustup").args(["run", NIGHTLY, "rustc", "--version"])) {
        bail!(
            "the `{NIGHTLY}` toolchain is missing: install it with `rustup toolchain install \
             {NIGHTLY}` (its LLVM major version decides which bpf-linker is built)"
        );
    }
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        NIGHTLY,
    ]))?;
    if !installed.lines().any(|line| line.starts_with("rust-src")) {
        step("installing rust-src for nightly (the bpf target builds core from source)");
        check(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            NIGHTLY,
        ]))?;
    }
    if which("bpf-linker").is_none() {
        install_bpf_linker()?;
    }
    Ok(())
}

/// bpf-linker links against the system LLVM, which must match nightly's major version.
fn install_bpf_linker() -> Result<()> {
    let version = output(Command::new("rustup").args(["run", NIGHTLY, "rustc", "-vV"]))?;
    let llvm_major = version
        .lines()
        .find_map(|line| line.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .context("cannot read nightly's LLVM version from `rustc -vV`")?
        .to_string();
    let prefix = PathBuf::from(format!("/usr/lib/llvm-{llvm_major}"));
    if !prefix.join("bin/llvm-config").exists() {
        apt_install(&[&format!("llvm-{llvm_major}-dev")])?;
    }
    step(&format!(
        "installing bpf-linker {BPF_LINKER_VERSION} against LLVM {llvm_major} (about a minute)"
    ));
    check(
        cargo()
            .env("LLVM_PREFIX", &prefix)
            .args([
                "install",
                "--locked",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
            ])
            .args([
                "--no-default-features",
                "--features",
                &format!("llvm-{llvm_major}"),
            ]),
    )
}

fn setup_test_tools() -> Result<()> {
    let mut missing: Vec<&str> = TEST_TOOLS
        .iter()
        .filter(|(tool, _)| !is_installed(tool))
        .map(|&(_, package)| package)
        .collect();
    missing.dedup();
    if missing.is_empty() {
        return Ok(());
    }
    apt_install(&missing)
}

/// Kubernetes manifest validators, installed from PyPI and npm under target/validators:
/// kubernetes-validate (core kinds) and the Prometheus Operator models (PodMonitor,
/// ServiceMonitor). tests/deploy.rs runs them.
fn setup_validators(root: &Path) -> Result<()> {
    let dir = root.join("target/validators");
    let venv = dir.join("venv");
    if !venv.join("bin/kubernetes-validate").exists() {
        step("installing kubernetes-validate (PyPI) for the manifest tests");
        check(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
        check(Command::new(venv.join("bin/pip")).args([
            "install",
            "--quiet",
            "kubernetes-validate==1.37.0",
        ]))?;
    }
    let node = dir.join("node");
    std::fs::create_dir_all(&node)?;
    // The script and its package.json live in deploy/; they run from here, next to
    // node_modules, which stays out of the repository.
    let manifest = std::fs::read(root.join("deploy/package.json"))?;
    let installed = std::fs::read(node.join("package.json")).unwrap_or_default();
    std::fs::copy(
        root.join("deploy/validate-monitors.mjs"),
        node.join("validate-monitors.mjs"),
    )?;
    if manifest != installed || !node.join("node_modules").exists() {
        step("installing the Prometheus Operator schemas (npm) for the manifest tests");
        std::fs::write(node.join("package.json"), &manifest)?;
        check(
            Command::new("npm")
                .args(["install", "--silent", "--no-audit", "--no-fund"])
                .current_dir(&node),
        )?;
    }
    Ok(())
}

fn apt_install(packages: &[&str]) -> Result<()> {
    require_root("installing Debian packages")?;
    step(&format!("installing {} with apt-get", packages.join(" ")));
    check(Command::new("apt-get").args(["update", "-qq"]))?;
    check(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(packages),
    )
}

fn require_root(why: &str) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("{why} needs root: run `sudo -E cargo xtask ...`");
    }
    Ok(())
}

fn step(what: &str) {
    eprintln!("xtask: {what}");
}

fn cargo() -> Command {
    Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

fn check(command: &mut Command) -> Result<()> {
    let status = command
        .status()
        .with_context(|| format!("starting {command:?}"))?;
    if !status.success() {
        bail!("{command:?} failed ({status})");
    }
    Ok(())
}

fn output(command: &mut Command) -> Result<String> {
    let out = command
        .output()
        .with_context(|| format!("starting {command:?}"))?;
    if !out.status.success() {
        bail!(
            "{command:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn command_succeeds(command: &mut Command) -> bool {
    command
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A command on PATH, or an absolute path with at most one `*` directory.
fn is_installed(tool: &str) -> bool {
    let Some((dir, rest)) = tool.split_once("/*/") else {
        return if tool.starts_with('/') {
            Path::new(tool).exists()
        } else {
            which(tool).is_some()
        };
    };
    std::fs::read_dir(dir)
        .map(|entries| entries.flatten().any(|e| e.path().join(rest).exists()))
        .unwrap_or(false)
}

/// `tool` on PATH, or in /usr/sbin and /sbin (ip, ss, bpftool live there; some PATHs, such
/// as CI's or sudo's, lack them).
fn which(tool: &str) -> Option<PathBuf> {
    let path = env::var_os("PATH").unwrap_or_default();
    let search =
        env::join_paths(env::split_paths(&path).chain(["/usr/sbin".into(), "/sbin".into()]))
            .ok()?;
    which::which_in(tool, Some(search), "/").ok()
}

/// `cargo install` puts bpf-linker in $CARGO_HOME/bin; rustc must find it on PATH even
/// where that directory is not (CI's environment, sudo).
fn put_cargo_bin_on_path() -> Result<()> {
    let cargo_home = env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|home| Path::new(&home).join(".cargo")))
        .context("neither CARGO_HOME nor HOME is set")?;
    let bin = cargo_home.join("bin");
    let path = env::var_os("PATH").unwrap_or_default();
    if !env::split_paths(&path).any(|dir| dir == bin) {
        let joined = env::join_paths(std::iter::once(bin).chain(env::split_paths(&path)))?;
        // SAFETY: single-threaded at this point; no other thread reads the environment.
        unsafe { env::set_var("PATH", joined) };
    }
    Ok(())
}

fn workspace_root() -> Result<PathBuf> {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    Ok(manifest
        .parent()
        .context("xtask/ has no parent directory")?
        .to_path_buf())
}

fn exit_code(code: Option<i32>) -> ExitCode {
    ExitCode::from(code.unwrap_or(1).clamp(0, 255) as u8)
}
