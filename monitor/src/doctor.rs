//! `connwatch doctor`: can connwatch run on this node, and if not, what to do about it.
//! One row per requirement; exit 1 when a required one fails. The DaemonSet runs it at start.
use std::{fmt::Write as _, path::Path};

use anyhow::{Context as _, Result, bail};

use crate::probes::{
    ProbeOptions, Probes, TRACEPOINTS, btf, check_privileges, filter::KernelFilter,
    read_effective_caps, tracefs,
};
use monitor_common::Settings;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Ok,
    /// Required and failing: connwatch cannot run.
    Missing,
    /// Optional and failing: connwatch runs with less.
    Degraded,
    /// Not needed by connwatch; reported for the record.
    Unavailable,
}

impl Status {
    fn word(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Missing => "MISSING",
            Status::Degraded => "degraded",
            Status::Unavailable => "unavailable",
        }
    }
}

struct Check {
    name: String,
    status: Status,
    detail: String,
}

#[derive(Debug, clap::Args)]
pub struct DoctorArgs {
    #[command(flatten)]
    pub probes: ProbeOptions,
}

fn check(name: impl Into<String>, result: Result<String>, failing: Status, fix: &str) -> Check {
    match result {
        Ok(detail) => Check {
            name: name.into(),
            status: Status::Ok,
            detail,
        },
        Err(err) => Check {
            name: name.into(),
            status: failing,
            detail: if fix.is_empty() {
                format!("{err:#}")
            } else {
                format!("{err:#} → {fix}")
            },
        },
    }
}

fn kernel_version() -> Result<String> {
    let uname = nix::sys::utsname::uname()?;
    let release = uname.release().to_string_lossy().into_owned();
    let mut parts = release
        .split(['.', '-'])
        .map(|p| p.parse::<u32>().unwrap_or(0));
    let version = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    if version < (5, 8) {
        bail!("Linux {release} is older than 5.8 (BPF ring buffer)");
    }
    Ok(format!("Linux {release}"))
}

/// Probing for a map type creates one, which needs CAP_BPF: without it every probe fails,
/// and the row must name the capability, not an old kernel.
fn ring_buffer_check() -> Check {
    let privileged = read_effective_caps().and_then(check_privileges).is_ok();
    let probed = aya::sys::is_map_supported(aya::maps::MapType::RingBuf);
    let (result, fix) = match probed {
        Ok(true) => (Ok("supported".into()), ""),
        _ if !privileged => (
            Err(anyhow::anyhow!(
                "cannot be probed without CAP_BPF (or CAP_SYS_ADMIN)"
            )),
            "grant the capabilities named in the capabilities row, then run doctor again",
        ),
        Ok(false) => (
            Err(anyhow::anyhow!("not supported by this kernel")),
            "connwatch needs Linux 5.8 or newer",
        ),
        Err(err) => (
            Err(anyhow::Error::new(err).context("probing for the BPF ring buffer map type")),
            "connwatch needs Linux 5.8 or newer",
        ),
    };
    check("BPF ring buffer", result, Status::Missing, fix)
}

fn run_checks(options: &ProbeOptions) -> Vec<Check> {
    let mut checks = vec![check(
        "kernel",
        kernel_version(),
        Status::Missing,
        "upgrade the node to Linux 5.8 or newer",
    )];
    checks.push(check(
        "capabilities",
        read_effective_caps()
            .and_then(check_privileges)
            .map(|()| "CAP_BPF and CAP_PERFMON (or CAP_SYS_ADMIN)".to_string())
            .map_err(anyhow::Error::from),
        Status::Missing,
        "",
    ));
    checks.push(attribution_capabilities());
    checks.push(namespace_capabilities());
    checks.push(check(
        "kernel BTF",
        btf::KernelBtf::open(&options.btf)
            .and_then(|kernel| kernel.kernel_layout(btf::kernel_hz()?))
            .map(|layout| {
                format!(
                    "{}: offsets resolved (tcp_sock.lsndtime at {}), HZ={}",
                    options.btf.display(),
                    layout.tcp_lsndtime,
                    layout.hz
                )
            })
            .map_err(anyhow::Error::from),
        Status::Missing,
        "",
    ));
    match tracefs::locate(options.tracefs.as_deref()) {
        Ok(root) => {
            checks.push(check(
                "tracefs",
                Ok(root.display().to_string()),
                Status::Missing,
                "",
            ));
            checks.extend(TRACEPOINTS.iter().map(|hook| tracepoint_check(&root, hook)));
        }
        Err(err) => checks.push(check("tracefs", Err(err.into()), Status::Missing, "")),
    }
    checks.push(ring_buffer_check());
    checks.extend(load_checks(options));
    checks
}

/// Loads and attaches everything, as `watch --pid --comm --port --log-level debug` would:
/// the verifier's and the kernel's word, then what each capability is served by.
fn load_checks(options: &ProbeOptions) -> Vec<Check> {
    let mut checks = Vec::new();
    let settings = Settings {
        eof_grace_ns: 0,
        wakeup_bytes: 0,
        all_state_changes: 0,
        io_marks: 0,
        filters: 0,
    };
    // Every filter on: the verifier then checks the programs' filter paths too (they are
    // pruned as dead code when no filter is given), so `watch --pid/--comm/--port` loads
    // wherever doctor passes.
    let filter = KernelFilter::new(&[1], &["connwatch".into()], &[1])
        .expect("one value per filter, a 9-byte name: within every limit");
    // Kernel diagnostics on likewise (off by default, they are dead code then), so that
    // `--log-level debug` loads wherever doctor passes; a refusal shows as a degraded row.
    match Probes::attach(options, &settings, &filter, 1024, Some(log::Level::Debug)) {
        Ok((mut probes, _events)) => {
            checks.push(Check {
                name: "load and attach".into(),
                status: Status::Ok,
                detail: "the verifier accepted every program; all hooks attached".into(),
            });
            let mut counts = probes.verified_instructions();
            counts.sort();
            checks.push(Check {
                name: "verified instructions".into(),
                status: Status::Ok,
                detail: counts
                    .iter()
                    .map(|(name, count)| match count {
                        Some(n) => format!("{name} {n}"),
                        None => format!("{name} (not reported before Linux 5.16)"),
                    })
                    .collect::<Vec<_>>()
                    .join(", "),
            });
            checks.extend(probes.capabilities.iter().map(|c| Check {
                name: format!("capability {}", c.name),
                status: if c.degraded.is_some() {
                    Status::Degraded
                } else {
                    Status::Ok
                },
                detail: match &c.degraded {
                    None => format!("served by {}", c.served_by),
                    Some(why) => format!("served by {}: {why}", c.served_by),
                },
            }));
            checks.push(check(
                "kprobes",
                probes
                    .try_kprobe()
                    .map(|()| "available".into())
                    .context("no kprobe support (CONFIG_KPROBES off, or kprobes disabled)"),
                Status::Unavailable,
                "needed only where sock:sock_send_length is missing and fexit fails",
            ));
            checks.push(check(
                "BPF trampolines (fentry)",
                probes
                    .try_fentry()
                    .map(|()| "available".into())
                    .context("fentry refused"),
                Status::Unavailable,
                "needed only where sock:sock_send_length is missing (before Linux 6.3)",
            ));
        }
        Err(err) => checks.push(Check {
            name: "load and attach".into(),
            status: Status::Missing,
            detail: crate::probes::with_causes(&err),
        }),
    }
    checks
}

/// Attributing sockets of other users' processes through /proc/<pid>/fd needs both.
fn attribution_capabilities() -> Check {
    let name = "attribution capabilities".to_string();
    let missing = crate::probes::missing_attribution_caps();
    if missing.is_empty() {
        return Check {
            name,
            status: Status::Ok,
            detail: "CAP_SYS_PTRACE and CAP_DAC_READ_SEARCH".into(),
        };
    }
    Check {
        name,
        status: Status::Degraded,
        detail: format!(
            "without {}: sockets of other users' processes are attributed only when connwatch \
             saw them connect or accept → grant the capabilities",
            missing.join(" and ")
        ),
    }
}

/// Other network namespaces (pods) are read in full only from inside them.
fn namespace_capabilities() -> Check {
    let name = "network namespaces".to_string();
    if crate::probes::can_enter_namespaces() {
        return Check {
            name,
            status: Status::Ok,
            detail: "every namespace's sockets with tcp_info (setns: CAP_SYS_ADMIN)".into(),
        };
    }
    Check {
        name,
        status: Status::Degraded,
        detail: "without CAP_SYS_ADMIN connwatch cannot enter other network namespaces: pods' \
                 sockets come from /proc/<pid>/net/tcp, so their pools are listed but have no \
                 idle, stall or zombie detection → grant CAP_SYS_ADMIN for those"
            .into(),
    }
}

fn tracepoint_check(root: &Path, hook: &crate::probes::Tracepoint) -> Check {
    let name = format!("tracepoint {}:{}", hook.category, hook.name);
    let present = root
        .join("events")
        .join(hook.category)
        .join(hook.name)
        .is_dir();
    match (present, hook.optional) {
        (true, _) => Check {
            name,
            status: Status::Ok,
            detail: String::new(),
        },
        (false, None) => Check {
            name,
            status: Status::Missing,
            detail: "required → connwatch needs Linux 5.8 or newer with CONFIG_TRACEPOINTS".into(),
        },
        // Informational: the capability row says whether fexit serves instead.
        (false, Some(loss)) if hook.is_io() => Check {
            name,
            status: Status::Unavailable,
            detail: format!("optional ({loss}"),
        },
        (false, Some(loss)) => Check {
            name,
            status: Status::Degraded,
            detail: format!("optional ({loss}"),
        },
    }
}

/// The table, and whether connwatch can run.
fn render(checks: &[Check]) -> (String, bool) {
    let mut out = String::new();
    let _ = writeln!(out, "{:<44} {:<12} DETAIL", "CHECK", "STATUS");
    for c in checks {
        let _ = writeln!(out, "{:<44} {:<12} {}", c.name, c.status.word(), c.detail);
    }
    let missing = checks
        .iter()
        .filter(|c| c.status == Status::Missing)
        .count();
    let degraded = checks
        .iter()
        .filter(|c| c.status == Status::Degraded)
        .count();
    let _ = match (missing, degraded) {
        (0, 0) => writeln!(out, "connwatch can run on this node: yes"),
        (0, n) => writeln!(
            out,
            "connwatch can run on this node: yes, with {n} degraded check(s)"
        ),
        (n, _) => writeln!(
            out,
            "connwatch can run on this node: NO ({n} required check(s) failed; fixes above)"
        ),
    };
    (out, missing == 0)
}

pub fn run(args: &DoctorArgs) -> Result<()> {
    let (table, can_run) = render(&run_checks(&args.probes));
    print!("{table}");
    if !can_run {
        bail!("connwatch cannot run on this node (see the table above)");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdict_follows_required_checks() {
        let row = |status| Check {
            name: "x".into(),
            status,
            detail: String::new(),
        };
        assert!(render(&[row(Status::Ok), row(Status::Unavailable)]).1);
        let (text, ok) = render(&[row(Status::Ok), row(Status::Degraded)]);
        assert!(ok && text.contains("with 1 degraded check(s)"), "{text}");
        let (text, ok) = render(&[row(Status::Missing)]);
        assert!(
            !ok && text.contains("NO (1 required check(s) failed"),
            "{text}"
        );
    }
}
