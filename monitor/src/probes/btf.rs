//! Struct offsets from the running kernel's BTF.
//!
//! aya-ebpf emits no CO-RE relocations, so the eBPF programs read `struct sock`/`tcp_sock`
//! fields at offsets given to them at load time. Resolving them here, from
//! `/sys/kernel/btf/vmlinux` of the kernel we are about to attach to, is what lets one
//! DaemonSet image run on many kernels.
use std::path::{Path, PathBuf};

use btf_rs::{Btf, Type};
use monitor_common::KernelLayout;

pub const DEFAULT_BTF: &str = "/sys/kernel/btf/vmlinux";

/// The fix every unusable `--btf` shares.
const PASS_VMLINUX: &str =
    "pass the path of this kernel's vmlinux BTF, e.g. /sys/kernel/btf/vmlinux";

/// Why the kernel's struct offsets could not be resolved.
#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error(
        "kernel BTF not found at {0}: connwatch needs a kernel built with \
         CONFIG_DEBUG_INFO_BTF=y (most distributions since 2020), or pass --btf with the path \
         of this kernel's vmlinux BTF"
    )]
    NotFound(PathBuf),
    #[error("reading kernel BTF {path}")]
    Unreadable {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("--btf {path} is {kind}, not a file: {PASS_VMLINUX}")]
    NotAFile { path: PathBuf, kind: &'static str },
    #[error(
        "--btf {path} is {mib} MiB, more than any kernel's BTF ({max} MiB at most): \
         {PASS_VMLINUX}",
        max = MAX_BTF_BYTES >> 20
    )]
    TooLarge { path: PathBuf, mib: u64 },
    #[error("parsing kernel BTF {path}: {PASS_VMLINUX}")]
    Unparsable {
        path: PathBuf,
        #[source]
        source: btf_rs::Error,
    },
    #[error("resolving {field} from kernel BTF: it has no struct {name} (kernel layout changed)")]
    NoStruct {
        field: String,
        name: String,
        #[source]
        source: Option<btf_rs::Error>,
    },
    #[error("kernel BTF has no member {0} (kernel layout changed)")]
    NoMember(String),
    #[error("{0} is a bitfield; connwatch cannot read it")]
    Bitfield(String),
    #[error("kernel BTF: {field} is {size:?} bytes, connwatch expects {expected}")]
    WrongSize {
        field: String,
        size: Option<u32>,
        expected: u32,
    },
    #[error("kernel BTF: a type of {0} does not resolve")]
    Unresolved(String, #[source] btf_rs::Error),
    #[error("kernel BTF: type modifier chain too long in {0}")]
    ModifierChain(String),
    #[error("kernel BTF: the socket inode offset is out of range")]
    OffsetRange(#[source] std::num::TryFromIntError),
    #[error("clock_getres(CLOCK_MONOTONIC_COARSE), which gives the kernel HZ")]
    Clock(#[source] nix::Error),
    #[error("CLOCK_MONOTONIC_COARSE reports a resolution of {0} ns; cannot derive the kernel HZ")]
    BadResolution(i128),
}

type Result<T, E = BtfError> = std::result::Result<T, E>;

/// A member located in BTF: byte offset from the start of the outer struct, and byte size
/// where the member is a scalar or pointer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Field {
    pub offset: u32,
    pub size: Option<u32>,
}

pub struct KernelBtf {
    btf: Btf,
}

/// The largest BTF file read: vmlinux BTF is a few MiB (6.18: 6 MiB).
const MAX_BTF_BYTES: u64 = 256 << 20;

/// A regular file of a sane size: a FIFO would block the read forever, a directory or a
/// device would fail obscurely, and a huge file would be read into memory whole.
fn check_btf_file(path: &Path) -> Result<()> {
    let meta = std::fs::metadata(path).map_err(|source| BtfError::Unreadable {
        path: path.to_path_buf(),
        source,
    })?;
    let file_type = meta.file_type();
    if !file_type.is_file() {
        use std::os::unix::fs::FileTypeExt as _;
        let kind = if file_type.is_fifo() {
            "a FIFO"
        } else if file_type.is_dir() {
            "a directory"
        } else if file_type.is_socket() {
            "a socket"
        } else {
            "a device"
        };
        return Err(BtfError::NotAFile {
            path: path.to_path_buf(),
            kind,
        });
    }
    if meta.len() > MAX_BTF_BYTES {
        return Err(BtfError::TooLarge {
            path: path.to_path_buf(),
            mib: meta.len() >> 20,
        });
    }
    Ok(())
}

impl KernelBtf {
    pub fn open(path: &Path) -> Result<KernelBtf> {
        if !path.exists() {
            return Err(BtfError::NotFound(path.to_path_buf()));
        }
        check_btf_file(path)?;
        let btf = Btf::from_file(path).map_err(|source| BtfError::Unparsable {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(KernelBtf { btf })
    }

    /// Offset of `path` (member names, descending into named sub-structs) within `outer`.
    /// Anonymous unions and structs on the way are searched transparently.
    pub fn field(&self, outer: &str, path: &[&str]) -> Result<Field> {
        let describe = || format!("{outer}.{}", path.join("."));
        let mut current = self
            .struct_named(outer)
            .map_err(|source| BtfError::NoStruct {
                field: describe(),
                name: outer.to_string(),
                source,
            })?;
        let mut offset_bits = 0u32;
        let mut last_type = None;
        for name in path {
            let (bits, member_type) = self
                .find_member(&current, name)
                .map_err(|source| BtfError::Unresolved(describe(), source))?
                .ok_or_else(|| BtfError::NoMember(describe()))?;
            offset_bits += bits;
            let resolved = self
                .strip_modifiers(member_type)
                .map_err(|source| BtfError::Unresolved(describe(), source))?
                .ok_or_else(|| BtfError::ModifierChain(describe()))?;
            if let Type::Struct(inner) | Type::Union(inner) = &resolved {
                current = inner.clone();
            }
            last_type = Some(resolved);
        }
        if !offset_bits.is_multiple_of(8) {
            return Err(BtfError::Bitfield(describe()));
        }
        let size = match last_type {
            Some(Type::Int(int)) => u32::try_from(int.size()).ok(),
            Some(Type::Ptr(_)) => Some(8),
            Some(Type::Enum(e)) => u32::try_from(e.size()).ok(),
            _ => None,
        };
        Ok(Field {
            offset: offset_bits / 8,
            size,
        })
    }

    /// Like [`field`](Self::field) but insists on a scalar of `size` bytes.
    fn scalar(&self, outer: &str, path: &[&str], size: u32) -> Result<u32> {
        let field = self.field(outer, path)?;
        if field.size != Some(size) {
            return Err(BtfError::WrongSize {
                field: format!("{outer}.{}", path.join(".")),
                size: field.size,
                expected: size,
            });
        }
        Ok(field.offset)
    }

    /// The struct called `name` with members (not a forward declaration); the lookup's
    /// error, if it failed.
    fn struct_named(&self, name: &str) -> Result<btf_rs::Struct, Option<btf_rs::Error>> {
        let types = self.btf.resolve_types_by_name(name).map_err(Some)?;
        types
            .into_iter()
            .find_map(|ty| match ty {
                Type::Struct(s) if !s.members.is_empty() => Some(s),
                _ => None,
            })
            .ok_or(None)
    }

    /// Finds `name` in `outer`, recursing into anonymous members; returns (bit offset, type).
    fn find_member(
        &self,
        outer: &btf_rs::Struct,
        name: &str,
    ) -> Result<Option<(u32, Type)>, btf_rs::Error> {
        for member in &outer.members {
            let member_name = self.btf.resolve_name(member).unwrap_or_default();
            let member_type = self.btf.resolve_chained_type(member)?;
            if member_name == name {
                return Ok(Some((member.bit_offset(), member_type)));
            }
            if member_name.is_empty()
                && let Some(Type::Struct(inner) | Type::Union(inner)) =
                    self.strip_modifiers(member_type)?
                && let Some((bits, found)) = self.find_member(&inner, name)?
            {
                return Ok(Some((member.bit_offset() + bits, found)));
            }
        }
        Ok(None)
    }

    /// Follows typedef/const/volatile/restrict/type-tag to the underlying type; `None` if
    /// the chain is implausibly long (a loop in malformed BTF).
    fn strip_modifiers(&self, mut ty: Type) -> Result<Option<Type>, btf_rs::Error> {
        for _ in 0..16 {
            ty = match &ty {
                Type::Typedef(t) => self.btf.resolve_chained_type(t)?,
                Type::Const(t) | Type::Volatile(t) | Type::Restrict(t) => {
                    self.btf.resolve_chained_type(t)?
                }
                Type::TypeTag(t) => self.btf.resolve_chained_type(t)?,
                _ => return Ok(Some(ty)),
            };
        }
        Ok(None)
    }

    /// Every offset the eBPF programs read, from this kernel.
    pub fn kernel_layout(&self, hz: u32) -> Result<KernelLayout> {
        let socket_alloc_socket = i64::from(self.field("socket_alloc", &["socket"])?.offset);
        let socket_alloc_inode = i64::from(self.field("socket_alloc", &["vfs_inode"])?.offset);
        let inode_ino = i64::from(self.scalar("inode", &["i_ino"], 8)?);
        let socket_ino = i32::try_from(socket_alloc_inode - socket_alloc_socket + inode_ino)
            .map_err(BtfError::OffsetRange)?;
        Ok(KernelLayout {
            hz,
            sk_state: self.scalar("sock", &["__sk_common", "skc_state"], 1)?,
            sk_family: self.scalar("sock", &["__sk_common", "skc_family"], 2)?,
            sk_protocol: self.scalar("sock", &["sk_protocol"], 2)?,
            sk_socket: self.scalar("sock", &["sk_socket"], 8)?,
            socket_ino,
            tcp_lsndtime: self.scalar("tcp_sock", &["lsndtime"], 4)?,
            tcp_lrcvtime: self.scalar("tcp_sock", &["inet_conn", "icsk_ack", "lrcvtime"], 4)?,
            task_files: self.scalar("task_struct", &["files"], 8)?,
            files_fdt: self.scalar("files_struct", &["fdt"], 8)?,
            fdt_max_fds: self.scalar("fdtable", &["max_fds"], 4)?,
            fdt_fd: self.scalar("fdtable", &["fd"], 8)?,
            file_private_data: self.scalar("file", &["private_data"], 8)?,
            socket_sk: self.scalar("socket", &["sk"], 8)?,
            sk_err: self.scalar("sock", &["sk_err"], 4)?,
            // Moved into sock_common (as skc_flags) in Linux 6.x.
            sk_flags: self
                .scalar("sock", &["__sk_common", "skc_flags"], 8)
                .or_else(|_| self.scalar("sock", &["sk_flags"], 8))?,
            sk_lingertime: self.scalar("sock", &["sk_lingertime"], 8)?,
            sk_daddr: self.scalar("sock", &["__sk_common", "skc_daddr"], 4)?,
            inet_saddr: self.scalar("inet_sock", &["inet_saddr"], 4)?,
            sk_dport: self.scalar("sock", &["__sk_common", "skc_dport"], 2)?,
            inet_sport: self.scalar("inet_sock", &["inet_sport"], 2)?,
            // `struct in6_addr`: not a scalar, read as 16 bytes.
            sk_v6_daddr: self.field("sock", &["__sk_common", "skc_v6_daddr"])?.offset,
            sk_v6_rcv_saddr: self
                .field("sock", &["__sk_common", "skc_v6_rcv_saddr"])?
                .offset,
            // `possible_net_t { struct net *net; }` (CONFIG_NET_NS, which every
            // distribution kernel has).
            sk_net: self.scalar("sock", &["__sk_common", "skc_net", "net"], 8)?,
            net_inum: self.scalar("net", &["ns", "inum"], 4)?,
        })
    }
}

impl KernelBtf {
    /// How many arguments kernel function `name` takes, from its BTF prototype; `None` if
    /// BTF does not describe it (not traceable with fentry/fexit then).
    pub fn function_arity(&self, name: &str) -> Option<usize> {
        let types = self.btf.resolve_types_by_name(name).ok()?;
        types.into_iter().find_map(|ty| match ty {
            Type::Func(func) => match self.btf.resolve_chained_type(&func).ok()? {
                Type::FuncProto(proto) => Some(proto.parameters.len()),
                _ => None,
            },
            _ => None,
        })
    }

    /// Value → name of an enum (e.g. `sk_rst_reason`, whose values differ between kernels);
    /// empty if this kernel has no such enum.
    pub fn enum_names(&self, name: &str) -> std::collections::HashMap<u32, String> {
        let Ok(types) = self.btf.resolve_types_by_name(name) else {
            return std::collections::HashMap::default();
        };
        types
            .into_iter()
            .find_map(|ty| match ty {
                Type::Enum(e) => Some(e),
                _ => None,
            })
            .map(|e| {
                e.members
                    .iter()
                    .filter_map(|m| Some((m.val(), self.btf.resolve_name(m).ok()?)))
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// The kernel's tick rate: the resolution of CLOCK_MONOTONIC_COARSE is one jiffy.
pub fn kernel_hz() -> Result<u32> {
    let res = nix::time::clock_getres(nix::time::ClockId::CLOCK_MONOTONIC_COARSE)
        .map_err(BtfError::Clock)?;
    let nanos = i128::from(res.tv_sec()) * 1_000_000_000 + i128::from(res.tv_nsec());
    // One jiffy is between 1 ms (HZ=1000) and 10 ms (HZ=100); anything outside a second is
    // no tick.
    if !(1..=1_000_000_000).contains(&nanos) {
        return Err(BtfError::BadResolution(nanos));
    }
    u32::try_from((1_000_000_000 + nanos / 2) / nanos).map_err(|_| BtfError::BadResolution(nanos))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hz_is_a_kernel_config_value() {
        let hz = kernel_hz().unwrap();
        assert!([100, 250, 300, 1000].contains(&hz), "HZ={hz}");
    }
}
