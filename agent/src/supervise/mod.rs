//! Child processes the agent runs on its node (Apache in the seed): start,
//! wait until ready, restart with exponential backoff after a crash (and
//! give up after a limit), reload with a config test first, and stop after
//! draining this node from the service the child backs.
//!
//! Owns: the children's processes and their state. Does not own: the load
//! balancer (a [`Drainer`] takes the node out of a service) or health
//! checks of running backends (`health`).
//!
//! On the agent's shutdown, [`Supervision::chain`] holds the other
//! subsystems back until every child is drained and stopped, so the
//! balancer still runs while flows finish.

mod child;
mod drain;
mod metrics;
mod process;
mod ready;

use std::{path::PathBuf, sync::Arc, time::Duration};

use tokio::{
    sync::{mpsc, oneshot, watch},
    task::JoinHandle,
};
use tracing::{info, warn};

pub use child::{ChildSnapshot, ChildState};
pub use drain::{ClusterDrainer, DrainError, Drainer, LocalDrainer};
pub use metrics::SuperviseCollector;
pub use process::Program;
pub use ready::ReadyCheck;

use crate::config::{
    supervise::{expand, RestartConfig, SignalName},
    Config, NodeConfig,
};

#[derive(Debug, thiserror::Error)]
pub enum SuperviseError {
    #[error("cannot start child {child} ({command})")]
    Spawn {
        child: String,
        command: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Why a reload did not happen.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReloadError {
    #[error("no child named {0:?} runs on this node")]
    UnknownChild(String),
    #[error("{0} has no reload_signal")]
    NoReloadSignal(String),
    #[error("{0} is not running")]
    NotRunning(String),
    #[error("{child}: the config test failed, reload refused; the running child keeps its config:\n{output}")]
    Refused { child: String, output: String },
    #[error("{child}: the config test could not run, reload refused: {why}")]
    TestFailed { child: String, why: String },
    #[error("{child}: cannot send the reload signal: {why}")]
    Signal { child: String, why: String },
}

/// One `[[supervise]]` entry, expanded for this node.
#[derive(Debug, Clone, PartialEq)]
pub struct ChildSpec {
    pub name: String,
    /// Created before every start.
    pub runtime_dir: Option<PathBuf>,
    pub program: Program,
    pub service: Option<String>,
    pub ready: Option<ReadyCheck>,
    pub restart: RestartConfig,
    pub stop_signal: SignalName,
    pub stop_grace: Duration,
    pub drain_timeout: Duration,
    pub reload_signal: Option<SignalName>,
    /// Run before a reload; None: reload without a test.
    pub config_test: Option<Program>,
    pub config_test_timeout: Duration,
}

/// The children `node` runs, in file order.
pub fn specs(config: &Config, node: &NodeConfig) -> Vec<ChildSpec> {
    let cluster = config.cluster.name.as_str();
    let x = |text: &str| expand(text, cluster, node);
    config
        .supervise
        .iter()
        .filter(|entry| entry.runs_on(node))
        .map(|entry| {
            let mut env = vec![
                ("FAROL_NODE".to_owned(), node.name.clone()),
                (
                    "FAROL_NODE_ADDRESS".to_owned(),
                    node.address.addr().to_string(),
                ),
                ("FAROL_CLUSTER".to_owned(), cluster.to_owned()),
            ];
            let mut volume_mount = None;
            if let Some(name) = &entry.volume {
                let volume = config.volumes.iter().find(|v| v.name == *name);
                let mount = volume
                    .and_then(|v| v.replica(&node.name).and_then(|r| v.mount_point(r)))
                    .or_else(|| entry.volume_fallback.clone());
                if let Some(mount) = mount {
                    let mount = x(&mount.to_string_lossy());
                    env.push(("FAROL_VOLUME_MOUNT".to_owned(), mount.clone()));
                    volume_mount = Some(mount);
                }
            }
            let runtime_dir = entry
                .runtime_dir
                .as_ref()
                .map(|dir| PathBuf::from(x(&dir.to_string_lossy())));
            if let Some(dir) = &runtime_dir {
                env.push((
                    "FAROL_RUNTIME_DIR".to_owned(),
                    dir.to_string_lossy().into_owned(),
                ));
            }
            env.extend(entry.env.iter().map(|(k, v)| {
                let v = match &volume_mount {
                    Some(mount) => v.replace("{volume}", mount),
                    None => v.clone(),
                };
                (k.clone(), x(&v))
            }));
            let working_dir = entry.working_dir.as_ref().map_or_else(
                || PathBuf::from("/"),
                |dir| PathBuf::from(x(&dir.to_string_lossy())),
            );
            let config_test = entry
                .config_test
                .split_first()
                .map(|(program, args)| Program {
                    command: PathBuf::from(x(program)),
                    args: args.iter().map(|a| x(a)).collect(),
                    env: env.clone(),
                    working_dir: working_dir.clone(),
                });
            ChildSpec {
                name: entry.name.clone(),
                runtime_dir,
                program: Program {
                    command: entry.command.clone(),
                    args: entry.args.iter().map(|a| x(a)).collect(),
                    env,
                    working_dir,
                },
                service: entry.service.clone(),
                ready: entry.ready.as_ref().map(|ready| ReadyCheck {
                    host: x(&ready.host),
                    port: ready.port,
                    http_path: ready.http.clone(),
                    timeout: ready.timeout,
                    interval: ready.interval,
                }),
                restart: entry.restart.clone(),
                stop_signal: entry.stop_signal,
                stop_grace: entry.stop_grace,
                drain_timeout: entry.drain_timeout,
                reload_signal: entry.reload_signal,
                config_test,
                config_test_timeout: entry.config_test_timeout,
            }
        })
        .collect()
}

#[derive(Clone)]
struct ChildHandle {
    name: String,
    status: Arc<child::ChildStatus>,
    control: mpsc::Sender<child::Control>,
}

/// A cheap, clonable handle on the running children, for whatever asks for
/// a reload or reads their state (SIGHUP today; the runtime API later).
#[derive(Clone)]
pub struct SupervisorHandle {
    children: Arc<Vec<ChildHandle>>,
}

/// The running children of this node.
pub struct Supervisor {
    handle: SupervisorHandle,
    tasks: Vec<JoinHandle<()>>,
}

impl Supervisor {
    /// Starts every child (each in its own task).
    pub fn start(specs: Vec<ChildSpec>, drainer: Arc<dyn Drainer>) -> Supervisor {
        let mut children = Vec::new();
        let mut tasks = Vec::new();
        for spec in specs {
            let (control, receiver) = mpsc::channel(4);
            let status = Arc::new(child::ChildStatus::new(&spec.name));
            tasks.push(tokio::spawn(child::supervise(
                spec.clone(),
                status.clone(),
                drainer.clone(),
                receiver,
            )));
            children.push(ChildHandle {
                name: spec.name,
                status,
                control,
            });
        }
        Supervisor {
            handle: SupervisorHandle {
                children: Arc::new(children),
            },
            tasks,
        }
    }

    pub fn handle(&self) -> SupervisorHandle {
        self.handle.clone()
    }

    pub fn is_empty(&self) -> bool {
        self.handle.children.is_empty()
    }

    /// See [`SupervisorHandle::snapshot`].
    pub fn snapshot(&self, name: &str) -> Option<ChildSnapshot> {
        self.handle.snapshot(name)
    }

    /// See [`SupervisorHandle::reload`].
    pub async fn reload(&self, name: &str) -> Result<(), ReloadError> {
        self.handle.reload(name).await
    }

    /// See [`SupervisorHandle::reload_all`].
    pub async fn reload_all(&self) {
        self.handle.reload_all().await
    }

    /// Drains and stops every child at once; returns when all are stopped.
    pub async fn stop(self) {
        let mut waits = Vec::new();
        for child in self.handle.children.iter() {
            let (reply, done) = oneshot::channel();
            if child
                .control
                .send(child::Control::Stop(reply))
                .await
                .is_ok()
            {
                waits.push(done);
            }
        }
        for done in waits {
            let _ = done.await;
        }
        for task in self.tasks {
            let _ = task.await;
        }
    }

    /// The children's part of `/metrics`.
    pub fn collector(&self) -> SuperviseCollector {
        SuperviseCollector::new(
            self.handle
                .children
                .iter()
                .map(|c| c.status.clone())
                .collect(),
        )
    }
}

impl SupervisorHandle {
    /// The state and counters of child `name`.
    pub fn snapshot(&self, name: &str) -> Option<ChildSnapshot> {
        self.children
            .iter()
            .find(|c| c.name == name)
            .map(|c| c.status.snapshot())
    }

    /// Every child's state and counters, in config order.
    pub fn snapshots(&self) -> Vec<ChildSnapshot> {
        self.children.iter().map(|c| c.status.snapshot()).collect()
    }

    /// Tests the child's config (if it has a test) and sends its reload
    /// signal; a failed test refuses the reload and leaves the child be.
    pub async fn reload(&self, name: &str) -> Result<(), ReloadError> {
        let child = self
            .children
            .iter()
            .find(|c| c.name == name)
            .ok_or_else(|| ReloadError::UnknownChild(name.to_owned()))?;
        let (reply, answer) = oneshot::channel();
        if child
            .control
            .send(child::Control::Reload(reply))
            .await
            .is_err()
        {
            return Err(ReloadError::NotRunning(name.to_owned()));
        }
        answer
            .await
            .unwrap_or_else(|_| Err(ReloadError::NotRunning(name.to_owned())))
    }

    /// Reloads every child that has a reload signal (each outcome is
    /// logged by the child's task).
    pub async fn reload_all(&self) {
        for child in self.children.iter() {
            match self.reload(&child.name).await {
                Ok(()) | Err(ReloadError::NoReloadSignal(_)) => {}
                Err(ReloadError::NotRunning(_)) => {
                    info!(child = %child.name, "not running: nothing to reload")
                }
                Err(_) => {}
            }
        }
    }
}

/// Ties the agent's shutdown to the children: the receiver [`chain`]
/// returns turns true only after the supervisor drained and stopped them.
///
/// [`chain`]: Supervision::chain
pub struct Supervision {
    outer: watch::Receiver<bool>,
    release: oneshot::Sender<()>,
}

impl Supervision {
    /// Returns the shutdown signal for every other subsystem.
    pub fn chain(outer: watch::Receiver<bool>) -> (Supervision, watch::Receiver<bool>) {
        let (inner_tx, inner_rx) = watch::channel(false);
        let (release, released) = oneshot::channel::<()>();
        let mut watched = outer.clone();
        tokio::spawn(async move {
            // A closed channel means the sender is gone: stop as well.
            let _ = watched.wait_for(|stop| *stop).await;
            // Ok once the children are stopped; Err when the supervisor
            // never started (nothing to wait for).
            let _ = released.await;
            let _ = inner_tx.send(true);
        });
        (Supervision { outer, release }, inner_rx)
    }

    /// Runs `supervisor` until shutdown: SIGHUP reloads the children, the
    /// shutdown drains and stops them, then releases the other subsystems.
    pub fn run(self, supervisor: Supervisor) -> JoinHandle<()> {
        let Supervision { mut outer, release } = self;
        tokio::spawn(async move {
            let mut hangup = if supervisor.is_empty() {
                None
            } else {
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
                    Ok(hangup) => Some(hangup),
                    Err(error) => {
                        warn!(%error, "cannot listen for SIGHUP: children reload only through the API");
                        None
                    }
                }
            };
            loop {
                tokio::select! {
                    () = async {
                        // (The guard it returns is not Send: drop it here.)
                        let _ = outer.wait_for(|stop| *stop).await;
                    } => break,
                    Some(()) = async {
                        match hangup.as_mut() {
                            Some(signal) => signal.recv().await,
                            None => std::future::pending().await,
                        }
                    } => {
                        info!("SIGHUP: reloading supervised children");
                        supervisor.reload_all().await;
                    }
                }
            }
            if !supervisor.is_empty() {
                info!("draining and stopping supervised children");
            }
            supervisor.stop().await;
            let _ = release.send(());
        })
    }
}

#[cfg(test)]
mod tests;
