//! The demo's database tier, run by the agents themselves: `[postgres]`
//! makes nuster1..3 a PostgreSQL 15 cluster (the agent of nuster2 runs
//! initdb and the primary, the others pg_basebackup and stream from it,
//! synchronously), `[cluster_state]` (Raft on nuster1..3) records who the
//! primary is under a lease, and the pooler on port 6432 of every node
//! splits reads and writes; the client reaches it on the VIP. Then the
//! primary's node dies (its agent and its postmaster, kill -9): the agents
//! promote the most advanced standby by themselves, the pooler follows,
//! and the restarted agent rewinds the old primary into a standby.

use std::{
    io::{BufRead, BufReader, Write},
    path::Path,
    process::{Child, ChildStdin, Output, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use xtask::lab::{wait_for, Lab, CLIENT};

/// The bootstrap primary: not the VIP holder, so the web tier's balancer
/// survives its death.
pub(crate) const PRIMARY: &str = "nuster2";
pub(crate) const DATABASE_NODES: [&str; 3] = ["nuster1", "nuster2", "nuster3"];
pub(crate) const USER: &str = "demo";
pub(crate) const PASSWORD: &str = "demo-pw";
pub(crate) const POOLER_PORT: u16 = 6432;
/// Patroni's port, served by every agent with `[postgres]`.
const API_PORT: u16 = 8008;

/// The `[cluster_state]`, `[postgres]` and `[pooler]` sections of the
/// demo's cluster file; data and Raft state under `dir`.
/// `role_check_interval` is the pooler's (the demo shows a fast one).
pub(crate) fn sections(
    lab: &Lab,
    dir: &Path,
    primary_node: &str,
    role_check_interval: &str,
) -> Result<String> {
    let quoted = |names: &[&str]| {
        names
            .iter()
            .map(|n| format!("\"{n}\""))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let standbys: Vec<String> = DATABASE_NODES
        .iter()
        .filter(|n| **n != primary_node)
        .map(|n| Ok(format!("\"{}:5432\"", lab.node(n)?.ip())))
        .collect::<Result<_>>()?;
    let subnet = xtask::postgres::lab_subnet(lab.node(primary_node)?.address.as_str());
    Ok(format!(
        r#"
[cluster_state]
voters = [{voters}]
state_dir = "{dir}/raft/{{node}}"

[postgres]
nodes = [{voters}]
primary = "{primary_node}"
data_dir = "{dir}/pg/{{node}}/data"
socket_dir = "{dir}/pg/{{node}}/run"
listen_addresses = "{{address}}"
synchronous = true
replication_password = "demo-replication-pw"
check_interval = "250ms"
settings = {{ shared_buffers = "16MB", max_connections = "40" }}
hba = ["host all postgres {subnet} trust", "host all {USER} {subnet} scram-sha-256"]

[pooler]
listen = "0.0.0.0:{POOLER_PORT}"
primary = "{primary}:5432"
standbys = [{standbys}]
read_write_split = true
role_check_interval = "{role_check_interval}"

[[pooler.users]]
name = "{USER}"
secret = "{secret}"
server_password = "{PASSWORD}"

[[pooler.pools]]
database = "{USER}"
pool_size = 10
"#,
        voters = quoted(&DATABASE_NODES),
        dir = dir.display(),
        primary = lab.node(primary_node)?.ip(),
        standbys = standbys.join(", "),
        secret = xtask::postgres::md5_secret(USER, PASSWORD)?,
    ))
}

/// The HTTP status of Patroni's `path` on `node`, from the client (0: no
/// answer).
pub(crate) fn api_status(lab: &Lab, node: &str, path: &str) -> Result<u16> {
    let url = format!("http://{}:{API_PORT}{path}", lab.node(node)?.ip());
    let out = lab.run(
        CLIENT,
        "curl",
        &[
            "-s",
            "-o",
            "/dev/null",
            "--max-time",
            "2",
            "-w",
            "%{http_code}",
            &url,
        ],
    )?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0))
}

/// psql from the client as the superuser, straight to `node`'s server.
pub(crate) fn psql_direct(lab: &Lab, node: &str, database: &str, sql: &str) -> Result<Output> {
    let conninfo = format!(
        "host={} user=postgres dbname={database} connect_timeout=2",
        lab.node(node)?.ip()
    );
    lab.command(CLIENT, "psql")
        .args(["-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-d"])
        .arg(conninfo)
        .args(["-c", sql])
        .output()
        .context("running psql in the client")
}

/// The node whose agent answers Patroni's `/primary` with 200, if one does.
fn current_primary(lab: &Lab) -> Option<&'static str> {
    DATABASE_NODES
        .into_iter()
        .find(|node| api_status(lab, node, "/primary").ok() == Some(200))
}

/// The demo's role, database and table on `primary`; each step can run
/// again (a step cut short by a lease lost on a starved machine is retried).
fn create_schema(lab: &Lab, primary: &str) -> Result<()> {
    let steps = [
        (
            "postgres",
            format!(
                "DO $$BEGIN CREATE ROLE {USER} LOGIN PASSWORD '{PASSWORD}'; \
                 EXCEPTION WHEN duplicate_object THEN NULL; END$$"
            ),
        ),
        (
            "postgres",
            format!("SELECT 1 FROM pg_database WHERE datname = '{USER}'"),
        ),
        (
            USER,
            format!(
                "CREATE TABLE IF NOT EXISTS visits (id serial PRIMARY KEY, at timestamptz DEFAULT now()); \
                 ALTER TABLE visits OWNER TO {USER}"
            ),
        ),
    ];
    for (database, sql) in &steps {
        let out = psql_direct(lab, primary, database, sql)?;
        if !out.status.success() {
            bail!("{sql}: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        // CREATE DATABASE cannot run inside a DO block: only when missing.
        if sql.starts_with("SELECT 1 FROM pg_database")
            && String::from_utf8_lossy(&out.stdout).trim().is_empty()
        {
            let create = format!("CREATE DATABASE {USER} OWNER {USER}");
            let out = psql_direct(lab, primary, "postgres", &create)?;
            if !out.status.success() {
                bail!("{create}: {}", String::from_utf8_lossy(&out.stderr).trim());
            }
        }
    }
    Ok(())
}

/// Waits for the agents' cluster: a primary with two synchronous standbys;
/// then creates the demo's role, database and table. Returns the primary.
pub(crate) fn wait_ready(lab: &Lab) -> Result<&'static str> {
    let started = Instant::now();
    let deadline = started + Duration::from_secs(120);
    let mut last_error = String::from("no node answered /primary yet");
    loop {
        if Instant::now() > deadline {
            bail!("the database tier did not come up: {last_error}");
        }
        let Some(primary) = current_primary(lab) else {
            std::thread::sleep(Duration::from_millis(250));
            continue;
        };
        let synchronous = psql_direct(
            lab,
            primary,
            "postgres",
            "SELECT count(*) FROM pg_stat_replication WHERE sync_state IN ('sync', 'quorum') AND state = 'streaming'",
        )?;
        if String::from_utf8_lossy(&synchronous.stdout).trim() != "2" {
            last_error = format!("{primary} is primary, waiting for two synchronous standbys");
            std::thread::sleep(Duration::from_millis(250));
            continue;
        }
        match create_schema(lab, primary) {
            Ok(()) => {
                println!(
                    "      the agents bootstrapped PostgreSQL in {:.1} s: primary on {primary}, two synchronous standbys",
                    started.elapsed().as_secs_f64()
                );
                return Ok(primary);
            }
            Err(error) => {
                last_error = format!("{error:#}");
                std::thread::sleep(Duration::from_millis(500));
            }
        }
    }
}

/// psql from the client through the pooler on `host`.
fn psql(lab: &Lab, host: &str, sql: &str) -> Result<Output> {
    lab.command(CLIENT, "psql")
        .env("PGPASSWORD", PASSWORD)
        .env("PGCONNECT_TIMEOUT", "2")
        .args(["-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-h", host])
        .args([
            "-p",
            &POOLER_PORT.to_string(),
            "-U",
            USER,
            "-d",
            USER,
            "-c",
            sql,
        ])
        .output()
        .context("running psql in the client")
}

/// One psql session from the client through the pooler, kept open across
/// the failover: its statements go in one by one on stdin.
struct KeptSession {
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
}

/// What psql prints after each statement's answer, to find its end.
const END_OF_ANSWER: &str = "farol-demo-end-of-answer";

impl KeptSession {
    fn open(lab: &Lab, host: &str) -> Result<KeptSession> {
        // Line-buffered (stdbuf), errors merged into the answers.
        let script = format!(
            "exec stdbuf -oL -eL psql -X -A -t -q -h {host} -p {POOLER_PORT} -U {USER} -d {USER} 2>&1"
        );
        let mut child = lab
            .command(CLIENT, "sh")
            .args(["-c", &script])
            .env("PGPASSWORD", PASSWORD)
            .env("PGCONNECT_TIMEOUT", "2")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting psql in the client")?;
        let (stdin, stdout) = match (child.stdin.take(), child.stdout.take()) {
            (Some(stdin), Some(stdout)) => (stdin, stdout),
            _ => bail!("psql's stdin and stdout are not piped"),
        };
        let (send, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if send.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(KeptSession {
            child,
            stdin,
            lines,
        })
    }

    /// Runs `sql` and returns what psql printed for it (rows or error).
    fn ask(&mut self, sql: &str) -> Result<String> {
        writeln!(self.stdin, "{sql};\n\\echo {END_OF_ANSWER}")
            .context("writing to the kept psql session")?;
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut answer = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line == END_OF_ANSWER => return Ok(answer.join(" ")),
                Ok(line) => answer.push(line),
                Err(_) => bail!(
                    "the kept psql session did not answer {sql:?} within 20 s (so far: {})",
                    answer.join(" ")
                ),
            }
        }
    }
}

impl Drop for KeptSession {
    fn drop(&mut self) {
        // By PID; psql ends at once on SIGKILL, its session with it.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn answer(output: &Output) -> String {
    if output.status.success() {
        String::from_utf8_lossy(&output.stdout)
            .trim()
            .replace('\n', " ")
    } else {
        format!("error: {}", String::from_utf8_lossy(&output.stderr).trim())
    }
}

const WHERE: &str = "SELECT CASE WHEN pg_is_in_recovery() THEN 'standby' ELSE 'primary' END \
                     || ' at ' || host(inet_server_addr())";

/// What the demo does to the primary's node: kill its agent and its
/// postmaster with SIGKILL, and later start its agent again.
pub(crate) trait NodeControl {
    fn kill(&mut self, node: &str) -> Result<()>;
    fn restart(&mut self, node: &str) -> Result<()>;
}

/// The postmaster's PID from its data directory.
pub(crate) fn postmaster_pid(dir: &Path, node: &str) -> Option<i32> {
    std::fs::read_to_string(dir.join(format!("pg/{node}/data/postmaster.pid")))
        .ok()?
        .lines()
        .next()?
        .trim()
        .parse()
        .ok()
}

/// Reads and writes through the pooler; then the death of the primary's
/// node, the failover the agents decide, the writes that come back, and
/// the old primary rejoining as a standby.
pub(crate) fn show(lab: &Lab, vip: &str, primary: &str, nodes: &mut dyn NodeControl) -> Result<()> {
    println!("      PostgreSQL through the pooler on {vip}:{POOLER_PORT} (psql from the client):");
    let read = psql(lab, vip, WHERE)?;
    println!(
        "        a read ({WHERE:.44}...) ran on the {}",
        answer(&read)
    );
    let write = psql(
        lab,
        vip,
        &format!("INSERT INTO visits DEFAULT VALUES; {WHERE}"),
    )?;
    println!(
        "        INSERT then the same in one session ran on the {} (read your writes)",
        answer(&write)
    );
    if !read.status.success() || !write.status.success() {
        bail!(
            "the pooler did not answer: {} / {}",
            answer(&read),
            answer(&write)
        );
    }
    let mut acknowledged = 1;
    let mut kept = KeptSession::open(lab, vip)?;
    let before = kept.ask(&format!("INSERT INTO visits DEFAULT VALUES; {WHERE}"))?;
    if !before.starts_with("primary at") {
        bail!("the kept session's INSERT did not run on the primary: {before}");
    }
    acknowledged += 1;
    println!("        a psql session kept open: an INSERT on the {before}");
    for _ in 0..20 {
        if psql(lab, vip, "INSERT INTO visits DEFAULT VALUES")?
            .status
            .success()
        {
            acknowledged += 1;
        }
    }
    println!(
        "      kill -9 of {primary}'s agent and of its PostgreSQL (the primary), {acknowledged} rows acknowledged"
    );
    nodes.kill(primary)?;
    let died = Instant::now();
    let deadline = died + Duration::from_secs(30);
    let new_primary = loop {
        let write = psql(
            lab,
            vip,
            &format!("INSERT INTO visits DEFAULT VALUES; {WHERE}"),
        )?;
        if write.status.success() {
            acknowledged += 1;
            println!(
                "        the agents promoted a standby: writes through the pooler work again {:.2} s after the kill, on the {}",
                died.elapsed().as_secs_f64(),
                answer(&write)
            );
            break answer(&write);
        }
        if Instant::now() > deadline {
            bail!("writes did not come back: {}", answer(&write));
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    // A transaction pool lends the kept session a server per transaction:
    // its next one goes to the new primary.
    let after = kept.ask(&format!("INSERT INTO visits DEFAULT VALUES; {WHERE}"))?;
    if after != new_primary {
        bail!("the kept psql session did not go on on the new primary: {after}");
    }
    acknowledged += 1;
    println!(
        "        the kept psql session goes on, not reconnected: its next INSERT ran on the {new_primary}"
    );
    drop(kept);
    let count = psql(lab, vip, "SELECT count(*) FROM visits")?;
    println!(
        "        rows in visits on the new primary: {} of {acknowledged} acknowledged (synchronous replication: none lost)",
        answer(&count)
    );
    if answer(&count) != acknowledged.to_string() {
        bail!("acknowledged rows were lost: {}", answer(&count));
    }
    println!("      {primary}'s agent starts again: the old primary is fenced, rewound (pg_rewind) and rejoins");
    let restarted = Instant::now();
    nodes.restart(primary)?;
    wait_for(
        &format!("{primary} to rejoin as a standby"),
        Duration::from_secs(90),
        || (api_status(lab, primary, "/replica").ok()? == 200).then_some(()),
    )?;
    println!(
        "        {primary} streams from the {new_primary} as a standby {:.1} s after its agent started",
        restarted.elapsed().as_secs_f64()
    );
    Ok(())
}
