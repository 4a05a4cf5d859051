//! `cargo xtask bench health`: how long a stopped backend keeps receiving
//! flows. nginx serves on nuster2..4 behind the VIP (DSR, roundrobin, held
//! by nuster1); wrk runs from the client with a new connection per request;
//! nginx on nuster3 is stopped mid-run. Measured per check setting: the
//! time from the stop to nuster1's data plane taking nuster3 out (its
//! applied plan, read from `/status.json`), and wrk's failed requests.
//! Cases: HAProxy's defaults (`inter 2s rise 2 fall 3`), an aggressive
//! 100 ms interval, and no check at all (the backend stays in while it
//! answers ARP: the baseline). The peer: HAProxy (`mode tcp`, roundrobin,
//! `option httpchk`) on nuster1 with the same two check settings, its
//! server state read from its stats socket.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::{
    bench::BenchReport,
    bench_lb::start_nginx,
    exec,
    lab::{lab_config, wait_for, Lab, LabGuard, LabProcess, CLIENT},
    workspace_root,
};

const BACKENDS: [&str; 3] = ["nuster2", "nuster3", "nuster4"];
const VICTIM: &str = "nuster3";
const VIP: &str = "192.0.2.100";

struct Case {
    name: &'static str,
    check: Option<&'static str>,
    /// wrk's whole run, and when in it the backend stops.
    run: Duration,
    stop_after: Duration,
}

const CASES: [Case; 3] = [
    Case {
        name: "default-2s-rise2-fall3",
        check: Some("check = { type = \"http\", path = \"/1k.html\" }"),
        run: Duration::from_secs(16),
        stop_after: Duration::from_secs(3),
    },
    Case {
        name: "aggressive-100ms",
        check: Some("check = { type = \"http\", path = \"/1k.html\", interval = \"100ms\" }"),
        run: Duration::from_secs(8),
        stop_after: Duration::from_secs(3),
    },
    Case {
        name: "no-check-arp-only",
        check: None,
        run: Duration::from_secs(8),
        stop_after: Duration::from_secs(3),
    },
];

pub fn run() -> Result<BenchReport> {
    if !crate::is_root() {
        bail!("bench health builds a namespace lab: run it as root");
    }
    crate::toolchain::ensure_packages(&[
        ("wrk", "the HTTP load generator"),
        ("nginx", "the backends"),
        ("haproxy", "the peer balancer and its health checks"),
    ])?;
    crate::toolchain::build_ebpf()?;
    println!("bench health: building the agent (release)");
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
    let work = std::env::temp_dir().join(format!("farol-bench-health-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    let mut report = BenchReport::new("health");
    let result = run_cases(&agent, &work, &mut report);
    let _ = std::fs::remove_dir_all(&work);
    result?;
    Ok(report)
}

fn config_text(check: Option<&str>) -> Result<String> {
    let text = std::fs::read_to_string(lab_config())?;
    let nodes = text.split("[[service]]").next().unwrap_or(&text);
    let backends: Vec<String> = BACKENDS
        .iter()
        .map(|n| format!("{{ node = \"{n}\" }}"))
        .collect();
    Ok(format!(
        "{nodes}\n[[service]]\nname = \"web\"\nvip = \"{VIP}\"\nport = 80\nscheduler = \"roundrobin\"\n\
         forwarding = \"dsr\"\nbackends = [{}]\n{}\n",
        backends.join(", "),
        check.unwrap_or("")
    ))
}

/// nuster1's view of the victim: (alive in the data plane, state).
fn victim(lab: &Lab) -> Option<(bool, String)> {
    let out = lab
        .run(
            "nuster1",
            "curl",
            &[
                "-sf",
                "--max-time",
                "1",
                "http://127.0.0.1:9477/status.json",
            ],
        )
        .ok()?;
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    let row = status["services"][0]["backends"]
        .as_array()?
        .iter()
        .find(|b| b["name"] == VICTIM)?
        .clone();
    Some((row["alive"].as_bool()?, row["state"].as_str()?.to_owned()))
}

fn run_cases(agent: &Path, work: &Path, report: &mut BenchReport) -> Result<()> {
    let lab = LabGuard::up(Lab::new("bhealth")?)?;
    let config: PathBuf = work.join("bench-health.toml");
    std::fs::write(&config, config_text(CASES[0].check)?)?;
    let mut nginx: Vec<(String, LabProcess)> = Vec::new();
    for node in BACKENDS {
        nginx.push((node.to_owned(), start_nginx(&lab, node, work)?));
    }
    let mut agents = Vec::new();
    for node in lab.nodes() {
        let mut command = lab.command(&node.name, agent);
        command
            .args(["run", "--no-supervise", "--node", &node.name, "--config"])
            .arg(&config)
            .arg("--pin-dir")
            .arg(lab.pin_dir(&node.name))
            .arg("--control-socket")
            .arg(work.join(format!("{}.sock", node.name)))
            .env("FAROL_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        agents.push(lab.spawn(&node.name, &mut command, "agent")?);
    }
    println!(
        "{:<26} {:>16} {:>10} {:>10} {:>9}",
        "case", "detection (ms)", "requests", "failed", "req/s"
    );
    for (index, case) in CASES.iter().enumerate() {
        if index > 0 {
            std::fs::write(&config, config_text(case.check)?)?;
            exec(
                Command::new(agent)
                    .arg("reload")
                    .arg("--socket")
                    .arg(work.join("nuster1.sock"))
                    .stdout(Stdio::null()),
            )?;
        }
        wait_for(
            "every backend up on nuster1",
            Duration::from_secs(30),
            || victim(&lab).filter(|(alive, state)| *alive && state == "up"),
        )?;
        measure(
            &lab,
            work,
            &mut nginx,
            case,
            &format!("http://{VIP}/1k.html"),
            || victim(&lab).is_some_and(|(alive, _)| !alive),
            report,
        )?;
    }
    drop(agents);
    for (name, inter) in [
        ("haproxy-default-2s", "2s"),
        ("haproxy-aggressive-100ms", "100ms"),
    ] {
        let socket = work.join(format!("haproxy-{inter}.sock"));
        let _haproxy = start_haproxy(&lab, work, inter, &socket)?;
        wait_for(
            "HAProxy to see every server up",
            Duration::from_secs(30),
            || haproxy_victim_up(&socket).filter(|up| *up),
        )?;
        let url = format!("http://{}/1k.html", lab.node("nuster1")?.ip());
        let case = Case {
            name,
            check: None,
            run: if inter == "2s" {
                Duration::from_secs(16)
            } else {
                Duration::from_secs(8)
            },
            stop_after: Duration::from_secs(3),
        };
        measure(
            &lab,
            work,
            &mut nginx,
            &case,
            &url,
            || haproxy_victim_up(&socket).is_some_and(|up| !up),
            report,
        )?;
    }
    drop(nginx);
    Ok(())
}

/// HAProxy in front of the three nginx, checking them every `inter`.
fn start_haproxy(lab: &Lab, work: &Path, inter: &str, socket: &Path) -> Result<LabProcess> {
    let mut servers = String::new();
    for node in BACKENDS {
        servers.push_str(&format!("  server {node} {}:80\n", lab.node(node)?.ip()));
    }
    let config = work.join(format!("haproxy-{inter}.cfg"));
    std::fs::write(
        &config,
        format!(
            "global\n  maxconn 8000\n  stats socket {} level admin\n\n\
             defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n  timeout check {inter}\n\n\
             frontend web\n  bind {}:80\n  default_backend web\n\n\
             backend web\n  balance roundrobin\n  option httpchk GET /1k.html\n\
             default-server check inter {inter} rise 2 fall 3\n{servers}",
            socket.display(),
            lab.node("nuster1")?.ip()
        ),
    )?;
    let mut command = lab.command("nuster1", "haproxy");
    command
        .arg("-db")
        .arg("-f")
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    lab.spawn("nuster1", &mut command, "haproxy")
}

/// Whether HAProxy has the victim UP (`show stat` on its stats socket).
fn haproxy_victim_up(socket: &Path) -> Option<bool> {
    use std::io::{Read, Write};
    let mut stream = std::os::unix::net::UnixStream::connect(socket).ok()?;
    stream.write_all(b"show stat\n").ok()?;
    let mut text = String::new();
    stream.read_to_string(&mut text).ok()?;
    let header: Vec<&str> = text
        .lines()
        .next()?
        .trim_start_matches("# ")
        .split(',')
        .collect();
    let status = header.iter().position(|h| *h == "status")?;
    let line = text
        .lines()
        .find(|line| line.starts_with(&format!("web,{VICTIM},")))?;
    let state = line.split(',').nth(status)?;
    Some(state.starts_with("UP"))
}

/// One run: wrk against `url`, the victim's nginx stopped mid-run, the
/// time until `removed` says so, wrk's failures; nginx restarted after.
fn measure(
    lab: &Lab,
    work: &Path,
    nginx: &mut Vec<(String, LabProcess)>,
    case: &Case,
    url: &str,
    mut removed: impl FnMut() -> bool,
    report: &mut BenchReport,
) -> Result<()> {
    let seconds = format!("{}s", case.run.as_secs());
    let mut wrk = lab.command(CLIENT, "wrk");
    wrk.args([
        "-t",
        "2",
        "-c",
        "16",
        "-d",
        &seconds,
        "-H",
        "Connection: close",
    ])
    .arg(url)
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let wrk = lab.spawn(CLIENT, &mut wrk, "wrk")?;
    std::thread::sleep(case.stop_after);
    let position = nginx
        .iter()
        .position(|(n, _)| n == VICTIM)
        .context("victim nginx")?;
    let (_, mut victim_nginx) = nginx.remove(position);
    let stopped = Instant::now();
    victim_nginx.terminate(Duration::from_secs(5))?;
    let deadline = case.run.saturating_sub(case.stop_after);
    let mut detection = None;
    while stopped.elapsed() < deadline {
        if removed() {
            detection = Some(stopped.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let output = wrk_output(wrk)?;
    let (requests, failed, rate) =
        parse(&output).with_context(|| format!("parsing wrk output:\n{output}"))?;
    let shown = detection.map_or("not removed".to_owned(), |d| {
        format!("{:.0}", d.as_secs_f64() * 1000.0)
    });
    println!(
        "{:<26} {:>16} {:>10} {:>10} {:>9.0}",
        case.name, shown, requests, failed, rate
    );
    if let Some(detection) = detection {
        report.push(
            case.name,
            "detection_ms",
            detection.as_secs_f64() * 1000.0,
            "ms",
        );
    }
    report.push(case.name, "failed_requests", failed as f64, "1");
    report.push(case.name, "requests", requests as f64, "1");
    report.push(
        case.name,
        "failed_window_s_at_this_rate",
        failed as f64 / rate.max(1.0),
        "s",
    );
    nginx.push((VICTIM.to_owned(), start_nginx(lab, VICTIM, work)?));
    Ok(())
}

fn wrk_output(mut wrk: LabProcess) -> Result<String> {
    let status = wait_for("wrk to finish", Duration::from_secs(60), || {
        wrk.try_wait().ok().flatten()
    })?;
    let mut text = String::new();
    std::io::Read::read_to_string(
        wrk.child_mut().stdout.as_mut().context("wrk stdout")?,
        &mut text,
    )?;
    if !status.success() {
        bail!("wrk failed: {text}");
    }
    Ok(text)
}

/// (requests, failed, requests/s): failed are wrk's socket errors (connect,
/// read, write, timeout) plus non-2xx answers. A refused connect is a
/// failure that wrk does not count as a request, so failed can exceed
/// requests when a dead backend refuses connections fast.
fn parse(text: &str) -> Result<(u64, u64, f64)> {
    let requests = text
        .lines()
        .find_map(|line| line.trim().split_once(" requests in "))
        .and_then(|(n, _)| n.trim().parse().ok())
        .context("no 'requests in' line")?;
    let rate = text
        .lines()
        .find_map(|line| line.trim().strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .context("no Requests/sec line")?;
    let mut failed = 0;
    for line in text.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("Socket errors:") {
            for part in rest.split(',') {
                let number = part
                    .split_whitespace()
                    .last()
                    .and_then(|n| n.parse::<u64>().ok());
                failed += number.unwrap_or(0);
            }
        } else if let Some(rest) = line.strip_prefix("Non-2xx or 3xx responses:") {
            failed += rest.trim().parse::<u64>().unwrap_or(0);
        }
    }
    Ok((requests, failed, rate))
}

#[cfg(test)]
mod tests {
    #[test]
    fn wrk_errors_are_summed() {
        let text = "Running 8s test @ http://192.0.2.100/1k.html\n  2 threads and 16 connections\n\
  12000 requests in 8.00s, 13.2MB read\n  Socket errors: connect 40, read 3, write 0, timeout 2\n\
  Non-2xx or 3xx responses: 1\nRequests/sec:   1500.00\n";
        assert_eq!(super::parse(text).unwrap(), (12000, 46, 1500.0));
    }
}
