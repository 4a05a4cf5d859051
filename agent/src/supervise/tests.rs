//! The supervisor with small real children (sh, sleep, python3's web
//! server) and a drainer that records what it was asked.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures_util::future::BoxFuture;

use super::*;

/// Records calls; reports `flows` active flows (counting down per call).
#[derive(Default)]
struct RecordingDrainer {
    calls: Mutex<Vec<String>>,
    flows: Mutex<u64>,
}

impl RecordingDrainer {
    fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }
}

impl Drainer for RecordingDrainer {
    fn drain<'a>(&'a self, service: &'a str) -> BoxFuture<'a, Result<(), DrainError>> {
        self.calls.lock().unwrap().push(format!("drain {service}"));
        Box::pin(async { Ok(()) })
    }
    fn undrain<'a>(&'a self, service: &'a str) -> BoxFuture<'a, Result<(), DrainError>> {
        self.calls
            .lock()
            .unwrap()
            .push(format!("undrain {service}"));
        Box::pin(async { Ok(()) })
    }
    fn active_flows<'a>(&'a self, _service: &'a str) -> BoxFuture<'a, Result<u64, DrainError>> {
        let mut flows = self.flows.lock().unwrap();
        let now = *flows;
        *flows = now.saturating_sub(1);
        self.calls.lock().unwrap().push(format!("flows {now}"));
        Box::pin(async move { Ok(now) })
    }
}

fn spec(name: &str, command: &str, args: &[&str]) -> ChildSpec {
    ChildSpec {
        name: name.into(),
        runtime_dir: None,
        program: Program {
            command: command.into(),
            args: args.iter().map(|a| (*a).to_owned()).collect(),
            env: vec![("FAROL_NODE".into(), "test".into())],
            working_dir: "/".into(),
        },
        service: Some("web".into()),
        ready: None,
        restart: RestartConfig {
            initial: Duration::from_millis(50),
            max: Duration::from_millis(200),
            attempts: 3,
            stable_after: Duration::from_secs(30),
        },
        stop_signal: SignalName(libc::SIGTERM),
        stop_grace: Duration::from_secs(5),
        drain_timeout: Duration::from_secs(5),
        reload_signal: None,
        config_test: None,
        config_test_timeout: Duration::from_secs(5),
    }
}

/// Polls `check` every 20 ms for up to `limit`.
async fn until<T>(what: &str, limit: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn alive(pid: u32) -> bool {
    // A zombie is as good as gone: it runs nothing and holds no socket.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z')),
        Err(_) => false,
    }
}

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!(
            "farol-supervise-{tag}-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn running_pid(supervisor: &Supervisor, name: &str) -> Option<u32> {
    let snapshot = supervisor.snapshot(name)?;
    (snapshot.state == ChildState::Running)
        .then_some(snapshot.pid)
        .flatten()
}

#[tokio::test]
async fn a_killed_child_is_restarted_and_its_exit_recorded() {
    let drainer = Arc::new(RecordingDrainer::default());
    let supervisor = Supervisor::start(
        vec![spec("sleeper", "/bin/sleep", &["1000"])],
        drainer.clone(),
    );
    let first = until("the child to run", Duration::from_secs(5), || {
        running_pid(&supervisor, "sleeper")
    })
    .await;
    // SAFETY: kill(2) on our own child's PID.
    assert_eq!(unsafe { libc::kill(first as i32, libc::SIGKILL) }, 0);
    let second = until("a new child", Duration::from_secs(5), || {
        running_pid(&supervisor, "sleeper").filter(|pid| *pid != first)
    })
    .await;
    assert!(alive(second));
    let snapshot = supervisor.snapshot("sleeper").unwrap();
    assert_eq!(snapshot.restarts, 1);
    assert_eq!(snapshot.crashes, 1);
    assert_eq!(snapshot.exits.get("SIGKILL"), Some(&1));
    assert!(snapshot.last_recovery.unwrap() < Duration::from_secs(5));
    // Out of the service while down, back in once running again.
    assert_eq!(
        drainer.calls(),
        ["drain web", "undrain web", "drain web", "undrain web"]
    );
    supervisor.stop().await;
    assert!(!alive(second), "stop ends the child");
}

#[tokio::test]
async fn a_crash_loop_backs_off_then_gives_up() {
    let drainer = Arc::new(RecordingDrainer::default());
    let started = Instant::now();
    let supervisor = Supervisor::start(
        vec![spec("crasher", "/bin/sh", &["-c", "echo boom; exit 3"])],
        drainer.clone(),
    );
    until("the supervisor to give up", Duration::from_secs(10), || {
        (supervisor.snapshot("crasher")?.state == ChildState::GaveUp).then_some(())
    })
    .await;
    // Backoffs of 50, 100 and 200 ms between the four runs.
    assert!(
        started.elapsed() >= Duration::from_millis(350),
        "{:?}",
        started.elapsed()
    );
    let snapshot = supervisor.snapshot("crasher").unwrap();
    assert_eq!(snapshot.crashes, 4);
    assert_eq!(snapshot.restarts, 3);
    assert_eq!(snapshot.exits.get("exit 3"), Some(&4));
    // Without a readiness check a running child counts as ready; every
    // exit takes the node out of the service again, and it stays out.
    let calls = drainer.calls();
    assert_eq!(calls.iter().filter(|c| *c == "drain web").count(), 5);
    assert_eq!(calls.last().map(String::as_str), Some("drain web"));
    assert_eq!(
        supervisor.reload("crasher").await,
        Err(ReloadError::NotRunning("crasher".into()))
    );
    supervisor.stop().await;
}

#[tokio::test]
async fn stop_drains_waits_for_flows_then_kills_a_stubborn_group_after_grace() {
    let dir = TempDir::new("stop");
    let grandchild_file = dir.path("grandchild");
    let script = format!(
        "trap '' TERM; sleep 1000 & echo $! > {}; wait",
        grandchild_file.display()
    );
    let mut stubborn = spec("stubborn", "/bin/sh", &["-c", &script]);
    stubborn.stop_grace = Duration::from_millis(300);
    let drainer = Arc::new(RecordingDrainer::default());
    *drainer.flows.lock().unwrap() = 2;
    let supervisor = Supervisor::start(vec![stubborn], drainer.clone());
    let leader = until("the child to run", Duration::from_secs(5), || {
        running_pid(&supervisor, "stubborn")
    })
    .await;
    let grandchild: u32 = until("the grandchild's pid", Duration::from_secs(5), || {
        std::fs::read_to_string(&grandchild_file)
            .ok()?
            .trim()
            .parse()
            .ok()
    })
    .await;
    assert!(alive(grandchild));
    let stopping = Instant::now();
    let snapshot_before = supervisor.snapshot("stubborn").unwrap();
    assert_eq!(snapshot_before.state, ChildState::Running);
    supervisor.stop().await;
    // Two polls with flows left (100 ms apart), then the grace period.
    assert!(stopping.elapsed() >= Duration::from_millis(500));
    assert_eq!(
        drainer.calls(),
        [
            "drain web",
            "undrain web",
            "drain web",
            "flows 2",
            "flows 1",
            "flows 0"
        ]
    );
    assert!(!alive(leader), "the leader ignored SIGTERM and got SIGKILL");
    until("the grandchild to go", Duration::from_secs(2), || {
        (!alive(grandchild)).then_some(())
    })
    .await;
}

#[tokio::test]
async fn readiness_gates_the_return_to_the_service() {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let dir = TempDir::new("ready");
    let port_text = port.to_string();
    let root = dir.0.to_string_lossy().into_owned();
    let mut web = spec(
        "web",
        "/usr/bin/python3",
        &[
            "-m",
            "http.server",
            &port_text,
            "--bind",
            "127.0.0.1",
            "--directory",
            &root,
        ],
    );
    web.ready = Some(ReadyCheck {
        host: "127.0.0.1".into(),
        port,
        http_path: Some("/".into()),
        timeout: Duration::from_secs(20),
        interval: Duration::from_millis(50),
    });
    if !Path::new("/usr/bin/python3").exists() {
        eprintln!("skipping: no python3 (cargo xtask setup installs it)");
        return;
    }
    let drainer = Arc::new(RecordingDrainer::default());
    let supervisor = Supervisor::start(vec![web], drainer.clone());
    until(
        "the web server to be ready",
        Duration::from_secs(20),
        || running_pid(&supervisor, "web"),
    )
    .await;
    // Ready means serving: a request now succeeds.
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stream.write_all(b"GET / HTTP/1.0\r\n\r\n").await.unwrap();
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).await.unwrap();
    assert_eq!(&head[..9], b"HTTP/1.0 ");
    assert_eq!(drainer.calls(), ["drain web", "undrain web"]);
    supervisor.stop().await;
}

#[tokio::test]
async fn a_child_never_ready_is_stopped_and_retried() {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let mut deaf = spec("deaf", "/bin/sleep", &["1000"]);
    deaf.ready = Some(ReadyCheck {
        host: "127.0.0.1".into(),
        port,
        http_path: None,
        timeout: Duration::from_millis(200),
        interval: Duration::from_millis(50),
    });
    deaf.restart.attempts = 1;
    let supervisor = Supervisor::start(vec![deaf], Arc::new(RecordingDrainer::default()));
    until("the supervisor to give up", Duration::from_secs(10), || {
        (supervisor.snapshot("deaf")?.state == ChildState::GaveUp).then_some(())
    })
    .await;
    let snapshot = supervisor.snapshot("deaf").unwrap();
    assert_eq!(snapshot.crashes, 2);
    // Stopped with its stop signal each time.
    assert_eq!(snapshot.exits.get("SIGTERM"), Some(&2));
    supervisor.stop().await;
}

#[tokio::test]
async fn reload_runs_the_config_test_first_and_refuses_a_broken_config() {
    let dir = TempDir::new("reload");
    let marker = dir.path("reloaded");
    let good = dir.path("config-ok");
    let script = format!(
        "trap 'echo reloaded >> {}' USR1; while :; do sleep 0.05; done",
        marker.display()
    );
    let mut child = spec("daemon", "/bin/sh", &["-c", &script]);
    child.reload_signal = Some(SignalName(libc::SIGUSR1));
    child.config_test = Some(Program {
        command: "/bin/sh".into(),
        args: vec![
            "-c".into(),
            format!(
                "test -e {} || {{ echo 'Syntax error on line 3 of farol.conf'; exit 1; }}",
                good.display()
            ),
        ],
        env: Vec::new(),
        working_dir: "/".into(),
    });
    let supervisor = Supervisor::start(vec![child], Arc::new(RecordingDrainer::default()));
    let pid = until("the child to run", Duration::from_secs(5), || {
        running_pid(&supervisor, "daemon")
    })
    .await;

    let refused = supervisor.reload("daemon").await.unwrap_err();
    match &refused {
        ReloadError::Refused { output, .. } => {
            assert!(output.contains("Syntax error on line 3"), "{output}")
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert!(refused.to_string().contains("reload refused"));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!marker.exists(), "a refused reload sends no signal");
    assert_eq!(running_pid(&supervisor, "daemon"), Some(pid));

    std::fs::write(&good, "").unwrap();
    // Through a handle, as the runtime API would.
    let handle = supervisor.handle();
    handle.reload("daemon").await.unwrap();
    assert_eq!(handle.snapshots().len(), 1);
    until("the child to reload", Duration::from_secs(5), || {
        std::fs::read_to_string(&marker)
            .ok()
            .filter(|t| t.contains("reloaded"))
    })
    .await;
    let snapshot = supervisor.snapshot("daemon").unwrap();
    assert_eq!(snapshot.pid, Some(pid), "a reload keeps the process");
    assert_eq!(snapshot.reloads.get("refused"), Some(&1));
    assert_eq!(snapshot.reloads.get("ok"), Some(&1));
    assert_eq!(
        supervisor.reload("nope").await,
        Err(ReloadError::UnknownChild("nope".into()))
    );
    supervisor.stop().await;
}

/// A `tracing` writer into a shared buffer.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn child_output_reaches_the_log_line_by_line_with_its_name_and_metrics_count_it() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    // Process-wide: a subscriber scoped to this thread loses events when
    // tests on other threads hit the same callsites first (tracing caches
    // each callsite's interest). Other tests' lines land here too; only
    // this child's are looked at, and nothing else sets a global default.
    tracing::subscriber::set_global_default(subscriber)
        .expect("no other test sets a global subscriber");
    let mut talker = spec(
        "talker",
        "/bin/sh",
        &["-c", "echo out line one; echo err line two >&2; exit 7"],
    );
    talker.restart.attempts = 1;
    let supervisor = Supervisor::start(vec![talker], Arc::new(RecordingDrainer::default()));
    until("the supervisor to give up", Duration::from_secs(10), || {
        (supervisor.snapshot("talker")?.state == ChildState::GaveUp).then_some(())
    })
    .await;
    // Output readers may trail the exit by a moment.
    until("both lines in the log", Duration::from_secs(5), || {
        let text = String::from_utf8_lossy(&captured.0.lock().unwrap()).into_owned();
        (text.contains("out line one") && text.contains("err line two")).then_some(())
    })
    .await;
    let text = String::from_utf8_lossy(&captured.0.lock().unwrap()).into_owned();
    let line = text
        .lines()
        .find(|l| l.contains("err line two"))
        .unwrap()
        .to_owned();
    assert!(
        line.contains("child=talker") && line.contains("stream=\"stderr\""),
        "{line}"
    );
    assert!(
        text.lines()
            .any(|l| l.contains("giving up") && l.contains("child=talker")),
        "{text}"
    );

    let mut registry = prometheus_client::registry::Registry::default();
    registry.register_collector(Box::new(supervisor.collector()));
    let mut metrics = String::new();
    prometheus_client::encoding::text::encode(&mut metrics, &registry).unwrap();
    for expected in [
        "farol_supervise_state{child=\"talker\",state=\"gave_up\"} 1",
        "farol_supervise_state{child=\"talker\",state=\"running\"} 0",
        "farol_supervise_crashes_total{child=\"talker\"} 2",
        "farol_supervise_restarts_total{child=\"talker\"} 1",
        "farol_supervise_exits_total{child=\"talker\",status=\"exit 7\"} 2",
    ] {
        assert!(metrics.contains(expected), "{expected} not in\n{metrics}");
    }
    supervisor.stop().await;
}

#[test]
fn specs_expand_placeholders_and_pick_the_volume_mount() {
    let text = r#"
[cluster]
name = "lab"
secret = "0123456789abcdef"

[[node]]
name = "n1"
address = "192.0.2.11/24"
interface = "eth0"
roles = ["web"]

[[node]]
name = "n2"
address = "192.0.2.12/24"
interface = "eth0"
roles = ["web"]

[[node]]
name = "n3"
address = "192.0.2.13/24"
interface = "eth0"

[[volume]]
name = "www"
mount = "/srv/www"
replicas = [{ node = "n1", brick = "/var/lib/farol/www" }]

[[supervise]]
name = "apache"
roles = ["web"]
command = "/usr/sbin/apache2"
args = ["-f", "/etc/farol/{cluster}-{node}.conf"]
env = { RUN = "/run/farol/{node}", ROOT = "{volume}/htdocs" }
runtime_dir = "/run/farol/{cluster}/{node}"
volume = "www"
volume_fallback = "/var/www/{node}"
ready = { port = 80, host = "{address}", http = "/" }
reload_signal = "USR1"
config_test = ["/usr/sbin/apache2", "-f", "/etc/farol/{cluster}-{node}.conf", "-t"]
"#;
    let config = Config::from_toml(Path::new("t.toml"), text).unwrap();
    let [n1, n2, n3] = [0, 1, 2].map(|i| config.nodes[i].clone());
    assert!(specs(&config, &n3).is_empty());
    let one = &specs(&config, &n1)[0];
    let two = &specs(&config, &n2)[0];
    assert_eq!(one.program.args, ["-f", "/etc/farol/lab-n1.conf"]);
    let env = |spec: &ChildSpec, key: &str| {
        spec.program
            .env
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
    };
    assert_eq!(env(one, "RUN").as_deref(), Some("/run/farol/n1"));
    assert_eq!(env(one, "FAROL_NODE").as_deref(), Some("n1"));
    assert_eq!(
        env(two, "FAROL_NODE_ADDRESS").as_deref(),
        Some("192.0.2.12")
    );
    assert_eq!(env(one, "FAROL_VOLUME_MOUNT").as_deref(), Some("/srv/www"));
    assert_eq!(env(one, "ROOT").as_deref(), Some("/srv/www/htdocs"));
    assert_eq!(env(two, "ROOT").as_deref(), Some("/var/www/n2/htdocs"));
    assert_eq!(
        env(two, "FAROL_RUNTIME_DIR").as_deref(),
        Some("/run/farol/lab/n2")
    );
    assert_eq!(two.runtime_dir, Some(PathBuf::from("/run/farol/lab/n2")));
    assert_eq!(
        env(two, "FAROL_VOLUME_MOUNT").as_deref(),
        Some("/var/www/n2")
    );
    assert_eq!(one.ready.as_ref().unwrap().host, "192.0.2.11");
    let test = one.config_test.as_ref().unwrap();
    assert_eq!(test.args.last().map(String::as_str), Some("-t"));
    assert_eq!(test.args[1], "/etc/farol/lab-n1.conf");
}

#[tokio::test]
async fn a_child_left_by_a_crashed_agent_is_ended_before_the_next_start() {
    let dir = TempDir::new("leftover");
    let mut sleeper = spec("sleeper", "/bin/sleep", &["1000"]);
    sleeper.runtime_dir = Some(dir.0.clone());
    // What a SIGKILLed agent leaves: its child, leading its own group, and
    // the record of its PID.
    use std::os::unix::process::CommandExt;
    let mut leftover = std::process::Command::new("/bin/sleep")
        .arg("1000")
        .process_group(0)
        .spawn()
        .unwrap();
    let leftover_pid = leftover.id();
    // spawn() returns once the child's exec released the parent (vfork),
    // which is before the kernel set the new program's arguments: a check
    // in that window reads an empty cmdline (this test failed that way in
    // CI). A real leftover has long been running; wait until this one is.
    let cmdline = format!("/proc/{leftover_pid}/cmdline");
    until("the leftover's exec", Duration::from_secs(5), || {
        std::fs::read(&cmdline)
            .ok()
            .filter(|c| c.starts_with(b"/bin/sleep\0"))
    })
    .await;
    std::fs::write(dir.path(".farol-supervise.pid"), leftover_pid.to_string()).unwrap();
    // Its new parent (init, after the agent died) reaps it once it ends.
    let reaper = std::thread::spawn(move || leftover.wait().unwrap());
    let supervisor =
        Supervisor::start(vec![sleeper.clone()], Arc::new(RecordingDrainer::default()));
    let pid = until("the new child", Duration::from_secs(5), || {
        running_pid(&supervisor, "sleeper")
    })
    .await;
    assert_ne!(pid, leftover_pid);
    // Bounded: a leftover that was not ended must fail the test, not hang
    // the suite (the join below would block this runtime's only thread).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !reaper.is_finished() && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if !reaper.is_finished() {
        let stat = std::fs::read_to_string(format!("/proc/{leftover_pid}/stat"));
        let cmdline = std::fs::read(format!("/proc/{leftover_pid}/cmdline"));
        // SAFETY: kill(2) on the PID of our own child, still unreaped.
        unsafe { libc::kill(leftover_pid as i32, libc::SIGKILL) };
        panic!("the leftover {leftover_pid} was not ended: stat {stat:?}, cmdline {cmdline:?}");
    }
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(reaper.join().unwrap().signal(), Some(libc::SIGKILL));
    assert_eq!(
        std::fs::read_to_string(dir.path(".farol-supervise.pid"))
            .unwrap()
            .trim(),
        pid.to_string()
    );
    supervisor.stop().await;
    assert!(
        !dir.path(".farol-supervise.pid").exists(),
        "a clean stop forgets it"
    );

    // A recorded PID now running something else is left alone.
    std::fs::write(
        dir.path(".farol-supervise.pid"),
        std::process::id().to_string(),
    )
    .unwrap();
    let supervisor = Supervisor::start(vec![sleeper], Arc::new(RecordingDrainer::default()));
    until("the child", Duration::from_secs(5), || {
        running_pid(&supervisor, "sleeper")
    })
    .await;
    supervisor.stop().await;
}
