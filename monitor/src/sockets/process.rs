//! Socket inode → process, through /proc: the fallback for sockets whose owner the kernel
//! programs never saw (opened before connwatch started, or accepted without accept()).
use std::{collections::BTreeMap, fs, path::PathBuf, time::Duration};

use crate::bounds::Throttle;
use crate::{FastMap, events::Task};

/// A whole-/proc scan costs one readlink per open fd on the host, so rescan at most this often.
const RESCAN_INTERVAL: Duration = Duration::from_secs(1);

/// At most this many network namespaces are listed (a node runs a few hundred pods).
pub const MAX_NAMESPACES: usize = 4096;

pub struct ProcIndex {
    proc_root: PathBuf,
    by_inode: FastMap<u64, Task>,
    /// Network namespace inode → a process in it (the lowest pid), from the last scan.
    namespaces: BTreeMap<u64, u32>,
    rescans: Throttle,
}

impl ProcIndex {
    pub fn new(proc_root: PathBuf) -> ProcIndex {
        ProcIndex {
            proc_root,
            by_inode: FastMap::default(),
            namespaces: BTreeMap::new(),
            rescans: Throttle::new(RESCAN_INTERVAL),
        }
    }

    pub fn proc_root(&self) -> &std::path::Path {
        &self.proc_root
    }

    /// Every network namespace a process is in, with one such process: rescans /proc when
    /// the last scan is old enough (rate-limited).
    pub fn network_namespaces(&mut self) -> BTreeMap<u64, u32> {
        if self.rescans.ready() {
            self.rescan();
        }
        self.namespaces.clone()
    }

    /// The process holding socket `inode`, rescanning /proc on a miss (rate-limited).
    pub fn owner_of(&mut self, inode: u64) -> Option<Task> {
        if inode == 0 {
            return None;
        }
        if let Some(task) = self.by_inode.get(&inode) {
            return Some(task.clone());
        }
        if self.rescans.ready() {
            self.rescan();
        }
        self.by_inode.get(&inode).cloned()
    }

    /// The process holding socket `inode` as of the last scan: no /proc access, for the
    /// event loop.
    pub fn cached(&self, inode: u64) -> Option<Task> {
        self.by_inode.get(&inode).cloned()
    }

    fn rescan(&mut self) {
        self.by_inode.clear();
        self.namespaces.clear();
        let Ok(entries) = fs::read_dir(&self.proc_root) else {
            return;
        };
        for entry in entries.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            // Processes exit while we read: every failure below just skips that process.
            if let Some(netns) = fs::read_link(entry.path().join("ns/net"))
                .ok()
                .and_then(|target| namespace_inode(target.to_str()?))
                && (self.namespaces.len() < MAX_NAMESPACES || self.namespaces.contains_key(&netns))
            {
                let first = self.namespaces.entry(netns).or_insert(pid);
                *first = (*first).min(pid);
            }
            let Ok(fds) = fs::read_dir(entry.path().join("fd")) else {
                continue;
            };
            let mut comm = None;
            for fd in fds.flatten() {
                let Some(inode) = fs::read_link(fd.path())
                    .ok()
                    .and_then(|target| socket_inode(target.to_str()?))
                else {
                    continue;
                };
                let comm = comm.get_or_insert_with(|| read_comm(&entry.path()));
                self.by_inode.entry(inode).or_insert_with(|| Task {
                    pid,
                    tid: pid,
                    comm: comm.as_str().into(),
                });
            }
        }
    }
}

/// Refuses a `--host-proc` that is not a proc filesystem: with an empty or missing one,
/// every socket opened before connwatch started would go unattributed, silently.
pub fn check_proc_root(root: &std::path::Path) -> Result<(), String> {
    let entries = fs::read_dir(root).map_err(|err| {
        format!(
            "--host-proc {}: {err}: point it at the host's /proc (in a container, mounted \
             from the host, e.g. /host/proc)",
            root.display()
        )
    })?;
    let has_processes = entries.flatten().any(|entry| {
        entry
            .file_name()
            .to_str()
            .is_some_and(|n| n.parse::<u32>().is_ok())
    });
    if !has_processes || !root.join("net/tcp").exists() {
        return Err(format!(
            "--host-proc {} is not a proc filesystem (no process directories or net/tcp): \
             point it at the host's /proc (in a container, mounted from the host, e.g. \
             /host/proc)",
            root.display()
        ));
    }
    Ok(())
}

/// A process's name (its thread-group leader's comm), empty once it is gone.
pub fn read_comm(process_dir: &std::path::Path) -> String {
    fs::read_to_string(process_dir.join("comm"))
        .map(|comm| comm.trim_end().to_string())
        .unwrap_or_default()
}

/// `net:[4026531840]` → 4026531840.
pub fn namespace_inode(link: &str) -> Option<u64> {
    link.strip_prefix("net:[")?.strip_suffix(']')?.parse().ok()
}

/// `socket:[12345]` → 12345.
fn socket_inode(link: &str) -> Option<u64> {
    link.strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_socket_links() {
        assert_eq!(socket_inode("socket:[12345]"), Some(12345));
        assert_eq!(socket_inode("pipe:[12345]"), None);
        assert_eq!(socket_inode("/dev/null"), None);
        assert_eq!(namespace_inode("net:[4026531840]"), Some(4_026_531_840));
        assert_eq!(namespace_inode("socket:[1]"), None);
    }

    /// Processes exit while /proc is read: missing fd dirs, dangling links, odd entries.
    #[test]
    fn survives_a_proc_that_changes_under_it() {
        use std::os::unix::fs::symlink;
        let root = std::env::temp_dir().join(format!("connwatch-fakeproc-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        fs::create_dir_all(root.join("100/fd")).unwrap();
        fs::write(root.join("100/comm"), "postgres\n").unwrap();
        symlink("socket:[4242]", root.join("100/fd/3")).unwrap();
        symlink("/gone/file", root.join("100/fd/4")).unwrap();
        fs::create_dir_all(root.join("200")).unwrap(); // exited: no fd directory
        fs::create_dir_all(root.join("300/fd")).unwrap(); // exited: no comm file
        symlink("socket:[77]", root.join("300/fd/9")).unwrap();
        fs::create_dir_all(root.join("self")).unwrap();
        fs::write(root.join("uptime"), "1 1").unwrap();
        let mut index = ProcIndex::new(root.clone());
        let owner = index.owner_of(4242).unwrap();
        assert_eq!((owner.pid, &*owner.comm), (100, "postgres"));
        assert_eq!(index.owner_of(77).map(|t| t.pid), Some(300));
        assert_eq!(index.owner_of(12345), None);
        assert_eq!(
            index.cached(4242).map(|t| t.pid),
            Some(100),
            "kept from the scan"
        );
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn a_host_proc_that_is_not_proc_is_refused() {
        assert_eq!(check_proc_root(std::path::Path::new("/proc")), Ok(()));
        let empty = std::env::temp_dir().join(format!("connwatch-empty-{}", std::process::id()));
        fs::create_dir_all(&empty).unwrap();
        let err = check_proc_root(&empty).unwrap_err();
        assert!(err.contains("is not a proc filesystem"), "{err}");
        fs::remove_dir_all(&empty).unwrap();
        let err = check_proc_root(&empty).unwrap_err();
        assert!(err.contains("No such file"), "{err}");
    }

    #[test]
    fn finds_own_socket() {
        use std::os::unix::fs::MetadataExt;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let fd = std::os::fd::AsRawFd::as_raw_fd(&listener);
        let inode = fs::metadata(format!("/proc/self/fd/{fd}")).unwrap().ino();
        let mut index = ProcIndex::new("/proc".into());
        let task = index.owner_of(inode).expect("own socket found");
        assert_eq!(task.pid, std::process::id());
        assert_eq!(index.owner_of(0), None);
    }
}
