//! One picture of the node for the status page, the JSON endpoint and
//! `agent status`: VIPs, services, backends with what the kernel does with
//! them (alive, weight, flows) and what the checks say.

use std::{fmt::Write as _, sync::Arc};

use serde::{Deserialize, Serialize};

use crate::{
    config::Config,
    dataplane::lb::LoadBalancerMaps,
    health::{AdminState, Health},
};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    pub cluster: String,
    pub node: String,
    pub version: String,
    /// This node's own admin state (what its agent check answers).
    pub admin: AdminState,
    pub vips: Vec<VipStatus>,
    pub services: Vec<ServiceStatus>,
    /// The agents' shared state, when the config has a [cluster_state].
    #[serde(default)]
    pub cluster_state: Option<crate::cluster::ClusterStatus>,
    /// Where the XDP program runs and in which mode it actually attached
    /// (`xdp_mode = "auto"` falls back to generic where the driver has no
    /// native XDP, as on a Raspberry Pi 4). None without a data plane.
    #[serde(default)]
    pub xdp: Option<XdpStatus>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct XdpStatus {
    pub interface: String,
    /// "native" or "generic".
    pub mode: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VipStatus {
    pub vip: String,
    /// "master" when this node holds (balances) the VIP, else "backup".
    /// Until VRRP exists the first balancer of the cluster file holds it.
    pub role: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServiceStatus {
    pub name: String,
    pub vip: String,
    pub ports: String,
    pub protocol: String,
    pub scheduler: String,
    pub check: Option<String>,
    pub packets: u64,
    pub new_flows: u64,
    pub dropped_no_backend: u64,
    pub backends: Vec<BackendRow>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BackendRow {
    pub name: String,
    pub address: String,
    /// "up", "down", "drain", "maint" or "unreachable": what an operator
    /// sees first, colour on the page.
    pub state: String,
    /// The kernel takes it into account (checks pass, reachable, not maint).
    pub alive: bool,
    /// The weight the kernel uses now (0 while draining; ramping in slow start).
    pub weight: u32,
    pub configured_weight: u32,
    pub admin: AdminState,
    pub check_state: String,
    pub last_check: Option<String>,
    pub last_check_latency_ms: Option<f64>,
    pub last_check_passed: Option<bool>,
    pub checks_passed: u64,
    pub checks_failed: u64,
    pub state_changes: u64,
    pub active_flows: u64,
    pub new_flows: u64,
    pub packets: u64,
    pub slowstart: Option<f64>,
}

/// Gathers the status from the kernel maps (if any), health and config.
pub async fn gather(
    cluster: &str,
    node: &str,
    config: &Config,
    health: &Health,
    maps: Option<&Arc<tokio::sync::Mutex<LoadBalancerMaps>>>,
) -> Status {
    let (plan, snapshot) = match maps {
        Some(maps) => {
            let maps = maps.lock().await;
            (Some(maps.applied().clone()), maps.snapshot().ok())
        }
        None => (None, None),
    };
    let health_rows = health.status();
    let vips = {
        let mut vips: Vec<VipStatus> = config
            .services
            .iter()
            .map(|s| s.vip)
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .map(|vip| VipStatus {
                vip: vip.to_string(),
                role: if plan.as_ref().is_some_and(|p| p.owned_vips.contains(&vip)) {
                    "master".into()
                } else {
                    "backup".into()
                },
            })
            .collect();
        vips.sort_by(|a, b| a.vip.cmp(&b.vip));
        vips
    };
    let services = config
        .services
        .iter()
        .map(|service| {
            let planned = plan
                .as_ref()
                .and_then(|p| p.services.iter().find(|s| s.name == service.name));
            let counters = snapshot
                .as_ref()
                .and_then(|s| s.services.iter().find(|s| s.name == service.name));
            let backends = service
                .backends
                .iter()
                .filter_map(|backend| {
                    let addr = backend.resolve(&config.nodes)?;
                    let name = backend.node.clone().unwrap_or_else(|| addr.to_string());
                    let port = backend.port.unwrap_or(service.port.first());
                    let in_plan = planned.and_then(|p| p.backends.iter().find(|b| b.name == name));
                    let counted = counters.and_then(|c| c.backends.iter().find(|b| b.name == name));
                    let checked = health_rows
                        .iter()
                        .find(|r| r.service == service.name && r.backend == name);
                    let admin = checked.map(|r| r.admin).unwrap_or_default();
                    let alive = in_plan.is_some_and(|b| b.alive);
                    let reachable = in_plan.is_some_and(|b| b.local || b.mac.is_some());
                    let check_state = checked.map_or("unchecked", |r| r.check_state);
                    let state = if admin == AdminState::Maint {
                        "maint"
                    } else if check_state == "down" {
                        "down"
                    } else if in_plan.is_some() && !reachable {
                        "unreachable"
                    } else if admin == AdminState::Drain {
                        "drain"
                    } else if alive {
                        "up"
                    } else {
                        "down"
                    };
                    let last = checked.and_then(|r| r.last_check.clone());
                    Some(BackendRow {
                        name,
                        address: std::net::SocketAddr::new(addr, port).to_string(),
                        state: state.into(),
                        alive,
                        weight: in_plan.map_or(0, |b| b.weight),
                        configured_weight: backend.weight,
                        admin,
                        check_state: check_state.into(),
                        last_check: last.as_ref().map(|l| l.detail.clone()),
                        last_check_latency_ms: last.as_ref().map(|l| l.latency_seconds * 1000.0),
                        last_check_passed: last.as_ref().map(|l| l.passed),
                        checks_passed: checked.map_or(0, |r| r.checks_passed),
                        checks_failed: checked.map_or(0, |r| r.checks_failed),
                        state_changes: checked.map_or(0, |r| r.state_changes),
                        active_flows: counted.map_or(0, |c| c.active_flows),
                        new_flows: counted.map_or(0, |c| c.stats.new_flows),
                        packets: counted.map_or(0, |c| c.stats.packets),
                        slowstart: checked.and_then(|r| r.slowstart),
                    })
                })
                .collect();
            ServiceStatus {
                name: service.name.clone(),
                vip: service.vip.to_string(),
                ports: if service.port.first() == service.port.last() {
                    service.port.first().to_string()
                } else {
                    format!("{}-{}", service.port.first(), service.port.last())
                },
                protocol: format!("{:?}", service.protocol).to_lowercase(),
                scheduler: format!("{:?}", service.scheduler).to_lowercase(),
                check: service.check.as_ref().map(|c| {
                    format!(
                        "{} every {} rise {} fall {}",
                        format!("{:?}", c.kind).to_lowercase(),
                        humantime::format_duration(c.interval),
                        c.rise,
                        c.fall
                    )
                }),
                packets: counters.map_or(0, |c| c.stats.packets),
                new_flows: counters.map_or(0, |c| c.stats.new_flows),
                dropped_no_backend: counters.map_or(0, |c| c.stats.drops_no_backend),
                backends,
            }
        })
        .collect();
    Status {
        cluster: cluster.to_owned(),
        node: node.to_owned(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        admin: health.own_state(),
        vips,
        services,
        cluster_state: None,
        xdp: None,
    }
}

/// `agent status`: a plain table, as `haproxy show stat` would be if it
/// were meant for people.
pub fn render_table(status: &Status) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "node {} (cluster {}, agent {}), admin state: {}",
        status.node,
        status.cluster,
        status.version,
        status.admin.label()
    );
    if let Some(xdp) = &status.xdp {
        let _ = writeln!(out, "XDP on {}: {} mode", xdp.interface, xdp.mode);
    }
    for vip in &status.vips {
        let _ = writeln!(out, "VIP {:<39} {}", vip.vip, vip.role);
    }
    for service in &status.services {
        let _ = writeln!(
            out,
            "\nservice {}  {}:{}/{}  {}  check: {}  new flows {}  dropped (no backend) {}",
            service.name,
            service.vip,
            service.ports,
            service.protocol,
            service.scheduler,
            service
                .check
                .as_deref()
                .unwrap_or("none (up while it answers ARP)"),
            service.new_flows,
            service.dropped_no_backend
        );
        let _ = writeln!(
            out,
            "  {:<12} {:<22} {:<11} {:>6} {:>6} {:>7} {:>9}  LAST CHECK",
            "BACKEND", "ADDRESS", "STATE", "WEIGHT", "FLOWS", "NEW", "LATENCY"
        );
        for b in &service.backends {
            let weight = if b.weight == b.configured_weight {
                b.weight.to_string()
            } else {
                format!("{}/{}", b.weight, b.configured_weight)
            };
            let latency = b
                .last_check_latency_ms
                .map_or("-".to_owned(), |ms| format!("{ms:.1}ms"));
            let _ = writeln!(
                out,
                "  {:<12} {:<22} {:<11} {:>6} {:>6} {:>7} {:>9}  {}",
                b.name,
                b.address,
                b.state,
                weight,
                b.active_flows,
                b.new_flows,
                latency,
                b.last_check.as_deref().unwrap_or("-")
            );
        }
    }
    if let Some(cluster) = &status.cluster_state {
        let _ = write!(
            out,
            "\ncluster state\n{}",
            crate::cluster::control::render(cluster)
        );
    }
    out
}
