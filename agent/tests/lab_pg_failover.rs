//! Automatic PostgreSQL failover in the namespace lab (issue 9): three
//! agents with `[cluster_state]` (3 voters), `[postgres]` (synchronous) and
//! `[pooler]`. The Raft leader records the bootstrap primary; a writer
//! through the pooler of nuster3 commits numbered rows; nuster1 (agent and
//! postmaster) is killed with SIGKILL; the leader promotes the most
//! advanced synchronous standby once the lease ran out, the pooler follows,
//! writes succeed again and no acknowledged row is missing.

mod support;

use support::pg_lab::{spawn_agent, status_code};

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        Mutex,
    },
    time::{Duration, Instant},
};

use xtask::lab::{lab_config, unique_prefix, wait_for, Lab, LabGuard, LabProcess, CLIENT};

const NODES: [&str; 3] = ["nuster1", "nuster2", "nuster3"];
const IPS: [&str; 3] = ["192.0.2.11", "192.0.2.12", "192.0.2.13"];
const APP_PASSWORD: &str = "app-pw";

fn may_run(test: &str) -> bool {
    support::privileged(test) && support::pooler::can_run_postgres(test)
}

/// Field order is drop order: agents first, then any postmaster left
/// behind (by the PID in its data directory), then the files, then the lab.
struct Cluster {
    agents: Vec<(String, LabProcess)>,
    dir: PathBuf,
    lab: LabGuard,
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

impl Drop for Cluster {
    fn drop(&mut self) {
        self.agents.clear();
        for node in NODES {
            if let Some(pid) = postmaster_pid(&self.dir, node) {
                // SAFETY: kill(2) on a postmaster of this test's data directory.
                unsafe { libc::kill(pid, libc::SIGQUIT) };
            }
        }
        std::thread::sleep(Duration::from_millis(300));
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn cluster_file(dir: &Path) -> PathBuf {
    let text = std::fs::read_to_string(lab_config()).unwrap().replace(
        "xdp_mode = \"auto\"",
        "xdp_mode = \"auto\"\nsecret = \"lab cluster secret 0123456789\"",
    );
    let mut text = text;
    text.push_str(&format!(
        r#"
[cluster_state]
voters = ["nuster1", "nuster2", "nuster3"]
state_dir = "{dir}/state"

[postgres]
nodes = ["nuster1", "nuster2", "nuster3"]
primary = "nuster1"
data_dir = "{dir}/{{node}}/data"
socket_dir = "{dir}/{{node}}/run"
listen_addresses = "{{address}}"
synchronous = true
replication_password = "lab-secret"
failover_after = "1s"
check_interval = "250ms"
settings = {{ fsync = "off", shared_buffers = "16MB", max_connections = "40" }}
hba = ["host all postgres 192.0.2.0/24 trust", "host all app 192.0.2.0/24 trust"]

[pooler]
listen = "0.0.0.0:6432"
primary = "192.0.2.11:5432"
standbys = ["192.0.2.12:5432", "192.0.2.13:5432"]
role_check_interval = "250ms"

[[pooler.users]]
name = "app"
secret = "{secret}"
server_password = "{APP_PASSWORD}"

[[pooler.pools]]
database = "postgres"
pool_size = 4
"#,
        dir = dir.display(),
        secret = xtask::postgres::md5_secret("app", APP_PASSWORD).unwrap(),
    ));
    let path = dir.join("cluster.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// Runs `sql` with psql from the client on `conninfo`.
fn psql(lab: &Lab, conninfo: &str, sql: &str) -> Result<String, String> {
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

fn direct(ip: &str) -> String {
    format!("host={ip} user=postgres dbname=postgres connect_timeout=2")
}

/// The pooler of nuster3 (it survives the kill of nuster1).
fn pooled() -> String {
    format!("host=192.0.2.13 port=6432 user=app password={APP_PASSWORD} dbname=postgres connect_timeout=2")
}

#[test]
fn a_killed_primary_node_is_replaced_without_losing_acknowledged_writes() {
    let test = "a_killed_primary_node_is_replaced_without_losing_acknowledged_writes";
    if !may_run(test) {
        return;
    }
    let lab = LabGuard::up(Lab::new(&unique_prefix("pgfo")).unwrap()).unwrap();
    let dir = std::env::temp_dir().join(format!("farol-pgfo-lab-{}", lab.prefix()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let config = cluster_file(&dir);
    let agents = NODES
        .iter()
        .map(|node| (node.to_string(), spawn_agent(&lab, node, &config, &dir)))
        .collect();
    let mut cluster = Cluster { agents, dir, lab };
    let logs = |dir: &Path| {
        NODES
            .iter()
            .map(|node| {
                format!(
                    "--- {node}\n{}",
                    std::fs::read_to_string(dir.join(format!("agent-{node}.log")))
                        .unwrap_or_default()
                )
            })
            .collect::<String>()
    };

    // The Raft leader records the bootstrap primary; its agent gets the
    // lease and runs the primary; the others stream from it, synchronously.
    wait_for("nuster1 primary", Duration::from_secs(60), || {
        (status_code(&cluster.lab, "http://192.0.2.11:8008/primary", 2) == 200).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", logs(&cluster.dir)));
    wait_for("two synchronous standbys", Duration::from_secs(60), || {
        (psql(&cluster.lab, &direct(IPS[0]), "SELECT count(*) FROM pg_stat_replication WHERE sync_state = 'quorum' AND state = 'streaming'").ok()? == "2").then_some(())
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", logs(&cluster.dir)));
    psql(
        &cluster.lab,
        &direct(IPS[0]),
        &format!("CREATE ROLE app LOGIN PASSWORD '{APP_PASSWORD}'; CREATE TABLE t (id int PRIMARY KEY); GRANT ALL ON t TO app"),
    )
    .unwrap();
    wait_for("writes through the pooler", Duration::from_secs(20), || {
        psql(&cluster.lab, &pooled(), "SELECT 1").ok()
    })
    .unwrap();
    // Let every decider see the standbys as synchronous.
    std::thread::sleep(Duration::from_secs(1));

    // A writer commits numbered rows through the pooler and notes which
    // commits were acknowledged; nuster1 dies (agent and postmaster) while
    // it writes.
    let acknowledged = Mutex::new(BTreeSet::new());
    let killed_at: Mutex<Option<Instant>> = Mutex::new(None);
    let first_after_kill: Mutex<Option<Duration>> = Mutex::new(None);
    let stop = AtomicBool::new(false);
    let writer_deadline = Instant::now() + Duration::from_secs(60);
    std::thread::scope(|scope| {
        scope.spawn(|| {
            for id in 1..=100_000 {
                if stop.load(Ordering::SeqCst) || Instant::now() > writer_deadline {
                    break;
                }
                let ok = psql(
                    &cluster.lab,
                    &pooled(),
                    &format!("INSERT INTO t VALUES ({id})"),
                )
                .is_ok();
                if ok {
                    acknowledged.lock().unwrap().insert(id);
                    let killed = *killed_at.lock().unwrap();
                    if let Some(killed) = killed {
                        let mut first = first_after_kill.lock().unwrap();
                        if first.is_none() {
                            *first = Some(killed.elapsed());
                        }
                    }
                } else {
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        });
        wait_for("rows before the kill", Duration::from_secs(20), || {
            (acknowledged.lock().unwrap().len() >= 20).then_some(())
        })
        .unwrap();
        let postmaster = postmaster_pid(&cluster.dir, "nuster1").expect("nuster1's postmaster");
        let agent = cluster.agents[0].1.pid() as i32;
        // SAFETY: kill(2) on this test's agent and postmaster of nuster1.
        unsafe {
            libc::kill(agent, libc::SIGKILL);
            libc::kill(postmaster, libc::SIGKILL);
        }
        *killed_at.lock().unwrap() = Some(Instant::now());
        eprintln!("killed nuster1 at {:?}", std::time::SystemTime::now());
        let acked_at_kill = acknowledged.lock().unwrap().len();
        let written_after = wait_for(
            "writes through the pooler again",
            Duration::from_secs(45),
            || {
                let first = *first_after_kill.lock().unwrap();
                first.filter(|_| acknowledged.lock().unwrap().len() >= acked_at_kill + 5)
            },
        );
        stop.store(true, Ordering::SeqCst);
        written_after.unwrap_or_else(|e| panic!("{e:#}\n{}", logs(&cluster.dir)));
    });
    let unavailable = first_after_kill.lock().unwrap().unwrap();

    let new_primary = IPS[1..]
        .iter()
        .copied()
        .find(|ip| status_code(&cluster.lab, &format!("http://{ip}:8008/primary"), 2) == 200)
        .unwrap_or_else(|| panic!("no new primary\n{}", logs(&cluster.dir)));
    let rows: BTreeSet<i32> = psql(&cluster.lab, &direct(new_primary), "SELECT id FROM t")
        .unwrap()
        .lines()
        .map(|line| line.parse().unwrap())
        .collect();
    let acknowledged = acknowledged.into_inner().unwrap();
    let lost: Vec<&i32> = acknowledged.difference(&rows).collect();
    assert!(
        lost.is_empty(),
        "acknowledged rows missing on the new primary {new_primary}: {lost:?}"
    );
    let all = logs(&cluster.dir);
    assert!(
        all.contains("failover:"),
        "no failover decision logged\n{all}"
    );
    // The sequence, for the figures: decision, record, lease, promotion.
    for line in all.lines().filter(|line| {
        line.starts_with("---")
            || [
                "PostgreSQL failover",
                "primary record changed",
                "primary lease gained",
                "promoted",
                "Raft leader elected",
            ]
            .iter()
            .any(|what| line.contains(what))
    }) {
        eprintln!("{line}");
    }
    eprintln!(
        "failover: writes through the pooler again {unavailable:?} after kill -9 of the primary node; new primary {new_primary}; {} acknowledged rows, none lost",
        acknowledged.len()
    );
    // The survivors are a primary and a streaming standby of it.
    let standby = if new_primary == IPS[1] {
        IPS[2]
    } else {
        IPS[1]
    };
    wait_for("the other standby follows", Duration::from_secs(30), || {
        (status_code(&cluster.lab, &format!("http://{standby}:8008/replica"), 2) == 200)
            .then_some(())
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", logs(&cluster.dir)));
    cluster.agents.clear();
}
