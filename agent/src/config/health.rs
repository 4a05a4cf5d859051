//! `[service.check]`: how a service's backends are health-checked (HAProxy's
//! `option httpchk`, `check inter 2s rise 2 fall 3`, `slowstart`,
//! `agent-check`). Without a check section a backend counts as up while its
//! address answers ARP, as before checks existed.
//!
//! ```toml
//! [[service]]
//! name = "web"
//! # ...
//! check = { type = "http", path = "/health", expect_status = "200-299", interval = "1s" }
//! ```

use std::time::Duration;

use serde::Deserialize;

use super::Problem;

/// HAProxy's `inter` default.
pub const DEFAULT_CHECK_INTERVAL: Duration = Duration::from_secs(2);
/// HAProxy's `rise` default: consecutive successes to come back up.
pub const DEFAULT_RISE: u32 = 2;
/// HAProxy's `fall` default: consecutive failures to go down.
pub const DEFAULT_FALL: u32 = 3;
/// Timeout when none is given: one second, or the interval if shorter.
pub const DEFAULT_CHECK_TIMEOUT: Duration = Duration::from_secs(1);
/// Below this a check loop would mostly measure the scheduler.
pub const MIN_CHECK_INTERVAL: Duration = Duration::from_millis(10);
const MAX_CHECK_INTERVAL: Duration = Duration::from_secs(3600);
const MAX_RISE_FALL: u32 = 100;
const METHODS: [&str; 5] = ["GET", "HEAD", "POST", "OPTIONS", "PUT"];

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum CheckKind {
    /// A TCP connect (the three-way handshake completes).
    Tcp,
    /// An HTTP/1.1 request; the status (and optionally the body) decides.
    Http,
    /// PostgreSQL startup, `SELECT 1` and `pg_is_in_recovery()`.
    Postgres,
}

/// Which PostgreSQL server counts as up.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum PgRole {
    /// Primary or standby: any server that answers `SELECT 1`.
    #[default]
    Any,
    /// Only a server not in recovery.
    Primary,
    /// Only a hot standby.
    Standby,
}

/// An inclusive range of HTTP status codes, written `"200-399"` or `"204"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusRange {
    pub first: u16,
    pub last: u16,
}

impl StatusRange {
    pub fn contains(self, status: u16) -> bool {
        (self.first..=self.last).contains(&status)
    }
}

impl std::fmt::Display for StatusRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}-{}", self.first, self.last)
        }
    }
}

impl<'de> Deserialize<'de> for StatusRange {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            One(u16),
            Text(String),
        }
        let parse = |part: &str| part.trim().parse::<u16>().ok();
        match Raw::deserialize(deserializer)? {
            Raw::One(code) => Ok(StatusRange {
                first: code,
                last: code,
            }),
            Raw::Text(text) => {
                let (first, last) = match text.split_once('-') {
                    Some((a, b)) => (parse(a), parse(b)),
                    None => (parse(&text), parse(&text)),
                };
                match (first, last) {
                    (Some(first), Some(last)) => Ok(StatusRange { first, last }),
                    _ => Err(serde::de::Error::custom(format!(
                        "expected a status or a range like \"200-399\", got {text:?}"
                    ))),
                }
            }
        }
    }
}

/// One service's health check; every backend of the service gets it.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HealthCheckConfig {
    #[serde(rename = "type")]
    pub kind: CheckKind,
    /// Time between checks of a backend in a steady state (HAProxy `inter`).
    #[serde(default = "default_interval", with = "humantime_serde")]
    pub interval: Duration,
    /// Between checks while a state is changing (some but not all of the
    /// `rise` or `fall` results seen); default: `interval`.
    #[serde(default, with = "humantime_serde")]
    pub fastinter: Option<Duration>,
    /// Between checks of a backend that is down; default: `interval`.
    #[serde(default, with = "humantime_serde")]
    pub downinter: Option<Duration>,
    /// How long one check may take; default 1 s or `interval` if shorter.
    #[serde(default, with = "humantime_serde")]
    pub timeout: Option<Duration>,
    /// Consecutive successes for a down backend to come up.
    #[serde(default = "default_rise")]
    pub rise: u32,
    /// Consecutive failures for an up backend to go down.
    #[serde(default = "default_fall")]
    pub fall: u32,
    /// After coming back up, the backend's weight ramps from a little to
    /// its full value over this time (HAProxy `slowstart`); default: none.
    #[serde(default, with = "humantime_serde")]
    pub slowstart: Option<Duration>,
    /// The port to check; default: the backend's port.
    pub port: Option<u16>,
    /// Also ask the backend node's agent for its admin state (drain,
    /// disable) at every check, as HAProxy's `agent-check` does, so a drain
    /// asked for on the backend reaches every balancer. Default: true.
    #[serde(default = "default_true")]
    pub agent: bool,
    /// `http`: the request method (default GET).
    pub method: Option<String>,
    /// `http`: the request path (default `/`).
    pub path: Option<String>,
    /// `http`: the Host header (default: the backend's address).
    pub host: Option<String>,
    /// `http`: statuses that pass (default `"200-399"`).
    pub expect_status: Option<StatusRange>,
    /// `http`: a string the body must contain.
    pub expect_body: Option<String>,
    /// `postgres`: the user to log in as (default `postgres`).
    pub user: Option<String>,
    /// `postgres`: the database (default: the user's name).
    pub database: Option<String>,
    /// `postgres`: the password, when the server asks for one.
    pub password: Option<String>,
    /// `postgres`: which role counts as up (default any).
    pub role: Option<PgRole>,
}

fn default_interval() -> Duration {
    DEFAULT_CHECK_INTERVAL
}
fn default_rise() -> u32 {
    DEFAULT_RISE
}
fn default_fall() -> u32 {
    DEFAULT_FALL
}
fn default_true() -> bool {
    true
}

impl HealthCheckConfig {
    /// A check of `kind` with every default.
    pub fn new(kind: CheckKind) -> HealthCheckConfig {
        HealthCheckConfig {
            kind,
            interval: DEFAULT_CHECK_INTERVAL,
            fastinter: None,
            downinter: None,
            timeout: None,
            rise: DEFAULT_RISE,
            fall: DEFAULT_FALL,
            slowstart: None,
            port: None,
            agent: true,
            method: None,
            path: None,
            host: None,
            expect_status: None,
            expect_body: None,
            user: None,
            database: None,
            password: None,
            role: None,
        }
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
            .unwrap_or(DEFAULT_CHECK_TIMEOUT.min(self.interval))
    }
    pub fn fastinter(&self) -> Duration {
        self.fastinter.unwrap_or(self.interval)
    }
    pub fn downinter(&self) -> Duration {
        self.downinter.unwrap_or(self.interval)
    }
    pub fn method(&self) -> &str {
        self.method.as_deref().unwrap_or("GET")
    }
    pub fn path(&self) -> &str {
        self.path.as_deref().unwrap_or("/")
    }
    pub fn expect_status(&self) -> StatusRange {
        self.expect_status.unwrap_or(StatusRange {
            first: 200,
            last: 399,
        })
    }
    pub fn user(&self) -> &str {
        self.user.as_deref().unwrap_or("postgres")
    }
    pub fn database(&self) -> &str {
        self.database.as_deref().unwrap_or(self.user())
    }
    pub fn role(&self) -> PgRole {
        self.role.unwrap_or_default()
    }
}

fn has_control_or_space(text: &str) -> bool {
    text.chars().any(|c| c.is_control() || c == ' ')
}

/// The rules for one service's `check`; `at` is e.g. `service[0].check`.
pub(super) fn validate(
    check: &HealthCheckConfig,
    at: &str,
    udp_service: bool,
    problems: &mut Vec<Problem>,
) {
    let mut problem = |key: &str, message: String| {
        problems.push(Problem {
            key: format!("{at}.{key}"),
            message,
        })
    };
    let duration_ok = |d: Duration| (MIN_CHECK_INTERVAL..=MAX_CHECK_INTERVAL).contains(&d);
    for (key, value) in [
        ("interval", Some(check.interval)),
        ("fastinter", check.fastinter),
        ("downinter", check.downinter),
    ] {
        if let Some(value) = value.filter(|&v| !duration_ok(v)) {
            problem(
                key,
                format!(
                    "expected {} to {}, got {}",
                    humantime::format_duration(MIN_CHECK_INTERVAL),
                    humantime::format_duration(MAX_CHECK_INTERVAL),
                    humantime::format_duration(value)
                ),
            );
        }
    }
    if let Some(timeout) = check.timeout {
        if timeout.is_zero() || timeout > check.interval {
            problem(
                "timeout",
                format!(
                    "expected more than 0 and at most the interval ({}), got {}",
                    humantime::format_duration(check.interval),
                    humantime::format_duration(timeout)
                ),
            );
        }
    }
    for (key, value) in [("rise", check.rise), ("fall", check.fall)] {
        if !(1..=MAX_RISE_FALL).contains(&value) {
            problem(key, format!("expected 1..={MAX_RISE_FALL}, got {value}"));
        }
    }
    if check.slowstart.is_some_and(|d| d > MAX_CHECK_INTERVAL) {
        problem(
            "slowstart",
            format!(
                "expected at most {}",
                humantime::format_duration(MAX_CHECK_INTERVAL)
            ),
        );
    }
    if check.port == Some(0) {
        problem("port", "expected 1..=65535, got 0".into());
    }
    if udp_service && check.port.is_none() && check.kind != CheckKind::Postgres {
        problem(
            "port",
            format!(
                "a {:?} check cannot probe a UDP service's port: give the TCP port to check",
                check.kind
            )
            .to_lowercase(),
        );
    }
    let http_only = [
        ("method", check.method.is_some()),
        ("path", check.path.is_some()),
        ("host", check.host.is_some()),
        ("expect_status", check.expect_status.is_some()),
        ("expect_body", check.expect_body.is_some()),
    ];
    let postgres_only = [
        ("user", check.user.is_some()),
        ("database", check.database.is_some()),
        ("password", check.password.is_some()),
        ("role", check.role.is_some()),
    ];
    let kind = format!("{:?}", check.kind).to_lowercase();
    if check.kind != CheckKind::Http {
        for (key, _) in http_only.iter().filter(|(_, set)| *set) {
            problem(key, format!("only for type = \"http\", not \"{kind}\""));
        }
    }
    if check.kind != CheckKind::Postgres {
        for (key, _) in postgres_only.iter().filter(|(_, set)| *set) {
            problem(key, format!("only for type = \"postgres\", not \"{kind}\""));
        }
    }
    if let Some(method) = &check.method {
        if !METHODS.contains(&method.as_str()) {
            problem(
                "method",
                format!("expected one of {}, got {method:?}", METHODS.join(", ")),
            );
        }
    }
    if let Some(path) = &check.path {
        if !path.starts_with('/') || has_control_or_space(path) {
            problem(
                "path",
                format!("expected a path starting with '/' without spaces or control characters, got {path:?}"),
            );
        }
    }
    if let Some(host) = &check.host {
        if host.is_empty() || has_control_or_space(host) {
            problem(
                "host",
                format!("expected a host name without spaces or control characters, got {host:?}"),
            );
        }
    }
    if let Some(range) = check.expect_status {
        if range.first < 100 || range.last > 599 || range.first > range.last {
            problem(
                "expect_status",
                format!("expected statuses within 100-599, first <= last, got {range}"),
            );
        }
    }
    if check.expect_body.as_ref().is_some_and(|b| b.is_empty()) {
        problem(
            "expect_body",
            "expected a non-empty string (leave it out to ignore the body)".into(),
        );
    }
    for (key, value) in [
        ("user", &check.user),
        ("database", &check.database),
        ("password", &check.password),
    ] {
        if value
            .as_ref()
            .is_some_and(|v| v.is_empty() || v.contains('\0'))
        {
            problem(key, "expected a non-empty string without NUL".into());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> HealthCheckConfig {
        toml::from_str(text).unwrap()
    }

    fn problems_of(check: &HealthCheckConfig, udp: bool) -> Vec<String> {
        let mut problems = Vec::new();
        validate(check, "service[0].check", udp, &mut problems);
        problems.iter().map(Problem::to_string).collect()
    }

    #[test]
    fn defaults_are_haproxys() {
        let check = parse("type = \"tcp\"");
        assert_eq!(check.interval, Duration::from_secs(2));
        assert_eq!((check.rise, check.fall), (2, 3));
        assert_eq!(check.timeout(), Duration::from_secs(1));
        assert_eq!(check.fastinter(), check.interval);
        assert_eq!(check.downinter(), check.interval);
        assert!(check.agent);
        assert!(check.slowstart.is_none());
        assert!(problems_of(&check, false).is_empty());
    }

    #[test]
    fn short_interval_caps_the_default_timeout() {
        let check = parse("type = \"http\"\ninterval = \"100ms\"");
        assert_eq!(check.timeout(), Duration::from_millis(100));
        assert_eq!(check.expect_status().to_string(), "200-399");
        assert_eq!((check.method(), check.path()), ("GET", "/"));
    }

    #[test]
    fn http_keys_parse() {
        let check = parse(
            r#"type = "http"
method = "HEAD"
path = "/health?full=1"
host = "www.example"
expect_status = "200-299"
expect_body = "ok"
fastinter = "500ms"
downinter = "5s"
slowstart = "30s"
"#,
        );
        assert_eq!(
            check.expect_status(),
            StatusRange {
                first: 200,
                last: 299
            }
        );
        assert_eq!(check.fastinter(), Duration::from_millis(500));
        assert_eq!(check.downinter(), Duration::from_secs(5));
        assert!(problems_of(&check, false).is_empty());
        let single = parse("type = \"http\"\nexpect_status = 204");
        assert_eq!(
            single.expect_status(),
            StatusRange {
                first: 204,
                last: 204
            }
        );
    }

    #[test]
    fn unknown_keys_and_bad_ranges_are_refused_at_parse() {
        assert!(toml::from_str::<HealthCheckConfig>("type = \"tcp\"\nintreval = \"1s\"").is_err());
        assert!(toml::from_str::<HealthCheckConfig>("type = \"ping\"").is_err());
        assert!(
            toml::from_str::<HealthCheckConfig>("type = \"http\"\nexpect_status = \"2xx\"")
                .is_err()
        );
        assert!(toml::from_str::<HealthCheckConfig>("type = \"tcp\"\ninterval = 2").is_err());
    }

    #[test]
    fn every_problem_is_reported_with_its_key() {
        let check = parse(
            r#"type = "tcp"
interval = "1ms"
timeout = "5s"
rise = 0
fall = 1000
port = 0
path = "/x"
user = "u"
"#,
        );
        let problems = problems_of(&check, false);
        for key in [
            "interval", "timeout", "rise", "fall", "port", "path", "user",
        ] {
            assert!(
                problems
                    .iter()
                    .any(|p| p.starts_with(&format!("service[0].check.{key}: "))),
                "no problem at {key}: {problems:#?}"
            );
        }
    }

    #[test]
    fn http_values_are_checked() {
        let check = parse(
            r#"type = "http"
method = "BREW"
path = "no-slash"
host = "a b"
expect_status = "600-700"
expect_body = ""
"#,
        );
        let problems = problems_of(&check, false);
        assert_eq!(problems.len(), 5, "{problems:#?}");
        let injected = parse("type = \"http\"\npath = \"/\\r\\nX-Evil: 1\"");
        assert_eq!(problems_of(&injected, false).len(), 1);
    }

    #[test]
    fn udp_services_need_a_tcp_port_to_check() {
        let check = parse("type = \"tcp\"");
        let problems = problems_of(&check, true);
        assert!(
            problems[0].starts_with("service[0].check.port: "),
            "{problems:?}"
        );
        let with_port = parse("type = \"tcp\"\nport = 8080");
        assert!(problems_of(&with_port, true).is_empty());
    }

    #[test]
    fn postgres_keys_parse() {
        let check = parse("type = \"postgres\"\nuser = \"farol\"\nrole = \"primary\"");
        assert_eq!(check.database(), "farol");
        assert_eq!(check.role(), PgRole::Primary);
        assert!(problems_of(&check, false).is_empty());
    }
}
