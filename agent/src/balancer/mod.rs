//! The balancer's agent side: turns the `[[service]]` sections into a plan
//! for the kernel (backend addresses and MACs, weights, which VIPs this node
//! holds), prepares this node to serve DSR flows (VIP on `lo`, ARP
//! suppressed), and keeps the plan current as backends appear or vanish.
//!
//! Until VRRP (issue 4) elects a master, the first node with the `balancer`
//! role in the cluster file holds every VIP.

mod drains;
mod host;

use std::{
    net::IpAddr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use tokio::sync::{watch, Mutex};
use tracing::{info, warn};

use crate::{
    config::{Config, Forwarding, NodeConfig, Role},
    dataplane::{
        lb::{BackendPlan, LbPlan, LoadBalancerMaps, ServicePlan},
        DataplaneError,
    },
};

pub use drains::Drains;
pub use host::{remove_vips_from_lo, HostError};

/// How often unresolved backends are retried and the plan refreshed.
const REFRESH: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum BalancerError {
    #[error("preparing this node for DSR")]
    Host(#[from] HostError),
    #[error("writing the load balancer maps")]
    Dataplane(#[from] DataplaneError),
}

/// The node that holds the VIPs until VRRP exists: the first balancer.
pub fn vip_owner(config: &Config) -> Option<&NodeConfig> {
    config
        .nodes
        .iter()
        .find(|node| node.roles.contains(&Role::Balancer))
}

/// VIPs this node must hold on `lo`: those of DSR services it serves or
/// owns, and of NAT services it serves (a NAT flow scheduled to the
/// balancer itself is served locally, as in DSR).
pub fn local_vips(config: &Config, node: &NodeConfig) -> Vec<IpAddr> {
    let owner = vip_owner(config).is_some_and(|owner| owner.name == node.name);
    let mut vips: Vec<IpAddr> = config
        .services
        .iter()
        .filter(|service| {
            (owner && service.forwarding == Forwarding::Dsr)
                || service
                    .backends
                    .iter()
                    .any(|backend| backend.resolve(&config.nodes) == Some(node.address.addr()))
        })
        .map(|service| service.vip)
        .collect();
    vips.sort();
    vips.dedup();
    vips
}

/// The plan for this node, with MACs from `resolve_mac` (None: unresolved).
pub fn plan(
    config: &Config,
    node: &NodeConfig,
    local_mac: [u8; 6],
    resolve_mac: &mut dyn FnMut(IpAddr) -> Option<[u8; 6]>,
) -> LbPlan {
    let owner = vip_owner(config).is_some_and(|owner| owner.name == node.name);
    let services: Vec<ServicePlan> = config
        .services
        .iter()
        .enumerate()
        .map(|(index, service)| ServicePlan {
            index: index as u32,
            name: service.name.clone(),
            vip: service.vip,
            ports: service.port.ports().collect(),
            protocol: service.protocol,
            scheduler: service.scheduler,
            forwarding: service.forwarding,
            seed: format!("{}/{}", config.cluster.name, service.name),
            backends: service
                .backends
                .iter()
                .enumerate()
                .filter_map(|(slot, backend)| {
                    let addr = backend.resolve(&config.nodes)?;
                    let local = addr == node.address.addr();
                    let mac = if local { None } else { resolve_mac(addr) };
                    Some(BackendPlan {
                        slot: slot as u32,
                        name: backend.node.clone().unwrap_or_else(|| addr.to_string()),
                        addr,
                        port: backend.port.unwrap_or(service.port.first()),
                        mac,
                        weight: backend.weight,
                        local,
                        alive: local || mac.is_some(),
                    })
                })
                .collect(),
        })
        .collect();
    let owned_vips = if owner {
        let mut vips: Vec<IpAddr> = services.iter().map(|s| s.vip).collect();
        vips.sort();
        vips.dedup();
        vips
    } else {
        Vec::new()
    };
    let uses_nat = services.iter().any(|s| s.forwarding == Forwarding::Nat);
    let snat_ipv4 = match node.address.addr() {
        IpAddr::V4(addr) if uses_nat => Some(addr),
        _ => None,
    };
    LbPlan {
        local_mac,
        services,
        owned_vips,
        snat_ipv4,
    }
}

/// Logs each backend that became reachable or unreachable since `before`.
fn log_changes(before: &LbPlan, after: &LbPlan) {
    for service in &after.services {
        for backend in &service.backends {
            let was = before
                .services
                .iter()
                .find(|s| s.name == service.name)
                .and_then(|s| s.backends.iter().find(|b| b.slot == backend.slot))
                .map(|b| b.alive);
            if was != Some(backend.alive) {
                if backend.alive {
                    info!(service = %service.name, backend = %backend.name, addr = %backend.addr, "backend up: reachable on the LAN");
                } else {
                    warn!(service = %service.name, backend = %backend.name, addr = %backend.addr, "backend down: no ARP answer, takes no flows");
                }
            }
        }
    }
}

/// Keeps the kernel's plan current until `shutdown`; undoes the host
/// preparation on the way out.
pub async fn run(
    maps: Arc<Mutex<LoadBalancerMaps>>,
    config: Arc<Config>,
    node: NodeConfig,
    mut shutdown: watch::Receiver<bool>,
    keep_on_exit: Arc<AtomicBool>,
    drains: Drains,
) -> Result<(), BalancerError> {
    if config.services.is_empty() {
        return Ok(());
    }
    let iface = node.interface.clone();
    let local_mac = host::interface_mac(&iface)?;
    let mut prepared = host::DsrHost::prepare(&iface, &local_vips(&config, &node))?;
    let result = async {
        loop {
            let mut resolver = host::NeighborResolver::new(&iface);
            let mut addresses = Vec::new();
            for service in &config.services {
                for backend in &service.backends {
                    if let Some(addr) = backend.resolve(&config.nodes) {
                        if addr != node.address.addr() {
                            addresses.push(addr);
                        }
                    }
                }
            }
            resolver.resolve_all(&addresses).await;
            let mut next = plan(&config, &node, local_mac, &mut |addr| resolver.mac(addr));
            {
                let mut maps = maps.lock().await;
                // Read under the lock, as the drainer writes it before
                // taking the lock: neither undoes the other.
                drains.apply_to(&mut next);
                if maps.applied() != &next {
                    log_changes(maps.applied(), &next);
                    maps.apply(&next)?;
                    if !next.owned_vips.is_empty() {
                        info!(vips = ?next.owned_vips, "holding VIPs (first balancer in the cluster file)");
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(REFRESH) => {}
                _ = shutdown.wait_for(|stop| *stop) => return Ok(()),
            }
        }
    }
    .await;
    if keep_on_exit.load(Ordering::SeqCst) {
        prepared.keep();
    } else {
        prepared.restore();
    }
    result
}

#[cfg(test)]
mod tests;
