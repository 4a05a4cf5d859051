//! The control socket end to end, without a data plane: a real Unix
//! socket, the CLI's client, a config file on disk.

use std::{path::PathBuf, sync::Arc, time::Duration};

use tokio::sync::watch;

use super::*;
use crate::health::{self, Health};

const LAB: &str = include_str!("../../../configs/lab.toml");
const TOKEN: &str = "0123456789abcdef-test";

fn with_check(text: &str, check: &str) -> String {
    text.replace(
        "forwarding = \"dsr\"\n",
        &format!("forwarding = \"dsr\"\n{check}\n"),
    )
}

struct Fixture {
    dir: PathBuf,
    socket: PathBuf,
    control: Arc<Control>,
    stop: watch::Sender<bool>,
    config_rx: watch::Receiver<Arc<Config>>,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn fixture(tag: &str) -> Fixture {
    let dir = std::env::temp_dir().join(format!("farol-control-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("cluster.toml");
    std::fs::write(&path, LAB).unwrap();
    let config = Arc::new(Config::load(&path).unwrap());
    let (config_tx, config_rx) = watch::channel(config);
    let health = Health::new("nuster1");
    let control = Control::new(
        "lab",
        "nuster1",
        Some(path),
        config_tx,
        health.clone(),
        None,
        Some(TOKEN.into()),
    );
    let (stop, stop_rx) = watch::channel(false);
    tokio::spawn(health::run(
        health,
        control.config.subscribe(),
        stop_rx.clone(),
    ));
    let socket = dir.join("nuster1.sock");
    let listener = bind(&socket).await.unwrap();
    tokio::spawn(serve(listener, socket.clone(), control.clone(), stop_rx));
    Fixture {
        dir,
        socket,
        control,
        stop,
        config_rx,
    }
}

#[tokio::test]
async fn drain_enable_disable_and_weight_go_through_the_socket() {
    let f = fixture("actions").await;
    let message = client::backend(&f.socket, "drain", "nuster3", None, None)
        .await
        .unwrap();
    assert!(message.contains("drains on this balancer"), "{message}");
    let key = |name: &str| health::BackendKey {
        service: "web".into(),
        name: name.into(),
        addr: "192.0.2.13".parse().unwrap(),
        port: 80,
    };
    let verdict = f.control.health.verdict(&key("nuster3"), 100, true);
    assert_eq!((verdict.alive, verdict.weight), (true, 0));
    client::backend(&f.socket, "weight", "nuster3", Some("web"), Some(250))
        .await
        .unwrap();
    client::backend(&f.socket, "enable", "nuster3", None, None)
        .await
        .unwrap();
    assert_eq!(
        f.control.health.verdict(&key("nuster3"), 100, true).weight,
        250
    );
    client::backend(&f.socket, "disable", "nuster3", Some("web"), None)
        .await
        .unwrap();
    assert!(!f.control.health.verdict(&key("nuster3"), 100, true).alive);

    // Its own name: the node's admin state, which its agent check serves.
    let message = client::backend(&f.socket, "drain", "nuster1", None, None)
        .await
        .unwrap();
    assert!(message.contains("every balancer"), "{message}");
    assert_eq!(f.control.health.own_state(), AdminState::Drain);

    let error = client::backend(&f.socket, "drain", "nuster9", None, None)
        .await
        .unwrap_err();
    assert!(
        error.to_string().contains("no backend named \"nuster9\""),
        "{error}"
    );
    let error = client::backend(&f.socket, "weight", "nuster3", None, Some(5000))
        .await
        .unwrap_err();
    assert!(error.to_string().contains("0..=1000"), "{error}");
    let error = client::backend(&f.socket, "drain", "nuster3", Some("db"), None)
        .await
        .unwrap_err();
    assert!(
        error.to_string().contains("no service named \"db\""),
        "{error}"
    );
}

#[tokio::test]
async fn reload_applies_a_changed_weight_and_refuses_a_broken_file() {
    let mut f = fixture("reload").await;
    let path = f.control.config_path.clone().unwrap();
    std::fs::write(
        &path,
        LAB.replace(
            "{ node = \"nuster2\" }",
            "{ node = \"nuster2\", weight = 300 }",
        ),
    )
    .unwrap();
    let message = client::reload(&f.socket).await.unwrap();
    assert_eq!(message, "service web changed");
    f.config_rx.changed().await.unwrap();
    let config = f.config_rx.borrow_and_update().clone();
    assert_eq!(config.services[0].backends[1].weight, 300);

    std::fs::write(&path, LAB.replace("port = 80", "port = 0")).unwrap();
    let error = client::reload(&f.socket).await.unwrap_err().to_string();
    assert!(error.contains("service[0].port"), "{error}");
    assert_eq!(
        f.config_rx.borrow().services[0].backends[1].weight,
        300,
        "the running config stays"
    );
    std::fs::write(&path, "[cluster\nname=").unwrap();
    let error = client::reload(&f.socket).await.unwrap_err().to_string();
    assert!(error.contains("cluster.toml"), "names the file: {error}");
    assert_eq!(f.control.reloads_refused.load(Ordering::Relaxed), 2);
    assert_eq!(f.control.reloads_applied.load(Ordering::Relaxed), 1);
}

#[tokio::test]
async fn reload_keeps_the_health_state_of_unchanged_backends() {
    let f = fixture("keep").await;
    let path = f.control.config_path.clone().unwrap();
    // A check on a port nothing listens on: every backend goes down.
    std::fs::write(
        &path,
        with_check(
            LAB,
            "check = { type = \"tcp\", port = 9, interval = \"50ms\", timeout = \"20ms\" }",
        ),
    )
    .unwrap();
    f.control.reload("test").unwrap();
    let down = |health: &Health| {
        health
            .status()
            .iter()
            .filter(|row| row.check_state == "down")
            .count()
    };
    tokio::time::timeout(Duration::from_secs(10), async {
        while down(&f.control.health) < 4 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("all four down");
    let before: Vec<u64> = f
        .control
        .health
        .status()
        .iter()
        .map(|r| r.checks_failed)
        .collect();
    // Change only nuster2's weight: the check config is the same, so every
    // backend keeps its state and counts.
    std::fs::write(
        &path,
        with_check(
            LAB,
            "check = { type = \"tcp\", port = 9, interval = \"50ms\", timeout = \"20ms\" }",
        )
        .replace(
            "{ node = \"nuster2\" }",
            "{ node = \"nuster2\", weight = 10 }",
        ),
    )
    .unwrap();
    f.control.reload("test").unwrap();
    tokio::time::sleep(Duration::from_millis(10)).await;
    let rows = f.control.health.status();
    assert_eq!(down(&f.control.health), 4, "still down, not reset to fresh");
    for (row, before) in rows.iter().zip(before) {
        assert!(
            row.checks_failed >= before,
            "{} kept its count",
            row.backend
        );
        assert_eq!(row.state_changes, 1);
    }
}

#[tokio::test]
async fn status_and_agent_routes_answer_on_the_http_port() {
    let f = fixture("routes").await;
    f.control.health.set_own_state(AdminState::Drain, "test");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let registry = crate::metrics::registry("lab", "nuster1", None, None);
    tokio::spawn(crate::metrics::serve_with(
        listener,
        registry,
        public_routes(f.control.clone()),
        std::future::pending(),
    ));
    assert_eq!(
        health::agent::query(
            addr,
            Duration::from_secs(2),
            health::agent::Applied::Pending
        )
        .await
        .unwrap(),
        AdminState::Drain
    );
    let get = |path: &'static str| async move {
        let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        health::http::exchange(stream, "GET", path, "localhost", None)
            .await
            .unwrap()
    };
    let page = get("/status").await;
    assert_eq!(page.status, 200);
    let html = String::from_utf8_lossy(&page.body);
    assert!(html.contains("data-backend=\"nuster4\""), "{html}");
    let json = get("/status.json").await;
    let status: status::Status = serde_json::from_slice(&json.body).unwrap();
    assert_eq!(status.services[0].backends.len(), 4);
    assert_eq!(status.admin, AdminState::Drain);
    let table = status::render_table(&status);
    assert!(table.contains("nuster3"), "{table}");
    // No data plane in this fixture: no XDP line, until one attached.
    assert_eq!(status.xdp, None);
    assert!(!table.contains("XDP on"), "{table}");
    f.control
        .set_xdp_attachment("eth0", crate::dataplane::AttachMode::Generic);
    let json = get("/status.json").await;
    let status: status::Status = serde_json::from_slice(&json.body).unwrap();
    assert_eq!(
        status.xdp,
        Some(status::XdpStatus {
            interface: "eth0".into(),
            mode: "generic".into()
        })
    );
    let table = status::render_table(&status);
    assert!(table.contains("XDP on eth0: generic mode"), "{table}");
}

/// Everything the health and control collectors export, plus the agent's
/// base registry, passes `promtool check metrics` (the data plane's
/// families are checked on a live agent by the lab test).
#[tokio::test]
async fn metrics_pass_promtool() {
    let promtool = std::path::Path::new("/usr/bin/promtool");
    if !promtool.exists() {
        if std::env::var_os("FAROL_TEST_REQUIRE_PRIVILEGES").is_some() {
            panic!("promtool is missing (Debian package prometheus; cargo xtask setup)");
        }
        eprintln!("skipping: promtool is missing (Debian package prometheus)");
        return;
    }
    let f = fixture("promtool").await;
    let path = f.control.config_path.clone().unwrap();
    std::fs::write(
        &path,
        with_check(
            LAB,
            "check = { type = \"tcp\", port = 9, interval = \"50ms\", timeout = \"20ms\" }",
        ),
    )
    .unwrap();
    f.control.reload("test").unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut registry = crate::metrics::registry("lab", "nuster1", None, None);
    registry.register_collector(Box::new(crate::health::HealthCollector::new(
        f.control.health.clone(),
    )));
    registry.register_collector(Box::new(ControlCollector(f.control.clone())));
    let text = crate::metrics::encode_prometheus_text(&registry).unwrap();
    assert!(text.contains("farol_health_checks_total{"), "{text}");
    let output = promtool_check(&text);
    assert!(output.status.success(), "promtool: {output:?}\n{text}");
}

/// `promtool check metrics` on `text`: status and what it said.
pub(crate) fn promtool_check(text: &str) -> std::process::Output {
    use std::io::Write;
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool runs");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

#[tokio::test]
async fn the_control_api_over_tcp_needs_the_token() {
    let f = fixture("token").await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let registry = crate::metrics::registry("lab", "nuster1", None, None);
    tokio::spawn(crate::metrics::serve_with(
        listener,
        registry,
        public_routes(f.control.clone()),
        std::future::pending(),
    ));
    let post = |token: Option<&'static str>| async move {
        let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        health::http::exchange_with_token(
            stream,
            "POST",
            "/control/backend/nuster2/drain",
            "localhost",
            Some(bytes::Bytes::new()),
            token,
        )
        .await
        .unwrap()
    };
    assert_eq!(post(None).await.status, 401);
    assert_eq!(post(Some("wrong-token-0000000")).await.status, 401);
    assert_eq!(f.control.health.override_of(None, "nuster2").admin, None);
    let url = format!("http://{addr}");
    let message = client::backend_over(
        &client::Target::Tcp {
            url: url.clone(),
            token: TOKEN.into(),
        },
        "drain",
        "nuster2",
        None,
        None,
    )
    .await
    .unwrap();
    assert!(message.contains("nuster2 drains"), "{message}");
    assert_eq!(
        f.control.health.override_of(None, "nuster2").admin,
        Some(AdminState::Drain)
    );
}

#[test]
fn default_sockets_are_unique_per_pin_directory() {
    assert_eq!(
        default_socket("nuster1", Path::new("/sys/fs/bpf/farol")),
        PathBuf::from("/run/farol/nuster1.sock")
    );
    assert_eq!(
        default_socket("nuster1", Path::new("/sys/fs/bpf/farol-lab/nuster1")),
        PathBuf::from("/run/farol/farol-lab-nuster1.sock")
    );
    assert_ne!(
        default_socket("nuster1", Path::new("/sys/fs/bpf/farol-lbrr7/nuster1")),
        default_socket("nuster1", Path::new("/sys/fs/bpf/farol-lbsrc7/nuster1"))
    );
}
