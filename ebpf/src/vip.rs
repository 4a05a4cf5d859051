//! VIP ownership on the wire: this node answers ARP for the VIPs it holds
//! (the backends hold them on `lo` with ARP suppressed, so only the owner
//! answers), and passes everything else.

use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use farol_common::lb::ipv4_mapped;

use crate::{
    maps::{LB_CONFIG, OWNED_VIPS},
    parse::{self, ARP_ETHERNET_IPV4, ARP_REQUEST},
};

/// Ethernet (14) + Ethernet/IPv4 ARP (28).
const ARP_FRAME_AFTER_L3: usize = 28;

/// Answers an ARP request for an owned VIP in place (XDP_TX); passes
/// anything else.
#[inline(always)]
pub(crate) fn answer_arp(ctx: &XdpContext, l3: usize) -> u32 {
    let Some(arp) = parse::ptr_at_mut::<[u8; ARP_FRAME_AFTER_L3]>(ctx, l3) else {
        return xdp_action::XDP_PASS;
    };
    let Some(eth) = parse::ptr_at_mut::<[u8; 12]>(ctx, 0) else {
        return xdp_action::XDP_PASS;
    };
    // SAFETY: both pointers were bounds-checked against data_end just above;
    // the two regions do not overlap (Ethernet addresses vs the ARP body).
    let (arp, eth) = unsafe { (&mut *arp, &mut *eth) };
    if arp[0..6] != ARP_ETHERNET_IPV4 || u16::from_be_bytes([arp[6], arp[7]]) != ARP_REQUEST {
        return xdp_action::XDP_PASS;
    }
    let target = [arp[24], arp[25], arp[26], arp[27]];
    let Some(config) = LB_CONFIG.get(0) else {
        return xdp_action::XDP_PASS;
    };
    // Most ARP traffic is for node addresses: leave before the hash lookup.
    if !crate::balance::is_vip(&ipv4_mapped(target), config) {
        return xdp_action::XDP_PASS;
    }
    // SAFETY: the value is read, not kept; the agent only writes whole entries.
    if unsafe { OWNED_VIPS.get(ipv4_mapped(target)) }.is_none() {
        return xdp_action::XDP_PASS;
    }
    let local_mac = config.local_mac;
    // RFC 826 reply: swap sender and target, our MAC as the sender's.
    let requester_mac = [arp[8], arp[9], arp[10], arp[11], arp[12], arp[13]];
    let requester_ip = [arp[14], arp[15], arp[16], arp[17]];
    arp[7] = 2;
    arp[8..14].copy_from_slice(&local_mac);
    arp[14..18].copy_from_slice(&target);
    arp[18..24].copy_from_slice(&requester_mac);
    arp[24..28].copy_from_slice(&requester_ip);
    eth[0..6].copy_from_slice(&requester_mac);
    eth[6..12].copy_from_slice(&local_mac);
    xdp_action::XDP_TX
}
