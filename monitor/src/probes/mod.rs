//! Load and attach: checks what this host offers, resolves kernel layouts, loads the eBPF
//! object with them and attaches one program per hook.
pub mod btf;
pub mod filter;
pub mod klog;
pub mod tracefs;

use std::{
    os::fd::AsFd as _,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfError, EbpfLoader,
    maps::{HashMap as BpfHashMap, MapData, MapError, PerCpuArray, RingBuf},
    programs::{BtfTracePoint, FEntry, FExit, KProbe, ProgramError, TracePoint},
};
use monitor_common::{ConnectKey, KernelLayout, Settings, TpLayout, tcp_state};

/// Why the probes could not be loaded, attached or read. aya's errors are all
/// `std::error::Error + Send + Sync + 'static`, so each is kept as the source (boxed: some
/// are hundreds of bytes, and every `Result` here would carry that size).
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error(
        "missing capability {0} (needed to load eBPF programs and attach tracepoints): run \
         connwatch as root, or grant them with `setcap cap_bpf,cap_perfmon,cap_sys_ptrace,\
         cap_dac_read_search+ep <path to connwatch>`"
    )]
    MissingCapabilities(String),
    #[error("reading connwatch's capabilities from /proc/self/status (is /proc mounted?)")]
    Status(#[source] std::io::Error),
    #[error("/proc/self/status has no CapEff line (is /proc a Linux procfs?)")]
    NoCapEff,
    #[error("parsing CapEff in /proc/self/status")]
    CapEff(#[source] std::num::ParseIntError),
    #[error(transparent)]
    Tracefs(#[from] tracefs::TracefsError),
    #[error(transparent)]
    TracepointFormat(#[from] tracefs::FormatError),
    #[error(
        "sock:sock_send_length and sock:sock_recv_length differ in layout: this kernel is \
         not supported; run with --no-used-after"
    )]
    SendRecvLayouts,
    #[error(transparent)]
    Btf(#[from] btf::BtfError),
    #[error("parsing {path} for the BTF-typed programs: pass --btf with this kernel's vmlinux BTF")]
    TypedBtf {
        path: PathBuf,
        #[source]
        source: Box<aya::BtfError>,
    },
    #[error("loading the eBPF object into the kernel")]
    Load(#[source] Box<EbpfError>),
    #[error(
        "loading the eBPF object into the kernel: the memlock limit is too low and connwatch \
         could not raise it (Linux before 5.11 charges BPF maps to RLIMIT_MEMLOCK): grant \
         CAP_SYS_RESOURCE, or raise the limit (`ulimit -l unlimited`, LimitMEMLOCK=infinity)"
    )]
    LoadMemlock(#[source] Box<EbpfError>),
    #[error(transparent)]
    Filter(#[from] filter::LoadError),
    #[error("the eBPF object has no program {0}: this connwatch was built wrongly; rebuild it")]
    NoProgram(String),
    #[error("the eBPF object's program {program} is not of the type connwatch expects: rebuild")]
    ProgramType {
        program: String,
        #[source]
        source: Box<ProgramError>,
    },
    #[error("the eBPF object has no {0} map: this connwatch was built wrongly; rebuild it")]
    NoMap(&'static str),
    #[error("the eBPF object's {map} map is not of the type connwatch expects: rebuild")]
    MapType {
        map: &'static str,
        #[source]
        source: Box<MapError>,
    },
    #[error("reading the {map} map")]
    ReadMap {
        map: &'static str,
        #[source]
        source: Box<MapError>,
    },
    #[error("the kernel verifier rejected the program for {0}")]
    Verifier(String, #[source] Box<ProgramError>),
    #[error("attaching {what}{}", hint.as_deref().map(|hint| format!(": {hint}")).unwrap_or_default())]
    Attach {
        what: String,
        /// What to change on this host, where it is known.
        hint: Option<String>,
        #[source]
        source: Box<ProgramError>,
    },
    #[error("detaching {0}")]
    Detach(String, #[source] Box<ProgramError>),
    #[error(
        "tcp_recvmsg has {0:?} arguments in this kernel's BTF, not 5 or 6: fexit cannot serve \
         used_after_*"
    )]
    RecvmsgArity(Option<usize>),
    #[error("duplicating the {0} map descriptor")]
    DuplicateFd(&'static str, #[source] std::io::Error),
}

type Result<T, E = ProbeError> = std::result::Result<T, E>;

/// `err` and its causes, `: `-separated, as anyhow's `{:#}` shows them: for the messages
/// that keep an error as text (a warning, a degraded capability).
pub fn with_causes(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut cause = err.source();
    while let Some(next) = cause {
        text.push_str(": ");
        text.push_str(&next.to_string());
        cause = next.source();
    }
    text
}

/// The object built from `monitor-ebpf` by build.rs.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/monitor"));

/// Where and how to load; the flags shared by every command that attaches probes.
#[derive(Debug, Clone, clap::Args)]
pub struct ProbeOptions {
    /// Kernel BTF used to resolve struct offsets (the running kernel's by default).
    #[arg(long, env = "CONNWATCH_BTF", value_name = "PATH", default_value = btf::DEFAULT_BTF)]
    pub btf: PathBuf,
    /// tracefs mount to read tracepoint formats from (found or mounted when not given).
    #[arg(long, env = "CONNWATCH_TRACEFS", value_name = "PATH")]
    pub tracefs: Option<PathBuf>,
    /// Do not hook every send/recv (no used_after_reset / used_after_close): for nodes
    /// where that per-call cost matters more (see BENCHMARKS.md).
    #[arg(long, env = "CONNWATCH_NO_USED_AFTER")]
    pub no_used_after: bool,
    /// Use classic tracepoints even where the kernel takes typed raw tracepoints (tp_btf),
    /// which cost less per hit: for a kernel whose tp_btf misbehaves, or to compare.
    #[arg(long, env = "CONNWATCH_CLASSIC_TRACEPOINTS")]
    pub classic_tracepoints: bool,
    /// Do not use BPF trampolines (fexit) where the send/recv tracepoints are missing
    /// (before Linux 6.3): a kprobe and kretprobe on tcp_sendmsg/tcp_recvmsg serve instead,
    /// as where the kernel has no trampolines. For kernels whose trampolines misbehave, or to
    /// compare.
    #[arg(long, env = "CONNWATCH_NO_TRAMPOLINES")]
    pub no_trampolines: bool,
    /// Ring buffer size in bytes: a power of two, at least one page.
    #[arg(long, value_name = "BYTES", default_value_t = 4 << 20, value_parser = parse_ring_size)]
    pub ring_buffer_size: u32,
}

/// The largest ring buffer accepted: it is kernel memory pinned for connwatch's life and
/// mapped into it, and 4 MiB already holds about 20,000 events per 5 ms drain.
pub const MAX_RING_BUFFER_BYTES: u32 = 256 << 20;

fn parse_ring_size(text: &str) -> Result<u32, String> {
    let bytes: u32 = text
        .parse()
        .map_err(|_| format!("`{text}` is not a byte count (e.g. 4194304)"))?;
    if bytes < 4096 || !bytes.is_power_of_two() {
        return Err(format!(
            "{bytes} is not a power of two of at least 4096 (the kernel requires it); try {}",
            bytes.max(4096).next_power_of_two()
        ));
    }
    if bytes > MAX_RING_BUFFER_BYTES {
        return Err(format!(
            "{bytes} is above the limit of {MAX_RING_BUFFER_BYTES} (256 MiB): the ring is \
             kernel memory pinned for connwatch's life; raise it in steps from the default \
             4 MiB while `events_lost` rises"
        ));
    }
    Ok(bytes)
}

/// A hook and, when connwatch can run without it, what is lost.
pub struct Tracepoint {
    pub program: &'static str,
    pub category: &'static str,
    pub name: &'static str,
    /// `None`: required. `Some(loss)`: optional; `loss` says what goes missing without it.
    pub optional: Option<&'static str>,
    /// It also has a typed raw tracepoint program, `<program>_btf`, tried first.
    pub typed: bool,
}

const ACCEPT_LOSS: &str = "kernel without CONFIG_FTRACE_SYSCALLS?): accepted sockets are \
    attributed through /proc instead, which misses sockets closed before connwatch looks";
const IO_LOSS: &str = "added in Linux 6.3): fexit on tcp_sendmsg/tcp_recvmsg serves instead \
    where the kernel allows it, else a kprobe and kretprobe on each";

pub const TRACEPOINTS: &[Tracepoint] = &[
    Tracepoint {
        program: "inet_sock_set_state",
        category: "sock",
        name: "inet_sock_set_state",
        optional: None,
        typed: true,
    },
    Tracepoint {
        program: "tcp_receive_reset",
        category: "tcp",
        name: "tcp_receive_reset",
        optional: None,
        typed: true,
    },
    Tracepoint {
        program: "tcp_send_reset",
        category: "tcp",
        name: "tcp_send_reset",
        optional: None,
        typed: false,
    },
    Tracepoint {
        program: "tcp_destroy_sock",
        category: "tcp",
        name: "tcp_destroy_sock",
        optional: None,
        typed: false,
    },
    Tracepoint {
        program: "sys_exit_accept4",
        category: "syscalls",
        name: "sys_exit_accept4",
        optional: Some(ACCEPT_LOSS),
        typed: false,
    },
    Tracepoint {
        program: "sys_exit_accept",
        category: "syscalls",
        name: "sys_exit_accept",
        optional: Some(ACCEPT_LOSS),
        typed: false,
    },
    Tracepoint {
        program: "sock_send_length",
        category: "sock",
        name: "sock_send_length",
        optional: Some(IO_LOSS),
        typed: true,
    },
    Tracepoint {
        program: "sock_recv_length",
        category: "sock",
        name: "sock_recv_length",
        optional: Some(IO_LOSS),
        typed: true,
    },
];

impl Tracepoint {
    /// The per-send/recv tracepoints behind `used_after_*`.
    pub fn is_io(&self) -> bool {
        self.category == "sock" && self.name.ends_with("_length")
    }
}

/// One thing connwatch reports, and what serves it on this kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capability {
    pub name: &'static str,
    /// The kernel hook (or data) behind it, e.g. `fexit tcp_sendmsg, tcp_recvmsg`.
    pub served_by: String,
    /// Why it is degraded or missing on this kernel; `None` when fully served.
    pub degraded: Option<String>,
}

impl Capability {
    fn full(name: &'static str, served_by: impl Into<String>) -> Capability {
        Capability {
            name,
            served_by: served_by.into(),
            degraded: None,
        }
    }
}

/// `uname -r`, for messages that say which kernel they are about.
pub fn kernel_release() -> String {
    nix::sys::utsname::uname().map_or_else(
        |_| "this kernel".into(),
        |uts| format!("Linux {}", uts.release().to_string_lossy()),
    )
}

/// The capabilities a kernel's hooks give: the start-up line and `doctor` show them.
pub fn describe(capabilities: &[Capability]) -> String {
    capabilities
        .iter()
        .map(|c| match &c.degraded {
            None => format!("{} ← {}", c.name, c.served_by),
            Some(why) => format!("{} ← {} (degraded: {why})", c.name, c.served_by),
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// Counters the kernel programs keep in per-CPU maps, read when asked (at scrape time),
/// so that counting costs no event and no userspace work per occurrence.
pub struct KernelCounters {
    transitions: PerCpuArray<MapData, u64>,
}

impl std::fmt::Debug for KernelCounters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KernelCounters").finish_non_exhaustive()
    }
}

impl KernelCounters {
    /// TCP state changes since load, summed over CPUs: `(old, new, count)`, counted ones
    /// only, in state order.
    pub fn transitions(&self) -> Result<Vec<(u8, u8, u64)>> {
        let mut counted = Vec::new();
        for old in 1..=tcp_state::NEW_SYN_RECV {
            for new in 1..=tcp_state::NEW_SYN_RECV {
                let per_cpu = self
                    .transitions
                    .get(&tcp_state::index(old, new), 0)
                    .map_err(|source| ProbeError::ReadMap {
                        map: "TRANSITIONS",
                        source: Box::new(source),
                    })?;
                let count: u64 = per_cpu.iter().sum();
                if count > 0 {
                    counted.push((old, new, count));
                }
            }
        }
        Ok(counted)
    }
}

/// The kernel's connect counters (`CONNECTS`): connects per process and endpoint since
/// each entry was made, read at each refresh for the pools' connect rates.
pub struct ConnectCounts {
    map: BpfHashMap<MapData, ConnectKey, u64>,
}

impl std::fmt::Debug for ConnectCounts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectCounts").finish_non_exhaustive()
    }
}

impl ConnectCounts {
    /// Every entry and its count. Bounded by the map's size; an entry the kernel evicts
    /// while this walks is skipped.
    pub fn totals(&self) -> Vec<(ConnectKey, u64)> {
        self.map.iter().filter_map(Result::ok).collect()
    }
}

/// Attached programs and the loss counter. Dropping it detaches everything.
pub struct Probes {
    /// The programs stay attached while it lives.
    ebpf: Ebpf,
    lost: PerCpuArray<MapData, u64>,
    filtered: PerCpuArray<MapData, u64>,
    counters: Option<KernelCounters>,
    connects: Option<ConnectCounts>,
    /// The socket-storage map of each socket's last send/recv (`IoMark`), where the hooks
    /// keep it; sock_diag dumps read it.
    io_marks: Option<std::os::fd::OwnedFd>,
    pub layout: KernelLayout,
    pub warnings: Vec<String>,
    /// `enum sk_rst_reason` of this kernel: value → name (empty before Linux 6.10).
    pub rst_reasons: std::collections::HashMap<u32, String>,
    /// What serves each capability on this kernel.
    pub capabilities: Vec<Capability>,
    /// Forwards the kernel programs' diagnostics while it lives (`--log-level debug`).
    _kernel_log: Option<klog::KernelLog>,
}

impl Probes {
    /// Returns the probes and, separately, the ring buffer they feed, so the event loop can
    /// own the ring buffer while the probes stay attached.
    /// `max_sockets` sizes the per-socket kernel maps (LRU: the oldest entries go first).
    /// `kernel_log` is the level of the kernel programs' diagnostics ([`klog`]), `None` for
    /// off. A kernel that refuses the programs with them on gets them without: connwatch
    /// runs, and says so (a warning, a degraded capability).
    pub fn attach(
        options: &ProbeOptions,
        settings: &Settings,
        filter: &filter::KernelFilter,
        max_sockets: u32,
        kernel_log: Option<log::Level>,
    ) -> Result<(Probes, RingBuf<MapData>)> {
        let Some(level) = kernel_log else {
            return Probes::attach_with(options, settings, filter, max_sockets, None);
        };
        match Probes::attach_with(options, settings, filter, max_sockets, Some(level)) {
            Ok(attached) => Ok(attached),
            Err(err) => {
                // Refused without them too: the cause is elsewhere, and this error says it.
                let (mut probes, events) =
                    Probes::attach_with(options, settings, filter, max_sockets, None)?;
                let why = format!(
                    "the kernel refused the programs with their diagnostics on ({}); \
                     running without them",
                    with_causes(&err)
                );
                probes
                    .warnings
                    .push(format!("kernel diagnostics are off: {why}"));
                probes.capabilities.push(kernel_log_capability(Err(why)));
                Ok((probes, events))
            }
        }
    }

    fn attach_with(
        options: &ProbeOptions,
        settings: &Settings,
        filter: &filter::KernelFilter,
        max_sockets: u32,
        kernel_log: Option<log::Level>,
    ) -> Result<(Probes, RingBuf<MapData>)> {
        check_privileges(read_effective_caps()?)?;
        let tracefs = tracefs::locate(options.tracefs.as_deref())?;
        // Parsed vmlinux BTF is tens of MiB; drop it before aya parses its own copy, so the
        // two never add up in the daemon's peak memory.
        let hz = btf::kernel_hz()?;
        let (layout, rst_reasons, recvmsg_args, storage_for_tracing) = {
            let kernel_btf = btf::KernelBtf::open(&options.btf)?;
            let layout = kernel_btf.kernel_layout(hz)?;
            (
                layout,
                kernel_btf.enum_names("sk_rst_reason"),
                kernel_btf.function_arity("tcp_recvmsg"),
                // Linux 5.11 added it with socket storage for tracing programs.
                kernel_btf
                    .function_arity("bpf_sk_storage_get_tracing")
                    .is_some(),
            )
        };
        let settings = &Settings {
            io_marks: u64::from(storage_for_tracing),
            filters: filter.bits(),
            ..*settings
        };
        let layouts = TracepointLayouts::read(&tracefs)?;

        let mut ebpf = load(
            options,
            &layout,
            settings,
            &layouts,
            max_sockets,
            kernel_log,
        )?;
        filter.load_into(&mut ebpf)?;

        let mut warnings = Vec::new();
        let mut typed_btf = TypedBtf::new(&options.btf);
        let Hooks {
            io_tracepoints,
            io_typed,
            state_typed,
            reset_typed,
        } = attach_hooks(&mut ebpf, options, &tracefs, &mut typed_btf, &mut warnings)?;
        let state_changes = match state_typed {
            Ok(()) => "tp_btf sock:inet_sock_set_state".to_string(),
            // Served all the same, with the record the kernel builds for every change.
            Err(why) => format!("tracepoint sock:inet_sock_set_state (tp_btf not used: {why})"),
        };
        let (io, stalls) = io_capabilities(
            options,
            (io_tracepoints, io_typed),
            storage_for_tracing,
            hz,
            |hooks| match hooks {
                CallHooks::Fexit => attach_io_fexit(&mut ebpf, &mut typed_btf, recvmsg_args),
                CallHooks::Kprobes => attach_io_kprobes(&mut ebpf),
            },
            &mut warnings,
        );
        let (resets, causes) =
            reset_capabilities(reset_typed, !rst_reasons.is_empty(), &layouts.send_reset);
        let stalls_served = stalls.degraded.is_none();
        let mut capabilities = vec![
            Capability::full("state changes", state_changes),
            resets,
            causes,
            io,
            stalls,
        ];
        let kernel_log =
            kernel_log.and_then(|_| start_kernel_log(&mut ebpf, &mut capabilities, &mut warnings));

        let events = take_map(&mut ebpf, "EVENTS", RingBuf::try_from)?;
        let lost = take_map(&mut ebpf, "LOST", PerCpuArray::try_from)?;
        let filtered = take_map(&mut ebpf, "FILTERED", PerCpuArray::try_from)?;
        let transitions = take_map(&mut ebpf, "TRANSITIONS", PerCpuArray::try_from)?;
        let connects = take_map(&mut ebpf, "CONNECTS", BpfHashMap::try_from)?;
        let io_marks = take_io_marks(&mut ebpf, stalls_served)?;
        let probes = Probes {
            io_marks,
            ebpf,
            lost,
            filtered,
            counters: Some(KernelCounters { transitions }),
            connects: Some(ConnectCounts { map: connects }),
            layout,
            warnings,
            rst_reasons,
            capabilities,
            _kernel_log: kernel_log,
        };
        drop(typed_btf);
        release_freed_memory();
        Ok((probes, events))
    }

    /// Instructions the verifier processed for each loaded program (Linux 5.16+ reports
    /// it; `None` before): how close each program is to the 1M limit on this kernel.
    pub fn verified_instructions(&self) -> Vec<(String, Option<u32>)> {
        self.ebpf
            .programs()
            .filter_map(|(name, program)| {
                let info = program.info().ok()?;
                Some((name.to_string(), info.verified_instruction_count()))
            })
            .collect()
    }

    /// Whether a kprobe can be attached here (informational: the used_after_* row says
    /// whether kprobes serve it).
    pub fn try_kprobe(&mut self) -> Result<()> {
        let program: &mut KProbe = program_mut(&mut self.ebpf, "doctor_kprobe")?;
        program
            .load()
            .map_err(|err| ProbeError::Verifier("kprobe tcp_close".into(), Box::new(err)))?;
        let link = program
            .attach("tcp_close", 0)
            .map_err(|source| attach_error("kprobe to tcp_close", source))?;
        program
            .detach(link)
            .map_err(|err| ProbeError::Detach("kprobe tcp_close".into(), Box::new(err)))
    }

    /// Whether BPF trampolines (fentry/fexit) work here (informational, likewise).
    pub fn try_fentry(&mut self) -> Result<()> {
        let btf = aya::Btf::from_sys_fs().map_err(|source| ProbeError::TypedBtf {
            path: btf::DEFAULT_BTF.into(),
            source: Box::new(source),
        })?;
        let program: &mut FEntry = program_mut(&mut self.ebpf, "doctor_fentry")?;
        program
            .load("tcp_close", &btf)
            .map_err(|err| ProbeError::Verifier("fentry tcp_close".into(), Box::new(err)))?;
        let link = program
            .attach()
            .map_err(|source| attach_error("fentry to tcp_close", source))?;
        program
            .detach(link)
            .map_err(|err| ProbeError::Detach("fentry tcp_close".into(), Box::new(err)))
    }

    /// The kernel-side counters, handed once to whoever serves them (the metrics).
    pub fn take_counters(&mut self) -> Option<KernelCounters> {
        self.counters.take()
    }

    /// The descriptor of the socket-storage map of each socket's last send/recv, handed
    /// once to the sock_diag reader; `None` where the hooks do not keep it.
    pub fn take_io_marks(&mut self) -> Option<std::os::fd::OwnedFd> {
        self.io_marks.take()
    }

    /// The connect counters, handed once to whoever reads them (the refresher).
    pub fn take_connects(&mut self) -> Option<ConnectCounts> {
        self.connects.take()
    }

    /// Events the kernel could not put in the ring buffer since load (all CPUs).
    pub fn lost_events(&self) -> Result<u64> {
        let per_cpu = self.lost.get(&0, 0).map_err(|source| ProbeError::ReadMap {
            map: "LOST",
            source: Box::new(source),
        })?;
        Ok(per_cpu.iter().sum())
    }

    /// Events the kernel filter kept out of the ring buffer since load (all CPUs).
    pub fn filtered_events(&self) -> Result<u64> {
        let per_cpu = self
            .filtered
            .get(&0, 0)
            .map_err(|source| ProbeError::ReadMap {
                map: "FILTERED",
                source: Box::new(source),
            })?;
        Ok(per_cpu.iter().sum())
    }
}

/// Loads the eBPF object with this kernel's layouts and the settings frozen in.
fn load(
    options: &ProbeOptions,
    layout: &KernelLayout,
    settings: &Settings,
    layouts: &TracepointLayouts,
    max_sockets: u32,
    kernel_log: Option<log::Level>,
) -> Result<Ebpf> {
    let memlock_raised = raise_memlock_rlimit();
    let mut loader = EbpfLoader::new();
    loader
        .override_global("KERNEL", layout, true)
        .override_global("SETTINGS", settings, true)
        .override_global("TP_SET_STATE", &layouts.set_state, true)
        .override_global("TP_RECEIVE_RESET", &layouts.receive_reset, true)
        .override_global("TP_SEND_RESET", &layouts.send_reset, true)
        .override_global("TP_DESTROY_SOCK", &layouts.destroy_sock, true)
        .override_global("TP_SYS_EXIT", &layouts.sys_exit, true)
        .override_global("TP_SOCK_LENGTH", &layouts.sock_length, true)
        .map_max_entries("EVENTS", options.ring_buffer_size)
        .map_max_entries("OWNERS", max_sockets)
        .map_max_entries("PEER_ENDED", max_sockets);
    klog::configure(&mut loader, kernel_log);
    let ebpf = loader.load(EBPF_OBJECT).map_err(|err| {
        if memlock_raised {
            ProbeError::Load(Box::new(err))
        } else {
            // Kernels before 5.11 charge maps to RLIMIT_MEMLOCK: the cause, not the map.
            ProbeError::LoadMemlock(Box::new(err))
        }
    })?;
    // The loader holds its own parse of the kernel BTF: free it before BTF-typed
    // programs need one (`TypedBtf`), so that two never coexist.
    drop(loader);
    Ok(ebpf)
}

/// How the tracepoints were attached: typed (tp_btf) or why not, per group.
struct Hooks {
    /// The send/recv tracepoints exist (Linux 6.3+).
    io_tracepoints: bool,
    io_typed: Result<(), String>,
    state_typed: Result<(), String>,
    reset_typed: Result<(), String>,
}

/// Attaches every tracepoint this kernel has, typed where it takes them; a missing
/// optional one is a warning.
fn attach_hooks(
    ebpf: &mut Ebpf,
    options: &ProbeOptions,
    tracefs: &Path,
    typed_btf: &mut TypedBtf<'_>,
    warnings: &mut Vec<String>,
) -> Result<Hooks> {
    let mut io_tracepoints = true;
    // Typed raw tracepoints for the per-send/recv hooks, where the kernel takes them:
    // their arguments come from the context, with no record to copy.
    let mut io_typed: Result<(), String> = Ok(());
    let mut state_typed: Result<(), String> = Ok(());
    let mut reset_typed: Result<(), String> = Ok(());
    for hook in TRACEPOINTS {
        if options.no_used_after && hook.is_io() {
            // Opted out: these fire on every send/recv on the host.
            continue;
        }
        let present = tracefs
            .join("events")
            .join(hook.category)
            .join(hook.name)
            .is_dir();
        if let (false, Some(loss)) = (present, hook.optional) {
            if hook.is_io() {
                io_tracepoints = false;
            } else {
                warnings.push(format!(
                    "tracepoint {}:{} is missing ({loss}",
                    hook.category, hook.name
                ));
            }
            continue;
        }
        // One refusal of the send/recv pair serves both with classic tracepoints.
        let typed = if hook.is_io() {
            &mut io_typed
        } else if hook.name == "tcp_receive_reset" {
            &mut reset_typed
        } else {
            &mut state_typed
        };
        if options.classic_tracepoints {
            *typed = Err("--classic-tracepoints".into());
        }
        if hook.typed && typed.is_ok() {
            match attach_btf_tracepoint(ebpf, hook, typed_btf) {
                Ok(()) => continue,
                Err(err) => *typed = Err(format!("refused: {}", with_causes(&err))),
            }
        }
        attach_tracepoint(ebpf, hook)?;
    }
    Ok(Hooks {
        io_tracepoints,
        io_typed,
        state_typed,
        reset_typed,
    })
}

/// What serves `used_after_*` where the send/recv tracepoints are missing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CallHooks {
    /// fexit on `tcp_sendmsg` / `tcp_recvmsg`: BPF trampolines, typed arguments.
    Fexit,
    /// A kprobe and a kretprobe on each: where the kernel has no trampolines (arm64 before
    /// 6.5), or `--no-trampolines`.
    Kprobes,
}

/// The rows of `used_after_*` and `request_stalled`: what serves them, given how the
/// send/recv tracepoints were attached (`io`: whether they exist, and typed or why not).
/// Where they do not exist, `attach` tries fexit in their place, then kprobes.
fn io_capabilities(
    options: &ProbeOptions,
    (io_tracepoints, io_typed): (bool, Result<(), String>),
    storage_for_tracing: bool,
    hz: u32,
    mut attach: impl FnMut(CallHooks) -> Result<()>,
    warnings: &mut Vec<String>,
) -> (Capability, Capability) {
    // What orders a request against its answer: the send/recv hooks' socket storage,
    // where they run typed and the kernel allows it; else tcp_info's jiffy stamps.
    let mut io_marking: Result<&str, String> = if !storage_for_tracing {
        Err("socket storage for tracing programs needs Linux 5.11".into())
    } else if options.no_used_after {
        Err("--no-used-after turned the send/recv hooks off".into())
    } else if !io_tracepoints {
        Ok("fexit tcp_sendmsg, tcp_recvmsg")
    } else {
        match &io_typed {
            Ok(()) => Ok("tp_btf sock:sock_send_length, sock:sock_recv_length"),
            Err(why) => Err(format!(
                "the send/recv hooks are classic tracepoints ({why}), which cannot \
                 reach socket storage"
            )),
        }
    };
    let io = if options.no_used_after {
        Capability {
            name: "used_after_*",
            served_by: "nothing".into(),
            degraded: Some("turned off by --no-used-after".into()),
        }
    } else if io_tracepoints {
        let hooks = "sock:sock_send_length, sock:sock_recv_length";
        match io_typed {
            Ok(()) => Capability::full("used_after_*", format!("tp_btf {hooks}")),
            // Served all the same, at the classic tracepoints' cost per call.
            Err(why) => Capability::full(
                "used_after_*",
                format!("tracepoints {hooks} (tp_btf not used: {why})"),
            ),
        }
    } else {
        let fexit = if options.no_trampolines {
            Err("--no-trampolines".to_string())
        } else {
            attach(CallHooks::Fexit).map_err(|err| format!("refused: {}", with_causes(&err)))
        };
        match fexit {
            Ok(()) => Capability::full("used_after_*", "fexit tcp_sendmsg, tcp_recvmsg"),
            Err(fexit_why) => match attach(CallHooks::Kprobes) {
                Ok(()) => {
                    if !options.no_trampolines {
                        warnings.push(format!(
                            "fexit on tcp_sendmsg/tcp_recvmsg was {fexit_why}; a kprobe and \
                             kretprobe on each serve used_after_* instead"
                        ));
                    }
                    if io_marking.is_ok() {
                        io_marking = Err("the send/recv hooks are kprobes, which cannot \
                                          reach socket storage"
                            .into());
                    }
                    Capability {
                        name: "used_after_*",
                        served_by: format!(
                            "kprobe+kretprobe tcp_sendmsg, tcp_recvmsg (fexit not used: \
                             {fexit_why})"
                        ),
                        degraded: Some(kretprobe_limit(possible_cpus())),
                    }
                }
                Err(err) => {
                    let why = format!(
                        "sock:sock_send_length needs Linux 6.3, fexit on tcp_sendmsg was \
                         {fexit_why}, and kprobes failed: {}",
                        with_causes(&err)
                    );
                    warnings.push(format!("used_after_reset/close are not reported: {why}"));
                    io_marking = Err(why.clone());
                    Capability {
                        name: "used_after_*",
                        served_by: "nothing".into(),
                        degraded: Some(why),
                    }
                }
            },
        }
    };
    let stalls = match io_marking {
        Ok(hooks) => Capability::full(
            "request_stalled",
            format!("each socket's last send/recv, in socket storage ({hooks})"),
        ),
        Err(why) => Capability {
            name: "request_stalled",
            served_by: "tcp_info's last send/receive stamps".into(),
            degraded: Some(format!(
                "{why}; tcp_info's stamps tick every {} ms, so a request sent in the \
                 same tick as the previous answer (a BEGIN's answer, then the \
                 statement) is not seen as outstanding",
                1000 / hz.max(1)
            )),
        },
    };
    (io, stalls)
}

/// A duplicate of the `IO_MARKS` map's descriptor, for the sock_diag thread; only worth
/// keeping (`wanted`) where the hooks write it.
fn take_io_marks(ebpf: &mut Ebpf, wanted: bool) -> Result<Option<std::os::fd::OwnedFd>> {
    match (wanted, ebpf.take_map("IO_MARKS")) {
        (true, Some(aya::maps::Map::SkStorage(map))) => map
            .fd()
            .as_fd()
            .try_clone_to_owned()
            .map(Some)
            .map_err(|err| ProbeError::DuplicateFd("IO_MARKS", err)),
        (true, _) => Err(ProbeError::NoMap("IO_MARKS socket-storage")),
        _ => Ok(None),
    }
}

/// Starts forwarding the kernel programs' diagnostics, and says in `capabilities` whether
/// it did (and in `warnings` why not).
fn start_kernel_log(
    ebpf: &mut Ebpf,
    capabilities: &mut Vec<Capability>,
    warnings: &mut Vec<String>,
) -> Option<klog::KernelLog> {
    match klog::KernelLog::start(ebpf) {
        Ok(kernel_log) => {
            capabilities.push(kernel_log_capability(Ok(())));
            Some(kernel_log)
        }
        Err(err) => {
            let why = with_causes(&err);
            warnings.push(format!("kernel diagnostics are off: {why}"));
            capabilities.push(kernel_log_capability(Err(why)));
            None
        }
    }
}

/// The rows of resets and their causes: what serves them, and what older kernels miss.
fn reset_capabilities(
    reset_typed: Result<(), String>,
    has_reasons: bool,
    send_reset: &TpLayout,
) -> (Capability, Capability) {
    let causes = if has_reasons {
        Capability::full("reset causes", "the kernel's sk_rst_reason")
    } else {
        Capability {
            name: "reset causes",
            served_by: "the socket's state, error and linger flag".into(),
            degraded: Some(
                "tcp:tcp_send_reset reports no reason before Linux 6.10: `ss -K` and \
                 timer aborts (keepalive, FIN_WAIT2 linger, memory) can show as \
                 live_abort"
                    .into(),
            ),
        }
    };
    let resets = match reset_typed {
        Ok(()) => "tp_btf tcp:tcp_receive_reset, tracepoint tcp:tcp_send_reset".to_string(),
        Err(why) => format!(
            "tracepoints tcp:tcp_receive_reset (tp_btf not used: {why}), tcp:tcp_send_reset"
        ),
    };
    let resets = if send_reset.saddr_sockaddr == monitor_common::ABSENT {
        // Linux 6.10 made tcp_send_reset fire without a full socket, reading the
        // addresses from the segment (hence its sockaddr fields).
        Capability {
            name: "resets",
            served_by: resets,
            degraded: Some(
                "before Linux 6.10 tcp_send_reset does not fire for RSTs sent with no \
                 socket (a closed port, a stray segment) or from TIME_WAIT"
                    .into(),
            ),
        }
    } else {
        Capability::full("resets", resets)
    };
    (resets, causes)
}

/// The kernel diagnostics' row, where they were asked for (`--log-level debug`, doctor).
fn kernel_log_capability(started: Result<(), String>) -> Capability {
    let name = "kernel diagnostics";
    match started {
        Ok(()) => Capability::full(name, "aya-log, as `kernel:` lines at debug level"),
        Err(why) => Capability {
            name,
            served_by: "nothing".into(),
            degraded: Some(why),
        },
    }
}

/// `used_after_*` where the send/recv tracepoints are missing (before Linux 6.3): fexit on
/// the TCP send and receive functions, whose return value is the call's result.
fn attach_io_fexit(
    ebpf: &mut Ebpf,
    typed_btf: &mut TypedBtf<'_>,
    recvmsg_args: Option<usize>,
) -> Result<()> {
    let btf = typed_btf.get()?;
    // tcp_recvmsg lost its `nonblock` argument in Linux 5.19; the return value follows the
    // arguments, so each arity has its own program.
    let recv_program = match recvmsg_args {
        Some(5) => "tcp_recvmsg_exit5",
        Some(6) => "tcp_recvmsg_exit6",
        other => return Err(ProbeError::RecvmsgArity(other)),
    };
    let programs = [
        ("tcp_sendmsg_exit", "tcp_sendmsg"),
        (recv_program, "tcp_recvmsg"),
    ];
    let attached = programs.iter().try_for_each(|&(program, function)| {
        let program: &mut FExit = program_mut(ebpf, program)?;
        program
            .load(function, btf)
            .map_err(|err| ProbeError::Verifier(format!("fexit on {function}"), Box::new(err)))?;
        program
            .attach()
            .map_err(|source| attach_error(&format!("fexit to {function}"), source))?;
        Ok(())
    });
    if attached.is_err() {
        // Kprobes come next: a send hook left attached would see each send twice.
        for (program, _) in programs {
            if let Ok(program) = program_mut::<FExit>(ebpf, program) {
                // Not loaded, or already gone: nothing to undo.
                let _ = program.unload();
            }
        }
    }
    attached
}

/// What a kretprobe misses: the kernel arms it for at most `maxactive` calls of its function
/// at once, and a call beyond that (threads blocked in recv hold theirs) returns unseen,
/// counted only in the kretprobe's nmissed. Perf-attached kretprobes get the default, which
/// `cpus` (possible CPUs) gives; unknown when `None`. (Linux 6.2, commit 3b7ddab8a19a,
/// made max(10, 2 × CPUs) the default for every kernel, not only preemptible ones.)
fn kretprobe_limit(cpus: Option<u32>) -> String {
    let default = match cpus {
        Some(cpus) => format!("max(10, 2 × {cpus} CPUs) = {}", (2 * cpus).max(10)),
        None => "max(10, 2 × CPUs)".into(),
    };
    format!(
        "a kretprobe follows at most the kernel's maxactive calls of each function at once \
         ({default}; only the CPU count on kernels without CONFIG_PREEMPTION older than \
         Linux 6.2 and its stable backports): a send or recv beyond that, while as many \
         threads are blocked in one, returns unseen and goes unreported (the kernel counts \
         it as nmissed)"
    )
}

/// The kernel's possible CPUs (`/sys/devices/system/cpu/possible`, e.g. `0-7`), which
/// size kretprobes' instances.
fn possible_cpus() -> Option<u32> {
    parse_cpu_list(&std::fs::read_to_string("/sys/devices/system/cpu/possible").ok()?)
}

/// How many CPUs a kernel CPU list (`0-3,8,10-11`) names.
fn parse_cpu_list(cpus: &str) -> Option<u32> {
    cpus.trim().split(',').try_fold(0u32, |total, range| {
        let (low, high) = range.split_once('-').unwrap_or((range, range));
        let (low, high): (u32, u32) = (low.parse().ok()?, high.parse().ok()?);
        total.checked_add(high.checked_sub(low)?.checked_add(1)?)
    })
}

/// `used_after_*` where neither the send/recv tracepoints nor fexit serve (no BPF
/// trampolines: arm64 before 6.5; or `--no-trampolines`): a kprobe at each function's entry
/// keeps the socket per thread, a kretprobe at its return checks the result. Returns are
/// attached first, so that no entry is kept for a return that would go unseen. On failure
/// nothing stays attached: half the hooks would pass for served.
fn attach_io_kprobes(ebpf: &mut Ebpf) -> Result<()> {
    const PROGRAMS: [(&str, &str, &str); 4] = [
        ("tcp_sendmsg_return", "kretprobe", "tcp_sendmsg"),
        ("tcp_recvmsg_return", "kretprobe", "tcp_recvmsg"),
        ("tcp_sendmsg_entry", "kprobe", "tcp_sendmsg"),
        ("tcp_recvmsg_entry", "kprobe", "tcp_recvmsg"),
    ];
    let attached = PROGRAMS.iter().try_for_each(|&(program, kind, function)| {
        let program: &mut KProbe = program_mut(ebpf, program)?;
        program
            .load()
            .map_err(|err| ProbeError::Verifier(format!("{kind} on {function}"), Box::new(err)))?;
        program
            .attach(function, 0)
            .map_err(|source| attach_error(&format!("{kind} to {function}"), source))?;
        Ok(())
    });
    if attached.is_err() {
        for (program, _, _) in PROGRAMS {
            if let Ok(program) = program_mut::<KProbe>(ebpf, program) {
                // Not loaded, or already gone: nothing to undo.
                let _ = program.unload();
            }
        }
    }
    attached
}

/// Hands the heap freed after loading (the kernel BTF parses: tens of MiB in many small
/// allocations) back to the system. glibc keeps freed heap for reuse, and a daemon that
/// never needs it again would carry it in its RSS for life; musl's allocator returns it
/// by itself.
fn release_freed_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only releases free heap pages; it touches no live allocation.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// aya's parse of the kernel BTF, which BTF-typed programs (tp_btf, fexit) load against:
/// made once, on first need, and dropped with the loader's other start-up state.
struct TypedBtf<'a> {
    path: &'a Path,
    parsed: Option<aya::Btf>,
}

impl<'a> TypedBtf<'a> {
    fn new(path: &'a Path) -> TypedBtf<'a> {
        TypedBtf { path, parsed: None }
    }

    fn get(&mut self) -> Result<&aya::Btf> {
        let btf =
            match self.parsed.take() {
                Some(btf) => btf,
                None => aya::Btf::parse_file(self.path, aya::Endianness::default()).map_err(
                    |source| ProbeError::TypedBtf {
                        path: self.path.to_path_buf(),
                        source: Box::new(source),
                    },
                )?,
            };
        Ok(self.parsed.insert(btf))
    }
}

/// Attaches `hook`'s typed raw tracepoint (program `<program>_btf`): raw_tracepoint_open,
/// not perf_event_open, and the arguments straight from the context.
fn attach_btf_tracepoint(
    ebpf: &mut Ebpf,
    hook: &Tracepoint,
    typed_btf: &mut TypedBtf<'_>,
) -> Result<()> {
    let name = format!("{}_btf", hook.program);
    let btf = typed_btf.get()?;
    let program: &mut BtfTracePoint = program_mut(ebpf, &name)?;
    program
        .load(hook.name, btf)
        .map_err(|err| ProbeError::Verifier(format!("tp_btf {}", hook.name), Box::new(err)))?;
    program
        .attach()
        .map_err(|source| attach_error(&format!("tp_btf {}", hook.name), source))?;
    Ok(())
}

/// The program called `name`, as the type its hook takes.
fn program_mut<'a, P>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut P>
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or_else(|| ProbeError::NoProgram(name.to_string()))?
        .try_into()
        .map_err(|source| ProbeError::ProgramType {
            program: name.to_string(),
            source: Box::new(source),
        })
}

/// Takes the map called `name` out of the object, as the type `convert` makes of it.
fn take_map<M>(
    ebpf: &mut Ebpf,
    name: &'static str,
    convert: impl FnOnce(aya::maps::Map) -> Result<M, MapError>,
) -> Result<M> {
    let map = ebpf.take_map(name).ok_or(ProbeError::NoMap(name))?;
    convert(map).map_err(|source| ProbeError::MapType {
        map: name,
        source: Box::new(source),
    })
}

/// A refused attach, with no hint: the kernel's error says it.
fn attach_error(what: &str, source: ProgramError) -> ProbeError {
    ProbeError::Attach {
        what: what.to_string(),
        hint: None,
        source: Box::new(source),
    }
}

fn attach_tracepoint(ebpf: &mut Ebpf, hook: &Tracepoint) -> Result<()> {
    let tracepoint = format!("{}:{}", hook.category, hook.name);
    let program: &mut TracePoint = program_mut(ebpf, hook.program)?;
    program
        .load()
        .map_err(|err| ProbeError::Verifier(tracepoint.clone(), Box::new(err)))?;
    program
        .attach(hook.category, hook.name)
        .map_err(|source| ProbeError::Attach {
            what: format!("to tracepoint {tracepoint}"),
            hint: perf_paranoid_hint(),
            source: Box::new(source),
        })?;
    Ok(())
}

/// Debian and Ubuntu patch `kernel.perf_event_paranoid=3` (their default) to refuse
/// perf_event_open, which attaching a tracepoint uses, to all but CAP_SYS_ADMIN; CAP_PERFMON
/// is not enough there.
fn perf_paranoid_hint() -> Option<String> {
    let level: i32 = std::fs::read_to_string("/proc/sys/kernel/perf_event_paranoid")
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let has_admin = read_effective_caps().is_ok_and(|caps| caps & (1 << CAP_SYS_ADMIN) != 0);
    (level > 2 && !has_admin).then(|| {
        format!(
            "kernel.perf_event_paranoid is {level}, which (a Debian/Ubuntu patch) allows \
             tracepoints only with CAP_SYS_ADMIN: run connwatch as root or with \
             CAP_SYS_ADMIN, or set `sysctl kernel.perf_event_paranoid=2`"
        )
    })
}

/// Record layouts of every tracepoint we attach to, read from this kernel's tracefs.
pub struct TracepointLayouts {
    pub set_state: TpLayout,
    pub receive_reset: TpLayout,
    pub send_reset: TpLayout,
    pub destroy_sock: TpLayout,
    pub sys_exit: TpLayout,
    pub sock_length: TpLayout,
}

impl TracepointLayouts {
    pub fn read(tracefs: &Path) -> Result<TracepointLayouts> {
        let mut sys_exit = TpLayout::absent();
        // accept and accept4 share the generic syscall-exit record; either gives `ret`.
        for name in ["sys_exit_accept4", "sys_exit_accept"] {
            if let Ok(format) = tracefs::Format::read(tracefs, "syscalls", name) {
                sys_exit = format.exit_layout()?;
            }
        }
        let mut sock_length = TpLayout::absent();
        // send and recv share one record layout; check rather than assume.
        for name in ["sock_send_length", "sock_recv_length"] {
            if let Ok(format) = tracefs::Format::read(tracefs, "sock", name) {
                let layout = format.io_layout()?;
                if sock_length != TpLayout::absent() && sock_length != layout {
                    return Err(ProbeError::SendRecvLayouts);
                }
                sock_length = layout;
            }
        }
        let socket_layout = |category, name| {
            tracefs::socket_layout(tracefs, category, name).map_err(ProbeError::from)
        };
        Ok(TracepointLayouts {
            set_state: socket_layout("sock", "inet_sock_set_state")?,
            receive_reset: socket_layout("tcp", "tcp_receive_reset")?,
            send_reset: socket_layout("tcp", "tcp_send_reset")?,
            destroy_sock: socket_layout("tcp", "tcp_destroy_sock")?,
            sys_exit,
            sock_length,
        })
    }
}

const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

pub fn read_effective_caps() -> Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status").map_err(ProbeError::Status)?;
    let hex = status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))
        .ok_or(ProbeError::NoCapEff)?;
    u64::from_str_radix(hex.trim(), 16).map_err(ProbeError::CapEff)
}

const CAP_DAC_READ_SEARCH: u32 = 2;
const CAP_SYS_PTRACE: u32 = 19;

/// Whether connwatch may enter other network namespaces (setns takes CAP_SYS_ADMIN), to
/// read pods' sockets with `tcp_info` and socket storage.
pub fn can_enter_namespaces() -> bool {
    read_effective_caps().unwrap_or(0) & (1 << CAP_SYS_ADMIN) != 0
}

/// Capabilities missing for attributing other users' sockets through /proc/<pid>/fd.
pub fn missing_attribution_caps() -> Vec<&'static str> {
    let effective = read_effective_caps().unwrap_or(0);
    [
        (CAP_SYS_PTRACE, "CAP_SYS_PTRACE"),
        (CAP_DAC_READ_SEARCH, "CAP_DAC_READ_SEARCH"),
    ]
    .into_iter()
    .filter(|&(cap, _)| effective & (1 << cap) == 0)
    .map(|(_, name)| name)
    .collect()
}

/// Names the missing capabilities before the kernel answers a bare EPERM.
pub fn check_privileges(effective: u64) -> Result<()> {
    let has = |cap: u32| effective & (1 << cap) != 0;
    if has(CAP_SYS_ADMIN) || (has(CAP_BPF) && has(CAP_PERFMON)) {
        return Ok(());
    }
    let missing: Vec<&str> = [(CAP_BPF, "CAP_BPF"), (CAP_PERFMON, "CAP_PERFMON")]
        .into_iter()
        .filter(|&(cap, _)| !has(cap))
        .map(|(_, name)| name)
        .collect();
    Err(ProbeError::MissingCapabilities(missing.join(" and ")))
}

/// Kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK; newer ones charge the cgroup.
/// Failure is harmless on the latter, and the load error names the problem on the former.
/// Returns whether the limit is now unlimited.
fn raise_memlock_rlimit() -> bool {
    use nix::sys::resource::{RLIM_INFINITY, Resource, setrlimit};
    setrlimit(Resource::RLIMIT_MEMLOCK, RLIM_INFINITY, RLIM_INFINITY).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn privileges() {
        assert!(check_privileges(1 << CAP_SYS_ADMIN).is_ok());
        assert!(check_privileges((1 << CAP_BPF) | (1 << CAP_PERFMON)).is_ok());
        let err = check_privileges(1 << CAP_BPF).unwrap_err().to_string();
        assert!(err.starts_with("missing capability CAP_PERFMON "), "{err}");
        let err = check_privileges(0).unwrap_err().to_string();
        assert!(err.contains("CAP_BPF and CAP_PERFMON"), "{err}");
    }

    /// Linux 6.1's verifier gives up on programs that call subprograms in loops of states
    /// (inet_sock_set_state hit its 1M-instruction limit through out-of-line `memset`s), so
    /// the kernel programs must call none: no relocation may name a libc memory function.
    #[test]
    fn kernel_programs_call_no_memory_functions() {
        use object::{Object as _, ObjectSection as _, ObjectSymbol as _, RelocationTarget};
        let file = object::File::parse(EBPF_OBJECT).unwrap();
        let (mut programs, mut relocations) = (0, 0);
        for section in file.sections() {
            let section_name = section.name().unwrap_or_default();
            if section_name.starts_with("tracepoint/") {
                programs += 1;
            }
            for (_, relocation) in section.relocations() {
                relocations += 1;
                if let RelocationTarget::Symbol(index) = relocation.target() {
                    let name = file.symbol_by_index(index).unwrap().name().unwrap();
                    assert!(
                        !["memset", "memcpy", "memmove", "memcmp", "bcmp"].contains(&name),
                        "{section_name} calls {name}"
                    );
                }
            }
        }
        assert!(programs >= 8, "found {programs} tracepoint programs");
        // Map references are relocations too: the check above saw the programs' calls.
        assert!(
            relocations > programs,
            "only {relocations} relocations read"
        );
    }

    #[test]
    fn cpu_lists() {
        assert_eq!(parse_cpu_list("0-7\n"), Some(8));
        assert_eq!(parse_cpu_list("0"), Some(1));
        assert_eq!(parse_cpu_list("0-3,8,10-11"), Some(7));
        assert_eq!(parse_cpu_list("3-1"), None);
        assert_eq!(parse_cpu_list(""), None);
        assert!(kretprobe_limit(Some(8)).contains("max(10, 2 × 8 CPUs) = 16"));
        assert!(kretprobe_limit(Some(2)).contains("= 10;"));
    }

    #[test]
    fn ring_size_validation() {
        assert_eq!(parse_ring_size("4096"), Ok(4096));
        assert!(parse_ring_size("5000").unwrap_err().contains("try 8192"));
        assert!(parse_ring_size("x").is_err());
    }
}
