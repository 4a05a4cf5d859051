//! Planned switchover on the cluster state (`agent pg switchover NODE`):
//! the lease holder hands the primary record over to a caught-up standby
//! with no committed transaction lost.
//!
//! Any agent takes the request (control socket), checks what it can (the
//! target is a PostgreSQL node, not already the primary, this agent sees a
//! quorum) and forwards it to the recorded primary's agent over the signed
//! cluster port ([`ClusterHandle::request_handoff`]). There, in order:
//!
//! 1. the target must be streaming, within `max_lag_bytes` (the primary's
//!    `pg_stat_replication`), and the agent must hold the lease and see a
//!    quorum: otherwise the request is refused and nothing changes;
//! 2. every agent's pooler is paused ([`SwitchoverNotice::Started`]): new
//!    transactions for the primary are held, running ones finish (bounded
//!    by `pooler.pause_drain_timeout`); the agent waits for their answers;
//! 3. the agent gives up its lease ([`ClusterHandle::pause_lease`]): its
//!    reconciler fences the server (no commit acknowledged any more) and
//!    stops it (fast shutdown: the walsenders send everything up to the
//!    shutdown checkpoint first);
//! 4. pg_controldata gives that checkpoint, the old primary's last record;
//!    the agent waits until the target's `/replica` reports it replayed;
//! 5. the handoff [`ClusterHandle::set_primary`] moves the record without
//!    the lease wait; the target's agent gains the lease and promotes, the
//!    other standbys follow it, the old primary rejoins as its standby; the
//!    poolers release the held transactions once their role checks see the
//!    new primary ([`SwitchoverNotice::Ended`] makes them look at once).
//!
//! If step 3 or 4 does not complete in time, or the handoff is refused,
//! the lease is taken back and the old primary starts again as primary;
//! once it answers as one, the poolers resume towards it.

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{counter::ConstCounter, MetricType},
};
use tracing::{info, warn};

use super::{failover::probe, Lsn, PgNode, Pgha};
use crate::cluster::{ClusterHandle, HandoffHandler, SwitchoverNotice};

/// How long the old primary may take to stop once fenced.
const STOP_TIMEOUT: Duration = Duration::from_secs(20);
/// How long the target may take to replay the old primary's last record.
const REPLAY_TIMEOUT: Duration = Duration::from_secs(20);
/// How long the requester waits for the primary's agent to answer.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(90);
/// How long the poolers may take to answer a switchover notice (pause and
/// drain); one that does not answer in time is not waited for (its
/// clients may see errors, as without a pause).
const NOTICE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the primary's agent waits for the target to answer as primary
/// after the handoff, for the report (the switchover is done either way).
const PROMOTION_WAIT: Duration = Duration::from_secs(15);

/// Switchovers counted for `/metrics`.
#[derive(Debug, Default)]
pub struct SwitchoverStats {
    pub done: AtomicU64,
    /// Refused before anything changed (not caught up, no quorum, ...).
    pub refused: AtomicU64,
    /// Started, then undone: the old primary runs again.
    pub aborted: AtomicU64,
}

/// Runs switchovers for this agent (see the module doc).
#[derive(Debug)]
pub struct Switchover {
    pgha: Pgha,
    cluster: ClusterHandle,
    /// One switchover at a time on this agent.
    running: tokio::sync::Mutex<()>,
    pub stats: Arc<SwitchoverStats>,
}

impl Switchover {
    /// The service, registered with the cluster state as this agent's
    /// handoff handler.
    pub fn start(pgha: Pgha, cluster: ClusterHandle) -> Arc<Switchover> {
        let service = Arc::new(Switchover {
            pgha,
            cluster: cluster.clone(),
            running: tokio::sync::Mutex::new(()),
            stats: Arc::new(SwitchoverStats::default()),
        });
        let handler: HandoffHandler = {
            let service = service.clone();
            Arc::new(move |target: String| {
                let service = service.clone();
                // A task of its own: a requester that goes away (CLI
                // interrupted, connection cut) must not cancel the sequence
                // halfway, with the lease given up and never taken back.
                let task = tokio::spawn(async move { service.run_as_primary(&target).await });
                Box::pin(async move {
                    task.await
                        .unwrap_or_else(|error| Err(format!("the switchover task failed: {error}")))
                })
            })
        };
        cluster.serve_handoffs(handler);
        service
    }

    /// What every agent checks before forwarding a request.
    fn check_request(&self, target: &str) -> Result<(), String> {
        let plan = self.pgha.plan();
        if plan.member(target).is_err() {
            return Err(format!(
                "{target:?} is not a PostgreSQL node of this cluster (nodes: {})",
                plan.members
                    .iter()
                    .map(|m| m.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        let members = self.cluster.members().borrow().clone();
        if !members.has_quorum {
            return Err(format!(
                "no quorum: {} reaches {} of the voters {} (a majority is needed to move the primary)",
                self.cluster.node(),
                members
                    .reachable
                    .iter()
                    .filter(|n| members.voters.contains(n))
                    .count(),
                members.voters.join(", ")
            ));
        }
        match self.cluster.primary().borrow().as_ref() {
            None => Err("no primary is recorded yet: nothing to switch over".into()),
            Some(record) if record.node == target => Err(format!(
                "{target} is already the primary (epoch {})",
                record.epoch
            )),
            Some(_) => Ok(()),
        }
    }

    /// `agent pg switchover NODE` on this agent: checks, then runs it on
    /// the recorded primary's agent (here or forwarded).
    pub async fn request(&self, target: &str) -> Result<String, String> {
        if let Err(why) = self.check_request(target) {
            self.stats.refused.fetch_add(1, Ordering::Relaxed);
            warn!(target, reason = %why, "PostgreSQL switchover refused");
            return Err(why);
        }
        self.cluster.request_handoff(target, REQUEST_TIMEOUT).await
    }

    /// On the lease holder: the sequence of the module doc.
    async fn run_as_primary(&self, target: &str) -> Result<String, String> {
        let Ok(_running) = self.running.try_lock() else {
            return Err("a switchover is already under way on the primary's agent".into());
        };
        let result = self.switch(target).await;
        match &result {
            Ok(summary) => {
                self.stats.done.fetch_add(1, Ordering::Relaxed);
                info!(target, %summary, "PostgreSQL switchover done");
            }
            Err(Refusal::Refused(why)) => {
                self.stats.refused.fetch_add(1, Ordering::Relaxed);
                warn!(target, reason = %why, "PostgreSQL switchover refused");
            }
            Err(Refusal::Aborted(why)) => {
                self.stats.aborted.fetch_add(1, Ordering::Relaxed);
                warn!(target, reason = %why, "PostgreSQL switchover aborted: this node takes its lease back and runs the primary again");
            }
        }
        result.map_err(|refusal| match refusal {
            Refusal::Refused(why) => why,
            Refusal::Aborted(why) => {
                format!("{why}; aborted: the old primary runs again")
            }
        })
    }

    async fn switch(&self, target: &str) -> Result<String, Refusal> {
        let plan = self.pgha.plan().clone();
        self.check_request(target).map_err(Refusal::Refused)?;
        let me = self.cluster.node().to_owned();
        let record = self.cluster.primary().borrow().clone();
        if record.as_ref().is_none_or(|r| r.node != me) {
            return Err(Refusal::Refused(format!(
                "{me} is no longer the recorded primary"
            )));
        }
        if !*self.cluster.holds_lease().borrow() {
            return Err(Refusal::Refused(format!(
                "{me} does not hold the primary lease (a majority of voters did not commit its renewal)"
            )));
        }
        let status = self.pgha.observe_now(false).await;
        let row = status.replication.iter().find(|row| row.name == target);
        match row {
            Some(row) if row.state == "streaming" && row.lag_bytes <= plan.max_lag_bytes => {}
            Some(row) => {
                return Err(Refusal::Refused(format!(
                    "{target} is not a caught-up standby: {} with {} bytes to replay (postgres.max_lag_bytes = {})",
                    row.state, row.lag_bytes, plan.max_lag_bytes
                )))
            }
            None => {
                return Err(Refusal::Refused(format!(
                    "{target} is not a caught-up standby: it does not stream from {me} (pg_stat_replication has no {target})"
                )))
            }
        }
        let member = plan
            .member(target)
            .map_err(|e| Refusal::Refused(e.to_string()))?
            .clone();

        // 2. The poolers hold new transactions and drain running ones.
        let started = Instant::now();
        let answers = self
            .cluster
            .announce_switchover(
                &SwitchoverNotice::Started {
                    from: me.clone(),
                    to: target.to_owned(),
                },
                NOTICE_TIMEOUT,
            )
            .await;
        let poolers = describe_answers(&answers);
        let paused = started.elapsed();
        info!(target, poolers = %poolers, paused_ms = paused.as_millis() as u64, "PostgreSQL switchover: poolers paused");
        // 3. No lease: the reconciler fences and stops the server.
        let epoch = match self.cluster.pause_lease(target) {
            Ok(epoch) => epoch,
            Err(error) => {
                self.end_pause(&me, target, false, error.to_string());
                return Err(Refusal::Refused(error.to_string()));
            }
        };
        info!(
            target,
            epoch, "PostgreSQL switchover: lease given up, the primary is being fenced and stopped"
        );
        let outcome = async {
            let local = PgNode::new(plan.clone()).map_err(|e| e.to_string())?;
            let final_lsn = wait_stopped(&local).await?;
            let stopped = started.elapsed();
            // 3. The target replays the old primary's last record.
            let replay_deadline = Instant::now() + REPLAY_TIMEOUT;
            loop {
                let replayed = probe(&plan, &member, "/replica")
                    .await
                    .and_then(|(_, body)| body["xlog"]["replayed_location"].as_u64());
                if replayed.is_some_and(|at| at > final_lsn.0) {
                    break;
                }
                if Instant::now() > replay_deadline {
                    return Err(format!(
                        "{target} did not replay up to the old primary's last record {final_lsn} within {REPLAY_TIMEOUT:?} (replayed: {:?})",
                        replayed.map(|l| Lsn(l).to_string())
                    ));
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let replayed = started.elapsed();
            // 4. The handoff.
            let new = self
                .cluster
                .set_primary(target, epoch)
                .await
                .map_err(|e| format!("the handoff to {target} was refused: {e}"))?;
            Ok((final_lsn, stopped, replayed, new))
        }
        .await;
        let (final_lsn, stopped, replayed, new) = match outcome {
            Ok(done) => done,
            Err(why) => {
                self.cluster.resume_lease();
                self.end_pause(&me, target, false, why.clone());
                return Err(Refusal::Aborted(why));
            }
        };
        let handed = started.elapsed();
        let promoted = {
            let deadline = Instant::now() + PROMOTION_WAIT;
            loop {
                if matches!(probe(&plan, &member, "/primary").await, Some((200, _))) {
                    break Some(started.elapsed());
                }
                if Instant::now() > deadline {
                    break None;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        self.end_pause(&me, target, true, format!("{target} is the primary"));
        Ok(format!(
            "{target} is the primary (epoch {}): poolers paused after {} ms ({poolers}), {me} stopped at {final_lsn} after {} ms, {target} replayed it after {} ms, record handed over after {} ms, {}",
            new.epoch,
            paused.as_millis(),
            stopped.as_millis(),
            replayed.as_millis(),
            handed.as_millis(),
            match promoted {
                Some(at) => format!("{target} answered as primary after {} ms", at.as_millis()),
                None => format!("{target} did not answer as primary within {PROMOTION_WAIT:?} (its agent promotes once it holds the lease)"),
            }
        ))
    }
}

impl Switchover {
    /// Tells every pooler the switchover ended (in a task of its own: the
    /// answer does not wait for it). When it did not happen, first waits
    /// (at most [`PROMOTION_WAIT`]) until this node's server answers as the
    /// primary again, so the held transactions find it running.
    fn end_pause(&self, me: &str, target: &str, done: bool, detail: String) {
        let cluster = self.cluster.clone();
        let plan = self.pgha.plan().clone();
        let (from, to) = (me.to_owned(), target.to_owned());
        tokio::spawn(async move {
            if !done {
                if let Ok(member) = plan.member(&from) {
                    let deadline = Instant::now() + PROMOTION_WAIT;
                    while Instant::now() < deadline
                        && !matches!(probe(&plan, member, "/primary").await, Some((200, _)))
                    {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
            let answers = cluster
                .announce_switchover(
                    &SwitchoverNotice::Ended {
                        from,
                        to,
                        done,
                        detail,
                    },
                    NOTICE_TIMEOUT,
                )
                .await;
            info!(done, poolers = %describe_answers(&answers), "PostgreSQL switchover: poolers told it ended");
        });
    }
}

/// `node: answer; node: answer` for logs and the report.
fn describe_answers(answers: &[(String, Result<String, String>)]) -> String {
    answers
        .iter()
        .map(|(node, answer)| match answer {
            Ok(text) => format!("{node}: {text}"),
            Err(error) => format!("{node}: no answer ({error})"),
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// Why a switchover did not happen.
enum Refusal {
    /// Nothing changed.
    Refused(String),
    /// The old primary had been stopped and is started again.
    Aborted(String),
}

/// Waits until the fenced server shut down cleanly; its shutdown
/// checkpoint is the last record it wrote.
async fn wait_stopped(local: &PgNode) -> Result<Lsn, String> {
    let deadline = Instant::now() + STOP_TIMEOUT;
    loop {
        match local.control_data().await {
            Ok(control) if control.state == "shut down" => return Ok(control.checkpoint),
            Ok(control) if Instant::now() > deadline => {
                return Err(format!(
                    "{} did not shut down within {STOP_TIMEOUT:?} (pg_controldata: {:?})",
                    local.plan.node, control.state
                ))
            }
            Err(error) if Instant::now() > deadline => {
                return Err(format!(
                    "cannot read {}'s control file: {}",
                    local.plan.node,
                    crate::error_chain(&error)
                ))
            }
            _ => tokio::time::sleep(Duration::from_millis(25)).await,
        }
    }
}

/// `farol_pg_switchovers_total{outcome}` on `/metrics`.
#[derive(Debug)]
pub struct SwitchoverCollector(pub Arc<SwitchoverStats>);

impl Collector for SwitchoverCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let stats = &self.0;
        let mut family = encoder.encode_descriptor(
            "farol_pg_switchovers",
            "Planned switchovers requested on or run by this agent, by outcome",
            None,
            MetricType::Counter,
        )?;
        for (outcome, value) in [
            ("done", &stats.done),
            ("refused", &stats.refused),
            ("aborted", &stats.aborted),
        ] {
            ConstCounter::new(value.load(Ordering::Relaxed))
                .encode(family.encode_family(&[("outcome", outcome)])?)?;
        }
        Ok(())
    }
}
