//! Farol's PostgreSQL pooler: PgBouncer's job (and pgpool-II's connection
//! limiting) inside the agent, speaking protocol v3.
//!
//! # Layout
//! - [`protocol`]: typed messages both ways; "need more bytes" is a value.
//! - [`auth`]: md5 and SCRAM-SHA-256 for clients, the server login.
//! - [`pool`]: server connections and pools per (database, user, server).
//! - `session`: one task per client: startup, auth, then the relay, with
//!   prepared statements renamed and re-prepared in transaction mode.
//! - `session_split`: the read/write split in session pools (a kept
//!   standby connection per session, settings replayed on it).
//! - `admin`: `SHOW POOLS|CLIENTS|SERVERS|STATS` on the admin database.
//!
//! - [`route`]: read/write split (which statements may run on a standby).
//! - [`topology`]: which server is the primary and which standbys may take
//!   reads, from what the servers answer (failover routing, lag bound).
//!
//! - [`pause`]: PAUSE/RESUME, and the pause around a planned switchover.
//! - [`auth_query`]: users not in the config, checked against the secret
//!   the server holds (PgBouncer's `auth_user`/`auth_query`).

pub mod auth;
pub mod auth_query;
pub mod pool;
pub mod protocol;

pub mod pause;
pub mod route;
pub mod topology;

mod admin;
pub mod kernel_relay;
pub mod listen_socket;
pub mod server_stream;
mod session;
pub mod session_split;
mod tls;

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, RwLock,
    },
    time::{Duration, Instant},
};

use bytes::BytesMut;
use tokio::{
    io::AsyncWriteExt,
    net::TcpListener,
    sync::{watch, Semaphore},
    task::JoinSet,
};
use tracing::{debug, info, warn};

use self::pool::{Pool, PoolKey};
use self::server_stream::ServerStream;
use crate::config::PoolerConfig;

/// How often idle limits and `min_idle` are enforced.
const MAINTAIN_EVERY: Duration = Duration::from_secs(1);
/// How long shutdown waits for clients to finish.
const DRAIN_DEADLINE: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum PoolerError {
    #[error("cannot listen on {addr} for PostgreSQL clients (pooler.listen)")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot listen on {path} for PostgreSQL clients (pooler.listen_socket_dir)")]
    BindSocket {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("accepting a client connection")]
    Accept(#[source] std::io::Error),
    #[error("pooler TLS: cannot use {what}")]
    Tls {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

/// Where a client's current transaction runs, for cancel requests.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CancelTarget {
    pub(crate) addr: SocketAddr,
    pub(crate) process_id: i32,
    pub(crate) secret_key: i32,
}

/// Where a client connected from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ClientPeer {
    Tcp(SocketAddr),
    /// `pooler.listen_socket_dir`: a process on this node.
    Unix,
}

impl ClientPeer {
    pub(crate) fn is_tcp(&self) -> bool {
        matches!(self, ClientPeer::Tcp(_))
    }
}

impl std::fmt::Display for ClientPeer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientPeer::Tcp(addr) => addr.fmt(f),
            ClientPeer::Unix => f.write_str("unix"),
        }
    }
}

/// A connected client, as the admin console and cancel requests see it.
#[derive(Debug)]
pub(crate) struct ClientEntry {
    pub(crate) peer: ClientPeer,
    pub(crate) user: String,
    pub(crate) database: String,
    pub(crate) since: Instant,
    /// The server connection running this client's transaction, if any.
    pub(crate) server: Mutex<Option<CancelTarget>>,
}

impl ClientEntry {
    pub(crate) fn set_server(&self, target: Option<CancelTarget>) {
        *self
            .server
            .lock()
            .unwrap_or_else(|poison| poison.into_inner()) = target;
    }

    fn server(&self) -> Option<CancelTarget> {
        *self
            .server
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }
}

/// State shared by every session: the config, the pools, the clients.
pub struct Pooler {
    pub(crate) config: PoolerConfig,
    /// Set when `read_write_split` is on.
    pub(crate) router: Option<route::Router>,
    /// Set when `tls_cert` and `tls_key` are configured.
    pub(crate) tls: Option<tls::TlsSetup>,
    pools: Mutex<HashMap<(String, String, SocketAddr), Arc<Pool>>>,
    clients: Mutex<HashMap<(i32, i32), Arc<ClientEntry>>>,
    client_slots: Arc<Semaphore>,
    primary: RwLock<SocketAddr>,
    /// Standbys that may take reads now; None until the first role check
    /// (then every configured standby may).
    readable_standbys: RwLock<Option<Vec<SocketAddr>>>,
    /// Bumped when the primary or the readable standbys change, so
    /// sessions refetch their pools; a session holding a connection to a
    /// primary that is no longer one is ended.
    topology: watch::Sender<u64>,
    /// Times the primary moved.
    primary_changes: AtomicU64,
    /// Asks the role checks for a look now (the cluster's primary record
    /// moved): see [`topology::recheck_on_change`].
    recheck: tokio::sync::Notify,
    /// Holds new transactions during a switchover or after PAUSE.
    pub pause: pause::Pause,
    /// Secrets fetched with `auth_query`.
    pub(crate) auth_cache: auth_query::AuthCache,
    /// Counters of the read/write split in session pools.
    pub(crate) split_stats: session_split::SplitStats,
    /// How the pooler logs in as users found by `auth_query`, from their
    /// clients' last successful login.
    looked_up_credentials: Mutex<HashMap<String, auth::ServerCredential>>,
    /// Set when `kernel_relay` is on (loaded or not: see `available`).
    pub(crate) kernel_relay: Option<Arc<kernel_relay::KernelRelay>>,
}

impl Pooler {
    /// Builds the shared state; fails only when the TLS certificate or key
    /// cannot be used.
    pub fn new(config: PoolerConfig) -> Result<Arc<Pooler>, PoolerError> {
        let tls = match (&config.tls_cert, &config.tls_key) {
            (Some(cert), Some(key)) => Some(tls::TlsSetup::load(cert, key)?),
            _ => None,
        };
        Ok(Arc::new(Pooler {
            tls,
            router: config
                .read_write_split
                .then(|| route::Router::new(&config.primary_functions)),
            client_slots: Arc::new(Semaphore::new(config.max_client_conn)),
            primary: RwLock::new(config.primary),
            readable_standbys: RwLock::new(None),
            topology: watch::Sender::new(0),
            primary_changes: AtomicU64::new(0),
            recheck: tokio::sync::Notify::new(),
            pause: pause::Pause::default(),
            auth_cache: auth_query::AuthCache::default(),
            split_stats: session_split::SplitStats::default(),
            looked_up_credentials: Mutex::new(HashMap::new()),
            kernel_relay: config
                .kernel_relay
                .then(|| Arc::new(kernel_relay::KernelRelay::start())),
            pools: Mutex::new(HashMap::new()),
            clients: Mutex::new(HashMap::new()),
            config,
        }))
    }

    /// The failover hook: new transactions go to `addr` from now on; idle
    /// connections to the old primary are closed, and sessions holding
    /// one (in a transaction, or in session mode) are ended with an error
    /// that says so, rather than left to hang on a dead or demoted server.
    pub fn set_primary(&self, addr: SocketAddr) {
        let old = {
            let mut primary = self
                .primary
                .write()
                .unwrap_or_else(|poison| poison.into_inner());
            std::mem::replace(&mut *primary, addr)
        };
        if old == addr {
            return;
        }
        info!(old = %old, new = %addr, "pooler: primary changed; new transactions go to the new primary");
        self.primary_changes.fetch_add(1, Ordering::Relaxed);
        for pool in self.pools() {
            if pool.key.addr == old {
                pool.close_idle();
            }
        }
        self.topology.send_modify(|generation| *generation += 1);
        self.pause.primary_moved(old, addr);
    }

    /// The standbys that may take reads (from the role checks).
    pub fn set_readable_standbys(&self, standbys: Vec<SocketAddr>) {
        let mut readable = self
            .readable_standbys
            .write()
            .unwrap_or_else(|poison| poison.into_inner());
        if readable.as_ref() == Some(&standbys) {
            return;
        }
        if readable.is_some() || standbys != self.config.standbys {
            info!(standbys = ?standbys, "pooler: standbys taking reads changed");
        }
        *readable = Some(standbys);
        drop(readable);
        self.topology.send_modify(|generation| *generation += 1);
    }

    pub fn primary(&self) -> SocketAddr {
        *self
            .primary
            .read()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    /// Times the primary moved (a metric).
    pub fn primary_changes(&self) -> u64 {
        self.primary_changes.load(Ordering::Relaxed)
    }

    /// Secrets fetched with `auth_query` (a metric).
    pub fn auth_query_lookups(&self) -> u64 {
        self.auth_cache.stats.lookups.load(Ordering::Relaxed)
    }

    /// Logins of `auth_query` users answered from the cache (a metric).
    pub fn auth_query_cache_hits(&self) -> u64 {
        self.auth_cache.stats.cache_hits.load(Ordering::Relaxed)
    }

    /// `auth_query` lookups that failed (a metric).
    pub fn auth_query_failures(&self) -> u64 {
        self.auth_cache.stats.failures.load(Ordering::Relaxed)
    }

    /// The standbys that take reads now.
    pub fn readable_standbys(&self) -> Vec<SocketAddr> {
        let primary = self.primary();
        self.readable_standbys
            .read()
            .unwrap_or_else(|poison| poison.into_inner())
            .clone()
            .unwrap_or_else(|| self.config.standbys.clone())
            .into_iter()
            .filter(|addr| *addr != primary)
            .collect()
    }

    pub(crate) fn topology_generation(&self) -> u64 {
        *self.topology.borrow()
    }

    pub(crate) fn watch_topology(&self) -> watch::Receiver<u64> {
        self.topology.subscribe()
    }

    /// The pool for (database, user) on the current primary, if configured.
    pub(crate) fn primary_pool(&self, database: &str, user: &str) -> Option<Arc<Pool>> {
        self.pool_on(database, user, self.primary())
    }

    /// The pools for (database, user) on every standby that may take reads.
    pub(crate) fn standby_pools(&self, database: &str, user: &str) -> Vec<Arc<Pool>> {
        self.readable_standbys()
            .into_iter()
            .filter_map(|addr| self.pool_on(database, user, addr))
            .collect()
    }

    fn pool_on(&self, database: &str, user: &str, addr: SocketAddr) -> Option<Arc<Pool>> {
        let settings = self.config.pool(database, user)?;
        let credential = match self.config.user(user) {
            Some(configured) => configured.server_password.clone().map_or(
                auth::ServerCredential::None,
                auth::ServerCredential::Password,
            ),
            None => self
                .looked_up_credentials
                .lock()
                .unwrap_or_else(|poison| poison.into_inner())
                .get(user)?
                .clone(),
        };
        let mut pools = self
            .pools
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        let pool = pools
            .entry((database.to_owned(), user.to_owned(), addr))
            .or_insert_with(|| {
                Arc::new(Pool::new(
                    PoolKey {
                        database: database.to_owned(),
                        user: user.to_owned(),
                        addr,
                        unix_socket_dir: self.config.unix_socket_dir.clone(),
                    },
                    settings.clone(),
                    credential,
                ))
            });
        Some(pool.clone())
    }

    /// How to log in as a user found by `auth_query`, from a client's
    /// successful login; the user's pools use it for new connections.
    pub(crate) fn remember_credential(&self, user: &str, credential: auth::ServerCredential) {
        let changed = {
            let mut credentials = self
                .looked_up_credentials
                .lock()
                .unwrap_or_else(|poison| poison.into_inner());
            let changed = credentials.get(user) != Some(&credential);
            if changed {
                credentials.insert(user.to_owned(), credential.clone());
            }
            changed
        };
        if changed {
            debug!(
                user,
                "pooler: new server credential from an auth_query login"
            );
            for pool in self.pools() {
                if pool.key.user == user {
                    pool.set_credential(credential.clone());
                }
            }
        }
    }

    /// Every pool made so far, sorted by database, user and server.
    pub fn pools(&self) -> Vec<Arc<Pool>> {
        let pools = self
            .pools
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        let mut list: Vec<Arc<Pool>> = pools.values().cloned().collect();
        list.sort_by(|a, b| {
            (&a.key.database, &a.key.user, a.key.addr).cmp(&(
                &b.key.database,
                &b.key.user,
                b.key.addr,
            ))
        });
        list
    }

    pub(crate) fn clients(&self) -> Vec<Arc<ClientEntry>> {
        let clients = self
            .clients
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        clients.values().cloned().collect()
    }

    /// Registers a client under a fresh random BackendKeyData.
    pub(crate) fn register(&self, entry: Arc<ClientEntry>) -> (i32, i32) {
        let mut clients = self
            .clients
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        loop {
            let key: (i32, i32) = (rand::random::<i32>() & 0x7fff_ffff, rand::random());
            if let std::collections::hash_map::Entry::Vacant(slot) = clients.entry(key) {
                slot.insert(entry);
                return key;
            }
        }
    }

    pub(crate) fn unregister(&self, key: (i32, i32)) {
        self.clients
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
            .remove(&key);
    }

    /// Forwards a CancelRequest to the server running that client's query.
    pub(crate) async fn cancel(&self, process_id: i32, secret_key: i32) {
        let entry = self
            .clients
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
            .get(&(process_id, secret_key))
            .cloned();
        let Some(target) = entry.and_then(|entry| entry.server()) else {
            debug!("cancel request for no running query");
            return;
        };
        send_cancel(target, self.config.unix_socket_dir.as_deref()).await;
    }
}

impl std::fmt::Debug for Pooler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pooler")
            .field("config", &self.config)
            .field("tls", &self.tls.is_some())
            .field("primary", &self.primary())
            .finish_non_exhaustive()
    }
}

/// Sends a CancelRequest to a server; failures are only logged.
pub(crate) async fn send_cancel(target: CancelTarget, unix_socket_dir: Option<&std::path::Path>) {
    let mut out = BytesMut::with_capacity(16);
    protocol::cancel_request(&mut out, target.process_id, target.secret_key);
    let sent = async {
        let mut stream = ServerStream::connect(target.addr, unix_socket_dir).await?;
        stream.write_all(&out).await?;
        stream.shutdown().await
    };
    match tokio::time::timeout(Duration::from_secs(5), sent).await {
        Ok(Ok(())) => debug!(server = %target.addr, pid = target.process_id, "cancel request sent"),
        Ok(Err(error)) => warn!(server = %target.addr, %error, "cannot send cancel request"),
        Err(_) => warn!(server = %target.addr, "cancel request timed out"),
    }
}

/// Binds the client port; done before anything else starts so a port
/// conflict is reported at once.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, PoolerError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| PoolerError::Bind { addr, source })
}

/// The next client on this node's Unix socket; never, without one.
async fn accept_local(
    socket: Option<&listen_socket::ClientSocket>,
) -> std::io::Result<tokio::net::UnixStream> {
    match socket {
        Some(socket) => socket.accept().await,
        None => std::future::pending().await,
    }
}

/// Accepts clients until `shutdown` turns true, then drains them with a
/// deadline.
pub async fn run(
    pooler: Arc<Pooler>,
    listener: TcpListener,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), PoolerError> {
    let socket = match &pooler.config.listen_socket_dir {
        Some(dir) => {
            let port = listener
                .local_addr()
                .map_or(pooler.config.listen.port(), |addr| addr.port());
            Some(listen_socket::ClientSocket::bind(dir, port)?)
        }
        None => None,
    };
    info!(
        listen = %pooler.config.listen,
        socket = ?socket.as_ref().map(|s| s.path().display().to_string()),
        primary = %pooler.primary(),
        "pooler running"
    );
    let roles = tokio::spawn(topology::follow(pooler.clone(), shutdown.clone()));
    let mut sessions = JoinSet::new();
    let mut maintain = tokio::time::interval(MAINTAIN_EVERY);
    maintain.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let result = loop {
        tokio::select! {
            () = async { let _ = shutdown.wait_for(|stop| *stop).await; } => break Ok(()),
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(accepted) => accepted,
                    Err(error) if is_transient(&error) => {
                        warn!(%error, "accept failed; continuing");
                        // Out of file descriptors: give sessions a moment
                        // to close some instead of spinning.
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                    Err(error) => break Err(PoolerError::Accept(error)),
                };
                let _ = stream.set_nodelay(true);
                let pooler = pooler.clone();
                sessions.spawn(async move { session::serve(stream, ClientPeer::Tcp(peer), pooler).await });
            }
            accepted = accept_local(socket.as_ref()) => {
                let stream = match accepted {
                    Ok(stream) => stream,
                    Err(error) if is_transient(&error) => {
                        warn!(%error, "accept on the Unix socket failed; continuing");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                    Err(error) => break Err(PoolerError::Accept(error)),
                };
                let pooler = pooler.clone();
                sessions.spawn(async move { session::serve(stream, ClientPeer::Unix, pooler).await });
            }
            _ = maintain.tick() => {
                for pool in pooler.pools() {
                    pool.maintain().await;
                }
            }
            Some(_) = sessions.join_next(), if !sessions.is_empty() => {}
        }
    };
    drop(listener);
    drop(socket);
    roles.abort();
    if !sessions.is_empty() {
        info!(clients = sessions.len(), "pooler draining clients");
        let drained = tokio::time::timeout(DRAIN_DEADLINE, async {
            while sessions.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            warn!(
                clients = sessions.len(),
                "pooler drain deadline passed; closing clients"
            );
            sessions.abort_all();
        }
    }
    info!("pooler stopped");
    result
}

fn is_transient(error: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        error.kind(),
        ConnectionAborted | ConnectionReset | Interrupted | WouldBlock
    ) || error.raw_os_error() == Some(libc::EMFILE)
        || error.raw_os_error() == Some(libc::ENFILE)
}
