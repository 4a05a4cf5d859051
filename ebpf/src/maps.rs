//! Every map of the kernel side, in one place. Names come from
//! `farol_common::maps`; the agent pins them under its pin directory.

use aya_ebpf::{btf_maps::PerCpuArray, macros::btf_map};
use farol_common::{MalformedReason, PacketClass, PacketStats};

/// Packets and bytes per `PacketClass`, per CPU.
#[btf_map]
pub(crate) static PACKET_STATS: PerCpuArray<PacketStats, { PacketClass::COUNT as usize }> =
    PerCpuArray::new();

/// Malformed packets per `MalformedReason`, per CPU.
#[btf_map]
pub(crate) static MALFORMED: PerCpuArray<PacketStats, { MalformedReason::COUNT as usize }> =
    PerCpuArray::new();
