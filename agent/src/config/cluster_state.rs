//! `[cluster_state]`: the agents' shared state on Raft (see
//! `agent/src/cluster/`): who votes, where they talk, where each keeps its
//! log, and the primary lease.
//!
//! ```toml
//! [cluster_state]
//! voters = ["nuster1", "nuster2", "nuster3"]   # odd: 2 of 3 decide a 2/2 split
//! lease = "1s"
//! ```
//!
//! Voters decide; every other `[[node]]` is a learner that follows the
//! state without a vote. An even number of voters is refused: with four
//! voters a 2/2 split leaves both halves without a majority (3 of 4), so
//! the cluster would stop choosing a primary at all. Listing three of the
//! four nodes makes the tie-breaker explicit: the half that holds two of
//! the three voters decides.

use std::{collections::HashSet, path::PathBuf, time::Duration};

use serde::Deserialize;

use super::{NodeConfig, Problem};

/// The agent-to-agent Raft port unless the section says otherwise.
pub const DEFAULT_CLUSTER_PORT: u16 = 9480;
pub const DEFAULT_STATE_DIR: &str = "/var/lib/farol/cluster";
/// openraft gives every AppendEntries (heartbeats, and the lease renewals
/// while they went through the Raft log) one heartbeat interval to answer:
/// at 100 ms a starved CPU (a loaded Pi, the lab beside four builds) missed
/// them in a row, followers elected and the primary's lease lapsed with
/// every node up. A third of the election
/// timeout is the most the election allows.
pub const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_millis(250);
pub const DEFAULT_ELECTION_TIMEOUT: Duration = Duration::from_millis(750);
/// The primary asks the voters for promises every `lease / 4`; no Raft
/// election stops that (see `cluster::promise`), so the lease only has to
/// outlast a stall as long as the ones Raft itself survives. With the
/// margin, a dead primary is replaced `lease + lease_margin` after its
/// last promise: under 2 s from its death to writes on the new primary.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(1);
pub const DEFAULT_LEASE_MARGIN: Duration = Duration::from_millis(250);
/// The clocks' rates differ by far less than 1 ms per second of lease; a
/// late timer and the fence (ALTER SYSTEM, reload) need tens of ms.
pub const MIN_LEASE_MARGIN: Duration = Duration::from_millis(100);

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ClusterStateConfig {
    /// The `[[node]]` names that vote; an odd number (1, 3, 5...). Other
    /// nodes follow the state as learners.
    pub voters: Vec<String>,
    /// TCP port of the agent-to-agent Raft protocol, on each node's address.
    #[serde(default = "default_port")]
    pub port: u16,
    /// Where each agent keeps its Raft vote, log and snapshot, in a
    /// subdirectory named after the node (several lab nodes share a disk).
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// How often the Raft leader tells the others it is alive.
    #[serde(default = "default_heartbeat", with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// A follower that hears no leader for this long (up to 10% more, at
    /// random) starts an election.
    #[serde(default = "default_election_timeout", with = "humantime_serde")]
    pub election_timeout: Duration,
    /// How long the primary may keep accepting writes after it sent the
    /// last request that a majority of voters answered with a promise. At
    /// least the election timeout: the lease must survive any stall that
    /// Raft itself survives.
    #[serde(default = "default_lease", with = "humantime_serde")]
    pub lease: Duration,
    /// How much longer each voter's promise runs (from when it received
    /// the request) than the primary's lease (from when it sent it):
    /// another node may be made primary only once a majority's promises
    /// lapsed. Covers the clocks' rates and a late timer and the fence on
    /// a loaded old primary.
    #[serde(default = "default_lease_margin", with = "humantime_serde")]
    pub lease_margin: Duration,
}

fn default_port() -> u16 {
    DEFAULT_CLUSTER_PORT
}
fn default_state_dir() -> PathBuf {
    PathBuf::from(DEFAULT_STATE_DIR)
}
fn default_heartbeat() -> Duration {
    DEFAULT_HEARTBEAT_INTERVAL
}
fn default_election_timeout() -> Duration {
    DEFAULT_ELECTION_TIMEOUT
}
fn default_lease() -> Duration {
    DEFAULT_LEASE
}
fn default_lease_margin() -> Duration {
    DEFAULT_LEASE_MARGIN
}

impl ClusterStateConfig {
    /// True when `node` has a vote.
    pub fn is_voter(&self, node: &str) -> bool {
        self.voters.iter().any(|voter| voter == node)
    }

    /// How long a change of the primary record may take: waiting out the
    /// old primary's promises (`lease + lease_margin`, twice for slack)
    /// and a Raft commit (an election at most).
    pub fn write_timeout(&self) -> Duration {
        (self.lease + self.lease_margin) * 2 + self.election_timeout
    }
}

/// Every rule of the section, with key paths under `cluster_state.`.
pub fn validate(
    section: &ClusterStateConfig,
    nodes: &[NodeConfig],
    has_secret: bool,
    problems: &mut Vec<Problem>,
) {
    let mut found = Vec::new();
    let mut problem = |key: &str, message: String| {
        found.push(Problem {
            key: format!("cluster_state.{key}"),
            message,
        })
    };
    if section.voters.is_empty() {
        problem(
            "voters",
            "expected at least one voter (an odd number of [[node]] names)".into(),
        );
    } else if section.voters.len().is_multiple_of(2) {
        problem(
            "voters",
            format!(
                "expected an odd number of voters, got {}: with an even number a split into two \
                 equal halves ({}/{}) leaves neither half a majority, and no primary can be \
                 chosen; list one voter fewer (the other node follows as a learner) so that the \
                 half holding the majority of voters decides",
                section.voters.len(),
                section.voters.len() / 2,
                section.voters.len() / 2
            ),
        );
    }
    let known: HashSet<&str> = nodes.iter().map(|node| node.name.as_str()).collect();
    let mut seen = HashSet::new();
    for (index, voter) in section.voters.iter().enumerate() {
        if !known.contains(voter.as_str()) {
            let mut names: Vec<&str> = known.iter().copied().collect();
            names.sort_unstable();
            problem(
                &format!("voters[{index}]"),
                format!(
                    "{voter:?} is not a [[node]] name (known: {})",
                    names.join(", ")
                ),
            );
        } else if !seen.insert(voter.as_str()) {
            problem(
                &format!("voters[{index}]"),
                format!("{voter:?} is listed twice"),
            );
        }
    }
    if section.port == 0 {
        problem("port", "expected a fixed port, got port 0".into());
    }
    if !section.state_dir.is_absolute() {
        problem(
            "state_dir",
            format!("expected an absolute path, got {:?}", section.state_dir),
        );
    }
    if section.heartbeat_interval.is_zero()
        || section.heartbeat_interval * 3 > section.election_timeout
    {
        problem(
            "heartbeat_interval",
            format!(
                "expected more than 0 and at most a third of election_timeout ({}), got {}",
                humantime::format_duration(section.election_timeout),
                humantime::format_duration(section.heartbeat_interval)
            ),
        );
    }
    if section.lease < section.election_timeout {
        problem(
            "lease",
            format!(
                "expected at least election_timeout ({}): the primary renews every lease / 4, \
                 and a lease shorter than the stall Raft itself survives would be lost on a \
                 loaded machine with every node up, got {}",
                humantime::format_duration(section.election_timeout),
                humantime::format_duration(section.lease)
            ),
        );
    }
    if section.lease_margin < MIN_LEASE_MARGIN || section.lease_margin > section.lease {
        problem(
            "lease_margin",
            format!(
                "expected {} to lease ({}): a late timer and the fence on the old primary need \
                 room, and a margin longer than the lease only delays failovers, got {}",
                humantime::format_duration(MIN_LEASE_MARGIN),
                humantime::format_duration(section.lease),
                humantime::format_duration(section.lease_margin)
            ),
        );
    }
    problems.append(&mut found);
    if !has_secret {
        problems.push(Problem {
            key: "cluster_state".into(),
            message:
                "needs cluster.secret_file (or cluster.secret): agent-to-agent messages decide \
             which node is primary and are authenticated with it"
                    .into(),
        });
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::super::{Config, ConfigError};
    use super::*;

    fn config(section: &str, secret: bool) -> String {
        let mut text = String::from("[cluster]\nname = \"test\"\n");
        if secret {
            text.push_str("secret = \"a cluster secret of some length\"\n");
        }
        for (index, name) in ["n1", "n2", "n3", "n4"].iter().enumerate() {
            text.push_str(&format!(
                "\n[[node]]\nname = \"{name}\"\naddress = \"192.0.2.{}/24\"\ninterface = \"eth0\"\n",
                11 + index
            ));
        }
        text.push_str("\n[cluster_state]\n");
        text.push_str(section);
        text
    }

    fn problems(text: &str) -> Vec<String> {
        match Config::from_toml(Path::new("test.toml"), text) {
            Ok(config) => panic!("expected an invalid config, got {config:#?}"),
            Err(error @ ConfigError::Invalid { .. }) => {
                error.problems().iter().map(|p| p.to_string()).collect()
            }
            Err(other) => panic!("expected validation problems, got {other}"),
        }
    }

    fn assert_problem(problems: &[String], key: &str, fragment: &str) {
        assert!(
            problems
                .iter()
                .any(|p| p.starts_with(&format!("{key}: ")) && p.contains(fragment)),
            "expected a problem at {key} mentioning {fragment:?}, got {problems:#?}"
        );
    }

    #[test]
    fn three_voters_of_four_nodes_load_with_defaults() {
        let text = config("voters = [\"n1\", \"n2\", \"n3\"]\n", true);
        let config = Config::from_toml(Path::new("test.toml"), &text).unwrap();
        let section = config.cluster_state.unwrap();
        assert_eq!(section.port, DEFAULT_CLUSTER_PORT);
        assert_eq!(section.lease, DEFAULT_LEASE);
        assert!(section.is_voter("n3"));
        assert!(!section.is_voter("n4"));
    }

    #[test]
    fn an_even_number_of_voters_is_refused_with_the_two_two_split_explained() {
        let problems = problems(&config("voters = [\"n1\", \"n2\", \"n3\", \"n4\"]\n", true));
        assert_problem(
            &problems,
            "cluster_state.voters",
            "odd number of voters, got 4",
        );
        assert_problem(
            &problems,
            "cluster_state.voters",
            "(2/2) leaves neither half a majority",
        );
    }

    #[test]
    fn a_voter_that_is_not_a_node_is_refused() {
        let problems = problems(&config("voters = [\"n1\", \"n2\", \"nuster9\"]\n", true));
        assert_problem(
            &problems,
            "cluster_state.voters[2]",
            "\"nuster9\" is not a [[node]] name (known: n1, n2, n3, n4)",
        );
    }

    #[test]
    fn duplicate_and_missing_voters_are_refused() {
        let twice = problems(&config("voters = [\"n1\", \"n1\", \"n2\"]\n", true));
        assert_problem(&twice, "cluster_state.voters[1]", "listed twice");
        let none = problems(&config("voters = []\n", true));
        assert_problem(&none, "cluster_state.voters", "at least one voter");
    }

    #[test]
    fn the_section_needs_the_cluster_secret() {
        let problems = problems(&config("voters = [\"n1\"]\n", false));
        assert_problem(&problems, "cluster_state", "cluster.secret_file");
    }

    #[test]
    fn timings_must_let_the_lease_survive_what_raft_survives() {
        let short = problems(&config(
            "voters = [\"n1\"]\nlease = \"600ms\"\nheartbeat_interval = \"500ms\"\nlease_margin = \"0s\"\nstate_dir = \"relative\"\n",
            true,
        ));
        assert_problem(
            &short,
            "cluster_state.lease",
            "expected at least election_timeout (750ms)",
        );
        assert_problem(
            &short,
            "cluster_state.heartbeat_interval",
            "a third of election_timeout",
        );
        assert_problem(
            &short,
            "cluster_state.lease_margin",
            "expected 100ms to lease",
        );
        assert_problem(&short, "cluster_state.state_dir", "absolute path");
        let long_margin = problems(&config(
            "voters = [\"n1\"]\nlease = \"1s\"\nlease_margin = \"2s\"\n",
            true,
        ));
        assert_problem(
            &long_margin,
            "cluster_state.lease_margin",
            "expected 100ms to lease (1s)",
        );
        // The defaults and the old, longer lease both pass.
        for section in ["", "lease = \"3s\"\nlease_margin = \"500ms\"\n"] {
            let text = config(&format!("voters = [\"n1\"]\n{section}"), true);
            Config::from_toml(Path::new("test.toml"), &text).unwrap();
        }
    }

    #[test]
    fn unknown_keys_are_refused() {
        let text = config("voters = [\"n1\"]\nwitness = \"n4\"\n", true);
        let error = Config::from_toml(Path::new("test.toml"), &text).unwrap_err();
        assert!(error.to_string().contains("cluster_state"), "{error}");
    }
}
