use std::path::Path;

use super::*;

const VALID: &str = r#"
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
"#;

fn load(text: &str) -> Result<Config, ConfigError> {
    Config::from_toml(Path::new("test.toml"), text)
}

/// Loads `text`, expects it to fail, and returns "key: message" lines.
fn problems(text: &str) -> Vec<String> {
    match load(text) {
        Ok(config) => panic!("expected an invalid config, got {config:#?}"),
        Err(error) => error.problems().iter().map(Problem::to_string).collect(),
    }
}

fn assert_one_problem(text: &str, key: &str, fragment: &str) {
    let problems = problems(text);
    assert!(
        problems
            .iter()
            .any(|p| p.starts_with(&format!("{key}: ")) && p.contains(fragment)),
        "expected a problem at {key} mentioning {fragment:?}, got {problems:#?}"
    );
}

#[test]
fn valid_config_loads_with_defaults() {
    let config = load(VALID).expect("valid config");
    assert_eq!(config.nodes.len(), 2);
    assert_eq!(config.cluster.pin_dir, PathBuf::from(DEFAULT_PIN_DIR));
    assert_eq!(config.cluster.metrics_listen.port(), 9477);
    assert_eq!(config.cluster.xdp_mode, XdpMode::Auto);
    assert_eq!(config.nodes[0].roles, vec![Role::Balancer, Role::Web]);
    let node = config.node(Path::new("t"), "b").unwrap();
    assert_eq!(config.pin_dir(node), PathBuf::from(DEFAULT_PIN_DIR));
}

#[test]
fn shipped_configs_parse_and_validate() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).expect("configs/ exists") {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|ext| ext == "toml") {
            Config::load(&path).unwrap_or_else(|error| panic!("{error}"));
            seen += 1;
        }
    }
    assert!(seen >= 2, "expected nuster.toml and lab.toml in {dir:?}");
}

#[test]
fn lab_config_gives_every_node_its_own_pin_dir() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/lab.toml");
    let config = Config::load(&path).unwrap();
    let dirs: HashSet<PathBuf> = config.nodes.iter().map(|n| config.pin_dir(n)).collect();
    assert_eq!(dirs.len(), config.nodes.len());
}

#[test]
fn missing_file_names_the_file() {
    let error = Config::load(Path::new("/nonexistent/farol.toml")).unwrap_err();
    assert!(error
        .to_string()
        .starts_with("/nonexistent/farol.toml: cannot read"));
}

#[test]
fn syntax_error_names_file_and_line() {
    let error = load("[cluster\nname = 1").unwrap_err();
    let text = error.to_string();
    assert!(text.starts_with("test.toml: "), "{text}");
    assert!(text.contains("line 1"), "{text}");
}

#[test]
fn unknown_key_is_refused_with_its_path() {
    let text = VALID.replace("interface = \"eth0\"\nroles", "interfase = \"eth0\"\nroles");
    let error = load(&text).unwrap_err().to_string();
    assert!(error.contains("node[0]"), "{error}");
    assert!(error.contains("interfase"), "{error}");
}

#[test]
fn wrong_type_is_refused_with_its_path() {
    let text = VALID.replace("address = \"192.0.2.12/24\"", "address = 12");
    let error = load(&text).unwrap_err().to_string();
    assert!(error.contains("test.toml: node[1].address:"), "{error}");
}

#[test]
fn address_without_prefix_is_refused() {
    let text = VALID.replace("192.0.2.12/24", "192.0.2.12");
    let error = load(&text).unwrap_err().to_string();
    assert!(error.contains("node[1].address"), "{error}");
}

#[test]
fn unknown_role_is_refused_with_the_choices() {
    let text = VALID.replace("\"web\"]", "\"mail\"]");
    let error = load(&text).unwrap_err().to_string();
    assert!(error.contains("node[0].roles[1]"), "{error}");
    assert!(error.contains("balancer"), "{error}");
}

#[test]
fn missing_cluster_section_is_refused() {
    let error = load("[[node]]\nname = \"a\"\naddress = \"192.0.2.1/24\"\ninterface = \"eth0\"\n")
        .unwrap_err()
        .to_string();
    assert!(error.contains("cluster"), "{error}");
}

#[test]
fn bad_cluster_name_is_refused() {
    assert_one_problem(
        &VALID.replace("name = \"test\"", "name = \"my cluster\""),
        "cluster.name",
        "letters, digits",
    );
}

#[test]
fn relative_pin_dir_is_refused() {
    assert_one_problem(
        &VALID.replace("name = \"test\"", "name = \"test\"\npin_dir = \"bpf\""),
        "cluster.pin_dir",
        "absolute",
    );
}

#[test]
fn metrics_port_zero_is_refused() {
    assert_one_problem(
        &VALID.replace(
            "name = \"test\"",
            "name = \"test\"\nmetrics_listen = \"0.0.0.0:0\"",
        ),
        "cluster.metrics_listen",
        "port 0",
    );
}

#[test]
fn config_without_nodes_is_refused() {
    assert_one_problem("[cluster]\nname = \"x\"\n", "node", "at least one");
}

#[test]
fn bad_node_name_is_refused() {
    assert_one_problem(
        &VALID.replace("name = \"a\"", "name = \"\""),
        "node[0].name",
        "letters",
    );
}

#[test]
fn duplicate_node_name_is_refused() {
    assert_one_problem(
        &VALID.replace("name = \"b\"", "name = \"a\""),
        "node[1].name",
        "already",
    );
}

#[test]
fn duplicate_address_is_refused() {
    assert_one_problem(
        &VALID.replace("192.0.2.12/24", "192.0.2.11/24"),
        "node[1].address",
        "already",
    );
}

#[test]
fn non_unicast_address_is_refused() {
    for bad in ["0.0.0.0/0", "224.0.0.18/24", "127.0.0.1/8"] {
        assert_one_problem(
            &VALID.replace("192.0.2.12/24", bad),
            "node[1].address",
            "unicast",
        );
    }
}

#[test]
fn bad_interface_names_are_refused() {
    for bad in ["", "a-very-long-interface", "eth0:1", "eth 0", "a/b"] {
        assert_one_problem(
            &VALID.replacen("interface = \"eth0\"", &format!("interface = {bad:?}"), 1),
            "node[0].interface",
            "interface name",
        );
    }
}

#[test]
fn duplicate_role_is_refused() {
    assert_one_problem(
        &VALID.replace("[\"balancer\", \"web\"]", "[\"web\", \"web\"]"),
        "node[0].roles",
        "twice",
    );
}

#[test]
fn node_pin_dirs_must_be_absolute_and_distinct() {
    let text = VALID
        .replace(
            "roles = [\"balancer\", \"web\"]",
            "roles = [\"balancer\", \"web\"]\npin_dir = \"/sys/fs/bpf/x\"",
        )
        .replace(
            "address = \"192.0.2.12/24\"",
            "address = \"192.0.2.12/24\"\npin_dir = \"/sys/fs/bpf/x\"",
        );
    assert_one_problem(&text, "node[1].pin_dir", "already");
    assert_one_problem(
        &VALID.replace(
            "address = \"192.0.2.12/24\"",
            "address = \"192.0.2.12/24\"\npin_dir = \"x\"",
        ),
        "node[1].pin_dir",
        "absolute",
    );
}

#[test]
fn node_metrics_port_zero_is_refused() {
    assert_one_problem(
        &VALID.replace(
            "address = \"192.0.2.12/24\"",
            "address = \"192.0.2.12/24\"\nmetrics_listen = \"127.0.0.1:0\"",
        ),
        "node[1].metrics_listen",
        "port 0",
    );
}

#[test]
fn every_problem_is_reported_at_once() {
    let text = VALID
        .replace("name = \"test\"", "name = \"\"")
        .replace("192.0.2.12/24", "192.0.2.11/24")
        .replacen("interface = \"eth0\"", "interface = \"\"", 1);
    let problems = problems(&text);
    assert_eq!(problems.len(), 3, "{problems:#?}");
    let rendered = load(&text).unwrap_err().to_string();
    assert_eq!(rendered.lines().count(), 3, "{rendered}");
    assert!(rendered.lines().all(|line| line.starts_with("test.toml: ")));
}

#[test]
fn unknown_node_lists_the_known_ones() {
    let config = load(VALID).unwrap();
    let error = config
        .node(Path::new("c.toml"), "zz")
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("\"zz\"") && error.contains("a, b"),
        "{error}"
    );
}
