//! VRRP's part of `/metrics`: role per VRID, transitions, adverts sent and
//! received, masters met (split brain), packets dropped by reason. The run
//! loop writes [`VrrpStats`]; the collector reads it at scrape time.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{counter::ConstCounter, gauge::ConstGauge, MetricType},
};

use super::{fsm::State, packet::DropReason};

/// Name, help and how to read one counter of an instance.
type InstanceCounter = (&'static str, &'static str, fn(&InstanceStats) -> u64);

#[derive(Debug, Clone)]
pub struct InstanceStats {
    pub name: String,
    pub vrid: u8,
    pub state: State,
    pub priority: u8,
    /// Transitions per state entered.
    pub transitions: BTreeMap<&'static str, u64>,
    pub adverts_sent: u64,
    pub adverts_received: u64,
    pub send_errors: u64,
    /// Adverts from another master heard while master.
    pub masters_met: u64,
}

/// Shared between the VRRP task and the collector.
#[derive(Debug, Default)]
pub struct VrrpStats {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    instances: Vec<InstanceStats>,
    drops: BTreeMap<(String, DropReason), u64>,
}

impl VrrpStats {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding this lock leaves plain counters: usable.
        self.inner
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    pub(super) fn add_instance(&self, name: &str, vrid: u8, priority: u8) -> usize {
        let mut inner = self.lock();
        inner.instances.push(InstanceStats {
            name: name.to_owned(),
            vrid,
            state: State::Initialize,
            priority,
            transitions: BTreeMap::new(),
            adverts_sent: 0,
            adverts_received: 0,
            send_errors: 0,
            masters_met: 0,
        });
        inner.instances.len() - 1
    }

    pub(super) fn update(&self, instance: usize, change: impl FnOnce(&mut InstanceStats)) {
        if let Some(stats) = self.lock().instances.get_mut(instance) {
            change(stats);
        }
    }

    /// Makes the interface's drop counters visible at 0.
    pub(super) fn add_interface(&self, interface: &str) {
        let mut inner = self.lock();
        for reason in DropReason::ALL {
            inner
                .drops
                .entry((interface.to_owned(), reason))
                .or_insert(0);
        }
    }

    pub(super) fn drop_packet(&self, interface: &str, reason: DropReason) {
        *self
            .lock()
            .drops
            .entry((interface.to_owned(), reason))
            .or_insert(0) += 1;
    }

    /// A copy for tests and the status page.
    pub fn instances(&self) -> Vec<InstanceStats> {
        self.lock().instances.clone()
    }

    pub fn drops(&self, reason: DropReason) -> u64 {
        self.lock()
            .drops
            .iter()
            .filter(|((_, r), _)| *r == reason)
            .map(|(_, count)| count)
            .sum()
    }
}

#[derive(Debug)]
pub struct VrrpCollector {
    stats: Arc<VrrpStats>,
}

impl VrrpCollector {
    pub fn new(stats: Arc<VrrpStats>) -> VrrpCollector {
        VrrpCollector { stats }
    }
}

impl Collector for VrrpCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let (instances, drops) = {
            let inner = self.stats.lock();
            (inner.instances.clone(), inner.drops.clone())
        };
        let labels =
            |i: &InstanceStats| [("instance", i.name.clone()), ("vrid", i.vrid.to_string())];

        let mut state = encoder.encode_descriptor(
            "farol_vrrp_state",
            "1 for the state each virtual router is in (initialize: stopped or interface down)",
            None,
            MetricType::Gauge,
        )?;
        for instance in &instances {
            for candidate in [State::Initialize, State::Backup, State::Master] {
                let [a, b] = labels(instance);
                ConstGauge::new(i64::from(instance.state == candidate)).encode(
                    state.encode_family(&[
                        (a.0, a.1.as_str()),
                        (b.0, b.1.as_str()),
                        ("state", candidate.as_str()),
                    ])?,
                )?;
            }
        }
        let mut priority = encoder.encode_descriptor(
            "farol_vrrp_priority",
            "The priority advertised now (configured, lowered by failing tracks)",
            None,
            MetricType::Gauge,
        )?;
        for instance in &instances {
            let [a, b] = labels(instance);
            ConstGauge::new(i64::from(instance.priority))
                .encode(priority.encode_family(&[(a.0, a.1.as_str()), (b.0, b.1.as_str())])?)?;
        }
        let mut transitions = encoder.encode_descriptor(
            "farol_vrrp_transitions",
            "State changes, per state entered",
            None,
            MetricType::Counter,
        )?;
        for instance in &instances {
            for to in [State::Initialize, State::Backup, State::Master] {
                let [a, b] = labels(instance);
                let count = instance.transitions.get(to.as_str()).copied().unwrap_or(0);
                ConstCounter::new(count).encode(transitions.encode_family(&[
                    (a.0, a.1.as_str()),
                    (b.0, b.1.as_str()),
                    ("to", to.as_str()),
                ])?)?;
            }
        }
        let per_instance: [InstanceCounter; 4] = [
            ("farol_vrrp_adverts_sent", "Adverts sent", |i| {
                i.adverts_sent
            }),
            (
                "farol_vrrp_adverts_received",
                "Adverts accepted for this virtual router",
                |i| i.adverts_received,
            ),
            (
                "farol_vrrp_advert_send_errors",
                "Adverts the socket refused to send",
                |i| i.send_errors,
            ),
            (
                "farol_vrrp_masters_met",
                "Adverts from another master while master (split brain, healed at once)",
                |i| i.masters_met,
            ),
        ];
        for (name, help, get) in per_instance {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for instance in &instances {
                let [a, b] = labels(instance);
                ConstCounter::new(get(instance))
                    .encode(family.encode_family(&[(a.0, a.1.as_str()), (b.0, b.1.as_str())])?)?;
            }
        }
        let mut dropped = encoder.encode_descriptor(
            "farol_vrrp_dropped_packets",
            "VRRP packets dropped, per interface and reason",
            None,
            MetricType::Counter,
        )?;
        let interfaces: std::collections::BTreeSet<&String> =
            drops.keys().map(|(interface, _)| interface).collect();
        for interface in interfaces {
            for reason in DropReason::ALL {
                let count = drops
                    .get(&(interface.clone(), reason))
                    .copied()
                    .unwrap_or(0);
                ConstCounter::new(count).encode(dropped.encode_family(&[
                    ("interface", interface.as_str()),
                    ("reason", reason.as_str()),
                ])?)?;
            }
        }
        Ok(())
    }
}
