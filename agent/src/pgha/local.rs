//! This node's PostgreSQL server and every operation on it: the files the
//! agent writes (`farol.conf`, `pg_hba.conf`, `standby.signal`,
//! `primary_conninfo`), the programs it runs as the OS user (initdb,
//! pg_basebackup, pg_rewind, pg_controldata), and the SQL of the role
//! operations (read positions, promote, repoint, fence).
//!
//! The agent talks to its own server as the superuser over the Unix socket
//! in `socket_dir` (mode 0700, owned by the OS user: only root and that user
//! get in, so `local ... trust` is safe); peers reach each other over TCP as
//! the replication role.

use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use tokio_postgres::NoTls;
use tracing::{info, warn};

pub use super::status::{
    connect, conninfo, observe, observe_local, quote, Lsn, ObservedRole, PgStatus, StandbyLag,
    UpstreamProbe,
};
use super::{
    postmaster::{Postmaster, StopMode},
    status::{execute, rows},
    Member, OsUser, PgPlan, PghaError, Role,
};

/// How long a starting server may take to accept connections (crash
/// recovery of a small database on a Pi included).
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a fast shutdown may take before immediate.
const STOP_GRACE: Duration = Duration::from_secs(15);
/// The file of the agent's settings, included at the end of postgresql.conf.
const FAROL_CONF: &str = "farol.conf";

/// What `pg_controldata` says about a stopped data directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlData {
    /// "shut down", "in production", "shut down in recovery", ...
    pub state: String,
    /// Where the last checkpoint record starts: after a clean shutdown,
    /// the shutdown checkpoint, the last record the server wrote.
    pub checkpoint: Lsn,
    pub timeline: u32,
}

/// This node's server, run by the agent.
#[derive(Debug)]
pub struct PgNode {
    pub plan: PgPlan,
    user: OsUser,
    postmaster: Option<Postmaster>,
    /// The postmaster exited without being asked to (not yet reported).
    crashed: bool,
    /// pg_rewind runs that failed in a row (reset by one that works).
    failed_rewinds: u32,
}

impl PgNode {
    pub fn new(plan: PgPlan) -> Result<PgNode, PghaError> {
        let user = OsUser::lookup(&plan.os_user)?;
        Ok(PgNode {
            plan,
            user,
            postmaster: None,
            crashed: false,
            failed_rewinds: 0,
        })
    }

    pub fn log_path(&self) -> PathBuf {
        let mut name = self.plan.data_dir.as_os_str().to_owned();
        name.push(".log");
        PathBuf::from(name)
    }

    /// The data directory holds a cluster.
    pub fn has_data(&self) -> bool {
        self.plan.data_dir.join("PG_VERSION").exists()
    }

    /// The data directory starts as a standby (`standby.signal`).
    pub fn data_is_standby(&self) -> bool {
        self.plan.data_dir.join("standby.signal").exists()
    }

    /// Whether the postmaster exited on its own since the last call.
    pub fn take_crash(&mut self) -> bool {
        let _ = self.is_running();
        std::mem::take(&mut self.crashed)
    }

    pub fn pid(&self) -> Option<u32> {
        self.postmaster.as_ref().map(Postmaster::pid)
    }

    /// Returns when the running postmaster exits (never when none runs);
    /// cancel-safe, for the reconciler's select.
    pub async fn exited(&mut self) {
        match self.postmaster.as_mut() {
            Some(postmaster) => postmaster.wait().await,
            None => std::future::pending().await,
        }
    }

    /// Whether the postmaster runs; an exit is logged once, here.
    pub fn is_running(&mut self) -> bool {
        let Some(postmaster) = self.postmaster.as_mut() else {
            return false;
        };
        match postmaster.try_exited() {
            None => true,
            Some(status) => {
                postmaster.kill_orphans();
                let pid = postmaster.pid();
                warn!(node = %self.plan.node, pid, %status, log = %self.log_path().display(), "the postmaster exited");
                self.postmaster = None;
                self.crashed = true;
                false
            }
        }
    }

    fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> PghaError {
        let what = what.into();
        move |source| PghaError::Io { what, source }
    }

    fn own(&self, path: &Path, mode: u32) -> Result<(), PghaError> {
        std::os::unix::fs::chown(path, Some(self.user.uid), Some(self.user.gid))
            .map_err(Self::io(format!("chown {}", path.display())))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
            .map_err(Self::io(format!("chmod {}", path.display())))
    }

    /// Creates the socket directory and the data directory's parent.
    pub async fn prepare(&self) -> Result<(), PghaError> {
        let socket = &self.plan.socket_dir;
        std::fs::create_dir_all(socket)
            .map_err(Self::io(format!("creating {}", socket.display())))?;
        self.own(socket, 0o700)?;
        if let Some(parent) = self.plan.data_dir.parent() {
            std::fs::create_dir_all(parent)
                .map_err(Self::io(format!("creating {}", parent.display())))?;
        }
        if let Some(pid) =
            super::postmaster::end_leftover(&self.plan.data_dir, &self.plan.bin_dir).await
        {
            info!(pid, "ended the postmaster a previous agent left running");
        }
        Ok(())
    }

    async fn run_program(
        &self,
        program: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Result<String, PghaError> {
        let path = self.plan.bin_dir.join(program);
        let mut command = tokio::process::Command::new(&path);
        command
            .args(args)
            .uid(self.user.uid)
            .gid(self.user.gid)
            .env_remove("PGPASSWORD")
            .envs(env.iter().copied())
            .current_dir("/")
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true);
        let output = command
            .output()
            .await
            .map_err(Self::io(format!("running {}", path.display())))?;
        let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
        text.push_str(&String::from_utf8_lossy(&output.stderr));
        if output.status.success() {
            Ok(text)
        } else {
            Err(PghaError::Program {
                program: program.to_owned(),
                status: output.status.to_string(),
                output: text.trim().to_owned(),
            })
        }
    }

    /// A new cluster in the (absent or empty) data directory.
    pub async fn initdb(&self) -> Result<(), PghaError> {
        let data = &self.plan.data_dir;
        self.refuse_foreign_data()?;
        std::fs::create_dir_all(data).map_err(Self::io(format!("creating {}", data.display())))?;
        self.own(data, 0o700)?;
        info!(node = %self.plan.node, data = %data.display(), "initdb: a new database cluster");
        self.run_program(
            "initdb",
            &[
                "-D",
                &data.to_string_lossy(),
                "-U",
                &self.plan.os_user,
                "-E",
                "UTF8",
                "--locale=C",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
            ],
            &[],
        )
        .await
        .map(drop)
    }

    fn refuse_foreign_data(&self) -> Result<(), PghaError> {
        let data = &self.plan.data_dir;
        let non_empty = std::fs::read_dir(data).is_ok_and(|mut entries| entries.next().is_some());
        if non_empty && !self.has_data() {
            return Err(PghaError::State(format!(
                "{} is not empty but holds no PostgreSQL cluster (no PG_VERSION): refusing to touch it",
                data.display()
            )));
        }
        Ok(())
    }

    /// A copy of `upstream` (pg_basebackup through its slot for this
    /// node), made aside and renamed into place when complete.
    pub async fn base_backup(&self, upstream: &Member) -> Result<(), PghaError> {
        self.refuse_foreign_data()?;
        let data = &self.plan.data_dir;
        let mut partial = data.as_os_str().to_owned();
        partial.push(".partial");
        let partial = PathBuf::from(partial);
        let _ = std::fs::remove_dir_all(&partial);
        std::fs::create_dir_all(&partial)
            .map_err(Self::io(format!("creating {}", partial.display())))?;
        self.own(&partial, 0o700)?;
        info!(node = %self.plan.node, upstream = %upstream.name, "pg_basebackup from the primary");
        let started = Instant::now();
        self.run_program(
            "pg_basebackup",
            &[
                "-D",
                &partial.to_string_lossy(),
                "-d",
                &conninfo(&self.plan, upstream, None),
                "-X",
                "stream",
                "-S",
                &self.plan.node,
                "--checkpoint=fast",
            ],
            &[],
        )
        .await?;
        if data.exists() {
            std::fs::remove_dir(data)
                .map_err(Self::io(format!("removing the empty {}", data.display())))?;
        }
        std::fs::rename(&partial, data).map_err(Self::io(format!(
            "renaming {} into place",
            partial.display()
        )))?;
        info!(node = %self.plan.node, elapsed = ?started.elapsed(), "base backup complete");
        Ok(())
    }

    /// Writes `farol.conf` (included last from postgresql.conf) and
    /// `pg_hba.conf` for this node: copies from the primary (base backup,
    /// rewind) carry the primary's.
    pub fn write_config(&self) -> Result<(), PghaError> {
        let plan = &self.plan;
        let data = &plan.data_dir;
        let main = data.join("postgresql.conf");
        let text = std::fs::read_to_string(&main)
            .map_err(Self::io(format!("reading {}", main.display())))?;
        let include = format!("include = {}", quote(FAROL_CONF));
        if !text.lines().any(|line| line.trim() == include) {
            std::fs::write(
                &main,
                format!("{text}\n# Farol's settings, rewritten at every start\n{include}\n"),
            )
            .map_err(Self::io(format!("writing {}", main.display())))?;
        }
        let others: Vec<String> = plan.peers().map(|p| format!("\"{}\"", p.name)).collect();
        let synchronous = if plan.synchronous && !others.is_empty() {
            format!("ANY 1 ({})", others.join(", "))
        } else {
            String::new()
        };
        let mut conf = format!(
            "# Written by the Farol agent before every start: change [postgres] in the\n\
             # cluster file instead.\n\
             cluster_name = {}\n\
             port = {}\n\
             listen_addresses = {}\n\
             unix_socket_directories = {}\n\
             wal_level = replica\n\
             max_wal_senders = {}\n\
             max_replication_slots = {}\n\
             wal_log_hints = on\n\
             hot_standby = on\n\
             hot_standby_feedback = on\n\
             wal_receiver_status_interval = 1s\n\
             # A standby repointed or cut from its upstream retries every\n\
             # 0.1 s (PostgreSQL's 5 s would hold synchronous commits on a\n\
             # new primary that long after a failover; 0.5 s still cost\n\
             # about half a second of every synchronous failover).\n\
             wal_retrieve_retry_interval = 100ms\n\
             max_slot_wal_keep_size = {}MB\n\
             # pg_rewind of a former primary reads its own WAL back to the\n\
             # last checkpoint before the divergence: a fenced primary's\n\
             # shutdown checkpoint must not recycle it (postgres.settings\n\
             # may override this).\n\
             wal_keep_size = 256MB\n\
             synchronous_standby_names = {}\n",
            quote(&format!("{}-{}", plan.cluster, plan.node)),
            plan.port,
            quote(&plan.listen_addresses),
            quote(&plan.socket_dir.to_string_lossy()),
            plan.max_wal_senders,
            plan.max_wal_senders,
            (plan.max_slot_wal_keep_size >> 20).max(1),
            quote(&synchronous),
        );
        for (key, value) in &plan.settings {
            conf.push_str(&format!("{key} = {}\n", quote(value)));
        }
        self.write_owned(&data.join(FAROL_CONF), &conf)?;
        let method = if plan.replication_password.is_some() {
            "scram-sha-256"
        } else {
            "trust"
        };
        let mut hba = format!(
            "# Written by the Farol agent before every start: add lines with\n\
             # postgres.hba in the cluster file.\n\
             local all {user} trust\n\
             local replication {user} trust\n",
            user = plan.os_user
        );
        for member in &plan.members {
            let address = match member.host.parse::<std::net::IpAddr>() {
                Ok(ip) if ip.is_ipv4() => format!("{ip}/32"),
                Ok(ip) => format!("{ip}/128"),
                Err(_) => member.host.clone(),
            };
            hba.push_str(&format!(
                "host replication {repl} {address} {method}\nhost postgres {repl} {address} {method}\n",
                repl = plan.replication_user
            ));
        }
        for line in &plan.hba {
            hba.push_str(line);
            hba.push('\n');
        }
        self.write_owned(&data.join("pg_hba.conf"), &hba)
    }

    fn write_owned(&self, path: &Path, text: &str) -> Result<(), PghaError> {
        std::fs::write(path, text).map_err(Self::io(format!("writing {}", path.display())))?;
        self.own(path, 0o600)
    }

    /// Makes the stopped server start as a standby of `upstream`:
    /// `standby.signal`, and `primary_conninfo` / `primary_slot_name` in
    /// postgresql.auto.conf (where `ALTER SYSTEM` keeps them too).
    pub fn write_standby(&self, upstream: &Member) -> Result<(), PghaError> {
        let data = &self.plan.data_dir;
        self.write_owned(&data.join("standby.signal"), "")?;
        let auto = data.join("postgresql.auto.conf");
        let text = std::fs::read_to_string(&auto).unwrap_or_default();
        // The fence's settings go too: a standby has nothing to fence, and
        // a later promotion starts with commits allowed.
        let managed = [
            "primary_conninfo",
            "primary_slot_name",
            "synchronous_standby_names",
            "default_transaction_read_only",
        ];
        let mut kept: Vec<&str> = text
            .lines()
            .filter(|line| {
                let key = line.split('=').next().unwrap_or("").trim();
                !managed.contains(&key)
            })
            .collect();
        let conninfo = format!(
            "primary_conninfo = {}",
            quote(&conninfo(&self.plan, upstream, None))
        );
        let slot = format!("primary_slot_name = {}", quote(&self.plan.node));
        kept.push(&conninfo);
        kept.push(&slot);
        self.write_owned(&auto, &(kept.join("\n") + "\n"))
    }

    /// Starts the postmaster and waits until it accepts connections.
    pub async fn start(&mut self) -> Result<(), PghaError> {
        if self.is_running() {
            return Ok(());
        }
        self.write_config()?;
        let postmaster = Postmaster::spawn(
            &self.plan.bin_dir,
            &self.plan.data_dir,
            &self.user,
            &self.log_path(),
        )?;
        self.postmaster = Some(postmaster);
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if !self.is_running() {
                return Err(PghaError::State(format!(
                    "the postmaster of {} exited while starting; see {}",
                    self.plan.node,
                    self.log_path().display()
                )));
            }
            if let Ok(client) = connect(&self.plan).await {
                if client.simple_query("SELECT 1").await.is_ok() {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                return Err(PghaError::State(format!(
                    "PostgreSQL of {} does not accept connections after {START_TIMEOUT:?}; see {}",
                    self.plan.node,
                    self.log_path().display()
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops the postmaster (no-op when down).
    pub async fn stop(&mut self, mode: StopMode) {
        if let Some(mut postmaster) = self.postmaster.take() {
            let status = postmaster.stop(mode, STOP_GRACE).await;
            info!(node = %self.plan.node, ?mode, %status, "postmaster stopped");
        }
    }

    /// SIGKILL to the postmaster alone, as a crash would (tests, and the
    /// last resort of a fence).
    pub fn kill(&mut self) {
        if let Some(pid) = self.pid() {
            // SAFETY: kill(2) on our own child's PID.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
    }

    /// The primary's own set-up, at every start as primary and after a
    /// promotion: the replication role, a slot per other node, no fence,
    /// no leftover `primary_conninfo`.
    pub async fn setup_primary(&self) -> Result<(), PghaError> {
        let plan = &self.plan;
        let client = connect(plan).await?;
        let node = plan.node.as_str();
        // Catalog changes must not wait for a synchronous standby that
        // cannot connect before the role exists.
        execute(&client, node, "SET synchronous_commit = local").await?;
        for setting in [
            "synchronous_standby_names",
            "default_transaction_read_only",
            "primary_conninfo",
            "primary_slot_name",
        ] {
            execute(&client, node, &format!("ALTER SYSTEM RESET {setting}")).await?;
        }
        execute(&client, node, "SELECT pg_reload_conf()").await?;
        let role = &plan.replication_user;
        let exists = rows(
            &client,
            node,
            &format!("SELECT 1 FROM pg_roles WHERE rolname = {}", quote(role)),
        )
        .await?;
        let password = match &plan.replication_password {
            Some(password) => format!("PASSWORD {}", quote(password)),
            None => "PASSWORD NULL".into(),
        };
        let verb = if exists.is_empty() { "CREATE" } else { "ALTER" };
        execute(
            &client,
            node,
            &format!("{verb} ROLE \"{role}\" WITH LOGIN REPLICATION {password}"),
        )
        .await?;
        if exists.is_empty() {
            // What pg_rewind reads from its source (PostgreSQL docs, pg_rewind).
            for function in [
                "pg_ls_dir(text, boolean, boolean)",
                "pg_stat_file(text, boolean)",
                "pg_read_binary_file(text)",
                "pg_read_binary_file(text, bigint, bigint, boolean)",
                // Read by `check_rewind_source`.
                "pg_control_checkpoint()",
            ] {
                execute(
                    &client,
                    node,
                    &format!("GRANT EXECUTE ON FUNCTION pg_catalog.{function} TO \"{role}\""),
                )
                .await?;
            }
        }
        for peer in plan.peers() {
            execute(
                &client,
                node,
                &format!(
                    "SELECT pg_create_physical_replication_slot({name}, true) \
                     WHERE NOT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = {name})",
                    name = quote(&peer.name)
                ),
            )
            .await?;
        }
        Ok(())
    }

    /// Promotes the running standby (`pg_promote`, waiting until done) and
    /// sets it up as primary.
    pub async fn promote(&self) -> Result<(), PghaError> {
        let client = connect(&self.plan).await?;
        let done = rows(&client, &self.plan.node, "SELECT pg_promote(true, 60)").await?;
        if done
            .first()
            .and_then(|r| r.first())
            .cloned()
            .flatten()
            .as_deref()
            != Some("t")
        {
            return Err(PghaError::State(format!(
                "pg_promote on {} did not finish within 60 s",
                self.plan.node
            )));
        }
        // pg_rewind reads the source's timeline from its control file,
        // which the new timeline reaches only at the next checkpoint: a
        // former primary rewound before it would be told "no rewind
        // required" and diverge (Patroni checkpoints here for the same
        // reason). Writes are accepted already.
        execute(&client, &self.plan.node, "CHECKPOINT").await?;
        self.setup_primary().await
    }

    /// Points the running standby at `upstream`: `ALTER SYSTEM` and a
    /// reload (PostgreSQL 13+ restarts the WAL receiver with the new
    /// `primary_conninfo`, no server restart).
    pub async fn repoint(&self, upstream: &Member) -> Result<(), PghaError> {
        let client = connect(&self.plan).await?;
        let node = self.plan.node.as_str();
        execute(
            &client,
            node,
            &format!(
                "ALTER SYSTEM SET primary_conninfo = {}",
                quote(&conninfo(&self.plan, upstream, None))
            ),
        )
        .await?;
        execute(
            &client,
            node,
            &format!("ALTER SYSTEM SET primary_slot_name = {}", quote(node)),
        )
        .await?;
        execute(&client, node, "SELECT pg_reload_conf()").await
    }

    /// The conninfo this node uses to follow `upstream`.
    pub fn conninfo_for(&self, upstream: &Member) -> String {
        conninfo(&self.plan, upstream, None)
    }

    /// Stops a primary that must not run: first no commit can be
    /// acknowledged any more (`synchronous_standby_names` names a standby
    /// that does not exist, so every commit waits, and new transactions are
    /// read-only by default), then a fast shutdown ends the waiting
    /// sessions with an error, their commits unacknowledged.
    pub async fn fence(&mut self) {
        match connect(&self.plan).await {
            Ok(client) => {
                let node = self.plan.node.as_str();
                for sql in [
                    "ALTER SYSTEM SET synchronous_standby_names = 'farol_fenced'",
                    "ALTER SYSTEM SET default_transaction_read_only = on",
                    "SELECT pg_reload_conf()",
                ] {
                    if let Err(error) = execute(&client, node, sql).await {
                        warn!(node, error = %crate::error_chain(&error), "cannot raise the fence before stopping; stopping at once");
                        break;
                    }
                }
            }
            Err(error) => {
                warn!(node = %self.plan.node, error = %crate::error_chain(&error), "cannot reach the server to fence it; stopping it")
            }
        }
        self.stop(StopMode::Fast).await;
    }

    /// What pg_controldata says about the data directory.
    pub async fn control_data(&self) -> Result<ControlData, PghaError> {
        let text = self
            .run_program(
                "pg_controldata",
                &["-D", &self.plan.data_dir.to_string_lossy()],
                &[("LC_ALL", "C")],
            )
            .await?;
        let field = |name: &str| {
            text.lines()
                .find_map(|line| line.strip_prefix(name))
                .map(|rest| rest.trim_start_matches(':').trim().to_owned())
        };
        let missing = |name: &str| PghaError::State(format!("pg_controldata printed no {name:?}"));
        Ok(ControlData {
            state: field("Database cluster state")
                .ok_or_else(|| missing("Database cluster state"))?,
            checkpoint: field("Latest checkpoint location")
                .as_deref()
                .and_then(Lsn::parse)
                .ok_or_else(|| missing("Latest checkpoint location"))?,
            timeline: field("Latest checkpoint's TimeLineID")
                .and_then(|t| t.parse().ok())
                .ok_or_else(|| missing("Latest checkpoint's TimeLineID"))?,
        })
    }

    /// Makes a stopped former primary a copy of `upstream` again:
    /// pg_rewind (which first finishes crash recovery if the server was
    /// killed) undoes what diverged after the promotion, then the standby
    /// files point it at `upstream`.
    pub async fn rewind(&self, upstream: &Member) -> Result<(), PghaError> {
        self.check_rewind_source(upstream).await?;
        let started = Instant::now();
        let output = self
            .run_program(
                "pg_rewind",
                &[
                    "--target-pgdata",
                    &self.plan.data_dir.to_string_lossy(),
                    "--source-server",
                    &conninfo(&self.plan, upstream, Some("postgres")),
                ],
                &[],
            )
            .await?;
        info!(node = %self.plan.node, upstream = %upstream.name, elapsed = ?started.elapsed(), output = %output.trim(), "pg_rewind done");
        self.write_standby(upstream)
    }

    /// A former primary becomes a standby of `upstream` by pg_rewind; after
    /// `reclone_after_failed_rewinds` failures in a row (a rewind cut short
    /// by its source's fencing, timelines without a common ancestor, WAL
    /// that is gone), retrying cannot help: its data directory is moved
    /// aside, kept for the operator, and the node is cloned again.
    async fn rewind_or_reclone(&mut self, upstream: &Member) -> Result<String, PghaError> {
        match self.rewind(upstream).await {
            Ok(()) => {
                self.failed_rewinds = 0;
                Ok(format!("former primary rewound onto {}", upstream.name))
            }
            Err(error @ PghaError::Program { .. }) => {
                self.failed_rewinds += 1;
                let limit = self.plan.reclone_after_failed_rewinds;
                if limit == 0 || self.failed_rewinds < limit {
                    return Err(error);
                }
                let aside = self.move_data_aside()?;
                warn!(node = %self.plan.node, upstream = %upstream.name, failed_rewinds = self.failed_rewinds, %error, kept = %aside.display(), "pg_rewind keeps failing: the former primary's data directory is moved aside and the node is cloned again");
                self.failed_rewinds = 0;
                self.base_backup(upstream).await?;
                self.write_standby(upstream)?;
                Ok(format!(
                    "former primary cloned again from {} after failed rewinds (its old data kept in {})",
                    upstream.name,
                    aside.display()
                ))
            }
            // The source not being ready (not a primary yet, no checkpoint
            // on its new timeline) is no failure of the rewind itself.
            Err(error) => Err(error),
        }
    }

    /// Renames the data directory to `<data_dir>.diverged-<unix seconds>`
    /// so that a base backup can take its place; nothing is deleted.
    fn move_data_aside(&self) -> Result<PathBuf, PghaError> {
        let data = &self.plan.data_dir;
        let seconds = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |since| since.as_secs());
        let mut name = data.as_os_str().to_owned();
        name.push(format!(".diverged-{seconds}"));
        let aside = PathBuf::from(name);
        std::fs::rename(data, &aside).map_err(Self::io(format!(
            "moving {} aside to {}",
            data.display(),
            aside.display()
        )))?;
        Ok(aside)
    }

    /// pg_rewind takes the source's timeline from its control file, which
    /// a promoted server updates only at its first checkpoint: before it,
    /// pg_rewind says "no rewind required" about a diverged former primary.
    /// Refuses (the reconciler retries) until the source is a primary whose
    /// control file shows its current timeline.
    async fn check_rewind_source(&self, upstream: &Member) -> Result<(), PghaError> {
        let sql_error = |source| PghaError::Sql {
            node: upstream.name.clone(),
            what: "checking the rewind source".into(),
            source,
        };
        let config: tokio_postgres::Config = conninfo(&self.plan, upstream, Some("postgres"))
            .parse()
            .map_err(sql_error)?;
        let (client, connection) = config.connect(NoTls).await.map_err(sql_error)?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        let rows = rows(
            &client,
            &upstream.name,
            "SELECT pg_is_in_recovery(), (SELECT timeline_id FROM pg_control_checkpoint())::text, \
             CASE WHEN pg_is_in_recovery() THEN NULL \
             ELSE (('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int)::text END",
        )
        .await?;
        let row = rows.first().cloned().unwrap_or_default();
        let col = |i: usize| row.get(i).cloned().flatten();
        if col(0).as_deref() != Some("f") {
            return Err(PghaError::State(format!(
                "{} is not a primary yet: no rewind from it",
                upstream.name
            )));
        }
        if col(1) != col(2) {
            return Err(PghaError::State(format!(
                "{} has not checkpointed its new timeline yet (control file {:?}, current {:?}): rewind later",
                upstream.name,
                col(1),
                col(2)
            )));
        }
        Ok(())
    }

    /// Brings a stopped server up in `role` from whatever its data
    /// directory holds: initdb (the bootstrap primary only), a base backup,
    /// a rewind of a former primary, or a plain start. Returns what it did,
    /// or None when the role says the server stays down.
    pub async fn bring_up(&mut self, role: &Role) -> Result<Option<String>, PghaError> {
        let plan = self.plan.clone();
        match role {
            Role::Primary => {
                let mut did = String::new();
                if !self.has_data() {
                    if plan.node != plan.bootstrap_primary {
                        return Err(PghaError::State(format!(
                            "{} has no data and is not the bootstrap primary: it cannot become a primary (an empty primary would lose the cluster's data)",
                            plan.node
                        )));
                    }
                    // A peer that answers already holds the cluster (this
                    // node's disk was replaced, say): a fresh empty primary
                    // would split it. Such a node must come back as a standby.
                    for peer in plan.peers() {
                        if UpstreamProbe::default()
                            .position(&plan, peer)
                            .await
                            .is_some()
                        {
                            return Err(PghaError::State(format!(
                                "{} has no data but {} runs a PostgreSQL of this cluster: refusing to initdb a new one (make this node a standby of it)",
                                plan.node, peer.name
                            )));
                        }
                    }
                    self.initdb().await?;
                    did.push_str("initdb, ");
                }
                self.start().await?;
                if self.data_is_standby() {
                    self.promote().await?;
                    did.push_str("started as standby and promoted");
                } else {
                    self.setup_primary().await?;
                    did.push_str("started as primary");
                }
                Ok(Some(did))
            }
            Role::Standby { upstream } => {
                let upstream = plan.member(upstream)?.clone();
                let did = if !self.has_data() {
                    self.base_backup(&upstream).await?;
                    self.write_standby(&upstream)?;
                    format!("base backup from {}", upstream.name)
                } else if !self.data_is_standby() {
                    self.rewind_or_reclone(&upstream).await?
                } else {
                    self.write_standby(&upstream)?;
                    format!("standby of {}", upstream.name)
                };
                self.start().await?;
                Ok(Some(did))
            }
            Role::Fenced => {
                if self.has_data() && self.data_is_standby() {
                    self.start().await?;
                    Ok(Some("standby (fenced: not a primary)".into()))
                } else {
                    Ok(None)
                }
            }
        }
    }
}
