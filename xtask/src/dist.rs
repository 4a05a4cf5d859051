//! `cargo xtask dist`: the agent for the Raspberry Pis (arm64 and armhf)
//! and for amd64, tested under qemu-user, packaged as `farol_*.deb`; with
//! `--check`, each package installed into and removed from a clean
//! Debian root of its architecture (debootstrap; the Pis' under qemu-user
//! through binfmt_misc).
//!
//! How the cross builds work here (shared/TOOLCHAIN.md): rustup cannot add
//! targets on these machines, so the standard library of aarch64 and armv7
//! is compiled from Debian's `rust-web-src` by Debian's `rustc-web`
//! (`-Z build-std`, allowed by `RUSTC_BOOTSTRAP=1`), and Debian's cross gcc
//! links. amd64 uses the project's own toolchain (rustup stable), as the
//! host build does. Every architecture embeds the same eBPF object
//! (little-endian BPF, `target/ebpf`). Everything goes to `target/dist`.
//!
//! None of this is part of `cargo xtask test`: a cross build of the agent
//! takes many minutes on two cores.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{bail, ensure, Context, Result};
use xtask::{capture, ebpf_object, exec, toolchain, workspace_root};

/// Debian packages `dist` needs beyond `cargo xtask setup`'s.
const DIST_PACKAGES: &[(&str, &str)] = &[
    ("gcc-aarch64-linux-gnu", "links the arm64 agent"),
    (
        "libc6-dev-arm64-cross",
        "the arm64 C library to link against",
    ),
    ("gcc-arm-linux-gnueabihf", "links the armhf (armv7) agent"),
    (
        "libc6-dev-armhf-cross",
        "the armhf C library to link against",
    ),
    (
        "qemu-user-static",
        "runs the arm64 and armhf agent and unit tests on this machine",
    ),
    (
        "debootstrap",
        "a clean Debian root to install the package in (--check)",
    ),
    (
        "dpkg-dev",
        "dpkg-architecture and friends that cargo-deb calls",
    ),
];

/// cargo-deb's release line (it builds `.deb` files from
/// `[package.metadata.deb]` in agent/Cargo.toml, for any target).
const CARGO_DEB_VERSION: &str = "3";

/// The package's name and where its binary goes (see the README).
pub(crate) const PACKAGE: &str = "farol";
pub(crate) const INSTALLED_BINARY: &str = "/usr/bin/farol-agent";
pub(crate) const CONFIG: &str = "/etc/farol/cluster.toml";

/// Debian's suite for the install test: Raspberry Pi OS is bookworm too.
const SUITE: &str = "bookworm";

/// Lib unit tests that cannot pass under qemu-user, and why. They run on
/// the host in `cargo xtask test`; on a Pi they would pass.
const SKIPPED_UNDER_QEMU: &[(&str, &str)] = &[];

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Arch {
    /// Raspberry Pi 3/4/5 with a 64-bit OS (aarch64-unknown-linux-gnu).
    Arm64,
    /// Raspberry Pi 2/3/4 with 32-bit Raspberry Pi OS (armv7-unknown-linux-gnueabihf).
    Armhf,
    /// PCs and the lab (x86_64-unknown-linux-gnu).
    Amd64,
}

impl Arch {
    pub(crate) const ALL: [Arch; 3] = [Arch::Arm64, Arch::Armhf, Arch::Amd64];

    /// Debian's name of the architecture.
    pub(crate) fn deb(self) -> &'static str {
        match self {
            Arch::Arm64 => "arm64",
            Arch::Armhf => "armhf",
            Arch::Amd64 => "amd64",
        }
    }

    pub(crate) fn triple(self) -> &'static str {
        match self {
            Arch::Arm64 => "aarch64-unknown-linux-gnu",
            Arch::Armhf => "armv7-unknown-linux-gnueabihf",
            Arch::Amd64 => "x86_64-unknown-linux-gnu",
        }
    }

    /// Cross linker, qemu-user emulator and the cross C library's root,
    /// for the foreign architectures.
    fn cross(self) -> Option<(&'static str, &'static str, &'static str)> {
        match self {
            Arch::Arm64 => Some((
                "aarch64-linux-gnu-gcc",
                "qemu-aarch64-static",
                "/usr/aarch64-linux-gnu",
            )),
            Arch::Armhf => Some((
                "arm-linux-gnueabihf-gcc",
                "qemu-arm-static",
                "/usr/arm-linux-gnueabihf",
            )),
            Arch::Amd64 => None,
        }
    }

    /// The `CARGO_TARGET_<TRIPLE>_` prefix of cargo's per-target settings.
    fn cargo_env(self, key: &str) -> String {
        format!(
            "CARGO_TARGET_{}_{key}",
            self.triple().to_uppercase().replace('-', "_")
        )
    }

    /// The command that runs one of this architecture's programs here.
    fn runner(self) -> Vec<String> {
        match self.cross() {
            Some((_, qemu, sysroot)) => vec![qemu.into(), "-L".into(), sysroot.into()],
            None => Vec::new(),
        }
    }
}

#[derive(Debug, clap::Args)]
pub(crate) struct DistArgs {
    /// Architectures to build (repeat the flag; default: arm64, armhf, amd64).
    #[arg(long = "arch", value_enum)]
    pub(crate) arches: Vec<Arch>,
    /// Package and check what target/dist already holds, without cargo build.
    #[arg(long)]
    pub(crate) no_build: bool,
    /// Skip the unit tests under qemu (the smoke run still happens).
    #[arg(long)]
    pub(crate) skip_unit_tests: bool,
    /// Only build the agent's lib unit tests for each foreign architecture
    /// (dev profile) and run them under qemu-user; no release build, no
    /// package.
    #[arg(long, conflicts_with_all = ["no_build", "skip_unit_tests", "check"])]
    pub(crate) test_under_qemu: bool,
    /// Also install each built package into a clean Debian root of its
    /// architecture, check it, remove and purge it (needs root; arm64 and
    /// armhf roots run under qemu-user, registered with binfmt_misc;
    /// debootstrap's first run downloads about 40 MB per architecture,
    /// cached in target/dist/debootstrap).
    #[arg(long)]
    pub(crate) check: bool,
}

/// What one architecture produced, for the summary.
struct Built {
    arch: Arch,
    binary: PathBuf,
    build_seconds: f64,
    tests: String,
    package: PathBuf,
}

pub(crate) fn run(args: DistArgs) -> Result<()> {
    let arches = if args.arches.is_empty() {
        Arch::ALL.to_vec()
    } else {
        args.arches.clone()
    };
    step("setup");
    toolchain::ensure_setup()?;
    toolchain::ensure_packages(DIST_PACKAGES)?;
    ensure_cargo_deb()?;
    step("build-ebpf (the same object for every architecture)");
    toolchain::build_ebpf()?;
    if args.test_under_qemu {
        return test_under_qemu(&arches);
    }

    let mut built = Vec::new();
    for arch in arches {
        step(&format!(
            "{}: release build for {}",
            arch.deb(),
            arch.triple()
        ));
        let started = Instant::now();
        let binary = if args.no_build {
            let binary = binary_path(arch);
            ensure!(
                binary.exists(),
                "{} is missing: run without --no-build",
                binary.display()
            );
            binary
        } else {
            build(arch)?
        };
        let build_seconds = started.elapsed().as_secs_f64();
        println!(
            "dist: {} ({:.1} MB) in {build_seconds:.0} s",
            binary.display(),
            size_mb(&binary)?
        );
        step(&format!("{}: smoke run", arch.deb()));
        smoke(arch, &binary)?;
        if xtask::is_root() {
            step(&format!(
                "{}: the pooler against PostgreSQL on this machine",
                arch.deb()
            ));
            pooler_smoke(arch, &binary)?;
        } else {
            println!("dist: pooler smoke skipped: starting PostgreSQL needs root");
        }
        let tests = if arch == Arch::Amd64 {
            "unit tests: on the host by `cargo xtask test`".to_owned()
        } else if args.skip_unit_tests {
            "unit tests: skipped (--skip-unit-tests)".to_owned()
        } else {
            step(&format!("{}: agent unit tests under qemu", arch.deb()));
            unit_tests(arch)?
        };
        step(&format!("{}: package", arch.deb()));
        let package = package(arch)?;
        check_package_contents(arch, &package)?;
        built.push(Built {
            arch,
            binary,
            build_seconds,
            tests,
            package,
        });
    }
    let mut installed = Vec::new();
    if args.check {
        for b in &built {
            step(&format!(
                "install test: {} package in a clean Debian {SUITE} root{}",
                b.arch.deb(),
                if b.arch.cross().is_some() {
                    " (under qemu-user through binfmt_misc)"
                } else {
                    ""
                }
            ));
            let started = Instant::now();
            install_test(b.arch, &b.package)?;
            installed.push((b.arch, started.elapsed().as_secs_f64()));
        }
    }
    step("summary");
    for b in &built {
        println!(
            "{:<6} {:>5.1} MB binary, built in {:>4.0} s; {}; {} ({:.1} MB)",
            b.arch.deb(),
            size_mb(&b.binary)?,
            b.build_seconds,
            b.tests,
            b.package.display(),
            size_mb(&b.package)?
        );
    }
    for (arch, seconds) in installed {
        println!(
            "{:<6} installed, checked, removed and purged in a clean {SUITE} root in {seconds:.0} s",
            arch.deb()
        );
    }
    Ok(())
}

fn step(name: &str) {
    println!("\n=== xtask dist: {name}");
}

fn size_mb(path: &Path) -> Result<f64> {
    let bytes = std::fs::metadata(path)
        .with_context(|| format!("reading {}", path.display()))?
        .len();
    Ok(bytes as f64 / 1e6)
}

fn dist_dir() -> PathBuf {
    workspace_root().join("target/dist")
}

/// Cargo's target dir for one architecture, its own under target/dist
/// (`arm64`, `armhf`, and `host` for amd64, built by rustup's rustc), so
/// the architectures can build at once instead of waiting for one lock.
fn target_dir(arch: Arch) -> PathBuf {
    match arch {
        Arch::Arm64 | Arch::Armhf => dist_dir().join(arch.deb()),
        Arch::Amd64 => dist_dir().join("host"),
    }
}

fn cargo_deb_installed() -> bool {
    Command::new("cargo")
        .args(["deb", "--version"])
        .output()
        .is_ok_and(|out| {
            out.status.success()
                && String::from_utf8_lossy(&out.stdout)
                    .split_whitespace()
                    .any(|word| word.starts_with(&format!("{CARGO_DEB_VERSION}.")))
        })
}

fn ensure_cargo_deb() -> Result<()> {
    if cargo_deb_installed() {
        println!("setup: cargo-deb {CARGO_DEB_VERSION} present");
        return Ok(());
    }
    println!("setup: cargo install cargo-deb {CARGO_DEB_VERSION} (a few minutes)");
    exec(
        Command::new("cargo")
            .args(["install", "--locked", "cargo-deb", "--version"])
            .arg(format!("^{CARGO_DEB_VERSION}")),
    )?;
    ensure!(
        cargo_deb_installed(),
        "cargo-deb {CARGO_DEB_VERSION} is still missing after `cargo install cargo-deb`"
    );
    Ok(())
}

/// Which cargo profile a build in target/dist uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Profile {
    /// The shipped binary.
    Release,
    /// The lib unit tests under qemu: the dev profile, see
    /// [`UNIT_TEST_PROFILE`].
    Test,
}

/// Settings of the unit-test build for the Pis (`--config` of cargo). The
/// standard library built by `-Z build-std` takes the profile of the
/// build; at opt-level 0 it and the crypto crates run slowly under qemu,
/// so dependencies get opt-level 1, the agent itself 0 (its code is what
/// changes between runs). No debug info: it doubles link time and disk,
/// and panics still name their file and line. No incremental state: the
/// build is made once per run.
const UNIT_TEST_PROFILE: &[&str] = &[
    "profile.dev.debug=0",
    "profile.dev.incremental=false",
    "profile.dev.package.\"*\".opt-level=1",
];

/// `cargo` for one architecture's build in target/dist: Debian's rustc
/// with the standard library built from source for the Pis, rustup's
/// toolchain for amd64.
fn cargo(arch: Arch, subcommand: &str, profile: Profile) -> Command {
    let root = workspace_root();
    let mut command = Command::new("cargo");
    command
        .current_dir(&root)
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("RUSTC_WRAPPER")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env("CARGO_TARGET_DIR", target_dir(arch))
        // agent/build.rs embeds target/ebpf's object by default; setting
        // FAROL_EBPF_OBJECT to the same path would only make cargo rebuild.
        .env_remove("FAROL_EBPF_OBJECT")
        // The workspace's release profile keeps debug info for benchmarks'
        // profiles; a Pi gets symbols (panics name functions) but no
        // debug info: the binary is a third of the size.
        .env("CARGO_PROFILE_RELEASE_DEBUG", "0")
        .env("CARGO_PROFILE_RELEASE_STRIP", "debuginfo")
        .arg(subcommand);
    if let Some((linker, _, _)) = arch.cross() {
        command
            .env("RUSTC", toolchain::DEBIAN_RUSTC)
            .env("RUSTC_BOOTSTRAP", "1")
            .env(arch.cargo_env("LINKER"), linker)
            .env(arch.cargo_env("RUNNER"), arch.runner().join(" "))
            .args(["-Z", "build-std=std,panic_abort"]);
    } else {
        command.env_remove("RUSTC");
    }
    match profile {
        Profile::Release => {
            command.arg("--release");
        }
        Profile::Test => {
            for setting in UNIT_TEST_PROFILE {
                command.args(["--config", setting]);
            }
        }
    }
    command
        .args(["-p", "farol-agent", "--target"])
        .arg(arch.triple());
    command
}

fn binary_path(arch: Arch) -> PathBuf {
    target_dir(arch).join(arch.triple()).join("release/agent")
}

fn build(arch: Arch) -> Result<PathBuf> {
    if !ebpf_object().exists() {
        bail!(
            "{} is missing: `cargo xtask build-ebpf`",
            ebpf_object().display()
        );
    }
    exec(cargo(arch, "build", Profile::Release).args(["--bin", "agent"]))?;
    let binary = binary_path(arch);
    let file = capture(Command::new("file").arg("-b").arg(&binary))
        .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_owned())
        .unwrap_or_else(|_| "(file(1) is not installed)".into());
    println!("dist: {}: {file}", binary.display());
    Ok(binary)
}

/// A program of `arch` run on this machine (through qemu-user for the Pis).
fn run_as(arch: Arch, binary: &Path) -> Command {
    let runner = arch.runner();
    match runner.split_first() {
        Some((program, args)) => {
            let mut command = Command::new(program);
            command.args(args).arg(binary);
            command
        }
        None => Command::new(binary),
    }
}

/// `agent --version`, `check-config` of the lab's and the example cluster
/// file, and a broken file refused with its key path and exit status 2.
fn smoke(arch: Arch, binary: &Path) -> Result<()> {
    let root = workspace_root();
    let version = capture(run_as(arch, binary).arg("--version"))?;
    let version = String::from_utf8_lossy(&version.stdout).trim().to_owned();
    ensure!(
        version == format!("agent {}", env!("CARGO_PKG_VERSION")),
        "`agent --version` printed {version:?}"
    );
    println!("dist: {}: {version}", arch.deb());
    for config in ["configs/lab.toml", "configs/nuster.toml"] {
        let out = capture(
            run_as(arch, binary)
                .current_dir(&root)
                .args(["check-config", config]),
        )?;
        let text = String::from_utf8_lossy(&out.stdout);
        ensure!(
            text.contains(": ok: cluster"),
            "check-config {config}: {text}"
        );
        println!("dist: {}: {}", arch.deb(), text.trim());
    }
    let broken = dist_dir().join(format!("broken-{}.toml", arch.deb()));
    let lab = std::fs::read_to_string(root.join("configs/lab.toml"))?;
    std::fs::write(
        &broken,
        lab.replacen("xdp_mode = \"auto\"", "xdp_mode = \"turbo\"", 1),
    )?;
    let out = run_as(arch, binary)
        .arg("check-config")
        .arg(&broken)
        .output()
        .context("run check-config on a broken file")?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.code() == Some(2)
            && stderr.contains("cluster.xdp_mode")
            && stderr.contains(&broken.display().to_string()),
        "a broken config must be refused with exit status 2, its file and key: {out:?}"
    );
    println!(
        "dist: {}: broken config refused (exit 2): {}",
        arch.deb(),
        stderr.lines().next().unwrap_or_default()
    );
    Ok(())
}

/// A child process stopped (SIGTERM, then SIGKILL) on every path out.
struct ChildGuard(std::process::Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child's PID, which we have not reaped.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + std::time::Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `agent pooler` of `arch` (under qemu for the Pis) between psql and a
/// real PostgreSQL 15: md5 authentication, a transaction-mode pool, DDL,
/// writes and a read through it.
fn pooler_smoke(arch: Arch, binary: &Path) -> Result<()> {
    const USER: &str = "app";
    const PASSWORD: &str = "farol-dist-pw";
    let pg = xtask::postgres::PgCluster::start(&format!("dist-{}", arch.deb()), false)?;
    pg.primary
        .psql("postgres", &format!("CREATE ROLE {USER} LOGIN"))?;
    pg.primary
        .psql("postgres", &format!("CREATE DATABASE {USER} OWNER {USER}"))?;
    let secret = xtask::postgres::md5_secret(USER, PASSWORD)?;
    let port = xtask::postgres::free_port()?;
    let config = dist_dir().join(format!("pooler-{}.toml", arch.deb()));
    std::fs::write(
        &config,
        format!(
            r#"[cluster]
name = "dist"

[[node]]
name = "dist"
address = "192.0.2.1/24"
interface = "lo"

[pooler]
listen = "127.0.0.1:{port}"
primary = "127.0.0.1:{primary}"

[[pooler.users]]
name = "{USER}"
secret = "{secret}"

[[pooler.pools]]
database = "{USER}"
mode = "transaction"
pool_size = 2
"#,
            primary = pg.primary.port
        ),
    )?;
    let log_path = dist_dir().join(format!("pooler-{}.log", arch.deb()));
    let _pooler = ChildGuard(
        run_as(arch, binary)
            .args(["pooler", "--config"])
            .arg(&config)
            .env("FAROL_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log_path)?)
            .spawn()
            .context("start agent pooler")?,
    );
    let psql = |sql: &str| -> Result<String> {
        let out = capture(
            Command::new("psql")
                .env("PGPASSWORD", PASSWORD)
                .env("PGCONNECT_TIMEOUT", "5")
                .args([
                    "-X",
                    "-q",
                    "-A",
                    "-t",
                    "-v",
                    "ON_ERROR_STOP=1",
                    "-h",
                    "127.0.0.1",
                ])
                .args(["-p", &port.to_string(), "-U", USER, "-d", USER, "-c", sql]),
        )?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    };
    // qemu starts the pooler in well under a second; allow for a loaded machine.
    let deadline = Instant::now() + std::time::Duration::from_secs(30);
    let first = loop {
        match psql("SELECT 1") {
            Ok(answer) => break answer,
            Err(error) if Instant::now() > deadline => {
                let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                return Err(error.context(format!("the pooler never answered; its log:\n{log}")));
            }
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(200)),
        }
    };
    ensure!(first == "1", "SELECT 1 through the pooler gave {first:?}");
    psql("CREATE TABLE IF NOT EXISTS dist_smoke (n int)")?;
    psql("INSERT INTO dist_smoke SELECT generate_series(1, 100)")?;
    let sum = psql("SELECT sum(n) FROM dist_smoke")?;
    ensure!(sum == "5050", "sum through the pooler: {sum:?}");
    let direct = pg.primary.psql(USER, "SELECT count(*) FROM dist_smoke")?;
    ensure!(direct == "100", "PostgreSQL itself holds {direct} rows");
    println!(
        "dist: {}: psql -> agent pooler (md5, transaction pool) -> PostgreSQL 15: SELECT, DDL, 100 rows written and read back",
        arch.deb()
    );
    Ok(())
}

/// `--test-under-qemu`: the unit tests of every foreign architecture asked
/// for, one after the other, and a summary.
fn test_under_qemu(arches: &[Arch]) -> Result<()> {
    let mut results = Vec::new();
    for &arch in arches {
        if arch.cross().is_none() {
            println!(
                "dist: {}: unit tests run on the host by `cargo xtask test`",
                arch.deb()
            );
            continue;
        }
        step(&format!("{}: agent unit tests under qemu", arch.deb()));
        results.push((arch, unit_tests(arch)?));
    }
    step("summary");
    for (arch, result) in results {
        println!("{:<6} {result}", arch.deb());
    }
    Ok(())
}

/// The agent's lib unit tests, built for `arch` (dev profile, see
/// [`UNIT_TEST_PROFILE`]) and run by cargo through qemu-user
/// (`CARGO_TARGET_<TRIPLE>_RUNNER`) with the cross C library as its
/// sysroot. Returns a one-line result with the build and run times.
fn unit_tests(arch: Arch) -> Result<String> {
    let started = Instant::now();
    exec(cargo(arch, "test", Profile::Test).args(["--lib", "--no-run"]))?;
    let build_seconds = started.elapsed().as_secs_f64();
    println!(
        "dist: {}: unit tests built in {build_seconds:.0} s",
        arch.deb()
    );
    let started = Instant::now();
    let mut command = cargo(arch, "test", Profile::Test);
    command.args(["--lib", "--", "--test-threads", "2"]);
    for (name, why) in SKIPPED_UNDER_QEMU {
        println!("dist: skipping {name} under qemu: {why}");
        command.args(["--skip", name]);
    }
    // Build progress and failures on the terminal, results captured.
    let output = command
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("run cargo test under qemu")?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    print!(
        "{}",
        stdout
            .lines()
            .filter(|l| !l.ends_with(" ... ok"))
            .map(|l| format!("{l}\n"))
            .collect::<String>()
    );
    if !output.status.success() {
        bail!(
            "the agent's unit tests failed under qemu for {}",
            arch.deb()
        );
    }
    let result = stdout
        .lines()
        .rfind(|line| line.starts_with("test result:"))
        .unwrap_or("test result: (none)")
        .trim_start_matches("test result: ")
        .to_owned();
    Ok(format!(
        "unit tests under qemu: {result} (built in {build_seconds:.0} s, ran in {:.0} s)",
        started.elapsed().as_secs_f64()
    ))
}

/// `cargo deb` of the built binary (no rebuild); returns the .deb.
fn package(arch: Arch) -> Result<PathBuf> {
    let out_dir = dist_dir().join("deb");
    std::fs::create_dir_all(&out_dir)?;
    let output = capture(
        Command::new("cargo")
            .current_dir(workspace_root())
            .env("CARGO_TARGET_DIR", target_dir(arch))
            .args(["deb", "-p", "farol-agent", "--no-build", "--target"])
            .arg(arch.triple())
            .arg("--output")
            .arg(&out_dir),
    )?;
    let path = String::from_utf8_lossy(&output.stdout)
        .lines()
        .rev()
        .find(|line| line.trim().ends_with(".deb"))
        .map(|line| PathBuf::from(line.trim()))
        .context("cargo deb did not print the package's path")?;
    println!("dist: {}", path.display());
    Ok(path)
}

/// The package says the right architecture, name and dependencies, and
/// holds the binary, the unit and the conffiles.
fn check_package_contents(arch: Arch, deb: &Path) -> Result<()> {
    let field = |name: &str| -> Result<String> {
        let out = capture(Command::new("dpkg-deb").arg("-f").arg(deb).arg(name))?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    };
    ensure!(field("Package")? == PACKAGE, "package name");
    ensure!(
        field("Architecture")? == arch.deb(),
        "{} says Architecture {}",
        deb.display(),
        field("Architecture")?
    );
    let depends = field("Depends")?;
    ensure!(depends.contains("libc6"), "Depends: {depends}");
    let listing = capture(Command::new("dpkg-deb").arg("-c").arg(deb))?;
    let listing = String::from_utf8_lossy(&listing.stdout);
    for wanted in [
        INSTALLED_BINARY,
        CONFIG,
        "/etc/farol/apache/farol.conf",
        "/usr/lib/systemd/system/farol-agent.service",
    ] {
        ensure!(
            listing.contains(&format!(".{wanted}")),
            "{} lacks {wanted}:\n{listing}",
            deb.display()
        );
    }
    let control = capture(
        Command::new("dpkg-deb")
            .arg("--ctrl-tarfile")
            .arg(deb)
            .env("LC_ALL", "C"),
    )?;
    ensure!(!control.stdout.is_empty(), "empty control archive");
    let conffiles = unpack_control_file(arch, deb, "conffiles")?;
    ensure!(
        conffiles.lines().any(|line| line == CONFIG),
        "{CONFIG} is not a conffile: {conffiles:?}"
    );
    // The packaged binary itself runs (here, or under qemu for the Pis).
    let staging = dist_dir().join(format!("unpacked-{}", arch.deb()));
    let _ = std::fs::remove_dir_all(&staging);
    exec(Command::new("dpkg-deb").arg("-x").arg(deb).arg(&staging))?;
    let binary = staging.join(INSTALLED_BINARY.trim_start_matches('/'));
    let out = capture(
        run_as(arch, &binary)
            .arg("check-config")
            .arg(staging.join(CONFIG.trim_start_matches('/'))),
    )?;
    println!(
        "dist: {} package: {depends}; its binary checks its conffile: {}",
        arch.deb(),
        String::from_utf8_lossy(&out.stdout).trim()
    );
    std::fs::remove_dir_all(&staging)?;
    Ok(())
}

fn unpack_control_file(arch: Arch, deb: &Path, name: &str) -> Result<String> {
    let dir = dist_dir().join(format!("control-{}", arch.deb()));
    let _ = std::fs::remove_dir_all(&dir);
    exec(Command::new("dpkg-deb").arg("-e").arg(deb).arg(&dir))?;
    let text = std::fs::read_to_string(dir.join(name)).unwrap_or_default();
    std::fs::remove_dir_all(&dir)?;
    Ok(text)
}

/// The apt mirror this machine uses (deb822 or one-line sources).
fn apt_mirror() -> String {
    let candidates = [
        "/etc/apt/sources.list.d/debian.sources",
        "/etc/apt/sources.list",
    ];
    for path in candidates {
        let Ok(text) = std::fs::read_to_string(path) else {
            continue;
        };
        for line in text.lines().map(str::trim) {
            if line.starts_with('#') {
                continue;
            }
            let uri = line
                .strip_prefix("URIs:")
                .map(str::trim)
                .or_else(|| line.strip_prefix("deb ").map(str::trim))
                .and_then(|rest| rest.split_whitespace().find(|w| w.starts_with("http")));
            if let Some(uri) = uri {
                if !uri.contains("security") {
                    return uri.to_owned();
                }
            }
        }
    }
    "http://deb.debian.org/debian".to_owned()
}

/// Where the kernel's binfmt_misc handlers are (see binfmt_misc(5)).
const BINFMT_MISC: &str = "/proc/sys/fs/binfmt_misc";

/// The kernel runs `arch`'s programs through qemu-user, as a Pi's root
/// needs for a chroot (debootstrap's second stage, apt, dpkg's scripts and
/// the agent itself): binfmt_misc mounted, and the handler qemu-user-static
/// ships registered if it is not yet. Its `F` flag makes the kernel open
/// the emulator now, so it also works inside the chroot without a copy of
/// qemu there. Registration is what `update-binfmts --enable` or
/// systemd-binfmt would do; neither runs in this container.
fn ensure_binfmt(arch: Arch) -> Result<()> {
    let name = match arch {
        Arch::Arm64 => "qemu-aarch64",
        Arch::Armhf => "qemu-arm",
        Arch::Amd64 => return Ok(()),
    };
    let dir = Path::new(BINFMT_MISC);
    if !dir.join("register").exists() {
        println!("dist: mount -t binfmt_misc binfmt_misc {BINFMT_MISC}");
        exec(
            Command::new("mount")
                .args(["-t", "binfmt_misc", "binfmt_misc"])
                .arg(dir),
        )
        .context("mount binfmt_misc (needs root and a kernel with binfmt_misc)")?;
    }
    let handler = dir.join(name);
    if !handler.exists() {
        let conf = Path::new("/usr/lib/binfmt.d").join(format!("{name}.conf"));
        let rule = std::fs::read_to_string(&conf)
            .with_context(|| format!("reading {} (qemu-user-static)", conf.display()))?;
        let rule = rule
            .lines()
            .find(|line| line.starts_with(':'))
            .with_context(|| format!("{} holds no binfmt rule", conf.display()))?;
        println!(
            "dist: registering {name} with binfmt_misc from {}",
            conf.display()
        );
        std::fs::write(dir.join("register"), rule)
            .with_context(|| format!("registering {name} in {BINFMT_MISC}/register"))?;
    }
    let state = std::fs::read_to_string(&handler)
        .with_context(|| format!("reading {}", handler.display()))?;
    let enabled = |text: &str| text.lines().next() == Some("enabled");
    ensure!(
        enabled(&state) && enabled(&std::fs::read_to_string(dir.join("status"))?),
        "{} is registered but disabled: `echo 1 > {}`",
        handler.display(),
        handler.display()
    );
    let interpreter = state
        .lines()
        .find_map(|line| line.strip_prefix("interpreter "))
        .unwrap_or("?");
    println!(
        "dist: binfmt_misc runs {} programs with {interpreter}",
        arch.deb()
    );
    Ok(())
}

/// A minimal bookworm root of `arch`, made once and reused (it returns to
/// the same state after every test: the package is purged). For the Pis'
/// architectures debootstrap's second stage runs under qemu-user.
fn debootstrap_root(arch: Arch) -> Result<PathBuf> {
    let base = dist_dir().join("debootstrap");
    let root = base.join(format!("{SUITE}-{}", arch.deb()));
    let done = base.join(format!("{SUITE}-{}.done", arch.deb()));
    if done.exists() {
        println!("dist: reusing {}", root.display());
        return Ok(root);
    }
    let cache = base.join("cache");
    std::fs::create_dir_all(&cache)?;
    let _ = std::fs::remove_dir_all(&root);
    let mirror = apt_mirror();
    println!(
        "dist: debootstrap --variant=minbase {SUITE} {} {mirror}",
        root.display()
    );
    let started = Instant::now();
    exec(
        Command::new("debootstrap")
            .arg("--variant=minbase")
            .arg(format!("--arch={}", arch.deb()))
            .arg(format!("--cache-dir={}", cache.display()))
            .arg(SUITE)
            .arg(&root)
            .arg(&mirror),
    )?;
    std::fs::write(&done, "")?;
    println!(
        "dist: {} root made in {:.0} s",
        arch.deb(),
        started.elapsed().as_secs_f64()
    );
    Ok(root)
}

/// /proc mounted in the root while apt runs, unmounted on every path out.
struct ProcMount(PathBuf);

impl ProcMount {
    fn new(root: &Path) -> Result<ProcMount> {
        let target = root.join("proc");
        exec(
            Command::new("mount")
                .args(["-t", "proc", "proc"])
                .arg(&target),
        )?;
        Ok(ProcMount(target))
    }
}

impl Drop for ProcMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Every file of the root except apt's and dpkg's own state and logs.
fn file_list(root: &Path) -> Result<std::collections::BTreeSet<String>> {
    let out = capture(
        Command::new("find")
            .arg(root)
            .args(["-xdev", "-path"])
            .arg(root.join("proc"))
            .args(["-prune", "-o", "-print"]),
    )?;
    let volatile = [
        "/var/lib/dpkg/",
        "/var/lib/apt/",
        "/var/cache/",
        "/var/log/",
        "/tmp/",
        "/etc/ld.so.cache",
    ];
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| line.strip_prefix(&root.display().to_string()))
        .filter(|path| !volatile.iter().any(|v| path.starts_with(v)))
        .map(str::to_owned)
        .collect())
}

fn chroot(root: &Path, args: &[&str]) -> Command {
    let mut command = Command::new("chroot");
    command
        .arg(root)
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("LC_ALL", "C");
    command
}

/// `apt install ./farol_*_ARCH.deb` in a clean root of that architecture,
/// the binary runs and checks the installed config; `apt remove` keeps
/// only the conffiles, `apt purge` leaves the root as it was.
fn install_test(arch: Arch, deb: &Path) -> Result<()> {
    if !xtask::is_root() {
        bail!("the install test chroots into a Debian root: run it as root");
    }
    ensure_binfmt(arch)?;
    let root = debootstrap_root(arch)?;
    let _proc = ProcMount::new(&root)?;
    // A previous run cut short may have left the package installed.
    let _ = chroot(&root, &["apt-get", "purge", "-y", "-qq", PACKAGE]).output();
    let before = file_list(&root)?;
    let name = deb.file_name().context("package file name")?;
    std::fs::copy(deb, root.join("tmp").join(name))?;
    let inside = format!("/tmp/{}", name.to_string_lossy());
    exec(&mut chroot(
        &root,
        &[
            "apt-get",
            "install",
            "-y",
            "-q",
            "--no-install-recommends",
            &inside,
        ],
    ))?;
    let out = capture(&mut chroot(&root, &[INSTALLED_BINARY, "--version"]))?;
    println!(
        "dist: installed: {}",
        String::from_utf8_lossy(&out.stdout).trim()
    );
    let out = capture(&mut chroot(
        &root,
        &[INSTALLED_BINARY, "check-config", CONFIG],
    ))?;
    println!(
        "dist: installed: {}",
        String::from_utf8_lossy(&out.stdout).trim()
    );
    let unit = root.join("usr/lib/systemd/system/farol-agent.service");
    ensure!(unit.exists(), "{} is missing", unit.display());
    let installed = file_list(&root)?;
    let added: Vec<&String> = installed.difference(&before).collect();
    println!("dist: the package added {} paths", added.len());

    exec(&mut chroot(
        &root,
        &["apt-get", "remove", "-y", "-q", PACKAGE],
    ))?;
    let status = capture(&mut chroot(
        &root,
        &["dpkg-query", "-W", "-f=${db:Status-Status}", PACKAGE],
    ))?;
    ensure!(
        status.stdout == b"config-files",
        "after remove, dpkg says {:?}",
        String::from_utf8_lossy(&status.stdout)
    );
    let left: Vec<String> = file_list(&root)?.difference(&before).cloned().collect();
    let expected_left = [
        "/etc/farol",
        CONFIG,
        "/etc/farol/apache",
        "/etc/farol/apache/farol.conf",
    ];
    // debhelper's standard on remove (cargo-deb's snippet): the unit is
    // masked while its conffiles stay, so nothing starts it, and
    // deb-systemd-helper keeps its state in /var/lib/systemd; purge undoes both.
    let masked = |path: &str| {
        path.starts_with("/etc/systemd/system") || path.starts_with("/var/lib/systemd")
    };
    ensure!(
        left.iter()
            .all(|path| expected_left.contains(&path.as_str()) || masked(path))
            && left.iter().any(|p| p == CONFIG),
        "after remove only the conffiles may stay, found: {left:?}"
    );
    println!("dist: removed; left (conffiles): {}", left.join(" "));

    exec(&mut chroot(
        &root,
        &["apt-get", "purge", "-y", "-q", PACKAGE],
    ))?;
    let left: Vec<String> = file_list(&root)?.difference(&before).cloned().collect();
    ensure!(left.is_empty(), "after purge these are left: {left:?}");
    let gone: Vec<String> = before.difference(&file_list(&root)?).cloned().collect();
    ensure!(
        gone.is_empty(),
        "install and purge removed files of the root: {gone:?}"
    );
    println!("dist: purged: the root is as it was");
    let _ = std::fs::remove_file(root.join("tmp").join(name));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unit_file() -> String {
        std::fs::read_to_string(workspace_root().join("packaging/farol-agent.service")).unwrap()
    }

    /// systemd's own parser would be better; systemd-analyze is not in
    /// every CI image, so this reads the keys the package relies on.
    fn values(unit: &str, key: &str) -> Vec<String> {
        unit.lines()
            .filter_map(|line| line.strip_prefix(&format!("{key}=")))
            .map(str::to_owned)
            .collect()
    }

    #[test]
    fn the_unit_runs_the_packaged_binary_with_the_packaged_config() {
        let unit = unit_file();
        assert_eq!(
            values(&unit, "ExecStart"),
            [format!("{INSTALLED_BINARY} run --config {CONFIG}")]
        );
        assert_eq!(values(&unit, "Restart"), ["on-failure"]);
        assert_eq!(values(&unit, "After"), ["network-online.target"]);
        assert_eq!(values(&unit, "Wants"), ["network-online.target"]);
        assert_eq!(values(&unit, "WantedBy"), ["multi-user.target"]);
    }

    #[test]
    fn every_capability_of_the_unit_is_justified_and_bounded() {
        let unit = unit_file();
        let bounding = values(&unit, "CapabilityBoundingSet");
        let ambient = values(&unit, "AmbientCapabilities");
        assert_eq!(bounding.len(), 1);
        assert_eq!(bounding, ambient, "the same set in both");
        let caps: Vec<&str> = bounding[0].split_whitespace().collect();
        for needed in ["CAP_BPF", "CAP_NET_ADMIN", "CAP_NET_RAW"] {
            assert!(caps.contains(&needed), "{needed} missing from {caps:?}");
        }
        let comments: String = unit
            .lines()
            .filter(|l| l.starts_with('#'))
            .collect::<Vec<_>>()
            .join("\n");
        for cap in caps {
            let short = cap.trim_start_matches("CAP_");
            assert!(
                comments.contains(cap)
                    || comments
                        .split(|c: char| !c.is_ascii_alphanumeric() && c != '_')
                        .any(|w| w == short),
                "{cap} has no comment saying why"
            );
        }
    }

    fn args(command: &Command) -> Vec<String> {
        command
            .get_args()
            .map(|arg| arg.to_string_lossy().into_owned())
            .collect()
    }

    fn env(command: &Command, key: &str) -> Option<String> {
        command
            .get_envs()
            .find_map(|(k, v)| (k == key).then(|| v.map(|v| v.to_string_lossy().into_owned()))?)
    }

    #[test]
    fn the_unit_test_build_for_a_pi_is_a_dev_build_run_through_qemu() {
        let test = cargo(Arch::Armhf, "test", Profile::Test);
        let test_args = args(&test);
        assert!(
            !test_args.contains(&"--release".to_owned()),
            "{test_args:?}"
        );
        assert!(
            test_args.contains(&"build-std=std,panic_abort".to_owned()),
            "{test_args:?}"
        );
        for setting in UNIT_TEST_PROFILE {
            assert!(
                test_args
                    .windows(2)
                    .any(|pair| pair[0] == "--config" && pair[1] == *setting),
                "{setting} missing from {test_args:?}"
            );
        }
        assert_eq!(
            env(&test, "CARGO_TARGET_ARMV7_UNKNOWN_LINUX_GNUEABIHF_RUNNER").as_deref(),
            Some("qemu-arm-static -L /usr/arm-linux-gnueabihf")
        );
        // The same target dir as the release build of that architecture.
        let release = cargo(Arch::Armhf, "build", Profile::Release);
        assert!(args(&release).contains(&"--release".to_owned()));
        assert_eq!(
            env(&test, "CARGO_TARGET_DIR"),
            env(&release, "CARGO_TARGET_DIR")
        );
        assert_eq!(
            args(&cargo(Arch::Arm64, "test", Profile::Test))
                .iter()
                .skip_while(|a| *a != "--target")
                .nth(1)
                .map(String::as_str),
            Some("aarch64-unknown-linux-gnu")
        );
    }

    /// The Pis' unit-test build compiles the agent's dev-dependencies for
    /// the target: xtask (the labs, and everything it depends on) must stay
    /// a dev-dependency of the x86_64 host only.
    #[test]
    fn xtask_is_a_dev_dependency_of_the_host_only() {
        let manifest: toml::Value = toml::from_str(
            &std::fs::read_to_string(workspace_root().join("agent/Cargo.toml")).unwrap(),
        )
        .unwrap();
        let everywhere = manifest["dev-dependencies"].as_table().unwrap();
        assert!(!everywhere.contains_key("xtask"), "{everywhere:?}");
        let host = manifest["target"]["cfg(target_arch = \"x86_64\")"]["dev-dependencies"]
            .as_table()
            .unwrap();
        assert!(host.contains_key("xtask"), "{host:?}");
    }

    #[test]
    fn the_package_metadata_names_files_that_exist() {
        let manifest: toml::Value = toml::from_str(
            &std::fs::read_to_string(workspace_root().join("agent/Cargo.toml")).unwrap(),
        )
        .unwrap();
        let deb = &manifest["package"]["metadata"]["deb"];
        assert_eq!(deb["name"].as_str(), Some(PACKAGE));
        let assets = deb["assets"].as_array().unwrap();
        let mut targets = Vec::new();
        for asset in assets {
            let source = asset[0].as_str().unwrap();
            targets.push(asset[1].as_str().unwrap().to_owned());
            if source.starts_with("target/") {
                continue; // built by `cargo xtask dist`
            }
            let path = workspace_root().join("agent").join(source);
            assert!(path.exists(), "asset {} is missing", path.display());
        }
        assert!(
            targets.iter().any(|t| format!("/{t}") == INSTALLED_BINARY),
            "{targets:?}"
        );
        assert!(
            targets.iter().any(|t| format!("/{t}") == CONFIG),
            "{targets:?}"
        );
        let unit_dir = deb["systemd-units"]["unit-scripts"].as_str().unwrap();
        assert!(workspace_root()
            .join("agent")
            .join(unit_dir)
            .join("farol-agent.service")
            .exists());
    }
}
