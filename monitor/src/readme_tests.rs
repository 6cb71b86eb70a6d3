//! README.md against the code: each command's flags, and `watch --json`'s fields. The
//! README is what operators read; these fail when a flag or a field changes without it.
//! (`top`'s table and JSON are checked in `top.rs`, `watch`'s samples in `sinks/cli.rs`.)
use std::collections::BTreeSet;

use clap::CommandFactory;

use crate::{
    cli::Cli,
    sinks::{Report, Sink as _},
    sockets::workload::Workload,
};

const README: &str = include_str!("../../README.md");

/// The text of the `## heading` section, up to the next `## ` heading.
pub(crate) fn section(heading: &str) -> &'static str {
    let start = README
        .find(&format!("\n{heading}\n"))
        .unwrap_or_else(|| panic!("README.md has no section {heading:?}"))
        + 1;
    let end = README[start + heading.len()..]
        .find("\n## ")
        .map_or(README.len(), |at| start + heading.len() + at);
    &README[start..end]
}

/// Where each subcommand is documented.
fn heading_of(command: &str) -> &'static str {
    match command {
        "watch" => "## `connwatch watch`",
        "top" => "## `connwatch top`",
        "daemon" => "## `connwatch daemon`",
        "doctor" => "## `connwatch doctor`",
        "proxy" => "## `connwatch proxy`",
        "selftest" => "## `connwatch selftest`",
        other => panic!("README.md documents no subcommand {other}: add it to heading_of"),
    }
}

/// Whether `text` names `--flag` as code: a backtick, the flag, then not more of a name.
pub(crate) fn mentions(text: &str, flag: &str) -> bool {
    let needle = format!("`--{flag}");
    text.match_indices(&needle).any(|(at, _)| {
        !text[at + needle.len()..]
            .starts_with(|c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    })
}

/// Each `--name` in `text`.
fn flags_in(text: &str) -> Vec<&str> {
    text.match_indices("--")
        .filter(|&(at, _)| !text[..at].ends_with(|c: char| c.is_ascii_alphanumeric() || c == '-'))
        .map(|(at, _)| {
            let rest = &text[at + 2..];
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
                .unwrap_or(rest.len());
            &rest[..end]
        })
        .filter(|name| !name.is_empty())
        .collect()
}

/// The first cells of the rows of every table in `text` whose header's first cell is one
/// of `headers`.
fn first_cells<'a>(text: &'a str, headers: &[&str]) -> Vec<&'a str> {
    let mut cells = Vec::new();
    let mut in_table = false;
    for line in text.lines() {
        let Some(row) = line.strip_prefix('|') else {
            in_table = false;
            continue;
        };
        let first = row.split('|').next().unwrap_or("").trim();
        if !in_table {
            in_table = headers.contains(&first);
        } else if !first.starts_with("---") {
            cells.push(first);
        }
    }
    cells
}

/// Every subcommand's long flags, its own and flattened ones (the global `--log-level`
/// aside).
fn subcommand_flags() -> Vec<(String, BTreeSet<String>)> {
    Cli::command()
        .get_subcommands()
        .map(|sub| {
            let flags = sub
                .get_arguments()
                .filter(|arg| !arg.is_global_set())
                .filter_map(|arg| arg.get_long())
                .filter(|long| !["help", "version"].contains(long))
                .map(str::to_string)
                .collect();
            (sub.get_name().to_string(), flags)
        })
        .collect()
}

#[test]
fn every_flag_is_in_its_commands_section() {
    let commands = subcommand_flags();
    assert_eq!(commands.len(), 6, "a subcommand was added or removed");
    let mut missing = Vec::new();
    for (command, flags) in &commands {
        let text = section(heading_of(command));
        for flag in flags {
            if !mentions(text, flag) {
                missing.push(format!("{command} --{flag}"));
            }
        }
    }
    for arg in Cli::command().get_arguments() {
        if let Some(long) = arg.get_long().filter(|_| arg.is_global_set())
            && !mentions(README, long)
        {
            missing.push(format!("--{long} (every command)"));
        }
    }
    assert!(
        missing.is_empty(),
        "README.md does not document these flags in their command's section (as `--flag`): \
         {missing:?}"
    );
}

#[test]
fn every_flag_in_a_flag_table_exists() {
    let commands = subcommand_flags();
    let all: BTreeSet<&String> = commands.iter().flat_map(|(_, flags)| flags).collect();
    let mut unknown = Vec::new();
    for (command, flags) in &commands {
        for cell in first_cells(section(heading_of(command)), &["flag"]) {
            for flag in flags_in(cell) {
                if !flags.contains(flag) {
                    unknown.push(format!("{command} --{flag}"));
                }
            }
        }
    }
    // Tables of settings outside a command's section name some command's flags.
    for cell in first_cells(README, &["flag", "setting"]) {
        for flag in flags_in(cell) {
            if !all.contains(&flag.to_string()) {
                unknown.push(format!("--{flag}"));
            }
        }
    }
    assert!(
        unknown.is_empty(),
        "README.md's flag tables name flags connwatch does not have: {unknown:?}"
    );
}

/// A `watch --json` record with every field filled: a field added to [`Report`] fails to
/// compile here until it is given a value, and so is checked against README.md.
fn full_report() -> Report {
    Report {
        ts: "2026-11-26T22:06:42.376449Z".into(),
        mono_ns: 1,
        kind: "peer_reset_idle",
        pid: Some(1),
        tid: Some(1),
        comm: Some("python3".into()),
        local: "127.0.0.1:51440".into(),
        remote: "127.0.0.1:47002".into(),
        family: "ipv4",
        state: "ESTABLISHED",
        old_state: Some("ESTABLISHED"),
        new_state: Some("CLOSE"),
        idle_ms: Some(1),
        since_send_ms: Some(1),
        since_recv_ms: Some(1),
        sock_id: "1".into(),
        cookie: Some(1),
        inode: Some(1),
        cgroup_id: Some(1),
        op: Some("send"),
        errno: Some(104),
        error: Some("ECONNRESET"),
        since_reset_ms: Some(1),
        since_close_ms: Some(1),
        age_ms: Some(1),
        age_at_least: Some(true),
        stalled_ms: Some(1),
        connections: Some(1),
        per_min: Some(1),
        netns: Some(1),
        siblings: Some(1),
        cause: Some("reset_while_established".into()),
        idle_limit_ms: Some(1),
        path_kills: Some(1),
        workload: full_workload(),
    }
}

/// A process's container and pod with every field filled (see [`full_report`]).
pub(crate) fn full_workload() -> Workload {
    Workload {
        cgroup: Some("/".into()),
        container: Some("5e1f".into()),
        pod_uid: Some("7c9e".into()),
        pod: Some("api".into()),
        namespace: Some("payments".into()),
        process: Some("python3".into()),
    }
}

/// The same record with every optional field empty: what every record carries.
fn bare_report() -> Report {
    Report {
        pid: None,
        tid: None,
        comm: None,
        old_state: None,
        new_state: None,
        idle_ms: None,
        since_send_ms: None,
        since_recv_ms: None,
        cookie: None,
        inode: None,
        cgroup_id: None,
        op: None,
        errno: None,
        error: None,
        since_reset_ms: None,
        since_close_ms: None,
        age_ms: None,
        age_at_least: None,
        stalled_ms: None,
        connections: None,
        per_min: None,
        netns: None,
        siblings: None,
        cause: None,
        idle_limit_ms: None,
        path_kills: None,
        workload: Workload::default(),
        ..full_report()
    }
}

pub(crate) fn keys(record: &impl serde::Serialize) -> BTreeSet<String> {
    match serde_json::to_value(record).unwrap() {
        serde_json::Value::Object(map) => map.keys().cloned().collect(),
        other => panic!("not an object: {other}"),
    }
}

/// Fails with `what` and the names of `part` that are not in `whole`.
fn assert_within(part: &BTreeSet<String>, whole: &BTreeSet<String>, what: &str) {
    let extra: Vec<&String> = part.difference(whole).collect();
    assert!(extra.is_empty(), "{what}: {extra:?}");
}

/// The names between `quote`s in `cell`.
pub(crate) fn quoted(cell: &str, quote: char) -> Vec<&str> {
    cell.split(quote).skip(1).step_by(2).collect()
}

#[test]
fn the_json_fields_table_is_watchs_schema() {
    let text = section("## `connwatch watch`");
    let fields = &text[text
        .find("### JSON fields")
        .expect("a JSON fields subsection")..];
    let fields = &fields[..fields[4..].find("\n### ").map_or(fields.len(), |at| at + 4)];
    let documented: BTreeSet<String> = first_cells(fields, &["field"])
        .into_iter()
        .flat_map(|cell| quoted(cell, '`'))
        .map(str::to_string)
        .collect();
    let emitted = keys(&full_report());
    assert_within(
        &emitted,
        &documented,
        "fields `watch --json` emits that README.md's JSON fields table lacks",
    );
    assert_within(
        &documented,
        &emitted,
        "fields README.md's JSON fields table names that `watch --json` does not emit",
    );
    // `events_lost` records: their fields are told in the `kind` row.
    let mut lost = Vec::new();
    crate::sinks::json::JsonSink::new(&mut lost)
        .lost(&crate::sinks::Loss {
            at: std::time::SystemTime::UNIX_EPOCH,
            count: 1,
            total: 1,
            within: None,
        })
        .unwrap();
    let lost: serde_json::Value = serde_json::from_slice(&lost).unwrap();
    for key in lost.as_object().unwrap().keys() {
        assert!(
            fields.contains(&format!("`{key}`")),
            "README.md's JSON fields do not name events_lost's `{key}`"
        );
    }
}

#[test]
fn the_json_samples_are_watchs_schema() {
    let emitted = keys(&full_report());
    let always = keys(&bare_report());
    let text = section("## `connwatch watch`");
    let samples: Vec<&str> = text
        .split("```json\n")
        .skip(1)
        .map(|s| s.split("```").next().unwrap())
        .collect();
    assert!(
        samples.len() >= 2,
        "README.md's watch section shows fewer JSON samples than it did (2)"
    );
    for sample in samples {
        let value: serde_json::Value = serde_json::from_str(sample).unwrap_or_else(|err| {
            panic!("README.md's JSON sample does not parse ({err}):\n{sample}")
        });
        let shown = keys(&value);
        assert_within(
            &shown,
            &emitted,
            &format!(
                "README.md's JSON sample shows fields `watch --json` does not emit:\n{sample}"
            ),
        );
        assert_within(
            &always,
            &shown,
            &format!("README.md's JSON sample lacks fields every record carries:\n{sample}"),
        );
    }
}
