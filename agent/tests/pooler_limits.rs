//! The pooler's limits and failures with real PostgreSQL 15: too many
//! clients, a busy pool, a client gone mid-query, a server gone mid-query.

mod support;

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use farol_agent::config::PoolMode;
use support::pooler::{self as harness, can_run_postgres, cluster, connect, connect_as, sqlstate};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_over_max_client_conn_get_53300() {
    if !can_run_postgres("clients_over_max_client_conn_get_53300") {
        return;
    }
    let pg = cluster(false);
    let mut config = harness::config(&pg, harness::pool(PoolMode::Transaction, 2));
    config.max_client_conn = 3;
    let pooler = harness::start(config).await;
    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(connect(pooler.addr).await);
    }
    let error = harness::failed(
        connect_as(pooler.addr, "app", harness::APP_PASSWORD).await,
        "the fourth client is refused",
    );
    assert_eq!(sqlstate(&error), "53300");
    assert!(
        harness::message(&error).contains("max_client_conn"),
        "{error:?}"
    );
    // The three still work; a slot frees when one leaves.
    for client in &clients {
        client.simple_query("SELECT 1").await.unwrap();
    }
    drop(clients.pop());
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match connect_as(pooler.addr, "app", harness::APP_PASSWORD).await {
            Ok(client) => {
                client.simple_query("SELECT 1").await.unwrap();
                break;
            }
            Err(error) if Instant::now() < deadline => {
                assert_eq!(sqlstate(&error), "53300");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(error) => panic!("slot never freed: {error}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_queue_for_a_busy_pool_then_get_53300_after_query_wait_timeout() {
    if !can_run_postgres("clients_queue_for_a_busy_pool_then_get_53300_after_query_wait_timeout") {
        return;
    }
    let pg = cluster(false);
    let mut pool = harness::pool(PoolMode::Transaction, 1);
    pool.query_wait_timeout = Duration::from_millis(700);
    let pooler = harness::start(harness::config(&pg, pool)).await;
    let mut holder = connect(pooler.addr).await;
    let waiter = connect(pooler.addr).await;
    let tx = holder.transaction().await.unwrap();
    tx.simple_query("SELECT 1").await.unwrap();
    // A client that waits less than the timeout gets through once the
    // transaction ends.
    let queued = tokio::spawn(async move {
        let started = Instant::now();
        let result = waiter.simple_query("SELECT 2").await.map(|_| ());
        (result, started.elapsed(), waiter)
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    tx.commit().await.unwrap();
    let (result, waited, waiter) = queued.await.unwrap();
    result.unwrap();
    assert!(
        waited >= Duration::from_millis(150),
        "it queued ({waited:?})"
    );
    // Now hold the only connection past the timeout.
    let tx = holder.transaction().await.unwrap();
    tx.simple_query("SELECT 1").await.unwrap();
    let started = Instant::now();
    let error = waiter.simple_query("SELECT 3").await.unwrap_err();
    assert_eq!(sqlstate(&error), "53300");
    assert!(
        harness::message(&error).contains("query_wait_timeout"),
        "{error:?}"
    );
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(650) && waited < Duration::from_secs(5),
        "{waited:?}"
    );
    tx.commit().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_gone_mid_query_frees_its_server_connection() {
    if !can_run_postgres("a_client_gone_mid_query_frees_its_server_connection") {
        return;
    }
    let pg = cluster(false);
    let mut pool = harness::pool(PoolMode::Transaction, 1);
    pool.query_wait_timeout = Duration::from_secs(5);
    let pooler = harness::start(harness::config(&pg, pool)).await;
    // psql, killed mid-query: its socket closes with the query running.
    let mut psql = tokio::process::Command::new("psql")
        .args([
            "-X",
            "-h",
            "127.0.0.1",
            "-p",
            &pooler.addr.port().to_string(),
            "-U",
            "app",
            "-d",
            "app",
        ])
        .args(["-c", "SELECT pg_sleep(60) /* farol-gone */"])
        .env("PGPASSWORD", harness::APP_PASSWORD)
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while pg
        .primary
        .psql("app", "SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%farol-gone%' AND pid <> pg_backend_pid()")
        .unwrap()
        == "0"
    {
        assert!(Instant::now() < deadline, "the query never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    psql.kill().await.unwrap();
    let started = Instant::now();
    let next = connect(pooler.addr).await;
    next.simple_query("SELECT 1").await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(5));
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let running = pg
            .primary
            .psql("app", "SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%farol-gone%' AND pid <> pg_backend_pid()")
            .unwrap();
        if running == "0" {
            break;
        }
        assert!(Instant::now() < deadline, "the abandoned query still runs");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_gone_mid_query_gives_the_client_an_error_not_a_hang() {
    if !can_run_postgres("a_server_gone_mid_query_gives_the_client_an_error_not_a_hang") {
        return;
    }
    let pg = cluster(false);
    let pooler = harness::start(harness::config(
        &pg,
        harness::pool(PoolMode::Transaction, 2),
    ))
    .await;
    let client = connect(pooler.addr).await;
    let started = Instant::now();
    let query = tokio::spawn(async move {
        client
            .simple_query("SELECT pg_sleep(60) /* farol-killed */")
            .await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    pg.primary
        .psql("app", "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE query LIKE '%farol-killed%' AND pid <> pg_backend_pid()")
        .unwrap();
    let result = tokio::time::timeout(Duration::from_secs(10), query)
        .await
        .expect("no hang")
        .unwrap();
    let error = harness::failed(result, "the query fails");
    assert!(started.elapsed() < Duration::from_secs(10));
    // 57P01 admin_shutdown from the server, passed through, or 08006 from the pooler.
    let code = sqlstate(&error);
    assert!(
        code == "57P01" || code == "08006" || error.is_closed(),
        "{error:?}"
    );
    // New clients get a fresh, working server connection.
    let next = connect(pooler.addr).await;
    next.simple_query("SELECT 1").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssl_requests_are_refused_cleanly_and_garbage_gets_08p01() {
    if !can_run_postgres("ssl_requests_are_refused_cleanly_and_garbage_gets_08p01") {
        return;
    }
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let pg = cluster(false);
    let pooler = harness::start(harness::config(
        &pg,
        harness::pool(PoolMode::Transaction, 1),
    ))
    .await;
    let mut stream = tokio::net::TcpStream::connect(pooler.addr).await.unwrap();
    stream
        .write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f])
        .await
        .unwrap();
    let mut answer = [0u8; 1];
    stream.read_exact(&mut answer).await.unwrap();
    assert_eq!(&answer, b"N");
    // A startup packet with an absurd length: an 08P01 ErrorResponse, then close.
    stream
        .write_all(&[0x7f, 0xff, 0xff, 0xff, 0, 3, 0, 0])
        .await
        .unwrap();
    let mut reply = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut reply))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(reply.first(), Some(&b'E'));
    assert!(String::from_utf8_lossy(&reply).contains("08P01"));
    // With sslmode=require, tokio-postgres gives up cleanly.
    let mut config = harness::client_config(pooler.addr, "app", harness::APP_PASSWORD);
    config.ssl_mode(tokio_postgres::config::SslMode::Require);
    assert!(config.connect(tokio_postgres::NoTls).await.is_err());
    // The refused connections did not disturb other clients.
    let client = connect(pooler.addr).await;
    client.simple_query("SELECT 1").await.unwrap();
}

/// A self-signed certificate made by openssl with `key_args` and `digest`.
fn self_signed(
    dir: &std::path::Path,
    name: &str,
    key_args: &[&str],
    digest: &str,
) -> (PathBuf, PathBuf) {
    let (cert, key) = (
        dir.join(format!("{name}.crt")),
        dir.join(format!("{name}.key")),
    );
    let made = std::process::Command::new("openssl")
        .args(["req", "-x509"])
        .args(key_args)
        .args([
            "-nodes",
            "-days",
            "1",
            digest,
            "-subj",
            "/CN=localhost",
            "-keyout",
        ])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .unwrap();
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    (cert, key)
}

/// psql through the pooler as `app` with these libpq settings.
async fn psql_with(port: u16, settings: &[(&str, &str)]) -> std::process::Output {
    tokio::process::Command::new("psql")
        .args(["-X", "-h", "127.0.0.1", "-p", &port.to_string()])
        .args(["-U", "app", "-d", "app"])
        .args(["-c", "\\conninfo", "-c", "SELECT 'through tls'"])
        .env("PGPASSWORD", harness::APP_PASSWORD)
        .envs(settings.iter().copied())
        .output()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_is_offered_when_a_certificate_is_configured() {
    if !can_run_postgres("tls_is_offered_when_a_certificate_is_configured") {
        return;
    }
    let pg = cluster(false);
    let dir = std::env::temp_dir().join(format!("farol-pooler-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ecdsa = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"];
    let (cert, key) = self_signed(&dir, "ecdsa", &ecdsa, "-sha256");
    let mut config = harness::config(&pg, harness::pool(PoolMode::Transaction, 1));
    config.tls_cert = Some(cert);
    config.tls_key = Some(key);
    let pooler = harness::start(config.clone()).await;
    let port = pooler.addr.port();
    let out = psql_with(port, &[("PGSSLMODE", "require")]).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("SSL connection (protocol: TLSv1.3"),
        "{stdout}"
    );
    assert!(stdout.contains("through tls"), "{stdout}");
    // Plain text still works when the client does not ask for TLS.
    let out = psql_with(port, &[("PGSSLMODE", "disable")]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!String::from_utf8_lossy(&out.stdout).contains("SSL connection"));

    // SCRAM channel binding: libpq computes the certificate hash itself,
    // so a login with channel_binding=require proves ours is the same.
    let bound = [("PGSSLMODE", "require"), ("PGCHANNELBINDING", "require")];
    let out = psql_with(port, &bound).await;
    assert!(
        out.status.success(),
        "ECDSA-SHA256 certificate: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Without TLS there is nothing to bind to: libpq refuses to go on.
    let out = psql_with(
        port,
        &[("PGSSLMODE", "disable"), ("PGCHANNELBINDING", "require")],
    )
    .await;
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("channel binding"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(pooler);

    // A certificate signed with SHA-384 binds with a SHA-384 hash.
    let (cert, key) = self_signed(&dir, "rsa", &["-newkey", "rsa:2048"], "-sha384");
    config.tls_cert = Some(cert);
    config.tls_key = Some(key);
    let pooler = harness::start(config).await;
    let out = psql_with(pooler.addr.port(), &bound).await;
    assert!(
        out.status.success(),
        "RSA-SHA384 certificate: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_server_connections_killed_by_the_server_are_not_handed_out() {
    if !can_run_postgres("idle_server_connections_killed_by_the_server_are_not_handed_out") {
        return;
    }
    let pg = cluster(false);
    let pooler = harness::start(harness::config(
        &pg,
        harness::pool(PoolMode::Transaction, 1),
    ))
    .await;
    let client = connect(pooler.addr).await;
    let pid: i32 = client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    // The only server connection is idle in the pool; the server kills it.
    pg.primary
        .psql("app", &format!("SELECT pg_terminate_backend({pid})"))
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let row = client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap();
    assert_ne!(row.get::<_, i32>(0), pid, "a fresh server connection");
}
