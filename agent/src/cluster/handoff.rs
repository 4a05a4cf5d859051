//! Handoff requests: any agent may ask the lease holder (the recorded
//! primary's agent) to hand the primary over to another node. The request
//! travels on the cluster port, signed like every agent-to-agent message,
//! and the lease holder runs what `pgha` registered for it (stop writes,
//! wait for the target to replay everything, then the handoff
//! [`ClusterHandle::set_primary`], which needs no lease wait). The cluster
//! module only carries the request: what a handoff does to PostgreSQL is
//! `pgha`'s.

use std::{future::Future, pin::Pin, sync::Arc, time::Duration};

use serde::{Deserialize, Serialize};

use super::{network::HANDOFF_PATH, ClusterError, ClusterHandle, Core};

/// What the lease holder runs for a handoff request: the target node in,
/// a summary (or why it refused) out.
pub type HandoffHandler = Arc<
    dyn Fn(String) -> Pin<Box<dyn Future<Output = Result<String, String>> + Send>> + Send + Sync,
>;

/// The body of a forwarded handoff request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct HandoffRequest {
    pub(crate) target: String,
}

impl ClusterHandle {
    /// Registers what this agent runs when it holds the lease and is asked
    /// to hand the primary over (once; later calls are ignored).
    pub fn serve_handoffs(&self, handler: HandoffHandler) {
        let _ = self.core.handoff.set(handler);
    }

    /// Asks the recorded primary's agent to hand the primary over to
    /// `target` and waits for its answer (at most `within`): here when this
    /// node is the recorded primary, else over the cluster port.
    pub async fn request_handoff(&self, target: &str, within: Duration) -> Result<String, String> {
        let primary = self.core.primary.borrow().clone();
        let Some(primary) = primary else {
            return Err("no primary is recorded yet: nothing to hand over".into());
        };
        if primary.node == self.core.name {
            return self.core.run_handoff(target.to_owned()).await;
        }
        let Some(addr) = self.core.addresses.get(&primary.node) else {
            return Err(format!(
                "the primary {} has no cluster address",
                primary.node
            ));
        };
        let request = HandoffRequest {
            target: target.to_owned(),
        };
        match self
            .core
            .client
            .call::<_, Result<String, String>>(addr, HANDOFF_PATH, &request, within)
            .await
        {
            Ok(answer) => answer,
            Err(error) => Err(format!(
                "cannot reach the primary's agent ({}): {error}",
                primary.node
            )),
        }
    }

    /// Gives up this node's lease ahead of a handoff to `to`: the record
    /// still names this node, but it holds no lease (so `pgha` fences its
    /// server) and renewals do not grant it again until
    /// [`ClusterHandle::resume_lease`] or the handoff. Returns the epoch
    /// given up; refused when this node does not hold the lease.
    pub fn pause_lease(&self, to: &str) -> Result<u64, ClusterError> {
        let epoch = self
            .core
            .primary
            .borrow()
            .as_ref()
            .filter(|record| record.node == self.core.name)
            .map(|record| record.epoch);
        match epoch {
            Some(epoch) if *self.core.holds_lease.borrow() => {
                self.core.release_lease(epoch, to);
                Ok(epoch)
            }
            _ => Err(ClusterError::Internal(format!(
                "{} does not hold the primary lease",
                self.core.name
            ))),
        }
    }

    /// Undoes [`ClusterHandle::pause_lease`] (a handoff that failed): the
    /// next renewal grants the lease again.
    pub fn resume_lease(&self) {
        self.core.resume_lease();
    }
}

impl Core {
    pub(crate) async fn run_handoff(&self, target: String) -> Result<String, String> {
        match self.handoff.get() {
            Some(handler) => handler(target).await,
            None => Err(format!(
                "the agent of {} runs no PostgreSQL handoff (no [postgres] on this node?)",
                self.name
            )),
        }
    }
}
