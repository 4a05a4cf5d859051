//! ns/packet of the balancer's paths through BPF_PROG_TEST_RUN, for
//! `cargo xtask bench lb`: a new flow (SYN to the VIP), an established flow
//! and a packet for no VIP, next to a bare XDP_PASS. Prints one JSON object
//! per case on stdout. Needs root and the eBPF object.

use std::net::{IpAddr, Ipv4Addr};

use aya::programs::{TestRun, TestRunOptions, Xdp};
use farol_agent::{
    config::{Protocol, Scheduler},
    dataplane::{
        self,
        lb::{BackendPlan, LbPlan, LoadBalancerMaps, ServicePlan},
        PROGRAM_BASELINE,
    },
};
use farol_common::maps::PROGRAM_INGRESS;
use xtask::packets;

const REPEAT: u32 = 1_000_000;
const ROUNDS: usize = 5;

fn main() -> anyhow::Result<()> {
    let mut ebpf = dataplane::load_object()?;
    let mut lb = LoadBalancerMaps::take_from(&mut ebpf)?;
    let backends = (0..4u8)
        .map(|i| BackendPlan {
            slot: u32::from(i),
            name: format!("nuster{}", i + 1),
            addr: IpAddr::V4(Ipv4Addr::new(192, 0, 2, 11 + i)),
            port: 80,
            mac: Some([2, 0, 0, 0, 0xbe, i]),
            weight: 100,
            local: false,
            alive: true,
        })
        .collect();
    lb.apply(&LbPlan {
        local_mac: [2, 0, 0, 0, 0, 0x11],
        services: vec![ServicePlan {
            index: 0,
            name: "web".into(),
            vip: IpAddr::V4(Ipv4Addr::new(192, 0, 2, 100)),
            ports: vec![80],
            protocol: Protocol::Tcp,
            scheduler: Scheduler::Maglev,
            seed: "bench/web".into(),
            backends,
        }],
        owned_vips: vec![IpAddr::V4(Ipv4Addr::new(192, 0, 2, 100))],
    })?;
    dataplane::load_xdp(&mut ebpf, PROGRAM_INGRESS)?;
    dataplane::load_xdp(&mut ebpf, PROGRAM_BASELINE)?;
    let mut not_vip = packets::tcp_established_v4();
    not_vip[packets::L3 + 19] = 11;
    let cases = [
        ("new-flow", packets::tcp_syn_v4()),
        ("established", packets::tcp_established_v4()),
        ("not-vip", not_vip),
    ];
    for (case, frame) in &cases {
        for (system, program) in [
            ("farol", PROGRAM_INGRESS),
            ("bare-xdp-pass", PROGRAM_BASELINE),
        ] {
            let xdp: &Xdp = ebpf.program(program).expect("loaded above").try_into()?;
            let mut samples = Vec::new();
            for _ in 0..ROUNDS {
                let run = xdp.test_run(TestRunOptions {
                    data_in: Some(frame),
                    repeat: REPEAT,
                    ..TestRunOptions::default()
                })?;
                samples.push(run.duration.as_nanos() as f64);
            }
            samples.sort_by(f64::total_cmp);
            println!(
                "{{\"case\": \"{system}-{case}\", \"ns_per_packet\": {}}}",
                samples[ROUNDS / 2]
            );
        }
    }
    Ok(())
}
