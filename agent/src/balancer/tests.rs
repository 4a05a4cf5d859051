use std::{net::IpAddr, path::Path};

use super::*;

fn config() -> Config {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/lab.toml");
    Config::load(&path).expect("lab config")
}

fn mac_of(addr: IpAddr) -> Option<[u8; 6]> {
    match addr {
        IpAddr::V4(v4) => Some([2, 0, 0, 0, 0, v4.octets()[3]]),
        IpAddr::V6(_) => None,
    }
}

#[test]
fn the_first_balancer_holds_the_vips_no_vrrp_instance_carries() {
    let mut config = config();
    config.vrrp.clear();
    assert_eq!(vip_owner(&config).unwrap().name, "nuster1");
    let nuster1 = config.node(Path::new("lab"), "nuster1").unwrap();
    let nuster2 = config.node(Path::new("lab"), "nuster2").unwrap();
    let owner = plan(&config, nuster1, [2; 6], &mut mac_of);
    let backup = plan(&config, nuster2, [2; 6], &mut mac_of);
    assert!(!owner.owned_vips.is_empty());
    assert!(backup.owned_vips.is_empty());
}

#[test]
fn plans_agree_across_nodes_except_for_local_and_ownership() {
    let config = config();
    let plans: Vec<LbPlan> = config
        .nodes
        .iter()
        .map(|node| plan(&config, node, [2; 6], &mut mac_of))
        .collect();
    for plan in &plans[1..] {
        for (a, b) in plan.services.iter().zip(&plans[0].services) {
            assert_eq!(a.seed, b.seed, "same Maglev seed everywhere");
            let keys = |s: &ServicePlan| {
                s.backends
                    .iter()
                    .map(|b| (b.slot, b.addr, b.port, b.weight))
                    .collect::<Vec<_>>()
            };
            assert_eq!(
                keys(a),
                keys(b),
                "same backends in the same slots everywhere"
            );
        }
    }
}

#[test]
fn a_node_is_local_in_its_own_plan_and_unresolved_backends_take_no_flows() {
    let config = config();
    let nuster3 = config.node(Path::new("lab"), "nuster3").unwrap();
    let plan = plan(&config, nuster3, [2; 6], &mut |addr| {
        (addr != "192.0.2.14".parse::<IpAddr>().unwrap())
            .then(|| mac_of(addr))
            .flatten()
    });
    let web = &plan.services[0];
    for backend in &web.backends {
        let is_self = backend.addr == nuster3.address.addr();
        assert_eq!(backend.local, is_self, "{backend:?}");
        let unresolved = backend.addr == "192.0.2.14".parse::<IpAddr>().unwrap();
        assert_eq!(backend.alive, !unresolved, "{backend:?}");
    }
}

#[test]
fn backends_and_the_owner_hold_the_vip_on_lo() {
    let config = config();
    for node in &config.nodes {
        let vips = local_vips(&config, node);
        assert!(!vips.is_empty(), "{} serves the web service", node.name);
    }
}

#[test]
fn vrrp_decides_who_holds_the_vips_it_carries() {
    let config = config();
    let vip: IpAddr = "192.0.2.100".parse().unwrap();
    assert!(vrrp_carries(&config, vip));
    let nuster1 = config.node(Path::new("lab"), "nuster1").unwrap();
    let nuster2 = config.node(Path::new("lab"), "nuster2").unwrap();
    // Until elected, not even the first balancer holds it.
    assert!(plan(&config, nuster1, [2; 6], &mut mac_of)
        .owned_vips
        .is_empty());
    let master = std::collections::BTreeSet::from([vip]);
    assert_eq!(owned_vips(&config, nuster2, &master), vec![vip]);
    assert!(owned_vips(&config, nuster1, &Default::default()).is_empty());
}

#[test]
fn a_vrrp_candidate_that_serves_nothing_keeps_no_vip_on_lo() {
    let mut config = config();
    // nuster2 stops being a web backend: as a VRRP master it forwards
    // every flow, so its kernel must not hold (and refuse for) the VIP.
    for service in &mut config.services {
        service
            .backends
            .retain(|backend| backend.node.as_deref() != Some("nuster2"));
    }
    let nuster2 = config.node(Path::new("lab"), "nuster2").unwrap().clone();
    assert!(local_vips(&config, &nuster2).is_empty());
    // nuster1 serves: it keeps it, master or backup.
    let nuster1 = config.node(Path::new("lab"), "nuster1").unwrap().clone();
    assert_eq!(
        local_vips(&config, &nuster1),
        vec!["192.0.2.100".parse::<IpAddr>().unwrap()]
    );
}
