//! PAUSE / RESUME on the admin console (PgBouncer's semantics) with a real
//! PostgreSQL: PAUSE returns once running transactions finished, new
//! transactions are held (not refused) and run after RESUME; a transaction
//! running past `pause_drain_timeout` is ended with 57P01, one held past
//! `pause_wait_timeout` gets 57P03; SHOW POOLS / SHOW STATS show it.

mod support;

use std::time::{Duration, Instant};

use farol_agent::config::PoolMode;
use support::pooler::{
    self as harness, can_run_postgres, cluster, connect, message, simple_rows as rows, sqlstate,
};

async fn admin(addr: std::net::SocketAddr) -> tokio_postgres::Client {
    let mut config = harness::client_config(addr, "app", harness::APP_PASSWORD);
    config.dbname("farol");
    let (admin, connection) = config.connect(tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    admin
}

/// PAUSE sent on `console` in a task: the console, its result and how
/// long it took.
type PauseResult = (
    tokio_postgres::Client,
    Result<(), tokio_postgres::Error>,
    Duration,
);

fn pause_in_background(console: tokio_postgres::Client) -> tokio::task::JoinHandle<PauseResult> {
    tokio::spawn(async move {
        let started = Instant::now();
        let result = console.simple_query("PAUSE").await.map(|_| ());
        (console, result, started.elapsed())
    })
}

/// `PAUSE app` while `client` is inside a transaction: PAUSE returns after
/// the drain timeout (within `took`) and the client's session is ended
/// with 57P01.
async fn pause_ends_a_transaction_past_the_drain(
    console: &tokio_postgres::Client,
    client: &tokio_postgres::Client,
    took: (Duration, Duration),
) {
    client.batch_execute("BEGIN; SELECT 1").await.unwrap();
    let started = Instant::now();
    console.simple_query("PAUSE app").await.unwrap();
    let paused_after = started.elapsed();
    assert!(
        paused_after >= took.0 && paused_after < took.1,
        "PAUSE took {paused_after:?}, expected {took:?}"
    );
    let error = client.simple_query("SELECT 2").await.unwrap_err();
    assert!(
        client.is_closed() || error.code().is_some(),
        "the session is ended: {error}"
    );
    if let Some(code) = error.code() {
        assert_eq!(code.code(), "57P01", "{error}");
        assert!(message(&error).contains("pause_drain_timeout"), "{error}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_waits_for_running_transactions_holds_new_ones_and_resume_runs_them() {
    if !can_run_postgres("pause_waits_for_running_transactions_holds_new_ones_and_resume_runs_them")
    {
        return;
    }
    let pg = cluster(false);
    let pooler = harness::start(harness::config(
        &pg,
        harness::pool(PoolMode::Transaction, 2),
    ))
    .await;
    let setup = connect(pooler.addr).await;
    setup
        .batch_execute("CREATE TABLE IF NOT EXISTS paused (id int PRIMARY KEY)")
        .await
        .unwrap();
    setup.batch_execute("TRUNCATE paused").await.unwrap();
    let console = admin(pooler.addr).await;

    // A transaction runs when PAUSE comes: PAUSE waits for its COMMIT.
    let running = connect(pooler.addr).await;
    running
        .batch_execute("BEGIN; INSERT INTO paused VALUES (1)")
        .await
        .unwrap();
    let pause = pause_in_background(console);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(
        !pause.is_finished(),
        "PAUSE returned with a transaction running"
    );
    running.batch_execute("COMMIT").await.unwrap();
    let (console, result, took) = pause.await.unwrap();
    result.unwrap();
    assert!(took >= Duration::from_millis(400), "{took:?}");
    eprintln!("PAUSE returned {took:?} after it was sent (the running transaction committed after 400 ms)");

    // A new transaction is held, not refused, and runs after RESUME.
    let held_client = connect(pooler.addr).await;
    let held = tokio::spawn(async move {
        let started = Instant::now();
        let result = held_client
            .simple_query("INSERT INTO paused VALUES (2)")
            .await
            .map(|_| ());
        (result, started.elapsed(), Instant::now())
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!held.is_finished(), "a transaction ran while paused");
    let pools = rows(&console.simple_query("SHOW POOLS").await.unwrap());
    assert_eq!(pools[0][8], "1", "paused column: {pools:?}");
    assert_eq!(pools[0][9], "1", "cl_held column: {pools:?}");
    let error = console.simple_query("PAUSE").await.unwrap_err();
    assert!(message(&error).contains("already paused"), "{error}");
    let resumed = Instant::now();
    console.simple_query("RESUME").await.unwrap();
    let (result, waited, finished) = held.await.unwrap();
    result.unwrap();
    // Held until the RESUME (its own clock starts when the task runs,
    // a little after the 500 ms sleep began).
    assert!(finished >= resumed, "finished before the RESUME was sent");
    assert!(waited >= Duration::from_millis(400), "{waited:?}");
    let stats = rows(&console.simple_query("SHOW STATS").await.unwrap());
    assert_eq!(stats[0][7], "1", "total_held_count: {stats:?}");
    let held_us: u64 = stats[0][8].parse().unwrap();
    assert!(held_us >= 400_000, "total_held_time_us: {stats:?}");
    eprintln!("held {waited:?}; SHOW STATS total_held_time_us = {held_us}");
    let count = setup
        .simple_query("SELECT count(*) FROM paused")
        .await
        .unwrap();
    assert_eq!(rows(&count)[0][0], "2");
    let error = console.simple_query("RESUME").await.unwrap_err();
    assert_eq!(sqlstate(&error), "55000");
    assert!(!pooler.pooler.pause.is_paused());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_ends_a_transaction_past_the_drain_timeout_and_a_hold_past_the_wait_timeout() {
    if !can_run_postgres(
        "a_pause_ends_a_transaction_past_the_drain_timeout_and_a_hold_past_the_wait_timeout",
    ) {
        return;
    }
    let pg = cluster(false);
    let mut config = harness::config(&pg, harness::pool(PoolMode::Transaction, 2));
    config.pause_drain_timeout = Duration::from_millis(500);
    config.pause_wait_timeout = Duration::from_secs(1);
    let pooler = harness::start(config).await;
    let console = admin(pooler.addr).await;

    // Still in its transaction after pause_drain_timeout: ended with 57P01.
    let stuck = connect(pooler.addr).await;
    pause_ends_a_transaction_past_the_drain(
        &console,
        &stuck,
        (Duration::from_millis(500), Duration::from_secs(5)),
    )
    .await;
    assert_eq!(
        pooler
            .pooler
            .pause
            .stats
            .cut
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );

    // Held longer than pause_wait_timeout: 57P03, saying why.
    let late = connect(pooler.addr).await;
    let started = Instant::now();
    let error = late.simple_query("SELECT 3").await.unwrap_err();
    let waited = started.elapsed();
    assert_eq!(sqlstate(&error), "57P03", "{error}");
    assert!(message(&error).contains("pause_wait_timeout"), "{error}");
    assert!(message(&error).contains("PAUSE of app"), "{error}");
    assert!(
        waited >= Duration::from_secs(1) && waited < Duration::from_secs(6),
        "{waited:?}"
    );
    // RESUME of another database is refused; of this one, it works.
    let error = console.simple_query("RESUME other").await.unwrap_err();
    assert_eq!(sqlstate(&error), "55000");
    console.simple_query("RESUME app").await.unwrap();
    let fresh = connect(pooler.addr).await;
    fresh.simple_query("SELECT 4").await.unwrap();
}

async fn backend_pid(client: &tokio_postgres::Client) -> String {
    rows(
        &client
            .simple_query("SELECT pg_backend_pid()")
            .await
            .unwrap(),
    )[0][0]
        .clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_drains_and_holds_session_mode_clients_that_keep_their_server_connection() {
    if !can_run_postgres(
        "a_pause_drains_and_holds_session_mode_clients_that_keep_their_server_connection",
    ) {
        return;
    }
    let pg = cluster(false);
    let mut config = harness::config(&pg, harness::pool(PoolMode::Session, 3));
    config.pause_drain_timeout = Duration::from_secs(3);
    let pooler = harness::start(config).await;
    let setup = connect(pooler.addr).await;
    setup
        .batch_execute("CREATE TABLE IF NOT EXISTS paused_sessions (id int PRIMARY KEY)")
        .await
        .unwrap();
    setup
        .batch_execute("TRUNCATE paused_sessions")
        .await
        .unwrap();
    drop(setup);
    let console = admin(pooler.addr).await;

    // An idle session holds its server connection; another is inside a
    // transaction: PAUSE waits for the second one's COMMIT only.
    let idle = connect(pooler.addr).await;
    let idle_pid = backend_pid(&idle).await;
    let running = connect(pooler.addr).await;
    let running_pid = backend_pid(&running).await;
    running
        .batch_execute("BEGIN; INSERT INTO paused_sessions VALUES (1)")
        .await
        .unwrap();
    let pause = pause_in_background(console);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(
        !pause.is_finished(),
        "PAUSE returned while a session-mode transaction was running"
    );
    running.batch_execute("COMMIT").await.unwrap();
    let (console, result, took) = pause.await.unwrap();
    result.unwrap();
    assert!(
        took >= Duration::from_millis(400) && took < Duration::from_secs(3),
        "PAUSE took {took:?}: it waits for the transaction, not for the idle session"
    );

    // Both sessions' next statements are held, not sent to the server.
    let hold = |client: tokio_postgres::Client, sql: &'static str| {
        tokio::spawn(async move {
            let result = client.simple_query(sql).await.map(|_| ());
            (client, result, Instant::now())
        })
    };
    let idle_write = hold(idle, "INSERT INTO paused_sessions VALUES (2)");
    let running_write = hold(running, "INSERT INTO paused_sessions VALUES (3)");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !idle_write.is_finished(),
        "an idle session's statement ran while paused"
    );
    assert!(
        !running_write.is_finished(),
        "a session's next statement ran while paused"
    );
    let pools = rows(&console.simple_query("SHOW POOLS").await.unwrap());
    assert_eq!(pools[0][9], "2", "cl_held column: {pools:?}");
    let resumed = Instant::now();
    console.simple_query("RESUME").await.unwrap();
    let (idle, result, finished) = idle_write.await.unwrap();
    result.unwrap();
    assert!(finished >= resumed, "ran before the RESUME");
    let (running, result, finished) = running_write.await.unwrap();
    result.unwrap();
    assert!(finished >= resumed, "ran before the RESUME");
    // Each session kept its own server connection through the pause.
    assert_eq!(backend_pid(&idle).await, idle_pid);
    assert_eq!(backend_pid(&running).await, running_pid);
    let count = idle
        .simple_query("SELECT count(*) FROM paused_sessions")
        .await
        .unwrap();
    assert_eq!(rows(&count)[0][0], "3");

    // A session still inside its transaction after pause_drain_timeout is
    // ended (57P01); the idle one is not.
    pause_ends_a_transaction_past_the_drain(
        &console,
        &running,
        (Duration::from_secs(3), Duration::from_secs(8)),
    )
    .await;
    console.simple_query("RESUME app").await.unwrap();
    assert_eq!(backend_pid(&idle).await, idle_pid);
}
