//! `cargo xtask bench lb`: HTTP through the balancer against the peers, in
//! one run on the lab. nginx serves 1 KB on nuster2..4; wrk runs in the
//! client namespace against one backend directly, HAProxy (`mode tcp`,
//! roundrobin) on nuster1, and Farol (roundrobin, VIP held by nuster1) in
//! DSR mode (port 80) and NAT mode (port 8080), with keep-alive and with a new connection per request. Also the
//! per-packet cost of the balancer's paths (BPF_PROG_TEST_RUN).

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{bail, Context, Result};

use crate::{
    bench::BenchReport,
    capture, exec,
    lab::{lab_config, wait_for, Lab, LabGuard, LabProcess, CLIENT},
    toolchain, workspace_root,
};

const BACKENDS: [&str; 3] = ["nuster2", "nuster3", "nuster4"];
const BALANCER: &str = "nuster1";
const VIP: &str = "192.0.2.100";
/// The NAT service's port on the VIP (the DSR one is 80).
const NAT_PORT: u16 = 8080;
const WRK_THREADS: &str = "2";
const WRK_CONNECTIONS: &str = "50";

#[derive(Debug, Clone, Copy)]
struct WrkResult {
    requests_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
}

pub fn lb(seconds: u64) -> Result<BenchReport> {
    if !crate::is_root() {
        bail!("bench lb builds a namespace lab: run it as root");
    }
    toolchain::ensure_packages(&[
        ("wrk", "the HTTP load generator"),
        ("haproxy", "the peer balancer"),
        (
            "nginx",
            "fast backends, so the balancer is what is measured",
        ),
    ])?;
    toolchain::build_ebpf()?;
    println!("bench lb: building the agent (release)");
    exec(Command::new("cargo").current_dir(workspace_root()).args([
        "build",
        "--quiet",
        "--release",
        "-p",
        "farol-agent",
        "--bin",
        "agent",
        "--example",
        "lb_packet_cost",
    ]))?;
    let agent = workspace_root().join("target/release/agent");
    let mut report = BenchReport::new("lb");

    println!("bench lb: per-packet cost (BPF_PROG_TEST_RUN, median of 5 x 1,000,000)");
    let out = capture(&mut Command::new(
        workspace_root().join("target/release/examples/lb_packet_cost"),
    ))?;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let value: serde_json::Value =
            serde_json::from_str(line).context("lb_packet_cost output")?;
        let case = value["case"].as_str().unwrap_or_default().to_owned();
        let ns = value["ns_per_packet"].as_f64().unwrap_or_default();
        println!("  {case:<28} {ns:>6.0} ns/packet");
        report.push(&case, "ns_per_packet", ns, "ns");
    }

    let work = std::env::temp_dir().join(format!("farol-bench-lb-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    let result = run_http(&agent, &work, seconds, &mut report);
    let _ = std::fs::remove_dir_all(&work);
    result?;
    Ok(report)
}

fn run_http(agent: &Path, work: &Path, seconds: u64, report: &mut BenchReport) -> Result<()> {
    let lab = LabGuard::up(Lab::new("bench")?)?;
    let _nginx: Vec<LabProcess> = BACKENDS
        .iter()
        .map(|node| start_nginx(&lab, node, work))
        .collect::<Result<_>>()?;
    for node in BACKENDS {
        let url = format!("http://{}/1k.html", lab.node(node)?.ip());
        wait_for(&format!("nginx on {node}"), Duration::from_secs(10), || {
            lab.run(CLIENT, "curl", &["-sf", "--max-time", "1", &url])
                .ok()
                .filter(|o| o.status.success())
        })?;
    }
    let direct_url = format!("http://{}/1k.html", lab.node(BACKENDS[0])?.ip());
    let balancer_url = format!("http://{}/1k.html", lab.node(BALANCER)?.ip());
    let vip_url = format!("http://{VIP}/1k.html");

    let mut rows: Vec<(String, &str, WrkResult)> = Vec::new();
    for pattern in ["keepalive", "close"] {
        println!("bench lb: direct, {pattern}");
        rows.push((
            "direct".into(),
            pattern,
            wrk(&lab, &direct_url, pattern, seconds)?,
        ));
    }
    {
        let _haproxy = start_haproxy(&lab, work)?;
        wait_for("haproxy", Duration::from_secs(10), || {
            lab.run(CLIENT, "curl", &["-sf", "--max-time", "1", &balancer_url])
                .ok()
                .filter(|o| o.status.success())
        })?;
        for pattern in ["keepalive", "close"] {
            println!("bench lb: haproxy mode tcp, {pattern}");
            rows.push((
                "haproxy".into(),
                pattern,
                wrk(&lab, &balancer_url, pattern, seconds)?,
            ));
        }
    }
    {
        let _agents = start_agents(&lab, agent, work)?;
        wait_for("the VIP", Duration::from_secs(30), || {
            lab.run(CLIENT, "curl", &["-sf", "--max-time", "1", &vip_url])
                .ok()
                .filter(|o| o.status.success())
        })?;
        let mode = lab
            .run(BALANCER, "curl", &["-sf", "http://127.0.0.1:9477/metrics"])
            .map(|o| String::from_utf8_lossy(&o.stdout).contains("mode=\"native\""))
            .unwrap_or(false);
        println!(
            "bench lb: farol agents up (XDP {} mode)",
            if mode { "native" } else { "generic" }
        );
        for pattern in ["keepalive", "close"] {
            println!("bench lb: farol dsr, {pattern}");
            rows.push((
                "farol-dsr".into(),
                pattern,
                wrk(&lab, &vip_url, pattern, seconds)?,
            ));
        }
        let nat_url = format!("http://{VIP}:{NAT_PORT}/1k.html");
        for pattern in ["keepalive", "close"] {
            println!("bench lb: farol nat, {pattern}");
            rows.push((
                "farol-nat".into(),
                pattern,
                wrk(&lab, &nat_url, pattern, seconds)?,
            ));
        }
    }

    println!(
        "\n{:<12} {:<10} {:>12} {:>10} {:>9} {:>9}",
        "target", "pattern", "req/s", "x direct", "p50 ms", "p99 ms"
    );
    for (target, pattern, result) in &rows {
        let direct = rows
            .iter()
            .find(|(t, p, _)| t == "direct" && p == pattern)
            .map_or(1.0, |(_, _, r)| r.requests_per_s);
        let ratio = result.requests_per_s / direct;
        println!(
            "{target:<12} {pattern:<10} {:>12.0} {ratio:>9.2}x {:>9.2} {:>9.2}",
            result.requests_per_s, result.p50_ms, result.p99_ms
        );
        let case = format!("{target}-{pattern}");
        report.push(&case, "req_per_s", result.requests_per_s, "1/s");
        report.push(&case, "ratio_to_direct", ratio, "x");
        report.push(&case, "latency_p50", result.p50_ms, "ms");
        report.push(&case, "latency_p99", result.p99_ms, "ms");
    }
    for pattern in ["keepalive", "close"] {
        let get = |t: &str| {
            rows.iter()
                .find(|(x, p, _)| x == t && *p == pattern)
                .map(|(_, _, r)| r.requests_per_s)
        };
        for farol in ["farol-dsr", "farol-nat"] {
            if let (Some(ours), Some(haproxy)) = (get(farol), get("haproxy")) {
                println!("{farol} / haproxy, {pattern}: {:.2}x", ours / haproxy);
                report.push(
                    &format!("{farol}-{pattern}"),
                    "ratio_to_haproxy",
                    ours / haproxy,
                    "x",
                );
            }
        }
    }
    Ok(())
}

fn wrk(lab: &Lab, url: &str, pattern: &str, seconds: u64) -> Result<WrkResult> {
    let duration = format!("{seconds}s");
    let mut args = vec![
        "-t",
        WRK_THREADS,
        "-c",
        WRK_CONNECTIONS,
        "-d",
        &duration,
        "--latency",
    ];
    if pattern == "close" {
        args.extend(["-H", "Connection: close"]);
    }
    args.push(url);
    let out = lab.run(CLIENT, "wrk", &args)?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!("wrk failed: {text}{}", String::from_utf8_lossy(&out.stderr));
    }
    parse_wrk(&text).with_context(|| format!("parsing wrk output:\n{text}"))
}

fn parse_wrk(text: &str) -> Result<WrkResult> {
    let requests_per_s = text
        .lines()
        .find_map(|line| line.trim().strip_prefix("Requests/sec:"))
        .and_then(|value| value.trim().parse().ok())
        .context("no Requests/sec line")?;
    let percentile = |label: &str| -> Result<f64> {
        let value = text
            .lines()
            .find_map(|line| line.trim().strip_prefix(label))
            .map(str::trim)
            .with_context(|| format!("no {label} line"))?;
        to_ms(value)
    };
    let errors = text
        .lines()
        .find(|line| line.contains("Non-2xx") || line.contains("Socket errors"));
    if let Some(errors) = errors {
        println!("  wrk: {}", errors.trim());
    }
    Ok(WrkResult {
        requests_per_s,
        p50_ms: percentile("50%")?,
        p99_ms: percentile("99%")?,
    })
}

fn to_ms(value: &str) -> Result<f64> {
    let split = value
        .find(|c: char| c.is_ascii_alphabetic())
        .context("latency without unit")?;
    let (number, unit) = value.split_at(split);
    let number: f64 = number.parse().context("latency number")?;
    Ok(match unit {
        "us" => number / 1000.0,
        "ms" => number,
        "s" => number * 1000.0,
        "m" => number * 60_000.0,
        other => bail!("unknown latency unit {other}"),
    })
}

pub(crate) fn start_nginx(lab: &Lab, node: &str, work: &Path) -> Result<LabProcess> {
    let root = work.join(node);
    std::fs::create_dir_all(&root)?;
    std::fs::write(
        root.join("1k.html"),
        format!("{node}\n{}\n", "x".repeat(1018 - node.len())),
    )?;
    let config = work.join(format!("nginx-{node}.conf"));
    std::fs::write(
        &config,
        format!(
            "daemon off;\nworker_processes 1;\npid {pid};\nerror_log stderr error;\n\
             events {{ worker_connections 4096; }}\n\
             http {{\n  access_log off;\n  keepalive_requests 1000000;\n\
             client_body_temp_path {tmp}/body; proxy_temp_path {tmp}/proxy; fastcgi_temp_path {tmp}/fcgi;\n\
             uwsgi_temp_path {tmp}/uwsgi; scgi_temp_path {tmp}/scgi;\n\
             server {{ listen 80; root {root}; }}\n}}\n",
            pid = work.join(format!("nginx-{node}.pid")).display(),
            tmp = work.display(),
            root = root.display(),
        ),
    )?;
    let mut command = lab.command(node, "nginx");
    command
        .arg("-c")
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    lab.spawn(node, &mut command, "nginx")
}

fn start_haproxy(lab: &Lab, work: &Path) -> Result<LabProcess> {
    let mut servers = String::new();
    for node in BACKENDS {
        servers.push_str(&format!("  server {node} {}:80\n", lab.node(node)?.ip()));
    }
    let config = work.join("haproxy.cfg");
    std::fs::write(
        &config,
        format!(
            "global\n  maxconn 8000\n\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n\n\
             frontend web\n  bind {}:80\n  default_backend web\n\nbackend web\n  balance roundrobin\n{servers}",
            lab.node(BALANCER)?.ip()
        ),
    )?;
    let mut command = lab.command(BALANCER, "haproxy");
    command
        .arg("-db")
        .arg("-f")
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    lab.spawn(BALANCER, &mut command, "haproxy")
}

/// Agents on every node with a bench service: the VIP on nuster1, the
/// three nginx nodes as backends.
fn start_agents(lab: &Lab, agent: &Path, work: &Path) -> Result<Vec<LabProcess>> {
    let text = std::fs::read_to_string(lab_config())?;
    let nodes = text.split("[[service]]").next().unwrap_or(&text);
    let config: PathBuf = work.join("bench-lb.toml");
    let backends: Vec<String> = BACKENDS
        .iter()
        .map(|n| format!("{{ node = \"{n}\" }}"))
        .collect();
    let nat_backends: Vec<String> = BACKENDS
        .iter()
        .map(|n| format!("{{ node = \"{n}\", port = 80 }}"))
        .collect();
    std::fs::write(
        &config,
        format!(
            "{nodes}\n[[service]]\nname = \"web\"\nvip = \"{VIP}\"\nport = 80\nscheduler = \"roundrobin\"\n\
             forwarding = \"dsr\"\nbackends = [{}]\n\n\
             [[service]]\nname = \"web-nat\"\nvip = \"{VIP}\"\nport = {NAT_PORT}\nscheduler = \"roundrobin\"\n\
             forwarding = \"nat\"\nbackends = [{}]\n",
            backends.join(", "),
            nat_backends.join(", ")
        ),
    )?;
    let mut agents = Vec::new();
    for node in lab.nodes() {
        let mut command = lab.command(&node.name, agent);
        command
            .args(["run", "--no-supervise", "--node", &node.name, "--config"])
            .arg(&config)
            .arg("--pin-dir")
            .arg(lab.pin_dir(&node.name))
            .env("FAROL_LOG", "warn")
            .stdout(Stdio::null());
        agents.push(lab.spawn(&node.name, &mut command, "agent")?);
    }
    Ok(agents)
}
