//! PostgreSQL run and replicated by the agent (issue 9, the PostgreSQL
//! side): bootstrap from the `[postgres]` section, the postmaster as a
//! child, the role operations (promote, repoint, fence, rejoin through
//! pg_rewind, switchover), Patroni-compatible `/primary`, `/replica`,
//! `/health`, and `farol_pg_*` metrics.
//!
//! Owns: this node's PostgreSQL server and data directory. Does not own the
//! decision of who is primary: a [`Desired`] role (with the epoch of the
//! decision) comes in through a watch channel, and the [`reconcile`] loop
//! brings the local server to it. Today `agent run` feeds it the bootstrap
//! primary of the config; the `cluster` module (openraft) feeds it the
//! primary record and lease through [`desired_from_record`].
//!
//! Layout: `status.rs` what is read from the servers and over which
//! connections, `local.rs` the node's server and the operations on it (files,
//! programs, SQL), `postmaster.rs` the child process, `reconcile.rs` the
//! loop and the switchover sequence, `api.rs` the HTTP endpoints,
//! `metrics.rs` the collector.

use std::{collections::BTreeMap, fmt, net::SocketAddr, path::PathBuf, time::Duration};

use crate::config::{
    pgha::{expand, PostgresConfig},
    Config, NodeConfig,
};

pub mod api;
pub mod cli;
pub mod crash;
pub mod failover;
pub mod local;
pub mod metrics;
pub mod postmaster;
pub mod reconcile;
pub mod status;
pub mod switchover;

pub use api::routes;
pub use local::{Lsn, ObservedRole, PgNode, PgStatus, StandbyLag, UpstreamProbe};
pub use metrics::PgCollector;
pub use reconcile::{promotion_candidate, switchover, Candidate, Pgha, SwitchoverReport};

#[derive(Debug, thiserror::Error)]
pub enum PghaError {
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{program} failed ({status}): {output}")]
    Program {
        program: String,
        status: String,
        output: String,
    },
    #[error("the OS user {0:?} does not exist (PostgreSQL runs as it; apt-get install postgresql creates \"postgres\")")]
    NoUser(String),
    #[error("PostgreSQL of {node}: {what}")]
    Sql {
        node: String,
        what: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("{0}")]
    State(String),
    #[error("no PostgreSQL node is named {0:?}")]
    UnknownMember(String),
}

/// The role the cluster wants this node's server in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// Run as the primary (promote if a standby).
    Primary,
    /// Run as a standby streaming from `upstream` (repoint, or rewind a
    /// former primary first).
    Standby { upstream: String },
    /// Must not run a primary (no lease): a primary is fenced and stays
    /// down; a standby keeps streaming from whoever it follows.
    Fenced,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Role::Primary => write!(f, "primary"),
            Role::Standby { upstream } => write!(f, "standby of {upstream}"),
            Role::Fenced => write!(f, "fenced"),
        }
    }
}

/// A decision about this node: the role, the epoch of the primary record it
/// comes from (older epochs are ignored) and why, for the logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Desired {
    pub role: Role,
    pub epoch: u64,
    pub reason: String,
}

/// What the cluster's primary record (`ClusterHandle::primary()`, with
/// `holds_lease()`) means for node `me`: the record's node runs the primary
/// only while its agent holds the lease; the others follow it.
pub fn desired_from_record(me: &str, primary: Option<(&str, u64)>, holds_lease: bool) -> Desired {
    match primary {
        Some((node, epoch)) if node == me && holds_lease => Desired {
            role: Role::Primary,
            epoch,
            reason: format!(
                "primary record (epoch {epoch}) names this node and it holds the lease"
            ),
        },
        Some((node, epoch)) if node == me => Desired {
            role: Role::Fenced,
            epoch,
            reason: format!("primary record (epoch {epoch}) names this node but it lost the lease"),
        },
        Some((node, epoch)) => Desired {
            role: Role::Standby {
                upstream: node.to_owned(),
            },
            epoch,
            reason: format!("primary record (epoch {epoch}) names {node}"),
        },
        None => Desired {
            role: Role::Fenced,
            epoch: 0,
            reason: "no primary record yet".into(),
        },
    }
}

/// A PostgreSQL node as its peers reach it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub name: String,
    pub host: String,
    pub port: u16,
}

/// The OS user the server runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OsUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

impl OsUser {
    pub fn lookup(name: &str) -> Result<OsUser, PghaError> {
        let id = |flag: &str| -> Result<u32, PghaError> {
            let output = std::process::Command::new("id")
                .args([flag, name])
                .output()
                .map_err(|source| PghaError::Io {
                    what: "running id(1)".into(),
                    source,
                })?;
            String::from_utf8_lossy(&output.stdout)
                .trim()
                .parse()
                .map_err(|_| PghaError::NoUser(name.to_owned()))
        };
        Ok(OsUser {
            name: name.to_owned(),
            uid: id("-u")?,
            gid: id("-g")?,
        })
    }
}

/// Everything this node needs about PostgreSQL, expanded from the config.
#[derive(Debug, Clone)]
pub struct PgPlan {
    pub cluster: String,
    pub node: String,
    /// Every PostgreSQL node, this one included, in `[[node]]` order.
    pub members: Vec<Member>,
    /// Who runs initdb when the data directories are empty.
    pub bootstrap_primary: String,
    pub data_dir: PathBuf,
    pub socket_dir: PathBuf,
    pub port: u16,
    pub listen_addresses: String,
    pub bin_dir: PathBuf,
    pub os_user: String,
    pub replication_user: String,
    pub replication_password: Option<String>,
    pub synchronous: bool,
    pub max_lag_bytes: u64,
    pub max_slot_wal_keep_size: u64,
    pub max_wal_senders: u32,
    pub api_listen: SocketAddr,
    pub settings: BTreeMap<String, String>,
    pub hba: Vec<String>,
    /// How long a primary that crashed (while the node still should run
    /// it) stays down before the agent starts it again.
    pub crash_restart_delay: Duration,
    /// With the cluster state: how long the recorded primary must look
    /// dead before the Raft leader tries to replace it.
    pub failover_after: Duration,
    pub reclone_after_failed_rewinds: u32,
    /// How often the reconciler looks at the server.
    pub interval: Duration,
}

impl PgPlan {
    /// The plan for `node`, or None when the cluster has no `[postgres]`
    /// or `node` is not one of its nodes.
    pub fn new(config: &Config, node: &NodeConfig) -> Option<Result<PgPlan, PghaError>> {
        let postgres = config.postgres.as_ref()?;
        let members = postgres.members(&config.nodes);
        if !members.iter().any(|member| member.name == node.name) {
            return None;
        }
        Some(Self::build(&config.cluster.name, postgres, &members, node))
    }

    fn build(
        cluster: &str,
        postgres: &PostgresConfig,
        members: &[&NodeConfig],
        node: &NodeConfig,
    ) -> Result<PgPlan, PghaError> {
        let replication_password = match (
            &postgres.replication_password,
            &postgres.replication_password_file,
        ) {
            (Some(password), _) => Some(password.clone()),
            (None, Some(path)) => Some(
                std::fs::read_to_string(path)
                    .map_err(|source| PghaError::Io {
                        what: format!(
                            "reading postgres.replication_password_file {}",
                            path.display()
                        ),
                        source,
                    })?
                    .trim_end()
                    .to_owned(),
            ),
            (None, None) => None,
        };
        Ok(PgPlan {
            cluster: cluster.to_owned(),
            node: node.name.clone(),
            members: members
                .iter()
                .map(|member| Member {
                    name: member.name.clone(),
                    host: expand(&postgres.host, member),
                    port: postgres.port_of(&member.name),
                })
                .collect(),
            bootstrap_primary: postgres.primary.clone(),
            data_dir: PathBuf::from(expand(&postgres.data_dir, node)),
            socket_dir: PathBuf::from(expand(&postgres.socket_dir, node)),
            port: postgres.port_of(&node.name),
            listen_addresses: expand(&postgres.listen_addresses, node),
            bin_dir: postgres.bin_dir.clone(),
            os_user: postgres.os_user.clone(),
            replication_user: postgres.replication_user.clone(),
            replication_password,
            synchronous: postgres.synchronous,
            max_lag_bytes: postgres.max_lag_bytes.0,
            max_slot_wal_keep_size: postgres.max_slot_wal_keep_size.0,
            max_wal_senders: postgres.max_wal_senders,
            api_listen: postgres.api_listen,
            settings: postgres.settings.clone(),
            hba: postgres.hba.clone(),
            crash_restart_delay: postgres.crash_restart_delay,
            failover_after: postgres.failover_after,
            reclone_after_failed_rewinds: postgres.reclone_after_failed_rewinds,
            interval: postgres.check_interval,
        })
    }

    pub fn member(&self, name: &str) -> Result<&Member, PghaError> {
        self.members
            .iter()
            .find(|member| member.name == name)
            .ok_or_else(|| PghaError::UnknownMember(name.to_owned()))
    }

    /// The other PostgreSQL nodes.
    pub fn peers(&self) -> impl Iterator<Item = &Member> {
        self.members
            .iter()
            .filter(move |member| member.name != self.node)
    }

    /// The desired role at start, before any decision arrives: the
    /// bootstrap primary runs the primary, the others follow it.
    pub fn bootstrap_desired(&self) -> Desired {
        if self.node == self.bootstrap_primary {
            Desired {
                role: Role::Primary,
                epoch: 0,
                reason: "bootstrap primary of the config".into(),
            }
        } else {
            Desired {
                role: Role::Standby {
                    upstream: self.bootstrap_primary.clone(),
                },
                epoch: 0,
                reason: "bootstrap primary of the config".into(),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_record_decides_each_nodes_role_and_the_lease_fences() {
        assert_eq!(
            desired_from_record("a", Some(("a", 3)), true).role,
            Role::Primary
        );
        assert_eq!(
            desired_from_record("a", Some(("a", 3)), false).role,
            Role::Fenced
        );
        assert_eq!(
            desired_from_record("b", Some(("a", 3)), false).role,
            Role::Standby {
                upstream: "a".into()
            }
        );
        assert_eq!(desired_from_record("b", None, true).role, Role::Fenced);
        assert_eq!(desired_from_record("b", Some(("a", 7)), true).epoch, 7);
    }
}
