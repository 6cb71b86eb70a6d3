//! A real Prometheus server (Debian's `prometheus`) scraping connwatch, for the tests that
//! read the daemon's metrics the way users do: through PromQL.
use std::{
    fs,
    path::PathBuf,
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;

use super::{agent, free_port};

/// A Prometheus server scraping `target` every second and evaluating the shipped alerting
/// rules (deploy/alerts) every second, in a temp dir; killed on drop (a failing test too).
pub struct Prometheus {
    child: Child,
    url: String,
    /// Removed on drop, after the server has stopped (fields drop after `drop` runs).
    dir: super::TempDir,
}

/// deploy/alerts/connwatch.rules.yaml: `ALERTS` shows what they fire on.
fn shipped_rules() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/alerts/connwatch.rules.yaml")
}

impl Prometheus {
    pub fn start(target: &str) -> Prometheus {
        Prometheus::start_jobs(&format!(
            "  - job_name: connwatch\n    scrape_interval: 1s\n    \
             static_configs:\n      - targets: ['{target}']\n"
        ))
    }

    /// A Prometheus server with these `scrape_configs` entries (YAML, indented two spaces).
    pub fn start_jobs(jobs: &str) -> Prometheus {
        let dir = super::TempDir::new("prometheus");
        let config = dir.join("prometheus.yml");
        fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
                 rule_files:\n  - {rules}\n\
                 scrape_configs:\n{jobs}",
                rules = shipped_rules().display(),
            ),
        )
        .unwrap();
        let listen = format!("127.0.0.1:{}", free_port());
        let log = fs::File::create(dir.join("prometheus.log")).unwrap();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={listen}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("prometheus is installed (cargo xtask test installs it)");
        Prometheus {
            child,
            url: format!("http://{listen}"),
            dir,
        }
    }

    /// The result vector of an instant query; Err with Prometheus's own error (a query that
    /// does not parse), or with what went wrong reaching it.
    pub fn instant(&self, promql: &str) -> Result<Vec<Value>, String> {
        let response = agent()
            .get(format!("{}/api/v1/query", self.url))
            .query("query", promql)
            .call()
            .map_err(|err| format!("GET /api/v1/query: {err}"))?;
        let body = response
            .into_body()
            .read_to_string()
            .map_err(|err| format!("reading the answer: {err}"))?;
        let body: Value = serde_json::from_str(&body).map_err(|err| format!("{err}: {body}"))?;
        if body["status"] != "success" {
            return Err(format!("{}: {}", body["errorType"], body["error"]));
        }
        Ok(body["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default())
    }

    /// The single value of an instant query, or None while it has no result.
    pub fn query(&self, promql: &str) -> Option<f64> {
        self.instant(promql).ok()?.first()?["value"][1]
            .as_str()?
            .parse()
            .ok()
    }

    /// Polls `promql` until it equals `want`; panics with the last value and the log.
    pub fn wait_for(&self, promql: &str, want: f64) {
        let deadline = Instant::now() + Duration::from_secs(40);
        let mut last = None;
        while Instant::now() < deadline {
            last = self.query(promql);
            if last == Some(want) {
                return;
            }
            thread::sleep(Duration::from_millis(250));
        }
        panic!(
            "{promql} = {last:?}, want {want}; prometheus log:\n{}",
            self.log()
        );
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
