//! Cluster state: agent-to-agent membership and the quorum that database
//! promotion (and later storage writes) need, on openraft (Raft), never a
//! home-made protocol. What the agents agree on is one record: which node
//! is the PostgreSQL primary, with an epoch that grows at every change, and
//! the primary's lease.
//!
//! - Membership follows the config: `[cluster_state] voters` vote (an odd
//!   number, so a split into two halves always leaves one side a
//!   majority); every other `[[node]]` is a learner that follows the state.
//! - The lease (see [`promise`] for the safety argument): the recorded
//!   primary asks every voter for a promise every `lease / 4`, directly,
//!   not through Raft. It holds the lease until `lease` after it *sent* the
//!   latest request a majority of voters granted. A voter's promise runs
//!   `lease + lease_margin` from when it *received* the request; the Raft
//!   leader makes another node primary (other than by a handoff from the
//!   primary itself) only once a majority of voters *revoked* the
//!   primary's epoch, which each does only after its promise lapsed and
//!   for good (fsynced). Any two majorities share a voter, so a primary cut
//!   off from the majority stops holding the lease before anyone else can
//!   be chosen. Because no Raft leader takes part in renewals, a Raft
//!   election (the death of a Raft leader that is not the primary, a slow
//!   heartbeat) costs the primary nothing: the lease need not outlive an
//!   election, and the default (1 s + 0.25 s margin) replaces a dead
//!   primary about 1.25 s after its last promise, whether or not its node
//!   is a voter. The clocks are assumed to run at the same rate within the
//!   margin (monotonic clocks, slewed by NTP by at most 0.05%).
//! - Storage (see [`store`]): the Raft vote and log are on disk under
//!   `state_dir/<node>/`, fsynced before Raft is told they are saved; the
//!   state machine is rebuilt from the snapshot and the log at start.
//! - Transport (see [`transport`]): HTTP on `[cluster_state] port` of each
//!   node's address, every message authenticated with the cluster secret.
//!
//! This module does not decide *when* a primary should change: `pgha` does,
//! through [`ClusterHandle::set_primary`], and follows
//! [`ClusterHandle::holds_lease`] to stop writes.

pub mod control;
mod handoff;
mod lease;
mod members;
pub mod metrics;
mod network;
mod notice;
mod promise;
mod store;
pub mod transport;
pub mod types;

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::body::Bytes;
use openraft::{error::ClientWriteError, BasicNode, Raft, SnapshotPolicy};
use serde::{Deserialize, Serialize};
use sha2::Digest;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::config::{ClusterStateConfig, Config, NodeConfig};
pub use handoff::HandoffHandler;
use network::NOTICE_PATH;
use network::{
    Network, APPEND_PATH, HANDOFF_PATH, PING_PATH, PROMISE_PATH, REVOKE_PATH, SNAPSHOT_PATH,
    VOTE_PATH, WRITE_PATH,
};
pub use notice::{NoticeHandler, SwitchoverNotice};
use store::{LogStore, StateMachine};
use transport::{Client, MessageKey, Rejections};
use types::{Command, Outcome, Pong, Request, TypeConfig};

/// Which node is the primary, and since which change.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrimaryRecord {
    pub node: String,
    /// Grows by one at every change of primary (1 for the first).
    pub epoch: u64,
}

/// The members as this agent sees them right now.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Membership {
    /// The voters of the config.
    pub voters: Vec<String>,
    /// The other nodes, which follow the state without a vote.
    pub learners: Vec<String>,
    /// Members this agent exchanged a message with within the election
    /// timeout (itself included).
    pub reachable: Vec<String>,
    /// True when the reachable members include a majority of the voters.
    pub has_quorum: bool,
    /// The Raft leader this agent knows of.
    pub raft_leader: Option<String>,
    /// The Raft term this agent is in.
    pub raft_term: u64,
}

/// Why a cluster operation failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum ClusterError {
    #[error("no quorum: {0}")]
    NoQuorum(String),
    #[error("the epoch moved: expected {expected}, the record is now {}", describe(.current))]
    EpochMoved {
        expected: u64,
        current: Option<PrimaryRecord>,
    },
    #[error("{primary} may still hold the primary lease (last renewal {since_ms} ms ago; another primary needs {needed_ms} ms without one); retry later")]
    LeaseHeld {
        primary: String,
        since_ms: u64,
        needed_ms: u64,
    },
    #[error("{0:?} is not a [[node]] of the cluster")]
    UnknownNode(String),
    #[error("cluster state storage: {0}")]
    Storage(String),
    #[error("cluster state: {0}")]
    Internal(String),
    #[error("the cluster state is stopping")]
    Stopped,
}

fn describe(record: &Option<PrimaryRecord>) -> String {
    match record {
        Some(record) => format!("{} at epoch {}", record.node, record.epoch),
        None => "no primary".into(),
    }
}

/// A node's Raft id: stable across restarts and config reorderings
/// (the first 8 bytes of SHA-256 of its name).
pub fn node_id(name: &str) -> u64 {
    let digest = sha2::Sha256::digest(name.as_bytes());
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(bytes)
}

/// The cluster state of this agent: cheap to clone, shared by subsystems.
#[derive(Debug, Clone)]
pub struct ClusterHandle {
    core: Arc<Core>,
}

struct Core {
    name: String,
    settings: ClusterStateConfig,
    raft: Raft<TypeConfig>,
    machine: StateMachine,
    client: Client,
    /// Node name to its cluster address (`IP:port`).
    addresses: BTreeMap<String, String>,
    /// Raft id to node name.
    names: BTreeMap<u64, String>,
    primary: watch::Receiver<Option<PrimaryRecord>>,
    lease: Mutex<lease::LeaseState>,
    /// This node's promises as a voter (see [`promise`]).
    promises: Mutex<promise::Promises>,
    holds_lease: watch::Sender<bool>,
    members: watch::Sender<Membership>,
    rejections: Arc<Rejections>,
    /// When each peer last answered a ping or pinged this node.
    heard: Mutex<BTreeMap<String, Instant>>,
    counters: Counters,
    /// What this agent runs when asked to hand the primary over.
    handoff: std::sync::OnceLock<HandoffHandler>,
    /// What this agent runs for switchover notices (its pooler's pause).
    notices: std::sync::OnceLock<NoticeHandler>,
}

impl std::fmt::Debug for Core {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Core")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// Changes counted for `/metrics`.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) lease_gained: std::sync::atomic::AtomicU64,
    pub(crate) lease_lost: std::sync::atomic::AtomicU64,
    pub(crate) quorum_lost: std::sync::atomic::AtomicU64,
    pub(crate) leader_changes: std::sync::atomic::AtomicU64,
    /// As a voter: lease promises granted and refused, revocations given,
    /// held off by a live promise, refused.
    pub(crate) promises_granted: std::sync::atomic::AtomicU64,
    pub(crate) promises_refused: std::sync::atomic::AtomicU64,
    pub(crate) revocations_given: std::sync::atomic::AtomicU64,
    pub(crate) revocations_held: std::sync::atomic::AtomicU64,
    pub(crate) revocations_refused: std::sync::atomic::AtomicU64,
    /// Set once openraft stopped on a fatal error (logged once).
    pub(crate) fatal: std::sync::atomic::AtomicBool,
}

impl ClusterHandle {
    /// The committed primary record (None before any is chosen); changes
    /// are pushed.
    pub fn primary(&self) -> watch::Receiver<Option<PrimaryRecord>> {
        self.core.primary.clone()
    }

    /// True only while this node holds the primary lease: it is the
    /// recorded primary and a majority of voters granted it a promise
    /// asked for within `lease`. Turns false when that time runs out,
    /// before any other node can be made primary (see the module doc).
    pub fn holds_lease(&self) -> watch::Receiver<bool> {
        self.core.holds_lease.subscribe()
    }

    /// Which members are reachable now, and whether this node sees a quorum.
    pub fn members(&self) -> watch::Receiver<Membership> {
        self.core.members.subscribe()
    }

    /// This node's name.
    pub fn node(&self) -> &str {
        &self.core.name
    }

    /// Compare-and-set through consensus: make `node` the primary if the
    /// epoch is still `expected_epoch`. Fails with [`ClusterError::NoQuorum`]
    /// when no majority answers, [`ClusterError::EpochMoved`] when the
    /// record changed, [`ClusterError::LeaseHeld`] while another primary may
    /// still hold its lease. Called on the current primary itself, it hands
    /// over: this node gives up its lease first, so no wait is needed.
    pub async fn set_primary(
        &self,
        node: &str,
        expected_epoch: u64,
    ) -> Result<PrimaryRecord, ClusterError> {
        if !self.core.addresses.contains_key(node) {
            return Err(ClusterError::UnknownNode(node.to_owned()));
        }
        let current = self.core.primary.borrow().clone();
        let handoff = current
            .as_ref()
            .filter(|record| record.node == self.core.name && record.node != node)
            .map(|record| record.epoch);
        if let Some(epoch) = handoff {
            self.core.release_lease(epoch, node);
        }
        let outcome = self
            .core
            .submit(
                Request::SetPrimary {
                    node: node.to_owned(),
                    expected_epoch,
                    handoff_from: handoff.map(|_| self.core.name.clone()),
                },
                self.core.settings.write_timeout(),
            )
            .await;
        if handoff.is_some() && outcome.is_err() {
            self.core.resume_lease();
        }
        match outcome? {
            Outcome::Primary(record) => Ok(record),
            Outcome::Refused(error) => Err(error),
            other => Err(ClusterError::Internal(format!(
                "unexpected outcome {other:?}"
            ))),
        }
    }

    /// A summary for `agent cluster status` and the status API.
    pub fn status(&self) -> ClusterStatus {
        let metrics = self.core.raft.metrics().borrow().clone();
        ClusterStatus {
            node: self.core.name.clone(),
            is_voter: self.core.settings.is_voter(&self.core.name),
            primary: self.core.primary.borrow().clone(),
            holds_lease: *self.core.holds_lease.borrow(),
            raft_state: format!("{:?}", metrics.state),
            raft_term: metrics.current_term,
            last_applied: metrics.last_applied.map(|id| id.index),
            membership: self.core.members.borrow().clone(),
        }
    }

    /// Refused messages by reason (for metrics and tests).
    pub fn rejections(&self) -> Arc<Rejections> {
        self.core.rejections.clone()
    }

    fn raft_metrics(&self) -> openraft::RaftMetrics<u64, BasicNode> {
        self.core.raft.metrics().borrow().clone()
    }
}

/// What `agent cluster status` shows.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterStatus {
    pub node: String,
    pub is_voter: bool,
    pub primary: Option<PrimaryRecord>,
    pub holds_lease: bool,
    /// Leader, Follower, Candidate or Learner.
    pub raft_state: String,
    pub raft_term: u64,
    pub last_applied: Option<u64>,
    pub membership: Membership,
}

impl Core {
    fn leader_name(&self) -> Option<String> {
        let leader = self.raft.metrics().borrow().current_leader?;
        self.names.get(&leader).cloned()
    }

    /// Runs `request` on the Raft leader: here if this node leads, else
    /// forwarded to it; retried while an election is under way, until
    /// `within` has passed.
    async fn submit(&self, request: Request, within: Duration) -> Result<Outcome, ClusterError> {
        let deadline = Instant::now() + within;
        let mut last_error = "no Raft leader known".to_owned();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ClusterError::NoQuorum(last_error));
            }
            let leader = self.leader_name();
            let attempt = match &leader {
                Some(leader) if *leader == self.name => {
                    match tokio::time::timeout(left, self.execute(request.clone())).await {
                        Ok(result) => result,
                        Err(_) => Err(ClusterError::NoQuorum(format!(
                            "the Raft leader ({leader}, this node) could not commit within {}",
                            humantime::format_duration(within)
                        ))),
                    }
                }
                Some(leader) => {
                    let addr = &self.addresses[leader];
                    match self
                        .client
                        .call::<_, Result<Outcome, ClusterError>>(addr, WRITE_PATH, &request, left)
                        .await
                    {
                        Ok(result) => result,
                        Err(error) => Err(ClusterError::NoQuorum(format!(
                            "Raft leader {leader}: {error}"
                        ))),
                    }
                }
                None => Err(ClusterError::NoQuorum(last_error.clone())),
            };
            match attempt {
                Err(ClusterError::NoQuorum(why)) => {
                    last_error = why;
                    tokio::time::sleep(self.settings.heartbeat_interval.min(left)).await;
                }
                other => return other,
            }
        }
    }

    /// Runs `request` on this node, the Raft leader.
    async fn execute(&self, request: Request) -> Result<Outcome, ClusterError> {
        // Confirms leadership with a quorum and waits until every committed
        // entry is applied here, so the lease view below is current.
        if let Err(error) = self.raft.ensure_linearizable().await {
            return Err(ClusterError::NoQuorum(format!(
                "this node ({}) cannot confirm it leads: {error}",
                self.name
            )));
        }
        let started = Instant::now();
        let command = match request {
            Request::SetPrimary {
                node,
                expected_epoch,
                handoff_from,
            } => {
                let view = self.machine.view();
                if view.state.epoch != expected_epoch {
                    return Ok(Outcome::Refused(ClusterError::EpochMoved {
                        expected: expected_epoch,
                        current: view.state.primary,
                    }));
                }
                if let Some(current) = &view.state.primary {
                    let handoff = handoff_from.as_deref() == Some(current.node.as_str());
                    if current.node != node && !handoff {
                        // Waits for promises that lapse within one
                        // promise's length; refused after that.
                        let deadline =
                            started + self.settings.lease + self.settings.lease_margin * 2;
                        if let Err(error) = self
                            .revoke_majority(&current.node, current.epoch, deadline)
                            .await
                        {
                            return match error {
                                ClusterError::LeaseHeld { .. } => Ok(Outcome::Refused(error)),
                                other => Err(other),
                            };
                        }
                    }
                }
                Command::SetPrimary {
                    node,
                    expected_epoch,
                    expected_renewals: view.state.renewals,
                    handoff_from,
                }
            }
        };
        match self.raft.client_write(command).await {
            Ok(response) => Ok(response.data),
            Err(openraft::error::RaftError::APIError(ClientWriteError::ForwardToLeader(_))) => Err(
                ClusterError::NoQuorum(format!("{} is no longer the Raft leader", self.name)),
            ),
            Err(error) => Err(ClusterError::Internal(error.to_string())),
        }
    }
}

/// The server side of the cluster port.
impl transport::Handler for Core {
    async fn handle(
        self: Arc<Self>,
        path: &'static str,
        sender: String,
        body: Bytes,
    ) -> Result<Vec<u8>, String> {
        fn decode<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, String> {
            serde_json::from_slice(body).map_err(|error| error.to_string())
        }
        fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, String> {
            serde_json::to_vec(value).map_err(|error| error.to_string())
        }
        match path {
            APPEND_PATH => encode(&self.raft.append_entries(decode(&body)?).await),
            VOTE_PATH => encode(&self.raft.vote(decode(&body)?).await),
            SNAPSHOT_PATH => encode(&self.raft.install_snapshot(decode(&body)?).await),
            WRITE_PATH => {
                let request: Request = decode(&body)?;
                let within = self.settings.write_timeout();
                let result = match tokio::time::timeout(within, self.execute(request)).await {
                    Ok(result) => result,
                    Err(_) => Err(ClusterError::NoQuorum(format!(
                        "the Raft leader ({}) could not commit within {}",
                        self.name,
                        humantime::format_duration(within)
                    ))),
                };
                encode(&result)
            }
            PROMISE_PATH => encode(&self.grant_promise(&sender, &decode(&body)?)),
            REVOKE_PATH => encode(&self.revoke_promise(&decode(&body)?)),
            HANDOFF_PATH => {
                let request: handoff::HandoffRequest = decode(&body)?;
                encode(&self.run_handoff(request.target).await)
            }
            NOTICE_PATH => encode(&self.run_notice(decode(&body)?).await),
            PING_PATH => {
                let _: String = decode(&body)?;
                self.saw(&sender);
                encode(&Pong {
                    node: self.name.clone(),
                    term: self.raft.metrics().borrow().current_term,
                })
            }
            other => Err(format!("no handler for {other}")),
        }
    }
}

/// The cluster address of `node`: its LAN address and the section's port.
pub fn address(node: &NodeConfig, settings: &ClusterStateConfig) -> SocketAddr {
    SocketAddr::new(node.address.addr(), settings.port)
}

/// Where `node` keeps its Raft files.
pub fn state_dir(settings: &ClusterStateConfig, node: &str) -> PathBuf {
    settings.state_dir.join(node)
}

/// Starts the cluster state of `node` when the config has a
/// `[cluster_state]`: binds the cluster port, opens the log, starts Raft
/// and the lease and membership tasks; all stop when `shutdown` turns true.
pub async fn start(
    config: &Config,
    node: &NodeConfig,
    shutdown: watch::Receiver<bool>,
) -> Result<Option<ClusterHandle>, ClusterError> {
    let Some(settings) = config.cluster_state.clone() else {
        return Ok(None);
    };
    let secret = config
        .secret()
        .map_err(|error| {
            ClusterError::Internal(format!("cannot read the cluster secret: {error}"))
        })?
        .ok_or_else(|| ClusterError::Internal("no cluster secret (cluster.secret_file)".into()))?;
    let key = MessageKey::new(&secret)
        .ok_or_else(|| ClusterError::Internal("the cluster secret is empty".into()))?;
    let addresses: BTreeMap<String, String> = config
        .nodes
        .iter()
        .map(|n| (n.name.clone(), address(n, &settings).to_string()))
        .collect();
    let names: BTreeMap<u64, String> = config
        .nodes
        .iter()
        .map(|n| (node_id(&n.name), n.name.clone()))
        .collect();
    if names.len() != config.nodes.len() {
        return Err(ClusterError::Internal(
            "two node names hash to the same Raft id; rename one".into(),
        ));
    }
    let listen = address(node, &settings);
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|error| ClusterError::Internal(format!("cannot listen on {listen}: {error}")))?;
    let dir = state_dir(&settings, &node.name);
    let log = LogStore::open(&dir)?;
    let revoked_through = promise::load_revoked(&dir)?;
    let (primary_tx, primary_rx) = watch::channel(None);
    let machine = StateMachine::open(&dir, primary_tx)?;
    let raft_config = openraft::Config {
        cluster_name: config.cluster.name.clone(),
        heartbeat_interval: settings.heartbeat_interval.as_millis() as u64,
        // openraft waits `election_timeout_max` (its leader lease) plus a
        // random timeout in [min, max) after the last word of a committed
        // leader before it elects: this split makes that wait
        // election_timeout to 1.1 x election_timeout.
        election_timeout_min: settings.election_timeout.as_millis() as u64 * 45 / 100,
        election_timeout_max: settings.election_timeout.as_millis() as u64 * 55 / 100,
        install_snapshot_timeout: settings.lease.as_millis() as u64,
        snapshot_policy: SnapshotPolicy::LogsSinceLast(500),
        max_in_snapshot_log_to_keep: 100,
        // JSON carries bytes as numbers: keep chunks far below MAX_MESSAGE.
        snapshot_max_chunk_size: 256 * 1024,
        ..Default::default()
    }
    .validate()
    .map_err(|error| ClusterError::Internal(format!("Raft settings: {error}")))?;
    let client = Client {
        node: node.name.clone(),
        key: key.clone(),
    };
    let raft = Raft::new(
        node_id(&node.name),
        Arc::new(raft_config),
        Network {
            client: client.clone(),
        },
        log,
        machine.clone(),
    )
    .await
    .map_err(|error| ClusterError::Internal(format!("cannot start Raft: {error}")))?;
    let members = Membership {
        voters: settings.voters.clone(),
        learners: config
            .nodes
            .iter()
            .map(|n| n.name.clone())
            .filter(|n| !settings.is_voter(n))
            .collect(),
        reachable: vec![node.name.clone()],
        has_quorum: false,
        raft_leader: None,
        raft_term: 0,
    };
    let core = Arc::new(Core {
        name: node.name.clone(),
        settings: settings.clone(),
        raft: raft.clone(),
        machine,
        client,
        addresses,
        names,
        primary: primary_rx,
        lease: Mutex::new(lease::LeaseState::default()),
        promises: Mutex::new(promise::Promises::new(
            settings.lease + settings.lease_margin,
            Instant::now(),
            revoked_through,
        )),
        holds_lease: watch::channel(false).0,
        members: watch::channel(members).0,
        rejections: Arc::new(Rejections::default()),
        heard: Mutex::new(BTreeMap::new()),
        counters: Counters::default(),
        handoff: std::sync::OnceLock::new(),
        notices: std::sync::OnceLock::new(),
    });
    let router = transport::routes(
        node.name.clone(),
        key,
        config.nodes.iter().map(|n| n.name.clone()).collect(),
        core.rejections.clone(),
        core.clone(),
        &[
            APPEND_PATH,
            VOTE_PATH,
            SNAPSHOT_PATH,
            WRITE_PATH,
            PING_PATH,
            HANDOFF_PATH,
            NOTICE_PATH,
            PROMISE_PATH,
            REVOKE_PATH,
        ],
    );
    {
        let mut shutdown = shutdown.clone();
        tokio::spawn(async move {
            let stop = async move {
                let _ = shutdown.wait_for(|stop| *stop).await;
            };
            if let Err(error) = axum::serve(listener, router)
                .with_graceful_shutdown(stop)
                .await
            {
                warn!(%error, "the cluster port stopped serving");
            }
        });
    }
    if settings.is_voter(&node.name) {
        let initialized = raft
            .is_initialized()
            .await
            .map_err(|error| ClusterError::Internal(error.to_string()))?;
        if !initialized {
            let voters: BTreeMap<u64, BasicNode> = settings
                .voters
                .iter()
                .map(|name| {
                    (
                        node_id(name),
                        BasicNode {
                            addr: core.addresses[name].clone(),
                        },
                    )
                })
                .collect();
            // Every voter initialises with the same voters, which openraft
            // allows; the first election decides.
            if let Err(error) = raft.initialize(voters).await {
                warn!(%error, "cluster state: initialising the Raft membership failed");
            } else {
                info!(voters = ?settings.voters, "cluster state: new Raft cluster initialised");
            }
        }
    }
    let handle = ClusterHandle { core };
    tokio::spawn(lease::run(handle.clone(), shutdown.clone()));
    tokio::spawn(members::run(handle.clone(), shutdown.clone()));
    {
        let raft = raft.clone();
        let mut shutdown = shutdown;
        tokio::spawn(async move {
            let _ = shutdown.wait_for(|stop| *stop).await;
            let _ = raft.shutdown().await;
        });
    }
    info!(node = %node.name, %listen, dir = %dir.display(), voter = settings.is_voter(&node.name), "cluster state running");
    Ok(Some(handle))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_ids_are_stable_and_distinct() {
        assert_eq!(node_id("nuster1"), node_id("nuster1"));
        assert_ne!(node_id("nuster1"), node_id("nuster2"));
    }
}
