//! The volumes' part of `/metrics`, read from the running volumes at
//! scrape time.

use std::sync::Arc;

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{counter::ConstCounter, gauge::ConstGauge, MetricType},
};

use super::replica::{MetricSnapshot, PeerSnapshot, Volume};

/// Name, help, type, and how to read one value from a snapshot.
type VolumeMetric = (
    &'static str,
    &'static str,
    MetricType,
    fn(&MetricSnapshot) -> u64,
);
type PeerMetric = (
    &'static str,
    &'static str,
    MetricType,
    fn(&PeerSnapshot) -> u64,
);

#[derive(Debug)]
pub struct StorageCollector {
    volumes: Vec<Arc<Volume>>,
}

impl StorageCollector {
    pub fn new(volumes: Vec<Arc<Volume>>) -> StorageCollector {
        StorageCollector { volumes }
    }
}

impl Collector for StorageCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let snapshots: Vec<_> = self
            .volumes
            .iter()
            .map(|v| (v.name().to_owned(), v.metric_snapshot()))
            .collect();
        let per_volume: [VolumeMetric; 8] = [
            (
                "farol_volume_current",
                "1 when the local brick is known to be current (serves reads)",
                MetricType::Gauge,
                |s| u64::from(s.current),
            ),
            (
                "farol_volume_writes",
                "Changes acknowledged by a quorum",
                MetricType::Counter,
                |s| s.writes,
            ),
            (
                "farol_volume_writes_refused",
                "Changes refused: no quorum on this side (EROFS) or replica not current",
                MetricType::Counter,
                |s| s.writes_refused,
            ),
            (
                "farol_volume_writes_failed",
                "Changes applied locally that missed their quorum",
                MetricType::Counter,
                |s| s.writes_failed,
            ),
            (
                "farol_volume_split_brains",
                "Paths changed on two sides apart, resolved by the split-brain policy",
                MetricType::Counter,
                |s| s.split_brains,
            ),
            (
                "farol_volume_kernel_invalidations",
                "Kernel cache invalidations sent for changes from peers and heals",
                MetricType::Counter,
                |s| s.kernel_invalidations,
            ),
            (
                "farol_volume_kernel_invalidations_unwaited",
                "Peer changes answered before the kernel had dropped what they made stale (directory busy here, or slow)",
                MetricType::Counter,
                |s| s.kernel_invalidations_unwaited,
            ),
            (
                "farol_volume_kernel_inodes",
                "Inodes the kernel holds lookups of on this node's mount",
                MetricType::Gauge,
                |s| s.kernel_inodes_held,
            ),
        ];
        for (name, help, kind, get) in per_volume {
            let mut family = encoder.encode_descriptor(name, help, None, kind)?;
            for (volume, snapshot) in &snapshots {
                let labels = [("volume", volume.as_str())];
                let value = get(snapshot);
                match kind {
                    MetricType::Counter => {
                        ConstCounter::new(value).encode(family.encode_family(&labels)?)?
                    }
                    _ => ConstGauge::new(value as i64).encode(family.encode_family(&labels)?)?,
                }
            }
        }
        let mut bad = encoder.encode_descriptor(
            "farol_volume_bad_frames",
            "Connections closed because the peer sent a bad frame, per reason",
            None,
            MetricType::Counter,
        )?;
        for (volume, snapshot) in &snapshots {
            for (reason, count) in &snapshot.bad_frames {
                ConstCounter::new(*count).encode(
                    bad.encode_family(&[("volume", volume.as_str()), ("reason", reason)])?,
                )?;
            }
        }
        let per_peer: [PeerMetric; 5] = [
            (
                "farol_volume_peer_up",
                "1 while the connection to the peer is up",
                MetricType::Gauge,
                |p| u64::from(p.up),
            ),
            (
                "farol_volume_peer_transitions",
                "Peer up/down changes",
                MetricType::Counter,
                |p| p.transitions,
            ),
            (
                "farol_volume_heal_pending",
                "Changes the peer missed, waiting for heal",
                MetricType::Gauge,
                |p| p.pending,
            ),
            (
                "farol_volume_healed_entries",
                "Paths healed on the peer",
                MetricType::Counter,
                |p| p.healed,
            ),
            (
                "farol_volume_heal_running",
                "1 while a heal towards the peer runs",
                MetricType::Gauge,
                |p| u64::from(p.heal_running),
            ),
        ];
        for (name, help, kind, get) in per_peer {
            let mut family = encoder.encode_descriptor(name, help, None, kind)?;
            for (volume, snapshot) in &snapshots {
                for peer in &snapshot.peers {
                    let labels = [("volume", volume.as_str()), ("peer", peer.name.as_str())];
                    let value = get(peer);
                    match kind {
                        MetricType::Counter => {
                            ConstCounter::new(value).encode(family.encode_family(&labels)?)?
                        }
                        _ => {
                            ConstGauge::new(value as i64).encode(family.encode_family(&labels)?)?
                        }
                    }
                }
            }
        }
        Ok(())
    }
}
