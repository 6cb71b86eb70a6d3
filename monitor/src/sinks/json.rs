//! NDJSON: one object per line, for `jq` and log shippers.
use std::io::Write;

use serde::Serialize;
use serde_json::json;

use super::{Loss, Report, Sink};

pub struct JsonSink<W: Write> {
    out: W,
}

impl<W: Write> JsonSink<W> {
    pub fn new(out: W) -> Self {
        JsonSink { out }
    }

    /// Writes `record` as one line (findings, losses, the daemon's log summaries).
    pub fn record(&mut self, record: &impl Serialize) -> std::io::Result<()> {
        serde_json::to_writer(&mut self.out, record)?;
        self.out.write_all(b"\n")?;
        self.out.flush()
    }
}

impl<W: Write> Sink for JsonSink<W> {
    fn finding(&mut self, report: &Report) -> std::io::Result<u64> {
        self.record(report)?;
        Ok(1)
    }

    fn lost(&mut self, loss: &Loss) -> std::io::Result<()> {
        self.record(&json!({
            "ts": humantime::format_rfc3339_micros(loss.at).to_string(),
            "kind": "events_lost",
            "count": loss.count,
            "total": loss.total,
            "within_filter": loss.within,
        }))
    }
}
