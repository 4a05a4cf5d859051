//! Read/write split in session pools, as pgpool-II balances a session.
//!
//! A session-mode client with `read_write_split` keeps its primary
//! connection for the session, and on its first read borrows one standby
//! connection (healthy, within the lag bound, least busy) that it keeps
//! too: pgpool-II's per-session "load balance node". Between statements
//! both connections are parked here; each statement outside a
//! transaction block is routed anew (the relay then runs with the
//! transaction-mode bookkeeping, so named prepared statements are
//! re-prepared on whichever connection runs them).
//!
//! Session state stays coherent by one rule: session-level `SET`/`RESET`
//! (outside a transaction block) run on the primary and are replayed on
//! the standby connection before its next read (only the last setting of
//! each name is kept; `RESET ALL` replaces them all); anything else that
//! leaves state in the session (temporary objects, LISTEN, SQL PREPARE,
//! cursors, advisory locks, `set_config`, a `SET` inside a transaction
//! block, a statement the parser does not know), and any write when
//! `read_your_writes` is on, pins the session to the primary for good:
//! the standby connection goes back to its pool, and the primary's stays
//! as in a plain session pool. `DISCARD ALL` forgets the settings and
//! gives the standby connection back; the next read borrows one afresh.

use std::{sync::Arc, time::Duration};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::debug;

use super::{
    pool::{Pool, PooledServer},
    protocol,
};

/// How long replaying the settings on a standby connection may take.
const REPLAY_TIMEOUT: Duration = Duration::from_secs(5);
/// Distinct settings kept for replay; a session that makes more stops
/// using its standby rather than keep an unbounded list.
const MAX_SETTINGS: usize = 256;

/// One session-level setting the standby connection must also get.
#[derive(Debug)]
struct Setting {
    /// Order of arrival; the standby has every setting up to its mark.
    seq: u64,
    key: Box<str>,
    sql: String,
}

/// A connection parked between statements, with the pool it came from.
pub(super) type Parked = (Arc<Pool>, PooledServer);

/// Why replaying the settings on a standby connection failed.
#[derive(Debug)]
pub(super) enum ReplayError {
    /// The standby refused a setting: no standby could take it.
    Refused(String),
    /// The connection failed or was too slow.
    Connection,
}

/// The split state of one session.
#[derive(Debug, Default)]
pub(super) struct SessionSplit {
    /// The session's primary connection, while it is not the active one.
    pub(super) primary: Option<Parked>,
    /// The session's standby connection, while it is not the active one.
    pub(super) standby: Option<Parked>,
    /// The active connection (the relay's) is the standby's.
    pub(super) on_standby: bool,
    /// Set once the session no longer uses a standby: why.
    pinned: Option<&'static str>,
    settings: Vec<Setting>,
    next_seq: u64,
    /// Settings up to this `seq` were replayed on the standby connection.
    standby_synced: u64,
    /// A statement for the primary waits until the standby's answers are
    /// all in (a client that pipelines a write after a read).
    pub(super) deferred: bool,
}

impl SessionSplit {
    pub(super) fn pinned(&self) -> bool {
        self.pinned.is_some()
    }

    /// The session stops using a standby (logged once).
    pub(super) fn pin(&mut self, reason: &'static str) {
        if self.pinned.is_none() {
            debug!(reason, "session pinned to the primary");
            self.pinned = Some(reason);
        }
    }

    /// Remembers a session-level setting that ran on the primary.
    pub(super) fn record_setting(&mut self, key: &str, sql: &str) {
        if key == "*" {
            self.settings.clear();
        } else {
            self.settings.retain(|setting| &*setting.key != key);
        }
        if self.settings.len() >= MAX_SETTINGS {
            self.pin("more distinct session settings than the pooler replays");
            return;
        }
        self.next_seq += 1;
        self.settings.push(Setting {
            seq: self.next_seq,
            key: key.into(),
            sql: sql.to_owned(),
        });
    }

    /// `DISCARD ALL` ran on the primary: no setting is left to replay.
    pub(super) fn forget_settings(&mut self) {
        self.settings.clear();
    }

    /// A new standby connection has none of the session's settings.
    pub(super) fn new_standby(&mut self) {
        self.standby_synced = 0;
    }

    /// Sends the settings the standby connection lacks, swallowing the
    /// answers.
    pub(super) async fn replay(&mut self, server: &mut PooledServer) -> Result<(), ReplayError> {
        let missing: Vec<(u64, String)> = self
            .settings
            .iter()
            .filter(|setting| setting.seq > self.standby_synced)
            .map(|setting| (setting.seq, setting.sql.clone()))
            .collect();
        for (seq, sql) in missing {
            tokio::time::timeout(REPLAY_TIMEOUT, run_quietly(server, &sql))
                .await
                .map_err(|_| ReplayError::Connection)??;
            self.standby_synced = seq;
        }
        Ok(())
    }
}

/// Runs one simple query on an idle connection; its answers are dropped,
/// an ErrorResponse is returned as `Refused` with its message.
async fn run_quietly(server: &mut PooledServer, sql: &str) -> Result<(), ReplayError> {
    let mut out = BytesMut::with_capacity(sql.len() + 8);
    protocol::query(&mut out, sql);
    let conn = &mut server.conn;
    conn.stream
        .write_all(&out)
        .await
        .map_err(|_| ReplayError::Connection)?;
    let mut refused = None;
    loop {
        if let Some((tag, len)) = protocol::frame(&conn.buf).map_err(|_| ReplayError::Connection)? {
            if conn.buf.len() >= len {
                if tag == b'E' {
                    let fields = protocol::error_fields(&conn.buf[5..len]);
                    let message = fields
                        .iter()
                        .find(|(code, _)| *code == b'M')
                        .map(|(_, message)| (*message).to_owned())
                        .unwrap_or_default();
                    refused = Some(message);
                }
                let status = (tag == b'Z').then(|| conn.buf.get(5).copied());
                conn.buf.advance(len);
                match status {
                    Some(Some(b'I')) => {
                        return match refused {
                            Some(message) => Err(ReplayError::Refused(message)),
                            None => Ok(()),
                        }
                    }
                    // Not idle after a setting: not a state to lend on.
                    Some(_) => return Err(ReplayError::Connection),
                    None => continue,
                }
            }
        }
        if conn
            .stream
            .read_buf(&mut conn.buf)
            .await
            .map_err(|_| ReplayError::Connection)?
            == 0
        {
            return Err(ReplayError::Connection);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending(split: &SessionSplit) -> Vec<&str> {
        split
            .settings
            .iter()
            .filter(|s| s.seq > split.standby_synced)
            .map(|s| s.sql.as_str())
            .collect()
    }

    #[test]
    fn only_the_last_setting_of_a_name_is_replayed_and_reset_all_replaces_all() {
        let mut split = SessionSplit::default();
        split.record_setting("application_name", "SET application_name = 'a'");
        split.record_setting("search_path", "SET search_path = x");
        split.record_setting("application_name", "SET application_name = 'b'");
        assert_eq!(
            pending(&split),
            ["SET search_path = x", "SET application_name = 'b'"]
        );
        // The standby got those; a later setting is all it lacks.
        split.standby_synced = split.next_seq;
        split.record_setting("timezone", "SET TIME ZONE 'UTC'");
        assert_eq!(pending(&split), ["SET TIME ZONE 'UTC'"]);
        split.record_setting("*", "RESET ALL");
        assert_eq!(pending(&split), ["RESET ALL"]);
        // A new standby connection gets everything still in force.
        split.record_setting("search_path", "SET search_path = y");
        split.new_standby();
        assert_eq!(pending(&split), ["RESET ALL", "SET search_path = y"]);
        assert!(!split.pinned());
    }

    #[test]
    fn too_many_distinct_settings_pin_the_session() {
        let mut split = SessionSplit::default();
        for i in 0..MAX_SETTINGS {
            split.record_setting(&format!("x.k{i}"), &format!("SET x.k{i} = 1"));
        }
        assert!(!split.pinned());
        split.record_setting("x.again", "SET x.again = 1");
        assert!(split.pinned());
    }
}
