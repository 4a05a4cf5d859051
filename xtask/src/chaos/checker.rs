//! What the chaos suite checks: that the cluster is healthy (before a
//! scenario, and after it once healed) and that nothing acknowledged was
//! lost or duplicated.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::{Duration, Instant},
};

use anyhow::{bail, Result};

use super::{
    nemesis::TARGET,
    workload::{file_contents, file_name, longest_gap, Op, Service, FILES_DIR, TABLE},
};
use crate::{
    cluster::{scrape, Cluster, VIP, VOLUME_NODES},
    demo_postgres::{self, api_status, psql_direct, DATABASE_NODES},
};

/// The cluster as healthy: who holds the VIP and who is the primary.
#[derive(Debug, Clone)]
pub(crate) struct Health {
    pub vip_owner: String,
    pub primary: String,
}

/// Which nodes have the VIP on their interface.
pub(crate) fn vip_owners(cluster: &Cluster) -> Vec<String> {
    cluster
        .names
        .iter()
        .filter(|node| {
            cluster
                .lab
                .run(node, "ip", &["-o", "-4", "addr", "show", "dev", "eth0"])
                .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).contains(&format!(" {VIP}/")))
        })
        .cloned()
        .collect()
}

/// The nodes whose agent answers Patroni's `/primary` with 200.
pub(crate) fn api_primaries(cluster: &Cluster) -> Vec<&'static str> {
    DATABASE_NODES
        .into_iter()
        .filter(|node| api_status(&cluster.lab, node, "/primary").ok() == Some(200))
        .collect()
}

/// The database nodes whose server is out of recovery (accepts writes).
fn writable_servers(cluster: &Cluster) -> Vec<&'static str> {
    DATABASE_NODES
        .into_iter()
        .filter(|node| {
            psql_direct(&cluster.lab, node, "postgres", "SELECT pg_is_in_recovery()").is_ok_and(
                |out| out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "f",
            )
        })
        .collect()
}

/// What `agent volume heal-info` says on `node`: None when nothing is
/// pending and the replica is current, else a summary.
pub(crate) fn heal_pending(cluster: &Cluster, node: &str) -> Option<String> {
    let out = match cluster
        .lab
        .command(node, cluster.agent_binary())
        .args(["volume", "heal-info", "--json", "--config"])
        .arg(&cluster.apache.cluster_file)
        .args(["--node", node])
        .output()
    {
        Ok(out) if out.status.success() => out,
        Ok(out) => {
            return Some(format!(
                "heal-info on {node} failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
        Err(error) => return Some(format!("heal-info on {node}: {error}")),
    };
    let reports: serde_json::Value = match serde_json::from_slice(&out.stdout) {
        Ok(value) => value,
        Err(error) => return Some(format!("heal-info on {node}: {error}")),
    };
    let mut pending = Vec::new();
    for report in reports.as_array().into_iter().flatten() {
        if report["current"] != serde_json::Value::Bool(true) {
            pending.push(format!("{node} not current"));
        }
        for peer in report["peers"].as_array().into_iter().flatten() {
            let count = peer["pending"].as_u64().unwrap_or(u64::MAX);
            if count != 0 || peer["up"] != serde_json::Value::Bool(true) {
                pending.push(format!(
                    "{node}: peer {} {} with {count} pending",
                    peer["node"].as_str().unwrap_or("?"),
                    if peer["up"] == serde_json::Value::Bool(true) {
                        "up"
                    } else {
                        "down"
                    }
                ));
            }
        }
    }
    (!pending.is_empty()).then(|| pending.join(", "))
}

/// Why the cluster is not healthy, or who holds what when it is.
fn health(cluster: &Cluster) -> Result<Health, String> {
    for node in &cluster.names {
        if cluster.agent_pid(node).is_none() {
            return Err(format!("the agent on {node} is not running"));
        }
        let metrics = scrape(&cluster.lab, node).map_err(|e| format!("{e:#}"))?;
        if metrics.get("farol_supervise_state{child=\"apache\",state=\"running\"}") != Some(&1.0) {
            return Err(format!("Apache on {node} is not running"));
        }
    }
    let owners = vip_owners(cluster);
    if owners.len() != 1 {
        return Err(format!("VIP owners: {owners:?}"));
    }
    let primaries = api_primaries(cluster);
    if primaries.len() != 1 {
        return Err(format!("nodes answering /primary: {primaries:?}"));
    }
    let writable = writable_servers(cluster);
    if writable != primaries {
        return Err(format!(
            "servers out of recovery {writable:?}, /primary says {primaries:?}"
        ));
    }
    let primary = primaries[0];
    let synchronous = psql_direct(
        &cluster.lab,
        primary,
        "postgres",
        "SELECT count(*) FROM pg_stat_replication WHERE sync_state IN ('sync', 'quorum') AND state = 'streaming'",
    )
    .map_err(|e| format!("{e:#}"))?;
    if String::from_utf8_lossy(&synchronous.stdout).trim() != "2" {
        return Err(format!(
            "{primary} does not stream to two synchronous standbys yet"
        ));
    }
    for node in VOLUME_NODES {
        if let Some(pending) = heal_pending(cluster, node) {
            return Err(format!("volume heal-info: {pending}"));
        }
    }
    Ok(Health {
        vip_owner: owners[0].clone(),
        primary: primary.to_owned(),
    })
}

/// Waits until the cluster is healthy: every agent and Apache running,
/// exactly one VIP owner, exactly one primary (the API and the servers
/// agree) with two streaming synchronous standbys, and nothing pending in
/// any replica's heal-info.
pub(crate) fn wait_healthy(cluster: &Cluster, timeout: Duration) -> Result<Health> {
    let deadline = Instant::now() + timeout;
    loop {
        match health(cluster) {
            Ok(health) => return Ok(health),
            Err(why) if Instant::now() > deadline => {
                bail!("the cluster did not become healthy within {timeout:?}: {why}")
            }
            Err(_) => std::thread::sleep(Duration::from_secs(1)),
        }
    }
}

/// Puts the cluster back in its starting shape: the primary on
/// [`TARGET`] (a planned switchover if it moved) and the VIP there too.
pub(crate) fn restore(cluster: &Cluster, timeout: Duration) -> Result<Health> {
    let deadline = Instant::now() + timeout;
    let mut health = wait_healthy(cluster, timeout)?;
    while health.primary != TARGET || health.vip_owner != TARGET {
        if Instant::now() > deadline {
            bail!("the cluster did not come back to {TARGET}: {health:?}");
        }
        if health.primary != TARGET {
            let out = cluster
                .lab
                .command(&health.primary, cluster.agent_binary())
                .args(["pg", "switchover", TARGET, "--config"])
                .arg(&cluster.apache.cluster_file)
                .args(["--node", &health.primary])
                .output()?;
            println!(
                "      switchover {} -> {TARGET}: {}",
                health.primary,
                if out.status.success() {
                    String::from_utf8_lossy(&out.stdout).trim().to_owned()
                } else {
                    String::from_utf8_lossy(&out.stderr).trim().to_owned()
                }
            );
        }
        std::thread::sleep(Duration::from_secs(1));
        health = wait_healthy(cluster, deadline.saturating_duration_since(Instant::now()))?;
    }
    Ok(health)
}

/// One scenario's outcome.
#[derive(Debug, Clone)]
pub(crate) struct Verdict {
    pub scenario: String,
    /// Longest time without an acknowledged operation, per service.
    pub unavailable: BTreeMap<Service, f64>,
    pub attempted: BTreeMap<Service, usize>,
    pub acked: BTreeMap<Service, usize>,
    /// Acknowledged but missing (or wrong, or duplicated) afterwards.
    pub lost: BTreeMap<Service, usize>,
    /// Written although not acknowledged (allowed: the answer was lost).
    pub unacked_present: usize,
    pub failures: Vec<String>,
}

impl Verdict {
    pub(crate) fn total(map: &BTreeMap<Service, usize>) -> usize {
        map.values().sum()
    }
}

/// Checks one scenario's operations against the healed cluster.
/// `fault_at`, `healed_at` and `end` are on the workload's clock.
pub(crate) fn check(
    cluster: &Cluster,
    scenario: &str,
    ops: &[Op],
    health: &Health,
    times: (f64, f64, f64),
) -> Verdict {
    let (fault_at, healed_at, end) = times;
    let mut verdict = Verdict {
        scenario: scenario.to_owned(),
        unavailable: BTreeMap::new(),
        attempted: BTreeMap::new(),
        acked: BTreeMap::new(),
        lost: BTreeMap::new(),
        unacked_present: 0,
        failures: Vec::new(),
    };
    for service in Service::ALL {
        let mine: Vec<&Op> = ops.iter().filter(|op| op.service == service).collect();
        verdict.attempted.insert(service, mine.len());
        verdict
            .acked
            .insert(service, mine.iter().filter(|op| op.acked).count());
        verdict
            .unavailable
            .insert(service, longest_gap(ops, service, fault_at, end));
        if !mine.iter().any(|op| op.acked && op.sent >= healed_at) {
            let last_error = mine
                .iter()
                .rev()
                .find_map(|op| op.error.as_deref())
                .unwrap_or("no error recorded");
            verdict.failures.push(format!(
                "{}: no operation acknowledged after the fault was undone (never recovered); \
                 last error: {last_error}",
                service.name()
            ));
        }
    }
    check_sql(cluster, scenario, ops, health, &mut verdict);
    check_files(cluster, scenario, ops, &mut verdict);
    let owners = vip_owners(cluster);
    if owners.len() != 1 {
        verdict
            .failures
            .push(format!("VIP owners after healing: {owners:?}"));
    }
    let writable = writable_servers(cluster);
    if writable.len() != 1 {
        verdict.failures.push(format!(
            "PostgreSQL servers accepting writes after healing: {writable:?}"
        ));
    }
    verdict
}

fn check_sql(
    cluster: &Cluster,
    scenario: &str,
    ops: &[Op],
    health: &Health,
    verdict: &mut Verdict,
) {
    let query =
        format!("SELECT id, count(*) FROM {TABLE} WHERE scenario = '{scenario}' GROUP BY id");
    let out = match psql_direct(&cluster.lab, &health.primary, demo_postgres::USER, &query) {
        Ok(out) if out.status.success() => out,
        Ok(out) => {
            verdict.failures.push(format!(
                "sql: reading {TABLE} on {}: {}",
                health.primary,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
            return;
        }
        Err(error) => {
            verdict.failures.push(format!("sql: {error:#}"));
            return;
        }
    };
    let rows: BTreeMap<u64, u64> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| {
            let (id, count) = line.split_once('|')?;
            Some((id.trim().parse().ok()?, count.trim().parse().ok()?))
        })
        .collect();
    let acked: BTreeSet<u64> = ops
        .iter()
        .filter(|op| op.service == Service::Sql && op.acked)
        .map(|op| op.id)
        .collect();
    let missing: Vec<u64> = acked
        .iter()
        .copied()
        .filter(|id| !rows.contains_key(id))
        .collect();
    let duplicated: Vec<u64> = rows
        .iter()
        .filter(|(_, count)| **count > 1)
        .map(|(id, _)| *id)
        .collect();
    verdict.unacked_present += rows.keys().filter(|id| !acked.contains(id)).count();
    verdict
        .lost
        .insert(Service::Sql, missing.len() + duplicated.len());
    if !missing.is_empty() {
        verdict.failures.push(format!(
            "sql: {} acknowledged rows missing on the primary {}: ids {:?}",
            missing.len(),
            health.primary,
            &missing[..missing.len().min(20)]
        ));
    }
    if !duplicated.is_empty() {
        verdict.failures.push(format!(
            "sql: {} rows present more than once: ids {:?}",
            duplicated.len(),
            &duplicated[..duplicated.len().min(20)]
        ));
    }
}

/// A 64-bit FNV-1a digest (a fingerprint to print, not a security check).
fn fnv(digest: &mut u64, bytes: &[u8]) {
    for byte in bytes {
        *digest ^= u64::from(*byte);
        *digest = digest.wrapping_mul(0x100_0000_01b3);
    }
}

fn check_files(cluster: &Cluster, scenario: &str, ops: &[Op], verdict: &mut Verdict) {
    let acked: Vec<u64> = ops
        .iter()
        .filter(|op| op.service == Service::Files && op.acked)
        .map(|op| op.id)
        .collect();
    let mut lost = BTreeSet::new();
    let mut digests = BTreeMap::new();
    for node in VOLUME_NODES {
        let dir = cluster.brick(node).join(FILES_DIR);
        for id in &acked {
            let name = file_name(scenario, *id);
            match std::fs::read(dir.join(&name)) {
                Ok(bytes) if bytes == file_contents(scenario, *id) => {}
                Ok(bytes) => {
                    lost.insert(*id);
                    verdict.failures.push(format!(
                        "files: {name} on {node}'s brick has {} bytes, not the {} written",
                        bytes.len(),
                        file_contents(scenario, *id).len()
                    ));
                }
                Err(error) => {
                    lost.insert(*id);
                    verdict
                        .failures
                        .push(format!("files: {name} on {node}'s brick: {error}"));
                }
            }
        }
        // The whole directory, every scenario so far: the replicas must be
        // identical.
        let mut names: Vec<String> = std::fs::read_dir(&dir)
            .map(|entries| {
                entries
                    .flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        let mut digest = 0xcbf2_9ce4_8422_2325_u64;
        for name in &names {
            fnv(&mut digest, name.as_bytes());
            fnv(
                &mut digest,
                &std::fs::read(dir.join(name)).unwrap_or_default(),
            );
        }
        digests.insert(node, (names.len(), digest));
    }
    let present_unacked = std::fs::read_dir(cluster.brick(VOLUME_NODES[1]).join(FILES_DIR))
        .map(|entries| {
            entries
                .flatten()
                .filter(|e| {
                    let name = e.file_name().to_string_lossy().into_owned();
                    name.starts_with(&format!("{scenario}-"))
                        && !acked.iter().any(|id| file_name(scenario, *id) == name)
                })
                .count()
        })
        .unwrap_or(0);
    verdict.unacked_present += present_unacked;
    verdict.lost.insert(Service::Files, lost.len());
    let distinct: BTreeSet<(usize, u64)> = digests.values().copied().collect();
    if distinct.len() != 1 {
        verdict.failures.push(format!(
            "files: the replicas differ (files, fnv64 of names and contents): {digests:?}"
        ));
    }
    // Failures listed one per file can be many: keep the first few.
    let files_failures: Vec<usize> = verdict
        .failures
        .iter()
        .enumerate()
        .filter(|(_, f)| f.starts_with("files: ") && f.contains("brick"))
        .map(|(i, _)| i)
        .collect();
    if files_failures.len() > 10 {
        let extra = files_failures.len() - 10;
        for index in files_failures.into_iter().skip(10).rev() {
            verdict.failures.remove(index);
        }
        verdict.failures.push(format!(
            "files: ... and {extra} more missing or wrong copies"
        ));
    }
}
