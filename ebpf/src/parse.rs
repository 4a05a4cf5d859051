//! Bounds-checked header walk. Every access goes through [`ptr_at`], which
//! checks the whole header against `data_end` before the pointer exists, in
//! the form the verifier understands. Offsets stay bounded by construction
//! (IHL ≤ 15 words, at most two VLAN tags, at most `MAX_IPV6_EXTENSIONS`
//! extension headers of at most 2 KiB each), so the verifier can prove every
//! access.

use core::mem::size_of;

use aya_ebpf::programs::XdpContext;
use farol_common::{lb::FlowKey, MalformedReason};
use network_types::{
    arp::ArpHdr,
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
    tcp::TcpHdr,
    udp::UdpHdr,
    vlan::VlanHdr,
};

const ETH_P_IPV4: u16 = 0x0800;
const ETH_P_ARP: u16 = 0x0806;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;

const IPPROTO_HOPOPTS: u8 = 0;
const IPPROTO_ICMP: u8 = 1;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_ROUTING: u8 = 43;
const IPPROTO_FRAGMENT: u8 = 44;
const IPPROTO_AH: u8 = 51;
const IPPROTO_ICMPV6: u8 = 58;
const IPPROTO_DSTOPTS: u8 = 60;

/// VLAN tags walked before giving up (802.1ad outer + 802.1Q inner).
const MAX_VLAN_TAGS: usize = 2;
/// IPv6 extension headers walked before giving up; real traffic has 0-2.
const MAX_IPV6_EXTENSIONS: usize = 4;

/// The ICMP header's fixed part: type, code, checksum.
const ICMP_HEADER_LEN: usize = 4;
/// ARP for Ethernet/IPv4, the only kind on our LANs.
const ARP_LEN: usize = size_of::<ArpHdr>();

#[derive(Clone, Copy, Default, PartialEq, Eq)]
pub(crate) enum Network {
    /// Not parsed far enough to know.
    #[default]
    Unknown,
    NonIp,
    Arp,
    Ipv4,
    Ipv6,
}

#[derive(Clone, Copy, Default, PartialEq, Eq)]
pub(crate) enum Transport {
    #[default]
    None,
    Tcp,
    Udp,
    Icmp,
    Other,
    Fragment,
}

/// What the walk established so far; filled in layer by layer so that a
/// packet that breaks off late still counts under the layers it completed.
#[derive(Clone, Copy, Default)]
pub(crate) struct Packet {
    pub(crate) network: Network,
    pub(crate) transport: Transport,
    /// Where the network header starts (after any VLAN tags).
    pub(crate) l3_offset: usize,
    /// Where the transport header starts (valid once `transport` is set).
    pub(crate) l4_offset: usize,
    /// For TCP and UDP: the 5-tuple as it arrived (IPv4 mapped to IPv6).
    /// Ports and protocol are set by `classify`; the addresses only by
    /// [`fill_addresses`], once the packet may be for a VIP: copying them
    /// for every packet cost more than the rest of the parse.
    pub(crate) flow: FlowKey,
    /// TCP flags byte (FIN 0x01, SYN 0x02, RST 0x04, ACK 0x10), 0 otherwise.
    pub(crate) tcp_flags: u8,
}

const _: () = assert!(size_of::<Packet>() % 8 == 0);

impl Packet {
    /// Makes `slot` a packet with nothing established yet, as `Default`
    /// gives, but zeroed in place in word stores: LLVM merges the zeroing
    /// (or copy) of a whole `Packet` into a `memset`, which reaches the BPF
    /// program as a byte-at-a-time loop (about 300 instructions for every
    /// packet).
    #[inline(always)]
    pub(crate) fn zero(slot: &mut core::mem::MaybeUninit<Packet>) -> &mut Packet {
        let words = slot.as_mut_ptr() as *mut u64;
        for i in 0..size_of::<Packet>() / 8 {
            // SAFETY: in bounds of `slot` (size a multiple of 8, align 8);
            // volatile so the stores stay stores.
            unsafe { core::ptr::write_volatile(words.add(i), 0) };
        }
        // SAFETY: every byte is zero, which is `Packet::default()`: the
        // enums' first variants are 0, numbers and arrays zero.
        unsafe { slot.assume_init_mut() }
    }
}

pub(crate) const TCP_FIN: u8 = 0x01;
pub(crate) const TCP_SYN: u8 = 0x02;
pub(crate) const TCP_RST: u8 = 0x04;

/// ARP opcode for a request (RFC 826).
pub(crate) const ARP_REQUEST: u16 = 1;
/// ARP for Ethernet/IPv4: hardware type 1, protocol 0x0800, lengths 6 and 4.
pub(crate) const ARP_ETHERNET_IPV4: [u8; 6] = [0, 1, 0x08, 0x00, 6, 4];

/// Returns a pointer to a `T` at `offset`, or `None` if it would end past
/// the packet.
#[inline(always)]
fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Option<*const T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *const T)
}

/// Like [`ptr_at`], for rewriting the packet in place.
#[inline(always)]
pub(crate) fn ptr_at_mut<T>(ctx: &XdpContext, offset: usize) -> Option<*mut T> {
    ptr_at::<T>(ctx, offset).map(|ptr| ptr as *mut T)
}

/// Reads a `T` at `offset` (unaligned: headers after options or VLAN tags
/// sit at any offset).
#[inline(always)]
fn read_at<T: Copy>(ctx: &XdpContext, offset: usize) -> Option<T> {
    let ptr = ptr_at::<T>(ctx, offset)?;
    // SAFETY: ptr_at checked that size_of::<T>() bytes from ptr are inside
    // the packet; T is a plain header struct valid for any bit pattern.
    Some(unsafe { ptr.read_unaligned() })
}

/// Walks the headers, recording each completed layer in `packet`.
#[inline(always)]
pub(crate) fn classify(ctx: &XdpContext, packet: &mut Packet) -> Result<(), MalformedReason> {
    let (ether_type, l3_offset) = ethernet(ctx)?;
    packet.l3_offset = l3_offset;
    match ether_type {
        ETH_P_ARP => {
            ptr_at::<[u8; ARP_LEN]>(ctx, l3_offset).ok_or(MalformedReason::TruncatedArp)?;
            packet.network = Network::Arp;
            Ok(())
        }
        ETH_P_IPV4 => {
            let ip = ipv4(ctx, l3_offset)?;
            packet.network = Network::Ipv4;
            transport(ctx, packet, ip)
        }
        ETH_P_IPV6 => {
            let ip = ipv6(ctx, l3_offset)?;
            packet.network = Network::Ipv6;
            let ip = ipv6_extensions(ctx, ip)?;
            transport(ctx, packet, ip)
        }
        _ => {
            packet.network = Network::NonIp;
            Ok(())
        }
    }
}

/// Returns the ether type after any VLAN tags, and where layer 3 starts.
#[inline(always)]
fn ethernet(ctx: &XdpContext) -> Result<(u16, usize), MalformedReason> {
    let eth: EthHdr = read_at(ctx, 0).ok_or(MalformedReason::TruncatedEthernet)?;
    let mut ether_type = u16::from_be(eth.ether_type);
    let mut offset = EthHdr::LEN;
    for _ in 0..MAX_VLAN_TAGS {
        if ether_type != ETH_P_8021Q && ether_type != ETH_P_8021AD {
            return Ok((ether_type, offset));
        }
        let tag: VlanHdr = read_at(ctx, offset).ok_or(MalformedReason::BadVlan)?;
        ether_type = u16::from_be(tag.ether_type);
        offset += VlanHdr::LEN;
    }
    if ether_type == ETH_P_8021Q || ether_type == ETH_P_8021AD {
        return Err(MalformedReason::BadVlan);
    }
    Ok((ether_type, offset))
}

/// Where the transport header starts, where the IP payload ends (from the
/// IP length fields, not the frame: Ethernet pads short frames), and what
/// the transport is.
#[derive(Clone, Copy)]
struct IpPayload {
    offset: usize,
    end: usize,
    protocol: u8,
    /// A non-first fragment carries no transport header.
    later_fragment: bool,
}

/// The frame length, for checks against the IP length fields.
///
/// The volatile read hides where the value came from: otherwise LLVM
/// derives from `offset + len <= frame_len` that a later `ptr_at` check is
/// redundant and removes it, and the verifier, which only trusts checks
/// made on packet pointers, rejects the access.
#[inline(always)]
fn frame_len(ctx: &XdpContext) -> usize {
    let len = ctx.data_end() - ctx.data();
    // SAFETY: reading a local through a reference to it.
    unsafe { core::ptr::read_volatile(&len) }
}

#[inline(always)]
fn ipv4(ctx: &XdpContext, offset: usize) -> Result<IpPayload, MalformedReason> {
    let ip: Ipv4Hdr = read_at(ctx, offset).ok_or(MalformedReason::TruncatedIpv4)?;
    if ip.vihl >> 4 != 4 || ip.vihl & 0x0f < 5 {
        return Err(MalformedReason::BadIpv4Header);
    }
    let header_len = usize::from(ip.vihl & 0x0f) * 4;
    if offset + header_len > frame_len(ctx) {
        return Err(MalformedReason::TruncatedIpv4);
    }
    let total_len = usize::from(u16::from_be_bytes(ip.tot_len));
    if total_len < header_len || offset + total_len > frame_len(ctx) {
        return Err(MalformedReason::BadIpv4Length);
    }
    let fragment_offset = u16::from_be_bytes(ip.frags) & 0x1fff;
    Ok(IpPayload {
        offset: offset + header_len,
        end: offset + total_len,
        protocol: ip.proto,
        later_fragment: fragment_offset != 0,
    })
}

#[inline(always)]
fn ipv6(ctx: &XdpContext, offset: usize) -> Result<IpPayload, MalformedReason> {
    let ip: Ipv6Hdr = read_at(ctx, offset).ok_or(MalformedReason::TruncatedIpv6)?;
    if ip.vcf[0] >> 4 != 6 {
        return Err(MalformedReason::BadIpv6Header);
    }
    let end = offset + Ipv6Hdr::LEN + usize::from(u16::from_be_bytes(ip.payload_len));
    if end > frame_len(ctx) {
        return Err(MalformedReason::TruncatedIpv6);
    }
    Ok(IpPayload {
        offset: offset + Ipv6Hdr::LEN,
        end,
        protocol: ip.next_hdr,
        later_fragment: false,
    })
}

/// Walks the extension headers (RFC 8200 §4) to the transport header.
#[inline(always)]
fn ipv6_extensions(ctx: &XdpContext, mut payload: IpPayload) -> Result<IpPayload, MalformedReason> {
    for _ in 0..MAX_IPV6_EXTENSIONS {
        let len = match payload.protocol {
            IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS => {
                let [next, units]: [u8; 2] = read_extension(ctx, &payload)?;
                payload.protocol = next;
                (usize::from(units) + 1) * 8
            }
            // RFC 4302 §2.2: AH's length is in 4-byte units, minus 2.
            IPPROTO_AH => {
                let [next, units]: [u8; 2] = read_extension(ctx, &payload)?;
                payload.protocol = next;
                (usize::from(units) + 2) * 4
            }
            IPPROTO_FRAGMENT => {
                let fragment: [u8; 8] = read_extension(ctx, &payload)?;
                payload.protocol = fragment[0];
                let fragment_offset = u16::from_be_bytes([fragment[2], fragment[3]]) >> 3;
                payload.later_fragment = fragment_offset != 0;
                8
            }
            _ => return Ok(payload),
        };
        payload.offset += len;
        if payload.offset > payload.end {
            return Err(MalformedReason::BadIpv6Extension);
        }
    }
    match payload.protocol {
        IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS | IPPROTO_AH | IPPROTO_FRAGMENT => {
            Err(MalformedReason::BadIpv6Extension)
        }
        _ => Ok(payload),
    }
}

#[inline(always)]
fn read_extension<T: Copy>(ctx: &XdpContext, payload: &IpPayload) -> Result<T, MalformedReason> {
    if payload.offset + size_of::<T>() > payload.end {
        return Err(MalformedReason::BadIpv6Extension);
    }
    read_at(ctx, payload.offset).ok_or(MalformedReason::BadIpv6Extension)
}

#[inline(always)]
fn transport(ctx: &XdpContext, packet: &mut Packet, ip: IpPayload) -> Result<(), MalformedReason> {
    if ip.later_fragment {
        packet.transport = Transport::Fragment;
        return Ok(());
    }
    let room = ip.end - ip.offset;
    packet.l4_offset = ip.offset;
    match ip.protocol {
        IPPROTO_TCP => {
            let tcp: [u8; TcpHdr::LEN] =
                read_at(ctx, ip.offset).ok_or(MalformedReason::TruncatedTcp)?;
            if room < TcpHdr::LEN {
                return Err(MalformedReason::TruncatedTcp);
            }
            // RFC 9293 §3.1: the data offset is the high nibble of byte 12.
            let data_offset = usize::from(tcp[12] >> 4);
            if data_offset < 5 || data_offset * 4 > room {
                return Err(MalformedReason::BadTcpDataOffset);
            }
            packet.transport = Transport::Tcp;
            packet.tcp_flags = tcp[13];
            packet.flow.sport_be = u16::from_ne_bytes([tcp[0], tcp[1]]);
            packet.flow.dport_be = u16::from_ne_bytes([tcp[2], tcp[3]]);
            packet.flow.protocol = IPPROTO_TCP;
        }
        IPPROTO_UDP => {
            if room < UdpHdr::LEN {
                return Err(MalformedReason::TruncatedUdp);
            }
            let udp: [u8; UdpHdr::LEN] =
                read_at(ctx, ip.offset).ok_or(MalformedReason::TruncatedUdp)?;
            packet.transport = Transport::Udp;
            packet.flow.sport_be = u16::from_ne_bytes([udp[0], udp[1]]);
            packet.flow.dport_be = u16::from_ne_bytes([udp[2], udp[3]]);
            packet.flow.protocol = IPPROTO_UDP;
        }
        IPPROTO_ICMP | IPPROTO_ICMPV6 => {
            if room < ICMP_HEADER_LEN || ptr_at::<[u8; ICMP_HEADER_LEN]>(ctx, ip.offset).is_none() {
                return Err(MalformedReason::TruncatedIcmp);
            }
            packet.transport = Transport::Icmp;
        }
        _ => packet.transport = Transport::Other,
    }
    Ok(())
}

/// ICMP error types whose body quotes the packet that caused them
/// (RFC 792, RFC 4443): destination unreachable (fragmentation or packet
/// too big among them) and time exceeded.
const ICMP_UNREACHABLE: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMPV6_UNREACHABLE: u8 = 1;
const ICMPV6_PACKET_TOO_BIG: u8 = 2;
const ICMPV6_TIME_EXCEEDED: u8 = 3;
/// ICMP header before the quoted packet.
const ICMP_ERROR_HEADER: usize = 8;

/// For an ICMP error about a packet this node's VIP sent (a DSR backend's
/// reply), the flow it belongs to, in the client-to-VIP direction the
/// connection table uses. None for anything else.
#[inline(always)]
pub(crate) fn icmp_error_flow(ctx: &XdpContext, packet: &Packet) -> Option<FlowKey> {
    // Hidden from LLVM for the same reason as `frame_len`: the classify
    // pass checked this offset on another packet pointer, which the
    // verifier does not connect with these reads.
    // SAFETY: reading a field through a reference to it.
    let l4_offset = unsafe { core::ptr::read_volatile(&packet.l4_offset) };
    let header: [u8; 2] = read_at(ctx, l4_offset)?;
    let quoted = l4_offset + ICMP_ERROR_HEADER;
    let mut key = FlowKey::default();
    let l4 = match packet.network {
        Network::Ipv4 => {
            if header[0] != ICMP_UNREACHABLE && header[0] != ICMP_TIME_EXCEEDED {
                return None;
            }
            let inner: Ipv4Hdr = read_at(ctx, quoted)?;
            if inner.vihl >> 4 != 4 || inner.vihl & 0x0f < 5 {
                return None;
            }
            key.src[10] = 0xff;
            key.src[11] = 0xff;
            key.src[12..16].copy_from_slice(&inner.dst_addr);
            key.dst[10] = 0xff;
            key.dst[11] = 0xff;
            key.dst[12..16].copy_from_slice(&inner.src_addr);
            key.protocol = inner.proto;
            quoted + usize::from(inner.vihl & 0x0f) * 4
        }
        Network::Ipv6 => {
            if header[0] != ICMPV6_UNREACHABLE
                && header[0] != ICMPV6_PACKET_TOO_BIG
                && header[0] != ICMPV6_TIME_EXCEEDED
            {
                return None;
            }
            let inner: Ipv6Hdr = read_at(ctx, quoted)?;
            key.src = inner.dst_addr;
            key.dst = inner.src_addr;
            key.protocol = inner.next_hdr;
            quoted + Ipv6Hdr::LEN
        }
        _ => return None,
    };
    if key.protocol != IPPROTO_TCP && key.protocol != IPPROTO_UDP {
        return None;
    }
    // The quoted packet went VIP -> client: its source port is the VIP's.
    let ports: [u8; 4] = read_at(ctx, l4)?;
    key.sport_be = u16::from_ne_bytes([ports[2], ports[3]]);
    key.dport_be = u16::from_ne_bytes([ports[0], ports[1]]);
    Some(key)
}

/// The IPv4 destination as it sits in the header, for the cheap VIP test.
#[inline(always)]
pub(crate) fn ipv4_destination(ctx: &XdpContext, packet: &Packet) -> Option<[u8; 4]> {
    // SAFETY: reading a field through a reference to it (see frame_len).
    let l3 = unsafe { core::ptr::read_volatile(&packet.l3_offset) };
    read_at(ctx, l3 + 16)
}

/// Copies source and destination into `packet.flow` (IPv4 mapped).
#[inline(always)]
pub(crate) fn fill_addresses(ctx: &XdpContext, packet: &mut Packet) -> Option<()> {
    // SAFETY: reading a field through a reference to it (see frame_len).
    let l3 = unsafe { core::ptr::read_volatile(&packet.l3_offset) };
    match packet.network {
        Network::Ipv4 => {
            let addresses: [u8; 8] = read_at(ctx, l3 + 12)?;
            packet.flow.src[10] = 0xff;
            packet.flow.src[11] = 0xff;
            packet.flow.src[12..16].copy_from_slice(&addresses[0..4]);
            packet.flow.dst[10] = 0xff;
            packet.flow.dst[11] = 0xff;
            packet.flow.dst[12..16].copy_from_slice(&addresses[4..8]);
        }
        Network::Ipv6 => {
            let header: Ipv6Hdr = read_at(ctx, l3)?;
            packet.flow.src = header.src_addr;
            packet.flow.dst = header.dst_addr;
        }
        _ => return None,
    }
    Some(())
}
