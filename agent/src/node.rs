//! What `agent run` does on one node: bind the metrics port, bring the data
//! plane up, serve until told to stop, then take everything down in reverse.

use std::{net::SocketAddr, path::PathBuf};

use tokio::sync::watch;
use tracing::info;

use crate::{
    config::{Config, NodeConfig},
    dataplane::{Dataplane, DataplaneError},
    metrics::{self, MetricsError, XdpAttachment},
    storage::{self, StorageError, VolumePlan},
};

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Metrics(#[from] MetricsError),
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
    pub cluster: String,
    pub node: NodeConfig,
    pub xdp_mode: crate::config::XdpMode,
    pub pin_dir: PathBuf,
    pub metrics_listen: SocketAddr,
    /// The replicated volumes this node holds a brick of.
    pub volumes: Vec<VolumePlan>,
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
            volumes: storage::plans(config, &node.name),
        }
    }
}

/// Runs the node until `shutdown` turns true.
pub async fn run(plan: NodePlan, mut shutdown: watch::Receiver<bool>) -> Result<(), NodeError> {
    let listener = metrics::bind(plan.metrics_listen).await?;
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
            dataplane.shutdown();
            return Err(error.into());
        }
    };
    let mut registry = metrics::registry(
        &plan.cluster,
        &plan.node.name,
        Some((dataplane.counters(), attachment)),
    );
    registry.register_collector(Box::new(volumes.collector()));
    info!(node = %plan.node.name, metrics = %plan.metrics_listen, "agent running");

    let stop = async move {
        // A closed channel means the sender is gone: stop as well.
        let _ = shutdown.wait_for(|stop| *stop).await;
    };
    let served = metrics::serve(listener, registry, stop).await;
    volumes.stop().await;
    dataplane.shutdown();
    info!("agent stopped");
    served.map_err(NodeError::from)
}
