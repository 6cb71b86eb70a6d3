//! Debian's stock kernels in QEMU: `cargo xtask vm-run` and the kernel matrix of
//! `cargo xtask test`.
//!
//! connwatch's eBPF programs meet a different verifier, different tracepoint formats and
//! different kernel function signatures on every kernel line it supports; the host's kernel
//! is only one of them (and refuses kprobes). So the privileged tests also run in guests
//! that boot the kernels real users run, as Debian ships them.
//!
//! How a guest is made, and why:
//! - Kernels: the `linux-image-*-<arch>-unsigned` package of each line, fetched with
//!   `apt-get download` through a private apt configuration under `target/vm/apt/<arch>/`
//!   (the host's /etc/apt is never touched), and unpacked with `dpkg -x` under
//!   `target/vm/kernels/<line>/`. The archive's address is read from the host's own apt
//!   sources, so no mirror is written down here.
//! - Guests: virtme-ng (PyPI, in a venv under `target/vm/`) boots the kernel on this
//!   machine's own root filesystem over 9p (read-only), so every host tool and every
//!   host-built test binary is there without building an image. It finds the package's
//!   modules next to its vmlinuz and runs depmod on them. QEMU runs without KVM (TCG).
//! - arm64 guests (`qemu-system-aarch64`) cannot run this machine's binaries: they boot on
//!   a root of Debian's arm64 packages instead (`target/vm/roots/arm64/`, unpacked from
//!   bookworm with the same private apt: a shell, iproute2, nftables, bpftool, kmod…, see
//!   [`FOREIGN_ROOT_PACKAGES`]), with the kernel's modules copied in, and this workspace
//!   mounted read-only at its own path. xtask, connwatch and the test executables run there
//!   as static aarch64 builds, cross-compiled here.
//! - Results: the guest's console mixes kernel messages with the command's output and
//!   vng's exit status is not the command's, so the guest writes the command's output and
//!   exit status into a directory shared read-write with the host
//!   (`target/vm/run/<kernel>.<pid>/`).

use std::{
    collections::BTreeSet,
    ffi::{OsStr, OsString},
    fmt::Write as _,
    fs,
    io::{BufRead as _, Read, Seek, SeekFrom, Write},
    os::unix::{ffi::OsStrExt, process::CommandExt},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::atomic::{AtomicI32, Ordering},
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context as _, Result, bail};
use serde::{Deserialize, Serialize};

use crate::{Arch, check, output, step, which};

/// One kernel line of the matrix: which Debian release ships it and how its package is
/// named. The newest package matching `package` (an apt-cache regular expression) wins.
pub struct KernelLine {
    /// What the user types: `cargo xtask vm-run 6.1 -- ...`.
    pub name: &'static str,
    /// Debian release whose archive (and `<suite>-security`) carries the package.
    pub suite: &'static str,
    /// Regular expression for the package names of this line.
    pub package: &'static str,
    /// The guest's CPU (and the package's Debian architecture).
    pub arch: Arch,
    /// The groups of tests its guest runs (see [`KERNEL_TESTS`]).
    pub tests: &'static [&'static [GuestTest]],
    /// Booted by a plain `cargo xtask test`; the others on request (`--kernel`), as the
    /// whole suite must end within CI's 90 minutes.
    pub by_default: bool,
}

/// The kernels the matrix boots: the stock kernels of Debian 11, 12 and 13 on x86-64, and
/// of Debian 12 and 13 on arm64 (Graviton, Ampere). arm64 6.1 has no BPF trampolines for
/// kernel functions, so kprobes serve used_after_* there; arm64 6.12 is booted on request.
/// (`6.1.0-0.debNN` and `+deb12` are backports to older releases; the patterns skip them.)
pub const KERNELS: &[KernelLine] = &[
    KernelLine {
        name: "5.10",
        suite: "bullseye",
        package: r"^linux-image-5\.10\.[0-9]+-[0-9]+-amd64-unsigned$",
        arch: Arch::X86_64,
        tests: &[KERNEL_TESTS, END_TO_END_TESTS],
        by_default: true,
    },
    KernelLine {
        name: "6.1",
        suite: "bookworm",
        package: r"^linux-image-6\.1\.[0-9]+-[0-9]+-amd64-unsigned$",
        arch: Arch::X86_64,
        tests: &[KERNEL_TESTS],
        by_default: true,
    },
    KernelLine {
        name: "6.12",
        suite: "trixie",
        package: r"^linux-image-6\.12\.[0-9]+\+deb13(\.[0-9]+)?-amd64-unsigned$",
        arch: Arch::X86_64,
        tests: &[KERNEL_TESTS, END_TO_END_TESTS, LONG_END_TO_END_TESTS],
        by_default: true,
    },
    KernelLine {
        name: "6.1-arm64",
        suite: "bookworm",
        package: r"^linux-image-6\.1\.[0-9]+-[0-9]+-arm64-unsigned$",
        arch: Arch::Arm64,
        tests: &[ARM64_TESTS],
        by_default: true,
    },
    KernelLine {
        name: "6.12-arm64",
        suite: "trixie",
        package: r"^linux-image-6\.12\.[0-9]+\+deb13(\.[0-9]+)?-arm64-unsigned$",
        arch: Arch::Arm64,
        tests: &[ARM64_TESTS],
        // Its hooks are x86-64 6.12's (tp_btf everywhere); about 10 more minutes of TCG.
        by_default: false,
    },
];

/// An integration-test file (test target) a guest runs, with `cargo test` name filters
/// (none: the whole file).
pub type GuestTest = (&'static str, &'static [&'static str]);

/// The privileged tests whose outcome depends on the kernel's hooks, verifier, layouts and
/// socket lists: every x86-64 guest runs them. Left out, as the kernel does not change
/// them: `deploy` (manifests), `image` (buildah around the static binary), `errors`
/// (command-line mistakes).
pub const KERNEL_TESTS: &[GuestTest] = &[
    // Loads and attaches every program: the verifier, tracepoints, fentry/kprobe fallbacks.
    ("doctor", &[]),
    // The struct offsets handed to the programs, from this kernel's BTF.
    ("btf_layout", &[]),
    // tcp_receive_reset / tcp_send_reset, whose formats and firing changed in 6.10.
    ("reset", &[]),
    // Write/read after reset and FIN: tcp_sendmsg/tcp_recvmsg signatures, sock_*_length.
    ("used_after", &[]),
    // Reset reasons (`enum sk_rst_reason`, 6.10+) and the fallbacks without them.
    ("causes", &[]),
    // The ring buffer filling up.
    ("loss", &[]),
    // The kernel programs' diagnostics (aya-log): verifier-clean with them on.
    ("kernel_log", &[]),
    // Sockets opened before connwatch started: the sock_diag snapshot (inet_diag modules).
    ("pools", &[]),
    // Network namespaces and veth, sockets destroyed with `ss -K`.
    ("netns", &[]),
    // cgroup ids of a pod-shaped cgroup.
    ("workload", &[]),
    // Floods, restarts, bounded tables, least privilege (each kernel's needs). With a host
    // thread per vCPU it livelocked 5.10 guests at perf_event_open (the text-poke race of
    // `run`); round-robin TCG runs it in about a minute.
    ("reliability", &[]),
    // The daemon's probes and metrics.
    ("daemon", &[]),
];

/// End to end: real clients and servers (PostgreSQL, Python pools, proxies) through the
/// whole pipeline, minutes of TCG each. They meet the kernel through the hooks above, so
/// they run in the oldest and the newest x86-64 guest (5.10: fexit, no socket storage;
/// 6.12: tp_btf with it), not in 6.1 (fexit with socket storage, which `pools` covers
/// there): the time goes to the arm64 guests instead.
pub const END_TO_END_TESTS: &[GuestTest] = &[
    // The daemon's HTTP limits under idle clients, at a 256 open-files limit: the socket
    // refresh (sock_diag, /proc) must keep its descriptors on every kernel.
    ("http", &[]),
    // Real PostgreSQL incidents, end to end.
    ("incidents", &[]),
    // Zombie connections behind a multiplexer: tcp_info's bytes each way (sock_diag).
    ("zombie", &[]),
    // Pods' network namespaces: setns and sock_diag in each, /proc/<pid>/net without.
    ("namespaces", &[]),
    // Idle limits learned from kills behind RST and FIN proxies (idle at reset, tcp_info).
    ("idle_limits", &[]),
];

/// The longest end-to-end runs (Python pools for minutes, floods), in the newest x86-64
/// guest only: what they meet of the kernel (sock_diag lists, tcp_info idle times, the ring
/// buffer under floods) `pools`, `loss` and `reliability` check on every line, and in 5.10
/// they took 6 minutes the suite needs for the arm64 guest.
pub const LONG_END_TO_END_TESTS: &[GuestTest] = &[
    // Leaked pool connections on a real PostgreSQL: first listings and tcp_info idle times.
    // The leak and the same load done right; the look-alikes judge the same socket lists
    // the same way on every kernel, and take minutes of TCG Python each: host only.
    (
        "leaks",
        &[
            "a_leaking_pool_is_flagged_before_its_limit_then_its_plateau",
            "the_same_load_with_connections_returned_is_not_a_leak",
        ],
    ),
    // A stdout nobody reads and floods with the refresh off, at a guest's event rates.
    ("wedge", &[]),
];

/// The arm64 guests' tests: what the architecture changes. The eBPF object is built for
/// each target (kprobes read their arguments from that architecture's registers), the
/// kernel's BTF layouts and its hooks differ (arm64 6.1 has no BPF trampolines for kernel
/// functions). Everything above that (detectors, clients, sinks) is the same code on the
/// same kernel lines, tested in the x86-64 guests; `doctor` loads every program with the
/// kernel diagnostics on, which `kernel_log` does again (left out here: minutes of TCG).
pub const ARM64_TESTS: &[GuestTest] = &[
    ("doctor", &[]),
    ("btf_layout", &[]),
    ("reset", &[]),
    ("used_after", &[]),
    ("causes", &[]),
    ("netns", &[]),
];

impl KernelLine {
    /// The guest tests of this line, in the order they run.
    pub fn tests(&self) -> impl Iterator<Item = &'static GuestTest> {
        self.tests.iter().flat_map(|group| group.iter())
    }
}

/// Test threads in a guest: one per vCPU (both vCPUs share one host thread, see `run`).
const GUEST_TEST_THREADS: &str = "2";
/// A guest that has not finished by then is stopped and fails: a hang must not eat the
/// CI's 90 minutes.
pub const GUEST_TIMEOUT: Duration = Duration::from_mins(25);

/// virtme-ng, pinned: its guest init and command-line options are what this file relies on.
const VIRTME_NG: &str = "virtme-ng==1.42";
/// Command (as on PATH) → Debian package, for booting guests: QEMU itself (for each
/// [`Arch`]), depmod for the kernel package's modules, a static busybox for virtme's
/// initramfs (Debian's kernels have 9p as modules), `file` for virtme-ng to read the
/// kernel's version.
const VM_TOOLS: &[(&str, &str)] = &[
    ("depmod", "kmod"),
    ("busybox", "busybox-static"),
    ("file", "file"),
];
/// Guest size: two vCPUs (the host's cores; TCG runs one thread per vCPU), and memory
/// for the tests' servers and the verifier.
const GUEST_CPUS: &str = "2";
const GUEST_MEMORY: &str = "2G";
/// Names, in the guest, a directory the command may write files to that the host keeps
/// (`target/vm/run/<kernel>.<pid>/out`): the rest of the host's filesystem is read-only there.
pub const SHARED_ENV: &str = "XTASK_VM_OUT";
/// Debian's keyring, which holds the keys of every release above.
const DEBIAN_KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";
/// The private apt index is refreshed when older than this.
const INDEX_MAX_AGE: Duration = Duration::from_hours(12);
/// Where guests on another root see their run directory.
const FOREIGN_RUN_DIR: &str = "/xtask-run";
/// The Debian release whose packages make the root of guests of another architecture.
const FOREIGN_ROOT_SUITE: &str = "bookworm";
/// That root's packages (apt adds their dependencies): virtme-ng's init (bash, mount,
/// busybox for its initramfs and poweroff), the guest script (`ip`, `mountpoint`,
/// modprobe) and the tools the arm64 guest tests drive (`bpftool`, `ip`, `nft`,
/// `setpriv`, `python3` for a second client process). Changing the list rebuilds the root.
const FOREIGN_ROOT_PACKAGES: &[&str] = &[
    "bash",
    "dash",
    "coreutils",
    "util-linux",
    "mount",
    "kmod",
    "iproute2",
    "nftables",
    "bpftool",
    "busybox-static",
    "procps",
    "sed",
    "grep",
    "findutils",
    "libc-bin",
    "python3",
];

/// Where everything of this module lives: `target/vm/`.
pub struct Vm {
    root: PathBuf,
    dir: PathBuf,
}

/// A kernel ready to boot.
pub struct Kernel {
    pub line: &'static KernelLine,
    /// The Debian package and version it came from, for the logs.
    pub package: String,
    pub version: String,
    pub vmlinuz: PathBuf,
    /// The package's `lib/modules/<release>`.
    pub modules: PathBuf,
}

/// What happened to a command run in a guest.
pub struct GuestRun {
    /// The command's exit status; None when the guest never reported one (crash, timeout).
    pub code: Option<i32>,
    pub elapsed: Duration,
    /// Holds `output.log` (the command's stdout and stderr, as also streamed to ours),
    /// `console.log` (the serial console: boot, kernel warnings, verifier splats) and
    /// `out/` (the command's files, see [`SHARED_ENV`]).
    pub dir: PathBuf,
}

impl Vm {
    pub fn new(root: &Path) -> Self {
        Self {
            root: root.to_path_buf(),
            dir: root.join("target/vm"),
        }
    }

    /// Install QEMU, kmod, busybox and virtme-ng where missing.
    pub fn setup(&self) -> Result<()> {
        let qemus = Arch::ALL.map(Arch::qemu);
        let mut missing: Vec<&str> = VM_TOOLS
            .iter()
            .chain(&qemus)
            .filter(|(tool, _)| which(tool).is_none())
            .map(|&(_, package)| package)
            .collect();
        missing.dedup();
        if !missing.is_empty() {
            crate::apt_install(&missing)?;
        }
        let venv = self.dir.join("venv");
        if !venv.join("bin/vng").exists() {
            step(&format!(
                "installing {VIRTME_NG} (PyPI) under target/vm/venv"
            ));
            check(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
            check(
                Command::new(venv.join("bin/pip"))
                    .args(["install", "--quiet", VIRTME_NG])
                    .env_remove("PIP_REQUIRE_VIRTUALENV"),
            )?;
        }
        Ok(())
    }

    /// The kernel line called `name`, for the command line.
    pub fn line(name: &str) -> Result<&'static KernelLine> {
        KERNELS.iter().find(|k| k.name == name).with_context(|| {
            let names: Vec<_> = KERNELS.iter().map(|k| k.name).collect();
            format!(
                "no kernel line `{name}`: choose one of {}",
                names.join(", ")
            )
        })
    }

    /// Resolve the newest package of `line`, download and unpack it unless cached.
    pub fn kernel(&self, line: &'static KernelLine) -> Result<Kernel> {
        let apt = self.apt(line.arch)?;
        let package = apt
            .newest(line.package)
            .with_context(|| format!("resolving the {} kernel package", line.name))?;
        let version = apt.candidate_version(&package)?;
        let line_dir = self.dir.join("kernels").join(line.name);
        let dir = line_dir.join(format!("{package}_{version}"));
        if !dir.join(".complete").exists() {
            step(&format!("downloading {package} {version}"));
            let download = line_dir.join("download");
            for stale in [&download, &dir] {
                if stale.exists() {
                    fs::remove_dir_all(stale)?;
                }
            }
            fs::create_dir_all(&download)?;
            check(
                apt.get()
                    .arg("download")
                    .arg(&package)
                    .current_dir(&download),
            )?;
            let deb = only_entry(&download)?;
            check(Command::new("dpkg").arg("-x").arg(&deb).arg(&dir))?;
            fs::write(dir.join(".complete"), "")?;
            // Older packages of this line: superseded, and a few hundred MB each.
            for entry in fs::read_dir(&line_dir)?.flatten() {
                if entry.path() != dir {
                    fs::remove_dir_all(entry.path())?;
                }
            }
        }
        let vmlinuz = fs::read_dir(dir.join("boot"))
            .with_context(|| format!("reading {}/boot", dir.display()))?
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .is_some_and(|n| n.as_bytes().starts_with(b"vmlinuz-"))
            })
            .with_context(|| format!("no vmlinuz-* in {}/boot", dir.display()))?;
        // Debian 13's packages put them under /usr (the merged /usr).
        let modules = ["lib/modules", "usr/lib/modules"]
            .iter()
            .filter_map(|sub| fs::read_dir(dir.join(sub)).ok())
            .flat_map(|entries| entries.flatten().map(|e| e.path()))
            .find(|p| p.join("modules.order").exists() || p.join("kernel").is_dir())
            .with_context(|| format!("no lib/modules/<release> in {}", dir.display()))?;
        Ok(Kernel {
            line,
            package,
            version,
            vmlinuz,
            modules,
        })
    }

    /// The private apt configuration for `arch`'s packages, its index refreshed when stale.
    fn apt(&self, arch: Arch) -> Result<PrivateApt> {
        let apt = PrivateApt::new(self.dir.join("apt").join(arch.debian()), arch)?;
        apt.update_if_stale()?;
        Ok(apt)
    }

    /// The root filesystem of guests of `arch`, holding `kernel`'s modules: `None` for this
    /// machine's own architecture (guests boot on the host's root). Unpacked once from
    /// Debian's packages ([`FOREIGN_ROOT_PACKAGES`]); each kernel's modules are copied in.
    fn guest_root(&self, kernel: &Kernel) -> Result<Option<PathBuf>> {
        let arch = kernel.line.arch;
        if arch.is_host() {
            return Ok(None);
        }
        let root = self.dir.join("roots").join(arch.debian());
        let stamp = root.join(".xtask-packages");
        let wanted = FOREIGN_ROOT_PACKAGES.join(" ");
        if fs::read_to_string(&stamp).ok().as_deref() != Some(wanted.as_str()) {
            step(&format!(
                "unpacking a {FOREIGN_ROOT_SUITE} {} root for the guests (target/vm/roots)",
                arch.debian()
            ));
            if root.exists() {
                fs::remove_dir_all(&root)?;
            }
            let apt = self.apt(arch)?;
            let archives = apt.dir.join("cache/archives");
            for deb in fs::read_dir(&archives)?.flatten() {
                if deb.path().extension() == Some(OsStr::new("deb")) {
                    fs::remove_file(deb.path())?;
                }
            }
            check(
                apt.get()
                    .args([
                        "install",
                        "-y",
                        "-qq",
                        "--download-only",
                        "--no-install-recommends",
                    ])
                    .args(["-t", FOREIGN_ROOT_SUITE])
                    .args(FOREIGN_ROOT_PACKAGES),
            )?;
            fs::create_dir_all(&root)?;
            for deb in fs::read_dir(&archives)?.flatten() {
                if deb.path().extension() == Some(OsStr::new("deb")) {
                    check(Command::new("dpkg").arg("-x").arg(deb.path()).arg(&root))?;
                }
            }
            // What a Debian install's maintainer scripts would have made: the users the
            // tests switch to, and poweroff for virtme-ng's init to end the guest.
            fs::write(
                root.join("etc/passwd"),
                "root:x:0:0:root:/root:/bin/bash\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n",
            )?;
            fs::write(root.join("etc/group"), "root:x:0:\nnogroup:x:65534:\n")?;
            let _ = fs::remove_file(root.join("sbin/poweroff"));
            std::os::unix::fs::symlink("/bin/busybox", root.join("sbin/poweroff"))?;
            fs::write(&stamp, &wanted)?;
        }
        // Mount points: the workspace at its own path, the run directory (see `run`).
        fs::create_dir_all(root.join(self.root.strip_prefix("/").unwrap_or(&self.root)))?;
        fs::create_dir_all(root.join(FOREIGN_RUN_DIR.trim_start_matches('/')))?;
        let release = kernel
            .modules
            .file_name()
            .context("the kernel's modules directory has no name")?;
        let modules = root.join("lib/modules").join(release);
        if !modules.join("modules.dep").exists() {
            fs::create_dir_all(root.join("lib/modules"))?;
            if modules.exists() {
                fs::remove_dir_all(&modules)?;
            }
            // Hard links: the same filesystem, and no second copy of ~300 MB of modules.
            check(
                Command::new("cp")
                    .arg("-al")
                    .arg(&kernel.modules)
                    .arg(&modules),
            )?;
            check(Command::new("depmod").arg("-b").arg(&root).arg(release))?;
        }
        Ok(Some(root))
    }

    /// Boot `kernel` and run `command` as root in the workspace; stream its output.
    ///
    /// `env` is exported in the guest (the guest does not inherit our environment).
    /// The guest is ready for connwatch: loopback up, tracefs mounted, the sock_diag
    /// modules loaded (connwatch's snapshot of existing connections needs them).
    pub fn run(
        &self,
        kernel: &Kernel,
        env: &[(&str, &OsStr)],
        command: &[OsString],
        timeout: Duration,
    ) -> Result<GuestRun> {
        let guest_root = self.guest_root(kernel)?;
        let run_dir = self.fresh_run_dir(kernel.line.name)?;
        let output_path = run_dir.join("output.log");
        let console_path = run_dir.join("console.log");
        let status_path = run_dir.join("status");
        let shared = run_dir.join("out");
        fs::create_dir_all(&shared)?;
        // The run directory as the guest sees it: at its own path on the host's root; on
        // another root at FOREIGN_RUN_DIR, as vng mounts read-write directories before
        // read-only ones (the workspace), so none can lie inside the workspace there.
        let guest_dir = if guest_root.is_some() {
            PathBuf::from(FOREIGN_RUN_DIR)
        } else {
            run_dir.clone()
        };
        let shared_in_guest = guest_dir.join("out");
        let env: Vec<(&str, &OsStr)> = std::iter::once((SHARED_ENV, shared_in_guest.as_os_str()))
            .chain(env.iter().copied())
            .collect();
        let script = guest_script(
            &self.root,
            &env,
            command,
            &guest_dir.join("output.log"),
            &guest_dir.join("status"),
        );
        let script_path = run_dir.join("guest.sh");
        fs::write(&script_path, script)?;

        let console = fs::File::create(&console_path)?;
        let mut vng = self.vng(kernel, guest_root.as_deref(), &guest_dir, &run_dir)?;
        vng.stdin(Stdio::null())
            .stdout(console.try_clone()?)
            .stderr(console)
            // Its own process group, so a timeout ends QEMU too, not only vng.
            .process_group(0);
        let started = Instant::now();
        let mut child = vng.spawn().context("starting vng")?;
        GUEST_GROUP.store(i32::try_from(child.id()).unwrap_or(0), Ordering::SeqCst);
        let mut tail = Tail::new(&output_path);
        let mut timed_out = false;
        let status = loop {
            tail.pump()?;
            if let Some(status) = child.try_wait()? {
                break status;
            }
            if started.elapsed() > timeout && !timed_out {
                timed_out = true;
                eprintln!(
                    "xtask: guest {} timed out after {timeout:?}",
                    kernel.line.name
                );
                kill_guest();
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        GUEST_GROUP.store(0, Ordering::SeqCst);
        tail.pump()?;
        let elapsed = started.elapsed();
        let code = fs::read_to_string(&status_path)
            .ok()
            .and_then(|s| s.trim().parse().ok());
        if code.is_none() {
            eprintln!(
                "xtask: the {} guest reported no exit status (vng: {status}); last console lines \
                 ({}):",
                kernel.line.name,
                console_path.display()
            );
            let console = fs::read_to_string(&console_path).unwrap_or_default();
            let lines: Vec<&str> = console.lines().collect();
            for line in &lines[lines.len().saturating_sub(40)..] {
                eprintln!("  {line}");
            }
        }
        Ok(GuestRun {
            code,
            elapsed,
            dir: run_dir,
        })
    }
}

/// The first lines of a kernel oops or panic in a guest's console, for the summary that
/// CI shows (the console itself stays in the run directory).
fn kernel_crash(console: &Path) -> String {
    let text = fs::read_to_string(console).unwrap_or_default();
    let markers = [
        "Oops",
        "BUG:",
        "Kernel panic",
        "RIP: 0010",
        "soft lockup",
        "Call Trace",
    ];
    let lines: Vec<&str> = text
        .lines()
        .filter(|line| markers.iter().any(|m| line.contains(m)))
        .take(6)
        .collect();
    if lines.is_empty() {
        String::new()
    } else {
        format!("; the guest kernel reported:\n    {}", lines.join("\n    "))
    }
}

impl Vm {
    /// vng booting `kernel` (on `guest_root` when it is another architecture's) to run the
    /// script in `run_dir`, seen in the guest at `guest_dir`.
    fn vng(
        &self,
        kernel: &Kernel,
        guest_root: Option<&Path>,
        guest_dir: &Path,
        run_dir: &Path,
    ) -> Result<Command> {
        let venv_bin = self.dir.join("venv/bin");
        let path = std::env::join_paths(std::iter::once(venv_bin.clone()).chain(
            std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()),
        ))?;
        let mut vng = Command::new(venv_bin.join("vng"));
        vng.arg("--run").arg(&kernel.vmlinuz);
        if let Some(guest_root) = guest_root {
            // Another architecture: its own root, with this workspace (the binaries, the
            // run directory below) mounted at the same path.
            vng.args(["--arch", kernel.line.arch.debian()])
                .arg("--root")
                .arg(guest_root)
                .arg(format!("--rodir={0}={0}", self.root.display()));
        }
        vng
            // No KVM on our machines; 9p, as virtiofs needs a daemon; --verbose puts the
            // kernel's messages (oopses, verifier warnings) in console.log.
            .args(["--disable-kvm", "--force-9p", "--verbose"])
            .args(["--cpus", GUEST_CPUS, "--memory", GUEST_MEMORY])
            // One host thread runs every vCPU in turn (round-robin TCG). With one thread per
            // vCPU (QEMU's default), a static key flipped by attaching or detaching a
            // tracepoint patches kernel text while the other vCPU may still run its old
            // translation: it meets the int3 of text_poke_bp after the kernel has dropped
            // it, and the guest panics ("Oops: int3" in syscall_exit_to_user_mode_prepare
            // on 6.12, a livelock on 5.10). Real CPUs keep code coherent; TCG does only
            // within one thread.
            .arg("--qemu-opts=-accel tcg,thread=single")
            .arg(format!(
                "--rwdir={}={}",
                guest_dir.display(),
                run_dir.display()
            ))
            .arg("--exec")
            .arg(format!(
                "sh {}",
                sh_quote(guest_dir.join("guest.sh").as_os_str())
            ))
            .env("PATH", path);
        Ok(vng)
    }

    /// A new directory for one guest run, `target/vm/run/<kernel>.<pid>`: one per xtask
    /// process, so two runs at once (a developer's and the matrix) do not mix files.
    /// Those of xtask processes that are gone are removed.
    fn fresh_run_dir(&self, kernel: &str) -> Result<PathBuf> {
        let runs = self.dir.join("run");
        fs::create_dir_all(&runs)?;
        for entry in fs::read_dir(&runs)?.flatten() {
            let name = entry.file_name();
            let pid = name
                .to_string_lossy()
                .rsplit_once('.')
                .map(|(_, p)| p.to_string());
            let alive = pid.is_some_and(|p| Path::new("/proc").join(p).exists());
            if !alive {
                let _ = fs::remove_dir_all(entry.path());
            }
        }
        let dir = runs.join(format!("{kernel}.{}", std::process::id()));
        if dir.exists() {
            fs::remove_dir_all(&dir)?;
        }
        fs::create_dir_all(&dir)?;
        Ok(dir)
    }
}

/// The process group of the guest now running (vng and its QEMU), 0 when none. vng runs
/// in its own group so that a timeout can end QEMU with it; that also keeps Ctrl-C from
/// reaching it, so our SIGINT/SIGTERM handler ends it through this.
static GUEST_GROUP: AtomicI32 = AtomicI32::new(0);

fn kill_guest() {
    let group = GUEST_GROUP.load(Ordering::SeqCst);
    if group > 0 {
        // killpg(2) is async-signal-safe; nix's wrapper only converts its arguments.
        let _ =
            nix::sys::signal::killpg(nix::unistd::Pid::from_raw(group), nix::sys::signal::SIGKILL);
    }
}

extern "C" fn on_signal(signal: libc::c_int) {
    kill_guest();
    // SAFETY: _exit is async-signal-safe.
    unsafe { libc::_exit(128 + signal) };
}

/// End the guest when we are interrupted or terminated, instead of leaving QEMU running.
pub fn end_guest_on_signals() {
    use nix::sys::signal::{SigHandler, Signal};
    for signal in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        // SAFETY: on_signal only calls async-signal-safe functions (killpg, _exit) and
        // touches no state but an atomic.
        let _ = unsafe { nix::sys::signal::signal(signal, SigHandler::Handler(on_signal)) };
    }
}

/// The shell script the guest runs: prepare the guest, run the command with its output
/// and exit status written to the shared directory.
fn guest_script(
    workspace: &Path,
    env: &[(&str, &OsStr)],
    command: &[OsString],
    output: &Path,
    status: &Path,
) -> String {
    let mut script = String::from(
        "# Written by `cargo xtask` (xtask/src/vm.rs); runs as root inside the guest.\n\
         ip link set lo up\n\
         mountpoint -q /sys/kernel/tracing || mount -t tracefs tracefs /sys/kernel/tracing\n\
         modprobe -a inet_diag tcp_diag || echo 'xtask: modprobe inet_diag tcp_diag failed'\n",
    );
    // In the script, not vng's --cwd: that must lie inside the guest's root on the host,
    // which the workspace does not for an arm64 root.
    let _ = writeln!(script, "cd {}", sh_quote(workspace.as_os_str()));
    for (key, value) in env {
        let _ = writeln!(script, "export {key}={}", sh_quote(value));
    }
    let words: Vec<String> = command.iter().map(|w| sh_quote(w)).collect();
    let output = sh_quote(output.as_os_str());
    let _ = writeln!(
        script,
        "{} > {output} 2>&1 < /dev/null\necho $? > {}",
        words.join(" "),
        sh_quote(status.as_os_str())
    );
    script
}

/// `word` quoted for sh.
fn sh_quote(word: &OsStr) -> String {
    let word = word.to_string_lossy();
    format!("'{}'", word.replace('\'', r"'\''"))
}

/// Follows a file another process appends to, copying new bytes to our stdout.
struct Tail {
    path: PathBuf,
    offset: u64,
}

impl Tail {
    fn new(path: &Path) -> Self {
        Self {
            path: path.to_path_buf(),
            offset: 0,
        }
    }

    fn pump(&mut self) -> Result<()> {
        let Ok(mut file) = fs::File::open(&self.path) else {
            return Ok(());
        };
        file.seek(SeekFrom::Start(self.offset))?;
        let mut new = Vec::new();
        file.read_to_end(&mut new)?;
        self.offset += new.len() as u64;
        let mut stdout = std::io::stdout().lock();
        stdout.write_all(&new)?;
        stdout.flush()?;
        Ok(())
    }
}

/// One check of the guest suite, as the guest reports it to the host.
#[derive(Debug, Serialize, Deserialize)]
pub struct CheckResult {
    pub name: String,
    pub passed: bool,
    pub seconds: f64,
    /// For a failure: the failing tests and the first line of each panic.
    pub detail: Vec<String>,
}

/// The file, in the guest's shared directory, that the suite writes its results to.
const RESULTS_FILE: &str = "results.json";

/// One guest of the matrix.
pub struct GuestResult {
    pub kernel: &'static str,
    /// Package and version, or why there is none.
    pub package: String,
    pub seconds: f64,
    pub checks: Vec<CheckResult>,
    /// What went wrong outside the checks (download, boot, timeout, a lost result).
    pub error: Option<String>,
}

impl GuestResult {
    pub fn passed(&self) -> bool {
        self.error.is_none() && !self.checks.is_empty() && self.checks.iter().all(|c| c.passed)
    }
}

/// What a guest of one architecture runs: the guest suite's command line (xtask, connwatch
/// and the test executables, all built for that architecture) and its environment.
struct GuestCommand {
    command: Vec<OsString>,
    connwatch: PathBuf,
}

impl GuestCommand {
    /// Builds what guests of `arch` need: on this machine's architecture, the host's debug
    /// test executables and xtask itself; on another, static cross-builds of xtask and of
    /// the tests its kernel lines name.
    fn build(root: &Path, arch: Arch) -> Result<Self> {
        let mut names: Vec<&str> = KERNELS
            .iter()
            .filter(|line| line.arch == arch)
            .flat_map(KernelLine::tests)
            .map(|&(name, _)| name)
            .collect();
        names.sort_unstable();
        names.dedup();
        step(&format!(
            "building the integration tests for the {} guests",
            arch.debian()
        ));
        let (xtask, tests) = if arch.is_host() {
            (
                std::env::current_exe().context("locating the xtask binary")?,
                crate::integration_test_executables(None, &[])?,
            )
        } else {
            (
                crate::xtask_for(root, arch.musl_target())?,
                crate::integration_test_executables(Some(arch.musl_target()), &names)?,
            )
        };
        let connwatch = arch.static_bin(root);
        let mut command: Vec<OsString> = vec![xtask.into(), "guest-suite".into()];
        command.push("--connwatch".into());
        command.push(connwatch.clone().into());
        let chosen = tests
            .iter()
            .filter(|(name, _)| names.contains(&name.as_str()));
        for (name, path) in chosen {
            let mut pair = OsString::from(format!("{name}="));
            pair.push(path);
            command.extend(["--test".into(), pair]);
        }
        Ok(Self { command, connwatch })
    }
}

impl Vm {
    /// Boot each kernel in turn and run the guest suite in it (built for each architecture
    /// the first time a line needs it).
    pub fn matrix(&self, lines: &[&'static KernelLine]) -> Vec<GuestResult> {
        let mut commands: Vec<(Arch, Result<GuestCommand, String>)> = Vec::new();
        let mut results = Vec::new();
        for &line in lines {
            let mut result = GuestResult {
                kernel: line.name,
                package: String::new(),
                seconds: 0.0,
                checks: Vec::new(),
                error: None,
            };
            let built = if let Some(at) = commands.iter().position(|(a, _)| *a == line.arch) {
                at
            } else {
                let built =
                    GuestCommand::build(&self.root, line.arch).map_err(|err| format!("{err:#}"));
                commands.push((line.arch, built));
                commands.len() - 1
            };
            let guest = match &commands[built].1 {
                Ok(guest) => guest,
                Err(err) => {
                    result.error = Some(format!("building the guest's tests: {err}"));
                    results.push(result);
                    continue;
                }
            };
            let env = [
                ("CONNWATCH_BIN", guest.connwatch.as_os_str()),
                ("CONNWATCH_STATIC_BIN", guest.connwatch.as_os_str()),
            ];
            let outcome = self.kernel(line).and_then(|kernel| {
                result.package = format!("{} {}", kernel.package, kernel.version);
                step(&format!(
                    "guest {}: {} (QEMU without KVM): {} test files, selftest, static binary",
                    line.name,
                    result.package,
                    line.tests().count()
                ));
                let mut command = guest.command.clone();
                command.extend(["--line".into(), line.name.into()]);
                self.run(&kernel, &env, &command, GUEST_TIMEOUT)
            });
            match outcome {
                Err(err) => result.error = Some(format!("{err:#}")),
                Ok(run) => {
                    result.seconds = run.elapsed.as_secs_f64();
                    let path = run.dir.join("out").join(RESULTS_FILE);
                    match fs::read(&path).map(|json| serde_json::from_slice(&json)) {
                        Ok(Ok(checks)) => result.checks = checks,
                        _ => {
                            result.error = Some(format!("no results in {}", path.display()));
                        }
                    }
                    if run.code.is_none() {
                        result.error = Some(format!(
                            "the guest did not finish (see {}/console.log){}",
                            run.dir.display(),
                            kernel_crash(&run.dir.join("console.log"))
                        ));
                    }
                }
            }
            results.push(result);
        }
        results
    }
}

/// The summary of the matrix: one line a kernel, then each failure's first lines.
pub fn print_summary(results: &[GuestResult]) {
    println!("\nkernel matrix:");
    println!(
        "{:<7} {:<56} {:<7} {:>7}",
        "KERNEL", "PACKAGE", "RESULT", "SECONDS"
    );
    for r in results {
        let verdict = if r.passed() { "pass" } else { "FAIL" };
        println!(
            "{:<7} {:<56} {:<7} {:>7.0}",
            r.kernel, r.package, verdict, r.seconds
        );
    }
    for r in results.iter().filter(|r| !r.passed()) {
        println!("\n{} failed:", r.kernel);
        if let Some(error) = &r.error {
            println!("  {error}");
        }
        for check in r.checks.iter().filter(|c| !c.passed) {
            println!("  {} ({:.0} s):", check.name, check.seconds);
            for line in &check.detail {
                println!("    {line}");
            }
        }
    }
}

/// The guest side of [`Vm::matrix`], run inside the guest by `xtask guest-suite`: the
/// chosen integration-test files, `connwatch selftest`, and the static binary in a root
/// with no libc. Streams their output and writes each check's result to the shared
/// directory as it goes, so a guest that dies midway still tells how far it got.
/// Returns whether every check passed.
pub fn guest_suite(
    line: &KernelLine,
    tests: &[(String, PathBuf)],
    connwatch: &Path,
) -> Result<bool> {
    let shared = PathBuf::from(
        std::env::var_os(SHARED_ENV).with_context(|| format!("{SHARED_ENV} is not set"))?,
    );
    let mut results = Vec::new();
    let mut record = |result: CheckResult| -> Result<()> {
        let mark = if result.passed { "ok" } else { "FAILED" };
        println!(
            "xtask guest: {} {mark} ({:.0} s)",
            result.name, result.seconds
        );
        results.push(result);
        // Written whole each time: small, and never half a file if the guest dies.
        let json = serde_json::to_vec_pretty(&results)?;
        fs::write(shared.join(RESULTS_FILE), json)?;
        Ok(())
    };
    for &(name, filters) in line.tests() {
        let Some((_, exe)) = tests.iter().find(|(n, _)| n == name) else {
            record(CheckResult {
                name: name.to_string(),
                passed: false,
                seconds: 0.0,
                detail: vec![format!("no test executable `{name}` was built")],
            })?;
            continue;
        };
        let mut command = Command::new(exe);
        command
            .args(["--test-threads", GUEST_TEST_THREADS])
            .args(filters);
        record(run_check(name, command, cargo_test_failures)?)?;
    }
    let mut selftest = Command::new(connwatch);
    selftest.arg("selftest");
    record(run_check("connwatch selftest", selftest, last_lines)?)?;
    record(static_binary_check(connwatch)?)?;
    Ok(results.iter().all(|r| r.passed))
}

/// Runs `command`, its output streamed to ours and kept; a failure's detail comes from
/// `explain`.
fn run_check(
    name: &str,
    mut command: Command,
    explain: fn(&str) -> Vec<String>,
) -> Result<CheckResult> {
    println!("xtask guest: {name}: {command:?}");
    let started = Instant::now();
    let (reader, writer) = std::io::pipe()?;
    command
        .stdin(Stdio::null())
        .stdout(writer.try_clone()?)
        .stderr(writer);
    let mut child = command
        .spawn()
        .with_context(|| format!("starting {command:?}"))?;
    // Our copies of the pipe's write end must go, or the read below never ends.
    drop(command);
    let mut text = String::new();
    for line in std::io::BufReader::new(reader).lines() {
        let line = line.unwrap_or_else(|e| format!("(unreadable output: {e})"));
        println!("{line}");
        text.push_str(&line);
        text.push('\n');
    }
    let status = child.wait()?;
    let passed = status.success();
    let mut detail = if passed { Vec::new() } else { explain(&text) };
    if !passed {
        detail.insert(0, status.to_string());
    }
    Ok(CheckResult {
        name: name.to_string(),
        passed,
        seconds: started.elapsed().as_secs_f64(),
        detail,
    })
}

/// Lines of a panic message kept in a failure's summary.
const PANIC_LINES: usize = 3;

/// From `cargo test` output: each failed test with the first lines of its panic message.
fn cargo_test_failures(text: &str) -> Vec<String> {
    let mut detail = Vec::new();
    let mut lines = text.lines();
    let mut failing = "";
    while let Some(line) = lines.next() {
        if let Some(name) = line
            .strip_prefix("---- ")
            .and_then(|l| l.strip_suffix(" stdout ----"))
        {
            failing = name;
        } else if line.contains("panicked at") {
            // The message's first lines: the assertion, and often the value it looked at.
            let message: Vec<&str> = lines.by_ref().take(PANIC_LINES).map(str::trim).collect();
            let message: String = message.join(" ").chars().take(300).collect();
            detail.push(format!("{failing}: {message}"));
        }
    }
    if detail.is_empty() {
        detail = last_lines(text);
    }
    detail
}

/// The last lines of a failed command's output.
fn last_lines(text: &str) -> Vec<String> {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(8)..]
        .iter()
        .map(std::string::ToString::to_string)
        .collect()
}

/// The static build runs where there is no libc at all (a distroless or scratch image):
/// copied alone into an empty root with only /proc, /sys and /dev mounted, `--version`
/// and `doctor` must succeed there.
fn static_binary_check(connwatch: &Path) -> Result<CheckResult> {
    let started = Instant::now();
    let root = std::env::temp_dir().join("xtask-empty-root");
    let _ = Command::new("umount").arg("-R").arg(&root).status();
    if root.exists() {
        fs::remove_dir_all(&root)?;
    }
    fs::create_dir_all(&root)?;
    fs::copy(connwatch, root.join("connwatch"))?;
    let mut mounted = Vec::new();
    for (dir, how) in [("proc", "--bind"), ("sys", "--rbind"), ("dev", "--bind")] {
        let target = root.join(dir);
        fs::create_dir(&target)?;
        check(
            Command::new("mount")
                .arg(how)
                .arg(Path::new("/").join(dir))
                .arg(&target),
        )?;
        mounted.push(target);
    }
    let mut detail = vec![format!(
        "root {}: {:?}",
        root.display(),
        fs::read_dir(&root)?
            .flatten()
            .map(|e| e.file_name())
            .collect::<Vec<_>>()
    )];
    let mut passed = true;
    for args in [&["--version"][..], &["doctor"][..]] {
        let mut command = Command::new("chroot");
        command.arg(&root).arg("/connwatch").args(args);
        let check = run_check(
            &format!("chroot connwatch {}", args[0]),
            command,
            last_lines,
        )?;
        passed &= check.passed;
        detail.extend(check.detail);
    }
    for target in mounted.iter().rev() {
        let _ = Command::new("umount").arg("-R").arg(target).status();
    }
    Ok(CheckResult {
        name: "static binary without libc".to_string(),
        passed,
        seconds: started.elapsed().as_secs_f64(),
        detail: if passed { Vec::new() } else { detail },
    })
}

/// The single file in `dir` (where `apt-get download` put the package).
fn only_entry(dir: &Path) -> Result<PathBuf> {
    let entries: Vec<PathBuf> = fs::read_dir(dir)?.flatten().map(|e| e.path()).collect();
    match entries.as_slice() {
        [one] => Ok(one.clone()),
        _ => bail!("expected one file in {}, found {entries:?}", dir.display()),
    }
}

/// apt with its own sources, index and cache under `target/vm/apt/`, so downloading the
/// kernels of other releases neither needs nor changes the host's apt configuration.
struct PrivateApt {
    dir: PathBuf,
    arch: Arch,
}

impl PrivateApt {
    fn new(dir: PathBuf, arch: Arch) -> Result<Self> {
        for sub in ["lists/partial", "cache/archives/partial", "sources.list.d"] {
            fs::create_dir_all(dir.join(sub))?;
        }
        let status = dir.join("status");
        if !status.exists() {
            fs::write(&status, "")?;
        }
        let archives = HostArchives::read()?;
        let sources = archives.sources_list();
        let path = dir.join("sources.list");
        if fs::read_to_string(&path).ok().as_deref() != Some(sources.as_str()) {
            fs::write(&path, sources)?;
            // New sources: the old index no longer matches them.
            let _ = fs::remove_file(dir.join("updated"));
        }
        Ok(Self { dir, arch })
    }

    /// The options that point apt at this directory instead of /etc/apt and /var.
    fn options(&self, command: &mut Command) {
        let d = |sub: &str| self.dir.join(sub).display().to_string();
        for (key, value) in [
            ("Dir::Etc::SourceList", d("sources.list")),
            ("Dir::Etc::SourceParts", d("sources.list.d")),
            ("Dir::State", d("")),
            ("Dir::State::Lists", d("lists")),
            ("Dir::State::status", d("status")),
            ("Dir::Cache", d("cache")),
            ("Dir::Cache::archives", d("cache/archives")),
            ("APT::Architecture", self.arch.debian().to_string()),
            ("APT::Architectures", self.arch.debian().to_string()),
            // Our directories are root's; apt's `_apt` user could not write them.
            ("APT::Sandbox::User", "root".to_string()),
        ] {
            command.arg("-o").arg(format!("{key}={value}"));
        }
    }

    fn get(&self) -> Command {
        let mut command = Command::new("apt-get");
        self.options(&mut command);
        command
    }

    fn cache(&self) -> Command {
        let mut command = Command::new("apt-cache");
        self.options(&mut command);
        command
    }

    fn update_if_stale(&self) -> Result<()> {
        let stamp = self.dir.join("updated");
        let fresh = fs::metadata(&stamp)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| SystemTime::now().duration_since(t).ok())
            .is_some_and(|age| age < INDEX_MAX_AGE);
        if fresh {
            return Ok(());
        }
        step("refreshing the private apt index of Debian's kernels (target/vm/apt)");
        let updated = check(self.get().args(["update", "-qq"]));
        match updated {
            Ok(()) => fs::write(&stamp, "")?,
            // Offline, an older index still names kernels we may have cached.
            Err(err) if self.dir.join("lists").read_dir()?.count() > 1 => {
                eprintln!("xtask: warning: {err:#}; using the previous index");
            }
            Err(err) => return Err(err),
        }
        Ok(())
    }

    /// The newest package whose name matches `pattern`: names compared by their numbers,
    /// so `5.10.0-46` beats `5.10.0-9` and `6.12.115+deb13.1` beats `6.12.115+deb13`.
    fn newest(&self, pattern: &str) -> Result<String> {
        let found = output(self.cache().args(["search", "--names-only", pattern]))?;
        let names: BTreeSet<&str> = found
            .lines()
            .filter_map(|line| line.split_whitespace().next())
            .collect();
        names
            .into_iter()
            .max_by_key(|name| numbers(name))
            .map(str::to_string)
            .with_context(|| format!("no package matches {pattern} in the private apt index"))
    }

    fn candidate_version(&self, package: &str) -> Result<String> {
        let shown = output(self.cache().args(["show", "--no-all-versions", package]))?;
        shown
            .lines()
            .find_map(|line| line.strip_prefix("Version: "))
            .map(str::to_string)
            .with_context(|| format!("apt-cache show {package} names no version"))
    }
}

/// The runs of digits in a kernel package's version part (before `-amd64`, `-arm64`), as
/// numbers.
fn numbers(package: &str) -> Vec<u64> {
    let version = Arch::ALL
        .iter()
        .find_map(|arch| package.split_once(&format!("-{}", arch.debian())))
        .map_or(package, |(version, _)| version);
    version
        .split(|c: char| !c.is_ascii_digit())
        .filter(|part| !part.is_empty())
        .map(|part| part.parse().unwrap_or(u64::MAX))
        .collect()
}

/// Where the host's apt gets Debian from: the main archive and the security archive.
#[derive(Debug, PartialEq)]
struct HostArchives {
    main: String,
    security: String,
}

impl HostArchives {
    fn read() -> Result<Self> {
        let mut entries = Vec::new();
        let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
        if let Ok(dir) = fs::read_dir("/etc/apt/sources.list.d") {
            let mut more: Vec<PathBuf> = dir.flatten().map(|e| e.path()).collect();
            more.sort();
            files.extend(more);
        }
        for file in files {
            let Ok(text) = fs::read_to_string(&file) else {
                continue;
            };
            match file.extension().and_then(OsStr::to_str) {
                Some("sources") => entries.extend(parse_deb822(&text)),
                _ if file.file_name() == Some(OsStr::new("sources.list"))
                    || file.extension() == Some(OsStr::new("list")) =>
                {
                    entries.extend(parse_one_line(&text));
                }
                _ => {}
            }
        }
        Self::from_entries(&entries).context(
            "cannot find Debian's main and security archives in the host's apt sources \
             (/etc/apt/sources.list, /etc/apt/sources.list.d/)",
        )
    }

    /// The main archive is the one serving a Debian release's base suite; the security
    /// archive the one serving a `<release>-security` suite.
    fn from_entries(entries: &[SourceEntry]) -> Option<Self> {
        let serves = |pick: fn(&str) -> bool| {
            entries
                .iter()
                .find(|e| e.suites.iter().any(|s| pick(s)))
                .map(|e| e.uri.trim_end_matches('/').to_string())
        };
        Some(Self {
            main: serves(|s| DEBIAN_RELEASES.contains(&s))?,
            security: serves(|s| {
                s.strip_suffix("-security")
                    .is_some_and(|r| DEBIAN_RELEASES.contains(&r))
            })?,
        })
    }

    fn sources_list(&self) -> String {
        let mut list = String::from("# Written by `cargo xtask` from the host's apt sources.\n");
        let suites: BTreeSet<&str> = KERNELS.iter().map(|k| k.suite).collect();
        for suite in suites {
            let _ = writeln!(
                list,
                "deb [signed-by={DEBIAN_KEYRING}] {} {suite} main",
                self.main
            );
            let _ = writeln!(
                list,
                "deb [signed-by={DEBIAN_KEYRING}] {} {suite}-security main",
                self.security
            );
        }
        list
    }
}

/// Debian release names and aliases that identify an archive as Debian's.
const DEBIAN_RELEASES: &[&str] = &[
    "buster",
    "bullseye",
    "bookworm",
    "trixie",
    "forky",
    "duke",
    "sid",
    "oldoldstable",
    "oldstable",
    "stable",
    "testing",
    "unstable",
];

#[derive(Debug, PartialEq)]
struct SourceEntry {
    uri: String,
    suites: Vec<String>,
}

/// `deb [options] uri suite components...` lines.
fn parse_one_line(text: &str) -> Vec<SourceEntry> {
    text.lines()
        .filter_map(|line| {
            let line = line.split('#').next()?.trim();
            let rest = line.strip_prefix("deb ")?.trim_start();
            let rest = match rest.strip_prefix('[') {
                Some(options) => options.split_once(']')?.1,
                None => rest,
            };
            let mut words = rest.split_whitespace();
            Some(SourceEntry {
                uri: words.next()?.to_string(),
                suites: words.next().into_iter().map(str::to_string).collect(),
            })
        })
        .collect()
}

/// deb822 `.sources` stanzas with `Types: deb`, `URIs:` and `Suites:`.
fn parse_deb822(text: &str) -> Vec<SourceEntry> {
    let mut entries = Vec::new();
    for stanza in text.split("\n\n") {
        let field = |name: &str| {
            stanza
                .lines()
                .filter(|l| !l.starts_with('#'))
                .find_map(|l| {
                    let (key, value) = l.split_once(':')?;
                    key.trim()
                        .eq_ignore_ascii_case(name)
                        .then(|| value.split_whitespace().map(str::to_string).collect())
                })
                .unwrap_or_else(Vec::new)
        };
        let enabled = field("Enabled").first().is_none_or(|v| v != "no");
        if !enabled || !field("Types").iter().any(|t| t == "deb") {
            continue;
        }
        let suites = field("Suites");
        for uri in field("URIs") {
            entries.push(SourceEntry {
                uri,
                suites: suites.clone(),
            });
        }
    }
    entries
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_archives_in_deb822_and_one_line_sources() {
        let deb822 = "Types: deb\n# a comment\nURIs: http://mirror.example/debian\n\
                      Suites: bookworm bookworm-updates\nComponents: main\n\n\
                      Types: deb\nURIs: http://mirror.example/debian-security/\n\
                      Suites: bookworm-security\nComponents: main\n\n\
                      Types: deb\nURIs: https://other.example/node\nSuites: nodistro\n";
        let archives = HostArchives::from_entries(&parse_deb822(deb822)).unwrap();
        assert_eq!(archives.main, "http://mirror.example/debian");
        assert_eq!(archives.security, "http://mirror.example/debian-security");

        let list = "# comment\ndeb [arch=amd64 signed-by=/k.gpg] http://m.example/debian trixie main\n\
                    deb http://s.example/debian-security trixie-security main\n\
                    deb-src http://m.example/debian trixie main\n";
        let archives = HostArchives::from_entries(&parse_one_line(list)).unwrap();
        assert_eq!(archives.main, "http://m.example/debian");
        assert_eq!(archives.security, "http://s.example/debian-security");
        let sources = archives.sources_list();
        assert!(sources.contains("http://m.example/debian bullseye main"));
        assert!(sources.contains("http://s.example/debian-security trixie-security main"));
    }

    /// Each guest test names a test file, and trimming a line for time never drops a test
    /// from the matrix: the newest line of each architecture runs every test its older
    /// lines run.
    #[test]
    fn guest_tests_exist_and_the_newest_line_runs_them_all() {
        let tests = Path::new(env!("CARGO_MANIFEST_DIR")).join("../integration-test/tests");
        for line in KERNELS {
            for (name, _) in line.tests() {
                assert!(
                    tests.join(format!("{name}.rs")).is_file(),
                    "{}: no test file {name}.rs",
                    line.name
                );
            }
        }
        for arch in Arch::ALL {
            let lines: Vec<&KernelLine> = KERNELS.iter().filter(|l| l.arch == arch).collect();
            let newest = lines.last().expect("a line for every architecture");
            for line in &lines {
                for test in line.tests() {
                    assert!(
                        newest.tests().any(|t| t == test),
                        "{} runs {test:?}, {} does not",
                        line.name,
                        newest.name
                    );
                }
            }
        }
    }

    #[test]
    fn newest_kernel_compares_numbers() {
        let mut names = [
            "linux-image-5.10.0-9-amd64-unsigned",
            "linux-image-5.10.0-46-amd64-unsigned",
            "linux-image-5.10.0-32-amd64-unsigned",
        ];
        names.sort_by_key(|n| numbers(n));
        assert_eq!(names[2], "linux-image-5.10.0-46-amd64-unsigned");
        assert!(
            numbers("linux-image-6.12.115+deb13.1-amd64-unsigned")
                > numbers("linux-image-6.12.115+deb13-amd64-unsigned")
        );
    }

    #[test]
    fn failures_name_the_test_and_its_panic() {
        let output = "running 2 tests\ntest a ... ok\ntest b ... FAILED\n\nfailures:\n\n\
                      ---- b stdout ----\n\nthread 'b' (7) panicked at tests/x.rs:1:2:\n\
                      timed out; events: [\n    Object {\n        \"kind\": 1,\n\n\
                      failures:\n    b\n\ntest result: FAILED. 1 passed; 1 failed\n";
        assert_eq!(
            cargo_test_failures(output),
            ["b: timed out; events: [ Object { \"kind\": 1,"]
        );
        assert_eq!(cargo_test_failures("error: no\n"), ["error: no"]);
    }

    #[test]
    fn guest_script_quotes_words() {
        let script = guest_script(
            Path::new("/w s"),
            &[("CONNWATCH_BIN", OsStr::new("/a b/connwatch"))],
            &["echo".into(), "it's".into()],
            Path::new("/out"),
            Path::new("/status"),
        );
        assert!(script.contains("export CONNWATCH_BIN='/a b/connwatch'"));
        assert!(script.contains(r"'echo' 'it'\''s'"));
        assert!(script.contains("echo $? > '/status'"));
        assert!(script.contains("cd '/w s'\n"));
    }
}
