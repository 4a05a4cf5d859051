//! `agent`: the one binary on every Farol node.

use std::{path::Path, process::ExitCode};

use clap::Parser;
use farol_agent::{
    cli::{CheckConfigArgs, Cli, Command, LogFormat, PoolerArgs, RunArgs},
    config::Config,
    error_chain,
    node::{self, NodePlan},
};
use tokio::{signal::unix::SignalKind, sync::watch};
use tracing::{error, info};
use tracing_subscriber::EnvFilter;

/// Exit status for a config that does not load.
const EXIT_CONFIG: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.log_format);
    match cli.command {
        Command::CheckConfig(args) => check_config(&args),
        Command::Run(args) => run(args),
        Command::Teardown(args) => teardown(args),
        Command::Volume(args) => farol_agent::storage::cli::main(args),
        Command::Pooler(args) => pooler(&args),
        Command::Status(args) => farol_agent::control::client::main_status(&args),
        Command::Cluster(args) => farol_agent::cluster::control::main(&args),
        Command::Pg(args) => farol_agent::pgha::cli::main(&args),
        Command::Backend(args) => farol_agent::control::client::main_backend(&args),
        Command::Reload(args) => farol_agent::control::client::main_reload(&args),
        Command::Stop(args) => farol_agent::control::client::main_stop(&args),
    }
}

const DEFAULT_LOG: &str = "info,openraft=off";

/// FAROL_LOG's directives, openraft off unless they name it (FAROL_LOG=info,
/// what the lab tests set, would otherwise show its ERROR twice a second
/// per unreachable peer; the cluster module logs each peer change once).
fn log_directives(farol_log: Option<String>) -> String {
    match farol_log {
        None => DEFAULT_LOG.to_owned(),
        Some(directives) if directives.contains("openraft") => directives,
        Some(directives) if directives.trim().is_empty() => DEFAULT_LOG.to_owned(),
        Some(directives) => format!("{directives},openraft=off"),
    }
}

/// openraft logs every failed RPC to an unreachable peer (twice a second
/// per peer) at ERROR: the cluster module logs each change once instead
/// (`FAROL_LOG=info,openraft=info` shows openraft's own logs).
fn init_tracing(format: LogFormat) {
    let filter = EnvFilter::try_new(log_directives(std::env::var("FAROL_LOG").ok()))
        .unwrap_or_else(|_| EnvFilter::new(DEFAULT_LOG));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn check_config(args: &CheckConfigArgs) -> ExitCode {
    let config = match Config::load(&args.config) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("{error}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if let Some(name) = &args.node {
        if let Err(error) = config.node(&args.config, name) {
            eprintln!("{error}");
            return ExitCode::from(EXIT_CONFIG);
        }
    }
    let names: Vec<&str> = config.nodes.iter().map(|node| node.name.as_str()).collect();
    println!(
        "{}: ok: cluster {:?}, {} nodes ({})",
        args.config.display(),
        config.cluster.name,
        names.len(),
        names.join(", ")
    );
    ExitCode::SUCCESS
}

/// Loads the config and finds this node; prints why not.
fn node_plan(args: &RunArgs) -> Result<NodePlan, ExitCode> {
    let config = Config::load(&args.config).map_err(|error| {
        eprintln!("{error}");
        ExitCode::from(EXIT_CONFIG)
    })?;
    let Some(node_name) = args.node.clone().or_else(hostname) else {
        eprintln!("cannot tell which node this is: pass --node NAME (the hostname is unreadable)");
        return Err(ExitCode::from(EXIT_CONFIG));
    };
    let node = config.node(&args.config, &node_name).map_err(|error| {
        eprintln!("{error}");
        ExitCode::from(EXIT_CONFIG)
    })?;
    let mut plan = NodePlan::new(&config, node, args.pin_dir.clone(), args.metrics_listen);
    if args.no_supervise {
        std::sync::Arc::make_mut(&mut plan.config).supervise.clear();
    }
    plan.config_path = Some(args.config.clone());
    if let Some(socket) = &args.control_socket {
        plan.control_socket = socket.clone();
    }
    Ok(plan)
}

fn teardown(args: RunArgs) -> ExitCode {
    let plan = match node_plan(&args) {
        Ok(plan) => plan,
        Err(code) => return code,
    };
    let mut failed = false;
    match farol_agent::dataplane::teardown(&plan.pin_dir) {
        Ok(removed) if removed.is_empty() => {
            println!("{}: nothing pinned", plan.pin_dir.display())
        }
        Ok(removed) => {
            for path in removed {
                println!("unpinned {}", path.display());
            }
        }
        Err(error) => {
            eprintln!("{}", error_chain(&error));
            failed = true;
        }
    }
    let vips = farol_agent::balancer::local_vips(&plan.config, &plan.node);
    match farol_agent::balancer::remove_vips_from_lo(&vips) {
        Ok(removed) => {
            for vip in removed {
                println!("removed {vip} from lo");
            }
        }
        Err(error) => {
            eprintln!("{}", error_chain(&error));
            failed = true;
        }
    }
    match farol_agent::vrrp::teardown(&plan.config, &plan.node) {
        Ok(removed) => {
            for (vip, interface) in removed {
                println!("removed {vip} from {interface}");
            }
        }
        Err(error) => {
            eprintln!("{}", error_chain(&error));
            failed = true;
        }
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn run(args: RunArgs) -> ExitCode {
    let plan = match node_plan(&args) {
        Ok(plan) => plan,
        Err(code) => return code,
    };
    let keep_on_exit = plan.keep_on_exit.clone();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            error!(%error, "cannot start the async runtime");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let (stop_tx, stop_rx) = watch::channel(false);
        if let Err(error) = spawn_signal_handler(stop_tx, keep_on_exit) {
            error!(%error, "cannot install signal handlers");
            return ExitCode::FAILURE;
        }
        match node::run(plan, stop_rx).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                error!("{}", error_chain(&error));
                ExitCode::FAILURE
            }
        }
    })
}

/// `agent pooler`: only the PostgreSQL pooler, until SIGINT or SIGTERM.
fn pooler(args: &PoolerArgs) -> ExitCode {
    let config = match Config::load(&args.config) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("{error}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let Some(pooler_config) = config.pooler else {
        eprintln!("{}: pooler: no [pooler] section", args.config.display());
        return ExitCode::from(EXIT_CONFIG);
    };
    let mut builder = if args.threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        builder.worker_threads(args.threads);
        builder
    };
    let runtime = match builder.enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            error!(%error, "cannot start the async runtime");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let (stop_tx, stop_rx) = watch::channel(false);
        // The pooler alone has no data plane to keep: SIGUSR2 just stops it.
        let keep = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        if let Err(error) = spawn_signal_handler(stop_tx, keep) {
            error!(%error, "cannot install signal handlers");
            return ExitCode::FAILURE;
        }
        let served = async {
            let listener = farol_agent::pooler::bind(pooler_config.listen).await?;
            let pooler = farol_agent::pooler::Pooler::new(pooler_config)?;
            farol_agent::pooler::run(pooler, listener, stop_rx).await
        };
        match served.await {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                error!("{}", error_chain(&error));
                ExitCode::FAILURE
            }
        }
    })
}

/// SIGINT and SIGTERM stop the agent and remove the data plane (detach,
/// unpin, VIPs off `lo`); SIGUSR2 stops it and leaves the data plane
/// running for the next agent (an upgrade or restart without a lost flow).
fn spawn_signal_handler(
    stop: watch::Sender<bool>,
    keep_on_exit: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::io::Result<()> {
    let mut interrupt = tokio::signal::unix::signal(SignalKind::interrupt())?;
    let mut terminate = tokio::signal::unix::signal(SignalKind::terminate())?;
    let mut handover = tokio::signal::unix::signal(SignalKind::user_defined2())?;
    tokio::spawn(async move {
        let signal = tokio::select! {
            _ = interrupt.recv() => "SIGINT",
            _ = terminate.recv() => "SIGTERM",
            _ = handover.recv() => {
                keep_on_exit.store(true, std::sync::atomic::Ordering::SeqCst);
                "SIGUSR2"
            }
        };
        info!(signal, "stopping");
        let _ = stop.send(true);
    });
    Ok(())
}

fn hostname() -> Option<String> {
    let text = std::fs::read_to_string(Path::new("/proc/sys/kernel/hostname")).ok()?;
    let name = text.trim();
    (!name.is_empty()).then(|| name.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openraft_stays_quiet_unless_named() {
        assert_eq!(log_directives(None), "info,openraft=off");
        assert_eq!(log_directives(Some("info".into())), "info,openraft=off");
        assert_eq!(log_directives(Some("debug".into())), "debug,openraft=off");
        assert_eq!(
            log_directives(Some("info,openraft=warn".into())),
            "info,openraft=warn"
        );
        assert_eq!(log_directives(Some(" ".into())), "info,openraft=off");
    }
}
