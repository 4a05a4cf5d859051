//! The balancer's agent side: turns the `[[service]]` sections into a plan
//! for the kernel (backend addresses and MACs, weights, which VIPs this node
//! holds), prepares this node to serve DSR flows (VIP on `lo`, ARP
//! suppressed), and keeps the plan current as backends appear or vanish.
//!
//! A VIP that a `[[vrrp]]` instance carries is held by that instance's
//! master: the `vrrp` module says which through a watch channel, applied
//! at once (a few map writes). Any other VIP is held by the first node with
//! the `balancer` role in the cluster file.

mod host;

use std::{
    collections::BTreeSet,
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
    vrrp::VipOwnership,
};

pub(crate) use host::interface_mac;
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

/// True when a `[[vrrp]]` instance carries `vip`: VRRP decides its holder.
pub fn vrrp_carries(config: &Config, vip: IpAddr) -> bool {
    config
        .vrrp
        .iter()
        .any(|instance| instance.vips.contains(&vip))
}

/// The service VIPs this node holds now: those VRRP made it master for
/// (`vrrp_owned`), and, for VIPs no VRRP instance carries, all of them if
/// it is the first balancer.
pub fn owned_vips(
    config: &Config,
    node: &NodeConfig,
    vrrp_owned: &BTreeSet<IpAddr>,
) -> Vec<IpAddr> {
    let first_balancer = vip_owner(config).is_some_and(|owner| owner.name == node.name);
    let mut vips: Vec<IpAddr> = config
        .services
        .iter()
        .map(|service| service.vip)
        .filter(|&vip| {
            if vrrp_carries(config, vip) {
                vrrp_owned.contains(&vip)
            } else {
                first_balancer
            }
        })
        .collect();
    vips.sort();
    vips.dedup();
    vips
}

/// VIPs this node must hold on `lo`: those of DSR services it serves, and
/// for the first balancer those no VRRP instance carries. A VRRP master
/// that serves nothing does not need it there (VRRP adds the VIP to its
/// interface): a packet its XDP program passes up during a change of
/// master is then dropped and retransmitted, not refused by a kernel that
/// holds the VIP with nothing listening.
pub fn local_vips(config: &Config, node: &NodeConfig) -> Vec<IpAddr> {
    let owner = vip_owner(config).is_some_and(|owner| owner.name == node.name);
    let mut vips: Vec<IpAddr> = config
        .services
        .iter()
        .filter(|service| service.forwarding == Forwarding::Dsr)
        .filter(|service| {
            let may_own = owner && !vrrp_carries(config, service.vip);
            may_own
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
    let owned_vips = owned_vips(config, node, &BTreeSet::new());
    LbPlan {
        local_mac,
        services,
        owned_vips,
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
    vrrp: Option<VipOwnership>,
) -> Result<(), BalancerError> {
    if config.services.is_empty() {
        return Ok(());
    }
    let iface = node.interface.clone();
    let local_mac = host::interface_mac(&iface)?;
    let mut prepared = host::DsrHost::prepare(&iface, &local_vips(&config, &node))?;
    // What VRRP says this node holds; an empty set, never changing, when
    // this node runs no VRRP instance.
    let (_no_vrrp, owned) = watch::channel(BTreeSet::new());
    let (applied, _) = watch::channel(None);
    let (owned, applied) = vrrp.map_or((owned, applied), |vrrp| (vrrp.owned, vrrp.applied));
    let follower = tokio::spawn(follow_vrrp(
        maps.clone(),
        config.clone(),
        node.clone(),
        owned.clone(),
        applied.clone(),
    ));
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
                // Read under the lock, so this never undoes a newer VRRP
                // change that `follow_vrrp` applied meanwhile.
                next.owned_vips = owned_vips(&config, &node, &owned.borrow());
                if maps.applied() != &next {
                    log_changes(maps.applied(), &next);
                    let newly_owned = next.owned_vips != maps.applied().owned_vips;
                    maps.apply(&next)?;
                    applied.send_replace(Some(next.owned_vips.iter().copied().collect()));
                    if newly_owned && !next.owned_vips.is_empty() {
                        info!(vips = ?next.owned_vips, "holding VIPs");
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
    follower.abort();
    if keep_on_exit.load(Ordering::SeqCst) {
        prepared.keep();
    } else {
        prepared.restore();
    }
    result
}

/// Applies each VRRP ownership change to the maps as soon as it comes:
/// the applied plan with only `owned_vips` changed, so the data plane
/// rewrites a few VIP entries and the ownership map, nothing else.
async fn follow_vrrp(
    maps: Arc<Mutex<LoadBalancerMaps>>,
    config: Arc<Config>,
    node: NodeConfig,
    mut owned: watch::Receiver<BTreeSet<IpAddr>>,
    applied: watch::Sender<Option<BTreeSet<IpAddr>>>,
) {
    loop {
        if owned.changed().await.is_err() {
            return;
        }
        let mut maps = maps.lock().await;
        // Before the first refresh there is no plan: the refresh reads the
        // channel itself.
        if maps.applied().services.is_empty() {
            continue;
        }
        let mut next = maps.applied().clone();
        next.owned_vips = owned_vips(&config, &node, &owned.borrow_and_update());
        if next != *maps.applied() {
            match maps.apply(&next) {
                Ok(()) => {
                    applied.send_replace(Some(next.owned_vips.iter().copied().collect()));
                    info!(vips = ?next.owned_vips, "VIP ownership from VRRP applied to the data plane");
                }
                Err(error) => {
                    warn!(error = %crate::error_chain(&error), "cannot apply VIP ownership from VRRP")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
