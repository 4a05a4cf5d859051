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
}

impl NodePlan {
    pub fn new(
        config: &Config,
        node: &NodeConfig,
        pin_dir: Option<PathBuf>,
        metrics_listen: Option<SocketAddr>,
    ) -> NodePlan {
        NodePlan {
            config: Arc::new(config.clone()),
            cluster: config.cluster.name.clone(),
            node: node.clone(),
            xdp_mode: config.cluster.xdp_mode,
            pin_dir: pin_dir.unwrap_or_else(|| config.pin_dir(node)),
            metrics_listen: metrics_listen.unwrap_or_else(|| config.metrics_listen(node)),
            keep_on_exit: Arc::new(AtomicBool::new(false)),
            volumes: storage::plans(config, &node.name),
            pooler: config.pooler.clone(),
        }
    }
}

/// Runs the node until `shutdown` turns true.
pub async fn run(plan: NodePlan, mut shutdown: watch::Receiver<bool>) -> Result<(), NodeError> {
    let listener = metrics::bind(plan.metrics_listen).await?;
    let pooler_listener = match &plan.pooler {
        Some(config) => Some(crate::pooler::bind(config.listen).await?),
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
            Some(tokio::spawn(crate::pooler::run(
                pooler,
                listener,
                shutdown.clone(),
            )))
        }
        _ => None,
    };
    let vrrp = crate::vrrp::Setup::new(&plan.config, &plan.node);
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
    info!(node = %plan.node.name, metrics = %plan.metrics_listen, "agent running");

    let mut balancer = tokio::spawn(balancer::run(
        dataplane.load_balancer(),
        plan.config.clone(),
        plan.node.clone(),
        shutdown.clone(),
        plan.keep_on_exit.clone(),
        ownership,
    ));

    let stop = async move {
        // A closed channel means the sender is gone: stop as well.
        let _ = shutdown.wait_for(|stop| *stop).await;
    };
    let mut served = tokio::spawn(metrics::serve(listener, registry, stop));
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
