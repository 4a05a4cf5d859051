//! `cargo xtask bench pooler`: pgbench (scale 10, `-j 2`, bounded `-T`)
//! against PostgreSQL 15 directly, through Farol's pooler in transaction
//! and session mode (the real `agent pooler` binary, release build),
//! through PgBouncer in transaction mode and through pgpool-II, all on the
//! same machine in the same run. Prints TPS, latency and the ratio to
//! direct; writes `target/bench/pooler.json`.
//!
//! Knobs: FAROL_BENCH_SECONDS (default 10), FAROL_BENCH_CLIENTS
//! (default "10,50"), FAROL_BENCH_AGENT (an agent binary to use instead of
//! building one), FAROL_BENCH_BASELINE_AGENT (another agent binary, run
//! as the extra target `farol-baseline-transaction`: before/after a change
//! in the same run), FAROL_BENCH_TARGETS and
//! FAROL_BENCH_WORKLOADS (comma lists of case names, to run a subset),
//! FAROL_BENCH_ROUNDS (default 3, interleaved, median reported), and
//! FAROL_POOLER_THREADS for the agent (default 1: on a saturated 2-core
//! machine a single-threaded runtime measured ~10 % faster than two).

use std::{
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::{
    bench::BenchReport,
    exec,
    postgres::{free_port, PgCluster},
    workspace_root,
};

/// One pgbench outcome: (TPS, average latency ms), or why it failed.
type Outcome = std::result::Result<(f64, f64), String>;
/// (workload and clients, target, outcome) rows of the table.
type Row = (String, String, Outcome);

const USER: &str = "bench";
const PASSWORD: &str = "bench-pw";
const POOL_SIZE: usize = 20;

/// A process stopped by PID (SIGTERM, then SIGKILL) when dropped.
pub struct Proc {
    name: &'static str,
    child: Child,
}

impl Drop for Proc {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child's PID.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("{} did not stop on SIGTERM; killing it", self.name);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_port(port: u16, what: &str) -> Result<()> {
    wait_port_at(None, "127.0.0.1", port, what)
}

/// Waits until something answers PostgreSQL's protocol on `host:port`,
/// from lab namespace `netns` when given.
fn wait_port_at(netns: Option<&str>, host: &str, port: u16, what: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut command = match netns {
            Some(netns) => {
                let mut command = Command::new("nsenter");
                command
                    .arg(format!("--net=/run/netns/{netns}"))
                    .args(["--", "pg_isready"]);
                command
            }
            None => Command::new("pg_isready"),
        };
        let ready = command
            .args(["-q", "-h", host, "-p", &port.to_string(), "-d", "postgres"])
            .status()?;
        // 0 accepting, 1 rejecting (a pooler that refuses the database): up.
        if matches!(ready.code(), Some(0 | 1)) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{what} on {host}:{port} did not come up");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn postgres_ids() -> Result<(u32, u32)> {
    let id = |flag: &str| -> Result<u32> {
        let output = crate::capture(Command::new("id").args([flag, "postgres"]))?;
        Ok(String::from_utf8_lossy(&output.stdout).trim().parse()?)
    };
    Ok((id("-u")?, id("-g")?))
}

fn md5_secret() -> String {
    crate::postgres::md5_secret(USER, PASSWORD).expect("md5sum runs")
}

/// `unix_dir`: the server's socket directory, to reach it through its
/// Unix socket instead of TCP (`pooler.unix_socket_dir`).
/// How one Farol target runs.
#[derive(Default)]
struct FarolSetup<'a> {
    /// `transaction` or `session`.
    mode: &'a str,
    /// `unix_socket_dir`: reach PostgreSQL through its socket.
    unix_dir: Option<&'a Path>,
    /// `listen_socket_dir`: take clients on a socket in this directory.
    listen_socket_dir: Option<&'a Path>,
    /// `read_write_split` with this standby's port.
    standby: Option<u16>,
    /// `kernel_relay`: session bytes relayed in the kernel.
    kernel_relay: bool,
}

fn start_farol(
    dir: &Path,
    agent: &Path,
    primary: u16,
    clients: usize,
    setup: &FarolSetup,
) -> Result<(Proc, u16)> {
    let FarolSetup {
        mode,
        unix_dir,
        listen_socket_dir,
        standby,
        kernel_relay,
    } = *setup;
    let port = free_port()?;
    // A session holds its server connection until it leaves: clients past
    // the pool would wait for the whole run and time out (53300).
    let pool_size = if mode == "session" {
        POOL_SIZE.max(clients)
    } else {
        POOL_SIZE
    };
    let config = dir.join(format!("farol-{mode}-{port}.toml"));
    std::fs::write(
        &config,
        format!(
            r#"[cluster]
name = "bench"

[[node]]
name = "bench"
address = "192.0.2.1/24"
interface = "lo"

[pooler]
listen = "127.0.0.1:{port}"
primary = "127.0.0.1:{primary}"
max_client_conn = 1000
{unix}
[[pooler.users]]
name = "{USER}"
secret = "{secret}"

[[pooler.pools]]
database = "{USER}"
mode = "{mode}"
pool_size = {pool_size}
"#,
            secret = md5_secret(),
            unix = [
                ("unix_socket_dir", unix_dir),
                ("listen_socket_dir", listen_socket_dir)
            ]
            .iter()
            .filter_map(
                |(key, dir)| dir.map(|dir| format!("{key} = {:?}\n", dir.display().to_string()))
            )
            .chain(standby.map(|port| {
                format!("standbys = [\"127.0.0.1:{port}\"]\nread_write_split = true\n")
            }))
            .chain(kernel_relay.then(|| "kernel_relay = true\n".to_owned()))
            .collect::<String>(),
        ),
    )?;
    let log = std::fs::File::create(dir.join(format!("farol-{mode}-{port}.log")))?;
    let child = Command::new(agent)
        .args(["pooler", "--config"])
        .arg(&config)
        .env("FAROL_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .context("starting agent pooler")?;
    let proc = Proc {
        name: "agent pooler",
        child,
    };
    wait_port(port, "agent pooler")?;
    Ok((proc, port))
}

/// `host`: 127.0.0.1, or the server's socket directory (libpq's
/// `host=/DIR`) to reach it through its Unix socket.
/// `listen_socket`: also take clients on `dir`'s Unix socket.
fn start_pgbouncer(
    dir: &Path,
    primary: u16,
    host: &str,
    listen_socket: bool,
) -> Result<(Proc, u16)> {
    let port = free_port()?;
    let (uid, gid) = postgres_ids()?;
    let ini = dir.join(format!("pgbouncer-{port}.ini"));
    std::fs::write(
        dir.join("userlist.txt"),
        format!("\"{USER}\" \"{}\"\n", md5_secret()),
    )?;
    std::fs::write(
        &ini,
        format!(
            "[databases]\n{USER} = host={host} port={primary} dbname={USER}\n\n\
             [pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\n\
             unix_socket_dir = {}\nauth_type = md5\nauth_file = {}\n\
             pool_mode = transaction\ndefault_pool_size = {POOL_SIZE}\nmax_client_conn = 1000\n\
             logfile = {}\npidfile = {}\n",
            if listen_socket {
                dir.display().to_string()
            } else {
                String::new()
            },
            dir.join("userlist.txt").display(),
            dir.join(format!("pgbouncer-{port}.log")).display(),
            dir.join(format!("pgbouncer-{port}.pid")).display(),
        ),
    )?;
    let child = Command::new("pgbouncer")
        .arg(&ini)
        .uid(uid)
        .gid(gid)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting pgbouncer (apt-get install pgbouncer)")?;
    let proc = Proc {
        name: "pgbouncer",
        child,
    };
    wait_port(port, "pgbouncer")?;
    Ok((proc, port))
}

/// HAProxy in `mode tcp`: a relay that only copies bytes, no protocol
/// work at all, so its ratio to direct is what any separate proxy process
/// can reach on this machine (the floor under every pooler's cost).
fn start_haproxy_relay(dir: &Path, primary: u16) -> Result<(Proc, u16)> {
    let port = free_port()?;
    let config = dir.join(format!("haproxy-{port}.cfg"));
    std::fs::write(
        &config,
        format!(
            "global\n    maxconn 4000\n\n\
             defaults\n    mode tcp\n    timeout connect 5s\n    timeout client 120s\n\
             \x20   timeout server 120s\n\n\
             listen relay\n    bind 127.0.0.1:{port}\n    server primary 127.0.0.1:{primary}\n"
        ),
    )?;
    let child = Command::new("haproxy")
        .args(["-db", "-f"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(
            dir.join(format!("haproxy-{port}.log")),
        )?)
        .spawn()
        .context("starting haproxy (apt-get install haproxy)")?;
    let proc = Proc {
        name: "haproxy",
        child,
    };
    wait_port(port, "haproxy")?;
    Ok((proc, port))
}

fn start_pgpool(dir: &Path, primary: u16, clients: usize) -> Result<(Proc, u16)> {
    start_pgpool_with(
        dir,
        &PgpoolSetup {
            netns: None,
            listen: "127.0.0.1",
            backends: &[("127.0.0.1", primary, "ALWAYS_PRIMARY", 1)],
            children: clients.max(32),
            extra: "load_balance_mode = off\nsr_check_period = 0\nhealth_check_period = 0\n\
                    log_min_messages = warning\n",
        },
    )
}

/// pgpool-II balancing reads over the primary and the standby (weights
/// 0 and 1: every read on the standby, as Farol's split sends them).
fn start_pgpool_split(
    dir: &Path,
    primary: u16,
    standby: u16,
    clients: usize,
) -> Result<(Proc, u16)> {
    let dir = dir.join("pgpool-split");
    std::fs::create_dir_all(&dir)?;
    let (uid, gid) = postgres_ids()?;
    std::os::unix::fs::chown(&dir, Some(uid), Some(gid))?;
    start_pgpool_with(
        &dir,
        &PgpoolSetup {
            netns: None,
            listen: "127.0.0.1",
            backends: &[
                ("127.0.0.1", primary, "ALWAYS_PRIMARY", 0),
                ("127.0.0.1", standby, "DISALLOW_TO_FAILOVER", 1),
            ],
            children: clients.max(32),
            extra: "load_balance_mode = on\nsr_check_period = 0\nhealth_check_period = 0\n\
                    log_min_messages = warning\n",
        },
    )
}

/// Where and in front of which servers a pgpool-II runs.
pub struct PgpoolSetup<'a> {
    /// A lab namespace (pgpool runs there), else the host.
    pub netns: Option<&'a str>,
    /// The address pgpool listens on (its port is picked free).
    pub listen: &'a str,
    /// (host, port, backend_flag, backend_weight), backend 0 first.
    pub backends: &'a [(&'a str, u16, &'a str, u32)],
    /// `num_init_children`: at most this many clients at once.
    pub children: usize,
    /// More `pgpool.conf` lines (health checks, failover, load balancing).
    pub extra: &'a str,
}

/// pgpool-II as the postgres user in streaming-replication mode, no pool
/// hba, its files in `dir`, logging to `dir/pgpool.log`.
pub fn start_pgpool_with(dir: &Path, setup: &PgpoolSetup) -> Result<(Proc, u16)> {
    let port = free_port()?;
    let pcp_port = free_port()?;
    let (uid, gid) = postgres_ids()?;
    let conf = dir.join("pgpool.conf");
    let run = dir.join("pgpool-run");
    std::fs::create_dir_all(&run)?;
    std::os::unix::fs::chown(&run, Some(uid), Some(gid))?;
    let mut backends = String::new();
    for (index, (host, backend_port, flag, weight)) in setup.backends.iter().enumerate() {
        backends.push_str(&format!(
            "backend_hostname{index} = '{host}'\nbackend_port{index} = {backend_port}\n\
             backend_weight{index} = {weight}\nbackend_flag{index} = '{flag}'\n"
        ));
    }
    std::fs::write(
        &conf,
        format!(
            "backend_clustering_mode = 'streaming_replication'\n\
             listen_addresses = '{listen}'\nport = {port}\n\
             socket_dir = '{run}'\npcp_listen_addresses = ''\npcp_port = {pcp_port}\npcp_socket_dir = '{run}'\n\
             {backends}\
             enable_pool_hba = off\nnum_init_children = {children}\nmax_pool = 1\n\
             connection_cache = on\n\
             pid_file_name = '{run}/pgpool.pid'\nlogdir = '{run}'\n{extra}",
            listen = setup.listen,
            run = run.display(),
            children = setup.children,
            extra = setup.extra,
        ),
    )?;
    let mut command = match setup.netns {
        Some(netns) => {
            // nsenter enters the namespace as root, drops to postgres and
            // execs: the child's PID is pgpool's.
            let mut command = Command::new("nsenter");
            command
                .arg(format!("--net=/run/netns/{netns}"))
                .args(["--setuid", &uid.to_string(), "--setgid", &gid.to_string()])
                .args(["--", "pgpool"]);
            command
        }
        None => {
            let mut command = Command::new("pgpool");
            command.uid(uid).gid(gid);
            command
        }
    };
    let child = command
        .args(["-n", "-f"])
        .arg(&conf)
        .args(["-F", "/dev/null"])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("pgpool.log"))?)
        .spawn()
        .context("starting pgpool (apt-get install pgpool2)")?;
    let proc = Proc {
        name: "pgpool",
        child,
    };
    wait_port_at(setup.netns, setup.listen, port, "pgpool")?;
    Ok((proc, port))
}

/// Every target, in the order they run. `-unix`: the pooler reaches
/// PostgreSQL through its Unix socket. `-socket`: pgbench reaches the
/// target through a Unix socket too (compared with `direct-socket`,
/// PostgreSQL's own socket). `-split`: read/write split with a streaming
/// standby taking the reads (pgpool-II: `load_balance_mode`).
/// `-kernel`: session bytes relayed in the kernel (`kernel_relay`).
const TARGETS: [&str; 15] = [
    "direct",
    "farol-transaction",
    "farol-transaction-unix",
    "farol-baseline-transaction",
    "farol-session",
    "farol-session-kernel",
    "pgbouncer-transaction",
    "pgbouncer-transaction-unix",
    "pgpool",
    "haproxy-tcp",
    "direct-socket",
    "farol-transaction-socket",
    "pgbouncer-transaction-socket",
    "farol-transaction-split",
    "pgpool-split",
];

/// FAROL_BENCH_TARGETS / FAROL_BENCH_WORKLOADS: comma lists to run a
/// subset; everything when unset.
fn selected(var: &str, name: &str) -> bool {
    std::env::var(var)
        .map(|list| list.split(',').any(|item| item.trim() == name))
        .unwrap_or(true)
}

/// A started process and its port, as a target's.
fn some((proc, port): (Proc, u16)) -> (Option<Proc>, u16) {
    (Some(proc), port)
}

/// One pgbench run: TPS and average latency (ms), or why it failed.
/// `host`: 127.0.0.1, or a socket directory (`-h DIR`, libpq's rule).
fn pgbench(host: &str, port: u16, args: &[&str], seconds: u64) -> Outcome {
    let output = Command::new("pgbench")
        .args([
            "-h",
            host,
            "-p",
            &port.to_string(),
            "-U",
            USER,
            "-n",
            "-T",
            &seconds.to_string(),
        ])
        .args(args)
        .arg(USER)
        .env("PGPASSWORD", PASSWORD)
        .output()
        .map_err(|error| format!("pgbench: {error}"))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let find = |prefix: &str| {
        stdout
            .lines()
            .find_map(|line| line.strip_prefix(prefix))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|value| value.parse::<f64>().ok())
    };
    let failed = stdout.contains("aborted") || !output.status.success();
    match (find("tps = "), find("latency average = ")) {
        (Some(tps), Some(latency)) if !failed => Ok((tps, latency)),
        _ => {
            let stderr = String::from_utf8_lossy(&output.stderr);
            // The first client error says why; the last line only that
            // the run was aborted.
            let why = stderr
                .lines()
                .find(|l| l.contains("error") && !l.contains("Run was aborted"))
                .or_else(|| stderr.lines().rev().find(|l| !l.trim().is_empty()))
                .unwrap_or("no output");
            Err(why.trim().chars().take(90).collect())
        }
    }
}

pub fn run() -> Result<BenchReport> {
    if !crate::is_root() {
        bail!("bench pooler runs PostgreSQL, PgBouncer and pgpool-II as the postgres user: run it as root");
    }
    let seconds: u64 = std::env::var("FAROL_BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let client_counts: Vec<usize> = std::env::var("FAROL_BENCH_CLIENTS")
        .unwrap_or_else(|_| "10,50".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let agent = match std::env::var_os("FAROL_BENCH_AGENT") {
        Some(path) => PathBuf::from(path),
        None => {
            exec(Command::new("cargo").current_dir(workspace_root()).args([
                "build",
                "--release",
                "--quiet",
                "-p",
                "farol-agent",
                "--bin",
                "agent",
            ]))?;
            workspace_root().join("target/release/agent")
        }
    };
    let baseline = std::env::var_os("FAROL_BENCH_BASELINE_AGENT").map(PathBuf::from);

    println!("starting PostgreSQL 15 (scale 10)...");
    // Every target holds its own server connections at once (up to 50 per
    // pooler, plus pgpool's children and the relay's): 200 would refuse
    // direct's clients at -c 50.
    // The `-split` targets send reads to a streaming standby.
    let split = TARGETS
        .iter()
        .any(|t| t.ends_with("-split") && selected("FAROL_BENCH_TARGETS", t));
    let pg = PgCluster::start_with("bench", split, &["-c", "max_connections=800"])?;
    pg.primary
        .psql("postgres", &format!("CREATE ROLE {USER} LOGIN"))?;
    pg.primary
        .psql("postgres", &format!("CREATE DATABASE {USER} OWNER {USER}"))?;
    exec(
        Command::new("pgbench")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &pg.primary.port.to_string(),
                "-U",
                USER,
                "-i",
                "-q",
                "-s",
                "10",
                USER,
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    )?;
    pg.wait_standby_caught_up()?;
    let dir: PathBuf =
        std::env::temp_dir().join(format!("farol-bench-pooler-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let (uid, gid) = postgres_ids()?;
    std::os::unix::fs::chown(&dir, Some(uid), Some(gid))?;

    let workloads: [(&str, Vec<&str>); 5] = [
        ("tpcb-simple", vec!["-M", "simple"]),
        ("select-simple", vec!["-S", "-M", "simple"]),
        ("select-extended", vec!["-S", "-M", "extended"]),
        ("select-prepared", vec!["-S", "-M", "prepared"]),
        ("churn-select", vec!["-S", "-M", "simple", "-C"]),
    ];
    let mut report = BenchReport::new("pooler");
    let mut table: Vec<Row> = Vec::new();
    let rounds: usize = std::env::var("FAROL_BENCH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    for &clients in &client_counts {
        // Every target runs at once (idle ones cost nothing) so the rounds
        // can interleave them: the machine's load drifts, and each case
        // sees the same drift. The median round is reported.
        let socket_dir = pg.primary.data.as_path();
        let primary = pg.primary.port;
        let loopback = "127.0.0.1".to_owned();
        // (name, host for pgbench, port, the process).
        let mut targets: Vec<(&str, String, u16, Option<Proc>)> = Vec::new();
        let standby = pg.standby.as_ref().map(|standby| standby.port);
        for target in TARGETS
            .into_iter()
            .filter(|t| selected("FAROL_BENCH_TARGETS", t))
        {
            let farol = |agent: &Path, setup: FarolSetup| {
                start_farol(&dir, agent, primary, clients, &setup)
            };
            let transaction = FarolSetup {
                mode: "transaction",
                ..FarolSetup::default()
            };
            let started = match target {
                "direct" => Ok((None, primary)),
                "direct-socket" => Ok((None, primary)),
                "farol-transaction" => farol(&agent, transaction).map(some),
                "farol-transaction-unix" => farol(
                    &agent,
                    FarolSetup {
                        unix_dir: Some(socket_dir),
                        ..transaction
                    },
                )
                .map(some),
                "farol-transaction-socket" => farol(
                    &agent,
                    FarolSetup {
                        unix_dir: Some(socket_dir),
                        listen_socket_dir: Some(&dir),
                        ..transaction
                    },
                )
                .map(some),
                "farol-transaction-split" => farol(
                    &agent,
                    FarolSetup {
                        standby,
                        ..transaction
                    },
                )
                .map(some),
                "farol-baseline-transaction" => match &baseline {
                    Some(baseline) => farol(baseline, transaction).map(some),
                    None => continue,
                },
                "farol-session" => farol(
                    &agent,
                    FarolSetup {
                        mode: "session",
                        ..FarolSetup::default()
                    },
                )
                .map(some),
                "farol-session-kernel" => farol(
                    &agent,
                    FarolSetup {
                        mode: "session",
                        kernel_relay: true,
                        ..FarolSetup::default()
                    },
                )
                .map(some),
                "pgbouncer-transaction" => {
                    start_pgbouncer(&dir, primary, "127.0.0.1", false).map(some)
                }
                "pgbouncer-transaction-unix" => {
                    start_pgbouncer(&dir, primary, &socket_dir.display().to_string(), false)
                        .map(some)
                }
                "pgbouncer-transaction-socket" => {
                    start_pgbouncer(&dir, primary, &socket_dir.display().to_string(), true)
                        .map(some)
                }
                "haproxy-tcp" => start_haproxy_relay(&dir, primary).map(some),
                "pgpool-split" => match standby {
                    Some(standby) => start_pgpool_split(&dir, primary, standby, clients).map(some),
                    None => continue,
                },
                _ => start_pgpool(&dir, primary, clients).map(some),
            };
            let host = match target {
                "direct-socket" => socket_dir.display().to_string(),
                t if t.ends_with("-socket") => dir.display().to_string(),
                _ => loopback.clone(),
            };
            match started {
                Ok((proc, port)) => targets.push((target, host, port, proc)),
                Err(error) => println!("{target}: cannot start: {error:#}"),
            }
        }
        for (workload, args) in workloads
            .iter()
            .filter(|(w, _)| selected("FAROL_BENCH_WORKLOADS", w))
        {
            let clients_text = clients.to_string();
            let mut full: Vec<&str> = args.clone();
            // Churn: one pgbench thread per client (PEERS.md).
            let threads = if full.contains(&"-C") {
                clients_text.clone()
            } else {
                "2".into()
            };
            full.extend(["-c", &clients_text, "-j", &threads]);
            let mut outcomes: Vec<Vec<Outcome>> = vec![Vec::new(); targets.len()];
            // CPU time of the pooler process per transaction (µs), where
            // one process does all the work (not pgpool's children).
            let mut cpu: Vec<Vec<f64>> = vec![Vec::new(); targets.len()];
            // Context switches of its main thread per transaction.
            let mut switches: Vec<Vec<f64>> = vec![Vec::new(); targets.len()];
            for _ in 0..rounds {
                for (index, (target, host, port, proc)) in targets.iter().enumerate() {
                    let pid = proc
                        .as_ref()
                        .filter(|_| *target != "pgpool")
                        .map(|proc| proc.child.id());
                    let before = pid.and_then(cpu_ticks);
                    let switches_before = pid.and_then(context_switches);
                    let started = Instant::now();
                    let outcome = pgbench(host, *port, &full, seconds);
                    let elapsed = started.elapsed().as_secs_f64();
                    if let (Some(before), Some(after), Ok((tps, _))) =
                        (before, pid.and_then(cpu_ticks), &outcome)
                    {
                        let transactions = tps * elapsed;
                        if let (Some(first), Some(last)) =
                            (switches_before, pid.and_then(context_switches))
                        {
                            if transactions > 0.0 {
                                switches[index].push((last - first) as f64 / transactions);
                            }
                        }
                        if transactions > 0.0 {
                            cpu[index].push(
                                (after - before) as f64 * 1e6 / ticks_per_second() / transactions,
                            );
                        }
                    }
                    outcomes[index].push(outcome);
                }
            }
            for ((((target, _, _, _), runs), mut cpu), mut switches) in
                targets.iter().zip(outcomes).zip(cpu).zip(switches)
            {
                cpu.sort_by(f64::total_cmp);
                let cpu_us = cpu.get(cpu.len() / 2).copied();
                switches.sort_by(f64::total_cmp);
                let switches_per_tx = switches.get(switches.len() / 2).copied();
                let case = if clients == 10 {
                    format!("{target}-{workload}")
                } else {
                    format!("{target}-{workload}-c{clients}")
                };
                let result = median(runs);
                match &result {
                    Ok((tps, latency)) => {
                        let cpu_text = cpu_us
                            .map(|us| format!(" {us:>7.1} µs CPU/tx"))
                            .unwrap_or_default();
                        let cpu_text = match switches_per_tx {
                            Some(n) => format!("{cpu_text} {n:>5.2} switches/tx"),
                            None => cpu_text,
                        };
                        println!("{case:48} {tps:>10.0} tps {latency:>8.3} ms{cpu_text}");
                        report.push(&case, "tps", *tps, "1/s");
                        report.push(&case, "latency", *latency, "ms");
                        if let Some(us) = cpu_us {
                            report.push(&case, "cpu_per_transaction", us, "us");
                        }
                        if let Some(n) = switches_per_tx {
                            report.push(&case, "context_switches_per_transaction", n, "1");
                        }
                    }
                    Err(why) => println!("{case:48} fails: {why}"),
                }
                table.push((
                    format!("{workload} -c {clients}"),
                    (*target).to_owned(),
                    result,
                ));
            }
        }
        drop(targets);
    }
    print_table(&table);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(report)
}

/// utime + stime of a process, in clock ticks (/proc/PID/stat).
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which may hold spaces: ") state ...".
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line.
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

/// Voluntary plus involuntary context switches of a process's main
/// thread (/proc/PID/status).
fn context_switches(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let mut total = 0;
    for line in status.lines() {
        if let Some(value) = line
            .strip_prefix("voluntary_ctxt_switches:")
            .or_else(|| line.strip_prefix("nonvoluntary_ctxt_switches:"))
        {
            total += value.trim().parse::<u64>().ok()?;
        }
    }
    Some(total)
}

fn ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 {
        ticks as f64
    } else {
        100.0
    }
}

/// The median TPS round (with its latency); any failed round fails the case.
fn median(runs: Vec<Outcome>) -> Outcome {
    let mut ok = Vec::new();
    for run in runs {
        ok.push(run?);
    }
    ok.sort_by(|a, b| a.0.total_cmp(&b.0));
    ok.get(ok.len() / 2)
        .copied()
        .ok_or_else(|| "no rounds".to_owned())
}

fn print_table(rows: &[Row]) {
    let mut workloads: Vec<&str> = Vec::new();
    let mut targets: Vec<&str> = Vec::new();
    for (workload, target, _) in rows {
        if !workloads.contains(&workload.as_str()) {
            workloads.push(workload);
        }
        if !targets.contains(&target.as_str()) {
            targets.push(target);
        }
    }
    println!(
        "\npgbench TPS (ratio to direct; -socket targets to direct-socket), average latency ms; scale 10, -j 2 (churn: -j = -c)"
    );
    print!("{:24}", "workload");
    for target in &targets {
        print!(" | {target:>26}");
    }
    println!();
    for workload in &workloads {
        let get = |target: &str| {
            rows.iter()
                .find(|(w, t, _)| w == workload && t == target)
                .map(|(_, _, r)| r)
        };
        let tps_of = |target: &str| {
            get(target)
                .and_then(|r| r.as_ref().ok())
                .map(|(tps, _)| *tps)
        };
        print!("{workload:24}");
        for target in &targets {
            // Socket clients are compared with PostgreSQL's own socket.
            let direct = if target.ends_with("-socket") {
                tps_of("direct-socket")
            } else {
                tps_of("direct")
            };
            let cell = match get(target) {
                Some(Ok((tps, latency))) => match direct {
                    Some(direct) if direct > 0.0 => {
                        format!("{tps:.0} ({:.2}x) {latency:.2}ms", tps / direct)
                    }
                    _ => format!("{tps:.0} {latency:.2}ms"),
                },
                Some(Err(_)) => "fails".into(),
                None => "-".into(),
            };
            print!(" | {cell:>26}");
        }
        println!();
    }
}
