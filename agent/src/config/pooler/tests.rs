//! One test per `[pooler]` validation rule, in the style of `config/tests.rs`.

use std::{path::Path, time::Duration};

use crate::config::{Config, ConfigError, PoolMode, Problem};

const BASE: &str = r#"
[cluster]
name = "test"

[[node]]
name = "a"
address = "192.0.2.11/24"
interface = "eth0"

[pooler]
listen = "127.0.0.1:6432"
primary = "127.0.0.1:5432"
standbys = ["127.0.0.1:5433"]

[[pooler.users]]
name = "app"
secret = "md5a3556571e93b0d20722ba62be61e8c2d"

[[pooler.pools]]
database = "app"
"#;

fn load(text: &str) -> Result<Config, ConfigError> {
    Config::from_toml(Path::new("test.toml"), text)
}

fn assert_one_problem(text: &str, key: &str, fragment: &str) {
    let problems: Vec<String> = match load(text) {
        Ok(config) => panic!("expected an invalid config, got {config:#?}"),
        Err(error) => error.problems().iter().map(Problem::to_string).collect(),
    };
    assert!(
        problems
            .iter()
            .any(|p| p.starts_with(&format!("{key}: ")) && p.contains(fragment)),
        "expected a problem at {key} mentioning {fragment:?}, got {problems:#?}"
    );
}

#[test]
fn pooler_section_loads_with_defaults() {
    let config = load(BASE).expect("valid");
    let pooler = config.pooler.expect("pooler section");
    assert_eq!(pooler.max_client_conn, 1000);
    assert_eq!(pooler.admin_database, "farol");
    assert!(pooler.read_your_writes);
    let pool = pooler.pool("app", "app").expect("pool for every user");
    assert_eq!(pool.mode, PoolMode::Transaction);
    assert_eq!(pool.pool_size, 20);
    assert_eq!(pool.query_wait_timeout, Duration::from_secs(30));
    assert!(pooler.pool("other", "app").is_none());
}

#[test]
fn durations_are_humantime_strings() {
    let text = format!(
        "{BASE}query_wait_timeout = \"250ms\"\nidle_timeout = \"2m\"\nmode = \"session\"\n"
    );
    let config = load(&text).expect("valid");
    let pool = &config.pooler.unwrap().pools[0];
    assert_eq!(pool.query_wait_timeout, Duration::from_millis(250));
    assert_eq!(pool.idle_timeout, Duration::from_secs(120));
    assert_eq!(pool.mode, PoolMode::Session);
}

#[test]
fn config_without_pooler_has_none() {
    let text = BASE.split("[pooler]").next().unwrap();
    assert!(load(text).unwrap().pooler.is_none());
}

#[test]
fn unknown_pooler_key_is_refused_with_its_path() {
    let error = load(&format!("{BASE}pool_sise = 3\n"))
        .unwrap_err()
        .to_string();
    assert!(error.contains("pooler.pools[0]"), "{error}");
    assert!(error.contains("pool_sise"), "{error}");
}

#[test]
fn bad_duration_is_refused_with_its_path() {
    let error = load(&format!("{BASE}idle_timeout = \"soon\"\n"))
        .unwrap_err()
        .to_string();
    assert!(error.contains("pooler.pools[0].idle_timeout"), "{error}");
}

#[test]
fn max_client_conn_zero_is_refused() {
    let text = BASE.replace("standbys = [", "max_client_conn = 0\nstandbys = [");
    assert_one_problem(&text, "pooler.max_client_conn", "at least 1");
}

#[test]
fn empty_admin_database_is_refused() {
    let text = BASE.replace("standbys = [", "admin_database = \"\"\nstandbys = [");
    assert_one_problem(&text, "pooler.admin_database", "expected a database name");
}

#[test]
fn primary_listed_as_standby_is_refused() {
    let text = BASE.replace("127.0.0.1:5433", "127.0.0.1:5432");
    assert_one_problem(&text, "pooler.standbys", "also the primary");
}

#[test]
fn read_write_split_without_standbys_is_refused() {
    let text = BASE.replace("standbys = [\"127.0.0.1:5433\"]", "read_write_split = true");
    assert_one_problem(&text, "pooler.read_write_split", "pooler.standbys");
}

#[test]
fn duplicate_user_is_refused() {
    let text = format!(
        "{BASE}\n[[pooler.users]]\nname = \"app\"\nsecret = \"md5a3556571e93b0d20722ba62be61e8c2d\"\n"
    );
    assert_one_problem(&text, "pooler.users[1].name", "listed twice");
}

#[test]
fn empty_user_name_is_refused() {
    let text = BASE.replace("name = \"app\"", "name = \"\"");
    assert_one_problem(&text, "pooler.users[0].name", "expected a user name");
}

#[test]
fn plain_text_secret_is_refused() {
    let text = BASE.replace("md5a3556571e93b0d20722ba62be61e8c2d", "hunter2");
    assert_one_problem(&text, "pooler.users[0].secret", "SCRAM-SHA-256");
}

#[test]
fn empty_pool_database_is_refused() {
    let text = BASE.replace("database = \"app\"", "database = \"\"");
    assert_one_problem(
        &text,
        "pooler.pools[0].database",
        "expected a database name",
    );
}

#[test]
fn pool_on_the_admin_database_is_refused() {
    let text = BASE.replace("database = \"app\"", "database = \"farol\"");
    assert_one_problem(&text, "pooler.pools[0].database", "admin database");
}

#[test]
fn pool_for_an_unknown_user_is_refused() {
    let text = format!("{BASE}user = \"ghost\"\n");
    assert_one_problem(&text, "pooler.pools[0].user", "not in pooler.users");
}

#[test]
fn duplicate_pool_is_refused() {
    let text = format!("{BASE}\n[[pooler.pools]]\ndatabase = \"app\"\n");
    assert_one_problem(&text, "pooler.pools[1].database", "already defined");
}

#[test]
fn pool_size_zero_is_refused() {
    let text = format!("{BASE}pool_size = 0\n");
    assert_one_problem(&text, "pooler.pools[0].pool_size", "at least 1");
}

#[test]
fn min_idle_above_pool_size_is_refused() {
    let text = format!("{BASE}pool_size = 2\nmin_idle = 3\n");
    assert_one_problem(
        &text,
        "pooler.pools[0].min_idle",
        "must not exceed pool_size (2)",
    );
}

#[test]
fn zero_query_wait_timeout_is_refused() {
    let text = format!("{BASE}query_wait_timeout = \"0s\"\n");
    assert_one_problem(&text, "pooler.pools[0].query_wait_timeout", "positive");
}

#[test]
fn zero_server_lifetime_is_refused() {
    let text = format!("{BASE}server_lifetime = \"0s\"\n");
    assert_one_problem(&text, "pooler.pools[0].server_lifetime", "positive");
}

#[test]
fn tls_cert_without_key_is_refused() {
    let text = BASE.replace(
        "standbys = [",
        "tls_cert = \"/etc/farol/cert.pem\"\nstandbys = [",
    );
    assert_one_problem(&text, "pooler.tls_key", "key is needed");
}

#[test]
fn tls_key_without_cert_is_refused() {
    let text = BASE.replace(
        "standbys = [",
        "tls_key = \"/etc/farol/key.pem\"\nstandbys = [",
    );
    assert_one_problem(&text, "pooler.tls_cert", "certificate is needed");
}

#[test]
fn unix_socket_dir_must_be_absolute_and_short_enough_for_a_socket_path() {
    let with = |dir: &str| {
        BASE.replace(
            "standbys = [",
            &format!("unix_socket_dir = \"{dir}\"\nstandbys = ["),
        )
    };
    let pooler = load(&with("/var/run/postgresql")).unwrap().pooler.unwrap();
    assert_eq!(
        pooler.unix_socket_dir.as_deref(),
        Some(std::path::Path::new("/var/run/postgresql"))
    );
    assert_one_problem(
        &with("run/postgresql"),
        "pooler.unix_socket_dir",
        "absolute",
    );
    let long = format!("/{}", "d".repeat(100));
    assert_one_problem(&with(&long), "pooler.unix_socket_dir", "107 bytes");
}

#[test]
fn listen_socket_dir_follows_the_same_rule() {
    let with = |dir: &str| {
        BASE.replace(
            "standbys = [",
            &format!("listen_socket_dir = \"{dir}\"\nstandbys = ["),
        )
    };
    let pooler = load(&with("/var/run/farol")).unwrap().pooler.unwrap();
    assert_eq!(
        pooler.listen_socket_dir.as_deref(),
        Some(std::path::Path::new("/var/run/farol"))
    );
    assert_one_problem(&with("farol"), "pooler.listen_socket_dir", "absolute");
}

#[test]
fn admin_and_stats_users_must_be_pooler_users() {
    let text = BASE.replace(
        "standbys = [",
        "admin_users = [\"app\"]\nstats_users = [\"ghost\"]\nstandbys = [",
    );
    assert_one_problem(&text, "pooler.stats_users[0]", "a user of pooler.users");
    let text = BASE.replace("standbys = [", "admin_users = [\"app\"]\nstandbys = [");
    let pooler = load(&text).unwrap().pooler.unwrap();
    assert_eq!(pooler.admin_role("app"), crate::config::AdminRole::Admin);
    assert_eq!(pooler.admin_role("other"), crate::config::AdminRole::None);
    // With auth_user, a console user may be one the server knows.
    let text = BASE.replace(
        "standbys = [",
        "auth_user = \"app\"\nstats_users = [\"monitor\"]\nstandbys = [",
    );
    let pooler = load(&text).unwrap().pooler.unwrap();
    assert_eq!(
        pooler.admin_role("monitor"),
        crate::config::AdminRole::Stats
    );
}

#[test]
fn role_checks_default_to_every_second_as_the_first_user() {
    let pooler = load(BASE).unwrap().pooler.unwrap();
    assert_eq!(pooler.role_check_interval, Duration::from_secs(1));
    assert_eq!(pooler.role_check_login().unwrap().name, "app");
    assert_eq!(pooler.role_check_database, "postgres");
    assert_eq!(pooler.max_standby_lag_bytes, None);
    assert_eq!(pooler.servers().len(), 2);
}

#[test]
fn role_check_user_must_be_a_pooler_user() {
    let text = BASE.replace(
        "standbys = [\"127.0.0.1:5433\"]",
        "standbys = [\"127.0.0.1:5433\"]\nrole_check_user = \"monitor\"\nmax_standby_lag_bytes = 1048576",
    );
    assert_one_problem(
        &text,
        "pooler.role_check_user",
        "\"monitor\" is not in pooler.users",
    );
}

#[test]
fn role_checks_without_any_user_are_refused_unless_turned_off() {
    let without_users = BASE.replace(
        "[[pooler.users]]\nname = \"app\"\nsecret = \"md5a3556571e93b0d20722ba62be61e8c2d\"\n",
        "",
    );
    assert_one_problem(&without_users, "pooler.role_check_interval", "no");
    let off = without_users.replace(
        "standbys = [\"127.0.0.1:5433\"]",
        "standbys = [\"127.0.0.1:5433\"]\nrole_check_interval = \"0s\"",
    );
    assert!(load(&off).is_ok(), "{:?}", load(&off).err());
}

fn with_pooler_keys(keys: &str) -> String {
    BASE.replace(
        "standbys = [\"127.0.0.1:5433\"]",
        &format!("standbys = [\"127.0.0.1:5433\"]\n{keys}"),
    )
}

#[test]
fn auth_query_defaults_to_pg_shadow_for_a_listed_auth_user() {
    let pooler = load(&with_pooler_keys("auth_user = \"app\""))
        .unwrap()
        .pooler
        .unwrap();
    assert_eq!(pooler.auth_user.as_deref(), Some("app"));
    assert_eq!(
        pooler.auth_query(),
        "SELECT usename, passwd FROM pg_shadow WHERE usename=$1"
    );
    assert_eq!(pooler.auth_database, None);
    assert_eq!(pooler.auth_cache_ttl, Duration::from_secs(60));
    // Without auth_user, only listed users log in.
    assert_eq!(load(BASE).unwrap().pooler.unwrap().auth_user, None);
}

#[test]
fn auth_user_must_be_a_pooler_user() {
    assert_one_problem(
        &with_pooler_keys("auth_user = \"lookup\""),
        "pooler.auth_user",
        "\"lookup\" is not in pooler.users",
    );
}

#[test]
fn auth_query_without_auth_user_is_refused() {
    assert_one_problem(
        &with_pooler_keys("auth_query = \"SELECT u, p FROM t WHERE u = $1\""),
        "pooler.auth_query",
        "needs pooler.auth_user",
    );
    assert_one_problem(
        &with_pooler_keys("auth_database = \"postgres\""),
        "pooler.auth_database",
        "needs pooler.auth_user",
    );
}

#[test]
fn auth_query_without_a_parameter_is_refused() {
    assert_one_problem(
        &with_pooler_keys(
            "auth_user = \"app\"\nauth_query = \"SELECT usename, passwd FROM pg_shadow\"",
        ),
        "pooler.auth_query",
        "with $1",
    );
    assert_one_problem(
        &with_pooler_keys("auth_user = \"app\"\nauth_database = \"\""),
        "pooler.auth_database",
        "empty string",
    );
}

#[test]
fn with_auth_query_a_pool_may_name_a_user_the_server_knows() {
    let text = format!(
        "{}user = \"ghost\"\n",
        with_pooler_keys("auth_user = \"app\"")
    );
    let pooler = load(&text).expect("valid").pooler.unwrap();
    assert!(pooler.pool("app", "ghost").is_some());
}

#[test]
fn pause_timeouts_default_and_zero_is_refused() {
    let pooler = load(BASE).expect("valid").pooler.expect("pooler");
    assert_eq!(pooler.pause_wait_timeout, Duration::from_secs(15));
    assert_eq!(pooler.pause_drain_timeout, Duration::from_secs(5));
    // [pooler] keys go before the first [[pooler.users]].
    let with =
        |line: &str| BASE.replace("[[pooler.users]]", &format!("{line}\n\n[[pooler.users]]"));
    let set = load(&with(
        "pause_wait_timeout = \"2s\"\npause_drain_timeout = \"250ms\"",
    ))
    .expect("valid")
    .pooler
    .expect("pooler");
    assert_eq!(set.pause_wait_timeout, Duration::from_secs(2));
    assert_eq!(set.pause_drain_timeout, Duration::from_millis(250));
    assert_one_problem(
        &with("pause_wait_timeout = \"0s\""),
        "pooler.pause_wait_timeout",
        "positive",
    );
    assert_one_problem(
        &with("pause_drain_timeout = \"0s\""),
        "pooler.pause_drain_timeout",
        "positive",
    );
}

#[test]
fn kernel_relay_is_a_pooler_switch_off_by_default() {
    let pooler = load(BASE).unwrap().pooler.unwrap();
    assert!(!pooler.kernel_relay);
    let with = |value: &str| {
        BASE.replace(
            "standbys = [\"127.0.0.1:5433\"]\n",
            &format!("standbys = [\"127.0.0.1:5433\"]\nkernel_relay = {value}\n"),
        )
    };
    assert!(load(&with("true")).unwrap().pooler.unwrap().kernel_relay);
    let error = load(&with("\"yes\"")).unwrap_err().to_string();
    assert!(error.contains("pooler.kernel_relay"), "{error}");
}
