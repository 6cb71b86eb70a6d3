//! Every manifest in deploy/ passes a real schema validator, and the validators catch a
//! broken one. `cargo xtask test` installs them under target/validators.
mod support;

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use support::TempDir;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn validators() -> PathBuf {
    let dir = root().join("target/validators");
    assert!(
        dir.join("venv/bin/kubernetes-validate").exists() && dir.join("node/node_modules").exists(),
        "validators missing: run `cargo xtask test` (or `cargo xtask setup`)"
    );
    dir
}

fn is_operator_manifest(path: &Path) -> bool {
    fs::read_to_string(path)
        .unwrap()
        .contains("apiVersion: monitoring.coreos.com/")
}

/// (passed, output) of the validator for this file.
fn validate(path: &Path) -> (bool, String) {
    let validators = validators();
    let output = if is_operator_manifest(path) {
        Command::new("node")
            .arg(validators.join("node/validate-monitors.mjs"))
            .arg(path)
            .output()
            .unwrap()
    } else {
        Command::new(validators.join("venv/bin/kubernetes-validate"))
            .args(["--strict", "--kubernetes-version", "1.30.0"])
            .arg(path)
            .output()
            .unwrap()
    };
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    // kubernetes-validate only warns on kinds it has no schema for: treat that as failure.
    let unknown = text.contains("Couldn't find schema");
    (output.status.success() && !unknown, text)
}

fn manifests() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(root().join("deploy"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

#[test]
fn every_manifest_is_valid() {
    let files = manifests();
    assert!(files.len() >= 4, "{files:?}");
    for file in files {
        let (passed, output) = validate(&file);
        assert!(passed, "{}:\n{output}", file.display());
    }
}

#[test]
fn validators_reject_broken_manifests() {
    let dir = TempDir::new("deploy");
    for (file, from, to) in [
        ("connwatch.yaml", "hostPID: true", "hostPID: \"yes\""),
        (
            "connwatch.yaml",
            "      hostNetwork: true",
            "      hostNetwork: true\n      hostPIDs: true",
        ),
        ("podmonitor.yaml", "    - port: metrics", "    - port: 9964"),
    ] {
        let text = fs::read_to_string(root().join("deploy").join(file)).unwrap();
        assert!(text.contains(from), "{file} lacks {from}");
        let broken = dir.join(file);
        fs::write(&broken, text.replacen(from, to, 1)).unwrap();
        let (passed, output) = validate(&broken);
        assert!(!passed, "{file} with {to:?} passed:\n{output}");
    }
}

#[test]
fn daemonset_matches_what_connwatch_needs() {
    let daemonset = fs::read_to_string(root().join("deploy/connwatch.yaml")).unwrap();
    for needed in [
        "hostPID: true",
        "path: /healthz",
        "path: /readyz",
        "args: [\"doctor\"]",
        "- daemon",
        "--host-root=/host",
        "- BPF ",
        "- PERFMON ",
        "- SYS_PTRACE ",
        "- DAC_READ_SEARCH ",
        "path: /sys/kernel/tracing",
        "path: /sys/kernel/btf",
        "mountPath: /host/var/log/pods",
        "mountPath: /host/sys/fs/cgroup",
        "prometheus.io/scrape: \"true\"",
        "privileged: false",
    ] {
        assert!(
            daemonset.contains(needed),
            "connwatch.yaml lacks {needed:?}"
        );
    }
    assert!(!daemonset.contains("privileged: true"));
    // connwatch pins nothing: a bpffs mount would be write access to the node's pinned
    // programs and maps for no use.
    assert!(
        !daemonset.contains("/sys/fs/bpf"),
        "connwatch.yaml mounts bpffs"
    );
}

/// Each node is one target: the pods carry the scrape annotations and the Service does not
/// (annotation-based configs would scrape both); the Operator monitors drop the agent's own
/// namespace/pod/container target labels, which would rename the workload's to exported_*.
#[test]
fn every_node_is_scraped_once_with_the_workload_labels_intact() {
    let manifest = fs::read_to_string(root().join("deploy/connwatch.yaml")).unwrap();
    let annotated: Vec<&str> = manifest
        .split("\n---\n")
        .filter(|document| document.contains("prometheus.io/scrape"))
        .collect();
    assert_eq!(annotated.len(), 1, "annotated twice");
    assert!(annotated[0].contains("kind: DaemonSet"), "{}", annotated[0]);
    for monitor in ["deploy/podmonitor.yaml", "deploy/servicemonitor.yaml"] {
        let text = fs::read_to_string(root().join(monitor)).unwrap();
        assert!(
            text.contains("action: labeldrop") && text.contains("regex: namespace|pod|container"),
            "{monitor} keeps the agent's namespace/pod/container target labels"
        );
    }
}

/// Every manifest runs the release the workspace builds: a version tag, never `latest`.
#[test]
fn manifests_run_this_release() {
    let tag = format!("ghcr.io/connwatch/connwatch:{}", env!("CARGO_PKG_VERSION"));
    for manifest in ["deploy/connwatch.yaml", "deploy/privileged.yaml"] {
        let text = fs::read_to_string(root().join(manifest)).unwrap();
        let images: Vec<&str> = text
            .lines()
            .filter_map(|line| line.trim().strip_prefix("image: "))
            .collect();
        assert!(images.len() >= 2, "{manifest}: {images:?}");
        for image in images {
            assert_eq!(image, tag, "{manifest} runs another image");
        }
    }
}

/// /metrics has no authentication: under hostNetwork, 0.0.0.0 would serve it on every
/// address of the node. Both manifests bind the node's IP, from the downward API.
#[test]
fn manifests_serve_metrics_on_the_node_ip_only() {
    for manifest in ["deploy/connwatch.yaml", "deploy/privileged.yaml"] {
        let text = fs::read_to_string(root().join(manifest)).unwrap();
        assert!(
            text.contains("--listen=$(HOST_IP):9964") && text.contains("fieldPath: status.hostIP"),
            "{manifest} does not bind the node IP"
        );
        assert!(
            !text.contains("--listen=0.0.0.0"),
            "{manifest} listens on every address"
        );
    }
}

/// (passed, output) of `promtool <args>` run in deploy/alerts (or `dir`).
fn promtool(dir: &Path, args: &[&str]) -> (bool, String) {
    let output = Command::new("promtool")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("promtool (Debian's prometheus package: `cargo xtask test` installs it)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

#[test]
fn alert_rules_pass_their_unit_tests() {
    let alerts = root().join("deploy/alerts");
    let (passed, output) = promtool(&alerts, &["check", "rules", "connwatch.rules.yaml"]);
    assert!(passed, "{output}");
    let (passed, output) = promtool(&alerts, &["test", "rules", "connwatch.rules.test.yaml"]);
    assert!(passed, "{output}");
}

/// Each rule's tests catch a broken expression: a misspelt metric, a dropped clause.
#[test]
fn a_broken_rule_fails_its_unit_tests() {
    let alerts = root().join("deploy/alerts");
    let rules = fs::read_to_string(alerts.join("connwatch.rules.yaml")).unwrap();
    let tests = fs::read_to_string(alerts.join("connwatch.rules.test.yaml")).unwrap();
    let dir = TempDir::new("rules");
    fs::write(dir.join("connwatch.rules.test.yaml"), tests).unwrap();
    let idle = rules.find("alert: ConnwatchIdleConnectionsReset").unwrap();
    let or = idle + rules[idle..].find("          or\n").unwrap();
    let labels = idle + rules[idle..].find("        labels:").unwrap();
    for (what, broken) in [
        (
            "a misspelt metric",
            rules.replacen("connwatch_pool_exhausted", "connwatch_pool_exhaustion", 1),
        ),
        ("a wrong threshold", rules.replacen("== 0", "== 1", 1)),
        (
            "no clause for a new label set",
            format!("{}{}", &rules[..or], &rules[labels..]),
        ),
    ] {
        fs::write(dir.join("connwatch.rules.yaml"), &broken).unwrap();
        let (passed, output) =
            promtool(dir.path(), &["test", "rules", "connwatch.rules.test.yaml"]);
        assert!(!passed, "the rule tests pass with {what}:\n{output}");
    }
}

/// deploy/prometheusrule.yaml is the plain rules file under `spec:`, word for word.
#[test]
fn the_prometheusrule_is_the_rules_file() {
    let rules = fs::read_to_string(root().join("deploy/alerts/connwatch.rules.yaml")).unwrap();
    let groups = &rules[rules.find("groups:").unwrap()..];
    let resource = fs::read_to_string(root().join("deploy/prometheusrule.yaml")).unwrap();
    let spec = &resource[resource.find("\nspec:\n").unwrap() + "\nspec:\n".len()..];
    let unindented: String = spec
        .lines()
        .flat_map(|line| [line.strip_prefix("  ").unwrap_or(line), "\n"])
        .collect();
    assert_eq!(
        unindented, groups,
        "deploy/prometheusrule.yaml differs from deploy/alerts/connwatch.rules.yaml: copy the \
         groups under `spec:`, indented by two spaces"
    );
}
