//! `cargo xtask demo`: the whole cluster on this machine. Sets up what is
//! missing, builds, brings the lab up, starts a real agent on every node
//! (each runs Apache from the config's `[[supervise]]`), sends traffic from
//! the client while showing which node answered (X-Farol-Node) and each
//! node's live counters from `/metrics`, then stops the agents (which drain,
//! stop Apache, detach and unpin) and tears the lab down, also on Ctrl-C or
//! failure.

use std::{
    collections::BTreeMap,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use crate::{
    cluster::{self, scrape, Cluster, ClusterOptions, NAT_PORT, VIP},
    demo_postgres,
};
use anyhow::{bail, Context, Result};
use xtask::{
    exec,
    lab::{lab_config, wait_for, Lab, CLIENT},
    workspace_root,
};

const WEB_PORT: &str = "80";

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
    println!("[2/7] building the agent");
    let agent = cluster::prepare()?;
    println!(
        "[3/7] lab up, [4/7] the cluster file, [5/7] an agent on every node ({}, with \
         configs/apache/farol.conf; each agent runs Apache)",
        lab_config().display()
    );
    let mut cluster = Cluster::start(
        agent,
        ClusterOptions {
            prefix: "lab".into(),
            primary: demo_postgres::PRIMARY,
            role_check_interval: "250ms",
            log_dir: workspace_root().join("target/demo"),
            small_brick: None,
            faketime: None,
        },
    )?;
    let result = show(&mut cluster, seconds, &stop);
    if let Err(error) = &result {
        println!("      failed: {error:#}");
        cluster.print_warnings(8);
    }
    println!(
        "[7/7] stopping agents (SIGTERM: drain, stop Apache gracefully, detach and unpin), tearing the lab down"
    );
    cluster.stop_agents()?;
    drop(cluster);
    result.map(|_| println!("demo finished: every agent detached its program and removed its pins"))
}

/// Steps 5 and 6 of the demo on a running cluster.
fn show(cluster: &mut Cluster, seconds: u64, stop: &AtomicBool) -> Result<()> {
    // Copies: the cluster itself is lent to the kill-and-restart step.
    let lab = &cluster.lab.lab().clone();
    let apache = &cluster.apache.clone();
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

    let page = cluster.mount("nuster1").join("index.html");
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
    let translated = scrape(lab, "nuster1")?
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
    let (ok, total) = traffic(lab, seconds, stop)?;
    kill_and_watch_apache(lab, apache, "nuster3")?;
    let primary = demo_postgres::wait_ready(lab)?;
    demo_postgres::show(lab, VIP, primary, &mut DemoNodes { cluster })?;
    println!("      {ok}/{total} HTTP requests answered");
    // Every subsystem is on here: data plane (DSR and NAT), VRRP,
    // health checks, Apache supervision, the volume, the pooler, the
    // Raft cluster state and PostgreSQL under the agent.
    for (node, process) in cluster.agents() {
        match xtask::footprint::of_pid(process.pid()) {
            Ok(memory) => println!(
                "      agent on {node}: {memory}{}",
                if memory.hwm_kb > xtask::footprint::AGENT_BUDGET_KB {
                    " (over the 50 MB budget)"
                } else {
                    ""
                }
            ),
            Err(error) => println!("      agent on {node}: {error:#}"),
        }
    }
    let node = &cluster.lab.nodes()[0].name;
    let map = cluster.lab.pin_dir(node).join("PACKET_STATS");
    println!(
        "      bpftool map dump pinned {} (the tcp slot, per CPU):",
        map.display()
    );
    match tcp_slot_from_bpftool(&map) {
        Ok(line) => println!("        {line}"),
        Err(error) => println!("        bpftool failed: {error:#}"),
    }
    Ok(())
}

/// The lab's agents as the demo kills and restarts them.
struct DemoNodes<'a> {
    cluster: &'a mut Cluster,
}

impl demo_postgres::NodeControl for DemoNodes<'_> {
    fn kill(&mut self, node: &str) -> Result<()> {
        let postmaster = self
            .cluster
            .postmaster_pid(node)
            .with_context(|| format!("no postmaster.pid for {node}"))?;
        self.cluster.kill_agent(node)?;
        exec(std::process::Command::new("kill").args(["-9", &postmaster.to_string()]))
    }

    fn restart(&mut self, node: &str) -> Result<()> {
        self.cluster.restart_agent(node)
    }
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

fn packets(metrics: &BTreeMap<String, f64>, class: &str) -> u64 {
    metrics
        .get(&format!("farol_xdp_packets_total{{class=\"{class}\"}}"))
        .copied()
        .unwrap_or(0.0) as u64
}

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
