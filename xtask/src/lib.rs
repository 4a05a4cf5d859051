//! Farol's developer commands as a library: the binary (`cargo xtask ...`)
//! and the agent's integration tests share the lab, the packet builders and
//! the paths.
//!
//! - [`toolchain`]: `setup` (install what is missing) and `build-ebpf`.
//! - [`lab`]: the cluster in network namespaces, with guards for tests.
//! - [`packets`]: frames for PROG_TEST_RUN tests and benchmarks.
//! - [`bench`]: `xtask bench NAME` and its JSON report.
//! - [`postgres`]: PostgreSQL primary + standby guards for the pooler.

pub mod apache;
pub mod bench;
pub mod bench_health;
pub mod bench_lb;
pub mod bench_pooler;
pub mod footprint;
pub mod lab;
pub mod packets;
pub mod postgres;
pub mod toolchain;

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
};

use anyhow::{bail, Context, Result};

/// The workspace root (the directory of the top Cargo.toml).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask sits one level below the workspace root")
        .to_owned()
}

/// Where `cargo xtask build-ebpf` leaves the eBPF object.
pub fn ebpf_object() -> PathBuf {
    workspace_root().join("target/ebpf/bpfel-unknown-none/release/farol-ebpf")
}

fn describe(command: &Command) -> String {
    let mut text = command.get_program().to_string_lossy().into_owned();
    for arg in command.get_args() {
        text.push(' ');
        text.push_str(&arg.to_string_lossy());
    }
    text
}

/// Runs a command with inherited output; fails with the command line when
/// it cannot start or exits non-zero.
pub fn exec(command: &mut Command) -> Result<()> {
    let line = describe(command);
    let status = command
        .status()
        .with_context(|| format!("failed to start `{line}`"))?;
    if !status.success() {
        bail!("`{line}` failed with {status}");
    }
    Ok(())
}

/// Runs a command and captures its output; fails like [`exec`], with stderr.
pub fn capture(command: &mut Command) -> Result<Output> {
    let line = describe(command);
    let output = command
        .output()
        .with_context(|| format!("failed to start `{line}`"))?;
    if !output.status.success() {
        bail!(
            "`{line}` failed with {}: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(output)
}

/// True when this process runs as root.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}
