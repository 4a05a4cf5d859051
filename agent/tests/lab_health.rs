//! Health checks, runtime control and the status page for real: agents and
//! web servers on the four lab nodes, HTTP checks every 500 ms, clients in
//! the client namespace. nuster1 holds the VIP and balances.

mod support;

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use xtask::lab::{lab_config, unique_prefix, wait_for, Lab, LabGuard, LabProcess, CLIENT};

const AGENT: &str = env!("CARGO_BIN_EXE_agent");
const VIP: &str = "192.0.2.100";
const CHECK: &str =
    "check = { type = \"http\", path = \"/\", interval = \"500ms\", rise = 2, fall = 3 }";

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Field order is drop order: processes stop before the lab goes.
struct Cluster {
    agents: BTreeMap<String, LabProcess>,
    web: BTreeMap<String, LabProcess>,
    lab: LabGuard,
    dir: TempDir,
    config: PathBuf,
}

fn lab_text() -> String {
    std::fs::read_to_string(lab_config()).unwrap().replace(
        "forwarding = \"dsr\"\n",
        &format!("forwarding = \"dsr\"\n{CHECK}\n"),
    )
}

impl Cluster {
    fn start(tag: &str) -> Cluster {
        let lab = LabGuard::up(Lab::new(&unique_prefix(tag)).unwrap()).unwrap();
        let dir = std::env::temp_dir().join(format!("farol-health-{}", lab.prefix()));
        std::fs::create_dir_all(&dir).unwrap();
        let config = dir.join("lab.toml");
        std::fs::write(&config, lab_text()).unwrap();
        let mut cluster = Cluster {
            agents: BTreeMap::new(),
            web: BTreeMap::new(),
            lab,
            dir: TempDir(dir),
            config,
        };
        let names: Vec<String> = cluster.lab.nodes().iter().map(|n| n.name.clone()).collect();
        for name in &names {
            let root = cluster.dir.0.join(name);
            std::fs::create_dir_all(&root).unwrap();
            std::fs::write(root.join("index.html"), format!("{name}\n")).unwrap();
            cluster.start_web(name);
            let agent = cluster.start_agent(name);
            cluster.agents.insert(name.clone(), agent);
        }
        for name in &names {
            cluster.wait_backend("nuster1", name, "up", Duration::from_secs(30));
        }
        cluster
    }

    fn socket(&self, node: &str) -> PathBuf {
        self.dir.0.join(format!("{node}.sock"))
    }

    fn start_agent(&self, node: &str) -> LabProcess {
        let log = self.dir.0.join(format!("agent-{node}.log"));
        let mut agent = self.lab.command(node, AGENT);
        agent
            .args(["run", "--no-supervise", "--node", node, "--config"])
            .arg(&self.config)
            .arg("--pin-dir")
            .arg(self.lab.pin_dir(node))
            .arg("--control-socket")
            .arg(self.socket(node))
            .env("FAROL_LOG", "info")
            .env("NO_COLOR", "1")
            .stderr(std::fs::File::create(log).unwrap());
        self.lab.spawn(node, &mut agent, "agent").unwrap()
    }

    fn start_web(&mut self, node: &str) {
        let root = self.dir.0.join(node);
        let process = self.lab.spawn_static_web(node, &root).unwrap();
        self.web.insert(node.to_owned(), process);
        let ip = self.lab.node(node).unwrap().ip().to_owned();
        wait_for("the web server", Duration::from_secs(10), || {
            self.lab
                .run(
                    CLIENT,
                    "curl",
                    &["-sf", "--max-time", "1", &format!("http://{ip}/")],
                )
                .ok()
                .filter(|out| out.status.success())
        })
        .unwrap();
    }

    fn stop_web(&mut self, node: &str) -> Instant {
        let mut process = self.web.remove(node).unwrap();
        let stopped = Instant::now();
        process.terminate(Duration::from_secs(5)).unwrap();
        stopped
    }

    /// The status JSON of an agent, from its HTTP port.
    fn status(&self, node: &str) -> Option<serde_json::Value> {
        let out = self
            .lab
            .run(
                node,
                "curl",
                &[
                    "-sf",
                    "--max-time",
                    "2",
                    "http://127.0.0.1:9477/status.json",
                ],
            )
            .ok()?;
        serde_json::from_slice(&out.stdout).ok()
    }

    fn backend(&self, on: &str, backend: &str) -> Option<serde_json::Value> {
        let status = self.status(on)?;
        status["services"][0]["backends"]
            .as_array()?
            .iter()
            .find(|b| b["name"] == backend)
            .cloned()
    }

    /// Waits until `on` shows `backend` in `state` (up, down, drain...).
    fn wait_backend(&self, on: &str, backend: &str, state: &str, timeout: Duration) -> Duration {
        let started = Instant::now();
        wait_for(&format!("{on} to show {backend} {state}"), timeout, || {
            self.backend(on, backend).filter(|b| b["state"] == state)
        })
        .unwrap();
        started.elapsed()
    }

    fn cli(&self, node: &str, args: &[&str]) -> std::process::Output {
        Command::new(AGENT)
            .args(args)
            .arg("--socket")
            .arg(self.socket(node))
            .output()
            .unwrap()
    }

    fn log(&self, node: &str) -> String {
        std::fs::read_to_string(self.dir.0.join(format!("agent-{node}.log"))).unwrap_or_default()
    }
}

/// `count` requests to the VIP on new connections: answers per node.
fn requests(lab: &Lab, count: usize) -> BTreeMap<String, usize> {
    let mut answers = BTreeMap::new();
    for _ in 0..count {
        let out = lab
            .run(
                CLIENT,
                "curl",
                &["-sf", "--max-time", "3", &format!("http://{VIP}/")],
            )
            .unwrap();
        assert!(out.status.success(), "HTTP to the VIP failed: {out:?}");
        *answers
            .entry(String::from_utf8_lossy(&out.stdout).trim().to_owned())
            .or_insert(0) += 1;
    }
    answers
}

#[test]
fn a_stopped_web_server_goes_down_after_fall_checks_and_comes_back_after_rise() {
    if !support::privileged(
        "a_stopped_web_server_goes_down_after_fall_checks_and_comes_back_after_rise",
    ) {
        return;
    }
    let mut cluster = Cluster::start("hfall");
    // Keep-alive connections on every backend, to see the live ones stay
    // when nuster3 leaves the table.
    let script = cluster.dir.0.join("holder.py");
    std::fs::write(&script, HOLDER).unwrap();
    let mut holder = cluster.lab.command(CLIENT, "python3");
    holder
        .arg(&script)
        .args([VIP, "8"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
    let mut holder = cluster.lab.spawn(CLIENT, &mut holder, "holder").unwrap();
    let mut lines = BufReader::new(holder.child_mut().stdout.take().unwrap()).lines();
    let before = lines.next().unwrap().unwrap();
    let stopped = cluster.stop_web("nuster3");
    cluster.wait_backend("nuster1", "nuster3", "down", Duration::from_secs(15));
    let detected = stopped.elapsed();
    // fall 3 at 500 ms: at least two intervals after the first failure.
    assert!(
        detected >= Duration::from_millis(900) && detected < Duration::from_secs(6),
        "down after {detected:?}"
    );
    let row = cluster.backend("nuster1", "nuster3").unwrap();
    assert_eq!(row["alive"], false);
    assert!(row["checks_failed"].as_u64().unwrap() >= 3, "{row}");
    assert_eq!(row["last_check"], "connection refused", "{row}");
    let log = cluster.log("nuster1");
    assert_eq!(
        log.matches("backend down: 3 consecutive checks failed")
            .count(),
        1,
        "the change is logged once with its reason:\n{log}"
    );
    let metrics = cluster.lab.metrics("nuster1").unwrap();
    assert_eq!(
        metrics["farol_health_backend_check_up{service=\"web\",backend=\"nuster3\"}"],
        0
    );
    assert_eq!(
        metrics["farol_lb_backend_up{service=\"web\",backend=\"nuster3\"}"],
        0
    );
    let answers = requests(&cluster.lab, 24);
    assert!(
        !answers.contains_key("nuster3"),
        "no new flow reaches nuster3: {answers:?}"
    );
    assert_eq!(answers.len(), 3, "{answers:?}");

    // Established flows on live backends stayed where they were; those on
    // nuster3 died with its server.
    holder
        .child_mut()
        .stdin
        .as_mut()
        .unwrap()
        .write_all(b"go\n")
        .unwrap();
    let after = lines.next().unwrap().unwrap();
    for (was, now) in before.split(' ').zip(after.split(' ')) {
        if was == "nuster3" {
            assert!(now.starts_with("error:"), "{before} -> {after}");
        } else {
            assert_eq!(
                was, now,
                "a flow on a live backend moved: {before} -> {after}"
            );
        }
    }

    // The status page in a real browser, with nuster3 shown down.
    browser_shows_the_backend_down(&cluster, "nuster3");

    // Every family on a live agent (data plane included) passes promtool.
    let out = cluster
        .lab
        .run("nuster1", "curl", &["-sf", "http://127.0.0.1:9477/metrics"])
        .unwrap();
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian prometheus; cargo xtask setup)");
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(&out.stdout)
        .unwrap();
    let checked = promtool.wait_with_output().unwrap();
    assert!(checked.status.success(), "promtool: {checked:?}");

    cluster.start_web("nuster3");
    let restarted = Instant::now();
    cluster.wait_backend("nuster1", "nuster3", "up", Duration::from_secs(15));
    let back = restarted.elapsed();
    assert!(back < Duration::from_secs(5), "up after {back:?}");
    assert!(cluster
        .log("nuster1")
        .contains("backend up: 2 consecutive checks passed"));
    let answers = requests(&cluster.lab, 24);
    assert!(
        answers.get("nuster3").is_some_and(|n| *n >= 3),
        "{answers:?}"
    );
}

/// Loads the status page from the client namespace in headless Chromium,
/// checks the rendered DOM and keeps a phone-sized screenshot under
/// target/lab-health/.
fn browser_shows_the_backend_down(cluster: &Cluster, backend: &str) {
    if !support::may_run(
        "status page in chromium",
        (!Path::new("/usr/bin/chromium").exists())
            .then_some("chromium is missing (cargo xtask setup)"),
    ) {
        return;
    }
    let artifacts = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/lab-health");
    std::fs::create_dir_all(&artifacts).unwrap();
    let profile = cluster.dir.0.join("chromium");
    let url = "http://192.0.2.11:9477/status";
    let chromium = |extra: &[&str]| {
        let mut command = cluster.lab.command(CLIENT, "chromium");
        command
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--hide-scrollbars",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .args(extra)
            .arg(url)
            .env("HOME", &cluster.dir.0)
            .stdin(Stdio::null());
        let out = command.output().unwrap();
        assert!(out.status.success(), "chromium: {out:?}");
        out
    };
    let dom = String::from_utf8_lossy(&chromium(&["--dump-dom"]).stdout).into_owned();
    assert!(
        dom.contains(&format!("<tr class=\"down\" data-backend=\"{backend}\">")),
        "the page shows {backend} down: {dom}"
    );
    assert!(dom.contains("connection refused"), "{dom}");
    assert!(dom.contains("data-backend=\"nuster1\""), "{dom}");
    let shot = artifacts.join("status-page.png");
    let _ = std::fs::remove_file(&shot);
    chromium(&[
        &format!("--screenshot={}", shot.display()),
        "--window-size=412,915",
    ]);
    let size = std::fs::metadata(&shot).map(|m| m.len()).unwrap_or(0);
    assert!(
        size > 1000,
        "a screenshot was written to {}",
        shot.display()
    );
}

/// Opens `n` keep-alive connections to the VIP, asks each once, prints the
/// answering nodes; on a line from stdin asks each again and prints them.
const HOLDER: &str = r#"
import http.client, sys
conns = [http.client.HTTPConnection(sys.argv[1], 80, timeout=5) for _ in range(int(sys.argv[2]))]
def ask():
    out = []
    for c in conns:
        try:
            c.request("GET", "/")
            out.append(c.getresponse().read().decode().strip())
        except Exception as e:
            out.append("error:" + type(e).__name__)
    print(" ".join(out), flush=True)
ask()
sys.stdin.readline()
ask()
"#;

#[test]
fn drain_sends_no_new_flows_and_lets_established_ones_finish() {
    if !support::privileged("drain_sends_no_new_flows_and_lets_established_ones_finish") {
        return;
    }
    let cluster = Cluster::start("hdrain");
    let script = cluster.dir.0.join("holder.py");
    std::fs::write(&script, HOLDER).unwrap();
    let mut holder = cluster.lab.command(CLIENT, "python3");
    holder
        .arg(&script)
        .args([VIP, "8"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
    let mut holder = cluster.lab.spawn(CLIENT, &mut holder, "holder").unwrap();
    let mut lines = BufReader::new(holder.child_mut().stdout.take().unwrap()).lines();
    let before = lines.next().unwrap().unwrap();
    let on_nuster3 = before.split(' ').filter(|n| *n == "nuster3").count();
    assert!(
        on_nuster3 >= 1,
        "roundrobin put a connection on nuster3: {before}"
    );

    // The drain is asked for on nuster3 itself (its Apache is about to
    // stop): nuster1 learns it through the agent check.
    let out = cluster.cli("nuster3", &["backend", "drain", "nuster3"]);
    assert!(out.status.success(), "{out:?}");
    let took = cluster.wait_backend("nuster1", "nuster3", "drain", Duration::from_secs(5));
    // One 500 ms interval, the check itself and this poll (curl) under load.
    assert!(
        took < Duration::from_millis(2500),
        "drain reached the balancer in {took:?}"
    );
    let row = cluster.backend("nuster1", "nuster3").unwrap();
    assert_eq!(
        (row["alive"].as_bool(), row["weight"].as_u64()),
        (Some(true), Some(0)),
        "{row}"
    );
    let answers = requests(&cluster.lab, 24);
    assert!(
        !answers.contains_key("nuster3"),
        "no new flow on a drained backend: {answers:?}"
    );

    // The established connections still work, on the same backends.
    holder
        .child_mut()
        .stdin
        .as_mut()
        .unwrap()
        .write_all(b"go\n")
        .unwrap();
    let after = lines.next().unwrap().unwrap();
    assert_eq!(after, before, "established flows stay where they were");

    let out = cluster.cli("nuster3", &["backend", "enable", "nuster3"]);
    assert!(out.status.success(), "{out:?}");
    cluster.wait_backend("nuster1", "nuster3", "up", Duration::from_secs(5));
    let status = cluster.cli("nuster1", &["status"]);
    let table = String::from_utf8_lossy(&status.stdout);
    assert!(
        status.status.success() && table.contains("nuster3") && table.contains("HTTP 200"),
        "{status:?}"
    ); // The mode the XDP program actually attached in (veth has native XDP;
       // a Pi 4's NIC only generic), the same as farol_xdp_attached says.
    assert!(
        table.contains("XDP on eth0: native mode") || table.contains("XDP on eth0: generic mode"),
        "{table}"
    );
}

#[test]
fn reload_applies_a_changed_weight_and_refuses_a_broken_file() {
    if !support::privileged("reload_applies_a_changed_weight_and_refuses_a_broken_file") {
        return;
    }
    let cluster = Cluster::start("hreload");
    let text = lab_text().replace(
        "{ node = \"nuster2\" }",
        "{ node = \"nuster2\", weight = 300 }",
    );
    std::fs::write(&cluster.config, text).unwrap();
    let out = cluster.cli("nuster1", &["reload"]);
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("service web changed"),
        "{out:?}"
    );
    wait_for("the new weight", Duration::from_secs(5), || {
        cluster
            .backend("nuster1", "nuster2")
            .filter(|b| b["weight"] == 300)
    })
    .unwrap();
    // Health state of unchanged backends was kept: no backend went through
    // a fresh start (their check counters kept counting).
    let answers = requests(&cluster.lab, 30);
    let nuster2 = answers.get("nuster2").copied().unwrap_or(0);
    assert!(
        (12..=18).contains(&nuster2),
        "300 of 600 weight: {answers:?}"
    );

    // A broken file is refused, the agent keeps running the old config.
    std::fs::write(
        &cluster.config,
        lab_text().replace("port = 80", "port = \"eighty\""),
    )
    .unwrap();
    let out = cluster.cli("nuster1", &["reload"]);
    assert!(!out.status.success(), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("service[0].port"), "{stderr}");
    // SIGHUP takes the same path.
    let pid = cluster.agents["nuster1"].pid();
    unsafe { libc::kill(pid as i32, libc::SIGHUP) };
    wait_for("the refused SIGHUP reload", Duration::from_secs(5), || {
        cluster
            .lab
            .metrics("nuster1")?
            .get("farol_config_reloads_total{result=\"refused\"}")
            .filter(|n| **n == 2)
            .copied()
    })
    .unwrap();
    assert_eq!(
        cluster.backend("nuster1", "nuster2").unwrap()["weight"],
        300
    );
    requests(&cluster.lab, 8);
    assert!(cluster.log("nuster1").contains("config reload refused"));
}
