//! Who is reachable: every agent pings every other on the cluster port
//! (signed, like every message) twice per heartbeat interval's double, and
//! counts a member reachable while it answered or pinged within the
//! election timeout. Also follows Raft's own view (leader, term), logs
//! each change once, and, on the Raft leader, adds the config's learners.

use std::{
    collections::BTreeSet,
    sync::{atomic::Ordering, Arc},
    time::Instant,
};

use openraft::{BasicNode, ServerState};
use tokio::{sync::watch, time::MissedTickBehavior};
use tracing::{info, warn};

use super::{network::PING_PATH, node_id, types::Pong, ClusterHandle, Core, Membership};

impl Core {
    /// Notes that `node` talked to this one now.
    pub(crate) fn saw(&self, node: &str) {
        self.heard
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
            .insert(node.to_owned(), Instant::now());
    }

    fn reachable(&self) -> Vec<String> {
        let heard = self
            .heard
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        self.addresses
            .keys()
            .filter(|name| {
                **name == self.name
                    || heard
                        .get(*name)
                        .is_some_and(|at| at.elapsed() <= self.settings.election_timeout)
            })
            .cloned()
            .collect()
    }
}

/// Runs until `shutdown`.
pub(crate) async fn run(handle: ClusterHandle, mut shutdown: watch::Receiver<bool>) {
    let core = handle.core.clone();
    // Several pings per election timeout: one late answer must not make a
    // member look unreachable.
    let every = (core.settings.election_timeout / 4).max(std::time::Duration::from_millis(50));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut adding: BTreeSet<String> = BTreeSet::new();
    let (added_tx, mut added_rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    loop {
        tokio::select! {
            _ = shutdown.wait_for(|stop| *stop) => return,
            Some(done) = added_rx.recv() => { adding.remove(&done); }
            _ = tick.tick() => {
                for (name, addr) in &core.addresses {
                    if *name == core.name {
                        continue;
                    }
                    let (core, name, addr) = (core.clone(), name.clone(), addr.clone());
                    tokio::spawn(async move {
                        let answer: Result<Pong, _> = core
                            .client
                            .call(&addr, PING_PATH, &core.name, core.settings.election_timeout / 2)
                            .await;
                        if matches!(answer, Ok(pong) if pong.node == name) {
                            core.saw(&name);
                        }
                    });
                }
                update(&handle);
                add_learners(&core, &mut adding, &added_tx);
            }
        }
    }
}

/// Recomputes the membership view; logs what changed.
fn update(handle: &ClusterHandle) {
    let core = &handle.core;
    let metrics = handle.raft_metrics();
    if let Err(fatal) = &metrics.running_state {
        if !core.counters.fatal.swap(true, Ordering::Relaxed) {
            tracing::error!(error = %fatal, "the cluster state stopped (Raft failed): this node no longer votes, renews or follows the primary record; restart the agent");
        }
    }
    let reachable = core.reachable();
    let voters_reachable = core
        .settings
        .voters
        .iter()
        .filter(|voter| reachable.contains(voter))
        .count();
    let has_quorum = voters_reachable * 2 > core.settings.voters.len();
    let raft_leader = metrics
        .current_leader
        .and_then(|id| core.names.get(&id).cloned());
    let before = core.members.borrow().clone();
    let now = Membership {
        reachable,
        has_quorum,
        raft_leader,
        raft_term: metrics.current_term,
        ..before.clone()
    };
    if now == before {
        return;
    }
    for name in now
        .reachable
        .iter()
        .filter(|n| !before.reachable.contains(n))
    {
        info!(member = %name, "cluster member reachable");
    }
    for name in before
        .reachable
        .iter()
        .filter(|n| !now.reachable.contains(n))
    {
        warn!(member = %name, "cluster member unreachable (no answer within the election timeout)");
    }
    if now.has_quorum != before.has_quorum {
        if now.has_quorum {
            info!(reachable = ?now.reachable, voters = ?now.voters, "cluster quorum regained: a majority of voters is reachable");
        } else {
            core.counters.quorum_lost.fetch_add(1, Ordering::Relaxed);
            warn!(reachable = ?now.reachable, voters = ?now.voters, "cluster quorum lost: fewer than a majority of voters reachable; no primary can be chosen from here");
        }
    }
    if now.raft_leader != before.raft_leader {
        core.counters.leader_changes.fetch_add(1, Ordering::Relaxed);
        match &now.raft_leader {
            Some(leader) => {
                info!(%leader, term = now.raft_term, this_node = (*leader == core.name), "Raft leader elected")
            }
            None => warn!(term = now.raft_term, "no Raft leader known"),
        }
    }
    core.members.send_replace(now);
}

/// On the Raft leader: adds the config's learners that are not members.
fn add_learners(
    core: &Arc<Core>,
    adding: &mut BTreeSet<String>,
    done: &tokio::sync::mpsc::UnboundedSender<String>,
) {
    let metrics = core.raft.metrics().borrow().clone();
    if metrics.state != ServerState::Leader {
        return;
    }
    let membership = metrics.membership_config.membership().clone();
    let learners = core.members.borrow().learners.clone();
    for learner in learners {
        let id = node_id(&learner);
        if membership.get_node(&id).is_some() || !adding.insert(learner.clone()) {
            continue;
        }
        let (core, done) = (core.clone(), done.clone());
        let node = BasicNode {
            addr: core.addresses[&learner].clone(),
        };
        tokio::spawn(async move {
            match core.raft.add_learner(id, node, false).await {
                Ok(_) => info!(%learner, "learner added to the Raft membership"),
                Err(error) => warn!(%learner, %error, "cannot add the learner yet"),
            }
            let _ = done.send(learner);
        });
    }
}
