//! The admin console: a client that connects to the admin database
//! (`pooler.admin_database`, default `farol`) may run `SHOW POOLS`,
//! `SHOW CLIENTS`, `SHOW SERVERS` and `SHOW STATS` with the simple query
//! protocol, as on PgBouncer's `pgbouncer` database. Columns are text.
//! `PAUSE [db]` holds new transactions for the primary and returns once
//! the running ones finished (see `pause`); `RESUME [db]` lets them go.
//! Who gets in, and who may pause, is `pooler.admin_users` and
//! `pooler.stats_users` (checked at login and here).

use std::sync::{atomic::Ordering, Arc};

use bytes::{Buf, BytesMut};
use tokio::io::AsyncWriteExt;

use crate::config::AdminRole;

use super::{
    protocol::{self, FrontendMessage},
    session::{ClientStream, SessionError},
    Pooler,
};

/// Serves admin queries until the client leaves.
pub(super) async fn serve<S: ClientStream>(
    stream: &mut S,
    mut buf: BytesMut,
    pooler: &Arc<Pooler>,
    role: AdminRole,
) -> Result<(), SessionError> {
    let mut out = BytesMut::with_capacity(4096);
    loop {
        let (tag, len) = loop {
            match protocol::frame(&buf).map_err(SessionError::ClientProtocol)? {
                Some((tag, len)) if buf.len() >= len => break (tag, len),
                _ => {
                    use tokio::io::AsyncReadExt;
                    if stream
                        .read_buf(&mut buf)
                        .await
                        .map_err(SessionError::ClientIo)?
                        == 0
                    {
                        return Ok(());
                    }
                }
            }
        };
        let frame = buf.split_to(len);
        match tag {
            b'X' => return Ok(()),
            b'Q' => {
                let sql = match FrontendMessage::parse(&frame) {
                    Ok(FrontendMessage::Query { sql }) => sql,
                    _ => "",
                };
                match pause_command(sql) {
                    Some(_) if role != AdminRole::Admin => protocol::error_response(
                        &mut out,
                        "ERROR",
                        "42501",
                        "PAUSE and RESUME are for pooler.admin_users; stats_users may only run SHOW",
                    ),
                    Some((pause, database)) => {
                        run_pause(pause, database.as_deref(), pooler, &mut out).await
                    }
                    None => answer(sql, pooler, &mut out),
                }
                protocol::ready_for_query(&mut out, b'I');
            }
            _ => {
                protocol::error_response(
                    &mut out,
                    "ERROR",
                    "0A000",
                    "the admin console speaks only the simple query protocol",
                );
                if tag == b'S' {
                    protocol::ready_for_query(&mut out, b'I');
                }
            }
        }
        stream
            .write_all(&out)
            .await
            .map_err(SessionError::ClientIo)?;
        out.clear();
        buf.reserve(0);
        let _ = buf.remaining();
    }
}

/// `PAUSE [db]` → (true, db), `RESUME [db]` → (false, db).
fn pause_command(sql: &str) -> Option<(bool, Option<String>)> {
    let mut words = sql.trim().trim_end_matches(';').split_whitespace();
    let pause = match words.next()?.to_ascii_uppercase().as_str() {
        "PAUSE" => true,
        "RESUME" => false,
        _ => return None,
    };
    let database = words.next().map(|name| name.trim_matches('"').to_owned());
    if words.next().is_some() {
        return None;
    }
    Some((pause, database))
}

async fn run_pause(pause: bool, database: Option<&str>, pooler: &Pooler, out: &mut BytesMut) {
    let result = if pause {
        pooler.admin_pause(database).await.map(|_| "PAUSE")
    } else {
        pooler.admin_resume(database).map(|()| "RESUME")
    };
    match result {
        Ok(tag) => protocol::command_complete(out, tag),
        Err(why) => protocol::error_response(out, "ERROR", "55000", &why),
    }
}

/// Answers one admin statement into `out`.
pub(crate) fn answer(sql: &str, pooler: &Pooler, out: &mut BytesMut) {
    let words: Vec<String> = sql
        .trim()
        .trim_end_matches(';')
        .split_whitespace()
        .map(str::to_ascii_uppercase)
        .collect();
    let words: Vec<&str> = words.iter().map(String::as_str).collect();
    let (columns, rows): (&[&str], Vec<Vec<String>>) = match words.as_slice() {
        [] => {
            protocol::empty_query_response(out);
            return;
        }
        ["SHOW", "POOLS"] => (
            &[
                "database",
                "user",
                "server",
                "mode",
                "pool_size",
                "sv_active",
                "sv_idle",
                "cl_waiting",
                "paused",
                "cl_held",
            ],
            pooler
                .pools()
                .iter()
                .map(|pool| {
                    vec![
                        pool.key.database.clone(),
                        pool.key.user.clone(),
                        pool.key.addr.to_string(),
                        format!("{:?}", pool.settings.mode).to_lowercase(),
                        pool.settings.pool_size.to_string(),
                        pool.active_count().to_string(),
                        pool.idle_count().to_string(),
                        pool.stats.waiting.load(Ordering::Relaxed).to_string(),
                        u8::from(pooler.pause.state().holds(&pool.key.database)).to_string(),
                        pool.stats.held.load(Ordering::Relaxed).to_string(),
                    ]
                })
                .collect(),
        ),
        ["SHOW", "CLIENTS"] => (
            &[
                "user",
                "database",
                "addr",
                "state",
                "connect_seconds",
                "server_pid",
            ],
            pooler
                .clients()
                .iter()
                .map(|client| {
                    let server = *client
                        .server
                        .lock()
                        .unwrap_or_else(|poison| poison.into_inner());
                    vec![
                        client.user.clone(),
                        client.database.clone(),
                        client.peer.to_string(),
                        if server.is_some() { "active" } else { "idle" }.to_owned(),
                        client.since.elapsed().as_secs().to_string(),
                        server.map(|s| s.process_id.to_string()).unwrap_or_default(),
                    ]
                })
                .collect(),
        ),
        ["SHOW", "SERVERS"] => (
            &["database", "user", "server", "active", "idle", "connects"],
            pooler
                .pools()
                .iter()
                .map(|pool| {
                    vec![
                        pool.key.database.clone(),
                        pool.key.user.clone(),
                        pool.key.addr.to_string(),
                        pool.active_count().to_string(),
                        pool.idle_count().to_string(),
                        pool.stats
                            .server_connects
                            .load(Ordering::Relaxed)
                            .to_string(),
                    ]
                })
                .collect(),
        ),
        ["SHOW", "STATS"] => (
            &[
                "database",
                "user",
                "total_xact_count",
                "total_query_count",
                "total_received",
                "total_sent",
                "total_wait_timeouts",
                "total_held_count",
                "total_held_time_us",
            ],
            pooler
                .pools()
                .iter()
                .map(|pool| {
                    let stats = &pool.stats;
                    vec![
                        pool.key.database.clone(),
                        pool.key.user.clone(),
                        stats.transactions.load(Ordering::Relaxed).to_string(),
                        stats.queries.load(Ordering::Relaxed).to_string(),
                        stats.bytes_received.load(Ordering::Relaxed).to_string(),
                        stats.bytes_sent.load(Ordering::Relaxed).to_string(),
                        stats.wait_timeouts.load(Ordering::Relaxed).to_string(),
                        stats.held_total.load(Ordering::Relaxed).to_string(),
                        stats.held_micros_total.load(Ordering::Relaxed).to_string(),
                    ]
                })
                .collect(),
        ),
        _ => {
            protocol::error_response(
                out,
                "ERROR",
                "42601",
                &format!("unsupported admin command {sql:?}: try SHOW POOLS, SHOW CLIENTS, SHOW SERVERS, SHOW STATS, PAUSE [db] or RESUME [db]"),
            );
            return;
        }
    };
    protocol::row_description(out, columns);
    let count = rows.len();
    for row in &rows {
        protocol::data_row(out, row);
    }
    protocol::command_complete(out, &format!("SHOW {count}"));
}
