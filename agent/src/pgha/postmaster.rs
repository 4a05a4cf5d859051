//! The postmaster as the agent's child: started as the OS user (PostgreSQL
//! refuses root), in its own process group, stopped in one of PostgreSQL's
//! three shutdown modes and signalled by PID only.
//!
//! `supervise` runs Apache but does not fit here: its children run as the
//! agent's user, restart on their own with backoff, and stop only one way.
//! The postmaster needs the uid/gid switch, a stop mode per situation (fast
//! for a fence, immediate as the last resort) and no restart behind the
//! reconciler's back (a fenced primary must stay down). What it shares with
//! `supervise` (a process group, kill by PID) is a few lines.

use std::{
    path::{Path, PathBuf},
    process::{ExitStatus, Stdio},
    time::Duration,
};

use tokio::process::{Child, Command};
use tracing::{info, warn};

use super::{OsUser, PghaError};

/// PostgreSQL's shutdown modes (`pg_ctl stop -m`), by signal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopMode {
    /// SIGINT: roll back open transactions, disconnect, checkpoint, exit;
    /// walsenders first send every WAL record to connected standbys.
    Fast,
    /// SIGQUIT: exit at once; crash recovery at the next start.
    Immediate,
}

impl StopMode {
    fn signal(self) -> i32 {
        match self {
            StopMode::Fast => libc::SIGINT,
            StopMode::Immediate => libc::SIGQUIT,
        }
    }
}

/// A running postmaster.
#[derive(Debug)]
pub struct Postmaster {
    child: Child,
    pid: u32,
    exited: bool,
}

impl Postmaster {
    /// Starts `bin_dir/postgres -D data_dir` as `user`, its output appended
    /// to `log`.
    pub fn spawn(
        bin_dir: &Path,
        data_dir: &Path,
        user: &OsUser,
        log: &Path,
    ) -> Result<Postmaster, PghaError> {
        let output = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(|source| PghaError::Io {
                what: format!("opening the server log {}", log.display()),
                source,
            })?;
        let _ = std::os::unix::fs::chown(log, Some(user.uid), Some(user.gid));
        let errors = output.try_clone().map_err(|source| PghaError::Io {
            what: "duplicating the log file".into(),
            source,
        })?;
        let program = bin_dir.join("postgres");
        let mut command = Command::new(&program);
        command
            .arg("-D")
            .arg(data_dir)
            .uid(user.uid)
            .gid(user.gid)
            .env_remove("PGPASSWORD")
            .current_dir(data_dir)
            .stdin(Stdio::null())
            .stdout(output)
            .stderr(errors)
            // Its own group: a Ctrl-C to the agent's group does not reach it.
            .process_group(0)
            .kill_on_drop(false);
        let child = command.spawn().map_err(|source| PghaError::Io {
            what: format!("starting {}", program.display()),
            source,
        })?;
        let pid = child
            .id()
            .expect("a child that was just spawned and not awaited has a pid");
        info!(pid, data = %data_dir.display(), "postmaster started");
        Ok(Postmaster {
            child,
            pid,
            exited: false,
        })
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The exit status if the postmaster has exited (crash, kill, stop).
    pub fn try_exited(&mut self) -> Option<ExitStatus> {
        match self.child.try_wait() {
            Ok(Some(status)) => {
                self.exited = true;
                Some(status)
            }
            _ => None,
        }
    }

    /// Returns once the postmaster exited (cancel-safe: for a select).
    pub async fn wait(&mut self) {
        let _ = self.child.wait().await;
    }

    /// SIGKILL to the postmaster's process group: after an unexpected exit
    /// of the postmaster its backends live on until they notice, and one
    /// of them could still acknowledge a commit; none may once the node
    /// hands the primary over.
    pub fn kill_orphans(&self) {
        signal(-(self.pid as i32), libc::SIGKILL);
    }

    /// Stops the server in `mode`; after `grace`, SIGQUIT, then SIGKILL of
    /// the process group. Returns once the postmaster exited.
    pub async fn stop(&mut self, mode: StopMode, grace: Duration) -> ExitStatus {
        if let Some(status) = self.try_exited() {
            return status;
        }
        signal(self.pid as i32, mode.signal());
        if let Ok(Ok(status)) = tokio::time::timeout(grace, self.child.wait()).await {
            self.exited = true;
            return status;
        }
        warn!(
            pid = self.pid,
            ?mode,
            ?grace,
            "the postmaster did not stop in time: immediate shutdown"
        );
        signal(self.pid as i32, libc::SIGQUIT);
        if let Ok(Ok(status)) = tokio::time::timeout(grace, self.child.wait()).await {
            self.exited = true;
            return status;
        }
        warn!(
            pid = self.pid,
            "the postmaster ignored SIGQUIT: SIGKILL to its process group"
        );
        signal(-(self.pid as i32), libc::SIGKILL);
        let status = loop {
            if let Ok(status) = self.child.wait().await {
                break status;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        self.exited = true;
        status
    }
}

impl Drop for Postmaster {
    /// An agent that ends without stopping its server leaves no primary
    /// running unsupervised: fast shutdown (the server finishes on its own).
    fn drop(&mut self) {
        if !self.exited && self.try_exited().is_none() {
            signal(self.pid as i32, libc::SIGINT);
        }
    }
}

fn signal(pid: i32, signal: i32) {
    // SAFETY: kill(2) on our own child's PID (or its group) has no memory
    // effects.
    let result = unsafe { libc::kill(pid, signal) };
    if result != 0 {
        let error = std::io::Error::last_os_error();
        if error.raw_os_error() != Some(libc::ESRCH) {
            warn!(pid, signal, %error, "cannot signal the postmaster");
        }
    }
}

/// Ends a postmaster that a previous agent left running on `data_dir`
/// (its PID is the first line of `postmaster.pid`), fast, up to 30 s;
/// a reused PID that runs something else is left alone.
pub async fn end_leftover(data_dir: &Path, bin_dir: &Path) -> Option<u32> {
    let text = std::fs::read_to_string(data_dir.join("postmaster.pid")).ok()?;
    let pid: i32 = text.lines().next()?.trim().parse().ok()?;
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok()?;
    let expected: PathBuf = bin_dir.join("postgres");
    let same = exe == expected || std::fs::canonicalize(&expected).is_ok_and(|real| real == exe);
    if !same {
        return None;
    }
    warn!(pid, data = %data_dir.display(), "a postmaster from a previous agent still runs: fast shutdown");
    signal(pid, libc::SIGINT);
    let proc_entry = PathBuf::from(format!("/proc/{pid}"));
    for _ in 0..1500 {
        let zombie = std::fs::read_to_string(proc_entry.join("stat"))
            .map(|stat| {
                stat.rsplit_once(") ")
                    .is_some_and(|(_, rest)| rest.starts_with('Z'))
            })
            .unwrap_or(true);
        if zombie {
            return Some(pid as u32);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    signal(pid, libc::SIGKILL);
    Some(pid as u32)
}
