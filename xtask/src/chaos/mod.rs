//! `cargo xtask chaos`: the whole four-node cluster under correlated
//! failures (issue 10). The cluster of `cargo xtask demo`, with the VIP
//! master, the PostgreSQL bootstrap primary and a brick on one node
//! (nuster1); a workload from the client (HTTP through the VIP, INSERTs
//! through the pooler on the VIP, fsynced files through nuster2's mount of
//! the volume) runs through every scenario and records each acknowledged
//! operation; the nemesis injects one fault at a time and undoes it; the
//! checker then waits for a healthy cluster and verifies that nothing
//! acknowledged was lost or duplicated, that the replicas are identical,
//! that one primary and one VIP owner remain, and how long each service
//! was unavailable. Prints one table and writes target/bench/chaos.json.
//!
//! Before every scenario the cluster is brought back to its starting shape
//! (a planned switchover returns the primary to nuster1), so every scenario
//! hits the node that holds the VIP, the primary and a brick.

mod checker;
mod nemesis;
mod workload;

use std::{
    collections::BTreeMap,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use xtask::{bench::BenchReport, toolchain, workspace_root};

use crate::{
    cluster::{self, Cluster, ClusterOptions},
    demo_postgres,
};
use checker::Verdict;
use nemesis::{Scenario, SMALL_NODE, TARGET};
use workload::{Service, Workload, FILES_DIR, TABLE};

/// The node whose mount the file workload writes through: it survives
/// every scenario (and stays on the majority side of both partitions).
const WRITER_NODE: &str = "nuster2";
/// How long the cluster may take to be healthy again after a fault.
const HEAL_TIMEOUT: Duration = Duration::from_secs(240);
/// How long the clients may take to see a healthy cluster answer.
const RECOVERY_TIMEOUT: Duration = Duration::from_secs(60);
/// Workload before the fault and after the cluster is healthy again.
const BEFORE: Duration = Duration::from_secs(4);
const AFTER: Duration = Duration::from_secs(3);

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Profile {
    /// The three scenarios that matter most, for CI (a few minutes).
    Ci,
    /// Every scenario.
    Full,
}

#[derive(Debug, clap::Args)]
pub(crate) struct ChaosArgs {
    /// Which scenarios.
    #[arg(long, value_enum, default_value = "full")]
    profile: Profile,
    /// Only this scenario (kill9-agent, kill9-postmaster, power-off,
    /// partition-2-2, partition-1-3, flapping-link, full-disk, clock-jump).
    #[arg(long)]
    scenario: Option<String>,
    /// Prefix of the lab's namespaces.
    #[arg(long, default_value = "chaos")]
    prefix: String,
}

pub(crate) fn run(args: ChaosArgs) -> Result<()> {
    if !xtask::is_root() {
        bail!("chaos creates network namespaces and loads BPF programs: run it as root");
    }
    let scenarios: Vec<Scenario> = match &args.scenario {
        Some(name) => vec![Scenario::from_name(name).with_context(|| {
            format!(
                "--scenario: no scenario {name:?}; expected one of {}",
                Scenario::ALL.map(Scenario::name).join(", ")
            )
        })?],
        None if args.profile == Profile::Ci => Scenario::CI.to_vec(),
        None => Scenario::ALL.to_vec(),
    };
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        ctrlc::set_handler(move || stop.store(true, Ordering::SeqCst))
            .context("installing the Ctrl-C handler")?;
    }
    let started = Instant::now();
    println!("[chaos] toolchain and agent build");
    toolchain::ensure_packages(&[
        ("nftables", "the chaos suite's network partitions"),
        ("libfaketime", "the chaos suite's clock jump"),
    ])?;
    let agent = cluster::prepare()?;
    println!(
        "[chaos] the cluster: VIP master, PostgreSQL primary and a brick on {TARGET}; \
         {SMALL_NODE}'s brick on a small tmpfs and its agent under libfaketime"
    );
    let options = || ClusterOptions {
        prefix: args.prefix.clone(),
        primary: TARGET,
        // The default (1 s; the probe timeout is as long). With the
        // demo's 250 ms on a loaded machine, every probe that times out
        // drops its connection and the next must log in again (SCRAM)
        // within 250 ms, which it never does: the pooler of the
        // restarted VIP node kept sending writes to its own server, now
        // a standby ("cannot execute INSERT in a read-only
        // transaction"), until the run ended.
        role_check_interval: "1s",
        log_dir: workspace_root().join("target/chaos"),
        small_brick: Some((SMALL_NODE, 48)),
        faketime: Some(SMALL_NODE),
    };
    // None only while a broken cluster is replaced.
    let mut cluster = Some(Cluster::start(agent.clone(), options())?);
    let mut verdicts = Vec::new();
    let result = run_all(&mut cluster, &scenarios, &stop, &mut verdicts, || {
        Cluster::start(agent.clone(), options())
    });
    let mut stopped = Ok(());
    if let Some(mut cluster) = cluster {
        if let Err(error) = &result {
            println!("[chaos] stopped: {error:#}");
            cluster.print_warnings(6);
        }
        println!("[chaos] stopping the agents and tearing the lab down");
        stopped = cluster.stop_agents();
    }
    println!();
    print_table(&verdicts);
    let path = report(&verdicts).write()?;
    println!(
        "wrote {} ({:.0} s in all)",
        path.display(),
        started.elapsed().as_secs_f64()
    );
    result?;
    stopped.context("stopping the agents after the last scenario")?;
    let failed: Vec<&str> = verdicts
        .iter()
        .filter(|v| !v.failures.is_empty())
        .map(|v| v.scenario.as_str())
        .collect();
    if !failed.is_empty() {
        bail!("chaos: {} failed", failed.join(", "));
    }
    println!("chaos: every scenario passed: nothing acknowledged was lost");
    Ok(())
}

/// Runs the scenarios in order; a scenario after which the cluster never
/// healed has failed for good, and the next ones get a new cluster (the
/// broken one's agent logs are kept as agent-NODE.SCENARIO.log).
fn run_all(
    cluster: &mut Option<Cluster>,
    scenarios: &[Scenario],
    stop: &AtomicBool,
    verdicts: &mut Vec<Verdict>,
    build: impl Fn() -> Result<Cluster>,
) -> Result<()> {
    prepare(cluster.as_ref().context("no cluster")?)?;
    for (index, scenario) in scenarios.iter().enumerate() {
        if stop.load(Ordering::SeqCst) {
            bail!("interrupted");
        }
        println!(
            "[chaos {}/{}] {}: {}",
            index + 1,
            scenarios.len(),
            scenario.name(),
            scenario.describe()
        );
        let current = cluster.as_mut().context("no cluster")?;
        let verdict = run_scenario(current, *scenario, index as u64 + 1)?;
        print_verdict(&verdict);
        let healthy = !verdict
            .failures
            .iter()
            .any(|f| f.starts_with("never healthy"));
        verdicts.push(verdict);
        if healthy || index + 1 == scenarios.len() {
            continue;
        }
        current.print_warnings(6);
        let _ = current.stop_agents();
        for node in &current.names {
            let log = current.log_file(node);
            let _ = std::fs::rename(&log, log.with_extension(format!("{}.log", scenario.name())));
        }
        println!(
            "[chaos] the cluster did not heal after {name}: its agents' logs are \
             target/chaos/agent-NODE.{name}.log; a new cluster for the remaining scenarios",
            name = scenario.name()
        );
        // The old lab goes down before the new one (same prefix) comes up.
        *cluster = None;
        let fresh = build()?;
        prepare(&fresh)?;
        *cluster = Some(fresh);
    }
    Ok(())
}

/// The database objects and the volume directory the workload writes to.
/// Each step is retried: on a loaded machine the young cluster's primary
/// may still move (a lease renewed late) while it is created.
fn prepare(cluster: &Cluster) -> Result<()> {
    demo_postgres::wait_ready(&cluster.lab)?;
    let create = format!(
        "CREATE TABLE IF NOT EXISTS {TABLE} (id bigint NOT NULL, scenario text NOT NULL, \
         at timestamptz DEFAULT now()); ALTER TABLE {TABLE} OWNER TO {user}",
        user = demo_postgres::USER
    );
    let deadline = Instant::now() + HEAL_TIMEOUT;
    loop {
        let health = checker::restore(cluster, HEAL_TIMEOUT)?;
        let out = demo_postgres::psql_direct(
            &cluster.lab,
            &health.primary,
            demo_postgres::USER,
            &create,
        )?;
        if out.status.success() {
            break;
        }
        let error = String::from_utf8_lossy(&out.stderr).trim().to_owned();
        if Instant::now() > deadline {
            bail!("{create}: {error}");
        }
        println!("      creating {TABLE} failed ({error}); again");
        std::thread::sleep(Duration::from_secs(1));
    }
    // Apache on nuster1..3 serves the volume: the page the web workload gets.
    let page = cluster.mount(WRITER_NODE).join("index.html");
    xtask::lab::wait_for(
        &format!("{} to be writable", page.display()),
        Duration::from_secs(60),
        || std::fs::write(&page, "farol chaos: served from the volume www\n").ok(),
    )?;
    let dir = cluster.mount(WRITER_NODE).join(FILES_DIR);
    xtask::lab::wait_for(
        &format!("{} to be writable", dir.display()),
        Duration::from_secs(60),
        || std::fs::create_dir_all(&dir).ok(),
    )?;
    Ok(())
}

fn run_scenario(cluster: &mut Cluster, scenario: Scenario, index: u64) -> Result<Verdict> {
    let health =
        checker::restore(cluster, HEAL_TIMEOUT).context("the cluster before the scenario")?;
    println!(
        "      healthy: VIP on {}, primary {} with two synchronous standbys, heal-info empty",
        health.vip_owner, health.primary
    );
    let workload = Workload::start(
        &cluster.lab,
        cluster.mount(WRITER_NODE),
        scenario.name(),
        index * 1_000_000,
        Duration::from_secs(420),
    );
    std::thread::sleep(BEFORE);
    let fault_at = workload.now();
    let injected = scenario.inject(cluster);
    let healed_at = workload.now();
    let health = match injected {
        Ok(()) => {
            println!(
                "      fault undone {:.1} s after it began; waiting for a healthy cluster",
                healed_at - fault_at
            );
            checker::wait_healthy(cluster, HEAL_TIMEOUT)
        }
        Err(error) => Err(error.context("injecting the fault")),
    };
    if health.is_ok() {
        println!(
            "      healthy again {:.1} s after the fault was undone",
            workload.now() - healed_at
        );
        // The clients too: each service acknowledges an operation sent
        // after the fault was undone (one in flight through the fault
        // may still be waiting for its timeout).
        let recovered = xtask::lab::wait_for(
            "every service to acknowledge an operation sent after the fault was undone",
            RECOVERY_TIMEOUT,
            || {
                Service::ALL
                    .iter()
                    .all(|s| workload.acked_since(*s, healed_at))
                    .then_some(())
            },
        );
        if recovered.is_ok() {
            println!(
                "      every service answers again, {:.1} s after the fault was undone",
                workload.now() - healed_at
            );
        }
        std::thread::sleep(AFTER);
    }
    let end = workload.now();
    let ops = workload.finish(Duration::from_secs(60));
    let mut failures = Vec::new();
    let health = match health {
        Ok(health) => health,
        Err(error) => {
            failures.push(format!("never healthy: {error:#}"));
            // Read the rows where a primary is, if any answers.
            checker::Health {
                vip_owner: String::new(),
                primary: checker::api_primaries(cluster)
                    .first()
                    .copied()
                    .unwrap_or(TARGET)
                    .into(),
            }
        }
    };
    let ops = match ops {
        Ok(ops) => ops,
        Err(error) => {
            failures.push(format!("never healthy: {error:#}"));
            Vec::new()
        }
    };
    print_errors(&ops);
    let mut verdict = checker::check(
        cluster,
        scenario.name(),
        &ops,
        &health,
        (fault_at, healed_at, end),
    );
    failures.append(&mut verdict.failures);
    verdict.failures = failures;
    Ok(verdict)
}

/// The distinct errors each service met, with how often (first few).
fn print_errors(ops: &[workload::Op]) {
    for service in Service::ALL {
        let mut errors: BTreeMap<&str, usize> = BTreeMap::new();
        for op in ops.iter().filter(|op| op.service == service) {
            if let Some(error) = &op.error {
                *errors.entry(error.as_str()).or_default() += 1;
            }
        }
        let mut errors: Vec<(&str, usize)> = errors.into_iter().collect();
        errors.sort_by_key(|(_, count)| std::cmp::Reverse(*count));
        for (error, count) in errors.into_iter().take(4) {
            println!("      {} error x{count}: {error:.160}", service.name());
        }
    }
}

fn print_verdict(verdict: &Verdict) {
    let seconds = |s: Service| verdict.unavailable.get(&s).copied().unwrap_or(0.0);
    println!(
        "      unavailable: web {:.1} s, sql {:.1} s, files {:.1} s; {} operations, {} acknowledged, \
         {} lost; {} written without an acknowledgement",
        seconds(Service::Web),
        seconds(Service::Sql),
        seconds(Service::Files),
        Verdict::total(&verdict.attempted),
        Verdict::total(&verdict.acked),
        Verdict::total(&verdict.lost),
        verdict.unacked_present,
    );
    for failure in &verdict.failures {
        println!("      FAILED: {failure}");
    }
}

fn print_table(verdicts: &[Verdict]) {
    println!(
        "{:<17} {:>7} {:>7} {:>7} {:>10} {:>6} {:>5}  result",
        "scenario", "web s", "sql s", "files s", "attempted", "acked", "lost"
    );
    for verdict in verdicts {
        let seconds = |s: Service| verdict.unavailable.get(&s).copied().unwrap_or(0.0);
        println!(
            "{:<17} {:>7.1} {:>7.1} {:>7.1} {:>10} {:>6} {:>5}  {}",
            verdict.scenario,
            seconds(Service::Web),
            seconds(Service::Sql),
            seconds(Service::Files),
            Verdict::total(&verdict.attempted),
            Verdict::total(&verdict.acked),
            Verdict::total(&verdict.lost),
            if verdict.failures.is_empty() {
                "ok"
            } else {
                "FAILED"
            }
        );
    }
}

/// `target/bench/chaos.json`: per scenario and service, the longest
/// unavailability and the acknowledged and lost operations.
fn report(verdicts: &[Verdict]) -> BenchReport {
    let mut report = BenchReport::new("chaos");
    for verdict in verdicts {
        for service in Service::ALL {
            let case = format!("farol-{}-{}", verdict.scenario, service.name());
            let get = |map: &BTreeMap<Service, usize>| map.get(&service).copied().unwrap_or(0);
            report.push(
                &case,
                "unavailable_s",
                verdict.unavailable.get(&service).copied().unwrap_or(0.0),
                "s",
            );
            report.push(&case, "acked_ops", get(&verdict.acked) as f64, "ops");
            if service != Service::Web {
                report.push(&case, "lost_ops", get(&verdict.lost) as f64, "ops");
            }
        }
        report.push(
            &format!("farol-{}", verdict.scenario),
            "failures",
            verdict.failures.len() as f64,
            "count",
        );
    }
    report
}
