//! Services in which this node's own backend is drained (weight 0) by the
//! agent itself, e.g. while its supervised Apache is down or stopping. The
//! balancer's refresh keeps these at 0 instead of restoring the configured
//! weight.

use std::{
    collections::BTreeSet,
    sync::{Arc, Mutex},
};

use crate::dataplane::lb::LbPlan;

#[derive(Debug, Clone, Default)]
pub struct Drains(Arc<Mutex<BTreeSet<String>>>);

impl Drains {
    /// Marks `service` drained or not; true when that changed something.
    pub fn set(&self, service: &str, drained: bool) -> bool {
        let mut set = self.0.lock().unwrap_or_else(|poison| poison.into_inner());
        if drained {
            set.insert(service.to_owned())
        } else {
            set.remove(service)
        }
    }

    pub fn contains(&self, service: &str) -> bool {
        self.0
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
            .contains(service)
    }

    /// Sets the weight of this node's own backends to 0 in drained services.
    pub fn apply_to(&self, plan: &mut LbPlan) {
        let set = self.0.lock().unwrap_or_else(|poison| poison.into_inner());
        for service in plan.services.iter_mut() {
            if set.contains(&service.name) {
                for backend in service.backends.iter_mut().filter(|b| b.local) {
                    backend.weight = 0;
                }
            }
        }
    }
}
