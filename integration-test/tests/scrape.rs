//! The shipped PodMonitor's relabelings, run by a real Prometheus: the agent pod's own
//! `namespace`/`pod`/`container` target labels (which the Prometheus Operator adds to every
//! PodMonitor target) must not land on the workloads' findings, and the series say `node`.
mod support;

use std::{fmt::Write as _, fs, path::Path, thread, time::Duration};

use support::{prometheus::Prometheus, *};

/// `relabelings:` of deploy/podmonitor.yaml, as Prometheus `relabel_configs` entries indented
/// for a job: the Operator copies them after its own, with the keys in snake case.
fn podmonitor_relabel_configs() -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let text = fs::read_to_string(root.join("deploy/podmonitor.yaml")).unwrap();
    let (_, relabelings) = text.split_once("relabelings:\n").expect("relabelings");
    let indent = |line: &str| line.len() - line.trim_start().len();
    let base = relabelings.lines().map(indent).min().expect("entries");
    relabelings
        .lines()
        .filter(|line| !line.trim().is_empty())
        .fold(String::new(), |mut job, line| {
            let line = line
                .replace("sourceLabels:", "source_labels:")
                .replace("targetLabel:", "target_label:");
            let _ = writeln!(job, "      {}", &line[base..]);
            job
        })
}

/// A job scraping `target` with the target labels the Operator gives a PodMonitor target
/// (the agent's own pod), then `relabel`.
fn operator_job(name: &str, target: &str, relabel: &str) -> String {
    format!(
        "  - job_name: {name}\n    scrape_interval: 1s\n    static_configs:\n      \
         - targets: ['{target}']\n        labels:\n          namespace: connwatch\n          \
         pod: connwatch-x7k2p\n          container: connwatch\n          \
         __meta_kubernetes_pod_node_name: node-a\n    relabel_configs:\n{relabel}"
    )
}

#[test]
fn the_podmonitor_keeps_the_agents_pod_off_the_workloads_findings() {
    let addr = format!("127.0.0.1:{}", free_port());
    let daemon = Watch::spawn(&["daemon", "--listen", &addr]);
    // The same scrape twice: as the PodMonitor relabels it, and with no relabeling (what the
    // PodMonitor did before it dropped the agent's labels), which shows the collision.
    let keep_all = "      - action: keep\n        regex: .*\n        source_labels: [job]\n";
    let prometheus = Prometheus::start_jobs(&format!(
        "{}{}",
        operator_job("podmonitor", &addr, &podmonitor_relabel_configs()),
        operator_job("bare", &addr, keep_all)
    ));
    prometheus.wait_for(r#"count(up{job=~"podmonitor|bare"} == 1)"#, 2.0);

    // A host process's idle connection reset by its peer: a finding with no workload.
    // Its own server port: `comm` is this process's name, which its other sockets share.
    let (listener, port) = listen_below_ephemeral();
    let pair = Pair::connect(&listener, "cw-scrape-client");
    let finding = format!(
        r#"kind="peer_reset_idle",comm="{}",remote_port="{port}""#,
        process_comm()
    );
    thread::sleep(Duration::from_millis(1200));
    let _client = pair.reset_from_server();
    let resets = |job: &str| format!(r#"sum(connwatch_resets_total{{job="{job}",{finding}}})"#);
    prometheus.wait_for(&resets("podmonitor"), 1.0);
    prometheus.wait_for(&resets("bare"), 1.0);

    let series = |selector: &str| {
        prometheus
            .instant(&format!(r"connwatch_resets_total{{{finding},{selector}}}"))
            .unwrap()
    };
    // Without the relabelings the host process's finding is put in the agent's namespace.
    assert!(
        !series(r#"job="bare",namespace="connwatch""#).is_empty(),
        "the collision this guards against did not show: the test proves nothing"
    );
    let relabeled = series(r#"job="podmonitor""#);
    assert_eq!(relabeled.len(), 1, "{relabeled:#?}");
    let labels = &relabeled[0]["metric"];
    for agent_label in ["namespace", "pod", "container"] {
        assert!(
            labels.get(agent_label).is_none(),
            "the agent's {agent_label} label is on a host process's finding: {labels}"
        );
    }
    assert!(
        labels
            .as_object()
            .unwrap()
            .keys()
            .all(|name| !name.starts_with("exported_")),
        "{labels}"
    );
    assert_eq!(labels["node"], "node-a", "{labels}");
    drop(daemon);
}
