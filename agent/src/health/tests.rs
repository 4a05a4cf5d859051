use std::net::Ipv4Addr;

use super::*;

fn key(name: &str) -> BackendKey {
    BackendKey {
        service: "web".into(),
        name: name.into(),
        addr: IpAddr::V4(Ipv4Addr::new(192, 0, 2, 12)),
        port: 80,
    }
}

fn health_with(config: Option<HealthCheckConfig>) -> Arc<Health> {
    let health = Health::new("nuster1");
    health
        .lock()
        .backends
        .insert(key("nuster2"), BackendHealth::new(config));
    health
}

fn failing() -> Result<Passed, CheckFailure> {
    Err(CheckFailure::new("connection refused"))
}

fn passing() -> Result<Passed, CheckFailure> {
    Ok(Passed::new("HTTP 200"))
}

#[test]
fn an_unchecked_backend_follows_reachability_only() {
    let health = health_with(None);
    let up = health.verdict(&key("nuster2"), 100, true);
    assert_eq!((up.alive, up.weight), (true, 100));
    assert!(!health.verdict(&key("nuster2"), 100, false).alive);
}

#[test]
fn failed_checks_take_a_backend_out_and_passing_ones_bring_it_back() {
    let health = health_with(Some(HealthCheckConfig::new(CheckKind::Http)));
    let k = key("nuster2");
    health.record_check(&k, passing(), Duration::from_millis(1));
    for _ in 0..2 {
        health.record_check(&k, failing(), Duration::from_millis(1));
        assert!(health.verdict(&k, 100, true).alive, "fall is 3");
    }
    health.record_check(&k, failing(), Duration::from_millis(1));
    assert!(!health.verdict(&k, 100, true).alive);
    let row = &health.status()[0];
    assert_eq!(row.check_state, "down");
    assert_eq!(
        row.last_check.as_ref().unwrap().detail,
        "connection refused"
    );
    assert_eq!(
        (row.checks_passed, row.checks_failed, row.state_changes),
        (1, 3, 1)
    );
    health.record_check(&k, passing(), Duration::from_millis(1));
    assert!(!health.verdict(&k, 100, true).alive, "rise is 2");
    health.record_check(&k, passing(), Duration::from_millis(1));
    assert!(health.verdict(&k, 100, true).alive);
}

#[test]
fn drain_zeroes_the_weight_but_keeps_the_backend_alive_and_maint_takes_it_out() {
    let health = health_with(None);
    let k = key("nuster2");
    health.set_override(
        None,
        "nuster2",
        Override {
            admin: Some(AdminState::Drain),
            weight: None,
        },
    );
    let drained = health.verdict(&k, 100, true);
    assert_eq!(
        (drained.alive, drained.weight, drained.admin),
        (true, 0, AdminState::Drain)
    );
    health.set_override(
        Some("web".into()),
        "nuster2",
        Override {
            admin: Some(AdminState::Maint),
            weight: None,
        },
    );
    assert!(!health.verdict(&k, 100, true).alive);
    health.set_override(Some("web".into()), "nuster2", Override::default());
    health.set_override(None, "nuster2", Override::default());
    assert_eq!(health.verdict(&k, 100, true).weight, 100);
}

#[test]
fn the_most_restrictive_admin_state_wins_and_an_agent_drain_reaches_the_verdict() {
    let health = health_with(None);
    let k = key("nuster2");
    health.record_agent(&k, Ok(AdminState::Drain));
    health.set_override(
        None,
        "nuster2",
        Override {
            admin: Some(AdminState::Ready),
            weight: Some(50),
        },
    );
    let verdict = health.verdict(&k, 100, true);
    assert_eq!((verdict.weight, verdict.admin), (0, AdminState::Drain));
    health.record_agent(&k, Err("connection refused".into()));
    assert_eq!(
        health.verdict(&k, 100, true).admin,
        AdminState::Drain,
        "an unreachable agent keeps its last state"
    );
    health.record_agent(&k, Ok(AdminState::Ready));
    assert_eq!(health.verdict(&k, 100, true).weight, 50, "weight override");
}

#[test]
fn an_agent_state_is_reported_applied_only_once_a_plan_holding_it_is_in_the_maps() {
    let health = health_with(None);
    let k = key("nuster2");
    assert_eq!(
        health.applied_agent_state("nuster2"),
        agent::Applied::Pending,
        "nothing read yet"
    );
    let first = health.record_agent(&k, Ok(AdminState::Ready)).unwrap();
    health.mark_applied(health.generation());
    assert_eq!(
        health.applied_agent_state("nuster2"),
        agent::Applied::State(AdminState::Ready)
    );
    assert_eq!(
        health.record_agent(&k, Ok(AdminState::Ready)),
        None,
        "no change"
    );

    // A plan computed before the drain was read does not hold it.
    let before_drain = health.generation();
    let drained = health.record_agent(&k, Ok(AdminState::Drain)).unwrap();
    assert!(drained > first);
    health.mark_applied(before_drain);
    assert_eq!(
        health.applied_agent_state("nuster2"),
        agent::Applied::Pending
    );
    health.mark_applied(health.generation());
    assert_eq!(
        health.applied_agent_state("nuster2"),
        agent::Applied::State(AdminState::Drain)
    );
    // Marks never go backwards.
    health.mark_applied(before_drain);
    assert_eq!(
        health.applied_agent_state("nuster2"),
        agent::Applied::State(AdminState::Drain)
    );

    // The node backs two services: both must hold the same state.
    let other = BackendKey {
        service: "api".into(),
        ..key("nuster2")
    };
    health
        .lock()
        .backends
        .insert(other.clone(), BackendHealth::new(None));
    assert_eq!(
        health.applied_agent_state("nuster2"),
        agent::Applied::Pending
    );
    health.record_agent(&other, Ok(AdminState::Drain)).unwrap();
    health.mark_applied(health.generation());
    assert_eq!(
        health.applied_agent_state("nuster2"),
        agent::Applied::State(AdminState::Drain)
    );
}

#[tokio::test]
async fn a_probe_tells_the_agent_what_its_maps_hold_as_soon_as_they_do() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let agent_addr = listener.local_addr().unwrap();
    let (requests_tx, mut requests) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut buffer = vec![0; 4096];
            let read = stream.read(&mut buffer).await.unwrap();
            let request = String::from_utf8_lossy(&buffer[..read]).into_owned();
            let first_line = request.lines().next().unwrap_or_default().to_owned();
            let _ = requests_tx.send(first_line);
            let _ = stream
                .write_all(
                    b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\nConnection: close\r\n\r\ndrain\n",
                )
                .await;
        }
    });
    let health = health_with(None);
    let k = key("nuster2");
    let probe = Probe {
        check: None,
        target: agent_addr,
        agent: Some(agent_addr),
    };
    // No check configured: the probe runs at the default interval (2 s).
    let task = tokio::spawn(probe_loop(health.clone(), k.clone(), probe, Duration::ZERO));
    let first = tokio::time::timeout(Duration::from_secs(5), requests.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(first.contains("/agent?applied=pending"), "{first}");
    // The balancer applies the drain it read: the probe says so at once.
    tokio::time::timeout(Duration::from_secs(5), async {
        while health.lock().backends[&k].agent != Some(AdminState::Drain) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .unwrap();
    let applied_at = Instant::now();
    health.mark_applied(health.generation());
    let report = tokio::time::timeout(Duration::from_secs(5), requests.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(report.contains("/agent?applied=drain"), "{report}");
    assert!(
        applied_at.elapsed() < DEFAULT_CHECK_INTERVAL / 2,
        "reported {:?} after the apply, not at the next interval",
        applied_at.elapsed()
    );
    task.abort();
}

#[test]
fn own_state_applies_to_this_nodes_backends() {
    let health = Health::new("nuster2");
    health
        .lock()
        .backends
        .insert(key("nuster2"), BackendHealth::new(None));
    let mut watch = health.watch_own_state();
    health.set_own_state(AdminState::Drain, "test");
    assert!(watch.has_changed().unwrap());
    assert_eq!(*watch.borrow_and_update(), AdminState::Drain);
    assert_eq!(health.verdict(&key("nuster2"), 100, true).weight, 0);
}

#[test]
fn slow_start_ramps_the_weight_after_coming_back() {
    let mut config = HealthCheckConfig::new(CheckKind::Tcp);
    config.slowstart = Some(Duration::from_secs(100));
    config.rise = 1;
    let health = health_with(Some(config));
    let k = key("nuster2");
    health.record_check(&k, failing(), Duration::ZERO);
    assert!(!health.ramping());
    health.record_check(&k, passing(), Duration::ZERO);
    assert!(health.ramping());
    let weight = health.verdict(&k, 100, true).weight;
    assert!((1..=5).contains(&weight), "just came up: {weight}");
    // Pretend it came up 50 s ago.
    health.lock().backends.get_mut(&k).unwrap().up_since =
        Some(Instant::now() - Duration::from_secs(50));
    let weight = health.verdict(&k, 100, true).weight;
    assert!((49..=52).contains(&weight), "half way: {weight}");
    health.lock().backends.get_mut(&k).unwrap().up_since =
        Some(Instant::now() - Duration::from_secs(101));
    assert_eq!(health.verdict(&k, 100, true).weight, 100);
    assert!(!health.ramping());
}

fn config_with_check(check: &str) -> Config {
    let text = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/lab.toml"),
    )
    .unwrap()
    .replace(
        "forwarding = \"dsr\"\n",
        &format!("forwarding = \"dsr\"\n{check}\n"),
    );
    Config::from_toml(std::path::Path::new("lab.toml"), &text).unwrap()
}

#[test]
fn probes_ask_every_other_nodes_agent_and_check_every_backend() {
    let config = config_with_check("check = { type = \"http\", port = 8080 }");
    let probes = probes(&config, "nuster1");
    assert_eq!(probes.len(), 4);
    let nuster1 = probes.iter().find(|(k, _)| k.name == "nuster1").unwrap();
    assert!(nuster1.1.agent.is_none(), "its own state is known locally");
    let nuster3 = probes.iter().find(|(k, _)| k.name == "nuster3").unwrap();
    assert_eq!(nuster3.1.agent, Some("192.0.2.13:9477".parse().unwrap()));
    assert_eq!(nuster3.1.target, "192.0.2.13:8080".parse().unwrap());
    assert_eq!(nuster3.0.port, 80);
    assert!(
        super::probes(&config, "nuster3").is_empty(),
        "nuster3 does not balance"
    );
}

/// A backend check against a real local server, through the task loop:
/// it goes down when the server stops and comes back when it returns, and
/// the balancer's wake-up fires each time.
#[tokio::test]
async fn the_probe_loop_follows_a_server_that_stops_and_returns() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let mut check = HealthCheckConfig::new(CheckKind::Tcp);
    check.interval = Duration::from_millis(20);
    check.timeout = Some(Duration::from_millis(20));
    let health = Health::new("nuster1");
    let k = BackendKey {
        service: "web".into(),
        name: "local".into(),
        addr: addr.ip(),
        port: addr.port(),
    };
    health
        .lock()
        .backends
        .insert(k.clone(), BackendHealth::new(Some(check.clone())));
    let task = tokio::spawn(probe_loop(
        health.clone(),
        k.clone(),
        Probe {
            check: Some(check),
            target: addr,
            agent: None,
        },
        Duration::ZERO,
    ));
    let wait_for = |want: bool| {
        let health = health.clone();
        let k = k.clone();
        async move {
            tokio::time::timeout(Duration::from_secs(5), async {
                loop {
                    if health.verdict(&k, 1, true).alive == want {
                        return;
                    }
                    health.changed().await;
                }
            })
            .await
            .expect("state change within 5 s")
        }
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    wait_for(true).await;
    drop(listener);
    wait_for(false).await;
    let _listener = std::net::TcpListener::bind(addr).unwrap();
    wait_for(true).await;
    task.abort();
}

#[test]
fn first_checks_are_spread_evenly_over_the_interval() {
    let interval = Duration::from_secs(2);
    let offsets: Vec<Duration> = (0..4).map(|i| spread_offset(interval, i, 4)).collect();
    assert_eq!(
        offsets,
        [0, 500, 1000, 1500].map(Duration::from_millis).to_vec()
    );
    assert_eq!(spread_offset(interval, 0, 0), Duration::ZERO);
}
