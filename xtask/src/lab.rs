//! The cluster on one machine: nodes `nuster1`..`nuster4` and a `client`,
//! each in its own network namespace, joined by a Linux bridge that lives in
//! a namespace of its own. Addresses come from `configs/lab.toml`
//! (192.0.2.0/24); the client is 192.0.2.2.
//!
//! Every name carries the lab's prefix (`<prefix>-nuster1`, ...), so several
//! labs coexist and tests run in parallel. `up` creates only what is
//! missing; `down` stops every process left in the namespaces (by PID) and
//! deletes them. [`LabGuard`] does `down` on drop, also when a test fails.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use serde::Deserialize;

use crate::{capture, workspace_root};

/// The client's address in every lab.
pub const CLIENT_ADDRESS: &str = "192.0.2.2/24";
pub const CLIENT: &str = "client";
/// The bridge's namespace and device.
const LAN: &str = "lan";
const BRIDGE: &str = "br0";
/// The interface name inside every host namespace.
pub const HOST_INTERFACE: &str = "eth0";

#[derive(Debug, Clone)]
pub struct LabHost {
    pub name: String,
    /// With prefix length, e.g. `192.0.2.11/24`.
    pub address: String,
}

impl LabHost {
    /// The address without its prefix length.
    pub fn ip(&self) -> &str {
        self.address.split('/').next().unwrap_or(&self.address)
    }
}

/// A lab: its prefix and hosts. Cheap to build; touches nothing until
/// [`Lab::up`].
#[derive(Debug, Clone)]
pub struct Lab {
    prefix: String,
    nodes: Vec<LabHost>,
}

#[derive(Deserialize)]
struct LabFile {
    node: Vec<LabFileNode>,
}

#[derive(Deserialize)]
struct LabFileNode {
    name: String,
    address: String,
}

/// The shipped lab config, which the lab and the demo agents share.
pub fn lab_config() -> PathBuf {
    workspace_root().join("configs/lab.toml")
}

impl Lab {
    /// The lab of `configs/lab.toml` under `prefix` (letters, digits, '-';
    /// short, since namespace names are also used in interface-free paths).
    pub fn new(prefix: &str) -> Result<Lab> {
        if prefix.is_empty()
            || prefix.len() > 16
            || !prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-')
        {
            bail!("lab prefix must be 1 to 16 letters, digits or '-', got {prefix:?}");
        }
        let path = lab_config();
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let file: LabFile =
            toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        Ok(Lab {
            prefix: prefix.to_owned(),
            nodes: file
                .node
                .into_iter()
                .map(|node| LabHost {
                    name: node.name,
                    address: node.address,
                })
                .collect(),
        })
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn nodes(&self) -> &[LabHost] {
        &self.nodes
    }

    pub fn node(&self, name: &str) -> Result<&LabHost> {
        self.nodes
            .iter()
            .find(|node| node.name == name)
            .with_context(|| format!("the lab has no node {name:?}"))
    }

    fn hosts(&self) -> Vec<LabHost> {
        let mut hosts = self.nodes.clone();
        hosts.push(LabHost {
            name: CLIENT.into(),
            address: CLIENT_ADDRESS.into(),
        });
        hosts
    }

    /// The namespace name of a host (`client`, `nuster1`, ...) or the LAN.
    pub fn netns(&self, host: &str) -> String {
        format!("{}-{host}", self.prefix)
    }

    /// The pin directory for a node's agent: one per node, one tree per lab.
    pub fn pin_dir(&self, node: &str) -> PathBuf {
        self.pin_root().join(node)
    }

    fn pin_root(&self) -> PathBuf {
        PathBuf::from(format!("/sys/fs/bpf/farol-{}", self.prefix))
    }

    fn namespaces(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .hosts()
            .iter()
            .map(|host| self.netns(&host.name))
            .collect();
        names.push(self.netns(LAN));
        names
    }

    /// Builds whatever part of the lab is missing.
    pub fn up(&self) -> Result<()> {
        let lan = self.netns(LAN);
        ensure_netns(&lan)?;
        ip(&["-n", &lan, "link", "set", "lo", "up"])?;
        if !link_exists(&lan, BRIDGE) {
            ip(&["-n", &lan, "link", "add", BRIDGE, "type", "bridge"])?;
        }
        ip(&["-n", &lan, "link", "set", BRIDGE, "up"])?;
        for host in self.hosts() {
            let netns = self.netns(&host.name);
            ensure_netns(&netns)?;
            if !link_exists(&lan, &host.name) {
                ip(&[
                    "-n",
                    &lan,
                    "link",
                    "add",
                    &host.name,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    HOST_INTERFACE,
                    "netns",
                    &netns,
                ])?;
            }
            ip(&[
                "-n", &lan, "link", "set", &host.name, "master", BRIDGE, "up",
            ])?;
            ip(&["-n", &netns, "link", "set", "lo", "up"])?;
            ip(&[
                "-n",
                &netns,
                "addr",
                "replace",
                &host.address,
                "dev",
                HOST_INTERFACE,
            ])?;
            ip(&["-n", &netns, "link", "set", HOST_INTERFACE, "up"])?;
        }
        self.prepare_native_xdp()
    }

    /// Native XDP on veth drops XDP_TX frames unless the peer also runs an
    /// XDP program and the sender leaves no checksum to offload (measured
    /// here, see shared/TOOLCHAIN.md): so every bridge port gets a bare
    /// XDP_PASS program and every host turns TX checksum offload off. The
    /// program is pinned under the lab's pin tree and attached through
    /// netlink, so it outlives this process and goes with `down`.
    fn prepare_native_xdp(&self) -> Result<()> {
        let pin = self.pin_root().join("bridge-pass");
        if !pin.exists() {
            let object = crate::ebpf_object();
            let bytes = std::fs::read(&object).with_context(|| {
                format!(
                    "reading {} (run `cargo xtask build-ebpf`)",
                    object.display()
                )
            })?;
            let mut ebpf =
                aya::Ebpf::load(&bytes).context("loading the eBPF object for the lab")?;
            let program: &mut aya::programs::Xdp = ebpf
                .program_mut("farol_baseline")
                .context("the eBPF object has no farol_baseline")?
                .try_into()?;
            program.load().context("loading farol_baseline")?;
            std::fs::create_dir_all(self.pin_root())?;
            program
                .pin(&pin)
                .context("pinning the bridge pass-through program")?;
        }
        let lan = format!("--net=/run/netns/{}", self.netns(LAN));
        for host in self.hosts() {
            capture(
                Command::new("nsenter")
                    .args([
                        lan.as_str(),
                        "--",
                        "ip",
                        "link",
                        "set",
                        "dev",
                        &host.name,
                        "xdpdrv",
                        "pinned",
                    ])
                    .arg(&pin),
            )
            .with_context(|| {
                format!(
                    "attaching the pass-through program to bridge port {}",
                    host.name
                )
            })?;
            capture(
                self.command(&host.name, "ethtool")
                    .args(["-K", HOST_INTERFACE, "tx", "off"]),
            )
            .with_context(|| format!("turning TX checksum offload off in {}", host.name))?;
        }
        Ok(())
    }

    /// Stops every process left in the lab's namespaces, deletes them, and
    /// removes the lab's pin tree. Safe to call on a lab that is not up.
    pub fn down(&self) -> Result<()> {
        let existing = list_netns()?;
        for netns in self.namespaces() {
            if !existing.contains(&netns) {
                continue;
            }
            stop_namespace_processes(&netns);
            ip(&["netns", "del", &netns])?;
        }
        let pin_root = self.pin_root();
        if pin_root.exists() {
            std::fs::remove_dir_all(&pin_root)
                .with_context(|| format!("removing {}", pin_root.display()))?;
        }
        let sockets = PathBuf::from(format!("/run/farol-lab/{}", self.prefix));
        if sockets.exists() {
            std::fs::remove_dir_all(&sockets)
                .with_context(|| format!("removing {}", sockets.display()))?;
        }
        Ok(())
    }

    /// One line per host: namespace, address, link state, XDP program.
    pub fn status(&self) -> Result<String> {
        let existing = list_netns()?;
        let mut lines = Vec::new();
        for host in self.hosts() {
            let netns = self.netns(&host.name);
            if !existing.contains(&netns) {
                lines.push(format!("{:<8} {netns:<20} absent", host.name));
                continue;
            }
            let link = capture(Command::new("ip").args([
                "-n",
                &netns,
                "-br",
                "link",
                "show",
                HOST_INTERFACE,
            ]))
            .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_owned())
            .unwrap_or_else(|error| format!("no {HOST_INTERFACE}: {error}"));
            let xdp = self.xdp_program_id(&host.name).ok().flatten();
            let pids = namespace_pids(&netns).len();
            lines.push(format!(
                "{:<8} {netns:<20} {:<16} {link}  xdp={}  processes={pids}",
                host.name,
                host.address,
                xdp.map_or("none".into(), |id| format!("prog {id}"))
            ));
        }
        Ok(lines.join("\n"))
    }

    /// The agent's `/metrics` on a host, as `name{labels}` -> value; None
    /// while it does not answer.
    pub fn metrics(&self, host: &str) -> Option<std::collections::BTreeMap<String, u64>> {
        let out = self
            .run(
                host,
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
                    Some((key.to_owned(), value.parse::<f64>().ok()? as u64))
                })
                .collect()
        })
    }

    /// The id of the XDP program attached to a host's interface, if any.
    pub fn xdp_program_id(&self, host: &str) -> Result<Option<u64>> {
        let out = capture(Command::new("ip").args([
            "-j",
            "-n",
            &self.netns(host),
            "link",
            "show",
            HOST_INTERFACE,
        ]))?;
        let links: serde_json::Value =
            serde_json::from_slice(&out.stdout).context("parsing `ip -j link`")?;
        Ok(links[0]["xdp"]["prog"]["id"].as_u64())
    }

    /// A command that runs inside a host's namespace. `nsenter --net` keeps
    /// this process's mount namespace, so the host's bpffs stays visible
    /// (`ip netns exec` would remount /sys).
    pub fn command(&self, host: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut command = Command::new("nsenter");
        command
            .arg(format!("--net=/run/netns/{}", self.netns(host)))
            .arg("--")
            .arg(program)
            // Agents of parallel labs share one /run: each lab node gets its
            // own control socket, which `agent status` etc. run here find too.
            .env("FAROL_CONTROL_SOCKET", self.control_socket(host));
        command
    }

    /// The control socket of the agent on `host` in this lab.
    pub fn control_socket(&self, host: &str) -> PathBuf {
        PathBuf::from(format!("/run/farol-lab/{}/{host}.sock", self.prefix))
    }

    /// Runs a command in a host's namespace and returns its output, whatever
    /// its exit status.
    pub fn run(&self, host: &str, program: &str, args: &[&str]) -> Result<Output> {
        self.command(host, program)
            .args(args)
            .output()
            .with_context(|| format!("running {program} in {host}"))
    }

    /// Starts a long-running process in a host's namespace; the returned
    /// guard stops it by PID.
    pub fn spawn(&self, host: &str, command: &mut Command, label: &str) -> Result<LabProcess> {
        let child = command
            .spawn()
            .with_context(|| format!("starting {label} in {host}"))?;
        Ok(LabProcess {
            child,
            label: format!("{label}@{host}"),
        })
    }
    /// Starts Python's HTTP/1.1 file server on port 80 of `host`, serving
    /// `root`: a backend for tests that need a real web server but not Apache.
    pub fn spawn_static_web(&self, host: &str, root: &std::path::Path) -> Result<LabProcess> {
        let mut server = self.command(host, "python3");
        server
            .args(["-m", "http.server", "80", "--bind", "0.0.0.0"])
            .args(["--protocol", "HTTP/1.1", "--directory"])
            .arg(root)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        self.spawn(host, &mut server, "web")
    }
}

/// A process in the lab, stopped (SIGTERM, then SIGKILL after 5 s) on drop.
#[derive(Debug)]
pub struct LabProcess {
    child: Child,
    label: String,
}

impl LabProcess {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn label(&self) -> &str {
        &self.label
    }

    /// Sends SIGTERM and waits up to `grace`; returns the exit status, or
    /// kills and fails after it.
    pub fn terminate(&mut self, grace: Duration) -> Result<std::process::ExitStatus> {
        signal(self.child.id(), libc::SIGTERM);
        let deadline = Instant::now() + grace;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                bail!(
                    "{} did not stop within {grace:?} of SIGTERM; killed",
                    self.label
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// The exit status if the process has ended.
    pub fn try_wait(&mut self) -> Result<Option<std::process::ExitStatus>> {
        Ok(self.child.try_wait()?)
    }

    pub fn child_mut(&mut self) -> &mut Child {
        &mut self.child
    }
}

impl Drop for LabProcess {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.terminate(Duration::from_secs(5));
        }
    }
}

/// Brings a lab up and takes it down on drop (also on panic).
#[derive(Debug)]
pub struct LabGuard {
    lab: Lab,
}

impl LabGuard {
    pub fn up(lab: Lab) -> Result<LabGuard> {
        // A lab left by a crashed run under the same prefix is replaced.
        lab.down()?;
        let guard = LabGuard { lab };
        guard.lab.up()?;
        Ok(guard)
    }

    pub fn lab(&self) -> &Lab {
        &self.lab
    }
}

impl std::ops::Deref for LabGuard {
    type Target = Lab;
    fn deref(&self) -> &Lab {
        &self.lab
    }
}

impl Drop for LabGuard {
    fn drop(&mut self) {
        if let Err(error) = self.lab.down() {
            eprintln!("lab {}: teardown failed: {error:#}", self.lab.prefix);
        }
    }
}

/// A prefix no other running test uses: test name initials plus the PID.
pub fn unique_prefix(tag: &str) -> String {
    let tag: String = tag
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .take(6)
        .collect();
    format!("{tag}{}", std::process::id())
}

/// Polls `check` every 50 ms until it returns `Some` or `timeout` passes.
pub fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> Option<T>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check() {
            return Ok(value);
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        thread::sleep(Duration::from_millis(50));
    }
}

fn ip(args: &[&str]) -> Result<()> {
    capture(Command::new("ip").args(args)).map(|_| ())
}

fn list_netns() -> Result<Vec<String>> {
    let dir = Path::new("/run/netns");
    if !dir.exists() {
        return Ok(Vec::new());
    }
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir).context("listing /run/netns")? {
        names.push(entry?.file_name().to_string_lossy().into_owned());
    }
    Ok(names)
}

fn ensure_netns(name: &str) -> Result<()> {
    if list_netns()?.iter().any(|existing| existing == name) {
        return Ok(());
    }
    ip(&["netns", "add", name])
}

fn link_exists(netns: &str, link: &str) -> bool {
    Command::new("ip")
        .args(["-n", netns, "link", "show", "dev", link])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

/// The PIDs of the processes in network namespace `netns` (empty when
/// `ip netns pids` fails).
pub fn namespace_pids(netns: &str) -> Vec<i32> {
    Command::new("ip")
        .args(["netns", "pids", netns])
        .output()
        .map(|out| {
            String::from_utf8_lossy(&out.stdout)
                .split_whitespace()
                .filter_map(|pid| pid.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

fn signal(pid: u32, signal: i32) {
    if let Ok(pid) = i32::try_from(pid) {
        // SAFETY: kill has no memory effects; a stale PID yields ESRCH.
        unsafe { libc::kill(pid, signal) };
    }
}

/// SIGTERM to every PID in the namespace, up to 3 s to go, then SIGKILL.
fn stop_namespace_processes(netns: &str) {
    let pids = namespace_pids(netns);
    if pids.is_empty() {
        return;
    }
    for &pid in &pids {
        signal(pid.unsigned_abs(), libc::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline && !namespace_pids(netns).is_empty() {
        thread::sleep(Duration::from_millis(50));
    }
    for pid in namespace_pids(netns) {
        signal(pid.unsigned_abs(), libc::SIGKILL);
    }
}

/// A client that keeps one HTTP/1.1 connection to `argv[1]`:80 and sends a
/// request every 50 ms for `argv[2]` seconds, each allowed `argv[3]`
/// seconds (default 2); a failed request is logged with its time on stderr
/// and a new connection opened. Prints "ok errors connections backends".
/// Lab tests and the failover benchmark run it in the client namespace.
pub const KEEPALIVE_CLIENT: &str = r#"
import http.client, sys, time
timeout = float(sys.argv[3]) if len(sys.argv) > 3 else 2
conn = http.client.HTTPConnection(sys.argv[1], 80, timeout=timeout)
ok = errors = 0
nodes = set()
ports = set()
end = time.time() + float(sys.argv[2])
while time.time() < end:
    try:
        conn.request("GET", "/")
        ports.add(conn.sock.getsockname()[1])
        nodes.add(conn.getresponse().read().decode().strip())
        ok += 1
    except Exception as error:
        errors += 1
        print("%.3f %r" % (time.monotonic(), error), file=sys.stderr)
        conn.close()
        conn = http.client.HTTPConnection(sys.argv[1], 80, timeout=timeout)
    time.sleep(0.05)
print(ok, errors, len(ports), ",".join(sorted(nodes)))
"#;
