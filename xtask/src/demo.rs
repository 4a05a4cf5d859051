//! `cargo xtask demo`: the whole cluster on this machine. Sets up what is
//! missing, builds, brings the lab up, starts a real agent on every node
//! (each runs Apache from the config's `[[supervise]]`), sends traffic from
//! the client while showing which node answered (X-Farol-Node) and each
//! node's live counters from `/metrics`, then stops the agents (which drain,
//! stop Apache, detach and unpin) and tears the lab down, also on Ctrl-C or
//! failure.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use crate::demo_postgres;
use anyhow::{bail, Context, Result};
use xtask::{
    exec,
    lab::{lab_config, wait_for, Lab, LabGuard, LabProcess, CLIENT},
    toolchain, workspace_root,
};

const WEB_PORT: &str = "80";
const METRICS_URL: &str = "http://127.0.0.1:9477/metrics";

pub(crate) fn run(seconds: u64) -> Result<()> {
    if !xtask::is_root() {
        bail!("the demo creates network namespaces and loads BPF programs: run it as root");
    }
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        ctrlc::set_handler(move || stop.store(true, Ordering::SeqCst))
            .context("installing the Ctrl-C handler")?;
    }
    println!("[1/7] toolchain");
    toolchain::ensure_packages(&[
        ("apache2", "Apache on every lab node, run by the agents"),
        ("postgresql", "PostgreSQL primary and standby in the lab"),
    ])?;
    toolchain::build_ebpf()?;
    println!("[2/7] building the agent");
    // FAROL_DEMO_AGENT runs another build (the footprint of the release
    // build that `cargo xtask dist` packages: README, "Running on Raspberry Pi").
    let agent = match std::env::var_os("FAROL_DEMO_AGENT") {
        Some(agent) => PathBuf::from(agent),
        None => {
            exec(
                std::process::Command::new("cargo")
                    .current_dir(workspace_root())
                    .args(["build", "--quiet", "-p", "farol-agent"]),
            )?;
            workspace_root().join("target/debug/agent")
        }
    };

    println!("[3/7] lab up: nuster1..4 and client on a bridge, 192.0.2.0/24");
    let lab = LabGuard::up(Lab::new("lab")?)?;
    let web_root = tempdir("farol-demo-web")?;
    let names: Vec<String> = lab.nodes().iter().map(|n| n.name.clone()).collect();
    // configs/lab.toml with its [[supervise]] Apache, paths under web_root,
    // plus a replicated volume `www` on nuster1..3 as Apache's document root
    // (nuster4 holds no brick and serves a local directory).
    println!(
        "[4/7] the cluster file: configs/lab.toml with Apache under the agents, a replicated volume, \
         a NAT service, and PostgreSQL 15 on {} run by their agents (primary {}, Raft cluster state, pooler on every node)",
        demo_postgres::DATABASE_NODES.join(", "),
        demo_postgres::PRIMARY,
    );
    let database = demo_postgres::sections(&lab, &web_root)?;
    let apache = xtask::apache::lab_apache(&web_root, &names, |text| {
        with_volume(&text, &web_root) + NAT_SERVICE + &database
    })?;
    for node in &names {
        std::fs::write(
            apache.document_root(node).join("index.html"),
            format!("hello from {node} (a local directory: no brick of the volume here)\n"),
        )?;
    }
    let mut processes: Vec<LabProcess> = Vec::new();

    println!(
        "[5/7] starting an agent on every node ({}, with configs/apache/farol.conf); each agent runs Apache",
        lab_config().display()
    );
    // The agents' logs go to files that outlive the demo; the terminal
    // keeps the demo's own account.
    let log_dir = workspace_root().join("target/demo");
    std::fs::create_dir_all(&log_dir)?;
    for node in &names {
        let _ = std::fs::remove_file(log_dir.join(format!("agent-{node}.log")));
    }
    println!("      agent logs: {}/agent-NODE.log", log_dir.display());
    let spawn_agent = |node: &str| -> Result<LabProcess> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log_dir.join(format!("agent-{node}.log")))?;
        let mut command = lab.command(node, &agent);
        command
            .args(["run", "--config"])
            .arg(&apache.cluster_file)
            .args(["--node", node, "--pin-dir"])
            .arg(lab.pin_dir(node))
            .env("FAROL_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(std::process::Stdio::null())
            .stderr(log);
        lab.spawn(node, &mut command, "agent")
    };
    for node in lab.nodes() {
        processes.push(spawn_agent(&node.name)?);
    }
    for node in lab.nodes() {
        wait_for(
            &format!("the agent on {} to serve /metrics", node.name),
            Duration::from_secs(20),
            || {
                scrape(&lab, &node.name)
                    .ok()
                    .filter(|metrics| !metrics.is_empty())
            },
        )?;
    }
    for node in lab.nodes() {
        wait_for(
            &format!("Apache on {} to be ready under its agent", node.name),
            Duration::from_secs(30),
            || {
                let metrics = scrape(&lab, &node.name).ok()?;
                (metrics.get("farol_supervise_state{child=\"apache\",state=\"running\"}")
                    == Some(&1.0))
                .then_some(())
            },
        )?;
    }
    for node in lab.nodes() {
        let attached = lab
            .xdp_program_id(&node.name)?
            .map_or("none".into(), |id| format!("prog id {id}"));
        println!(
            "      {}: farol_ingress attached to eth0 ({attached}), Apache pid {}",
            node.name,
            apache
                .pid(&node.name)
                .map_or("?".into(), |pid| pid.to_string())
        );
    }

    let page = volume_mount(&web_root, "nuster1").join("index.html");
    std::fs::write(
        &page,
        "hello from the replicated volume www (written once, on nuster1's mount)\n",
    )
    .with_context(|| format!("writing {}", page.display()))?;
    println!(
        "      wrote {} (nuster1's mount of the volume www, replicated to nuster2 and nuster3)",
        page.display()
    );
    for _ in 0..8 {
        let out = lab.run(
            CLIENT,
            "curl",
            &["-s", "--max-time", "2", "-i", &format!("http://{VIP}/")],
        )?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let node = text
            .lines()
            .find_map(|l| l.strip_prefix("X-Farol-Node: "))
            .unwrap_or("?")
            .trim()
            .to_owned();
        let body = text
            .rsplit("\r\n\r\n")
            .next()
            .unwrap_or("")
            .trim()
            .to_owned();
        println!("      GET http://{VIP}/ -> {node}: {body}");
    }
    println!(
        "      NAT mode: http://{VIP}:{NAT_PORT}/ goes through nuster1 to the Apaches of nuster2..4, \
         which see nuster1 as the client; nuster1 translates the replies back"
    );
    for _ in 0..6 {
        let out = lab.run(
            CLIENT,
            "curl",
            &[
                "-s",
                "--max-time",
                "2",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code} %header{x-farol-node}",
                &format!("http://{VIP}:{NAT_PORT}/"),
            ],
        )?;
        println!(
            "      GET http://{VIP}:{NAT_PORT}/ -> {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    let translated = scrape(&lab, "nuster1")?
        .get("farol_lb_service_nat_replies_packets_total{service=\"web-nat\"}")
        .copied()
        .unwrap_or(0.0);
    println!("      nuster1 translated {translated} reply packets back to the client");
    let headers = lab.run(
        CLIENT,
        "curl",
        &["-si", "--max-time", "2", &format!("http://{VIP}/")],
    )?;
    println!("      curl -si http://{VIP}/ from the client:");
    for line in String::from_utf8_lossy(&headers.stdout).lines().take(12) {
        println!("        {line}");
    }
    println!(
        "[6/7] traffic from the client for {seconds} s: HTTP to the VIP {VIP} (nuster1 holds it and \
         spreads flows roundrobin in DSR mode; every node's Apache answers directly, naming \
         itself in X-Farol-Node), one ping a second"
    );
    let result = traffic(&lab, seconds, &stop).and_then(|counts| {
        kill_and_watch_apache(&lab, &apache, "nuster3")?;
        let primary = demo_postgres::wait_ready(&lab)?;
        let mut nodes = DemoNodes {
            processes: &mut processes,
            names: &names,
            spawn: &spawn_agent,
            dir: &web_root,
        };
        demo_postgres::show(&lab, VIP, primary, &mut nodes)?;
        Ok(counts)
    });
    if let Ok((ok, total)) = &result {
        println!("      {ok}/{total} HTTP requests answered");
        // Every subsystem is on here: data plane (DSR and NAT), VRRP,
        // health checks, Apache supervision, the volume, the pooler, the
        // Raft cluster state and PostgreSQL under the agent.
        for (node, process) in lab.nodes().iter().zip(&processes) {
            match xtask::footprint::of_pid(process.pid()) {
                Ok(memory) => println!(
                    "      agent on {}: {memory}{}",
                    node.name,
                    if memory.hwm_kb > xtask::footprint::AGENT_BUDGET_KB {
                        " (over the 50 MB budget)"
                    } else {
                        ""
                    }
                ),
                Err(error) => println!("      agent on {}: {error:#}", node.name),
            }
        }
        let node = &lab.nodes()[0].name;
        let map = lab.pin_dir(node).join("PACKET_STATS");
        println!(
            "      bpftool map dump pinned {} (the tcp slot, per CPU):",
            map.display()
        );
        match tcp_slot_from_bpftool(&map) {
            Ok(line) => println!("        {line}"),
            Err(error) => println!("        bpftool failed: {error:#}"),
        }
    }

    if let Err(error) = &result {
        println!("      failed: {error:#}");
        for node in &names {
            let text = std::fs::read_to_string(log_dir.join(format!("agent-{node}.log")))
                .unwrap_or_default();
            let lines: Vec<&str> = text
                .lines()
                .filter(|line| line.contains(" WARN ") || line.contains(" ERROR "))
                .collect();
            println!("      last warnings of {node}'s agent:");
            for line in &lines[lines.len().saturating_sub(8)..] {
                println!("        {line}");
            }
        }
    }
    println!(
        "[7/7] stopping agents (SIGTERM: drain, stop Apache gracefully, detach and unpin), tearing the lab down"
    );
    for process in processes.iter_mut().rev() {
        // Draining and Apache's graceful stop come first: allow for them.
        let status = process.terminate(Duration::from_secs(30))?;
        if process.label().starts_with("agent") && !status.success() {
            bail!("{} exited with {status}", process.label());
        }
    }
    for node in lab.nodes() {
        if lab.xdp_program_id(&node.name)?.is_some() {
            bail!(
                "{}: an XDP program is still attached after the agent stopped",
                node.name
            );
        }
    }
    drop(processes);
    drop(lab);
    let _ = std::fs::remove_dir_all(&web_root);
    result.map(|_| println!("demo finished: every agent detached its program and removed its pins"))
}

/// The lab's agents as the demo kills and restarts them.
struct DemoNodes<'a> {
    processes: &'a mut Vec<LabProcess>,
    names: &'a [String],
    spawn: &'a dyn Fn(&str) -> Result<LabProcess>,
    dir: &'a std::path::Path,
}

impl DemoNodes<'_> {
    fn index(&self, node: &str) -> Result<usize> {
        self.names
            .iter()
            .position(|name| name == node)
            .with_context(|| format!("{node} is not a lab node"))
    }
}

impl demo_postgres::NodeControl for DemoNodes<'_> {
    fn kill(&mut self, node: &str) -> Result<()> {
        let postmaster = demo_postgres::postmaster_pid(self.dir, node)
            .with_context(|| format!("no postmaster.pid for {node}"))?;
        let index = self.index(node)?;
        let agent = &mut self.processes[index];
        agent.child_mut().kill().context("kill -9 of the agent")?;
        let _ = agent.child_mut().wait();
        exec(std::process::Command::new("kill").args(["-9", &postmaster.to_string()]))
    }

    fn restart(&mut self, node: &str) -> Result<()> {
        let index = self.index(node)?;
        self.processes[index] = (self.spawn)(node)?;
        Ok(())
    }
}

const VOLUME_NODES: [&str; 3] = ["nuster1", "nuster2", "nuster3"];

/// The demo's NAT service: the VIP's port 8080 through nuster1 to the
/// Apaches of nuster2..4 on port 80.
const NAT_PORT: u16 = 8080;
const NAT_SERVICE: &str = r#"
[[service]]
name = "web-nat"
vip = "192.0.2.100"
port = 8080
scheduler = "roundrobin"
forwarding = "nat"
backends = [
    { node = "nuster2", port = 80 },
    { node = "nuster3", port = 80 },
    { node = "nuster4", port = 80 },
]
"#;

fn volume_mount(dir: &std::path::Path, node: &str) -> PathBuf {
    dir.join(format!("mnt-{node}"))
}

/// The lab's cluster file with a replicated volume `www` (bricks and mounts
/// under `dir`, one per node since all run on this machine) that Apache
/// serves on the nodes holding a replica.
fn with_volume(text: &str, dir: &std::path::Path) -> String {
    let fallback = format!("{}/{{node}}/www", dir.display());
    let mut text = text
        .replacen(
            "name = \"lab\"\n",
            "name = \"lab\"\nsecret = \"farol demo volume secret 0123456789\"\n",
            1,
        )
        .replace(
            &format!("env = {{ FAROL_DOCUMENT_ROOT = \"{fallback}\" }}"),
            &format!(
                "volume = \"www\"\nvolume_fallback = \"{fallback}\"\nenv = {{ FAROL_DOCUMENT_ROOT = \"{{volume}}\" }}"
            ),
        );
    text.push_str("\n[[volume]]\nname = \"www\"\nreplicas = [\n");
    for node in VOLUME_NODES {
        text.push_str(&format!(
            "  {{ node = \"{node}\", brick = \"{}\", mount = \"{}\" }},\n",
            dir.join(format!("brick-{node}")).display(),
            volume_mount(dir, node).display()
        ));
    }
    text.push_str("]\n");
    text
}

/// `kill -9` of one node's Apache; its agent starts a new one.
fn kill_and_watch_apache(lab: &Lab, apache: &xtask::apache::LabApache, node: &str) -> Result<()> {
    let Some(pid) = apache.pid(node) else {
        bail!("no Apache pid file on {node}");
    };
    println!("      kill -9 {pid} (Apache on {node}): its agent restarts it");
    let killed = Instant::now();
    // SAFETY: kill(2) on the PID of an Apache this demo's agent started.
    if unsafe { libc::kill(pid as i32, libc::SIGKILL) } != 0 {
        bail!("kill -9 {pid}: {}", std::io::Error::last_os_error());
    }
    let (new_pid, answered) = wait_for(
        &format!("Apache on {node} to answer again"),
        Duration::from_secs(30),
        || {
            let new_pid = apache.pid(node).filter(|p| *p != pid)?;
            let ip = lab.node(node).ok()?.ip().to_owned();
            let out = lab
                .run(
                    CLIENT,
                    "curl",
                    &["-sf", "--max-time", "1", &format!("http://{ip}/")],
                )
                .ok()?;
            out.status.success().then(|| (new_pid, killed.elapsed()))
        },
    )?;
    let metrics = scrape(lab, node)?;
    println!(
        "      {node}: new Apache pid {new_pid}, answering {:.0} ms after the kill \
         (agent: restarts {}, crashes {}, exit SIGKILL counted {})",
        answered.as_secs_f64() * 1000.0,
        metrics
            .get("farol_supervise_restarts_total{child=\"apache\"}")
            .copied()
            .unwrap_or(0.0),
        metrics
            .get("farol_supervise_crashes_total{child=\"apache\"}")
            .copied()
            .unwrap_or(0.0),
        metrics
            .get("farol_supervise_exits_total{child=\"apache\",status=\"SIGKILL\"}")
            .copied()
            .unwrap_or(0.0),
    );
    Ok(())
}

fn tempdir(name: &str) -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

fn scrape(lab: &Lab, node: &str) -> Result<BTreeMap<String, f64>> {
    let out = lab.run(node, "curl", &["-sf", "--max-time", "2", METRICS_URL])?;
    if !out.status.success() {
        bail!("scrape of {node} failed");
    }
    Ok(parse_metrics(&String::from_utf8_lossy(&out.stdout)))
}

/// `name{labels} value` lines into a map keyed by `name{labels}`.
fn parse_metrics(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (key, value) = line.rsplit_once(' ')?;
            Some((key.to_owned(), value.parse().ok()?))
        })
        .collect()
}

fn packets(metrics: &BTreeMap<String, f64>, class: &str) -> u64 {
    metrics
        .get(&format!("farol_xdp_packets_total{{class=\"{class}\"}}"))
        .copied()
        .unwrap_or(0.0) as u64
}

const VIP: &str = "192.0.2.100";

/// The supervised Apache's state on a node, from its metrics.
fn apache_state(metrics: &BTreeMap<String, f64>) -> &'static str {
    [
        "running", "starting", "backoff", "gave_up", "stopping", "stopped",
    ]
    .into_iter()
    .find(|state| {
        metrics.get(&format!(
            "farol_supervise_state{{child=\"apache\",state=\"{state}\"}}"
        )) == Some(&1.0)
    })
    .unwrap_or("?")
}

/// Sends bounded traffic to the VIP and prints, every few seconds, which
/// node answered and what each node's XDP program counted.
fn traffic(lab: &Lab, seconds: u64, stop: &AtomicBool) -> Result<(u64, u64)> {
    let started = Instant::now();
    let (mut ok, mut total) = (0u64, 0u64);
    let nodes: Vec<_> = lab.nodes().to_vec();
    let mut answered: BTreeMap<String, u64> = BTreeMap::new();
    let url = format!("http://{VIP}:{WEB_PORT}/");
    for second in 1..=seconds {
        if stop.load(Ordering::SeqCst) {
            println!("      interrupted");
            break;
        }
        let tick = Instant::now();
        for _ in 0..12 {
            total += 1;
            let out = lab.run(
                CLIENT,
                "curl",
                &[
                    "-sf",
                    "--max-time",
                    "2",
                    "-o",
                    "/dev/null",
                    "-w",
                    "%header{x-farol-node}",
                    &url,
                ],
            )?;
            if out.status.success() {
                ok += 1;
                let node = String::from_utf8_lossy(&out.stdout).trim().to_owned();
                *answered.entry(node).or_default() += 1;
            }
        }
        lab.run(CLIENT, "ping", &["-c", "1", "-W", "1", VIP])?;
        if second == 1 || second % 4 == 0 || second == seconds {
            let balancer = scrape(lab, &nodes[0].name).unwrap_or_default();
            println!(
                "      {:<8} {:>9} {:>12} {:>10} {:>10} {:>10}",
                "node", "answered", "lb->backend", "xdp tcp", "xdp arp", "apache"
            );
            for node in &nodes {
                let metrics = scrape(lab, &node.name).unwrap_or_default();
                let forwarded = balancer
                    .get(&format!(
                        "farol_lb_backend_packets_total{{service=\"web\",backend=\"{}\"}}",
                        node.name
                    ))
                    .copied()
                    .unwrap_or(0.0) as u64;
                println!(
                    "      {:<8} {:>9} {:>12} {:>10} {:>10} {:>10}",
                    node.name,
                    answered.get(&node.name).copied().unwrap_or(0),
                    forwarded,
                    packets(&metrics, "tcp"),
                    packets(&metrics, "arp"),
                    apache_state(&metrics),
                );
            }
        }
        println!(
            "      t={:>2}s  HTTP to the VIP {VIP}: {ok}/{total} answered",
            started.elapsed().as_secs()
        );
        if let Some(rest) = Duration::from_secs(1).checked_sub(tick.elapsed()) {
            std::thread::sleep(rest);
        }
    }
    Ok((ok, total))
}

/// The TCP slot of the pinned PACKET_STATS map as bpftool shows it (BTF
/// gives field names).
fn tcp_slot_from_bpftool(map: &std::path::Path) -> Result<String> {
    let out = xtask::capture(
        std::process::Command::new("bpftool")
            .args(["-j", "map", "dump", "pinned"])
            .arg(map),
    )?;
    let entries: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let tcp = farol_common::PacketClass::Tcp as u64;
    let slot = entries
        .as_array()
        .and_then(|entries| {
            entries
                .iter()
                .map(|e| &e["formatted"])
                .find(|e| e["key"].as_u64() == Some(tcp))
        })
        .context("no BTF-formatted tcp slot in bpftool's output")?;
    Ok(format!("key {tcp} (tcp): {}", slot["values"]))
}
