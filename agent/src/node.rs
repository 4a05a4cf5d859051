//! What `agent run` does on one node: bind the metrics port, bring the data
//! plane up, serve until told to stop, then take everything down in reverse.

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
};

use tokio::sync::watch;
use tracing::{info, warn};

use crate::{
    balancer::{self, BalancerError},
    config::{Config, NodeConfig},
    dataplane::{Dataplane, DataplaneError, OnExit},
    metrics::{self, MetricsError, XdpAttachment},
    storage::{self, StorageError, VolumePlan},
    supervise,
};

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    #[error("load balancer")]
    Balancer(#[from] BalancerError),
    #[error(transparent)]
    Pooler(#[from] crate::pooler::PoolerError),
    #[error("data plane on {iface}")]
    Dataplane {
        iface: String,
        #[source]
        source: DataplaneError,
    },
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(transparent)]
    Control(#[from] crate::control::ControlError),
    #[error("cluster state")]
    Cluster(#[from] crate::cluster::ClusterError),
    #[error("PostgreSQL")]
    Pgha(#[from] crate::pgha::PghaError),
}

/// Where this node's state lives, after CLI overrides.
#[derive(Debug, Clone)]
pub struct NodePlan {
    pub config: Arc<Config>,
    pub cluster: String,
    pub node: NodeConfig,
    pub xdp_mode: crate::config::XdpMode,
    pub pin_dir: PathBuf,
    pub metrics_listen: SocketAddr,
    /// Set before stopping to leave the data plane (program, maps, VIPs on
    /// `lo`) running for the next agent: an upgrade without a lost flow.
    pub keep_on_exit: Arc<AtomicBool>,
    /// The replicated volumes this node holds a brick of.
    pub volumes: Vec<VolumePlan>,
    /// The PostgreSQL pooler, when the cluster file has a `[pooler]`.
    pub pooler: Option<crate::config::PoolerConfig>,
    /// The cluster file, re-read on `agent reload` and SIGHUP.
    pub config_path: Option<PathBuf>,
    /// The control socket (`agent status`, `agent backend`, `agent reload`).
    pub control_socket: PathBuf,
}

impl NodePlan {
    pub fn new(
        config: &Config,
        node: &NodeConfig,
        pin_dir: Option<PathBuf>,
        metrics_listen: Option<SocketAddr>,
    ) -> NodePlan {
        let pin_dir = pin_dir.unwrap_or_else(|| config.pin_dir(node));
        NodePlan {
            config: Arc::new(config.clone()),
            cluster: config.cluster.name.clone(),
            node: node.clone(),
            xdp_mode: config.cluster.xdp_mode,
            control_socket: node
                .control_socket
                .clone()
                .unwrap_or_else(|| crate::control::default_socket(&node.name, &pin_dir)),
            pin_dir,
            metrics_listen: metrics_listen.unwrap_or_else(|| config.metrics_listen(node)),
            keep_on_exit: Arc::new(AtomicBool::new(false)),
            volumes: storage::plans(config, &node.name),
            pooler: config.pooler.clone(),
            config_path: None,
        }
    }
}

/// Runs the node until `shutdown` turns true.
pub async fn run(plan: NodePlan, shutdown: watch::Receiver<bool>) -> Result<(), NodeError> {
    // Every subsystem below stops only after the supervised children are
    // drained and stopped.
    let (supervision, mut shutdown) = supervise::Supervision::chain(shutdown);
    // Refused first for what most often stops a first run, before sockets
    // that an unprivileged user could not create either.
    crate::dataplane::check_privileges().map_err(|source| NodeError::Dataplane {
        iface: plan.node.interface.clone(),
        source,
    })?;
    // The control API's token over TCP, read before anything is set up.
    let token = match &plan.config.cluster.control_token_file {
        Some(path) => {
            Some(crate::control::read_token(path).map_err(crate::control::ControlError::Token)?)
        }
        None => None,
    };
    let listener = metrics::bind(plan.metrics_listen).await?;
    let control_listener = crate::control::bind(&plan.control_socket).await?;
    let pooler_listener = match &plan.pooler {
        Some(config) => Some(crate::pooler::bind(config.listen).await?),
        None => None,
    };
    // PostgreSQL under the agent (issue 9) when `[postgres]` names this node.
    let pg_node = match crate::pgha::PgPlan::new(&plan.config, &plan.node).transpose()? {
        Some(pg) => Some(crate::pgha::PgNode::new(pg)?),
        None => None,
    };
    let pg_listener = match &pg_node {
        Some(pg) => Some(crate::pgha::api::bind(pg.plan.api_listen).await?),
        None => None,
    };
    let dataplane =
        Dataplane::start(&plan.node.interface, plan.xdp_mode, &plan.pin_dir).map_err(|source| {
            NodeError::Dataplane {
                iface: plan.node.interface.clone(),
                source,
            }
        })?;
    let attachment = XdpAttachment {
        interface: dataplane.interface().to_owned(),
        mode: dataplane.mode(),
    };
    let volumes = match storage::Service::start(plan.volumes.clone(), shutdown.clone()).await {
        Ok(volumes) => volumes,
        Err(error) => {
            dataplane.shutdown(OnExit::Remove);
            return Err(error.into());
        }
    };
    let mut registry = metrics::registry(
        &plan.cluster,
        &plan.node.name,
        Some((dataplane.counters(), attachment)),
        Some(dataplane.load_balancer()),
    );
    registry.register_collector(Box::new(volumes.collector()));
    let mut pooler_handle = None;
    let pooler_task = match (plan.pooler.clone(), pooler_listener) {
        (Some(config), Some(listener)) => {
            let pooler = match crate::pooler::Pooler::new(config) {
                Ok(pooler) => pooler,
                Err(error) => {
                    volumes.stop().await;
                    dataplane.shutdown(OnExit::Remove);
                    return Err(error.into());
                }
            };
            metrics::register_pooler(&mut registry, pooler.clone());
            pooler_handle = Some(pooler.clone());
            Some(tokio::spawn(crate::pooler::run(
                pooler,
                listener,
                shutdown.clone(),
            )))
        }
        _ => None,
    };
    // Health checks, runtime control and reloads (issue 5): the config
    // lives in a watch channel that reloads write and subsystems follow.
    let (config_tx, config_rx) = watch::channel(plan.config.clone());
    let health = crate::health::Health::new(&plan.node.name);
    // A supervised child's drain reaches every balancer through this
    // node's agent check (its admin state), and this node's maps at once.
    let drains = balancer::Drains::default();
    let supervisor = supervise::Supervisor::start(
        supervise::specs(&plan.config, &plan.node),
        Arc::new(supervise::ClusterDrainer::new(
            supervise::LocalDrainer::new(
                dataplane.load_balancer(),
                drains.clone(),
                plan.config.clone(),
            ),
            health.clone(),
            plan.config.clone(),
            plan.node.clone(),
        )),
    );
    registry.register_collector(Box::new(supervisor.collector()));
    let supervision = supervision.run(supervisor);
    let control = crate::control::Control::new(
        &plan.cluster,
        &plan.node.name,
        plan.config_path.clone(),
        config_tx,
        health.clone(),
        Some(dataplane.load_balancer()),
        token,
    );
    control.set_xdp_attachment(dataplane.interface(), dataplane.mode());
    registry.register_collector(Box::new(crate::health::HealthCollector::new(
        health.clone(),
    )));
    registry.register_collector(Box::new(crate::control::ControlCollector(control.clone())));
    let health_task = tokio::spawn(crate::health::run(
        health.clone(),
        config_rx.clone(),
        shutdown.clone(),
    ));
    let control_task = tokio::spawn(crate::control::serve(
        control_listener,
        plan.control_socket.clone(),
        control.clone(),
        shutdown.clone(),
    ));
    // The agents' shared state (issue 9), when the config has a
    // [cluster_state]; it stops with the other subsystems on shutdown.
    let cluster = match crate::cluster::start(&plan.config, &plan.node, shutdown.clone()).await {
        Ok(cluster) => cluster,
        Err(error) => {
            volumes.stop().await;
            dataplane.shutdown(OnExit::Remove);
            return Err(error.into());
        }
    };
    if let Some(cluster) = &cluster {
        registry.register_collector(Box::new(crate::cluster::metrics::ClusterCollector(
            cluster.clone(),
        )));
        let _ = control.cluster_state.set(cluster.clone());
        // The pooler looks at the servers at once when the primary record
        // moves (it still follows only what they answer).
        if let Some(pooler) = &pooler_handle {
            tokio::spawn(crate::pooler::topology::recheck_on_change(
                pooler.clone(),
                cluster.primary(),
                shutdown.clone(),
            ));
            crate::pooler::pause::serve_switchover_notices(pooler.clone(), cluster);
        }
    }
    let vrrp = crate::vrrp::Setup::new(&plan.config, &plan.node).map(|mut setup| {
        setup.load_balancer = Some(dataplane.load_balancer());
        setup
    });
    if let Some(vrrp) = &vrrp {
        registry.register_collector(Box::new(crate::vrrp::VrrpCollector::new(
            vrrp.stats.clone(),
        )));
    }
    let ownership = vrrp.as_ref().map(|vrrp| vrrp.ownership.clone());
    let vrrp_task = match vrrp {
        Some(vrrp) => {
            let done = crate::vrrp::spawn_dedicated(
                vrrp,
                plan.config.clone(),
                plan.node.clone(),
                shutdown.clone(),
            );
            Some(tokio::spawn(async move {
                // Logged when it happens, not at shutdown: until fixed, this
                // node never holds a VRRP VIP.
                let result = match done {
                    Ok(done) => done.await.unwrap_or(Ok(())),
                    Err(source) => Err(crate::vrrp::VrrpError::Runtime(source)),
                };
                if let Err(error) = &result {
                    tracing::error!(error = %crate::error_chain(error), "VRRP failed: this node holds no VRRP VIP");
                }
                result
            }))
        }
        None => None,
    };
    // Until the cluster module decides (openraft), the config's bootstrap
    // primary is the desired one; `pgha::desired_from_record` maps its
    // primary record and lease later.
    let (_pg_desired, pg_tasks) = match (pg_node, pg_listener) {
        (Some(pg), Some(listener)) => {
            // With [cluster_state], the primary record and lease decide
            // (pgha::failover), and the Raft leader fails over.
            let initial = match &cluster {
                Some(cluster) => {
                    let record = cluster.primary().borrow().clone();
                    crate::pgha::desired_from_record(
                        &pg.plan.node,
                        record.as_ref().map(|r| (r.node.as_str(), r.epoch)),
                        *cluster.holds_lease().borrow(),
                    )
                }
                None => pg.plan.bootstrap_desired(),
            };
            let (desired_tx, desired_rx) = watch::channel(initial);
            let mut failover_stats = None;
            if let Some(cluster) = &cluster {
                let stats = Arc::new(crate::pgha::failover::FailoverStats::default());
                registry.register_collector(Box::new(crate::pgha::failover::FailoverCollector(
                    stats.clone(),
                )));
                tokio::spawn(crate::pgha::failover::follow_record(
                    pg.plan.node.clone(),
                    cluster.clone(),
                    desired_tx.clone(),
                    shutdown.clone(),
                ));
                tokio::spawn(crate::pgha::failover::run_decider(
                    pg.plan.clone(),
                    cluster.clone(),
                    stats.clone(),
                    shutdown.clone(),
                ));
                failover_stats = Some(stats);
            }
            let (pgha, task) = crate::pgha::Pgha::spawn(pg, desired_rx, shutdown.clone());
            if let (Some(cluster), Some(stats)) = (&cluster, failover_stats) {
                tokio::spawn(crate::pgha::crash::hand_over_on_crash(
                    pgha.clone(),
                    cluster.clone(),
                    stats,
                    shutdown.clone(),
                ));
            }
            registry.register_collector(Box::new(crate::pgha::PgCollector(pgha.clone())));
            if let Some(cluster) = &cluster {
                let switchover =
                    crate::pgha::switchover::Switchover::start(pgha.clone(), cluster.clone());
                registry.register_collector(Box::new(
                    crate::pgha::switchover::SwitchoverCollector(switchover.stats.clone()),
                ));
                let _ = control.pg_switchover.set(switchover);
            }
            let mut stop = shutdown.clone();
            let api = tokio::spawn(crate::pgha::api::serve(listener, pgha, async move {
                let _ = stop.wait_for(|stop| *stop).await;
            }));
            (Some(desired_tx), Some((task, api)))
        }
        _ => (None, None),
    };
    info!(node = %plan.node.name, metrics = %plan.metrics_listen, control = %plan.control_socket.display(), "agent running");

    let mut balancer = tokio::spawn(balancer::run(
        dataplane.load_balancer(),
        config_rx,
        balancer::Deciders {
            health,
            drains,
            vrrp: ownership,
        },
        plan.node.clone(),
        shutdown.clone(),
        plan.keep_on_exit.clone(),
    ));

    let stop = async move {
        // A closed channel means the sender is gone: stop as well.
        let _ = shutdown.wait_for(|stop| *stop).await;
    };
    let mut served = tokio::spawn(metrics::serve_with(
        listener,
        registry,
        crate::control::public_routes(control),
        stop,
    ));
    // Both tasks end on shutdown; if one fails first, the other is aborted
    // (dropping the balancer's host set-up restores it).
    let outcome = tokio::select! {
        result = &mut served => {
            let result = flatten(result).map_err(NodeError::from);
            if result.is_err() {
                balancer.abort();
            }
            let _ = balancer.await;
            result
        }
        result = &mut balancer => {
            let result = flatten(result).map_err(NodeError::from);
            if result.is_err() {
                served.abort();
            }
            let _ = served.await;
            result
        }
    };
    // Stopped already on a normal shutdown; after a failure, dropping the
    // task kills the children.
    supervision.abort();
    let _ = supervision.await;
    health_task.abort();
    if outcome.is_err() {
        control_task.abort();
    }
    match control_task.await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => warn!(error = %crate::error_chain(&error), "control socket failed"),
        Err(error) if error.is_cancelled() => {}
        Err(error) => warn!(%error, "control socket task ended abnormally"),
    }
    if let Some(task) = pooler_task {
        if outcome.is_err() {
            task.abort();
        }
        match task.await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => warn!(error = %crate::error_chain(&error), "pooler failed"),
            Err(error) if error.is_cancelled() => {}
            Err(error) => warn!(%error, "pooler task panicked"),
        }
    }
    if let Some(task) = vrrp_task {
        if outcome.is_err() {
            task.abort();
        }
        match task.await {
            Ok(Ok(())) => {}
            Ok(Err(_logged)) => {}
            Err(error) if error.is_cancelled() => {}
            Err(error) => warn!(%error, "VRRP task panicked"),
        }
    }
    if let Some((task, api)) = pg_tasks {
        // The reconciler stops PostgreSQL (fast shutdown) on the shutdown;
        // after a failure, dropping it sends the postmaster SIGINT (fast).
        if outcome.is_err() {
            task.abort();
            api.abort();
        }
        let _ = task.await;
        match api.await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                warn!(error = %crate::error_chain(&error), "PostgreSQL endpoint failed")
            }
            Err(error) if error.is_cancelled() => {}
            Err(error) => warn!(%error, "PostgreSQL endpoint task panicked"),
        }
    }
    volumes.stop().await;
    dataplane.shutdown(if plan.keep_on_exit.load(Ordering::SeqCst) {
        OnExit::Keep
    } else {
        OnExit::Remove
    });
    info!("agent stopped");
    outcome
}

/// A task's result, a panic becoming a logged error of the task's kind.
fn flatten<E>(joined: Result<Result<(), E>, tokio::task::JoinError>) -> Result<(), E> {
    match joined {
        Ok(result) => result,
        Err(join) => {
            tracing::error!(%join, "a subsystem task ended abnormally");
            Ok(())
        }
    }
}
