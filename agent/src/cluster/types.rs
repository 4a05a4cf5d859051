//! What goes through the Raft log, and the messages between agents that
//! carry it.

use std::io::Cursor;

use serde::{Deserialize, Serialize};

use super::{ClusterError, PrimaryRecord};

openraft::declare_raft_types!(
    /// openraft's type parameters for the cluster state.
    pub TypeConfig:
        D = Command,
        R = Outcome,
        NodeId = u64,
        Node = openraft::BasicNode,
        SnapshotData = Cursor<Vec<u8>>,
);

/// A change to the cluster state (an entry of the Raft log).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Make `node` the primary if the epoch is still `expected_epoch` and
    /// the current primary has not renewed its lease since the leader saw
    /// `expected_renewals` (or the current primary hands over itself).
    SetPrimary {
        node: String,
        expected_epoch: u64,
        expected_renewals: u64,
        handoff_from: Option<String>,
    },
    /// The primary of `epoch` renewed its lease through the log (before
    /// the lease moved to the voters' promises, `super::promise`): still
    /// applied (counted) so that logs written then replay.
    Renew { node: String, epoch: u64 },
}

/// What applying a command gave.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// A blank or membership entry.
    Nothing,
    Primary(PrimaryRecord),
    Renewed,
    Refused(ClusterError),
}

/// A request an agent hands to the Raft leader (directly or forwarded).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    SetPrimary {
        node: String,
        expected_epoch: u64,
        handoff_from: Option<String>,
    },
}

/// The answer of `/cluster/ping`: who answered and what it knows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pong {
    pub node: String,
    pub term: u64,
}
