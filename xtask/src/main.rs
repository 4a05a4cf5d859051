//! `cargo xtask COMMAND`: Farol's developer commands.

mod bench_failover;
mod bench_pgha;
mod bench_volume;
mod chaos;
mod cluster;
mod demo;
mod demo_postgres;
mod dist;

use std::process::Command;

use anyhow::{bail, Result};
use clap::{Parser, Subcommand};
use xtask::{bench, exec, lab::Lab, toolchain, workspace_root};

#[derive(Debug, Parser)]
#[command(name = "cargo xtask", about = "Farol's developer commands")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// Install what the eBPF build and the lab need (idempotent).
    Setup,
    /// Build the eBPF object (runs setup first when something is missing).
    BuildEbpf,
    /// The cluster in network namespaces.
    Lab {
        #[command(subcommand)]
        action: LabAction,
        /// Prefix of the lab's namespaces; labs with different prefixes coexist.
        #[arg(long, global = true, default_value = "lab")]
        prefix: String,
    },
    /// Run the demo: lab up, an agent on every node, traffic, live counters, teardown.
    Demo {
        /// How long traffic runs.
        #[arg(long, default_value_t = 12)]
        seconds: u64,
    },
    /// The whole cluster under correlated failures (kill -9, power-off,
    /// partitions, a flapping link, a full disk, a clock jump); checks that
    /// nothing acknowledged is lost; writes target/bench/chaos.json.
    Chaos(chaos::ChaosArgs),
    /// Run every check and test: setup, eBPF build, fmt, clippy, unit and lab tests.
    Test,
    /// Release builds for the Pis (arm64, armhf) and amd64, tested under
    /// qemu, packaged as farol_*.deb in target/dist/deb; `--check` also
    /// installs and purges the amd64 package in a debootstrap root.
    Dist(dist::DistArgs),
    /// Benchmarks against a baseline in the same run; writes target/bench/NAME.json.
    Bench {
        /// Which benchmark.
        name: BenchName,
    },
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum BenchName {
    /// Time per packet of farol_ingress vs a bare XDP_PASS (BPF_PROG_TEST_RUN).
    Xdp,
    /// HTTP through Farol (DSR) vs HAProxy vs direct, with wrk on the lab.
    Lb,
    /// The replicated volume vs local ext4 (and GlusterFS when it runs);
    /// `volume` is an older name for it.
    #[value(alias = "volume")]
    Storage,
    /// pgbench through Farol's pooler vs direct, PgBouncer and pgpool-II.
    Pooler,
    /// Health checks: time to take a stopped backend out, failed requests.
    Health,
    /// VIP failover: Farol's VRRP pair vs keepalived + HAProxy, 10 ms and 1 s adverts.
    Failover,
    /// PostgreSQL failover under the agents: time to writes back, lost writes.
    Pgha,
}

#[derive(Debug, Subcommand)]
enum LabAction {
    /// Create the namespaces, bridge and links that are missing.
    Up,
    /// Stop every process in the lab's namespaces and delete them.
    Down,
    /// Show each host, its address, link and XDP program.
    Status,
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Task::Setup => toolchain::setup(),
        Task::BuildEbpf => toolchain::build_ebpf(),
        Task::Lab { action, prefix } => lab(action, &prefix),
        Task::Demo { seconds } => demo::run(seconds),
        Task::Chaos(args) => chaos::run(args),
        Task::Test => test(),
        Task::Dist(args) => dist::run(args),
        Task::Bench { name } => match name {
            BenchName::Xdp => {
                toolchain::build_ebpf()?;
                let report = bench::xdp()?;
                println!("wrote {}", report.write()?.display());
                Ok(())
            }
            BenchName::Lb => {
                let report = xtask::bench_lb::lb(10)?;
                println!("wrote {}", report.write()?.display());
                Ok(())
            }
            BenchName::Storage => {
                let report = bench_volume::run()?;
                println!("wrote {}", report.write()?.display());
                Ok(())
            }
            BenchName::Pooler => {
                let report = xtask::bench_pooler::run()?;
                println!("wrote {}", report.write()?.display());
                Ok(())
            }
            BenchName::Health => {
                let report = xtask::bench_health::run()?;
                println!("wrote {}", report.write()?.display());
                Ok(())
            }
            BenchName::Failover => {
                let report = bench_failover::run()?;
                println!("wrote {}", report.write()?.display());
                Ok(())
            }
            BenchName::Pgha => {
                let report = bench_pgha::run()?;
                println!("wrote {}", report.write()?.display());
                Ok(())
            }
        },
    }
}

fn require_root(what: &str) -> Result<()> {
    if !xtask::is_root() {
        bail!("{what} creates network namespaces and loads BPF programs: run it as root");
    }
    Ok(())
}

fn lab(action: LabAction, prefix: &str) -> Result<()> {
    require_root("lab")?;
    let lab = Lab::new(prefix)?;
    match action {
        LabAction::Up => {
            toolchain::build_ebpf()?;
            lab.up()?;
            println!("{}", lab.status()?);
        }
        LabAction::Down => {
            lab.down()?;
            println!("lab {prefix}: down");
        }
        LabAction::Status => println!("{}", lab.status()?),
    }
    Ok(())
}

fn cargo(args: &[&str]) -> Command {
    let mut command = Command::new("cargo");
    command.current_dir(workspace_root()).args(args);
    command
}

/// Every check CI runs, in order of cost.
fn test() -> Result<()> {
    require_root("test")?;
    let step = |name: &str| println!("\n=== xtask test: {name}");
    step("setup");
    toolchain::ensure_setup()?;
    step("build-ebpf");
    toolchain::build_ebpf()?;
    step("cargo fmt --check");
    exec(&mut cargo(&["fmt", "--all", "--check"]))?;
    toolchain::fmt_check_ebpf()?;
    step("cargo clippy -D warnings");
    exec(&mut cargo(&[
        "clippy",
        "--workspace",
        "--all-targets",
        "--quiet",
        "--",
        "-D",
        "warnings",
    ]))?;
    step("cargo test (unit, PROG_TEST_RUN and lab tests)");
    // Tests that need root skip themselves elsewhere; here they must run.
    exec(cargo(&["test", "--workspace"]).env("FAROL_TEST_REQUIRE_PRIVILEGES", "1"))?;
    println!("\nxtask test: all passed");
    Ok(())
}
