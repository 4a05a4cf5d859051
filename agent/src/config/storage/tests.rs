//! One test per `[[volume]]` validation rule.

use std::path::Path;

use super::super::{Config, ConfigError, Problem};
use super::*;

const BASE: &str = r#"
[cluster]
name = "test"
secret_file = "/etc/farol/secret"

[[node]]
name = "a"
address = "192.0.2.11/24"
interface = "eth0"

[[node]]
name = "b"
address = "192.0.2.12/24"
interface = "eth0"

[[node]]
name = "c"
address = "192.0.2.13/24"
interface = "eth0"
"#;

const VOLUME: &str = r#"
[[volume]]
name = "www"
mount = "/srv/www"
replicas = [
    { node = "a", brick = "/var/lib/farol/www" },
    { node = "b", brick = "/var/lib/farol/www" },
    { node = "c", brick = "/var/lib/farol/www" },
]
"#;

fn load(text: &str) -> Result<Config, ConfigError> {
    Config::from_toml(Path::new("test.toml"), text)
}

fn valid() -> String {
    format!("{BASE}{VOLUME}")
}

fn assert_problem(text: &str, key: &str, fragment: &str) {
    let problems: Vec<String> = match load(text) {
        Ok(config) => panic!("expected an invalid config, got {config:#?}"),
        Err(error) => error.problems().iter().map(Problem::to_string).collect(),
    };
    assert!(
        problems
            .iter()
            .any(|p| p.starts_with(&format!("{key}: ")) && p.contains(fragment)),
        "expected a problem at {key} mentioning {fragment:?}, got {problems:#?}"
    );
}

#[test]
fn a_volume_loads_with_defaults() {
    let config = load(&valid()).unwrap();
    let volume = &config.volumes[0];
    assert_eq!(volume.quorum(), 2);
    assert_eq!(volume.port, DEFAULT_VOLUME_PORT);
    assert_eq!(volume.split_brain, SplitBrainPolicy::LatestMtime);
    assert_eq!(volume.heal_rate_mib, DEFAULT_HEAL_RATE_MIB);
    assert_eq!(volume.peer_timeout, Duration::from_secs(2));
    assert_eq!(volume.attr_timeout, Duration::from_secs(1));
    assert_eq!(volume.entry_timeout, Duration::from_secs(1));
    assert_eq!(volume.negative_timeout, Duration::from_secs(1));
    let replica = volume.replica("b").unwrap();
    assert_eq!(
        volume.listen(replica, &config.nodes),
        Some("192.0.2.12:9478".parse().unwrap())
    );
    assert_eq!(volume.mount_point(replica), Some(PathBuf::from("/srv/www")));
}

#[test]
fn durations_are_strings() {
    let text = valid().replace("name = \"www\"", "name = \"www\"\npeer_timeout = \"750ms\"");
    assert_eq!(
        load(&text).unwrap().volumes[0].peer_timeout,
        Duration::from_millis(750)
    );
}

#[test]
fn unknown_volume_keys_are_refused() {
    let text = valid().replace("name = \"www\"", "name = \"www\"\nreplica_count = 3");
    assert_problem(&text, "volume[0].replica_count", "unknown field");
}

#[test]
fn a_volume_needs_a_cluster_secret() {
    let text = valid().replace("secret_file = \"/etc/farol/secret\"\n", "");
    assert_problem(&text, "cluster.secret_file", "needs cluster.secret");
}

#[test]
fn secret_and_secret_file_are_exclusive() {
    let text = valid().replace(
        "secret_file = \"/etc/farol/secret\"",
        "secret_file = \"/etc/farol/secret\"\nsecret = \"0123456789abcdef0123\"",
    );
    assert_problem(&text, "cluster.secret", "not both");
}

#[test]
fn a_short_secret_is_refused() {
    let text = valid().replace("secret_file = \"/etc/farol/secret\"", "secret = \"short\"");
    assert_problem(&text, "cluster.secret", "at least 16");
}

#[test]
fn volume_names_are_identifiers() {
    assert_problem(
        &valid().replace("\"www\"", "\"w w\""),
        "volume[0].name",
        "letters",
    );
}

#[test]
fn volume_names_are_unique() {
    assert_problem(
        &format!("{BASE}{VOLUME}{VOLUME}"),
        "volume[1].name",
        "already",
    );
}

#[test]
fn a_volume_needs_replicas() {
    let text = format!("{BASE}[[volume]]\nname = \"v\"\nmount = \"/srv/v\"\nreplicas = []\n");
    assert_problem(&text, "volume[0].replicas", "at least one");
}

#[test]
fn the_mount_is_absolute() {
    assert_problem(
        &valid().replace("/srv/www", "srv/www"),
        "volume[0].mount",
        "absolute",
    );
}

#[test]
fn the_port_is_fixed() {
    let text = valid().replace("name = \"www\"", "name = \"www\"\nport = 0");
    assert_problem(&text, "volume[0].port", "port 0");
}

#[test]
fn the_heal_rate_is_positive() {
    let text = valid().replace("name = \"www\"", "name = \"www\"\nheal_rate_mib = 0");
    assert_problem(&text, "volume[0].heal_rate_mib", "at least 1");
}

#[test]
fn the_peer_timeout_is_not_tiny() {
    let text = valid().replace("name = \"www\"", "name = \"www\"\npeer_timeout = \"10ms\"");
    assert_problem(&text, "volume[0].peer_timeout", "at least 100ms");
}

#[test]
fn kernel_cache_timeouts_load_and_are_bounded() {
    let text = valid().replace(
        "name = \"www\"",
        "name = \"www\"\nattr_timeout = \"0s\"\nentry_timeout = \"250ms\"",
    );
    let volume = &load(&text).unwrap().volumes[0];
    assert_eq!(volume.attr_timeout, Duration::ZERO);
    assert_eq!(volume.entry_timeout, Duration::from_millis(250));
    let text = valid().replace(
        "name = \"www\"",
        "name = \"www\"\nnegative_timeout = \"2m\"",
    );
    assert_problem(&text, "volume[0].negative_timeout", "at most 60s");
}

#[test]
fn the_quorum_fits_the_replica_set() {
    let text = valid().replace("name = \"www\"", "name = \"www\"\nquorum = 4");
    assert_problem(&text, "volume[0].quorum", "1 to 3");
    let text = valid().replace("name = \"www\"", "name = \"www\"\nquorum = 0");
    assert_problem(&text, "volume[0].quorum", "1 to 3");
}

#[test]
fn the_source_policy_needs_a_source() {
    let text = valid().replace("name = \"www\"", "name = \"www\"\nsplit_brain = \"source\"");
    assert_problem(&text, "volume[0].split_brain_source", "needs the node");
}

#[test]
fn the_source_holds_a_replica() {
    let text = valid().replace(
        "name = \"www\"",
        "name = \"www\"\nsplit_brain = \"source\"\nsplit_brain_source = \"z\"",
    );
    assert_problem(&text, "volume[0].split_brain_source", "holds no replica");
    let ok = valid().replace(
        "name = \"www\"",
        "name = \"www\"\nsplit_brain = \"source\"\nsplit_brain_source = \"b\"",
    );
    assert_eq!(
        load(&ok).unwrap().volumes[0].split_brain,
        SplitBrainPolicy::Source
    );
}

#[test]
fn a_source_without_the_source_policy_is_refused() {
    let text = valid().replace(
        "name = \"www\"",
        "name = \"www\"\nsplit_brain_source = \"a\"",
    );
    assert_problem(&text, "volume[0].split_brain_source", "only used with");
}

#[test]
fn a_replica_names_a_known_node() {
    assert_problem(
        &valid().replace("node = \"c\"", "node = \"zz\""),
        "volume[0].replicas[2].node",
        "no [[node]]",
    );
}

#[test]
fn a_node_holds_one_replica_per_volume() {
    assert_problem(
        &valid().replace("node = \"c\"", "node = \"b\""),
        "volume[0].replicas[2].node",
        "already holds",
    );
}

#[test]
fn bricks_are_absolute() {
    let text = valid().replacen("brick = \"/var/lib/farol/www\"", "brick = \"www\"", 1);
    assert_problem(&text, "volume[0].replicas[0].brick", "absolute");
}

#[test]
fn a_replica_mount_is_absolute_and_apart_from_its_brick() {
    let text = valid().replacen(
        "brick = \"/var/lib/farol/www\" }",
        "brick = \"/var/lib/farol/www\", mount = \"m\" }",
        1,
    );
    assert_problem(&text, "volume[0].replicas[0].mount", "absolute");
    let text = valid().replacen(
        "brick = \"/var/lib/farol/www\" }",
        "brick = \"/var/lib/farol/www\", mount = \"/var/lib/farol/www/m\" }",
        1,
    );
    assert_problem(&text, "volume[0].replicas[0].mount", "overlaps");
}

#[test]
fn replica_addresses_are_fixed_and_distinct() {
    let text = valid().replacen(
        "brick = \"/var/lib/farol/www\" }",
        "brick = \"/var/lib/farol/www\", listen = \"127.0.0.1:0\" }",
        1,
    );
    assert_problem(&text, "volume[0].replicas[0].listen", "port 0");
    let text = valid().replace(
        "brick = \"/var/lib/farol/www\" }",
        "brick = \"/var/lib/farol/www\", listen = \"127.0.0.1:7000\" }",
    );
    assert_problem(&text, "volume[0].replicas[1].listen", "already the address");
}

#[test]
fn every_replica_has_a_mount_point() {
    let text = valid().replace("mount = \"/srv/www\"\n", "");
    assert_problem(&text, "volume[0].replicas[0].mount", "no mount point");
}
