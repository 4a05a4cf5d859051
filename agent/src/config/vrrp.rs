//! `[[vrrp]]` sections: virtual routers (keepalived's `vrrp_instance`).
//! Each one carries VIPs between the nodes it names, by VRRPv3 (RFC 5798).
//!
//! ```toml
//! [[vrrp]]
//! name = "web"
//! vrid = 51
//! priority = { nuster1 = 150, nuster2 = 100 }
//! advert_interval = "10ms"
//! vips = ["192.0.2.100"]
//! ```

use std::{
    collections::{BTreeMap, HashSet},
    net::{IpAddr, Ipv4Addr},
    path::PathBuf,
    time::Duration,
};

use serde::Deserialize;

use super::{check_interface_name, is_identifier, NodeConfig, Problem};

/// RFC 5798's default advertisement interval.
pub const DEFAULT_ADVERT_INTERVAL: Duration = Duration::from_secs(1);
/// The 12-bit centisecond field's range (RFC 5798 §5.2.7).
pub const MIN_ADVERT_INTERVAL: Duration = Duration::from_millis(10);
pub const MAX_ADVERT_INTERVAL: Duration = Duration::from_millis(40_950);
/// keepalived's defaults: 5 gratuitous ARPs on becoming master, 5 more 5 s
/// later (`garp_master_repeat`, `garp_master_delay`).
pub const DEFAULT_GARP_COUNT: u32 = 5;
pub const DEFAULT_GARP_REPEAT_AFTER: Duration = Duration::from_secs(5);
const MAX_GARP_COUNT: u32 = 100;

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VrrpConfig {
    /// Names the instance in logs, metrics and notify commands.
    pub name: String,
    /// The Virtual Router ID, 1..=255, unique per LAN.
    pub vrid: u8,
    /// Overrides each node's `interface`.
    pub interface: Option<String>,
    /// The nodes that take part and their priority: 1..=254, or 255 for
    /// the address owner (master at once).
    pub priority: BTreeMap<String, u8>,
    /// Whole centiseconds, 10ms to 40.95s.
    #[serde(default = "default_advert_interval", with = "humantime_serde")]
    pub advert_interval: Duration,
    /// A higher-priority backup takes over from a lower master.
    #[serde(default = "default_true")]
    pub preempt: bool,
    /// How long a lower-priority master is tolerated before preempting.
    #[serde(default, with = "humantime_serde")]
    pub preempt_delay: Duration,
    /// The addresses the master holds (IPv4; at most 255).
    pub vips: Vec<IpAddr>,
    /// Adverts go to these addresses instead of 224.0.0.18, and only
    /// adverts from them are accepted. Empty: multicast.
    #[serde(default)]
    pub unicast_peers: Vec<Ipv4Addr>,
    /// Gratuitous ARPs per VIP on becoming master.
    #[serde(default = "default_garp_count")]
    pub garp_count: u32,
    /// Pause between those ARPs.
    #[serde(default, with = "humantime_serde")]
    pub garp_interval: Duration,
    /// A second burst this long after becoming master ("0s": none), for
    /// switches that missed the first.
    #[serde(default = "default_garp_repeat_after", with = "humantime_serde")]
    pub garp_repeat_after: Duration,
    /// Conditions that lower the priority while they fail.
    #[serde(default)]
    pub track: Vec<TrackConfig>,
    /// Run (`sh -c`) on becoming master / backup / on every change, with
    /// keepalived's arguments appended to `notify`: "INSTANCE" NAME STATE
    /// PRIORITY. Never on the failover path: started after the change.
    pub notify_master: Option<String>,
    pub notify_backup: Option<String>,
    pub notify: Option<String>,
}

/// One tracked condition; while it fails the priority moves by `weight`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TrackConfig {
    /// Fails while this interface is down (no carrier).
    pub interface: Option<String>,
    /// Fails while this command (`sh -c`) exits non-zero or times out.
    pub command: Option<String>,
    /// Fails while this `[[service]]` has no backend that can take a new
    /// flow on this node (health checks, drains and reachability decide).
    pub service: Option<String>,
    /// How often the command runs (interfaces are polled every 100 ms).
    #[serde(default = "default_track_every", with = "humantime_serde")]
    pub every: Duration,
    /// Added to the priority while failing, -254..=-1 (keepalived's
    /// negative weights).
    pub weight: i16,
    /// For tests and scripts that need a working directory.
    pub directory: Option<PathBuf>,
}

fn default_advert_interval() -> Duration {
    DEFAULT_ADVERT_INTERVAL
}

fn default_true() -> bool {
    true
}

fn default_garp_count() -> u32 {
    DEFAULT_GARP_COUNT
}

fn default_garp_repeat_after() -> Duration {
    DEFAULT_GARP_REPEAT_AFTER
}

fn default_track_every() -> Duration {
    Duration::from_secs(1)
}

impl VrrpConfig {
    /// The VIPs as IPv4 addresses (validation rejects the others).
    pub fn vips_v4(&self) -> Vec<Ipv4Addr> {
        self.vips
            .iter()
            .filter_map(|vip| match vip {
                IpAddr::V4(v4) => Some(*v4),
                IpAddr::V6(_) => None,
            })
            .collect()
    }

    /// The interface on `node`.
    pub fn interface_on<'a>(&'a self, node: &'a NodeConfig) -> &'a str {
        self.interface.as_deref().unwrap_or(&node.interface)
    }
}

/// The rules `agent check-config` applies to `[[vrrp]]`.
pub(super) fn validate(
    instances: &[VrrpConfig],
    nodes: &[NodeConfig],
    services: &[super::ServiceConfig],
    problems: &mut Vec<Problem>,
) {
    let mut problem = |key: String, message: String| problems.push(Problem { key, message });
    let mut names = HashSet::new();
    let mut vrids = HashSet::new();
    let mut all_vips = HashSet::new();
    for (index, instance) in instances.iter().enumerate() {
        let at = |key: &str| format!("vrrp[{index}].{key}");
        if !is_identifier(&instance.name) {
            problem(
                at("name"),
                format!(
                    "expected letters, digits, '-' or '_' (1 to 63 characters), got {:?}",
                    instance.name
                ),
            );
        } else if !names.insert(instance.name.as_str()) {
            problem(
                at("name"),
                format!(
                    "{:?} is already the name of another instance",
                    instance.name
                ),
            );
        }
        if instance.vrid == 0 {
            problem(at("vrid"), "expected 1..=255, got 0".into());
        } else if !vrids.insert(instance.vrid) {
            problem(
                at("vrid"),
                format!("{} is already the vrid of another instance", instance.vrid),
            );
        }
        if let Some(interface) = &instance.interface {
            if let Err(why) = check_interface_name(interface) {
                problem(at("interface"), why);
            }
        }
        if instance.priority.is_empty() {
            problem(
                at("priority"),
                "expected at least one node, e.g. { nuster1 = 150, nuster2 = 100 }".into(),
            );
        }
        for (name, &priority) in &instance.priority {
            let key = at(&format!("priority.{name}"));
            if !nodes.iter().any(|node| &node.name == name) {
                problem(key.clone(), format!("no [[node]] is named {name:?}"));
            }
            if priority == 0 {
                problem(
                    key,
                    "expected 1..=254 (255 for the address owner), got 0 (0 is what a stopping master sends)".into(),
                );
            }
        }
        let interval = instance.advert_interval;
        if interval < MIN_ADVERT_INTERVAL
            || interval > MAX_ADVERT_INTERVAL
            || interval.as_nanos() % MIN_ADVERT_INTERVAL.as_nanos() != 0
        {
            problem(
                at("advert_interval"),
                format!("expected whole centiseconds from 10ms to 40.95s, got {interval:?}"),
            );
        }
        if instance.vips.is_empty() {
            problem(at("vips"), "expected at least one address".into());
        }
        if instance.vips.len() > 255 {
            problem(
                at("vips"),
                format!(
                    "at most 255 addresses fit an advert, got {}",
                    instance.vips.len()
                ),
            );
        }
        for (v, vip) in instance.vips.iter().enumerate() {
            let key = format!("vrrp[{index}].vips[{v}]");
            match vip {
                IpAddr::V6(_) => problem(
                    key,
                    format!("{vip}: only IPv4 virtual routers are supported in this version"),
                ),
                IpAddr::V4(v4) => {
                    if v4.is_unspecified()
                        || v4.is_multicast()
                        || v4.is_loopback()
                        || v4.is_broadcast()
                    {
                        problem(key, format!("expected a unicast address, got {vip}"));
                    } else if nodes.iter().any(|node| node.address.addr() == *vip) {
                        problem(key, format!("{vip} is a node's own address"));
                    } else if !nodes.iter().any(|node| node.address.contains(vip)) {
                        problem(
                            key,
                            format!("{vip} is in no node's subnet: VRRP moves it on one LAN"),
                        );
                    } else if !all_vips.insert(*vip) {
                        problem(key, format!("{vip} is already carried by another instance"));
                    }
                }
            }
        }
        for (p, peer) in instance.unicast_peers.iter().enumerate() {
            if peer.is_unspecified()
                || peer.is_multicast()
                || peer.is_loopback()
                || peer.is_broadcast()
            {
                problem(
                    format!("vrrp[{index}].unicast_peers[{p}]"),
                    format!("expected a unicast address, got {peer}"),
                );
            }
        }
        if instance.garp_count == 0 || instance.garp_count > MAX_GARP_COUNT {
            problem(
                at("garp_count"),
                format!("expected 1..={MAX_GARP_COUNT}, got {}", instance.garp_count),
            );
        }
        if instance.garp_interval > Duration::from_secs(1) {
            problem(at("garp_interval"), "expected at most 1s".into());
        }
        for (t, track) in instance.track.iter().enumerate() {
            let at = |key: &str| format!("vrrp[{index}].track[{t}].{key}");
            match (&track.interface, &track.command, &track.service) {
                (Some(interface), None, None) => {
                    if let Err(why) = check_interface_name(interface) {
                        problem(at("interface"), why);
                    }
                }
                (None, Some(command), None) => {
                    if command.trim().is_empty() {
                        problem(
                            at("command"),
                            "expected a command, got an empty string".into(),
                        );
                    }
                }
                (None, None, Some(service)) => {
                    if !services.iter().any(|s| &s.name == service) {
                        problem(
                            at("service"),
                            format!("expected the name of a [[service]], got {service:?}"),
                        );
                    }
                }
                _ => problem(
                    at("interface"),
                    "expected interface = \"NAME\", command = \"...\" or service = \"NAME\", one of them"
                        .into(),
                ),
            }
            if !(-254..=-1).contains(&track.weight) {
                problem(
                    at("weight"),
                    format!(
                        "expected -254..=-1 (the priority drops while failing), got {}",
                        track.weight
                    ),
                );
            }
            if track.every < Duration::from_millis(10) {
                problem(at("every"), "expected at least 10ms".into());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::config::{Config, ConfigError};

    const BASE: &str = r#"
[cluster]
name = "test"

[[node]]
name = "a"
address = "192.0.2.11/24"
interface = "eth0"
roles = ["balancer", "web"]

[[node]]
name = "b"
address = "192.0.2.12/24"
interface = "eth0"
roles = ["balancer", "web"]
"#;

    fn load(extra: &str) -> Result<Config, ConfigError> {
        Config::from_toml(Path::new("test.toml"), &format!("{BASE}{extra}"))
    }

    fn problems(extra: &str) -> Vec<String> {
        match load(extra) {
            Ok(_) => panic!("expected an invalid config"),
            Err(error) => error.problems().iter().map(ToString::to_string).collect(),
        }
    }

    fn assert_problem(extra: &str, key: &str, fragment: &str) {
        let problems = problems(extra);
        assert!(
            problems
                .iter()
                .any(|p| p.starts_with(&format!("{key}: ")) && p.contains(fragment)),
            "expected a problem at {key} mentioning {fragment:?}, got {problems:#?}"
        );
    }

    #[test]
    fn a_minimal_instance_gets_keepalived_like_defaults() {
        let config = load(
            r#"
[[vrrp]]
name = "web"
vrid = 51
priority = { a = 150, b = 100 }
vips = ["192.0.2.100"]
"#,
        )
        .unwrap();
        let vrrp = &config.vrrp[0];
        assert_eq!(vrrp.advert_interval, super::DEFAULT_ADVERT_INTERVAL);
        assert!(vrrp.preempt);
        assert_eq!(vrrp.preempt_delay, std::time::Duration::ZERO);
        assert!(vrrp.unicast_peers.is_empty());
        assert_eq!(vrrp.garp_count, 5);
        assert_eq!(vrrp.priority["a"], 150);
        assert_eq!(vrrp.interface_on(&config.nodes[1]), "eth0");
    }

    #[test]
    fn every_option_parses() {
        let config = load(
            r#"
[[vrrp]]
name = "web"
vrid = 51
interface = "eth1"
priority = { a = 255, b = 1 }
advert_interval = "10ms"
preempt = false
preempt_delay = "5s"
vips = ["192.0.2.100", "192.0.2.101"]
unicast_peers = ["192.0.2.12", "192.0.2.20"]
garp_count = 3
garp_interval = "10ms"
garp_repeat_after = "0s"
track = [
    { interface = "eth0", weight = -60 },
    { command = "test -e /tmp/ok", every = "200ms", weight = -20 },
]
notify_master = "logger master"
notify_backup = "logger backup"
notify = "/usr/local/bin/notify"
"#,
        )
        .unwrap();
        assert_eq!(config.vrrp[0].track.len(), 2);
        assert_eq!(config.vrrp[0].vips_v4().len(), 2);
    }

    #[test]
    fn unknown_keys_are_rejected_with_their_path() {
        assert_problem(
            r#"
[[vrrp]]
name = "web"
vrid = 51
priority = { a = 150 }
vips = ["192.0.2.100"]
advert_int = 1
"#,
            "vrrp[0].advert_int",
            "unknown field",
        );
    }

    #[test]
    fn bad_values_are_each_reported_with_their_key() {
        let text = r#"
[[vrrp]]
name = "web"
vrid = 0
priority = { a = 0, zed = 100 }
advert_interval = "15ms"
vips = ["2001:db8::1", "198.51.100.1", "192.0.2.11"]
unicast_peers = ["224.0.0.18"]
garp_count = 0
track = [{ weight = 10 }]
"#;
        let problems = problems(text);
        for (key, fragment) in [
            ("vrrp[0].vrid", "1..=255"),
            ("vrrp[0].priority.a", "got 0"),
            ("vrrp[0].priority.zed", "no [[node]]"),
            ("vrrp[0].advert_interval", "whole centiseconds"),
            ("vrrp[0].vips[0]", "only IPv4"),
            ("vrrp[0].vips[1]", "no node's subnet"),
            ("vrrp[0].vips[2]", "node's own address"),
            ("vrrp[0].unicast_peers[0]", "unicast"),
            ("vrrp[0].garp_count", "1..="),
            ("vrrp[0].track[0].interface", "one of them"),
            ("vrrp[0].track[0].weight", "-254..=-1"),
        ] {
            assert!(
                problems
                    .iter()
                    .any(|p| p.starts_with(&format!("{key}: ")) && p.contains(fragment)),
                "expected {key} mentioning {fragment:?} in {problems:#?}"
            );
        }
    }

    #[test]
    fn a_service_track_names_a_service() {
        let instance = |service: &str| {
            format!(
                r#"
[[service]]
name = "web"
vip = "192.0.2.100"
port = 80
backends = [{{ node = "a" }}]

[[vrrp]]
name = "web"
vrid = 51
priority = {{ a = 150 }}
vips = ["192.0.2.100"]
track = [{{ service = "{service}", weight = -100 }}]
"#
            )
        };
        let config = load(&instance("web")).expect("a known service");
        assert_eq!(config.vrrp[0].track[0].service.as_deref(), Some("web"));
        assert_problem(&instance("www"), "vrrp[0].track[0].service", "[[service]]");
        assert_problem(
            &instance("web").replace(
                "service = \"web\", weight",
                "service = \"web\", command = \"true\", weight",
            ),
            "vrrp[0].track[0].interface",
            "one of them",
        );
    }

    #[test]
    fn intervals_outside_the_12_bit_field_are_rejected() {
        for interval in ["5ms", "41s"] {
            assert_problem(
                &format!(
                    r#"
[[vrrp]]
name = "web"
vrid = 51
priority = {{ a = 150 }}
advert_interval = "{interval}"
vips = ["192.0.2.100"]
"#
                ),
                "vrrp[0].advert_interval",
                "10ms to 40.95s",
            );
        }
    }

    #[test]
    fn vrids_names_and_vips_are_unique() {
        let text = r#"
[[vrrp]]
name = "web"
vrid = 51
priority = { a = 150 }
vips = ["192.0.2.100"]

[[vrrp]]
name = "web"
vrid = 51
priority = { b = 150 }
vips = ["192.0.2.100"]
"#;
        assert_problem(text, "vrrp[1].name", "already");
        assert_problem(text, "vrrp[1].vrid", "already");
        assert_problem(text, "vrrp[1].vips[0]", "another instance");
    }
}
