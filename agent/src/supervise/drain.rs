//! Taking this node out of a service before its child stops, behind
//! [`Drainer`] so the cluster-wide drain (health/runtime API, issue 5) can
//! replace the local one without touching the supervisor.
//!
//! [`LocalDrainer`] acts on this node's own load balancer maps only: it
//! stops new flows to this node's backend where this node balances (holds
//! the VIP), and counts the flows this node's maps still track. Balancers on
//! other nodes do not hear of it.

use std::sync::Arc;

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
