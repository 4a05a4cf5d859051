//! One run of a child: spawned in its own process group, its output sent
//! line by line to `tracing`, signalled and killed by PID (the group's id is
//! the child's PID), never by name.

use std::{
    path::{Path, PathBuf},
    process::{ExitStatus, Stdio},
    time::Duration,
};

use tokio::{
    io::{AsyncBufReadExt, AsyncRead, BufReader},
    process::{Child, Command},
};
use tracing::{info, warn};

use super::SuperviseError;
use crate::config::supervise::SignalName;

/// What a child runs, already expanded for this node.
#[derive(Debug, Clone, PartialEq)]
pub struct Program {
    pub command: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub working_dir: PathBuf,
}

impl Program {
    fn command(&self) -> Command {
        let mut command = Command::new(&self.command);
        command
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .current_dir(&self.working_dir)
            .stdin(Stdio::null());
        command
    }
}

/// A running child, leader of its own process group.
#[derive(Debug)]
pub(super) struct Running {
    child: Child,
    pid: u32,
    /// Set once the leader was reaped and its group killed.
    exited: bool,
}

impl Drop for Running {
    /// An agent that ends without stopping its children (a failed
    /// subsystem, a runtime shut down) must not leave them serving
    /// unsupervised, nor holding their ports for the next agent.
    fn drop(&mut self) {
        if !self.exited {
            kill_group(self.pid, libc::SIGKILL);
        }
    }
}

impl Running {
    /// Starts `program`; its stdout and stderr go to the log as `name`.
    pub(super) fn spawn(name: &str, program: &Program) -> Result<Running, SuperviseError> {
        let mut command = program.command();
        command
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own group, so a stop reaches the workers it forks (Apache's)
            // and a signal to the agent's group (Ctrl-C) does not reach it.
            .process_group(0)
            .kill_on_drop(false);
        let mut child = command.spawn().map_err(|source| SuperviseError::Spawn {
            child: name.to_owned(),
            command: program.command.clone(),
            source,
        })?;
        let pid = child
            .id()
            .expect("a child that was just spawned and not awaited has a pid");
        if let Some(stdout) = child.stdout.take() {
            tokio::spawn(forward_lines(name.to_owned(), pid, "stdout", stdout));
        }
        if let Some(stderr) = child.stderr.take() {
            tokio::spawn(forward_lines(name.to_owned(), pid, "stderr", stderr));
        }
        Ok(Running {
            child,
            pid,
            exited: false,
        })
    }

    pub(super) fn pid(&self) -> u32 {
        self.pid
    }

    /// Waits for the leader to exit. What is left of its group (workers of
    /// a leader killed with SIGKILL keep serving on the listening socket)
    /// stays until [`Running::end_group`].
    pub(super) async fn wait(&mut self) -> ExitStatus {
        let status = loop {
            match self.child.wait().await {
                Ok(status) => break status,
                Err(error) => {
                    // ECHILD cannot happen for our own child; retry rather
                    // than report a made-up status.
                    warn!(pid = self.pid, %error, "waiting for a child failed; retrying");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        };
        status
    }

    /// Kills what is left of the group after the leader exited: leftover
    /// workers would hold the port and make the next start fail.
    pub(super) fn end_group(&mut self) {
        kill_group(self.pid, libc::SIGKILL);
        self.exited = true;
    }

    /// Sends `signal` to the leader.
    pub(super) fn signal(&self, signal: SignalName) -> std::io::Result<()> {
        send(self.pid as i32, signal.number())
    }

    /// Sends `signal`, waits up to `grace` for the leader to exit, then
    /// SIGKILLs the whole group. Returns the exit status.
    pub(super) async fn stop(&mut self, signal: SignalName, grace: Duration) -> ExitStatus {
        if let Err(error) = self.signal(signal) {
            warn!(pid = self.pid, signal = signal.name(), %error, "cannot signal the child");
        }
        let status = match tokio::time::timeout(grace, self.wait()).await {
            Ok(status) => status,
            Err(_) => {
                warn!(
                    pid = self.pid,
                    grace = ?grace,
                    "the child did not stop within its grace period; sending SIGKILL to its process group"
                );
                kill_group(self.pid, libc::SIGKILL);
                self.wait().await
            }
        };
        self.end_group();
        status
    }
}

fn send(pid: i32, signal: i32) -> std::io::Result<()> {
    // SAFETY: kill(2) with a positive PID (or a negative group id) and a
    // valid signal number has no memory effects.
    let result = unsafe { libc::kill(pid, signal) };
    if result == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Signals every process of the group led by `pid` (ESRCH: none left).
pub(crate) fn kill_group(pid: u32, signal: i32) {
    if let Err(error) = send(-(pid as i32), signal) {
        if error.raw_os_error() != Some(libc::ESRCH) {
            warn!(pgid = pid, %error, "cannot signal the child's process group");
        }
    }
}

async fn forward_lines(name: String, pid: u32, stream: &'static str, pipe: impl AsyncRead + Unpin) {
    let mut lines = BufReader::new(pipe).lines();
    loop {
        match lines.next_line().await {
            Ok(Some(line)) => info!(child = %name, pid, stream, "{line}"),
            Ok(None) => break,
            Err(error) => {
                // Not UTF-8, most likely: say so once and stop reading
                // rather than spin; the child still runs.
                warn!(child = %name, pid, stream, %error, "cannot read the child's output any more");
                break;
            }
        }
    }
}

/// Runs `program` to completion with a time limit; returns whether it
/// succeeded and its output (stdout then stderr).
pub(super) async fn run_check(
    program: &Program,
    timeout: Duration,
) -> Result<(bool, String), String> {
    let mut command = program.command();
    command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let child = command
        .spawn()
        .map_err(|error| format!("cannot run {}: {error}", program.command.display()))?;
    let pid = child.id();
    match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Ok(Ok(output)) => {
            let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
            text.push_str(&String::from_utf8_lossy(&output.stderr));
            Ok((output.status.success(), text.trim().to_owned()))
        }
        Ok(Err(error)) => Err(format!("{}: {error}", program.command.display())),
        Err(_) => {
            if let Some(pid) = pid {
                kill_group(pid, libc::SIGKILL);
            }
            Err(format!(
                "{} did not finish within {timeout:?}",
                program.command.display()
            ))
        }
    }
}

/// "exit 3", "SIGKILL": how a child ended, for logs and metric labels.
pub(super) fn describe_exit(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit {code}"),
        (None, Some(signal)) => SignalName::describe(signal),
        (None, None) => "unknown".into(),
    }
}

/// Where the agent records the PID of the child it runs, so the next agent
/// (after a crash or SIGKILL of this one) can end a child left behind
/// instead of failing to start a second one on the same port.
const LEFTOVER_FILE: &str = ".farol-supervise.pid";

/// Ends the process group a previous agent left running in `runtime_dir`,
/// if the recorded PID still leads a group running `program` (a reused PID
/// running something else is left alone). Returns the PID it ended.
pub(super) async fn end_leftover(runtime_dir: &Path, program: &Program) -> Option<u32> {
    let record = runtime_dir.join(LEFTOVER_FILE);
    let pid: u32 = std::fs::read_to_string(&record).ok()?.trim().parse().ok()?;
    let _ = std::fs::remove_file(&record);
    if !leads_group_running(pid, &program.command) {
        return None;
    }
    kill_group(pid, libc::SIGKILL);
    // It is not our child (its parent was the previous agent): wait, up to
    // 5 s, until whoever inherited it reaped it. Not only its socket must
    // be gone: a daemon that checks its pid file (Apache: "httpd (pid N)
    // already running") still sees a zombie.
    let proc_entry = PathBuf::from(format!("/proc/{pid}"));
    for _ in 0..250 {
        if !proc_entry.exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Some(pid)
}

/// Records `pid` as the running child in `runtime_dir`.
pub(super) fn record_child(runtime_dir: &Path, pid: u32) {
    if let Err(error) = std::fs::write(runtime_dir.join(LEFTOVER_FILE), format!("{pid}\n")) {
        warn!(dir = %runtime_dir.display(), %error, "cannot record the child's pid");
    }
}

/// The child ended under supervision: nothing left to clean up.
pub(super) fn forget_child(runtime_dir: &Path) {
    let _ = std::fs::remove_file(runtime_dir.join(LEFTOVER_FILE));
}

/// True when `pid` is alive (not a zombie), leads its own process group
/// and runs `command`.
fn leads_group_running(pid: u32, command: &Path) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // Fields after the command name in parentheses: state, ppid, pgrp.
    let Some((_, rest)) = stat.rsplit_once(") ") else {
        return false;
    };
    let mut fields = rest.split(' ');
    let state = fields.next();
    let pgrp = fields.nth(1).and_then(|f| f.parse::<u32>().ok());
    if state == Some("Z") || pgrp != Some(pid) {
        return false;
    }
    std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|cmdline| {
        cmdline.split(|b| *b == 0).next() == Some(command.as_os_str().as_encoded_bytes())
    })
}
