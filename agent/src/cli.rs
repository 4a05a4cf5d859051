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
    /// Show this node's VIPs, services and backends (state, weight, flows,
    /// last check and its latency), from the running agent.
    Status(ControlArgs),
    /// Drain, enable, disable or re-weight a backend at runtime.
    Backend(BackendArgs),
    /// Make the running agent re-read its config file (as SIGHUP does):
    /// only what changed is applied; a file with errors is refused.
    Reload(ControlArgs),
    /// Stop the running agent as SIGTERM does: its supervised children are
    /// drained at every balancer and stopped first.
    Stop(ControlArgs),
    /// The agents' shared cluster state: `status`, `set-primary NODE`.
    Cluster(crate::cluster::control::ClusterArgs),
    /// PostgreSQL under the agents: `switchover NODE`.
    Pg(crate::pgha::cli::PgArgs),
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
    /// Overrides the control socket (default: the node's `control_socket`,
    /// else /run/farol/NODE.sock).
    #[arg(long, env = "FAROL_CONTROL_SOCKET")]
    pub control_socket: Option<PathBuf>,
}

/// How the CLI finds a running agent's control socket.
#[derive(Debug, clap::Args)]
pub struct ControlArgs {
    /// The control socket (default: from the cluster file's node, else
    /// /run/farol/NODE.sock).
    #[arg(long, env = "FAROL_CONTROL_SOCKET")]
    pub socket: Option<PathBuf>,
    /// The cluster file, to find the node's control_socket.
    #[arg(
        long,
        short,
        env = "FAROL_CONFIG",
        default_value = "/etc/farol/cluster.toml"
    )]
    pub config: PathBuf,
    /// This node's name (default: the hostname).
    #[arg(long, env = "FAROL_NODE")]
    pub node: Option<String>,
    /// The pin directory `agent run` was given, when it was overridden (the
    /// default socket name derives from it).
    #[arg(long, env = "FAROL_PIN_DIR")]
    pub pin_dir: Option<PathBuf>,
    /// Print JSON instead of a table (`agent status`).
    #[arg(long)]
    pub json: bool,
    /// Talk to an agent's HTTP port instead (`http://HOST:9477`); needs
    /// the cluster's control_token_file.
    #[arg(long, env = "FAROL_CONTROL_URL")]
    pub url: Option<String>,
    /// The token file for --url.
    #[arg(long, env = "FAROL_CONTROL_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
pub struct BackendArgs {
    /// drain: no new flows, established ones finish; enable: back to
    /// normal; disable: out of service; weight: set the weight.
    pub action: BackendAction,
    /// The backend: a node name (or address) of a service.
    pub backend: String,
    /// The weight, for `weight` (0..=1000).
    pub weight: Option<u32>,
    /// Only in this service (default: every service).
    #[arg(long)]
    pub service: Option<String>,
    #[command(flatten)]
    pub control: ControlArgs,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum BackendAction {
    Drain,
    Enable,
    Disable,
    Weight,
}

impl BackendAction {
    pub fn label(self) -> &'static str {
        match self {
            BackendAction::Drain => "drain",
            BackendAction::Enable => "enable",
            BackendAction::Disable => "disable",
            BackendAction::Weight => "weight",
        }
    }
}

#[derive(Debug, clap::Args)]
pub struct CheckConfigArgs {
    /// The cluster file to check.
    pub config: PathBuf,
    /// Also check that this node exists in it.
    #[arg(long)]
    pub node: Option<String>,
}
