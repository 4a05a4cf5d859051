//! PostgreSQL under `agent run` in the namespace lab: three agents
//! (nuster1..3) with a `[postgres]` section bootstrap a synchronous
//! primary and two standbys over the lab LAN, answer the Patroni endpoints
//! on port 8008 to a client, export `farol_pg_*`, and stop their server
//! when they stop.

mod support;

use support::pg_lab::{spawn_agent, status_code};

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use xtask::lab::{lab_config, unique_prefix, wait_for, Lab, LabGuard, LabProcess, CLIENT};

const NODES: [&str; 3] = ["nuster1", "nuster2", "nuster3"];

fn may_run(test: &str) -> bool {
    support::privileged(test) && support::pooler::can_run_postgres(test)
}

/// Field order is drop order: agents first, then any postmaster an agent
/// killed on the way left behind (by the PID in its data directory), then
/// the files, then the lab.
struct Cluster {
    agents: Vec<(String, LabProcess)>,
    dir: PathBuf,
    lab: LabGuard,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.agents.clear();
        for node in NODES {
            let pid_file = self.dir.join(node).join("data/postmaster.pid");
            let Some(pid) = std::fs::read_to_string(pid_file)
                .ok()
                .and_then(|text| text.lines().next()?.trim().parse::<i32>().ok())
            else {
                continue;
            };
            let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap_or_default();
            if exe.to_string_lossy().contains("postgres") {
                // SAFETY: kill(2) on a postmaster of this test's data directory.
                unsafe { libc::kill(pid, libc::SIGQUIT) };
            }
        }
        std::thread::sleep(Duration::from_millis(300));
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn cluster_file(dir: &Path) -> PathBuf {
    let mut text = std::fs::read_to_string(lab_config()).unwrap();
    text.push_str(&format!(
        r#"
[postgres]
nodes = ["nuster1", "nuster2", "nuster3"]
primary = "nuster1"
data_dir = "{dir}/{{node}}/data"
socket_dir = "{dir}/{{node}}/run"
listen_addresses = "{{address}}"
synchronous = true
replication_password = "lab-secret"
settings = {{ fsync = "off", shared_buffers = "16MB", max_connections = "40" }}
hba = ["host all postgres 192.0.2.0/24 trust"]
"#,
        dir = dir.display()
    ));
    let path = dir.join("cluster.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn psql(lab: &Lab, host: &str, sql: &str) -> Result<String, String> {
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
                "-h",
                host,
                "-U",
                "postgres",
                "-d",
                "postgres",
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

#[test]
fn agents_bootstrap_postgres_and_answer_patroni_checks_in_the_lab() {
    let test = "agents_bootstrap_postgres_and_answer_patroni_checks_in_the_lab";
    if !may_run(test) {
        return;
    }
    let lab = LabGuard::up(Lab::new(&unique_prefix("pgha")).unwrap()).unwrap();
    let dir = std::env::temp_dir().join(format!("farol-pgha-lab-{}", lab.prefix()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let config = cluster_file(&dir);
    let agents = NODES
        .iter()
        .map(|node| (node.to_string(), spawn_agent(&lab, node, &config, &dir)))
        .collect();
    let mut cluster = Cluster { agents, dir, lab };
    let log = |node: &str| {
        std::fs::read_to_string(cluster.dir.join(format!("agent-{node}.log"))).unwrap_or_default()
    };

    let expected = [
        ("192.0.2.11", 200, 503),
        ("192.0.2.12", 503, 200),
        ("192.0.2.13", 503, 200),
    ];
    for (ip, primary, replica) in expected {
        wait_for(&format!("{ip}'s role"), Duration::from_secs(60), || {
            (status_code(&cluster.lab, &format!("http://{ip}:8008/primary"), 3) == primary
                && status_code(&cluster.lab, &format!("http://{ip}:8008/replica"), 3) == replica)
                .then_some(())
        })
        .unwrap_or_else(|e| panic!("{e:#}\n{}", log("nuster1") + &log("nuster2")));
        assert_eq!(
            status_code(&cluster.lab, &format!("http://{ip}:8008/health"), 3),
            200
        );
    }

    // Over the lab LAN: written on the primary, read on both standbys.
    psql(
        &cluster.lab,
        "192.0.2.11",
        "CREATE TABLE t (id int); INSERT INTO t SELECT generate_series(1, 50)",
    )
    .unwrap();
    for ip in ["192.0.2.12", "192.0.2.13"] {
        wait_for(&format!("rows on {ip}"), Duration::from_secs(20), || {
            (psql(&cluster.lab, ip, "SELECT count(*) FROM t").ok()? == "50").then_some(())
        })
        .unwrap();
    }
    assert!(psql(&cluster.lab, "192.0.2.12", "INSERT INTO t VALUES (0)")
        .unwrap_err()
        .contains("read-only"));
    let sync = psql(&cluster.lab, "192.0.2.11", "SELECT string_agg(application_name || ':' || sync_state, ',' ORDER BY application_name) FROM pg_stat_replication").unwrap();
    assert_eq!(sync, "nuster2:quorum,nuster3:quorum");

    wait_for("farol_pg_* on /metrics", Duration::from_secs(10), || {
        let metrics = cluster.lab.metrics("nuster1")?;
        (metrics.get("farol_pg_role{role=\"primary\"}") == Some(&1)
            && metrics.contains_key(
                "farol_pg_standby_lag_bytes{standby=\"nuster2\",sync_state=\"quorum\"}",
            ))
        .then_some(())
    })
    .unwrap();
    let metrics = cluster.lab.metrics("nuster3").unwrap();
    assert_eq!(metrics.get("farol_pg_role{role=\"standby\"}"), Some(&1));

    // A crashed postmaster (kill -9) is started again by its agent, as
    // primary (the agent still wants it primary), with its rows.
    let pid_file = cluster.dir.join("nuster1/data/postmaster.pid");
    let pid: i32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .lines()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let killed = std::time::Instant::now();
    // SAFETY: kill(2) on the postmaster the agent of nuster1 started.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    wait_for("nuster1 down", Duration::from_secs(10), || {
        (status_code(&cluster.lab, "http://192.0.2.11:8008/primary", 3) == 503).then_some(())
    })
    .unwrap();
    wait_for("nuster1 primary again", Duration::from_secs(60), || {
        (status_code(&cluster.lab, "http://192.0.2.11:8008/primary", 3) == 200).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", log("nuster1")));
    eprintln!(
        "primary restarted by its agent {:?} after kill -9",
        killed.elapsed()
    );
    assert_eq!(
        psql(&cluster.lab, "192.0.2.11", "SELECT count(*) FROM t").unwrap(),
        "50"
    );
    assert!(log("nuster1").contains("the postmaster exited"));

    // The agent stops its server when it stops.
    let (_, mut agent) = cluster.agents.remove(2);
    let status = agent.terminate(Duration::from_secs(30)).unwrap();
    assert!(
        status.success(),
        "agent on nuster3 exited with {status}\n{}",
        log("nuster3")
    );
    assert!(
        !cluster.dir.join("nuster3/data/postmaster.pid").exists(),
        "the server of nuster3 still runs"
    );
    assert!(psql(&cluster.lab, "192.0.2.13", "SELECT 1").is_err());
    assert!(log("nuster3").contains("postmaster stopped"));
}
