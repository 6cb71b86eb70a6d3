//! The daemon's own CPU time, resident memory and open descriptors, in the standard
//! `process_*` names Prometheus client libraries use: dashboards and alerts written for
//! any exporter read them unchanged. Read from /proc at scrape time, so they cost nothing
//! between scrapes.
use std::{fs, path::PathBuf};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{counter::ConstCounter, gauge::ConstGauge},
};

#[derive(Debug, thiserror::Error)]
pub enum ProcError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} has no field {field} (`{text}`)")]
    Field {
        path: &'static str,
        field: &'static str,
        text: String,
    },
    #[error("sysconf({0}) is not available")]
    Sysconf(&'static str),
}

/// Encodes `process_cpu_seconds_total`, `process_resident_memory_bytes` and
/// `process_open_fds` for the process whose /proc directory is `dir` (/proc/self).
#[derive(Debug)]
pub struct ProcessCollector {
    dir: PathBuf,
}

impl Default for ProcessCollector {
    fn default() -> Self {
        ProcessCollector {
            dir: PathBuf::from("/proc/self"),
        }
    }
}

impl ProcessCollector {
    fn read(&self, name: &str) -> Result<String, ProcError> {
        let path = self.dir.join(name);
        fs::read_to_string(&path).map_err(|source| ProcError::Read {
            path: path.display().to_string(),
            source,
        })
    }

    #[expect(
        clippy::cast_precision_loss,
        reason = "seconds as an f64 (Prometheus' type): exact below 2^52 ticks, 10^6 years \
                  of CPU at 100 Hz"
    )]
    fn cpu_seconds(&self) -> Result<f64, ProcError> {
        let ticks = cpu_ticks(&self.read("stat")?)?;
        Ok(ticks as f64 / sysconf(nix::unistd::SysconfVar::CLK_TCK, "CLK_TCK")? as f64)
    }

    fn resident_bytes(&self) -> Result<u64, ProcError> {
        let pages = resident_pages(&self.read("statm")?)?;
        Ok(pages * sysconf(nix::unistd::SysconfVar::PAGE_SIZE, "PAGE_SIZE")?)
    }

    fn open_fds(&self) -> Result<u64, ProcError> {
        let path = self.dir.join("fd");
        let read_error = |source| ProcError::Read {
            path: path.display().to_string(),
            source,
        };
        // The count includes the descriptor of the listing itself, as client_golang's does.
        Ok(fs::read_dir(&path).map_err(read_error)?.count() as u64)
    }
}

fn sysconf(var: nix::unistd::SysconfVar, name: &'static str) -> Result<u64, ProcError> {
    match nix::unistd::sysconf(var) {
        Ok(Some(value)) if value > 0 => u64::try_from(value).map_err(|_| ProcError::Sysconf(name)),
        _ => Err(ProcError::Sysconf(name)),
    }
}

/// utime + stime (fields 14 and 15 of /proc/PID/stat), in clock ticks. The command name
/// (field 2) can hold spaces and parentheses, so fields are counted after its last `)`.
fn cpu_ticks(stat: &str) -> Result<u64, ProcError> {
    let field = |field: &'static str, index: usize| {
        stat.rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(index))
            .and_then(|value| value.parse::<u64>().ok())
            .ok_or_else(|| ProcError::Field {
                path: "stat",
                field,
                text: stat.trim_end().to_string(),
            })
    };
    // After the `)`: state is index 0 (field 3), so field N is index N - 3.
    Ok(field("utime", 11)? + field("stime", 12)?)
}

/// The resident set (second field of /proc/PID/statm), in pages.
fn resident_pages(statm: &str) -> Result<u64, ProcError> {
    statm
        .split_whitespace()
        .nth(1)
        .and_then(|value| value.parse().ok())
        .ok_or_else(|| ProcError::Field {
            path: "statm",
            field: "resident",
            text: statm.trim_end().to_string(),
        })
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let cpu = self.cpu_seconds().map(ConstCounter::new);
        let rss = self
            .resident_bytes()
            .map(|b| ConstGauge::new(i64::try_from(b).unwrap_or(i64::MAX)));
        let fds = self
            .open_fds()
            .map(|n| ConstGauge::new(i64::try_from(n).unwrap_or(i64::MAX)));
        encode_one(
            &mut encoder,
            "process_cpu_seconds",
            "Total user and system CPU time spent in seconds",
            cpu,
        )?;
        encode_one(
            &mut encoder,
            "process_resident_memory_bytes",
            "Resident memory size in bytes",
            rss,
        )?;
        encode_one(
            &mut encoder,
            "process_open_fds",
            "Number of open file descriptors",
            fds,
        )
    }
}

/// A value that could not be read is left out of this scrape (said at debug level); the
/// scrape never fails for it.
fn encode_one(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: Result<impl EncodeMetric, ProcError>,
) -> std::fmt::Result {
    match value {
        Ok(metric) => {
            metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)
        }
        Err(err) => {
            log::debug!("{name} left out of this scrape: {err}");
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use prometheus_client::{encoding::text::encode, registry::Registry};

    use super::*;

    #[test]
    fn parses_cpu_ticks_after_a_command_with_spaces_and_parens() {
        let stat = "4242 (conn (watch) x) S 1 4242 4242 0 -1 4194560 900 0 0 0 \
                    125 37 0 0 20 0 9 0 1000 123456789 2048 18446744073709551615";
        assert_eq!(cpu_ticks(stat).unwrap(), 162);
    }

    #[test]
    fn a_short_or_garbled_stat_is_an_error_not_a_panic() {
        for stat in [
            "",
            "42 (x) S 1 2",
            "42 x S 1 2 3 4 5 6 7 8 9 10 11 12 13",
            "42 (x) S 1 2 3 4 5 6 7 8 nine 11 12",
        ] {
            let err = cpu_ticks(stat).unwrap_err();
            assert!(err.to_string().contains("stat has no field"), "{err}");
        }
    }

    #[test]
    fn parses_resident_pages() {
        assert_eq!(
            resident_pages("5327 1210 800 260 0 1500 0\n").unwrap(),
            1210
        );
        assert!(resident_pages("5327").is_err());
        assert!(resident_pages("5327 -1").is_err());
    }

    #[test]
    fn encodes_this_processs_figures() {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(ProcessCollector::default()));
        let mut text = String::new();
        encode(&mut text, &registry).unwrap();
        for line in [
            "# TYPE process_cpu_seconds counter",
            "process_cpu_seconds_total ",
            "# TYPE process_resident_memory_bytes gauge",
            "process_open_fds ",
        ] {
            assert!(text.contains(line), "{line} in {text}");
        }
        let rss: f64 = text
            .lines()
            .find_map(|l| l.strip_prefix("process_resident_memory_bytes "))
            .unwrap()
            .parse()
            .unwrap();
        assert!(
            rss > 1_000_000.0,
            "a test binary has more than 1 MB resident: {rss}"
        );
    }

    #[test]
    fn an_unreadable_proc_leaves_the_figures_out() {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(ProcessCollector {
            dir: PathBuf::from("/nonexistent/connwatch"),
        }));
        let mut text = String::new();
        encode(&mut text, &registry).unwrap();
        assert!(!text.contains("process_"), "{text}");
    }
}
