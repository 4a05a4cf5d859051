//! `cargo xtask bench failover`: how long clients lose the VIP when its
//! holder dies, Farol's VRRP pair against keepalived + HAProxy, in one run
//! on the lab. nuster1 (priority 150) and nuster2 (100) are the balancers,
//! web servers run on nuster3 and nuster4.
//!
//! Each case gets a fresh lab. A client polls the VIP with a new HTTP
//! connection every 10 ms (each probe gives up after 0.5 s), holds one
//! keep-alive connection, and watches for gratuitous ARPs; then the master
//! dies:
//! - `crash`: its link goes down, then its processes get SIGKILL (a
//!   killed agent alone leaves its XDP program serving, and a killed
//!   keepalived leaves its VIP: only the node's death takes the path away);
//! - `clean`: SIGTERM (the master sends priority 0).
//!
//! Measured from the instant before the link goes down (or the SIGTERM):
//! the first gratuitous ARP from nuster2 at the client (takeover), the
//! first successful response among probes started after the link went
//! down, the probes that failed, and whether the keep-alive connection
//! lived on. Cases with 10 ms adverts run three times (medians; the
//! connection counts as surviving only if it survived all three).

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use xtask::{
    bench::BenchReport,
    exec,
    lab::{lab_config, wait_for, Lab, LabGuard, LabProcess, CLIENT},
    toolchain, workspace_root,
};

const VIP: &str = "192.0.2.100";
const BACKENDS: [&str; 2] = ["nuster3", "nuster4"];
const MASTER: &str = "nuster1";
const BACKUP: &str = "nuster2";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pair {
    Farol,
    Keepalived,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    Crash,
    Clean,
}

#[derive(Debug, Clone, Copy)]
struct Case {
    pair: Pair,
    /// Advertisement interval in milliseconds.
    interval_ms: u64,
    stop: Stop,
}

impl Case {
    fn name(&self) -> String {
        let pair = match self.pair {
            Pair::Farol => "farol",
            Pair::Keepalived => "keepalived-haproxy",
        };
        let interval = if self.interval_ms >= 1000 {
            format!("{}s", self.interval_ms / 1000)
        } else {
            format!("{}ms", self.interval_ms)
        };
        let stop = match self.stop {
            Stop::Crash => "crash",
            Stop::Clean => "clean-stop",
        };
        format!("{pair}-{interval}-{stop}")
    }

    /// How long the client polls: the master-down interval and slack.
    fn poll_seconds(&self) -> f64 {
        if self.interval_ms >= 1000 {
            7.0
        } else {
            2.5
        }
    }
}

#[derive(Debug, Default)]
struct Outcome {
    takeover_ms: Option<f64>,
    first_response_ms: Option<f64>,
    failed_probes: u32,
    probes: u32,
    survived: bool,
}

pub(crate) fn run() -> Result<BenchReport> {
    if !xtask::is_root() {
        bail!("bench failover builds a namespace lab: run it as root");
    }
    toolchain::ensure_packages(&[
        ("keepalived", "the peer VRRP daemon"),
        ("haproxy", "the peer balancer behind keepalived"),
    ])?;
    toolchain::build_ebpf()?;
    println!("bench failover: building the agent (release)");
    exec(Command::new("cargo").current_dir(workspace_root()).args([
        "build",
        "--quiet",
        "--release",
        "-p",
        "farol-agent",
        "--bin",
        "agent",
    ]))?;
    let agent = workspace_root().join("target/release/agent");
    let work = std::env::temp_dir().join(format!("farol-bench-failover-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    let cases = [
        Case {
            pair: Pair::Farol,
            interval_ms: 10,
            stop: Stop::Crash,
        },
        Case {
            pair: Pair::Keepalived,
            interval_ms: 10,
            stop: Stop::Crash,
        },
        Case {
            pair: Pair::Farol,
            interval_ms: 10,
            stop: Stop::Clean,
        },
        Case {
            pair: Pair::Keepalived,
            interval_ms: 10,
            stop: Stop::Clean,
        },
        Case {
            pair: Pair::Farol,
            interval_ms: 1000,
            stop: Stop::Crash,
        },
        Case {
            pair: Pair::Keepalived,
            interval_ms: 1000,
            stop: Stop::Crash,
        },
    ];
    let mut report = BenchReport::new("failover");
    let mut rows = Vec::new();
    // FAROL_BENCH_CASES=farol-10ms runs only the cases whose name contains it.
    let only = std::env::var("FAROL_BENCH_CASES").unwrap_or_default();
    for case in cases.into_iter().filter(|case| case.name().contains(&only)) {
        // 10 ms cases are short and noisy: the median of three runs.
        let runs = if case.interval_ms < 1000 { 3 } else { 1 };
        let mut outcomes = Vec::new();
        for run in 1..=runs {
            println!("bench failover: {} (run {run} of {runs})", case.name());
            outcomes.push(
                run_case(&agent, &work, case).with_context(|| format!("case {}", case.name()))?,
            );
        }
        rows.push((case, median(&outcomes)));
    }
    let _ = std::fs::remove_dir_all(&work);

    let ms = |value: Option<f64>| value.map_or("-".to_owned(), |v| format!("{v:.1}"));
    println!(
        "\n{:<34} {:>12} {:>16} {:>14} {:>12}",
        "case", "takeover ms", "first resp. ms", "failed probes", "conn. lives"
    );
    for (case, outcome) in &rows {
        println!(
            "{:<34} {:>12} {:>16} {:>8} of {:<3} {:>12}",
            case.name(),
            ms(outcome.takeover_ms),
            ms(outcome.first_response_ms),
            outcome.failed_probes,
            outcome.probes,
            if outcome.survived { "yes" } else { "no" }
        );
        let name = case.name();
        if let Some(value) = outcome.takeover_ms {
            report.push(&name, "takeover", value, "ms");
        }
        if let Some(value) = outcome.first_response_ms {
            report.push(&name, "first_response", value, "ms");
        }
        report.push(
            &name,
            "failed_probes",
            f64::from(outcome.failed_probes),
            "count",
        );
        report.push(
            &name,
            "connection_survived",
            f64::from(u8::from(outcome.survived)),
            "bool",
        );
    }
    for (interval, stop) in [(10, Stop::Crash), (10, Stop::Clean), (1000, Stop::Crash)] {
        let find = |pair| {
            rows.iter()
                .find(|(c, _)| c.pair == pair && c.interval_ms == interval && c.stop == stop)
                .map(|(_, o)| o)
        };
        if let (Some(farol), Some(peer)) = (find(Pair::Farol), find(Pair::Keepalived)) {
            let metric = if stop == Stop::Crash {
                (farol.first_response_ms, peer.first_response_ms)
            } else {
                (farol.takeover_ms, peer.takeover_ms)
            };
            if let (Some(f), Some(p)) = metric {
                let label = if stop == Stop::Crash {
                    "first response"
                } else {
                    "takeover"
                };
                println!(
                    "farol / keepalived, {interval} ms adverts, {stop:?}, {label}: {:.2}x",
                    f / p
                );
                let case = Case {
                    pair: Pair::Farol,
                    interval_ms: interval,
                    stop,
                };
                report.push(&case.name(), "ratio_to_keepalived", f / p, "x");
            }
        }
    }
    Ok(report)
}

/// Medians of the times and of the failed probes; the connection counts
/// as surviving only if it survived every run.
fn median(outcomes: &[Outcome]) -> Outcome {
    let middle = |mut values: Vec<f64>| -> Option<f64> {
        values.sort_by(f64::total_cmp);
        values.get(values.len() / 2).copied()
    };
    Outcome {
        takeover_ms: middle(outcomes.iter().filter_map(|o| o.takeover_ms).collect()),
        first_response_ms: middle(
            outcomes
                .iter()
                .filter_map(|o| o.first_response_ms)
                .collect(),
        ),
        failed_probes: middle(
            outcomes
                .iter()
                .map(|o| f64::from(o.failed_probes))
                .collect(),
        )
        .unwrap_or_default() as u32,
        probes: outcomes.first().map_or(0, |o| o.probes),
        survived: outcomes.iter().all(|o| o.survived),
    }
}

fn run_case(agent: &Path, work: &Path, case: Case) -> Result<Outcome> {
    let dir = work.join(case.name());
    std::fs::create_dir_all(&dir)?;
    let lab = LabGuard::up(Lab::new("bfail")?)?;
    let mut processes = Vec::new();
    for node in BACKENDS {
        processes.push(start_web(&lab, node, &dir)?);
    }
    let mut master_processes = match case.pair {
        Pair::Farol => start_farol(&lab, agent, &dir, case, &mut processes)?,
        Pair::Keepalived => start_keepalived_pair(&lab, &dir, case, &mut processes)?,
    };
    wait_for("HTTP through the VIP", Duration::from_secs(30), || {
        http_ok(&lab).then_some(())
    })?;
    let backup_mac = mac(&lab, BACKUP)?;

    let keepalive_script = dir.join("keepalive.py");
    std::fs::write(&keepalive_script, xtask::lab::KEEPALIVE_CLIENT)?;
    let total = case.poll_seconds() + 1.0;
    let mut long_lived = lab.spawn(
        CLIENT,
        lab.command(CLIENT, "python3")
            .arg(&keepalive_script)
            // A request may wait 10 s, longer than any failover here: what
            // ends the connection is a reset, not impatience.
            .args([VIP, &format!("{total}"), "10"])
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(dir.join("keepalive.err"))?),
        "keep-alive client",
    )?;
    let poller_script = dir.join("poller.py");
    std::fs::write(&poller_script, POLLER)?;
    let mut poller = lab.spawn(
        CLIENT,
        lab.command(CLIENT, "python3")
            .arg(&poller_script)
            .args([VIP, &format!("{}", case.poll_seconds()), &backup_mac])
            .stdout(Stdio::piped())
            .stderr(Stdio::null()),
        "poller",
    )?;
    std::thread::sleep(Duration::from_millis(600));

    let before = monotonic_s();
    let after;
    match case.stop {
        Stop::Crash => {
            capture_ok(Command::new("ip").args([
                "-n",
                &lab.netns("lan"),
                "link",
                "set",
                MASTER,
                "down",
            ]))?;
            after = monotonic_s();
            for process in &mut master_processes {
                kill(process.pid() as i32, libc::SIGKILL);
            }
            // keepalived's VRRP child: a SIGKILL of the parent alone would
            // be a graceful handover.
            if case.pair == Pair::Keepalived {
                if let Ok(pid) = std::fs::read_to_string(dir.join("nuster1-vrrp.pid")) {
                    if let Ok(pid) = pid.trim().parse() {
                        kill(pid, libc::SIGKILL);
                    }
                }
            }
        }
        Stop::Clean => {
            for process in &mut master_processes {
                kill(process.pid() as i32, libc::SIGTERM);
            }
            after = before;
        }
    }
    let poll = wait_child_output(&mut poller, Duration::from_secs(30))?;
    let keepalive = wait_child_output(&mut long_lived, Duration::from_secs(40))?;
    drop(master_processes);
    drop(processes);

    let result: serde_json::Value =
        serde_json::from_str(poll.trim()).with_context(|| format!("poller output: {poll}"))?;
    let probes = result["probes"].as_array().context("probes")?;
    let mut outcome = Outcome::default();
    let mut failures = Vec::new();
    for probe in probes {
        let start = probe[0].as_f64().unwrap_or_default();
        let end = probe[1].as_f64().unwrap_or_default();
        let ok = probe[2].as_bool().unwrap_or(false);
        outcome.probes += 1;
        if !ok {
            outcome.failed_probes += 1;
            failures.push(format!("{:.0}", (start - before) * 1000.0));
        }
        if ok && start >= after && case.stop == Stop::Crash {
            let ms = (end - before) * 1000.0;
            outcome.first_response_ms =
                Some(outcome.first_response_ms.map_or(ms, |m: f64| m.min(ms)));
        }
    }
    outcome.takeover_ms = result["garps"]
        .as_array()
        .context("garps")?
        .iter()
        .filter_map(serde_json::Value::as_f64)
        .filter(|&at| at >= before)
        .map(|at| (at - before) * 1000.0)
        .reduce(f64::min);
    let fields: Vec<&str> = keepalive.split_whitespace().collect();
    outcome.survived = fields.get(1) == Some(&"0") && fields.get(2) == Some(&"1");
    println!(
        "  takeover {:?} ms, first response {:?} ms, failed {}/{}, keep-alive connection: {}",
        outcome.takeover_ms.map(|v| (v * 10.0).round() / 10.0),
        outcome.first_response_ms.map(|v| (v * 10.0).round() / 10.0),
        outcome.failed_probes,
        outcome.probes,
        keepalive.trim()
    );
    if !failures.is_empty() {
        let shown = failures.len().min(12);
        println!(
            "  failed probes started at (ms from the stop): {}{}",
            failures[..shown].join(" "),
            if failures.len() > shown { " ..." } else { "" }
        );
    }
    let errors = std::fs::read_to_string(dir.join("keepalive.err")).unwrap_or_default();
    if !errors.trim().is_empty() {
        println!(
            "  keep-alive client: {}",
            errors.trim().replace('\n', " | ")
        );
    }
    Ok(outcome)
}

fn start_web(lab: &Lab, node: &str, dir: &Path) -> Result<LabProcess> {
    let root = dir.join(format!("www-{node}"));
    std::fs::create_dir_all(&root)?;
    std::fs::write(root.join("index.html"), format!("{node}\n"))?;
    let process = lab.spawn_static_web(node, &root)?;
    let url = format!("http://{}/", lab.node(node)?.ip());
    wait_for(&format!("web on {node}"), Duration::from_secs(10), || {
        lab.run(CLIENT, "curl", &["-sf", "--max-time", "1", &url])
            .ok()
            .filter(|o| o.status.success())
    })?;
    Ok(process)
}

/// Agents on all four nodes; returns the master's agent.
fn start_farol(
    lab: &Lab,
    agent: &Path,
    dir: &Path,
    case: Case,
    others: &mut Vec<LabProcess>,
) -> Result<Vec<LabProcess>> {
    let text = std::fs::read_to_string(lab_config())?;
    let nodes = text.split("[[service]]").next().unwrap_or(&text);
    let backends: Vec<String> = BACKENDS
        .iter()
        .map(|n| format!("{{ node = \"{n}\" }}"))
        .collect();
    let config: PathBuf = dir.join("failover.toml");
    std::fs::write(
        &config,
        format!(
            "{nodes}\n[[service]]\nname = \"web\"\nvip = \"{VIP}\"\nport = 80\nscheduler = \"maglev\"\n\
             forwarding = \"dsr\"\nbackends = [{}]\n\n[[vrrp]]\nname = \"web\"\nvrid = 51\n\
             priority = {{ {MASTER} = 150, {BACKUP} = 100 }}\nadvert_interval = \"{}ms\"\n\
             vips = [\"{VIP}\"]\n",
            backends.join(", "),
            case.interval_ms
        ),
    )?;
    let mut master = Vec::new();
    for node in lab.nodes() {
        let mut command = lab.command(&node.name, agent);
        command
            .args(["run", "--node", &node.name, "--config"])
            .arg(&config)
            .arg("--pin-dir")
            .arg(lab.pin_dir(&node.name))
            .env("FAROL_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(
                dir.join(format!("agent-{}.log", node.name)),
            )?);
        let process = lab.spawn(&node.name, &mut command, "agent")?;
        if node.name == MASTER {
            master.push(process);
        } else {
            others.push(process);
        }
    }
    let state = |node: &str, state: &str| {
        lab.metrics(node).is_some_and(|m| {
            m.get(&format!(
                "farol_vrrp_state{{instance=\"web\",vrid=\"51\",state=\"{state}\"}}"
            )) == Some(&1)
        })
    };
    wait_for(
        "nuster1 master, nuster2 backup",
        Duration::from_secs(60),
        || (state(MASTER, "master") && state(BACKUP, "backup")).then_some(()),
    )?;
    Ok(master)
}

/// keepalived and HAProxy on both balancers; returns nuster1's.
fn start_keepalived_pair(
    lab: &Lab,
    dir: &Path,
    case: Case,
    others: &mut Vec<LabProcess>,
) -> Result<Vec<LabProcess>> {
    let mut master = Vec::new();
    for (node, priority) in [(MASTER, 150), (BACKUP, 100)] {
        capture_ok(
            lab.command(node, "sysctl")
                .args(["-qw", "net.ipv4.ip_nonlocal_bind=1"]),
        )?;
        let mut servers = String::new();
        for backend in BACKENDS {
            servers.push_str(&format!(
                "  server {backend} {}:80\n",
                lab.node(backend)?.ip()
            ));
        }
        let haproxy_config = dir.join(format!("{node}-haproxy.cfg"));
        std::fs::write(
            &haproxy_config,
            format!(
                "global\n  maxconn 4000\n\ndefaults\n  mode tcp\n  timeout connect 1s\n  timeout client 60s\n  timeout server 60s\n\n\
                 frontend web\n  bind {VIP}:80\n  default_backend web\n\nbackend web\n  balance roundrobin\n{servers}"
            ),
        )?;
        let haproxy = lab.spawn(
            node,
            lab.command(node, "haproxy")
                .arg("-db")
                .arg("-f")
                .arg(&haproxy_config)
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
            "haproxy",
        )?;
        let keepalived_config = dir.join(format!("{node}-keepalived.conf"));
        std::fs::write(
            &keepalived_config,
            format!(
                "global_defs {{\n  router_id {node}\n  vrrp_version 3\n}}\n\
                 vrrp_instance web {{\n  state BACKUP\n  interface eth0\n  virtual_router_id 51\n\
                 \x20 priority {priority}\n  advert_int {}\n  virtual_ipaddress {{\n    {VIP}/32\n  }}\n}}\n",
                case.interval_ms as f64 / 1000.0
            ),
        )?;
        let log = std::fs::File::create(dir.join(format!("{node}-keepalived.log")))?;
        let keepalived = lab.spawn(
            node,
            lab.command(node, "keepalived")
                .args(["-n", "-l", "-D", "-P", "-f"])
                .arg(&keepalived_config)
                .arg("-p")
                .arg(dir.join(format!("{node}-keepalived.pid")))
                .arg("-r")
                .arg(dir.join(format!("{node}-vrrp.pid")))
                .stdout(log.try_clone()?)
                .stderr(log),
            "keepalived",
        )?;
        if node == MASTER {
            master.push(keepalived);
            master.push(haproxy);
        } else {
            others.push(keepalived);
            others.push(haproxy);
        }
    }
    let log = |node: &str| {
        std::fs::read_to_string(dir.join(format!("{node}-keepalived.log"))).unwrap_or_default()
    };
    wait_for(
        "keepalived on nuster1 master",
        Duration::from_secs(30),
        || {
            let master_log = log(MASTER);
            let last_master = master_log.rfind("Entering MASTER STATE");
            let last_backup = master_log.rfind("Entering BACKUP STATE");
            (last_master > last_backup).then_some(())
        },
    )?;
    // nuster2 may have been master briefly before nuster1 preempted it.
    wait_for(
        "keepalived on nuster2 backup",
        Duration::from_secs(30),
        || {
            let backup_log = log(BACKUP);
            let last_master = backup_log.rfind("Entering MASTER STATE");
            let last_backup = backup_log.rfind("Entering BACKUP STATE");
            (last_backup > last_master).then_some(())
        },
    )?;
    Ok(master)
}

fn http_ok(lab: &Lab) -> bool {
    lab.run(
        CLIENT,
        "curl",
        &["-sf", "--max-time", "1", &format!("http://{VIP}/")],
    )
    .is_ok_and(|out| out.status.success())
}

fn mac(lab: &Lab, node: &str) -> Result<String> {
    let out = lab.run(node, "ip", &["-o", "link", "show", "eth0"])?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.split("link/ether ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .map(str::to_owned)
        .with_context(|| format!("no MAC in {text}"))
}

fn capture_ok(command: &mut Command) -> Result<()> {
    xtask::capture(command).map(|_| ())
}

/// CLOCK_MONOTONIC in seconds: the clock Python's time.monotonic() reads.
fn monotonic_s() -> f64 {
    // SAFETY: timespec is plain data; clock_gettime fills it.
    let mut now: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: a valid pointer to a timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    now.tv_sec as f64 + now.tv_nsec as f64 / 1e9
}

fn kill(pid: i32, signal: i32) {
    // SAFETY: kill has no memory effects; a stale PID yields ESRCH.
    unsafe { libc::kill(pid, signal) };
}

fn wait_child_output(process: &mut LabProcess, timeout: Duration) -> Result<String> {
    let deadline = Instant::now() + timeout;
    loop {
        if process.try_wait()?.is_some() {
            break;
        }
        if Instant::now() >= deadline {
            bail!("{} did not finish within {timeout:?}", process.label());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut text = String::new();
    if let Some(stdout) = process.child_mut().stdout.as_mut() {
        std::io::Read::read_to_string(stdout, &mut text)?;
    }
    Ok(text)
}

/// Polls the VIP with a new connection every 10 ms (0.5 s per step at
/// most) and records gratuitous ARPs for the VIP from the backup's MAC;
/// prints JSON with CLOCK_MONOTONIC times.
const POLLER: &str = r#"
import asyncio, json, socket, sys, threading, time
vip, seconds = sys.argv[1], float(sys.argv[2])
backup_mac = bytes.fromhex(sys.argv[3].replace(":", ""))
vip_bytes = socket.inet_aton(vip)
garps = []
def sniff():
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0806))
    s.settimeout(0.2)
    end = time.monotonic() + seconds + 1
    while time.monotonic() < end:
        try:
            frame = s.recv(128)
        except socket.timeout:
            continue
        now = time.monotonic()
        if frame[6:12] == backup_mac and frame[28:32] == vip_bytes:
            garps.append(now)
threading.Thread(target=sniff, daemon=True).start()
probes = []
async def probe(start):
    ok = False
    try:
        r, w = await asyncio.wait_for(asyncio.open_connection(vip, 80), 0.5)
        try:
            w.write(b"GET / HTTP/1.0\r\n\r\n")
            data = await asyncio.wait_for(r.read(), 0.5)
            ok = data.startswith(b"HTTP/1.0 200") or data.startswith(b"HTTP/1.1 200")
        finally:
            w.close()
    except Exception:
        pass
    probes.append((start, time.monotonic(), ok))
async def main():
    start = time.monotonic()
    tasks = []
    n = 0
    while time.monotonic() < start + seconds:
        tasks.append(asyncio.create_task(probe(time.monotonic())))
        n += 1
        await asyncio.sleep(max(0.0, start + n * 0.01 - time.monotonic()))
    await asyncio.gather(*tasks)
asyncio.run(main())
time.sleep(0.3)
print(json.dumps({"probes": probes, "garps": garps}))
"#;
