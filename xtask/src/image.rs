//! `cargo xtask image`: the release image for every [`Arch`], as one manifest list.
//!
//! Each architecture's image is `deploy/Containerfile` around that architecture's static
//! binary, built with `--platform linux/<arch>` (no RUN step, so nothing executes and no
//! emulation is needed); `--manifest` gathers them under one name. A node pulls the entry
//! for its own platform, so the DaemonSet names the one tag on amd64 and arm64 alike.
//! Push with `buildah manifest push --all <tag> docker://<tag>`.

use std::{path::Path, process::Command};

use anyhow::{Context as _, Result};

use crate::{Arch, check, output, step};

/// The DaemonSet's image (deploy/connwatch.yaml).
pub const DEFAULT_TAG: &str = "ghcr.io/connwatch/connwatch:0.1.0";

/// Builds the manifest list `tag` in buildah's local store from the static binaries
/// (built already), replacing a previous list of that name.
pub fn build(root: &Path, tag: &str) -> Result<()> {
    // `--manifest` adds to an existing list: start from none, or old entries would stay.
    let _ = Command::new("buildah")
        .args(["manifest", "rm", tag])
        .output();
    for arch in Arch::ALL {
        let binary = arch.static_bin(root);
        let relative = binary
            .strip_prefix(root)
            .context("the static binary is outside the workspace")?;
        step(&format!("image for linux/{}", arch.debian()));
        check(
            Command::new("buildah")
                .args(["build", "--isolation", "chroot"])
                .arg(format!("--platform=linux/{}", arch.debian()))
                .arg(format!("--build-arg=CONNWATCH_BIN={}", relative.display()))
                .args(["--manifest", tag, "-f", "deploy/Containerfile", "."])
                .current_dir(root),
        )?;
    }
    let list = output(Command::new("buildah").args(["manifest", "inspect", tag]))?;
    let list: serde_json::Value =
        serde_json::from_str(&list).context("buildah manifest inspect printed no JSON")?;
    let platforms: Vec<String> = list["manifests"]
        .as_array()
        .map(|entries| {
            entries
                .iter()
                .map(|e| {
                    let p = &e["platform"];
                    format!(
                        "{}/{}",
                        p["os"].as_str().unwrap_or("?"),
                        p["architecture"].as_str().unwrap_or("?")
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    step(&format!(
        "{tag}: a manifest list of {} (push: buildah manifest push --all {tag} docker://{tag})",
        platforms.join(", ")
    ));
    Ok(())
}
