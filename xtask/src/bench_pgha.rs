//! `cargo xtask bench pgha`: PostgreSQL failover under Farol's agents, in
//! the namespace lab: how long writes through the pooler stop when the
//! primary dies, and how many acknowledged writes are lost.
//!
//! Every run gets a fresh lab: three `agent run` (nuster1..3) with
//! `[cluster_state]` (3 voters), `[postgres]` and `[pooler]`, every timing
//! at its default (lease 1 s + 0.25 s margin, election 750 ms, heartbeat
//! 250 ms, `check_interval` 500 ms, `failover_after` 1 s, pooler
//! `role_check_interval` 1 s). A writer on the client commits numbered
//! rows through nuster3's pooler, one psql (new connection, one INSERT)
//! per row; after 2 s of writes the primary (nuster1) dies:
//! - `kill-postgres`: SIGKILL to its postmaster only (its agent sees it);
//! - `kill-node`: SIGKILL to its agent and its postmaster together.
//!
//! Measured from the instant of the kill: `failover_s`, until the first
//! acknowledged write sent after the kill; `lost_writes`, acknowledged
//! writes missing on the server that acknowledged the last one (the new
//! primary). Each case runs in synchronous (`ANY 1`) and asynchronous
//! mode, `RUNS` times (FAROL_BENCH_PGHA_RUNS overrides it, 1 to 20;
//! FAROL_BENCH_PGHA_CASES=sync-kill-node,... runs only those); the
//! agents' logs give the steps (decision, lease, promotion, pooler).
//!
//! `standby_session_survived`: a reader session (one psql kept open,
//! `SELECT inet_server_addr()` every 200 ms, reads going to a standby:
//! Farol's `read_write_split`, pgpool-II's load balancing) still answers
//! after the failover.
//!
//! `pgpool-kill-postgres`: pgpool-II 4.3 in nuster3's namespace in front of
//! the same kind of cluster (PostgreSQL primary on nuster1, asynchronous
//! standbys on nuster2 and nuster3, no agent), `failover_command` running
//! `pg_promote()` on the node pgpool picks, health checks every second with
//! no retry (pgpool's shortest), `failover_on_backend_error` on (its
//! default); the same writer and reader through it, the same SIGKILL to
//! nuster1's postmaster, the same figures. What pgpool-II cannot do shows
//! as a figure (a session cut, writes never back), not as a failed run.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        Mutex,
    },
    time::{Duration, Instant, SystemTime},
};

use anyhow::{bail, Context, Result};

use xtask::{
    bench::BenchReport,
    exec,
    lab::{lab_config, unique_prefix, wait_for, Lab, LabGuard, LabProcess, CLIENT},
    workspace_root,
};

const NODES: [&str; 3] = ["nuster1", "nuster2", "nuster3"];
const IPS: [&str; 3] = ["192.0.2.11", "192.0.2.12", "192.0.2.13"];
const APP_PASSWORD: &str = "app-pw";
/// Runs per case unless FAROL_BENCH_PGHA_RUNS says otherwise.
const RUNS: usize = 3;
/// Writes before the kill.
const WARM_UP: Duration = Duration::from_secs(2);
/// How long writes may stay down before the run counts as failed.
const GIVE_UP_AFTER: Duration = Duration::from_secs(40);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Death {
    /// SIGKILL to the primary's postmaster; its agent lives.
    Postgres,
    /// SIGKILL to the primary's agent and postmaster.
    Node,
}

#[derive(Debug, Clone, Copy)]
struct Case {
    synchronous: bool,
    death: Death,
    /// pgpool-II with a promoting failover_command instead of the agents.
    pgpool: bool,
}

impl Case {
    fn name(&self) -> String {
        if self.pgpool {
            return "pgpool-kill-postgres".into();
        }
        format!(
            "farol-{}-kill-{}",
            if self.synchronous { "sync" } else { "async" },
            match self.death {
                Death::Postgres => "postgres",
                Death::Node => "node",
            }
        )
    }
}

/// One run's figures.
#[derive(Debug, Clone)]
struct Outcome {
    failover: Option<Duration>,
    acked: usize,
    lost: usize,
    new_primary: String,
    /// The reader session on a standby still answered after the failover.
    reader_survived: bool,
    /// Log events after the kill: (seconds after it, what).
    steps: Vec<(f64, String)>,
}

pub(crate) fn run() -> Result<BenchReport> {
    if !xtask::is_root() {
        bail!("bench pgha builds a namespace lab and runs PostgreSQL: run it as root");
    }
    if !Path::new(xtask::postgres::PG_BIN).join("postgres").exists() {
        bail!("PostgreSQL 15 is not installed (cargo xtask setup)");
    }
    let runs = match std::env::var("FAROL_BENCH_PGHA_RUNS") {
        Ok(text) => match text.parse::<usize>() {
            Ok(n) if (1..=20).contains(&n) => n,
            _ => bail!("FAROL_BENCH_PGHA_RUNS: expected 1 to 20, got {text:?}"),
        },
        Err(_) => RUNS,
    };
    // A debug build: failover time is set by the agents' timers, not by
    // their CPU, and the release build of every dependency would take long
    // on the development machine.
    println!("bench pgha: building the agent");
    exec(Command::new("cargo").current_dir(workspace_root()).args([
        "build",
        "--quiet",
        "-p",
        "farol-agent",
        "--bin",
        "agent",
    ]))?;
    // A copy: a build during the bench must not change the agent between runs.
    let agent = std::env::temp_dir().join(format!("farol-bench-pgha-agent-{}", std::process::id()));
    std::fs::copy(workspace_root().join("target/debug/agent"), &agent)
        .context("copying target/debug/agent")?;
    let case = |synchronous, death, pgpool| Case {
        synchronous,
        death,
        pgpool,
    };
    let cases = [
        case(true, Death::Postgres, false),
        case(true, Death::Node, false),
        case(false, Death::Postgres, false),
        case(false, Death::Node, false),
        case(false, Death::Postgres, true),
    ];
    // FAROL_BENCH_PGHA_CASES=sync-kill-node,...: only the cases named.
    let only = std::env::var("FAROL_BENCH_PGHA_CASES").unwrap_or_default();
    let cases: Vec<Case> = cases
        .into_iter()
        .filter(|case| {
            only.is_empty()
                || only.split(',').any(|name| {
                    case.name() == format!("farol-{}", name.trim()) || case.name() == name.trim()
                })
        })
        .collect();
    if cases.is_empty() {
        bail!("FAROL_BENCH_PGHA_CASES={only:?} names no case (sync-kill-postgres, sync-kill-node, async-kill-postgres, async-kill-node, pgpool-kill-postgres)");
    }
    println!(
        "bench pgha: {} cases x {runs} runs, default timings, writer through nuster3's pooler",
        cases.len()
    );
    let mut report = BenchReport::new("pgha");
    let mut summary = Vec::new();
    // (case, median failover_s) for the ratios to pgpool-II.
    let mut medians: Vec<(String, Option<f64>)> = Vec::new();
    for case in cases {
        let mut outcomes = Vec::new();
        for index in 1..=runs {
            println!("bench pgha: {} run {index}/{runs}", case.name());
            let logs =
                workspace_root().join(format!("target/bench/pgha-logs/{}-{index}", case.name()));
            let outcome = if case.pgpool {
                run_pgpool_once(&logs)
            } else {
                run_once(&agent, case, &logs)
            };
            match outcome {
                Ok(outcome) => {
                    println!(
                        "  writes back after {}, {} acknowledged, {} lost, new primary {}, reader session on a standby {}",
                        outcome
                            .failover
                            .map(|d| format!("{:.2} s", d.as_secs_f64()))
                            .unwrap_or_else(|| format!("never (within {GIVE_UP_AFTER:?})")),
                        outcome.acked,
                        outcome.lost,
                        outcome.new_primary,
                        if outcome.reader_survived { "survived" } else { "cut" },
                    );
                    for (at, what) in &outcome.steps {
                        if at.is_nan() {
                            println!("    {what}");
                        } else {
                            println!("    +{at:6.3} s  {what}");
                        }
                    }
                    outcomes.push(outcome);
                }
                Err(error) => println!("  run failed ({}): {error:#}", logs.display()),
            }
        }
        let mut times: Vec<f64> = outcomes
            .iter()
            .filter_map(|o| o.failover.map(|d| d.as_secs_f64()))
            .collect();
        times.sort_by(f64::total_cmp);
        let lost: Vec<usize> = outcomes.iter().map(|o| o.lost).collect();
        let name = case.name();
        let survived = outcomes.iter().filter(|o| o.reader_survived).count();
        report.push(&name, "runs", outcomes.len() as f64, "runs");
        report.push(
            &name,
            "standby_sessions_survived",
            survived as f64,
            "sessions",
        );
        report.push(
            &name,
            "writes_never_back",
            outcomes.iter().filter(|o| o.failover.is_none()).count() as f64,
            "runs",
        );
        medians.push((name.clone(), times.get(times.len() / 2).copied()));
        if let (Some(min), Some(max)) = (times.first(), times.last()) {
            let median = times[times.len() / 2];
            report.push(&name, "failover_s", median, "s");
            report.push(&name, "failover_s_min", *min, "s");
            report.push(&name, "failover_s_max", *max, "s");
            summary.push(format!(
                "{name:<26} {min:>6.2} {median:>6.2} {max:>6.2}   {:>4}   {survived}/{}   {:?}",
                lost.iter().sum::<usize>(),
                outcomes.len(),
                lost
            ));
        } else {
            summary.push(format!(
                "{name:<26} no run brought writes back   {survived}/{} reader sessions survived",
                outcomes.len()
            ));
        }
        if let Some(max) = lost.iter().max() {
            report.push(&name, "lost_writes", *max as f64, "writes");
            report.push(
                &name,
                "acked_writes",
                outcomes.iter().map(|o| o.acked).sum::<usize>() as f64,
                "writes",
            );
        }
    }
    println!("\nfailover_s (primary death to first acknowledged write through the pooler), lost_writes (acknowledged, missing)");
    println!(
        "{:<26} {:>6} {:>6} {:>6}   {:>4}   reader  lost per run",
        "case", "min", "median", "max", "lost"
    );
    for line in summary {
        println!("{line}");
    }
    let pgpool = medians
        .iter()
        .find(|(name, _)| name.starts_with("pgpool"))
        .map(|(_, median)| *median);
    if let Some(pgpool) = pgpool {
        println!("\nmedian failover_s, Farol / pgpool-II (below 1: Farol is faster)");
        for (name, median) in medians.iter().filter(|(name, _)| name.starts_with("farol")) {
            match (median, pgpool) {
                (Some(farol), Some(peer)) if peer > 0.0 => {
                    println!("{name:<26} {farol:.2} / {peer:.2} = {:.2}x", farol / peer);
                    report.push(name, "failover_ratio_to_pgpool", farol / peer, "x");
                }
                (Some(farol), None) => {
                    println!("{name:<26} {farol:.2} / never (pgpool-II brought no write back)")
                }
                _ => println!("{name:<26} no figure"),
            }
        }
    }
    let _ = std::fs::remove_file(&agent);
    Ok(report)
}

/// Field order is drop order: agents, then postmasters left behind, then
/// the files, then the lab.
struct Cluster {
    agents: Vec<Option<LabProcess>>,
    keep_logs: Option<PathBuf>,
    dir: PathBuf,
    lab: LabGuard,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.agents.clear();
        if let Some(keep) = &self.keep_logs {
            let _ = std::fs::create_dir_all(keep);
            for node in NODES {
                let name = format!("agent-{node}.log");
                let _ = std::fs::copy(self.dir.join(&name), keep.join(&name));
            }
        }
        for node in NODES {
            if let Some(pid) = postmaster_pid(&self.dir, node) {
                // SAFETY: kill(2) on a postmaster of this run's data directory.
                unsafe { libc::kill(pid, libc::SIGQUIT) };
            }
        }
        std::thread::sleep(Duration::from_millis(300));
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Cluster {
    fn logs(&self) -> String {
        NODES
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

    fn psql(&self, conninfo: &str, sql: &str) -> Result<String, String> {
        psql(&self.lab, conninfo, sql)
    }
}

/// One run; the agents' logs are copied into `keep_logs`.
fn run_once(agent: &Path, case: Case, keep_logs: &Path) -> Result<Outcome> {
    let lab = LabGuard::up(Lab::new(&unique_prefix("bpgha"))?)?;
    let dir = std::env::temp_dir().join(format!("farol-bench-pgha-{}", lab.prefix()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let config = cluster_file(&dir, case.synchronous)?;
    let mut cluster = Cluster {
        agents: Vec::new(),
        keep_logs: Some(keep_logs.to_owned()),
        dir,
        lab,
    };
    for node in NODES {
        let log = std::fs::File::create(cluster.dir.join(format!("agent-{node}.log")))?;
        let mut command = cluster.lab.command(node, agent);
        command
            .args(["run", "--no-supervise", "--node", node, "--config"])
            .arg(&config)
            .arg("--pin-dir")
            .arg(cluster.lab.pin_dir(node))
            .env("FAROL_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(log);
        let process = cluster.lab.spawn(node, &mut command, "agent")?;
        cluster.agents.push(Some(process));
    }
    let with_logs = |cluster: &Cluster, error: anyhow::Error| {
        let logs = cluster.logs();
        let tail: Vec<&str> = logs.lines().rev().take(60).collect();
        error.context(format!(
            "agents' logs (last lines):\n{}",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        ))
    };
    let sync = if case.synchronous {
        " AND sync_state = 'quorum'"
    } else {
        ""
    };
    wait_for("nuster1 primary, two streaming standbys", Duration::from_secs(120), || {
        (cluster.psql(&direct(IPS[0]), &format!("SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming' AND application_name IN ('nuster2', 'nuster3'){sync}")).ok()? == "2"
            && status_code(&cluster.lab, "http://192.0.2.11:8008/primary") == 200
            // pg_basebackup's WAL stream also shows as a streaming
            // walsender: the standbys' own /replica says they run.
            && IPS[1..].iter().all(|ip| status_code(&cluster.lab, &format!("http://{ip}:8008/replica")) == 200))
            .then_some(())
    })
    .map_err(|e| with_logs(&cluster, e))?;
    cluster
        .psql(
            &direct(IPS[0]),
            &format!("CREATE ROLE app LOGIN PASSWORD '{APP_PASSWORD}'; CREATE TABLE t (id int PRIMARY KEY); GRANT ALL ON t TO app"),
        )
        .map_err(anyhow::Error::msg)?;
    wait_for("writes through the pooler", Duration::from_secs(30), || {
        cluster.psql(&pooled(), "SELECT 1").ok()
    })?;
    // Every decider sees the standbys (synchronous or not) before the kill.
    std::thread::sleep(Duration::from_secs(1));

    let postmaster =
        postmaster_pid(&cluster.dir, "nuster1").context("nuster1's postmaster is not running")?;
    let agent_pid = cluster.agents[0].as_ref().map(|a| a.pid() as i32);
    let measured = measure(&cluster.lab, &pooled(), &pooled(), || {
        // SAFETY: kill(2) on this run's postmaster (and agent) of nuster1.
        unsafe {
            if case.death == Death::Node {
                if let Some(pid) = agent_pid {
                    libc::kill(pid, libc::SIGKILL);
                }
            }
            libc::kill(postmaster, libc::SIGKILL);
        }
    })?;
    let Some((_, new_primary)) = measured.acked.last().cloned() else {
        bail!("no write was acknowledged");
    };
    let lost = lost_on(&cluster.lab, &new_primary, &measured.acked)?;
    let steps = steps_after(&cluster.logs(), measured.kill_wall);
    if measured.failover.is_none() {
        return Err(with_logs(
            &cluster,
            anyhow::anyhow!("writes did not come back within {GIVE_UP_AFTER:?}"),
        ));
    }
    Ok(Outcome {
        failover: measured.failover,
        acked: measured.acked.len(),
        lost,
        new_primary: node_of(&new_primary),
        reader_survived: measured.reader_survived,
        steps,
    })
}

/// One pgpool-II run: the lab PostgreSQL cluster without agents, pgpool
/// in nuster3's namespace (see the module doc); its log and the failover
/// command's go to `keep_logs`.
fn run_pgpool_once(keep_logs: &Path) -> Result<Outcome> {
    let lab = LabGuard::up(Lab::new(&unique_prefix("bpgpl"))?)?;
    let dir = std::env::temp_dir().join(format!("farol-bench-pgpool-{}", lab.prefix()));
    // Removed on every way out, after the servers stopped (dropped later
    // than what is declared after it) and before the lab goes.
    struct RemoveDir(PathBuf);
    impl Drop for RemoveDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _remove = RemoveDir(dir.clone());
    let nodes: Vec<(String, &str)> = NODES
        .iter()
        .zip(IPS)
        .map(|(node, ip)| (lab.netns(node), ip))
        .collect();
    let nodes: Vec<(&str, &str)> = nodes.iter().map(|(ns, ip)| (ns.as_str(), *ip)).collect();
    let mut servers =
        xtask::postgres::LabPgCluster::start(&dir.join("pg"), &nodes, 5432, "192.0.2.0/24")?;
    let pgpool_dir = dir.join("pgpool");
    std::fs::create_dir_all(&pgpool_dir)?;
    let script = pgpool_dir.join("failover.sh");
    // %d failed node, %h its host, %m new main node, %H its host, %P the
    // old primary: promote the new main node when the primary failed.
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\necho \"$(date +%T.%N) failover failed=$1 ($2) new_main=$3 ($4) old_primary=$5\" >> {log}\n\
             [ \"$1\" = \"$5\" ] || exit 0\n\
             psql -X -q -A -t -h \"$4\" -p 5432 -U postgres -d postgres -c 'SELECT pg_promote()' >> {log} 2>&1\n",
            log = pgpool_dir.join("failover.log").display()
        ),
    )?;
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    let (uid, gid) = (
        xtask::capture(Command::new("id").args(["-u", "postgres"]))?,
        xtask::capture(Command::new("id").args(["-g", "postgres"]))?,
    );
    let id = |out: std::process::Output| -> Result<u32> {
        Ok(String::from_utf8_lossy(&out.stdout).trim().parse()?)
    };
    std::os::unix::fs::chown(&pgpool_dir, Some(id(uid)?), Some(id(gid)?))?;
    let extra = format!(
        "load_balance_mode = on\nsr_check_period = 1\nsr_check_user = 'postgres'\n\
         health_check_period = 1\nhealth_check_timeout = 1\nhealth_check_max_retries = 0\n\
         health_check_user = 'postgres'\nfailover_on_backend_error = on\n\
         search_primary_node_timeout = 10\n\
         failover_command = '{} %d %h %m %H %P'\nlog_min_messages = log\n",
        script.display()
    );
    let pgpool_ns = lab.netns("nuster3");
    let started = xtask::bench_pooler::start_pgpool_with(
        &pgpool_dir,
        &xtask::bench_pooler::PgpoolSetup {
            netns: Some(&pgpool_ns),
            listen: IPS[2],
            // Reads to the standbys (weight 0 on the primary).
            backends: &[
                (IPS[0], 5432, "ALLOW_TO_FAILOVER", 0),
                (IPS[1], 5432, "ALLOW_TO_FAILOVER", 1),
                (IPS[2], 5432, "ALLOW_TO_FAILOVER", 1),
            ],
            children: 32,
            extra: &extra,
        },
    );
    let keep = |pgpool_dir: &Path| {
        let _ = std::fs::create_dir_all(keep_logs);
        for name in ["pgpool.log", "failover.log"] {
            let _ = std::fs::copy(pgpool_dir.join(name), keep_logs.join(name));
        }
    };
    let (pgpool, port) = match started {
        Ok(started) => started,
        Err(error) => {
            keep(&pgpool_dir);
            return Err(error);
        }
    };
    servers.servers[0]
        .psql(
            "postgres",
            &format!("CREATE ROLE app LOGIN PASSWORD '{APP_PASSWORD}'; CREATE TABLE t (id int PRIMARY KEY); GRANT ALL ON t TO app"),
        )?;
    let through = format!(
        "host={} port={port} user=app password={APP_PASSWORD} dbname=postgres connect_timeout=2",
        IPS[2]
    );
    let result = (|| {
        wait_for("writes through pgpool-II", Duration::from_secs(30), || {
            psql(&lab, &through, "SELECT 1").ok()
        })?;
        wait_for("two streaming standbys", Duration::from_secs(30), || {
            (psql(
                &lab,
                &direct(IPS[0]),
                "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'",
            )
            .ok()?
                == "2")
                .then_some(())
        })?;
        let primary = &mut servers.servers[0];
        let measured = measure(&lab, &through, &through, || primary.kill())?;
        // Where the rows are: the server that acknowledged the last write,
        // or (writes never back) the standby the failover command promotes.
        let new_primary = match measured.failover {
            Some(_) => measured.acked.last().map(|(_, server)| server.clone()),
            None => None,
        }
        .unwrap_or_else(|| IPS[1].to_owned());
        let lost = lost_on(&lab, &new_primary, &measured.acked)?;
        let failover_log =
            std::fs::read_to_string(pgpool_dir.join("failover.log")).unwrap_or_default();
        let kill_s = measured
            .kill_wall
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs_f64() % 86_400.0)
            .unwrap_or(0.0);
        // "HH:MM:SS.nnnnnnnnn failover ..." lines: seconds after the kill.
        let steps = failover_log
            .lines()
            .map(|line| {
                let at = line
                    .split_whitespace()
                    .next()
                    .and_then(seconds_of_day)
                    .map_or(f64::NAN, |at| at - kill_s);
                (at, format!("failover_command: {line}"))
            })
            .collect();
        Ok(Outcome {
            failover: measured.failover,
            acked: measured.acked.len(),
            lost,
            new_primary: node_of(&new_primary),
            reader_survived: measured.reader_survived,
            steps,
        })
    })();
    drop(pgpool);
    keep(&pgpool_dir);
    drop(servers);
    result
}

/// What the writer and the reader saw around the kill.
struct Measured {
    failover: Option<Duration>,
    /// (id, server) of every acknowledged write, in order.
    acked: Vec<(i32, String)>,
    reader_survived: bool,
    kill_wall: SystemTime,
}

/// Writes numbered rows through `writer` (one psql and one INSERT per
/// row) and keeps a reader session open through `reader`; after
/// [`WARM_UP`] runs `kill`, then waits until a write sent after it is
/// acknowledged (at most [`GIVE_UP_AFTER`]) and one more second.
fn measure(lab: &Lab, writer: &str, reader: &str, kill: impl FnOnce()) -> Result<Measured> {
    struct Attempt {
        id: i32,
        sent: Instant,
        done: Instant,
        server: Option<String>,
    }
    let attempts: Mutex<Vec<Attempt>> = Mutex::new(Vec::new());
    let stop = AtomicBool::new(false);
    let deadline = Instant::now() + WARM_UP + GIVE_UP_AFTER + Duration::from_secs(5);
    let reading = Reader::start(lab, reader)?;
    let mut kill_wall = SystemTime::now();
    let mut killed = Instant::now();
    std::thread::scope(|scope| {
        scope.spawn(|| {
            for id in 1..=100_000 {
                if stop.load(Ordering::SeqCst) || Instant::now() > deadline {
                    break;
                }
                let sent = Instant::now();
                let result = psql(
                    lab,
                    writer,
                    &format!("INSERT INTO t VALUES ({id}) RETURNING host(inet_server_addr())"),
                );
                let done = Instant::now();
                let failed = result.is_err();
                attempts.lock().unwrap().push(Attempt {
                    id,
                    sent,
                    done,
                    server: result.ok(),
                });
                if failed {
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        });
        std::thread::sleep(WARM_UP);
        kill_wall = SystemTime::now();
        killed = Instant::now();
        kill();
        let at = killed;
        let back = wait_for("writes again", GIVE_UP_AFTER, || {
            attempts
                .lock()
                .unwrap()
                .iter()
                .find(|a| a.sent > at && a.server.is_some())
                .map(|a| a.done)
        });
        if back.is_ok() {
            std::thread::sleep(Duration::from_secs(1));
        }
        stop.store(true, Ordering::SeqCst);
    });
    let reader_survived = reading.finish();
    let attempts = attempts.into_inner().unwrap();
    let failover = attempts
        .iter()
        .filter(|a| a.sent > killed && a.server.is_some())
        .map(|a| a.done)
        .min()
        .map(|done| done - killed);
    Ok(Measured {
        failover,
        acked: attempts
            .into_iter()
            .filter_map(|a| Some((a.id, a.server?)))
            .collect(),
        reader_survived,
        kill_wall,
    })
}

/// How many acknowledged writes are missing on the server at `ip`.
fn lost_on(lab: &Lab, ip: &str, acked: &[(i32, String)]) -> Result<usize> {
    let rows: std::collections::BTreeSet<i32> = psql(lab, &direct(ip), "SELECT id FROM t")
        .map_err(anyhow::Error::msg)?
        .lines()
        .filter_map(|line| line.parse().ok())
        .collect();
    Ok(acked.iter().filter(|(id, _)| !rows.contains(id)).count())
}

/// The node name of a lab address.
fn node_of(ip: &str) -> String {
    IPS.iter()
        .position(|known| *known == ip)
        .map(|i| NODES[i].to_owned())
        .unwrap_or_else(|| ip.to_owned())
}

/// One psql session kept open on the client, sent `SELECT
/// inet_server_addr()` every 200 ms. Non-interactive psql exits with
/// status 2 when its connection is lost, so the session survived when
/// psql, once its input ends, exits with 0.
struct Reader {
    child: std::process::Child,
    stop: std::sync::Arc<AtomicBool>,
    feeder: std::thread::JoinHandle<()>,
}

impl Reader {
    fn start(lab: &Lab, conninfo: &str) -> Result<Reader> {
        let mut child = lab
            .command(CLIENT, "psql")
            .args(["-X", "-q", "-A", "-t", "-d", conninfo])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting the reader's psql")?;
        let mut stdin = child.stdin.take().context("the reader's stdin")?;
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let feeder = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                use std::io::Write;
                // Bounded: at most 5 minutes of queries.
                for _ in 0..1500 {
                    if stop.load(Ordering::SeqCst)
                        || stdin.write_all(b"SELECT inet_server_addr();\n").is_err()
                    {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(200));
                }
                // Dropping stdin ends psql's input.
            })
        };
        Ok(Reader {
            child,
            stop,
            feeder,
        })
    }

    /// Ends the session's input; true when psql then exits with 0.
    fn finish(mut self) -> bool {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.feeder.join();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => return status.success(),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                _ => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    return false;
                }
            }
        }
    }
}

/// The first occurrence after the kill of each step worth showing, from
/// the agents' log lines (`2026-01-01T12:00:00.123456Z  INFO ...`).
fn steps_after(logs: &str, kill: SystemTime) -> Vec<(f64, String)> {
    let kill_s = kill
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs_f64() % 86_400.0)
        .unwrap_or(0.0);
    // Every needle of a mark must be on the line.
    let marks: [(&[&str], &str); 9] = [
        (&["the postmaster exited"], "agent saw its postmaster exit"),
        (&["primary lease lost"], "lease lost"),
        (
            &["lease promises revoked"],
            "a voter revoked the old primary's lease",
        ),
        (&["made primary"], "failover decision committed"),
        (&["primary lease gained"], "new primary's lease gained"),
        (
            &["promoted", "elapsed="],
            "promoted (pg_promote and checkpoint)",
        ),
        (
            &["role changed", "to=primary", "started as primary"],
            "restarted in place as primary",
        ),
        (
            &["pooler: primary changed"],
            "a pooler moved to the new primary",
        ),
        (&["repointed", "upstream="], "a standby repointed"),
    ];
    let mut node = String::new();
    let mut found: Vec<(f64, String)> = Vec::new();
    for line in logs.lines() {
        if let Some(name) = line.strip_prefix("--- ") {
            node = name.to_owned();
            continue;
        }
        let Some(at) = line.get(11..26).and_then(seconds_of_day) else {
            continue;
        };
        let mut after = at - kill_s;
        if after < -43_200.0 {
            after += 86_400.0;
        }
        if after < 0.0 {
            continue;
        }
        for (needles, what) in marks {
            let label = format!("{what} ({node})");
            if needles.iter().all(|needle| line.contains(needle))
                && !found.iter().any(|(_, l)| *l == label)
            {
                found.push((after, label));
            }
        }
    }
    found.sort_by(|a, b| a.0.total_cmp(&b.0));
    found
}

/// `HH:MM:SS.ffffff` to seconds.
fn seconds_of_day(text: &str) -> Option<f64> {
    let mut parts = text.split(':');
    let hours: f64 = parts.next()?.parse().ok()?;
    let minutes: f64 = parts.next()?.parse().ok()?;
    let seconds: f64 = parts.next()?.trim_end_matches('Z').parse().ok()?;
    Some(hours * 3600.0 + minutes * 60.0 + seconds)
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

/// The three-node cluster file, every timing at its default.
fn cluster_file(dir: &Path, synchronous: bool) -> Result<PathBuf> {
    let mut text = std::fs::read_to_string(lab_config())?.replace(
        "xdp_mode = \"auto\"",
        "xdp_mode = \"auto\"\nsecret = \"lab cluster secret 0123456789\"",
    );
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
synchronous = {synchronous}
replication_password = "lab-secret"
settings = {{ fsync = "off", shared_buffers = "16MB", max_connections = "40" }}
hba = ["host all postgres 192.0.2.0/24 trust", "host all app 192.0.2.0/24 trust"]

[pooler]
listen = "0.0.0.0:6432"
primary = "192.0.2.11:5432"
standbys = ["192.0.2.12:5432", "192.0.2.13:5432"]
read_write_split = true

[[pooler.users]]
name = "app"
secret = "{secret}"
server_password = "{APP_PASSWORD}"

[[pooler.pools]]
database = "postgres"
pool_size = 4
"#,
        dir = dir.display(),
        secret = xtask::postgres::md5_secret("app", APP_PASSWORD)?,
    ));
    let path = dir.join("cluster.toml");
    std::fs::write(&path, text)?;
    Ok(path)
}

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
        Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
    }
}

fn status_code(lab: &Lab, url: &str) -> u16 {
    lab.run(
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
            url,
        ],
    )
    .ok()
    .and_then(|out| String::from_utf8_lossy(&out.stdout).trim().parse().ok())
    .unwrap_or(0)
}

fn direct(ip: &str) -> String {
    format!("host={ip} user=postgres dbname=postgres connect_timeout=2")
}

/// nuster3's pooler (nuster3 survives both deaths).
fn pooled() -> String {
    format!(
        "host=192.0.2.13 port=6432 user=app password={APP_PASSWORD} dbname=postgres connect_timeout=2"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_come_from_log_lines_after_the_kill() {
        assert_eq!(seconds_of_day("12:00:01.5Z"), Some(43_201.5));
        assert_eq!(seconds_of_day("nope"), None);
        let kill = SystemTime::UNIX_EPOCH + Duration::from_secs_f64(43_200.0);
        let logs = "--- nuster1\n\
            1970-01-01T11:59:59.000000Z  INFO x: the postmaster exited node=nuster1\n\
            1970-01-01T12:00:00.250000Z  WARN x: the postmaster exited node=nuster1\n\
            --- nuster2\n\
            1970-01-01T12:00:00.500000Z  INFO x: promoted node=nuster2 elapsed=1ms\n\
            1970-01-01T12:00:00.600000Z  INFO x: promoted again, no elapsed\n";
        let steps = steps_after(logs, kill);
        assert_eq!(steps.len(), 2, "{steps:?}");
        assert!((steps[0].0 - 0.25).abs() < 1e-6);
        assert_eq!(steps[0].1, "agent saw its postmaster exit (nuster1)");
        assert_eq!(steps[1].1, "promoted (pg_promote and checkpoint) (nuster2)");
    }
}
