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
        Command::Pooler(args) => pooler(&args),
    }
}

fn init_tracing(format: LogFormat) {
    let filter = EnvFilter::try_from_env("FAROL_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
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

fn run(args: RunArgs) -> ExitCode {
    let config = match Config::load(&args.config) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("{error}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let node_name = match args.node.clone().or_else(hostname) {
        Some(name) => name,
        None => {
            eprintln!(
                "cannot tell which node this is: pass --node NAME (the hostname is unreadable)"
            );
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let node = match config.node(&args.config, &node_name) {
        Ok(node) => node,
        Err(error) => {
            eprintln!("{error}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let plan = NodePlan::new(&config, node, args.pin_dir, args.metrics_listen);
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
        if let Err(error) = spawn_signal_handler(stop_tx) {
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
        if let Err(error) = spawn_signal_handler(stop_tx) {
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

/// SIGINT and SIGTERM stop the agent cleanly (detach, unpin).
fn spawn_signal_handler(stop: watch::Sender<bool>) -> std::io::Result<()> {
    let mut interrupt = tokio::signal::unix::signal(SignalKind::interrupt())?;
    let mut terminate = tokio::signal::unix::signal(SignalKind::terminate())?;
    tokio::spawn(async move {
        let signal = tokio::select! {
            _ = interrupt.recv() => "SIGINT",
            _ = terminate.recv() => "SIGTERM",
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
