//! The faults the chaos suite injects, one scenario at a time. Each
//! `inject` holds its fault for a bounded time and undoes it (restart,
//! power on, heal) before returning; the suite then waits for the cluster
//! to be healthy again.

use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use xtask::{
    capture,
    lab::{namespace_pids, HOST_INTERFACE},
};

use crate::cluster::Cluster;

/// The node that holds the VIP, the PostgreSQL primary and a brick.
pub(crate) const TARGET: &str = "nuster1";
/// The node whose brick sits on a small tmpfs and whose agent runs under
/// libfaketime.
pub(crate) const SMALL_NODE: &str = "nuster3";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Scenario {
    Kill9Agent,
    Kill9Postmaster,
    PowerOff,
    Partition22,
    Partition13,
    FlappingLink,
    FullDisk,
    ClockJump,
}

impl Scenario {
    pub(crate) const ALL: [Scenario; 8] = [
        Scenario::Kill9Agent,
        Scenario::Kill9Postmaster,
        Scenario::PowerOff,
        Scenario::Partition22,
        Scenario::Partition13,
        Scenario::FlappingLink,
        Scenario::FullDisk,
        Scenario::ClockJump,
    ];
    /// The CI profile: the correlated failure the issue is about (the node
    /// with the VIP, the primary and a brick dies at once: its agent and
    /// children, then the whole node) and a partition. partition-1-3 is
    /// not in it while the old primary often never rejoins after it
    /// (pg_rewind fails on every retry; see the README's table).
    pub(crate) const CI: [Scenario; 3] = [
        Scenario::Kill9Agent,
        Scenario::PowerOff,
        Scenario::Partition22,
    ];

    pub(crate) fn name(self) -> &'static str {
        match self {
            Scenario::Kill9Agent => "kill9-agent",
            Scenario::Kill9Postmaster => "kill9-postmaster",
            Scenario::PowerOff => "power-off",
            Scenario::Partition22 => "partition-2-2",
            Scenario::Partition13 => "partition-1-3",
            Scenario::FlappingLink => "flapping-link",
            Scenario::FullDisk => "full-disk",
            Scenario::ClockJump => "clock-jump",
        }
    }

    pub(crate) fn from_name(name: &str) -> Option<Scenario> {
        Scenario::ALL.into_iter().find(|s| s.name() == name)
    }

    pub(crate) fn describe(self) -> String {
        match self {
            Scenario::Kill9Agent => format!(
                "kill -9 of {TARGET}'s agent (VIP, primary, brick) and of its children \
                 (PostgreSQL, Apache), as systemd's KillMode=mixed does when the main process \
                 dies; the agent starts again 3 s later"
            ),
            Scenario::Kill9Postmaster => {
                format!("kill -9 of the postmaster on {TARGET} (the primary); its agent stays up")
            }
            Scenario::PowerOff => format!(
                "power-off of {TARGET}: its link down and every process in its namespace \
                 SIGKILLed; power on 10 s later (link up, agent started)"
            ),
            Scenario::Partition22 => {
                "partition {nuster1, nuster2} | {nuster3, nuster4} for 15 s (the Raft voters \
                 are nuster1..3: the side with nuster1 and nuster2 holds 2 of 3 votes), then heal"
                    .into()
            }
            Scenario::Partition13 => format!(
                "partition {{{TARGET}}} | {{nuster2, nuster3, nuster4}} for 20 s (the client \
                 still reaches every node), then heal"
            ),
            Scenario::FlappingLink => format!("{TARGET}'s link down 300 ms / up 300 ms for 12 s"),
            Scenario::FullDisk => {
                format!("{SMALL_NODE}'s brick (a 48 MiB tmpfs) filled up for 10 s, then freed")
            }
            Scenario::ClockJump => format!(
                "{SMALL_NODE}'s wall clock (its agent under libfaketime) jumps 1 h forward \
                 for 10 s, then 1 h back"
            ),
        }
    }

    /// Injects the fault, holds it and undoes it.
    pub(crate) fn inject(self, cluster: &mut Cluster) -> Result<()> {
        match self {
            Scenario::Kill9Agent => {
                let pid = cluster
                    .agent_pid(TARGET)
                    .context("the agent on the target is not running")?;
                // The children are collected before the agent dies: after,
                // they are reparented and no longer its descendants.
                let children = descendants(pid);
                cluster.kill_agent(TARGET)?;
                for child in &children {
                    kill9(*child);
                }
                println!(
                    "      killed the agent (pid {pid}) and its {} descendants",
                    children.len()
                );
                std::thread::sleep(Duration::from_secs(3));
                cluster.restart_agent(TARGET)
            }
            Scenario::Kill9Postmaster => {
                let pid = cluster
                    .postmaster_pid(TARGET)
                    .context("no postmaster.pid on the target")?;
                kill9(pid);
                println!("      killed the postmaster (pid {pid})");
                Ok(())
            }
            Scenario::PowerOff => {
                set_link(cluster, TARGET, false)?;
                let netns = cluster.lab.netns(TARGET);
                let pids = namespace_pids(&netns);
                for pid in &pids {
                    kill9(*pid);
                }
                cluster.reap_agent(TARGET)?;
                println!(
                    "      {TARGET} off: link down, {} processes killed",
                    pids.len()
                );
                std::thread::sleep(Duration::from_secs(10));
                set_link(cluster, TARGET, true)?;
                cluster.restart_agent(TARGET)
            }
            Scenario::Partition22 => {
                let sides: [&[&str]; 2] = [&["nuster1", "nuster2"], &["nuster3", "nuster4"]];
                partition(cluster, sides, Duration::from_secs(15))
            }
            Scenario::Partition13 => {
                let sides: [&[&str]; 2] = [&[TARGET], &["nuster2", "nuster3", "nuster4"]];
                partition(cluster, sides, Duration::from_secs(20))
            }
            Scenario::FlappingLink => {
                let until = Instant::now() + Duration::from_secs(12);
                let mut flaps = 0;
                while Instant::now() < until {
                    set_link(cluster, TARGET, false)?;
                    std::thread::sleep(Duration::from_millis(300));
                    set_link(cluster, TARGET, true)?;
                    std::thread::sleep(Duration::from_millis(300));
                    flaps += 1;
                }
                println!("      {flaps} flaps");
                Ok(())
            }
            Scenario::FullDisk => {
                let filler = cluster.small_disk(SMALL_NODE).join("filler");
                // dd stops at ENOSPC (and so exits non-zero): that is the point.
                let _ = Command::new("dd")
                    .args(["if=/dev/zero", "bs=1M", "count=1024"])
                    .arg(format!("of={}", filler.display()))
                    .stderr(Stdio::null())
                    .status();
                let free = capture(
                    Command::new("df")
                        .args(["--output=avail", "-B1"])
                        .arg(cluster.small_disk(SMALL_NODE)),
                )?;
                println!(
                    "      {SMALL_NODE}'s brick disk full ({} bytes free)",
                    String::from_utf8_lossy(&free.stdout)
                        .lines()
                        .nth(1)
                        .unwrap_or("?")
                        .trim()
                );
                std::thread::sleep(Duration::from_secs(10));
                std::fs::remove_file(&filler)?;
                Ok(())
            }
            Scenario::ClockJump => {
                let file = cluster.faketime_file(SMALL_NODE);
                std::fs::write(&file, "+3600\n")?;
                // libfaketime reads the file at most once a second.
                std::thread::sleep(Duration::from_secs(3));
                let offset = clock_offset(cluster, SMALL_NODE)?;
                println!(
                    "      {SMALL_NODE}'s clock +1 h: its PostgreSQL (a child of its agent) says \
                     now() is {offset} s ahead of the host"
                );
                if offset < 3000 {
                    bail!("the clock jump did not take: {SMALL_NODE} is {offset} s ahead");
                }
                std::thread::sleep(Duration::from_secs(7));
                std::fs::write(&file, "+0\n")?;
                println!("      {SMALL_NODE}'s clock back");
                Ok(())
            }
        }
    }
}

/// How far ahead of this host's clock `node`'s PostgreSQL puts now(), in
/// seconds.
fn clock_offset(cluster: &Cluster, node: &str) -> Result<i64> {
    let out = crate::demo_postgres::psql_direct(
        &cluster.lab,
        node,
        "postgres",
        "SELECT extract(epoch FROM clock_timestamp())::bigint",
    )?;
    let theirs: i64 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .with_context(|| {
            format!(
                "now() on {node}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )
        })?;
    let ours = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs() as i64;
    Ok(theirs - ours)
}

fn kill9(pid: i32) {
    // SAFETY: kill(2) on a PID of this lab's processes; a stale PID is ESRCH.
    unsafe { libc::kill(pid, libc::SIGKILL) };
}

/// Every process below `pid` (children, grandchildren, ...), from /proc.
fn descendants(pid: u32) -> Vec<i32> {
    let mut parents: Vec<(i32, i32)> = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let Ok(child) = entry.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            // The command name is in parentheses and may hold spaces: the
            // fields after its closing one are state, then the parent.
            let parent = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|ppid| ppid.parse::<i32>().ok());
            if let Some(parent) = parent {
                parents.push((child, parent));
            }
        }
    }
    let mut found = vec![pid as i32];
    let mut index = 0;
    while index < found.len() {
        let parent = found[index];
        found.extend(
            parents
                .iter()
                .filter(|(_, p)| *p == parent)
                .map(|(child, _)| *child),
        );
        index += 1;
    }
    found.remove(0);
    found
}

fn set_link(cluster: &Cluster, node: &str, up: bool) -> Result<()> {
    capture(Command::new("ip").args([
        "-n",
        &cluster.lab.netns(node),
        "link",
        "set",
        HOST_INTERFACE,
        if up { "up" } else { "down" },
    ]))
    .map(|_| ())
}

/// Cuts every node of one side from every node of the other with
/// nftables in each node's namespace (both directions, by address: unlike
/// a blackhole route this also drops VRRP's multicast adverts), holds the
/// cut and removes it. The client reaches both sides throughout.
fn partition(cluster: &Cluster, sides: [&[&str]; 2], hold: Duration) -> Result<()> {
    let mut cut = Vec::new();
    for (ours, theirs) in [(sides[0], sides[1]), (sides[1], sides[0])] {
        let addresses = theirs
            .iter()
            .map(|n| Ok(cluster.lab.node(n)?.ip().to_owned()))
            .collect::<Result<Vec<_>>>()?
            .join(", ");
        for node in ours {
            let rules = format!(
                "table inet farol_chaos {{\n\
                 chain input {{ type filter hook input priority -10; ip saddr {{ {addresses} }} drop; }}\n\
                 chain output {{ type filter hook output priority -10; ip daddr {{ {addresses} }} drop; }}\n\
                 }}\n"
            );
            nft(cluster, node, &rules)?;
            cut.push(*node);
        }
    }
    println!(
        "      cut {} | {} for {} s",
        sides[0].join(", "),
        sides[1].join(", "),
        hold.as_secs()
    );
    std::thread::sleep(hold);
    let mut failures = Vec::new();
    for node in cut {
        if let Err(error) = nft(cluster, node, "delete table inet farol_chaos\n") {
            failures.push(format!("{error:#}"));
        }
    }
    if !failures.is_empty() {
        bail!("healing the partition: {}", failures.join("; "));
    }
    println!("      healed");
    Ok(())
}

fn nft(cluster: &Cluster, node: &str, rules: &str) -> Result<()> {
    use std::io::Write;
    let mut child = cluster
        .lab
        .command(node, "nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running nft (apt-get install nftables)")?;
    child
        .stdin
        .take()
        .context("nft's stdin")?
        .write_all(rules.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "nft in {node}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}
