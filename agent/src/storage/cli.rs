//! `agent volume serve|heal-info|heal`: run only the volumes of a node (no
//! XDP data plane; tests and storage-only nodes), and ask a running node
//! what its heal holds.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use clap::{Args, Subcommand};
use futures_util::{SinkExt, StreamExt};
use tokio::{net::TcpStream, signal::unix::SignalKind, sync::watch};
use tokio_util::codec::Framed;
use tracing::{error, info};

use super::{
    net::CLI_NODE,
    protocol::{nonce, FrameCodec, Message, Request, Response, StatusReport},
    Service, VolumePlan,
};
use crate::{config::Config, error_chain};

#[derive(Debug, Args)]
pub struct VolumeArgs {
    #[command(subcommand)]
    pub command: VolumeCommand,
}

#[derive(Debug, Subcommand)]
pub enum VolumeCommand {
    /// Serve and mount this node's volumes until SIGINT/SIGTERM (no XDP).
    Serve(ServeArgs),
    /// List what each peer of this node's replica missed (pending heal).
    HealInfo(ToolArgs),
    /// Heal runs by itself in the background; with --full, first compare
    /// every brick (for bricks changed behind the agent's back) and queue
    /// every difference. Prints the heal-info afterwards.
    Heal(HealArgs),
}

#[derive(Debug, Args)]
pub struct ServeArgs {
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
    /// Also serve /metrics here.
    #[arg(long)]
    pub metrics_listen: Option<SocketAddr>,
}

#[derive(Debug, Args)]
pub struct ToolArgs {
    #[arg(
        long,
        short,
        env = "FAROL_CONFIG",
        default_value = "/etc/farol/cluster.toml"
    )]
    pub config: PathBuf,
    /// The node to ask (default: the hostname).
    #[arg(long, env = "FAROL_NODE")]
    pub node: Option<String>,
    /// Only this volume.
    #[arg(long)]
    pub volume: Option<String>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct HealArgs {
    #[command(flatten)]
    pub tool: ToolArgs,
    /// Compare every brick and heal every difference.
    #[arg(long)]
    pub full: bool,
}

fn load(config: &std::path::Path, node: Option<String>) -> Result<(Config, String), ExitCode> {
    let config = Config::load(config).map_err(|error| {
        eprintln!("{error}");
        ExitCode::from(2)
    })?;
    let node = node
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|s| s.trim().to_owned())
        })
        .ok_or_else(|| {
            eprintln!("cannot tell which node this is: pass --node NAME");
            ExitCode::from(2)
        })?;
    Ok((config, node))
}

fn runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|error| {
            eprintln!("cannot start the async runtime: {error}");
            ExitCode::FAILURE
        })
}

pub fn main(args: VolumeArgs) -> ExitCode {
    match args.command {
        VolumeCommand::Serve(args) => serve(args),
        VolumeCommand::HealInfo(args) => tool(args, false, false),
        VolumeCommand::Heal(args) => tool(args.tool, true, args.full),
    }
}

fn serve(args: ServeArgs) -> ExitCode {
    let (config, node) = match load(&args.config, args.node) {
        Ok(x) => x,
        Err(code) => return code,
    };
    let plans = super::plans(&config, &node);
    if plans.is_empty() {
        eprintln!("node {node} holds no replica of any volume");
        return ExitCode::from(2);
    }
    let runtime = match runtime() {
        Ok(r) => r,
        Err(code) => return code,
    };
    runtime.block_on(async move {
        let (stop_tx, stop_rx) = watch::channel(false);
        let (Ok(mut interrupt), Ok(mut terminate)) = (
            tokio::signal::unix::signal(SignalKind::interrupt()),
            tokio::signal::unix::signal(SignalKind::terminate()),
        ) else {
            error!("cannot install signal handlers");
            return ExitCode::FAILURE;
        };
        let service = match Service::start(plans, stop_rx.clone()).await {
            Ok(service) => service,
            Err(error) => {
                error!("{}", error_chain(&error));
                return ExitCode::FAILURE;
            }
        };
        let metrics = match args.metrics_listen {
            Some(addr) => match crate::metrics::bind(addr).await {
                Ok(listener) => {
                    let mut registry =
                        crate::metrics::registry(&config.cluster.name, &node, None, None);
                    registry.register_collector(Box::new(service.collector()));
                    let mut stop = stop_rx.clone();
                    Some(tokio::spawn(crate::metrics::serve(
                        listener,
                        registry,
                        async move {
                            let _ = stop.wait_for(|s| *s).await;
                        },
                    )))
                }
                Err(error) => {
                    error!("{}", error_chain(&error));
                    None
                }
            },
            None => None,
        };
        info!(node = %node, volumes = service.volumes().len(), "volumes serving");
        let signal = tokio::select! {
            _ = interrupt.recv() => "SIGINT",
            _ = terminate.recv() => "SIGTERM",
        };
        info!(signal, "stopping");
        let _ = stop_tx.send(true);
        service.stop().await;
        if let Some(task) = metrics {
            let _ = task.await;
        }
        info!("volumes stopped");
        ExitCode::SUCCESS
    })
}

async fn ask(plan: &VolumePlan, body: Request) -> Result<Response, String> {
    let key = plan
        .secret
        .read(&plan.volume.name)
        .map_err(|e| error_chain(&e))?;
    let stream = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(plan.listen))
        .await
        .map_err(|_| format!("{}: connect timed out", plan.listen))?
        .map_err(|e| format!("{}: {e} (is the agent running?)", plan.listen))?;
    let mut framed = Framed::new(stream, FrameCodec::new(key));
    let ours = nonce().map_err(|e| format!("no randomness: {e}"))?;
    framed
        .send(Message::Hello {
            node: CLI_NODE.into(),
            volume: plan.volume.name.clone(),
            nonce: ours,
        })
        .await
        .map_err(|e| e.to_string())?;
    match framed.next().await {
        Some(Ok(Message::HelloAck { nonce: theirs, .. })) => {
            framed.codec_mut().set_session(&ours, &theirs)
        }
        other => return Err(format!("handshake failed: {other:?}")),
    }
    framed
        .send(Message::Request { id: 1, body })
        .await
        .map_err(|e| e.to_string())?;
    // A full scan reads every brick: allow it time.
    match tokio::time::timeout(Duration::from_secs(600), framed.next()).await {
        Ok(Some(Ok(Message::Response { body, .. }))) => Ok(body),
        Ok(other) => Err(format!("unexpected answer: {other:?}")),
        Err(_) => Err("no answer within 600s".into()),
    }
}

fn print_status(report: &StatusReport) {
    println!(
        "volume {} on {}: {}",
        report.volume,
        report.node,
        if report.current {
            "current"
        } else {
            "NOT current (waiting for heal or peers)"
        }
    );
    for peer in &report.peers {
        println!(
            "  peer {}: {}, {} pending{}",
            peer.node,
            if peer.up { "up" } else { "down" },
            peer.pending,
            if peer.sample.is_empty() {
                String::new()
            } else {
                format!(": {}", peer.sample.join(", "))
            }
        );
    }
    let counters: Vec<String> = report
        .counters
        .iter()
        .map(|(name, value)| format!("{name}={value}"))
        .collect();
    println!("  {}", counters.join(" "));
}

fn tool(args: ToolArgs, heal: bool, full: bool) -> ExitCode {
    let (config, node) = match load(&args.config, args.node) {
        Ok(x) => x,
        Err(code) => return code,
    };
    let plans: Vec<VolumePlan> = super::plans(&config, &node)
        .into_iter()
        .filter(|plan| args.volume.as_ref().is_none_or(|v| *v == plan.volume.name))
        .collect();
    if plans.is_empty() {
        eprintln!("node {node} holds no replica of the volume(s) asked for");
        return ExitCode::from(2);
    }
    let runtime = match runtime() {
        Ok(r) => r,
        Err(code) => return code,
    };
    runtime.block_on(async move {
        let mut reports = Vec::new();
        if heal && !full {
            eprintln!("heal runs in the background by itself; --full also compares every brick");
        }
        for plan in &plans {
            if heal && full {
                match ask(plan, Request::FullHeal).await {
                    Ok(Response::Ok) => eprintln!(
                        "volume {}: full scan done; heal runs in the background",
                        plan.volume.name
                    ),
                    Ok(other) => {
                        eprintln!("volume {}: full heal refused: {other:?}", plan.volume.name);
                        return ExitCode::FAILURE;
                    }
                    Err(error) => {
                        eprintln!("volume {}: {error}", plan.volume.name);
                        return ExitCode::FAILURE;
                    }
                }
            }
            match ask(plan, Request::Status).await {
                Ok(Response::Status(report)) => reports.push(report),
                Ok(other) => {
                    eprintln!("volume {}: unexpected answer {other:?}", plan.volume.name);
                    return ExitCode::FAILURE;
                }
                Err(error) => {
                    eprintln!("volume {}: {error}", plan.volume.name);
                    return ExitCode::FAILURE;
                }
            }
        }
        if args.json {
            match serde_json::to_string(&reports) {
                Ok(text) => println!("{text}"),
                Err(error) => {
                    eprintln!("{error}");
                    return ExitCode::FAILURE;
                }
            }
        } else {
            for report in &reports {
                print_status(report);
            }
        }
        ExitCode::SUCCESS
    })
}
