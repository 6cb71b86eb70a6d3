//! The offsets handed to the eBPF programs are this kernel's: resolved from its BTF, and
//! equal to what an independent reader (bpftool) finds there.
use std::{collections::HashMap, path::Path, process::Command};

use monitor::probes::btf::{DEFAULT_BTF, KernelBtf};

/// bpftool's view of the kernel's structs: by id, and the first id of each name.
struct Dump {
    /// type id → member name → (byte offset, member type id)
    by_id: HashMap<u32, HashMap<String, (u32, u32)>>,
    by_name: HashMap<String, u32>,
    /// typedef id → the type it names (`possible_net_t` → its struct).
    typedefs: HashMap<u32, u32>,
}

impl Dump {
    /// Parses `bpftool btf dump file ... format raw`.
    fn load() -> Dump {
        let output = Command::new("bpftool")
            .args(["btf", "dump", "file", DEFAULT_BTF, "format", "raw"])
            .output()
            .expect("bpftool is installed (cargo xtask test installs it)");
        assert!(output.status.success());
        let text = String::from_utf8(output.stdout).unwrap();
        let mut dump = Dump {
            by_id: HashMap::new(),
            by_name: HashMap::new(),
            typedefs: HashMap::new(),
        };
        let mut current = None;
        for line in text.lines() {
            if !line.starts_with('\t') {
                // [9509] STRUCT 'fdtable' size=56 vlen=6
                current = None;
                let Some((id, rest)) = line.strip_prefix('[').and_then(|l| l.split_once("] "))
                else {
                    continue;
                };
                // [3137] TYPEDEF 'possible_net_t' type_id=3136
                if rest.starts_with("TYPEDEF '")
                    && let Some(target) = rest.split_once("type_id=")
                {
                    dump.typedefs
                        .insert(id.parse().unwrap(), target.1.trim().parse().unwrap());
                    continue;
                }
                let Some(rest) = rest
                    .strip_prefix("STRUCT '")
                    .or_else(|| rest.strip_prefix("UNION '"))
                else {
                    continue;
                };
                let id: u32 = id.parse().unwrap();
                let name = rest.split_once('\'').unwrap().0;
                dump.by_name.entry(name.to_string()).or_insert(id);
                dump.by_id.insert(id, HashMap::new());
                current = Some(id);
                continue;
            }
            // 	'max_fds' type_id=9 bits_offset=0
            let Some(id) = current else { continue };
            let Some((member, rest)) = line
                .trim()
                .strip_prefix('\'')
                .and_then(|l| l.split_once('\''))
            else {
                continue;
            };
            let word = |key: &str| -> u32 {
                rest.split_whitespace()
                    .find_map(|w| w.strip_prefix(key))
                    .unwrap()
                    .parse()
                    .unwrap()
            };
            let entry = (word("bits_offset=") / 8, word("type_id="));
            let members = dump.by_id.get_mut(&id).unwrap();
            // Anonymous unions and structs each get a key of their own.
            let key = if member == "(anon)" {
                format!("(anon){}", members.len())
            } else {
                member.to_string()
            };
            members.insert(key, entry);
        }
        dump
    }

    /// Byte offset of `path` inside struct `outer`, following member type ids and looking
    /// inside anonymous unions and structs on the way.
    fn offset(&self, outer: &str, path: &[&str]) -> u32 {
        let mut id = self.by_name[outer];
        let mut offset = 0;
        for member in path {
            let (at, type_id) = self
                .find(id, member)
                .unwrap_or_else(|| panic!("bpftool shows no {outer}.{}", path.join(".")));
            offset += at;
            id = type_id;
            while let Some(&named) = self.typedefs.get(&id) {
                id = named;
            }
        }
        offset
    }

    fn find(&self, id: u32, member: &str) -> Option<(u32, u32)> {
        let members = self.by_id.get(&id)?;
        if let Some(&found) = members.get(member) {
            return Some(found);
        }
        members
            .iter()
            .filter(|(name, _)| name.starts_with("(anon)"))
            .find_map(|(_, &(at, anon))| self.find(anon, member).map(|(off, ty)| (at + off, ty)))
    }
}

#[test]
fn offsets_match_bpftool_for_this_kernel() {
    let btf = KernelBtf::open(Path::new(DEFAULT_BTF)).unwrap();
    let layout = btf.kernel_layout(250).unwrap();
    let dump = Dump::load();
    assert_eq!(layout.tcp_lsndtime, dump.offset("tcp_sock", &["lsndtime"]));
    assert_eq!(
        layout.tcp_lrcvtime,
        dump.offset("tcp_sock", &["inet_conn", "icsk_ack", "lrcvtime"])
    );
    assert_eq!(
        layout.sk_state,
        dump.offset("sock", &["__sk_common", "skc_state"])
    );
    assert_eq!(
        layout.sk_family,
        dump.offset("sock", &["__sk_common", "skc_family"])
    );
    assert_eq!(layout.sk_socket, dump.offset("sock", &["sk_socket"]));
    assert_eq!(layout.sk_protocol, dump.offset("sock", &["sk_protocol"]));
    assert_eq!(layout.task_files, dump.offset("task_struct", &["files"]));
    assert_eq!(layout.files_fdt, dump.offset("files_struct", &["fdt"]));
    assert_eq!(layout.fdt_max_fds, dump.offset("fdtable", &["max_fds"]));
    assert_eq!(layout.fdt_fd, dump.offset("fdtable", &["fd"]));
    assert_eq!(layout.socket_sk, dump.offset("socket", &["sk"]));
    assert_eq!(layout.sk_err, dump.offset("sock", &["sk_err"]));
    assert_eq!(
        layout.sk_lingertime,
        dump.offset("sock", &["sk_lingertime"])
    );
    // The 4-tuple the typed inet_sock_set_state reads, inside anonymous unions.
    for (offset, member) in [
        (layout.sk_daddr, "skc_daddr"),
        (layout.sk_dport, "skc_dport"),
        (layout.sk_v6_daddr, "skc_v6_daddr"),
        (layout.sk_v6_rcv_saddr, "skc_v6_rcv_saddr"),
    ] {
        assert_eq!(
            offset,
            dump.offset("sock", &["__sk_common", member]),
            "{member}"
        );
    }
    // The local end, where the tracepoint's record takes it from.
    assert_eq!(layout.inet_saddr, dump.offset("inet_sock", &["inet_saddr"]));
    assert_eq!(layout.inet_sport, dump.offset("inet_sock", &["inet_sport"]));
    // In sock_common since Linux 6.x; in sock itself on 5.10.
    let in_common = dump
        .find(dump.by_name["sock_common"], "skc_flags")
        .is_some();
    let sk_flags = if in_common {
        dump.offset("sock", &["__sk_common", "skc_flags"])
    } else {
        dump.offset("sock", &["sk_flags"])
    };
    assert_eq!(layout.sk_flags, sk_flags);
    // The namespace every event carries.
    assert_eq!(
        layout.sk_net,
        dump.offset("sock", &["__sk_common", "skc_net", "net"])
    );
    assert_eq!(layout.net_inum, dump.offset("net", &["ns", "inum"]));
    // Following an accepted fd to its socket, and a socket to its inode number.
    assert_eq!(
        layout.file_private_data,
        dump.offset("file", &["private_data"])
    );
    assert_eq!(
        i64::from(layout.socket_ino),
        i64::from(dump.offset("socket_alloc", &["vfs_inode", "i_ino"]))
            - i64::from(dump.offset("socket_alloc", &["socket"]))
    );
    // Every offset is checked above: a field added to KernelLayout fails to compile here
    // until it is checked too.
    let monitor_common::KernelLayout {
        hz: _,
        sk_state: _,
        sk_family: _,
        sk_protocol: _,
        sk_socket: _,
        socket_ino: _,
        tcp_lsndtime: _,
        tcp_lrcvtime: _,
        task_files: _,
        files_fdt: _,
        fdt_max_fds: _,
        fdt_fd: _,
        file_private_data: _,
        socket_sk: _,
        sk_err: _,
        sk_flags: _,
        sk_lingertime: _,
        sk_daddr: _,
        inet_saddr: _,
        sk_dport: _,
        inet_sport: _,
        sk_v6_daddr: _,
        sk_v6_rcv_saddr: _,
        sk_net: _,
        net_inum: _,
    } = layout;
}

#[test]
fn nested_paths_and_bad_names() {
    let btf = KernelBtf::open(Path::new(DEFAULT_BTF)).unwrap();
    let state = btf.field("sock", &["__sk_common", "skc_state"]).unwrap();
    assert_eq!(state.size, Some(1));
    let err = btf.field("sock", &["no_such_member"]).unwrap_err();
    assert!(err.to_string().contains("sock.no_such_member"), "{err:#}");
    let err = btf.field("no_such_struct", &["x"]).unwrap_err();
    assert!(format!("{err:#}").contains("no_such_struct"), "{err:#}");
}
