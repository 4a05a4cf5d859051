//! `cargo xtask demo`: the whole cluster on this machine. Sets up what is
//! missing, builds, brings the lab up, starts a web server and a real agent
//! on every node, sends traffic from the client while showing each node's
//! live counters from `/metrics`, then stops the agents (which detach and
//! unpin) and tears the lab down, also on Ctrl-C or failure.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

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
    println!("[1/6] toolchain");
    toolchain::build_ebpf()?;
    println!("[2/6] building the agent");
    exec(
        std::process::Command::new("cargo")
            .current_dir(workspace_root())
            .args(["build", "--quiet", "-p", "farol-agent"]),
    )?;
    let agent = workspace_root().join("target/debug/agent");

    println!("[3/6] lab up: nuster1..4 and client on a bridge, 192.0.2.0/24");
    let lab = LabGuard::up(Lab::new("lab")?)?;
    let web_root = tempdir("farol-demo-web")?;
    let mut processes: Vec<LabProcess> = Vec::new();
    for node in lab.nodes() {
        let root = web_root.join(&node.name);
        std::fs::create_dir_all(&root)?;
        std::fs::write(
            root.join("index.html"),
            format!("hello from {}\n", node.name),
        )?;
        let mut server = lab.command(&node.name, "python3");
        server
            .args([
                "-m",
                "http.server",
                WEB_PORT,
                "--bind",
                node.ip(),
                "--directory",
            ])
            .arg(&root)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        processes.push(lab.spawn(&node.name, &mut server, "web server")?);
    }

    println!(
        "[4/6] starting an agent on every node ({})",
        lab_config().display()
    );
    for node in lab.nodes() {
        let mut command = lab.command(&node.name, &agent);
        command
            .args(["run", "--config"])
            .arg(lab_config())
            .args(["--node", &node.name, "--pin-dir"])
            .arg(lab.pin_dir(&node.name))
            .env("FAROL_LOG", "warn");
        processes.push(lab.spawn(&node.name, &mut command, "agent")?);
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
        let attached = lab
            .xdp_program_id(&node.name)?
            .map_or("none".into(), |id| format!("prog id {id}"));
        println!(
            "      {}: farol_ingress attached to eth0 ({attached})",
            node.name
        );
    }

    println!("[5/6] traffic from the client for {seconds} s: HTTP to every node in turn, one ping a second");
    let result = traffic(&lab, seconds, &stop);
    if let Ok((ok, total)) = &result {
        println!("      {ok}/{total} HTTP requests answered");
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

    println!("[6/6] stopping agents (SIGTERM: detach and unpin), tearing the lab down");
    for process in processes.iter_mut().rev() {
        let status = process.terminate(Duration::from_secs(10))?;
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

/// Sends bounded traffic and prints a counter table every second.
fn traffic(lab: &Lab, seconds: u64, stop: &AtomicBool) -> Result<(u64, u64)> {
    let started = Instant::now();
    let (mut ok, mut total) = (0u64, 0u64);
    let nodes: Vec<_> = lab.nodes().to_vec();
    let classes = ["ipv4", "tcp", "udp", "icmp", "arp", "ipv6", "malformed"];
    for second in 1..=seconds {
        if stop.load(Ordering::SeqCst) {
            println!("      interrupted");
            break;
        }
        let tick = Instant::now();
        for node in &nodes {
            let url = format!("http://{}:{WEB_PORT}/", node.ip());
            for _ in 0..3 {
                total += 1;
                let out = lab.run(CLIENT, "curl", &["-sf", "--max-time", "2", &url])?;
                if out.status.success() && String::from_utf8_lossy(&out.stdout).contains(&node.name)
                {
                    ok += 1;
                }
            }
            lab.run(CLIENT, "ping", &["-c", "1", "-W", "1", node.ip()])?;
        }
        let mut line = format!("      t={:>2}s", started.elapsed().as_secs());
        if second == 1 || second % 4 == 0 || second == seconds {
            println!(
                "      {:<8} {}",
                "node",
                classes.map(|c| format!("{c:>9}")).join("")
            );
            for node in &nodes {
                let metrics = scrape(lab, &node.name).unwrap_or_default();
                let row: String = classes
                    .iter()
                    .map(|c| format!("{:>10}", packets(&metrics, c)))
                    .collect();
                println!("      {:<8} {row}", node.name);
            }
        }
        line.push_str(&format!("  HTTP {ok}/{total} ok"));
        println!("{line}");
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
