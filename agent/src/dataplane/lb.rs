//! The load balancer's maps: written from a [`LbPlan`], read for metrics.
//!
//! Tables are swapped atomically per service: the new Maglev (or
//! round-robin) table goes into the idle half, then every `VIPS` entry of
//! the service is rewritten to point at that half. A packet sees the old
//! table or the new one, never a mix.

use std::{collections::HashMap, net::IpAddr};

use aya::{
    maps::{Array, HashMap as BpfHashMap, MapData, PerCpuArray},
    Ebpf,
};
use farol_common::lb::{
    ipv4_mapped, maglev_base, Backend, BackendStats, LbConfig, ServiceStats, VipKey, VipMeta,
    BACKEND_ACTIVE, BACKEND_ALIVE, BACKEND_LOCAL, FAST_VIPS, MAGLEV_TABLE_SIZE, MAP_ACTIVE_FLOWS,
    MAP_BACKENDS, MAP_BACKEND_STATS, MAP_LB_CONFIG, MAP_MAGLEV, MAP_OWNED_VIPS,
    MAP_SERVICE_BACKENDS, MAP_SERVICE_META, MAP_SERVICE_STATS, MAP_VIPS, MAX_BACKENDS_PER_SERVICE,
    PROTO_TCP, PROTO_UDP, SCHEDULER_LEASTCONN, SCHEDULER_MAGLEV, SCHEDULER_ROUNDROBIN,
    SCHEDULER_SOURCE, SERVICE_PRESENT, VIP_OWNED,
};

use super::{
    maglev::{maglev_table, round_robin_table, TableBackend},
    DataplaneError,
};
use crate::config::{Forwarding, Protocol, Scheduler};

/// What the kernel should balance, computed by the `balancer` module.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LbPlan {
    pub local_mac: [u8; 6],
    pub services: Vec<ServicePlan>,
    /// VIPs this node holds (answers ARP for, balances).
    pub owned_vips: Vec<IpAddr>,
    /// NAT services: this node's address, the source of their packets to
    /// backends. None when no service uses NAT.
    pub snat_ipv4: Option<std::net::Ipv4Addr>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePlan {
    /// Index into the per-service maps, < MAX_SERVICES.
    pub index: u32,
    pub name: String,
    pub vip: IpAddr,
    pub ports: Vec<u16>,
    pub protocol: Protocol,
    pub scheduler: Scheduler,
    pub forwarding: Forwarding,
    /// Seeds the Maglev permutations: the same on every balancer.
    pub seed: String,
    pub backends: Vec<BackendPlan>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendPlan {
    /// Position in the service (the kernel id is derived from it).
    pub slot: u32,
    pub name: String,
    pub addr: IpAddr,
    pub port: u16,
    /// None until resolved; such a backend takes no flow.
    pub mac: Option<[u8; 6]>,
    pub weight: u32,
    /// This node itself: its packets are passed up, not forwarded.
    pub local: bool,
    /// Healthy (until health checks exist: reachable at L2).
    pub alive: bool,
}

impl BackendPlan {
    /// The kernel's backend id: service-major, stable while the config's
    /// backend order is.
    pub fn id(&self, service: u32) -> u32 {
        service * MAX_BACKENDS_PER_SERVICE + self.slot
    }

    fn usable(&self) -> bool {
        self.alive && (self.local || self.mac.is_some())
    }
}

pub fn addr16(addr: IpAddr) -> [u8; 16] {
    match addr {
        IpAddr::V4(v4) => ipv4_mapped(v4.octets()),
        IpAddr::V6(v6) => v6.octets(),
    }
}

fn scheduler_code(scheduler: Scheduler) -> u32 {
    match scheduler {
        Scheduler::Maglev => SCHEDULER_MAGLEV,
        Scheduler::Source => SCHEDULER_SOURCE,
        Scheduler::Roundrobin => SCHEDULER_ROUNDROBIN,
        Scheduler::Leastconn => SCHEDULER_LEASTCONN,
    }
}

fn protocol_code(protocol: Protocol) -> u8 {
    match protocol {
        Protocol::Tcp => PROTO_TCP,
        Protocol::Udp => PROTO_UDP,
    }
}

/// Per-service and per-backend counters summed over CPUs.
#[derive(Debug, Clone, Default)]
pub struct LbSnapshot {
    pub services: Vec<ServiceSnapshot>,
}

#[derive(Debug, Clone)]
pub struct ServiceSnapshot {
    pub name: String,
    pub stats: ServiceStats,
    pub backends: Vec<BackendSnapshot>,
}

#[derive(Debug, Clone)]
pub struct BackendSnapshot {
    pub name: String,
    pub stats: BackendStats,
    /// Flows not yet closed (approximate, see ACTIVE_FLOWS in the kernel).
    pub active_flows: u64,
}

/// The load balancer maps, owned by the agent once the object is loaded.
pub struct LoadBalancerMaps {
    vips: BpfHashMap<MapData, VipKey, VipMeta>,
    owned_vips: BpfHashMap<MapData, [u8; 16], u32>,
    backends: Array<MapData, Backend>,
    service_backends: Array<MapData, u32>,
    maglev: Array<MapData, u32>,
    config: Array<MapData, LbConfig>,
    service_stats: PerCpuArray<MapData, ServiceStats>,
    backend_stats: PerCpuArray<MapData, BackendStats>,
    active_flows: Array<MapData, i64>,
    service_meta: Array<MapData, VipMeta>,
    /// The live Maglev half per service index.
    halves: HashMap<u32, u32>,
    applied: LbPlan,
}

impl std::fmt::Debug for LoadBalancerMaps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadBalancerMaps")
            .field("applied", &self.applied)
            .finish_non_exhaustive()
    }
}

fn map_error(name: &'static str) -> impl Fn(aya::maps::MapError) -> DataplaneError {
    move |source| DataplaneError::Map { name, source }
}

impl LoadBalancerMaps {
    /// Takes the load balancer's maps out of a loaded object.
    pub fn take_from(ebpf: &mut Ebpf) -> Result<LoadBalancerMaps, DataplaneError> {
        fn take<T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>>(
            ebpf: &mut Ebpf,
            name: &'static str,
        ) -> Result<T, DataplaneError> {
            let map = ebpf
                .take_map(name)
                .ok_or(DataplaneError::MissingMap { name })?;
            T::try_from(map).map_err(map_error(name))
        }
        let mut maps = LoadBalancerMaps {
            vips: take(ebpf, MAP_VIPS)?,
            owned_vips: take(ebpf, MAP_OWNED_VIPS)?,
            backends: take(ebpf, MAP_BACKENDS)?,
            service_backends: take(ebpf, MAP_SERVICE_BACKENDS)?,
            maglev: take(ebpf, MAP_MAGLEV)?,
            config: take(ebpf, MAP_LB_CONFIG)?,
            service_stats: take(ebpf, MAP_SERVICE_STATS)?,
            backend_stats: take(ebpf, MAP_BACKEND_STATS)?,
            active_flows: take(ebpf, MAP_ACTIVE_FLOWS)?,
            service_meta: take(ebpf, MAP_SERVICE_META)?,
            halves: HashMap::new(),
            applied: LbPlan::default(),
        };
        // An adopted data plane: new tables must go to the half that is
        // not live, so learn which one is.
        for index in 0..farol_common::lb::MAX_SERVICES {
            if let Ok(meta) = maps.service_meta.get(&index, 0) {
                if meta.flags & SERVICE_PRESENT != 0 {
                    maps.halves.insert(index, meta.table_half);
                }
            }
        }
        Ok(maps)
    }

    /// The plan last applied.
    pub fn applied(&self) -> &LbPlan {
        &self.applied
    }

    /// Makes the kernel balance as `plan` says. Services whose table did not
    /// change keep it; VIP entries no longer in the plan are removed.
    pub fn apply(&mut self, plan: &LbPlan) -> Result<(), DataplaneError> {
        self.config
            .set(0, lb_config(plan), 0)
            .map_err(map_error(MAP_LB_CONFIG))?;
        for service in &plan.services {
            let owned = plan.owned_vips.contains(&service.vip);
            let table_unchanged = self.applied.services.iter().any(|old| old == service);
            let owned_before = self.applied.owned_vips.contains(&service.vip);
            if !table_unchanged {
                self.apply_service(service)?;
            }
            if !table_unchanged || owned != owned_before {
                self.write_vip_entries(service, owned)?;
            }
        }
        self.remove_stale_vips(plan)?;
        self.apply_ownership(plan)?;
        self.applied = plan.clone();
        Ok(())
    }

    fn apply_service(&mut self, service: &ServicePlan) -> Result<(), DataplaneError> {
        let mut table_backends = Vec::new();
        for (position, backend) in service.backends.iter().enumerate() {
            let id = backend.id(service.index);
            let mut flags = 0;
            if backend.usable() {
                flags |= BACKEND_ALIVE;
                if backend.weight > 0 {
                    flags |= BACKEND_ACTIVE;
                    table_backends.push(TableBackend {
                        id,
                        key: format!("{}:{}", backend.addr, backend.port),
                        weight: backend.weight,
                    });
                }
            }
            if backend.local {
                flags |= BACKEND_LOCAL;
            }
            let value = Backend {
                addr: addr16(backend.addr),
                mac: backend.mac.unwrap_or_default(),
                port_be: backend.port.to_be(),
                flags,
                weight: backend.weight,
            };
            self.backends
                .set(id, value, 0)
                .map_err(map_error(MAP_BACKENDS))?;
            self.service_backends
                .set(
                    service.index * MAX_BACKENDS_PER_SERVICE + position as u32,
                    id,
                    0,
                )
                .map_err(map_error(MAP_SERVICE_BACKENDS))?;
        }
        let table = match service.scheduler {
            Scheduler::Roundrobin => round_robin_table(&table_backends, MAGLEV_TABLE_SIZE),
            _ => maglev_table(&table_backends, &service.seed, MAGLEV_TABLE_SIZE),
        };
        let half = 1 - self.halves.get(&service.index).copied().unwrap_or(1);
        let base = maglev_base(service.index, half);
        for (offset, backend) in table.iter().enumerate() {
            self.maglev
                .set(base + offset as u32, *backend, 0)
                .map_err(map_error(MAP_MAGLEV))?;
        }
        self.halves.insert(service.index, half);
        Ok(())
    }

    /// Points every port of the service at its live table half, with the
    /// ownership flag; a few map writes, so VRRP can flip ownership fast.
    fn write_vip_entries(
        &mut self,
        service: &ServicePlan,
        owned: bool,
    ) -> Result<(), DataplaneError> {
        let meta = VipMeta {
            service: service.index,
            scheduler: scheduler_code(service.scheduler),
            forwarding: match service.forwarding {
                Forwarding::Dsr => farol_common::lb::FORWARD_DSR,
                Forwarding::Nat => farol_common::lb::FORWARD_NAT,
            },
            table_half: self.halves.get(&service.index).copied().unwrap_or(0),
            backend_count: service.backends.len() as u32,
            flags: if owned { VIP_OWNED } else { 0 },
        };
        for &port in &service.ports {
            self.vips
                .insert(vip_key(service.vip, port, service.protocol), meta, 0)
                .map_err(map_error(MAP_VIPS))?;
        }
        let present = VipMeta {
            flags: meta.flags | SERVICE_PRESENT,
            ..meta
        };
        self.service_meta
            .set(service.index, present, 0)
            .map_err(map_error(MAP_SERVICE_META))?;
        Ok(())
    }

    fn remove_stale_vips(&mut self, plan: &LbPlan) -> Result<(), DataplaneError> {
        let wanted: std::collections::HashSet<VipKey> = plan
            .services
            .iter()
            .flat_map(|s| s.ports.iter().map(move |&p| vip_key(s.vip, p, s.protocol)))
            .collect();
        for old in &self.applied.services {
            if !plan.services.iter().any(|s| s.index == old.index) {
                self.service_meta
                    .set(old.index, VipMeta::default(), 0)
                    .map_err(map_error(MAP_SERVICE_META))?;
            }
        }
        let present: Vec<VipKey> = self.vips.keys().filter_map(Result::ok).collect();
        for key in present.into_iter().filter(|key| !wanted.contains(key)) {
            self.vips.remove(&key).map_err(map_error(MAP_VIPS))?;
        }
        Ok(())
    }

    fn apply_ownership(&mut self, plan: &LbPlan) -> Result<(), DataplaneError> {
        let wanted: Vec<[u8; 16]> = plan.owned_vips.iter().map(|&vip| addr16(vip)).collect();
        for vip in &wanted {
            self.owned_vips
                .insert(vip, 1, 0)
                .map_err(map_error(MAP_OWNED_VIPS))?;
        }
        let present: Vec<[u8; 16]> = self.owned_vips.keys().filter_map(Result::ok).collect();
        for vip in present.into_iter().filter(|vip| !wanted.contains(vip)) {
            self.owned_vips
                .remove(&vip)
                .map_err(map_error(MAP_OWNED_VIPS))?;
        }
        Ok(())
    }

    /// Counters of every applied service and backend.
    pub fn snapshot(&self) -> Result<LbSnapshot, DataplaneError> {
        let mut snapshot = LbSnapshot::default();
        for service in &self.applied.services {
            let values = self
                .service_stats
                .get(&service.index, 0)
                .map_err(map_error(MAP_SERVICE_STATS))?;
            let stats = values
                .iter()
                .fold(ServiceStats::default(), |a, v| ServiceStats {
                    packets: a.packets + v.packets,
                    bytes: a.bytes + v.bytes,
                    new_flows: a.new_flows + v.new_flows,
                    drops_no_backend: a.drops_no_backend + v.drops_no_backend,
                    not_owned: a.not_owned + v.not_owned,
                    icmp_errors_forwarded: a.icmp_errors_forwarded + v.icmp_errors_forwarded,
                    drops_no_nat_port: a.drops_no_nat_port + v.drops_no_nat_port,
                    nat_replies: a.nat_replies + v.nat_replies,
                });
            let mut backends = Vec::new();
            for backend in &service.backends {
                let id = backend.id(service.index);
                let values = self
                    .backend_stats
                    .get(&id, 0)
                    .map_err(map_error(MAP_BACKEND_STATS))?;
                let stats = values
                    .iter()
                    .fold(BackendStats::default(), |a, v| BackendStats {
                        packets: a.packets + v.packets,
                        bytes: a.bytes + v.bytes,
                        new_flows: a.new_flows + v.new_flows,
                        moved_flows: a.moved_flows + v.moved_flows,
                    });
                let active: i64 = self
                    .active_flows
                    .get(&id, 0)
                    .map_err(map_error(MAP_ACTIVE_FLOWS))?;
                backends.push(BackendSnapshot {
                    name: backend.name.clone(),
                    stats,
                    active_flows: active.max(0) as u64,
                });
            }
            snapshot.services.push(ServiceSnapshot {
                name: service.name.clone(),
                stats,
                backends,
            });
        }
        Ok(snapshot)
    }
}

/// Node-wide settings: our MAC, the VIP addresses for the fast test, the
/// NAT source address.
fn lb_config(plan: &LbPlan) -> LbConfig {
    let mut vips: Vec<[u8; 16]> = plan.services.iter().map(|s| addr16(s.vip)).collect();
    vips.sort_unstable();
    vips.dedup();
    let mut config = LbConfig {
        local_mac: plan.local_mac,
        _pad: [0; 2],
        vip_count: vips.len() as u32,
        snat_ipv4: plan.snat_ipv4.map_or([0; 4], |addr| addr.octets()),
        vips: [[0; 16]; FAST_VIPS],
    };
    if vips.len() > FAST_VIPS {
        config.vip_count = u32::MAX;
    } else {
        config.vips[..vips.len()].copy_from_slice(&vips);
    }
    config
}

pub fn vip_key(vip: IpAddr, port: u16, protocol: Protocol) -> VipKey {
    VipKey {
        addr: addr16(vip),
        port_be: port.to_be(),
        protocol: protocol_code(protocol),
        _pad: 0,
    }
}
