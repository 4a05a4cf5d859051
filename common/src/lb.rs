//! The load balancer's maps: virtual services, backends, Maglev tables and
//! the connection table. The agent writes every map but `FLOWS` and the
//! counters; the kernel only reads what the agent wrote and indexes it.
//!
//! Addresses are 16 bytes in network order; IPv4 is stored IPv4-mapped
//! (`::ffff:a.b.c.d`), so one map serves both families.

use core::mem::size_of;

/// Services the kernel can hold (VIP, port, protocol sets).
pub const MAX_SERVICES: u32 = 16;
/// Backend slots across all services.
pub const MAX_BACKENDS: u32 = 512;
/// Backends one service can have (bounds the leastconn scan).
pub const MAX_BACKENDS_PER_SERVICE: u32 = 32;
/// Maglev table size: a prime, as the paper and Katran require (65537).
pub const MAGLEV_TABLE_SIZE: u32 = 65537;
/// A Maglev slot with no backend: the service has none that can take a flow.
pub const NO_BACKEND: u32 = u32::MAX;
/// Each service has two table halves; the agent writes the idle one and then
/// flips `VipMeta::table_half`, so no packet sees a half-written table.
pub const MAGLEV_HALVES: u32 = 2;
/// Connection table entries (LRU: the least recently used flow goes first).
pub const MAX_FLOWS: u32 = 65536;

pub const MAP_VIPS: &str = "VIPS";
pub const MAP_OWNED_VIPS: &str = "OWNED_VIPS";
pub const MAP_BACKENDS: &str = "BACKENDS";
pub const MAP_SERVICE_BACKENDS: &str = "SVC_BACKENDS";
pub const MAP_MAGLEV: &str = "MAGLEV_RING";
pub const MAP_FLOWS: &str = "FLOWS";
pub const MAP_SERVICE_STATS: &str = "SVC_STATS";
pub const MAP_BACKEND_STATS: &str = "BACKEND_STATS";
pub const MAP_ACTIVE_FLOWS: &str = "ACTIVE_FLOWS";
pub const MAP_RR_CURSOR: &str = "RR_CURSOR";
pub const MAP_LB_CONFIG: &str = "LB_CONFIG";
pub const MAP_SERVICE_META: &str = "SVC_META";
pub const MAP_NAT_REVERSE: &str = "NAT_REVERSE";
pub const MAP_NAT_PROGRAMS: &str = "NAT_PROGRAMS";

/// NAT mode runs in its own program, `farol_nat`, which `farol_ingress`
/// tail-calls through slot 0 of `NAT_PROGRAMS`: kept apart, neither program
/// nears the verifier's limits, and DSR packets pay nothing for NAT.
pub const PROGRAM_NAT: &str = "farol_nat";
pub const NAT_PROGRAM_SLOT: u32 = 0;

/// Source ports NAT mode gives its flows towards backends: below Linux's
/// ephemeral range (32768-60999), so they never meet the balancer's own
/// outgoing connections, and above the usual service ports.
pub const NAT_PORT_FIRST: u16 = 10240;
pub const NAT_PORT_COUNT: u16 = 22528;
/// Ports tried for a new flow before it is dropped as unallocatable (with
/// half the ports taken, 16 tries all fail once in 65,536 flows).
pub const NAT_PORT_TRIES: u32 = 16;
/// A port whose flow closed (FIN or RST seen) is given out again after this
/// long, so the backend's TIME_WAIT for the old flow has mostly gone.
pub const NAT_REUSE_CLOSED_NS: u64 = 2_000_000_000;
/// A port whose flow was silent this long is given out again.
pub const NAT_REUSE_IDLE_NS: u64 = 300_000_000_000;

pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// An IPv4 address as the 16-byte form the maps use.
pub const fn ipv4_mapped(octets: [u8; 4]) -> [u8; 16] {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, octets[0], octets[1], octets[2], octets[3],
    ]
}

/// Key of `VIPS`: one entry per (VIP, port, protocol); a port range is one
/// entry per port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct VipKey {
    pub addr: [u8; 16],
    /// Network byte order.
    pub port_be: u16,
    pub protocol: u8,
    pub _pad: u8,
}
const _: () = assert!(size_of::<VipKey>() == 20);

/// Forwarding modes, `VipMeta::forwarding`.
pub const FORWARD_DSR: u32 = 0;
pub const FORWARD_NAT: u32 = 1;

/// Schedulers, `VipMeta::scheduler`.
pub const SCHEDULER_MAGLEV: u32 = 0;
pub const SCHEDULER_SOURCE: u32 = 1;
pub const SCHEDULER_ROUNDROBIN: u32 = 2;
pub const SCHEDULER_LEASTCONN: u32 = 3;

/// Value of `VIPS`: which service and how to balance it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VipMeta {
    /// Index into the per-service maps, < MAX_SERVICES.
    pub service: u32,
    pub scheduler: u32,
    pub forwarding: u32,
    /// Which Maglev half is live (0 or 1).
    pub table_half: u32,
    /// Entries used in `SVC_BACKENDS` for this service.
    pub backend_count: u32,
    /// `VIP_OWNED` while this node holds the VIP (kept here, not looked up
    /// in `OWNED_VIPS`, to save a hash lookup per packet).
    pub flags: u32,
}
const _: () = assert!(size_of::<VipMeta>() == 24);

/// `VipMeta::flags`: this node holds the VIP and balances its flows.
pub const VIP_OWNED: u32 = 1;
/// `VipMeta::flags` in `SVC_META`: the service exists (a removed service's
/// slot is zeroed, and its flows fall back to the `VIPS` lookup).
pub const SERVICE_PRESENT: u32 = 2;

/// `Backend::flags`: eligible for new flows (healthy, weight > 0).
pub const BACKEND_ACTIVE: u32 = 1;
/// `Backend::flags`: the backend is this node; its packets are passed up.
pub const BACKEND_LOCAL: u32 = 2;
/// `Backend::flags`: alive; established flows may stay (a drained backend
/// is ALIVE but not ACTIVE; a dead one is neither and its flows move).
pub const BACKEND_ALIVE: u32 = 4;

/// Value of `BACKENDS`, indexed by backend id.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backend {
    pub addr: [u8; 16],
    pub mac: [u8; 6],
    /// Network byte order.
    pub port_be: u16,
    pub flags: u32,
    pub weight: u32,
}
const _: () = assert!(size_of::<Backend>() == 32);

/// Key of `FLOWS`: the client's 5-tuple as it arrives.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub sport_be: u16,
    pub dport_be: u16,
    pub protocol: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(size_of::<FlowKey>() == 40);

/// `Flow::flags`: a FIN or RST was seen; the flow no longer counts as
/// active for leastconn.
pub const FLOW_CLOSING: u32 = 1;

/// Value of `FLOWS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Flow {
    pub backend: u32,
    /// The service, so an established flow needs no `VIPS` lookup.
    pub service: u32,
    pub flags: u32,
    /// NAT mode: the balancer's source port towards the backend (network
    /// order); 0 in DSR mode.
    pub nat_port_be: u16,
    pub _pad: u16,
}
const _: () = assert!(size_of::<Flow>() == 16);

/// Per-service counters, `SVC_STATS` (per CPU).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceStats {
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
    /// Dropped: no backend could take the flow.
    pub drops_no_backend: u64,
    /// Passed to the kernel: this node does not hold the VIP.
    pub not_owned: u64,
    /// ICMP errors about a flow sent on to the flow's backend.
    pub icmp_errors_forwarded: u64,
    /// NAT: new flows dropped because no source port was free.
    pub drops_no_nat_port: u64,
    /// NAT: backend replies translated back to the client.
    pub nat_replies: u64,
}
const _: () = assert!(size_of::<ServiceStats>() == 64);

/// Per-backend counters, `BACKEND_STATS` (per CPU).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendStats {
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
    /// Established flows that had to move because their backend died.
    pub moved_flows: u64,
}
const _: () = assert!(size_of::<BackendStats>() == 32);

/// Node-wide settings, `LB_CONFIG[0]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LbConfig {
    /// The MAC of the interface the program runs on (source of XDP_TX frames).
    pub local_mac: [u8; 6],
    pub _pad: [u8; 2],
    /// How many of `vips` are set; more than `FAST_VIPS` distinct VIP
    /// addresses set it to `u32::MAX`, and every packet takes the `VIPS`
    /// hash lookup instead.
    pub vip_count: u32,
    /// NAT mode: this node's IPv4 address, the source of packets sent to
    /// backends and the destination of their replies; zero when no service
    /// uses NAT.
    pub snat_ipv4: [u8; 4],
    /// The cluster's VIP addresses (most clusters have one or two): non-VIP
    /// traffic leaves after two compares instead of a map lookup.
    pub vips: [[u8; 16]; FAST_VIPS],
}
const _: () = assert!(size_of::<LbConfig>() == 16 + 16 * FAST_VIPS);

/// VIP addresses `LbConfig` holds for the fast non-VIP test.
pub const FAST_VIPS: usize = 2;

/// Key of `NAT_REVERSE`: a backend's reply as it reaches the balancer
/// (the destination is always `LbConfig::snat_ipv4`). NAT is IPv4 only.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct NatKey {
    pub backend_addr: [u8; 4],
    pub backend_port_be: u16,
    pub local_port_be: u16,
    pub protocol: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(size_of::<NatKey>() == 12);

/// Value of `NAT_REVERSE`: what the reply must look like to the client.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NatEntry {
    pub client_addr: [u8; 4],
    pub vip_addr: [u8; 4],
    pub client_port_be: u16,
    pub vip_port_be: u16,
    /// Where the client's packets came from (the client or its router).
    pub client_mac: [u8; 6],
    /// `NAT_CLOSING` once the backend sent FIN or RST.
    pub flags: u16,
    pub backend: u32,
    pub service: u32,
    /// `bpf_ktime_get_ns` of the last packet either way.
    pub last_seen_ns: u64,
}
const _: () = assert!(size_of::<NatEntry>() == 40);

/// `NatEntry::flags`: the flow is closing; its port may be reused soon.
pub const NAT_CLOSING: u16 = 1;

/// The index of `(service, half)`'s first slot in `MAGLEV_RING`.
pub const fn maglev_base(service: u32, half: u32) -> u32 {
    (service * MAGLEV_HALVES + half) * MAGLEV_TABLE_SIZE
}

/// The flow hash both sides agree on (the agent uses it only in tests; the
/// kernel indexes the Maglev table with it). A 32-bit mix of the 5-tuple.
pub fn flow_hash(key: &FlowKey, source_only: bool) -> u32 {
    let mut hash: u32 = 0x9e37_79b9;
    let mut mix = |word: u32| {
        hash ^= word;
        hash = hash.wrapping_mul(0x85eb_ca6b);
        hash ^= hash >> 13;
    };
    let words = |bytes: &[u8; 16]| {
        [
            u32::from_ne_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]),
            u32::from_ne_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]),
            u32::from_ne_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]),
            u32::from_ne_bytes([bytes[12], bytes[13], bytes[14], bytes[15]]),
        ]
    };
    for word in words(&key.src) {
        mix(word);
    }
    if !source_only {
        for word in words(&key.dst) {
            mix(word);
        }
        mix(u32::from(key.sport_be) << 16 | u32::from(key.dport_be));
        mix(u32::from(key.protocol));
    }
    hash ^= hash >> 16;
    hash = hash.wrapping_mul(0xc2b2_ae35);
    hash ^ (hash >> 16)
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY (all below): #[repr(C)], Copy, explicit padding, no bool or enum
    // fields, so every bit pattern is a valid value.
    unsafe impl aya::Pod for VipKey {}
    unsafe impl aya::Pod for VipMeta {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for Flow {}
    unsafe impl aya::Pod for ServiceStats {}
    unsafe impl aya::Pod for BackendStats {}
    unsafe impl aya::Pod for LbConfig {}
    unsafe impl aya::Pod for NatKey {}
    unsafe impl aya::Pod for NatEntry {}
}
