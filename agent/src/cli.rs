//! The command line. Every flag can also come from the environment.

use std::{net::SocketAddr, path::PathBuf};

use clap::{Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "agent",
    version,
    about = "Farol node agent: one binary for the web, database and storage cluster"
)]
pub struct Cli {
    /// Log format.
    #[arg(long, global = true, env = "FAROL_LOG_FORMAT", default_value = "text")]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run this node's agent until SIGINT or SIGTERM (which remove the data
    /// plane) or SIGUSR2 (which leaves it running for the next agent).
    Run(RunArgs),
    /// Validate a cluster file and print every problem with its key path.
    CheckConfig(CheckConfigArgs),
    /// Remove what a stopped (or crashed) agent left running: the pinned
    /// XDP link and maps, and the VIPs on `lo`.
    Teardown(RunArgs),
    /// Replicated volumes: serve without XDP, heal-info, heal.
    Volume(crate::storage::cli::VolumeArgs),
    /// Run only the PostgreSQL pooler of the cluster file (no data plane,
    /// no root needed); for benchmarks and tests.
    #[command(hide = true)]
    Pooler(PoolerArgs),
}

#[derive(Debug, clap::Args)]
pub struct PoolerArgs {
    /// The cluster file with a [pooler] section.
    #[arg(long, short, env = "FAROL_CONFIG")]
    pub config: PathBuf,
    /// Runtime worker threads (1: a single-threaded runtime, as PgBouncer;
    /// 2, as `agent run`).
    #[arg(long, env = "FAROL_POOLER_THREADS", default_value_t = 1)]
    pub threads: usize,
}

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// The cluster file (the same on every node).
    #[arg(
        long,
        short,
        env = "FAROL_CONFIG",
        default_value = "/etc/farol/cluster.toml"
    )]
    pub config: PathBuf,
    /// This node's name in the cluster file (default: the hostname).
    #[arg(long, env = "FAROL_NODE")]
    pub node: Option<String>,
    /// Overrides the pin directory of the config (tests run many labs at once).
    #[arg(long, env = "FAROL_PIN_DIR")]
    pub pin_dir: Option<PathBuf>,
    /// Overrides the metrics address of the config.
    #[arg(long, env = "FAROL_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// Start none of the config's `[[supervise]]` children (labs and tests
    /// that run their own web servers).
    #[arg(long, env = "FAROL_NO_SUPERVISE")]
    pub no_supervise: bool,
}

#[derive(Debug, clap::Args)]
pub struct CheckConfigArgs {
    /// The cluster file to check.
    pub config: PathBuf,
    /// Also check that this node exists in it.
    #[arg(long)]
    pub node: Option<String>,
}
