//! `cargo xtask`: the project's entry points, installing what a fresh machine lacks first.
//!
//! - `cargo xtask run -- watch`: build connwatch (release) and run it with the given args.
//! - `cargo xtask test`: fmt, clippy and every test tier (loads real eBPF programs), on
//!   this host and in QEMU guests of Debian's kernels; `--host-only`, `--vm-only`,
//!   `--kernel 6.1` pick the tiers.
//! - `cargo xtask bench`: measure connwatch's cost side by side; writes BENCHMARKS.md.
//! - `cargo xtask vm-run 6.1 -- CMD...`: run CMD as root in a QEMU guest booting Debian's
//!   kernel 5.10, 6.1 or 6.12 on this machine's filesystem (see vm.rs).
//! - `cargo xtask image`: the multi-architecture image (amd64, arm64) with buildah.
//! - `cargo xtask setup`: only install the prerequisites.
mod arch;
mod bench;
mod image;
mod manifests;
mod reliability;
mod vm;

use std::{
    env,
    ffi::{OsStr, OsString},
    path::{Path, PathBuf},
    process::{Command, ExitCode},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use arch::Arch;
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
    /// Measure the daemon under floods, a stdout nobody reads, the refresh off and idle
    /// HTTP clients; writes RELIABILITY.md.
    Reliability,
    /// Run a command as root in a QEMU guest booting one of Debian's kernels, in this
    /// workspace on this machine's filesystem: `cargo xtask vm-run 6.1 -- uname -r`.
    /// Exits with the command's exit status.
    VmRun {
        /// Kernel line: 5.10 (bullseye), 6.1 (bookworm), 6.12 (trixie), or the arm64 ones
        /// 6.1-arm64, 6.12-arm64.
        kernel: String,
        /// Give up (and fail) after this many minutes.
        #[arg(long, default_value_t = 30)]
        timeout_minutes: u64,
        /// Environment variables for the command, NAME=VALUE (the guest does not inherit
        /// this environment).
        #[arg(long = "env", value_name = "NAME=VALUE", value_parser = name_value)]
        env: Vec<(String, String)>,
        /// The command and its arguments, run in the workspace. Files it writes to
        /// $XTASK_VM_OUT are kept on the host (the rest of the filesystem is read-only).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
        command: Vec<OsString>,
    },
    /// Build the static binaries of every architecture and the image around them: one
    /// manifest list (linux/amd64, linux/arm64) in buildah's local store.
    Image {
        /// The manifest list's name.
        #[arg(long, default_value = image::DEFAULT_TAG)]
        tag: String,
    },
    /// Write deploy/privileged.yaml from deploy/connwatch.yaml's DaemonSet.
    Manifests {
        /// Only check that the committed file is what would be written.
        #[arg(long)]
        check: bool,
    },
    /// (bench helper) hold N loopback connections until stdin closes.
    #[command(hide = true)]
    HoldSockets { connections: usize },
    /// Check formatting and lints, then run every test tier (needs root: tests load eBPF):
    /// unprivileged `cargo test`, the integration tests on this host, then the integration
    /// tests that meet kernel differences in QEMU guests of Debian's kernels 5.10, 6.1, 6.12.
    Test {
        /// Only this host: skip the kernel matrix.
        #[arg(long, conflicts_with_all = ["vm_only", "kernel"])]
        host_only: bool,
        /// Only the kernel matrix: skip fmt, clippy and the tests on this host.
        #[arg(long)]
        vm_only: bool,
        /// Boot only this kernel line (repeatable): 5.10, 6.1, 6.12, 6.1-arm64, 6.12-arm64.
        #[arg(long, value_name = "LINE")]
        kernel: Vec<String>,
        /// Extra arguments for the host's `cargo test` runs, e.g. `-- idle_reset`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// (test helper, run inside a guest) the kernel matrix's tests; see vm.rs.
    #[command(hide = true)]
    GuestSuite {
        /// The kernel line this guest boots: its tests run.
        #[arg(long)]
        line: String,
        /// The connwatch binary the tests drive.
        #[arg(long)]
        connwatch: PathBuf,
        /// An integration-test executable: NAME=PATH (repeatable).
        #[arg(long = "test", value_name = "NAME=PATH", value_parser = name_value)]
        tests: Vec<(String, String)>,
    },
}

/// The toolchain that builds the eBPF programs: needs nightly for `-Z build-std`.
/// Never updated by xtask: a new nightly would bring an LLVM bpf-linker was not built for.
const NIGHTLY: &str = "nightly";
/// The nightly (its commit date) that the aya pins in Cargo.toml, bpf-linker
/// [`BPF_LINKER_VERSION`] and LLVM 22 were verified with: another one is refused, naming it.
const NIGHTLY_DATE: &str = "2026-05-19";
/// bpf-linker known to build against LLVM 22 with `--features llvm-22`.
const BPF_LINKER_VERSION: &str = "0.13.0";
/// Finds dependencies no crate uses (the lint step runs it).
const CARGO_MACHETE_VERSION: &str = "0.9.2";
/// Debian packages the tests drive: bpftool (BTF cross-check), ip/ss (netns, `ss -K`),
/// setpriv (unprivileged run, running PostgreSQL), prometheus (scrapes the daemon; its
/// promtool unit-tests the alerting rules),
/// PostgreSQL (real stalled queries), python3 (a second client process), buildah (builds
/// the scratch image around the static binary).
/// Command (or absolute path, one `*` allowed) → package.
const TEST_TOOLS: &[(&str, &str)] = &[
    ("bpftool", "bpftool"),
    ("prometheus", "prometheus"),
    ("promtool", "prometheus"),
    ("/usr/lib/postgresql/*/bin/postgres", "postgresql"),
    ("python3", "python3"),
    ("node", "nodejs"),
    ("nft", "nftables"),
    ("npm", "npm"),
    ("ip", "iproute2"),
    ("ss", "iproute2"),
    ("setpriv", "util-linux"),
    ("buildah", "buildah"),
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

#[expect(clippy::too_many_lines, reason = "one arm per xtask command")]
fn run(cli: Cli) -> Result<ExitCode> {
    let root = workspace_root()?;
    env::set_current_dir(&root)?;
    put_cargo_bin_on_path()?;
    match cli.command {
        Task::Setup => {
            setup_build()?;
            setup_machete()?;
            setup_test_tools()?;
            setup_validators(&root)?;
            setup_python_clients(&root)?;
            setup_static_target()?;
            vm::Vm::new(&root).setup()?;
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
        Task::VmRun {
            kernel,
            timeout_minutes,
            env,
            command,
        } => {
            require_root("booting guests and loading modules")?;
            let vm = vm::Vm::new(&root);
            vm.setup()?;
            vm::end_guest_on_signals();
            let kernel = vm.kernel(vm::Vm::line(&kernel)?)?;
            let env: Vec<(&str, &OsStr)> = env
                .iter()
                .map(|(name, value)| (name.as_str(), OsStr::new(value)))
                .collect();
            step(&format!(
                "booting {} {} (QEMU, no KVM)",
                kernel.package, kernel.version
            ));
            let run = vm.run(
                &kernel,
                &env,
                &command,
                Duration::from_secs(timeout_minutes * 60),
            )?;
            step(&format!(
                "guest {} finished in {:.0} s: exit status {} (console, output: {})",
                kernel.line.name,
                run.elapsed.as_secs_f64(),
                run.code
                    .map_or_else(|| "unknown".to_string(), |c| c.to_string()),
                run.dir.display()
            ));
            Ok(exit_code(run.code))
        }
        Task::Image { tag } => {
            require_root("buildah's local store is root's")?;
            setup_build()?;
            setup_static_target()?;
            if which("buildah").is_none() {
                apt_install(&["buildah"])?;
            }
            build_static(&root)?;
            image::build(&root, &tag)?;
            Ok(ExitCode::SUCCESS)
        }
        Task::Manifests { check } => {
            manifests::run(&root, check)?;
            Ok(ExitCode::SUCCESS)
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
            bench::run(&root, &root.join("target/release/connwatch"))?;
            Ok(ExitCode::SUCCESS)
        }
        Task::Reliability => {
            require_root("the daemon loads eBPF programs")?;
            setup_build()?;
            step("building connwatch (release)");
            check(cargo().args(["build", "--release", "--package", "monitor"]))?;
            reliability::run(&root, &root.join("target/release/connwatch"))?;
            Ok(ExitCode::SUCCESS)
        }
        Task::Test {
            host_only,
            vm_only,
            kernel,
            args,
        } => test(&root, host_only, vm_only, &kernel, &args),
        Task::GuestSuite {
            line,
            connwatch,
            tests,
        } => {
            let tests: Vec<(String, PathBuf)> = tests
                .into_iter()
                .map(|(name, path)| (name, PathBuf::from(path)))
                .collect();
            let passed = vm::guest_suite(vm::Vm::line(&line)?, &tests, &connwatch)?;
            Ok(if passed {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}

/// `cargo xtask test`: lints first (a failure stops there: they are quick to fix), then
/// every test tier, each run even when an earlier one failed so that one CI run reports
/// all of them; the exit status is a failure if any tier failed.
fn test(
    root: &Path,
    host_only: bool,
    vm_only: bool,
    kernels: &[String],
    args: &[OsString],
) -> Result<ExitCode> {
    require_root("the tests load eBPF programs and create network namespaces")?;
    let lines = if kernels.is_empty() {
        vm::KERNELS.iter().filter(|line| line.by_default).collect()
    } else {
        kernels
            .iter()
            .map(|k| vm::Vm::line(k))
            .collect::<Result<Vec<_>>>()?
    };
    setup_build()?;
    setup_test_tools()?;
    setup_validators(root)?;
    setup_python_clients(root)?;
    setup_static_target()?;
    let vm = vm::Vm::new(root);
    if !host_only {
        vm.setup()?;
        vm::end_guest_on_signals();
    }
    if !vm_only {
        lint(root)?;
    }
    step("building connwatch: debug, and static (musl, release) for images and guests");
    check(cargo().args(["build", "--package", "monitor"]))?;
    build_static(root)?;
    let static_bin = Arch::X86_64.static_bin(root);
    let debug_bin = root.join("target/debug/connwatch");

    let mut tiers: Vec<(String, bool, Duration)> = Vec::new();
    let mut tier = |name: String, command: &mut Command| -> Result<()> {
        step(&name);
        let started = Instant::now();
        let status = command
            .env("CONNWATCH_STATIC_BIN", &static_bin)
            .env("CONNWATCH_STATIC_BIN_ARM64", Arch::Arm64.static_bin(root))
            .status()
            .with_context(|| format!("starting {command:?}"))?;
        tiers.push((name, status.success(), started.elapsed()));
        Ok(())
    };
    if !vm_only {
        tier(
            "unprivileged tests: cargo test (default members)".to_string(),
            cargo().arg("test").args(args),
        )?;
        let kernel = output(Command::new("uname").arg("-r"))?;
        tier(
            format!("privileged tests on this host (Linux {})", kernel.trim()),
            cargo()
                .args(["test", "--package", "integration-test"])
                .args(args)
                .env("CONNWATCH_BIN", &debug_bin),
        )?;
    }
    if !host_only {
        let started = Instant::now();
        let results = vm.matrix(&lines);
        vm::print_summary(&results);
        for result in &results {
            tiers.push((
                format!("kernel matrix: Linux {}", result.kernel),
                result.passed(),
                Duration::from_secs_f64(result.seconds),
            ));
        }
        step(&format!(
            "kernel matrix took {:.0} s",
            started.elapsed().as_secs_f64()
        ));
    }
    println!("\ntest tiers:");
    for (name, passed, took) in &tiers {
        let verdict = if *passed { "pass" } else { "FAIL" };
        println!("  {verdict}  {:>5.0} s  {name}", took.as_secs_f64());
    }
    let failed = tiers.iter().filter(|(_, passed, _)| !passed).count();
    // The plain closing line CI reads: test tiers, each a whole `cargo test` run or guest.
    println!("tiers: {} passed, {failed} failed", tiers.len() - failed);
    if failed > 0 {
        eprintln!("xtask: {failed} of {} test tiers failed", tiers.len());
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

/// cargo-machete, from crates.io (a few minutes to build, once).
fn setup_machete() -> Result<()> {
    if which("cargo-machete").is_some() {
        return Ok(());
    }
    step(&format!("installing cargo-machete {CARGO_MACHETE_VERSION}"));
    check(cargo().args([
        "install",
        "--locked",
        "cargo-machete",
        "--version",
        CARGO_MACHETE_VERSION,
    ]))
}

/// rustfmt, unused dependencies (cargo-machete) and clippy on the host crates
/// (integration-test included) and on the eBPF programs (bpf target, nightly).
fn lint(root: &Path) -> Result<()> {
    step("cargo fmt --check");
    check(cargo().args(["fmt", "--all", "--", "--check"]))?;
    setup_machete()?;
    step("cargo machete (unused dependencies)");
    // cargo-machete takes itself for a `cargo run` child (not `cargo machete`) when it
    // inherits CARGO_PKG_NAME, as it does from `cargo xtask`, and then reads "machete" as a path.
    check(cargo().arg("machete").env_remove("CARGO_PKG_NAME"))?;
    step("cargo clippy -D warnings");
    check(cargo().args([
        "clippy",
        "--workspace",
        // Builds only for the bpf target: linted below.
        "--exclude",
        "monitor-ebpf",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
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
    )
}

/// The static release builds of connwatch, one per [`Arch`]: the arm64 one cross-compiled
/// here (rust-lld links it, see .cargo/config.toml).
fn build_static(root: &Path) -> Result<()> {
    for arch in Arch::ALL {
        check(
            cargo()
                .args(["build", "--release", "--package", "monitor", "--target"])
                .arg(arch.musl_target()),
        )?;
        let bin = arch.static_bin(root);
        if !bin.is_file() {
            bail!("cargo built no {}", bin.display());
        }
    }
    Ok(())
}

/// The integration-test executables by test target name (`doctor`, `reset`, ...), built
/// by cargo: the guests run them directly (no cargo in the guest, and the workspace is
/// read-only there). `target`: cross-compile them (static, for a guest of another
/// architecture), only the test files `only` names.
pub fn integration_test_executables(
    target: Option<&str>,
    only: &[&str],
) -> Result<Vec<(String, PathBuf)>> {
    let mut build = cargo();
    build.args(["test", "--package", "integration-test", "--no-run"]);
    if let Some(target) = target {
        build.args(["--target", target]);
    }
    for name in only {
        build.args(["--test", name]);
    }
    build
        .arg("--message-format=json-render-diagnostics")
        // Compiler messages and progress to the terminal; only the JSON is ours.
        .stderr(std::process::Stdio::inherit());
    let json = output(&mut build)?;
    let mut tests = Vec::new();
    for line in json.lines() {
        let Ok(message) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let is_test = message["reason"] == "compiler-artifact"
            && message["target"]["kind"] == serde_json::json!(["test"]);
        if let (true, Some(exe)) = (is_test, message["executable"].as_str()) {
            let name = message["target"]["name"]
                .as_str()
                .context("cargo's artifact message has no target name")?;
            tests.push((name.to_string(), PathBuf::from(exe)));
        }
    }
    if tests.is_empty() {
        bail!("cargo built no integration-test executables");
    }
    Ok(tests)
}

/// xtask itself built for `target` (static): it runs the guest suite in a guest of another
/// architecture.
pub fn xtask_for(root: &Path, target: &str) -> Result<PathBuf> {
    check(cargo().args(["build", "--package", "xtask", "--target", target]))?;
    Ok(root.join("target").join(target).join("debug/xtask"))
}

/// The static builds (connwatch in scratch images, and in the guests) need the musl
/// targets of the stable toolchain. Added, never updated: `rustup update` would move the
/// toolchain under everyone's feet.
fn setup_static_target() -> Result<()> {
    let installed = output(Command::new("rustup").args([
        "target",
        "list",
        "--installed",
        "--toolchain",
        "stable",
    ]))?;
    for target in Arch::ALL.map(Arch::musl_target) {
        if !installed.lines().any(|line| line.trim() == target) {
            step(&format!(
                "adding the {target} target to the stable toolchain"
            ));
            check(Command::new("rustup").args(["target", "add", target, "--toolchain", "stable"]))?;
        }
    }
    Ok(())
}

/// Parses `NAME=VALUE` command-line values.
fn name_value(pair: &str) -> Result<(String, String), String> {
    pair.split_once('=')
        .map(|(name, value)| (name.to_string(), value.to_string()))
        .ok_or_else(|| format!("`{pair}`: expected NAME=VALUE"))
}

fn setup_build() -> Result<()> {
    if !command_succeeds(Command::new("rustup").args(["run", NIGHTLY, "rustc", "--version"])) {
        bail!(
            "the `{NIGHTLY}` toolchain is missing: install it with `rustup toolchain install \
             {NIGHTLY}` (its LLVM major version decides which bpf-linker is built)"
        );
    }
    let version = output(Command::new("rustup").args(["run", NIGHTLY, "rustc", "-vV"]))?;
    let date = version
        .lines()
        .find_map(|line| line.strip_prefix("commit-date: "))
        .unwrap_or("unknown");
    if date != NIGHTLY_DATE {
        bail!(
            "the `{NIGHTLY}` toolchain is from {date}, but connwatch's eBPF build is pinned to \
             the nightly of {NIGHTLY_DATE} (aya =0.14.0, bpf-linker {BPF_LINKER_VERSION} and \
             LLVM 22 build together with it): install that nightly as the `{NIGHTLY}` \
             toolchain, or move the pins together (NIGHTLY_DATE in xtask/src/main.rs, the aya \
             versions in Cargo.toml, BPF_LINKER_VERSION)"
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

/// The Python client stack the stall tests drive against PostgreSQL (SQLAlchemy's
/// QueuePool over psycopg2, as the incident was reported), from PyPI under target/clients.
const PYTHON_CLIENTS: &[&str] = &["SQLAlchemy==2.0.58", "psycopg2-binary==2.9.13"];

fn setup_python_clients(root: &Path) -> Result<()> {
    let venv = root.join("target/clients/venv");
    let stamp = venv.join("connwatch-requirements");
    let wanted = PYTHON_CLIENTS.join("\n");
    if std::fs::read_to_string(&stamp).is_ok_and(|installed| installed == wanted) {
        return Ok(());
    }
    step("installing SQLAlchemy and psycopg2 (PyPI) for the stall tests");
    check(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
    check(
        Command::new(venv.join("bin/pip"))
            .args(["install", "--quiet"])
            .args(PYTHON_CLIENTS),
    )?;
    std::fs::write(&stamp, wanted)?;
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
    if !nix::unistd::geteuid().is_root() {
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
        .is_ok_and(|entries| entries.flatten().any(|e| e.path().join(rest).exists()))
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
    ExitCode::from(u8::try_from(code.unwrap_or(1).clamp(0, 255)).unwrap_or(1))
}
