//! Health figures on `/metrics`, read from [`Health`] at scrape time.

use std::sync::Arc;

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{counter::ConstCounter, gauge::ConstGauge, MetricType},
};

use super::{AdminState, Health};

#[derive(Debug)]
pub struct HealthCollector {
    health: Arc<Health>,
}

impl HealthCollector {
    pub fn new(health: Arc<Health>) -> HealthCollector {
        HealthCollector { health }
    }
}

impl Collector for HealthCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let rows = self.health.status();
        let own = self.health.own_state();
        let mut family = encoder.encode_descriptor(
            "farol_node_admin_state",
            "This node's own admin state (1 for the current one), as its agent check answers it",
            None,
            MetricType::Gauge,
        )?;
        for state in AdminState::ALL {
            ConstGauge::new(i64::from(state == own))
                .encode(family.encode_family(&[("state", state.label())])?)?;
        }

        let mut family = encoder.encode_descriptor(
            "farol_health_backend_check_up",
            "1 while the backend's health checks pass (rise/fall applied); unchecked backends are not listed",
            None,
            MetricType::Gauge,
        )?;
        for row in rows.iter().filter(|r| r.checked) {
            ConstGauge::new(i64::from(row.check_state == "up")).encode(family.encode_family(
                &[
                    ("service", row.service.as_str()),
                    ("backend", row.backend.as_str()),
                ],
            )?)?;
        }
        let mut family = encoder.encode_descriptor(
            "farol_health_backend_admin_state",
            "The backend's admin state (1 for the current one): ready, drain or maint",
            None,
            MetricType::Gauge,
        )?;
        for row in &rows {
            for state in AdminState::ALL {
                ConstGauge::new(i64::from(state == row.admin)).encode(family.encode_family(
                    &[
                        ("service", row.service.as_str()),
                        ("backend", row.backend.as_str()),
                        ("state", state.label()),
                    ],
                )?)?;
            }
        }
        let mut family = encoder.encode_descriptor(
            "farol_health_checks",
            "Health checks run, by result",
            None,
            MetricType::Counter,
        )?;
        for row in rows.iter().filter(|r| r.checked) {
            for (result, count) in [("passed", row.checks_passed), ("failed", row.checks_failed)] {
                ConstCounter::new(count).encode(family.encode_family(&[
                    ("service", row.service.as_str()),
                    ("backend", row.backend.as_str()),
                    ("result", result),
                ])?)?;
            }
        }
        let mut family = encoder.encode_descriptor(
            "farol_health_state_changes",
            "Times the backend went up or down by its checks",
            None,
            MetricType::Counter,
        )?;
        for row in rows.iter().filter(|r| r.checked) {
            ConstCounter::new(row.state_changes).encode(family.encode_family(&[
                ("service", row.service.as_str()),
                ("backend", row.backend.as_str()),
            ])?)?;
        }
        let mut family = encoder.encode_descriptor(
            "farol_health_last_check_duration_seconds",
            "How long the backend's last health check took",
            None,
            MetricType::Gauge,
        )?;
        for row in &rows {
            if let Some(last) = &row.last_check {
                prometheus_client::metrics::gauge::ConstGauge::new(last.latency_seconds).encode(
                    family.encode_family(&[
                        ("service", row.service.as_str()),
                        ("backend", row.backend.as_str()),
                    ])?,
                )?;
            }
        }
        Ok(())
    }
}
