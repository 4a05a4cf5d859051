//! ns/packet of the balancer's paths through BPF_PROG_TEST_RUN, for
//! `cargo xtask bench lb`: a new flow (SYN to the VIP), an established flow
//! and a packet for no VIP, in DSR and in NAT mode, next to a bare XDP_PASS. Prints one JSON object
//! per case on stdout. Needs root and the eBPF object.

use std::net::{IpAddr, Ipv4Addr};

use aya::programs::{TestRun, TestRunOptions, Xdp};
use farol_agent::{
    config::{Forwarding, Protocol, Scheduler},
    dataplane::{
        self,
        lb::{BackendPlan, LbPlan, LoadBalancerMaps, ServicePlan},
        PROGRAM_BASELINE,
    },
};
use farol_common::maps::PROGRAM_INGRESS;
use xtask::packets;

const REPEAT: u32 = 1_000_000;
const NAT_PORT: u16 = 8080;
/// Calls (of one run each) for the NAT cases.
const SINGLE_RUNS: usize = 20_001;
const ROUNDS: usize = 5;

fn main() -> anyhow::Result<()> {
    let mut ebpf = dataplane::load_object()?;
    let mut lb = LoadBalancerMaps::take_from(&mut ebpf)?;
    let backends: Vec<BackendPlan> = (0..4u8)
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
        services: vec![
            ServicePlan {
                index: 0,
                name: "web".into(),
                vip: IpAddr::V4(Ipv4Addr::new(192, 0, 2, 100)),
                ports: vec![80],
                protocol: Protocol::Tcp,
                scheduler: Scheduler::Maglev,
                forwarding: Forwarding::Dsr,
                seed: "bench/web".into(),
                backends: backends.clone(),
            },
            ServicePlan {
                index: 1,
                name: "web-nat".into(),
                vip: IpAddr::V4(Ipv4Addr::new(192, 0, 2, 100)),
                ports: vec![NAT_PORT],
                protocol: Protocol::Tcp,
                scheduler: Scheduler::Maglev,
                forwarding: Forwarding::Nat,
                seed: "bench/web-nat".into(),
                backends,
            },
        ],
        owned_vips: vec![IpAddr::V4(Ipv4Addr::new(192, 0, 2, 100))],
        snat_ipv4: Some(Ipv4Addr::new(192, 0, 2, 11)),
    })?;
    dataplane::load_balancer_programs(&mut ebpf)?;
    dataplane::load_xdp(&mut ebpf, PROGRAM_BASELINE)?;
    let mut not_vip = packets::tcp_established_v4();
    not_vip[packets::L3 + 19] = 11;
    // A SYN on an open flow is a retransmission and keeps its backend; one
    // with FIN set marks the flow closed, so each run schedules anew.
    let mut new_flow = packets::tcp_syn_v4();
    new_flow[packets::L4_V4 + 13] |= 0x01;
    let to_nat = |mut frame: Vec<u8>| {
        let l4 = packets::L4_V4;
        frame[l4 + 2..l4 + 4].copy_from_slice(&NAT_PORT.to_be_bytes());
        frame
    };
    // NAT rewrites the frame, and a repeated test run reuses the rewritten
    // frame: those cases run once per call, many calls, and the median is
    // taken (the per-call figure includes the kernel's timer reads, as the
    // baseline's does).
    let cases = [
        ("new-flow", new_flow.clone(), REPEAT, ROUNDS),
        ("established", packets::tcp_established_v4(), REPEAT, ROUNDS),
        ("not-vip", not_vip, REPEAT, ROUNDS),
        ("nat-new-flow", to_nat(new_flow), 1, SINGLE_RUNS),
        (
            "nat-established",
            to_nat(packets::tcp_established_v4()),
            1,
            SINGLE_RUNS,
        ),
    ];
    for (case, frame, repeat, rounds) in &cases {
        for (system, program) in [
            ("farol", PROGRAM_INGRESS),
            ("bare-xdp-pass", PROGRAM_BASELINE),
        ] {
            let xdp: &Xdp = ebpf.program(program).expect("loaded above").try_into()?;
            let mut samples = Vec::new();
            for _ in 0..*rounds {
                let run = xdp.test_run(TestRunOptions {
                    data_in: Some(frame),
                    repeat: *repeat,
                    ..TestRunOptions::default()
                })?;
                samples.push(run.duration.as_nanos() as f64);
            }
            samples.sort_by(f64::total_cmp);
            println!(
                "{{\"case\": \"{system}-{case}\", \"ns_per_packet\": {}}}",
                samples[rounds / 2]
            );
        }
    }
    Ok(())
}
