//! Counter indices shared by the kernel program and the metrics exporter.

/// What a packet is, for the per-class counters in
/// [`crate::maps::MAP_PACKET_STATS`].
///
/// A packet is counted once at each layer it has: an IPv4 TCP segment counts
/// under `Ipv4` and `Tcp`; an ARP frame under `Arp` only; a frame that breaks
/// off early counts under the classes it completed and then `Malformed`.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PacketClass {
    /// Neither IPv4, IPv6 nor ARP (e.g. LLDP, STP, IPX).
    NonIp = 0,
    Arp = 1,
    Ipv4 = 2,
    Ipv6 = 3,
    Tcp = 4,
    Udp = 5,
    /// ICMP and ICMPv6.
    Icmp = 6,
    /// An IP packet whose transport is none of TCP, UDP, ICMP (e.g. VRRP, GRE).
    OtherTransport = 7,
    /// A non-first IP fragment: it has no transport header to classify.
    Fragment = 8,
    /// Truncated or inconsistent headers; the reason is in `MALFORMED`.
    Malformed = 9,
}

impl PacketClass {
    pub const COUNT: u32 = 10;

    pub const ALL: [PacketClass; Self::COUNT as usize] = [
        PacketClass::NonIp,
        PacketClass::Arp,
        PacketClass::Ipv4,
        PacketClass::Ipv6,
        PacketClass::Tcp,
        PacketClass::Udp,
        PacketClass::Icmp,
        PacketClass::OtherTransport,
        PacketClass::Fragment,
        PacketClass::Malformed,
    ];

    /// The metric label value.
    pub const fn label(self) -> &'static str {
        match self {
            PacketClass::NonIp => "non_ip",
            PacketClass::Arp => "arp",
            PacketClass::Ipv4 => "ipv4",
            PacketClass::Ipv6 => "ipv6",
            PacketClass::Tcp => "tcp",
            PacketClass::Udp => "udp",
            PacketClass::Icmp => "icmp",
            PacketClass::OtherTransport => "other_transport",
            PacketClass::Fragment => "fragment",
            PacketClass::Malformed => "malformed",
        }
    }
}

/// Why a packet counted as malformed; index into
/// [`crate::maps::MAP_MALFORMED`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum MalformedReason {
    /// Shorter than an Ethernet header (14 bytes).
    TruncatedEthernet = 0,
    /// A VLAN tag (802.1Q/802.1ad) cut short, or more tags than we walk.
    BadVlan = 1,
    /// Shorter than an Ethernet/IPv4 ARP packet (28 bytes).
    TruncatedArp = 2,
    /// Shorter than the 20-byte IPv4 header, or than the header its IHL says.
    TruncatedIpv4 = 3,
    /// IPv4 version not 4 or IHL below 5.
    BadIpv4Header = 4,
    /// IPv4 total length below the header length or beyond the frame.
    BadIpv4Length = 5,
    /// Shorter than the 40-byte IPv6 header, or payload length beyond the frame.
    TruncatedIpv6 = 6,
    /// IPv6 version field not 6.
    BadIpv6Header = 7,
    /// An IPv6 extension header cut short, or a chain longer than we walk.
    BadIpv6Extension = 8,
    /// Shorter than the 20-byte TCP header.
    TruncatedTcp = 9,
    /// TCP data offset below 5 or past the end of the packet.
    BadTcpDataOffset = 10,
    /// Shorter than the 8-byte UDP header.
    TruncatedUdp = 11,
    /// Shorter than the 4-byte ICMP header.
    TruncatedIcmp = 12,
}

impl MalformedReason {
    pub const COUNT: u32 = 13;

    pub const ALL: [MalformedReason; Self::COUNT as usize] = [
        MalformedReason::TruncatedEthernet,
        MalformedReason::BadVlan,
        MalformedReason::TruncatedArp,
        MalformedReason::TruncatedIpv4,
        MalformedReason::BadIpv4Header,
        MalformedReason::BadIpv4Length,
        MalformedReason::TruncatedIpv6,
        MalformedReason::BadIpv6Header,
        MalformedReason::BadIpv6Extension,
        MalformedReason::TruncatedTcp,
        MalformedReason::BadTcpDataOffset,
        MalformedReason::TruncatedUdp,
        MalformedReason::TruncatedIcmp,
    ];

    /// The metric label value.
    pub const fn label(self) -> &'static str {
        match self {
            MalformedReason::TruncatedEthernet => "truncated_ethernet",
            MalformedReason::BadVlan => "bad_vlan",
            MalformedReason::TruncatedArp => "truncated_arp",
            MalformedReason::TruncatedIpv4 => "truncated_ipv4",
            MalformedReason::BadIpv4Header => "bad_ipv4_header",
            MalformedReason::BadIpv4Length => "bad_ipv4_length",
            MalformedReason::TruncatedIpv6 => "truncated_ipv6",
            MalformedReason::BadIpv6Header => "bad_ipv6_header",
            MalformedReason::BadIpv6Extension => "bad_ipv6_extension",
            MalformedReason::TruncatedTcp => "truncated_tcp",
            MalformedReason::BadTcpDataOffset => "bad_tcp_data_offset",
            MalformedReason::TruncatedUdp => "truncated_udp",
            MalformedReason::TruncatedIcmp => "truncated_icmp",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn class_table_matches_discriminants() {
        for (index, class) in PacketClass::ALL.iter().enumerate() {
            assert_eq!(*class as usize, index, "{class:?} is out of place in ALL");
        }
    }

    #[test]
    fn malformed_table_matches_discriminants() {
        for (index, reason) in MalformedReason::ALL.iter().enumerate() {
            assert_eq!(*reason as usize, index, "{reason:?} is out of place in ALL");
        }
    }
}
