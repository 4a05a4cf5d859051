//! The balancer's agent side: turns the `[[service]]` sections into a plan
//! for the kernel (backend addresses and MACs, weights, which VIPs this node
//! holds), prepares this node to serve DSR flows (VIP on `lo`, ARP
//! suppressed), and keeps the plan current as backends appear or vanish.
//!
//! Backends' health (checks, admin states, slow start) comes from
//! [`crate::health::Health`]: the loop wakes when a verdict changes, so a
//! backend going down reaches the kernel at once, not at the next refresh;
//! a reloaded config arrives on a watch channel and is applied as a diff
//! (only services whose plan changed get new tables).
//!
//! A VIP that a `[[vrrp]]` instance carries is held by that instance's
//! master: the `vrrp` module says which through a watch channel, applied
//! at once (a few map writes). Any other VIP is held by the first node with
//! the `balancer` role in the cluster file.

mod drains;
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

use crate::health::{BackendKey, Health};
use tracing::{debug, info, warn};

use crate::{
    config::{Config, Forwarding, NodeConfig, Role},
    dataplane::{
        lb::{BackendPlan, LbPlan, LoadBalancerMaps, ServicePlan},
        DataplaneError,
    },
    vrrp::VipOwnership,
};

pub use drains::Drains;
pub(crate) use host::interface_mac;
pub use host::{remove_vips_from_lo, HostError};

/// How often unresolved backends are retried and the plan refreshed.
const REFRESH: Duration = Duration::from_secs(2);
/// How often the plan is rebuilt while a backend ramps up (slow start).
const SLOWSTART_STEP: Duration = Duration::from_millis(500);

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

/// VIPs this node must hold on `lo`: those of services it serves (DSR or
/// NAT: a NAT flow scheduled to the balancer itself is served locally, as
/// in DSR), and for the first balancer those of DSR services no VRRP
/// instance carries. A VRRP master
/// that serves nothing does not need it there (VRRP adds the VIP to its
/// interface): a packet its XDP program passes up during a change of
/// master is then dropped and retransmitted, not refused by a kernel that
/// holds the VIP with nothing listening.
pub fn local_vips(config: &Config, node: &NodeConfig) -> Vec<IpAddr> {
    let owner = vip_owner(config).is_some_and(|owner| owner.name == node.name);
    let mut vips: Vec<IpAddr> = config
        .services
        .iter()
        .filter(|service| {
            let may_own = owner
                && !vrrp_carries(config, service.vip)
                && service.forwarding == Forwarding::Dsr;
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
    plan_with(
        config,
        node,
        local_mac,
        resolve_mac,
        &|_, weight, reachable| (reachable, weight),
    )
}

/// `(alive, weight)` of a backend from its key, configured weight and
/// whether it is reachable (health checks and admin states decide).
pub type VerdictFn<'a> = dyn Fn(&BackendKey, u32, bool) -> (bool, u32) + 'a;

/// [`plan`] with each backend's liveness and weight from `verdict`.
pub fn plan_with(
    config: &Config,
    node: &NodeConfig,
    local_mac: [u8; 6],
    resolve_mac: &mut dyn FnMut(IpAddr) -> Option<[u8; 6]>,
    verdict: &VerdictFn<'_>,
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
                    let name = backend.node.clone().unwrap_or_else(|| addr.to_string());
                    let port = backend.port.unwrap_or(service.port.first());
                    let key = BackendKey {
                        service: service.name.clone(),
                        name: name.clone(),
                        addr,
                        port,
                    };
                    let (alive, weight) = verdict(&key, backend.weight, local || mac.is_some());
                    Some(BackendPlan {
                        slot: slot as u32,
                        name,
                        addr,
                        port,
                        mac,
                        weight,
                        local,
                        alive,
                    })
                })
                .collect(),
        })
        .collect();
    let owned_vips = owned_vips(config, node, &BTreeSet::new());
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

/// Logs what changed for each backend in the kernel since `before` (the
/// health module logs why: which check failed, who drained it).
fn log_changes(before: &LbPlan, after: &LbPlan) {
    for service in &after.services {
        for backend in &service.backends {
            let was = before
                .services
                .iter()
                .find(|s| s.name == service.name)
                .and_then(|s| s.backends.iter().find(|b| b.slot == backend.slot));
            let resolved = backend.local || backend.mac.is_some();
            if was.map(|b| b.local || b.mac.is_some()) != Some(resolved) {
                if resolved {
                    info!(service = %service.name, backend = %backend.name, addr = %backend.addr, "backend reachable on the LAN");
                } else {
                    warn!(service = %service.name, backend = %backend.name, addr = %backend.addr, "backend unreachable: no ARP answer, takes no flows");
                }
            }
            if was.map(|b| b.alive) != Some(backend.alive) {
                // The health module logged why at info; this is the effect.
                if backend.alive {
                    debug!(service = %service.name, backend = %backend.name, addr = %backend.addr, weight = backend.weight, "data plane: backend takes flows");
                } else {
                    debug!(service = %service.name, backend = %backend.name, addr = %backend.addr, "data plane: backend takes no flows, its established flows move");
                }
            } else if was.map(|b| b.weight) != Some(backend.weight) {
                debug!(service = %service.name, backend = %backend.name, from = was.map(|b| b.weight), to = backend.weight, "data plane: backend weight changed");
            }
        }
    }
}

/// What decides, beside the config, which backends take flows and which
/// VIPs this node holds.
pub struct Deciders {
    /// Health checks and admin states.
    pub health: Arc<Health>,
    /// This node's own backends drained by the agent (supervised children).
    pub drains: Drains,
    /// VRRP's verdict on the VIPs it carries; None without VRRP.
    pub vrrp: Option<VipOwnership>,
}

/// Keeps the kernel's plan current until `shutdown`, with the config from
/// `config` (reloads arrive there) and the verdicts of `deciders`; undoes
/// the host preparation on the way out.
pub async fn run(
    maps: Arc<Mutex<LoadBalancerMaps>>,
    mut config: watch::Receiver<Arc<Config>>,
    deciders: Deciders,
    node: NodeConfig,
    mut shutdown: watch::Receiver<bool>,
    keep_on_exit: Arc<AtomicBool>,
) -> Result<(), BalancerError> {
    let Deciders {
        health,
        drains,
        vrrp,
    } = deciders;
    let initial = config.borrow_and_update().clone();
    if initial.services.is_empty() {
        return Ok(());
    }
    let iface = node.interface.clone();
    let local_mac = host::interface_mac(&iface)?;
    let vips = local_vips(&initial, &node);
    let mut prepared = host::DsrHost::prepare(&iface, &vips)?;
    // What VRRP says this node holds; an empty set, never changing, when
    // this node runs no VRRP instance.
    let (_no_vrrp, owned) = watch::channel(BTreeSet::new());
    let (applied, _) = watch::channel(None);
    let (owned, applied) = vrrp.map_or((owned, applied), |vrrp| (vrrp.owned, vrrp.applied));
    let follower = tokio::spawn(follow_vrrp(
        maps.clone(),
        initial.clone(),
        node.clone(),
        owned.clone(),
        applied.clone(),
    ));
    let result = async {
        let mut resolver = host::NeighborResolver::new(&iface);
        let mut resolved_at: Option<tokio::time::Instant> = None;
        let mut current = initial;
        loop {
            if resolved_at.is_none_or(|at| at.elapsed() >= REFRESH) {
                let mut addresses = Vec::new();
                for service in &current.services {
                    for backend in &service.backends {
                        if let Some(addr) = backend.resolve(&current.nodes) {
                            if addr != node.address.addr() {
                                addresses.push(addr);
                            }
                        }
                    }
                }
                resolver.resolve_all(&addresses).await;
                resolved_at = Some(tokio::time::Instant::now());
            }
            let verdict = |key: &BackendKey, weight: u32, reachable: bool| {
                let verdict = health.verdict(key, weight, reachable);
                (verdict.alive, verdict.weight)
            };
            // Read before the verdicts: the plan holds every change up to it.
            let generation = health.generation();
            let mut next = plan_with(&current, &node, local_mac, &mut |addr| resolver.mac(addr), &verdict);
            {
                let mut maps = maps.lock().await;
                // Read under the lock: the drainer writes its set before
                // taking the lock, and `follow_vrrp` may have applied a newer
                // VRRP change meanwhile; neither is undone.
                drains.apply_to(&mut next);
                next.owned_vips = owned_vips(&current, &node, &owned.borrow());
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
            health.mark_applied(generation);
            // Slow start: re-plan often enough to follow the ramp.
            let wait = if health.ramping() {
                SLOWSTART_STEP
            } else {
                resolved_at.map_or(REFRESH, |at| REFRESH.saturating_sub(at.elapsed()))
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = health.changed() => {}
                changed = config.changed() => {
                    if changed.is_ok() {
                        current = config.borrow_and_update().clone();
                        resolved_at = None;
                        let wanted = local_vips(&current, &node);
                        if wanted != vips {
                            warn!(before = ?vips, after = ?wanted, "the VIPs this node serves changed: the VIPs on lo follow at the next restart");
                        }
                    }
                }
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
