//! One task per client: startup (SSL refused with 'N', cancel requests
//! routed), authentication, then the relay between the client and a
//! borrowed server connection.
//!
//! The relay only parses message headers and passes bytes through in
//! batches (one write per read), except in transaction mode, where named
//! prepared statements are renamed to `farol_<hash of query and types>`
//! and re-prepared on whichever server connection runs them (PgBouncer
//! 1.21's scheme). A queue of the responses still expected from the server
//! tells when a skipped Parse or Close must be answered by the pooler, when
//! an injected Parse's ParseComplete must be swallowed, and when the
//! transaction is over so the connection goes back to the pool.
//!
//! Session pools with `read_write_split` run the same bookkeeping, with
//! the session's own primary and standby connections in place of the pool
//! (see `session_split`).

use std::{
    collections::{HashMap, VecDeque},
    hash::{DefaultHasher, Hash, Hasher},
    net::SocketAddr,
    sync::{atomic::Ordering, Arc},
    time::{Duration, Instant},
};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tracing::{debug, info, warn};

use super::{
    admin,
    auth::{self, AuthError, ScramServer, Secret, ServerCredential},
    auth_query, kernel_relay,
    kernel_relay::{Fallback, Hangup, HangupWatch, KernelRelay, TakeBack},
    pool::{Pool, PoolError, PooledServer},
    protocol::{self, FrontendMessage, ProtocolError, Startup},
    route::{Router, SessionEffect, Target},
    server_stream::ServerStream,
    session_split::{Parked, PinReason, ReplayError, SessionSplit, Side},
    CancelTarget, ClientEntry, ClientPeer, Pooler,
};
use crate::config::PoolMode;
use crate::dataplane::socket_relay::PairError;
use farol_common::socket_relay::TERMINATE_MESSAGE;
use std::os::fd::AsFd;

/// How long a client may take to log in.
const LOGIN_TIMEOUT: Duration = Duration::from_secs(15);
/// How much of an unfinished batch the relay holds back until its end
/// arrives, to route it whole (read/write split only).
const BATCH_HOLD_BYTES: usize = 1 << 20;
/// How long the reset of a session-mode connection may take.
const RESET_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub(crate) enum SessionError {
    #[error("client connection")]
    ClientIo(#[source] std::io::Error),
    #[error("server connection")]
    ServerIo(#[source] std::io::Error),
    #[error("the server closed the connection")]
    ServerClosed,
    #[error("client broke the protocol")]
    ClientProtocol(#[source] ProtocolError),
    #[error("server broke the protocol")]
    ServerProtocol(#[source] ProtocolError),
    #[error("authentication")]
    Auth(#[source] AuthError),
    #[error("looking up user \"{user}\" with auth_query")]
    AuthQuery {
        user: String,
        #[source]
        error: auth_query::AuthQueryError,
    },
    #[error("getting a server connection")]
    Pool(#[source] PoolError),
    #[error("the client did not log in within {LOGIN_TIMEOUT:?}")]
    LoginTimeout,
    #[error("refused: {message}")]
    Refused { code: &'static str, message: String },
    #[error("TLS handshake with the client")]
    Tls(#[source] std::io::Error),
    #[error("the primary moved from {old} to {new} while this session held a connection to {old}")]
    PrimaryMoved { old: SocketAddr, new: SocketAddr },
    #[error("this transaction was held {} ms while the pooler was paused for {reason}, the limit of pooler.pause_wait_timeout", waited.as_millis())]
    PauseTimeout { waited: Duration, reason: String },
    #[error("the pooler paused for {reason} and this transaction on {server} did not finish within pooler.pause_drain_timeout ({drain:?})")]
    PauseCut {
        reason: String,
        server: SocketAddr,
        drain: Duration,
    },
    #[error("bytes the in-kernel relay should have passed on reached the pooler")]
    KernelRelayDesync,
}

/// What a client connection is: plain TCP or TLS over it.
/// ('static: the in-kernel relay looks for a plain `TcpStream` by type.)
pub(crate) trait ClientStream: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> ClientStream for S {}

/// Entry point of a client task; never fails, logs once.
pub(super) async fn serve<S: ClientStream>(mut stream: S, peer: ClientPeer, pooler: Arc<Pooler>) {
    let Ok(_slot) = pooler.client_slots.clone().try_acquire_owned() else {
        let mut out = BytesMut::new();
        let limit = pooler.config.max_client_conn;
        protocol::error_response(
            &mut out,
            "FATAL",
            "53300",
            &format!("too many client connections (pooler.max_client_conn is {limit})"),
        );
        // The client's startup packet is not read: it gets the refusal
        // first, as PostgreSQL does for too many clients.
        let _ = stream.write_all(&out).await;
        info!(%peer, limit, "refused a client over max_client_conn");
        return;
    };
    match negotiate(stream, peer, &pooler).await {
        Ok(()) => debug!(%peer, "client left"),
        Err(error) => debug!(%peer, error = %crate::error_chain(&error), "client session ended"),
    }
}

/// The first packet: an SSLRequest gets TLS when a certificate is
/// configured ('S', then the handshake), else 'N' and plain text
/// (protocol docs 55.2.10 "SSL Session Encryption").
async fn negotiate<S: ClientStream>(
    mut stream: S,
    peer: ClientPeer,
    pooler: &Arc<Pooler>,
) -> Result<(), SessionError> {
    let mut buf = BytesMut::with_capacity(8192);
    let first = tokio::time::timeout(LOGIN_TIMEOUT, async {
        loop {
            match protocol::parse_startup(&buf) {
                Ok(None) => {
                    if stream
                        .read_buf(&mut buf)
                        .await
                        .map_err(SessionError::ClientIo)?
                        == 0
                    {
                        return Ok(false);
                    }
                }
                Ok(Some((Startup::SslRequest, used))) => {
                    buf.advance(used);
                    return Ok(true);
                }
                // Anything else, errors included, is for `session`.
                _ => return Ok::<_, SessionError>(false),
            }
        }
    })
    .await
    .map_err(|_| SessionError::LoginTimeout)??;
    if first {
        // As PostgreSQL: no TLS on a Unix socket ('N', then plain text).
        if let Some(tls) = pooler.tls.as_ref().filter(|_| peer.is_tcp()) {
            stream
                .write_all(b"S")
                .await
                .map_err(SessionError::ClientIo)?;
            let encrypted = tokio::time::timeout(LOGIN_TIMEOUT, tls.acceptor.accept(stream))
                .await
                .map_err(|_| SessionError::LoginTimeout)?
                .map_err(SessionError::Tls)?;
            let binding = tls.end_point.as_deref();
            return session(encrypted, buf, peer, pooler, binding).await;
        }
        stream
            .write_all(b"N")
            .await
            .map_err(SessionError::ClientIo)?;
    }
    if buf.is_empty() && !first {
        // The client left before sending anything.
        return Ok(());
    }
    session(stream, buf, peer, pooler, None).await
}

async fn session<S: ClientStream>(
    mut stream: S,
    mut buf: BytesMut,
    peer: ClientPeer,
    pooler: &Arc<Pooler>,
    // The TLS channel binding data when the client came over TLS.
    binding: Option<&[u8]>,
) -> Result<(), SessionError> {
    let login = tokio::time::timeout(LOGIN_TIMEOUT, startup(&mut stream, &mut buf, pooler)).await;
    let (user, database) = match login {
        Err(_) => return Err(SessionError::LoginTimeout),
        Ok(Ok(Some(names))) => names,
        Ok(Ok(None)) => return Ok(()),
        Ok(Err(error)) => {
            refuse(&mut stream, &error).await;
            return Err(error);
        }
    };
    let login = check_login(&mut stream, &mut buf, pooler, &user, &database, binding);
    let pool = match tokio::time::timeout(LOGIN_TIMEOUT, login).await {
        Err(_) => return Err(SessionError::LoginTimeout),
        Ok(Err(error)) => {
            refuse(&mut stream, &error).await;
            return Err(error);
        }
        Ok(Ok(pool)) => pool,
    };
    let entry = Arc::new(ClientEntry {
        peer,
        user: user.clone(),
        database: database.clone(),
        since: Instant::now(),
        server: std::sync::Mutex::new(None),
    });
    let key = pooler.register(entry.clone());
    let result = async {
        let mut out = BytesMut::with_capacity(1024);
        protocol::authentication_ok(&mut out);
        let params = match &pool {
            Some(pool) => pool.params().await.map_err(SessionError::Pool)?,
            None => Arc::new(vec![
                ("server_version".to_owned(), "15.0 (farol)".to_owned()),
                ("client_encoding".to_owned(), "UTF8".to_owned()),
                ("server_encoding".to_owned(), "UTF8".to_owned()),
                ("DateStyle".to_owned(), "ISO, MDY".to_owned()),
                ("integer_datetimes".to_owned(), "on".to_owned()),
                ("standard_conforming_strings".to_owned(), "on".to_owned()),
            ]),
        };
        for (name, value) in params.iter() {
            protocol::parameter_status(&mut out, name, value);
        }
        protocol::backend_key_data(&mut out, key.0, key.1);
        protocol::ready_for_query(&mut out, b'I');
        stream
            .write_all(&out)
            .await
            .map_err(SessionError::ClientIo)?;
        match pool {
            None => {
                let role = pooler.config.admin_role(&user);
                admin::serve(&mut stream, buf, pooler, role).await
            }
            Some(pool) => {
                let mut relay = Relay::new(stream, buf, pool, pooler.clone(), entry);
                let result = relay.run().await;
                relay.finish(&result).await;
                result
            }
        }
    }
    .await;
    pooler.unregister(key);
    result
}

/// Checks the client's password against its secret (from the config, or
/// from the server with `auth_query`); returns the primary's pool for the
/// client's (database, user), or `None` for the admin console.
async fn check_login<S: ClientStream>(
    stream: &mut S,
    buf: &mut BytesMut,
    pooler: &Arc<Pooler>,
    user: &str,
    database: &str,
    binding: Option<&[u8]>,
) -> Result<Option<Arc<Pool>>, SessionError> {
    let is_admin = database == pooler.config.admin_database;
    let no_pool = || SessionError::Refused {
        code: "3D000",
        message: format!("no pool for database \"{database}\" and user \"{user}\" (pooler.pools)"),
    };
    let failed = || {
        SessionError::Auth(AuthError::Failed {
            user: user.to_owned(),
        })
    };
    let (secret, looked_up) = match pooler.config.user(user) {
        Some(configured) => (
            Some(Secret::parse(&configured.secret).map_err(SessionError::Auth)?),
            false,
        ),
        None if pooler.config.auth_user.is_some() && !is_admin => {
            if pooler.config.pool(database, user).is_none() {
                return Err(no_pool());
            }
            let secret = auth_query::lookup(pooler, user, database)
                .await
                .map_err(|error| SessionError::AuthQuery {
                    user: user.to_owned(),
                    error,
                })?;
            (secret, true)
        }
        // A console user the server knows: the admin database is the
        // pooler's own, so the lookup asks `auth_database` (else the role
        // checks' database). Only listed users cause a lookup.
        None if pooler.config.auth_user.is_some() && pooler.config.admin_role(user).may_show() => {
            let lookup_database = pooler
                .config
                .auth_database
                .as_deref()
                .unwrap_or(&pooler.config.role_check_database);
            let secret = auth_query::lookup(pooler, user, lookup_database)
                .await
                .map_err(|error| SessionError::AuthQuery {
                    user: user.to_owned(),
                    error,
                })?;
            (secret, true)
        }
        None => return Err(failed()),
    };
    let Some(secret) = secret else {
        // No such user on the server, or no password: the client goes
        // through a SCRAM exchange that cannot succeed, as PostgreSQL does,
        // so it cannot tell an unknown user from a wrong password.
        pooler.auth_cache.forget(user);
        authenticate(stream, buf, user, &mock_secret(user), binding).await?;
        return Err(failed());
    };
    // auth_query users get their pool once the login gave their credential.
    let pool = if is_admin || looked_up {
        None
    } else {
        Some(pooler.primary_pool(database, user).ok_or_else(no_pool)?)
    };
    let client_key = match authenticate(stream, buf, user, &secret, binding).await {
        Ok(client_key) => client_key,
        Err(error) => {
            if looked_up {
                // Perhaps the password changed: ask the server next time.
                pooler.auth_cache.forget(user);
            }
            return Err(error);
        }
    };
    if is_admin && !pooler.config.admin_role(user).may_show() {
        return Err(SessionError::Refused {
            code: "28000",
            message: format!(
                "user \"{user}\" may not use the admin console (pooler.admin_users, pooler.stats_users)"
            ),
        });
    }
    if is_admin || !looked_up {
        return Ok(pool);
    }
    let credential = match (secret, client_key) {
        (Secret::Md5(hex), _) => ServerCredential::Md5(hex),
        (Secret::Scram { server_key, .. }, Some(client_key)) => ServerCredential::ScramKeys {
            client_key,
            server_key,
        },
        (Secret::Scram { .. }, None) => return Err(failed()),
    };
    pooler.remember_credential(user, credential);
    Ok(Some(
        pooler.primary_pool(database, user).ok_or_else(no_pool)?,
    ))
}

/// A SCRAM verifier no password matches, with a salt that is the same
/// for every attempt at one user name (a changing salt would tell that
/// the user does not exist).
fn mock_secret(user: &str) -> Secret {
    static KEY: std::sync::OnceLock<[u8; 32]> = std::sync::OnceLock::new();
    let key = KEY.get_or_init(rand::random);
    let mut hasher = DefaultHasher::new();
    key.hash(&mut hasher);
    user.hash(&mut hasher);
    let salt = hasher.finish().to_be_bytes().repeat(2);
    Secret::Scram {
        iterations: auth::SCRAM_ITERATIONS,
        salt,
        stored_key: rand::random(),
        server_key: rand::random(),
    }
}

/// Sends the ErrorResponse for a refusal, if the error is one the client
/// should see.
async fn refuse<S: ClientStream>(stream: &mut S, error: &SessionError) {
    let (code, message) = match error {
        SessionError::Refused { code, message } => (*code, message.clone()),
        SessionError::AuthQuery { user, error } => {
            let mut out = BytesMut::new();
            protocol::error_response(
                &mut out,
                "FATAL",
                error.sqlstate(),
                &format!(
                    "cannot check the password of user \"{user}\": {}",
                    crate::error_chain(error)
                ),
            );
            let _ = stream.write_all(&out).await;
            return;
        }
        SessionError::Auth(error @ AuthError::Failed { .. }) => ("28P01", error.to_string()),
        SessionError::Auth(error) => ("08P01", error.to_string()),
        SessionError::ClientProtocol(error) => ("08P01", error.to_string()),
        SessionError::Pool(error) => (error.sqlstate(), error.to_string()),
        _ => return,
    };
    let mut out = BytesMut::new();
    protocol::error_response(&mut out, "FATAL", code, &message);
    let _ = stream.write_all(&out).await;
}

/// Reads until `buf` holds one whole regular message; returns its type and
/// the frame.
async fn read_message<S: ClientStream>(
    stream: &mut S,
    buf: &mut BytesMut,
) -> Result<(u8, BytesMut), SessionError> {
    loop {
        if let Some((tag, len)) = protocol::frame(buf).map_err(SessionError::ClientProtocol)? {
            if buf.len() >= len {
                return Ok((tag, buf.split_to(len)));
            }
            buf.reserve(len - buf.len());
        }
        if stream.read_buf(buf).await.map_err(SessionError::ClientIo)? == 0 {
            return Err(SessionError::ClientIo(
                std::io::ErrorKind::UnexpectedEof.into(),
            ));
        }
    }
}

/// The startup phase: `Some((user, database))` for a login, `None` when
/// the connection only carried a cancel request.
async fn startup<S: ClientStream>(
    stream: &mut S,
    buf: &mut BytesMut,
    pooler: &Pooler,
) -> Result<Option<(String, String)>, SessionError> {
    loop {
        let parsed = protocol::parse_startup(buf).map_err(SessionError::ClientProtocol)?;
        let Some((packet, used)) = parsed else {
            if stream.read_buf(buf).await.map_err(SessionError::ClientIo)? == 0 {
                return Ok(None);
            }
            continue;
        };
        match packet {
            // TLS was settled by `negotiate` (a second SSLRequest gets 'N');
            // GSSAPI encryption is not offered.
            Startup::SslRequest | Startup::GssEncRequest => {
                buf.advance(used);
                stream
                    .write_all(b"N")
                    .await
                    .map_err(SessionError::ClientIo)?;
            }
            Startup::Cancel {
                process_id,
                secret_key,
            } => {
                pooler.cancel(process_id, secret_key).await;
                return Ok(None);
            }
            Startup::Params(params) => {
                let get = |name: &str| {
                    params
                        .iter()
                        .find(|(key, _)| *key == name)
                        .map(|(_, value)| (*value).to_owned())
                };
                let user = get("user").ok_or_else(|| SessionError::Refused {
                    code: "28000",
                    message: "no PostgreSQL user name specified in startup packet".into(),
                })?;
                let database = get("database").unwrap_or_else(|| user.clone());
                buf.advance(used);
                return Ok(Some((user, database)));
            }
        }
    }
}

/// Authenticates the client against its secret: md5 or SCRAM-SHA-256 by
/// the kind of secret, as PostgreSQL's `password_encryption` decides.
/// With `binding` (a TLS connection) SCRAM-SHA-256-PLUS is offered too.
/// Returns the SCRAM ClientKey the client proved it has.
async fn authenticate<S: ClientStream>(
    stream: &mut S,
    buf: &mut BytesMut,
    user: &str,
    secret: &Secret,
    binding: Option<&[u8]>,
) -> Result<Option<[u8; 32]>, SessionError> {
    let mut out = BytesMut::with_capacity(256);
    let expect_password = |tag: u8, frame: &BytesMut| {
        if tag == b'p' {
            Ok(frame[5..].to_vec())
        } else {
            Err(SessionError::Auth(AuthError::Malformed {
                what: "expected a password message",
            }))
        }
    };
    match secret {
        Secret::Md5(hex) => {
            let salt: [u8; 4] = rand::random();
            protocol::authentication_md5(&mut out, salt);
            stream
                .write_all(&out)
                .await
                .map_err(SessionError::ClientIo)?;
            let (tag, frame) = read_message(stream, buf).await?;
            let body = expect_password(tag, &frame)?;
            auth::md5_check(user, hex, salt, &body).map_err(SessionError::Auth)?;
            Ok(None)
        }
        Secret::Scram { .. } => {
            let mechanisms: &[&str] = match binding {
                Some(_) => &[auth::SCRAM_SHA_256_PLUS, auth::SCRAM_SHA_256],
                None => &[auth::SCRAM_SHA_256],
            };
            protocol::authentication_sasl(&mut out, mechanisms);
            stream
                .write_all(&out)
                .await
                .map_err(SessionError::ClientIo)?;
            let (tag, frame) = read_message(stream, buf).await?;
            let body = expect_password(tag, &frame)?;
            let (mechanism, data) = protocol::parse_sasl_initial(&body).ok_or(
                SessionError::Auth(AuthError::Malformed {
                    what: "SASLInitialResponse",
                }),
            )?;
            if !mechanisms.contains(&mechanism) {
                return Err(SessionError::Auth(AuthError::Mechanism {
                    mechanism: mechanism.to_owned(),
                }));
            }
            let (server, first) =
                ScramServer::start_with_binding(user, secret, mechanism, data, binding)
                    .map_err(SessionError::Auth)?;
            out.clear();
            protocol::authentication_sasl_continue(&mut out, first.as_bytes());
            stream
                .write_all(&out)
                .await
                .map_err(SessionError::ClientIo)?;
            let (tag, frame) = read_message(stream, buf).await?;
            let body = expect_password(tag, &frame)?;
            let (last, client_key) = server
                .finish_with_client_key(&body)
                .map_err(SessionError::Auth)?;
            out.clear();
            protocol::authentication_sasl_final(&mut out, last.as_bytes());
            stream
                .write_all(&out)
                .await
                .map_err(SessionError::ClientIo)?;
            Ok(Some(client_key))
        }
    }
}

/// A client's named prepared statement (transaction mode).
#[derive(Debug)]
struct Prepared {
    hash: u64,
    /// The query text, for routing.
    sql: String,
    server_name: String,
    /// The Parse message under `server_name`, ready to send.
    parse: Bytes,
}

/// A response the server still owes, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pending {
    /// ParseComplete for a Parse we sent; `swallow` when the pooler
    /// injected it, so the client must not see its answer.
    Parse {
        hash: Option<u64>,
        swallow: bool,
    },
    Bind,
    Describe,
    Execute,
    Close,
    Sync,
    /// Simple Query or FunctionCall: everything up to ReadyForQuery.
    Query,
    /// Answered by the pooler when it reaches the front of the queue.
    SyntheticParseComplete,
    SyntheticCloseComplete,
}

enum Event {
    Client(std::io::Result<usize>),
    Server(std::io::Result<usize>),
}

/// The relay between one client and (while it holds one) a server.
struct Relay<S> {
    client: S,
    /// Bytes from the client not handled yet.
    cbuf: BytesMut,
    /// Bytes for the client, written once per batch.
    cout: BytesMut,
    /// Bytes for the server, written once per batch.
    sout: BytesMut,
    /// The primary's pool for this client's (database, user).
    pool: Arc<Pool>,
    pool_generation: u64,
    /// Wakes the relay when the primary moves, even while it waits on a
    /// server that will never answer.
    topology: tokio::sync::watch::Receiver<u64>,
    /// The standbys' pools, when the read/write split is on.
    standbys: Vec<Arc<Pool>>,
    /// The pool the current server connection came from.
    server_pool: Arc<Pool>,
    /// After a write, with `read_your_writes`, the session stays on the
    /// primary.
    sticky_primary: bool,
    pooler: Arc<Pooler>,
    entry: Arc<ClientEntry>,
    mode: PoolMode,
    server: Option<PooledServer>,
    pending: VecDeque<Pending>,
    statements: HashMap<String, Arc<Prepared>>,
    /// After an error in an extended-protocol batch the server ignores
    /// everything up to Sync; so do the expectations.
    discarding: bool,
    /// Transaction status of the last ReadyForQuery.
    status: u8,
    /// Bytes of a client message still to pass through.
    client_left: usize,
    /// Bytes of a server message still to pass (true) or drop (false).
    server_left: usize,
    server_left_forward: bool,
    terminated: bool,
    /// Reused for messages that are rewritten.
    scratch: Vec<u8>,
    /// Set in a session pool with the read/write split.
    split: Option<SessionSplit>,
    /// A batch for the other side (primary or standby) waits until the
    /// answers to the last one are all in (a client that pipelines a
    /// write after a read).
    deferred: bool,
    /// Session mode with `kernel_relay`: the relay to hand over to, until
    /// the session is handed over or falls back.
    kernel: Option<Arc<KernelRelay>>,
    kernel_attempts: u32,
    /// ReadyForQuery messages the server still owes: Simple Query, Sync
    /// and FunctionCall messages passed on minus those received. Zero:
    /// the server is idle, waiting for the client.
    awaiting_ready: u64,
    /// The kernel relayed this session: the server's state is unknown
    /// unless the client's Terminate came back (strict reset).
    relayed_in_kernel: bool,
    /// Session mode: set while the server runs something for the client
    /// (see `hold_session_while_paused`).
    busy: Option<SessionBusy>,
    /// A split session's idle connection said FATAL (not passed on, see
    /// `leave_a_closed_idle_connection`).
    idle_server_ending: bool,
}

/// Counts a session-mode connection that runs something in its pool's
/// `sessions_busy` (what a pause drains) for as long as it lives.
#[derive(Debug)]
struct SessionBusy(Arc<Pool>);

impl SessionBusy {
    fn new(pool: Arc<Pool>) -> SessionBusy {
        pool.stats.sessions_busy.fetch_add(1, Ordering::SeqCst);
        SessionBusy(pool)
    }
}

impl Drop for SessionBusy {
    fn drop(&mut self) {
        self.0.stats.sessions_busy.fetch_sub(1, Ordering::SeqCst);
    }
}

impl<S: ClientStream> Relay<S> {
    fn new(
        client: S,
        cbuf: BytesMut,
        pool: Arc<Pool>,
        pooler: Arc<Pooler>,
        entry: Arc<ClientEntry>,
    ) -> Relay<S> {
        let kernel = (pool.settings.mode == PoolMode::Session)
            .then(|| pooler.kernel_relay.clone())
            .flatten();
        Relay {
            client,
            cbuf,
            cout: BytesMut::with_capacity(16 * 1024),
            sout: BytesMut::with_capacity(8 * 1024),
            mode: pool.settings.mode,
            standbys: if pooler.router.is_some() {
                pooler.standby_pools(&entry.database, &entry.user)
            } else {
                Vec::new()
            },
            split: (pooler.router.is_some() && pool.settings.mode == PoolMode::Session)
                .then(SessionSplit::default),
            server_pool: pool.clone(),
            sticky_primary: false,
            pool,
            pool_generation: pooler.topology_generation(),
            topology: pooler.watch_topology(),
            pooler,
            entry,
            server: None,
            pending: VecDeque::new(),
            statements: HashMap::new(),
            discarding: false,
            status: b'I',
            client_left: 0,
            server_left: 0,
            server_left_forward: true,
            terminated: false,
            scratch: Vec::with_capacity(1024),
            deferred: false,
            kernel,
            kernel_attempts: 0,
            awaiting_ready: 0,
            relayed_in_kernel: false,
            busy: None,
            idle_server_ending: false,
        }
    }

    async fn run(&mut self) -> Result<(), SessionError> {
        loop {
            if self.kernel.is_some() && self.server.is_some() {
                if let Some(result) = self.try_kernel_relay().await {
                    return result;
                }
            }
            if self.cbuf.capacity() - self.cbuf.len() < 4096 {
                self.cbuf.reserve(16 * 1024);
            }
            let event = match self.server.as_mut() {
                Some(server) => {
                    let conn = &mut server.conn;
                    if conn.buf.capacity() - conn.buf.len() < 4096 {
                        conn.buf.reserve(16 * 1024);
                    }
                    tokio::select! {
                        read = self.client.read_buf(&mut self.cbuf) => Event::Client(read),
                        read = conn.stream.read_buf(&mut conn.buf) => Event::Server(read),
                        changed = self.topology.changed() => {
                            if changed.is_ok() {
                                self.end_if_on_a_former_primary()?;
                            }
                            continue;
                        }
                    }
                }
                None => Event::Client(self.client.read_buf(&mut self.cbuf).await),
            };
            match event {
                Event::Client(read) => {
                    let n = read.map_err(SessionError::ClientIo)?;
                    if n == 0 {
                        return Ok(());
                    }
                    self.server_pool
                        .stats
                        .bytes_received
                        .fetch_add(n as u64, Ordering::Relaxed);
                    self.handle_client().await?;
                    if self.terminated {
                        return Ok(());
                    }
                }
                Event::Server(read) => {
                    let n = match read {
                        Ok(0) | Err(_) if self.leave_a_closed_idle_connection() => continue,
                        Ok(0) => return Err(SessionError::ServerClosed),
                        Ok(n) => n,
                        Err(error) => return Err(SessionError::ServerIo(error)),
                    };
                    self.server_pool
                        .stats
                        .bytes_sent
                        .fetch_add(n as u64, Ordering::Relaxed);
                    self.handle_server()?;
                    self.maybe_release();
                    self.flush_client().await?;
                    if self.pending.is_empty() && self.deferred {
                        // The last batch is answered: the held one goes on.
                        self.deferred = false;
                        self.handle_client().await?;
                        if self.terminated {
                            return Ok(());
                        }
                    }
                }
            }
        }
    }

    /// Session mode with `kernel_relay`: hands the session to the kernel
    /// when nothing is half-handled (see `kernel_relay` for why that keeps
    /// every byte in order), then watches both sockets until the session
    /// ends or the pooler must speak. `None`: not now (or never: falls
    /// back), the userspace relay goes on.
    async fn try_kernel_relay(&mut self) -> Option<Result<(), SessionError>> {
        let kernel = self.kernel.clone()?;
        let server = self.server.as_ref()?;
        // The server must be idle (see `SocketRelay::pair`): the handover
        // waits for the answer to everything the client sent.
        let quiet = self.awaiting_ready == 0
            && self.cbuf.is_empty()
            && self.client_left == 0
            && self.server_left == 0
            && server.conn.buf.is_empty()
            && self.cout.is_empty()
            && self.sout.is_empty();
        if !quiet {
            return None;
        }
        let fallback = if !kernel.available() {
            Some(Fallback::Unavailable)
        } else if self.split.is_some() {
            Some(Fallback::ReadWriteSplit)
        } else if client_tcp(&self.client).is_none() {
            Some(Fallback::ClientNotPlainTcp)
        } else if !matches!(server.conn.stream, ServerStream::Tcp(_)) {
            Some(Fallback::ServerUnixSocket)
        } else {
            None
        };
        if let Some(reason) = fallback {
            kernel.fall_back(reason, None);
            self.kernel = None;
            return None;
        }
        let (Some(client), Some(ServerStream::Tcp(server_tcp))) = (
            client_tcp(&self.client),
            self.server.as_ref().map(|server| &server.conn.stream),
        ) else {
            return None;
        };
        let half_read = |stream: &tokio::net::TcpStream| {
            !matches!(crate::dataplane::socket_relay::unread_bytes(stream), Ok(0))
        };
        if half_read(client) || half_read(server_tcp) {
            self.kernel_attempts += 1;
            if self.kernel_attempts >= kernel_relay::HANDOVER_ATTEMPTS {
                kernel.fall_back(Fallback::NeverQuiet, None);
                self.kernel = None;
            }
            return None;
        }
        self.kernel = None;
        // Both sockets leave tokio while the kernel relays (see
        // `HangupWatch`): placeholders hold their places.
        let (Ok(client_placeholder), Ok(server_placeholder)) = (
            kernel_relay::placeholder_stream(),
            kernel_relay::placeholder_stream(),
        ) else {
            kernel.fall_back(Fallback::PairFailed, None);
            return None;
        };
        let client = match self.take_client_socket(client_placeholder) {
            Ok(client) => client,
            Err(error) => return Some(Err(SessionError::ClientIo(error))),
        };
        let server = match self.take_server_socket(server_placeholder) {
            Ok(server) => server,
            Err(error) => return Some(Err(SessionError::ServerIo(error))),
        };
        let handed = HangupWatch::new(client.as_fd(), server.as_fd())
            .map_err(PairError::Kick)
            .and_then(|watch| {
                kernel
                    .hand_over(client.as_fd(), server.as_fd())
                    .map(|handed| (watch, handed))
            });
        let (watch, handed) = match handed {
            Ok(both) => both,
            Err(error) => {
                // Nothing was relayed: the userspace relay goes on.
                kernel.fall_back(Fallback::PairFailed, Some(&error));
                return match self.restore_sockets(client, server) {
                    Ok(()) => None,
                    Err(error) => Some(Err(error)),
                };
            }
        };
        self.relayed_in_kernel = true;
        // A pause neither holds nor drains what the kernel relays.
        self.busy = None;
        // Unknown from now on, unless the client's Terminate comes back.
        self.status = 0;
        debug!(
            client = %self.entry.peer,
            "pooler: session handed to the in-kernel relay"
        );
        let (reason, result) = self.watch_kernel_relay(&watch, &client).await;
        handed.take_back(reason);
        drop(watch);
        let restored = self.restore_sockets(client, server);
        Some(result.and(restored))
    }

    /// While the kernel relays: waits for a close on either side, or a
    /// primary that moved. The client's Terminate is found when it closes
    /// (every client closes right after it; one that does not keeps its
    /// server until it does).
    async fn watch_kernel_relay(
        &mut self,
        watch: &HangupWatch,
        client: &std::net::TcpStream,
    ) -> (TakeBack, Result<(), SessionError>) {
        loop {
            let hangup = tokio::select! {
                hangup = watch.next() => hangup,
                changed = self.topology.changed() => {
                    if changed.is_err() {
                        // The pooler is going away; the session ends with it.
                        std::future::pending::<()>().await;
                    }
                    if let Err(error) = self.end_if_on_a_former_primary() {
                        return (TakeBack::PrimaryMoved, Err(error));
                    }
                    continue;
                }
            };
            return match hangup {
                Err(error) => (TakeBack::Unexpected, Err(SessionError::ClientIo(error))),
                Ok(Hangup::Server) => (TakeBack::ServerClosed, Err(SessionError::ServerClosed)),
                Ok(Hangup::Client) => match read_until_closed(client) {
                    Err(error) => (TakeBack::ClientClosed, Err(SessionError::ClientIo(error))),
                    Ok(bytes) if bytes.is_empty() => (TakeBack::ClientClosed, Ok(())),
                    Ok(bytes)
                        if bytes
                            .chunks(TERMINATE_MESSAGE.len())
                            .all(|chunk| chunk == TERMINATE_MESSAGE) =>
                    {
                        // The client waited for its answers before it
                        // said goodbye (else the strict reset finds out).
                        self.status = b'I';
                        self.terminated = true;
                        (TakeBack::Terminate, Ok(()))
                    }
                    Ok(_) => (TakeBack::Unexpected, Err(SessionError::KernelRelayDesync)),
                },
            };
        }
    }

    /// Moves the client's socket out of tokio (deregistered), leaving
    /// `placeholder` in its place.
    fn take_client_socket(
        &mut self,
        placeholder: tokio::net::TcpStream,
    ) -> std::io::Result<std::net::TcpStream> {
        let slot = (&mut self.client as &mut dyn std::any::Any)
            .downcast_mut::<tokio::net::TcpStream>()
            .ok_or_else(|| std::io::Error::other("the client is not on plain TCP"))?;
        std::mem::replace(slot, placeholder).into_std()
    }

    fn take_server_socket(
        &mut self,
        placeholder: tokio::net::TcpStream,
    ) -> std::io::Result<std::net::TcpStream> {
        match self.server.as_mut().map(|server| &mut server.conn.stream) {
            Some(ServerStream::Tcp(slot)) => std::mem::replace(slot, placeholder).into_std(),
            _ => Err(std::io::Error::other("the server is not on TCP")),
        }
    }

    /// Puts both sockets back in tokio's hands.
    fn restore_sockets(
        &mut self,
        client: std::net::TcpStream,
        server: std::net::TcpStream,
    ) -> Result<(), SessionError> {
        if let Some(slot) =
            (&mut self.client as &mut dyn std::any::Any).downcast_mut::<tokio::net::TcpStream>()
        {
            *slot = tokio::net::TcpStream::from_std(client).map_err(SessionError::ClientIo)?;
        }
        if let Some(ServerStream::Tcp(slot)) =
            self.server.as_mut().map(|server| &mut server.conn.stream)
        {
            *slot = tokio::net::TcpStream::from_std(server).map_err(SessionError::ServerIo)?;
        }
        Ok(())
    }

    /// A connection to the server that was the primary is given up: its
    /// transaction cannot commit anywhere else, and waiting on a dead
    /// server would hang the client. Standby connections are untouched.
    fn end_if_on_a_former_primary(&mut self) -> Result<(), SessionError> {
        let primary = self.pooler.primary();
        let on_primary_pool = Arc::ptr_eq(&self.server_pool, &self.pool);
        if self.split.is_some() && self.busy.is_none() && self.between_transactions() {
            return self.leave_a_former_primary();
        }
        if self.server.is_some() && on_primary_pool && self.pool.key.addr != primary {
            return Err(SessionError::PrimaryMoved {
                old: self.pool.key.addr,
                new: primary,
            });
        }
        if self.server.is_some()
            && on_primary_pool
            && (self.mode == PoolMode::Transaction || self.busy.is_some())
            && self.pooler.pause.cuts(&self.entry.database)
        {
            self.pooler.pause.stats.cut.fetch_add(1, Ordering::Relaxed);
            return Err(SessionError::PauseCut {
                reason: self.pooler.pause.state().reason(),
                server: self.pool.key.addr,
                drain: self.pooler.config.pause_drain_timeout,
            });
        }
        Ok(())
    }

    /// Session mode: the client's first message since its server went
    /// idle starts something. While the pooler is paused, that waits like a
    /// new transaction in a transaction pool when it is bound for the
    /// primary (the client keeps its connection); from then on the
    /// connection counts as busy until its ReadyForQuery 'I', so a pause
    /// drains it.
    async fn hold_session_while_paused(&mut self) -> Result<(), SessionError> {
        if !self.pooler.pause.is_paused() {
            return Ok(());
        }
        let for_primary = match &self.split {
            Some(split) => {
                split.pinned()
                    || self
                        .pooler
                        .router
                        .as_ref()
                        .map(|router| self.batch_target(router))
                        != Some(Some(Target::Standby))
            }
            // Without a connection yet, borrowing one holds.
            None => self.server.is_some() && Arc::ptr_eq(&self.server_pool, &self.pool),
        };
        if !for_primary {
            return Ok(());
        }
        if self.hold_while_paused().await?.is_some() {
            self.leave_a_former_primary()?;
        }
        Ok(())
    }

    /// Waits while a pause holds this client's database (see `pause`);
    /// how long it was held (None: not held).
    async fn hold_while_paused(&self) -> Result<Option<Duration>, SessionError> {
        self.pooler
            .pause
            .hold(
                &self.entry.database,
                &self.pool,
                self.pooler.config.pause_wait_timeout,
            )
            .await
            .map_err(|timeout| SessionError::PauseTimeout {
                waited: timeout.waited,
                reason: timeout.reason,
            })
    }

    /// Between transactions, after the primary moved: the session's
    /// connection to the former primary is left behind. A split session
    /// whose state the pooler can rebuild (see
    /// `SessionSplit::can_follow_the_primary`) goes on with a new primary
    /// connection and its settings replayed there; any other session's
    /// state (settings, prepared statements, temporary tables) stays on the
    /// old server, so it gets 57P01 and reconnects.
    fn leave_a_former_primary(&mut self) -> Result<(), SessionError> {
        let primary = self.pooler.primary();
        let active_on_old = self.server.is_some()
            && !self.split.as_ref().is_some_and(|split| split.on_standby)
            && self.server_pool.key.addr != primary
            && (self.split.is_some() || Arc::ptr_eq(&self.server_pool, &self.pool));
        let parked_on_old = self
            .split
            .as_ref()
            .and_then(|split| split.primary.as_ref())
            .is_some_and(|(pool, _)| pool.key.addr != primary);
        if !active_on_old && !parked_on_old {
            return Ok(());
        }
        let old = match self.split.as_ref().and_then(|split| split.primary.as_ref()) {
            Some((pool, _)) if parked_on_old => pool.key.addr,
            _ => self.server_pool.key.addr,
        };
        let Some(split) = self
            .split
            .as_mut()
            .filter(|split| split.can_follow_the_primary())
        else {
            return Err(SessionError::PrimaryMoved { old, new: primary });
        };
        // Dropped, not given back: it belongs to the former primary.
        split.new_primary();
        if active_on_old {
            self.server = None;
            self.entry.set_server(None);
        }
        self.pooler
            .split_stats
            .followed_primary
            .fetch_add(1, Ordering::Relaxed);
        info!(
            client = %self.entry.peer,
            %old,
            new = %primary,
            "pooler: a session follows the primary to its new server; its settings are replayed there"
        );
        self.refresh_pools();
        Ok(())
    }

    /// Borrows a server connection for the coming messages.
    async fn ensure_server(&mut self) -> Result<(), SessionError> {
        if self.server.is_some() {
            return Ok(());
        }
        self.refresh_pools();
        let (pool, server) = self.route().await?;
        self.server_pool = pool;
        self.entry.set_server(Some(CancelTarget {
            addr: server.conn.addr,
            process_id: server.conn.process_id,
            secret_key: server.conn.secret_key,
        }));
        self.server = Some(server);
        Ok(())
    }

    /// Follows the primary and the readable standbys after they changed.
    fn refresh_pools(&mut self) {
        let generation = self.pooler.topology_generation();
        if generation != self.pool_generation {
            if let Some(pool) = self
                .pooler
                .primary_pool(&self.entry.database, &self.entry.user)
            {
                self.pool = pool;
            }
            if self.pooler.router.is_some() {
                self.standbys = self
                    .pooler
                    .standby_pools(&self.entry.database, &self.entry.user);
            }
            self.pool_generation = generation;
        }
    }

    /// Picks the pool for the transaction that starts with the first
    /// message in `cbuf` and borrows a connection from it: a standby (the
    /// least busy) for reads when the split is on, else the primary.
    async fn route(&mut self) -> Result<(Arc<Pool>, PooledServer), SessionError> {
        if self.split.is_some() {
            return self.route_split().await;
        }
        if !self.standbys.is_empty() && !self.sticky_primary {
            if let Some(router) = self.pooler.router.as_ref() {
                // A batch without SQL (Sync, Close) goes to the primary
                // without making the session stick to it.
                let target = self.batch_target(router);
                if target == Some(Target::Standby) {
                    let standby = self
                        .standbys
                        .iter()
                        .min_by_key(|pool| pool.active_count())
                        .cloned();
                    if let Some(pool) = standby {
                        match pool.get().await {
                            Ok(server) => return Ok((pool, server)),
                            Err(error) => debug!(
                                error = %crate::error_chain(&error),
                                "standby unavailable; reading from the primary"
                            ),
                        }
                    }
                } else if target.is_some() && self.pooler.config.read_your_writes {
                    self.sticky_primary = true;
                }
            }
        }
        self.borrow_primary().await
    }

    /// A connection from the primary's pool.
    async fn borrow_primary(&mut self) -> Result<(Arc<Pool>, PooledServer), SessionError> {
        // A paused pooler holds transactions for the primary (see `pause`);
        // once released they go to whichever server is the primary then.
        if self.hold_while_paused().await?.is_some() {
            self.refresh_pools();
        }
        let server = self.pool.get().await.map_err(SessionError::Pool)?;
        if self.pooler.pause.holds(&self.entry.database) {
            // Paused between the look above and the borrow: nothing was
            // sent on this connection yet, so it goes back and the
            // transaction waits like the others (a drain counts borrowed
            // connections, so it waited for this one).
            self.pool.release(server);
            return Box::pin(self.borrow_primary()).await;
        }
        Ok((self.pool.clone(), server))
    }

    /// Session pool with the split: the statement at the front of `cbuf`
    /// runs on the session's standby connection when it only reads and
    /// the session is not pinned to the primary, else on the session's
    /// primary connection (each borrowed on first use).
    async fn route_split(&mut self) -> Result<(Arc<Pool>, PooledServer), SessionError> {
        // First: a block's settings are not read back from a former
        // primary (which may hang).
        self.leave_a_former_primary()?;
        self.read_back_settings().await;
        let reads = match self.pooler.router.as_ref() {
            Some(router) => self.batch_target(router) == Some(Target::Standby),
            None => false,
        };
        let no_sql = self.only_syncs_and_closes();
        let split = self.split.as_mut().expect("a split session");
        if no_sql && !split.pinned() && split.standby.is_some() {
            // A driver's Close and Sync of a dropped statement: any
            // connection answers them, the parked standby included (made
            // ready for reads, as a query that follows in the same batch
            // goes there too).
            if let Some(parked) = self.standby_for_read().await {
                self.split_mut().on_standby = true;
                return Ok(parked);
            }
        }
        let split = self.split_mut();
        if split.pinned() {
            self.give_back_standby().await;
        } else if reads {
            if let Some(parked) = self.standby_for_read().await {
                self.split_mut().on_standby = true;
                return Ok(parked);
            }
        }
        let split = self.split_mut();
        split.on_standby = false;
        let (pool, mut server) = match split.primary.take() {
            Some(parked) => parked,
            None => self.borrow_primary().await?,
        };
        let pooler = self.pooler.clone();
        match self
            .split_mut()
            .replay(&mut server, Side::Primary, &pooler.split_stats)
            .await
        {
            Ok(()) => {}
            Err(ReplayError::Refused(message)) => {
                warn!(server = %pool.key.addr, %message, "the primary refused a session setting read back from the standby; it is not in force there");
            }
            Err(ReplayError::Connection) => return Err(SessionError::ServerClosed),
        }
        Ok((pool, server))
    }

    /// Settings made inside a transaction block that is over now: their
    /// values are read from the (parked) connection that ran the block,
    /// to be replayed on the other one.
    async fn read_back_settings(&mut self) {
        let Some(side) = self.split.as_ref().and_then(SessionSplit::read_back_due) else {
            return;
        };
        let pooler = self.pooler.clone();
        if let (Some(split), Some(server)) = (self.split.as_mut(), self.server.as_mut()) {
            // A pinned session keeps its connection between statements.
            if split.active_side() == side {
                if let Err(error) = split.read_back(server, &pooler.split_stats).await {
                    warn!(server = %server.conn.addr, ?error, "could not read back the session settings made inside a transaction block; a new primary connection would not get them");
                }
                return;
            }
        }
        let split = self.split_mut();
        let slot = match side {
            Side::Primary => &mut split.primary,
            Side::Standby => &mut split.standby,
        };
        let Some((pool, mut server)) = slot.take() else {
            // That connection is gone, and so is what was set on it.
            split.forget_block();
            return;
        };
        let read = split.read_back(&mut server, &pooler.split_stats).await;
        if let Err(error) = read {
            warn!(server = %pool.key.addr, ?error, "could not read back the session settings made inside a transaction block; the other connection does not get them");
        }
        let slot = match side {
            Side::Primary => &mut split.primary,
            Side::Standby => &mut split.standby,
        };
        *slot = Some((pool, server));
    }

    /// Every whole message in `cbuf` is a Close, Sync or Flush.
    fn only_syncs_and_closes(&self) -> bool {
        let mut at = 0;
        let mut any = false;
        while let Some(rest) = self.cbuf.get(at..) {
            match protocol::frame(rest) {
                Ok(Some((b'C' | b'S' | b'H', len))) if rest.len() >= len => {
                    at += len;
                    any = true;
                }
                Ok(None) => break,
                _ => return false,
            }
        }
        any
    }

    fn split_mut(&mut self) -> &mut SessionSplit {
        self.split.as_mut().expect("a split session")
    }

    /// The session's standby connection, borrowed now if it has none or
    /// the one it had died or no longer takes reads (lag, role change);
    /// `None` sends the read to the primary.
    async fn standby_for_read(&mut self) -> Option<Parked> {
        if let Some((pool, mut server)) = self.split_mut().standby.take() {
            let readable = self.standbys.iter().any(|p| Arc::ptr_eq(p, &pool));
            if readable && server.conn.looks_alive() {
                let pooler = self.pooler.clone();
                let split = self.split_mut();
                match split
                    .replay(&mut server, Side::Standby, &pooler.split_stats)
                    .await
                {
                    Ok(()) => return Some((pool, server)),
                    Err(ReplayError::Refused(message)) => {
                        info!(server = %pool.key.addr, %message, "a standby refused a session setting; the session stays on the primary");
                        split.pin(PinReason::SettingRefused, &pooler.split_stats);
                        self.give_back((pool, server)).await;
                        return None;
                    }
                    // Gone since: choose again below.
                    Err(ReplayError::Connection) => return Box::pin(self.standby_for_read()).await,
                }
            }
            // Dropped: its server is gone, or it is reset and returned.
            self.pooler
                .split_stats
                .standby_lost
                .fetch_add(1, Ordering::Relaxed);
            info!(server = %pool.key.addr, readable, "the session's standby connection is gone or its server no longer takes reads; reads choose again");
            if readable {
                drop(server);
            } else {
                self.give_back((pool, server)).await;
            }
        }
        // Least busy first; a full pool is skipped rather than waited for
        // (the primary can take the read at once).
        let mut candidates = self.standbys.clone();
        candidates.sort_by_key(|pool| pool.active_count());
        for pool in candidates {
            let mut server = match pool.get_now().await {
                Ok(Some(server)) => server,
                Ok(None) => continue,
                Err(error) => {
                    debug!(error = %crate::error_chain(&error), "standby unavailable; trying the next or the primary");
                    continue;
                }
            };
            let pooler = self.pooler.clone();
            pooler
                .split_stats
                .standby_borrowed
                .fetch_add(1, Ordering::Relaxed);
            let split = self.split_mut();
            split.new_standby();
            match split
                .replay(&mut server, Side::Standby, &pooler.split_stats)
                .await
            {
                Ok(()) => return Some((pool, server)),
                Err(ReplayError::Refused(message)) => {
                    info!(server = %pool.key.addr, %message, "a standby refused a session setting; the session stays on the primary");
                    split.pin(PinReason::SettingRefused, &pooler.split_stats);
                    self.give_back((pool, server)).await;
                    return None;
                }
                Err(ReplayError::Connection) => {
                    debug!(server = %pool.key.addr, "standby connection failed while taking the session's settings");
                }
            }
        }
        None
    }

    /// Resets a parked session connection and returns it to its pool, in
    /// a task of its own (the client's next statement does not wait).
    async fn give_back(&mut self, (pool, mut server): Parked) {
        tokio::spawn(async move {
            if let Ok(Ok(())) = tokio::time::timeout(RESET_TIMEOUT, reset(&mut server, false)).await
            {
                pool.release(server);
            }
        });
    }

    /// The session's standby connection goes back to its pool (pinned,
    /// or after DISCARD ALL).
    async fn give_back_standby(&mut self) {
        if let Some(parked) = self.split.as_mut().and_then(|split| split.standby.take()) {
            self.give_back(parked).await;
        }
    }

    /// What a Query or Parse whole at the front of `cbuf` (`len` bytes)
    /// leaves in the session; with the SQL when it is a setting to replay.
    fn message_effect(&self, len: usize) -> Option<(SessionEffect, Option<String>)> {
        let router = self.pooler.router.as_ref()?;
        let frame = self.cbuf.get(..len)?;
        let sql = match FrontendMessage::parse(frame).ok()? {
            FrontendMessage::Query { sql } | FrontendMessage::Parse { sql, .. } => sql,
            _ => return None,
        };
        let decision = router.decision(sql);
        let text = matches!(decision.effect, SessionEffect::Setting { .. }).then(|| sql.to_owned());
        Some((decision.effect, text))
    }

    /// Applies what a statement sent to the active connection leaves in
    /// the session (see `session_split` for the rule).
    async fn apply_effect(&mut self, effect: SessionEffect, sql: Option<String>) {
        let read_your_writes = self.pooler.config.read_your_writes;
        let pooler = self.pooler.clone();
        let stats = &pooler.split_stats;
        // Outside a transaction block, and nothing in flight that could
        // open one (only executing messages can): a setting lasts the
        // session.
        let outside_block = self.status == b'I'
            && !self
                .pending
                .iter()
                .any(|pending| matches!(pending, Pending::Query | Pending::Execute));
        let split = self.split_mut();
        match effect {
            SessionEffect::Read | SessionEffect::Transactional => {}
            SessionEffect::Setting { key } => {
                let side = split.active_side();
                if outside_block && side == Side::Primary {
                    split.record_setting(&key, sql.as_deref().unwrap_or_default(), side, stats);
                } else if side == Side::Standby || !split.pinned() {
                    // Whether it lasts is known once the block is over.
                    split.setting_in_block(&key, side, stats);
                }
            }
            SessionEffect::Settings { keys, write } => {
                let side = split.active_side();
                if side == Side::Standby || !split.pinned() {
                    for key in keys.iter() {
                        split.setting_in_block(key, side, stats);
                    }
                }
                if write && read_your_writes {
                    split.pin(PinReason::Write, stats);
                }
            }
            SessionEffect::Write => {
                if read_your_writes {
                    split.pin(PinReason::Write, stats);
                }
            }
            SessionEffect::SessionState => {
                split.pin(PinReason::SessionState, stats);
            }
            SessionEffect::DeallocateAll => {
                // Not transactional: whatever the block, the connection's
                // statements are gone once it runs.
                self.statements.clear();
                if let Some(server) = self.server.as_mut() {
                    server.conn.prepared.clear();
                }
            }
            SessionEffect::DiscardAll => {
                if outside_block && !split.on_standby {
                    split.forget_settings();
                    self.statements.clear();
                    if let Some(server) = self.server.as_mut() {
                        server.conn.prepared.clear();
                    }
                    self.give_back_standby().await;
                }
            }
        }
        if self.split.as_ref().is_some_and(SessionSplit::pinned) {
            self.give_back_standby().await;
        }
    }

    /// Transaction mode, or a session pool with the split: the relay
    /// follows the protocol (expected responses, renamed statements).
    fn tracks(&self) -> bool {
        self.mode == PoolMode::Transaction || self.split.is_some()
    }

    /// Where the batch at the front of `cbuf` must run. The messages up
    /// to a Sync are one implicit transaction (a simple Query is one of
    /// its own), so a batch with any statement for the primary goes there
    /// whole. `None` when no whole message of it carries SQL. A split
    /// session looks past a leading batch without SQL (a driver's Close
    /// and Sync of a dropped statement sent ahead of its next query),
    /// which may run on either connection.
    fn batch_target(&self, router: &Router) -> Option<Target> {
        let mut target = None;
        let mut at = 0;
        while let Some(rest) = self.cbuf.get(at..) {
            let Ok(Some((tag, len))) = protocol::frame(rest) else {
                break;
            };
            let Some(frame) = rest.get(..len) else {
                break;
            };
            at += len;
            let sql = match FrontendMessage::parse(frame) {
                Ok(FrontendMessage::Query { sql } | FrontendMessage::Parse { sql, .. }) => {
                    Some(sql)
                }
                Ok(FrontendMessage::Bind { statement, .. }) if !statement.is_empty() => self
                    .statements
                    .get(statement)
                    .map(|prepared| prepared.sql.as_str()),
                Ok(
                    FrontendMessage::Bind { .. }
                    | FrontendMessage::Describe { .. }
                    | FrontendMessage::Execute
                    | FrontendMessage::Close { .. }
                    | FrontendMessage::Flush,
                ) => None,
                Ok(FrontendMessage::Sync) if target.is_none() && self.split.is_some() => None,
                _ => break,
            };
            if let Some(sql) = sql {
                target = match (target, router.route(sql)) {
                    (Some(Target::Primary), _) | (_, Target::Primary) => Some(Target::Primary),
                    _ => Some(Target::Standby),
                };
            }
            if tag == b'Q' {
                break;
            }
        }
        target
    }

    /// The batch at the front of `cbuf` is all here: it ends with a Sync,
    /// a Flush (the client waits for answers before it sends more), a
    /// simple Query, a FunctionCall or a Terminate; or it is copy data;
    /// or it is too big to hold back. libpq's pipeline mode sends a batch in pieces once 64
    /// KiB of it are queued.
    fn batch_received(&self) -> bool {
        if self.cbuf.len() >= BATCH_HOLD_BYTES {
            return true;
        }
        let mut at = 0;
        while let Some(rest) = self.cbuf.get(at..) {
            match protocol::frame(rest) {
                // Copy data flows inside a batch already routed.
                Ok(Some((b'S' | b'H' | b'Q' | b'F' | b'X' | b'd' | b'c' | b'f', _))) => {
                    return true
                }
                Ok(Some((_, len))) if rest.len() >= len => at += len,
                Ok(_) => return false,
                // The relay reports it.
                Err(_) => return true,
            }
        }
        false
    }

    /// The next message starts a batch (the last one was closed by a Sync
    /// or a simple Query) in a relay that chooses a side per batch.
    fn batch_starts(&self) -> bool {
        (self.split.is_some() || (self.mode == PoolMode::Transaction && !self.standbys.is_empty()))
            && matches!(
                self.pending.back(),
                None | Some(Pending::Sync | Pending::Query)
            )
    }

    /// The batch at the front of `cbuf` belongs on the other side
    /// (primary or standby) than the connection held now.
    fn other_side_wanted(&self) -> bool {
        let Some(router) = self.pooler.router.as_ref() else {
            return false;
        };
        let Some(target) = self.batch_target(router) else {
            return false;
        };
        let (on_standby, stays_on_primary) = match &self.split {
            Some(split) => (split.on_standby, split.pinned()),
            None => (
                !Arc::ptr_eq(&self.server_pool, &self.pool),
                self.sticky_primary,
            ),
        };
        (target == Target::Standby && !stays_on_primary) != on_standby
    }

    fn release(&mut self) {
        if let Some(split) = self.split.as_ref() {
            // A pinned session keeps its primary connection active, as a
            // plain session pool does (notifications reach the client).
            if split.pinned() && !split.on_standby {
                return;
            }
            let parked = self
                .end_transaction()
                .map(|server| (self.server_pool.clone(), server));
            if let (Some(parked), Some(split)) = (parked, self.split.as_mut()) {
                let parked = Some(parked);
                if split.on_standby {
                    split.standby = parked;
                } else {
                    split.primary = parked;
                }
            }
            return;
        }
        if let Some(server) = self.end_transaction() {
            self.server_pool.release(server);
        }
    }

    /// Takes the server connection off the client and counts the
    /// transaction it ran.
    fn end_transaction(&mut self) -> Option<PooledServer> {
        let server = self.server.take()?;
        self.entry.set_server(None);
        self.server_pool
            .stats
            .transactions
            .fetch_add(1, Ordering::Relaxed);
        Some(server)
    }

    fn push(&mut self, pending: Pending) {
        if !self.discarding {
            self.pending.push_back(pending);
        }
    }

    /// Handles every whole client message in `cbuf`, then writes.
    async fn handle_client(&mut self) -> Result<(), SessionError> {
        loop {
            if self.client_left > 0 {
                let n = self.client_left.min(self.cbuf.len());
                self.sout.extend_from_slice(&self.cbuf[..n]);
                self.cbuf.advance(n);
                self.client_left -= n;
                if self.client_left > 0 {
                    break;
                }
                continue;
            }
            let Some((tag, len)) =
                protocol::frame(&self.cbuf).map_err(SessionError::ClientProtocol)?
            else {
                break;
            };
            let mut rewrite = self.tracks() && matches!(tag, b'P' | b'B' | b'D' | b'C');
            // Unnamed statements and portals pass through as bytes.
            let passthrough = if rewrite {
                unnamed_expectation(tag, &self.cbuf, len)
            } else {
                None
            };
            if passthrough.is_some() {
                rewrite = false;
            }
            let split_sql = self.split.is_some() && matches!(tag, b'Q' | b'P');
            if (rewrite || tag == b'X' || tag == b'Q' || split_sql) && self.cbuf.len() < len {
                self.cbuf.reserve(len - self.cbuf.len());
                break;
            }
            if tag == b'X' {
                self.terminated = true;
                self.cbuf.advance(len);
                break;
            }
            let effect = if split_sql {
                self.message_effect(len)
            } else {
                None
            };
            let batch_starts = self.batch_starts();
            if batch_starts && !self.batch_received() {
                // Routed once it is all here (nothing of it is answered
                // before its Sync or Flush anyway).
                break;
            }
            // A batch for the other side, after the last batch was closed.
            if self.server.is_some() && batch_starts && self.other_side_wanted() {
                if !self.pending.is_empty() {
                    // It waits for the answers still due (they tell
                    // whether a transaction block is open), then is
                    // routed (see `run`).
                    self.deferred = true;
                    break;
                }
                if self.status == b'I' && self.server_left == 0 {
                    // Idle: give this connection back (or park it) and
                    // route anew.
                    self.release();
                }
            }
            if self.mode == PoolMode::Session && self.busy.is_none() {
                if self.split.as_ref().is_some_and(SessionSplit::pinned) {
                    // Known values, should the session have to follow the
                    // primary to a new connection.
                    self.read_back_settings().await;
                }
                self.hold_session_while_paused().await?;
                self.ensure_server().await?;
                self.busy = Some(SessionBusy::new(self.server_pool.clone()));
            } else {
                self.ensure_server().await?;
            }
            if let Some((effect, sql)) = effect {
                self.apply_effect(effect, sql).await;
            } else if tag == b'F' && self.split.is_some() {
                // A fast-path function call (large objects and the like):
                // what it leaves is unknown, so the session stays put.
                self.apply_effect(SessionEffect::SessionState, None).await;
            }
            if let Some(pending) = passthrough {
                self.push(pending);
            }
            if rewrite {
                // Copied into a reused buffer: splitting `cbuf` would turn it
                // into a shared buffer and allocate on every message.
                let mut frame = std::mem::take(&mut self.scratch);
                frame.clear();
                frame.extend_from_slice(&self.cbuf[..len]);
                self.cbuf.advance(len);
                let rewritten = self.rewrite(&frame);
                self.scratch = frame;
                rewritten?;
                continue;
            }
            if self.tracks() {
                match tag {
                    b'E' => self.push(Pending::Execute),
                    b'S' => {
                        self.discarding = false;
                        self.push(Pending::Sync);
                    }
                    b'Q' | b'F' => self.push(Pending::Query),
                    b'c' | b'f' => self.forget_syncs_sent_during_copy_in(),
                    _ => {}
                }
            }
            if matches!(tag, b'Q' | b'S' | b'F') {
                self.awaiting_ready += 1;
            }
            if tag == b'Q' || tag == b'E' {
                self.server_pool
                    .stats
                    .queries
                    .fetch_add(1, Ordering::Relaxed);
            }
            let n = len.min(self.cbuf.len());
            self.sout.extend_from_slice(&self.cbuf[..n]);
            self.cbuf.advance(n);
            self.client_left = len - n;
        }
        if !self.sout.is_empty() {
            if let Some(server) = self.server.as_mut() {
                server
                    .conn
                    .stream
                    .write_all(&self.sout)
                    .await
                    .map_err(SessionError::ServerIo)?;
            }
            self.sout.clear();
        }
        self.answer_synthetic();
        self.maybe_release();
        self.flush_client().await
    }

    /// Transaction mode: Parse, Bind, Describe and Close of named
    /// statements, renamed to their per-query server names.
    fn rewrite(&mut self, frame: &[u8]) -> Result<(), SessionError> {
        let message = FrontendMessage::parse(frame).map_err(SessionError::ClientProtocol)?;
        match message {
            FrontendMessage::Parse {
                name,
                sql,
                param_types,
            } if !name.is_empty() => {
                let mut hasher = DefaultHasher::new();
                sql.hash(&mut hasher);
                param_types.hash(&mut hasher);
                let hash = hasher.finish();
                let server_name = format!("farol_{hash:016x}");
                let mut parse = BytesMut::with_capacity(frame.len() + 16);
                protocol::parse(&mut parse, &server_name, sql, param_types);
                let prepared = Arc::new(Prepared {
                    hash,
                    sql: sql.to_owned(),
                    server_name,
                    parse: parse.freeze(),
                });
                self.statements.insert(name.to_owned(), prepared.clone());
                let server = self.server.as_mut().ok_or(SessionError::ServerClosed)?;
                if server.conn.prepared.contains(&hash) {
                    self.push(Pending::SyntheticParseComplete);
                } else {
                    server.conn.prepared.insert(hash);
                    self.sout.extend_from_slice(&prepared.parse);
                    self.push(Pending::Parse {
                        hash: Some(hash),
                        swallow: false,
                    });
                }
            }
            FrontendMessage::Bind {
                portal,
                statement,
                rest,
            } if !statement.is_empty() => {
                match self.statements.get(statement).cloned() {
                    Some(prepared) => {
                        self.ensure_prepared(&prepared)?;
                        protocol::bind(&mut self.sout, portal, &prepared.server_name, rest);
                    }
                    None => self.sout.extend_from_slice(frame),
                }
                self.push(Pending::Bind);
            }
            FrontendMessage::Describe { kind: b'S', name } if !name.is_empty() => {
                match self.statements.get(name).cloned() {
                    Some(prepared) => {
                        self.ensure_prepared(&prepared)?;
                        protocol::describe(&mut self.sout, b'S', &prepared.server_name);
                    }
                    None => self.sout.extend_from_slice(frame),
                }
                self.push(Pending::Describe);
            }
            FrontendMessage::Close { kind: b'S', name } if !name.is_empty() => {
                // The server keeps its copy for other clients; the client's
                // name is forgotten.
                self.statements.remove(name);
                self.push(Pending::SyntheticCloseComplete);
            }
            other => {
                self.sout.extend_from_slice(frame);
                self.push(match other {
                    FrontendMessage::Parse { .. } => Pending::Parse {
                        hash: None,
                        swallow: false,
                    },
                    FrontendMessage::Bind { .. } => Pending::Bind,
                    FrontendMessage::Describe { .. } => Pending::Describe,
                    _ => Pending::Close,
                });
            }
        }
        Ok(())
    }

    /// The server ignores Sync while in COPY FROM STDIN started by an
    /// Execute (protocol docs 55.2.7 "COPY Operations"); drivers such as
    /// tokio-postgres send Bind, Execute, Sync before the data, so those
    /// Syncs get no ReadyForQuery and must not be waited for.
    fn forget_syncs_sent_during_copy_in(&mut self) {
        let syncs = self
            .pending
            .iter()
            .rev()
            .take_while(|pending| **pending == Pending::Sync)
            .count();
        let before = self.pending.len().checked_sub(syncs + 1);
        if syncs > 0 && before.and_then(|at| self.pending.get(at)) == Some(&Pending::Execute) {
            self.pending.truncate(self.pending.len() - syncs);
        }
    }

    /// Sends the statement's Parse first when this server lacks it.
    fn ensure_prepared(&mut self, prepared: &Prepared) -> Result<(), SessionError> {
        let server = self.server.as_mut().ok_or(SessionError::ServerClosed)?;
        if server.conn.prepared.insert(prepared.hash) {
            self.sout.extend_from_slice(&prepared.parse);
            self.push(Pending::Parse {
                hash: Some(prepared.hash),
                swallow: true,
            });
        }
        Ok(())
    }

    /// Answers the pooler's own responses that are next in line.
    fn answer_synthetic(&mut self) {
        while let Some(front) = self.pending.front() {
            match front {
                Pending::SyntheticParseComplete => protocol::parse_complete(&mut self.cout),
                Pending::SyntheticCloseComplete => protocol::close_complete(&mut self.cout),
                _ => break,
            }
            self.pending.pop_front();
        }
    }

    /// Handles every server message header in the server's buffer.
    fn handle_server(&mut self) -> Result<(), SessionError> {
        let Some(server) = self.server.as_mut() else {
            return Ok(());
        };
        let buf = &mut server.conn.buf;
        let transaction = self.mode == PoolMode::Transaction || self.split.is_some();
        loop {
            if self.server_left > 0 {
                let n = self.server_left.min(buf.len());
                if self.server_left_forward {
                    self.cout.extend_from_slice(&buf[..n]);
                }
                buf.advance(n);
                self.server_left -= n;
                if self.server_left > 0 {
                    break;
                }
                continue;
            }
            if transaction {
                while let Some(front) = self.pending.front() {
                    match front {
                        Pending::SyntheticParseComplete => protocol::parse_complete(&mut self.cout),
                        Pending::SyntheticCloseComplete => protocol::close_complete(&mut self.cout),
                        _ => break,
                    }
                    self.pending.pop_front();
                }
            }
            let Some((tag, len)) = protocol::frame(buf).map_err(SessionError::ServerProtocol)?
            else {
                break;
            };
            if tag == b'Z' {
                if buf.len() < len {
                    break;
                }
                self.status = buf[5];
                self.awaiting_ready = self.awaiting_ready.saturating_sub(1);
                if self.awaiting_ready == 0 && self.status == b'I' {
                    self.busy = None;
                }
            }
            let mut forward = true;
            if tag == b'E'
                && self.busy.is_none()
                && self.awaiting_ready == 0
                && self.split.is_some()
            {
                // Unasked, so a FATAL: the server is going away (shutdown,
                // postmaster gone). A split session that can rebuild its
                // state on a new connection goes on (see `run`); the
                // client need not hear it.
                let active = self.split.as_ref().map(SessionSplit::active_side);
                forward = !(active == Some(Side::Standby)
                    || self
                        .split
                        .as_ref()
                        .is_some_and(SessionSplit::can_follow_the_primary));
                self.idle_server_ending |= !forward;
            } else if transaction {
                let front = self.pending.front().copied();
                match (tag, front) {
                    (b'E', Some(Pending::Query)) => {}
                    (b'E', _) => {
                        // The server skips to the next Sync: so do we.
                        while let Some(front) = self.pending.front().copied() {
                            if front == Pending::Sync {
                                break;
                            }
                            if let Pending::Parse {
                                hash: Some(hash), ..
                            } = front
                            {
                                server.conn.prepared.remove(&hash);
                            }
                            self.pending.pop_front();
                        }
                        self.discarding = self.pending.is_empty();
                    }
                    (b'Z', _) => {
                        self.pending.pop_front();
                    }
                    (b'1', Some(Pending::Parse { swallow, .. })) => {
                        forward = !swallow;
                        self.pending.pop_front();
                    }
                    (b'2', Some(Pending::Bind))
                    | (b'3', Some(Pending::Close))
                    | (b'T' | b'n', Some(Pending::Describe))
                    | (b'C' | b'I' | b's', Some(Pending::Execute)) => {
                        self.pending.pop_front();
                    }
                    _ => {}
                }
            }
            let n = len.min(buf.len());
            if forward {
                self.cout.extend_from_slice(&buf[..n]);
            }
            buf.advance(n);
            self.server_left = len - n;
            self.server_left_forward = forward;
        }
        Ok(())
    }

    /// A split session's connection closed while it ran nothing for the
    /// client (a node lost, a server shut down): the session goes on
    /// without it when the pooler can rebuild what the session left there,
    /// and its next statement borrows a new connection. False: the
    /// session ends.
    fn leave_a_closed_idle_connection(&mut self) -> bool {
        if self.busy.is_some() || !(self.idle_server_ending || self.between_transactions()) {
            return false;
        }
        let Some(split) = self.split.as_mut() else {
            return false;
        };
        let side = split.active_side();
        match side {
            Side::Standby => split.new_standby(),
            Side::Primary if split.can_follow_the_primary() => split.new_primary(),
            Side::Primary => return false,
        }
        self.idle_server_ending = false;
        let server = self.server.take();
        self.entry.set_server(None);
        info!(
            client = %self.entry.peer,
            server = ?server.map(|server| server.conn.addr),
            ?side,
            "pooler: an idle session's server connection closed; the session goes on and its next statement gets a new one"
        );
        self.pooler
            .split_stats
            .idle_connections_lost
            .fetch_add(1, Ordering::Relaxed);
        true
    }

    /// Nothing is half-sent or owed on the connection held now.
    fn between_transactions(&self) -> bool {
        self.status == b'I'
            && self.awaiting_ready == 0
            && self.pending.is_empty()
            && self.server_left == 0
            && self.client_left == 0
            && self.sout.is_empty()
            && self
                .server
                .as_ref()
                .is_none_or(|server| server.conn.buf.is_empty())
    }

    /// Transaction mode: the server goes back once the transaction is over
    /// and nothing is in flight.
    fn maybe_release(&mut self) {
        if self.tracks()
            && self.status == b'I'
            && self.pending.is_empty()
            && self.server_left == 0
            && self.client_left == 0
            && self
                .server
                .as_ref()
                .is_some_and(|server| server.conn.buf.is_empty())
        {
            self.release();
        }
    }

    async fn flush_client(&mut self) -> Result<(), SessionError> {
        if !self.cout.is_empty() {
            let result = self.client.write_all(&self.cout).await;
            self.cout.clear();
            result.map_err(SessionError::ClientIo)?;
        }
        Ok(())
    }

    /// After the relay ends: a server in a clean state goes back to the
    /// pool (reset with DISCARD ALL in session mode); one busy with a query
    /// is cancelled and closed; the client hears why if the server failed.
    async fn finish(&mut self, result: &Result<(), SessionError>) {
        self.finish_active(result).await;
        self.finish_parked().await;
    }

    /// Split session: the parked connections are idle; they are reset and
    /// go back, except one to a server that is no longer the primary or
    /// that closed.
    async fn finish_parked(&mut self) {
        let Some(mut split) = self.split.take() else {
            return;
        };
        let primary = self.pooler.primary();
        if let Some(parked) = split.primary.take() {
            if parked.0.key.addr == primary && parked.1.conn.looks_alive() {
                self.give_back(parked).await;
            }
        }
        if let Some(parked) = split.standby.take() {
            if parked.1.conn.looks_alive() {
                self.give_back(parked).await;
            }
        }
    }

    async fn finish_active(&mut self, result: &Result<(), SessionError>) {
        if let Err(error) = result {
            let message = match error {
                SessionError::ServerClosed | SessionError::ServerIo(_) => Some((
                    "08006",
                    "the server connection was lost; the transaction's outcome is unknown"
                        .to_owned(),
                )),
                SessionError::Pool(error) => Some((error.sqlstate(), error.to_string())),
                SessionError::ClientProtocol(error) => Some(("08P01", error.to_string())),
                SessionError::ServerProtocol(error) => Some(("08P01", format!("server: {error}"))),
                SessionError::PrimaryMoved { .. } => Some((
                    "57P01",
                    format!("{error}; the transaction there is lost, reconnect to reach the new primary"),
                )),
                SessionError::PauseTimeout { .. } => Some((
                    "57P03",
                    format!("{error}; nothing was sent to a server, retry"),
                )),
                SessionError::PauseCut { .. } => Some((
                    "57P01",
                    format!("{error}; its server connection was closed, so it was rolled back unless its COMMIT had reached the server"),
                )),
                _ => None,
            };
            if let Some((code, message)) = message {
                let mut out = BytesMut::new();
                protocol::error_response(&mut out, "FATAL", code, &message);
                let _ = self.client.write_all(&out).await;
            }
            if matches!(
                error,
                SessionError::ServerClosed
                    | SessionError::ServerIo(_)
                    | SessionError::PrimaryMoved { .. }
                    | SessionError::PauseCut { .. }
            ) {
                // Drop, do not reuse.
                self.server.take();
                self.entry.set_server(None);
                return;
            }
        }
        let Some(mut server) = self.server.take() else {
            return;
        };
        self.entry.set_server(None);
        let idle = self.status == b'I'
            && self.pending.is_empty()
            && self.server_left == 0
            && self.client_left == 0;
        if !idle {
            // Client gone mid-query or mid-transaction: stop the query and
            // close; PostgreSQL rolls the transaction back.
            let target = CancelTarget {
                addr: server.conn.addr,
                process_id: server.conn.process_id,
                secret_key: server.conn.secret_key,
            };
            super::send_cancel(target, self.pooler.config.unix_socket_dir.as_deref()).await;
            return;
        }
        if self.mode == PoolMode::Session {
            let strict = self.relayed_in_kernel;
            match tokio::time::timeout(RESET_TIMEOUT, reset(&mut server, strict)).await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => {
                    debug!(server = server.conn.id, error = %crate::error_chain(&error), strict, "pooler: server connection not reused: its reset failed");
                    return;
                }
                Err(_) => {
                    debug!(
                        server = server.conn.id,
                        strict, "pooler: server connection not reused: its reset timed out"
                    );
                    return;
                }
            }
        }
        self.server_pool.release(server);
    }
}

/// The response a Parse, Bind, Describe or Close expects when it needs no
/// renaming (unnamed statement, or a portal), read from its first bytes;
/// `None` when it names a statement or more bytes are needed.
fn unnamed_expectation(tag: u8, buf: &[u8], len: usize) -> Option<Pending> {
    let body = buf.get(5..len.min(buf.len()))?;
    match tag {
        b'P' => (*body.first()? == 0).then_some(Pending::Parse {
            hash: None,
            swallow: false,
        }),
        b'B' => {
            let portal_end = body.iter().position(|&b| b == 0)?;
            (*body.get(portal_end + 1)? == 0).then_some(Pending::Bind)
        }
        b'D' | b'C' => {
            let kind = *body.first()?;
            let unnamed = *body.get(1)? == 0;
            (kind == b'P' || unnamed).then_some(if tag == b'D' {
                Pending::Describe
            } else {
                Pending::Close
            })
        }
        _ => None,
    }
}

/// What a client that closed left unread (at most a few Terminates are
/// expected; more is cut short).
fn read_until_closed(client: &std::net::TcpStream) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut bytes = Vec::new();
    let mut probe = [0u8; 64];
    loop {
        match (&*client).read(&mut probe) {
            Ok(0) => return Ok(bytes),
            Ok(n) => {
                bytes.extend_from_slice(&probe[..n]);
                if bytes.len() > 256 {
                    return Ok(bytes);
                }
            }
            Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => return Ok(bytes),
            Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
            Err(error) => return Err(error),
        }
    }
}

/// The client's socket when it is plain TCP (not TLS, not a Unix socket).
fn client_tcp<S: ClientStream>(client: &S) -> Option<&tokio::net::TcpStream> {
    (client as &dyn std::any::Any).downcast_ref::<tokio::net::TcpStream>()
}

/// `DISCARD ALL` before a session-mode connection serves another client.
/// `strict` after the kernel relayed the session, when the pooler does not
/// know the server is idle: its answer must be the first thing the server
/// says (notices, notifications and parameter changes aside) and nothing
/// may follow it, else the server is not reused.
async fn reset(server: &mut PooledServer, strict: bool) -> Result<(), SessionError> {
    let mut out = BytesMut::with_capacity(32);
    protocol::query(&mut out, "DISCARD ALL");
    let conn = &mut server.conn;
    let mut discarded = false;
    conn.stream
        .write_all(&out)
        .await
        .map_err(SessionError::ServerIo)?;
    loop {
        if let Some((tag, len)) =
            protocol::frame(&conn.buf).map_err(SessionError::ServerProtocol)?
        {
            if conn.buf.len() >= len {
                if strict {
                    match tag {
                        b'N' | b'A' | b'S' => {}
                        b'C' if !discarded && conn.buf[5..len] == *b"DISCARD ALL\0" => {
                            discarded = true;
                        }
                        b'Z' if discarded && conn.buf[5] == b'I' && conn.buf.len() == len => {}
                        _ => return Err(SessionError::KernelRelayDesync),
                    }
                }
                conn.buf.advance(len);
                match tag {
                    b'E' => return Err(SessionError::ServerClosed),
                    b'Z' => {
                        if strict && !conn.looks_alive() {
                            return Err(SessionError::KernelRelayDesync);
                        }
                        conn.prepared.clear();
                        return Ok(());
                    }
                    _ => continue,
                }
            }
        }
        if conn
            .stream
            .read_buf(&mut conn.buf)
            .await
            .map_err(SessionError::ServerIo)?
            == 0
        {
            return Err(SessionError::ServerClosed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unnamed_statements_and_portals_pass_through_named_statements_do_not() {
        let mut out = BytesMut::new();
        protocol::parse(&mut out, "", "SELECT 1", &[0, 0]);
        assert!(matches!(
            unnamed_expectation(b'P', &out, out.len()),
            Some(Pending::Parse { hash: None, .. })
        ));
        out.clear();
        protocol::parse(&mut out, "s1", "SELECT 1", &[0, 0]);
        assert_eq!(unnamed_expectation(b'P', &out, out.len()), None);
        out.clear();
        protocol::bind(&mut out, "", "", &[0, 0, 0, 0, 0, 0]);
        assert_eq!(
            unnamed_expectation(b'B', &out, out.len()),
            Some(Pending::Bind)
        );
        out.clear();
        protocol::bind(&mut out, "p1", "s1", &[0, 0, 0, 0, 0, 0]);
        assert_eq!(unnamed_expectation(b'B', &out, out.len()), None);
        out.clear();
        protocol::describe(&mut out, b'P', "p1");
        assert_eq!(
            unnamed_expectation(b'D', &out, out.len()),
            Some(Pending::Describe)
        );
        out.clear();
        protocol::describe(&mut out, b'S', "s1");
        assert_eq!(unnamed_expectation(b'D', &out, out.len()), None);
        // Too few bytes to tell: the caller waits for the whole message.
        assert_eq!(unnamed_expectation(b'B', &out[..5], out.len()), None);
    }

    #[test]
    fn the_mock_secret_of_an_unknown_user_keeps_its_salt_and_matches_no_password() {
        let salt = |secret: Secret| match secret {
            Secret::Scram { salt, .. } => salt,
            Secret::Md5(_) => panic!("a SCRAM mock"),
        };
        assert_eq!(salt(mock_secret("ghost")), salt(mock_secret("ghost")));
        assert_ne!(salt(mock_secret("ghost")), salt(mock_secret("other")));
        use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
        let mut client = ScramSha256::new(b"", ChannelBinding::unsupported());
        let (server, first) =
            ScramServer::start("ghost", &mock_secret("ghost"), client.message()).unwrap();
        client.update(first.as_bytes()).unwrap();
        assert!(matches!(
            server.finish(client.message()),
            Err(AuthError::Failed { .. })
        ));
    }
}
