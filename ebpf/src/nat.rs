//! NAT forwarding (IPv4), the program `farol_nat`. `farol_ingress`
//! tail-calls it for packets of a NAT service and for what may be a
//! backend's reply, so neither program carries the other's weight.
//!
//! - client → VIP: the flow gets a backend (the same schedulers and
//!   connection table as DSR) and a source port of this node; the packet
//!   leaves from this node's address and that port to the backend;
//! - backend → this node's NAT port: translated back to come from the VIP
//!   and sent to the client's MAC.
//!
//! Backends need nothing: to them every flow comes from the balancer.
//! Checksums are updated incrementally (RFC 1624).

use aya_ebpf::{
    bindings::xdp_action, helpers::bpf_ktime_get_ns, macros::xdp, programs::XdpContext,
};
use farol_common::lb::{
    flow_hash, Backend, LbConfig, NatEntry, NatKey, BACKEND_LOCAL, FORWARD_NAT, NAT_CLOSING,
    NAT_PORT_COUNT, NAT_PORT_FIRST, NAT_PORT_TRIES, NAT_PROGRAM_SLOT, NAT_REUSE_CLOSED_NS,
    NAT_REUSE_IDLE_NS, PROTO_TCP, VIP_OWNED,
};

use crate::{
    balance,
    maps::{BACKEND_STATS, LB_CONFIG, NAT_PROGRAMS, NAT_REVERSE, SVC_STATS},
    parse::{self, Network, Packet, Transport, TCP_FIN, TCP_RST},
};

/// `farol_ingress`'s verdict for "hand this packet to `farol_nat`": not an
/// XDP action, never returned to the kernel.
pub(crate) const HANDOFF: u32 = 0xfa70_0000;

const TCP_CHECK: usize = 16;
const UDP_CHECK: usize = 6;
const BPF_NOEXIST: u64 = 1;
/// UDP has no close: its ports are reused after this much silence.
const NAT_REUSE_IDLE_UDP_NS: u64 = 30_000_000_000;

/// Hands the packet to `farol_nat`; returns only when that cannot happen
/// (no program in the slot), and then the packet is dropped: passing it
/// would let the kernel answer for a VIP it does not serve.
#[inline(always)]
pub(crate) fn hand_off(ctx: &XdpContext) -> u32 {
    // SAFETY: a tail call replaces this program; the context is the one the
    // kernel gave us.
    unsafe { NAT_PROGRAMS.tail_call(ctx, NAT_PROGRAM_SLOT) };
    xdp_action::XDP_DROP
}

/// True for a packet that may be a reply to one of this node's NAT ports.
#[inline(always)]
pub(crate) fn may_be_reply(ctx: &XdpContext, packet: &Packet, config: &LbConfig) -> bool {
    if config.snat_ipv4 == [0; 4] || packet.network != Network::Ipv4 {
        return false;
    }
    let port = u16::from_be(packet.flow.dport_be);
    if !(NAT_PORT_FIRST..NAT_PORT_FIRST + NAT_PORT_COUNT).contains(&port) {
        return false;
    }
    parse::ipv4_destination(ctx, packet) == Some(config.snat_ipv4)
}

#[xdp]
pub fn farol_nat(ctx: XdpContext) -> u32 {
    let bytes = (ctx.data_end() - ctx.data()) as u64;
    let mut slot = core::mem::MaybeUninit::uninit();
    let packet = Packet::zero(&mut slot);
    if parse::classify(&ctx, packet).is_err()
        || packet.network != Network::Ipv4
        || !matches!(packet.transport, Transport::Tcp | Transport::Udp)
        || parse::fill_addresses(&ctx, packet).is_none()
    {
        return xdp_action::XDP_PASS;
    }
    let Some(config) = LB_CONFIG.get(0) else {
        return xdp_action::XDP_PASS;
    };
    if packet.flow.dst[12..16] == config.snat_ipv4 {
        return from_backend(&ctx, packet, config, bytes);
    }
    to_backend(&ctx, packet, config, bytes)
}

/// A client's packet for a NAT service: scheduled, then rewritten to go
/// from this node to the backend.
#[inline(always)]
fn to_backend(ctx: &XdpContext, packet: &Packet, config: &LbConfig, bytes: u64) -> u32 {
    let (meta, flow) = match balance::service_of(packet) {
        Ok(found) => found,
        Err(verdict) => return verdict,
    };
    if meta.forwarding != FORWARD_NAT || meta.flags & VIP_OWNED == 0 {
        return xdp_action::XDP_PASS;
    }
    balance::count_service(meta.service, bytes);
    let allocate = |backend_id: u32, backend: &Backend| {
        if backend.flags & BACKEND_LOCAL != 0 {
            return Some(0);
        }
        allocate_port(ctx, packet, backend_id, backend, meta.service)
    };
    let Some((backend_id, backend, port_be)) = balance::backend_for(packet, &meta, flow, allocate)
    else {
        balance::count_no_backend(meta.service);
        return xdp_action::XDP_DROP;
    };
    balance::count_backend(backend_id, bytes);
    if backend.flags & BACKEND_LOCAL != 0 {
        // Served here, with the VIP on `lo` as in DSR.
        return xdp_action::XDP_PASS;
    }
    let mut new = [0u8; 12];
    new[0..4].copy_from_slice(&config.snat_ipv4);
    new[4..8].copy_from_slice(&backend.addr[12..16]);
    new[8..10].copy_from_slice(&port_be.to_ne_bytes());
    new[10..12].copy_from_slice(&backend.port_be.to_ne_bytes());
    if rewrite(ctx, packet, &new).is_none()
        || set_macs(ctx, &backend.mac, &config.local_mac).is_none()
    {
        return xdp_action::XDP_PASS;
    }
    xdp_action::XDP_TX
}

/// A backend's reply to a NAT port: rewritten to come from the VIP and
/// sent to the client. Anything else for this node's address is the
/// kernel's.
#[inline(always)]
fn from_backend(ctx: &XdpContext, packet: &Packet, config: &LbConfig, bytes: u64) -> u32 {
    let mut key = NatKey::default();
    key.backend_addr.copy_from_slice(&packet.flow.src[12..16]);
    key.backend_port_be = packet.flow.sport_be;
    key.local_port_be = packet.flow.dport_be;
    key.protocol = packet.flow.protocol;
    let Some(found) = NAT_REVERSE.get_ptr_mut(&key) else {
        return xdp_action::XDP_PASS;
    };
    // SAFETY: a live map value; only this field is written, and a racing
    // writer on another CPU can at worst keep an older time or flag.
    let entry = unsafe {
        (*found).last_seen_ns = bpf_ktime_get_ns();
        if packet.tcp_flags & (TCP_FIN | TCP_RST) != 0 {
            (*found).flags |= NAT_CLOSING;
        }
        *found
    };
    let mut new = [0u8; 12];
    new[0..4].copy_from_slice(&entry.vip_addr);
    new[4..8].copy_from_slice(&entry.client_addr);
    new[8..10].copy_from_slice(&entry.vip_port_be.to_ne_bytes());
    new[10..12].copy_from_slice(&entry.client_port_be.to_ne_bytes());
    if rewrite(ctx, packet, &new).is_none()
        || set_macs(ctx, &entry.client_mac, &config.local_mac).is_none()
    {
        return xdp_action::XDP_PASS;
    }
    if let Some(stats) = SVC_STATS.get_ptr_mut(entry.service) {
        // SAFETY: this CPU's slot, valid for this invocation.
        unsafe { (*stats).nat_replies += 1 };
    }
    if let Some(stats) = BACKEND_STATS.get_ptr_mut(entry.backend) {
        // SAFETY: this CPU's slot, valid for this invocation.
        unsafe { (*stats).bytes += bytes };
    }
    xdp_action::XDP_TX
}

/// Picks a free source port for a new flow to `backend` and records the
/// way back; returns it in network order, or `None` when every port tried
/// is taken (counted).
#[inline(always)]
fn allocate_port(
    ctx: &XdpContext,
    packet: &Packet,
    backend_id: u32,
    backend: &Backend,
    service: u32,
) -> Option<u16> {
    let eth = parse::ptr_at_mut::<[u8; 12]>(ctx, 0)?;
    // SAFETY: bounds-checked just above.
    let eth = unsafe { &*eth };
    // SAFETY: a helper with no arguments and no side effects.
    let now = unsafe { bpf_ktime_get_ns() };
    let mut entry = NatEntry {
        client_port_be: packet.flow.sport_be,
        vip_port_be: packet.flow.dport_be,
        backend: backend_id,
        service,
        last_seen_ns: now,
        ..NatEntry::default()
    };
    entry.client_addr.copy_from_slice(&packet.flow.src[12..16]);
    entry.vip_addr.copy_from_slice(&packet.flow.dst[12..16]);
    entry.client_mac.copy_from_slice(&eth[6..12]);
    let mut key = NatKey {
        backend_port_be: backend.port_be,
        protocol: packet.flow.protocol,
        ..NatKey::default()
    };
    key.backend_addr.copy_from_slice(&backend.addr[12..16]);
    let start = flow_hash(&packet.flow, false);
    for attempt in 0..NAT_PORT_TRIES {
        let offset = start.wrapping_add(attempt.wrapping_mul(7919)) % u32::from(NAT_PORT_COUNT);
        let port = NAT_PORT_FIRST + offset as u16;
        key.local_port_be = port.to_be();
        let flags = match NAT_REVERSE.get_ptr(&key) {
            None => BPF_NOEXIST,
            // SAFETY: read once; a concurrent update only makes us skip
            // or take a port a moment early.
            Some(old) if reusable(unsafe { &*old }, &entry, packet.flow.protocol, now) => 0,
            Some(_) => continue,
        };
        if NAT_REVERSE.insert(&key, &entry, flags).is_ok() {
            return Some(port.to_be());
        }
    }
    if let Some(stats) = SVC_STATS.get_ptr_mut(service) {
        // SAFETY: this CPU's slot, valid for this invocation.
        unsafe { (*stats).drops_no_nat_port += 1 };
    }
    None
}

/// True when `entry`'s port may go to `wanted`: it already is that client
/// connection's (a new connection on the same 4-tuple, which the backend
/// sees just as it would without NAT), or its flow is over.
#[inline(always)]
fn reusable(entry: &NatEntry, wanted: &NatEntry, protocol: u8, now: u64) -> bool {
    if entry.client_addr == wanted.client_addr
        && entry.client_port_be == wanted.client_port_be
        && entry.vip_addr == wanted.vip_addr
        && entry.vip_port_be == wanted.vip_port_be
    {
        return true;
    }
    let idle = now.saturating_sub(entry.last_seen_ns);
    if protocol == PROTO_TCP {
        (entry.flags & NAT_CLOSING != 0 && idle > NAT_REUSE_CLOSED_NS) || idle > NAT_REUSE_IDLE_NS
    } else {
        idle > NAT_REUSE_IDLE_UDP_NS
    }
}

/// One's-complement sum folded to 16 bits.
#[inline(always)]
fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// RFC 1624 eqn. 3, HC' = ~(~HC + ~m + m'), over the first `words`
/// 16-bit words of `old` and `new`.
#[inline(always)]
fn checksum_replace(check: u16, old: &[u8; 12], new: &[u8; 12], words: usize) -> u16 {
    let mut sum = u32::from(!check);
    for i in 0..6 {
        if i >= words {
            break;
        }
        let o = u16::from_be_bytes([old[2 * i], old[2 * i + 1]]);
        let n = u16::from_be_bytes([new[2 * i], new[2 * i + 1]]);
        sum += u32::from(!o) + u32::from(n);
    }
    !fold(sum)
}

/// Rewrites addresses and ports (`new`: source address, destination
/// address, source port, destination port, network order) in place and
/// fixes the IPv4 and transport checksums.
#[inline(always)]
fn rewrite(ctx: &XdpContext, packet: &Packet, new: &[u8; 12]) -> Option<()> {
    // SAFETY: reading fields through references; the volatile reads keep
    // LLVM from folding away the bounds checks below (see parse.rs).
    let (l3, l4) = unsafe {
        (
            core::ptr::read_volatile(&packet.l3_offset),
            core::ptr::read_volatile(&packet.l4_offset),
        )
    };
    let ip = parse::ptr_at_mut::<[u8; 20]>(ctx, l3)?;
    let (ports, check_at) = if packet.flow.protocol == PROTO_TCP {
        (
            parse::ptr_at_mut::<[u8; 18]>(ctx, l4)? as *mut u8,
            TCP_CHECK,
        )
    } else {
        (parse::ptr_at_mut::<[u8; 8]>(ctx, l4)? as *mut u8, UDP_CHECK)
    };
    // SAFETY: both headers were bounds-checked against the packet end just
    // above (18 bytes of TCP or 8 of UDP cover ports and checksum); they do
    // not overlap (l4 ≥ l3 + 20).
    unsafe {
        let ip = &mut *ip;
        let mut old = [0u8; 12];
        old[0..8].copy_from_slice(&ip[12..20]);
        let ip_check = u16::from_be_bytes([ip[10], ip[11]]);
        ip[10..12].copy_from_slice(&checksum_replace(ip_check, &old, new, 4).to_be_bytes());
        ip[12..20].copy_from_slice(&new[0..8]);
        for i in 0..4 {
            old[8 + i] = *ports.add(i);
            *ports.add(i) = new[8 + i];
        }
        let check = u16::from_be_bytes([*ports.add(check_at), *ports.add(check_at + 1)]);
        // A zero UDP checksum means "none" (IPv4) and stays so; a computed
        // zero goes out as all ones (RFC 768).
        if packet.flow.protocol == PROTO_TCP || check != 0 {
            let mut updated = checksum_replace(check, &old, new, 6);
            if packet.flow.protocol != PROTO_TCP && updated == 0 {
                updated = 0xffff;
            }
            let bytes = updated.to_be_bytes();
            *ports.add(check_at) = bytes[0];
            *ports.add(check_at + 1) = bytes[1];
        }
    }
    Some(())
}

#[inline(always)]
fn set_macs(ctx: &XdpContext, dst: &[u8; 6], src: &[u8; 6]) -> Option<()> {
    let eth = parse::ptr_at_mut::<[u8; 12]>(ctx, 0)?;
    // SAFETY: bounds-checked just above.
    let eth = unsafe { &mut *eth };
    eth[0..6].copy_from_slice(dst);
    eth[6..12].copy_from_slice(src);
    Some(())
}
