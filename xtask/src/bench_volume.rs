//! `cargo xtask bench storage`: the replicated volume against local ext4
//! (the directory the bricks live on) and, when it installs and runs,
//! GlusterFS 3-replica on the same machine, in the same run. Workloads
//! from shared/PEERS.md: create 4 KB files with fsync, cold read of them,
//! delete with a directory fsync (half the files) and without (the other
//! half), sequential 1 MiB writes with fsync, cold sequential read. Every loop is bounded in count and time. The targets take turns
//! for `FAROL_BENCH_ROUNDS` rounds (3 by default); each round is printed
//! and the median kept.
//!
//! Then the heal case from PEERS.md on each replicated target: one replica
//! is killed, 2,000 small files, a 200 MiB file and an 8 MiB overwrite are
//! written while it is down, and the time from its return until nothing is
//! pending (`agent volume heal-info` on every node; `gluster volume heal
//! VOL info`) is measured, then the returned brick is compared.

use std::{
    fs,
    io::{Read, Write},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use xtask::{bench::BenchReport, exec, workspace_root};

/// Small files per run (PEERS.md used 2,000 for heal; 1,000 keep the run short).
const FILES: usize = 1000;
/// Sequential file size.
const SEQ_MIB: usize = 128;
/// No single workload runs longer than this.
const LIMIT: Duration = Duration::from_secs(30);
/// How long to wait for a mount to come up.
const MOUNT_WAIT: Duration = Duration::from_secs(30);
/// What the down replica misses in the heal case (PEERS.md).
const HEAL_FILES: usize = 2000;
const HEAL_BIG_MIB: usize = 200;
const HEAL_OVERWRITE_MIB: usize = 8;
/// Longest wait for a heal to complete (GlusterFS took 109 s here).
const HEAL_LIMIT: Duration = Duration::from_secs(300);

struct Target {
    name: &'static str,
    dir: PathBuf,
    /// The target's own server processes (Farol's agents), whose CPU time
    /// and context switches per operation are printed.
    servers: Vec<u32>,
}

/// CPU time and context switches of processes, all threads counted
/// (`/proc/PID/task/*/schedstat` and `status`): what an operation costs
/// the servers whatever else the machine does, beside its latency, which
/// moves with the load.
#[derive(Debug, Clone, Copy, Default)]
struct Usage {
    cpu_ns: u64,
    switches: u64,
}

fn usage(pids: &[u32]) -> Usage {
    let mut total = Usage::default();
    for pid in pids {
        let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
            continue;
        };
        for task in tasks.flatten() {
            let dir = task.path();
            if let Ok(stat) = fs::read_to_string(dir.join("schedstat")) {
                total.cpu_ns += stat
                    .split_whitespace()
                    .next()
                    .and_then(|ns| ns.parse::<u64>().ok())
                    .unwrap_or(0);
            }
            if let Ok(status) = fs::read_to_string(dir.join("status")) {
                for line in status.lines() {
                    if let Some(count) = line
                        .strip_prefix("voluntary_ctxt_switches:")
                        .or_else(|| line.strip_prefix("nonvoluntary_ctxt_switches:"))
                    {
                        total.switches += count.trim().parse::<u64>().unwrap_or(0);
                    }
                }
            }
        }
    }
    total
}

/// Per operation: server CPU microseconds and context switches.
#[derive(Debug, Clone, Copy, Default)]
struct Cost {
    cpu_us: f64,
    switches: f64,
}

fn cost(before: Usage, after: Usage, ops: usize) -> Cost {
    let ops = ops.max(1) as f64;
    Cost {
        cpu_us: after.cpu_ns.saturating_sub(before.cpu_ns) as f64 / 1000.0 / ops,
        switches: after.switches.saturating_sub(before.switches) as f64 / ops,
    }
}

/// Processes and mounts to take down, also on error.
struct Cleanup {
    children: Vec<Child>,
    mounts: Vec<PathBuf>,
    gluster_volume: Option<String>,
    /// glusterd's pid file when this run started it.
    glusterd_pid: Option<PathBuf>,
    dir: PathBuf,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for mount in &self.mounts {
            let _ = Command::new("umount").arg("-l").arg(mount).status();
        }
        for child in &mut self.children {
            // SAFETY: kill(2) on the PID of a child we spawned.
            unsafe {
                libc::kill(child.id() as i32, libc::SIGTERM);
            }
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Some(volume) = &self.gluster_volume {
            let _ = gluster(&["volume", "stop", volume, "force"]);
            let _ = gluster(&["volume", "delete", volume]);
        }
        if let Some(pid) = self
            .glusterd_pid
            .as_ref()
            .and_then(|p| fs::read_to_string(p).ok())
        {
            if let Ok(pid) = pid.trim().parse::<i32>() {
                // SAFETY: kill(2) on the glusterd this run started.
                unsafe {
                    libc::kill(pid, libc::SIGTERM);
                }
            }
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn gluster(args: &[&str]) -> Result<String> {
    let out = Command::new("gluster")
        .arg("--mode=script")
        .args(args)
        .output()
        .context("running gluster")?;
    if !out.status.success() {
        bail!(
            "gluster {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn is_mounted(path: &Path) -> bool {
    let mounts = fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let needle = format!(" {} fuse", path.display());
    mounts.lines().any(|line| line.contains(&needle))
}

fn drop_caches() -> Result<()> {
    // SAFETY: sync(2) has no preconditions.
    unsafe { libc::sync() };
    fs::write("/proc/sys/vm/drop_caches", "3").context("dropping the page cache (needs root)")
}

fn wait_for(what: &str, limit: Duration, mut ok: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + limit;
    while !ok() {
        if Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// The three agents of the Farol volume (node `n{i}`: `brick{i}`, `mnt{i}`).
struct FarolCluster {
    agent: PathBuf,
    config: PathBuf,
    dir: PathBuf,
}

impl FarolCluster {
    fn spawn(&self, i: usize) -> Result<Child> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("n{i}.log")))?;
        Command::new(&self.agent)
            .args(["volume", "serve", "--config"])
            .arg(&self.config)
            .args(["--node", &format!("n{i}")])
            .env("FAROL_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", self.agent.display()))
    }

    fn mount(&self, i: usize) -> PathBuf {
        self.dir.join(format!("mnt{i}"))
    }

    fn brick(&self, i: usize) -> PathBuf {
        self.dir.join(format!("brick{i}"))
    }

    /// `agent volume heal-info --json` of node `i`: None while it does not
    /// answer; Some(true) when it is current and nothing is pending for
    /// any peer, each of them up.
    fn healed(&self, i: usize) -> Option<bool> {
        let out = Command::new(&self.agent)
            .args(["volume", "heal-info", "--json", "--config"])
            .arg(&self.config)
            .args(["--node", &format!("n{i}")])
            .stderr(Stdio::null())
            .output()
            .ok()?;
        if !out.status.success() {
            return None;
        }
        let reports: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        let reports = reports.as_array()?;
        Some(reports.iter().all(|report| {
            report["current"] == true
                && report["peers"].as_array().is_some_and(|peers| {
                    peers
                        .iter()
                        .all(|peer| peer["up"] == true && peer["pending"] == 0)
                })
        }))
    }
}

/// Starts three agents on loopback and returns node 1's mount.
fn start_farol(base: &Path, cleanup: &mut Cleanup) -> Result<(PathBuf, FarolCluster)> {
    // FAROL_BENCH_AGENT: another agent binary (a copy of an earlier
    // build, for comparing two builds on the same machine state).
    let agent = std::env::var_os("FAROL_BENCH_AGENT")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target/release/agent"));
    let dir = base.join("farol");
    fs::create_dir_all(&dir)?;
    fs::write(dir.join("secret"), "bench secret 0123456789abcdef\n")?;
    let ports: Vec<u16> = (0..3)
        .map(|_| {
            std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .map(|a| a.port())
        })
        .collect::<std::io::Result<_>>()?;
    let mut text = format!(
        "[cluster]\nname = \"bench\"\nsecret_file = \"{}\"\n\n",
        dir.join("secret").display()
    );
    for i in 1..=3 {
        text.push_str(&format!(
            "[[node]]\nname = \"n{i}\"\naddress = \"192.0.2.{}/24\"\ninterface = \"eth0\"\n\n",
            10 + i
        ));
    }
    text.push_str("[[volume]]\nname = \"bench\"\nreplicas = [\n");
    for i in 1..=3 {
        text.push_str(&format!(
            "  {{ node = \"n{i}\", brick = \"{}\", listen = \"127.0.0.1:{}\", mount = \"{}\" }},\n",
            dir.join(format!("brick{i}")).display(),
            ports[i - 1],
            dir.join(format!("mnt{i}")).display()
        ));
    }
    text.push_str("]\n");
    let config = dir.join("cluster.toml");
    fs::write(&config, text)?;
    let cluster = FarolCluster {
        agent,
        config,
        dir: dir.clone(),
    };
    for i in 1..=3 {
        let child = cluster.spawn(i)?;
        cleanup.children.push(child);
        cleanup.mounts.push(dir.join(format!("mnt{i}")));
    }
    for i in 1..=3 {
        let mount = dir.join(format!("mnt{i}"));
        wait_for(
            &format!("{} to be mounted", mount.display()),
            MOUNT_WAIT,
            || is_mounted(&mount),
        )?;
    }
    let mount = dir.join("mnt1");
    // Ready when a write goes through (peers connected, quorum reached).
    wait_for("the volume to accept writes", MOUNT_WAIT, || {
        fs::write(mount.join(".probe"), b"x").is_ok()
    })?;
    fs::remove_file(mount.join(".probe"))?;
    Ok((mount, cluster))
}

/// The GlusterFS volume of this run.
struct GlusterVolume {
    name: String,
    bricks: Vec<PathBuf>,
}

impl GlusterVolume {
    /// The PID of the brick process serving `brick` (from `volume status
    /// --xml`: a node's `<path>` comes before its `<pid>`).
    fn brick_pid(&self, brick: &Path) -> Result<i32> {
        let xml = gluster(&["volume", "status", &self.name, "--xml"])?;
        let needle = format!("<path>{}</path>", brick.display());
        let at = xml
            .find(&needle)
            .with_context(|| format!("{} not in the volume status", brick.display()))?;
        let rest = &xml[at..];
        let start = rest
            .find("<pid>")
            .context("no <pid> in the volume status")?
            + 5;
        let end = rest[start..].find("</pid>").context("no </pid>")? + start;
        let pid: i32 = rest[start..end].trim().parse().context("brick pid")?;
        if pid <= 0 {
            bail!("brick {} is not running", brick.display());
        }
        Ok(pid)
    }

    /// Whether `gluster volume heal VOL info` lists nothing for any brick,
    /// every brick connected.
    fn healed(&self) -> bool {
        let Ok(text) = gluster(&["volume", "heal", &self.name, "info"]) else {
            return false;
        };
        let counts: Vec<&str> = text
            .lines()
            .filter_map(|line| line.trim().strip_prefix("Number of entries:"))
            .collect();
        let connected = text
            .lines()
            .filter(|line| line.trim() == "Status: Connected")
            .count();
        counts.len() == self.bricks.len()
            && connected == self.bricks.len()
            && counts.iter().all(|count| count.trim() == "0")
    }
}

/// Creates a GlusterFS replica 3 volume on this host and mounts it.
fn start_gluster(base: &Path, cleanup: &mut Cleanup) -> Result<(PathBuf, GlusterVolume)> {
    if Command::new("gluster").arg("--version").output().is_err() {
        println!("installing GlusterFS (apt-get install glusterfs-server glusterfs-client) ...");
        exec(Command::new("apt-get").args([
            "install",
            "-y",
            "--no-install-recommends",
            "glusterfs-server",
            "glusterfs-client",
        ]))?;
    }
    if gluster(&["pool", "list"]).is_err() {
        exec(Command::new("glusterd").args(["-p", "/run/glusterd-bench.pid"]))?;
        cleanup.glusterd_pid = Some(PathBuf::from("/run/glusterd-bench.pid"));
        wait_for("glusterd", Duration::from_secs(20), || {
            gluster(&["pool", "list"]).is_ok()
        })?;
    }
    let host = fs::read_to_string("/proc/sys/kernel/hostname")?
        .trim()
        .to_owned();
    let dir = base.join("gluster");
    let name = format!("farolbench{}", std::process::id());
    let mut bricks = Vec::new();
    let mut args = vec![
        "volume".to_owned(),
        "create".to_owned(),
        name.clone(),
        "replica".to_owned(),
        "3".to_owned(),
    ];
    for i in 1..=3 {
        let brick = dir.join(format!("brick{i}"));
        fs::create_dir_all(&brick)?;
        args.push(format!("{host}:{}", brick.display()));
        bricks.push(brick);
    }
    args.push("force".to_owned());
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    gluster(&refs)?;
    cleanup.gluster_volume = Some(name.clone());
    gluster(&["volume", "start", &name])?;
    let mount = dir.join("mnt");
    fs::create_dir_all(&mount)?;
    exec(
        Command::new("mount")
            .args(["-t", "glusterfs"])
            .arg(format!("{host}:/{name}"))
            .arg(&mount),
    )?;
    cleanup.mounts.insert(0, mount.clone());
    wait_for("the GlusterFS mount", MOUNT_WAIT, || is_mounted(&mount))?;
    Ok((mount, GlusterVolume { name, bricks }))
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// Before the outage: the file the outage overwrites.
fn heal_prepare(mount: &Path) -> Result<()> {
    let work = mount.join("heal-work");
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(work.join("small"))?;
    let mut file = fs::File::create(work.join("overwritten"))?;
    file.write_all(&pattern(1, HEAL_OVERWRITE_MIB << 20))?;
    file.sync_all()?;
    Ok(())
}

/// During the outage: what the down replica misses.
fn heal_miss(mount: &Path) -> Result<()> {
    let work = mount.join("heal-work");
    let block = pattern(2, 4096);
    let started = Instant::now();
    for i in 0..HEAL_FILES {
        fs::write(work.join(format!("small/f{i:05}")), &block)?;
        if started.elapsed() > HEAL_LIMIT {
            bail!("writing the small files took over {HEAL_LIMIT:?}");
        }
    }
    let mib = pattern(3, 1 << 20);
    let mut file = fs::File::create(work.join("big"))?;
    for _ in 0..HEAL_BIG_MIB {
        file.write_all(&mib)?;
    }
    file.sync_all()?;
    let mut file = fs::OpenOptions::new()
        .write(true)
        .open(work.join("overwritten"))?;
    file.write_all(&pattern(4, HEAL_OVERWRITE_MIB << 20))?;
    file.sync_all()?;
    Ok(())
}

/// Whether the returned brick holds what the others hold.
fn heal_compare(good: &Path, healed: &Path) -> Result<()> {
    let (good, healed) = (good.join("heal-work"), healed.join("heal-work"));
    for name in ["big", "overwritten"] {
        if fs::read(good.join(name))? != fs::read(healed.join(name))? {
            bail!("{} differs after the heal", healed.join(name).display());
        }
    }
    let count = |dir: &Path| -> Result<usize> { Ok(fs::read_dir(dir.join("small"))?.count()) };
    let (want, got) = (count(&good)?, count(&healed)?);
    if got != want || want != HEAL_FILES {
        bail!("the healed brick holds {got} small files, the good one {want} (wrote {HEAL_FILES})");
    }
    for i in (0..HEAL_FILES).step_by(97) {
        let rel = format!("small/f{i:05}");
        if fs::read(good.join(&rel))? != fs::read(healed.join(&rel))? {
            bail!("{rel} differs after the heal");
        }
    }
    Ok(())
}

/// Farol: node 3 is killed (SIGKILL), misses the changes, and is started
/// again; seconds until every node's heal-info is empty.
fn heal_farol(cluster: &FarolCluster, cleanup: &mut Cleanup) -> Result<f64> {
    let mount = cluster.mount(1);
    heal_prepare(&mount)?;
    let victim = cleanup.children.remove(2);
    kill_child(victim);
    lazy_unmount(&cluster.mount(3));
    heal_miss(&mount)?;
    let started = Instant::now();
    cleanup.children.push(cluster.spawn(3)?);
    wait_for("the Farol heal", HEAL_LIMIT, || {
        (1..=3).all(|i| cluster.healed(i) == Some(true))
    })?;
    let elapsed = started.elapsed().as_secs_f64();
    heal_compare(&cluster.brick(1), &cluster.brick(3))?;
    fs::remove_dir_all(mount.join("heal-work"))?;
    Ok(elapsed)
}

/// GlusterFS: brick 3's process is killed (SIGKILL), misses the changes,
/// and is started again (`volume start force`, then `volume heal` to
/// start the index heal at once); seconds until `heal info` is empty.
fn heal_gluster(mount: &Path, volume: &GlusterVolume) -> Result<f64> {
    heal_prepare(mount)?;
    let pid = volume.brick_pid(&volume.bricks[2])?;
    // SAFETY: kill(2) on the brick process of the volume this run made.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
    }
    heal_miss(mount)?;
    let started = Instant::now();
    gluster(&["volume", "start", &volume.name, "force"])?;
    // The self-heal daemon may not have reconnected yet: retry briefly.
    let deadline = Instant::now() + Duration::from_secs(10);
    while gluster(&["volume", "heal", &volume.name]).is_err() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    let deadline = started + HEAL_LIMIT;
    while !volume.healed() {
        if Instant::now() > deadline {
            bail!("GlusterFS had not healed after {HEAL_LIMIT:?}");
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let elapsed = started.elapsed().as_secs_f64();
    heal_compare(&volume.bricks[0], &volume.bricks[2])?;
    fs::remove_dir_all(mount.join("heal-work"))?;
    Ok(elapsed)
}

fn kill_child(mut child: Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Detaches the stale mount a killed agent left.
fn lazy_unmount(path: &Path) {
    let _ = Command::new("umount").arg("-l").arg(path).status();
}

#[derive(Debug, Clone)]
struct Figures {
    create: f64,
    read: f64,
    delete: f64,
    /// Unlink alone: GlusterFS's `fsyncdir` syncs nothing (its brick's
    /// `posix_fsyncdir` answers at once), so this is the like-for-like
    /// figure beside `delete`.
    delete_nosync: f64,
    write_mib: f64,
    read_mib: f64,
    /// The servers' cost per create, cold read, delete + dir fsync and
    /// delete alone (zero without server processes: local).
    costs: [Cost; 4],
}

impl Figures {
    /// Each workload's median over rounds (the upper middle one of an
    /// even count).
    fn median(rounds: &[Figures]) -> Figures {
        let pick = |get: fn(&Figures) -> f64| {
            let mut values: Vec<f64> = rounds.iter().map(get).collect();
            values.sort_by(f64::total_cmp);
            values.get(values.len() / 2).copied().unwrap_or(0.0)
        };
        Figures {
            create: pick(|f| f.create),
            read: pick(|f| f.read),
            delete: pick(|f| f.delete),
            delete_nosync: pick(|f| f.delete_nosync),
            write_mib: pick(|f| f.write_mib),
            read_mib: pick(|f| f.read_mib),
            costs: [0, 1, 2, 3].map(|i| {
                let middle = |get: &dyn Fn(&Cost) -> f64| {
                    let mut values: Vec<f64> = rounds.iter().map(|f| get(&f.costs[i])).collect();
                    values.sort_by(f64::total_cmp);
                    values.get(values.len() / 2).copied().unwrap_or(0.0)
                };
                Cost {
                    cpu_us: middle(&|c| c.cpu_us),
                    switches: middle(&|c| c.switches),
                }
            }),
        }
    }
}

/// Rounds of the workloads per target: `FAROL_BENCH_ROUNDS` (1 to 9), 3
/// by default.
fn rounds() -> usize {
    std::env::var("FAROL_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .map_or(3, |n| n.clamp(1, 9))
}

/// The 1-minute load average, as /proc/loadavg says it.
fn load_average() -> String {
    fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|text| text.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "?".to_owned())
}

/// Every round's figures of the small-file workloads, and Farol's ratio
/// to GlusterFS in the same round.
fn print_rounds(targets: &[Target], per_round: &[Vec<Figures>]) {
    let farol = targets.iter().position(|t| t.name == "farol");
    let gluster = targets.iter().position(|t| t.name == "glusterfs");
    println!("\nper round (files/s: create + fsync, cold read, delete + dir fsync, delete alone):");
    let rounds = per_round.first().map_or(0, Vec::len);
    for round in 0..rounds {
        let cells: Vec<String> = targets
            .iter()
            .zip(per_round)
            .map(|(target, figures)| {
                let f = &figures[round];
                format!(
                    "{} {:.0} / {:.0} / {:.0} / {:.0}",
                    target.name, f.create, f.read, f.delete, f.delete_nosync
                )
            })
            .collect();
        let ratios = match (farol, gluster) {
            (Some(a), Some(b)) => {
                let (a, b) = (&per_round[a][round], &per_round[b][round]);
                format!(
                    "; farol / glusterfs {:.2}x / {:.2}x / {:.2}x / {:.2}x",
                    a.create / b.create,
                    a.read / b.read,
                    a.delete / b.delete,
                    a.delete_nosync / b.delete_nosync
                )
            }
            _ => String::new(),
        };
        println!("  round {}: {}{ratios}", round + 1, cells.join("; "));
        for (target, figures) in targets.iter().zip(per_round) {
            if target.servers.is_empty() {
                continue;
            }
            let c = &figures[round].costs;
            println!(
                "    {} servers per operation (CPU µs, context switches): {:.0}, {:.1} / {:.0}, {:.1} / {:.0}, {:.1} / {:.0}, {:.1}",
                target.name,
                c[0].cpu_us,
                c[0].switches,
                c[1].cpu_us,
                c[1].switches,
                c[2].cpu_us,
                c[2].switches,
                c[3].cpu_us,
                c[3].switches
            );
        }
    }
}

fn per_second(count: usize, elapsed: Duration) -> f64 {
    count as f64 / elapsed.as_secs_f64().max(1e-9)
}

fn run_workloads(dir: &Path, servers: &[u32]) -> Result<Figures> {
    let work = dir.join("bench-work");
    let _ = fs::remove_dir_all(&work);
    fs::create_dir(&work)?;
    let block = vec![0x5au8; 4096];

    let mut costs = [Cost::default(); 4];
    let before = usage(servers);
    let started = Instant::now();
    let mut created = 0;
    while created < FILES && started.elapsed() < LIMIT {
        let mut file = fs::File::create(work.join(format!("f{created:05}")))?;
        file.write_all(&block)?;
        file.sync_all()?;
        created += 1;
    }
    let create = per_second(created, started.elapsed());
    costs[0] = cost(before, usage(servers), created);

    drop_caches()?;
    let before = usage(servers);
    let started = Instant::now();
    let mut buf = Vec::with_capacity(8192);
    let mut read = 0;
    while read < created && started.elapsed() < LIMIT {
        buf.clear();
        fs::File::open(work.join(format!("f{read:05}")))?.read_to_end(&mut buf)?;
        if buf.len() != 4096 {
            bail!("{}: read {} bytes, wrote 4096", dir.display(), buf.len());
        }
        read += 1;
    }
    let read_rate = per_second(read, started.elapsed());
    costs[1] = cost(before, usage(servers), read);

    // The first half is deleted with a directory fsync after each file,
    // the second half without.
    let half = created / 2;
    let before = usage(servers);
    let started = Instant::now();
    let dir_handle = fs::File::open(&work)?;
    let mut deleted = 0;
    while deleted < half && started.elapsed() < LIMIT {
        fs::remove_file(work.join(format!("f{deleted:05}")))?;
        dir_handle.sync_all()?;
        deleted += 1;
    }
    let delete = per_second(deleted, started.elapsed());
    costs[2] = cost(before, usage(servers), deleted);
    for rest in deleted..half {
        let _ = fs::remove_file(work.join(format!("f{rest:05}")));
    }
    let before = usage(servers);
    let started = Instant::now();
    let mut unlinked = half;
    while unlinked < created && started.elapsed() < LIMIT {
        fs::remove_file(work.join(format!("f{unlinked:05}")))?;
        unlinked += 1;
    }
    let delete_nosync = per_second(unlinked - half, started.elapsed());
    costs[3] = cost(before, usage(servers), unlinked - half);
    for rest in unlinked..created {
        let _ = fs::remove_file(work.join(format!("f{rest:05}")));
    }

    let mib = vec![0xa5u8; 1 << 20];
    let started = Instant::now();
    let mut file = fs::File::create(work.join("seq"))?;
    let mut written = 0;
    while written < SEQ_MIB && started.elapsed() < LIMIT {
        file.write_all(&mib)?;
        written += 1;
    }
    file.sync_all()?;
    drop(file);
    let write_mib = per_second(written, started.elapsed());

    drop_caches()?;
    let started = Instant::now();
    let mut file = fs::File::open(work.join("seq"))?;
    let mut chunk = vec![0u8; 1 << 20];
    let mut total = 0usize;
    loop {
        let n = file.read(&mut chunk)?;
        if n == 0 || started.elapsed() > LIMIT {
            break;
        }
        total += n;
    }
    let read_mib = total as f64 / (1 << 20) as f64 / started.elapsed().as_secs_f64().max(1e-9);
    fs::remove_dir_all(&work)?;
    Ok(Figures {
        create,
        read: read_rate,
        delete,
        delete_nosync,
        write_mib,
        read_mib,
        costs,
    })
}

pub(crate) fn run() -> Result<BenchReport> {
    if !xtask::is_root() {
        bail!("bench storage mounts FUSE file systems and drops the page cache: run it as root");
    }
    // A given agent binary (FAROL_BENCH_AGENT, see `start_farol`) needs
    // no build.
    if std::env::var_os("FAROL_BENCH_AGENT").is_none() {
        exec(Command::new("cargo").current_dir(workspace_root()).args([
            "build",
            "--release",
            "-p",
            "farol-agent",
        ]))?;
    }
    // On the same file system as target/, like the bricks.
    let base = workspace_root().join(format!("target/bench/volume-{}", std::process::id()));
    let _ = fs::remove_dir_all(&base);
    fs::create_dir_all(base.join("local"))?;
    let mut cleanup = Cleanup {
        children: Vec::new(),
        mounts: Vec::new(),
        gluster_volume: None,
        glusterd_pid: None,
        dir: base.clone(),
    };
    let mut targets = vec![Target {
        name: "local",
        dir: base.join("local"),
        servers: Vec::new(),
    }];
    let (farol_mount, farol) = start_farol(&base, &mut cleanup)?;
    targets.push(Target {
        name: "farol",
        dir: farol_mount,
        servers: cleanup.children.iter().map(Child::id).collect(),
    });
    // FAROL_BENCH_QUICK=1: Farol and local only, no heal case (for
    // iterating on the volume; figures to report come from a full run).
    let quick = std::env::var_os("FAROL_BENCH_QUICK").is_some_and(|v| v == "1");
    let mut glusterfs = None;
    match if quick {
        Err(anyhow::anyhow!("skipped (FAROL_BENCH_QUICK=1)"))
    } else {
        start_gluster(&base, &mut cleanup)
    } {
        Ok((dir, volume)) => {
            targets.push(Target {
                name: "glusterfs",
                dir,
                servers: Vec::new(),
            });
            glusterfs = Some(volume);
        }
        Err(error) => println!("GlusterFS not compared: {error:#}"),
    }

    let mut report = BenchReport::new("storage");
    // The targets take turns, round after round, so a burst of load from
    // other work on the machine falls on all of them alike; the figure
    // kept per workload is each target's median over the rounds, and
    // every round is printed (the spread between rounds is part of the
    // result).
    let rounds = rounds();
    let mut per_round: Vec<Vec<Figures>> = targets.iter().map(|_| Vec::new()).collect();
    for round in 1..=rounds {
        for (index, target) in targets.iter().enumerate() {
            println!(
                "round {round}/{rounds}: the workloads on {} ({}), load average {} ...",
                target.name,
                target.dir.display(),
                load_average()
            );
            let figures = run_workloads(&target.dir, &target.servers)
                .with_context(|| format!("workloads on {}", target.name))?;
            per_round[index].push(figures);
        }
    }
    let mut rows: Vec<(&str, Figures)> = Vec::new();
    for (target, figures) in targets.iter().zip(&per_round) {
        let figures = Figures::median(figures);
        let cases = [
            ("create-4k-sync", "files_per_s", figures.create, "files/s"),
            ("cold-read-4k", "files_per_s", figures.read, "files/s"),
            ("delete-sync", "files_per_s", figures.delete, "files/s"),
            ("delete", "files_per_s", figures.delete_nosync, "files/s"),
            (
                "seq-write-1m-fsync",
                "mib_per_s",
                figures.write_mib,
                "MiB/s",
            ),
            ("seq-read-1m-cold", "mib_per_s", figures.read_mib, "MiB/s"),
        ];
        for (case, metric, value, unit) in cases {
            report.push(&format!("{}-{case}", target.name), metric, value, unit);
        }
        rows.push((target.name, figures));
    }
    print_rounds(&targets, &per_round);

    let mut heals: Vec<(&str, f64)> = Vec::new();
    if !quick {
        println!(
            "heal on farol: node 3 misses {HEAL_FILES} files, {HEAL_BIG_MIB} MiB and an {HEAL_OVERWRITE_MIB} MiB overwrite ..."
        );
        let seconds = heal_farol(&farol, &mut cleanup).context("heal on farol")?;
        println!("  healed in {seconds:.1} s");
        heals.push(("farol", seconds));
    }
    if let (Some(volume), Some(target)) = (&glusterfs, targets.get(2)) {
        println!("heal on glusterfs: brick 3 misses the same ...");
        match heal_gluster(&target.dir, volume) {
            Ok(seconds) => {
                println!("  healed in {seconds:.1} s");
                heals.push(("glusterfs", seconds));
            }
            Err(error) => println!("  GlusterFS heal not measured: {error:#}"),
        }
    }
    for (name, seconds) in &heals {
        report.push(
            &format!("{name}-heal-2000-files-200m-8m"),
            "seconds",
            *seconds,
            "s",
        );
    }
    drop(cleanup);

    let local = &rows[0].1;
    let columns: Vec<&str> = rows.iter().map(|(name, _)| *name).collect();
    let farol_row = rows
        .iter()
        .find(|(name, _)| *name == "farol")
        .map(|(_, f)| f);
    let gluster_row = rows
        .iter()
        .find(|(name, _)| *name == "glusterfs")
        .map(|(_, f)| f);
    println!(
        "\n| workload ({FILES} files, {SEQ_MIB} MiB; median of {rounds} rounds) | {} | farol / glusterfs |",
        columns.join(" | ")
    );
    println!("| --- |{} --- |", " --- |".repeat(columns.len()));
    let line = |label: &str, get: &dyn Fn(&Figures) -> f64, unit: &str| {
        let base = get(local);
        let cells: Vec<String> = rows
            .iter()
            .map(|(_, f)| format!("{:.0} {unit} ({:.2}x local)", get(f), get(f) / base))
            .collect();
        let ratio = match (farol_row, gluster_row) {
            (Some(farol), Some(gluster)) => format!("{:.2}x", get(farol) / get(gluster)),
            _ => "-".to_owned(),
        };
        println!("| {label} | {} | {ratio} |", cells.join(" | "));
    };
    line("create 4 KB + fsync", &|f| f.create, "files/s");
    line("cold read 4 KB", &|f| f.read, "files/s");
    line("delete + dir fsync", &|f| f.delete, "files/s");
    line(
        "delete alone (GlusterFS's fsyncdir syncs nothing)",
        &|f| f.delete_nosync,
        "files/s",
    );
    line("seq write 1 MiB blocks + fsync", &|f| f.write_mib, "MiB/s");
    line("cold seq read 1 MiB", &|f| f.read_mib, "MiB/s");
    let farol_heal = heals.first().map(|(_, s)| *s);
    let cells: Vec<String> = columns
        .iter()
        .map(|name| match heals.iter().find(|(n, _)| n == name) {
            Some((_, seconds)) => format!("{seconds:.1} s"),
            None => "-".to_owned(),
        })
        .collect();
    let ratio = match (farol_heal, heals.iter().find(|(n, _)| *n == "glusterfs")) {
        (Some(farol), Some((_, gluster))) => format!("{:.2}x faster", gluster / farol),
        _ => "-".to_owned(),
    };
    println!(
        "| heal: {HEAL_FILES} files + {HEAL_BIG_MIB} MiB + {HEAL_OVERWRITE_MIB} MiB overwrite | {} | {ratio} |",
        cells.join(" | ")
    );
    Ok(report)
}
