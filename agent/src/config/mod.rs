//! The cluster file: one TOML file describes the whole cluster and is the
//! same on every node; each node finds its own `[[node]]` by name.
//!
//! Loading is: read, parse into typed sections (unknown keys are errors),
//! then [`Config::validate`], which reports every problem at once with its
//! key path. Defaults live on the fields below and nowhere else.

use std::{
    collections::HashSet,
    fmt,
    net::SocketAddr,
    path::{Path, PathBuf},
};

use ipnet::IpNet;
use serde::Deserialize;

mod service;

pub use service::{
    BackendConfig, Forwarding, PortRange, PortSpec, Protocol, Scheduler, ServiceConfig,
    DEFAULT_WEIGHT, MAX_PORTS_PER_SERVICE, MAX_WEIGHT,
};
pub mod health;
pub use health::{CheckKind, HealthCheckConfig, PgRole, StatusRange};
pub mod storage;
pub use self::pooler::{AdminRole, PoolConfig, PoolMode, PoolerConfig, PoolerUser};
pub use storage::VolumeConfig;

pub mod pgha;
pub use pgha::PostgresConfig;
pub mod pooler;
pub mod supervise;
pub use supervise::SuperviseConfig;
pub mod vrrp;
pub use vrrp::{TrackConfig, VrrpConfig};
pub mod cluster_state;
pub use cluster_state::ClusterStateConfig;

/// Where pinned maps go unless the cluster or the node says otherwise.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/farol";
/// The metrics and status port (unassigned by IANA, unlikely to collide).
pub const DEFAULT_METRICS_LISTEN: &str = "0.0.0.0:9477";
/// Linux interface names are at most IFNAMSIZ - 1 bytes.
const MAX_INTERFACE_NAME: usize = 15;

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub cluster: ClusterConfig,
    /// Every machine of the cluster, in `[[node]]` sections.
    #[serde(rename = "node", default)]
    pub nodes: Vec<NodeConfig>,
    /// Virtual services balanced in the kernel, in `[[service]]` sections.
    #[serde(rename = "service", default)]
    pub services: Vec<ServiceConfig>,
    /// Replicated volumes, in `[[volume]]` sections (see `storage.rs`).
    #[serde(default, rename = "volume")]
    pub volumes: Vec<VolumeConfig>,
    /// The PostgreSQL pooler, when this cluster runs one.
    #[serde(default)]
    pub pooler: Option<PoolerConfig>,
    /// Child processes the agents run (Apache), in `[[supervise]]` sections.
    #[serde(default, rename = "supervise")]
    pub supervise: Vec<SuperviseConfig>,
    /// Virtual routers that move VIPs between nodes, in `[[vrrp]]`
    /// sections (see `vrrp.rs`).
    #[serde(default, rename = "vrrp")]
    pub vrrp: Vec<VrrpConfig>,
    /// The agents' shared state on Raft (voters, primary lease), when
    /// this cluster keeps one (see `cluster_state.rs`).
    #[serde(default)]
    pub cluster_state: Option<ClusterStateConfig>,
    /// PostgreSQL run and replicated by the agents (see `pgha.rs`).
    #[serde(default)]
    pub postgres: Option<PostgresConfig>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// A short name for logs and metrics labels.
    pub name: String,
    /// bpffs directory for pinned maps; nodes may override it (the lab runs
    /// several nodes on one kernel, so each needs its own).
    #[serde(default = "default_pin_dir")]
    pub pin_dir: PathBuf,
    /// Address of the `/metrics` HTTP endpoint; nodes may override it.
    #[serde(default = "default_metrics_listen")]
    pub metrics_listen: SocketAddr,
    /// How the XDP program is attached.
    #[serde(default)]
    pub xdp_mode: XdpMode,
    /// The cluster secret that authenticates agent-to-agent traffic (HMAC
    /// on every frame); prefer `secret_file`, which keeps it out of the file.
    pub secret: Option<String>,
    /// A file holding the cluster secret (trailing whitespace ignored).
    pub secret_file: Option<PathBuf>,
    /// A file holding a token (trailing whitespace ignored); when set, the
    /// control API is also served on the HTTP port under `/control/`, to
    /// clients that send `Authorization: Bearer TOKEN`.
    pub control_token_file: Option<PathBuf>,
}

/// How to attach the XDP program.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum XdpMode {
    /// Native (driver) mode, falling back to generic with a warning when
    /// the driver has no XDP support.
    #[default]
    Auto,
    /// Native mode only; fail if the driver cannot.
    Native,
    /// Generic (SKB) mode: works on every interface, slower.
    Generic,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// The node's name; `agent run` finds itself by `--node` or hostname.
    pub name: String,
    /// The node's LAN address with its prefix length, e.g. `192.0.2.11/24`.
    pub address: IpNet,
    /// The LAN interface the XDP program attaches to.
    pub interface: String,
    /// What the node does in the cluster.
    #[serde(default)]
    pub roles: Vec<Role>,
    /// Overrides `cluster.pin_dir` for this node.
    pub pin_dir: Option<PathBuf>,
    /// Overrides `cluster.metrics_listen` for this node.
    pub metrics_listen: Option<SocketAddr>,
    /// The control socket (`agent status`, `agent backend`, `agent
    /// reload`); default `/run/farol/<name>.sock`.
    pub control_socket: Option<PathBuf>,
}

/// The seed's roles: the two HAProxy/keepalived balancers, Apache on every
/// Pi, PostgreSQL, GlusterFS bricks.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Balancer,
    Web,
    Database,
    Storage,
}

fn default_pin_dir() -> PathBuf {
    PathBuf::from(DEFAULT_PIN_DIR)
}

fn default_metrics_listen() -> SocketAddr {
    DEFAULT_METRICS_LISTEN
        .parse()
        .expect("DEFAULT_METRICS_LISTEN is a valid socket address")
}

/// One thing wrong with a config, at a key path such as `node[2].address`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub key: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read the config file: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {key}: {message}")]
    Parse {
        path: PathBuf,
        key: String,
        message: String,
    },
    #[error("{}", render_problems(path, problems))]
    Invalid {
        path: PathBuf,
        problems: Vec<Problem>,
    },
    #[error("{path}: node: no [[node]] is named {name:?} (known: {known})")]
    UnknownNode {
        path: PathBuf,
        name: String,
        known: String,
    },
}

fn render_problems(path: &Path, problems: &[Problem]) -> String {
    let lines: Vec<String> = problems
        .iter()
        .map(|problem| format!("{}: {problem}", path.display()))
        .collect();
    lines.join("\n")
}

impl ConfigError {
    /// Every problem, for callers that count or test them.
    pub fn problems(&self) -> Vec<Problem> {
        match self {
            ConfigError::Invalid { problems, .. } => problems.clone(),
            ConfigError::Parse { key, message, .. } => vec![Problem {
                key: key.clone(),
                message: message.clone(),
            }],
            ConfigError::Read { source, .. } => vec![Problem {
                key: String::new(),
                message: source.to_string(),
            }],
            ConfigError::UnknownNode { name, .. } => vec![Problem {
                key: "node".into(),
                message: format!("no node named {name:?}"),
            }],
        }
    }
}

impl Config {
    /// Reads, parses and validates a cluster file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::from_toml(path, &text)
    }

    /// Parses and validates `text`; `path` only names the file in errors.
    pub fn from_toml(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let config = parse(path, text)?;
        let problems = config.validate();
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError::Invalid {
                path: path.to_owned(),
                problems,
            })
        }
    }

    /// Every cross-field rule; returns all problems, empty when valid.
    pub fn validate(&self) -> Vec<Problem> {
        let mut problems = Vec::new();
        let mut problem = |key: String, message: String| problems.push(Problem { key, message });

        if !is_identifier(&self.cluster.name) {
            problem(
                "cluster.name".into(),
                format!(
                    "expected letters, digits, '-' or '_' (1 to 63 characters), got {:?}",
                    self.cluster.name
                ),
            );
        }
        if !self.cluster.pin_dir.is_absolute() {
            problem(
                "cluster.pin_dir".into(),
                format!(
                    "expected an absolute path on a bpffs, got {:?}",
                    self.cluster.pin_dir
                ),
            );
        }
        if self.cluster.metrics_listen.port() == 0 {
            problem(
                "cluster.metrics_listen".into(),
                "expected a fixed port, got port 0".into(),
            );
        }
        if self.nodes.is_empty() {
            problem(
                "node".into(),
                "expected at least one [[node]] section".into(),
            );
        }

        let mut names = HashSet::new();
        let mut addresses = HashSet::new();
        let mut pin_dirs = HashSet::new();
        for (index, node) in self.nodes.iter().enumerate() {
            let at = |key: &str| format!("node[{index}].{key}");
            if !is_identifier(&node.name) {
                problem(
                    at("name"),
                    format!(
                        "expected letters, digits, '-' or '_' (1 to 63 characters), got {:?}",
                        node.name
                    ),
                );
            } else if !names.insert(node.name.as_str()) {
                problem(
                    at("name"),
                    format!("{:?} is already the name of another node", node.name),
                );
            }
            let ip = node.address.addr();
            if ip.is_unspecified() || ip.is_multicast() || ip.is_loopback() {
                problem(
                    at("address"),
                    format!("expected a unicast LAN address, got {}", node.address),
                );
            } else if !addresses.insert(ip) {
                problem(
                    at("address"),
                    format!("{ip} is already the address of another node"),
                );
            }
            if let Err(why) = check_interface_name(&node.interface) {
                problem(at("interface"), why);
            }
            let mut roles = HashSet::new();
            for role in &node.roles {
                if !roles.insert(role) {
                    problem(at("roles"), format!("{role:?} is listed twice"));
                }
            }
            if let Some(pin_dir) = &node.pin_dir {
                if !pin_dir.is_absolute() {
                    problem(
                        at("pin_dir"),
                        format!("expected an absolute path on a bpffs, got {pin_dir:?}"),
                    );
                } else if !pin_dirs.insert(pin_dir.clone()) {
                    problem(
                        at("pin_dir"),
                        format!("{pin_dir:?} is already the pin_dir of another node"),
                    );
                }
            }
            if node
                .control_socket
                .as_ref()
                .is_some_and(|path| !path.is_absolute())
            {
                problem(
                    at("control_socket"),
                    "expected an absolute path for the control socket".into(),
                );
            }
            if node.metrics_listen.is_some_and(|addr| addr.port() == 0) {
                problem(
                    at("metrics_listen"),
                    "expected a fixed port, got port 0".into(),
                );
            }
        }
        let has_secret = self.cluster.secret.is_some() || self.cluster.secret_file.is_some();
        if self.cluster.secret.is_some() && self.cluster.secret_file.is_some() {
            problem(
                "cluster.secret".into(),
                "set cluster.secret or cluster.secret_file, not both".into(),
            );
        }
        if self.cluster.secret.as_ref().is_some_and(|s| s.len() < 16) {
            problem(
                "cluster.secret".into(),
                "expected at least 16 characters".into(),
            );
        }
        storage::validate(&self.volumes, &self.nodes, has_secret, &mut problem);
        service::validate(&self.services, &self.nodes, &mut problems);
        if let Some(pooler) = &self.pooler {
            problems.extend(pooler.validate());
        }
        supervise::validate(
            &self.supervise,
            &self.nodes,
            &self.services,
            &self.volumes,
            &mut problems,
        );
        vrrp::validate(&self.vrrp, &self.nodes, &self.services, &mut problems);
        if let Some(section) = &self.cluster_state {
            cluster_state::validate(section, &self.nodes, has_secret, &mut problems);
        }
        if let Some(postgres) = &self.postgres {
            pgha::validate(postgres, &self.nodes, &mut problems);
        }
        problems
    }

    /// The cluster secret, from `cluster.secret` or `cluster.secret_file`.
    pub fn secret(&self) -> Result<Option<Vec<u8>>, std::io::Error> {
        if let Some(secret) = &self.cluster.secret {
            return Ok(Some(secret.as_bytes().to_vec()));
        }
        match &self.cluster.secret_file {
            Some(path) => {
                let text = std::fs::read(path)?;
                let end = text
                    .iter()
                    .rposition(|b| !b.is_ascii_whitespace())
                    .map_or(0, |i| i + 1);
                Ok(Some(text[..end].to_vec()))
            }
            None => Ok(None),
        }
    }

    /// The node this agent runs as.
    pub fn node(&self, path: &Path, name: &str) -> Result<&NodeConfig, ConfigError> {
        self.nodes
            .iter()
            .find(|node| node.name == name)
            .ok_or_else(|| ConfigError::UnknownNode {
                path: path.to_owned(),
                name: name.to_owned(),
                known: self
                    .nodes
                    .iter()
                    .map(|node| node.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }

    pub fn pin_dir(&self, node: &NodeConfig) -> PathBuf {
        node.pin_dir
            .clone()
            .unwrap_or_else(|| self.cluster.pin_dir.clone())
    }

    pub fn metrics_listen(&self, node: &NodeConfig) -> SocketAddr {
        node.metrics_listen.unwrap_or(self.cluster.metrics_listen)
    }
}

fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
    let parse_error = |key: String, error: &toml::de::Error| ConfigError::Parse {
        path: path.to_owned(),
        key,
        message: describe_toml_error(text, error),
    };
    let deserializer =
        toml::Deserializer::parse(text).map_err(|error| parse_error("(syntax)".into(), &error))?;
    serde_path_to_error::deserialize(deserializer).map_err(|error| {
        let key = display_key_path(&error.path().to_string());
        parse_error(key, error.inner())
    })
}

/// serde_path_to_error writes `node[1].roles[0]`, or `.` for the root.
fn display_key_path(path: &str) -> String {
    if path == "." || path.is_empty() {
        "(top level)".into()
    } else {
        path.to_owned()
    }
}

/// The toml message without its multi-line source excerpt, plus the line.
fn describe_toml_error(text: &str, error: &toml::de::Error) -> String {
    let message = error.message().trim().to_owned();
    match error.span() {
        Some(span) => {
            let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
            format!("{message} (line {line})")
        }
        None => message,
    }
}

fn is_identifier(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

fn check_interface_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_INTERFACE_NAME {
        return Err(format!(
            "expected an interface name of 1 to {MAX_INTERFACE_NAME} bytes, got {name:?}"
        ));
    }
    if name == "."
        || name == ".."
        || name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace() || c == '\0')
    {
        return Err(format!(
            "expected an interface name without '/', ':', spaces or NUL, got {name:?}"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
