//! Shared by the lab tests that run `agent run` with `[postgres]`
//! (`lab_pgha`, `lab_pg_failover`).

use std::{path::Path, process::Stdio};

use xtask::lab::{Lab, LabProcess, CLIENT};

const AGENT: &str = env!("CARGO_BIN_EXE_agent");

/// `agent run` on `node` (no supervised children), its log in `dir`.
pub(crate) fn spawn_agent(lab: &Lab, node: &str, config: &Path, dir: &Path) -> LabProcess {
    let log = std::fs::File::create(dir.join(format!("agent-{node}.log"))).unwrap();
    let mut agent = lab.command(node, AGENT);
    agent
        .args(["run", "--no-supervise", "--node", node, "--config"])
        .arg(config)
        .arg("--pin-dir")
        .arg(lab.pin_dir(node))
        .env("FAROL_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(log);
    lab.spawn(node, &mut agent, "agent").unwrap()
}

/// GET from the client within `max_seconds`: the HTTP status (0: no answer).
pub(crate) fn status_code(lab: &Lab, url: &str, max_seconds: u32) -> u16 {
    let out = lab
        .run(
            CLIENT,
            "curl",
            &[
                "-s",
                "-o",
                "/dev/null",
                "--max-time",
                &max_seconds.to_string(),
                "-w",
                "%{http_code}",
                url,
            ],
        )
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0)
}

/// The three-node PostgreSQL cluster of the `lab_pg_*` tests: agents with
/// `[cluster_state]` (3 voters), `[postgres]` and `[pooler]` on nuster1..3,
/// nuster1 the bootstrap primary. Field order is drop order: agents first,
/// then any postmaster left behind (by the PID in its data directory), then
/// the files, then the lab.
pub(crate) struct PgCluster {
    pub(crate) agents: Vec<(String, Option<LabProcess>)>,
    pub(crate) dir: std::path::PathBuf,
    pub(crate) config: std::path::PathBuf,
    pub(crate) lab: xtask::lab::LabGuard,
}

pub(crate) const PG_NODES: [&str; 3] = ["nuster1", "nuster2", "nuster3"];
pub(crate) const PG_IPS: [&str; 3] = ["192.0.2.11", "192.0.2.12", "192.0.2.13"];
pub(crate) const APP_PASSWORD: &str = "app-pw";

/// What differs between the tests' cluster files.
pub(crate) struct PgOptions {
    pub(crate) synchronous: bool,
    pub(crate) max_lag_bytes: &'static str,
    /// `[cluster_state]` timing lines (empty: the defaults).
    pub(crate) cluster_timing: &'static str,
    pub(crate) failover_after: &'static str,
}

impl Default for PgOptions {
    fn default() -> Self {
        PgOptions {
            synchronous: true,
            max_lag_bytes: "16MB",
            cluster_timing: "",
            failover_after: "1s",
        }
    }
}

pub(crate) fn pg_may_run(test: &str) -> bool {
    super::privileged(test) && super::pooler::can_run_postgres(test)
}

impl PgCluster {
    /// A lab, the cluster file and an agent on each of nuster1..3; waits
    /// until nuster1 is the primary, both standbys stream from it and the
    /// pooler of nuster3 writes (role `app`, table `t (id int, side text)`).
    pub(crate) fn start(tag: &str, options: &PgOptions) -> PgCluster {
        let lab =
            xtask::lab::LabGuard::up(Lab::new(&xtask::lab::unique_prefix(tag)).unwrap()).unwrap();
        let dir = std::env::temp_dir().join(format!("farol-{tag}-lab-{}", lab.prefix()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let config = pg_cluster_file(&dir, options);
        let agents = PG_NODES
            .iter()
            .map(|node| {
                (
                    node.to_string(),
                    Some(spawn_agent(&lab, node, &config, &dir)),
                )
            })
            .collect();
        let cluster = PgCluster {
            agents,
            dir,
            config,
            lab,
        };
        xtask::lab::wait_for(
            "nuster1 primary",
            std::time::Duration::from_secs(90),
            || {
                (status_code(&cluster.lab, "http://192.0.2.11:8008/primary", 2) == 200)
                    .then_some(())
            },
        )
        .unwrap_or_else(|e| panic!("{e:#}\n{}", cluster.logs()));
        let sync = if options.synchronous {
            " AND sync_state = 'quorum'"
        } else {
            ""
        };
        xtask::lab::wait_for("two streaming standbys", std::time::Duration::from_secs(90), || {
            // pg_basebackup's WAL stream also shows as a streaming
            // walsender: the standbys' own /replica says they run.
            let standbys = PG_IPS[1..].iter().all(|ip| {
                status_code(&cluster.lab, &format!("http://{ip}:8008/replica"), 2) == 200
            });
            (standbys && psql(&cluster.lab, &direct(PG_IPS[0]), &format!("SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming' AND application_name IN ('nuster2', 'nuster3'){sync}")).ok()? == "2").then_some(())
        })
        .unwrap_or_else(|e| panic!("{e:#}\n{}", cluster.logs()));
        psql(
            &cluster.lab,
            &direct(PG_IPS[0]),
            &format!("CREATE ROLE app LOGIN PASSWORD '{APP_PASSWORD}'; CREATE TABLE t (id int PRIMARY KEY, side text); GRANT ALL ON t TO app"),
        )
        .unwrap();
        xtask::lab::wait_for(
            "writes through the pooler",
            std::time::Duration::from_secs(30),
            || psql(&cluster.lab, &pooled(PG_IPS[2]), "SELECT 1").ok(),
        )
        .unwrap();
        // Let every decider see the standbys (synchronous or not).
        std::thread::sleep(std::time::Duration::from_secs(1));
        cluster
    }

    /// Every agent's log.
    pub(crate) fn logs(&self) -> String {
        PG_NODES
            .iter()
            .map(|node| {
                format!(
                    "--- {node}\n{}",
                    std::fs::read_to_string(self.dir.join(format!("agent-{node}.log")))
                        .unwrap_or_default()
                )
            })
            .collect()
    }

    /// The postmaster of `node` (from its data directory), if it runs.
    pub(crate) fn postmaster_pid(&self, node: &str) -> Option<i32> {
        postmaster_pid(&self.dir, node)
    }

    /// SIGKILL to the agent and the postmaster of `node`, together.
    pub(crate) fn kill_node(&self, node: &str) {
        let postmaster = self.postmaster_pid(node);
        let index = PG_NODES.iter().position(|n| *n == node).unwrap();
        if let Some(agent) = self.agents[index].1.as_ref() {
            // SAFETY: kill(2) on this test's agent and postmaster (the
            // agent's guard reaps it).
            unsafe {
                libc::kill(agent.pid() as i32, libc::SIGKILL);
                if let Some(pid) = postmaster {
                    libc::kill(pid, libc::SIGKILL);
                }
            }
        }
    }

    /// `agent pg ARGS` on `node`: Ok(stdout) or Err(stderr).
    pub(crate) fn pg_cli(&self, node: &str, args: &[&str]) -> Result<String, String> {
        let out = self
            .lab
            .command(node, AGENT)
            .arg("pg")
            .args(args)
            .arg("--config")
            .arg(&self.config)
            .args(["--node", node])
            .output()
            .unwrap();
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
        }
    }

    /// Blackhole routes both ways between `node` and each of `peers`.
    pub(crate) fn cut(&self, node: &str, peers: &[&str]) {
        for peer in peers {
            for (from, to) in [(node, *peer), (*peer, node)] {
                let ip = self.lab.node(to).unwrap().ip().to_owned();
                let out = self
                    .lab
                    .run(
                        from,
                        "ip",
                        &["route", "add", "blackhole", &format!("{ip}/32")],
                    )
                    .unwrap();
                assert!(out.status.success(), "{out:?}");
            }
        }
    }

    /// Removes what [`PgCluster::cut`] added.
    pub(crate) fn heal(&self, node: &str, peers: &[&str]) {
        for peer in peers {
            for (from, to) in [(node, *peer), (*peer, node)] {
                let ip = self.lab.node(to).unwrap().ip().to_owned();
                let _ = self.lab.run(
                    from,
                    "ip",
                    &["route", "del", "blackhole", &format!("{ip}/32")],
                );
            }
        }
    }

    /// The node whose `/primary` answers 200, if exactly one does.
    pub(crate) fn primary(&self) -> Option<&'static str> {
        let primaries: Vec<&'static str> = PG_IPS
            .iter()
            .copied()
            .filter(|ip| status_code(&self.lab, &format!("http://{ip}:8008/primary"), 2) == 200)
            .collect();
        match primaries.as_slice() {
            [one] => Some(one),
            _ => None,
        }
    }

    /// The ids in `t` on the server at `ip`.
    pub(crate) fn rows(&self, ip: &str) -> std::collections::BTreeSet<i32> {
        psql(&self.lab, &direct(ip), "SELECT id FROM t")
            .unwrap()
            .lines()
            .map(|line| line.parse().unwrap())
            .collect()
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        self.agents.clear();
        for node in PG_NODES {
            if let Some(pid) = postmaster_pid(&self.dir, node) {
                // SAFETY: kill(2) on a postmaster of this test's data directory.
                unsafe { libc::kill(pid, libc::SIGQUIT) };
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(300));
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn postmaster_pid(dir: &Path, node: &str) -> Option<i32> {
    let pid = std::fs::read_to_string(dir.join(node).join("data/postmaster.pid"))
        .ok()?
        .lines()
        .next()?
        .trim()
        .parse::<i32>()
        .ok()?;
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap_or_default();
    exe.to_string_lossy().contains("postgres").then_some(pid)
}

fn pg_cluster_file(dir: &Path, options: &PgOptions) -> std::path::PathBuf {
    let text = std::fs::read_to_string(xtask::lab::lab_config())
        .unwrap()
        .replace(
            "xdp_mode = \"auto\"",
            "xdp_mode = \"auto\"\nsecret = \"lab cluster secret 0123456789\"",
        );
    let mut text = text;
    text.push_str(&format!(
        r#"
[cluster_state]
voters = ["nuster1", "nuster2", "nuster3"]
state_dir = "{dir}/state"
{timing}

[postgres]
nodes = ["nuster1", "nuster2", "nuster3"]
primary = "nuster1"
data_dir = "{dir}/{{node}}/data"
socket_dir = "{dir}/{{node}}/run"
listen_addresses = "{{address}}"
synchronous = {synchronous}
max_lag_bytes = "{max_lag}"
replication_password = "lab-secret"
failover_after = "{failover_after}"
check_interval = "250ms"
settings = {{ fsync = "off", shared_buffers = "16MB", max_connections = "40" }}
hba = ["host all postgres 192.0.2.0/24 trust", "host all app 192.0.2.0/24 trust"]

[pooler]
listen = "0.0.0.0:6432"
primary = "192.0.2.11:5432"
standbys = ["192.0.2.12:5432", "192.0.2.13:5432"]
role_check_interval = "250ms"
stats_users = ["app"]

[[pooler.users]]
name = "app"
secret = "{secret}"
server_password = "{APP_PASSWORD}"

[[pooler.pools]]
database = "postgres"
pool_size = 4
"#,
        dir = dir.display(),
        timing = options.cluster_timing,
        synchronous = options.synchronous,
        max_lag = options.max_lag_bytes,
        failover_after = options.failover_after,
        secret = xtask::postgres::md5_secret("app", APP_PASSWORD).unwrap(),
    ));
    let path = dir.join("cluster.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// Runs `sql` with psql from the client on `conninfo`: Ok(stdout) or
/// Err(stderr).
/// WAL receivers stopped with SIGSTOP; SIGCONT when dropped (also on
/// panic).
pub(crate) struct StalledStandbys(Vec<i32>);

impl Drop for StalledStandbys {
    fn drop(&mut self) {
        for pid in &self.0 {
            // SAFETY: kill(2) on a WAL receiver this test stopped.
            unsafe { libc::kill(*pid, libc::SIGCONT) };
        }
    }
}

impl PgCluster {
    /// Stops both standbys' WAL receivers, then writes about 4 MB on the
    /// primary (nuster1), so both fall that far behind; waits 1 s so every
    /// agent sees the new positions.
    pub(crate) fn stall_standbys_4mb_behind(&self) -> StalledStandbys {
        let receivers: Vec<i32> = PG_IPS[1..]
            .iter()
            .map(|ip| {
                psql(
                    &self.lab,
                    &direct(ip),
                    "SELECT pid FROM pg_stat_wal_receiver",
                )
                .unwrap()
                .parse()
                .unwrap()
            })
            .collect();
        let stalled = StalledStandbys(receivers.clone());
        for pid in &receivers {
            // SAFETY: kill(2) on a WAL receiver of this test's standbys.
            unsafe { libc::kill(*pid, libc::SIGSTOP) };
        }
        psql(
            &self.lab,
            &direct(PG_IPS[0]),
            "CREATE TABLE filler AS SELECT g, repeat('x', 200) AS pad FROM generate_series(1, 20000) g",
        )
        .unwrap();
        std::thread::sleep(std::time::Duration::from_secs(1));
        stalled
    }
}

pub(crate) fn psql(lab: &Lab, conninfo: &str, sql: &str) -> Result<String, String> {
    let out = lab
        .run(
            CLIENT,
            "psql",
            &[
                "-X",
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-d",
                conninfo,
                "-c",
                sql,
            ],
        )
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// The server at `ip` directly, as the superuser.
pub(crate) fn direct(ip: &str) -> String {
    format!("host={ip} user=postgres dbname=postgres connect_timeout=2")
}

/// The pooler of the node at `ip`.
pub(crate) fn pooled(ip: &str) -> String {
    format!(
        "host={ip} port=6432 user=app password={APP_PASSWORD} dbname=postgres connect_timeout=2"
    )
}

/// One write attempt of a [`Writer`].
#[derive(Debug, Clone)]
pub(crate) struct Attempt {
    pub(crate) id: i32,
    pub(crate) sent: std::time::Instant,
    pub(crate) done: std::time::Instant,
    /// The server that committed it (`inet_server_addr()`), None: failed.
    pub(crate) server: Option<String>,
    pub(crate) error: Option<String>,
}

/// How many writes were acknowledged.
pub(crate) fn acked(attempts: &[Attempt]) -> usize {
    attempts.iter().filter(|a| a.server.is_some()).count()
}

/// How many writes sent after `since` were acknowledged.
pub(crate) fn acked_after(attempts: &[Attempt], since: std::time::Instant) -> usize {
    attempts
        .iter()
        .filter(|a| a.sent > since && a.server.is_some())
        .count()
}

/// When the first write sent after `since` was acknowledged.
pub(crate) fn first_ack_after(
    attempts: &[Attempt],
    since: std::time::Instant,
) -> Option<std::time::Instant> {
    attempts
        .iter()
        .filter(|a| a.sent > since && a.server.is_some())
        .map(|a| a.done)
        .min()
}

/// The ids of acknowledged writes missing from `rows`.
pub(crate) fn lost_rows(attempts: &[Attempt], rows: &std::collections::BTreeSet<i32>) -> Vec<i32> {
    attempts
        .iter()
        .filter(|a| a.server.is_some() && !rows.contains(&a.id))
        .map(|a| a.id)
        .collect()
}

/// Writes numbered rows through `conninfo` (one psql, one transaction per
/// row) until `stop` or `deadline`; ids start at `first_id`.
pub(crate) fn write_rows(
    lab: &Lab,
    conninfo: &str,
    side: &str,
    first_id: i32,
    stop: &std::sync::atomic::AtomicBool,
    deadline: std::time::Instant,
    attempts: &std::sync::Mutex<Vec<Attempt>>,
) {
    for id in first_id..first_id + 100_000 {
        if stop.load(std::sync::atomic::Ordering::SeqCst) || std::time::Instant::now() > deadline {
            break;
        }
        let sent = std::time::Instant::now();
        let result = psql(
            lab,
            conninfo,
            &format!("INSERT INTO t VALUES ({id}, '{side}') RETURNING host(inet_server_addr())"),
        );
        let done = std::time::Instant::now();
        let failed = result.is_err();
        let (server, error) = match result {
            Ok(server) => (Some(server), None),
            Err(error) => (None, Some(error.trim().to_owned())),
        };
        attempts.lock().unwrap().push(Attempt {
            id,
            sent,
            done,
            server,
            error,
        });
        if failed {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}
