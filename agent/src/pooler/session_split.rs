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
//! each name is kept; `RESET ALL` replaces them all). A `SET` inside a
//! transaction block, on either connection (a `BEGIN READ ONLY` block runs
//! on the standby), lasts only if the block commits and is undone by a
//! rollback to an earlier savepoint, so the pooler does not guess: once
//! the block is over it reads the values back from that connection
//! (`current_setting`) and replays them on the other one with
//! `set_config`. Anything else that leaves state in the session
//! (temporary objects, LISTEN, SQL PREPARE, cursors, advisory locks,
//! `set_config`, a statement the parser does not know), and any write when
//! `read_your_writes` is on, pins the session to the primary for good:
//! the standby connection goes back to its pool (after its settings were
//! read back), and the primary's stays as in a plain session pool.
//! `DISCARD ALL` forgets the settings and gives the standby connection
//! back; the next read borrows one afresh.

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
    /// A standby refused a setting the primary took.
    SettingRefused,
    /// More distinct settings than [`MAX_SETTINGS`].
    TooManySettings,
}

impl PinReason {
    const ALL: [PinReason; 4] = [
        PinReason::Write,
        PinReason::SessionState,
        PinReason::SettingRefused,
        PinReason::TooManySettings,
    ];

    /// The metric label.
    fn label(self) -> &'static str {
        match self {
            PinReason::Write => "write",
            PinReason::SessionState => "session_state",
            PinReason::SettingRefused => "setting_refused",
            PinReason::TooManySettings => "too_many_settings",
        }
    }

    fn describe(self) -> &'static str {
        match self {
            PinReason::Write => "a write, with read_your_writes",
            PinReason::SessionState => "state only the primary's connection has (temporary objects, LISTEN, PREPARE, cursors, advisory locks, set_config, or a statement the parser cannot read)",
            PinReason::SettingRefused => "a session setting a standby refused",
            PinReason::TooManySettings => "more distinct session settings than the pooler replays",
        }
    }
}

/// Counters of the split in session pools, on `/metrics`.
#[derive(Debug, Default)]
pub struct SplitStats {
    /// Sessions pinned to the primary, by [`PinReason::ALL`] order.
    pins: [AtomicU64; 4],
    /// Standby connections borrowed by sessions.
    pub(super) standby_borrowed: AtomicU64,
    /// Standby connections a session gave up mid-session (dead, lagging,
    /// no longer a standby).
    pub(super) standby_lost: AtomicU64,
    /// Settings replayed on the session's other connection.
    pub(super) settings_replayed: AtomicU64,
    /// Settings made inside a transaction block, read back once it ended.
    pub(super) settings_read_back: AtomicU64,
    /// Sessions that went on with a new primary connection after the
    /// primary moved.
    pub(super) followed_primary: AtomicU64,
    /// Connections that closed while their session ran nothing, which
    /// went on without them.
    pub(super) idle_connections_lost: AtomicU64,
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
                "Session settings replayed on the other connection of session-pool clients (the standby's, or the primary's after a setting inside a read-only block)",
                &stats.settings_replayed,
            ),
            (
                "farol_pooler_split_settings_read_back",
                "Session settings made inside a transaction block and read back from its connection once the block ended",
                &stats.settings_read_back,
            ),
            (
                "farol_pooler_split_sessions_followed_primary",
                "Session-pool clients that went on with a connection to the new primary after the primary moved (their settings replayed there)",
                &stats.followed_primary,
            ),
            (
                "farol_pooler_split_idle_connections_lost",
                "Server connections of session-pool clients that closed while the session ran nothing (a node lost, a server shut down); the session went on with a new one",
                &stats.idle_connections_lost,
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

/// One of the session's two connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Side {
    Primary,
    Standby,
}

/// Settings made inside a transaction block, read back when it ended.
#[derive(Debug)]
struct InBlock {
    side: Side,
    /// Setting keys as [`SessionEffect::Setting`](super::route::SessionEffect) names them.
    keys: Vec<Box<str>>,
}

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
    /// Settings up to this `seq` are in force on the standby connection.
    standby_synced: u64,
    /// Settings up to this `seq` are in force on the primary connection.
    primary_synced: u64,
    /// Settings made inside the current or last transaction block.
    in_block: Option<InBlock>,
}

impl SessionSplit {
    pub(super) fn pinned(&self) -> bool {
        self.pinned.is_some()
    }

    /// The connection the relay runs on now.
    pub(super) fn active_side(&self) -> Side {
        if self.on_standby {
            Side::Standby
        } else {
            Side::Primary
        }
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

    /// Remembers a session-level setting that is in force on the `origin`
    /// connection (which had every earlier one).
    pub(super) fn record_setting(
        &mut self,
        key: &str,
        sql: &str,
        origin: Side,
        stats: &SplitStats,
    ) {
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
        *self.synced_mut(origin) = self.next_seq;
    }

    fn synced_mut(&mut self, side: Side) -> &mut u64 {
        match side {
            Side::Primary => &mut self.primary_synced,
            Side::Standby => &mut self.standby_synced,
        }
    }

    /// A setting ran inside a transaction block on `side`: whether it
    /// lasts is known once the block is over (see [`Self::read_back`]).
    pub(super) fn setting_in_block(&mut self, key: &str, side: Side, stats: &SplitStats) {
        let block = self.in_block.get_or_insert_with(|| InBlock {
            side,
            keys: Vec::new(),
        });
        if block.keys.iter().any(|known| &**known == key) {
            return;
        }
        if block.keys.len() >= MAX_SETTINGS {
            self.pin(PinReason::TooManySettings, stats);
            return;
        }
        block.keys.push(key.into());
    }

    /// The connection that ran the block's settings is gone.
    pub(super) fn forget_block(&mut self) {
        self.in_block = None;
    }

    /// The connection that ran settings inside a block that is over now.
    pub(super) fn read_back_due(&self) -> Option<Side> {
        self.in_block.as_ref().map(|block| block.side)
    }

    /// Reads the values of the settings made inside the block that ended
    /// from `server` (the connection that ran it) and records them as
    /// settings in force there, for the other connection to replay.
    pub(super) async fn read_back(
        &mut self,
        server: &mut PooledServer,
        stats: &SplitStats,
    ) -> Result<(), ReplayError> {
        let Some(block) = self.in_block.take() else {
            return Ok(());
        };
        let mut names: Vec<&str> = Vec::new();
        let recorded: Vec<Box<str>> = self.settings.iter().map(|s| s.key.clone()).collect();
        for key in &block.keys {
            if &**key == "*" {
                // RESET ALL inside the block: whatever was set before may
                // be back at its default now.
                for known in &recorded {
                    names.extend(setting_names(known));
                }
            } else {
                names.extend(setting_names(key));
            }
        }
        names.sort_unstable();
        names.dedup();
        if names.is_empty() {
            return Ok(());
        }
        let sql = format!(
            "SELECT {}",
            names
                .iter()
                .map(|name| format!("pg_catalog.current_setting({}, true)", literal(name)))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let row = tokio::time::timeout(REPLAY_TIMEOUT, run_simple(server, &sql))
            .await
            .map_err(|_| ReplayError::Connection)??;
        for (name, value) in names.iter().zip(row) {
            // NULL: not a setting this server knows (a custom one never set).
            let Some(value) = value else { continue };
            let sql = format!(
                "SELECT pg_catalog.set_config({}, {}, false)",
                literal(name),
                literal(&value)
            );
            self.record_setting(name, &sql, block.side, stats);
            stats.settings_read_back.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    /// `DISCARD ALL` ran on the primary: no setting is left to replay.
    pub(super) fn forget_settings(&mut self) {
        self.settings.clear();
    }

    /// A new standby connection has none of the session's settings.
    pub(super) fn new_standby(&mut self) {
        self.standby_synced = 0;
    }

    /// Everything the session left on its primary connection can be
    /// rebuilt on another server: its settings are recorded (none waits
    /// to be read back from the primary connection) and nothing else
    /// (temporary objects, LISTEN, cursors, locks...) pinned it there.
    pub(super) fn can_follow_the_primary(&self) -> bool {
        matches!(self.pinned, None | Some(PinReason::Write))
            && self
                .in_block
                .as_ref()
                .is_none_or(|block| block.side != Side::Primary)
    }

    /// The primary connection was left behind: a new one has none of the
    /// session's settings.
    pub(super) fn new_primary(&mut self) {
        self.primary = None;
        self.primary_synced = 0;
    }

    /// Sends the settings the `side` connection lacks, swallowing the
    /// answers. A refused one is skipped (not sent again) and reported.
    pub(super) async fn replay(
        &mut self,
        server: &mut PooledServer,
        side: Side,
        stats: &SplitStats,
    ) -> Result<(), ReplayError> {
        let synced = *self.synced_mut(side);
        let missing: Vec<(u64, String)> = self
            .settings
            .iter()
            .filter(|setting| setting.seq > synced)
            .map(|setting| (setting.seq, setting.sql.clone()))
            .collect();
        for (seq, sql) in missing {
            let ran = tokio::time::timeout(REPLAY_TIMEOUT, run_simple(server, &sql))
                .await
                .map_err(|_| ReplayError::Connection)?;
            *self.synced_mut(side) = seq;
            ran?;
            stats.settings_replayed.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }
}

/// The server settings a setting key stands for.
fn setting_names(key: &str) -> Vec<&str> {
    match key {
        "*" => Vec::new(),
        "session characteristics" => vec![
            "default_transaction_isolation",
            "default_transaction_read_only",
            "default_transaction_deferrable",
        ],
        key => vec![key],
    }
}

/// `text` as an SQL string literal that reads the same whatever
/// `standard_conforming_strings` is.
fn literal(text: &str) -> String {
    let mut quoted = String::with_capacity(text.len() + 4);
    quoted.push_str("E'");
    for c in text.chars() {
        match c {
            '\\' => quoted.push_str("\\\\"),
            '\'' => quoted.push_str("''"),
            c => quoted.push(c),
        }
    }
    quoted.push('\'');
    quoted
}

/// Runs one simple query on an idle connection and returns its first row
/// (empty when it has none); an ErrorResponse is returned as `Refused`
/// with its message.
async fn run_simple(
    server: &mut PooledServer,
    sql: &str,
) -> Result<Vec<Option<String>>, ReplayError> {
    let mut out = BytesMut::with_capacity(sql.len() + 8);
    protocol::query(&mut out, sql);
    let conn = &mut server.conn;
    conn.stream
        .write_all(&out)
        .await
        .map_err(|_| ReplayError::Connection)?;
    let mut refused = None;
    let mut first_row = None;
    loop {
        if let Some((tag, len)) = protocol::frame(&conn.buf).map_err(|_| ReplayError::Connection)? {
            if conn.buf.len() >= len {
                if tag == b'D' && first_row.is_none() {
                    first_row = Some(data_row(&conn.buf[5..len]).ok_or(ReplayError::Connection)?);
                }
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
                            None => Ok(first_row.unwrap_or_default()),
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

/// The values of a DataRow body (text format; NULL as `None`).
fn data_row(mut body: &[u8]) -> Option<Vec<Option<String>>> {
    let count = u16::from_be_bytes(body.get(..2)?.try_into().ok()?);
    body = &body[2..];
    let mut values = Vec::with_capacity(count.into());
    for _ in 0..count {
        let len = i32::from_be_bytes(body.get(..4)?.try_into().ok()?);
        body = &body[4..];
        if len < 0 {
            values.push(None);
            continue;
        }
        let (value, rest) = body.split_at_checked(len as usize)?;
        values.push(Some(String::from_utf8_lossy(value).into_owned()));
        body = rest;
    }
    Some(values)
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
        split.record_setting(
            "application_name",
            "SET application_name = 'a'",
            Side::Primary,
            &stats,
        );
        split.record_setting("search_path", "SET search_path = x", Side::Primary, &stats);
        split.record_setting(
            "application_name",
            "SET application_name = 'b'",
            Side::Primary,
            &stats,
        );
        assert_eq!(
            pending(&split),
            ["SET search_path = x", "SET application_name = 'b'"]
        );
        // The standby got those; a later setting is all it lacks.
        split.standby_synced = split.next_seq;
        split.record_setting("timezone", "SET TIME ZONE 'UTC'", Side::Primary, &stats);
        assert_eq!(pending(&split), ["SET TIME ZONE 'UTC'"]);
        split.record_setting("*", "RESET ALL", Side::Primary, &stats);
        assert_eq!(pending(&split), ["RESET ALL"]);
        // A new standby connection gets everything still in force.
        split.record_setting("search_path", "SET search_path = y", Side::Primary, &stats);
        split.new_standby();
        assert_eq!(pending(&split), ["RESET ALL", "SET search_path = y"]);
        assert!(!split.pinned());
    }

    #[test]
    fn too_many_distinct_settings_pin_the_session() {
        let stats = SplitStats::default();
        let mut split = SessionSplit::default();
        for i in 0..MAX_SETTINGS {
            split.record_setting(
                &format!("x.k{i}"),
                &format!("SET x.k{i} = 1"),
                Side::Primary,
                &stats,
            );
        }
        assert!(!split.pinned());
        split.record_setting("x.again", "SET x.again = 1", Side::Primary, &stats);
        assert!(split.pinned());
        // Counted once, under its reason.
        split.pin(PinReason::Write, &stats);
        assert_eq!(stats.pins[3].load(Ordering::Relaxed), 1);
        assert_eq!(stats.pins[0].load(Ordering::Relaxed), 0);
    }

    #[test]
    fn settings_from_either_side_are_replayed_on_the_other_in_order() {
        let stats = SplitStats::default();
        let mut split = SessionSplit::default();
        split.record_setting("search_path", "SET search_path = x", Side::Primary, &stats);
        // Read back from the standby after a READ ONLY block.
        split.standby_synced = split.next_seq;
        split.record_setting(
            "timezone",
            "SELECT set_config('timezone', 'UTC', false)",
            Side::Standby,
            &stats,
        );
        let missing = |split: &SessionSplit, side: Side| -> Vec<String> {
            let synced = match side {
                Side::Primary => split.primary_synced,
                Side::Standby => split.standby_synced,
            };
            split
                .settings
                .iter()
                .filter(|s| s.seq > synced)
                .map(|s| s.sql.clone())
                .collect()
        };
        assert_eq!(
            missing(&split, Side::Primary),
            ["SELECT set_config('timezone', 'UTC', false)"]
        );
        assert!(missing(&split, Side::Standby).is_empty());
    }

    #[test]
    fn in_block_settings_are_kept_once_each_and_read_back_from_their_side() {
        let stats = SplitStats::default();
        let mut split = SessionSplit::default();
        assert_eq!(split.read_back_due(), None);
        split.setting_in_block("search_path", Side::Standby, &stats);
        split.setting_in_block("search_path", Side::Standby, &stats);
        split.setting_in_block("session characteristics", Side::Standby, &stats);
        assert_eq!(split.read_back_due(), Some(Side::Standby));
        let keys: Vec<&str> = split
            .in_block
            .as_ref()
            .unwrap()
            .keys
            .iter()
            .map(|k| &**k)
            .collect();
        assert_eq!(keys, ["search_path", "session characteristics"]);
        assert_eq!(
            setting_names("session characteristics"),
            [
                "default_transaction_isolation",
                "default_transaction_read_only",
                "default_transaction_deferrable"
            ]
        );
    }

    #[test]
    fn literals_survive_quotes_and_backslashes_and_rows_parse_with_nulls() {
        assert_eq!(literal("a'b\\c"), "E'a''b\\\\c'");
        assert_eq!(literal(""), "E''");
        // Two columns: "public" and NULL.
        let mut body = vec![0, 2, 0, 0, 0, 6];
        body.extend_from_slice(b"public");
        body.extend_from_slice(&(-1i32).to_be_bytes());
        assert_eq!(data_row(&body), Some(vec![Some("public".to_owned()), None]));
        // A length past the end is no row, not a panic.
        assert_eq!(data_row(&[0, 1, 0, 0, 0, 9, b'x']), None);
        assert_eq!(data_row(&[0]), None);
    }
}
