//! A volume cluster for integration tests: real `agent volume serve`
//! processes on loopback ports, each with its own brick and FUSE mount
//! under one temporary directory. Dropping the cluster stops every
//! process by PID, unmounts, and removes the directory, also on failure.

#![allow(dead_code, reason = "each test binary uses a different subset")]

use std::{
    collections::BTreeMap,
    fs,
    io::Write,
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

pub(crate) const AGENT: &str = env!("CARGO_BIN_EXE_agent");

pub(crate) struct Cluster {
    pub(crate) dir: PathBuf,
    pub(crate) config: PathBuf,
    names: Vec<String>,
    ports: Vec<u16>,
    metrics_ports: Vec<u16>,
    children: Vec<Option<Child>>,
}

/// A loopback port no other cluster of this test process uses: ports are
/// handed out from a per-process counter (tests of one binary run in
/// parallel) and checked to be free.
fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let start = (std::process::id() % 2_000) * 16;
    for _ in 0..10_000 {
        let offset = (start + NEXT.fetch_add(1, Ordering::Relaxed)) % 40_000;
        let port = u16::try_from(20_000 + offset).expect("20000..60000 fits a port");
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port")
}

fn is_mounted(path: &Path) -> bool {
    let mounts = fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let needle = format!(" {} fuse", path.display());
    mounts.lines().any(|line| line.contains(&needle))
}

fn lazy_unmount(path: &Path) {
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return;
    };
    // SAFETY: a NUL-terminated path alive for the call.
    unsafe {
        libc::umount2(c.as_ptr(), libc::MNT_DETACH);
    }
}

/// Waits for `what` to hold, panicking with `description` after `limit`.
pub(crate) fn wait_until(description: &str, limit: Duration, mut what: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !what() {
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting until {description}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl Cluster {
    /// A cluster of `replicas` nodes; `volume_extra` is TOML added to the
    /// `[[volume]]` section (e.g. `quorum = 1`). Nothing runs yet.
    pub(crate) fn new(test: &str, replicas: usize, volume_extra: &str) -> Cluster {
        let dir = std::env::temp_dir().join(format!("farol-{test}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("secret"), "test cluster secret 0123456789\n").unwrap();
        let names: Vec<String> = (1..=replicas).map(|i| format!("n{i}")).collect();
        let ports: Vec<u16> = names.iter().map(|_| free_port()).collect();
        let metrics_ports: Vec<u16> = names.iter().map(|_| free_port()).collect();
        let mut text = format!(
            "[cluster]\nname = \"test\"\nsecret_file = \"{}\"\n\n",
            dir.join("secret").display()
        );
        for (i, name) in names.iter().enumerate() {
            text.push_str(&format!(
                "[[node]]\nname = \"{name}\"\naddress = \"192.0.2.{}/24\"\ninterface = \"eth0\"\n\n",
                11 + i
            ));
        }
        text.push_str("[[volume]]\nname = \"www\"\npeer_timeout = \"1s\"\n");
        text.push_str(volume_extra);
        text.push_str("\nreplicas = [\n");
        for (i, name) in names.iter().enumerate() {
            text.push_str(&format!(
                "  {{ node = \"{name}\", brick = \"{}\", listen = \"127.0.0.1:{}\", mount = \"{}\" }},\n",
                dir.join(format!("brick-{name}")).display(),
                ports[i],
                dir.join(format!("mnt-{name}")).display(),
            ));
        }
        text.push_str("]\n");
        let config = dir.join("cluster.toml");
        fs::write(&config, text).unwrap();
        Cluster {
            dir,
            config,
            children: names.iter().map(|_| None).collect(),
            names,
            ports,
            metrics_ports,
        }
    }

    pub(crate) fn name(&self, node: usize) -> &str {
        &self.names[node]
    }

    pub(crate) fn port(&self, node: usize) -> u16 {
        self.ports[node]
    }

    pub(crate) fn mount(&self, node: usize) -> PathBuf {
        self.dir.join(format!("mnt-{}", self.names[node]))
    }

    pub(crate) fn brick(&self, node: usize) -> PathBuf {
        self.dir.join(format!("brick-{}", self.names[node]))
    }

    /// Starts node `node` and waits for its mount.
    pub(crate) fn start(&mut self, node: usize) {
        assert!(self.children[node].is_none(), "node {node} already runs");
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("{}.log", self.names[node])))
            .unwrap();
        let child = Command::new(AGENT)
            .args(["volume", "serve", "--config"])
            .arg(&self.config)
            .args(["--node", &self.names[node]])
            .arg("--metrics-listen")
            .arg(format!("127.0.0.1:{}", self.metrics_ports[node]))
            .env("FAROL_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("agent starts");
        self.children[node] = Some(child);
        let mount = self.mount(node);
        wait_until(
            &format!("{} is mounted", mount.display()),
            Duration::from_secs(20),
            || is_mounted(&mount),
        );
    }

    pub(crate) fn start_all(&mut self) {
        for node in 0..self.names.len() {
            self.start(node);
        }
        self.wait_connected(&(0..self.names.len()).collect::<Vec<_>>());
    }

    /// SIGTERM, then SIGKILL after 10 s; the mount is gone afterwards.
    pub(crate) fn stop(&mut self, node: usize) {
        if let Some(mut child) = self.children[node].take() {
            // SAFETY: kill(2) on the PID of a child we spawned and have not
            // reaped yet.
            unsafe {
                libc::kill(child.id() as i32, libc::SIGTERM);
            }
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let mount = self.mount(node);
        if is_mounted(&mount) {
            lazy_unmount(&mount);
        }
    }

    /// SIGSTOP: the agent freezes (its mount stays, and what the kernel
    /// cached of it is still served); peers see it go silent.
    pub(crate) fn pause(&self, node: usize) {
        self.signal(node, libc::SIGSTOP);
    }

    /// SIGCONT after [`Cluster::pause`].
    pub(crate) fn resume(&self, node: usize) {
        self.signal(node, libc::SIGCONT);
    }

    fn signal(&self, node: usize, signal: i32) {
        let child = self.children[node].as_ref().expect("the node runs");
        // SAFETY: kill(2) on the PID of a child we spawned and have not
        // reaped yet.
        unsafe {
            libc::kill(child.id() as i32, signal);
        }
    }

    /// SIGKILL (a crash); the stale mount is detached.
    pub(crate) fn kill(&mut self, node: usize) {
        if let Some(mut child) = self.children[node].take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        lazy_unmount(&self.mount(node));
    }

    /// `agent volume <args> --json` against `node`, parsed.
    pub(crate) fn tool(&self, node: usize, args: &[&str]) -> serde_json::Value {
        let out = Command::new(AGENT)
            .arg("volume")
            .args(args)
            .arg("--config")
            .arg(&self.config)
            .args(["--node", &self.names[node], "--json"])
            .output()
            .expect("agent runs");
        assert!(
            out.status.success(),
            "agent volume {args:?} on {} failed: {}",
            self.names[node],
            String::from_utf8_lossy(&out.stderr)
        );
        let reports: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        reports[0].clone()
    }

    /// The node's `/metrics` text.
    pub(crate) fn metrics(&self, node: usize) -> String {
        use std::io::Read;
        let mut stream =
            std::net::TcpStream::connect(("127.0.0.1", self.metrics_ports[node])).unwrap();
        stream
            .write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
            .unwrap();
        let mut text = String::new();
        stream.read_to_string(&mut text).unwrap();
        text
    }

    pub(crate) fn heal_info(&self, node: usize) -> serde_json::Value {
        self.tool(node, &["heal-info"])
    }

    /// Pending changes `node` holds for `peer`.
    pub(crate) fn pending(&self, node: usize, peer: usize) -> u64 {
        let info = self.heal_info(node);
        info["peers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["node"] == self.names[peer])
            .map(|p| p["pending"].as_u64().unwrap())
            .unwrap()
    }

    pub(crate) fn counter(&self, node: usize, name: &str) -> u64 {
        let info = self.heal_info(node);
        info["counters"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c[0] == name)
            .map(|c| c[1].as_u64().unwrap())
            .unwrap()
    }

    /// Waits until every node in `nodes` sees the others up and is current.
    pub(crate) fn wait_connected(&self, nodes: &[usize]) {
        wait_until(
            "the nodes see each other and are current",
            Duration::from_secs(20),
            || {
                nodes.iter().all(|&node| {
                    let info = self.heal_info(node);
                    info["current"] == true
                        && nodes.iter().filter(|&&o| o != node).all(|&other| {
                            info["peers"]
                                .as_array()
                                .unwrap()
                                .iter()
                                .any(|p| p["node"] == self.names[other] && p["up"] == true)
                        })
                })
            },
        );
    }

    /// Waits until no running node holds changes for another running node.
    pub(crate) fn wait_healed(&self, nodes: &[usize]) {
        wait_until(
            "heal finished (nothing pending)",
            Duration::from_secs(60),
            || {
                nodes.iter().all(|&node| {
                    let info = self.heal_info(node);
                    info["current"] == true
                        && info["peers"]
                            .as_array()
                            .unwrap()
                            .iter()
                            .all(|p| p["pending"] == 0)
                })
            },
        );
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for node in 0..self.names.len() {
            if let Some(mut child) = self.children[node].take() {
                // A paused agent dies of SIGKILL as well; SIGCONT first so
                // it is not left stopped if the kill fails.
                // SAFETY: kill(2) on the PID of a child we spawned.
                unsafe {
                    libc::kill(child.id() as i32, libc::SIGCONT);
                }
                let _ = child.kill();
                let _ = child.wait();
            }
            let mount = self.mount(node);
            if is_mounted(&mount) {
                lazy_unmount(&mount);
            }
        }
        if std::thread::panicking() {
            // Keep the logs of a failed test visible in its output.
            for name in &self.names {
                if let Ok(log) = fs::read_to_string(self.dir.join(format!("{name}.log"))) {
                    let tail: Vec<&str> = log.lines().rev().take(40).collect();
                    eprintln!("--- {name}.log (last lines) ---");
                    for line in tail.iter().rev() {
                        eprintln!("{line}");
                    }
                }
            }
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// A brick's visible tree: path -> (kind, mode, content or target).
pub(crate) fn brick_tree(root: &Path) -> BTreeMap<String, (char, u32, Vec<u8>)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        for entry in fs::read_dir(root.join(&rel)).unwrap() {
            let entry = entry.unwrap();
            let name = entry.file_name();
            if rel.as_os_str().is_empty() && name == ".farol" {
                continue;
            }
            let rel = rel.join(&name);
            let meta = fs::symlink_metadata(root.join(&rel)).unwrap();
            let mode = meta.mode() & 0o7777;
            let key = rel.to_string_lossy().into_owned();
            if meta.is_dir() {
                out.insert(key, ('d', mode, Vec::new()));
                stack.push(rel);
            } else if meta.file_type().is_symlink() {
                let target = fs::read_link(root.join(&rel)).unwrap();
                out.insert(
                    key,
                    ('l', 0, target.as_os_str().as_encoded_bytes().to_vec()),
                );
            } else {
                out.insert(key, ('f', mode, fs::read(root.join(&rel)).unwrap()));
            }
        }
    }
    out
}

/// Panics with the first difference when two bricks differ.
pub(crate) fn assert_bricks_identical(a: &Path, b: &Path) {
    let (ta, tb) = (brick_tree(a), brick_tree(b));
    for (path, va) in &ta {
        match tb.get(path) {
            None => panic!("{path} is in {} but not in {}", a.display(), b.display()),
            Some(vb) => {
                assert!(
                va == vb,
                "{path} differs between {} ({:?}, {:o}, {} bytes) and {} ({:?}, {:o}, {} bytes)",
                a.display(), va.0, va.1, va.2.len(), b.display(), vb.0, vb.1, vb.2.len()
            )
            }
        }
    }
    for path in tb.keys() {
        assert!(
            ta.contains_key(path),
            "{path} is in {} but not in {}",
            b.display(),
            a.display()
        );
    }
}

/// Writes a file and fsyncs it.
pub(crate) fn write_synced(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let mut file = fs::File::create(path)?;
    file.write_all(data)?;
    file.sync_all()
}

pub(crate) fn mode(path: &Path) -> u32 {
    fs::symlink_metadata(path).unwrap().permissions().mode() & 0o7777
}
