//! Names of programs and maps, and the value types the maps hold.
//!
//! Map names are at most 15 characters so `bpftool` shows them whole; each
//! map is pinned as `<pin_dir>/<NAME>` (default `/sys/fs/bpf/farol/`).

use core::mem::size_of;

/// The XDP program attached to every node's LAN interface.
pub const PROGRAM_INGRESS: &str = "farol_ingress";

/// Per-CPU array indexed by [`crate::PacketClass`]: packets and bytes seen.
pub const MAP_PACKET_STATS: &str = "PACKET_STATS";

/// Per-CPU array indexed by [`crate::MalformedReason`]: malformed packets.
pub const MAP_MALFORMED: &str = "MALFORMED";

/// Every map the agent pins, so it can unpin them all on a clean stop.
pub const PINNED_MAPS: &[&str] = &[
    MAP_PACKET_STATS,
    MAP_MALFORMED,
    crate::lb::MAP_VIPS,
    crate::lb::MAP_OWNED_VIPS,
    crate::lb::MAP_BACKENDS,
    crate::lb::MAP_SERVICE_BACKENDS,
    crate::lb::MAP_MAGLEV,
    crate::lb::MAP_FLOWS,
    crate::lb::MAP_SERVICE_STATS,
    crate::lb::MAP_BACKEND_STATS,
    crate::lb::MAP_ACTIVE_FLOWS,
    crate::lb::MAP_RR_CURSOR,
    crate::lb::MAP_LB_CONFIG,
    crate::lb::MAP_SERVICE_META,
    crate::lb::MAP_NAT_REVERSE,
    crate::lb::MAP_NAT_PROGRAMS,
];

/// A packet and byte count; the value of [`MAP_PACKET_STATS`].
///
/// `bytes` counts the whole frame as the XDP program sees it (Ethernet
/// header included, no FCS).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PacketStats {
    pub packets: u64,
    pub bytes: u64,
}

const _: () = assert!(size_of::<PacketStats>() == 16);

impl PacketStats {
    /// Sums the per-CPU values of one slot.
    pub fn sum<'a>(values: impl IntoIterator<Item = &'a PacketStats>) -> PacketStats {
        values
            .into_iter()
            .fold(PacketStats::default(), |acc, v| PacketStats {
                packets: acc.packets.wrapping_add(v.packets),
                bytes: acc.bytes.wrapping_add(v.bytes),
            })
    }
}

#[cfg(feature = "user")]
// SAFETY: PacketStats is #[repr(C)], Copy, has no padding (two u64) and every
// bit pattern is a valid value.
unsafe impl aya::Pod for PacketStats {}
