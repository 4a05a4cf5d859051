//! Load balancer counters on `/metrics`, read from the maps at scrape time.

use std::sync::Arc;

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{counter::ConstCounter, gauge::ConstGauge, MetricType},
};
use tracing::warn;

use crate::dataplane::lb::{BackendSnapshot, LoadBalancerMaps};

#[derive(Debug)]
pub(super) struct LbCollector {
    maps: Arc<tokio::sync::Mutex<LoadBalancerMaps>>,
}

impl LbCollector {
    pub(super) fn new(maps: Arc<tokio::sync::Mutex<LoadBalancerMaps>>) -> LbCollector {
        LbCollector { maps }
    }
}

type Labels<'a> = Vec<(&'a str, &'a str)>;

fn family<M: EncodeMetric>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    metric_type: MetricType,
    rows: Vec<(Labels<'_>, M)>,
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(name, help, None, metric_type)?;
    for (labels, metric) in rows {
        metric.encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

impl Collector for LbCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        // The balancer holds the lock only while it writes a plan; a scrape
        // that meets it skips these families once rather than wait.
        let Ok(maps) = self.maps.try_lock() else {
            return Ok(());
        };
        let snapshot = match maps.snapshot() {
            Ok(snapshot) => snapshot,
            Err(error) => {
                warn!(error = %crate::error_chain(&error), "cannot read load balancer counters for /metrics");
                return Ok(());
            }
        };
        let plan = maps.applied().clone();
        drop(maps);

        type ServiceField = fn(&farol_common::lb::ServiceStats) -> u64;
        let service_families: [(&str, &str, ServiceField); 8] = [
            (
                "farol_lb_service_packets",
                "Packets for the service's VIP balanced by this node",
                |s| s.packets,
            ),
            (
                "farol_lb_service_bytes",
                "Bytes for the service's VIP balanced by this node",
                |s| s.bytes,
            ),
            (
                "farol_lb_service_new_flows",
                "Flows scheduled to a backend",
                |s| s.new_flows,
            ),
            (
                "farol_lb_service_dropped_no_backend_packets",
                "Packets dropped: no backend could take the flow",
                |s| s.drops_no_backend,
            ),
            (
                "farol_lb_service_not_owned_packets",
                "Packets for the VIP passed up because this node does not hold it",
                |s| s.not_owned,
            ),
            (
                "farol_lb_service_icmp_errors_forwarded",
                "ICMP errors about a flow sent on to the flow's backend",
                |s| s.icmp_errors_forwarded,
            ),
            (
                "farol_lb_service_dropped_no_nat_port_flows",
                "New NAT flows dropped: no source port of this node was free",
                |s| s.drops_no_nat_port,
            ),
            (
                "farol_lb_service_nat_replies_packets",
                "Backend replies translated back to the client (NAT mode)",
                |s| s.nat_replies,
            ),
        ];
        for (name, help, field) in service_families {
            let rows = snapshot
                .services
                .iter()
                .map(|service| {
                    (
                        vec![("service", service.name.as_str())],
                        ConstCounter::new(field(&service.stats)),
                    )
                })
                .collect();
            family(&mut encoder, name, help, MetricType::Counter, rows)?;
        }

        let backends: Vec<(&str, &BackendSnapshot, bool)> = snapshot
            .services
            .iter()
            .flat_map(|service| {
                let planned = plan.services.iter().find(|p| p.name == service.name);
                service.backends.iter().map(move |backend| {
                    let up = planned
                        .and_then(|p| p.backends.iter().find(|b| b.name == backend.name))
                        .is_some_and(|b| b.alive);
                    (service.name.as_str(), backend, up)
                })
            })
            .collect();
        type BackendField = fn(&BackendSnapshot) -> u64;
        let backend_families: [(&str, &str, BackendField); 4] = [
            (
                "farol_lb_backend_packets",
                "Packets sent to the backend",
                |b| b.stats.packets,
            ),
            ("farol_lb_backend_bytes", "Bytes sent to the backend", |b| {
                b.stats.bytes
            }),
            (
                "farol_lb_backend_new_flows",
                "Flows scheduled to the backend",
                |b| b.stats.new_flows,
            ),
            (
                "farol_lb_backend_moved_flows",
                "Established flows moved away because the backend died",
                |b| b.stats.moved_flows,
            ),
        ];
        for (name, help, field) in backend_families {
            let rows = backends
                .iter()
                .map(|(service, backend, _)| {
                    (
                        vec![("service", *service), ("backend", backend.name.as_str())],
                        ConstCounter::new(field(backend)),
                    )
                })
                .collect();
            family(&mut encoder, name, help, MetricType::Counter, rows)?;
        }
        let active = backends
            .iter()
            .map(|(service, backend, _)| {
                (
                    vec![("service", *service), ("backend", backend.name.as_str())],
                    ConstGauge::new(backend.active_flows as i64),
                )
            })
            .collect();
        family(
            &mut encoder,
            "farol_lb_backend_active_flows",
            "Flows not yet closed (approximate)",
            MetricType::Gauge,
            active,
        )?;
        let up = backends
            .iter()
            .map(|(service, backend, up)| {
                (
                    vec![("service", *service), ("backend", backend.name.as_str())],
                    ConstGauge::new(i64::from(*up)),
                )
            })
            .collect();
        family(
            &mut encoder,
            "farol_lb_backend_up",
            "1 when the backend can take new flows",
            MetricType::Gauge,
            up,
        )
    }
}
