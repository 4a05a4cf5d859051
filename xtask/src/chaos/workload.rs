//! The chaos suite's workload: three loops that run from before a fault
//! until after the cluster has healed and record every operation with its
//! outcome. An operation counts as acknowledged only when the cluster said
//! it was done: an HTTP 2xx through the VIP, a psql INSERT through the
//! pooler on the VIP that exited 0 (autocommit: COMMIT returned OK), a file
//! written and fsynced through a node's mount of the volume. Every loop is
//! bounded in count and time, and every operation in time (a write that
//! hangs in the FUSE mount is reported as stuck, not waited on forever).

use std::{
    io::Write,
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc, Arc, Mutex, MutexGuard,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Result};
use xtask::lab::{Lab, CLIENT};

use crate::{cluster::VIP, demo_postgres};

/// The SQL table the workload writes to (no unique key: a duplicate would
/// show).
pub(crate) const TABLE: &str = "chaos_writes";
/// The directory of the volume the workload writes its files into.
pub(crate) const FILES_DIR: &str = "chaos";
/// Upper bound of operations per loop and scenario.
const MAX_OPS: usize = 5_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Service {
    Web,
    Sql,
    Files,
}

impl Service {
    pub(crate) const ALL: [Service; 3] = [Service::Web, Service::Sql, Service::Files];

    pub(crate) fn name(self) -> &'static str {
        match self {
            Service::Web => "web",
            Service::Sql => "sql",
            Service::Files => "files",
        }
    }

    fn pause(self) -> Duration {
        match self {
            Service::Web => Duration::from_millis(150),
            Service::Sql => Duration::from_millis(150),
            Service::Files => Duration::from_millis(200),
        }
    }
}

/// One operation: its id (unique in the run), when it was sent and
/// answered (seconds since the workload started) and whether it was
/// acknowledged.
#[derive(Debug, Clone)]
pub(crate) struct Op {
    pub service: Service,
    pub id: u64,
    pub sent: f64,
    pub done: f64,
    pub acked: bool,
    /// Why an operation was not acknowledged (first line of the error).
    pub error: Option<String>,
}

/// The contents of the file with `id` (a few KiB, so a write spans more
/// than one FUSE request's worth of nothing).
pub(crate) fn file_contents(scenario: &str, id: u64) -> Vec<u8> {
    format!("farol chaos {scenario} file {id}\n")
        .repeat(96)
        .into_bytes()
}

pub(crate) fn file_name(scenario: &str, id: u64) -> String {
    format!("{scenario}-{id}")
}

/// The running loops.
pub(crate) struct Workload {
    stop: Arc<AtomicBool>,
    epoch: Instant,
    /// Every operation so far, as the loops finish them.
    ops: Arc<Mutex<Vec<Op>>>,
    loops: Vec<(Service, mpsc::Receiver<()>)>,
}

impl Workload {
    /// Starts the three loops for `scenario`; ids start at `first_id`; the
    /// files go through `mount` (a surviving node's mount of the volume).
    /// Each loop ends by itself after `limit`.
    pub(crate) fn start(
        lab: &Lab,
        mount: PathBuf,
        scenario: &str,
        first_id: u64,
        limit: Duration,
    ) -> Workload {
        let stop = Arc::new(AtomicBool::new(false));
        let epoch = Instant::now();
        let ops = Arc::new(Mutex::new(Vec::new()));
        let mut loops = Vec::new();
        for service in Service::ALL {
            let (send, receive) = mpsc::channel();
            let (stop, ops, lab, mount, scenario) = (
                stop.clone(),
                ops.clone(),
                lab.clone(),
                mount.clone(),
                scenario.to_owned(),
            );
            std::thread::spawn(move || {
                let mut id = first_id;
                while !stop.load(Ordering::SeqCst)
                    && epoch.elapsed() < limit
                    && id - first_id < MAX_OPS as u64
                {
                    let sent = epoch.elapsed().as_secs_f64();
                    let outcome = match service {
                        Service::Web => get(&lab),
                        Service::Sql => insert(&lab, &scenario, id),
                        Service::Files => write_file(&mount, &scenario, id),
                    };
                    lock(&ops).push(Op {
                        service,
                        id,
                        sent,
                        done: epoch.elapsed().as_secs_f64(),
                        acked: outcome.is_ok(),
                        error: outcome.err(),
                    });
                    id += 1;
                    std::thread::sleep(service.pause());
                }
                let _ = send.send(());
            });
            loops.push((service, receive));
        }
        Workload {
            stop,
            epoch,
            ops,
            loops,
        }
    }

    /// True when `service` has had an operation sent at or after `since`
    /// acknowledged.
    pub(crate) fn acked_since(&self, service: Service, since: f64) -> bool {
        lock(&self.ops)
            .iter()
            .any(|op| op.service == service && op.acked && op.sent >= since)
    }

    /// Seconds since the workload started (the time base of [`Op`]).
    pub(crate) fn now(&self) -> f64 {
        self.epoch.elapsed().as_secs_f64()
    }

    /// Stops the loops and returns every operation; a loop that does not
    /// finish its current operation within `grace` is an error (a hung
    /// write).
    pub(crate) fn finish(self, grace: Duration) -> Result<Vec<Op>> {
        self.stop.store(true, Ordering::SeqCst);
        let deadline = Instant::now() + grace;
        let mut all = Vec::new();
        let mut stuck = Vec::new();
        for (service, receive) in self.loops {
            let left = deadline.saturating_duration_since(Instant::now());
            if receive.recv_timeout(left).is_err() {
                stuck.push(service.name());
            }
        }
        all.extend(lock(&self.ops).iter().cloned());
        if !stuck.is_empty() {
            bail!(
                "the {} loop(s) hung in an operation for more than {grace:?}",
                stuck.join(", ")
            );
        }
        Ok(all)
    }
}

fn lock(ops: &Mutex<Vec<Op>>) -> MutexGuard<'_, Vec<Op>> {
    // A loop that panicked leaves its operations as they were.
    ops.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The outcome of a command: Ok when it exited 0, else the first line of
/// its stderr (or its status).
fn outcome(out: std::io::Result<std::process::Output>) -> Result<(), String> {
    match out {
        Ok(out) if out.status.success() => Ok(()),
        Ok(out) => Err(String::from_utf8_lossy(&out.stderr)
            .lines()
            .find(|l| !l.trim().is_empty())
            .map_or_else(|| out.status.to_string(), |l| l.trim().to_owned())),
        Err(error) => Err(error.to_string()),
    }
}

/// GET / through the VIP from the client.
fn get(lab: &Lab) -> Result<(), String> {
    outcome(
        lab.command(CLIENT, "curl")
            .args([
                "-sSf",
                "--max-time",
                "2",
                "-o",
                "/dev/null",
                &format!("http://{VIP}/"),
            ])
            .output(),
    )
}

/// One INSERT through the pooler on the VIP. psql exits 0 only when the
/// statement (and so its autocommit COMMIT) succeeded; a psql killed by
/// the timeout (a commit waiting for a synchronous standby that is gone)
/// is not acknowledged.
fn insert(lab: &Lab, scenario: &str, id: u64) -> Result<(), String> {
    outcome(
        lab.command(CLIENT, "timeout")
            .env("PGPASSWORD", demo_postgres::PASSWORD)
            .env("PGCONNECT_TIMEOUT", "2")
            .args([
                "-s",
                "KILL",
                "15",
                "psql",
                "-X",
                "-q",
                "-v",
                "ON_ERROR_STOP=1",
            ])
            .args(["-h", VIP, "-p", &demo_postgres::POOLER_PORT.to_string()])
            .args(["-U", demo_postgres::USER, "-d", demo_postgres::USER, "-c"])
            .arg(format!(
                "INSERT INTO {TABLE} (id, scenario) VALUES ({id}, '{scenario}')"
            ))
            .output(),
    )
}

/// A new file, written and fsynced through the mount.
fn write_file(mount: &std::path::Path, scenario: &str, id: u64) -> Result<(), String> {
    let path = mount.join(FILES_DIR).join(file_name(scenario, id));
    let write = || -> std::io::Result<()> {
        let mut file = std::fs::File::create(&path)?;
        file.write_all(&file_contents(scenario, id))?;
        file.sync_all()
    };
    write().map_err(|e| e.to_string())
}

/// The longest time a service gave no acknowledged answer, between
/// `from` and `to` (seconds on the workload's clock): the gaps between
/// consecutive acknowledged operations, and from `from` to the first and
/// from the last to `to`.
pub(crate) fn longest_gap(ops: &[Op], service: Service, from: f64, to: f64) -> f64 {
    let mut times: Vec<f64> = ops
        .iter()
        .filter(|op| op.service == service && op.acked)
        .map(|op| op.done)
        .collect();
    times.sort_by(f64::total_cmp);
    let last_before = times.iter().copied().rfind(|t| *t <= from);
    let mut previous = last_before.unwrap_or(from);
    let mut longest: f64 = 0.0;
    for t in times.into_iter().filter(|t| *t > from && *t <= to) {
        longest = longest.max(t - previous);
        previous = t;
    }
    longest.max(to - previous)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(service: Service, done: f64, acked: bool) -> Op {
        Op {
            service,
            id: 0,
            sent: done,
            done,
            acked,
            error: None,
        }
    }

    #[test]
    fn the_longest_gap_spans_failures_and_counts_from_the_last_success_before_the_fault() {
        let ops = vec![
            op(Service::Sql, 1.0, true),
            op(Service::Sql, 2.0, true),
            op(Service::Sql, 3.0, false),
            op(Service::Sql, 6.5, true),
            op(Service::Web, 4.0, true),
            op(Service::Sql, 7.0, true),
        ];
        // Fault at 2.5: the last success before it is at 2.0.
        assert_eq!(longest_gap(&ops, Service::Sql, 2.5, 7.5), 4.5);
        // Nothing acknowledged after the fault: the whole window.
        assert_eq!(longest_gap(&ops, Service::Files, 2.0, 9.0), 7.0);
    }
}
