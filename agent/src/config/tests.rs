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

const WITH_SERVICE: &str = r#"
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
roles = ["web"]

[[service]]
name = "web"
vip = "192.0.2.100"
port = 80
backends = [{ node = "a" }, { node = "b", weight = 50 }]
"#;

#[test]
fn service_loads_with_defaults() {
    let config = load(WITH_SERVICE).expect("valid");
    let service = &config.services[0];
    assert_eq!(service.protocol, Protocol::Tcp);
    assert_eq!(service.scheduler, Scheduler::Maglev);
    assert_eq!(service.forwarding, Forwarding::Dsr);
    assert_eq!(service.backends[0].weight, DEFAULT_WEIGHT);
    assert_eq!(service.backends[1].weight, 50);
    assert_eq!(service.port, PortSpec::Single(80));
}

#[test]
fn service_port_range_loads() {
    let config = load(&WITH_SERVICE.replace("port = 80", "port = \"8000-8010\"")).unwrap();
    assert_eq!(config.services[0].port.ports().count(), 11);
}

#[test]
fn service_port_range_must_be_ordered_and_bounded() {
    assert_one_problem(
        &WITH_SERVICE.replace("port = 80", "port = \"9000-8000\""),
        "service[0].port",
        "first <= last",
    );
    assert_one_problem(
        &WITH_SERVICE.replace("port = 80", "port = \"1000-5000\""),
        "service[0].port",
        "at most",
    );
    let error = load(&WITH_SERVICE.replace("port = 80", "port = \"eighty\""))
        .unwrap_err()
        .to_string();
    assert!(error.contains("service[0].port"), "{error}");
}

#[test]
fn dsr_vip_outside_every_subnet_is_refused() {
    assert_one_problem(
        &WITH_SERVICE.replace("vip = \"192.0.2.100\"", "vip = \"198.51.100.100\""),
        "service[0].vip",
        "in no node's subnet",
    );
}

#[test]
fn vip_equal_to_a_node_address_is_refused() {
    assert_one_problem(
        &WITH_SERVICE.replace("vip = \"192.0.2.100\"", "vip = \"192.0.2.12\""),
        "service[0].vip",
        "node's own address",
    );
}

#[test]
fn duplicate_vip_port_protocol_is_refused() {
    let twice = format!(
        "{WITH_SERVICE}\n[[service]]\nname = \"web2\"\nvip = \"192.0.2.100\"\nport = 80\nbackends = [{{ node = \"a\" }}]\n"
    );
    assert_one_problem(
        &twice,
        "service[1].port",
        "already a port of another service",
    );
    assert_one_problem(
        &twice.replace("name = \"web2\"", "name = \"web\""),
        "service[1].name",
        "already the name",
    );
    // The same port over UDP is a different service.
    let udp = twice.replace(
        "name = \"web2\"\nvip = \"192.0.2.100\"\nport = 80",
        "name = \"web2\"\nvip = \"192.0.2.100\"\nport = 80\nprotocol = \"udp\"",
    );
    load(&udp).expect("tcp and udp on one port are two services");
}

#[test]
fn service_without_backends_is_refused() {
    assert_one_problem(
        &WITH_SERVICE.replace(
            "backends = [{ node = \"a\" }, { node = \"b\", weight = 50 }]",
            "backends = []",
        ),
        "service[0].backends",
        "at least one",
    );
}

#[test]
fn all_weights_zero_is_refused() {
    assert_one_problem(
        &WITH_SERVICE.replace(
            "{ node = \"a\" }, { node = \"b\", weight = 50 }",
            "{ node = \"a\", weight = 0 }, { node = \"b\", weight = 0 }",
        ),
        "service[0].backends",
        "every weight is 0",
    );
}

#[test]
fn weight_above_1000_is_refused() {
    assert_one_problem(
        &WITH_SERVICE.replace("weight = 50", "weight = 1001"),
        "service[0].backends[1].weight",
        "0..=1000",
    );
}

#[test]
fn backend_must_name_a_node_or_an_address() {
    assert_one_problem(
        &WITH_SERVICE.replace("{ node = \"a\" }", "{ weight = 1 }"),
        "service[0].backends[0].node",
        "expected node",
    );
    assert_one_problem(
        &WITH_SERVICE.replace(
            "{ node = \"a\" }",
            "{ node = \"a\", address = \"192.0.2.50\" }",
        ),
        "service[0].backends[0].node",
        "not both",
    );
    assert_one_problem(
        &WITH_SERVICE.replace("{ node = \"a\" }", "{ node = \"zz\" }"),
        "service[0].backends[0].node",
        "no [[node]]",
    );
}

#[test]
fn backend_node_needs_the_web_role() {
    assert_one_problem(
        &WITH_SERVICE.replace("roles = [\"web\"]", "roles = [\"database\"]"),
        "service[0].backends[1].node",
        "no \"web\" role",
    );
}

#[test]
fn dsr_backend_off_the_lan_is_refused() {
    assert_one_problem(
        &WITH_SERVICE.replace("{ node = \"a\" }", "{ address = \"198.51.100.7\" }"),
        "service[0].backends[0].address",
        "on the nodes' LAN",
    );
}

#[test]
fn dsr_backend_on_another_port_is_refused() {
    assert_one_problem(
        &WITH_SERVICE.replace("{ node = \"a\" }", "{ node = \"a\", port = 8080 }"),
        "service[0].backends[0].port",
        "DSR cannot change ports",
    );
}

#[test]
fn duplicate_backend_is_refused() {
    assert_one_problem(
        &WITH_SERVICE.replace(
            "{ node = \"b\", weight = 50 }",
            "{ address = \"192.0.2.11\" }",
        ),
        "service[0].backends[1].node",
        "listed twice",
    );
}

#[test]
fn nat_is_accepted_for_ipv4_and_refused_for_ipv6() {
    let nat = WITH_SERVICE.replace("port = 80", "port = 80\nforwarding = \"nat\"");
    let config = load(&nat).expect("NAT with an IPv4 VIP is valid");
    assert_eq!(config.services[0].forwarding, Forwarding::Nat);
    assert_one_problem(
        &nat.replace("vip = \"192.0.2.100\"", "vip = \"2001:db8::64\""),
        "service[0].forwarding",
        "IPv4 only",
    );
}

#[test]
fn bad_service_name_and_vip_are_refused() {
    assert_one_problem(
        &WITH_SERVICE.replace("name = \"web\"", "name = \"w eb\""),
        "service[0].name",
        "letters",
    );
    assert_one_problem(
        &WITH_SERVICE.replace("vip = \"192.0.2.100\"", "vip = \"224.0.0.18\""),
        "service[0].vip",
        "unicast",
    );
}

#[test]
fn unknown_scheduler_is_refused_with_the_choices() {
    let error = load(&WITH_SERVICE.replace("port = 80", "port = 80\nscheduler = \"random\""))
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("service[0].scheduler") && error.contains("leastconn"),
        "{error}"
    );
}

#[test]
fn too_many_services_are_refused() {
    let mut text = String::from(WITH_SERVICE);
    for i in 1..=16 {
        text.push_str(&format!(
            "\n[[service]]\nname = \"s{i}\"\nvip = \"192.0.2.100\"\nport = {}\nbackends = [{{ node = \"a\" }}]\n",
            1000 + i
        ));
    }
    assert_one_problem(&text, "service", "at most 16 services");
}
