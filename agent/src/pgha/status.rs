//! What the agent reads from PostgreSQL: role, timeline, WAL positions,
//! the standbys a primary sees, a standby's lag behind its upstream; and
//! the connections it reads them over (the superuser on the local socket,
//! the replication role towards peers).

use std::{fmt, time::Duration};

use serde::Serialize;
use tokio_postgres::{Client, NoTls, SimpleQueryMessage};

use super::{Member, PgPlan, PghaError};

/// A WAL position (`pg_lsn`), as bytes from the start of the WAL.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Lsn(pub u64);

impl Lsn {
    /// Parses PostgreSQL's `XXXXXXXX/YYYYYYYY`.
    pub fn parse(text: &str) -> Option<Lsn> {
        let (high, low) = text.trim().split_once('/')?;
        let high = u64::from_str_radix(high, 16).ok()?;
        let low = u64::from_str_radix(low, 16).ok()?;
        (high <= u32::MAX as u64 && low <= u32::MAX as u64).then_some(Lsn(high << 32 | low))
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xffff_ffff)
    }
}

/// What the server is, seen from a query (or not answering at all).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ObservedRole {
    Down,
    Primary,
    Standby,
}

impl ObservedRole {
    pub fn label(self) -> &'static str {
        match self {
            ObservedRole::Down => "down",
            ObservedRole::Primary => "primary",
            ObservedRole::Standby => "standby",
        }
    }
}

/// One standby as the primary sees it in `pg_stat_replication`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StandbyLag {
    /// Its `application_name` (the node's name in Farol's conninfo).
    pub name: String,
    pub state: String,
    /// `async`, `potential`, `quorum` or `sync`.
    pub sync_state: String,
    pub replay_lsn: Option<Lsn>,
    /// WAL written on the primary and not yet replayed there.
    pub lag_bytes: u64,
    /// `replay_lag`: how long the last replayed commit took to get there
    /// (0 when idle).
    pub lag_seconds: f64,
}

/// The server's role and positions at one moment.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PgStatus {
    pub role: ObservedRole,
    pub timeline: Option<u32>,
    /// The primary's current write position, or a standby's replay one.
    pub lsn: Option<Lsn>,
    pub receive_lsn: Option<Lsn>,
    pub replay_lsn: Option<Lsn>,
    /// A standby's WAL receiver is streaming.
    pub streaming: bool,
    /// `host:port` a standby streams from, as its WAL receiver reports.
    pub sender: Option<String>,
    /// `primary_conninfo` as the server runs with it.
    pub primary_conninfo: Option<String>,
    /// The fence is up (`default_transaction_read_only` and commits held).
    pub fenced: bool,
    /// A standby's replay lag behind its upstream's current position, in
    /// bytes, when the upstream answered.
    pub lag_bytes: Option<u64>,
    /// On a primary: its standbys.
    pub replication: Vec<StandbyLag>,
    /// Why the server is down or not answering, when it is.
    pub error: Option<String>,
}

impl PgStatus {
    pub fn down(error: String) -> PgStatus {
        PgStatus {
            role: ObservedRole::Down,
            timeline: None,
            lsn: None,
            receive_lsn: None,
            replay_lsn: None,
            streaming: false,
            sender: None,
            primary_conninfo: None,
            fenced: false,
            lag_bytes: None,
            replication: Vec::new(),
            error: Some(error),
        }
    }
}

/// `'text'` with quotes doubled, for SQL literals and postgresql.conf.
pub fn quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// A libpq connection string to `member` as the replication role.
pub fn conninfo(plan: &PgPlan, member: &Member, dbname: Option<&str>) -> String {
    let mut text = format!(
        "host={} port={} user={} application_name={} connect_timeout=2",
        member.host, member.port, plan.replication_user, plan.node
    );
    if let Some(password) = &plan.replication_password {
        text.push_str(&format!(" password={}", quote(password)));
    }
    if let Some(dbname) = dbname {
        text.push_str(&format!(" dbname={dbname}"));
    }
    text
}

/// A superuser connection to this node's server over its socket.
pub async fn connect(plan: &PgPlan) -> Result<Client, PghaError> {
    let mut config = tokio_postgres::Config::new();
    config
        .host_path(&plan.socket_dir)
        .port(plan.port)
        .user(&plan.os_user)
        .dbname("postgres")
        .application_name("farol-agent")
        .connect_timeout(Duration::from_secs(2));
    let (client, connection) = config
        .connect(NoTls)
        .await
        .map_err(|source| PghaError::Sql {
            node: plan.node.clone(),
            what: "connecting over the socket".into(),
            source,
        })?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// Runs `sql` and returns its rows as text columns.
pub(super) async fn rows(
    client: &Client,
    node: &str,
    sql: &str,
) -> Result<Vec<Vec<Option<String>>>, PghaError> {
    let messages = client
        .simple_query(sql)
        .await
        .map_err(|source| PghaError::Sql {
            node: node.to_owned(),
            what: format!(
                "running {}",
                sql.split_whitespace().take(4).collect::<Vec<_>>().join(" ")
            ),
            source,
        })?;
    Ok(messages
        .into_iter()
        .filter_map(|message| match message {
            SimpleQueryMessage::Row(row) => Some(
                (0..row.len())
                    .map(|i| row.get(i).map(str::to_owned))
                    .collect(),
            ),
            _ => None,
        })
        .collect())
}

pub(super) async fn execute(client: &Client, node: &str, sql: &str) -> Result<(), PghaError> {
    rows(client, node, sql).await.map(drop)
}

const STATUS_SQL: &str = "SELECT pg_is_in_recovery(), \
    CASE WHEN pg_is_in_recovery() THEN NULL ELSE pg_current_wal_lsn()::text END, \
    pg_last_wal_receive_lsn()::text, pg_last_wal_replay_lsn()::text, \
    CASE WHEN pg_is_in_recovery() THEN (SELECT timeline_id FROM pg_control_checkpoint())::text \
         ELSE (('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int)::text END, \
    (SELECT status FROM pg_stat_wal_receiver), \
    (SELECT received_tli FROM pg_stat_wal_receiver)::text, \
    (SELECT sender_host || ':' || sender_port FROM pg_stat_wal_receiver), \
    current_setting('primary_conninfo'), \
    current_setting('default_transaction_read_only')";

const REPLICATION_SQL: &str = "SELECT application_name, state, sync_state, replay_lsn::text, \
    coalesce(pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn), 0)::bigint::text, \
    coalesce(extract(epoch FROM replay_lag), 0)::text \
    FROM pg_stat_replication ORDER BY application_name";

/// Reads role, timeline and positions; on a standby with `upstream`,
/// also its lag behind the upstream's current position (one connection to
/// the upstream; the reconciler keeps one open instead, see
/// [`UpstreamProbe`]).
pub async fn observe(plan: &PgPlan, upstream: Option<&Member>) -> PgStatus {
    let mut status = observe_local(plan).await;
    if let Some(upstream) = upstream {
        if status.role == ObservedRole::Standby {
            let position = UpstreamProbe::default().position(plan, upstream).await;
            status.apply_upstream(position);
        }
    }
    status
}

/// Reads role, timeline and positions of the local server only.
pub async fn observe_local(plan: &PgPlan) -> PgStatus {
    let client = match connect(plan).await {
        Ok(client) => client,
        Err(error) => return PgStatus::down(crate::error_chain(&error)),
    };
    let result = rows(&client, &plan.node, STATUS_SQL).await;
    let row = match result {
        Ok(mut rows) if !rows.is_empty() => rows.swap_remove(0),
        Ok(_) => return PgStatus::down("the status query returned no row".into()),
        Err(error) => return PgStatus::down(crate::error_chain(&error)),
    };
    let col = |i: usize| row.get(i).cloned().flatten();
    let lsn = |i: usize| col(i).as_deref().and_then(Lsn::parse);
    let standby = col(0).as_deref() == Some("t");
    let mut status = PgStatus {
        role: if standby {
            ObservedRole::Standby
        } else {
            ObservedRole::Primary
        },
        // A standby's received timeline is newer than its last restartpoint's.
        timeline: if standby {
            col(6).or_else(|| col(4))
        } else {
            col(4)
        }
        .and_then(|t| t.parse().ok()),
        lsn: if standby { lsn(3) } else { lsn(1) },
        receive_lsn: lsn(2),
        replay_lsn: lsn(3),
        streaming: col(5).as_deref() == Some("streaming"),
        sender: col(7),
        primary_conninfo: col(8).filter(|c| !c.is_empty()),
        fenced: col(9).as_deref() == Some("on"),
        lag_bytes: None,
        replication: Vec::new(),
        error: None,
    };
    if standby {
        // The lag needs the upstream: see `apply_upstream`.
    } else if let Ok(rows) = rows(&client, &plan.node, REPLICATION_SQL).await {
        status.replication = rows
            .into_iter()
            .map(|row| {
                let col = |i: usize| row.get(i).cloned().flatten();
                StandbyLag {
                    name: col(0).unwrap_or_default(),
                    state: col(1).unwrap_or_default(),
                    sync_state: col(2).unwrap_or_default(),
                    replay_lsn: col(3).as_deref().and_then(Lsn::parse),
                    lag_bytes: col(4).and_then(|v| v.parse().ok()).unwrap_or(0),
                    lag_seconds: col(5).and_then(|v| v.parse().ok()).unwrap_or(0.0),
                }
            })
            .collect();
    }
    status
}

/// A connection to a standby's upstream, kept open across looks, that
/// reads the upstream's current WAL position (its receive position if it
/// is a standby itself) as the replication role.
#[derive(Default)]
pub struct UpstreamProbe {
    target: Option<Member>,
    client: Option<Client>,
}

impl UpstreamProbe {
    /// The upstream's position now; None when it does not answer (the
    /// next call connects again).
    pub async fn position(&mut self, plan: &PgPlan, upstream: &Member) -> Option<Lsn> {
        if self.target.as_ref() != Some(upstream)
            || self.client.as_ref().is_some_and(Client::is_closed)
        {
            self.client = None;
            self.target = Some(upstream.clone());
        }
        if self.client.is_none() {
            let config: tokio_postgres::Config =
                conninfo(plan, upstream, Some("postgres")).parse().ok()?;
            let (client, connection) =
                tokio::time::timeout(Duration::from_secs(2), config.connect(NoTls))
                    .await
                    .ok()?
                    .ok()?;
            tokio::spawn(async move {
                let _ = connection.await;
            });
            self.client = Some(client);
        }
        let client = self.client.as_ref()?;
        let sql = "SELECT CASE WHEN pg_is_in_recovery() THEN pg_last_wal_receive_lsn() ELSE pg_current_wal_lsn() END::text";
        match tokio::time::timeout(Duration::from_secs(2), rows(client, &upstream.name, sql)).await
        {
            Ok(Ok(rows)) => rows.first()?.first()?.as_deref().and_then(Lsn::parse),
            _ => {
                self.client = None;
                None
            }
        }
    }
}

impl std::fmt::Debug for UpstreamProbe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamProbe")
            .field("target", &self.target)
            .field("connected", &self.client.is_some())
            .finish()
    }
}

impl PgStatus {
    /// A standby's lag from its upstream's position (None: unknown).
    pub fn apply_upstream(&mut self, upstream: Option<Lsn>) {
        if self.role == ObservedRole::Standby {
            self.lag_bytes = match (upstream, self.replay_lsn) {
                (Some(current), Some(replay)) => Some(current.0.saturating_sub(replay.0)),
                _ => None,
            };
        }
    }
}
