//! The `[postgres]` section: PostgreSQL run and replicated by the agents
//! (issue 9). The runtime side is `crate::pgha`.
//!
//! ```toml
//! [postgres]
//! nodes = ["nuster1", "nuster2", "nuster3"]   # default: nodes with role "database"
//! primary = "nuster1"                         # who initialises the cluster
//! data_dir = "/var/lib/farol/postgres/{node}"
//! synchronous = false                         # true: ANY 1 (other nodes)
//! max_lag_bytes = "16MB"                      # a standby further behind cannot be promoted
//! replication_password_file = "/etc/farol/replication.secret"
//! settings = { shared_buffers = "128MB" }
//! ```
//!
//! In `data_dir`, `socket_dir` and `host`, `{node}` and `{address}` stand
//! for the node's name and LAN address.

use std::{
    collections::{BTreeMap, HashSet},
    net::SocketAddr,
    path::PathBuf,
    time::Duration,
};

use serde::Deserialize;

use super::{is_identifier, NodeConfig, Problem, Role};

/// Debian's PostgreSQL 15 server binaries.
pub const DEFAULT_BIN_DIR: &str = "/usr/lib/postgresql/15/bin";
/// Patroni's REST API port, so existing HAProxy checks keep working.
pub const DEFAULT_API_LISTEN: &str = "0.0.0.0:8008";
/// The allowed replication lag unless the file says otherwise.
pub const DEFAULT_MAX_LAG_BYTES: u64 = 16 * 1024 * 1024;
/// A Unix socket path holds at most 107 bytes (sun_path).
const MAX_SOCKET_PATH: usize = 107;

/// Settings the agent writes itself; `settings` may not override them.
pub const MANAGED_SETTINGS: &[&str] = &[
    "port",
    "listen_addresses",
    "unix_socket_directories",
    "wal_level",
    "max_wal_senders",
    "max_replication_slots",
    "wal_log_hints",
    "hot_standby",
    "synchronous_standby_names",
    "synchronous_commit",
    "primary_conninfo",
    "primary_slot_name",
    "max_slot_wal_keep_size",
    "hba_file",
    "data_directory",
];

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PostgresConfig {
    /// The nodes that run PostgreSQL; empty: every node with the
    /// `database` role.
    #[serde(default)]
    pub nodes: Vec<String>,
    /// The node that runs `initdb` and starts as the primary; the others
    /// start as its standbys (pg_basebackup). Only used when a node's data
    /// directory is empty: afterwards the data says what a node is.
    pub primary: String,
    /// The data directory of each node.
    #[serde(default = "default_data_dir")]
    pub data_dir: String,
    /// Where the server puts its Unix socket (the agent connects there as
    /// the superuser; only root and the OS user may enter it).
    #[serde(default = "default_socket_dir")]
    pub socket_dir: String,
    /// The TCP port of every node's server...
    #[serde(default = "default_port")]
    pub port: u16,
    /// ...unless overridden here per node (several nodes on one machine).
    #[serde(default)]
    pub ports: BTreeMap<String, u16>,
    /// How peers reach a node's server (standbys, pg_rewind, clients).
    #[serde(default = "default_host")]
    pub host: String,
    /// The server's `listen_addresses`.
    #[serde(default = "default_listen_addresses")]
    pub listen_addresses: String,
    /// The PostgreSQL server binaries.
    #[serde(default = "default_bin_dir")]
    pub bin_dir: PathBuf,
    /// The OS user the server runs as (PostgreSQL refuses root).
    #[serde(default = "default_os_user")]
    pub os_user: String,
    /// The role standbys replicate and pg_rewind connects with.
    #[serde(default = "default_replication_user")]
    pub replication_user: String,
    /// Its password; prefer `replication_password_file`. Without either,
    /// peers are trusted by address (a lab only).
    pub replication_password: Option<String>,
    pub replication_password_file: Option<PathBuf>,
    /// Synchronous replication: a commit returns once one standby has it
    /// (`synchronous_standby_names = 'ANY 1 (the other nodes)'`).
    #[serde(default)]
    pub synchronous: bool,
    /// How far (WAL bytes) a standby may lag and still be promoted or
    /// answer `/replica` without `?lag=`; `"16MB"` or a number of bytes.
    #[serde(default = "default_max_lag")]
    pub max_lag_bytes: ByteSize,
    /// WAL a slot of an absent standby may hold back before it is dropped
    /// (keeps a dead node from filling the primary's disk).
    #[serde(default = "default_max_slot_wal_keep")]
    pub max_slot_wal_keep_size: ByteSize,
    #[serde(default = "default_max_wal_senders")]
    pub max_wal_senders: u32,
    /// Where `/primary`, `/replica` and `/health` are served (Patroni's
    /// port by default).
    #[serde(default = "default_api_listen")]
    pub api_listen: SocketAddr,
    /// More `postgresql.conf` settings (not those the agent manages).
    #[serde(default)]
    pub settings: BTreeMap<String, String>,
    /// How often the agent looks at its server (role, positions, lag).
    #[serde(default = "default_check_interval", with = "humantime_serde")]
    pub check_interval: Duration,
    /// How long a crashed primary stays down before its agent starts it
    /// again (while the node should still run the primary).
    #[serde(default = "default_crash_restart_delay", with = "humantime_serde")]
    pub crash_restart_delay: Duration,
    /// With `[cluster_state]`: how long the recorded primary must look dead
    /// (its agent's `/primary` not answering "primary") before the Raft
    /// leader tries another one (refused anyway while its lease is live).
    #[serde(default = "default_failover_after", with = "humantime_serde")]
    pub failover_after: Duration,
    /// How many times in a row pg_rewind of a former primary may fail
    /// before the agent gives up on it: the data directory is then moved
    /// aside (kept, never deleted) and the node is cloned again with
    /// pg_basebackup. 0 keeps retrying pg_rewind forever (Patroni's
    /// `remove_data_directory_on_rewind_failure = false`).
    #[serde(default = "default_reclone_after_failed_rewinds")]
    pub reclone_after_failed_rewinds: u32,
    /// More `pg_hba.conf` lines (clients, the pooler), after the agent's
    /// own (the superuser on the socket, replication between the nodes).
    #[serde(default)]
    pub hba: Vec<String>,
}

/// A number of bytes, written as a number or `"16MB"`, `"512kB"`, `"1GB"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(i64),
            Text(String),
        }
        match Raw::deserialize(deserializer)? {
            Raw::Number(n) => u64::try_from(n)
                .map(ByteSize)
                .map_err(|_| serde::de::Error::custom(format!("expected bytes >= 0, got {n}"))),
            Raw::Text(text) => parse_byte_size(&text)
                .map(ByteSize)
                .map_err(serde::de::Error::custom),
        }
    }
}

/// Parses `"1048576"`, `"10MB"`, `"512kB"`, `"1 GB"` (PostgreSQL's and
/// Patroni's units, powers of 1024; `B` for bytes).
pub fn parse_byte_size(text: &str) -> Result<u64, String> {
    let trimmed = text.trim();
    let split = trimmed
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(trimmed.len());
    let (digits, unit) = trimmed.split_at(split);
    let expected =
        || format!("expected bytes such as 1048576, \"512kB\", \"16MB\" or \"1GB\", got {text:?}");
    let number: u64 = digits.parse().map_err(|_| expected())?;
    let multiplier: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" | "k" => 1 << 10,
        "mb" | "m" => 1 << 20,
        "gb" | "g" => 1 << 30,
        "tb" | "t" => 1 << 40,
        _ => return Err(expected()),
    };
    number.checked_mul(multiplier).ok_or_else(expected)
}

fn default_data_dir() -> String {
    "/var/lib/farol/postgres/{node}".into()
}
fn default_socket_dir() -> String {
    "/run/farol/postgres-{node}".into()
}
fn default_port() -> u16 {
    5432
}
fn default_host() -> String {
    "{address}".into()
}
fn default_listen_addresses() -> String {
    "*".into()
}
fn default_bin_dir() -> PathBuf {
    PathBuf::from(DEFAULT_BIN_DIR)
}
fn default_os_user() -> String {
    "postgres".into()
}
fn default_replication_user() -> String {
    "farol_replication".into()
}
fn default_max_lag() -> ByteSize {
    ByteSize(DEFAULT_MAX_LAG_BYTES)
}
fn default_max_slot_wal_keep() -> ByteSize {
    ByteSize(1 << 30)
}
fn default_max_wal_senders() -> u32 {
    10
}
fn default_check_interval() -> Duration {
    Duration::from_millis(500)
}
fn default_crash_restart_delay() -> Duration {
    Duration::from_secs(1)
}
fn default_failover_after() -> Duration {
    Duration::from_secs(1)
}
fn default_reclone_after_failed_rewinds() -> u32 {
    3
}
fn default_api_listen() -> SocketAddr {
    DEFAULT_API_LISTEN
        .parse()
        .expect("DEFAULT_API_LISTEN is a valid socket address")
}

impl PostgresConfig {
    /// The nodes that run PostgreSQL, in `[[node]]` order.
    pub fn members<'a>(&self, nodes: &'a [NodeConfig]) -> Vec<&'a NodeConfig> {
        nodes
            .iter()
            .filter(|node| {
                if self.nodes.is_empty() {
                    node.roles.contains(&Role::Database)
                } else {
                    self.nodes.contains(&node.name)
                }
            })
            .collect()
    }

    /// `node`'s server port.
    pub fn port_of(&self, node: &str) -> u16 {
        self.ports.get(node).copied().unwrap_or(self.port)
    }
}

/// Replaces `{node}` and `{address}` in `text`.
pub fn expand(text: &str, node: &NodeConfig) -> String {
    text.replace("{node}", &node.name)
        .replace("{address}", &node.address.addr().to_string())
}

/// The `[postgres]` rules.
pub(super) fn validate(config: &PostgresConfig, nodes: &[NodeConfig], problems: &mut Vec<Problem>) {
    let mut problem = |key: &str, message: String| {
        problems.push(Problem {
            key: format!("postgres.{key}"),
            message,
        })
    };
    let known = |name: &str| nodes.iter().any(|node| node.name == name);
    let mut seen = HashSet::new();
    for (index, name) in config.nodes.iter().enumerate() {
        if !known(name) {
            problem(
                &format!("nodes[{index}]"),
                format!("no [[node]] is named {name:?}"),
            );
        } else if !seen.insert(name.as_str()) {
            problem(
                &format!("nodes[{index}]"),
                format!("{name:?} is listed twice"),
            );
        }
    }
    let members = config.members(nodes);
    if members.is_empty() {
        problem(
            "nodes",
            "expected at least one node: list them here or give nodes the \"database\" role".into(),
        );
    }
    if !members.iter().any(|node| node.name == config.primary) {
        let why = if known(&config.primary) {
            "is not one of the PostgreSQL nodes (postgres.nodes or role \"database\")"
        } else {
            "is not the name of any [[node]]"
        };
        problem("primary", format!("{:?} {why}", config.primary));
    }
    for (name, port) in &config.ports {
        if !members.iter().any(|node| node.name == *name) {
            problem(
                &format!("ports.{name}"),
                format!("{name:?} is not one of the PostgreSQL nodes"),
            );
        }
        if *port == 0 {
            problem(
                &format!("ports.{name}"),
                "expected a fixed port, got 0".into(),
            );
        }
    }
    if config.port == 0 {
        problem("port", "expected a fixed port, got 0".into());
    }
    if config.synchronous && members.len() < 2 {
        problem(
            "synchronous",
            "synchronous replication needs at least one standby (two PostgreSQL nodes)".into(),
        );
    }
    if config.max_lag_bytes.0 == 0 {
        problem(
            "max_lag_bytes",
            "expected more than 0 bytes (no standby could ever be promoted)".into(),
        );
    }
    if config.max_wal_senders < members.len() as u32 {
        problem(
            "max_wal_senders",
            format!(
                "expected at least one per PostgreSQL node ({}), got {}",
                members.len(),
                config.max_wal_senders
            ),
        );
    }
    if !config.bin_dir.is_absolute() {
        problem(
            "bin_dir",
            format!("expected an absolute path, got {:?}", config.bin_dir),
        );
    }
    if config.os_user.is_empty() || config.os_user == "root" {
        problem(
            "os_user",
            format!(
                "expected the user PostgreSQL runs as (not root), got {:?}",
                config.os_user
            ),
        );
    }
    if !is_identifier(&config.replication_user) {
        problem(
            "replication_user",
            format!(
                "expected letters, digits, '-' or '_' (1 to 63 characters), got {:?}",
                config.replication_user
            ),
        );
    }
    if config.replication_password.is_some() && config.replication_password_file.is_some() {
        problem(
            "replication_password",
            "set replication_password or replication_password_file, not both".into(),
        );
    }
    if config
        .replication_password
        .as_ref()
        .is_some_and(|p| p.is_empty() || p.contains('\''))
    {
        problem(
            "replication_password",
            "expected a non-empty password without single quotes".into(),
        );
    }
    for (key, template) in [
        ("data_dir", &config.data_dir),
        ("socket_dir", &config.socket_dir),
    ] {
        for node in &members {
            let path = expand(template, node);
            if !path.starts_with('/') {
                problem(key, format!("expected an absolute path, got {path:?}"));
                break;
            }
            if key == "socket_dir" && path.len() + "/.s.PGSQL.65535".len() > MAX_SOCKET_PATH {
                problem(
                    key,
                    format!(
                        "{path:?} is too long for a Unix socket path ({MAX_SOCKET_PATH} bytes)"
                    ),
                );
                break;
            }
        }
    }
    for key in config.settings.keys() {
        if MANAGED_SETTINGS.contains(&key.as_str()) {
            problem(
                &format!("settings.{key}"),
                "the agent manages this setting; remove it here".into(),
            );
        } else if key.is_empty()
            || !key
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
        {
            problem(
                &format!("settings.{key}"),
                "expected a PostgreSQL setting name".into(),
            );
        }
    }
    if config.check_interval < Duration::from_millis(50)
        || config.check_interval > Duration::from_secs(60)
    {
        problem(
            "check_interval",
            format!("expected 50ms to 60s, got {:?}", config.check_interval),
        );
    }
    if config.failover_after < Duration::from_millis(100)
        || config.failover_after > Duration::from_secs(600)
    {
        problem(
            "failover_after",
            format!("expected 100ms to 10m, got {:?}", config.failover_after),
        );
    }
    for (index, line) in config.hba.iter().enumerate() {
        if line.contains('\n') || line.split_whitespace().count() < 3 {
            problem(
                &format!("hba[{index}]"),
                format!("expected one pg_hba.conf line such as \"host app app 192.0.2.0/24 scram-sha-256\", got {line:?}"),
            );
        }
    }
    for (key, value) in &config.settings {
        if value.contains('\n') {
            problem(
                &format!("settings.{key}"),
                "expected a single-line value".into(),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::{Config, ConfigError};

    const NODES: &str = r#"
[cluster]
name = "test"

[[node]]
name = "a"
address = "192.0.2.11/24"
interface = "eth0"
roles = ["database"]

[[node]]
name = "b"
address = "192.0.2.12/24"
interface = "eth0"
roles = ["database"]

[[node]]
name = "c"
address = "192.0.2.13/24"
interface = "eth0"
"#;

    fn load(postgres: &str) -> Result<Config, ConfigError> {
        Config::from_toml(
            Path::new("test.toml"),
            &format!("{NODES}\n[postgres]\n{postgres}"),
        )
    }

    fn problems(postgres: &str) -> Vec<String> {
        match load(postgres) {
            Ok(config) => panic!("expected an invalid config, got {:#?}", config.postgres),
            Err(error) => error.problems().iter().map(Problem::to_string).collect(),
        }
    }

    fn assert_problem(postgres: &str, key: &str, fragment: &str) {
        let problems = problems(postgres);
        assert!(
            problems
                .iter()
                .any(|p| p.starts_with(&format!("{key}: ")) && p.contains(fragment)),
            "expected a problem at {key} mentioning {fragment:?}, got {problems:#?}"
        );
    }

    #[test]
    fn minimal_section_loads_with_defaults_and_database_nodes() {
        let config = load("primary = \"a\"").expect("valid");
        let postgres = config.postgres.as_ref().unwrap();
        let members: Vec<_> = postgres
            .members(&config.nodes)
            .iter()
            .map(|n| n.name.clone())
            .collect();
        assert_eq!(members, ["a", "b"]);
        assert_eq!(postgres.max_lag_bytes, ByteSize(16 << 20));
        assert_eq!(postgres.port_of("a"), 5432);
        assert_eq!(postgres.api_listen.port(), 8008);
        assert!(!postgres.synchronous);
        assert_eq!(postgres.check_interval, Duration::from_millis(500));
        assert_eq!(postgres.crash_restart_delay, Duration::from_secs(1));
        assert_eq!(
            expand(&postgres.data_dir, &config.nodes[1]),
            "/var/lib/farol/postgres/b"
        );
        assert_eq!(expand(&postgres.host, &config.nodes[1]), "192.0.2.12");
    }

    #[test]
    fn explicit_nodes_ports_and_lag_units_load() {
        let config = load(
            "nodes = [\"a\", \"c\"]\nprimary = \"c\"\nports = { c = 6000 }\nmax_lag_bytes = \"10MB\"\nsynchronous = true",
        )
        .expect("valid");
        let postgres = config.postgres.unwrap();
        assert_eq!(postgres.port_of("c"), 6000);
        assert_eq!(postgres.port_of("a"), 5432);
        assert_eq!(postgres.max_lag_bytes, ByteSize(10 << 20));
        let config = load("primary = \"a\"\nmax_lag_bytes = 4096").unwrap();
        assert_eq!(config.postgres.unwrap().max_lag_bytes, ByteSize(4096));
    }

    #[test]
    fn a_primary_that_is_not_a_node_is_refused() {
        assert_problem(
            "primary = \"zz\"",
            "postgres.primary",
            "not the name of any [[node]]",
        );
        assert_problem(
            "primary = \"c\"",
            "postgres.primary",
            "not one of the PostgreSQL nodes",
        );
    }

    #[test]
    fn listed_nodes_must_exist_once() {
        assert_problem(
            "nodes = [\"a\", \"x\"]\nprimary = \"a\"",
            "postgres.nodes[1]",
            "no [[node]] is named \"x\"",
        );
        assert_problem(
            "nodes = [\"a\", \"a\"]\nprimary = \"a\"",
            "postgres.nodes[1]",
            "listed twice",
        );
    }

    #[test]
    fn bad_lag_values_are_refused_with_their_key() {
        assert_problem(
            "primary = \"a\"\nmax_lag_bytes = \"ten\"",
            "postgres.max_lag_bytes",
            "expected bytes",
        );
        assert_problem(
            "primary = \"a\"\nmax_lag_bytes = \"5PB\"",
            "postgres.max_lag_bytes",
            "expected bytes",
        );
        assert_problem(
            "primary = \"a\"\nmax_lag_bytes = -1",
            "postgres.max_lag_bytes",
            "expected bytes >= 0",
        );
        assert_problem(
            "primary = \"a\"\nmax_lag_bytes = 0",
            "postgres.max_lag_bytes",
            "more than 0",
        );
    }

    #[test]
    fn durations_are_strings_and_bounded() {
        let config =
            load("primary = \"a\"\ncheck_interval = \"250ms\"\ncrash_restart_delay = \"5s\"")
                .unwrap();
        let postgres = config.postgres.unwrap();
        assert_eq!(postgres.check_interval, Duration::from_millis(250));
        assert_eq!(postgres.crash_restart_delay, Duration::from_secs(5));
        assert_problem(
            "primary = \"a\"\ncheck_interval = \"1ms\"",
            "postgres.check_interval",
            "50ms to 60s",
        );
        assert_problem(
            "primary = \"a\"\nhba = [\"host\"]",
            "postgres.hba[0]",
            "one pg_hba.conf line",
        );
    }

    #[test]
    fn synchronous_needs_a_standby() {
        assert_problem(
            "nodes = [\"a\"]\nprimary = \"a\"\nsynchronous = true",
            "postgres.synchronous",
            "at least one standby",
        );
    }

    #[test]
    fn managed_settings_ports_of_strangers_and_root_are_refused() {
        let all = problems(
            "primary = \"a\"\nos_user = \"root\"\nports = { c = 5433 }\nsettings = { wal_level = \"minimal\", \"bad key\" = \"1\" }\ndata_dir = \"relative/{node}\"\nreplication_password = \"x\"\nreplication_password_file = \"/p\"",
        );
        for (key, fragment) in [
            ("postgres.os_user", "not root"),
            ("postgres.ports.c", "not one of the PostgreSQL nodes"),
            ("postgres.settings.wal_level", "manages this setting"),
            ("postgres.settings.bad key", "setting name"),
            ("postgres.data_dir", "absolute path"),
            ("postgres.replication_password", "not both"),
        ] {
            assert!(
                all.iter()
                    .any(|p| p.starts_with(&format!("{key}: ")) && p.contains(fragment)),
                "expected {key} ~ {fragment:?} in {all:#?}"
            );
        }
    }

    #[test]
    fn unknown_keys_are_refused_with_their_path() {
        let problems = problems("primary = \"a\"\nsynchronus = true");
        assert!(
            problems
                .iter()
                .any(|p| p.starts_with("postgres") && p.contains("synchronus")),
            "{problems:#?}"
        );
    }

    #[test]
    fn byte_sizes_parse_like_postgresql_units() {
        assert_eq!(parse_byte_size("0"), Ok(0));
        assert_eq!(parse_byte_size("10MB"), Ok(10 << 20));
        assert_eq!(parse_byte_size("512kB"), Ok(512 << 10));
        assert_eq!(parse_byte_size(" 1 GB "), Ok(1 << 30));
        assert_eq!(parse_byte_size("7B"), Ok(7));
        assert!(parse_byte_size("").is_err());
        assert!(parse_byte_size("MB").is_err());
        assert!(parse_byte_size("1.5MB").is_err());
        assert!(parse_byte_size("99999999999999TB").is_err());
    }
}
