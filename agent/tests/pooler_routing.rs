//! Read/write split with a real primary and streaming standby: each test
//! proves where statements ran with `pg_is_in_recovery()` and
//! `inet_server_port()`.

mod support;

use farol_agent::config::PoolMode;
use support::pooler::{self as harness, can_run_postgres, cluster, connect};
use tokio_postgres::SimpleQueryMessage;

/// (in recovery, server port) of where `sql` ran, by the simple protocol.
async fn where_simple(client: &tokio_postgres::Client, sql: &str) -> (bool, u16) {
    let messages = client.simple_query(sql).await.unwrap();
    let row = messages
        .iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(row) => Some(row),
            _ => None,
        })
        .expect("a row");
    (
        row.get(0) == Some("t"),
        row.get(1).unwrap().parse().unwrap(),
    )
}

async fn where_extended(client: &impl tokio_postgres::GenericClient, sql: &str) -> (bool, u16) {
    let row = client.query_one(sql, &[]).await.unwrap();
    (row.get::<_, bool>(0), row.get::<_, i32>(1) as u16)
}

fn split_config(pg: &xtask::postgres::PgCluster) -> farol_agent::config::PoolerConfig {
    let mut config = harness::config(pg, harness::pool(PoolMode::Transaction, 4));
    config.read_write_split = true;
    config.primary_functions = vec!["touch".into()];
    config
}

const WHERE: &str = "SELECT pg_is_in_recovery(), inet_server_port()";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_run_on_the_standby_and_writes_on_the_primary() {
    if !can_run_postgres("reads_run_on_the_standby_and_writes_on_the_primary") {
        return;
    }
    let pg = cluster(true);
    let primary = pg.primary.port;
    let standby = pg.standby.as_ref().unwrap().port;
    pg.primary
        .psql("app", "CREATE TABLE IF NOT EXISTS routed (id int); CREATE SEQUENCE IF NOT EXISTS routed_seq; \
                      CREATE OR REPLACE FUNCTION touch() RETURNS int LANGUAGE sql AS 'SELECT 1'; \
                      GRANT ALL ON routed, routed_seq TO PUBLIC")
        .unwrap();
    pg.wait_standby_caught_up().unwrap();
    let pooler = harness::start(split_config(&pg)).await;
    let reader = connect(pooler.addr).await;
    assert_eq!(where_simple(&reader, WHERE).await, (true, standby));
    assert_eq!(where_extended(&reader, WHERE).await, (true, standby));
    let statement = reader.prepare(WHERE).await.unwrap();
    for _ in 0..3 {
        let row = reader.query_one(&statement, &[]).await.unwrap();
        assert!(row.get::<_, bool>(0), "prepared reads stay on the standby");
    }
    // Side effects force the primary, each in its own client (read your writes).
    for sql in [
        "SELECT pg_is_in_recovery(), inet_server_port(), nextval('routed_seq')",
        "SELECT pg_is_in_recovery(), inet_server_port(), touch()",
        "SELECT pg_is_in_recovery(), inet_server_port() FROM (SELECT 1) s FOR UPDATE",
    ] {
        let client = connect(pooler.addr).await;
        assert_eq!(where_simple(&client, sql).await, (false, primary), "{sql}");
    }
    let writer = connect(pooler.addr).await;
    writer
        .simple_query("INSERT INTO routed VALUES (1)")
        .await
        .unwrap();
    // After a write the session reads its writes on the primary.
    assert_eq!(where_simple(&writer, WHERE).await, (false, primary));
    assert_eq!(where_extended(&writer, WHERE).await, (false, primary));
    // The other client still reads from the standby.
    assert_eq!(where_simple(&reader, WHERE).await, (true, standby));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_transactions_run_on_the_standby_and_plain_ones_on_the_primary() {
    if !can_run_postgres("read_only_transactions_run_on_the_standby_and_plain_ones_on_the_primary")
    {
        return;
    }
    let pg = cluster(true);
    let pooler = harness::start(split_config(&pg)).await;
    let mut client = connect(pooler.addr).await;
    let tx = client
        .build_transaction()
        .read_only(true)
        .start()
        .await
        .unwrap();
    let (recovery, port) = where_extended(&tx, WHERE).await;
    assert!(recovery);
    assert_eq!(port, pg.standby.as_ref().unwrap().port);
    tx.commit().await.unwrap();
    let mut other = connect(pooler.addr).await;
    let tx = other.transaction().await.unwrap();
    assert_eq!(where_extended(&tx, WHERE).await, (false, pg.primary.port));
    tx.commit().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_set_primary_new_transactions_go_to_the_new_primary() {
    if !can_run_postgres("after_set_primary_new_transactions_go_to_the_new_primary") {
        return;
    }
    let pg = cluster(true);
    let mut config = harness::config(&pg, harness::pool(PoolMode::Transaction, 2));
    config.read_write_split = false;
    let pooler = harness::start(config).await;
    let client = connect(pooler.addr).await;
    assert_eq!(where_simple(&client, WHERE).await, (false, pg.primary.port));
    // The health module's hook; here pointed at the standby to prove routing.
    let standby = pg.standby.as_ref().unwrap().port;
    pooler
        .pooler
        .set_primary(std::net::SocketAddr::from(([127, 0, 0, 1], standby)));
    assert_eq!(where_simple(&client, WHERE).await, (true, standby));
    let fresh = connect(pooler.addr).await;
    assert_eq!(where_simple(&fresh, WHERE).await, (true, standby));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_fall_back_to_the_primary_when_the_standby_is_down() {
    if !can_run_postgres("reads_fall_back_to_the_primary_when_the_standby_is_down") {
        return;
    }
    let mut pg = harness::private_cluster(true);
    let pooler = harness::start(split_config(&pg)).await;
    let client = connect(pooler.addr).await;
    let standby = pg.standby.as_ref().unwrap().port;
    assert_eq!(where_simple(&client, WHERE).await, (true, standby));
    pg.standby.as_mut().unwrap().kill();
    // The idle standby connection is dropped, a new one is refused: the
    // read runs on the primary instead of failing.
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert_eq!(where_simple(&client, WHERE).await, (false, pg.primary.port));
    assert_eq!(
        where_extended(&client, WHERE).await,
        (false, pg.primary.port)
    );
}
