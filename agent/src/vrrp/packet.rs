//! VRRPv3 advertisements for IPv4 (RFC 5798 §5): the codec and the checks a
//! received packet must pass before the state machine sees it.
//!
//! Owns the bytes only: which VRIDs and addresses are expected is the
//! instance's business (`mod.rs`), what an advert means is `fsm.rs`'s.

use std::{net::Ipv4Addr, time::Duration};

/// IP protocol number of VRRP (RFC 5798 §5.1.1.4).
pub const VRRP_PROTOCOL: u8 = 112;
/// The multicast group adverts go to (RFC 5798 §5.1.1.2).
pub const VRRP_MULTICAST: Ipv4Addr = Ipv4Addr::new(224, 0, 0, 18);
/// Sent and required on receipt: a packet that crossed a router is not
/// from our LAN (RFC 5798 §5.1.1.3, §7.1).
pub const VRRP_TTL: u8 = 255;
/// Version 3, type 1 (ADVERTISEMENT) in the first byte (RFC 5798 §5.2.1-2).
const VERSION: u8 = 3;
const TYPE_ADVERTISEMENT: u8 = 1;
/// Version/type, VRID, priority, count, interval, checksum.
const FIXED_LEN: usize = 8;
const IPV4_HEADER_MIN: usize = 20;
/// The interval field has 12 bits of centiseconds (RFC 5798 §5.2.7).
pub const MAX_INTERVAL_CS: u16 = 0x0fff;

/// One advertisement as carried on the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Advert {
    pub vrid: u8,
    /// 0: the master stops; 255: the address owner (RFC 5798 §5.2.4).
    pub priority: u8,
    /// Max Adver Int in centiseconds, 1..=4095.
    pub interval_cs: u16,
    pub addresses: Vec<Ipv4Addr>,
}

/// Why a received packet was dropped; each is a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DropReason {
    /// Shorter than an IPv4 header or than its own length fields.
    Truncated,
    /// Not IPv4, not protocol 112, or a fragment.
    IpHeader,
    /// TTL other than 255: it crossed a router.
    Ttl,
    /// VRRP version other than 3 (keepalived's default is version 2).
    Version,
    /// Type other than ADVERTISEMENT.
    Type,
    /// The checksum over the pseudo-header and message does not add up.
    Checksum,
    /// The count field disagrees with the packet length or the config.
    AddressCount,
    /// An advert interval of 0.
    Interval,
    /// A VRID no instance on this interface runs.
    Vrid,
    /// Addresses other than the instance's VIPs.
    AddressList,
    /// Unicast mode: the sender is not a configured peer.
    UnknownPeer,
}

impl DropReason {
    pub const ALL: [DropReason; 11] = [
        DropReason::Truncated,
        DropReason::IpHeader,
        DropReason::Ttl,
        DropReason::Version,
        DropReason::Type,
        DropReason::Checksum,
        DropReason::AddressCount,
        DropReason::Interval,
        DropReason::Vrid,
        DropReason::AddressList,
        DropReason::UnknownPeer,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::Truncated => "truncated",
            DropReason::IpHeader => "ip_header",
            DropReason::Ttl => "ttl",
            DropReason::Version => "version",
            DropReason::Type => "type",
            DropReason::Checksum => "checksum",
            DropReason::AddressCount => "address_count",
            DropReason::Interval => "interval",
            DropReason::Vrid => "vrid",
            DropReason::AddressList => "address_list",
            DropReason::UnknownPeer => "unknown_peer",
        }
    }
}

/// A received advert with the IP fields the checks and the election need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    pub source: Ipv4Addr,
    pub destination: Ipv4Addr,
    pub advert: Advert,
}

impl Advert {
    pub fn interval(&self) -> Duration {
        Duration::from_millis(u64::from(self.interval_cs) * 10)
    }

    /// The VRRP message (no IP header), checksummed for `source` ->
    /// `destination`.
    pub fn encode(&self, source: Ipv4Addr, destination: Ipv4Addr) -> Vec<u8> {
        let mut out = Vec::with_capacity(FIXED_LEN + 4 * self.addresses.len());
        out.push((VERSION << 4) | TYPE_ADVERTISEMENT);
        out.push(self.vrid);
        out.push(self.priority);
        // The config allows at most 255 VIPs per instance (checked there).
        out.push(self.addresses.len().min(255) as u8);
        out.extend_from_slice(&(self.interval_cs & MAX_INTERVAL_CS).to_be_bytes());
        out.extend_from_slice(&[0, 0]);
        for address in self.addresses.iter().take(255) {
            out.extend_from_slice(&address.octets());
        }
        let checksum = checksum(source, destination, &out);
        out[6..8].copy_from_slice(&checksum.to_be_bytes());
        out
    }

    /// The whole IPv4 packet as sent with IP_HDRINCL: TTL 255, DSCP CS6
    /// (network control, as keepalived sends); the kernel fills the id and
    /// the header checksum.
    pub fn encode_ip(&self, source: Ipv4Addr, destination: Ipv4Addr) -> Vec<u8> {
        let payload = self.encode(source, destination);
        let total = (IPV4_HEADER_MIN + payload.len()) as u16;
        let mut out = Vec::with_capacity(total as usize);
        out.extend_from_slice(&[0x45, 0xc0]);
        out.extend_from_slice(&total.to_be_bytes());
        out.extend_from_slice(&[0, 0, 0, 0, VRRP_TTL, VRRP_PROTOCOL, 0, 0]);
        out.extend_from_slice(&source.octets());
        out.extend_from_slice(&destination.octets());
        out.extend_from_slice(&payload);
        out
    }

    /// Parses a VRRP message received from `source` to `destination`,
    /// checking version, type, length against the count, interval and the
    /// checksum (RFC 5798 §7.1).
    pub fn decode(
        message: &[u8],
        source: Ipv4Addr,
        destination: Ipv4Addr,
    ) -> Result<Advert, DropReason> {
        if message.len() < FIXED_LEN {
            return Err(DropReason::Truncated);
        }
        if message[0] >> 4 != VERSION {
            return Err(DropReason::Version);
        }
        if message[0] & 0x0f != TYPE_ADVERTISEMENT {
            return Err(DropReason::Type);
        }
        let count = usize::from(message[3]);
        if message.len() != FIXED_LEN + 4 * count {
            return Err(DropReason::AddressCount);
        }
        if checksum(source, destination, message) != 0 {
            return Err(DropReason::Checksum);
        }
        let interval_cs = u16::from_be_bytes([message[4], message[5]]) & MAX_INTERVAL_CS;
        if interval_cs == 0 {
            return Err(DropReason::Interval);
        }
        let addresses = message[FIXED_LEN..]
            .chunks_exact(4)
            .map(|chunk| Ipv4Addr::new(chunk[0], chunk[1], chunk[2], chunk[3]))
            .collect();
        Ok(Advert {
            vrid: message[1],
            priority: message[2],
            interval_cs,
            addresses,
        })
    }
}

/// Parses what a raw IPv4 socket hands over: IP header, then VRRP.
pub fn decode_ip(packet: &[u8]) -> Result<Received, DropReason> {
    if packet.len() < IPV4_HEADER_MIN {
        return Err(DropReason::Truncated);
    }
    if packet[0] >> 4 != 4 {
        return Err(DropReason::IpHeader);
    }
    let header_len = usize::from(packet[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([packet[2], packet[3]]));
    if header_len < IPV4_HEADER_MIN || total < header_len || packet.len() < total {
        return Err(DropReason::Truncated);
    }
    // More-fragments flag or an offset: VRRP adverts are never fragmented.
    let fragment = u16::from_be_bytes([packet[6], packet[7]]) & 0x3fff;
    if packet[9] != VRRP_PROTOCOL || fragment != 0 {
        return Err(DropReason::IpHeader);
    }
    if packet[8] != VRRP_TTL {
        return Err(DropReason::Ttl);
    }
    let source = Ipv4Addr::new(packet[12], packet[13], packet[14], packet[15]);
    let destination = Ipv4Addr::new(packet[16], packet[17], packet[18], packet[19]);
    let advert = Advert::decode(&packet[header_len..total], source, destination)?;
    Ok(Received {
        source,
        destination,
        advert,
    })
}

/// RFC 5798 §5.2.8: the Internet checksum over an IPv4 pseudo-header
/// (source, destination, zero, protocol, VRRP length; as RFC 2460 §8.1 does
/// for IPv6, and keepalived does by default) and the message. Over a
/// message whose checksum field is filled, a valid one yields 0.
pub fn checksum(source: Ipv4Addr, destination: Ipv4Addr, message: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    let mut add = |bytes: &[u8]| {
        for pair in bytes.chunks(2) {
            let word = u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]);
            sum += u32::from(word);
        }
    };
    add(&source.octets());
    add(&destination.octets());
    add(&[0, VRRP_PROTOCOL]);
    add(&(message.len() as u16).to_be_bytes());
    add(message);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const MASTER: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 11);
    const VIP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 100);

    fn advert() -> Advert {
        Advert {
            vrid: 51,
            priority: 150,
            interval_cs: 1,
            addresses: vec![VIP],
        }
    }

    #[test]
    fn encodes_the_rfc_layout_with_a_pseudo_header_checksum() {
        let bytes = advert().encode(MASTER, VRRP_MULTICAST);
        assert_eq!(&bytes[..6], &[0x31, 51, 150, 1, 0x00, 0x01]);
        assert_eq!(&bytes[8..], &VIP.octets());
        // Recomputed by hand: words of the pseudo-header and the message.
        let words: u32 = [
            0xc000u32, 0x020b, 0xe000, 0x0012, 0x0070, 12, 0x3133, 0x9601, 0x0001, 0xc000, 0x0264,
        ]
        .iter()
        .sum();
        let folded = (words & 0xffff) + (words >> 16);
        assert_eq!(
            u16::from_be_bytes([bytes[6], bytes[7]]),
            !(folded as u16),
            "checksum"
        );
    }

    #[test]
    fn round_trips_through_an_ip_packet() {
        let packet = advert().encode_ip(MASTER, VRRP_MULTICAST);
        assert_eq!(packet[8], 255, "TTL");
        let received = decode_ip(&packet).unwrap();
        assert_eq!(received.source, MASTER);
        assert_eq!(received.destination, VRRP_MULTICAST);
        assert_eq!(received.advert, advert());
    }

    #[test]
    fn the_checksum_covers_the_addresses_of_the_pseudo_header() {
        let bytes = advert().encode(MASTER, VRRP_MULTICAST);
        let unicast = Ipv4Addr::new(192, 0, 2, 12);
        assert_eq!(
            Advert::decode(&bytes, MASTER, unicast),
            Err(DropReason::Checksum)
        );
    }

    fn mutated(change: impl Fn(&mut Vec<u8>)) -> Result<Received, DropReason> {
        let mut packet = advert().encode_ip(MASTER, VRRP_MULTICAST);
        change(&mut packet);
        decode_ip(&packet)
    }

    /// Rewrites the VRRP checksum after a change, so that only the change
    /// itself is judged.
    fn fix_checksum(packet: &mut [u8]) {
        packet[26] = 0;
        packet[27] = 0;
        let sum = checksum(MASTER, VRRP_MULTICAST, &packet[20..]);
        packet[26..28].copy_from_slice(&sum.to_be_bytes());
    }

    #[test]
    fn a_ttl_other_than_255_is_dropped() {
        assert_eq!(mutated(|p| p[8] = 254).unwrap_err(), DropReason::Ttl);
        assert_eq!(mutated(|p| p[8] = 1).unwrap_err(), DropReason::Ttl);
    }

    #[test]
    fn version_2_and_other_versions_are_dropped() {
        for version in [0u8, 1, 2, 4, 15] {
            let result = mutated(|p| {
                p[20] = (version << 4) | 1;
                fix_checksum(p);
            });
            assert_eq!(
                result.unwrap_err(),
                DropReason::Version,
                "version {version}"
            );
        }
    }

    #[test]
    fn a_type_other_than_advertisement_is_dropped() {
        let result = mutated(|p| {
            p[20] = 0x32;
            fix_checksum(p);
        });
        assert_eq!(result.unwrap_err(), DropReason::Type);
    }

    #[test]
    fn a_wrong_checksum_is_dropped() {
        assert_eq!(
            mutated(|p| p[27] ^= 0x01).unwrap_err(),
            DropReason::Checksum
        );
        assert_eq!(
            mutated(|p| p[22] = 200).unwrap_err(),
            DropReason::Checksum,
            "priority changed, checksum not"
        );
    }

    #[test]
    fn a_count_that_disagrees_with_the_length_is_dropped() {
        let more = mutated(|p| {
            p[23] = 2;
            fix_checksum(p);
        });
        assert_eq!(more.unwrap_err(), DropReason::AddressCount);
        let none = mutated(|p| {
            p[23] = 0;
            fix_checksum(p);
        });
        assert_eq!(none.unwrap_err(), DropReason::AddressCount);
    }

    #[test]
    fn an_interval_of_zero_is_dropped() {
        let result = mutated(|p| {
            p[24] = 0xf0; // reserved bits set, interval 0
            p[25] = 0;
            fix_checksum(p);
        });
        assert_eq!(result.unwrap_err(), DropReason::Interval);
    }

    #[test]
    fn truncated_and_foreign_ip_packets_are_dropped() {
        let packet = advert().encode_ip(MASTER, VRRP_MULTICAST);
        for len in 0..packet.len() {
            assert!(decode_ip(&packet[..len]).is_err(), "length {len}");
        }
        assert_eq!(
            mutated(|p| p[9] = 17).unwrap_err(),
            DropReason::IpHeader,
            "UDP"
        );
        assert_eq!(
            mutated(|p| p[0] = 0x65).unwrap_err(),
            DropReason::IpHeader,
            "IPv6 version nibble"
        );
        assert_eq!(
            mutated(|p| p[6] = 0x20).unwrap_err(),
            DropReason::IpHeader,
            "more fragments"
        );
        assert_eq!(
            mutated(|p| p[0] = 0x44).unwrap_err(),
            DropReason::Truncated,
            "header length below 20"
        );
    }

    #[test]
    fn ip_options_are_skipped() {
        let mut packet = advert().encode_ip(MASTER, VRRP_MULTICAST);
        // A 4-byte NOP option list: header length 24.
        packet[0] = 0x46;
        packet.splice(20..20, [1, 1, 1, 1]);
        let total = packet.len() as u16;
        packet[2..4].copy_from_slice(&total.to_be_bytes());
        assert_eq!(decode_ip(&packet).unwrap().advert, advert());
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..80)) {
            let _ = decode_ip(&bytes);
            let _ = Advert::decode(&bytes, MASTER, VRRP_MULTICAST);
        }

        #[test]
        fn adverts_round_trip(
            vrid in 1u8..=255,
            priority in any::<u8>(),
            interval_cs in 1u16..=MAX_INTERVAL_CS,
            addresses in proptest::collection::vec(any::<u32>().prop_map(Ipv4Addr::from), 0..20),
        ) {
            let advert = Advert { vrid, priority, interval_cs, addresses };
            let packet = advert.encode_ip(MASTER, VRRP_MULTICAST);
            prop_assert_eq!(decode_ip(&packet).unwrap().advert, advert);
        }

        #[test]
        fn any_single_bit_flip_in_the_message_is_caught(position in 0usize..12, bit in 0u8..8) {
            let mut bytes = advert().encode(MASTER, VRRP_MULTICAST);
            bytes[position] ^= 1 << bit;
            prop_assert!(Advert::decode(&bytes, MASTER, VRRP_MULTICAST).is_err());
        }
    }
}
