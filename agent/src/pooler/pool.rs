//! Server connections and the pools that hold them, one pool per
//! (database, user, server).
//!
//! A client borrows a [`PooledServer`]: the connection plus a semaphore
//! permit. Dropping it closes the connection and returns the permit, so a
//! connection in an unknown state (client gone mid-query, server error) is
//! never reused by accident; [`Pool::release`] is the only way back to the
//! idle list. The hot path takes one uncontended mutex to pop or push an
//! idle connection and one semaphore permit.

use std::{
    collections::HashSet,
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use bytes::BytesMut;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    sync::{OwnedSemaphorePermit, Semaphore},
};
use tracing::{debug, info, warn};

use super::{auth, protocol, server_stream::ServerStream};
use crate::config::PoolConfig;

/// How long connecting and logging in to a server may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("no server connection available within query_wait_timeout ({waited:?}): all {pool_size} of pool {database}/{user} are busy")]
    Timeout {
        database: String,
        user: String,
        pool_size: usize,
        waited: Duration,
    },
    #[error("cannot connect to server {addr}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("server {addr} did not answer the login within {CONNECT_TIMEOUT:?}")]
    ConnectTimeout { addr: SocketAddr },
    #[error("server {addr} refused the login: {code} {message}")]
    Refused {
        addr: SocketAddr,
        code: String,
        message: String,
    },
    #[error("logging in to server {addr}")]
    Auth {
        addr: SocketAddr,
        #[source]
        source: auth::AuthError,
    },
    #[error("server {addr} broke the protocol during login")]
    Protocol {
        addr: SocketAddr,
        #[source]
        source: protocol::ProtocolError,
    },
    #[error("the pool is closed")]
    Closed,
}

impl PoolError {
    /// The SQLSTATE a client sees for this failure.
    pub fn sqlstate(&self) -> &str {
        match self {
            PoolError::Timeout { .. } => "53300",
            PoolError::Refused { code, .. } => code,
            _ => "08006",
        }
    }
}

/// One logged-in server connection.
#[derive(Debug)]
pub struct ServerConn {
    pub stream: ServerStream,
    /// Bytes read from the server not yet handled.
    pub buf: BytesMut,
    pub addr: SocketAddr,
    pub process_id: i32,
    pub secret_key: i32,
    /// Hashes of the statements prepared on this connection under
    /// `farol_<hash>` names (transaction mode).
    pub prepared: HashSet<u64>,
    pub id: u64,
    created: Instant,
    last_used: Instant,
}

impl ServerConn {
    /// An idle connection has nothing to say: readable means the server
    /// closed it or sent a FATAL error (restart, pg_terminate_backend).
    /// Uses the reactor's cached readiness, so it costs no syscall when
    /// nothing happened.
    pub(crate) fn looks_alive(&self) -> bool {
        let mut probe = [0u8; 1];
        matches!(self.stream.try_read(&mut probe), Err(error) if error.kind() == std::io::ErrorKind::WouldBlock)
    }
}

/// What a server told a new connection: ParameterStatus pairs.
pub type ServerParams = Vec<(String, String)>;

/// Login data for one pool's server connections.
#[derive(Debug, Clone)]
pub struct PoolKey {
    pub database: String,
    pub user: String,
    pub addr: SocketAddr,
    /// Set: a server on this host is reached through its Unix socket here.
    pub unix_socket_dir: Option<std::path::PathBuf>,
}

/// Counters shown by `SHOW STATS` and `/metrics`.
#[derive(Debug, Default)]
pub struct PoolStats {
    pub transactions: AtomicU64,
    pub queries: AtomicU64,
    pub wait_timeouts: AtomicU64,
    pub server_connects: AtomicU64,
    pub bytes_received: AtomicU64,
    pub bytes_sent: AtomicU64,
    /// Clients waiting for a server connection right now.
    pub waiting: AtomicU64,
    /// Transactions held by a pause right now, and in all (see `pause`).
    pub held: AtomicU64,
    pub held_total: AtomicU64,
    pub held_micros_total: AtomicU64,
    /// Session-mode clients whose server connection runs something now
    /// (from a client message at idle to the next ReadyForQuery 'I'): what
    /// a pause drains in a session pool.
    pub sessions_busy: AtomicU64,
}

#[derive(Debug)]
pub struct Pool {
    pub key: PoolKey,
    pub settings: PoolConfig,
    /// How this pool logs in; changes when an `auth_query` user logs in
    /// with a new secret.
    credential: Mutex<auth::ServerCredential>,
    idle: Mutex<Vec<ServerConn>>,
    permits: Arc<Semaphore>,
    params: Mutex<Option<Arc<ServerParams>>>,
    next_id: AtomicU64,
    pub stats: PoolStats,
}

/// A server connection lent to one client.
#[derive(Debug)]
pub struct PooledServer {
    pub conn: ServerConn,
    _permit: OwnedSemaphorePermit,
}

impl Pool {
    pub fn new(key: PoolKey, settings: PoolConfig, credential: auth::ServerCredential) -> Pool {
        let permits = Arc::new(Semaphore::new(settings.pool_size));
        Pool {
            key,
            settings,
            credential: Mutex::new(credential),
            idle: Mutex::new(Vec::new()),
            permits,
            params: Mutex::new(None),
            next_id: AtomicU64::new(1),
            stats: PoolStats::default(),
        }
    }

    /// Replaces how new server connections log in (a user found by
    /// `auth_query` logged in with a new secret).
    pub fn set_credential(&self, credential: auth::ServerCredential) {
        *self
            .credential
            .lock()
            .unwrap_or_else(|poison| poison.into_inner()) = credential;
    }

    /// Borrows a server connection, waiting up to `query_wait_timeout`.
    pub async fn get(&self) -> Result<PooledServer, PoolError> {
        let permit = match self.permits.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                self.stats.waiting.fetch_add(1, Ordering::Relaxed);
                let waited = tokio::time::timeout(
                    self.settings.query_wait_timeout,
                    self.permits.clone().acquire_owned(),
                )
                .await;
                self.stats.waiting.fetch_sub(1, Ordering::Relaxed);
                match waited {
                    Ok(Ok(permit)) => permit,
                    Ok(Err(_)) => return Err(PoolError::Closed),
                    Err(_) => {
                        self.stats.wait_timeouts.fetch_add(1, Ordering::Relaxed);
                        return Err(PoolError::Timeout {
                            database: self.key.database.clone(),
                            user: self.key.user.clone(),
                            pool_size: self.settings.pool_size,
                            waited: self.settings.query_wait_timeout,
                        });
                    }
                }
            }
        };
        self.get_with(permit).await
    }

    /// Borrows a server connection only when one is free now: `None`
    /// when every connection of the pool is lent (no queue, no wait).
    pub async fn get_now(&self) -> Result<Option<PooledServer>, PoolError> {
        match self.permits.clone().try_acquire_owned() {
            Ok(permit) => self.get_with(permit).await.map(Some),
            Err(_) => Ok(None),
        }
    }

    async fn get_with(&self, permit: OwnedSemaphorePermit) -> Result<PooledServer, PoolError> {
        let now = Instant::now();
        loop {
            let candidate = self.lock_idle().pop();
            match candidate {
                Some(conn) if self.expired(&conn, now) => {
                    debug!(server = conn.id, "closing an expired server connection");
                }
                Some(conn) if !conn.looks_alive() => {
                    debug!(
                        server = conn.id,
                        "dropping an idle server connection the server closed"
                    );
                }
                Some(conn) => {
                    return Ok(PooledServer {
                        conn,
                        _permit: permit,
                    })
                }
                None => break,
            }
        }
        let conn = self.connect().await?;
        Ok(PooledServer {
            conn,
            _permit: permit,
        })
    }

    /// Returns a connection that is idle (ReadyForQuery 'I', nothing in
    /// flight) to the pool; one past its lifetime is closed instead.
    pub fn release(&self, mut server: PooledServer) {
        let now = Instant::now();
        if now.duration_since(server.conn.created) >= self.settings.server_lifetime {
            debug!(
                server = server.conn.id,
                "server connection reached server_lifetime"
            );
            return;
        }
        server.conn.last_used = now;
        self.lock_idle().push(server.conn);
    }

    fn lock_idle(&self) -> std::sync::MutexGuard<'_, Vec<ServerConn>> {
        // A panic while holding this lock cannot leave the Vec inconsistent.
        self.idle
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    fn expired(&self, conn: &ServerConn, now: Instant) -> bool {
        now.duration_since(conn.created) >= self.settings.server_lifetime
            || now.duration_since(conn.last_used) >= self.settings.idle_timeout
    }

    /// Closes idle connections past their limits, keeping `min_idle`, and
    /// opens connections up to `min_idle`. Called periodically.
    pub async fn maintain(&self) {
        let now = Instant::now();
        let (closed, missing) = {
            let mut idle = self.lock_idle();
            let before = idle.len();
            let min_idle = self.settings.min_idle;
            let mut kept = 0;
            idle.retain(|conn| {
                let keep = now.duration_since(conn.created) < self.settings.server_lifetime
                    && (kept < min_idle
                        || now.duration_since(conn.last_used) < self.settings.idle_timeout);
                kept += usize::from(keep);
                keep
            });
            let busy = self.settings.pool_size - self.permits.available_permits();
            let total = idle.len() + busy;
            let missing = min_idle
                .saturating_sub(idle.len())
                .min(self.settings.pool_size.saturating_sub(total));
            (before - idle.len(), missing)
        };
        if closed > 0 {
            debug!(closed, database = %self.key.database, "closed idle server connections");
        }
        for _ in 0..missing {
            match self.connect().await {
                Ok(conn) => self.lock_idle().push(conn),
                Err(error) => {
                    warn!(error = %crate::error_chain(&error), "cannot open min_idle server connection");
                    break;
                }
            }
        }
    }

    /// Closes every idle connection (its server is no longer the primary).
    pub fn close_idle(&self) {
        let closed = std::mem::take(&mut *self.lock_idle()).len();
        if closed > 0 {
            info!(server = %self.key.addr, closed, "closed idle server connections to a former primary");
        }
    }

    pub fn idle_count(&self) -> usize {
        self.lock_idle().len()
    }

    pub fn active_count(&self) -> usize {
        self.settings.pool_size - self.permits.available_permits()
    }

    /// The ParameterStatus set of this pool's server, from its first login.
    pub async fn params(&self) -> Result<Arc<ServerParams>, PoolError> {
        if let Some(params) = self.cached_params() {
            return Ok(params);
        }
        let server = self.get().await?;
        self.release(server);
        self.cached_params().ok_or(PoolError::Closed)
    }

    fn cached_params(&self) -> Option<Arc<ServerParams>> {
        self.params
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
            .clone()
    }

    async fn connect(&self) -> Result<ServerConn, PoolError> {
        let addr = self.key.addr;
        let (conn, params) = tokio::time::timeout(CONNECT_TIMEOUT, self.login())
            .await
            .map_err(|_| PoolError::ConnectTimeout { addr })??;
        self.stats.server_connects.fetch_add(1, Ordering::Relaxed);
        let mut cached = self
            .params
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        if cached.is_none() {
            let transport = if conn.stream.is_unix() {
                "unix socket"
            } else {
                "tcp"
            };
            info!(server = %addr, database = %self.key.database, user = %self.key.user, transport, "first server connection of the pool");
            *cached = Some(Arc::new(params));
        }
        Ok(conn)
    }

    async fn login(&self) -> Result<(ServerConn, ServerParams), PoolError> {
        let addr = self.key.addr;
        let mut stream = ServerStream::connect(addr, self.key.unix_socket_dir.as_deref())
            .await
            .map_err(|source| PoolError::Connect { addr, source })?;
        let io = |source| PoolError::Connect { addr, source };
        let mut out = BytesMut::with_capacity(256);
        protocol::startup_message(
            &mut out,
            &[
                ("user", &self.key.user),
                ("database", &self.key.database),
                ("application_name", "farol"),
            ],
        );
        stream.write_all(&out).await.map_err(io)?;
        let mut buf = BytesMut::with_capacity(8192);
        let mut login = auth::ServerLogin::default();
        let credential = self
            .credential
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
            .clone();
        let mut params = Vec::new();
        let mut keys = (0, 0);
        loop {
            let (tag, len) = loop {
                match protocol::frame(&buf)
                    .map_err(|source| PoolError::Protocol { addr, source })?
                {
                    Some((tag, len)) if buf.len() >= len => break (tag, len),
                    _ => {
                        if stream.read_buf(&mut buf).await.map_err(io)? == 0 {
                            return Err(io(std::io::ErrorKind::UnexpectedEof.into()));
                        }
                    }
                }
            };
            let frame = buf.split_to(len);
            let body = &frame[5..];
            match tag {
                b'R' => {
                    out.clear();
                    login
                        .answer(&self.key.user, &credential, body, &mut out)
                        .map_err(|source| PoolError::Auth { addr, source })?;
                    if !out.is_empty() {
                        stream.write_all(&out).await.map_err(io)?;
                    }
                }
                b'S' => {
                    let mut fields = body.split(|&b| b == 0);
                    let name = String::from_utf8_lossy(fields.next().unwrap_or_default());
                    let value = String::from_utf8_lossy(fields.next().unwrap_or_default());
                    params.push((name.into_owned(), value.into_owned()));
                }
                b'K' if body.len() == 8 => {
                    keys = (
                        i32::from_be_bytes([body[0], body[1], body[2], body[3]]),
                        i32::from_be_bytes([body[4], body[5], body[6], body[7]]),
                    );
                }
                b'E' => {
                    let fields = protocol::error_fields(body);
                    let field = |code| {
                        fields
                            .iter()
                            .find(|(c, _)| *c == code)
                            .map(|(_, v)| (*v).to_owned())
                            .unwrap_or_default()
                    };
                    return Err(PoolError::Refused {
                        addr,
                        code: field(b'C'),
                        message: field(b'M'),
                    });
                }
                b'Z' => break,
                _ => {}
            }
        }
        let now = Instant::now();
        Ok((
            ServerConn {
                stream,
                buf,
                addr,
                process_id: keys.0,
                secret_key: keys.1,
                prepared: HashSet::new(),
                id: self.next_id.fetch_add(1, Ordering::Relaxed),
                created: now,
                last_used: now,
            },
            params,
        ))
    }
}
