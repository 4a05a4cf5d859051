//! Frames for BPF_PROG_TEST_RUN tests and the per-packet benchmark.
//! Well-formed frames come from etherparse; malformed ones are well-formed
//! frames with one field broken, so each fixture breaks exactly one rule.
//! Addresses have roles: [`CLIENT`] talks to [`VIP`].

use etherparse::{
    ArpHardwareId, ArpOperation, ArpPacket, EtherType, PacketBuilder, PacketBuilderStep, VlanId,
};

pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
pub const NODE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x11];
pub const CLIENT: [u8; 4] = [192, 0, 2, 2];
pub const VIP: [u8; 4] = [192, 0, 2, 100];
pub const CLIENT6: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
pub const VIP6: [u8; 16] = [
    0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x64,
];
pub const CLIENT_PORT: u16 = 40000;
pub const HTTP_PORT: u16 = 80;

const ETHERNET_LEN: usize = 14;
/// Offset of the IPv4/IPv6 header in an untagged frame.
pub const L3: usize = ETHERNET_LEN;
/// Offset of the transport header after an option-less IPv4 header.
pub const L4_V4: usize = ETHERNET_LEN + 20;
/// Offset of the transport header after a bare IPv6 header.
pub const L4_V6: usize = ETHERNET_LEN + 40;

const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_VRRP: u8 = 112;
const IPPROTO_HOPOPTS: u8 = 0;
const IPPROTO_DSTOPTS: u8 = 60;
const IPPROTO_FRAGMENT: u8 = 44;

fn ethernet() -> PacketBuilderStep<etherparse::Ethernet2Header> {
    PacketBuilder::ethernet2(CLIENT_MAC, NODE_MAC)
}

fn finish<T>(step: PacketBuilderStep<T>, payload: &[u8]) -> Vec<u8>
where
    PacketBuilderStep<T>: Writable,
{
    step.write_frame(payload)
}

/// The builder's last step, whatever the transport.
pub trait Writable {
    fn write_frame(self, payload: &[u8]) -> Vec<u8>;
}

macro_rules! writable {
    ($($header:ty),*) => {$(
        impl Writable for PacketBuilderStep<$header> {
            fn write_frame(self, payload: &[u8]) -> Vec<u8> {
                let mut frame = Vec::with_capacity(self.size(payload.len()));
                self.write(&mut frame, payload).expect("writing to a Vec cannot fail");
                frame
            }
        }
    )*};
}
writable!(
    etherparse::TcpHeader,
    etherparse::UdpHeader,
    etherparse::Icmpv4Header,
    etherparse::Icmpv6Header
);

/// TCP SYN from the client to the VIP's port 80.
pub fn tcp_syn_v4() -> Vec<u8> {
    finish(
        ethernet()
            .ipv4(CLIENT, VIP, 64)
            .tcp(CLIENT_PORT, HTTP_PORT, 1000, 64240)
            .syn(),
        &[],
    )
}

/// An established flow's data segment: ACK + PSH with an HTTP request.
pub fn tcp_established_v4() -> Vec<u8> {
    finish(
        ethernet()
            .ipv4(CLIENT, VIP, 64)
            .tcp(CLIENT_PORT, HTTP_PORT, 1001, 64240)
            .ack(5001)
            .psh(),
        b"GET / HTTP/1.1\r\nHost: vip\r\n\r\n",
    )
}

pub fn udp_v4() -> Vec<u8> {
    finish(
        ethernet().ipv4(CLIENT, VIP, 64).udp(CLIENT_PORT, 53),
        b"query",
    )
}

/// A UDP datagram so short that Ethernet pads the frame to 60 bytes: the
/// IP total length, not the frame, says where the packet ends.
pub fn udp_v4_padded() -> Vec<u8> {
    let mut frame = finish(ethernet().ipv4(CLIENT, VIP, 64).udp(CLIENT_PORT, 53), b"x");
    frame.resize(60, 0);
    frame
}

pub fn icmp_echo_v4() -> Vec<u8> {
    finish(
        ethernet().ipv4(CLIENT, VIP, 64).icmpv4_echo_request(1, 1),
        b"ping",
    )
}

/// IPv4 with 8 bytes of options (IHL 7) carrying TCP.
pub fn tcp_v4_with_options() -> Vec<u8> {
    let mut frame = tcp_syn_v4();
    let options = [0x94, 0x04, 0x00, 0x00, 0x01, 0x01, 0x01, 0x00]; // router alert, NOP x3, EOL
    frame.splice(L4_V4..L4_V4, options);
    frame[L3] = 0x47;
    let total = (frame.len() - L3) as u16;
    set_ipv4_total_length(&mut frame, total);
    frame
}

/// An IP packet whose transport is neither TCP, UDP nor ICMP (VRRP).
pub fn vrrp_v4() -> Vec<u8> {
    let mut frame = udp_v4();
    frame[L3 + 9] = IPPROTO_VRRP;
    frame
}

/// A non-first IPv4 fragment (offset 185 × 8 bytes).
pub fn later_fragment_v4() -> Vec<u8> {
    let mut frame = udp_v4();
    frame[L3 + 6] = 0x00;
    frame[L3 + 7] = 185;
    frame
}

/// ARP who-has VIP from the client.
pub fn arp_request() -> Vec<u8> {
    let arp = ArpPacket::new(
        ArpHardwareId::ETHERNET,
        EtherType::IPV4,
        ArpOperation::REQUEST,
        &CLIENT_MAC,
        &CLIENT,
        &[0; 6],
        &VIP,
    )
    .expect("valid Ethernet/IPv4 ARP");
    let mut frame = Vec::new();
    frame.extend_from_slice(&[0xff; 6]);
    frame.extend_from_slice(&CLIENT_MAC);
    frame.extend_from_slice(&0x0806u16.to_be_bytes());
    frame.extend_from_slice(&arp.to_bytes());
    frame
}

/// LLDP: neither IP nor ARP.
pub fn lldp() -> Vec<u8> {
    let mut frame = Vec::new();
    frame.extend_from_slice(&[0x01, 0x80, 0xc2, 0, 0, 0x0e]);
    frame.extend_from_slice(&CLIENT_MAC);
    frame.extend_from_slice(&0x88ccu16.to_be_bytes());
    frame.extend_from_slice(&[0x02, 0x07, 0x04, 0x02, 0, 0, 0, 0, 0x02, 0, 0]);
    frame
}

pub fn tcp_syn_v4_vlan() -> Vec<u8> {
    finish(
        ethernet()
            .single_vlan(VlanId::try_new(10).expect("valid VLAN id"))
            .ipv4(CLIENT, VIP, 64)
            .tcp(CLIENT_PORT, HTTP_PORT, 1000, 64240)
            .syn(),
        &[],
    )
}

/// 802.1ad outer tag + 802.1Q inner tag.
pub fn udp_v4_qinq() -> Vec<u8> {
    finish(
        ethernet()
            .double_vlan(
                VlanId::try_new(100).expect("valid VLAN id"),
                VlanId::try_new(10).expect("valid VLAN id"),
            )
            .ipv4(CLIENT, VIP, 64)
            .udp(CLIENT_PORT, 53),
        b"query",
    )
}

pub fn tcp_syn_v6() -> Vec<u8> {
    finish(
        ethernet()
            .ipv6(CLIENT6, VIP6, 64)
            .tcp(CLIENT_PORT, HTTP_PORT, 1000, 64240)
            .syn(),
        &[],
    )
}

pub fn udp_v6() -> Vec<u8> {
    finish(
        ethernet().ipv6(CLIENT6, VIP6, 64).udp(CLIENT_PORT, 53),
        b"query",
    )
}

pub fn icmp_echo_v6() -> Vec<u8> {
    finish(
        ethernet().ipv6(CLIENT6, VIP6, 64).icmpv6_echo_request(1, 1),
        b"ping",
    )
}

/// IPv6 with `extensions` (each a next-header value and its 8-byte body)
/// inserted before the transport header of `frame`.
fn with_ipv6_extensions(mut frame: Vec<u8>, extensions: &[(u8, [u8; 8])]) -> Vec<u8> {
    let transport = frame[L3 + 6];
    let mut chain = Vec::new();
    for (index, (_, body)) in extensions.iter().enumerate() {
        let mut header = *body;
        header[0] = extensions.get(index + 1).map_or(transport, |next| next.0);
        chain.extend_from_slice(&header);
    }
    frame[L3 + 6] = extensions.first().map_or(transport, |first| first.0);
    frame.splice(L4_V6..L4_V6, chain);
    let payload_len = (frame.len() - L4_V6) as u16;
    frame[L3 + 4..L3 + 6].copy_from_slice(&payload_len.to_be_bytes());
    frame
}

/// Hop-by-hop options (a PadN) then destination options, then TCP.
pub fn tcp_v6_with_extensions() -> Vec<u8> {
    let pad = [0, 0, 0x01, 0x04, 0, 0, 0, 0];
    with_ipv6_extensions(
        tcp_syn_v6(),
        &[(IPPROTO_HOPOPTS, pad), (IPPROTO_DSTOPTS, pad)],
    )
}

/// The first fragment of a UDP datagram (offset 0, more fragments).
pub fn first_fragment_v6() -> Vec<u8> {
    with_ipv6_extensions(
        udp_v6(),
        &[(IPPROTO_FRAGMENT, [0, 0, 0x00, 0x01, 0, 0, 0, 7])],
    )
}

/// A non-first fragment (offset 64 × 8 bytes): no transport header.
pub fn later_fragment_v6() -> Vec<u8> {
    with_ipv6_extensions(
        udp_v6(),
        &[(IPPROTO_FRAGMENT, [0, 0, 0x02, 0x00, 0, 0, 0, 7])],
    )
}

/// More extension headers than the program walks.
pub fn ipv6_extension_chain_too_long() -> Vec<u8> {
    let pad = [0, 0, 0x01, 0x04, 0, 0, 0, 0];
    with_ipv6_extensions(tcp_syn_v6(), &[(IPPROTO_DSTOPTS, pad); 5])
}

/// An extension header whose length runs past the payload.
pub fn ipv6_extension_truncated() -> Vec<u8> {
    let mut frame = with_ipv6_extensions(
        udp_v6(),
        &[(IPPROTO_DSTOPTS, [0, 0, 0x01, 0x04, 0, 0, 0, 0])],
    );
    frame[L4_V6 + 1] = 200; // (200 + 1) × 8 bytes
    frame
}

pub fn set_ipv4_total_length(frame: &mut [u8], length: u16) {
    frame[L3 + 2..L3 + 4].copy_from_slice(&length.to_be_bytes());
}

/// Frames with UDP as transport protocol, for TCP/UDP protocol swaps.
pub fn with_ipv4_protocol(mut frame: Vec<u8>, protocol: u8) -> Vec<u8> {
    frame[L3 + 9] = protocol;
    frame
}

/// An IPv4 frame cut to `l4_bytes` bytes of transport header, with the IP
/// total length made consistent so only the transport is short.
pub fn ipv4_with_short_transport(frame: Vec<u8>, l4_bytes: usize) -> Vec<u8> {
    let mut frame = frame;
    frame.truncate(L4_V4 + l4_bytes);
    let total = (frame.len() - L3) as u16;
    set_ipv4_total_length(&mut frame, total);
    frame
}

pub const PROTO_TCP: u8 = IPPROTO_TCP;
pub const PROTO_UDP: u8 = IPPROTO_UDP;
