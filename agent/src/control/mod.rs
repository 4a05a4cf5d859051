//! Runtime control: the local API on a Unix socket (HAProxy's runtime
//! socket), the read-only status routes on the agent's HTTP port (status
//! page, JSON, the agent check's `GET /agent`), config reload (the API's
//! `POST /reload` and SIGHUP), and the CLI side of `agent status`,
//! `agent backend ...` and `agent reload`.
//!
//! The socket is `/run/farol/<node>.sock` (see [`default_socket`] for a
//! non-default pin directory) unless the node's `control_socket`,
//! `agent run --control-socket` or FAROL_CONTROL_SOCKET say otherwise. It is created mode 0600: whoever may use it may drain backends.
//! Write operations exist only there, and on the TCP port only when
//! `cluster.control_token_file` is set: then `/control/...` serves the same
//! API to clients that send `Authorization: Bearer TOKEN` (compared in
//! constant time); without the token they get 401.
//!
//! Drains travel through the agent check (see [`crate::health::agent`]):
//! `agent backend drain NODE` run on NODE itself sets the node's own admin
//! state, which every balancer reads at its next check of that node; run on
//! a balancer for another node it only affects that balancer.

pub mod client;
pub mod page;
pub mod status;

use std::{
    net::IpAddr,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
};

use axum::{
    extract::{Path as UrlPath, RawQuery, State},
    http::{header, StatusCode},
    response::{IntoResponse, Redirect, Response},
    routing::{get, post},
    Router,
};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{counter::ConstCounter, MetricType},
};
use serde::{Deserialize, Serialize};
use tokio::{net::UnixListener, sync::watch};
use tracing::{info, warn};

use crate::{
    config::{Config, MAX_WEIGHT},
    dataplane::lb::LoadBalancerMaps,
    health::{AdminState, Health},
};

/// Where the control socket goes when nothing says otherwise:
/// `/run/farol/NODE.sock` with the default pin directory; with another one
/// (the lab runs many nodes, and tests many labs, on one machine) a name
/// made from the pin directory, which is already unique per running agent:
/// `/sys/fs/bpf/farol-lab/nuster1` gives `/run/farol/farol-lab-nuster1.sock`.
pub fn default_socket(node: &str, pin_dir: &Path) -> PathBuf {
    if pin_dir == Path::new(crate::config::DEFAULT_PIN_DIR) {
        return PathBuf::from(format!("/run/farol/{node}.sock"));
    }
    let relative = pin_dir.strip_prefix("/sys/fs/bpf").unwrap_or(pin_dir);
    let name: String = relative
        .components()
        .filter_map(|part| match part {
            std::path::Component::Normal(part) => Some(part.to_string_lossy().into_owned()),
            _ => None,
        })
        .collect::<Vec<_>>()
        .join("-")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    PathBuf::from(format!("/run/farol/{name}.sock"))
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("cannot create the control socket's directory {path}")]
    Directory {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("another agent answers on the control socket {path} (give this one --control-socket)")]
    InUse { path: PathBuf },
    #[error("cannot listen on the control socket {path}")]
    Bind {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the control socket server failed")]
    Serve(#[source] std::io::Error),
    #[error("cannot read cluster.control_token_file")]
    Token(#[source] std::io::Error),
}

/// What the control routes work on.
#[derive(Debug)]
pub struct Control {
    pub cluster: String,
    pub node: String,
    /// The file `reload` re-reads (None: reload is refused).
    pub config_path: Option<PathBuf>,
    pub config: watch::Sender<Arc<Config>>,
    pub health: Arc<Health>,
    pub maps: Option<Arc<tokio::sync::Mutex<LoadBalancerMaps>>>,
    /// The bearer token of the control API on the TCP port (None: that
    /// API is not served).
    token: Option<String>,
    /// The cluster state, once `agent run` started it (`/cluster` routes).
    pub cluster_state: std::sync::OnceLock<crate::cluster::ClusterHandle>,
    /// Planned PostgreSQL switchovers, once `agent run` started them
    /// (`/pg/switchover/NODE`).
    pub pg_switchover: std::sync::OnceLock<Arc<crate::pgha::switchover::Switchover>>,
    reloads_applied: AtomicU64,
    reloads_refused: AtomicU64,
    /// The data plane's interface and attach mode, set once it attached.
    xdp: std::sync::OnceLock<status::XdpStatus>,
}

/// The answer to a write operation.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Reply {
    pub ok: bool,
    pub message: String,
}

fn reply(status: StatusCode, ok: bool, message: String) -> Response {
    json(status, &Reply { ok, message })
}

/// A JSON response (axum's `Json` needs a feature that pulls in more).
fn json<T: Serialize>(status: StatusCode, value: &T) -> Response {
    match serde_json::to_string(value) {
        Ok(body) => (status, [(header::CONTENT_TYPE, "application/json")], body).into_response(),
        Err(error) => (StatusCode::INTERNAL_SERVER_ERROR, error.to_string()).into_response(),
    }
}

impl Control {
    pub fn new(
        cluster: &str,
        node: &str,
        config_path: Option<PathBuf>,
        config: watch::Sender<Arc<Config>>,
        health: Arc<Health>,
        maps: Option<Arc<tokio::sync::Mutex<LoadBalancerMaps>>>,
        token: Option<String>,
    ) -> Arc<Control> {
        Arc::new(Control {
            cluster: cluster.to_owned(),
            node: node.to_owned(),
            config_path,
            config,
            health,
            maps,
            token,
            cluster_state: std::sync::OnceLock::new(),
            pg_switchover: std::sync::OnceLock::new(),
            reloads_applied: AtomicU64::new(0),
            reloads_refused: AtomicU64::new(0),
            xdp: std::sync::OnceLock::new(),
        })
    }

    /// Records where and how the XDP program attached, for `agent status`
    /// and the status JSON (the metric `farol_xdp_attached` says the same).
    pub fn set_xdp_attachment(&self, interface: &str, mode: crate::dataplane::AttachMode) {
        let _ = self.xdp.set(status::XdpStatus {
            interface: interface.to_owned(),
            mode: mode.label().to_owned(),
        });
    }

    pub async fn status(&self) -> status::Status {
        let config = self.config.borrow().clone();
        let mut status = status::gather(
            &self.cluster,
            &self.node,
            &config,
            &self.health,
            self.maps.as_ref(),
        )
        .await;
        status.cluster_state = self.cluster_state.get().map(|cluster| cluster.status());
        status.xdp = self.xdp.get().cloned();
        status
    }

    /// Re-reads the config file; applies it when valid, keeps the running
    /// one (and says why) when not.
    pub fn reload(&self, why: &str) -> Result<String, String> {
        let result = self.try_reload();
        match &result {
            Ok(message) => {
                self.reloads_applied.fetch_add(1, Ordering::Relaxed);
                info!(trigger = why, "config reloaded: {message}");
            }
            Err(error) => {
                self.reloads_refused.fetch_add(1, Ordering::Relaxed);
                warn!(
                    trigger = why,
                    "config reload refused, the running config stays: {error}"
                );
            }
        }
        result
    }

    fn try_reload(&self) -> Result<String, String> {
        let path = self
            .config_path
            .as_deref()
            .ok_or("this agent was started without a config file to re-read")?;
        let new = Config::load(path).map_err(|error| error.to_string())?;
        new.node(path, &self.node)
            .map_err(|error| error.to_string())?;
        let old = self.config.borrow().clone();
        let mut changes = Vec::new();
        for service in &new.services {
            match old.services.iter().find(|s| s.name == service.name) {
                None => changes.push(format!("service {} added", service.name)),
                Some(before) if before != service => {
                    changes.push(format!("service {} changed", service.name))
                }
                Some(_) => {}
            }
        }
        for service in &old.services {
            if !new.services.iter().any(|s| s.name == service.name) {
                changes.push(format!("service {} removed", service.name));
            }
        }
        let mut restart = Vec::new();
        if new.cluster != old.cluster {
            restart.push("[cluster]");
        }
        if new.volumes != old.volumes {
            restart.push("[[volume]]");
        }
        if new.pooler != old.pooler {
            restart.push("[pooler]");
        }
        let node_of = |config: &Config| config.nodes.iter().find(|n| n.name == self.node).cloned();
        if node_of(&new) != node_of(&old) {
            restart.push("this node's [[node]]");
        }
        let vips = |config: &Config| {
            let mut vips: Vec<IpAddr> = config.services.iter().map(|s| s.vip).collect();
            vips.sort();
            vips.dedup();
            vips
        };
        if vips(&new) != vips(&old) {
            restart.push("the set of VIPs (on lo)");
        }
        let mut message = if changes.is_empty() {
            "no service changed".to_owned()
        } else {
            changes.join(", ")
        };
        if !restart.is_empty() {
            message.push_str(&format!(
                "; changes to {} take effect at the next restart",
                restart.join(", ")
            ));
        }
        self.config.send_replace(Arc::new(new));
        Ok(message)
    }

    /// `agent backend ACTION NAME`.
    pub fn backend_action(
        &self,
        name: &str,
        action: &str,
        service: Option<&str>,
        weight: Option<u32>,
    ) -> Result<String, (StatusCode, String)> {
        let config = self.config.borrow().clone();
        let services: Vec<_> = config
            .services
            .iter()
            .filter(|s| service.is_none_or(|wanted| wanted == s.name))
            .collect();
        if let Some(wanted) = service {
            if services.is_empty() {
                let known: Vec<&str> = config.services.iter().map(|s| s.name.as_str()).collect();
                return Err((
                    StatusCode::NOT_FOUND,
                    format!(
                        "no service named {wanted:?} (services: {})",
                        known.join(", ")
                    ),
                ));
            }
        }
        let names: Vec<String> = services
            .iter()
            .flat_map(|s| s.backends.iter())
            .filter_map(|b| {
                b.node
                    .clone()
                    .or_else(|| b.resolve(&config.nodes).map(|a| a.to_string()))
            })
            .collect();
        let is_self = name == self.node;
        if !names.iter().any(|n| n == name) && !is_self {
            let mut known = names.clone();
            known.sort();
            known.dedup();
            return Err((
                StatusCode::NOT_FOUND,
                format!(
                    "no backend named {name:?} here (backends: {})",
                    known.join(", ")
                ),
            ));
        }
        let scope = service.map(str::to_owned);
        let mut local = self.health.override_of(service, name);
        let own = is_self && service.is_none();
        let message = match action {
            "drain" | "enable" | "disable" => {
                let state = match action {
                    "drain" => AdminState::Drain,
                    "disable" => AdminState::Maint,
                    _ => AdminState::Ready,
                };
                if own {
                    self.health
                        .set_own_state(state, "asked through the control socket");
                }
                local.admin = (state != AdminState::Ready && !own).then_some(state);
                self.health.set_override(scope, name, local);
                match (state, own) {
                    (AdminState::Drain, true) => format!("{name} drains: every balancer that checks it sends it no new flow within one check interval; established flows finish"),
                    (AdminState::Maint, true) => format!("{name} is disabled: every balancer that checks it takes it out within one check interval"),
                    (AdminState::Ready, true) => format!("{name} is ready again"),
                    (AdminState::Drain, false) => format!("{name} drains on this balancer: no new flows, established flows finish"),
                    (AdminState::Maint, false) => format!("{name} is disabled on this balancer"),
                    (AdminState::Ready, false) => format!("{name}: this balancer's override is cleared"),
                }
            }
            "weight" => {
                let Some(weight) = weight else {
                    return Err((
                        StatusCode::BAD_REQUEST,
                        "weight needs a value: agent backend weight NODE 0..=1000".into(),
                    ));
                };
                if weight > MAX_WEIGHT {
                    return Err((
                        StatusCode::BAD_REQUEST,
                        format!("weight must be 0..={MAX_WEIGHT}, got {weight}"),
                    ));
                }
                local.weight = Some(weight);
                self.health.set_override(scope, name, local);
                format!("{name} weight set to {weight} on this balancer")
            }
            other => {
                return Err((
                    StatusCode::BAD_REQUEST,
                    format!("unknown action {other:?}: expected drain, enable, disable or weight"),
                ))
            }
        };
        info!(backend = %name, action, service = service.unwrap_or("*"), "{message}");
        Ok(message)
    }
}

/// Read-only routes for the agent's HTTP port: the status page at
/// `/status` (and `/`), `/status.json`, and `/agent` (the agent check).
pub fn public_routes(control: Arc<Control>) -> Router {
    let mut router = Router::new()
        .route("/", get(|| async { Redirect::temporary("/status") }))
        .route("/status", get(status_page))
        .route("/status.json", get(status_json))
        .route(crate::health::agent::AGENT_PATH, get(agent_state))
        .route("/cluster.json", get(crate::cluster::control::status))
        .with_state(control.clone());
    if control.token.is_some() {
        let guarded = socket_routes(control.clone())
            .layer(axum::middleware::from_fn_with_state(control, require_token));
        router = router.nest(CONTROL_PREFIX, guarded);
    }
    router
}

/// Where the control API lives on the TCP port.
pub const CONTROL_PREFIX: &str = "/control";

/// Lets a request through only with the configured bearer token.
async fn require_token(
    State(control): State<Arc<Control>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "));
    let allowed = match (&control.token, presented) {
        (Some(expected), Some(presented)) => {
            constant_time_eq(expected.as_bytes(), presented.as_bytes())
        }
        _ => false,
    };
    if allowed {
        next.run(request).await
    } else {
        warn!("control API request over TCP without the right token refused");
        reply(
            StatusCode::UNAUTHORIZED,
            false,
            "the control API over TCP needs Authorization: Bearer TOKEN".into(),
        )
    }
}

/// Equal bytes, in a time that does not depend on where they differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Reads a token file (trailing whitespace ignored); an empty one is an error.
pub fn read_token(path: &Path) -> Result<String, std::io::Error> {
    let text = std::fs::read_to_string(path)?;
    let token = text.trim_end().to_owned();
    if token.len() < 16 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!(
                "{}: expected a token of at least 16 characters",
                path.display()
            ),
        ));
    }
    Ok(token)
}

async fn status_page(State(control): State<Arc<Control>>) -> impl IntoResponse {
    let status = control.status().await;
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        page::render(&status),
    )
}

async fn status_json(State(control): State<Arc<Control>>) -> Response {
    json(StatusCode::OK, &control.status().await)
}

async fn agent_state(
    State(control): State<Arc<Control>>,
    axum::extract::ConnectInfo(peer): axum::extract::ConnectInfo<std::net::SocketAddr>,
    axum::extract::RawQuery(query): axum::extract::RawQuery,
) -> Response {
    let applied = match crate::health::agent::Applied::from_query(query.as_deref()) {
        Ok(applied) => applied,
        Err(error) => return (StatusCode::BAD_REQUEST, format!("{error}\n")).into_response(),
    };
    control.health.agent_reads.record(peer.ip(), applied);
    (
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        format!("{}\n", control.health.own_state().label()),
    )
        .into_response()
}

/// `service=NAME&weight=N`; names are plain (see client::encode).
fn parse_query(query: Option<&str>) -> Result<(Option<String>, Option<u32>), String> {
    let (mut service, mut weight) = (None, None);
    for pair in query
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
    {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let value = percent_decode(value)?;
        match key {
            "service" => service = Some(value),
            "weight" => {
                weight = Some(
                    value
                        .parse()
                        .map_err(|_| format!("weight: expected 0..=1000, got {value:?}"))?,
                )
            }
            other => return Err(format!("unknown parameter {other:?}")),
        }
    }
    Ok((service, weight))
}

fn percent_decode(text: &str) -> Result<String, String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = text
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("bad escape in {text:?}"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("not UTF-8: {text:?}"))
}

async fn backend_action(
    State(control): State<Arc<Control>>,
    UrlPath((name, action)): UrlPath<(String, String)>,
    RawQuery(query): RawQuery,
) -> Response {
    let (service, weight) = match parse_query(query.as_deref()) {
        Ok(parsed) => parsed,
        Err(message) => return reply(StatusCode::BAD_REQUEST, false, message),
    };
    match control.backend_action(&name, &action, service.as_deref(), weight) {
        Ok(message) => reply(StatusCode::OK, true, message),
        Err((status, message)) => reply(status, false, message),
    }
}

async fn reload(State(control): State<Arc<Control>>) -> Response {
    match control.reload("control socket") {
        Ok(message) => reply(StatusCode::OK, true, message),
        Err(message) => reply(StatusCode::UNPROCESSABLE_ENTITY, false, message),
    }
}

/// `agent stop`: the agent stops as on SIGTERM (supervised children drained
/// at every balancer and stopped, then the data plane removed), by sending
/// itself that signal, so there is one way to stop.
async fn stop(State(control): State<Arc<Control>>) -> Response {
    info!(node = %control.node, "stop asked through the control API");
    // SAFETY: kill(2) on our own PID with a signal we handle.
    let sent = unsafe { libc::kill(std::process::id() as i32, libc::SIGTERM) };
    if sent == 0 {
        reply(
            StatusCode::OK,
            true,
            format!(
                "{} stops: supervised children are drained at every balancer and stopped first",
                control.node
            ),
        )
    } else {
        let error = std::io::Error::last_os_error();
        reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            false,
            format!("cannot signal the agent: {error}"),
        )
    }
}

/// Every route of the control socket.
fn socket_routes(control: Arc<Control>) -> Router {
    Router::new()
        .route("/status", get(status_json))
        .route("/backend/{name}/{action}", post(backend_action))
        .route("/reload", post(reload))
        .route("/stop", post(stop))
        .route("/cluster", get(crate::cluster::control::status))
        .route(
            "/cluster/primary/{node}",
            post(crate::cluster::control::set_primary),
        )
        .route(
            "/pg/switchover/{node}",
            post(crate::pgha::cli::switchover_route),
        )
        .with_state(control)
}

/// Binds the control socket: refuses one another agent answers on,
/// replaces a stale file a dead agent left.
pub async fn bind(path: &Path) -> Result<UnixListener, ControlError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|source| ControlError::Directory {
            path: dir.to_owned(),
            source,
        })?;
    }
    if path.exists() {
        if tokio::net::UnixStream::connect(path).await.is_ok() {
            return Err(ControlError::InUse {
                path: path.to_owned(),
            });
        }
        // A dead agent's socket: nobody answers on it.
        std::fs::remove_file(path).map_err(|source| ControlError::Bind {
            path: path.to_owned(),
            source,
        })?;
    }
    let listener = UnixListener::bind(path).map_err(|source| ControlError::Bind {
        path: path.to_owned(),
        source,
    })?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(|source| {
        ControlError::Bind {
            path: path.to_owned(),
            source,
        }
    })?;
    Ok(listener)
}

/// Serves the control socket and reloads on SIGHUP until `shutdown`;
/// removes the socket file at the end.
pub async fn serve(
    listener: UnixListener,
    path: PathBuf,
    control: Arc<Control>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), ControlError> {
    let hangups = {
        let control = control.clone();
        let mut shutdown = shutdown.clone();
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(mut signal) => Some(tokio::spawn(async move {
                loop {
                    tokio::select! {
                        received = signal.recv() => {
                            if received.is_none() { break }
                            let _ = control.reload("SIGHUP");
                        }
                        _ = shutdown.wait_for(|stop| *stop) => break,
                    }
                }
            })),
            Err(error) => {
                warn!(%error, "cannot listen for SIGHUP: reload through `agent reload` only");
                None
            }
        }
    };
    let stop = async move {
        let _ = shutdown.wait_for(|stop| *stop).await;
    };
    let result = axum::serve(listener, socket_routes(control))
        .with_graceful_shutdown(stop)
        .await
        .map_err(ControlError::Serve);
    if let Some(task) = hangups {
        task.abort();
    }
    let _ = std::fs::remove_file(&path);
    result
}

/// Reload counts on `/metrics`.
#[derive(Debug)]
pub struct ControlCollector(pub Arc<Control>);

impl Collector for ControlCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut family = encoder.encode_descriptor(
            "farol_config_reloads",
            "Config reloads (SIGHUP or agent reload), applied or refused for errors",
            None,
            MetricType::Counter,
        )?;
        for (result, count) in [
            ("applied", &self.0.reloads_applied),
            ("refused", &self.0.reloads_refused),
        ] {
            ConstCounter::new(count.load(Ordering::Relaxed))
                .encode(family.encode_family(&[("result", result)])?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
