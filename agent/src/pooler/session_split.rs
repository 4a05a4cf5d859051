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

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use bytes::{Buf, BytesMut};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{counter::ConstCounter, MetricType},
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::debug;

use super::{
    pool::{Pool, PooledServer},
    protocol, Pooler,
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

/// Why a session stopped using its standby.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum PinReason {
    /// A write (or plain BEGIN), with `read_your_writes`.
    Write,
    /// Temporary objects, LISTEN, PREPARE, cursors, advisory locks,
    /// `set_config`, or a statement the parser cannot read.
    SessionState,
    /// A session-level SET inside a transaction block.
    SettingInTransaction,
    /// A standby refused a setting the primary took.
    SettingRefused,
    /// More distinct settings than [`MAX_SETTINGS`].
    TooManySettings,
}

impl PinReason {
    const ALL: [PinReason; 5] = [
        PinReason::Write,
        PinReason::SessionState,
        PinReason::SettingInTransaction,
        PinReason::SettingRefused,
        PinReason::TooManySettings,
    ];

    /// The metric label.
    fn label(self) -> &'static str {
        match self {
            PinReason::Write => "write",
            PinReason::SessionState => "session_state",
            PinReason::SettingInTransaction => "setting_in_transaction",
            PinReason::SettingRefused => "setting_refused",
            PinReason::TooManySettings => "too_many_settings",
        }
    }

    fn describe(self) -> &'static str {
        match self {
            PinReason::Write => "a write, with read_your_writes",
            PinReason::SessionState => "state only the primary's connection has (temporary objects, LISTEN, PREPARE, cursors, advisory locks, set_config, or a statement the parser cannot read)",
            PinReason::SettingInTransaction => "a session setting inside a transaction block",
            PinReason::SettingRefused => "a session setting a standby refused",
            PinReason::TooManySettings => "more distinct session settings than the pooler replays",
        }
    }
}

/// Counters of the split in session pools, on `/metrics`.
#[derive(Debug, Default)]
pub struct SplitStats {
    /// Sessions pinned to the primary, by [`PinReason::ALL`] order.
    pins: [AtomicU64; 5],
    /// Standby connections borrowed by sessions.
    pub(super) standby_borrowed: AtomicU64,
    /// Standby connections a session gave up mid-session (dead, lagging,
    /// no longer a standby).
    pub(super) standby_lost: AtomicU64,
    /// Settings replayed on standby connections.
    pub(super) settings_replayed: AtomicU64,
}

impl SplitStats {
    pub(super) fn pinned(&self, reason: PinReason) {
        let at = PinReason::ALL
            .iter()
            .position(|r| *r == reason)
            .unwrap_or_default();
        self.pins[at].fetch_add(1, Ordering::Relaxed);
    }
}

/// `farol_pooler_split_*` on `/metrics`.
#[derive(Debug)]
pub struct SplitCollector(pub Arc<Pooler>);

impl Collector for SplitCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let stats = &self.0.split_stats;
        let load = |value: &AtomicU64| value.load(Ordering::Relaxed);
        let mut family = encoder.encode_descriptor(
            "farol_pooler_split_sessions_pinned",
            "Session-pool clients that stopped using their standby connection, by reason",
            None,
            MetricType::Counter,
        )?;
        for (reason, value) in PinReason::ALL.iter().zip(&stats.pins) {
            ConstCounter::new(load(value))
                .encode(family.encode_family(&[("reason", reason.label())])?)?;
        }
        for (name, help, value) in [
            (
                "farol_pooler_split_standby_connections",
                "Standby connections borrowed by session-pool clients for their reads",
                &stats.standby_borrowed,
            ),
            (
                "farol_pooler_split_standby_lost",
                "Standby connections session-pool clients gave up mid-session (dead, lagging or no longer a standby)",
                &stats.standby_lost,
            ),
            (
                "farol_pooler_split_settings_replayed",
                "Session settings replayed on session-pool clients' standby connections",
                &stats.settings_replayed,
            ),
        ] {
            ConstCounter::new(load(value)).encode(encoder.encode_descriptor(
                name,
                help,
                None,
                MetricType::Counter,
            )?)?;
        }
        Ok(())
    }
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
    pinned: Option<PinReason>,
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

    /// The session stops using a standby (logged and counted once).
    pub(super) fn pin(&mut self, reason: PinReason, stats: &SplitStats) {
        if self.pinned.is_none() {
            debug!(
                reason = reason.describe(),
                "session pinned to the primary for good"
            );
            stats.pinned(reason);
            self.pinned = Some(reason);
        }
    }

    /// Remembers a session-level setting that ran on the primary.
    pub(super) fn record_setting(&mut self, key: &str, sql: &str, stats: &SplitStats) {
        if key == "*" {
            self.settings.clear();
        } else {
            self.settings.retain(|setting| &*setting.key != key);
        }
        if self.settings.len() >= MAX_SETTINGS {
            self.pin(PinReason::TooManySettings, stats);
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
    pub(super) async fn replay(
        &mut self,
        server: &mut PooledServer,
        stats: &SplitStats,
    ) -> Result<(), ReplayError> {
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
            stats.settings_replayed.fetch_add(1, Ordering::Relaxed);
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
        let stats = SplitStats::default();
        let mut split = SessionSplit::default();
        split.record_setting("application_name", "SET application_name = 'a'", &stats);
        split.record_setting("search_path", "SET search_path = x", &stats);
        split.record_setting("application_name", "SET application_name = 'b'", &stats);
        assert_eq!(
            pending(&split),
            ["SET search_path = x", "SET application_name = 'b'"]
        );
        // The standby got those; a later setting is all it lacks.
        split.standby_synced = split.next_seq;
        split.record_setting("timezone", "SET TIME ZONE 'UTC'", &stats);
        assert_eq!(pending(&split), ["SET TIME ZONE 'UTC'"]);
        split.record_setting("*", "RESET ALL", &stats);
        assert_eq!(pending(&split), ["RESET ALL"]);
        // A new standby connection gets everything still in force.
        split.record_setting("search_path", "SET search_path = y", &stats);
        split.new_standby();
        assert_eq!(pending(&split), ["RESET ALL", "SET search_path = y"]);
        assert!(!split.pinned());
    }

    #[test]
    fn too_many_distinct_settings_pin_the_session() {
        let stats = SplitStats::default();
        let mut split = SessionSplit::default();
        for i in 0..MAX_SETTINGS {
            split.record_setting(&format!("x.k{i}"), &format!("SET x.k{i} = 1"), &stats);
        }
        assert!(!split.pinned());
        split.record_setting("x.again", "SET x.again = 1", &stats);
        assert!(split.pinned());
        // Counted once, under its reason.
        split.pin(PinReason::Write, &stats);
        assert_eq!(stats.pins[4].load(Ordering::Relaxed), 1);
        assert_eq!(stats.pins[0].load(Ordering::Relaxed), 0);
    }
}
