//! The balancer in `farol_ingress` through BPF_PROG_TEST_RUN: exact frames
//! out for every scheduler in DSR mode, the connection table, drains, dead
//! backends, no backend, not-owned VIPs, non-VIP traffic and ARP for VIPs.

mod support;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use aya::{
    programs::{TestRun, TestRunOptions, Xdp},
    Ebpf,
};
use farol_agent::{
    config::{Forwarding, Protocol, Scheduler},
    dataplane::{
        self,
        lb::{BackendPlan, LbPlan, LoadBalancerMaps, ServicePlan},
        maglev::{maglev_table, TableBackend},
    },
};
use farol_common::{
    lb::{flow_hash, FlowKey, MAGLEV_TABLE_SIZE},
    maps::PROGRAM_INGRESS,
};
use xtask::packets;

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
const LOCAL_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x11];
const VIP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 100);
const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x64);

fn backend_mac(slot: u32) -> [u8; 6] {
    [0x02, 0, 0, 0, 0xbe, slot as u8]
}

fn backend(slot: u32, weight: u32) -> BackendPlan {
    BackendPlan {
        slot,
        name: format!("nuster{}", slot + 1),
        addr: IpAddr::V4(Ipv4Addr::new(192, 0, 2, 11 + slot as u8)),
        port: 80,
        mac: Some(backend_mac(slot)),
        weight,
        local: false,
        alive: true,
    }
}

fn service(scheduler: Scheduler, backends: Vec<BackendPlan>) -> ServicePlan {
    ServicePlan {
        index: 0,
        name: "web".into(),
        vip: IpAddr::V4(VIP),
        ports: vec![80],
        protocol: Protocol::Tcp,
        scheduler,
        forwarding: Forwarding::Dsr,
        seed: "lab/web".into(),
        backends,
    }
}

fn plan(services: Vec<ServicePlan>) -> LbPlan {
    let owned_vips = services.iter().map(|s| s.vip).collect();
    LbPlan {
        local_mac: LOCAL_MAC,
        services,
        owned_vips,
        snat_ipv4: None,
    }
}

struct Harness {
    ebpf: Ebpf,
    lb: LoadBalancerMaps,
}

impl Harness {
    fn new(plan: &LbPlan) -> Harness {
        let mut ebpf = dataplane::load_object().expect("load the eBPF object");
        let mut lb = LoadBalancerMaps::take_from(&mut ebpf).expect("lb maps");
        dataplane::load_balancer_programs(&mut ebpf)
            .expect("verifier accepts farol_nat and farol_ingress");
        lb.apply(plan).expect("apply plan");
        Harness { ebpf, lb }
    }

    fn run(&self, frame: &[u8]) -> (u32, Vec<u8>) {
        let program: &Xdp = self
            .ebpf
            .program(PROGRAM_INGRESS)
            .unwrap()
            .try_into()
            .unwrap();
        let mut out = vec![0u8; frame.len() + 256];
        let result = program
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ..TestRunOptions::default()
            })
            .expect("BPF_PROG_TEST_RUN");
        out.truncate(result.data_size_out as usize);
        (result.return_value, out)
    }

    /// Sends a frame that must be forwarded; returns the backend slot whose
    /// MAC it was sent to, after checking the rest of the frame is intact.
    fn forwarded_to(&self, frame: &[u8]) -> u32 {
        let (verdict, out) = self.run(frame);
        assert_eq!(verdict, XDP_TX, "expected XDP_TX for {}", hex(frame));
        assert_eq!(&out[6..12], &LOCAL_MAC, "source MAC is the balancer's");
        assert_eq!(
            &out[12..],
            &frame[12..],
            "DSR changes nothing past the MACs"
        );
        assert_eq!(
            &out[0..5],
            &backend_mac(0)[0..5],
            "destination is a backend MAC"
        );
        u32::from(out[5])
    }
}

fn hex(frame: &[u8]) -> String {
    frame.iter().map(|b| format!("{b:02x}")).collect()
}

/// A TCP frame from the client to the VIP, from `port`.
fn tcp(port: u16, syn: bool) -> Vec<u8> {
    let mut frame = if syn {
        packets::tcp_syn_v4()
    } else {
        packets::tcp_established_v4()
    };
    frame[packets::L4_V4..packets::L4_V4 + 2].copy_from_slice(&port.to_be_bytes());
    frame
}

fn flow_key(frame: &[u8]) -> FlowKey {
    let l3 = packets::L3;
    let mut key = FlowKey::default();
    key.src[10..12].copy_from_slice(&[0xff, 0xff]);
    key.dst[10..12].copy_from_slice(&[0xff, 0xff]);
    key.src[12..].copy_from_slice(&frame[l3 + 12..l3 + 16]);
    key.dst[12..].copy_from_slice(&frame[l3 + 16..l3 + 20]);
    key.sport_be = u16::from_ne_bytes([frame[packets::L4_V4], frame[packets::L4_V4 + 1]]);
    key.dport_be = u16::from_ne_bytes([frame[packets::L4_V4 + 2], frame[packets::L4_V4 + 3]]);
    key.protocol = frame[l3 + 9];
    key
}

/// Runs each test body in a thread pinned to one CPU, so per-CPU state
/// (the round-robin cursor) behaves as one sequence.
fn pinned<T>(body: impl FnOnce() -> T) -> T {
    // SAFETY: a zeroed cpu_set_t is valid; CPU_SET and sched_setaffinity
    // only touch it and this thread's affinity.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(0, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
    body()
}

#[test]
fn maglev_sends_each_flow_where_the_table_says_and_keeps_it_there() {
    if !support::privileged("maglev_sends_each_flow_where_the_table_says_and_keeps_it_there") {
        return;
    }
    let backends: Vec<BackendPlan> = (0..4).map(|slot| backend(slot, 100)).collect();
    let harness = Harness::new(&plan(vec![service(Scheduler::Maglev, backends.clone())]));
    let table = maglev_table(
        &backends
            .iter()
            .map(|b| TableBackend {
                id: b.id(0),
                key: format!("{}:{}", b.addr, b.port),
                weight: b.weight,
            })
            .collect::<Vec<_>>(),
        "lab/web",
        MAGLEV_TABLE_SIZE,
    );
    let mut seen = std::collections::HashSet::new();
    for port in 40000..40064u16 {
        let syn = tcp(port, true);
        let expected = table[(flow_hash(&flow_key(&syn), false) % MAGLEV_TABLE_SIZE) as usize];
        let got = harness.forwarded_to(&syn);
        assert_eq!(
            got, expected,
            "port {port}: the kernel and the agent's table agree"
        );
        assert_eq!(
            harness.forwarded_to(&tcp(port, false)),
            got,
            "established packet follows its SYN"
        );
        seen.insert(got);
    }
    assert_eq!(seen.len(), 4, "64 flows reach all four backends");

    // Drain the backend of port 40000: its flow stays, new flows avoid it.
    let drained = harness.forwarded_to(&tcp(40000, false));
    let mut changed = backends.clone();
    changed[drained as usize].weight = 0;
    let mut harness = harness;
    harness
        .lb
        .apply(&plan(vec![service(Scheduler::Maglev, changed.clone())]))
        .unwrap();
    assert_eq!(
        harness.forwarded_to(&tcp(40000, false)),
        drained,
        "drain keeps established flows"
    );
    for port in 41000..41064u16 {
        assert_ne!(
            harness.forwarded_to(&tcp(port, true)),
            drained,
            "no new flow to a drained backend"
        );
    }

    // Kill it: its established flow moves, and is counted as moved.
    changed[drained as usize].alive = false;
    harness
        .lb
        .apply(&plan(vec![service(Scheduler::Maglev, changed)]))
        .unwrap();
    assert_ne!(
        harness.forwarded_to(&tcp(40000, false)),
        drained,
        "a dead backend's flows move"
    );
    let snapshot = harness.lb.snapshot().unwrap();
    let service = &snapshot.services[0];
    assert!(service.stats.new_flows >= 128, "{service:?}");
    assert_eq!(
        service.backends[drained as usize].stats.moved_flows, 1,
        "{service:?}"
    );
}

#[test]
fn source_keeps_a_client_on_one_backend() {
    if !support::privileged("source_keeps_a_client_on_one_backend") {
        return;
    }
    let harness = Harness::new(&plan(vec![service(
        Scheduler::Source,
        (0..4).map(|s| backend(s, 100)).collect(),
    )]));
    let first = harness.forwarded_to(&tcp(40000, true));
    for port in 40001..40050u16 {
        assert_eq!(harness.forwarded_to(&tcp(port, true)), first, "port {port}");
    }
    let mut other_client = tcp(40000, true);
    let mut spread = std::collections::HashSet::new();
    for last in 1..=60u8 {
        other_client[packets::L3 + 15] = last;
        spread.insert(harness.forwarded_to(&other_client));
    }
    assert_eq!(
        spread.len(),
        4,
        "different clients spread over the backends"
    );
}

#[test]
fn roundrobin_cycles_new_flows_in_weight_order() {
    if !support::privileged("roundrobin_cycles_new_flows_in_weight_order") {
        return;
    }
    pinned(|| {
        let harness = Harness::new(&plan(vec![service(
            Scheduler::Roundrobin,
            (0..4).map(|s| backend(s, 100)).collect(),
        )]));
        let order: Vec<u32> = (40000..40012u16)
            .map(|port| harness.forwarded_to(&tcp(port, true)))
            .collect();
        for window in order.chunks(4) {
            let mut sorted = window.to_vec();
            sorted.sort_unstable();
            assert_eq!(
                sorted,
                vec![0, 1, 2, 3],
                "each round visits every backend once: {order:?}"
            );
        }
        assert_eq!(
            &order[..4],
            &order[4..8],
            "the same order every round: {order:?}"
        );
    });
}

#[test]
fn leastconn_picks_the_backend_with_fewest_active_flows() {
    if !support::privileged("leastconn_picks_the_backend_with_fewest_active_flows") {
        return;
    }
    let harness = Harness::new(&plan(vec![service(
        Scheduler::Leastconn,
        (0..3).map(|s| backend(s, 100)).collect(),
    )]));
    let first: Vec<u32> = (40000..40003u16)
        .map(|port| harness.forwarded_to(&tcp(port, true)))
        .collect();
    let mut sorted = first.clone();
    sorted.sort_unstable();
    assert_eq!(
        sorted,
        vec![0, 1, 2],
        "three flows, three backends: {first:?}"
    );
    // Close the flow on backend first[1] (FIN from the client): it becomes
    // the least loaded and takes the next flow.
    let mut fin = tcp(40001, false);
    fin[packets::L4_V4 + 13] = 0x11; // FIN + ACK
    assert_eq!(harness.forwarded_to(&fin), first[1]);
    assert_eq!(harness.forwarded_to(&tcp(40100, true)), first[1]);
}

#[test]
fn packets_the_balancer_does_not_own_go_to_the_kernel() {
    if !support::privileged("packets_the_balancer_does_not_own_go_to_the_kernel") {
        return;
    }
    let backends: Vec<BackendPlan> = (0..2).map(|s| backend(s, 100)).collect();
    let harness = Harness::new(&plan(vec![service(Scheduler::Maglev, backends.clone())]));
    // Not a VIP.
    let mut other = tcp(40000, true);
    other[packets::L3 + 19] = 11;
    assert_eq!(harness.run(&other), (XDP_PASS, other.clone()));
    // The VIP, on a port no service has.
    let mut port = tcp(40000, true);
    port[packets::L4_V4 + 3] = 22;
    assert_eq!(harness.run(&port), (XDP_PASS, port.clone()));
    // ICMP to the VIP: the kernel answers pings (the VIP is on lo).
    let ping = packets::icmp_echo_v4();
    assert_eq!(harness.run(&ping), (XDP_PASS, ping.clone()));
    // A VIP this node does not hold (VRRP backup): passed and counted.
    let mut not_owner = plan(vec![service(Scheduler::Maglev, backends)]);
    not_owner.owned_vips.clear();
    let mut harness = harness;
    harness.lb.apply(&not_owner).unwrap();
    let syn = tcp(40000, true);
    assert_eq!(harness.run(&syn), (XDP_PASS, syn.clone()));
    assert_eq!(
        harness.lb.snapshot().unwrap().services[0].stats.not_owned,
        1
    );
}

#[test]
fn a_flow_with_no_backend_left_is_dropped_and_counted() {
    if !support::privileged("a_flow_with_no_backend_left_is_dropped_and_counted") {
        return;
    }
    let mut dead: Vec<BackendPlan> = (0..2).map(|s| backend(s, 100)).collect();
    for backend in &mut dead {
        backend.alive = false;
    }
    let harness = Harness::new(&plan(vec![service(Scheduler::Maglev, dead)]));
    let syn = tcp(40000, true);
    assert_eq!(harness.run(&syn).0, XDP_DROP);
    assert_eq!(
        harness.lb.snapshot().unwrap().services[0]
            .stats
            .drops_no_backend,
        1
    );
}

#[test]
fn the_local_backend_is_served_by_this_node() {
    if !support::privileged("the_local_backend_is_served_by_this_node") {
        return;
    }
    let mut local = backend(0, 100);
    local.local = true;
    local.mac = None;
    let harness = Harness::new(&plan(vec![service(Scheduler::Maglev, vec![local])]));
    let syn = tcp(40000, true);
    assert_eq!(harness.run(&syn), (XDP_PASS, syn.clone()));
}

#[test]
fn udp_and_ipv6_services_are_balanced_too() {
    if !support::privileged("udp_and_ipv6_services_are_balanced_too") {
        return;
    }
    let mut udp = service(Scheduler::Maglev, (0..2).map(|s| backend(s, 100)).collect());
    udp.ports = vec![53];
    udp.protocol = Protocol::Udp;
    let mut v6 = service(Scheduler::Maglev, (0..2).map(|s| backend(s, 100)).collect());
    v6.index = 1;
    v6.name = "web6".into();
    v6.vip = IpAddr::V6(VIP6);
    let harness = Harness::new(&plan(vec![udp, v6]));
    let datagram = packets::udp_v4();
    let backend = harness.forwarded_to(&datagram);
    assert_eq!(
        harness.forwarded_to(&datagram),
        backend,
        "UDP flows stick too"
    );
    harness.forwarded_to(&packets::tcp_syn_v6());
}

#[test]
fn arp_for_an_owned_vip_is_answered_here() {
    if !support::privileged("arp_for_an_owned_vip_is_answered_here") {
        return;
    }
    let harness = Harness::new(&plan(vec![service(
        Scheduler::Maglev,
        vec![backend(0, 100)],
    )]));
    let request = packets::arp_request();
    let (verdict, reply) = harness.run(&request);
    assert_eq!(verdict, XDP_TX);
    assert_eq!(&reply[0..6], &packets::CLIENT_MAC, "to the requester");
    assert_eq!(&reply[6..12], &LOCAL_MAC, "from us");
    assert_eq!(&reply[20..22], &[0, 2], "an ARP reply");
    assert_eq!(&reply[22..28], &LOCAL_MAC, "the VIP is at our MAC");
    assert_eq!(&reply[28..32], &VIP.octets(), "for the VIP");
    assert_eq!(&reply[32..38], &packets::CLIENT_MAC);
    assert_eq!(&reply[38..42], &packets::CLIENT);
    // ARP for another address: the kernel's business.
    let mut other = request.clone();
    other[41] = 11;
    assert_eq!(harness.run(&other), (XDP_PASS, other.clone()));
}

/// An ICMP "fragmentation needed" from a router on the path, about the
/// reply a backend sent from the VIP to the client on `client_port`.
fn frag_needed_about_reply(client_port: u16) -> Vec<u8> {
    let reply = {
        let mut frame = packets::tcp_established_v4();
        let l3 = packets::L3;
        let (src, dst) = (
            frame[l3 + 12..l3 + 16].to_vec(),
            frame[l3 + 16..l3 + 20].to_vec(),
        );
        frame[l3 + 12..l3 + 16].copy_from_slice(&dst);
        frame[l3 + 16..l3 + 20].copy_from_slice(&src);
        let l4 = packets::L4_V4;
        frame[l4..l4 + 2].copy_from_slice(&80u16.to_be_bytes());
        frame[l4 + 2..l4 + 4].copy_from_slice(&client_port.to_be_bytes());
        frame
    };
    // Type 3 code 4, next-hop MTU 1400, then the quoted IP header + 8 bytes.
    let mut icmp = vec![3, 4, 0, 0, 0, 0, 0x05, 0x78];
    icmp.extend_from_slice(&reply[packets::L3..packets::L4_V4 + 8]);
    let mut frame = Vec::new();
    frame.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x11]);
    frame.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01]);
    frame.extend_from_slice(&0x0800u16.to_be_bytes());
    let total = (20 + icmp.len()) as u16;
    frame.extend_from_slice(&[0x45, 0, 0, 0, 0, 0, 0, 0, 64, 1, 0, 0]);
    frame[packets::L3 + 2..packets::L3 + 4].copy_from_slice(&total.to_be_bytes());
    frame.extend_from_slice(&[192, 0, 2, 1]);
    frame.extend_from_slice(&VIP.octets());
    frame.extend_from_slice(&icmp);
    frame
}

#[test]
fn icmp_errors_about_a_flow_reach_its_backend() {
    if !support::privileged("icmp_errors_about_a_flow_reach_its_backend") {
        return;
    }
    let harness = Harness::new(&plan(vec![service(
        Scheduler::Maglev,
        (0..4).map(|s| backend(s, 100)).collect(),
    )]));
    for port in 40000..40016u16 {
        let backend = harness.forwarded_to(&tcp(port, true));
        let error = frag_needed_about_reply(port);
        assert_eq!(
            harness.forwarded_to(&error),
            backend,
            "the ICMP error for port {port} follows its flow"
        );
    }
    // About a flow nobody has: the kernel's business.
    let unknown = frag_needed_about_reply(50000);
    assert_eq!(harness.run(&unknown), (XDP_PASS, unknown.clone()));
    assert_eq!(
        harness.lb.snapshot().unwrap().services[0]
            .stats
            .icmp_errors_forwarded,
        16
    );
}

// NAT mode: `farol_nat`, reached from `farol_ingress` by a tail call.

const BALANCER: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 11);
const NAT_BACKEND_PORT: u16 = 8080;

fn nat_plan(protocol: Protocol, port: u16) -> LbPlan {
    let backends = (1..3)
        .map(|slot| BackendPlan {
            port: NAT_BACKEND_PORT,
            ..backend(slot, 100)
        })
        .collect();
    let mut web = service(Scheduler::Roundrobin, backends);
    web.forwarding = Forwarding::Nat;
    web.protocol = protocol;
    web.ports = vec![port];
    LbPlan {
        snat_ipv4: Some(BALANCER),
        ..plan(vec![web])
    }
}

/// Checks the frame's IPv4 and TCP/UDP checksums by recomputing them.
fn assert_checksums_valid(frame: &[u8]) {
    let sliced = etherparse::SlicedPacket::from_ethernet(frame).expect("parses");
    let Some(etherparse::NetSlice::Ipv4(ip)) = &sliced.net else {
        panic!("not IPv4: {}", hex(frame));
    };
    let header = ip.header().to_header();
    assert_eq!(
        header.header_checksum,
        header.calc_header_checksum(),
        "IPv4 header checksum of {}",
        hex(frame)
    );
    match &sliced.transport {
        Some(etherparse::TransportSlice::Tcp(tcp)) => {
            let expected = tcp
                .to_header()
                .calc_checksum_ipv4(&header, tcp.payload())
                .unwrap();
            assert_eq!(tcp.checksum(), expected, "TCP checksum of {}", hex(frame));
        }
        Some(etherparse::TransportSlice::Udp(udp)) => {
            let expected = udp
                .to_header()
                .calc_checksum_ipv4(&header, udp.payload())
                .unwrap();
            assert_eq!(udp.checksum(), expected, "UDP checksum of {}", hex(frame));
        }
        _ => panic!("no TCP or UDP in {}", hex(frame)),
    }
}

struct NatView {
    src: [u8; 4],
    dst: [u8; 4],
    sport: u16,
    dport: u16,
}

fn view(frame: &[u8]) -> NatView {
    let (l3, l4) = (packets::L3, packets::L4_V4);
    NatView {
        src: frame[l3 + 12..l3 + 16].try_into().unwrap(),
        dst: frame[l3 + 16..l3 + 20].try_into().unwrap(),
        sport: u16::from_be_bytes([frame[l4], frame[l4 + 1]]),
        dport: u16::from_be_bytes([frame[l4 + 2], frame[l4 + 3]]),
    }
}

/// The backend's answer to `sent` (a frame the balancer sent it): addresses,
/// ports and MACs swapped, valid checksums, as a real backend would send.
fn reply_to(sent: &[u8], syn_ack: bool) -> Vec<u8> {
    let sent = view(sent);
    let step =
        etherparse::PacketBuilder::ethernet2(backend_mac(sent.dst[3] as u32 - 11), LOCAL_MAC)
            .ipv4(sent.dst, sent.src, 64);
    let mut frame = Vec::new();
    if syn_ack {
        let step = step
            .tcp(sent.dport, sent.sport, 5000, 64240)
            .syn()
            .ack(1001);
        step.write(&mut frame, &[]).unwrap();
    } else {
        let step = step
            .tcp(sent.dport, sent.sport, 5001, 64240)
            .ack(1030)
            .psh();
        step.write(&mut frame, b"HTTP/1.1 200 OK\r\n\r\n").unwrap();
    }
    frame
}

#[test]
fn nat_rewrites_a_tcp_flow_both_ways_with_valid_checksums() {
    if !support::privileged("nat_rewrites_a_tcp_flow_both_ways_with_valid_checksums") {
        return;
    }
    pinned(|| {
        let harness = Harness::new(&nat_plan(Protocol::Tcp, 80));
        let syn = packets::tcp_syn_v4();
        let (verdict, out) = harness.run(&syn);
        assert_eq!(verdict, XDP_TX, "a NAT SYN is sent on: {}", hex(&out));
        let sent = view(&out);
        assert_eq!(&out[6..12], &LOCAL_MAC, "from the balancer's MAC");
        let slot = u32::from(out[5]);
        assert_eq!(&out[0..6], &backend_mac(slot), "to a backend's MAC");
        assert_eq!(sent.src, BALANCER.octets(), "from the balancer's address");
        assert_eq!(sent.dst, [192, 0, 2, 11 + slot as u8], "to that backend");
        assert_eq!(sent.dport, NAT_BACKEND_PORT, "to the backend's port");
        assert!(
            (10240..32768).contains(&sent.sport),
            "from a NAT port, got {}",
            sent.sport
        );
        let l4 = packets::L4_V4;
        assert_eq!(
            (&out[l4 + 4..l4 + 16], &out[l4 + 18..]),
            (&syn[l4 + 4..l4 + 16], &syn[l4 + 18..]),
            "TCP past the ports is untouched but the checksum"
        );
        assert_checksums_valid(&out);

        let (verdict, back) = harness.run(&reply_to(&out, true));
        assert_eq!(verdict, XDP_TX, "the SYN-ACK goes back: {}", hex(&back));
        let back_view = view(&back);
        assert_eq!(&back[0..6], &packets::CLIENT_MAC, "to the client's MAC");
        assert_eq!(&back[6..12], &LOCAL_MAC);
        assert_eq!(back_view.src, packets::VIP, "from the VIP");
        assert_eq!(back_view.dst, packets::CLIENT, "to the client");
        assert_eq!(back_view.sport, packets::HTTP_PORT);
        assert_eq!(back_view.dport, packets::CLIENT_PORT);
        assert_checksums_valid(&back);

        // The rest of the flow keeps its backend and port, both ways.
        let (verdict, data) = harness.run(&packets::tcp_established_v4());
        assert_eq!(verdict, XDP_TX);
        let data_view = view(&data);
        assert_eq!((data_view.dst, data_view.sport), (sent.dst, sent.sport));
        assert_checksums_valid(&data);
        let (verdict, answer) = harness.run(&reply_to(&data, false));
        assert_eq!(verdict, XDP_TX);
        assert_checksums_valid(&answer);
        assert!(
            answer.ends_with(b"HTTP/1.1 200 OK\r\n\r\n"),
            "payload intact"
        );

        let stats = &harness.lb.snapshot().unwrap().services[0].stats;
        assert_eq!(stats.nat_replies, 2, "two replies translated");
        assert_eq!(stats.new_flows, 1);
    });
}

#[test]
fn nat_gives_every_flow_its_own_port_and_passes_unknown_replies() {
    if !support::privileged("nat_gives_every_flow_its_own_port_and_passes_unknown_replies") {
        return;
    }
    pinned(|| {
        let harness = Harness::new(&nat_plan(Protocol::Tcp, 80));
        let mut seen = std::collections::HashSet::new();
        for port in 20000..20200 {
            let (verdict, out) = harness.run(&tcp(port, true));
            assert_eq!(verdict, XDP_TX);
            let sent = view(&out);
            assert!(
                seen.insert((sent.dst, sent.sport)),
                "flow from client port {port} got a NAT port already in use: {}",
                sent.sport
            );
            // A retransmitted SYN keeps its backend and port.
            let (_, again) = harness.run(&tcp(port, true));
            let again = view(&again);
            assert_eq!((again.dst, again.sport), (sent.dst, sent.sport));
        }
        // A packet to the balancer's address that answers no NAT flow is
        // the kernel's (its own connections, SSH, ...).
        let (_, out) = harness.run(&packets::tcp_syn_v4());
        let mut stray = reply_to(&out, false);
        let l4 = packets::L4_V4;
        stray[l4 + 2..l4 + 4].copy_from_slice(&22u16.to_be_bytes());
        assert_eq!(
            harness.run(&stray).0,
            XDP_PASS,
            "a port outside the NAT range"
        );
        let mut unknown = reply_to(&out, false);
        unknown[l4 + 2..l4 + 4].copy_from_slice(&32000u16.to_be_bytes());
        assert_eq!(harness.run(&unknown).0, XDP_PASS, "a NAT port with no flow");
    });
}

#[test]
fn nat_translates_udp_and_keeps_a_zero_checksum_zero() {
    if !support::privileged("nat_translates_udp_and_keeps_a_zero_checksum_zero") {
        return;
    }
    let harness = Harness::new(&nat_plan(Protocol::Udp, 53));
    let datagram = packets::udp_v4();
    let (verdict, out) = harness.run(&datagram);
    assert_eq!(verdict, XDP_TX);
    assert_eq!(view(&out).dport, NAT_BACKEND_PORT);
    assert_checksums_valid(&out);
    assert!(out.ends_with(b"query"));

    let mut no_checksum = packets::udp_v4();
    no_checksum[packets::L4_V4 + 1] = 0x35; // another client port: a new flow
    no_checksum[packets::L4_V4 + 6..packets::L4_V4 + 8].copy_from_slice(&[0, 0]);
    let (verdict, out) = harness.run(&no_checksum);
    assert_eq!(verdict, XDP_TX);
    assert_eq!(
        &out[packets::L4_V4 + 6..packets::L4_V4 + 8],
        &[0, 0],
        "UDP without checksum stays so"
    );
}
