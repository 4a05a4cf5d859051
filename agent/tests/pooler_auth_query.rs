//! `auth_user` / `auth_query` with a real PostgreSQL 15: users that are not
//! in `pooler.users` log in with the secret the server holds (SCRAM and
//! md5, users created by the test), and the pooler logs in to the server
//! as them without their password (pg_hba demands SCRAM or md5 of them);
//! unknown users, users without a password and a broken lookup are refused
//! with the right SQLSTATE, at once.

mod support;

use std::time::{Duration, Instant};

use farol_agent::{
    config::{PoolMode, PoolerUser},
    pooler::auth,
};
use support::pooler::{
    self as harness, can_run_postgres, connect_as, failed, message, sqlstate, SERVER_PASSWORD,
};

const AUTH_USER: &str = "farol_auth";
/// pg_hba of the test's cluster: SCRAM for `scram_users`, md5 for
/// `md5_users`, trust for the rest (the harness's roles).
const HBA: &str = "local all all trust\n\
    host all +scram_users 127.0.0.1/32 scram-sha-256\n\
    host all +md5_users 127.0.0.1/32 md5\n\
    host all all 127.0.0.1/32 trust\n\
    host replication all 127.0.0.1/32 trust\n";

/// Logs in as `user` through the pooler and answers who the server says
/// is logged in.
async fn whoami(
    addr: std::net::SocketAddr,
    user: &str,
    password: &str,
) -> Result<String, tokio_postgres::Error> {
    let client = connect_as(addr, user, password).await?;
    let row = client.query_one("SELECT current_user::text", &[]).await?;
    Ok(row.get(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_the_server_knows_log_in_with_scram_and_md5_through_auth_query() {
    if !can_run_postgres("users_the_server_knows_log_in_with_scram_and_md5_through_auth_query") {
        return;
    }
    let pg = harness::private_cluster(false);
    std::fs::write(pg.primary.data.join("pg_hba.conf"), HBA).unwrap();
    pg.primary
        .psql(
            "postgres",
            &format!(
                "SELECT pg_reload_conf(); CREATE ROLE md5_users NOLOGIN; \
                 CREATE ROLE {AUTH_USER} LOGIN SUPERUSER PASSWORD '{SERVER_PASSWORD}' IN ROLE scram_users; \
                 CREATE ROLE lookup_scram LOGIN PASSWORD 'scram-pw' IN ROLE scram_users; \
                 SET password_encryption = 'md5'; \
                 CREATE ROLE lookup_md5 LOGIN PASSWORD 'md5-pw' IN ROLE md5_users; \
                 CREATE ROLE no_password LOGIN IN ROLE scram_users;"
            ),
        )
        .unwrap();
    let secrets = pg
        .primary
        .psql(
            "postgres",
            "SELECT string_agg(usename || '=' || left(passwd, 3), ',' ORDER BY usename) \
             FROM pg_shadow WHERE usename LIKE 'lookup_%'",
        )
        .unwrap();
    assert_eq!(secrets, "lookup_md5=md5,lookup_scram=SCR");

    let mut config = harness::config(&pg, harness::pool(PoolMode::Transaction, 2));
    config.users.push(PoolerUser {
        name: AUTH_USER.into(),
        secret: auth::scram_secret("unused"),
        server_password: Some(SERVER_PASSWORD.into()),
    });
    config.auth_user = Some(AUTH_USER.into());
    let pooler = harness::start(config).await;

    // SCRAM: the pooler logs in to the server with the ClientKey from the
    // client's proof (pg_hba demands scram-sha-256 of lookup_scram).
    assert_eq!(
        whoami(pooler.addr, "lookup_scram", "scram-pw")
            .await
            .unwrap(),
        "lookup_scram"
    );
    // md5: the md5 secret answers the server's md5 challenge.
    assert_eq!(
        whoami(pooler.addr, "lookup_md5", "md5-pw").await.unwrap(),
        "lookup_md5"
    );
    // Two clients at once in transaction mode: two server connections,
    // both logged in without the password; prepared statements work.
    let one = connect_as(pooler.addr, "lookup_scram", "scram-pw")
        .await
        .unwrap();
    let two = connect_as(pooler.addr, "lookup_scram", "scram-pw")
        .await
        .unwrap();
    let (a, b) = tokio::join!(
        one.query_one("SELECT pg_backend_pid(), pg_sleep(0.3)::text", &[]),
        two.query_one("SELECT pg_backend_pid(), pg_sleep(0.3)::text", &[]),
    );
    assert_ne!(
        a.unwrap().get::<_, i32>(0),
        b.unwrap().get::<_, i32>(0),
        "two server connections"
    );
    let lookups = pooler.pooler.auth_query_lookups();
    assert_eq!(lookups, 2, "one lookup per user, then the cache");
    assert!(pooler.pooler.auth_query_cache_hits() >= 2);

    // Wrong password, unknown user, a user without password: 28P01, at
    // once, and the same message for all three.
    for (user, password) in [
        ("lookup_scram", "wrong"),
        ("lookup_md5", "wrong"),
        ("ghost", "whatever"),
        ("no_password", "whatever"),
    ] {
        let started = Instant::now();
        let error = failed(connect_as(pooler.addr, user, password).await, user);
        assert_eq!(sqlstate(&error), "28P01", "{user}: {error}");
        assert_eq!(
            message(&error),
            format!("password authentication failed for user \"{user}\"")
        );
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{user}: no hang"
        );
    }

    // A password changed on the server: the cached secret is forgotten
    // after a failed login, so the new password works on the next try at
    // the latest, and the old one no longer does.
    pg.primary
        .psql("postgres", "ALTER ROLE lookup_scram PASSWORD 'new-pw'")
        .unwrap();
    let mut logged_in = false;
    for _ in 0..2 {
        if let Ok(user) = whoami(pooler.addr, "lookup_scram", "new-pw").await {
            assert_eq!(user, "lookup_scram");
            logged_in = true;
            break;
        }
    }
    assert!(
        logged_in,
        "the new password works after at most one failure"
    );
    let error = failed(
        connect_as(pooler.addr, "lookup_scram", "scram-pw").await,
        "old password",
    );
    assert_eq!(sqlstate(&error), "28P01");
    // The pool logs in with the new keys: new server connections too.
    let clients = [
        connect_as(pooler.addr, "lookup_scram", "new-pw")
            .await
            .unwrap(),
        connect_as(pooler.addr, "lookup_scram", "new-pw")
            .await
            .unwrap(),
    ];
    for client in &clients {
        let row = client
            .query_one("SELECT current_user::text", &[])
            .await
            .unwrap();
        assert_eq!(row.get::<_, String>(0), "lookup_scram");
    }
    assert_eq!(pooler.pooler.auth_query_failures(), 0);
    drop(pooler);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_lookup_is_refused_with_the_reason_not_a_hang() {
    if !can_run_postgres("a_broken_lookup_is_refused_with_the_reason_not_a_hang") {
        return;
    }
    let pg = harness::cluster(false);
    // The auth_user's server password is wrong: the server refuses it.
    let mut config = harness::config(&pg, harness::pool(PoolMode::Transaction, 2));
    config.users[2].server_password = Some("not-the-password".into());
    config.auth_user = Some("app_scram".into());
    let pooler = harness::start(config.clone()).await;
    let started = Instant::now();
    let error = failed(
        connect_as(pooler.addr, "someone", "pw").await,
        "auth_user refused",
    );
    assert_eq!(sqlstate(&error), "28000", "{error}");
    let text = message(&error);
    assert!(
        text.contains("cannot check the password of user \"someone\"")
            && text.contains("auth_user \"app_scram\""),
        "{text}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(pooler.pooler.auth_query_failures(), 1);
    // Listed users are not affected.
    harness::connect(pooler.addr).await;
    drop(pooler);

    // A query that is not (user, secret): 28000 with the server's reason.
    config.users[2].server_password = Some(SERVER_PASSWORD.into());
    config.auth_query = Some("SELECT $1::text".into());
    let pooler = harness::start(config.clone()).await;
    let error = failed(connect_as(pooler.addr, "someone", "pw").await, "bad query");
    assert_eq!(sqlstate(&error), "28000", "{error}");
    drop(pooler);

    // The server is gone: 08006 at once.
    config.auth_query = None;
    config.primary = format!("127.0.0.1:{}", xtask::postgres::free_port().unwrap())
        .parse()
        .unwrap();
    let pooler = harness::start(config).await;
    for _ in 0..2 {
        let started = Instant::now();
        let error = failed(connect_as(pooler.addr, "someone", "pw").await, "no server");
        assert_eq!(sqlstate(&error), "08006", "{error}");
        assert!(started.elapsed() < Duration::from_secs(7));
    }
    assert_eq!(
        pooler.pooler.auth_query_lookups(),
        2,
        "failures are not cached as answers"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_reachable_only_through_its_unix_socket_serves_lookups_logins_and_role_checks() {
    if !can_run_postgres(
        "a_server_reachable_only_through_its_unix_socket_serves_lookups_logins_and_role_checks",
    ) {
        return;
    }
    let pg = harness::private_cluster(false);
    pg.primary
        .psql(
            "postgres",
            &format!(
                "CREATE ROLE {AUTH_USER} LOGIN SUPERUSER PASSWORD '{SERVER_PASSWORD}'; \
                 CREATE ROLE lookup_unix LOGIN PASSWORD 'unix-pw';"
            ),
        )
        .unwrap();
    // Every TCP login is refused from now on (psql included): whatever
    // still works below went through the socket.
    std::fs::write(
        pg.primary.data.join("pg_hba.conf"),
        "local all all trust\nhost all all 0.0.0.0/0 reject\n",
    )
    .unwrap();
    pg.primary
        .psql("postgres", "SELECT pg_reload_conf()")
        .unwrap();
    let refused = Instant::now() + Duration::from_secs(10);
    while pg.primary.psql("postgres", "SELECT 1").is_ok() {
        assert!(Instant::now() < refused, "pg_hba reload not applied");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let mut config = harness::config(&pg, harness::pool(PoolMode::Transaction, 2));
    config.users.insert(
        0,
        PoolerUser {
            name: AUTH_USER.into(),
            secret: auth::scram_secret("admin-pw"),
            server_password: Some(SERVER_PASSWORD.into()),
        },
    );
    config.auth_user = Some(AUTH_USER.into());
    config.unix_socket_dir = Some(pg.primary.data.clone());
    config.role_check_interval = Duration::from_millis(100);
    let pooler = harness::start(config).await;

    // auth_query, then the server login of a user it found.
    assert_eq!(
        whoami(pooler.addr, "lookup_unix", "unix-pw").await.unwrap(),
        "lookup_unix"
    );
    assert_eq!(pooler.pooler.auth_query_lookups(), 1);
    assert_eq!(pooler.pooler.auth_query_failures(), 0);

    // The role checks' kept connection (the first listed user's) is on the
    // socket too: client_addr is NULL for a Unix-socket session.
    let admin = connect_as(pooler.addr, AUTH_USER, "admin-pw")
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let row = admin
            .query_one(
                "SELECT count(*) FILTER (WHERE client_addr IS NULL), count(*) \
                 FROM pg_stat_activity WHERE application_name = 'farol-pooler-role-check'",
                &[],
            )
            .await
            .unwrap();
        let (on_socket, all): (i64, i64) = (row.get(0), row.get(1));
        if all > 0 {
            assert_eq!(on_socket, all, "every role check on the socket");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no role-check session on the server"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_console_user_the_server_knows_logs_in_through_auth_query_with_its_rights() {
    if !can_run_postgres(
        "a_console_user_the_server_knows_logs_in_through_auth_query_with_its_rights",
    ) {
        return;
    }
    let pg = harness::private_cluster(false);
    pg.primary
        .psql(
            "postgres",
            &format!(
                "CREATE ROLE {AUTH_USER} LOGIN SUPERUSER PASSWORD '{SERVER_PASSWORD}'; \
                 CREATE ROLE monitor LOGIN PASSWORD 'monitor-pw'; \
                 CREATE ROLE bystander LOGIN PASSWORD 'bystander-pw';"
            ),
        )
        .unwrap();
    let mut config = harness::config(&pg, harness::pool(PoolMode::Transaction, 2));
    config.users.push(PoolerUser {
        name: AUTH_USER.into(),
        secret: auth::scram_secret("unused"),
        server_password: Some(SERVER_PASSWORD.into()),
    });
    config.auth_user = Some(AUTH_USER.into());
    config.stats_users.push("monitor".into());
    let pooler = harness::start(config).await;
    let console = |user: &str, password: &str| {
        let mut config = harness::client_config(pooler.addr, user, password);
        config.dbname("farol");
        config
    };

    // A stats user found by auth_query (the console's database is the
    // pooler's own: the lookup runs in the role checks' database).
    let app = connect_as(pooler.addr, "app", harness::APP_PASSWORD)
        .await
        .unwrap();
    app.simple_query("SELECT 1").await.unwrap();
    let (monitor, connection) = console("monitor", "monitor-pw")
        .connect(tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let pools = monitor.simple_query("SHOW POOLS").await.unwrap();
    assert!(
        pools
            .iter()
            .any(|m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(_))),
        "SHOW POOLS lists the app's pool"
    );
    let error = monitor.simple_query("PAUSE").await.unwrap_err();
    assert_eq!(sqlstate(&error), "42501", "{error}");
    assert_eq!(pooler.pooler.auth_query_lookups(), 1);

    // Wrong password: 28P01. A server user in neither list: refused
    // before any lookup, as an unknown user.
    let error = failed(
        console("monitor", "wrong")
            .connect(tokio_postgres::NoTls)
            .await,
        "wrong password",
    );
    assert_eq!(sqlstate(&error), "28P01", "{error}");
    let error = failed(
        console("bystander", "bystander-pw")
            .connect(tokio_postgres::NoTls)
            .await,
        "a user in neither list",
    );
    assert_eq!(sqlstate(&error), "28P01", "{error}");
    assert_eq!(
        pooler.pooler.auth_query_lookups(),
        1,
        "no lookup for the unlisted user; the wrong password used the cache"
    );
}
