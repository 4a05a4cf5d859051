//! Reading the per-CPU counters of `farol_ingress`.

use aya::{
    maps::{MapData, PerCpuArray},
    Ebpf,
};
use farol_common::{
    maps::{MAP_MALFORMED, MAP_PACKET_STATS},
    MalformedReason, PacketClass, PacketStats,
};

use super::DataplaneError;

/// The counter maps, owned by the agent once the object is loaded.
pub struct Counters {
    packet_stats: PerCpuArray<MapData, PacketStats>,
    malformed: PerCpuArray<MapData, PacketStats>,
}

impl std::fmt::Debug for Counters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Counters").finish_non_exhaustive()
    }
}

/// Counters summed over CPUs at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CounterSnapshot {
    pub classes: [PacketStats; PacketClass::COUNT as usize],
    pub malformed: [PacketStats; MalformedReason::COUNT as usize],
}

impl CounterSnapshot {
    pub fn class(&self, class: PacketClass) -> PacketStats {
        self.classes[class as usize]
    }

    pub fn malformed(&self, reason: MalformedReason) -> PacketStats {
        self.malformed[reason as usize]
    }

    /// What was counted between `earlier` and `self`.
    pub fn since(&self, earlier: &CounterSnapshot) -> CounterSnapshot {
        let diff = |now: &PacketStats, then: &PacketStats| PacketStats {
            packets: now.packets.wrapping_sub(then.packets),
            bytes: now.bytes.wrapping_sub(then.bytes),
        };
        CounterSnapshot {
            classes: std::array::from_fn(|i| diff(&self.classes[i], &earlier.classes[i])),
            malformed: std::array::from_fn(|i| diff(&self.malformed[i], &earlier.malformed[i])),
        }
    }
}

impl Counters {
    /// Takes the counter maps out of a loaded object.
    pub fn take_from(ebpf: &mut Ebpf) -> Result<Counters, DataplaneError> {
        let mut take = |name: &'static str| {
            let map = ebpf
                .take_map(name)
                .ok_or(DataplaneError::MissingMap { name })?;
            PerCpuArray::try_from(map).map_err(|source| DataplaneError::Map { name, source })
        };
        Ok(Counters {
            packet_stats: take(MAP_PACKET_STATS)?,
            malformed: take(MAP_MALFORMED)?,
        })
    }

    pub fn snapshot(&self) -> Result<CounterSnapshot, DataplaneError> {
        let read = |map: &PerCpuArray<MapData, PacketStats>, name: &'static str, index: u32| {
            map.get(&index, 0)
                .map(|values| PacketStats::sum(values.iter()))
                .map_err(|source| DataplaneError::Map { name, source })
        };
        let mut snapshot = CounterSnapshot {
            classes: [PacketStats::default(); PacketClass::COUNT as usize],
            malformed: [PacketStats::default(); MalformedReason::COUNT as usize],
        };
        for class in PacketClass::ALL {
            snapshot.classes[class as usize] =
                read(&self.packet_stats, MAP_PACKET_STATS, class as u32)?;
        }
        for reason in MalformedReason::ALL {
            snapshot.malformed[reason as usize] =
                read(&self.malformed, MAP_MALFORMED, reason as u32)?;
        }
        Ok(snapshot)
    }
}
