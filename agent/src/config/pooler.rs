//! The `[pooler]` section: Farol's PostgreSQL connection pooler (issue 6).
//!
//! ```toml
//! [pooler]
//! listen = "0.0.0.0:6432"
//! primary = "127.0.0.1:5432"
//! standbys = ["127.0.0.1:5433"]
//! auth_user = "app"        # optional: runs auth_query for users not listed
//!
//! [[pooler.users]]
//! name = "app"
//! secret = "SCRAM-SHA-256$4096:...$...:..."   # or "md5<hex>", as in pg_authid
//! server_password = "..."                     # how the pooler logs in to PostgreSQL
//!
//! [[pooler.pools]]
//! database = "app"
//! mode = "transaction"
//! pool_size = 20
//! ```

use std::{collections::HashSet, net::SocketAddr, path::PathBuf, time::Duration};

use serde::Deserialize;

use super::Problem;

/// Default client-facing port (PgBouncer's; 5432 stays PostgreSQL's).
pub const DEFAULT_POOLER_LISTEN: &str = "0.0.0.0:6432";
/// PgBouncer's default `auth_query`.
pub const DEFAULT_AUTH_QUERY: &str = "SELECT usename, passwd FROM pg_shadow WHERE usename=$1";
/// The database name that reaches the admin console (`SHOW POOLS`, ...).
pub const DEFAULT_ADMIN_DATABASE: &str = "farol";

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PoolerConfig {
    /// Where clients connect.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// The PostgreSQL primary (writes, and reads when no standby fits).
    pub primary: SocketAddr,
    /// Hot standbys for reads when `read_write_split` is on.
    #[serde(default)]
    pub standbys: Vec<SocketAddr>,
    /// Most client connections at once; one more is refused with 53300.
    #[serde(default = "default_max_client_conn")]
    pub max_client_conn: usize,
    /// Database name of the admin console.
    #[serde(default = "default_admin_database")]
    pub admin_database: String,
    /// Users that may run every admin command (PgBouncer's `admin_users`):
    /// users of `pooler.users`, or with `auth_user` set, users whose secret
    /// `auth_query` finds in `auth_database` (else `role_check_database`).
    #[serde(default)]
    pub admin_users: Vec<String>,
    /// Users that may only run the `SHOW` commands (PgBouncer's
    /// `stats_users`; found as `admin_users` are). No one else reaches the
    /// admin console.
    #[serde(default)]
    pub stats_users: Vec<String>,
    /// Users allowed to connect, with their hashed secrets.
    #[serde(default)]
    pub users: Vec<PoolerUser>,
    /// One pool per (database, user); `user` empty means every user.
    #[serde(default)]
    pub pools: Vec<PoolConfig>,
    /// Send statements that only read to a standby. In session pools each
    /// session keeps one standby connection besides its primary one
    /// (README, "Read/write split in session pools").
    #[serde(default)]
    pub read_write_split: bool,
    /// After a write, the rest of the client's session stays on the primary.
    #[serde(default = "default_true")]
    pub read_your_writes: bool,
    /// Functions with side effects: a read that calls one goes to the primary.
    #[serde(default)]
    pub primary_functions: Vec<String>,
    /// PEM certificate chain for TLS with clients; without it an SSLRequest
    /// is refused ('N') and the client may go on in plain text.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// How often every server (primary and standbys) is asked for its role
    /// and WAL position: the pooler follows a promoted standby and keeps
    /// reads off lagging ones. `0s` turns it off (the primary stays where
    /// the config or `Pooler::set_primary` put it).
    #[serde(default = "default_role_check_interval", with = "humantime_serde")]
    pub role_check_interval: Duration,
    /// The login of those checks: a user of `pooler.users`, with its
    /// `server_password` (default: the first user).
    #[serde(default)]
    pub role_check_user: Option<String>,
    /// The database those checks connect to.
    #[serde(default = "default_role_check_database")]
    pub role_check_database: String,
    /// A standby whose replay is further than this behind the primary's
    /// WAL gets no reads until it catches up (no bound by default).
    #[serde(default)]
    pub max_standby_lag_bytes: Option<u64>,
    /// A user of `pooler.users` (with its `server_password`) that runs
    /// `auth_query` for clients not in `pooler.users` (PgBouncer's
    /// `auth_user`). Unset: only the listed users may log in.
    #[serde(default)]
    pub auth_user: Option<String>,
    /// Query returning (user name, secret) for `$1`, run as `auth_user`
    /// (default [`DEFAULT_AUTH_QUERY`]; a function with SECURITY DEFINER
    /// avoids making `auth_user` a superuser).
    #[serde(default)]
    pub auth_query: Option<String>,
    /// The database `auth_query` runs in (default: the client's).
    #[serde(default)]
    pub auth_database: Option<String>,
    /// How long a secret fetched by `auth_query` is trusted; a failed login
    /// forgets it at once, so a changed password is seen on the next try.
    /// `0s` asks the server at every login.
    #[serde(default = "default_auth_cache_ttl", with = "humantime_serde")]
    pub auth_cache_ttl: Duration,
    /// PostgreSQL's Unix socket directory (its `unix_socket_directories`):
    /// server connections to a server on this host (a loopback address or
    /// one of this node's) go through `DIR/.s.PGSQL.PORT` instead of TCP,
    /// as libpq's `host=/DIR` does; cheaper per message than TCP loopback.
    /// Role checks and `auth_query` lookups take the same way, so a server
    /// that listens only on its socket works. Its `pg_hba.conf` needs
    /// `local` lines for the pooler's users.
    #[serde(default)]
    pub unix_socket_dir: Option<PathBuf>,
    /// Also take clients on a Unix socket, `DIR/.s.PGSQL.PORT` with the
    /// port of `listen` (PgBouncer's `unix_socket_dir`, pgpool-II's
    /// `unix_socket_directories`): libpq's `host=DIR`. Apps on this node
    /// skip TCP loopback; the socket is open to every local user (mode
    /// 0777, as PostgreSQL's), the login still checks the password.
    #[serde(default)]
    pub listen_socket_dir: Option<PathBuf>,
    /// While the pooler is paused (a planned switchover, or `PAUSE` on the
    /// admin console), a new transaction for the primary waits at most
    /// this long, then gets 57P03; a switchover's pause also ends by itself
    /// after this long if no new primary answered.
    #[serde(default = "default_pause_wait_timeout", with = "humantime_serde")]
    pub pause_wait_timeout: Duration,
    /// When a pause starts, how long transactions already running on the
    /// primary may take to finish before they are ended with 57P01.
    #[serde(default = "default_pause_drain_timeout", with = "humantime_serde")]
    pub pause_drain_timeout: Duration,
    /// Session-mode pools: once a client over plain TCP has its server
    /// connection, the bytes between them are relayed in the kernel (a BPF
    /// sockhash and `sk_skb` program; needs the agent's BPF privileges),
    /// so the pooler is not woken per message. Sessions that cannot be
    /// (TLS, Unix sockets, `read_write_split`, BPF unavailable) use the
    /// userspace relay. Their queries are not counted in SHOW STATS.
    /// Trusted clients only: the kernel relay has no backpressure (a
    /// client that stops reading lets the kernel buffer the server's whole
    /// answer; README, "In-kernel relay for session pools").
    #[serde(default)]
    pub kernel_relay: bool,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PoolerUser {
    pub name: String,
    /// `md5` + hex(md5(password + user)), or a SCRAM-SHA-256 verifier
    /// `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>` (both as
    /// PostgreSQL stores them in `pg_authid.rolpassword`).
    pub secret: String,
    /// Password the pooler uses towards PostgreSQL (md5 or SCRAM); not
    /// needed when the server trusts the pooler.
    pub server_password: Option<String>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    pub database: String,
    /// Only this user; empty for every configured user.
    #[serde(default)]
    pub user: String,
    #[serde(default)]
    pub mode: PoolMode,
    /// Most server connections of this pool (per server).
    #[serde(default = "default_pool_size")]
    pub pool_size: usize,
    /// Server connections kept open even when idle.
    #[serde(default)]
    pub min_idle: usize,
    /// How long a client waits for a server connection before 53300.
    #[serde(default = "default_query_wait_timeout", with = "humantime_serde")]
    pub query_wait_timeout: Duration,
    /// An idle server connection older than this is closed.
    #[serde(default = "default_idle_timeout", with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// A server connection older than this is closed when released.
    #[serde(default = "default_server_lifetime", with = "humantime_serde")]
    pub server_lifetime: Duration,
}

/// When a server connection goes back to the pool.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum PoolMode {
    /// After each transaction (PgBouncer's `pool_mode = transaction`).
    #[default]
    Transaction,
    /// When the client disconnects.
    Session,
}

fn default_listen() -> SocketAddr {
    DEFAULT_POOLER_LISTEN
        .parse()
        .expect("DEFAULT_POOLER_LISTEN is a valid socket address")
}
fn default_max_client_conn() -> usize {
    1000
}
fn default_admin_database() -> String {
    DEFAULT_ADMIN_DATABASE.into()
}
fn default_true() -> bool {
    true
}
fn default_role_check_interval() -> Duration {
    Duration::from_secs(1)
}
fn default_role_check_database() -> String {
    "postgres".into()
}
fn default_auth_cache_ttl() -> Duration {
    Duration::from_secs(60)
}
fn default_pause_wait_timeout() -> Duration {
    Duration::from_secs(15)
}
fn default_pause_drain_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_pool_size() -> usize {
    20
}
fn default_query_wait_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_idle_timeout() -> Duration {
    Duration::from_secs(600)
}
fn default_server_lifetime() -> Duration {
    Duration::from_secs(3600)
}

/// What a user may do on the admin console.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdminRole {
    /// Every command (`pooler.admin_users`).
    Admin,
    /// The `SHOW` commands (`pooler.stats_users`).
    Stats,
    None,
}

impl AdminRole {
    pub fn may_show(self) -> bool {
        self != AdminRole::None
    }
}

impl PoolerConfig {
    /// `user`'s rights on the admin console.
    pub fn admin_role(&self, user: &str) -> AdminRole {
        if self.admin_users.iter().any(|name| name == user) {
            AdminRole::Admin
        } else if self.stats_users.iter().any(|name| name == user) {
            AdminRole::Stats
        } else {
            AdminRole::None
        }
    }

    /// Every rule of the section; keys start with `pooler.`.
    pub fn validate(&self) -> Vec<Problem> {
        let mut problems = Vec::new();
        let mut problem = |key: String, message: String| problems.push(Problem { key, message });
        if self.max_client_conn == 0 {
            problem(
                "pooler.max_client_conn".into(),
                "expected at least 1, got 0".into(),
            );
        }
        if self.admin_database.is_empty() {
            problem(
                "pooler.admin_database".into(),
                "expected a database name, got an empty string".into(),
            );
        }
        if self.standbys.contains(&self.primary) {
            problem(
                "pooler.standbys".into(),
                format!("{} is also the primary", self.primary),
            );
        }
        if self.read_write_split && self.standbys.is_empty() {
            problem(
                "pooler.read_write_split".into(),
                "needs at least one address in pooler.standbys".into(),
            );
        }
        for (key, dir) in [
            ("pooler.unix_socket_dir", &self.unix_socket_dir),
            ("pooler.listen_socket_dir", &self.listen_socket_dir),
        ] {
            let Some(dir) = dir else { continue };
            // sun_path holds 107 bytes and a NUL.
            let longest = dir.join(".s.PGSQL.65535").as_os_str().len();
            if !dir.is_absolute() || longest > 107 {
                problem(
                    key.into(),
                    format!(
                        "expected an absolute directory whose socket path (DIR/.s.PGSQL.PORT) fits in 107 bytes, got {:?}",
                        dir.display().to_string()
                    ),
                );
            }
        }
        match (&self.tls_cert, &self.tls_key) {
            (Some(_), None) => problem(
                "pooler.tls_key".into(),
                "pooler.tls_cert is set: the key is needed too".into(),
            ),
            (None, Some(_)) => problem(
                "pooler.tls_cert".into(),
                "pooler.tls_key is set: the certificate is needed too".into(),
            ),
            _ => {}
        }
        let mut users = HashSet::new();
        for (index, user) in self.users.iter().enumerate() {
            let at = |key: &str| format!("pooler.users[{index}].{key}");
            if user.name.is_empty() {
                problem(at("name"), "expected a user name".into());
            } else if !users.insert(user.name.as_str()) {
                problem(at("name"), format!("{:?} is listed twice", user.name));
            }
            if let Err(why) = crate::pooler::auth::Secret::parse(&user.secret) {
                problem(at("secret"), why.to_string());
            }
        }
        if let Some(user) = &self.role_check_user {
            if !users.contains(user.as_str()) {
                problem(
                    "pooler.role_check_user".into(),
                    format!("{user:?} is not in pooler.users"),
                );
            }
        } else if !self.role_check_interval.is_zero() && self.users.is_empty() {
            problem(
                "pooler.role_check_interval".into(),
                "role checks log in as a user of pooler.users, and there is none: add one or set \"0s\"".into(),
            );
        }
        match &self.auth_user {
            Some(user) if !users.contains(user.as_str()) => problem(
                "pooler.auth_user".into(),
                format!(
                    "{user:?} is not in pooler.users (auth_query logs in with its server_password)"
                ),
            ),
            None if self.auth_query.is_some() => problem(
                "pooler.auth_query".into(),
                "needs pooler.auth_user, the user that runs it".into(),
            ),
            None if self.auth_database.is_some() => problem(
                "pooler.auth_database".into(),
                "needs pooler.auth_user, the user that runs auth_query".into(),
            ),
            _ => {}
        }
        if let Some(query) = &self.auth_query {
            if !query.contains("$1") {
                problem(
                    "pooler.auth_query".into(),
                    format!("expected a query with $1 for the user name, got {query:?}"),
                );
            }
        }
        if self.auth_database.as_deref() == Some("") {
            problem(
                "pooler.auth_database".into(),
                "expected a database name, got an empty string".into(),
            );
        }
        if self.role_check_database.is_empty() {
            problem(
                "pooler.role_check_database".into(),
                "expected a database name, got an empty string".into(),
            );
        }
        for (key, list) in [
            ("admin_users", &self.admin_users),
            ("stats_users", &self.stats_users),
        ] {
            // With auth_user the console asks the server for an unlisted
            // user's secret, as for pools.
            if self.auth_user.is_some() {
                continue;
            }
            for (index, name) in list.iter().enumerate() {
                if !users.contains(name.as_str()) {
                    problem(
                        format!("pooler.{key}[{index}]"),
                        format!("expected a user of pooler.users (the console checks its secret), or auth_user set to look it up on the server, got {name:?}"),
                    );
                }
            }
        }
        for (key, value) in [
            ("pooler.pause_wait_timeout", self.pause_wait_timeout),
            ("pooler.pause_drain_timeout", self.pause_drain_timeout),
        ] {
            if value.is_zero() {
                problem(key.into(), "expected a positive duration".into());
            }
        }
        let mut pools = HashSet::new();
        for (index, pool) in self.pools.iter().enumerate() {
            let at = |key: &str| format!("pooler.pools[{index}].{key}");
            if pool.database.is_empty() {
                problem(at("database"), "expected a database name".into());
            } else if pool.database == self.admin_database {
                problem(
                    at("database"),
                    format!("{:?} is the admin database", pool.database),
                );
            }
            // With auth_query, a pool may name a user the server knows.
            if !pool.user.is_empty()
                && !users.contains(pool.user.as_str())
                && self.auth_user.is_none()
            {
                problem(
                    at("user"),
                    format!("{:?} is not in pooler.users", pool.user),
                );
            }
            if !pools.insert((pool.database.as_str(), pool.user.as_str())) {
                problem(
                    at("database"),
                    format!(
                        "a pool for database {:?} and user {:?} is already defined",
                        pool.database, pool.user
                    ),
                );
            }
            if pool.pool_size == 0 {
                problem(at("pool_size"), "expected at least 1, got 0".into());
            }
            if pool.min_idle > pool.pool_size {
                problem(
                    at("min_idle"),
                    format!(
                        "must not exceed pool_size ({}), got {}",
                        pool.pool_size, pool.min_idle
                    ),
                );
            }
            if pool.query_wait_timeout.is_zero() {
                problem(
                    at("query_wait_timeout"),
                    "expected a positive duration".into(),
                );
            }
            if pool.server_lifetime.is_zero() {
                problem(at("server_lifetime"), "expected a positive duration".into());
            }
        }
        problems
    }

    /// The pool settings for (database, user): an exact pool first, then
    /// one for every user.
    pub fn pool(&self, database: &str, user: &str) -> Option<&PoolConfig> {
        self.pools
            .iter()
            .find(|pool| pool.database == database && pool.user == user)
            .or_else(|| {
                self.pools
                    .iter()
                    .find(|pool| pool.database == database && pool.user.is_empty())
            })
    }

    pub fn user(&self, name: &str) -> Option<&PoolerUser> {
        self.users.iter().find(|user| user.name == name)
    }

    /// The `auth_query` to run, when `auth_user` is set.
    pub fn auth_query(&self) -> &str {
        self.auth_query.as_deref().unwrap_or(DEFAULT_AUTH_QUERY)
    }

    /// The user role checks log in as.
    pub fn role_check_login(&self) -> Option<&PoolerUser> {
        match &self.role_check_user {
            Some(name) => self.user(name),
            None => self.users.first(),
        }
    }

    /// Every server the pooler may use, the configured primary first.
    pub fn servers(&self) -> Vec<SocketAddr> {
        let mut servers = vec![self.primary];
        servers.extend(self.standbys.iter().copied());
        servers
    }
}

#[cfg(test)]
mod tests;
