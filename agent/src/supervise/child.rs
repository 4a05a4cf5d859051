//! One child's life: start, ready, crash, backoff, give up, reload, stop.
//! Every state change is logged once with its reason and shows in
//! [`ChildStatus`] (read by `/metrics`).

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tokio::sync::{mpsc, oneshot};
use tracing::{error, info, warn};

use super::{
    drain::Drainer,
    process::{describe_exit, end_leftover, forget_child, record_child, run_check, Running},
    ChildSpec, ReloadError,
};

/// How often the flows of a draining node are counted.
const DRAIN_POLL: Duration = Duration::from_millis(100);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChildState {
    /// Started, not yet ready.
    Starting,
    /// Ready (or running, for children without a readiness check).
    Running,
    /// Exited; waiting before the next start.
    Backoff,
    /// Too many failures in a row; not restarted until the agent restarts.
    GaveUp,
    /// Draining and stopping on request.
    Stopping,
    Stopped,
}

impl ChildState {
    pub const ALL: [ChildState; 6] = [
        ChildState::Starting,
        ChildState::Running,
        ChildState::Backoff,
        ChildState::GaveUp,
        ChildState::Stopping,
        ChildState::Stopped,
    ];

    pub fn label(self) -> &'static str {
        match self {
            ChildState::Starting => "starting",
            ChildState::Running => "running",
            ChildState::Backoff => "backoff",
            ChildState::GaveUp => "gave_up",
            ChildState::Stopping => "stopping",
            ChildState::Stopped => "stopped",
        }
    }
}

/// What `/metrics` and tests read about a child.
#[derive(Debug, Clone, PartialEq)]
pub struct ChildSnapshot {
    pub name: String,
    pub state: ChildState,
    pub pid: Option<u32>,
    /// Starts after the first.
    pub restarts: u64,
    /// Exits the supervisor did not ask for (including failed starts).
    pub crashes: u64,
    /// Exits by how they ended ("exit 1", "SIGKILL").
    pub exits: BTreeMap<String, u64>,
    /// Reloads by result ("ok", "refused", "failed").
    pub reloads: BTreeMap<&'static str, u64>,
    /// From the last crash to ready again.
    pub last_recovery: Option<Duration>,
}

#[derive(Debug)]
pub(super) struct ChildStatus {
    inner: Mutex<ChildSnapshot>,
}

impl ChildStatus {
    pub(super) fn new(name: &str) -> ChildStatus {
        ChildStatus {
            inner: Mutex::new(ChildSnapshot {
                name: name.to_owned(),
                state: ChildState::Starting,
                pid: None,
                restarts: 0,
                crashes: 0,
                exits: BTreeMap::new(),
                reloads: BTreeMap::new(),
                last_recovery: None,
            }),
        }
    }

    pub(super) fn snapshot(&self) -> ChildSnapshot {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ChildSnapshot> {
        // A panic while holding it leaves plain counters: still usable.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn update(&self, change: impl FnOnce(&mut ChildSnapshot)) {
        change(&mut self.lock());
    }
}

pub(super) enum Control {
    Reload(oneshot::Sender<Result<(), ReloadError>>),
    Stop(oneshot::Sender<()>),
}

enum Event {
    Ready(Result<(), String>),
    Exited(std::process::ExitStatus),
    Control(Option<Control>),
}

/// Runs the child until told to stop (or until the control channel closes).
pub(super) async fn supervise(
    spec: ChildSpec,
    status: Arc<ChildStatus>,
    drainer: Arc<dyn Drainer>,
    mut control: mpsc::Receiver<Control>,
) {
    let name = spec.name.clone();
    // Consecutive failed runs; a run up for `stable_after` resets it.
    let mut failures = 0u32;
    // Since when the child has been down after a crash.
    let mut down_since: Option<Instant> = None;
    // Until ready, the balancer here sends this node no new flows.
    drain(&spec, &*drainer).await;
    loop {
        status.update(|s| s.state = ChildState::Starting);
        let started = Instant::now();
        if let Some(dir) = &spec.runtime_dir {
            if let Err(error) = std::fs::create_dir_all(dir) {
                warn!(child = %name, dir = %dir.display(), %error, "cannot create the runtime directory");
            }
            if let Some(pid) = end_leftover(dir, &spec.program).await {
                warn!(child = %name, pid, "ended a child a previous agent left running (its process group got SIGKILL)");
            }
        }
        let outcome = match Running::spawn(&name, &spec.program) {
            Err(error) => {
                error!(child = %name, error = %crate::error_chain(&error), "child failed to start");
                "spawn failed".to_owned()
            }
            Ok(mut running) => {
                let pid = running.pid();
                status.update(|s| s.pid = Some(pid));
                if let Some(dir) = &spec.runtime_dir {
                    record_child(dir, pid);
                }
                info!(child = %name, pid, command = %spec.program.command.display(), "child started");
                let mut ready = false;
                let ready_check = async {
                    match &spec.ready {
                        Some(check) => check.wait().await,
                        None => Ok(()),
                    }
                };
                tokio::pin!(ready_check);
                let outcome = loop {
                    let event = tokio::select! {
                        result = &mut ready_check, if !ready => Event::Ready(result),
                        exit = running.wait() => Event::Exited(exit),
                        command = control.recv() => Event::Control(command),
                    };
                    match event {
                        Event::Ready(Ok(())) => {
                            ready = true;
                            status.update(|s| s.state = ChildState::Running);
                            match down_since.take() {
                                Some(since) => {
                                    let recovery = since.elapsed();
                                    status.update(|s| s.last_recovery = Some(recovery));
                                    info!(child = %name, pid, recovery = ?recovery, "child ready again");
                                }
                                None => info!(child = %name, pid, "child ready"),
                            }
                            if let Some(service) = &spec.service {
                                if let Err(error) = drainer.undrain(service).await {
                                    warn!(child = %name, service, error = %crate::error_chain(&error), "cannot put this node back into the service");
                                }
                            }
                        }
                        Event::Ready(Err(why)) => {
                            warn!(child = %name, pid, timeout = ?spec.ready.as_ref().map(|r| r.timeout), reason = %why, "child not ready in time; stopping it");
                            // Never undrained, so still out of the service.
                            let exit = running.stop(spec.stop_signal, spec.stop_grace).await;
                            record_exit(&status, exit);
                            break format!("not ready in time ({why})");
                        }
                        Event::Exited(exit) => {
                            // Out of the service before the leftover
                            // workers, which may still serve, are killed.
                            drain(&spec, &*drainer).await;
                            running.end_group();
                            record_exit(&status, exit);
                            break describe_exit(exit);
                        }
                        Event::Control(Some(Control::Reload(reply))) => {
                            let result = reload(&spec, &running, &status).await;
                            let _ = reply.send(result);
                        }
                        Event::Control(Some(Control::Stop(reply))) => {
                            stop(&spec, &mut running, &status, &*drainer).await;
                            let _ = reply.send(());
                            return;
                        }
                        Event::Control(None) => {
                            stop(&spec, &mut running, &status, &*drainer).await;
                            return;
                        }
                    }
                };
                outcome
            }
        };
        // The child ended without being asked to (and this node is out of
        // its service: drained at start and on every exit path above).
        down_since.get_or_insert_with(Instant::now);
        failures = if started.elapsed() >= spec.restart.stable_after {
            1
        } else {
            failures + 1
        };
        status.update(|s| {
            s.crashes += 1;
            s.pid = None;
        });
        if failures > spec.restart.attempts {
            status.update(|s| s.state = ChildState::GaveUp);
            error!(
                child = %name,
                failures,
                last = %outcome,
                "child failed {failures} times in a row; giving up (restart the agent to try again)"
            );
            idle_until_stopped(&name, &status, &mut control).await;
            return;
        }
        let backoff = spec.restart.backoff(failures);
        status.update(|s| s.state = ChildState::Backoff);
        warn!(child = %name, reason = %outcome, failures, backoff = ?backoff, "child exited; restarting after backoff");
        let deadline = tokio::time::Instant::now() + backoff;
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => break,
                command = control.recv() => match command {
                    Some(Control::Reload(reply)) => {
                        let _ = reply.send(Err(ReloadError::NotRunning(name.clone())));
                    }
                    Some(Control::Stop(reply)) => {
                        status.update(|s| s.state = ChildState::Stopped);
                        info!(child = %name, "child stopped (it was down)");
                        let _ = reply.send(());
                        return;
                    }
                    None => {
                        status.update(|s| s.state = ChildState::Stopped);
                        return;
                    }
                },
            }
        }
        status.update(|s| s.restarts += 1);
    }
}

/// After giving up: answer requests until stopped.
async fn idle_until_stopped(
    name: &str,
    status: &ChildStatus,
    control: &mut mpsc::Receiver<Control>,
) {
    while let Some(command) = control.recv().await {
        match command {
            Control::Reload(reply) => {
                let _ = reply.send(Err(ReloadError::NotRunning(name.to_owned())));
            }
            Control::Stop(reply) => {
                status.update(|s| s.state = ChildState::Stopped);
                let _ = reply.send(());
                return;
            }
        }
    }
}

fn record_exit(status: &ChildStatus, exit: std::process::ExitStatus) {
    let how = describe_exit(exit);
    status.update(|s| *s.exits.entry(how).or_insert(0) += 1);
}

async fn drain(spec: &ChildSpec, drainer: &dyn Drainer) {
    if let Some(service) = &spec.service {
        if let Err(error) = drainer.drain(service).await {
            warn!(child = %spec.name, service, error = %crate::error_chain(&error), "cannot drain this node from the service");
        }
    }
}

/// Drain, wait for flows (bounded), stop signal, grace, SIGKILL.
async fn stop(
    spec: &ChildSpec,
    running: &mut Running,
    status: &ChildStatus,
    drainer: &dyn Drainer,
) {
    status.update(|s| s.state = ChildState::Stopping);
    let name = &spec.name;
    if let Some(service) = &spec.service {
        drain(spec, drainer).await;
        let deadline = Instant::now() + spec.drain_timeout;
        let mut flows = u64::MAX;
        while Instant::now() < deadline {
            match drainer.active_flows(service).await {
                Ok(0) => {
                    flows = 0;
                    break;
                }
                Ok(n) => flows = n,
                Err(error) => {
                    warn!(child = %name, error = %crate::error_chain(&error), "cannot count this node's flows; stopping without waiting");
                    break;
                }
            }
            tokio::time::sleep(DRAIN_POLL).await;
        }
        match flows {
            0 => info!(child = %name, service, "drained: no flows left to this node"),
            u64::MAX => {}
            n => {
                warn!(child = %name, service, flows = n, timeout = ?spec.drain_timeout, "drain timed out; stopping with flows left")
            }
        }
    }
    info!(child = %name, pid = running.pid(), signal = spec.stop_signal.name(), grace = ?spec.stop_grace, "stopping child");
    let exit = running.stop(spec.stop_signal, spec.stop_grace).await;
    if let Some(dir) = &spec.runtime_dir {
        forget_child(dir);
    }
    record_exit(status, exit);
    status.update(|s| {
        s.state = ChildState::Stopped;
        s.pid = None;
    });
    info!(child = %name, exit = %describe_exit(exit), "child stopped");
}

async fn reload(
    spec: &ChildSpec,
    running: &Running,
    status: &ChildStatus,
) -> Result<(), ReloadError> {
    let name = &spec.name;
    let Some(signal) = spec.reload_signal else {
        return Err(ReloadError::NoReloadSignal(name.clone()));
    };
    let count =
        |result: &'static str| status.update(|s| *s.reloads.entry(result).or_insert(0) += 1);
    if let Some(test) = &spec.config_test {
        match run_check(test, spec.config_test_timeout).await {
            Ok((true, _)) => {}
            Ok((false, output)) => {
                count("refused");
                // One log line, whatever the tool printed.
                let flat = output.lines().collect::<Vec<_>>().join(" | ");
                warn!(child = %name, output = %flat, "config test failed: reload refused, the running child keeps its config");
                return Err(ReloadError::Refused {
                    child: name.clone(),
                    output,
                });
            }
            Err(why) => {
                count("refused");
                warn!(child = %name, reason = %why, "config test could not run: reload refused");
                return Err(ReloadError::TestFailed {
                    child: name.clone(),
                    why,
                });
            }
        }
    }
    if let Err(error) = running.signal(signal) {
        count("failed");
        warn!(child = %name, %error, "cannot send the reload signal");
        return Err(ReloadError::Signal {
            child: name.clone(),
            why: error.to_string(),
        });
    }
    count("ok");
    info!(child = %name, pid = running.pid(), signal = signal.name(), "child reloaded");
    Ok(())
}
