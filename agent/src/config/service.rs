//! `[[service]]`: virtual services balanced by the XDP program (HAProxy's
//! `listen` sections of the seed, in the kernel).

use std::{
    collections::HashSet,
    net::{IpAddr, SocketAddr},
};

use serde::Deserialize;

use super::{NodeConfig, Problem, Role};

/// A backend's weight when the config gives none.
pub const DEFAULT_WEIGHT: u32 = 100;
pub const MAX_WEIGHT: u32 = 1000;
/// Ports one service may span (each port is one kernel map entry).
pub const MAX_PORTS_PER_SERVICE: u32 = 1024;

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    pub name: String,
    /// The virtual address clients connect to.
    pub vip: IpAddr,
    /// One port (`80`) or an inclusive range (`"8000-8010"`).
    pub port: PortSpec,
    #[serde(default)]
    pub protocol: Protocol,
    #[serde(default)]
    pub scheduler: Scheduler,
    #[serde(default)]
    pub forwarding: Forwarding,
    pub backends: Vec<BackendConfig>,
    /// How backends are health-checked (`[service.check]`, see health.rs);
    /// without one a backend is up while it answers ARP.
    #[serde(default)]
    pub check: Option<super::health::HealthCheckConfig>,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum PortSpec {
    Single(u16),
    Range(PortRange),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl<'de> Deserialize<'de> for PortRange {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        let parse = |part: &str| part.trim().parse::<u16>().ok();
        match text.split_once('-').map(|(a, b)| (parse(a), parse(b))) {
            Some((Some(first), Some(last))) => Ok(PortRange { first, last }),
            _ => Err(serde::de::Error::custom(format!(
                "expected a port or a range like \"8000-8010\", got {text:?}"
            ))),
        }
    }
}

impl PortSpec {
    pub fn first(self) -> u16 {
        match self {
            PortSpec::Single(port) => port,
            PortSpec::Range(range) => range.first,
        }
    }

    pub fn last(self) -> u16 {
        match self {
            PortSpec::Single(port) => port,
            PortSpec::Range(range) => range.last,
        }
    }

    pub fn ports(self) -> impl Iterator<Item = u16> {
        self.first()..=self.last()
    }
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    #[default]
    Tcp,
    Udp,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Scheduler {
    /// Consistent hashing on the 5-tuple: every balancer picks the same
    /// backend for a flow.
    #[default]
    Maglev,
    /// Consistent hashing on the client address only.
    Source,
    /// Weighted round robin over new flows.
    Roundrobin,
    /// The backend with the fewest active flows per unit of weight.
    Leastconn,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Forwarding {
    /// Direct server return: the backend answers the client itself.
    #[default]
    Dsr,
    /// Full NAT through the balancer.
    Nat,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    /// A node of the cluster (its address is used), or...
    pub node: Option<String>,
    /// ...an address outside the node list.
    pub address: Option<IpAddr>,
    /// Defaults to the service's port (DSR cannot change the port).
    pub port: Option<u16>,
    /// 0..=1000; 0 drains (no new flows, established flows stay).
    #[serde(default = "default_weight")]
    pub weight: u32,
}

fn default_weight() -> u32 {
    DEFAULT_WEIGHT
}

impl BackendConfig {
    /// The backend's address, looking nodes up by name.
    pub fn resolve(&self, nodes: &[NodeConfig]) -> Option<IpAddr> {
        match (&self.node, self.address) {
            (Some(name), None) => nodes
                .iter()
                .find(|n| &n.name == name)
                .map(|n| n.address.addr()),
            (None, Some(address)) => Some(address),
            _ => None,
        }
    }
}

/// The rules `agent check-config` applies to `[[service]]`.
pub(super) fn validate(
    services: &[ServiceConfig],
    nodes: &[NodeConfig],
    problems: &mut Vec<Problem>,
) {
    let mut problem = |key: String, message: String| problems.push(Problem { key, message });
    let max_services = farol_common::lb::MAX_SERVICES as usize;
    if services.len() > max_services {
        problem(
            "service".into(),
            format!(
                "at most {max_services} services fit the kernel maps, got {}",
                services.len()
            ),
        );
    }
    let mut names = HashSet::new();
    let mut listeners = HashSet::new();
    let node_addresses: HashSet<IpAddr> = nodes.iter().map(|n| n.address.addr()).collect();
    for (index, service) in services.iter().enumerate() {
        let at = |key: &str| format!("service[{index}].{key}");
        if service.name.is_empty()
            || !service
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            problem(
                at("name"),
                format!(
                    "expected letters, digits, '-' or '_', got {:?}",
                    service.name
                ),
            );
        } else if !names.insert(service.name.as_str()) {
            problem(
                at("name"),
                format!("{:?} is already the name of another service", service.name),
            );
        }
        if service.vip.is_unspecified() || service.vip.is_multicast() || service.vip.is_loopback() {
            problem(
                at("vip"),
                format!("expected a unicast address, got {}", service.vip),
            );
        }
        if node_addresses.contains(&service.vip) {
            problem(
                at("vip"),
                format!(
                    "{} is a node's own address; a VIP must be an address of its own",
                    service.vip
                ),
            );
        }
        if service.forwarding == Forwarding::Dsr
            && !nodes.iter().any(|node| node.address.contains(&service.vip))
        {
            problem(
                at("vip"),
                format!(
                    "DSR needs the VIP on the nodes' LAN, but {} is in no node's subnet",
                    service.vip
                ),
            );
        }
        if service.forwarding == Forwarding::Nat {
            for node in nodes
                .iter()
                .filter(|node| node.roles.contains(&Role::Balancer))
            {
                if !node.address.addr().is_ipv4() {
                    problem(
                        at("forwarding"),
                        format!(
                            "\"nat\" sends from the balancer's IPv4 address, but balancer {} has {}",
                            node.name,
                            node.address.addr()
                        ),
                    );
                }
            }
        }
        if service.forwarding == Forwarding::Nat && !service.vip.is_ipv4() {
            problem(
                at("forwarding"),
                format!(
                    "\"nat\" is IPv4 only, but the VIP {} is IPv6; use \"dsr\"",
                    service.vip
                ),
            );
        }
        let (first, last) = (service.port.first(), service.port.last());
        if first == 0 || last < first {
            problem(
                at("port"),
                format!("expected ports 1..=65535 with first <= last, got {first}-{last}"),
            );
        } else if u32::from(last - first) + 1 > MAX_PORTS_PER_SERVICE {
            problem(
                at("port"),
                format!(
                    "a range may span at most {MAX_PORTS_PER_SERVICE} ports, got {}",
                    u32::from(last - first) + 1
                ),
            );
        } else {
            for port in service.port.ports() {
                if !listeners.insert((service.vip, port, service.protocol)) {
                    problem(
                        at("port"),
                        format!(
                            "{} port {port}/{:?} is already a port of another service",
                            service.vip, service.protocol
                        ),
                    );
                    break;
                }
            }
        }
        if service.backends.is_empty() {
            problem(at("backends"), "expected at least one backend".into());
        }
        let max_backends = farol_common::lb::MAX_BACKENDS_PER_SERVICE as usize;
        if service.backends.len() > max_backends {
            problem(
                at("backends"),
                format!(
                    "at most {max_backends} backends per service, got {}",
                    service.backends.len()
                ),
            );
        }
        if !service.backends.is_empty() && service.backends.iter().all(|b| b.weight == 0) {
            problem(
                at("backends"),
                "every weight is 0: no backend could take a flow".into(),
            );
        }
        if let Some(check) = &service.check {
            let mut found = Vec::new();
            let udp = service.protocol == Protocol::Udp;
            super::health::validate(check, &at("check"), udp, &mut found);
            for found in found {
                problem(found.key, found.message);
            }
        }
        let mut seen = HashSet::new();
        for (b, backend) in service.backends.iter().enumerate() {
            let at = |key: &str| format!("service[{index}].backends[{b}].{key}");
            match (&backend.node, backend.address) {
                (Some(_), Some(_)) => problem(at("node"), "give node or address, not both".into()),
                (None, None) => problem(
                    at("node"),
                    "expected node = \"NAME\" or address = \"IP\"".into(),
                ),
                (Some(name), None) => match nodes.iter().find(|n| &n.name == name) {
                    None => problem(at("node"), format!("no [[node]] is named {name:?}")),
                    Some(node) if !node.roles.contains(&Role::Web) && !node.roles.is_empty() => {
                        problem(at("node"), format!("{name:?} has no \"web\" role"))
                    }
                    Some(_) => {}
                },
                (None, Some(address)) => {
                    if service.forwarding == Forwarding::Dsr
                        && !nodes.iter().any(|n| n.address.contains(&address))
                    {
                        problem(
                            at("address"),
                            format!("DSR reaches backends by MAC, so {address} must be on the nodes' LAN"),
                        );
                    }
                }
            }
            if backend.weight > MAX_WEIGHT {
                problem(
                    at("weight"),
                    format!("expected 0..={MAX_WEIGHT}, got {}", backend.weight),
                );
            }
            if let Some(port) = backend.port {
                if port == 0 {
                    problem(at("port"), "expected 1..=65535, got 0".into());
                } else if service.forwarding == Forwarding::Dsr
                    && (service.port.first() != service.port.last() || port != service.port.first())
                {
                    problem(
                        at("port"),
                        format!("DSR cannot change ports: leave it out or set it to the service port {}", service.port.first()),
                    );
                }
            }
            if let Some(address) = backend.resolve(nodes) {
                let port = backend.port.unwrap_or(service.port.first());
                if !seen.insert(SocketAddr::new(address, port)) {
                    problem(
                        at("node"),
                        format!("{address}:{port} is listed twice in this service"),
                    );
                }
            }
        }
    }
}
