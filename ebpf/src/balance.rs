//! The load balancer: VIP lookup, connection table, backend choice,
//! forwarding.
//!
//! - not a VIP (or a port no service has): passed to the kernel;
//! - a VIP this node does not hold: passed (a backend serving a flow that
//!   the owner sent here in DSR mode, with the VIP on `lo`);
//! - a known flow whose backend is alive: same backend as before;
//! - otherwise the scheduler picks a backend and the flow is recorded;
//! - no backend can take it: dropped and counted (the kernel would answer
//!   with a confusing RST);
//! - the backend is this node: passed up to the local server;
//! - otherwise DSR: destination MAC rewritten to the backend's, XDP_TX;
//! - NAT services and replies to NAT ports go to `farol_nat` (`nat.rs`).

use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use farol_common::lb::{
    flow_hash, maglev_base, Backend, Flow, LbConfig, VipKey, VipMeta, BACKEND_ACTIVE,
    BACKEND_ALIVE, BACKEND_LOCAL, FLOW_CLOSING, FORWARD_NAT, MAGLEV_TABLE_SIZE,
    MAX_BACKENDS_PER_SERVICE, NO_BACKEND, SCHEDULER_LEASTCONN, SCHEDULER_ROUNDROBIN,
    SCHEDULER_SOURCE, SERVICE_PRESENT, VIP_OWNED,
};

use crate::{
    maps::{
        ACTIVE_FLOWS, BACKENDS, BACKEND_STATS, FLOWS, LB_CONFIG, MAGLEV_RING, RR_CURSOR,
        SVC_BACKENDS, SVC_META, SVC_STATS, VIPS,
    },
    nat,
    parse::{self, Network, Packet, TCP_FIN, TCP_RST, TCP_SYN},
};

#[inline(always)]
pub(crate) fn forward(ctx: &XdpContext, packet: &mut Packet, bytes: u64) -> u32 {
    let Some(config) = LB_CONFIG.get(0) else {
        return xdp_action::XDP_PASS;
    };
    if nat::may_be_reply(ctx, packet, config) {
        return nat::HANDOFF;
    }
    if !may_be_vip(ctx, packet, config) {
        return xdp_action::XDP_PASS;
    }
    if parse::fill_addresses(ctx, packet).is_none() {
        return xdp_action::XDP_PASS;
    }
    let packet = &*packet;
    let (meta, flow) = match service_of(packet) {
        Ok(found) => found,
        Err(verdict) => return verdict,
    };
    if meta.flags & VIP_OWNED == 0 {
        if let Some(stats) = SVC_STATS.get_ptr_mut(meta.service) {
            // SAFETY: this CPU's slot, valid for this invocation.
            unsafe { (*stats).not_owned += 1 };
        }
        return xdp_action::XDP_PASS;
    }
    if meta.forwarding == FORWARD_NAT {
        return nat::HANDOFF;
    }
    count_service(meta.service, bytes);
    let Some((backend_id, backend, _)) = backend_for(packet, &meta, flow, |_, _| Some(0)) else {
        count_no_backend(meta.service);
        return xdp_action::XDP_DROP;
    };
    count_backend(backend_id, bytes);
    if backend.flags & BACKEND_LOCAL != 0 {
        return xdp_action::XDP_PASS;
    }
    send_to(ctx, &backend, config)
}

/// The packet's service and, when the connection table knows the flow, its
/// entry; `Err` holds the verdict for a packet no service wants.
#[inline(always)]
pub(crate) fn service_of(packet: &Packet) -> Result<(VipMeta, Option<Flow>), u32> {
    // SAFETY: copied out at once; LRU entries may be evicted concurrently.
    let flow = unsafe { FLOWS.get(packet.flow) }.copied();
    let known = flow
        .and_then(|flow| SVC_META.get(flow.service).copied())
        .filter(|meta| meta.flags & SERVICE_PRESENT != 0);
    if let Some(meta) = known {
        return Ok((meta, flow));
    }
    let key = VipKey {
        addr: packet.flow.dst,
        port_be: packet.flow.dport_be,
        protocol: packet.flow.protocol,
        _pad: 0,
    };
    // SAFETY: entries are plain values the agent replaces whole.
    match unsafe { VIPS.get(key) }.copied() {
        Some(meta) => Ok((meta, None)),
        None => Err(xdp_action::XDP_PASS),
    }
}

#[inline(always)]
pub(crate) fn count_service(service: u32, bytes: u64) {
    if let Some(stats) = SVC_STATS.get_ptr_mut(service) {
        // SAFETY: this CPU's slot, valid for this invocation.
        unsafe {
            (*stats).packets += 1;
            (*stats).bytes += bytes;
        }
    }
}

#[inline(always)]
pub(crate) fn count_no_backend(service: u32) {
    if let Some(stats) = SVC_STATS.get_ptr_mut(service) {
        // SAFETY: this CPU's slot, valid for this invocation.
        unsafe { (*stats).drops_no_backend += 1 };
    }
}

#[inline(always)]
pub(crate) fn count_backend(backend: u32, bytes: u64) {
    if let Some(stats) = BACKEND_STATS.get_ptr_mut(backend) {
        // SAFETY: this CPU's slot, valid for this invocation.
        unsafe {
            (*stats).packets += 1;
            (*stats).bytes += bytes;
        }
    }
}

/// An ICMP error about a VIP flow (fragmentation needed, unreachable, time
/// exceeded) goes to the backend that owns the flow, so path MTU discovery
/// works through DSR; anything else ICMP is the kernel's (pings to the VIP
/// are answered there).
#[inline(always)]
pub(crate) fn forward_icmp_error(ctx: &XdpContext, packet: &Packet, bytes: u64) -> u32 {
    let Some(key) = parse::icmp_error_flow(ctx, packet) else {
        return xdp_action::XDP_PASS;
    };
    let Some(config) = LB_CONFIG.get(0) else {
        return xdp_action::XDP_PASS;
    };
    if !is_vip(&key.dst, config) {
        return xdp_action::XDP_PASS;
    }
    // SAFETY: copied out at once; LRU entries may be evicted concurrently.
    let Some(flow) = unsafe { FLOWS.get(key) }.copied() else {
        return xdp_action::XDP_PASS;
    };
    let Some(meta) = SVC_META.get(flow.service).copied() else {
        return xdp_action::XDP_PASS;
    };
    // NAT flows would need the quoted packet translated too: the kernel's.
    if meta.flags & VIP_OWNED == 0 || meta.forwarding == FORWARD_NAT {
        return xdp_action::XDP_PASS;
    }
    let Some(backend) = BACKENDS.get(flow.backend).copied() else {
        return xdp_action::XDP_PASS;
    };
    if let Some(stats) = SVC_STATS.get_ptr_mut(meta.service) {
        // SAFETY: this CPU's slot, valid for this invocation.
        unsafe { (*stats).icmp_errors_forwarded += 1 };
    }
    count_backend(flow.backend, bytes);
    if backend.flags & BACKEND_LOCAL != 0 {
        return xdp_action::XDP_PASS;
    }
    send_to(ctx, &backend, config)
}

/// Rewrites the Ethernet addresses towards `backend` and transmits (DSR).
#[inline(always)]
fn send_to(ctx: &XdpContext, backend: &Backend, config: &LbConfig) -> u32 {
    let Some(eth) = parse::ptr_at_mut::<[u8; 12]>(ctx, 0) else {
        return xdp_action::XDP_PASS;
    };
    // SAFETY: bounds-checked just above.
    let eth = unsafe { &mut *eth };
    eth[0..6].copy_from_slice(&backend.mac);
    eth[6..12].copy_from_slice(&config.local_mac);
    xdp_action::XDP_TX
}

/// False when the packet is surely for no VIP: its destination compared
/// with the (one or two) VIP addresses in `LB_CONFIG`, which costs far less
/// than any map lookup (a Bloom filter's helper call measured ~55 ns per
/// packet here). IPv4 compares the four address bytes only.
#[inline(always)]
fn may_be_vip(ctx: &XdpContext, packet: &Packet, config: &LbConfig) -> bool {
    let count = config.vip_count;
    if count == 0 {
        return false;
    }
    if count as usize > config.vips.len() || packet.network != Network::Ipv4 {
        // Many VIPs, or IPv6: the addresses are filled and looked up.
        return true;
    }
    let Some(dst) = parse::ipv4_destination(ctx, packet) else {
        return false;
    };
    let matches = |vip: &[u8; 16]| vip[10] == 0xff && vip[11] == 0xff && vip[12..16] == dst;
    matches(&config.vips[0]) || (count == 2 && matches(&config.vips[1]))
}

/// True when `addr` (16-byte form) is one of the VIP addresses.
#[inline(always)]
pub(crate) fn is_vip(addr: &[u8; 16], config: &LbConfig) -> bool {
    match config.vip_count {
        0 => false,
        1 => config.vips[0] == *addr,
        2 => config.vips[0] == *addr || config.vips[1] == *addr,
        _ => true,
    }
}

/// The flow's backend and NAT port: the recorded ones while the backend
/// lives, else a new choice (recorded; `nat_port` gives a new flow its
/// source port, or `None` to drop it). Counts new and moved flows.
#[inline(always)]
pub(crate) fn backend_for(
    packet: &Packet,
    meta: &VipMeta,
    flow: Option<Flow>,
    nat_port: impl FnOnce(u32, &Backend) -> Option<u16>,
) -> Option<(u32, Backend, u16)> {
    let closing = packet.tcp_flags & (TCP_FIN | TCP_RST) != 0;
    if let Some(flow) = flow {
        if let Some(backend) = BACKENDS.get(flow.backend).copied() {
            // A SYN on a closed flow is a new connection reusing the
            // 4-tuple; on an open one, a retransmission that must stay.
            let reopened = packet.tcp_flags & TCP_SYN != 0 && flow.flags & FLOW_CLOSING != 0;
            if backend.flags & BACKEND_ALIVE != 0 && !reopened {
                if closing && flow.flags & FLOW_CLOSING == 0 {
                    let _ = FLOWS.insert(
                        packet.flow,
                        Flow {
                            flags: flow.flags | FLOW_CLOSING,
                            ..flow
                        },
                        0,
                    );
                    add_active(flow.backend, -1);
                }
                return Some((flow.backend, backend, flow.nat_port_be));
            }
            if backend.flags & BACKEND_ALIVE == 0 {
                if let Some(stats) = BACKEND_STATS.get_ptr_mut(flow.backend) {
                    // SAFETY: this CPU's slot, valid for this invocation.
                    unsafe { (*stats).moved_flows += 1 };
                }
            }
            if flow.flags & FLOW_CLOSING == 0 {
                add_active(flow.backend, -1);
            }
        }
    }
    let backend_id = schedule(packet, meta)?;
    let backend = BACKENDS.get(backend_id).copied()?;
    if backend.flags & BACKEND_ACTIVE == 0 {
        return None;
    }
    let nat_port_be = nat_port(backend_id, &backend)?;
    let flags = if closing { FLOW_CLOSING } else { 0 };
    let _ = FLOWS.insert(
        packet.flow,
        Flow {
            backend: backend_id,
            service: meta.service,
            flags,
            nat_port_be,
            _pad: 0,
        },
        0,
    );
    if !closing {
        add_active(backend_id, 1);
    }
    if let Some(stats) = BACKEND_STATS.get_ptr_mut(backend_id) {
        // SAFETY: this CPU's slot, valid for this invocation.
        unsafe { (*stats).new_flows += 1 };
    }
    if let Some(stats) = SVC_STATS.get_ptr_mut(meta.service) {
        // SAFETY: this CPU's slot, valid for this invocation.
        unsafe { (*stats).new_flows += 1 };
    }
    Some((backend_id, backend, nat_port_be))
}

#[inline(always)]
fn add_active(backend: u32, delta: i64) {
    if let Some(count) = ACTIVE_FLOWS.get_ptr_mut(backend) {
        // SAFETY: a valid array slot shared by all CPUs; the add is atomic
        // (BPF_ATOMIC_ADD). core's AtomicI64 has no fetch_add on this target
        // (it lacks compare-and-swap), hence the intrinsic.
        unsafe {
            core::intrinsics::atomic_xadd::<i64, i64, { core::intrinsics::AtomicOrdering::Relaxed }>(
                count, delta,
            )
        };
    }
}

/// Active flows of `backend` (never negative: a close may be seen for a
/// flow opened before the counters were reset).
#[inline(always)]
fn active_flows(backend: u32) -> u64 {
    ACTIVE_FLOWS.get(backend).copied().unwrap_or(0).max(0) as u64
}

#[inline(always)]
fn ring_slot(meta: &VipMeta, index: u32) -> Option<u32> {
    let slot = maglev_base(meta.service, meta.table_half & 1) + index % MAGLEV_TABLE_SIZE;
    let backend = *MAGLEV_RING.get(slot)?;
    (backend != NO_BACKEND).then_some(backend)
}

#[inline(always)]
fn schedule(packet: &Packet, meta: &VipMeta) -> Option<u32> {
    match meta.scheduler {
        SCHEDULER_SOURCE => ring_slot(meta, flow_hash(&packet.flow, true)),
        SCHEDULER_ROUNDROBIN => {
            let cursor = RR_CURSOR.get_ptr_mut(meta.service)?;
            // SAFETY: this CPU's slot, valid for this invocation.
            let position = unsafe {
                let position = *cursor;
                *cursor = position.wrapping_add(1) % MAGLEV_TABLE_SIZE;
                position
            };
            ring_slot(meta, position)
        }
        SCHEDULER_LEASTCONN => least_connections(meta),
        _ => ring_slot(meta, flow_hash(&packet.flow, false)),
    }
}

/// The active backend with the fewest active flows per unit of weight.
#[inline(always)]
fn least_connections(meta: &VipMeta) -> Option<u32> {
    let mut best: Option<(u32, u64, u64)> = None;
    let base = meta.service * MAX_BACKENDS_PER_SERVICE;
    for i in 0..MAX_BACKENDS_PER_SERVICE {
        if i >= meta.backend_count {
            break;
        }
        let Some(&id) = SVC_BACKENDS.get(base + i) else {
            break;
        };
        let Some(backend) = BACKENDS.get(id) else {
            continue;
        };
        if backend.flags & BACKEND_ACTIVE == 0 || backend.weight == 0 {
            continue;
        }
        let active = active_flows(id);
        let weight = u64::from(backend.weight);
        let better = match best {
            None => true,
            // active/weight < best_active/best_weight, without division.
            Some((_, best_active, best_weight)) => active * best_weight < best_active * weight,
        };
        if better {
            best = Some((id, active, weight));
        }
    }
    best.map(|(id, _, _)| id)
}
