//! tracefs: mounting it when missing, and reading tracepoint record layouts from `format`.
use std::{
    collections::HashMap,
    fs,
    path::{Path, PathBuf},
};

use monitor_common::{ABSENT, MAX_RECORD_BYTES, TpLayout};

pub const DEFAULT_TRACEFS: &str = "/sys/kernel/tracing";
const DEBUGFS_TRACING: &str = "/sys/kernel/debug/tracing";

/// Why no tracefs root, or no layout of a tracepoint connwatch needs, could be had.
#[derive(Debug, thiserror::Error)]
pub enum TracefsError {
    #[error(
        "{} is not a tracefs mount (no events/ directory): pass the directory where tracefs \
         is mounted, e.g. --tracefs {DEFAULT_TRACEFS}",
        root.display()
    )]
    NotTracefs { root: PathBuf },
    #[error(
        "cannot read tracefs at {candidate} as uid {uid}: missing capability \
         CAP_DAC_READ_SEARCH (needed to read tracepoint formats as a non-root user): run as \
         root or grant it"
    )]
    NoCapability { candidate: String, uid: u32 },
    #[error(
        "tracefs is not mounted and mounting it at {DEFAULT_TRACEFS} failed: run `mount -t \
         tracefs tracefs {DEFAULT_TRACEFS}` as root, or mount the host's tracefs into the \
         container"
    )]
    Mount(#[source] nix::Error),
    #[error(
        "tracepoint {tracepoint} is missing from {}: connwatch needs Linux 5.8 or newer with \
         CONFIG_TRACEPOINTS; check `ls {}/events/{category}/`",
        root.display(),
        root.display()
    )]
    MissingTracepoint {
        tracepoint: String,
        root: PathBuf,
        category: String,
    },
    #[error("reading {category}:{name}")]
    Layout {
        category: String,
        name: String,
        #[source]
        source: FormatError,
    },
}

/// Returns a tracefs root with `events/`, mounting tracefs at the default path if needed.
///
/// An explicit `--tracefs` is used as given: it exists for containers with the host's
/// tracefs mounted elsewhere, and for tests that present a kernel lacking a tracepoint.
pub fn locate(explicit: Option<&Path>) -> Result<PathBuf, TracefsError> {
    if let Some(root) = explicit {
        if !root.join("events").is_dir() {
            return Err(TracefsError::NotTracefs {
                root: root.to_path_buf(),
            });
        }
        return Ok(root.to_path_buf());
    }
    for candidate in [DEFAULT_TRACEFS, DEBUGFS_TRACING] {
        match std::fs::metadata(Path::new(candidate).join("events")) {
            Ok(meta) if meta.is_dir() => return Ok(candidate.into()),
            // tracefs is root-only (0700): a non-root user needs the capability to look in.
            Err(err) if err.kind() == std::io::ErrorKind::PermissionDenied => {
                return Err(TracefsError::NoCapability {
                    candidate: candidate.into(),
                    uid: nix::unistd::geteuid().as_raw(),
                });
            }
            _ => {}
        }
    }
    nix::mount::mount(
        Some("tracefs"),
        DEFAULT_TRACEFS,
        Some("tracefs"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(TracefsError::Mount)?;
    log::info!("mounted tracefs at {DEFAULT_TRACEFS}");
    Ok(DEFAULT_TRACEFS.into())
}

/// One tracepoint's record fields: name → (offset, size).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Format {
    pub tracepoint: String,
    fields: HashMap<String, (u16, u16)>,
}

/// Why a tracepoint cannot be used; callers decide whether that is fatal.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("tracepoint {0} does not exist on this kernel")]
    Missing(String),
    #[error("cannot read {path}: {source}")]
    Unreadable {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("tracepoint {tracepoint} lacks field `{field}` (kernel layout not supported)")]
    MissingField { tracepoint: String, field: String },
    #[error("tracepoint {tracepoint}: {why} (kernel layout not supported)")]
    Unsupported { tracepoint: String, why: String },
    #[error(
        "tracepoint {tracepoint}: field `{field}` is {found} bytes on this kernel, but \
         connwatch's kernel programs read it as {expected} bytes, so this kernel's layout is \
         not supported; please report a bug with `uname -r` and the output of \
         `cat /sys/kernel/tracing/events/{}/format`",
        tracepoint.replace(':', "/")
    )]
    FieldSize {
        tracepoint: String,
        field: String,
        expected: u16,
        found: u16,
    },
}

impl Format {
    pub fn read(tracefs: &Path, category: &str, name: &str) -> Result<Format, FormatError> {
        let tracepoint = format!("{category}:{name}");
        let dir = tracefs.join("events").join(category).join(name);
        if !dir.is_dir() {
            return Err(FormatError::Missing(tracepoint));
        }
        let path = dir.join("format");
        let text =
            fs::read_to_string(&path).map_err(|source| FormatError::Unreadable { path, source })?;
        Ok(Format::parse(tracepoint, &text))
    }

    /// Parses lines like `field:__u16 sport; offset:24; size:2; signed:0;` (tab-separated).
    pub fn parse(tracepoint: String, text: &str) -> Format {
        let mut fields = HashMap::new();
        for line in text.lines() {
            let mut decl = None;
            let mut offset = None;
            let mut size = None;
            for part in line.split(';') {
                let part = part.trim();
                if let Some(rest) = part.strip_prefix("field:") {
                    decl = Some(rest);
                } else if let Some(rest) = part.strip_prefix("offset:") {
                    offset = rest.parse::<u16>().ok();
                } else if let Some(rest) = part.strip_prefix("size:") {
                    size = rest.parse::<u16>().ok();
                }
            }
            if let (Some(decl), Some(offset), Some(size)) = (decl, offset, size)
                && let Some(name) = field_name(decl)
            {
                fields.insert(name.to_string(), (offset, size));
            }
        }
        Format { tracepoint, fields }
    }

    pub fn offset(&self, name: &str) -> u16 {
        self.fields.get(name).map_or(ABSENT, |&(offset, _)| offset)
    }

    pub fn size(&self, name: &str) -> Option<u16> {
        self.fields.get(name).map(|&(_, size)| size)
    }

    pub fn require(&self, name: &str) -> Result<u16, FormatError> {
        match self.offset(name) {
            ABSENT => Err(FormatError::MissingField {
                tracepoint: self.tracepoint.clone(),
                field: name.to_string(),
            }),
            offset => Ok(offset),
        }
    }

    /// Layout of a socket tracepoint; `state` names the state field (`oldstate` or `state`).
    pub fn socket_layout(&self) -> Result<TpLayout, FormatError> {
        let mut tp = TpLayout::absent();
        let mut read = Reads::new(self);
        tp.skaddr = read.required("skaddr", size::POINTER)?;
        let state = if self.size("oldstate").is_some() {
            "oldstate"
        } else {
            "state"
        };
        tp.old_state = read.optional(state, size::INT)?;
        tp.new_state = read.optional("newstate", size::INT)?;
        tp.protocol = read.optional("protocol", size::U16)?;
        tp.cookie = read.optional("sock_cookie", size::U64)?;
        tp.reason = read.optional("reason", size::INT)?;
        // Since 6.10 tcp_send_reset stores sockaddr_in6-sized unions in saddr/daddr.
        if self.size("saddr") == Some(size::SOCKADDR) {
            tp.saddr_sockaddr = read.required("saddr", size::SOCKADDR)?;
            tp.daddr_sockaddr = read.required("daddr", size::SOCKADDR)?;
        } else {
            // Linux 5.10's tcp_event_sk lacks `family`; the kernel program reads the socket's.
            tp.family = read.optional("family", size::U16)?;
            tp.sport = read.required("sport", size::U16)?;
            tp.dport = read.required("dport", size::U16)?;
            tp.saddr_v6 = read.required("saddr_v6", size::ADDR_V6)?;
            tp.daddr_v6 = read.required("daddr_v6", size::ADDR_V6)?;
        }
        read.finish(tp)
    }

    /// Layout of `sock:sock_send_length` / `sock:sock_recv_length` (Linux 6.3+).
    pub fn io_layout(&self) -> Result<TpLayout, FormatError> {
        let mut tp = TpLayout::absent();
        let mut read = Reads::new(self);
        tp.skaddr = read.required("sk", size::POINTER)?;
        tp.protocol = read.required("protocol", size::U16)?;
        tp.family = read.required("family", size::U16)?;
        tp.ret = read.required("ret", size::INT)?;
        read.finish(tp)
    }

    /// Layout of a syscall exit tracepoint: only `ret` (a `long`).
    pub fn exit_layout(&self) -> Result<TpLayout, FormatError> {
        let mut tp = TpLayout::absent();
        let mut read = Reads::new(self);
        tp.ret = read.required("ret", size::LONG)?;
        read.finish(tp)
    }

    fn unsupported(&self, why: String) -> FormatError {
        FormatError::Unsupported {
            tracepoint: self.tracepoint.clone(),
            why,
        }
    }
}

/// The size each record field is read as by the kernel programs (monitor-ebpf:
/// `Record::get::<T>` and the address copies), so that a kernel whose tracepoint stores a
/// field at another size is refused here instead of read wrong there.
mod size {
    /// `skaddr`, `sk`: a pointer, read as u64.
    pub const POINTER: u16 = 8;
    /// `oldstate`, `newstate`, `state` (int), `reason` (enum), send/recv `ret` (int).
    pub const INT: u16 = 4;
    /// `family`, `protocol`, `sport`, `dport`.
    pub const U16: u16 = 2;
    /// `sock_cookie`.
    pub const U64: u16 = 8;
    /// A syscall exit's `ret` (long), read as i64.
    pub const LONG: u16 = 8;
    /// `saddr_v6`, `daddr_v6`: 16-byte addresses.
    pub const ADDR_V6: u16 = 16;
    /// `saddr`, `daddr` as `sockaddr_in6`-sized unions (tcp_send_reset since 6.10).
    pub const SOCKADDR: u16 = 28;
}

/// The fields a layout takes from a format, each checked as the kernel program reads it:
/// its size, its alignment (to its size; arrays, copied in 2-byte words, to 2), and where
/// the record the program copies must end to hold them all.
struct Reads<'a> {
    format: &'a Format,
    end: u16,
}

impl<'a> Reads<'a> {
    fn new(format: &'a Format) -> Reads<'a> {
        Reads { format, end: 0 }
    }

    /// The offset of `name`, read as `want` bytes; an error when the kernel lacks it.
    fn required(&mut self, name: &str, want: u16) -> Result<u16, FormatError> {
        self.format.require(name)?;
        self.optional(name, want)
    }

    /// The offset of `name`, read as `want` bytes; [`ABSENT`] when the kernel lacks it.
    fn optional(&mut self, name: &str, want: u16) -> Result<u16, FormatError> {
        let Some(&(offset, found)) = self.format.fields.get(name) else {
            return Ok(ABSENT);
        };
        if found != want {
            return Err(FormatError::FieldSize {
                tracepoint: self.format.tracepoint.clone(),
                field: name.to_string(),
                expected: want,
                found,
            });
        }
        let align = if want > 8 { 2 } else { want };
        if !offset.is_multiple_of(align) {
            return Err(self.format.unsupported(format!(
                "field `{name}` at offset {offset} is not {align}-byte aligned"
            )));
        }
        let end = offset.checked_add(want).ok_or_else(|| {
            self.format.unsupported(format!(
                "field `{name}` at offset {offset} ends past 64 KiB"
            ))
        })?;
        self.end = self.end.max(end);
        Ok(offset)
    }

    /// Sets how much of the record the kernel program copies: up to the end of the last
    /// field taken, at most its buffer.
    fn finish(self, mut tp: TpLayout) -> Result<TpLayout, FormatError> {
        if self.end > MAX_RECORD_BYTES {
            return Err(self.format.unsupported(format!(
                "the fields connwatch reads end at byte {}, past the {MAX_RECORD_BYTES} \
                 bytes its kernel programs copy",
                self.end
            )));
        }
        tp.record_size = self.end;
        Ok(tp)
    }
}

/// `const void * skaddr` → `skaddr`; `__u8 saddr[4]` → `saddr`.
fn field_name(decl: &str) -> Option<&str> {
    let last = decl.split_whitespace().last()?;
    let name = last.split('[').next()?;
    (!name.is_empty()).then_some(name.trim_start_matches('*'))
}

/// Reads a socket tracepoint's layout, turning absence into an actionable error.
pub fn socket_layout(tracefs: &Path, category: &str, name: &str) -> Result<TpLayout, TracefsError> {
    let layout = |source| TracefsError::Layout {
        category: category.into(),
        name: name.into(),
        source,
    };
    let format = Format::read(tracefs, category, name).map_err(|err| match err {
        FormatError::Missing(tracepoint) => TracefsError::MissingTracepoint {
            tracepoint,
            root: tracefs.to_path_buf(),
            category: category.into(),
        },
        other => layout(other),
    })?;
    format.socket_layout().map_err(layout)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SET_STATE: &str = "name: inet_sock_set_state
ID: 1234
format:
	field:unsigned short common_type;	offset:0;	size:2;	signed:0;
	field:const void * skaddr;	offset:8;	size:8;	signed:0;
	field:int oldstate;	offset:16;	size:4;	signed:1;
	field:int newstate;	offset:20;	size:4;	signed:1;
	field:__u16 sport;	offset:24;	size:2;	signed:0;
	field:__u16 dport;	offset:26;	size:2;	signed:0;
	field:__u16 family;	offset:28;	size:2;	signed:0;
	field:__u16 protocol;	offset:30;	size:2;	signed:0;
	field:__u8 saddr[4];	offset:32;	size:4;	signed:0;
	field:__u8 daddr[4];	offset:36;	size:4;	signed:0;
	field:__u8 saddr_v6[16];	offset:40;	size:16;	signed:0;
	field:__u8 daddr_v6[16];	offset:56;	size:16;	signed:0;

print fmt: \"family=%s\"";

    const SEND_RESET_6_10: &str = "format:
	field:const void * skbaddr;	offset:8;	size:8;	signed:0;
	field:const void * skaddr;	offset:16;	size:8;	signed:0;
	field:int state;	offset:24;	size:4;	signed:1;
	field:enum sk_rst_reason reason;	offset:28;	size:4;	signed:0;
	field:__u8 saddr[28];	offset:32;	size:28;	signed:0;
	field:__u8 daddr[28];	offset:60;	size:28;	signed:0;";

    #[test]
    fn parses_set_state() {
        let tp = Format::parse("sock:inet_sock_set_state".into(), SET_STATE)
            .socket_layout()
            .unwrap();
        assert_eq!(tp.skaddr, 8);
        assert_eq!(tp.old_state, 16);
        assert_eq!(tp.new_state, 20);
        assert_eq!(tp.protocol, 30);
        assert_eq!(tp.saddr_v6, 40);
        assert_eq!(tp.saddr_sockaddr, ABSENT);
        assert_eq!(tp.cookie, ABSENT);
    }

    #[test]
    fn parses_sockaddr_send_reset() {
        let tp = Format::parse("tcp:tcp_send_reset".into(), SEND_RESET_6_10)
            .socket_layout()
            .unwrap();
        assert_eq!(tp.skaddr, 16);
        assert_eq!(tp.old_state, 24);
        assert_eq!(tp.reason, 28);
        assert_eq!(tp.saddr_sockaddr, 32);
        assert_eq!(tp.daddr_sockaddr, 60);
        assert_eq!(tp.sport, ABSENT);
    }

    /// Linux 6.3+'s `sock:sock_send_length`.
    const SEND_LENGTH: &str = "format:
	field:unsigned short common_type;	offset:0;	size:2;	signed:0;
	field:void * sk;	offset:8;	size:8;	signed:0;
	field:__u16 family;	offset:16;	size:2;	signed:0;
	field:__u16 protocol;	offset:18;	size:2;	signed:0;
	field:int ret;	offset:20;	size:4;	signed:1;
	field:int flags;	offset:24;	size:4;	signed:1;";

    const SYS_EXIT: &str = "format:
	field:int __syscall_nr;	offset:8;	size:4;	signed:1;
	field:long ret;	offset:16;	size:8;	signed:1;";

    #[test]
    fn parses_io_and_exit_layouts() {
        let io = Format::parse("sock:sock_send_length".into(), SEND_LENGTH)
            .io_layout()
            .unwrap();
        assert_eq!((io.skaddr, io.family, io.protocol, io.ret), (8, 16, 18, 20));
        assert_eq!(io.record_size, 24);
        let exit = Format::parse("syscalls:sys_exit_accept4".into(), SYS_EXIT)
            .exit_layout()
            .unwrap();
        assert_eq!((exit.ret, exit.record_size), (16, 24));
    }

    /// A size mismatch's (expected, found) sizes.
    fn sizes(err: &FormatError) -> Option<(u16, u16)> {
        match err {
            FormatError::FieldSize {
                expected, found, ..
            } => Some((*expected, *found)),
            _ => None,
        }
    }

    #[test]
    fn a_field_of_another_size_is_refused_with_both_sizes() {
        // A state stored as a u16: the kernel program would read 4 bytes of it.
        let text = SET_STATE.replace(
            "int oldstate;\toffset:16;\tsize:4;",
            "__u16 oldstate;\toffset:16;\tsize:2;",
        );
        assert_ne!(text, SET_STATE);
        let err = Format::parse("sock:inet_sock_set_state".into(), &text)
            .socket_layout()
            .unwrap_err();
        let message = err.to_string();
        assert!(
            matches!(
                &err,
                FormatError::FieldSize { field, expected: 4, found: 2, .. } if field == "oldstate"
            ),
            "{message}"
        );
        assert!(message.contains("`oldstate` is 2 bytes"), "{message}");
        assert!(message.contains("read it as 4 bytes"), "{message}");
        assert!(
            message.contains("events/sock/inet_sock_set_state/format"),
            "{message}"
        );
        // A syscall's `ret` as an int, and a send's as a long: both refused.
        let int_ret = SYS_EXIT.replace(
            "long ret;\toffset:16;\tsize:8;",
            "int ret;\toffset:16;\tsize:4;",
        );
        let err = Format::parse("syscalls:sys_exit_accept".into(), &int_ret)
            .exit_layout()
            .unwrap_err();
        assert_eq!(sizes(&err), Some((8, 4)), "{err}");
        let long_ret = SEND_LENGTH.replace(
            "int ret;\toffset:20;\tsize:4;",
            "long ret;\toffset:24;\tsize:8;",
        );
        let err = Format::parse("sock:sock_send_length".into(), &long_ret)
            .io_layout()
            .unwrap_err();
        assert_eq!(sizes(&err), Some((4, 8)), "{err}");
    }

    #[test]
    fn an_optional_field_is_checked_when_present() {
        // tcp_receive_reset's cookie, were it 4 bytes.
        let text =
            format!("{SET_STATE}\n\tfield:__u32 sock_cookie;\toffset:72;\tsize:4;\tsigned:0;");
        let err = Format::parse("tcp:tcp_receive_reset".into(), &text)
            .socket_layout()
            .unwrap_err();
        assert_eq!(sizes(&err), Some((8, 4)), "{err}");
    }

    #[test]
    fn a_field_past_the_copied_record_or_u16_is_refused() {
        let far = SYS_EXIT.replace("offset:16;\tsize:8;", "offset:65528;\tsize:8;");
        let err = Format::parse("syscalls:sys_exit_accept".into(), &far)
            .exit_layout()
            .unwrap_err();
        assert!(matches!(err, FormatError::Unsupported { .. }), "{err}");
    }

    #[test]
    fn missing_field_is_named() {
        let err = Format::parse(
            "x:y".into(),
            "field:int foo;\toffset:8;\tsize:4;\tsigned:1;",
        )
        .socket_layout()
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "tracepoint x:y lacks field `skaddr` (kernel layout not supported)"
        );
    }
}
