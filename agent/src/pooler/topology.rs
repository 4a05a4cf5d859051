//! Which server is the primary, and which standbys may take reads: every
//! `role_check_interval` each configured server is asked
//! `pg_is_in_recovery()` and its WAL position over a kept connection
//! (tokio-postgres), and the pooler follows what they answer.
//!
//! The rules, chosen so that a doubtful answer never moves writes:
//! - the current primary answering as a primary stays, whatever else
//!   answers (two primaries are reported, not acted on);
//! - otherwise, exactly one server answering as a primary becomes it (a
//!   promoted standby), and sessions holding a connection to the old one
//!   are ended with a clear error ([`super::Pooler::set_primary`]);
//! - no primary answering changes nothing: writes fail until one does;
//! - a standby takes reads while it answers, is in recovery and, with
//!   `max_standby_lag_bytes`, replays within that many bytes of the
//!   primary's WAL.

use std::{collections::HashMap, net::SocketAddr, sync::Arc, time::Duration};

use tokio::sync::watch;
use tokio_postgres::{NoTls, SimpleQueryMessage};
use tracing::{info, warn};

use super::Pooler;

/// What one server said in one round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerState {
    pub in_recovery: bool,
    /// The primary's `pg_current_wal_lsn()`, a standby's
    /// `pg_last_wal_replay_lsn()` (None when it replayed nothing yet).
    pub lsn: Option<u64>,
}

/// A round's decision: where writes go and which standbys take reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Some when writes should move there.
    pub new_primary: Option<SocketAddr>,
    pub readable_standbys: Vec<SocketAddr>,
    /// Set when the round calls for a warning (no primary, two primaries).
    pub warning: Option<String>,
}

/// Pure: from every server's answer (None = no answer) to a decision.
pub fn decide(
    current: SocketAddr,
    answers: &[(SocketAddr, Option<ServerState>)],
    max_lag_bytes: Option<u64>,
) -> Decision {
    let primaries: Vec<SocketAddr> = answers
        .iter()
        .filter(|(_, state)| state.is_some_and(|s| !s.in_recovery))
        .map(|(addr, _)| *addr)
        .collect();
    let (new_primary, warning) = match primaries.as_slice() {
        [] => (None, Some("no server answers as a primary".to_owned())),
        [only] if *only == current => (None, None),
        [only] => (Some(*only), None),
        many if many.contains(&current) => (
            None,
            Some(format!(
                "several servers answer as a primary: {many:?}; writes stay on {current}"
            )),
        ),
        many => (
            None,
            Some(format!(
                "several servers answer as a primary and {current} is not one: {many:?}; writes stay on {current}"
            )),
        ),
    };
    let primary = new_primary.unwrap_or(current);
    let primary_lsn = answers
        .iter()
        .find(|(addr, _)| *addr == primary)
        .and_then(|(_, state)| state.filter(|s| !s.in_recovery))
        .and_then(|s| s.lsn);
    let readable_standbys = answers
        .iter()
        .filter(|(addr, _)| *addr != primary)
        .filter_map(|(addr, state)| {
            let state = (*state)?;
            if !state.in_recovery {
                return None;
            }
            match (max_lag_bytes, primary_lsn, state.lsn) {
                (None, _, _) => Some(*addr),
                (Some(bound), Some(primary_lsn), Some(lsn)) => {
                    (primary_lsn.saturating_sub(lsn) <= bound).then_some(*addr)
                }
                // A bound, and no way to know the lag: no reads.
                (Some(_), _, _) => None,
            }
        })
        .collect();
    Decision {
        new_primary,
        readable_standbys,
        warning,
    }
}

/// `X/Y` as PostgreSQL prints an LSN, to a byte position.
pub fn parse_lsn(text: &str) -> Option<u64> {
    let (high, low) = text.split_once('/')?;
    let high = u64::from_str_radix(high, 16).ok()?;
    let low = u64::from_str_radix(low, 16).ok()?;
    (high <= u32::MAX as u64 && low <= u32::MAX as u64).then_some((high << 32) | low)
}

const ROLE_QUERY: &str = "SELECT pg_is_in_recovery(), \
     CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn() END";

/// After a nudge, role checks run every this often ...
const RECHECK_EVERY: Duration = Duration::from_millis(50);
/// ... for this long, or until the primary moved: a promotion follows
/// the record by a few hundred milliseconds.
const RECHECK_FOR: Duration = Duration::from_secs(5);
/// How long a server may take to answer in those quick rounds (a dead
/// host must not hold up the round for the whole `role_check_interval`).
const RECHECK_TIMEOUT: Duration = Duration::from_millis(300);

/// Nudges the role checks of `pooler` at every change of `changes` (the
/// cluster's primary record, with `[cluster_state]`), until shutdown. The
/// pooler still moves only on what the servers answer (the rules above):
/// the record only says when to look, so the promoted server is found
/// within [`RECHECK_EVERY`] of its promotion instead of at the next
/// `role_check_interval`.
pub async fn recheck_on_change<T>(
    pooler: Arc<Pooler>,
    mut changes: watch::Receiver<T>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = shutdown.wait_for(|stop| *stop) => return,
            changed = changes.changed() => {
                if changed.is_err() {
                    return;
                }
                pooler.recheck.notify_one();
            }
        }
    }
}

/// A logged-in role-check connection and the task that drives it.
type Connected = (tokio_postgres::Client, tokio::task::JoinHandle<()>);

/// How long a role-check login may take. It runs in a task of its own that
/// outlives a round's timeout: on a starved CPU a fresh login (SCRAM) can
/// take longer than one short round, and one that restarted every round
/// would never finish, leaving the pooler on a stale primary.
const LOGIN_TIMEOUT: Duration = Duration::from_secs(5);

/// One kept connection per server; reopened after any failure.
struct Prober {
    config: tokio_postgres::Config,
    addr: SocketAddr,
    client: Option<Connected>,
    login: Option<tokio::task::JoinHandle<Result<Connected, String>>>,
}

impl Prober {
    fn new(addr: SocketAddr, pooler: &Pooler, timeout: Duration) -> Prober {
        let mut config = tokio_postgres::Config::new();
        super::server_stream::aim_login(
            &mut config,
            addr,
            pooler.config.unix_socket_dir.as_deref(),
        );
        config
            .dbname(&pooler.config.role_check_database)
            .application_name("farol-pooler-role-check")
            .connect_timeout(timeout.max(LOGIN_TIMEOUT));
        if let Some(user) = pooler.config.role_check_login() {
            config.user(&user.name);
            if let Some(password) = &user.server_password {
                config.password(password);
            }
        }
        Prober {
            config,
            addr,
            client: None,
            login: None,
        }
    }

    async fn probe(&mut self, timeout: Duration) -> Result<ServerState, String> {
        let result = tokio::time::timeout(timeout, self.query()).await;
        let result = result.unwrap_or_else(|_| Err(format!("no answer within {timeout:?}")));
        if result.is_err() {
            if let Some((_, driver)) = self.client.take() {
                driver.abort();
            }
        }
        result
    }

    async fn query(&mut self) -> Result<ServerState, String> {
        if self.client.is_none() {
            let config = self.config.clone();
            let login = self.login.get_or_insert_with(|| {
                tokio::spawn(async move {
                    let (client, connection) =
                        tokio::time::timeout(LOGIN_TIMEOUT, config.connect(NoTls))
                            .await
                            .map_err(|_| format!("no login within {LOGIN_TIMEOUT:?}"))?
                            .map_err(|error| format!("cannot log in: {error}"))?;
                    let driver = tokio::spawn(async move {
                        let _ = connection.await;
                    });
                    Ok((client, driver))
                })
            });
            // A round that times out here leaves the login running for
            // the next round to pick up.
            let logged_in = login.await;
            self.login = None;
            let connected =
                logged_in.map_err(|error| format!("the login task failed: {error}"))??;
            self.client = Some(connected);
        }
        let (client, _) = self.client.as_ref().expect("connected above");
        let messages = client
            .simple_query(ROLE_QUERY)
            .await
            .map_err(|error| format!("query failed: {error}"))?;
        let row = messages
            .iter()
            .find_map(|message| match message {
                SimpleQueryMessage::Row(row) => Some(row),
                _ => None,
            })
            .ok_or("no row in the answer")?;
        let in_recovery = match row.get(0) {
            Some("t") => true,
            Some("f") => false,
            other => return Err(format!("pg_is_in_recovery() returned {other:?}")),
        };
        Ok(ServerState {
            in_recovery,
            lsn: row.get(1).and_then(parse_lsn),
        })
    }
}

/// Follows the servers' roles until `shutdown`; returns at once when role
/// checks are off.
pub async fn follow(pooler: Arc<Pooler>, mut shutdown: watch::Receiver<bool>) {
    let every = pooler.config.role_check_interval;
    if every.is_zero() {
        return;
    }
    if pooler.config.role_check_login().is_none() {
        warn!("pooler role checks need a user in pooler.users; the primary stays where the config puts it");
        return;
    }
    // A check must end before the next one is due.
    let timeout = every.max(Duration::from_millis(200));
    let mut probers: Vec<Prober> = pooler
        .config
        .servers()
        .into_iter()
        .map(|addr| Prober::new(addr, &pooler, timeout))
        .collect();
    let mut last_error: HashMap<SocketAddr, String> = HashMap::new();
    let mut last_warning: Option<String> = None;
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Set by a nudge: quick rounds until then, or until the primary moves.
    let mut quick_until: Option<tokio::time::Instant> = None;
    loop {
        let quick = quick_until.filter(|until| *until > tokio::time::Instant::now());
        tokio::select! {
            _ = ticker.tick(), if quick.is_none() => {}
            () = tokio::time::sleep(RECHECK_EVERY), if quick.is_some() => {}
            () = pooler.recheck.notified() => {
                quick_until = Some(tokio::time::Instant::now() + RECHECK_FOR);
            }
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
        let round_timeout = if quick_until.is_some() {
            timeout.min(RECHECK_TIMEOUT)
        } else {
            timeout
        };
        let rounds = probers.iter_mut().map(|prober| async {
            let answer = prober.probe(round_timeout).await;
            (prober.addr, answer)
        });
        let results = futures_util::future::join_all(rounds).await;
        let mut answers = Vec::with_capacity(results.len());
        for (addr, result) in results {
            match result {
                Ok(state) => {
                    if last_error.remove(&addr).is_some() {
                        info!(server = %addr, "pooler role check: the server answers again");
                    }
                    answers.push((addr, Some(state)));
                }
                Err(error) => {
                    if last_error.get(&addr) != Some(&error) {
                        warn!(server = %addr, %error, "pooler role check failed");
                        last_error.insert(addr, error);
                    }
                    answers.push((addr, None));
                }
            }
        }
        let decision = decide(
            pooler.primary(),
            &answers,
            pooler.config.max_standby_lag_bytes,
        );
        if decision.warning != last_warning {
            if let Some(warning) = &decision.warning {
                warn!("pooler: {warning}");
            }
            last_warning = decision.warning.clone();
        }
        if let Some(new_primary) = decision.new_primary {
            pooler.set_primary(new_primary);
            quick_until = None;
            ticker.reset();
        }
        pooler.set_readable_standbys(decision.readable_standbys);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    fn primary(lsn: u64) -> Option<ServerState> {
        Some(ServerState {
            in_recovery: false,
            lsn: Some(lsn),
        })
    }

    fn standby(lsn: u64) -> Option<ServerState> {
        Some(ServerState {
            in_recovery: true,
            lsn: Some(lsn),
        })
    }

    #[test]
    fn the_current_primary_stays_while_it_answers_as_one() {
        let decision = decide(
            addr(1),
            &[(addr(1), primary(100)), (addr(2), standby(90))],
            None,
        );
        assert_eq!(decision.new_primary, None);
        assert_eq!(decision.readable_standbys, vec![addr(2)]);
        assert_eq!(decision.warning, None);
    }

    #[test]
    fn a_promoted_standby_becomes_the_primary_when_the_old_one_is_gone() {
        let answers = [
            (addr(1), None),
            (addr(2), primary(200)),
            (addr(3), standby(150)),
        ];
        let decision = decide(addr(1), &answers, None);
        assert_eq!(decision.new_primary, Some(addr(2)));
        assert_eq!(decision.readable_standbys, vec![addr(3)]);
    }

    #[test]
    fn a_demoted_old_primary_answering_as_standby_takes_reads() {
        let answers = [(addr(1), standby(200)), (addr(2), primary(200))];
        let decision = decide(addr(1), &answers, None);
        assert_eq!(decision.new_primary, Some(addr(2)));
        assert_eq!(decision.readable_standbys, vec![addr(1)]);
    }

    #[test]
    fn two_primaries_never_move_writes() {
        let both = [(addr(1), primary(10)), (addr(2), primary(20))];
        let decision = decide(addr(1), &both, None);
        assert_eq!(decision.new_primary, None);
        assert!(decision.warning.unwrap().contains("several"));
        let neither_current = [
            (addr(1), None),
            (addr(2), primary(20)),
            (addr(3), primary(30)),
        ];
        let decision = decide(addr(1), &neither_current, None);
        assert_eq!(decision.new_primary, None);
        assert!(decision.warning.is_some());
    }

    #[test]
    fn no_primary_changes_nothing_and_warns() {
        let decision = decide(addr(1), &[(addr(1), None), (addr(2), standby(5))], None);
        assert_eq!(decision.new_primary, None);
        assert_eq!(
            decision.warning.as_deref(),
            Some("no server answers as a primary")
        );
    }

    #[test]
    fn a_lagging_standby_gets_no_reads_under_a_bound() {
        let answers = [
            (addr(1), primary(10_000)),
            (addr(2), standby(9_000)),
            (addr(3), standby(1_000)),
            (
                addr(4),
                Some(ServerState {
                    in_recovery: true,
                    lsn: None,
                }),
            ),
        ];
        let decision = decide(addr(1), &answers, Some(1_000));
        assert_eq!(decision.readable_standbys, vec![addr(2)]);
        let unbounded = decide(addr(1), &answers, None);
        assert_eq!(unbounded.readable_standbys, vec![addr(2), addr(3), addr(4)]);
        // Without the primary's position, a bound admits no standby.
        let blind = decide(
            addr(1),
            &[(addr(1), None), (addr(2), standby(9_000))],
            Some(1_000),
        );
        assert!(blind.readable_standbys.is_empty());
    }

    #[test]
    fn lsns_parse_as_postgresql_prints_them() {
        assert_eq!(parse_lsn("0/3000060"), Some(0x300_0060));
        assert_eq!(parse_lsn("16/B374D848"), Some((0x16 << 32) | 0xB374_D848));
        assert_eq!(parse_lsn("garbage"), None);
        assert_eq!(parse_lsn("1/"), None);
        assert_eq!(parse_lsn("100000000/0"), None);
    }
}
