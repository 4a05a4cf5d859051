//! `cargo xtask setup` and `cargo xtask build-ebpf`: the recipe of
//! shared/TOOLCHAIN.md as code. Setup installs only what is missing and
//! says what it does; with everything present it takes well under a second.

use std::{path::Path, process::Command};

use anyhow::{bail, Context, Result};

use crate::{capture, ebpf_object, exec, workspace_root};

/// Debian packages and why we need them.
const PACKAGES: &[(&str, &str)] = &[
    (
        "rustc-web",
        "the Rust compiler for the eBPF crate (its sysroot is /usr)",
    ),
    (
        "rust-web-src",
        "the core library sources matching rustc-web, for -Z build-std",
    ),
    (
        "llvm-22-dev",
        "the LLVM that rustc-web uses; bpf-linker links against it",
    ),
    (
        "iproute2",
        "ip: network namespaces, veth and bridges of the lab",
    ),
    ("bpftool", "inspecting programs and pinned maps"),
    (
        "ethtool",
        "per-device XDP counters and offload settings in the lab",
    ),
    ("curl", "HTTP traffic in the lab and the tests"),
    (
        "util-linux",
        "nsenter (run in a node's namespace) and setpriv",
    ),
    ("python3", "a small HTTP server for the lab's web nodes"),
    ("rsync", "the volume's real-world workload test"),
    ("iputils-ping", "ping in the demo's traffic"),
    (
        "postgresql",
        "PostgreSQL 15, psql and pgbench for the pooler's tests and benchmark",
    ),
    ("pgbouncer", "the pooler benchmark's PgBouncer baseline"),
    ("nftables", "nft: the chaos suite's network partitions"),
    (
        "libfaketime",
        "the chaos suite's clock jump (one agent under LD_PRELOAD)",
    ),
    ("pgpool2", "the pooler benchmark's pgpool-II baseline"),
    (
        "apache2",
        "Apache on every lab node, supervised by the agents",
    ),
    (
        "prometheus",
        "promtool: the tests check /metrics with `promtool check metrics`",
    ),
    ("chromium", "headless browser for the status page test"),
    (
        "wrk",
        "HTTP load: Apache reloads in the lab tests, benchmarks",
    ),
    (
        "keepalived",
        "the VRRP peer of the failover lab tests and benchmark",
    ),
    (
        "haproxy",
        "the balancer behind keepalived in the failover benchmark",
    ),
];

/// bpf-linker's release line that links against LLVM 22.
const BPF_LINKER_VERSION: &str = "0.13";
const LLVM_BIN: &str = "/usr/lib/llvm-22/bin";
pub const DEBIAN_RUSTC: &str = "/usr/bin/rustc";

fn package_installed(name: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${db:Status-Status}", name])
        .output()
        .is_ok_and(|out| out.status.success() && out.stdout == b"installed")
}

fn bpf_linker_installed() -> bool {
    Command::new("bpf-linker")
        .arg("--version")
        .output()
        .is_ok_and(|out| {
            out.status.success()
                && String::from_utf8_lossy(&out.stdout).contains(&format!(" {BPF_LINKER_VERSION}."))
        })
}

/// What is missing, as a list of human-readable items (empty when ready).
pub fn missing() -> Vec<String> {
    let mut missing: Vec<String> = PACKAGES
        .iter()
        .filter(|(name, _)| !package_installed(name))
        .map(|(name, _)| format!("Debian package {name}"))
        .collect();
    if !bpf_linker_installed() {
        missing.push(format!("bpf-linker {BPF_LINKER_VERSION} (llvm-22)"));
    }
    missing
}

/// Installs whatever is missing. Idempotent.
pub fn setup() -> Result<()> {
    let absent: Vec<&(&str, &str)> = PACKAGES
        .iter()
        .filter(|(name, _)| !package_installed(name))
        .collect();
    if absent.is_empty() {
        println!("setup: Debian packages present ({})", PACKAGES.len());
    } else {
        if !crate::is_root() {
            bail!("setup needs root to install Debian packages; run `sudo cargo xtask setup`");
        }
        for (name, why) in &absent {
            println!("setup: installing {name}: {why}");
        }
        println!("setup: apt-get update");
        exec(Command::new("apt-get").args(["update", "-qq"]))?;
        exec(
            Command::new("apt-get")
                .env("DEBIAN_FRONTEND", "noninteractive")
                .args([
                    "install",
                    "-y",
                    "-qq",
                    "-o",
                    "Dpkg::Use-Pty=0",
                    "--no-install-recommends",
                ])
                .args(absent.iter().map(|(name, _)| *name)),
        )?;
    }
    if bpf_linker_installed() {
        println!("setup: bpf-linker {BPF_LINKER_VERSION} present");
    } else {
        println!(
            "setup: building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (about a minute)"
        );
        let path = format!("{LLVM_BIN}:{}", std::env::var("PATH").unwrap_or_default());
        exec(
            Command::new("cargo")
                .env("PATH", path)
                .args(["install", "--locked", "bpf-linker", "--version"])
                .arg(format!("~{BPF_LINKER_VERSION}"))
                .args(["--no-default-features", "--features", "llvm-22"]),
        )?;
    }
    let still = missing();
    if !still.is_empty() {
        bail!(
            "setup finished but these are still missing: {}",
            still.join(", ")
        );
    }
    println!("setup: ready");
    Ok(())
}

/// Installs Debian packages a command needs beyond the common set (the
/// benchmarks' peers), when missing.
pub fn ensure_packages(packages: &[(&str, &str)]) -> Result<()> {
    let absent: Vec<&(&str, &str)> = packages
        .iter()
        .filter(|(name, _)| !package_installed(name))
        .collect();
    if absent.is_empty() {
        return Ok(());
    }
    if !crate::is_root() {
        bail!("installing Debian packages needs root");
    }
    for (name, why) in &absent {
        println!("setup: installing {name}: {why}");
    }
    exec(Command::new("apt-get").args(["update", "-qq"]))?;
    exec(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args([
                "install",
                "-y",
                "-qq",
                "-o",
                "Dpkg::Use-Pty=0",
                "--no-install-recommends",
            ])
            .args(absent.iter().map(|(name, _)| *name)),
    )
}

/// Runs setup when something is missing, so every command that needs the
/// toolchain works on a fresh machine.
pub fn ensure_setup() -> Result<()> {
    let missing = missing();
    if missing.is_empty() {
        return Ok(());
    }
    println!("setup needed: missing {}", missing.join(", "));
    setup().context("`cargo xtask setup` failed")
}

/// Builds the eBPF object (release, BTF) and describes it.
pub fn build_ebpf() -> Result<()> {
    ensure_setup()?;
    let root = workspace_root();
    println!("build-ebpf: compiling ebpf/ for bpfel-unknown-none with {DEBIAN_RUSTC}");
    exec(
        Command::new("cargo")
            .current_dir(root.join("ebpf"))
            .env("RUSTC", DEBIAN_RUSTC)
            .env("RUSTC_BOOTSTRAP", "1")
            .env("RUSTFLAGS", "-C debuginfo=2 -C link-arg=--btf")
            .env_remove("CARGO_ENCODED_RUSTFLAGS")
            .env_remove("RUSTC_WRAPPER")
            .env_remove("RUSTC_WORKSPACE_WRAPPER")
            .env_remove("CARGO_TARGET_DIR")
            .args([
                "build",
                "--quiet",
                "--release",
                "--target",
                "bpfel-unknown-none",
                "-Z",
                "build-std=core",
            ])
            .arg("--target-dir")
            .arg(root.join("target/ebpf")),
    )?;
    describe_object(&ebpf_object())
}

fn describe_object(path: &Path) -> Result<()> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let object =
        aya_obj::Object::parse(&bytes).with_context(|| format!("parsing {}", path.display()))?;
    let mut programs: Vec<&str> = object.programs.keys().map(String::as_str).collect();
    programs.sort_unstable();
    let mut maps: Vec<&str> = object
        .maps
        .keys()
        .map(String::as_str)
        .filter(|name| !name.starts_with('.'))
        .collect();
    maps.sort_unstable();
    println!(
        "build-ebpf: {} ({} bytes): programs {}; maps {}",
        path.display(),
        bytes.len(),
        programs.join(", "),
        maps.join(", ")
    );
    for name in farol_common::maps::PINNED_MAPS
        .iter()
        .chain([&farol_common::maps::PROGRAM_INGRESS])
    {
        if !programs.contains(name) && !maps.contains(name) {
            bail!("the eBPF object lacks {name}, which farol-common names");
        }
    }
    Ok(())
}

/// The `cargo fmt --check` of the eBPF crate, which the workspace excludes.
pub fn fmt_check_ebpf() -> Result<()> {
    capture(
        Command::new("cargo")
            .current_dir(workspace_root().join("ebpf"))
            .args(["fmt", "--check"]),
    )
    .map(|_| ())
    .context("the ebpf crate is not formatted: run `cd ebpf && cargo fmt`")
}
