//! What `agent run` does on one node: bind the metrics port, bring the data
//! plane up, serve until told to stop, then take everything down in reverse.

use std::{net::SocketAddr, path::PathBuf};

use tokio::sync::watch;
use tracing::{info, warn};

use crate::{
    config::{Config, NodeConfig},
    dataplane::{Dataplane, DataplaneError},
    metrics::{self, MetricsError, XdpAttachment},
};

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    #[error(transparent)]
    Pooler(#[from] crate::pooler::PoolerError),
    #[error("data plane on {iface}")]
    Dataplane {
        iface: String,
        #[source]
        source: DataplaneError,
    },
}

/// Where this node's state lives, after CLI overrides.
#[derive(Debug, Clone)]
pub struct NodePlan {
    pub cluster: String,
    pub node: NodeConfig,
    pub xdp_mode: crate::config::XdpMode,
    pub pin_dir: PathBuf,
    pub metrics_listen: SocketAddr,
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
            cluster: config.cluster.name.clone(),
            node: node.clone(),
            xdp_mode: config.cluster.xdp_mode,
            pin_dir: pin_dir.unwrap_or_else(|| config.pin_dir(node)),
            metrics_listen: metrics_listen.unwrap_or_else(|| config.metrics_listen(node)),
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
    let mut registry = metrics::registry(
        &plan.cluster,
        &plan.node.name,
        Some((dataplane.counters(), attachment)),
    );
    let pooler_task = match (plan.pooler.clone(), pooler_listener) {
        (Some(config), Some(listener)) => {
            let pooler = crate::pooler::Pooler::new(config)?;
            metrics::register_pooler(&mut registry, pooler.clone());
            Some(tokio::spawn(crate::pooler::run(
                pooler,
                listener,
                shutdown.clone(),
            )))
        }
        _ => None,
    };
    info!(node = %plan.node.name, metrics = %plan.metrics_listen, "agent running");

    let stop = async move {
        // A closed channel means the sender is gone: stop as well.
        let _ = shutdown.wait_for(|stop| *stop).await;
    };
    let served = metrics::serve(listener, registry, stop).await;
    if let Some(task) = pooler_task {
        if served.is_err() {
            task.abort();
        }
        match task.await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => warn!(error = %crate::error_chain(&error), "pooler failed"),
            Err(error) if error.is_cancelled() => {}
            Err(error) => warn!(%error, "pooler task panicked"),
        }
    }
    dataplane.shutdown();
    info!("agent stopped");
    served.map_err(NodeError::from)
}
