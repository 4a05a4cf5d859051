//! The pooler with real PostgreSQL 15 and real clients (tokio-postgres,
//! psql, pgbench): protocols, prepared statements in transaction mode,
//! COPY, LISTEN/NOTIFY, large rows, cancel, authentication, admin console.

mod support;

use std::time::{Duration, Instant};

use farol_agent::config::PoolMode;
use support::pooler::{
    self as harness, can_run_postgres, cluster, connect, connect_as, simple_rows, sqlstate,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simple_and_extended_queries_run_on_the_primary_through_a_transaction_pool() {
    if !can_run_postgres(
        "simple_and_extended_queries_run_on_the_primary_through_a_transaction_pool",
    ) {
        return;
    }
    let pg = cluster(false);
    let pooler = harness::start(harness::config(
        &pg,
        harness::pool(PoolMode::Transaction, 2),
    ))
    .await;
    let client = connect(pooler.addr).await;
    let rows = simple_rows(
        &client
            .simple_query("SELECT pg_is_in_recovery(), inet_server_port(); SELECT 'two'")
            .await
            .unwrap(),
    );
    assert_eq!(
        rows,
        vec![
            vec!["f".to_owned(), pg.primary.port.to_string()],
            vec!["two".to_owned()]
        ]
    );
    let row = client
        .query_one("SELECT $1::int + 1, $2::text", &[&41i32, &"x"])
        .await
        .unwrap();
    assert_eq!(row.get::<_, i32>(0), 42);
    assert_eq!(row.get::<_, &str>(1), "x");
    let error = client
        .simple_query("SELECT * FROM no_such_table")
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&error), "42P01");
    let error = client.query("SELECT 1/0", &[]).await.unwrap_err();
    assert_eq!(sqlstate(&error), "22012");
    // Still usable after both errors.
    let row = client.query_one("SELECT 7", &[]).await.unwrap();
    assert_eq!(row.get::<_, i32>(0), 7);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepared_statements_work_in_transaction_mode_across_server_connections() {
    if !can_run_postgres("prepared_statements_work_in_transaction_mode_across_server_connections") {
        return;
    }
    let pg = cluster(false);
    let pooler = harness::start(harness::config(
        &pg,
        harness::pool(PoolMode::Transaction, 3),
    ))
    .await;
    let mut tasks = Vec::new();
    for client_index in 0..8i32 {
        let addr = pooler.addr;
        tasks.push(tokio::spawn(async move {
            let client = connect(addr).await;
            let add = client
                .prepare("SELECT $1::int + $2::int, pg_backend_pid()")
                .await
                .unwrap();
            let echo = client.prepare("SELECT $1::text").await.unwrap();
            let mut backends = std::collections::HashSet::new();
            for i in 0..60 {
                let row = client.query_one(&add, &[&client_index, &i]).await.unwrap();
                assert_eq!(row.get::<_, i32>(0), client_index + i);
                backends.insert(row.get::<_, i32>(1));
                let row = client
                    .query_one(&echo, &[&format!("c{client_index}-{i}")])
                    .await
                    .unwrap();
                assert_eq!(row.get::<_, String>(0), format!("c{client_index}-{i}"));
            }
            // Closing one statement keeps the other usable.
            drop(add);
            let row = client.query_one(&echo, &[&"after close"]).await.unwrap();
            assert_eq!(row.get::<_, &str>(0), "after close");
            backends.len()
        }));
    }
    let mut most = 0;
    for task in tasks {
        most = most.max(task.await.unwrap());
    }
    assert!(
        most > 1,
        "statements ran on more than one server connection"
    );
    assert!(
        pooler.pooler.pools()[0]
            .stats
            .server_connects
            .load(std::sync::atomic::Ordering::Relaxed)
            <= 3
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_keep_their_server_connection_until_commit() {
    if !can_run_postgres("transactions_keep_their_server_connection_until_commit") {
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
        .batch_execute("DROP TABLE IF EXISTS tx_test; CREATE TABLE tx_test (id int)")
        .await
        .unwrap();
    let mut client = connect(pooler.addr).await;
    let other = connect(pooler.addr).await;
    let tx = client.transaction().await.unwrap();
    tx.execute("INSERT INTO tx_test VALUES (1)", &[])
        .await
        .unwrap();
    let pid_a = tx
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get::<_, i32>(0);
    let count = other
        .query_one("SELECT count(*) FROM tx_test", &[])
        .await
        .unwrap()
        .get::<_, i64>(0);
    assert_eq!(count, 0, "uncommitted row invisible to another client");
    let pid_b = tx
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get::<_, i32>(0);
    assert_eq!(
        pid_a, pid_b,
        "one server connection for the whole transaction"
    );
    tx.commit().await.unwrap();
    let count = other
        .query_one("SELECT count(*) FROM tx_test", &[])
        .await
        .unwrap()
        .get::<_, i64>(0);
    assert_eq!(count, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_in_and_out_and_large_rows_pass_through() {
    if !can_run_postgres("copy_in_and_out_and_large_rows_pass_through") {
        return;
    }
    use bytes::Bytes;
    use futures_util::{SinkExt, TryStreamExt};
    let pg = cluster(false);
    let pooler = harness::start(harness::config(
        &pg,
        harness::pool(PoolMode::Transaction, 2),
    ))
    .await;
    let client = connect(pooler.addr).await;
    client
        .batch_execute("DROP TABLE IF EXISTS copy_test; CREATE TABLE copy_test (id int, name text)")
        .await
        .unwrap();
    let sink = client.copy_in("COPY copy_test FROM STDIN").await.unwrap();
    let mut sink = std::pin::pin!(sink);
    let mut data = String::new();
    for i in 0..5000 {
        data.push_str(&format!("{i}\tname-{i}\n"));
    }
    sink.send(Bytes::from(data.clone())).await.unwrap();
    let written = sink.as_mut().finish().await.unwrap();
    assert_eq!(written, 5000);
    let stream = client
        .copy_out("COPY (SELECT * FROM copy_test ORDER BY id) TO STDOUT")
        .await
        .unwrap();
    let chunks: Vec<Bytes> = stream.try_collect().await.unwrap();
    let out: Vec<u8> = chunks.concat();
    assert_eq!(String::from_utf8(out).unwrap(), data);
    // A 20 MB value both ways.
    let big = "x".repeat(20 << 20);
    let row = client
        .query_one("SELECT length($1::text), $1::text", &[&big])
        .await
        .unwrap();
    assert_eq!(row.get::<_, i32>(0), 20 << 20);
    assert_eq!(row.get::<_, &str>(1).len(), 20 << 20);
    let rows = simple_rows(
        &client
            .simple_query("SELECT repeat('y', 5000000)")
            .await
            .unwrap(),
    );
    assert_eq!(rows[0][0].len(), 5_000_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_notify_works_in_session_mode_and_the_session_is_reset_after() {
    if !can_run_postgres("listen_notify_works_in_session_mode_and_the_session_is_reset_after") {
        return;
    }
    use futures_util::StreamExt;
    let pg = cluster(false);
    let pooler = harness::start(harness::config(&pg, harness::pool(PoolMode::Session, 1))).await;
    let (client, mut connection) =
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
    client
        .batch_execute("LISTEN farol_test; SET application_name = 'dirty'")
        .await
        .unwrap();
    let pid = client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get::<_, i32>(0);
    pg.primary
        .psql("app", "NOTIFY farol_test, 'hello'")
        .unwrap();
    let payload = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(payload, "hello");
    drop(client);
    let _ = driver.await;
    // Same server connection (pool of one), reset by DISCARD ALL.
    let next = connect(pooler.addr).await;
    let row = next
        .query_one(
            "SELECT pg_backend_pid(), current_setting('application_name')",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i32>(0), pid);
    assert_eq!(row.get::<_, &str>(1), "farol");
    let listening = next
        .query_one("SELECT count(*) FROM pg_listening_channels()", &[])
        .await
        .unwrap();
    assert_eq!(listening.get::<_, i64>(0), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_requests_reach_the_server_running_the_query() {
    if !can_run_postgres("cancel_requests_reach_the_server_running_the_query") {
        return;
    }
    let pg = cluster(false);
    let pooler = harness::start(harness::config(
        &pg,
        harness::pool(PoolMode::Transaction, 2),
    ))
    .await;
    let client = connect(pooler.addr).await;
    let token = client.cancel_token();
    let started = Instant::now();
    let query = tokio::spawn(async move {
        client
            .simple_query("SELECT pg_sleep(30)")
            .await
            .map(|_| client)
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    token.cancel_query(tokio_postgres::NoTls).await.unwrap();
    let error = harness::failed(query.await.unwrap(), "cancelled");
    assert_eq!(sqlstate(&error), "57014");
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scram_and_md5_clients_authenticate_and_wrong_passwords_get_28p01() {
    if !can_run_postgres("scram_and_md5_clients_authenticate_and_wrong_passwords_get_28p01") {
        return;
    }
    let pg = cluster(false);
    let pooler = harness::start(harness::config(
        &pg,
        harness::pool(PoolMode::Transaction, 2),
    ))
    .await;
    for (user, password) in [
        ("app", harness::APP_PASSWORD),
        ("app_md5", harness::MD5_PASSWORD),
        // The server wants SCRAM from the pooler for this one.
        ("app_scram", harness::APP_PASSWORD),
    ] {
        let client = connect_as(pooler.addr, user, password).await.unwrap();
        let row = client
            .query_one("SELECT current_user::text", &[])
            .await
            .unwrap();
        assert_eq!(row.get::<_, &str>(0), user);
        let error = harness::failed(connect_as(pooler.addr, user, "wrong").await, "refused");
        assert_eq!(sqlstate(&error), "28P01", "{user}");
    }
    let error = harness::failed(connect_as(pooler.addr, "nobody", "x").await, "refused");
    assert_eq!(sqlstate(&error), "28P01");
    let mut config = harness::client_config(pooler.addr, "app", harness::APP_PASSWORD);
    config.dbname("other");
    let error = harness::failed(config.connect(tokio_postgres::NoTls).await, "refused");
    assert_eq!(sqlstate(&error), "3D000");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_connects_with_ssl_preferred_and_pgbench_runs_prepared_in_transaction_mode() {
    if !can_run_postgres(
        "psql_connects_with_ssl_preferred_and_pgbench_runs_prepared_in_transaction_mode",
    ) {
        return;
    }
    let pg = cluster(false);
    let pooler = harness::start(harness::config(
        &pg,
        harness::pool(PoolMode::Transaction, 4),
    ))
    .await;
    let port = pooler.addr.port().to_string();
    let run = |program: &str, args: Vec<String>| {
        let program = program.to_owned();
        async move {
            tokio::process::Command::new(&program)
                .args(&args)
                .env("PGPASSWORD", harness::APP_PASSWORD)
                .env("PGSSLMODE", "prefer")
                .output()
                .await
                .unwrap()
        }
    };
    let out = run(
        "psql",
        [
            "-X",
            "-A",
            "-t",
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-U",
            "app",
            "-d",
            "app",
            "-c",
            "SELECT 40 + 2",
        ]
        .map(String::from)
        .to_vec(),
    )
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "42");
    let pgbench = |extra: &[&str]| {
        let mut args: Vec<String> = ["-h", "127.0.0.1", "-p", &port, "-U", "app"]
            .map(String::from)
            .to_vec();
        args.extend(extra.iter().map(|s| s.to_string()));
        args.push("app".into());
        run("pgbench", args)
    };
    // -i goes through the pooler too (COPY, DDL).
    let out = pgbench(&["-i", "-s", "1", "-q"]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for mode in ["simple", "extended", "prepared"] {
        let out = pgbench(&["-M", mode, "-c", "8", "-j", "2", "-t", "200", "-S"]).await;
        let stdout = harness::pgbench_succeeded(&out, mode);
        assert!(
            stdout.contains("number of transactions actually processed: 1600/1600"),
            "{mode}: {stdout}"
        );
    }
    let out = pgbench(&["-M", "prepared", "-c", "4", "-j", "2", "-t", "50"]).await;
    assert!(
        out.status.success(),
        "tpcb: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_console_shows_pools_clients_servers_and_stats() {
    if !can_run_postgres("admin_console_shows_pools_clients_servers_and_stats") {
        return;
    }
    let pg = cluster(false);
    let pooler = harness::start(harness::config(
        &pg,
        harness::pool(PoolMode::Transaction, 2),
    ))
    .await;
    let client = connect(pooler.addr).await;
    client.simple_query("SELECT 1").await.unwrap();
    let mut config = harness::client_config(pooler.addr, "app", harness::APP_PASSWORD);
    config.dbname("farol");
    let (admin, connection) = config.connect(tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    let pools = simple_rows(&admin.simple_query("SHOW POOLS").await.unwrap());
    assert_eq!(pools.len(), 1);
    assert_eq!(pools[0][0], "app");
    assert_eq!(pools[0][3], "transaction");
    let clients = simple_rows(&admin.simple_query("SHOW CLIENTS").await.unwrap());
    assert_eq!(
        clients.len(),
        2,
        "the app client and the admin client: {clients:?}"
    );
    let servers = simple_rows(&admin.simple_query("show servers;").await.unwrap());
    assert_eq!(servers[0][5], "1");
    let stats = simple_rows(&admin.simple_query("SHOW STATS").await.unwrap());
    assert!(stats[0][2].parse::<u64>().unwrap() >= 1);
    let error = admin.simple_query("DROP TABLE x").await.unwrap_err();
    assert_eq!(sqlstate(&error), "42601");
    // A stats user sees the figures too; a user in neither list is
    // refused after a correct password, and a wrong one is still 28P01.
    let mut stats_config = harness::client_config(pooler.addr, "app_scram", harness::APP_PASSWORD);
    stats_config.dbname("farol");
    let (stats_admin, connection) = stats_config.connect(tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    assert_eq!(
        simple_rows(&stats_admin.simple_query("SHOW POOLS").await.unwrap()).len(),
        1
    );
    // ... but may not pause the pooler.
    let error = stats_admin.simple_query("PAUSE").await.unwrap_err();
    assert_eq!(sqlstate(&error), "42501");
    let mut outsider = harness::client_config(pooler.addr, "app_md5", harness::MD5_PASSWORD);
    outsider.dbname("farol");
    let error = harness::failed(
        outsider.connect(tokio_postgres::NoTls).await,
        "a user in neither list",
    );
    assert_eq!(sqlstate(&error), "28000", "{error}");
    let message = error
        .as_db_error()
        .map(|e| e.message().to_owned())
        .unwrap_or_default();
    assert!(message.contains("pooler.admin_users"), "{message}");
    outsider.password("wrong");
    let error = harness::failed(
        outsider.connect(tokio_postgres::NoTls).await,
        "wrong password",
    );
    assert_eq!(sqlstate(&error), "28P01", "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_on_this_host_is_reached_through_its_unix_socket_when_configured() {
    if !can_run_postgres("a_server_on_this_host_is_reached_through_its_unix_socket_when_configured")
    {
        return;
    }
    let pg = cluster(false);
    let mut config = harness::config(&pg, harness::pool(PoolMode::Transaction, 2));
    // The test server keeps its socket in its data directory.
    config.unix_socket_dir = Some(pg.primary.data.clone());
    let pooler = harness::start(config).await;
    let client = connect(pooler.addr).await;
    // inet_server_port() is NULL on a Unix-socket connection.
    let rows = simple_rows(
        &client
            .simple_query("SELECT coalesce(inet_server_port()::text, 'unix'), pg_is_in_recovery()")
            .await
            .unwrap(),
    );
    assert_eq!(rows, vec![vec!["unix".to_owned(), "f".to_owned()]]);
    let row = client
        .query_one("SELECT $1::int * 2", &[&21i32])
        .await
        .unwrap();
    assert_eq!(row.get::<_, i32>(0), 42);
    // Cancel requests take the same way to the server.
    let token = client.cancel_token();
    let query = tokio::spawn(async move { client.simple_query("SELECT pg_sleep(30)").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    token.cancel_query(tokio_postgres::NoTls).await.unwrap();
    let error = query.await.unwrap().unwrap_err();
    assert_eq!(sqlstate(&error), "57014");
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_on_this_node_come_in_through_the_listen_socket() {
    if !can_run_postgres("clients_on_this_node_come_in_through_the_listen_socket") {
        return;
    }
    let pg = cluster(false);
    let dir = std::env::temp_dir().join(format!("farol-pooler-socket-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    struct RemoveDir(std::path::PathBuf);
    impl Drop for RemoveDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _dir = RemoveDir(dir.clone());
    let mut config = harness::config(&pg, harness::pool(PoolMode::Transaction, 2));
    config.listen_socket_dir = Some(dir.clone());
    let pooler = harness::start(config).await;
    let port = pooler.addr.port();
    let path = dir.join(format!(".s.PGSQL.{port}"));
    // The pooler's task binds it as it starts.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !path.exists() {
        assert!(Instant::now() < deadline, "{} never bound", path.display());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // libpq's host=DIR: the same login (SCRAM), the same pool.
    let local = |database: &str| {
        let mut config = tokio_postgres::Config::new();
        config
            .host_path(&dir)
            .port(port)
            .user("app")
            .password(harness::APP_PASSWORD)
            .dbname(database)
            .connect_timeout(Duration::from_secs(10));
        config
    };
    let (client, connection) = local("app").connect(tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    let row = client
        .query_one("SELECT $1::int + 1, pg_is_in_recovery()", &[&41i32])
        .await
        .unwrap();
    assert_eq!(row.get::<_, i32>(0), 42);
    assert!(!row.get::<_, bool>(1));

    // The console lists it as a local client.
    let (admin, connection) = local("farol").connect(tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    let clients = simple_rows(&admin.simple_query("SHOW CLIENTS").await.unwrap());
    assert_eq!(
        clients.iter().filter(|row| row[2] == "unix").count(),
        2,
        "the app client and the console: {clients:?}"
    );

    // A cancel request comes the same way.
    let token = client.cancel_token();
    let query = tokio::spawn(async move { client.simple_query("SELECT pg_sleep(30)").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    token.cancel_query(tokio_postgres::NoTls).await.unwrap();
    let error = query.await.unwrap().unwrap_err();
    assert_eq!(sqlstate(&error), "57014", "{error}");

    drop(admin);
    drop(pooler);
    let deadline = Instant::now() + Duration::from_secs(5);
    while path.exists() {
        assert!(
            Instant::now() < deadline,
            "the socket file outlived the pooler"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
