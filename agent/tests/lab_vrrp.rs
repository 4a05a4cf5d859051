//! VRRP for real: agents on the four lab nodes, nuster1 (priority 150) and
//! nuster2 (100) in one virtual router for the VIP in front of web servers
//! on nuster2..nuster4 (DSR, Maglev). The master dies (kill -9), loses its
//! link or stops cleanly; the VIP moves, HTTP through the VIP keeps
//! answering, an established connection survives, and the old master comes
//! back as preemption says. keepalived stands in for either agent.

mod support;

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use xtask::lab::{lab_config, unique_prefix, wait_for, Lab, LabGuard, LabProcess, CLIENT};

const AGENT: &str = env!("CARGO_BIN_EXE_agent");
const VIP: &str = "192.0.2.100";
const BACKENDS: [&str; 3] = ["nuster2", "nuster3", "nuster4"];

/// How the virtual router is configured in a test.
#[derive(Clone)]
struct Router {
    advert_interval: &'static str,
    preempt: bool,
    /// Unicast: each balancer lists the other; else multicast.
    unicast: bool,
    /// Extra lines for the `[[vrrp]]` section (track, notify).
    extra: String,
}

impl Default for Router {
    fn default() -> Router {
        Router {
            advert_interval: "100ms",
            preempt: true,
            unicast: false,
            extra: String::new(),
        }
    }
}

/// The lab's nodes, a Maglev DSR service on nuster2..4 and the router.
fn write_config(dir: &Path, router: &Router) -> PathBuf {
    let text = std::fs::read_to_string(lab_config()).unwrap();
    let nodes = text.split("[[service]]").next().unwrap();
    let backends: Vec<String> = BACKENDS
        .iter()
        .map(|n| format!("{{ node = \"{n}\" }}"))
        .collect();
    let config = format!(
        "{nodes}\n[[service]]\nname = \"web\"\nvip = \"{VIP}\"\nport = 80\nscheduler = \"maglev\"\n\
         forwarding = \"dsr\"\nbackends = [{}]\n\n[[vrrp]]\nname = \"web\"\nvrid = 51\n\
         priority = {{ nuster1 = 150, nuster2 = 100 }}\nadvert_interval = \"{}\"\npreempt = {}\n\
         vips = [\"{VIP}\"]\ngarp_repeat_after = \"1s\"\n{}\n",
        backends.join(", "),
        router.advert_interval,
        router.preempt,
        router.extra,
    );
    let path = dir.join("lab-vrrp.toml");
    std::fs::write(&path, config).unwrap();
    path
}

/// The same file for one node, with that node's unicast peer.
fn node_config(base: &Path, node: &str, router: &Router) -> PathBuf {
    if !router.unicast {
        return base.to_owned();
    }
    let peer = match node {
        "nuster1" => "192.0.2.12",
        _ => "192.0.2.11",
    };
    let text = std::fs::read_to_string(base).unwrap().replace(
        "vips = [",
        &format!("unicast_peers = [\"{peer}\"]\nvips = ["),
    );
    let path = base.with_file_name(format!("lab-vrrp-{node}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

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
    dir: TempDir,
    config: PathBuf,
    router: Router,
}

impl Cluster {
    fn start_agent(&mut self, node: &str) {
        let log = self
            .dir
            .0
            .join(format!("agent-{node}-{}.log", self.processes.len()));
        let config = node_config(&self.config, node, &self.router);
        let mut agent = self.lab.command(node, AGENT);
        agent
            .args(["run", "--node", node, "--config"])
            .arg(&config)
            .arg("--pin-dir")
            .arg(self.lab.pin_dir(node))
            .env("FAROL_LOG", "info")
            .env("NO_COLOR", "1")
            .stderr(std::fs::File::create(&log).unwrap());
        let process = self.lab.spawn(node, &mut agent, "agent").unwrap();
        self.processes.push(process);
    }

    fn take(&mut self, label: &str) -> LabProcess {
        let index = self
            .processes
            .iter()
            .position(|p| p.label() == label)
            .unwrap_or_else(|| panic!("no process {label}"));
        self.processes.remove(index)
    }

    fn logs(&self) -> String {
        let mut text = String::new();
        for entry in std::fs::read_dir(&self.dir.0).unwrap().flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "log") {
                text.push_str(&format!("==== {}\n", path.display()));
                text.push_str(&std::fs::read_to_string(&path).unwrap_or_default());
            }
        }
        text
    }
}

/// Web servers on the backends and agents on the nodes in `agents`.
fn cluster(tag: &str, router: Router, agents: &[&str]) -> Cluster {
    let lab = LabGuard::up(Lab::new(&unique_prefix(tag)).unwrap()).unwrap();
    let dir = std::env::temp_dir().join(format!("farol-vrrp-{}", lab.prefix()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = write_config(&dir, &router);
    let mut cluster = Cluster {
        processes: Vec::new(),
        lab,
        dir: TempDir(dir),
        config,
        router,
    };
    for node in BACKENDS {
        let root = cluster.dir.0.join(node);
        std::fs::create_dir_all(&root).unwrap();
        std::fs::write(root.join("index.html"), format!("{node}\n")).unwrap();
        let process = cluster.lab.spawn_static_web(node, &root).unwrap();
        cluster.processes.push(process);
    }
    for node in agents {
        cluster.start_agent(node);
    }
    cluster
}

fn metrics(lab: &Lab, node: &str) -> Option<BTreeMap<String, u64>> {
    lab.metrics(node)
}

/// The VRRP state an agent reports, if it answers.
fn state(lab: &Lab, node: &str) -> Option<&'static str> {
    let metrics = metrics(lab, node)?;
    ["master", "backup", "initialize"]
        .into_iter()
        .find(|state| {
            metrics.get(&format!(
                "farol_vrrp_state{{instance=\"web\",vrid=\"51\",state=\"{state}\"}}"
            )) == Some(&1)
        })
}

fn wait_state(cluster: &Cluster, node: &str, wanted: &str, timeout: Duration) -> Duration {
    let start = Instant::now();
    if wait_for(&format!("{node} to be {wanted}"), timeout, || {
        (state(&cluster.lab, node) == Some(wanted)).then_some(())
    })
    .is_err()
    {
        panic!(
            "{node} did not become {wanted} within {timeout:?}\n{}",
            cluster.logs()
        );
    }
    start.elapsed()
}

fn mac(lab: &Lab, node: &str) -> String {
    // Not /sys/class/net: /sys shows the namespace that mounted it.
    let out = lab
        .run(node, "ip", &["-o", "link", "show", "eth0"])
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.split("link/ether ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no MAC in {text}"))
        .to_owned()
}

/// The MAC the client's ARP table has for the VIP.
fn client_vip_mac(lab: &Lab) -> Option<String> {
    let out = lab.run(CLIENT, "ip", &["neigh", "show", VIP]).ok()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.split("lladdr ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .map(str::to_owned)
}

/// Waits until the client's ARP entry for the VIP is `node`'s MAC.
fn wait_client_on(cluster: &Cluster, node: &str, timeout: Duration) {
    let wanted = mac(&cluster.lab, node);
    if wait_for(
        &format!("the client's ARP entry on {node}"),
        timeout,
        || (client_vip_mac(&cluster.lab).as_deref() == Some(wanted.as_str())).then_some(()),
    )
    .is_err()
    {
        panic!(
            "the client's ARP entry is {:?}, not {node}'s {wanted}\n{}",
            client_vip_mac(&cluster.lab),
            cluster.logs()
        );
    }
}

fn vip_on_eth0(lab: &Lab, node: &str) -> bool {
    let out = lab
        .run(node, "ip", &["-o", "addr", "show", "dev", "eth0"])
        .unwrap();
    String::from_utf8_lossy(&out.stdout).contains(&format!(" {VIP}/32 "))
}

fn http_ok(lab: &Lab) -> bool {
    lab.run(
        CLIENT,
        "curl",
        &["-sf", "--max-time", "1", &format!("http://{VIP}/")],
    )
    .is_ok_and(|out| out.status.success())
}

fn wait_http(cluster: &Cluster) {
    if wait_for("HTTP through the VIP", Duration::from_secs(20), || {
        http_ok(&cluster.lab).then_some(())
    })
    .is_err()
    {
        panic!("no HTTP through the VIP\n{}", cluster.logs());
    }
}

struct LongLived(LabProcess);

impl LongLived {
    fn start(cluster: &Cluster, seconds: u32) -> LongLived {
        let script = cluster.dir.0.join("keepalive.py");
        std::fs::write(&script, xtask::lab::KEEPALIVE_CLIENT).unwrap();
        let mut client = cluster.lab.command(CLIENT, "python3");
        client
            .arg(&script)
            .args([VIP, &seconds.to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        LongLived(
            cluster
                .lab
                .spawn(CLIENT, &mut client, "keep-alive client")
                .unwrap(),
        )
    }

    /// Waits for the client's end and checks one connection served every
    /// request.
    fn assert_survived(mut self, cluster: &Cluster) {
        let status = wait_for("the keep-alive client", Duration::from_secs(60), || {
            self.0.try_wait().ok().flatten()
        })
        .unwrap();
        assert!(status.success());
        let mut report = String::new();
        let mut errors = String::new();
        let child = self.0.child_mut();
        std::io::Read::read_to_string(child.stdout.as_mut().unwrap(), &mut report).unwrap();
        std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut errors).unwrap();
        let fields: Vec<&str> = report.split_whitespace().collect();
        let context = format!("{report} {errors}\n{}", cluster.logs());
        assert_eq!(fields[1], "0", "the connection never failed: {context}");
        assert_eq!(fields[2], "1", "one TCP connection throughout: {context}");
        assert!(fields[0].parse::<u32>().unwrap() >= 20, "{context}");
        assert!(
            !fields.get(3).copied().unwrap_or("").contains(','),
            "one backend throughout: {context}"
        );
    }
}

fn kill9(process: &mut LabProcess) {
    // SAFETY: kill on a PID we spawned; no memory effects.
    unsafe { libc::kill(process.pid() as i32, libc::SIGKILL) };
    wait_for("the process to die", Duration::from_secs(5), || {
        process.try_wait().ok().flatten()
    })
    .unwrap();
}

/// nuster1 master, nuster2 backup, HTTP through the VIP answering.
fn elected(tag: &str, router: Router) -> Cluster {
    let cluster = cluster(tag, router, &["nuster1", "nuster2", "nuster3", "nuster4"]);
    wait_state(&cluster, "nuster1", "master", Duration::from_secs(30));
    wait_state(&cluster, "nuster2", "backup", Duration::from_secs(10));
    wait_http(&cluster);
    assert!(vip_on_eth0(&cluster.lab, "nuster1"), "master holds the VIP");
    assert!(!vip_on_eth0(&cluster.lab, "nuster2"), "backup does not");
    cluster
}

#[test]
fn kill_9_of_the_master_moves_the_vip_and_it_comes_back_with_preemption() {
    if !support::privileged("kill_9_of_the_master_moves_the_vip_and_it_comes_back_with_preemption")
    {
        return;
    }
    let mut cluster = elected("vrkill", Router::default());
    // (nuster2 may have held the VIP for a moment at start-up.)
    wait_client_on(&cluster, "nuster1", Duration::from_secs(5));
    let long_lived = LongLived::start(&cluster, 8);
    std::thread::sleep(Duration::from_millis(500));

    let mut master = cluster.take("agent@nuster1");
    kill9(&mut master);
    let took = wait_state(&cluster, "nuster2", "master", Duration::from_secs(5));
    eprintln!("nuster2 reported master {took:?} after the kill (100 ms adverts)");
    // nuster2's gratuitous ARPs moved the client to it.
    wait_client_on(&cluster, "nuster2", Duration::from_secs(5));
    assert!(vip_on_eth0(&cluster.lab, "nuster2"));
    let metrics2 = metrics(&cluster.lab, "nuster2").unwrap();
    assert!(
        metrics2["farol_vrrp_transitions_total{instance=\"web\",vrid=\"51\",to=\"master\"}"] >= 1
    );
    for _ in 0..10 {
        assert!(http_ok(&cluster.lab), "HTTP through the new master");
    }
    let after = metrics(&cluster.lab, "nuster2").unwrap();
    assert!(
        after["farol_lb_service_new_flows_total{service=\"web\"}"] >= 10,
        "nuster2 balances the new flows: {after:?}"
    );

    // The old master returns: with preemption it takes the VIP back.
    cluster.start_agent("nuster1");
    wait_state(&cluster, "nuster1", "master", Duration::from_secs(30));
    wait_state(&cluster, "nuster2", "backup", Duration::from_secs(5));
    wait_client_on(&cluster, "nuster1", Duration::from_secs(5));
    assert!(!vip_on_eth0(&cluster.lab, "nuster2"), "backup gave it up");
    // nuster2 still serves its DSR share: the VIP stays on its lo.
    let lo = cluster
        .lab
        .run("nuster2", "ip", &["-o", "addr", "show", "dev", "lo"])
        .unwrap();
    assert!(String::from_utf8_lossy(&lo.stdout).contains(&format!("{VIP}/32")));
    for _ in 0..6 {
        assert!(http_ok(&cluster.lab), "HTTP after the return");
    }
    long_lived.assert_survived(&cluster);

    // Killed again, it leaves the VIP on its interface: `agent teardown`
    // removes it.
    let mut master = cluster.take("agent@nuster1");
    kill9(&mut master);
    assert!(vip_on_eth0(&cluster.lab, "nuster1"));
    let out = cluster
        .lab
        .command("nuster1", AGENT)
        .args(["teardown", "--node", "nuster1", "--config"])
        .arg(&cluster.config)
        .arg("--pin-dir")
        .arg(cluster.lab.pin_dir("nuster1"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains(&format!("removed {VIP} from eth0")), "{text}");
    assert!(!vip_on_eth0(&cluster.lab, "nuster1"));
}

#[test]
fn link_down_moves_the_vip_and_an_established_connection_survives() {
    if !support::privileged("link_down_moves_the_vip_and_an_established_connection_survives") {
        return;
    }
    let cluster = elected("vrlink", Router::default());
    let long_lived = LongLived::start(&cluster, 6);
    std::thread::sleep(Duration::from_millis(500));
    let out = cluster
        .lab
        .run("nuster1", "ip", &["link", "set", "eth0", "down"])
        .unwrap();
    assert!(out.status.success());
    wait_state(&cluster, "nuster2", "master", Duration::from_secs(5));
    // nuster1 left the election: no VIP, not master.
    wait_state(&cluster, "nuster1", "initialize", Duration::from_secs(5));
    for _ in 0..5 {
        assert!(http_ok(&cluster.lab), "HTTP through nuster2");
    }
    long_lived.assert_survived(&cluster);

    // The link returns: nuster1 joins as backup, then preempts.
    let out = cluster
        .lab
        .run("nuster1", "ip", &["link", "set", "eth0", "up"])
        .unwrap();
    assert!(out.status.success());
    wait_state(&cluster, "nuster1", "master", Duration::from_secs(10));
    wait_state(&cluster, "nuster2", "backup", Duration::from_secs(5));
    wait_http(&cluster);
}

#[test]
fn without_preemption_the_returning_node_stays_backup_and_a_clean_stop_hands_over() {
    if !support::privileged(
        "without_preemption_the_returning_node_stays_backup_and_a_clean_stop_hands_over",
    ) {
        return;
    }
    let router = Router {
        preempt: false,
        advert_interval: "1s",
        ..Router::default()
    };
    // Without preemption the first master stays: nuster1 starts first.
    let mut cluster = cluster("vrnopre", router, &["nuster1", "nuster3", "nuster4"]);
    wait_state(&cluster, "nuster1", "master", Duration::from_secs(30));
    cluster.start_agent("nuster2");
    wait_state(&cluster, "nuster2", "backup", Duration::from_secs(30));
    wait_http(&cluster);
    // A clean stop sends priority 0: nuster2 takes over after its skew
    // time (~0.6 s), well before the master-down interval (3.6 s).
    let mut master = cluster.take("agent@nuster1");
    let stopped = Instant::now();
    master.terminate(Duration::from_secs(10)).unwrap();
    let took =
        stopped.elapsed() + wait_state(&cluster, "nuster2", "master", Duration::from_secs(10));
    assert!(
        took < Duration::from_millis(3000),
        "clean stop handed over in {took:?}, not after the master-down interval"
    );
    wait_http(&cluster);

    // nuster1 returns with the higher priority but no preemption.
    cluster.start_agent("nuster1");
    wait_state(&cluster, "nuster1", "backup", Duration::from_secs(20));
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(state(&cluster.lab, "nuster1"), Some("backup"));
    assert_eq!(state(&cluster.lab, "nuster2"), Some("master"));
    assert!(http_ok(&cluster.lab));
}

#[test]
fn a_failing_track_command_lowers_the_priority_and_notify_commands_run() {
    if !support::privileged("a_failing_track_command_lowers_the_priority_and_notify_commands_run") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("farol-vrrp-track-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let _cleanup = TempDir(dir.clone());
    let flag = dir.join("nuster1-unhealthy");
    let log = dir.join("notify.log");
    // Fails on nuster1 only (both agents run it), while the flag exists.
    let check = format!(
        "! (ip -o addr show dev eth0 | grep -q ' 192.0.2.11/' && test -e {})",
        flag.display()
    );
    let router = Router {
        extra: format!(
            "track = [{{ command = \"{check}\", every = \"100ms\", weight = -60 }}]\n\
             notify = \"echo >> {}\"\n",
            log.display()
        ),
        ..Router::default()
    };
    let cluster = elected("vrtrack", router);
    std::fs::write(&flag, "").unwrap();
    // 150 - 60 = 90 < 100: nuster2 preempts.
    wait_state(&cluster, "nuster2", "master", Duration::from_secs(10));
    wait_state(&cluster, "nuster1", "backup", Duration::from_secs(5));
    let priority = |node: &str| {
        metrics(&cluster.lab, node).unwrap()["farol_vrrp_priority{instance=\"web\",vrid=\"51\"}"]
    };
    assert_eq!(priority("nuster1"), 90);
    wait_client_on(&cluster, "nuster2", Duration::from_secs(5));
    assert!(http_ok(&cluster.lab));
    // The check passes again: 150 is back and nuster1 preempts.
    std::fs::remove_file(&flag).unwrap();
    wait_state(&cluster, "nuster1", "master", Duration::from_secs(10));
    assert_eq!(priority("nuster1"), 150);
    let notified = wait_for("the notify commands", Duration::from_secs(5), || {
        let text = std::fs::read_to_string(&log).ok()?;
        text.contains("INSTANCE web MASTER 100").then_some(text)
    })
    .unwrap();
    assert!(notified.contains("INSTANCE web BACKUP 90"), "{notified}");
    assert!(notified.contains("INSTANCE web MASTER 150"), "{notified}");
}

/// Sends crafted VRRP packets from the client to nuster1 (unicast, which a
/// multicast instance hears as well): one per malformed kind, then one
/// well-formed advert of priority 1 as a control.
const CRAFTED_ADVERTS: &str = r#"
import socket, struct, sys
src, dst, vip = sys.argv[1], sys.argv[2], sys.argv[3]
def checksum(data):
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    while total > 0xffff:
        total = (total & 0xffff) + (total >> 16)
    return ~total & 0xffff
def advert(version=3, kind=1, vrid=51, priority=254, count=1, interval=10, addresses=(vip,), good=True):
    body = bytes([version << 4 | kind, vrid, priority, count]) + struct.pack("!HH", interval, 0)
    body += b"".join(socket.inet_aton(a) for a in addresses)
    pseudo = socket.inet_aton(src) + socket.inet_aton(dst) + bytes([0, 112]) + struct.pack("!H", len(body))
    sum_ = checksum(pseudo + body) if good else 0x1234
    return body[:6] + struct.pack("!H", sum_) + body[8:]
def ip(payload, ttl=255):
    return struct.pack("!BBHHHBBH4s4s", 0x45, 0xc0, 20 + len(payload), 0, 0, ttl, 112, 0,
                       socket.inet_aton(src), socket.inet_aton(dst)) + payload
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, 112)
s.setsockopt(socket.IPPROTO_IP, socket.IP_HDRINCL, 1)
packets = [
    ip(advert(), ttl=64),
    ip(advert(version=2)),
    ip(advert(kind=2)),
    ip(advert(good=False)),
    ip(advert(count=2)),
    ip(advert(vrid=52)),
    ip(advert(addresses=("192.0.2.101",))),
    ip(advert(interval=0)),
    ip(advert()[:5]),
]
if sys.argv[4] == "control":
    packets = [ip(advert(priority=1))]
for packet in packets:
    s.sendto(packet, (dst, 0))
"#;

#[test]
fn malformed_adverts_are_dropped_and_counted_without_a_state_change() {
    if !support::privileged("malformed_adverts_are_dropped_and_counted_without_a_state_change") {
        return;
    }
    let cluster = elected("vrbad", Router::default());
    let script = cluster.dir.0.join("crafted.py");
    std::fs::write(&script, CRAFTED_ADVERTS).unwrap();
    let send = |mode: &str| {
        let out = cluster
            .lab
            .command(CLIENT, "python3")
            .arg(&script)
            .args(["192.0.2.2", "192.0.2.11", VIP, mode])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
    };
    let received = |metrics: &BTreeMap<String, u64>| {
        metrics["farol_vrrp_adverts_received_total{instance=\"web\",vrid=\"51\"}"]
    };
    let before = metrics(&cluster.lab, "nuster1").unwrap();
    send("malformed");
    let reasons = [
        "ttl",
        "version",
        "type",
        "checksum",
        "address_count",
        "vrid",
        "address_list",
        "interval",
        "truncated",
    ];
    let key = |reason: &str| {
        format!("farol_vrrp_dropped_packets_total{{interface=\"eth0\",reason=\"{reason}\"}}")
    };
    let after = wait_for(
        "every malformed packet counted",
        Duration::from_secs(5),
        || {
            let after = metrics(&cluster.lab, "nuster1")?;
            reasons
                .iter()
                .all(|reason| after[&key(reason)] == before[&key(reason)] + 1)
                .then_some(after)
        },
    )
    .unwrap_or_else(|_| panic!("{:#?}", metrics(&cluster.lab, "nuster1")));
    // Priority 254 in every one of them, and nothing changed.
    assert_eq!(state(&cluster.lab, "nuster1"), Some("master"));
    assert_eq!(state(&cluster.lab, "nuster2"), Some("backup"));
    // (A backup sends no adverts: nothing else reaches nuster1.)
    assert_eq!(received(&after), received(&before), "none was accepted");

    // The control: a well-formed advert passes the same checks, is counted
    // as received, and a master of 150 keeps its role against priority 1.
    send("control");
    wait_for("the control advert", Duration::from_secs(5), || {
        (received(&metrics(&cluster.lab, "nuster1")?) == received(&before) + 1).then_some(())
    })
    .unwrap();
    assert_eq!(state(&cluster.lab, "nuster1"), Some("master"));
    assert!(http_ok(&cluster.lab));
}

/// Cuts (or restores) the LAN between the two balancers only: isolated
/// bridge ports reach the other ports but not each other.
fn isolate_balancers(lab: &Lab, on: bool) {
    for node in ["nuster1", "nuster2"] {
        let out = std::process::Command::new("ip")
            .args(["-n", &lab.netns("lan"), "link", "set", "dev", node])
            .args([
                "type",
                "bridge_slave",
                "isolated",
                if on { "on" } else { "off" },
            ])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
    }
}

fn masters_met(lab: &Lab, node: &str) -> u64 {
    metrics(lab, node).unwrap()["farol_vrrp_masters_met_total{instance=\"web\",vrid=\"51\"}"]
}

#[test]
fn two_masters_meeting_after_a_partition_heal_at_once() {
    if !support::privileged("two_masters_meeting_after_a_partition_heal_at_once") {
        return;
    }
    let cluster = elected("vrsplit", Router::default());
    isolate_balancers(&cluster.lab, true);
    wait_state(&cluster, "nuster2", "master", Duration::from_secs(5));
    assert_eq!(
        state(&cluster.lab, "nuster1"),
        Some("master"),
        "split brain"
    );
    // (The start-up election may already have counted a meeting.)
    let met_before = (
        masters_met(&cluster.lab, "nuster1"),
        masters_met(&cluster.lab, "nuster2"),
    );

    isolate_balancers(&cluster.lab, false);
    let healed = wait_state(&cluster, "nuster2", "backup", Duration::from_secs(5));
    assert!(
        healed < Duration::from_secs(1),
        "the loser left {healed:?} after the partition healed"
    );
    assert_eq!(state(&cluster.lab, "nuster1"), Some("master"));
    assert!(masters_met(&cluster.lab, "nuster1") > met_before.0);
    assert!(masters_met(&cluster.lab, "nuster2") > met_before.1);
    // The winner's gratuitous ARPs bring the client back.
    wait_client_on(&cluster, "nuster1", Duration::from_secs(3));
    assert!(!vip_on_eth0(&cluster.lab, "nuster2"));
    wait_http(&cluster);
}

/// keepalived's VRRPv3 instance for one node, in its own directory.
fn keepalived(
    cluster: &Cluster,
    node: &str,
    priority: u8,
    unicast_peer: Option<&str>,
) -> (LabProcess, PathBuf) {
    let dir = cluster.dir.0.join(format!("keepalived-{node}"));
    std::fs::create_dir_all(&dir).unwrap();
    let ip = cluster.lab.node(node).unwrap().ip().to_owned();
    let unicast = unicast_peer
        .map(|peer| {
            format!("    unicast_src_ip {ip}\n    unicast_peer {{\n        {peer}\n    }}\n")
        })
        .unwrap_or_default();
    let interval = cluster.router.advert_interval.trim_end_matches("ms");
    let interval: f64 = interval.parse::<f64>().unwrap() / 1000.0;
    let conf = format!(
        "global_defs {{\n    router_id {node}\n    vrrp_version 3\n}}\n\
         vrrp_instance web {{\n    state BACKUP\n    interface eth0\n    virtual_router_id 51\n\
         \x20   priority {priority}\n    advert_int {interval}\n{unicast}\
         \x20   virtual_ipaddress {{\n        {VIP}/32\n    }}\n}}\n"
    );
    let path = dir.join("keepalived.conf");
    std::fs::write(&path, conf).unwrap();
    let log = std::fs::File::create(dir.join("keepalived.log")).unwrap();
    let mut command = cluster.lab.command(node, "keepalived");
    command
        .args(["-n", "-l", "-D", "-P", "-f"])
        .arg(&path)
        .arg("-p")
        .arg(dir.join("keepalived.pid"))
        .arg("-r")
        .arg(dir.join("vrrp.pid"))
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    let process = cluster.lab.spawn(node, &mut command, "keepalived").unwrap();
    (process, dir)
}

fn keepalived_log(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("keepalived.log")).unwrap_or_default()
}

/// Kills keepalived as a crash would: the VRRP child first (a SIGKILL of
/// the parent alone is a graceful handover), then the parent.
fn crash_keepalived(mut parent: LabProcess, dir: &Path) {
    let child: i32 = std::fs::read_to_string(dir.join("vrrp.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // SAFETY: kill on keepalived's VRRP child, whose PID it wrote.
    unsafe { libc::kill(child, libc::SIGKILL) };
    kill9(&mut parent);
}

fn keepalived_interop(tag: &str, unicast: bool) {
    let router = Router {
        unicast,
        ..Router::default()
    };
    // keepalived as nuster2 (backup), the agent as nuster1.
    let mut cluster = cluster(tag, router, &["nuster1", "nuster3", "nuster4"]);
    wait_state(&cluster, "nuster1", "master", Duration::from_secs(30));
    // Started under a running master, keepalived must stay backup.
    let (keepalived2, dir2) = keepalived(&cluster, "nuster2", 100, unicast.then_some("192.0.2.11"));
    wait_for("keepalived to be backup", Duration::from_secs(10), || {
        keepalived_log(&dir2)
            .contains("Entering BACKUP STATE")
            .then_some(())
    })
    .unwrap_or_else(|_| panic!("{}\n{}", keepalived_log(&dir2), cluster.logs()));
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        !keepalived_log(&dir2).contains("Entering MASTER STATE"),
        "keepalived accepts the agent's adverts: {}",
        keepalived_log(&dir2)
    );
    // The agent dies: keepalived takes over.
    let mut agent = cluster.take("agent@nuster1");
    kill9(&mut agent);
    wait_for("keepalived to be master", Duration::from_secs(5), || {
        keepalived_log(&dir2)
            .contains("Entering MASTER STATE")
            .then_some(())
    })
    .unwrap_or_else(|_| panic!("{}", keepalived_log(&dir2)));
    assert!(vip_on_eth0(&cluster.lab, "nuster2"));
    // The agent returns and preempts keepalived.
    cluster.start_agent("nuster1");
    wait_state(&cluster, "nuster1", "master", Duration::from_secs(30));
    wait_for(
        "keepalived to give the VIP up",
        Duration::from_secs(5),
        || (!vip_on_eth0(&cluster.lab, "nuster2")).then_some(()),
    )
    .unwrap_or_else(|_| panic!("{}", keepalived_log(&dir2)));
    let drops = metrics(&cluster.lab, "nuster1").unwrap();
    let dropped: u64 = drops
        .iter()
        .filter(|(k, _)| k.starts_with("farol_vrrp_dropped_packets_total"))
        .map(|(_, v)| v)
        .sum();
    assert_eq!(
        dropped, 0,
        "every keepalived advert passed the checks: {drops:?}"
    );
    drop(keepalived2);

    // keepalived as nuster1 (master, 150), the agent as nuster2.
    let mut agent1 = cluster.take("agent@nuster1");
    agent1.terminate(Duration::from_secs(10)).unwrap();
    cluster.start_agent("nuster2");
    let (keepalived1, dir1) = keepalived(&cluster, "nuster1", 150, unicast.then_some("192.0.2.12"));
    wait_for("keepalived to be master", Duration::from_secs(20), || {
        keepalived_log(&dir1)
            .contains("Entering MASTER STATE")
            .then_some(())
    })
    .unwrap_or_else(|_| panic!("{}", keepalived_log(&dir1)));
    wait_state(&cluster, "nuster2", "backup", Duration::from_secs(10));
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        state(&cluster.lab, "nuster2"),
        Some("backup"),
        "the agent accepts keepalived's adverts"
    );
    crash_keepalived(keepalived1, &dir1);
    wait_state(&cluster, "nuster2", "master", Duration::from_secs(5));
    assert!(vip_on_eth0(&cluster.lab, "nuster2"));
    wait_http(&cluster);
}

#[test]
fn keepalived_and_the_agent_fail_over_both_ways_with_multicast() {
    if !support::privileged("keepalived_and_the_agent_fail_over_both_ways_with_multicast") {
        return;
    }
    if !support::may_run(
        "keepalived_and_the_agent_fail_over_both_ways_with_multicast",
        (!Path::new("/usr/sbin/keepalived").exists())
            .then_some("keepalived is not installed (cargo xtask setup)"),
    ) {
        return;
    }
    keepalived_interop("vrkam", false);
}

#[test]
fn keepalived_and_the_agent_fail_over_both_ways_with_unicast_peers() {
    if !support::privileged("keepalived_and_the_agent_fail_over_both_ways_with_unicast_peers") {
        return;
    }
    if !support::may_run(
        "keepalived_and_the_agent_fail_over_both_ways_with_unicast_peers",
        (!Path::new("/usr/sbin/keepalived").exists())
            .then_some("keepalived is not installed (cargo xtask setup)"),
    ) {
        return;
    }
    keepalived_interop("vrkau", true);
}
