//! `auth_query`, as PgBouncer has it: a client whose user is not in
//! `pooler.users` is checked against the secret PostgreSQL holds for it,
//! fetched by `auth_user` with `auth_query` (by default from `pg_shadow`)
//! on the current primary, and cached for `auth_cache_ttl`.
//!
//! The cache keeps answers (a secret, or "no such user or no password")
//! per user name; a failed login forgets the user's entry, so a password
//! changed or a role created on the server is seen at the next attempt
//! rather than after the lifetime. The lookup uses `tokio-postgres` on a
//! short-lived connection: one per user and lifetime at most.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Mutex,
    },
    time::{Duration, Instant},
};

use tracing::{debug, warn};

use super::{auth::Secret, Pooler};

/// How long connecting and running the query may take.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum AuthQueryError {
    #[error("auth_user \"{user}\" cannot run auth_query on {addr}")]
    Server {
        user: String,
        addr: SocketAddr,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("auth_query did not answer within {LOOKUP_TIMEOUT:?}")]
    Timeout,
    #[error("auth_query must return (user name, secret) as text: {0}")]
    Columns(#[source] tokio_postgres::Error),
}

impl AuthQueryError {
    /// The SQLSTATE the client sees: 08006 when the server could not be
    /// reached, else 28000 (the server refused `auth_user` or the query;
    /// its own error is in the message).
    pub fn sqlstate(&self) -> &'static str {
        match self {
            AuthQueryError::Server { source, .. } if source.as_db_error().is_some() => "28000",
            AuthQueryError::Columns(_) => "28000",
            AuthQueryError::Server { .. } | AuthQueryError::Timeout => "08006",
        }
    }
}

/// Counters of the lookups (for `/metrics`).
#[derive(Debug, Default)]
pub struct AuthQueryStats {
    /// Queries sent to the server.
    pub lookups: AtomicU64,
    /// Logins answered from the cache.
    pub cache_hits: AtomicU64,
    /// Lookups that failed (server unreachable, login or query refused).
    pub failures: AtomicU64,
}

/// Secrets fetched by `auth_query`, per user name; `None` means the server
/// has no such user or no password for it.
#[derive(Debug, Default)]
pub struct AuthCache {
    entries: Mutex<HashMap<String, (Instant, Option<Secret>)>>,
    pub stats: AuthQueryStats,
}

impl AuthCache {
    fn get(&self, user: &str, ttl: Duration) -> Option<Option<Secret>> {
        let entries = self.lock();
        let (fetched, secret) = entries.get(user)?;
        (fetched.elapsed() < ttl).then(|| secret.clone())
    }

    fn put(&self, user: &str, secret: Option<Secret>) {
        let mut entries = self.lock();
        // Bounded: expired entries go when the map grows (a client trying
        // many names must not grow it without end).
        if entries.len() >= 10_000 {
            entries.clear();
        }
        entries.insert(user.to_owned(), (Instant::now(), secret));
    }

    /// Forgets a user's answer (its login failed).
    pub fn forget(&self, user: &str) {
        self.lock().remove(user);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (Instant, Option<Secret>)>> {
        self.entries
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }
}

/// The secret of `user` on the server, from the cache when fresh; `None`
/// when the server has no such user or no usable password for it.
pub(crate) async fn lookup(
    pooler: &Pooler,
    user: &str,
    database: &str,
) -> Result<Option<Secret>, AuthQueryError> {
    let config = &pooler.config;
    let cache = &pooler.auth_cache;
    if let Some(secret) = cache.get(user, config.auth_cache_ttl) {
        cache.stats.cache_hits.fetch_add(1, Ordering::Relaxed);
        return Ok(secret);
    }
    cache.stats.lookups.fetch_add(1, Ordering::Relaxed);
    let result = tokio::time::timeout(LOOKUP_TIMEOUT, query(pooler, user, database))
        .await
        .unwrap_or(Err(AuthQueryError::Timeout));
    match result {
        Ok(text) => {
            let secret = text.and_then(|text| match Secret::parse(&text) {
                Ok(secret) => Some(secret),
                Err(_) => {
                    warn!(user, "auth_query returned a secret that is neither md5 nor SCRAM-SHA-256; the user cannot log in through the pooler");
                    None
                }
            });
            debug!(user, found = secret.is_some(), "auth_query answered");
            cache.put(user, secret.clone());
            Ok(secret)
        }
        Err(error) => {
            cache.stats.failures.fetch_add(1, Ordering::Relaxed);
            warn!(user, error = %crate::error_chain(&error), "auth_query failed");
            Err(error)
        }
    }
}

/// Runs `auth_query` as `auth_user` on the primary: the secret text of
/// the first row, `None` for no row or a NULL secret.
async fn query(
    pooler: &Pooler,
    user: &str,
    database: &str,
) -> Result<Option<String>, AuthQueryError> {
    let config = &pooler.config;
    let auth_user = config
        .auth_user
        .as_deref()
        .and_then(|name| config.user(name))
        .expect("lookup is only called with a validated auth_user");
    let addr = pooler.primary();
    let server_error = |source| AuthQueryError::Server {
        user: auth_user.name.clone(),
        addr,
        source,
    };
    let mut login = tokio_postgres::Config::new();
    super::server_stream::aim_login(&mut login, addr, config.unix_socket_dir.as_deref());
    login
        .user(&auth_user.name)
        .dbname(config.auth_database.as_deref().unwrap_or(database))
        .application_name("farol-pooler-auth-query")
        .connect_timeout(LOOKUP_TIMEOUT);
    if let Some(password) = &auth_user.server_password {
        login.password(password);
    }
    let (client, connection) = login
        .connect(tokio_postgres::NoTls)
        .await
        .map_err(server_error)?;
    let driver = tokio::spawn(async move {
        let _ = connection.await;
    });
    let rows = client.query(config.auth_query(), &[&user]).await;
    drop(client);
    let _ = driver.await;
    let rows = rows.map_err(server_error)?;
    match rows.first() {
        None => Ok(None),
        Some(row) => row
            .try_get::<_, Option<String>>(1)
            .map_err(AuthQueryError::Columns),
    }
}
