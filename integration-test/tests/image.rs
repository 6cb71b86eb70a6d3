//! The release image, built for real: `deploy/Containerfile` through buildah (no daemon, and
//! `FROM scratch` pulls nothing) for linux/amd64 and linux/arm64 into one manifest list, as
//! `cargo xtask image` builds it; each image's config checked, and the amd64 binary run
//! inside its rootfs with chroot. The rootfs holds nothing but the binary, so running there
//! proves it needs no libc (the arm64 binary runs in the arm64 guests of the kernel matrix).
//! Needs root and buildah; `cargo xtask test` provides both and sets `CONNWATCH_STATIC_BIN`
//! and `CONNWATCH_STATIC_BIN_ARM64`.

use std::{
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    process::{Command, Output},
    time::{SystemTime, UNIX_EPOCH},
};

use serde_json::{Value, json};

/// Where the release build puts the static binary, relative to the workspace root; also the
/// Containerfile's default for its `CONNWATCH_BIN` build argument.
const DEFAULT_STATIC_BIN: &str = "target/x86_64-unknown-linux-musl/release/connwatch";
const ENTRYPOINT: &str = "/usr/local/bin/connwatch";

/// One platform of the image: its OCI architecture, where its static binary comes from, and
/// the ELF machine that binary must be built for.
struct Platform {
    arch: &'static str,
    env: &'static str,
    default_bin: &'static str,
    elf_machine: u16,
}

const PLATFORMS: [Platform; 2] = [
    Platform {
        arch: "amd64",
        env: "CONNWATCH_STATIC_BIN",
        default_bin: DEFAULT_STATIC_BIN,
        elf_machine: 62, // EM_X86_64
    },
    Platform {
        arch: "arm64",
        env: "CONNWATCH_STATIC_BIN_ARM64",
        default_bin: "target/aarch64-unknown-linux-musl/release/connwatch",
        elf_machine: 183, // EM_AARCH64
    },
];

#[test]
fn image_is_the_static_binary_alone_and_it_runs() {
    let mut buildah = Buildah::new();
    let list = buildah.tag("list");
    let mut amd64 = None;
    for platform in &PLATFORMS {
        let binary = static_binary(platform);
        let bytes = fs::read(&binary).expect("read the static binary");
        if let Err(why) = static_elf(&bytes, platform.elf_machine) {
            panic!(
                "{} is not a static {} binary ({why}): the image has no libc, so it would not \
                 run there; build it for the platform's musl target",
                binary.display(),
                platform.arch
            );
        }
        let tag = buildah.build(&binary, platform.arch, &list);
        let rootfs = check_image(&mut buildah, &tag, platform.arch, &bytes, &binary);
        if platform.arch == "amd64" {
            amd64 = Some(rootfs);
        }
    }

    // One name for every node: each pulls the entry for its own platform.
    let manifest: Value = serde_json::from_str(&buildah.run(&["manifest", "inspect", &list]))
        .expect("buildah manifest inspect prints JSON");
    let mut platforms: Vec<String> = manifest["manifests"]
        .as_array()
        .expect("a manifest list")
        .iter()
        .map(|entry| {
            let platform = &entry["platform"];
            format!(
                "{}/{}",
                platform["os"].as_str().unwrap_or("?"),
                platform["architecture"].as_str().unwrap_or("?")
            )
        })
        .collect();
    platforms.sort();
    assert_eq!(platforms, ["linux/amd64", "linux/arm64"], "{manifest:#}");

    let rootfs = amd64.expect("an amd64 image");
    let version = command_output(Command::new("chroot").args([
        "--userspec=0:0",
        rootfs.to_str().unwrap(),
        ENTRYPOINT,
        "--version",
    ]));
    assert_eq!(
        version.trim(),
        format!("connwatch {}", env!("CARGO_PKG_VERSION"))
    );

    // doctor needs the host's /proc and /sys: bind them in a private mount namespace, so they
    // vanish with it whatever happens, and never propagate back to the host.
    for dir in ["proc", "sys"] {
        fs::create_dir(rootfs.join(dir)).expect("create a mount point in the container");
    }
    let doctor = command_output(Command::new("unshare").args([
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        r#"mount --rbind /proc "$1/proc" && mount --rbind /sys "$1/sys" &&
           exec chroot --userspec="$2" "$1" "$3" doctor"#,
        "sh",
        rootfs.to_str().unwrap(),
        "0:0",
        ENTRYPOINT,
    ]));
    let release = fs::read_to_string("/proc/sys/kernel/osrelease").expect("kernel release");
    assert!(
        doctor.contains(&format!("Linux {}", release.trim())),
        "doctor does not name the kernel:\n{doctor}"
    );
    assert!(
        doctor.contains("connwatch can run on this node: yes"),
        "{doctor}"
    );
}

/// Checks the image `tag` of `arch`: its config, and that its rootfs holds `binary` (`bytes`)
/// alone. Returns the mounted rootfs.
fn check_image(
    buildah: &mut Buildah,
    tag: &str,
    arch: &str,
    bytes: &[u8],
    binary: &Path,
) -> PathBuf {
    let inspect: Value = serde_json::from_str(&buildah.run(&["inspect", "--type", "image", tag]))
        .expect("buildah inspect prints JSON");
    let image = &inspect["OCIv1"];
    assert_eq!(image["architecture"], arch, "{image:#}");
    assert_eq!(image["os"], "linux", "{image:#}");
    let config = &image["config"];
    assert_eq!(config["Entrypoint"], json!([ENTRYPOINT]), "{config:#}");
    assert_eq!(config["Cmd"], json!(["daemon"]), "{config:#}");
    // Root, like deploy/connwatch.yaml (runAsUser: 0 with a dropped capability set).
    assert_eq!(config["User"], "0:0", "{config:#}");
    let labels = &config["Labels"];
    assert_eq!(
        labels["org.opencontainers.image.licenses"],
        "MIT OR Apache-2.0"
    );
    for label in ["source", "description"] {
        let value = labels[format!("org.opencontainers.image.{label}")].as_str();
        assert!(
            value.is_some_and(|v| !v.is_empty()),
            "no {label} label: {labels:#}"
        );
    }
    let layers = image["rootfs"]["diff_ids"].as_array().expect("diff_ids");
    assert_eq!(layers.len(), 1, "one layer, the binary's: {image:#}");

    let rootfs = buildah.mount(tag);
    let files = files_under(&rootfs);
    assert_eq!(
        files,
        [ENTRYPOINT.trim_start_matches('/')],
        "the rootfs must hold the binary alone (no shell, no libc, no certificates)"
    );
    assert!(
        fs::read(rootfs.join(&files[0])).expect("read the image's binary") == bytes,
        "the {arch} image's binary differs from {}",
        binary.display()
    );
    rootfs
}

/// The check above must be able to fail: this test binary is linked against glibc.
#[test]
fn a_dynamically_linked_binary_is_refused() {
    let own = fs::read(std::env::current_exe().unwrap()).unwrap();
    assert!(static_elf(&own, PLATFORMS[0].elf_machine).is_err());
}

/// And a static binary of the other architecture must not pass for this one's.
#[test]
fn a_binary_of_another_architecture_is_refused() {
    let arm64 = fs::read(static_binary(&PLATFORMS[1])).expect("read the arm64 static binary");
    assert_eq!(static_elf(&arm64, PLATFORMS[1].elf_machine), Ok(()));
    let err = static_elf(&arm64, PLATFORMS[0].elf_machine).unwrap_err();
    assert!(err.contains("machine 183"), "{err}");
}

/// The platform's static binary: its environment variable, else the workspace's musl
/// release build.
fn static_binary(platform: &Platform) -> PathBuf {
    let path = std::env::var_os(platform.env)
        .map_or_else(|| workspace().join(platform.default_bin), PathBuf::from);
    assert!(
        path.is_file(),
        "no static connwatch at {}: build it with `cargo build --release -p monitor --target \
         <musl target>` (`cargo xtask image` builds both), or set {}",
        path.display(),
        platform.env
    );
    path
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Why `elf` would not run on a `machine` (ELF e_machine) node without files beside it, if
/// so: another architecture's code; a PT_INTERP names the dynamic loader, a DT_NEEDED a
/// shared library. A static-pie (what musl builds) has a PT_DYNAMIC for its own
/// relocations but neither of those.
fn static_elf(elf: &[u8], machine: u16) -> Result<(), String> {
    const PT_DYNAMIC: u32 = 2;
    const PT_INTERP: u32 = 3;
    const DT_NEEDED: u64 = 1;
    let bytes = |at: u64, len: usize| -> Result<&[u8], String> {
        usize::try_from(at)
            .ok()
            .and_then(|at| elf.get(at..at.checked_add(len)?))
            .ok_or_else(|| format!("truncated ELF: nothing at offset {at:#x}"))
    };
    let u16_at = |at| Ok::<_, String>(u16::from_le_bytes(bytes(at, 2)?.try_into().unwrap()));
    let u32_at = |at| Ok::<_, String>(u32::from_le_bytes(bytes(at, 4)?.try_into().unwrap()));
    let u64_at = |at| Ok::<_, String>(u64::from_le_bytes(bytes(at, 8)?.try_into().unwrap()));

    if elf.get(..6) != Some(b"\x7fELF\x02\x01") {
        return Err("not a 64-bit little-endian ELF file".into());
    }
    let built_for = u16_at(0x12)?;
    if built_for != machine {
        return Err(format!("built for ELF machine {built_for}, not {machine}"));
    }
    let (phoff, phentsize, phnum) = (u64_at(0x20)?, u16_at(0x36)?, u16_at(0x38)?);
    for header in (0..u64::from(phnum)).map(|i| phoff + i * u64::from(phentsize)) {
        match u32_at(header)? {
            PT_INTERP => return Err("it has a program interpreter (PT_INTERP)".into()),
            PT_DYNAMIC => {
                let (offset, size) = (u64_at(header + 0x08)?, u64_at(header + 0x20)?);
                for entry in (offset..offset + size).step_by(16) {
                    match u64_at(entry)? {
                        0 => break,
                        DT_NEEDED => return Err("it needs shared libraries (DT_NEEDED)".into()),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    Ok(())
}

/// Every file that is not a directory under `root`, relative to it.
fn files_under(root: &Path) -> Vec<String> {
    let mut files = Vec::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in fs::read_dir(&dir).expect("list the rootfs") {
            let path = entry.expect("list the rootfs").path();
            if path.is_dir() && !path.is_symlink() {
                dirs.push(path);
            } else {
                let relative = path.strip_prefix(root).unwrap();
                files.push(relative.to_string_lossy().into_owned());
            }
        }
    }
    files.sort();
    files
}

/// Runs `command`; its stdout then stderr, or a panic that shows them.
fn command_output(command: &mut Command) -> String {
    let output = command
        .output()
        .unwrap_or_else(|err| panic!("cannot run {command:?}: {err}"));
    assert!(
        output.status.success(),
        "{command:?} failed: {}",
        describe(&output)
    );
    describe(&output)
}

/// stdout then stderr, and the exit status if it is not success.
fn describe(output: &Output) -> String {
    let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&output.stderr));
    if !output.status.success() {
        let _ = write!(text, "({})", output.status);
    }
    text
}

/// buildah with a private vfs store in a fresh directory: nothing lands in the host's store,
/// concurrent runs cannot collide, and vfs needs nothing from the kernel (no overlay). Drop
/// unmounts and removes the containers, the images and the store, even after a failed assert.
struct Buildah {
    store: PathBuf,
    images: Vec<String>,
    containers: Vec<String>,
}

impl Buildah {
    fn new() -> Buildah {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let unique = format!("{}-{nanos}", std::process::id());
        let store = std::env::temp_dir().join(format!("connwatch-image-test-{unique}"));
        fs::create_dir(&store).expect("create the buildah store");
        Buildah {
            store,
            images: Vec::new(),
            containers: Vec::new(),
        }
    }

    /// A name unique to this store, `localhost/connwatch-image-test:<store>-<suffix>`.
    fn tag(&self, suffix: &str) -> String {
        format!(
            "localhost/connwatch-image-test:{}-{suffix}",
            self.store.file_name().unwrap().to_str().unwrap()
        )
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new("buildah");
        command
            .arg("--root")
            .arg(self.store.join("storage"))
            .arg("--runroot")
            .arg(self.store.join("run"))
            .args(["--storage-driver", "vfs"])
            .args(args);
        command
    }

    /// Runs buildah; its stdout, or a panic that shows why it failed.
    fn run(&self, args: &[&str]) -> String {
        let mut command = self.command(args);
        let output = command.output().unwrap_or_else(|err| {
            panic!("cannot run buildah ({err}): install it (`apt-get install buildah`)")
        });
        assert!(
            output.status.success(),
            "{command:?} failed: {}",
            describe(&output)
        );
        String::from_utf8(output.stdout).expect("buildah prints UTF-8")
    }

    /// Builds deploy/Containerfile around `binary` for `linux/<arch>`, with the repository
    /// root as the context, as the README says (a binary outside the repository gets a context
    /// of its own), and adds it to the manifest list `list`. Returns the image's tag.
    fn build(&mut self, binary: &Path, arch: &str, list: &str) -> String {
        let tag = self.tag(arch);
        let root = workspace().canonicalize().unwrap();
        let binary = binary.canonicalize().unwrap();
        let (context, relative) = if let Ok(relative) = binary.strip_prefix(&root) {
            (root.clone(), relative.to_str().unwrap().to_string())
        } else {
            let context = self.store.join(format!("context-{arch}"));
            fs::create_dir(&context).unwrap();
            fs::copy(&binary, context.join("connwatch")).unwrap();
            (context, "connwatch".to_string())
        };
        let containerfile = root.join("deploy/Containerfile");
        let build_arg = format!("CONNWATCH_BIN={relative}");
        let platform = format!("linux/{arch}");
        let mut args = vec![
            "build",
            // No RUN step, so nothing is executed (no emulation for arm64); chroot isolation
            // keeps buildah from looking for an OCI runtime it cannot use here.
            "--isolation",
            "chroot",
            "--platform",
            &platform,
            "-f",
            containerfile.to_str().unwrap(),
            "-t",
            &tag,
            "--manifest",
            list,
        ];
        // Leave the Containerfile's default in force when it is the path used, so it is tested.
        if relative != DEFAULT_STATIC_BIN {
            args.extend(["--build-arg", &build_arg]);
        }
        args.push(context.to_str().unwrap());
        self.images.push(tag.clone());
        if !self.images.iter().any(|image| image == list) {
            self.images.push(list.to_string());
        }
        self.run(&args);
        tag
    }

    /// A working container from `image`, mounted: the path of its rootfs.
    fn mount(&mut self, image: &str) -> PathBuf {
        let container = self.run(&["from", image]).trim().to_string();
        self.containers.push(container.clone());
        PathBuf::from(self.run(&["mount", &container]).trim())
    }
}

impl Drop for Buildah {
    fn drop(&mut self) {
        let mut steps = Vec::new();
        for container in &self.containers {
            steps.push(vec!["umount", container]);
            steps.push(vec!["rm", container]);
        }
        for image in self.images.iter().rev() {
            steps.push(vec!["rmi", image]);
        }
        // Report, do not panic: a panic while unwinding from a failed assert would abort.
        for step in steps {
            match self.command(&step).output() {
                Ok(output) if output.status.success() => {}
                Ok(output) => eprintln!("buildah {step:?}: {}", describe(&output)),
                Err(err) => eprintln!("buildah {step:?}: {err}"),
            }
        }
        if let Err(err) = fs::remove_dir_all(&self.store) {
            eprintln!("removing {}: {err}", self.store.display());
        }
    }
}
