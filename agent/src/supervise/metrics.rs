//! The supervised children on `/metrics`, read from their status at
//! scrape time.

use std::sync::Arc;

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{counter::ConstCounter, gauge::ConstGauge, MetricType},
};

use super::child::{ChildSnapshot, ChildState, ChildStatus};

#[derive(Debug)]
pub struct SuperviseCollector {
    children: Vec<Arc<ChildStatus>>,
}

impl SuperviseCollector {
    pub(super) fn new(children: Vec<Arc<ChildStatus>>) -> SuperviseCollector {
        SuperviseCollector { children }
    }
}

type Labels<'a> = Vec<(&'a str, &'a str)>;
/// Name, help, and how to read one counter from a snapshot.
type ChildCounter = (&'static str, &'static str, fn(&ChildSnapshot) -> u64);

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

impl Collector for SuperviseCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        if self.children.is_empty() {
            return Ok(());
        }
        let snapshots: Vec<ChildSnapshot> = self.children.iter().map(|c| c.snapshot()).collect();
        let states = snapshots
            .iter()
            .flat_map(|s| {
                ChildState::ALL.iter().map(move |state| {
                    (
                        vec![("child", s.name.as_str()), ("state", state.label())],
                        ConstGauge::new(i64::from(s.state == *state)),
                    )
                })
            })
            .collect();
        family(
            &mut encoder,
            "farol_supervise_state",
            "1 for the state the child is in (gave_up: restarts exhausted)",
            MetricType::Gauge,
            states,
        )?;
        let counters: [ChildCounter; 2] = [
            (
                "farol_supervise_restarts",
                "Starts of the child after its first",
                |s| s.restarts,
            ),
            (
                "farol_supervise_crashes",
                "Exits the agent did not ask for, failed starts included",
                |s| s.crashes,
            ),
        ];
        for (name, help, field) in counters {
            let rows = snapshots
                .iter()
                .map(|s| {
                    (
                        vec![("child", s.name.as_str())],
                        ConstCounter::new(field(s)),
                    )
                })
                .collect();
            family(&mut encoder, name, help, MetricType::Counter, rows)?;
        }
        let exits = snapshots
            .iter()
            .flat_map(|s| {
                s.exits.iter().map(move |(how, count)| {
                    (
                        vec![("child", s.name.as_str()), ("status", how.as_str())],
                        ConstCounter::new(*count),
                    )
                })
            })
            .collect();
        family(
            &mut encoder,
            "farol_supervise_exits",
            "Exits of the child by status (\"exit 1\", \"SIGKILL\")",
            MetricType::Counter,
            exits,
        )?;
        let reloads = snapshots
            .iter()
            .flat_map(|s| {
                s.reloads.iter().map(move |(result, count)| {
                    (
                        vec![("child", s.name.as_str()), ("result", *result)],
                        ConstCounter::new(*count),
                    )
                })
            })
            .collect();
        family(
            &mut encoder,
            "farol_supervise_reloads",
            "Reload requests by result (refused: the config test failed)",
            MetricType::Counter,
            reloads,
        )?;
        let recovery = snapshots
            .iter()
            .filter_map(|s| {
                s.last_recovery.map(|d| {
                    (
                        vec![("child", s.name.as_str())],
                        ConstGauge::new(d.as_secs_f64()),
                    )
                })
            })
            .collect();
        family(
            &mut encoder,
            "farol_supervise_last_recovery_seconds",
            "Time from the child's last crash to ready again",
            MetricType::Gauge,
            recovery,
        )
    }
}
