//! The demo's database tier: PostgreSQL 15 primary on nuster1 and hot
//! standby on nuster2 (in their namespaces, on their lab addresses), the
//! agents' pooler on port 6432 of every node, reached by the client on the
//! VIP; reads go to the standby, writes to the primary, and after the
//! primary's death and the standby's promotion the pooler moves writes by
//! itself.

use std::{
    process::Output,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use xtask::{
    lab::{Lab, CLIENT},
    postgres::PgCluster,
};

pub(crate) const PRIMARY: &str = "nuster1";
pub(crate) const STANDBY: &str = "nuster2";
const USER: &str = "demo";
const PASSWORD: &str = "demo-pw";
const POOLER_PORT: u16 = 6432;

/// The `[pooler]` section every agent of the demo runs.
pub(crate) fn pooler_section(lab: &Lab) -> Result<String> {
    Ok(format!(
        r#"
[pooler]
listen = "0.0.0.0:{POOLER_PORT}"
primary = "{primary}:5432"
standbys = ["{standby}:5432"]
read_write_split = true
role_check_interval = "250ms"

[[pooler.users]]
name = "{USER}"
secret = "{secret}"
server_password = "{PASSWORD}"

[[pooler.pools]]
database = "{USER}"
pool_size = 10
"#,
        primary = lab.node(PRIMARY)?.ip(),
        standby = lab.node(STANDBY)?.ip(),
        secret = xtask::postgres::md5_secret(USER, PASSWORD)?,
    ))
}

/// Primary and standby up, with the demo's role, database and table.
pub(crate) fn start(lab: &Lab) -> Result<PgCluster> {
    let pg = PgCluster::start_in_lab(lab, PRIMARY, STANDBY, &[])?;
    pg.primary.psql(
        "postgres",
        &format!("CREATE ROLE {USER} LOGIN PASSWORD '{PASSWORD}'"),
    )?;
    pg.primary
        .psql("postgres", &format!("CREATE DATABASE {USER} OWNER {USER}"))?;
    pg.primary.psql(
        USER,
        &format!(
            "CREATE TABLE visits (id serial PRIMARY KEY, at timestamptz DEFAULT now()); \
             ALTER TABLE visits OWNER TO {USER}"
        ),
    )?;
    pg.wait_standby_caught_up()?;
    Ok(pg)
}

/// psql from the client through the pooler on `host`.
fn psql(lab: &Lab, host: &str, sql: &str) -> Result<Output> {
    lab.command(CLIENT, "psql")
        .env("PGPASSWORD", PASSWORD)
        .env("PGCONNECT_TIMEOUT", "2")
        .args(["-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-h", host])
        .args([
            "-p",
            &POOLER_PORT.to_string(),
            "-U",
            USER,
            "-d",
            USER,
            "-c",
            sql,
        ])
        .output()
        .context("running psql in the client")
}

fn answer(output: &Output) -> String {
    if output.status.success() {
        String::from_utf8_lossy(&output.stdout)
            .trim()
            .replace('\n', " ")
    } else {
        format!("error: {}", String::from_utf8_lossy(&output.stderr).trim())
    }
}

const WHERE: &str = "SELECT CASE WHEN pg_is_in_recovery() THEN 'standby' ELSE 'primary' END \
                     || ' at ' || host(inet_server_addr())";

/// Reads and writes through the pooler, then the primary's death: the
/// standby is promoted (by hand: deciding that under quorum is the pgha
/// module's, issue 9) and the pooler follows.
pub(crate) fn show(lab: &Lab, vip: &str, pg: &mut PgCluster) -> Result<()> {
    println!("      PostgreSQL through the pooler on {vip}:{POOLER_PORT} (psql from the client):");
    let read = psql(lab, vip, WHERE)?;
    println!(
        "        a read ({WHERE:.44}...) ran on the {}",
        answer(&read)
    );
    let write = psql(
        lab,
        vip,
        &format!("INSERT INTO visits DEFAULT VALUES; {WHERE}"),
    )?;
    println!(
        "        INSERT then the same in one session ran on the {} (read your writes)",
        answer(&write)
    );
    if !read.status.success() || !write.status.success() {
        bail!(
            "the pooler did not answer: {} / {}",
            answer(&read),
            answer(&write)
        );
    }
    println!("      kill -9 of PostgreSQL on {PRIMARY}; SELECT pg_promote() on {STANDBY}");
    pg.primary.kill();
    let died = Instant::now();
    let standby = pg
        .standby
        .as_ref()
        .context("the demo's cluster has a standby")?;
    standby.psql("postgres", "SELECT pg_promote(true, 30)")?;
    let deadline = died + Duration::from_secs(20);
    loop {
        let write = psql(
            lab,
            vip,
            &format!("INSERT INTO visits DEFAULT VALUES; {WHERE}"),
        )?;
        if write.status.success() {
            println!(
                "        writes through the pooler work again {:.2} s after the primary died, on the {}",
                died.elapsed().as_secs_f64(),
                answer(&write)
            );
            break;
        }
        if Instant::now() > deadline {
            bail!("writes did not come back: {}", answer(&write));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let count = psql(lab, vip, "SELECT count(*) FROM visits")?;
    // The demo's servers run with synchronous_commit=off and asynchronous
    // replication: a write acknowledged just before the kill may be lost
    // (issue 9's synchronous mode is what rules that out).
    println!(
        "        rows in visits on the new primary: {} of 2 written",
        answer(&count)
    );
    Ok(())
}
