//! `farol_pg_*` on `/metrics`, from the reconciler's last look at the
//! server (every `interval`), so a scrape never waits on PostgreSQL.

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{counter::ConstCounter, gauge::ConstGauge, MetricType},
};

use super::{local::ObservedRole, Pgha};

#[derive(Debug)]
pub struct PgCollector(pub Pgha);

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

impl Collector for PgCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let pgha = &self.0;
        let status = pgha.status();
        let desired = pgha.desired();
        let roles = [
            ObservedRole::Primary,
            ObservedRole::Standby,
            ObservedRole::Down,
        ]
        .into_iter()
        .map(|role| {
            (
                vec![("role", role.label())],
                ConstGauge::new(i64::from(status.role == role)),
            )
        })
        .collect();
        family(
            &mut encoder,
            "farol_pg_role",
            "1 for the role this node's PostgreSQL runs in (down: not answering)",
            MetricType::Gauge,
            roles,
        )?;
        let desired_role = desired.role.to_string();
        family(
            &mut encoder,
            "farol_pg_desired_epoch",
            "Epoch of the decision this node follows, labelled with the role it asks for",
            MetricType::Gauge,
            vec![(
                vec![("desired", desired_role.as_str())],
                ConstGauge::new(desired.epoch as i64),
            )],
        )?;
        family(
            &mut encoder,
            "farol_pg_fenced",
            "1 while this primary's fence is up (commits held, read-only by default)",
            MetricType::Gauge,
            vec![(vec![], ConstGauge::new(i64::from(status.fenced)))],
        )?;
        if let Some(timeline) = status.timeline {
            family(
                &mut encoder,
                "farol_pg_timeline",
                "The server's timeline",
                MetricType::Gauge,
                vec![(vec![], ConstGauge::new(i64::from(timeline)))],
            )?;
        }
        if let Some(lsn) = status.lsn {
            family(
                &mut encoder,
                "farol_pg_wal_position_bytes",
                "The primary's write position, or a standby's replay position, as bytes of WAL",
                MetricType::Gauge,
                vec![(vec![], ConstGauge::new(lsn.0 as i64))],
            )?;
        }
        if let Some(lag) = status.lag_bytes {
            family(
                &mut encoder,
                "farol_pg_replication_lag_bytes",
                "This standby's replay position behind its upstream's current one",
                MetricType::Gauge,
                vec![(vec![], ConstGauge::new(lag as i64))],
            )?;
        }
        if !status.replication.is_empty() {
            let bytes = status
                .replication
                .iter()
                .map(|s| {
                    (
                        vec![
                            ("standby", s.name.as_str()),
                            ("sync_state", s.sync_state.as_str()),
                        ],
                        ConstGauge::new(s.lag_bytes as i64),
                    )
                })
                .collect();
            family(
                &mut encoder,
                "farol_pg_standby_lag_bytes",
                "On the primary: WAL written and not yet replayed by each standby",
                MetricType::Gauge,
                bytes,
            )?;
            let seconds = status
                .replication
                .iter()
                .map(|s| {
                    (
                        vec![("standby", s.name.as_str())],
                        ConstGauge::new(s.lag_seconds),
                    )
                })
                .collect();
            family(
                &mut encoder,
                "farol_pg_standby_lag_seconds",
                "On the primary: each standby's replay_lag (0 when idle)",
                MetricType::Gauge,
                seconds,
            )?;
        }
        let changes = pgha.role_changes();
        let rows = changes
            .iter()
            .map(|(role, count)| (vec![("to", *role)], ConstCounter::new(*count)))
            .collect();
        family(
            &mut encoder,
            "farol_pg_role_changes",
            "Role changes of this node's PostgreSQL, by the role reached",
            MetricType::Counter,
            rows,
        )?;
        Ok(())
    }
}
