//! The pipeline's layering, checked on the source: probes → events → sockets → detect →
//! sinks, a lower layer never naming a higher one (nor what runs them: the pipeline, the
//! engine, the commands), and the commands sharing helpers through [`crate::common`], never
//! naming each other; what they share names no command. Test code (`#[cfg(test)]` items)
//! may reach anywhere.
use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
};

/// The layers, lowest first.
const LAYERS: [&str; 5] = ["probes", "events", "sockets", "detect", "sinks"];

/// What runs the layers and the commands share: no layer names these, and these name no
/// command.
const SHARED: [&str; 6] = ["pipeline", "engine", "resolver", "common", "http", "relay"];

/// The command line: it names every command, and no layer names it.
const CLI: &str = "cli";

/// The commands: each names the modules it uses, never another command.
const COMMANDS: [&str; 6] = ["watch", "daemon", "top", "proxy", "doctor", "selftest"];

/// A source file: its path under `src/` and its text.
struct Source {
    path: PathBuf,
    text: String,
}

fn sources(dir: &Path, root: &Path, found: &mut Vec<Source>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, root, found);
        } else if path.extension().is_some_and(|ext| ext == "rs") {
            found.push(Source {
                text: std::fs::read_to_string(&path).unwrap(),
                path: path.strip_prefix(root).unwrap().to_path_buf(),
            });
        }
    }
}

/// The file's module path: `sockets/pools.rs` → [sockets, pools], `sockets/mod.rs` →
/// [sockets]; `lib.rs` and `main.rs` → [].
fn module_path(path: &Path) -> Vec<String> {
    let mut parts: Vec<String> = path
        .with_extension("")
        .iter()
        .map(|part| part.to_string_lossy().into_owned())
        .collect();
    if matches!(
        parts.last().map(String::as_str),
        Some("mod" | "lib" | "main")
    ) {
        parts.pop();
    }
    parts
}

/// The text without comments and without `#[cfg(test)]` items.
fn production_code(text: &str) -> String {
    let code: String = text
        .lines()
        .map(|line| line.split("//").next().unwrap_or_default())
        .collect::<Vec<_>>()
        .join("\n");
    let mut kept = String::with_capacity(code.len());
    let mut rest = code.as_str();
    while let Some(at) = rest.find("#[cfg(test)]") {
        kept.push_str(&rest[..at]);
        rest = &rest[at..];
        // The item ends at its `;` or at the brace closing its first `{`.
        let mut depth = 0usize;
        let mut end = rest.len();
        for (i, c) in rest.char_indices() {
            match c {
                ';' if depth == 0 => {
                    end = i + 1;
                    break;
                }
                '{' => depth += 1,
                '}' => {
                    depth = depth.saturating_sub(1);
                    if depth == 0 {
                        end = i + 1;
                        break;
                    }
                }
                _ => {}
            }
        }
        rest = &rest[end..];
    }
    kept.push_str(rest);
    kept
}

fn identifier(text: &str) -> &str {
    let end = text
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or(text.len());
    &text[..end]
}

/// The top-level modules named by `crate::…` and `use crate::{…}` paths, and by `super::…`
/// paths that climb to the crate root.
fn references(module: &[String], code: &str) -> BTreeSet<String> {
    let mut named = BTreeSet::new();
    let mut rest = code;
    while let Some(at) = rest.find("crate::") {
        rest = &rest[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // The group's top-level entries: `a::b`, `c`, `d::{e, f}`.
            let mut depth = 0usize;
            let mut entry_start = true;
            for (i, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => entry_start = true,
                    c if entry_start && !c.is_whitespace() => {
                        named.insert(identifier(&group[i..]).to_string());
                        entry_start = false;
                    }
                    _ => {}
                }
            }
        } else {
            named.insert(identifier(rest).to_string());
        }
    }
    let mut rest = code;
    while let Some(at) = rest.find("super::") {
        let before = &rest[..at];
        rest = &rest[at..];
        // Count a chain once, from its first `super`.
        if before.ends_with("::") {
            rest = &rest["super::".len()..];
            continue;
        }
        let mut climbs = 0;
        while let Some(after) = rest.strip_prefix("super::") {
            climbs += 1;
            rest = after;
        }
        if climbs >= module.len() {
            named.insert(identifier(rest).to_string());
        }
    }
    named.retain(|name| !name.is_empty());
    named
}

/// Every reference that breaks the layering, as `from → to`.
fn violations(sources: &[Source]) -> BTreeSet<(String, String)> {
    let rank = |name: &str| LAYERS.iter().position(|layer| *layer == name);
    let mut found = BTreeSet::new();
    for source in sources {
        let module = module_path(&source.path);
        let Some(top) = module.first() else {
            continue;
        };
        for named in references(&module, &production_code(&source.text)) {
            if named == *top {
                continue;
            }
            let broken = match (rank(top), rank(&named)) {
                (Some(from), Some(to)) => to > from,
                (Some(_), None) => {
                    SHARED.contains(&named.as_str())
                        || named == CLI
                        || COMMANDS.contains(&named.as_str())
                }
                (None, _) => {
                    COMMANDS.contains(&named.as_str())
                        && (COMMANDS.contains(&top.as_str()) || SHARED.contains(&top.as_str()))
                }
            };
            if broken {
                found.insert((top.clone(), named));
            }
        }
    }
    found
}

#[test]
fn layers_never_name_a_higher_one_and_commands_never_each_other() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut found = Vec::new();
    sources(&root, &root, &mut found);
    assert!(found.len() > 40, "read {} files", found.len());
    let broken = violations(&found);
    assert!(
        broken.is_empty(),
        "layering broken (probes → events → sockets → detect → sinks; commands share \
         `common`): {broken:?}"
    );
}

#[test]
fn a_lower_layer_naming_a_higher_one_is_found() {
    let source = |path: &str, text: &str| Source {
        path: path.into(),
        text: text.into(),
    };
    let found = violations(&[
        source(
            "sockets/pools.rs",
            "use crate::{FastMap, events::Event};\n\
             fn f() { crate::detect::death::classify(e); }\n",
        ),
        source(
            "sinks/metrics.rs",
            "use crate::{\n    pipeline::Pipeline,\n};\n",
        ),
        source("engine.rs", "fn f() { super::sinks::x(); }\n"),
        source("top.rs", "use crate::watch::output_closed;\n"),
        source("watch.rs", "use crate::common::output_closed;\n"),
        source("common.rs", "use crate::{engine::Flow, watch::Output};\n"),
        source("cli.rs", "use crate::watch::WatchArgs;\n"),
        source(
            "detect/stall.rs",
            "use crate::sockets::pools::Requests; // crate::sinks in a comment\n\
             #[cfg(test)]\nmod tests {\n    use crate::sinks::Report;\n}\n",
        ),
    ]);
    let expected: BTreeSet<(String, String)> = [
        ("sockets", "detect"),
        ("sinks", "pipeline"),
        ("top", "watch"),
        ("common", "watch"),
    ]
    .iter()
    .map(|(from, to)| (from.to_string(), to.to_string()))
    .collect();
    assert_eq!(found, expected);
}
