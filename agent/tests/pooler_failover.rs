//! Failover routing with a real primary and streaming standby: the pooler's
//! role checks follow a promoted standby, end the sessions stuck on the old
//! primary with a clear error, and keep reads off a standby that lags.

mod support;

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use farol_agent::config::{PoolMode, PoolerConfig};
use support::pooler::{self as harness, can_run_postgres, connect};
use tokio_postgres::SimpleQueryMessage;
use xtask::postgres::{PgCluster, PgServer};

const WHERE: &str = "SELECT pg_is_in_recovery(), inet_server_port()";

fn following_config(pg: &PgCluster) -> PoolerConfig {
    let mut config = harness::config(pg, harness::pool(PoolMode::Transaction, 4));
    config.read_write_split = true;
    config.role_check_interval = Duration::from_millis(200);
    config
}

/// (in recovery, port) of where a read ran, or the error.
async fn where_read(client: &tokio_postgres::Client) -> Result<(bool, u16), tokio_postgres::Error> {
    let messages = client.simple_query(WHERE).await?;
    let row = messages
        .iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(row) => Some(row),
            _ => None,
        })
        .expect("a row");
    Ok((
        row.get(0) == Some("t"),
        row.get(1).unwrap().parse().unwrap(),
    ))
}

/// Polls `probe` every 100 ms until it is true or `within` passes.
async fn eventually<F, Fut>(within: Duration, mut probe: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if probe().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// A server's postmaster and every child of it, frozen with SIGSTOP as a
/// hung or cut-off host would be; thawed when dropped (also on panic), so
/// the harness can stop them.
struct Frozen(Vec<i32>);

impl Frozen {
    fn server(server: &PgServer) -> Frozen {
        let pid_file = std::fs::read_to_string(server.data.join("postmaster.pid")).unwrap();
        let postmaster: i32 = pid_file.lines().next().unwrap().trim().parse().unwrap();
        let mut pids = vec![postmaster];
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            // The fields after the command name, which may hold spaces.
            let after = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("");
            let parent = after.split_whitespace().nth(1).and_then(|p| p.parse().ok());
            if parent == Some(postmaster) {
                pids.push(pid);
            }
        }
        for &pid in &pids {
            // SAFETY: kill(2) on PIDs of the server this test started.
            unsafe { libc::kill(pid, libc::SIGSTOP) };
        }
        Frozen(pids)
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        for &pid in &self.0 {
            // SAFETY: as above.
            unsafe { libc::kill(pid, libc::SIGCONT) };
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_promoted_standby_takes_the_writes_and_a_session_stuck_on_the_old_primary_gets_an_error()
{
    if !can_run_postgres(
        "a_promoted_standby_takes_the_writes_and_a_session_stuck_on_the_old_primary_gets_an_error",
    ) {
        return;
    }
    let pg = harness::private_cluster(true);
    let primary = pg.primary.port;
    let standby = pg.standby.as_ref().unwrap();
    let standby_addr = SocketAddr::from(([127, 0, 0, 1], standby.port));
    pg.primary
        .psql(
            "app",
            "CREATE TABLE moved (id int PRIMARY KEY); GRANT ALL ON moved TO PUBLIC",
        )
        .unwrap();
    pg.wait_standby_caught_up().unwrap();
    let pooler = harness::start(following_config(&pg)).await;

    let reader = connect(pooler.addr).await;
    assert!(
        eventually(Duration::from_secs(5), || async {
            where_read(&reader).await.ok() == Some((true, standby.port))
        })
        .await,
        "reads go to the standby"
    );
    let stuck = connect(pooler.addr).await;
    stuck
        .simple_query("BEGIN; INSERT INTO moved VALUES (1)")
        .await
        .unwrap();

    // The primary hangs (a cut cable looks the same from here) while the
    // session waits on it for its next statement; then the standby is
    // promoted, as the pgha module or an operator would.
    let frozen = Frozen::server(&pg.primary);
    let pending = tokio::spawn(async move {
        stuck
            .simple_query("INSERT INTO moved VALUES (2)")
            .await
            .map(|_| ())
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let promoted_at = Instant::now();
    standby
        .psql("postgres", "SELECT pg_promote(true, 30)")
        .unwrap();

    // It hears why at once, not after TCP gives up.
    let error = tokio::time::timeout(Duration::from_secs(10), pending)
        .await
        .expect("the stuck session gets an answer within 10 s")
        .unwrap()
        .expect_err("its transaction cannot go on");
    let ended_after = promoted_at.elapsed();
    let db = error.as_db_error().expect("a server-style error");
    assert_eq!(db.code().code(), "57P01", "{db:?}");
    assert!(db.message().contains("primary moved"), "{db:?}");

    // New transactions go to the promoted standby and commit there.
    let writer = connect(pooler.addr).await;
    assert!(
        eventually(Duration::from_secs(10), || async {
            writer
                .simple_query("INSERT INTO moved VALUES (3)")
                .await
                .is_ok()
        })
        .await,
        "writes work again through the pooler"
    );
    let writes_back_after = promoted_at.elapsed();
    assert_eq!(where_read(&writer).await.unwrap(), (false, standby.port));
    assert_eq!(pooler.pooler.primary(), standby_addr);
    assert_eq!(pooler.pooler.primary_changes(), 1);
    // The uncommitted row never reached the standby; the committed one is there.
    assert_eq!(
        standby
            .psql("app", "SELECT array_agg(id ORDER BY id) FROM moved")
            .unwrap(),
        "{3}"
    );
    // A hung old primary takes no reads either.
    let fresh = connect(pooler.addr).await;
    assert_eq!(where_read(&fresh).await.unwrap(), (false, standby.port));
    assert_ne!(standby.port, primary);
    println!(
        "promotion to the stuck session's error: {ended_after:?}; to the first write through the pooler: {writes_back_after:?}"
    );
    drop(frozen);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_lagging_past_the_bound_gets_no_reads_until_it_catches_up() {
    if !can_run_postgres("a_standby_lagging_past_the_bound_gets_no_reads_until_it_catches_up") {
        return;
    }
    let pg = harness::private_cluster(true);
    let standby = pg.standby.as_ref().unwrap();
    let mut config = following_config(&pg);
    config.max_standby_lag_bytes = Some(1 << 20);
    let pooler = harness::start(config).await;
    let reader = connect(pooler.addr).await;
    assert!(
        eventually(Duration::from_secs(5), || async {
            where_read(&reader).await.ok() == Some((true, standby.port))
        })
        .await,
        "a caught-up standby takes reads"
    );

    standby
        .psql("postgres", "SELECT pg_wal_replay_pause()")
        .unwrap();
    pg.primary
        .psql(
            "app",
            "CREATE TABLE bulk AS SELECT g AS id, repeat('x', 500) AS pad FROM generate_series(1, 20000) g",
        )
        .unwrap();
    assert!(
        eventually(Duration::from_secs(5), || async {
            where_read(&reader).await.ok() == Some((false, pg.primary.port))
        })
        .await,
        "with replay paused past 1 MiB of WAL, reads go to the primary"
    );

    standby
        .psql("postgres", "SELECT pg_wal_replay_resume()")
        .unwrap();
    assert!(
        eventually(Duration::from_secs(10), || async {
            where_read(&reader).await.ok() == Some((true, standby.port))
        })
        .await,
        "caught up again, the standby takes reads again"
    );
}

async fn one_value(
    client: &tokio_postgres::Client,
    sql: &str,
) -> Result<String, tokio_postgres::Error> {
    let messages = client.simple_query(sql).await?;
    Ok(messages
        .iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(row) => row.get(0).map(str::to_owned),
            _ => None,
        })
        .expect("a row"))
}

/// A session pool with the split over `pg`, following promotions, and a
/// table `table` anyone may write.
async fn split_session_pooler(pg: &PgCluster, table: &str) -> harness::PoolerGuard {
    pg.primary
        .psql(
            "app",
            &format!("CREATE TABLE {table} (id int PRIMARY KEY); GRANT ALL ON {table} TO PUBLIC"),
        )
        .unwrap();
    let mut config = harness::config(pg, harness::pool(PoolMode::Session, 4));
    config.read_write_split = true;
    config.read_your_writes = true;
    config.role_check_interval = Duration::from_millis(200);
    harness::start(config).await
}

/// Promotes the standby and waits until the pooler sends writes there.
async fn promote_standby(pg: &PgCluster, pooler: &harness::PoolerGuard) {
    let standby = pg.standby.as_ref().unwrap();
    standby
        .psql("postgres", "SELECT pg_promote(true, 30)")
        .unwrap();
    let standby_addr = SocketAddr::from(([127, 0, 0, 1], standby.port));
    assert!(
        eventually(Duration::from_secs(10), || async {
            pooler.pooler.primary() == standby_addr
        })
        .await,
        "the pooler follows the promotion"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_split_session_follows_the_promoted_standby_with_its_settings() {
    if !can_run_postgres("an_idle_split_session_follows_the_promoted_standby_with_its_settings") {
        return;
    }
    let pg = harness::private_cluster(true);
    let standby = pg.standby.as_ref().unwrap();
    let pooler = split_session_pooler(&pg, "followed").await;

    // A session with a setting (quoted), reads on the standby, then a
    // write pins it to the primary; another one made a temporary table,
    // which only its primary connection has.
    let follower = connect(pooler.addr).await;
    follower
        .batch_execute("SET application_name = 'it''s following'")
        .await
        .unwrap();
    assert!(
        eventually(Duration::from_secs(5), || async {
            where_read(&follower).await.ok() == Some((true, standby.port))
        })
        .await,
        "reads go to the standby"
    );
    follower
        .batch_execute("INSERT INTO followed VALUES (1)")
        .await
        .unwrap();
    assert_eq!(
        where_read(&follower).await.unwrap(),
        (false, pg.primary.port)
    );
    let pinned = connect(pooler.addr).await;
    pinned
        .batch_execute("CREATE TEMP TABLE scratch (id int); INSERT INTO scratch VALUES (1)")
        .await
        .unwrap();
    pg.wait_standby_caught_up().unwrap();

    // The primary hangs while both sessions sit idle; the standby is
    // promoted.
    let frozen = Frozen::server(&pg.primary);
    promote_standby(&pg, &pooler).await;

    // The first session goes on there, its setting with it.
    let started = Instant::now();
    assert_eq!(
        one_value(&follower, "SHOW application_name").await.unwrap(),
        "it's following"
    );
    assert_eq!(where_read(&follower).await.unwrap(), (false, standby.port));
    follower
        .batch_execute("INSERT INTO followed VALUES (2)")
        .await
        .unwrap();
    assert_eq!(
        one_value(
            &follower,
            "SELECT array_agg(id ORDER BY id)::text FROM followed"
        )
        .await
        .unwrap(),
        "{1,2}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(
        harness::metric(
            &pooler,
            "farol_pooler_split_sessions_followed_primary_total"
        ),
        1
    );
    // The temporary table cannot follow: that session hears why.
    let error = pinned
        .simple_query("SELECT count(*) FROM scratch")
        .await
        .expect_err("its temporary table is on the old primary");
    if let Some(db) = error.as_db_error() {
        assert_eq!(db.code().code(), "57P01", "{db:?}");
        assert!(db.message().contains("primary moved"), "{db:?}");
    } else {
        assert!(pinned.is_closed(), "{error}");
    }
    drop(frozen);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_split_session_outlives_its_primary_dying_and_goes_on_on_the_promoted_standby() {
    if !can_run_postgres(
        "an_idle_split_session_outlives_its_primary_dying_and_goes_on_on_the_promoted_standby",
    ) {
        return;
    }
    let mut pg = harness::private_cluster(true);
    let standby_port = pg.standby.as_ref().unwrap().port;
    let pooler = split_session_pooler(&pg, "survived").await;
    let session = connect(pooler.addr).await;
    // As psql sends them: one statement at a time.
    for statement in [
        "SET application_name = 'outlives'",
        "INSERT INTO survived VALUES (1)",
    ] {
        session.batch_execute(statement).await.unwrap();
    }
    assert_eq!(
        where_read(&session).await.unwrap(),
        (false, pg.primary.port)
    );
    pg.wait_standby_caught_up().unwrap();
    assert_eq!(
        pg.standby
            .as_ref()
            .unwrap()
            .psql("app", "SELECT array_agg(id) FROM survived")
            .unwrap(),
        "{1}",
        "the standby has the committed row before the primary dies"
    );

    // The primary's postmaster dies while the session sits idle on its
    // connection there: the backend says FATAL and closes.
    pg.primary.kill();
    assert!(
        eventually(Duration::from_secs(10), || async {
            harness::metric(&pooler, "farol_pooler_split_idle_connections_lost_total") == 1
        })
        .await,
        "the pooler lets the idle connection go: {} lost, client closed: {}",
        harness::metric(&pooler, "farol_pooler_split_idle_connections_lost_total"),
        session.is_closed()
    );
    assert!(!session.is_closed(), "the client's session is still open");
    promote_standby(&pg, &pooler).await;
    assert_eq!(
        one_value(&session, "SHOW application_name").await.unwrap(),
        "outlives"
    );
    session
        .batch_execute("INSERT INTO survived VALUES (2)")
        .await
        .unwrap();
    assert_eq!(where_read(&session).await.unwrap(), (false, standby_port));
    assert_eq!(
        one_value(
            &session,
            "SELECT array_agg(id ORDER BY id)::text FROM survived"
        )
        .await
        .unwrap(),
        "{1,2}"
    );
}
