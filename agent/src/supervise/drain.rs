//! Taking this node out of a service before its child stops, behind
//! [`Drainer`] so the cluster-wide drain (health/runtime API, issue 5) can
//! replace the local one without touching the supervisor.
//!
//! [`LocalDrainer`] acts on this node's own load balancer maps only: it
//! stops new flows to this node's backend where this node balances (holds
//! the VIP), and counts the flows this node's maps still track.
//! [`ClusterDrainer`], which `agent run` uses, adds the node's admin state
//! that every balancer reads through the agent check.

use std::{collections::HashSet, sync::Arc};

use futures_util::future::BoxFuture;
use tokio::sync::Mutex;

use crate::{
    balancer::Drains,
    config::Config,
    dataplane::{lb::LoadBalancerMaps, DataplaneError},
};

#[derive(Debug, thiserror::Error)]
pub enum DrainError {
    #[error("writing the load balancer maps")]
    Dataplane(#[from] DataplaneError),
}

/// Drains and restores this node's backend in a service.
pub trait Drainer: Send + Sync + 'static {
    /// No new flows to this node's backend in `service`; established flows
    /// continue.
    fn drain<'a>(&'a self, service: &'a str) -> BoxFuture<'a, Result<(), DrainError>>;
    /// This node's backend in `service` takes new flows again.
    fn undrain<'a>(&'a self, service: &'a str) -> BoxFuture<'a, Result<(), DrainError>>;
    /// Flows to this node's backend in `service` not yet finished, as far
    /// as this drainer can see.
    fn active_flows<'a>(&'a self, service: &'a str) -> BoxFuture<'a, Result<u64, DrainError>>;
}

/// The drain through this node's own maps (see the module comment).
pub struct LocalDrainer {
    maps: Arc<Mutex<LoadBalancerMaps>>,
    drains: Drains,
    config: Arc<Config>,
}

impl LocalDrainer {
    /// `drains` must be the set the balancer task applies, so its refresh
    /// keeps the drain.
    pub fn new(
        maps: Arc<Mutex<LoadBalancerMaps>>,
        drains: Drains,
        config: Arc<Config>,
    ) -> LocalDrainer {
        LocalDrainer {
            maps,
            drains,
            config,
        }
    }

    /// The configured weight of `service`'s backend at `slot`.
    fn configured_weight(&self, service: &str, slot: u32) -> Option<u32> {
        self.config
            .services
            .iter()
            .find(|s| s.name == service)?
            .backends
            .get(slot as usize)
            .map(|backend| backend.weight)
    }
}

impl Drainer for LocalDrainer {
    fn drain<'a>(&'a self, service: &'a str) -> BoxFuture<'a, Result<(), DrainError>> {
        Box::pin(async move {
            self.drains.set(service, true);
            let mut maps = self.maps.lock().await;
            let mut plan = maps.applied().clone();
            self.drains.apply_to(&mut plan);
            if &plan != maps.applied() {
                maps.apply(&plan)?;
            }
            Ok(())
        })
    }

    fn undrain<'a>(&'a self, service: &'a str) -> BoxFuture<'a, Result<(), DrainError>> {
        Box::pin(async move {
            self.drains.set(service, false);
            let mut maps = self.maps.lock().await;
            let mut plan = maps.applied().clone();
            for s in plan.services.iter_mut().filter(|s| s.name == service) {
                for backend in s.backends.iter_mut().filter(|b| b.local) {
                    if let Some(weight) = self.configured_weight(service, backend.slot) {
                        backend.weight = weight;
                    }
                }
            }
            if &plan != maps.applied() {
                maps.apply(&plan)?;
            }
            Ok(())
        })
    }

    fn active_flows<'a>(&'a self, service: &'a str) -> BoxFuture<'a, Result<u64, DrainError>> {
        Box::pin(async move {
            let maps = self.maps.lock().await;
            let local: Vec<String> = maps
                .applied()
                .services
                .iter()
                .filter(|s| s.name == service)
                .flat_map(|s| s.backends.iter().filter(|b| b.local))
                .map(|b| b.name.clone())
                .collect();
            let snapshot = maps.snapshot()?;
            Ok(snapshot
                .services
                .iter()
                .filter(|s| s.name == service)
                .flat_map(|s| s.backends.iter())
                .filter(|b| local.contains(&b.name))
                .map(|b| b.active_flows)
                .sum())
        })
    }
}

/// The drain every balancer honours: this node's admin state becomes
/// `drain`, which its agent check serves and every balancer reads at each
/// check of the node (see `crate::health::agent`), and this node's own
/// maps are drained at once through [`LocalDrainer`].
///
/// Flows still open are counted where they end: established TCP
/// connections to the service's port on this node (in DSR the balancer
/// sees only the client's half of a flow, and another balancer's maps are
/// out of reach), plus what this node's maps track when it balances. Until
/// every other balancer of the cluster has said, in an agent check after
/// the drain began, that its maps hold the drain (`applied=drain`, see
/// `crate::health::agent`), at least one flow is reported, so no balancer
/// can still be choosing this node when the child stops; a balancer that
/// does not ask within three check intervals is taken to be down. The admin state is node-wide: it takes
/// the node out of every service the balancers check it in.
pub struct ClusterDrainer {
    local: LocalDrainer,
    health: Arc<crate::health::Health>,
    config: Arc<Config>,
    node: crate::config::NodeConfig,
    drained_at: std::sync::Mutex<Option<std::time::Instant>>,
    /// The connections to the service's ports seen at the last count, and
    /// when a new one last appeared.
    arrivals: std::sync::Mutex<(HashSet<String>, std::time::Instant)>,
}

/// No new connection to the service's ports for this long: the balancers
/// have stopped sending (their plan is applied), not merely read the drain.
const DRAIN_QUIET: std::time::Duration = std::time::Duration::from_millis(500);

/// After a balancer that does not report what it applied read the drain
/// (an agent before that report): its plan's rebuild and swap (a Maglev
/// table is 65537 map writes).
const DRAIN_APPLY_MARGIN: std::time::Duration = std::time::Duration::from_millis(500);

impl ClusterDrainer {
    pub fn new(
        local: LocalDrainer,
        health: Arc<crate::health::Health>,
        config: Arc<Config>,
        node: crate::config::NodeConfig,
    ) -> ClusterDrainer {
        ClusterDrainer {
            local,
            health,
            config,
            node,
            drained_at: std::sync::Mutex::new(None),
            arrivals: std::sync::Mutex::new((HashSet::new(), std::time::Instant::now())),
        }
    }

    /// How long to wait at most for balancers to read the drain: three of
    /// `service`'s check intervals (the default one without a `check`).
    fn read_deadline(&self, service: &str) -> std::time::Duration {
        let interval = self
            .config
            .services
            .iter()
            .find(|s| s.name == service)
            .and_then(|s| s.check.as_ref().map(|check| check.interval))
            .unwrap_or(crate::config::health::DEFAULT_CHECK_INTERVAL);
        interval * 3
    }

    /// True while some other balancer may still send new flows here: it
    /// has not said its maps hold the drain begun at `since`.
    fn drain_unapplied(&self, service: &str, since: std::time::Instant) -> bool {
        if since.elapsed() >= self.read_deadline(service) {
            return false;
        }
        self.config
            .nodes
            .iter()
            .filter(|n| {
                n.name != self.node.name && n.roles.contains(&crate::config::Role::Balancer)
            })
            .any(|balancer| {
                let read = self
                    .health
                    .agent_reads
                    .read_after(balancer.address.addr(), since);
                !read.is_some_and(holds_drain)
            })
    }

    /// The ports this node serves `service` on.
    fn ports(&self, service: &str) -> Vec<u16> {
        let Some(config) = self.config.services.iter().find(|s| s.name == service) else {
            return Vec::new();
        };
        config
            .backends
            .iter()
            .filter(|backend| backend.resolve(&self.config.nodes) == Some(self.node.address.addr()))
            .map(|backend| backend.port.unwrap_or(config.port.first()))
            .collect()
    }
}

impl Drainer for ClusterDrainer {
    fn drain<'a>(&'a self, service: &'a str) -> BoxFuture<'a, Result<(), DrainError>> {
        Box::pin(async move {
            // State first, then the time: a read after that time surely saw
            // `drain`.
            self.health.set_own_state(
                crate::health::AdminState::Drain,
                &format!("the child backing {service} is down or stopping"),
            );
            *self
                .drained_at
                .lock()
                .unwrap_or_else(|poison| poison.into_inner()) = Some(std::time::Instant::now());
            self.arrivals
                .lock()
                .unwrap_or_else(|poison| poison.into_inner())
                .1 = std::time::Instant::now();
            self.local.drain(service).await
        })
    }

    fn undrain<'a>(&'a self, service: &'a str) -> BoxFuture<'a, Result<(), DrainError>> {
        Box::pin(async move {
            *self
                .drained_at
                .lock()
                .unwrap_or_else(|poison| poison.into_inner()) = None;
            self.health.set_own_state(
                crate::health::AdminState::Ready,
                &format!("the child backing {service} is ready"),
            );
            self.local.undrain(service).await
        })
    }

    fn active_flows<'a>(&'a self, service: &'a str) -> BoxFuture<'a, Result<u64, DrainError>> {
        Box::pin(async move {
            let local = self.local.active_flows(service).await?;
            let current = connections(&self.ports(service));
            let quiet = {
                let mut arrivals = self
                    .arrivals
                    .lock()
                    .unwrap_or_else(|poison| poison.into_inner());
                if current.iter().any(|c| !arrivals.0.contains(c)) {
                    arrivals.1 = std::time::Instant::now();
                }
                let quiet = arrivals.1.elapsed() >= DRAIN_QUIET;
                arrivals.0 = current.clone();
                quiet
            };
            let connections = current.len() as u64;
            let since = *self
                .drained_at
                .lock()
                .unwrap_or_else(|poison| poison.into_inner());
            let unseen = since.is_some_and(|at| self.drain_unapplied(service, at)) || !quiet;
            Ok((local + connections).max(u64::from(unseen)))
        })
    }
}

/// Whether a balancer's agent check says its maps keep new flows away from
/// this node.
fn holds_drain(read: crate::health::AgentRead) -> bool {
    use crate::health::agent::Applied;
    match read.applied {
        Some(Applied::State(state)) => state >= crate::health::AdminState::Drain,
        Some(Applied::Pending) => false,
        None => read.at.elapsed() >= DRAIN_APPLY_MARGIN,
    }
}

/// TCP connections (established, or half-open: SYN received) whose local
/// port is one of `ports`, in this network namespace (/proc/net/tcp and
/// tcp6), each as "local remote" in the kernel's notation.
fn connections(ports: &[u16]) -> HashSet<String> {
    const ESTABLISHED: &str = "01";
    const SYN_RECV: &str = "03";
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|path| std::fs::read_to_string(path).ok())
        .flat_map(|table| {
            table
                .lines()
                .skip(1)
                .filter_map(|line| {
                    let fields: Vec<&str> = line.split_whitespace().collect();
                    let (local, remote, state) = (fields.get(1)?, fields.get(2)?, fields.get(3)?);
                    let port = u16::from_str_radix(local.rsplit(':').next()?, 16).ok()?;
                    (ports.contains(&port) && (*state == ESTABLISHED || *state == SYN_RECV))
                        .then(|| format!("{local} {remote}"))
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

#[cfg(test)]
mod cluster_tests {
    use super::connections;

    #[test]
    fn connections_to_a_port_are_counted() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        assert!(connections(&[port]).is_empty());
        let _client = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let (_server, _) = listener.accept().unwrap();
        assert_eq!(connections(&[port]).len(), 1, "the server's side");
    }
}
