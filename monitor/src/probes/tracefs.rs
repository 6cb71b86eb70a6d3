//! tracefs: mounting it when missing, and reading tracepoint record layouts from `format`.
use std::{
    collections::HashMap,
    fs,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, anyhow, bail};
use monitor_common::{ABSENT, MAX_RECORD_BYTES, TpLayout};

pub const DEFAULT_TRACEFS: &str = "/sys/kernel/tracing";
const DEBUGFS_TRACING: &str = "/sys/kernel/debug/tracing";

/// Returns a tracefs root with `events/`, mounting tracefs at the default path if needed.
///
/// An explicit `--tracefs` is used as given: it exists for containers with the host's
/// tracefs mounted elsewhere, and for tests that present a kernel lacking a tracepoint.
pub fn locate(explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some(root) = explicit {
        if !root.join("events").is_dir() {
            bail!(
                "{} is not a tracefs mount (no events/ directory): pass the directory where \
                 tracefs is mounted, e.g. --tracefs {DEFAULT_TRACEFS}",
                root.display()
            );
        }
        return Ok(root.to_path_buf());
    }
    for candidate in [DEFAULT_TRACEFS, DEBUGFS_TRACING] {
        match std::fs::metadata(Path::new(candidate).join("events")) {
            Ok(meta) if meta.is_dir() => return Ok(candidate.into()),
            // tracefs is root-only (0700): a non-root user needs the capability to look in.
            Err(err) if err.kind() == std::io::ErrorKind::PermissionDenied => bail!(
                "cannot read tracefs at {candidate} as uid {}: missing capability \
                 CAP_DAC_READ_SEARCH (needed to read tracepoint formats as a non-root user): \
                 run as root or grant it",
                nix::unistd::geteuid()
            ),
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
    .map_err(|errno| {
        anyhow!(
            "tracefs is not mounted and mounting it at {DEFAULT_TRACEFS} failed ({errno}): \
             run `mount -t tracefs tracefs {DEFAULT_TRACEFS}` as root, or mount the host's \
             tracefs into the container"
        )
    })?;
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
        tp.skaddr = self.require("skaddr")?;
        tp.old_state = self.offset(if self.size("oldstate").is_some() {
            "oldstate"
        } else {
            "state"
        });
        tp.new_state = self.offset("newstate");
        tp.protocol = self.offset("protocol");
        tp.cookie = self.offset("sock_cookie");
        tp.reason = self.offset("reason");
        // Since 6.10 tcp_send_reset stores sockaddr_in6-sized unions in saddr/daddr.
        if self.size("saddr") == Some(28) {
            tp.saddr_sockaddr = self.require("saddr")?;
            tp.daddr_sockaddr = self.require("daddr")?;
        } else {
            // Linux 5.10's tcp_event_sk lacks `family`; the kernel program reads the socket's.
            tp.family = self.offset("family");
            tp.sport = self.require("sport")?;
            tp.dport = self.require("dport")?;
            tp.saddr_v6 = self.require("saddr_v6")?;
            tp.daddr_v6 = self.require("daddr_v6")?;
        }
        self.finish(tp)
    }

    /// Layout of `sock:sock_send_length` / `sock:sock_recv_length` (Linux 6.3+).
    pub fn io_layout(&self) -> Result<TpLayout, FormatError> {
        let mut tp = TpLayout::absent();
        tp.skaddr = self.require("sk")?;
        tp.protocol = self.require("protocol")?;
        tp.family = self.require("family")?;
        tp.ret = self.require("ret")?;
        self.finish(tp)
    }

    /// Layout of a syscall exit tracepoint: only `ret`.
    pub fn exit_layout(&self) -> Result<TpLayout, FormatError> {
        let mut tp = TpLayout::absent();
        tp.ret = self.require("ret")?;
        self.finish(tp)
    }

    /// Sets how much of the record the kernel program copies, and checks what it assumes:
    /// the record fits its buffer, and each field is aligned to its size (arrays, which it
    /// copies in 2-byte words, to 2).
    fn finish(&self, mut tp: TpLayout) -> Result<TpLayout, FormatError> {
        let used = [
            tp.skaddr,
            tp.old_state,
            tp.new_state,
            tp.family,
            tp.protocol,
            tp.sport,
            tp.dport,
            tp.saddr_v6,
            tp.daddr_v6,
            tp.saddr_sockaddr,
            tp.daddr_sockaddr,
            tp.cookie,
            tp.reason,
            tp.ret,
        ];
        let mut end = 0;
        for (name, &(offset, size)) in &self.fields {
            if !used.contains(&offset) {
                continue;
            }
            let align = if size > 8 { 2 } else { size };
            if align == 0 || !offset.is_multiple_of(align) {
                return Err(self.unsupported(format!(
                    "field `{name}` at offset {offset} is not {align}-byte aligned"
                )));
            }
            end = end.max(offset + size);
        }
        if end > MAX_RECORD_BYTES {
            return Err(self.unsupported(format!(
                "the fields connwatch reads end at byte {end}, past the {MAX_RECORD_BYTES} \
                 bytes its kernel programs copy"
            )));
        }
        tp.record_size = end;
        Ok(tp)
    }

    fn unsupported(&self, why: String) -> FormatError {
        FormatError::Unsupported {
            tracepoint: self.tracepoint.clone(),
            why,
        }
    }
}

/// `const void * skaddr` → `skaddr`; `__u8 saddr[4]` → `saddr`.
fn field_name(decl: &str) -> Option<&str> {
    let last = decl.split_whitespace().last()?;
    let name = last.split('[').next()?;
    (!name.is_empty()).then_some(name.trim_start_matches('*'))
}

/// Reads a socket tracepoint's layout, turning absence into an actionable error.
pub fn socket_layout(tracefs: &Path, category: &str, name: &str) -> Result<TpLayout> {
    let format = Format::read(tracefs, category, name).map_err(|err| match err {
        FormatError::Missing(tp) => anyhow!(
            "tracepoint {tp} is missing from {}: connwatch needs Linux 5.8 or newer with \
             CONFIG_TRACEPOINTS; check `ls {}/events/{category}/`",
            tracefs.display(),
            tracefs.display()
        ),
        other => anyhow!(other),
    })?;
    format
        .socket_layout()
        .with_context(|| format!("reading {category}:{name}"))
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
