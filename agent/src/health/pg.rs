//! The PostgreSQL check: a startup (with the configured user, database and
//! password), then `SELECT 1` and `pg_is_in_recovery()` in one simple query,
//! which also reports whether the server is a primary or a standby. Uses
//! tokio-postgres; TLS is not offered (the cluster's LAN is trusted, as the
//! seed's pgpool-II health check was).

use std::net::SocketAddr;

use tokio_postgres::{NoTls, SimpleQueryMessage};

use super::{CheckFailure, Passed};
use crate::config::{HealthCheckConfig, PgRole};

pub async fn check(target: SocketAddr, config: &HealthCheckConfig) -> Result<Passed, CheckFailure> {
    let mut pg = tokio_postgres::Config::new();
    pg.host(target.ip().to_string())
        .port(target.port())
        .user(config.user())
        .dbname(config.database())
        .application_name("farol-health")
        .connect_timeout(config.timeout());
    if let Some(password) = &config.password {
        pg.password(password);
    }
    let (client, connection) = pg.connect(NoTls).await.map_err(|error| {
        CheckFailure::new(format!("PostgreSQL startup failed: {}", describe(&error)))
    })?;
    let driver = tokio::spawn(async move {
        let _ = connection.await;
    });
    let result = client
        .simple_query("SELECT 1; SELECT pg_is_in_recovery()")
        .await;
    driver.abort();
    let messages = result.map_err(|error| {
        CheckFailure::new(format!("PostgreSQL query failed: {}", describe(&error)))
    })?;
    let rows: Vec<_> = messages
        .iter()
        .filter_map(|message| match message {
            SimpleQueryMessage::Row(row) => Some(row),
            _ => None,
        })
        .collect();
    let (Some(one), Some(recovery)) = (rows.first(), rows.get(1)) else {
        return Err(CheckFailure::new(
            "PostgreSQL answered without the expected rows",
        ));
    };
    if one.get(0) != Some("1") {
        return Err(CheckFailure::new(format!(
            "PostgreSQL SELECT 1 returned {:?}",
            one.get(0)
        )));
    }
    let standby = match recovery.get(0) {
        Some("t") => true,
        Some("f") => false,
        other => {
            return Err(CheckFailure::new(format!(
                "PostgreSQL pg_is_in_recovery() returned {other:?}"
            )))
        }
    };
    let role = if standby { "standby" } else { "primary" };
    match (config.role(), standby) {
        (PgRole::Primary, true) => {
            Err(CheckFailure::new("PostgreSQL is a standby, wanted primary"))
        }
        (PgRole::Standby, false) => {
            Err(CheckFailure::new("PostgreSQL is a primary, wanted standby"))
        }
        _ => Ok(Passed::new(format!("PostgreSQL {role}"))),
    }
}

/// The server's message when there is one, else the client's.
fn describe(error: &tokio_postgres::Error) -> String {
    match error.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => {
            let mut text = error.to_string();
            let mut source = std::error::Error::source(error);
            while let Some(cause) = source {
                text = format!("{text}: {cause}");
                source = cause.source();
            }
            text
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpListener,
    };

    use crate::{
        config::{CheckKind, HealthCheckConfig},
        health::run_check,
    };

    fn config() -> HealthCheckConfig {
        let mut config = HealthCheckConfig::new(CheckKind::Postgres);
        config.timeout = Some(Duration::from_millis(500));
        config
    }

    /// A server that reads the startup message, answers with `reply` and
    /// closes (after `hold`).
    async fn server_holding(reply: &'static [u8], hold: Duration) -> std::net::SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buffer = [0; 1024];
                    let _ = stream.read(&mut buffer).await;
                    let _ = stream.write_all(reply).await;
                    tokio::time::sleep(hold).await;
                });
            }
        });
        addr
    }

    async fn server(reply: &'static [u8]) -> std::net::SocketAddr {
        server_holding(reply, Duration::ZERO).await
    }

    #[tokio::test]
    async fn garbage_instead_of_the_protocol_fails() {
        let addr = server(b"HTTP/1.1 400 Bad Request\r\n\r\n").await;
        let failure = run_check(addr, &config()).await.unwrap_err();
        assert!(
            failure.reason.starts_with("PostgreSQL startup failed"),
            "{failure:?}"
        );
    }

    #[tokio::test]
    async fn an_error_response_names_the_servers_message() {
        // ErrorResponse: severity FATAL, code 57P03, message.
        let mut body = Vec::new();
        for (field, value) in [
            (b'S', "FATAL"),
            (b'C', "57P03"),
            (b'M', "the database system is starting up"),
        ] {
            body.push(field);
            body.extend_from_slice(value.as_bytes());
            body.push(0);
        }
        body.push(0);
        let mut message = vec![b'E'];
        message.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        message.extend_from_slice(&body);
        let addr = server(Box::leak(message.into_boxed_slice())).await;
        let failure = run_check(addr, &config()).await.unwrap_err();
        assert!(failure.reason.contains("starting up"), "{failure:?}");
    }

    #[tokio::test]
    async fn a_silent_server_times_out() {
        let addr = server_holding(b"", Duration::from_secs(2)).await;
        let failure = run_check(addr, &config()).await.unwrap_err();
        assert!(
            failure.reason.starts_with("timeout after") || failure.reason.contains("timed out"),
            "{failure:?}"
        );
    }
}
