//! `farol_cluster_*` on `/metrics`, read from the handle at each scrape.

use std::sync::atomic::Ordering;

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{counter::ConstCounter, gauge::ConstGauge, MetricType},
};

use super::{transport::Rejection, ClusterHandle};

/// The collector of one agent's cluster state.
#[derive(Debug)]
pub struct ClusterCollector(pub ClusterHandle);

fn gauge(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: i64,
) -> Result<(), std::fmt::Error> {
    let metric = ConstGauge::new(value);
    metric.encode(encoder.encode_descriptor(name, help, None, MetricType::Gauge)?)
}

fn counter(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: u64,
) -> Result<(), std::fmt::Error> {
    let metric = ConstCounter::new(value);
    metric.encode(encoder.encode_descriptor(name, help, None, MetricType::Counter)?)
}

impl Collector for ClusterCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let status = self.0.status();
        let core = &self.0.core;
        let encoder = &mut encoder;
        gauge(
            encoder,
            "farol_cluster_has_quorum",
            "1 when this agent reaches a majority of the voters",
            i64::from(status.membership.has_quorum),
        )?;
        gauge(
            encoder,
            "farol_cluster_is_raft_leader",
            "1 when this agent is the Raft leader",
            i64::from(status.raft_state == "Leader"),
        )?;
        gauge(
            encoder,
            "farol_cluster_raft_term",
            "The Raft term this agent is in",
            status.raft_term as i64,
        )?;
        gauge(
            encoder,
            "farol_cluster_primary_epoch",
            "Epoch of the committed primary record (0: no primary yet)",
            status.primary.as_ref().map_or(0, |r| r.epoch as i64),
        )?;
        let mut family = encoder.encode_descriptor(
            "farol_cluster_primary",
            "1 for the node the committed primary record names",
            None,
            MetricType::Gauge,
        )?;
        if let Some(record) = &status.primary {
            ConstGauge::new(1i64)
                .encode(family.encode_family(&[("node", record.node.as_str())])?)?;
        }
        gauge(
            encoder,
            "farol_cluster_lease_held",
            "1 while this agent holds the primary lease",
            i64::from(status.holds_lease),
        )?;
        gauge(
            encoder,
            "farol_cluster_members_reachable",
            "Members this agent heard from within the election timeout (itself included)",
            status.membership.reachable.len() as i64,
        )?;
        gauge(
            encoder,
            "farol_cluster_voters",
            "Voters in the config",
            status.membership.voters.len() as i64,
        )?;
        counter(
            encoder,
            "farol_cluster_lease_gained",
            "Times this agent gained the primary lease",
            core.counters.lease_gained.load(Ordering::Relaxed),
        )?;
        counter(
            encoder,
            "farol_cluster_lease_lost",
            "Times this agent lost or gave up the primary lease",
            core.counters.lease_lost.load(Ordering::Relaxed),
        )?;
        counter(
            encoder,
            "farol_cluster_quorum_lost",
            "Times this agent stopped reaching a majority of the voters",
            core.counters.quorum_lost.load(Ordering::Relaxed),
        )?;
        counter(
            encoder,
            "farol_cluster_raft_leader_changes",
            "Changes of the Raft leader this agent saw",
            core.counters.leader_changes.load(Ordering::Relaxed),
        )?;
        let mut family = encoder.encode_descriptor(
            "farol_cluster_lease_promises",
            "Lease promises this agent, as a voter, answered to the primary, by outcome",
            None,
            MetricType::Counter,
        )?;
        for (outcome, value) in [
            ("granted", &core.counters.promises_granted),
            ("refused", &core.counters.promises_refused),
        ] {
            ConstCounter::new(value.load(Ordering::Relaxed))
                .encode(family.encode_family(&[("outcome", outcome)])?)?;
        }
        let mut family = encoder.encode_descriptor(
            "farol_cluster_lease_revocations",
            "Revocations of a primary's lease this agent, as a voter, answered before another \
             primary is chosen: revoked, held (a promise still ran), refused",
            None,
            MetricType::Counter,
        )?;
        for (outcome, value) in [
            ("revoked", &core.counters.revocations_given),
            ("held", &core.counters.revocations_held),
            ("refused", &core.counters.revocations_refused),
        ] {
            ConstCounter::new(value.load(Ordering::Relaxed))
                .encode(family.encode_family(&[("outcome", outcome)])?)?;
        }
        let mut family = encoder.encode_descriptor(
            "farol_cluster_rejected_messages",
            "Messages on the cluster port refused (unauthenticated, oversized, malformed)",
            None,
            MetricType::Counter,
        )?;
        for reason in Rejection::ALL {
            ConstCounter::new(core.rejections.count(reason))
                .encode(family.encode_family(&[("reason", reason.label())])?)?;
        }
        Ok(())
    }
}
