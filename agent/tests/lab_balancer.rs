//! The balancer for real: agents on all four lab nodes, web servers on all
//! four, HTTP from the client to the VIP. nuster1 holds the VIP and spreads
//! flows in DSR mode; the backends answer the client directly.

mod support;

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use xtask::lab::{lab_config, unique_prefix, wait_for, Lab, LabGuard, LabProcess, CLIENT};

const AGENT: &str = env!("CARGO_BIN_EXE_agent");
const VIP: &str = "192.0.2.100";

fn scrape(lab: &Lab, node: &str) -> Option<BTreeMap<String, u64>> {
    let out = lab
        .run(
            node,
            "curl",
            &["-sf", "--max-time", "2", "http://127.0.0.1:9477/metrics"],
        )
        .ok()?;
    out.status.success().then(|| {
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|line| !line.starts_with('#'))
            .filter_map(|line| {
                let (key, value) = line.rsplit_once(' ')?;
                Some((key.to_owned(), value.parse().ok()?))
            })
            .collect()
    })
}

/// A config like the lab's with the web service's scheduler replaced.
fn config_with(dir: &Path, scheduler: &str) -> PathBuf {
    let text = std::fs::read_to_string(lab_config()).unwrap().replace(
        "scheduler = \"roundrobin\"",
        &format!("scheduler = \"{scheduler}\""),
    );
    let path = dir.join(format!("lab-{scheduler}.toml"));
    std::fs::write(&path, text).unwrap();
    path
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

/// The lab with a web server and an agent on every node, all backends up.
fn cluster(tag: &str, scheduler: &str) -> Cluster {
    let lab = LabGuard::up(Lab::new(&unique_prefix(tag)).unwrap()).unwrap();
    let dir = std::env::temp_dir().join(format!("farol-lb-{}", lab.prefix()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = config_with(&dir, scheduler);
    let mut processes = Vec::new();
    for node in lab.nodes() {
        let root = dir.join(&node.name);
        std::fs::create_dir_all(&root).unwrap();
        std::fs::write(root.join("index.html"), format!("{}\n", node.name)).unwrap();
        let mut server = lab.command(&node.name, "python3");
        server
            .args([
                "-m",
                "http.server",
                "80",
                "--bind",
                "0.0.0.0",
                "--directory",
            ])
            .arg(&root)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        processes.push(lab.spawn(&node.name, &mut server, "web").unwrap());
        let mut agent = lab.command(&node.name, AGENT);
        agent
            .args(["run", "--node", &node.name, "--config"])
            .arg(&config)
            .arg("--pin-dir")
            .arg(lab.pin_dir(&node.name))
            .env("FAROL_LOG", "info")
            .stderr(Stdio::null());
        processes.push(lab.spawn(&node.name, &mut agent, "agent").unwrap());
    }
    wait_for(
        "nuster1 to see all four backends up",
        Duration::from_secs(30),
        || {
            let metrics = scrape(&lab, "nuster1")?;
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
    for node in lab.nodes() {
        let ip = node.ip().to_owned();
        wait_for("web servers", Duration::from_secs(10), || {
            lab.run(
                CLIENT,
                "curl",
                &["-sf", "--max-time", "1", &format!("http://{ip}/")],
            )
            .ok()
            .filter(|out| out.status.success())
        })
        .unwrap();
    }
    Cluster {
        processes,
        lab,
        _dir: TempDir(dir),
    }
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
