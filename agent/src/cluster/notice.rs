//! Switchover notices: the lease holder tells every agent (itself
//! included) that a planned switchover starts or ended, and waits for
//! their answers. The poolers use it to pause: they hold new transactions
//! for the primary and let running ones finish before the old primary is
//! fenced, then release them to the new one. The notice travels on the
//! cluster port, signed like every agent-to-agent message; the cluster
//! module only carries it (what a pause does is the pooler's).

use std::{future::Future, pin::Pin, sync::Arc, time::Duration};

use serde::{Deserialize, Serialize};

use super::{network::NOTICE_PATH, ClusterHandle, Core};

/// What a planned switchover tells the agents.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SwitchoverNotice {
    /// The primary `from` is about to be fenced and handed over to `to`.
    Started { from: String, to: String },
    /// The switchover is over: `done` (`to` is the primary) or not (`from`
    /// runs again); `detail` says why.
    Ended {
        from: String,
        to: String,
        done: bool,
        detail: String,
    },
}

/// What an agent runs for a notice: a one-line answer (what it did).
pub type NoticeHandler =
    Arc<dyn Fn(SwitchoverNotice) -> Pin<Box<dyn Future<Output = String> + Send>> + Send + Sync>;

impl ClusterHandle {
    /// Registers what this agent runs for switchover notices (once; later
    /// calls are ignored). An agent without one answers that it has none.
    pub fn serve_switchover_notices(&self, handler: NoticeHandler) {
        let _ = self.core.notices.set(handler);
    }

    /// Sends `notice` to every reachable node of the cluster at once (this
    /// one locally) and returns each node's answer, in node order; a node
    /// that does not answer within `within` gets an `Err`, and so does one
    /// this agent has not heard from lately (not waited for: a dead node
    /// must not hold up a switchover).
    pub async fn announce_switchover(
        &self,
        notice: &SwitchoverNotice,
        within: Duration,
    ) -> Vec<(String, Result<String, String>)> {
        let reachable = self.core.members.borrow().reachable.clone();
        let calls = self.core.addresses.iter().map(|(node, addr)| {
            let core = self.core.clone();
            let notice = notice.clone();
            let heard = reachable.contains(node);
            async move {
                let answer = if *node == core.name {
                    tokio::time::timeout(within, core.run_notice(notice))
                        .await
                        .map_err(|_| format!("no answer within {within:?}"))
                } else if !heard {
                    Err("not reachable lately: not told".to_owned())
                } else {
                    core.client
                        .call::<_, String>(addr, NOTICE_PATH, &notice, within)
                        .await
                        .map_err(|error| error.to_string())
                };
                (node.clone(), answer)
            }
        });
        futures_util::future::join_all(calls).await
    }
}

impl Core {
    pub(crate) async fn run_notice(&self, notice: SwitchoverNotice) -> String {
        match self.notices.get() {
            Some(handler) => handler(notice).await,
            None => "no pooler on this node".into(),
        }
    }
}
