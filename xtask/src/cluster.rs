//! The whole four-node cluster on this machine, as `cargo xtask demo` and
//! `cargo xtask chaos` both run it: the lab (nuster1..4 and a client on a
//! bridge), configs/lab.toml with Apache under the agents, a replicated
//! volume `www` on nuster1..3, a NAT service, and `[cluster_state]`,
//! `[postgres]` and `[pooler]` on nuster1..3; a real agent per node, each
//! of which can be killed and started again.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{bail, Context, Result};
use xtask::{
    apache::LabApache,
    exec,
    lab::{wait_for, Lab, LabGuard, LabProcess},
    toolchain, workspace_root,
};

use crate::demo_postgres;

/// The replicas of the volume `www`.
pub(crate) const VOLUME_NODES: [&str; 3] = ["nuster1", "nuster2", "nuster3"];
pub(crate) const VIP: &str = "192.0.2.100";
/// Where Debian's libfaketime lives (package `libfaketime`).
const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1";

/// What differs between the demo's cluster and the chaos suite's.
pub(crate) struct ClusterOptions {
    /// The lab's namespace prefix.
    pub prefix: String,
    /// The PostgreSQL bootstrap primary.
    pub primary: &'static str,
    /// Where the agents' logs go (`agent-NODE.log`).
    pub log_dir: PathBuf,
    /// The pooler's `role_check_interval`.
    pub role_check_interval: &'static str,
    /// A node whose brick sits on a tmpfs of this many MiB, so that it can
    /// be filled up.
    pub small_brick: Option<(&'static str, u32)>,
    /// A node whose agent (and so its children) runs under libfaketime,
    /// with a realtime offset read from [`Cluster::faketime_file`].
    pub faketime: Option<&'static str>,
}

/// Installs what is missing, builds the eBPF object and the agent; returns
/// the agent binary.
pub(crate) fn prepare() -> Result<PathBuf> {
    toolchain::ensure_packages(&[
        ("apache2", "Apache on every lab node, run by the agents"),
        ("postgresql", "PostgreSQL primary and standby in the lab"),
    ])?;
    toolchain::build_ebpf()?;
    // FAROL_DEMO_AGENT runs another build (the footprint of the release
    // build that `cargo xtask dist` packages: README, "Running on Raspberry Pi").
    Ok(match std::env::var_os("FAROL_DEMO_AGENT") {
        Some(agent) => PathBuf::from(agent),
        None => {
            exec(
                std::process::Command::new("cargo")
                    .current_dir(workspace_root())
                    .args(["build", "--quiet", "-p", "farol-agent"]),
            )?;
            workspace_root().join("target/debug/agent")
        }
    })
}

/// The running cluster. Dropping it stops the agents (SIGTERM, then
/// SIGKILL), detaches what killed agents left mounted and takes the lab
/// down.
pub(crate) struct Cluster {
    /// One slot per node, in the lab's order; None while a node is down.
    processes: Vec<Option<LabProcess>>,
    pub lab: LabGuard,
    pub dir: PathBuf,
    pub apache: LabApache,
    pub names: Vec<String>,
    agent: PathBuf,
    options: ClusterOptions,
}

impl Cluster {
    /// Lab up, cluster file written, an agent started on every node; waits
    /// until every agent serves /metrics and runs its Apache.
    pub(crate) fn start(agent: PathBuf, options: ClusterOptions) -> Result<Cluster> {
        println!("      lab up: nuster1..4 and client on a bridge, 192.0.2.0/24");
        let lab = LabGuard::up(Lab::new(&options.prefix)?)?;
        let dir =
            std::env::temp_dir().join(format!("farol-{}-{}", options.prefix, std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let names: Vec<String> = lab.nodes().iter().map(|n| n.name.clone()).collect();
        if let Some((node, mib)) = options.small_brick {
            let disk = small_disk(&dir, node);
            std::fs::create_dir_all(&disk)?;
            exec(std::process::Command::new("mount").args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={mib}m"),
                "farol-chaos-disk",
                &disk.to_string_lossy(),
            ]))?;
        }
        if let Some(node) = options.faketime {
            if !Path::new(LIBFAKETIME).exists() {
                bail!("{LIBFAKETIME} is missing (apt-get install libfaketime faketime)");
            }
            std::fs::write(faketime_file(&dir, node), "+0\n")?;
        }
        println!(
            "      the cluster file: configs/lab.toml with Apache under the agents, a replicated volume, \
             a NAT service, and PostgreSQL 15 on {} run by their agents (primary {}, Raft cluster state, pooler on every node)",
            demo_postgres::DATABASE_NODES.join(", "),
            options.primary,
        );
        let database =
            demo_postgres::sections(&lab, &dir, options.primary, options.role_check_interval)?;
        let small = options.small_brick.map(|(node, _)| node);
        let apache = xtask::apache::lab_apache(&dir, &names, |text| {
            with_volume(&text, &dir, small) + NAT_SERVICE + &database
        })?;
        for node in &names {
            std::fs::write(
                apache.document_root(node).join("index.html"),
                format!("hello from {node} (a local directory: no brick of the volume here)\n"),
            )?;
        }
        std::fs::create_dir_all(&options.log_dir)?;
        for node in &names {
            let _ = std::fs::remove_file(options.log_dir.join(format!("agent-{node}.log")));
        }
        println!(
            "      starting an agent on every node; agent logs: {}/agent-NODE.log",
            options.log_dir.display()
        );
        let mut cluster = Cluster {
            processes: Vec::new(),
            lab,
            dir,
            apache,
            names,
            agent,
            options,
        };
        for node in cluster.names.clone() {
            let process = cluster.spawn_agent(&node)?;
            cluster.processes.push(Some(process));
        }
        for node in cluster.names.clone() {
            cluster.wait_agent_ready(&node)?;
        }
        Ok(cluster)
    }

    fn spawn_agent(&self, node: &str) -> Result<LabProcess> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.options.log_dir.join(format!("agent-{node}.log")))?;
        let mut command = self.lab.command(node, &self.agent);
        command
            .args(["run", "--config"])
            .arg(&self.apache.cluster_file)
            .args(["--node", node, "--pin-dir"])
            .arg(self.lab.pin_dir(node))
            .env("FAROL_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(std::process::Stdio::null())
            .stderr(log);
        if self.options.faketime == Some(node) {
            // Only the wall clock jumps (as when NTP steps it): timers on
            // CLOCK_MONOTONIC keep running. The file is read at most once
            // a second.
            command
                .env("LD_PRELOAD", LIBFAKETIME)
                .env("FAKETIME_TIMESTAMP_FILE", self.faketime_file(node))
                .env("FAKETIME_DONT_FAKE_MONOTONIC", "1")
                .env("FAKETIME_CACHE_DURATION", "1");
        }
        self.lab.spawn(node, &mut command, "agent")
    }

    /// Waits until the agent on `node` serves /metrics and its Apache runs.
    pub(crate) fn wait_agent_ready(&self, node: &str) -> Result<()> {
        wait_for(
            &format!("the agent on {node} to serve /metrics"),
            Duration::from_secs(30),
            || scrape(&self.lab, node).ok().filter(|m| !m.is_empty()),
        )?;
        wait_for(
            &format!("Apache on {node} to be ready under its agent"),
            Duration::from_secs(60),
            || {
                let metrics = scrape(&self.lab, node).ok()?;
                (metrics.get("farol_supervise_state{child=\"apache\",state=\"running\"}")
                    == Some(&1.0))
                .then_some(())
            },
        )?;
        Ok(())
    }

    fn index(&self, node: &str) -> Result<usize> {
        self.names
            .iter()
            .position(|name| name == node)
            .with_context(|| format!("{node} is not a lab node"))
    }

    /// The agent process of `node`, if it runs.
    pub(crate) fn agent_pid(&self, node: &str) -> Option<u32> {
        let index = self.index(node).ok()?;
        self.processes[index].as_ref().map(LabProcess::pid)
    }

    /// Every agent process still running (for footprints).
    pub(crate) fn agents(&self) -> impl Iterator<Item = (&str, &LabProcess)> {
        self.names
            .iter()
            .zip(&self.processes)
            .filter_map(|(name, process)| Some((name.as_str(), process.as_ref()?)))
    }

    /// SIGKILL of the agent of `node` alone (its children, in their own
    /// process groups, outlive it).
    pub(crate) fn kill_agent(&mut self, node: &str) -> Result<()> {
        let index = self.index(node)?;
        let Some(mut agent) = self.processes[index].take() else {
            bail!("the agent on {node} is not running");
        };
        agent.child_mut().kill().context("kill -9 of the agent")?;
        let _ = agent.child_mut().wait();
        Ok(())
    }

    /// Forgets the agent of `node` after something else killed it (power
    /// off), reaping it.
    pub(crate) fn reap_agent(&mut self, node: &str) -> Result<()> {
        let index = self.index(node)?;
        if let Some(mut agent) = self.processes[index].take() {
            let _ = agent.child_mut().kill();
            let _ = agent.child_mut().wait();
        }
        Ok(())
    }

    /// Starts the agent of `node` again.
    pub(crate) fn restart_agent(&mut self, node: &str) -> Result<()> {
        let index = self.index(node)?;
        if self.processes[index].is_some() {
            bail!("the agent on {node} still runs");
        }
        self.processes[index] = Some(self.spawn_agent(node)?);
        Ok(())
    }

    /// Stops every agent (SIGTERM: drain, stop Apache gracefully, detach
    /// and unpin) and checks that each exited cleanly and left no XDP
    /// program attached.
    pub(crate) fn stop_agents(&mut self) -> Result<()> {
        let mut failures = Vec::new();
        for process in self.processes.iter_mut().rev().flatten() {
            // Draining and Apache's graceful stop come first: allow for them.
            match process.terminate(Duration::from_secs(30)) {
                Ok(status) if status.success() => {}
                Ok(status) => failures.push(format!("{} exited with {status}", process.label())),
                Err(error) => failures.push(format!("{error:#}")),
            }
        }
        self.processes.iter_mut().for_each(|slot| *slot = None);
        for node in self.lab.nodes() {
            if self.lab.xdp_program_id(&node.name)?.is_some() {
                failures.push(format!(
                    "{}: an XDP program is still attached after the agent stopped",
                    node.name
                ));
            }
        }
        if !failures.is_empty() {
            bail!("{}", failures.join("; "));
        }
        Ok(())
    }

    /// The agent binary the nodes run (for its CLI: heal-info, switchover).
    pub(crate) fn agent_binary(&self) -> &Path {
        &self.agent
    }

    pub(crate) fn log_file(&self, node: &str) -> PathBuf {
        self.options.log_dir.join(format!("agent-{node}.log"))
    }

    /// The last warnings and errors of every agent's log.
    pub(crate) fn print_warnings(&self, lines_per_node: usize) {
        for node in &self.names {
            let text = std::fs::read_to_string(self.log_file(node)).unwrap_or_default();
            let lines: Vec<&str> = text
                .lines()
                .filter(|line| line.contains(" WARN ") || line.contains(" ERROR "))
                .collect();
            println!("      last warnings of {node}'s agent:");
            for line in &lines[lines.len().saturating_sub(lines_per_node)..] {
                println!("        {line}");
            }
        }
    }

    /// Node `node`'s mount of the volume `www`.
    pub(crate) fn mount(&self, node: &str) -> PathBuf {
        volume_mount(&self.dir, node)
    }

    /// Node `node`'s brick of the volume `www`.
    pub(crate) fn brick(&self, node: &str) -> PathBuf {
        brick(&self.dir, node, self.options.small_brick.map(|(n, _)| n))
    }

    /// The tmpfs under the small brick (see [`ClusterOptions::small_brick`]).
    pub(crate) fn small_disk(&self, node: &str) -> PathBuf {
        small_disk(&self.dir, node)
    }

    /// The file holding the faketime node's clock offset ("+3600").
    pub(crate) fn faketime_file(&self, node: &str) -> PathBuf {
        faketime_file(&self.dir, node)
    }

    /// The postmaster's PID on `node`.
    pub(crate) fn postmaster_pid(&self, node: &str) -> Option<i32> {
        demo_postgres::postmaster_pid(&self.dir, node)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for slot in self.processes.iter_mut().rev() {
            drop(slot.take());
        }
        // A killed agent leaves its FUSE mount behind; the lab's teardown
        // (LabGuard's drop, after this) stops whatever else runs.
        for node in VOLUME_NODES {
            let _ = std::process::Command::new("umount")
                .args(["-l", &volume_mount(&self.dir, node).to_string_lossy()])
                .stderr(std::process::Stdio::null())
                .status();
        }
        if let Some((node, _)) = self.options.small_brick {
            let _ = std::process::Command::new("umount")
                .args(["-l", &small_disk(&self.dir, node).to_string_lossy()])
                .status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn faketime_file(dir: &Path, node: &str) -> PathBuf {
    dir.join(format!("faketime-{node}"))
}

fn small_disk(dir: &Path, node: &str) -> PathBuf {
    dir.join(format!("disk-{node}"))
}

fn brick(dir: &Path, node: &str, small: Option<&str>) -> PathBuf {
    if small == Some(node) {
        small_disk(dir, node).join("brick")
    } else {
        dir.join(format!("brick-{node}"))
    }
}

fn volume_mount(dir: &Path, node: &str) -> PathBuf {
    dir.join(format!("mnt-{node}"))
}

/// The demo's NAT service: the VIP's port 8080 through nuster1 to the
/// Apaches of nuster2..4 on port 80.
pub(crate) const NAT_PORT: u16 = 8080;
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

/// The lab's cluster file with a replicated volume `www` (bricks and mounts
/// under `dir`, one per node since all run on this machine) that Apache
/// serves on the nodes holding a replica.
fn with_volume(text: &str, dir: &Path, small: Option<&str>) -> String {
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
            brick(dir, node, small).display(),
            volume_mount(dir, node).display()
        ));
    }
    text.push_str("]\n");
    text
}

const METRICS_URL: &str = "http://127.0.0.1:9477/metrics";

pub(crate) fn scrape(lab: &Lab, node: &str) -> Result<BTreeMap<String, f64>> {
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
