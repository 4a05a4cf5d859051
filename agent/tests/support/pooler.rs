//! The pooler's test harness: a shared real PostgreSQL (started once per
//! test binary, stopped when the last test using it ends) and an in-process
//! pooler per test on its own port.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex, Weak},
    time::Duration,
};

use farol_agent::{
    config::{PoolConfig, PoolMode, PoolerConfig, PoolerUser},
    pooler::{self, auth, Pooler},
};
use tokio::sync::watch;
use xtask::postgres::PgCluster;

pub(crate) const APP_PASSWORD: &str = "app-pw";
pub(crate) const MD5_PASSWORD: &str = "md5-pw";
pub(crate) const SERVER_PASSWORD: &str = "server-pw";

/// True when the test may run PostgreSQL (needs root to switch to the
/// `postgres` user). Skips with a reason otherwise, or fails under
/// FAROL_TEST_REQUIRE_PRIVILEGES.
pub(crate) fn can_run_postgres(test: &str) -> bool {
    let why = if !xtask::is_root() {
        Some("needs root (runs PostgreSQL as the postgres user)")
    } else if !std::path::Path::new(xtask::postgres::PG_BIN)
        .join("postgres")
        .exists()
    {
        Some("PostgreSQL 15 is not installed (cargo xtask setup)")
    } else {
        None
    };
    super::may_run(test, why)
}

static CLUSTERS: Mutex<[Option<Weak<PgCluster>>; 2]> = Mutex::new([None, None]);

/// The binary's PostgreSQL (with a standby when asked), shared by the
/// tests that run at the same time.
pub(crate) fn cluster(standby: bool) -> Arc<PgCluster> {
    let mut clusters = CLUSTERS.lock().unwrap_or_else(|p| p.into_inner());
    let slot = &mut clusters[usize::from(standby)];
    if let Some(cluster) = slot.as_ref().and_then(Weak::upgrade) {
        return cluster;
    }
    let cluster = private_cluster(standby);
    let cluster = Arc::new(cluster);
    *slot = Some(Arc::downgrade(&cluster));
    cluster
}

/// A PostgreSQL of the test's own (for tests that break it), with the
/// roles and database the pooler tests use.
pub(crate) fn private_cluster(standby: bool) -> PgCluster {
    let cluster = PgCluster::start("pooler", standby).expect("start PostgreSQL");
    cluster
        .primary
        .psql(
            "postgres",
            &format!(
                "CREATE ROLE app LOGIN; CREATE ROLE app_md5 LOGIN; \
                 CREATE ROLE app_scram LOGIN PASSWORD '{SERVER_PASSWORD}' IN ROLE scram_users;"
            ),
        )
        .expect("create roles");
    cluster
        .primary
        .psql("postgres", "CREATE DATABASE app OWNER app")
        .expect("create database");
    cluster
        .primary
        .psql("app", "GRANT ALL ON SCHEMA public TO PUBLIC")
        .expect("grant");
    cluster.wait_standby_caught_up().expect("standby caught up");
    cluster
}

pub(crate) fn pool(mode: PoolMode, pool_size: usize) -> PoolConfig {
    PoolConfig {
        database: "app".into(),
        user: String::new(),
        mode,
        pool_size,
        min_idle: 0,
        query_wait_timeout: Duration::from_secs(10),
        idle_timeout: Duration::from_secs(60),
        server_lifetime: Duration::from_secs(600),
    }
}

pub(crate) fn config(cluster: &PgCluster, pool: PoolConfig) -> PoolerConfig {
    PoolerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        primary: SocketAddr::from(([127, 0, 0, 1], cluster.primary.port)),
        standbys: cluster
            .standby
            .iter()
            .map(|s| SocketAddr::from(([127, 0, 0, 1], s.port)))
            .collect(),
        max_client_conn: 100,
        admin_database: "farol".into(),
        admin_users: vec!["app".into()],
        stats_users: vec!["app_scram".into()],
        users: vec![
            PoolerUser {
                name: "app".into(),
                secret: auth::scram_secret(APP_PASSWORD),
                server_password: None,
            },
            PoolerUser {
                name: "app_md5".into(),
                secret: auth::md5_secret("app_md5", MD5_PASSWORD),
                server_password: None,
            },
            PoolerUser {
                name: "app_scram".into(),
                secret: auth::scram_secret(APP_PASSWORD),
                server_password: Some(SERVER_PASSWORD.into()),
            },
        ],
        pools: vec![pool],
        read_write_split: false,
        read_your_writes: true,
        primary_functions: Vec::new(),
        tls_cert: None,
        tls_key: None,
        // Tests that move the primary by hand must not be overruled;
        // pooler_failover turns the checks on.
        role_check_interval: Duration::ZERO,
        role_check_user: None,
        role_check_database: "postgres".into(),
        max_standby_lag_bytes: None,
        auth_user: None,
        auth_query: None,
        auth_database: None,
        auth_cache_ttl: Duration::from_secs(60),
        unix_socket_dir: None,
        listen_socket_dir: None,
        pause_wait_timeout: Duration::from_secs(15),
        pause_drain_timeout: Duration::from_secs(5),
        kernel_relay: false,
    }
}

/// A pooler running in this test's runtime; stops on drop.
pub(crate) struct PoolerGuard {
    pub(crate) addr: SocketAddr,
    pub(crate) pooler: Arc<Pooler>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for PoolerGuard {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        self.task.abort();
    }
}

pub(crate) async fn start(config: PoolerConfig) -> PoolerGuard {
    // FAROL_LOG=debug shows the pooler's logs with the test's output.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_env("FAROL_LOG"))
        .with_test_writer()
        .try_init();
    let listener = pooler::bind(config.listen).await.expect("bind pooler");
    let addr = listener.local_addr().unwrap();
    let pooler = Pooler::new(config).expect("pooler config");
    let (stop, stop_rx) = watch::channel(false);
    let task = tokio::spawn({
        let pooler = pooler.clone();
        async move {
            pooler::run(pooler, listener, stop_rx)
                .await
                .expect("pooler runs");
        }
    });
    PoolerGuard {
        addr,
        pooler,
        stop,
        task,
    }
}

pub(crate) fn client_config(
    addr: SocketAddr,
    user: &str,
    password: &str,
) -> tokio_postgres::Config {
    let mut config = tokio_postgres::Config::new();
    config
        .host("127.0.0.1")
        .port(addr.port())
        .user(user)
        .password(password)
        .dbname("app")
        .connect_timeout(Duration::from_secs(10));
    config
}

/// Connects as `app` through the pooler.
pub(crate) async fn connect(addr: SocketAddr) -> tokio_postgres::Client {
    connect_as(addr, "app", APP_PASSWORD)
        .await
        .expect("connect through the pooler")
}

pub(crate) async fn connect_as(
    addr: SocketAddr,
    user: &str,
    password: &str,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, connection) = client_config(addr, user, password)
        .connect(tokio_postgres::NoTls)
        .await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// The SQLSTATE of an error, or a panic naming what was expected.
pub(crate) fn sqlstate(error: &tokio_postgres::Error) -> String {
    error
        .code()
        .map(|code| code.code().to_owned())
        .unwrap_or_else(|| format!("no SQLSTATE: {error}"))
}

/// The server's (or pooler's) message of a database error.
pub(crate) fn message(error: &tokio_postgres::Error) -> String {
    error
        .as_db_error()
        .map(|db| db.message().to_owned())
        .unwrap_or_else(|| error.to_string())
}

/// The error of a result that must have failed (clients are not `Debug`).
pub(crate) fn failed<T, E>(result: Result<T, E>, what: &str) -> E {
    match result {
        Ok(_) => panic!("expected an error: {what}"),
        Err(error) => error,
    }
}

/// The rows of a simple query's answer, every value as text ("" for NULL).
pub(crate) fn simple_rows(messages: &[tokio_postgres::SimpleQueryMessage]) -> Vec<Vec<String>> {
    messages
        .iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(row) => Some(
                (0..row.len())
                    .map(|i| row.get(i).unwrap_or("").to_owned())
                    .collect(),
            ),
            _ => None,
        })
        .collect()
}

/// pgbench's stdout, once asserted that it exited 0 and failed no
/// transaction (`what` names the run in the failure).
pub(crate) fn pgbench_succeeded(out: &std::process::Output, what: &str) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{what}: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("number of failed transactions: 0"),
        "{what}: {stdout}"
    );
    stdout
}

/// The value of one sample (`name{labels}`) of the pooler's `/metrics`.
pub(crate) fn metric(pooler: &PoolerGuard, sample: &str) -> u64 {
    let mut registry = prometheus_client::registry::Registry::default();
    farol_agent::metrics::register_pooler(&mut registry, pooler.pooler.clone());
    let text = farol_agent::metrics::encode_prometheus_text(&registry).unwrap();
    text.lines()
        .find_map(|line| line.strip_prefix(sample)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no {sample} in {text}"))
        .parse()
        .unwrap()
}
