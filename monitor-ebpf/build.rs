use which::which;

/// Rebuild when bpf-linker changes: a new linker (e.g. after an LLVM upgrade) can change the
/// object even when no source did. Mirrors aya-template.
fn main() {
    match which("bpf-linker") {
        Ok(linker) => println!("cargo:rerun-if-changed={}", linker.display()),
        Err(err) => println!("cargo:warning=bpf-linker not found ({err}); run `cargo xtask setup`"),
    }
}
