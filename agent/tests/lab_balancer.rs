//! The balancer for real: agents on all four lab nodes, each running Apache
//! (the seed's web tier), HTTP from the client to the VIP. nuster1 holds the VIP and spreads
//! flows in DSR mode; the backends answer the client directly.

mod support;

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use xtask::{
    apache::lab_apache,
    lab::{lab_config, unique_prefix, wait_for, Lab, LabGuard, LabProcess, CLIENT},
};

const AGENT: &str = env!("CARGO_BIN_EXE_agent");
const VIP: &str = "192.0.2.100";

fn scrape(lab: &Lab, node: &str) -> Option<BTreeMap<String, u64>> {
    lab.metrics(node)
}

/// Waits until nuster1, which holds the VIP, sees all four backends up.
fn wait_for_all_backends_up(lab: &Lab) {
    wait_for(
        "nuster1 to see all four backends up",
        Duration::from_secs(30),
        || {
            let metrics = scrape(lab, "nuster1")?;
            let up = (1..=4)
                .filter(|n| {
                    metrics.get(&format!(
                        "farol_lb_backend_up{{service=\"web\",backend=\"nuster{n}\"}}"
                    )) == Some(&1)
                })
                .count();
            (up == 4).then_some(())
        },
    )
    .unwrap();
}

/// A config like the lab's with the web service's scheduler replaced and
/// without its `[[vrrp]]` section: nuster1 holds the VIP throughout, as
/// these tests expect (VRRP failover has its own tests, lab_vrrp.rs).
fn config_with(dir: &Path, scheduler: &str) -> PathBuf {
    let full = std::fs::read_to_string(lab_config()).unwrap();
    let text = without_vrrp(&full).replace(
        "scheduler = \"roundrobin\"",
        &format!("scheduler = \"{scheduler}\""),
    );
    let path = dir.join(format!("lab-{scheduler}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

/// `text` without its `[[vrrp]]` sections (each up to the next table).
fn without_vrrp(text: &str) -> String {
    let mut kept = String::new();
    let mut in_vrrp = false;
    for line in text.lines() {
        if line.starts_with('[') {
            in_vrrp = line.trim() == "[[vrrp]]";
        }
        if !in_vrrp {
            kept.push_str(line);
            kept.push('\n');
        }
    }
    kept
}

/// Waits until every node's web server answers the client directly.
fn wait_for_web_servers(lab: &Lab, limit: Duration) {
    for node in lab.nodes() {
        let url = format!("http://{}/", node.ip());
        wait_for(&format!("the web server on {}", node.name), limit, || {
            lab.run(CLIENT, "curl", &["-sf", "--max-time", "1", &url])
                .ok()
                .filter(|out| out.status.success())
        })
        .unwrap();
    }
}

/// A temporary directory removed on drop.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Field order is drop order: processes stop before the lab goes.
struct Cluster {
    processes: Vec<LabProcess>,
    lab: LabGuard,
    _dir: TempDir,
}

/// The lab with an agent on every node, each running Apache from the lab
/// config's `[[supervise]]` entry (the seed's web tier), all backends up;
/// without VRRP, so nuster1 holds the VIP throughout.
fn cluster(tag: &str, scheduler: &str) -> Cluster {
    let lab = LabGuard::up(Lab::new(&unique_prefix(tag)).unwrap()).unwrap();
    let dir = std::env::temp_dir().join(format!("farol-lb-{}", lab.prefix()));
    std::fs::create_dir_all(&dir).unwrap();
    let names: Vec<String> = lab.nodes().iter().map(|n| n.name.clone()).collect();
    let apache = lab_apache(&dir, &names, |text| {
        without_vrrp(&text).replace(
            "scheduler = \"roundrobin\"",
            &format!("scheduler = \"{scheduler}\""),
        )
    })
    .unwrap();
    let mut processes = Vec::new();
    for node in lab.nodes() {
        let log = dir.join(format!("agent-{}.log", node.name));
        processes.push(spawn_agent(
            &lab,
            &node.name,
            &apache.cluster_file,
            &log,
            true,
        ));
    }
    wait_for_all_backends_up(&lab);
    wait_for_web_servers(&lab, Duration::from_secs(30));
    support::wait_until_every_node_is_ready_at(&lab, "nuster1");
    Cluster {
        processes,
        lab,
        _dir: TempDir(dir),
    }
}

/// The lab with a Python web server and an agent without Apache on every
/// node, all backends up: for tests that kill agents, whose successors
/// would restart the Apache they supervised.
fn cluster_with_own_servers(tag: &str, scheduler: &str) -> Cluster {
    let lab = LabGuard::up(Lab::new(&unique_prefix(tag)).unwrap()).unwrap();
    let dir = std::env::temp_dir().join(format!("farol-lb-{}", lab.prefix()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = config_with(&dir, scheduler);
    let mut processes = Vec::new();
    let log = |node: &str| dir.join(format!("agent-{node}.log"));
    for node in lab.nodes() {
        let root = dir.join(&node.name);
        std::fs::create_dir_all(&root).unwrap();
        std::fs::write(root.join("index.html"), format!("{}\n", node.name)).unwrap();
        processes.push(lab.spawn_static_web(&node.name, &root).unwrap());
        processes.push(start_agent(&lab, &node.name, &config, &log(&node.name)));
    }
    wait_for_all_backends_up(&lab);
    wait_for_web_servers(&lab, Duration::from_secs(10));
    Cluster {
        processes,
        lab,
        _dir: TempDir(dir),
    }
}

/// An agent without Apache, for tests that run their own servers.
fn start_agent(lab: &Lab, node: &str, config: &Path, log: &Path) -> LabProcess {
    spawn_agent(lab, node, config, log, false)
}

fn spawn_agent(lab: &Lab, node: &str, config: &Path, log: &Path, apache: bool) -> LabProcess {
    let mut agent = lab.command(node, AGENT);
    agent.arg("run");
    if !apache {
        agent.arg("--no-supervise");
    }
    agent
        .args(["--node", node, "--config"])
        .arg(config)
        .arg("--pin-dir")
        .arg(lab.pin_dir(node))
        .env("FAROL_LOG", "info")
        .env("NO_COLOR", "1")
        .stderr(std::fs::File::create(log).unwrap());
    lab.spawn(node, &mut agent, "agent").unwrap()
}

/// `count` HTTP requests to the VIP, each on a new connection; responses
/// per node.
fn requests(lab: &Lab, count: usize, local_port: Option<u16>) -> BTreeMap<String, usize> {
    let mut answers = BTreeMap::new();
    for _ in 0..count {
        let mut args = vec!["-sf", "--max-time", "3"];
        let port;
        if let Some(p) = local_port {
            port = p.to_string();
            args.extend(["--local-port", &port]);
        }
        let url = format!("http://{VIP}/");
        args.push(&url);
        let out = lab.run(CLIENT, "curl", &args).unwrap();
        assert!(out.status.success(), "HTTP to the VIP failed: {out:?}");
        *answers
            .entry(String::from_utf8_lossy(&out.stdout).trim().to_owned())
            .or_insert(0) += 1;
    }
    answers
}

#[test]
fn roundrobin_spreads_http_over_all_four_nodes_in_dsr_mode() {
    if !support::privileged("roundrobin_spreads_http_over_all_four_nodes_in_dsr_mode") {
        return;
    }
    let cluster = cluster("lbrr", "roundrobin");
    let answers = requests(&cluster.lab, 40, None);
    assert_eq!(answers.len(), 4, "all four nodes answered: {answers:?}");
    for (node, count) in &answers {
        assert!(
            (6..=14).contains(count),
            "{node} answered {count} of 40: {answers:?}"
        );
    }
    let metrics = scrape(&cluster.lab, "nuster1").unwrap();
    assert!(metrics["farol_lb_service_new_flows_total{service=\"web\"}"] >= 40);
    // DSR: the balancer forwarded client packets to the other nodes, and
    // their replies went straight to the client (not counted at nuster1).
    for n in 2..=4 {
        let key =
            format!("farol_lb_backend_packets_total{{service=\"web\",backend=\"nuster{n}\"}}");
        assert!(metrics[&key] >= 4, "{key} = {}", metrics[&key]);
    }
    // The backup nodes passed the forwarded packets up: their VIP is not owned.
    let nuster2 = scrape(&cluster.lab, "nuster2").unwrap();
    assert!(nuster2["farol_lb_service_not_owned_packets_total{service=\"web\"}"] >= 4);
    // A ping to the VIP is answered (by the node holding it).
    let ping = cluster
        .lab
        .run(CLIENT, "ping", &["-c", "1", "-W", "2", VIP])
        .unwrap();
    assert!(ping.status.success(), "ping to the VIP: {ping:?}");
}

#[test]
fn source_keeps_a_client_on_one_node_and_maglev_spreads_flows() {
    if !support::privileged("source_keeps_a_client_on_one_node_and_maglev_spreads_flows") {
        return;
    }
    let source = cluster("lbsrc", "source");
    let answers = requests(&source.lab, 12, None);
    assert_eq!(answers.len(), 1, "one client, one backend: {answers:?}");
    drop(source);

    let maglev = cluster("lbmag", "maglev");
    let answers = requests(&maglev.lab, 40, None);
    assert!(
        answers.len() >= 3,
        "40 flows hashed over four nodes: {answers:?}"
    );
}

#[test]
fn agents_stop_cleanly_and_remove_the_vip_from_lo() {
    if !support::privileged("agents_stop_cleanly_and_remove_the_vip_from_lo") {
        return;
    }
    let cluster = cluster("lbstop", "roundrobin");
    let lo = |node: &str| {
        let out = Command::new("ip")
            .args([
                "-n",
                &cluster.lab.netns(node),
                "-o",
                "addr",
                "show",
                "dev",
                "lo",
            ])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).contains(VIP)
    };
    assert!(
        lo("nuster1") && lo("nuster3"),
        "the VIP is on lo while agents run"
    );
    let Cluster {
        processes,
        lab,
        _dir,
    } = cluster;
    for mut process in processes.into_iter().rev() {
        let status = process.terminate(Duration::from_secs(10)).unwrap();
        if process.label().starts_with("agent") {
            assert!(status.success(), "{} exited {status}", process.label());
        }
    }
    for node in ["nuster1", "nuster2", "nuster3", "nuster4"] {
        let out = Command::new("ip")
            .args(["-n", &lab.netns(node), "-o", "addr", "show", "dev", "lo"])
            .output()
            .unwrap();
        assert!(
            !String::from_utf8_lossy(&out.stdout).contains(VIP),
            "{node} still holds the VIP on lo"
        );
        assert_eq!(lab.xdp_program_id(node).unwrap(), None);
    }
}

#[test]
fn a_killed_agent_leaves_flows_running_and_its_successor_adopts_them() {
    if !support::privileged("a_killed_agent_leaves_flows_running_and_its_successor_adopts_them") {
        return;
    }
    let mut cluster = cluster_with_own_servers("lbkill", "roundrobin");
    let dir = cluster._dir.0.clone();
    let script = dir.join("keepalive.py");
    std::fs::write(&script, xtask::lab::KEEPALIVE_CLIENT).unwrap();
    let mut client = cluster.lab.command(CLIENT, "python3");
    client.arg(&script).args([VIP, "6"]).stdout(Stdio::piped());
    let mut client = cluster
        .lab
        .spawn(CLIENT, &mut client, "keep-alive client")
        .unwrap();
    std::thread::sleep(Duration::from_millis(800));

    // SIGKILL the agent holding the VIP: nothing of it runs any more.
    let index = cluster
        .processes
        .iter()
        .position(|p| p.label() == "agent@nuster1")
        .unwrap();
    let mut killed = cluster.processes.remove(index);
    let program_before = cluster
        .lab
        .xdp_program_id("nuster1")
        .unwrap()
        .expect("attached");
    // SAFETY: kill on a PID we spawned; no memory effects.
    unsafe { libc::kill(killed.pid() as i32, libc::SIGKILL) };
    wait_for("the agent to die", Duration::from_secs(5), || {
        killed.try_wait().ok().flatten()
    })
    .unwrap();
    assert_eq!(
        cluster.lab.xdp_program_id("nuster1").unwrap(),
        Some(program_before),
        "the program stays attached through its pinned link"
    );
    let out = cluster
        .lab
        .run(
            CLIENT,
            "curl",
            &["-sf", "--max-time", "2", &format!("http://{VIP}/")],
        )
        .unwrap();
    assert!(
        out.status.success(),
        "new flows are balanced while no agent runs: {out:?}"
    );

    // A new agent re-adopts the running data plane.
    let log = dir.join("agent-nuster1-second.log");
    let config = dir.join("lab-roundrobin.toml");
    cluster
        .processes
        .push(start_agent(&cluster.lab, "nuster1", &config, &log));
    wait_for(
        "the second agent to re-adopt",
        Duration::from_secs(20),
        || {
            std::fs::read_to_string(&log)
                .ok()
                .filter(|text| text.contains("re-adopted the running data plane"))
        },
    )
    .unwrap();
    let program_after = cluster
        .lab
        .xdp_program_id("nuster1")
        .unwrap()
        .expect("attached");
    assert_ne!(
        program_after, program_before,
        "the new agent's program replaced the old one in place"
    );

    let status = wait_for("the keep-alive client", Duration::from_secs(20), || {
        client.try_wait().ok().flatten()
    })
    .unwrap();
    assert!(status.success());
    let mut report = String::new();
    std::io::Read::read_to_string(client.child_mut().stdout.as_mut().unwrap(), &mut report)
        .unwrap();
    let fields: Vec<&str> = report.split_whitespace().collect();
    let (ok, errors, connections, nodes) = (
        fields[0].parse::<u32>().unwrap(),
        fields[1],
        fields[2],
        fields.get(3).copied().unwrap_or(""),
    );
    assert_eq!(
        errors, "0",
        "the established connection never failed: {report}"
    );
    assert_eq!(connections, "1", "one TCP connection throughout: {report}");
    assert!(
        ok >= 40,
        "requests kept flowing through the kill and restart: {report}"
    );
    assert!(
        !nodes.contains(','),
        "one connection, one backend throughout: {report}"
    );
}

/// Answers every datagram with this node's name, from the address it was
/// sent to (bound to the VIP, so DSR replies leave from the VIP).
const UDP_SERVER: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], int(sys.argv[2])))
open(sys.argv[4], "w").close()
while True:
    data, peer = s.recvfrom(2048)
    s.sendto(sys.argv[3].encode(), peer)
"#;

/// Sends one datagram from each of `count` source ports; prints the
/// answering node per datagram.
const UDP_CLIENT: &str = r#"
import socket, sys
for i in range(int(sys.argv[3])):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(2)
    s.sendto(b"ping", (sys.argv[1], int(sys.argv[2])))
    try:
        print(s.recvfrom(2048)[0].decode())
    except socket.timeout:
        print("timeout")
    s.close()
"#;

#[test]
fn udp_flows_are_balanced_in_dsr_mode() {
    if !support::privileged("udp_flows_are_balanced_in_dsr_mode") {
        return;
    }
    let lab = LabGuard::up(Lab::new(&unique_prefix("lbudp")).unwrap()).unwrap();
    let dir = TempDir(std::env::temp_dir().join(format!("farol-lb-{}", lab.prefix())));
    std::fs::create_dir_all(&dir.0).unwrap();
    let text = std::fs::read_to_string(lab_config()).unwrap().replace(
        "port = 80\nprotocol = \"tcp\"",
        "port = 5353\nprotocol = \"udp\"",
    );
    assert!(
        text.contains("protocol = \"udp\""),
        "the lab config changed shape"
    );
    let config = dir.0.join("lab-udp.toml");
    std::fs::write(&config, text).unwrap();
    std::fs::write(dir.0.join("server.py"), UDP_SERVER).unwrap();
    std::fs::write(dir.0.join("client.py"), UDP_CLIENT).unwrap();
    let mut processes = Vec::new();
    for node in lab.nodes() {
        processes.push(start_agent(
            &lab,
            &node.name,
            &config,
            &dir.0.join(format!("{}.log", node.name)),
        ));
    }
    // The VIP is on lo once the agents run; the servers bind to it.
    for node in lab.nodes() {
        wait_for("the VIP on lo", Duration::from_secs(20), || {
            let out = lab
                .run(&node.name, "ip", &["-o", "addr", "show", "dev", "lo"])
                .ok()?;
            String::from_utf8_lossy(&out.stdout)
                .contains(VIP)
                .then_some(())
        })
        .unwrap();
        let mut server = lab.command(&node.name, "python3");
        server
            .arg(dir.0.join("server.py"))
            .args([VIP, "5353", &node.name])
            .arg(dir.0.join(format!("{}.ready", node.name)))
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        processes.push(lab.spawn(&node.name, &mut server, "udp server").unwrap());
    }
    wait_for_all_backends_up(&lab);
    for node in lab.nodes() {
        let ready = dir.0.join(format!("{}.ready", node.name));
        wait_for("the UDP server to bind", Duration::from_secs(10), || {
            ready.exists().then_some(())
        })
        .unwrap();
    }
    let out = lab
        .command(CLIENT, "python3")
        .arg(dir.0.join("client.py"))
        .args([VIP, "5353", "20"])
        .output()
        .unwrap();
    let answers: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(answers.len(), 20, "{answers:?}");
    assert!(
        !answers.iter().any(|a| a == "timeout"),
        "every datagram answered: {answers:?}"
    );
    let distinct: std::collections::BTreeSet<&String> = answers.iter().collect();
    assert_eq!(
        distinct.len(),
        4,
        "roundrobin reaches all four nodes over UDP: {answers:?}"
    );
    drop(processes);
}

/// NAT mode: only nuster1 runs an agent; nuster2..4 are bare servers on
/// port 8080 (TCP) and 5353 (UDP) with no VIP and no set-up at all.
#[test]
fn nat_mode_serves_tcp_and_udp_through_backends_that_have_no_setup() {
    if !support::privileged("nat_mode_serves_tcp_and_udp_through_backends_that_have_no_setup") {
        return;
    }
    let lab = LabGuard::up(Lab::new(&unique_prefix("lbnat")).unwrap()).unwrap();
    let dir = TempDir(std::env::temp_dir().join(format!("farol-lb-{}", lab.prefix())));
    std::fs::create_dir_all(&dir.0).unwrap();
    let text = std::fs::read_to_string(lab_config()).unwrap();
    let nodes = text.split("[[service]]").next().unwrap();
    let backends = |port: u16| {
        (2..=4)
            .map(|n| format!("{{ node = \"nuster{n}\", port = {port} }}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let config = dir.0.join("lab-nat.toml");
    std::fs::write(
        &config,
        format!(
            "{nodes}\n[[service]]\nname = \"web\"\nvip = \"{VIP}\"\nport = 80\nscheduler = \"roundrobin\"\n\
             forwarding = \"nat\"\nbackends = [{}]\n\n\
             [[service]]\nname = \"dns\"\nvip = \"{VIP}\"\nport = 5353\nprotocol = \"udp\"\n\
             forwarding = \"nat\"\nbackends = [{}]\n",
            backends(8080),
            backends(5353)
        ),
    )
    .unwrap();
    std::fs::write(dir.0.join("server.py"), UDP_SERVER).unwrap();
    std::fs::write(dir.0.join("client.py"), UDP_CLIENT).unwrap();
    let mut processes = Vec::new();
    for n in 2..=4 {
        let node = format!("nuster{n}");
        let root = dir.0.join(&node);
        std::fs::create_dir_all(&root).unwrap();
        std::fs::write(root.join("index.html"), format!("{node}\n")).unwrap();
        let mut web = lab.command(&node, "python3");
        web.args(["-m", "http.server", "8080", "--directory"])
            .arg(&root)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.0.join(format!("{node}-web.log"))).unwrap());
        processes.push(lab.spawn(&node, &mut web, "web").unwrap());
        let mut udp = lab.command(&node, "python3");
        udp.arg(dir.0.join("server.py"))
            .args(["0.0.0.0", "5353", &node])
            .arg(dir.0.join(format!("{node}.ready")))
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        processes.push(lab.spawn(&node, &mut udp, "udp server").unwrap());
    }
    processes.push(start_agent(
        &lab,
        "nuster1",
        &config,
        &dir.0.join("nuster1.log"),
    ));
    wait_for(
        "nuster1 to see the NAT backends up",
        Duration::from_secs(30),
        || {
            let metrics = scrape(&lab, "nuster1")?;
            let up = (2..=4)
                .filter(|n| {
                    metrics.get(&format!(
                        "farol_lb_backend_up{{service=\"web\",backend=\"nuster{n}\"}}"
                    )) == Some(&1)
                })
                .count();
            (up == 3).then_some(())
        },
    )
    .unwrap();
    for n in 2..=4 {
        let url = format!("http://192.0.2.1{n}:8080/");
        wait_for("the web servers", Duration::from_secs(10), || {
            lab.run(CLIENT, "curl", &["-sf", "--max-time", "1", &url])
                .ok()
                .filter(|out| out.status.success())
        })
        .unwrap();
        let ready = dir.0.join(format!("nuster{n}.ready"));
        wait_for("the UDP servers", Duration::from_secs(10), || {
            ready.exists().then_some(())
        })
        .unwrap();
    }

    let answers = requests(&lab, 30, None);
    assert_eq!(answers.len(), 3, "three NAT backends answered: {answers:?}");
    for (node, count) in &answers {
        assert!(
            (5..=15).contains(count),
            "{node} answered {count} of 30: {answers:?}"
        );
    }
    // To the backends, every request through the VIP came from the
    // balancer (the client's one is the readiness check above).
    let log = std::fs::read_to_string(dir.0.join("nuster2-web.log")).unwrap();
    let from = |addr: &str| log.lines().filter(|l| l.starts_with(addr)).count();
    assert_eq!(
        (from("192.0.2.11 "), from("192.0.2.2 ")),
        (answers["nuster2"], 1),
        "nuster2's requests came from the balancer:\n{log}"
    );

    let out = lab
        .run(
            CLIENT,
            "python3",
            &[dir.0.join("client.py").to_str().unwrap(), VIP, "5353", "20"],
        )
        .unwrap();
    let replies = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = replies.lines().collect();
    assert_eq!(lines.len(), 20, "{replies}");
    assert!(
        !lines.contains(&"timeout"),
        "every datagram answered: {replies}"
    );
    let distinct: std::collections::BTreeSet<&str> = lines.iter().copied().collect();
    assert!(distinct.len() >= 2, "UDP flows spread: {replies}");

    let metrics = scrape(&lab, "nuster1").unwrap();
    let translated = |service: &str| {
        metrics[&format!("farol_lb_service_nat_replies_packets_total{{service=\"{service}\"}}")]
    };
    assert!(
        translated("web") >= 60,
        "HTTP replies translated: {}",
        translated("web")
    );
    assert!(
        translated("dns") >= 20,
        "UDP replies translated: {}",
        translated("dns")
    );
    drop(processes);
}
