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

/// `md5` + hex(md5(password + user)): a password as `pg_authid` stores it
/// (and as the pooler's `[[pooler.users]] secret` takes it), from md5sum.
pub fn md5_secret(user: &str, password: &str) -> Result<String> {
    let output = capture(
        Command::new("sh").args(["-c", &format!("printf '%s' '{password}{user}' | md5sum")]),
    )
    .context("running md5sum")?;
    Ok(format!(
        "md5{}",
        String::from_utf8_lossy(&output.stdout)
            .split_whitespace()
            .next()
            .unwrap_or_default()
    ))
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

/// `program` as the postgres user, in `netns` when given: nsenter enters
/// the namespace as root, then drops to postgres, and execs (no fork, so
/// the child's PID is the server's).
fn as_postgres_in(netns: Option<&str>, program: &str) -> Result<Command> {
    let Some(netns) = netns else {
        return as_postgres(program);
    };
    let (uid, gid) = postgres_ids()?;
    let mut command = Command::new("nsenter");
    command
        .arg(format!("--net=/run/netns/{netns}"))
        .args([
            "--setuid",
            &uid.to_string(),
            "--setgid",
            &gid.to_string(),
            "--",
        ])
        .arg(Path::new(PG_BIN).join(program))
        .env_remove("PGPASSWORD")
        .stdin(Stdio::null());
    Ok(command)
}

/// A root command, in `netns` when given.
fn command_in(netns: Option<&str>, program: &str) -> Command {
    match netns {
        Some(netns) => {
            let mut command = Command::new("nsenter");
            command
                .arg(format!("--net=/run/netns/{netns}"))
                .arg("--")
                .arg(program);
            command
        }
        None => Command::new(program),
    }
}

/// One running postmaster.
#[derive(Debug)]
pub struct PgServer {
    pub port: u16,
    pub data: PathBuf,
    /// The address it listens on (127.0.0.1 outside a lab).
    pub host: String,
    /// The lab network namespace it runs in, if any.
    netns: Option<String>,
    child: Option<Child>,
}

impl PgServer {
    fn start(data: &Path, port: u16, extra: &[&str]) -> Result<PgServer> {
        PgServer::start_at(data, None, "127.0.0.1", port, extra)
    }

    fn start_at(
        data: &Path,
        netns: Option<&str>,
        host: &str,
        port: u16,
        extra: &[&str],
    ) -> Result<PgServer> {
        let log = std::fs::File::create(data.with_extension("log"))?;
        let mut command = as_postgres_in(netns, "postgres")?;
        command
            .arg("-D")
            .arg(data)
            .args(["-p", &port.to_string(), "-k"])
            .arg(data)
            .args([
                "-c",
                &format!("listen_addresses={host}"),
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
            host: host.to_owned(),
            netns: netns.map(str::to_owned),
            child: Some(child),
        };
        server.wait_ready()?;
        Ok(server)
    }

    fn wait_ready(&self) -> Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let status = command_in(self.netns.as_deref(), "pg_isready")
                .args(["-q", "-h", &self.host, "-p", &self.port.to_string()])
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
        let output = capture(command_in(self.netns.as_deref(), "psql").args([
            "-X",
            "-q",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            &self.host,
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

/// A standby's data directory copied from `primary` (pg_basebackup -R, WAL
/// streamed), run from `netns` when given.
fn base_backup(netns: Option<&str>, primary: &PgServer, into: &Path) -> Result<()> {
    let output = as_postgres_in(netns, "pg_basebackup")?
        .arg("-D")
        .arg(into)
        .args(["-h", &primary.host, "-p", &primary.port.to_string()])
        .args(["-U", "postgres", "-R", "-X", "stream", "--no-sync"])
        .output()
        .context("running pg_basebackup")?;
    if !output.status.success() {
        bail!(
            "pg_basebackup from {}:{} failed: {}",
            primary.host,
            primary.port,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

/// A new data directory: superuser `postgres`, trust, UTF8, C locale.
fn initdb(data: &Path) -> Result<()> {
    let output = as_postgres("initdb")?
        .arg("-D")
        .arg(data)
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
    Ok(())
}

/// `192.0.2.11/24` -> `192.0.2.0/24` (IPv4 lab addresses).
pub fn lab_subnet(address: &str) -> String {
    let (ip, prefix) = address.split_once('/').unwrap_or((address, "32"));
    let prefix: u32 = prefix.parse().unwrap_or(32).min(32);
    let ip: std::net::Ipv4Addr = ip.parse().unwrap_or(std::net::Ipv4Addr::UNSPECIFIED);
    let mask = if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - prefix)
    };
    format!(
        "{}/{prefix}",
        std::net::Ipv4Addr::from(u32::from(ip) & mask)
    )
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
        Self::start_with(name, standby, &[])
    }

    /// As [`PgCluster::start`], with extra server options for both servers
    /// (`["-c", "max_connections=800"]`): later `-c` settings win, and a
    /// hot standby needs the primary's `max_connections` or more.
    pub fn start_with(name: &str, standby: bool, server_options: &[&str]) -> Result<PgCluster> {
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
        initdb(&primary_dir)?;
        std::fs::write(
            primary_dir.join("pg_hba.conf"),
            "local all all trust\n\
             host all +scram_users 127.0.0.1/32 scram-sha-256\n\
             host all all 127.0.0.1/32 trust\n\
             host replication all 127.0.0.1/32 trust\n",
        )?;
        let primary = PgServer::start(&primary_dir, free_port()?, server_options)?;
        primary.psql("postgres", "CREATE ROLE scram_users NOLOGIN")?;
        let mut cluster = PgCluster {
            primary,
            standby: None,
            dir: dir.clone(),
        };
        if standby {
            let standby_dir = dir.join("standby");
            base_backup(None, &cluster.primary, &standby_dir)?;
            let options: Vec<&str> = ["-c", "hot_standby=on"]
                .into_iter()
                .chain(server_options.iter().copied())
                .collect();
            cluster.standby = Some(PgServer::start(&standby_dir, free_port()?, &options)?);
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

/// A primary and streaming standbys in lab namespaces, without Farol: for
/// benchmarks of peers (pgpool-II) in front of the same kind of cluster
/// the agents run. Every server listens on its node's address and `port`;
/// `pg_hba` trusts `subnet` (connections and replication).
#[derive(Debug)]
pub struct LabPgCluster {
    /// The primary first, then the standbys, in the order given.
    pub servers: Vec<PgServer>,
    dir: PathBuf,
}

impl LabPgCluster {
    /// `nodes`: (namespace, address) pairs, the primary first.
    pub fn start(
        dir: &Path,
        nodes: &[(&str, &str)],
        port: u16,
        subnet: &str,
    ) -> Result<LabPgCluster> {
        let (uid, gid) = postgres_ids()?;
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir)?;
        std::os::unix::fs::chown(dir, Some(uid), Some(gid))?;
        let Some(((primary_ns, primary_host), standbys)) = nodes.split_first() else {
            bail!("a lab PostgreSQL cluster needs at least a primary");
        };
        let primary_dir = dir.join("node0");
        initdb(&primary_dir)?;
        std::fs::write(
            primary_dir.join("pg_hba.conf"),
            format!(
                "local all all trust\nhost all all 127.0.0.1/32 trust\n\
                 host all all {subnet} trust\nhost replication all {subnet} trust\n"
            ),
        )?;
        let mut cluster = LabPgCluster {
            // Acknowledged means written here (start_at turns it off).
            servers: vec![PgServer::start_at(
                &primary_dir,
                Some(primary_ns),
                primary_host,
                port,
                &["-c", "synchronous_commit=on"],
            )?],
            dir: dir.to_owned(),
        };
        for (index, (netns, host)) in standbys.iter().enumerate() {
            let data = dir.join(format!("node{}", index + 1));
            base_backup(Some(netns), &cluster.servers[0], &data)?;
            // The primary's socket lock (its socket lives in its data
            // directory) came along; the same port here would trip on it.
            let _ = std::fs::remove_file(data.join(format!(".s.PGSQL.{port}.lock")));
            cluster.servers.push(PgServer::start_at(
                &data,
                Some(netns),
                host,
                port,
                &["-c", "hot_standby=on"],
            )?);
        }
        Ok(cluster)
    }
}

impl Drop for LabPgCluster {
    fn drop(&mut self) {
        for server in self.servers.iter_mut().rev() {
            server.stop();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
