//! Real PostgreSQL 15 for the pooler's tests and benchmark: a primary and,
//! on request, a streaming standby (pg_basebackup -R), each on its own
//! loopback port and data directory, run as the `postgres` user (the server
//! refuses root) and stopped by PID when the guard drops, also on panic.

use std::{
    net::TcpListener,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::capture;

/// Where Debian puts the PostgreSQL 15 server binaries.
pub const PG_BIN: &str = "/usr/lib/postgresql/15/bin";
/// How long a server may take to accept connections.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

static NEXT_DIR: AtomicU32 = AtomicU32::new(0);

/// A free loopback port (bound then released: a small race, good enough
/// for tests that each pick their own).
pub fn free_port() -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// The uid and gid of the `postgres` user.
fn postgres_ids() -> Result<(u32, u32)> {
    let id = |flag: &str| -> Result<u32> {
        let output = capture(Command::new("id").args([flag, "postgres"])).context(
            "the postgres user is needed to run PostgreSQL (apt-get install postgresql)",
        )?;
        Ok(String::from_utf8_lossy(&output.stdout).trim().parse()?)
    };
    Ok((id("-u")?, id("-g")?))
}

fn as_postgres(program: &str) -> Result<Command> {
    let (uid, gid) = postgres_ids()?;
    let mut command = Command::new(Path::new(PG_BIN).join(program));
    command
        .uid(uid)
        .gid(gid)
        .env_remove("PGPASSWORD")
        .stdin(Stdio::null());
    Ok(command)
}

/// One running postmaster.
#[derive(Debug)]
pub struct PgServer {
    pub port: u16,
    pub data: PathBuf,
    child: Option<Child>,
}

impl PgServer {
    fn start(data: &Path, port: u16, extra: &[&str]) -> Result<PgServer> {
        let log = std::fs::File::create(data.with_extension("log"))?;
        let mut command = as_postgres("postgres")?;
        command
            .arg("-D")
            .arg(data)
            .args(["-p", &port.to_string(), "-k"])
            .arg(data)
            .args([
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
                "-c",
                "max_connections=200",
                "-c",
                "shared_buffers=64MB",
            ])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(log);
        let child = command.spawn().context("starting postgres")?;
        let server = PgServer {
            port,
            data: data.to_owned(),
            child: Some(child),
        };
        server.wait_ready()?;
        Ok(server)
    }

    fn wait_ready(&self) -> Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let status = Command::new("pg_isready")
                .args(["-q", "-h", "127.0.0.1", "-p", &self.port.to_string()])
                .status()?;
            if status.success() {
                return Ok(());
            }
            if Instant::now() > deadline {
                let log =
                    std::fs::read_to_string(self.data.with_extension("log")).unwrap_or_default();
                bail!(
                    "PostgreSQL on port {} not ready after {READY_TIMEOUT:?}:\n{log}",
                    self.port
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs SQL with psql as the superuser over TCP (trust).
    pub fn psql(&self, database: &str, sql: &str) -> Result<String> {
        let output = capture(Command::new("psql").args([
            "-X",
            "-q",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            "127.0.0.1",
            "-p",
            &self.port.to_string(),
            "-U",
            "postgres",
            "-d",
            database,
            "-c",
            sql,
        ]))?;
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
    }

    /// Kills the postmaster at once (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGINT: fast shutdown (roll back, disconnect, stop).
            // SAFETY: kill(2) on our own child's PID.
            unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A primary, an optional streaming standby, and their directory.
#[derive(Debug)]
pub struct PgCluster {
    pub primary: PgServer,
    pub standby: Option<PgServer>,
    dir: PathBuf,
}

impl PgCluster {
    /// initdb (trust on loopback, plus `scram-sha-256` for roles named
    /// `*_scram`), start, and with `standby` a hot standby from
    /// pg_basebackup -R.
    pub fn start(name: &str, standby: bool) -> Result<PgCluster> {
        let (uid, gid) = postgres_ids()?;
        let dir = std::env::temp_dir().join(format!(
            "farol-pg-{name}-{}-{}",
            std::process::id(),
            NEXT_DIR.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        std::os::unix::fs::chown(&dir, Some(uid), Some(gid))?;
        let primary_dir = dir.join("primary");
        let output = as_postgres("initdb")?
            .arg("-D")
            .arg(&primary_dir)
            .args([
                "-A",
                "trust",
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ])
            .output()
            .context("running initdb")?;
        if !output.status.success() {
            bail!("initdb failed: {}", String::from_utf8_lossy(&output.stderr));
        }
        std::fs::write(
            primary_dir.join("pg_hba.conf"),
            "local all all trust\n\
             host all +scram_users 127.0.0.1/32 scram-sha-256\n\
             host all all 127.0.0.1/32 trust\n\
             host replication all 127.0.0.1/32 trust\n",
        )?;
        let primary = PgServer::start(&primary_dir, free_port()?, &[])?;
        primary.psql("postgres", "CREATE ROLE scram_users NOLOGIN")?;
        let mut cluster = PgCluster {
            primary,
            standby: None,
            dir: dir.clone(),
        };
        if standby {
            let standby_dir = dir.join("standby");
            let output = as_postgres("pg_basebackup")?
                .arg("-D")
                .arg(&standby_dir)
                .args([
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &cluster.primary.port.to_string(),
                    "-U",
                    "postgres",
                    "-R",
                    "-X",
                    "stream",
                    "--no-sync",
                ])
                .output()
                .context("running pg_basebackup")?;
            if !output.status.success() {
                bail!(
                    "pg_basebackup failed: {}",
                    String::from_utf8_lossy(&output.stderr)
                );
            }
            cluster.standby = Some(PgServer::start(
                &standby_dir,
                free_port()?,
                &["-c", "hot_standby=on"],
            )?);
        }
        Ok(cluster)
    }

    /// Waits until the standby replayed everything the primary wrote so far.
    pub fn wait_standby_caught_up(&self) -> Result<()> {
        let Some(standby) = &self.standby else {
            return Ok(());
        };
        let lsn = self
            .primary
            .psql("postgres", "SELECT pg_current_wal_lsn()")?;
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let caught = standby.psql(
                "postgres",
                &format!("SELECT pg_last_wal_replay_lsn() >= '{lsn}'::pg_lsn"),
            )?;
            if caught == "t" {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("standby did not replay up to {lsn}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        if let Some(standby) = self.standby.as_mut() {
            standby.stop();
        }
        self.primary.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
