//! Which container and pod a socket's process runs in, from its cgroup, without API
//! credentials: the container id and pod UID are in the cgroup path every runtime writes,
//! and the kubelet names pod log directories `<namespace>_<pod>_<uid>`.
use std::{
    collections::HashMap,
    fs,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use serde::Serialize;

use crate::bounds::Throttle;

/// Rescans of cgroupfs and the pod log directory are rate-limited to this.
const RESCAN_INTERVAL: Duration = Duration::from_secs(1);
/// How long a complete answer of [`WorkloadResolver::resolve`] is reused: a pid keeps its
/// cgroup and pod, but pids are reused, so not forever.
const RESOLVED_TTL: Duration = Duration::from_secs(10);
/// The kubelet is asked at most this often, with this timeout: it is a fallback.
const KUBELET_INTERVAL: Duration = Duration::from_secs(5);
const KUBELET_TIMEOUT: Duration = Duration::from_secs(2);
/// Caches are dropped whole past this size, so a churning node cannot grow them forever.
const CACHE_LIMIT: usize = 65_536;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Workload {
    /// cgroup v2 path, relative to the hierarchy root.
    pub cgroup: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod_uid: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// The process's name: its thread-group leader's comm (`/proc/<pid>/comm`), where
    /// events carry the calling thread's (`worker-3`). Metrics label by it, so that one
    /// process is one series; absent once the process is gone. Not serialized: JSON keeps
    /// the thread (`comm`) and pid.
    #[serde(skip)]
    pub process: Option<String>,
}

/// Container id and pod UID from a cgroup path, for containerd, CRI-O, Docker and podman
/// with the cgroupfs or systemd driver.
pub fn parse_cgroup_path(path: &str) -> (Option<String>, Option<String>) {
    let mut container = None;
    let mut pod_uid = None;
    for segment in path.split('/') {
        if let Some(uid) = pod_uid_of(segment) {
            pod_uid = Some(uid);
        }
        if let Some(id) = container_id_of(segment) {
            container = Some(id);
        }
    }
    (container, pod_uid)
}

/// `cri-containerd-<id>.scope`, `crio-<id>.scope`, `docker-<id>.scope`, `libpod-<id>.scope`,
/// or a bare `<id>` (cgroupfs driver). conmon's own cgroup is not the container.
fn container_id_of(segment: &str) -> Option<String> {
    let name = segment.strip_suffix(".scope").unwrap_or(segment);
    if name.contains("conmon") {
        return None;
    }
    let id = [
        "cri-containerd-",
        "crio-",
        "docker-",
        "libpod-",
        "containerd-",
    ]
    .iter()
    .find_map(|prefix| name.strip_prefix(prefix))
    .unwrap_or(name);
    (id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit())).then(|| id.to_string())
}

/// `pod<uid>` (cgroupfs) or `kubepods-burstable-pod<uid_with_underscores>.slice` (systemd).
fn pod_uid_of(segment: &str) -> Option<String> {
    let name = segment.strip_suffix(".slice").unwrap_or(segment);
    let start = name.rfind("pod")? + 3;
    let uid = name[start..].replace('_', "-");
    is_uid(&uid).then_some(uid)
}

fn is_uid(text: &str) -> bool {
    let groups: Vec<&str> = text.split('-').collect();
    groups.iter().map(|g| g.len()).eq([8, 4, 4, 4, 12])
        && groups
            .iter()
            .all(|g| g.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// `/var/log/pods/<namespace>_<pod>_<uid>` → (uid, namespace, pod).
pub fn parse_pod_log_dir(name: &str) -> Option<(String, String, String)> {
    let (rest, uid) = name.rsplit_once('_')?;
    let (namespace, pod) = rest.split_once('_')?;
    is_uid(uid).then(|| (uid.to_string(), namespace.to_string(), pod.to_string()))
}

/// Failed kubelet pod lookups, by every resolver of the process (the refresher's and the
/// findings' each have one).
static KUBELET_ERRORS: AtomicU64 = AtomicU64::new(0);

/// Failed kubelet pod lookups so far (`connwatch_refresh_errors_total{source="kubelet"}`).
pub fn kubelet_errors() -> u64 {
    KUBELET_ERRORS.load(Ordering::Relaxed)
}

pub struct WorkloadResolver {
    host_proc: PathBuf,
    /// The cgroup v2 hierarchy root, if one is mounted.
    cgroup_root: Option<PathBuf>,
    pod_logs: PathBuf,
    paths: HashMap<u64, String>,
    pods: HashMap<String, (String, String)>,
    cgroup_scans: Throttle,
    pod_scans: Throttle,
    kubelet_url: Option<String>,
    kubelet_requests: Throttle,
    /// Complete answers, for [`RESOLVED_TTL`]: findings come in bursts from the same
    /// processes, and each answer costs file reads and path parsing.
    resolved: Remembered,
}

/// Complete answers by (cgroup id, pid), each kept [`RESOLVED_TTL`]. Shared, so that the
/// event loop can use an answer without a round trip to the thread that finds them.
#[derive(Clone, Default)]
pub struct Remembered(Arc<Mutex<Answers>>);

/// (cgroup id, pid) → (when found, what).
type Answers = crate::FastMap<(u64, u32), (Instant, Workload)>;

/// The answer for (cgroup id, pid), unless it is older than [`RESOLVED_TTL`].
fn fresh(answers: &Answers, cgroup_id: u64, pid: u32) -> Option<Workload> {
    let (at, workload) = answers.get(&(cgroup_id, pid))?;
    (at.elapsed() < RESOLVED_TTL).then(|| workload.clone())
}

impl Remembered {
    /// The answer for (cgroup id, pid) if one is fresh; `None` also when another thread
    /// holds the table right now (never waits).
    pub fn try_get(&self, cgroup_id: u64, pid: u32) -> Option<Workload> {
        fresh(&*self.0.try_lock().ok()?, cgroup_id, pid)
    }

    fn get(&self, cgroup_id: u64, pid: u32) -> Option<Workload> {
        let table = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        fresh(&table, cgroup_id, pid)
    }

    fn put(&self, cgroup_id: u64, pid: u32, workload: Workload) {
        let mut table = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if table.len() >= CACHE_LIMIT {
            table.clear();
        }
        table.insert((cgroup_id, pid), (Instant::now(), workload));
    }
}

impl WorkloadResolver {
    /// `host_root` is where the host's filesystem is visible (`/` outside a container).
    pub fn new(host_root: &Path, host_proc: PathBuf, pod_logs: Option<PathBuf>) -> Self {
        let cgroup_root = ["sys/fs/cgroup/unified", "sys/fs/cgroup"]
            .iter()
            .map(|dir| host_root.join(dir))
            .find(|dir| dir.join("cgroup.controllers").exists());
        WorkloadResolver {
            host_proc,
            cgroup_root,
            pod_logs: pod_logs.unwrap_or_else(|| host_root.join("var/log/pods")),
            paths: HashMap::new(),
            pods: HashMap::new(),
            cgroup_scans: Throttle::new(RESCAN_INTERVAL),
            pod_scans: Throttle::new(RESCAN_INTERVAL),
            kubelet_url: None,
            kubelet_requests: Throttle::new(KUBELET_INTERVAL),
            resolved: Remembered::default(),
        }
    }

    /// Also ask the kubelet at `url` (its `/pods`) for pods the log directory does not name.
    #[must_use]
    pub fn with_kubelet(mut self, url: Option<String>) -> Self {
        self.kubelet_url = url;
        self
    }

    /// The workload of a socket owned by `pid`, whose owner ran in cgroup `cgroup_id`.
    pub fn resolve(&mut self, cgroup_id: u64, pid: u32) -> Workload {
        if let Some(workload) = self.resolved.get(cgroup_id, pid) {
            return workload;
        }
        let workload = self.resolve_now(cgroup_id, pid);
        // Incomplete answers (no cgroup, or a pod not yet named) are asked again next time.
        let complete =
            workload.cgroup.is_some() && (workload.pod_uid.is_none() || workload.pod.is_some());
        if complete {
            self.resolved.put(cgroup_id, pid, workload.clone());
        }
        workload
    }

    /// Its complete answers, to read from another thread.
    pub fn remembered(&self) -> Remembered {
        self.resolved.clone()
    }

    fn resolve_now(&mut self, cgroup_id: u64, pid: u32) -> Workload {
        let cgroup = self
            .cgroup_path(cgroup_id)
            .or_else(|| self.proc_cgroup(pid));
        let (container, pod_uid) = cgroup.as_deref().map(parse_cgroup_path).unwrap_or_default();
        let (namespace, pod) = pod_uid
            .as_deref()
            .and_then(|uid| self.pod_named(uid))
            .map_or((None, None), |(ns, pod)| (Some(ns), Some(pod)));
        Workload {
            cgroup,
            container,
            pod_uid,
            pod,
            namespace,
            process: self.process_name(pid),
        }
    }

    /// `/proc/<pid>/comm`: the thread-group leader's name, i.e. the process's.
    fn process_name(&self, pid: u32) -> Option<String> {
        if pid == 0 {
            return None;
        }
        let comm = super::process::read_comm(&self.host_proc.join(pid.to_string()));
        (!comm.is_empty()).then_some(comm)
    }

    /// cgroup v2 ids are the inode numbers of the cgroup directories.
    fn cgroup_path(&mut self, id: u64) -> Option<String> {
        if id == 0 {
            return None;
        }
        if let Some(path) = self.paths.get(&id) {
            return Some(path.clone());
        }
        let root = self.cgroup_root.clone()?;
        if !self.cgroup_scans.ready() {
            return None;
        }
        if self.paths.len() > CACHE_LIMIT {
            self.paths.clear();
        }
        let mut pending = vec![root.clone()];
        while let Some(dir) = pending.pop() {
            let Ok(meta) = fs::metadata(&dir) else {
                continue;
            };
            let relative = dir.strip_prefix(&root).unwrap_or(&dir);
            self.paths
                .insert(meta.ino(), format!("/{}", relative.display()));
            if let Ok(entries) = fs::read_dir(&dir) {
                pending.extend(
                    entries
                        .flatten()
                        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                        .map(|e| e.path()),
                );
            }
        }
        self.paths.get(&id).cloned()
    }

    /// The v2 line (`0::/path`) of /proc/<pid>/cgroup, for sockets seen only in snapshots.
    fn proc_cgroup(&self, pid: u32) -> Option<String> {
        if pid == 0 {
            return None;
        }
        let text = fs::read_to_string(self.host_proc.join(pid.to_string()).join("cgroup")).ok()?;
        let v2 = text.lines().find_map(|l| l.strip_prefix("0::"))?;
        Some(v2.to_string())
    }

    fn pod_named(&mut self, uid: &str) -> Option<(String, String)> {
        if let Some(found) = self.pods.get(uid) {
            return Some(found.clone());
        }
        if !self.pod_scans.ready() {
            return None;
        }
        if self.pods.len() > CACHE_LIMIT {
            self.pods.clear();
        }
        if let Ok(entries) = fs::read_dir(&self.pod_logs) {
            for entry in entries.flatten() {
                if let Some((uid, namespace, pod)) =
                    entry.file_name().to_str().and_then(parse_pod_log_dir)
                {
                    self.pods.insert(uid, (namespace, pod));
                }
            }
        }
        if !self.pods.contains_key(uid) {
            self.ask_kubelet();
        }
        self.pods.get(uid).cloned()
    }

    /// Fills the pod cache from the kubelet's pod list; a failure is counted
    /// ([`kubelet_errors`]), and said once.
    fn ask_kubelet(&mut self) {
        let Some(url) = self.kubelet_url.clone() else {
            return;
        };
        if !self.kubelet_requests.ready() {
            return;
        }
        match fetch_pods(&url) {
            Ok(pods) => self.pods.extend(pods),
            Err(err) => {
                if KUBELET_ERRORS.fetch_add(1, Ordering::Relaxed) == 0 {
                    log::warn!(
                        "kubelet pod lookup at {url} failed: {:#} (said once; \
                         connwatch_refresh_errors_total{{source=\"kubelet\"}} counts them)",
                        anyhow::Error::new(err)
                    );
                }
            }
        }
    }
}

/// A pod's UID, and its (namespace, name).
type NamedPod = (String, (String, String));

/// Why the kubelet's pod list could not be had.
#[derive(Debug, thiserror::Error)]
enum KubeletError {
    #[error("GET {url}")]
    Request {
        url: String,
        #[source]
        source: Box<ureq::Error>,
    },
    #[error("the response is not JSON")]
    Json(#[source] serde_json::Error),
    #[error("the response is not a PodList (no `items` array): is --kubelet-url the kubelet's?")]
    NotPodList,
}

/// The pods in a kubelet `GET /pods` (a PodList).
fn fetch_pods(base: &str) -> Result<Vec<NamedPod>, KubeletError> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(KUBELET_TIMEOUT))
        .build()
        .into();
    let url = format!("{}/pods", base.trim_end_matches('/'));
    let request = |source| KubeletError::Request {
        url: url.clone(),
        source: Box::new(source),
    };
    let body = agent
        .get(&url)
        .call()
        .map_err(request)?
        .into_body()
        .read_to_string()
        .map_err(request)?;
    let list: serde_json::Value = serde_json::from_str(&body).map_err(KubeletError::Json)?;
    let items = list["items"].as_array().ok_or(KubeletError::NotPodList)?;
    Ok(items
        .iter()
        .filter_map(|pod| {
            let meta = &pod["metadata"];
            Some((
                meta["uid"].as_str()?.to_string(),
                (
                    meta["namespace"].as_str()?.to_string(),
                    meta["name"].as_str()?.to_string(),
                ),
            ))
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A one-shot HTTP server on loopback answering `body`; returns its base URL.
    fn answering(body: &'static str) -> String {
        use std::io::{Read as _, Write as _};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            let _ = stream.read(&mut [0u8; 4096]);
            let _ = write!(
                stream,
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
        });
        url
    }

    #[test]
    fn kubelet_failures_say_what_went_wrong() {
        let chain = |err: KubeletError| format!("{:#}", anyhow::Error::new(err));
        let not_a_list = fetch_pods(&answering(r#"{"kind":"Status"}"#)).unwrap_err();
        assert!(
            matches!(not_a_list, KubeletError::NotPodList),
            "{not_a_list:?}"
        );
        let not_json = chain(fetch_pods(&answering("<html>")).unwrap_err());
        assert!(
            not_json.starts_with("the response is not JSON: "),
            "{not_json}"
        );
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let base = format!("http://{}", closed.local_addr().unwrap());
        drop(closed);
        let refused = chain(fetch_pods(&base).unwrap_err());
        assert!(
            refused.starts_with(&format!("GET {base}/pods: ")),
            "{refused}"
        );
        let pods = fetch_pods(&answering(
            r#"{"items":[{"metadata":{"uid":"u1","namespace":"shop","name":"api-1"}}]}"#,
        ))
        .unwrap();
        assert_eq!(pods, [("u1".into(), ("shop".into(), "api-1".into()))]);
    }

    const ID: &str = "3f5a6e2b8c1d4e7f9a0b1c2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c0d1e2f";
    const UID: &str = "0b8e4a5c-1d2e-4f3a-9b8c-7d6e5f4a3b2c";

    #[test]
    fn real_world_cgroup_paths() {
        let uid_ = UID.replace('-', "_");
        let cases = [
            // containerd, cgroupfs driver, v2
            (
                format!("/kubepods/burstable/pod{UID}/{ID}"),
                Some(ID),
                Some(UID),
            ),
            // containerd, cgroupfs driver, guaranteed QoS (no QoS level)
            (format!("/kubepods/pod{UID}/{ID}"), Some(ID), Some(UID)),
            // containerd, systemd driver
            (
                format!(
                    "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid_}.slice/cri-containerd-{ID}.scope"
                ),
                Some(ID),
                Some(UID),
            ),
            // containerd, systemd driver, guaranteed
            (
                format!("/kubepods.slice/kubepods-pod{uid_}.slice/cri-containerd-{ID}.scope"),
                Some(ID),
                Some(UID),
            ),
            // CRI-O, systemd driver
            (
                format!(
                    "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{uid_}.slice/crio-{ID}.scope"
                ),
                Some(ID),
                Some(UID),
            ),
            // CRI-O conmon: the pod, but not the container
            (
                format!(
                    "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{uid_}.slice/crio-conmon-{ID}.scope"
                ),
                None,
                Some(UID),
            ),
            // CRI-O, cgroupfs driver
            (
                format!("/kubepods/besteffort/pod{UID}/crio-{ID}"),
                Some(ID),
                Some(UID),
            ),
            // Docker (dockershim), cgroupfs, as in a v1 /proc/<pid>/cgroup memory line
            (
                format!("/kubepods/burstable/pod{UID}/{ID}"),
                Some(ID),
                Some(UID),
            ),
            // Docker outside Kubernetes, systemd driver
            (format!("/system.slice/docker-{ID}.scope"), Some(ID), None),
            // Docker outside Kubernetes, cgroupfs driver (v1)
            (format!("/docker/{ID}"), Some(ID), None),
            // kind / nested kubelet slices
            (
                format!(
                    "/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod{uid_}.slice/cri-containerd-{ID}.scope"
                ),
                Some(ID),
                Some(UID),
            ),
            // podman
            (format!("/machine.slice/libpod-{ID}.scope"), Some(ID), None),
            // plain host processes
            (
                "/user.slice/user-1000.slice/session-3.scope".to_string(),
                None,
                None,
            ),
            ("/system.slice/postgresql.service".to_string(), None, None),
            ("/".to_string(), None, None),
        ];
        for (path, container, pod) in cases {
            assert_eq!(
                parse_cgroup_path(&path),
                (container.map(String::from), pod.map(String::from)),
                "{path}"
            );
        }
    }

    /// The process's name, not the asking thread's: /proc/<pid>/comm is its leader's.
    #[test]
    fn names_the_process_not_the_thread() {
        let own = fs::read_to_string("/proc/self/comm").unwrap();
        let workload = std::thread::Builder::new()
            .name("worker-7".into())
            .spawn(|| {
                let nowhere = Path::new("/nonexistent");
                let mut resolver = WorkloadResolver::new(nowhere, "/proc".into(), None);
                resolver.resolve(0, std::process::id())
            })
            .unwrap()
            .join()
            .unwrap();
        assert_eq!(workload.process.as_deref(), Some(own.trim_end()));
        assert_ne!(workload.process.as_deref(), Some("worker-7"));
        let mut resolver = WorkloadResolver::new(Path::new("/nonexistent"), "/proc".into(), None);
        assert_eq!(resolver.resolve(0, 0).process, None, "no pid, no name");
    }

    #[test]
    fn pod_log_directories() {
        assert_eq!(
            parse_pod_log_dir(&format!("payments_api-7d9f8b6c5-x2x9z_{UID}")),
            Some((UID.into(), "payments".into(), "api-7d9f8b6c5-x2x9z".into()))
        );
        assert_eq!(parse_pod_log_dir("not-a-pod"), None);
        assert_eq!(parse_pod_log_dir("a_b_not-a-uid"), None);
    }

    #[test]
    fn asks_a_kubelet_when_the_log_directory_does_not_know() {
        use std::io::{Read, Write};
        let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", server.local_addr().unwrap());
        let kubelet = std::thread::spawn(move || {
            let (mut stream, _) = server.accept().unwrap();
            let mut request = [0u8; 1024];
            let n = stream.read(&mut request).unwrap();
            assert!(String::from_utf8_lossy(&request[..n]).starts_with("GET /pods "));
            let body = format!(
                r#"{{"kind":"PodList","apiVersion":"v1","items":[{{"metadata":{{"name":"worker-5","namespace":"batch","uid":"{UID}"}}}}]}}"#
            );
            write!(
                stream,
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )
            .unwrap();
        });
        let empty = std::env::temp_dir().join(format!("connwatch-nopods-{}", std::process::id()));
        let mut resolver =
            WorkloadResolver::new(&empty, "/proc".into(), None).with_kubelet(Some(url));
        assert_eq!(
            resolver.pod_named(UID),
            Some(("batch".into(), "worker-5".into()))
        );
        kubelet.join().unwrap();
    }

    #[test]
    fn a_failed_kubelet_lookup_is_counted() {
        // A port nothing listens on: the connection is refused at once.
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", closed.local_addr().unwrap());
        drop(closed);
        let empty =
            std::env::temp_dir().join(format!("connwatch-nokubelet-{}", std::process::id()));
        let before = kubelet_errors();
        let mut resolver =
            WorkloadResolver::new(&empty, "/proc".into(), None).with_kubelet(Some(url));
        assert_eq!(resolver.pod_named(UID), None);
        assert!(kubelet_errors() > before);
    }

    #[test]
    fn names_pods_from_a_fake_kubelet_tree() {
        let root = std::env::temp_dir().join(format!("connwatch-pods-{}", std::process::id()));
        let logs = root.join("var/log/pods");
        fs::create_dir_all(logs.join(format!("shop_checkout-0_{UID}"))).unwrap();
        fs::create_dir_all(logs.join("kube-system_coredns-1_11111111-2222-3333-4444-555555555555"))
            .unwrap();
        let mut resolver = WorkloadResolver::new(&root, "/proc".into(), None);
        assert_eq!(
            resolver.pod_named(UID),
            Some(("shop".into(), "checkout-0".into()))
        );
        assert_eq!(
            resolver.pod_named("99999999-2222-3333-4444-555555555555"),
            None
        );
        fs::remove_dir_all(&root).unwrap();
    }
}
