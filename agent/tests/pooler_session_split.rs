//! Read/write split in session pools (pgpool-II's per-session load
//! balance node), with a real primary and streaming standby: each test
//! proves where statements ran with `pg_is_in_recovery()` and
//! `inet_server_port()`.

mod support;

use std::{net::SocketAddr, sync::atomic::Ordering, time::Duration};

use farol_agent::config::PoolMode;
use support::pooler::{self as harness, can_run_postgres, cluster, connect, simple_rows};

const WHERE: &str = "SELECT pg_is_in_recovery(), inet_server_port()";
const WHERE_NAMED: &str =
    "SELECT pg_is_in_recovery(), inet_server_port(), current_setting('application_name')";

/// (in recovery, server port) of where `sql` ran, by the simple protocol.
async fn where_simple(client: &tokio_postgres::Client, sql: &str) -> (bool, u16) {
    let rows = simple_rows(&client.simple_query(sql).await.unwrap());
    (rows[0][0] == "t", rows[0][1].parse().unwrap())
}

/// (in recovery, server port, application_name) by the simple protocol.
async fn where_named(client: &tokio_postgres::Client) -> (bool, u16, String) {
    let rows = simple_rows(&client.simple_query(WHERE_NAMED).await.unwrap());
    (
        rows[0][0] == "t",
        rows[0][1].parse().unwrap(),
        rows[0][2].clone(),
    )
}

async fn where_extended(client: &tokio_postgres::Client, sql: &str) -> (bool, u16) {
    let row = client.query_one(sql, &[]).await.unwrap();
    (row.get::<_, bool>(0), row.get::<_, i32>(1) as u16)
}

fn split_config(
    pg: &xtask::postgres::PgCluster,
    read_your_writes: bool,
) -> farol_agent::config::PoolerConfig {
    let mut config = harness::config(pg, harness::pool(PoolMode::Session, 8));
    config.read_write_split = true;
    config.read_your_writes = read_your_writes;
    config
}

/// The value of one sample line of the pooler's `/metrics` text.
fn ports(pg: &xtask::postgres::PgCluster) -> (u16, u16) {
    (pg.primary.port, pg.standby.as_ref().unwrap().port)
}

fn create_table(pg: &xtask::postgres::PgCluster) {
    // Tests run at once: CREATE TABLE IF NOT EXISTS races with itself.
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    pg.primary
        .psql(
            "app",
            "CREATE TABLE IF NOT EXISTS split_rows (id int); GRANT ALL ON split_rows TO PUBLIC",
        )
        .unwrap();
    pg.wait_standby_caught_up().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_reads_run_on_the_standby_settings_follow_and_writes_pin_the_primary() {
    if !can_run_postgres(
        "session_reads_run_on_the_standby_settings_follow_and_writes_pin_the_primary",
    ) {
        return;
    }
    let pg = cluster(true);
    create_table(&pg);
    let (primary, standby) = ports(&pg);
    let pooler = harness::start(split_config(&pg, true)).await;
    let client = connect(pooler.addr).await;
    assert_eq!(where_simple(&client, WHERE).await, (true, standby));
    assert_eq!(where_extended(&client, WHERE).await, (true, standby));
    // Session settings run on the primary and are mirrored on the standby,
    // by the simple and the extended protocol.
    client
        .simple_query("SET application_name = 'split-one'")
        .await
        .unwrap();
    client
        .execute("SET search_path = public, pg_catalog", &[])
        .await
        .unwrap();
    assert_eq!(
        where_named(&client).await,
        (true, standby, "split-one".into())
    );
    let rows = simple_rows(
        &client
            .simple_query("SELECT pg_is_in_recovery(), current_setting('search_path')")
            .await
            .unwrap(),
    );
    assert_eq!(rows, [["t", "public, pg_catalog"]]);
    // A read-only transaction runs on the standby, statement by statement.
    client.simple_query("BEGIN READ ONLY").await.unwrap();
    assert_eq!(where_simple(&client, WHERE).await, (true, standby));
    assert_eq!(where_extended(&client, WHERE).await, (true, standby));
    client.simple_query("COMMIT").await.unwrap();
    assert_eq!(where_simple(&client, WHERE).await, (true, standby));
    // A plain transaction runs on the primary from BEGIN to COMMIT, and
    // (read your writes) the session stays there, settings included.
    client.simple_query("BEGIN").await.unwrap();
    assert_eq!(where_simple(&client, WHERE).await, (false, primary));
    client
        .simple_query("INSERT INTO split_rows VALUES (1)")
        .await
        .unwrap();
    assert_eq!(where_extended(&client, WHERE).await, (false, primary));
    client.simple_query("COMMIT").await.unwrap();
    assert_eq!(
        where_named(&client).await,
        (false, primary, "split-one".into())
    );
    assert_eq!(where_extended(&client, WHERE).await, (false, primary));
    // Another session: a write outside a transaction pins it too.
    let writer = connect(pooler.addr).await;
    assert_eq!(where_simple(&writer, WHERE).await, (true, standby));
    writer
        .simple_query("INSERT INTO split_rows VALUES (2)")
        .await
        .unwrap();
    assert_eq!(where_simple(&writer, WHERE).await, (false, primary));
    assert_eq!(
        harness::metric(
            &pooler,
            "farol_pooler_split_sessions_pinned_total{reason=\"write\"}"
        ),
        2
    );
    assert_eq!(
        harness::metric(&pooler, "farol_pooler_split_standby_connections_total"),
        2
    );
    // application_name and search_path, once each on the one standby
    // connection that needed them.
    assert_eq!(
        harness::metric(&pooler, "farol_pooler_split_settings_replayed_total"),
        2
    );
    // A fresh session starts on the standby again, without the first
    // session's settings (the connections were reset when returned).
    drop(client);
    drop(writer);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let fresh = connect(pooler.addr).await;
    assert_eq!(where_named(&fresh).await, (true, standby, "farol".into()));
    fresh
        .simple_query("SET application_name = 'x'")
        .await
        .unwrap();
    fresh.simple_query("RESET application_name").await.unwrap();
    assert_eq!(where_named(&fresh).await, (true, standby, "farol".into()));
    // DISCARD ALL forgets the settings on both connections.
    fresh
        .simple_query("SET application_name = 'y'")
        .await
        .unwrap();
    assert_eq!(where_named(&fresh).await, (true, standby, "y".into()));
    fresh.simple_query("DISCARD ALL").await.unwrap();
    assert_eq!(where_named(&fresh).await, (true, standby, "farol".into()));
    fresh
        .simple_query("SET application_name = 'z'")
        .await
        .unwrap();
    assert_eq!(where_named(&fresh).await, (true, standby, "z".into()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_read_your_writes_writes_do_not_pin_but_temporary_tables_do() {
    if !can_run_postgres("without_read_your_writes_writes_do_not_pin_but_temporary_tables_do") {
        return;
    }
    let pg = cluster(true);
    create_table(&pg);
    let (primary, standby) = ports(&pg);
    let pooler = harness::start(split_config(&pg, false)).await;
    let client = connect(pooler.addr).await;
    client
        .simple_query("INSERT INTO split_rows VALUES (3)")
        .await
        .unwrap();
    assert_eq!(where_simple(&client, WHERE).await, (true, standby));
    client.simple_query("BEGIN").await.unwrap();
    assert_eq!(where_simple(&client, WHERE).await, (false, primary));
    client.simple_query("COMMIT").await.unwrap();
    assert_eq!(where_simple(&client, WHERE).await, (true, standby));
    // A temporary table lives on the primary's connection only: from
    // then on the session reads there.
    client
        .simple_query(
            "CREATE TEMP TABLE split_scratch (a int); INSERT INTO split_scratch VALUES (7)",
        )
        .await
        .unwrap();
    let rows = simple_rows(
        &client
            .simple_query("SELECT pg_is_in_recovery(), inet_server_port(), (SELECT sum(a) FROM split_scratch)")
            .await
            .unwrap(),
    );
    assert_eq!(rows, [["f".to_owned(), primary.to_string(), "7".into()]]);
    assert_eq!(where_extended(&client, WHERE).await, (false, primary));
    // LISTEN pins as well, and notifications reach the client while it
    // sends nothing (its primary connection stays the active one).
    use futures_util::StreamExt;
    let (listener, mut connection) =
        harness::client_config(pooler.addr, "app", harness::APP_PASSWORD)
            .connect(tokio_postgres::NoTls)
            .await
            .unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let driver = tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(Ok(message)) = messages.next().await {
            if let tokio_postgres::AsyncMessage::Notification(n) = message {
                let _ = tx.send(n.payload().to_owned());
            }
        }
    });
    assert_eq!(where_simple(&listener, WHERE).await, (true, standby));
    listener.simple_query("LISTEN split_channel").await.unwrap();
    assert_eq!(where_simple(&listener, WHERE).await, (false, primary));
    assert_eq!(
        harness::metric(
            &pooler,
            "farol_pooler_split_sessions_pinned_total{reason=\"session_state\"}"
        ),
        2
    );
    pg.primary
        .psql("app", "NOTIFY split_channel, 'hello'")
        .unwrap();
    let payload = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("the notification arrives")
        .unwrap();
    assert_eq!(payload, "hello");
    drop(listener);
    let _ = driver.await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepared_statements_follow_the_session_and_a_pipelined_write_waits_for_the_standby() {
    if !can_run_postgres(
        "prepared_statements_follow_the_session_and_a_pipelined_write_waits_for_the_standby",
    ) {
        return;
    }
    let pg = cluster(true);
    create_table(&pg);
    let (primary, standby) = ports(&pg);
    let pooler = harness::start(split_config(&pg, true)).await;
    let client = connect(pooler.addr).await;
    let read = client.prepare(WHERE).await.unwrap();
    for _ in 0..3 {
        let row = client.query_one(&read, &[]).await.unwrap();
        assert_eq!(
            (row.get::<_, bool>(0), row.get::<_, i32>(1) as u16),
            (true, standby)
        );
    }
    // A session that only read holds no primary connection (the driver's
    // Close and Sync of its dropped statements went to the standby too).
    client.query_one(WHERE, &[]).await.unwrap();
    client.query_one(WHERE, &[]).await.unwrap();
    let lent = |port: u16| {
        pooler
            .pooler
            .pools()
            .iter()
            .filter(|pool| pool.key.addr.port() == port)
            .map(|pool| pool.active_count())
            .sum::<usize>()
    };
    assert_eq!((lent(primary), lent(standby)), (0, 1));
    // tokio-postgres pipelines these: the write's messages arrive while
    // the read still runs on the standby.
    let insert = "INSERT INTO split_rows VALUES ($1)";
    let (row, inserted) = tokio::join!(
        client.query_one(&read, &[]),
        client.execute(insert, &[&42i32])
    );
    assert!(
        row.unwrap().get::<_, bool>(0),
        "the read ran on the standby"
    );
    assert_eq!(inserted.unwrap(), 1);
    // The statement prepared on the standby is prepared again on the
    // primary, where the session now reads its writes.
    for _ in 0..2 {
        let row = client.query_one(&read, &[]).await.unwrap();
        assert_eq!(
            (row.get::<_, bool>(0), row.get::<_, i32>(1) as u16),
            (false, primary)
        );
    }
    let count = client
        .query_one("SELECT count(*) FROM split_rows WHERE id = $1", &[&42i32])
        .await
        .unwrap();
    assert!(count.get::<_, i64>(0) >= 1);
    // DEALLOCATE ALL drops the server's statements (the pooler's renamed
    // ones too): preparing the same text again prepares it again.
    client.batch_execute("DEALLOCATE ALL").await.unwrap();
    let again = client.prepare(WHERE).await.unwrap();
    let row = client.query_one(&again, &[]).await.unwrap();
    assert_eq!(
        (row.get::<_, bool>(0), row.get::<_, i32>(1) as u16),
        (false, primary)
    );
    // Transactions through the extended protocol.
    let mut other = connect(pooler.addr).await;
    let tx = other
        .build_transaction()
        .read_only(true)
        .start()
        .await
        .unwrap();
    assert_eq!(where_extended_tx(&tx).await, (true, standby));
    tx.commit().await.unwrap();
    let tx = other.transaction().await.unwrap();
    assert_eq!(where_extended_tx(&tx).await, (false, primary));
    tx.commit().await.unwrap();
}

async fn where_extended_tx(tx: &tokio_postgres::Transaction<'_>) -> (bool, u16) {
    let row = tx.query_one(WHERE, &[]).await.unwrap();
    (row.get::<_, bool>(0), row.get::<_, i32>(1) as u16)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_that_lags_or_dies_mid_session_leaves_the_session_on_the_primary() {
    if !can_run_postgres(
        "a_standby_that_lags_or_dies_mid_session_leaves_the_session_on_the_primary",
    ) {
        return;
    }
    let mut pg = harness::private_cluster(true);
    let (primary, standby) = ports(&pg);
    let pooler = harness::start(split_config(&pg, true)).await;
    let client = connect(pooler.addr).await;
    client
        .simple_query("SET application_name = 'survivor'")
        .await
        .unwrap();
    assert_eq!(
        where_named(&client).await,
        (true, standby, "survivor".into())
    );
    // The role checks' verdict "too far behind" (set by hand here).
    pooler.pooler.set_readable_standbys(Vec::new());
    assert_eq!(
        where_named(&client).await,
        (false, primary, "survivor".into())
    );
    // Back within the bound: a new standby connection gets the settings.
    pooler
        .pooler
        .set_readable_standbys(vec![SocketAddr::from(([127, 0, 0, 1], standby))]);
    assert_eq!(
        where_named(&client).await,
        (true, standby, "survivor".into())
    );
    // A second session with a read running on the standby when it dies.
    let sleeper = connect(pooler.addr).await;
    assert_eq!(where_simple(&sleeper, WHERE).await, (true, standby));
    let long_read = tokio::spawn(async move {
        let started = std::time::Instant::now();
        let result = sleeper
            .simple_query("SELECT pg_is_in_recovery(), pg_sleep(30)")
            .await;
        (result.map(|_| ()), started.elapsed())
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    pg.standby.as_mut().unwrap().kill();
    // The read in flight gets a clean error at once, not a hang.
    let (result, took) = tokio::time::timeout(Duration::from_secs(20), long_read)
        .await
        .expect("the read in flight ends")
        .unwrap();
    let error = harness::failed(result, "a read on a dead standby");
    assert_eq!(harness::sqlstate(&error), "08006", "{error}");
    assert!(took < Duration::from_secs(15), "took {took:?}");
    // The first session's idle standby connection: its backend exits once
    // it sees the postmaster gone.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(
        where_named(&client).await,
        (false, primary, "survivor".into())
    );
    assert_eq!(where_extended(&client, WHERE).await, (false, primary));
    // Lagging out, then dead.
    assert_eq!(
        harness::metric(&pooler, "farol_pooler_split_standby_lost_total"),
        2
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_the_primary_moves_a_session_with_state_on_the_old_one_gets_57p01_and_others_follow()
{
    if !can_run_postgres(
        "after_the_primary_moves_a_session_with_state_on_the_old_one_gets_57p01_and_others_follow",
    ) {
        return;
    }
    let pg = cluster(true);
    create_table(&pg);
    let (_, standby) = ports(&pg);
    let pooler = harness::start(split_config(&pg, false)).await;
    let writer = connect(pooler.addr).await;
    writer
        .simple_query("INSERT INTO split_rows VALUES (5)")
        .await
        .unwrap();
    let with_temp_table = connect(pooler.addr).await;
    with_temp_table
        .batch_execute("CREATE TEMP TABLE mine (id int)")
        .await
        .unwrap();
    let reader = connect(pooler.addr).await;
    assert_eq!(where_simple(&reader, WHERE).await, (true, standby));
    // The health module's hook, pointed at the standby to prove routing.
    pooler
        .pooler
        .set_primary(SocketAddr::from(([127, 0, 0, 1], standby)));
    pooler.pooler.set_readable_standbys(Vec::new());
    // A temporary table lives only on the former primary's connection:
    // the session is ended with 57P01 (sent as soon as the primary moved,
    // so the client may only see its connection closed).
    let error = harness::failed(
        with_temp_table
            .simple_query("SELECT count(*) FROM mine")
            .await,
        "a session with a temporary table on the former primary",
    );
    assert!(
        with_temp_table.is_closed() || harness::sqlstate(&error) == "57P01",
        "{error}"
    );
    // The writer's session held an idle connection to the former primary
    // and nothing the pooler cannot rebuild: it follows.
    assert_eq!(where_simple(&writer, WHERE).await, (true, standby));
    // The reader held none: it reads from the new primary.
    assert_eq!(where_simple(&reader, WHERE).await, (true, standby));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_select_only_prepared_runs_through_a_split_session_pool() {
    if !can_run_postgres("pgbench_select_only_prepared_runs_through_a_split_session_pool") {
        return;
    }
    let pg = cluster(true);
    let (_, standby) = ports(&pg);
    let pooler = harness::start(split_config(&pg, true)).await;
    let port = pooler.addr.port().to_string();
    let pgbench = |extra: &[&str]| {
        let mut args: Vec<String> = ["-h", "127.0.0.1", "-p", &port, "-U", "app"]
            .map(String::from)
            .to_vec();
        args.extend(extra.iter().map(|s| s.to_string()));
        args.push("app".into());
        async move {
            tokio::process::Command::new("pgbench")
                .args(&args)
                .env("PGPASSWORD", harness::APP_PASSWORD)
                .output()
                .await
                .unwrap()
        }
    };
    // -i goes through the pooler too (DDL and COPY on the primary).
    let out = pgbench(&["-i", "-s", "1", "-q"]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    pg.wait_standby_caught_up().unwrap();
    let standby_queries = || {
        pooler
            .pooler
            .pools()
            .iter()
            .filter(|pool| pool.key.addr.port() == standby)
            .map(|pool| pool.stats.queries.load(Ordering::Relaxed))
            .sum::<u64>()
    };
    let before = standby_queries();
    for mode in ["prepared", "extended"] {
        let out = pgbench(&["-M", mode, "-c", "4", "-j", "2", "-t", "200", "-S"]).await;
        let stdout = harness::pgbench_succeeded(&out, mode);
        assert!(
            stdout.contains("number of transactions actually processed: 800/800"),
            "{mode}: {stdout}"
        );
    }
    // Every select of both runs ran on the standby.
    let on_standby = standby_queries() - before;
    assert!(
        on_standby >= 1600,
        "{on_standby} queries ran on the standby"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_made_inside_a_transaction_block_follow_the_session_to_its_other_connection() {
    if !can_run_postgres(
        "settings_made_inside_a_transaction_block_follow_the_session_to_its_other_connection",
    ) {
        return;
    }
    let pg = cluster(true);
    create_table(&pg);
    let (primary, standby) = ports(&pg);
    let pooler = harness::start(split_config(&pg, true)).await;
    let client = connect(pooler.addr).await;
    // A setting inside a READ ONLY block runs on the standby; it lasts
    // because the block commits, and the session stays on the standby.
    client
        .batch_execute(
            "BEGIN READ ONLY; SET application_name = 'inside-ro'; \
             SET search_path = \"odd'schema\", public; COMMIT",
        )
        .await
        .unwrap();
    assert_eq!(
        where_named(&client).await,
        (true, standby, "inside-ro".into())
    );
    // One rolled back does not last, on either connection.
    client
        .batch_execute("BEGIN READ ONLY; SET application_name = 'undone'; ROLLBACK")
        .await
        .unwrap();
    assert_eq!(
        where_named(&client).await,
        (true, standby, "inside-ro".into())
    );
    // A write pins the session to the primary, which has the settings
    // read back from the standby (a quote in a value included).
    client
        .simple_query("INSERT INTO split_rows VALUES (10)")
        .await
        .unwrap();
    assert_eq!(
        where_named(&client).await,
        (false, primary, "inside-ro".into())
    );
    let rows = simple_rows(
        &client
            .simple_query("SELECT pg_is_in_recovery(), current_setting('search_path')")
            .await
            .unwrap(),
    );
    assert_eq!(rows, [["f", "\"odd'schema\", public"]]);
    // application_name and search_path, then application_name again.
    assert_eq!(
        harness::metric(&pooler, "farol_pooler_split_settings_read_back_total"),
        3
    );
    assert_eq!(
        harness::metric(
            &pooler,
            "farol_pooler_split_sessions_pinned_total{reason=\"write\"}"
        ),
        1
    );
    // Without read_your_writes a plain block stays on the primary and
    // does not pin: a setting made inside it reaches the standby for the
    // next read, once it committed.
    let pooler = harness::start(split_config(&pg, false)).await;
    let other = connect(pooler.addr).await;
    assert_eq!(where_simple(&other, WHERE).await, (true, standby));
    for sql in ["BEGIN", "SET application_name = 'in-plain'", "COMMIT"] {
        other.simple_query(sql).await.unwrap();
    }
    assert_eq!(
        where_named(&other).await,
        (true, standby, "in-plain".into())
    );
    other
        .batch_execute("BEGIN; SET application_name = 'in-one-text'; COMMIT")
        .await
        .unwrap();
    assert_eq!(
        where_named(&other).await,
        (true, standby, "in-one-text".into())
    );
    other
        .batch_execute("BEGIN; SET application_name = 'rolled-back'; ROLLBACK")
        .await
        .unwrap();
    assert_eq!(
        where_named(&other).await,
        (true, standby, "in-one-text".into())
    );
    assert_eq!(
        harness::metric(&pooler, "farol_pooler_split_settings_read_back_total"),
        3
    );
}

/// Runs a pgbench script through the pooler: (succeeded, stdout + stderr).
async fn pgbench_script(port: u16, script: &str, transactions: u32) -> (bool, String) {
    let dir = tempfile_dir();
    let path = dir.join("script.sql");
    std::fs::write(&path, script).unwrap();
    let out = tokio::process::Command::new("pgbench")
        .args(["-n", "-M", "extended", "-c", "1", "-t"])
        .arg(transactions.to_string())
        .args(["-h", "127.0.0.1", "-p"])
        .arg(port.to_string())
        .args(["-U", "app", "-f"])
        .arg(&path)
        .arg("app")
        .env("PGPASSWORD", harness::APP_PASSWORD)
        .output()
        .await
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success() && !text.contains("aborted"), text)
}

fn tempfile_dir() -> std::path::PathBuf {
    use std::sync::atomic::AtomicU32;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "farol-split-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipelined_batch_that_writes_runs_whole_on_the_primary_in_both_pool_modes() {
    if !can_run_postgres(
        "a_pipelined_batch_that_writes_runs_whole_on_the_primary_in_both_pool_modes",
    ) {
        return;
    }
    let pg = cluster(true);
    pg.primary
        .psql(
            "app",
            "CREATE TABLE IF NOT EXISTS split_batch (mode text); GRANT ALL ON split_batch TO PUBLIC",
        )
        .unwrap();
    pg.wait_standby_caught_up().unwrap();
    let (_, standby) = ports(&pg);
    for mode in [PoolMode::Session, PoolMode::Transaction] {
        let mut config = harness::config(&pg, harness::pool(mode, 8));
        config.read_write_split = true;
        let pooler = harness::start(config).await;
        let standby_queries = || {
            pooler
                .pooler
                .pools()
                .iter()
                .filter(|pool| pool.key.addr.port() == standby)
                .map(|pool| pool.stats.queries.load(Ordering::Relaxed))
                .sum::<u64>()
        };
        // A read, then a write, then one Sync: one implicit transaction,
        // which must not start on the standby.
        let (ok, out) = pgbench_script(
            pooler.addr.port(),
            &format!(
                "\\startpipeline\nSELECT pg_is_in_recovery();\n\
                 INSERT INTO split_batch VALUES ('{mode:?}');\n\\endpipeline\n"
            ),
            5,
        )
        .await;
        assert!(ok, "{mode:?}: {out}");
        let count = pg
            .primary
            .psql(
                "app",
                &format!("SELECT count(*) FROM split_batch WHERE mode = '{mode:?}'"),
            )
            .unwrap();
        assert_eq!(count.trim(), "5", "{mode:?}");
        // The same with a read of 200 KB: libpq sends the batch in two
        // pieces, the read before the write and the Sync.
        let long = "x".repeat(200 * 1024);
        let (ok, out) = pgbench_script(
            pooler.addr.port(),
            &format!(
                "\\startpipeline\nSELECT length('{long}');\n\
                 INSERT INTO split_batch VALUES ('{mode:?}-long');\n\\endpipeline\n"
            ),
            5,
        )
        .await;
        assert!(ok, "{mode:?}: {}", &out[..out.len().min(2000)]);
        let count = pg
            .primary
            .psql(
                "app",
                &format!("SELECT count(*) FROM split_batch WHERE mode = '{mode:?}-long'"),
            )
            .unwrap();
        assert_eq!(count.trim(), "5", "{mode:?}");
        // A batch of reads only still goes to the standby.
        let before = standby_queries();
        let (ok, out) = pgbench_script(
            pooler.addr.port(),
            "\\startpipeline\nSELECT 1;\nSELECT pg_is_in_recovery();\n\\endpipeline\n",
            5,
        )
        .await;
        assert!(ok, "{mode:?}: {out}");
        assert!(
            standby_queries() - before >= 10,
            "{mode:?}: {} reads on the standby",
            standby_queries() - before
        );
    }
}
