//! The PostgreSQL health check against real PostgreSQL 15: a primary and a
//! streaming hot standby on loopback.

mod support;

use std::{net::SocketAddr, time::Duration};

use farol_agent::{
    config::{CheckKind, HealthCheckConfig, PgRole},
    health::run_check,
};
use xtask::postgres::PgCluster;

fn check(role: PgRole) -> HealthCheckConfig {
    let mut config = HealthCheckConfig::new(CheckKind::Postgres);
    config.role = Some(role);
    config.timeout = Some(Duration::from_secs(2));
    config
}

fn at(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

#[tokio::test]
async fn the_check_tells_primary_from_standby_and_fails_a_dead_server() {
    if !support::pooler::can_run_postgres(
        "the_check_tells_primary_from_standby_and_fails_a_dead_server",
    ) {
        return;
    }
    let mut cluster = PgCluster::start("health", true).expect("start PostgreSQL");
    let primary = at(cluster.primary.port);
    let standby = at(cluster.standby.as_ref().unwrap().port);

    let passed = run_check(primary, &check(PgRole::Any)).await.unwrap();
    assert_eq!(passed.detail, "PostgreSQL primary");
    let passed = run_check(standby, &check(PgRole::Standby)).await.unwrap();
    assert_eq!(passed.detail, "PostgreSQL standby");
    let failure = run_check(standby, &check(PgRole::Primary))
        .await
        .unwrap_err();
    assert_eq!(failure.reason, "PostgreSQL is a standby, wanted primary");

    let mut unknown = check(PgRole::Any);
    unknown.user = Some("nobody_here".into());
    let failure = run_check(primary, &unknown).await.unwrap_err();
    assert!(failure.reason.contains("nobody_here"), "{failure:?}");

    cluster.primary.kill();
    let failure = run_check(primary, &check(PgRole::Any)).await.unwrap_err();
    assert!(
        failure.reason.contains("PostgreSQL startup failed"),
        "{failure:?}"
    );
}
