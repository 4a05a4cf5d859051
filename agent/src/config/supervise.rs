//! `[[supervise]]` sections: child processes the agent runs on its nodes
//! (Apache on every Pi in the seed), with readiness, restarts, stop and
//! reload. The runtime side is `crate::supervise`.
//!
//! ```toml
//! [[supervise]]
//! name = "apache"
//! roles = ["web"]                      # or nodes = ["nuster1", "nuster2"]
//! command = "/usr/sbin/apache2"
//! args = ["-f", "/etc/farol/apache/farol.conf", "-D", "FOREGROUND"]
//! env = { FAROL_RUN_DIR = "/run/farol/apache" }
//! service = "web"                      # drained before the child stops
//! ready = { port = 80, http = "/", timeout = "10s" }
//! restart = { initial = "200ms", max = "30s", attempts = 5, stable_after = "30s" }
//! stop_signal = "SIGWINCH"             # Apache's graceful-stop
//! stop_grace = "10s"                   # then SIGKILL to the process group
//! reload_signal = "SIGUSR1"            # Apache's graceful restart
//! config_test = ["/usr/sbin/apache2", "-f", "/etc/farol/apache/farol.conf", "-t"]
//! ```
//!
//! In `args`, `env` values, `working_dir`, `runtime_dir`, `config_test`,
//! `volume_fallback` and `ready.host`, `{node}`, `{address}` and `{cluster}`
//! stand for this node's name, its LAN address and the cluster's name; in
//! `env` values `{volume}` stands for `FAROL_VOLUME_MOUNT`.

use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use serde::Deserialize;

use super::{is_identifier, NodeConfig, Problem, Role, ServiceConfig, VolumeConfig};

/// Default time a child gets to become ready after it starts.
const DEFAULT_READY_TIMEOUT: Duration = Duration::from_secs(30);
const DEFAULT_READY_INTERVAL: Duration = Duration::from_millis(100);
const DEFAULT_STOP_GRACE: Duration = Duration::from_secs(10);
const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
const DEFAULT_CONFIG_TEST_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SuperviseConfig {
    /// The child's name in logs and metrics (letters, digits, `-`, `_`).
    pub name: String,
    /// Nodes that run it, by name; with `roles`, a node that matches either.
    #[serde(default)]
    pub nodes: Vec<String>,
    /// Roles whose nodes run it.
    #[serde(default)]
    pub roles: Vec<Role>,
    /// The program, an absolute path (no `PATH` lookup: the agent may run
    /// with a minimal environment).
    pub command: PathBuf,
    #[serde(default)]
    pub args: Vec<String>,
    /// Added to the agent's environment (besides `FAROL_NODE`,
    /// `FAROL_NODE_ADDRESS`, `FAROL_CLUSTER`, `FAROL_VOLUME_MOUNT`).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// The child's working directory; default: `/`.
    pub working_dir: Option<PathBuf>,
    /// A directory created (with its parents) before every start, for pid
    /// files and sockets, given to the child as `FAROL_RUNTIME_DIR`
    /// (systemd's `RuntimeDirectory=`).
    pub runtime_dir: Option<PathBuf>,
    /// The `[[service]]` this child serves: this node's backend in it is
    /// drained before the child stops and while it is down.
    pub service: Option<String>,
    /// A `[[volume]]` the child serves files from: `FAROL_VOLUME_MOUNT` is
    /// its mount point on nodes holding a replica, else `volume_fallback`.
    pub volume: Option<String>,
    /// `FAROL_VOLUME_MOUNT` (and `{volume}` in `env` values) on nodes
    /// without a replica of `volume`.
    pub volume_fallback: Option<PathBuf>,
    /// How to tell the child is serving; without it, running is ready.
    pub ready: Option<ReadyConfig>,
    #[serde(default)]
    pub restart: RestartConfig,
    /// Sent to the child to stop it.
    #[serde(default = "default_stop_signal")]
    pub stop_signal: SignalName,
    /// Time from the stop signal to SIGKILL of the child's process group.
    #[serde(default = "default_stop_grace", with = "humantime_serde")]
    pub stop_grace: Duration,
    /// Longest wait for this node's flows to finish after a drain.
    #[serde(default = "default_drain_timeout", with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// Sent to the child to reload its configuration; none: no reload.
    pub reload_signal: Option<SignalName>,
    /// Program and arguments run before a reload; a failure refuses the
    /// reload (its output is logged) and the running child keeps serving.
    #[serde(default)]
    pub config_test: Vec<String>,
    #[serde(default = "default_config_test_timeout", with = "humantime_serde")]
    pub config_test_timeout: Duration,
}

/// A readiness check: a TCP connect, or an HTTP GET when `http` is set.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ReadyConfig {
    pub port: u16,
    /// Where to connect; default `127.0.0.1`.
    #[serde(default = "default_ready_host")]
    pub host: String,
    /// The path of an HTTP/1.1 GET that must get an answer below 500.
    pub http: Option<String>,
    /// Longest time from start to ready; a child not ready by then is
    /// killed and counts as a failed start.
    #[serde(default = "default_ready_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Time between attempts.
    #[serde(default = "default_ready_interval", with = "humantime_serde")]
    pub interval: Duration,
}

/// Restarts with exponential backoff: `initial`, doubled per consecutive
/// failure up to `max`; after `attempts` consecutive failures the agent
/// gives up (logged as an error, `farol_supervise_state{state="gave_up"}`).
/// A run that stays up `stable_after` resets the count.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RestartConfig {
    #[serde(default = "default_initial_backoff", with = "humantime_serde")]
    pub initial: Duration,
    #[serde(default = "default_max_backoff", with = "humantime_serde")]
    pub max: Duration,
    #[serde(default = "default_attempts")]
    pub attempts: u32,
    #[serde(default = "default_stable_after", with = "humantime_serde")]
    pub stable_after: Duration,
}

impl Default for RestartConfig {
    fn default() -> Self {
        RestartConfig {
            initial: default_initial_backoff(),
            max: default_max_backoff(),
            attempts: default_attempts(),
            stable_after: default_stable_after(),
        }
    }
}

impl RestartConfig {
    /// The wait before restart number `failures` (1-based) of a row of
    /// consecutive failures.
    pub fn backoff(&self, failures: u32) -> Duration {
        let doublings = failures.saturating_sub(1).min(31);
        self.initial
            .checked_mul(1u32 << doublings)
            .unwrap_or(self.max)
            .min(self.max)
    }
}

/// A signal by name (`"SIGTERM"` or `"TERM"`), limited to those that make
/// sense for stopping or reloading a daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SignalName(pub i32);

/// The signals a `[[supervise]]` entry may name.
const SIGNALS: &[(&str, i32)] = &[
    ("SIGTERM", libc::SIGTERM),
    ("SIGINT", libc::SIGINT),
    ("SIGQUIT", libc::SIGQUIT),
    ("SIGHUP", libc::SIGHUP),
    ("SIGUSR1", libc::SIGUSR1),
    ("SIGUSR2", libc::SIGUSR2),
    ("SIGWINCH", libc::SIGWINCH),
    ("SIGKILL", libc::SIGKILL),
];

impl SignalName {
    pub fn number(self) -> i32 {
        self.0
    }

    pub fn name(self) -> &'static str {
        SIGNALS
            .iter()
            .find(|(_, number)| *number == self.0)
            .map_or("signal", |(name, _)| name)
    }

    /// The name of any signal number, for exit reports.
    pub fn describe(number: i32) -> String {
        SIGNALS.iter().find(|(_, n)| *n == number).map_or_else(
            || format!("signal {number}"),
            |(name, _)| (*name).to_owned(),
        )
    }
}

impl<'de> Deserialize<'de> for SignalName {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        let upper = text.to_ascii_uppercase();
        let full = if upper.starts_with("SIG") {
            upper
        } else {
            format!("SIG{upper}")
        };
        SIGNALS
            .iter()
            .find(|(name, _)| *name == full)
            .map(|(_, number)| SignalName(*number))
            .ok_or_else(|| {
                let names: Vec<&str> = SIGNALS.iter().map(|(name, _)| *name).collect();
                serde::de::Error::custom(format!(
                    "expected one of {}, got {text:?}",
                    names.join(", ")
                ))
            })
    }
}

fn default_stop_signal() -> SignalName {
    SignalName(libc::SIGTERM)
}
fn default_stop_grace() -> Duration {
    DEFAULT_STOP_GRACE
}
fn default_drain_timeout() -> Duration {
    DEFAULT_DRAIN_TIMEOUT
}
fn default_config_test_timeout() -> Duration {
    DEFAULT_CONFIG_TEST_TIMEOUT
}
fn default_ready_host() -> String {
    "127.0.0.1".into()
}
fn default_ready_timeout() -> Duration {
    DEFAULT_READY_TIMEOUT
}
fn default_ready_interval() -> Duration {
    DEFAULT_READY_INTERVAL
}
fn default_initial_backoff() -> Duration {
    Duration::from_millis(200)
}
fn default_max_backoff() -> Duration {
    Duration::from_secs(30)
}
fn default_attempts() -> u32 {
    5
}
fn default_stable_after() -> Duration {
    Duration::from_secs(30)
}

impl SuperviseConfig {
    /// Whether `node` runs this child.
    pub fn runs_on(&self, node: &NodeConfig) -> bool {
        self.nodes.contains(&node.name) || self.roles.iter().any(|role| node.roles.contains(role))
    }
}

/// Replaces `{node}`, `{address}` and `{cluster}` in `text`.
pub fn expand(text: &str, cluster: &str, node: &NodeConfig) -> String {
    text.replace("{node}", &node.name)
        .replace("{address}", &node.address.addr().to_string())
        .replace("{cluster}", cluster)
}

/// The `[[supervise]]` rules.
pub(super) fn validate(
    entries: &[SuperviseConfig],
    nodes: &[NodeConfig],
    services: &[ServiceConfig],
    volumes: &[VolumeConfig],
    problems: &mut Vec<Problem>,
) {
    let mut problem = |key: String, message: String| problems.push(Problem { key, message });
    let mut names = std::collections::HashSet::new();
    for (index, entry) in entries.iter().enumerate() {
        let at = |key: &str| format!("supervise[{index}].{key}");
        if !is_identifier(&entry.name) {
            problem(
                at("name"),
                format!(
                    "expected letters, digits, '-' or '_' (1 to 63 characters), got {:?}",
                    entry.name
                ),
            );
        } else if !names.insert(entry.name.as_str()) {
            problem(
                at("name"),
                format!("{:?} is already the name of another child", entry.name),
            );
        }
        if entry.nodes.is_empty() && entry.roles.is_empty() {
            problem(
                at("nodes"),
                "expected nodes or roles: where does this child run?".into(),
            );
        }
        for (n, name) in entry.nodes.iter().enumerate() {
            if !nodes.iter().any(|node| node.name == *name) {
                problem(
                    format!("supervise[{index}].nodes[{n}]"),
                    format!("no [[node]] is named {name:?}"),
                );
            }
        }
        if !entry.command.is_absolute() {
            problem(
                at("command"),
                format!("expected an absolute path, got {:?}", entry.command),
            );
        }
        for (key, dir) in [
            ("working_dir", &entry.working_dir),
            ("runtime_dir", &entry.runtime_dir),
        ] {
            if let Some(dir) = dir {
                if !dir.is_absolute() {
                    problem(at(key), format!("expected an absolute path, got {dir:?}"));
                }
            }
        }
        if entry.volume.is_none() && entry.env.values().any(|v| v.contains("{volume}")) {
            problem(
                at("env"),
                "{volume} is only known with volume = \"NAME\"".into(),
            );
        }
        for key in entry.env.keys() {
            if key.is_empty() || key.contains('=') || key.contains('\0') {
                problem(
                    at("env"),
                    format!("expected variable names without '=' or NUL, got {key:?}"),
                );
            }
        }
        if let Some(service) = &entry.service {
            match services.iter().find(|s| s.name == *service) {
                None => problem(
                    at("service"),
                    format!("no [[service]] is named {service:?}"),
                ),
                Some(service) => {
                    for node in nodes.iter().filter(|node| entry.runs_on(node)) {
                        let backs = service.backends.iter().any(|backend| {
                            backend.node.as_deref() == Some(node.name.as_str())
                                || backend.resolve(nodes) == Some(node.address.addr())
                        });
                        if !backs {
                            problem(
                                at("service"),
                                format!(
                                    "{} runs this child but is no backend of service {:?}",
                                    node.name, service.name
                                ),
                            );
                        }
                    }
                }
            }
        }
        match (&entry.volume, &entry.volume_fallback) {
            (Some(volume), fallback) => {
                match volumes.iter().find(|v| v.name == *volume) {
                    None => problem(at("volume"), format!("no [[volume]] is named {volume:?}")),
                    Some(config) => {
                        let uncovered = nodes.iter().any(|node| {
                            entry.runs_on(node) && config.replica(&node.name).is_none()
                        });
                        if uncovered && fallback.is_none() {
                            problem(
                                at("volume_fallback"),
                                format!("some nodes running this child hold no replica of {volume:?}: give them a local directory"),
                            );
                        }
                    }
                }
                if fallback.as_ref().is_some_and(|dir| !dir.is_absolute()) {
                    problem(
                        at("volume_fallback"),
                        format!("expected an absolute path, got {fallback:?}"),
                    );
                }
            }
            (None, Some(_)) => problem(
                at("volume_fallback"),
                "only used with volume = \"NAME\"".into(),
            ),
            (None, None) => {}
        }
        if let Some(ready) = &entry.ready {
            if ready.port == 0 {
                problem(at("ready.port"), "expected a fixed port, got port 0".into());
            }
            if let Some(path) = &ready.http {
                if !path.starts_with('/') || path.chars().any(|c| c.is_whitespace()) {
                    problem(
                        at("ready.http"),
                        format!("expected a path starting with '/' without spaces, got {path:?}"),
                    );
                }
            }
            if ready.interval.is_zero() || ready.interval > ready.timeout {
                problem(
                    at("ready.interval"),
                    format!(
                        "expected more than 0 and at most ready.timeout ({:?}), got {:?}",
                        ready.timeout, ready.interval
                    ),
                );
            }
        }
        let restart = &entry.restart;
        if restart.initial.is_zero() || restart.initial > restart.max {
            problem(
                at("restart.initial"),
                format!(
                    "expected more than 0 and at most restart.max ({:?}), got {:?}",
                    restart.max, restart.initial
                ),
            );
        }
        if restart.attempts == 0 {
            problem(
                at("restart.attempts"),
                "expected at least 1 (restarts before giving up)".into(),
            );
        }
        if entry.stop_signal.number() == libc::SIGKILL {
            problem(
                at("stop_signal"),
                "SIGKILL leaves the child no time to finish requests; it is sent anyway after stop_grace".into(),
            );
        }
        if entry.stop_grace.is_zero() {
            problem(at("stop_grace"), "expected more than 0".into());
        }
        if entry
            .reload_signal
            .is_some_and(|s| s.number() == libc::SIGKILL)
        {
            problem(at("reload_signal"), "SIGKILL cannot reload anything".into());
        }
        if let Some(program) = entry.config_test.first() {
            if !program.starts_with('/') {
                problem(
                    at("config_test"),
                    format!("expected an absolute program path first, got {program:?}"),
                );
            }
            if entry.reload_signal.is_none() {
                problem(
                    at("config_test"),
                    "only used before a reload: set reload_signal".into(),
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::super::Config;
    use super::*;

    const BASE: &str = r#"
[cluster]
name = "test"

[[node]]
name = "a"
address = "192.0.2.11/24"
interface = "eth0"
roles = ["web"]

[[node]]
name = "b"
address = "192.0.2.12/24"
interface = "eth0"
roles = ["web"]

[[node]]
name = "c"
address = "192.0.2.13/24"
interface = "eth0"

[[service]]
name = "web"
vip = "192.0.2.100"
port = 80
backends = [{ node = "a" }, { node = "b" }]
"#;

    fn load(extra: &str) -> Result<Config, super::super::ConfigError> {
        Config::from_toml(Path::new("test.toml"), &format!("{BASE}{extra}"))
    }

    fn problems(extra: &str) -> Vec<String> {
        match load(extra) {
            Ok(_) => Vec::new(),
            Err(error) => error.problems().iter().map(ToString::to_string).collect(),
        }
    }

    fn assert_problem(extra: &str, key: &str, fragment: &str) {
        let problems = problems(extra);
        assert!(
            problems
                .iter()
                .any(|p| p.starts_with(&format!("{key}: ")) && p.contains(fragment)),
            "expected a problem at {key} containing {fragment:?}, got {problems:#?}"
        );
    }

    #[test]
    fn minimal_entry_loads_with_defaults() {
        let config = load(
            r#"
[[supervise]]
name = "apache"
roles = ["web"]
command = "/usr/sbin/apache2"
"#,
        )
        .unwrap();
        let entry = &config.supervise[0];
        assert_eq!(entry.stop_signal, SignalName(libc::SIGTERM));
        assert_eq!(entry.stop_grace, Duration::from_secs(10));
        assert_eq!(entry.restart, RestartConfig::default());
        assert!(entry.runs_on(&config.nodes[0]));
        assert!(!entry.runs_on(&config.nodes[2]));
    }

    #[test]
    fn full_entry_loads() {
        let config = load(
            r#"
[[supervise]]
name = "apache"
nodes = ["a", "b"]
command = "/usr/sbin/apache2"
args = ["-f", "/etc/apache/{node}.conf", "-D", "FOREGROUND"]
env = { RUN = "/run/{cluster}/{node}" }
working_dir = "/"
service = "web"
ready = { port = 80, http = "/", timeout = "5s", interval = "50ms" }
restart = { initial = "100ms", max = "2s", attempts = 3, stable_after = "10s" }
stop_signal = "WINCH"
stop_grace = "3s"
reload_signal = "SIGUSR1"
config_test = ["/usr/sbin/apache2", "-t"]
"#,
        )
        .unwrap();
        let entry = &config.supervise[0];
        assert_eq!(entry.stop_signal.name(), "SIGWINCH");
        assert_eq!(entry.reload_signal, Some(SignalName(libc::SIGUSR1)));
        assert_eq!(entry.ready.as_ref().unwrap().http.as_deref(), Some("/"));
        assert_eq!(
            expand(&entry.env["RUN"], "test", &config.nodes[1]),
            "/run/test/b"
        );
        assert_eq!(
            expand("{address}:80", "test", &config.nodes[0]),
            "192.0.2.11:80"
        );
    }

    #[test]
    fn backoff_doubles_up_to_the_maximum() {
        let restart = RestartConfig {
            initial: Duration::from_millis(100),
            max: Duration::from_millis(700),
            attempts: 10,
            stable_after: Duration::from_secs(1),
        };
        let waits: Vec<u128> = (1..=6).map(|n| restart.backoff(n).as_millis()).collect();
        assert_eq!(waits, [100, 200, 400, 700, 700, 700]);
        assert_eq!(restart.backoff(1000), Duration::from_millis(700));
    }

    #[test]
    fn unknown_signal_lists_the_choices() {
        assert_problem(
            r#"
[[supervise]]
name = "x"
roles = ["web"]
command = "/bin/true"
stop_signal = "SIGFOO"
"#,
            "supervise[0].stop_signal",
            "expected one of SIGTERM",
        );
    }

    #[test]
    fn unknown_key_is_refused_with_its_path() {
        assert_problem(
            r#"
[[supervise]]
name = "x"
roles = ["web"]
command = "/bin/true"
restart = { tries = 3 }
"#,
            "supervise[0].restart.tries",
            "unknown field `tries`",
        );
    }

    #[test]
    fn entry_without_place_or_absolute_command_is_refused() {
        let text = r#"
[[supervise]]
name = "x y"
command = "apache2"
working_dir = "relative"
runtime_dir = "run"
env = { ROOT = "{volume}" }
"#;
        assert_problem(text, "supervise[0].name", "letters, digits");
        assert_problem(text, "supervise[0].nodes", "nodes or roles");
        assert_problem(text, "supervise[0].command", "absolute path");
        assert_problem(text, "supervise[0].working_dir", "absolute path");
        assert_problem(text, "supervise[0].runtime_dir", "absolute path");
        assert_problem(
            text,
            "supervise[0].env",
            "{volume} is only known with volume",
        );
    }

    #[test]
    fn duplicate_names_and_unknown_nodes_are_refused() {
        let text = r#"
[[supervise]]
name = "x"
nodes = ["a", "zz"]
command = "/bin/true"

[[supervise]]
name = "x"
nodes = ["a"]
command = "/bin/true"
"#;
        assert_problem(text, "supervise[0].nodes[1]", "\"zz\"");
        assert_problem(text, "supervise[1].name", "already the name");
    }

    #[test]
    fn service_must_exist_and_have_the_node_as_backend() {
        assert_problem(
            r#"
[[supervise]]
name = "x"
roles = ["web"]
command = "/bin/true"
service = "nope"
"#,
            "supervise[0].service",
            "no [[service]] is named \"nope\"",
        );
        assert_problem(
            r#"
[[supervise]]
name = "x"
nodes = ["c"]
command = "/bin/true"
service = "web"
"#,
            "supervise[0].service",
            "c runs this child but is no backend",
        );
    }

    #[test]
    fn volume_needs_a_fallback_for_nodes_without_a_replica() {
        let text = r#"
[[volume]]
name = "www"
mount = "/srv/www"
replicas = [{ node = "a", brick = "/var/lib/farol/www" }]

[[supervise]]
name = "x"
roles = ["web"]
command = "/bin/true"
volume = "www"
"#;
        // (It also lacks a cluster secret; only the supervise problem matters here.)
        let problems = problems(text);
        assert!(
            problems
                .iter()
                .any(|p| p.starts_with("supervise[0].volume_fallback: ")
                    && p.contains("no replica of \"www\"")),
            "{problems:#?}"
        );
        assert_problem(
            r#"
[[supervise]]
name = "x"
roles = ["web"]
command = "/bin/true"
volume = "nope"
volume_fallback = "/var/www"
"#,
            "supervise[0].volume",
            "no [[volume]] is named \"nope\"",
        );
        assert_problem(
            r#"
[[supervise]]
name = "x"
roles = ["web"]
command = "/bin/true"
volume_fallback = "/var/www"
"#,
            "supervise[0].volume_fallback",
            "only used with volume",
        );
    }

    #[test]
    fn bad_ready_restart_stop_and_reload_settings_are_refused() {
        let text = r#"
[[supervise]]
name = "x"
roles = ["web"]
command = "/bin/true"
ready = { port = 0, http = "index.html", timeout = "1s", interval = "2s" }
restart = { initial = "0s", attempts = 0 }
stop_signal = "KILL"
stop_grace = "0s"
reload_signal = "SIGKILL"
config_test = ["apache2ctl", "-t"]
"#;
        assert_problem(text, "supervise[0].ready.port", "port 0");
        assert_problem(text, "supervise[0].ready.http", "starting with '/'");
        assert_problem(text, "supervise[0].ready.interval", "at most ready.timeout");
        assert_problem(text, "supervise[0].restart.initial", "more than 0");
        assert_problem(text, "supervise[0].restart.attempts", "at least 1");
        assert_problem(text, "supervise[0].stop_signal", "SIGKILL");
        assert_problem(text, "supervise[0].stop_grace", "more than 0");
        assert_problem(text, "supervise[0].reload_signal", "cannot reload");
        assert_problem(text, "supervise[0].config_test", "absolute program path");
    }

    #[test]
    fn config_test_without_reload_signal_is_refused() {
        assert_problem(
            r#"
[[supervise]]
name = "x"
roles = ["web"]
command = "/bin/true"
config_test = ["/usr/sbin/apache2ctl", "-t"]
"#,
            "supervise[0].config_test",
            "set reload_signal",
        );
    }
}
