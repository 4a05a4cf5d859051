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

use aya_ebpf::btf_maps::{Array, HashMap, LruHashMap, ProgramArray};
use farol_common::lb::{
    Backend, BackendStats, Flow, FlowKey, LbConfig, NatEntry, NatKey, ServiceStats, VipKey,
    VipMeta, MAGLEV_HALVES, MAGLEV_TABLE_SIZE, MAX_BACKENDS, MAX_BACKENDS_PER_SERVICE, MAX_FLOWS,
    MAX_SERVICES,
};

/// (VIP, port, protocol) -> service, written by the agent.
#[btf_map]
pub(crate) static VIPS: HashMap<VipKey, VipMeta, { (MAX_SERVICES * 1024) as usize }> =
    HashMap::new();

/// VIP address -> 1 while this node holds it (answers ARP, balances).
#[btf_map]
pub(crate) static OWNED_VIPS: HashMap<[u8; 16], u32, { MAX_SERVICES as usize }> = HashMap::new();

/// Backend id -> address, MAC, flags, weight.
#[btf_map]
pub(crate) static BACKENDS: Array<Backend, { MAX_BACKENDS as usize }> = Array::new();

/// service * MAX_BACKENDS_PER_SERVICE + i -> backend id (leastconn scans it).
#[btf_map]
pub(crate) static SVC_BACKENDS: Array<u32, { (MAX_SERVICES * MAX_BACKENDS_PER_SERVICE) as usize }> =
    Array::new();

/// Two Maglev tables per service (see `farol_common::lb::maglev_base`).
#[btf_map]
pub(crate) static MAGLEV_RING: Array<
    u32,
    { (MAX_SERVICES * MAGLEV_HALVES * MAGLEV_TABLE_SIZE) as usize },
> = Array::new();

/// The connection table: a flow keeps its backend while the set changes.
#[btf_map]
pub(crate) static FLOWS: LruHashMap<FlowKey, Flow, { MAX_FLOWS as usize }> = LruHashMap::new();

/// Per-service counters, per CPU.
#[btf_map]
pub(crate) static SVC_STATS: PerCpuArray<ServiceStats, { MAX_SERVICES as usize }> =
    PerCpuArray::new();

/// Per-backend counters, per CPU.
#[btf_map]
pub(crate) static BACKEND_STATS: PerCpuArray<BackendStats, { MAX_BACKENDS as usize }> =
    PerCpuArray::new();

/// Flows per backend that have not closed, updated with atomic adds.
/// Approximate: DSR sees only the client's half, so a flow counts until the
/// client's FIN or RST, or until its entry leaves the LRU table.
#[btf_map]
pub(crate) static ACTIVE_FLOWS: Array<i64, { MAX_BACKENDS as usize }> = Array::new();

/// Round-robin position per service, per CPU.
#[btf_map]
pub(crate) static RR_CURSOR: PerCpuArray<u32, { MAX_SERVICES as usize }> = PerCpuArray::new();

/// Node-wide settings in slot 0.
#[btf_map]
pub(crate) static LB_CONFIG: Array<LbConfig, 1> = Array::new();

/// Per-service metadata (the `VIPS` value of its ports), for flows found in
/// `FLOWS` without a `VIPS` lookup.
#[btf_map]
pub(crate) static SVC_META: Array<VipMeta, { MAX_SERVICES as usize }> = Array::new();

/// NAT mode: a backend's reply (as it arrives) -> the client it goes to.
#[btf_map]
pub(crate) static NAT_REVERSE: LruHashMap<NatKey, NatEntry, { MAX_FLOWS as usize }> =
    LruHashMap::new();

/// Slot 0: `farol_nat`, set by the agent (see `farol_common::lb::PROGRAM_NAT`).
#[btf_map]
pub(crate) static NAT_PROGRAMS: ProgramArray<1> = ProgramArray::new();
