//! `[[volume]]` sections: replicated volumes (GlusterFS replica volumes'
//! job). Each volume names its replica set (node and brick directory per
//! replica), where it is mounted, and its write quorum.
//!
//! ```toml
//! [[volume]]
//! name = "www"
//! mount = "/srv/www"
//! replicas = [
//!     { node = "nuster1", brick = "/var/lib/farol/bricks/www" },
//!     { node = "nuster2", brick = "/var/lib/farol/bricks/www" },
//!     { node = "nuster3", brick = "/var/lib/farol/bricks/www" },
//! ]
//! ```

use std::{collections::HashSet, net::SocketAddr, path::PathBuf, time::Duration};

use serde::Deserialize;

use super::{is_identifier, NodeConfig};

/// The volume protocol's port unless a volume says otherwise.
pub const DEFAULT_VOLUME_PORT: u16 = 9478;
/// Heal bandwidth per peer unless a volume says otherwise.
pub const DEFAULT_HEAL_RATE_MIB: u32 = 64;

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VolumeConfig {
    /// The volume's name (letters, digits, `-`, `_`).
    pub name: String,
    /// Where every node of the replica set mounts the volume; a replica
    /// may override it (tests mount three replicas on one machine).
    pub mount: Option<PathBuf>,
    /// The replica set: one brick per node.
    pub replicas: Vec<ReplicaConfig>,
    /// Replicas that must apply a write before it is acknowledged;
    /// default: a majority of the replica set.
    pub quorum: Option<usize>,
    /// TCP port of the agent-to-agent volume protocol.
    #[serde(default = "default_port")]
    pub port: u16,
    /// What wins when two replicas changed the same file apart.
    #[serde(default)]
    pub split_brain: SplitBrainPolicy,
    /// The replica whose copy wins under `split_brain = "source"`.
    pub split_brain_source: Option<String>,
    /// Heal bandwidth towards one peer, MiB/s.
    #[serde(default = "default_heal_rate")]
    pub heal_rate_mib: u32,
    /// A peer that sends nothing for this long is considered down.
    #[serde(default = "default_peer_timeout", with = "humantime_serde")]
    pub peer_timeout: Duration,
    /// How long the kernel may keep a file's attributes without asking
    /// (FUSE `attr_timeout`); a peer's change or a heal invalidates them
    /// at once. "0s" asks every time.
    #[serde(default = "default_cache_timeout", with = "humantime_serde")]
    pub attr_timeout: Duration,
    /// How long the kernel may keep a name it looked up (FUSE
    /// `entry_timeout`); invalidated like the attributes.
    #[serde(default = "default_cache_timeout", with = "humantime_serde")]
    pub entry_timeout: Duration,
    /// How long the kernel may remember that a name does not exist (FUSE
    /// `negative_timeout`; saves the lookups of files a web server probes
    /// for, such as `.htaccess`); a peer's create invalidates it.
    #[serde(default = "default_cache_timeout", with = "humantime_serde")]
    pub negative_timeout: Duration,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ReplicaConfig {
    /// A `[[node]]` name.
    pub node: String,
    /// The brick: a local directory that holds this replica's files.
    pub brick: PathBuf,
    /// Overrides the protocol address (default: the node's address and the
    /// volume's port); tests put three replicas on loopback.
    pub listen: Option<SocketAddr>,
    /// Overrides the volume's mount point on this node.
    pub mount: Option<PathBuf>,
}

/// Resolution of a file changed on two sides of a partition.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum SplitBrainPolicy {
    /// The copy with the latest modification time wins (ties: the lower
    /// node name).
    #[default]
    LatestMtime,
    /// The copy on `split_brain_source` wins.
    Source,
}

fn default_port() -> u16 {
    DEFAULT_VOLUME_PORT
}

fn default_heal_rate() -> u32 {
    DEFAULT_HEAL_RATE_MIB
}

fn default_peer_timeout() -> Duration {
    Duration::from_secs(2)
}

/// GlusterFS's FUSE mount uses 1 s for attributes and entries as well.
fn default_cache_timeout() -> Duration {
    Duration::from_secs(1)
}

/// Longer kernel caching only delays what cannot be invalidated (changes
/// made on a brick behind the agent's back).
pub const MAX_CACHE_TIMEOUT: Duration = Duration::from_secs(60);

impl VolumeConfig {
    /// The write quorum in force: configured, or a majority.
    pub fn quorum(&self) -> usize {
        self.quorum.unwrap_or(self.replicas.len() / 2 + 1)
    }

    /// This node's replica, if it holds one.
    pub fn replica(&self, node: &str) -> Option<&ReplicaConfig> {
        self.replicas.iter().find(|replica| replica.node == node)
    }

    /// Where `replica` listens for the volume protocol.
    pub fn listen(&self, replica: &ReplicaConfig, nodes: &[NodeConfig]) -> Option<SocketAddr> {
        replica.listen.or_else(|| {
            nodes
                .iter()
                .find(|node| node.name == replica.node)
                .map(|node| SocketAddr::new(node.address.addr(), self.port))
        })
    }

    /// Where `replica`'s node mounts the volume.
    pub fn mount_point(&self, replica: &ReplicaConfig) -> Option<PathBuf> {
        replica.mount.clone().or_else(|| self.mount.clone())
    }
}

/// The volume rules; `has_secret` says whether `cluster.secret` or
/// `cluster.secret_file` is set (the protocol needs one).
pub(super) fn validate(
    volumes: &[VolumeConfig],
    nodes: &[NodeConfig],
    has_secret: bool,
    problem: &mut dyn FnMut(String, String),
) {
    if !volumes.is_empty() && !has_secret {
        problem(
            "cluster.secret_file".into(),
            "a [[volume]] needs cluster.secret or cluster.secret_file (it authenticates the volume protocol)".into(),
        );
    }
    let mut names = HashSet::new();
    let mut listens = HashSet::new();
    for (index, volume) in volumes.iter().enumerate() {
        let at = |key: &str| format!("volume[{index}].{key}");
        if !is_identifier(&volume.name) {
            problem(
                at("name"),
                format!(
                    "expected letters, digits, '-' or '_' (1 to 63 characters), got {:?}",
                    volume.name
                ),
            );
        } else if !names.insert(volume.name.as_str()) {
            problem(
                at("name"),
                format!("{:?} is already the name of another volume", volume.name),
            );
        }
        if volume.replicas.is_empty() {
            problem(at("replicas"), "expected at least one replica".into());
        }
        if let Some(mount) = &volume.mount {
            if !mount.is_absolute() {
                problem(
                    at("mount"),
                    format!("expected an absolute path, got {mount:?}"),
                );
            }
        }
        if volume.port == 0 {
            problem(at("port"), "expected a fixed port, got port 0".into());
        }
        if volume.heal_rate_mib == 0 {
            problem(
                at("heal_rate_mib"),
                "expected at least 1 MiB/s, got 0".into(),
            );
        }
        if volume.peer_timeout < Duration::from_millis(100) {
            problem(
                at("peer_timeout"),
                format!("expected at least 100ms, got {:?}", volume.peer_timeout),
            );
        }
        for (key, timeout) in [
            ("attr_timeout", volume.attr_timeout),
            ("entry_timeout", volume.entry_timeout),
            ("negative_timeout", volume.negative_timeout),
        ] {
            if timeout > MAX_CACHE_TIMEOUT {
                problem(
                    at(key),
                    format!("expected at most {MAX_CACHE_TIMEOUT:?}, got {timeout:?}"),
                );
            }
        }
        if let Some(quorum) = volume.quorum {
            if quorum == 0 || quorum > volume.replicas.len() {
                problem(
                    at("quorum"),
                    format!(
                        "expected 1 to {} (the replica count), got {quorum}",
                        volume.replicas.len()
                    ),
                );
            }
        }
        match (volume.split_brain, &volume.split_brain_source) {
            (SplitBrainPolicy::Source, None) => problem(
                at("split_brain_source"),
                "split_brain = \"source\" needs the node whose copy wins".into(),
            ),
            (SplitBrainPolicy::Source, Some(source)) if volume.replica(source).is_none() => {
                problem(
                    at("split_brain_source"),
                    format!("{source:?} holds no replica of this volume"),
                )
            }
            (SplitBrainPolicy::LatestMtime, Some(_)) => problem(
                at("split_brain_source"),
                "only used with split_brain = \"source\"".into(),
            ),
            _ => {}
        }
        let mut replica_nodes = HashSet::new();
        for (r, replica) in volume.replicas.iter().enumerate() {
            let at = |key: &str| format!("volume[{index}].replicas[{r}].{key}");
            if !nodes.iter().any(|node| node.name == replica.node) {
                problem(
                    at("node"),
                    format!("no [[node]] is named {:?}", replica.node),
                );
            } else if !replica_nodes.insert(replica.node.as_str()) {
                problem(
                    at("node"),
                    format!("{:?} already holds a replica of this volume", replica.node),
                );
            }
            if !replica.brick.is_absolute() {
                problem(
                    at("brick"),
                    format!("expected an absolute path, got {:?}", replica.brick),
                );
            }
            if let Some(mount) = &replica.mount {
                if !mount.is_absolute() {
                    problem(
                        at("mount"),
                        format!("expected an absolute path, got {mount:?}"),
                    );
                } else if mount.starts_with(&replica.brick) || replica.brick.starts_with(mount) {
                    problem(
                        at("mount"),
                        format!("{mount:?} overlaps the brick {:?}", replica.brick),
                    );
                }
            }
            if let Some(listen) = replica.listen {
                if listen.port() == 0 {
                    problem(at("listen"), "expected a fixed port, got port 0".into());
                }
            }
            if let Some(addr) = volume.listen(replica, nodes) {
                if !listens.insert(addr) {
                    problem(
                        at("listen"),
                        format!("{addr} is already the address of another replica"),
                    );
                }
            }
            if volume.mount_point(replica).is_none() {
                problem(
                    at("mount"),
                    "no mount point: set volume.mount or this replica's mount".into(),
                );
            }
        }
    }
}

#[cfg(test)]
mod tests;
