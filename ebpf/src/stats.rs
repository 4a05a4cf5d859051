//! Per-CPU counters. Per-CPU slots need no atomics: one CPU runs one
//! program invocation at a time and owns its slot.

use farol_common::{MalformedReason, PacketClass, PacketStats};

use crate::{
    maps::{MALFORMED, PACKET_STATS},
    parse::{Network, Packet, Transport},
};

#[inline(always)]
fn add(slot: Option<*mut PacketStats>, bytes: u64) {
    if let Some(slot) = slot {
        // SAFETY: the pointer comes from a successful map lookup of this
        // CPU's slot; it is valid and exclusive for this invocation.
        unsafe {
            (*slot).packets += 1;
            (*slot).bytes += bytes;
        }
    }
}

#[inline(always)]
fn count_class(class: PacketClass, bytes: u64) {
    add(PACKET_STATS.get_ptr_mut(class as u32), bytes);
}

/// Counts a packet under every class it completed.
#[inline(always)]
pub(crate) fn count_packet(packet: &Packet, bytes: u64) {
    match packet.network {
        Network::Unknown => {}
        Network::NonIp => count_class(PacketClass::NonIp, bytes),
        Network::Arp => count_class(PacketClass::Arp, bytes),
        Network::Ipv4 => count_class(PacketClass::Ipv4, bytes),
        Network::Ipv6 => count_class(PacketClass::Ipv6, bytes),
    }
    match packet.transport {
        Transport::None => {}
        Transport::Tcp => count_class(PacketClass::Tcp, bytes),
        Transport::Udp => count_class(PacketClass::Udp, bytes),
        Transport::Icmp => count_class(PacketClass::Icmp, bytes),
        Transport::Other => count_class(PacketClass::OtherTransport, bytes),
        Transport::Fragment => count_class(PacketClass::Fragment, bytes),
    }
}

/// Counts a malformed packet: once under `Malformed`, once under its reason.
#[inline(always)]
pub(crate) fn count_malformed(reason: MalformedReason, bytes: u64) {
    count_class(PacketClass::Malformed, bytes);
    add(MALFORMED.get_ptr_mut(reason as u32), bytes);
}
