//! PostgreSQL high availability against real PostgreSQL 15 (issue 9): three
//! nodes on loopback (own ports, data and socket directories), each run by
//! the agent's reconciler from one cluster file, bootstrapped by it
//! (initdb, slots, pg_basebackup), with the Patroni endpoints on their own
//! ports; then the role operations: a synchronous commit that waits for a
//! standby, a killed primary replaced by the most advanced standby, the
//! other repointed and the old primary rewound, and a switchover under a
//! writer without a lost transaction.

mod support;

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU32, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use farol_agent::{
    config::Config,
    pgha::{
        api, local, promotion_candidate, switchover, Candidate, Desired, ObservedRole, PgNode,
        PgPlan, Pgha, Role,
    },
};
use tokio::{sync::watch, task::JoinHandle};
use tokio_postgres::SimpleQueryMessage;

static NEXT: AtomicU32 = AtomicU32::new(0);
const NODES: [&str; 3] = ["a", "b", "c"];

fn can_run(test: &str) -> bool {
    support::pooler::can_run_postgres(test)
}

fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(
            std::env::var("RUST_LOG").unwrap_or_else(|_| "farol_agent::pgha=info".into()),
        )
        .try_init();
}

/// The cluster file: three nodes, PostgreSQL on loopback ports.
fn cluster_file(dir: &Path, ports: &[u16; 3], synchronous: bool) -> Config {
    let text = format!(
        r#"
[cluster]
name = "pgtest"

[[node]]
name = "a"
address = "192.0.2.11/24"
interface = "eth0"
roles = ["database"]

[[node]]
name = "b"
address = "192.0.2.12/24"
interface = "eth0"
roles = ["database"]

[[node]]
name = "c"
address = "192.0.2.13/24"
interface = "eth0"
roles = ["database"]

[postgres]
primary = "a"
host = "127.0.0.1"
listen_addresses = "127.0.0.1"
data_dir = "{dir}/{{node}}/data"
socket_dir = "{dir}/{{node}}/run"
ports = {{ a = {}, b = {}, c = {} }}
synchronous = {synchronous}
max_lag_bytes = "16MB"
replication_password = "repl-secret"
settings = {{ fsync = "off", shared_buffers = "16MB", max_connections = "40" }}
"#,
        ports[0],
        ports[1],
        ports[2],
        dir = dir.display(),
    );
    Config::from_toml(Path::new("pgtest.toml"), &text).expect("the test's cluster file is valid")
}

/// One node: its reconciler, its desired-role channel, its endpoints.
struct Node {
    name: String,
    plan: PgPlan,
    pgha: Pgha,
    desired: watch::Sender<Desired>,
    shutdown: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
    api: SocketAddr,
}

/// Three nodes; on drop (a failed test too) every postmaster gets a fast
/// shutdown by PID and the directory goes.
struct Cluster {
    dir: PathBuf,
    config: Config,
    nodes: Vec<Node>,
    /// Postmaster PIDs ever seen, for the guard.
    pids: Arc<Mutex<BTreeSet<u32>>>,
}

fn plan_for(config: &Config, name: &str) -> PgPlan {
    let node = config.nodes.iter().find(|n| n.name == name).unwrap();
    let mut plan = PgPlan::new(config, node).unwrap().unwrap();
    plan.interval = Duration::from_millis(200);
    // A killed primary stays down while the test decides for it.
    plan.crash_restart_delay = Duration::from_secs(120);
    plan
}

impl Cluster {
    async fn start(test: &str, synchronous: bool) -> Cluster {
        init_logs();
        let dir = std::env::temp_dir().join(format!(
            "farol-pgha-{test}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let ports = [
            xtask::postgres::free_port().unwrap(),
            xtask::postgres::free_port().unwrap(),
            xtask::postgres::free_port().unwrap(),
        ];
        let config = cluster_file(&dir, &ports, synchronous);
        let mut cluster = Cluster {
            dir,
            config,
            nodes: Vec::new(),
            pids: Arc::default(),
        };
        for name in NODES {
            let plan = plan_for(&cluster.config, name);
            let node = cluster.spawn(plan.bootstrap_desired(), plan).await;
            cluster.nodes.push(node);
        }
        cluster
    }

    async fn spawn(&self, desired: Desired, plan: PgPlan) -> Node {
        let (desired_tx, desired_rx) = watch::channel(desired);
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let (pgha, task) = Pgha::spawn(PgNode::new(plan.clone()).unwrap(), desired_rx, shutdown_rx);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let api = listener.local_addr().unwrap();
        let mut stop = shutdown_tx.subscribe();
        tokio::spawn(api::serve(listener, pgha.clone(), async move {
            let _ = stop.wait_for(|s| *s).await;
        }));
        let pids = self.pids.clone();
        let watched = pgha.clone();
        tokio::spawn(async move {
            loop {
                if let Some(pid) = watched.postmaster_pid() {
                    pids.lock().unwrap().insert(pid);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        Node {
            name: plan.node.clone(),
            plan,
            pgha,
            desired: desired_tx,
            shutdown: shutdown_tx,
            task: Some(task),
            api,
        }
    }

    fn node(&self, name: &str) -> &Node {
        self.nodes.iter().find(|n| n.name == name).unwrap()
    }

    fn index(&self, name: &str) -> usize {
        self.nodes.iter().position(|n| n.name == name).unwrap()
    }

    /// Stops one node's reconciler (it stops its server, fast).
    async fn stop_node(&mut self, name: &str) {
        let index = self.index(name);
        let node = &mut self.nodes[index];
        let _ = node.shutdown.send(true);
        if let Some(task) = node.task.take() {
            tokio::time::timeout(Duration::from_secs(30), task)
                .await
                .expect("the reconciler stops within 30 s")
                .unwrap();
        }
    }

    /// Starts a stopped node's reconciler again with `desired`.
    async fn restart_node(&mut self, name: &str, desired: Desired) {
        let index = self.index(name);
        let plan = self.nodes[index].plan.clone();
        self.nodes[index] = self.spawn(desired, plan).await;
    }

    async fn stop(mut self) {
        for name in NODES {
            self.stop_node(name).await;
        }
    }

    async fn wait_bootstrapped(&self) {
        wait_http(self.node("a").api, "/primary", 200, Duration::from_secs(60)).await;
        for name in ["b", "c"] {
            wait_http(
                self.node(name).api,
                "/replica",
                200,
                Duration::from_secs(60),
            )
            .await;
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for node in &self.nodes {
            let _ = node.shutdown.send(true);
        }
        let pids: Vec<u32> = self.pids.lock().unwrap().iter().copied().collect();
        for pid in pids {
            let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap_or_default();
            if !exe.to_string_lossy().contains("postgres") {
                continue;
            }
            // SAFETY: kill(2) on a postmaster this test started.
            unsafe { libc::kill(pid as i32, libc::SIGINT) };
            for _ in 0..500 {
                let gone = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .map(|s| s.rsplit_once(") ").is_some_and(|(_, r)| r.starts_with('Z')))
                    .unwrap_or(true);
                if gone {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// GET `path` with curl; the HTTP status and the body.
async fn get(api: SocketAddr, path: &str) -> (u16, String) {
    let output = tokio::process::Command::new("curl")
        .args(["-s", "--max-time", "5", "-w", "\n%{http_code}"])
        .arg(format!("http://{api}{path}"))
        .output()
        .await
        .expect("curl runs");
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_owned())
}

async fn wait_http(api: SocketAddr, path: &str, want: u16, limit: Duration) -> Duration {
    let started = Instant::now();
    loop {
        let (code, body) = get(api, path).await;
        if code == want {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < limit,
            "GET {path} on {api} answered {code}, not {want}, for {limit:?}: {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Runs `sql` as the superuser on `plan`'s server; rows as text.
async fn sql(plan: &PgPlan, sql: &str) -> Vec<Vec<Option<String>>> {
    let client = local::connect(plan).await.expect("connect");
    let messages = client
        .simple_query(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    messages
        .into_iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(row) => Some(
                (0..row.len())
                    .map(|i| row.get(i).map(str::to_owned))
                    .collect(),
            ),
            _ => None,
        })
        .collect()
}

async fn count(plan: &PgPlan) -> u64 {
    sql(plan, "SELECT count(*) FROM t").await[0][0]
        .as_deref()
        .unwrap()
        .parse()
        .unwrap()
}

async fn ids(plan: &PgPlan) -> BTreeSet<i64> {
    sql(plan, "SELECT id FROM t")
        .await
        .into_iter()
        .map(|r| r[0].as_deref().unwrap().parse().unwrap())
        .collect()
}

async fn wait_count(plan: &PgPlan, want: u64, limit: Duration) {
    let started = Instant::now();
    loop {
        let got = match local::connect(plan).await {
            Ok(client) => match client.simple_query("SELECT count(*) FROM t").await {
                Ok(messages) => messages.iter().find_map(|m| match m {
                    SimpleQueryMessage::Row(row) => row.get(0).and_then(|v| v.parse().ok()),
                    _ => None,
                }),
                Err(_) => None,
            },
            Err(_) => None,
        };
        if got == Some(want) {
            return;
        }
        assert!(
            started.elapsed() < limit,
            "{} has {got:?} rows, not {want}, after {limit:?}",
            plan.node
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn desired(role: Role, epoch: u64, reason: &str) -> Desired {
    Desired {
        role,
        epoch,
        reason: reason.into(),
    }
}

fn standby_of(node: &str) -> Role {
    Role::Standby {
        upstream: node.into(),
    }
}

/// Commits rows with increasing ids on whichever server `target` names,
/// one transaction each, until `stop`; returns the acknowledged ids and
/// the errors seen (a server going away).
fn spawn_writer(
    target: watch::Receiver<PgPlan>,
    stop: watch::Receiver<bool>,
    first_id: i64,
) -> JoinHandle<(BTreeSet<i64>, u64)> {
    tokio::spawn(async move {
        let mut acked = BTreeSet::new();
        let mut errors = 0u64;
        let mut next = first_id;
        let deadline = Instant::now() + Duration::from_secs(50);
        while !*stop.borrow() && Instant::now() < deadline {
            let plan = target.borrow().clone();
            let Ok(client) = local::connect(&plan).await else {
                errors += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            };
            while !*stop.borrow() && Instant::now() < deadline {
                if target.borrow().node != plan.node {
                    break;
                }
                next += 1;
                let insert = format!("INSERT INTO t VALUES ({next})");
                match tokio::time::timeout(Duration::from_secs(5), client.simple_query(&insert))
                    .await
                {
                    Ok(Ok(_)) => {
                        acked.insert(next);
                    }
                    _ => {
                        errors += 1;
                        break;
                    }
                }
            }
        }
        (acked, errors)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bootstrap_replicates_and_endpoints_answer_by_role() {
    if !can_run("bootstrap_replicates_and_endpoints_answer_by_role") {
        return;
    }
    let started = Instant::now();
    let cluster = Cluster::start("boot", false).await;
    cluster.wait_bootstrapped().await;
    eprintln!(
        "bootstrap of a primary and two standbys: {:?}",
        started.elapsed()
    );
    let a = &cluster.node("a").plan;
    sql(a, "CREATE TABLE t (id bigint PRIMARY KEY)").await;
    sql(a, "INSERT INTO t SELECT generate_series(1, 100)").await;
    for name in ["b", "c"] {
        wait_count(&cluster.node(name).plan, 100, Duration::from_secs(20)).await;
    }
    // Standbys refuse writes: they are hot standbys.
    let b_client = local::connect(&cluster.node("b").plan).await.unwrap();
    let refused = b_client
        .simple_query("INSERT INTO t VALUES (0)")
        .await
        .unwrap_err();
    let message = refused
        .as_db_error()
        .map(|e| e.message().to_owned())
        .unwrap_or_default();
    assert!(message.contains("read-only"), "{refused:?}");

    for (name, primary, replica) in [("a", 200, 503), ("b", 503, 200), ("c", 503, 200)] {
        let api = cluster.node(name).api;
        assert_eq!(get(api, "/primary").await.0, primary, "/primary on {name}");
        assert_eq!(get(api, "/replica").await.0, replica, "/replica on {name}");
        assert_eq!(get(api, "/health").await.0, 200, "/health on {name}");
    }
    let (_, body) = get(cluster.node("a").api, "/primary").await;
    let body: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["role"], "primary");
    assert_eq!(body["timeline"], 1);
    assert_eq!(body["replication"].as_array().unwrap().len(), 2, "{body}");
    let (_, body) = get(cluster.node("b").api, "/replica").await;
    let body: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["role"], "replica");
    assert_eq!(body["xlog"]["streaming"], true);

    // The lag bound: b stops replaying, the primary writes 2 MB more.
    sql(&cluster.node("b").plan, "SELECT pg_wal_replay_pause()").await;
    sql(
        a,
        "CREATE TABLE filler AS SELECT repeat('x', 1000) AS x FROM generate_series(1, 2000)",
    )
    .await;
    let b = cluster.node("b").api;
    wait_http(b, "/replica?lag=1MB", 503, Duration::from_secs(10)).await;
    let checks = Instant::now();
    for _ in 0..5 {
        for path in ["/replica?lag=64MB", "/replica?lag=67108864", "/replica"] {
            let (code, body) = get(b, path).await;
            assert_eq!(code, 200, "{path} (no bound: any lag): {body}");
        }
    }
    eprintln!(
        "/replica with the upstream's lag: {:?} per check",
        checks.elapsed() / 15
    );
    assert_eq!(
        get(b, "/replica?lag=lots").await.0,
        400,
        "a bad bound is refused"
    );
    let (_, body) = get(b, "/replica").await;
    let body: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(body["lag"].as_u64().unwrap() > 1 << 20, "{body}");
    assert_eq!(
        get(cluster.node("c").api, "/replica?lag=1MB").await.0,
        200,
        "c replays"
    );
    sql(&cluster.node("b").plan, "SELECT pg_wal_replay_resume()").await;
    wait_http(b, "/replica?lag=64kB", 200, Duration::from_secs(10)).await;

    // Metrics from the reconcilers' last looks.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut registry = prometheus_client::registry::Registry::default();
    registry.register_collector(Box::new(farol_agent::pgha::PgCollector(
        cluster.node("a").pgha.clone(),
    )));
    let text = farol_agent::metrics::encode_prometheus_text(&registry).unwrap();
    for expected in [
        "farol_pg_role{role=\"primary\"} 1",
        "farol_pg_timeline{} 1",
        "farol_pg_standby_lag_bytes{standby=\"b\",sync_state=\"async\"}",
        "farol_pg_standby_lag_seconds{standby=\"c\"}",
        "farol_pg_role_changes_total{to=\"primary\"} 1",
    ] {
        assert!(text.contains(expected), "{expected} missing from:\n{text}");
    }
    let mut registry = prometheus_client::registry::Registry::default();
    registry.register_collector(Box::new(farol_agent::pgha::PgCollector(
        cluster.node("c").pgha.clone(),
    )));
    let text = farol_agent::metrics::encode_prometheus_text(&registry).unwrap();
    assert!(text.contains("farol_pg_role{role=\"standby\"} 1"), "{text}");
    assert!(text.contains("farol_pg_replication_lag_bytes"), "{text}");

    // A stopped server: /health says so.
    let mut cluster = cluster;
    cluster.stop_node("c").await;
    let (code, _) = get(cluster.node("c").api, "/health").await;
    assert!(
        code == 503 || code == 0,
        "/health on a stopped node: {code}"
    );
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn synchronous_commit_waits_until_a_standby_has_it() {
    if !can_run("synchronous_commit_waits_until_a_standby_has_it") {
        return;
    }
    let mut cluster = Cluster::start("sync", true).await;
    cluster.wait_bootstrapped().await;
    let a = cluster.node("a").plan.clone();
    sql(&a, "CREATE TABLE t (id bigint PRIMARY KEY)").await;
    let states = sql(
        &a,
        "SELECT sync_state FROM pg_stat_replication ORDER BY application_name",
    )
    .await;
    assert_eq!(states, vec![vec![Some("quorum".into())]; 2], "ANY 1 (b, c)");
    sql(&a, "INSERT INTO t VALUES (1)").await;

    cluster.stop_node("b").await;
    cluster.stop_node("c").await;
    let client = local::connect(&a).await.unwrap();
    let commit = tokio::spawn(async move {
        client
            .simple_query("INSERT INTO t VALUES (2)")
            .await
            .map(drop)
    });
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        !commit.is_finished(),
        "a commit returned with no standby to have it"
    );

    // One standby back: the commit is acknowledged once it has it.
    let started = Instant::now();
    cluster
        .restart_node("b", desired(standby_of("a"), 0, "back"))
        .await;
    tokio::time::timeout(Duration::from_secs(40), commit)
        .await
        .expect("the commit returns once a standby is back")
        .unwrap()
        .expect("the commit succeeds");
    eprintln!(
        "commit acknowledged {:?} after the standby's restart",
        started.elapsed()
    );
    wait_count(&cluster.node("b").plan, 2, Duration::from_secs(10)).await;
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_primary_is_replaced_and_rejoins_through_pg_rewind() {
    if !can_run("killed_primary_is_replaced_and_rejoins_through_pg_rewind") {
        return;
    }
    let cluster = Cluster::start("failover", true).await;
    cluster.wait_bootstrapped().await;
    let a = cluster.node("a").plan.clone();
    sql(&a, "CREATE TABLE t (id bigint PRIMARY KEY)").await;

    // A writer on the primary; the primary's postmaster is killed mid-way.
    let (target_tx, target_rx) = watch::channel(a.clone());
    let (stop_tx, stop_rx) = watch::channel(false);
    let writer = spawn_writer(target_rx, stop_rx, 1_000_000);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let pid = cluster.node("a").pgha.postmaster_pid().expect("a runs");
    // The lease is gone with the node: no restart as primary.
    cluster
        .node("a")
        .desired
        .send(desired(Role::Fenced, 1, "test: lost the lease"))
        .unwrap();
    // SAFETY: kill(2) on the postmaster this test's reconciler started.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    let killed = Instant::now();
    stop_tx.send(true).unwrap();
    let (acked_before, _) = writer.await.unwrap();
    assert!(
        acked_before.len() > 10,
        "the writer committed {} rows",
        acked_before.len()
    );
    eprintln!(
        "{} commits acknowledged by the primary before its kill",
        acked_before.len()
    );

    // The most advanced standby within max_lag is promoted.
    let mut candidates = Vec::new();
    for name in ["b", "c"] {
        let status = cluster.node(name).pgha.observe_now(false).await;
        candidates.push(Candidate::from_status(name, &status).expect("a standby"));
    }
    let chosen = promotion_candidate(&candidates, None, a.max_lag_bytes)
        .expect("a candidate")
        .node
        .clone();
    let other = if chosen == "b" { "c" } else { "b" };
    let other_pid = cluster.node(other).pgha.postmaster_pid();
    cluster
        .node(&chosen)
        .desired
        .send(desired(Role::Primary, 1, "test: promote"))
        .unwrap();
    cluster
        .node(other)
        .desired
        .send(desired(standby_of(&chosen), 1, "test: follow"))
        .unwrap();
    let promoted = wait_http(
        cluster.node(&chosen).api,
        "/primary",
        200,
        Duration::from_secs(30),
    )
    .await;
    eprintln!(
        "promotion of {chosen}: {promoted:?} from the decision ({:?} after the kill)",
        killed.elapsed()
    );
    let new = cluster.node(&chosen).plan.clone();
    // Every acknowledged row survived (synchronous mode).
    let present = ids(&new).await;
    let lost: Vec<_> = acked_before.difference(&present).collect();
    assert!(lost.is_empty(), "acknowledged rows lost: {lost:?}");
    assert_eq!(
        sql(
            &new,
            "SELECT (SELECT timeline_id FROM pg_control_checkpoint()) >= 1"
        )
        .await[0][0]
            .as_deref(),
        Some("t")
    );

    // The other standby streams from the new primary (repointed, no restart).
    let other_plan = cluster.node(other).plan.clone();
    wait_http(
        cluster.node(other).api,
        "/replica",
        200,
        Duration::from_secs(30),
    )
    .await;
    let sender = cluster.node(other).pgha.observe_now(false).await.sender;
    assert_eq!(sender, Some(format!("127.0.0.1:{}", new.port)));
    assert_eq!(
        cluster.node(other).pgha.postmaster_pid(),
        other_pid,
        "the repointed standby was not restarted (PostgreSQL 13+ reloads primary_conninfo)"
    );

    // More writes on the new primary, then the old one rejoins through pg_rewind.
    drop(target_tx);
    let (stop_tx, stop_rx) = watch::channel(false);
    let (_target_tx2, target_rx2) = watch::channel(new.clone());
    let writer = spawn_writer(target_rx2, stop_rx, 2_000_000);
    cluster
        .node("a")
        .desired
        .send(desired(standby_of(&chosen), 2, "test: rejoin"))
        .unwrap();
    let rejoined = wait_http(
        cluster.node("a").api,
        "/replica",
        200,
        Duration::from_secs(40),
    )
    .await;
    eprintln!("old primary rewound and streaming after {rejoined:?}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop_tx.send(true).unwrap();
    let (acked_after, errors) = writer.await.unwrap();
    assert_eq!(errors, 0, "writes on the new primary failed");
    assert!(!acked_after.is_empty());
    let total = count(&new).await;
    wait_count(&a, total, Duration::from_secs(20)).await;
    wait_count(&other_plan, total, Duration::from_secs(20)).await;
    let on_old = ids(&a).await;
    assert!(acked_before.is_subset(&on_old) && acked_after.is_subset(&on_old));
    let timeline = cluster.node("a").pgha.observe_now(false).await.timeline;
    assert_eq!(
        timeline,
        Some(2),
        "the old primary follows the new timeline"
    );
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switchover_under_a_writer_loses_no_committed_transaction() {
    if !can_run("switchover_under_a_writer_loses_no_committed_transaction") {
        return;
    }
    // Bootstrapped by the reconcilers, then handed to the operations.
    let mut cluster = Cluster::start("switch", false).await;
    cluster.wait_bootstrapped().await;
    sql(
        &cluster.node("a").plan,
        "CREATE TABLE t (id bigint PRIMARY KEY)",
    )
    .await;
    for name in NODES {
        cluster.stop_node(name).await;
    }
    let mut nodes: Vec<PgNode> = NODES
        .iter()
        .map(|name| PgNode::new(plan_for(&cluster.config, name)).unwrap())
        .collect();
    for node in &mut nodes {
        node.start().await.unwrap();
    }
    let pids: Vec<u32> = nodes.iter().filter_map(PgNode::pid).collect();
    cluster.pids.lock().unwrap().extend(pids);
    let a = nodes[0].plan.clone();
    let b = nodes[1].plan.clone();
    let (target_tx, target_rx) = watch::channel(a.clone());
    let (stop_tx, stop_rx) = watch::channel(false);
    let writer = spawn_writer(target_rx, stop_rx, 1_000_000);
    tokio::time::sleep(Duration::from_secs(2)).await;

    let [old, target, other] = &mut nodes[..] else {
        unreachable!()
    };
    let report = switchover(old, target, &mut [other])
        .await
        .expect("switchover");
    target_tx.send(b.clone()).unwrap();
    eprintln!(
        "switchover: writes unavailable {:?}, total {:?}, final LSN {}",
        report.unavailable, report.total, report.final_lsn
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop_tx.send(true).unwrap();
    let (acked, errors) = writer.await.unwrap();
    eprintln!(
        "writer: {} commits acknowledged, {errors} failed attempts",
        acked.len()
    );
    let present = ids(&b).await;
    let lost: Vec<_> = acked.difference(&present).collect();
    assert!(
        lost.is_empty(),
        "acknowledged rows lost in the switchover: {lost:?}"
    );
    assert!(acked.iter().any(|id| present.contains(id)) && acked.len() > 20);
    // The old primary streams from the new one with every row.
    let total = count(&b).await;
    wait_count(&a, total, Duration::from_secs(20)).await;
    wait_count(&nodes[2].plan, total, Duration::from_secs(20)).await;
    let status = local::observe(&a, None).await;
    assert_eq!(status.role, ObservedRole::Standby);
    for node in &mut nodes {
        node.stop(farol_agent::pgha::postmaster::StopMode::Fast)
            .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_that_loses_its_lease_stops_acknowledging_and_stays_down() {
    if !can_run("a_primary_that_loses_its_lease_stops_acknowledging_and_stays_down") {
        return;
    }
    let cluster = Cluster::start("fence", false).await;
    cluster.wait_bootstrapped().await;
    let a = cluster.node("a").plan.clone();
    sql(&a, "CREATE TABLE t (id bigint PRIMARY KEY)").await;
    let (_target_tx, target_rx) = watch::channel(a.clone());
    let (stop_tx, stop_rx) = watch::channel(false);
    let writer = spawn_writer(target_rx, stop_rx, 1_000_000);
    tokio::time::sleep(Duration::from_secs(1)).await;

    let fenced_at = Instant::now();
    cluster
        .node("a")
        .desired
        .send(desired(Role::Fenced, 1, "test: lease lost"))
        .unwrap();
    wait_http(
        cluster.node("a").api,
        "/primary",
        503,
        Duration::from_secs(5),
    )
    .await;
    let pid_gone = async {
        while cluster.node("a").pgha.postmaster_pid().is_some() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(20), pid_gone)
        .await
        .expect("the fenced primary stops");
    eprintln!(
        "fenced primary stopped {:?} after the lease loss",
        fenced_at.elapsed()
    );
    stop_tx.send(true).unwrap();
    let (acked, errors) = writer.await.unwrap();
    assert!(errors > 0, "the writer saw the primary go");
    // It stays down while fenced (the data says primary: no restart).
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(cluster.node("a").pgha.postmaster_pid(), None);
    assert_eq!(get(cluster.node("a").api, "/health").await.0, 503);

    // An older decision is ignored; the lease back (a newer epoch) brings
    // it up as primary again, fence lifted, every acknowledged row there.
    cluster
        .node("a")
        .desired
        .send(desired(Role::Primary, 0, "test: stale"))
        .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        cluster.node("a").pgha.postmaster_pid(),
        None,
        "a stale epoch was obeyed"
    );
    cluster
        .node("a")
        .desired
        .send(desired(Role::Primary, 2, "test: lease back"))
        .unwrap();
    wait_http(
        cluster.node("a").api,
        "/primary",
        200,
        Duration::from_secs(30),
    )
    .await;
    sql(&a, "INSERT INTO t VALUES (1)").await;
    let present = ids(&a).await;
    assert!(
        acked.is_subset(&present),
        "acknowledged rows missing after the fence"
    );
    assert_eq!(cluster.node("a").pgha.desired().epoch, 2);

    // Its disk replaced (empty data directory) while the others still run
    // the cluster: told to be primary, it refuses to initdb a new one.
    let mut cluster = cluster;
    cluster.stop_node("a").await;
    std::fs::remove_dir_all(&a.data_dir).unwrap();
    cluster
        .restart_node("a", desired(Role::Primary, 3, "test: empty disk"))
        .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        !a.data_dir.join("PG_VERSION").exists(),
        "a new cluster was initialised"
    );
    assert_eq!(cluster.node("a").pgha.postmaster_pid(), None);
    cluster.stop().await;
}

/// The switchover the cluster module will drive with decisions only: the
/// old primary is fenced (its fast shutdown ships every WAL record to the
/// connected standbys, which confirm them before it exits), the target is
/// promoted once the old one is down, the others follow it, the old one
/// rejoins. Asynchronous mode, a writer throughout: nothing acknowledged
/// is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switchover_by_desired_roles_loses_no_acknowledged_commit() {
    if !can_run("switchover_by_desired_roles_loses_no_acknowledged_commit") {
        return;
    }
    let cluster = Cluster::start("roles", false).await;
    cluster.wait_bootstrapped().await;
    let a = cluster.node("a").plan.clone();
    let b = cluster.node("b").plan.clone();
    sql(&a, "CREATE TABLE t (id bigint PRIMARY KEY)").await;
    let (target_tx, target_rx) = watch::channel(a.clone());
    let (stop_tx, stop_rx) = watch::channel(false);
    let writer = spawn_writer(target_rx, stop_rx, 1_000_000);
    tokio::time::sleep(Duration::from_secs(2)).await;

    let started = Instant::now();
    cluster
        .node("a")
        .desired
        .send(desired(Role::Fenced, 1, "test: switchover to b"))
        .unwrap();
    let down = async {
        while cluster.node("a").pgha.postmaster_pid().is_some() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(20), down)
        .await
        .expect("a stops");
    cluster
        .node("b")
        .desired
        .send(desired(Role::Primary, 1, "test: switchover to b"))
        .unwrap();
    cluster
        .node("c")
        .desired
        .send(desired(standby_of("b"), 1, "test: switchover to b"))
        .unwrap();
    target_tx.send(b.clone()).unwrap();
    wait_http(
        cluster.node("b").api,
        "/primary",
        200,
        Duration::from_secs(30),
    )
    .await;
    let unavailable = started.elapsed();
    cluster
        .node("a")
        .desired
        .send(desired(standby_of("b"), 1, "test: switchover to b"))
        .unwrap();
    wait_http(
        cluster.node("a").api,
        "/replica",
        200,
        Duration::from_secs(40),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop_tx.send(true).unwrap();
    let (acked, errors) = writer.await.unwrap();
    eprintln!(
        "switchover by roles: writes unavailable {unavailable:?}; {} commits acknowledged, {errors} failed attempts",
        acked.len()
    );
    let present = ids(&b).await;
    let lost: Vec<_> = acked.difference(&present).collect();
    assert!(lost.is_empty(), "acknowledged rows lost: {lost:?}");
    assert!(acked.iter().filter(|id| present.contains(id)).count() > 20);
    let total = count(&b).await;
    wait_count(&a, total, Duration::from_secs(20)).await;
    wait_count(&cluster.node("c").plan, total, Duration::from_secs(20)).await;
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_former_primary_that_cannot_be_rewound_is_cloned_again_and_its_data_kept() {
    if !can_run("a_former_primary_that_cannot_be_rewound_is_cloned_again_and_its_data_kept") {
        return;
    }
    let cluster = Cluster::start("reclone", true).await;
    cluster.wait_bootstrapped().await;
    let a = cluster.node("a").plan.clone();
    let b = cluster.node("b").plan.clone();
    sql(&a, "CREATE TABLE t (id bigint PRIMARY KEY)").await;
    sql(&a, "INSERT INTO t SELECT generate_series(1, 100)").await;

    // a dies as primary; b is promoted and takes more writes.
    let pid = cluster.node("a").pgha.postmaster_pid().expect("a runs");
    cluster
        .node("a")
        .desired
        .send(desired(Role::Fenced, 1, "test: lost the lease"))
        .unwrap();
    // SAFETY: kill(2) on the postmaster this test's reconciler started.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    cluster
        .node("b")
        .desired
        .send(desired(Role::Primary, 1, "test: promote"))
        .unwrap();
    cluster
        .node("c")
        .desired
        .send(desired(standby_of("b"), 1, "test: follow"))
        .unwrap();
    wait_http(
        cluster.node("b").api,
        "/primary",
        200,
        Duration::from_secs(30),
    )
    .await;
    sql(&b, "INSERT INTO t SELECT generate_series(101, 200)").await;

    // a's WAL is gone (a lost disk segment, say): crash recovery and
    // pg_rewind both need it, so every rewind fails.
    let wal = a.data_dir.join("pg_wal");
    for entry in std::fs::read_dir(&wal).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            std::fs::remove_file(path).unwrap();
        }
    }
    let started = Instant::now();
    cluster
        .node("a")
        .desired
        .send(desired(standby_of("b"), 2, "test: rejoin"))
        .unwrap();
    wait_http(
        cluster.node("a").api,
        "/replica",
        200,
        Duration::from_secs(90),
    )
    .await;
    eprintln!(
        "a streams from b again {:?} after being told to rejoin",
        started.elapsed()
    );
    wait_count(&a, 200, Duration::from_secs(20)).await;
    assert_eq!(ids(&a).await, (1..=200).collect::<BTreeSet<i64>>());

    // The diverged data directory was moved aside, not deleted.
    let parent = a.data_dir.parent().unwrap();
    let kept: Vec<_> = std::fs::read_dir(parent)
        .unwrap()
        .filter_map(|entry| entry.ok())
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with("data.diverged-"))
        .collect();
    assert_eq!(kept.len(), 1, "one kept copy of a's old data, got {kept:?}");
    assert!(parent.join(&kept[0]).join("PG_VERSION").exists());
    cluster.stop().await;
}
