//! `cargo xtask bench storage`: the replicated volume against local ext4
//! (the directory the bricks live on) and, when it installs and runs,
//! GlusterFS 3-replica on the same machine, in the same run. Workloads
//! from shared/PEERS.md: create 4 KB files with fsync, cold read of them,
//! delete with sync, sequential 1 MiB writes with fsync, cold sequential
//! read. Every loop is bounded in count and time.

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

struct Target {
    name: &'static str,
    dir: PathBuf,
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

/// Starts three agents on loopback and returns node 1's mount.
fn start_farol(base: &Path, cleanup: &mut Cleanup) -> Result<PathBuf> {
    let agent = workspace_root().join("target/release/agent");
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
    for i in 1..=3 {
        let log = fs::File::create(dir.join(format!("n{i}.log")))?;
        let child = Command::new(&agent)
            .args(["volume", "serve", "--config"])
            .arg(&config)
            .args(["--node", &format!("n{i}")])
            .env("FAROL_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", agent.display()))?;
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
    Ok(mount)
}

/// Creates a GlusterFS replica 3 volume on this host and mounts it.
fn start_gluster(base: &Path, cleanup: &mut Cleanup) -> Result<PathBuf> {
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
    Ok(mount)
}

struct Figures {
    create: f64,
    read: f64,
    delete: f64,
    write_mib: f64,
    read_mib: f64,
}

fn per_second(count: usize, elapsed: Duration) -> f64 {
    count as f64 / elapsed.as_secs_f64().max(1e-9)
}

fn run_workloads(dir: &Path) -> Result<Figures> {
    let work = dir.join("bench-work");
    let _ = fs::remove_dir_all(&work);
    fs::create_dir(&work)?;
    let block = vec![0x5au8; 4096];

    let started = Instant::now();
    let mut created = 0;
    while created < FILES && started.elapsed() < LIMIT {
        let mut file = fs::File::create(work.join(format!("f{created:05}")))?;
        file.write_all(&block)?;
        file.sync_all()?;
        created += 1;
    }
    let create = per_second(created, started.elapsed());

    drop_caches()?;
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

    let started = Instant::now();
    let dir_handle = fs::File::open(&work)?;
    let mut deleted = 0;
    while deleted < created && started.elapsed() < LIMIT {
        fs::remove_file(work.join(format!("f{deleted:05}")))?;
        dir_handle.sync_all()?;
        deleted += 1;
    }
    let delete = per_second(deleted, started.elapsed());
    for rest in deleted..created {
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
        write_mib,
        read_mib,
    })
}

pub(crate) fn run() -> Result<BenchReport> {
    if !xtask::is_root() {
        bail!("bench storage mounts FUSE file systems and drops the page cache: run it as root");
    }
    exec(Command::new("cargo").current_dir(workspace_root()).args([
        "build",
        "--release",
        "-p",
        "farol-agent",
    ]))?;
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
    }];
    targets.push(Target {
        name: "farol",
        dir: start_farol(&base, &mut cleanup)?,
    });
    match start_gluster(&base, &mut cleanup) {
        Ok(dir) => targets.push(Target {
            name: "glusterfs",
            dir,
        }),
        Err(error) => println!("GlusterFS not compared: {error:#}"),
    }

    let mut report = BenchReport::new("storage");
    let mut rows: Vec<(&str, Figures)> = Vec::new();
    for target in &targets {
        println!(
            "running the workloads on {} ({}) ...",
            target.name,
            target.dir.display()
        );
        let figures =
            run_workloads(&target.dir).with_context(|| format!("workloads on {}", target.name))?;
        let cases = [
            ("create-4k-sync", "files_per_s", figures.create, "files/s"),
            ("cold-read-4k", "files_per_s", figures.read, "files/s"),
            ("delete-sync", "files_per_s", figures.delete, "files/s"),
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
    drop(cleanup);

    let local = &rows[0].1;
    let columns: Vec<&str> = rows.iter().map(|(name, _)| *name).collect();
    println!(
        "\n| workload ({FILES} files, {SEQ_MIB} MiB) | {} |",
        columns.join(" | ")
    );
    println!("| --- |{}", " --- |".repeat(columns.len()));
    let line = |label: &str, get: &dyn Fn(&Figures) -> f64, unit: &str| {
        let base = get(local);
        let cells: Vec<String> = rows
            .iter()
            .map(|(_, f)| format!("{:.0} {unit} ({:.2}x)", get(f), get(f) / base))
            .collect();
        println!("| {label} | {} |", cells.join(" | "));
    };
    line("create 4 KB + fsync", &|f| f.create, "files/s");
    line("cold read 4 KB", &|f| f.read, "files/s");
    line("delete + dir fsync", &|f| f.delete, "files/s");
    line("seq write 1 MiB blocks + fsync", &|f| f.write_mib, "MiB/s");
    line("cold seq read 1 MiB", &|f| f.read_mib, "MiB/s");
    Ok(report)
}
